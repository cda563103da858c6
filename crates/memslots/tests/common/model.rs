// The reference model of `KVM_SET_USER_MEMORY_REGION` and the comparison
// harness, shared (by `include!`) between the proptest driver `tests/model.rs`
// and the cargo-fuzz target `fuzz/fuzz_targets/ops.rs`. Included text: no
// inner attributes or `//!` docs here.

use memslots::{
    ArchHooks, Config, Errno, Error, HvaError, IllegalChange, MemoryChange, MemorySlot, NoArch, Outcome, Reader,
    SlotDesc, SlotDraft, UserMemoryRegion, Vcpu, Vm, GEN_UPDATE_IN_PROGRESS, KVM_MEMSLOT_INVALID,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const PAGE: u64 = 4096;
const LOG: u32 = KVM_MEM_LOG_DIRTY_PAGES;
const RO: u32 = KVM_MEM_READONLY;
/// Above this size the dirty-log flag is masked off (a 2^31-page bitmap is 256 MiB).
const BIG: u64 = 16 << 20;
/// The highest page-aligned `u64`.
const ALIGNED_MAX: u64 = !(PAGE - 1);
/// Base of the dense host address pool.
const HVA_BASE: u64 = 0x1_0000_0000;
/// Step of the dense host address pool (two pages: ranges overlap a lot).
const HVA_STEP: u64 = 0x2000;

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

/// A slot of the model (and the comparable part of a library slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct MSlot {
    as_id: u16,
    id: u16,
    base_gfn: u64,
    npages: u64,
    hva: u64,
    flags: u32,
}

impl MSlot {
    fn of(d: &SlotDesc) -> Self {
        MSlot {
            as_id: d.as_id,
            id: d.id,
            base_gfn: d.base_gfn,
            npages: d.npages,
            hva: d.userspace_addr,
            flags: d.flags,
        }
    }
    fn raw(&self) -> u32 {
        (u32::from(self.as_id) << 16) | u32::from(self.id)
    }
    fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }
    fn last_gfn(&self) -> u64 {
        self.base_gfn + self.npages - 1
    }
    fn hva_last(&self) -> u64 {
        self.hva + self.npages * PAGE - 1
    }
    fn readonly(&self) -> bool {
        self.flags & RO != 0
    }
}

/// Which check rejected a request (the library's error kinds, for the
/// checks a v1 request on a VM without private memory can reach).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Reject {
    Flags,
    SlotId,
    AddressSpace,
    UnalignedSize,
    UnalignedGpa,
    BadHva,
    GpaWraps,
    TooManyPages,
    DeleteMissing,
    TotalPages,
    ChangeHva,
    ChangeSize,
    ChangeReadonly,
    /// Overlap with the slot whose raw `slot` field is given (the lowest-gfn one).
    Overlap(u32),
    GfnBeyondMax,
    /// The arch prepare hook failed (injected).
    Arch(Errno),
}

impl Reject {
    fn errno(self) -> Errno {
        match self {
            Reject::Overlap(_) => Errno::EEXIST,
            Reject::Arch(e) => e,
            _ => Errno::EINVAL,
        }
    }

    /// The library error's kind; `None` for kinds a v1 request must never produce.
    fn of(e: &Error) -> Option<Reject> {
        Some(match e {
            Error::InvalidFlags { .. } => Reject::Flags,
            Error::SlotIdOutOfRange { .. } => Reject::SlotId,
            Error::AddressSpaceOutOfRange { .. } => Reject::AddressSpace,
            Error::UnalignedSize { .. } => Reject::UnalignedSize,
            Error::UnalignedGuestPhysAddr { .. } => Reject::UnalignedGpa,
            Error::BadUserspaceAddr { .. } => Reject::BadHva,
            Error::GuestRangeWraps { .. } => Reject::GpaWraps,
            Error::TooManyPages { .. } => Reject::TooManyPages,
            Error::DeleteNonexistent { .. } => Reject::DeleteMissing,
            Error::TotalPagesOverflow { .. } => Reject::TotalPages,
            Error::IllegalChange { what: IllegalChange::UserspaceAddr, .. } => Reject::ChangeHva,
            Error::IllegalChange { what: IllegalChange::Size, .. } => Reject::ChangeSize,
            Error::IllegalChange { what: IllegalChange::ReadonlyFlag, .. } => Reject::ChangeReadonly,
            Error::Overlap { other, .. } => Reject::Overlap(*other),
            Error::GfnBeyondMax { .. } => Reject::GfnBeyondMax,
            Error::Arch(e) => Reject::Arch(*e),
            _ => return None,
        })
    }
}

type Verdict = Result<Outcome, Reject>;

/// Where an attempted change (one that reached `kvm_set_memslot`) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    /// The x86 max-gfn check (before the arch hook).
    MaxGfn,
    /// The arch prepare hook.
    Arch,
}

/// A change that passed `__kvm_set_memory_region`'s checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attempt {
    as_id: u16,
    change: MemoryChange,
    old: Option<MSlot>,
    new: Option<MSlot>,
    fail: Option<Fail>,
}

/// KVM's memslots, naively: one unsorted `Vec` of slots per address space.
#[derive(Clone, Debug)]
struct Model {
    cfg: Config,
    spaces: Vec<Vec<MSlot>>,
    gens: Vec<u64>,
    /// What the last `apply` attempted, if it got that far.
    attempt: Option<Attempt>,
    /// Dirty logging: the bitmap of every slot that logs, `(as_id, id)` ->
    /// words (bit `b` of word `w` is page `64 * w + b` of the slot).
    bitmaps: BTreeMap<(u16, u16), Vec<u64>>,
    /// The last accepted `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` argument.
    manual: u64,
}

impl Model {
    fn new(cfg: Config) -> Self {
        let nr = usize::from(cfg.nr_address_spaces);
        Model {
            cfg,
            spaces: vec![Vec::new(); nr],
            gens: (0..cfg.nr_address_spaces).map(u64::from).collect(),
            attempt: None,
            bitmaps: BTreeMap::new(),
            manual: 0,
        }
    }

    fn nr(&self) -> u16 {
        self.cfg.nr_address_spaces
    }

    /// Slots of `as_id` (empty for a missing address space), in no particular order.
    fn space(&self, as_id: u16) -> &[MSlot] {
        self.spaces.get(usize::from(as_id)).map_or(&[], Vec::as_slice)
    }

    /// Slots of `as_id` in gfn order.
    fn sorted(&self, as_id: u16) -> Vec<MSlot> {
        let mut v = self.space(as_id).to_vec();
        v.sort_by_key(|s| s.base_gfn);
        v
    }

    fn all(&self) -> impl Iterator<Item = &MSlot> + '_ {
        self.spaces.iter().flatten()
    }

    fn total_pages(&self) -> u64 {
        self.all().map(|s| s.npages).sum()
    }

    fn by_id(&self, as_id: u16, id: u16) -> Option<MSlot> {
        self.space(as_id).iter().find(|s| s.id == id).copied()
    }

    fn by_gfn(&self, as_id: u16, gfn: u64) -> Option<MSlot> {
        self.space(as_id).iter().find(|s| s.contains(gfn)).copied()
    }

    /// Containing slot, else the lowest-based slot above, else the highest-based one.
    fn approx(&self, as_id: u16, gfn: u64) -> Option<MSlot> {
        if let Some(s) = self.by_gfn(as_id, gfn) {
            return Some(s);
        }
        let sp = self.space(as_id);
        sp.iter()
            .filter(|s| s.base_gfn > gfn)
            .min_by_key(|s| s.base_gfn)
            .or_else(|| sp.iter().max_by_key(|s| s.base_gfn))
            .copied()
    }

    fn hva_many(&self, as_id: u16, gfn: u64, write: bool) -> Result<(u64, u64), HvaError> {
        let s = self.by_gfn(as_id, gfn).ok_or(HvaError::NoSlot)?;
        if write && s.readonly() {
            return Err(HvaError::ReadOnly);
        }
        Ok((s.hva + (gfn - s.base_gfn) * PAGE, s.npages - (gfn - s.base_gfn)))
    }

    fn hva(&self, as_id: u16, gfn: u64) -> Result<u64, HvaError> {
        self.hva_many(as_id, gfn, true).map(|(h, _)| h)
    }

    fn hva_prot(&self, as_id: u16, gfn: u64) -> Result<(u64, bool), HvaError> {
        let s = self.by_gfn(as_id, gfn).ok_or(HvaError::NoSlot)?;
        Ok((s.hva + (gfn - s.base_gfn) * PAGE, !s.readonly()))
    }

    /// Slots of `as_id` intersecting gfns `[start, end)`, in gfn order.
    fn in_gfn_range(&self, as_id: u16, start: u64, end: u64) -> Vec<MSlot> {
        let mut v: Vec<_> =
            self.space(as_id).iter().filter(|s| s.base_gfn < end && s.base_gfn + s.npages > start).copied().collect();
        v.sort_by_key(|s| s.base_gfn);
        v
    }

    /// Per address space (ascending), the sorted multiset of slots whose hva
    /// range intersects `[start, last]`.
    fn in_hva_range(&self, start: u64, last: u64) -> Vec<Vec<MSlot>> {
        (0..self.nr())
            .map(|a| {
                let mut v: Vec<_> =
                    self.space(a).iter().filter(|s| s.hva <= last && start <= s.hva_last()).copied().collect();
                v.sort();
                v
            })
            .collect()
    }

    fn bump(&mut self, as_id: u16, steps: u64) {
        let g = &mut self.gens[usize::from(as_id)];
        *g = g.wrapping_add(steps * u64::from(self.cfg.nr_address_spaces)) & !GEN_UPDATE_IN_PROGRESS;
    }

    /// `KVM_SET_USER_MEMORY_REGION` (v1), the checks in the kernel's order.
    fn apply(&mut self, r: &UserMemoryRegion) -> Verdict {
        self.apply_with(r, None)
    }

    /// As `apply`, with the arch prepare hook failing with `inject` if reached.
    fn apply_with(&mut self, r: &UserMemoryRegion, inject: Option<Errno>) -> Verdict {
        self.attempt = None;
        let cfg = self.cfg;
        // 0. v1 ioctl.
        if r.flags & !(LOG | RO) != 0 {
            return Err(Reject::Flags);
        }
        if r.slot & 0xffff >= u32::from(cfg.user_slots) {
            return Err(Reject::SlotId);
        }
        // 1. check_memory_region_flags.
        let valid = LOG | if cfg.readonly_mem { RO } else { 0 };
        if r.flags & !valid != 0 {
            return Err(Reject::Flags);
        }
        // 2.
        let as_raw = r.slot >> 16;
        let id_raw = r.slot & 0xffff;
        let (size, gpa, hva) = (r.memory_size, r.guest_phys_addr, r.userspace_addr);
        // 3, 4.
        if size % PAGE != 0 {
            return Err(Reject::UnalignedSize);
        }
        if gpa % PAGE != 0 {
            return Err(Reject::UnalignedGpa);
        }
        // 5. access_ok.
        if hva % PAGE != 0 || hva.checked_add(size).is_none_or(|end| end > cfg.user_addr_limit) {
            return Err(Reject::BadHva);
        }
        // 7.
        if as_raw >= u32::from(cfg.nr_address_spaces) {
            return Err(Reject::AddressSpace);
        }
        if id_raw >= u32::from(cfg.mem_slots_num) {
            return Err(Reject::SlotId);
        }
        let as_id = u16::try_from(as_raw).unwrap();
        let id = u16::try_from(id_raw).unwrap();
        // 8.
        if gpa.checked_add(size).is_none() {
            return Err(Reject::GpaWraps);
        }
        // 9.
        let npages = size / PAGE;
        if npages > cfg.max_pages_per_slot {
            return Err(Reject::TooManyPages);
        }
        let ai = usize::from(as_id);
        let old = self.spaces[ai].iter().position(|s| s.id == id);
        // 10. DELETE.
        if size == 0 {
            let Some(i) = old else { return Err(Reject::DeleteMissing) };
            let o = self.spaces[ai][i];
            let mut attempt = Attempt { as_id, change: MemoryChange::Delete, old: Some(o), new: None, fail: None };
            if let Some(e) = inject {
                // INVALID published, prepare fails, the old slot re-activated.
                attempt.fail = Some(Fail::Arch);
                self.attempt = Some(attempt);
                self.bump(as_id, 2);
                return Err(Reject::Arch(e));
            }
            self.attempt = Some(attempt);
            self.spaces[ai].remove(i);
            self.bitmaps.remove(&(as_id, id));
            self.bump(as_id, 2);
            return Ok(Outcome::Changed(MemoryChange::Delete));
        }
        let base_gfn = gpa / PAGE;
        // 11, 12.
        let change = match old {
            None => {
                if self.total_pages().checked_add(npages).is_none() {
                    return Err(Reject::TotalPages);
                }
                MemoryChange::Create
            }
            Some(i) => {
                let o = self.spaces[ai][i];
                if hva != o.hva {
                    return Err(Reject::ChangeHva);
                }
                if npages != o.npages {
                    return Err(Reject::ChangeSize);
                }
                if (r.flags ^ o.flags) & RO != 0 {
                    return Err(Reject::ChangeReadonly);
                }
                if base_gfn != o.base_gfn {
                    MemoryChange::Move
                } else if r.flags != o.flags {
                    MemoryChange::FlagsOnly
                } else {
                    return Ok(Outcome::Unchanged);
                }
            }
        };
        let new = MSlot { as_id, id, base_gfn, npages, hva, flags: r.flags };
        // 13. Overlap with another slot of the same address space.
        let overlap = self.spaces[ai]
            .iter()
            .filter(|s| s.id != id && s.base_gfn < base_gfn + npages && base_gfn < s.base_gfn + s.npages)
            .min_by_key(|s| s.base_gfn);
        if let Some(o) = overlap {
            return Err(Reject::Overlap(o.raw()));
        }
        // 14. x86 kvm_arch_prepare_memory_region. For MOVE it runs after the
        // INVALID copy was published, and the failure path re-activates the
        // old slot: two publishes (KVM's kvm_set_memslot error path).
        let old_slot = old.map(|i| self.spaces[ai][i]);
        let mut attempt = Attempt { as_id, change, old: old_slot, new: Some(new), fail: None };
        let publishes_invalid = change == MemoryChange::Move;
        if new.last_gfn() > cfg.max_gfn {
            attempt.fail = Some(Fail::MaxGfn);
            self.attempt = Some(attempt);
            if publishes_invalid {
                self.bump(as_id, 2);
            }
            return Err(Reject::GfnBeyondMax);
        }
        if let Some(e) = inject {
            attempt.fail = Some(Fail::Arch);
            self.attempt = Some(attempt);
            if publishes_invalid {
                self.bump(as_id, 2);
            }
            return Err(Reject::Arch(e));
        }
        self.attempt = Some(attempt);
        match (change, old) {
            (MemoryChange::Create, None) => {
                self.spaces[ai].push(new);
                self.bump(as_id, 1);
            }
            (MemoryChange::Move, Some(i)) => {
                self.spaces[ai][i] = new;
                self.bump(as_id, 2);
            }
            (MemoryChange::FlagsOnly, Some(i)) => {
                self.spaces[ai][i] = new;
                self.bump(as_id, 1);
            }
            _ => unreachable!(),
        }
        self.update_bitmap(&new);
        Ok(Outcome::Changed(change))
    }

    /// KVM's `kvm_prepare_memory_region` for the bitmap of a created, moved or
    /// re-flagged slot: none without LOG_DIRTY_PAGES; the old one (bits and
    /// all) if the slot already logged; else a new one, all set with
    /// manual protect and INITIALLY_SET.
    fn update_bitmap(&mut self, new: &MSlot) {
        let key = (new.as_id, new.id);
        if new.flags & LOG == 0 {
            self.bitmaps.remove(&key);
        } else if !self.bitmaps.contains_key(&key) {
            let words = usize::try_from(new.npages.div_ceil(64)).unwrap();
            let mut b = vec![0u64; words];
            if self.manual == 3 {
                for p in 0..new.npages {
                    b[usize::try_from(p / 64).unwrap()] |= 1 << (p % 64);
                }
            }
            self.bitmaps.insert(key, b);
        }
    }
}

// ---------------------------------------------------------------------------
// The reference model of dirty logging (used by the fuzz target)
// ---------------------------------------------------------------------------

/// A dirty-log verdict: the value, or the errno.
#[allow(dead_code)]
type DirtyVerdict<T> = Result<T, Errno>;

#[allow(dead_code)]
impl Model {
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args)`.
    fn enable_manual(&mut self, args: u64) -> DirtyVerdict<()> {
        let allowed = if args & 1 != 0 { 3 } else { 1 };
        if args & !allowed != 0 {
            return Err(Errno::EINVAL);
        }
        self.manual = args;
        Ok(())
    }

    /// The checks common to GET and CLEAR: the slot's key and page count.
    fn dirty_slot(&self, slot: u32, first_page: Option<u64>) -> DirtyVerdict<((u16, u16), u64)> {
        let (as_raw, id_raw) = (slot >> 16, slot & 0xffff);
        if as_raw >= u32::from(self.nr()) || id_raw >= u32::from(self.cfg.user_slots) {
            return Err(Errno::EINVAL);
        }
        if first_page.is_some_and(|f| f % 64 != 0) {
            return Err(Errno::EINVAL);
        }
        let key = (u16::try_from(as_raw).unwrap(), u16::try_from(id_raw).unwrap());
        match (self.by_id(key.0, key.1), self.bitmaps.contains_key(&key)) {
            (Some(s), true) => Ok((key, s.npages)),
            _ => Err(Errno::ENOENT),
        }
    }

    /// `KVM_GET_DIRTY_LOG` into a buffer of `out_words`: the bitmap's words
    /// (taken and cleared unless manual protect is on), or EFAULT if short.
    fn get_dirty_log(&mut self, slot: u32, out_words: usize) -> DirtyVerdict<Vec<u64>> {
        let (key, _) = self.dirty_slot(slot, None)?;
        let manual = self.manual & 1 != 0;
        let b = self.bitmaps.get_mut(&key).unwrap();
        if out_words < b.len() {
            return Err(Errno::EFAULT);
        }
        let words = b.clone();
        if !manual {
            b.iter_mut().for_each(|w| *w = 0);
        }
        Ok(words)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: the number of bits cleared.
    fn clear_dirty_log(&mut self, slot: u32, first_page: u64, num_pages: u32, mask: &[u64]) -> DirtyVerdict<u64> {
        let (key, npages) = self.dirty_slot(slot, Some(first_page))?;
        let num = u64::from(num_pages);
        if first_page > npages || num > npages - first_page || (num < npages - first_page && num % 64 != 0) {
            return Err(Errno::EINVAL);
        }
        if (mask.len() as u64) < num.div_ceil(64) {
            return Err(Errno::EFAULT);
        }
        let b = self.bitmaps.get_mut(&key).unwrap();
        let mut cleared = 0;
        for j in 0..num {
            let (mw, mb) = (usize::try_from(j / 64).unwrap(), j % 64);
            if mask[mw] >> mb & 1 == 0 {
                continue;
            }
            let p = first_page + j;
            let w = &mut b[usize::try_from(p / 64).unwrap()];
            if *w >> (p % 64) & 1 != 0 {
                *w &= !(1 << (p % 64));
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Marks page `rel` of slot `(as_id, id)`: whether it was recorded.
    fn mark_rel(&mut self, as_id: u16, id: u16, rel: u64) -> bool {
        let Some(s) = self.by_id(as_id, id) else { return false };
        match self.bitmaps.get_mut(&(as_id, id)) {
            Some(b) if rel < s.npages => {
                b[usize::try_from(rel / 64).unwrap()] |= 1 << (rel % 64);
                true
            }
            _ => false,
        }
    }

    /// `mark_page_dirty(as_id, gfn)`: whether it was recorded.
    fn mark_gfn(&mut self, as_id: u16, gfn: u64) -> bool {
        match self.by_gfn(as_id, gfn) {
            Some(s) => self.mark_rel(as_id, s.id, gfn - s.base_gfn),
            None => false,
        }
    }
}

// ---------------------------------------------------------------------------
// Operation generation
// ---------------------------------------------------------------------------

/// What a generated sequence looks like.
#[derive(Clone, Copy, Debug)]
struct Profile {
    cfg: Config,
    /// Dense slot id pool `0..ids`.
    ids: u16,
    /// Dense gpa pool: `k * gpa_step` for `k < gpa_slots`.
    gpa_slots: u64,
    gpa_step: u64,
    /// Dense sizes: 1..=max_pages pages.
    max_pages: u64,
    /// Dense hva pool: `HVA_BASE + k * HVA_STEP` for `k < hva_slots`.
    hva_slots: u64,
    /// Weight of dense values against odd ones (always 1 per odd class).
    dense: u32,
    /// Weight of "fresh" requests against re-uses of an existing slot.
    fresh: u32,
    reuse: u32,
    /// Run the full comparison every this many operations.
    full_every: usize,
    /// Weight (against 16) of making the arch prepare hook fail, if reached.
    inject: u32,
}

impl Profile {
    /// The brief's profile: 16 user slots, so ids are reused all the time.
    fn small(nr: u16) -> Self {
        Profile {
            cfg: Config::x86_64().with_address_spaces(nr).with_user_slots(16),
            ids: 6,
            gpa_slots: 16,
            gpa_step: 0x4000,
            max_pages: 6,
            hva_slots: 8,
            dense: 12,
            fresh: 1,
            reuse: 1,
            full_every: 1,
            inject: 0,
        }
    }

    /// Hundreds of slots per address space: exercises the gfn index's block
    /// splits and merges (64 entries per block) and the hva tree's rebalancing
    /// and repacking.
    fn many() -> Self {
        Profile {
            cfg: Config::x86_64().with_address_spaces(2).with_user_slots(600),
            ids: 500,
            gpa_slots: 4096,
            gpa_step: 0x2000,
            max_pages: 3,
            hva_slots: 64,
            dense: 200,
            fresh: 3,
            reuse: 2,
            full_every: 40,
            inject: 0,
        }
    }

    /// `small` with prepare failures injected (for the recording hooks).
    fn injecting(nr: u16) -> Self {
        Profile { inject: 3, ..Profile::small(nr) }
    }

    fn max_gfn(&self) -> u64 {
        self.cfg.max_gfn
    }
}

/// How a re-use changes the picked slot's flags.
#[derive(Clone, Copy, Debug)]
enum FlagsMod {
    Same,
    /// XOR with these bits (LOG_DIRTY_PAGES: a FLAGS_ONLY change; READONLY: refused).
    Toggle(u32),
    Set(u32),
}

/// A request, either drawn directly or derived from an existing (or earlier) slot.
#[derive(Clone, Debug)]
enum Op {
    Fresh(UserMemoryRegion),
    Reuse {
        /// Which candidate (modulo their number).
        pick: usize,
        /// `None`: the picked slot's own `slot` field.
        slot: Option<u32>,
        /// `None`: the picked slot's gpa.
        gpa: Option<u64>,
        /// The picked slot's flags, changed.
        flags: FlagsMod,
        /// `None`: the picked slot's size; `Some(0)` deletes.
        size: Option<u64>,
        /// `None`: the picked slot's hva.
        hva: Option<u64>,
    },
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    inject: Option<Errno>,
}

/// Slots created earlier (possibly deleted since), re-used by `Op::Reuse`.
#[derive(Debug, Default)]
struct History(Vec<MSlot>);

impl History {
    fn record(&mut self, s: MSlot) {
        if self.0.len() >= 64 {
            self.0.remove(0);
        }
        self.0.push(s);
    }
}

/// Turns an op into a concrete request against the model's current state.
fn resolve(op: &Op, model: &Model, history: &History) -> UserMemoryRegion {
    let mut r = match op {
        Op::Fresh(r) => *r,
        Op::Reuse { pick, slot, gpa, flags, size, hva } => {
            let cands: Vec<MSlot> = model.all().copied().chain(history.0.iter().copied()).collect();
            let c = if cands.is_empty() {
                MSlot { as_id: 0, id: 0, base_gfn: 0, npages: 1, hva: HVA_BASE, flags: 0 }
            } else {
                cands[pick % cands.len()]
            };
            UserMemoryRegion::new(
                slot.unwrap_or_else(|| c.raw()),
                match *flags {
                    FlagsMod::Same => c.flags,
                    FlagsMod::Toggle(x) => c.flags ^ x,
                    FlagsMod::Set(x) => x,
                },
                gpa.unwrap_or(c.base_gfn * PAGE),
                size.unwrap_or(c.npages * PAGE),
                hva.unwrap_or(c.hva),
            )
        }
    };
    if r.memory_size > BIG {
        r.flags &= !LOG;
    }
    r
}

// ---------------------------------------------------------------------------
// Arch hooks: NoArch, and a recorder that checks the update protocol
// ---------------------------------------------------------------------------

/// Arch data tags the test expects per slot (`(as_id, id)` -> tag; 0 if absent).
type Tags = BTreeMap<(u16, u16), u64>;

/// A slot's new arch tag, or `None` if it was deleted.
type TagUpdate = ((u16, u16), Option<u64>);

/// A hook call, with the slots as the model describes them and their arch tags.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// `memslots_updated`: a publish.
    Updated { as_id: u16, gen: u64 },
    /// `flush_shadow_memslot` with the (INVALID) slot and its arch tag.
    Flush { slot: MSlot, arch: u64 },
    /// `prepare_memory_region`: the old slot with its tag, the draft, the
    /// draft's arch data as given and as the hook left it.
    Prepare { change: MemoryChange, old: Option<(MSlot, u64)>, new: Option<MSlot>, arch_in: u64, arch_out: u64 },
    /// `commit_memory_region`.
    Commit { change: MemoryChange, old: Option<(MSlot, u64)>, new: Option<(MSlot, u64)> },
    /// `unmap_gfn_range`.
    Unmap { slot: MSlot, start: u64, end: u64 },
}

/// What the tests need from the hooks a VM runs with.
trait Harness: ArchHooks {
    /// Make the next prepare fail with `fail` (or not).
    fn arm(&self, fail: Option<Errno>) {
        let _ = fail;
    }
    /// The hook calls since the last call; `None` if not recording.
    fn take_events(&self) -> Option<Vec<Event>> {
        None
    }
    /// The tag in a slot's arch data (0 when there is none).
    fn tag(data: &Self::SlotData) -> u64 {
        let _ = data;
        0
    }
}

impl Harness for NoArch {}

/// Records every hook call; tags the arch data of every CREATEd or MOVEd
/// slot with a fresh number; fails prepare when armed.
#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    fail: Mutex<Option<Errno>>,
    next_tag: AtomicU64,
}

impl Recorder {
    fn push(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

fn tagged(s: &MemorySlot<u64>) -> (MSlot, u64) {
    (MSlot::of(s.desc()), *s.arch())
}

impl ArchHooks for Recorder {
    type SlotData = u64;

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        old: Option<&MemorySlot<u64>>,
        new: Option<&mut SlotDraft<u64>>,
    ) -> Result<(), Errno> {
        let (new_desc, arch_in, arch_out) = match new {
            Some(d) => {
                let arch_in = d.arch;
                if matches!(change, MemoryChange::Create | MemoryChange::Move) {
                    d.arch = self.next_tag.fetch_add(1, Ordering::Relaxed) + 1;
                }
                (Some(MSlot::of(&d.desc)), arch_in, d.arch)
            }
            None => (None, 0, 0),
        };
        self.push(Event::Prepare { change, old: old.map(tagged), new: new_desc, arch_in, arch_out });
        match self.fail.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn commit_memory_region(&self, change: MemoryChange, old: Option<&MemorySlot<u64>>, new: Option<&MemorySlot<u64>>) {
        self.push(Event::Commit { change, old: old.map(tagged), new: new.map(tagged) });
    }

    fn flush_shadow_memslot(&self, slot: &MemorySlot<u64>) {
        self.push(Event::Flush { slot: MSlot::of(slot.desc()), arch: *slot.arch() });
    }

    fn memslots_updated(&self, as_id: u16, generation: u64) {
        self.push(Event::Updated { as_id, gen: generation });
    }

    fn unmap_gfn_range(&self, slot: &MemorySlot<u64>, start: u64, end: u64) -> bool {
        self.push(Event::Unmap { slot: MSlot::of(slot.desc()), start, end });
        false
    }
}

impl Harness for Recorder {
    fn arm(&self, fail: Option<Errno>) {
        *self.fail.lock().unwrap() = fail;
    }
    fn take_events(&self) -> Option<Vec<Event>> {
        Some(std::mem::take(&mut *self.events.lock().unwrap()))
    }
    fn tag(data: &u64) -> u64 {
        *data
    }
}

/// The hook calls of one request against what KVM's `kvm_set_memslot` makes
/// for the change the model attempted; reports the resulting arch tag of the
/// slot, if it changed: `Some((as_id, id), Some(tag))`, or `None` as the tag of
/// a deleted slot.
fn check_events(
    step: usize,
    r: &UserMemoryRegion,
    model: &Model,
    gens_before: &[u64],
    tags: &Tags,
    events: Vec<Event>,
) -> Result<Option<TagUpdate>, TestCaseError> {
    let Some(at) = model.attempt else {
        prop_assert_eq!(events, vec![], "step {}: {:x?} made hook calls but changed nothing", step, r);
        return Ok(None);
    };
    let nr = u64::from(model.nr());
    let a = at.as_id;
    let mut gen = gens_before[usize::from(a)];
    let mut want = Vec::new();
    let mut publish = |want: &mut Vec<Event>| {
        gen += nr;
        want.push(Event::Updated { as_id: a, gen });
    };
    let tag_of = |s: &MSlot| tags.get(&(s.as_id, s.id)).copied().unwrap_or(0);
    let old = at.old.map(|o| (o, tag_of(&o)));
    let invalidates = matches!(at.change, MemoryChange::Delete | MemoryChange::Move);
    if invalidates {
        publish(&mut want);
        let (o, t) = old.unwrap();
        want.push(Event::Flush { slot: MSlot { flags: o.flags | KVM_MEMSLOT_INVALID, ..o }, arch: t });
    }
    if at.fail == Some(Fail::MaxGfn) {
        if invalidates {
            publish(&mut want);
        }
        prop_assert_eq!(events, want, "step {}: hook calls of {:x?} (refused: max gfn)", step, r);
        return Ok(None);
    }
    // The tag the hook gave a CREATEd / MOVEd slot: fresh, nonzero.
    let arch_in = match at.change {
        MemoryChange::FlagsOnly => old.unwrap().1,
        _ => 0,
    };
    let arch_out = match (at.change, events.iter().find(|e| matches!(e, Event::Prepare { .. }))) {
        (MemoryChange::Create | MemoryChange::Move, Some(Event::Prepare { arch_out, .. })) => {
            prop_assert!(
                *arch_out != 0 && tags.values().all(|t| t != arch_out),
                "step {}: tag {} reused",
                step,
                arch_out
            );
            *arch_out
        }
        _ => arch_in,
    };
    want.push(Event::Prepare { change: at.change, old, new: at.new, arch_in, arch_out });
    if at.fail == Some(Fail::Arch) {
        if invalidates {
            publish(&mut want);
        }
        prop_assert_eq!(events, want, "step {}: hook calls of {:x?} (prepare failed)", step, r);
        return Ok(None);
    }
    publish(&mut want);
    want.push(Event::Commit { change: at.change, old, new: at.new.map(|n| (n, arch_out)) });
    prop_assert_eq!(events, want, "step {}: hook calls of {:x?}", step, r);
    match (at.new, at.old) {
        (Some(n), _) => Ok(Some(((n.as_id, n.id), Some(arch_out)))),
        (None, Some(o)) => Ok(Some(((o.as_id, o.id), None))),
        (None, None) => Ok(None),
    }
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

fn verdict_errno(v: &Verdict) -> Result<Outcome, Errno> {
    v.map_err(Reject::errno)
}

fn compare_verdict(
    step: usize,
    r: &UserMemoryRegion,
    want: &Verdict,
    got: &Result<Outcome, Error>,
) -> Result<(), TestCaseError> {
    let got_errno = got.as_ref().map(|o| *o).map_err(Error::errno);
    prop_assert_eq!(got_errno, verdict_errno(want), "step {}: verdict of {:x?} (library: {:?})", step, r, got);
    if let (Err(e), Err(w)) = (got, want) {
        prop_assert_eq!(Reject::of(e), Some(*w), "step {}: error kind of {:x?} (library: {:?})", step, r, e);
    }
    Ok(())
}

/// Gfns worth probing: a dense prefix, every slot's boundaries, and extremes.
fn probe_gfns(model: &Model, p: &Profile) -> Vec<u64> {
    let dense_end = (p.gpa_slots * p.gpa_step) / PAGE + p.max_pages + 2;
    // The many-slots profile probes a sample (its model is slow on purpose).
    let (stride, slot_stride) = if p.full_every == 1 { (1, 1) } else { (61, 5) };
    let mut v: BTreeSet<u64> = (0..=dense_end).step_by(stride).collect();
    let mg = p.max_gfn();
    v.extend([mg - 1, mg, mg + 1, 1 << 36, 1 << 51, (1 << 52) - 1, u64::MAX - 1, u64::MAX]);
    for s in model.all().step_by(slot_stride) {
        v.extend([s.base_gfn.wrapping_sub(1), s.base_gfn, s.base_gfn + s.npages / 2, s.last_gfn(), s.last_gfn() + 1]);
    }
    v.into_iter().collect()
}

/// Host addresses worth probing.
fn probe_hvas(model: &Model, p: &Profile) -> Vec<u64> {
    let mut v: BTreeSet<u64> = [0, HVA_BASE - 1, u64::MAX, p.cfg.user_addr_limit].into_iter().collect();
    for s in model.all() {
        v.extend([s.hva.wrapping_sub(1), s.hva, s.hva + 0x1000, s.hva_last(), s.hva_last().wrapping_add(1)]);
    }
    v.into_iter().collect()
}

fn check_slot_desc<D>(s: &MemorySlot<D>, as_id: u16) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.as_id, as_id);
    prop_assert_eq!(s.flags & KVM_MEMSLOT_INVALID, 0, "INVALID slot visible after the update: {:?}", s.desc());
    prop_assert!(s.guest_memfd.is_none());
    prop_assert!(s.npages > 0);
    match s.dirty_bitmap() {
        Some(b) => {
            prop_assert!(s.logs_dirty_pages(), "bitmap without LOG_DIRTY_PAGES: {:?}", s.desc());
            prop_assert_eq!(b.npages(), s.npages);
        }
        None => prop_assert!(!s.logs_dirty_pages(), "LOG_DIRTY_PAGES without bitmap: {:?}", s.desc()),
    }
    Ok(())
}

type Desc = Option<MSlot>;

fn desc<D>(s: Option<&MemorySlot<D>>) -> Desc {
    s.map(|s| MSlot::of(s.desc()))
}

/// Address spaces to probe: the existing ones plus two that do not exist.
fn probe_spaces(model: &Model) -> impl Iterator<Item = u16> {
    0..model.nr() + 2
}

/// Cheap checks made after every operation.
fn check_counters<H: Harness>(vm: &Vm<H>, model: &Model, step: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(vm.nr_memslot_pages(), model.total_pages(), "step {}: nr_memslot_pages", step);
    for a in 0..model.nr() {
        let g = vm.generation(a);
        prop_assert_eq!(g, Some(model.gens[usize::from(a)]), "step {}: generation of address space {}", step, a);
        prop_assert_eq!(g.unwrap_or(0) & GEN_UPDATE_IN_PROGRESS, 0);
    }
    for a in [model.nr(), model.nr() + 1, u16::MAX] {
        prop_assert_eq!(vm.generation(a), None);
    }
    let g = vm.read();
    for a in probe_spaces(model) {
        prop_assert_eq!(g.len(a), model.space(a).len(), "step {}: len({})", step, a);
        prop_assert_eq!(g.is_empty(a), model.space(a).is_empty());
    }
    Ok(())
}

/// Every slot's dirty bitmap, bit by bit (without harvesting), against the model.
#[allow(dead_code)]
fn check_dirty<H: Harness>(vm: &Vm<H>, model: &Model, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(vm.manual_dirty_log_protect(), model.manual & 1 != 0, "{}: manual_dirty_log_protect", what);
    let g = vm.read();
    let mut seen = 0usize;
    for a in 0..model.nr() {
        for s in g.slots(a) {
            let key = (a, s.id);
            let want = model.bitmaps.get(&key);
            let got = s.dirty_bitmap();
            prop_assert_eq!(got.is_some(), want.is_some(), "{}: bitmap presence of {:?}", what, s.desc());
            let (Some(b), Some(w)) = (got, want) else { continue };
            seen += 1;
            prop_assert_eq!(b.npages(), s.npages);
            prop_assert_eq!(b.len_words(), w.len());
            let mut any = false;
            for p in 0..s.npages {
                let bit = w[usize::try_from(p / 64).unwrap()] >> (p % 64) & 1 != 0;
                any |= bit;
                prop_assert_eq!(b.test(p), bit, "{}: bit {} of slot {:?}", what, p, s.desc());
            }
            prop_assert!(!b.test(s.npages), "{}: bit past the end of {:?}", what, s.desc());
            if any {
                prop_assert!(b.maybe_dirty(), "{}: dirty bits but no hint in {:?}", what, s.desc());
            }
        }
    }
    prop_assert_eq!(seen, model.bitmaps.len(), "{}: bitmaps of slots the library does not have", what);
    Ok(())
}

/// A vCPU's lookups at `gfns` (in its current address space) against the model.
fn check_vcpu<H: Harness>(vcpu: &Vcpu<'_, H>, model: &Model, gfns: &[u64], what: &str) -> Result<(), TestCaseError> {
    let a = vcpu.address_space();
    for &gfn in gfns {
        prop_assert_eq!(vcpu.gfn_to_hva(gfn), model.hva(a, gfn), "{}: vcpu(as {}).gfn_to_hva({:#x})", what, a, gfn);
        prop_assert_eq!(
            vcpu.gfn_to_hva_prot(gfn),
            model.hva_prot(a, gfn),
            "{}: vcpu(as {}).gfn_to_hva_prot({:#x})",
            what,
            a,
            gfn
        );
        let g = vcpu.read();
        prop_assert_eq!(
            desc(g.gfn_to_memslot(gfn)),
            model.by_gfn(a, gfn),
            "{}: vcpu(as {}).gfn_to_memslot({:#x})",
            what,
            a,
            gfn
        );
        // A hit from the cache just filled must agree too.
        prop_assert_eq!(desc(g.gfn_to_memslot(gfn)), model.by_gfn(a, gfn));
        for write in [false, true] {
            prop_assert_eq!(
                g.gfn_to_hva_many(gfn, write),
                model.hva_many(a, gfn, write),
                "{}: vcpu(as {}).gfn_to_hva_many({:#x}, {})",
                what,
                a,
                gfn,
                write
            );
        }
        prop_assert_eq!(
            vcpu.gfn_to_hva(gfn),
            model.hva(a, gfn),
            "{}: vcpu(as {}) cached gfn_to_hva({:#x})",
            what,
            a,
            gfn
        );
        for b in probe_spaces(model) {
            prop_assert_eq!(desc(g.gfn_to_memslot_in(b, gfn)), model.by_gfn(b, gfn));
        }
    }
    Ok(())
}

/// VM-wide lookups at a few gfns, made right after an update (the set's
/// last-used cache was primed at these gfns before it).
fn check_vm_at<H: Harness>(vm: &Vm<H>, model: &Model, gfns: &[u64], what: &str) -> Result<(), TestCaseError> {
    let g = vm.read();
    for a in probe_spaces(model) {
        for &gfn in gfns {
            prop_assert_eq!(
                desc(g.gfn_to_memslot(a, gfn)),
                model.by_gfn(a, gfn),
                "{}: gfn_to_memslot({}, {:#x})",
                what,
                a,
                gfn
            );
            prop_assert_eq!(g.gfn_to_hva(a, gfn), model.hva(a, gfn), "{}: gfn_to_hva({}, {:#x})", what, a, gfn);
        }
    }
    Ok(())
}

/// Everything, over dense probes.
#[allow(clippy::too_many_arguments)] // the VM, the model, and every reader handle
fn check_all<H: Harness>(
    vm: &Vm<H>,
    model: &Model,
    tags: &Tags,
    vcpus: &[Vcpu<'_, H>],
    roaming: &Vcpu<'_, H>,
    reader: &Reader<'_, H>,
    p: &Profile,
    step: usize,
) -> Result<(), TestCaseError> {
    check_counters(vm, model, step)?;
    let gfns = probe_gfns(model, p);
    let hvas = probe_hvas(model, p);
    let total: usize = model.spaces.iter().map(Vec::len).sum();
    prop_assert_eq!(vm.memory_usage().slots, total);
    {
        let g = vm.read();
        for a in probe_spaces(model) {
            let ctx = |what: &str, x: u64| format!("step {step}: {what}(as {a}, {x:#x})");
            let sorted = model.sorted(a);
            let got: Vec<MSlot> = g.slots(a).map(|s| MSlot::of(s.desc())).collect();
            prop_assert_eq!(&got, &sorted, "step {}: slots({})", step, a);
            for s in g.slots(a) {
                check_slot_desc(s, a)?;
                let want = tags.get(&(a, s.id)).copied().unwrap_or(0);
                prop_assert_eq!(H::tag(s.arch()), want, "step {}: arch data of slot {:?}", step, s.desc());
            }
            // Ids: all user ids of the small profiles, a stride of the many-slots one.
            let id_end = p.cfg.mem_slots_num.max(p.ids) + 2;
            let id_step = if p.full_every == 1 { 1 } else { 7 };
            let ids = (0..id_end).step_by(id_step).chain(sorted.iter().map(|s| s.id)).chain([0xffff]);
            for id in ids {
                prop_assert_eq!(
                    desc(g.id_to_memslot(a, id)),
                    model.by_id(a, id),
                    "{}",
                    ctx("id_to_memslot", id.into())
                );
            }
            for &gfn in &gfns {
                prop_assert_eq!(desc(g.gfn_to_memslot(a, gfn)), model.by_gfn(a, gfn), "{}", ctx("gfn_to_memslot", gfn));
                prop_assert_eq!(g.gfn_to_hva(a, gfn), model.hva(a, gfn), "{}", ctx("gfn_to_hva", gfn));
                prop_assert_eq!(g.gfn_to_hva_prot(a, gfn), model.hva_prot(a, gfn), "{}", ctx("gfn_to_hva_prot", gfn));
                for write in [false, true] {
                    prop_assert_eq!(
                        g.gfn_to_hva_many(a, gfn, write),
                        model.hva_many(a, gfn, write),
                        "{} write={}",
                        ctx("gfn_to_hva_many", gfn),
                        write
                    );
                }
                prop_assert_eq!(desc(g.gfn_to_memslot_approx(a, gfn)), model.approx(a, gfn), "{}", ctx("approx", gfn));
                // Empty and inverted ranges too: KVM's kvm_memslot_iter_start
                // yields the slot containing `start` if it begins below `end`.
                let ends = [1u64, 4, 64, u64::MAX].map(|len| gfn.saturating_add(len));
                for end in ends.into_iter().chain([gfn, gfn.saturating_sub(1), gfn / 2]) {
                    {
                        let got: Vec<MSlot> = g.slots_in_gfn_range(a, gfn, end).map(|s| MSlot::of(s.desc())).collect();
                        prop_assert_eq!(
                            got,
                            model.in_gfn_range(a, gfn, end),
                            "{} end={:#x}",
                            ctx("slots_in_gfn_range", gfn),
                            end
                        );
                    }
                }
            }
            let got: Vec<MSlot> = g.slots_in_gfn_range(a, 0, u64::MAX).map(|s| MSlot::of(s.desc())).collect();
            prop_assert_eq!(got, sorted);
        }
        // Host address ranges, over all address spaces.
        for &start in &hvas {
            for len in [0u64, 0xfff, 0x1fff, 0x10000, u64::MAX] {
                let last = start.saturating_add(len);
                let got: Vec<MSlot> = g.slots_in_hva_range(start, last).map(|s| MSlot::of(s.desc())).collect();
                // Address spaces ascending, hvas ascending within each.
                for w in got.windows(2) {
                    prop_assert!(
                        (w[0].as_id, w[0].hva) <= (w[1].as_id, w[1].hva),
                        "step {}: slots_in_hva_range({:#x}, {:#x}) order: {:x?}",
                        step,
                        start,
                        last,
                        got
                    );
                }
                let mut per_as: Vec<Vec<MSlot>> = vec![Vec::new(); usize::from(model.nr())];
                for s in &got {
                    per_as[usize::from(s.as_id)].push(*s);
                }
                for v in &mut per_as {
                    v.sort();
                }
                prop_assert_eq!(
                    per_as,
                    model.in_hva_range(start, last),
                    "step {}: slots_in_hva_range({:#x}, {:#x})",
                    step,
                    start,
                    last
                );
            }
        }
    }
    // MMU-notifier invalidation reports one gfn range per intersecting slot.
    let _ = vm.hooks().take_events();
    for &start in hvas.iter().step_by(3) {
        for len in [0x1000u64, 0x3000, 0x2800] {
            let end = start.saturating_add(len);
            let hit: Vec<MSlot> = model.in_hva_range(start, end - 1).into_iter().flatten().collect();
            prop_assert_eq!(vm.invalidate_hva_range(start, end), (hit.len(), false));
            if let Some(events) = vm.hooks().take_events() {
                let mut got: Vec<(MSlot, u64, u64)> = Vec::new();
                for e in events {
                    let Event::Unmap { slot, start, end } = e else {
                        return Err(TestCaseError::fail(format!("step {step}: unexpected hook call {e:?}")));
                    };
                    got.push((slot, start, end));
                }
                let mut want: Vec<(MSlot, u64, u64)> = hit
                    .iter()
                    .map(|s| {
                        let (lo, hi) = (start.max(s.hva), end.min(s.hva + s.npages * PAGE));
                        (*s, s.base_gfn + (lo - s.hva) / PAGE, s.base_gfn + (hi - s.hva).div_ceil(PAGE))
                    })
                    .collect();
                got.sort_unstable();
                want.sort_unstable();
                prop_assert_eq!(got, want, "step {}: invalidate_hva_range({:#x}, {:#x})", step, start, end);
            }
        }
    }
    prop_assert_eq!(vm.invalidate_hva_range(5, 5), (0, false));
    // Convenience wrappers, a persistent Reader, and the vCPUs.
    let rg = reader.read();
    for a in probe_spaces(model) {
        for &gfn in gfns.iter().step_by(3) {
            prop_assert_eq!(vm.gfn_to_hva(a, gfn), model.hva(a, gfn));
            prop_assert_eq!(vm.gfn_to_hva_prot(a, gfn), model.hva_prot(a, gfn));
            prop_assert_eq!(vm.gfn_to_slot_desc(a, gfn).map(|d| MSlot::of(&d)), model.by_gfn(a, gfn));
            prop_assert_eq!(desc(rg.gfn_to_memslot(a, gfn)), model.by_gfn(a, gfn));
        }
        for s in model.space(a) {
            prop_assert_eq!(vm.id_to_slot_desc(a, s.id).map(|d| MSlot::of(&d)), Some(*s));
        }
    }
    drop(rg);
    let what = format!("step {step}");
    for v in vcpus {
        check_vcpu(v, model, &gfns, &what)?;
    }
    check_vcpu(roaming, model, &gfns, &what)
}

/// Fills the caches (each vCPU's and each set's last-used slot) with the
/// slots an update is about to touch, so a stale cache shows after it.
fn prime<H: Harness>(
    vm: &Vm<H>,
    model: &Model,
    vcpus: &[Vcpu<'_, H>],
    roaming: &Vcpu<'_, H>,
    r: &UserMemoryRegion,
) -> Vec<u64> {
    let mut gfns = vec![r.guest_phys_addr / PAGE];
    let as_raw = r.slot >> 16;
    if let Ok(a) = u16::try_from(as_raw) {
        if let Some(s) = model.by_id(a, u16::try_from(r.slot & 0xffff).unwrap()) {
            gfns.extend([s.base_gfn, s.last_gfn()]);
        }
    }
    gfns.sort_unstable();
    gfns.dedup();
    for v in vcpus.iter().chain([roaming]) {
        for &gfn in &gfns {
            let _ = v.gfn_to_hva(gfn);
            let _ = v.read().gfn_to_memslot(gfn);
        }
    }
    let g = vm.read();
    for a in 0..model.nr() {
        for &gfn in &gfns {
            let _ = g.gfn_to_memslot(a, gfn);
        }
    }
    gfns
}

/// One vCPU per address space, each switched to its own (as `run` and the
/// fuzz target keep them).
fn vcpu_per_address_space<H: Harness>(vm: &Vm<H>) -> Vec<Vcpu<'_, H>> {
    (0..vm.nr_address_spaces())
        .map(|a| {
            let mut v = vm.vcpu();
            v.set_address_space(a).unwrap();
            v
        })
        .collect()
}

/// What a run carries from step to step besides the VM.
struct RunState<'a> {
    model: &'a mut Model,
    history: &'a mut History,
    tags: &'a mut Tags,
}

/// One `KVM_SET_USER_MEMORY_REGION` step of a run (`run` and the fuzz
/// target): the request applied to the model and the VM (with `inject`
/// failing the hook's prepare), verdicts and hook events compared, then every
/// vCPU's cache (`vcpus`, `pool`, and `roaming` in two address spaces) and the
/// VM's lookups at the gfns the step touched, before other lookups refill them.
#[allow(clippy::too_many_arguments)]
fn region_step<H: Harness>(
    vm: &Vm<H>,
    st: &mut RunState<'_>,
    vcpus: &[Vcpu<'_, H>],
    pool: &[Vcpu<'_, H>],
    roaming: &mut Vcpu<'_, H>,
    step: usize,
    op: &Op,
    inject: Option<Errno>,
) -> Result<(), TestCaseError> {
    let nr = vm.nr_address_spaces();
    let r = resolve(op, st.model, st.history);
    let roam = u16::try_from(step % usize::from(nr)).unwrap();
    roaming.set_address_space(roam).unwrap();
    let primed = prime(vm, st.model, vcpus, roaming, &r);

    let gens_before = st.model.gens.clone();
    let want = st.model.apply_with(&r, inject);
    let _ = vm.hooks().take_events();
    vm.hooks().arm(inject);
    let got = vm.set_user_memory_region(&r);
    vm.hooks().arm(None);
    compare_verdict(step, &r, &want, &got)?;
    if let Some(events) = vm.hooks().take_events() {
        match check_events(step, &r, st.model, &gens_before, st.tags, events)? {
            Some((key, Some(tag))) => {
                st.tags.insert(key, tag);
            }
            Some((key, None)) => {
                st.tags.remove(&key);
            }
            None => {}
        }
    }
    if let Ok(Outcome::Changed(MemoryChange::Create | MemoryChange::Move | MemoryChange::FlagsOnly)) = want {
        let sid = memslots::SlotId::from_raw(r.slot);
        st.history.record(st.model.by_id(sid.as_id, sid.id).unwrap());
    }

    // Caches first, before other lookups refill them.
    let what = format!("step {step} after {r:x?} ({want:?})");
    for v in vcpus.iter().chain(pool) {
        check_vcpu(v, st.model, &primed, &what)?;
    }
    check_vm_at(vm, st.model, &primed, &what)?;
    check_vcpu(roaming, st.model, &primed, &what)?;
    roaming.set_address_space((roam + 1) % nr).unwrap();
    check_vcpu(roaming, st.model, &primed, &what)?;
    check_counters(vm, st.model, step)
}

/// Applies `ops` to a fresh VM and to the model, comparing as it goes.
fn run<H: Harness>(p: &Profile, ops: &[Step], hooks: H) -> Result<(), TestCaseError> {
    let vm = Vm::with_hooks(p.cfg, hooks).unwrap();
    let mut model = Model::new(p.cfg);
    let mut history = History::default();
    let mut tags = Tags::new();
    let nr = p.cfg.nr_address_spaces;
    let vcpus = vcpu_per_address_space(&vm);
    let mut roaming = vm.vcpu();
    prop_assert_eq!(roaming.set_address_space(nr).map_err(|e| e.errno()), Err(Errno::EINVAL));
    prop_assert_eq!(roaming.address_space(), 0);
    let reader = vm.reader();
    check_all(&vm, &model, &tags, &vcpus, &roaming, &reader, p, 0)?;
    for (step, Step { op, inject }) in ops.iter().enumerate() {
        let step = step + 1;
        let mut state = RunState { model: &mut model, history: &mut history, tags: &mut tags };
        region_step(&vm, &mut state, &vcpus, &[], &mut roaming, step, op, *inject)?;
        if step % p.full_every == 0 || step == ops.len() {
            check_all(&vm, &model, &tags, &vcpus, &roaming, &reader, p, step)?;
        }
    }
    Ok(())
}
