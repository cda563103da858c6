//! [`GuestMemory`]: a memslots VM whose slots carry the host mapping they
//! point into.
//!
//! [`MemHooks`] keeps a registry of host mappings (host address range ->
//! `Arc<HostMemory>`). When a slot is created, its
//! [`prepare_memory_region`](ArchHooks::prepare_memory_region) hook finds the
//! registered mapping containing the slot's whole host range
//! `[userspace_addr, userspace_addr + size)` and stores it, with the slot's
//! offset in it, in the slot's arch data ([`SlotBacking`]). MOVE and
//! FLAGS_ONLY keep the old slot's backing (KVM does not let them change the
//! host address). KVM accepts slots whose host range is not mapped; so does
//! this layer: such a slot gets no backing, and guest accesses to it fail with
//! [`AccessErrorKind::Unbacked`](crate::AccessErrorKind::Unbacked) without
//! touching memory.
//!
//! ## Mapping lifetime
//!
//! A slot holds an `Arc<HostMemory>`; slots (and their INVALID copies) are
//! dropped only after no read section can see them. So a mapping stays mapped
//! while any slot a reader might use points into it, even after
//! [`GuestMemory::unregister`] and after the slot was deleted, until the
//! deleting writer's grace period has passed and the last `Arc` is gone.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memslots::{
    ArchHooks, Config, DirtyMark, Errno, MemoryChange, MemorySlot, Outcome, SlotDraft, SlotId, UserMemoryRegion, Vcpu,
    Vm,
};

use crate::host::{HostMemory, MapError, MapOptions};

/// The host memory behind a slot: the mapping and the byte offset of the
/// slot's first page in it. The slot's whole range lies inside the mapping.
#[derive(Clone, Debug)]
pub struct SlotBacking {
    mem: Arc<HostMemory>,
    offset: usize,
}

impl SlotBacking {
    /// The mapping.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.mem
    }
    /// Byte offset of the slot's first page in the mapping.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// Per-slot data of a [`GuestMemory`] VM: the backing, or `None` for a slot
/// whose host range is not (entirely) inside a registered mapping.
pub type SlotData = Option<SlotBacking>;

/// A memslot of a [`GuestMemory`] VM.
pub type Slot = MemorySlot<SlotData>;

/// The arch hooks of a [`GuestMemory`] VM: the host mapping registry.
#[derive(Debug, Default)]
pub struct MemHooks {
    /// Registered mappings by host start address. Live mappings never
    /// overlap, so a lookup is a predecessor search.
    registry: Mutex<BTreeMap<u64, Arc<HostMemory>>>,
    /// Unbacked slots that readers may see: incremented when such a slot is
    /// prepared (before it is published), decremented when its deletion is
    /// committed (after the grace period that hides it). While it is zero,
    /// every slot a reader finds is backed, so the read path may use the
    /// slot's host address from the gfn index without touching the slot (see
    /// `access::fast_read`).
    unbacked: AtomicU64,
}

impl MemHooks {
    /// An empty registry.
    pub fn new() -> Self {
        MemHooks::default()
    }

    fn registry(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<HostMemory>>> {
        // The map stays consistent even if a holder panicked.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The registered mapping containing all of `[hva, hva + size)`.
    pub fn find(&self, hva: u64, size: u64) -> Option<Arc<HostMemory>> {
        let reg = self.registry();
        let (_, mem) = reg.range(..=hva).next_back()?;
        mem.contains(hva, size).then(|| Arc::clone(mem))
    }

    /// The backing for a slot at `[hva, hva + size)`, if a registered mapping contains it.
    fn backing(&self, hva: u64, size: u64) -> Option<SlotBacking> {
        let mem = self.find(hva, size)?;
        let offset = usize::try_from(hva - mem.addr()).ok()?;
        Some(SlotBacking { mem, offset })
    }

    /// Registers `mem`. Returns false if it was registered already. Live
    /// mappings cannot overlap, so another entry overlapping `mem` is a
    /// mapping that was replaced (impossible while the registry holds it).
    fn register(&self, mem: &Arc<HostMemory>) -> bool {
        let mut reg = self.registry();
        match reg.get(&mem.addr()) {
            Some(m) if Arc::ptr_eq(m, mem) => false,
            _ => {
                reg.insert(mem.addr(), Arc::clone(mem));
                true
            }
        }
    }

    fn unregister(&self, mem: &HostMemory) -> Option<Arc<HostMemory>> {
        let mut reg = self.registry();
        match reg.get(&mem.addr()) {
            Some(m) if std::ptr::eq(Arc::as_ptr(m), mem) => reg.remove(&mem.addr()),
            _ => None,
        }
    }

    fn is_registered(&self, mem: &Arc<HostMemory>) -> bool {
        self.registry().get(&mem.addr()).is_some_and(|m| Arc::ptr_eq(m, mem))
    }

    /// Unbacked slots readers may currently see (created and not yet fully
    /// deleted). While there are none, reads take a faster path.
    pub fn unbacked_slots(&self) -> u64 {
        self.unbacked.load(Ordering::Acquire)
    }

    /// Every registered mapping, by host address.
    pub fn mappings(&self) -> Vec<Arc<HostMemory>> {
        self.registry().values().cloned().collect()
    }
}

impl ArchHooks for MemHooks {
    type SlotData = SlotData;

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&Slot>,
        new: Option<&mut SlotDraft<SlotData>>,
    ) -> Result<(), Errno> {
        if let Some(new) = new {
            new.arch = match (change, old) {
                // Same host range as the old slot (KVM refuses to change it):
                // same backing, even if the mapping was unregistered since.
                (MemoryChange::Move | MemoryChange::FlagsOnly, Some(old)) => old.arch().clone(),
                _ => self.backing(new.desc.userspace_addr, new.desc.size()),
            };
            // This hook is the last step that can fail a change: from here the
            // slot will be published. Count it first (see `unbacked`).
            if change == MemoryChange::Create && new.arch.is_none() {
                self.unbacked.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn commit_memory_region(&self, change: MemoryChange, old: Option<&Slot>, _new: Option<&Slot>) {
        // Both sets dropped the slot and its INVALID copy, each after a grace
        // period: no reader can see it any more.
        if change == MemoryChange::Delete && old.is_some_and(|o| o.arch().is_none()) {
            self.unbacked.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl MemHooks {
    /// Whether no unbacked slot can be seen by a reader whose section found
    /// its slot *before* this call (see the `unbacked` field).
    #[inline]
    pub(crate) fn all_backed(&self) -> bool {
        self.unbacked.load(Ordering::Acquire) == 0
    }
}

/// Errors of [`GuestMemory`] region and mapping management.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The memslot request failed (KVM's checks and errno).
    #[error(transparent)]
    Memslots(#[from] memslots::Error),
    /// Mapping host memory failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// `[offset, offset + size)` is not inside the mapping.
    #[error("range {offset:#x}+{size:#x} is not inside the {len:#x}-byte mapping")]
    OutsideMapping {
        /// Offset in the mapping.
        offset: u64,
        /// Size of the region.
        size: u64,
        /// Size of the mapping.
        len: u64,
    },
    /// The mapping is not registered with this `GuestMemory` (the slot would be unbacked).
    #[error("host mapping {addr:#x} is not registered with this GuestMemory")]
    NotRegistered {
        /// The mapping's host address.
        addr: u64,
    },
}

impl Error {
    /// The errno KVM (or the VMM) would return.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Memslots(e) => e.errno(),
            Error::Map(MapError::Os { source, .. }) => source.raw_os_error().map_or(Errno::ENOMEM, Errno),
            Error::Map(_) | Error::NotRegistered { .. } => Errno::EINVAL,
            Error::OutsideMapping { .. } => Errno::EFAULT,
        }
    }
}

/// Guest memory: a memslots VM ([`Vm<MemHooks>`]) plus the host mappings its
/// slots point into. Cheap to clone (one `Arc`); share it between threads.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    vm: Arc<Vm<MemHooks>>,
}

impl GuestMemory {
    /// A VM with `config` and no mappings.
    pub fn new(config: Config) -> Result<Self, Error> {
        Ok(GuestMemory { vm: Arc::new(Vm::with_hooks(config, MemHooks::new())?) })
    }

    /// The memslots VM (every memslot and dirty-log call).
    pub fn vm(&self) -> &Vm<MemHooks> {
        &self.vm
    }

    /// The VM, shared.
    pub fn vm_arc(&self) -> &Arc<Vm<MemHooks>> {
        &self.vm
    }

    /// Number of address spaces.
    pub fn nr_address_spaces(&self) -> u16 {
        self.vm.nr_address_spaces()
    }

    /// Maps `size` bytes of anonymous memory and registers the mapping.
    pub fn map_anonymous(&self, size: u64, opts: &MapOptions) -> Result<Arc<HostMemory>, Error> {
        Ok(self.register(HostMemory::anonymous(size, opts)?))
    }

    /// Creates and maps a memfd of `size` bytes and registers the mapping.
    /// The memfd is sealed against shrinking (see [`HostMemory::memfd`]).
    pub fn map_memfd(&self, name: &str, size: u64, opts: &MapOptions) -> Result<Arc<HostMemory>, Error> {
        Ok(self.register(HostMemory::memfd(name, size, opts)?))
    }

    /// Maps `size` bytes of `file` from `offset` and registers the mapping.
    /// The file is sealed against shrinking; one that cannot be sealed is
    /// refused (see [`HostMemory::from_file`]).
    pub fn map_file(&self, file: File, offset: u64, size: u64, opts: &MapOptions) -> Result<Arc<HostMemory>, Error> {
        Ok(self.register(HostMemory::from_file(file, offset, size, opts)?))
    }

    /// [`map_file`](Self::map_file) for a file that cannot be sealed.
    ///
    /// # Safety
    /// As [`HostMemory::from_file_unsealed`]: while the mapping exists (which
    /// may outlive this call and even this `GuestMemory`: slots and snapshots
    /// hold it) the file is not truncated below `offset + size`, and a shared
    /// mapping of a sparse file cannot run out of file-system space.
    pub unsafe fn map_file_unsealed(
        &self,
        file: File,
        offset: u64,
        size: u64,
        opts: &MapOptions,
    ) -> Result<Arc<HostMemory>, Error> {
        // SAFETY: the caller's contract is this function's.
        Ok(self.register(unsafe { HostMemory::from_file_unsealed(file, offset, size, opts) }?))
    }

    /// Registers a mapping made elsewhere; slots created afterwards over its
    /// host range are backed by it. Returns the `Arc` (registering twice is harmless).
    pub fn register(&self, mem: impl Into<Arc<HostMemory>>) -> Arc<HostMemory> {
        let mem = mem.into();
        self.vm.hooks().register(&mem);
        mem
    }

    /// Removes `mem` from the registry: slots created afterwards over its
    /// range are unbacked. Existing slots keep it mapped until they are gone
    /// (and no read section sees them). Returns whether it was registered.
    pub fn unregister(&self, mem: &HostMemory) -> bool {
        self.vm.hooks().unregister(mem).is_some()
    }

    /// The registered mappings.
    pub fn mappings(&self) -> Vec<Arc<HostMemory>> {
        self.vm.hooks().mappings()
    }

    /// `KVM_SET_USER_MEMORY_REGION` for slot `slot` (`as_id << 16 | id`) with
    /// `flags` (`KVM_MEM_*`), at guest address `gpa`, backed by `size` bytes of
    /// `mem` from `offset`: creates the slot, moves it (new `gpa`, same
    /// `mem`/`offset`/`size`) or changes its flags. `mem` must be registered
    /// and the range inside it. KVM's own checks and errors apply.
    pub fn set_region(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        mem: &Arc<HostMemory>,
        offset: u64,
        size: u64,
    ) -> Result<Outcome, Error> {
        if offset.checked_add(size).is_none_or(|end| end > mem.size()) {
            return Err(Error::OutsideMapping { offset, size, len: mem.size() });
        }
        if !self.vm.hooks().is_registered(mem) {
            return Err(Error::NotRegistered { addr: mem.addr() });
        }
        let hva = mem.addr() + offset;
        Ok(self.vm.set_user_memory_region(&UserMemoryRegion::new(slot, flags, gpa, size, hva))?)
    }

    /// Deletes slot `slot` (`as_id << 16 | id`). Its mapping stays alive for
    /// readers still inside a section that sees it.
    pub fn delete_region(&self, slot: u32) -> Result<Outcome, Error> {
        Ok(self.vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, 0, 0, 0))?)
    }

    /// The backing of slot `slot` (`as_id << 16 | id`): `Some(None)` for an
    /// unbacked slot, `None` if there is no such slot.
    pub fn slot_backing(&self, slot: u32) -> Option<SlotData> {
        let SlotId { as_id, id } = SlotId::from_raw(slot);
        self.vm.read().id_to_memslot(as_id, id).map(|s| s.arch().clone())
    }

    /// A vCPU handle: accesses through it use its current address space and
    /// its memslot cache, and dirty pages go to its dirty ring when rings are on.
    pub fn vcpu(&self) -> GuestVcpu<'_> {
        GuestVcpu { vcpu: self.vm.vcpu(), ring_full: Cell::new(false), lost_marks: Cell::new(0) }
    }
}

/// A vCPU of a [`GuestMemory`]: a [`memslots::Vcpu`] (reachable through
/// `Deref`, e.g. for [`set_address_space`](Vcpu::set_address_space)) plus
/// the dirty-ring state its writes produce.
pub struct GuestVcpu<'a> {
    pub(crate) vcpu: Vcpu<'a, MemHooks>,
    /// A mark reached the ring's soft limit, or found it full.
    pub(crate) ring_full: Cell<bool>,
    /// Marks not recorded because the ring was full.
    pub(crate) lost_marks: Cell<u64>,
}

impl std::fmt::Debug for GuestVcpu<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVcpu")
            .field("vcpu", &self.vcpu)
            .field("ring_full", &self.ring_full.get())
            .field("lost_marks", &self.lost_marks.get())
            .finish()
    }
}

impl<'a> GuestVcpu<'a> {
    /// The memslots vCPU handle.
    pub fn vcpu(&self) -> &Vcpu<'a, MemHooks> {
        &self.vcpu
    }

    /// Whether a write since the last call filled the dirty ring to its soft
    /// limit (or beyond): the vCPU must exit to userspace
    /// (`KVM_EXIT_DIRTY_RING_FULL`) so the VMM harvests and resets. Clears the flag.
    pub fn take_dirty_ring_full(&self) -> bool {
        self.ring_full.replace(false)
    }

    /// Page marks dropped so far because the ring had no free entry (writes
    /// that went on past a soft-full ring without the VMM resetting it).
    pub fn lost_dirty_marks(&self) -> u64 {
        self.lost_marks.get()
    }

    /// Records what a dirty mark did.
    #[inline]
    pub(crate) fn note_mark(&self, mark: DirtyMark) {
        match mark {
            DirtyMark::Marked | DirtyMark::NotLogged => {}
            DirtyMark::RingSoftFull => self.ring_full.set(true),
            DirtyMark::RingFull => {
                self.ring_full.set(true);
                self.lost_marks.set(self.lost_marks.get() + 1);
            }
        }
    }
}

impl<'a> std::ops::Deref for GuestVcpu<'a> {
    type Target = Vcpu<'a, MemHooks>;
    fn deref(&self) -> &Self::Target {
        &self.vcpu
    }
}

impl std::ops::DerefMut for GuestVcpu<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.vcpu
    }
}
