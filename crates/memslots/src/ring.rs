//! Per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`).
//!
//! Each vCPU pushes `{flags, slot, offset}` entries ([`DirtyGfn`], KVM's
//! `struct kvm_dirty_gfn`) for the pages it dirties. Entry states, as in KVM:
//!
//! ```text
//!   empty (flags 0) --push (vCPU)--> dirty (DIRTY) --harvest--> collected (RESET) --reset--> empty
//! ```
//!
//! The vCPU is the only producer of its ring; harvesting and resetting are
//! serialised by the VM. When the ring holds `size - reserved` entries not yet
//! reset, the push reports *soft full*: the vCPU must exit to userspace
//! (`KVM_EXIT_DIRTY_RING_FULL`) so the VMM harvests and resets. A push into a
//! ring with no free entry records nothing and says so: a write is never
//! silently lost.

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `KVM_DIRTY_RING_MAX_ENTRIES`.
pub const KVM_DIRTY_RING_MAX_ENTRIES: u64 = 65536;
/// `KVM_DIRTY_RING_RSVD_ENTRIES` (x86 without PML adds nothing to it).
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;
/// Bytes of one entry (`sizeof(struct kvm_dirty_gfn)`).
pub const DIRTY_GFN_SIZE: u64 = 16;

/// One ring entry, laid out as KVM's `struct kvm_dirty_gfn`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DirtyGfn {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// What marking a page did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use = "a RingFull mark was not recorded; a soft-full ring must be harvested before the vCPU runs on"]
pub enum DirtyMark {
    /// Recorded (a bitmap bit, or a ring entry).
    Marked,
    /// Recorded in the vCPU's ring, which reached its soft limit: the vCPU
    /// must exit to userspace (`KVM_EXIT_DIRTY_RING_FULL`) for a harvest and
    /// reset before it runs on.
    RingSoftFull,
    /// Not recorded: the ring has no free entry. Harvest and reset, then mark again.
    RingFull,
    /// Nothing to record: no slot covers the page, or it does not log dirty pages.
    NotLogged,
}

/// A dirty page harvested from a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingEntry {
    /// The slot field, `as_id << 16 | id`.
    pub slot: u32,
    /// Page offset inside the slot.
    pub offset: u64,
}

/// One vCPU's dirty ring.
#[derive(Debug)]
pub struct DirtyRing {
    entries: Box<[DirtyGfn]>,
    /// Entries pushed so far (producer: the vCPU).
    dirty_index: AtomicU32,
    /// Entries reset so far (`KVM_RESET_DIRTY_RINGS`).
    reset_index: AtomicU32,
    /// Entries collected so far (the harvester's cursor, userspace state in KVM).
    fetch_index: AtomicU32,
    soft_limit: u32,
    vcpu_id: u32,
}

impl DirtyRing {
    /// A ring of `entries` (a power of two) with `reserved` entries kept back for the soft limit.
    pub(crate) fn new(entries: u32, reserved: u32, vcpu_id: u32) -> Self {
        let v: Vec<DirtyGfn> = (0..entries).map(|_| DirtyGfn::default()).collect();
        DirtyRing {
            entries: v.into_boxed_slice(),
            dirty_index: AtomicU32::new(0),
            reset_index: AtomicU32::new(0),
            fetch_index: AtomicU32::new(0),
            soft_limit: entries.saturating_sub(reserved),
            vcpu_id,
        }
    }

    /// The vCPU this ring belongs to (in creation order).
    pub fn vcpu_id(&self) -> u32 {
        self.vcpu_id
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        u32::try_from(self.entries.len()).unwrap_or(u32::MAX)
    }

    /// Entries pushed and not yet reset.
    pub fn used(&self) -> u32 {
        self.dirty_index.load(Ordering::Acquire).wrapping_sub(self.reset_index.load(Ordering::Acquire))
    }

    /// Whether the vCPU must exit for a harvest (KVM's `kvm_dirty_ring_soft_full`).
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    #[inline]
    fn entry(&self, index: u32) -> &DirtyGfn {
        // The length is a power of two that fits in u32.
        let mask = self.entries.len() - 1;
        &self.entries[usize::try_from(index).unwrap_or(0) & mask]
    }

    /// Pushes a dirty page (KVM's `kvm_dirty_ring_push`). Only the owning vCPU calls this.
    #[inline]
    pub(crate) fn push(&self, slot: u32, offset: u64) -> DirtyMark {
        let dirty = self.dirty_index.load(Ordering::Relaxed);
        // Acquire: the reset that freed the entry wrote its flags before advancing.
        let used = dirty.wrapping_sub(self.reset_index.load(Ordering::Acquire));
        if used >= self.size() {
            return DirtyMark::RingFull;
        }
        let e = self.entry(dirty);
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Publish the entry: a harvester that sees DIRTY sees slot and offset.
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index.store(dirty.wrapping_add(1), Ordering::Release);
        if used + 1 >= self.soft_limit {
            DirtyMark::RingSoftFull
        } else {
            DirtyMark::Marked
        }
    }

    /// Collects dirty entries in order from the harvest cursor, marking each
    /// collected (`KVM_DIRTY_GFN_F_RESET`). Caller serialises harvests.
    pub(crate) fn harvest(&self, mut f: impl FnMut(RingEntry)) -> usize {
        let mut n = 0;
        let mut fetch = self.fetch_index.load(Ordering::Relaxed);
        loop {
            let e = self.entry(fetch);
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            f(RingEntry { slot: e.slot.load(Ordering::Relaxed), offset: e.offset.load(Ordering::Relaxed) });
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            fetch = fetch.wrapping_add(1);
            n += 1;
        }
        self.fetch_index.store(fetch, Ordering::Relaxed);
        n
    }

    /// Frees collected entries in order (KVM's `kvm_dirty_ring_reset`);
    /// returns how many. Caller serialises with harvests.
    pub(crate) fn reset(&self) -> u64 {
        let mut n = 0;
        let mut reset = self.reset_index.load(Ordering::Relaxed);
        loop {
            let e = self.entry(reset);
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            e.flags.store(0, Ordering::Relaxed);
            reset = reset.wrapping_add(1);
            n += 1;
            // Release: the producer may reuse the entry once it sees this.
            self.reset_index.store(reset, Ordering::Release);
        }
        n
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The dirty ring's producer (a vCPU) against harvest and reset (the
    //! VMM): every pushed entry is harvested exactly once, with the slot and
    //! offset it was pushed with, and a push into a full ring says so.
    use super::*;
    use crate::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_ring_push_vs_harvest_and_reset() {
        loom::model(|| {
            // Two entries, none reserved: the third push needs a reset first.
            let ring = Arc::new(DirtyRing::new(2, 0, 0));
            let producer = {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    let mut pushed = Vec::new();
                    for i in 0..3u64 {
                        match ring.push(7, 100 + i) {
                            DirtyMark::RingFull => {}
                            _ => pushed.push(100 + i),
                        }
                    }
                    pushed
                })
            };
            let mut got = Vec::new();
            for _ in 0..2 {
                ring.harvest(|e| {
                    assert_eq!(e.slot, 7, "torn entry");
                    got.push(e.offset);
                });
                ring.reset();
            }
            let pushed = producer.join().unwrap();
            ring.harvest(|e| got.push(e.offset));
            assert_eq!(got, pushed, "every pushed entry harvested once, in order");
            assert!(pushed.len() >= 2);
        });
    }
}
