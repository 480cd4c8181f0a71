//! Per-export QoS: IOPS and bytes-per-second limits (total, read, write)
//! with a burst allowance, enforced by the export's queue threads without a
//! lock or an allocation.
//!
//! Each limit is a token bucket in its GCRA form (the "generic cell rate
//! algorithm", the virtual-scheduling form of a token bucket): one atomic
//! *theoretical arrival time* (`tat_ns`) per bucket instead of a token count
//! and a refill timestamp. A request costing `c` units (1 I/O, or its bytes)
//! advances the time by `c / rate`; it may start when that time is at most
//! `burst` ahead of now, that is when the bucket is not empty. Reading the
//! clock is the refill, at nanosecond resolution from the monotonic clock;
//! an idle bucket fills up to `rate × burst_seconds` and no further. A
//! request larger than the bucket starts as soon as the bucket is not empty
//! and leaves it in debt (as QEMU's throttling does), so no request waits
//! forever. Starting a request is one compare-and-swap per bucket, so the
//! queues of several exports share one group's buckets.
//!
//! The limits are atomics: a change (`sluice ctl qos`) reaches every queue
//! at its next request, and a queue sleeping on a throttled request is woken
//! by its timer at most `QOS_MAX_WAIT_MS` later, where it sees the new limits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::api::QosLimits;
use crate::limits::QOS_MAX_WAIT_MS;
use crate::request::BlockOp;

const NS_PER_S: u128 = 1_000_000_000;

/// Nanoseconds on the monotonic clock since the first call in this process.
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One limit: `rate` units per second (0: none), a burst of `tau_ns` worth
/// of the rate.
#[derive(Debug, Default)]
struct Bucket {
    rate: AtomicU64,
    tau_ns: AtomicU64,
    /// When the bucket is next full in the rate's terms: `tat - now` is how
    /// much of the burst is used; more than `tau` means empty.
    tat_ns: AtomicU64,
}

impl Bucket {
    /// How long a request must wait before this bucket lets it start.
    fn wait_ns(&self, now: u64) -> u64 {
        if self.rate.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let ahead = self.tat_ns.load(Ordering::Relaxed).saturating_sub(now);
        ahead.saturating_sub(self.tau_ns.load(Ordering::Relaxed))
    }

    /// Takes `cost` units (the request starts now).
    fn charge(&self, cost: u64, now: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || cost == 0 {
            return;
        }
        let step = (u128::from(cost) * NS_PER_S).div_ceil(u128::from(rate));
        let step = u64::try_from(step).unwrap_or(u64::MAX);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now).saturating_add(step))
            });
    }

    /// New limit. The burst used so far is kept, but a debt is cut to one
    /// empty bucket of the new limit, so a raised limit applies at once.
    fn set(&self, rate: u64, tau_ns: u64, now: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        self.tau_ns.store(tau_ns, Ordering::Relaxed);
        let cap = now.saturating_add(tau_ns);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                (tat > cap).then_some(cap)
            });
    }
}

/// The six buckets of one group: IOPS and bytes per second, each for all
/// requests, reads and writes.
#[derive(Debug, Default)]
pub(crate) struct QosGroup {
    /// `None` for an export's own buckets.
    name: Option<String>,
    /// Any limit is set (the request path's one check when none is).
    limited: AtomicBool,
    iops: Bucket,
    read_iops: Bucket,
    write_iops: Bucket,
    bps: Bucket,
    read_bps: Bucket,
    write_bps: Bucket,
    /// The limits as set (for `export_list` and `export_stats`).
    burst_ns: AtomicU64,
}

/// What a request costs: which buckets, how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Read,
    Write,
    /// Counts as an I/O only (flush): no bytes, no read or write bucket.
    Other,
}

impl Class {
    /// The class and the bytes counted of a block request. Reads and
    /// writes count their bytes; discards and write-zeroes move no data and
    /// count as writes of no bytes; flushes count only as an I/O.
    pub(crate) fn of(op: BlockOp, len_bytes: u64) -> (Class, u64) {
        match op {
            BlockOp::Read => (Class::Read, len_bytes),
            BlockOp::Write { .. } => (Class::Write, len_bytes),
            BlockOp::Discard | BlockOp::WriteZeroes { .. } => (Class::Write, 0),
            BlockOp::Flush => (Class::Other, 0),
        }
    }
}

impl QosGroup {
    /// A group without limits.
    pub(crate) fn new(name: Option<String>) -> Self {
        QosGroup {
            name,
            ..QosGroup::default()
        }
    }

    /// The group's name (`None`: the export's own buckets).
    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn buckets(&self, class: Class) -> [Option<&Bucket>; 4] {
        match class {
            Class::Read => [
                Some(&self.iops),
                Some(&self.read_iops),
                Some(&self.bps),
                Some(&self.read_bps),
            ],
            Class::Write => [
                Some(&self.iops),
                Some(&self.write_iops),
                Some(&self.bps),
                Some(&self.write_bps),
            ],
            Class::Other => [Some(&self.iops), None, None, None],
        }
    }

    /// Whether any limit is set.
    pub(crate) fn limited(&self) -> bool {
        self.limited.load(Ordering::Relaxed)
    }

    /// Starts a request of `class` and `bytes` at `now` if every bucket it
    /// goes through has tokens (returns `None` and charges them), or says
    /// how long until they do (charges nothing).
    pub(crate) fn admit(&self, class: Class, bytes: u64, now: u64) -> Option<Duration> {
        if !self.limited() {
            return None;
        }
        let buckets = self.buckets(class);
        let wait = buckets
            .iter()
            .flatten()
            .map(|b| b.wait_ns(now))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Some(Duration::from_nanos(wait.min(QOS_MAX_WAIT_MS * 1_000_000)));
        }
        let [iops, class_iops, bps, class_bps] = buckets;
        for (bucket, cost) in [(iops, 1), (class_iops, 1), (bps, bytes), (class_bps, bytes)] {
            if let Some(b) = bucket {
                b.charge(cost, now);
            }
        }
        None
    }

    /// Sets the limits (all of them: an absent one is lifted).
    pub(crate) fn set(&self, limits: &QosLimits, now: u64) {
        let tau = limits.burst_ns();
        let rate = |v: Option<u64>| v.unwrap_or(0);
        self.iops.set(rate(limits.iops), tau, now);
        self.read_iops.set(rate(limits.read_iops), tau, now);
        self.write_iops.set(rate(limits.write_iops), tau, now);
        self.bps.set(rate(limits.bps), tau, now);
        self.read_bps.set(rate(limits.read_bps), tau, now);
        self.write_bps.set(rate(limits.write_bps), tau, now);
        self.burst_ns.store(tau, Ordering::Relaxed);
        self.limited.store(limits.any(), Ordering::Release);
    }

    /// The limits as set.
    pub(crate) fn limits(&self) -> QosLimits {
        let rate = |b: &Bucket| Some(b.rate.load(Ordering::Relaxed)).filter(|&r| r > 0);
        let mut limits = QosLimits {
            iops: rate(&self.iops),
            read_iops: rate(&self.read_iops),
            write_iops: rate(&self.write_iops),
            bps: rate(&self.bps),
            read_bps: rate(&self.read_bps),
            write_bps: rate(&self.write_bps),
            burst_seconds: None,
            group: self.name.clone(),
        };
        if limits.any() {
            limits.burst_seconds = Some(self.burst_ns.load(Ordering::Relaxed) as f64 / 1e9);
        }
        limits
    }
}

/// An export's QoS as its queues see it: the group it is in (its own
/// buckets, or a named group shared with other exports), and whether limits
/// are ignored (draining, shutting down).
#[derive(Debug)]
pub(crate) struct ExportQos {
    group: ArcSwap<QosGroup>,
    bypass: AtomicBool,
}

impl ExportQos {
    /// In `group`, limits enforced.
    pub(crate) fn new(group: Arc<QosGroup>) -> Self {
        ExportQos {
            group: ArcSwap::new(group),
            bypass: AtomicBool::new(false),
        }
    }

    /// The group now.
    pub(crate) fn group(&self) -> Arc<QosGroup> {
        self.group.load_full()
    }

    /// Moves the export into `group`.
    pub(crate) fn set_group(&self, group: Arc<QosGroup>) {
        self.group.store(group);
    }

    /// From now on requests start without waiting for tokens (a drain or
    /// close-all is never slowed down by QoS); queues must be woken to start
    /// those they hold.
    pub(crate) fn bypass(&self) {
        self.bypass.store(true, Ordering::SeqCst);
    }

    /// Whether requests may have to wait: a limit is set and not bypassed.
    /// (A front that must decode a request to classify it asks this first.)
    pub(crate) fn enforced(&self) -> bool {
        self.group.load().limited() && !self.bypass.load(Ordering::Relaxed)
    }

    /// Whether a request may start now (`None`), or how long to wait.
    /// One relaxed load when no limit is set.
    pub(crate) fn admit(&self, class: Class, bytes: u64) -> Option<Duration> {
        let group = self.group.load();
        if !group.limited() || self.bypass.load(Ordering::Relaxed) {
            return None;
        }
        group.admit(class, bytes, now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn limits(f: impl FnOnce(&mut QosLimits)) -> QosLimits {
        let mut l = QosLimits::default();
        f(&mut l);
        l
    }

    /// Starts requests of `class`/`bytes` whenever admitted, at the time
    /// the bucket says, from `start` to `end`; returns how many started.
    fn run(g: &QosGroup, class: Class, bytes: u64, start: u64, end: u64) -> u64 {
        let mut now = start;
        let mut n = 0;
        while now < end {
            match g.admit(class, bytes, now) {
                None => n += 1,
                Some(w) => now += (w.as_nanos() as u64).max(1),
            }
        }
        n
    }

    #[test]
    fn unlimited_admits_everything() {
        let g = QosGroup::new(None);
        assert!(!g.limited());
        for i in 0..1000 {
            assert_eq!(g.admit(Class::Write, 1 << 20, i), None);
        }
    }

    #[test]
    fn refills_at_the_rate() {
        let g = QosGroup::new(None);
        g.set(
            &limits(|l| {
                l.iops = Some(1000);
                l.burst_seconds = Some(0.01);
            }),
            0,
        );
        // Empty the burst at t = 0 (10 ms of 1000/s, plus the one that
        // finds the bucket not yet empty).
        let burst = run(&g, Class::Read, 4096, 0, 1);
        assert_eq!(burst, 11);
        // Then exactly the rate: 1000 in the next second.
        let n = run(&g, Class::Read, 4096, 1, S + 1);
        assert!((999..=1001).contains(&n), "{n}");
    }

    #[test]
    fn an_idle_bucket_fills_up_to_the_burst_only() {
        let g = QosGroup::new(None);
        g.set(
            &limits(|l| {
                l.iops = Some(100);
                l.burst_seconds = Some(0.5);
            }),
            0,
        );
        assert_eq!(run(&g, Class::Other, 0, 0, 1), 51);
        // Idle for 10 s: the bucket holds 0.5 s of the rate again, not 10 s.
        assert_eq!(run(&g, Class::Other, 0, 10 * S, 10 * S + 1), 51);
        // Half refilled after 0.25 s.
        let n = run(&g, Class::Other, 0, 10 * S + S / 4, 10 * S + S / 4 + 1);
        assert!((25..=26).contains(&n), "{n}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_into_debt() {
        let g = QosGroup::new(None);
        // 1 MiB/s with a 10 ms burst: a 4 MiB request is 400 bursts.
        g.set(
            &limits(|l| {
                l.bps = Some(1 << 20);
                l.burst_seconds = Some(0.01);
            }),
            0,
        );
        assert_eq!(g.admit(Class::Write, 4 << 20, 0), None);
        // The next one waits until the debt is paid: 4 s less the burst
        // (asked again every QOS_MAX_WAIT_MS meanwhile).
        let w = g.admit(Class::Write, 4096, 0).unwrap();
        assert_eq!(w, Duration::from_millis(QOS_MAX_WAIT_MS));
        let paid = 4 * S - 10 * MS;
        assert_eq!(g.admit(Class::Write, 4096, paid - 1).unwrap().as_nanos(), 1);
        assert_eq!(g.admit(Class::Write, 4096, paid), None);
    }

    #[test]
    fn read_and_write_buckets_are_separate_and_total_covers_both() {
        let g = QosGroup::new(None);
        g.set(
            &limits(|l| {
                l.write_iops = Some(10);
                l.iops = Some(1000);
                l.burst_seconds = Some(0.1);
            }),
            0,
        );
        // Writes: 1 per 100 ms, burst of one.
        assert_eq!(run(&g, Class::Write, 512, 0, 1), 2);
        assert!(g.admit(Class::Write, 512, 1).is_some());
        // Reads are not held by the write bucket, only by the total.
        assert_eq!(run(&g, Class::Read, 512, 1, 2), 99);
        // Flushes count against the total only.
        assert!(g.admit(Class::Other, 0, 2).is_some());
        let r = g.limits();
        assert_eq!(
            (r.iops, r.write_iops, r.read_iops),
            (Some(1000), Some(10), None)
        );
        assert_eq!(r.burst_seconds, Some(0.1));
    }

    #[test]
    fn bytes_count_only_for_reads_and_writes() {
        assert_eq!(Class::of(BlockOp::Read, 4096), (Class::Read, 4096));
        assert_eq!(
            Class::of(BlockOp::Write { fua: true }, 4096),
            (Class::Write, 4096)
        );
        assert_eq!(Class::of(BlockOp::Discard, 1 << 30), (Class::Write, 0));
        assert_eq!(Class::of(BlockOp::Flush, 0), (Class::Other, 0));
    }

    #[test]
    fn a_group_is_shared_by_its_members() {
        let group = Arc::new(QosGroup::new(Some("tenant-a".into())));
        group.set(
            &limits(|l| {
                l.iops = Some(1000);
                l.burst_seconds = Some(0.001);
            }),
            0,
        );
        let members = [group.clone(), group.clone()];
        // Two members asking in turn for one second get the group's rate
        // between them, not each.
        let (mut now, mut counts, mut turn) = (1u64, [0u64; 2], 0usize);
        while now < S {
            match members[turn % 2].admit(Class::Read, 4096, now) {
                None => {
                    counts[turn % 2] += 1;
                    turn += 1;
                }
                Some(w) => now += w.as_nanos() as u64,
            }
        }
        let [na, nb] = counts;
        assert!((999..=1003).contains(&(na + nb)), "{na} + {nb}");
        assert!(na.abs_diff(nb) <= 2, "{na} vs {nb}");
    }

    #[test]
    fn a_raised_or_cleared_limit_applies_at_once() {
        let g = QosGroup::new(None);
        g.set(
            &limits(|l| {
                l.bps = Some(1000);
                l.burst_seconds = Some(0.001);
            }),
            0,
        );
        // 1 MB at 1000 B/s: 1000 s of debt.
        assert_eq!(g.admit(Class::Read, 1_000_000, 0), None);
        assert!(g.admit(Class::Read, 512, 900 * S).is_some());
        // Raised: the debt is cut to one bucket of the new limit.
        g.set(
            &limits(|l| {
                l.bps = Some(1 << 30);
                l.burst_seconds = Some(0.001);
            }),
            S,
        );
        assert_eq!(g.admit(Class::Read, 512, S), None);
        g.set(&QosLimits::default(), S);
        assert!(!g.limited());
        assert_eq!(g.limits(), QosLimits::default());
    }

    #[test]
    fn waits_are_bounded_so_a_change_is_seen() {
        let g = QosGroup::new(None);
        g.set(
            &limits(|l| {
                l.iops = Some(1);
                l.burst_seconds = Some(0.001);
            }),
            0,
        );
        assert_eq!(g.admit(Class::Read, 0, 0), None);
        let w = g.admit(Class::Read, 0, 0).unwrap();
        assert_eq!(w, Duration::from_millis(QOS_MAX_WAIT_MS));
    }

    #[test]
    fn bypass_ignores_the_limits() {
        let g = Arc::new(QosGroup::new(None));
        g.set(
            &limits(|l| {
                l.iops = Some(1);
                l.burst_seconds = Some(0.001);
            }),
            now_ns(),
        );
        let q = ExportQos::new(g);
        let _ = q.admit(Class::Read, 0);
        let _ = q.admit(Class::Read, 0);
        assert!(q.admit(Class::Read, 0).is_some());
        q.bypass();
        assert_eq!(q.admit(Class::Read, 0), None);
    }

    /// What a request pays for QoS: with no limit set (every request of an
    /// export without QoS), and with limits that let it through. A
    /// measurement, not a check: run it with
    /// `cargo test --release -p sluice --lib qos_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn qos_cost() {
        use std::hint::black_box;
        const N: u32 = 10_000_000;
        let measure = |q: &ExportQos| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for i in 0..N {
                    black_box(q.admit(black_box(Class::Read), u64::from(i & 0xfff)));
                }
                best = best.min(t.elapsed().as_nanos() as f64 / f64::from(N));
            }
            best
        };
        let free = ExportQos::new(Arc::new(QosGroup::new(None)));
        let limited = ExportQos::new(Arc::new(QosGroup::new(None)));
        limited.group().set(
            &limits(|l| {
                l.iops = Some(u64::MAX >> 8);
                l.read_iops = Some(u64::MAX >> 8);
                l.bps = Some(u64::MAX >> 8);
                l.read_bps = Some(u64::MAX >> 8);
            }),
            now_ns(),
        );
        eprintln!(
            "QoS per request: {:.2} ns without limits, {:.2} ns through 4 buckets (best of 5)",
            measure(&free),
            measure(&limited)
        );
    }
}
