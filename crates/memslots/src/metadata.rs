//! Lazily allocated per-slot metadata (seed 003, "Lazily allocate memslot
//! rmaps"): metadata that only some configurations need is allocated when
//! the VM first needs it, for every slot at once, and from then on for every
//! slot at creation.
//!
//! # The mechanism
//!
//! - A hook layer keeps its lazily allocated part of a slot in a
//!   [`LazyCell`] inside its [`SlotData`](crate::ArchHooks::SlotData) (the
//!   cell is shared by the slot, its INVALID copy and its FLAGS_ONLY
//!   successor, as KVM copies `slot->arch` between them), and allocates it in
//!   [`ArchHooks::alloc_lazy_metadata`].
//! - Nothing is allocated until something calls [`Vm::enable_lazy_metadata`]
//!   (KVM: `mmu_first_shadow_root_alloc`, when the first shadow root is made;
//!   here a backend or emulator calls it explicitly). It takes the VM's
//!   *arch lock* (KVM's `slots_arch_lock`), allocates for every slot of every
//!   address space, then sets the VM's flag with a release store (KVM's
//!   `smp_store_release(&kvm->arch.shadow_root_allocated, true)`).
//! - A slot change holds the arch lock from its prepare step to the publish
//!   of the new slot, and allocates the new slot's metadata there when the
//!   flag is set (CREATE and MOVE: fresh metadata, as x86's
//!   `kvm_alloc_memslot_metadata`; FLAGS_ONLY keeps the old slot's). It
//!   releases the lock *before* waiting for readers, as
//!   `kvm_swap_active_memslots` does, so enabling may run inside a read
//!   section (a vCPU faulting) and while a writer waits, without deadlock.
//! - DELETE frees the metadata with the slot, after the grace period.
//!
//! Why no slot is missed: the enabler and the window "flag checked → slot
//! published" exclude each other (the arch lock). A slot published before
//! the enabler took the lock is in the active set it walks (or its cell is
//! shared with a slot that is); a slot whose change takes the lock after
//! the enabler released it sees the flag. The only slots a reader can find
//! without metadata once it has read the flag set are INVALID copies in a
//! set older than the one the enabler walked (being deleted or moved:
//! nothing may map them, as in KVM).
//!
//! Allocation failure: [`Vm::enable_lazy_metadata`] reports the hook's error
//! (`ENOMEM`) and leaves the flag clear; slots already served keep their
//! metadata and a retry allocates only the rest (as `memslot_rmap_alloc`
//! skips rmaps that exist). A slot change whose allocation fails is refused
//! and leaves everything exactly as before (the earlier layers' prepares are
//! aborted).
//!
//! `crate::rmap` is the provided x86-like implementation.

use crate::errno::Errno;
use crate::error::Error;
use crate::sync::{lock, AtomicPtr, Ordering};
use crate::vm::Vm;
use crate::ArchHooks;
use alloc::boxed::Box;
use core::marker::PhantomData;

/// A value allocated at most once, then read lock-free: one pointer, null
/// until the value is there. Setting it is a release store (compare-and-
/// swap), reading an acquire load, so a reader that sees the value sees it
/// fully initialised. `get` is O(1): one load.
pub struct LazyCell<M> {
    ptr: AtomicPtr<M>,
    _owns: PhantomData<Box<M>>,
}

// SAFETY: the cell owns at most one `Box<M>`; moving the cell moves it.
unsafe impl<M: Send> Send for LazyCell<M> {}
// SAFETY: shared access hands out `&M` (needs `M: Sync`) and may install a
// value made on this thread that another thread drops later (needs `M: Send`).
unsafe impl<M: Send + Sync> Sync for LazyCell<M> {}

impl<M> Default for LazyCell<M> {
    fn default() -> Self {
        LazyCell::new()
    }
}

impl<M> core::fmt::Debug for LazyCell<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LazyCell").field("set", &self.is_set()).finish()
    }
}

impl<M> LazyCell<M> {
    /// An empty cell.
    pub fn new() -> Self {
        LazyCell { ptr: AtomicPtr::new(core::ptr::null_mut()), _owns: PhantomData }
    }

    /// The value, if it was allocated.
    #[inline]
    pub fn get(&self) -> Option<&M> {
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: a non-null pointer came from `Box::into_raw` in
        // `get_or_try_init`, was published with release ordering (so its
        // contents are visible after this acquire load), and is freed only
        // by `Drop`, which `&self` excludes.
        unsafe { p.as_ref() }
    }

    /// Whether the value was allocated.
    pub fn is_set(&self) -> bool {
        !self.ptr.load(Ordering::Acquire).is_null()
    }

    /// The value, allocating it with `init` if there is none. Returns
    /// whether this call installed it. If two threads race, one value is
    /// installed and the other dropped (the library's own callers hold the
    /// VM's arch lock, so they never race).
    pub fn get_or_try_init<E>(&self, init: impl FnOnce() -> Result<M, E>) -> Result<(&M, bool), E> {
        if let Some(v) = self.get() {
            return Ok((v, false));
        }
        let fresh = Box::into_raw(Box::new(init()?));
        match self.ptr.compare_exchange(core::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: `fresh` is now owned by the cell (freed by `Drop`,
            // which `&self` excludes for the returned borrow).
            Ok(_) => Ok((unsafe { &*fresh }, true)),
            Err(current) => {
                // SAFETY: `fresh` was never published: this thread owns it.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: as in `get`: published by another call, acquired here.
                Ok((unsafe { &*current }, false))
            }
        }
    }
}

impl<M> Drop for LazyCell<M> {
    fn drop(&mut self) {
        let p = self.ptr.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: `&mut self`: nobody else can reach the value; it came
            // from `Box::into_raw`.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl<H: ArchHooks> Vm<H> {
    /// Whether lazily allocated metadata is enabled (acquire: a caller that
    /// sees `true` sees the metadata of every valid slot it then looks up).
    /// KVM's `kvm_memslots_have_rmaps`.
    #[inline]
    pub fn lazy_metadata_enabled(&self) -> bool {
        self.lazy_metadata.load(Ordering::Acquire)
    }

    /// Seed 003 / KVM's `mmu_first_shadow_root_alloc`: allocates the lazily
    /// allocated metadata ([`ArchHooks::alloc_lazy_metadata`]) of every slot
    /// in every address space, then enables it for slots created later.
    /// Returns `Ok(true)` if this call enabled it, `Ok(false)` if it already
    /// was.
    ///
    /// Never waits for readers or for a writer's grace period: it may be
    /// called from inside a read section ([`ReadGuard`](crate::ReadGuard),
    /// [`VcpuGuard`](crate::VcpuGuard)) and concurrently with slot changes.
    /// It waits only for a slot change that is between its prepare and its
    /// publish.
    ///
    /// # Errors
    /// The hook's error (`Error::Arch(ENOMEM)` for a failed allocation).
    /// Metadata is then not enabled; slots already served keep theirs and a
    /// later call allocates only what is missing.
    pub fn enable_lazy_metadata(&self) -> Result<bool, Error> {
        if self.lazy_metadata_enabled() {
            return Ok(false);
        }
        let _arch = lock(&self.arch_lock);
        if self.lazy_metadata.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let guard = self.read();
        for as_id in 0..self.config.nr_address_spaces {
            let Some(set) = guard.set(as_id) else { continue };
            for slot in set.slots_by_id() {
                self.hooks.alloc_lazy_metadata(&slot.desc, &slot.arch).map_err(Error::Arch)?;
            }
        }
        drop(guard);
        self.lazy_metadata.store(true, Ordering::Release);
        Ok(true)
    }

    /// The slot-change side: allocates a new slot's lazily allocated
    /// metadata if it is enabled. The caller holds the arch lock.
    pub(crate) fn alloc_lazy_metadata_locked(&self, desc: &crate::SlotDesc, data: &H::SlotData) -> Result<(), Errno> {
        if self.lazy_metadata.load(Ordering::Relaxed) {
            self.hooks.alloc_lazy_metadata(desc, data)?;
        }
        Ok(())
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Enabling lazily allocated metadata races with CREATE, MOVE and
    //! DELETE on the real `Vm`: after both finish every slot has its
    //! metadata, none was allocated twice, a reader that sees the flag finds
    //! the metadata of every valid slot, fully initialised, and nothing
    //! deadlocks (loom reports a deadlock as a failure).
    use super::LazyCell;
    use crate::errno::Errno;
    use crate::sync::{lock, Arc, AtomicU64, Mutex, Ordering};
    use crate::{ArchHooks, Config, SlotDesc, UserMemoryRegion, Vm};
    use alloc::vec::Vec;
    use loom::thread;

    /// Metadata written field by field with relaxed stores before it is
    /// published: a reader without the acquire would see a zero.
    struct Meta {
        id: AtomicU64,
        npages: AtomicU64,
    }

    /// Records every allocation by (slot id, base gfn): a slot and its
    /// MOVEd successor are different slots.
    struct Hooks {
        allocations: Mutex<Vec<(u16, u64)>>,
    }

    impl ArchHooks for Hooks {
        type SlotData = alloc::sync::Arc<LazyCell<Meta>>;
        fn alloc_lazy_metadata(&self, desc: &SlotDesc, data: &Self::SlotData) -> Result<(), Errno> {
            data.get_or_try_init(|| {
                let mut seen = lock(&self.allocations);
                assert!(!seen.contains(&(desc.id, desc.base_gfn)), "metadata allocated twice for {desc:?}");
                seen.push((desc.id, desc.base_gfn));
                let m = Meta { id: AtomicU64::new(0), npages: AtomicU64::new(0) };
                m.id.store(u64::from(desc.id) + 1, Ordering::Relaxed);
                m.npages.store(desc.npages, Ordering::Relaxed);
                Ok::<_, Errno>(m)
            })?;
            Ok(())
        }
    }

    fn check(vm: &Vm<Hooks>) {
        let g = vm.read();
        for s in g.slots(0) {
            if s.is_invalid() {
                continue;
            }
            let m = s.arch().get().expect("valid slot without metadata after enabling");
            assert_eq!(m.id.load(Ordering::Relaxed), u64::from(s.id) + 1, "half-initialised metadata");
            assert_eq!(m.npages.load(Ordering::Relaxed), s.npages, "half-initialised metadata");
        }
    }

    fn run(op: fn(&Vm<Hooks>)) {
        loom::model(move || {
            let vm = Arc::new(
                Vm::with_hooks(
                    Config::x86_64().with_address_spaces(1).with_user_slots(4),
                    Hooks { allocations: Mutex::new(Vec::new()) },
                )
                .unwrap(),
            );
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x2000, 0x10_0000)).unwrap();
            let enabler = {
                let vm = Arc::clone(&vm);
                thread::spawn(move || {
                    // Inside a read section, as a vCPU making its first shadow root.
                    let outer = vm.read();
                    vm.enable_lazy_metadata().unwrap();
                    drop(outer);
                    assert!(vm.lazy_metadata_enabled());
                    check(&vm);
                })
            };
            op(&vm);
            enabler.join().unwrap();
            check(&vm);
            // Every slot alive was allocated for (once: the hook asserts it).
            let g = vm.read();
            let seen = lock(&vm.hooks().allocations);
            for s in g.slots(0) {
                assert!(seen.contains(&(s.id, s.base_gfn)), "slot {s:?} without metadata");
            }
        });
    }

    #[test]
    fn loom_enable_vs_create() {
        run(|vm| {
            vm.set_user_memory_region(&UserMemoryRegion::new(1, 0, 0x10_0000, 0x1000, 0x20_0000)).unwrap();
        });
    }

    #[test]
    fn loom_enable_vs_move() {
        run(|vm| {
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x40_0000, 0x2000, 0x10_0000)).unwrap();
        });
    }

    #[test]
    fn loom_enable_vs_delete() {
        run(|vm| {
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, 0x10_0000)).unwrap();
        });
    }
}
