//! Cost of a slot update through the library + KVM backend versus the raw
//! KVM_SET_USER_MEMORY_REGION ioctl alone, at 100 and 32000 slots.
//!
//! `cargo bench -p memslots-kvm --bench backend`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use memslots::UserMemoryRegion;
use std::time::{Duration, Instant};

const HVA: u64 = 0x1000_0000;
const STRIDE: u64 = 0x20_0000; // 2 MiB between slots; each slot 64 KiB
const SIZE: u64 = 0x1_0000;

fn gpa(i: u32) -> u64 {
    u64::from(i) * STRIDE
}

fn raw_set(vm: &VmFd, slot: u32, flags: u32, gpa: u64, size: u64) {
    let r = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: HVA + u64::from(slot) * STRIDE,
    };
    // SAFETY: no vCPU is ever created on this VM: the kernel never touches the host ranges.
    unsafe { vm.set_user_memory_region(r) }.expect("ioctl");
}

fn bench(c: &mut Criterion) {
    if !memslots_kvm::kvm_available() {
        eprintln!("SKIP backend benchmarks: /dev/kvm is not available");
        return;
    }
    let mut g = c.benchmark_group("backend_update");
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for n in [100u32, 32_000] {
        let k = n / 2; // the slot that moves
        let away = gpa(n + 1);
        let hva = HVA + u64::from(k) * STRIDE;
        // Both VMs live side by side, and each benchmark runs the other side's
        // move untimed between its own timed moves: both are measured in the
        // same pattern (each timed move follows an ioctl on the other VM), a
        // few seconds apart. `memslots perf` interleaves per operation too,
        // with both sides timed in the same rounds.
        let kvm = Kvm::new().unwrap();
        let raw = kvm.create_vm().unwrap();
        for i in 0..n {
            raw_set(&raw, i, 0, gpa(i), SIZE);
        }
        // Unrestricted: no vCPU can be created, so the fake host ranges are harmless.
        let vm = memslots_kvm::new_kvm_vm().unwrap();
        for i in 0..n {
            vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa(i), SIZE, HVA + u64::from(i) * STRIDE)).unwrap();
        }
        let to = |it: u64| if it.is_multiple_of(2) { away } else { gpa(k) };
        let raw_move = |it: u64| raw_set(&raw, k, 0, to(it), SIZE);
        let lib_move = |it: u64| vm.set_user_memory_region(&UserMemoryRegion::new(k, 0, to(it), SIZE, hva)).unwrap();
        // After an odd number of moves both sides are away: bring them home, untimed.
        let home = |iters: u64| {
            if iters % 2 == 1 {
                raw_move(iters);
                lib_move(iters);
            }
        };
        g.bench_function(BenchmarkId::new("move/kvm ioctl alone", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for it in 0..iters {
                    lib_move(it);
                    let t = Instant::now();
                    raw_move(it);
                    total += t.elapsed();
                }
                home(iters);
                total
            })
        });
        g.bench_function(BenchmarkId::new("move/memslots + kvm", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for it in 0..iters {
                    raw_move(it);
                    let t = Instant::now();
                    lib_move(it);
                    total += t.elapsed();
                }
                home(iters);
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
