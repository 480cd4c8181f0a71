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
use crate::request::BlockOp;

// The counters' types are control-plane results (api.rs); how they are
// summed over the queues is here.
pub(crate) use crate::api::{ExportTotals, LatencyPercentiles};

/// Starts the export `config` describes on `node`.
pub(crate) fn start_export(
    node: Arc<Node>,
    config: &crate::config::ExportConfig,
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

/// Counters and state the queue thread shares with the rest of the daemon.
/// Written by the queue thread only; read by anyone (relaxed).
#[derive(Debug)]
pub struct QueueShared {
    /// Requests submitted and not yet completed.
    pub in_flight: AtomicU32,
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Bytes read by completed requests.
    pub bytes_read: AtomicU64,
    /// Bytes written by completed requests.
    pub bytes_written: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Completion latency histogram (see [`LATENCY_BUCKETS`]).
    pub latency: [AtomicU64; LATENCY_BUCKETS],
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
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            ring_stopped: AtomicBool::new(false),
            pause_ack: AtomicU64::new(0),
        }
    }
}

impl LatencyPercentiles {
    /// Percentiles over the histograms of `queues`.
    pub fn of(queues: &[QueueShared]) -> Self {
        let mut sum = [0u64; LATENCY_BUCKETS];
        for q in queues {
            for (s, b) in sum.iter_mut().zip(q.latency.iter()) {
                *s += b.load(Ordering::Relaxed);
            }
        }
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
/// atomics by the queue thread, read by the monitor.
const LATENCY_SUB_BUCKETS: usize = 8;
const LATENCY_MIN_SHIFT: u32 = 10;
const LATENCY_OCTAVES: usize = 26;
/// Number of latency buckets per queue.
pub(crate) const LATENCY_BUCKETS: usize = LATENCY_OCTAVES * LATENCY_SUB_BUCKETS + 1;

fn latency_bucket(ns: u64) -> usize {
    let ns = ns.max(1 << LATENCY_MIN_SHIFT);
    let octave = (63 - ns.leading_zeros()) - LATENCY_MIN_SHIFT;
    if octave as usize >= LATENCY_OCTAVES {
        return LATENCY_BUCKETS - 1;
    }
    let sub = (ns >> (octave + LATENCY_MIN_SHIFT - 3)) as usize & (LATENCY_SUB_BUCKETS - 1);
    octave as usize * LATENCY_SUB_BUCKETS + sub
}

/// The upper bound in nanoseconds of bucket `b`.
fn latency_bucket_upper_ns(b: usize) -> u64 {
    if b >= LATENCY_BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = (b / LATENCY_SUB_BUCKETS) as u32;
    let sub = (b % LATENCY_SUB_BUCKETS) as u64;
    let base = 1u64 << (octave + LATENCY_MIN_SHIFT);
    base + (sub + 1) * (base / LATENCY_SUB_BUCKETS as u64)
}

impl QueueShared {
    /// Counts one completed request that took `latency_ns`.
    pub fn record_latency(&self, op: Option<BlockOp>, len_bytes: u64, ok: bool, latency_ns: u64) {
        self.latency[latency_bucket(latency_ns)].fetch_add(1, Ordering::Relaxed);
        self.record(op, len_bytes, ok);
    }

    /// Counts one completed request.
    pub fn record(&self, op: Option<BlockOp>, len_bytes: u64, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match op {
            Some(BlockOp::Read) => {
                self.bytes_read.fetch_add(len_bytes, Ordering::Relaxed);
            }
            Some(BlockOp::Write { .. }) => {
                self.bytes_written.fetch_add(len_bytes, Ordering::Relaxed);
            }
            Some(BlockOp::Flush) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl ExportTotals {
    /// Sums the counters of `queues`.
    pub fn of(queues: &[QueueShared]) -> Self {
        let mut t = ExportTotals::default();
        for q in queues {
            t.requests += q.requests.load(Ordering::Relaxed);
            t.errors += q.errors.load(Ordering::Relaxed);
            t.bytes_read += q.bytes_read.load(Ordering::Relaxed);
            t.bytes_written += q.bytes_written.load(Ordering::Relaxed);
            t.flushes += q.flushes.load(Ordering::Relaxed);
            t.in_flight += q.in_flight.load(Ordering::Relaxed);
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
    fn percentiles_over_queues() {
        let queues = [QueueShared::default(), QueueShared::default()];
        for i in 0..1000u64 {
            queues[(i % 2) as usize].record_latency(Some(BlockOp::Read), 4096, true, 10_000 + i);
        }
        for _ in 0..5 {
            queues[0].record_latency(Some(BlockOp::Read), 4096, true, 5_000_000);
        }
        let p = LatencyPercentiles::of(&queues);
        assert_eq!(p.samples, 1005);
        assert!((10.0..12.0).contains(&p.p50_us), "{p:?}");
        assert!((10.0..12.0).contains(&p.p99_us), "{p:?}");
        assert!(p.p999_us >= 5000.0, "{p:?}");
    }
}
