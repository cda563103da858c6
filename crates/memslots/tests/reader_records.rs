//! Per-thread reader records for anonymous lookups (`vm.gfn_to_hva`,
//! `vm.read()`): two per thread and VM (one for guards handed out, one for
//! the library's own one-call sections), registered on first use, removed
//! when the thread exits, never shared between threads, and never freed
//! while a section is open on them.
//!
//! Per-thread records exist only with the `std` feature (without it every
//! anonymous lookup uses the VM-wide record).
#![cfg(feature = "std")]

/// Records a thread registers per VM.
const PER_THREAD: usize = 2;

use memslots::{Config, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

const HVA: u64 = 0x7f00_0000_0000;

fn vm() -> Vm {
    let vm = Vm::new(Config::default().with_address_spaces(1)).unwrap();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10_0000, HVA)).unwrap();
    vm
}

#[test]
fn a_thread_registers_one_record_per_vm_and_removes_it_when_it_exits() {
    let vm = Arc::new(vm());
    let base = vm.registered_readers();
    vm.gfn_to_hva(0, 1).unwrap();
    let mine = vm.registered_readers();
    assert_eq!(mine, base + PER_THREAD, "this thread's records");
    vm.gfn_to_hva(0, 2).unwrap();
    drop(vm.read());
    assert_eq!(vm.registered_readers(), mine, "the same records, reused");
    let (inside, go) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let t = {
        let (vm, inside, go) = (Arc::clone(&vm), Arc::clone(&inside), Arc::clone(&go));
        std::thread::spawn(move || {
            assert_eq!(vm.gfn_to_hva(0, 3), Ok(HVA + 0x3000));
            let other = Vm::new(Config::default()).unwrap();
            let _ = other.gfn_to_hva(0, 0);
            drop(other); // its record goes with it
            inside.wait();
            go.wait();
        })
    };
    inside.wait();
    assert_eq!(vm.registered_readers(), mine + PER_THREAD, "the other thread's records");
    go.wait();
    t.join().unwrap();
    assert_eq!(vm.registered_readers(), mine, "removed at thread exit");
    // Grace periods still end (nothing left registered with a count).
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x100_0000, 0x10_0000, HVA)).unwrap();
    assert_eq!(vm.gfn_to_hva(0, 0x1001), Ok(HVA + 0x1000));
}

#[test]
fn a_new_vm_after_a_dropped_one_gets_its_own_record() {
    // A VM may be created at the address of a dropped one: the thread's
    // record of the old VM must not be taken for the new one's (it would be
    // invisible to the new VM's grace periods).
    for round in 0..50u64 {
        let vm = Arc::new(vm());
        let base = vm.registered_readers();
        assert_eq!(vm.gfn_to_hva(0, round % 256), Ok(HVA + ((round % 256) << 12)));
        assert_eq!(vm.registered_readers(), base + PER_THREAD, "round {round}");
        // A writer waits for this thread's open section on the new VM.
        let guard = vm.read();
        let done = Arc::new(AtomicBool::new(false));
        let w = {
            let (vm, done) = (Arc::clone(&vm), Arc::clone(&done));
            std::thread::spawn(move || {
                vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x100_0000, 0x10_0000, HVA)).unwrap();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(if round < 3 { 20 } else { 0 }));
        if round < 3 {
            assert!(!done.load(Ordering::SeqCst), "the writer did not wait for this thread's section");
        }
        // Inside the section the slot is at its old place or INVALID (the
        // writer published the INVALID copy and waits): never gone or moved.
        let inside = guard.gfn_to_hva(0, 1);
        assert!(
            matches!(inside, Ok(h) if h == HVA + 0x1000) || inside == Err(memslots::HvaError::Invalid),
            "{inside:?}"
        );
        drop(guard);
        w.join().unwrap();
    }
}

static STATIC_VM: OnceLock<Vm> = OnceLock::new();

std::thread_local! {
    /// A section kept open in a thread local, dropped during the thread's
    /// exit in an unspecified order with the thread's record.
    static KEPT: std::cell::RefCell<Option<memslots::ReadGuard<'static, memslots::NoArch>>> =
        const { std::cell::RefCell::new(None) };
}

#[test]
fn a_section_kept_in_a_thread_local_outlives_nothing_it_needs() {
    let vm = STATIC_VM.get_or_init(vm);
    std::thread::spawn(move || {
        let g = vm.read();
        assert_eq!(g.gfn_to_hva(0, 1), Ok(HVA + 0x1000));
        KEPT.with_borrow_mut(|k| *k = Some(g));
    })
    .join()
    .unwrap();
    // Whatever order the thread's locals were destroyed in, the section is
    // closed and its record either removed or still owned by the registry.
    let t = Instant::now();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x200_0000, 0x10_0000, HVA)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(vm.gfn_to_hva(0, 0x2001), Ok(HVA + 0x1000));
}

/// Short-lived threads doing anonymous lookups while a writer moves the
/// slot back and forth: every translation is one of the two mappings,
/// every thread's record is gone after it exits, and no grace period hangs.
#[test]
fn short_lived_threads_and_a_moving_slot() {
    let vm = Arc::new(vm());
    let base = vm.registered_readers();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vm, stop) = (Arc::clone(&vm), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut moves = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let gpa = if moves.is_multiple_of(2) { 0x100_0000 } else { 0 };
                vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, gpa, 0x10_0000, HVA)).unwrap();
                moves += 1;
            }
            moves
        })
    };
    let deadline = Instant::now() + Duration::from_millis(700);
    let mut threads = 0;
    while Instant::now() < deadline || threads < 50 {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || {
            for i in 0..200u64 {
                let off = i % 256;
                for gfn in [off, 0x1000 + off] {
                    match vm.gfn_to_hva(0, gfn) {
                        Ok(hva) => assert_eq!(hva, HVA + (off << 12)),
                        Err(e) => assert!(matches!(e, memslots::HvaError::NoSlot | memslots::HvaError::Invalid)),
                    }
                }
            }
        })
        .join()
        .unwrap();
        threads += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let moves = writer.join().unwrap();
    assert!(moves > 0);
    assert_eq!(vm.registered_readers(), base, "{threads} threads left records behind");
}

static STATIC_VM2: OnceLock<Vm> = OnceLock::new();

/// Looks a gfn up while the thread's locals are being destroyed (before or
/// after the records' own thread local: the order is unspecified).
struct LookupOnExit;

impl Drop for LookupOnExit {
    fn drop(&mut self) {
        let vm = STATIC_VM2.get().unwrap();
        assert_eq!(vm.gfn_to_hva(0, 2), Ok(HVA + 0x2000));
        drop(vm.read());
    }
}

std::thread_local! {
    static ON_EXIT: std::cell::RefCell<Option<LookupOnExit>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn lookups_from_thread_local_destructors_use_live_records() {
    let vm = STATIC_VM2.get_or_init(vm);
    for round in 0..4 {
        std::thread::spawn(move || {
            // Thread-local destructors run in some order tied to when each
            // was registered: register ours before and after the records'.
            if round % 2 == 0 {
                ON_EXIT.with_borrow_mut(|o| *o = Some(LookupOnExit));
                assert_eq!(vm.gfn_to_hva(0, 1), Ok(HVA + 0x1000));
            } else {
                assert_eq!(vm.gfn_to_hva(0, 1), Ok(HVA + 0x1000));
                ON_EXIT.with_borrow_mut(|o| *o = Some(LookupOnExit));
            }
        })
        .join()
        .unwrap();
    }
    let t = Instant::now();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x10_0000, HVA)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "a record was left with a count");
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0x10_0000, HVA)).unwrap();
}

#[test]
fn nested_sections_on_a_vcpu_record_balance() {
    let vm = vm();
    let vcpu = vm.vcpu();
    {
        let g = vcpu.read();
        assert!(g.gfn_to_memslot(1).is_some());
        // Misses inside the open section: nested sections on the vCPU's record.
        for gfn in [2u64, 0x300, 5, 0x10_0000] {
            let _ = vcpu.gfn_to_hva(gfn);
            let _ = vm.gfn_to_hva(0, gfn);
        }
        drop(g);
    }
    let t = Instant::now();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0x100_0000, 0x10_0000, HVA)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(vcpu.gfn_to_hva(0x1001), Ok(HVA + 0x1000));
}
