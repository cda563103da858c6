//! One memslot set (KVM's `struct kvm_memslots`): a gfn index, an hva interval
//! tree, an id map and a last-used-slot cache over slots it shares with the
//! other set of its address space.

use crate::gfn_index::GfnIndex;
use crate::hva_tree::HvaTree;
use crate::slot::MemorySlot;
use crate::sync::{AtomicPtr, Ordering};
use alloc::sync::Arc;
use core::ptr::NonNull;
use hashbrown::HashMap;

/// What the gfn index stores per slot: the fields a translation needs, so a
/// lookup does not have to touch the slot itself, and the slot.
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

/// One memslot set.
///
/// Invariant: every pointer in `by_gfn` and `last_used` points to a slot
/// whose `Arc` is held by `by_id` of this same set, and every id in `by_hva`
/// is a key of `by_id` whose slot has that host range.
///
/// The hva tree stores slot *ids*, not pointers: a slot's id, host range and
/// size never change while it exists, so replacing a slot by its INVALID
/// copy, its moved or re-flagged version leaves the tree untouched (no
/// O(log n) search with a cache miss per level on every update). An hva
/// lookup pays one id-map probe per hit instead.
pub(crate) struct MemslotSet<D> {
    by_id: HashMap<u16, Arc<MemorySlot<D>>>,
    by_gfn: GfnIndex<GfnEntry<D>>,
    by_hva: HvaTree<u16>,
    last_used: AtomicPtr<MemorySlot<D>>,
}

// SAFETY: the raw pointers only point into `Arc<MemorySlot<D>>`s owned by the
// set itself (see the invariant), so the set is as thread-safe as those Arcs.
unsafe impl<D: Send + Sync> Send for MemslotSet<D> {}
// SAFETY: shared access only reads the maps and does atomic accesses to
// `last_used`; slots are immutable and `D: Sync`.
unsafe impl<D: Send + Sync> Sync for MemslotSet<D> {}

impl<D> core::fmt::Debug for MemslotSet<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemslotSet").field("slots", &self.by_id.len()).finish_non_exhaustive()
    }
}

fn ptr<D>(slot: &Arc<MemorySlot<D>>) -> NonNull<MemorySlot<D>> {
    NonNull::from(&**slot)
}

impl<D> MemslotSet<D> {
    pub(crate) fn new() -> Self {
        MemslotSet {
            by_id: HashMap::new(),
            by_gfn: GfnIndex::new(),
            by_hva: HvaTree::new(),
            last_used: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// KVM's `kvm_replace_memslot`: replace `old` by `new` (either may be
    /// absent) in this set. Only for the writer, on the inactive set.
    pub(crate) fn replace(&mut self, old: Option<&Arc<MemorySlot<D>>>, new: Option<&Arc<MemorySlot<D>>>) {
        // KVM never changes a slot's id, host range or size in place: a MOVE,
        // FLAGS_ONLY or INVALID copy keeps them, so the hva entry (an id)
        // stays as it is, the id entry is updated in place, and the gfn entry
        // too when the base gfn stays. Only CREATE and DELETE (and the gfn
        // part of MOVE) change the structures' shape.
        match (old, new) {
            (Some(old), Some(new)) => {
                debug_assert_eq!((old.id, old.userspace_addr, old.npages), (new.id, new.userspace_addr, new.npages));
                let (old_ptr, new_ptr) = (ptr(old), ptr(new));
                if let Some(slot) = self.by_id.get_mut(&old.id) {
                    debug_assert!(Arc::ptr_eq(slot, old));
                    *slot = Arc::clone(new);
                }
                if self.last_used.load(Ordering::Relaxed) == old_ptr.as_ptr() {
                    self.last_used.store(new_ptr.as_ptr(), Ordering::Relaxed);
                }
                if new.base_gfn == old.base_gfn {
                    // KVM's rb_replace_node.
                    if let Some(e) = self.by_gfn.get_mut(old.base_gfn) {
                        *e = entry(new);
                    }
                } else {
                    let removed = self.by_gfn.remove(old.base_gfn);
                    debug_assert!(removed.is_some());
                    let fresh = self.by_gfn.insert(new.base_gfn, entry(new));
                    debug_assert!(fresh);
                }
            }
            (Some(old), None) => {
                let old_ptr = ptr(old);
                let removed = self.by_id.remove(&old.id);
                debug_assert!(removed.is_some_and(|r| Arc::ptr_eq(&r, old)));
                // Memory proportional to the slots in use: hash tables never
                // shrink by themselves (amortised O(1): shrinking halves at least).
                if self.by_id.len() < self.by_id.capacity() / 4 {
                    self.by_id.shrink_to(self.by_id.len() * 2);
                }
                let found = self.by_hva.remove(old.userspace_addr, old.hva_last(), old.id);
                debug_assert!(found);
                // Readers of this set are gone (it is inactive and a grace period
                // passed), so a plain check-and-store is enough.
                if self.last_used.load(Ordering::Relaxed) == old_ptr.as_ptr() {
                    self.last_used.store(core::ptr::null_mut(), Ordering::Relaxed);
                }
                let removed = self.by_gfn.remove(old.base_gfn);
                debug_assert!(removed.is_some());
            }
            (None, Some(new)) => {
                self.by_hva.insert(new.userspace_addr, new.hva_last(), new.id);
                let fresh = self.by_gfn.insert(new.base_gfn, entry(new));
                debug_assert!(fresh);
                self.by_id.insert(new.id, Arc::clone(new));
            }
            (None, None) => {}
        }
    }

    /// The slot with id `id`.
    #[inline]
    pub(crate) fn id_to_memslot(&self, id: u16) -> Option<&Arc<MemorySlot<D>>> {
        self.by_id.get(&id)
    }

    /// The gfn index entry covering `gfn` (no cache).
    #[inline]
    pub(crate) fn search(&self, gfn: u64) -> Option<(u64, &GfnEntry<D>)> {
        let (base, e) = self.by_gfn.floor(gfn)?;
        (gfn - base < e.npages).then_some((base, e))
    }

    /// KVM's `search_memslots(approx = true)`: the slot covering `gfn`, else
    /// the first slot above it, else the last slot below it.
    pub(crate) fn search_approx(&self, gfn: u64) -> Option<&GfnEntry<D>> {
        if let Some((_, e)) = self.search(gfn) {
            return Some(e);
        }
        self.by_gfn.successor(gfn).or_else(|| self.by_gfn.last()).map(|(_, e)| e)
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
    pub(crate) fn gfn_iter_from(&self, start: u64) -> crate::gfn_index::Iter<'_, GfnEntry<D>> {
        self.by_gfn.iter_from_floor(start)
    }

    /// Slots whose hva range intersects `[start, last]`, in ascending
    /// `userspace_addr` order.
    pub(crate) fn hva_overlaps(&self, start: u64, last: u64) -> impl Iterator<Item = &MemorySlot<D>> + '_ {
        // Every id in the tree is in `by_id` (invariant), so nothing is skipped.
        self.by_hva.overlaps(start, last).filter_map(|(_, _, id)| self.by_id.get(&id).map(|s| &**s))
    }

    /// All slots by id (unordered).
    pub(crate) fn slots_by_id(&self) -> impl Iterator<Item = &Arc<MemorySlot<D>>> + '_ {
        self.by_id.values()
    }

    /// Heap bytes held by the set's structures (not the slots).
    pub(crate) fn heap_bytes(&self) -> usize {
        let id = self.by_id.allocation_size();
        id + self.by_gfn.heap_bytes() + self.by_hva.heap_bytes()
    }

    /// Drops every slot reference (teardown).
    pub(crate) fn clear(&mut self) {
        *self = MemslotSet::new();
    }
}

fn entry<D>(slot: &Arc<MemorySlot<D>>) -> GfnEntry<D> {
    GfnEntry { npages: slot.npages, hva: slot.userspace_addr, flags: slot.flags, slot: ptr(slot) }
}
