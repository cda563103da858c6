//! Flat translation tables: a generation-tagged copy of one address space's
//! gfn -> hva translations that lookups search without a read section.
//!
//! # Why
//!
//! A read section costs a locked increment (the store-load handshake of
//! `srcu.rs`) and the indexed layout's search a few dependent loads more
//! than a sorted array: together ~2-5 ns per lookup at 1-256 slots, where
//! a VMM's alternatives (`GuestMemoryMmap::find_region`) cost 2-11 ns. A
//! translation (`gfn_to_hva` and friends) only needs numbers: the slot's base
//! gfn, size, host address and flags. So each address space publishes, on
//! demand, an immutable [`FlatTable`] of those numbers in gfn order, tagged
//! with the generation it was built under, and every thread (and every
//! vCPU) keeps its own reference to the table it last used ([`Holder`]).
//!
//! # Protocol
//!
//! * **Lookup** (no section): load the address space's generation (acquire)
//!   and compare it with the held table's tag. Equal: no publish has started
//!   since the table was built (every publish first stores the generation
//!   with [`GEN_UPDATE_IN_PROGRESS`], then a new final value), so the copy is
//!   the state in force when the generation was loaded, and the lookup
//!   linearises there; search the table. This is the vCPU cache's check
//!   (`vcpu.rs`, loom model `loom_vcpu_cache_vs_move`) applied to a whole table.
//! * **Miss** (in a section): the generation differs or nothing is held.
//!   The lookup searches the active set as before. Inside the same section,
//!   with the generation loaded after entering it and before the set, the
//!   thread takes the published table if its tag is that generation (an
//!   `Arc` clone), or, after enough misses to pay for it (amortised: a build
//!   is `O(n)`, so a thread builds only after `n / 4 + 4` misses), builds one
//!   from the active set and installs it if none is published. A table is
//!   never built under an in-progress generation, and one whose build a
//!   publish raced (the generation reloaded after the build differs) is
//!   dropped: a table's entries are always its tag's set.
//! * **Writer** (under the slots lock, after each publish): after the grace
//!   period, before it stores the final generation, it frees the published
//!   table (of the old generation, installed before or during the update).
//!   Readers load the published pointer only inside sections and only under
//!   a final generation, never the in-progress one. A reader that read the old generation is inside a
//!   section the grace period waited for (had it not been waited for, its
//!   phase re-check saw the flip, and its later generation load the
//!   in-progress value stored before the flip); a reader that reads the new
//!   generation does so after the writer emptied the slot. So no reader can
//!   reach a freed table, and after an update only tables of the new
//!   generation get installed. Loom: `loom_flat_tables_vs_move`.
//!
//! * **Inside a section** (`ReadGuard::gfn_to_hva_many`, which memslots-mem's
//!   fast read path dereferences): a table answer validated by a generation
//!   loaded inside the section describes a slot of a set active at that
//!   moment, so the slot, and what it keeps alive, outlives the section as
//!   with a search of the set. (A reader whose section the grace period
//!   does not wait for saw the flip, and then loads the in-progress
//!   generation, which validates no table.)
//!
//! Threads keep their table in the per-thread state of `srcu.rs` (with
//! `std`): the memory of a stale table a thread holds is freed at its next
//! miss on that VM, or when the thread exits; they are not counted in
//! `Vm::memory_usage`, which counts the published table. A table costs 24
//! bytes per slot.

use crate::error::HvaError;
use crate::lookup::entry_translation;
use crate::set::MemslotSet;
use crate::srcu::{SrcuGuard, TwoSets, GEN_UPDATE_IN_PROGRESS};
use crate::sync::{Arc, AtomicPtr, Ordering, UnsafeCell};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::Cell;

/// What a translation needs of one slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlatEntry {
    pub(crate) hva: u64,
    /// At most `u32::MAX` (KVM's limit is `2^31 - 1`; a set with a larger
    /// slot gets no table).
    pub(crate) npages: u32,
    pub(crate) flags: u32,
}

/// An immutable copy of one address space's translations, in gfn order.
#[derive(Debug)]
pub(crate) struct FlatTable {
    /// The generation of the set it was copied from (never in progress).
    gen: u64,
    /// Base gfns, ascending.
    keys: Box<[u64]>,
    /// `ents[i]` is the slot at `keys[i]`.
    ents: Box<[FlatEntry]>,
}

impl FlatTable {
    /// A copy of `set`, tagged `gen`; `None` if a slot has more than
    /// `u32::MAX` pages.
    fn build<D>(set: &MemslotSet<D>, gen: u64) -> Option<Self> {
        let n = set.len();
        let (mut keys, mut ents) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (base, e) in set.gfn_iter_from(0) {
            keys.push(base);
            ents.push(FlatEntry { hva: e.hva, npages: u32::try_from(e.npages).ok()?, flags: e.flags });
        }
        Some(FlatTable { gen, keys: keys.into_boxed_slice(), ents: ents.into_boxed_slice() })
    }

    /// The slot covering `gfn`: its base gfn and entry.
    #[inline(always)]
    fn search(&self, gfn: u64) -> Found {
        search(&self.keys, &self.ents, gfn)
    }

    /// What [`Holder`] keeps of it.
    fn view(&self) -> View {
        View { gen: self.gen, keys: self.keys.as_ptr(), len: self.keys.len(), ents: self.ents.as_ptr() }
    }

    /// Heap and object bytes.
    fn bytes(&self) -> usize {
        core::mem::size_of::<Node>()
            + self.keys.len() * core::mem::size_of::<u64>()
            + self.ents.len() * core::mem::size_of::<FlatEntry>()
    }
}

/// A translation answered from a table: `(hva, pages to the slot's end,
/// slot flags)`.
pub(crate) type Translation = Result<(u64, u64, u32), HvaError>;

/// What a table says of a gfn: the base gfn and entry of the slot covering
/// it, if any.
pub(crate) type Found = Option<(u64, FlatEntry)>;

/// The slot covering `gfn` in the table `(keys, ents)`: a branchless search
/// (each step a conditional move; the loop count depends only on the
/// length), as the small set layout's.
#[inline(always)]
fn search(keys: &[u64], ents: &[FlatEntry], gfn: u64) -> Found {
    let (mut base, mut len) = (0usize, keys.len());
    if len == 0 {
        return None;
    }
    if ents.len() != keys.len() {
        return None;
    }
    while len > 1 {
        let half = len / 2;
        // SAFETY: `base + len <= keys.len()` throughout and `half < len`.
        // (Unchecked: the bounds check was two more instructions in each
        // step of the loop, which is all a lookup is.)
        let k = unsafe { *keys.get_unchecked(base + half) };
        base = core::hint::select_unpredictable(k <= gfn, base + half, base);
        len -= half;
    }
    // SAFETY: `base < keys.len() == ents.len()` (checked above; `keys` is not empty).
    let (key, e) = unsafe { (*keys.get_unchecked(base), *ents.get_unchecked(base)) };
    // Below the first slot the subtraction wraps to a huge offset.
    (gfn.wrapping_sub(key) < u64::from(e.npages)).then_some((key, e))
}

/// The answer for `gfn` from the entry `(base, e)` of its slot.
#[inline(always)]
pub(crate) fn translate(found: Found, gfn: u64, write: bool) -> Translation {
    let (base, e) = found.ok_or(HvaError::NoSlot)?;
    entry_translation(base, e.hva, u64::from(e.npages), e.flags, gfn, write)
}

/// A published table.
struct Node {
    /// In a cell so that loom checks every reader's access against the
    /// writer's free (`free`).
    table: UnsafeCell<Arc<FlatTable>>,
}

impl Node {
    /// The table's bytes.
    fn bytes(&self) -> usize {
        // SAFETY: the table is only written by `free` (which owns the node).
        self.table.with(|t| unsafe { (*t).bytes() })
    }
}

/// Frees a node (and its reference on the table).
///
/// # Safety
/// `p` came from `Box::into_raw` and no reader can reach it any more.
unsafe fn free(p: *mut Node) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(p) };
    // The last access to the node: under loom, a write that must follow
    // every reader's access.
    node.table.with_mut(|_| ());
}

/// One address space's published table (null: none).
pub(crate) struct Published {
    /// A `Box<Node>` or null. Readers load it inside read sections only.
    slot: AtomicPtr<Node>,
}

impl core::fmt::Debug for Published {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Published").finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers are `Box<Node>`s owned by this structure; a node
// holds an `Arc<FlatTable>` (plain numbers), shared across threads only
// through `Arc` clones made inside read sections (see the module protocol).
unsafe impl Send for Published {}
// SAFETY: as above; shared access is atomic loads and compare-exchanges of
// the slot (readers) and the writer's accesses under the slots lock.
unsafe impl Sync for Published {}

impl Published {
    pub(crate) fn new() -> Self {
        Published { slot: AtomicPtr::new(core::ptr::null_mut()) }
    }

    /// The published table if it is tagged `gen`. Only inside a read section.
    fn get(&self, _guard: &SrcuGuard<'_>, gen: u64) -> Option<Arc<FlatTable>> {
        let p = self.slot.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: the writer frees a published node only after a grace
        // period that started after the in-progress generation was stored;
        // a section that loads the slot under a final generation is one
        // that grace period waits for (module docs, "Writer"), so the node
        // is alive.
        unsafe { &(*p).table }.with(|t| {
            // SAFETY: as above; the table is written only when the node is freed.
            let table = unsafe { &*t };
            (table.gen == gen).then(|| Arc::clone(table))
        })
    }

    /// Publishes `table` if nothing is published. Only inside a read section.
    fn install(&self, _guard: &SrcuGuard<'_>, table: &Arc<FlatTable>) {
        if !self.slot.load(Ordering::Relaxed).is_null() {
            return;
        }
        let node = Box::into_raw(Box::new(Node { table: UnsafeCell::new(Arc::clone(table)) }));
        if self.slot.compare_exchange(core::ptr::null_mut(), node, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            // SAFETY: never published: still ours alone.
            drop(unsafe { Box::from_raw(node) });
        }
    }

    /// The writer, right after the grace period of an update and before it
    /// stores the update's final generation: frees the published table, if
    /// any (of the old generation, installed before or during the update).
    ///
    /// # Safety
    /// The caller holds the slots lock of the owning VM, a grace period of
    /// the VM's domain that started after the update stored its in-progress
    /// generation has ended, and that generation is still stored.
    pub(crate) unsafe fn after_grace_period(&self) {
        // A reader loads the slot only under a final generation. One that
        // loaded the old one is inside a section this grace period waited
        // for (module docs), install included, so this load sees its install
        // and no reader holds the node; under the in-progress generation
        // nothing is loaded or installed; and any later reader loads the new
        // generation, stored after this returns, and then the emptied slot.
        // Most updates find nothing published: a load, no locked swap.
        if self.slot.load(Ordering::Relaxed).is_null() {
            return;
        }
        let p = self.slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: as just said, no reader can reach it; it came from `install`.
            unsafe { free(p) };
        }
    }

    /// Bytes of the published table.
    ///
    /// # Safety
    /// The caller holds the slots lock of the owning VM (only the writer
    /// frees tables).
    pub(crate) unsafe fn bytes(&self) -> usize {
        let p = self.slot.load(Ordering::Acquire);
        if p.is_null() {
            return 0;
        }
        // SAFETY: only the writer frees a published node, and the caller is
        // the writer.
        unsafe { (*p).bytes() }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        // `&mut self`: no reader or writer is left.
        let p = self.slot.swap(core::ptr::null_mut(), Ordering::Relaxed);
        if !p.is_null() {
            // SAFETY: it came from `Box::into_raw` and is reachable only from
            // this structure.
            unsafe { free(p) };
        }
    }
}

/// One reader's (a thread's, per VM and address space, or a vCPU's) current
/// table.
///
/// Not `Sync`; its methods return copies, never borrows of the table, so the
/// table is never replaced while a search runs.
pub(crate) struct Holder {
    /// The table lookups search, `own`'s (`keys` null: none), copied here so
    /// that a lookup reads it from the holder's own line.
    view: Cell<View>,
    own: Cell<Option<Arc<FlatTable>>>,
    /// Misses since the table last went stale: a build is `O(n)`, made
    /// only once this many lookups paid for it.
    misses: Cell<u32>,
    /// A generation whose set has no table (a slot of more than `u32::MAX`
    /// pages); [`GEN_UPDATE_IN_PROGRESS`], never a final one, for none.
    unbuildable: Cell<u64>,
}

impl core::fmt::Debug for Holder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Holder").field("misses", &self.misses.get()).finish_non_exhaustive()
    }
}

/// A [`FlatTable`]'s tag and arrays, as raw parts.
#[derive(Clone, Copy)]
struct View {
    gen: u64,
    keys: *const u64,
    len: usize,
    ents: *const FlatEntry,
}

impl View {
    const NONE: View = View { gen: 0, keys: core::ptr::null(), len: 0, ents: core::ptr::null() };
}

impl Default for Holder {
    fn default() -> Self {
        Holder {
            view: Cell::new(View::NONE),
            own: Cell::new(None),
            misses: Cell::new(0),
            unbuildable: Cell::new(GEN_UPDATE_IN_PROGRESS),
        }
    }
}

// SAFETY: `view` points into the `Arc` that `own` holds (or is null); moving
// the holder to another thread moves that `Arc` with it. `FlatTable` is plain
// data.
unsafe impl Send for Holder {}

impl Holder {
    /// The translation of `gfn` from the held table if it is tagged `gen`
    /// (the address space's generation, just loaded with acquire); `None`:
    /// no current table, take the section path.
    #[inline(always)]
    pub(crate) fn lookup(&self, gen: u64, gfn: u64) -> Option<Found> {
        let v = self.view.get();
        if v.keys.is_null() || v.gen != gen {
            return None;
        }
        // SAFETY: a non-null view is that of the table `own` holds (`len`
        // keys and entries), replaced only by `refresh` and `clear`, which
        // run on this thread (`Holder` is not `Sync`) and never while these
        // borrows, local to this call, live.
        let (keys, ents) =
            unsafe { (core::slice::from_raw_parts(v.keys, v.len), core::slice::from_raw_parts(v.ents, v.len)) };
        Some(search(keys, ents, gfn))
    }

    /// [`lookup`](Self::lookup) as a translation for a write (`write`) or a read.
    #[inline(always)]
    pub(crate) fn translate(&self, gen: u64, gfn: u64, write: bool) -> Option<Translation> {
        Some(translate(self.lookup(gen, gfn)?, gfn, write))
    }

    /// Drops the held table (a vCPU switching address spaces).
    pub(crate) fn clear(&self) {
        self.drop_table();
        self.misses.set(0);
    }

    /// Lets the held table go (the view first).
    fn drop_table(&self) {
        self.view.set(View::NONE);
        drop(self.own.take());
    }

    /// A lookup missed the held table. Inside the read section `guard`,
    /// with `gen` loaded after entering it and before taking the active set
    /// `set`: take the published table tagged `gen`, or count the miss and
    /// build (and publish) one once enough misses paid for it. Returns what
    /// the new table says of `gfn`, or `None`: search the set.
    pub(crate) fn refresh<D>(
        &self,
        published: &Published,
        guard: &SrcuGuard<'_>,
        space: &TwoSets<MemslotSet<D>>,
        set: &MemslotSet<D>,
        gen: u64,
        gfn: u64,
    ) -> Option<Found> {
        if gen & GEN_UPDATE_IN_PROGRESS != 0 {
            return None;
        }
        let v = self.view.get();
        if !v.keys.is_null() && v.gen != gen {
            // A table of an older generation is of no use any more: let it
            // go now (its memory), not at the next build.
            self.drop_table();
        }
        let table = match published.get(guard, gen) {
            Some(t) => t,
            None => {
                if self.unbuildable.get() == gen {
                    return None;
                }
                let misses = self.misses.get().saturating_add(1);
                // Under loom at the first miss, so that the models build,
                // publish and free tables.
                let needed = if cfg!(loom) { 0 } else { u32::try_from(set.len() / 4 + 4).unwrap_or(u32::MAX) };
                if misses < needed {
                    self.misses.set(misses);
                    return None;
                }
                self.misses.set(0);
                let Some(t) = FlatTable::build(set, gen) else {
                    // Not representable: not again for this generation.
                    self.unbuildable.set(gen);
                    return None;
                };
                // A publish that raced the build may have made `set` newer
                // than `gen` says (the in-progress store precedes the publish,
                // so the reload sees it): such a table must not be taken by a
                // reader that loaded `gen` before that store.
                if space.generation() != gen {
                    return None;
                }
                let t = Arc::new(t);
                published.install(guard, &t);
                t
            }
        };
        self.misses.set(0);
        let found = table.search(gfn);
        self.view.set(table.view());
        // The old table (if any) is released after the view moved off it.
        drop(self.own.replace(Some(table)));
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, UserMemoryRegion, Vm};

    #[test]
    fn a_table_answers_as_the_set() {
        for n in [1u32, 7, 40, 1000] {
            let vm = Vm::new(Config::default().with_address_spaces(1)).unwrap();
            for i in 0..n {
                let gpa = u64::from(i) * 0x20_0000 + 0x20_0000;
                vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa, 0x1_0000, 0x1000_0000 + gpa)).unwrap();
            }
            let guard = vm.read();
            let set = guard.set(0).unwrap();
            let t = FlatTable::build(set, 0).unwrap();
            for gfn in (0..u64::from(n + 2) * 0x200).step_by(3).chain([u64::MAX, u64::MAX / 2]) {
                let a = t.search(gfn).map(|(b, e)| (b, u64::from(e.npages), e.hva, e.flags));
                let b = set.search(gfn).map(|(b, e)| (b, e.npages, e.hva, e.flags));
                assert_eq!(a, b, "{n} slots, gfn {gfn:#x}");
            }
        }
        assert_eq!(FlatTable::build(&MemslotSet::<()>::new(), 0).unwrap().search(5).map(|(b, _)| b), None);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Tables built, published and taken by two vCPUs while the writer
    //! moves their slot: no access to a node after the writer freed it (the
    //! node's cell), no table leaked (loom's `Arc` leak check), no stale
    //! translation after the move returned.
    use crate::sync::{Arc, AtomicBool, Ordering};
    use crate::{Config, HvaError, UserMemoryRegion, Vm};
    use loom::thread;

    #[test]
    fn loom_flat_tables_vs_move() {
        loom::model(|| {
            let vm = Arc::new(Vm::new(Config::x86_64().with_address_spaces(1).with_user_slots(4)).unwrap());
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10000, 0x10_0000)).unwrap();
            let moved = Arc::new(AtomicBool::new(false));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (vm, moved) = (Arc::clone(&vm), Arc::clone(&moved));
                    thread::spawn(move || {
                        let vcpu = vm.vcpu();
                        // One miss: builds or takes a table.
                        match vcpu.gfn_to_hva(1) {
                            Ok(hva) => assert_eq!(hva, 0x10_1000),
                            Err(e) => assert!(matches!(e, HvaError::NoSlot | HvaError::Invalid)),
                        }
                        if moved.load(Ordering::Acquire) {
                            assert_eq!(vcpu.gfn_to_hva(0x102), Ok(0x10_2000), "stale table after the MOVE returned");
                        }
                    })
                })
                .collect();
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x10_0000, 0x10000, 0x10_0000)).unwrap();
            moved.store(true, Ordering::Release);
            for r in readers {
                r.join().unwrap();
            }
        });
    }

    /// One vCPU across two updates (away and back): the table it built or
    /// took under the first generation, one a reader may install during an
    /// update, and the frees of both updates.
    #[test]
    fn loom_flat_tables_vs_two_moves() {
        loom::model(|| {
            let vm = Arc::new(Vm::new(Config::x86_64().with_address_spaces(1).with_user_slots(4)).unwrap());
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10000, 0x10_0000)).unwrap();
            let back = Arc::new(AtomicBool::new(false));
            let reader = {
                let (vm, back) = (Arc::clone(&vm), Arc::clone(&back));
                thread::spawn(move || {
                    let vcpu = vm.vcpu();
                    for gfn in [1, 2] {
                        let done = back.load(Ordering::Acquire);
                        match vcpu.gfn_to_hva(gfn) {
                            Ok(hva) => assert_eq!(hva, 0x10_0000 + (gfn << 12)),
                            Err(e) => {
                                assert!(!done, "no slot at gfn {gfn} after the move back returned");
                                assert!(matches!(e, HvaError::NoSlot | HvaError::Invalid));
                            }
                        }
                    }
                })
            };
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x10_0000, 0x10000, 0x10_0000)).unwrap();
            vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10000, 0x10_0000)).unwrap();
            back.store(true, Ordering::Release);
            reader.join().unwrap();
        });
    }
}
