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
//! | [`memslots_updated`](ArchHooks::memslots_updated) | each publish, after its grace period, with the new generation *before* it is stored (readers still see the update in progress) | `kvm_arch_memslots_updated` |
//! | [`unmap_gfn_range`](ArchHooks::unmap_gfn_range) | host memory behind a slot was invalidated ([`Vm::invalidate_hva_range`](crate::Vm::invalidate_hva_range)) | `kvm_unmap_gfn_range` |
//! | [`abort_memory_region`](ArchHooks::abort_memory_region) | a later layer's prepare failed after this one's succeeded ([`Layered`]) | (none: KVM has one arch layer) |
//! | [`destroy_vm`](ArchHooks::destroy_vm) | the `Vm` is dropped, before its slots are freed | `kvm_arch_destroy_vm` |
//! | [`alloc_lazy_metadata`](ArchHooks::alloc_lazy_metadata) | [`Vm::enable_lazy_metadata`](crate::Vm::enable_lazy_metadata) for every slot; then each CREATE, MOVE and FLAGS_ONLY after prepare, under the arch lock | `memslot_rmap_alloc` (seed 003) |
//! | [`arch_data_bytes`](ArchHooks::arch_data_bytes), [`lazy_metadata_bytes`](ArchHooks::lazy_metadata_bytes) | [`Vm::memory_usage`](crate::Vm::memory_usage) | (none) |
//!
//! ## Layers
//!
//! A VMM stacks several hook layers on one VM: guest memory (`memslots-mem`),
//! a user's own (an emulator's MMU, a fuzzer's tracker), the KVM backend
//! (`memslots-kvm`). [`Layered<Outer, Inner>`](Layered) is one `ArchHooks`
//! made of two: each slot carries both layers' data as a pair, every hook
//! reaches the outer layer first and then the inner one, and if the inner
//! layer's prepare fails the outer layer's prepare is undone
//! ([`abort_memory_region`](ArchHooks::abort_memory_region)) before the
//! error reaches the update protocol, which then restores the previous state
//! exactly. Nest it for more layers: `Layered<A, Layered<B, C>>` runs A, B,
//! C in that order. Put the layer whose effect cannot be undone exactly (the
//! kernel VM: re-enabling dirty logging would lose the kernel's bitmap) last:
//! it then never has to be aborted.

use crate::errno::Errno;
use crate::region::MemoryChange;
use crate::slot::{MemorySlot, SlotDesc};
use core::mem;

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

    /// Undoes a successful [`prepare_memory_region`](Self::prepare_memory_region)
    /// with the same arguments: a layer after this one refused the change
    /// (see [`Layered`]). `new` holds what this layer's prepare left in it.
    /// After it returns this layer must be exactly as before that prepare.
    /// The update protocol calls it when allocating the new slot's lazily
    /// allocated metadata fails after prepare succeeded
    /// ([`alloc_lazy_metadata`](Self::alloc_lazy_metadata)).
    fn abort_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&SlotDraft<Self::SlotData>>,
    ) {
        let _ = (change, old, new);
    }

    /// The VM is being dropped: called once, before its slots (and whatever
    /// their arch data keeps alive) are freed, with no reader or writer
    /// left. A backend whose kernel VM may outlive the `Vm` (a vCPU fd keeps
    /// it open) drops the kernel's slots here, so the kernel can no longer
    /// reach host memory the slots kept mapped.
    fn destroy_vm(&self) {}

    /// Seed 003: allocates the lazily allocated part of slot `desc`'s data
    /// `data` (typically a [`LazyCell`](crate::metadata::LazyCell) inside
    /// it), if this layer keeps one and it is not there yet. Called under
    /// the VM's arch lock (never concurrently with itself), possibly from
    /// inside a read section: it must not make slot changes or wait for
    /// readers. See the [`metadata`](crate::metadata) module.
    ///
    /// - by [`Vm::enable_lazy_metadata`](crate::Vm::enable_lazy_metadata),
    ///   for every slot of every address space (an already allocated slot is
    ///   skipped by the hook);
    /// - once enabled, by each CREATE, MOVE and FLAGS_ONLY after
    ///   [`prepare_memory_region`](Self::prepare_memory_region) succeeded, for
    ///   the new slot before it is published. An error here aborts the change
    ///   ([`abort_memory_region`](Self::abort_memory_region) is called).
    fn alloc_lazy_metadata(&self, desc: &SlotDesc, data: &Self::SlotData) -> Result<(), Errno> {
        let _ = (desc, data);
        Ok(())
    }

    /// Heap bytes of `data` allocated with the slot (footprint report).
    fn arch_data_bytes(&self, data: &Self::SlotData) -> usize {
        let _ = data;
        0
    }

    /// Heap bytes of `data`'s lazily allocated metadata, 0 while there is
    /// none (footprint report).
    fn lazy_metadata_bytes(&self, data: &Self::SlotData) -> usize {
        let _ = data;
        0
    }
}

/// No arch behaviour: slots carry no metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoArch;

impl ArchHooks for NoArch {
    type SlotData = ();
}

/// Two hook layers as one: `Outer` first, then `Inner` (see the [module
/// docs](self#layers)). Each slot carries `(Outer::SlotData, Inner::SlotData)`.
///
/// Each layer's hooks see the slot with only their own data: a copy of the
/// slot's description and dirty bitmap with a clone of their half of the
/// pair (an `Arc` clone for data that follows [`ArchHooks::SlotData`]'s
/// advice), so existing `ArchHooks` implementations stack unchanged.
#[derive(Debug, Default)]
pub struct Layered<Outer, Inner> {
    /// Runs first.
    pub outer: Outer,
    /// Runs second.
    pub inner: Inner,
}

impl<Outer, Inner> Layered<Outer, Inner> {
    /// `outer`, then `inner`.
    pub const fn new(outer: Outer, inner: Inner) -> Self {
        Layered { outer, inner }
    }
}

/// `slot` with arch data `arch` (a layer's view of a layered slot).
fn view<D, E>(slot: &MemorySlot<D>, arch: E) -> MemorySlot<E> {
    MemorySlot { desc: slot.desc, dirty_bitmap: slot.dirty_bitmap.clone(), arch }
}

fn views<A: Clone, B: Clone>(slot: Option<&MemorySlot<(A, B)>>) -> (Option<MemorySlot<A>>, Option<MemorySlot<B>>) {
    match slot {
        None => (None, None),
        Some(s) => (Some(view(s, s.arch.0.clone())), Some(view(s, s.arch.1.clone()))),
    }
}

impl<A: ArchHooks, B: ArchHooks> ArchHooks for Layered<A, B> {
    type SlotData = (A::SlotData, B::SlotData);

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&mut SlotDraft<Self::SlotData>>,
    ) -> Result<(), Errno> {
        let (old_a, old_b) = views(old);
        let Some(new) = new else {
            self.outer.prepare_memory_region(change, old_a.as_ref(), None)?;
            if let Err(e) = self.inner.prepare_memory_region(change, old_b.as_ref(), None) {
                self.outer.abort_memory_region(change, old_a.as_ref(), None);
                return Err(e);
            }
            return Ok(());
        };
        let mut draft_a = SlotDraft { desc: new.desc, arch: mem::take(&mut new.arch.0) };
        let r = self.outer.prepare_memory_region(change, old_a.as_ref(), Some(&mut draft_a));
        new.arch.0 = draft_a.arch;
        r?;
        let mut draft_b = SlotDraft { desc: new.desc, arch: mem::take(&mut new.arch.1) };
        let r = self.inner.prepare_memory_region(change, old_b.as_ref(), Some(&mut draft_b));
        new.arch.1 = draft_b.arch;
        if let Err(e) = r {
            let draft_a = SlotDraft { desc: new.desc, arch: new.arch.0.clone() };
            self.outer.abort_memory_region(change, old_a.as_ref(), Some(&draft_a));
            return Err(e);
        }
        Ok(())
    }

    fn commit_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&MemorySlot<Self::SlotData>>,
    ) {
        let (old_a, old_b) = views(old);
        let (new_a, new_b) = views(new);
        self.outer.commit_memory_region(change, old_a.as_ref(), new_a.as_ref());
        self.inner.commit_memory_region(change, old_b.as_ref(), new_b.as_ref());
    }

    fn flush_shadow_memslot(&self, slot: &MemorySlot<Self::SlotData>) {
        self.outer.flush_shadow_memslot(&view(slot, slot.arch.0.clone()));
        self.inner.flush_shadow_memslot(&view(slot, slot.arch.1.clone()));
    }

    fn memslots_updated(&self, as_id: u16, generation: u64) {
        self.outer.memslots_updated(as_id, generation);
        self.inner.memslots_updated(as_id, generation);
    }

    fn unmap_gfn_range(&self, slot: &MemorySlot<Self::SlotData>, start: u64, end: u64) -> bool {
        let a = self.outer.unmap_gfn_range(&view(slot, slot.arch.0.clone()), start, end);
        let b = self.inner.unmap_gfn_range(&view(slot, slot.arch.1.clone()), start, end);
        a | b
    }

    fn abort_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<Self::SlotData>>,
        new: Option<&SlotDraft<Self::SlotData>>,
    ) {
        // Undo in reverse order.
        let (old_a, old_b) = views(old);
        let draft_b = new.map(|n| SlotDraft { desc: n.desc, arch: n.arch.1.clone() });
        let draft_a = new.map(|n| SlotDraft { desc: n.desc, arch: n.arch.0.clone() });
        self.inner.abort_memory_region(change, old_b.as_ref(), draft_b.as_ref());
        self.outer.abort_memory_region(change, old_a.as_ref(), draft_a.as_ref());
    }

    /// Teardown runs in reverse: the inner layer first. The innermost layer
    /// (the kernel VM, in `memslots_kvm::KvmGuestVm`) so drops the kernel's
    /// slots before any other layer's code runs, and a panic in an outer
    /// layer's `destroy_vm` cannot leave the kernel reaching memory the
    /// unwinding frees.
    fn destroy_vm(&self) {
        self.inner.destroy_vm();
        self.outer.destroy_vm();
    }

    /// Outer, then inner. If the inner layer fails, the outer layer's
    /// allocation stays: it is freed with the draft of a refused change, and
    /// reused by a later [`Vm::enable_lazy_metadata`](crate::Vm::enable_lazy_metadata).
    fn alloc_lazy_metadata(&self, desc: &SlotDesc, data: &Self::SlotData) -> Result<(), Errno> {
        self.outer.alloc_lazy_metadata(desc, &data.0)?;
        self.inner.alloc_lazy_metadata(desc, &data.1)
    }

    fn arch_data_bytes(&self, data: &Self::SlotData) -> usize {
        self.outer.arch_data_bytes(&data.0) + self.inner.arch_data_bytes(&data.1)
    }

    fn lazy_metadata_bytes(&self, data: &Self::SlotData) -> usize {
        self.outer.lazy_metadata_bytes(&data.0) + self.inner.lazy_metadata_bytes(&data.1)
    }
}
