//! The kernel peer: `KVM_SET_USER_MEMORY_REGION` issued directly (kvm-ioctls)
//! on a KVM VM that never gets a vCPU, with the layout's fake host addresses.

use kvm_bindings::kvm_userspace_memory_region;
pub use kvm_ioctls::Kvm;
use kvm_ioctls::VmFd;

use crate::layout::hva_of;
use crate::Error;

/// A KVM VM used only to record memory slots: it never gets a vCPU and no
/// other ioctl is issued on it (the file descriptor is not exposed), so the
/// kernel never dereferences the host ranges it is given.
pub struct RawVm {
    vm: VmFd,
}

impl RawVm {
    /// A new, empty VM on `kvm`.
    pub fn new(kvm: &Kvm) -> Result<Self, Error> {
        Ok(RawVm { vm: kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))? })
    }

    /// `KVM_SET_USER_MEMORY_REGION` for `slot` (address space 0) at guest
    /// address `gpa`, `size` bytes (0 deletes), host address `hva`.
    pub fn set_at(&self, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> Result<(), Error> {
        let r =
            kvm_userspace_memory_region { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva };
        // SAFETY: the kernel only records the host range; it would access it
        // only to fault guest pages in for a running vCPU or for its own
        // accesses to guest memory, and this VM never gets a vCPU nor any
        // other ioctl (the fd is private to `RawVm`). So the fake (page
        // aligned, below the user address limit, unmapped) host addresses are
        // never dereferenced, and nothing in this process relies on them.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        Ok(())
    }

    /// [`RawVm::set_at`] at the layout's host address of `slot`
    /// ([`hva_of`]).
    pub fn set(&self, slot: u32, flags: u32, gpa: u64, size: u64) -> Result<(), Error> {
        self.set_at(slot, flags, gpa, size, hva_of(slot))
    }
}

/// Opens `/dev/kvm` if it is usable (API version 12, a VM can be created);
/// returns it with `KVM_CAP_NR_MEMSLOTS`, or why not.
pub fn open() -> Result<(Kvm, u32), Error> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm not available".into());
    }
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm not available ({e})"))?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(format!("/dev/kvm not available (KVM_GET_API_VERSION = {api}, not 12)").into());
    }
    kvm.create_vm().map_err(|e| format!("/dev/kvm not available (KVM_CREATE_VM: {e})"))?;
    let nr = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
    Ok((kvm, nr))
}
