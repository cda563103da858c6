//! Dirty page bitmaps (`KVM_MEM_LOG_DIRTY_PAGES`): one bit per page, set by
//! `mark_page_dirty`, harvested by `get_dirty_log` / `clear_dirty_log`.
//!
//! # No lost bits
//!
//! Markers always run inside a read section (as KVM's run under SRCU) and set
//! bits with an atomic OR in the bitmap's *active* buffer. Harvesting:
//!
//! - **Take** (`get_dirty_log` without manual protect): flip the active buffer
//!   (the spare one is all zeros), wait for a grace period so every marker that
//!   could still write the old buffer has finished, then read the old buffer
//!   with plain loads and zero it. No atomic read-modify-write per word, which
//!   is what makes harvesting a 64 GiB slot fast. A mark either lands in the old
//!   buffer before the grace period ends (taken now) or in the new one (taken
//!   next time).
//! - **Copy** (with manual protect): relaxed loads of the active buffer.
//! - **Clear** (`clear_dirty_log`): fetch-and-andnot of the caller's mask on the
//!   active buffer, only on words where the mask is non-zero; a mark made after
//!   the caller's copy is never cleared unless the caller's mask had it.
//!
//! A "maybe dirty" hint (seed 004) lets a take of a clean bitmap return zeros
//! without flipping or walking.

use crate::error::Error;
use crate::sync::Ordering;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// One slot's dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    bufs: [Box<[AtomicU64]>; 2],
    active: AtomicUsize,
    npages: u64,
    /// False only when no bit has been set since the last take.
    maybe_dirty: AtomicBool,
}

/// Words needed for `npages` bits.
pub(crate) fn words_for(npages: u64) -> usize {
    usize::try_from(npages.div_ceil(64)).unwrap_or(usize::MAX)
}

fn try_zeroed(n: usize) -> Result<Box<[AtomicU64]>, Error> {
    let mut v: Vec<AtomicU64> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::NoMemory { bytes: n.saturating_mul(8) })?;
    v.extend((0..n).map(|_| AtomicU64::new(0)));
    Ok(v.into_boxed_slice())
}

impl DirtyBitmap {
    /// A bitmap of `npages` bits, all clear or (KVM's "initially set") all set.
    /// Allocation failure is reported (`ENOMEM`), never aborted on. Like KVM,
    /// it holds two buffers (KVM's second one is for the harvest copy).
    pub fn try_new(npages: u64, all_set: bool) -> Result<Self, Error> {
        let n = words_for(npages);
        let b = DirtyBitmap {
            bufs: [try_zeroed(n)?, try_zeroed(n)?],
            active: AtomicUsize::new(0),
            npages,
            maybe_dirty: AtomicBool::new(false),
        };
        if all_set {
            for (i, w) in b.bufs[0].iter().enumerate() {
                let mask = if i + 1 == n { last_word_mask(npages) } else { u64::MAX };
                w.store(mask, Ordering::Relaxed);
            }
            b.maybe_dirty.store(npages != 0, Ordering::SeqCst);
        }
        Ok(b)
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Words of the bitmap (`ceil(npages / 64)`).
    pub fn len_words(&self) -> usize {
        self.bufs[0].len()
    }

    #[inline]
    fn active_buf(&self) -> &[AtomicU64] {
        &self.bufs[self.active.load(Ordering::Acquire) & 1]
    }

    /// Marks page `rel` (relative to the slot's base gfn); out-of-range pages
    /// are ignored. The caller must be inside a read section of the VM that
    /// owns the slot (every marking path of this crate is).
    #[inline]
    pub(crate) fn mark(&self, rel: u64) {
        if rel >= self.npages {
            return;
        }
        let (w, bit) = (word_index(rel), 1u64 << (rel % 64));
        let word = &self.active_buf()[w];
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Release);
        }
        // The hint is set after the bit, and a take clears the hint before
        // flipping: a take that misses the hint also misses nothing.
        if !self.maybe_dirty.load(Ordering::Relaxed) {
            self.maybe_dirty.store(true, Ordering::Release);
        }
    }

    /// Whether page `rel` is marked in the active buffer.
    pub fn test(&self, rel: u64) -> bool {
        rel < self.npages && self.active_buf()[word_index(rel)].load(Ordering::Acquire) & (1u64 << (rel % 64)) != 0
    }

    /// Whether a take may find something (the seed-004 hint).
    pub fn maybe_dirty(&self) -> bool {
        self.maybe_dirty.load(Ordering::Acquire)
    }

    /// Takes and clears every bit into `out` (KVM without manual protect).
    /// `grace_period` must wait until every read section that started before
    /// it was called has ended; the caller serialises takes (writer lock).
    /// Returns the number of bits taken.
    pub(crate) fn take_into(&self, out: &mut [u64], grace_period: impl FnOnce()) -> u64 {
        out.iter_mut().for_each(|o| *o = 0);
        if !self.maybe_dirty.load(Ordering::Acquire) {
            return 0;
        }
        self.maybe_dirty.store(false, Ordering::SeqCst);
        let old = self.active.load(Ordering::Relaxed) & 1;
        self.active.store(old ^ 1, Ordering::SeqCst);
        grace_period();
        let mut taken = 0;
        for (o, w) in out.iter_mut().zip(self.bufs[old].iter()) {
            // No marker can write the old buffer any more: plain loads/stores.
            let v = w.load(Ordering::Relaxed);
            if v != 0 {
                w.store(0, Ordering::Relaxed);
                taken += u64::from(v.count_ones());
                *o = v;
            }
        }
        taken
    }

    /// Copies the active buffer into `out` without clearing (manual protect).
    pub fn copy_into(&self, out: &mut [u64]) {
        if !self.maybe_dirty.load(Ordering::Acquire) {
            out.iter_mut().for_each(|o| *o = 0);
            return;
        }
        for (o, w) in out.iter_mut().zip(self.active_buf().iter()) {
            *o = w.load(Ordering::Acquire);
        }
    }

    /// Clears, from word `first_word` on, the bits set in `mask`
    /// (fetch-and-andnot). Returns how many bits were actually cleared.
    pub(crate) fn clear_masked(&self, first_word: usize, mask: &[u64]) -> u64 {
        let mut cleared = 0;
        let buf = self.active_buf();
        for (w, m) in buf.iter().skip(first_word).zip(mask.iter()) {
            if *m != 0 && w.load(Ordering::Relaxed) & *m != 0 {
                let old = w.fetch_and(!m, Ordering::AcqRel);
                cleared += u64::from((old & m).count_ones());
            }
        }
        cleared
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.len() * 8).sum()
    }
}

#[allow(clippy::cast_possible_truncation)]
fn word_index(rel: u64) -> usize {
    // rel < npages, and the bitmap of npages bits was allocated, so rel / 64
    // is below the number of words, which fits in usize.
    (rel / 64) as usize
}

fn last_word_mask(npages: u64) -> u64 {
    match npages % 64 {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}
