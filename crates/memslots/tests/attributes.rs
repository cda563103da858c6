//! Memory attributes against a per-page model (proptest): random set/clear
//! operations over random ranges, good and bad, then every gfn's attributes,
//! random range queries, and where vCPU faults go in slots with and without
//! guest_memfd. This host's KVM has no KVM_CAP_MEMORY_ATTRIBUTES, so the
//! reference is the kernel source's semantics, written naively below.

// A test on a 64-bit host: gfns below 2^32 fit usize.
#![allow(clippy::cast_possible_truncation)]

use memslots::attributes::{FaultExit, FaultTarget};
use memslots::{
    Config, Errno, GuestMemfd, MemoryAttributes, UserMemoryRegion2, Vm, KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE,
};
use proptest::prelude::*;

const GFNS: u64 = 512;
const PAGE: u64 = 4096;

/// The naive kernel: one entry per page (the xarray), 0 = no entry.
#[derive(Clone)]
struct Model {
    attrs: Vec<u64>,
    supported: u64,
}

impl Model {
    fn set(&mut self, a: &MemoryAttributes) -> Result<(), Errno> {
        if a.flags != 0 || a.attributes & !self.supported != 0 {
            return Err(Errno::EINVAL);
        }
        if a.size == 0 || a.address.checked_add(a.size).is_none() {
            return Err(Errno::EINVAL);
        }
        if !a.address.is_multiple_of(PAGE) || !a.size.is_multiple_of(PAGE) {
            return Err(Errno::EINVAL);
        }
        for g in a.address / PAGE..(a.address + a.size) / PAGE {
            if let Some(x) = self.attrs.get_mut(g as usize) {
                *x = a.attributes;
            }
        }
        Ok(())
    }
    fn get(&self, g: u64) -> u64 {
        self.attrs.get(g as usize).copied().unwrap_or(0)
    }
    fn has(&self, start: u64, end: u64, mask: u64, attrs: u64) -> bool {
        let mask = mask & self.supported;
        if attrs & !mask != 0 {
            return false;
        }
        (start..end).all(|g| self.get(g) & mask == attrs)
    }
}

fn op() -> impl Strategy<Value = MemoryAttributes> {
    let good = (0..GFNS, 1..64u64, prop_oneof![Just(0), Just(PRIVATE)])
        .prop_map(|(g, n, attributes)| MemoryAttributes { address: g * PAGE, size: n * PAGE, attributes, flags: 0 });
    let bad = prop_oneof![
        (0..GFNS).prop_map(|g| MemoryAttributes { address: g * PAGE, size: PAGE, attributes: PRIVATE, flags: 1 }),
        (0..GFNS).prop_map(|g| MemoryAttributes { address: g * PAGE, size: PAGE, attributes: 1, flags: 0 }),
        (0..GFNS).prop_map(|g| MemoryAttributes { address: g * PAGE, size: 0, attributes: PRIVATE, flags: 0 }),
        (0..GFNS).prop_map(|g| MemoryAttributes { address: g * PAGE + 8, size: PAGE, attributes: 0, flags: 0 }),
        Just(MemoryAttributes { address: u64::MAX - PAGE + 1, size: 2 * PAGE, attributes: 0, flags: 0 }),
    ];
    prop_oneof![4 => good, 1 => bad]
}

fn vm_with_slots() -> Vm {
    let vm = Vm::new(Config::default().with_private_mem(true)).unwrap();
    // gfns [0, 128): shared-only slot; [128, 256): guest_memfd slot; 256.. holes and a second gmem slot.
    vm.set_user_memory_region2(&UserMemoryRegion2::new(0, 0, 0, 128 * PAGE, 0x10_0000_0000)).unwrap();
    vm.set_user_memory_region2(&UserMemoryRegion2::with_guest_memfd(
        1,
        0,
        128 * PAGE,
        128 * PAGE,
        0x20_0000_0000,
        9,
        0,
    ))
    .unwrap();
    vm.set_user_memory_region2(&UserMemoryRegion2::with_guest_memfd(
        2,
        0,
        384 * PAGE,
        64 * PAGE,
        0x30_0000_0000,
        9,
        1 << 20,
    ))
    .unwrap();
    vm
}

/// Where the kernel sends a fault (x86 kvm_faultin_pfn), from the model.
fn model_fault(vm: &Vm, m: &Model, gfn: u64, private: bool) -> Result<FaultTarget, FaultExit> {
    let d = vm.gfn_to_slot_desc(0, gfn).ok_or(FaultExit::Mmio)?;
    if private != (m.get(gfn) & PRIVATE != 0) {
        return Err(FaultExit::MemoryFault { private });
    }
    if !private {
        return Ok(FaultTarget::Shared(d.userspace_addr + (gfn - d.base_gfn) * PAGE));
    }
    let g = d.guest_memfd.ok_or(FaultExit::MemoryFault { private })?;
    Ok(FaultTarget::Private(GuestMemfd { fd: g.fd, offset: g.offset + (gfn - d.base_gfn) * PAGE }))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn attributes_match_a_per_page_model(
        ops in proptest::collection::vec(op(), 1..40),
        queries in proptest::collection::vec((0..GFNS + 8, 0..80u64, prop_oneof![Just(!0u64), Just(PRIVATE), Just(1u64)], prop_oneof![Just(0u64), Just(PRIVATE)]), 16),
    ) {
        let vm = vm_with_slots();
        let mut m = Model { attrs: vec![0; (GFNS + 64) as usize], supported: PRIVATE };
        for a in &ops {
            let before = vm.memory_attribute_ranges();
            let got = vm.set_memory_attributes(a).map_err(|e| e.errno());
            let want = m.set(a);
            prop_assert_eq!(got, want, "{:?}", a);
            if want.is_err() {
                prop_assert_eq!(vm.memory_attribute_ranges(), before, "a refused request changed the attributes");
            }
        }
        let g = vm.read();
        for gfn in 0..GFNS + 8 {
            prop_assert_eq!(g.memory_attributes(gfn), m.get(gfn), "gfn {}", gfn);
            prop_assert_eq!(g.gfn_is_private(gfn), m.get(gfn) & PRIVATE != 0);
            for private in [false, true] {
                prop_assert_eq!(g.faultin(0, gfn, private), model_fault(&vm, &m, gfn, private), "gfn {} private {}", gfn, private);
            }
        }
        for &(start, len, mask, attrs) in &queries {
            let end = start + len;
            prop_assert_eq!(g.range_has_memory_attributes(start, end, mask, attrs), m.has(start, end, mask, attrs),
                "[{}, {}) mask {:#x} attrs {:#x}", start, end, mask, attrs);
        }
        // Canonical: ranges disjoint, sorted, non-zero, neighbours differ.
        let r = vm.memory_attribute_ranges();
        for w in r.windows(2) {
            prop_assert!(w[0].1 <= w[1].0 && !(w[0].1 == w[1].0 && w[0].2 == w[1].2), "{:?}", r);
        }
        prop_assert!(r.iter().all(|&(s, e, a)| s < e && a != 0));
    }
}

#[test]
fn a_default_vm_supports_no_attributes() {
    let vm = Vm::new(Config::default()).unwrap();
    assert_eq!(vm.supported_memory_attributes(), 0);
    let private = MemoryAttributes { address: 0, size: PAGE, attributes: PRIVATE, flags: 0 };
    assert_eq!(vm.set_memory_attributes(&private).unwrap_err().errno(), Errno::EINVAL);
    // Clearing is always accepted (and changes nothing).
    vm.set_memory_attributes(&MemoryAttributes { address: 0, size: PAGE, attributes: 0, flags: 0 }).unwrap();
    assert!(vm.read().range_has_memory_attributes(0, 1 << 20, !0, 0));
}

/// Records `unmap_gfn_range` calls.
#[derive(Debug, Default)]
struct Unmaps(std::sync::Mutex<Vec<(u16, u64, u64)>>);

impl memslots::ArchHooks for Unmaps {
    type SlotData = ();
    fn unmap_gfn_range(&self, slot: &memslots::MemorySlot<()>, start: u64, end: u64) -> bool {
        self.0.lock().unwrap().push((slot.id, start, end));
        true
    }
}

#[test]
fn changing_attributes_zaps_the_slots_in_the_range_once() {
    let vm = Vm::with_hooks(Config::default().with_private_mem(true), Unmaps::default()).unwrap();
    vm.set_user_memory_region2(&UserMemoryRegion2::new(0, 0, 0, 16 * PAGE, 0x10_0000_0000)).unwrap();
    vm.set_user_memory_region2(&UserMemoryRegion2::new(1, 0, 32 * PAGE, 16 * PAGE, 0x20_0000_0000)).unwrap();
    let a = MemoryAttributes { address: 8 * PAGE, size: 32 * PAGE, attributes: PRIVATE, flags: 0 };
    vm.set_memory_attributes(&a).unwrap();
    assert_eq!(*vm.hooks().0.lock().unwrap(), [(0, 8, 16), (1, 32, 40)], "the part of each slot in the range");
    // Setting what is already there changes nothing and zaps nothing.
    vm.set_memory_attributes(&a).unwrap();
    assert_eq!(vm.hooks().0.lock().unwrap().len(), 2);
    assert_eq!(vm.memory_attribute_ranges(), [(8, 40, PRIVATE)]);
}
