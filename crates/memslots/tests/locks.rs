//! Lock order (DESIGN.md, "Locks"): no lock that a thread inside a read
//! section may take is ever held by a thread that waits for a grace period or
//! for the writer lock. Issue 10, defect 7, and the debug-build check that
//! reports a writer call from inside a read section instead of hanging.

use memslots::{Config, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const HVA: u64 = 0x7f00_0000_0000;

/// A reader creates a vCPU inside its read section (allowed), while a writer
/// waits for that section and a third thread resets the dirty rings. The old
/// ring reset held the vCPU registry lock while waiting for the writer lock:
/// reader -> registry -> reset -> writer lock -> writer -> reader, a cycle.
#[test]
fn vcpu_creation_in_a_section_races_a_writer_and_a_ring_reset() {
    let vm = Arc::new(Vm::new(Config::default()).unwrap());
    vm.enable_dirty_log_ring(4096).unwrap();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000, HVA)).unwrap();
    let first = vm.vcpu(); // a ring to reset
    drop(first);

    let (done_tx, done_rx) = mpsc::channel();
    let in_section = Arc::new(Barrier::new(2));
    {
        // The reader: enters a section, lets the others block, then makes a vCPU.
        let (vm, in_section, done) = (Arc::clone(&vm), Arc::clone(&in_section), done_tx.clone());
        std::thread::spawn(move || {
            let guard = vm.read();
            in_section.wait();
            std::thread::sleep(Duration::from_millis(300)); // writer and reset are blocked by now
            let vcpu = vm.vcpu();
            drop(guard);
            drop(vcpu);
            done.send("reader").unwrap();
        });
    }
    in_section.wait();
    {
        // The writer: waits for the reader's section, holding the writer lock.
        let (vm, done) = (Arc::clone(&vm), done_tx.clone());
        std::thread::spawn(move || {
            vm.set_user_memory_region(&UserMemoryRegion::new(1, 0, 0x1000_0000, 0x1000, HVA + 0x1000_0000)).unwrap();
            done.send("writer").unwrap();
        });
    }
    std::thread::sleep(Duration::from_millis(100));
    {
        let (vm, done) = (Arc::clone(&vm), done_tx);
        std::thread::spawn(move || {
            vm.reset_dirty_rings().unwrap();
            done.send("reset").unwrap();
        });
    }
    let mut finished = Vec::new();
    for _ in 0..3 {
        match done_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(who) => finished.push(who),
            Err(_) => panic!("deadlock: only {finished:?} finished within 20 s"),
        }
    }
    finished.sort_unstable();
    assert_eq!(finished, ["reader", "reset", "writer"]);
}

/// The same with a ring harvest, whose callback runs while the registry is
/// not locked: it may even create a vCPU.
#[test]
fn ring_harvest_callback_may_create_a_vcpu() {
    let vm = Vm::new(Config::default()).unwrap();
    vm.enable_dirty_log_ring(4096).unwrap();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000, HVA)).unwrap();
    let v = vm.vcpu();
    let _ = v.mark_page_dirty(3);
    let mut made = Vec::new();
    let n = vm.harvest_dirty_rings(|_, _| made.push(vm.vcpu().id()));
    assert_eq!((n, made), (1, vec![1]));
}

/// Debug builds report a writer call from inside a read section of the same
/// VM (which would wait for itself forever) instead of hanging.
#[cfg(debug_assertions)]
mod section_check {
    use super::*;

    fn vm() -> Vm {
        let vm = Vm::new(Config::default()).unwrap();
        vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000, HVA)).unwrap();
        vm
    }

    #[test]
    #[should_panic(expected = "inside a read section")]
    fn slot_change_inside_a_read_guard() {
        let vm = vm();
        let _g = vm.read();
        let _ = vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, HVA));
    }

    #[test]
    #[should_panic(expected = "inside a read section")]
    fn dirty_log_get_inside_a_vcpu_guard() {
        let vm = vm();
        let vcpu = vm.vcpu();
        let _g = vcpu.read();
        let _ = vm.get_dirty_log_vec(0);
    }

    #[test]
    #[should_panic(expected = "inside a read section")]
    fn nested_sections_still_count() {
        let vm = vm();
        let reader = vm.reader();
        let outer = reader.read();
        let inner = vm.read();
        drop(inner);
        let _ = vm.memory_usage();
        drop(outer);
    }

    #[test]
    fn another_vm_and_after_the_section_are_fine() {
        let (a, b) = (vm(), vm());
        let g = a.read();
        b.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, HVA)).unwrap();
        let _v = a.vcpu(); // registering a handle inside a section is allowed
        drop(g);
        a.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, HVA)).unwrap();
    }
}
