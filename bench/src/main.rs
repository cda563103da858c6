//! The standalone harness: `cargo run --release --manifest-path
//! bench/Cargo.toml -- --quick [--json PATH]`. A thin command-line wrapper
//! around [`memslots_bench::run`]; see README.md.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use memslots_bench::{report, Error, Options, Plan, STANDALONE_BUILD_NOTE};

#[derive(Parser, Debug)]
#[command(about = "memslots lookups and updates against vm-memory, ArcSwap, imbl, RwLock and a lower bound")]
struct Args {
    /// Short run (fewer repetitions, shorter loops): well under two minutes.
    #[arg(long)]
    quick: bool,
    /// Also write every figure and verdict as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Also measure the kernel's raw KVM_SET_USER_MEMORY_REGION (updates
    /// table) and `flags` (dirty logging on and off), as `memslots perf` does.
    #[arg(long)]
    kvm: bool,
    /// Slot counts to measure instead of the standard ones (comma separated;
    /// verdicts at sizes not measured print SKIP).
    #[arg(long, value_delimiter = ',', hide = true)]
    sizes: Option<Vec<u32>>,
}

fn run(args: Args) -> Result<(), Error> {
    let opts = Options {
        plan: Plan::new(args.quick, args.sizes),
        build_note: STANDALONE_BUILD_NOTE.to_owned(),
        kvm: args.kvm,
        flags: args.kvm,
    };
    opts.validate()?;
    // Fail on a bad path before measuring anything.
    let mut json =
        args.json.as_ref().map(|p| File::create(p).map_err(|e| format!("{}: {e}", p.display()))).transpose()?;
    let stdout = std::io::stdout();
    let start = Instant::now();
    let report = memslots_bench::run(&opts, &mut stdout.lock(), &mut |n, what| {
        eprintln!("[{:6.1} s] {n} slots: {what}", start.elapsed().as_secs_f64());
    })?;
    eprintln!("[{:6.1} s] done", start.elapsed().as_secs_f64());
    report::print(&mut stdout.lock(), &report)?;
    if let (Some(file), Some(path)) = (json.as_mut(), args.json.as_ref()) {
        serde_json::to_writer_pretty(&mut *file, &report)?;
        writeln!(file)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
