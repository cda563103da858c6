//! Dirty-log operations on a VM: `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`,
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, and `mark_page_dirty`.

use crate::arch::ArchHooks;
use crate::dirty::words_for;
use crate::error::Error;
use crate::region::SlotId;
use crate::sync::lock;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, WriterState};
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: new bitmaps start all ones.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;
/// Both manual-protect options (`KVM_DIRTY_LOG_MANUAL_CAPS`).
pub const KVM_DIRTY_LOG_MANUAL_CAPS: u64 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

impl<H: ArchHooks> Vm<H> {
    /// `kvm_use_dirty_bitmap`: bitmaps are used unless dirty rings are on
    /// without ring-with-bitmap.
    pub(crate) fn use_dirty_bitmap(&self, w: &WriterState) -> bool {
        w.dirty_ring_size == 0 || w.ring_with_bitmap
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
        let mut w = lock(&self.writer);
        w.manual_protect = args;
        self.manual_protect.store(args, Ordering::Relaxed);
        Ok(())
    }

    /// Whether manual protect is enabled.
    pub fn manual_dirty_log_protect(&self) -> bool {
        self.manual_protect.load(Ordering::Relaxed) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
    }

    /// Checks common to GET and CLEAR; runs `f` on the slot's bitmap.
    fn with_bitmap<R>(
        &self,
        w: &WriterState,
        slot: u32,
        first_page: Option<u64>,
        f: impl FnOnce(&crate::dirty::DirtyBitmap, u64) -> Result<R, Error>,
    ) -> Result<R, Error> {
        if !self.use_dirty_bitmap(w) {
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
        let guard = self.read();
        let memslot = guard.id_to_memslot(as_id, id).ok_or(Error::NoDirtyBitmap { slot })?;
        let bitmap = memslot.dirty_bitmap().ok_or(Error::NoDirtyBitmap { slot })?;
        f(bitmap, memslot.npages)
    }

    /// `KVM_GET_DIRTY_LOG` into `out` (at least `ceil(npages / 64)` words).
    /// Without manual protect it takes and clears the bits atomically, word by
    /// word; with it, it copies and clears nothing. Returns the words written.
    pub fn get_dirty_log(&self, slot: u32, out: &mut [u64]) -> Result<usize, Error> {
        let w = lock(&self.writer);
        let manual = w.manual_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        self.with_bitmap(&w, slot, None, |b, _| {
            let need = b.len_words();
            let got = out.len();
            let out = out.get_mut(..need).ok_or(Error::BitmapTooShort { got, need })?;
            if manual {
                b.copy_into(out);
            } else {
                b.take_into(out);
            }
            Ok(need)
        })
    }

    /// [`get_dirty_log`](Self::get_dirty_log) into a new vector.
    pub fn get_dirty_log_vec(&self, slot: u32) -> Result<Vec<u64>, Error> {
        let need = {
            let w = lock(&self.writer);
            self.with_bitmap(&w, slot, None, |b, _| Ok(b.len_words()))?
        };
        let mut v = vec![0; need];
        // A concurrent change may have resized the slot's bitmap: retry on size mismatch.
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
        let w = lock(&self.writer);
        self.with_bitmap(&w, slot, Some(first_page), |b, npages| {
            let num = u64::from(num_pages);
            if first_page > npages || num > npages - first_page || (num < npages - first_page && num & 63 != 0) {
                return Err(Error::BadClearRange { first_page, num_pages: num, npages });
            }
            let need = words_for(num);
            let mask = bitmap.get(..need).ok_or(Error::BitmapTooShort { got: bitmap.len(), need })?;
            let first_word = usize::try_from(first_page / 64).map_err(|_| Error::BadClearRange {
                first_page,
                num_pages: num,
                npages,
            })?;
            // Bits past num_pages in the last word are not the caller's to clear.
            let mut tail = [0u64; 1];
            let (body, last) = match mask.split_last() {
                Some((l, body)) if num % 64 != 0 => {
                    tail[0] = l & ((1u64 << (num % 64)) - 1);
                    (body, &tail[..])
                }
                _ => (mask, &[][..]),
            };
            let mut cleared = b.clear_masked(first_word, body);
            cleared += b.clear_masked(first_word + body.len(), last);
            Ok(cleared)
        })
    }

    /// `mark_page_dirty`: marks `gfn` of address space `as_id` dirty if a slot
    /// covers it and logs dirty pages; otherwise does nothing.
    pub fn mark_page_dirty(&self, as_id: u16, gfn: u64) {
        let guard = self.read();
        if let Some(slot) = guard.gfn_to_memslot(as_id, gfn) {
            if let Some(b) = slot.dirty_bitmap() {
                b.mark(gfn - slot.base_gfn);
            }
        }
    }

    /// `mark_page_dirty_in_slot` by slot field and page offset in the slot.
    pub fn mark_page_dirty_in_slot(&self, slot: u32, rel_page: u64) {
        let SlotId { as_id, id } = SlotId::from_raw(slot);
        let guard = self.read();
        if let Some(s) = guard.id_to_memslot(as_id, id) {
            if let Some(b) = s.dirty_bitmap() {
                b.mark(rel_page);
            }
        }
    }
}

impl<H: ArchHooks> Vcpu<'_, H> {
    /// `kvm_vcpu_mark_page_dirty`: marks `gfn` in the vCPU's current address space.
    pub fn mark_page_dirty(&self, gfn: u64) {
        let guard = self.read();
        if let Some(slot) = guard.gfn_to_memslot(gfn) {
            if let Some(b) = slot.dirty_bitmap() {
                b.mark(gfn - slot.base_gfn);
            }
        }
    }
}
