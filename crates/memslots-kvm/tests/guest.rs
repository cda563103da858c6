//! A real guest on the host's KVM, with RAM made of many library slots:
//! guest writes are visible through the library, the harvested dirty set is
//! exactly what the guest wrote (kernel bitmap, manual protect, dirty ring),
//! and deleting or moving a slot under a running vCPU gives MMIO exits for
//! the old range and never a write into the old memory afterwards.

use memslots::UserMemoryRegion;
use memslots_kvm::guest::{
    loop_program, read_guest_u16, run_loop, writer_program, Guest, LoopEvent, Mapping, DATA_SLOTS, DATA_SLOT_BASE,
};
use memslots_kvm::kdirty::{reset_kernel_rings, sync_dirty_log, KernelDirtyMode};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

fn skip(name: &str) -> bool {
    if memslots_kvm::kvm_available() {
        return false;
    }
    eprintln!("SKIP {name}: /dev/kvm is not available");
    true
}

const WRITTEN: [u32; 7] = [0, 5, 17, 63, 64, 100, 191];

fn seg(i: u32) -> u16 {
    u16::try_from(Guest::data_gpa(i) >> 4).unwrap()
}

fn written_pages_match(mode: KernelDirtyMode) {
    let table: Vec<u16> = WRITTEN.iter().map(|&i| seg(i)).collect();
    let mut g = Guest::new(&writer_program(), &table, true, mode).expect("guest");
    g.run_to_hlt(10_000).expect("guest runs to HLT");
    // Visible through the library's translation.
    for &i in &WRITTEN {
        let gpa = Guest::data_gpa(i);
        // SAFETY: the Guest owns every slot's mapping for its lifetime.
        unsafe {
            assert_eq!(read_guest_u16(&g.vm, gpa), Some(0xBEEF), "slot {i}");
            assert_eq!(read_guest_u16(&g.vm, gpa + 2), Some(seg(i)), "slot {i}");
        }
    }
    // Harvest from the kernel into the library, then through the library.
    match mode {
        KernelDirtyMode::Ring(_) => {
            let ring = g.ring.as_mut().expect("ring mapped");
            let n = ring.harvest(&g.vm);
            assert!(n >= u64::try_from(WRITTEN.len()).unwrap(), "ring entries: {n}");
            reset_kernel_rings(&g.vm).expect("reset rings");
        }
        _ => {
            for i in 0..DATA_SLOTS {
                sync_dirty_log(&g.vm, DATA_SLOT_BASE + i, mode).expect("sync");
            }
        }
    }
    let mut dirty = BTreeSet::new();
    for i in 0..DATA_SLOTS {
        let log = g.vm.get_dirty_log_vec(DATA_SLOT_BASE + i).expect("library dirty log");
        if log.iter().any(|&w| w != 0) {
            assert_eq!(log, vec![1], "one page per data slot");
            dirty.insert(i);
        }
    }
    let want: BTreeSet<u32> = WRITTEN.iter().copied().collect();
    assert_eq!(dirty, want, "{mode:?}: harvested pages must be exactly those the guest wrote");
    // A second harvest finds nothing new.
    if let KernelDirtyMode::Ring(_) = mode {
        assert_eq!(g.ring.as_mut().unwrap().harvest(&g.vm), 0);
    } else {
        for i in 0..DATA_SLOTS {
            assert_eq!(sync_dirty_log(&g.vm, DATA_SLOT_BASE + i, mode).unwrap(), 0);
        }
    }
    // Pages the VMM writes through the library merge with the guest's.
    assert_eq!(g.vm.mark_page_dirty(0, Guest::data_gpa(7) >> 12), memslots::DirtyMark::Marked);
    assert_eq!(g.vm.get_dirty_log_vec(DATA_SLOT_BASE + 7).unwrap(), vec![1]);
}

#[test]
fn guest_writes_visible_and_dirty_set_exact_kernel_bitmap() {
    if !skip("guest_writes_visible_and_dirty_set_exact_kernel_bitmap") {
        written_pages_match(KernelDirtyMode::Bitmap);
    }
}

#[test]
fn guest_writes_visible_and_dirty_set_exact_manual_protect() {
    if !skip("guest_writes_visible_and_dirty_set_exact_manual_protect") {
        written_pages_match(KernelDirtyMode::ManualProtect);
    }
}

#[test]
fn guest_writes_visible_and_dirty_set_exact_dirty_ring() {
    if !skip("guest_writes_visible_and_dirty_set_exact_dirty_ring") {
        written_pages_match(KernelDirtyMode::Ring(4096));
    }
}

/// Waits for `n` events matching `pred`, failing after 10 s.
fn wait_for(rx: &mpsc::Receiver<LoopEvent>, n: usize, what: &str, pred: impl Fn(&LoopEvent) -> bool) -> Vec<LoopEvent> {
    let mut seen = Vec::new();
    let mut hits = 0;
    while hits < n {
        let ev = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if pred(&ev) {
            hits += 1;
        }
        seen.push(ev);
    }
    seen
}

#[test]
fn delete_and_move_under_a_running_vcpu() {
    if skip("delete_and_move_under_a_running_vcpu") {
        return;
    }
    let k = 10u32;
    let gpa = Guest::data_gpa(k);
    let off = usize::try_from(u64::from(k) * 4096).unwrap();
    let fresh = Mapping::new(4096).unwrap();
    fresh.write(0, &0x2222u16.to_le_bytes()).unwrap();
    let g = Guest::new(&loop_program(seg(k)), &[], false, KernelDirtyMode::Bitmap).expect("guest");
    // The Guest's VM maps only memory it owns: hand it `fresh` too.
    g.vm.hooks().attach(&fresh).unwrap();
    g.data.write(off, &0x1111u16.to_le_bytes()).unwrap();
    let Guest { vm, mut vcpu, data, boot, ring } = g;
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let stop = &stop;
        let runner = s.spawn(move || {
            run_loop(&mut vcpu, |ev| tx.send(ev).is_ok() && !stop.load(Ordering::SeqCst)).expect("vcpu run");
        });
        let slot = DATA_SLOT_BASE + k;
        wait_for(&rx, 50, "reads of the original memory", |e| *e == LoopEvent::Read(0x1111));
        // Delete while the vCPU runs.
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 0, data.hva() + u64::from(k) * 4096)).unwrap();
        let frozen = data.read_u16(off + 2);
        let seen = wait_for(&rx, 20, "MMIO reads of the deleted range", |e| *e == LoopEvent::MmioRead(gpa));
        assert!(seen.iter().any(|e| *e == LoopEvent::MmioWrite(gpa + 2)), "writes exit as MMIO too: {seen:?}");
        assert_eq!(data.read_u16(off + 2), frozen, "the guest wrote into the deleted slot's memory");
        // New memory at the same place: the guest sees the new mapping.
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 4096, fresh.hva())).unwrap();
        wait_for(&rx, 20, "reads of the new mapping", |e| *e == LoopEvent::Read(0x2222));
        // Move it away: MMIO again, and the moved slot's memory stops changing.
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, 0xE_0000, 4096, fresh.hva())).unwrap();
        let frozen = fresh.read_u16(2);
        wait_for(&rx, 20, "MMIO reads after the move", |e| *e == LoopEvent::MmioRead(gpa));
        assert_eq!(fresh.read_u16(2), frozen, "the guest wrote the moved slot's memory through the old range");
        // And back.
        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 4096, fresh.hva())).unwrap();
        wait_for(&rx, 20, "reads after moving back", |e| *e == LoopEvent::Read(0x2222));
        assert!(fresh.read_u16(2) > frozen, "the guest writes the slot again once it is back");
        stop.store(true, Ordering::SeqCst);
        drop(rx);
        runner.join().unwrap();
    });
    drop((vm, ring));
    drop((data, boot));
}
