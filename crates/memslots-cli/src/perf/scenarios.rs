//! The kernel's `memslot_perf_test` scenarios over the library.
//!
//! A memory area (a real anonymous mapping) is split over `n` slots of equal
//! size (the last slot takes the remainder) at guest physical 4 GiB. vCPU
//! threads translate every access through their own `Vcpu` handle (cached
//! per-vCPU lookup) and touch host memory (an atomic store or load of one word
//! per page); a translation that finds no slot counts as a miss (an MMIO exit
//! on KVM). The host thread works through the VM (`gfn_to_hva_many`, updates).
//!
//! - `map`: vCPUs write every page of one half while the host unmaps the other
//!   half (`madvise(MADV_DONTNEED)` of each slot's part, found through the
//!   library), then the halves swap. One iteration = both phases.
//! - `unmap` / `unmap-chunked`: as `map`, but the host unmaps page by page /
//!   2 MiB at a time (each chunk translated through the library).
//! - `move-active` / `move-inactive`: the host moves the last slot away (past
//!   the area) and back while the vCPUs keep touching that slot / the first
//!   slot (not run with one slot). One iteration = away + back.
//! - `rw`: vCPUs write a value to every page; the host verifies each and
//!   writes another word; the vCPUs verify that. One iteration = all three.
//!
//! `move-active` and `move-inactive` also run on the real-KVM guest's layout
//! (193 one-page slots) for a like-for-like row next to the KVM rows.
//!
//! Each scenario runs iterations until its time budget is spent (at least
//! three). `setup_ms` is the time to create the `n` slots on a fresh VM.

use super::{ns, Progress, ScenarioPoint, Stat};
use anyhow::{bail, Result};
use memslots::{Config, UserMemoryRegion, Vm};
use memslots_kvm::guest::Mapping;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// Names of the scenarios, in run order.
pub(crate) const SCENARIOS: [&str; 6] = ["map", "unmap", "unmap-chunked", "move-active", "move-inactive", "rw"];

/// Area, slot counts and budget.
pub(crate) struct ScenarioPlan {
    /// Bytes of the memory area.
    pub area: u64,
    /// Slot counts.
    pub sizes: Vec<u32>,
    /// vCPU threads.
    pub vcpus: u32,
    /// Time budget per (scenario, slot count).
    pub budget: Duration,
}

const PAGE: u64 = 4096;
const GPA_BASE: u64 = 0x1_0000_0000;
const CHUNK_PAGES: u64 = 512;
/// Iterations run even past the budget, so a median means something.
const MIN_ITERATIONS: usize = 3;
/// Slots of the real-KVM guest (`memslots_kvm::guest`): boot slot + data slots.
const GUEST_LAYOUT_SLOTS: u32 = memslots_kvm::guest::DATA_SLOTS + 1;

/// Slot layout: slot `k` covers area pages `[first[k], first[k] + pages[k])`.
struct Layout {
    hva: u64,
    npages: u64,
    slots: Vec<(u64, u64)>,
}

impl Layout {
    fn new(hva: u64, area: u64, n: u32) -> Layout {
        let npages = area / PAGE;
        let per = npages / u64::from(n);
        let slots = (0..u64::from(n))
            .map(|k| {
                let pages = if k + 1 == u64::from(n) { npages - per * k } else { per };
                (per * k, pages)
            })
            .collect();
        Layout { hva, npages, slots }
    }

    fn region(&self, k: usize, gpa_shift: u64) -> UserMemoryRegion {
        let (first, pages) = self.slots[k];
        let id = u32::try_from(k).unwrap_or(u32::MAX);
        UserMemoryRegion::new(id, 0, GPA_BASE + first * PAGE + gpa_shift, pages * PAGE, self.hva + first * PAGE)
    }

    fn gfn(&self, page: u64) -> u64 {
        (GPA_BASE >> 12) + page
    }
}

/// What the vCPU threads do in one phase (page ranges are area pages).
#[derive(Clone, Copy, Debug)]
enum Job {
    /// Store `val` to word `word` of each page, split among the vCPUs.
    Write { lo: u64, hi: u64, word: u64, val: u64 },
    /// Load word `word` of each page and count those not equal to `val`.
    Verify { lo: u64, hi: u64, word: u64, val: u64 },
    /// Every vCPU stores to each page of the range, round and round, until the phase ends.
    Spin { lo: u64, hi: u64 },
    /// Leave.
    Exit,
}

struct Shared {
    job: Mutex<Job>,
    start: Barrier,
    done: Barrier,
    stop: AtomicBool,
    accesses: AtomicU64,
    misses: AtomicU64,
    bad: AtomicU64,
}

impl Shared {
    /// Runs one phase: the vCPUs do `job` while the host runs `host`.
    fn phase<R>(&self, job: Job, host: impl FnOnce() -> R) -> R {
        *self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = job;
        self.start.wait();
        let r = host();
        self.stop.store(true, Ordering::Release);
        self.done.wait();
        self.stop.store(false, Ordering::Release);
        r
    }
}

/// The word at `hva + 8 * word` as an atomic.
///
/// # Safety
/// `hva` must be a page of the scenario's mapping, alive while the reference is.
unsafe fn word<'a>(hva: u64, word: u64) -> &'a AtomicU64 {
    // SAFETY: per the contract the page is mapped, 8-byte aligned and
    // readable/writable; all accesses to it go through atomics.
    unsafe { &*((hva + word * 8) as *const AtomicU64) }
}

fn vcpu_thread(vm: &Vm, layout: &Layout, sh: &Shared, index: u64, count: u64) {
    let vcpu = vm.vcpu();
    loop {
        sh.start.wait();
        let job = *sh.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut acc, mut miss, mut bad) = (0u64, 0u64, 0u64);
        let share = |lo: u64, hi: u64| {
            let len = hi - lo;
            (lo + len * index / count, lo + len * (index + 1) / count)
        };
        match job {
            Job::Exit => {
                sh.done.wait();
                return;
            }
            Job::Write { lo, hi, word: w, val } | Job::Verify { lo, hi, word: w, val } => {
                let write = matches!(job, Job::Write { .. });
                let (lo, hi) = share(lo, hi);
                for p in lo..hi {
                    match vcpu.gfn_to_hva(layout.gfn(p)) {
                        Ok(hva) => {
                            acc += 1;
                            // SAFETY: every slot maps a page of the area mapping,
                            // which outlives the vCPU threads (scoped); moved
                            // slots keep their host range.
                            let a = unsafe { word(hva, w) };
                            if write {
                                a.store(val ^ p, Ordering::Relaxed);
                            } else if a.load(Ordering::Relaxed) != val ^ p {
                                bad += 1;
                            }
                        }
                        Err(_) => miss += 1,
                    }
                }
            }
            Job::Spin { lo, hi } => {
                let mut p = lo;
                while !sh.stop.load(Ordering::Relaxed) {
                    match vcpu.gfn_to_hva(layout.gfn(p)) {
                        Ok(hva) => {
                            acc += 1;
                            // SAFETY: as above.
                            unsafe { word(hva, 0) }.store(p, Ordering::Relaxed);
                        }
                        Err(_) => miss += 1,
                    }
                    p += 1;
                    if p == hi {
                        p = lo;
                    }
                }
            }
        }
        sh.accesses.fetch_add(acc, Ordering::Relaxed);
        sh.misses.fetch_add(miss, Ordering::Relaxed);
        sh.bad.fetch_add(bad, Ordering::Relaxed);
        sh.done.wait();
    }
}

/// Unmaps area pages `[lo, hi)` from the host in chunks of at most `chunk`
/// pages, each split at slot ends (the kernel test's `test_memslot_do_unmap`).
fn unmap(vm: &Vm, layout: &Layout, lo: u64, hi: u64, chunk: u64) -> Result<()> {
    let mut p = lo;
    while p < hi {
        let end = (p + chunk).min(hi);
        while p < end {
            let (hva, left) = vm.read().gfn_to_hva_many(0, layout.gfn(p), true)?;
            let pages = left.min(end - p);
            let len = usize::try_from(pages * PAGE)?;
            // SAFETY: the range is inside the area mapping (a slot's host
            // range); MADV_DONTNEED on private anonymous memory only drops its
            // pages (they read back as zero), which the scenario expects.
            let r = unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTNEED) };
            if r != 0 {
                bail!("madvise: {}", std::io::Error::last_os_error());
            }
            p += pages;
        }
    }
    Ok(())
}

/// Runs every scenario for every slot count.
pub(crate) fn run(plan: &ScenarioPlan, progress: &Progress, out: &mut Vec<ScenarioPoint>) -> Result<()> {
    let area_len = usize::try_from(plan.area)?;
    let mapping = Mapping::new(area_len)?;
    for &n in &plan.sizes {
        let layout = Layout::new(mapping.hva(), plan.area, n);
        if u64::from(n) > layout.npages {
            bail!("{n} slots do not fit a {} MiB area", plan.area >> 20);
        }
        for name in SCENARIOS {
            progress.start(format!("library {name}: {n} slots"));
            if name == "move-inactive" && n < 2 {
                progress.done();
                continue;
            }
            out.push(run_one(plan, plan.area, &layout, name, n)?);
            progress.done();
        }
    }
    // The real-KVM guest's layout (its 192 data slots + the boot slot, one
    // page each here), for a like-for-like row next to the KVM moves.
    progress.start("library moves on the guest layout".into());
    let n = GUEST_LAYOUT_SLOTS;
    let area = u64::from(n) * PAGE;
    let layout = Layout::new(mapping.hva(), area, n);
    for name in ["move-active", "move-inactive"] {
        out.push(run_one(plan, area, &layout, name, n)?);
    }
    progress.done();
    Ok(())
}

fn run_one(plan: &ScenarioPlan, area: u64, layout: &Layout, name: &'static str, n: u32) -> Result<ScenarioPoint> {
    let vm = Vm::new(Config::x86_64().with_address_spaces(1))?;
    let t = Instant::now();
    for k in 0..layout.slots.len() {
        vm.set_user_memory_region(&layout.region(k, 0))?;
    }
    let setup_ms = ns(t.elapsed()) / 1e6;
    let sh = Shared {
        job: Mutex::new(Job::Exit),
        start: Barrier::new(usize::try_from(plan.vcpus)? + 1),
        done: Barrier::new(usize::try_from(plan.vcpus)? + 1),
        stop: AtomicBool::new(false),
        accesses: AtomicU64::new(0),
        misses: AtomicU64::new(0),
        bad: AtomicU64::new(0),
    };
    let np = layout.npages;
    let half = np / 2;
    let last = layout.slots.len() - 1;
    let (last_lo, last_pages) = layout.slots[last];
    let (first_lo, first_pages) = layout.slots[0];
    let mut samples: Vec<f64> = Vec::new();
    let result: Result<()> = std::thread::scope(|s| {
        for i in 0..plan.vcpus {
            let (vm, sh) = (&vm, &sh);
            s.spawn(move || vcpu_thread(vm, layout, sh, u64::from(i), u64::from(plan.vcpus)));
        }
        let began = Instant::now();
        let mut round = 0u64;
        let r = (|| -> Result<()> {
            match name {
                "map" | "unmap" | "unmap-chunked" => {
                    let chunk = match name {
                        "map" => np,
                        "unmap" => 1,
                        _ => CHUNK_PAGES,
                    };
                    while samples.len() < MIN_ITERATIONS || began.elapsed() < plan.budget {
                        round += 1;
                        let t = Instant::now();
                        let w = |lo, hi| Job::Write { lo, hi, word: 0, val: round };
                        sh.phase(w(0, half), || unmap(&vm, layout, half, np, chunk))?;
                        sh.phase(w(half, np), || unmap(&vm, layout, 0, half, chunk))?;
                        samples.push(ns(t.elapsed()) / 1e3);
                    }
                }
                "move-active" | "move-inactive" => {
                    let (lo, hi) = if name == "move-active" {
                        (last_lo, last_lo + last_pages)
                    } else {
                        (first_lo, first_lo + first_pages)
                    };
                    let away = layout.region(last, area);
                    let back = layout.region(last, 0);
                    sh.phase(Job::Spin { lo, hi }, || -> Result<()> {
                        while samples.len() < MIN_ITERATIONS || began.elapsed() < plan.budget {
                            let t = Instant::now();
                            vm.set_user_memory_region(&away)?;
                            vm.set_user_memory_region(&back)?;
                            samples.push(ns(t.elapsed()) / 1e3);
                        }
                        Ok(())
                    })?;
                }
                _ => {
                    while samples.len() < MIN_ITERATIONS || began.elapsed() < plan.budget {
                        round += 1;
                        let t = Instant::now();
                        let val = round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        sh.phase(Job::Write { lo: 0, hi: np, word: 0, val }, || ());
                        let mut bad = 0u64;
                        for p in 0..np {
                            let hva = vm.gfn_to_hva(0, layout.gfn(p))?;
                            // SAFETY: a page of the area mapping, alive for the scenario.
                            let (w0, w1) = unsafe { (word(hva, 0), word(hva, 1)) };
                            if w0.load(Ordering::Relaxed) != val ^ p {
                                bad += 1;
                            }
                            w1.store(!val ^ p, Ordering::Relaxed);
                        }
                        sh.bad.fetch_add(bad, Ordering::Relaxed);
                        sh.phase(Job::Verify { lo: 0, hi: np, word: 1, val: !val }, || ());
                        samples.push(ns(t.elapsed()) / 1e3);
                    }
                }
            }
            Ok(())
        })();
        sh.phase(Job::Exit, || ());
        r
    });
    result?;
    let bad = sh.bad.load(Ordering::Relaxed);
    if bad != 0 {
        bail!("{name} with {n} slots: {bad} page(s) held the wrong value");
    }
    let iterations = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mean = samples.iter().sum::<f64>() / f64::from(iterations.max(1));
    let stat = Stat::of(samples);
    Ok(ScenarioPoint {
        backend: "library",
        scenario: name,
        slots: n,
        area_bytes: area,
        vcpus: plan.vcpus,
        setup_ms,
        iterations,
        iter_median_us: stat.median,
        iter_mean_us: mean,
        iter_min_us: stat.min,
        iter_max_us: stat.max,
        vcpu_accesses: sh.accesses.load(Ordering::Relaxed),
        vcpu_misses: sh.misses.load(Ordering::Relaxed),
    })
}
