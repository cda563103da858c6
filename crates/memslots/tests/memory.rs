//! Metadata memory (seeds 002 and 003): what an empty VM costs, what slots
//! cost in the small and the indexed set layouts, what a 1 GiB slot's x86
//! metadata costs beside KVM's own figure, and that deleting every slot gives
//! all of it back. The figures in BENCHMARKS.md ("Memory") are this test's
//! output (`cargo test --release -p memslots --test memory -- --nocapture`).

use memslots::rmap::{kvm_lpage_info_bytes, kvm_rmap_bytes, X86Mmu};
use memslots::{ArchHooks, Config, MemoryUsage, UserMemoryRegion, Vm};

/// `n` slots of 64 KiB, 2 MiB apart (ids 0..n).
fn fill<H: ArchHooks>(vm: &Vm<H>, n: u32) {
    for i in 0..n {
        let gpa = u64::from(i) * 0x20_0000;
        vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa, 0x1_0000, 0x1000_0000 + gpa)).unwrap();
    }
}

fn delete_all<H: ArchHooks>(vm: &Vm<H>, n: u32) {
    for i in 0..n {
        vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, 0, 0, 0x1000_0000)).unwrap();
    }
}

fn vm_with(n: u32) -> Vm {
    let vm = Vm::new(Config::default()).unwrap();
    fill(&vm, n);
    vm
}

fn show(what: &str, u: &MemoryUsage) {
    println!(
        "{what:>28}: {:>9} B total, {:>6.1} B/slot (fixed {}, slot objects {}, indexes {}, bitmaps {}, arch {}, lazy {})",
        u.total(),
        u.bytes_per_slot(),
        u.fixed_bytes,
        u.slot_bytes,
        u.index_bytes,
        u.bitmap_bytes,
        u.arch_bytes,
        u.lazy_bytes
    );
}

#[test]
fn an_empty_vm_pre_sizes_nothing() {
    let empty = vm_with(0).memory_usage();
    show("empty VM (2 address spaces)", &empty);
    assert_eq!((empty.slots, empty.slot_bytes, empty.index_bytes), (0, 0, 0));
    assert!(empty.total() <= 1024, "{empty:?}");
}

/// Seed 002 reports ~2.6 KB for KVM's 30 slots (its old fixed array, no
/// indexes); the small set layout keeps the library's under 6 KiB with
/// both sets' indexes and the VM itself included.
#[test]
fn thirty_slots_fit_in_six_kib() {
    let u = vm_with(30).memory_usage();
    show("30 slots", &u);
    assert_eq!(u.slots, 30);
    assert!(u.total() <= 6 * 1024, "{u:?}");
    // With the x86 model but no rmaps yet (large-page info only).
    let vm = Vm::with_hooks(Config::x86_64(), X86Mmu::new()).unwrap();
    fill(&vm, 30);
    let x = vm.memory_usage();
    show("30 slots, x86, no rmaps", &x);
    assert_eq!(x.lazy_bytes, 0);
    assert!(x.total() - x.arch_bytes <= 6 * 1024, "{x:?}");
}

#[test]
fn many_slots_cost_at_most_240_bytes_each() {
    let mut per_slot = Vec::new();
    for n in [100u32, 1000, 32000] {
        let u = vm_with(n).memory_usage();
        show(&format!("{n} slots"), &u);
        assert_eq!(u.slots, usize::try_from(n).unwrap());
        per_slot.push(u.bytes_per_slot());
    }
    assert!(per_slot[2] <= 240.0, "32,000 slots: {per_slot:?}");
    // Linear: no size costs more per slot than the 240 B bound plus block
    // and top-array growth slack.
    assert!(per_slot.iter().all(|&b| b <= 280.0), "{per_slot:?}");
}

#[test]
fn deleting_every_slot_gives_back_everything() {
    let empty = vm_with(0).memory_usage();
    for n in [30u32, 1000, 32000] {
        let vm = vm_with(n);
        delete_all(&vm, n);
        let after = vm.memory_usage();
        show(&format!("after deleting {n} slots"), &after);
        assert_eq!(after, empty, "after deleting {n} slots");
    }
}

#[test]
fn a_one_gib_slot_costs_what_kvm_allocates() {
    let vm = Vm::with_hooks(Config::x86_64().with_address_spaces(1), X86Mmu::new()).unwrap();
    let empty = vm.memory_usage();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 1 << 30, 0x7f00_0000_0000)).unwrap();
    let without = vm.memory_usage();
    vm.enable_lazy_metadata().unwrap();
    let with = vm.memory_usage();
    let npages = (1u64 << 30) >> 12;
    let kvm_rmap = usize::try_from(kvm_rmap_bytes(0, npages)).unwrap();
    let kvm_lpage = usize::try_from(kvm_lpage_info_bytes(0, npages)).unwrap();
    println!(
        "1 GiB slot: slot object and indexes {} B; large-page info {} B (KVM {kvm_lpage} B); rmaps {} B (KVM {kvm_rmap} B)",
        without.slot_bytes + without.index_bytes,
        without.arch_bytes,
        with.lazy_bytes
    );
    // The arrays are exactly KVM's; the rest is one small header each.
    assert!(without.arch_bytes >= kvm_lpage && without.arch_bytes <= kvm_lpage + 128, "{without:?}");
    assert_eq!(without.lazy_bytes, 0);
    assert!(with.lazy_bytes >= kvm_rmap && with.lazy_bytes <= kvm_rmap + 128, "{with:?}");
    assert!(without.slot_bytes + without.index_bytes <= 256, "{without:?}");
    // DELETE frees all of it (after the grace period, which the call waits for).
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, 0x7f00_0000_0000)).unwrap();
    assert_eq!(vm.memory_usage(), empty);
}
