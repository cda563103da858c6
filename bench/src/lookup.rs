//! Random gfn -> hva lookups: memslots and its peers over the same slots, on
//! one thread and on two threads at once.

use std::collections::BTreeMap;
use std::hint::{black_box, select_unpredictable};
use std::sync::{Arc, Barrier, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use memslots::{Config, UserMemoryRegion, Vm};
use memslots_mem::{GuestMemory, HostMemory, MapOptions, MemslotsAddressSpace};
use vm_memory::GuestRegionMmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    gfn_of, gpa_of, hva_of, Table, Tables, PAGES, PAGE_SHIFT, SLOT_BYTES, STRIDE, STRIDE_PAGES, TABLE,
};
use crate::stats::{rotated, Stat};
use crate::{ns, Error, Plan};

/// What a map-based peer stores per slot: base gfn -> (pages, host address).
pub type SlotMap = BTreeMap<u64, (u64, u64)>;
/// The persistent (structurally shared) map of the imbl peer.
pub type ImblMap = imbl::OrdMap<u64, (u64, u64)>;

/// The map-based peers' entry for slot `i`.
pub fn entry(i: u32) -> (u64, (u64, u64)) {
    (gfn_of(i), (PAGES, hva_of(i)))
}

/// The memslots request creating slot `i` (`0` bytes: deleting it) at guest address `gpa`.
pub fn region(i: u32, gpa: u64, size: u64) -> UserMemoryRegion {
    UserMemoryRegion::new(i, 0, gpa, size, hva_of(i))
}

/// A memslots VM with one address space (no SMM), as the CLI's perf sweep uses.
pub fn new_vm() -> Result<Vm, Error> {
    Ok(Vm::new(Config::x86_64().with_address_spaces(1))?)
}

/// The vm-memory regions of `n` slots: real 64 KiB anonymous mappings
/// (`MAP_NORESERVE`, never written: reads map the zero page).
pub fn vmm_regions(n: u32) -> Result<Vec<Arc<GuestRegionMmap>>, Error> {
    let size = usize::try_from(SLOT_BYTES)?;
    (0..n)
        .map(|i| GuestRegionMmap::from_range(GuestAddress(gpa_of(i)), size, None).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("vm-memory: mapping a region: {e}").into())
}

/// `floor` search of a `BTreeMap`/`OrdMap` range iterator result.
#[inline(always)]
fn translate(found: Option<(&u64, &(u64, u64))>, gfn: u64) -> Option<u64> {
    let (&base, &(npages, hva)) = found?;
    let off = gfn - base;
    (off < npages).then_some(hva + (off << PAGE_SHIFT))
}

/// The lower bound: sorted base gfns searched without a data-dependent
/// branch, and a parallel array of (pages, host address). No concurrency
/// control at all.
pub struct Sorted {
    bases: Vec<u64>,
    info: Vec<(u64, u64)>,
}

impl Sorted {
    fn new(n: u32) -> Self {
        Sorted { bases: (0..n).map(gfn_of).collect(), info: (0..n).map(|i| entry(i).1).collect() }
    }

    /// The host address of `gfn`, if a slot covers it.
    #[inline]
    pub fn lookup(&self, gfn: u64) -> Option<u64> {
        let b = self.bases.as_slice();
        let (mut base, mut len) = (0usize, b.len());
        if len == 0 {
            return None;
        }
        while len > 1 {
            let half = len / 2;
            base = select_unpredictable(b[base + half] <= gfn, base + half, base);
            len -= half;
        }
        let (npages, hva) = self.info[base];
        // Below the first slot, the subtraction wraps to a huge offset.
        let off = gfn.wrapping_sub(b[base]);
        (off < npages).then_some(hva + (off << PAGE_SHIFT))
    }
}

/// Everything the lookups read at one slot count, built once.
pub struct Fixture {
    /// Slot count.
    pub n: u32,
    tables: Tables,
    vm: Vm,
    mem: GuestMemory,
    space: MemslotsAddressSpace,
    gmm: GuestMemoryMmap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    arc_btree: ArcSwap<SlotMap>,
    arc_imbl: ArcSwap<ImblMap>,
    rw_btree: RwLock<SlotMap>,
    lower: Sorted,
    /// The host memory behind the memslots-mem slots (held by them too).
    _ram: Arc<HostMemory>,
}

impl Fixture {
    /// Builds every implementation with `n` slots; `regions` are the
    /// vm-memory regions of [`vmm_regions`].
    pub fn new(n: u32, regions: &[Arc<GuestRegionMmap>]) -> Result<Self, Error> {
        let vm = new_vm()?;
        for i in 0..n {
            vm.set_user_memory_region(&region(i, gpa_of(i), SLOT_BYTES))?;
        }
        // memslots-mem: one anonymous mapping, 64 KiB of it per slot.
        let mem = GuestMemory::new(Config::x86_64().with_address_spaces(1))?;
        let ram = mem.map_anonymous(u64::from(n) * SLOT_BYTES, &MapOptions::new().no_reserve(true))?;
        for i in 0..n {
            mem.set_region(i, 0, gpa_of(i), &ram, u64::from(i) * SLOT_BYTES, SLOT_BYTES)?;
        }
        let space = mem.address_space(0);
        let coll = || GuestMemoryMmap::from_arc_regions(regions.to_vec());
        let gmm = coll().map_err(|e| format!("vm-memory: {e}"))?;
        let atomic = GuestMemoryAtomic::new(coll().map_err(|e| format!("vm-memory: {e}"))?);
        let map: SlotMap = (0..n).map(entry).collect();
        let imbl_map: ImblMap = (0..n).map(entry).collect();
        Ok(Fixture {
            n,
            tables: Tables::new(n),
            vm,
            mem,
            space,
            gmm,
            atomic,
            arc_btree: ArcSwap::from_pointee(map.clone()),
            arc_imbl: ArcSwap::from_pointee(imbl_map),
            rw_btree: RwLock::new(map),
            lower: Sorted::new(n),
            _ram: ram,
        })
    }

    /// Checks that every implementation translates the first table entries
    /// as the layout says (a broken peer would make its figure meaningless).
    pub fn check(&self) -> Result<(), Error> {
        let vcpu = self.vm.vcpu();
        for &gfn in self.tables.gfns.iter().take(256) {
            let slot = u32::try_from(gfn / STRIDE_PAGES)?;
            let want = Some(hva_of(slot) + ((gfn % STRIDE_PAGES) << PAGE_SHIFT));
            let addr = GuestAddress(gfn << PAGE_SHIFT);
            let got = [
                self.vm.gfn_to_hva(0, gfn).ok(),
                vcpu.gfn_to_hva(gfn).ok(),
                translate(self.arc_btree.load().range(..=gfn).next_back(), gfn),
                translate(self.arc_imbl.load().range(..=gfn).next_back(), gfn),
                translate(self.rw_btree.read().unwrap_or_else(PoisonError::into_inner).range(..=gfn).next_back(), gfn),
                self.lower.lookup(gfn),
            ];
            if got.iter().any(|g| *g != want) {
                return Err(format!("gfn {gfn:#x}: expected {want:x?}, got {got:x?}").into());
            }
            let starts = [
                self.gmm.find_region(addr).map(vm_memory::GuestMemoryRegion::start_addr),
                self.atomic.memory().find_region(addr).map(vm_memory::GuestMemoryRegion::start_addr),
            ];
            if starts.iter().any(|s| *s != Some(GuestAddress(u64::from(slot) * STRIDE))) {
                return Err(format!("gfn {gfn:#x}: vm-memory found {starts:x?}").into());
            }
        }
        for &gpa in self.tables.gpas.iter().take(256) {
            let a = GuestAddress(gpa);
            let got = [
                self.space.memory().read_obj::<u64>(a).ok(),
                self.mem.read_obj::<u64>(0, gpa).ok(),
                self.atomic.memory().read_obj::<u64>(a).ok(),
            ];
            if got != [Some(0); 3] {
                return Err(format!("read_obj at {gpa:#x}: {got:?}").into());
            }
        }
        Ok(())
    }
}

/// One timed run of a lookup loop.
pub struct Run<'r> {
    /// Where in the table the loop starts.
    pub offset: usize,
    /// Lookups to time.
    pub iters: usize,
    /// Called right before the timer starts (two threads: a barrier).
    pub go: &'r dyn Fn(),
}

/// Sets up (untimed), calls `run.go`, times `run.iters` lookups.
pub type Body<'a> = Box<dyn Fn(&Run<'_>) -> Duration + Sync + 'a>;

/// One implementation's lookup loop.
pub struct Case<'a> {
    /// Short stable name (JSON, verdicts).
    pub key: &'static str,
    /// What the table prints.
    pub label: &'static str,
    /// Runs on two threads at once too.
    pub two_threads: bool,
    /// Measured from this slot count on (the vCPU miss needs two slots to miss).
    pub min_slots: u32,
    /// The loop.
    pub body: Body<'a>,
}

/// Times `run.iters` calls of `f` on consecutive table entries; inputs and
/// results go through `black_box`.
#[inline(always)]
fn timed<R>(run: &Run<'_>, table: &Table, mut f: impl FnMut(u64) -> R) -> Duration {
    (run.go)();
    let start = Instant::now();
    for k in 0..run.iters {
        black_box(f(black_box(table[(run.offset + k) & (TABLE - 1)])));
    }
    start.elapsed()
}

/// The lookup implementations, in table order.
pub fn cases(f: &Fixture) -> Vec<Case<'_>> {
    let t = &f.tables;
    fn case<'a>(key: &'static str, label: &'static str, two_threads: bool, body: Body<'a>) -> Case<'a> {
        Case { key, label, two_threads, min_slots: 1, body }
    }
    vec![
        case(
            "memslots_anonymous",
            "memslots anonymous: vm.gfn_to_hva",
            true,
            Box::new(move |run| timed(run, &t.gfns, |gfn| f.vm.gfn_to_hva(0, gfn))),
        ),
        case(
            "memslots_held",
            "memslots held section: reader().read() over the loop",
            true,
            Box::new(move |run| {
                let reader = f.vm.reader();
                let guard = reader.read();
                timed(run, &t.gfns, |gfn| guard.gfn_to_hva(0, gfn))
            }),
        ),
        case(
            "memslots_vcpu_hit",
            "memslots vCPU hit: vcpu.gfn_to_hva, one slot",
            false,
            Box::new(move |run| {
                let vcpu = f.vm.vcpu();
                timed(run, &t.hit_gfns, |gfn| vcpu.gfn_to_hva(gfn))
            }),
        ),
        Case {
            min_slots: 2,
            ..case(
                "memslots_vcpu_miss",
                "memslots vCPU miss: vcpu.gfn_to_hva, slot changes",
                false,
                Box::new(move |run| {
                    let vcpu = f.vm.vcpu();
                    timed(run, &t.miss_gfns, |gfn| vcpu.gfn_to_hva(gfn))
                }),
            )
        },
        case(
            "memslots_trait_read_obj",
            "memslots-mem vm-memory traits: memory().read_obj u64",
            false,
            Box::new(move |run| timed(run, &t.gpas, |gpa| f.space.memory().read_obj::<u64>(GuestAddress(gpa)).ok())),
        ),
        case(
            "memslots_native_read_obj",
            "memslots-mem GuestMemory::read_obj u64 (native)",
            false,
            Box::new(move |run| timed(run, &t.gpas, |gpa| f.mem.read_obj::<u64>(0, gpa).ok())),
        ),
        case(
            "vmm_mmap_find_region",
            "vm-memory GuestMemoryMmap::find_region",
            true,
            Box::new(move |run| timed(run, &t.gfns, |gfn| f.gmm.find_region(GuestAddress(gfn << PAGE_SHIFT)))),
        ),
        case(
            "vmm_atomic_find_region",
            "vm-memory GuestMemoryAtomic: memory().find_region",
            true,
            Box::new(move |run| {
                timed(run, &t.gfns, |gfn| {
                    let m = f.atomic.memory();
                    m.find_region(GuestAddress(gfn << PAGE_SHIFT)).map(std::ptr::from_ref)
                })
            }),
        ),
        case(
            "vmm_atomic_read_obj",
            "vm-memory GuestMemoryAtomic: memory().read_obj u64",
            false,
            Box::new(move |run| timed(run, &t.gpas, |gpa| f.atomic.memory().read_obj::<u64>(GuestAddress(gpa)).ok())),
        ),
        case(
            "arcswap_btreemap",
            "ArcSwap<BTreeMap>: load + range(..=gfn).next_back",
            true,
            Box::new(move |run| {
                timed(run, &t.gfns, |gfn| {
                    let m = f.arc_btree.load();
                    translate(m.range(..=gfn).next_back(), gfn)
                })
            }),
        ),
        case(
            "arcswap_imbl",
            "ArcSwap<imbl::OrdMap>: load + range(..=gfn).next_back",
            false,
            Box::new(move |run| {
                timed(run, &t.gfns, |gfn| {
                    let m = f.arc_imbl.load();
                    translate(m.range(..=gfn).next_back(), gfn)
                })
            }),
        ),
        case(
            "rwlock_btreemap",
            "RwLock<BTreeMap>: read + range(..=gfn).next_back",
            false,
            Box::new(move |run| {
                timed(run, &t.gfns, |gfn| {
                    let m = f.rw_btree.read().unwrap_or_else(PoisonError::into_inner);
                    translate(m.range(..=gfn).next_back(), gfn)
                })
            }),
        ),
        case(
            "lower_bound",
            "lower bound: sorted Vec, branchless, no sync",
            true,
            Box::new(move |run| timed(run, &t.gfns, |gfn| f.lower.lookup(gfn))),
        ),
    ]
}

/// ns per lookup of one single-threaded run.
fn one(case: &Case<'_>, iters: usize) -> f64 {
    let d = (case.body)(&Run { offset: 0, iters, go: &|| {} });
    ns(d) / iters as f64
}

/// Per-thread ns per lookup (mean of the two threads) of one run on two
/// threads at once, both released by a barrier right before their timers.
fn two(case: &Case<'_>, iters: usize) -> f64 {
    let barrier = Barrier::new(2);
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (barrier, body) = (&barrier, &case.body);
                s.spawn(move || {
                    let go = || {
                        barrier.wait();
                    };
                    ns(body(&Run { offset: t * TABLE / 2, iters, go: &go })) / iters as f64
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(f64::NAN)).collect()
    });
    per_thread.iter().sum::<f64>() / 2.0
}

/// Each case measured: key, label, ns per lookup.
pub type Results = Vec<(&'static str, &'static str, Stat)>;

/// Runs every case `plan.reps` times on one thread, the order rotated each
/// repetition, after one untimed pass over the whole table each.
pub fn measure(f: &Fixture, cases: &[Case<'_>], plan: &Plan) -> Results {
    let chosen: Vec<&Case<'_>> = cases.iter().filter(|c| f.n >= c.min_slots).collect();
    for c in &chosen {
        one(c, TABLE);
    }
    let mut samples = vec![Vec::with_capacity(plan.reps); chosen.len()];
    for rep in 0..plan.reps {
        for j in rotated(chosen.len(), rep) {
            samples[j].push(one(chosen[j], plan.lookup_iters));
        }
    }
    chosen.iter().zip(samples).map(|(c, s)| (c.key, c.label, Stat::of(s))).collect()
}

/// Each two-thread case: key, label, per-thread ns per lookup on two
/// threads, ns per lookup on one thread measured alongside.
pub type PairResults = Vec<(&'static str, &'static str, Stat, Stat)>;

/// Runs every two-thread case `plan.reps` times, the order rotated each
/// repetition; each repetition of a case is a one-thread sample right
/// followed by a two-thread sample, so the slowdown compares figures taken
/// under the same machine load.
pub fn measure_two_threads(f: &Fixture, cases: &[Case<'_>], plan: &Plan) -> PairResults {
    let chosen: Vec<&Case<'_>> = cases.iter().filter(|c| f.n >= c.min_slots && c.two_threads).collect();
    for c in &chosen {
        two(c, TABLE);
    }
    let mut singles = vec![Vec::with_capacity(plan.reps); chosen.len()];
    let mut pairs = vec![Vec::with_capacity(plan.reps); chosen.len()];
    for rep in 0..plan.reps {
        for j in rotated(chosen.len(), rep) {
            singles[j].push(one(chosen[j], plan.lookup_iters));
            pairs[j].push(two(chosen[j], plan.lookup_iters));
        }
    }
    chosen
        .iter()
        .zip(pairs.into_iter().zip(singles))
        .map(|(c, (p, s))| (c.key, c.label, Stat::of(p), Stat::of(s)))
        .collect()
}
