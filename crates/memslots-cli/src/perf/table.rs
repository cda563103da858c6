//! The end-of-run tables (stdout) and the targets check.

use super::{MicroPoint, Report, Target};
use std::collections::BTreeMap;
use std::io::Write;

/// Micro metrics in display order.
pub(crate) const METRICS: [&str; 8] =
    ["lookup_random", "lookup_held", "lookup_cached", "create", "move", "flags", "delete", "build"];
/// Implementations in display order (memslots first: the others are peers).
pub(crate) const IMPLS: [&str; 3] = ["memslots", "vm-memory", "kvm"];

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
pub(crate) const GLOSSARY: &str = "Terms: lookup_held = lookups in one held section (a read guard kept over \
the batch, as a vCPU within one exit); lookup_cached = through a vCPU handle's cached slot; move-active / \
move-inactive = the host moves a slot the vCPUs are / are not using; misses = accesses finding no slot (MMIO exits \
on KVM); x = peer / memslots. Details: crates/memslots-cli/src/perf/README.md";

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
pub(crate) fn print(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    writeln!(out, "memslots perf ({}): {:.1} s", r.mode, r.runtime_s)?;
    for s in &r.skipped {
        writeln!(out, "skipped: {s}")?;
    }
    writeln!(out, "{GLOSSARY}")?;
    writeln!(out)?;
    writeln!(
        out,
        "Micro sweep: median per operation (build: all slots from empty); x = peer / memslots, >1 = memslots faster; \
kvm min–max = its fastest and slowest batch (build: run)"
    )?;
    writeln!(
        out,
        "{:<14} {:>6} {:>11} {:>11} {:>8} {:>11} {:>8}  kvm min–max",
        "metric", "slots", "memslots", "vm-memory", "x", "kvm", "x"
    )?;
    let mut sizes: Vec<u32> = r.micro.iter().map(|p| p.slots).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for metric in METRICS {
        for &n in &sizes {
            let m = find(&r.micro, metric, "memslots", n);
            let cell = |imp: &str| -> (String, String) {
                match find(&r.micro, metric, imp, n) {
                    Some(v) => (fmt_ns(v), m.map_or_else(|| "-".into(), |m| format!("{:.1}", v / m))),
                    None => ("-".into(), "-".into()),
                }
            };
            let (vmm, vmm_x) = cell("vm-memory");
            let (kvm, kvm_x) = cell("kvm");
            let kvm_range = point(&r.micro, metric, "kvm", n)
                .map_or_else(String::new, |p| fmt_range(p.samples, p.min_ns, p.max_ns));
            writeln!(
                out,
                "{metric:<14} {n:>6} {:>11} {vmm:>11} {vmm_x:>8} {kvm:>11} {kvm_x:>8}  {kvm_range}",
                m.map_or_else(|| "-".into(), fmt_ns)
            )?;
        }
    }
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
