//! Cost of a slot update through the library + KVM backend versus the raw
//! KVM_SET_USER_MEMORY_REGION ioctl alone, at 100 and 32000 slots.
//!
//! `cargo bench -p memslots-cli --bench backend`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memslots::UserMemoryRegion;
use memslots_bench::kvm::{Kvm, RawVm};
use memslots_bench::layout::{gpa_of as gpa, hva_of, SLOT_BYTES as SIZE};
use std::time::{Duration, Instant};

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
        let hva = hva_of(k);
        // Both VMs live side by side, and each benchmark runs the other side's
        // move untimed between its own timed moves: both are measured in the
        // same pattern (each timed move follows an ioctl on the other VM), a
        // few seconds apart. `memslots perf` interleaves per operation too,
        // with both sides timed in the same rounds.
        let kvm = Kvm::new().unwrap();
        let raw = RawVm::new(&kvm).unwrap();
        for i in 0..n {
            raw.set(i, 0, gpa(i), SIZE).unwrap();
        }
        // Unrestricted: no vCPU can be created, so the fake host ranges are harmless.
        let vm = memslots_kvm::new_kvm_vm().unwrap();
        for i in 0..n {
            vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa(i), SIZE, hva_of(i))).unwrap();
        }
        let to = |it: u64| if it.is_multiple_of(2) { away } else { gpa(k) };
        let raw_move = |it: u64| raw.set(k, 0, to(it), SIZE).unwrap();
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
