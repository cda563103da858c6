//! Order statistics of repeated samples.

use std::time::Duration;

use serde::Serialize;

/// Nanoseconds of a duration.
pub fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Median of `v` (0 for an empty vector).
pub fn median(v: Vec<f64>) -> f64 {
    Stat::of_or_zero(v).median
}

/// Median, quartiles and range of a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// First quartile (linear interpolation).
    pub q1: f64,
    /// Third quartile.
    pub q3: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// How many samples.
    pub samples: usize,
}

impl Stat {
    /// The statistics of `v` (not empty).
    pub fn of(mut v: Vec<f64>) -> Stat {
        assert!(!v.is_empty(), "no samples");
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            #[allow(clippy::cast_precision_loss)]
            let pos = p * (v.len() - 1) as f64;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(v.len() - 1);
            #[allow(clippy::cast_precision_loss)]
            let frac = pos - lo as f64;
            v[lo] + (v[hi] - v[lo]) * frac
        };
        Stat { median: q(0.5), q1: q(0.25), q3: q(0.75), min: v[0], max: v[v.len() - 1], samples: v.len() }
    }

    /// [`Stat::of`], or all zero for an empty vector.
    pub fn of_or_zero(v: Vec<f64>) -> Stat {
        if v.is_empty() {
            Stat::default()
        } else {
            Stat::of(v)
        }
    }
}

/// The order in which `m` implementations run in repetition `rep`: rotated
/// by one place each repetition, so none always runs first or last.
pub fn rotated(m: usize, rep: usize) -> impl Iterator<Item = usize> {
    (0..m).map(move |j| (j + rep) % m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quartiles() {
        let s = Stat::of(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.median, s.q1, s.q3, s.min, s.max, s.samples), (3.0, 2.0, 4.0, 1.0, 5.0, 5));
        let s = Stat::of(vec![1.0, 2.0]);
        assert_eq!(s.median, 1.5);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(Stat::of_or_zero(Vec::new()), Stat::default());
        assert_eq!(rotated(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
    }
}
