//! The hva index of one memslot set (KVM's hva interval tree): inclusive
//! `[start, last]` `u64` ranges with an overlap query.
//!
//! This plays the part of the kernel's `interval_tree`
//! (`include/linux/interval_tree.h`) that KVM uses to index memslots by host
//! virtual address: entries may overlap arbitrarily and may even be identical
//! except for their value. Despite the name it is not a tree any more.
//!
//! # Structure: sorted blocks
//!
//! Entries are kept sorted by `(start, last, value)` in blocks of at most
//! [`BLOCK_MAX`] entries, the same two-level shape as the gfn index
//! (`gfn_index.rs`). A block is one cache-line-aligned allocation holding its
//! starts (padded with `u64::MAX`), its lasts and its values in three fixed
//! arrays (640 bytes for `u16` values: ~20 bytes per entry when full,
//! against 48 per node, plus a free-list arena, for the AVL tree it
//! replaced). Parallel top arrays hold, per block, its first `start`
//! (searched by binary search), its largest `last` (`max_last`, for
//! queries) and the block pointer.
//!
//! An insert or remove is a binary search of the top array (8 KiB at 32k
//! entries, usually cached; entries sharing a `start` across blocks are told
//! apart by a second binary search over those blocks' first entries), a
//! branchless search of one block, and a shift of at most [`BLOCK_MAX`]
//! entries inside it: `O(log n + B)`, a handful of cache lines, where the AVL
//! tree this replaced took one dependent cache miss per level (15-20 levels
//! at 32k entries) plus rebalancing. A full block is split in halves (or,
//! past either end, a new block is started, so entries inserted in order
//! leave full blocks); a block below a quarter full is merged into a
//! neighbour with room. Memory is proportional to the entries: at most one
//! spare block is kept, the top arrays shrink when a quarter used, and an
//! emptied index holds nothing.
//!
//! # Queries
//!
//! An overlap query for `[qs, ql]` (an entry matches iff
//! `start <= ql && last >= qs`) visits the blocks whose first start is
//! `<= ql` (a binary search of the top array bounds them) and, among those,
//! only the blocks with `max_last >= qs`. Those are found by scanning a
//! fourth top array, `chunk_max` (the largest `max_last` of every
//! [`CHUNK`] = 32 consecutive blocks), and the `max_last` entries of the
//! chunks that may match: at 32k entries (~1000 blocks) that is at most ~32
//! plus 32 sequential 8-byte reads per matching chunk, instead of the
//! `O(log n)` dependent node visits of a tree. The matching blocks are
//! walked in order, stopping at the first entry starting after `ql`, so
//! results come out in ascending `(start, last, value)` order. Keeping
//! `chunk_max` exact costs one chunk (32 reads) when a block's `max_last`
//! drops, and the chunks from the change to the end when a block is added
//! or removed (a split or merge, every ~16 updates at most): queries
//! (MMU-notifier style) are rare compared with updates, and this keeps them
//! cheap without a per-update tree walk.
//!
//! Removal identifies an entry by `(start, last, value)`; if several
//! identical entries exist one of them is removed.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::iter::FusedIterator;

/// Largest block (a power of two, for the branchless search of `starts`).
const BLOCK_MAX: usize = 32;
/// A block smaller than this is merged with a neighbour when the result fits.
const BLOCK_MIN: usize = BLOCK_MAX / 4;
/// `starts` value of an unused position: never less than a searched start.
const PAD: u64 = u64::MAX;
/// Blocks summarised by one `chunk_max` entry.
const CHUNK: usize = 32;

/// One block, one allocation: entry `i` is `(starts[i], lasts[i], vals[i])`.
#[derive(Clone)]
#[repr(C, align(64))]
struct Block<V> {
    /// Sorted (with `lasts` and `vals`); [`PAD`] from `len` on.
    starts: [u64; BLOCK_MAX],
    /// `lasts[..len]` are live; the rest are stale.
    lasts: [u64; BLOCK_MAX],
    /// `vals[..len]` are live; the rest are copies of some value that was
    /// here (a safe stand-in for uninitialised memory, as `V: Copy`).
    vals: [V; BLOCK_MAX],
    /// Never 0 while the block is in the index.
    len: usize,
}

impl<V: Copy + Ord> Block<V> {
    fn new(start: u64, last: u64, value: V) -> Box<Self> {
        let mut starts = [PAD; BLOCK_MAX];
        starts[0] = start;
        let mut lasts = [0; BLOCK_MAX];
        lasts[0] = last;
        Box::new(Block { starts, lasts, vals: [value; BLOCK_MAX], len: 1 })
    }

    /// Entry `i`.
    fn get(&self, i: usize) -> (u64, u64, V) {
        (self.starts[i], self.lasts[i], self.vals[i])
    }

    /// Largest `last` of the live entries (0 when empty).
    fn max_last(&self) -> u64 {
        self.lasts[..self.len].iter().copied().max().unwrap_or(0)
    }

    /// Index of the first entry `>= (start, last, value)` (`len` if none).
    #[inline]
    fn lower_bound(&self, start: u64, last: u64, value: V) -> usize {
        // Branchless search for the first start `>= start` over all
        // BLOCK_MAX positions (the padding is never `< start`): the answer
        // is at most `len`.
        let s = &self.starts;
        let mut i = 0;
        let mut step = BLOCK_MAX / 2;
        while step > 0 {
            if s[i + step - 1] < start {
                i += step;
            }
            step /= 2;
        }
        // `i <= BLOCK_MAX - 1` here; step past the last position if needed.
        i += usize::from(s[i] < start);
        // Then by `(last, value)` among equal starts (usually none).
        while i < self.len && s[i] == start && (self.lasts[i], self.vals[i]) < (last, value) {
            i += 1;
        }
        i
    }

    /// Inserts at `i`; the block must not be full.
    fn insert_at(&mut self, i: usize, (start, last, value): (u64, u64, V)) {
        let n = self.len;
        self.starts.copy_within(i..n, i + 1);
        self.lasts.copy_within(i..n, i + 1);
        self.vals.copy_within(i..n, i + 1);
        self.starts[i] = start;
        self.lasts[i] = last;
        self.vals[i] = value;
        self.len += 1;
    }

    fn remove_at(&mut self, i: usize) {
        let n = self.len;
        self.starts.copy_within(i + 1..n, i);
        self.lasts.copy_within(i + 1..n, i);
        self.vals.copy_within(i + 1..n, i);
        self.starts[n - 1] = PAD;
        self.len -= 1;
    }

    /// Moves the entries from `at` on into `into` (an empty block) or a new
    /// block.
    fn split_off(&mut self, at: usize, into: Option<Box<Self>>) -> Box<Self> {
        let n = self.len;
        let mut right = into.unwrap_or_else(|| {
            Box::new(Block { starts: [PAD; BLOCK_MAX], lasts: [0; BLOCK_MAX], vals: self.vals, len: 0 })
        });
        right.starts[..n - at].copy_from_slice(&self.starts[at..n]);
        right.lasts[..n - at].copy_from_slice(&self.lasts[at..n]);
        right.vals[..n - at].copy_from_slice(&self.vals[at..n]);
        right.len = n - at;
        self.starts[at..n].fill(PAD);
        self.len = at;
        right
    }

    /// Appends all of `other`'s entries; they must fit and not be smaller.
    fn append(&mut self, other: &Self) {
        let (n, m) = (self.len, other.len);
        self.starts[n..n + m].copy_from_slice(&other.starts[..m]);
        self.lasts[n..n + m].copy_from_slice(&other.lasts[..m]);
        self.vals[n..n + m].copy_from_slice(&other.vals[..m]);
        self.len += m;
    }
}

/// The hva index: `[start, last]` u64 ranges carrying a `Copy` value, with
/// overlap queries.
///
/// See the [module documentation](self) for the structure and complexity.
#[derive(Clone)]
pub(crate) struct HvaTree<V> {
    /// `firsts[b] == blocks[b].starts[0]`.
    firsts: Vec<u64>,
    /// `max_lasts[b] == blocks[b].max_last()`.
    max_lasts: Vec<u64>,
    /// `chunk_max[c]` is the largest of `max_lasts[c * CHUNK..][..CHUNK]`,
    /// so that a query skips 32 blocks per entry that cannot match.
    chunk_max: Vec<u64>,
    /// In `(start, last, value)` order, never empty.
    blocks: Vec<Box<Block<V>>>,
    /// The last block taken out of the index, emptied, for the next block to
    /// be created (at most one; none when the index is empty).
    spare: Option<Box<Block<V>>>,
    /// Number of entries.
    len: usize,
}

impl<V: Copy + Ord> Default for HvaTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy + Ord + fmt::Debug> fmt::Debug for HvaTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(s, l, v)| (s..=l, v))).finish()
    }
}

impl<V: Copy + Ord> HvaTree<V> {
    /// Creates an empty index. Does not allocate.
    pub(crate) const fn new() -> Self {
        Self {
            firsts: Vec::new(),
            max_lasts: Vec::new(),
            chunk_max: Vec::new(),
            blocks: Vec::new(),
            spare: None,
            len: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the index has no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The last block whose first entry is `<= (start, last, value)`, or
    /// `None` if every entry is greater (or the index is empty).
    #[inline]
    fn floor_block(&self, start: u64, last: u64, value: V) -> Option<usize> {
        // Blocks `..hi` start at or before `start`.
        let hi = self.firsts.partition_point(|&f| f <= start);
        let b = hi.checked_sub(1)?;
        if self.firsts[b] != start {
            return Some(b);
        }
        // Blocks `lo..hi` have first start == start (usually just `b`):
        // compare their first entries in full.
        let lo = self.firsts[..b].partition_point(|&f| f < start);
        let k = self.blocks[lo..hi].partition_point(|blk| (blk.lasts[0], blk.vals[0]) <= (last, value));
        (lo + k).checked_sub(1)
    }

    /// Inserts `[start, last]` with `value`.
    ///
    /// The caller guarantees `start <= last` (the index stays consistent if
    /// not, but such an entry only matches queries that satisfy
    /// `entry.start <= q.last && entry.last >= q.start`). Entries with the
    /// same `(start, last)`, with or without the same value, are allowed;
    /// they are kept in value order.
    pub(crate) fn insert(&mut self, start: u64, last: u64, value: V) {
        self.len += 1;
        if self.blocks.is_empty() {
            let block = self.new_block(start, last, value);
            self.push_block(0, block);
            return;
        }
        // The floor block, or block 0 (then `i == 0`).
        let mut b = self.floor_block(start, last, value).unwrap_or(0);
        let n = self.blocks[b].len;
        let mut i = self.blocks[b].lower_bound(start, last, value);
        if n == BLOCK_MAX {
            if i == n && self.blocks.get(b + 1).is_some_and(|next| next.len < BLOCK_MAX) {
                // Between two blocks, and the next one has room.
                b += 1;
                i = 0;
            } else if (i == n && b + 1 == self.blocks.len()) || (i == 0 && b == 0) {
                // Past either end of the index: a new block, so that entries
                // inserted in order (or in reverse) leave full blocks.
                let at = if i == 0 { 0 } else { b + 1 };
                let block = self.new_block(start, last, value);
                self.push_block(at, block);
                return;
            } else {
                let half = BLOCK_MAX / 2;
                let right = self.blocks[b].split_off(half, self.spare.take());
                self.max_lasts[b] = self.blocks[b].max_last();
                self.push_block(b + 1, right);
                if i > half {
                    b += 1;
                    i -= half;
                }
            }
        }
        self.blocks[b].insert_at(i, (start, last, value));
        if i == 0 {
            self.firsts[b] = start;
        }
        if last > self.max_lasts[b] {
            self.max_lasts[b] = last;
            let c = &mut self.chunk_max[b / CHUNK];
            *c = (*c).max(last);
        }
    }

    /// Removes the entry equal in start, last AND value; returns whether one
    /// was found. If several identical entries exist, exactly one of them is
    /// removed.
    pub(crate) fn remove(&mut self, start: u64, last: u64, value: V) -> bool {
        // An equal entry, if any, is in the floor block: were it only in an
        // earlier block, the floor block's first entry would be equal too.
        let Some(b) = self.floor_block(start, last, value) else {
            return false;
        };
        let block = &mut self.blocks[b];
        let i = block.lower_bound(start, last, value);
        if i == block.len || block.get(i) != (start, last, value) {
            return false;
        }
        block.remove_at(i);
        self.len -= 1;
        if block.len == 0 {
            let block = self.remove_block(b);
            self.retire(block);
            return true;
        }
        if i == 0 {
            self.firsts[b] = block.starts[0];
        }
        let small = block.len < BLOCK_MIN;
        if last == self.max_lasts[b] {
            self.max_lasts[b] = block.max_last();
            if last == self.chunk_max[b / CHUNK] {
                self.refresh_chunks(b, b + 1);
            }
        }
        if small {
            self.merge_small(b);
        }
        true
    }

    /// Merges block `b` into a neighbour when the result fits in a block.
    fn merge_small(&mut self, b: usize) {
        let len = self.blocks[b].len;
        let fits = |j: usize| self.blocks[j].len + len <= BLOCK_MAX;
        let left = if b + 1 < self.blocks.len() && fits(b + 1) {
            b
        } else if b > 0 && fits(b - 1) {
            b - 1
        } else {
            return;
        };
        let right_max = self.max_lasts[left + 1];
        self.max_lasts[left] = self.max_lasts[left].max(right_max);
        let right = self.remove_block(left + 1);
        self.blocks[left].append(&right);
        self.retire(right);
    }

    /// A one-entry block, the spare if there is one.
    fn new_block(&mut self, start: u64, last: u64, value: V) -> Box<Block<V>> {
        let Some(mut block) = self.spare.take() else {
            return Block::new(start, last, value);
        };
        block.starts[0] = start;
        block.lasts[0] = last;
        block.vals[0] = value;
        block.len = 1;
        block
    }

    /// Inserts `block` (non-empty) at position `at` of the top arrays.
    fn push_block(&mut self, at: usize, block: Box<Block<V>>) {
        self.firsts.insert(at, block.starts[0]);
        self.max_lasts.insert(at, block.max_last());
        self.blocks.insert(at, block);
        // From the block before: a split lowered its `max_last`.
        self.refresh_chunks(at.saturating_sub(1), self.blocks.len());
    }

    /// Recomputes the `chunk_max` entries covering blocks `from..to` (and
    /// resizes `chunk_max` to the number of blocks). `O(to - from + CHUNK)`
    /// sequential reads: a block added or removed shifts every later block,
    /// so after a split or merge `to` is the end (at 32k entries, ~1000
    /// reads every ~16 updates).
    fn refresh_chunks(&mut self, from: usize, to: usize) {
        let nb = self.max_lasts.len();
        let nc = nb.div_ceil(CHUNK);
        self.chunk_max.resize(nc, 0);
        for c in from / CHUNK..to.div_ceil(CHUNK).min(nc) {
            let blocks = &self.max_lasts[c * CHUNK..nb.min((c + 1) * CHUNK)];
            self.chunk_max[c] = blocks.iter().copied().max().unwrap_or(0);
        }
    }

    /// Keeps a block taken out of the index as the spare (emptied), unless
    /// the index is now empty.
    fn retire(&mut self, mut block: Box<Block<V>>) {
        if self.blocks.is_empty() {
            self.spare = None;
            return;
        }
        block.starts = [PAD; BLOCK_MAX];
        block.len = 0;
        self.spare = Some(block);
    }

    fn remove_block(&mut self, b: usize) -> Box<Block<V>> {
        self.firsts.remove(b);
        self.max_lasts.remove(b);
        let block = self.blocks.remove(b);
        // From the block before: a merge raised its `max_last`.
        self.refresh_chunks(b.saturating_sub(1), self.blocks.len());
        // Memory proportional to what is in use (amortised O(1): shrinking
        // at least halves), and nothing at all when empty.
        if self.blocks.is_empty() {
            self.firsts = Vec::new();
            self.max_lasts = Vec::new();
            self.chunk_max = Vec::new();
            self.blocks = Vec::new();
        } else if self.blocks.len() < self.blocks.capacity() / 4 {
            let cap = self.blocks.len() * 2;
            self.firsts.shrink_to(cap);
            self.max_lasts.shrink_to(cap);
            self.chunk_max.shrink_to(cap.div_ceil(CHUNK));
            self.blocks.shrink_to(cap);
        }
        block
    }

    /// The first start of every block, in order (for [`prefetch_block`](Self::prefetch_block)).
    pub(crate) fn firsts(&self) -> &[u64] {
        &self.firsts
    }

    /// Prefetches block `count - 1` (`count` from a search of
    /// [`firsts`](Self::firsts)) and its `max_lasts` entry; nothing if there
    /// is none.
    pub(crate) fn prefetch_block(&self, count: usize) {
        if let Some(b) = count.checked_sub(1).filter(|&b| b < self.blocks.len()) {
            let p: *const Block<V> = &*self.blocks[b];
            crate::prefetch::prefetch(p.cast(), core::mem::size_of::<Block<V>>());
            crate::prefetch::prefetch(self.max_lasts.as_ptr().wrapping_add(b).cast(), 8);
        }
    }

    /// Calls `f(start, last, value)` for every entry intersecting `[start, last]`
    /// (inclusive both), in ascending `(start, last, value)` order.
    ///
    /// An entry `e` intersects the query iff `e.start <= last && e.last >= start`.
    pub(crate) fn for_each_overlap(&self, start: u64, last: u64, mut f: impl FnMut(u64, u64, V)) {
        for (s, l, v) in self.overlaps(start, last) {
            f(s, l, v);
        }
    }

    /// Iterator over every entry intersecting `[start, last]` (inclusive both),
    /// in ascending `(start, last, value)` order; same semantics as
    /// [`Self::for_each_overlap`]. Never allocates.
    pub(crate) fn overlaps(&self, start: u64, last: u64) -> Overlaps<'_, V> {
        // Blocks from `end` on start after the query.
        let end = self.firsts.partition_point(|&f| f <= last);
        let mut it = Overlaps {
            chunk_max: &self.chunk_max,
            max_lasts: &self.max_lasts[..end],
            blocks: &self.blocks[..end],
            b: 0,
            i: 0,
            start,
            last,
        };
        it.seek_block(0);
        it
    }

    /// All entries as `(start, last, value)`, in ascending order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        self.blocks.iter().flat_map(|b| (0..b.len).map(move |i| b.get(i)))
    }

    /// Bytes of heap memory held (capacity-based), for a memory report.
    pub(crate) fn heap_bytes(&self) -> usize {
        let top = self.firsts.capacity() * core::mem::size_of::<u64>()
            + self.max_lasts.capacity() * core::mem::size_of::<u64>()
            + self.chunk_max.capacity() * core::mem::size_of::<u64>()
            + self.blocks.capacity() * core::mem::size_of::<Box<Block<V>>>();
        let blocks = self.blocks.len() + usize::from(self.spare.is_some());
        top + blocks * core::mem::size_of::<Block<V>>()
    }
}

/// Iterator over the entries of an [`HvaTree`] intersecting a query range,
/// in ascending `(start, last, value)` order. Created by
/// [`HvaTree::overlaps`].
///
/// Yields `(start, last, value)`. Never allocates.
#[derive(Clone)]
pub(crate) struct Overlaps<'a, V> {
    /// The index's `chunk_max` (may cover blocks past `max_lasts`).
    chunk_max: &'a [u64],
    /// `max_last` of the blocks that start at or before the query's last.
    max_lasts: &'a [u64],
    /// Those blocks.
    blocks: &'a [Box<Block<V>>],
    /// Current block (`blocks.len()` when done).
    b: usize,
    /// Next position in the current block.
    i: usize,
    /// Query start (inclusive).
    start: u64,
    /// Query last (inclusive).
    last: u64,
}

impl<V> Overlaps<'_, V> {
    /// Moves to the first block from `b` on that may hold a match: skips
    /// chunks of [`CHUNK`] blocks by `chunk_max`, then blocks by `max_last`.
    #[inline]
    fn seek_block(&mut self, mut b: usize) {
        let (start, end) = (self.start, self.max_lasts.len());
        self.i = 0;
        while b < end {
            let c = b / CHUNK;
            let hi = end.min((c + 1) * CHUNK);
            if self.chunk_max[c] >= start {
                if let Some(k) = self.max_lasts[b..hi].iter().position(|&m| m >= start) {
                    self.b = b + k;
                    return;
                }
            }
            b = hi;
        }
        self.b = end;
    }
}

impl<V: Copy> Iterator for Overlaps<'_, V> {
    type Item = (u64, u64, V);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(block) = self.blocks.get(self.b) {
            while self.i < block.len {
                let i = self.i;
                let s = block.starts[i];
                if s > self.last {
                    // Sorted by start: nothing after this can match.
                    self.b = self.blocks.len();
                    return None;
                }
                self.i += 1;
                if block.lasts[i] >= self.start {
                    return Some((s, block.lasts[i], block.vals[i]));
                }
            }
            self.seek_block(self.b + 1);
        }
        None
    }
}

impl<V: Copy> FusedIterator for Overlaps<'_, V> {}

#[cfg(test)]
impl<V: Copy + Ord> HvaTree<V> {
    /// Asserts every structural invariant: order, block sizes and padding,
    /// the top arrays, `len`, the spare, and no memory when empty.
    fn check_invariants(&self) {
        assert_eq!(self.firsts.len(), self.blocks.len());
        assert_eq!(self.max_lasts.len(), self.blocks.len());
        let chunks: Vec<u64> = self.max_lasts.chunks(CHUNK).map(|c| c.iter().copied().max().unwrap_or(0)).collect();
        assert_eq!(self.chunk_max, chunks, "stale chunk_max");
        let mut n = 0;
        let mut prev: Option<(u64, u64, V)> = None;
        for (b, blk) in self.blocks.iter().enumerate() {
            assert!(blk.len > 0 && blk.len <= BLOCK_MAX, "bad block size");
            assert_eq!(self.firsts[b], blk.starts[0], "stale first");
            assert_eq!(self.max_lasts[b], blk.max_last(), "stale max_last");
            assert!(blk.starts[blk.len..].iter().all(|&s| s == PAD), "bad padding");
            for i in 0..blk.len {
                let e = blk.get(i);
                assert!(prev.is_none_or(|p| p <= e), "order broken");
                prev = Some(e);
            }
            n += blk.len;
        }
        assert_eq!(n, self.len, "len mismatch");
        // Blocks stay reasonably full (merges), so memory tracks entries.
        assert!(self.blocks.len() <= 2 * self.len / BLOCK_MIN + 1, "too many blocks");
        if let Some(spare) = &self.spare {
            assert!(self.len > 0 && spare.len == 0 && spare.starts.iter().all(|&s| s == PAD));
        }
        if self.len == 0 {
            assert!(self.spare.is_none());
            assert_eq!(self.heap_bytes(), 0, "empty index holds memory");
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    type Entry = (u64, u64, u8);

    const MAX: u64 = u64::MAX;

    fn naive(model: &[Entry], start: u64, last: u64) -> Vec<Entry> {
        let mut v: Vec<Entry> = model.iter().copied().filter(|&(s, l, _)| s <= last && l >= start).collect();
        v.sort_unstable();
        v
    }

    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_unstable();
        v
    }

    /// Checks both query APIs against the model.
    fn check_query(tree: &HvaTree<u8>, model: &[Entry], start: u64, last: u64) {
        let mut a = Vec::new();
        tree.for_each_overlap(start, last, |s, l, v| a.push((s, l, v)));
        let b: Vec<Entry> = tree.overlaps(start, last).collect();
        assert_eq!(a, b, "for_each_overlap and overlaps disagree");
        assert_eq!(a, naive(model, start, last), "query [{start}, {last}]");
    }

    /// Checks len, iter and invariants against the model.
    fn check_all(tree: &HvaTree<u8>, model: &[Entry]) {
        tree.check_invariants();
        assert_eq!(tree.len(), model.len());
        assert_eq!(tree.is_empty(), model.is_empty());
        let all: Vec<Entry> = tree.iter().collect();
        assert_eq!(all, sorted(model.to_vec()));
    }

    fn remove_from_model(model: &mut Vec<Entry>, e: Entry) -> bool {
        match model.iter().position(|&x| x == e) {
            Some(p) => {
                model.swap_remove(p);
                true
            }
            None => false,
        }
    }

    #[test]
    fn empty_tree() {
        const EMPTY: HvaTree<u32> = HvaTree::new();
        let mut t = EMPTY;
        assert_eq!(t.len(), 0);
        assert!(t.is_empty());
        assert_eq!(t.heap_bytes(), 0);
        assert_eq!(t.iter().count(), 0);
        assert_eq!(t.overlaps(0, MAX).count(), 0);
        let mut called = false;
        t.for_each_overlap(0, MAX, |_, _, _| called = true);
        assert!(!called);
        assert!(!t.remove(0, 0, 0));
        assert!(!t.remove(0, MAX, 7));
        t.check_invariants();
        let d: HvaTree<u32> = HvaTree::default();
        assert!(d.is_empty());
        assert_eq!(std::format!("{d:?}"), "[]");
    }

    #[test]
    fn identical_intervals_different_values() {
        let mut t = HvaTree::new();
        for v in 0..10u8 {
            t.insert(100, 200, v);
        }
        t.check_invariants();
        // Equal keys come out in value order.
        let vals: Vec<u8> = t.iter().map(|(_, _, v)| v).collect();
        assert_eq!(vals, (0..10).collect::<Vec<_>>());
        assert_eq!(t.overlaps(150, 150).count(), 10);
        assert!(!t.remove(100, 200, 10));
        assert!(!t.remove(100, 201, 3));
        assert!(t.remove(100, 200, 3));
        assert!(!t.remove(100, 200, 3));
        t.check_invariants();
        let vals: Vec<u8> = t.iter().map(|(_, _, v)| v).collect();
        assert_eq!(vals, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
        // Fully identical duplicates: each remove takes exactly one.
        t.insert(100, 200, 5);
        assert_eq!(t.len(), 10);
        assert!(t.remove(100, 200, 5));
        assert!(t.remove(100, 200, 5));
        assert!(!t.remove(100, 200, 5));
        t.check_invariants();
        for v in [0, 1, 2, 4, 6, 7, 8, 9] {
            assert!(t.remove(100, 200, v));
            t.check_invariants();
        }
        assert!(t.is_empty());
        assert_eq!(t.heap_bytes(), 0);
    }

    #[test]
    fn point_intervals() {
        let mut t = HvaTree::new();
        let mut model = Vec::new();
        for p in 0..50u64 {
            t.insert(p * 2, p * 2, 1u8);
            model.push((p * 2, p * 2, 1));
        }
        check_all(&t, &model);
        for q in 0..102 {
            check_query(&t, &model, q, q);
            check_query(&t, &model, q, q + 3);
        }
        assert_eq!(t.overlaps(3, 3).count(), 0);
        assert_eq!(t.overlaps(4, 4).collect::<Vec<_>>(), vec![(4, 4, 1)]);
    }

    #[test]
    fn u64_max_bounds() {
        let mut t = HvaTree::new();
        let model = vec![(MAX, MAX, 1u8), (0, MAX, 2), (MAX - 1, MAX, 3), (0, 0, 4), (MAX - 10, MAX - 5, 5)];
        for &(s, l, v) in &model {
            t.insert(s, l, v);
        }
        check_all(&t, &model);
        for (s, l) in [
            (MAX, MAX),
            (0, 0),
            (0, MAX),
            (MAX - 5, MAX - 5),
            (MAX - 4, MAX - 2),
            (1, MAX - 11),
            (MAX - 1, MAX - 1),
            (5, 3), // reversed query: same predicate as the model
        ] {
            check_query(&t, &model, s, l);
        }
        assert_eq!(t.overlaps(MAX, MAX).collect::<Vec<_>>(), vec![(0, MAX, 2), (MAX - 1, MAX, 3), (MAX, MAX, 1)]);
        assert!(t.remove(MAX, MAX, 1));
        assert!(t.remove(0, MAX, 2));
        assert!(!t.remove(0, MAX, 2));
        t.check_invariants();
    }

    #[test]
    fn remove_missing_and_reinsert() {
        let mut t = HvaTree::new();
        t.insert(10, 20, 1u8);
        t.insert(5, 30, 2);
        assert!(!t.remove(10, 20, 2));
        assert!(!t.remove(10, 21, 1));
        assert!(!t.remove(11, 20, 1));
        assert_eq!(t.len(), 2);
        assert!(t.remove(10, 20, 1));
        assert!(!t.remove(10, 20, 1));
        t.insert(10, 20, 1);
        t.check_invariants();
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(5, 30, 2), (10, 20, 1)]);
        assert!(t.remove(5, 30, 2));
        assert!(t.remove(10, 20, 1));
        assert!(t.is_empty());
        assert_eq!(t.heap_bytes(), 0);
        // Reuse after the arena was released.
        t.insert(1, 2, 3);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(1, 2, 3)]);
        t.check_invariants();
    }

    #[test]
    fn memory_tracks_live_entries() {
        let block = core::mem::size_of::<Block<u32>>();
        let mut t = HvaTree::new();
        for i in 0..4096u64 {
            t.insert(i * 16, i * 16 + 15, 0u32);
        }
        let full = t.heap_bytes();
        // Inserted in order: full blocks.
        assert_eq!(t.blocks.len(), 4096 / BLOCK_MAX);
        assert!(full >= 4096 / BLOCK_MAX * block);
        // Churn does not grow the index much (splits leave half-full blocks).
        for i in 0..4096u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 0));
            t.insert(i * 16, i * 16 + 15, 1);
        }
        t.check_invariants();
        assert!(t.heap_bytes() <= 3 * full);
        for i in 0..4000u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 1));
        }
        t.check_invariants();
        assert_eq!(t.len(), 96);
        assert!(t.heap_bytes() <= (2 * 96 / BLOCK_MIN + 2) * (block + 64));
        for i in 4000..4096u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 1));
            t.check_invariants();
        }
        assert_eq!(t.heap_bytes(), 0);
    }

    #[test]
    fn sequential_inserts_fill_blocks() {
        let mut t = HvaTree::new();
        for i in 0..10_000u64 {
            t.insert(i, i, 0u8);
        }
        t.check_invariants();
        assert_eq!(t.blocks.len(), 10_000usize.div_ceil(BLOCK_MAX));
        for i in (0..10_000u64).rev().step_by(2) {
            assert!(t.remove(i, i, 0));
        }
        t.check_invariants();
        // Reverse order fills blocks too.
        let mut t = HvaTree::new();
        for i in (0..10_000u64).rev() {
            t.insert(i, i, 0u8);
        }
        t.check_invariants();
        assert_eq!(t.blocks.len(), 10_000usize.div_ceil(BLOCK_MAX));
    }

    /// Splits and merges in the middle of the index, with duplicates of the
    /// same `(start, last)` spanning several blocks.
    #[test]
    fn splits_and_merges() {
        let mut t = HvaTree::new();
        let mut model = Vec::new();
        // Interleaved inserts: every block in the middle splits.
        for round in 0..4u64 {
            for i in 0..200u64 {
                let e = (i * 8 + round, i * 8 + round + 20, u8::try_from(round).unwrap());
                t.insert(e.0, e.1, e.2);
                model.push(e);
            }
            check_all(&t, &model);
        }
        // Identical intervals spanning blocks, with all values.
        for v in (0..=255u8).rev() {
            t.insert(500, 600, v);
            model.push((500, 600, v));
        }
        for v in 0..100u8 {
            t.insert(500, 600, v);
            model.push((500, 600, v));
        }
        check_all(&t, &model);
        assert!(t.blocks.len() > 20);
        let dups: Vec<Entry> = t.iter().filter(|&(s, l, _)| (s, l) == (500, 600)).collect();
        assert_eq!(dups, sorted(dups.clone()));
        for q in (0..1700).step_by(37) {
            check_query(&t, &model, q, q + 50);
        }
        // Remove every other entry, then everything, checking as we go.
        let all: Vec<Entry> = t.iter().collect();
        for (k, &(s, l, v)) in all.iter().enumerate().filter(|(k, _)| k % 2 == 0) {
            assert!(t.remove(s, l, v));
            remove_from_model(&mut model, (s, l, v));
            if k % 16 == 0 {
                check_all(&t, &model);
            }
        }
        check_all(&t, &model);
        for q in (0..1700).step_by(37) {
            check_query(&t, &model, q, q + 50);
        }
        while let Some(&(s, l, v)) = model.last() {
            assert!(t.remove(s, l, v));
            model.pop();
            if model.len() % 16 == 0 {
                check_all(&t, &model);
            }
        }
        assert_eq!(t.heap_bytes(), 0);
    }

    /// Long intervals in early blocks must be found by queries far right.
    #[test]
    fn long_intervals_in_early_blocks() {
        let mut t = HvaTree::new();
        let mut model = Vec::new();
        for i in 0..2000u64 {
            let e = (i * 100, i * 100 + 10, 0u8);
            t.insert(e.0, e.1, e.2);
            model.push(e);
        }
        for &e in &[(50, 150_000, 1u8), (1000, 100_500, 2), (3000, MAX, 3), (150_000, 150_001, 4)] {
            t.insert(e.0, e.1, e.2);
            model.push(e);
        }
        check_all(&t, &model);
        for q in [0, 55, 99_999, 100_000, 100_505, 149_999, 150_000, 150_001, 160_000, 199_905, 250_000, MAX] {
            check_query(&t, &model, q, q);
            check_query(&t, &model, q, q.saturating_add(1000));
        }
        let got: Vec<Entry> = t.overlaps(120_050, 120_050).collect();
        assert_eq!(got, vec![(50, 150_000, 1), (3000, MAX, 3)]);
        assert!(t.remove(50, 150_000, 1));
        assert!(t.remove(3000, MAX, 3));
        model.retain(|e| e.2 != 1 && e.2 != 3);
        check_all(&t, &model);
        assert_eq!(t.overlaps(120_050, 120_050).count(), 0);
        check_query(&t, &model, 100_400, 100_400);
    }

    // ------------------------------------------------------------------
    // Property tests against a naive model.

    /// An interval biased towards overlaps, duplicates and u64::MAX edges.
    fn interval() -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![
            8 => (0u64..64, 0u64..16).prop_map(|(s, len)| (s, s + len)),
            2 => (0u64..8, 0u64..8).prop_map(|(a, b)| (MAX - a.max(b), MAX - a.min(b))),
            1 => (0u64..64, 0u64..4).prop_map(|(s, b)| (s, MAX - b)),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| (a.min(b), a.max(b))),
        ]
    }

    fn query() -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![
            4 => interval(),
            1 => Just((0, MAX)),
            1 => (0u64..80, 0u64..80), // sometimes reversed
        ]
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64, u8),
        RemoveExisting(usize),
        RemoveRandom(u64, u64, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (interval(), 0u8..3).prop_map(|((s, l), v)| Op::Insert(s, l, v)),
            3 => any::<usize>().prop_map(Op::RemoveExisting),
            1 => (interval(), 0u8..3).prop_map(|((s, l), v)| Op::RemoveRandom(s, l, v)),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_model(
            steps in proptest::collection::vec(
                (op(), proptest::collection::vec(query(), 0..4)),
                1..200,
            )
        ) {
            let mut tree = HvaTree::new();
            let mut model: Vec<Entry> = Vec::new();
            for (op, queries) in steps {
                match op {
                    Op::Insert(s, l, v) => {
                        tree.insert(s, l, v);
                        model.push((s, l, v));
                    }
                    Op::RemoveExisting(sel) => {
                        if !model.is_empty() {
                            let e = model[sel % model.len()];
                            prop_assert!(tree.remove(e.0, e.1, e.2));
                            remove_from_model(&mut model, e);
                        }
                    }
                    Op::RemoveRandom(s, l, v) => {
                        let found = remove_from_model(&mut model, (s, l, v));
                        prop_assert_eq!(tree.remove(s, l, v), found);
                    }
                }
                check_all(&tree, &model);
                for (s, l) in queries {
                    check_query(&tree, &model, s, l);
                }
            }
        }

        #[test]
        fn fill_then_drain(
            (entries, order) in proptest::collection::vec((interval(), 0u8..3), 1..400)
                .prop_flat_map(|entries| {
                    let n = entries.len();
                    (Just(entries), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
                }),
            queries in proptest::collection::vec(query(), 4),
        ) {
            let mut tree = HvaTree::new();
            let mut model: Vec<Entry> = Vec::new();
            for &((s, l), v) in &entries {
                tree.insert(s, l, v);
                model.push((s, l, v));
            }
            check_all(&tree, &model);
            for (step, &i) in order.iter().enumerate() {
                let ((s, l), v) = entries[i];
                prop_assert!(tree.remove(s, l, v));
                remove_from_model(&mut model, (s, l, v));
                if step % 8 == 0 || model.len() < 16 {
                    check_all(&tree, &model);
                    for &(qs, ql) in &queries {
                        check_query(&tree, &model, qs, ql);
                    }
                }
                prop_assert!(
                    tree.blocks.capacity() <= 4
                        || tree.blocks.len() >= tree.blocks.capacity() / 4
                );
            }
            prop_assert!(tree.is_empty());
            prop_assert_eq!(tree.heap_bytes(), 0);
        }
    }

    // ------------------------------------------------------------------
    // Timing report (run with `cargo test --release -- --ignored --nocapture`).

    #[test]
    #[ignore = "timing report, run explicitly in release mode"]
    fn timing_report() {
        use std::time::Instant;

        /// xorshift64* — deterministic, dependency-free.
        struct Rng(u64);
        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
        }

        const N: u32 = 32_768;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let entries: Vec<(u64, u64, u32)> = (0..N)
            .map(|v| {
                let start = rng.next() >> 16; // 48-bit address space
                let len = rng.next() % (1 << 24); // up to 16 MiB
                (start, start + len, v)
            })
            .collect();

        let mut tree = HvaTree::new();
        let t0 = Instant::now();
        for &(s, l, v) in &entries {
            tree.insert(s, l, v);
        }
        let ins = t0.elapsed();

        let queries: Vec<u64> = (0..N).map(|_| rng.next() >> 16).collect();
        let t0 = Instant::now();
        let mut hits = 0usize;
        for &q in &queries {
            tree.for_each_overlap(q, q + 4095, |_, _, _| hits += 1);
        }
        let qry = t0.elapsed();

        let t0 = Instant::now();
        let mut wide_hits = 0usize;
        for &q in queries.iter().take(1024) {
            wide_hits += tree.overlaps(q, q.saturating_add(1 << 36)).count();
        }
        let wide = t0.elapsed();

        let bytes = tree.heap_bytes();
        let t0 = Instant::now();
        for &(s, l, v) in &entries {
            assert!(tree.remove(s, l, v));
        }
        let rem = t0.elapsed();
        assert!(tree.is_empty());

        let per = |d: std::time::Duration, n: u32| d.as_nanos() / u128::from(n);
        std::println!(
            "HvaTree n={N}: insert {} ns/op, remove {} ns/op, 4KiB overlap query {} ns/query \
             ({hits} hits total), 64GiB overlap query {} ns/query ({} hits avg), heap {} bytes \
             ({} B/entry)",
            per(ins, N),
            per(rem, N),
            per(qry, N),
            per(wide, 1024),
            wide_hits / 1024,
            bytes,
            bytes / entries.len(),
        );
    }
}
