//! Dirty logging on a VM: `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`,
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, dirty rings (`KVM_CAP_DIRTY_LOG_RING`,
//! `KVM_RESET_DIRTY_RINGS`), and `mark_page_dirty`.
//!
//! ```
//! use memslots::{Config, Vm, UserMemoryRegion, DirtyMark, KVM_MEM_LOG_DIRTY_PAGES};
//! let vm = Vm::new(Config::default())?;
//! vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000, 0x7f00_0000_0000))?;
//! let vcpu = vm.vcpu();
//! assert_eq!(vcpu.mark_page_dirty(3), DirtyMark::Marked);
//! assert_eq!(vcpu.mark_page_dirty(0x1000), DirtyMark::NotLogged); // no slot there
//! assert_eq!(vm.get_dirty_log_vec(0)?[0], 1 << 3);                  // taken and cleared
//! assert_eq!(vm.get_dirty_log_vec(0)?[0], 0);
//! # Ok::<(), memslots::Error>(())
//! ```

use crate::arch::ArchHooks;
use crate::dirty::words_for;
use crate::error::Error;
use crate::region::SlotId;
use crate::ring::{DirtyMark, DirtyRing, RingEntry, DIRTY_GFN_SIZE, KVM_DIRTY_RING_MAX_ENTRIES};
use crate::slot::MemorySlot;
use crate::sync::lock;
use crate::vcpu::{Vcpu, VcpuGuard};
use crate::vm::{Vm, WriterState};
use crate::PAGE_SIZE;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: new bitmaps start all ones.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;
/// Both manual-protect options (`KVM_DIRTY_LOG_MANUAL_CAPS`).
pub const KVM_DIRTY_LOG_MANUAL_CAPS: u64 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

/// KVM's `mark_page_dirty_in_slot`: record page `rel` of `slot` in `ring` (a
/// vCPU context with rings on) or in the slot's bitmap.
#[inline]
pub(crate) fn mark_in_slot<D>(slot: &MemorySlot<D>, rel: u64, ring: Option<&DirtyRing>) -> DirtyMark {
    if let Some(ring) = ring {
        if !slot.logs_dirty_pages() || rel >= slot.npages {
            return DirtyMark::NotLogged;
        }
        return ring.push(slot.slot(), rel);
    }
    // A slot has a bitmap exactly while it logs (and bitmaps are in use);
    // `mark` ignores pages past the slot's end.
    match slot.dirty_bitmap() {
        Some(b) if rel < b.npages() => {
            b.mark(rel);
            DirtyMark::Marked
        }
        _ => DirtyMark::NotLogged,
    }
}

impl<H: ArchHooks> Vm<H> {
    /// `kvm_use_dirty_bitmap`: bitmaps are used unless dirty rings are on
    /// without ring-with-bitmap.
    pub(crate) fn use_dirty_bitmap(&self) -> bool {
        self.dirty_ring_bytes.load(Ordering::Acquire) == 0 || self.ring_with_bitmap.load(Ordering::Acquire)
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args)`: `args` ⊆
    /// {ENABLE, INITIALLY_SET}, INITIALLY_SET only with ENABLE; 0 disables.
    pub fn enable_manual_dirty_log_protect(&self, args: u64) -> Result<(), Error> {
        let allowed = if args & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
            KVM_DIRTY_LOG_MANUAL_CAPS
        } else {
            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        };
        if args & !allowed != 0 {
            return Err(Error::InvalidCapArgs { args });
        }
        let _w = self.lock_writer();
        self.manual_protect.store(args, Ordering::Relaxed);
        Ok(())
    }

    /// Whether manual protect is enabled.
    pub fn manual_dirty_log_protect(&self) -> bool {
        self.manual_protect.load(Ordering::Relaxed) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, bytes)`: one ring of `bytes /
    /// 16` entries per vCPU. The size must be a power of two, at least a page
    /// and the reserved entries (EINVAL), at most 65536 entries (E2BIG); it can
    /// be set once, before any vCPU exists (EINVAL).
    ///
    /// The kernel takes the size as a `u32` (`kvm_vm_ioctl_enable_dirty_log_ring`):
    /// only the low 32 bits of `bytes` count, so 2^32 is 0 (EINVAL) and
    /// 2^32 + 4096 is a 4 KiB ring.
    pub fn enable_dirty_log_ring(&self, bytes: u64) -> Result<(), Error> {
        let bytes = bytes & u64::from(u32::MAX);
        let bad = |why| Err(Error::BadRingSize { bytes, why });
        if bytes == 0 || !bytes.is_power_of_two() {
            return bad("not a power of two");
        }
        if bytes < u64::from(self.config.dirty_ring_rsvd_entries) * DIRTY_GFN_SIZE || bytes < PAGE_SIZE {
            return bad("smaller than a page or the reserved entries");
        }
        if bytes > KVM_DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_SIZE {
            return Err(Error::RingTooBig { bytes });
        }
        if self.dirty_ring_bytes.load(Ordering::Acquire) != 0 {
            return bad("already set");
        }
        let reg = lock(&self.vcpus);
        if reg.created != 0 {
            return bad("vCPUs exist");
        }
        // Fits: at most 65536 * 16 bytes.
        self.dirty_ring_bytes.store(u32::try_from(bytes).unwrap_or(u32::MAX), Ordering::Release);
        Ok(())
    }

    /// Dirty ring size in bytes (0: rings off).
    pub fn dirty_ring_bytes(&self) -> u32 {
        self.dirty_ring_bytes.load(Ordering::Acquire)
    }

    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`: keep dirty bitmaps while rings
    /// are on (for pages dirtied without a vCPU). Requires rings and no slots.
    pub fn enable_dirty_log_ring_with_bitmap(&self) -> Result<(), Error> {
        if !self.config.ring_with_bitmap {
            return Err(Error::RingWithBitmapUnsupported);
        }
        if self.dirty_ring_bytes.load(Ordering::Acquire) == 0 {
            return Err(Error::BadRingSize { bytes: 0, why: "ring-with-bitmap needs dirty rings" });
        }
        let _w = self.lock_writer();
        let empty = {
            let g = self.read();
            (0..self.config.nr_address_spaces).all(|a| g.is_empty(a))
        };
        if !empty {
            return Err(Error::BadRingSize { bytes: 0, why: "ring-with-bitmap needs a VM without slots" });
        }
        self.ring_with_bitmap.store(true, Ordering::Release);
        Ok(())
    }

    /// Walks every vCPU's ring from its harvest cursor, in order, calling `f`
    /// with the vCPU id and each dirty entry and marking it collected.
    /// Returns the number of entries collected.
    ///
    /// Harvests and resets are serialised by the writer lock (KVM's
    /// `slots_lock`), so this must not be called inside a read section, and
    /// `f` must not call the VM's writer functions.
    pub fn harvest_dirty_rings(&self, mut f: impl FnMut(u32, RingEntry)) -> usize {
        let _w = self.lock_writer();
        self.rings().iter().map(|r| r.harvest(|e| f(r.vcpu_id(), e))).sum()
    }

    /// `KVM_RESET_DIRTY_RINGS`: frees every collected entry of every ring, in
    /// order; returns how many. `EINVAL` ([`Error::NoDirtyRings`]) if rings
    /// are not enabled, as the kernel. Takes the writer lock, as KVM takes
    /// `slots_lock`: not from inside a read section.
    pub fn reset_dirty_rings(&self) -> Result<u64, Error> {
        if self.dirty_ring_bytes.load(Ordering::Acquire) == 0 {
            return Err(Error::NoDirtyRings);
        }
        let _w = self.lock_writer();
        Ok(self.rings().iter().map(|r| r.reset()).sum())
    }

    /// The rings, copied out of the vCPU registry. The registry lock is a leaf
    /// (taken inside read sections by `vm.vcpu()`), so it is never held while
    /// waiting for anything or running a caller's code (DESIGN.md, lock order).
    fn rings(&self) -> Vec<alloc::sync::Arc<DirtyRing>> {
        lock(&self.vcpus).rings.clone()
    }

    /// Checks common to GET and CLEAR; runs `f` on the slot's bitmap.
    fn with_bitmap<R>(
        &self,
        _w: &WriterState, // proof that the writer lock is held
        slot: u32,
        first_page: Option<u64>,
        f: impl FnOnce(&crate::dirty::DirtyBitmap, u64) -> Result<R, Error>,
    ) -> Result<R, Error> {
        if !self.use_dirty_bitmap() {
            return Err(Error::DirtyBitmapsUnavailable);
        }
        let SlotId { as_id, id } = SlotId::from_raw(slot);
        if as_id >= self.config.nr_address_spaces {
            return Err(Error::AddressSpaceOutOfRange { slot, as_id, nr: self.config.nr_address_spaces });
        }
        if id >= self.config.user_slots {
            return Err(Error::SlotIdOutOfRange { slot, id, limit: self.config.user_slots });
        }
        if let Some(first_page) = first_page {
            if first_page & 63 != 0 {
                return Err(Error::UnalignedFirstPage { first_page });
            }
        }
        // The writer lock (held by the caller) keeps the slot in place; no read
        // section is held, because a take runs a grace period.
        let space = &self.spaces[usize::from(as_id)];
        // SAFETY: the caller holds the writer lock.
        let memslot = unsafe { space.with_active_writer(|set| set.id_to_memslot(id).cloned()) }
            .ok_or(Error::NoDirtyBitmap { slot })?;
        let bitmap = memslot.dirty_bitmap().ok_or(Error::NoDirtyBitmap { slot })?;
        f(bitmap, memslot.npages)
    }

    /// `KVM_GET_DIRTY_LOG` into `out` (at least `ceil(npages / 64)` words,
    /// else EFAULT). Without manual protect it takes and clears the bits (no
    /// bit marked concurrently is lost: it is returned now or by the next
    /// call); with it, it copies and clears nothing. Returns the words written.
    pub fn get_dirty_log(&self, slot: u32, out: &mut [u64]) -> Result<usize, Error> {
        let w = self.lock_writer();
        let manual = self.manual_dirty_log_protect();
        self.with_bitmap(&w, slot, None, |b, _| {
            let need = b.len_words();
            let got = out.len();
            let out = out.get_mut(..need).ok_or(Error::BitmapTooShort { got, need })?;
            if manual {
                b.copy_into(out);
            } else {
                // The writer lock serialises takes (and grace periods).
                b.take_into(out, || self.srcu.synchronize());
            }
            Ok(need)
        })
    }

    /// `KVM_GET_DIRTY_LOG` without an output buffer: calls `f(word_index,
    /// bits)` for every non-zero 64-page word of the slot's bitmap (bit `b` of
    /// word `w` is page `64 * w + b` of the slot), with the same take / copy
    /// semantics. A slot nobody marked since the last take costs O(1)
    /// (seed 004). Returns the number of dirty pages.
    pub fn harvest_dirty_log(&self, slot: u32, mut f: impl FnMut(usize, u64)) -> Result<u64, Error> {
        let w = self.lock_writer();
        let manual = self.manual_dirty_log_protect();
        self.with_bitmap(&w, slot, None, |b, _| {
            if manual {
                Ok(b.copy_each(&mut f))
            } else {
                Ok(b.take_each(|| self.srcu.synchronize(), f))
            }
        })
    }

    /// [`get_dirty_log`](Self::get_dirty_log) into a new vector.
    pub fn get_dirty_log_vec(&self, slot: u32) -> Result<Vec<u64>, Error> {
        let need = {
            let w = self.lock_writer();
            self.with_bitmap(&w, slot, None, |b, _| Ok(b.len_words()))?
        };
        let mut v = vec![0; need];
        // A concurrent change may have replaced the slot: retry on size mismatch.
        match self.get_dirty_log(slot, &mut v) {
            Err(Error::BitmapTooShort { need, .. }) => {
                v.resize(need, 0);
                let n = self.get_dirty_log(slot, &mut v)?;
                v.truncate(n);
            }
            r => {
                let n = r?;
                v.truncate(n);
            }
        }
        Ok(v)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears, in pages `[first_page, first_page +
    /// num_pages)`, the bits set in `bitmap` (bit 0 = `first_page`) that are
    /// set in the slot's bitmap. `first_page` must be a multiple of 64, and
    /// `num_pages` too unless the range ends at the slot's end.
    /// Returns the number of bits cleared.
    pub fn clear_dirty_log(&self, slot: u32, first_page: u64, num_pages: u32, bitmap: &[u64]) -> Result<u64, Error> {
        let w = self.lock_writer();
        self.with_bitmap(&w, slot, Some(first_page), |b, npages| {
            let num = u64::from(num_pages);
            if first_page > npages || num > npages - first_page || (num < npages - first_page && num & 63 != 0) {
                return Err(Error::BadClearRange { first_page, num_pages: num, npages });
            }
            let need = words_for(num);
            let mask = bitmap.get(..need).ok_or(Error::BitmapTooShort { got: bitmap.len(), need })?;
            // first_page < npages < 2^31 here, so the word index fits.
            let first_word = usize::try_from(first_page / 64).unwrap_or(usize::MAX);
            // Bits past num_pages in the last word are not the caller's to clear.
            let tail = match mask.split_last() {
                Some((l, _)) if num % 64 != 0 => [l & ((1u64 << (num % 64)) - 1)],
                Some((l, _)) => [*l],
                None => [0],
            };
            let body = &mask[..need.saturating_sub(1)];
            // A clear covering a good part of the bitmap flips buffers (plain
            // operations, one grace period); a small one does fetch-and-andnot.
            if need >= b.len_words() / 4 && need > 0 {
                // A partial last word only happens at the slot's end, where the
                // bits past num_pages are always clear: the raw mask is fine.
                return Ok(b.clear_masked_flip(first_word, mask, || self.srcu.synchronize()));
            }
            let mut cleared = b.clear_masked(first_word, body);
            if need > 0 {
                cleared += b.clear_masked(first_word + body.len(), &tail);
            }
            Ok(cleared)
        })
    }

    /// `mark_page_dirty` without a vCPU: marks `gfn` of address space `as_id`
    /// in its slot's bitmap. With dirty rings on (and no ring-with-bitmap)
    /// there is nowhere to record it without a vCPU: `NotLogged` (KVM warns).
    pub fn mark_page_dirty(&self, as_id: u16, gfn: u64) -> DirtyMark {
        let guard = self.read();
        match guard.gfn_to_memslot(as_id, gfn) {
            Some(slot) => mark_in_slot(slot, gfn - slot.base_gfn, None),
            None => DirtyMark::NotLogged,
        }
    }

    /// `mark_page_dirty_in_slot` by slot field and page offset, without a vCPU.
    pub fn mark_page_dirty_in_slot(&self, slot: u32, rel_page: u64) -> DirtyMark {
        let SlotId { as_id, id } = SlotId::from_raw(slot);
        let guard = self.read();
        match guard.id_to_memslot(as_id, id) {
            Some(s) => mark_in_slot(s, rel_page, None),
            None => DirtyMark::NotLogged,
        }
    }
}

impl<H: ArchHooks> Vcpu<'_, H> {
    /// `kvm_vcpu_mark_page_dirty`: marks `gfn` of the vCPU's current address
    /// space in its ring (rings on) or its slot's bitmap.
    pub fn mark_page_dirty(&self, gfn: u64) -> DirtyMark {
        self.read().mark_page_dirty(gfn)
    }
}

impl<H: ArchHooks> VcpuGuard<'_, '_, H> {
    /// [`Vcpu::mark_page_dirty`] inside an open section (the way KVM marks
    /// while the vCPU holds SRCU): no section entry per page.
    #[inline]
    pub fn mark_page_dirty(&self, gfn: u64) -> DirtyMark {
        match self.gfn_to_memslot(gfn) {
            Some(slot) => mark_in_slot(slot, gfn - slot.base_gfn, self.ring()),
            None => DirtyMark::NotLogged,
        }
    }
}

impl<H: ArchHooks> crate::lookup::ReadGuard<'_, H> {
    /// Marks page `rel` of `slot` (a slot obtained from this guard) in its
    /// bitmap: for code that wrote guest memory on the VM's behalf (no vCPU).
    #[inline]
    pub fn mark_slot_page_dirty(&self, slot: &MemorySlot<H::SlotData>, rel: u64) -> DirtyMark {
        mark_in_slot(slot, rel, None)
    }
}

impl<H: ArchHooks> VcpuGuard<'_, '_, H> {
    /// Marks page `rel` of `slot` (obtained from this guard) as this vCPU:
    /// into its ring with rings on, else the slot's bitmap.
    #[inline]
    pub fn mark_slot_page_dirty(&self, slot: &MemorySlot<H::SlotData>, rel: u64) -> DirtyMark {
        mark_in_slot(slot, rel, self.ring())
    }
}
