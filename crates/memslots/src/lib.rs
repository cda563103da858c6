//! # memslots
//!
//! Linux KVM's scalable memslot subsystem as a Rust library: the
//! guest-physical memory map of a VM.
//!
//! A VM's memory is a set of *slots*, each mapping a range of guest frame
//! numbers (gfn = guest physical address >> 12) to host virtual addresses, in
//! one or more *address spaces* (x86: 0 normal, 1 SMM). A VMM changes slots
//! with [`Vm::set_user_memory_region`] (KVM's names, checks, order of checks
//! and errno); vCPU threads translate guest addresses concurrently and never
//! block.
//!
//! ## The model
//!
//! - Each address space has **two memslot sets**, active and inactive, sharing
//!   **one copy of each slot** ([`MemorySlot`]). Per set: a gfn-ordered index,
//!   an hva interval tree, an id map, a last-used-slot cache; per address
//!   space a generation.
//! - A change is made on the **inactive set**, which is then **published**;
//!   the writer **waits** until no reader still uses the old set (a grace
//!   period), then **replays** the change on it. Readers see the state before
//!   or after, never in between, and nothing they can reach is freed under them.
//! - DELETE and MOVE first publish an **INVALID** copy of the slot (lookups
//!   fail: a vCPU sees MMIO) and call [`ArchHooks::flush_shadow_memslot`].
//! - **Generations** advance by the number of address spaces per publish and
//!   carry bit 63 while an update is in progress; per-vCPU caches are tagged
//!   with them ([`Vcpu`]).
//!
//! ## Example
//!
//! ```
//! use memslots::{Config, Vm, UserMemoryRegion, HvaError, KVM_MEM_READONLY};
//!
//! let vm = Vm::new(Config::default())?;
//! // Slot 0: 1 MiB of guest memory at gpa 0, backed by host memory at 0x7f00_0000_0000.
//! vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10_0000, 0x7f00_0000_0000))?;
//! // Slot 1: a read-only ROM at 4 GiB - 64 KiB.
//! vm.set_user_memory_region(&UserMemoryRegion::new(1, KVM_MEM_READONLY, 0xffff_0000, 0x1_0000, 0x7f10_0000_0000))?;
//!
//! // A vCPU thread translates through its own handle (cached, lock-free).
//! let vcpu = vm.vcpu();
//! assert_eq!(vcpu.gfn_to_hva(0x12), Ok(0x7f00_0001_2000));
//! assert_eq!(vcpu.gfn_to_hva(0xffff0), Err(HvaError::ReadOnly)); // a write would exit to MMIO
//! assert_eq!(vcpu.gfn_to_hva_prot(0xffff0), Ok((0x7f10_0000_0000, false)));
//! assert_eq!(vcpu.gfn_to_hva(0x200), Err(HvaError::NoSlot));
//!
//! // Move slot 0 to 1 MiB; the vCPU sees the new mapping.
//! vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x10_0000, 0x10_0000, 0x7f00_0000_0000))?;
//! assert_eq!(vcpu.gfn_to_hva(0x100), Ok(0x7f00_0000_0000));
//! assert_eq!(vcpu.gfn_to_hva(0x12), Err(HvaError::NoSlot));
//!
//! // Iterate the slots intersecting a gfn range, in gfn order.
//! let guard = vm.read();
//! let ids: Vec<u16> = guard.slots_in_gfn_range(0, 0, 1 << 40).map(|s| s.id).collect();
//! assert_eq!(ids, [0, 1]);
//! # Ok::<(), memslots::Error>(())
//! ```
//!
//! ## Rules
//!
//! - Read sections ([`Vm::read`], [`Reader::read`], [`Vcpu::read`]) never
//!   block, but writers wait for them: keep them short, and never change slots
//!   ([`Vm::set_user_memory_region`]), harvest dirty logs
//!   ([`Vm::get_dirty_log`]) or call [`Vm::memory_usage`] on a thread that holds
//!   one (it would wait for itself, as `synchronize_srcu` inside
//!   `srcu_read_lock` does in the kernel).
//! - Two lookups in one section may see two different published states (each
//!   re-reads the active set, like KVM's `srcu_dereference` per call). Use the
//!   slot a lookup returned for follow-up work, e.g.
//!   [`ReadGuard::mark_slot_page_dirty`].
//!
//! ## Features
//!
//! - `std` (default): std's mutex for the writer lock, `thread::yield_now`
//!   while a writer waits for readers. Without it the crate is `no_std` +
//!   `alloc` (a spin lock serialises writers).
//! - `membarrier` (off; implies `std`): read sections that may use an
//!   asymmetric fence, `membarrier(2)` on Linux, for VMs configured with
//!   [`Config::asymmetric_readers`] (lookups ~5 ns cheaper at 1-16 slots,
//!   each grace period 0.3-10 µs dearer; DESIGN.md).
//!
//! See `DESIGN.md` for the invariants and the memory-ordering argument.

#![cfg_attr(not(feature = "std"), no_std)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod sync;

pub mod arch;
pub mod attributes;
pub mod config;
#[cfg_attr(loom, allow(dead_code))]
pub mod dirty;
pub mod dirty_log;
pub mod errno;
pub mod error;
mod flat;
mod gfn_index;
#[allow(dead_code)]
mod hva_tree;
mod id_map;
pub mod lookup;
mod membarrier;
pub mod metadata;
mod prefetch;
pub mod region;
#[cfg_attr(loom, allow(dead_code))]
pub mod ring;
#[cfg_attr(loom, allow(dead_code))]
pub mod rmap;
mod set;
pub mod slot;
#[cfg_attr(loom, allow(dead_code))]
mod srcu;
pub mod trace;
mod update;
pub mod vcpu;
pub mod vm;

pub use arch::{ArchHooks, Layered, NoArch, SlotDraft};
pub use attributes::{MemoryAttributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};
pub use config::{Config, KVM_MEM_MAX_NR_PAGES, KVM_MEM_SLOTS_NUM, KVM_USER_MEM_SLOTS, PAGE_SHIFT, PAGE_SIZE};
pub use dirty::DirtyBitmap;
pub use dirty_log::{KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
pub use errno::Errno;
pub use error::{Error, HvaError, IllegalChange};
pub use lookup::{GfnRange, ReadGuard, Reader};
pub use region::{
    MemoryChange, Outcome, SlotId, UserMemoryRegion, UserMemoryRegion2, KVM_MEMSLOT_INVALID, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
pub use ring::{DirtyMark, DirtyRing, RingEntry};
pub use slot::{GuestMemfd, MemorySlot, SlotDesc};
pub use srcu::GEN_UPDATE_IN_PROGRESS;
pub use vcpu::{Vcpu, VcpuGuard};
pub use vm::{MemoryUsage, Vm};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
