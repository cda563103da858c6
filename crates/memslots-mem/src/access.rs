//! Access to guest memory by guest physical address.
//!
//! Every access runs inside ONE read section: a VM-wide section
//! ([`MemGuard`], from [`GuestMemory::section`], any address space) or a
//! vCPU's ([`VcpuMemGuard`], from [`GuestVcpu::section`], the vCPU's current
//! address space). The one-shot methods on [`GuestMemory`] and [`GuestVcpu`]
//! open a section per call. Within a section the slots seen, and so their
//! host mappings, stay alive and unchanged; a writer changing slots waits for
//! the section to end, so keep sections short, and never change slots
//! ([`GuestMemory::set_region`], [`GuestMemory::delete_region`]) or take a
//! dirty log on a thread that holds one: it would wait for itself (the
//! memslots rule). Each chunk of an access uses the slot its own lookup
//! returned (two lookups may see two published states).
//!
//! ## Bounds
//!
//! For any guest address and length, nothing outside mapped host memory is
//! touched: each chunk is checked against its slot (the chunk ends at the
//! slot's end) and against the slot's mapping (`offset + len <= mapping
//! size`) before any byte is copied.
//!
//! ## Errors and partial progress
//!
//! A multi-slot access stops at the first guest address it cannot access and
//! reports it with the bytes done before it ([`AccessError`]): the prefix
//! `buf[..done]` was read or written. Holes and MMIO ([`NoSlot`]), slots being
//! deleted or moved ([`Invalid`]), writes to READONLY slots ([`ReadOnly`], what
//! a vCPU sees as an MMIO exit) and slots without host memory ([`Unbacked`])
//! are told apart.
//!
//! ## Dirty tracking
//!
//! Writes mark every page they touch dirty, after writing it: in the slot's
//! dirty bitmap (VM sections) or in the vCPU's dirty ring when rings are on
//! (vCPU sections), as KVM's `kvm_write_guest` does. A vCPU whose ring
//! reaches its soft limit must exit to userspace
//! ([`GuestVcpu::take_dirty_ring_full`]). With dirty rings on and no
//! ring-with-bitmap, writes through a VM section have nowhere to be recorded
//! (KVM warns in that case); use a vCPU section.
//!
//! ## Volatile slices
//!
//! [`MemGuard::slice`] and [`VcpuMemGuard::slice`] give a vm-memory
//! [`VolatileSlice`] of host memory, borrowed from the section: it cannot
//! outlive it, so the memory it points to cannot be unmapped under it.
//!
//! ```
//! use memslots_mem::{Access, GuestMemory, MapOptions};
//! use memslots_mem::vm_memory::Bytes;
//! let mem = GuestMemory::new(memslots::Config::default())?;
//! let ram = mem.map_anonymous(0x1000, &MapOptions::new())?;
//! mem.set_region(0, 0, 0, &ram, 0, 0x1000)?;
//! let section = mem.section();
//! let slice = section.slice(0, 0x100, 0x10, Access::Write)?;
//! slice.write_obj(7u32, 4)?;
//! assert_eq!(section.read_obj::<u32>(0, 0x104)?, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```compile_fail
//! use memslots_mem::{Access, GuestMemory};
//! let mem = GuestMemory::new(memslots::Config::default()).unwrap();
//! let slice = {
//!     let section = mem.section();
//!     section.slice(0, 0, 8, Access::Read).unwrap()
//! }; // error: `section` does not live long enough
//! ```
//!
//! [`NoSlot`]: AccessErrorKind::NoSlot
//! [`Invalid`]: AccessErrorKind::Invalid
//! [`ReadOnly`]: AccessErrorKind::ReadOnly
//! [`Unbacked`]: AccessErrorKind::Unbacked

use std::mem::{size_of, MaybeUninit};
use std::sync::atomic::Ordering;

use memslots::{ArchHooks, NoArch, ReadGuard, VcpuGuard, PAGE_SHIFT, PAGE_SIZE};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::{ByteValued, VolatileSlice};

use crate::guest::{GuestMemory, GuestVcpu, MemLayers, Slot};

/// Why a guest access stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum AccessErrorKind {
    /// No slot covers the address: a hole, or MMIO.
    #[error("no memslot (hole or MMIO)")]
    NoSlot,
    /// The slot is being deleted or moved (INVALID): a vCPU would see MMIO.
    #[error("memslot invalid (being deleted or moved)")]
    Invalid,
    /// A write to a `KVM_MEM_READONLY` slot: an MMIO exit for a vCPU.
    #[error("write to a read-only memslot (MMIO exit)")]
    ReadOnly,
    /// The slot's host range is not inside a registered mapping.
    #[error("memslot has no host memory")]
    Unbacked,
    /// An atomic access not aligned to its size.
    #[error("misaligned atomic access")]
    Misaligned,
    /// A volatile slice would cross the end of its slot (slices are contiguous host memory).
    #[error("range crosses the end of the memslot")]
    CrossesSlot,
    /// The address space does not exist.
    #[error("no such address space")]
    NoAddressSpace,
    /// The range wraps past the end of the guest physical address space.
    #[error("address overflow")]
    AddressOverflow,
}

/// A failed guest access: `done` bytes (from the start) were accessed, then
/// guest address `gpa` could not be, for `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("guest access failed at gpa {gpa:#x} after {done} bytes: {kind}")]
pub struct AccessError {
    /// Bytes accessed before the failure.
    pub done: usize,
    /// First guest address not accessed.
    pub gpa: u64,
    /// Why.
    pub kind: AccessErrorKind,
}

impl AccessError {
    const fn at(done: usize, gpa: u64, kind: AccessErrorKind) -> Self {
        AccessError { done, gpa, kind }
    }
}

/// What a volatile slice is for: a write slice needs a writable slot and
/// marks the pages it writes dirty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reading only (works on READONLY slots; writes through the slice are not tracked).
    Read,
    /// Reading and writing (fails on READONLY slots; writes are marked dirty).
    Write,
}

/// Integers that can be accessed atomically in guest memory: `u8`, `u16`,
/// `u32`, `u64` (sealed).
pub trait GuestAtomic: sealed::Sealed + Copy + Eq + std::fmt::Debug + Send + Sync + 'static {
    #[doc(hidden)]
    /// # Safety
    /// `p` is valid for reads of `Self`, aligned, and only accessed atomically while in use.
    unsafe fn atomic_load(p: *mut u8, order: Ordering) -> Self;
    #[doc(hidden)]
    /// # Safety
    /// As for `atomic_load`, and valid for writes.
    unsafe fn atomic_store(p: *mut u8, v: Self, order: Ordering);
    #[doc(hidden)]
    /// # Safety
    /// As for `atomic_store`.
    unsafe fn atomic_compare_exchange(
        p: *mut u8,
        current: Self,
        new: Self,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Self, Self>;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! guest_atomic {
    ($($t:ty => $a:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl GuestAtomic for $t {
            #[inline]
            unsafe fn atomic_load(p: *mut u8, order: Ordering) -> Self {
                // SAFETY: the caller guarantees `p` is valid, aligned for
                // `$t` and only accessed atomically meanwhile.
                unsafe { <$a>::from_ptr(p.cast::<$t>()) }.load(order)
            }
            #[inline]
            unsafe fn atomic_store(p: *mut u8, v: Self, order: Ordering) {
                // SAFETY: as in `atomic_load`, and `p` is writable.
                unsafe { <$a>::from_ptr(p.cast::<$t>()) }.store(v, order)
            }
            #[inline]
            unsafe fn atomic_compare_exchange(
                p: *mut u8,
                current: Self,
                new: Self,
                success: Ordering,
                failure: Ordering,
            ) -> Result<Self, Self> {
                // SAFETY: as in `atomic_store`.
                unsafe { <$a>::from_ptr(p.cast::<$t>()) }.compare_exchange(current, new, success, failure)
            }
        }
    )*};
}

guest_atomic!(
    u8 => std::sync::atomic::AtomicU8,
    u16 => std::sync::atomic::AtomicU16,
    u32 => std::sync::atomic::AtomicU32,
    u64 => std::sync::atomic::AtomicU64
);

/// How the engine finds slots and records dirty pages: a VM section in one
/// address space, or a vCPU section.
trait Lookup {
    /// The inner layer's slot data.
    type D;
    fn memslot(&self, gfn: u64) -> Option<&Slot<Self::D>>;
    fn mark(&self, slot: &Slot<Self::D>, rel: u64);
    /// For a read at `gpa`: the host pointer and the bytes contiguous from
    /// it, without touching the slot object, when that is known to be safe;
    /// `None` sends the caller to the checked path ([`resolve`]).
    #[inline]
    fn fast_read(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        let _ = gpa;
        None
    }
}

/// Where dirty pages of a volatile slice are recorded.
trait Marker<D> {
    fn mark(&self, slot: &Slot<D>, rel: u64);
}

struct VmLookup<'r, 'g, H: ArchHooks> {
    guard: &'r ReadGuard<'g, MemLayers<H>>,
    as_id: u16,
}

impl<H: ArchHooks> Lookup for VmLookup<'_, '_, H> {
    type D = H::SlotData;
    #[inline]
    fn memslot(&self, gfn: u64) -> Option<&Slot<H::SlotData>> {
        self.guard.gfn_to_memslot(self.as_id, gfn)
    }
    #[inline]
    fn mark(&self, slot: &Slot<H::SlotData>, rel: u64) {
        // Without a vCPU the mark goes to the bitmap; with dirty rings and no
        // bitmaps there is nowhere to record it (KVM warns): nothing to do.
        let _ = self.guard.mark_slot_page_dirty(slot, rel);
    }
    /// The gfn index entry gives the slot's host address and extent (and
    /// refuses INVALID slots) without touching the slot object. That host
    /// range is mapped if the slot is backed: the hook attached a mapping
    /// containing all of it, kept alive by the slot, which this section
    /// keeps alive. Whether it is backed is in the slot object; but while
    /// [`MemHooks::all_backed`] holds, *checked after the lookup*, every slot
    /// the lookup can have found is backed: an unbacked slot is counted
    /// before it is published (so a lookup that found it, through the
    /// acquire of the published set, sees the count), and uncounted only
    /// after a grace period that waits for this section.
    #[inline]
    fn fast_read(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        let many = self.guard.gfn_to_hva_many(self.as_id, gpa >> PAGE_SHIFT, false).ok()?;
        fast_read_ptr(self.guard, many, gpa)
    }
}

/// The fast read path's pointer: `(hva, pages)` is a `gfn_to_hva_many`
/// result for `gpa`'s page, found inside `guard`'s section. `None` (use the
/// checked path) unless every slot is backed (see [`VmLookup::fast_read`]).
#[inline]
fn fast_read_ptr<H: ArchHooks>(
    guard: &ReadGuard<'_, MemLayers<H>>,
    (hva, pages): (u64, u64),
    gpa: u64,
) -> Option<(*mut u8, usize)> {
    if !guard.vm().hooks().outer.all_backed() {
        return None;
    }
    let in_page = gpa & (PAGE_SIZE - 1);
    // `pages >= 1` pages from gpa's page to the slot's end.
    let avail = usize::try_from((pages << PAGE_SHIFT) - in_page).ok()?;
    let addr = usize::try_from(hva + in_page).ok()?;
    Some((std::ptr::with_exposed_provenance_mut::<u8>(addr), avail))
}

impl<H: ArchHooks> Marker<H::SlotData> for ReadGuard<'_, MemLayers<H>> {
    fn mark(&self, slot: &Slot<H::SlotData>, rel: u64) {
        let _ = self.mark_slot_page_dirty(slot, rel);
    }
}

impl<H: ArchHooks> Lookup for VcpuMemGuard<'_, H> {
    type D = H::SlotData;
    #[inline]
    fn memslot(&self, gfn: u64) -> Option<&Slot<H::SlotData>> {
        self.guard.gfn_to_memslot(gfn)
    }
    #[inline]
    fn mark(&self, slot: &Slot<H::SlotData>, rel: u64) {
        self.vcpu.note_mark(self.guard.mark_slot_page_dirty(slot, rel));
    }
    /// As [`VmLookup::fast_read`], from the vCPU's cache (or the gfn index
    /// entry it is filled from): the same fields, the same argument.
    #[inline]
    fn fast_read(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        let many = self.guard.gfn_to_hva_many(gpa >> PAGE_SHIFT, false).ok()?;
        fast_read_ptr(self.guard.vm_guard(), many, gpa)
    }
}

impl<H: ArchHooks> Marker<H::SlotData> for VcpuMemGuard<'_, H> {
    fn mark(&self, slot: &Slot<H::SlotData>, rel: u64) {
        Lookup::mark(self, slot, rel);
    }
}

/// A resolved guest address: its slot, host pointer, and the bytes that are
/// contiguous from there in both the slot and its mapping.
struct Chunk<'g, D> {
    slot: &'g Slot<D>,
    host: *mut u8,
    avail: usize,
}

/// Translates `gpa`; every check happens here, before memory is touched.
#[inline]
fn resolve<L: Lookup + ?Sized>(l: &L, gpa: u64, write: bool) -> Result<Chunk<'_, L::D>, AccessErrorKind> {
    check(l.memslot(gpa >> PAGE_SHIFT), gpa, write)
}

/// The checks of [`resolve`] on the slot found for `gpa`.
#[inline]
fn check<D>(slot: Option<&Slot<D>>, gpa: u64, write: bool) -> Result<Chunk<'_, D>, AccessErrorKind> {
    let slot = slot.ok_or(AccessErrorKind::NoSlot)?;
    if slot.is_invalid() {
        return Err(AccessErrorKind::Invalid);
    }
    if write && slot.is_readonly() {
        return Err(AccessErrorKind::ReadOnly);
    }
    let backing = slot.arch().0.as_ref().ok_or(AccessErrorKind::Unbacked)?;
    // The slot covers gpa's gfn, so 0 <= in_slot < slot size.
    let in_slot = gpa - (slot.base_gfn << PAGE_SHIFT);
    let slot_left = slot.size() - in_slot;
    let mem = backing.memory();
    let off = usize::try_from(in_slot).ok().and_then(|o| backing.offset().checked_add(o));
    let off = off.filter(|&o| o < mem.len()).ok_or(AccessErrorKind::Unbacked)?;
    let map_left = mem.len() - off;
    let avail = usize::try_from(slot_left).map_or(map_left, |s| s.min(map_left));
    // The mapping check passed: `off < mem.len()`.
    let host = mem.ptr_at(off, avail).ok_or(AccessErrorKind::Unbacked)?;
    Ok(Chunk { slot, host, avail })
}

/// Marks the pages of `[gpa, gpa + len)` (inside `slot`, `len > 0`) dirty.
#[inline]
fn mark_range<L: Lookup + ?Sized>(l: &L, slot: &Slot<L::D>, gpa: u64, len: usize) {
    if !slot.logs_dirty_pages() || len == 0 {
        return;
    }
    let first = (gpa >> PAGE_SHIFT) - slot.base_gfn;
    let last = ((gpa + (len as u64 - 1)) >> PAGE_SHIFT) - slot.base_gfn;
    for rel in first..=last {
        l.mark(slot, rel);
    }
}

/// Walks `[gpa, gpa + len)` slot by slot, calling `op(host, buf_offset, n)`
/// for each contiguous chunk, after all its checks passed.
#[inline]
fn walk<L: Lookup + ?Sized>(
    l: &L,
    gpa: u64,
    len: usize,
    write: bool,
    mut op: impl FnMut(*mut u8, usize, usize),
) -> Result<(), AccessError> {
    let mut done = 0usize;
    while done < len {
        let Some(cur) = gpa.checked_add(done as u64) else {
            return Err(AccessError::at(done, gpa.wrapping_add(done as u64), AccessErrorKind::AddressOverflow));
        };
        if !write {
            if let Some((host, avail)) = l.fast_read(cur) {
                let n = avail.min(len - done);
                op(host, done, n);
                done += n;
                continue;
            }
        }
        let c = resolve(l, cur, write).map_err(|k| AccessError::at(done, cur, k))?;
        let n = c.avail.min(len - done);
        op(c.host, done, n);
        if write {
            mark_range(l, c.slot, cur, n);
        }
        done += n;
    }
    Ok(())
}

fn read_impl<L: Lookup + ?Sized>(l: &L, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
    let dst = buf.as_mut_ptr();
    walk(l, gpa, buf.len(), false, |host, off, n| {
        // SAFETY: `resolve` checked `[host, host + n)` lies inside a live
        // mapping (kept alive by the slot, which the read section keeps
        // alive); `off + n <= buf.len()`; `buf` is a Rust allocation distinct
        // from the mapping (no references into mappings exist).
        unsafe { std::ptr::copy_nonoverlapping(host, dst.add(off), n) }
    })
}

fn write_impl<L: Lookup + ?Sized>(l: &L, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
    let src = buf.as_ptr();
    walk(l, gpa, buf.len(), true, |host, off, n| {
        // SAFETY: as in `read_impl`, and the mapping is writable (all
        // mappings are PROT_READ | PROT_WRITE).
        unsafe { std::ptr::copy_nonoverlapping(src.add(off), host, n) }
    })
}

#[inline]
fn read_obj_impl<T: ByteValued, L: Lookup + ?Sized>(l: &L, gpa: u64) -> Result<T, AccessError> {
    let size = size_of::<T>();
    let mut v = MaybeUninit::<T>::zeroed();
    if let Some((host, avail)) = l.fast_read(gpa) {
        if avail >= size {
            // SAFETY: `[host, host + size)` is inside a live mapping (see
            // `Lookup::fast_read`); `v` is a distinct local of `size` bytes.
            unsafe { std::ptr::copy_nonoverlapping(host, v.as_mut_ptr().cast::<u8>(), size) };
            // SAFETY: all `size` bytes were just written; any bytes are a valid `T`.
            return Ok(unsafe { v.assume_init() });
        }
    }
    match resolve(l, gpa, false) {
        Ok(c) if c.avail >= size => {
            // SAFETY: `[host, host + size)` is inside a live mapping (checked
            // by `resolve`); `v` is a distinct local of `size` bytes.
            unsafe { std::ptr::copy_nonoverlapping(c.host, v.as_mut_ptr().cast::<u8>(), size) };
        }
        Ok(_) => {
            // SAFETY: `v` is `size` zeroed bytes, a valid `T` (ByteValued:
            // any bytes are valid) and exclusively borrowed here.
            let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), size) };
            read_impl(l, gpa, bytes)?;
        }
        Err(k) => return Err(AccessError::at(0, gpa, k)),
    }
    // SAFETY: every byte of `v` was initialised (zeroed, then copied over);
    // ByteValued types are valid for any bytes.
    Ok(unsafe { v.assume_init() })
}

#[inline]
fn write_obj_impl<T: ByteValued, L: Lookup + ?Sized>(l: &L, gpa: u64, val: &T) -> Result<(), AccessError> {
    let size = size_of::<T>();
    match resolve(l, gpa, true) {
        Ok(c) if c.avail >= size => {
            // SAFETY: `[host, host + size)` is inside a live writable mapping;
            // `val` is a distinct Rust object of `size` bytes.
            unsafe { std::ptr::copy_nonoverlapping(std::ptr::from_ref(val).cast::<u8>(), c.host, size) };
            mark_range(l, c.slot, gpa, size);
            Ok(())
        }
        Ok(_) => write_impl(l, gpa, val.as_slice()),
        Err(k) => Err(AccessError::at(0, gpa, k)),
    }
}

/// The host pointer of an aligned atomic of `T` at `gpa`.
#[inline]
fn atomic_ptr<T: GuestAtomic, L: Lookup + ?Sized>(
    l: &L,
    gpa: u64,
    write: bool,
) -> Result<Chunk<'_, L::D>, AccessError> {
    let size = size_of::<T>();
    if !gpa.is_multiple_of(size as u64) {
        return Err(AccessError::at(0, gpa, AccessErrorKind::Misaligned));
    }
    let c = resolve(l, gpa, write).map_err(|k| AccessError::at(0, gpa, k))?;
    // Slots and mappings are page aligned, so an aligned gpa gives an aligned
    // host address with room for T; checked anyway.
    if c.avail < size || !(c.host as usize).is_multiple_of(size) {
        return Err(AccessError::at(0, gpa, AccessErrorKind::Misaligned));
    }
    Ok(c)
}

fn load_impl<T: GuestAtomic, L: Lookup + ?Sized>(l: &L, gpa: u64, order: Ordering) -> Result<T, AccessError> {
    let size = size_of::<T>();
    if gpa.is_multiple_of(size as u64) {
        if let Some((host, avail)) = l.fast_read(gpa) {
            if avail >= size && (host as usize).is_multiple_of(size) {
                // SAFETY: aligned, inside a live mapping (see `Lookup::fast_read`).
                return Ok(unsafe { T::atomic_load(host, order) });
            }
        }
    }
    let c = atomic_ptr::<T, L>(l, gpa, false)?;
    // SAFETY: aligned, inside a live mapping (checked by `atomic_ptr`);
    // concurrent users of guest memory use atomic or volatile accesses.
    Ok(unsafe { T::atomic_load(c.host, order) })
}

fn store_impl<T: GuestAtomic, L: Lookup + ?Sized>(l: &L, gpa: u64, v: T, order: Ordering) -> Result<(), AccessError> {
    let c = atomic_ptr::<T, L>(l, gpa, true)?;
    // SAFETY: as in `load_impl`; the slot is writable and the mapping too.
    unsafe { T::atomic_store(c.host, v, order) };
    mark_range(l, c.slot, gpa, size_of::<T>());
    Ok(())
}

fn cmpxchg_impl<T: GuestAtomic, L: Lookup + ?Sized>(
    l: &L,
    gpa: u64,
    current: T,
    new: T,
    success: Ordering,
    failure: Ordering,
) -> Result<Result<T, T>, AccessError> {
    let c = atomic_ptr::<T, L>(l, gpa, true)?;
    // SAFETY: as in `store_impl`.
    let r = unsafe { T::atomic_compare_exchange(c.host, current, new, success, failure) };
    if r.is_ok() {
        mark_range(l, c.slot, gpa, size_of::<T>());
    }
    Ok(r)
}

/// A volatile slice of `len` bytes from the resolved chunk `c` at `gpa`.
fn make_slice<'g, D: Send + Sync>(
    c: Result<Chunk<'g, D>, AccessErrorKind>,
    marker: &'g dyn Marker<D>,
    gpa: u64,
    len: usize,
    access: Access,
) -> Result<VolatileSlice<'g, DirtyTracker<'g, D>>, AccessError> {
    let write = access == Access::Write;
    let c = c.map_err(|k| AccessError::at(0, gpa, k))?;
    if len > c.avail {
        // `avail` bytes fit, so this does not overflow.
        return Err(AccessError::at(0, gpa + c.avail as u64, AccessErrorKind::CrossesSlot));
    }
    let tracker =
        DirtyTracker { marker: write.then_some(marker), slot: c.slot, start: gpa - (c.slot.base_gfn << PAGE_SHIFT) };
    // SAFETY: `[host, host + len)` is inside a mapping kept alive by the slot,
    // which the read section (borrowed for 'g by the slice) keeps alive; the
    // slice's users access it volatilely, as everyone else using guest memory.
    Ok(unsafe { VolatileSlice::with_bitmap(c.host, len, tracker, None) })
}

/// The dirty tracking of a volatile slice from a section: writes through
/// the slice mark their pages in the slot's bitmap, or the vCPU's ring.
/// Borrowed from the section: a slice cannot outlive it.
pub struct DirtyTracker<'g, D = ()> {
    marker: Option<&'g dyn Marker<D>>,
    slot: &'g Slot<D>,
    /// Byte offset of the slice's start in the slot.
    start: u64,
}

impl<D> Clone for DirtyTracker<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D> Copy for DirtyTracker<'_, D> {}

impl<D> std::fmt::Debug for DirtyTracker<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("slot", &self.slot.slot())
            .field("start", &self.start)
            .field("tracking", &self.marker.is_some())
            .finish()
    }
}

impl<'g, D: Send + Sync> WithBitmapSlice<'_> for DirtyTracker<'g, D> {
    type S = DirtyTracker<'g, D>;
}

impl<D: Send + Sync> BitmapSlice for DirtyTracker<'_, D> {}

impl<D: Send + Sync> Bitmap for DirtyTracker<'_, D> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        let Some(marker) = self.marker else { return };
        if len == 0 || !self.slot.logs_dirty_pages() {
            return;
        }
        let first = self.start.saturating_add(offset as u64);
        let last = first.saturating_add(len as u64 - 1);
        let end = self.slot.npages.min((last >> PAGE_SHIFT).saturating_add(1));
        for rel in first >> PAGE_SHIFT..end {
            marker.mark(self.slot, rel);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let rel = self.start.saturating_add(offset as u64) >> PAGE_SHIFT;
        self.slot.dirty_bitmap().is_some_and(|b| rel < self.slot.npages && b.test(rel))
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyTracker { start: self.start.saturating_add(offset as u64), ..*self }
    }
}

/// A read section over all address spaces of a [`GuestMemory`]: accesses by
/// (address space, guest address). See the [module docs](self).
pub struct MemGuard<'a, H: ArchHooks = NoArch> {
    guard: ReadGuard<'a, MemLayers<H>>,
}

impl<H: ArchHooks> std::fmt::Debug for MemGuard<'_, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemGuard").finish_non_exhaustive()
    }
}

impl<'a, H: ArchHooks> MemGuard<'a, H> {
    #[inline]
    fn lookup(&self, as_id: u16) -> VmLookup<'_, 'a, H> {
        VmLookup { guard: &self.guard, as_id }
    }

    /// Tells a missing address space from a hole.
    #[cold]
    fn fix(&self, as_id: u16, mut e: AccessError) -> AccessError {
        if e.kind == AccessErrorKind::NoSlot && as_id >= self.guard.vm().nr_address_spaces() {
            e.kind = AccessErrorKind::NoAddressSpace;
        }
        e
    }

    /// The memslots read guard (slot lookups, iteration).
    pub fn read_guard(&self) -> &ReadGuard<'a, MemLayers<H>> {
        &self.guard
    }

    /// Reads `buf.len()` bytes at `gpa` of address space `as_id`, across slots.
    #[inline]
    pub fn read(&self, as_id: u16, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        read_impl(&self.lookup(as_id), gpa, buf).map_err(|e| self.fix(as_id, e))
    }

    /// Writes `buf` at `gpa` of `as_id`, across slots; marks the pages dirty.
    #[inline]
    pub fn write(&self, as_id: u16, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        write_impl(&self.lookup(as_id), gpa, buf).map_err(|e| self.fix(as_id, e))
    }

    /// Reads a plain-data object at `gpa` (any alignment, may span slots).
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, as_id: u16, gpa: u64) -> Result<T, AccessError> {
        read_obj_impl(&self.lookup(as_id), gpa).map_err(|e| self.fix(as_id, e))
    }

    /// Writes a plain-data object at `gpa` (any alignment, may span slots).
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, as_id: u16, gpa: u64, val: T) -> Result<(), AccessError> {
        write_obj_impl(&self.lookup(as_id), gpa, &val).map_err(|e| self.fix(as_id, e))
    }

    /// Atomic load of a naturally aligned integer (misaligned: an error).
    #[inline]
    pub fn load<T: GuestAtomic>(&self, as_id: u16, gpa: u64, order: Ordering) -> Result<T, AccessError> {
        load_impl(&self.lookup(as_id), gpa, order).map_err(|e| self.fix(as_id, e))
    }

    /// Atomic store of a naturally aligned integer; marks the page dirty.
    #[inline]
    pub fn store<T: GuestAtomic>(&self, as_id: u16, gpa: u64, val: T, order: Ordering) -> Result<(), AccessError> {
        store_impl(&self.lookup(as_id), gpa, val, order).map_err(|e| self.fix(as_id, e))
    }

    /// Atomic compare-exchange of a naturally aligned integer: `Ok(Ok(prev))`
    /// if it stored `new`, `Ok(Err(actual))` if the value was not `current`.
    /// A successful exchange marks the page dirty.
    #[inline]
    pub fn compare_exchange<T: GuestAtomic>(
        &self,
        as_id: u16,
        gpa: u64,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Result<T, T>, AccessError> {
        cmpxchg_impl(&self.lookup(as_id), gpa, current, new, success, failure).map_err(|e| self.fix(as_id, e))
    }

    /// A volatile slice of `len` bytes at `gpa`, which must lie in one slot.
    /// It borrows the section: it cannot outlive it. With [`Access::Write`]
    /// the slot must be writable and writes through the slice mark pages dirty.
    pub fn slice(
        &self,
        as_id: u16,
        gpa: u64,
        len: usize,
        access: Access,
    ) -> Result<VolatileSlice<'_, DirtyTracker<'_, H::SlotData>>, AccessError> {
        let write = access == Access::Write;
        let c = check(self.guard.gfn_to_memslot(as_id, gpa >> PAGE_SHIFT), gpa, write);
        make_slice(c, &self.guard, gpa, len, access).map_err(|e| self.fix(as_id, e))
    }
}

/// A vCPU's read section: accesses in the vCPU's current address space,
/// through its memslot cache; writes mark pages in its dirty ring when rings
/// are on. See the [module docs](self).
pub struct VcpuMemGuard<'v, H: ArchHooks = NoArch> {
    guard: VcpuGuard<'v, 'static, MemLayers<H>>,
    vcpu: &'v GuestVcpu<H>,
}

impl<H: ArchHooks> std::fmt::Debug for VcpuMemGuard<'_, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuMemGuard").field("as_id", &self.vcpu.address_space()).finish_non_exhaustive()
    }
}

impl<'v, H: ArchHooks> VcpuMemGuard<'v, H> {
    /// The memslots vCPU guard.
    pub fn vcpu_guard(&self) -> &VcpuGuard<'v, 'static, MemLayers<H>> {
        &self.guard
    }

    /// Reads `buf.len()` bytes at `gpa`, across slots.
    #[inline]
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        read_impl(self, gpa, buf)
    }

    /// Writes `buf` at `gpa`, across slots; marks the pages dirty.
    #[inline]
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        write_impl(self, gpa, buf)
    }

    /// Reads a plain-data object at `gpa`.
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, AccessError> {
        read_obj_impl(self, gpa)
    }

    /// Writes a plain-data object at `gpa`.
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: T) -> Result<(), AccessError> {
        write_obj_impl(self, gpa, &val)
    }

    /// Atomic load of a naturally aligned integer.
    #[inline]
    pub fn load<T: GuestAtomic>(&self, gpa: u64, order: Ordering) -> Result<T, AccessError> {
        load_impl(self, gpa, order)
    }

    /// Atomic store of a naturally aligned integer; marks the page dirty.
    #[inline]
    pub fn store<T: GuestAtomic>(&self, gpa: u64, val: T, order: Ordering) -> Result<(), AccessError> {
        store_impl(self, gpa, val, order)
    }

    /// Atomic compare-exchange (see [`MemGuard::compare_exchange`]).
    #[inline]
    pub fn compare_exchange<T: GuestAtomic>(
        &self,
        gpa: u64,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Result<T, T>, AccessError> {
        cmpxchg_impl(self, gpa, current, new, success, failure)
    }

    /// A volatile slice of `len` bytes at `gpa` in one slot (see [`MemGuard::slice`]).
    pub fn slice(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
    ) -> Result<VolatileSlice<'_, DirtyTracker<'_, H::SlotData>>, AccessError> {
        make_slice(
            check(self.guard.gfn_to_memslot(gpa >> PAGE_SHIFT), gpa, access == Access::Write),
            self,
            gpa,
            len,
            access,
        )
    }
}

impl<H: ArchHooks> GuestMemory<H> {
    /// Opens a read section over all address spaces.
    #[inline]
    pub fn section(&self) -> MemGuard<'_, H> {
        MemGuard { guard: self.vm().read() }
    }

    /// [`MemGuard::read`] in a section of its own.
    #[inline]
    pub fn read(&self, as_id: u16, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.section().read(as_id, gpa, buf)
    }

    /// [`MemGuard::write`] in a section of its own.
    #[inline]
    pub fn write(&self, as_id: u16, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        self.section().write(as_id, gpa, buf)
    }

    /// [`MemGuard::read_obj`] in a section of its own.
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, as_id: u16, gpa: u64) -> Result<T, AccessError> {
        self.section().read_obj(as_id, gpa)
    }

    /// [`MemGuard::write_obj`] in a section of its own.
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, as_id: u16, gpa: u64, val: T) -> Result<(), AccessError> {
        self.section().write_obj(as_id, gpa, val)
    }

    /// [`MemGuard::load`] in a section of its own.
    #[inline]
    pub fn load<T: GuestAtomic>(&self, as_id: u16, gpa: u64, order: Ordering) -> Result<T, AccessError> {
        self.section().load(as_id, gpa, order)
    }

    /// [`MemGuard::store`] in a section of its own.
    #[inline]
    pub fn store<T: GuestAtomic>(&self, as_id: u16, gpa: u64, val: T, order: Ordering) -> Result<(), AccessError> {
        self.section().store(as_id, gpa, val, order)
    }

    /// [`MemGuard::compare_exchange`] in a section of its own.
    #[inline]
    pub fn compare_exchange<T: GuestAtomic>(
        &self,
        as_id: u16,
        gpa: u64,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Result<T, T>, AccessError> {
        self.section().compare_exchange(as_id, gpa, current, new, success, failure)
    }
}

impl<H: ArchHooks> GuestVcpu<H> {
    /// Opens a read section of this vCPU.
    #[inline]
    pub fn section(&self) -> VcpuMemGuard<'_, H> {
        VcpuMemGuard { guard: self.vcpu.read(), vcpu: self }
    }

    /// [`VcpuMemGuard::read`] in a section of its own.
    #[inline]
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.section().read(gpa, buf)
    }

    /// [`VcpuMemGuard::write`] in a section of its own.
    #[inline]
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), AccessError> {
        self.section().write(gpa, buf)
    }

    /// [`VcpuMemGuard::read_obj`] in a section of its own.
    #[inline]
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, AccessError> {
        self.section().read_obj(gpa)
    }

    /// [`VcpuMemGuard::write_obj`] in a section of its own.
    #[inline]
    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: T) -> Result<(), AccessError> {
        self.section().write_obj(gpa, val)
    }

    /// [`VcpuMemGuard::load`] in a section of its own.
    #[inline]
    pub fn load<T: GuestAtomic>(&self, gpa: u64, order: Ordering) -> Result<T, AccessError> {
        self.section().load(gpa, order)
    }

    /// [`VcpuMemGuard::store`] in a section of its own.
    #[inline]
    pub fn store<T: GuestAtomic>(&self, gpa: u64, val: T, order: Ordering) -> Result<(), AccessError> {
        self.section().store(gpa, val, order)
    }

    /// [`VcpuMemGuard::compare_exchange`] in a section of its own.
    #[inline]
    pub fn compare_exchange<T: GuestAtomic>(
        &self,
        gpa: u64,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Result<T, T>, AccessError> {
        self.section().compare_exchange(gpa, current, new, success, failure)
    }
}
