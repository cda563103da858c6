//! Per-vCPU handles: a reader record of their own, a current address space,
//! and a last-used-slot cache tagged with the generation it was filled under
//! (KVM's `vcpu->last_used_slot` / `last_used_slot_gen`). The per-vCPU path
//! never writes the VM-wide cache, so vCPUs do not bounce its cache line.

use crate::arch::ArchHooks;
use crate::error::HvaError;
use crate::lookup::{entry_to_hva, ReadGuard};
use crate::set::MemslotSet;
use crate::slot::MemorySlot;
use crate::srcu::{ReaderRecord, TwoSets, GEN_UPDATE_IN_PROGRESS};
use crate::sync::Arc;
use crate::vm::Vm;
use core::cell::Cell;
use core::ptr::NonNull;

type Slot<H> = MemorySlot<<H as ArchHooks>::SlotData>;

/// The vCPU's cached slot: copies of what a translation needs, and the slot
/// pointer (dereferenced only inside a read section after the generation
/// check). `npages == 0` means empty.
struct Cache<D> {
    gen: u64,
    base_gfn: u64,
    npages: u64,
    hva: u64,
    flags: u32,
    slot: Option<NonNull<MemorySlot<D>>>,
}

impl<D> Clone for Cache<D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D> Copy for Cache<D> {}

impl<D> Cache<D> {
    const EMPTY: Self = Cache { gen: 0, base_gfn: 0, npages: 0, hva: 0, flags: 0, slot: None };

    /// Whether this entry answers for `gfn` under the current generation `gen`.
    #[inline]
    fn hit(&self, gen: u64, gfn: u64) -> bool {
        gen == self.gen && gfn.wrapping_sub(self.base_gfn) < self.npages
    }
}

/// A vCPU's view of the VM's memslots.
///
/// `Send` but not `Sync`: one vCPU thread uses it.
pub struct Vcpu<'a, H: ArchHooks> {
    vm: &'a Vm<H>,
    /// `vm.spaces[as_id]`, kept so the cached path reads the generation
    /// without going through the VM.
    space: &'a TwoSets<MemslotSet<H::SlotData>>,
    record: Arc<ReaderRecord>,
    as_id: u16,
    cache: Cell<Cache<H::SlotData>>,
    /// The vCPU's flat table of its address space (`flat.rs`): answers a
    /// cache miss without a read section.
    table: crate::flat::Holder,
    id: u32,
    pub(crate) ring: Option<alloc::sync::Arc<crate::ring::DirtyRing>>,
    /// For an owned handle ([`Vm::vcpu_owned`]): the VM `vm` points into,
    /// kept alive (and at the same address) for as long as the handle.
    /// Released after `Drop::drop` unregistered the record.
    _owner: Option<alloc::sync::Arc<Vm<H>>>,
}

// SAFETY: the cached pointer is only dereferenced inside a read section after
// checking the generation (so it points into the live active set); moving the
// handle to another thread does not change that. `H::SlotData: Sync` lets the
// slot be shared.
unsafe impl<H: ArchHooks> Send for Vcpu<'_, H> {}

impl<H: ArchHooks> core::fmt::Debug for Vcpu<'_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vcpu").field("as_id", &self.as_id).finish_non_exhaustive()
    }
}

impl<H: ArchHooks> Vm<H> {
    /// A vCPU handle, looking up in address space 0. vCPUs are numbered in
    /// creation order; with dirty rings enabled each gets its ring.
    pub fn vcpu(&self) -> Vcpu<'_, H> {
        let mut reg = crate::sync::lock(&self.vcpus);
        let id = reg.created;
        reg.created += 1;
        let bytes = u64::from(self.dirty_ring_bytes.load(core::sync::atomic::Ordering::Acquire));
        let ring = (bytes != 0).then(|| {
            let entries = u32::try_from(bytes / crate::ring::DIRTY_GFN_SIZE).unwrap_or(u32::MAX);
            let ring =
                alloc::sync::Arc::new(crate::ring::DirtyRing::new(entries, self.config.dirty_ring_rsvd_entries, id));
            reg.rings.push(alloc::sync::Arc::clone(&ring));
            ring
        });
        drop(reg);
        Vcpu {
            vm: self,
            space: &self.spaces[0],
            record: self.srcu.register(),
            as_id: 0,
            cache: Cell::new(Cache::EMPTY),
            table: crate::flat::Holder::default(),
            id,
            ring,
            _owner: None,
        }
    }

    /// An owned vCPU handle (`'static + Send`: it moves into a vCPU thread):
    /// [`vcpu`](Self::vcpu) holding a reference count on the VM.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let vm = Arc::new(memslots::Vm::new(memslots::Config::default())?);
    /// let vcpu = vm.vcpu_owned();
    /// std::thread::spawn(move || vcpu.gfn_to_hva(0).is_err()).join().unwrap();
    /// # Ok::<(), memslots::Error>(())
    /// ```
    pub fn vcpu_owned(self: &alloc::sync::Arc<Self>) -> Vcpu<'static, H> {
        // SAFETY: the `Arc` stored in `_owner` keeps the VM alive, at this
        // address, for as long as the handle; the `'static` borrow never
        // leaves the handle with a longer lifetime than the handle itself
        // (`Vcpu::vm` and the guards borrow from `&self`), and `Drop::drop`
        // uses it before the fields (the `Arc`) are dropped.
        let vm: &'static Vm<H> = unsafe { &*alloc::sync::Arc::as_ptr(self) };
        let mut v = vm.vcpu();
        v._owner = Some(alloc::sync::Arc::clone(self));
        v
    }
}

impl<H: ArchHooks> Drop for Vcpu<'_, H> {
    fn drop(&mut self) {
        self.vm.srcu.unregister(&self.record);
    }
}

impl<'a, H: ArchHooks> Vcpu<'a, H> {
    /// The VM.
    pub fn vm(&self) -> &Vm<H> {
        self.vm
    }

    /// This vCPU's number (creation order).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// This vCPU's dirty ring, if rings are enabled.
    pub fn dirty_ring(&self) -> Option<&crate::ring::DirtyRing> {
        self.ring.as_deref()
    }

    /// The address space lookups use (x86: 1 while in SMM).
    pub fn address_space(&self) -> u16 {
        self.as_id
    }

    /// Switches the current address space. Errors (EINVAL) if it does not exist.
    pub fn set_address_space(&mut self, as_id: u16) -> Result<(), crate::Error> {
        if as_id >= self.vm.config.nr_address_spaces {
            return Err(crate::Error::AddressSpaceOutOfRange {
                slot: u32::from(as_id) << 16,
                as_id,
                nr: self.vm.config.nr_address_spaces,
            });
        }
        self.as_id = as_id;
        self.space = &self.vm.spaces[usize::from(as_id)];
        self.table.clear();
        Ok(())
    }

    /// Enters a read section on this vCPU's own record.
    #[inline]
    pub fn read(&self) -> VcpuGuard<'_, 'a, H> {
        // SAFETY: the record is this vCPU's own; its only sections are made
        // here. `Vcpu` is not `Sync` and the guard borrows it, so the guard
        // is not `Send` and the handle cannot move while it lives: every
        // section on the record is entered and left on one thread.
        let guard = unsafe { ReadGuard::exclusive(self.vm, &self.record) };
        VcpuGuard { vcpu: self, guard }
    }

    /// `kvm_vcpu_gfn_to_hva`: host address of `gfn` in the current address
    /// space, for a write. The cached case costs one atomic load and a range
    /// check, and needs no read section (it returns copies).
    #[inline]
    pub fn gfn_to_hva(&self, gfn: u64) -> Result<u64, HvaError> {
        self.translate(gfn, true).map(|(hva, _)| hva)
    }

    /// `kvm_vcpu_gfn_to_hva_prot`: host address for a read, and whether writable.
    #[inline]
    pub fn gfn_to_hva_prot(&self, gfn: u64) -> Result<(u64, bool), HvaError> {
        let (hva, flags) = self.translate(gfn, false)?;
        Ok((hva, flags & crate::KVM_MEM_READONLY == 0))
    }

    #[inline]
    fn translate(&self, gfn: u64, write: bool) -> Result<(u64, u32), HvaError> {
        let c = self.cache.get();
        // The generation is that of the active set: equal means no publish has
        // started since the cache was filled, so the copies are current.
        if gfn.wrapping_sub(c.base_gfn) < c.npages && self.space.generation() == c.gen {
            return entry_to_hva(c.base_gfn, c.hva, c.flags, gfn, write).map(|h| (h, c.flags));
        }
        self.translate_miss(gfn, write)
    }

    /// A cache miss: the vCPU's flat table, if it is of this generation
    /// too. Out of line, so that the hit path stays small where it is inlined.
    #[cold]
    #[inline(never)]
    fn translate_miss(&self, gfn: u64, write: bool) -> Result<(u64, u32), HvaError> {
        let gen = self.space.generation();
        match self.table.lookup(gen, gfn) {
            Some(found) => self.fill_from_table(gen, found, gfn, write),
            None => self.translate_slow(gfn, write),
        }
    }

    /// Refills the cache from what the flat table found (without the slot
    /// pointer, which the table does not have) and translates.
    #[inline(always)]
    fn fill_from_table(
        &self,
        gen: u64,
        found: crate::flat::Found,
        gfn: u64,
        write: bool,
    ) -> Result<(u64, u32), HvaError> {
        let (base, e) = found.ok_or(HvaError::NoSlot)?;
        // A table is never tagged with an in-progress generation.
        self.cache.set(Cache {
            gen,
            base_gfn: base,
            npages: u64::from(e.npages),
            hva: e.hva,
            flags: e.flags,
            slot: None,
        });
        entry_to_hva(base, e.hva, e.flags, gfn, write).map(|h| (h, e.flags))
    }

    /// The cache and the flat table missed: search in a section of the
    /// vCPU's own record, refreshing the flat table (`flat.rs`, "Miss"), and
    /// refill the cache from the index entry, without touching the slot
    /// object (in the indexed layout the entry carries what a translation
    /// needs; loading the slot too was one more cache miss per lookup at
    /// thousands of slots).
    #[cold]
    #[inline(never)]
    fn translate_slow(&self, gfn: u64, write: bool) -> Result<(u64, u32), HvaError> {
        let guard = self.read();
        // The generation before the set, as in `VcpuGuard::gfn_to_memslot`.
        let gen = self.space.generation();
        let srcu = guard.guard.srcu_guard();
        let set = self.space.active(srcu);
        if let Some(found) = self.table.refresh(&self.vm.flat[usize::from(self.as_id)], srcu, self.space, set, gen, gfn)
        {
            return self.fill_from_table(gen, found, gfn, write);
        }
        let c = guard.fill_entry(gen, gfn).ok_or(HvaError::NoSlot)?;
        entry_to_hva(c.base_gfn, c.hva, c.flags, gfn, write).map(|h| (h, c.flags))
    }
}

/// A read section of a vCPU: lookups use and fill the vCPU's cache.
pub struct VcpuGuard<'v, 'a, H: ArchHooks> {
    vcpu: &'v Vcpu<'a, H>,
    guard: ReadGuard<'v, H>,
}

impl<H: ArchHooks> core::fmt::Debug for VcpuGuard<'_, '_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VcpuGuard").finish_non_exhaustive()
    }
}

impl<'v, 'a, H: ArchHooks> VcpuGuard<'v, 'a, H> {
    /// `kvm_vcpu_gfn_to_memslot`: the slot covering `gfn` in the vCPU's
    /// current address space (possibly INVALID). Fills the vCPU cache, never
    /// the VM-wide one.
    #[inline]
    pub fn gfn_to_memslot(&self, gfn: u64) -> Option<&Slot<H>> {
        let vcpu = self.vcpu;
        // Read the generation before the set: if a publish races, the
        // generation we tag with is already stale and never validates again.
        let gen = vcpu.space.generation();
        let c = vcpu.cache.get();
        // An entry filled from the flat table has no slot pointer.
        let slot = match c.slot {
            Some(p) if c.hit(gen, gfn) => Some(p),
            _ => self.fill(gen, gfn),
        };
        // SAFETY: the pointer comes from a cache whose generation equals the
        // active set's generation read inside this section, or from `fill`,
        // which read it from the active set: either way the slot is owned by
        // the active set, which stays alive and unchanged until this section
        // ends.
        slot.map(|p| unsafe { p.as_ref() })
    }

    /// `kvm_vcpu_gfn_to_hva_many`: the host address of `gfn` in the vCPU's
    /// current address space and how many pages from `gfn` to the end of its
    /// slot are contiguous, from the vCPU cache (filled on a miss) without
    /// touching the slot object. Errors as [`Vcpu::gfn_to_hva`].
    #[inline]
    pub fn gfn_to_hva_many(&self, gfn: u64, write: bool) -> Result<(u64, u64), HvaError> {
        let vcpu = self.vcpu;
        let gen = vcpu.space.generation();
        let c = vcpu.cache.get();
        let c = if c.hit(gen, gfn) { c } else { self.fill_entry(gen, gfn).ok_or(HvaError::NoSlot)? };
        let hva = entry_to_hva(c.base_gfn, c.hva, c.flags, gfn, write)?;
        Ok((hva, c.npages - (gfn - c.base_gfn)))
    }

    /// The same for an explicit address space (does not change the current one).
    pub fn gfn_to_memslot_in(&self, as_id: u16, gfn: u64) -> Option<&Slot<H>> {
        let p = self.guard.set(as_id)?.search(gfn)?.1.slot;
        // SAFETY: owned by the active set of this section.
        Some(unsafe { p.as_ref() })
    }

    /// The VM-wide read guard (for the other lookups).
    pub fn vm_guard(&self) -> &ReadGuard<'v, H> {
        &self.guard
    }

    /// The vCPU's dirty ring, if rings are on.
    pub(crate) fn ring(&self) -> Option<&crate::ring::DirtyRing> {
        self.vcpu.ring.as_deref()
    }

    /// The cache missed: search the active set, and remember the result
    /// unless an update is in progress (`gen` was read before the set).
    #[cold]
    #[inline(never)]
    fn fill(&self, gen: u64, gfn: u64) -> Option<NonNull<Slot<H>>> {
        self.fill_entry(gen, gfn)?.slot
    }

    /// [`fill`](Self::fill), returning the whole (new) cache entry.
    #[inline]
    fn fill_entry(&self, gen: u64, gfn: u64) -> Option<Cache<H::SlotData>> {
        let vcpu = self.vcpu;
        // `vcpu.space` is `vm.spaces[vcpu.as_id]`: no bounds check on the way.
        let set = vcpu.space.active(self.guard.srcu_guard());
        let (base, e) = set.search(gfn)?;
        let fresh = Cache { gen, base_gfn: base, npages: e.npages, hva: e.hva, flags: e.flags, slot: Some(e.slot) };
        if gen & GEN_UPDATE_IN_PROGRESS == 0 {
            vcpu.cache.set(fresh);
        }
        Some(fresh)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The per-vCPU cache against publish, on the real `Vm` and `Vcpu`: a vCPU
    //! that translates a gfn while the writer moves its slot never gets a
    //! translation of the old mapping after it has seen the slot gone (no
    //! stale, generation-validated cache hit), and once the MOVE has returned
    //! it sees only the new mapping.
    use crate::sync::{Arc, AtomicBool, Ordering};
    use crate::{Config, HvaError, UserMemoryRegion, Vm};
    use loom::thread;

    #[test]
    fn loom_vcpu_cache_vs_move() {
        loom::model(|| {
            let vm = Arc::new(Vm::new(Config::x86_64().with_address_spaces(1).with_user_slots(4)).unwrap());
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10000, 0x10_0000)).unwrap();
            let moved = Arc::new(AtomicBool::new(false));
            let vcpu_thread = {
                let (vm, moved) = (Arc::clone(&vm), Arc::clone(&moved));
                thread::spawn(move || {
                    let vcpu = vm.vcpu();
                    let mut gone = false;
                    for _ in 0..2 {
                        match vcpu.gfn_to_hva(1) {
                            Ok(hva) => {
                                assert_eq!(hva, 0x10_1000);
                                assert!(!gone, "old translation served after the slot was seen gone");
                            }
                            Err(e) => {
                                assert!(matches!(e, HvaError::NoSlot | HvaError::Invalid));
                                gone = true;
                            }
                        }
                    }
                    while !moved.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    assert_eq!(vcpu.gfn_to_hva(1), Err(HvaError::NoSlot), "stale cache after the MOVE returned");
                    assert_eq!(vcpu.gfn_to_hva(0x101), Ok(0x10_1000));
                })
            };
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x10_0000, 0x10000, 0x10_0000)).unwrap();
            moved.store(true, Ordering::Release);
            vcpu_thread.join().unwrap();
        });
    }
}
