//! The uapi of `KVM_SET_USER_MEMORY_REGION(2)`: request structures, flags and
//! the `slot` field encoding.

/// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in a dirty bitmap.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`: guest writes exit to userspace as MMIO.
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// `KVM_MEM_GUEST_MEMFD`: private memory from a guest_memfd (v2 only).
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// Internal: the slot is being deleted or moved; lookups fail (`KVM_MEMSLOT_INVALID`).
pub const KVM_MEMSLOT_INVALID: u32 = 1 << 16;
/// Flags the v1 ioctl accepts at all (`KVM_SET_USER_MEMORY_REGION_V1_FLAGS`).
pub const KVM_SET_USER_MEMORY_REGION_V1_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;

/// `struct kvm_userspace_memory_region` (v1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserMemoryRegion {
    /// `as_id << 16 | id`.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the first byte.
    pub userspace_addr: u64,
}

/// `struct kvm_userspace_memory_region2` (v2: adds guest_memfd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserMemoryRegion2 {
    /// `as_id << 16 | id`.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// Host virtual address of the first byte.
    pub userspace_addr: u64,
    /// Offset into the guest_memfd (with `KVM_MEM_GUEST_MEMFD`).
    pub guest_memfd_offset: u64,
    /// The guest_memfd file descriptor (with `KVM_MEM_GUEST_MEMFD`).
    pub guest_memfd: u32,
    /// Padding, must be zero.
    pub pad1: u32,
    /// Padding, must be zero.
    pub pad2: [u64; 14],
}

impl From<UserMemoryRegion> for UserMemoryRegion2 {
    fn from(r: UserMemoryRegion) -> Self {
        UserMemoryRegion2 {
            slot: r.slot,
            flags: r.flags,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
            ..Default::default()
        }
    }
}

impl UserMemoryRegion {
    /// A request for `slot` (raw `as_id << 16 | id`).
    pub const fn new(slot: u32, flags: u32, guest_phys_addr: u64, memory_size: u64, userspace_addr: u64) -> Self {
        UserMemoryRegion { slot, flags, guest_phys_addr, memory_size, userspace_addr }
    }
}

impl UserMemoryRegion2 {
    /// A v2 request for `slot` (raw `as_id << 16 | id`) without guest_memfd.
    pub const fn new(slot: u32, flags: u32, guest_phys_addr: u64, memory_size: u64, userspace_addr: u64) -> Self {
        UserMemoryRegion2 {
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd_offset: 0,
            guest_memfd: 0,
            pad1: 0,
            pad2: [0; 14],
        }
    }

    /// A v2 request whose private memory is `memory_size` bytes of the
    /// guest_memfd `fd` from `offset` (`KVM_MEM_GUEST_MEMFD` is added to
    /// `flags`); the shared half maps `userspace_addr`.
    pub const fn with_guest_memfd(
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
        fd: u32,
        offset: u64,
    ) -> Self {
        let mut r =
            UserMemoryRegion2::new(slot, flags | KVM_MEM_GUEST_MEMFD, guest_phys_addr, memory_size, userspace_addr);
        r.guest_memfd = fd;
        r.guest_memfd_offset = offset;
        r
    }
}

/// A slot's address: address space and id within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId {
    /// Address space (x86: 0 normal, 1 SMM).
    pub as_id: u16,
    /// Slot id within the address space.
    pub id: u16,
}

impl SlotId {
    /// Splits the uapi `slot` field (`as_id = slot >> 16`, `id = (u16)slot`).
    pub const fn from_raw(slot: u32) -> Self {
        SlotId { as_id: (slot >> 16) as u16, id: (slot & 0xffff) as u16 }
    }
    /// The uapi encoding `as_id << 16 | id`.
    pub const fn raw(self) -> u32 {
        ((self.as_id as u32) << 16) | self.id as u32
    }
}

/// What a successful request did, KVM's `enum kvm_mr_change` plus "nothing".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryChange {
    /// A new slot.
    Create,
    /// The slot was removed.
    Delete,
    /// Same slot, new base gfn.
    Move,
    /// Same slot, same place, new flags (e.g. dirty logging toggled).
    FlagsOnly,
}

/// Outcome of an accepted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The request changed a slot.
    Changed(MemoryChange),
    /// The request was identical to the existing slot: success, nothing changed.
    Unchanged,
}
