//! Read-side sections and grace periods (the part of KVM's SRCU that memslots
//! need), and [`TwoSets`]: the active/inactive pair with publish, wait, replay.
//!
//! # Protocol
//!
//! Readers never block. A reader *record* holds two counters, one per *phase*.
//! Entering a section increments the counter of the current phase and re-checks
//! the phase; leaving decrements it. A writer publishes its change (a release
//! store of the new active index), flips the phase with a `SeqCst` store, and
//! waits until every record's counter of the old phase is zero. Records are
//! owned by one reader handle (a vCPU, a `Reader`), by a thread for its
//! anonymous lookups (`per_thread`, with `std`), or the VM's shared record
//! (anonymous lookups without `std` or during a thread's exit).
//!
//! Why one flip suffices: a reader that read the old active set passed its
//! phase re-check before the writer's publish (the re-check precedes its load
//! of the active index, which returned the old value, so in the `SeqCst` order it
//! precedes the publish and therefore the flip): its increment, which precedes
//! its re-check, is in the old phase's counter before the writer starts
//! polling, so the writer waits for it. A reader whose re-check sees the new
//! phase read the flip, which the publish precedes, so it sees the new set. A
//! reader that incremented the old counter after the writer saw zero fails its
//! re-check and retries. DESIGN.md has the full argument; `loom` checks it
//! (`RUSTFLAGS="--cfg loom" cargo test -p memslots --release --lib loom`).

use crate::sync::{
    backoff, fence, lock, loom_seqcst_fence, Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Mutex, Ordering,
    UnsafeCell,
};
use alloc::vec::Vec;

/// Bit 63 of a generation: "an update of this address space is in progress".
/// Anything cached under such a generation is stale (KVM's
/// `KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`).
pub const GEN_UPDATE_IN_PROGRESS: u64 = 1 << 63;

/// Per-reader counters of read sections, one per phase. Aligned to its own
/// cache lines so readers on different CPUs do not share a line.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct ReaderRecord {
    counts: [AtomicUsize; 2],
    /// Exclusive records only, written only by their owner thread: how many
    /// symmetric sections the record made (up to [`ARM_AFTER`]), or
    /// [`ARMED`] once its sections use the asymmetric fence.
    mode: AtomicU32,
}

impl ReaderRecord {
    fn new() -> Self {
        ReaderRecord { counts: [AtomicUsize::new(0), AtomicUsize::new(0)], mode: AtomicU32::new(0) }
    }
}

/// An exclusive record is armed after this many symmetric sections: a
/// thread that makes only the odd lookup never makes the VM's grace periods
/// pay for `membarrier(2)`. Under loom, at the first section (the models
/// are short).
#[cfg_attr(not(any(feature = "membarrier", loom)), allow(dead_code))]
const ARM_AFTER: u32 = if cfg!(loom) { 0 } else { 64 };
/// [`ReaderRecord::mode`] of an armed record.
#[cfg_attr(not(any(feature = "membarrier", loom)), allow(dead_code))]
const ARMED: u32 = u32::MAX;
/// [`Srcu::phase`] bit: records of this domain may be armed.
const CAPABLE: usize = 2;

/// The records a grace period scans (besides the shared one).
type Registry = Mutex<Vec<Arc<ReaderRecord>>>;

/// Grace-period domain of one VM.
pub(crate) struct Srcu {
    /// Bit 0: the current phase (the counter new sections increment). Bit 1
    /// ([`CAPABLE`], constant): exclusive records may be armed
    /// (`membarrier(2)` is registered and the VM's configuration allows it,
    /// [`crate::Config::asymmetric_readers`]); in the same word so that a
    /// section learns it from the load it makes anyway.
    phase: AtomicUsize,
    /// Some record of this domain is armed (set with a `SeqCst` RMW before
    /// the record's first asymmetric section, never cleared): grace periods
    /// then need the heavy barrier.
    armed: AtomicBool,
    /// Loom: a grace period needed the heavy barrier, which loom cannot
    /// model (the model stops there; see `loom_tests`).
    #[cfg(loom)]
    heavy_needed: AtomicBool,
    shared: ReaderRecord,
    /// In an `Arc` so that a thread's record of this domain
    /// ([`Srcu::anonymous`]) can unregister itself when the thread exits,
    /// if the domain still exists.
    registry: Arc<Registry>,
    /// Never reused (a process-wide counter), unlike the domain's address:
    /// keys the per-thread records.
    #[cfg_attr(not(all(feature = "std", not(loom))), allow(dead_code))]
    id: u64,
    /// Address spaces of the VM: each thread's per-VM state holds one flat
    /// table [`Holder`](crate::flat::Holder) per address space.
    #[cfg_attr(not(all(feature = "std", not(loom))), allow(dead_code))]
    spaces: usize,
}

/// Source of [`Srcu::id`].
static NEXT_DOMAIN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// An open read section. While it lives, no set the reader may have seen is
/// modified and no slot reachable from it is freed.
#[derive(Debug)]
pub(crate) struct SrcuGuard<'a> {
    /// The counter this section incremented (its record's, of its phase):
    /// with `exclusive`, two words, which stay in registers.
    count: &'a AtomicUsize,
    /// Every section on `record` is entered and left on this thread
    /// ([`Srcu::read_lock_exclusive`]): leaving is a plain release store.
    exclusive: bool,
    /// The domain, for the debug-build reentrancy check.
    #[cfg(all(feature = "std", debug_assertions, not(loom)))]
    domain: usize,
}

impl Drop for SrcuGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: everything this reader read happens-before the writer's
        // acquire load that sees the counter drop.
        let count = self.count;
        if self.exclusive {
            // Only this thread writes `count` (the contract of
            // `read_lock_exclusive`), so a load and a store are the
            // decrement, without a locked instruction (half the cost of a
            // section on x86).
            count.store(count.load(Ordering::Relaxed) - 1, Ordering::Release);
        } else {
            count.fetch_sub(1, Ordering::Release);
        }
        #[cfg(all(feature = "std", debug_assertions, not(loom)))]
        section_check::exit(self.domain);
    }
}

/// Debug builds with `std`: which grace-period domains this thread is inside
/// a read section of, so that a writer call from inside one (which would
/// wait for its own section forever) panics with an explanation instead of
/// hanging. Only in builds with `debug_assertions` and `std` (not under loom).
#[cfg(all(feature = "std", debug_assertions, not(loom)))]
mod section_check {
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        /// (domain address, open sections) pairs; usually empty or one.
        static OPEN: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn enter(domain: usize) {
        // Not during the thread's exit (a lookup from another thread local's
        // destructor, after this one was destroyed): best effort.
        let _ = OPEN.try_with(|open| {
            if let Ok(mut open) = open.try_borrow_mut() {
                match open.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, n)) => *n += 1,
                    None => open.push((domain, 1)),
                }
            }
        });
    }

    pub(super) fn exit(domain: usize) {
        // A guard dropped on another thread than it was made on is not found
        // here; the check is best effort, never a false alarm.
        let _ = OPEN.try_with(|open| {
            let Ok(mut open) = open.try_borrow_mut() else { return };
            if let Some(i) = open.iter().position(|(d, _)| *d == domain) {
                open[i].1 -= 1;
                if open[i].1 == 0 {
                    open.swap_remove(i);
                }
            }
        });
    }

    pub(super) fn inside(domain: usize) -> bool {
        OPEN.try_with(|open| open.borrow().iter().any(|(d, _)| *d == domain)).unwrap_or(false)
    }
}

/// Per-thread reader records for anonymous lookups (`std` builds).
///
/// Each thread keeps, in a thread local, two records per grace-period
/// domain it made anonymous lookups in, keyed by the domain's never-reused
/// id: one for guards handed to the caller (`vm.read()`: a guard may be
/// sent to and dropped on another thread, so it leaves with an atomic
/// decrement), and one for the sections the library opens and closes inside
/// one call on this thread (`vm.gfn_to_hva`, ...: exclusive, left with a
/// plain store, see [`Srcu::read_lock_exclusive`]). A one-entry cache of the
/// last domain used makes the common case one thread-local load and a
/// compare. Both records are also in the domain's registry, which owns them
/// for the grace periods and keeps them alive while the domain lives.
///
/// Lifetime: a record leaves the registry only (a) when its thread's locals
/// are destroyed, and then only if no section is open on it (a guard kept in
/// another thread local may outlive this one: its record then stays
/// registered, owned by the registry), or (b) with the domain. A borrow
/// returned here lives no longer than the domain (`&'a Srcu`), so (b)
/// cannot end it; for (a), the cache is emptied before a record is let go,
/// so a lookup made later (from another thread local's destructor) takes the
/// shared record instead.
#[cfg(all(feature = "std", not(loom)))]
mod per_thread {
    use super::{ReaderRecord, Registry, Srcu};
    use crate::flat::Holder;
    use crate::sync::{lock, Arc, Ordering};
    use alloc::rc::Rc;
    use alloc::sync::Weak;
    use core::cell::{Cell, RefCell};
    use std::vec::Vec;

    /// This thread's records of one domain: (for guards that may travel,
    /// for the library's own one-call sections).
    pub(super) type Records<'a> = (&'a ReaderRecord, &'a ReaderRecord);

    struct Entry {
        domain: u64,
        shared: Arc<ReaderRecord>,
        exclusive: Arc<ReaderRecord>,
        registry: Weak<Registry>,
        /// The thread's flat tables of the domain's VM, one per address
        /// space. In an `Rc`, not a `Box`: the address stays put when
        /// `ENTRIES` grows, and moving an `Rc` does not assert uniqueness
        /// of what it points to (moving a `Box` would invalidate the
        /// pointer `LAST` keeps, under Stacked Borrows).
        tables: Rc<[Holder]>,
    }

    impl Drop for Entry {
        fn drop(&mut self) {
            // First forget the cached pointers: nothing may reach these
            // records through the cache once they may be freed.
            let _ = LAST.try_with(|l| l.set(EMPTY));
            let Some(registry) = self.registry.upgrade() else { return };
            let mut r = lock(&registry);
            for record in [&self.shared, &self.exclusive] {
                let idle = record.counts.iter().all(|c| c.load(Ordering::SeqCst) == 0);
                if idle {
                    if let Some(pos) = r.iter().position(|x| Arc::ptr_eq(x, record)) {
                        r.swap_remove(pos);
                    }
                }
            }
        }
    }

    /// (domain id, records, flat tables).
    type Last = (u64, *const ReaderRecord, *const ReaderRecord, *const Holder);
    const EMPTY: Last = (0, core::ptr::null(), core::ptr::null(), core::ptr::null());

    std::thread_local! {
        /// (domain id, records, flat tables) of the last anonymous lookup;
        /// domain 0 is no domain.
        static LAST: Cell<Last> = const { Cell::new(EMPTY) };
        static ENTRIES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    }

    /// This thread's records of `srcu`, registering them if needed; `None`
    /// while the thread's locals are being destroyed.
    #[inline]
    pub(super) fn records(srcu: &Srcu) -> Option<Records<'_>> {
        let (domain, shared, exclusive, _) = LAST.try_with(Cell::get).ok()?;
        if domain == srcu.id {
            // SAFETY: `LAST` holds the records of an entry of `ENTRIES` of
            // this thread for domain `domain` (an entry empties it before it
            // lets its records go); they are in `srcu`'s registry, which
            // keeps them alive as long as the borrow of `srcu` (see the
            // module docs).
            return Some(unsafe { (&*shared, &*exclusive) });
        }
        slow(srcu).map(|(r, _)| r)
    }

    /// This thread's flat tables of `srcu`'s VM, one per address space,
    /// registering the thread's state if needed; `None` while the thread's
    /// locals are being destroyed.
    #[inline(always)]
    pub(super) fn tables(srcu: &Srcu) -> Option<&[Holder]> {
        let (domain, _, _, tables) = LAST.try_with(Cell::get).ok()?;
        if domain == srcu.id {
            // SAFETY: as in `records`: the tables of an entry of `ENTRIES`
            // of this thread (in an `Rc`, `srcu.spaces` long), which empties
            // `LAST` before it drops them; the entry outlives this borrow of
            // `srcu` (module docs). `Holder` is not `Sync` and the borrow
            // cannot leave this thread (`&[Holder]` is not `Send`).
            return Some(unsafe { core::slice::from_raw_parts(tables, srcu.spaces) });
        }
        slow(srcu).map(|(_, t)| t)
    }

    #[cold]
    fn slow(srcu: &Srcu) -> Option<(Records<'_>, &[Holder])> {
        let (shared, exclusive, tables) = ENTRIES
            .try_with(|entries| {
                let mut entries = entries.try_borrow_mut().ok()?;
                if let Some(e) = entries.iter().find(|e| e.domain == srcu.id) {
                    return Some((Arc::as_ptr(&e.shared), Arc::as_ptr(&e.exclusive), Rc::as_ptr(&e.tables).cast()));
                }
                // Entries of domains that no longer exist go first (dropping
                // one frees its records): memory stays proportional to the
                // domains this thread still uses.
                entries.retain(|e| e.registry.strong_count() > 0);
                let (shared, exclusive) = (srcu.register(), srcu.register());
                let tables: Rc<[Holder]> = (0..srcu.spaces).map(|_| Holder::default()).collect();
                let p = (Arc::as_ptr(&shared), Arc::as_ptr(&exclusive), Rc::as_ptr(&tables).cast());
                let registry = Arc::downgrade(&srcu.registry);
                entries.push(Entry { domain: srcu.id, shared, exclusive, registry, tables });
                Some(p)
            })
            .ok()??;
        LAST.try_with(|l| l.set((srcu.id, shared, exclusive, tables))).ok()?;
        // SAFETY: as in `records` and `tables`: the entry just found or made
        // holds these records of `srcu`'s registry and these tables.
        Some(unsafe { ((&*shared, &*exclusive), core::slice::from_raw_parts(tables, srcu.spaces)) })
    }
}

impl core::fmt::Debug for Srcu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Srcu").field("phase", &self.phase).finish_non_exhaustive()
    }
}

impl Srcu {
    /// A domain; with `asymmetric`, its exclusive records may be armed if
    /// `membarrier(2)` can be registered (`membarrier.rs`).
    pub(crate) fn new(asymmetric: bool, spaces: usize) -> Self {
        Self { spaces, ..Self::with_capability(asymmetric && crate::membarrier::register()) }
    }

    /// Loom: a domain whose exclusive records arm at their first section,
    /// although loom cannot model the heavy barrier (see `loom_tests`).
    #[cfg(all(test, loom))]
    fn new_armable() -> Self {
        Self::with_capability(true)
    }

    fn with_capability(asym_capable: bool) -> Self {
        Srcu {
            phase: AtomicUsize::new(if asym_capable { CAPABLE } else { 0 }),
            armed: AtomicBool::new(false),
            #[cfg(loom)]
            heavy_needed: AtomicBool::new(false),
            shared: ReaderRecord::new(),
            registry: Arc::new(Mutex::new(Vec::new())),
            id: NEXT_DOMAIN.fetch_add(1, core::sync::atomic::Ordering::Relaxed),
            spaces: 1,
        }
    }

    /// The record for a guard handed to a caller without a reader handle
    /// (`vm.read()`): with `std`, the calling thread's own record of this
    /// domain (registered on its first anonymous lookup, unregistered when
    /// the thread exits), so threads never share a counter's cache line;
    /// without `std` (or once the thread's locals are being destroyed), the
    /// shared record.
    #[inline]
    pub(crate) fn anonymous(&self) -> &ReaderRecord {
        #[cfg(all(feature = "std", not(loom)))]
        if let Some((r, _)) = per_thread::records(self) {
            return r;
        }
        &self.shared
    }

    /// A section the library enters and leaves inside one call on this
    /// thread (an anonymous lookup such as `vm.gfn_to_hva`): with `std`, on
    /// the thread's exclusive record, left with a plain store; otherwise as
    /// [`anonymous`](Self::anonymous). The guard must not leave the calling
    /// thread (callers keep it in a local and never hand it out).
    #[inline(always)]
    pub(crate) fn read_lock_one_call(&self) -> SrcuGuard<'_> {
        #[cfg(all(feature = "std", not(loom)))]
        if let Some((_, r)) = per_thread::records(self) {
            // SAFETY: the thread's exclusive record is used only here, by
            // sections that callers open and close on this thread (its
            // pointer never leaves `per_thread` otherwise), so every section
            // on it is entered and left on this thread.
            return unsafe { self.read_lock_exclusive(r) };
        }
        self.read_lock(&self.shared)
    }

    /// The calling thread's flat tables of this domain's VM, one per address
    /// space (with `std`; `None` without it, under loom, or while the
    /// thread's locals are being destroyed).
    #[inline(always)]
    pub(crate) fn thread_tables(&self) -> Option<&[crate::flat::Holder]> {
        #[cfg(all(feature = "std", not(loom)))]
        return per_thread::tables(self);
        #[cfg(not(all(feature = "std", not(loom))))]
        None
    }

    /// Registers a reader record of its own for a long-lived reader.
    pub(crate) fn register(&self) -> Arc<ReaderRecord> {
        let record = Arc::new(ReaderRecord::new());
        lock(&self.registry).push(Arc::clone(&record));
        record
    }

    /// Removes a record; its owner must have no open section.
    pub(crate) fn unregister(&self, record: &Arc<ReaderRecord>) {
        let mut registry = lock(&self.registry);
        if let Some(pos) = registry.iter().position(|r| Arc::ptr_eq(r, record)) {
            registry.swap_remove(pos);
        }
    }

    /// Whether some record is armed (diagnostics).
    pub(crate) fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Number of registered reader records (diagnostics).
    pub(crate) fn registered(&self) -> usize {
        lock(&self.registry).len()
    }

    /// The VM-wide record (lookups made without a reader handle, where
    /// there are no per-thread records).
    #[cfg_attr(not(loom), allow(dead_code))]
    pub(crate) fn shared(&self) -> &ReaderRecord {
        &self.shared
    }

    /// Enters a read section on `record`. Never blocks; retries only when a
    /// writer flipped the phase at the same moment.
    #[inline]
    pub(crate) fn read_lock<'a>(&self, record: &'a ReaderRecord) -> SrcuGuard<'a> {
        self.read_lock_as(record, false)
    }

    /// [`read_lock`](Self::read_lock) for a record whose sections are all
    /// entered and left on the calling thread: the guard leaves with a plain
    /// store instead of an atomic decrement.
    ///
    /// # Safety
    ///
    /// While the guard lives, and for every other section ever made on
    /// `record`, the section is entered and left on the thread calling this
    /// (no other thread enters or leaves a section on `record`). A
    /// decrement racing with another thread's increment could lose it, and a
    /// grace period could then end under a reader.
    #[inline(always)]
    pub(crate) unsafe fn read_lock_exclusive<'a>(&self, record: &'a ReaderRecord) -> SrcuGuard<'a> {
        self.read_lock_as(record, true)
    }

    #[inline(always)]
    fn read_lock_as<'a>(&self, record: &'a ReaderRecord, exclusive: bool) -> SrcuGuard<'a> {
        loop {
            let word = self.phase.load(Ordering::SeqCst);
            #[cfg(any(feature = "membarrier", loom))]
            if exclusive && word & CAPABLE != 0 {
                // Only the owner thread reads or writes `mode` (the contract
                // of `read_lock_exclusive`).
                let mode = record.mode.load(Ordering::Relaxed);
                if mode == ARMED {
                    return self.read_lock_armed(record);
                }
                if mode >= ARM_AFTER {
                    self.arm(record);
                    return self.read_lock_armed(record);
                }
                record.mode.store(mode + 1, Ordering::Relaxed);
            }
            // Without arming the word is the phase (no mask to apply).
            let phase = if cfg!(any(feature = "membarrier", loom)) { word & 1 } else { word };
            record.counts[phase].fetch_add(1, Ordering::SeqCst);
            loom_seqcst_fence();
            if self.phase.load(Ordering::SeqCst) == word {
                return self.entered(record, phase, exclusive);
            }
            record.counts[phase].fetch_sub(1, Ordering::Release);
        }
    }

    /// The guard of a section just entered on `record`'s `phase` counter.
    #[inline(always)]
    fn entered<'a>(&self, record: &'a ReaderRecord, phase: usize, exclusive: bool) -> SrcuGuard<'a> {
        #[cfg(all(feature = "std", debug_assertions, not(loom)))]
        section_check::enter(self.domain());
        SrcuGuard {
            count: &record.counts[phase],
            exclusive,
            #[cfg(all(feature = "std", debug_assertions, not(loom)))]
            domain: self.domain(),
        }
    }

    /// Arms an exclusive record: from now on its sections are entered with a
    /// plain store ([`read_lock_armed`](Self::read_lock_armed)) and this
    /// domain's grace periods make the heavy barrier.
    ///
    /// Why a grace period that finds `armed` unset may skip the heavy
    /// barrier: its load of `armed` follows a `SeqCst` fence that follows its
    /// phase flip; here the `SeqCst` RMW of `armed` precedes a `SeqCst`
    /// fence that precedes every armed section of this record. If the
    /// writer's load did not see this RMW, its fence precedes ours in the
    /// fences' total order, so every load this record makes after ours (its
    /// sections' loads of the phase and of the active set) sees the flip and
    /// the publish before it: those sections read the new state, and the
    /// writer need not wait for them. Sections made before arming were
    /// symmetric. `loom_tests::loom_armed_reader_*` check it.
    #[cfg_attr(not(any(feature = "membarrier", loom)), allow(dead_code))]
    #[cold]
    #[inline(never)]
    fn arm(&self, record: &ReaderRecord) {
        self.armed.swap(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        record.mode.store(ARMED, Ordering::Relaxed);
    }

    /// A section on an armed exclusive record: the increment is a plain
    /// store followed by a compiler barrier; the writer's `membarrier(2)`
    /// (`membarrier.rs`) supplies the full barrier the store-then-load
    /// handshake needs. Split at any instruction by that barrier, a section
    /// either stored its increment before it (the writer, scanning after
    /// its barrier, sees the increment and waits) or makes its re-check after
    /// it (and sees the flip, so it retries on the new phase, whose loads see
    /// the publish: the re-check is an acquire load of the release flip).
    #[cfg_attr(not(any(feature = "membarrier", loom)), allow(dead_code))]
    #[inline(always)]
    fn read_lock_armed<'a>(&self, record: &'a ReaderRecord) -> SrcuGuard<'a> {
        loop {
            let word = self.phase.load(Ordering::Relaxed);
            let phase = word & 1;
            let count = &record.counts[phase];
            // Only this thread writes `count` (exclusive record).
            count.store(count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
            if self.phase.load(Ordering::Acquire) == word {
                return self.entered(record, phase, true);
            }
            count.store(count.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        }
    }

    /// The heavy half of the asymmetric fence, if any record of this domain
    /// is armed (see [`arm`](Self::arm)): after it, every armed section's
    /// increment is visible, or the section sees the flip.
    fn heavy_barrier_if_armed(&self) {
        if self.armed.load(Ordering::SeqCst) {
            #[cfg(loom)]
            self.heavy_needed.store(true, Ordering::SeqCst);
            crate::membarrier::heavy_barrier();
        }
    }

    /// Loom: whether a grace period needed the heavy barrier (and so did not
    /// really wait for armed readers: the model must not go on).
    #[cfg(all(test, loom))]
    fn heavy_needed(&self) -> bool {
        self.heavy_needed.load(Ordering::SeqCst)
    }

    #[cfg(all(feature = "std", debug_assertions, not(loom)))]
    fn domain(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    /// Debug builds: panics if the calling thread is inside a read section of
    /// this domain, where `what` (a call that waits for a grace period, or
    /// takes a lock whose holder does) would wait for itself forever. Release
    /// builds: nothing.
    #[inline]
    #[track_caller]
    pub(crate) fn assert_outside_section(&self, what: &str) {
        #[cfg(all(feature = "std", debug_assertions, not(loom)))]
        assert!(
            !section_check::inside(self.domain()),
            "memslots: {what} called from inside a read section (ReadGuard / VcpuGuard) of the same VM: \
             it waits for every read section to end, including the caller's, and would hang; end the section first"
        );
        #[cfg(not(all(feature = "std", debug_assertions, not(loom))))]
        let _ = what;
    }

    /// Waits until every read section that might have seen state published
    /// before this call has ended. Caller holds the VM's writer lock (only one
    /// grace period runs at a time).
    pub(crate) fn synchronize(&self) {
        // Order the caller's publish before the flip for readers that will
        // observe the flip (the flip itself is SeqCst too).
        fence(Ordering::SeqCst);
        let word = self.phase.load(Ordering::Relaxed);
        self.phase.store(word ^ 1, Ordering::SeqCst);
        let old = word & 1;
        // Store (phase) then load (counters): the writer's half of the handshake.
        fence(Ordering::SeqCst);
        self.heavy_barrier_if_armed();
        Self::wait_zero(&self.shared.counts[old]);
        // Scan under the registry lock, wait without it: a reader inside a
        // section may register a new handle, which takes that lock. Only the
        // records still inside an old-phase section are kept (usually none, so
        // nothing is allocated or reference-counted). A record seen at zero
        // after the flip can only gain old-phase increments from readers whose
        // re-check then fails; a record registered after the scan was
        // registered after the flip (the lock orders them), so its sections see
        // the new phase.
        let pending: Vec<Arc<ReaderRecord>> =
            lock(&self.registry).iter().filter(|r| r.counts[old].load(Ordering::SeqCst) != 0).cloned().collect();
        for record in pending.iter() {
            Self::wait_zero(&record.counts[old]);
        }
    }

    fn wait_zero(counter: &AtomicUsize) {
        let mut spins = 0;
        while counter.load(Ordering::SeqCst) != 0 {
            backoff(&mut spins);
        }
        // Pair with the readers' release decrements.
        fence(Ordering::Acquire);
    }
}

/// KVM's pair of memslot sets for one address space: readers use the active
/// one, the writer changes the inactive one, swaps, waits for a grace period
/// and replays the change on the other.
#[derive(Debug)]
pub(crate) struct TwoSets<T> {
    cells: [UnsafeCell<T>; 2],
    active: AtomicUsize,
    generation: AtomicU64,
    gen_step: u64,
}

// SAFETY: the cells are only accessed under the protocol documented on the
// methods: shared access by readers inside read sections, exclusive access by
// the single writer to the inactive cell after a grace period. `T: Send + Sync`
// is required because readers on other threads get `&T` and the writer may
// drop `T`s it received from another thread.
unsafe impl<T: Send + Sync> Sync for TwoSets<T> {}
// SAFETY: see above; moving the whole container moves both sets.
unsafe impl<T: Send + Sync> Send for TwoSets<T> {}

impl<T> TwoSets<T> {
    /// Both sets, set 0 active, with generation `first_gen` advancing by
    /// `gen_step` per publish (KVM: first = as_id, step = number of address spaces).
    pub(crate) fn new(set0: T, set1: T, first_gen: u64, gen_step: u64) -> Self {
        TwoSets {
            cells: [UnsafeCell::new(set0), UnsafeCell::new(set1)],
            active: AtomicUsize::new(0),
            generation: AtomicU64::new(first_gen),
            gen_step,
        }
    }

    /// The generation of the active set (acquire).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Runs `f` on the active set inside the read section `_guard` (the
    /// loom-checkable form of [`TwoSets::active`]).
    #[cfg_attr(not(loom), allow(dead_code))]
    #[inline]
    pub(crate) fn with_active<R>(&self, _guard: &SrcuGuard<'_>, f: impl FnOnce(&T) -> R) -> R {
        let idx = self.active.load(Ordering::Acquire);
        // SAFETY: we are inside a read section (the guard). The writer mutates
        // a set only when it is inactive and after a grace period that started
        // after it became inactive, so no mutation can overlap this shared
        // borrow, which ends before the guard does.
        self.cells[idx].with(|p| f(unsafe { &*p }))
    }

    /// The active set, borrowed for as long as the read section `guard` lives.
    #[inline]
    pub(crate) fn active<'g>(&'g self, _guard: &'g SrcuGuard<'_>) -> &'g T {
        let idx = self.active.load(Ordering::Acquire);
        #[cfg(not(loom))]
        let p = self.cells[idx].get();
        // Under loom the borrow outlives the cell's access tracking (loom
        // checks the orderings, not this borrow; `with_active` is the tracked
        // form used by the protocol model).
        #[cfg(loom)]
        let p = self.cells[idx].with(|p| p);
        // SAFETY: as in `with_active`: the set is not mutated until a grace
        // period that must wait for `_guard`, which outlives the borrow.
        unsafe { &*p }
    }

    /// Runs `f` on the inactive set with exclusive access.
    ///
    /// # Safety
    /// The caller holds the writer lock of the owning VM, and a grace period
    /// ([`TwoSets::swap`]) has completed since this set was last active. `f`
    /// must not publish anything that readers of the *active* set could reach.
    pub(crate) unsafe fn with_inactive_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let idx = self.active.load(Ordering::Relaxed) ^ 1;
        // SAFETY: per the contract, no reader can hold a reference into the
        // inactive set and no other writer exists.
        self.cells[idx].with_mut(|p| f(unsafe { &mut *p }))
    }

    /// Runs `f` on the active set from the writer (shared access only).
    ///
    /// # Safety
    /// The caller holds the writer lock (so the active set cannot change).
    pub(crate) unsafe fn with_active_writer<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let idx = self.active.load(Ordering::Relaxed);
        // SAFETY: only the writer mutates, and only the inactive set.
        self.cells[idx].with(|p| f(unsafe { &*p }))
    }

    /// Runs `f` on `[active, inactive]` from the writer (shared access only).
    ///
    /// # Safety
    /// The caller holds the writer lock (so neither set changes while `f` runs).
    pub(crate) unsafe fn with_both_writer<R>(&self, f: impl FnOnce([&T; 2]) -> R) -> R {
        let idx = self.active.load(Ordering::Relaxed);
        // SAFETY: only the writer mutates a set, and it is running `f`, which
        // gets shared references only.
        self.cells[idx].with(|a| self.cells[idx ^ 1].with(|b| f(unsafe { [&*a, &*b] })))
    }

    /// KVM's `kvm_swap_active_memslots`: mark the generation in progress,
    /// publish the inactive set, wait for every reader of the old one, then
    /// set the final generation. Returns the new generation.
    ///
    /// # Safety
    /// The caller holds the writer lock of the owning VM.
    #[cfg(loom)]
    pub(crate) unsafe fn swap(&self, srcu: &Srcu) -> u64 {
        // SAFETY: the caller's contract.
        unsafe { self.swap_then(srcu, || {}, |_| {}) }
    }

    /// [`swap`](Self::swap), calling `published()` right after the new set
    /// is published and before the wait (where KVM releases
    /// `slots_arch_lock`), and `updated(new_generation)` after the grace
    /// period and *before* the final generation is stored, as KVM calls
    /// `kvm_arch_memslots_updated` (x86 relies on the order for the MMIO
    /// generation wrap).
    ///
    /// # Safety
    /// The caller holds the writer lock of the owning VM.
    pub(crate) unsafe fn swap_then(&self, srcu: &Srcu, published: impl FnOnce(), updated: impl FnOnce(u64)) -> u64 {
        let gen = self.generation.load(Ordering::Relaxed);
        debug_assert_eq!(gen & GEN_UPDATE_IN_PROGRESS, 0);
        // Visible to any reader that sees the new active index (release below).
        self.generation.store(gen | GEN_UPDATE_IN_PROGRESS, Ordering::Release);
        let old = self.active.load(Ordering::Relaxed);
        self.active.store(old ^ 1, Ordering::Release);
        published();
        srcu.synchronize();
        let new_gen = gen.wrapping_add(self.gen_step) & !GEN_UPDATE_IN_PROGRESS;
        updated(new_gen);
        self.generation.store(new_gen, Ordering::Release);
        new_gen
    }

    /// Both sets, exclusively (construction and teardown).
    pub(crate) fn both_mut<R>(&mut self, f: impl FnOnce(&mut T, &mut T) -> R) -> R {
        let [a, b] = &self.cells;
        a.with_mut(|pa| {
            b.with_mut(|pb| {
                // SAFETY: `&mut self` guarantees no reader or writer is active;
                // the two cells are distinct.
                unsafe { f(&mut *pa, &mut *pb) }
            })
        })
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model of publish / wait / replay with two reader threads and a writer.
    use super::*;
    use loom::thread;

    /// A "set": two fields the writer always changes together; a reader that
    /// sees them differ saw a half-made change. Loom's UnsafeCell additionally
    /// flags any read that overlaps the writer's mutation.
    #[derive(Debug, Clone, Copy)]
    struct Set {
        a: u64,
        b: u64,
    }

    /// Reader 0 uses the shared record (atomic decrements) unless
    /// `all_own`; the others, and reader 0 then, register their own and
    /// leave with a plain store (`read_lock_exclusive`). With `armable`,
    /// those records arm at their first section and enter with a plain
    /// store: loom cannot model the writer's `membarrier(2)`, so the model
    /// checks the executions in which the writer's grace periods found no
    /// record armed and skipped it (the arming handshake), and stops the
    /// writer before it changes anything once one needed it.
    fn run(readers: usize, updates: u64, all_own: bool, armable: bool) {
        loom::model(move || {
            let srcu = Arc::new(if armable { Srcu::new_armable() } else { Srcu::new(false, 1) });
            let sets = Arc::new(TwoSets::new(Set { a: 0, b: 0 }, Set { a: 0, b: 0 }, 0, 1));
            let writer_lock = Arc::new(Mutex::new(()));
            let mut handles = Vec::new();
            for r in 0..readers {
                let srcu = Arc::clone(&srcu);
                let sets = Arc::clone(&sets);
                handles.push(thread::spawn(move || {
                    let record = if r == 0 && !all_own { None } else { Some(srcu.register()) };
                    let mut cached: Option<(u64, Set)> = None;
                    let mut last_seen = 0;
                    for _ in 0..2 {
                        let guard = match record.as_deref() {
                            // SAFETY: this thread registered the record and
                            // is the only one making sections on it.
                            Some(rec) => unsafe { srcu.read_lock_exclusive(rec) },
                            None => srcu.read_lock(srcu.shared()),
                        };
                        let gen = sets.generation();
                        let seen = sets.with_active(&guard, |s| *s);
                        assert_eq!(seen.a, seen.b, "torn set");
                        assert!(seen.a >= last_seen, "went back in time");
                        last_seen = seen.a;
                        if let Some((g, c)) = cached {
                            // A cache validated by generation (read after the
                            // active set) holds what the active set holds.
                            let now = sets.with_active(&guard, |s| s.a);
                            if g == sets.generation() {
                                assert_eq!(c.a, now, "stale cache validated");
                            }
                        }
                        if gen & GEN_UPDATE_IN_PROGRESS == 0 {
                            cached = Some((gen, seen));
                        }
                        drop(guard);
                    }
                    if let Some(rec) = record {
                        srcu.unregister(&rec);
                    }
                }));
            }
            let _w = writer_lock.lock().unwrap();
            for v in 1..=updates {
                // SAFETY: single writer holding the lock; inactive set quiescent.
                unsafe {
                    sets.with_inactive_mut(|s| {
                        s.a = v;
                        s.b = v;
                    });
                    sets.swap(&srcu);
                    if srcu.heavy_needed() {
                        break;
                    }
                    sets.with_inactive_mut(|s| {
                        s.a = v;
                        s.b = v;
                    });
                }
            }
            for h in handles {
                h.join().unwrap();
            }
        });
    }

    #[test]
    fn loom_one_reader_two_updates() {
        run(1, 2, false, false);
    }

    #[test]
    fn loom_one_exclusive_reader_two_updates() {
        run(1, 2, true, false);
    }

    #[test]
    fn loom_two_readers_one_update() {
        run(2, 1, false, false);
    }

    #[test]
    fn loom_armed_reader_two_updates() {
        run(1, 2, true, true);
    }

    #[test]
    fn loom_armed_and_shared_readers_one_update() {
        run(2, 1, false, true);
    }
}
