//! Differential test: random operations replayed on the library and on the
//! host's KVM must give identical verdicts, and end in identical slot states.
//! Skips (with a clear message) where /dev/kvm is absent.

use memslots::trace::{Generator, Op, Verdict};
use memslots::{Config, Error, IllegalChange, MemoryChange, Outcome, UserMemoryRegion, Vm};
use memslots_kvm::{host_config, KernelVm};
use std::collections::BTreeMap;

/// Which check of `KVM_SET_USER_MEMORY_REGION` (or dirty-log ioctl) decided an op.
fn check_name(r: &Result<Outcome, Error>) -> &'static str {
    match r {
        Ok(Outcome::Changed(MemoryChange::Create)) => "create",
        Ok(Outcome::Changed(MemoryChange::Delete)) => "delete",
        Ok(Outcome::Changed(MemoryChange::Move)) => "move",
        Ok(Outcome::Changed(MemoryChange::FlagsOnly)) => "flags-only",
        Ok(Outcome::Unchanged) => "no-op",
        Err(Error::InvalidFlags { .. }) => "1 flags",
        Err(Error::SlotIdOutOfRange { .. }) => "0/7 slot id",
        Err(Error::UnalignedSize { .. }) => "3 size alignment",
        Err(Error::UnalignedGuestPhysAddr { .. }) => "4 gpa alignment",
        Err(Error::BadUserspaceAddr { .. }) => "5 hva",
        Err(Error::AddressSpaceOutOfRange { .. }) => "7 address space",
        Err(Error::GuestRangeWraps { .. }) => "8 gpa wrap",
        Err(Error::TooManyPages { .. }) => "9 npages",
        Err(Error::DeleteNonexistent { .. }) => "10 delete missing",
        Err(Error::IllegalChange { what: IllegalChange::UserspaceAddr, .. }) => "12 hva change",
        Err(Error::IllegalChange { what: IllegalChange::Size, .. }) => "12 size change",
        Err(Error::IllegalChange { what: IllegalChange::ReadonlyFlag, .. }) => "12 readonly toggle",
        Err(Error::Overlap { .. }) => "13 overlap",
        Err(Error::GfnBeyondMax { .. }) => "x86 max gfn",
        Err(_) => "other",
    }
}

/// The checks a v1 request on a VM without private memory can reach
/// (guest_memfd offsets and the total-pages overflow cannot be reached).
const SET_CHECKS: &[&str] = &[
    "create",
    "delete",
    "move",
    "flags-only",
    "no-op",
    "1 flags",
    "0/7 slot id",
    "3 size alignment",
    "4 gpa alignment",
    "5 hva",
    "7 address space",
    "8 gpa wrap",
    "9 npages",
    "10 delete missing",
    "12 hva change",
    "12 size change",
    "12 readonly toggle",
    "13 overlap",
    "x86 max gfn",
];

fn dirty_check_name(op: &Op, v: Verdict) -> &'static str {
    match (op, v) {
        (Op::GetDirtyLog { .. }, Verdict::Ok) => "get ok",
        (Op::GetDirtyLog { .. }, _) => "get error",
        (Op::ClearDirtyLog { .. }, Verdict::Ok) => "clear ok",
        (Op::ClearDirtyLog { .. }, _) => "clear error",
        (Op::EnableManualProtect { .. }, Verdict::Ok) => "manual ok",
        (Op::EnableManualProtect { .. }, _) => "manual error",
        (Op::Set(_), _) => unreachable!(),
        _ => "other",
    }
}

/// Runs `ops` random operations on a fresh library VM and a fresh kernel VM.
/// Returns (divergences, coverage).
fn run(config: Config, seed: u64, ops: usize, coverage: &mut BTreeMap<&'static str, usize>) -> Vec<String> {
    let vm = Vm::new(config).expect("library VM");
    let mut kernel = KernelVm::new().expect("kernel VM");
    let mut gen = Generator::new(seed, config.nr_address_spaces, config.user_slots);
    let mut divergences = Vec::new();
    for i in 0..ops {
        let op = gen.next_op();
        let (ours, name) = match op {
            Op::Set(r) => {
                let res = vm.set_user_memory_region(&r);
                let name = check_name(&res);
                (Verdict::from(res), name)
            }
            _ => {
                let v = memslots::trace::apply(&vm, &op);
                (v, dirty_check_name(&op, v))
            }
        };
        *coverage.entry(name).or_default() += 1;
        let theirs = kernel.apply(&op);
        if ours != theirs {
            divergences.push(format!("seed {seed} op {i}: `{op}`: library {ours}, kernel {theirs}"));
        }
    }
    // Probe the final state: every slot the library holds must exist in the
    // kernel identically (an identical request is a no-op there), and every
    // id the library does not hold must be absent (deleting it is EINVAL).
    let guard = vm.read();
    for as_id in 0..config.nr_address_spaces {
        let held: BTreeMap<u16, _> = guard.slots(as_id).map(|s| (s.id, *s.desc())).collect();
        for id in 0..16u16 {
            let slot = (u32::from(as_id) << 16) | u32::from(id);
            let probe = match held.get(&id) {
                Some(d) => UserMemoryRegion::new(slot, d.flags, d.base_gfn << 12, d.npages << 12, d.userspace_addr),
                None => UserMemoryRegion::new(slot, 0, 0, 0, 0),
            };
            let want = if held.contains_key(&id) { Verdict::Ok } else { Verdict::Err(memslots::Errno::EINVAL) };
            let theirs = kernel.apply(&Op::Set(probe));
            if theirs != want {
                divergences.push(format!(
                    "seed {seed} final state of slot {slot:#x}: kernel says {theirs} to `{}`",
                    Op::Set(probe)
                ));
            }
        }
    }
    divergences
}

#[test]
fn random_operations_match_the_kernel() {
    let Some(host) = host_config() else {
        eprintln!("SKIP random_operations_match_the_kernel: /dev/kvm is not available on this machine");
        return;
    };
    let kernel_as = KernelVm::new().expect("kernel VM").nr_address_spaces();
    let mut total = 0;
    for nr_as in [1u16, 2] {
        if nr_as != kernel_as {
            eprintln!(
                "SKIP {nr_as} address space(s): a default VM on this host's KVM has {kernel_as} \
                 (KVM_CAP_MULTI_ADDRESS_SPACE), so the library cannot be compared with it in that setting"
            );
            continue;
        }
        let config = host.with_address_spaces(nr_as);
        let mut coverage = BTreeMap::new();
        let mut divergences = Vec::new();
        for seed in 0..4u64 {
            divergences.extend(run(config, 0x5eed_0000 + seed * 7919 + u64::from(nr_as), 6_000, &mut coverage));
            total += 6_000;
        }
        eprintln!("{nr_as} address space(s): coverage {coverage:?}");
        assert!(divergences.is_empty(), "{} divergence(s):\n{}", divergences.len(), divergences.join("\n"));
        for check in SET_CHECKS {
            assert!(coverage.get(check).copied().unwrap_or(0) > 0, "the generator never reached check {check:?}");
        }
        for check in ["get ok", "get error", "clear ok", "clear error", "manual ok", "manual error"] {
            assert!(coverage.get(check).copied().unwrap_or(0) > 0, "the generator never reached {check:?}");
        }
    }
    assert!(total >= 20_000, "only {total} operations compared");
}
