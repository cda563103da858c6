//! The scenarios on real KVM: a real-mode guest (`memslots_kvm::guest`) whose
//! RAM is a boot slot and 192 data slots of 4 KiB, created through the library
//! and mirrored into the kernel, runs a loop that reads a word of its target
//! page, reports it on an I/O port and increments another word of it.
//!
//! - `move-active` / `move-inactive`: while the vCPU loops on the last data
//!   slot / the first, the host moves the last data slot to 1 GiB (out of the
//!   guest's reach: its accesses exit as MMIO) and back. Backend
//!   `library+kvm` moves through the library (which mirrors each change into
//!   the kernel); `kvm-ioctl` issues the same two ioctls on the same VM
//!   directly, bypassing the library: the kernel's share of the cost.
//! - `map` / `rw` (writer program, library+kvm only): see [`write_scenario`].
//! - `setup`: creating `n` 4 KiB slots over one mapping, from an empty VM, on
//!   the library alone (`library`), through the library into the kernel
//!   (`library+kvm`) and with the bare ioctl (`kvm-ioctl`).

use super::{ns, ScenarioPoint, Stat};
use anyhow::{Context, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use memslots::{Config, UserMemoryRegion, Vm};
use memslots_kvm::guest::{loop_program, run_loop, writer_program, Guest, LoopEvent, Mapping, DATA_GPA, DATA_SLOTS};
use memslots_kvm::kdirty::KernelDirtyMode;
use memslots_kvm::KvmVcpu;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the moved slot goes: beyond real mode's reach.
const AWAY_GPA: u64 = 0x4000_0000;
/// Guest physical base of the setup layouts.
const SETUP_GPA: u64 = 0x1_0000_0000;

/// Runs the guest scenarios and the setup comparison; `setup_sizes` are slot counts.
pub(crate) fn run(budget: Duration, setup_sizes: &[u32], out: &mut Vec<ScenarioPoint>) -> Result<()> {
    for scenario in ["move-active", "move-inactive"] {
        for backend in ["library+kvm", "kvm-ioctl"] {
            out.push(move_scenario(budget, scenario, backend)?);
        }
    }
    for scenario in ["map", "rw"] {
        out.push(write_scenario(budget, scenario)?);
    }
    for &n in setup_sizes {
        out.extend(setup(n)?);
    }
    Ok(())
}

fn move_scenario(budget: Duration, scenario: &'static str, backend: &'static str) -> Result<ScenarioPoint> {
    let target = if scenario == "move-active" { DATA_SLOTS - 1 } else { 0 };
    let seg = u16::try_from((DATA_GPA + u64::from(target) * 4096) >> 4)?;
    let t = Instant::now();
    let mut g = Guest::new(&loop_program(seg), &[], false, KernelDirtyMode::Bitmap).context("building the guest")?;
    let setup_ms = ns(t.elapsed()) / 1e6;
    let last = DATA_SLOTS - 1;
    let slot = memslots_kvm::guest::DATA_SLOT_BASE + last;
    let home = Guest::data_gpa(last);
    let hva = g.data.hva() + u64::from(last) * 4096;
    let Guest { vm, vcpu, .. } = &mut g;
    let vm = &*vm;
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let mmio = AtomicU64::new(0);
    let mut samples = Vec::new();
    let r: Result<()> = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            run_loop(vcpu, |ev| {
                match ev {
                    LoopEvent::Read(_) => reads.fetch_add(1, Ordering::Relaxed),
                    LoopEvent::MmioRead(_) | LoopEvent::MmioWrite(_) => mmio.fetch_add(1, Ordering::Relaxed),
                };
                !stop.load(Ordering::Relaxed)
            })
        });
        let mut body = || -> Result<()> {
            // Let the guest start touching its page first.
            let wait = Instant::now();
            while reads.load(Ordering::Relaxed) == 0 && wait.elapsed() < Duration::from_secs(5) {
                std::thread::yield_now();
            }
            let began = Instant::now();
            while samples.is_empty() || began.elapsed() < budget {
                let t = Instant::now();
                for gpa in [AWAY_GPA, home] {
                    if backend == "kvm-ioctl" {
                        let region = kvm_userspace_memory_region {
                            slot,
                            flags: 0,
                            guest_phys_addr: gpa,
                            memory_size: 4096,
                            userspace_addr: hva,
                        };
                        // SAFETY: `vm_fd`'s contract: only this slot request is
                        // made, with the same host range the slot already maps
                        // (the Guest's data mapping, which its VM owns and the
                        // vCPU keeps alive); only the guest address changes,
                        // and it is restored each iteration.
                        unsafe { vm.hooks().vm_fd().set_user_memory_region(region) }
                            .context("KVM_SET_USER_MEMORY_REGION")?;
                    } else {
                        vm.set_user_memory_region(&UserMemoryRegion::new(slot, 0, gpa, 4096, hva))?;
                    }
                }
                samples.push(ns(t.elapsed()) / 1e3);
            }
            Ok(())
        };
        let r = body();
        stop.store(true, Ordering::Relaxed);
        let ran = runner.join().map_err(|_| anyhow::anyhow!("vCPU thread panicked"))?;
        ran.context("running the guest")?;
        r
    });
    r?;
    if reads.load(Ordering::Relaxed) == 0 {
        anyhow::bail!("the guest never reported a read");
    }
    let iterations = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mean = samples.iter().sum::<f64>() / f64::from(iterations.max(1));
    let stat = Stat::of(samples);
    Ok(ScenarioPoint {
        backend,
        scenario,
        slots: DATA_SLOTS + 1,
        area_bytes: u64::from(DATA_SLOTS) * 4096,
        vcpus: 1,
        setup_ms,
        iterations,
        iter_median_us: stat.median,
        iter_mean_us: mean,
        iter_min_us: stat.min,
        iter_max_us: stat.max,
        vcpu_accesses: reads.load(Ordering::Relaxed),
        vcpu_misses: mmio.load(Ordering::Relaxed),
    })
}

/// Restarts the writer program at 0x1000 and runs it to HLT; returns the
/// MMIO exits seen (accesses that found no slot).
fn run_writer(vcpu: &mut KvmVcpu) -> Result<u64> {
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    let mut mmio = 0u64;
    for _ in 0..100_000 {
        match vcpu.run()? {
            VcpuExit::Hlt => return Ok(mmio),
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => mmio += 1,
            VcpuExit::IoOut(..) => {}
            other => anyhow::bail!("unexpected exit {other:?}"),
        }
    }
    anyhow::bail!("the guest did not halt")
}

/// `map` and `rw` with the writer program (writes 0xBEEF and its segment to
/// the first words of each page in its table), phases run one after the other:
/// - `map`: the host unmaps (`MADV_DONTNEED`, host address found through the
///   library) the second half of the data pages, the guest writes the first
///   half (faulting them back in through the kernel's memslots), then swapped.
/// - `rw`: the guest writes every data page, the host verifies each through
///   the library's translation and clears it.
fn write_scenario(budget: Duration, scenario: &'static str) -> Result<ScenarioPoint> {
    let t = Instant::now();
    let mut g = Guest::new(&writer_program(), &[], false, KernelDirtyMode::Bitmap).context("building the guest")?;
    let setup_ms = ns(t.elapsed()) / 1e6;
    let seg = |i: u32| u16::try_from(Guest::data_gpa(i) >> 4).unwrap_or(0);
    let table = |lo: u32, hi: u32| -> Vec<u8> { (lo..hi).map(seg).chain([0]).flat_map(u16::to_le_bytes).collect() };
    let half = DATA_SLOTS / 2;
    let Guest { vm, vcpu, boot, .. } = &mut g;
    let vm = &*vm;
    let host_addr = |i: u32| -> Result<u64> { Ok(vm.read().gfn_to_hva(0, Guest::data_gpa(i) >> 12)?) };
    let unmap = |lo: u32, hi: u32| -> Result<()> {
        for i in lo..hi {
            let hva = host_addr(i)?;
            // SAFETY: a data page of the Guest's mapping (alive while `g`
            // is); MADV_DONTNEED only drops its contents, which the guest
            // rewrites (the kernel's MMU notifier unmaps it from the guest).
            if unsafe { libc::madvise(hva as *mut libc::c_void, 4096, libc::MADV_DONTNEED) } != 0 {
                anyhow::bail!("madvise: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    let mut samples = Vec::new();
    let (mut accesses, mut misses, mut bad) = (0u64, 0u64, 0u64);
    let began = Instant::now();
    while samples.is_empty() || began.elapsed() < budget {
        let t = Instant::now();
        if scenario == "map" {
            for (lo, hi, other_lo, other_hi) in [(0, half, half, DATA_SLOTS), (half, DATA_SLOTS, 0, half)] {
                unmap(other_lo, other_hi)?;
                boot.write(0x2000, &table(lo, hi))?;
                misses += run_writer(vcpu)?;
                accesses += u64::from(hi - lo);
            }
        } else {
            boot.write(0x2000, &table(0, DATA_SLOTS))?;
            misses += run_writer(vcpu)?;
            accesses += u64::from(DATA_SLOTS);
            for i in 0..DATA_SLOTS {
                let hva = host_addr(i)?;
                // A data page of the Guest's mapping; the vCPU is halted
                // (this thread runs it), so nothing races.
                let ptr = hva as *mut u16;
                // SAFETY: `ptr` is the (page aligned) start of a mapped data
                // page, alive while `g` is; no concurrent access (see above).
                let (a, b) = unsafe { (std::ptr::read_volatile(ptr), std::ptr::read_volatile(ptr.add(1))) };
                if a != 0xBEEF || b != seg(i) {
                    bad += 1;
                }
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(hva as *mut u32, 0) };
            }
        }
        samples.push(ns(t.elapsed()) / 1e3);
    }
    if bad != 0 {
        anyhow::bail!("kvm {scenario}: {bad} page(s) held the wrong value");
    }
    let iterations = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mean = samples.iter().sum::<f64>() / f64::from(iterations.max(1));
    let stat = Stat::of(samples);
    Ok(ScenarioPoint {
        backend: "library+kvm",
        scenario,
        slots: DATA_SLOTS + 1,
        area_bytes: u64::from(DATA_SLOTS) * 4096,
        vcpus: 1,
        setup_ms,
        iterations,
        iter_median_us: stat.median,
        iter_mean_us: mean,
        iter_min_us: stat.min,
        iter_max_us: stat.max,
        vcpu_accesses: accesses,
        vcpu_misses: misses,
    })
}

/// Times creating `n` 4 KiB slots over one mapping, three ways.
fn setup(n: u32) -> Result<Vec<ScenarioPoint>> {
    let mapping = Mapping::new(usize::try_from(u64::from(n) * 4096)?)?;
    let region = |i: u32| {
        UserMemoryRegion::new(i, 0, SETUP_GPA + u64::from(i) * 4096, 4096, mapping.hva() + u64::from(i) * 4096)
    };
    let point = |backend: &'static str, setup_ms: f64| ScenarioPoint {
        backend,
        scenario: "setup",
        slots: n,
        area_bytes: u64::from(n) * 4096,
        setup_ms,
        iterations: 1,
        ..ScenarioPoint::default()
    };
    let mut out = Vec::new();

    let vm = Vm::new(Config::x86_64().with_address_spaces(1))?;
    let t = Instant::now();
    for i in 0..n {
        vm.set_user_memory_region(&region(i))?;
    }
    out.push(point("library", ns(t.elapsed()) / 1e6));
    drop(vm);

    // Unrestricted: no vCPU can be created on it (the slots map `mapping` anyway).
    let kvm_vm = memslots_kvm::new_kvm_vm().context("creating a KVM VM")?;
    let t = Instant::now();
    for i in 0..n {
        kvm_vm.set_user_memory_region(&region(i))?;
    }
    out.push(point("library+kvm", ns(t.elapsed()) / 1e6));
    drop(kvm_vm);

    let raw = kvm_ioctls::Kvm::new()?.create_vm()?;
    let t = Instant::now();
    for i in 0..n {
        let r = region(i);
        let kr = kvm_userspace_memory_region {
            slot: r.slot,
            flags: 0,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
        };
        // SAFETY: a page of `mapping`, which outlives this VM; the VM never
        // gets a vCPU, so the kernel never accesses it anyway.
        unsafe { raw.set_user_memory_region(kr) }.context("KVM_SET_USER_MEMORY_REGION")?;
    }
    out.push(point("kvm-ioctl", ns(t.elapsed()) / 1e6));
    drop(raw);
    Ok(out)
}
