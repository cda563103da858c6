//! KVM backend for memslots: host configuration from /dev/kvm and CPUID, the
//! raw ioctls kvm-ioctls lacks, and a kernel VM that replays trace operations
//! for differential testing.

pub mod backend;
pub mod guest;
pub mod guest_vm;
pub mod host;
pub mod kdirty;
pub mod kernel;
pub mod longmode;
pub mod sys;

pub use backend::{new_kvm_guest_vm, new_kvm_vm, KvmHooks, KvmVcpu, KvmVm};
pub use guest_vm::{KvmGuestMemory, KvmGuestVm, KvmLayers};
pub use host::{
    host_caps, host_config, host_phys_bits, kvm_available, probe_dirty_ring_rsvd_entries, probe_max_gfn,
    probe_user_addr_limit, slot_metadata_bytes_per_page, HostCaps,
};
pub use kdirty::KernelDirtyMode;
pub use kernel::KernelVm;
