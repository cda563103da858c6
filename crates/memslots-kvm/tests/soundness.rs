//! Regression tests for issue 10: safe code cannot make a guest (or the
//! kernel) access host memory the VM does not own, and caller-supplied sizes
//! and offsets are refused instead of faulting.

use memslots::{Errno, UserMemoryRegion};
use memslots_kvm::guest::{read_guest_u16, writer_program, Guest, Mapping, BOOT_SIZE, DATA_GPA};
use memslots_kvm::kdirty::{KernelDirtyMode, KernelRing};
use std::io::ErrorKind;
use std::sync::Arc;

fn skip(name: &str) -> bool {
    if memslots_kvm::kvm_available() {
        return false;
    }
    eprintln!("SKIP {name}: /dev/kvm is not available");
    true
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Issue 10 #3: a safe program put a slot over a `Box` and had the guest
/// write it. The Guest's VM now only maps memory it owns.
#[test]
fn guest_vm_refuses_a_slot_over_memory_it_does_not_own() {
    if skip("guest_vm_refuses_a_slot_over_memory_it_does_not_own") {
        return;
    }
    let table = [0xF000u16];
    let mut g = Guest::new(&writer_program(), &table, false, KernelDirtyMode::Bitmap).expect("guest");
    assert!(g.vm.hooks().owns_memory());
    let victim = Box::new(Page([0; 4096]));
    let hva = std::ptr::from_ref(&*victim) as u64;
    // The writer program writes the first words of segment 0xF000 (gpa 0xF0000).
    let r = UserMemoryRegion::new(500, 0, 0xF_0000, 4096, hva);
    let err = g.vm.set_user_memory_region(&r).expect_err("a slot over a Box must be refused");
    assert_eq!(err.errno(), Errno::EFAULT);
    assert!(g.vm.read().id_to_memslot(0, 500).is_none(), "nothing published");
    // A range straddling the end of owned memory, or wrapping, is refused too.
    let straddle = UserMemoryRegion::new(501, 0, 0x30_0000, 0x2000, g.boot.hva() + BOOT_SIZE - 0x1000);
    assert_eq!(g.vm.set_user_memory_region(&straddle).unwrap_err().errno(), Errno::EFAULT);
    // The guest runs; its write to 0xF0000 is an MMIO exit, not a write to the Box.
    let _ = g.run_to_hlt(100);
    assert!(victim.0.iter().all(|&b| b == 0), "the guest wrote the Box");
    // Owned memory still works: a second slot over the data mapping.
    let ok = UserMemoryRegion::new(502, 0, 0x40_0000, 4096, g.data.hva());
    g.vm.set_user_memory_region(&ok).expect("a slot over owned memory");
}

/// Memory attached to the VM stays mapped as long as a vCPU can use it.
#[test]
fn a_vcpu_keeps_the_owned_memory_alive() {
    if skip("a_vcpu_keeps_the_owned_memory_alive") {
        return;
    }
    let g = Guest::new(&writer_program(), &[], false, KernelDirtyMode::Bitmap).expect("guest");
    let Guest { vm, vcpu, boot, data, ring } = g;
    drop((vm, ring));
    assert!(Arc::strong_count(&boot) >= 2 && Arc::strong_count(&data) >= 2, "the vCPU holds the mappings");
    drop(vcpu);
    assert_eq!((Arc::strong_count(&boot), Arc::strong_count(&data)), (1, 1));
}

/// An unrestricted VM (any host range) gives safe code no vCPU.
#[test]
fn unrestricted_vm_hands_out_no_vcpu_and_no_memory_ownership() {
    if skip("unrestricted_vm_hands_out_no_vcpu_and_no_memory_ownership") {
        return;
    }
    let vm = memslots_kvm::new_kvm_vm().expect("vm");
    assert!(!vm.hooks().owns_memory());
    // Any host range is accepted (differential testing, benchmarks) ...
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 4096, 0x1000_0000)).expect("fake hva");
    // ... because no vCPU can run over it.
    assert_eq!(vm.hooks().create_vcpu(0).unwrap_err().kind(), ErrorKind::InvalidInput);
    let m = Mapping::new(4096).unwrap();
    assert_eq!(vm.hooks().attach(&m).unwrap_err().kind(), ErrorKind::InvalidInput);
}

/// Issue 10 #4: `off + 2 <= len` wrapped for `usize::MAX - 1`.
#[test]
fn mapping_bounds_checks_do_not_overflow() {
    let m = Mapping::new(8192).unwrap();
    assert_eq!(m.read_u16(usize::MAX - 1), None);
    assert_eq!(m.read_u16(usize::MAX), None);
    assert_eq!(m.read_u16(8192), None);
    assert_eq!(m.read_u16(8191), None, "odd offsets are refused (unaligned)");
    assert_eq!(m.read_u16(8190), Some(0));
    assert_eq!(m.write(usize::MAX, &[1, 2]).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(m.write(usize::MAX - 1, &[1, 2]).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(m.write(8191, &[1, 2]).unwrap_err().kind(), ErrorKind::InvalidInput);
    m.write(8190, &[1, 2]).unwrap();
    assert_eq!(m.read_u16(8190), Some(0x0201));
}

/// `read_guest_u16` at an odd gpa would read unaligned, or across the page
/// (and out of the slot) at offset 0xfff.
#[test]
fn read_guest_u16_refuses_odd_addresses() {
    if skip("read_guest_u16_refuses_odd_addresses") {
        return;
    }
    let g = Guest::new(&writer_program(), &[], false, KernelDirtyMode::Bitmap).expect("guest");
    // SAFETY: the Guest owns every slot's mapping for its lifetime.
    unsafe {
        assert_eq!(read_guest_u16(&g.vm, DATA_GPA + 0xfff), None);
        assert_eq!(read_guest_u16(&g.vm, DATA_GPA + 1), None);
        assert_eq!(read_guest_u16(&g.vm, DATA_GPA), Some(0));
    }
}

/// Issue 10 #5: `KernelRing::map` trusted `bytes`: 65536 on a ring-less VM
/// mapped nothing the kernel backs (SIGBUS in `harvest`), 8 gave 0 entries
/// (division by zero).
#[test]
fn kernel_ring_map_refuses_sizes_the_vm_was_not_enabled_with() {
    if skip("kernel_ring_map_refuses_sizes_the_vm_was_not_enabled_with") {
        return;
    }
    let g = Guest::new(&writer_program(), &[], false, KernelDirtyMode::Bitmap).expect("guest");
    assert_eq!(g.vcpu.dirty_ring_bytes(), 0);
    for bytes in [65536, 8, 0, 4096, u32::MAX] {
        let err = KernelRing::map(&g.vcpu, bytes).expect_err("no ring on this VM");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bytes}");
    }
    let ring_max = memslots_kvm::host_caps().map_or(0, |c| c.dirty_log_ring_bytes);
    if ring_max < 65536 {
        eprintln!("SKIP ring part: the host has no 64 KiB dirty rings");
        return;
    }
    let mut g = Guest::new(&writer_program(), &[], true, KernelDirtyMode::Ring(65536)).expect("guest");
    assert_eq!(g.vcpu.dirty_ring_bytes(), 65536);
    for bytes in [8, 4096, 131072, 65535] {
        assert_eq!(KernelRing::map(&g.vcpu, bytes).unwrap_err().kind(), ErrorKind::InvalidInput, "{bytes}");
    }
    let mut ring = KernelRing::map(&g.vcpu, 65536).expect("the enabled size maps");
    g.run_to_hlt(100).expect("runs");
    let _ = ring.harvest(&g.vm);
}
