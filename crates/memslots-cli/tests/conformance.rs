//! `memslots replay --address-spaces 1 --user-slots 32764 T` reproduces every
//! `.expected` file of `../shared/conformance` exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

fn conformance_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance");
    d.is_dir().then_some(d)
}

fn traces(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read conformance dir")
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

#[test]
fn replay_reproduces_every_expected_file() {
    let Some(dir) = conformance_dir() else {
        panic!("../shared/conformance not found beside the project: the conformance traces are required");
    };
    let traces = traces(&dir);
    assert!(traces.len() >= 4, "expected the conformance traces, found {traces:?}");
    for trace in traces {
        let out = replay(&["--address-spaces", "1", "--user-slots", "32764"], &trace);
        assert!(out.status.success(), "{}: {}", trace.display(), String::from_utf8_lossy(&out.stderr));
        let got = String::from_utf8(out.stdout).expect("utf8");
        let want = std::fs::read_to_string(trace.with_extension("expected")).expect("expected file");
        let (got, want): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        assert_eq!(got.len(), want.len(), "{}: verdict count", trace.display());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{}: verdict {} differs", trace.display(), i + 1);
        }
    }
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
fn default_configuration_is_two_address_spaces() {
    let dir = std::env::temp_dir().join(format!("memslots-as-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("smm.trace");
    std::fs::write(&t, "set 0x10000 0 0 0x1000 0x1000\nset 0x20000 0 0 0x1000 0x1000\n").unwrap();
    let out = replay(&[], &t);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\nEINVAL\n");
}
