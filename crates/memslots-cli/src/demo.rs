//! `memslots demo`: a tiny guest on the host's KVM whose RAM is 193 slots
//! created through the library; prints what the guest wrote (read back
//! through the library), the dirty pages harvested through it, and what the
//! vCPU sees while the host deletes and moves a slot under it.

use anyhow::{bail, Context, Result};
use memslots::UserMemoryRegion;
use memslots_kvm::guest::{
    loop_program, read_guest_u16, run_loop, writer_program, Guest, LoopEvent, Mapping, DATA_SLOTS, DATA_SLOT_BASE,
    MMIO_VALUE,
};
use memslots_kvm::kdirty::{sync_dirty_log, KernelDirtyMode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

fn seg(i: u32) -> u16 {
    u16::try_from(Guest::data_gpa(i) >> 4).unwrap_or(0)
}

pub(crate) fn run() -> Result<()> {
    if !memslots_kvm::kvm_available() {
        bail!("demo needs /dev/kvm, which is not available here");
    }
    let written = [3u32, 17, 42, 99, 150, 191];
    let table: Vec<u16> = written.iter().map(|&i| seg(i)).collect();
    let mut g = Guest::new(&writer_program(), &table, true, KernelDirtyMode::Bitmap).context("creating the guest")?;
    println!(
        "guest RAM: 1 boot slot + {DATA_SLOTS} data slots of 4 KiB, created through memslots (KVM backend, {} ioctls)",
        g.vm.hooks().ioctls()
    );
    g.run_to_hlt(10_000).context("running the writer program")?;
    println!("phase 1: the guest wrote 0xBEEF and its segment to {} pages, then halted", written.len());
    for &i in &written {
        let gpa = Guest::data_gpa(i);
        // SAFETY: the Guest owns every slot's host memory while it lives.
        let (a, b) = unsafe { (read_guest_u16(&g.vm, gpa), read_guest_u16(&g.vm, gpa + 2)) };
        println!(
            "  gpa {gpa:#07x} (slot {:>3}): {:#06x} {:#06x}   read through vm.gfn_to_hva",
            DATA_SLOT_BASE + i,
            a.unwrap_or(0),
            b.unwrap_or(0)
        );
    }
    let mut dirty = Vec::new();
    for i in 0..DATA_SLOTS {
        sync_dirty_log(&g.vm, DATA_SLOT_BASE + i, KernelDirtyMode::Bitmap).map_err(|e| anyhow::anyhow!("sync: {e}"))?;
        if g.vm.get_dirty_log_vec(DATA_SLOT_BASE + i)?.iter().any(|&w| w != 0) {
            dirty.push(Guest::data_gpa(i) >> 12);
        }
    }
    let want: Vec<u64> = written.iter().map(|&i| Guest::data_gpa(i) >> 12).collect();
    let gfns: Vec<String> = dirty.iter().map(|g| format!("{g:#x}")).collect();
    println!(
        "  dirty pages harvested (the kernel's dirty log merged into the library's bitmaps): gfns {} -> {}",
        gfns.join(", "),
        if dirty == want { "exactly the pages written" } else { "NOT the pages written" }
    );
    drop(g);

    println!("phase 2: the guest loops reading gpa X, reporting it on port 0x10, incrementing X+2");
    println!(
        "  Each step counts the vCPU's exits until it has seen the expected one 20 times; exits the vCPU made \
before a change took effect count too. A read or write that finds no slot exits to the host as MMIO; the host \
answers MMIO reads with {MMIO_VALUE:#06x}, which the guest then reports."
    );
    let k = 10u32;
    let gpa = Guest::data_gpa(k);
    let fresh = Mapping::new(4096)?;
    fresh.write(0, &0x2222u16.to_le_bytes())?;
    let g = Guest::new(&loop_program(seg(k)), &[], false, KernelDirtyMode::Bitmap)?;
    // The Guest's VM maps only memory it owns: hand it `fresh` too.
    g.vm.hooks().attach(&fresh)?;
    let off = usize::try_from(u64::from(k) * 4096)?;
    g.data.write(off, &0x1111u16.to_le_bytes())?;
    let Guest { vm, mut vcpu, data, .. } = g;
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
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 0, data.hva() + u64::from(k) * 4096))?;
        let counter = || data.read_u16(off + 2).context("counter outside the data mapping");
        let frozen = counter()?;
        step(&format!("slot {slot} deleted while the vCPU runs"), 20, LoopEvent::MmioRead(gpa))?;
        println!("  the old memory's counter stayed at {frozen} (now {}): the guest no longer reaches it", counter()?);
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 4096, fresh.hva()))?;
        step("recreated on new memory holding 0x2222", 20, LoopEvent::Read(0x2222))?;
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, 0xE_0000, 4096, fresh.hva()))?;
        step("moved to gpa 0xe0000 (the old range now exits as MMIO)", 20, LoopEvent::MmioRead(gpa))?;
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 4096, fresh.hva()))?;
        step(&format!("moved back to gpa {gpa:#x} (the new memory again)"), 20, LoopEvent::Read(0x2222))?;
        stop.store(true, Ordering::SeqCst);
        drop(rx);
        runner.join().map_err(|_| anyhow::anyhow!("vCPU thread panicked"))??;
        Ok(())
    })?;
    match vm.generation(0) {
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
