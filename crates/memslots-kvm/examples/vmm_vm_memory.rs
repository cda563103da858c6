//! The VMM of `vmm.rs`, written without memslots: rust-vmm `vm-memory`
//! (`GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>>` over memfds) and
//! `kvm-ioctls` directly. Guest RAM around the 32-bit PCI hole, a long-mode
//! vCPU thread dirtying memory at CPL3, an ELF loaded with linux-loader, a
//! virtio-queue request across a slot boundary served by a device thread,
//! hot-plug while the vCPU runs, pre-copy live migration to a second KVM VM,
//! hot-unplug and balloon.
//!
//! `cargo run --release -p memslots-kvm --example vmm_vm_memory` (needs
//! /dev/kvm); `cargo test` runs it 5 times.

// An x86-64 VMM: u64 sizes fit usize.
#![allow(clippy::cast_possible_truncation)]

use std::ffi::CStr;
use std::fs::File;
use std::io::Cursor;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES as LOG};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use memslots_kvm::longmode::{self, GuestExit, LongModeLayout};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{mock::MockSplitQueue, Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryRegion};
use vm_memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Region = Arc<GuestRegionMmap<AtomicBitmap>>;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const CODE: u64 = 0x40_0000; // the ELF's load address
const GUEST_PAGES: u64 = 8192; // the guest dirties [64 MiB, 96 MiB) at CPL3
const DEVICE_AT: u64 = 4 * GIB + 64 * MIB; // the device keeps writing here
const HOTPLUG_AT: u64 = 4 * GIB + 256 * MIB;

/// One guest's memory map: (slot, gpa, size, offset in the memfd, memfd index).
const MAP: [(u32, u64, u64, u64, usize); 3] = [
    (0, 0, GIB, 0, 0),             // low RAM, two slots so that 1 GiB is a slot boundary
    (1, GIB, GIB, GIB, 0),         // ... up to the PCI hole at 2 GiB
    (2, 4 * GIB, 256 * MIB, 0, 1), // high RAM above 4 GiB
];

/// A KVM VM and its memory. Field order: the VM fd closes before the memory
/// map (and with it, possibly, the last reference to a mapping) is dropped.
struct Guest {
    vm: VmFd,
    mem: GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>>,
}

fn memfd(name: &CStr, size: u64) -> Res<Arc<File>> {
    // SAFETY: `name` is NUL-terminated; the call has no other memory effect.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    Ok(Arc::new(file))
}

/// A shared mapping of `size` bytes of `file` from `off`, placed at `gpa`.
fn region(file: &Arc<File>, off: u64, gpa: u64, size: u64) -> Res<Region> {
    let map = MmapRegion::<AtomicBitmap>::from_file(FileOffset::from_arc(Arc::clone(file), off), size as usize)?;
    Ok(Arc::new(GuestRegionMmap::new(map, GuestAddress(gpa)).ok_or("region overflows")?))
}

/// Points KVM slot `slot` at region `r` with `flags`.
fn set_slot(vm: &VmFd, slot: u32, flags: u32, r: &GuestRegionMmap<AtomicBitmap>) -> Res {
    let (guest_phys_addr, memory_size, userspace_addr) = (r.start_addr().0, r.len(), r.as_ptr() as u64);
    let region = kvm_userspace_memory_region { slot, flags, guest_phys_addr, memory_size, userspace_addr };
    // SAFETY: `r` maps `memory_size` bytes at `userspace_addr`, and stays mapped
    // while KVM may use the slot: a region is dropped only after its slot is
    // deleted (hot-unplug) or its VM is gone (`Guest` closes the VM fd first;
    // the vCPU thread holds the memory map until its vCPU fd is closed).
    unsafe { vm.set_user_memory_region(region)? };
    Ok(())
}

fn delete_slot(vm: &VmFd, slot: u32) -> Res {
    // SAFETY: a zero-sized region deletes the slot; KVM then no longer uses its memory.
    unsafe { vm.set_user_memory_region(kvm_userspace_memory_region { slot, ..Default::default() })? };
    Ok(())
}

/// Hot-plug: the kernel slot, then a new vm-memory map with the region
/// (rolling the kernel slot back if vm-memory refuses it).
fn plug(g: &Guest, slot: u32, r: &Region) -> Res {
    set_slot(&g.vm, slot, 0, r)?;
    let guard = g.mem.lock().map_err(|_| "memory map lock poisoned")?;
    match g.mem.memory().insert_region(Arc::clone(r)) {
        Ok(map) => {
            guard.replace(map);
            Ok(())
        }
        Err(e) => {
            delete_slot(&g.vm, slot)?;
            Err(e.into())
        }
    }
}

fn new_guest(kvm: &Kvm) -> Res<(Guest, Vec<Region>)> {
    let files = [memfd(c"low", 2 * GIB)?, memfd(c"high", 256 * MIB)?];
    let ram = MAP.iter().map(|&(_, gpa, size, off, m)| region(&files[m], off, gpa, size)).collect::<Res<Vec<_>>>()?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_arc_regions(ram.clone())?);
    let guest = Guest { vm: kvm.create_vm()?, mem };
    for (slot, ..) in MAP {
        set_slot(&guest.vm, slot, 0, &ram[slot as usize])?;
    }
    Ok((guest, ram))
}

/// Runs the guest until `stop`, counting passes over its pages and pausing
/// `throttle` ms after each (auto-converge, as QEMU throttles vCPUs).
fn vcpu_thread(
    mut vcpu: VcpuFd,
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    throttle: Arc<AtomicU64>,
) -> Res<VcpuFd> {
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

/// The pages of slot `slot` (region `r`) written since the last call: by the
/// guest (KVM's dirty log) or by the VMM and devices (vm-memory's bitmap).
fn harvest(vm: &VmFd, slot: u32, r: &GuestRegionMmap<AtomicBitmap>) -> Res<Vec<u64>> {
    let mut bitmap = vm.get_dirty_log(slot, r.len() as usize)?;
    // One bit per page from the region's start, like KVM's; swapped to zero word by word.
    for (w, v) in bitmap.iter_mut().zip(MmapRegion::bitmap(r).get_and_reset()) {
        *w |= v;
    }
    Ok(bitmap)
}

/// Copies the pages set in `bitmap` from `gpa` on from `src` to `dst`.
fn send(src: &Guest, dst: &Guest, gpa: u64, bitmap: &[u64]) -> Res<u64> {
    let (from, to) = (src.mem.memory(), dst.mem.memory());
    let mut buf = vec![0u8; PAGE as usize];
    let mut n = 0;
    for (w, &bits) in bitmap.iter().enumerate() {
        for b in (0..64).filter(|b| bits & (1 << b) != 0) {
            let at = GuestAddress(gpa + (w as u64 * 64 + b) * PAGE);
            from.read_slice(&mut buf, at)?;
            to.write_slice(&buf, at)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The pages of `r` that hold data (others are holes: zero on both sides).
fn resident(r: &GuestRegionMmap<AtomicBitmap>) -> Res<Vec<u64>> {
    let mut vec = vec![0u8; (r.len() / PAGE) as usize];
    // SAFETY: the mapping is page-aligned and `r.len()` bytes long; `vec` has one byte per page.
    if unsafe { libc::mincore(r.as_ptr().cast(), r.len() as usize, vec.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut bitmap = vec![0u64; vec.len().div_ceil(64)];
    vec.iter().enumerate().filter(|(_, &x)| x & 1 != 0).for_each(|(i, _)| bitmap[i / 64] |= 1 << (i % 64));
    Ok(bitmap)
}

fn run(verbose: bool) -> Res<u64> {
    let kvm = Kvm::new()?;
    let (src, mut ram) = new_guest(&kvm)?;
    // Boot: long-mode boot area, the CPL3 program as an ELF through linux-loader.
    let layout = LongModeLayout::default();
    longmode::write_boot_area(&layout, |gpa, b| {
        src.mem.memory().write_slice(b, GuestAddress(gpa)).map_err(std::io::Error::other)
    })?;
    let elf = longmode::wrap_elf(&longmode::dirty_forever_program(), CODE, CODE, CODE);
    let entry = Elf::load(&*src.mem.memory(), None, &mut Cursor::new(&elf), None)?.kernel_load;
    let vcpu = src.vm.create_vcpu(0)?;
    longmode::enter_long_mode(&kvm, &vcpu, &layout, entry.0, CODE, [64 * MIB, GUEST_PAGES, 0x10, PAGE, 0, 0])?;
    let (stop_vcpu, passes, throttle) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let guest = {
        let (stop, passes, throttle) = (Arc::clone(&stop_vcpu), Arc::clone(&passes), Arc::clone(&throttle));
        let keep = src.mem.clone(); // the vCPU's memory outlives its fd, even if `run` returns early
        std::thread::spawn(move || {
            let vcpu = vcpu_thread(vcpu, stop, passes, throttle);
            drop(keep);
            vcpu
        })
    };

    // A virtio request whose buffer crosses the slot boundary at 1 GiB, served
    // by a device thread through the vm-memory traits; the device then keeps
    // writing (DMA) until stopped.
    let space = src.mem.clone();
    let request: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    space.memory().write_slice(&request, GuestAddress(GIB - 2048))?;
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
    ram.push(region(&memfd(c"dimm", 256 * MIB)?, 0, HOTPLUG_AT, 256 * MIB)?);
    plug(&src, 3, &ram[3])?;
    src.mem.memory().write_obj(0xd1_u64, GuestAddress(HOTPLUG_AT + 8 * PAGE))?;

    // Pre-copy live migration to a second KVM VM in this process.
    let (dst, mut dst_ram) = new_guest(&kvm)?;
    dst_ram.push(region(&memfd(c"dimm", 256 * MIB)?, 0, HOTPLUG_AT, 256 * MIB)?);
    plug(&dst, 3, &dst_ram[3])?;
    for (slot, r) in (0..).zip(&ram) {
        set_slot(&src.vm, slot, LOG, r)?; // start dirty logging
    }
    let (t0, passes0) = (Instant::now(), passes.load(Relaxed));
    let mut round_sent = Vec::new();
    for round in 0..40 {
        let mut n = 0;
        for (slot, r) in (0..).zip(&ram) {
            let bitmap = harvest(&src.vm, slot, r)?;
            n += send(&src, &dst, r.start_addr().0, &if round == 0 { resident(r)? } else { bitmap })?;
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
    for (slot, r) in (0..).zip(&ram) {
        last += send(&src, &dst, r.start_addr().0, &harvest(&src.vm, slot, r)?)?;
    }
    // Compare every page that holds data on either side (holes are zero on both).
    let (mut a, mut b, mut mismatched) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize], 0);
    let (from, to) = (src.mem.memory(), dst.mem.memory());
    for (r, d) in ram.iter().zip(&dst_ram) {
        let (rs, rd) = (resident(r)?, resident(d)?);
        for p in (0..r.len() / PAGE).filter(|&p| (rs[p as usize / 64] | rd[p as usize / 64]) & (1 << (p % 64)) != 0) {
            from.read_slice(&mut a, GuestAddress(r.start_addr().0 + p * PAGE))?;
            to.read_slice(&mut b, GuestAddress(r.start_addr().0 + p * PAGE))?;
            mismatched += u64::from(a != b);
        }
    }
    drop((from, to)); // a `memory()` guard keeps its map, and so its regions, alive: unplug needs none
                      // The destination guest resumes where the source stopped.
    let mut dvcpu = dst.vm.create_vcpu(0)?;
    dvcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
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

    // Hot-unplug on the destination: the kernel slot, then the region; once
    // the last `Arc` (ours, the old memory map's) is dropped, nothing holds the DIMM.
    let dimm = dst_ram.pop().ok_or("no DIMM")?;
    let dimm_addr = dimm.as_ptr() as usize;
    delete_slot(&dst.vm, 3)?;
    let guard = dst.mem.lock().map_err(|_| "memory map lock poisoned")?;
    guard.replace(dst.mem.memory().remove_region(GuestAddress(HOTPLUG_AT), 256 * MIB)?.0);
    drop(dimm);
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mapped = maps.lines().any(|l| l.starts_with(&format!("{dimm_addr:x}-")));
    // Balloon: the destination gives 64 MiB of low RAM back.
    let low = &dst_ram[0];
    let file = low.file_offset().ok_or("low RAM has no file")?;
    let (punch, at) = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, i64::try_from(file.start() + 64 * MIB)?);
    // SAFETY: punching a hole in our own memfd only changes its contents (to zero).
    if unsafe { libc::fallocate(file.file().as_raw_fd(), punch, at, 64 << 20) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: [64 MiB, 128 MiB) lies inside the mapping of `low`; on a shared
    // mapping MADV_DONTNEED only drops page table entries (reads refault from the file).
    if unsafe { libc::madvise(low.as_ptr().add(64 << 20).cast(), 64 << 20, libc::MADV_DONTNEED) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if mapped || dst.mem.memory().read_obj::<u64>(GuestAddress(64 * MIB))? != 0 {
        return Err("unplugged DIMM still mapped, or ballooned page not zero".into());
    }
    Ok(mismatched)
}

fn main() -> Res {
    let mismatched = run(true)?;
    std::process::exit(i32::from(mismatched != 0));
}

#[test]
fn vmm_vm_memory_migrates_with_no_mismatched_page_in_5_runs() {
    if Kvm::new().is_err() {
        return eprintln!("SKIP: /dev/kvm is not usable here");
    }
    for _ in 0..5 {
        assert_eq!(run(true).unwrap(), 0);
    }
}
