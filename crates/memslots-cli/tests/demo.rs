//! `memslots demo` runs on the host's KVM (one memslots VM with guest memory
//! and KVM layers) and reports what it promises. Skips without /dev/kvm.

use std::process::Command;

#[test]
fn demo_harvests_exactly_the_pages_written_and_follows_slot_changes() {
    if !memslots_kvm::kvm_available() {
        return eprintln!("SKIP demo test: /dev/kvm is not usable on this machine");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_memslots")).arg("demo").output().expect("run memslots demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("-> exactly the pages written"), "{stdout}");
    assert!(stdout.contains("the guest no longer reaches it"), "{stdout}");
    assert!(stdout.contains("demo finished"), "{stdout}");
    assert!(!stdout.contains("Some(") && !stdout.contains("NOT the pages"), "{stdout}");
}
