//! A log-linear histogram without lookup tables: the subset of the
//! `base2histogram` API that openraft uses (`Histogram`, `PercentileStats`,
//! `AsciiChart`), for keyraft's coordinators.
//!
//! Values 0..4 have a bucket each; above, every power of two is split into
//! four equal sub-buckets, so a bucket's width is at most a quarter of its
//! lower bound (25 % resolution), 252 buckets for all of `u64`. Bucket
//! index and bounds are computed from the value's bit length, never looked
//! up: nothing is built at start, and a histogram is one 2 KiB array.
//!
//! Owns: recording and percentiles. Must not: allocate per record, or
//! panic on any `u64`.

use std::fmt;

/// Sub-buckets per power of two, as a bit count (4 sub-buckets).
const SUB_BITS: u32 = 2;
const SUB: u64 = 1 << SUB_BITS;
/// 4 exact buckets for 0..4, then 4 per power of two from 2^2 to 2^63.
pub const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

/// The bucket `value` falls in.
fn bucket_of(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let exp = 63 - value.leading_zeros(); // >= SUB_BITS
    let sub = (value >> (exp - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(exp - SUB_BITS) * SUB + sub) as usize
}

/// The smallest value of bucket `index`.
fn lower_bound(index: usize) -> u64 {
    let i = index as u64;
    if i < SUB {
        return i;
    }
    let exp = (i - SUB) / SUB + u64::from(SUB_BITS);
    let sub = (i - SUB) % SUB;
    (1u64 << exp) | (sub << (exp - u64::from(SUB_BITS)))
}

/// A histogram of `u64` values. `T` is accepted for API compatibility
/// (per-period metadata in the original); this one keeps one period.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram<T = ()> {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    _meta: std::marker::PhantomData<T>,
}

impl<T> fmt::Debug for Histogram<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Histogram({})", self.percentile_stats())
    }
}

impl<T> Default for Histogram<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Histogram<T> {
    pub fn new() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            _meta: std::marker::PhantomData,
        }
    }

    /// As [`Histogram::new`]: one period is kept whatever the limit.
    pub fn with_slots(_slot_limit: usize) -> Self {
        Self::new()
    }

    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    pub fn record_n(&mut self, value: u64, count: u64) {
        let b = bucket_of(value);
        self.counts[b] = self.counts[b].saturating_add(count);
        self.total = self.total.saturating_add(count);
    }

    /// Values recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The lower bound of the bucket holding the `q`-quantile (0.0..=1.0);
    /// 0 when empty.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        // The rank of the value asked for, 1-based.
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return lower_bound(i);
            }
        }
        lower_bound(BUCKETS - 1)
    }

    pub fn percentile_stats(&self) -> PercentileStats {
        let p = |q| self.percentile(q);
        PercentileStats {
            samples: self.total,
            p0_1: p(0.001),
            p1: p(0.01),
            p5: p(0.05),
            p10: p(0.10),
            p50: p(0.50),
            p90: p(0.90),
            p99: p(0.99),
            p99_9: p(0.999),
        }
    }

    /// Non-empty buckets as (lower bound, count).
    fn nonempty(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (lower_bound(i), *c))
    }
}

/// Percentiles of a histogram (bucket lower bounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PercentileStats {
    pub samples: u64,
    pub p0_1: u64,
    pub p1: u64,
    pub p5: u64,
    pub p10: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
}

impl fmt::Display for PercentileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} p50={} p90={} p99={} p99.9={}",
            self.samples, self.p50, self.p90, self.p99, self.p99_9
        )
    }
}

/// Named histograms drawn as text bars, one line per non-empty bucket.
#[derive(Debug, Clone, Default)]
pub struct AsciiChart {
    rows: Vec<(String, Histogram)>,
}

impl AsciiChart {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(mut self, name: impl Into<String>, h: Histogram) -> Self {
        self.rows.push((name.into(), h));
        self
    }

    /// The chart, every non-empty bucket of every histogram.
    pub fn detailed(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for AsciiChart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const WIDTH: u64 = 40;
        for (name, h) in &self.rows {
            writeln!(f, "{name}: {}", h.percentile_stats())?;
            let most = h.nonempty().map(|(_, c)| c).max().unwrap_or(0).max(1);
            for (low, c) in h.nonempty() {
                let bar = "#".repeat((c * WIDTH).div_ceil(most) as usize);
                writeln!(f, "  {low:>12} | {bar} {c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_u64_in_order_with_a_quarter_resolution() {
        assert_eq!(BUCKETS, 252);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS {
            let low = lower_bound(i);
            assert_eq!(bucket_of(low), i, "bucket {i} starts at {low}");
            if i + 1 < BUCKETS {
                let next = lower_bound(i + 1);
                assert!(next > low);
                assert_eq!(bucket_of(next - 1), i);
                assert!(low < SUB || (next - low) * 4 <= low, "bucket {i} too wide");
            }
        }
    }

    #[test]
    fn percentiles_land_in_the_right_bucket() {
        let mut h = Histogram::<()>::new();
        assert_eq!(h.percentile_stats(), PercentileStats::default());
        for v in 1..=1000u64 {
            h.record(v);
        }
        h.record_n(1_000_000, 10);
        let s = h.percentile_stats();
        assert_eq!(s.samples, 1010);
        let within = |got: u64, want: u64| got <= want && want - got <= want / 4;
        assert!(within(s.p50, 505), "{s}");
        assert!(within(s.p90, 909), "{s}");
        assert!(within(s.p99_9, 1_000_000), "{s}");
        assert_eq!(h.total(), 1010);
        let chart = AsciiChart::new().add("x", h).detailed();
        assert!(chart.contains("n=1010"), "{chart}");
    }
}
