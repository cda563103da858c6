//! `memslots demo`: a tiny guest on the host's KVM whose RAM is 193 slots of
//! one memslots VM ([`KvmGuestVm`]: guest memory and KVM layers); prints what the guest wrote (read back
//! through the library), the dirty pages harvested through it, and what the
//! vCPU sees while the host deletes and moves a slot under it.

use anyhow::{bail, Context, Result};
use memslots::KVM_MEM_LOG_DIRTY_PAGES;
use memslots_kvm::guest::{
    loop_program, run_loop, writer_program, LoopEvent, BOOT_GPA, BOOT_SIZE, DATA_GPA, DATA_SLOTS, DATA_SLOT_BASE,
    MMIO_VALUE,
};
use memslots_kvm::{KvmGuestVm, KvmVcpu};
use memslots_mem::{HostMemory, MapOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

fn data_gpa(i: u32) -> u64 {
    DATA_GPA + u64::from(i) * 4096
}

fn seg(i: u32) -> u16 {
    u16::try_from(data_gpa(i) >> 4).unwrap_or(0)
}

/// One VM (guest memory + KVM, [`KvmGuestVm`]) with a boot slot holding
/// `code` at 0x1000 and `table` at 0x2000, `DATA_SLOTS` 4 KiB data slots
/// over one memfd, and a real-mode vCPU at 0x1000.
fn guest(code: &[u8], table: &[u16], flags: u32) -> Result<(KvmGuestVm, KvmVcpu, Arc<HostMemory>)> {
    let vm = KvmGuestVm::new().context("creating the KVM VM")?;
    let boot = vm.map_memfd("boot", BOOT_SIZE, &MapOptions::new())?;
    let data = vm.map_memfd("data", u64::from(DATA_SLOTS) * 4096, &MapOptions::new())?;
    vm.set_region(0, 0, BOOT_GPA, &boot, 0, BOOT_SIZE)?;
    for i in 0..DATA_SLOTS {
        vm.set_region(DATA_SLOT_BASE + i, flags, data_gpa(i), &data, u64::from(i) * 4096, 4096)?;
    }
    vm.write(0, 0x1000, code)?;
    let t: Vec<u8> = table.iter().chain([&0u16]).flat_map(|s| s.to_le_bytes()).collect();
    vm.write(0, 0x2000, &t)?;
    let vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok((vm, vcpu, data))
}

pub(crate) fn run() -> Result<()> {
    if !memslots_kvm::kvm_available() {
        bail!("demo needs /dev/kvm, which is not available here");
    }
    let written = [3u32, 17, 42, 99, 150, 191];
    let table: Vec<u16> = written.iter().map(|&i| seg(i)).collect();
    let (vm, mut vcpu, _data) = guest(&writer_program(), &table, KVM_MEM_LOG_DIRTY_PAGES)?;
    println!(
        "guest RAM: 1 boot slot + {DATA_SLOTS} data slots of 4 KiB on one memslots VM (guest memory + KVM layers, {} \
ioctls)",
        vm.kvm_hooks().ioctls()
    );
    match vcpu.run().context("running the writer program")? {
        kvm_ioctls::VcpuExit::Hlt => {}
        other => bail!("unexpected vCPU exit {other:?}"),
    }
    println!("phase 1: the guest wrote 0xBEEF and its segment to {} pages, then halted", written.len());
    for &i in &written {
        let gpa = data_gpa(i);
        let (a, b) = (vm.read_obj::<u16>(0, gpa)?, vm.read_obj::<u16>(0, gpa + 2)?);
        println!("  gpa {gpa:#07x} (slot {:>3}): {a:#06x} {b:#06x}   read through the library", DATA_SLOT_BASE + i);
    }
    let mut dirty = Vec::new();
    for i in 0..DATA_SLOTS {
        let log = vm.harvest_dirty_log(DATA_SLOT_BASE + i).map_err(|e| anyhow::anyhow!("harvest: {e}"))?;
        if log.iter().any(|&w| w != 0) {
            dirty.push(data_gpa(i) >> 12);
        }
    }
    let want: Vec<u64> = written.iter().map(|&i| data_gpa(i) >> 12).collect();
    let gfns: Vec<String> = dirty.iter().map(|g| format!("{g:#x}")).collect();
    println!(
        "  dirty pages harvested (the kernel's dirty log merged into the library's, one call per slot): gfns {} -> {}",
        gfns.join(", "),
        if dirty == want { "exactly the pages written" } else { "NOT the pages written" }
    );
    drop((vm, vcpu));

    println!("phase 2: the guest loops reading gpa X, reporting it on port 0x10, incrementing X+2");
    println!(
        "  Each step counts the vCPU's exits until it has seen the expected one 20 times; exits the vCPU made \
before a change took effect count too. A read or write that finds no slot exits to the host as MMIO; the host \
answers MMIO reads with {MMIO_VALUE:#06x}, which the guest then reports."
    );
    let k = 10u32;
    let gpa = data_gpa(k);
    let (vm, mut vcpu, data) = guest(&loop_program(seg(k)), &[], 0)?;
    let fresh = vm.map_memfd("fresh", 4096, &MapOptions::new())?;
    fresh.write_at(0, &0x2222u16.to_le_bytes()).context("fresh page")?;
    let off = usize::try_from(u64::from(k) * 4096)?;
    data.write_at(off, &0x1111u16.to_le_bytes()).context("data page")?;
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let slot = DATA_SLOT_BASE + k;
    std::thread::scope(|s| -> Result<()> {
        let stop = &stop;
        let runner = s.spawn(move || run_loop(&mut vcpu, |ev| tx.send(ev).is_ok() && !stop.load(Ordering::SeqCst)));
        let step = |label: &str, n: usize, want: LoopEvent| -> Result<()> {
            let (mut hits, mut total) = (0, 0);
            // (what, how many), in the order first seen.
            let mut kinds: Vec<(String, usize)> = Vec::new();
            while hits < n {
                let ev = rx.recv_timeout(Duration::from_secs(10)).context("the vCPU stopped reporting")?;
                let what = describe(ev);
                match kinds.iter_mut().find(|(w, _)| *w == what) {
                    Some((_, count)) => *count += 1,
                    None => kinds.push((what, 1)),
                }
                total += 1;
                hits += usize::from(ev == want);
            }
            println!("  {label} ({total} vCPU exits):");
            for (what, count) in &kinds {
                println!("  {count:>8} x {what}");
            }
            Ok(())
        };
        step(&format!("slot {slot} at gpa {gpa:#x} holds 0x1111"), 20, LoopEvent::Read(0x1111))?;
        vm.delete_region(slot)?;
        let counter = || -> Result<u16> {
            let mut b = [0u8; 2];
            data.read_at(off + 2, &mut b).context("counter outside the data mapping")?;
            Ok(u16::from_le_bytes(b))
        };
        let frozen = counter()?;
        step(&format!("slot {slot} deleted while the vCPU runs"), 20, LoopEvent::MmioRead(gpa))?;
        println!("  the old memory's counter stayed at {frozen} (now {}): the guest no longer reaches it", counter()?);
        vm.set_region(slot, 0, gpa, &fresh, 0, 4096)?;
        step("recreated on new memory holding 0x2222", 20, LoopEvent::Read(0x2222))?;
        vm.set_region(slot, 0, 0xE_0000, &fresh, 0, 4096)?;
        step("moved to gpa 0xe0000 (the old range now exits as MMIO)", 20, LoopEvent::MmioRead(gpa))?;
        vm.set_region(slot, 0, gpa, &fresh, 0, 4096)?;
        step(&format!("moved back to gpa {gpa:#x} (the new memory again)"), 20, LoopEvent::Read(0x2222))?;
        stop.store(true, Ordering::SeqCst);
        drop(rx);
        runner.join().map_err(|_| anyhow::anyhow!("vCPU thread panicked"))??;
        Ok(())
    })?;
    match vm.vm().generation(0) {
        Some(g) => println!(
            "demo finished: address space 0 is at generation {g} (each slot change publishes a new memslot set and \
moves the generation on; vCPU caches tagged with an older one are refilled)"
        ),
        None => println!("demo finished"),
    }
    Ok(())
}

/// A vCPU event in words.
fn describe(ev: LoopEvent) -> String {
    match ev {
        LoopEvent::Read(MMIO_VALUE) => format!("reported {MMIO_VALUE:#06x} (the host's answer to its MMIO read)"),
        LoopEvent::Read(v) => format!("read {v:#06x} from its page and reported it"),
        LoopEvent::MmioRead(a) => format!("read of {a:#x} found no slot: MMIO exit"),
        LoopEvent::MmioWrite(a) => format!("write to {a:#x} found no slot: MMIO exit"),
    }
}
