//! The VM: its address spaces (each a pair of memslot sets), the grace-period
//! domain readers register with, the writer lock and the arch hooks.

use crate::arch::{ArchHooks, NoArch};
use crate::config::Config;
use crate::error::Error;
use crate::ring::DirtyRing;
use crate::set::MemslotSet;
use crate::slot::MemorySlot;
use crate::srcu::{Srcu, TwoSets};
use crate::sync::{lock, Mutex};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// State only the writer touches (KVM: protected by `slots_lock`).
#[derive(Debug, Default)]
pub(crate) struct WriterState {
    /// Sum of pages over all slots of all address spaces (`nr_memslot_pages`).
    pub(crate) nr_memslot_pages: u64,
    /// guest_memfd bindings (`kvm_gmem_bind`): `(fd, first byte)` -> (one
    /// past the last byte, slot), per file descriptor number.
    pub(crate) gmem_bound: alloc::collections::BTreeMap<(u32, u64), (u64, u32)>,
    /// guest_memfd sizes declared by the caller or probed by a backend
    /// ([`Vm::declare_guest_memfd`]); `None`: the fd is known not to be
    /// open ([`Vm::declare_fd_closed`]).
    pub(crate) gmem_sizes: alloc::collections::BTreeMap<u32, Option<u64>>,
}

/// vCPUs created so far and their dirty rings (KVM: `kvm->lock`).
#[derive(Debug, Default)]
pub(crate) struct VcpuRegistry {
    pub(crate) created: u32,
    pub(crate) rings: Vec<Arc<DirtyRing>>,
}

/// A VM's memslots. Shared between threads (`&Vm` is `Send + Sync`): vCPU
/// threads look up through [`Vcpu`](crate::Vcpu) handles or [`Vm::read`]
/// while one writer at a time changes slots with
/// [`set_user_memory_region`](Vm::set_user_memory_region).
pub struct Vm<H: ArchHooks = NoArch> {
    pub(crate) config: Config,
    pub(crate) spaces: Box<[TwoSets<MemslotSet<H::SlotData>>]>,
    /// Per address space: its published flat translation table (`flat.rs`).
    pub(crate) flat: Box<[crate::flat::Published]>,
    pub(crate) srcu: Srcu,
    pub(crate) writer: Mutex<WriterState>,
    pub(crate) hooks: H,
    /// Mirror of `WriterState::nr_memslot_pages` for lock-free statistics.
    pub(crate) total_pages: AtomicU64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` arguments in force. Written under
    /// the writer lock, which every path that acts on it also holds; atomic so
    /// that [`Vm::manual_dirty_log_protect`] can read it without the lock.
    pub(crate) manual_protect: AtomicU64,
    /// vCPUs and rings.
    pub(crate) vcpus: Mutex<VcpuRegistry>,
    /// Dirty ring size in bytes (0: rings off). Set once, before any vCPU.
    pub(crate) dirty_ring_bytes: AtomicU32,
    /// Dirty rings with bitmaps too (`KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`).
    pub(crate) ring_with_bitmap: AtomicBool,
    /// An arch hook panicked during a slot change ([`Error::Poisoned`]).
    pub(crate) poisoned: AtomicBool,
    /// Memory attributes by gfn range, VM-wide (`kvm->mem_attr_array`),
    /// changed with the memslot protocol.
    pub(crate) attrs: TwoSets<crate::attributes::AttrMap>,
    /// KVM's `slots_arch_lock`: held by a slot change from its prepare to
    /// the publish of the new slot (not while it waits for readers), and by
    /// [`Vm::enable_lazy_metadata`].
    pub(crate) arch_lock: Mutex<()>,
    /// Lazily allocated metadata is enabled (`shadow_root_allocated`).
    pub(crate) lazy_metadata: crate::sync::AtomicBool,
}

impl<H: ArchHooks> core::fmt::Debug for Vm<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Memory used by the memslot metadata (not guest memory), of one address
/// space ([`Vm::address_space_memory_usage`]) or the whole VM
/// ([`Vm::memory_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Slots.
    pub slots: usize,
    /// Bytes of the `Vm` itself and its per-address-space arrays (for one
    /// address space: its pair of sets).
    pub fixed_bytes: usize,
    /// Bytes of slot objects (one copy per slot, shared by both sets).
    pub slot_bytes: usize,
    /// Bytes of the sets' indexes (gfn index, hva tree, id map), both sets;
    /// for the VM also the memory-attribute maps.
    pub index_bytes: usize,
    /// Bytes of dirty bitmaps.
    pub bitmap_bytes: usize,
    /// Heap bytes of the arch layers' per-slot data allocated with the slot
    /// ([`ArchHooks::arch_data_bytes`], e.g. x86 large-page info).
    pub arch_bytes: usize,
    /// Bytes of lazily allocated per-slot metadata
    /// ([`ArchHooks::lazy_metadata_bytes`], e.g. x86 rmaps; 0 until
    /// [`Vm::enable_lazy_metadata`]).
    pub lazy_bytes: usize,
}

impl MemoryUsage {
    /// All metadata bytes.
    pub fn total(&self) -> usize {
        self.fixed_bytes + self.slot_bytes + self.index_bytes + self.bitmap_bytes + self.arch_bytes + self.lazy_bytes
    }
    /// Slot metadata bytes per slot: slot objects and indexes (not the fixed
    /// part, bitmaps or arch data).
    pub fn bytes_per_slot(&self) -> f64 {
        if self.slots == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let r = (self.slot_bytes + self.index_bytes) as f64 / self.slots as f64;
        r
    }
    fn add(&mut self, o: &MemoryUsage) {
        self.slots += o.slots;
        self.fixed_bytes += o.fixed_bytes;
        self.slot_bytes += o.slot_bytes;
        self.index_bytes += o.index_bytes;
        self.bitmap_bytes += o.bitmap_bytes;
        self.arch_bytes += o.arch_bytes;
        self.lazy_bytes += o.lazy_bytes;
    }
}

impl Vm<NoArch> {
    /// A VM with no arch hooks.
    pub fn new(config: Config) -> Result<Self, Error> {
        Vm::with_hooks(config, NoArch)
    }
}

impl<H: ArchHooks> Vm<H> {
    /// A VM whose changes go through `hooks`.
    pub fn with_hooks(config: Config, hooks: H) -> Result<Self, Error> {
        config.validate()?;
        let nr = u64::from(config.nr_address_spaces);
        let spaces: Vec<_> =
            (0..nr).map(|as_id| TwoSets::new(MemslotSet::new(), MemslotSet::new(), as_id, nr)).collect();
        Ok(Vm {
            config,
            spaces: spaces.into_boxed_slice(),
            flat: (0..nr).map(|_| crate::flat::Published::new()).collect(),
            srcu: Srcu::new(config.asymmetric_readers, usize::from(config.nr_address_spaces)),
            writer: Mutex::new(WriterState::default()),
            hooks,
            total_pages: AtomicU64::new(0),
            manual_protect: AtomicU64::new(0),
            vcpus: Mutex::new(VcpuRegistry::default()),
            dirty_ring_bytes: AtomicU32::new(0),
            ring_with_bitmap: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            attrs: TwoSets::new(Default::default(), Default::default(), 0, 1),
            arch_lock: Mutex::new(()),
            lazy_metadata: crate::sync::AtomicBool::new(false),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The writer lock (KVM's `slots_lock`). Everything that holds it may wait
    /// for a grace period, so it must never be taken inside a read section of
    /// this VM: debug builds check that and panic with an explanation.
    #[track_caller]
    pub(crate) fn lock_writer(&self) -> crate::sync::MutexGuard<'_, WriterState> {
        self.srcu.assert_outside_section("a writer call (slot change, dirty-log GET/CLEAR, ring reset, memory_usage)");
        lock(&self.writer)
    }

    /// Whether an arch hook panicked during a slot change. A poisoned VM
    /// refuses every further slot change with [`Error::Poisoned`] (`EIO`);
    /// lookups, dirty logging and teardown keep working on the last
    /// published state.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// The arch hooks.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// Number of address spaces.
    pub fn nr_address_spaces(&self) -> u16 {
        self.config.nr_address_spaces
    }

    /// Pages over all slots (`kvm->nr_memslot_pages`).
    pub fn nr_memslot_pages(&self) -> u64 {
        self.total_pages.load(Ordering::Relaxed)
    }

    /// Current generation of address space `as_id` (bit 63 set while an
    /// update is in progress), or `None` if it does not exist.
    pub fn generation(&self, as_id: u16) -> Option<u64> {
        self.spaces.get(usize::from(as_id)).map(TwoSets::generation)
    }

    /// Registered reader records: one per vCPU and [`Reader`](crate::Reader),
    /// and (with `std`) two per live thread that made anonymous lookups
    /// (`vm.read()`, `vm.gfn_to_hva`, ...) or a translation in any read
    /// section (its flat tables live with those records), removed when that
    /// thread exits.
    pub fn registered_readers(&self) -> usize {
        self.srcu.registered()
    }

    /// Whether some reader record of this VM is *armed*: a vCPU handle or a
    /// thread's anonymous lookups made enough sections to switch to the
    /// asymmetric protocol ([`Config::asymmetric_readers`]), so that every
    /// grace period of this VM from then on calls `membarrier(2)`.
    pub fn readers_armed(&self) -> bool {
        self.srcu.armed()
    }

    /// Metadata memory in use by the whole VM, measured from the live
    /// structures: the sum of [`address_space_memory_usage`](Self::address_space_memory_usage)
    /// over the address spaces, plus the `Vm` itself and the memory
    /// attributes. Takes the writer lock: not from a thread inside a read
    /// section.
    pub fn memory_usage(&self) -> MemoryUsage {
        let _w = self.lock_writer();
        let mut u = MemoryUsage { fixed_bytes: core::mem::size_of::<Self>(), ..MemoryUsage::default() };
        for as_id in 0..self.spaces.len() {
            u.add(&self.space_usage_locked(as_id));
        }
        // SAFETY: we hold the writer lock.
        unsafe {
            self.attrs.with_active_writer(|m| u.index_bytes += m.heap_bytes());
            self.attrs.with_inactive_mut(|m| u.index_bytes += m.heap_bytes());
        }
        u
    }

    /// Metadata memory of address space `as_id` (its two sets, slots,
    /// bitmaps, arch data), or `None` if it does not exist. Takes the writer
    /// lock: not from a thread inside a read section.
    pub fn address_space_memory_usage(&self, as_id: u16) -> Option<MemoryUsage> {
        self.spaces.get(usize::from(as_id))?;
        let _w = self.lock_writer();
        Some(self.space_usage_locked(usize::from(as_id)))
    }

    /// The caller holds the writer lock; `as_id` exists.
    fn space_usage_locked(&self, as_id: usize) -> MemoryUsage {
        let space = &self.spaces[as_id];
        let mut u = MemoryUsage {
            fixed_bytes: core::mem::size_of::<TwoSets<MemslotSet<H::SlotData>>>()
                + core::mem::size_of::<crate::flat::Published>(),
            ..MemoryUsage::default()
        };
        // SAFETY: the caller holds the writer lock.
        u.index_bytes += unsafe { self.flat[as_id].bytes() };
        // SAFETY: the caller holds the writer lock; both sets are only read
        // here, and the inactive one is not being mutated by anyone else.
        unsafe {
            space.with_active_writer(|set| {
                u.slots += set.len();
                u.index_bytes += set.heap_bytes();
                for s in set.slots_by_id() {
                    // The slot and the Arc's two counts.
                    u.slot_bytes += core::mem::size_of::<MemorySlot<H::SlotData>>() + 2 * core::mem::size_of::<usize>();
                    u.bitmap_bytes += s.dirty_bitmap().map_or(0, crate::dirty::DirtyBitmap::heap_bytes);
                    u.arch_bytes += self.hooks.arch_data_bytes(&s.arch);
                    u.lazy_bytes += self.hooks.lazy_metadata_bytes(&s.arch);
                }
            });
            space.with_inactive_mut(|set| u.index_bytes += set.heap_bytes());
        }
        u
    }
}

impl<H: ArchHooks> Drop for Vm<H> {
    fn drop(&mut self) {
        // kvm_destroy_vm: the arch hook runs before the memslots are freed.
        self.hooks.destroy_vm();
        for space in self.spaces.iter_mut() {
            space.both_mut(|a, b| {
                a.clear();
                b.clear();
            });
        }
    }
}
