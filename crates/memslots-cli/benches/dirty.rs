//! Dirty-logging benchmarks: marking a page, harvesting a 64 GiB slot (none
//! and 1% of pages dirty) with and without manual protect, pushing to a dirty
//! ring; vm-memory 0.18's `AtomicBitmap` measured beside ours.
//!
//! `cargo bench -p memslots-cli --bench dirty`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memslots::{Config, DirtyMark, UserMemoryRegion, Vm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES};
use memslots_bench::layout::{random_below, HVA_BASE as HVA};
use memslots_bench::timing::{time_after, time_table};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};

const PAGE: u64 = 4096;

/// A VM with one logging slot of `pages` pages at gfn 0.
fn logging_vm(pages: u64, manual: bool) -> Vm {
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).unwrap();
    if manual {
        vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).unwrap();
    }
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, pages * PAGE, HVA)).unwrap();
    vm
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("fits in usize")
}

fn mark(c: &mut Criterion) {
    let pages = 1 << 18; // 1 GiB slot
    let idx = random_below(1 << 16, pages, 7);
    let mut g = c.benchmark_group("mark_page_dirty");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    let vm = logging_vm(pages, false);
    let vcpu = vm.vcpu();
    g.bench_function("memslots/vcpu (section per call)", |b| {
        b.iter_custom(|n| {
            time_table(n, |i| {
                let _ = black_box(vcpu.mark_page_dirty(idx[i]));
            })
        })
    });
    let guard = vcpu.read();
    g.bench_function("memslots/vcpu (held section)", |b| {
        b.iter_custom(|n| {
            time_table(n, |i| {
                let _ = black_box(guard.mark_page_dirty(idx[i]));
            })
        })
    });
    drop(guard);
    let bitmap = AtomicBitmap::new(usize_of(pages * PAGE), NonZeroUsize::new(4096).unwrap());
    g.bench_function("vm-memory/AtomicBitmap::mark_dirty", |b| {
        b.iter_custom(|n| time_table(n, |i| bitmap.mark_dirty(usize_of(idx[i] * PAGE), 1)))
    });
    g.finish();
}

fn harvest(c: &mut Criterion) {
    let pages: u64 = 1 << 24; // 64 GiB slot: 16 Mi pages
    let words = usize_of(pages / 64);
    let dirty = random_below(usize_of(pages / 100), pages, 11); // 1% of pages
    let mut g = c.benchmark_group("harvest_64GiB");
    g.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (label, marks) in [("none dirty", &dirty[..0]), ("1% dirty", &dirty[..])] {
        let mut buf = vec![0u64; words];
        // Without manual protect: GET takes and clears.
        let vm = logging_vm(pages, false);
        let vcpu = vm.vcpu();
        let mark = || {
            let guard = vcpu.read();
            for &p in marks {
                assert_eq!(guard.mark_page_dirty(p), DirtyMark::Marked);
            }
        };
        g.bench_function(BenchmarkId::new("memslots/get_dirty_log", label), |b| {
            b.iter_custom(|iters| {
                time_after(iters, mark, || {
                    vm.get_dirty_log(0, &mut buf).unwrap();
                    black_box(&buf);
                })
            })
        });
        g.bench_function(BenchmarkId::new("memslots/harvest_dirty_log (callback)", label), |b| {
            b.iter_custom(|iters| {
                time_after(iters, mark, || {
                    let mut pages = 0u64;
                    vm.harvest_dirty_log(0, |_, bits| pages += u64::from(bits.count_ones())).unwrap();
                    black_box(pages);
                })
            })
        });
        // Manual protect: GET copies, CLEAR clears what was returned.
        let vm = logging_vm(pages, true);
        let vcpu = vm.vcpu();
        let mark = || {
            let guard = vcpu.read();
            for &p in marks {
                assert_eq!(guard.mark_page_dirty(p), DirtyMark::Marked);
            }
        };
        let n = u32::try_from(pages).unwrap();
        g.bench_function(BenchmarkId::new("memslots/get+clear (manual protect)", label), |b| {
            b.iter_custom(|iters| {
                time_after(iters, mark, || {
                    vm.get_dirty_log(0, &mut buf).unwrap();
                    vm.clear_dirty_log(0, 0, n, &buf).unwrap();
                })
            })
        });
        let bitmap = AtomicBitmap::new(usize_of(pages * PAGE), NonZeroUsize::new(4096).unwrap());
        g.bench_function(BenchmarkId::new("vm-memory/AtomicBitmap::get_and_reset", label), |b| {
            b.iter_custom(|iters| {
                time_after(
                    iters,
                    || marks.iter().for_each(|&p| bitmap.mark_dirty(usize_of(p * PAGE), 1)),
                    || {
                        black_box(bitmap.get_and_reset());
                    },
                )
            })
        });
    }
    g.finish();
}

fn ring(c: &mut Criterion) {
    let pages = 1 << 18;
    let idx = random_below(1 << 16, pages, 13);
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).unwrap();
    vm.enable_dirty_log_ring(65536 * 16).unwrap();
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, pages * PAGE, HVA)).unwrap();
    let vcpu = vm.vcpu();
    let batch = 60_000u64; // below the soft limit (65536 - 64)
    let mut g = c.benchmark_group("dirty_ring");
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    g.bench_function("memslots/push (held section)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            let mut i = 0usize;
            while left > 0 {
                let n = left.min(batch);
                let guard = vcpu.read();
                let t = Instant::now();
                for _ in 0..n {
                    i = (i + 1) & 0xffff;
                    let _ = black_box(guard.mark_page_dirty(idx[i]));
                }
                total += t.elapsed();
                drop(guard);
                vm.harvest_dirty_rings(|_, e| {
                    black_box(e);
                });
                vm.reset_dirty_rings().unwrap();
                left -= n;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, mark, harvest, ring);
criterion_main!(benches);
