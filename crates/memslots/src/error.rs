//! Typed errors. Each carries the offending values and maps to the errno KVM
//! returns for the same request ([`Error::errno`]).

use crate::errno::Errno;

/// Which field of an existing slot a request tried to change illegally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IllegalChange {
    /// `userspace_addr` differs from the existing slot's.
    UserspaceAddr,
    /// `memory_size` differs from the existing slot's.
    Size,
    /// `KVM_MEM_READONLY` toggled.
    ReadonlyFlag,
    /// The request carries `KVM_MEM_GUEST_MEMFD`: private slots can only be deleted.
    GuestMemfd,
    /// `KVM_MEM_GUEST_MEMFD` cleared on a private slot (the kernel refuses
    /// `(flags ^ old) & (READONLY | GUEST_MEMFD)`).
    GuestMemfdFlag,
}

/// Errors of memslot and dirty-log operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is not one KVM could have.
    #[error("invalid configuration: {what}")]
    BadConfig {
        /// What is wrong.
        what: &'static str,
    },
    /// Flags not accepted for this VM or ioctl version.
    #[error("flags {flags:#x} not accepted (valid here: {valid:#x})")]
    InvalidFlags {
        /// The requested flags.
        flags: u32,
        /// The flags that would have been accepted.
        valid: u32,
    },
    /// Slot id not below the limit (user slots for the ioctl, total ids otherwise).
    #[error("slot {slot:#x}: id {id} is not below {limit}")]
    SlotIdOutOfRange {
        /// The raw slot field.
        slot: u32,
        /// Its id part.
        id: u16,
        /// The exclusive limit.
        limit: u16,
    },
    /// Address space id not below the number of address spaces.
    #[error("slot {slot:#x}: address space {as_id} does not exist ({nr} address spaces)")]
    AddressSpaceOutOfRange {
        /// The raw slot field.
        slot: u32,
        /// Its address space part.
        as_id: u16,
        /// Number of address spaces.
        nr: u16,
    },
    /// `memory_size` not a multiple of the page size.
    #[error("memory_size {size:#x} is not page aligned")]
    UnalignedSize {
        /// The size.
        size: u64,
    },
    /// `guest_phys_addr` not page aligned.
    #[error("guest_phys_addr {gpa:#x} is not page aligned")]
    UnalignedGuestPhysAddr {
        /// The address.
        gpa: u64,
    },
    /// `userspace_addr` unaligned, or the range is not inside user space.
    #[error("userspace range {hva:#x}+{size:#x} is unaligned or not below {limit:#x}")]
    BadUserspaceAddr {
        /// The address.
        hva: u64,
        /// The size.
        size: u64,
        /// The user address limit.
        limit: u64,
    },
    /// The guest_memfd binding is refused (`kvm_gmem_bind`): the offset is
    /// negative as a file offset, the range ends past the file's size, or
    /// part of it is already bound to another slot.
    #[error("guest_memfd {fd} range {offset:#x}+{size:#x} cannot be bound: {why}")]
    GuestMemfdBind {
        /// The guest_memfd.
        fd: u32,
        /// Offset of the slot in the file.
        offset: u64,
        /// The slot's size.
        size: u64,
        /// Why.
        why: &'static str,
    },
    /// `KVM_SET_MEMORY_ATTRIBUTES` refused: flags set, attributes the VM
    /// does not support, an empty, wrapping or unaligned range.
    #[error("memory attributes {attributes:#x} for {address:#x}+{size:#x} not accepted: {why}")]
    BadMemoryAttributes {
        /// The range's address.
        address: u64,
        /// The range's size.
        size: u64,
        /// The attributes.
        attributes: u64,
        /// Why.
        why: &'static str,
    },
    /// `__x86_set_memory_region` creating an internal slot that exists.
    #[error("internal slot {id} exists already")]
    InternalSlotExists {
        /// The slot id.
        id: u16,
    },
    /// The guest_memfd fd is not open (`kvm_gmem_bind`'s `fget` fails).
    #[error("guest_memfd {fd} is not an open file")]
    GuestMemfdBadFd {
        /// The fd.
        fd: u32,
    },
    /// guest_memfd offset unaligned or offset + size wraps.
    #[error("guest_memfd offset {offset:#x} (size {size:#x}) is unaligned or wraps")]
    BadGuestMemfdOffset {
        /// The offset.
        offset: u64,
        /// The size.
        size: u64,
    },
    /// `guest_phys_addr + memory_size` wraps around.
    #[error("guest range {gpa:#x}+{size:#x} wraps")]
    GuestRangeWraps {
        /// The address.
        gpa: u64,
        /// The size.
        size: u64,
    },
    /// More pages than one slot may have.
    #[error("{npages} pages exceed the per-slot maximum {max}")]
    TooManyPages {
        /// Requested pages.
        npages: u64,
        /// The maximum.
        max: u64,
    },
    /// Deleting a slot that does not exist.
    #[error("slot {slot:#x} does not exist")]
    DeleteNonexistent {
        /// The raw slot field.
        slot: u32,
    },
    /// The total number of pages over all slots would overflow.
    #[error("total pages {total} + {npages} overflows")]
    TotalPagesOverflow {
        /// Pages in all slots now.
        total: u64,
        /// Pages requested.
        npages: u64,
    },
    /// An existing slot cannot be changed this way.
    #[error("slot {slot:#x}: cannot change {what:?} of an existing slot")]
    IllegalChange {
        /// The raw slot field.
        slot: u32,
        /// The offending field.
        what: IllegalChange,
    },
    /// The new range overlaps another slot of the same address space.
    #[error("slot {slot:#x}: gfns {base_gfn:#x}+{npages:#x} overlap slot {other:#x}")]
    Overlap {
        /// The raw slot field.
        slot: u32,
        /// Requested base gfn.
        base_gfn: u64,
        /// Requested pages.
        npages: u64,
        /// The raw slot field of the first overlapping slot.
        other: u32,
    },
    /// The slot would reach beyond the highest guest frame (x86 arch prepare).
    #[error("last gfn {last_gfn:#x} is above the maximum {max_gfn:#x}")]
    GfnBeyondMax {
        /// The slot's last gfn.
        last_gfn: u64,
        /// The maximum.
        max_gfn: u64,
    },
    /// Memory allocation failed.
    #[error("out of memory ({bytes} bytes)")]
    NoMemory {
        /// The failed allocation's size.
        bytes: usize,
    },
    /// The arch prepare hook refused; nothing changed.
    #[error("arch prepare failed: {0}")]
    Arch(Errno),
    /// Dirty-log operation on a slot that does not exist or has no dirty bitmap.
    #[error("slot {slot:#x} has no dirty bitmap")]
    NoDirtyBitmap {
        /// The raw slot field.
        slot: u32,
    },
    /// Dirty bitmaps are not in use (dirty rings without ring-with-bitmap).
    #[error("dirty bitmaps are not in use (dirty rings are)")]
    DirtyBitmapsUnavailable,
    /// `first_page` of a clear is not a multiple of 64.
    #[error("first_page {first_page} is not a multiple of 64")]
    UnalignedFirstPage {
        /// The first page.
        first_page: u64,
    },
    /// The clear range is outside the slot or ends unaligned before its end.
    #[error("clear range {first_page}+{num_pages} invalid for a slot of {npages} pages")]
    BadClearRange {
        /// The first page.
        first_page: u64,
        /// The number of pages.
        num_pages: u64,
        /// The slot's pages.
        npages: u64,
    },
    /// The caller's bitmap is shorter than the range needs.
    #[error("bitmap of {got} words is shorter than the {need} needed")]
    BitmapTooShort {
        /// Words given.
        got: usize,
        /// Words needed.
        need: usize,
    },
    /// Unknown capability arguments.
    #[error("capability arguments {args:#x} not accepted")]
    InvalidCapArgs {
        /// The arguments.
        args: u64,
    },
    /// Dirty ring size not a power of two, below a page, or set twice / after vCPUs.
    #[error("dirty ring size {bytes} bytes not accepted: {why}")]
    BadRingSize {
        /// The size in bytes.
        bytes: u64,
        /// Why.
        why: &'static str,
    },
    /// An arch hook panicked in the middle of a slot change: the two memslot
    /// sets may disagree, so the VM refuses every further slot change (`EIO`).
    /// Readers keep a consistent view of the last published set.
    #[error("a slot change panicked in an arch hook; the VM accepts no more slot changes")]
    Poisoned,
    /// `KVM_RESET_DIRTY_RINGS` or a ring harvest on a VM without dirty rings.
    #[error("dirty rings are not enabled on this VM")]
    NoDirtyRings,
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` is not offered by this
    /// architecture (x86: only arm64 selects `HAVE_KVM_DIRTY_RING_WITH_BITMAP`).
    #[error("dirty rings with bitmaps are not supported on this architecture")]
    RingWithBitmapUnsupported,
    /// Dirty ring larger than 65536 entries.
    #[error("dirty ring size {bytes} bytes exceeds 65536 entries")]
    RingTooBig {
        /// The size in bytes.
        bytes: u64,
    },
}

impl Error {
    /// The errno KVM returns for this error.
    pub fn errno(&self) -> Errno {
        match self {
            Error::NoDirtyBitmap { .. } => Errno::ENOENT,
            Error::Overlap { .. } | Error::InternalSlotExists { .. } => Errno::EEXIST,
            Error::NoMemory { .. } => Errno::ENOMEM,
            Error::Arch(e) => *e,
            Error::DirtyBitmapsUnavailable => Errno::ENXIO,
            Error::RingTooBig { .. } => Errno::E2BIG,
            Error::BitmapTooShort { .. } => Errno::EFAULT,
            Error::Poisoned => Errno::EIO,
            Error::GuestMemfdBadFd { .. } => Errno::EBADF,
            _ => Errno::EINVAL,
        }
    }
}

/// Why a guest frame has no host address (`KVM_HVA_ERR_BAD` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HvaError {
    /// No slot covers the gfn: an MMIO access for a vCPU.
    #[error("no memslot covers the gfn")]
    NoSlot,
    /// The covering slot is being deleted or moved (INVALID): also MMIO.
    #[error("the memslot is invalid (being deleted or moved)")]
    Invalid,
    /// A write to a READONLY slot: MMIO for a vCPU.
    #[error("write to a read-only memslot")]
    ReadOnly,
}
