//! The host's KVM: is it there, and what configuration does it give a VM.

use kvm_ioctls::{Cap, Kvm};
use memslots::Config;

/// Whether /dev/kvm can be opened.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// The host's physical address bits (CPUID 0x8000_0008, bits 7:0 of EAX), which bound
/// x86 KVM's highest mappable gfn. `None` off x86-64.
pub fn host_phys_bits() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID is available on every x86-64 CPU; leaf 0x8000_0008 on every
        // one KVM supports. Check the max extended leaf first anyway.
        let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        if max_ext < 0x8000_0008 {
            return None;
        }
        Some(std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The highest gfn the host's KVM lets a slot reach (x86 `kvm_mmu_max_gfn()`:
/// the host's MAXPHYADDR with TDP (EPT/NPT), 52 bits with shadow paging).
/// Found by asking the kernel: a one-page slot just below `2^bits` is accepted
/// for `bits` up to the limit. `None` if /dev/kvm is absent.
pub fn probe_max_gfn() -> Option<u64> {
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    for bits in (32u32..=52).rev() {
        let gpa = (1u64 << bits) - 0x1000;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0x1000,
            userspace_addr: 0x1000_0000,
        };
        // SAFETY: a throwaway VM with no vCPU: the kernel records the host
        // range and never accesses it.
        if unsafe { vm.set_user_memory_region(region) }.is_ok() {
            return Some((1u64 << (bits - 12)) - 1);
        }
    }
    None
}

/// The host's user address limit as KVM's `access_ok` applies it to
/// `userspace_addr`: `0x7ffffffff000` with 4-level paging, `(1 << 56) -
/// 0x1000` with 5-level paging. Probed by asking a throwaway VM to record a
/// one-page slot right at the 4-level limit; `None` without /dev/kvm.
pub fn probe_user_addr_limit() -> Option<u64> {
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let four_level = memslots::config::X86_64_USER_ADDR_LIMIT;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: four_level,
    };
    // SAFETY: a throwaway VM with no vCPU: the kernel records the host
    // range and never accesses it.
    let five_level = unsafe { vm.set_user_memory_region(region) }.is_ok();
    Some(if five_level { (1u64 << 56) - 0x1000 } else { four_level })
}

/// The dirty ring entries this host's KVM reserves (`kvm_dirty_ring_get_rsvd_entries`:
/// 64, plus the CPU's dirty-log buffer, 512 with PML on VMX). Probed on a
/// throwaway VM: a ring of 512 entries is accepted only if at most 512 are
/// reserved. `None` without rings.
pub fn probe_dirty_ring_rsvd_entries() -> Option<u32> {
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    if vm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING)) <= 0 {
        return None;
    }
    let mut c = kvm_bindings::kvm_enable_cap { cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING, ..Default::default() };
    c.args[0] = 512 * 16;
    Some(if vm.enable_cap(&c).is_ok() { 64 } else { 64 + 512 })
}

/// Bytes of metadata per 4 KiB guest page that this host's x86 KVM allocates
/// when a slot is created (`kvm_arch_prepare_memory_region`): 8 for the
/// rmap (`memslot_rmap_alloc`) unless the TDP MMU is in use (it allocates rmaps
/// only once a shadow page exists), and 2 more for the write-tracking array
/// (`kvm_page_track_create_memslot`) under shadow paging. Shadow paging shows
/// as a highest gfn of 52 bits ([`probe_max_gfn`]) on a CPU with fewer
/// physical address bits. The large-page arrays (a few bytes per 2 MiB) are
/// left out. Where unsure, the upper bound (10).
pub fn slot_metadata_bytes_per_page() -> u64 {
    let tdp_mmu = std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu").is_ok_and(|s| s.trim() == "Y");
    let shadow_paging = match (probe_max_gfn(), host_phys_bits()) {
        (Some(max_gfn), Some(bits)) => bits < 52 && max_gfn == Config::max_gfn_for_phys_bits(52),
        _ => true,
    };
    match (tdp_mmu && !shadow_paging, shadow_paging) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 10,
    }
}

/// The memslot configuration a default VM on this host has: address spaces
/// (KVM_CAP_MULTI_ADDRESS_SPACE), user slots (KVM_CAP_NR_MEMSLOTS), READONLY
/// (KVM_CAP_READONLY_MEM), the user address limit ([`probe_user_addr_limit`]),
/// the dirty ring's reserved entries ([`probe_dirty_ring_rsvd_entries`]),
/// guest_memfd slots (KVM_CAP_GUEST_MEMFD on a
/// default VM), dirty rings with bitmaps (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP),
/// and the highest gfn ([`probe_max_gfn`]). `None` if /dev/kvm is absent.
pub fn host_config() -> Option<Config> {
    let kvm = Kvm::new().ok()?;
    let mut c = Config::x86_64();
    let nr_as = kvm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE));
    c.nr_address_spaces = u16::try_from(nr_as.max(1)).unwrap_or(1);
    let slots = kvm.check_extension_int(Cap::NrMemslots);
    if let Ok(s) = u16::try_from(slots) {
        if s > 0 {
            c = c.with_user_slots(s);
        }
    }
    c.readonly_mem = kvm.check_extension(Cap::ReadonlyMem);
    // A default VM takes guest_memfd slots where the kernel offers guest_memfd;
    // dirty rings with bitmaps exist only where the kernel offers them (arm64).
    if let Ok(vm) = kvm.create_vm() {
        let cap = |c: u32| vm.check_extension_raw(libc::c_ulong::from(c)) > 0;
        c.guest_memfd = cap(kvm_bindings::KVM_CAP_GUEST_MEMFD);
        c.ring_with_bitmap = cap(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
    }
    if let Some(limit) = probe_user_addr_limit() {
        c.user_addr_limit = limit;
    }
    if let Some(rsvd) = probe_dirty_ring_rsvd_entries() {
        c.dirty_ring_rsvd_entries = rsvd;
    }
    if let Some(max_gfn) = probe_max_gfn() {
        c.max_gfn = max_gfn;
    } else if let Some(bits) = host_phys_bits() {
        c.max_gfn = Config::max_gfn_for_phys_bits(bits);
    }
    Some(c)
}

/// The host KVM's memslot-related capabilities (`KVM_CHECK_EXTENSION` on a VM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCaps {
    /// `KVM_CAP_NR_MEMSLOTS`: user slots per address space.
    pub nr_memslots: u32,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: address spaces (0 reported as 1).
    pub address_spaces: u32,
    /// `KVM_CAP_READONLY_MEM`.
    pub readonly_mem: bool,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: supported option bits.
    pub manual_dirty_log_protect: u64,
    /// `KVM_CAP_DIRTY_LOG_RING`: largest ring in bytes (0: unsupported).
    pub dirty_log_ring_bytes: u32,
}

/// Reads [`HostCaps`] from a fresh VM; `None` without /dev/kvm.
pub fn host_caps() -> Option<HostCaps> {
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let cap = |c: u32| vm.check_extension_raw(libc::c_ulong::from(c));
    let nonneg = |v: i32| u32::try_from(v).unwrap_or(0);
    Some(HostCaps {
        nr_memslots: nonneg(cap(kvm_bindings::KVM_CAP_NR_MEMSLOTS)),
        address_spaces: nonneg(cap(kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE)).max(1),
        readonly_mem: cap(kvm_bindings::KVM_CAP_READONLY_MEM) > 0,
        user_memory2: cap(kvm_bindings::KVM_CAP_USER_MEMORY2) > 0,
        guest_memfd: cap(kvm_bindings::KVM_CAP_GUEST_MEMFD) > 0,
        manual_dirty_log_protect: u64::from(nonneg(cap(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))),
        dirty_log_ring_bytes: nonneg(cap(kvm_bindings::KVM_CAP_DIRTY_LOG_RING)),
    })
}
