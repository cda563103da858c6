//! Flat translation tables (`src/flat.rs`): anonymous lookups
//! (`vm.gfn_to_hva`, with `std`), lookups in a held section and vCPU cache
//! misses answer from a generation-tagged copy of the address space's
//! translations. These tests check that the copy never answers for a state
//! that an update has replaced, that the tables the writer retires are
//! freed (and accounted for), and, under readers racing a writer, that a
//! reader never reaches a freed table (run under AddressSanitizer and
//! ThreadSanitizer in `.ci/sanitizers`) nor gets a translation no state had.
#![cfg(feature = "std")]

use memslots::{Config, HvaError, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const HVA: u64 = 0x7f00_0000_0000;
/// Slot `i` covers gfns `[i * 0x200, i * 0x200 + 0x10)` at `HVA + i * 2 MiB`.
const STRIDE: u64 = 0x200;
const PAGES: u64 = 0x10;

fn region(i: u32, flags: u32, base_gfn: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(i, flags, base_gfn << 12, PAGES << 12, HVA + u64::from(i) * 0x20_0000)
}

fn vm_with(n: u32) -> Vm {
    let vm = Vm::new(Config::default().with_address_spaces(1)).unwrap();
    for i in 0..n {
        vm.set_user_memory_region(&region(i, 0, u64::from(i) * STRIDE)).unwrap();
    }
    vm
}

/// The translation of `gfn` as the active set says (a section and the
/// slot itself, no flat table involved).
fn reference(vm: &Vm, gfn: u64, write: bool) -> Result<u64, HvaError> {
    let g = vm.read();
    let s = g.gfn_to_memslot(0, gfn).ok_or(HvaError::NoSlot)?;
    if s.is_invalid() {
        return Err(HvaError::Invalid);
    }
    if write && s.flags & KVM_MEM_READONLY != 0 {
        return Err(HvaError::ReadOnly);
    }
    Ok(s.userspace_addr + ((gfn - s.base_gfn) << 12))
}

/// Every way to translate agrees with the set, over enough lookups that the
/// thread's and the vCPU's tables are (re)built on the way.
fn check_all(vm: &Vm, n: u32, vcpu: &memslots::Vcpu<'_, memslots::NoArch>) {
    for round in 0..3 {
        for i in 0..u64::from(n) + 2 {
            for gfn in [i * STRIDE, i * STRIDE + PAGES - 1, i * STRIDE + PAGES, 0x40_0000 + i * STRIDE + 3] {
                let want = reference(vm, gfn, true);
                assert_eq!(vm.gfn_to_hva(0, gfn), want, "anonymous, gfn {gfn:#x}, round {round}");
                assert_eq!(vm.read().gfn_to_hva(0, gfn), want, "held section, gfn {gfn:#x}, round {round}");
                assert_eq!(vcpu.gfn_to_hva(gfn), want, "vCPU, gfn {gfn:#x}, round {round}");
                let read = reference(vm, gfn, false);
                let prot = vm.gfn_to_hva_prot(0, gfn);
                assert_eq!(prot.map(|p| p.0), read, "prot, gfn {gfn:#x}");
                assert_eq!(vcpu.gfn_to_hva_prot(gfn).map(|p| p.0), read, "vCPU prot, gfn {gfn:#x}");
            }
        }
    }
}

#[test]
fn tables_follow_every_kind_of_update() {
    for n in [1u32, 8, 40] {
        let vm = vm_with(n);
        let vcpu = vm.vcpu();
        check_all(&vm, n, &vcpu);
        // MOVE: slot 0 goes to a free range (and its old gfns have no slot).
        vm.set_user_memory_region(&region(0, 0, 0x40_0000)).unwrap();
        check_all(&vm, n, &vcpu);
        // FLAGS_ONLY: dirty logging on.
        vm.set_user_memory_region(&region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x40_0000)).unwrap();
        check_all(&vm, n, &vcpu);
        // DELETE, then CREATE read-only, then DELETE and CREATE at the old place.
        vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
        assert_eq!(vm.gfn_to_hva(0, 0x40_0001), Err(HvaError::NoSlot));
        check_all(&vm, n, &vcpu);
        vm.set_user_memory_region(&region(0, KVM_MEM_READONLY, 0x40_0000)).unwrap();
        assert_eq!(vm.gfn_to_hva(0, 0x40_0001), Err(HvaError::ReadOnly));
        assert_eq!(vm.gfn_to_hva_prot(0, 0x40_0001), Ok((HVA + 0x1000, false)));
        check_all(&vm, n, &vcpu);
        vm.set_user_memory_region(&UserMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
        vm.set_user_memory_region(&region(0, 0, 0)).unwrap();
        assert_eq!(vm.gfn_to_hva(0, 1), Ok(HVA + 0x1000));
        check_all(&vm, n, &vcpu);
    }
}

#[test]
fn a_table_is_published_once_and_freed_by_the_next_update() {
    let vm = vm_with(40);
    let without = vm.memory_usage();
    // Enough misses to build: the table is published (counted as index bytes).
    for k in 0..200u64 {
        vm.gfn_to_hva(0, (k % 40) * STRIDE).unwrap();
    }
    let with = vm.memory_usage();
    assert!(with.index_bytes >= without.index_bytes + 40 * 24, "{with:?} vs {without:?}");
    // Another thread takes the published table instead of building its own:
    // the figure does not grow.
    std::thread::scope(|s| {
        s.spawn(|| {
            for k in 0..200u64 {
                vm.gfn_to_hva(0, (k % 40) * STRIDE).unwrap();
            }
        });
    });
    assert_eq!(vm.memory_usage(), with);
    // An update frees it after its grace period.
    vm.set_user_memory_region(&region(1, KVM_MEM_LOG_DIRTY_PAGES, STRIDE)).unwrap();
    assert_eq!(vm.memory_usage().index_bytes, without.index_bytes, "freed after the update's grace period");
    // With readers about, deleting every slot still gives everything back.
    for k in 0..200u64 {
        vm.gfn_to_hva(0, (k % 40) * STRIDE).unwrap();
    }
    assert!(vm.memory_usage().index_bytes > without.index_bytes);
    for i in 0..40 {
        vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, 0, 0, 0)).unwrap();
        let _ = vm.gfn_to_hva(0, u64::from(i) * STRIDE);
    }
    assert_eq!(vm.memory_usage(), vm_with(0).memory_usage());
}

/// Readers (anonymous, held-section and vCPU lookups) race a writer that
/// moves, re-flags, deletes and re-creates slots, so that tables are built,
/// published, taken and freed all the time. Every translation must be one a
/// state of the slot had: slot `i` only ever maps gfn `g` at its own
/// `HVA + i * 2 MiB + offset`, at one of its two places; and once the writer
/// has finished an update that left slot 0 at place B (read with acquire
/// before the lookup), a lookup at place A must not succeed until the
/// writer has started moving it back.
#[test]
fn readers_racing_the_writer_see_only_real_states() {
    let n = 40u32;
    let vm = Arc::new(vm_with(n));
    let stop = Arc::new(AtomicBool::new(false));
    // Even: slot 0 at place A (gfn 0) and no move of it under way; odd: a
    // move of slot 0 away from or back to A has started.
    let phase = Arc::new(AtomicU64::new(0));
    let place_b = 0x40_0000u64;
    let rounds: u64 = if cfg!(miri) { 6 } else { 20_000 };
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (vm, stop, phase) = (Arc::clone(&vm), Arc::clone(&stop), Arc::clone(&phase));
            std::thread::spawn(move || {
                let vcpu = vm.vcpu();
                let (mut k, mut ok) = (0u64, 0u64);
                while !stop.load(Ordering::Acquire) {
                    k += 1;
                    let i = k % u64::from(n);
                    let off = k % PAGES;
                    for base in [i * STRIDE, place_b + i * STRIDE] {
                        let gfn = base + off;
                        let want = HVA + i * 0x20_0000 + (off << 12);
                        let before = phase.load(Ordering::Acquire);
                        let got = match k % 3 {
                            0 => vm.gfn_to_hva(0, gfn),
                            1 => vm.read().gfn_to_hva(0, gfn),
                            _ => vcpu.gfn_to_hva(gfn),
                        };
                        if let Ok(hva) = got {
                            assert_eq!(hva, want, "reader {r}: gfn {gfn:#x}");
                        }
                        ok += u64::from(got.is_ok());
                        if i == 0 && base == 0 && before % 4 == 2 {
                            // Slot 0 was at place B and no move back had
                            // started when the lookup began.
                            let after = phase.load(Ordering::Acquire);
                            if after == before {
                                assert!(got.is_err(), "reader {r}: stale translation {got:?} for slot 0 at A");
                            }
                        }
                    }
                }
                assert!(ok > 0, "reader {r}: no lookup succeeded");
            })
        })
        .collect();
    for round in 0..rounds {
        // Slot 0: A -> B -> A, with the phase around each move.
        phase.fetch_add(1, Ordering::AcqRel); // 4k + 1: moving to B
        vm.set_user_memory_region(&region(0, 0, place_b)).unwrap();
        phase.fetch_add(1, Ordering::AcqRel); // 4k + 2: at B
        let i = u32::try_from(1 + round % u64::from(n - 1)).unwrap();
        let flags = if round % 2 == 0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        vm.set_user_memory_region(&region(i, flags, u64::from(i) * STRIDE)).unwrap();
        phase.fetch_add(1, Ordering::AcqRel); // 4k + 3: moving back to A
        vm.set_user_memory_region(&region(0, 0, 0)).unwrap();
        phase.fetch_add(1, Ordering::AcqRel); // 4k + 4: at A
        if round % 16 == 0 {
            // DELETE and CREATE of another slot.
            let j = u32::try_from(1 + (round / 16) % u64::from(n - 1)).unwrap();
            vm.set_user_memory_region(&UserMemoryRegion::new(j, 0, 0, 0, 0)).unwrap();
            vm.set_user_memory_region(&region(j, 0, u64::from(j) * STRIDE)).unwrap();
        }
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
}
