//! # memslots-mem
//!
//! Guest memory over [`memslots`]: the host mappings slots point into, and
//! safe, bounds-checked access to guest memory by guest physical address.
//!
//! - [`host`]: [`HostMemory`], an owned `mmap` (anonymous, memfd, file;
//!   hugetlbfs, THP, populate), unmapped on drop, always shared as
//!   `Arc<HostMemory>`.
//! - [`guest`]: [`GuestMemory`], a `memslots::Vm<MemHooks>`. Its hooks keep a
//!   registry of host mappings and attach the mapping behind each new slot
//!   to the slot itself, so a mapping stays mapped while any slot (even a
//!   deleted one a reader still sees) points into it.
//! - [`access`]: reads, writes, plain-data objects, aligned atomics and
//!   volatile slices by guest address, through the VM (any address space)
//!   or a vCPU (its current address space), each inside one read section,
//!   with exact partial-progress errors and dirty marking.
//! - [`vmm`]: the rust-vmm `vm-memory` 0.18 traits over snapshots of an
//!   address space, so rust-vmm crates (virtio-queue, ...) run on memslots.
//!
//! ```
//! use memslots_mem::{GuestMemory, MapOptions, AccessErrorKind};
//! use memslots::{Config, KVM_MEM_READONLY};
//!
//! let mem = GuestMemory::new(Config::default())?;
//! let ram = mem.map_anonymous(0x20_0000, &MapOptions::new())?;
//! // Slot 0: 1 MiB of RAM at gpa 0; slot 1: the next 1 MiB of the mapping, read-only, at 1 MiB.
//! mem.set_region(0, 0, 0, &ram, 0, 0x10_0000)?;
//! mem.set_region(1, KVM_MEM_READONLY, 0x10_0000, &ram, 0x10_0000, 0x10_0000)?;
//!
//! // A write spanning both slots stops at the read-only one, and says where.
//! let err = mem.write(0, 0xf_fffe, &[1, 2, 3, 4]).unwrap_err();
//! assert_eq!((err.done, err.gpa, err.kind), (2, 0x10_0000, AccessErrorKind::ReadOnly));
//!
//! // Reads cross slots; holes are reported exactly.
//! mem.write_obj(0, 0x1000, 0xdead_beef_u32)?;
//! assert_eq!(mem.read_obj::<u32>(0, 0x1000)?, 0xdead_beef);
//! let mut buf = [0u8; 16];
//! let err = mem.read(0, 0x1f_fff8, &mut buf).unwrap_err();
//! assert_eq!((err.done, err.gpa, err.kind), (8, 0x20_0000, AccessErrorKind::NoSlot));
//!
//! // A vCPU accesses its current address space.
//! let vcpu = mem.vcpu();
//! assert_eq!(vcpu.read_obj::<u32>(0x1000)?, 0xdead_beef);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod access;
pub mod guest;
pub mod host;
pub mod vmm;

pub use access::{Access, AccessError, AccessErrorKind, DirtyTracker, GuestAtomic, MemGuard, VcpuMemGuard};
pub use guest::{Error, GuestMemory, GuestVcpu, MemHooks, Slot, SlotBacking, SlotData};
pub use host::{Backing, HostMemory, HugePages, MapError, MapOptions, Sharing, HUGE_PAGE_1G, HUGE_PAGE_2M};
pub use vm_memory;
pub use vmm::{MemslotsAddressSpace, MemslotsRegion, MemslotsSnapshot, SlotDirtyLog, SlotDirtySlice, SnapshotGuard};
