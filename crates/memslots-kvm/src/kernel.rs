//! A kernel VM that applies trace operations with the real ioctls, for
//! differential testing of the library against the host's KVM.

use crate::sys;
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_enable_cap, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::{Kvm, VmFd};
use memslots::trace::{Op, Verdict};
use memslots::{Config, Errno};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A fresh VM on /dev/kvm, with no vCPUs and no guest memory: slot requests
/// are validated by the kernel exactly as for a real VMM (the kernel does not
/// touch the host range at KVM_SET_USER_MEMORY_REGION time). Safe code
/// cannot create a vCPU on it ([`fd`](Self::fd) is `unsafe`), so slots at
/// any host address are harmless.
pub struct KernelVm {
    _kvm: Kvm,
    vm: VmFd,
    /// Sizes of the slots the kernel accepted, to size dirty-log buffers.
    sizes: HashMap<u32, u64>,
    /// The trace's guest_memfds (`gmem` ops) by their number in the trace.
    gmem: HashMap<u32, OwnedFd>,
}

impl std::fmt::Debug for KernelVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVm").field("slots", &self.sizes.len()).finish_non_exhaustive()
    }
}

fn verdict<T>(r: Result<T, vmm_sys_util::errno::Error>) -> Verdict {
    match r {
        Ok(_) => Verdict::Ok,
        Err(e) => Verdict::Err(Errno(e.errno())),
    }
}

impl KernelVm {
    /// Creates a VM (`KVM_CREATE_VM`, default type).
    pub fn new() -> std::io::Result<Self> {
        let kvm = Kvm::new().map_err(std::io::Error::from)?;
        let vm = kvm.create_vm().map_err(std::io::Error::from)?;
        Ok(KernelVm { _kvm: kvm, vm, sizes: HashMap::new(), gmem: HashMap::new() })
    }

    /// The VM's address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE` on the VM fd; 0 means 1).
    pub fn nr_address_spaces(&self) -> u16 {
        let n = self.vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE));
        u16::try_from(n.max(1)).unwrap_or(1)
    }

    /// The user slots per address space of this VM (`KVM_CAP_NR_MEMSLOTS` on the VM fd).
    pub fn nr_memslots(&self) -> u16 {
        let n = self.vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_NR_MEMSLOTS));
        u16::try_from(n).ok().filter(|&n| n > 0).unwrap_or(memslots::KVM_USER_MEM_SLOTS)
    }

    /// The library configuration that matches this VM: its address spaces,
    /// user slots, `KVM_CAP_READONLY_MEM`, and the host's highest gfn
    /// ([`crate::probe_max_gfn`], else the CPU's physical address bits).
    pub fn config(&self) -> Config {
        let mut c = Config::x86_64().with_address_spaces(self.nr_address_spaces()).with_user_slots(self.nr_memslots());
        c.readonly_mem = self.vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_READONLY_MEM)) > 0;
        c.guest_memfd = self.vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_GUEST_MEMFD)) > 0;
        c.ring_with_bitmap =
            self.vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)) > 0;
        if let Some(limit) = crate::probe_user_addr_limit() {
            c.user_addr_limit = limit;
        }
        if let Some(rsvd) = crate::probe_dirty_ring_rsvd_entries() {
            c.dirty_ring_rsvd_entries = rsvd;
        }
        if let Some(max_gfn) = crate::probe_max_gfn() {
            c.max_gfn = max_gfn;
        } else if let Some(bits) = crate::host_phys_bits() {
            c.max_gfn = Config::max_gfn_for_phys_bits(bits);
        }
        c
    }

    /// The VM fd.
    ///
    /// `apply` is safe because this VM never lets the kernel touch the
    /// (arbitrary) host ranges of its slots: it has no vCPU, and issues no
    /// ioctl that reads or writes guest memory. The raw fd could break that.
    ///
    /// ```compile_fail
    /// let k = memslots_kvm::KernelVm::new().unwrap();
    /// let _vcpu = k.fd().create_vcpu(0); // error: call to unsafe function
    /// ```
    ///
    /// # Safety
    /// The caller must not use the fd to create a vCPU, or to issue any ioctl
    /// that makes the kernel access guest memory, unless every slot the VM
    /// has (and gets through [`apply`](Self::apply)) while that can happen
    /// maps memory valid for that access and not aliased by Rust references.
    pub unsafe fn fd(&self) -> &VmFd {
        &self.vm
    }

    /// Applies `op` with the real ioctl and returns the kernel's verdict.
    pub fn apply(&mut self, op: &Op) -> Verdict {
        match *op {
            Op::Set(r) => {
                let region = kvm_userspace_memory_region {
                    slot: r.slot,
                    flags: r.flags,
                    guest_phys_addr: r.guest_phys_addr,
                    memory_size: r.memory_size,
                    userspace_addr: r.userspace_addr,
                };
                // SAFETY: the kernel only records the host range here; this VM
                // never runs a vCPU and nothing reads or writes guest memory
                // through it, so no host memory is accessed via the mapping.
                let v = verdict(unsafe { self.vm.set_user_memory_region(region) });
                if v == Verdict::Ok {
                    if r.memory_size == 0 {
                        self.sizes.remove(&r.slot);
                    } else {
                        self.sizes.insert(r.slot, r.memory_size);
                    }
                }
                v
            }
            Op::GetDirtyLog { slot } => {
                // kvm-ioctls sizes the buffer from the slot size we pass; the
                // kernel writes ceil(npages / 64) words, so it must be exact or
                // larger: use the size the kernel accepted (1 page if unknown:
                // the kernel then fails before writing).
                let size = self.sizes.get(&slot).copied().unwrap_or(0x1000);
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                verdict(self.vm.get_dirty_log(slot, size))
            }
            Op::ClearDirtyLog { slot, first_page, num_pages } => {
                let words = usize::try_from(u64::from(num_pages).div_ceil(64)).unwrap_or(0).max(1);
                let bitmap = vec![0u64; words];
                verdict(sys::clear_dirty_log(&self.vm, slot, first_page, num_pages, &bitmap))
            }
            Op::EnableManualProtect { args } => self.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args),
            Op::CreateGuestMemfd { index, size } => {
                let r = self.vm.create_guest_memfd(kvm_create_guest_memfd { size, ..Default::default() });
                match r {
                    Ok(fd) => {
                        // SAFETY: the kernel just returned this fd; nothing else owns it.
                        self.gmem.insert(index, unsafe { OwnedFd::from_raw_fd(fd) });
                        Verdict::Ok
                    }
                    Err(e) => Verdict::Err(Errno(e.errno())),
                }
            }
            Op::Set2 { region: r, gmem, offset } => {
                // A guest_memfd the trace never created: an fd that is not open.
                let fd = self.gmem.get(&gmem).map_or(u32::MAX, |f| u32::try_from(f.as_raw_fd()).unwrap_or(u32::MAX));
                let region = kvm_userspace_memory_region2 {
                    slot: r.slot,
                    flags: r.flags,
                    guest_phys_addr: r.guest_phys_addr,
                    memory_size: r.memory_size,
                    userspace_addr: r.userspace_addr,
                    guest_memfd_offset: offset,
                    guest_memfd: fd,
                    ..Default::default()
                };
                // SAFETY: as for `Op::Set`: this VM never runs a vCPU.
                let v = verdict(unsafe { self.vm.set_user_memory_region2(region) });
                if v == Verdict::Ok {
                    if r.memory_size == 0 {
                        self.sizes.remove(&r.slot);
                    } else {
                        self.sizes.insert(r.slot, r.memory_size);
                    }
                }
                v
            }
            Op::EnableDirtyRing { bytes } => self.enable_cap(KVM_CAP_DIRTY_LOG_RING, bytes),
            Op::ResetDirtyRings => verdict(sys::reset_dirty_rings(&self.vm)),
            Op::EnableRingWithBitmap => self.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0),
        }
    }

    fn enable_cap(&self, cap: u32, arg: u64) -> Verdict {
        let mut c = kvm_enable_cap { cap, ..Default::default() };
        c.args[0] = arg;
        verdict(self.vm.enable_cap(&c))
    }
}
