//! The rust-vmm `vm-memory` 0.18 interface: code written against
//! [`GuestMemoryBackend`] / [`GuestMemoryRegion`] / [`Bytes`](vm_memory::Bytes) /
//! [`GuestAddressSpace`] (virtio queues, device emulation, vhost-user
//! backends) runs unmodified on memslots.
//!
//! - [`MemslotsSnapshot`]: a [`GuestMemoryBackend`] over a *snapshot* of one
//!   address space: the slots that were valid and backed when it was taken,
//!   each a [`MemslotsRegion`] holding the slot's description and its
//!   `Arc<HostMemory>`. Being a snapshot, it does **not** see later slot
//!   changes, and it keeps the mappings of its slots alive (deleted slots
//!   included) until it is dropped: take a fresh one per request.
//! - [`MemslotsAddressSpace`]: a [`GuestAddressSpace`] whose
//!   [`memory()`](GuestAddressSpace::memory) returns a snapshot of the
//!   *current* slots (cached until the address space's memslot generation
//!   changes) — the way `GuestMemoryAtomic` is used by rust-vmm devices.
//!
//! What is in a snapshot: valid (not INVALID), backed slots, READONLY ones
//! included (a READONLY slot refuses *guest* writes; a device model using
//! vm-memory writes host memory, as it would into a ROM region of a
//! `GuestMemoryMmap`). Holes, INVALID and unbacked slots are absent.
//!
//! Dirty tracking: each region's bitmap ([`SlotDirtyLog`]) forwards writes to
//! the memslots dirty log of the slot (by slot id and host address, so a
//! write into a slot that was moved since the snapshot still marks the same
//! slot-relative pages; a deleted or re-created slot is not marked). It does
//! so only while the slot logs dirty pages, and costs one read section per
//! write call.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};

use memslots::{ArchHooks, NoArch, SlotDesc, PAGE_SHIFT};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice, BS};
use vm_memory::guest_memory::Result as GmResult;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use crate::guest::{ClearOnUpdate, GuestMemory, MemLayers, MemVm, Slot};
use crate::host::HostMemory;

/// The dirty log of one memslot, as a vm-memory [`Bitmap`]: region-relative
/// byte offsets are slot-relative, so page `offset >> 12` of the slot is
/// marked in the memslots dirty log (bitmap) of the slot with this id and
/// host address.
pub struct SlotDirtyLog<H: ArchHooks = NoArch> {
    vm: Arc<MemVm<H>>,
    as_id: u16,
    id: u16,
    hva: u64,
}

impl<H: ArchHooks> std::fmt::Debug for SlotDirtyLog<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotDirtyLog")
            .field("as_id", &self.as_id)
            .field("id", &self.id)
            .field("hva", &format_args!("{:#x}", self.hva))
            .finish_non_exhaustive()
    }
}

impl<H: ArchHooks> SlotDirtyLog<H> {
    /// Runs `f` on the current slot with this id if it is still the same
    /// memory (same host address), inside a read section.
    fn with_slot<R>(
        &self,
        f: impl FnOnce(&memslots::ReadGuard<'_, MemLayers<H>>, &Slot<H::SlotData>) -> R,
    ) -> Option<R> {
        let g = self.vm.read();
        let slot = g.id_to_memslot(self.as_id, self.id)?;
        (slot.userspace_addr == self.hva).then(|| f(&g, slot))
    }
}

impl<'a, H: ArchHooks> WithBitmapSlice<'a> for SlotDirtyLog<H> {
    type S = SlotDirtySlice<'a, H>;
}

impl<H: ArchHooks> Bitmap for SlotDirtyLog<H> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        self.with_slot(|g, slot| {
            if !slot.logs_dirty_pages() {
                return;
            }
            let first = offset as u64 >> PAGE_SHIFT;
            let last = (offset as u64).saturating_add(len as u64 - 1) >> PAGE_SHIFT;
            for rel in first..=last.min(slot.npages.saturating_sub(1)) {
                let _ = g.mark_slot_page_dirty(slot, rel);
            }
        });
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let rel = offset as u64 >> PAGE_SHIFT;
        self.with_slot(|_, slot| slot.dirty_bitmap().is_some_and(|b| rel < slot.npages && b.test(rel))).unwrap_or(false)
    }

    fn slice_at(&self, offset: usize) -> SlotDirtySlice<'_, H> {
        SlotDirtySlice { log: self, base: offset }
    }
}

/// A [`SlotDirtyLog`] from a byte offset on ([`BitmapSlice`]).
pub struct SlotDirtySlice<'a, H: ArchHooks = NoArch> {
    log: &'a SlotDirtyLog<H>,
    base: usize,
}

impl<H: ArchHooks> std::fmt::Debug for SlotDirtySlice<'_, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotDirtySlice").field("log", self.log).field("base", &self.base).finish()
    }
}

impl<H: ArchHooks> Clone for SlotDirtySlice<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<H: ArchHooks> Copy for SlotDirtySlice<'_, H> {}

impl<'a, H: ArchHooks> WithBitmapSlice<'_> for SlotDirtySlice<'a, H> {
    type S = SlotDirtySlice<'a, H>;
}

impl<H: ArchHooks> BitmapSlice for SlotDirtySlice<'_, H> {}

impl<H: ArchHooks> Bitmap for SlotDirtySlice<'_, H> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.log.mark_dirty(self.base.saturating_add(offset), len);
    }
    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.base.saturating_add(offset))
    }
    fn slice_at(&self, offset: usize) -> Self {
        SlotDirtySlice { log: self.log, base: self.base.saturating_add(offset) }
    }
}

/// One memslot as a vm-memory region: guest range, host mapping, dirty log.
// `repr(C)`: what every access reads comes first, in one cache line.
#[repr(C)]
pub struct MemslotsRegion<H: ArchHooks = NoArch> {
    start: GuestAddress,
    len: usize,
    /// Address of the region's first byte in `mem` (its provenance exposed),
    /// so an access does not have to read the `HostMemory` object.
    host: usize,
    /// Byte offset of the slot's first page in `mem`.
    offset: usize,
    mem: Arc<HostMemory>,
    dirty: SlotDirtyLog<H>,
    desc: SlotDesc,
    file_offset: Option<FileOffset>,
}

impl<H: ArchHooks> std::fmt::Debug for MemslotsRegion<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemslotsRegion")
            .field("start", &self.start)
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("mem", &self.mem)
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

impl<H: ArchHooks> MemslotsRegion<H> {
    /// The host pointer of region byte `off` (`off <= len`): inside the
    /// mapping, or one past its end, as `offset + len <= mem.len()` was
    /// checked when the region was built.
    #[inline]
    fn host_ptr(&self, off: usize) -> *mut u8 {
        // `host` is the exposed address of byte `offset` of the mapping,
        // which `self.mem` keeps alive as long as `self`.
        std::ptr::with_exposed_provenance_mut::<u8>(self.host + off)
    }

    /// The slot as it was when the snapshot was taken.
    pub fn desc(&self) -> &SlotDesc {
        &self.desc
    }
    /// The host mapping.
    pub fn host_memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }
    /// Byte offset of the region's first byte in [`host_memory`](Self::host_memory).
    pub fn host_offset(&self) -> usize {
        self.offset
    }
    /// Whether the slot is `KVM_MEM_READONLY` (for the guest).
    pub fn is_readonly(&self) -> bool {
        self.desc.is_readonly()
    }
}

impl<H: ArchHooks> GuestMemoryRegion for MemslotsRegion<H> {
    type B = SlotDirtyLog<H>;

    fn len(&self) -> GuestUsize {
        self.len as GuestUsize
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, SlotDirtyLog<H>> {
        self.dirty.slice_at(0)
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GmResult<*mut u8> {
        let off = usize::try_from(addr.raw_value()).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        if off >= self.len {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        Ok(self.host_ptr(off))
    }

    fn file_offset(&self) -> Option<&FileOffset> {
        self.file_offset.as_ref()
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GmResult<VolatileSlice<'_, SlotDirtySlice<'_, H>>> {
        let off = usize::try_from(offset.raw_value()).map_err(|_| GuestMemoryError::InvalidBackendAddress)?;
        if off > self.len || count > self.len - off {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        let p = self.host_ptr(off);
        // SAFETY: `[p, p + count)` is inside the region, which is inside the
        // mapping (checked above and at construction); the mapping lives as
        // long as `self` (we hold an Arc), which the slice borrows. Guest
        // memory is only accessed volatilely / by copies through raw pointers.
        Ok(unsafe { VolatileSlice::with_bitmap(p, count, self.dirty.slice_at(off), None) })
    }

    fn is_hugetlbfs(&self) -> Option<bool> {
        Some(self.mem.is_hugetlb())
    }
}

impl<H: ArchHooks> GuestMemoryRegionBytes for MemslotsRegion<H> {}

/// A [`GuestMemoryBackend`] over the slots of one address space as they were
/// when it was taken (see the [module docs](self)).
pub struct MemslotsSnapshot<H: ArchHooks = NoArch> {
    as_id: u16,
    generation: u64,
    regions: Vec<Arc<MemslotsRegion<H>>>,
    /// Start address of each region, contiguous for the search.
    starts: Vec<u64>,
}

impl<H: ArchHooks> std::fmt::Debug for MemslotsSnapshot<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemslotsSnapshot")
            .field("as_id", &self.as_id)
            .field("generation", &self.generation)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl<H: ArchHooks> MemslotsSnapshot<H> {
    /// The address space.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }
    /// The memslot generation of the address space when the snapshot was taken.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The regions, in guest address order.
    pub fn regions(&self) -> &[Arc<MemslotsRegion<H>>] {
        &self.regions
    }
}

impl<H: ArchHooks> GuestMemoryBackend for MemslotsSnapshot<H> {
    type R = MemslotsRegion<H>;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&MemslotsRegion<H>> {
        let a = addr.raw_value();
        let i = floor_index(&self.starts, a)?;
        let r = &*self.regions[i];
        (a - r.start.raw_value() < r.len as u64).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &MemslotsRegion<H>> {
        self.regions.iter().map(|r| &**r)
    }
}

/// Index of the greatest element `<= x` of the sorted `v`. The loop has a
/// fixed trip count per length and its step compiles to a conditional move:
/// no mispredicted branch per probe, as there is in a plain binary search on
/// random addresses.
#[inline]
fn floor_index(v: &[u64], x: u64) -> Option<usize> {
    if v.first().is_none_or(|&f| f > x) {
        return None;
    }
    let (mut base, mut len) = (0usize, v.len());
    while len > 1 {
        let half = len / 2;
        // A conditional move, not a branch (random addresses mispredict).
        base = core::hint::select_unpredictable(v[base + half] <= x, base + half, base);
        len -= half;
    }
    Some(base)
}

impl<H: ArchHooks> GuestMemory<H> {
    /// A vm-memory view of the current slots of address space `as_id` (valid,
    /// backed slots). It does not see later changes, and keeps its mappings
    /// alive while it lives.
    pub fn snapshot(&self, as_id: u16) -> Arc<MemslotsSnapshot<H>> {
        let vm = self.vm_arc();
        let g = vm.read();
        // Read the generation before the slots: if a publish races, the
        // snapshot is tagged with the older generation and rebuilt next time.
        let generation = vm.generation(as_id).unwrap_or(0);
        let regions = g
            .slots(as_id)
            .filter(|s| !s.is_invalid())
            .filter_map(|s| {
                let b = s.arch().0.as_ref()?;
                let len = usize::try_from(s.size()).ok()?;
                // The hook only attaches a mapping that contains the slot; checked anyway.
                let host = b.memory().ptr_at(b.offset(), len)?.expose_provenance();
                let mem = Arc::clone(b.memory());
                let file_offset =
                    mem.file().map(|f| FileOffset::from_arc(Arc::clone(f), mem.file_offset() + b.offset() as u64));
                Some(Arc::new(MemslotsRegion {
                    desc: *s.desc(),
                    start: GuestAddress(s.base_gfn << PAGE_SHIFT),
                    len,
                    host,
                    offset: b.offset(),
                    mem,
                    file_offset,
                    dirty: SlotDirtyLog { vm: Arc::clone(vm), as_id, id: s.id, hva: s.userspace_addr },
                }))
            })
            .collect::<Vec<_>>();
        let starts = regions.iter().map(|r| r.start.raw_value()).collect();
        Arc::new(MemslotsSnapshot { as_id, generation, regions, starts })
    }

    /// A vm-memory [`GuestAddressSpace`] over address space `as_id`. Its
    /// cached snapshot is dropped at every publish of the address space's
    /// slots and when a slot of the VM is deleted (after the delete's grace
    /// period), so it never keeps a deleted slot's mapping alive on its own.
    pub fn address_space(&self, as_id: u16) -> MemslotsAddressSpace<H> {
        let cache: Arc<SnapshotCache<H>> = Arc::new(SnapshotCache::new(as_id));
        let weak: std::sync::Weak<dyn ClearOnUpdate> = Arc::downgrade(&(Arc::clone(&cache) as Arc<dyn ClearOnUpdate>));
        self.mem_hooks().add_cache(weak);
        MemslotsAddressSpace { mem: self.clone(), as_id, cache }
    }
}

/// The snapshot a [`MemslotsAddressSpace`] (and its clones) reuse.
///
/// `memory()` reads it without a lock (an `ArcSwap` load, as
/// `GuestMemoryAtomic` does). Every publish of the address space clears it
/// (`MemHooks::memslots_updated`), and a delete clears it again once the
/// slot is gone from both sets. Replacing it (`memory()` after a clear) and
/// clearing it are serialised by `update`, and a snapshot is taken under
/// that lock: one taken before a publish is stored before the clear that
/// follows the publish, and so is cleared; one taken after the publish and
/// before the final generation is stored carries the in-progress bit and is
/// not stored. A cached snapshot is therefore current, and a slot deleted
/// and cleared is not kept alive by the cache. Cleared, it holds `empty`, a snapshot with no regions whose
/// generation has [`GEN_UPDATE_IN_PROGRESS`](memslots::GEN_UPDATE_IN_PROGRESS)
/// set, which `memory()` never returns from the cache.
struct SnapshotCache<H: ArchHooks> {
    current: ArcSwap<MemslotsSnapshot<H>>,
    empty: Arc<MemslotsSnapshot<H>>,
    update: Mutex<()>,
}

impl<H: ArchHooks> SnapshotCache<H> {
    fn new(as_id: u16) -> Self {
        let empty = Arc::new(MemslotsSnapshot { as_id, generation: u64::MAX, regions: Vec::new(), starts: Vec::new() });
        SnapshotCache { current: ArcSwap::new(Arc::clone(&empty)), empty, update: Mutex::new(()) }
    }

    /// Stores `s` (or the empty snapshot) under the update lock; the old
    /// one is dropped after the lock is released (the last reference to a
    /// mapping unmaps it).
    fn replace_locked(&self, lock: std::sync::MutexGuard<'_, ()>, s: Option<Arc<MemslotsSnapshot<H>>>) {
        let old = self.current.swap(s.unwrap_or_else(|| Arc::clone(&self.empty)));
        drop(lock);
        drop(old);
    }
}

impl<H: ArchHooks> ClearOnUpdate for SnapshotCache<H> {
    fn clear(&self, as_id: u16) {
        let lock = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        if self.current.load().as_id == as_id {
            self.replace_locked(lock, None);
        }
    }
}

/// What [`MemslotsAddressSpace`]'s [`memory()`](GuestAddressSpace::memory)
/// returns: the current snapshot, borrowed from the address space's cache
/// without touching its reference count (an `arc_swap` guard, as
/// `GuestMemoryAtomic`'s `GuestMemoryLoadGuard`), or owned when the
/// snapshot was just taken. It keeps the snapshot (and so its mappings)
/// alive while it lives, like an `Arc`; a thread holding many guards at once
/// makes the later ones reference counted. Clones are reference counted.
pub struct SnapshotGuard<H: ArchHooks = NoArch> {
    guard: Guard<Arc<MemslotsSnapshot<H>>>,
}

impl<H: ArchHooks> SnapshotGuard<H> {
    /// The snapshot as an `Arc` (one reference count more).
    pub fn to_arc(&self) -> Arc<MemslotsSnapshot<H>> {
        Arc::clone(&self.guard)
    }

    /// Whether two guards show the same snapshot.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.guard, &b.guard)
    }
}

impl<H: ArchHooks> Clone for SnapshotGuard<H> {
    fn clone(&self) -> Self {
        SnapshotGuard { guard: Guard::from_inner(self.to_arc()) }
    }
}

impl<H: ArchHooks> std::ops::Deref for SnapshotGuard<H> {
    type Target = MemslotsSnapshot<H>;
    #[inline]
    fn deref(&self) -> &MemslotsSnapshot<H> {
        &self.guard
    }
}

impl<H: ArchHooks> std::fmt::Debug for SnapshotGuard<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// A [`GuestAddressSpace`] over one address space of a [`GuestMemory`]:
/// [`memory()`](GuestAddressSpace::memory) returns a snapshot of the current
/// slots, reused while the memslot generation is unchanged. Clones share the cache.
pub struct MemslotsAddressSpace<H: ArchHooks = NoArch> {
    mem: GuestMemory<H>,
    as_id: u16,
    cache: Arc<SnapshotCache<H>>,
}

impl<H: ArchHooks> std::fmt::Debug for MemslotsAddressSpace<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemslotsAddressSpace")
            .field("mem", &self.mem)
            .field("as_id", &self.as_id)
            .finish_non_exhaustive()
    }
}

impl<H: ArchHooks> Clone for MemslotsAddressSpace<H> {
    fn clone(&self) -> Self {
        MemslotsAddressSpace { mem: self.mem.clone(), as_id: self.as_id, cache: Arc::clone(&self.cache) }
    }
}

impl<H: ArchHooks> MemslotsAddressSpace<H> {
    /// `memory()` after a change: a fresh snapshot, cached unless it was
    /// taken while an update was in progress (it may be stale then).
    #[cold]
    fn refresh(&self) -> SnapshotGuard<H> {
        let update = self.cache.update.lock().unwrap_or_else(PoisonError::into_inner);
        let s = self.mem.snapshot(self.as_id);
        let keep = s.generation & memslots::GEN_UPDATE_IN_PROGRESS == 0;
        self.cache.replace_locked(update, keep.then(|| Arc::clone(&s)));
        SnapshotGuard { guard: Guard::from_inner(s) }
    }

    /// The guest memory.
    pub fn guest_memory(&self) -> &GuestMemory<H> {
        &self.mem
    }
    /// The address space.
    pub fn as_id(&self) -> u16 {
        self.as_id
    }
}

impl<H: ArchHooks> GuestAddressSpace for MemslotsAddressSpace<H> {
    type M = MemslotsSnapshot<H>;
    type T = SnapshotGuard<H>;

    #[inline]
    fn memory(&self) -> SnapshotGuard<H> {
        let guard = self.cache.current.load();
        // Every publish of this address space clears the cache
        // (`MemHooks::memslots_updated`), so a cached snapshot is current:
        // no generation to compare (one dependent chain of loads less than
        // a check against the VM). The empty snapshot has the in-progress
        // bit, so it is never returned from here.
        if guard.generation & memslots::GEN_UPDATE_IN_PROGRESS == 0 {
            return SnapshotGuard { guard };
        }
        drop(guard);
        self.refresh()
    }
}
