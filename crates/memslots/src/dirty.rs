//! Dirty page bitmaps (`KVM_MEM_LOG_DIRTY_PAGES`): one bit per page, set by
//! `mark_page_dirty`, harvested by `get_dirty_log` / `clear_dirty_log`.
//!
//! Bits are set with an atomic OR and harvested with an atomic exchange (or
//! AND-NOT for a clear), word by word, so a mark racing with a harvest is either
//! returned by it or left set for the next one: no write is lost. A
//! "possibly dirty" hint (seed 004) lets a harvest of a clean slot skip the walk.

use crate::error::Error;
use crate::sync::Ordering;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64};

/// One slot's dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    npages: u64,
    /// False only when no bit has been set since the last harvest took them.
    maybe_dirty: AtomicBool,
}

/// Words needed for `npages` bits.
pub(crate) fn words_for(npages: u64) -> usize {
    usize::try_from(npages.div_ceil(64)).unwrap_or(usize::MAX)
}

impl DirtyBitmap {
    /// A bitmap of `npages` bits, all clear or (KVM's "initially set") all set.
    /// Allocation failure is reported, not aborted on (`ENOMEM`).
    pub fn try_new(npages: u64, all_set: bool) -> Result<Self, Error> {
        let n = words_for(npages);
        let bytes = n.saturating_mul(8);
        let mut v: Vec<AtomicU64> = Vec::new();
        v.try_reserve_exact(n).map_err(|_| Error::NoMemory { bytes })?;
        v.extend((0..n).map(|_| AtomicU64::new(0)));
        let b = DirtyBitmap { words: v.into_boxed_slice(), npages, maybe_dirty: AtomicBool::new(false) };
        if all_set {
            b.set_all();
        }
        Ok(b)
    }

    fn set_all(&self) {
        let n = self.words.len();
        for (i, w) in self.words.iter().enumerate() {
            let mask = if i + 1 == n { last_word_mask(self.npages) } else { u64::MAX };
            w.store(mask, Ordering::Relaxed);
        }
        self.maybe_dirty.store(self.npages != 0, Ordering::SeqCst);
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Words of the bitmap (`ceil(npages / 64)`).
    pub fn len_words(&self) -> usize {
        self.words.len()
    }

    /// Marks page `rel` (relative to the slot's base gfn). Out-of-range pages are ignored.
    #[inline]
    pub fn mark(&self, rel: u64) {
        if rel >= self.npages {
            return;
        }
        let (w, bit) = (word_index(rel), 1u64 << (rel % 64));
        // SeqCst pairs with the harvester's hint store/word exchange (see module docs).
        if self.words[w].load(Ordering::Relaxed) & bit == 0 {
            self.words[w].fetch_or(bit, Ordering::SeqCst);
        } else {
            // Already set: a harvest that has not yet exchanged this word will return it.
            core::sync::atomic::fence(Ordering::SeqCst);
        }
        if !self.maybe_dirty.load(Ordering::SeqCst) {
            self.maybe_dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Whether page `rel` is marked.
    pub fn test(&self, rel: u64) -> bool {
        rel < self.npages && self.words[word_index(rel)].load(Ordering::Acquire) & (1u64 << (rel % 64)) != 0
    }

    /// Whether a harvest may find something (the seed-004 hint).
    pub fn maybe_dirty(&self) -> bool {
        self.maybe_dirty.load(Ordering::SeqCst)
    }

    /// Takes and clears every bit, word by word, into `out` (KVM without manual protect).
    /// Returns the number of set bits taken. `out` must have [`len_words`](Self::len_words) words.
    pub fn take_into(&self, out: &mut [u64]) -> u64 {
        out.iter_mut().for_each(|o| *o = 0);
        if !self.maybe_dirty.load(Ordering::SeqCst) {
            return 0;
        }
        self.maybe_dirty.store(false, Ordering::SeqCst);
        let mut taken = 0;
        for (o, w) in out.iter_mut().zip(self.words.iter()) {
            if w.load(Ordering::Relaxed) != 0 {
                let v = w.swap(0, Ordering::SeqCst);
                taken += u64::from(v.count_ones());
                *o = v;
            }
        }
        taken
    }

    /// Copies the bitmap into `out` without clearing (KVM with manual protect).
    pub fn copy_into(&self, out: &mut [u64]) {
        for (o, w) in out.iter_mut().zip(self.words.iter()) {
            *o = w.load(Ordering::SeqCst);
        }
    }

    /// Clears, in words `first_word..`, the bits set in `mask` (fetch-and-andnot).
    /// Returns how many bits were actually cleared.
    pub fn clear_masked(&self, first_word: usize, mask: &[u64]) -> u64 {
        let mut cleared = 0;
        for (w, m) in self.words.iter().skip(first_word).zip(mask.iter()) {
            if *m != 0 {
                let old = w.fetch_and(!m, Ordering::SeqCst);
                cleared += u64::from((old & m).count_ones());
            }
        }
        cleared
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.words.len() * 8
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
