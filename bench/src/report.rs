//! Plain text tables and the PASS/FAIL verdicts, computed from the medians.

use std::io::{self, Write};

use serde::Serialize;

use crate::{LookupRow, Machine, Plan, Report, TwoThreadRow, UpdateRow};

/// Prints what was run where (before the measurements start).
pub fn header(out: &mut dyn Write, m: &Machine, p: &Plan) -> io::Result<()> {
    writeln!(out, "memslots bench harness ({} mode)", p.mode)?;
    writeln!(out, "machine: cpu {} | nproc {} | kernel {} | {}", m.cpu, m.nproc, m.kernel, m.rustc)?;
    writeln!(out, "build:   {}", m.build)?;
    writeln!(out, "load:    /proc/loadavg {} | timer: {:.0} ns per Instant::now()+elapsed()", m.loadavg, m.timer_ns)?;
    let lat: Vec<String> = m.load_latency_ns.iter().map(|(k, ns)| format!("{ns:.1} ns @ {k} KiB")).collect();
    writeln!(out, "memory:  random dependent load latency {}", lat.join(", "))?;
    writeln!(
        out,
        "plan:    slots {:?} | {} repetitions per figure, order rotated each repetition | {} lookups per sample | \
         update batches <= {} ops | builds repeat while < {} ms",
        p.sizes,
        p.reps,
        p.lookup_iters,
        p.batch_ops,
        p.build_budget.as_millis()
    )?;
    writeln!(out)?;
    Ok(())
}

/// `1.23 us` style.
fn time(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn find<'a>(rows: &'a [LookupRow], n: u32, key: &str) -> Option<&'a LookupRow> {
    rows.iter().find(|r| r.slots == n && r.key == key)
}

fn median(rows: &[LookupRow], n: u32, key: &str) -> Option<f64> {
    find(rows, n, key).map(|r| r.ns.median)
}

fn update(rows: &[UpdateRow], n: u32, op: &str, key: &str) -> Option<f64> {
    rows.iter().find(|r| r.slots == n && r.op == op && r.key == key).map(|r| r.ns.median)
}

fn ratio(a: f64, b: Option<f64>) -> String {
    b.map_or_else(|| "-".to_owned(), |b| format!("{:.2}", a / b))
}

fn sizes<T>(rows: &[T], slots: impl Fn(&T) -> u32) -> Vec<u32> {
    let mut v: Vec<u32> = rows.iter().map(slots).collect();
    v.dedup();
    v
}

/// Prints every table, then the verdicts.
pub fn print(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let w = 56;
    writeln!(out, "== 1. Random gfn->hva lookups, one thread: ns per lookup ==")?;
    writeln!(
        out,
        "median and min-max of {} samples of {} lookups (a 2^16-entry table of random gfns, cycled). \
         x atomic: median / median of GuestMemoryAtomic memory().find_region (read_obj rows: / GuestMemoryAtomic \
         memory().read_obj); x lower: / lower bound. vCPU miss: consecutive gfns never share a slot (not run at 1 slot).",
        r.plan.reps, r.plan.lookup_iters
    )?;
    writeln!(
        out,
        "{:>6}  {:<w$} {:>8} {:>17} {:>9} {:>8}",
        "slots", "implementation", "median", "min-max", "x atomic", "x lower"
    )?;
    for n in sizes(&r.lookups, |x| x.slots) {
        for row in r.lookups.iter().filter(|x| x.slots == n) {
            let s = &row.ns;
            let atomic = if row.key.ends_with("read_obj") { "vmm_atomic_read_obj" } else { "vmm_atomic_find_region" };
            writeln!(
                out,
                "{:>6}  {:<w$} {:>8.2} {:>17} {:>9} {:>8}",
                n,
                row.label,
                s.median,
                format!("{:.2}-{:.2}", s.min, s.max),
                ratio(s.median, median(&r.lookups, n, atomic)),
                ratio(s.median, median(&r.lookups, n, "lower_bound")),
            )?;
        }
        writeln!(out)?;
    }

    writeln!(out, "== 2. The same lookups on two threads at once: per-thread ns per lookup ==")?;
    writeln!(
        out,
        "two threads released together, each timing its own loop; a sample is the mean of the two. \
         1 thread: the same loop alone, sampled right before each two-thread sample; slowdown: 2 threads / 1 thread \
         (medians). This process has {} CPUs, shared with whatever else runs on the machine.",
        r.machine.nproc
    )?;
    writeln!(
        out,
        "{:>6}  {:<w$} {:>9} {:>9} {:>17} {:>9}",
        "slots", "implementation", "1 thread", "2 threads", "min-max", "slowdown"
    )?;
    for n in sizes(&r.two_threads, |x| x.slots) {
        for row in r.two_threads.iter().filter(|x| x.slots == n) {
            let s = &row.ns;
            writeln!(
                out,
                "{:>6}  {:<w$} {:>9.2} {:>9.2} {:>17} {:>9}",
                n,
                row.label,
                row.one_thread.median,
                s.median,
                format!("{:.2}-{:.2}", s.min, s.max),
                ratio(s.median, Some(row.one_thread.median)),
            )?;
        }
        writeln!(out)?;
    }

    writeln!(out, "== 3. Updates: time per operation (build: per whole build of n slots) ==")?;
    writeln!(
        out,
        "create/delete: batches of distinct slots (<= n/10, <= {}), restored untimed; move: a slot there and back, \
         both timed; build: create slots 0..n from empty. One writer, no readers. x memslots: median / memslots median.",
        r.plan.batch_ops
    )?;
    if r.updates.iter().any(|x| x.op == "flags") {
        writeln!(out, "flags: KVM_MEM_LOG_DIRTY_PAGES on, then off, on a random slot; both timed.")?;
    }
    let w = 44;
    writeln!(
        out,
        "{:>6}  {:<7} {:<w$} {:>10} {:>21} {:>3} {:>10}",
        "slots", "op", "implementation", "median", "min-max", "n", "x memslots"
    )?;
    for n in sizes(&r.updates, |x| x.slots) {
        for op in crate::update::OPS {
            for row in r.updates.iter().filter(|x| x.slots == n && x.op == op) {
                let s = &row.ns;
                writeln!(
                    out,
                    "{:>6}  {:<7} {:<w$} {:>10} {:>21} {:>3} {:>10}",
                    n,
                    op,
                    row.label,
                    time(s.median),
                    format!("{}-{}", time(s.min), time(s.max)),
                    s.samples,
                    ratio(s.median, update(&r.updates, n, op, "memslots")),
                )?;
            }
        }
        writeln!(out)?;
    }

    writeln!(out, "== Verdicts (from the medians above) ==")?;
    for v in &r.verdicts {
        writeln!(out, "{:<4} {}: {}", v.result, v.target, v.detail)?;
    }
    let count = |s: &str| r.verdicts.iter().filter(|v| v.result == s).count();
    writeln!(out, "{} passed, {} failed, {} skipped", count("PASS"), count("FAIL"), count("SKIP"))?;
    let steal = r.steal.map_or_else(|| "unknown".to_owned(), |s| format!("{:.1} %", s * 100.0));
    writeln!(out, "measurements took {:.1} s; CPU time stolen by the hypervisor meanwhile: {steal}", r.seconds)?;
    Ok(())
}

/// One target and whether the medians meet it.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// PASS, FAIL, or SKIP (a size it needs was not measured).
    pub result: &'static str,
    /// What the target is.
    pub target: String,
    /// The figures behind the result.
    pub detail: String,
}

/// A target `a <= factor * b` (or `a < factor * b` if strict) at each
/// point: (where, a, b); a point whose figures were not measured is left out.
struct Check {
    target: String,
    points: Vec<(String, Option<f64>, Option<f64>)>,
    factor: f64,
    strict: bool,
    fmt: fn(f64) -> String,
}

fn lookup_ns(x: f64) -> String {
    format!("{x:.2} ns")
}

fn slots(n: u32) -> String {
    format!("{n} slot{}", if n == 1 { "" } else { "s" })
}

impl Check {
    fn verdict(self) -> Verdict {
        let pts: Vec<(&str, f64, f64)> =
            self.points.iter().filter_map(|(at, a, b)| Some((at.as_str(), (*a)?, (*b)?))).collect();
        let Some(&first) = pts.first() else {
            return Verdict { result: "SKIP", target: self.target, detail: "no size it needs was measured".into() };
        };
        let ok = |a: f64, b: f64| if self.strict { a < b * self.factor } else { a <= b * self.factor };
        let failing: Vec<&str> = pts.iter().filter(|p| !ok(p.1, p.2)).map(|p| p.0).collect();
        let (at, a, b) = pts.iter().copied().max_by(|x, y| (x.1 / x.2).total_cmp(&(y.1 / y.2))).unwrap_or(first);
        #[allow(clippy::float_cmp)]
        let limit = if self.factor == 1.0 { (self.fmt)(b) } else { format!("{} x {}", self.factor, (self.fmt)(b)) };
        let mut detail =
            format!("worst at {at}: {} vs {limit} ({:.2}x the limit)", (self.fmt)(a), a / (b * self.factor));
        if !failing.is_empty() {
            detail = format!("fails at {}; {detail}", failing.join(", "));
        }
        let missing = self.points.len() - pts.len();
        if missing > 0 {
            detail.push_str(&format!("; {missing} point(s) not measured"));
        }
        Verdict { result: if failing.is_empty() { "PASS" } else { "FAIL" }, target: self.target, detail }
    }
}

/// The targets, from the medians.
pub fn verdicts(one: &[LookupRow], two: &[TwoThreadRow], upd: &[UpdateRow]) -> Vec<Verdict> {
    let all = crate::SIZES;
    let lk = |n: u32, key: &str| median(one, n, key);
    let pair = |keys: (&str, &str), ns: &[u32]| -> Vec<(String, Option<f64>, Option<f64>)> {
        ns.iter().map(|&n| (slots(n), lk(n, keys.0), lk(n, keys.1))).collect()
    };
    let from = |lo: u32| -> Vec<u32> { all.iter().copied().filter(|&n| n >= lo).collect() };
    let check = |target: &str, points, factor| Check {
        target: target.to_owned(),
        points,
        factor,
        strict: false,
        fmt: lookup_ns,
    };
    let mut two_points = Vec::new();
    for (key, name) in [("memslots_anonymous", "anonymous"), ("memslots_held", "held")] {
        for &n in &all {
            let row = two.iter().find(|r| r.slots == n && r.key == key);
            two_points.push((
                format!("{name} {}", slots(n)),
                row.map(|r| r.ns.median),
                row.map(|r| r.one_thread.median),
            ));
        }
    }
    let checks = vec![
        check(
            "memslots anonymous <= GuestMemoryAtomic memory()+find_region, every size",
            pair(("memslots_anonymous", "vmm_atomic_find_region"), &all),
            1.0,
        ),
        check(
            "memslots anonymous <= GuestMemoryMmap::find_region, 16 slots and up",
            pair(("memslots_anonymous", "vmm_mmap_find_region"), &from(16)),
            1.0,
        ),
        check(
            "memslots held section <= 2x lower bound, 4 slots and up",
            pair(("memslots_held", "lower_bound"), &from(4)),
            2.0,
        ),
        check("memslots held section <= 2 ns at 1 slot", vec![(slots(1), lk(1, "memslots_held"), Some(2.0))], 1.0),
        check(
            "memslots anonymous <= 25 ns at 32000 slots",
            vec![(slots(32000), lk(32000, "memslots_anonymous"), Some(25.0))],
            1.0,
        ),
        check(
            "two threads: per-thread slowdown <= 1.1x (memslots anonymous and held section, every size)",
            two_points,
            1.1,
        ),
        check(
            "memslots-mem vm-memory trait memory().read_obj <= GuestMemoryAtomic memory().read_obj, every size",
            pair(("memslots_trait_read_obj", "vmm_atomic_read_obj"), &all),
            1.0,
        ),
        check(
            "memslots vCPU miss <= memslots anonymous, every size from 4 (at 1 slot there is no miss)",
            pair(("memslots_vcpu_miss", "memslots_anonymous"), &from(4)),
            1.0,
        ),
        Check {
            target: "memslots delete at 32000 slots faster than ArcSwap<imbl::OrdMap> delete".to_owned(),
            points: vec![(
                slots(32000),
                update(upd, 32000, "delete", "memslots"),
                update(upd, 32000, "delete", "arcswap_imbl"),
            )],
            factor: 1.0,
            strict: true,
            fmt: time,
        },
    ];
    let mut out: Vec<Verdict> = checks.into_iter().map(Check::verdict).collect();
    // The two CPUs are shared with the host: say how much a loop that shares
    // nothing slowed in the same samples, so a reader can tell the host's
    // slowdown from the library's (the verdict itself is unchanged).
    let baseline = two
        .iter()
        .filter(|r| r.key == "lower_bound")
        .map(|r| (r.slots, r.ns.median / r.one_thread.median))
        .max_by(|x, y| x.1.total_cmp(&y.1));
    if let (Some((n, x)), Some(v)) = (baseline, out.iter_mut().find(|v| v.target.starts_with("two threads"))) {
        v.detail.push_str(&format!(
            "; the lower bound, which shares nothing, slowed up to {x:.2}x (at {}) in the same samples",
            slots(n)
        ));
    }
    out
}
