//! Dirty pages from the kernel, merged into the library's dirty bitmaps:
//! `KVM_GET_DIRTY_LOG` (take), manual protect (`GET` + `KVM_CLEAR_DIRTY_LOG`
//! of exactly what was merged), and per-vCPU dirty rings mmap'd from the vCPU
//! fd. Merging marks each kernel-dirty page in the library's bitmap, so a
//! harvest through the library returns what the guest wrote (tracked by the
//! kernel) together with what the VMM wrote through the library.

use crate::backend::{KvmVcpu, KvmVm};
use crate::sys;
use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VmFd;
use memslots::{DirtyMark, Errno};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

/// How the kernel tracks dirty pages for the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelDirtyMode {
    /// `KVM_GET_DIRTY_LOG` takes and clears the kernel's bitmap.
    Bitmap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: GET copies, CLEAR clears what was merged.
    ManualProtect,
    /// `KVM_CAP_DIRTY_LOG_RING` with rings of this many bytes (before any vCPU).
    Ring(u32),
}

/// Configures the kernel VM's dirty tracking (call before creating vCPUs).
/// A ring's size is recorded in the VM ([`KvmHooks::dirty_ring_bytes`](crate::KvmHooks::dirty_ring_bytes))
/// once the kernel accepted it, for [`KernelRing::map`] to check against.
pub fn enable_kernel_dirty_mode(vm: &KvmVm, mode: KernelDirtyMode) -> Result<(), Errno> {
    enable_dirty_mode_on(vm.hooks(), mode)
}

/// [`enable_kernel_dirty_mode`] on the kernel VM of any stack holding `hooks`.
pub(crate) fn enable_dirty_mode_on(hooks: &crate::KvmHooks, mode: KernelDirtyMode) -> Result<(), Errno> {
    let cap = match mode {
        KernelDirtyMode::Bitmap => return Ok(()),
        KernelDirtyMode::ManualProtect => (kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1),
        KernelDirtyMode::Ring(bytes) => (KVM_CAP_DIRTY_LOG_RING, u64::from(bytes)),
    };
    let mut c = kvm_enable_cap { cap: cap.0, ..Default::default() };
    c.args[0] = cap.1;
    hooks.kernel_fd().enable_cap(&c).map_err(|e| Errno(e.errno()))?;
    if let KernelDirtyMode::Ring(bytes) = mode {
        hooks.record_ring(bytes);
    }
    Ok(())
}

/// Merges the kernel's dirty bitmap of `slot` (`npages` pages) into the
/// library's. Returns the pages merged.
pub fn sync_dirty_log(vm: &KvmVm, slot: u32, mode: KernelDirtyMode) -> Result<u64, Errno> {
    sync_dirty_log_into(vm, vm.hooks().kernel_fd(), slot, mode)
}

/// [`sync_dirty_log`] for any library VM `vm` mirrored into the kernel VM `fd`.
pub(crate) fn sync_dirty_log_into<H: memslots::ArchHooks>(
    vm: &memslots::Vm<H>,
    fd: &VmFd,
    slot: u32,
    mode: KernelDirtyMode,
) -> Result<u64, Errno> {
    let sid = memslots::SlotId::from_raw(slot);
    let Some(npages) = vm.id_to_slot_desc(sid.as_id, sid.id).map(|d| d.npages) else {
        return Err(Errno::ENOENT);
    };
    let size = usize::try_from(npages << 12).map_err(|_| Errno::EINVAL)?;
    let bitmap = fd.get_dirty_log(slot, size).map_err(|e| Errno(e.errno()))?;
    let mut merged = 0;
    // The bits that reached the library's bitmap: the only ones CLEAR may
    // re-protect (a bit the library did not take stays in the kernel).
    let mut taken = vec![0u64; bitmap.len()];
    for (w, &bits) in bitmap.iter().enumerate() {
        let mut b = bits;
        while b != 0 {
            let bit = u64::from(b.trailing_zeros());
            b &= b - 1;
            let rel = u64::try_from(w).unwrap_or(u64::MAX) * 64 + bit;
            if vm.mark_page_dirty_in_slot(slot, rel) == DirtyMark::Marked {
                merged += 1;
                taken[w] |= 1 << bit;
            }
        }
    }
    if mode == KernelDirtyMode::ManualProtect && merged > 0 {
        // Clear exactly what was merged; a guest write since the GET stays set.
        let num = u32::try_from(npages).map_err(|_| Errno::EINVAL)?;
        sys::clear_dirty_log(fd, slot, 0, num, &taken).map_err(|e| Errno(e.errno()))?;
    }
    Ok(merged)
}

/// A vCPU's dirty ring, mmap'd from its fd (`KVM_DIRTY_LOG_PAGE_OFFSET`).
#[derive(Debug)]
pub struct KernelRing {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    bytes: usize,
    fetch: u32,
}

// SAFETY: the mapping is owned by this object; entries are accessed with
// atomic flag handshakes as the kernel's ABI prescribes.
unsafe impl Send for KernelRing {}

impl KernelRing {
    /// Maps the ring of `vcpu`, whose VM has rings of `bytes` bytes.
    ///
    /// `bytes` must be the size the VM's ring was enabled with through
    /// [`enable_kernel_dirty_mode`] before `vcpu` was created (a power of two,
    /// at least a page, a multiple of the entry size): anything else is
    /// refused with `InvalidInput`, as a mapping of another size would fault
    /// (`SIGBUS`) or hold no entry.
    pub fn map(vcpu: &KvmVcpu, bytes: u32) -> std::io::Result<Self> {
        let entry = u32::try_from(std::mem::size_of::<kvm_dirty_gfn>()).unwrap_or(u32::MAX);
        let page = 4096u32;
        let enabled = vcpu.dirty_ring_bytes();
        if enabled == 0 || bytes != enabled || !bytes.is_power_of_two() || bytes < page || !bytes.is_multiple_of(entry)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("dirty ring of {bytes} bytes: the vCPU's ring is {enabled} bytes (0: none)"),
            ));
        }
        let len = usize::try_from(bytes).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: mapping the vCPU fd at the dirty-ring offset with exactly
        // the size the VM's ring was enabled with (checked above), as the
        // KVM API documents: every page of the mapping is a ring page.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * i64::from(page),
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(KernelRing { base: p.cast(), entries: bytes / entry, bytes: len, fetch: 0 })
    }

    /// Collects dirty entries in order, marks them collected for the kernel,
    /// and merges them into `vm`'s bitmaps. Returns the entries collected.
    pub fn harvest(&mut self, vm: &KvmVm) -> u64 {
        self.harvest_with(|slot, offset| {
            let _ = vm.mark_page_dirty_in_slot(slot, offset);
        })
    }

    /// Collects dirty entries in order, marks them collected for the kernel,
    /// and hands each `(slot, page offset in the slot)` to `mark`. Returns
    /// the entries collected.
    pub fn harvest_with(&mut self, mut mark: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        loop {
            // `entries` >= 256: `map` checked the size.
            let i = usize::try_from(self.fetch % self.entries).unwrap_or(0);
            // SAFETY: i < entries; the mapping holds `entries` entries.
            let e = unsafe { self.base.add(i) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory the
            // kernel writes; read it atomically with acquire (the kernel
            // publishes slot/offset before setting DIRTY).
            let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags).cast::<AtomicU32>()) };
            if flags.load(Ordering::Acquire) & 1 == 0 {
                break;
            }
            // SAFETY: the entry is dirty, so the kernel wrote these fields
            // before its release of the flag.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            mark(slot, offset);
            // Collected: the kernel may reset it (KVM_DIRTY_GFN_F_RESET).
            flags.store(2, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for KernelRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`.
        unsafe {
            libc::munmap(self.base.cast(), self.bytes);
        }
    }
}

/// `KVM_RESET_DIRTY_RINGS` on the backend's kernel VM.
pub fn reset_kernel_rings(vm: &KvmVm) -> Result<u64, Errno> {
    sys::reset_dirty_rings(vm.hooks().kernel_fd()).map_err(|e| Errno(e.errno()))
}
