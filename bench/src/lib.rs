//! Benchmark harness for memslots: random gfn -> hva lookups (one thread and
//! two), and slot updates, side by side with rust-vmm's vm-memory,
//! `ArcSwap<BTreeMap>`, `ArcSwap<imbl::OrdMap>`, `RwLock<BTreeMap>` and a
//! lower bound, in one run on one machine. See README.md.
//!
//! The library holds the whole harness: the layout and random tables
//! ([`layout`]), the lookup and update loops ([`lookup`], [`update`]), the
//! statistics ([`stats`]), the tables and verdicts ([`report`]), and [`run`],
//! which the `memslots-bench` binary (a thin command-line wrapper) and
//! `memslots perf` both call.
//!
//! ```sh
//! cargo run --release --manifest-path bench/Cargo.toml -- --quick [--json PATH]
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

pub mod kvm;
pub mod layout;
pub mod lookup;
pub mod report;
pub mod stats;
pub mod timing;
pub mod update;

pub use stats::ns;

/// Errors of the harness (setup failures, a peer that translates wrongly).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How much to measure.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// "quick" or "full".
    pub mode: &'static str,
    /// Slot counts.
    pub sizes: Vec<u32>,
    /// Repetitions (samples) per figure; the implementations' order is
    /// rotated each repetition.
    pub reps: usize,
    /// Lookups per lookup sample.
    pub lookup_iters: usize,
    /// Updates per create/delete/move sample, at most.
    pub batch_ops: u32,
    /// Builds repeat while an implementation's builds so far took less.
    pub build_budget: Duration,
}

/// The standard slot counts.
pub const SIZES: [u32; 7] = [1, 4, 16, 64, 256, 4096, 32000];

impl Plan {
    /// The quick plan (`quick`) or the full one, at `sizes` (default [`SIZES`]).
    pub fn new(quick: bool, sizes: Option<Vec<u32>>) -> Self {
        let sizes = sizes.unwrap_or_else(|| SIZES.to_vec());
        if quick {
            Plan {
                mode: "quick",
                sizes,
                reps: 7,
                lookup_iters: 1 << 17,
                batch_ops: 16,
                build_budget: Duration::from_millis(300),
            }
        } else {
            Plan {
                mode: "full",
                sizes,
                reps: 11,
                lookup_iters: 1 << 20,
                batch_ops: 32,
                build_budget: Duration::from_secs(3),
            }
        }
    }
}

/// The machine and build the figures come from.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// `lscpu` model name.
    pub cpu: String,
    /// CPUs this process may run on (`nproc`).
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `rustc -V` of the compiler that built this binary.
    pub rustc: &'static str,
    /// Cargo profile and its optimisation level.
    pub build: String,
    /// `/proc/loadavg` at the start (the machine may be shared).
    pub loadavg: String,
    /// Median cost of one `Instant::now()` + `elapsed()` pair, ns.
    pub timer_ns: f64,
    /// Latency of random dependent loads, ns, by working set (KiB): the
    /// state of the caches this run had (a busy neighbour raises the large ones).
    pub load_latency_ns: Vec<(usize, f64)>,
}

/// ns per load of a random cyclic pointer chase over `kib` KiB (the
/// latency of one dependent random load at that working set).
pub fn load_latency_ns(kib: usize) -> f64 {
    let n = kib * 1024 / std::mem::size_of::<usize>();
    // Sattolo's algorithm: one cycle through every element.
    let mut next: Vec<usize> = (0..n).collect();
    let mut rng = layout::Rng::new(0xc0ffee ^ n as u64);
    for i in (1..n).rev() {
        let j = usize::try_from(rng.next_u64() % i as u64).unwrap_or(0);
        next.swap(i, j);
    }
    let steps: u32 = 1 << 20;
    let mut p = 0usize;
    for _ in 0..n {
        p = next[p];
    }
    let t = Instant::now();
    for _ in 0..steps {
        p = next[std::hint::black_box(p)];
    }
    let e = t.elapsed();
    std::hint::black_box(p);
    ns(e) / f64::from(steps)
}

/// Steal and total CPU time so far (`/proc/stat`, all CPUs, in ticks).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    Some((*v.get(7)?, v.iter().take(8).sum()))
}

fn cpu_model() -> String {
    let from_lscpu = Command::new("lscpu").output().ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_owned()))
    });
    from_lscpu
        .or_else(|| {
            std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
                c.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn timer_cost() -> f64 {
    let mut v: Vec<f64> = (0..1001).map(|_| ns(std::hint::black_box(Instant::now()).elapsed())).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Machine {
    /// Probes the machine this process runs on. `build_note` follows the
    /// profile on the `build:` line (how the profile was chosen).
    pub fn probe(build_note: &str) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        let debug_assertions = if cfg!(debug_assertions) { "on" } else { "off" };
        Machine {
            cpu: cpu_model(),
            nproc: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            kernel: read("/proc/sys/kernel/osrelease"),
            rustc: env!("BENCH_RUSTC_VERSION"),
            build: format!(
                "profile {}, opt-level {}, debuginfo {}, debug-assertions {debug_assertions} {build_note}",
                env!("BENCH_PROFILE"),
                env!("BENCH_OPT_LEVEL"),
                env!("BENCH_DEBUG"),
            ),
            loadavg: read("/proc/loadavg"),
            timer_ns: timer_cost(),
            load_latency_ns: [256, 1024, 16 * 1024].into_iter().map(|k| (k, load_latency_ns(k))).collect(),
        }
    }
}

/// One lookup figure.
#[derive(Debug, Serialize)]
pub struct LookupRow {
    /// Slot count.
    pub slots: u32,
    /// Implementation key.
    pub key: &'static str,
    /// Implementation, as printed.
    pub label: &'static str,
    /// ns per lookup (per thread, for two threads).
    pub ns: stats::Stat,
}

/// One two-thread lookup figure.
#[derive(Debug, Serialize)]
pub struct TwoThreadRow {
    /// Slot count.
    pub slots: u32,
    /// Implementation key.
    pub key: &'static str,
    /// Implementation, as printed.
    pub label: &'static str,
    /// Per-thread ns per lookup, two threads at once.
    pub ns: stats::Stat,
    /// ns per lookup on one thread, measured alternately with `ns`.
    pub one_thread: stats::Stat,
}

/// One update figure.
#[derive(Debug, Serialize)]
pub struct UpdateRow {
    /// Slot count.
    pub slots: u32,
    /// create, delete, move or build.
    pub op: &'static str,
    /// Implementation key.
    pub key: &'static str,
    /// Implementation, as printed.
    pub label: &'static str,
    /// ns per operation (per whole build for `build`).
    pub ns: stats::Stat,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where.
    pub machine: Machine,
    /// How much.
    pub plan: Plan,
    /// Lookups on one thread.
    pub lookups: Vec<LookupRow>,
    /// Lookups on two threads at once.
    pub two_threads: Vec<TwoThreadRow>,
    /// Updates.
    pub updates: Vec<UpdateRow>,
    /// The targets.
    pub verdicts: Vec<report::Verdict>,
    /// Wall time of the measurements, s.
    pub seconds: f64,
    /// Share of all CPUs' time stolen by the hypervisor during the
    /// measurements (`/proc/stat`), if known.
    pub steal: Option<f64>,
}

/// What [`run`] measures and how the report describes the build.
#[derive(Clone, Debug)]
pub struct Options {
    /// Sizes, repetitions and budgets.
    pub plan: Plan,
    /// Printed after the profile on the `build:` line, e.g. `(default
    /// profile, no overrides)` for the standalone harness.
    pub build_note: String,
    /// Add the kernel's raw `KVM_SET_USER_MEMORY_REGION` to the updates
    /// (`/dev/kvm` must be usable; slot counts above its
    /// `KVM_CAP_NR_MEMSLOTS` leave it out). Off in the standalone harness.
    pub kvm: bool,
    /// Measure `flags` (dirty logging on and off) for memslots and the
    /// kernel. Off in the standalone harness.
    pub flags: bool,
}

/// What the standalone harness prints after its profile.
pub const STANDALONE_BUILD_NOTE: &str = "(default profile, no overrides)";

impl Options {
    /// Checks the plan: slot counts must be `1..=32000` and not empty.
    pub fn validate(&self) -> Result<(), Error> {
        let sizes = &self.plan.sizes;
        if sizes.is_empty() || sizes.iter().any(|&n| n == 0 || n > 32_000) {
            return Err("slot counts must be 1..=32000".into());
        }
        Ok(())
    }
}

/// Probes the machine, prints the header to `out`, measures everything
/// `opts.plan` asks for (progress lines go to `progress`: slot count, step),
/// and computes the verdicts. Nothing else is printed; see [`report::print`].
pub fn run(opts: &Options, out: &mut dyn std::io::Write, progress: &mut dyn FnMut(u32, &str)) -> Result<Report, Error> {
    opts.validate()?;
    let machine = Machine::probe(&opts.build_note);
    report::header(out, &machine, &opts.plan)?;
    measure(machine, opts, progress)
}

/// Measures everything `opts.plan` asks for on `machine` (already probed).
pub fn measure(machine: Machine, opts: &Options, progress: &mut dyn FnMut(u32, &str)) -> Result<Report, Error> {
    opts.validate()?;
    let plan = opts.plan.clone();
    let kvm = if opts.kvm { Some(kvm::open().map_err(|e| format!("kvm peer: {e}"))?) } else { None };
    let extras = update::Extras { kvm: kvm.as_ref().map(|(k, nr)| (k, *nr)), flags: opts.flags };
    let start = Instant::now();
    let ticks = cpu_ticks();
    let (mut lookups, mut two_threads, mut updates) = (Vec::new(), Vec::new(), Vec::new());
    for &n in &plan.sizes {
        progress(n, "setup");
        let regions = lookup::vmm_regions(n)?;
        {
            let fixture = lookup::Fixture::new(n, &regions)?;
            fixture.check()?;
            let cases = lookup::cases(&fixture);
            progress(n, "lookups, one thread");
            for (key, label, ns) in lookup::measure(&fixture, &cases, &plan) {
                lookups.push(LookupRow { slots: n, key, label, ns });
            }
            progress(n, "lookups, two threads");
            for (key, label, ns, one_thread) in lookup::measure_two_threads(&fixture, &cases, &plan) {
                two_threads.push(TwoThreadRow { slots: n, key, label, ns, one_thread });
            }
        }
        progress(n, "updates");
        for (op, key, label, ns) in update::measure(n, &regions, &plan, extras)? {
            updates.push(UpdateRow { slots: n, op, key, label, ns });
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let steal = ticks
        .zip(cpu_ticks())
        .and_then(|((s0, t0), (s1, t1))| (t1 > t0).then(|| s1.saturating_sub(s0) as f64 / (t1 - t0) as f64));
    let verdicts = report::verdicts(&lookups, &two_threads, &updates);
    Ok(Report { machine, plan, lookups, two_threads, updates, verdicts, seconds, steal })
}
