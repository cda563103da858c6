//! Arch hooks are user code: a panic in any of them, at any point of the
//! update protocol, must never leave a reader able to reach a freed slot
//! (issue 10, defect 2). The VM is poisoned instead: every later slot change
//! fails with `EIO`, lookups keep answering from the last published set.
//! `tests/miri.rs` runs the sequence under Miri too.

use memslots::{
    ArchHooks, Config, Errno, Error, MemoryChange, MemorySlot, SlotDraft, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const HVA: u64 = 0x7f00_0000_0000;

/// Where the hooks panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum At {
    Nowhere,
    Prepare,
    Flush,
    /// The n-th `memslots_updated` call after arming (1-based, in `nth`).
    Updated,
    Commit,
}

#[derive(Default)]
struct PanickyHooks {
    at: AtomicU32,
    nth: AtomicU64,
    seen: AtomicU64,
}

impl PanickyHooks {
    fn arm(&self, at: At, nth: u64) {
        self.nth.store(nth, Ordering::SeqCst);
        self.seen.store(0, Ordering::SeqCst);
        self.at.store(at as u32, Ordering::SeqCst);
    }
    fn hit(&self, at: At) {
        if self.at.load(Ordering::SeqCst) != at as u32 {
            return;
        }
        if at == At::Updated && self.seen.fetch_add(1, Ordering::SeqCst) + 1 != self.nth.load(Ordering::SeqCst) {
            return;
        }
        self.at.store(At::Nowhere as u32, Ordering::SeqCst);
        panic!("hook panics at {at:?}");
    }
}

impl ArchHooks for PanickyHooks {
    type SlotData = ();
    fn prepare_memory_region(
        &self,
        _: MemoryChange,
        _: Option<&MemorySlot<()>>,
        _: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        self.hit(At::Prepare);
        Ok(())
    }
    fn commit_memory_region(&self, _: MemoryChange, _: Option<&MemorySlot<()>>, _: Option<&MemorySlot<()>>) {
        self.hit(At::Commit);
    }
    fn flush_shadow_memslot(&self, _: &MemorySlot<()>) {
        self.hit(At::Flush);
    }
    fn memslots_updated(&self, _: u16, _: u64) {
        self.hit(At::Updated);
    }
}

fn region(slot: u32, flags: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(slot, flags, gpa, size, HVA + u64::from(slot) * 0x1000_0000)
}

fn vm() -> Vm<PanickyHooks> {
    let vm = Vm::with_hooks(Config::default(), PanickyHooks::default()).unwrap();
    for s in 0..4u32 {
        vm.set_user_memory_region(&region(s, 0, u64::from(s) * 0x100_0000, 0x10_0000)).unwrap();
    }
    vm
}

/// Every lookup path still answers with live, self-consistent slots.
fn readers_are_sound(vm: &Vm<PanickyHooks>) {
    let g = vm.read();
    for gfn in [0u64, 1, 0xff, 0x1000, 0x1001, 0x2000, 0x3000, 0x3fff, 0x8000] {
        if let Some(s) = g.gfn_to_memslot(0, gfn) {
            assert!(gfn >= s.base_gfn && gfn - s.base_gfn < s.npages, "gfn {gfn:#x} in {s:?}");
            assert_eq!(s.userspace_addr, HVA + u64::from(s.id) * 0x1000_0000);
        }
        let _ = g.gfn_to_hva(0, gfn);
        let _ = g.gfn_to_memslot_approx(0, gfn);
    }
    for id in 0..5 {
        if let Some(s) = g.id_to_memslot(0, id) {
            assert_eq!(s.id, id);
        }
    }
    assert!(g.slots(0).all(|s| s.npages == 0x100));
    assert!(g.slots_in_hva_range(HVA, HVA + 0x4000_0000).all(|s| s.npages == 0x100));
    drop(g);
    let vcpu = vm.vcpu();
    for gfn in [0u64, 1, 0x1001, 0x2000, 0x3000] {
        let _ = vcpu.gfn_to_hva(gfn);
        let _ = vcpu.gfn_to_hva(gfn);
    }
}

fn assert_poisoned(vm: &Vm<PanickyHooks>) {
    assert!(vm.is_poisoned());
    for r in [region(0, 0, 0, 0), region(0, 0, 0x8000_0000, 0x10_0000), region(9, 0, 0x9000_0000, 0x1000)] {
        let err = vm.set_user_memory_region(&r).unwrap_err();
        assert_eq!(err, Error::Poisoned);
        assert_eq!(err.errno(), Errno::EIO);
    }
    readers_are_sound(vm);
}

/// The sequence: a lookup fills `last_used`; a DELETE whose prepare
/// panics; DELETE again; CREATE again; a lookup. On the old code the second
/// DELETE removed the slot from the wrong set and the last lookup read the
/// freed slot (Miri: dangling reference; ASan: heap-use-after-free).
#[test]
fn panicking_prepare_then_delete_and_create_again() {
    let vm = Vm::with_hooks(Config::default(), PanickyHooks::default()).unwrap();
    vm.set_user_memory_region(&region(0, 0, 0, 0x10_0000)).unwrap();
    assert!(vm.read().gfn_to_memslot(0, 1).is_some()); // fills last_used
    vm.hooks().arm(At::Prepare, 0);
    assert!(catch_unwind(AssertUnwindSafe(|| vm.set_user_memory_region(&region(0, 0, 0, 0)))).is_err());
    assert_eq!(vm.set_user_memory_region(&region(0, 0, 0, 0)), Err(Error::Poisoned));
    assert_eq!(vm.set_user_memory_region(&region(0, 0, 0, 0x10_0000)), Err(Error::Poisoned));
    // The INVALID copy published before prepare is what readers see now.
    let g = vm.read();
    let s = g.gfn_to_memslot(0, 1).expect("the INVALID copy is still published");
    assert!(s.is_invalid());
    assert_eq!(g.gfn_to_hva(0, 1), Err(memslots::HvaError::Invalid));
}

/// A panic at every hook point of every kind of change.
#[test]
fn panic_at_every_hook_point_poisons_and_readers_stay_sound() {
    let changes: [(&str, UserMemoryRegion); 4] = [
        ("create", region(5, 0, 0x5000_0000, 0x10_0000)),
        ("delete", region(1, 0, 0, 0)),
        ("move", region(2, 0, 0x6000_0000, 0x10_0000)),
        ("flags", region(3, KVM_MEM_LOG_DIRTY_PAGES, 0x300_0000, 0x10_0000)),
    ];
    // CREATE and FLAGS_ONLY publish once, DELETE and MOVE twice (INVALID copy, then the change).
    let points = [(At::Prepare, 0), (At::Flush, 0), (At::Updated, 1), (At::Updated, 2), (At::Commit, 0)];
    let mut panicked = 0;
    for (what, r) in changes {
        for (at, nth) in points {
            let vm = vm();
            readers_are_sound(&vm); // fill the caches
            vm.hooks().arm(at, nth);
            let out = catch_unwind(AssertUnwindSafe(|| vm.set_user_memory_region(&r)));
            if out.is_ok() {
                // This change has no such point (CREATE: no flush, one publish).
                assert!(!vm.is_poisoned(), "{what} {at:?} {nth}");
                readers_are_sound(&vm);
                continue;
            }
            panicked += 1;
            assert_poisoned(&vm);
        }
    }
    // create: prepare, updated#1, commit; flags: the same; delete and move: all five.
    assert_eq!(panicked, 3 + 5 + 5 + 3);
}

/// A poisoned VM still harvests dirty logs and tears down cleanly.
#[test]
fn poisoned_vm_still_logs_and_drops() {
    let vm = Vm::with_hooks(Config::default(), PanickyHooks::default()).unwrap();
    vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000)).unwrap();
    vm.set_user_memory_region(&region(1, 0, 0x1000_0000, 0x10_0000)).unwrap();
    vm.hooks().arm(At::Updated, 2);
    assert!(
        catch_unwind(AssertUnwindSafe(|| vm.set_user_memory_region(&region(1, 0, 0x2000_0000, 0x10_0000)))).is_err()
    );
    assert_eq!(vm.mark_page_dirty(0, 3), memslots::DirtyMark::Marked);
    assert_eq!(vm.get_dirty_log_vec(0).unwrap()[0], 1 << 3);
    drop(vm);
}
