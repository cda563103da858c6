//! The gfn-ordered index of one memslot set (KVM's `gfn_tree`).
//!
//! Slots never overlap inside an address space, so an ordered map from
//! `base_gfn` to a small entry is enough: a lookup finds the entry with the
//! greatest `base_gfn <= gfn` and checks it covers `gfn`.
//!
//! Layout: a two-level sorted structure ("sorted blocks"). A top array holds
//! the first key of every block, a parallel array the block pointers. A block
//! is one cache-line-aligned allocation: up to [`BLOCK_MAX`] sorted keys in a
//! fixed array (four cache lines, unused positions [`PAD`]ded with
//! `u64::MAX`), then the entries in a fixed array, then the length. A lookup is
//! - a branchless power-of-two-step search of the top array (8 KiB for 32k
//!   slots created in order, so it stays in L1/L2), unrolled so that every
//!   step is a conditional move and not a mispredicted branch, then the
//!   block pointer;
//! - a branchless count of the block's keys `<= gfn`: the first key of each
//!   line (independent loads), then the keys of the one line that holds
//!   the answer (the padding makes every block look full, so no length is
//!   loaded), at the block pointer itself: no vector header to go through;
//! - one entry load, at an address computed from the block pointer.
//!
//! That is two dependent trips to memory beyond the top arrays (key lines,
//! then the entry), where a `Vec`-per-block layout needs four (block header,
//! keys binary search, values header, entry).
//!
//! Updates are `O(log n + B + n/B)` element moves. A full block is split in
//! halves only when the new key falls inside it: a key after its last one goes
//! to the front of the next block if that has room, or, past the end of the
//! index, into a new block (so slots created in gfn order leave full blocks).
//! The last block taken out is kept, emptied, for the next new block, so a
//! slot moved past the end and back does not allocate. Range iteration is
//! `O(log n + k)`. Memory is proportional to the entries: a block costs
//! `~1.3 KiB` with 32-byte entries (`~42` bytes per entry when full), blocks
//! below a quarter full are merged into a neighbour that has room, there is
//! at most one spare block, and an emptied index holds nothing. Written by
//! hand because no crate offers this lookup-optimised shape with floor search
//! and in-place value replacement.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Keys per 64-byte cache line.
const LINE: usize = 8;
/// Cache lines of keys per block (`Block::floor_index` is written for
/// four lines of eight). Four (32 keys) rather than eight: lookups
/// are as fast (one more top step, one fewer block step) and updates move
/// half as many bytes.
const LINES: usize = 4;
/// Largest block; inserting into a full block splits it in two (or, past
/// either end of the index, starts a new block).
pub(crate) const BLOCK_MAX: usize = LINE * LINES;
/// Top arrays up to this many blocks are searched by unrolled steps.
const TOP_UNROLLED: usize = 1 << 12;
/// A block smaller than this is merged with its neighbour when possible.
const BLOCK_MIN: usize = BLOCK_MAX / 4;
/// Key of an unused position: not less than any key, so a search over the
/// whole key array finds the right entry for every `gfn` but `u64::MAX`
/// (special-cased).
const PAD: u64 = u64::MAX;

/// One block, one allocation: keys then entries, `vals[i]` for `keys[i]`.
#[derive(Clone)]
#[repr(C, align(64))]
struct Block<E> {
    /// Sorted keys in lines of [`LINE`], [`PAD`] from `len` on (cache-line
    /// aligned: first field of a 64-byte-aligned `repr(C)` struct).
    keys: [[u64; LINE]; LINES],
    /// `vals[..len]` are the entries. The rest are copies of some entry that
    /// was here (a safe stand-in for uninitialised memory, as `E: Copy`):
    /// never read, returned or dereferenced.
    vals: [E; BLOCK_MAX],
    /// Never 0 while the block is in the index.
    len: usize,
}

impl<E: Copy> Block<E> {
    fn new(key: u64, val: E) -> Box<Self> {
        let mut keys = [[PAD; LINE]; LINES];
        keys[0][0] = key;
        Box::new(Block { keys, vals: [val; BLOCK_MAX], len: 1 })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn keys(&self) -> &[u64] {
        self.keys.as_flattened()
    }

    fn keys_mut(&mut self) -> &mut [u64] {
        self.keys.as_flattened_mut()
    }

    fn key(&self, i: usize) -> u64 {
        self.keys()[i]
    }

    /// Index of the greatest key `<= gfn`; the first key must be `<= gfn`.
    #[inline(always)]
    fn floor_index(&self, gfn: u64) -> usize {
        if gfn == PAD {
            // Every padding key is `<= gfn` too.
            return self.len - 1;
        }
        // Two rounds of counting, not a binary search: first how many of the
        // lines after the first start with a key `<= gfn` (three loads
        // from three lines, independent of each other, so their cache
        // misses overlap), then how many keys after the first of that line
        // are `<= gfn` (one line). Keys ascend and the padding is never
        // `<= gfn`, so each count is the position of the last key `<= gfn`.
        // A binary search made up to five dependent loads from three lines:
        // at thousands of slots, where blocks are not in L1, one trip to
        // memory after another.
        const { assert!(LINES == 4 && LINE == 8) };
        let le = |k: u64| usize::from(k <= gfn);
        let k = &self.keys;
        let line = le(k[1][0]) + (le(k[2][0]) + le(k[3][0]));
        let r = &k[line];
        // Summed as a tree, not a chain of seven adds.
        let at = ((le(r[1]) + le(r[2])) + (le(r[3]) + le(r[4]))) + ((le(r[5]) + le(r[6])) + le(r[7]));
        line * LINE + at
    }

    /// Inserts at `i`; the block must not be full.
    fn insert_at(&mut self, i: usize, key: u64, val: E) {
        let n = self.len;
        let keys = self.keys_mut();
        keys.copy_within(i..n, i + 1);
        keys[i] = key;
        self.vals.copy_within(i..n, i + 1);
        self.vals[i] = val;
        self.len += 1;
    }

    fn remove_at(&mut self, i: usize) -> E {
        let n = self.len;
        let val = self.vals[i];
        let keys = self.keys_mut();
        keys.copy_within(i + 1..n, i);
        keys[n - 1] = PAD;
        self.vals.copy_within(i + 1..n, i);
        self.len -= 1;
        val
    }

    /// Moves the entries from `at` on into `into` (an empty block) or a new
    /// block.
    fn split_off(&mut self, at: usize, into: Option<Box<Self>>) -> Box<Self> {
        let n = self.len;
        // A new block's unused entries are copies of this block's.
        let mut right = into.unwrap_or_else(|| Box::new(Block { keys: [[PAD; LINE]; LINES], vals: self.vals, len: 0 }));
        right.keys_mut()[..n - at].copy_from_slice(&self.keys()[at..n]);
        right.vals[..n - at].copy_from_slice(&self.vals[at..n]);
        right.len = n - at;
        self.keys_mut()[at..n].fill(PAD);
        self.len = at;
        right
    }

    /// Appends all of `other`'s entries; they must fit and be greater.
    fn append(&mut self, other: &Self) {
        let (n, m) = (self.len, other.len);
        self.keys_mut()[n..n + m].copy_from_slice(&other.keys()[..m]);
        self.vals[n..n + m].copy_from_slice(&other.vals[..m]);
        self.len += m;
    }
}

/// Ordered map `base_gfn -> E` with floor search.
#[derive(Clone)]
pub(crate) struct GfnIndex<E> {
    /// `firsts[i] == blocks[i].keys[0][0]`, searched on its own: 8-byte
    /// elements are addressed without a shift on the search's critical path
    /// (measured ~13% faster lookups at 32k entries than `(first, block)`
    /// pairs, whose 16-byte stride costs a shift per step).
    firsts: Vec<u64>,
    /// In key order, never empty.
    blocks: Vec<Box<Block<E>>>,
    /// The last block taken out of the index (emptied or merged away), empty,
    /// for the next block to be created. Without it, moving a slot past the
    /// end and back (the last block full) would allocate, fill and free a
    /// block each time. One block at most, none when the index is empty.
    spare: Option<Box<Block<E>>>,
    len: usize,
}

impl<E: core::fmt::Debug> core::fmt::Debug for GfnIndex<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let entries = self.blocks.iter().flat_map(|b| b.keys.as_flattened().iter().zip(&b.vals).take(b.len));
        f.debug_map().entries(entries).finish()
    }
}

/// Position of an entry: (block, index in block).
type Pos = (usize, usize);

impl<E: Copy> GfnIndex<E> {
    pub(crate) const fn new() -> Self {
        GfnIndex { firsts: Vec::new(), blocks: Vec::new(), spare: None, len: 0 }
    }

    /// The last block whose first key is `<= gfn`.
    #[inline(always)]
    fn floor_block(&self, gfn: u64) -> Option<usize> {
        let top = &self.firsts[..];
        let n = top.len();
        if *top.first()? > gfn {
            return None;
        }
        // Power-of-two steps (Shar): the answer is in `[i, i + step)`, first
        // with the largest power of two `step <= n` (top[0] <= gfn, and
        // `n - step < step`).
        let mut step = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let mut i = if top[n - step] <= gfn { n - step } else { 0 };
        // More than 4096 blocks (over 64k entries): a loop, whose steps LLVM
        // may compile to (mispredicted) branches.
        while step > TOP_UNROLLED {
            step /= 2;
            if top[i + step] <= gfn {
                i += step;
            }
        }
        // Unrolled: the guards depend only on `n` (predicted), and each step
        // becomes a conditional move. In a loop, LLVM turns them
        // into branches that mispredict half the time (measured: twice as
        // slow at 32k entries).
        for k in (0..TOP_UNROLLED.trailing_zeros()).rev() {
            let s = 1usize << k;
            if s < step && top[i + s] <= gfn {
                i += s;
            }
        }
        Some(i)
    }

    /// Position of the entry with the greatest key `<= gfn`.
    #[inline]
    fn floor_pos(&self, gfn: u64) -> Option<Pos> {
        let b = self.floor_block(gfn)?;
        Some((b, self.blocks[b].floor_index(gfn)))
    }

    fn at(&self, (b, i): Pos) -> (u64, &E) {
        let block = &self.blocks[b];
        (block.key(i), &block.vals[i])
    }

    fn next_pos(&self, (b, i): Pos) -> Option<Pos> {
        if i + 1 < self.blocks[b].len() {
            Some((b, i + 1))
        } else if b + 1 < self.blocks.len() {
            Some((b + 1, 0))
        } else {
            None
        }
    }

    /// The entry with the greatest key `<= gfn`.
    #[inline]
    pub(crate) fn floor(&self, gfn: u64) -> Option<(u64, &E)> {
        let b = self.floor_block(gfn)?;
        let block = &self.blocks[b];
        let i = block.floor_index(gfn);
        Some((block.key(i), &block.vals[i]))
    }

    /// The entry with the least key `> gfn`.
    pub(crate) fn successor(&self, gfn: u64) -> Option<(u64, &E)> {
        let pos = match self.floor_pos(gfn) {
            Some(p) => self.next_pos(p),
            None if self.len > 0 => Some((0, 0)),
            None => None,
        };
        pos.map(|p| self.at(p))
    }

    /// The entry with the greatest key.
    pub(crate) fn last(&self) -> Option<(u64, &E)> {
        let b = self.blocks.len().checked_sub(1)?;
        Some(self.at((b, self.blocks[b].len() - 1)))
    }

    fn exact_pos(&self, key: u64) -> Option<Pos> {
        let p = self.floor_pos(key)?;
        (self.at(p).0 == key).then_some(p)
    }

    /// The entry with exactly this key.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut E> {
        let (b, i) = self.exact_pos(key)?;
        Some(&mut self.blocks[b].vals[i])
    }

    /// Inserts `key`, which must not be present (slots never share a base gfn
    /// inside one set). Returns false, changing nothing, if it is.
    pub(crate) fn insert(&mut self, key: u64, val: E) -> bool {
        if self.blocks.is_empty() {
            let block = self.new_block(key, val);
            self.firsts.push(key);
            self.blocks.push(block);
            self.len = 1;
            return true;
        }
        // The block with the greatest first key `<= key`, or block 0 (then
        // `i == 0`; `i > 0` in any other block).
        let mut b = self.floor_block(key).unwrap_or(0);
        let block = &self.blocks[b];
        let n = block.len();
        let mut i = block.keys()[..n].partition_point(|&k| k < key);
        if i < n && block.key(i) == key {
            return false;
        }
        self.len += 1;
        if n == BLOCK_MAX {
            if i == n && self.blocks.get(b + 1).is_some_and(|next| next.len() < BLOCK_MAX) {
                // Between two blocks, and the next one has room.
                b += 1;
                i = 0;
            } else if i == n && b + 1 == self.blocks.len() || i == 0 {
                // Past either end of the index: a new block, so that slots
                // created in gfn order (or in reverse) leave full blocks.
                let at = if i == 0 { 0 } else { b + 1 };
                let block = self.new_block(key, val);
                self.firsts.insert(at, key);
                self.blocks.insert(at, block);
                return true;
            } else {
                let half = BLOCK_MAX / 2;
                let right = self.blocks[b].split_off(half, self.spare.take());
                self.firsts.insert(b + 1, right.key(0));
                self.blocks.insert(b + 1, right);
                if i > half {
                    b += 1;
                    i -= half;
                }
            }
        }
        self.blocks[b].insert_at(i, key, val);
        if i == 0 {
            self.firsts[b] = key;
        }
        true
    }

    /// Removes `key`, returning its entry.
    pub(crate) fn remove(&mut self, key: u64) -> Option<E> {
        let (b, i) = self.exact_pos(key)?;
        let block = &mut self.blocks[b];
        let val = block.remove_at(i);
        self.len -= 1;
        if block.len() == 0 {
            let block = self.remove_block(b);
            self.retire(block);
            return Some(val);
        }
        let (first, len) = (block.key(0), block.len());
        if i == 0 {
            self.firsts[b] = first;
        }
        if len < BLOCK_MIN {
            self.merge_small(b);
        }
        Some(val)
    }

    /// Merges block `b` into a neighbour when the result fits in a block.
    fn merge_small(&mut self, b: usize) {
        let len = self.blocks[b].len();
        let fits = |j: usize| self.blocks[j].len() + len <= BLOCK_MAX;
        let left = if b + 1 < self.blocks.len() && fits(b + 1) {
            b
        } else if b > 0 && fits(b - 1) {
            b - 1
        } else {
            return;
        };
        let right = self.remove_block(left + 1);
        self.blocks[left].append(&right);
        self.retire(right);
    }

    /// A one-entry block, the spare if there is one.
    fn new_block(&mut self, key: u64, val: E) -> Box<Block<E>> {
        let Some(mut block) = self.spare.take() else {
            return Block::new(key, val);
        };
        block.keys[0][0] = key;
        block.vals[0] = val;
        block.len = 1;
        block
    }

    /// Keeps a block taken out of the index as the spare (emptied), unless
    /// the index is now empty.
    fn retire(&mut self, mut block: Box<Block<E>>) {
        if self.blocks.is_empty() {
            self.spare = None;
            return;
        }
        block.keys = [[PAD; LINE]; LINES];
        block.len = 0;
        self.spare = Some(block);
    }

    fn remove_block(&mut self, b: usize) -> Box<Block<E>> {
        self.firsts.remove(b);
        let block = self.blocks.remove(b);
        // Memory proportional to what is in use (amortised O(1): shrinking
        // at least halves), and nothing at all when empty.
        if self.blocks.is_empty() {
            self.firsts = Vec::new();
            self.blocks = Vec::new();
        } else if self.blocks.len() < self.blocks.capacity() / 4 {
            self.firsts.shrink_to(self.blocks.len() * 2);
            self.blocks.shrink_to(self.blocks.len() * 2);
        }
        block
    }

    /// Entries in key order, starting at the entry with the greatest key
    /// `<= gfn` (or the first entry if there is none).
    pub(crate) fn iter_from_floor(&self, gfn: u64) -> Iter<'_, E> {
        let pos = self.floor_pos(gfn).or(if self.len > 0 { Some((0, 0)) } else { None });
        Iter { index: self, pos }
    }

    /// All entries in key order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> Iter<'_, E> {
        Iter { index: self, pos: if self.len > 0 { Some((0, 0)) } else { None } }
    }

    /// Heap bytes held (capacities).
    /// The first key of every block, in order (for [`prefetch_block`](Self::prefetch_block)).
    pub(crate) fn firsts(&self) -> &[u64] {
        &self.firsts
    }

    /// Prefetches block `count - 1` (`count` from a search of
    /// [`firsts`](Self::firsts)); nothing if there is none.
    pub(crate) fn prefetch_block(&self, count: usize) {
        if let Some(block) = count.checked_sub(1).and_then(|b| self.blocks.get(b)) {
            let p: *const Block<E> = &**block;
            crate::prefetch::prefetch(p.cast(), core::mem::size_of::<Block<E>>());
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let top = self.firsts.capacity() * core::mem::size_of::<u64>()
            + self.blocks.capacity() * core::mem::size_of::<Box<Block<E>>>();
        let blocks = self.blocks.len() + usize::from(self.spare.is_some());
        top + blocks * core::mem::size_of::<Block<E>>()
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut n = 0;
        let mut prev: Option<u64> = None;
        assert_eq!(self.firsts.len(), self.blocks.len());
        for (f, b) in self.firsts.iter().zip(&self.blocks) {
            assert!(b.len() > 0 && b.len() <= BLOCK_MAX);
            assert_eq!(*f, b.key(0));
            for &k in &b.keys()[..b.len()] {
                assert!(prev.is_none_or(|p| p < k));
                prev = Some(k);
            }
            assert!(b.keys()[b.len()..].iter().all(|&k| k == PAD));
            n += b.len();
        }
        assert_eq!(n, self.len);
        if let Some(spare) = &self.spare {
            assert!(self.len > 0 && spare.len == 0 && spare.keys().iter().all(|&k| k == PAD));
        }
    }
}

/// Iterator over `(key, &entry)` in key order.
#[derive(Debug, Clone)]
pub(crate) struct Iter<'a, E> {
    index: &'a GfnIndex<E>,
    pos: Option<Pos>,
}

impl<'a, E: Copy> Iterator for Iter<'a, E> {
    type Item = (u64, &'a E);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let pos = self.pos?;
        self.pos = self.index.next_pos(pos);
        Some(self.index.at(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    /// Checks every query against the model at `probe`.
    fn check_queries(idx: &GfnIndex<u32>, model: &BTreeMap<u64, u32>, probe: u64) -> Result<(), TestCaseError> {
        let want = model.range(..=probe).next_back().map(|(k, v)| (*k, *v));
        prop_assert_eq!(idx.floor(probe).map(|(k, v)| (k, *v)), want);
        let succ = probe.checked_add(1).and_then(|p| model.range(p..).next()).map(|(k, v)| (*k, *v));
        prop_assert_eq!(idx.successor(probe).map(|(k, v)| (k, *v)), succ);
        let from = want.map_or(0, |(k, _)| k);
        let iter: Vec<_> = idx.iter_from_floor(probe).take(40).map(|(k, v)| (k, *v)).collect();
        let iter_want: Vec<_> = model.range(from..).take(40).map(|(k, v)| (*k, *v)).collect();
        prop_assert_eq!(iter, iter_want);
        Ok(())
    }

    /// Applies `ops` to an index and a model, checking after every one.
    fn run_ops(ops: Vec<(bool, u64, u32)>, probe_of: impl Fn(u64) -> u64) -> Result<(), TestCaseError> {
        let mut idx = GfnIndex::new();
        let mut model = BTreeMap::new();
        for (ins, key, val) in ops {
            if ins {
                let fresh = !model.contains_key(&key);
                prop_assert_eq!(idx.insert(key, val), fresh);
                model.entry(key).or_insert(val);
            } else if val % 4 == 0 {
                let got = idx.get_mut(key).map(|v| {
                    *v = v.wrapping_add(1);
                    *v
                });
                let want = model.get_mut(&key).map(|v| {
                    *v = v.wrapping_add(1);
                    *v
                });
                prop_assert_eq!(got, want);
            } else {
                prop_assert_eq!(idx.remove(key), model.remove(&key));
            }
            idx.check_invariants();
            check_queries(&idx, &model, probe_of(key))?;
            check_queries(&idx, &model, key)?;
        }
        let all: Vec<_> = idx.iter().map(|(k, v)| (k, *v)).collect();
        let want: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
        prop_assert_eq!(all, want);
        prop_assert_eq!(idx.last().map(|(k, v)| (k, *v)), model.iter().next_back().map(|(k, v)| (*k, *v)));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_btreemap(ops in proptest::collection::vec((any::<bool>(), 0u64..600, any::<u32>()), 1..1500)) {
            run_ops(ops, |key| key.wrapping_mul(7) % 650)?;
        }

        /// Keys at the top of the range: `u64::MAX` is also the padding key.
        #[test]
        fn matches_btreemap_near_max(
            ops in proptest::collection::vec(
                (any::<bool>(), prop_oneof![0u64..100, (u64::MAX - 100)..=u64::MAX], any::<u32>()),
                1..800,
            )
        ) {
            run_ops(ops, |key| if key % 3 == 0 { u64::MAX } else { key.wrapping_add(key % 5).wrapping_sub(2) })?;
        }
    }

    /// Ascending and descending builds (the new-block paths), then removals
    /// that merge blocks, checking every key and its neighbours.
    #[test]
    fn ordered_builds_fill_blocks_and_merge() {
        for descending in [false, true] {
            let n = 20 * BLOCK_MAX as u64 + 3;
            let keys: Vec<u64> = (0..n).map(|k| 10 + 4 * k).collect();
            let mut idx = GfnIndex::new();
            let mut model = BTreeMap::new();
            for (j, &k) in keys.iter().enumerate() {
                let k = if descending { keys[keys.len() - 1 - j] } else { k };
                let v = u32::try_from(k).unwrap();
                assert!(idx.insert(k, v));
                model.insert(k, v);
                idx.check_invariants();
            }
            // In-order creation leaves every block but one at an end full.
            let full = idx.blocks.iter().filter(|b| b.len() == BLOCK_MAX).count();
            assert_eq!(full, idx.blocks.len() - 1, "descending: {descending}");
            let all_queries = |idx: &GfnIndex<u32>, model: &BTreeMap<u64, u32>| {
                for &k in &keys {
                    for p in [k - 1, k, k + 1] {
                        check_queries(idx, model, p).unwrap();
                    }
                }
                check_queries(idx, model, 0).unwrap();
                check_queries(idx, model, u64::MAX).unwrap();
            };
            all_queries(&idx, &model);
            // Remove seven keys in eight: blocks shrink below BLOCK_MIN and merge.
            let blocks = idx.blocks.len();
            for &k in keys.iter().filter(|&&k| k % 32 != 10) {
                assert_eq!(idx.remove(k), model.remove(&k));
                idx.check_invariants();
            }
            assert!(
                idx.blocks.len() <= model.len().div_ceil(BLOCK_MIN),
                "{} blocks before, {} after",
                blocks,
                idx.blocks.len()
            );
            all_queries(&idx, &model);
            let all: Vec<_> = idx.iter().map(|(k, v)| (k, *v)).collect();
            assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }

    /// Updates at block boundaries on full blocks (a slot moved past the end
    /// and back, the first slot of a block deleted and created again) neither
    /// split blocks nor allocate.
    #[test]
    fn boundary_updates_keep_blocks_full() {
        let n = 8 * BLOCK_MAX as u64;
        let mut idx = GfnIndex::new();
        for k in 0..n {
            idx.insert(k * 10, k);
        }
        let blocks = idx.blocks.len();
        assert_eq!(blocks, 8);
        let mut bytes = None;
        for round in 0..3 {
            for k in 0..n {
                // Past the end (a new block, the spare after the first time) and back.
                let v = idx.remove(k * 10).unwrap();
                assert!(idx.insert(n * 10 + k, v));
                idx.check_invariants();
                assert_eq!(idx.remove(n * 10 + k), Some(v));
                // The first key of a block lands at the end of the previous one.
                assert!(idx.insert(k * 10, v));
                idx.check_invariants();
                assert_eq!(idx.floor(k * 10 + 5).map(|(b, v)| (b, *v)), Some((k * 10, k)));
            }
            assert_eq!(idx.blocks.len(), blocks, "round {round}");
            assert!(idx.blocks.iter().all(|b| b.len() == BLOCK_MAX));
            // Nothing allocated after the first round (the spare is reused).
            assert_eq!(*bytes.get_or_insert(idx.heap_bytes()), idx.heap_bytes());
            assert!(idx.spare.is_some());
        }
        for k in 0..n {
            assert_eq!(idx.remove(k * 10), Some(k));
        }
        assert_eq!(idx.heap_bytes(), 0);
        assert!(idx.spare.is_none());
    }

    #[test]
    fn empty_releases_memory() {
        let mut idx = GfnIndex::new();
        for k in 0..1000u64 {
            idx.insert(k, k);
        }
        for k in 0..1000u64 {
            assert_eq!(idx.remove(k), Some(k));
        }
        assert_eq!(idx.heap_bytes(), 0);
        assert!(idx.floor(5).is_none());
    }
}
