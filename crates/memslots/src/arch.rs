//! Architecture hooks: where a KVM backend, an MMU, or lazily allocated
//! per-slot metadata (x86 rmaps, seed 003) plug into the update protocol.
//!
//! The library calls them at the points KVM calls `kvm_arch_*`:
//!
//! | hook | when | KVM |
//! |---|---|---|
//! | [`prepare_memory_region`](ArchHooks::prepare_memory_region) | after validation (and, for DELETE/MOVE, after the INVALID copy is live), before the change is visible; an error undoes everything | `kvm_arch_prepare_memory_region` |
//! | [`commit_memory_region`](ArchHooks::commit_memory_region) | after both sets hold the change | `kvm_arch_commit_memory_region` |
//! | [`flush_shadow_memslot`](ArchHooks::flush_shadow_memslot) | DELETE/MOVE, once no vCPU can look the old slot up | `kvm_arch_flush_shadow_memslot` |
//! | [`memslots_updated`](ArchHooks::memslots_updated) | each publish, with the new generation | `kvm_arch_memslots_updated` |
//! | [`unmap_gfn_range`](ArchHooks::unmap_gfn_range) | host memory behind a slot was invalidated ([`Vm::invalidate_hva_range`](crate::Vm::invalidate_hva_range)) | `kvm_unmap_gfn_range` |

use crate::errno::Errno;
use crate::region::MemoryChange;
use crate::slot::{MemorySlot, SlotDesc};

/// The slot being created or changed, before it is published.
#[derive(Debug)]
pub struct SlotDraft<D> {
    /// What the slot will be.
    pub desc: SlotDesc,
    /// Its arch data: `D::default()` for CREATE and MOVE, a clone of the old
    /// slot's for FLAGS_ONLY. The hook may replace it.
    pub arch: D,
}

/// Architecture-specific behaviour of a VM's memslots. All methods have
/// no-op defaults; [`NoArch`] uses them all.
///
/// Ordering guarantees (relied on by `memslots-mem` and the KVM backend):
/// - `prepare_memory_region` is the last step of a change that can fail, and
///   runs before the new slot is visible to any reader (for DELETE and MOVE,
///   after the INVALID copy is visible).
/// - `commit_memory_region` runs after both sets hold the change, i.e. after
///   the last grace period of the change: for DELETE no reader can still see
///   the old slot or its INVALID copy.
/// - All hooks run under the VM's writer lock, one change at a time, in
///   commit order.
pub trait ArchHooks: Send + Sync + 'static {
    /// Per-slot arch metadata (x86: rmaps, large-page info). Shared by a
    /// slot and its INVALID copy, so make it cheap to clone (an `Arc`).
    type SlotData: Clone + Default + Send + Sync + 'static;

    /// Prepares a change; `new` is `None` for DELETE. An error aborts the
    /// change and restores the previous state exactly (seed 002).
    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&mut SlotDraft<Self::SlotData>>,
    ) -> Result<(), Errno> {
        let _ = (change, old, new);
        Ok(())
    }

    /// The change is visible in both sets. `old` is still alive here.
    fn commit_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&MemorySlot<Self::SlotData>>,
    ) {
        let _ = (change, old, new);
    }

    /// Drop every mapping derived from `slot` (the INVALID copy now
    /// published in place of the slot being deleted or moved).
    fn flush_shadow_memslot(&self, slot: &MemorySlot<Self::SlotData>) {
        let _ = slot;
    }

    /// Address space `as_id` now has generation `generation`.
    fn memslots_updated(&self, as_id: u16, generation: u64) {
        let _ = (as_id, generation);
    }

    /// Host memory behind gfns `[start, end)` of `slot` changed or went away:
    /// drop mappings of that range. Returns whether a TLB flush is needed.
    fn unmap_gfn_range(&self, slot: &MemorySlot<Self::SlotData>, start: u64, end: u64) -> bool {
        let _ = (slot, start, end);
        false
    }
}

/// No arch behaviour: slots carry no metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoArch;

impl ArchHooks for NoArch {
    type SlotData = ();
}
