//! Memory attributes: setting and clearing `KVM_MEMORY_ATTRIBUTE_PRIVATE` on
//! 1 GiB (262,144 pages), and querying a 1 GiB range
//! (`kvm_range_has_memory_attributes`) when it is one range and when it is
//! 1,024 alternating ranges; one gfn lookup inside a read section.
//!
//! `cargo bench -p memslots-cli --bench attributes`

use criterion::{criterion_group, criterion_main, Criterion};
use memslots::{Config, MemoryAttributes, Vm, KVM_MEMORY_ATTRIBUTE_PRIVATE as PRIVATE};
use std::hint::black_box;

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;

fn attrs(address: u64, size: u64, attributes: u64) -> MemoryAttributes {
    MemoryAttributes { address, size, attributes, flags: 0 }
}

fn bench(c: &mut Criterion) {
    let vm = Vm::new(Config::default().with_private_mem(true)).unwrap();
    c.bench_function("attributes: set + clear PRIVATE on 1 GiB", |b| {
        b.iter(|| {
            vm.set_memory_attributes(&attrs(0, GIB, PRIVATE)).unwrap();
            vm.set_memory_attributes(&attrs(0, GIB, 0)).unwrap();
        })
    });
    vm.set_memory_attributes(&attrs(0, GIB, PRIVATE)).unwrap();
    c.bench_function("attributes: range_has over 1 GiB, one range", |b| {
        let g = vm.read();
        b.iter(|| black_box(g.range_has_memory_attributes(0, GIB / PAGE, !0, PRIVATE)))
    });
    // 1,024 ranges: every other 128 KiB private.
    let frag = Vm::new(Config::default().with_private_mem(true)).unwrap();
    for i in 0..2048u64 {
        let a = if i % 2 == 0 { PRIVATE } else { 0 };
        frag.set_memory_attributes(&attrs(i * (GIB / 2048), GIB / 2048, a)).unwrap();
    }
    assert_eq!(frag.memory_attribute_ranges().len(), 1024);
    c.bench_function("attributes: range_has 0 over 1 GiB, 1024 ranges (fails at the first)", |b| {
        let g = frag.read();
        b.iter(|| black_box(g.range_has_memory_attributes(0, GIB / PAGE, !0, 0)))
    });
    c.bench_function("attributes: range_has PRIVATE over one 128 KiB private range of 1024", |b| {
        let g = frag.read();
        let (s, e) = (1000 * (GIB / 2048) / PAGE, 1001 * (GIB / 2048) / PAGE);
        b.iter(|| black_box(g.range_has_memory_attributes(s, e, !0, PRIVATE)))
    });
    c.bench_function("attributes: gfn_is_private, 1024 ranges", |b| {
        let g = frag.read();
        let mut x = 0x9e37u64;
        b.iter(|| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            black_box(g.gfn_is_private((x >> 20) % (GIB / PAGE)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
