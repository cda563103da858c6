//! Fuzzes the conformance trace parser (`memslots::trace`) and replay:
//!
//! - arbitrary text (the input, lossily decoded as UTF-8) must parse or be
//!   refused without panicking, line by line and whole, with both number
//!   syntaxes, and the two must agree on which lines are ops;
//! - every parsed op round-trips through its `Display` (`memslots replay`
//!   prints ops in divergence reports): formatting then parsing gives the
//!   same op (with either syntax for recorder-parsed ops, whose values are
//!   below 2^63; with the exact syntax for exactly parsed ones);
//! - verdict words round-trip the same way;
//! - replaying the parsed ops on a fresh `Vm` (as `memslots replay` does)
//!   never panics, and a second replay on another fresh `Vm` gives the
//!   same verdicts.
//!
//! Replay masks LOG_DIRTY_PAGES off `set` ops larger than 16 MiB: a logging
//! slot of 2^31 pages allocates two 256 MiB bitmaps (as KVM would), which is
//! an out-of-memory report under libFuzzer, not a bug.
//!
//! Run: `cd crates/memslots/fuzz && cargo +nightly fuzz run trace`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use memslots::trace::{self, NumberSyntax, Op, Verdict};
use memslots::{Config, Vm, KVM_MEM_LOG_DIRTY_PAGES};

/// Most ops replayed per input.
const MAX_REPLAY: usize = 256;
/// Above this size a `set` op's LOG_DIRTY_PAGES flag is masked for replay.
const BIG: u64 = 16 << 20;

/// `op`, printed, parses back to itself with each of `syntaxes`.
fn check_round_trip(op: &Op, syntaxes: &[NumberSyntax]) {
    let text = op.to_string();
    for &syntax in syntaxes {
        let back = trace::parse_line_with(&text, syntax);
        assert_eq!(back, Ok(Some(*op)), "{op:?} printed as {text:?} parses back differently ({syntax:?})");
    }
}

fn replay(cfg: Config, ops: &[Op]) -> Vec<Verdict> {
    let vm = Vm::new(cfg).expect("valid config");
    ops.iter()
        .take(MAX_REPLAY)
        .map(|op| {
            let op = match *op {
                Op::Set(mut r) if r.memory_size > BIG => {
                    r.flags &= !KVM_MEM_LOG_DIRTY_PAGES;
                    Op::Set(r)
                }
                op => op,
            };
            trace::apply(&vm, &op)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Line by line: both syntaxes agree on what is an op (only values differ).
    for line in text.lines() {
        let exact = trace::parse_line_with(line, NumberSyntax::Exact);
        let recorder = trace::parse_line(line);
        assert_eq!(
            exact.as_ref().map(Option::is_some).ok(),
            recorder.as_ref().map(Option::is_some).ok(),
            "syntaxes disagree on {line:?}"
        );
        // Exactly read values may be at or above 2^63 (which the recorder's
        // syntax saturates); recorder-read ones are below, so both syntaxes
        // read them back.
        for op in exact.iter().flatten() {
            check_round_trip(op, &[NumberSyntax::Exact]);
        }
        for op in recorder.iter().flatten() {
            check_round_trip(op, &[NumberSyntax::Exact, NumberSyntax::Recorder]);
        }
        for word in line.split_whitespace() {
            if let Some(v) = Verdict::parse(word) {
                assert_eq!(Verdict::parse(&v.to_string()), Some(v), "verdict {word:?}");
            }
        }
    }
    // Whole traces, with the recorder's syntax (the default of `memslots replay`).
    let exact = trace::parse_with(&text, NumberSyntax::Exact);
    let Ok(parsed) = trace::parse(&text) else {
        assert!(exact.is_err(), "only the recorder syntax refused the trace");
        return;
    };
    let exact = exact.expect("only the exact syntax refused the trace");
    assert_eq!(exact.len(), parsed.len());
    let ops: Vec<Op> = parsed.into_iter().map(|(_, op)| op).collect();
    let nr = 1 + u16::from(data.first().copied().unwrap_or(0) & 1);
    let cfg = Config::x86_64().with_address_spaces(nr).with_user_slots(memslots::KVM_USER_MEM_SLOTS);
    let first = replay(cfg, &ops);
    assert_eq!(first, replay(cfg, &ops), "replay is not deterministic");
    let exact_ops: Vec<Op> = exact.into_iter().map(|(_, op)| op).collect();
    let _ = replay(cfg, &exact_ops);
});
