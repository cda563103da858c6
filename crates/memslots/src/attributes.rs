//! Memory attributes (`KVM_SET_MEMORY_ATTRIBUTES`, Linux 6.18
//! `kvm_vm_ioctl_set_mem_attributes`): per-gfn attributes, VM-wide (not per
//! address space), today only `KVM_MEMORY_ATTRIBUTE_PRIVATE`, which says a
//! gfn's memory comes from the slot's guest_memfd rather than its host
//! mapping.
//!
//! The kernel keeps one xarray entry per page; the library keeps **ranges**
//! (`start gfn -> (end gfn, attributes)`, non-overlapping, adjacent equal
//! ranges merged, attribute 0 not stored), so setting 1 GiB costs a few
//! tree operations instead of 262,144 stores. The map follows the memslot
//! protocol: two copies, the change made on the inactive one, published,
//! a grace period, replayed; readers look attributes up inside their read
//! section without blocking.
//!
//! This host's KVM reports no `KVM_CAP_MEMORY_ATTRIBUTES` (no
//! `CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES` on its x86 default VMs), so this
//! module follows virt/kvm/kvm_main.c and is tested against a per-page
//! model, not against the kernel.

use crate::arch::ArchHooks;
use crate::error::Error;
use crate::lookup::ReadGuard;
use crate::vm::Vm;
use crate::{GuestMemfd, PAGE_SHIFT, PAGE_SIZE};
use alloc::collections::BTreeMap;

/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// `struct kvm_memory_attributes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoryAttributes {
    /// Guest physical address of the first byte (page aligned).
    pub address: u64,
    /// Bytes (page aligned, not 0).
    pub size: u64,
    /// The attributes the range gets (`KVM_MEMORY_ATTRIBUTE_*`; 0 clears).
    pub attributes: u64,
    /// Must be 0.
    pub flags: u64,
}

/// Attributes by gfn range: `start -> (end, attributes)`, attributes never
/// 0, ranges disjoint, and two adjacent ranges never carry equal attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AttrMap {
    ranges: BTreeMap<u64, (u64, u64)>,
}

impl AttrMap {
    /// `kvm_get_memory_attributes`: the attributes of `gfn` (0 if none).
    pub(crate) fn get(&self, gfn: u64) -> u64 {
        match self.ranges.range(..=gfn).next_back() {
            Some((_, &(end, a))) if gfn < end => a,
            _ => 0,
        }
    }

    /// Gives `[start, end)` the attributes `attrs` (0 clears), keeping the
    /// representation canonical. `start < end`.
    pub(crate) fn set(&mut self, start: u64, end: u64, attrs: u64) {
        // Cut out every range intersecting [start, end), keeping the parts
        // outside it.
        let first = match self.ranges.range(..start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        let cut: alloc::vec::Vec<(u64, (u64, u64))> = self.ranges.range(first..end).map(|(&s, &v)| (s, v)).collect();
        for &(s, (e, a)) in &cut {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, a));
            }
            if e > end {
                self.ranges.insert(end, (e, a));
            }
        }
        if attrs != 0 {
            self.ranges.insert(start, (end, attrs));
        }
        // Merge with equal neighbours, so the map stays canonical.
        self.merge_at(end);
        self.merge_at(start);
    }

    /// Merges the range starting at `at` into the one ending there, if their
    /// attributes are equal.
    fn merge_at(&mut self, at: u64) {
        let Some(&(right_end, right_a)) = self.ranges.get(&at) else { return };
        let Some((&left_start, &(left_end, left_a))) = self.ranges.range(..at).next_back() else { return };
        if left_end == at && left_a == right_a {
            self.ranges.remove(&at);
            self.ranges.insert(left_start, (right_end, left_a));
        }
    }

    /// `kvm_range_has_memory_attributes` with `mask` already limited to the
    /// supported attributes: whether every gfn of `[start, end)` has
    /// `attributes & mask == attrs`.
    pub(crate) fn has(&self, start: u64, end: u64, mask: u64, attrs: u64) -> bool {
        if attrs & !mask != 0 {
            return false;
        }
        if start >= end {
            return true;
        }
        let mut at = start;
        let first = match self.ranges.range(..=start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        for (&s, &(e, a)) in self.ranges.range(first..end) {
            let s = s.max(start);
            // A gap [at, s) has attributes 0.
            if s > at && attrs != 0 {
                return false;
            }
            if a & mask != attrs {
                return false;
            }
            at = e;
            if at >= end {
                return true;
            }
        }
        at >= end || attrs == 0
    }

    /// The ranges, in gfn order: `(start, end, attributes)`.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &(e, a))| (s, e, a))
    }

    /// Bytes of heap used (an estimate: one B-tree entry per range).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ranges.len() * (3 * core::mem::size_of::<u64>() + core::mem::size_of::<usize>())
    }
}

impl<H: ArchHooks> Vm<H> {
    /// `kvm_supported_mem_attributes`: `KVM_MEMORY_ATTRIBUTE_PRIVATE` on a
    /// VM with private memory ([`Config::private_mem`](crate::Config::private_mem)), else none.
    pub fn supported_memory_attributes(&self) -> u64 {
        if self.config.private_mem {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        }
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES`: gives every gfn of `[address, address +
    /// size)` the attributes `attributes` (0 clears them). The kernel's
    /// checks, in its order: flags must be 0, attributes must be supported,
    /// the range must be non-empty, not wrap and be page aligned (all
    /// `EINVAL`). Nothing changes if the whole range has the attributes
    /// already. Otherwise every layer drops what it derived from the gfns
    /// of slots in the range ([`ArchHooks::unmap_gfn_range`], as the
    /// kernel's `kvm_arch_pre_set_memory_attributes` zaps them), and the
    /// change is published. All or nothing: 6.18 reports no partial
    /// progress (it reserves every entry before storing any).
    pub fn set_memory_attributes(&self, a: &MemoryAttributes) -> Result<(), Error> {
        let refuse =
            |why| Err(Error::BadMemoryAttributes { address: a.address, size: a.size, attributes: a.attributes, why });
        if a.flags != 0 {
            return refuse("flags must be 0");
        }
        if a.attributes & !self.supported_memory_attributes() != 0 {
            return refuse("attributes not supported by this VM");
        }
        if a.size == 0 || a.address.checked_add(a.size).is_none() {
            return refuse("the range is empty or wraps");
        }
        if a.address & (PAGE_SIZE - 1) != 0 || a.size & (PAGE_SIZE - 1) != 0 {
            return refuse("the range is not page aligned");
        }
        let (start, end) = (a.address >> PAGE_SHIFT, (a.address + a.size) >> PAGE_SHIFT);
        let _w = self.lock_writer();
        // SAFETY: we hold the writer lock, so nobody changes the maps.
        if unsafe { self.attrs.with_active_writer(|m| m.has(start, end, !0, a.attributes)) } {
            return Ok(());
        }
        {
            let g = self.read();
            for as_id in 0..self.config.nr_address_spaces {
                for slot in g.slots_in_gfn_range(as_id, start, end) {
                    let (s, e) = (start.max(slot.base_gfn), end.min(slot.end_gfn()));
                    self.hooks.unmap_gfn_range(slot, s, e);
                }
            }
        }
        // SAFETY: we hold the writer lock; every swap waits for a grace
        // period, so the inactive map has no readers when it is changed.
        unsafe {
            self.attrs.with_inactive_mut(|m| m.set(start, end, a.attributes));
            self.attrs.swap_then(&self.srcu, || {}, |_| {});
            self.attrs.with_inactive_mut(|m| m.set(start, end, a.attributes));
        }
        Ok(())
    }

    /// The attribute ranges in force, in gfn order: `(start gfn, end gfn,
    /// attributes)` (gfns without attributes are not listed).
    pub fn memory_attribute_ranges(&self) -> alloc::vec::Vec<(u64, u64, u64)> {
        let g = self.read();
        g.vm().attrs.active(g.srcu_guard()).ranges().collect()
    }
}

/// Where a vCPU fault on a gfn goes (x86 `kvm_faultin_pfn` with guest_memfd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// Shared memory: this host address.
    Shared(u64),
    /// Private memory: this page of the slot's guest_memfd (byte offset).
    Private(GuestMemfd),
}

/// Why a vCPU fault cannot be served from a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultExit {
    /// No usable slot (none, or INVALID): an MMIO exit.
    Mmio,
    /// `KVM_EXIT_MEMORY_FAULT`: the access's privateness differs from the
    /// gfn's attribute (the VMM must convert it), or a private access hits a
    /// slot without guest_memfd (`private` says which kind the access was).
    MemoryFault {
        /// Whether the access was private.
        private: bool,
    },
}

impl<H: ArchHooks> ReadGuard<'_, H> {
    /// `kvm_get_memory_attributes`: the attributes of `gfn` (0: none).
    pub fn memory_attributes(&self, gfn: u64) -> u64 {
        self.vm().attrs.active(self.srcu_guard()).get(gfn)
    }

    /// `kvm_mem_is_private`: whether `gfn` has `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
    pub fn gfn_is_private(&self, gfn: u64) -> bool {
        self.memory_attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }

    /// `kvm_range_has_memory_attributes`: whether every gfn of `[start,
    /// end)` has `attributes & mask == attrs` (`mask` limited to the VM's
    /// supported attributes; `attrs` outside it is `false`).
    pub fn range_has_memory_attributes(&self, start: u64, end: u64, mask: u64, attrs: u64) -> bool {
        let mask = mask & self.vm().supported_memory_attributes();
        self.vm().attrs.active(self.srcu_guard()).has(start, end, mask, attrs)
    }

    /// Where a vCPU access to `gfn` of `as_id` goes, as x86's page-fault
    /// path decides with guest_memfd (`kvm_faultin_pfn`): a private access
    /// to a gfn that is not private, or a shared access to a private one, is
    /// a memory-fault exit; a private access needs a guest_memfd slot.
    pub fn faultin(&self, as_id: u16, gfn: u64, private: bool) -> Result<FaultTarget, FaultExit> {
        let slot = self.gfn_to_memslot(as_id, gfn).filter(|s| !s.is_invalid()).ok_or(FaultExit::Mmio)?;
        if private != self.gfn_is_private(gfn) {
            return Err(FaultExit::MemoryFault { private });
        }
        if !private {
            return Ok(FaultTarget::Shared(slot.gfn_to_hva_unchecked(gfn)));
        }
        let g = slot.guest_memfd.ok_or(FaultExit::MemoryFault { private })?;
        Ok(FaultTarget::Private(GuestMemfd { fd: g.fd, offset: g.offset + ((gfn - slot.base_gfn) << PAGE_SHIFT) }))
    }
}

#[cfg(test)]
mod tests {
    use super::AttrMap;

    #[test]
    fn set_splits_and_merges() {
        let mut m = AttrMap::default();
        m.set(10, 20, 8);
        m.set(20, 30, 8);
        assert_eq!(m.ranges().collect::<alloc::vec::Vec<_>>(), [(10, 30, 8)], "adjacent equal ranges merge");
        m.set(15, 25, 0);
        assert_eq!(m.ranges().collect::<alloc::vec::Vec<_>>(), [(10, 15, 8), (25, 30, 8)]);
        m.set(15, 25, 8);
        assert_eq!(m.ranges().collect::<alloc::vec::Vec<_>>(), [(10, 30, 8)]);
        assert!(m.has(10, 30, !0, 8) && !m.has(9, 30, !0, 8) && m.has(0, 10, !0, 0) && !m.has(0, 11, !0, 0));
    }
}
