//! Augmented interval tree over inclusive `[start, last]` `u64` ranges.
//!
//! This mirrors the kernel's `interval_tree` (`include/linux/interval_tree.h`)
//! that KVM uses to index memslots by host virtual address: entries may
//! overlap arbitrarily and may even be identical except for their value.
//!
//! # Structure
//!
//! * **Arena.** All nodes live in one `Vec<Node<V>>` and refer to each other
//!   by `u32` index, with [`NIL`] (`u32::MAX`) as the "no node" sentinel.
//!   Freed slots form an intrusive free list (linked through `left`) and are
//!   reused by later inserts, so the arena never holds more slots than the
//!   high-water mark of live entries. When the tree becomes empty the arena
//!   is released entirely (`Vec::new()`); when the number of live entries
//!   drops below a quarter of the arena capacity the live entries are
//!   repacked into a fresh, perfectly balanced arena of twice their number.
//!   Both keep memory proportional to the number of live entries, and the
//!   repacking is amortised O(1) per removal.
//! * **AVL balancing.** The tree is an AVL tree ordered by `(start, last)`;
//!   entries with equal `(start, last)` keep their insertion order (new
//!   entries go to the right of equal keys, and rotations preserve in-order
//!   sequence). AVL is deterministic (no RNG) and keeps the height below
//!   `1.44 * log2(n + 2)`, which bounds every recursion and every iterator
//!   stack: with `u32` indices the height can never exceed 45.
//! * **Augmentation.** Every node stores `max_last`, the largest `last` in
//!   its subtree, maintained on every structural change (insert, delete,
//!   rotation).
//!
//! # Queries
//!
//! An overlap query for `[qs, ql]` is an in-order walk that skips every
//! subtree whose `max_last < qs` (nothing in it can reach the query) and
//! never goes right of a node whose `start > ql` (everything there starts
//! after the query ends). Results therefore come out in ascending `start`
//! order (ties in `(start, last, insertion)` order). The walk costs
//! `O(log n + k)` when the `k` matches are contiguous in start order (the
//! common case for memslots, whose hva ranges rarely overlap), and
//! `O(log n + k * log(n / k))` in the worst case when matches are scattered
//! between non-matching entries; this is the same bound as the kernel's
//! `interval_tree_iter_first`/`_next`.
//!
//! Removal identifies an entry by `(start, last, value)`. Finding it costs
//! `O(log n + d)` where `d` is the number of entries sharing `(start, last)`.

use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt;
use core::iter::FusedIterator;

/// Sentinel index meaning "no node".
const NIL: u32 = u32::MAX;

/// Capacity of the explicit stack used by [`Overlaps`].
///
/// An AVL tree of height `h` has at least `F(h + 2) - 1` nodes (`F` being
/// the Fibonacci numbers). Since `F(47) - 1 > 2^32 - 1` exceeds the number
/// of indices the arena can hand out, the height of any tree is at most 45
/// and an in-order walk never has more than 45 pending ancestors. 64 leaves
/// ample slack.
const MAX_HEIGHT: usize = 64;

/// Arena capacity (in nodes) below which the arena is never repacked.
const MIN_SHRINK_CAPACITY: usize = 32;

/// Converts an arena index to a `usize` for slice indexing.
#[inline]
#[allow(clippy::cast_possible_truncation)]
const fn idx(i: u32) -> usize {
    // Lossless: every supported target has a `usize` of at least 32 bits.
    i as usize
}

/// One arena slot: either a live tree node or a free-list entry.
#[derive(Clone, Copy, Debug)]
struct Node<V> {
    /// First address of the interval (inclusive).
    start: u64,
    /// Last address of the interval (inclusive).
    last: u64,
    /// Largest `last` in the subtree rooted here.
    max_last: u64,
    /// Left child; for free slots, the next free slot.
    left: u32,
    /// Right child.
    right: u32,
    /// AVL height of the subtree rooted here (a leaf has height 1).
    height: u8,
    /// Payload.
    value: V,
}

impl<V> Node<V> {
    /// A fresh leaf node.
    const fn leaf(start: u64, last: u64, value: V) -> Self {
        Self { start, last, max_last: last, left: NIL, right: NIL, height: 1, value }
    }
}

/// An interval tree over inclusive `[start, last]` u64 ranges carrying a `Copy` value.
///
/// See the [module documentation](self) for the structure and complexity.
#[derive(Clone)]
pub(crate) struct HvaTree<V> {
    /// Arena of nodes; live nodes are reachable from `root`, the rest are on
    /// the free list.
    nodes: Vec<Node<V>>,
    /// Root of the AVL tree, or [`NIL`] when empty.
    root: u32,
    /// Head of the free list (linked through `Node::left`), or [`NIL`].
    free: u32,
    /// Number of live entries.
    len: usize,
}

impl<V: Copy + Eq> Default for HvaTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Copy + Eq + fmt::Debug> fmt::Debug for HvaTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(s, l, v)| (s..=l, v))).finish()
    }
}

impl<V: Copy + Eq> HvaTree<V> {
    /// Creates an empty tree. Does not allocate.
    pub(crate) const fn new() -> Self {
        Self { nodes: Vec::new(), root: NIL, free: NIL, len: 0 }
    }

    /// Number of entries in the tree.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree has no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts `[start, last]` with `value` in `O(log n)`.
    ///
    /// The caller guarantees `start <= last` (the tree stays internally
    /// consistent even if not, but such an entry only matches queries that
    /// satisfy `entry.start <= q.last && entry.last >= q.start`). Entries
    /// with the same `(start, last)`, with or without the same value, are
    /// allowed and are kept in insertion order.
    ///
    /// # Panics
    ///
    /// Only if the arena would need more than `u32::MAX - 1` slots, i.e.
    /// after more than four billion simultaneously live entries.
    pub(crate) fn insert(&mut self, start: u64, last: u64, value: V) {
        let new = self.alloc(Node::leaf(start, last, value));
        self.root = self.insert_at(self.root, new);
        self.len += 1;
    }

    /// Removes the entry equal in start, last AND value; returns whether one was found.
    ///
    /// If several identical entries exist, exactly one of them is removed.
    /// Costs `O(log n + d)` where `d` is the number of entries with the same
    /// `(start, last)`.
    pub(crate) fn remove(&mut self, start: u64, last: u64, value: V) -> bool {
        match self.remove_at(self.root, (start, last), value) {
            Some(root) => {
                self.root = root;
                self.len -= 1;
                self.after_remove();
                true
            }
            None => false,
        }
    }

    /// Calls `f(start, last, value)` for every entry intersecting `[start, last]`
    /// (inclusive both), in ascending `start` order.
    ///
    /// An entry `e` intersects the query iff `e.start <= last && e.last >= start`.
    /// Costs `O(log n + k)` for `k` matches that are contiguous in start
    /// order, `O(log n + k log(n / k))` in the worst case (see the module docs).
    pub(crate) fn for_each_overlap(&self, start: u64, last: u64, mut f: impl FnMut(u64, u64, V)) {
        for (s, l, v) in self.overlaps(start, last) {
            f(s, l, v);
        }
    }

    /// Iterator over every entry intersecting `[start, last]` (inclusive both),
    /// in ascending `start` order; same semantics as [`Self::for_each_overlap`].
    ///
    /// Uses a fixed-size explicit stack: no recursion, no allocation.
    pub(crate) fn overlaps(&self, start: u64, last: u64) -> Overlaps<'_, V> {
        let mut it = Overlaps { nodes: &self.nodes, stack: [NIL; MAX_HEIGHT], depth: 0, start, last };
        it.push_left(self.root);
        it
    }

    /// All entries as `(start, last, value)`, in ascending `(start, last)`
    /// order (insertion order among equal `(start, last)`).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        self.overlaps(0, u64::MAX)
    }

    /// Bytes of heap memory held (capacity-based), for a memory report.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.capacity().saturating_mul(core::mem::size_of::<Node<V>>())
    }

    // ----------------------------------------------------------------------
    // Arena management.

    /// Stores `node` in a free slot (or a new one) and returns its index.
    fn alloc(&mut self, node: Node<V>) -> u32 {
        if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[idx(i)].left;
            self.nodes[idx(i)] = node;
            i
        } else {
            // A memslot set holds at most 32767 slots, far below u32::MAX.
            #[allow(clippy::expect_used)]
            let i = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("HvaTree: more than u32::MAX - 1 live entries");
            self.nodes.push(node);
            i
        }
    }

    /// Puts slot `i` (already unlinked from the tree) on the free list.
    fn release(&mut self, i: u32) {
        let free = self.free;
        let node = &mut self.nodes[idx(i)];
        node.left = free;
        node.right = NIL;
        node.height = 0;
        self.free = i;
    }

    /// Keeps memory proportional to `len` after a removal.
    fn after_remove(&mut self) {
        if self.len == 0 {
            self.nodes = Vec::new();
            self.root = NIL;
            self.free = NIL;
        } else if self.nodes.capacity() >= MIN_SHRINK_CAPACITY && self.len < self.nodes.capacity() / 4 {
            self.repack();
        }
    }

    /// Moves all live entries into a fresh arena of capacity `2 * len`,
    /// rebuilt as a perfectly balanced tree (a valid AVL tree), with an empty
    /// free list. `O(n)`.
    fn repack(&mut self) {
        let mut nodes = Vec::with_capacity(self.len.saturating_mul(2));
        nodes.extend(self.iter().map(|(s, l, v)| Node::leaf(s, l, v)));
        self.nodes = nodes;
        self.free = NIL;
        // `len` is below the previous arena length, whose indices all fit in u32.
        // len <= arena size, which insert() keeps below u32::MAX.
        #[allow(clippy::expect_used)]
        let n = u32::try_from(self.len).expect("HvaTree: len fits in u32");
        self.root = self.build(0, n);
    }

    /// Links the (in-order) slots `lo..hi` into a balanced subtree and
    /// returns its root. Recursion depth is `log2(hi - lo) + 1`.
    fn build(&mut self, lo: u32, hi: u32) -> u32 {
        if lo >= hi {
            return NIL;
        }
        let mid = lo + (hi - lo) / 2;
        let left = self.build(lo, mid);
        let right = self.build(mid + 1, hi);
        let node = &mut self.nodes[idx(mid)];
        node.left = left;
        node.right = right;
        self.update(mid);
        mid
    }

    // ----------------------------------------------------------------------
    // AVL primitives.

    /// Height of subtree `i` (0 for [`NIL`]).
    fn height(&self, i: u32) -> u8 {
        if i == NIL {
            0
        } else {
            self.nodes[idx(i)].height
        }
    }

    /// `max_last` of subtree `i` (0, the neutral element of `max`, for [`NIL`]).
    fn max_last(&self, i: u32) -> u64 {
        if i == NIL {
            0
        } else {
            self.nodes[idx(i)].max_last
        }
    }

    /// Recomputes `height` and `max_last` of `i` from its children.
    fn update(&mut self, i: u32) {
        let Node { left, right, last, .. } = self.nodes[idx(i)];
        // Heights are at most 45 (see MAX_HEIGHT), so `+ 1` cannot overflow.
        let height = self.height(left).max(self.height(right)) + 1;
        let max_last = last.max(self.max_last(left)).max(self.max_last(right));
        let node = &mut self.nodes[idx(i)];
        node.height = height;
        node.max_last = max_last;
    }

    /// Rotates subtree `y` right; returns the new subtree root.
    fn rotate_right(&mut self, y: u32) -> u32 {
        let x = self.nodes[idx(y)].left;
        self.nodes[idx(y)].left = self.nodes[idx(x)].right;
        self.nodes[idx(x)].right = y;
        self.update(y);
        self.update(x);
        x
    }

    /// Rotates subtree `x` left; returns the new subtree root.
    fn rotate_left(&mut self, x: u32) -> u32 {
        let y = self.nodes[idx(x)].right;
        self.nodes[idx(x)].right = self.nodes[idx(y)].left;
        self.nodes[idx(y)].left = x;
        self.update(x);
        self.update(y);
        y
    }

    /// Updates `i` and restores the AVL property at `i`, assuming both of
    /// its subtrees are valid AVL trees whose heights differ by at most 2.
    /// Returns the new subtree root.
    fn balance(&mut self, i: u32) -> u32 {
        self.update(i);
        let Node { left, right, .. } = self.nodes[idx(i)];
        let hl = self.height(left);
        let hr = self.height(right);
        if hl > hr + 1 {
            let Node { left: ll, right: lr, .. } = self.nodes[idx(left)];
            if self.height(ll) < self.height(lr) {
                self.nodes[idx(i)].left = self.rotate_left(left);
            }
            self.rotate_right(i)
        } else if hr > hl + 1 {
            let Node { left: rl, right: rr, .. } = self.nodes[idx(right)];
            if self.height(rr) < self.height(rl) {
                self.nodes[idx(i)].right = self.rotate_right(right);
            }
            self.rotate_left(i)
        } else {
            i
        }
    }

    /// Inserts the detached leaf `new` into subtree `i`; returns the new root.
    fn insert_at(&mut self, i: u32, new: u32) -> u32 {
        if i == NIL {
            return new;
        }
        let n = self.nodes[idx(i)];
        let k = self.nodes[idx(new)];
        if (k.start, k.last) < (n.start, n.last) {
            self.nodes[idx(i)].left = self.insert_at(n.left, new);
        } else {
            self.nodes[idx(i)].right = self.insert_at(n.right, new);
        }
        self.balance(i)
    }

    /// Removes one entry equal to `(key, value)` from subtree `i`.
    /// Returns the new subtree root, or `None` (subtree untouched) if absent.
    fn remove_at(&mut self, i: u32, key: (u64, u64), value: V) -> Option<u32> {
        if i == NIL {
            return None;
        }
        let n = self.nodes[idx(i)];
        match key.cmp(&(n.start, n.last)) {
            Ordering::Less => {
                self.nodes[idx(i)].left = self.remove_at(n.left, key, value)?;
            }
            Ordering::Greater => {
                self.nodes[idx(i)].right = self.remove_at(n.right, key, value)?;
            }
            Ordering::Equal if n.value == value => return Some(self.delete(i)),
            // Equal keys may sit on either side of `i` after rotations.
            Ordering::Equal => {
                if let Some(left) = self.remove_at(n.left, key, value) {
                    self.nodes[idx(i)].left = left;
                } else {
                    self.nodes[idx(i)].right = self.remove_at(n.right, key, value)?;
                }
            }
        }
        Some(self.balance(i))
    }

    /// Unlinks node `i` from its subtree and frees it; returns the new
    /// subtree root.
    fn delete(&mut self, i: u32) -> u32 {
        let Node { left, right, .. } = self.nodes[idx(i)];
        if left == NIL {
            self.release(i);
            right
        } else if right == NIL {
            self.release(i);
            left
        } else {
            // Replace i's payload with its in-order successor's and free the
            // successor's slot instead.
            let (new_right, succ) = self.remove_min(right);
            let Node { start, last, value, .. } = self.nodes[idx(succ)];
            self.release(succ);
            let node = &mut self.nodes[idx(i)];
            node.start = start;
            node.last = last;
            node.value = value;
            node.right = new_right;
            self.balance(i)
        }
    }

    /// Detaches the leftmost node of non-empty subtree `i`.
    /// Returns `(new subtree root, detached node)`.
    fn remove_min(&mut self, i: u32) -> (u32, u32) {
        let Node { left, right, .. } = self.nodes[idx(i)];
        if left == NIL {
            return (right, i);
        }
        let (new_left, min) = self.remove_min(left);
        self.nodes[idx(i)].left = new_left;
        (self.balance(i), min)
    }
}

/// Iterator over the entries of an [`HvaTree`] intersecting a query range,
/// in ascending `start` order. Created by [`HvaTree::overlaps`].
///
/// Yields `(start, last, value)`. Holds a fixed-size stack; never allocates.
#[derive(Clone)]
pub(crate) struct Overlaps<'a, V> {
    /// The tree's arena.
    nodes: &'a [Node<V>],
    /// Pending nodes (all intersect-candidates with `start <= last`), whose
    /// left subtrees have already been handled; top at `depth - 1`.
    stack: [u32; MAX_HEIGHT],
    /// Number of live entries in `stack`.
    depth: usize,
    /// Query start (inclusive).
    start: u64,
    /// Query last (inclusive).
    last: u64,
}

impl<V> Overlaps<'_, V> {
    /// Pushes the leftmost path of subtree `i`, pruning subtrees that end
    /// before the query and not pushing nodes that start after it (whose
    /// right subtrees then cannot match either).
    fn push_left(&mut self, mut i: u32) {
        while i != NIL {
            let n = &self.nodes[idx(i)];
            if n.max_last < self.start {
                return;
            }
            if n.start <= self.last {
                // At most one node per tree level is ever pending, and the
                // height never exceeds 45 < MAX_HEIGHT (see its docs).
                self.stack[self.depth] = i;
                self.depth += 1;
            }
            i = n.left;
        }
    }
}

impl<V: Copy> Iterator for Overlaps<'_, V> {
    type Item = (u64, u64, V);

    fn next(&mut self) -> Option<Self::Item> {
        while self.depth > 0 {
            self.depth -= 1;
            let n = self.nodes[idx(self.stack[self.depth])];
            self.push_left(n.right);
            if n.last >= self.start {
                return Some((n.start, n.last, n.value));
            }
        }
        None
    }
}

impl<V: Copy> FusedIterator for Overlaps<'_, V> {}

#[cfg(test)]
impl<V: Copy + Eq> HvaTree<V> {
    /// Asserts every structural invariant: BST order, AVL heights and
    /// balance, `max_last`, `len`, free-list accounting, empty arena when
    /// empty, and the stack bound used by [`Overlaps`].
    fn check_invariants(&self) {
        let mut count = 0;
        let height = self.check_subtree(self.root, &mut count);
        assert_eq!(count, self.len, "len mismatch");
        assert!(usize::from(height) < MAX_HEIGHT);

        let mut free = 0;
        let mut f = self.free;
        while f != NIL {
            free += 1;
            assert!(free <= self.nodes.len(), "free list cycle");
            assert_eq!(self.nodes[idx(f)].height, 0, "free slot marked live");
            f = self.nodes[idx(f)].left;
        }
        assert_eq!(count + free, self.nodes.len(), "leaked arena slots");

        if self.len == 0 {
            assert_eq!(self.root, NIL);
            assert_eq!(self.nodes.capacity(), 0, "empty tree holds memory");
        }

        // In-order walk (via the iterator) is sorted by (start, last).
        let keys: Vec<(u64, u64)> = self.iter().map(|(s, l, _)| (s, l)).collect();
        assert_eq!(keys.len(), self.len);
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "BST order broken");
    }

    /// Checks subtree `i`, adds its node count to `count`, returns its height.
    fn check_subtree(&self, i: u32, count: &mut usize) -> u8 {
        if i == NIL {
            return 0;
        }
        *count += 1;
        assert!(*count <= self.nodes.len(), "cycle in tree");
        let n = self.nodes[idx(i)];
        let hl = self.check_subtree(n.left, count);
        let hr = self.check_subtree(n.right, count);
        assert!(hl.abs_diff(hr) <= 1, "AVL balance violated");
        assert_eq!(n.height, hl.max(hr) + 1, "stale height");
        let expect = n.last.max(self.max_last(n.left)).max(self.max_last(n.right));
        assert_eq!(n.max_last, expect, "stale max_last");
        n.height
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
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "not in ascending start order: {a:?}");
        assert_eq!(sorted(a), naive(model, start, last), "query [{start}, {last}]");
    }

    /// Checks len, iter and invariants against the model.
    fn check_all(tree: &HvaTree<u8>, model: &[Entry]) {
        tree.check_invariants();
        assert_eq!(tree.len(), model.len());
        assert_eq!(tree.is_empty(), model.is_empty());
        let all: Vec<Entry> = tree.iter().collect();
        assert!(all.windows(2).all(|w| (w[0].0, w[0].1) <= (w[1].0, w[1].1)));
        assert_eq!(sorted(all), sorted(model.to_vec()));
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
        // Insertion order is kept among equal keys.
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
        let mut t = HvaTree::new();
        for i in 0..4096u64 {
            t.insert(i * 16, i * 16 + 15, 0u32);
        }
        let full = t.heap_bytes();
        assert!(full >= 4096 * core::mem::size_of::<Node<u32>>());
        // Free slots are reused: churn does not grow the arena.
        for i in 0..4096u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 0));
            t.insert(i * 16, i * 16 + 15, 1);
        }
        assert_eq!(t.heap_bytes(), full);
        for i in 0..4000u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 1));
        }
        t.check_invariants();
        assert_eq!(t.len(), 96);
        assert!(t.heap_bytes() <= 4 * 96 * core::mem::size_of::<Node<u32>>());
        for i in 4000..4096u64 {
            assert!(t.remove(i * 16, i * 16 + 15, 1));
            t.check_invariants();
        }
        assert_eq!(t.heap_bytes(), 0);
    }

    #[test]
    fn sequential_inserts_stay_balanced() {
        let mut t = HvaTree::new();
        for i in 0..10_000u64 {
            t.insert(i, i, 0u8);
        }
        t.check_invariants();
        // AVL bound: height <= 1.44 log2(n + 2).
        assert!(t.height(t.root) <= 20);
        for i in (0..10_000u64).rev().step_by(2) {
            assert!(t.remove(i, i, 0));
        }
        t.check_invariants();
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
                    tree.nodes.capacity() < MIN_SHRINK_CAPACITY
                        || tree.len() >= tree.nodes.capacity() / 4
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
