//! The micro sweep: the benchmark harness (`memslots-bench`, `bench/` at the
//! repository root) run in this process, with the kernel's raw
//! `KVM_SET_USER_MEMORY_REGION` and `flags` added to its updates. Its tables
//! and PASS/FAIL verdicts are the standalone harness's; its figures are also
//! flattened into [`MicroPoint`]s for the targets, the plots and the JSON.

use super::{MicroPoint, Progress};
use anyhow::{anyhow, Result};
use memslots_bench::{Machine, Options, Plan};
use std::time::Duration;

/// What the `build:` line says after the profile: this binary is built in
/// the repository's workspace, whose root `[profile.release]` applies.
pub(crate) const BUILD_NOTE: &str = "(built in the repository workspace: its root [profile.release] applies; the \
user-crate figure, default release profile: cargo run --release --manifest-path bench/Cargo.toml)";

/// The harness plan of a `memslots perf` mode: the standalone harness's
/// quick and full plans, and a tiny one for the smoke test.
pub(crate) fn plan(mode: &str) -> Plan {
    match mode {
        "tiny" => Plan {
            mode: "tiny",
            sizes: vec![1, 16, 64],
            reps: 3,
            lookup_iters: 1 << 14,
            batch_ops: 8,
            build_budget: Duration::from_millis(20),
        },
        "quick" => Plan::new(true, None),
        _ => Plan::new(false, None),
    }
}

/// Steps reported per slot count (setup, two lookup passes, updates).
pub(crate) const STEPS_PER_SIZE: usize = 4;

/// Runs the harness; `kvm` adds the kernel peer.
pub(crate) fn run(plan: &Plan, kvm: bool, progress: &Progress) -> Result<memslots_bench::Report> {
    let opts = Options { plan: plan.clone(), build_note: BUILD_NOTE.to_owned(), kvm, flags: true };
    let machine = Machine::probe(&opts.build_note);
    memslots_bench::measure(machine, &opts, &mut |n, what| {
        progress.start(format!("harness: {n} slots: {what}"));
        progress.done();
    })
    .map_err(|e| anyhow!("benchmark harness: {e}"))
}

/// The harness's implementation keys as (metric, implementation) of the
/// flattened points, lookups first.
fn lookup_name(key: &str) -> Option<(&'static str, &'static str)> {
    Some(match key {
        "memslots_anonymous" => ("lookup_random", "memslots"),
        "memslots_held" => ("lookup_held", "memslots"),
        "memslots_vcpu_hit" => ("lookup_cached", "memslots"),
        "memslots_vcpu_miss" => ("lookup_vcpu_miss", "memslots"),
        "memslots_trait_read_obj" => ("read_obj_u64", "memslots"),
        "memslots_native_read_obj" => ("read_obj_u64", "memslots-native"),
        "vmm_mmap_find_region" => ("lookup_random", "vm-memory"),
        "vmm_atomic_find_region" => ("lookup_random", "vm-memory-atomic"),
        "vmm_atomic_read_obj" => ("read_obj_u64", "vm-memory-atomic"),
        "arcswap_btreemap" => ("lookup_random", "arcswap-btreemap"),
        "arcswap_imbl" => ("lookup_random", "arcswap-imbl"),
        "rwlock_btreemap" => ("lookup_random", "rwlock-btreemap"),
        "lower_bound" => ("lookup_random", "lower-bound"),
        _ => return None,
    })
}

/// The implementation name of an update row's key.
fn update_name(key: &str) -> Option<&'static str> {
    Some(match key {
        "memslots" => "memslots",
        "vmm_atomic" => "vm-memory-atomic",
        "arcswap_btreemap" => "arcswap-btreemap",
        "arcswap_imbl" => "arcswap-imbl",
        "rwlock_btreemap" => "rwlock-btreemap",
        "kvm" => "kvm",
        _ => return None,
    })
}

/// One-thread lookups and updates as points (the two-thread rows stay in
/// the `harness` section of the JSON).
pub(crate) fn points(r: &memslots_bench::Report) -> Vec<MicroPoint> {
    let point = |metric, implementation, slots, s: &memslots_bench::stats::Stat| MicroPoint {
        metric,
        implementation,
        slots,
        median_ns: s.median,
        min_ns: s.min,
        max_ns: s.max,
        samples: u32::try_from(s.samples).unwrap_or(u32::MAX),
    };
    let lookups = r
        .lookups
        .iter()
        .filter_map(|row| lookup_name(row.key).map(|(metric, imp)| point(metric, imp, row.slots, &row.ns)));
    let updates =
        r.updates.iter().filter_map(|row| update_name(row.key).map(|imp| point(row.op, imp, row.slots, &row.ns)));
    lookups.chain(updates).collect()
}
