//! Lazily allocated per-slot metadata (seed 003) with the provided x86
//! model (`memslots::rmap::X86Mmu`): what is allocated when, what each kind
//! of change does to it, allocation failures, the arch lock against readers
//! and writers, and a thread stress test of enabling against slot changes.

use memslots::rmap::X86Mmu;
use memslots::{
    ArchHooks, Config, Errno, Error, Layered, MemoryChange, MemorySlot, SlotDesc, SlotDraft, UserMemoryRegion, Vm,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HVA: u64 = 0x7f00_0000_0000;
const MB2: u64 = 0x20_0000;

fn region(id: u32, gpa: u64, size: u64, flags: u32) -> UserMemoryRegion {
    UserMemoryRegion::new(id, flags, gpa, size, HVA + u64::from(id) * 0x1_0000_0000)
}

fn vm() -> Vm<X86Mmu> {
    Vm::with_hooks(Config::x86_64().with_address_spaces(1), X86Mmu::new()).unwrap()
}

/// The rmap array of slot `id` as a pointer (identity), if allocated.
fn rmap_ptr<H: ArchHooks<SlotData = memslots::rmap::X86SlotData>>(vm: &Vm<H>, id: u16) -> Option<usize> {
    let g = vm.read();
    let s = g.id_to_memslot(0, id)?;
    s.arch().rmap().map(|r| r.level(1).as_ptr() as usize)
}

fn descs<H: ArchHooks>(vm: &Vm<H>) -> Vec<SlotDesc> {
    let g = vm.read();
    g.slots(0).map(|s| *s.desc()).collect()
}

#[test]
fn nothing_until_enabled_then_every_slot_and_every_later_slot() {
    let vm = vm();
    for i in 0..4 {
        vm.set_user_memory_region(&region(i, u64::from(i) * 4 * MB2, 2 * MB2, 0)).unwrap();
    }
    assert!(!vm.lazy_metadata_enabled());
    assert_eq!(vm.memory_usage().lazy_bytes, 0);
    assert!((0..4).all(|id| rmap_ptr(&vm, id).is_none()));
    // Large-page info comes with the slot.
    assert!(vm.memory_usage().arch_bytes > 0);

    assert_eq!(vm.enable_lazy_metadata(), Ok(true));
    assert!(vm.lazy_metadata_enabled());
    assert_eq!(vm.enable_lazy_metadata(), Ok(false), "a second enable does nothing");
    assert!((0..4).all(|id| rmap_ptr(&vm, id).is_some()));
    assert_eq!(vm.hooks().rmap_allocations(), 4);

    vm.set_user_memory_region(&region(9, 64 * MB2, MB2, 0)).unwrap();
    assert!(rmap_ptr(&vm, 9).is_some(), "a slot created after enabling gets rmaps at creation");
    assert_eq!(vm.hooks().rmap_allocations(), 5);
    let g = vm.read();
    let s = g.gfn_to_memslot(0, ((64 * MB2) >> 12) + 3).unwrap();
    let r = s.arch().rmap().unwrap();
    assert_eq!(r.level(1).len(), 512);
    assert_eq!(r.level(2).len(), 1);
    assert!(r.gfn_to_rmap(s.desc(), s.base_gfn + 3, 1).is_some());
    assert!(r.gfn_to_rmap(s.desc(), s.base_gfn + 512, 1).is_none());
}

#[test]
fn flags_only_keeps_move_rebuilds_delete_frees() {
    let vm = vm();
    vm.set_user_memory_region(&region(0, 0, 2 * MB2, 0)).unwrap();
    vm.enable_lazy_metadata().unwrap();
    let before = rmap_ptr(&vm, 0).unwrap();
    let g = vm.read();
    g.id_to_memslot(0, 0).unwrap().arch().rmap().unwrap().level(1)[5].store(0xabc, Ordering::Relaxed);
    drop(g);

    // FLAGS_ONLY: the same rmaps, contents kept (x86 copies old->arch).
    vm.set_user_memory_region(&region(0, 0, 2 * MB2, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert_eq!(rmap_ptr(&vm, 0), Some(before));
    let g = vm.read();
    assert_eq!(g.id_to_memslot(0, 0).unwrap().arch().rmap().unwrap().level(1)[5].load(Ordering::Relaxed), 0xabc);
    drop(g);
    assert_eq!(vm.hooks().rmap_allocations(), 1);

    // MOVE: fresh, zeroed rmaps for the new gfns.
    vm.set_user_memory_region(&region(0, 16 * MB2, 2 * MB2, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert_eq!(vm.hooks().rmap_allocations(), 2);
    let g = vm.read();
    let r = g.id_to_memslot(0, 0).unwrap().arch().rmap().unwrap();
    assert!(r.level(1).iter().all(|h| h.load(Ordering::Relaxed) == 0));
    drop(g);

    // DELETE: freed with the slot (after the grace period: the call returns after it).
    let lazy = vm.memory_usage().lazy_bytes;
    assert!(lazy >= 512 * 8);
    vm.set_user_memory_region(&region(0, 0, 0, 0)).unwrap();
    let u = vm.memory_usage();
    assert_eq!((u.slots, u.lazy_bytes, u.arch_bytes), (0, 0, 0));
}

#[test]
fn enable_failure_reports_enomem_and_a_retry_allocates_only_the_rest() {
    let vm = vm();
    for i in 0..6 {
        vm.set_user_memory_region(&region(i, u64::from(i) * 4 * MB2, MB2, 0)).unwrap();
    }
    let slots = descs(&vm);
    // Three rmap levels per slot: fail in the middle of the third slot.
    vm.hooks().fail_allocations_after(7);
    let e = vm.enable_lazy_metadata().unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    assert!(!vm.lazy_metadata_enabled());
    assert_eq!(descs(&vm), slots, "slots unchanged");
    let served = vm.hooks().rmap_allocations();
    assert_eq!(served, 2);
    let with = (0..6).filter(|&id| rmap_ptr(&vm, id).is_some()).count();
    assert_eq!(with, 2, "a slot gets all of its rmaps or none");
    // Not enabled: a new slot gets none.
    vm.hooks().stop_failing();
    vm.set_user_memory_region(&region(7, 64 * MB2, MB2, 0)).unwrap();
    assert!(rmap_ptr(&vm, 7).is_none());
    let kept: Vec<_> = (0..8).map(|id| rmap_ptr(&vm, id)).collect();
    assert_eq!(vm.enable_lazy_metadata(), Ok(true));
    assert_eq!(vm.hooks().rmap_allocations(), 7, "each slot exactly once");
    for (id, k) in kept.iter().enumerate() {
        if let Some(p) = k {
            assert_eq!(rmap_ptr(&vm, u16::try_from(id).unwrap()), Some(*p), "a served slot keeps its rmaps");
        }
    }
}

/// An outer layer that records prepares and aborts, to check that a failed
/// lazy allocation undoes the earlier layers' prepares.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<&'static str>>,
}

impl ArchHooks for Recorder {
    type SlotData = ();
    fn prepare_memory_region(
        &self,
        _: MemoryChange,
        _: Option<&MemorySlot<()>>,
        _: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        self.log.lock().unwrap().push("prepare");
        Ok(())
    }
    fn abort_memory_region(&self, _: MemoryChange, _: Option<&MemorySlot<()>>, _: Option<&SlotDraft<()>>) {
        self.log.lock().unwrap().push("abort");
    }
    fn commit_memory_region(&self, _: MemoryChange, _: Option<&MemorySlot<()>>, _: Option<&MemorySlot<()>>) {
        self.log.lock().unwrap().push("commit");
    }
}

#[test]
fn a_change_whose_allocation_fails_is_refused_and_changes_nothing() {
    let vm = Vm::with_hooks(Config::x86_64().with_address_spaces(1), Layered::new(Recorder::default(), X86Mmu::new()))
        .unwrap();
    vm.set_user_memory_region(&region(0, 0, 2 * MB2, 0)).unwrap();
    vm.set_user_memory_region(&region(1, 8 * MB2, 2 * MB2, 0)).unwrap();
    vm.enable_lazy_metadata().unwrap();
    let mmu = &vm.hooks().inner;
    let before = (descs(&vm), vm.memory_usage(), vm.generation(0).unwrap() & !memslots::GEN_UPDATE_IN_PROGRESS);
    let ptr0 = {
        let g = vm.read();
        g.id_to_memslot(0, 0).unwrap().arch().1.rmap().unwrap().level(1).as_ptr() as usize
    };
    vm.hooks().outer.log.lock().unwrap().clear();
    // 2 large-page arrays in prepare, then 3 rmap levels: fail at each step.
    for (n, what) in [(0, "large-page info (prepare)"), (1, "large-page info"), (2, "rmaps"), (4, "last rmap level")] {
        for (r, change) in [(region(2, 16 * MB2, MB2, 0), "create"), (region(0, 32 * MB2, 2 * MB2, 0), "move")] {
            mmu.fail_allocations_after(n);
            let e = vm.set_user_memory_region(&r).unwrap_err();
            mmu.stop_failing();
            assert_eq!(e.errno(), Errno::ENOMEM, "{change} failing at {what}: {e}");
            assert_eq!(descs(&vm), before.0, "{change} failing at {what} changed the slots");
            assert_eq!(vm.memory_usage(), before.1, "{change} failing at {what} changed memory");
            let g = vm.read();
            let p = g.id_to_memslot(0, 0).unwrap().arch().1.rmap().unwrap().level(1).as_ptr() as usize;
            assert_eq!(p, ptr0, "the old slot keeps its rmaps");
            drop(g);
            let log = std::mem::take(&mut *vm.hooks().outer.log.lock().unwrap());
            assert_eq!(log, ["prepare", "abort"], "{change} failing at {what}: outer layer not undone");
        }
    }
    assert_eq!(
        vm.set_user_memory_region(&region(2, 16 * MB2, MB2, 0)).unwrap(),
        memslots::Outcome::Changed(MemoryChange::Create)
    );
    let _ = before.2;
}

#[test]
fn enabling_inside_a_read_section_while_a_writer_waits_for_it_does_not_deadlock() {
    let vm = Arc::new(vm());
    vm.set_user_memory_region(&region(0, 0, MB2, 0)).unwrap();
    let guard_open = Arc::new(AtomicBool::new(false));
    let writer_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (vm, guard_open, writer_done) = (Arc::clone(&vm), Arc::clone(&guard_open), Arc::clone(&writer_done));
        std::thread::spawn(move || {
            let g = vm.read();
            guard_open.store(true, Ordering::SeqCst);
            // Give the writer time to publish and start waiting for this section.
            std::thread::sleep(Duration::from_millis(100));
            assert!(!writer_done.load(Ordering::SeqCst), "the writer did not wait for the open section");
            let t = Instant::now();
            assert_eq!(vm.enable_lazy_metadata(), Ok(true));
            assert!(t.elapsed() < Duration::from_secs(5));
            drop(g);
        })
    };
    while !guard_open.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    // A deadlock would hang: fail instead.
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = Arc::clone(&finished);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            if !finished.load(Ordering::SeqCst) {
                eprintln!("deadlock: enable_lazy_metadata inside a read section vs a writer waiting for it");
                std::process::exit(101);
            }
        });
    }
    // A CREATE: takes the arch lock, prepares, publishes, releases the lock,
    // then waits for the reader's section, inside which the reader enables.
    vm.set_user_memory_region(&region(1, 8 * MB2, MB2, 0)).unwrap();
    writer_done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    finished.store(true, Ordering::SeqCst);
    assert!(rmap_ptr(&vm, 0).is_some() && rmap_ptr(&vm, 1).is_some());
}

/// Real threads: a writer creating, moving, re-flagging and deleting slots,
/// an enabler enabling at a moment that sweeps across the writer's steps
/// from round to round, and readers checking that once they have seen the
/// flag, every valid slot they find has complete rmaps; at the end every
/// slot has them.
#[test]
fn enabling_races_slot_changes_on_real_threads() {
    let ms: u64 = std::env::var("MEMSLOTS_STRESS_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
    let deadline = Instant::now() + Duration::from_millis(ms);
    let checks = AtomicU64::new(0);
    let mut rounds = 0u64;
    let mut delay_ns = 0u64;
    while Instant::now() < deadline || rounds < 20 {
        rounds += 1;
        let vm = vm();
        for i in 0..8 {
            vm.set_user_memory_region(&region(i, u64::from(i) * 8 * MB2, MB2 / 4, 0)).unwrap();
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            // Writer.
            s.spawn(|| {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let id = u32::try_from(k % 8).unwrap();
                    let base = u64::from(id) * 8 * MB2;
                    let r = match k % 4 {
                        0 => region(id, base + 4 * MB2 * (k / 4 % 2), MB2 / 4, 0),
                        1 => region(id, base + 4 * MB2 * (k / 4 % 2), MB2 / 4, KVM_MEM_LOG_DIRTY_PAGES),
                        2 => region(id, 0, 0, 0),
                        _ => region(id, base, MB2 / 4, 0),
                    };
                    let _ = vm.set_user_memory_region(&r);
                }
            });
            // Reader.
            s.spawn(|| {
                let mut x = rounds;
                while !stop.load(Ordering::Relaxed) {
                    let enabled = vm.lazy_metadata_enabled();
                    let g = vm.read();
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let gfn = (x >> 33) % ((64 * MB2) >> 12);
                    if let Some(slot) = g.gfn_to_memslot(0, gfn) {
                        if enabled && !slot.is_invalid() {
                            let r = slot.arch().rmap().expect("valid slot without rmaps after the flag was seen");
                            assert_eq!(r.level(1).len() as u64, slot.npages, "incomplete rmaps");
                            checks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            // Enabler, after a delay that changes every round.
            let t = Instant::now();
            while t.elapsed() < Duration::from_nanos(delay_ns) {
                std::hint::spin_loop();
            }
            let g = vm.read();
            vm.enable_lazy_metadata().unwrap();
            drop(g);
            std::thread::sleep(Duration::from_millis(2));
            stop.store(true, Ordering::Relaxed);
        });
        delay_ns = (delay_ns * 7 + 1_300) % 200_000;
        let g = vm.read();
        for s in g.slots(0) {
            assert!(s.arch().rmap().is_some(), "slot {:?} without rmaps at the end", s.desc());
        }
    }
    let n = checks.load(Ordering::Relaxed);
    println!("{rounds} rounds, {n} reader checks after the flag");
    assert!(n > 0, "no reader ever checked");
}

#[test]
fn enable_refuses_nothing_for_vms_without_lazy_metadata() {
    let vm = Vm::new(Config::default()).unwrap();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, MB2, HVA)).unwrap();
    assert_eq!(vm.enable_lazy_metadata(), Ok(true));
    assert_eq!(vm.memory_usage().lazy_bytes, 0);
    let _: Result<bool, Error> = vm.enable_lazy_metadata();
}
