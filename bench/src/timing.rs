//! Timed loops shared by the criterion benches and `memslots perf`: one timer
//! around many operations, so the timer's own cost is amortised.

use std::time::{Duration, Instant};

use crate::layout::TABLE;
use crate::stats::{ns, Stat};

/// Runs `op(i)` for `i` in `0..iters` under one timer. For nanosecond
/// operations under criterion's `iter_custom`: the counter stays in a
/// register (one captured by a `Bencher::iter` closure lives in memory and
/// adds a store-to-load round trip to every iteration).
#[inline(always)]
pub fn time_loop(iters: u64, mut op: impl FnMut(usize)) -> Duration {
    let iters = usize::try_from(iters).unwrap_or(usize::MAX);
    let t = Instant::now();
    for i in 0..iters {
        op(i);
    }
    t.elapsed()
}

/// [`time_loop`] with the index masked into a [`TABLE`]-entry table:
/// `op(i & (TABLE - 1))`.
#[inline(always)]
pub fn time_table(iters: u64, mut op: impl FnMut(usize)) -> Duration {
    time_loop(iters, |i| op(i & (TABLE - 1)))
}

/// `iters` rounds of an untimed `setup` and a timed `op`; the total of the
/// timed parts (for criterion's `iter_custom`).
pub fn time_after(iters: u64, mut setup: impl FnMut(), mut op: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        setup();
        let t = Instant::now();
        op();
        total += t.elapsed();
    }
    total
}

/// Slots changed per timed create/delete batch at `n` slots: at most
/// `n / 10` (the slot count stays within 10 % of `n`), at least 1, at most `max`.
pub fn batch_len(n: u32, max: u32) -> u32 {
    (n / 10).clamp(1, max)
}

/// Times `iters` operations `op(k)` in batches of `batch` distinct slots
/// taken in turn from `perm` (a permutation, cycled from `*cursor`): untimed
/// `prepare(k)` for the whole batch, the batch of `op` under one timer, then
/// untimed `restore(k)` for the whole batch.
pub fn time_batched(
    iters: u64,
    perm: &[u32],
    cursor: &mut usize,
    batch: u32,
    mut prepare: impl FnMut(u32),
    mut op: impl FnMut(u32),
    mut restore: impl FnMut(u32),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut ks = Vec::new();
    while left > 0 {
        let m = left.min(u64::from(batch));
        left -= m;
        ks.clear();
        for _ in 0..m {
            ks.push(perm[*cursor % perm.len()]);
            *cursor += 1;
        }
        ks.iter().for_each(|&k| prepare(k));
        let t = Instant::now();
        ks.iter().for_each(|&k| op(k));
        total += t.elapsed();
        ks.iter().for_each(|&k| restore(k));
    }
    total
}

/// Times `iters` operations that come in inverse pairs, `op(k, true)`
/// ("there") and `op(k, false)` ("back"), all under one timer: odd operations
/// go there with the next slot of `slots` (cycled from `*cursor`), even ones
/// come back. The state is restored (untimed) at the end.
pub fn time_alternating(iters: u64, slots: &[u32], cursor: &mut usize, mut op: impl FnMut(u32, bool)) -> Duration {
    let mut pending: Option<u32> = None;
    let t = Instant::now();
    for _ in 0..iters {
        if let Some(k) = pending.take() {
            op(k, false);
        } else {
            let k = slots[*cursor % slots.len()];
            *cursor += 1;
            pending = Some(k);
            op(k, true);
        }
    }
    let total = t.elapsed();
    if let Some(k) = pending {
        op(k, false);
    }
    total
}

/// ns per operation of `ops` calls of `f(i)` (`i` counting on across
/// batches), for each of `batches` batches.
pub fn per_op(batches: usize, ops: u64, mut f: impl FnMut(usize)) -> Stat {
    let mut v = Vec::with_capacity(batches);
    let mut i = 0usize;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..ops {
            f(i);
            i = i.wrapping_add(1);
        }
        #[allow(clippy::cast_precision_loss)]
        v.push(ns(t.elapsed()) / ops.max(1) as f64);
    }
    Stat::of_or_zero(v)
}

/// ns of `timed()` after an untimed `setup()`, `batches` times.
pub fn per_call(batches: usize, mut setup: impl FnMut(), mut timed: impl FnMut()) -> Stat {
    let v = (0..batches)
        .map(|_| {
            setup();
            let t = Instant::now();
            timed();
            ns(t.elapsed())
        })
        .collect();
    Stat::of_or_zero(v)
}
