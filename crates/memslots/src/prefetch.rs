//! Warming an update's cache lines before the update runs.
//!
//! A VMM changes slots now and then, so an update usually finds the indexes
//! out of the cache. A delete or move at 32k slots then walks four of them
//! cold (the gfn and hva index of each set), one after the other, with a
//! grace period (fences) between the steps, so no miss of one walk overlaps
//! a miss of another: measured ~1300 cycles per index on a nested host.
//! [`floor_many`] searches all four top arrays in lockstep (independent
//! chains, so their misses overlap), and the blocks found are prefetched
//! together; the update then finds them in the cache.

/// Hints the CPU to bring `bytes` from `p` on into the cache. Never faults
/// and changes nothing observable: any address is fine.
#[inline]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    for off in (0..bytes).step_by(64) {
        // SAFETY: PREFETCHT0 is a hint: it never faults, for any address,
        // and reads nothing the program sees. `wrapping_add` keeps the
        // address computation free of UB.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off).cast()) };
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = (p, bytes);
}

/// For each `j`, the number of elements of the sorted `tops[j]` that are
/// `<= keys[j]` (`tops[j].partition_point(|&x| x <= keys[j])`), the
/// searches run in lockstep: each step makes one branchless probe in every
/// array, so the probes of one step do not wait for each other.
pub(crate) fn floor_many<const K: usize>(tops: [&[u64]; K], keys: [u64; K]) -> [usize; K] {
    // Per array: `n` elements, answer in `[base, base + len]`.
    let mut base = [0usize; K];
    let mut len: [usize; K] = core::array::from_fn(|j| tops[j].len());
    while len.iter().any(|&l| l > 0) {
        for j in 0..K {
            let l = len[j];
            if l == 0 {
                continue;
            }
            let half = l / 2;
            // Probe `base + half` (< base + l <= n): if it is `<= key`, the
            // answer is past it.
            let le = tops[j][base[j] + half] <= keys[j];
            base[j] += usize::from(le) * (l - half);
            len[j] = half;
        }
    }
    base
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::floor_many;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_partition_point(
            mut a in proptest::collection::vec(0u64..500, 0..300),
            mut b in proptest::collection::vec(any::<u64>(), 0..3000),
            ka in 0u64..520,
            kb: u64,
            pick: usize,
        ) {
            a.sort_unstable();
            b.sort_unstable();
            let kb = if b.is_empty() || pick % 2 == 0 { kb } else { b[pick % b.len()] };
            let got = floor_many([&a[..], &b[..], &[][..]], [ka, kb, 7]);
            prop_assert_eq!(got, [a.partition_point(|&x| x <= ka), b.partition_point(|&x| x <= kb), 0]);
        }
    }

    #[test]
    fn every_length_and_key() {
        for n in 0..70u64 {
            let a: Vec<u64> = (0..n).map(|i| 2 * i + 1).collect();
            for key in 0..=2 * n + 2 {
                let want = a.partition_point(|&x| x <= key);
                assert_eq!(floor_many([&a[..]], [key]), [want], "n {n} key {key}");
            }
        }
    }
}
