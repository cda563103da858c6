//! The micro sweep: lookups and each update kind against slot count, for
//! memslots, vm-memory 0.18 and the kernel's ioctl.
//!
//! Layout for `n` slots (as in `benches/memslots.rs`): slot `i` covers guest
//! physical `[i * 2 MiB, i * 2 MiB + 64 KiB)` at host `0x1000_0000 + i * 2 MiB`.
//! A move sends slot `k` to `(n + k) * 2 MiB` and back. Updates are timed in
//! batches of up to `batch_ops` operations under one timer; create and delete
//! batches use distinct slots and restore the state untimed. Each figure is
//! the median over `batches` batches of ns per operation.

use super::{fl, ns, MicroPoint, Progress, Stat};
use anyhow::{Context, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use memslots::{Config, UserMemoryRegion, Vm, KVM_MEM_LOG_DIRTY_PAGES};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionCollection, GuestRegionMmap};

/// Sizes and repetitions of the sweep.
pub(crate) struct MicroPlan {
    /// Slot counts.
    pub sizes: Vec<u32>,
    /// Batches per figure (the median is over these).
    pub batches: usize,
    /// Lookups per batch.
    pub lookup_iters: usize,
    /// Updates per batch (at most).
    pub batch_ops: u32,
    /// Builds from empty per implementation (the kernel's is built once).
    pub build_reps: usize,
}

const PAGES: u64 = 16;
const SLOT_BYTES: u64 = PAGES * 0x1000;
const STRIDE: u64 = 0x20_0000;
const STRIDE_PAGES: u64 = STRIDE >> 12;
const HVA_BASE: u64 = 0x1000_0000;
const TABLE: usize = 1 << 16;

type MmapCollection = GuestRegionCollection<GuestRegionMmap>;

/// splitmix64.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u32) -> u32 {
        u32::try_from(self.next() % u64::from(n)).unwrap_or(0)
    }
}

fn gpa_of(i: u32) -> u64 {
    u64::from(i) * STRIDE
}

fn hva_of(i: u32) -> u64 {
    HVA_BASE + u64::from(i) * STRIDE
}

fn region(id: u32, flags: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(id, flags, gpa, size, hva_of(id))
}

fn new_vm() -> Result<Vm> {
    Ok(Vm::new(Config::x86_64().with_address_spaces(1))?)
}

/// The kernel peer: a KVM VM that never gets a vCPU.
struct KernelPeer {
    vm: VmFd,
}

impl KernelPeer {
    fn set(&self, slot: u32, flags: u32, gpa: u64, size: u64) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva_of(slot),
        };
        // SAFETY: the kernel only records the host range; it would touch it
        // only to fault guest pages in for a running vCPU or for its own
        // accesses to guest memory, and this VM never gets a vCPU, so the fake
        // (page aligned, below the user address limit) host addresses are
        // never dereferenced. Nothing in this process uses that range.
        unsafe { self.vm.set_user_memory_region(r) }.context("KVM_SET_USER_MEMORY_REGION")?;
        Ok(())
    }
}

/// Times batches of distinct slots: untimed `prepare`, timed `op`, untimed
/// `restore`. Median ns per operation.
fn batched(
    plan: &MicroPlan,
    perm: &[u32],
    batch: u32,
    mut prepare: impl FnMut(u32) -> Result<()>,
    mut op: impl FnMut(u32) -> Result<()>,
    mut restore: impl FnMut(u32) -> Result<()>,
) -> Result<Stat> {
    let mut cursor = 0usize;
    let mut samples = Vec::with_capacity(plan.batches);
    let mut ks = Vec::new();
    for _ in 0..plan.batches {
        ks.clear();
        for _ in 0..batch {
            ks.push(perm[cursor % perm.len()]);
            cursor += 1;
        }
        for &k in &ks {
            prepare(k)?;
        }
        let t = Instant::now();
        for &k in &ks {
            op(k)?;
        }
        let e = t.elapsed();
        for &k in &ks {
            restore(k)?;
        }
        samples.push(ns(e) / f64::from(batch));
    }
    Ok(Stat::of(samples))
}

/// Times batches of there-and-back pairs `op(k, true)`, `op(k, false)` on
/// random slots, all timed. Median ns per operation.
fn alternating(plan: &MicroPlan, slots: &[u32], mut op: impl FnMut(u32, bool) -> Result<()>) -> Result<Stat> {
    let pairs = (plan.batch_ops / 2).max(1);
    let mut cursor = 0usize;
    let mut samples = Vec::with_capacity(plan.batches);
    for _ in 0..plan.batches {
        let t = Instant::now();
        for _ in 0..pairs {
            let k = slots[cursor % slots.len()];
            cursor += 1;
            op(k, true)?;
            op(k, false)?;
        }
        samples.push(ns(t.elapsed()) / f64::from(2 * pairs));
    }
    Ok(Stat::of(samples))
}

/// Median ns per call of `f(i)` over `batches` runs of `iters` calls.
#[inline(always)]
fn lookups(plan: &MicroPlan, mut f: impl FnMut(usize)) -> Stat {
    let mut samples = Vec::with_capacity(plan.batches);
    for _ in 0..plan.batches {
        let t = Instant::now();
        for i in 0..plan.lookup_iters {
            f(i);
        }
        samples.push(ns(t.elapsed()) / fl(plan.lookup_iters));
    }
    Stat::of(samples)
}

fn permutation(n: u32, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    let mut p: Vec<u32> = (0..n).collect();
    for i in (1..p.len()).rev() {
        let j = usize::try_from(rng.below(u32::try_from(i + 1).unwrap_or(u32::MAX))).unwrap_or(0);
        p.swap(i, j);
    }
    p
}

/// Runs the sweep; appends one point per (metric, implementation, size).
pub(crate) fn run(
    plan: &MicroPlan,
    kvm: Option<(&Kvm, u64)>,
    progress: &Progress,
    out: &mut Vec<MicroPoint>,
) -> Result<()> {
    let samples = u32::try_from(plan.batches).unwrap_or(u32::MAX);
    for &n in &plan.sizes {
        progress.start(format!("micro: {n} slots"));
        let mut push = |metric: &'static str, implementation: &'static str, s: Stat, samples: u32| {
            out.push(MicroPoint {
                metric,
                implementation,
                slots: n,
                median_ns: s.median,
                min_ns: s.min,
                max_ns: s.max,
                samples,
            });
        };
        let mut rng = Rng(0x5eed ^ u64::from(n));
        let gfns: Vec<u64> = (0..TABLE)
            .map(|_| {
                let slot = u64::from(rng.below(n));
                slot * STRIDE_PAGES + rng.next() % PAGES
            })
            .collect();
        let gfn_at = |i: usize| gfns[i & (TABLE - 1)];
        let slots: Vec<u32> = (0..TABLE).map(|_| rng.below(n)).collect();
        let perm = permutation(n, 0xbeef ^ u64::from(n));
        let batch = (n / 10).clamp(1, plan.batch_ops);
        let create = |k: u32| region(k, 0, gpa_of(k), SLOT_BYTES);
        let delete = |k: u32| region(k, 0, gpa_of(k), 0);
        let moved = |k: u32| region(k, 0, gpa_of(n + k), SLOT_BYTES);
        let logged = |k: u32| region(k, KVM_MEM_LOG_DIRTY_PAGES, gpa_of(k), SLOT_BYTES);

        // memslots
        let mut builds = Vec::new();
        let mut vm = new_vm()?;
        for _ in 0..plan.build_reps.max(1) {
            vm = new_vm()?;
            let t = Instant::now();
            for i in 0..n {
                vm.set_user_memory_region(&create(i))?;
            }
            builds.push(ns(t.elapsed()));
        }
        let reps = u32::try_from(builds.len()).unwrap_or(1);
        push("build", "memslots", Stat::of(builds), reps);
        let set = |r: &UserMemoryRegion| -> Result<()> {
            black_box(vm.set_user_memory_region(black_box(r))?);
            Ok(())
        };
        push(
            "lookup_random",
            "memslots",
            lookups(plan, |i| {
                let _ = black_box(vm.gfn_to_hva(0, black_box(gfn_at(i))));
            }),
            samples,
        );
        {
            // A registered reader holding one read section over the batch (a
            // vCPU's view inside one exit): no per-lookup section entry.
            let reader = vm.reader();
            let guard = reader.read();
            push(
                "lookup_held",
                "memslots",
                lookups(plan, |i| {
                    let _ = black_box(guard.gfn_to_hva(0, black_box(gfn_at(i))));
                }),
                samples,
            );
        }
        {
            let vcpu = vm.vcpu();
            let base = u64::from(n / 2) * STRIDE_PAGES;
            push(
                "lookup_cached",
                "memslots",
                lookups(plan, |i| {
                    let _ = black_box(vcpu.gfn_to_hva(black_box(base + (gfn_at(i) & 15))));
                }),
                samples,
            );
        }
        let ok = |_| Ok(());
        push("create", "memslots", batched(plan, &perm, batch, |k| set(&delete(k)), |k| set(&create(k)), ok)?, samples);
        push("delete", "memslots", batched(plan, &perm, batch, ok, |k| set(&delete(k)), |k| set(&create(k)))?, samples);
        push(
            "move",
            "memslots",
            alternating(plan, &slots, |k, t| set(&if t { moved(k) } else { create(k) }))?,
            samples,
        );
        push(
            "flags",
            "memslots",
            alternating(plan, &slots, |k, t| set(&if t { logged(k) } else { create(k) }))?,
            samples,
        );
        drop(vm);

        // vm-memory: real (never touched) 64 KiB anonymous mappings.
        let size = usize::try_from(SLOT_BYTES)?;
        let regions = (0..n)
            .map(|i| GuestRegionMmap::from_range(GuestAddress(gpa_of(i)), size, None).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("vm-memory: mmap region: {e:?}"))?;
        // Insertion is O(n) per region, so large builds take seconds: repeat
        // only while the builds so far took under a second in all.
        let mut builds = Vec::new();
        let mut coll = MmapCollection::new();
        while builds.is_empty() || (builds.len() < plan.build_reps && builds.iter().sum::<f64>() < 1e9) {
            let t = Instant::now();
            let mut c = MmapCollection::new();
            for r in &regions {
                c = c.insert_region(Arc::clone(r)).map_err(|e| anyhow::anyhow!("insert_region: {e:?}"))?;
            }
            builds.push(ns(t.elapsed()));
            coll = c;
        }
        let vmm_reps = u32::try_from(builds.len()).unwrap_or(1);
        push("build", "vm-memory", Stat::of(builds), vmm_reps);
        push(
            "lookup_random",
            "vm-memory",
            lookups(plan, |i| {
                black_box(coll.find_region(GuestAddress(black_box(gfn_at(i) << 12))));
            }),
            samples,
        );
        let coll = std::cell::RefCell::new(coll);
        let vmm_err = |e: vm_memory::GuestRegionCollectionError| anyhow::anyhow!("vm-memory: {e:?}");
        let remove = |k: u32| -> Result<()> {
            let (without, _) = coll.borrow().remove_region(GuestAddress(gpa_of(k)), SLOT_BYTES).map_err(vmm_err)?;
            *coll.borrow_mut() = without;
            Ok(())
        };
        let insert = |k: u32| -> Result<()> {
            let r = Arc::clone(&regions[usize::try_from(k)?]);
            let with = coll.borrow().insert_region(r).map_err(vmm_err)?;
            *coll.borrow_mut() = with;
            Ok(())
        };
        push("create", "vm-memory", batched(plan, &perm, batch, remove, insert, ok)?, samples);
        push("delete", "vm-memory", batched(plan, &perm, batch, ok, remove, insert)?, samples);
        let mv = |k: u32, there: bool| -> Result<()> {
            let (from, to) = if there { (gpa_of(k), gpa_of(n + k)) } else { (gpa_of(n + k), gpa_of(k)) };
            let (without, old) = coll.borrow().remove_region(GuestAddress(from), SLOT_BYTES).map_err(vmm_err)?;
            let new = GuestRegionMmap::with_arc(old.get_mmap(), GuestAddress(to))
                .ok_or_else(|| anyhow::anyhow!("vm-memory: region"))?;
            *coll.borrow_mut() = without.insert_region(Arc::new(new)).map_err(vmm_err)?;
            Ok(())
        };
        push("move", "vm-memory", alternating(plan, &slots, mv)?, samples);
        drop(coll);
        drop(regions);

        // The kernel's ioctl. The last build is the fixture of the other
        // figures; builds repeat (for a spread) while they took under a
        // second in all: on a nested host one can take from 1 s to 30 s.
        if let Some((kvm, nr)) = kvm.filter(|(_, nr)| u64::from(n) <= *nr) {
            let _ = nr;
            let mut builds = Vec::new();
            let mut peer = None;
            while builds.is_empty() || (builds.len() < plan.build_reps && builds.iter().sum::<f64>() < 1e9) {
                drop(peer.take());
                let p = KernelPeer { vm: kvm.create_vm().context("KVM_CREATE_VM")? };
                let t = Instant::now();
                for i in 0..n {
                    p.set(i, 0, gpa_of(i), SLOT_BYTES)?;
                }
                builds.push(ns(t.elapsed()));
                peer = Some(p);
            }
            let kvm_reps = u32::try_from(builds.len()).unwrap_or(1);
            push("build", "kvm", Stat::of(builds), kvm_reps);
            let peer = peer.ok_or_else(|| anyhow::anyhow!("no kernel VM built"))?;
            let p = &peer;
            let create = |k: u32| p.set(k, 0, gpa_of(k), SLOT_BYTES);
            let delete = |k: u32| p.set(k, 0, gpa_of(k), 0);
            push("create", "kvm", batched(plan, &perm, batch, delete, create, ok)?, samples);
            push("delete", "kvm", batched(plan, &perm, batch, ok, delete, create)?, samples);
            let mv = |k: u32, t: bool| p.set(k, 0, gpa_of(if t { n + k } else { k }), SLOT_BYTES);
            push("move", "kvm", alternating(plan, &slots, mv)?, samples);
            let fl = |k: u32, t: bool| p.set(k, if t { KVM_MEM_LOG_DIRTY_PAGES } else { 0 }, gpa_of(k), SLOT_BYTES);
            push("flags", "kvm", alternating(plan, &slots, fl)?, samples);
        }
        progress.done();
    }
    Ok(())
}
