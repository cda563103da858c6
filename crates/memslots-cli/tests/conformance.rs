//! `memslots replay T`, with no flags, reproduces every `.expected` file of
//! the project's conformance traces (`tests/conformance/`, each carrying its
//! configuration in a `# config:` header), and `memslots replay --kvm T`
//! agrees with this host's kernel on all of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The project's copy of the traces: always there, in a fresh clone too.
fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// `../shared/conformance` beside the project, where it exists (an optional
/// extra source: the original recordings).
fn shared_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance");
    d.is_dir().then_some(d)
}

fn traces(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "trace"))
        .collect();
    v.sort();
    v
}

fn replay(args: &[&str], trace: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_memslots"))
        .arg("replay")
        .args(args)
        .arg(trace)
        .output()
        .expect("run memslots replay")
}

fn check_expected(trace: &Path, out: &std::process::Output) {
    assert!(out.status.success(), "{}: {}", trace.display(), String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8(out.stdout.clone()).expect("utf8");
    let want = std::fs::read_to_string(trace.with_extension("expected")).expect("expected file");
    let (got, want): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    assert_eq!(got.len(), want.len(), "{}: verdict count", trace.display());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{}: verdict {} differs", trace.display(), i + 1);
    }
}

#[test]
fn replay_reproduces_every_expected_file() {
    let traces = traces(&conformance_dir());
    let names: Vec<_> = traces.iter().filter_map(|p| p.file_name()?.to_str()).collect();
    assert_eq!(
        names,
        ["edges-13.trace", "edges.trace", "random-1.trace", "random-2.trace", "random-3.trace"],
        "the shipped traces"
    );
    for trace in &traces {
        // No flags: the header says 1 address space and 32764 user slots.
        check_expected(trace, &replay(&[], trace));
    }
}

#[test]
fn shipped_traces_match_the_shared_recordings_where_present() {
    let Some(shared) = shared_dir() else {
        println!("SKIP: ../shared/conformance is not beside the project (only the shipped copies are checked)");
        return;
    };
    for original in traces(&shared) {
        let name = original.file_name().expect("file name");
        let ours = conformance_dir().join(name);
        let (a, b) = (std::fs::read_to_string(&original).unwrap(), std::fs::read_to_string(&ours).unwrap());
        // The shipped copy is the original with a configuration header.
        let header = "# config: address-spaces=1 user-slots=32764\n";
        assert_eq!(b.strip_prefix(header), Some(a.as_str()), "{}", ours.display());
        let expected = original.with_extension("expected");
        assert_eq!(std::fs::read(&expected).unwrap(), std::fs::read(ours.with_extension("expected")).unwrap());
        // The original, without a header, replays with the flags.
        check_expected(&original, &replay(&["--address-spaces", "1", "--user-slots", "32764"], &original));
    }
}

#[test]
fn flags_override_the_header() {
    // edges.trace creates a slot in address space 1 (EINVAL on a 1-address-space VM).
    let edges = conformance_dir().join("edges.trace");
    let out = replay(&["--address-spaces", "2"], &edges);
    let want = std::fs::read_to_string(edges.with_extension("expected")).unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(got.lines().count(), want.lines().count());
    assert_ne!(got, want, "--address-spaces 2 must override the header's 1");
}

/// Runs `memslots replay --kvm [extra] trace` with stdout and stderr in one
/// file (to see what comes first): (exit status, the output, seconds).
fn replay_kvm(trace: &Path, extra: &[&str], log: &Path) -> (std::process::ExitStatus, String, f64) {
    let f = std::fs::File::create(log).unwrap();
    let began = std::time::Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_memslots"))
        .args(["replay", "--kvm"])
        .args(extra)
        .arg(trace)
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .status()
        .expect("run memslots replay --kvm");
    (status, std::fs::read_to_string(log).unwrap(), began.elapsed().as_secs_f64())
}

/// `replay --kvm`, no flags, on every shipped trace: 0 divergences. A trace
/// whose slots would make this host's KVM allocate more metadata than the
/// host can spare (`edges.trace` and `random-1.trace` hold a slot of 2^31 - 1
/// pages: about 20 GiB of rmap and write-tracking arrays with shadow paging)
/// is refused by `replay --kvm` before any verdict; the test then prints a
/// SKIP line with the reason, unless `MEMSLOTS_TEST_KVM_LARGE=1` asks to run
/// it anyway (`--no-kernel-memory-check`). So is a trace that creates
/// guest_memfds on a host whose KVM cannot. Traces run one at a time.
#[test]
fn kvm_replay_agrees_with_the_kernel_on_every_shipped_trace() {
    if !Path::new("/dev/kvm").exists() || std::fs::File::open("/dev/kvm").is_err() {
        println!("SKIP: /dev/kvm is absent or not usable: replay --kvm not checked");
        return;
    }
    let large_ok = std::env::var_os("MEMSLOTS_TEST_KVM_LARGE").is_some_and(|v| v == "1");
    let extra: &[&str] = if large_ok { &["--no-kernel-memory-check"] } else { &[] };
    let dir = std::env::temp_dir().join(format!("memslots-kvm-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for trace in traces(&conformance_dir()) {
        let log = dir.join(trace.file_name().unwrap()).with_extension("log");
        let (status, text, secs) = replay_kvm(&trace, extra, &log);
        let refused = text.contains("--no-kernel-memory-check") || text.contains("KVM_CREATE_GUEST_MEMFD");
        if status.code() == Some(2) && refused {
            assert_eq!(text.lines().count(), 1, "{}: refused after some work:\n{text}", trace.display());
            println!("SKIP: {}: not replayed on the kernel here: {}", trace.display(), text.trim());
            continue;
        }
        assert!(status.success(), "{}: exit {status:?}:\n{text}", trace.display());
        assert!(!text.contains("kvm="), "{}: divergences:\n{text}", trace.display());
        assert!(text.contains("0 divergences from the kernel"), "{}:\n{text}", trace.display());
        // The configuration note comes before the first verdict.
        let lines: Vec<&str> = text.lines().collect();
        let note = lines.iter().position(|l| l.contains("configured like the kernel VM"));
        let first_verdict = lines.iter().position(|l| !l.starts_with("memslots:"));
        assert!(note.is_some(), "{}: no configuration note:\n{text}", trace.display());
        assert!(note < first_verdict, "{}: the note comes after a verdict:\n{text}", trace.display());
        // One verdict per operation (compared with the kernel's, not the
        // recording's: this host's kernel is the authority here).
        let verdicts = lines.iter().filter(|l| !l.starts_with("memslots:")).count();
        let want = std::fs::read_to_string(trace.with_extension("expected")).unwrap();
        assert_eq!(verdicts, want.lines().count(), "{}: verdict count", trace.display());
        // Long runs show progress.
        if secs > 4.0 {
            assert!(text.contains(" operations after "), "{}: {secs:.0} s without progress:\n{text}", trace.display());
        }
        println!("{}: replay --kvm, 0 divergences in {secs:.1} s", trace.display());
        checked += 1;
    }
    assert!(checked >= 2, "replay --kvm checked only {checked} trace(s)");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn long_runs_report_progress_on_stderr() {
    // A long trace, and progress every millisecond instead of after 2 s.
    let dir = std::env::temp_dir().join(format!("memslots-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("long.trace");
    let mut text = String::from("# config: address-spaces=1\n");
    for i in 0..200_000u32 {
        let slot = i % 512;
        let size = if i % 1024 < 512 { 0x1000 } else { 0 };
        text.push_str(&format!("set {slot} 0 {:#x} {size:#x} 0x10000000\n", u64::from(slot) * 0x1000));
    }
    std::fs::write(&t, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_memslots"))
        .arg("replay")
        .arg(&t)
        .env("MEMSLOTS_PROGRESS_MS", "1")
        .output()
        .expect("run memslots replay");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("long.trace: ") && err.contains("/200000 operations after "), "no progress: {err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 200_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_input_exits_nonzero_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("memslots-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.trace");
    std::fs::write(&bad, "# ok\nset 0 0 0 0x1000 0x1000\nset 0 zero\n").unwrap();
    let out = replay(&[], &bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.trace:3:"), "stderr: {err}");
    let missing = replay(&[], &dir.join("missing.trace"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing.trace"));
}

#[test]
fn bad_header_is_refused_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("memslots-hdr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("hdr.trace");
    std::fs::write(&t, "# notes\n# config: address-spaces=1 user-slots=40000\nset 0 0 0 0x1000 0x1000\n").unwrap();
    let out = replay(&[], &t);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "verdicts before the error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hdr.trace:2: user-slots must be a number in 1..=32764"), "stderr: {err}");
}

#[test]
fn default_configuration_is_two_address_spaces() {
    let dir = std::env::temp_dir().join(format!("memslots-as-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("smm.trace");
    std::fs::write(&t, "set 0x10000 0 0 0x1000 0x1000\nset 0x20000 0 0 0x1000 0x1000\n").unwrap();
    let out = replay(&[], &t);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\nEINVAL\n");
}
