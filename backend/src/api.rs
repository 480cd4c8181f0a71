//! The control plane's vocabulary: the params of every monitor method and
//! every result, as serde types. The monitor parses requests into them and
//! answers with them, `sluice ctl` builds its requests from them and reads
//! the answers into them, the config file's `[[disk]]` and `[[export]]` are
//! [`DiskParams`] and [`ExportParams`], and the ready lines are
//! [`ExportDescription`] and [`ControlReady`].
//!
//! The JSON field names are the wire format (README, `tests/tests/*.rs`):
//! renaming a field changes the protocol. Params refuse unknown fields;
//! results do not, so that a client reads an answer with fields added later.
//! Sent as a `serde_json::Value` (the monitor's answers, the ready lines), an
//! object's keys come out sorted, whatever the order of the fields here.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::graph::Holder;

// ---------------------------------------------------------------------------
// Params
// ---------------------------------------------------------------------------

/// `node_add` params, and a disk in the config file (`[[disk]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskParams {
    /// Node name.
    pub name: String,
    /// Block device, image file or `null:SIZE`. A relative path is taken
    /// from the config file's directory (config) or the daemon's working
    /// directory (monitor).
    pub path: String,
    /// Open without write access.
    #[serde(default)]
    pub read_only: bool,
    /// Create the image sparse with this size (`16M`, `1G`, bytes) if it is
    /// missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_size: Option<String>,
    /// When its drive was removed and its path comes back with the same
    /// drive (same serial, size and block size), open it again and serve it
    /// (default false; `sluice ctl node-reopen` does it by hand).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reattach: bool,
}

/// `export_add` params, and an export in the config file (`[[export]]`).
/// The config file calls the node `disk`, the monitor `node`; both are
/// accepted, and it is sent as `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// Export name.
    pub name: String,
    /// The node (disk) to serve.
    #[serde(alias = "node", rename(serialize = "node"))]
    pub disk: String,
    /// `"vhost-user"` or `"ublk"`. A string, so that an unknown type is
    /// refused with the list of known ones.
    #[serde(rename = "type")]
    pub kind: String,
    /// vhost-user: the socket path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// vhost-user: the socket's file mode (default 0o600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<u32>,
    /// ublk: the device id to ask for (default: the driver chooses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_id: Option<u32>,
    /// ublk: create the device with user recovery (default true): if sluice
    /// dies, the kernel keeps the device and holds its I/O until sluice is
    /// started again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_recovery: Option<bool>,
    // The numbers are wide, so a value out of range is refused with the real
    // range rather than the range of the field's type.
    /// Number of queues.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u64>,
    /// In-flight requests per queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u64>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Serial (GET_ID); default: the export name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Polling window in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_us: Option<u64>,
    /// What the export does when its node's drive goes away (default
    /// `fail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_removed: Option<OnRemoved>,
    /// QoS limits (`[export.qos]`); with `qos_group`, the group's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosSpec>,
    /// The QoS group the export is in: its limits apply to the sum of its
    /// exports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos_group: Option<String>,
}

/// QoS limits as given (`[export.qos]`, `export_qos`): requests and bytes
/// per second, total, read and write, and the burst. A limit left out is
/// not set. Checked by [`QosSpec::resolve`](crate::config) into
/// [`QosLimits`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    /// Requests per second (reads, writes, flushes, discards, write-zeroes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<i64>,
    /// Read requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<i64>,
    /// Write requests per second (discards and write-zeroes count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<i64>,
    /// Bytes per second read and written: a number or a size (`"200M"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps: Option<ByteRate>,
    /// Bytes per second read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<ByteRate>,
    /// Bytes per second written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<ByteRate>,
    /// How many seconds of its rate an idle export may send at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_seconds: Option<f64>,
}

// Only finite burst values pass `resolve`; equality is for configs compared
// in tests and by the fuzz target.
impl Eq for QosSpec {}

/// Bytes per second: a number, or a size string with a binary suffix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteRate {
    /// Bytes.
    Number(i64),
    /// `"200M"`, `"1G"`, `"4096"`.
    Text(String),
}

/// QoS limits in force (checked): what `export_qos`, `export_list` and
/// `export_stats` answer. `None`: not limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QosLimits {
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Read requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    /// Write requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    /// Bytes per second read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<u64>,
    /// Bytes per second written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<u64>,
    /// The burst, in seconds of each rate (set when a limit is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_seconds: Option<f64>,
    /// The group whose limits these are (`None`: the export's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

// `burst_seconds` is always finite (checked when set).
impl Eq for QosLimits {}

impl QosLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bps,
            self.read_bps,
            self.write_bps,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// The burst in nanoseconds.
    pub fn burst_ns(&self) -> u64 {
        let s = self
            .burst_seconds
            .unwrap_or(crate::limits::QOS_DEFAULT_BURST_SECONDS);
        (s * 1e9) as u64
    }
}

/// `export_qos` params: set (`qos`), lift (`clear`) or read the QoS limits
/// of an export's group, after moving the export into `group` if given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQosParams {
    /// The export.
    pub export: String,
    /// Move the export into this group (created without limits if new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The new limits, all at once: a limit left out is lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosSpec>,
    /// Lift every limit of the export's group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
}

/// What an export does when its node's drive goes away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRemoved {
    /// Stay, failing every request with an I/O error (until removed, or
    /// the node comes back).
    #[default]
    Fail,
    /// A ublk device is removed, as by `export_remove --force`; a
    /// vhost-user export keeps failing requests until it is removed.
    Stop,
}

/// How `export_remove` treats requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoveMode {
    /// Wait for them (drain), then detach.
    #[default]
    Safe,
    /// Wait far less for them (see `DrainBounds::FORCE`).
    Force,
}

/// `export_remove` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRemoveParams {
    /// Export name.
    pub name: String,
    /// `safe` (the default) or `force`.
    #[serde(default)]
    pub mode: RemoveMode,
}

/// Params naming a node or an export: `node_remove`, `export_stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// The node's or export's name.
    pub name: String,
}

/// Params naming a job: `job_status`, `job_cancel`, `job_complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobIdParams {
    /// Job id.
    pub id: String,
}

/// The params of a method that takes none (`{}`, or none at all): the
/// lists, `daemon_stats`, `shutdown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `job_mirror` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorParams {
    /// Job id (default: mirrorN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Source node.
    pub node: String,
    /// Target node (opened with `node_add`; served by no export).
    pub target: String,
    /// Copy chunk and bitmap granularity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_bytes: Option<u64>,
    /// Chunk copies in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u16>,
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// A node as `node_add` and `node_list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// What it was opened from.
    pub disk: String,
    /// Size.
    pub capacity_bytes: u64,
    /// Opened without write access.
    pub read_only: bool,
    /// `open`, or `removed` once its drive went away.
    #[serde(default)]
    pub state: NodeState,
    /// Who holds it.
    pub holders: Vec<Holder>,
}

/// Whether a node's drive is there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Served.
    #[default]
    Open,
    /// Its drive went away: every request fails with an I/O error.
    Removed,
}

/// What the daemon tells clients that called `events_subscribe`, each as
/// the params of a JSON-RPC notification `{"method": "event", "params": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A node's drive went away.
    NodeRemoved {
        /// The node.
        node: String,
        /// Its device.
        device: String,
        /// The exports that served it (and now fail every request).
        exports: Vec<String>,
    },
    /// A removed node's drive came back and was reopened.
    NodeReopened {
        /// The node.
        node: String,
        /// The exports that serve it again.
        exports: Vec<String>,
    },
    /// An export was stopped because its node's drive went away
    /// (`on_removed = "stop"`).
    ExportStopped {
        /// The export.
        export: String,
        /// Why.
        reason: String,
    },
    /// A node was opened (`node_add`).
    NodeAdded {
        /// The node.
        node: String,
        /// What it was opened from.
        disk: String,
        /// Its size.
        capacity_bytes: u64,
    },
    /// A node was flushed and closed: `node_remove`, or its last holder (an
    /// export, a job) let it go.
    NodeClosed {
        /// The node.
        node: String,
    },
    /// An export started serving (`export_add`).
    ExportAdded {
        /// The export.
        export: String,
        /// The node it serves.
        node: String,
        /// `type` and the socket or device.
        #[serde(flatten)]
        endpoint: ExportEndpoint,
    },
    /// An export was detached (`export_remove`, or `on_removed = "stop"`).
    ExportRemoved {
        /// The export.
        export: String,
        /// The node it served.
        node: String,
    },
    /// A vhost-user frontend (QEMU, a libblkio client) connected to an
    /// export's socket.
    FrontendConnected {
        /// The export.
        export: String,
    },
    /// The vhost-user frontend of an export went away (its connection
    /// ended; the export waits for the next one).
    FrontendDisconnected {
        /// The export.
        export: String,
        /// How the connection ended when it was not a clean hang-up.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A running job's progress, at most once per
    /// `JOB_PROGRESS_EVENT_INTERVAL_MS` per job until it is ready (the first
    /// when it starts copying).
    JobProgress {
        /// Job id.
        job: String,
        /// Bytes known to be in sync.
        done_bytes: u64,
        /// Size of the copy.
        total_bytes: u64,
        /// Bytes waiting to be (re)copied.
        dirty_bytes: u64,
    },
    /// A mirror is in sync for the first time: `job_complete` may pivot.
    JobReady {
        /// Job id.
        job: String,
        /// Size of the copy.
        total_bytes: u64,
    },
    /// A mirror was completed: its exports serve the target.
    JobCompleted {
        /// Job id.
        job: String,
        /// The node the exports served.
        source: String,
        /// The node they serve now.
        target: String,
        /// The exports that switched.
        exports: Vec<String>,
    },
    /// A job was cancelled (`job_cancel`, or close-all).
    JobCancelled {
        /// Job id.
        job: String,
    },
    /// A job stopped on an error (it stays listed, `failed`, until
    /// cancelled).
    JobFailed {
        /// Job id.
        job: String,
        /// What failed.
        error: String,
    },
}

/// The `event` of a ready line: always `"ready"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyEvent {
    /// The export (or the control socket) accepts its consumer.
    #[default]
    Ready,
}

/// Where an export's consumer finds it; its `type` says which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ExportEndpoint {
    /// vhost-user-blk on a UNIX socket.
    #[serde(rename = "vhost-user")]
    VhostUser {
        /// The socket path.
        socket: PathBuf,
    },
    /// A block device through the kernel's ublk driver.
    #[serde(rename = "ublk")]
    Ublk {
        /// The ublk device id N.
        dev_id: u32,
        /// `/dev/ublkbN`.
        device: PathBuf,
    },
}

/// One export as its ready line, `export_add` and (with more fields)
/// `export_list` describe it: the endpoint, the node's geometry and the
/// queues. Its [`Display`](fmt::Display) is the ready line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportDescription {
    /// Always `"ready"`.
    pub event: ReadyEvent,
    /// Export name.
    pub export: String,
    /// `type` and the socket or device.
    #[serde(flatten)]
    pub endpoint: ExportEndpoint,
    /// What the node serving it was opened from.
    pub disk: String,
    /// Size served.
    pub capacity_bytes: u64,
    /// Logical block size.
    pub logical_block_size_bytes: u32,
    /// Physical block size.
    pub physical_block_size_bytes: u32,
    /// The node has a volatile write cache (flushes matter).
    pub write_cache: bool,
    /// The node supports FUA writes.
    pub fua: bool,
    /// Largest discard; `null` when discard is not supported.
    pub discard_max_bytes: Option<u64>,
    /// Largest write-zeroes; `null` when it is not supported.
    pub write_zeroes_max_bytes: Option<u64>,
    /// Number of queues.
    pub queues: u16,
    /// In-flight requests per queue.
    pub queue_depth: u16,
    /// Writes are refused (the export's setting or a read-only node).
    pub read_only: bool,
}

/// One JSON line, keys sorted (it goes through a `serde_json::Value`, as the
/// monitor's answers do).
fn json_line(f: &mut fmt::Formatter<'_>, v: &impl Serialize) -> fmt::Result {
    match serde_json::to_value(v) {
        Ok(v) => write!(f, "{v}"),
        Err(_) => Err(fmt::Error),
    }
}

impl fmt::Display for ExportDescription {
    /// The ready line: one JSON object. Fails (as a `fmt::Error`) only for a
    /// path that is not UTF-8.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        json_line(f, self)
    }
}

/// The last ready line: the control socket listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReady {
    /// Always `"ready"`.
    pub event: ReadyEvent,
    /// The control socket.
    pub control: PathBuf,
}

impl fmt::Display for ControlReady {
    /// The ready line: one JSON object.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        json_line(f, self)
    }
}

/// The ready line of the metrics server (`--metrics`), before the control
/// socket's: where `GET /metrics` is served, with the port the kernel
/// picked for port 0 (`127.0.0.1:34567`), or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReady {
    /// Always `"ready"`.
    pub event: ReadyEvent,
    /// The address.
    pub metrics: String,
}

impl fmt::Display for MetricsReady {
    /// The ready line: one JSON object.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        json_line(f, self)
    }
}

/// Cumulative counters of one export.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportTotals {
    /// Requests completed.
    pub requests: u64,
    /// Requests that completed with an error status.
    pub errors: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests in flight now.
    pub in_flight: u32,
}

/// Completion latency percentiles of an export, in microseconds (upper
/// bounds of 1/8-octave buckets).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyPercentiles {
    /// Requests measured.
    pub samples: u64,
    /// Median.
    #[serde(deserialize_with = "null_is_infinite")]
    pub p50_us: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "null_is_infinite")]
    pub p99_us: f64,
    /// 99.9th percentile.
    #[serde(deserialize_with = "null_is_infinite")]
    pub p999_us: f64,
}

/// JSON has no infinity: serde_json writes a non-finite number as `null`,
/// and this reads it back (a percentile beyond the last bucket).
fn null_is_infinite<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

/// An export as `export_list` shows it: its description, node and counters
/// in one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// The ready-line description (type, endpoint, queues...).
    #[serde(flatten)]
    pub description: ExportDescription,
    /// The node it serves.
    pub node: String,
    /// Counters.
    pub stats: ExportTotals,
    /// QoS limits, when any is set or the export is in a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosLimits>,
}

/// What `export_stats` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Export name.
    pub name: String,
    /// The node it serves.
    pub node: String,
    /// Counters.
    pub stats: ExportTotals,
    /// Completion latency.
    pub latency: LatencyPercentiles,
    /// QoS limits, when any is set or the export is in a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosLimits>,
}

/// What `export_counters` answers: every export's cumulative per-queue
/// counters and latency histograms, for a client that samples them (`sluice
/// ctl top` computes rates and interval percentiles from two samples).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSample {
    /// When the counters were read: `CLOCK_MONOTONIC` of the daemon, in ns
    /// (differences of two samples are the interval).
    pub monotonic_ns: u64,
    /// One entry per export, in name order.
    pub exports: Vec<ExportCounters>,
}

/// One export's counters in `export_counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportCounters {
    /// Export name.
    pub export: String,
    /// The node it serves.
    pub node: String,
    /// `vhost-user` or `ublk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// One entry per queue, in queue order.
    pub queues: Vec<QueueCounters>,
}

/// One queue's cumulative counters (since the export started; a vhost-user
/// queue's go on across frontend connections).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    /// Queue index.
    pub queue: u16,
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Reads completed successfully.
    #[serde(default)]
    pub reads: u64,
    /// Writes completed successfully.
    #[serde(default)]
    pub writes: u64,
    /// Bytes read by completed requests.
    pub bytes_read: u64,
    /// Bytes written by completed requests.
    pub bytes_written: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests in flight now.
    pub in_flight: u32,
    /// The completion latency histogram: its non-empty buckets, in
    /// increasing order.
    pub latency: Vec<LatencyBucket>,
    /// Sum of the latencies the histogram counts, in nanoseconds.
    #[serde(default)]
    pub latency_sum_ns: u64,
}

/// One bucket of a latency histogram: `count` requests took at most
/// `upper_ns` (and more than the previous bucket's bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyBucket {
    /// Upper bound in nanoseconds; `null` for the last bucket, which has
    /// none (requests beyond about 69 s).
    pub upper_ns: Option<u64>,
    /// Requests in the bucket.
    pub count: u64,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobPhase {
    /// Copying; not yet in sync.
    Running,
    /// In sync once; keeps copying new changes.
    Ready,
    /// Stopped on an I/O error (see `error`).
    Failed,
}

impl JobPhase {
    /// The phase as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Running => "running",
            JobPhase::Ready => "ready",
            JobPhase::Failed => "failed",
        }
    }
}

/// What `job_status` reports (and `job_mirror`, `job_cancel`,
/// `job_complete`; `job_list` has one per job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// Job type (`"mirror"`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Source node.
    pub source: String,
    /// Target node.
    pub target: String,
    /// Phase.
    pub phase: JobPhase,
    /// Bytes known to be in sync.
    pub done_bytes: u64,
    /// Size of the copy.
    pub total_bytes: u64,
    /// Bytes waiting to be (re)copied.
    pub dirty_bytes: u64,
    /// Chunk size.
    pub chunk_bytes: u64,
    /// Chunk copies allowed in flight.
    pub max_in_flight: u16,
    /// Why the job failed.
    pub error: Option<String>,
}

/// What `node_remove` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoved {
    /// The node removed.
    pub removed: String,
}

/// What `export_remove` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRemoved {
    /// The export removed.
    pub removed: String,
    /// Its counters at the end.
    pub stats: ExportTotals,
}

/// What `daemon_stats` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStats {
    /// Heap allocations since the process started (see `alloc.rs`), except
    /// those of the metrics server's thread.
    pub heap_allocations: u64,
    /// Heap allocations of the metrics server's thread (its scrapes).
    #[serde(default)]
    pub metrics_heap_allocations: u64,
}

/// One entry of `rpc_methods`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    /// Method name.
    pub method: String,
    /// What it does and its params.
    pub description: String,
}

/// What `shutdown` answers (close-all runs after the answer is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownAnswer {
    /// Always `true`.
    pub shutting_down: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::{json, Value};

    /// Serializes `t`, checks that it reads back equal, and returns the JSON.
    fn round_trip<T>(t: &T) -> Value
    where
        T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    {
        let v = serde_json::to_value(t).expect("serializes");
        let back: T = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{v} does not read back: {e}"));
        assert_eq!(&back, t, "{v}");
        // Through text too, as it travels.
        let text = serde_json::to_string(t).expect("serializes to text");
        let back: T = serde_json::from_str(&text).expect("reads back from text");
        assert_eq!(&back, t, "{text}");
        v
    }

    fn vhost_description() -> ExportDescription {
        ExportDescription {
            event: ReadyEvent::Ready,
            export: "vm0".into(),
            endpoint: ExportEndpoint::VhostUser {
                socket: "/run/sluice/vm0.sock".into(),
            },
            disk: "/dev/nvme1n1".into(),
            capacity_bytes: 1 << 30,
            logical_block_size_bytes: 512,
            physical_block_size_bytes: 4096,
            write_cache: true,
            fua: false,
            discard_max_bytes: Some(4_294_963_200),
            write_zeroes_max_bytes: None,
            queues: 2,
            queue_depth: 128,
            read_only: false,
        }
    }

    fn ublk_description() -> ExportDescription {
        ExportDescription {
            endpoint: ExportEndpoint::Ublk {
                dev_id: 3,
                device: "/dev/ublkb3".into(),
            },
            export: "local".into(),
            read_only: true,
            ..vhost_description()
        }
    }

    fn totals() -> ExportTotals {
        ExportTotals {
            requests: 10,
            errors: 1,
            bytes_read: 4096,
            bytes_written: 8192,
            flushes: 2,
            in_flight: 3,
        }
    }

    fn job() -> JobStatus {
        JobStatus {
            id: "mirror0".into(),
            kind: "mirror".into(),
            source: "a".into(),
            target: "b".into(),
            phase: JobPhase::Running,
            done_bytes: 1 << 20,
            total_bytes: 4 << 20,
            dirty_bytes: 3 << 20,
            chunk_bytes: 65536,
            max_in_flight: 16,
            error: None,
        }
    }

    #[test]
    fn node_add_params_on_the_wire() {
        let p = DiskParams {
            reattach: false,
            name: "spare".into(),
            path: "/srv/spare.img".into(),
            read_only: false,
            create_size: Some("16M".into()),
        };
        assert_eq!(
            round_trip(&p),
            json!({"name": "spare", "path": "/srv/spare.img", "read_only": false, "create_size": "16M"})
        );
        let p = DiskParams {
            reattach: false,
            create_size: None,
            ..p
        };
        assert_eq!(
            round_trip(&p),
            json!({"name": "spare", "path": "/srv/spare.img", "read_only": false})
        );
        let d: DiskParams =
            serde_json::from_value(json!({"name": "n", "path": "null:1M"})).unwrap();
        assert!(!d.read_only);
        let e = serde_json::from_value::<DiskParams>(
            json!({"name": "n", "path": "null:1M", "colour": "red"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn export_add_params_on_the_wire() {
        let p = ExportParams {
            name: "vm2".into(),
            disk: "spare".into(),
            kind: "vhost-user".into(),
            socket: Some("/run/sluice/vm2.sock".into()),
            socket_mode: None,
            ublk_id: None,
            ublk_recovery: None,
            on_removed: None,
            queues: Some(2),
            queue_depth: None,
            read_only: false,
            serial: None,
            poll_us: Some(10),
            qos: None,
            qos_group: None,
        };
        // Sent with the monitor's name for the node.
        assert_eq!(
            round_trip(&p),
            json!({"name": "vm2", "node": "spare", "type": "vhost-user",
                   "socket": "/run/sluice/vm2.sock", "queues": 2, "read_only": false,
                   "poll_us": 10})
        );
        // The config file's name for it is read too.
        let from_config: ExportParams = serde_json::from_value(json!({
            "name": "vm2", "disk": "spare", "type": "vhost-user",
            "socket": "/run/sluice/vm2.sock", "queues": 2, "poll_us": 10
        }))
        .unwrap();
        assert_eq!(from_config, p);
        let ublk = ExportParams {
            kind: "ublk".into(),
            socket: None,
            ublk_id: Some(0),
            socket_mode: Some(0o660),
            queue_depth: Some(64),
            read_only: true,
            serial: Some("s".into()),
            ..p
        };
        assert_eq!(
            round_trip(&ublk),
            json!({"name": "vm2", "node": "spare", "type": "ublk", "ublk_id": 0,
                   "socket_mode": 0o660, "queues": 2, "queue_depth": 64,
                   "read_only": true, "serial": "s", "poll_us": 10})
        );
        let e = serde_json::from_value::<ExportParams>(
            json!({"name": "x", "node": "n", "type": "ublk", "force": true}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `force`"), "{e}");
    }

    #[test]
    fn small_params_on_the_wire() {
        let p = ExportRemoveParams {
            name: "vm2".into(),
            mode: RemoveMode::Force,
        };
        assert_eq!(round_trip(&p), json!({"name": "vm2", "mode": "force"}));
        let p = ExportRemoveParams {
            mode: RemoveMode::Safe,
            ..p
        };
        assert_eq!(round_trip(&p), json!({"name": "vm2", "mode": "safe"}));
        let defaulted: ExportRemoveParams = serde_json::from_value(json!({"name": "vm2"})).unwrap();
        assert_eq!(defaulted, p);
        assert!(serde_json::from_value::<ExportRemoveParams>(
            json!({"name": "x", "mode": "gentle"})
        )
        .is_err());

        let p = NameParams { name: "n".into() };
        assert_eq!(round_trip(&p), json!({"name": "n"}));
        assert!(serde_json::from_value::<NameParams>(json!({"name": ["n"]})).is_err());
        let p = JobIdParams {
            id: "mirror0".into(),
        };
        assert_eq!(round_trip(&p), json!({"id": "mirror0"}));
        assert_eq!(round_trip(&NoParams {}), json!({}));
        assert!(serde_json::from_value::<NoParams>(json!({"verbose": true})).is_err());

        let p = MirrorParams {
            id: None,
            node: "vm0-root".into(),
            target: "spare".into(),
            chunk_bytes: None,
            max_in_flight: None,
        };
        assert_eq!(
            round_trip(&p),
            json!({"node": "vm0-root", "target": "spare"})
        );
        let p = MirrorParams {
            id: Some("m".into()),
            chunk_bytes: Some(1 << 20),
            max_in_flight: Some(4),
            ..p
        };
        assert_eq!(
            round_trip(&p),
            json!({"id": "m", "node": "vm0-root", "target": "spare",
                   "chunk_bytes": 1 << 20, "max_in_flight": 4})
        );
    }

    #[test]
    fn events_on_the_wire() {
        let e = Event::NodeRemoved {
            node: "d1".into(),
            device: "/dev/nvme1n1".into(),
            exports: vec!["u1".into()],
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "node_removed", "node": "d1", "device": "/dev/nvme1n1",
                   "exports": ["u1"]})
        );
        let e = Event::ExportStopped {
            export: "u1".into(),
            reason: "r".into(),
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "export_stopped", "export": "u1", "reason": "r"})
        );
        assert_eq!(round_trip(&OnRemoved::Stop), json!("stop"));
        let e = Event::ExportAdded {
            export: "vm2".into(),
            node: "spare".into(),
            endpoint: ExportEndpoint::VhostUser {
                socket: "/run/sluice/vm2.sock".into(),
            },
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "export_added", "export": "vm2", "node": "spare",
                   "type": "vhost-user", "socket": "/run/sluice/vm2.sock"})
        );
        let e = Event::ExportAdded {
            export: "u".into(),
            node: "n".into(),
            endpoint: ExportEndpoint::Ublk {
                dev_id: 3,
                device: "/dev/ublkb3".into(),
            },
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "export_added", "export": "u", "node": "n", "type": "ublk",
                   "dev_id": 3, "device": "/dev/ublkb3"})
        );
        let e = Event::FrontendDisconnected {
            export: "vm0".into(),
            error: None,
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "frontend_disconnected", "export": "vm0"})
        );
        let e = Event::JobProgress {
            job: "mirror0".into(),
            done_bytes: 1,
            total_bytes: 3,
            dirty_bytes: 2,
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "job_progress", "job": "mirror0", "done_bytes": 1,
                   "total_bytes": 3, "dirty_bytes": 2})
        );
        let e = Event::JobFailed {
            job: "m".into(),
            error: "read chunk 3 of the source: EIO".into(),
        };
        assert_eq!(
            round_trip(&e),
            json!({"event": "job_failed", "job": "m",
                   "error": "read chunk 3 of the source: EIO"})
        );
        for (e, name) in [
            (
                Event::NodeAdded {
                    node: "n".into(),
                    disk: "null:1M".into(),
                    capacity_bytes: 1 << 20,
                },
                "node_added",
            ),
            (Event::NodeClosed { node: "n".into() }, "node_closed"),
            (
                Event::ExportRemoved {
                    export: "x".into(),
                    node: "n".into(),
                },
                "export_removed",
            ),
            (
                Event::FrontendConnected { export: "x".into() },
                "frontend_connected",
            ),
            (
                Event::JobReady {
                    job: "m".into(),
                    total_bytes: 1,
                },
                "job_ready",
            ),
            (
                Event::JobCompleted {
                    job: "m".into(),
                    source: "a".into(),
                    target: "b".into(),
                    exports: vec!["x".into()],
                },
                "job_completed",
            ),
            (Event::JobCancelled { job: "m".into() }, "job_cancelled"),
        ] {
            assert_eq!(round_trip(&e)["event"], name);
        }
    }

    #[test]
    fn export_counters_on_the_wire() {
        let sample = CountersSample {
            monotonic_ns: 5,
            exports: vec![ExportCounters {
                export: "vm0".into(),
                node: "disk0".into(),
                kind: "vhost-user".into(),
                queues: vec![QueueCounters {
                    queue: 1,
                    requests: 10,
                    errors: 1,
                    reads: 1,
                    writes: 2,
                    bytes_read: 4096,
                    bytes_written: 8192,
                    flushes: 2,
                    in_flight: 3,
                    latency_sum_ns: 12_345,
                    latency: vec![
                        LatencyBucket {
                            upper_ns: Some(1152),
                            count: 9,
                        },
                        LatencyBucket {
                            upper_ns: None,
                            count: 1,
                        },
                    ],
                }],
            }],
        };
        assert_eq!(
            round_trip(&sample),
            json!({"monotonic_ns": 5, "exports": [{"export": "vm0", "node": "disk0",
                   "type": "vhost-user", "queues": [{"queue": 1, "requests": 10, "errors": 1,
                   "reads": 1, "writes": 2,
                   "bytes_read": 4096, "bytes_written": 8192, "flushes": 2, "in_flight": 3,
                   "latency": [{"upper_ns": 1152, "count": 9},
                               {"upper_ns": null, "count": 1}],
                   "latency_sum_ns": 12_345}]}]})
        );
    }

    #[test]
    fn node_info_on_the_wire() {
        let n = NodeInfo {
            name: "disk0".into(),
            disk: "null:64M".into(),
            capacity_bytes: 64 << 20,
            read_only: false,
            state: NodeState::Open,
            holders: vec![
                Holder::Monitor,
                Holder::Export("vm".into()),
                Holder::Job("mirror0".into()),
            ],
        };
        assert_eq!(
            round_trip(&n),
            json!({"name": "disk0", "disk": "null:64M", "capacity_bytes": 64 << 20,
                   "read_only": false, "state": "open",
                   "holders": [{"kind": "monitor"}, {"kind": "export", "name": "vm"},
                               {"kind": "job", "name": "mirror0"}]})
        );
    }

    #[test]
    fn export_description_is_the_ready_line() {
        let d = vhost_description();
        assert_eq!(
            round_trip(&d),
            json!({"event": "ready", "export": "vm0", "type": "vhost-user",
                   "socket": "/run/sluice/vm0.sock", "disk": "/dev/nvme1n1",
                   "capacity_bytes": 1 << 30, "logical_block_size_bytes": 512,
                   "physical_block_size_bytes": 4096, "write_cache": true, "fua": false,
                   "discard_max_bytes": 4_294_963_200u64, "write_zeroes_max_bytes": null,
                   "queues": 2, "queue_depth": 128, "read_only": false})
        );
        // The line itself, byte for byte: keys sorted, as before the types.
        assert_eq!(
            d.to_string(),
            r#"{"capacity_bytes":1073741824,"discard_max_bytes":4294963200,"disk":"/dev/nvme1n1","event":"ready","export":"vm0","fua":false,"logical_block_size_bytes":512,"physical_block_size_bytes":4096,"queue_depth":128,"queues":2,"read_only":false,"socket":"/run/sluice/vm0.sock","type":"vhost-user","write_cache":true,"write_zeroes_max_bytes":null}"#
        );
        let u = ublk_description();
        let v = round_trip(&u);
        assert_eq!(v["type"], "ublk");
        assert_eq!(v["dev_id"], 3);
        assert_eq!(v["device"], "/dev/ublkb3");
        assert!(v.get("socket").is_none(), "{v}");
        assert_eq!(
            round_trip(&ControlReady {
                event: ReadyEvent::Ready,
                control: "/run/sluice/control.sock".into()
            }),
            json!({"event": "ready", "control": "/run/sluice/control.sock"})
        );
        assert_eq!(
            ControlReady {
                event: ReadyEvent::Ready,
                control: "/c.sock".into()
            }
            .to_string(),
            r#"{"control":"/c.sock","event":"ready"}"#
        );
        // An unknown export type is not read as either.
        let mut bad = serde_json::to_value(&d).unwrap();
        bad["type"] = json!("nbd");
        assert!(serde_json::from_value::<ExportDescription>(bad).is_err());
    }

    #[test]
    fn export_list_and_stats_on_the_wire() {
        let info = ExportInfo {
            description: ublk_description(),
            node: "scratch".into(),
            stats: totals(),
            qos: None,
        };
        let v = round_trip(&info);
        let mut want = serde_json::to_value(ublk_description()).unwrap();
        want["node"] = json!("scratch");
        want["stats"] = json!({"requests": 10, "errors": 1, "bytes_read": 4096,
                               "bytes_written": 8192, "flushes": 2, "in_flight": 3});
        assert_eq!(v, want);
        round_trip(&ExportInfo {
            description: vhost_description(),
            ..info
        });

        let st = ExportStats {
            name: "vm0".into(),
            node: "disk0".into(),
            stats: totals(),
            latency: LatencyPercentiles {
                samples: 10,
                p50_us: 11.264,
                p99_us: 20.0,
                p999_us: 5120.0,
            },
            qos: Some(QosLimits {
                iops: Some(5000),
                bps: Some(200 << 20),
                burst_seconds: Some(0.1),
                group: Some("tenant-a".into()),
                ..QosLimits::default()
            }),
        };
        assert_eq!(
            round_trip(&st),
            json!({"name": "vm0", "node": "disk0",
                   "stats": {"requests": 10, "errors": 1, "bytes_read": 4096,
                             "bytes_written": 8192, "flushes": 2, "in_flight": 3},
                   "latency": {"samples": 10, "p50_us": 11.264, "p99_us": 20.0,
                               "p999_us": 5120.0},
                   "qos": {"iops": 5000, "bps": 209715200, "burst_seconds": 0.1,
                           "group": "tenant-a"}})
        );
        // No latency yet, and one beyond every bucket (JSON has no infinity).
        round_trip(&LatencyPercentiles::default());
        let far = LatencyPercentiles {
            samples: 1,
            p50_us: f64::INFINITY,
            p99_us: f64::INFINITY,
            p999_us: f64::INFINITY,
        };
        let v = serde_json::to_value(far).unwrap();
        assert_eq!(v["p999_us"], Value::Null);
        assert_eq!(
            serde_json::from_value::<LatencyPercentiles>(v).unwrap(),
            far
        );
    }

    #[test]
    fn job_status_on_the_wire() {
        assert_eq!(
            round_trip(&job()),
            json!({"id": "mirror0", "type": "mirror", "source": "a", "target": "b",
                   "phase": "running", "done_bytes": 1 << 20, "total_bytes": 4 << 20,
                   "dirty_bytes": 3 << 20, "chunk_bytes": 65536, "max_in_flight": 16,
                   "error": null})
        );
        let failed = JobStatus {
            phase: JobPhase::Failed,
            error: Some("read: EIO".into()),
            ..job()
        };
        assert_eq!(round_trip(&failed)["error"], "read: EIO");
        for phase in [JobPhase::Running, JobPhase::Ready, JobPhase::Failed] {
            assert_eq!(round_trip(&phase), json!(phase.as_str()));
        }
        round_trip(&vec![job(), failed]);
    }

    #[test]
    fn small_answers_on_the_wire() {
        assert_eq!(
            round_trip(&NodeRemoved {
                removed: "n".into()
            }),
            json!({"removed": "n"})
        );
        assert_eq!(
            round_trip(&ExportRemoved {
                removed: "x".into(),
                stats: ExportTotals::default()
            }),
            json!({"removed": "x", "stats": {"requests": 0, "errors": 0, "bytes_read": 0,
                   "bytes_written": 0, "flushes": 0, "in_flight": 0}})
        );
        assert_eq!(
            round_trip(&DaemonStats {
                heap_allocations: 2074,
                metrics_heap_allocations: 12
            }),
            json!({"heap_allocations": 2074, "metrics_heap_allocations": 12})
        );
        assert_eq!(
            round_trip(&MethodInfo {
                method: "shutdown".into(),
                description: "close everything".into()
            }),
            json!({"method": "shutdown", "description": "close everything"})
        );
        assert_eq!(
            round_trip(&ShutdownAnswer {
                shutting_down: true
            }),
            json!({"shutting_down": true})
        );
    }
}
