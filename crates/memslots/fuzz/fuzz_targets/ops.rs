//! Fuzzes operation sequences against the reference model of
//! `crates/memslots/tests/common/model.rs` (the one `tests/model.rs` drives
//! with proptest): `set_user_memory_region` (create, delete, move, flag
//! changes and invalid requests, with prepare failures injected through the
//! recording hooks so rollback is fuzzed), dirty logging (manual protect,
//! GET into buffers of any length, harvest, CLEAR with arbitrary masks,
//! marks through the VM, a slot, a guard and vCPUs), lookups (gfn, id,
//! approximate, hva, gfn-range and hva-range iteration, invalidation) and
//! vCPU handles (created, dropped, moved between address spaces).
//!
//! After every operation its verdict (errno and error kind) or result is
//! compared with the model, as are the counters, every bitmap bit, the
//! lookups of every vCPU handle and of the VM at the gfns the operation
//! touched; every few operations and at the end, every lookup over dense
//! probes (`check_all`).
//!
//! Input: one header byte (address spaces, hooks), then at most 64
//! operations. Values come mostly from small pools (ids 0..6, 16 gpas two
//! pages apart, 1..6 pages, 8 hvas two pages apart) so operations interact,
//! with the odd extreme value (wraps, limits, the max gfn, `u64::MAX`).
//!
//! Run: `cd crates/memslots/fuzz && cargo +nightly fuzz run ops`.

#![no_main]
// The shared model file holds items only the proptest driver uses.
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;
use memslots::DirtyMark;

include!("../../tests/common/model.rs");

/// Most operations per input.
const MAX_OPS: usize = 64;
/// Run the full comparison every this many operations (and after the last).
const FULL_EVERY: usize = 8;
/// Most extra vCPU handles alive at once.
const MAX_VCPUS: usize = 4;

/// Bytes of the input, read front to back; zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | u16::from(self.byte()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::from(self.byte()) % items.len()]
    }
}

fn profile(nr: u16, inject: bool) -> Profile {
    Profile {
        cfg: Config::x86_64().with_address_spaces(nr).with_user_slots(16),
        ids: 6,
        gpa_slots: 16,
        gpa_step: 0x2000,
        max_pages: 6,
        hva_slots: 8,
        dense: 12,
        fresh: 1,
        reuse: 1,
        full_every: 1,
        inject: if inject { 3 } else { 0 },
    }
}

fn as_id(u: &mut Input, p: &Profile) -> u16 {
    let nr = p.cfg.nr_address_spaces;
    match u.byte() % 16 {
        0 => nr,
        1 => nr + 1,
        2 => u.u16(),
        b => u16::from(b) % nr,
    }
}

fn id(u: &mut Input, p: &Profile) -> u16 {
    let us = p.cfg.user_slots;
    match u.byte() % 24 {
        0 => us - 1,
        1 => us,
        2 => us + 2,
        3 => 0xffff,
        4 => u.u16(),
        b => u16::from(b) % p.ids,
    }
}

fn slot(u: &mut Input, p: &Profile) -> u32 {
    let a = as_id(u, p);
    (u32::from(a) << 16) | u32::from(id(u, p))
}

fn flags(u: &mut Input) -> u32 {
    match u.byte() % 16 {
        0 => 4,
        1 => 1 << 16,
        2 => u.u32(),
        b => [0, LOG, RO, LOG | RO][usize::from(b % 4)],
    }
}

fn dense_gpa(u: &mut Input, p: &Profile) -> u64 {
    u64::from(u.byte()) % p.gpa_slots * p.gpa_step
}

fn gpa(u: &mut Input, p: &Profile) -> u64 {
    let top = (p.max_gfn() + 1) * PAGE;
    match u.byte() % 32 {
        0 | 1 => dense_gpa(u, p) + u.pick(&[1, 0x800, 0xfff]),
        2 | 3 => u.pick(&[u64::MAX, ALIGNED_MAX, ALIGNED_MAX - 0x3000, 1 << 63, (1 << 63) + 0x1000]),
        4 | 5 => top - (1 + u64::from(u.byte() % 7)) * PAGE,
        6 => u.pick(&[top, top + PAGE, top * 2]),
        7 => u.u64(),
        _ => dense_gpa(u, p),
    }
}

fn size(u: &mut Input, p: &Profile) -> u64 {
    match u.byte() % 32 {
        0..=3 => 0,
        4 | 5 => u64::from(u.byte()) % (p.max_pages + 1) * PAGE + u.pick(&[1, 0x800, 0xfff]),
        6 => u.pick(&[((1 << 31) - 1) * PAGE, (1 << 31) * PAGE]),
        7 => u.pick(&[ALIGNED_MAX, 1 << 63, 1 << 47]),
        8 => u.u64(),
        _ => (1 + u64::from(u.byte()) % p.max_pages) * PAGE,
    }
}

fn hva(u: &mut Input, p: &Profile) -> u64 {
    let limit = p.cfg.user_addr_limit;
    let dense = |u: &mut Input| HVA_BASE + u64::from(u.byte()) % p.hva_slots * HVA_STEP;
    match u.byte() % 32 {
        0 => 0,
        1 | 2 => dense(u) + u.pick(&[1, 0x10, 0x800]),
        3 | 4 => limit - u64::from(u.byte() % 8) * PAGE,
        5 => u.pick(&[limit + PAGE, 1 << 47, 1 << 63, ALIGNED_MAX]),
        6 => u.u64(),
        _ => dense(u),
    }
}

fn region_request(u: &mut Input, p: &Profile) -> Step {
    let op = if u.byte().is_multiple_of(2) {
        Op::Fresh(UserMemoryRegion::new(slot(u, p), flags(u), gpa(u, p), size(u, p), hva(u, p)))
    } else {
        let pick = usize::from(u.byte());
        let b = u.byte();
        let slot = if b & 7 == 0 { Some(slot(u, p)) } else { None };
        let gpa = match (b >> 3) & 7 {
            0..=3 => None,
            4..=6 => Some(dense_gpa(u, p)),
            _ => Some(gpa(u, p)),
        };
        let b = u.byte();
        let flags = match b % 20 {
            0..=3 => FlagsMod::Toggle(LOG),
            4 => FlagsMod::Toggle(RO),
            5 => FlagsMod::Toggle(LOG | RO),
            6 | 7 => FlagsMod::Set(flags(u)),
            _ => FlagsMod::Same,
        };
        let size = match (b / 20) % 10 {
            0..=1 => Some(0),
            2 => Some(size(u, p)),
            _ => None,
        };
        let hva = if u.byte().is_multiple_of(10) { Some(hva(u, p)) } else { None };
        Op::Reuse { pick, slot, gpa, flags, size, hva }
    };
    let inject = if p.inject > 0 && u.byte().is_multiple_of(6) {
        Some(u.pick(&[Errno::ENOMEM, Errno::EIO, Errno::EFAULT]))
    } else {
        None
    };
    Step { op, inject }
}

/// A slot field for a dirty-log operation: mostly an existing slot.
fn dirty_slot(u: &mut Input, p: &Profile, model: &Model) -> u32 {
    let all: Vec<MSlot> = model.all().copied().collect();
    if !all.is_empty() && !u.byte().is_multiple_of(4) {
        all[usize::from(u.byte()) % all.len()].raw()
    } else {
        slot(u, p)
    }
}

/// A gfn near a slot boundary, in the dense range, or extreme.
fn gfn(u: &mut Input, p: &Profile, model: &Model) -> u64 {
    let all: Vec<MSlot> = model.all().copied().collect();
    match u.byte() % 8 {
        0..=3 if !all.is_empty() => {
            let s = all[usize::from(u.byte()) % all.len()];
            match u.byte() % 5 {
                0 => s.base_gfn.wrapping_sub(1),
                1 => s.base_gfn,
                2 => s.last_gfn(),
                3 => s.last_gfn().wrapping_add(1),
                _ => s.base_gfn + u64::from(u.byte()) % s.npages,
            }
        }
        4 => {
            let mg = p.max_gfn();
            match u.byte() % 8 {
                7 => u.u64(),
                b => [mg - 1, mg, mg + 1, 1 << 36, 1 << 51, u64::MAX - 1, u64::MAX][usize::from(b)],
            }
        }
        _ => u64::from(u.byte()) % (p.gpa_slots * p.gpa_step / PAGE + p.max_pages + 2),
    }
}

/// An address space to look in: mostly one that exists.
fn probe_as(u: &mut Input, p: &Profile) -> u16 {
    let nr = p.cfg.nr_address_spaces;
    match u.byte() % 8 {
        0 => nr,
        1 => u16::MAX,
        b => u16::from(b) % nr,
    }
}

fn fail(what: String) -> TestCaseError {
    TestCaseError::fail(what)
}

/// Lookups in address space `a` at `gfn` (and ranges from it), and of slot `id`.
fn check_lookup_at<H: Harness>(
    vm: &Vm<H>,
    model: &Model,
    a: u16,
    gfn: u64,
    len: u64,
    id: u16,
    what: &str,
) -> Result<(), TestCaseError> {
    let g = vm.read();
    prop_assert_eq!(
        desc(g.gfn_to_memslot(a, gfn)),
        model.by_gfn(a, gfn),
        "{}: gfn_to_memslot({}, {:#x})",
        what,
        a,
        gfn
    );
    prop_assert_eq!(g.gfn_to_hva(a, gfn), model.hva(a, gfn), "{}: gfn_to_hva({}, {:#x})", what, a, gfn);
    prop_assert_eq!(g.gfn_to_hva_prot(a, gfn), model.hva_prot(a, gfn), "{}: gfn_to_hva_prot({}, {:#x})", what, a, gfn);
    for write in [false, true] {
        prop_assert_eq!(g.gfn_to_hva_many(a, gfn, write), model.hva_many(a, gfn, write), "{}: hva_many", what);
    }
    prop_assert_eq!(
        desc(g.gfn_to_memslot_approx(a, gfn)),
        model.approx(a, gfn),
        "{}: gfn_to_memslot_approx({}, {:#x})",
        what,
        a,
        gfn
    );
    let end = gfn.saturating_add(len);
    if end > gfn {
        let got: Vec<MSlot> = g.slots_in_gfn_range(a, gfn, end).map(|s| MSlot::of(s.desc())).collect();
        prop_assert_eq!(
            got,
            model.in_gfn_range(a, gfn, end),
            "{}: slots_in_gfn_range({}, {:#x}, {:#x})",
            what,
            a,
            gfn,
            end
        );
    }
    prop_assert_eq!(desc(g.id_to_memslot(a, id)), model.by_id(a, id), "{}: id_to_memslot({}, {})", what, a, id);
    drop(g);
    prop_assert_eq!(vm.gfn_to_slot_desc(a, gfn).map(|d| MSlot::of(&d)), model.by_gfn(a, gfn));
    prop_assert_eq!(vm.id_to_slot_desc(a, id).map(|d| MSlot::of(&d)), model.by_id(a, id));
    Ok(())
}

/// `slots_in_hva_range(start, last)` and `invalidate_hva_range(start, last + 1)`.
fn check_hva_range<H: Harness>(
    vm: &Vm<H>,
    model: &Model,
    start: u64,
    last: u64,
    what: &str,
) -> Result<(), TestCaseError> {
    let want = model.in_hva_range(start, last);
    {
        let g = vm.read();
        let got: Vec<MSlot> = g.slots_in_hva_range(start, last).map(|s| MSlot::of(s.desc())).collect();
        for w in got.windows(2) {
            prop_assert!((w[0].as_id, w[0].hva) <= (w[1].as_id, w[1].hva), "{}: hva range order {:x?}", what, got);
        }
        let mut per_as: Vec<Vec<MSlot>> = vec![Vec::new(); usize::from(model.nr())];
        for s in &got {
            per_as[usize::from(s.as_id)].push(*s);
        }
        per_as.iter_mut().for_each(|v| v.sort());
        prop_assert_eq!(&per_as, &want, "{}: slots_in_hva_range({:#x}, {:#x})", what, start, last);
    }
    if let Some(end) = last.checked_add(1) {
        let _ = vm.hooks().take_events();
        let hits: usize = want.iter().map(Vec::len).sum();
        prop_assert_eq!(vm.invalidate_hva_range(start, end), (hits, false), "{}: invalidate_hva_range", what);
        if let Some(events) = vm.hooks().take_events() {
            prop_assert_eq!(events.len(), hits, "{}: unmap calls of invalidate_hva_range", what);
        }
    }
    Ok(())
}

fn mark_eq(got: DirtyMark, want: bool, what: &str) -> Result<(), TestCaseError> {
    let want = if want { DirtyMark::Marked } else { DirtyMark::NotLogged };
    prop_assert_eq!(got, want, "{}", what);
    Ok(())
}

fn errno<T>(r: Result<T, Error>) -> Result<T, Errno> {
    r.map_err(|e| e.errno())
}

/// Applies the operations the input describes to a fresh VM and to the model.
fn run_input<H: Harness>(u: &mut Input, p: &Profile, hooks: H) -> Result<(), TestCaseError> {
    let vm = Vm::with_hooks(p.cfg, hooks).map_err(|e| fail(format!("Vm::with_hooks: {e}")))?;
    let mut model = Model::new(p.cfg);
    let mut history = History::default();
    let mut tags = Tags::new();
    let nr = p.cfg.nr_address_spaces;
    // One vCPU per address space (as `run`), a roaming one, and a pool.
    let vcpus = vcpu_per_address_space(&vm);
    let mut roaming = vm.vcpu();
    let mut pool: Vec<Vcpu<'_, H>> = Vec::new();
    let reader = vm.reader();
    let mut step = 0;
    while !u.is_empty() && step < MAX_OPS {
        step += 1;
        let what = format!("step {step}");
        match u.byte() % 16 {
            // KVM_SET_USER_MEMORY_REGION, as `run` does it.
            0..=6 => {
                let Step { op, inject } = region_request(u, p);
                let mut state = RunState { model: &mut model, history: &mut history, tags: &mut tags };
                region_step(&vm, &mut state, &vcpus, &pool, &mut roaming, step, &op, inject)?;
            }
            // KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2).
            7 => {
                let args = match u.byte() % 12 {
                    0 => u.u64(),
                    b => [0, 1, 1, 3, 3, 2, 4, 5, 7, 1 << 63, 0][usize::from(b - 1)],
                };
                let want = model.enable_manual(args);
                prop_assert_eq!(
                    errno(vm.enable_manual_dirty_log_protect(args)),
                    want,
                    "{}: enable_manual({})",
                    what,
                    args
                );
            }
            // KVM_GET_DIRTY_LOG: into a buffer, or harvested.
            8 => {
                let s = dirty_slot(u, p, &model);
                let b = u.byte();
                let need = model.dirty_slot(s, None).map_or(1, |(k, _)| model.bitmaps[&k].len());
                if b.is_multiple_of(4) {
                    let want = model.get_dirty_log(s, usize::MAX);
                    let mut got_words = BTreeMap::new();
                    let got = errno(vm.harvest_dirty_log(s, |w, bits| {
                        got_words.insert(w, bits);
                    }));
                    match want {
                        Ok(words) => {
                            let nonzero: BTreeMap<usize, u64> =
                                words.iter().copied().enumerate().filter(|(_, w)| *w != 0).collect();
                            let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                            prop_assert_eq!(got, Ok(pages), "{}: harvest_dirty_log({:#x})", what, s);
                            prop_assert_eq!(got_words, nonzero, "{}: harvest_dirty_log({:#x}) words", what, s);
                        }
                        Err(e) => prop_assert_eq!(got, Err(e), "{}: harvest_dirty_log({:#x})", what, s),
                    }
                } else if b % 4 == 1 {
                    let want = model.get_dirty_log(s, usize::MAX);
                    prop_assert_eq!(errno(vm.get_dirty_log_vec(s)), want, "{}: get_dirty_log_vec({:#x})", what, s);
                } else {
                    let len = match b % 4 {
                        2 => need,
                        _ => [0, need.saturating_sub(1), need + 1, need + 3][usize::from(b / 4 % 4)],
                    };
                    let canary = 0x5a5a_5a5a_5a5a_5a5a;
                    let mut out = vec![canary; len];
                    let want = model.get_dirty_log(s, len);
                    let got = errno(vm.get_dirty_log(s, &mut out));
                    match want {
                        Ok(words) => {
                            prop_assert_eq!(got, Ok(words.len()), "{}: get_dirty_log({:#x}, len {})", what, s, len);
                            prop_assert_eq!(&out[..words.len()], &words[..], "{}: get_dirty_log({:#x}) bits", what, s);
                            prop_assert!(out[words.len()..].iter().all(|&w| w == canary), "{}: wrote past", what);
                        }
                        Err(e) => {
                            prop_assert_eq!(got, Err(e), "{}: get_dirty_log({:#x}, len {})", what, s, len);
                            prop_assert!(out.iter().all(|&w| w == canary), "{}: failed GET wrote", what);
                        }
                    }
                }
            }
            // KVM_CLEAR_DIRTY_LOG.
            9 => {
                let s = dirty_slot(u, p, &model);
                let npages = model.dirty_slot(s, None).map_or(8, |(_, n)| n);
                let first_page = match u.byte() % 8 {
                    0 => 64,
                    1 => u64::from(u.byte()),
                    2 => u.pick(&[128, 1 << 32, !63]),
                    _ => 0,
                };
                let num_pages = match u.byte() % 8 {
                    0 => 64,
                    1 => 0,
                    2 => u32::from(u.byte()),
                    3 => u.pick(&[u32::MAX, 1 << 31]),
                    4 => u32::try_from(npages.saturating_sub(first_page)).unwrap_or(u32::MAX),
                    _ => u32::try_from(npages).unwrap_or(u32::MAX),
                };
                let need = usize::try_from(u64::from(num_pages).div_ceil(64)).unwrap();
                // A valid range is at most 4096 pages (no logging slot is
                // larger): 64 words are enough, and a short mask is EFAULT.
                let mlen = if u.byte().is_multiple_of(8) { need.saturating_sub(1) } else { need }.min(64);
                let mask: Vec<u64> = (0..mlen)
                    .map(|_| match u.byte() % 4 {
                        0 => 0,
                        1 => u64::MAX,
                        _ => u.u64(),
                    })
                    .collect();
                let want = model.clear_dirty_log(s, first_page, num_pages, &mask);
                let got = errno(vm.clear_dirty_log(s, first_page, num_pages, &mask));
                prop_assert_eq!(
                    got,
                    want,
                    "{}: clear_dirty_log({:#x}, {}, {}, {:x?})",
                    what,
                    s,
                    first_page,
                    num_pages,
                    mask
                );
            }
            // Marks.
            10 => {
                let b = u.byte();
                match b % 4 {
                    0 => {
                        let a = probe_as(u, p);
                        let g = gfn(u, p, &model);
                        let want = a < nr && model.mark_gfn(a, g);
                        mark_eq(vm.mark_page_dirty(a, g), want, &format!("{what}: mark_page_dirty({a}, {g:#x})"))?;
                    }
                    1 => {
                        let s = dirty_slot(u, p, &model);
                        let rel = match u.byte() % 4 {
                            0 => u.u64(),
                            b => u64::from(b) * 3 + u64::from(u.byte() % 4),
                        };
                        let sid = memslots::SlotId::from_raw(s);
                        let want = sid.as_id < nr && model.mark_rel(sid.as_id, sid.id, rel);
                        let got = vm.mark_page_dirty_in_slot(s, rel);
                        mark_eq(got, want, &format!("{what}: mark_page_dirty_in_slot({s:#x}, {rel})"))?;
                    }
                    2 => {
                        let g = gfn(u, p, &model);
                        let i = usize::from(u.byte());
                        let v = if pool.is_empty() || i % 2 == 0 {
                            &vcpus[i / 2 % vcpus.len()]
                        } else {
                            &pool[i / 2 % pool.len()]
                        };
                        let want = model.mark_gfn(v.address_space(), g);
                        mark_eq(v.mark_page_dirty(g), want, &format!("{what}: vcpu.mark_page_dirty({g:#x})"))?;
                    }
                    _ => {
                        let a = probe_as(u, p);
                        let g = gfn(u, p, &model);
                        let guard = vm.read();
                        if let Some(slot) = guard.gfn_to_memslot(a, g) {
                            let rel = g - slot.base_gfn;
                            let want = model.mark_rel(a, slot.id, rel);
                            let got = guard.mark_slot_page_dirty(slot, rel);
                            mark_eq(got, want, &format!("{what}: mark_slot_page_dirty({a}, {g:#x})"))?;
                        }
                    }
                }
            }
            // Lookups at one gfn.
            11 => {
                let a = probe_as(u, p);
                let g = gfn(u, p, &model);
                let len = u.pick(&[1, 2, 4, 64, 1 << 40, u64::MAX]);
                let i = id(u, p);
                check_lookup_at(&vm, &model, a, g, len, i, &what)?;
            }
            // Host address ranges.
            12 => {
                let all: Vec<MSlot> = model.all().copied().collect();
                let start = match u.byte() % 4 {
                    0 if !all.is_empty() => {
                        let s = all[usize::from(u.byte()) % all.len()];
                        s.hva + u64::from(u.byte() % 8) * 0x800
                    }
                    1 => u.u64(),
                    _ => HVA_BASE - PAGE + u64::from(u.byte()) * 0x400,
                };
                let last = start.saturating_add(u.pick(&[0, 0xfff, 0x1fff, 0x3000, 0x10000, u64::MAX]));
                check_hva_range(&vm, &model, start, last, &what)?;
            }
            // vCPU handles.
            13 => match u.byte() % 4 {
                0 if pool.len() < MAX_VCPUS => pool.push(vm.vcpu()),
                1 if !pool.is_empty() => {
                    let i = usize::from(u.byte()) % pool.len();
                    drop(pool.swap_remove(i));
                }
                _ if !pool.is_empty() => {
                    let i = usize::from(u.byte()) % pool.len();
                    let a = probe_as(u, p);
                    let before = pool[i].address_space();
                    let got = errno(pool[i].set_address_space(a));
                    let want = if a < nr { Ok(()) } else { Err(Errno::EINVAL) };
                    prop_assert_eq!(got, want, "{}: set_address_space({})", what, a);
                    prop_assert_eq!(pool[i].address_space(), if a < nr { a } else { before });
                }
                _ => {}
            },
            // vCPU lookups.
            14 => {
                let g = gfn(u, p, &model);
                for v in vcpus.iter().chain(&pool).chain([&roaming]) {
                    check_vcpu(v, &model, &[g], &what)?;
                }
            }
            // Everything now.
            _ => check_all(&vm, &model, &tags, &vcpus, &roaming, &reader, p, step)?,
        }
        check_dirty(&vm, &model, &what)?;
        if step % FULL_EVERY == 0 {
            check_all(&vm, &model, &tags, &vcpus, &roaming, &reader, p, step)?;
        }
    }
    check_all(&vm, &model, &tags, &vcpus, &roaming, &reader, p, step)?;
    for v in &pool {
        check_vcpu(v, &model, &probe_gfns(&model, p), "end")?;
    }
    check_dirty(&vm, &model, "end")
}

fuzz_target!(|data: &[u8]| {
    let mut u = Input(data);
    let head = u.byte();
    let nr = 1 + u16::from(head & 1);
    let r = if head & 2 == 0 {
        run_input(&mut u, &profile(nr, false), NoArch)
    } else {
        run_input(&mut u, &profile(nr, true), Recorder::default())
    };
    if let Err(e) = r {
        panic!("library and model disagree: {e}");
    }
});
