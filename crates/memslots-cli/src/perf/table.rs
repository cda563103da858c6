//! The end-of-run tables (stdout) and the targets check.

use super::{MicroPoint, Report, Target};
use std::collections::BTreeMap;
use std::io::Write;

/// Micro metrics in plot order.
pub(crate) const METRICS: [&str; 10] = [
    "lookup_random",
    "lookup_held",
    "lookup_cached",
    "lookup_vcpu_miss",
    "read_obj_u64",
    "create",
    "move",
    "flags",
    "delete",
    "build",
];
/// Implementations in display order (memslots first: the others are peers).
pub(crate) const IMPLS: [&str; 9] = [
    "memslots",
    "memslots-native",
    "vm-memory",
    "vm-memory-atomic",
    "arcswap-btreemap",
    "arcswap-imbl",
    "rwlock-btreemap",
    "lower-bound",
    "kvm",
];

/// Formats nanoseconds with a unit.
pub(crate) fn fmt_ns(v: f64) -> String {
    if v < 1e3 {
        format!("{v:.1} ns")
    } else if v < 1e6 {
        format!("{:.2} us", v / 1e3)
    } else if v < 1e9 {
        format!("{:.2} ms", v / 1e6)
    } else {
        format!("{:.2} s", v / 1e9)
    }
}

fn point<'a>(points: &'a [MicroPoint], metric: &str, imp: &str, slots: u32) -> Option<&'a MicroPoint> {
    points.iter().find(|p| p.metric == metric && p.implementation == imp && p.slots == slots)
}

fn find(points: &[MicroPoint], metric: &str, imp: &str, slots: u32) -> Option<f64> {
    point(points, metric, imp, slots).map(|p| p.median_ns)
}

/// `min–max` of a figure's samples, or `1 run` where there is only one.
pub(crate) fn fmt_range(samples: u32, min_ns: f64, max_ns: f64) -> String {
    if samples <= 1 {
        "1 run".into()
    } else {
        format!("{}–{}", fmt_ns(min_ns), fmt_ns(max_ns))
    }
}

/// What the tables' terms mean (details in the README this points to).
pub(crate) const GLOSSARY: &str = "Terms: micro sweep = the benchmark harness of bench/ (bench/README.md), run \
in this binary, plus the kernel's ioctl and flags in its updates; held section = lookups in one read guard kept \
over the loop (as a vCPU within one exit); vCPU hit / miss = through a vCPU handle's cached slot; move-active / \
move-inactive = the host moves a slot the vCPUs are / are not using; misses = accesses finding no slot (MMIO exits \
on KVM); targets' peers: peer figures beside memslots. Details: crates/memslots-cli/src/perf/README.md";

/// The tracked targets, evaluated at the largest slot count measured.
pub(crate) fn targets(points: &[MicroPoint]) -> Vec<Target> {
    let Some(n) = points.iter().map(|p| p.slots).max() else { return Vec::new() };
    // (name, metric, the peers' metric, goal in ns)
    let goals: [(&str, &str, &str, f64); 8] = [
        ("random lookup", "lookup_random", "lookup_random", 30.0),
        ("random lookup, held", "lookup_held", "lookup_random", 30.0),
        ("cached lookup (vCPU)", "lookup_cached", "lookup_cached", 3.0),
        ("create", "create", "create", 2_000.0),
        ("move", "move", "move", 2_000.0),
        ("flags", "flags", "flags", 2_000.0),
        ("delete", "delete", "delete", 2_000.0),
        ("build all slots", "build", "build", 100e6),
    ];
    goals
        .iter()
        .map(|&(name, metric, peer_metric, goal)| {
            let memslots = find(points, metric, "memslots", n);
            let peers: BTreeMap<&'static str, f64> =
                IMPLS[1..].iter().filter_map(|&imp| find(points, peer_metric, imp, n).map(|v| (imp, v))).collect();
            let peer_ranges = point(points, peer_metric, "kvm", n)
                .filter(|p| p.samples > 1)
                .map(|p| ("kvm", [p.min_ns, p.max_ns]))
                .into_iter()
                .collect();
            Target {
                name: name.to_string(),
                slots: n,
                goal_ns: goal,
                memslots_ns: memslots,
                met: memslots.map(|m| m <= goal),
                peers,
                peer_ranges,
            }
        })
        .collect()
}

/// Prints every table.
pub(crate) fn print(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    writeln!(out, "memslots perf ({}): {:.1} s", r.mode, r.runtime_s)?;
    for s in &r.skipped {
        writeln!(out, "skipped: {s}")?;
    }
    writeln!(out, "{GLOSSARY}")?;
    writeln!(out)?;
    writeln!(
        out,
        "Micro sweep: the benchmark harness (memslots-bench), run in this binary; for the figure a user's crate \
gets (default release profile) run: cargo run --release --manifest-path bench/Cargo.toml"
    )?;
    memslots_bench::report::header(out, &r.harness.machine, &r.harness.plan)?;
    memslots_bench::report::print(out, &r.harness)?;
    writeln!(out)?;
    writeln!(
        out,
        "Scenarios (memslot_perf_test): time per iteration, slot setup; misses = accesses finding no slot; \
min–max = fastest and slowest iteration"
    )?;
    writeln!(
        out,
        "{:<12} {:<14} {:>6} {:>9} {:>4} {:>11} {:>12} {:>12} {:>23} {:>7} {:>12} {:>9}",
        "backend",
        "scenario",
        "slots",
        "area KiB",
        "vcpu",
        "setup",
        "iter median",
        "iter mean",
        "iter min–max",
        "iters",
        "accesses",
        "misses"
    )?;
    for p in &r.scenarios {
        writeln!(
            out,
            "{:<12} {:<14} {:>6} {:>9} {:>4} {:>11} {:>12} {:>12} {:>23} {:>7} {:>12} {:>9}",
            p.backend,
            p.scenario,
            p.slots,
            p.area_bytes >> 10,
            p.vcpus,
            fmt_ns(p.setup_ms * 1e6),
            if p.scenario == "setup" { "-".into() } else { fmt_ns(p.iter_median_us * 1e3) },
            if p.scenario == "setup" { "-".into() } else { fmt_ns(p.iter_mean_us * 1e3) },
            if p.scenario == "setup" {
                "1 run".into()
            } else {
                fmt_range(p.iterations, p.iter_min_us * 1e3, p.iter_max_us * 1e3)
            },
            p.iterations,
            p.vcpu_accesses,
            p.vcpu_misses
        )?;
    }
    if let Some(t) = r.targets.first() {
        writeln!(out)?;
        writeln!(out, "Targets (lookups and updates at {} slots; the rest as named), measured in this run", t.slots)?;
        writeln!(out, "{:<62} {:>12} {:>11} {:>4}  peers", "target", "goal", "memslots", "met")?;
        for t in &r.targets {
            let peers: Vec<String> = t
                .peers
                .iter()
                .map(|(k, &v)| match t.peer_ranges.get(k) {
                    Some(&[lo, hi]) => format!("{k} {} ({}–{})", fmt_ns(v), fmt_ns(lo), fmt_ns(hi)),
                    None => format!("{k} {}", fmt_ns(v)),
                })
                .collect();
            writeln!(
                out,
                "{:<62} {:>12} {:>11} {:>4}  {}",
                t.name,
                format!("<= {}", fmt_ns(t.goal_ns)),
                t.memslots_ns.map_or_else(|| "-".into(), fmt_ns),
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "-",
                },
                if peers.is_empty() { "-".to_string() } else { peers.join(", ") }
            )?;
        }
    }
    Ok(())
}
