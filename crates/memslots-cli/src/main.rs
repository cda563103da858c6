//! `memslots`: replay KVM memslot traces on the library, and measure it.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use memslots::trace::{self, NumberSyntax, Verdict};
use memslots::{Config, Vm};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Replay operation traces (shared/conformance format) and print one verdict a line.
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
    /// Address spaces of the VM (x86: 2 with SMM, 1 without).
    #[arg(long, default_value_t = 2)]
    address_spaces: u16,
    /// User slots per address space (KVM_CAP_NR_MEMSLOTS).
    #[arg(long, default_value_t = memslots::KVM_USER_MEM_SLOTS)]
    user_slots: u16,
    /// Guest physical address bits the MMU maps (x86 kvm_mmu_max_gfn: the host's
    /// MAXPHYADDR with EPT/NPT, 52 with shadow paging). Default: probed from this
    /// host's KVM, else the CPU's physical address bits, else 48.
    #[arg(long)]
    phys_bits: Option<u32>,
    /// Also replay on a fresh kernel VM (/dev/kvm) and print both verdicts
    /// where they differ; exit 1 on any divergence.
    #[arg(long)]
    kvm: bool,
    /// Read numbers >= 2^63 literally instead of saturating them to i64::MAX
    /// as the conformance recorder did (see `memslots::trace`).
    #[arg(long)]
    exact_numbers: bool,
    /// Trace files; each is replayed on a fresh VM.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
}

fn replay(args: &ReplayArgs) -> Result<ExitCode> {
    let mut config = Config::x86_64().with_address_spaces(args.address_spaces).with_user_slots(args.user_slots);
    config.max_gfn = match args.phys_bits {
        Some(bits) => Config::max_gfn_for_phys_bits(bits),
        None => memslots_kvm::probe_max_gfn()
            .unwrap_or_else(|| Config::max_gfn_for_phys_bits(memslots_kvm::host_phys_bits().unwrap_or(48))),
    };
    config.validate().context("invalid VM configuration")?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut divergences = 0usize;
    for path in &args.traces {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let syntax = if args.exact_numbers { NumberSyntax::Exact } else { NumberSyntax::Recorder };
        let ops = match trace::parse_with(&text, syntax) {
            Ok(ops) => ops,
            Err(e) => bail!("{}:{}: {}", path.display(), e.line, e.message),
        };
        let vm = Vm::new(config)?;
        let mut kernel = if args.kvm {
            let k = memslots_kvm::KernelVm::new().context("--kvm: cannot create a VM on /dev/kvm")?;
            if k.nr_address_spaces() != args.address_spaces {
                eprintln!(
                    "memslots: note: the kernel VM has {} address space(s), the library {}",
                    k.nr_address_spaces(),
                    args.address_spaces
                );
            }
            Some(k)
        } else {
            None
        };
        for (line, op) in &ops {
            let v: Verdict = trace::apply(&vm, op);
            match kernel.as_mut().map(|k| k.apply(op)) {
                Some(kv) if kv != v => {
                    divergences += 1;
                    writeln!(out, "{v} kvm={kv}  # {}:{line}: {op}", path.display())?;
                }
                _ => writeln!(out, "{v}")?,
            }
        }
    }
    out.flush()?;
    if divergences > 0 {
        eprintln!("memslots: {divergences} divergence(s) from the kernel");
        return Ok(ExitCode::from(1));
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
