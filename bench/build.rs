//! Records the compiler and the profile the harness was built with, so the
//! report names the toolchain that compiled the measured code (not whatever
//! `rustc` is on the PATH when it runs).

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned());
    println!("cargo:rustc-env=BENCH_RUSTC_VERSION={version}");
    for (var, key) in [("PROFILE", "BENCH_PROFILE"), ("OPT_LEVEL", "BENCH_OPT_LEVEL"), ("DEBUG", "BENCH_DEBUG")] {
        let v = std::env::var(var).unwrap_or_else(|_| "?".to_owned());
        println!("cargo:rustc-env={key}={v}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
