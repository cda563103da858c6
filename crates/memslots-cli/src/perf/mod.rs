//! `memslots perf`: the kernel's `memslot_perf_test` scenarios over the
//! library (and on real KVM with a real guest), plus a micro sweep — the
//! benchmark harness of `bench/` (`memslots-bench`: lookups and updates
//! against rust-vmm's `vm-memory` 0.18, `ArcSwap`, `imbl`, `RwLock`, a lower
//! bound and the host kernel's `KVM_SET_USER_MEMORY_REGION`, with its
//! PASS/FAIL verdicts) — all in one run.
//!
//! Output: a progress bar on stderr, tables on stdout (target peers are
//! `peer / memslots`: above 1 means the library is faster), and optionally
//! `--json FILE` and `--svg FILE` (log-log plots, one per metric).
//!
//! # JSON schema (`schema_version` 2)
//!
//! ```text
//! {
//!   "schema_version": 2,
//!   "mode": "tiny" | "quick" | "full",
//!   "runtime_s": f64,                       // wall time of the whole run
//!   "host": { "kvm": bool, "kvm_nr_memslots": u64|null, "cpus": u64 },
//!   "skipped": [string],                    // e.g. "kvm: /dev/kvm not available"
//!   "harness": { ... },                     // the micro sweep: the benchmark harness's report, as
//!                                           // `cargo run --manifest-path bench/Cargo.toml -- --json`
//!                                           // writes it (machine, plan, lookups, two_threads,
//!                                           // updates, verdicts, seconds, steal; bench/README.md)
//!   "micro": [ {                            // the harness's one-thread lookups and its updates, flattened:
//!                                           // one point per (metric, implementation, slots)
//!       "metric": "lookup_random" | "lookup_held" | "lookup_cached" | "lookup_vcpu_miss" | "read_obj_u64"
//!               | "create" | "delete" | "move" | "flags" | "build",
//!       "implementation": "memslots" | "memslots-native" | "vm-memory" | "vm-memory-atomic"
//!               | "arcswap-btreemap" | "arcswap-imbl" | "rwlock-btreemap" | "lower-bound" | "kvm",
//!       "slots": u32,                       // slots present
//!       "median_ns": f64,                   // median over samples of ns per operation
//!                                           // ("build": ns to create all `slots` slots from empty)
//!       "min_ns": f64, "max_ns": f64,       // fastest and slowest sample
//!       "samples": u32 } ],                 // samples the median is taken over
//!   "scenarios": [ {                        // memslot_perf_test scenarios
//!       "backend": "library" | "library+kvm" | "kvm-ioctl",
//!       "scenario": "map" | "unmap" | "unmap-chunked" | "move-active" | "move-inactive" | "rw" | "setup",
//!       "slots": u32, "area_bytes": u64, "vcpus": u32,
//!       "setup_ms": f64,                    // creating all slots of the area
//!       "iterations": u32,
//!       "iter_median_us": f64, "iter_mean_us": f64,
//!       "iter_min_us": f64, "iter_max_us": f64, // fastest and slowest iteration
//!       "vcpu_accesses": u64,               // guest page accesses that hit a slot
//!       "vcpu_misses": u64 } ],             // accesses that found no slot (MMIO exits on KVM)
//!   "targets": [ {
//!       "name": string, "slots": u32, "goal_ns": f64, "memslots_ns": f64|null,
//!       "met": bool|null, "peers": { "<implementation>": f64 },
//!       "peer_ranges": { "<implementation>": [min, max] } } ]  // where known (kvm)
//! }
//! ```
//!
//! See `README.md` in this directory for what each scenario does.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod extra;
mod guest;
mod harness;
mod scenarios;
mod svg;
mod table;

/// Arguments of `memslots perf`.
#[derive(clap::Args, Debug)]
pub struct PerfArgs {
    /// A short run (under a minute): fewer slot counts, a 128 MiB area, short budgets.
    #[arg(long)]
    quick: bool,
    /// A smoke run of a few seconds (CI): tiny area and slot counts.
    #[arg(long, hide = true, conflicts_with = "quick")]
    tiny: bool,
    /// vCPU threads in the library scenarios, 1..=1024 (the kernel test uses 1).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    vcpus: u32,
    /// Skip the real-KVM part even where /dev/kvm exists.
    #[arg(long)]
    no_kvm: bool,
    /// Write the results as JSON (schema in the module docs and perf/README.md).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write log-log plots (latency vs slot count, one per metric) as one SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// One micro-benchmark result.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct MicroPoint {
    metric: &'static str,
    implementation: &'static str,
    slots: u32,
    median_ns: f64,
    /// Fastest and slowest batch (build: run) of the `samples`.
    min_ns: f64,
    max_ns: f64,
    samples: u32,
}

/// One scenario result.
#[derive(Serialize, Debug, Clone, Default)]
pub(crate) struct ScenarioPoint {
    backend: &'static str,
    scenario: &'static str,
    slots: u32,
    area_bytes: u64,
    vcpus: u32,
    setup_ms: f64,
    iterations: u32,
    iter_median_us: f64,
    iter_mean_us: f64,
    /// Fastest and slowest iteration.
    iter_min_us: f64,
    iter_max_us: f64,
    vcpu_accesses: u64,
    vcpu_misses: u64,
}

/// A tracked target, checked against the run's own measurements.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct Target {
    name: String,
    slots: u32,
    goal_ns: f64,
    memslots_ns: Option<f64>,
    met: Option<bool>,
    peers: BTreeMap<&'static str, f64>,
    /// `[min, max]` of the samples behind a peer's figure, where known.
    peer_ranges: BTreeMap<&'static str, [f64; 2]>,
}

#[derive(Serialize, Debug)]
struct HostInfo {
    kvm: bool,
    kvm_nr_memslots: Option<u64>,
    cpus: u64,
}

/// The whole report (also the JSON document).
#[derive(Serialize, Debug)]
pub(crate) struct Report {
    schema_version: u32,
    mode: &'static str,
    runtime_s: f64,
    host: HostInfo,
    skipped: Vec<String>,
    /// The micro sweep: the benchmark harness's own report.
    harness: memslots_bench::Report,
    micro: Vec<MicroPoint>,
    scenarios: Vec<ScenarioPoint>,
    targets: Vec<Target>,
}

/// Sizes and budgets of one run.
struct Plan {
    mode: &'static str,
    /// The micro sweep: the benchmark harness's plan.
    micro: memslots_bench::Plan,
    scen: scenarios::ScenarioPlan,
    guest_budget: Duration,
    /// Largest slot count of the real-KVM setup comparison (the micro sweep's
    /// `build` already has the kernel at every count that fits).
    kvm_setup_max: u32,
    /// The other issues' targets (dirty logging, guest memory, backend).
    extra: extra::ExtraPlan,
}

impl Plan {
    fn new(args: &PerfArgs) -> Plan {
        let vcpus = args.vcpus;
        if args.tiny {
            Plan {
                mode: "tiny",
                micro: harness::plan("tiny"),
                scen: scenarios::ScenarioPlan {
                    area: 4 << 20,
                    sizes: vec![1, 64, 512],
                    vcpus,
                    budget: Duration::from_millis(20),
                },
                guest_budget: Duration::from_millis(50),
                kvm_setup_max: 512,
                extra: extra::ExtraPlan {
                    harvest_pages: 1 << 18,
                    mem_slots: 512,
                    backend_sizes: vec![100],
                    batches: 3,
                },
            }
        } else if args.quick {
            Plan {
                mode: "quick",
                micro: harness::plan("quick"),
                scen: scenarios::ScenarioPlan {
                    area: 128 << 20,
                    sizes: vec![1, 64, 4096, 32764],
                    vcpus,
                    budget: Duration::from_millis(250),
                },
                guest_budget: Duration::from_millis(500),
                kvm_setup_max: 4096,
                extra: extra::ExtraPlan {
                    harvest_pages: 1 << 24,
                    mem_slots: 32_000,
                    backend_sizes: vec![100, 32_000],
                    batches: 7,
                },
            }
        } else {
            Plan {
                mode: "full",
                micro: harness::plan("full"),
                scen: scenarios::ScenarioPlan {
                    area: 512 << 20,
                    sizes: vec![1, 8, 64, 512, 4096, 32764],
                    vcpus,
                    budget: Duration::from_secs(2),
                },
                guest_budget: Duration::from_secs(2),
                kvm_setup_max: u32::MAX,
                extra: extra::ExtraPlan {
                    harvest_pages: 1 << 24,
                    mem_slots: 32_000,
                    backend_sizes: vec![100, 32_000],
                    batches: 15,
                },
            }
        }
    }
}

/// Progress reporting: one tick per measured unit.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// Announces the unit about to be measured.
    pub(crate) fn start(&self, what: String) {
        self.bar.set_message(what);
    }

    /// Marks a unit done.
    pub(crate) fn done(&self) {
        self.bar.inc(1);
    }
}

pub(crate) use memslots_bench::stats::{median, ns, Stat};

/// Whether the real-KVM peers can run, and why not otherwise.
fn kvm_status(args: &PerfArgs) -> Result<(kvm_ioctls::Kvm, u64), String> {
    if args.no_kvm {
        return Err("kvm: disabled by --no-kvm".into());
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("kvm: /dev/kvm not available".into());
    }
    let k = kvm_ioctls::Kvm::new().map_err(|e| format!("kvm: /dev/kvm not available ({e})"))?;
    let api = k.get_api_version();
    if api != 12 {
        return Err(format!("kvm: /dev/kvm not available (KVM_GET_API_VERSION = {api}, not 12)"));
    }
    k.create_vm().map_err(|e| format!("kvm: /dev/kvm not available (KVM_CREATE_VM: {e})"))?;
    let nr = u64::try_from(k.get_nr_memslots()).unwrap_or(0);
    Ok((k, nr))
}

/// Opens an output file before any measurement, so a bad path fails at once
/// (not truncated yet: an existing file keeps its contents if the run fails).
fn open_output(path: &Path, flag: &str) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot write {flag} {}", path.display()))
}

/// Replaces the contents of an output file opened by [`open_output`].
fn write_output(mut file: File, path: &Path, contents: &str) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.write_all(contents.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `memslots perf`.
pub fn run(args: &PerfArgs) -> Result<()> {
    let started = Instant::now();
    let json_file = args.json.as_deref().map(|p| open_output(p, "--json")).transpose()?;
    let svg_file = args.svg.as_deref().map(|p| open_output(p, "--svg")).transpose()?;
    let plan = Plan::new(args);
    let mut skipped = Vec::new();
    let kvm = match kvm_status(args) {
        Ok(k) => Some(k),
        Err(why) => {
            eprintln!("memslots perf: skipped: {why}");
            skipped.push(why);
            None
        }
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let units =
        plan.micro.sizes.len() * harness::STEPS_PER_SIZE + scenarios::SCENARIOS.len() * plan.scen.sizes.len() + 2;
    let progress = Progress::new(u64::try_from(units).unwrap_or(0));

    let harness = harness::run(&plan.micro, kvm.is_some(), &progress)?;
    let micro_points = harness::points(&harness);
    let mut scen_points = Vec::new();
    scenarios::run(&plan.scen, &progress, &mut scen_points)?;
    progress.start("real KVM guest".into());
    if kvm.is_some() {
        let mut setup_sizes = vec![memslots_kvm::guest::DATA_SLOTS];
        let nr = kvm.as_ref().map_or(0, |k| k.1);
        setup_sizes.extend(
            plan.scen
                .sizes
                .iter()
                .filter(|&&n| n > memslots_kvm::guest::DATA_SLOTS && n <= plan.kvm_setup_max && u64::from(n) <= nr),
        );
        match guest::run(plan.guest_budget, &setup_sizes, &mut scen_points) {
            Ok(()) => {}
            Err(e) => {
                let why = format!("kvm guest scenarios: {e:#}");
                progress.bar.suspend(|| eprintln!("memslots perf: skipped: {why}"));
                skipped.push(why);
            }
        }
    }
    progress.done();
    progress.start("dirty logging, guest memory, backend targets".into());
    let mut extra_targets = Vec::new();
    if let Err(e) = extra::run(&plan.extra, kvm.is_some(), &mut extra_targets) {
        let why = format!("other issues' targets: {e:#}");
        progress.bar.suspend(|| eprintln!("memslots perf: skipped: {why}"));
        skipped.push(why);
    }
    progress.done();
    progress.bar.finish_and_clear();

    let mut targets = table::targets(&micro_points);
    targets.extend(extra_targets);
    let report = Report {
        schema_version: 2,
        mode: plan.mode,
        runtime_s: started.elapsed().as_secs_f64(),
        host: HostInfo { kvm: kvm.is_some(), kvm_nr_memslots: kvm.as_ref().map(|k| k.1), cpus: u64::try_from(cpus)? },
        skipped,
        harness,
        micro: micro_points,
        scenarios: scen_points,
        targets,
    };
    let stdout = std::io::stdout();
    table::print(&mut stdout.lock(), &report)?;
    if let (Some(file), Some(path)) = (json_file, &args.json) {
        write_output(file, path, &(serde_json::to_string_pretty(&report)? + "\n"))?;
    }
    if let (Some(file), Some(path)) = (svg_file, &args.svg) {
        write_output(file, path, &svg::render(&report))?;
    }
    Ok(())
}
