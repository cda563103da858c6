//! Operation traces (the format of `crates/memslots-cli/tests/conformance/README.md`),
//! replay onto a [`Vm`], and a random trace generator for differential testing.
//!
//! ```text
//! set SLOT FLAGS GPA SIZE HVA          KVM_SET_USER_MEMORY_REGION
//! get_dirty_log SLOT                   KVM_GET_DIRTY_LOG
//! clear_dirty_log SLOT FIRST NUM       KVM_CLEAR_DIRTY_LOG, all-zero bitmap
//! enable_manual_protect [ARGS]         KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2), ARGS default 1
//! ```
//!
//! ## Configuration header
//!
//! A trace may say which VM it was recorded on, in comment lines before its
//! first operation (see [`parse_header`]):
//!
//! ```text
//! # config: address-spaces=1 user-slots=32764
//! ```
//!
//! ## Numbers at or above 2^63
//!
//! The conformance traces were recorded by a tool that parsed numbers as
//! signed 64-bit values, saturating everything at or above 2^63 to
//! `0x7fff_ffff_ffff_ffff` (C's `strtoll`). Replaying them with that rule on
//! this host's KVM reproduces every `.expected` file; replaying them with the
//! literal values diverges on exactly the requests where saturation changes the
//! verdict (a delete, size 0, with `guest_phys_addr = 0x8000_0000_0000_0000`:
//! accepted literally, EINVAL once saturated to an unaligned address).
//! [`NumberSyntax::Recorder`] (the default of `memslots replay`) reproduces the
//! recording; [`NumberSyntax::Exact`] takes the literal `u64`.

use crate::arch::ArchHooks;
use crate::config::{Config, KVM_USER_MEM_SLOTS};
use crate::errno::Errno;
use crate::region::UserMemoryRegion;
use crate::vm::Vm;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// One trace operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `KVM_SET_USER_MEMORY_REGION` (v1).
    Set(UserMemoryRegion),
    /// `KVM_GET_DIRTY_LOG`.
    GetDirtyLog {
        /// Raw slot field.
        slot: u32,
    },
    /// `KVM_CLEAR_DIRTY_LOG` with an all-zero bitmap.
    ClearDirtyLog {
        /// Raw slot field.
        slot: u32,
        /// First page (multiple of 64).
        first_page: u64,
        /// Number of pages.
        num_pages: u32,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`.
    EnableManualProtect {
        /// `args[0]`.
        args: u64,
    },
    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes, known to later `set2` ops
    /// as guest_memfd number `index` (the replayer creates the file; the
    /// library sees fd [`GMEM_FD_BASE`]` + index` with the size declared).
    CreateGuestMemfd {
        /// The trace's name for the file.
        index: u32,
        /// Bytes.
        size: u64,
    },
    /// `KVM_SET_USER_MEMORY_REGION2` bound to guest_memfd `gmem` at
    /// `offset` (flags as given: add `KVM_MEM_GUEST_MEMFD` to bind). A
    /// `gmem` no `gmem` op created is a closed fd: `EBADF` for a binding.
    Set2 {
        /// The v1 fields.
        region: UserMemoryRegion,
        /// The trace's guest_memfd number.
        gmem: u32,
        /// `guest_memfd_offset`.
        offset: u64,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, bytes)`.
    EnableDirtyRing {
        /// `args[0]`.
        bytes: u64,
    },
    /// `KVM_RESET_DIRTY_RINGS`.
    ResetDirtyRings,
    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)`.
    EnableRingWithBitmap,
}

/// The fd number the library gives trace guest_memfd number `i` (`GMEM_FD_BASE + i`).
pub const GMEM_FD_BASE: u32 = 1 << 20;

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Set(r) => write!(
                f,
                "set {:#x} {:#x} {:#x} {:#x} {:#x}",
                r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr
            ),
            Op::GetDirtyLog { slot } => write!(f, "get_dirty_log {slot:#x}"),
            Op::ClearDirtyLog { slot, first_page, num_pages } => {
                write!(f, "clear_dirty_log {slot:#x} {first_page} {num_pages}")
            }
            Op::EnableManualProtect { args: 1 } => write!(f, "enable_manual_protect"),
            Op::EnableManualProtect { args } => write!(f, "enable_manual_protect {args}"),
            Op::CreateGuestMemfd { index, size } => write!(f, "gmem {index} {size:#x}"),
            Op::Set2 { region: r, gmem, offset } => write!(
                f,
                "set2 {:#x} {:#x} {:#x} {:#x} {:#x} {gmem} {offset:#x}",
                r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr
            ),
            Op::EnableDirtyRing { bytes } => write!(f, "enable_dirty_ring {bytes:#x}"),
            Op::ResetDirtyRings => write!(f, "reset_dirty_rings"),
            Op::EnableRingWithBitmap => write!(f, "enable_ring_with_bitmap"),
        }
    }
}

/// A verdict: `ok` or an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Success.
    Ok,
    /// Failure with this errno.
    Err(Errno),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Ok => f.write_str("ok"),
            Verdict::Err(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl Verdict {
    /// Parses `ok` or an errno name.
    pub fn parse(s: &str) -> Option<Verdict> {
        match s.trim() {
            "ok" => Some(Verdict::Ok),
            other => Errno::from_name(other).map(Verdict::Err),
        }
    }
}

impl<T> From<Result<T, crate::Error>> for Verdict {
    fn from(r: Result<T, crate::Error>) -> Self {
        match r {
            Ok(_) => Verdict::Ok,
            Err(e) => Verdict::Err(e.errno()),
        }
    }
}

/// A trace line that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// How trace numbers at or above 2^63 are read (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NumberSyntax {
    /// As the conformance recorder read them: saturated to `i64::MAX`.
    #[default]
    Recorder,
    /// The literal `u64`.
    Exact,
}

fn num_with(tok: Option<&str>, what: &str, syntax: NumberSyntax) -> Result<u64, String> {
    let t = tok.ok_or_else(|| alloc::format!("missing {what}"))?;
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    let v = r.map_err(|_| alloc::format!("bad number {t:?} for {what}"))?;
    Ok(match syntax {
        NumberSyntax::Recorder => v.min(i64::MAX.unsigned_abs()),
        NumberSyntax::Exact => v,
    })
}

/// Parses one line with the recorder's number syntax; `Ok(None)` for blank
/// lines and comments.
pub fn parse_line(line: &str) -> Result<Option<Op>, String> {
    parse_line_with(line, NumberSyntax::Recorder)
}

/// Parses one line; `Ok(None)` for blank lines and comments.
pub fn parse_line_with(line: &str, syntax: NumberSyntax) -> Result<Option<Op>, String> {
    let num = |tok: Option<&str>, what: &str| num_with(tok, what, syntax);
    let num32 = |tok: Option<&str>, what: &str| -> Result<u32, String> {
        let v = num(tok, what)?;
        u32::try_from(v).map_err(|_| alloc::format!("{what} {v:#x} does not fit in 32 bits"))
    };
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut it = line.split_whitespace();
    let cmd = it.next().unwrap_or_default();
    let op = match cmd {
        "set" => Op::Set(UserMemoryRegion {
            slot: num32(it.next(), "slot")?,
            flags: num32(it.next(), "flags")?,
            guest_phys_addr: num(it.next(), "gpa")?,
            memory_size: num(it.next(), "size")?,
            userspace_addr: num(it.next(), "hva")?,
        }),
        "get_dirty_log" => Op::GetDirtyLog { slot: num32(it.next(), "slot")? },
        "clear_dirty_log" => Op::ClearDirtyLog {
            slot: num32(it.next(), "slot")?,
            first_page: num(it.next(), "first page")?,
            num_pages: num32(it.next(), "number of pages")?,
        },
        "enable_manual_protect" => {
            let args = match it.next() {
                Some(t) => num(Some(t), "args")?,
                None => 1,
            };
            Op::EnableManualProtect { args }
        }
        "gmem" => {
            Op::CreateGuestMemfd { index: num32(it.next(), "guest_memfd number")?, size: num(it.next(), "size")? }
        }
        "set2" => Op::Set2 {
            region: UserMemoryRegion {
                slot: num32(it.next(), "slot")?,
                flags: num32(it.next(), "flags")?,
                guest_phys_addr: num(it.next(), "gpa")?,
                memory_size: num(it.next(), "size")?,
                userspace_addr: num(it.next(), "hva")?,
            },
            gmem: num32(it.next(), "guest_memfd number")?,
            offset: num(it.next(), "guest_memfd offset")?,
        },
        "enable_dirty_ring" => Op::EnableDirtyRing { bytes: num(it.next(), "ring bytes")? },
        "reset_dirty_rings" => Op::ResetDirtyRings,
        "enable_ring_with_bitmap" => Op::EnableRingWithBitmap,
        other => return Err(alloc::format!("unknown operation {other:?}")),
    };
    if let Some(extra) = it.next() {
        return Err(alloc::format!("unexpected {extra:?} after {cmd}"));
    }
    Ok(Some(op))
}

/// Parses a whole trace with the recorder's number syntax: `(line number, op)` pairs.
pub fn parse(text: &str) -> Result<Vec<(usize, Op)>, ParseError> {
    parse_with(text, NumberSyntax::Recorder)
}

/// Parses a whole trace: `(line number, op)` pairs.
pub fn parse_with(text: &str, syntax: NumberSyntax) -> Result<Vec<(usize, Op)>, ParseError> {
    let mut ops = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line_with(line, syntax) {
            Ok(Some(op)) => ops.push((i + 1, op)),
            Ok(None) => {}
            Err(message) => return Err(ParseError { line: i + 1, message }),
        }
    }
    Ok(ops)
}

/// The VM a trace was recorded on, from its `# config:` header lines: each
/// field is `None` where the header does not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// `address-spaces=N` (1..=64): the VM's address spaces.
    pub address_spaces: Option<u16>,
    /// `user-slots=N` (1..=32764): user slots per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub user_slots: Option<u16>,
    /// `guest-memfd=0|1`: the VM takes guest_memfd slots ([`Config::guest_memfd`]).
    pub guest_memfd: Option<bool>,
}

impl TraceConfig {
    /// `config` with the fields this header gives replaced.
    #[must_use]
    pub fn apply_to(&self, mut config: Config) -> Config {
        if let Some(n) = self.address_spaces {
            config = config.with_address_spaces(n);
        }
        if let Some(n) = self.user_slots {
            config = config.with_user_slots(n);
        }
        if let Some(g) = self.guest_memfd {
            config = config.with_guest_memfd(g);
        }
        config
    }
}

/// Reads the configuration header of a trace: comment lines
/// `# config: KEY=VALUE ...` before the first operation, with the keys
/// `address-spaces` (1..=64) and `user-slots` (1..=32764). Other comments are
/// ignored; an unknown key, a bad or out-of-range value, a key given twice or
/// a `# config:` line after the first operation is an error.
pub fn parse_header(text: &str) -> Result<TraceConfig, ParseError> {
    let mut config = TraceConfig::default();
    let mut seen_op = false;
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| ParseError { line: i + 1, message };
        let line = line.trim();
        let Some(comment) = line.strip_prefix('#') else {
            seen_op |= !line.is_empty();
            continue;
        };
        let Some(pairs) = comment.trim_start().strip_prefix("config:") else { continue };
        if seen_op {
            return Err(err("a `# config:` header must come before the first operation".into()));
        }
        for pair in pairs.split_whitespace() {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| err(alloc::format!("expected KEY=VALUE, found {pair:?}")))?;
            if key == "guest-memfd" {
                let g = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(err(alloc::format!("guest-memfd must be 0 or 1, not {value:?}"))),
                };
                if config.guest_memfd.replace(g).is_some() {
                    return Err(err("guest-memfd is given twice".into()));
                }
                continue;
            }
            let (field, max) = match key {
                "address-spaces" => (&mut config.address_spaces, 64),
                "user-slots" => (&mut config.user_slots, KVM_USER_MEM_SLOTS),
                _ => {
                    return Err(err(alloc::format!(
                        "unknown configuration key {key:?} (known: address-spaces, user-slots, guest-memfd)"
                    )))
                }
            };
            let n = value
                .parse::<u16>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| err(alloc::format!("{key} must be a number in 1..={max}, not {value:?}")))?;
            if field.replace(n).is_some() {
                return Err(err(alloc::format!("{key} is given twice")));
            }
        }
    }
    Ok(config)
}

/// Applies `op` to `vm` and returns the verdict KVM would give.
pub fn apply<H: ArchHooks>(vm: &Vm<H>, op: &Op) -> Verdict {
    match *op {
        Op::Set(r) => vm.set_user_memory_region(&r).into(),
        Op::GetDirtyLog { slot } => vm.get_dirty_log_vec(slot).into(),
        Op::ClearDirtyLog { slot, first_page, num_pages } => {
            let zeros = vec![0u64; crate::dirty::words_for(u64::from(num_pages))];
            vm.clear_dirty_log(slot, first_page, num_pages, &zeros).into()
        }
        Op::EnableManualProtect { args } => vm.enable_manual_dirty_log_protect(args).into(),
        Op::CreateGuestMemfd { index, size } => {
            vm.declare_guest_memfd(GMEM_FD_BASE.saturating_add(index), size);
            Verdict::Ok
        }
        Op::Set2 { region, gmem, offset } => {
            let fd = GMEM_FD_BASE.saturating_add(gmem);
            let r = crate::UserMemoryRegion2 {
                guest_memfd: fd,
                guest_memfd_offset: offset,
                ..crate::UserMemoryRegion2::from(region)
            };
            // A guest_memfd the trace never created is a closed fd: the
            // kernel's fget in kvm_gmem_bind fails (EBADF).
            if !vm.guest_memfd_declared(fd) {
                vm.declare_fd_closed(fd);
            }
            vm.set_user_memory_region2(&r).into()
        }
        Op::EnableDirtyRing { bytes } => vm.enable_dirty_log_ring(bytes).into(),
        Op::ResetDirtyRings => vm.reset_dirty_rings().into(),
        Op::EnableRingWithBitmap => vm.enable_dirty_log_ring_with_bitmap().into(),
    }
}

/// A small deterministic PRNG (SplitMix64), so traces are reproducible from a
/// seed without a dependency in the `no_std` core.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub const fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// One element of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        #[allow(clippy::cast_possible_truncation)]
        let i = self.below(items.len() as u64) as usize;
        items[i]
    }
}

/// Random operations that reach every check of `KVM_SET_USER_MEMORY_REGION`
/// and the dirty-log ioctls, mostly reusing a few slots and addresses so that
/// creates, moves, flag changes, deletes and overlaps are frequent.
#[derive(Clone, Debug)]
pub struct Generator {
    rng: Rng,
    nr_address_spaces: u16,
    user_slots: u16,
    /// Slots (raw) the generator used, to aim dirty-log ops and deletes.
    known: Vec<(u32, u64, u64, u64)>,
}

impl Generator {
    /// Generator for a VM with `nr_address_spaces` and `user_slots`.
    pub fn new(seed: u64, nr_address_spaces: u16, user_slots: u16) -> Self {
        Generator { rng: Rng::new(seed), nr_address_spaces, user_slots, known: Vec::new() }
    }

    fn slot(&mut self) -> u32 {
        let r = &mut self.rng;
        let as_id = if r.chance(1, 20) {
            u32::from(self.nr_address_spaces) + u32::try_from(r.below(2)).unwrap_or(0)
        } else {
            u32::try_from(r.below(u64::from(self.nr_address_spaces))).unwrap_or(0)
        };
        let id = match r.below(40) {
            0 => u32::from(self.user_slots),
            1 => u32::from(self.user_slots) - 1,
            2 => 0xffff,
            3 => 32767,
            _ => u32::try_from(r.below(12)).unwrap_or(0),
        };
        (as_id << 16) | id
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let kind = self.rng.below(100);
        if kind < 6 {
            let slot = self.reuse_slot();
            return Op::GetDirtyLog { slot };
        }
        if kind < 11 {
            let slot = self.reuse_slot();
            let first_page = match self.rng.below(6) {
                0 => self.rng.below(200),
                1 => 64,
                2 => 128,
                _ => 0,
            };
            let num_pages = match self.rng.below(6) {
                0 => 64,
                1 => self.rng.below(300),
                2 => 0,
                _ => self.known_npages(slot).unwrap_or(8),
            };
            return Op::ClearDirtyLog { slot, first_page, num_pages: u32::try_from(num_pages).unwrap_or(0) };
        }
        if kind < 13 {
            let args = self.rng.pick(&[0, 1, 1, 1, 3, 2, 4, 5, 7]);
            return Op::EnableManualProtect { args };
        }
        Op::Set(self.region())
    }

    fn reuse_slot(&mut self) -> u32 {
        if !self.known.is_empty() && self.rng.chance(4, 5) {
            #[allow(clippy::cast_possible_truncation)]
            let i = self.rng.below(self.known.len() as u64) as usize;
            self.known[i].0
        } else {
            self.slot()
        }
    }

    fn known_npages(&self, slot: u32) -> Option<u64> {
        self.known.iter().rev().find(|k| k.0 == slot).map(|k| k.2 >> 12)
    }

    fn region(&mut self) -> UserMemoryRegion {
        const PAGE: u64 = 0x1000;
        // Reuse a known slot with the same size/hva (legal moves, flag changes, deletes)...
        if !self.known.is_empty() && self.rng.chance(1, 2) {
            #[allow(clippy::cast_possible_truncation)]
            let i = self.rng.below(self.known.len() as u64) as usize;
            let (slot, gpa, size, hva) = self.known[i];
            let flags = self.flags();
            let r = &mut self.rng;
            let (gpa, size) = match r.below(8) {
                0 => (gpa, 0),                        // delete
                1 => (r.below(64) * 0x10000, size),   // move
                2 => (gpa + r.below(4) * PAGE, size), // small move (overlaps itself)
                3 => (gpa, size + PAGE),              // illegal size change
                _ => (gpa, size),                     // flags only / no-op / recreate
            };
            let hva = if r.chance(1, 12) { hva + PAGE } else { hva };
            return UserMemoryRegion { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva };
        }
        let slot = self.slot();
        let flags = self.flags();
        let r = &mut self.rng;
        let gpa = match r.below(30) {
            0 => r.below(64) * 0x10000 + 0x800, // unaligned
            1 => 0xffff_ffff_ffff_f000,         // wraps
            2 => 0x8000_0000_0000_0000,         // above max gfn
            3 => 0x0000_ffff_ffff_f000,         // the last 48-bit page
            4 => 0x0000_1000_0000_0000,         // 2^44
            _ => r.below(64) * 0x10000,
        };
        let size = match r.below(30) {
            0 => 0,
            1 => r.below(8) * PAGE + 1, // unaligned
            2 => 0x7fff_ffff_f000,      // largest slot
            3 => 0x8000_0000_0000,      // one page too many... and more
            4 => 0x0800_0000_0000,      // 2^31 pages: one too many
            5 => 0xffff_ffff_ffff_f000, // absurd
            _ => (1 + r.below(8)) * PAGE,
        };
        let hva = match r.below(30) {
            0 => 0x7fff_ffff_f000,      // at the limit
            1 => 0x7fff_ffff_e000,      // one page below the limit
            2 => 0xffff_8000_0000_0000, // kernel address
            3 => 0x1000_0008,           // unaligned
            4 => 0xffff_ffff_ffff_f000, // wraps
            _ => 0x1000_0000 + r.below(64) * PAGE,
        };
        // Giant slots never log: their bitmaps would be 256 MiB on each side.
        let flags = if size >= 0x100_0000 { flags & !1 } else { flags };
        if size != 0 && size < 0x100_0000 {
            self.known.push((slot, gpa, size, hva));
            if self.known.len() > 48 {
                self.known.remove(0);
            }
        }
        UserMemoryRegion { slot, flags, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva }
    }

    fn flags(&mut self) -> u32 {
        let r = &mut self.rng;
        match r.below(20) {
            0 => 4,
            1 => 8,
            2 => 1 << 16,
            3 => 5,
            4 | 5 => 2,
            6 => 3,
            7..=11 => 1,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_gives_address_spaces_and_user_slots() {
        let text = "# recorded on a host without SMM\n# config: address-spaces=1 user-slots=32764\n\nset 0 0 0 0 0\n";
        let h = parse_header(text).unwrap();
        assert_eq!(h, TraceConfig { address_spaces: Some(1), user_slots: Some(32764), guest_memfd: None });
        let c = h.apply_to(Config::x86_64());
        assert_eq!((c.nr_address_spaces, c.user_slots), (1, 32764));
        assert!(c.validate().is_ok());
        assert_eq!(parse_header("set 0 0 0 0 0\n").unwrap(), TraceConfig::default());
        assert_eq!(parse_header("#config: user-slots=8\n").unwrap().user_slots, Some(8));
        // Comments that are not headers are ignored, before and after ops.
        assert!(parse_header("# configuration notes\nset 0 0 0 0 0\n# config notes\n").is_ok());
    }

    #[test]
    fn header_errors_name_the_line() {
        for (text, line, words) in [
            ("# config: address-spaces=0\n", 1, "address-spaces must be a number in 1..=64"),
            ("# config: user-slots=32765\n", 1, "user-slots must be a number in 1..=32764"),
            ("# config: user-slots=x\n", 1, "user-slots must be"),
            ("\n# config: smm\n", 2, "expected KEY=VALUE"),
            ("# config: slots=3\n", 1, "unknown configuration key"),
            ("# config: user-slots=3 user-slots=4\n", 1, "given twice"),
            ("set 0 0 0 0 0\n# config: user-slots=3\n", 2, "before the first operation"),
        ] {
            let e = parse_header(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}");
            assert!(e.message.contains(words), "{text:?}: {}", e.message);
        }
    }

    #[test]
    fn issue_13_operations_round_trip() {
        for line in [
            "gmem 3 0x400000",
            "set2 0x1 0x4 0x100000 0x200000 0x10000000 3 0x1000",
            "enable_dirty_ring 0x1000",
            "reset_dirty_rings",
            "enable_ring_with_bitmap",
        ] {
            let op = parse_line(line).unwrap().unwrap();
            assert_eq!(alloc::format!("{op}"), line);
        }
        let h = parse_header("# config: guest-memfd=1\nset 0 0 0 0 0\n").unwrap();
        assert_eq!(h.guest_memfd, Some(true));
        assert!(parse_header("# config: guest-memfd=2\n").is_err());
    }
}
