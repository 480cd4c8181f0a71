//! Every limit of the daemon, named with its unit, in one place.

/// Data segments (iovecs) one request may carry. Advertised to virtio guests
/// as `seg_max` (capped by the queue size); the slot table reserves this many
/// iovecs per in-flight slot, so it bounds memory too.
pub const MAX_SEGMENTS: usize = 128;

/// Largest single data segment, advertised as virtio-blk `size_max`.
pub const SEGMENT_MAX_BYTES: u32 = 1 << 20;

/// Bounce buffer reserved per in-flight slot for requests that miss the
/// device's direct-I/O alignment. Such requests larger than this fail with an
/// I/O error; guests that honour the advertised block size and alignment
/// never send them.
pub const BOUNCE_SLOT_BYTES: usize = 1 << 20;

/// Default and largest queue depth (in-flight requests per queue).
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Largest queue depth: the vring size cap of virtio split queues we accept.
pub const MAX_QUEUE_DEPTH: u16 = 1024;

/// Default and largest number of queues per export.
pub const DEFAULT_QUEUES: u16 = 1;
/// Largest number of queues per export (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Default window during which an idle queue thread keeps polling its vring
/// and completion queue before it arms notifications and sleeps.
/// See README "Performance" for the measurement behind the value.
pub const DEFAULT_POLL_WINDOW_US: u32 = 50;
/// While polling, a queue thread yields its core this often, so another
/// queue's thread, the consumer or the kernel worker doing the I/O can run
/// there (measured: two busy queues on one core went from 1.4M to 2.2M IOPS).
pub const POLL_YIELD_INTERVAL_US: u64 = 4;
/// Largest accepted polling window.
pub const MAX_POLL_WINDOW_US: u32 = 1_000_000;

/// How long shutdown waits for in-flight requests of one queue to complete.
pub const DRAIN_TIMEOUT_MS: u64 = 10_000;

/// After a vhost-user export drained, it keeps answering new requests with
/// IOERR until the guest has sent none for this long, then detaches: QEMU
/// keeps the rings of a disconnected backend for a reconnect, so a request
/// queued after the detach would wait forever instead of failing.
pub const DETACH_QUIET_MS: u64 = 200;
/// Longest the quiet wait lasts for a guest that keeps retrying.
pub const DETACH_QUIET_LIMIT_MS: u64 = 5_000;

/// How long the daemon waits for a node's final flush.
pub const FLUSH_TIMEOUT_MS: u64 = 30_000;

/// Longest pause between attempts to take a frontend after a failure (for
/// example the process ran out of descriptors); pauses start at 10 ms and
/// double.
pub const ACCEPT_RETRY_MAX_MS: u64 = 1_000;
/// After the first line, failures to take a frontend are summed up in one log
/// line at most this often.
pub const ACCEPT_FAILURE_LOG_INTERVAL_MS: u64 = 10_000;

/// Forced `export_remove`: how long requests in flight may take to complete
/// (and be answered with their status) before the export is detached anyway.
pub const FORCE_DRAIN_TIMEOUT_MS: u64 = 1_000;
/// Forced `export_remove`: the longest wait for the guest to stop sending
/// (its new requests fail) before the detach.
pub const FORCE_QUIET_LIMIT_MS: u64 = 1_000;
/// Close-all as a whole: drain, detach, release, flush and job cancel share
/// this deadline; what is not done by then is reported and the daemon exits 1.
pub const CLOSE_ALL_TIMEOUT_MS: u64 = 30_000;
/// `job_cancel`: stopping the copier (its copies in flight get
/// `DRAIN_TIMEOUT_MS` per engine) and flushing the target.
pub const JOB_CANCEL_TIMEOUT_MS: u64 = 30_000;

/// A second SIGINT/SIGTERM during close-all: how long the flush of the nodes
/// still open may take before the daemon exits anyway.
pub const EMERGENCY_FLUSH_TIMEOUT_MS: u64 = 5_000;

/// How often one kind of data-path trouble (a failed submit, a short
/// transfer, an op the kernel sent that we do not know) may be logged per
/// queue; the lines in between are counted.
pub const DATA_PATH_LOG_INTERVAL_MS: u64 = 10_000;

/// How often a rate-limited warning about bad guest input may be logged.
pub const BAD_REQUEST_LOG_INTERVAL_MS: u64 = 1_000;

/// Serial numbers are cut to the virtio-blk GET_ID size.
pub const SERIAL_MAX_BYTES: usize = 20;

/// A dependency's log line (virtio-queue, vhost-user-backend, libublk...)
/// from one call site on one thread is written at most this often; the
/// lines dropped in between are counted and reported with the next one.
pub const DEPENDENCY_LOG_INTERVAL_MS: u64 = 10_000;
/// Call sites × threads the dependency log limiter tracks; beyond this the
/// least recently written is forgotten (bounds the limiter's memory).
pub const DEPENDENCY_LOG_MAX_KEYS: usize = 1_024;

/// After a node's first error of one operation kind (read, write, ...) is
/// logged, further errors of that kind on that queue are summed up in one
/// line at most this often while they continue.
pub const BACKING_ERROR_LOG_INTERVAL_MS: u64 = 10_000;

/// How often the hot-plug watcher checks every block node against sysfs
/// even without a uevent: a removed drive is noticed within this.
pub const HOTPLUG_CHECK_INTERVAL_MS: u64 = 500;
/// How often a client streaming events (`events_subscribe`) is checked for
/// having gone away while no event comes.
pub const EVENT_STREAM_CHECK_MS: u64 = 1_000;
/// A running job's `job_progress` event is sent at most this often (the
/// first when it starts copying).
pub const JOB_PROGRESS_EVENT_INTERVAL_MS: u64 = 1_000;

/// Events queued for one `events_subscribe` client at most: a client this
/// far behind is dropped rather than grow the daemon's memory.
pub const EVENT_QUEUE_EVENTS: usize = 1024;

/// One metrics connection, from its accept to the last byte of the answer,
/// takes at most this long; the server serves one connection at a time,
/// so a client that stalls holds back other scrapes at most this long
/// (Prometheus' default scrape timeout is 10 s).
pub const METRICS_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// Longest HTTP request head the metrics server reads (request line and
/// headers); a longer one is answered 400.
pub const METRICS_MAX_REQUEST_BYTES: usize = 8 * 1024;
/// After answering, the metrics server reads what the client still sends
/// for at most this long (until it closes), so that closing with unread
/// input does not reset the connection under the answer.
pub const METRICS_LINGER_MS: u64 = 200;
/// After a failed accept (out of descriptors), the metrics server waits
/// this long before it tries again, instead of spinning on a listener that
/// stays readable.
pub const METRICS_ACCEPT_FAILURE_PAUSE_MS: u64 = 100;

/// QoS: the longest a queue sleeps on a throttled request before it looks
/// at its limits again, so a changed or cleared limit applies within this.
pub const QOS_MAX_WAIT_MS: u64 = 100;
/// QoS: the default burst, in seconds of the rate: an idle export may send
/// this much of its limit at once before it is held to the rate.
pub const QOS_DEFAULT_BURST_SECONDS: f64 = 0.1;
/// QoS: the smallest and the largest burst, in seconds of the rate.
pub const QOS_MIN_BURST_SECONDS: f64 = 0.001;
/// QoS: the largest burst, in seconds of the rate.
pub const QOS_MAX_BURST_SECONDS: f64 = 3600.0;
