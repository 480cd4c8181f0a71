//! Exports: protocol fronts that turn one protocol's requests into block
//! requests on one node. Nothing below `export/` is known to the engine or the
//! nodes; nothing outside it knows a wire protocol.

pub(crate) mod error_log;
pub(crate) mod ublk;
pub(crate) mod vhost_user;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use crate::api::{ExportDescription, ExportEndpoint, ReadyEvent};
use crate::node::Node;
use crate::qos::ExportQos;
use crate::request::{BlockOp, RequestError, RequestResult};

// The counters' types are control-plane results (api.rs); how they are
// summed over the queues is here.
use crate::api::{ExportCounters, LatencyBucket, QueueCounters};
pub(crate) use crate::api::{ExportTotals, LatencyPercentiles};

/// Starts the export `config` describes on `node`.
/// A vhost-user export tells `events` when a frontend connects or leaves.
pub(crate) fn start_export(
    node: Arc<Node>,
    config: &crate::config::ExportConfig,
    events: &crate::events::Events,
    qos: Arc<ExportQos>,
) -> Result<Export, ExportError> {
    use crate::config::ExportKind;
    match &config.kind {
        ExportKind::VhostUser {
            socket,
            socket_mode,
        } => vhost_user::VhostUserExport::start(
            node,
            vhost_user::VhostUserConfig {
                name: config.name.clone(),
                socket: socket.clone(),
                queues: config.queues,
                queue_depth: config.queue_depth,
                read_only: config.read_only,
                serial: config.serial.clone(),
                poll_window_us: config.poll_window_us,
                socket_mode: *socket_mode,
            },
            events.clone(),
            qos,
        )
        .map(Export::VhostUser),
        ExportKind::Ublk { id, recovery } => ublk::UblkExport::start(
            node,
            ublk::UblkConfig {
                name: config.name.clone(),
                id: *id,
                queues: config.queues,
                queue_depth: config.queue_depth,
                read_only: config.read_only,
                recovery: *recovery,
            },
            qos,
        )
        .map(Export::Ublk),
    }
}

/// A running export of either protocol.
#[derive(Debug)]
pub(crate) enum Export {
    /// vhost-user-blk over a UNIX socket.
    VhostUser(vhost_user::VhostUserExport),
    /// `/dev/ublkbN` through the kernel's ublk driver.
    Ublk(ublk::UblkExport),
}

impl Export {
    /// The export's name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Export::VhostUser(x) => &x.config().name,
            Export::Ublk(x) => &x.config().name,
        }
    }

    /// The node it serves now.
    pub(crate) fn node(&self) -> Arc<Node> {
        match self {
            Export::VhostUser(x) => x.node(),
            Export::Ublk(x) => x.node(),
        }
    }

    /// The vhost-user socket it listens on (`None` for ublk).
    pub(crate) fn socket(&self) -> Option<&std::path::Path> {
        match self {
            Export::VhostUser(x) => Some(&x.config().socket),
            Export::Ublk(_) => None,
        }
    }

    /// Whether this export took over a device a dead server left (ublk
    /// recovery).
    pub(crate) fn taken_over(&self) -> bool {
        matches!(self, Export::Ublk(x) if x.taken_over())
    }

    /// Leaves the export as it is for the process's exit (a failed start
    /// that took over a ublk device): the kernel quiesces the device again
    /// when this process's char device closes, and the next server takes
    /// it over. Only for an export whose process is about to exit.
    pub(crate) fn abandon(self) {
        // Its queue threads keep serving until the process exits; dropping
        // it would stop and delete the device.
        std::mem::forget(self);
    }

    /// The ublk device id N of `/dev/ublkbN` (`None` for vhost-user).
    pub(crate) fn ublk_id(&self) -> Option<u32> {
        match self {
            Export::Ublk(x) => Some(x.dev_id()),
            Export::VhostUser(_) => None,
        }
    }

    /// The node, mirror tap and pause its queues share.
    pub(crate) fn binding(&self) -> &Arc<crate::binding::Binding> {
        match self {
            Export::VhostUser(x) => x.binding(),
            Export::Ublk(x) => x.binding(),
        }
    }

    /// Its QoS: the group whose limits it obeys.
    pub(crate) fn qos(&self) -> &Arc<ExportQos> {
        match self {
            Export::VhostUser(x) => x.qos(),
            Export::Ublk(x) => x.qos(),
        }
    }

    /// Pivot, step one: the queues hold new requests back (vhost-user
    /// leaves them in the ring, ublk parks their tags) and nothing is in
    /// flight on the node any more. On timeout the export is resumed and
    /// the busy queues are returned.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        match self {
            Export::VhostUser(x) => x.pause(timeout),
            Export::Ublk(x) => x.pause(timeout),
        }
    }

    /// Pivot, step two (while paused): requests go to `node` from now on;
    /// each queue moves to it before it starts anything new. The geometry
    /// the consumer sees stays as it was.
    pub(crate) fn switch_node(&self, node: Arc<Node>) {
        self.binding().switch_node(node);
    }

    /// Pivot, step three: the queues take new requests again.
    pub(crate) fn resume(&self) {
        match self {
            Export::VhostUser(x) => x.resume(),
            Export::Ublk(x) => x.resume(),
        }
    }

    /// Cumulative statistics.
    pub(crate) fn totals(&self) -> ExportTotals {
        match self {
            Export::VhostUser(x) => x.totals(),
            Export::Ublk(x) => x.totals(),
        }
    }

    /// Completion latency percentiles.
    pub(crate) fn latency(&self) -> LatencyPercentiles {
        match self {
            Export::VhostUser(x) => x.latency(),
            Export::Ublk(x) => x.latency(),
        }
    }

    /// Every queue's cumulative counters and latency histogram
    /// (`export_counters`).
    pub(crate) fn counters(&self) -> ExportCounters {
        ExportCounters {
            export: self.name().to_owned(),
            node: self.node().name().to_owned(),
            kind: self.kind().to_owned(),
            queues: self
                .queues()
                .iter()
                .enumerate()
                .map(|(i, q)| q.counters(i as u16))
                .collect(),
        }
    }

    /// Each queue's counters, as its thread writes them.
    pub(crate) fn queues(&self) -> &[QueueShared] {
        match self {
            Export::VhostUser(x) => x.queues(),
            Export::Ublk(x) => x.queues(),
        }
    }

    /// `vhost-user` or `ublk`, as the ready line's `type`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Export::VhostUser(_) => "vhost-user",
            Export::Ublk(_) => "ublk",
        }
    }

    /// Drain, first half: new requests fail from now on (vhost-user; ublk
    /// keeps admitting, see [`ublk::UblkExport::drain`]). Cheap and
    /// immediate, so close-all closes every export before it waits on any.
    pub(crate) fn stop_admitting(&self) {
        match self {
            Export::VhostUser(x) => x.stop_admitting(),
            Export::Ublk(x) => x.ignore_qos(),
        }
    }

    /// Close-all step 1 (and runtime removal): stop admitting and wait, within
    /// `bounds`, until nothing is in flight. Returns the queues that stayed busy.
    pub(crate) fn drain(&self, bounds: DrainBounds) -> Result<(), Vec<usize>> {
        match self {
            Export::VhostUser(x) => x.drain(bounds),
            Export::Ublk(x) => x.drain(bounds.in_flight),
        }
    }

    /// Close-all step 2 (and runtime removal): detach from the consumer and
    /// give the node reference back.
    pub(crate) fn detach(self, timeout: Duration) -> Result<Arc<Node>, ExportError> {
        match self {
            Export::VhostUser(x) => x.detach(timeout),
            Export::Ublk(x) => x.detach(timeout),
        }
    }

    /// What the ready line, `export_add` and `export_list` say of it.
    pub(crate) fn describe(&self) -> ExportDescription {
        let node = self.node();
        let limits = node.limits();
        let (endpoint, queues, queue_depth, read_only) = match self {
            Export::VhostUser(x) => (
                ExportEndpoint::VhostUser {
                    socket: x.config().socket.clone(),
                },
                x.config().queues,
                x.config().queue_depth,
                x.read_only(),
            ),
            Export::Ublk(x) => (
                ExportEndpoint::Ublk {
                    dev_id: x.dev_id(),
                    device: x.bdev_path(),
                },
                x.config().queues,
                x.config().queue_depth,
                x.read_only(),
            ),
        };
        ExportDescription {
            event: ReadyEvent::Ready,
            export: self.name().to_owned(),
            endpoint,
            disk: node.spec().to_string(),
            capacity_bytes: limits.capacity_bytes,
            logical_block_size_bytes: limits.logical_block_size_bytes,
            physical_block_size_bytes: limits.physical_block_size_bytes,
            write_cache: limits.volatile_write_cache,
            fua: limits.fua,
            discard_max_bytes: limits.discard_max_bytes,
            write_zeroes_max_bytes: limits.write_zeroes_max_bytes,
            queues,
            queue_depth,
            read_only,
        }
    }
}

/// Why an export could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The socket path cannot be served.
    #[error("vhost-user socket {path}: {source}; choose another path")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: crate::unix_socket::BindError,
    },
    /// Creating the per-queue io_uring engines failed.
    #[error("export {export}: cannot set up io_uring for queue {queue}: {source}{hint}")]
    Engine {
        /// The export.
        export: String,
        /// The queue.
        queue: u16,
        /// The OS error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// An eventfd or a thread could not be made.
    #[error("export {export}: {what}: {source}")]
    Os {
        /// The export.
        export: String,
        /// What was being made.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A ublk device could not be created, started or stopped.
    #[error("export {export}: {source}")]
    Ublk {
        /// The export.
        export: String,
        /// What failed.
        #[source]
        source: ublk::UblkFailure,
    },
    /// The vhost-user frontend connection did not close in time.
    #[error("export {export}: cannot detach: the frontend connection did not close within {timeout_ms} ms")]
    FrontendStuck {
        /// The export.
        export: String,
        /// How long it was given.
        timeout_ms: u128,
    },
}

/// How long a drain may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainBounds {
    /// For the requests in flight to complete (and be answered).
    pub in_flight: Duration,
    /// vhost-user: for the guest to stop sending once its requests fail,
    /// so that none is left in a ring nobody reads after the detach.
    pub guest_quiet: Duration,
}

impl DrainBounds {
    /// Close-all and `export_remove` in safe mode.
    pub const SAFE: DrainBounds = DrainBounds {
        in_flight: Duration::from_millis(crate::limits::DRAIN_TIMEOUT_MS),
        guest_quiet: Duration::from_millis(crate::limits::DETACH_QUIET_LIMIT_MS),
    };
    /// `export_remove` in forced mode: still answers every request it takes
    /// (a request in flight owns guest memory until the device is done with
    /// it, so it cannot be answered earlier), but waits far less.
    pub const FORCE: DrainBounds = DrainBounds {
        in_flight: Duration::from_millis(crate::limits::FORCE_DRAIN_TIMEOUT_MS),
        guest_quiet: Duration::from_millis(crate::limits::FORCE_QUIET_LIMIT_MS),
    };

    /// These bounds, cut to end by `deadline`.
    pub fn until(self, deadline: std::time::Instant) -> DrainBounds {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        DrainBounds {
            in_flight: self.in_flight.min(left),
            guest_quiet: self.guest_quiet.min(left),
        }
    }
}

/// What a completed request counts as: its block operation, or `Other` for
/// a request answered without one (virtio-blk GET_ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Other,
}

impl OpKind {
    /// Every kind, in the order of [`QueueShared::completed`].
    pub(crate) const ALL: [OpKind; 6] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::Other,
    ];

    fn of(op: Option<BlockOp>) -> OpKind {
        match op {
            Some(BlockOp::Read) => OpKind::Read,
            Some(BlockOp::Write { .. }) => OpKind::Write,
            Some(BlockOp::Flush) => OpKind::Flush,
            Some(BlockOp::Discard) => OpKind::Discard,
            Some(BlockOp::WriteZeroes { .. }) => OpKind::WriteZeroes,
            None => OpKind::Other,
        }
    }
}

/// Number of [`OpKind`]s.
pub(crate) const OP_KINDS: usize = OpKind::ALL.len();

/// Why a request was answered with an error, as far as the fronts tell
/// (each is a distinct path in the code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The backing device or file failed it (any errno but ESHUTDOWN).
    Io,
    /// The operation is not supported by the export or node.
    Unsupported,
    /// The request was malformed or out of range (the consumer's error).
    BadRequest,
    /// The export was draining (shutdown or removal) and admitted nothing new.
    Shutdown,
}

impl ErrorKind {
    /// Every kind, in the order of [`QueueShared::failed`].
    pub(crate) const ALL: [ErrorKind; 4] = [
        ErrorKind::Io,
        ErrorKind::Unsupported,
        ErrorKind::BadRequest,
        ErrorKind::Shutdown,
    ];

    /// The `kind` label of `sluice_request_errors_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Shutdown => "shutdown",
        }
    }

    fn of(e: RequestError) -> ErrorKind {
        match e {
            RequestError::Io(libc::ESHUTDOWN) => ErrorKind::Shutdown,
            RequestError::Io(_) => ErrorKind::Io,
            RequestError::Unsupported => ErrorKind::Unsupported,
            RequestError::Invalid => ErrorKind::BadRequest,
        }
    }
}

/// Number of [`ErrorKind`]s.
pub(crate) const ERROR_KINDS: usize = ErrorKind::ALL.len();

/// Counters and state the queue thread shares with the rest of the daemon.
/// Written by the queue thread only; read by anyone (relaxed): the monitor's
/// statistics and the metrics scrape read these, never a copy kept on the
/// request path.
#[derive(Debug)]
pub struct QueueShared {
    /// Requests submitted and not yet completed.
    pub in_flight: AtomicU32,
    /// Requests completed successfully, by [`OpKind`].
    pub(crate) completed: [AtomicU64; OP_KINDS],
    /// Requests completed with an error status, by [`ErrorKind`].
    pub(crate) failed: [AtomicU64; ERROR_KINDS],
    /// Bytes read by completed requests.
    pub bytes_read: AtomicU64,
    /// Bytes written by completed requests.
    pub bytes_written: AtomicU64,
    /// Completion latency histogram (see [`LATENCY_BUCKETS`]).
    pub latency: [AtomicU64; LATENCY_BUCKETS],
    /// Sum of the latencies counted in `latency`, in nanoseconds.
    pub latency_sum_ns: AtomicU64,
    /// Time the queue's thread spent working: vhost-user, in its polling
    /// loop (requests and the busy-poll window); ublk, handling a batch of
    /// completions from its ring. Nanoseconds.
    pub polling_ns: AtomicU64,
    /// Time the queue's thread spent blocked waiting for work (vhost-user:
    /// between two wake-ups; ublk: in `io_uring_enter` between two batches).
    /// Counted when the wait ends. Nanoseconds.
    pub sleeping_ns: AtomicU64,
    /// The frontend stopped this queue's ring (vhost-user GET_VRING_BASE, as
    /// in a device reset): a queue marked broken serves it again when it is
    /// restarted. Set by the protocol thread, taken by the queue thread.
    pub ring_stopped: AtomicBool,
    /// The last pause generation (`Binding::pause`) this queue's thread
    /// acknowledged (ublk: it starts nothing new from then on).
    pub pause_ack: AtomicU64,
}

impl Default for QueueShared {
    fn default() -> Self {
        QueueShared {
            in_flight: AtomicU32::new(0),
            completed: std::array::from_fn(|_| AtomicU64::new(0)),
            failed: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            polling_ns: AtomicU64::new(0),
            sleeping_ns: AtomicU64::new(0),
            ring_stopped: AtomicBool::new(false),
            pause_ack: AtomicU64::new(0),
        }
    }
}

/// A queue's counters read at one moment (each relaxed; the request path
/// keeps running meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueSnapshot {
    pub in_flight: u32,
    pub completed: [u64; OP_KINDS],
    pub failed: [u64; ERROR_KINDS],
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub polling_ns: u64,
    pub sleeping_ns: u64,
}

/// An export's latency histogram summed over its queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LatencyHistogram {
    /// Requests per bucket (see [`latency_bucket_upper_ns`]).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of their latencies in nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// The histograms of `queues`, summed.
    pub(crate) fn of(queues: &[QueueShared]) -> Self {
        let mut h = LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            sum_ns: 0,
        };
        for q in queues {
            for (s, b) in h.buckets.iter_mut().zip(q.latency.iter()) {
                *s += b.load(Ordering::Relaxed);
            }
            h.sum_ns += q.latency_sum_ns.load(Ordering::Relaxed);
        }
        h
    }

    /// Requests counted.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The histogram with only the bounds `exported` (bucket indices, each
    /// the last bucket of a group, ascending): `(upper bound in seconds,
    /// requests in the group)`, then the rest up to `+Inf`. A sample `x`
    /// counted under bound `le` had `x <= le`: bucket bounds are inclusive.
    pub(crate) fn grouped(&self, exported: &[usize]) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(exported.len() + 1);
        let mut from = 0;
        for &last in exported {
            let n = self.buckets[from..=last].iter().sum();
            out.push((latency_bucket_upper_ns(last) as f64 / 1e9, n));
            from = last + 1;
        }
        out.push((f64::INFINITY, self.buckets[from..].iter().sum()));
        out
    }
}

impl QueueSnapshot {
    /// Reads `q`: the one place that reads a queue's counters, so a new
    /// counter is added here (and to what reports it: the metrics, and
    /// [`QueueShared::counters`] for `export_counters`).
    pub(crate) fn of(q: &QueueShared) -> Self {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QueueSnapshot {
            in_flight: q.in_flight.load(Ordering::Relaxed),
            completed: std::array::from_fn(|i| load(&q.completed[i])),
            failed: std::array::from_fn(|i| load(&q.failed[i])),
            bytes_read: load(&q.bytes_read),
            bytes_written: load(&q.bytes_written),
            polling_ns: load(&q.polling_ns),
            sleeping_ns: load(&q.sleeping_ns),
        }
    }
}

impl LatencyPercentiles {
    /// Percentiles over the histograms of `queues`.
    pub fn of(queues: &[QueueShared]) -> Self {
        let sum = LatencyHistogram::of(queues).buckets;
        let samples: u64 = sum.iter().sum();
        if samples == 0 {
            return LatencyPercentiles::default();
        }
        let at = |p: f64| {
            let want = ((samples as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (b, n) in sum.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return latency_bucket_upper_ns(b) as f64 / 1000.0;
                }
            }
            f64::INFINITY
        };
        LatencyPercentiles {
            samples,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
        }
    }
}

/// Latency histogram buckets: 8 per power of two of nanoseconds, from 1 µs
/// (2^10 ns) to about 69 s (2^36 ns); fixed size, updated with relaxed
/// atomics by the queue thread, read by the monitor. Bucket `b` holds the
/// samples `x` with `upper(b - 1) < x <= upper(b)` ([`latency_bucket_upper_ns`];
/// the first holds everything up to its bound, the last everything above
/// 2^36 ns), so its upper bound is exact and inclusive, as a Prometheus `le`.
const LATENCY_SUB_BUCKETS: usize = 8;
const LATENCY_MIN_SHIFT: u32 = 10;
const LATENCY_OCTAVES: usize = 26;
/// Number of latency buckets per queue.
pub(crate) const LATENCY_BUCKETS: usize = LATENCY_OCTAVES * LATENCY_SUB_BUCKETS + 1;

fn latency_bucket(ns: u64) -> usize {
    // Bucket b's half-open range [lo, hi) of `ns - 1` is (lo, hi] of `ns`.
    let ns = ns.saturating_sub(1).max(1 << LATENCY_MIN_SHIFT);
    let octave = (63 - ns.leading_zeros()) - LATENCY_MIN_SHIFT;
    if octave as usize >= LATENCY_OCTAVES {
        return LATENCY_BUCKETS - 1;
    }
    let sub = (ns >> (octave + LATENCY_MIN_SHIFT - 3)) as usize & (LATENCY_SUB_BUCKETS - 1);
    octave as usize * LATENCY_SUB_BUCKETS + sub
}

/// The upper bound in nanoseconds of bucket `b`, inclusive (`u64::MAX` for
/// the last).
pub(crate) fn latency_bucket_upper_ns(b: usize) -> u64 {
    if b >= LATENCY_BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = (b / LATENCY_SUB_BUCKETS) as u32;
    let sub = (b % LATENCY_SUB_BUCKETS) as u64;
    let base = 1u64 << (octave + LATENCY_MIN_SHIFT);
    base + (sub + 1) * (base / LATENCY_SUB_BUCKETS as u64)
}

/// The buckets whose upper bounds the metrics export as `le`: two per
/// octave (1.5 × 2^k and 2^(k+1) ns), from 1.536 µs to 2^30 ns (1.07 s);
/// everything above goes to `+Inf`. Each is an exact bound of the
/// per-queue buckets, so no sample is counted under a bound below it.
pub(crate) fn exported_latency_buckets() -> impl Iterator<Item = usize> {
    // 1.5 × 2^(10+k) is the end of sub-bucket 3 of octave k, 2^(11+k) of 7.
    (0..20).flat_map(|octave| {
        [
            octave * LATENCY_SUB_BUCKETS + 3,
            octave * LATENCY_SUB_BUCKETS + 7,
        ]
    })
}

impl QueueShared {
    /// Counts one completed request that took `latency_ns`.
    pub fn record_latency(
        &self,
        op: Option<BlockOp>,
        len_bytes: u64,
        result: RequestResult,
        latency_ns: u64,
    ) {
        self.latency[latency_bucket(latency_ns)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(latency_ns, Ordering::Relaxed);
        self.record(op, len_bytes, result);
    }

    /// Counts one completed request (one relaxed add for its kind, one for
    /// its bytes).
    pub fn record(&self, op: Option<BlockOp>, len_bytes: u64, result: RequestResult) {
        if let Err(e) = result {
            self.failed[ErrorKind::of(e) as usize].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.completed[OpKind::of(op) as usize].fetch_add(1, Ordering::Relaxed);
        match op {
            Some(BlockOp::Read) => {
                self.bytes_read.fetch_add(len_bytes, Ordering::Relaxed);
            }
            Some(BlockOp::Write { .. }) => {
                self.bytes_written.fetch_add(len_bytes, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Adds the time a wake-up's work took and the wait before it. Called
    /// once per wake-up (vhost-user) or batch of completions (ublk) by the
    /// queue's thread.
    pub(crate) fn add_polling_ns(&self, ns: u64) {
        self.polling_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Adds the time the queue's thread waited for work.
    pub(crate) fn add_sleeping_ns(&self, ns: u64) {
        self.sleeping_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl QueueShared {
    /// Everything this queue counts, read once (relaxed loads; a request
    /// completing meanwhile may be in one counter and not yet in another):
    /// what `export_counters` reports.
    pub(crate) fn counters(&self, queue: u16) -> QueueCounters {
        let latency = self
            .latency
            .iter()
            .enumerate()
            .filter_map(|(b, n)| {
                let count = n.load(Ordering::Relaxed);
                (count > 0).then(|| LatencyBucket {
                    upper_ns: (b < LATENCY_BUCKETS - 1).then(|| latency_bucket_upper_ns(b)),
                    count,
                })
            })
            .collect();
        let q = QueueSnapshot::of(self);
        let (ok, failed): (u64, u64) = (q.completed.iter().sum(), q.failed.iter().sum());
        QueueCounters {
            queue,
            requests: ok + failed,
            errors: failed,
            reads: q.completed[OpKind::Read as usize],
            writes: q.completed[OpKind::Write as usize],
            bytes_read: q.bytes_read,
            bytes_written: q.bytes_written,
            flushes: q.completed[OpKind::Flush as usize],
            in_flight: q.in_flight,
            latency,
            latency_sum_ns: self.latency_sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl ExportTotals {
    /// Sums the counters of `queues`.
    pub fn of(queues: &[QueueShared]) -> Self {
        let mut t = ExportTotals::default();
        for q in queues.iter().map(QueueSnapshot::of) {
            let (ok, failed): (u64, u64) = (q.completed.iter().sum(), q.failed.iter().sum());
            t.requests += ok + failed;
            t.errors += failed;
            t.bytes_read += q.bytes_read;
            t.bytes_written += q.bytes_written;
            t.flushes += q.completed[OpKind::Flush as usize];
            t.in_flight += q.in_flight;
        }
        t
    }
}

/// Waits until `q` has nothing in flight, for at most `timeout`.
pub(crate) fn wait_idle(q: &QueueShared, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while q.in_flight.load(Ordering::Relaxed) > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_monotonic_and_bound_their_samples() {
        let mut last = 0;
        for ns in [
            1u64,
            900,
            1024,
            1500,
            2047,
            2048,
            10_000,
            123_456,
            9_999_999,
            1 << 40,
        ] {
            let b = latency_bucket(ns);
            assert!(b >= last, "{ns}");
            assert!(
                latency_bucket_upper_ns(b) >= ns.max(1024),
                "{ns} in bucket {b}"
            );
            last = b;
        }
    }

    #[test]
    fn counters_read_what_the_queue_recorded() {
        let q = QueueShared::default();
        assert_eq!(q.counters(3).latency, vec![]);
        q.record_latency(Some(BlockOp::Read), 4096, Ok(()), 10_000);
        q.record_latency(Some(BlockOp::Read), 4096, Ok(()), 10_100);
        q.record_latency(Some(BlockOp::Write { fua: false }), 512, Ok(()), 1 << 40);
        q.record_latency(Some(BlockOp::Flush), 0, Ok(()), 2_000);
        q.record_latency(
            Some(BlockOp::Write { fua: false }),
            512,
            Err(RequestError::Io(libc::EIO)),
            2_000,
        );
        q.in_flight.store(2, Ordering::Relaxed);
        let c = q.counters(3);
        assert_eq!(c.queue, 3);
        assert_eq!(
            (
                c.requests,
                c.errors,
                c.reads,
                c.writes,
                c.bytes_read,
                c.bytes_written,
                c.flushes,
                c.in_flight
            ),
            (5, 1, 2, 1, 8192, 512, 1, 2)
        );
        assert_eq!(
            c.latency_sum_ns,
            10_000 + 10_100 + (1 << 40) + 2_000 + 2_000
        );
        let b = |ns| latency_bucket_upper_ns(latency_bucket(ns));
        assert_eq!(
            c.latency,
            vec![
                LatencyBucket {
                    upper_ns: Some(b(2_000)),
                    count: 2
                },
                LatencyBucket {
                    upper_ns: Some(b(10_000)),
                    count: 2
                },
                LatencyBucket {
                    upper_ns: None,
                    count: 1
                },
            ]
        );
        assert!(b(10_000) >= 10_100, "10 000 and 10 100 ns share a bucket");
    }

    #[test]
    fn bucket_bounds_are_exact_and_inclusive() {
        for b in 0..LATENCY_BUCKETS - 1 {
            let upper = latency_bucket_upper_ns(b);
            assert_eq!(latency_bucket(upper), b, "{upper} ns belongs to bucket {b}");
            assert_eq!(
                latency_bucket(upper + 1),
                b + 1,
                "{} ns is above bucket {b}",
                upper + 1
            );
        }
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn exported_bounds_run_from_a_microsecond_to_a_second() {
        let bounds: Vec<u64> = exported_latency_buckets()
            .map(latency_bucket_upper_ns)
            .collect();
        assert_eq!(bounds.len(), 40);
        assert_eq!(bounds[0], 1536);
        assert_eq!(bounds[1], 2048);
        assert_eq!(*bounds.last().unwrap(), 1 << 30);
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn grouped_histogram_counts_every_sample_under_its_bound() {
        let q = [QueueShared::default()];
        // On a bound, just above it, far above every bound.
        for ns in [1536, 1537, 2048, 5_000, 2_000_000_000] {
            q[0].record_latency(Some(BlockOp::Read), 512, Ok(()), ns);
        }
        let h = LatencyHistogram::of(&q);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_ns, 1536 + 1537 + 2048 + 5_000 + 2_000_000_000);
        let exported: Vec<usize> = exported_latency_buckets().collect();
        let g = h.grouped(&exported);
        assert_eq!(g.len(), 41);
        assert_eq!(g[0], (1536e-9, 1));
        assert_eq!(g[1], (2048e-9, 2));
        assert_eq!(g[4].1, 1, "5 µs is in (4.096, 6.144] µs");
        assert_eq!(g[40], (f64::INFINITY, 1));
        assert_eq!(g.iter().map(|(_, n)| n).sum::<u64>(), 5);
    }

    #[test]
    fn completions_are_counted_by_op_and_errors_by_kind() {
        let q = [QueueShared::default()];
        q[0].record(Some(BlockOp::Read), 4096, Ok(()));
        q[0].record(Some(BlockOp::Write { fua: true }), 512, Ok(()));
        q[0].record(Some(BlockOp::Flush), 0, Ok(()));
        q[0].record(Some(BlockOp::Discard), 1 << 20, Ok(()));
        q[0].record(Some(BlockOp::WriteZeroes { unmap: false }), 1 << 20, Ok(()));
        q[0].record(None, 20, Ok(()));
        q[0].record(Some(BlockOp::Read), 4096, Err(RequestError::Io(libc::EIO)));
        q[0].record(
            Some(BlockOp::Read),
            4096,
            Err(RequestError::Io(libc::ESHUTDOWN)),
        );
        q[0].record(None, 0, Err(RequestError::Unsupported));
        q[0].record(
            Some(BlockOp::Write { fua: false }),
            0,
            Err(RequestError::Invalid),
        );
        let c = QueueSnapshot::of(&q[0]);
        assert_eq!(c.completed, [1; OP_KINDS]);
        assert_eq!(c.failed, [1; ERROR_KINDS]);
        assert_eq!((c.bytes_read, c.bytes_written), (4096, 512));
        let t = ExportTotals::of(&q);
        assert_eq!((t.requests, t.errors, t.flushes), (10, 4, 1));
    }

    #[test]
    fn percentiles_over_queues() {
        let queues = [QueueShared::default(), QueueShared::default()];
        for i in 0..1000u64 {
            queues[(i % 2) as usize].record_latency(Some(BlockOp::Read), 4096, Ok(()), 10_000 + i);
        }
        for _ in 0..5 {
            queues[0].record_latency(Some(BlockOp::Read), 4096, Ok(()), 5_000_000);
        }
        let p = LatencyPercentiles::of(&queues);
        assert_eq!(p.samples, 1005);
        assert!((10.0..12.0).contains(&p.p50_us), "{p:?}");
        assert!((10.0..12.0).contains(&p.p99_us), "{p:?}");
        assert!(p.p999_us >= 5000.0, "{p:?}");
    }
}
