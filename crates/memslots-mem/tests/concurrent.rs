//! Guest memory access while another thread moves, deletes and re-creates
//! slots and unmaps the memory behind them.
//!
//! Every mapping is filled with a non-zero byte unique to its generation
//! before a slot points into it, and unmapped once no slot does. A read that
//! used a mapping after it was unmapped would crash, or see another
//! generation's bytes (the kernel reuses addresses) or zeros: every
//! successful read must see one generation's byte throughout each slot.
//!
//! Under valgrind (see the crate README): build with `cargo test -p
//! memslots-mem --test concurrent --no-run`, then run the test binary under
//! `valgrind --error-exitcode=1 <binary> --test-threads=1`
//! (`MEMSLOTS_MEM_STRESS_MS` shortens or lengthens the stress phase).

// Tests run on 64-bit Linux: guest sizes fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use memslots::{Config, UserMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use memslots_mem::vm_memory::Bytes;
use memslots_mem::{Access, AccessErrorKind, GuestMemory, MapOptions};

const SLOT: u64 = 0x1_0000; // 64 KiB
const G0: u64 = 0x10_0000;
const G1: u64 = 0x40_0000;
const G2: u64 = 0x80_0000;
const STABLE: u8 = 0xee;
const DECOY: u8 = 0xbd;

fn stress_time() -> Duration {
    let ms = std::env::var("MEMSLOTS_MEM_STRESS_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(1500);
    Duration::from_millis(ms)
}

/// All bytes equal and not zero: one generation's content.
fn uniform(buf: &[u8]) -> Option<u8> {
    let b = *buf.first()?;
    (b != 0 && buf.iter().all(|&x| x == b)).then_some(b)
}

#[test]
fn readers_see_old_or_new_never_garbage() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    // A stable slot right after G0's: reads spanning both see the stable
    // bytes after whatever slot 0 holds.
    let stable = mem.map_anonymous(SLOT, &MapOptions::new()).unwrap();
    stable.fill(0, stable.len(), STABLE).unwrap();
    mem.set_region(1, 0, G0 + SLOT, &stable, 0, SLOT).unwrap();

    // Mapped but never registered: a slot over it is unbacked. Reading
    // DECOY bytes would mean an unbacked slot was accessed.
    let decoy = memslots_mem::HostMemory::anonymous(SLOT, &MapOptions::new()).unwrap();
    decoy.fill(0, decoy.len(), DECOY).unwrap();
    let decoy_region = UserMemoryRegion::new(2, 0, G2, SLOT, decoy.addr());

    let stop = AtomicBool::new(false);
    let generations = AtomicU64::new(0);
    let ok_reads = AtomicU64::new(0);
    let failed_reads = AtomicU64::new(0);

    thread::scope(|s| {
        // Writer: create at G0 -> move to G1 -> toggle dirty logging -> move
        // back -> delete -> unmap; each generation in a fresh mapping.
        s.spawn(|| {
            let deadline = Instant::now() + stress_time();
            let mut k = 0u64;
            while Instant::now() < deadline || k < 20 {
                let pattern = (k % 250) as u8 + 1;
                let m = mem.map_anonymous(SLOT, &MapOptions::new()).unwrap();
                m.fill(0, m.len(), pattern).unwrap();
                mem.set_region(0, 0, G0, &m, 0, SLOT).unwrap();
                // An unbacked slot comes and goes: reads switch between the
                // fast path (all slots backed) and the checked one.
                mem.vm().set_user_memory_region(&decoy_region).unwrap();
                mem.set_region(0, 0, G1, &m, 0, SLOT).unwrap();
                mem.delete_region(2).unwrap();
                mem.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, G1, &m, 0, SLOT).unwrap();
                mem.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, G0, &m, 0, SLOT).unwrap();
                mem.delete_region(0).unwrap();
                assert!(mem.unregister(&m));
                let weak = Arc::downgrade(&m);
                drop(m);
                // The delete waited for every reader that could see the slot:
                // nothing holds the mapping any more, it is unmapped now.
                assert!(weak.upgrade().is_none(), "mapping still alive after delete");
                k += 1;
            }
            generations.store(k, Ordering::Relaxed);
            stop.store(true, Ordering::Release);
        });

        // Reader 1: VM sections, 128 KiB spanning slot 0 and the stable slot, and G1.
        s.spawn(|| {
            let mut buf = vec![0u8; 2 * SLOT as usize];
            while !stop.load(Ordering::Acquire) {
                buf.fill(0);
                match mem.read(0, G0, &mut buf) {
                    Ok(()) => {
                        assert!(uniform(&buf[..SLOT as usize]).is_some(), "garbage in slot 0");
                        assert_eq!(uniform(&buf[SLOT as usize..]), Some(STABLE));
                        ok_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(matches!(e.kind, AccessErrorKind::NoSlot | AccessErrorKind::Invalid), "{e}");
                        assert_eq!((e.done, e.gpa), (0, G0));
                        assert!(buf.iter().all(|&b| b == 0));
                        failed_reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let mut d = [0u8; 64];
                let e = mem.read(0, G2, &mut d).unwrap_err();
                assert!(matches!(
                    e.kind,
                    AccessErrorKind::NoSlot | AccessErrorKind::Invalid | AccessErrorKind::Unbacked
                ));
                assert!(d.iter().all(|&b| b == 0), "read an unbacked slot");
                let e = mem.read_obj::<u64>(0, G2 + 8).unwrap_err();
                assert!(matches!(
                    e.kind,
                    AccessErrorKind::NoSlot | AccessErrorKind::Invalid | AccessErrorKind::Unbacked
                ));
                let mut b1 = vec![0u8; SLOT as usize];
                match mem.read(0, G1, &mut b1) {
                    Ok(()) => assert!(uniform(&b1).is_some(), "garbage at G1"),
                    Err(e) => assert!(matches!(e.kind, AccessErrorKind::NoSlot | AccessErrorKind::Invalid), "{e}"),
                }
            }
        });

        // Reader 2: a vCPU doing small reads, atomics, and a volatile slice
        // held across a yield (a long "copy"), writing into it too.
        s.spawn(|| {
            let vcpu = mem.vcpu();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                let off = (i * 8 * 37) % SLOT;
                if let Ok(v) = vcpu.read_obj::<u64>(G0 + off) {
                    let bytes = v.to_le_bytes();
                    assert!(uniform(&bytes).is_some(), "garbage object {v:#x}");
                }
                if let Ok(v) = vcpu.load::<u32>(G0 + off, Ordering::Acquire) {
                    assert!(uniform(&v.to_le_bytes()).is_some(), "garbage atomic {v:#x}");
                }
                let g = vcpu.section();
                if let Ok(slice) = g.slice(G0, SLOT as usize, Access::Read) {
                    let mut first = vec![0u8; 4096];
                    slice.read_slice(&mut first, 0).unwrap();
                    thread::yield_now();
                    let mut last = vec![0u8; 4096];
                    slice.read_slice(&mut last, SLOT as usize - 4096).unwrap();
                    let a = uniform(&first).expect("garbage in slice");
                    assert_eq!(uniform(&last), Some(a), "the slot changed under a read section");
                }
            }
        });
    });
    assert_eq!(mem.mem_hooks().unbacked_slots(), 0);
    let k = generations.load(Ordering::Relaxed);
    let ok = ok_reads.load(Ordering::Relaxed);
    eprintln!("{k} generations, {ok} full reads ok, {} failed cleanly", failed_reads.load(Ordering::Relaxed));
    assert!(k >= 20);
}

#[test]
fn a_section_pins_the_mapping_until_it_ends() {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let m = mem.map_anonymous(SLOT, &MapOptions::new()).unwrap();
    m.fill(0, m.len(), 0x42).unwrap();
    mem.set_region(0, 0, G0, &m, 0, SLOT).unwrap();
    let weak = Arc::downgrade(&m);
    let deleted = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();

    thread::scope(|s| {
        let g = mem.section();
        let slice = g.slice(0, G0, SLOT as usize, Access::Write).unwrap();
        // The writer deletes the slot and drops every other reference to the
        // mapping while we are mid-"copy".
        let (mem, deleted) = (&mem, &deleted);
        s.spawn(move || {
            rx.recv().unwrap();
            mem.delete_region(0).unwrap();
            deleted.store(true, Ordering::SeqCst);
        });
        mem.unregister(&m);
        drop(m);
        tx.send(()).unwrap();
        thread::sleep(Duration::from_millis(100));
        // The delete waits for this section: the slot, and its mapping, are intact.
        assert!(!deleted.load(Ordering::SeqCst));
        assert!(weak.upgrade().is_some());
        let mut buf = vec![0u8; SLOT as usize];
        slice.read_slice(&mut buf, 0).unwrap();
        assert_eq!(uniform(&buf), Some(0x42));
        slice.write_slice(&[0x43; 16], 0).unwrap();
        drop(g);
    });
    assert!(deleted.load(Ordering::SeqCst));
    assert!(weak.upgrade().is_none(), "unmapped once the last slot using it is gone");
    assert_eq!(mem.read(0, G0, &mut [0u8; 1]).unwrap_err().kind, AccessErrorKind::NoSlot);
}
