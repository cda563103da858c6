//! Concurrency of the two-set update protocol, observed from outside:
//!
//! 1. lookups (VM-wide, per-vCPU cached, held read guards) are linearizable
//!    while one writer churns through >= 100_000 create / move / flags-only /
//!    delete requests: every answer is one that a state committed during the
//!    lookup gives (checked against a sequential model, with an op counter
//!    bracketing each lookup);
//! 2. readers never wait for the writer (the writer is parked inside
//!    `prepare_memory_region` with the INVALID copy published and the writer
//!    lock held, and readers still complete);
//! 3. a grace period really waits for a reader holding a `&MemorySlot`;
//! 4. per-vCPU caches are never stale (folded into 1: the vCPU reader
//!    concentrates on a slot the writer moves back and forth);
//! 5. creating a reader handle neither deadlocks inside a read section nor
//!    waits for a grace period.
//!
//! Threads that a library bug could block forever are detached and report
//! over channels with timeouts (the VM is leaked to make that possible), so a
//! deadlock fails the test with a message; a watchdog aborts the binary if a
//! test still hangs.
//!
//! Run with `cargo test -p memslots --release --test concurrency -- --nocapture`
//! to see the statistics.

use memslots::{
    ArchHooks, Config, Errno, HvaError, MemoryChange, MemorySlot, Outcome, SlotDesc, SlotDraft, UserMemoryRegion, Vm,
    GEN_UPDATE_IN_PROGRESS, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// splitmix64: deterministic, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

fn u64_of(x: usize) -> u64 {
    u64::try_from(x).expect("usize fits in u64")
}

fn usize_of(x: u64) -> usize {
    usize::try_from(x).expect("u64 fits in usize")
}

/// Aborts the whole test binary if the returned sender is neither dropped nor
/// used within `limit`: a deadlock in the library then fails loudly instead
/// of hanging the suite. Dropping the sender (also during a panic) disarms it.
fn watchdog(what: &'static str, limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: {what} did not finish within {limit:?} (deadlock?); aborting");
            std::process::abort();
        }
    });
    tx
}

/// A VM that lives for the rest of the process, so threads that might get
/// stuck (the library deadlocking) can be plain detached threads and the test
/// can fail with a message instead of hanging in a scope join.
fn leak_vm<H: ArchHooks>(hooks: H) -> &'static Vm<H> {
    Box::leak(Box::new(Vm::with_hooks(Config::x86_64().with_address_spaces(1), hooks).expect("valid config")))
}

// ---------------------------------------------------------------------------
// The sequential model (test 1)
// ---------------------------------------------------------------------------

/// Slot ids used by the churn test; id 0 is the "ping-pong" slot.
const NR_IDS: usize = 64;
/// Random slots live in gfns `[0, GFN_SPACE)`.
const GFN_SPACE: u64 = 1 << 13;
/// The ping-pong slot moves between `[PP_A, PP_A + PP_NPAGES)` and
/// `[PP_B, PP_B + PP_NPAGES)` (overlapping ranges: a move onto itself).
const PP_ID: u16 = 0;
const PP_NPAGES: u64 = 64;
const PP_A: u64 = GFN_SPACE + 64;
const PP_B: u64 = GFN_SPACE + 96;
/// Readers look up gfns in `[0, LOOKUP_SPACE)` (covers the ping-pong ranges).
const LOOKUP_SPACE: u64 = GFN_SPACE + 256;
/// x86-64 with 48 physical address bits: `last_gfn > MAX_GFN` fails in prepare.
const MAX_GFN: u64 = Config::x86_64().max_gfn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MSlot {
    base: u64,
    npages: u64,
    hva: u64,
    flags: u32,
}

impl MSlot {
    fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base && gfn - self.base < self.npages
    }
    fn overlaps(&self, base: u64, npages: u64) -> bool {
        self.base < base + npages && base < self.base + self.npages
    }
}

type State = [Option<MSlot>; NR_IDS];

/// One request of the churn (npages 0 = delete).
#[derive(Clone, Copy, Debug)]
struct Op {
    id: u16,
    flags: u32,
    base: u64,
    npages: u64,
    hva: u64,
    /// The arch hook's `prepare_memory_region` fails (EIO) for this request.
    fail_prepare: bool,
}

impl Op {
    fn region(&self) -> UserMemoryRegion {
        UserMemoryRegion::new(u32::from(self.id), self.flags, self.base * PAGE, self.npages * PAGE, self.hva)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Changed(MemoryChange),
    Unchanged,
    Err(Errno),
}

fn verdict_of(r: &Result<Outcome, memslots::Error>) -> Verdict {
    match r {
        Ok(Outcome::Changed(c)) => Verdict::Changed(*c),
        Ok(Outcome::Unchanged) => Verdict::Unchanged,
        Err(e) => Verdict::Err(e.errno()),
    }
}

/// What one request did to the model: slot `id` went from `old` to `new`
/// (equal if nothing changed); `invalid`: an INVALID copy of `old` was
/// published in between (DELETE/MOVE that passed validation, even if prepare
/// then failed and the old slot was reinstated).
#[derive(Clone, Copy, Debug)]
struct Delta {
    id: usize,
    old: Option<MSlot>,
    new: Option<MSlot>,
    invalid: bool,
    verdict: Verdict,
    /// Publishes (set swaps) the request made: the generation advances by this.
    swaps: u64,
}

/// KVM's `__kvm_set_memory_region` + `kvm_set_memslot`, restricted to the
/// requests the generator makes (aligned, in range, v1 flags), in the
/// library's order of checks.
fn model_apply(state: &mut State, op: &Op) -> Delta {
    let id = usize::from(op.id);
    let old = state[id];
    let mut d = Delta { id, old, new: old, invalid: false, verdict: Verdict::Unchanged, swaps: 0 };
    let fail = |mut d: Delta, e: Errno| {
        d.verdict = Verdict::Err(e);
        d
    };
    if op.npages == 0 {
        if old.is_none() {
            return fail(d, Errno::EINVAL);
        }
        // INVALID copy published, then prepare (error: old slot reinstated).
        d.invalid = true;
        d.swaps = 2;
        if op.fail_prepare {
            return fail(d, Errno::EIO);
        }
        state[id] = None;
        d.new = None;
        d.verdict = Verdict::Changed(MemoryChange::Delete);
        return d;
    }
    let new = MSlot { base: op.base, npages: op.npages, hva: op.hva, flags: op.flags };
    let change = match old {
        None => MemoryChange::Create,
        Some(o) => {
            if op.hva != o.hva || op.npages != o.npages || (op.flags ^ o.flags) & KVM_MEM_READONLY != 0 {
                return fail(d, Errno::EINVAL);
            }
            if op.base != o.base {
                MemoryChange::Move
            } else if op.flags != o.flags {
                MemoryChange::FlagsOnly
            } else {
                return d;
            }
        }
    };
    let placed = matches!(change, MemoryChange::Create | MemoryChange::Move);
    if placed && state.iter().enumerate().any(|(i, s)| i != id && s.is_some_and(|s| s.overlaps(new.base, new.npages))) {
        return fail(d, Errno::EEXIST);
    }
    if change == MemoryChange::Move {
        d.invalid = true;
        d.swaps = 2;
    }
    // Prepare: the x86 max-gfn check, then the arch hook.
    if placed && new.base + new.npages - 1 > MAX_GFN {
        return fail(d, Errno::EINVAL);
    }
    if op.fail_prepare {
        return fail(d, Errno::EIO);
    }
    state[id] = Some(new);
    d.new = Some(new);
    d.swaps = if d.invalid { 2 } else { 1 };
    d.verdict = Verdict::Changed(change);
    d
}

fn hva_for(id: u16, incarnation: u64) -> u64 {
    0x1000_0000_0000 + (u64::from(id) << 32) + (incarnation << 28)
}

fn free_spot(st: &State, id: usize, npages: u64, rng: &mut Rng) -> Option<u64> {
    (0..16).find_map(|_| {
        let base = rng.below(GFN_SPACE - npages + 1);
        let taken = st.iter().enumerate().any(|(i, s)| i != id && s.is_some_and(|s| s.overlaps(base, npages)));
        (!taken).then_some(base)
    })
}

/// The churn: mostly successful requests over 64 slot ids, with some that
/// the library must reject (EEXIST, EINVAL), some whose prepare fails after
/// the INVALID copy was published (arch error, max gfn), and a slot moved back
/// and forth between two overlapping ranges.
fn generate_ops(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let mut st: State = [None; NR_IDS];
    let mut ops = Vec::with_capacity(n);
    while ops.len() < n {
        let fail_prepare = rng.chance(1, 50);
        let op = if ops.is_empty() || rng.chance(1, 8) {
            let o = st[usize::from(PP_ID)];
            match o {
                None => Op { id: PP_ID, flags: 0, base: PP_A, npages: PP_NPAGES, hva: hva_for(PP_ID, 0), fail_prepare },
                Some(o) if rng.chance(4, 5) => {
                    let base = if o.base == PP_A { PP_B } else { PP_A };
                    Op { id: PP_ID, flags: o.flags, base, npages: o.npages, hva: o.hva, fail_prepare }
                }
                Some(o) => Op {
                    id: PP_ID,
                    flags: o.flags ^ KVM_MEM_LOG_DIRTY_PAGES,
                    base: o.base,
                    npages: o.npages,
                    hva: o.hva,
                    fail_prepare,
                },
            }
        } else {
            let id = 1 + usize_of(rng.below(u64_of(NR_IDS) - 1));
            let id16 = u16::try_from(id).expect("small id");
            match st[id] {
                None if rng.chance(1, 20) => Op { id: id16, flags: 0, base: 0, npages: 0, hva: 0, fail_prepare },
                None => {
                    let npages = 1 + if rng.chance(1, 3) { rng.below(1024) } else { rng.below(128) };
                    let flags = match rng.below(10) {
                        0..=5 => 0,
                        6 | 7 => KVM_MEM_LOG_DIRTY_PAGES,
                        8 => KVM_MEM_READONLY,
                        _ => KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES,
                    };
                    let base =
                        free_spot(&st, id, npages, &mut rng).unwrap_or_else(|| rng.below(GFN_SPACE - npages + 1));
                    Op { id: id16, flags, base, npages, hva: hva_for(id16, rng.below(8)), fail_prepare }
                }
                Some(o) => {
                    let same =
                        Op { id: id16, flags: o.flags, base: o.base, npages: o.npages, hva: o.hva, fail_prepare };
                    match rng.below(100) {
                        0..=34 => {
                            let base = match rng.below(10) {
                                // Beyond the highest gfn: fails in prepare (usually).
                                0 => MAX_GFN - rng.below(16),
                                // A short move overlapping its own old range.
                                1 | 2 => {
                                    let d = 1 + rng.below((o.npages / 2).max(1));
                                    if rng.chance(1, 2) {
                                        o.base.saturating_sub(d)
                                    } else {
                                        (o.base + d).min(GFN_SPACE - o.npages)
                                    }
                                }
                                _ => free_spot(&st, id, o.npages, &mut rng)
                                    .unwrap_or_else(|| rng.below(GFN_SPACE - o.npages + 1)),
                            };
                            Op { base, ..same }
                        }
                        35..=59 => Op { flags: o.flags ^ KVM_MEM_LOG_DIRTY_PAGES, ..same },
                        60..=84 => Op { npages: 0, flags: 0, base: 0, hva: 0, ..same },
                        85..=89 => Op { npages: o.npages + 1, ..same },
                        90..=94 => same,
                        _ => Op { hva: o.hva ^ (1 << 28), ..same },
                    }
                }
            }
        };
        model_apply(&mut st, &op);
        ops.push(op);
    }
    ops
}

// ---------------------------------------------------------------------------
// Answers and the log of lookups
// ---------------------------------------------------------------------------

/// Lookup kinds: `gfn_to_hva` (a `Result<u64, HvaError>`) or `gfn_to_memslot`.
const K_HVA: u8 = 0;
const K_SLOT: u8 = 1;

/// Encoded answers. `Ok(hva)` is the (page aligned, nonzero) hva itself.
const A_NOSLOT: u64 = 1;
const A_INVALID: u64 = 2;
const A_READONLY: u64 = 3;
/// `gfn_to_memslot` answers: hva of the gfn | A_SLOT | flag bits.
const A_SLOT: u64 = 4;
const A_SLOT_INVALID: u64 = 8;
const A_SLOT_RO: u64 = 16;
const A_SLOT_LD: u64 = 32;
/// A slot returned for a gfn it does not contain, or in the wrong address space.
const A_BOGUS: u64 = 0xff0;

fn enc_hva(r: Result<u64, HvaError>) -> u64 {
    match r {
        Ok(h) if h != 0 && h % PAGE == 0 => h,
        Ok(_) => A_BOGUS,
        Err(HvaError::NoSlot) => A_NOSLOT,
        Err(HvaError::Invalid) => A_INVALID,
        Err(HvaError::ReadOnly) => A_READONLY,
    }
}

fn enc_slot(gfn: u64, s: Option<&MemorySlot>) -> u64 {
    match s {
        None => A_NOSLOT,
        Some(s) if !s.contains(gfn) || s.as_id != 0 => A_BOGUS,
        Some(s) => {
            let mut a = s.gfn_to_hva_unchecked(gfn) | A_SLOT;
            if s.is_invalid() {
                a |= A_SLOT_INVALID;
            }
            if s.is_readonly() {
                a |= A_SLOT_RO;
            }
            if s.logs_dirty_pages() {
                a |= A_SLOT_LD;
            }
            a
        }
    }
}

/// The slot covering a gfn in some (fine-grained) state: the slot and
/// whether it is the INVALID copy.
type Cover = Option<(MSlot, bool)>;

fn expected(kind: u8, gfn: u64, cover: Cover) -> u64 {
    let Some((s, invalid)) = cover else { return A_NOSLOT };
    let hva = s.hva + (gfn - s.base) * PAGE;
    if kind == K_HVA {
        if invalid {
            A_INVALID
        } else if s.flags & KVM_MEM_READONLY != 0 {
            A_READONLY
        } else {
            hva
        }
    } else {
        let mut a = hva | A_SLOT;
        if invalid {
            a |= A_SLOT_INVALID;
        }
        if s.flags & KVM_MEM_READONLY != 0 {
            a |= A_SLOT_RO;
        }
        if s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            a |= A_SLOT_LD;
        }
        a
    }
}

fn decode(a: u64) -> String {
    match a {
        A_NOSLOT => "Err(NoSlot)".into(),
        A_INVALID => "Err(Invalid)".into(),
        A_READONLY => "Err(ReadOnly)".into(),
        A_BOGUS => "BOGUS(slot not covering the gfn / wrong as_id / unaligned hva)".into(),
        a if a & A_SLOT != 0 => {
            let hva = a & !(PAGE - 1);
            let inv = if a & A_SLOT_INVALID != 0 { " INVALID" } else { "" };
            let ro = if a & A_SLOT_RO != 0 { " RO" } else { "" };
            let ld = if a & A_SLOT_LD != 0 { " LOG_DIRTY" } else { "" };
            format!("Some(slot: hva {hva:#x}{inv}{ro}{ld})")
        }
        a => format!("Ok({a:#x})"),
    }
}

/// One read section: up to 3 lookups made between two reads of the op
/// counter (`c0` before entering, `c1` after the last lookup).
#[derive(Clone, Copy, Debug, Default)]
struct Rec {
    c0: u32,
    c1: u32,
    reader: u8,
    n: u8,
    /// Bit i: lookup i is a `gfn_to_memslot` (else `gfn_to_hva`).
    kinds: u8,
    gfn: [u32; 3],
    ans: [u64; 3],
}

impl Rec {
    fn kind(&self, i: usize) -> u8 {
        if self.kinds & (1 << i) != 0 {
            K_SLOT
        } else {
            K_HVA
        }
    }
    fn gfns(&self) -> [u64; 3] {
        self.gfn.map(u64::from)
    }
}

/// A bounded, uniformly thinned log: keeps every `stride`-th record; when
/// full, drops every other record and doubles the stride.
struct Log {
    recs: Vec<Rec>,
    stride: u64,
    seen: u64,
    cap: usize,
}

impl Log {
    fn new(cap: usize) -> Self {
        Log { recs: Vec::with_capacity(cap), stride: 1, seen: 0, cap }
    }
    fn push(&mut self, rec: Rec) {
        let seen = self.seen;
        self.seen += 1;
        if !seen.is_multiple_of(self.stride) {
            return;
        }
        if self.recs.len() == self.cap {
            let mut i = 0usize;
            self.recs.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride *= 2;
            if !seen.is_multiple_of(self.stride) {
                return;
            }
        }
        self.recs.push(rec);
    }
}

// ---------------------------------------------------------------------------
// Test 1: linearizable lookups under churn
// ---------------------------------------------------------------------------

/// Hooks for the churn: inject prepare failures, check generations and
/// flushes as the writer reports them.
#[derive(Default)]
struct ChurnHooks {
    fail_next: AtomicBool,
    last_gen: AtomicU64,
    updates: AtomicU64,
    bad_gens: AtomicU64,
    flushes: AtomicU64,
    bad_flushes: AtomicU64,
}

impl ArchHooks for ChurnHooks {
    type SlotData = ();

    fn prepare_memory_region(
        &self,
        _change: MemoryChange,
        _old: Option<&MemorySlot>,
        _new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        if self.fail_next.load(SeqCst) {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn flush_shadow_memslot(&self, slot: &MemorySlot) {
        self.flushes.fetch_add(1, SeqCst);
        if !slot.is_invalid() {
            self.bad_flushes.fetch_add(1, SeqCst);
        }
    }

    fn memslots_updated(&self, as_id: u16, generation: u64) {
        self.updates.fetch_add(1, SeqCst);
        let last = self.last_gen.swap(generation, SeqCst);
        if as_id != 0 || generation & GEN_UPDATE_IN_PROGRESS != 0 || generation != last + 1 {
            self.bad_gens.fetch_add(1, SeqCst);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReaderKind {
    /// `vm.gfn_to_hva` (a section on the VM's shared record per lookup).
    Vm,
    /// `vcpu.gfn_to_hva` (cached per-vCPU path) in bursts of neighbouring
    /// gfns, half of them on the ping-pong slot; sometimes
    /// `vcpu.read().gfn_to_memslot`.
    Vcpu,
    /// A `Reader` whose `read()` guard is re-entered per section; a section
    /// makes 1 or 3 lookups (`gfn_to_memslot` / `gfn_to_hva`).
    Guard,
}

struct ReaderOut {
    kind: ReaderKind,
    log: Log,
    lookups: u64,
    during: u64,
}

fn pick_gfn(rng: &mut Rng, pingpong_share: u64) -> u64 {
    if rng.below(100) < pingpong_share {
        PP_A + rng.below(PP_B + PP_NPAGES - PP_A)
    } else {
        rng.below(LOOKUP_SPACE)
    }
}

fn run_reader(
    kind: ReaderKind,
    reader_idx: u8,
    vm: &Vm<ChurnHooks>,
    counter: &AtomicU64,
    done: &AtomicBool,
    barrier: &Barrier,
    end_count: u64,
) -> ReaderOut {
    let mut rng = Rng::new(0x5eed_0000 + u64::from(reader_idx));
    let mut out = ReaderOut { kind, log: Log::new(500_000), lookups: 0, during: 0 };
    let c32 = |c: u64| u32::try_from(c).expect("op counter fits in u32");
    // During every other block of 8192 requests the readers pause briefly
    // now and then: on a 2-core machine three spinning readers make the
    // writer wait for readers preempted inside a section (slow, many lookups
    // per request); paused readers let it run at full speed (many requests
    // per lookup). Both regimes are checked.
    let account = |out: &mut ReaderOut, c0: u64, c1: u64, n: u8| {
        out.lookups += u64::from(n);
        if (c1 / (2 * 8192)) % 2 == 1 && out.lookups % 512 < u64::from(n) {
            thread::sleep(Duration::from_micros(50));
        }
        if c0 >= 1 && c1 < end_count {
            out.during += u64::from(n);
        }
    };
    let gfn32 = |g: u64| u32::try_from(g).expect("gfn fits in u32");
    match kind {
        ReaderKind::Vm => {
            barrier.wait();
            while !done.load(SeqCst) {
                let gfn = pick_gfn(&mut rng, 25);
                let c0 = counter.load(SeqCst);
                let ans = enc_hva(vm.gfn_to_hva(0, gfn));
                let c1 = counter.load(SeqCst);
                account(&mut out, c0, c1, 1);
                let rec = Rec {
                    c0: c32(c0),
                    c1: c32(c1),
                    reader: reader_idx,
                    n: 1,
                    kinds: 0,
                    gfn: [gfn32(gfn), 0, 0],
                    ans: [ans, 0, 0],
                };
                out.log.push(rec);
            }
        }
        ReaderKind::Vcpu => {
            let vcpu = vm.vcpu();
            barrier.wait();
            let mut burst = 0u64;
            while !done.load(SeqCst) {
                burst += 1;
                let start = pick_gfn(&mut rng, 50).min(LOOKUP_SPACE - 8);
                for i in 0..8 {
                    let gfn = start + i;
                    let slot_lookup = i == 0 && burst.is_multiple_of(8);
                    let c0 = counter.load(SeqCst);
                    let ans = if slot_lookup {
                        let g = vcpu.read();
                        enc_slot(gfn, g.gfn_to_memslot(gfn))
                    } else {
                        enc_hva(vcpu.gfn_to_hva(gfn))
                    };
                    let c1 = counter.load(SeqCst);
                    account(&mut out, c0, c1, 1);
                    let kinds = u8::from(slot_lookup);
                    let rec = Rec {
                        c0: c32(c0),
                        c1: c32(c1),
                        reader: reader_idx,
                        n: 1,
                        kinds,
                        gfn: [gfn32(gfn), 0, 0],
                        ans: [ans, 0, 0],
                    };
                    out.log.push(rec);
                }
            }
        }
        ReaderKind::Guard => {
            let reader = vm.reader();
            barrier.wait();
            while !done.load(SeqCst) {
                let n: u8 = if rng.chance(1, 4) { 3 } else { 1 };
                let mut rec = Rec { reader: reader_idx, n, ..Rec::default() };
                let first = pick_gfn(&mut rng, 25);
                for i in 0..usize::from(n) {
                    // Multi-lookup sections revisit the neighbourhood (and
                    // the ping-pong slot) so in-section changes are likely.
                    let g = match i {
                        0 => first,
                        1 => pick_gfn(&mut rng, 60),
                        _ => first,
                    };
                    rec.gfn[i] = gfn32(g);
                    if i % 2 == 0 {
                        rec.kinds |= 1 << i;
                    }
                }
                let gfns = rec.gfns();
                let c0 = counter.load(SeqCst);
                {
                    let g = reader.read();
                    let kinds = rec.kinds;
                    for (i, (ans, &gfn)) in rec.ans.iter_mut().zip(&gfns).take(usize::from(n)).enumerate() {
                        *ans = if kinds & (1 << i) != 0 {
                            enc_slot(gfn, g.gfn_to_memslot(0, gfn))
                        } else {
                            enc_hva(g.gfn_to_hva(0, gfn))
                        };
                    }
                }
                let c1 = counter.load(SeqCst);
                rec.c0 = c32(c0);
                rec.c1 = c32(c1);
                account(&mut out, c0, c1, n);
                out.log.push(rec);
            }
        }
    }
    out
}

/// Updates the per-lookup covers for one fine-grained step on one slot id.
fn step(cur: &mut [Cover; 3], gfns: &[u64; 3], before: Cover, after: Cover) {
    for (c, &g) in cur.iter_mut().zip(gfns) {
        if after.is_some_and(|(s, _)| s.contains(g)) {
            *c = after;
        } else if before.is_some_and(|(s, _)| s.contains(g)) {
            *c = None;
        }
    }
}

fn covering(st: &State, gfn: u64) -> Cover {
    st.iter().flatten().find(|s| s.contains(gfn)).map(|s| (*s, false))
}

/// Walks the fine-grained states from `st` through `window` (each request:
/// [its INVALID state,] its final state), calling `f` with the covers of
/// `gfns` in each; stops early when `f` returns true.
fn walk_states(gfns: &[u64; 3], st: &State, window: &[Delta], mut f: impl FnMut(&[Cover; 3]) -> bool) -> bool {
    let mut cur = gfns.map(|g| covering(st, g));
    if f(&cur) {
        return true;
    }
    for d in window {
        let mut before = d.old.map(|s| (s, false));
        if d.invalid {
            let after = d.old.map(|s| (s, true));
            step(&mut cur, gfns, before, after);
            before = after;
            if f(&cur) {
                return true;
            }
        }
        step(&mut cur, gfns, before, d.new.map(|s| (s, false)));
        if f(&cur) {
            return true;
        }
    }
    false
}

/// Whether the answers of `rec` are those of a non-decreasing sequence of
/// states in the window (one state per lookup, in program order).
fn linearizable(rec: &Rec, st: &State, window: &[Delta]) -> bool {
    let n = usize::from(rec.n);
    let gfns = rec.gfns();
    let mut i = 0;
    walk_states(&gfns, st, window, |cur| {
        while i < n && expected(rec.kind(i), gfns[i], cur[i]) == rec.ans[i] {
            i += 1;
        }
        i == n
    })
}

fn describe_violation(rec: &Rec, st: &State, window: &[Delta], window_range: &Range<usize>, ops: &[Op]) -> String {
    let gfns = rec.gfns();
    let n = usize::from(rec.n);
    let mut admissible: Vec<Vec<u64>> = vec![Vec::new(); n];
    walk_states(&gfns, st, window, |cur| {
        for (i, adm) in admissible.iter_mut().enumerate() {
            let a = expected(rec.kind(i), gfns[i], cur[i]);
            if !adm.contains(&a) {
                adm.push(a);
            }
        }
        false
    });
    let mut s =
        format!("reader {} section c0={} c1={} (requests {:?} in progress):", rec.reader, rec.c0, rec.c1, window_range);
    for (i, adm) in admissible.iter().enumerate() {
        let kind = if rec.kind(i) == K_SLOT { "gfn_to_memslot" } else { "gfn_to_hva" };
        let adm: Vec<String> = adm.iter().map(|&a| decode(a)).collect();
        s += &format!("\n    {kind}({:#x}) = {}; admissible: {adm:?}", gfns[i], decode(rec.ans[i]));
    }
    for (j, d) in window_range.clone().zip(window).take(6) {
        s += &format!("\n    request {j}: {:?} -> {:?} ({:?} -> {:?})", ops[j], d.verdict, d.old, d.new);
    }
    s
}

/// The checker itself: on a tiny history (create, move, delete of one slot)
/// it accepts exactly the answers of states committed during a lookup, and
/// rejects stale answers and sections that go back in time.
#[test]
fn checker_rejects_stale_and_backwards_answers() {
    const H: u64 = 0x1000_0000_0000;
    let ops = [
        Op { id: 1, flags: 0, base: 0, npages: 10, hva: H, fail_prepare: false },
        Op { id: 1, flags: 0, base: 20, npages: 10, hva: H, fail_prepare: false },
        Op { id: 1, flags: 0, base: 0, npages: 0, hva: 0, fail_prepare: false },
    ];
    let mut st: State = [None; NR_IDS];
    let deltas: Vec<Delta> = ops.iter().map(|op| model_apply(&mut st, op)).collect();
    let verdicts: Vec<Verdict> = deltas.iter().map(|d| d.verdict).collect();
    let want = [MemoryChange::Create, MemoryChange::Move, MemoryChange::Delete].map(Verdict::Changed);
    assert_eq!(verdicts, want);
    let check = |c0: u32, c1: u32, lookups: &[(u64, u8, u64)]| {
        let (lo, hi) = (usize_of(u64::from(c0) / 2), usize_of(u64::from(c1).div_ceil(2)));
        let mut st: State = [None; NR_IDS];
        for d in &deltas[..lo] {
            st[d.id] = d.new;
        }
        let mut rec = Rec { c0, c1, n: u8::try_from(lookups.len()).expect("<= 3"), ..Rec::default() };
        for (i, &(gfn, kind, ans)) in lookups.iter().enumerate() {
            rec.gfn[i] = u32::try_from(gfn).expect("small gfn");
            rec.kinds |= kind << i;
            rec.ans[i] = ans;
        }
        linearizable(&rec, &st, &deltas[lo..hi])
    };
    let old = H + 5 * PAGE; // gfn 5 before the move
    let new = H + 5 * PAGE; // gfn 25 after the move
                            // Between create and move: only the old mapping.
    assert!(check(2, 2, &[(5, K_HVA, old)]));
    assert!(!check(2, 2, &[(5, K_HVA, A_INVALID)]));
    assert!(!check(2, 2, &[(5, K_HVA, A_NOSLOT)]));
    assert!(!check(2, 2, &[(25, K_HVA, new)]));
    // During the move: old, INVALID or gone for gfn 5; nothing or new for 25.
    for a in [old, A_INVALID, A_NOSLOT] {
        assert!(check(3, 3, &[(5, K_HVA, a)]));
    }
    assert!(check(3, 3, &[(5, K_SLOT, old | A_SLOT | A_SLOT_INVALID)]));
    assert!(check(3, 3, &[(5, K_SLOT, old | A_SLOT)]));
    assert!(!check(3, 3, &[(5, K_SLOT, old | A_SLOT | A_SLOT_LD)]));
    assert!(!check(3, 3, &[(25, K_HVA, A_INVALID)]));
    assert!(check(3, 3, &[(25, K_HVA, new)]));
    // After the move: the old mapping (and its INVALID copy) is stale.
    assert!(!check(4, 4, &[(5, K_HVA, old)]));
    assert!(!check(4, 4, &[(5, K_HVA, A_INVALID)]));
    // One section spanning the move and the delete: forward in time only.
    assert!(check(3, 6, &[(5, K_HVA, old), (25, K_HVA, new), (25, K_HVA, A_INVALID)]));
    assert!(check(3, 6, &[(25, K_HVA, A_NOSLOT), (25, K_HVA, new), (25, K_HVA, A_NOSLOT)]));
    assert!(!check(3, 6, &[(25, K_HVA, new), (5, K_HVA, old)]));
    assert!(!check(3, 6, &[(5, K_HVA, A_NOSLOT), (5, K_HVA, old)]));
    assert!(!check(3, 6, &[(25, K_HVA, A_INVALID), (25, K_HVA, new)]));
}

#[test]
fn lookups_are_linearizable_under_churn() {
    const N_OPS: usize = 120_000;
    const SEED: u64 = 0x6d65_6d73_6c6f_7473;
    let t0 = Instant::now();
    let ops = generate_ops(SEED, N_OPS);
    let end_count = 2 * u64_of(N_OPS);
    let _watchdog = watchdog("lookups_are_linearizable_under_churn", Duration::from_secs(180));

    let vm = Vm::with_hooks(Config::x86_64().with_address_spaces(1), ChurnHooks::default()).expect("vm");
    let counter = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let kinds = [ReaderKind::Vm, ReaderKind::Vcpu, ReaderKind::Guard];
    let barrier = Barrier::new(kinds.len() + 1);

    let (verdicts, writer_time, outs) = thread::scope(|s| {
        let readers: Vec<_> = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let (vm, counter, done, barrier) = (&vm, &counter, &done, &barrier);
                let idx = u8::try_from(i).expect("few readers");
                s.spawn(move || run_reader(kind, idx, vm, counter, done, barrier, end_count))
            })
            .collect();
        let writer = s.spawn(|| {
            barrier.wait();
            let start = Instant::now();
            let mut verdicts = Vec::with_capacity(ops.len());
            for (k, op) in ops.iter().enumerate() {
                let k = u64_of(k);
                counter.store(2 * k + 1, SeqCst);
                vm.hooks().fail_next.store(op.fail_prepare, SeqCst);
                let r = vm.set_user_memory_region(&op.region());
                vm.hooks().fail_next.store(false, SeqCst);
                counter.store(2 * k + 2, SeqCst);
                verdicts.push(verdict_of(&r));
            }
            let elapsed = start.elapsed();
            done.store(true, SeqCst);
            (verdicts, elapsed)
        });
        let (verdicts, elapsed) = writer.join().expect("writer panicked");
        let outs: Vec<ReaderOut> = readers.into_iter().map(|h| h.join().expect("reader panicked")).collect();
        (verdicts, elapsed, outs)
    });

    // Replay the same requests on the model.
    let mut st: State = [None; NR_IDS];
    let mut covered = 0u64;
    let deltas: Vec<Delta> = ops
        .iter()
        .map(|op| {
            let d = model_apply(&mut st, op);
            covered += st.iter().flatten().filter(|s| s.base < LOOKUP_SPACE).map(|s| s.npages).sum::<u64>();
            d
        })
        .collect();
    let final_state = st;

    let mut mismatches = Vec::new();
    let mut hist = std::collections::BTreeMap::<String, u64>::new();
    for (k, (d, v)) in deltas.iter().zip(&verdicts).enumerate() {
        *hist.entry(format!("{v:?}")).or_default() += 1;
        if d.verdict != *v {
            mismatches.push(format!("request {k} {:?}: library {v:?}, model {:?}", ops[k], d.verdict));
        }
    }
    println!("churn: {N_OPS} requests in {writer_time:?} (generated/replayed in {:?})", t0.elapsed());
    println!("verdicts: {hist:?}");
    println!(
        "on average {}% of the looked-up gfns are covered by a slot",
        covered * 100 / (u64_of(N_OPS) * LOOKUP_SPACE)
    );
    assert!(
        mismatches.is_empty(),
        "{} verdicts differ from the model, first: {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );

    // Generations and hooks as reported by the writer.
    let swaps: u64 = deltas.iter().map(|d| d.swaps).sum();
    let h = vm.hooks();
    assert_eq!(vm.generation(0), Some(swaps), "generation != number of publishes");
    assert_eq!(h.updates.load(SeqCst), swaps, "memslots_updated calls != number of publishes");
    assert_eq!(h.bad_gens.load(SeqCst), 0, "memslots_updated saw a non-increasing or in-progress generation");
    let invalid_publishes = u64_of(deltas.iter().filter(|d| d.invalid).count());
    assert_eq!(h.flushes.load(SeqCst), invalid_publishes, "flush_shadow_memslot calls != INVALID publishes");
    assert_eq!(h.bad_flushes.load(SeqCst), 0, "flush_shadow_memslot got a slot that is not INVALID");

    // Final state.
    {
        let g = vm.read();
        let got: Vec<MSlot> = g
            .slots(0)
            .map(|s| MSlot { base: s.base_gfn, npages: s.npages, hva: s.userspace_addr, flags: s.flags })
            .collect();
        let mut want: Vec<MSlot> = final_state.iter().flatten().copied().collect();
        want.sort_by_key(|s| s.base);
        assert_eq!(got, want, "final slots differ from the model");
    }

    // Check every logged section against the model.
    for o in &outs {
        println!(
            "reader {:?}: {} lookups ({} while the writer ran), {} sections logged (1 in {})",
            o.kind,
            o.lookups,
            o.during,
            o.log.recs.len(),
            o.log.stride
        );
    }
    let mut recs: Vec<Rec> = outs.iter().flat_map(|o| o.log.recs.iter().copied()).collect();
    recs.sort_by_key(|r| r.c0);
    let mut st: State = [None; NR_IDS];
    let mut applied = 0usize;
    let (mut checked, mut violations, mut max_window) = (0u64, 0u64, 0usize);
    let mut in_flight = 0u64;
    let mut answers = std::collections::BTreeMap::<&str, u64>::new();
    let mut pingpong = [0u64; 2];
    let mut examples = Vec::new();
    for rec in &recs {
        let lo = usize_of(u64::from(rec.c0) / 2);
        let hi = usize_of(u64::from(rec.c1).div_ceil(2)).min(deltas.len());
        while applied < lo {
            st[deltas[applied].id] = deltas[applied].new;
            applied += 1;
        }
        let window = &deltas[lo..hi.max(lo)];
        max_window = max_window.max(window.len());
        if !window.is_empty() {
            in_flight += u64::from(rec.n);
        }
        checked += u64::from(rec.n);
        for i in 0..usize::from(rec.n) {
            let a = rec.ans[i];
            let cat = match a {
                A_NOSLOT => "NoSlot",
                A_INVALID => "Invalid",
                A_READONLY => "ReadOnly",
                A_BOGUS => "bogus",
                a if a & A_SLOT_INVALID != 0 => "slot INVALID",
                a if a & A_SLOT != 0 => "slot",
                _ => "hva",
            };
            *answers.entry(cat).or_default() += 1;
            if rec.kind(i) == K_HVA && rec.reader == 1 && a & 0xfff == 0 {
                let g = u64::from(rec.gfn[i]);
                if (PP_A..PP_B + PP_NPAGES).contains(&g) {
                    // Which of the two places the answer came from.
                    let base = g.wrapping_sub(a.wrapping_sub(hva_for(PP_ID, 0)) / PAGE);
                    pingpong[usize::from(base == PP_B)] += 1;
                }
            }
        }
        if !linearizable(rec, &st, window) {
            violations += 1;
            if examples.len() < 8 {
                examples.push(describe_violation(rec, &st, window, &(lo..hi.max(lo)), &ops));
            }
        }
    }
    println!(
        "checked {checked} lookups in {} sections ({in_flight} overlapping a request, widest window {max_window} requests): {violations} violations",
        recs.len()
    );
    println!("answers: {answers:?}; vCPU hits on the ping-pong slot at its two places: {pingpong:?}");
    println!("total time {:?}", t0.elapsed());
    assert!(violations == 0, "{violations} non-linearizable lookups, e.g.:\n{}", examples.join("\n"));
    for o in &outs {
        assert!(o.during > 10_000, "reader {:?} made only {} lookups while the writer ran", o.kind, o.during);
    }
    assert!(in_flight > 1000, "too few lookups overlapped a request ({in_flight}) for the test to mean much");
}

// ---------------------------------------------------------------------------
// Test 2: readers never wait on the writer
// ---------------------------------------------------------------------------

/// `prepare_memory_region` of the first DELETE/MOVE announces itself on
/// `entered` and parks until `release` says go (or is dropped).
struct BlockHooks {
    entered: Mutex<Option<mpsc::Sender<MemoryChange>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
    flushes: AtomicUsize,
}

impl ArchHooks for BlockHooks {
    type SlotData = ();

    fn prepare_memory_region(
        &self,
        change: MemoryChange,
        _old: Option<&MemorySlot>,
        _new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        if matches!(change, MemoryChange::Delete | MemoryChange::Move) {
            let tx = self.entered.lock().expect("lock").take();
            if let Some(tx) = tx {
                let _ = tx.send(change);
                let rx = self.release.lock().expect("lock").take();
                // A test that gave up drops the sender: fail the request.
                if rx.is_some_and(|rx| rx.recv_timeout(Duration::from_secs(120)).is_err()) {
                    return Err(Errno::EAGAIN);
                }
            }
        }
        Ok(())
    }

    fn flush_shadow_memslot(&self, _slot: &MemorySlot) {
        self.flushes.fetch_add(1, SeqCst);
    }
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    NoSlot,
    /// The INVALID copy of this slot.
    Invalid(SlotDesc),
    Hva(u64),
}

#[derive(Clone, Copy, Debug)]
enum ProbeKind {
    VmHva,
    SharedGuardSlot,
    ReaderGuardSlot,
    VcpuHva,
    VcpuGuardSlot,
}

fn check_hva(r: Result<u64, HvaError>, e: Expect) -> bool {
    match e {
        Expect::NoSlot => r == Err(HvaError::NoSlot),
        Expect::Invalid(_) => r == Err(HvaError::Invalid),
        Expect::Hva(h) => r == Ok(h),
    }
}

fn check_slot(gfn: u64, s: Option<&MemorySlot>, e: Expect) -> bool {
    match (e, s) {
        (Expect::NoSlot, None) => true,
        (Expect::Invalid(d), Some(s)) => {
            s.is_invalid()
                && s.base_gfn == d.base_gfn
                && s.npages == d.npages
                && s.userspace_addr == d.userspace_addr
                && s.id == d.id
        }
        (Expect::Hva(h), Some(s)) => !s.is_invalid() && s.contains(gfn) && s.gfn_to_hva_unchecked(gfn) == h,
        _ => false,
    }
}

/// Runs `count` lookups over `probes` (cyclically) with one kind of reader;
/// returns the first wrong answer, if any.
fn probe_loop(
    vm: &'static Vm<BlockHooks>,
    kind: ProbeKind,
    probes: &[(u64, Expect)],
    count: usize,
    ready: &mpsc::Sender<()>,
    go: &mpsc::Receiver<()>,
) -> Result<usize, String> {
    let err = |gfn: u64, e: Expect, got: String| Err(format!("{kind:?}: gfn {gfn:#x}: expected {e:?}, got {got}"));
    let vcpu = vm.vcpu();
    let reader = vm.reader();
    // Warm the vCPU cache (and the set's last-used slot) with the slot that
    // is about to become INVALID: the generation must invalidate it.
    if let Some(&(gfn, Expect::Invalid(d))) = probes.iter().find(|p| matches!(p.1, Expect::Invalid(_))) {
        let before = Ok(d.gfn_to_hva_unchecked(gfn));
        if vcpu.gfn_to_hva(gfn) != before || vcpu.read().gfn_to_memslot(gfn).is_none() {
            return Err(format!("{kind:?}: warm-up lookup of {gfn:#x} failed"));
        }
        let _ = reader.read().gfn_to_memslot(0, gfn);
    }
    ready.send(()).map_err(|_| "test gone".to_string())?;
    go.recv_timeout(Duration::from_secs(60)).map_err(|_| format!("{kind:?}: no go signal"))?;
    for (&(gfn, e), _) in probes.iter().cycle().zip(0..count) {
        match kind {
            ProbeKind::VmHva => {
                let r = vm.gfn_to_hva(0, gfn);
                if !check_hva(r, e) {
                    return err(gfn, e, format!("{r:?}"));
                }
            }
            ProbeKind::VcpuHva => {
                let r = vcpu.gfn_to_hva(gfn);
                if !check_hva(r, e) {
                    return err(gfn, e, format!("{r:?}"));
                }
            }
            ProbeKind::SharedGuardSlot => {
                let g = vm.read();
                let s = g.gfn_to_memslot(0, gfn);
                if !check_slot(gfn, s, e) {
                    return err(gfn, e, format!("{:?}", s.map(|s| *s.desc())));
                }
            }
            ProbeKind::ReaderGuardSlot => {
                let g = reader.read();
                let s = g.gfn_to_memslot(0, gfn);
                if !check_slot(gfn, s, e) {
                    return err(gfn, e, format!("{:?}", s.map(|s| *s.desc())));
                }
            }
            ProbeKind::VcpuGuardSlot => {
                let g = vcpu.read();
                let s = g.gfn_to_memslot(gfn);
                if !check_slot(gfn, s, e) {
                    return err(gfn, e, format!("{:?}", s.map(|s| *s.desc())));
                }
            }
        }
    }
    Ok(count)
}

fn readers_proceed_while_writer_is_parked(change: MemoryChange) {
    const LOOKUPS: usize = 100_000;
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let vm = leak_vm(BlockHooks {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(Some(release_rx)),
        flushes: AtomicUsize::new(0),
    });
    let ha = 0x7f00_0000_0000;
    let hb = 0x7f10_0000_0000;
    let hc = 0x7f20_0000_0000;
    let a = UserMemoryRegion::new(1, 0, 0x100 * PAGE, 0x100 * PAGE, ha);
    let b = UserMemoryRegion::new(2, KVM_MEM_LOG_DIRTY_PAGES, 0x400 * PAGE, 0x80 * PAGE, hb);
    let c = UserMemoryRegion::new(3, 0, 0xa00 * PAGE, 0x10 * PAGE, hc);
    for r in [&a, &b] {
        assert_eq!(vm.set_user_memory_region(r), Ok(Outcome::Changed(MemoryChange::Create)));
    }
    let a_desc = vm.gfn_to_slot_desc(0, 0x100).expect("slot A");
    let op = match change {
        MemoryChange::Delete => UserMemoryRegion::new(1, 0, 0, 0, 0),
        _ => UserMemoryRegion::new(1, 0, 0x800 * PAGE, 0x100 * PAGE, ha),
    };

    // What readers must see while the writer is parked in prepare.
    let mut probes = Vec::new();
    for g in (0x100..0x200).step_by(7) {
        probes.push((g, Expect::Invalid(a_desc)));
        probes.push((0x400 + (g & 0x7f), Expect::Hva(hb + (g & 0x7f) * PAGE)));
        probes.push((g + 0x700, Expect::NoSlot)); // A's new range (MOVE) is not visible yet
        probes.push((0xa00 + (g & 0xf), Expect::NoSlot)); // C is queued behind the writer lock
        probes.push((g - 0x100, Expect::NoSlot));
    }

    let kinds = [
        ProbeKind::VmHva,
        ProbeKind::SharedGuardSlot,
        ProbeKind::ReaderGuardSlot,
        ProbeKind::VcpuHva,
        ProbeKind::VcpuGuardSlot,
    ];
    let (result_tx, result_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut gos = Vec::new();
    for kind in kinds {
        let (go_tx, go_rx) = mpsc::channel();
        gos.push(go_tx);
        let (probes, result_tx, ready_tx) = (probes.clone(), result_tx.clone(), ready_tx.clone());
        thread::spawn(move || {
            let r = probe_loop(vm, kind, &probes, LOOKUPS, &ready_tx, &go_rx);
            let _ = result_tx.send((kind, r));
        });
    }
    for _ in kinds {
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("reader threads did not start");
    }

    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(vm.set_user_memory_region(&op));
    });
    let entered = entered_rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(entered, Ok(change), "the writer never reached prepare_memory_region");
    // The INVALID copy is published and its grace period is over.
    assert_eq!(vm.generation(0), Some(3), "generation while parked (2 creates + the INVALID publish)");
    assert_eq!(vm.hooks().flushes.load(SeqCst), 1, "flush_shadow_memslot before prepare");
    // A second writer queues behind the writer lock.
    let (c_tx, c_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = c_tx.send(vm.set_user_memory_region(&c));
    });

    let start = Instant::now();
    for go in &gos {
        go.send(()).expect("reader thread alive");
    }
    let deadline = start + Duration::from_secs(30);
    let mut failures = Vec::new();
    for _ in kinds {
        match result_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, Ok(n))) => assert_eq!(n, LOOKUPS),
            Ok((kind, Err(e))) => failures.push(format!("{kind:?}: {e}")),
            Err(_) => {
                drop(release_tx);
                panic!(
                    "readers did not finish {LOOKUPS} lookups each within 30 s while the writer was parked \
                     inside {change:?} (INVALID copy published, writer lock held): readers wait on the writer"
                );
            }
        }
    }
    let reader_time = start.elapsed();
    assert!(done_rx.try_recv() == Err(TryRecvError::Empty), "the parked {change:?} returned");
    assert!(c_rx.try_recv() == Err(TryRecvError::Empty), "a second writer got past the writer lock");
    release_tx.send(()).expect("writer still parked");
    let r = done_rx.recv_timeout(Duration::from_secs(30)).expect("the writer did not finish after release");
    assert_eq!(r, Ok(Outcome::Changed(change)));
    let r = c_rx.recv_timeout(Duration::from_secs(30)).expect("the second writer did not finish");
    assert_eq!(r, Ok(Outcome::Changed(MemoryChange::Create)));
    println!("{change:?}: {} x {LOOKUPS} lookups while the writer was parked took {reader_time:?}", kinds.len());
    assert!(failures.is_empty(), "wrong answers while the writer was parked: {failures:#?}");

    assert_eq!(vm.generation(0), Some(5));
    assert_eq!(vm.gfn_to_hva(0, 0x100), Err(HvaError::NoSlot));
    let moved = if change == MemoryChange::Move { Ok(ha + 5 * PAGE) } else { Err(HvaError::NoSlot) };
    assert_eq!(vm.gfn_to_hva(0, 0x805), moved);
    assert_eq!(vm.vcpu().gfn_to_hva(0x805), moved);
    assert_eq!(vm.gfn_to_hva(0, 0xa03), Ok(hc + 3 * PAGE));
    assert_eq!(vm.gfn_to_hva(0, 0x403), Ok(hb + 3 * PAGE));
}

#[test]
fn readers_never_wait_for_a_parked_delete() {
    let _w = watchdog("readers_never_wait_for_a_parked_delete", Duration::from_secs(120));
    readers_proceed_while_writer_is_parked(MemoryChange::Delete);
}

#[test]
fn readers_never_wait_for_a_parked_move() {
    let _w = watchdog("readers_never_wait_for_a_parked_move", Duration::from_secs(120));
    readers_proceed_while_writer_is_parked(MemoryChange::Move);
}

// ---------------------------------------------------------------------------
// Test 3: a grace period really waits
// ---------------------------------------------------------------------------

#[derive(Default)]
struct CountHooks {
    prepares: AtomicUsize,
    commits: AtomicUsize,
    flushes: AtomicUsize,
}

impl ArchHooks for CountHooks {
    type SlotData = ();

    fn prepare_memory_region(
        &self,
        _change: MemoryChange,
        _old: Option<&MemorySlot>,
        _new: Option<&mut SlotDraft<()>>,
    ) -> Result<(), Errno> {
        self.prepares.fetch_add(1, SeqCst);
        Ok(())
    }

    fn commit_memory_region(&self, _change: MemoryChange, _old: Option<&MemorySlot>, _new: Option<&MemorySlot>) {
        self.commits.fetch_add(1, SeqCst);
    }

    fn flush_shadow_memslot(&self, _slot: &MemorySlot) {
        self.flushes.fetch_add(1, SeqCst);
    }
}

type SetResult = Result<Outcome, memslots::Error>;

const GP_HVA: u64 = 0x7f00_0000_0000;
const GP_GFN: u64 = 0x100;

/// A VM with one slot (id 1, gfns 0x100..0x140) and its hook counters at 0.
fn grace_vm() -> &'static Vm<CountHooks> {
    let vm = leak_vm(CountHooks::default());
    let r = UserMemoryRegion::new(1, KVM_MEM_LOG_DIRTY_PAGES, GP_GFN * PAGE, 0x40 * PAGE, GP_HVA);
    assert_eq!(vm.set_user_memory_region(&r), Ok(Outcome::Changed(MemoryChange::Create)));
    let h = vm.hooks();
    for c in [&h.prepares, &h.commits, &h.flushes] {
        c.store(0, SeqCst);
    }
    vm
}

/// Starts `region` on another thread and checks that it is stuck in its
/// first grace period (INVALID copy published, generation in progress, no
/// hook past the publish called) for 200 ms, while `slot` stays readable.
fn start_blocked_update(
    name: &str,
    vm: &'static Vm<CountHooks>,
    region: UserMemoryRegion,
    slot: &MemorySlot,
    snapshot: SlotDesc,
    fresh_vcpu: &memslots::Vcpu<'static, CountHooks>,
) -> mpsc::Receiver<SetResult> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(vm.set_user_memory_region(&region));
    });
    // Wait until the writer published the INVALID copy (generation in progress).
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.generation(0).expect("as 0") & GEN_UPDATE_IN_PROGRESS == 0 {
        if let Ok(r) = rx.try_recv() {
            panic!("{name}: the update returned {r:?} while a reader held a guard");
        }
        assert!(Instant::now() < deadline, "{name}: the writer never started publishing");
        thread::sleep(Duration::from_millis(1));
    }
    match rx.recv_timeout(Duration::from_millis(200)) {
        Err(RecvTimeoutError::Timeout) => {}
        r => panic!("{name}: the update did not wait for the reader holding a guard: {r:?}"),
    }
    let h = vm.hooks();
    assert_eq!(h.flushes.load(SeqCst), 0, "{name}: flush_shadow_memslot ran before the grace period ended");
    assert_eq!(h.prepares.load(SeqCst), 0, "{name}: prepare_memory_region ran before the grace period ended");
    assert!(vm.generation(0).expect("as 0") & GEN_UPDATE_IN_PROGRESS != 0, "{name}: generation not in progress");
    // The held slot is intact.
    assert_eq!(*slot.desc(), snapshot, "{name}: the held slot changed under the reader");
    assert!(!slot.is_invalid());
    assert_eq!(slot.gfn_to_hva_unchecked(GP_GFN + 3), GP_HVA + 3 * PAGE);
    assert_eq!(slot.dirty_bitmap().map(memslots::DirtyBitmap::npages), Some(0x40), "{name}: dirty bitmap");
    // New sections see the INVALID copy and are not blocked.
    assert_eq!(vm.gfn_to_hva(0, GP_GFN + 3), Err(HvaError::Invalid), "{name}: fresh section");
    assert!(vm.read().gfn_to_memslot(0, GP_GFN).is_some_and(|s| s.is_invalid()), "{name}: fresh section");
    // (A vCPU created beforehand: creating one now could block, see
    // `registering_a_reader_inside_a_section_does_not_deadlock`.)
    assert_eq!(fresh_vcpu.gfn_to_hva(GP_GFN + 3), Err(HvaError::Invalid), "{name}: fresh vCPU");
    rx
}

fn assert_completes(name: &str, vm: &Vm<CountHooks>, rx: &mpsc::Receiver<SetResult>, change: MemoryChange) {
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{name}: update still blocked: {e}"));
    assert_eq!(r, Ok(Outcome::Changed(change)), "{name}");
    let h = vm.hooks();
    assert_eq!(h.flushes.load(SeqCst), 1, "{name}");
    assert_eq!(h.prepares.load(SeqCst), 1, "{name}");
    assert_eq!(h.commits.load(SeqCst), 1, "{name}");
    assert_eq!(vm.generation(0), Some(3), "{name}: create + INVALID + final publish");
    assert_eq!(vm.gfn_to_hva(0, GP_GFN + 3), Err(HvaError::NoSlot), "{name}");
}

/// A guard's view of the slot it returned: the original or (the same guard
/// re-reads the active set) the INVALID copy, never anything else.
fn same_or_invalid_copy(s: Option<&MemorySlot>, orig: &MemorySlot) -> bool {
    s.is_some_and(|s| {
        std::ptr::eq(s, orig) || (s.is_invalid() && s.base_gfn == orig.base_gfn && s.npages == orig.npages)
    })
}

#[test]
fn grace_period_waits_for_a_shared_guard() {
    let _w = watchdog("grace_period_waits_for_a_shared_guard", Duration::from_secs(120));
    let name = "vm.read() guard, DELETE";
    let vm = grace_vm();
    let fresh = vm.vcpu();
    let guard = vm.read();
    let slot = guard.gfn_to_memslot(0, GP_GFN + 1).expect("slot");
    let snapshot = *slot.desc();
    let rx = start_blocked_update(name, vm, UserMemoryRegion::new(1, 0, 0, 0, 0), slot, snapshot, &fresh);
    assert!(same_or_invalid_copy(guard.gfn_to_memslot(0, GP_GFN + 2), slot), "{name}");
    assert_eq!(*slot.desc(), snapshot);
    drop(guard);
    assert_completes(name, vm, &rx, MemoryChange::Delete);
}

#[test]
fn grace_period_waits_for_a_reader_guard() {
    let _w = watchdog("grace_period_waits_for_a_reader_guard", Duration::from_secs(120));
    let name = "Reader guard, DELETE";
    let vm = grace_vm();
    let fresh = vm.vcpu();
    let reader = vm.reader();
    let guard = reader.read();
    let slot = guard.slots(0).next().expect("slot");
    let snapshot = *slot.desc();
    let rx = start_blocked_update(name, vm, UserMemoryRegion::new(1, 0, 0, 0, 0), slot, snapshot, &fresh);
    assert!(same_or_invalid_copy(guard.gfn_to_memslot(0, GP_GFN), slot), "{name}");
    drop(guard);
    assert_completes(name, vm, &rx, MemoryChange::Delete);
}

#[test]
fn grace_period_waits_for_a_vcpu_guard() {
    let _w = watchdog("grace_period_waits_for_a_vcpu_guard", Duration::from_secs(120));
    let name = "vCPU guard, DELETE";
    let vm = grace_vm();
    let fresh = vm.vcpu();
    let vcpu = vm.vcpu();
    // Fill the vCPU cache first: the guard below then returns the cached slot.
    assert_eq!(vcpu.gfn_to_hva(GP_GFN + 1), Ok(GP_HVA + PAGE));
    let guard = vcpu.read();
    let slot = guard.gfn_to_memslot(GP_GFN + 1).expect("slot");
    let snapshot = *slot.desc();
    let rx = start_blocked_update(name, vm, UserMemoryRegion::new(1, 0, 0, 0, 0), slot, snapshot, &fresh);
    assert!(same_or_invalid_copy(guard.gfn_to_memslot(GP_GFN + 2), slot), "{name}");
    drop(guard);
    assert_completes(name, vm, &rx, MemoryChange::Delete);
    assert_eq!(vcpu.gfn_to_hva(GP_GFN + 1), Err(HvaError::NoSlot), "{name}: stale vCPU cache");
}

#[test]
fn grace_period_waits_for_a_guard_during_a_move() {
    let _w = watchdog("grace_period_waits_for_a_guard_during_a_move", Duration::from_secs(120));
    let name = "Reader guard, MOVE";
    let vm = grace_vm();
    let fresh = vm.vcpu();
    let reader = vm.reader();
    let guard = reader.read();
    let slot = guard.gfn_to_memslot(0, GP_GFN + 1).expect("slot");
    let snapshot = *slot.desc();
    let to = UserMemoryRegion::new(1, KVM_MEM_LOG_DIRTY_PAGES, 0x1000 * PAGE, 0x40 * PAGE, GP_HVA);
    let rx = start_blocked_update(name, vm, to, slot, snapshot, &fresh);
    assert_eq!(vm.gfn_to_hva(0, 0x1003), Err(HvaError::NoSlot), "{name}: new range visible before the grace period");
    drop(guard);
    assert_completes(name, vm, &rx, MemoryChange::Move);
    assert_eq!(vm.gfn_to_hva(0, 0x1003), Ok(GP_HVA + 3 * PAGE), "{name}");
}

// ---------------------------------------------------------------------------
// Reader handles and grace periods
// ---------------------------------------------------------------------------

/// A thread inside a read section (on a registered record) creates a vCPU
/// handle while a writer is in a grace period. The writer waits for the
/// section; the section must not wait for the writer. (Fails at commit
/// 68a84e9, whose `Srcu::synchronize` held the registry lock while waiting.)
#[test]
fn registering_a_reader_inside_a_section_does_not_deadlock() {
    let vm = grace_vm();
    let (holding_tx, holding_rx) = mpsc::channel();
    let (proceed_tx, proceed_rx) = mpsc::channel::<()>();
    let (registered_tx, registered_rx) = mpsc::channel();
    thread::spawn(move || {
        let reader = vm.reader();
        let guard = reader.read();
        let hva = guard.gfn_to_hva(0, GP_GFN);
        let _ = holding_tx.send(hva);
        let _ = proceed_rx.recv_timeout(Duration::from_secs(60));
        // Still inside the section: a new vCPU comes up on this thread.
        let vcpu = vm.vcpu();
        let _ = registered_tx.send(vcpu.gfn_to_hva(GP_GFN));
        drop(guard);
    });
    assert_eq!(holding_rx.recv_timeout(Duration::from_secs(30)), Ok(Ok(GP_HVA)));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(vm.set_user_memory_region(&UserMemoryRegion::new(1, 0, 0, 0, 0)));
    });
    // The writer is waiting for the section.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.generation(0).expect("as 0") & GEN_UPDATE_IN_PROGRESS == 0 {
        assert!(Instant::now() < deadline, "the writer never started publishing");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv() == Err(TryRecvError::Empty), "the delete did not wait for the section");
    proceed_tx.send(()).expect("reader thread alive");
    match registered_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => assert_eq!(r, Err(HvaError::Invalid), "new vCPU during the delete"),
        Err(e) => panic!(
            "vm.vcpu() inside a read section did not return within 5 s while a writer waited for that section \
             ({e}): reader and writer are deadlocked (the writer holds the reader registry lock during its \
             grace period)"
        ),
    }
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("the delete did not finish");
    assert_eq!(r, Ok(Outcome::Changed(MemoryChange::Delete)));
}

/// Without holding a section: creating a reader handle must not wait for a
/// grace period that is held up by another thread's (long) read section.
#[test]
fn registering_a_reader_does_not_wait_for_a_grace_period() {
    let vm = grace_vm();
    let reader = vm.reader();
    let guard = reader.read();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(vm.set_user_memory_region(&UserMemoryRegion::new(1, 0, 0, 0, 0)));
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.generation(0).expect("as 0") & GEN_UPDATE_IN_PROGRESS == 0 {
        assert!(Instant::now() < deadline, "the writer never started publishing");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    let (reg_tx, reg_rx) = mpsc::channel();
    thread::spawn(move || {
        let vcpu = vm.vcpu();
        let _ = reg_tx.send(vcpu.gfn_to_hva(GP_GFN));
    });
    let r = reg_rx.recv_timeout(Duration::from_secs(2));
    drop(guard);
    assert_eq!(
        r,
        Ok(Err(HvaError::Invalid)),
        "vm.vcpu() on another thread did not return within 2 s while a writer waited for this thread's section"
    );
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).expect("delete"), Ok(Outcome::Changed(MemoryChange::Delete)));
}
