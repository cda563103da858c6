//! The KVM backend: a [`memslots::Vm`] whose every committed slot change is
//! mirrored, in order and with the same ids, into a kernel VM.
//!
//! The library validates each request first (KVM's checks, KVM's order), so the
//! kernel only sees requests it accepts. The kernel ioctl runs in the arch
//! prepare step: if the kernel still refuses, the library reinstalls the old
//! state exactly and returns the kernel's errno.
//!
//! ## Soundness: who may let the kernel touch host memory
//!
//! `KVM_SET_USER_MEMORY_REGION` only records a host range; the kernel reads
//! and writes it when a vCPU of the VM runs (the guest's accesses, and the
//! kernel's own on the guest's behalf). [`Vm::set_user_memory_region`] is safe
//! and takes any `userspace_addr`, so a backend VM comes in two kinds:
//!
//! - **Unrestricted** ([`new_kvm_vm`]): slots may name any host range (fake
//!   addresses for differential testing and benchmarks), and there is no safe
//!   way to create a vCPU: [`KvmHooks::create_vcpu`] refuses, and the raw
//!   [`VmFd`] is only reachable through the `unsafe` [`KvmHooks::vm_fd`].
//! - **Owned memory** ([`new_kvm_guest_vm`]): every slot's host range must lie
//!   inside memory attached to the VM ([`KvmHooks::attach`], which keeps the
//!   [`Mapping`] alive for as long as the kernel VM or any of its vCPUs can
//!   use it, or the `unsafe` [`KvmHooks::allow_host_range`]); other slots are
//!   refused with `EFAULT` before the kernel sees them. vCPUs come from
//!   [`KvmHooks::create_vcpu`], a [`KvmVcpu`] that keeps the attached memory
//!   alive, so a guest can only ever write memory the VM owns.

use crate::guest::Mapping;
use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memslots::{
    ArchHooks, Config, Errno, MemoryChange, MemorySlot, SlotDesc, SlotDraft, Vm, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Flags userspace may pass to the kernel (internal bits stripped).
const UAPI_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;

/// Host memory an owned-memory VM's slots may map: ranges, and the mappings
/// that keep them valid. Shared (`Arc`) by the hooks and every [`KvmVcpu`],
/// so nothing here is released while a vCPU could still run.
#[derive(Debug, Default)]
struct HostMem {
    /// `[start, end)` host ranges slots may map.
    ranges: Vec<(u64, u64)>,
    /// Mappings owned for the life of the kernel VM.
    owned: Vec<Arc<Mapping>>,
}

impl HostMem {
    fn covers(&self, hva: u64, size: u64) -> bool {
        let Some(end) = hva.checked_add(size) else { return false };
        self.ranges.iter().any(|&(s, e)| s <= hva && end <= e)
    }
}

/// Which host memory the kernel VM's slots may map.
#[derive(Debug)]
enum Access {
    /// Any host range; no safe vCPUs.
    Unrestricted,
    /// Ranges attached to the VM ([`KvmHooks::attach`]).
    Owned(Arc<RwLock<HostMem>>),
    /// The KVM layer under a strict guest-memory layer
    /// ([`KvmGuestVm`](crate::KvmGuestVm)): every slot is backed by a mapping
    /// the slot keeps alive, the kernel's slots are deleted before the
    /// library frees any slot ([`ArchHooks::destroy_vm`]), and a deleted
    /// slot is gone from the kernel before the library frees it.
    GuestMemory,
}

/// Arch hooks that mirror slot changes into a kernel VM.
#[derive(Debug)]
pub struct KvmHooks {
    // Field order: the kernel VM fd closes before the memory is released.
    vm: VmFd,
    access: Access,
    /// Slots the kernel holds (`as_id << 16 | id`), for `destroy_vm` (guest-memory VMs only).
    kernel_slots: Mutex<BTreeSet<u32>>,
    /// Test hook: the next prepare fails with this errno (0: none).
    inject: AtomicI32,
    /// Dirty ring size in bytes the VM was enabled with (0: none).
    ring_bytes: AtomicU32,
    ioctls: AtomicU64,
    refusals: AtomicU64,
}

impl KvmHooks {
    fn new(vm: VmFd, owned: bool) -> Self {
        let access = if owned { Access::Owned(Arc::default()) } else { Access::Unrestricted };
        KvmHooks::with_access(vm, access)
    }

    /// The KVM layer of a [`KvmGuestVm`](crate::KvmGuestVm).
    pub(crate) fn for_guest_memory(vm: VmFd) -> Self {
        KvmHooks::with_access(vm, Access::GuestMemory)
    }

    fn with_access(vm: VmFd, access: Access) -> Self {
        KvmHooks {
            vm,
            access,
            kernel_slots: Mutex::default(),
            inject: AtomicI32::new(0),
            ring_bytes: AtomicU32::new(0),
            ioctls: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        }
    }

    /// The kernel VM.
    ///
    /// # Safety
    /// The `VmFd` can do what this crate keeps from safe code. The caller
    /// must not use it (or anything derived from it, e.g. a vCPU created on
    /// it) to let the kernel access host memory that is not valid for it:
    /// while any vCPU of the VM runs, every slot of the VM — including those
    /// created later through the safe [`Vm::set_user_memory_region`] by any
    /// code holding the VM — must map memory that stays mapped, writable
    /// (readable for `KVM_MEM_READONLY` slots) and unaliased by Rust
    /// references for as long as the vCPU can run, which may outlive this
    /// `KvmVm`. It must not enable the dirty ring or change slots behind the
    /// library's back other than to the same host ranges.
    ///
    /// Safe code cannot reach it (it would create and run a vCPU over
    /// whatever host addresses the VM's slots name):
    ///
    /// ```compile_fail
    /// let vm = memslots_kvm::new_kvm_vm().unwrap();
    /// let _vcpu = vm.hooks().vm_fd().create_vcpu(0); // error: call to unsafe function
    /// ```
    pub unsafe fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The kernel VM, for this crate's own ioctls (none of which creates a
    /// vCPU, changes a slot or accesses guest memory).
    pub(crate) fn kernel_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Whether this VM only accepts slots over memory it keeps alive:
    /// attached memory (then [`create_vcpu`](Self::create_vcpu) hands out
    /// vCPUs), or the guest-memory layer of a
    /// [`KvmGuestVm`](crate::KvmGuestVm) (whose `create_vcpu` does).
    pub fn owns_memory(&self) -> bool {
        !matches!(self.access, Access::Unrestricted)
    }

    /// Fault injection for tests: the next prepare step of a slot change
    /// fails with `errno` before reaching the kernel, as if the kernel had
    /// refused it (the change is undone in every layer).
    pub fn inject_prepare_failure(&self, errno: Errno) {
        self.inject.store(errno.0, Ordering::Release);
    }

    fn owned(&self) -> std::io::Result<&Arc<RwLock<HostMem>>> {
        match &self.access {
            Access::Owned(h) => Ok(h),
            _ => Err(not_owned()),
        }
    }

    /// Attaches `mapping` to an owned-memory VM: slots may then map any part
    /// of it, and it stays mapped for as long as the kernel VM or any vCPU
    /// of it exists. Fails with `InvalidInput` on an unrestricted VM.
    pub fn attach(&self, mapping: &Arc<Mapping>) -> std::io::Result<()> {
        let host = self.owned()?;
        let mut h = host.write().unwrap_or_else(PoisonError::into_inner);
        let start = mapping.hva();
        let end = start.saturating_add(mapping.len() as u64);
        h.ranges.push((start, end));
        h.owned.push(Arc::clone(mapping));
        Ok(())
    }

    /// Lets slots of an owned-memory VM map `[hva, hva + len)`, memory the
    /// caller owns. Fails with `InvalidInput` on an unrestricted VM or if the
    /// range wraps.
    ///
    /// # Safety
    /// For as long as the kernel VM or any vCPU of it exists (a [`KvmVcpu`]
    /// may outlive the `KvmVm`), the range must stay mapped and writable
    /// (the guest may write any of it while a vCPU runs) and must not be
    /// covered by Rust references or otherwise relied upon not to change.
    pub unsafe fn allow_host_range(&self, hva: u64, len: u64) -> std::io::Result<()> {
        let host = self.owned()?;
        let end = hva.checked_add(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        host.write().unwrap_or_else(PoisonError::into_inner).ranges.push((hva, end));
        Ok(())
    }

    /// Creates vCPU `id` on an owned-memory VM. Fails with `InvalidInput` on
    /// an unrestricted VM (its slots may map anything); see the module docs.
    pub fn create_vcpu(&self, id: u64) -> std::io::Result<KvmVcpu> {
        let host = self.owned()?;
        self.new_vcpu(id, Arc::clone(host) as Arc<dyn std::any::Any + Send + Sync>)
    }

    /// A vCPU keeping `keep` alive.
    pub(crate) fn new_vcpu(&self, id: u64, keep: Arc<dyn std::any::Any + Send + Sync>) -> std::io::Result<KvmVcpu> {
        let fd = self.vm.create_vcpu(id).map_err(std::io::Error::from)?;
        // Read after the vCPU exists: the kernel enables a ring only while
        // no vCPU exists, and we record it after it succeeded, so a non-zero
        // value here is the ring this vCPU has (0 may be conservative).
        let ring_bytes = self.ring_bytes.load(Ordering::Acquire);
        Ok(KvmVcpu { fd, ring_bytes, _keep: keep })
    }

    /// The dirty ring size the VM was enabled with through
    /// [`enable_kernel_dirty_mode`](crate::kdirty::enable_kernel_dirty_mode)
    /// (0: no ring).
    pub fn dirty_ring_bytes(&self) -> u32 {
        self.ring_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn record_ring(&self, bytes: u32) {
        self.ring_bytes.store(bytes, Ordering::Release);
    }

    /// KVM_SET_USER_MEMORY_REGION(2) calls made so far.
    pub fn ioctls(&self) -> u64 {
        self.ioctls.load(Ordering::Relaxed)
    }

    /// Requests the library accepted but the kernel refused (each rolled back).
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Whether a slot may map `[hva, hva + size)`.
    fn may_map(&self, hva: u64, size: u64) -> bool {
        match &self.access {
            Access::Unrestricted | Access::GuestMemory => true,
            Access::Owned(h) => h.read().unwrap_or_else(PoisonError::into_inner).covers(hva, size),
        }
    }

    fn track(&self) -> Option<std::sync::MutexGuard<'_, BTreeSet<u32>>> {
        matches!(self.access, Access::GuestMemory)
            .then(|| self.kernel_slots.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Deletes `desc`'s slot from the kernel.
    fn kernel_delete(&self, desc: &SlotDesc) -> Result<(), Errno> {
        self.set(desc.slot(), 0, 0, 0, desc.userspace_addr, None)?;
        if let Some(mut t) = self.track() {
            t.remove(&desc.slot());
        }
        Ok(())
    }

    /// Gives the kernel slot `desc` (create, move or flags).
    fn kernel_set(&self, d: &SlotDesc) -> Result<(), Errno> {
        if !self.may_map(d.userspace_addr, d.npages << 12) {
            return Err(Errno::EFAULT);
        }
        let gmem = d.guest_memfd.map(|g| (g.fd, g.offset));
        self.set(d.slot(), d.flags & UAPI_FLAGS, d.base_gfn << 12, d.npages << 12, d.userspace_addr, gmem)?;
        if let Some(mut t) = self.track() {
            t.insert(d.slot());
        }
        Ok(())
    }

    fn set(&self, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64, gmem: Option<(u32, u64)>) -> Result<(), Errno> {
        self.ioctls.fetch_add(1, Ordering::Relaxed);
        let r = match gmem {
            None => {
                let region = kvm_userspace_memory_region {
                    slot,
                    flags,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: hva,
                };
                // SAFETY: the kernel only records the range here. It accesses
                // it when a vCPU runs: an unrestricted VM has no vCPU but
                // through the unsafe `vm_fd` (whose contract covers this
                // slot); an owned-memory VM only gets here for ranges inside
                // memory it keeps alive (`may_map`, checked in prepare).
                // Deletes pass size 0.
                unsafe { self.vm.set_user_memory_region(region) }
            }
            Some((fd, offset)) => {
                let region = kvm_userspace_memory_region2 {
                    slot,
                    flags,
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: hva,
                    guest_memfd_offset: offset,
                    guest_memfd: fd,
                    ..Default::default()
                };
                // SAFETY: as above; the guest_memfd is validated by the kernel
                // (a guest_memfd of this VM) and is not host memory we use.
                unsafe { self.vm.set_user_memory_region2(region) }
            }
        };
        r.map_err(|e| {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            Errno(e.errno())
        })
    }
}

impl ArchHooks for KvmHooks {
    type SlotData = ();

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<()>>,
        new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        let injected = self.inject.swap(0, Ordering::AcqRel);
        if injected != 0 {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(Errno(injected));
        }
        match (change, old, new) {
            (MemoryChange::Delete, Some(old), _) => self.kernel_delete(old.desc()),
            (_, _, Some(new)) => self.kernel_set(&new.desc),
            _ => Ok(()),
        }
    }

    /// Undoes a prepare that reached the kernel, when a later layer refused
    /// the change (only if this layer is not the last one: put it last, as
    /// [`KvmGuestVm`](crate::KvmGuestVm) does, and this never runs). The
    /// kernel gets the old state back; a slot whose dirty logging was
    /// switched and switched back loses the kernel's dirty bits of that
    /// slot, which is why the KVM layer belongs last.
    fn abort_memory_region(&self, change: MemoryChange, old: Option<&MemorySlot<()>>, new: Option<&SlotDraft<()>>) {
        let undo = match (change, old, new) {
            (MemoryChange::Create, _, Some(new)) => self.kernel_delete(&new.desc),
            (_, Some(old), _) => self.kernel_set(old.desc()),
            _ => Ok(()),
        };
        debug_assert!(undo.is_ok(), "the kernel refused to undo a change it had accepted: {undo:?}");
    }

    /// `kvm_arch_destroy_vm` runs before the memslots are freed: drop the
    /// kernel's slots, so a vCPU fd that outlives this VM (the kernel VM
    /// lives while any of its fds is open) can no longer reach the host
    /// memory the library's slots are about to release.
    ///
    /// A delete the kernel refuses (it allocates while deleting, so
    /// `ENOMEM` is possible) is retried; if the kernel keeps refusing, the
    /// process aborts: freeing memory a kernel slot still maps would let a
    /// vCPU that outlives the VM write into whatever is mapped there next.
    fn destroy_vm(&self) {
        let Some(mut slots) = self.track() else { return };
        for slot in std::mem::take(&mut *slots) {
            let gone = (0..100).any(|i| {
                if i > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                self.set(slot, 0, 0, 0, 0, None).is_ok()
            });
            if !gone {
                eprintln!("memslots-kvm: the kernel refused to delete slot {slot:#x} at VM teardown; aborting");
                std::process::abort();
            }
        }
    }
}

/// A library VM mirrored into a kernel VM.
pub type KvmVm = Vm<KvmHooks>;

fn not_owned() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "an unrestricted KVM VM (new_kvm_vm) has no safe vCPUs or attached memory; use new_kvm_guest_vm",
    )
}

fn kernel_vm() -> std::io::Result<(VmFd, Config)> {
    let kvm = Kvm::new().map_err(std::io::Error::from)?;
    let vm = kvm.create_vm().map_err(std::io::Error::from)?;
    let mut config = crate::host_config().unwrap_or_default();
    let nr_as = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE));
    config.nr_address_spaces = u16::try_from(nr_as.max(1)).unwrap_or(1);
    Ok((vm, config))
}

fn library_vm(hooks: KvmHooks, config: Config) -> std::io::Result<KvmVm> {
    Vm::with_hooks(config, hooks).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))
}

/// Creates a kernel VM and an **unrestricted** library VM over it, configured
/// from the host (address spaces, slots, READONLY, highest gfn).
///
/// Slots may name any host range: the kernel never accesses them, because
/// such a VM gets no vCPU from safe code ([`KvmHooks::create_vcpu`] refuses;
/// see the [module docs](self)).
pub fn new_kvm_vm() -> std::io::Result<KvmVm> {
    let (vm, config) = kernel_vm()?;
    library_vm(KvmHooks::new(vm, false), config)
}

/// Creates a kernel VM and an **owned-memory** library VM over it: slots
/// must map memory [attached](KvmHooks::attach) to it (others fail with
/// `EFAULT`), and [`KvmHooks::create_vcpu`] gives vCPUs that can run.
pub fn new_kvm_guest_vm() -> std::io::Result<KvmVm> {
    let (vm, config) = kernel_vm()?;
    library_vm(KvmHooks::new(vm, true), config)
}

/// An unrestricted library VM over an existing kernel VM `vm`, with `config`.
///
/// # Safety
/// `vm` may already have vCPUs (or get them from wherever it came from): the
/// caller takes on the contract of [`KvmHooks::vm_fd`] for `vm`.
pub unsafe fn with_config(vm: VmFd, config: Config) -> std::io::Result<KvmVm> {
    library_vm(KvmHooks::new(vm, false), config)
}

/// A vCPU of an owned-memory [`KvmVm`]: it keeps the VM's attached memory
/// alive, so it may outlive the `KvmVm` and still only reach that memory.
///
/// `Deref`s to the [`VcpuFd`] for register access; running takes
/// [`run`](Self::run) (there is deliberately no `DerefMut`: swapping the
/// `VcpuFd` out would separate it from the memory it may write).
#[derive(Debug)]
pub struct KvmVcpu {
    // Field order: the vCPU fd closes before the memory is released.
    fd: VcpuFd,
    ring_bytes: u32,
    /// What keeps the memory the vCPU may reach alive (the attached
    /// mappings, or the whole guest-memory VM).
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

impl KvmVcpu {
    /// `KVM_RUN`.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, vmm_sys_util::errno::Error> {
        self.fd.run()
    }

    /// The dirty ring size (bytes) the VM had when this vCPU was created
    /// through the library (0: no ring, or unknown).
    pub fn dirty_ring_bytes(&self) -> u32 {
        self.ring_bytes
    }
}

impl std::ops::Deref for KvmVcpu {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        &self.fd
    }
}
