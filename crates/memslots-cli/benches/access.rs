//! Guest memory access benchmarks: memslots-mem against rust-vmm's
//! `vm-memory` 0.18 `GuestMemoryMmap`, and against plain `memcpy`.
//!
//! Run with `cargo bench -p memslots-cli --bench access` (a criterion filter
//! may follow `--`). Short measurement times: the whole run takes well under
//! a minute.
//!
//! - `read_obj_u64/*/32000`: an 8-byte `read_obj` at a random guest address
//!   (random slot, random 8-byte aligned offset; a precomputed table of 2^16)
//!   with 32,000 slots of 16 KiB, at `i * 2 MiB`. `memslots` opens a read
//!   section per access (`GuestMemory::read_obj`); `memslots_held_section`
//!   reuses one; `memslots_vcpu` goes through a vCPU handle (per-access
//!   section, vCPU slot cache); `memslots_snapshot` is the vm-memory `Bytes`
//!   impl over a memslots snapshot; `vm-memory` is `GuestMemoryMmap::read_obj`
//!   with one mapping per region.
//! - `read_obj_u64_aliased/*/32000`: the same, but every slot and region
//!   aliases one 16 KiB host range: data always in cache and TLB, so only the
//!   access path (lookup, checks, copy) is measured. The `breakdown_*`
//!   entries time the lookups alone (memslots `gfn_to_hva`, `gfn_to_memslot`
//!   plus a read of the slot, vm-memory `find_region`).
//! - `copy_64k/*`: a 64 KiB read from guest memory into a buffer:
//!   `memslots` (`GuestMemory::read`), `memcpy` (`copy_nonoverlapping` from the
//!   same host memory), `vm-memory` (`read_slice` on `GuestMemoryMmap`).

// A 64-bit host: sizes fit in usize.
#![allow(clippy::cast_possible_truncation, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use memslots::Config;
use memslots_bench::layout::{random_gpas, STRIDE};
use memslots_bench::timing::time_table;
use memslots_mem::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use memslots_mem::{GuestMemory, MapOptions};

const SLOTS: u64 = 32_000;
const SLOT_BYTES: u64 = 0x4000;
const COPY: usize = 64 * 1024;

/// Random 8-byte aligned guest addresses in the 32,000 slots (the shared
/// helper; a table of 2^16).
fn table(seed: u64) -> Vec<u64> {
    random_gpas(SLOTS, SLOT_BYTES, seed)
}

/// Keeps a result alive for the optimiser.
fn consume<T>(v: T) {
    black_box(v);
}

fn bench_read_obj(c: &mut Criterion) {
    let gpas = table(1);
    let mem = GuestMemory::new(Config::default()).unwrap();
    let ram = mem.map_anonymous(SLOTS * SLOT_BYTES, &MapOptions::new().no_reserve(true)).unwrap();
    for i in 0..SLOTS {
        mem.set_region(i as u32, 0, i * STRIDE, &ram, i * SLOT_BYTES, SLOT_BYTES).unwrap();
    }
    let ranges: Vec<(GuestAddress, usize)> =
        (0..SLOTS).map(|i| (GuestAddress(i * STRIDE), SLOT_BYTES as usize)).collect();
    let gm = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    let snap = mem.snapshot(0);
    // Fault the zero page in everywhere the benches read, on both sides.
    for &g in &gpas {
        let _: u64 = mem.read_obj(0, g).unwrap();
        let _: u64 = gm.read_obj(GuestAddress(g)).unwrap();
    }

    let mut group = c.benchmark_group("read_obj_u64");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2)).sample_size(30);
    let id = |name| BenchmarkId::new(name, SLOTS);
    group.bench_function(id("memslots"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(mem.read_obj::<u64>(0, black_box(gpas[i])))))
    });
    group.bench_function(id("memslots_held_section"), |b| {
        b.iter_custom(|n| {
            let g = mem.section();
            time_table(n, |i| consume(g.read_obj::<u64>(0, black_box(gpas[i]))))
        })
    });
    let vcpu = mem.vcpu();
    group.bench_function(id("memslots_vcpu"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(vcpu.read_obj::<u64>(black_box(gpas[i])))))
    });
    group.bench_function(id("memslots_snapshot"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(snap.read_obj::<u64>(GuestAddress(black_box(gpas[i]))).ok())))
    });
    group.bench_function(id("vm-memory"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(gm.read_obj::<u64>(GuestAddress(black_box(gpas[i]))).ok())))
    });
    group.finish();
}

/// The same lookups, but every slot (and every vm-memory region) aliases the
/// same 16 KiB of host memory: the data is always in cache and TLB, so this
/// measures the access path itself (lookup, checks, copy), not the machine's
/// page walks.
fn bench_read_obj_aliased(c: &mut Criterion) {
    let gpas = table(2);
    let mem = GuestMemory::new(Config::default()).unwrap();
    let ram = mem.map_anonymous(SLOT_BYTES, &MapOptions::new().populate(true)).unwrap();
    for i in 0..SLOTS {
        mem.set_region(i as u32, 0, i * STRIDE, &ram, 0, SLOT_BYTES).unwrap();
    }
    let regions: Vec<GuestRegionMmap<()>> = (0..SLOTS)
        .map(|i| {
            // SAFETY: `ram` (16 KiB, read-write) outlives `gm` (dropped at the
            // end of this function, before `ram`); the region does not own
            // the mapping and never unmaps it.
            let m = unsafe {
                MmapRegion::build_raw(
                    ram.as_ptr(),
                    SLOT_BYTES as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                )
            }
            .unwrap();
            GuestRegionMmap::new(m, GuestAddress(i * STRIDE)).unwrap()
        })
        .collect();
    let gm = GuestMemoryMmap::from_regions(regions).unwrap();

    let mut group = c.benchmark_group("read_obj_u64_aliased");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2)).sample_size(30);
    let id = |name| BenchmarkId::new(name, SLOTS);
    group.bench_function(id("memslots"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(mem.read_obj::<u64>(0, black_box(gpas[i])))))
    });
    group.bench_function(id("memslots_held_section"), |b| {
        b.iter_custom(|n| {
            let g = mem.section();
            time_table(n, |i| consume(g.read_obj::<u64>(0, black_box(gpas[i]))))
        })
    });
    group.bench_function(id("vm-memory"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(gm.read_obj::<u64>(GuestAddress(black_box(gpas[i]))).ok())))
    });
    // Where the time goes: the memslots lookups alone (held section).
    group.bench_function(id("breakdown_gfn_to_hva"), |b| {
        b.iter_custom(|n| {
            let g = mem.section();
            time_table(n, |i| consume(g.read_guard().gfn_to_hva(0, black_box(gpas[i]) >> 12)))
        })
    });
    group.bench_function(id("breakdown_gfn_to_memslot"), |b| {
        b.iter_custom(|n| {
            let g = mem.section();
            time_table(n, |i| consume(g.read_guard().gfn_to_memslot(0, black_box(gpas[i]) >> 12).map(|s| s.npages)))
        })
    });
    group.bench_function(id("breakdown_vm-memory_find_region"), |b| {
        b.iter_custom(|n| time_table(n, |i| consume(gm.find_region(GuestAddress(black_box(gpas[i]))).is_some())))
    });
    group.finish();
    drop(gm);
}

fn bench_copy(c: &mut Criterion) {
    let mem = GuestMemory::new(Config::default()).unwrap();
    let ram = mem.map_anonymous(2 * COPY as u64, &MapOptions::new().populate(true)).unwrap();
    ram.fill(0, ram.len(), 0x5a).unwrap();
    mem.set_region(0, 0, 0x10_0000, &ram, 0, 2 * COPY as u64).unwrap();
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 2 * COPY)]).unwrap();
    gm.write_slice(&vec![0x5a; 2 * COPY], GuestAddress(0x10_0000)).unwrap();
    let mut buf = vec![0u8; COPY];

    let mut group = c.benchmark_group("copy_64k");
    group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2)).sample_size(30);
    group.throughput(criterion::Throughput::Bytes(COPY as u64));
    group.bench_function("memslots", |b| b.iter(|| mem.read(0, black_box(0x10_0000 + 0x800), &mut buf).unwrap()));
    let src = ram.as_ptr();
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            // SAFETY: `src + 0x800 .. + COPY` is inside the 128 KiB mapping
            // (alive: `ram` is held); `buf` is a distinct Vec of COPY bytes.
            unsafe { std::ptr::copy_nonoverlapping(black_box(src).add(0x800), buf.as_mut_ptr(), COPY) }
        })
    });
    group.bench_function("vm-memory", |b| {
        b.iter(|| gm.read_slice(&mut buf, GuestAddress(black_box(0x10_0000 + 0x800))).unwrap())
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_read_obj(&mut c);
    bench_read_obj_aliased(&mut c);
    bench_copy(&mut c);
    c.final_summary();
}
