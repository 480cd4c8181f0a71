//! A fixed-size log-linear latency histogram (HDR-style): values below 2^SUB_BITS land in
//! buckets of width 1, every later power of two is split into 2^SUB_BITS equal buckets, so
//! a recorded value is known to within 1/64 (1.6 %). Recording is an array increment: no
//! allocation after construction, merging is element-wise addition.

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Values are clamped below 2^MAX_BITS (in the unit recorded: ns → about 18 minutes).
const MAX_BITS: u32 = 40;
/// Number of buckets: SUB exact ones, then SUB for each power of two from 2^SUB_BITS up.
const BUCKETS: usize = SUB * (MAX_BITS - SUB_BITS + 1) as usize;

/// Latency histogram; values are in whatever unit the caller records (nanoseconds here).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .field("mean", &self.mean())
            .finish_non_exhaustive()
    }
}

fn index(v: u64) -> usize {
    let v = v.min((1u64 << MAX_BITS) - 1);
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - SUB_BITS;
    let sub = (v >> shift) as usize - SUB; // 0..SUB
    (shift as usize + 1) * SUB + sub
}

/// Lowest value of bucket `i` and its width.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let shift = (i / SUB - 1) as u32;
    let sub = (i % SUB) as u64;
    ((SUB as u64 + sub) << shift, 1u64 << shift)
}

impl Histogram {
    /// An empty histogram (one allocation of the bucket array, here and only here).
    pub fn new() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Forgets everything recorded (end of the ramp).
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Adds `other`'s values to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Exact mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// Exact minimum (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Exact maximum (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at percentile `p` (0–100): the smallest bucket holding at least
    /// ⌈p/100 · count⌉ values, reported as that bucket's midpoint clamped to the exact
    /// min/max. Monotonic in `p`; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // The rank, with a little slack so that 99.9 % of 1000 is 999 and not the 1000 that
        // the float product 999.0000000000001 would round up to.
        let exact = p.clamp(0.0, 100.0) * self.total as f64 / 100.0;
        let rank = (exact * (1.0 - 1e-12)).ceil() as u64;
        let rank = rank.clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket_range(i);
                return (lo + (width - 1) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        // Every value maps into the bucket whose range contains it, and bucket indexes
        // never decrease as values grow.
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 20, (1 << 39) + 12345, (1 << 40) - 1]) {
            let i = index(v);
            assert!(i >= last, "index not monotonic at {v}");
            last = i;
            let (lo, w) = bucket_range(i);
            assert!(
                lo <= v && v < lo + w,
                "{v} not in bucket {i} = [{lo}, {})",
                lo + w
            );
            // Relative width at most 1/64.
            assert!(w == 1 || w * 64 <= lo, "bucket {i} too wide: {lo}+{w}");
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(index((1 << 40) - 1), BUCKETS - 1);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=50 {
            h.record(v);
        }
        assert_eq!(h.count(), 50);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 50);
        assert_eq!(h.percentile(50.0), 25);
        assert_eq!(h.percentile(99.0), 50);
        assert_eq!(h.percentile(100.0), 50);
        assert_eq!(h.percentile(0.0), 1);
        assert!((h.mean() - 25.5).abs() < 1e-9);
    }

    #[test]
    fn percentiles_of_uniform_values_within_resolution() {
        // 1..=1_000_000 ns uniformly: pXX is about XX % of a million.
        let mut h = Histogram::new();
        for v in 1..=1_000_000u64 {
            h.record(v);
        }
        for (p, want) in [(50.0, 500_000.0), (99.0, 990_000.0), (99.9, 999_000.0)] {
            let got = h.percentile(p) as f64;
            assert!(
                (got - want).abs() / want < 1.0 / 64.0,
                "p{p}: {got} vs {want}"
            );
        }
        assert!((h.mean() - 500_000.5).abs() < 1e-6);
    }

    #[test]
    fn tail_is_seen() {
        // 999 fast requests and one slow one: p99 is fast, p99.9 fast, max slow;
        // with 10 slow ones p99.9 is slow.
        let mut h = Histogram::new();
        for _ in 0..999 {
            h.record(10_000);
        }
        h.record(5_000_000);
        let p50 = h.percentile(50.0);
        assert!((9_900..=10_100).contains(&p50), "{p50}");
        assert!(h.percentile(99.9) < 20_000);
        assert_eq!(h.percentile(100.0), 5_000_000);
        for _ in 0..9 {
            h.record(5_000_000);
        }
        let p999 = h.percentile(99.9);
        assert!((4_900_000..=5_000_000).contains(&p999), "{p999}");
        let (a, b, c) = (h.percentile(50.0), h.percentile(99.0), p999);
        assert!(a <= b && b <= c);
    }

    #[test]
    fn merge_clear_and_empty() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        assert_eq!(a.percentile(50.0), 0);
        assert_eq!(a.mean(), 0.0);
        assert_eq!(a.min(), 0);
        a.record(100);
        b.record(300);
        b.record(u64::MAX);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), 100);
        assert_eq!(a.max(), u64::MAX);
        assert_eq!(a.percentile(0.0), 100);
        a.clear();
        assert_eq!(a.count(), 0);
        assert_eq!(a.percentile(99.0), 0);
    }
}
