//! A VM's memslot configuration: KVM's per-arch constants and capabilities.

use crate::error::Error;

/// log2 of the page size (4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;
/// The page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// `KVM_MEM_MAX_NR_PAGES`: pages in one user slot at most.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// x86 `KVM_USER_MEM_SLOTS` (also the value of `KVM_CAP_NR_MEMSLOTS`).
pub const KVM_USER_MEM_SLOTS: u16 = 32764;
/// x86 `KVM_MEM_SLOTS_NUM` (`SHRT_MAX`): user slots plus 3 internal ones.
pub const KVM_MEM_SLOTS_NUM: u16 = 32767;
/// x86-64 `TASK_SIZE_MAX` with 4-level paging: the highest user address + 1 page.
pub const X86_64_USER_ADDR_LIMIT: u64 = 0x7fff_ffff_f000;

/// How a VM's memslots behave. [`Config::default`] is x86-64 with SMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address spaces (x86: 2 with SMM, 1 for VMs with private memory or without SMM).
    pub nr_address_spaces: u16,
    /// Slot ids userspace may use per address space (`KVM_USER_MEM_SLOTS`).
    pub user_slots: u16,
    /// Total slot ids per address space, internal ones included (`KVM_MEM_SLOTS_NUM`).
    pub mem_slots_num: u16,
    /// Pages per user slot at most (`KVM_MEM_MAX_NR_PAGES`).
    pub max_pages_per_slot: u64,
    /// Userspace addresses must satisfy `addr + size <= user_addr_limit`.
    pub user_addr_limit: u64,
    /// `KVM_MEM_READONLY` is supported (`KVM_CAP_READONLY_MEM`).
    pub readonly_mem: bool,
    /// The VM has private memory: `KVM_MEM_GUEST_MEMFD` is accepted (v2 only).
    pub private_mem: bool,
    /// `KVM_MEM_GUEST_MEMFD` is accepted on this VM even without private
    /// memory: a kernel built with `CONFIG_KVM_GUEST_MEMFD` (it reports
    /// `KVM_CAP_GUEST_MEMFD` on a default VM) takes guest_memfd slots on
    /// default VMs too. Off by default; `memslots_kvm::host_config` probes it.
    pub guest_memfd: bool,
    /// Highest guest frame a slot may reach (x86: `kvm_mmu_max_gfn()`, from
    /// the host's physical address width). Checked by the x86 arch prepare
    /// step, after the overlap check.
    pub max_gfn: u64,
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` is offered (arm64 only: x86 does
    /// not select `HAVE_KVM_DIRTY_RING_WITH_BITMAP`). Off in [`Config::x86_64`].
    pub ring_with_bitmap: bool,
    /// Dirty ring entries kept back for the soft limit (KVM_DIRTY_RING_RSVD_ENTRIES
    /// plus the arch's dirty log size: x86 with PML adds 512).
    pub dirty_ring_rsvd_entries: u32,
    /// Not KVM's: how read sections synchronise with grace periods; needs
    /// the crate's `membarrier` feature (without it a VM asking for it is
    /// refused with [`Error::BadConfig`]). Off by default: every section is
    /// entered with a locked instruction (about 10 ns here) and an update
    /// pays nothing extra. With `true`, on Linux, a thread that keeps making
    /// lookups on its own record (a vCPU handle, a thread's anonymous
    /// `vm.gfn_to_hva` calls) switches, after 64 sections, to sections
    /// entered with a plain store, and every grace period of the VM from then
    /// on calls `membarrier(2)` (`MEMBARRIER_CMD_PRIVATE_EXPEDITED`, as
    /// liburcu's urcu-memb does).
    ///
    /// Measured on the project's host with the `bench/` harness (`--quick`,
    /// 2026-12-03; not in BENCHMARKS.md's table): anonymous lookups
    /// 11.5 -> 6.3 ns at 1 slot and 12.7 -> 7.8 ns at 16, no gain from 256
    /// slots (the out-of-order core hid the locked instruction there), and
    /// each grace period (one per CREATE or flags change, two per DELETE or
    /// MOVE, one per dirty-log harvest of a slot) pays the system call: 0.27
    /// µs with no other thread of the process running, 10 µs while one runs
    /// (an inter-processor interrupt to every CPU running one, a vCPU thread
    /// in the guest included). Worth it for a small VM with lookups on hot
    /// paths and rare updates. The VM registers the call when created; if the
    /// kernel lacks it or a seccomp filter refuses it, sections stay
    /// symmetric. A filter installed after that which refuses the call aborts
    /// the process at the next update.
    pub asymmetric_readers: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config::x86_64()
    }
}

impl Config {
    /// x86-64 defaults: 2 address spaces, 32764 user slots, READONLY, no
    /// private memory, 48-bit user addresses, 48-bit guest physical addresses.
    pub const fn x86_64() -> Self {
        Config {
            nr_address_spaces: 2,
            user_slots: KVM_USER_MEM_SLOTS,
            mem_slots_num: KVM_MEM_SLOTS_NUM,
            max_pages_per_slot: KVM_MEM_MAX_NR_PAGES,
            user_addr_limit: X86_64_USER_ADDR_LIMIT,
            readonly_mem: true,
            private_mem: false,
            guest_memfd: false,
            ring_with_bitmap: false,
            max_gfn: Self::max_gfn_for_phys_bits(48),
            dirty_ring_rsvd_entries: 64,
            asymmetric_readers: false,
        }
    }

    /// `kvm_mmu_max_gfn()` for a host with `bits` physical address bits.
    pub const fn max_gfn_for_phys_bits(bits: u32) -> u64 {
        if bits <= PAGE_SHIFT {
            0
        } else if bits >= 64 {
            u64::MAX >> PAGE_SHIFT
        } else {
            (1u64 << (bits - PAGE_SHIFT)) - 1
        }
    }

    /// Sets the number of address spaces.
    #[must_use]
    pub const fn with_address_spaces(mut self, n: u16) -> Self {
        self.nr_address_spaces = n;
        self
    }

    /// Sets the number of user slots; total ids become `n + 3` (x86's 3 internal slots).
    #[must_use]
    pub const fn with_user_slots(mut self, n: u16) -> Self {
        self.user_slots = n;
        self.mem_slots_num = n.saturating_add(3);
        self
    }

    /// Marks the VM as having private memory: GUEST_MEMFD accepted, and
    /// one address space (x86's `kvm_arch_nr_memslot_as_ids` has no SMM
    /// address space for private-memory VMs).
    #[must_use]
    pub const fn with_private_mem(mut self, private: bool) -> Self {
        self.private_mem = private;
        if private {
            self.nr_address_spaces = 1;
        }
        self
    }

    /// Offers `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (an arm64-like host; see [`Config::ring_with_bitmap`]).
    #[must_use]
    pub const fn with_ring_with_bitmap(mut self, yes: bool) -> Self {
        self.ring_with_bitmap = yes;
        self
    }

    /// Chooses the read-section protocol (see [`Config::asymmetric_readers`]).
    #[must_use]
    pub const fn with_asymmetric_readers(mut self, yes: bool) -> Self {
        self.asymmetric_readers = yes;
        self
    }

    /// Accepts `KVM_MEM_GUEST_MEMFD` on a VM without private memory (see [`Config::guest_memfd`]).
    #[must_use]
    pub const fn with_guest_memfd(mut self, yes: bool) -> Self {
        self.guest_memfd = yes;
        self
    }

    /// Checks the configuration is one KVM could have.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &'static str| Err(Error::BadConfig { what });
        if self.asymmetric_readers && !cfg!(feature = "membarrier") {
            return bad("asymmetric_readers needs memslots' `membarrier` cargo feature");
        }
        if self.nr_address_spaces == 0 || self.nr_address_spaces > 64 {
            return bad("nr_address_spaces must be 1..=64");
        }
        if self.private_mem && self.nr_address_spaces != 1 {
            return bad("a VM with private memory has one address space (x86)");
        }
        if self.user_slots == 0 || self.user_slots > self.mem_slots_num {
            return bad("user_slots must be 1..=mem_slots_num");
        }
        if self.mem_slots_num > KVM_MEM_SLOTS_NUM {
            return bad("mem_slots_num must be <= 32767");
        }
        if self.max_pages_per_slot == 0 {
            return bad("max_pages_per_slot must be > 0");
        }
        if self.user_addr_limit & (PAGE_SIZE - 1) != 0 {
            return bad("user_addr_limit must be page aligned");
        }
        Ok(())
    }
}
