//! An x86-like per-slot metadata model (`kvm_arch_memory_slot`), the
//! provided user of [lazily allocated metadata](crate::metadata):
//!
//! - **large-page info** (`lpage_info`), allocated with the slot (CREATE,
//!   MOVE) by `kvm_alloc_memslot_metadata`: per 2 MiB and 1 GiB level one
//!   `disallow_lpage` count per large page the slot touches; the first and
//!   last are 1 when the slot's head or tail is not aligned to the level,
//!   and all are 1 when the gfn and host address are misaligned with each
//!   other at that level;
//! - **reverse maps** (`rmap`), one 8-byte head per page at 4 KiB, per
//!   512 pages at 2 MiB and per 2^18 pages at 1 GiB, counted as KVM's
//!   `__kvm_mmu_slot_lpages` does. KVM allocates them only when the first
//!   shadow root needs them (`mmu_first_shadow_root_alloc`, seed 003): here,
//!   [`Vm::enable_lazy_metadata`](crate::Vm::enable_lazy_metadata).
//!
//! FLAGS_ONLY keeps both (x86 copies `old->arch`); MOVE allocates fresh ones
//! (the gfns changed); DELETE frees them with the slot, after the grace
//! period. Allocations that fail report `ENOMEM` (never abort), and
//! [`X86Mmu::fail_allocations_after`] injects failures for tests.
//!
//! ```
//! use memslots::rmap::X86Mmu;
//! use memslots::{Config, UserMemoryRegion, Vm};
//! let vm = Vm::with_hooks(Config::default(), X86Mmu::new()).unwrap();
//! vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 1 << 30, 0x7f00_0000_0000)).unwrap();
//! let g = vm.read();
//! let slot = g.gfn_to_memslot(0, 0x1234).unwrap();
//! assert!(slot.arch().rmap().is_none()); // nothing until the first shadow root
//! drop(g);
//! vm.enable_lazy_metadata().unwrap();
//! let g = vm.read();
//! let rmap = g.gfn_to_memslot(0, 0x1234).unwrap().arch().rmap().unwrap();
//! assert_eq!(rmap.level(1).len(), 1 << 18); // one head per 4 KiB page
//! ```

use crate::errno::Errno;
use crate::metadata::LazyCell;
use crate::region::MemoryChange;
use crate::slot::{MemorySlot, SlotDesc};
use crate::{ArchHooks, SlotDraft};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};

/// Page-size levels: 4 KiB, 2 MiB, 1 GiB (`KVM_NR_PAGE_SIZES`).
pub const KVM_NR_PAGE_SIZES: usize = MAX_LEVEL as usize;
/// The largest level (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB).
pub const MAX_LEVEL: u32 = 3;

/// `KVM_HPAGE_GFN_SHIFT(level)`: gfn bits below a level-`level` page (1 = 4 KiB).
pub const fn kvm_hpage_gfn_shift(level: u32) -> u32 {
    (level - 1) * 9
}

/// `KVM_PAGES_PER_HPAGE(level)`.
pub const fn kvm_pages_per_hpage(level: u32) -> u64 {
    1 << kvm_hpage_gfn_shift(level)
}

/// `gfn_to_index`: the index of `gfn`'s level-`level` page in a slot starting at `base_gfn`.
pub const fn gfn_to_index(gfn: u64, base_gfn: u64, level: u32) -> u64 {
    (gfn >> kvm_hpage_gfn_shift(level)) - (base_gfn >> kvm_hpage_gfn_shift(level))
}

/// `__kvm_mmu_slot_lpages`: how many level-`level` pages a slot of
/// `npages` pages at `base_gfn` touches (`npages` ≥ 1).
pub const fn kvm_mmu_slot_lpages(base_gfn: u64, npages: u64, level: u32) -> u64 {
    gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1
}

/// Bytes KVM allocates for one slot's rmaps: 8 per head over the three levels.
pub const fn kvm_rmap_bytes(base_gfn: u64, npages: u64) -> u64 {
    let mut total = 0;
    let mut level = 1;
    while level <= MAX_LEVEL {
        total += 8 * kvm_mmu_slot_lpages(base_gfn, npages, level);
        level += 1;
    }
    total
}

/// Bytes KVM allocates for one slot's large-page info: 4 per entry at 2 MiB and 1 GiB.
pub const fn kvm_lpage_info_bytes(base_gfn: u64, npages: u64) -> u64 {
    4 * (kvm_mmu_slot_lpages(base_gfn, npages, 2) + kvm_mmu_slot_lpages(base_gfn, npages, 3))
}

/// One slot's reverse-map heads, per level (`slot->arch.rmap`). A head is
/// where a shadow MMU chains the sptes mapping that page; 0 = none.
#[derive(Debug)]
pub struct Rmaps {
    levels: [Box<[AtomicU64]>; KVM_NR_PAGE_SIZES],
}

impl Rmaps {
    /// The heads of level `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB); panics
    /// for another level.
    pub fn level(&self, level: u32) -> &[AtomicU64] {
        &self.levels[level as usize - 1]
    }

    /// The head of `gfn`'s level-`level` page in `slot` (`gfn_to_rmap`), if
    /// the gfn is in the slot.
    pub fn gfn_to_rmap(&self, slot: &SlotDesc, gfn: u64, level: u32) -> Option<&AtomicU64> {
        if !slot.contains(gfn) || !(1..=MAX_LEVEL).contains(&level) {
            return None;
        }
        usize::try_from(gfn_to_index(gfn, slot.base_gfn, level)).ok().and_then(|i| self.level(level).get(i))
    }

    /// Heap bytes.
    pub fn heap_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.len() * core::mem::size_of::<AtomicU64>()).sum()
    }
}

/// One slot's x86 arch data (`struct kvm_arch_memory_slot`).
#[derive(Debug)]
pub struct X86SlotArch {
    /// `lpage_info[level - 2]` for levels 2 (2 MiB) and 3 (1 GiB).
    lpage_info: [Box<[AtomicI32]>; KVM_NR_PAGE_SIZES - 1],
    rmap: LazyCell<Rmaps>,
}

impl X86SlotArch {
    /// The reverse maps, once allocated (one acquire load).
    #[inline]
    pub fn rmap(&self) -> Option<&Rmaps> {
        self.rmap.get()
    }

    /// The `disallow_lpage` counts of level `level` (2 or 3); panics for another level.
    pub fn lpage_info(&self, level: u32) -> &[AtomicI32] {
        &self.lpage_info[level as usize - 2]
    }

    /// Whether `gfn` may be mapped by a level-`level` page as far as the
    /// slot's alignment goes (`disallow_lpage == 0`).
    pub fn lpage_allowed(&self, slot: &SlotDesc, gfn: u64, level: u32) -> bool {
        if !slot.contains(gfn) || !(2..=MAX_LEVEL).contains(&level) {
            return false;
        }
        usize::try_from(gfn_to_index(gfn, slot.base_gfn, level))
            .ok()
            .and_then(|i| self.lpage_info(level).get(i))
            .is_some_and(|c| c.load(Ordering::Relaxed) == 0)
    }

    fn lpage_bytes(&self) -> usize {
        self.lpage_info.iter().map(|l| l.len() * core::mem::size_of::<AtomicI32>()).sum()
    }
}

/// The per-slot data of [`X86Mmu`]: `None` only in a draft before prepare.
#[derive(Clone, Debug, Default)]
pub struct X86SlotData(Option<Arc<X86SlotArch>>);

impl X86SlotData {
    /// The slot's arch data (always there for a slot in a set).
    pub fn get(&self) -> Option<&X86SlotArch> {
        self.0.as_deref()
    }

    /// The reverse maps, once allocated.
    #[inline]
    pub fn rmap(&self) -> Option<&Rmaps> {
        self.0.as_deref().and_then(X86SlotArch::rmap)
    }
}

/// The x86-like arch layer: large-page info with every slot, reverse maps
/// lazily (see the [module docs](self)).
#[derive(Debug)]
pub struct X86Mmu {
    /// Allocations left before an injected failure; negative: none injected.
    fail_after: AtomicI64,
    rmap_allocs: AtomicU64,
}

impl Default for X86Mmu {
    fn default() -> Self {
        X86Mmu::new()
    }
}

/// A zeroed `[T]` of `n` elements, or `ENOMEM` (`__vcalloc`).
fn vcalloc<T>(n: u64, zero: impl Fn() -> T) -> Result<Box<[T]>, Errno> {
    let n = usize::try_from(n).map_err(|_| Errno::ENOMEM)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Errno::ENOMEM)?;
    v.resize_with(n, zero);
    Ok(v.into_boxed_slice())
}

impl X86Mmu {
    /// No failures injected.
    pub const fn new() -> Self {
        X86Mmu { fail_after: AtomicI64::new(-1), rmap_allocs: AtomicU64::new(0) }
    }

    /// Tests: the next `n` allocations (one per large-page-info or rmap
    /// array) succeed and every later one fails with `ENOMEM`, until
    /// [`stop_failing`](Self::stop_failing).
    pub fn fail_allocations_after(&self, n: u32) {
        self.fail_after.store(i64::from(n), Ordering::SeqCst);
    }

    /// Ends [`fail_allocations_after`](Self::fail_allocations_after).
    pub fn stop_failing(&self) {
        self.fail_after.store(-1, Ordering::SeqCst);
    }

    /// How many slots got reverse maps so far (each exactly once).
    pub fn rmap_allocations(&self) -> u64 {
        self.rmap_allocs.load(Ordering::SeqCst)
    }

    fn alloc_ok(&self) -> Result<(), Errno> {
        let r = self.fail_after.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n > 0).then(|| n - 1));
        match r {
            Ok(_) => Ok(()),
            Err(n) if n < 0 => Ok(()),
            Err(_) => Err(Errno::ENOMEM),
        }
    }

    fn array<T>(&self, n: u64, zero: impl Fn() -> T) -> Result<Box<[T]>, Errno> {
        self.alloc_ok()?;
        vcalloc(n, zero)
    }

    /// `kvm_alloc_memslot_metadata`'s large-page info for `desc`.
    fn alloc_lpage_info(&self, desc: &SlotDesc) -> Result<X86SlotArch, Errno> {
        let mut info: [Box<[AtomicI32]>; KVM_NR_PAGE_SIZES - 1] = [Box::new([]), Box::new([])];
        for (linfo, level) in info.iter_mut().zip(2..=MAX_LEVEL) {
            let lpages = kvm_mmu_slot_lpages(desc.base_gfn, desc.npages, level);
            let l = self.array(lpages, || AtomicI32::new(0))?;
            let mask = kvm_pages_per_hpage(level) - 1;
            if desc.base_gfn & mask != 0 {
                l[0].store(1, Ordering::Relaxed);
            }
            if (desc.base_gfn + desc.npages) & mask != 0 {
                l[l.len() - 1].store(1, Ordering::Relaxed);
            }
            // gfn and host address misaligned with each other at this level:
            // no large pages anywhere in the slot.
            let ugfn = desc.userspace_addr >> crate::PAGE_SHIFT;
            if (desc.base_gfn ^ ugfn) & mask != 0 {
                l.iter().for_each(|c| c.store(1, Ordering::Relaxed));
            }
            *linfo = l;
        }
        Ok(X86SlotArch { lpage_info: info, rmap: LazyCell::new() })
    }

    /// `memslot_rmap_alloc`: every level or nothing.
    fn alloc_rmaps(&self, desc: &SlotDesc) -> Result<Rmaps, Errno> {
        let mut levels: [Box<[AtomicU64]>; KVM_NR_PAGE_SIZES] = [Box::new([]), Box::new([]), Box::new([])];
        for (l, level) in levels.iter_mut().zip(1..=MAX_LEVEL) {
            *l = self.array(kvm_mmu_slot_lpages(desc.base_gfn, desc.npages, level), || AtomicU64::new(0))?;
        }
        self.rmap_allocs.fetch_add(1, Ordering::SeqCst);
        Ok(Rmaps { levels })
    }
}

impl ArchHooks for X86Mmu {
    type SlotData = X86SlotData;

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        _old: Option<&MemorySlot<X86SlotData>>,
        new: Option<&mut SlotDraft<X86SlotData>>,
    ) -> Result<(), Errno> {
        // FLAGS_ONLY: the draft already shares the old slot's data.
        if let (MemoryChange::Create | MemoryChange::Move, Some(new)) = (change, new) {
            new.arch = X86SlotData(Some(Arc::new(self.alloc_lpage_info(&new.desc)?)));
        }
        Ok(())
    }

    fn alloc_lazy_metadata(&self, desc: &SlotDesc, data: &X86SlotData) -> Result<(), Errno> {
        if let Some(arch) = data.get() {
            arch.rmap.get_or_try_init(|| self.alloc_rmaps(desc))?;
        }
        Ok(())
    }

    fn arch_data_bytes(&self, data: &X86SlotData) -> usize {
        data.get()
            .map_or(0, |a| core::mem::size_of::<X86SlotArch>() + 2 * core::mem::size_of::<usize>() + a.lpage_bytes())
    }

    fn lazy_metadata_bytes(&self, data: &X86SlotData) -> usize {
        data.rmap().map_or(0, |r| core::mem::size_of::<Rmaps>() + r.heap_bytes())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lpages_as_kvm_counts_them() {
        // A 1 GiB slot at gfn 0: 2^18 heads, 512, 1.
        assert_eq!(kvm_mmu_slot_lpages(0, 1 << 18, 1), 1 << 18);
        assert_eq!(kvm_mmu_slot_lpages(0, 1 << 18, 2), 512);
        assert_eq!(kvm_mmu_slot_lpages(0, 1 << 18, 3), 1);
        // Misaligned: one page either side of a 2 MiB boundary touches two.
        assert_eq!(kvm_mmu_slot_lpages(511, 2, 2), 2);
        assert_eq!(kvm_mmu_slot_lpages(511, 2, 3), 1);
        assert_eq!(kvm_rmap_bytes(0, 1 << 18), 8 * ((1 << 18) + 512 + 1));
        assert_eq!(kvm_lpage_info_bytes(0, 1 << 18), 4 * (512 + 1));
    }

    #[test]
    fn disallow_counts_for_misaligned_heads_and_tails() {
        let mmu = X86Mmu::new();
        let desc = |base_gfn, npages, hva| SlotDesc {
            base_gfn,
            npages,
            userspace_addr: hva,
            flags: 0,
            id: 0,
            as_id: 0,
            guest_memfd: None,
        };
        // Aligned 4 MiB: nothing disallowed at 2 MiB; the 1 GiB page is partial.
        let a = mmu.alloc_lpage_info(&desc(0, 1024, 0x4000_0000)).unwrap();
        assert!(a.lpage_info(2).iter().all(|c| c.load(Ordering::Relaxed) == 0));
        assert_eq!(a.lpage_info(3).len(), 1);
        assert_eq!(a.lpage_info(3)[0].load(Ordering::Relaxed), 1);
        // Head and tail misaligned at 2 MiB: first and last disallowed.
        let b = mmu.alloc_lpage_info(&desc(1, 1024, 0x1000)).unwrap();
        let l2: Vec<i32> = b.lpage_info(2).iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(l2, [1, 0, 1]);
        // gfn and hva misaligned with each other: all disallowed.
        let c = mmu.alloc_lpage_info(&desc(512, 1024, 0x1000)).unwrap();
        assert!(c.lpage_info(2).iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn injected_failure_is_enomem() {
        let mmu = X86Mmu::new();
        let d = SlotDesc { base_gfn: 0, npages: 16, userspace_addr: 0, flags: 0, id: 0, as_id: 0, guest_memfd: None };
        mmu.fail_allocations_after(1);
        assert_eq!(mmu.alloc_rmaps(&d).unwrap_err(), Errno::ENOMEM);
        mmu.stop_failing();
        assert!(mmu.alloc_rmaps(&d).is_ok());
        assert_eq!(mmu.rmap_allocations(), 1);
    }
}
