//! The slot layout every implementation gets, and the precomputed random
//! tables the lookup loops read (so the random number generator is not timed).
//!
//! Slot `i` covers guest physical `[i * 2 MiB, i * 2 MiB + 64 KiB)` (16
//! pages) at host address `0x1000_0000 + i * 2 MiB`. A move sends slot `k`
//! to `(n + k) * 2 MiB`, past every slot, and back.

/// Pages per slot.
pub const PAGES: u64 = 16;
/// Bytes per slot (64 KiB).
pub const SLOT_BYTES: u64 = PAGES << PAGE_SHIFT;
/// log2 of the page size.
pub const PAGE_SHIFT: u32 = 12;
/// Guest (and host) distance between slot starts: 2 MiB.
pub const STRIDE: u64 = 0x20_0000;
/// [`STRIDE`] in pages.
pub const STRIDE_PAGES: u64 = STRIDE >> PAGE_SHIFT;
/// Host address of slot 0.
pub const HVA_BASE: u64 = 0x1000_0000;
/// Entries in each random table (2^16); loops index it with `i & (TABLE - 1)`.
pub const TABLE: usize = 1 << 16;

/// Guest physical address of slot `i`.
pub fn gpa_of(i: u32) -> u64 {
    u64::from(i) * STRIDE
}

/// Host address of slot `i`.
pub fn hva_of(i: u32) -> u64 {
    HVA_BASE + u64::from(i) * STRIDE
}

/// First gfn of slot `i`.
pub fn gfn_of(i: u32) -> u64 {
    gpa_of(i) >> PAGE_SHIFT
}

/// The library's own SplitMix64 (what its traces use).
pub use memslots::trace::Rng;

/// Uniform in `0..n` (`n > 0`).
pub fn below(rng: &mut Rng, n: u32) -> u32 {
    u32::try_from(rng.below(u64::from(n))).unwrap_or(0)
}

/// A random permutation of `0..n` (Fisher-Yates, drawing from `rng`):
/// consecutive windows of it, cycled, are distinct slots.
pub fn permutation(rng: &mut Rng, n: u32) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i as usize, below(rng, i + 1) as usize);
    }
    perm
}

/// `len` random slot ids in `0..n` (`n > 0`).
pub fn random_slots(rng: &mut Rng, n: u32, len: usize) -> Vec<u32> {
    (0..len).map(|_| below(rng, n)).collect()
}

/// [`TABLE`] random 8-byte aligned guest addresses, each in a random one of
/// `slots` slots of `slot_bytes` bytes at `i * STRIDE` (the guest-memory
/// benchmarks' layout, whose slots may be smaller than [`SLOT_BYTES`]).
pub fn random_gpas(slots: u64, slot_bytes: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..TABLE).map(|_| rng.below(slots) * STRIDE + rng.below(slot_bytes / 8) * 8).collect()
}

/// `len` random values in `0..below` (`below > 0`), from `seed`: page
/// numbers to dirty, indices into a slot.
pub fn random_below(len: usize, below: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.below(below)).collect()
}

/// A table of [`TABLE`] values, indexed with a mask (no bounds check).
pub type Table = Box<[u64; TABLE]>;

fn table(v: Vec<u64>) -> Table {
    v.into_boxed_slice().try_into().unwrap_or_else(|_| unreachable!("tables have TABLE entries"))
}

/// The random inputs of the lookups at one slot count.
pub struct Tables {
    /// Random gfns, each in a random slot (random page of it).
    pub gfns: Table,
    /// Guest addresses for the 8-byte reads: the page of `gfns[i]`, a random
    /// 8-byte aligned offset in it.
    pub gpas: Table,
    /// Random gfns where consecutive entries (cyclically) are never in the
    /// same slot (with 2 slots or more): every lookup misses a one-entry
    /// last-used-slot cache.
    pub miss_gfns: Table,
    /// Random gfns all inside one slot (slot `n / 2`): every lookup hits a
    /// last-used-slot cache.
    pub hit_gfns: Table,
}

impl Tables {
    /// The tables for `n` slots (`n > 0`); the same for every run.
    pub fn new(n: u32) -> Self {
        let mut rng = Rng::new(0x5eed ^ u64::from(n));
        let page = |rng: &mut Rng, slot: u32| gfn_of(slot) + rng.next_u64() % PAGES;
        let gfns: Vec<u64> = (0..TABLE)
            .map(|_| {
                let s = below(&mut rng, n);
                page(&mut rng, s)
            })
            .collect();
        let gpas = gfns.iter().map(|&g| (g << PAGE_SHIFT) | ((rng.next_u64() % 512) * 8)).collect();
        let mut slots = Vec::with_capacity(TABLE);
        let mut prev = 0u32;
        for i in 0..TABLE {
            let s = if n < 2 {
                0
            } else if i == 0 {
                below(&mut rng, n)
            } else {
                (prev + 1 + below(&mut rng, n - 1)) % n
            };
            slots.push(s);
            prev = s;
        }
        // The loops wrap around: the last entry must differ from the first
        // too (with 2 slots the sequence alternates and TABLE is even).
        if n > 2 && slots[TABLE - 1] == slots[0] {
            let before = slots[TABLE - 2];
            let mut s = (slots[0] + 1) % n;
            if s == before {
                s = (s + 1) % n;
            }
            slots[TABLE - 1] = s;
        }
        let miss_gfns = slots.iter().map(|&s| page(&mut rng, s)).collect();
        let hit_gfns = (0..TABLE).map(|_| page(&mut rng, n / 2)).collect();
        Tables { gfns: table(gfns), gpas: table(gpas), miss_gfns: table(miss_gfns), hit_gfns: table(hit_gfns) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_and_addresses() {
        let mut p = permutation(&mut Rng::new(1), 1000);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
        for g in random_gpas(100, 0x4000, 3) {
            assert!(g / STRIDE < 100 && g % STRIDE < 0x4000 && g % 8 == 0);
        }
        assert!(random_slots(&mut Rng::new(2), 7, 100).iter().all(|&s| s < 7));
        assert!(random_below(100, 5, 4).iter().all(|&x| x < 5));
    }

    #[test]
    fn tables_are_inside_slots_and_misses_never_repeat() {
        for n in [1, 2, 3, 4, 16, 32000] {
            let t = Tables::new(n);
            let slot = |g: u64| g / STRIDE_PAGES;
            for i in 0..TABLE {
                for g in [t.gfns[i], t.miss_gfns[i], t.hit_gfns[i], t.gpas[i] >> PAGE_SHIFT] {
                    assert!(slot(g) < u64::from(n) && g % STRIDE_PAGES < PAGES);
                }
                assert_eq!(t.gpas[i] >> PAGE_SHIFT, t.gfns[i]);
                assert_eq!(t.gpas[i] % 8, 0);
                assert_eq!(slot(t.hit_gfns[i]), u64::from(n / 2));
                if n >= 2 {
                    assert_ne!(slot(t.miss_gfns[i]), slot(t.miss_gfns[(i + 1) % TABLE]), "n={n} i={i}");
                }
            }
        }
    }
}
