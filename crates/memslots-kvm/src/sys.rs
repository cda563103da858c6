//! ioctls kvm-ioctls does not wrap: `KVM_CLEAR_DIRTY_LOG` (and, later, the
//! dirty ring ones). Written by hand with vmm-sys-util's helpers.

use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;

#[allow(missing_docs)]
mod nr {
    use super::{kvm_clear_dirty_log, KVMIO};
    use vmm_sys_util::ioctl_io_nr;
    #[allow(unused_imports)]
    use vmm_sys_util::{ioctl_ioc_nr, ioctl_iowr_nr};
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// `KVM_RESET_DIRTY_RINGS`: the kernel frees every collected ring entry of
/// every vCPU; returns how many.
pub fn reset_dirty_rings(vm: &VmFd) -> errno::Result<u64> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only affects the VM.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u64::try_from(ret).map_err(|_| errno::Error::last())
}

/// `KVM_CLEAR_DIRTY_LOG`: clears, in pages `[first_page, first_page +
/// num_pages)` of `slot`, the dirty bits set in `bitmap`.
///
/// `bitmap` must hold at least `ceil(num_pages / 64)` words (the kernel reads
/// that many); shorter bitmaps are refused with EFAULT before the ioctl.
pub fn clear_dirty_log(vm: &VmFd, slot: u32, first_page: u64, num_pages: u32, bitmap: &[u64]) -> errno::Result<()> {
    let need = usize::try_from(u64::from(num_pages).div_ceil(64)).unwrap_or(usize::MAX);
    if bitmap.len() < need {
        return Err(errno::Error::new(libc::EFAULT));
    }
    let mut arg = kvm_clear_dirty_log { slot, num_pages, first_page, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: `arg` is a valid kvm_clear_dirty_log; the kernel reads
    // ceil(num_pages / 64) words from `bitmap`, which holds at least that many
    // (checked above), and writes nothing through the pointer.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret == 0 {
        Ok(())
    } else {
        Err(errno::Error::last())
    }
}
