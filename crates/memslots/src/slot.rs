//! A memslot: one guest frame range mapped to host virtual memory.

use crate::config::PAGE_SHIFT;
use crate::dirty::DirtyBitmap;
use crate::region::{SlotId, KVM_MEMSLOT_INVALID, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use alloc::sync::Arc;
use core::ops::Deref;

/// A guest_memfd binding (`KVM_MEM_GUEST_MEMFD`): the file and the offset of the slot's first page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestMemfd {
    /// The guest_memfd file descriptor, as given by userspace.
    pub fd: u32,
    /// Byte offset of the slot's first page in the file.
    pub offset: u64,
}

/// The plain description of a slot (everything but its dirty bitmap and arch data).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotDesc {
    /// First guest frame.
    pub base_gfn: u64,
    /// Number of pages (never 0 for a slot in a set).
    pub npages: u64,
    /// Host virtual address of the first page.
    pub userspace_addr: u64,
    /// `KVM_MEM_*` flags plus internal ones (`KVM_MEMSLOT_INVALID`).
    pub flags: u32,
    /// Slot id within its address space.
    pub id: u16,
    /// Address space id.
    pub as_id: u16,
    /// guest_memfd binding, for private slots.
    pub guest_memfd: Option<GuestMemfd>,
}

impl SlotDesc {
    /// The slot's address (`as_id`, `id`).
    pub const fn slot_id(&self) -> SlotId {
        SlotId { as_id: self.as_id, id: self.id }
    }
    /// The uapi slot field, `as_id << 16 | id`.
    pub const fn slot(&self) -> u32 {
        self.slot_id().raw()
    }
    /// One past the last gfn.
    pub const fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
    /// Whether `gfn` falls inside the slot.
    #[inline]
    pub const fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }
    /// Whether the slot is INVALID (being deleted or moved).
    pub const fn is_invalid(&self) -> bool {
        self.flags & KVM_MEMSLOT_INVALID != 0
    }
    /// Whether guest writes are refused (`KVM_MEM_READONLY`).
    pub const fn is_readonly(&self) -> bool {
        self.flags & KVM_MEM_READONLY != 0
    }
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set.
    pub const fn logs_dirty_pages(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }
    /// Size in bytes.
    pub const fn size(&self) -> u64 {
        self.npages << PAGE_SHIFT
    }
    /// Last host address (inclusive) of the slot's hva range.
    pub const fn hva_last(&self) -> u64 {
        self.userspace_addr + self.size() - 1
    }
    /// Host address of `gfn`, which must be inside the slot (`__gfn_to_hva_memslot`).
    #[inline]
    pub const fn gfn_to_hva_unchecked(&self, gfn: u64) -> u64 {
        self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)
    }
    /// The gfn backed by host address `hva`, if the slot maps it (`hva_to_gfn_memslot`).
    pub const fn hva_to_gfn(&self, hva: u64) -> Option<u64> {
        if hva >= self.userspace_addr && hva - self.userspace_addr < self.size() {
            Some(self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT))
        } else {
            None
        }
    }
}

/// A memslot as stored in the memslot sets: one copy shared by both sets.
///
/// Immutable once published: a change of flags or base gfn replaces the slot
/// by a new one (sharing the dirty bitmap where KVM shares it).
#[derive(Debug)]
pub struct MemorySlot<D = ()> {
    pub(crate) desc: SlotDesc,
    pub(crate) dirty_bitmap: Option<Arc<DirtyBitmap>>,
    pub(crate) arch: D,
}

impl<D> MemorySlot<D> {
    /// The slot's plain description.
    pub fn desc(&self) -> &SlotDesc {
        &self.desc
    }
    /// The dirty bitmap, present while `KVM_MEM_LOG_DIRTY_PAGES` is set (and bitmaps are in use).
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty_bitmap.as_deref()
    }
    /// The arch metadata the [`ArchHooks`](crate::ArchHooks) attached.
    pub fn arch(&self) -> &D {
        &self.arch
    }
}

impl<D> Deref for MemorySlot<D> {
    type Target = SlotDesc;
    fn deref(&self) -> &SlotDesc {
        &self.desc
    }
}
