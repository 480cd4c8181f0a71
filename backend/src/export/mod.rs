//! Exports: protocol fronts that turn one protocol's requests into block
//! requests on one node. Nothing below `export/` is known to the engine or the
//! nodes; nothing outside it knows a wire protocol.

pub mod ublk;
pub mod vhost_user;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;
use crate::request::BlockOp;

/// A running export of either protocol.
#[derive(Debug)]
pub enum Export {
    /// vhost-user-blk over a UNIX socket.
    VhostUser(vhost_user::VhostUserExport),
    /// `/dev/ublkbN` through the kernel's ublk driver.
    Ublk(ublk::UblkExport),
}

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        match self {
            Export::VhostUser(x) => &x.config().name,
            Export::Ublk(x) => &x.config().name,
        }
    }

    /// The node it holds.
    pub fn node(&self) -> &Arc<Node> {
        match self {
            Export::VhostUser(x) => x.node(),
            Export::Ublk(x) => x.node(),
        }
    }

    /// Cumulative statistics.
    pub fn totals(&self) -> ExportTotals {
        match self {
            Export::VhostUser(x) => x.totals(),
            Export::Ublk(x) => x.totals(),
        }
    }

    /// Close-all step 1: wait until nothing is in flight (vhost-user also
    /// stops admitting). Returns the queues that stayed busy.
    pub fn drain(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        match self {
            Export::VhostUser(x) => x.drain(timeout),
            Export::Ublk(x) => x.drain(timeout),
        }
    }

    /// Close-all step 2 (and runtime removal): detach from the consumer and
    /// give the node reference back.
    pub fn detach(self, timeout: Duration) -> Result<Arc<Node>, ExportError> {
        match self {
            Export::VhostUser(x) => x.detach(timeout),
            Export::Ublk(x) => x.detach(timeout),
        }
    }

    /// The JSON object of the ready line.
    pub fn describe(&self) -> serde_json::Value {
        let limits = self.node().limits();
        let mut v = serde_json::json!({
            "event": "ready",
            "export": self.name(),
            "disk": self.node().spec().to_string(),
            "capacity_bytes": limits.capacity_bytes,
            "logical_block_size_bytes": limits.logical_block_size_bytes,
            "physical_block_size_bytes": limits.physical_block_size_bytes,
            "write_cache": limits.volatile_write_cache,
            "fua": limits.fua,
            "discard_max_bytes": limits.discard_max_bytes,
            "write_zeroes_max_bytes": limits.write_zeroes_max_bytes,
        });
        let extra = match self {
            Export::VhostUser(x) => serde_json::json!({
                "type": "vhost-user",
                "socket": x.config().socket,
                "queues": x.config().queues,
                "queue_depth": x.config().queue_depth,
                "read_only": x.read_only(),
            }),
            Export::Ublk(x) => serde_json::json!({
                "type": "ublk",
                "dev_id": x.dev_id(),
                "device": x.bdev_path(),
                "queues": x.config().queues,
                "queue_depth": x.config().queue_depth,
                "read_only": x.read_only(),
            }),
        };
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    }
}

/// Why an export could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The socket path cannot be served.
    #[error("vhost-user socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// What failed and what to do.
        reason: String,
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
    /// The vhost-user library refused to start.
    #[error("export {export}: {reason}")]
    Start {
        /// The export.
        export: String,
        /// What failed.
        reason: String,
    },
}

/// Counters and state the queue thread shares with the rest of the daemon.
/// Written by the queue thread only; read by anyone (relaxed).
#[derive(Debug, Default)]
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
}

impl QueueShared {
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

/// Cumulative counters of one export.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
pub fn wait_idle(q: &QueueShared, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while q.in_flight.load(Ordering::Relaxed) > 0 {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    true
}
