//! Slot updates: create one slot, delete one, move one there and back, and
//! build all `n` from empty, for memslots and the peers a VMM could use
//! instead. One writer, no concurrent readers.
//!
//! Create and delete are timed in batches of distinct slots (at most
//! `n / 10`, so the slot count stays within 10 % of `n`), one timer around
//! the batch; the state is restored untimed (the batch deleted before its
//! creates are timed, recreated after its deletes are timed). Moves send a
//! random slot `k` to `(n + k) * 2 MiB` and back, every move timed. A build
//! starts from an empty structure (made untimed) and times creating slots
//! `0..n`. Dropping superseded copies is part of each figure.
//!
//! Two additions are off in the standalone harness and on in `memslots
//! perf` ([`Extras`]): the kernel's raw `KVM_SET_USER_MEMORY_REGION` as one
//! more implementation, and `flags` (dirty logging on and off on a random
//! slot, both timed) for the implementations that have flags.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use memslots::{Vm, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use crate::kvm::{Kvm, RawVm};
use crate::layout::{below, gfn_of, gpa_of, permutation, Rng, PAGE_SHIFT, SLOT_BYTES};
use crate::lookup::{entry, new_vm, region, ImblMap, SlotMap};
use crate::stats::ns;
use crate::stats::{rotated, Stat};
use crate::{Error, Plan};

/// One implementation's update operations. Slots are numbered as in the
/// layout; `relocate` moves slot `k` from guest address `from` to `to`.
trait Store {
    fn create(&mut self, k: u32) -> Result<(), Error>;
    fn delete(&mut self, k: u32) -> Result<(), Error>;
    fn relocate(&mut self, k: u32, from: u64, to: u64) -> Result<(), Error>;
    /// Whether [`Store::flags`] works.
    fn has_flags(&self) -> bool {
        false
    }
    /// Turns dirty logging of slot `k` (at its home address) on or off.
    fn flags(&mut self, k: u32, _logged: bool) -> Result<(), Error> {
        Err(format!("slot {k}: no flags").into())
    }
}

/// memslots: `set_user_memory_region` (KVM's protocol: build the inactive
/// set, publish, wait for readers, update the other set).
struct Memslots(Vm);

impl Store for Memslots {
    fn create(&mut self, k: u32) -> Result<(), Error> {
        self.0.set_user_memory_region(&region(k, gpa_of(k), SLOT_BYTES))?;
        Ok(())
    }
    fn delete(&mut self, k: u32) -> Result<(), Error> {
        self.0.set_user_memory_region(&region(k, gpa_of(k), 0))?;
        Ok(())
    }
    fn relocate(&mut self, k: u32, _from: u64, to: u64) -> Result<(), Error> {
        self.0.set_user_memory_region(&region(k, to, SLOT_BYTES))?;
        Ok(())
    }
    fn has_flags(&self) -> bool {
        true
    }
    fn flags(&mut self, k: u32, logged: bool) -> Result<(), Error> {
        let mut r = region(k, gpa_of(k), SLOT_BYTES);
        r.flags = if logged { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.0.set_user_memory_region(&r)?;
        Ok(())
    }
}

/// The kernel: `KVM_SET_USER_MEMORY_REGION` on a VM without vCPUs.
struct Kernel(RawVm);

impl Store for Kernel {
    fn create(&mut self, k: u32) -> Result<(), Error> {
        self.0.set(k, 0, gpa_of(k), SLOT_BYTES)
    }
    fn delete(&mut self, k: u32) -> Result<(), Error> {
        self.0.set(k, 0, gpa_of(k), 0)
    }
    fn relocate(&mut self, k: u32, _from: u64, to: u64) -> Result<(), Error> {
        self.0.set(k, 0, to, SLOT_BYTES)
    }
    fn has_flags(&self) -> bool {
        true
    }
    fn flags(&mut self, k: u32, logged: bool) -> Result<(), Error> {
        self.0.set(k, if logged { KVM_MEM_LOG_DIRTY_PAGES } else { 0 }, gpa_of(k), SLOT_BYTES)
    }
}

/// A map behind an `ArcSwap`: clone the current map, change the copy, store
/// it (readers keep the old one until they drop their guard).
struct Rcu<M>(ArcSwap<M>);

/// The map operations the copy-on-write peers need.
trait Map: Clone {
    fn put(&mut self, gfn: u64, v: (u64, u64));
    fn take(&mut self, gfn: u64) -> Option<(u64, u64)>;
}

impl Map for SlotMap {
    fn put(&mut self, gfn: u64, v: (u64, u64)) {
        self.insert(gfn, v);
    }
    fn take(&mut self, gfn: u64) -> Option<(u64, u64)> {
        self.remove(&gfn)
    }
}

impl Map for ImblMap {
    fn put(&mut self, gfn: u64, v: (u64, u64)) {
        self.insert(gfn, v);
    }
    fn take(&mut self, gfn: u64) -> Option<(u64, u64)> {
        self.remove(&gfn)
    }
}

impl<M: Map> Rcu<M> {
    fn update(&self, f: impl FnOnce(&mut M) -> Result<(), Error>) -> Result<(), Error> {
        let mut copy = M::clone(&self.0.load());
        f(&mut copy)?;
        self.0.store(Arc::new(copy));
        Ok(())
    }
}

fn missing(k: u32) -> Error {
    format!("slot {k} is not there").into()
}

impl<M: Map> Store for Rcu<M> {
    fn create(&mut self, k: u32) -> Result<(), Error> {
        let (gfn, v) = entry(k);
        self.update(|m| {
            m.put(gfn, v);
            Ok(())
        })
    }
    fn delete(&mut self, k: u32) -> Result<(), Error> {
        self.update(|m| m.take(gfn_of(k)).map(drop).ok_or_else(|| missing(k)))
    }
    fn relocate(&mut self, k: u32, from: u64, to: u64) -> Result<(), Error> {
        self.update(|m| {
            let v = m.take(from >> PAGE_SHIFT).ok_or_else(|| missing(k))?;
            m.put(to >> PAGE_SHIFT, v);
            Ok(())
        })
    }
}

/// A `BTreeMap` behind a `RwLock`: changed in place under the write lock.
struct Locked(RwLock<SlotMap>);

impl Store for Locked {
    fn create(&mut self, k: u32) -> Result<(), Error> {
        let (gfn, v) = entry(k);
        self.0.write().unwrap_or_else(PoisonError::into_inner).insert(gfn, v);
        Ok(())
    }
    fn delete(&mut self, k: u32) -> Result<(), Error> {
        self.0.write().unwrap_or_else(PoisonError::into_inner).remove(&gfn_of(k)).map(drop).ok_or_else(|| missing(k))
    }
    fn relocate(&mut self, k: u32, from: u64, to: u64) -> Result<(), Error> {
        let mut m = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let v = m.remove(&(from >> PAGE_SHIFT)).ok_or_else(|| missing(k))?;
        m.insert(to >> PAGE_SHIFT, v);
        Ok(())
    }
}

/// vm-memory: `GuestMemoryAtomic<GuestMemoryMmap>`, changed as its docs
/// describe: take the update lock, make the new collection with
/// `insert_region` / `remove_region` from `memory()`, `replace` it. A move
/// is `remove_region`, the same mapping at the new address
/// (`GuestRegionMmap::with_arc`), `insert_region`, one `replace`.
struct VmmAtomic<'r> {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    regions: &'r [Arc<GuestRegionMmap>],
}

fn vmm(e: vm_memory::GuestRegionCollectionError) -> Error {
    format!("vm-memory: {e}").into()
}

impl Store for VmmAtomic<'_> {
    fn create(&mut self, k: u32) -> Result<(), Error> {
        let lock = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        let r = Arc::clone(&self.regions[usize::try_from(k)?]);
        let new = self.mem.memory().insert_region(r).map_err(vmm)?;
        lock.replace(new);
        Ok(())
    }
    fn delete(&mut self, k: u32) -> Result<(), Error> {
        let lock = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        let (new, _) = self.mem.memory().remove_region(GuestAddress(gpa_of(k)), SLOT_BYTES).map_err(vmm)?;
        lock.replace(new);
        Ok(())
    }
    fn relocate(&mut self, _k: u32, from: u64, to: u64) -> Result<(), Error> {
        let lock = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        let (without, old) = self.mem.memory().remove_region(GuestAddress(from), SLOT_BYTES).map_err(vmm)?;
        let moved = GuestRegionMmap::with_arc(old.get_mmap(), GuestAddress(to)).ok_or("vm-memory: region")?;
        let new = without.insert_region(Arc::new(moved)).map_err(vmm)?;
        lock.replace(new);
        Ok(())
    }
}

/// One implementation: how to make it empty.
struct Kind<'r> {
    key: &'static str,
    label: &'static str,
    empty: Box<dyn Fn() -> Result<Box<dyn Store + 'r>, Error> + 'r>,
}

fn kinds<'r>(regions: &'r [Arc<GuestRegionMmap>], kvm: Option<&'r Kvm>) -> Vec<Kind<'r>> {
    let mut kinds = vec![
        Kind { key: "memslots", label: "memslots", empty: Box::new(|| Ok(Box::new(Memslots(new_vm()?)))) },
        Kind {
            key: "arcswap_btreemap",
            label: "ArcSwap<BTreeMap> (clone+modify+store)",
            empty: Box::new(|| Ok(Box::new(Rcu(ArcSwap::from_pointee(BTreeMap::new()))))),
        },
        Kind {
            key: "arcswap_imbl",
            label: "ArcSwap<imbl::OrdMap> (clone+modify+store)",
            empty: Box::new(|| Ok(Box::new(Rcu(ArcSwap::from_pointee(ImblMap::new()))))),
        },
        Kind {
            key: "rwlock_btreemap",
            label: "RwLock<BTreeMap> (in place)",
            empty: Box::new(|| Ok(Box::new(Locked(RwLock::new(BTreeMap::new()))))),
        },
        Kind {
            key: "vmm_atomic",
            label: "vm-memory GuestMemoryAtomic (lock+replace)",
            empty: Box::new(move || {
                Ok(Box::new(VmmAtomic { mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()), regions }))
            }),
        },
    ];
    if let Some(kvm) = kvm {
        kinds.push(Kind {
            key: "kvm",
            label: "kvm: KVM_SET_USER_MEMORY_REGION (no vCPU)",
            empty: Box::new(move || Ok(Box::new(Kernel(RawVm::new(kvm)?)))),
        });
    }
    kinds
}

/// What [`measure`] adds to the standalone harness's updates.
#[derive(Clone, Copy, Default)]
pub struct Extras<'k> {
    /// The kernel peer, on this `/dev/kvm` (measured where the slot count
    /// fits its `KVM_CAP_NR_MEMSLOTS`, the second field).
    pub kvm: Option<(&'k Kvm, u32)>,
    /// Measure `flags` too.
    pub flags: bool,
}

/// One figure: operation, implementation, ns per operation (ns per build for `build`).
pub type Results = Vec<(&'static str, &'static str, &'static str, Stat)>;

/// The update operations, in table order (`flags` only with [`Extras::flags`]).
pub const OPS: [&str; 5] = ["create", "delete", "move", "flags", "build"];

/// Measures every operation of every implementation at `n` slots.
/// `regions` are the vm-memory regions of the `n` slots.
pub fn measure(n: u32, regions: &[Arc<GuestRegionMmap>], plan: &Plan, extras: Extras<'_>) -> Result<Results, Error> {
    let kvm = extras.kvm.filter(|&(_, nr)| n <= nr).map(|(k, _)| k);
    let kinds = kinds(regions, kvm);
    let m = kinds.len();
    let mut out = Results::new();

    // Build, repeated while an implementation's builds so far took less than
    // the budget (vm-memory's is quadratic: seconds at 32000 slots). The
    // last build of each is the fixture of the other operations.
    let mut stores: Vec<Option<Box<dyn Store + '_>>> = (0..m).map(|_| None).collect();
    let mut builds = vec![Vec::new(); m];
    let mut spent = vec![Duration::ZERO; m];
    for rep in 0..plan.reps {
        for j in rotated(m, rep) {
            if rep > 0 && spent[j] >= plan.build_budget {
                continue;
            }
            drop(stores[j].take());
            let mut s = (kinds[j].empty)()?;
            let t = Instant::now();
            for i in 0..n {
                s.create(i)?;
            }
            let e = t.elapsed();
            spent[j] += e;
            builds[j].push(ns(e));
            stores[j] = Some(s);
        }
    }
    let mut stores: Vec<Box<dyn Store + '_>> =
        stores.into_iter().map(|s| s.ok_or("no build")).collect::<Result<_, _>>()?;

    let mut rng = Rng::new(0xbeef ^ u64::from(n));
    let perm = permutation(&mut rng, n);
    let batch = crate::timing::batch_len(n, plan.batch_ops);
    let mut cursor = 0usize;
    let mut next_batch = || -> Vec<u32> {
        (0..batch)
            .map(|_| {
                cursor += 1;
                perm[(cursor - 1) % perm.len()]
            })
            .collect()
    };
    let mut create = vec![Vec::new(); m];
    let mut delete = vec![Vec::new(); m];
    let mut moves = vec![Vec::new(); m];
    let mut flags = vec![Vec::new(); m];
    let pairs = (plan.batch_ops / 2).max(1);
    for rep in 0..plan.reps {
        let ks = next_batch();
        for j in rotated(m, rep) {
            let s = &mut stores[j];
            for &k in &ks {
                s.delete(k)?;
            }
            let t = Instant::now();
            for &k in &ks {
                s.create(k)?;
            }
            create[j].push(ns(t.elapsed()) / f64::from(batch));
        }
        let ks = next_batch();
        for j in rotated(m, rep) {
            let s = &mut stores[j];
            let t = Instant::now();
            for &k in &ks {
                s.delete(k)?;
            }
            delete[j].push(ns(t.elapsed()) / f64::from(batch));
            for &k in &ks {
                s.create(k)?;
            }
        }
        let ks: Vec<u32> = (0..pairs).map(|_| below(&mut rng, n)).collect();
        for j in rotated(m, rep) {
            let s = &mut stores[j];
            let t = Instant::now();
            for &k in &ks {
                s.relocate(k, gpa_of(k), gpa_of(n + k))?;
                s.relocate(k, gpa_of(n + k), gpa_of(k))?;
            }
            moves[j].push(ns(t.elapsed()) / f64::from(2 * pairs));
        }
        if !extras.flags {
            continue;
        }
        let ks: Vec<u32> = (0..pairs).map(|_| below(&mut rng, n)).collect();
        for j in rotated(m, rep) {
            let s = &mut stores[j];
            if !s.has_flags() {
                continue;
            }
            let t = Instant::now();
            for &k in &ks {
                s.flags(k, true)?;
                s.flags(k, false)?;
            }
            flags[j].push(ns(t.elapsed()) / f64::from(2 * pairs));
        }
    }
    for (j, k) in kinds.iter().enumerate() {
        out.push(("create", k.key, k.label, Stat::of(std::mem::take(&mut create[j]))));
        out.push(("delete", k.key, k.label, Stat::of(std::mem::take(&mut delete[j]))));
        out.push(("move", k.key, k.label, Stat::of(std::mem::take(&mut moves[j]))));
        if !flags[j].is_empty() {
            out.push(("flags", k.key, k.label, Stat::of(std::mem::take(&mut flags[j]))));
        }
        out.push(("build", k.key, k.label, Stat::of(std::mem::take(&mut builds[j]))));
    }
    Ok(out)
}
