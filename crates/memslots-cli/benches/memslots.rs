//! Benchmarks of the `memslots` library against two peers: rust-vmm's
//! `vm-memory` 0.18 `GuestRegionCollection` (as `GuestMemoryMmap`) and the
//! host kernel's `KVM_SET_USER_MEMORY_REGION` (when `/dev/kvm` is usable).
//!
//! Run with `cargo bench -p memslots-cli --bench memslots` (add a criterion
//! filter after `--`, e.g. `-- lookup_random`). Before the criterion benches it
//! prints (to stderr) a memory report (`memory_usage()` for an empty VM and for
//! every slot count), the cost of one timer read pair, an effective clock rate
//! and the load-to-use latency of random loads by working-set size: the machine
//! state the numbers were taken in.
//!
//! Layout, random tables, loops and the raw kernel peer come from the
//! benchmark harness's library (`memslots_bench`, `bench/`), shared with
//! `memslots perf`. Layout for `n` slots (one address space): slot `i` covers guest physical
//! `[i * 2 MiB, i * 2 MiB + 64 KiB)` (16 pages) at host address
//! `0x1000_0000 + i * 2 MiB`. A move sends slot `k` to `(n + k) * 2 MiB`, past
//! every slot, and back. Every implementation gets the same addresses and the
//! same random sequences.
//!
//! Benchmarks (each has the slot count as the last part of its id):
//! - `lookup_random/{memslots,memslots_held_section,vm-memory}/N`: translate a
//!   random gfn inside a random slot (from a precomputed table of 2^16).
//! - `lookup_cached/memslots_vcpu/N`: `Vcpu::gfn_to_hva` within one slot.
//! - `update/{create,move,flags,delete}/{memslots,kvm}/N`, `update/move/vm-memory/N`:
//!   the latency of one operation with `n` slots present (`iter_custom`). Move
//!   and flags alternate there-and-back on random slots, all timed; create and
//!   delete time batches of up to 32 distinct slots (at most `n / 10`) and
//!   restore the state untimed, so only the operation of interest is counted
//!   (at 10 slots a batch is one operation, so one timer read pair is included).
//! - The lookups run in one timed loop per sample (`iter_custom`) with the
//!   counter in a register; `vm-memory` is timed for `find_region` only.
//! - `build/{memslots,vm-memory}/N`: creating `n` slots one at a time from empty.

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode};
use memslots::{Config, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES};
use memslots_bench::kvm::{Kvm, RawVm};
use memslots_bench::layout::{gpa_of, hva_of, permutation, random_slots, Rng, Tables, SLOT_BYTES, STRIDE_PAGES, TABLE};
use memslots_bench::lookup::vmm_regions;
use memslots_bench::timing::{batch_len, time_alternating, time_batched, time_loop};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionCollection, GuestRegionMmap};

/// Slot counts measured.
const SIZES: [u32; 5] = [10, 100, 1000, 10_000, 32_000];

/// The peer's region type: a real (small, never touched) anonymous mapping.
type MmapCollection = GuestRegionCollection<GuestRegionMmap>;

fn region(id: u32, flags: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(id, flags, gpa, size, hva_of(id))
}

/// A 1-address-space VM with slots `0..n`.
fn build_vm(n: u32) -> Vm {
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).expect("config");
    for i in 0..n {
        vm.set_user_memory_region(&region(i, 0, gpa_of(i), SLOT_BYTES)).expect("create slot");
    }
    vm
}

// ---------------------------------------------------------------------------
// The kernel peer.

/// A KVM VM holding slots `0..n` (no vCPU: the shared raw-ioctl helper).
struct KvmVm(RawVm);

impl KvmVm {
    fn set(&self, slot: u32, flags: u32, gpa: u64, size: u64) {
        self.0.set(slot, flags, gpa, size).expect("KVM_SET_USER_MEMORY_REGION");
    }

    fn new(kvm: &Kvm, n: u32) -> Option<KvmVm> {
        let k = match RawVm::new(kvm) {
            Ok(vm) => KvmVm(vm),
            Err(e) => {
                eprintln!("SKIP kvm peer at {n} slots: {e}");
                return None;
            }
        };
        for i in 0..n {
            k.set(i, 0, gpa_of(i), SLOT_BYTES);
        }
        Some(k)
    }
}

/// The KVM handle, or why the peer is skipped.
fn open_kvm() -> Option<Kvm> {
    match memslots_bench::kvm::open() {
        Ok((kvm, nr)) => {
            eprintln!("kvm peer: KVM_CAP_NR_MEMSLOTS = {nr}");
            let max = SIZES.iter().copied().max().unwrap_or(0);
            if max > nr {
                eprintln!("note: kvm peer skipped for slot counts above {nr}");
            }
            Some(kvm)
        }
        Err(e) => {
            eprintln!("SKIP kvm peer: {e}");
            None
        }
    }
}

/// Regions `0..n`, each a 64 KiB anonymous mapping (never touched).
fn mmap_regions(n: u32) -> Vec<Arc<GuestRegionMmap>> {
    vmm_regions(n).expect("mmap regions")
}

// ---------------------------------------------------------------------------
// Reports printed before the benches.

fn memory_report() {
    eprintln!("memory report: memslots metadata (Vm::memory_usage), slots of 16 pages, no dirty logging");
    eprintln!(
        "{:<34} {:>7} {:>12} {:>10} {:>12} {:>12} {:>10} {:>14}",
        "vm", "slots", "total B", "fixed B", "slot B", "index B", "bitmap B", "B/slot"
    );
    let print = |label: &str, vm: &Vm| {
        let u = vm.memory_usage();
        eprintln!(
            "{label:<34} {:>7} {:>12} {:>10} {:>12} {:>12} {:>10} {:>14.1}",
            u.slots,
            u.total(),
            u.fixed_bytes,
            u.slot_bytes,
            u.index_bytes,
            u.bitmap_bytes,
            u.bytes_per_slot()
        );
    };
    print("empty, default Config (2 AS)", &Vm::new(Config::default()).expect("config"));
    print("empty, 1 AS", &Vm::new(Config::x86_64().with_address_spaces(1)).expect("config"));
    for n in SIZES {
        print(&format!("{n} slots, 1 AS"), &build_vm(n));
    }
}

/// What one `Instant::now()` + `elapsed()` pair adds to a timed operation.
fn timer_report() {
    const N: u32 = 1_000_000;
    let start = Instant::now();
    let mut sum = Duration::ZERO;
    for _ in 0..N {
        let t = Instant::now();
        sum += black_box(t).elapsed();
    }
    let per = start.elapsed() / N;
    eprintln!(
        "timer overhead: ~{per:?} per Instant::now()+elapsed() (update/create and update/delete pay it once per \
         batch of up to 32 operations, update/move and update/flags once per sample)"
    );
    black_box(sum);

    // A dependent xorshift chain: 3 x (shift, xor) = 6 cycles an iteration on
    // a core that runs this thread undisturbed. A low figure means the core was
    // shared (other processes) or clocked down while the benches ran.
    const ITERS: u32 = 100_000_000;
    let start = Instant::now();
    let mut x = black_box(0x1234_5678_9abc_def1u64);
    for _ in 0..ITERS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    black_box(x);
    let ghz = 6.0 * f64::from(ITERS) / (start.elapsed().as_secs_f64() * 1e9);
    eprintln!("effective clock: ~{ghz:.2} GHz (6-cycle dependent xorshift step; low means a shared or throttled core)");
}

/// Latency of one dependent random load for working sets from L1 to DRAM
/// size (the harness's pointer chase): what a cache miss costs on this
/// machine today, to read the lookup numbers against.
fn memory_latency_report() {
    let mut out = String::new();
    for kib in [32usize, 256, 1024, 4096, 16_384, 65_536] {
        out.push_str(&format!(" {kib} KiB: {:.1} ns;", memslots_bench::load_latency_ns(kib)));
    }
    eprintln!("load-to-use latency, random pointer chase:{out}");
}

// ---------------------------------------------------------------------------
// Benches for one slot count.

fn lookup_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2)).sample_size(50);
    g
}

fn update_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2)).sample_size(30);
    g
}

fn build_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat);
    g
}

/// Fixtures for one slot count, built on first use so that a filter that
/// selects nothing at this count builds nothing.
struct Fixtures<'k> {
    n: u32,
    kvm: Option<&'k Kvm>,
    vm: Option<Vm>,
    mmap: Option<(Vec<Arc<GuestRegionMmap>>, MmapCollection)>,
    kvm_vm: Option<Option<KvmVm>>,
}

impl<'k> Fixtures<'k> {
    fn vm(&mut self) -> &Vm {
        let n = self.n;
        self.vm.get_or_insert_with(|| build_vm(n))
    }

    fn mmap(&mut self) -> &mut (Vec<Arc<GuestRegionMmap>>, MmapCollection) {
        let n = self.n;
        self.mmap.get_or_insert_with(|| {
            let regions = mmap_regions(n);
            let coll = MmapCollection::from_arc_regions(regions.clone()).expect("sorted, disjoint");
            (regions, coll)
        })
    }

    fn kvm_vm(&mut self) -> Option<&KvmVm> {
        let (n, kvm) = (self.n, self.kvm);
        self.kvm_vm.get_or_insert_with(|| kvm.and_then(|k| KvmVm::new(k, n))).as_ref()
    }
}

fn bench_lookups(c: &mut Criterion, f: &mut Fixtures<'_>) {
    let n = f.n;
    let tables = Tables::new(n);
    let gfns = &tables.gfns[..];
    let gfn_at = |i: usize| gfns[i & (TABLE - 1)];

    let mut g = lookup_group(c, "lookup_random");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        let vm = f.vm();
        b.iter_custom(|iters| {
            time_loop(iters, |i| {
                let _ = black_box(vm.gfn_to_hva(0, black_box(gfn_at(i))));
            })
        });
    });
    g.bench_function(BenchmarkId::new("memslots_held_section", n), |b| {
        let vm = f.vm();
        let reader = vm.reader();
        let guard = reader.read();
        b.iter_custom(|iters| {
            time_loop(iters, |i| {
                let _ = black_box(guard.gfn_to_hva(0, black_box(gfn_at(i))));
            })
        });
    });
    g.bench_function(BenchmarkId::new("vm-memory", n), |b| {
        let (_, coll) = f.mmap();
        let coll = &*coll;
        b.iter_custom(|iters| {
            time_loop(iters, |i| {
                black_box(coll.find_region(GuestAddress(black_box(gfn_at(i) << 12))));
            })
        });
    });
    g.finish();

    let mut g = lookup_group(c, "lookup_cached");
    g.bench_function(BenchmarkId::new("memslots_vcpu", n), |b| {
        let vm = f.vm();
        let vcpu = vm.vcpu();
        let base = u64::from(n / 2) * STRIDE_PAGES;
        let offset = |i: usize| u64::try_from(i & 15).unwrap_or(0);
        b.iter_custom(|iters| {
            time_loop(iters, |i| {
                let _ = black_box(vcpu.gfn_to_hva(black_box(base + offset(i))));
            })
        });
    });
    g.finish();
}

fn bench_updates(c: &mut Criterion, f: &mut Fixtures<'_>) {
    let n = f.n;
    let slots = random_slots(&mut Rng::new(0xc0ffee ^ u64::from(n)), n, TABLE);
    let perm = permutation(&mut Rng::new(0xbeef ^ u64::from(n)), n);
    let batch = batch_len(n, 32);
    let mut cursor = 0usize;
    let create = |k: u32| region(k, 0, gpa_of(k), SLOT_BYTES);
    let delete = |k: u32| region(k, 0, gpa_of(k), 0);
    let moved = |k: u32| region(k, 0, gpa_of(n + k), SLOT_BYTES);
    let logged = |k: u32| region(k, KVM_MEM_LOG_DIRTY_PAGES, gpa_of(k), SLOT_BYTES);
    let set = |vm: &Vm, r: &UserMemoryRegion| {
        black_box(vm.set_user_memory_region(black_box(r)).expect("update"));
    };

    // create
    let mut g = update_group(c, "update/create");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        let vm = f.vm();
        b.iter_custom(|iters| {
            time_batched(iters, &perm, &mut cursor, batch, |k| set(vm, &delete(k)), |k| set(vm, &create(k)), |_| ())
        });
    });
    if f.kvm.is_some() {
        g.bench_function(BenchmarkId::new("kvm", n), |b| {
            let Some(kvm) = f.kvm_vm() else { return };
            b.iter_custom(|iters| {
                time_batched(
                    iters,
                    &perm,
                    &mut cursor,
                    batch,
                    |k| kvm.set(k, 0, gpa_of(k), 0),
                    |k| kvm.set(k, 0, gpa_of(k), SLOT_BYTES),
                    |_| (),
                )
            });
        });
    }
    g.finish();

    // delete
    let mut g = update_group(c, "update/delete");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        let vm = f.vm();
        b.iter_custom(|iters| {
            time_batched(iters, &perm, &mut cursor, batch, |_| (), |k| set(vm, &delete(k)), |k| set(vm, &create(k)))
        });
    });
    if f.kvm.is_some() {
        g.bench_function(BenchmarkId::new("kvm", n), |b| {
            let Some(kvm) = f.kvm_vm() else { return };
            b.iter_custom(|iters| {
                time_batched(
                    iters,
                    &perm,
                    &mut cursor,
                    batch,
                    |_| (),
                    |k| kvm.set(k, 0, gpa_of(k), 0),
                    |k| kvm.set(k, 0, gpa_of(k), SLOT_BYTES),
                )
            });
        });
    }
    g.finish();

    // move
    let mut g = update_group(c, "update/move");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        let vm = f.vm();
        b.iter_custom(|iters| {
            time_alternating(iters, &slots, &mut cursor, |k, there| set(vm, &if there { moved(k) } else { create(k) }))
        });
    });
    if f.kvm.is_some() {
        g.bench_function(BenchmarkId::new("kvm", n), |b| {
            let Some(kvm) = f.kvm_vm() else { return };
            b.iter_custom(|iters| {
                time_alternating(iters, &slots, &mut cursor, |k, there| {
                    kvm.set(k, 0, gpa_of(if there { n + k } else { k }), SLOT_BYTES);
                })
            });
        });
    }
    g.bench_function(BenchmarkId::new("vm-memory", n), |b| {
        let (_, coll) = f.mmap();
        // One move: remove the region, make a region for the same mapping at
        // the new address, insert it; the superseded collections are dropped.
        b.iter_custom(|iters| {
            time_alternating(iters, &slots, &mut cursor, |k, there| {
                let (from, to) = if there { (gpa_of(k), gpa_of(n + k)) } else { (gpa_of(n + k), gpa_of(k)) };
                let (without, old) = coll.remove_region(GuestAddress(from), SLOT_BYTES).expect("remove_region");
                let new = GuestRegionMmap::with_arc(old.get_mmap(), GuestAddress(to)).expect("region");
                *coll = without.insert_region(Arc::new(new)).expect("insert_region");
            })
        });
    });
    g.finish();

    // flags
    let mut g = update_group(c, "update/flags");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        let vm = f.vm();
        b.iter_custom(|iters| {
            time_alternating(iters, &slots, &mut cursor, |k, there| set(vm, &if there { logged(k) } else { create(k) }))
        });
    });
    if f.kvm.is_some() {
        g.bench_function(BenchmarkId::new("kvm", n), |b| {
            let Some(kvm) = f.kvm_vm() else { return };
            b.iter_custom(|iters| {
                time_alternating(iters, &slots, &mut cursor, |k, there| {
                    kvm.set(k, if there { KVM_MEM_LOG_DIRTY_PAGES } else { 0 }, gpa_of(k), SLOT_BYTES);
                })
            });
        });
    }
    g.finish();
}

fn bench_builds(c: &mut Criterion, f: &mut Fixtures<'_>) {
    let n = f.n;
    let mut g = build_group(c, "build");
    g.bench_function(BenchmarkId::new("memslots", n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let vm = Vm::new(Config::x86_64().with_address_spaces(1)).expect("config");
                let t = Instant::now();
                for i in 0..n {
                    black_box(vm.set_user_memory_region(&region(i, 0, gpa_of(i), SLOT_BYTES)).expect("create"));
                }
                total += t.elapsed();
                drop(vm);
            }
            total
        });
    });
    g.bench_function(BenchmarkId::new("vm-memory", n), |b| {
        // The mappings exist beforehand (they are the guest memory, not the
        // collection's metadata); only the insertions are timed.
        let (regions, _) = f.mmap();
        let regions = &*regions;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut coll = MmapCollection::new();
                for r in regions {
                    coll = coll.insert_region(Arc::clone(r)).expect("insert_region");
                }
                total += t.elapsed();
                drop(black_box(coll));
            }
            total
        });
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().without_plots().configure_from_args();
    memory_report();
    timer_report();
    memory_latency_report();
    let kvm = open_kvm();
    for n in SIZES {
        let fits = kvm.as_ref().filter(|k| usize::try_from(n).is_ok_and(|n| n <= k.get_nr_memslots()));
        let mut f = Fixtures { n, kvm: fits, vm: None, mmap: None, kvm_vm: None };
        bench_lookups(&mut c, &mut f);
        bench_updates(&mut c, &mut f);
        bench_builds(&mut c, &mut f);
        // Fixtures (mappings, the KVM VM) are dropped here, before the next count.
    }
    c.final_summary();
}
