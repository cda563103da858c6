//! [`KvmGuestVm`]: one VM for the whole VMM job — guest memory, the KVM
//! backend and an optional user layer on **one** memslots [`Vm`](memslots::Vm).
//!
//! The layers, in the order every slot change reaches them
//! ([`memslots::Layered`], see DESIGN.md "Layers"):
//!
//! 1. the guest-memory layer ([`MemHooks::strict`]): finds the registered
//!    host mapping behind the slot and attaches it to the slot; refuses
//!    (`EFAULT`) a slot over memory that is not registered, so every slot
//!    is backed by a mapping the slot keeps alive;
//! 2. the user's layer `U` (an emulator's MMU, a fuzzer's tracker;
//!    [`NoArch`] by default);
//! 3. the KVM layer ([`KvmHooks`]): `KVM_SET_USER_MEMORY_REGION(2)`. It is
//!    last, so it never has to be undone: if the kernel refuses, the layers
//!    before it are aborted and the library reinstalls the old state.
//!
//! On that one VM: access by guest address and the vm-memory traits
//! ([`GuestMemory`], through `Deref`), vCPUs ([`create_vcpu`](KvmGuestVm::create_vcpu),
//! owned and `Send`), and one merged dirty log per slot
//! ([`harvest_dirty_log`](KvmGuestVm::harvest_dirty_log)): what the guest
//! wrote (the kernel's bitmap, manual protect + CLEAR, or the vCPUs' dirty
//! rings) together with what the VMM and devices wrote through the library
//! and the vm-memory traits.
//!
//! ## Why the `VmFd` is safe to hand out here
//!
//! [`vm_fd`](KvmGuestVm::vm_fd) is safe (unlike [`KvmHooks::vm_fd`] on an
//! unrestricted VM): every slot the kernel holds maps a registered
//! [`HostMemory`](memslots_mem::HostMemory) that the library's slot keeps
//! mapped; a slot leaves the kernel (its delete ioctl, which waits for the
//! kernel's own readers) before the library frees it; and when the VM is
//! dropped the kernel's slots are deleted before any library slot is freed
//! ([`ArchHooks::destroy_vm`]). So a vCPU created on the raw `VmFd`, even
//! one that outlives this VM, can only reach memory that is mapped. What
//! the `VmFd` cannot do safely (`set_user_memory_region`) is `unsafe` in
//! kvm-ioctls already; the `VmFd` methods kvm-ioctls leaves safe that make
//! the kernel write through a user pointer (`encrypt_op_sev`,
//! `register_enc_memory_region`, SEV hosts only) are as safe here as on any
//! `VmFd` safe code gets from `Kvm::create_vm`. What the raw fd bypasses is
//! the merged dirty log: vCPUs created on it have no mapped ring, a
//! `get_dirty_log` on it takes the kernel's bits, and capabilities enabled
//! on it are unknown to [`enable_dirty_mode`](KvmGuestVm::enable_dirty_mode):
//! use this type's calls for those.
//!
//! ## When a hot-unplugged mapping is unmapped
//!
//! The registry holds mappings weakly. After
//! [`delete_region`](GuestMemory::delete_region) returns, the slot is gone
//! from the kernel and from both memslot sets, and address-space snapshot
//! caches ([`GuestMemory::address_space`]) have dropped their snapshot. The
//! mapping is unmapped when the last of these lets go: the caller's own
//! `Arc<HostMemory>`, other slots over it, and vm-memory snapshots
//! ([`MemslotsSnapshot`](memslots_mem::MemslotsSnapshot)) or read sections
//! still held by someone. A reader holding a snapshot keeps reading valid
//! (if stale) memory until it drops it.

use crate::backend::{KvmHooks, KvmVcpu};
use crate::kdirty::{sync_dirty_log_into, KernelDirtyMode, KernelRing};
use kvm_ioctls::{Kvm, VmFd};
use memslots::{ArchHooks, Config, Errno, Layered, NoArch};
use memslots_mem::{GuestMemory, MemHooks};
use std::sync::{Arc, Mutex, PoisonError};

/// The inner layers of a [`KvmGuestVm`]: the user's layer `U`, then KVM.
pub type KvmLayers<U = NoArch> = Layered<U, KvmHooks>;

/// The guest memory of a [`KvmGuestVm`].
pub type KvmGuestMemory<U = NoArch> = GuestMemory<KvmLayers<U>>;

/// A KVM VM with guest memory: one memslots VM whose slots are mirrored
/// into a kernel VM (see the [module docs](self)). Cheap to clone; clones
/// share everything.
pub struct KvmGuestVm<U: ArchHooks = NoArch> {
    mem: KvmGuestMemory<U>,
    kvm: Arc<Kvm>,
    dirty: Arc<DirtyState>,
}

impl<U: ArchHooks> Clone for KvmGuestVm<U> {
    fn clone(&self) -> Self {
        KvmGuestVm { mem: self.mem.clone(), kvm: Arc::clone(&self.kvm), dirty: Arc::clone(&self.dirty) }
    }
}

impl<U: ArchHooks> std::fmt::Debug for KvmGuestVm<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuestVm").field("mem", &self.mem).field("dirty_mode", &self.dirty_mode()).finish()
    }
}

/// How guest writes are tracked, and the vCPUs' mapped rings.
#[derive(Debug)]
struct DirtyState {
    mode: Mutex<KernelDirtyMode>,
    /// The mapped rings, and whether a `KVM_RESET_DIRTY_RINGS` is owed
    /// (entries were collected but the reset failed).
    rings: Mutex<(Vec<KernelRing>, bool)>,
    /// Serialises harvests: with manual protect, two interleaved harvests of
    /// one slot could CLEAR (re-protect) a page the other had already taken
    /// from the library, losing a guest write that came in between.
    harvest: Mutex<()>,
}

impl KvmGuestVm {
    /// A kernel VM from /dev/kvm and a library VM configured like it
    /// ([`host_config`](crate::host_config): address spaces, slots,
    /// READONLY, guest_memfd, highest gfn), with no user layer.
    pub fn new() -> std::io::Result<Self> {
        KvmGuestVm::with_layer(NoArch)
    }
}

impl<U: ArchHooks> KvmGuestVm<U> {
    /// As [`new`](KvmGuestVm::new), with the user's layer `user` between
    /// guest memory and KVM.
    pub fn with_layer(user: U) -> std::io::Result<Self> {
        let config = crate::host_config().unwrap_or_default();
        Self::with_config(config, user)
    }

    /// As [`with_layer`](Self::with_layer) with an explicit library
    /// configuration (the number of address spaces is the kernel VM's).
    pub fn with_config(mut config: Config, user: U) -> std::io::Result<Self> {
        let kvm = Kvm::new().map_err(std::io::Error::from)?;
        let vm = kvm.create_vm().map_err(std::io::Error::from)?;
        let nr_as = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE));
        config.nr_address_spaces = u16::try_from(nr_as.max(1)).unwrap_or(1);
        let mem =
            GuestMemory::with_layers(config, MemHooks::strict(), Layered::new(user, KvmHooks::for_guest_memory(vm)))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(KvmGuestVm {
            mem,
            kvm: Arc::new(kvm),
            dirty: Arc::new(DirtyState {
                mode: Mutex::new(KernelDirtyMode::Bitmap),
                rings: Mutex::default(),
                harvest: Mutex::default(),
            }),
        })
    }

    /// The guest memory (also reachable through `Deref`).
    pub fn memory(&self) -> &KvmGuestMemory<U> {
        &self.mem
    }

    /// `/dev/kvm`, for `get_supported_cpuid`, MSR lists and capabilities.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The kernel VM, for vCPUs, CPUID, the interrupt controller, TSS and
    /// identity-map addresses, irqfds and ioeventfds. Safe: see the
    /// [module docs](self#why-the-vmfd-is-safe-to-hand-out-here).
    pub fn vm_fd(&self) -> &VmFd {
        self.kvm_hooks().kernel_fd()
    }

    /// `KVM_CREATE_GUEST_MEMFD`: a guest_memfd of `size` bytes for this VM,
    /// for [`set_region_guest_memfd`](GuestMemory::set_region_guest_memfd).
    pub fn create_guest_memfd(&self, size: u64) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        let gmem = kvm_bindings::kvm_create_guest_memfd { size, ..Default::default() };
        let fd = self.vm_fd().create_guest_memfd(gmem).map_err(std::io::Error::from)?;
        self.mem.vm().declare_guest_memfd(u32::try_from(fd).unwrap_or(u32::MAX), size);
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// The KVM layer (ioctl counts, fault injection).
    pub fn kvm_hooks(&self) -> &KvmHooks {
        &self.mem.inner().inner
    }

    /// The user's layer.
    pub fn user_layer(&self) -> &U {
        &self.mem.inner().outer
    }

    /// How guest writes are tracked (set by [`enable_dirty_mode`](Self::enable_dirty_mode)).
    pub fn dirty_mode(&self) -> KernelDirtyMode {
        *self.dirty.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses how the kernel tracks guest writes: the default
    /// `KVM_GET_DIRTY_LOG` bitmap, manual protect (`GET` + `CLEAR`), or
    /// dirty rings of `bytes` bytes. Before any vCPU exists (the kernel's
    /// rule for rings; `EINVAL` afterwards).
    pub fn enable_dirty_mode(&self, mode: KernelDirtyMode) -> Result<(), Errno> {
        crate::kdirty::enable_dirty_mode_on(self.kvm_hooks(), mode)?;
        *self.dirty.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
        Ok(())
    }

    /// Creates vCPU `id`: an owned handle (`'static + Send`, so it moves
    /// into a vCPU thread) that keeps this VM, and so every mapping its
    /// slots use, alive. With dirty rings on, its ring is mapped and joins
    /// the VM's harvest.
    pub fn create_vcpu(&self, id: u64) -> std::io::Result<KvmVcpu>
    where
        U: 'static,
    {
        let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(self.mem.clone());
        let vcpu = self.kvm_hooks().new_vcpu(id, keep)?;
        if vcpu.dirty_ring_bytes() != 0 {
            let ring = KernelRing::map(&vcpu, vcpu.dirty_ring_bytes())?;
            self.dirty.rings.lock().unwrap_or_else(PoisonError::into_inner).0.push(ring);
        }
        Ok(vcpu)
    }

    /// Collects every vCPU's dirty ring into the library's bitmaps and
    /// resets the rings (`KVM_RESET_DIRTY_RINGS`). A vCPU thread calls it on
    /// `KVM_EXIT_DIRTY_RING_FULL`; [`harvest_dirty_log`](Self::harvest_dirty_log)
    /// calls it too. Returns the entries collected.
    pub fn harvest_rings(&self) -> Result<u64, Errno> {
        let mut guard = self.dirty.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let (rings, reset_owed) = &mut *guard;
        let vm = self.mem.vm();
        let mut n = 0;
        for ring in rings.iter_mut() {
            n += ring.harvest_with(|slot, offset| {
                let _ = vm.mark_page_dirty_in_slot(slot, offset);
            });
        }
        if n > 0 || *reset_owed {
            *reset_owed = true;
            crate::sys::reset_dirty_rings(self.vm_fd()).map_err(|e| Errno(e.errno()))?;
            *reset_owed = false;
        }
        Ok(n)
    }

    /// The dirty pages of `slot` (`as_id << 16 | id`) since the last call,
    /// as a bitmap (bit `i`: page `i` of the slot), and clears them: the
    /// guest's writes (merged from the kernel in the VM's
    /// [dirty mode](Self::enable_dirty_mode)) together with every write made
    /// through the library and the vm-memory traits. The slot must log
    /// dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`; `ENOENT` otherwise, as KVM).
    ///
    /// No write is lost: a guest write that lands after the kernel's part
    /// of the harvest stays in the kernel (its page is write-protected
    /// again first) for the next call; a library write after the library's
    /// part stays in the library's bitmap. Copy the pages *after* this call
    /// returns. Do not change `slot` concurrently with its harvest.
    pub fn harvest_dirty_log(&self, slot: u32) -> Result<Vec<u64>, Errno> {
        let _one_at_a_time = self.dirty.harvest.lock().unwrap_or_else(PoisonError::into_inner);
        match self.dirty_mode() {
            KernelDirtyMode::Ring(_) => {
                self.harvest_rings()?;
            }
            mode => {
                sync_dirty_log_into(self.mem.vm(), self.vm_fd(), slot, mode)?;
            }
        }
        self.mem.vm().get_dirty_log_vec(slot).map_err(|e| e.errno())
    }
}

impl<U: ArchHooks> std::ops::Deref for KvmGuestVm<U> {
    type Target = KvmGuestMemory<U>;
    fn deref(&self) -> &KvmGuestMemory<U> {
        &self.mem
    }
}
