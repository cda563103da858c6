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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use memslots::{
    ArchHooks, Config, DirtyMark, Errno, Layered, MemoryChange, MemorySlot, NoArch, Outcome, SlotDraft, SlotId,
    UserMemoryRegion, UserMemoryRegion2, Vcpu, Vm,
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

/// The guest-memory layer's data in a slot: the backing, or `None` for a
/// slot whose host range is not (entirely) inside a registered mapping.
pub type SlotData = Option<SlotBacking>;

/// A memslot of a [`GuestMemory`] VM whose inner layer carries `D` per slot
/// (`()` for [`NoArch`] and the KVM backend).
pub type Slot<D = ()> = MemorySlot<(SlotData, D)>;

/// The hooks of a [`GuestMemory`] VM: the guest-memory layer first, then
/// the inner layer `H` (the KVM backend, a user's MMU, or [`NoArch`]).
pub type MemLayers<H = NoArch> = Layered<MemHooks, H>;

/// The memslots VM of a [`GuestMemory`].
pub type MemVm<H = NoArch> = Vm<MemLayers<H>>;

/// Something the guest-memory layer clears when an address space's slots
/// change and when a slot is deleted (the snapshot cache of a
/// [`MemslotsAddressSpace`](crate::MemslotsAddressSpace)).
pub(crate) trait ClearOnUpdate: Send + Sync {
    fn clear(&self, as_id: u16);
}

/// The guest-memory layer of a [`GuestMemory`] VM: the host mapping
/// registry, and the rule for slots over memory that is not registered.
#[derive(Default)]
pub struct MemHooks {
    /// Registered mappings by host start address. Live mappings never
    /// overlap, so a lookup is a predecessor search. The registry does not
    /// keep mappings alive: the caller's `Arc` and the slots' do.
    registry: Mutex<BTreeMap<u64, Weak<HostMemory>>>,
    /// Refuse (`EFAULT`) slots whose host range is not inside a registered
    /// mapping, instead of creating them unbacked.
    strict: bool,
    /// Snapshot caches to drop at every publish of their address space
    /// (`memslots_updated`: `memory()` then needs no generation check) and
    /// when a slot is deleted (so a deleted slot's mapping is not kept alive
    /// by a cache nobody refreshes).
    caches: Mutex<Vec<Weak<dyn ClearOnUpdate>>>,
    /// Test hook: the next prepare fails with this errno (0: none).
    inject: std::sync::atomic::AtomicI32,
    /// Unbacked slots that readers may see: incremented when such a slot is
    /// prepared (before it is published), decremented when its deletion is
    /// committed (after the grace period that hides it). While it is zero,
    /// every slot a reader finds is backed, so the read path may use the
    /// slot's host address from the gfn index without touching the slot (see
    /// `access::fast_read`).
    unbacked: AtomicU64,
}

impl std::fmt::Debug for MemHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemHooks")
            .field("strict", &self.strict)
            .field("unbacked", &self.unbacked)
            .finish_non_exhaustive()
    }
}

impl MemHooks {
    /// An empty registry; slots over unregistered memory are created
    /// unbacked (KVM accepts any host range).
    pub fn new() -> Self {
        MemHooks::default()
    }

    /// An empty registry that refuses, with `EFAULT`, every slot whose host
    /// range is not inside a registered mapping: every slot is backed. The
    /// KVM backend's guest VMs use it, so the kernel only ever maps memory
    /// the slots keep alive.
    pub fn strict() -> Self {
        MemHooks { strict: true, ..MemHooks::default() }
    }

    /// Whether unbacked slots are refused ([`strict`](Self::strict)).
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Fault injection for tests: the next prepare step of a slot change
    /// fails in this layer with `errno` (before any later layer sees it).
    pub fn inject_prepare_failure(&self, errno: Errno) {
        self.inject.store(errno.0, Ordering::Release);
    }

    pub(crate) fn add_cache(&self, cache: Weak<dyn ClearOnUpdate>) {
        let mut c = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        c.retain(|w| w.strong_count() > 0);
        c.push(cache);
    }

    fn registry(&self) -> MutexGuard<'_, BTreeMap<u64, Weak<HostMemory>>> {
        // The map stays consistent even if a holder panicked.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The registered mapping containing all of `[hva, hva + size)`.
    pub fn find(&self, hva: u64, size: u64) -> Option<Arc<HostMemory>> {
        let reg = self.registry();
        let (_, mem) = reg.range(..=hva).next_back()?;
        mem.upgrade().filter(|m| m.contains(hva, size))
    }

    /// The backing for a slot at `[hva, hva + size)`, if a registered mapping contains it.
    fn backing(&self, hva: u64, size: u64) -> Option<SlotBacking> {
        let mem = self.find(hva, size)?;
        let offset = usize::try_from(hva - mem.addr()).ok()?;
        Some(SlotBacking { mem, offset })
    }

    /// Registers `mem`. Returns false if it was registered already. Live
    /// mappings cannot overlap, so entries inside `mem`'s range are
    /// mappings that are gone (their address was reused): drop them.
    fn register(&self, mem: &Arc<HostMemory>) -> bool {
        let mut reg = self.registry();
        if reg.get(&mem.addr()).is_some_and(|m| std::ptr::eq(m.as_ptr(), Arc::as_ptr(mem))) {
            return false;
        }
        let end = mem.addr().saturating_add(mem.size());
        let stale: Vec<u64> = reg.range(mem.addr()..end).map(|(&a, _)| a).collect();
        for a in stale {
            reg.remove(&a);
        }
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(mem.addr(), Arc::downgrade(mem));
        true
    }

    fn unregister(&self, mem: &HostMemory) -> bool {
        let mut reg = self.registry();
        match reg.get(&mem.addr()) {
            Some(m) if std::ptr::eq(m.as_ptr(), mem) => reg.remove(&mem.addr()).is_some(),
            _ => false,
        }
    }

    fn is_registered(&self, mem: &Arc<HostMemory>) -> bool {
        self.registry().get(&mem.addr()).is_some_and(|m| std::ptr::eq(m.as_ptr(), Arc::as_ptr(mem)))
    }

    /// Unbacked slots readers may currently see (created and not yet fully
    /// deleted). While there are none, reads take a faster path.
    pub fn unbacked_slots(&self) -> u64 {
        self.unbacked.load(Ordering::Acquire)
    }

    /// Every registered mapping that is still alive, by host address.
    pub fn mappings(&self) -> Vec<Arc<HostMemory>> {
        self.registry().values().filter_map(Weak::upgrade).collect()
    }
}

impl ArchHooks for MemHooks {
    type SlotData = SlotData;

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<SlotData>>,
        new: Option<&mut SlotDraft<SlotData>>,
    ) -> Result<(), Errno> {
        let injected = self.inject.swap(0, Ordering::AcqRel);
        if injected != 0 {
            return Err(Errno(injected));
        }
        if let Some(new) = new {
            new.arch = match (change, old) {
                // Same host range as the old slot (KVM refuses to change it):
                // same backing, even if the mapping was unregistered since.
                (MemoryChange::Move | MemoryChange::FlagsOnly, Some(old)) => old.arch().clone(),
                _ => self.backing(new.desc.userspace_addr, new.desc.size()),
            };
            if new.arch.is_none() && change == MemoryChange::Create {
                if self.strict {
                    return Err(Errno::EFAULT);
                }
                // From here the slot will be published unless a later layer
                // refuses it (then `abort_memory_region` uncounts it). Count
                // it first (see `unbacked`).
                self.unbacked.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn abort_memory_region(
        &self,
        change: MemoryChange,
        _old: Option<&MemorySlot<SlotData>>,
        new: Option<&SlotDraft<SlotData>>,
    ) {
        if change == MemoryChange::Create && new.is_some_and(|n| n.arch.is_none()) {
            self.unbacked.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn commit_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<SlotData>>,
        _new: Option<&MemorySlot<SlotData>>,
    ) {
        if change != MemoryChange::Delete {
            return;
        }
        // Both sets dropped the slot and its INVALID copy, each after a grace
        // period: no reader can see it any more.
        let Some(old) = old else { return };
        if old.arch().is_none() {
            self.unbacked.fetch_sub(1, Ordering::SeqCst);
        }
        // Snapshot caches may hold the deleted slot's mapping: drop them
        // (the next `memory()` builds a fresh one).
        self.clear_caches(old.as_id);
    }

    fn memslots_updated(&self, as_id: u16, _generation: u64) {
        // Called after each publish of `as_id` and its grace period, before
        // the final generation is stored. A snapshot cached before this
        // clear may show the state before the publish; one taken from here
        // until the final generation is stored carries the in-progress bit
        // and is not cached (`MemslotsAddressSpace::refresh`). So a cached
        // snapshot is always current once the update has returned, and
        // `memory()` does not have to compare generations.
        self.clear_caches(as_id);
    }
}

impl MemHooks {
    /// Drops the snapshot caches of address space `as_id`.
    fn clear_caches(&self, as_id: u16) {
        let caches: Vec<_> =
            self.caches.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(Weak::upgrade).collect();
        for c in caches {
            c.clear(as_id);
        }
    }

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
    /// Discarding host memory failed.
    #[error("discard failed: {0}")]
    Discard(#[source] std::io::Error),
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
            Error::Discard(e) => e.raw_os_error().map_or(Errno::EINVAL, Errno),
            Error::OutsideMapping { .. } => Errno::EFAULT,
        }
    }
}

/// Guest memory: a memslots VM ([`MemVm<H>`], the guest-memory layer over
/// an inner layer `H`) plus the host mappings its slots point into. Cheap
/// to clone (one `Arc`); share it between threads.
pub struct GuestMemory<H: ArchHooks = NoArch> {
    vm: Arc<MemVm<H>>,
}

impl<H: ArchHooks> Clone for GuestMemory<H> {
    fn clone(&self) -> Self {
        GuestMemory { vm: Arc::clone(&self.vm) }
    }
}

impl<H: ArchHooks> std::fmt::Debug for GuestMemory<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory").field("vm", &self.vm).finish()
    }
}

impl GuestMemory {
    /// A VM with `config`, no mappings and no inner layer.
    pub fn new(config: Config) -> Result<Self, Error> {
        GuestMemory::with_layers(config, MemHooks::new(), NoArch)
    }
}

impl<H: ArchHooks> GuestMemory<H> {
    /// A VM with `config` whose slot changes go through the guest-memory
    /// layer `mem` and then `inner` (see [`memslots::Layered`]).
    pub fn with_layers(config: Config, mem: MemHooks, inner: H) -> Result<Self, Error> {
        Ok(GuestMemory { vm: Arc::new(Vm::with_hooks(config, Layered::new(mem, inner))?) })
    }

    /// The memslots VM (every memslot and dirty-log call).
    pub fn vm(&self) -> &MemVm<H> {
        &self.vm
    }

    /// The VM, shared.
    pub fn vm_arc(&self) -> &Arc<MemVm<H>> {
        &self.vm
    }

    /// The guest-memory layer.
    pub fn mem_hooks(&self) -> &MemHooks {
        &self.vm.hooks().outer
    }

    /// The inner layer (the KVM backend, a user's hooks).
    pub fn inner(&self) -> &H {
        &self.vm.hooks().inner
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
    /// host range are backed by it. Returns the `Arc` (registering twice is
    /// harmless). The registry does not keep the mapping alive: keep the
    /// `Arc` until slots over it exist (they hold it from then on).
    pub fn register(&self, mem: impl Into<Arc<HostMemory>>) -> Arc<HostMemory> {
        let mem = mem.into();
        self.mem_hooks().register(&mem);
        mem
    }

    /// Removes `mem` from the registry: slots created afterwards over its
    /// range are unbacked. Existing slots keep it mapped until they are gone
    /// (and no read section sees them). Returns whether it was registered.
    pub fn unregister(&self, mem: &HostMemory) -> bool {
        self.mem_hooks().unregister(mem)
    }

    /// The registered mappings.
    pub fn mappings(&self) -> Vec<Arc<HostMemory>> {
        self.mem_hooks().mappings()
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
        let hva = self.registered_hva(mem, offset, size)?;
        Ok(self.vm.set_user_memory_region(&UserMemoryRegion::new(slot, flags, gpa, size, hva))?)
    }

    /// The host address of byte `offset` of `mem`, after checking that
    /// `[offset, offset + size)` lies inside it and that it is registered.
    fn registered_hva(&self, mem: &Arc<HostMemory>, offset: u64, size: u64) -> Result<u64, Error> {
        if offset.checked_add(size).is_none_or(|end| end > mem.size()) {
            return Err(Error::OutsideMapping { offset, size, len: mem.size() });
        }
        if !self.mem_hooks().is_registered(mem) {
            return Err(Error::NotRegistered { addr: mem.addr() });
        }
        Ok(mem.addr() + offset)
    }

    /// `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`: as
    /// [`set_region`](Self::set_region) (the shared half of the slot, backed
    /// by `size` bytes of `mem` from `offset`), with the private half bound
    /// to `size` bytes of the guest_memfd `gmem` from `gmem_offset`. The VM
    /// must accept guest_memfd slots ([`Config::guest_memfd`] or
    /// [`Config::private_mem`]); through the KVM backend the kernel checks
    /// the binding (a guest_memfd of this VM, range inside the file and not
    /// bound to another slot) and its refusal undoes the change.
    #[allow(clippy::too_many_arguments)]
    pub fn set_region_guest_memfd(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        mem: &Arc<HostMemory>,
        offset: u64,
        size: u64,
        gmem: std::os::fd::BorrowedFd<'_>,
        gmem_offset: u64,
    ) -> Result<Outcome, Error> {
        use std::os::fd::AsRawFd;
        let hva = self.registered_hva(mem, offset, size)?;
        let fd = u32::try_from(gmem.as_raw_fd()).unwrap_or(u32::MAX);
        // The file's size, so the library refuses a binding past its end
        // before any layer sees it (as kvm_gmem_bind).
        if let Ok(meta) = gmem.try_clone_to_owned().map(File::from).and_then(|f| f.metadata()) {
            self.vm.declare_guest_memfd(fd, meta.len());
        }
        let region = UserMemoryRegion2::with_guest_memfd(slot, flags, gpa, size, hva, fd, gmem_offset);
        Ok(self.vm.set_user_memory_region2(&region)?)
    }

    /// Discards guest memory `[gpa, gpa + len)` of address space `as_id` (a
    /// balloon inflating): the host pages behind it are given back
    /// ([`HostMemory::discard`]: a hole punched in a shared memfd or file,
    /// `MADV_DONTNEED`), then every layer drops what it derived from that
    /// host range ([`Vm::invalidate_hva_range`], the MMU notifier's
    /// `kvm_unmap_gfn_range`; the kernel's own MMU notifier does the same
    /// for KVM). The guest reads zeros there afterwards (the file's data, for
    /// a caller's file). Holes and READONLY (ROM) slots in the range are
    /// skipped; `gpa` and `len` must be page aligned. Returns the bytes
    /// discarded; on an error, pieces before the failing one stay discarded.
    pub fn discard(&self, as_id: u16, gpa: u64, len: u64) -> Result<u64, Error> {
        let page = memslots::PAGE_SIZE;
        if as_id >= self.nr_address_spaces() {
            return Err(Error::Discard(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("no address space {as_id}"),
            )));
        }
        if !gpa.is_multiple_of(page) || !len.is_multiple_of(page) || gpa.checked_add(len).is_none() {
            return Err(Error::Discard(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("discard range {gpa:#x}+{len:#x} is not page aligned or wraps"),
            )));
        }
        // Collect the backed pieces inside one section, then act outside it
        // (invalidation takes its own section; the backing `Arc`s keep the
        // mappings alive meanwhile).
        let mut pieces = Vec::new();
        {
            let g = self.vm.read();
            let (first, end) = (gpa >> memslots::PAGE_SHIFT, (gpa + len) >> memslots::PAGE_SHIFT);
            if first < end {
                for s in g.slots_in_gfn_range(as_id, first, end) {
                    // READONLY slots are ROM: not discarded.
                    if s.is_invalid() || s.is_readonly() {
                        continue;
                    }
                    let Some(b) = s.arch().0.as_ref() else { continue };
                    let (from, stop) = (first.max(s.base_gfn), end.min(s.end_gfn()));
                    let off = b.offset() as u64 + ((from - s.base_gfn) << memslots::PAGE_SHIFT);
                    pieces.push((Arc::clone(b.memory()), off, (stop - from) << memslots::PAGE_SHIFT));
                }
            }
        }
        let mut done = 0;
        for (mem, off, n) in pieces {
            let (o, l) = (usize::try_from(off), usize::try_from(n));
            let (Ok(o), Ok(l)) = (o, l) else { continue };
            mem.discard(o, l).map_err(Error::Discard)?;
            self.vm.invalidate_hva_range(mem.addr() + off, mem.addr() + off + n);
            done += n;
        }
        Ok(done)
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
        self.vm.read().id_to_memslot(as_id, id).map(|s| s.arch().0.clone())
    }

    /// A vCPU handle: accesses through it use its current address space and
    /// its memslot cache, and dirty pages go to its dirty ring when rings
    /// are on. It is owned (`'static + Send`: move it into a vCPU thread)
    /// and keeps the VM alive.
    pub fn vcpu(&self) -> GuestVcpu<H> {
        GuestVcpu { vcpu: self.vm.vcpu_owned(), ring_full: Cell::new(false), lost_marks: Cell::new(0) }
    }
}

/// A vCPU of a [`GuestMemory`]: a [`memslots::Vcpu`] (reachable through
/// `Deref`, e.g. for [`set_address_space`](Vcpu::set_address_space)) plus
/// the dirty-ring state its writes produce.
pub struct GuestVcpu<H: ArchHooks = NoArch> {
    pub(crate) vcpu: Vcpu<'static, MemLayers<H>>,
    /// A mark reached the ring's soft limit, or found it full.
    pub(crate) ring_full: Cell<bool>,
    /// Marks not recorded because the ring was full.
    pub(crate) lost_marks: Cell<u64>,
}

impl<H: ArchHooks> std::fmt::Debug for GuestVcpu<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVcpu")
            .field("vcpu", &self.vcpu)
            .field("ring_full", &self.ring_full.get())
            .field("lost_marks", &self.lost_marks.get())
            .finish()
    }
}

impl<H: ArchHooks> GuestVcpu<H> {
    /// The memslots vCPU handle.
    pub fn vcpu(&self) -> &Vcpu<'_, MemLayers<H>> {
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

impl<H: ArchHooks> std::ops::Deref for GuestVcpu<H> {
    type Target = Vcpu<'static, MemLayers<H>>;
    fn deref(&self) -> &Self::Target {
        &self.vcpu
    }
}

impl<H: ArchHooks> GuestVcpu<H> {
    /// Switches the vCPU's current address space ([`Vcpu::set_address_space`]).
    pub fn set_address_space(&mut self, as_id: u16) -> Result<(), memslots::Error> {
        self.vcpu.set_address_space(as_id)
    }
}
