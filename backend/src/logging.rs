//! The daemon's log subscriber: stderr, `SLUICE_LOG` filter, and a rate
//! limit on what our dependencies log.
//!
//! virtio-queue, vhost-user-backend, vhost, vm-memory and libublk log through
//! the `log` crate from their data paths; a guest or a kernel that makes one
//! of them complain on every request would otherwise fill the host's disk
//! (issue 9: 16.5 GB in 5 minutes). Our own events (targets `sluice…`) pass
//! untouched: the data path limits them where they are logged, per queue,
//! without a lock.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_core::callsite::{Callsite, Identifier};
use tracing_core::field::FieldSet;
use tracing_core::metadata::Kind;
use tracing_core::subscriber::Interest;
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use crate::limits::{DEPENDENCY_LOG_INTERVAL_MS, DEPENDENCY_LOG_MAX_KEYS};

/// Sets up the process's subscriber: human-readable lines on stderr (colours
/// only on a terminal), filtered by `SLUICE_LOG` (default `info`), with
/// dependencies' lines rate-limited (see [`DependencyRateLimit`]). Also
/// routes the `log` crate into it.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(filter)
        .with(DependencyRateLimit::new(
            fmt,
            Duration::from_millis(DEPENDENCY_LOG_INTERVAL_MS),
        ))
        .init();
}

/// Whether an event's target is our own code (left to our own limiters).
fn is_ours(target: &str) -> bool {
    target == "sluice" || target.starts_with("sluice::") || target.starts_with("sluice_")
}

/// What the limiter decided for one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Drop the line (counted).
    Suppress,
    /// Write the line; `suppressed` similar lines were dropped over `over`
    /// since the last one that passed.
    Pass {
        /// Lines of the same key dropped since the last one written.
        suppressed: u64,
        /// Time since the last line of this key was written.
        over: Duration,
    },
}

/// One kind of log line: the first passes, then at most one per interval;
/// the rest are counted and reported with the next line that passes. For the
/// data path's own lines ("one line per new kind of trouble, then counts"):
/// a queue thread owns its throttles, so there is no lock, and the caller
/// reads the clock only on its error path.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    interval: Duration,
    last_pass: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// A throttle letting one line through every `interval`.
    pub const fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last_pass: None,
            suppressed: 0,
        }
    }

    /// A throttle letting one line through every `interval_ms` milliseconds.
    pub const fn per_ms(interval_ms: u64) -> Self {
        Self::new(Duration::from_millis(interval_ms))
    }

    /// Decides for a line at `now`.
    pub fn check(&mut self, now: Instant) -> Decision {
        if let Some(last) = self.last_pass {
            let over = now.saturating_duration_since(last);
            if over < self.interval {
                self.suppressed += 1;
                return Decision::Suppress;
            }
            self.last_pass = Some(now);
            let suppressed = std::mem::take(&mut self.suppressed);
            return Decision::Pass { suppressed, over };
        }
        self.last_pass = Some(now);
        Decision::Pass {
            suppressed: 0,
            over: Duration::ZERO,
        }
    }

    /// [`Throttle::check`] now: `Some(suppressed)` when a line may be written.
    pub fn allow(&mut self) -> Option<u64> {
        match self.check(Instant::now()) {
            Decision::Pass { suppressed, .. } => Some(suppressed),
            Decision::Suppress => None,
        }
    }

    /// A data-path error line about `export`'s queue `queue`, when this
    /// throttle lets one through (with the count it held back since).
    pub fn error(&mut self, export: &str, queue: u16, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.allow() {
            tracing::error!(export, queue, suppressed, "{message}");
        }
    }

    /// [`Throttle::error`] at the warning level.
    pub fn warn(&mut self, export: &str, queue: u16, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.allow() {
            tracing::warn!(export, queue, suppressed, "{message}");
        }
    }
}

/// Per-key decisions: the first line of a key passes, then at most one per
/// interval; the rest are counted. Pure: the caller supplies the time.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    max_keys: usize,
    keys: HashMap<u64, Throttle>,
}

impl RateLimiter {
    /// A limiter letting one line per key through every `interval`, tracking
    /// at most `max_keys` keys (the least recently written is forgotten).
    pub fn new(interval: Duration, max_keys: usize) -> Self {
        RateLimiter {
            interval,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
        }
    }

    /// Decides for a line of `key` at `now`.
    pub fn check(&mut self, key: u64, now: Instant) -> Decision {
        if !self.keys.contains_key(&key) && self.keys.len() >= self.max_keys {
            // Keys are (call site, thread): many only with many threads.
            // Forgetting the stalest costs at most one extra line later.
            if let Some(oldest) = self
                .keys
                .iter()
                .min_by_key(|(_, t)| t.last_pass)
                .map(|(k, _)| *k)
            {
                self.keys.remove(&oldest);
            }
        }
        let interval = self.interval;
        self.keys
            .entry(key)
            .or_insert_with(|| Throttle::new(interval))
            .check(now)
    }

    /// Keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }
}

/// The clock the layer reads (injected in tests).
type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// A layer around `inner` (the fmt layer) that rate-limits events whose
/// target is not ours, per call site and thread: events bridged from `log`
/// all share one callsite per level, so the key is the normalized metadata
/// (the `log` record's target, file and line), plus the thread, so one
/// queue's flood does not hide another's first line. When a line passes
/// after suppression, one more line says how many were dropped.
///
/// Only dependency events take the limiter's mutex; ours go straight to
/// `inner`.
pub struct DependencyRateLimit<L> {
    inner: L,
    limiter: Mutex<RateLimiter>,
    interval: Duration,
    clock: Clock,
}

impl<L> DependencyRateLimit<L> {
    /// Wraps `inner`, letting one line per key through every `interval`.
    pub fn new(inner: L, interval: Duration) -> Self {
        Self::with_clock(inner, interval, Box::new(Instant::now))
    }

    /// As [`new`](Self::new), reading the time from `clock`.
    pub fn with_clock(inner: L, interval: Duration, clock: Clock) -> Self {
        DependencyRateLimit {
            inner,
            limiter: Mutex::new(RateLimiter::new(interval, DEPENDENCY_LOG_MAX_KEYS)),
            interval,
            clock,
        }
    }
}

/// The summary line's call site: one static site, so the fmt layer can
/// format it like any other event.
struct SummaryCallsite;
static SUMMARY_CALLSITE: SummaryCallsite = SummaryCallsite;
static SUMMARY_META: Metadata<'static> = Metadata::new(
    "dependency log lines suppressed",
    "sluice::logging",
    Level::WARN,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(&["message"], Identifier(&SUMMARY_CALLSITE)),
    Kind::EVENT,
);

impl Callsite for SummaryCallsite {
    fn set_interest(&self, _interest: Interest) {}
    fn metadata(&self) -> &Metadata<'_> {
        &SUMMARY_META
    }
}

impl<S, L> Layer<S> for DependencyRateLimit<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if is_ours(meta.target()) {
            return self.inner.on_event(event, ctx);
        }
        let mut hasher = DefaultHasher::new();
        meta.target().hash(&mut hasher);
        meta.file().hash(&mut hasher);
        meta.line().hash(&mut hasher);
        meta.level().hash(&mut hasher);
        std::thread::current().id().hash(&mut hasher);
        let key = hasher.finish();
        let now = (self.clock)();
        let decision = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(key, now);
        let Decision::Pass { suppressed, over } = decision else {
            return;
        };
        self.inner.on_event(event, ctx.clone());
        if suppressed == 0 {
            return;
        }
        let message = format_args!(
            "{suppressed} similar {} lines from {} ({}:{}) on this thread suppressed in the last {:.1} s \
             (at most one every {:.0} s is written)",
            meta.level(),
            meta.target(),
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0),
            over.as_secs_f64(),
            self.interval.as_secs_f64(),
        );
        let fields = SUMMARY_META.fields();
        let Some(field) = fields.field("message") else {
            return;
        };
        let values = [(&field, Some(&message as &dyn tracing::field::Value))];
        let value_set = fields.value_set(&values);
        self.inner
            .on_event(&Event::new(&SUMMARY_META, &value_set), ctx);
    }

    // Everything else goes to the wrapped layer unchanged.
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_new_span(attrs, id, ctx);
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }
    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_record(span, values, ctx);
    }
    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_follows_from(span, follows, ctx);
    }
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }
    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }
    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &tracing::span::Id, new: &tracing::span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const INTERVAL: Duration = Duration::from_millis(DEPENDENCY_LOG_INTERVAL_MS);

    #[test]
    fn first_passes_then_one_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(INTERVAL, 8);
        assert_eq!(
            l.check(1, t0),
            Decision::Pass {
                suppressed: 0,
                over: Duration::ZERO
            }
        );
        for i in 1..1000u64 {
            assert_eq!(
                l.check(1, t0 + INTERVAL * u32::try_from(i).unwrap() / 1000),
                Decision::Suppress
            );
        }
        // Another key is independent.
        assert!(matches!(
            l.check(2, t0),
            Decision::Pass { suppressed: 0, .. }
        ));
        assert_eq!(
            l.check(1, t0 + INTERVAL),
            Decision::Pass {
                suppressed: 999,
                over: INTERVAL
            }
        );
        assert_eq!(l.check(1, t0 + INTERVAL), Decision::Suppress);
        // A quiet key passes at once, with nothing to report.
        assert_eq!(
            l.check(1, t0 + INTERVAL * 5),
            Decision::Pass {
                suppressed: 1,
                over: INTERVAL * 4
            }
        );
    }

    #[test]
    fn tracked_keys_are_bounded_and_the_stalest_goes() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(INTERVAL, 4);
        for k in 0..100u64 {
            l.check(k, t0 + Duration::from_millis(k));
            assert!(l.tracked_keys() <= 4);
        }
        // The newest keys are still tracked (suppressed), the first is not.
        assert_eq!(
            l.check(99, t0 + Duration::from_millis(100)),
            Decision::Suppress
        );
        assert!(matches!(
            l.check(0, t0 + Duration::from_millis(100)),
            Decision::Pass { suppressed: 0, .. }
        ));
    }

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// A subscriber with the limiter and a clock the test moves (ms past t0).
    fn subscriber(out: &Captured, ms: &Arc<AtomicU64>) -> impl Subscriber + Send + Sync {
        let t0 = Instant::now();
        let ms = ms.clone();
        let writer = out.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        tracing_subscriber::registry().with(DependencyRateLimit::with_clock(
            fmt,
            INTERVAL,
            Box::new(move || t0 + Duration::from_millis(ms.load(Ordering::Relaxed))),
        ))
    }

    #[test]
    fn a_dependency_flood_makes_few_lines_and_a_count() {
        let out = Captured::default();
        let ms = Arc::new(AtomicU64::new(0));
        // One call site, as a dependency's loop would have.
        let complain = |i: u32| {
            tracing::error!(target: "virtio_queue::queue", "invalid available ring index {i}");
        };
        tracing::subscriber::with_default(subscriber(&out, &ms), || {
            for i in 0..100_000u32 {
                // Time moves on, but less than one interval in all.
                ms.store(u64::from(i) / 20, Ordering::Relaxed);
                complain(i);
            }
            ms.store(DEPENDENCY_LOG_INTERVAL_MS + 1, Ordering::Relaxed);
            complain(100_000);
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].contains("invalid available ring index 0"));
        assert!(lines[1].contains("invalid available ring index 100000"));
        assert!(
            lines[2].contains("99999 similar ERROR lines from virtio_queue::queue"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains(file!()), "{}", lines[2]);
    }

    #[test]
    fn bridged_log_records_are_limited_per_call_site() {
        // The `log` crate's records reach tracing through one callsite per
        // level: two sites must still be told apart.
        let _ = tracing_log::LogTracer::init();
        let out = Captured::default();
        let ms = Arc::new(AtomicU64::new(0));
        tracing::subscriber::with_default(subscriber(&out, &ms), || {
            for _ in 0..10_000 {
                log::warn!(target: "vhost_user_backend::handler", "site one");
                log::warn!(target: "vhost_user_backend::handler", "site two");
            }
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].contains("site one") && lines[0].contains("vhost_user_backend"));
        assert!(lines[1].contains("site two"));
    }

    #[test]
    fn our_own_events_are_not_limited() {
        let out = Captured::default();
        let ms = Arc::new(AtomicU64::new(0));
        tracing::subscriber::with_default(subscriber(&out, &ms), || {
            for i in 0..1000 {
                tracing::warn!(target: "sluice::export::vhost_user::queue", "ours {i}");
                tracing::warn!("this module's own {i}");
            }
        });
        assert_eq!(out.lines().len(), 2000);
    }
}
