//! A small workload that exercises every `unsafe` path of the core, sized to
//! run under Miri (`cargo +nightly miri test -p memslots --test miri`): slot
//! pointers in the sets, read sections over the two sets, the vCPU cache,
//! dirty bitmap take (memcpy/memset) and flip-clear, dirty rings, and a reader
//! thread racing a writer.

use memslots::{
    Config, DirtyMark, HvaError, UserMemoryRegion, Vm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use std::sync::atomic::{AtomicBool, Ordering};

const HVA: u64 = 0x1000_0000;

fn region(slot: u32, flags: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(slot, flags, gpa, size, HVA + u64::from(slot) * 0x10_0000)
}

#[test]
fn slots_lookups_and_caches() {
    let vm = Vm::new(Config::default().with_user_slots(16)).unwrap();
    for s in 0..8u32 {
        vm.set_user_memory_region(&region(s, 0, u64::from(s) * 0x10_0000, 0x4000)).unwrap();
    }
    let vcpu = vm.vcpu();
    assert_eq!(vcpu.gfn_to_hva(0x101), Ok(HVA + 0x10_0000 + 0x1000));
    vm.set_user_memory_region(&region(1, 0, 0x80_0000, 0x4000)).unwrap(); // move
    assert_eq!(vcpu.gfn_to_hva(0x101), Err(HvaError::NoSlot));
    assert_eq!(vcpu.gfn_to_hva(0x801), Ok(HVA + 0x10_0000 + 0x1000));
    vm.set_user_memory_region(&region(2, KVM_MEM_LOG_DIRTY_PAGES, 0x20_0000, 0x4000)).unwrap(); // flags
    vm.set_user_memory_region(&region(3, 0, 0, 0)).unwrap(); // delete
    let g = vm.read();
    assert!(g.id_to_memslot(0, 3).is_none());
    assert_eq!(g.slots(0).count(), 7);
    assert_eq!(g.slots_in_hva_range(HVA, HVA + 0x20_0000).count(), 3);
    assert_eq!(g.gfn_to_memslot(0, 0x200).map(|s| s.id), Some(2));
    let vg = vcpu.read();
    assert_eq!(vg.gfn_to_memslot(0x801).map(|s| s.id), Some(1));
    drop((g, vg));
    assert!(vm.memory_usage().slots == 7);
}

#[test]
fn dirty_bitmaps_and_rings() {
    let vm = Vm::new(Config::default()).unwrap();
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 200 * 0x1000)).unwrap();
    for p in [0u64, 63, 64, 199] {
        assert_eq!(vm.mark_page_dirty(0, p), DirtyMark::Marked);
    }
    let log = vm.get_dirty_log_vec(0).unwrap(); // take: memcpy + memset
    assert_eq!(log, vec![1 | 1 << 63, 1, 0, 1 << 7]);
    vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).unwrap();
    assert_eq!(vm.mark_page_dirty(0, 5), DirtyMark::Marked);
    assert_eq!(vm.mark_page_dirty(0, 70), DirtyMark::Marked);
    assert_eq!(vm.clear_dirty_log(0, 0, 200, &[1 << 5, 0, 0, 0]).unwrap(), 1); // flip-clear
    assert_eq!(vm.get_dirty_log_vec(0).unwrap(), vec![0, 1 << 6, 0, 0]);

    let vm = Vm::new(Config::default()).unwrap();
    vm.enable_dirty_log_ring(4096).unwrap();
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000)).unwrap();
    let v = vm.vcpu();
    for p in 0..10 {
        assert_eq!(v.mark_page_dirty(p), DirtyMark::Marked);
    }
    let mut n = 0;
    vm.harvest_dirty_rings(|_, _| n += 1);
    assert_eq!((n, vm.reset_dirty_rings().unwrap()), (10, 10));
}

#[test]
fn reader_races_writer() {
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).unwrap();
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x4000)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let vcpu = vm.vcpu();
            while !stop.load(Ordering::Relaxed) {
                let g = vcpu.read();
                if let Some(slot) = g.gfn_to_memslot(1) {
                    // The slot stays readable for the whole section.
                    assert_eq!(slot.npages, 4);
                    let _ = g.mark_slot_page_dirty(slot, 1);
                }
                drop(g);
                let _ = vm.gfn_to_hva(0, 1);
            }
        });
        for i in 0..6u64 {
            let gpa = if i % 2 == 0 { 0x10_0000 } else { 0 };
            vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, gpa, 0x4000)).unwrap();
            let _ = vm.get_dirty_log_vec(0).unwrap();
        }
        vm.set_user_memory_region(&region(0, 0, 0, 0)).unwrap();
        stop.store(true, Ordering::Relaxed);
    });
}

/// Both set layouts and the switches between them (the small layout's
/// pointers into its slot array, the rebuilds at 33 and 16 slots), and the
/// lazily allocated metadata cells (install, read, free with the slot).
#[test]
fn set_layout_switches_and_lazy_metadata() {
    use memslots::rmap::X86Mmu;
    let vm = Vm::with_hooks(Config::x86_64().with_address_spaces(1), X86Mmu::new()).unwrap();
    for s in 0..34u32 {
        vm.set_user_memory_region(&region(s, 0, u64::from(s) * 0x10_0000, 0x2000)).unwrap();
    }
    assert_eq!(vm.enable_lazy_metadata(), Ok(true));
    {
        let g = vm.read();
        for s in 0..34u16 {
            let slot = g.gfn_to_memslot(0, u64::from(s) * 0x100 + 1).unwrap();
            assert_eq!(slot.id, s);
            assert!(slot.arch().rmap().is_some());
        }
        assert_eq!(g.slots_in_hva_range(HVA, HVA + 0x30_0000 - 1).count(), 3);
    }
    let vcpu = vm.vcpu();
    for s in (0..34u32).rev().filter(|s| s % 2 == 0) {
        vm.set_user_memory_region(&region(s, 0, 0, 0)).unwrap(); // down to 17, then small again at 16
        assert!(vcpu.gfn_to_hva(u64::from(s) * 0x100).is_err());
    }
    vm.set_user_memory_region(&region(1, 0, 0x400_0000, 0x2000)).unwrap(); // move in the small layout
    let g = vm.read();
    assert_eq!(g.slots(0).count(), 17);
    assert_eq!(g.gfn_to_memslot(0, 0x4001).map(|s| s.id), Some(1));
    assert!(g.gfn_to_memslot(0, 0x4001).unwrap().arch().rmap().is_some());
    assert_eq!(g.id_to_memslot(0, 33).map(|s| s.base_gfn), Some(33 * 0x100));
}
