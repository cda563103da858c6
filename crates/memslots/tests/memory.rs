//! Memory is proportional to the slots in use (seed 002): reports metadata
//! bytes for an empty VM and per slot, and checks they stay small and linear.

use memslots::{Config, UserMemoryRegion, Vm};

fn vm_with(n: u32) -> Vm {
    let vm = Vm::new(Config::default()).unwrap();
    for i in 0..n {
        let gpa = u64::from(i) * 0x20_0000;
        vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa, 0x1_0000, 0x1000_0000 + gpa)).unwrap();
    }
    vm
}

#[test]
fn metadata_memory_is_proportional_to_slots_in_use() {
    let empty = vm_with(0).memory_usage();
    println!("empty VM (2 address spaces): {} bytes", empty.total());
    assert_eq!(empty.slots, 0);
    assert!(empty.total() < 4096, "an empty VM should not pre-size anything: {empty:?}");

    let mut per_slot = Vec::new();
    for n in [30u32, 1000, 32000] {
        let u = vm_with(n).memory_usage();
        println!(
            "{n:>6} slots: {:>9} bytes total, {:>6.1} bytes/slot (slot objects {}, indexes of both sets {})",
            u.total(),
            u.bytes_per_slot(),
            u.slot_bytes,
            u.index_bytes
        );
        assert_eq!(u.slots, usize::try_from(n).unwrap());
        per_slot.push(u.bytes_per_slot());
    }
    // Linear: bytes per slot do not grow with the number of slots (allow
    // slack for hash-table and block growth steps).
    assert!(per_slot.iter().all(|&b| b < 600.0), "bytes per slot too high: {per_slot:?}");
    assert!(per_slot[2] < per_slot[0] * 2.0, "not linear: {per_slot:?}");

    // Deleting everything returns the indexes to (almost) nothing.
    let vm = vm_with(1000);
    for i in 0..1000u32 {
        vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, 0, 0, 0x1000_0000)).unwrap();
    }
    let after = vm.memory_usage();
    println!("after deleting 1000 slots: {} bytes", after.total());
    assert!(after.total() < empty.total() + 1024, "{after:?} vs {empty:?}");
}
