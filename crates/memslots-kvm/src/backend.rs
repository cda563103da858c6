//! The KVM backend: a [`memslots::Vm`] whose every committed slot change is
//! mirrored, in order and with the same ids, into a kernel VM.
//!
//! The library validates each request first (KVM's checks, KVM's order), so the
//! kernel only sees requests it accepts. The kernel ioctl runs in the arch
//! prepare step: if the kernel still refuses, the library reinstalls the old
//! state exactly and returns the kernel's errno.

use kvm_bindings::{kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VmFd};
use memslots::{
    ArchHooks, Config, Errno, MemoryChange, MemorySlot, SlotDraft, Vm, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// Flags userspace may pass to the kernel (internal bits stripped).
const UAPI_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;

/// Arch hooks that mirror slot changes into a kernel VM.
#[derive(Debug)]
pub struct KvmHooks {
    vm: VmFd,
    ioctls: AtomicU64,
    refusals: AtomicU64,
}

impl KvmHooks {
    /// The kernel VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// KVM_SET_USER_MEMORY_REGION(2) calls made so far.
    pub fn ioctls(&self) -> u64 {
        self.ioctls.load(Ordering::Relaxed)
    }

    /// Requests the library accepted but the kernel refused (each rolled back).
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
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
                // SAFETY: `KvmVm::new`'s contract: every host range a slot is
                // created with is memory the caller keeps valid while the slot
                // exists in the kernel. Deletes pass size 0.
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
                // SAFETY: as above; the guest_memfd is the caller's.
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
        match (change, old, new) {
            (MemoryChange::Delete, Some(old), _) => self.set(old.slot(), 0, 0, 0, old.userspace_addr, None),
            (_, _, Some(new)) => {
                let d = &new.desc;
                let gmem = d.guest_memfd.map(|g| (g.fd, g.offset));
                self.set(d.slot(), d.flags & UAPI_FLAGS, d.base_gfn << 12, d.npages << 12, d.userspace_addr, gmem)
            }
            _ => Ok(()),
        }
    }
}

/// A library VM mirrored into a kernel VM.
pub type KvmVm = Vm<KvmHooks>;

/// Creates a kernel VM and a library VM over it, configured from the host
/// (address spaces, slots, READONLY, highest gfn).
///
/// # Safety
/// Every slot created through the returned VM maps its host range into the
/// guest: the caller must keep each range valid, writable memory (readable for
/// READONLY slots) for as long as the slot exists, and must not create vCPUs
/// on the kernel VM that run while that is not so.
pub unsafe fn new_kvm_vm() -> std::io::Result<KvmVm> {
    let kvm = Kvm::new().map_err(std::io::Error::from)?;
    let vm = kvm.create_vm().map_err(std::io::Error::from)?;
    let mut config = crate::host_config().unwrap_or_default();
    let nr_as = vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE));
    config.nr_address_spaces = u16::try_from(nr_as.max(1)).unwrap_or(1);
    // SAFETY: the caller upholds this function's contract, which is with_config's.
    unsafe { with_config(vm, config) }
}

/// A library VM over an existing kernel VM `vm`, with `config`.
///
/// # Safety
/// As [`new_kvm_vm`].
pub unsafe fn with_config(vm: VmFd, config: Config) -> std::io::Result<KvmVm> {
    Vm::with_hooks(config, KvmHooks { vm, ioctls: AtomicU64::new(0), refusals: AtomicU64::new(0) })
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))
}
