//! A VMM on ONE memslots VM per guest ([`KvmGuestVm`]): guest RAM around the
//! 32-bit PCI hole, a long-mode vCPU thread dirtying memory at CPL3, an ELF
//! loaded with linux-loader, a virtio-queue request across a slot boundary
//! served by a device thread, hot-plug while the vCPU runs, pre-copy live
//! migration to a second KVM VM, hot-unplug and balloon.
//!
//! `cargo run --release -p memslots-kvm --example vmm` (needs /dev/kvm);
//! `cargo test` runs it 5 times.

// An x86-64 VMM: u64 sizes fit usize.
#![allow(clippy::cast_possible_truncation)]

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use linux_loader::loader::{elf::Elf, KernelLoader};
use memslots::KVM_MEM_LOG_DIRTY_PAGES as LOG;
use memslots_kvm::longmode::{self, GuestExit, LongModeLayout};
use memslots_kvm::{KvmGuestVm, KvmVcpu};
use memslots_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use memslots_mem::{HostMemory, MapOptions};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{mock::MockSplitQueue, Queue, QueueT};

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const CODE: u64 = 0x40_0000; // the ELF's load address
const GUEST_PAGES: u64 = 8192; // the guest dirties [64 MiB, 96 MiB) at CPL3
const DEVICE_AT: u64 = 4 * GIB + 64 * MIB; // the device keeps writing here
const HOTPLUG_AT: u64 = 4 * GIB + 256 * MIB;

/// One guest's memory map: (slot, gpa, size, offset in `ram`, mapping index).
const MAP: [(u32, u64, u64, u64, usize); 3] = [
    (0, 0, GIB, 0, 0),             // low RAM, two slots so that 1 GiB is a slot boundary
    (1, GIB, GIB, GIB, 0),         // ... up to the PCI hole at 2 GiB
    (2, 4 * GIB, 256 * MIB, 0, 1), // high RAM above 4 GiB
];

fn new_guest() -> Res<(KvmGuestVm, Vec<Arc<HostMemory>>)> {
    let vm = KvmGuestVm::new()?;
    let ram =
        vec![vm.map_memfd("low", 2 * GIB, &MapOptions::new())?, vm.map_memfd("high", 256 * MIB, &MapOptions::new())?];
    for (slot, gpa, size, off, m) in MAP {
        vm.set_region(slot, 0, gpa, &ram[m], off, size)?;
    }
    Ok((vm, ram))
}

/// Runs the guest until `stop`, counting passes over its pages and pausing
/// `throttle` ms after each (auto-converge, as QEMU throttles vCPUs).
fn vcpu_thread(
    mut vcpu: KvmVcpu,
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    throttle: Arc<AtomicU64>,
) -> Res<KvmVcpu> {
    while !stop.load(Relaxed) {
        match longmode::classify(&vcpu.run()?) {
            GuestExit::Io { port: 0x10, data } => {
                passes.store(u64::from(data), Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(throttle.load(Relaxed)));
            }
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
    Ok(vcpu)
}

/// Copies the pages set in `bitmap` of slot `slot` from `src` to `dst`.
fn send(src: &KvmGuestVm, dst: &KvmGuestVm, gpa: u64, bitmap: &[u64]) -> Res<u64> {
    let mut buf = vec![0u8; PAGE as usize];
    let mut n = 0;
    for (w, &bits) in bitmap.iter().enumerate() {
        for b in (0..64).filter(|b| bits & (1 << b) != 0) {
            let at = gpa + (w as u64 * 64 + b) * PAGE;
            src.read(0, at, &mut buf)?;
            dst.write(0, at, &buf)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The pages of `m` that hold data (others are holes: zero on both sides).
fn resident(m: &HostMemory, off: u64, size: u64) -> Res<Vec<u64>> {
    let r = m.resident_pages(off as usize, size as usize)?;
    let mut bitmap = vec![0u64; r.len().div_ceil(64)];
    r.iter().enumerate().filter(|(_, &x)| x).for_each(|(i, _)| bitmap[i / 64] |= 1 << (i % 64));
    Ok(bitmap)
}

fn run(verbose: bool) -> Res<u64> {
    let (src, ram) = new_guest()?;
    // Boot: long-mode boot area, the CPL3 program as an ELF through linux-loader.
    let layout = LongModeLayout::default();
    longmode::write_boot_area(&layout, |gpa, b| src.write(0, gpa, b).map_err(std::io::Error::other))?;
    let elf = longmode::wrap_elf(&longmode::dirty_forever_program(), CODE, CODE, CODE);
    let entry = Elf::load(&*src.address_space(0).memory(), None, &mut Cursor::new(&elf), None)?.kernel_load;
    let vcpu = src.create_vcpu(0)?;
    longmode::enter_long_mode(src.kvm(), &vcpu, &layout, entry.0, CODE, [64 * MIB, GUEST_PAGES, 0x10, PAGE, 0, 0])?;
    let (stop_vcpu, passes, throttle) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let guest = {
        let (stop, passes, throttle) = (Arc::clone(&stop_vcpu), Arc::clone(&passes), Arc::clone(&throttle));
        std::thread::spawn(move || vcpu_thread(vcpu, stop, passes, throttle))
    };

    // A virtio request whose buffer crosses the slot boundary at 1 GiB, served
    // by a device thread through the vm-memory traits; the device then keeps
    // writing (DMA) until stopped.
    let space = src.address_space(0);
    let request: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    src.write(0, GIB - 2048, &request)?;
    let ring_mem = space.memory();
    let vq = MockSplitQueue::create(&*ring_mem, GuestAddress(0x10_0000), 16);
    let descs = [(GIB - 2048, PAGE as u32, 1, 1), (4 * GIB, 64, 2, 0)]; // NEXT, then WRITE
    vq.add_desc_chains(&descs.map(|(a, l, f, n)| RawDescriptor::from(Descriptor::new(a, l, f, n))), 0)?;
    let mut queue: Queue = vq.create_queue()?;
    let stop_device = Arc::new(AtomicBool::new(false));
    let device = {
        let stop = Arc::clone(&stop_device);
        std::thread::spawn(move || -> Res<u64> {
            let chain = queue.pop_descriptor_chain(space.memory()).ok_or("no request")?;
            let head = chain.head_index();
            let mut got = vec![0u8; PAGE as usize];
            std::io::Read::read_exact(&mut chain.clone().reader(&*space.memory())?, &mut got)?;
            let sum: u64 = got.iter().map(|&b| u64::from(b)).sum();
            std::io::Write::write_all(&mut chain.writer(&*space.memory())?, &sum.to_le_bytes())?;
            queue.add_used(&*space.memory(), head, 8)?;
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                space.memory().write_obj(i, GuestAddress(DEVICE_AT + (i % 256) * PAGE))?;
                i += 1;
            }
            Ok(sum)
        })
    };

    // Hot-plug 256 MiB while the vCPU runs; the VMM writes into it.
    let dimm = src.map_memfd("dimm", 256 * MIB, &MapOptions::new())?;
    src.set_region(3, 0, HOTPLUG_AT, &dimm, 0, 256 * MIB)?;
    src.write_obj(0, HOTPLUG_AT + 8 * PAGE, 0xd1_u64)?;

    // Pre-copy live migration to a second KVM VM in this process.
    let (dst, dst_ram) = new_guest()?;
    let dst_dimm = dst.map_memfd("dimm", 256 * MIB, &MapOptions::new())?;
    dst.set_region(3, 0, HOTPLUG_AT, &dst_dimm, 0, 256 * MIB)?;
    let slots = [
        (0, 0, GIB, &ram[0], 0),
        (1, GIB, GIB, &ram[0], GIB),
        (2, 4 * GIB, 256 * MIB, &ram[1], 0),
        (3, HOTPLUG_AT, 256 * MIB, &dimm, 0),
    ];
    for &(slot, gpa, size, m, off) in &slots {
        src.set_region(slot, LOG, gpa, m, off, size)?; // start dirty logging
    }
    let (t0, passes0) = (Instant::now(), passes.load(Relaxed));
    let mut round_sent = Vec::new();
    for round in 0..40 {
        let mut n = 0;
        for &(slot, gpa, size, m, off) in &slots {
            let bitmap = src.harvest_dirty_log(slot)?;
            n += send(&src, &dst, gpa, &if round == 0 { resident(m, off, size)? } else { bitmap })?;
        }
        round_sent.push(n);
        if round >= 3 && n < 2048 {
            break;
        }
        if round >= 3 {
            throttle.fetch_add(50, Relaxed); // not converging: slow the guest down
        }
        std::thread::sleep(std::time::Duration::from_millis(50)); // the network's time to send them
    }
    let rate = (passes.load(Relaxed) - passes0) * GUEST_PAGES * 1000 / (t0.elapsed().as_millis().max(1) as u64);
    // Stop-and-copy: pause the vCPU and the device, send what is left.
    stop_vcpu.store(true, Relaxed);
    let vcpu = guest.join().map_err(|_| "vCPU thread panicked")??;
    stop_device.store(true, Relaxed);
    let sum = device.join().map_err(|_| "device thread panicked")??;
    let mut last = 0;
    for &(slot, gpa, ..) in &slots {
        last += send(&src, &dst, gpa, &src.harvest_dirty_log(slot)?)?;
    }
    // Compare every page that holds data on either side (holes are zero on both).
    let (mut a, mut b, mut mismatched) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize], 0);
    let dst_maps = [(&dst_ram[0], 0), (&dst_ram[0], GIB), (&dst_ram[1], 0), (&dst_dimm, 0)];
    for (&(_, gpa, size, m, off), (dm, doff)) in slots.iter().zip(dst_maps) {
        let (rs, rd) = (resident(m, off, size)?, resident(dm, doff, size)?);
        for p in (0..size / PAGE).filter(|&p| (rs[p as usize / 64] | rd[p as usize / 64]) & (1 << (p % 64)) != 0) {
            src.read(0, gpa + p * PAGE, &mut a)?;
            dst.read(0, gpa + p * PAGE, &mut b)?;
            mismatched += u64::from(a != b);
        }
    }
    // The destination guest resumes where the source stopped.
    let mut dvcpu = dst.create_vcpu(0)?;
    dvcpu.set_cpuid2(&src.kvm().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?)?;
    dvcpu.set_sregs(&vcpu.get_sregs()?)?;
    dvcpu.set_regs(&vcpu.get_regs()?)?;
    let resumed = longmode::classify(&dvcpu.run()?);
    if verbose {
        println!("virtio request across the 1 GiB slot boundary served: byte sum {sum}");
        println!("guest dirtied {rate} pages/s at CPL3 during pre-copy");
        println!("pre-copy rounds: {}; pages sent per round: {round_sent:?}", round_sent.len());
        println!("stop-and-copy pages: {last}; mismatched pages: {mismatched}; destination resumed: {resumed:?}");
    }
    if rate < 10_000
        || !matches!(resumed, GuestExit::Io { port: 0x10, .. })
        || sum != request.iter().map(|&b| u64::from(b)).sum::<u64>()
    {
        return Err(format!("rate {rate}/s, resumed {resumed:?}, sum {sum}").into());
    }

    // Hot-unplug on the destination: once its slot is gone, nothing holds the DIMM.
    let dimm_addr = dst_dimm.addr();
    drop(dst_dimm);
    dst.delete_region(3)?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mapped = maps.lines().any(|l| l.starts_with(&format!("{dimm_addr:x}-")));
    // Balloon: the destination gives 64 MiB of low RAM back.
    dst.discard(0, 64 * MIB, 64 * MIB)?;
    if mapped || dst.read_obj::<u64>(0, 64 * MIB)? != 0 {
        return Err("unplugged DIMM still mapped, or ballooned page not zero".into());
    }
    Ok(mismatched)
}

fn main() -> Res {
    let mismatched = run(true)?;
    std::process::exit(i32::from(mismatched != 0));
}

#[test]
fn vmm_migrates_with_no_mismatched_page_in_5_runs() {
    if !memslots_kvm::kvm_available() {
        return eprintln!("SKIP: /dev/kvm is not usable here");
    }
    for _ in 0..5 {
        assert_eq!(run(true).unwrap(), 0);
    }
}
