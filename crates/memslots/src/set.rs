//! One memslot set (KVM's `struct kvm_memslots`): a gfn index, an hva interval
//! tree, an id map and a last-used-slot cache over slots it shares with the
//! other set of its address space.
//!
//! # Two layouts (seed 002: memory proportional to the slots in use)
//!
//! Most VMs have a handful of slots. For them ([`SMALL_MAX`] slots or fewer)
//! a set is two exactly sized arrays in gfn order, the base gfns and the
//! slots' `Arc`s: 16 bytes per slot, nothing else. A lookup is a branchless
//! search of the base gfns and one load of the slot; the id and hva queries
//! scan the (at most [`SMALL_MAX`]) slots. Above [`SMALL_MAX`] slots a set
//! switches to the indexed layout: the gfn index (`gfn_index.rs`, 32-entry
//! blocks), the hva tree (`hva_tree.rs`) and an id map (`id_map.rs`), `O(log n)` for
//! everything and ~70–95 bytes per slot and set. It switches back when it
//! shrinks to [`SMALL_MAX`]` / 2` slots (the gap keeps a VM creating and
//! deleting one slot at the boundary from rebuilding every time); each
//! switch is an `O(n)` rebuild, paid at most once per `SMALL_MAX / 2`
//! updates.

use crate::gfn_index::GfnIndex;
use crate::hva_tree::HvaTree;
use crate::id_map::IdMap;
use crate::slot::MemorySlot;
use crate::sync::{AtomicPtr, Ordering};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;

/// Largest set kept in the small layout.
pub(crate) const SMALL_MAX: usize = 32;

/// Sets with fewer slots skip [`MemslotSet::prefetch_change`]: both sets'
/// indexes (~70 bytes per slot each) then stay in the core's L2 between
/// updates, and the pass costs more than it saves when they are cached
/// (measured warm: +36 ns on a 205 ns delete at 256 slots, +32 ns at 4096,
/// where the harness's cold deletes gain ~500 ns).
const PREFETCH_MIN: usize = 1024;
/// An indexed set that shrinks to this many slots goes back to the small layout.
const SMALL_AGAIN: usize = SMALL_MAX / 2;

/// What a gfn lookup returns: the fields a translation needs (in the indexed
/// layout stored in the gfn index itself, so a lookup does not have to touch
/// the slot) and the slot.
#[derive(Debug)]
pub(crate) struct GfnEntry<D> {
    pub(crate) npages: u64,
    pub(crate) hva: u64,
    pub(crate) flags: u32,
    pub(crate) slot: NonNull<MemorySlot<D>>,
}

impl<D> Clone for GfnEntry<D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D> Copy for GfnEntry<D> {}

/// The small layout: `keys[i] == slots[i].base_gfn`, ascending; both
/// exactly sized.
struct Small<D> {
    keys: Vec<u64>,
    slots: Vec<Arc<MemorySlot<D>>>,
}

/// The indexed layout.
///
/// The hva tree stores slot *ids*, not pointers: a slot's id, host range and
/// size never change while it exists, so replacing a slot by its INVALID
/// copy, its moved or re-flagged version leaves the tree untouched (no
/// O(log n) search with a cache miss per level on every update). An hva
/// lookup pays one id-map probe per hit instead.
struct Large<D> {
    by_id: IdMap<Arc<MemorySlot<D>>>,
    by_gfn: GfnIndex<GfnEntry<D>>,
    by_hva: HvaTree<u16>,
}

enum Layout<D> {
    Small(Small<D>),
    Large(Box<Large<D>>),
}

/// One memslot set.
///
/// Invariant: every pointer in the layout and in `last_used` points to a
/// slot whose `Arc` is held by this same set (`Small::slots` or
/// `Large::by_id`), and every id in `by_hva` is a key of `by_id` whose slot
/// has that host range.
pub(crate) struct MemslotSet<D> {
    layout: Layout<D>,
    last_used: AtomicPtr<MemorySlot<D>>,
}

// SAFETY: the raw pointers only point into `Arc<MemorySlot<D>>`s owned by the
// set itself (see the invariant), so the set is as thread-safe as those Arcs.
unsafe impl<D: Send + Sync> Send for MemslotSet<D> {}
// SAFETY: shared access only reads the layout and does atomic accesses to
// `last_used`; slots are immutable and `D: Sync`.
unsafe impl<D: Send + Sync> Sync for MemslotSet<D> {}

impl<D> core::fmt::Debug for MemslotSet<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemslotSet").field("slots", &self.len()).finish_non_exhaustive()
    }
}

fn ptr<D>(slot: &Arc<MemorySlot<D>>) -> NonNull<MemorySlot<D>> {
    NonNull::from(&**slot)
}

#[inline]
fn entry_of<D>(slot: &MemorySlot<D>) -> GfnEntry<D> {
    GfnEntry { npages: slot.npages, hva: slot.userspace_addr, flags: slot.flags, slot: NonNull::from(slot) }
}

fn entry<D>(slot: &Arc<MemorySlot<D>>) -> GfnEntry<D> {
    entry_of(slot)
}

impl<D> Small<D> {
    const fn new() -> Self {
        Small { keys: Vec::new(), slots: Vec::new() }
    }

    /// Index of the greatest key `<= gfn`, if any: a branchless search (each
    /// step a conditional move; the loop count depends only on the length).
    #[inline(always)]
    fn floor(&self, gfn: u64) -> Option<usize> {
        let k = &self.keys[..];
        if k.first().is_none_or(|&f| f > gfn) {
            return None;
        }
        let (mut base, mut len) = (0usize, k.len());
        while len > 1 {
            let half = len / 2;
            // `base + half < k.len()`: `base + len <= k.len()` throughout. A
            // conditional move, not a branch (random gfns would mispredict
            // half the steps: measured 2x slower at 10 slots).
            base = core::hint::select_unpredictable(k[base + half] <= gfn, base + half, base);
            len -= half;
        }
        Some(base)
    }

    /// Position of `slot` (by its base gfn, unique in a set).
    fn position(&self, slot: &Arc<MemorySlot<D>>) -> Option<usize> {
        let i = self.floor(slot.base_gfn)?;
        Arc::ptr_eq(&self.slots[i], slot).then_some(i)
    }

    fn insert(&mut self, slot: &Arc<MemorySlot<D>>) {
        let i = self.keys.partition_point(|&k| k < slot.base_gfn);
        debug_assert!(self.keys.get(i) != Some(&slot.base_gfn));
        // Exactly sized: one slot more (seed 002), at the price of a
        // reallocation per CREATE, `O(SMALL_MAX)` bytes.
        self.keys.reserve_exact(1);
        self.slots.reserve_exact(1);
        self.keys.insert(i, slot.base_gfn);
        self.slots.insert(i, Arc::clone(slot));
    }

    fn remove_at(&mut self, i: usize) {
        self.keys.remove(i);
        self.slots.remove(i);
        self.keys.shrink_to_fit();
        self.slots.shrink_to_fit();
    }

    fn heap_bytes(&self) -> usize {
        self.keys.capacity() * core::mem::size_of::<u64>() + self.slots.capacity() * core::mem::size_of::<usize>()
    }
}

impl<D> Large<D> {
    /// The entry covering `gfn`. Not inlined: the indexed search is large,
    /// and kept out of line it leaves [`MemslotSet::search`] small enough for
    /// a user's crate to inline the small layout's search into its loop
    /// (with the default release profile `ReadGuard::gfn_to_hva_many` was
    /// otherwise a call per lookup, at every size).
    #[inline(never)]
    fn search(&self, gfn: u64) -> Option<(u64, GfnEntry<D>)> {
        let (base, e) = self.by_gfn.floor(gfn)?;
        (gfn - base < e.npages).then_some((base, *e))
    }

    fn new() -> Self {
        Large { by_id: IdMap::new(), by_gfn: GfnIndex::new(), by_hva: HvaTree::new() }
    }

    fn insert(&mut self, new: &Arc<MemorySlot<D>>) {
        self.by_hva.insert(new.userspace_addr, new.hva_last(), new.id);
        let fresh = self.by_gfn.insert(new.base_gfn, entry(new));
        debug_assert!(fresh);
        self.by_id.insert(new.id, Arc::clone(new));
    }

    fn remove(&mut self, old: &Arc<MemorySlot<D>>) {
        let removed = self.by_id.remove(old.id);
        debug_assert!(removed.is_some_and(|r| Arc::ptr_eq(&r, old)));
        let found = self.by_hva.remove(old.userspace_addr, old.hva_last(), old.id);
        debug_assert!(found);
        let removed = self.by_gfn.remove(old.base_gfn);
        debug_assert!(removed.is_some());
    }

    fn heap_bytes(&self) -> usize {
        core::mem::size_of::<Self>() + self.by_id.heap_bytes() + self.by_gfn.heap_bytes() + self.by_hva.heap_bytes()
    }
}

impl<D> MemslotSet<D> {
    pub(crate) fn new() -> Self {
        MemslotSet { layout: Layout::Small(Small::new()), last_used: AtomicPtr::new(core::ptr::null_mut()) }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.layout {
            Layout::Small(s) => s.slots.len(),
            Layout::Large(l) => l.by_id.len(),
        }
    }

    /// KVM's `kvm_replace_memslot`: replace `old` by `new` (either may be
    /// absent) in this set. Only for the writer, on the inactive set.
    pub(crate) fn replace(&mut self, old: Option<&Arc<MemorySlot<D>>>, new: Option<&Arc<MemorySlot<D>>>) {
        // Readers of this set are gone (it is inactive and a grace period
        // passed), so plain checks-and-stores of the cache are enough.
        if let Some(old) = old {
            if self.last_used.load(Ordering::Relaxed) == ptr(old).as_ptr() {
                let to = new.map_or(core::ptr::null_mut(), |n| ptr(n).as_ptr());
                self.last_used.store(to, Ordering::Relaxed);
            }
        }
        match (old, new) {
            (Some(old), Some(new)) => {
                // KVM never changes a slot's id, host range or size in place: a
                // MOVE, FLAGS_ONLY or INVALID copy keeps them.
                debug_assert_eq!((old.id, old.userspace_addr, old.npages), (new.id, new.userspace_addr, new.npages));
                match &mut self.layout {
                    Layout::Small(s) => {
                        let Some(i) = s.position(old) else {
                            debug_assert!(false, "old slot not in the set");
                            return;
                        };
                        if new.base_gfn == old.base_gfn {
                            s.slots[i] = Arc::clone(new);
                        } else {
                            // Same length: no reallocation.
                            s.keys.remove(i);
                            s.slots.remove(i);
                            let j = s.keys.partition_point(|&k| k < new.base_gfn);
                            s.keys.insert(j, new.base_gfn);
                            s.slots.insert(j, Arc::clone(new));
                        }
                    }
                    Layout::Large(l) => {
                        // The hva entry (an id) stays as it is, the id entry is
                        // updated in place, and the gfn entry too when the base
                        // gfn stays.
                        if let Some(slot) = l.by_id.get_mut(old.id) {
                            debug_assert!(Arc::ptr_eq(slot, old));
                            *slot = Arc::clone(new);
                        }
                        if new.base_gfn == old.base_gfn {
                            // KVM's rb_replace_node.
                            if let Some(e) = l.by_gfn.get_mut(old.base_gfn) {
                                *e = entry(new);
                            }
                        } else {
                            let removed = l.by_gfn.remove(old.base_gfn);
                            debug_assert!(removed.is_some());
                            let fresh = l.by_gfn.insert(new.base_gfn, entry(new));
                            debug_assert!(fresh);
                        }
                    }
                }
            }
            (Some(old), None) => match &mut self.layout {
                Layout::Small(s) => {
                    if let Some(i) = s.position(old) {
                        s.remove_at(i);
                    } else {
                        debug_assert!(false, "old slot not in the set");
                    }
                }
                Layout::Large(l) => {
                    l.remove(old);
                    if l.by_id.len() <= SMALL_AGAIN {
                        self.switch_to_small();
                    }
                }
            },
            (None, Some(new)) => match &mut self.layout {
                Layout::Small(s) if s.slots.len() < SMALL_MAX => s.insert(new),
                Layout::Small(_) => {
                    self.switch_to_indexed();
                    if let Layout::Large(l) = &mut self.layout {
                        l.insert(new);
                    }
                }
                Layout::Large(l) => l.insert(new),
            },
            (None, None) => {}
        }
    }

    /// Before slot `id` (at `gfn` and `hva`) is replaced or removed in both
    /// sets `[active, inactive]`:
    /// brings into the cache, all at once, the lines of both sets' indexes
    /// the change will touch, so that the change's steps, which grace
    /// periods keep from overlapping, find them there (`prefetch.rs`).
    /// Reads only; nothing for the small layout (a few lines, warm).
    pub(crate) fn prefetch_change(sets: [&Self; 2], id: u16, gfn: u64, hva: u64) {
        let (Layout::Large(a), Layout::Large(b)) = (&sets[0].layout, &sets[1].layout) else {
            return;
        };
        if a.by_id.len() < PREFETCH_MIN {
            return;
        }
        // Short chains first, so they are under way while the searches run:
        // both id-map entries, the slot the active one points to, both sets'
        // headers.
        a.by_id.prefetch(id);
        b.by_id.prefetch(id);
        if let Some(slot) = a.by_id.get(id) {
            crate::prefetch::prefetch(Arc::as_ptr(slot).cast(), 64);
        }
        for l in [a, b] {
            crate::prefetch::prefetch(core::ptr::from_ref::<Large<D>>(l).cast(), core::mem::size_of::<Large<D>>());
        }
        let tops = [a.by_gfn.firsts(), b.by_gfn.firsts(), a.by_hva.firsts(), b.by_hva.firsts()];
        let [ga, gb, ha, hb] = crate::prefetch::floor_many(tops, [gfn, gfn, hva, hva]);
        a.by_gfn.prefetch_block(ga);
        b.by_gfn.prefetch_block(gb);
        a.by_hva.prefetch_block(ha);
        b.by_hva.prefetch_block(hb);
    }

    /// Rebuilds a small set in the indexed layout.
    fn switch_to_indexed(&mut self) {
        let Layout::Small(s) = &mut self.layout else { return };
        let mut l = Box::new(Large::new());
        for slot in &s.slots {
            l.insert(slot);
        }
        self.layout = Layout::Large(l);
    }

    /// Rebuilds an indexed set in the small layout.
    fn switch_to_small(&mut self) {
        let Layout::Large(l) = &mut self.layout else { return };
        let n = l.by_id.len();
        let mut s = Small { keys: Vec::with_capacity(n), slots: Vec::with_capacity(n) };
        for (base, e) in l.by_gfn.iter_from_floor(0) {
            // SAFETY: the entry points to a slot owned by `by_id` (invariant).
            let id = unsafe { e.slot.as_ref() }.id;
            if let Some(slot) = l.by_id.get(id) {
                s.keys.push(base);
                s.slots.push(Arc::clone(slot));
            }
        }
        debug_assert_eq!(s.slots.len(), n);
        self.layout = Layout::Small(s);
    }

    /// The slot with id `id`.
    #[inline]
    pub(crate) fn id_to_memslot(&self, id: u16) -> Option<&Arc<MemorySlot<D>>> {
        match &self.layout {
            Layout::Small(s) => s.slots.iter().find(|s| s.id == id),
            Layout::Large(l) => l.by_id.get(id),
        }
    }

    /// The entry covering `gfn` (no cache): its base gfn and entry.
    #[inline]
    pub(crate) fn search(&self, gfn: u64) -> Option<(u64, GfnEntry<D>)> {
        match &self.layout {
            Layout::Small(s) => {
                let i = s.floor(gfn)?;
                let slot = &*s.slots[i];
                (gfn - slot.base_gfn < slot.npages).then(|| (slot.base_gfn, entry_of(slot)))
            }
            Layout::Large(l) => l.search(gfn),
        }
    }

    /// KVM's `search_memslots(approx = true)`: the slot covering `gfn`, else
    /// the first slot above it, else the last slot below it.
    pub(crate) fn search_approx(&self, gfn: u64) -> Option<GfnEntry<D>> {
        if let Some((_, e)) = self.search(gfn) {
            return Some(e);
        }
        match &self.layout {
            Layout::Small(s) => {
                let i = s.keys.partition_point(|&k| k <= gfn);
                s.slots.get(i).or_else(|| s.slots.last()).map(entry)
            }
            Layout::Large(l) => l.by_gfn.successor(gfn).or_else(|| l.by_gfn.last()).map(|(_, e)| *e),
        }
    }

    /// KVM's `__gfn_to_memslot`: try the set's last-used slot, else search and
    /// remember the hit.
    #[inline]
    pub(crate) fn gfn_to_memslot(&self, gfn: u64) -> Option<NonNull<MemorySlot<D>>> {
        let cached = self.last_used.load(Ordering::Relaxed);
        if let Some(c) = NonNull::new(cached) {
            // SAFETY: `last_used` only holds slots owned by this set (invariant),
            // and the caller is in a read section (or is the writer), so the
            // slot is alive.
            let s = unsafe { c.as_ref() };
            if s.contains(gfn) {
                return Some(c);
            }
        }
        let (_, e) = self.search(gfn)?;
        if cached != e.slot.as_ptr() {
            self.last_used.store(e.slot.as_ptr(), Ordering::Relaxed);
        }
        Some(e.slot)
    }

    /// Entries in gfn order starting with the one that may cover `start`.
    pub(crate) fn gfn_iter_from(&self, start: u64) -> GfnIter<'_, D> {
        match &self.layout {
            Layout::Small(s) => GfnIter::Small(s.slots[s.floor(start).unwrap_or(0)..].iter()),
            Layout::Large(l) => GfnIter::Large(l.by_gfn.iter_from_floor(start)),
        }
    }

    /// Slots whose hva range intersects `[start, last]`, in ascending
    /// `(userspace_addr, last address, id)` order (the hva tree's).
    pub(crate) fn hva_overlaps(&self, start: u64, last: u64) -> HvaOverlaps<'_, D> {
        match &self.layout {
            Layout::Small(s) => HvaOverlaps::Small { slots: &s.slots, start, last, prev: None },
            Layout::Large(l) => HvaOverlaps::Large { tree: l.by_hva.overlaps(start, last), by_id: &l.by_id },
        }
    }

    /// All slots (in id order in the indexed layout, in gfn order in the small one).
    pub(crate) fn slots_by_id(&self) -> SlotsIter<'_, D> {
        match &self.layout {
            Layout::Small(s) => SlotsIter::Small(s.slots.iter()),
            Layout::Large(l) => SlotsIter::Large(l.by_id.values()),
        }
    }

    /// Heap bytes held by the set's structures (not the slots).
    pub(crate) fn heap_bytes(&self) -> usize {
        match &self.layout {
            Layout::Small(s) => s.heap_bytes(),
            Layout::Large(l) => l.heap_bytes(),
        }
    }

    /// Whether the set is in the small layout.
    #[cfg(all(test, not(loom)))]
    fn is_small(&self) -> bool {
        matches!(self.layout, Layout::Small(_))
    }

    /// Drops every slot reference (teardown).
    pub(crate) fn clear(&mut self) {
        *self = MemslotSet::new();
    }
}

/// Iterator over `(base_gfn, entry)` in gfn order.
pub(crate) enum GfnIter<'a, D> {
    Small(core::slice::Iter<'a, Arc<MemorySlot<D>>>),
    Large(crate::gfn_index::Iter<'a, GfnEntry<D>>),
}

impl<D> Iterator for GfnIter<'_, D> {
    type Item = (u64, GfnEntry<D>);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            GfnIter::Small(it) => it.next().map(|s| (s.base_gfn, entry(s))),
            GfnIter::Large(it) => it.next().map(|(k, e)| (k, *e)),
        }
    }
}

/// Iterator over the slots whose host range intersects a range.
pub(crate) enum HvaOverlaps<'a, D> {
    /// Selection in `(userspace_addr, hva_last, id)` order: each step scans
    /// the (at most [`SMALL_MAX`]) slots for the least key above the previous
    /// one, so no allocation is needed and the order is the tree's.
    Small {
        slots: &'a [Arc<MemorySlot<D>>],
        start: u64,
        last: u64,
        prev: Option<(u64, u64, u16)>,
    },
    Large {
        tree: crate::hva_tree::Overlaps<'a, u16>,
        by_id: &'a IdMap<Arc<MemorySlot<D>>>,
    },
}

impl<'a, D> Iterator for HvaOverlaps<'a, D> {
    type Item = &'a MemorySlot<D>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            HvaOverlaps::Small { slots, start, last, prev } => {
                let mut best: Option<(u64, u64, u16, &'a MemorySlot<D>)> = None;
                for s in slots.iter() {
                    let key = (s.userspace_addr, s.hva_last(), s.id);
                    let overlaps = key.0 <= *last && key.1 >= *start;
                    if overlaps && prev.is_none_or(|p| key > p) && best.is_none_or(|b| key < (b.0, b.1, b.2)) {
                        best = Some((key.0, key.1, key.2, &**s));
                    }
                }
                let (a, b, c, s) = best?;
                *prev = Some((a, b, c));
                Some(s)
            }
            // Every id in the tree is in `by_id` (invariant), so nothing is skipped.
            HvaOverlaps::Large { tree, by_id } => loop {
                let (_, _, id) = tree.next()?;
                if let Some(s) = by_id.get(id) {
                    return Some(&**s);
                }
            },
        }
    }
}

/// Iterator over a set's slots.
pub(crate) enum SlotsIter<'a, D> {
    Small(core::slice::Iter<'a, Arc<MemorySlot<D>>>),
    Large(crate::id_map::Values<'a, Arc<MemorySlot<D>>>),
}

impl<'a, D> Iterator for SlotsIter<'a, D> {
    type Item = &'a Arc<MemorySlot<D>>;
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            SlotsIter::Small(it) => it.next(),
            SlotsIter::Large(it) => it.next(),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! Both layouts and the switches between them against a naive model (a
    //! list of slots), through every query the set answers.
    use super::*;
    use crate::slot::SlotDesc;
    use proptest::prelude::*;

    fn slot(id: u16, grid: u64, npages: u64, hva_unit: u64, flags: u32) -> Arc<MemorySlot<()>> {
        let desc = SlotDesc {
            base_gfn: grid * 16,
            npages,
            userspace_addr: hva_unit * 0x4000,
            flags,
            id,
            as_id: 0,
            guest_memfd: None,
        };
        Arc::new(MemorySlot { desc, dirty_bitmap: None, arch: () })
    }

    fn check(set: &MemslotSet<()>, model: &[Arc<MemorySlot<()>>], probes: &[u64]) -> Result<(), TestCaseError> {
        prop_assert_eq!(set.len(), model.len());
        let mut by_gfn: Vec<_> = model.to_vec();
        by_gfn.sort_by_key(|s| s.base_gfn);
        for id in 0..100u16 {
            let want = model.iter().find(|s| s.id == id);
            let got = set.id_to_memslot(id);
            prop_assert!(want.map(Arc::as_ptr) == got.map(Arc::as_ptr));
        }
        for &gfn in probes {
            let want = by_gfn.iter().find(|s| s.contains(gfn));
            let got = set.search(gfn);
            prop_assert_eq!(
                want.map(|w| (w.base_gfn, Arc::as_ptr(w))),
                got.map(|(b, e)| (b, e.slot.as_ptr().cast_const()))
            );
            if let Some((_, e)) = got {
                let w = want.unwrap();
                prop_assert_eq!((e.npages, e.hva, e.flags), (w.npages, w.userspace_addr, w.flags));
            }
            let approx = want.or_else(|| by_gfn.iter().find(|s| s.base_gfn > gfn)).or_else(|| by_gfn.last());
            prop_assert!(approx.map(Arc::as_ptr) == set.search_approx(gfn).map(|e| e.slot.as_ptr().cast_const()));
            let from = by_gfn.iter().rposition(|s| s.base_gfn <= gfn).unwrap_or(0);
            let want_iter: Vec<_> =
                by_gfn[from.min(by_gfn.len())..].iter().map(|s| (s.base_gfn, Arc::as_ptr(s))).collect();
            let got_iter: Vec<_> = set.gfn_iter_from(gfn).map(|(b, e)| (b, e.slot.as_ptr().cast_const())).collect();
            prop_assert_eq!(want_iter, got_iter);
            let (qs, ql) = (gfn * 0x1000, gfn * 0x1000 + (gfn % 5) * 0x3000);
            let mut want_hva: Vec<_> = model
                .iter()
                .filter(|s| s.userspace_addr <= ql && s.hva_last() >= qs)
                .map(|s| ((s.userspace_addr, s.hva_last(), s.id), Arc::as_ptr(s)))
                .collect();
            want_hva.sort_unstable_by_key(|w| w.0);
            let want_hva: Vec<_> = want_hva.into_iter().map(|w| w.1).collect();
            let got_hva: Vec<_> = set.hva_overlaps(qs, ql).map(core::ptr::from_ref).collect();
            prop_assert_eq!(want_hva, got_hva);
        }
        let mut all: Vec<_> = set.slots_by_id().map(Arc::as_ptr).collect();
        let mut want_all: Vec<_> = model.iter().map(Arc::as_ptr).collect();
        all.sort_unstable();
        want_all.sort_unstable();
        prop_assert_eq!(all, want_all);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// ops: (kind, id, grid position, npages, hva unit).
        #[test]
        fn matches_a_list_across_layout_switches(ops in proptest::collection::vec((0u8..8, 0u16..90, 0u64..200, 1u64..=16, 0u64..64), 1..600)) {
            let mut set = MemslotSet::new();
            let mut model: Vec<Arc<MemorySlot<()>>> = Vec::new();
            let mut was_large = false;
            for (step, &(kind, id, grid, npages, hva)) in ops.iter().enumerate() {
                let cur = model.iter().position(|s| s.id == id);
                let free = !model.iter().any(|s| s.base_gfn == grid * 16);
                match (cur, kind) {
                    // Create, most often, so sets grow past SMALL_MAX.
                    (None, 0..=5) if free => {
                        let s = slot(id, grid, npages, hva, 0);
                        set.replace(None, Some(&s));
                        model.push(s);
                    }
                    (Some(i), 0..=2) => {
                        set.replace(Some(&model[i]), None);
                        model.remove(i);
                    }
                    (Some(i), 3..=5) if free => {
                        let old = &model[i];
                        let s = slot(id, grid, old.npages, old.userspace_addr / 0x4000, old.flags);
                        set.replace(Some(old), Some(&s));
                        model[i] = s;
                    }
                    (Some(i), _) => {
                        let old = &model[i];
                        let s = slot(id, old.base_gfn / 16, old.npages, old.userspace_addr / 0x4000, old.flags ^ 1);
                        set.replace(Some(old), Some(&s));
                        model[i] = s;
                    }
                    _ => {}
                }
                // Hysteresis: small up to SMALL_MAX, indexed above it until
                // it shrinks to SMALL_AGAIN.
                let n = model.len();
                let large = n > SMALL_MAX || (was_large && n > SMALL_AGAIN);
                prop_assert_eq!(set.is_small(), !large, "{} slots", n);
                was_large = large;
                if set.is_small() {
                    prop_assert_eq!(set.heap_bytes(), 16 * n, "small layout not exactly sized");
                }
                if step % 7 == 0 {
                    let probes: Vec<u64> = (0..40).map(|k| (k * 83 + step as u64) % 3300).collect();
                    check(&set, &model, &probes)?;
                }
            }
            check(&set, &model, &[0, 5, 16, 17, 100, 1000, 3199, 3200, u64::MAX])?;
            while let Some(s) = model.pop() {
                set.replace(Some(&s), None);
            }
            prop_assert_eq!(set.heap_bytes(), 0);
        }
    }
}
