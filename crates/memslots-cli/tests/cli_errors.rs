//! The `memslots` command checks its arguments before doing any work: each
//! bad argument fails at once (well within 1 s, before a benchmark or a
//! replay starts) with exit code 2 and one sentence, no repeated prefixes.

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `memslots ARGS`; returns (exit code, stdout, stderr, time taken).
fn run(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_memslots")).args(args).output().expect("run memslots");
    let took = t.elapsed();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), took)
}

/// Checks a refusal: exit 2, nothing on stdout, fast, and one sentence on
/// stderr that contains every one of `words`. clap's own refusals add the
/// hint "For more information, try '--help'." after a blank line.
fn refused(args: &[&str], words: &[&str]) -> String {
    let (code, stdout, stderr, took) = run(args);
    assert_eq!(code, Some(2), "{args:?}: exit code; stderr: {stderr}");
    assert!(stdout.is_empty(), "{args:?}: work was done before the refusal: {stdout}");
    assert!(took < Duration::from_secs(1), "{args:?}: refused only after {took:?}");
    let lines: Vec<&str> =
        stderr.lines().filter(|l| !l.trim().is_empty() && *l != "For more information, try '--help'.").collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("memslots: ") || line.starts_with("error: "), "{args:?}: {line}");
    for w in words {
        assert!(line.contains(w), "{args:?}: {w:?} missing from {line:?}");
    }
    // No repeated prefixes ("invalid ...: invalid ...") and no internal names.
    for w in ["invalid", "cannot", "configuration", "error"] {
        assert!(line.matches(w).count() <= 1, "{args:?}: {w:?} repeats in {line:?}");
    }
    for w in ["mem_slots_num", "user_slots", "nr_address_spaces", "max_gfn"] {
        assert!(!line.contains(w), "{args:?}: internal name {w:?} in {line:?}");
    }
    line.to_string()
}

fn trace() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/edges.trace").to_string()
}

#[test]
fn perf_json_path_not_writable() {
    refused(&["perf", "--quick", "--json", "/nonexistent/x.json"], &["--json", "/nonexistent/x.json"]);
}

#[test]
fn perf_svg_path_not_writable() {
    refused(&["perf", "--quick", "--svg", "/nonexistent/x.svg"], &["--svg", "/nonexistent/x.svg"]);
    // A directory cannot be written either.
    let dir = std::env::temp_dir();
    refused(&["perf", "--quick", "--svg", dir.to_str().unwrap()], &["--svg"]);
}

#[test]
fn perf_bad_json_path_fails_even_with_a_good_svg_path() {
    let ok = std::env::temp_dir().join(format!("memslots-cli-errors-{}.svg", std::process::id()));
    refused(&["perf", "--quick", "--svg", ok.to_str().unwrap(), "--json", "/nonexistent/x.json"], &["--json"]);
    let _ = std::fs::remove_file(ok);
}

#[test]
fn perf_vcpus_zero() {
    refused(&["perf", "--quick", "--vcpus", "0"], &["--vcpus", "1..=1024"]);
    refused(&["perf", "--quick", "--vcpus", "1025"], &["--vcpus", "1..=1024"]);
}

#[test]
fn replay_phys_bits_out_of_range() {
    for bits in ["0", "31", "53", "99"] {
        refused(&["replay", "--phys-bits", bits, &trace()], &["--phys-bits", "32..=52"]);
    }
}

#[test]
fn replay_user_slots_out_of_range() {
    for n in ["0", "32765", "65535", "70000"] {
        refused(&["replay", "--user-slots", n, &trace()], &["--user-slots", "1..=32764"]);
    }
    let (_, help, _, _) = run(&["replay", "--help"]);
    assert!(help.contains("1..=32764"), "the help gives the accepted range: {help}");
    assert!(!help.contains("65535"));
}

#[test]
fn replay_address_spaces_out_of_range() {
    refused(&["replay", "--address-spaces", "0", &trace()], &["--address-spaces", "1..=64"]);
    refused(&["replay", "--address-spaces", "65", &trace()], &["--address-spaces", "1..=64"]);
}

#[test]
fn replay_checks_every_trace_before_the_first_verdict() {
    let missing = "/nonexistent/missing.trace";
    refused(&["replay", &trace(), missing], &[missing]);
}

#[test]
fn accepted_bounds_work() {
    // The ends of each range are accepted (and --vcpus 1 is the default).
    for args in [["--user-slots", "1"], ["--user-slots", "32764"], ["--phys-bits", "32"], ["--phys-bits", "52"]] {
        let (code, stdout, stderr, _) = run(&["replay", args[0], args[1], &trace()]);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stdout.is_empty());
    }
}
