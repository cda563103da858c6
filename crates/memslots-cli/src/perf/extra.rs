//! The other issues' targets, measured in the same run against their peers:
//! dirty logging (vs vm-memory's `AtomicBitmap`), guest-memory access (vs
//! vm-memory's `GuestMemoryMmap` and plain `memcpy`), and the KVM backend's
//! overhead over the raw `KVM_SET_USER_MEMORY_REGION` ioctl.

use super::{median, Stat, Target};
use anyhow::{anyhow, Result};
use memslots::{Config, UserMemoryRegion, Vm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES};
use memslots_bench::kvm::{Kvm, RawVm};
use memslots_bench::layout::{gpa_of, hva_of, random_below, random_gpas, HVA_BASE as HVA, SLOT_BYTES, STRIDE};
use memslots_bench::timing;
use memslots_mem::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use memslots_mem::{GuestMemory, MapOptions};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Instant;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};

/// Sizes of one run.
pub(crate) struct ExtraPlan {
    /// Pages of the harvested slot (2^24 = 64 GiB).
    pub(crate) harvest_pages: u64,
    /// Slots of the guest-memory access benchmark.
    pub(crate) mem_slots: u64,
    /// Slot counts of the backend comparison.
    pub(crate) backend_sizes: Vec<u32>,
    /// Batches each median is taken over.
    pub(crate) batches: usize,
}

const PAGE: u64 = 4096;

fn any<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

fn usz(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Median over `batches` of the time per operation of `ops` calls of `f(i)`.
fn per_op(batches: usize, ops: u64, f: impl FnMut(usize)) -> f64 {
    timing::per_op(batches, ops, f).median
}

/// Median over `batches` of the time of `timed()` after an untimed `setup()`.
fn per_call(batches: usize, setup: impl FnMut(), timed: impl FnMut()) -> f64 {
    timing::per_call(batches, setup, timed).median
}

fn target(name: String, slots: u32, goal_ns: f64, memslots: f64, peers: &[(&'static str, f64)]) -> Target {
    Target {
        name,
        slots,
        goal_ns,
        memslots_ns: Some(memslots),
        met: Some(memslots <= goal_ns),
        peers: peers.iter().copied().collect::<BTreeMap<_, _>>(),
        peer_ranges: BTreeMap::new(),
    }
}

/// Measures every extra target; `kvm` says whether the backend part can run.
pub(crate) fn run(plan: &ExtraPlan, kvm: bool, out: &mut Vec<Target>) -> Result<()> {
    dirty(plan, out)?;
    guest_memory(plan, out)?;
    if kvm {
        backend(plan, out)?;
    }
    Ok(())
}

fn logging_vm(pages: u64) -> Result<Vm> {
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).map_err(any)?;
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, pages * PAGE, HVA)).map_err(any)?;
    Ok(vm)
}

fn dirty(plan: &ExtraPlan, out: &mut Vec<Target>) -> Result<()> {
    // Marking: a 1 GiB slot, random pages, through a vCPU's held section.
    let pages = 1u64 << 18;
    let idx = random_below(1 << 16, pages, 7);
    let vm = logging_vm(pages)?;
    let vcpu = vm.vcpu();
    let mark = {
        let g = vcpu.read();
        per_op(plan.batches, 200_000, |i| {
            let _ = black_box(g.mark_page_dirty(idx[i & 0xffff]));
        })
    };
    let bitmap = AtomicBitmap::new(usz(pages * PAGE), NonZeroUsize::MIN.saturating_add(4095));
    let vmm_mark = per_op(plan.batches, 200_000, |i| bitmap.mark_dirty(usz(idx[i & 0xffff] * PAGE), 1));
    out.push(target("mark_page_dirty (vCPU, held section)".into(), 1, 5.0, mark, &[("vm-memory", vmm_mark)]));
    drop(vcpu);

    // Ring push: batches below the soft limit, harvested and reset untimed.
    let vm = Vm::new(Config::x86_64().with_address_spaces(1)).map_err(any)?;
    vm.enable_dirty_log_ring(65536 * 16).map_err(any)?;
    vm.set_user_memory_region(&UserMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, pages * PAGE, HVA)).map_err(any)?;
    let vcpu = vm.vcpu();
    let mut pushes = Vec::new();
    for _ in 0..plan.batches {
        let g = vcpu.read();
        let t = Instant::now();
        for (i, &p) in idx.iter().enumerate().take(60_000) {
            let _ = black_box(g.mark_page_dirty(p ^ u64::try_from(i & 1).unwrap_or(0)));
        }
        pushes.push(t.elapsed().as_secs_f64() * 1e9 / 60_000.0);
        drop(g);
        vm.harvest_dirty_rings(|_, e| {
            black_box(e);
        });
        let _ = vm.reset_dirty_rings();
    }
    out.push(target("dirty ring push".into(), 1, 10.0, median(pushes), &[]));
    drop(vcpu);

    // Harvesting a large slot (64 GiB in quick/full mode): 1% and none dirty.
    let hp = plan.harvest_pages;
    let gib = (hp * PAGE) >> 30;
    let dirty = random_below(usz(hp / 100), hp, 11);
    let vm = logging_vm(hp)?;
    let vcpu = vm.vcpu();
    let mut buf = vec![0u64; usz(hp / 64)];
    let mark_all = || {
        let g = vcpu.read();
        for &p in &dirty {
            let _ = black_box(g.mark_page_dirty(p));
        }
    };
    let batches = plan.batches.min(9);
    let get1 = per_call(batches, mark_all, || {
        vm.get_dirty_log(0, &mut buf).ok();
    });
    let get0 = per_call(
        batches,
        || {},
        || {
            vm.get_dirty_log(0, &mut buf).ok();
        },
    );
    let cb0 = per_call(
        batches,
        || {},
        || {
            vm.harvest_dirty_log(0, |_, b| {
                black_box(b);
            })
            .ok();
        },
    );
    let vbits = AtomicBitmap::new(usz(hp * PAGE), NonZeroUsize::MIN.saturating_add(4095));
    let vmm1 = per_call(
        batches,
        || dirty.iter().for_each(|&p| vbits.mark_dirty(usz(p * PAGE), 1)),
        || {
            black_box(vbits.get_and_reset());
        },
    );
    let vmm0 = per_call(
        batches,
        || {},
        || {
            black_box(vbits.get_and_reset());
        },
    );
    out.push(target(
        format!("harvest {gib} GiB slot, 1% dirty (get_dirty_log: take+clear)"),
        1,
        300_000.0,
        get1,
        &[("vm-memory", vmm1)],
    ));
    // Manual protect (what QEMU-style migration uses): GET copies, CLEAR
    // clears exactly what GET returned.
    drop(vcpu);
    let vm = logging_vm(hp)?;
    vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).map_err(any)?;
    let vcpu = vm.vcpu();
    let mark_all = || {
        let g = vcpu.read();
        for &p in &dirty {
            let _ = black_box(g.mark_page_dirty(p));
        }
    };
    let pages = u32::try_from(hp)?;
    let manual1 = per_call(batches, mark_all, || {
        vm.get_dirty_log(0, &mut buf).ok();
        vm.clear_dirty_log(0, 0, pages, &buf).ok();
    });
    out.push(target(
        format!("harvest {gib} GiB slot, 1% dirty (manual protect: GET + CLEAR)"),
        1,
        300_000.0,
        manual1,
        &[("vm-memory", vmm1)],
    ));
    out.push(target(
        format!("harvest {gib} GiB slot, none dirty (harvest_dirty_log)"),
        1,
        20_000.0,
        cb0,
        &[("vm-memory", vmm0), ("memslots get_dirty_log", get0)],
    ));
    Ok(())
}

fn guest_memory(plan: &ExtraPlan, out: &mut Vec<Target>) -> Result<()> {
    // 16 KiB slots at the layout's 2 MiB stride.
    const SLOT_BYTES: u64 = 0x4000;
    let n = plan.mem_slots;
    let mem = GuestMemory::new(Config::default()).map_err(any)?;
    let ram = mem.map_anonymous(n * SLOT_BYTES, &MapOptions::new().no_reserve(true)).map_err(any)?;
    for i in 0..n {
        mem.set_region(u32::try_from(i)?, 0, i * STRIDE, &ram, i * SLOT_BYTES, SLOT_BYTES).map_err(any)?;
    }
    let ranges: Vec<(GuestAddress, usize)> = (0..n).map(|i| (GuestAddress(i * STRIDE), usz(SLOT_BYTES))).collect();
    let gm = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(any)?;
    let gpas = random_gpas(n, SLOT_BYTES, 3);
    for &g in &gpas {
        let _: u64 = mem.read_obj(0, g).map_err(any)?;
        let _: u64 = gm.read_obj(GuestAddress(g)).map_err(any)?;
    }
    // Alternate batches of the two so both see the same machine state.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    {
        let s = mem.section();
        for _ in 0..plan.batches {
            ours.push(per_op(1, 200_000, |i| {
                black_box(s.read_obj::<u64>(0, gpas[i & 0xffff]).ok());
            }));
            theirs.push(per_op(1, 200_000, |i| {
                black_box(gm.read_obj::<u64>(GuestAddress(gpas[i & 0xffff])).ok());
            }));
        }
    }
    let (ours, theirs) = (median(ours), median(theirs));
    let slots = u32::try_from(n)?;
    out.push(target(
        format!("8-byte read_obj, random gpa, {n} slots (>= 2x vm-memory)"),
        slots,
        theirs / 2.0,
        ours,
        &[("vm-memory", theirs)],
    ));

    const COPY: usize = 64 * 1024;
    let mem = GuestMemory::new(Config::default()).map_err(any)?;
    let ram = mem.map_anonymous(2 * COPY as u64, &MapOptions::new().populate(true)).map_err(any)?;
    ram.fill(0, ram.len(), 0x5a).ok_or_else(|| anyhow!("fill failed"))?;
    mem.set_region(0, 0, 0x10_0000, &ram, 0, 2 * COPY as u64).map_err(any)?;
    let mut buf = vec![0u8; COPY];
    let ours = per_op(plan.batches, 2_000, |_| {
        mem.read(0, 0x10_0800, &mut buf).ok();
        black_box(&buf);
    });
    let src = ram.as_ptr();
    let memcpy = per_op(plan.batches, 2_000, |_| {
        // SAFETY: `src + 0x800 .. + COPY` lies inside the 128 KiB mapping,
        // alive while `ram` is held; `buf` is a distinct allocation of COPY bytes.
        unsafe { std::ptr::copy_nonoverlapping(black_box(src).add(0x800), buf.as_mut_ptr(), COPY) };
        black_box(&buf);
    });
    out.push(target(
        "64 KiB copy from guest memory (>= 80% of memcpy)".into(),
        1,
        memcpy / 0.8,
        ours,
        &[("memcpy", memcpy)],
    ));
    Ok(())
}

fn backend(plan: &ExtraPlan, out: &mut Vec<Target>) -> Result<()> {
    let kvm = Kvm::new().map_err(any)?;
    for &n in &plan.backend_sizes {
        let k = n / 2;
        let away = gpa_of(n + 1);
        let raw = RawVm::new(&kvm).map_err(|e| anyhow!(e))?;
        for i in 0..n {
            raw.set(i, 0, gpa_of(i), SLOT_BYTES).map_err(|e| anyhow!(e))?;
        }
        // Unrestricted: no vCPU can be created, so the fake host ranges are harmless.
        let vm = memslots_kvm::new_kvm_vm()?;
        for i in 0..n {
            vm.set_user_memory_region(&UserMemoryRegion::new(i, 0, gpa_of(i), SLOT_BYTES, hva_of(i))).map_err(any)?;
        }
        let hva = hva_of(k);
        // Interleave the two per operation: each round moves the slot (away
        // or back) once on each side, and which side goes first alternates
        // every two rounds (so each side goes first equally often in each
        // direction). Both see the same moment of the (nested, drifting)
        // kernel and the same cache state left by an ioctl. Medians over the
        // rounds.
        let rounds = plan.batches.max(5) * 120;
        let (mut ioctl, mut lib) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        let timed = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e9
        };
        for r in 0..rounds {
            let to = if r % 2 == 0 { away } else { gpa_of(k) };
            let mut raw_move = || {
                raw.set(k, 0, to, SLOT_BYTES).ok();
            };
            let mut lib_move = || {
                vm.set_user_memory_region(&UserMemoryRegion::new(k, 0, to, SLOT_BYTES, hva)).ok();
            };
            if (r / 2) % 2 == 0 {
                ioctl.push(timed(&mut raw_move));
                lib.push(timed(&mut lib_move));
            } else {
                lib.push(timed(&mut lib_move));
                ioctl.push(timed(&mut raw_move));
            }
        }
        let (ioctl, lib) = (Stat::of(ioctl), median(lib));
        let mut t = target(
            format!("move via library+KVM, {n} slots (<= 5% over the ioctl)"),
            n,
            ioctl.median * 1.05,
            lib,
            &[("kvm", ioctl.median)],
        );
        t.peer_ranges.insert("kvm", [ioctl.min, ioctl.max]);
        out.push(t);
    }
    Ok(())
}
