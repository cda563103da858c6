//! `memslots`: replay KVM memslot traces on the library, and measure it.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use memslots::trace::{self, NumberSyntax, Op, TraceConfig, Verdict};
use memslots::{Config, Vm};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod demo;
mod perf;

#[derive(Parser, Debug)]
#[command(
    name = "memslots",
    version,
    about = "KVM's scalable memslots as a library: replay traces, compare with KVM, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay operation traces (tests/conformance format) and print one verdict a line.
    Replay(ReplayArgs),
    /// Boot a tiny guest on /dev/kvm whose RAM is many library slots; show
    /// its writes, the dirty pages harvested, and slot moves under a running vCPU.
    Demo,
    /// Measure: memslot_perf_test scenarios (library and real KVM) and a micro
    /// sweep against vm-memory and the kernel's ioctl (`perf --quick` to start).
    Perf(perf::PerfArgs),
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// Address spaces of the library's VM (x86 KVM: 2 with SMM, 1 without). Default: with
    /// --kvm the kernel VM's, else the trace's `# config:` header, else 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    address_spaces: Option<u16>,
    /// User slots per address space (KVM_CAP_NR_MEMSLOTS), 1..=32764. Default: with --kvm
    /// the kernel VM's, else the trace's `# config:` header, else 32764.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(memslots::KVM_USER_MEM_SLOTS)))]
    user_slots: Option<u16>,
    /// Guest physical address bits the MMU maps, 32..=52 (x86 kvm_mmu_max_gfn: the host's
    /// MAXPHYADDR with EPT/NPT, 52 with shadow paging). Default: probed from this host's KVM,
    /// else the CPU's physical address bits, else 48.
    #[arg(long, value_name = "BITS", value_parser = clap::value_parser!(u32).range(32..=52))]
    phys_bits: Option<u32>,
    /// Also replay on a fresh kernel VM (/dev/kvm), with the library configured like
    /// that VM, and print both verdicts where they differ; exit 1 on any divergence.
    #[arg(long)]
    kvm: bool,
    /// With --kvm, replay even a trace whose slots would make this host's KVM allocate
    /// more metadata than the host can spare (MemAvailable less 4 GiB); the kernel then risks
    /// waking the OOM killer.
    #[arg(long, requires = "kvm")]
    no_kernel_memory_check: bool,
    /// Read numbers >= 2^63 literally instead of saturating them to i64::MAX
    /// as the conformance recorder did (see `memslots::trace`).
    #[arg(long)]
    exact_numbers: bool,
    /// Trace files; each is replayed on a fresh VM.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
}

/// A trace read and parsed, before anything is replayed.
struct LoadedTrace {
    path: PathBuf,
    header: TraceConfig,
    ops: Vec<(usize, Op)>,
}

fn load(path: &Path, syntax: NumberSyntax) -> Result<LoadedTrace> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let at = |e: trace::ParseError| anyhow!("{}:{}: {}", path.display(), e.line, e.message);
    let header = trace::parse_header(&text).map_err(at)?;
    let ops = trace::parse_with(&text, syntax).map_err(at)?;
    Ok(LoadedTrace { path: path.to_path_buf(), header, ops })
}

const GIB: u64 = 1 << 30;

/// The most guest pages held in slots at any point of `ops`, replayed on a
/// scratch library VM configured like the kernel (which agrees with it on
/// what it accepts): `(line where the peak is reached, pages)`. x86 KVM
/// allocates per-page metadata for each slot it creates or moves.
fn peak_slot_pages(config: Config, ops: &[(usize, Op)]) -> Result<Option<(usize, u64)>> {
    let vm = Vm::new(config)?;
    let mut live = std::collections::HashMap::<u32, u64>::new();
    let mut peak: Option<(usize, u64)> = None;
    for &(line, ref op) in ops {
        let ok = trace::apply(&vm, op) == Verdict::Ok;
        if let (true, Op::Set(r)) = (ok, op) {
            if r.memory_size == 0 {
                live.remove(&r.slot);
            } else {
                live.insert(r.slot, r.memory_size >> memslots::PAGE_SHIFT);
                let total = live.values().sum::<u64>();
                if peak.is_none_or(|(_, p)| total > p) {
                    peak = Some((line, total));
                }
            }
        }
    }
    Ok(peak)
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[allow(clippy::cast_precision_loss)] // for display
fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// With --kvm: what the kernel will allocate for the trace's slots at most.
/// Refuses (before any verdict) what the host cannot spare; returns a note
/// for what is large.
fn check_kernel_memory(args: &ReplayArgs, t: &LoadedTrace, config: Config, per_page: u64) -> Result<Option<String>> {
    let Some((line, pages)) = peak_slot_pages(config, &t.ops)? else { return Ok(None) };
    let bytes = pages.saturating_mul(per_page);
    if bytes < GIB {
        return Ok(None);
    }
    let what = format!(
        "{}: by line {line} the kernel holds slots of {pages} pages in all, for which this host's KVM allocates \
         about {:.1} GiB",
        t.path.display(),
        gib(bytes)
    );
    let spare = mem_available().map(|a| a.saturating_sub(4 * GIB));
    match spare {
        Some(spare) if bytes > spare && !args.no_kernel_memory_check => bail!(
            "{what}, more than the {:.1} GiB this host can spare (MemAvailable less 4 GiB); \
             pass --no-kernel-memory-check to replay it anyway",
            gib(spare)
        ),
        _ => Ok(Some(format!("memslots: note: {what}; such a request can take a minute"))),
    }
}

fn plural(n: u16, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// The library's configuration for one trace and, with a kernel VM, what to
/// tell the user about it. Precedence: flags, then the kernel VM (--kvm),
/// then the trace's header, then the x86-64 defaults.
fn library_config(args: &ReplayArgs, t: &LoadedTrace, kernel: Option<&Config>, max_gfn: u64) -> (Config, String) {
    let mut config = t.header.apply_to(Config::x86_64());
    config.max_gfn = max_gfn;
    if let Some(k) = kernel {
        config = config.with_address_spaces(k.nr_address_spaces).with_user_slots(k.user_slots);
        config.readonly_mem = k.readonly_mem;
        config.max_gfn = k.max_gfn;
        config.guest_memfd = k.guest_memfd;
        config.user_addr_limit = k.user_addr_limit;
        config.dirty_ring_rsvd_entries = k.dirty_ring_rsvd_entries;
    }
    if let Some(n) = args.address_spaces {
        config = config.with_address_spaces(n);
    }
    if let Some(n) = args.user_slots {
        config = config.with_user_slots(n);
    }
    if let Some(bits) = args.phys_bits {
        config.max_gfn = Config::max_gfn_for_phys_bits(bits);
    }
    let Some(k) = kernel else { return (config, String::new()) };
    let mut note = format!(
        "memslots: {}: the library is configured like the kernel VM: {}, {} user slots, max gfn {:#x}",
        t.path.display(),
        plural(config.nr_address_spaces, "address space"),
        config.user_slots,
        config.max_gfn
    );
    let mut differ = Vec::new();
    if config.nr_address_spaces != k.nr_address_spaces {
        differ.push(format!("--address-spaces {} (kernel {})", config.nr_address_spaces, k.nr_address_spaces));
    }
    if config.user_slots != k.user_slots {
        differ.push(format!("--user-slots {} (kernel {})", config.user_slots, k.user_slots));
    }
    if config.max_gfn != k.max_gfn {
        differ.push(format!("--phys-bits, max gfn {:#x} (kernel {:#x})", config.max_gfn, k.max_gfn));
    }
    if !differ.is_empty() {
        note = format!(
            "memslots: {}: the library differs from the kernel VM by {}, so verdicts that depend on it will differ",
            t.path.display(),
            differ.join(", ")
        );
    }
    let header = [
        ("address-spaces", t.header.address_spaces, k.nr_address_spaces),
        ("user-slots", t.header.user_slots, k.user_slots),
    ];
    for (key, given, kernel) in header {
        if let Some(n) = given.filter(|&n| n != kernel) {
            note.push_str(&format!(
                "\nmemslots: {}: note: the trace was recorded with {key}={n}, the kernel VM has {kernel}",
                t.path.display()
            ));
        }
    }
    (config, note)
}

/// Reports progress on stderr while `done` moves through `ops`: first after
/// 2 s, then every 5 s, until `stop`'s sender is dropped. The environment
/// variable `MEMSLOTS_PROGRESS_MS` sets both intervals (for the tests).
fn progress(path: &Path, ops: &[(usize, Op)], done: &AtomicUsize, stop: &mpsc::Receiver<()>) {
    let began = Instant::now();
    let every = std::env::var("MEMSLOTS_PROGRESS_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
    let mut wait = every.unwrap_or(Duration::from_secs(2));
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        wait = every.unwrap_or(Duration::from_secs(5));
        let i = done.load(Ordering::Relaxed);
        let current = ops.get(i).map_or_else(String::new, |(line, op)| format!(", now at line {line}: {op}"));
        eprintln!(
            "memslots: {}: {i}/{} operations after {:.0} s{current}",
            path.display(),
            ops.len(),
            began.elapsed().as_secs_f64()
        );
    }
}

fn replay(args: &ReplayArgs) -> Result<ExitCode> {
    let syntax = if args.exact_numbers { NumberSyntax::Exact } else { NumberSyntax::Recorder };
    // Everything that can be wrong with the input is found before the first verdict.
    let traces = args.traces.iter().map(|p| load(p, syntax)).collect::<Result<Vec<_>>>()?;
    let kernel_config = if args.kvm {
        let k = memslots_kvm::KernelVm::new()
            .map_err(|e| anyhow!("--kvm needs /dev/kvm, which cannot be used here ({e})"))?;
        Some(k.config())
    } else {
        None
    };
    let max_gfn = match args.phys_bits {
        Some(bits) => Config::max_gfn_for_phys_bits(bits),
        None => kernel_config
            .map(|c| c.max_gfn)
            .or_else(memslots_kvm::probe_max_gfn)
            .unwrap_or_else(|| Config::max_gfn_for_phys_bits(memslots_kvm::host_phys_bits().unwrap_or(48))),
    };
    let per_page = if args.kvm { memslots_kvm::slot_metadata_bytes_per_page() } else { 0 };
    // A trace that creates guest_memfds needs a kernel that can: probed by
    // creating one (some hosts' kernels have no KVM_CREATE_GUEST_MEMFD at all).
    let creates_gmem = |t: &LoadedTrace| t.ops.iter().any(|(_, op)| matches!(op, trace::Op::CreateGuestMemfd { .. }));
    if args.kvm && traces.iter().any(creates_gmem) {
        let mut probe = memslots_kvm::KernelVm::new().map_err(|e| anyhow!("cannot create a VM on /dev/kvm ({e})"))?;
        if let Verdict::Err(e) = probe.apply(&trace::Op::CreateGuestMemfd { index: 0, size: 0x1000 }) {
            let t = traces.iter().find(|t| creates_gmem(t)).map(|t| t.path.display().to_string()).unwrap_or_default();
            bail!(
                "{t}: creates guest_memfds, which this host's KVM cannot (KVM_CREATE_GUEST_MEMFD: {e}); \
                 not replayed on the kernel"
            );
        }
    }
    let mut plans = Vec::with_capacity(traces.len());
    for t in &traces {
        let (config, note) = library_config(args, t, kernel_config.as_ref(), max_gfn);
        Vm::new(config).map_err(|e| anyhow!("{}: {e}", t.path.display()))?;
        let memory_note = if args.kvm { check_kernel_memory(args, t, config, per_page)? } else { None };
        plans.push((config, note, memory_note));
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut divergences = 0usize;
    for (t, (config, note, memory_note)) in traces.iter().zip(plans) {
        let mut kernel = if args.kvm {
            Some(memslots_kvm::KernelVm::new().map_err(|e| anyhow!("cannot create a VM on /dev/kvm ({e})"))?)
        } else {
            None
        };
        let vm = Vm::new(config).map_err(|e| anyhow!("{}: {e}", t.path.display()))?;
        if !note.is_empty() || memory_note.is_some() {
            out.flush()?;
        }
        if !note.is_empty() {
            eprintln!("{note}");
        }
        if let Some(n) = memory_note {
            eprintln!("{n}");
        }
        let done = AtomicUsize::new(0);
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        std::thread::scope(|s| -> Result<()> {
            let done = &done;
            s.spawn(move || progress(&t.path, &t.ops, done, &stop_rx));
            let r = (|| -> Result<()> {
                for (i, (line, op)) in t.ops.iter().enumerate() {
                    done.store(i, Ordering::Relaxed);
                    let v: Verdict = trace::apply(&vm, op);
                    match kernel.as_mut().map(|k| k.apply(op)) {
                        Some(kv) if kv != v => {
                            divergences += 1;
                            writeln!(out, "{v} kvm={kv}  # {}:{line}: {op}", t.path.display())?;
                        }
                        _ => writeln!(out, "{v}")?,
                    }
                }
                Ok(())
            })();
            drop(stop_tx);
            r
        })?;
    }
    out.flush()?;
    if divergences > 0 {
        eprintln!("memslots: {divergences} divergence(s) from the kernel");
        return Ok(ExitCode::from(1));
    }
    if args.kvm {
        eprintln!("memslots: 0 divergences from the kernel");
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.command {
        Command::Replay(a) => replay(a),
        Command::Demo => demo::run().map(|()| ExitCode::SUCCESS),
        Command::Perf(a) => perf::run(a).map(|()| ExitCode::SUCCESS),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memslots: {e:#}");
            ExitCode::from(2)
        }
    }
}
