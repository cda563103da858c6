//! Lookups: `gfn_to_memslot`, `gfn_to_hva(_prot)`, `id_to_memslot`, the
//! approximate lookup, and iteration over gfn and hva ranges.
//!
//! Every lookup runs inside a read section ([`ReadGuard`]). Sections never
//! block and never wait for the writer; what a section sees stays alive and
//! unchanged until it ends.

use crate::arch::ArchHooks;
use crate::error::HvaError;
use crate::flat::Translation;
use crate::set::MemslotSet;
use crate::slot::MemorySlot;
use crate::srcu::{ReaderRecord, SrcuGuard};
use crate::sync::Arc;
use crate::vm::Vm;
use crate::{config::PAGE_SHIFT, region::KVM_MEMSLOT_INVALID, region::KVM_MEM_READONLY};

type Slot<H> = MemorySlot<<H as ArchHooks>::SlotData>;

/// A read section over all address spaces of a VM (KVM: `srcu_read_lock`).
pub struct ReadGuard<'a, H: ArchHooks> {
    vm: &'a Vm<H>,
    guard: SrcuGuard<'a>,
}

impl<H: ArchHooks> core::fmt::Debug for ReadGuard<'_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReadGuard").finish_non_exhaustive()
    }
}

/// KVM's `__gfn_to_hva_many` for `gfn` inside a slot starting at `base`
/// with host address `hva` and `flags` (the caller checked the range).
#[inline]
pub(crate) fn entry_to_hva(base: u64, hva: u64, flags: u32, gfn: u64, write: bool) -> Result<u64, HvaError> {
    // One test on the way to success (this is every lookup's last step).
    let refused = KVM_MEMSLOT_INVALID | if write { KVM_MEM_READONLY } else { 0 };
    if flags & refused != 0 {
        return Err(if flags & KVM_MEMSLOT_INVALID != 0 { HvaError::Invalid } else { HvaError::ReadOnly });
    }
    Ok(hva + ((gfn - base) << PAGE_SHIFT))
}

/// [`entry_to_hva`] with the pages from `gfn` to the slot's end (`npages`
/// in all) and the slot's flags: what the translations return.
#[inline(always)]
pub(crate) fn entry_translation(base: u64, hva: u64, npages: u64, flags: u32, gfn: u64, write: bool) -> Translation {
    let hva = entry_to_hva(base, hva, flags, gfn, write)?;
    Ok((hva, npages - (gfn - base), flags))
}

impl<'a, H: ArchHooks> ReadGuard<'a, H> {
    pub(crate) fn new(vm: &'a Vm<H>, record: &'a ReaderRecord) -> Self {
        ReadGuard { vm, guard: vm.srcu.read_lock(record) }
    }

    /// A section the library opens and closes inside one call on this
    /// thread ([`Srcu::read_lock_one_call`](crate::srcu::Srcu::read_lock_one_call)):
    /// the guard must stay a local of the caller.
    #[inline(always)]
    pub(crate) fn one_call(vm: &'a Vm<H>) -> Self {
        ReadGuard { vm, guard: vm.srcu.read_lock_one_call() }
    }

    /// A section on `record`, left with a plain store.
    ///
    /// # Safety
    ///
    /// As [`Srcu::read_lock_exclusive`](crate::srcu::Srcu::read_lock_exclusive):
    /// every section on `record` is entered and left on the calling thread.
    #[inline(always)]
    pub(crate) unsafe fn exclusive(vm: &'a Vm<H>, record: &'a ReaderRecord) -> Self {
        // SAFETY: the caller's contract.
        ReadGuard { vm, guard: unsafe { vm.srcu.read_lock_exclusive(record) } }
    }

    /// The active set of `as_id`, or `None` if the address space does not exist.
    #[inline]
    pub(crate) fn set(&self, as_id: u16) -> Option<&MemslotSet<H::SlotData>> {
        Some(self.vm.spaces.get(usize::from(as_id))?.active(&self.guard))
    }

    /// The section's SRCU guard (for the VM's other two-copy structures).
    pub(crate) fn srcu_guard(&self) -> &SrcuGuard<'a> {
        &self.guard
    }

    /// The guard's VM.
    pub fn vm(&self) -> &'a Vm<H> {
        self.vm
    }

    /// Generation of `as_id` as seen now.
    pub fn generation(&self, as_id: u16) -> Option<u64> {
        self.vm.generation(as_id)
    }

    /// KVM's `gfn_to_memslot`: the slot covering `gfn` in `as_id` (INVALID
    /// slots included: check [`is_invalid`](crate::SlotDesc::is_invalid)).
    /// Uses and updates the set's last-used-slot cache.
    #[inline]
    pub fn gfn_to_memslot(&self, as_id: u16, gfn: u64) -> Option<&Slot<H>> {
        let p = self.set(as_id)?.gfn_to_memslot(gfn)?;
        // SAFETY: the slot is owned by the active set, which is neither changed
        // nor dropped before this read section (borrowed by the result) ends.
        Some(unsafe { p.as_ref() })
    }

    /// KVM's `gfn_to_memslot_approx`: the slot covering `gfn`, else the first
    /// slot above it, else the last slot below it; `None` only if `as_id` has
    /// no slots.
    ///
    /// Where no slot covers `gfn`, the kernel returns the last node its
    /// rbtree search visited, which depends on the tree's shape (its callers,
    /// e.g. s390's CMMA walk, only need "a slot near `gfn`"). The library
    /// answers deterministically with the successor (else the predecessor):
    /// the same slot as the kernel whenever the kernel's search ends on the
    /// successor, a neighbour on the other side of the hole otherwise.
    pub fn gfn_to_memslot_approx(&self, as_id: u16, gfn: u64) -> Option<&Slot<H>> {
        let e = self.set(as_id)?.search_approx(gfn)?;
        // SAFETY: as in `gfn_to_memslot`.
        Some(unsafe { e.slot.as_ref() })
    }

    /// KVM's `id_to_memslot`.
    pub fn id_to_memslot(&self, as_id: u16, id: u16) -> Option<&Slot<H>> {
        self.set(as_id)?.id_to_memslot(id).map(|a| &**a)
    }

    /// KVM's `gfn_to_hva`: the host address of `gfn`, for a write (a READONLY
    /// slot gives [`HvaError::ReadOnly`]). Does not touch the set's cache.
    #[inline(always)]
    pub fn gfn_to_hva(&self, as_id: u16, gfn: u64) -> Result<u64, HvaError> {
        self.gfn_to_hva_many(as_id, gfn, true).map(|(hva, _)| hva)
    }

    /// KVM's `gfn_to_hva_prot`: the host address of `gfn` for a read and
    /// whether the slot is writable.
    pub fn gfn_to_hva_prot(&self, as_id: u16, gfn: u64) -> Result<(u64, bool), HvaError> {
        let (hva, _, flags) = self.translate(as_id, gfn, false)?;
        Ok((hva, flags & KVM_MEM_READONLY == 0))
    }

    /// KVM's `gfn_to_hva_many`: the host address and how many pages from
    /// `gfn` to the end of its slot are contiguous.
    #[inline(always)]
    pub fn gfn_to_hva_many(&self, as_id: u16, gfn: u64, write: bool) -> Result<(u64, u64), HvaError> {
        self.translate(as_id, gfn, write).map(|(hva, n, _)| (hva, n))
    }

    /// A translation: from the thread's flat table if it is current
    /// (`flat.rs`), else from the active set.
    #[inline(always)]
    fn translate(&self, as_id: u16, gfn: u64, write: bool) -> Translation {
        match self.vm.flat_translate(as_id, gfn, write) {
            Some(t) => t,
            None => self.translate_refreshing(as_id, gfn, write),
        }
    }

    /// A translation from the active set, refreshing the thread's flat table
    /// on the way (`flat.rs`, "Miss").
    #[inline(never)]
    fn translate_refreshing(&self, as_id: u16, gfn: u64, write: bool) -> Translation {
        let i = usize::from(as_id);
        let space = self.vm.spaces.get(i).ok_or(HvaError::NoSlot)?;
        // The generation after entering the section (when the guard was
        // made) and before the set.
        let gen = space.generation();
        let set = space.active(&self.guard);
        if let Some(holder) = self.vm.srcu.thread_tables().and_then(|t| t.get(i)) {
            if let Some(found) = holder.refresh(&self.vm.flat[i], &self.guard, space, set, gen, gfn) {
                return crate::flat::translate(found, gfn, write);
            }
        }
        let (base, e) = set.search(gfn).ok_or(HvaError::NoSlot)?;
        entry_translation(base, e.hva, e.npages, e.flags, gfn, write)
    }

    /// Every slot of `as_id` intersecting gfns `[start, end)`, in gfn order,
    /// in `O(log n + k)` (KVM's `kvm_for_each_memslot_in_gfn_range`).
    ///
    /// As the kernel's `kvm_memslot_iter_start`, an empty or inverted range
    /// (`start >= end`) yields the slot containing `start` if its base gfn is
    /// below `end`, and nothing else: every slot `s` with
    /// `s.base_gfn < end && s.base_gfn + s.npages > start`.
    pub fn slots_in_gfn_range(&self, as_id: u16, start: u64, end: u64) -> GfnRange<'_, H> {
        let inner = self.set(as_id).map(|s| s.gfn_iter_from(start));
        GfnRange { inner, start, end }
    }

    /// Every slot of `as_id` in gfn order.
    pub fn slots(&self, as_id: u16) -> GfnRange<'_, H> {
        self.slots_in_gfn_range(as_id, 0, u64::MAX)
    }

    /// Number of slots in `as_id`.
    pub fn len(&self, as_id: u16) -> usize {
        self.set(as_id).map_or(0, MemslotSet::len)
    }

    /// Whether `as_id` has no slots.
    pub fn is_empty(&self, as_id: u16) -> bool {
        self.len(as_id) == 0
    }

    /// Every slot, in any address space, whose host range intersects
    /// `[start, last]` (inclusive), via the hva interval trees. Within an
    /// address space, slots come in ascending `userspace_addr` order. An empty
    /// range (`start > last`) yields nothing.
    pub fn slots_in_hva_range(&self, start: u64, last: u64) -> impl Iterator<Item = &Slot<H>> + '_ {
        let nr = if start <= last { self.vm.config.nr_address_spaces } else { 0 };
        (0..nr).flat_map(move |as_id| self.set(as_id).into_iter().flat_map(move |set| set.hva_overlaps(start, last)))
    }
}

/// Iterator over the slots intersecting a gfn range, in gfn order.
pub struct GfnRange<'g, H: ArchHooks> {
    inner: Option<crate::set::GfnIter<'g, H::SlotData>>,
    start: u64,
    end: u64,
}

impl<H: ArchHooks> core::fmt::Debug for GfnRange<'_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GfnRange").field("start", &self.start).field("end", &self.end).finish_non_exhaustive()
    }
}

impl<'g, H: ArchHooks> Iterator for GfnRange<'g, H> {
    type Item = &'g Slot<H>;
    fn next(&mut self) -> Option<Self::Item> {
        let inner = self.inner.as_mut()?;
        loop {
            let (base, e) = inner.next()?;
            if base >= self.end {
                self.inner = None;
                return None;
            }
            if base.saturating_add(e.npages) > self.start {
                // SAFETY: owned by the active set of the read section 'g.
                return Some(unsafe { e.slot.as_ref() });
            }
        }
    }
}

/// A registered reader: a thread that makes many VM-wide lookups gets its own
/// reader record, so its read sections never share a cache line with others.
pub struct Reader<'a, H: ArchHooks> {
    vm: &'a Vm<H>,
    record: Arc<ReaderRecord>,
}

impl<H: ArchHooks> core::fmt::Debug for Reader<'_, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<'a, H: ArchHooks> Reader<'a, H> {
    /// Enters a read section.
    #[inline]
    pub fn read(&self) -> ReadGuard<'_, H> {
        ReadGuard::new(self.vm, &self.record)
    }
}

impl<H: ArchHooks> Drop for Reader<'_, H> {
    fn drop(&mut self) {
        self.vm.srcu.unregister(&self.record);
    }
}

impl<H: ArchHooks> Vm<H> {
    /// Enters a read section on the calling thread's own reader record of
    /// this VM (with `std`; the VM's shared record without it).
    #[inline]
    pub fn read(&self) -> ReadGuard<'_, H> {
        ReadGuard::new(self, self.srcu.anonymous())
    }

    /// A reader handle with its own record (for a thread doing many lookups).
    pub fn reader(&self) -> Reader<'_, H> {
        Reader { vm: self, record: self.srcu.register() }
    }

    /// The translation of `gfn` from the calling thread's flat table of
    /// `as_id`, if it is current (`flat.rs`); `None`: take a section.
    #[inline(always)]
    pub(crate) fn flat_translate(&self, as_id: u16, gfn: u64, write: bool) -> Option<Translation> {
        let i = usize::from(as_id);
        let holder = self.srcu.thread_tables()?.get(i)?;
        holder.translate(self.spaces.get(i)?.generation(), gfn, write)
    }

    /// A translation in a section of its own (the thread's flat table was
    /// not current).
    #[inline(never)]
    fn translate_in_section(&self, as_id: u16, gfn: u64, write: bool) -> Translation {
        ReadGuard::one_call(self).translate_refreshing(as_id, gfn, write)
    }

    /// A translation without a guard: the thread's flat table, else a section.
    #[inline(always)]
    fn translate_anonymous(&self, as_id: u16, gfn: u64, write: bool) -> Translation {
        match self.flat_translate(as_id, gfn, write) {
            Some(t) => t,
            None => self.translate_in_section(as_id, gfn, write),
        }
    }

    /// [`ReadGuard::gfn_to_hva`] without a guard to hold.
    ///
    /// With `std`, the calling thread's flat copy of the address space's
    /// translations answers while no update has published since it was
    /// made: a generation load and a search, no read section (`flat.rs`);
    /// otherwise a section of its own. Always inlined: left as a call in a
    /// user's crate (the default release profile did), each lookup paid the
    /// call's register saves.
    #[inline(always)]
    pub fn gfn_to_hva(&self, as_id: u16, gfn: u64) -> Result<u64, HvaError> {
        self.translate_anonymous(as_id, gfn, true).map(|(hva, _, _)| hva)
    }

    /// [`ReadGuard::gfn_to_hva_prot`] without a guard to hold (as
    /// [`gfn_to_hva`](Self::gfn_to_hva)).
    pub fn gfn_to_hva_prot(&self, as_id: u16, gfn: u64) -> Result<(u64, bool), HvaError> {
        let (hva, _, flags) = self.translate_anonymous(as_id, gfn, false)?;
        Ok((hva, flags & KVM_MEM_READONLY == 0))
    }

    /// [`ReadGuard::gfn_to_hva_many`] without a guard to hold (as
    /// [`gfn_to_hva`](Self::gfn_to_hva)). The host range is only a number
    /// once the call returns: to access it, hold a section (or otherwise
    /// know the memory stays mapped).
    pub fn gfn_to_hva_many(&self, as_id: u16, gfn: u64, write: bool) -> Result<(u64, u64), HvaError> {
        self.translate_anonymous(as_id, gfn, write).map(|(hva, n, _)| (hva, n))
    }

    /// The description of the slot covering `gfn` (a copy, usable after the section).
    pub fn gfn_to_slot_desc(&self, as_id: u16, gfn: u64) -> Option<crate::SlotDesc> {
        ReadGuard::one_call(self).gfn_to_memslot(as_id, gfn).map(|s| s.desc)
    }

    /// The description of slot `as_id`/`id` (a copy).
    pub fn id_to_slot_desc(&self, as_id: u16, id: u16) -> Option<crate::SlotDesc> {
        ReadGuard::one_call(self).id_to_memslot(as_id, id).map(|s| s.desc)
    }

    /// MMU-notifier invalidation: the host range `[start, end)` changed. For
    /// every slot in every address space whose hva range intersects it, calls
    /// [`ArchHooks::unmap_gfn_range`] with the gfns it backs. Returns how many
    /// slot ranges were reported and whether any hook asked for a TLB flush.
    pub fn invalidate_hva_range(&self, start: u64, end: u64) -> (usize, bool) {
        if end <= start {
            return (0, false);
        }
        let guard = self.read();
        let (mut n, mut flush) = (0, false);
        for slot in guard.slots_in_hva_range(start, end - 1) {
            let hva_start = start.max(slot.userspace_addr);
            let hva_end = end.min(slot.userspace_addr + slot.size());
            let gfn_start = slot.base_gfn + ((hva_start - slot.userspace_addr) >> PAGE_SHIFT);
            let gfn_end = slot.base_gfn + ((hva_end - slot.userspace_addr).div_ceil(crate::PAGE_SIZE));
            flush |= self.hooks.unmap_gfn_range(slot, gfn_start, gfn_end);
            n += 1;
        }
        (n, flush)
    }
}
