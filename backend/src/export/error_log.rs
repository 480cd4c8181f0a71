//! Logging of backing-device errors from a queue's completion path.
//!
//! A failing drive or a full file system fails every request: logging each
//! would flood the host, logging none leaves the operator with only counters
//! (issue 9: 3.3 M ENOSPC failures, no log line). Each queue owns one
//! [`BackingErrorLog`]: no lock, no atomics, no allocation per error. The
//! first error of each operation kind on a node is logged with its details;
//! while errors continue, one summary with counts per
//! [`BACKING_ERROR_LOG_INTERVAL_MS`]; what is still uncounted when the queue
//! goes away (disconnect, export removal) is logged then.

use std::time::{Duration, Instant};

use crate::limits::BACKING_ERROR_LOG_INTERVAL_MS;
use crate::request::BlockOp;

/// Operation kinds counted separately (FUA writes count as writes).
const KINDS: usize = 5;

fn kind_of(op: BlockOp) -> usize {
    match op {
        BlockOp::Read => 0,
        BlockOp::Write { .. } => 1,
        BlockOp::Flush => 2,
        BlockOp::Discard => 3,
        BlockOp::WriteZeroes { .. } => 4,
    }
}

const KIND_NAMES: [&str; KINDS] = ["read", "write", "flush", "discard", "write-zeroes"];

/// Symbolic names of the errnos a block device or file system answers with;
/// others are shown as their number.
pub(crate) fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EFBIG => "EFBIG",
        libc::EROFS => "EROFS",
        libc::ENXIO => "ENXIO",
        libc::ENODEV => "ENODEV",
        libc::ENOMEDIUM => "ENOMEDIUM",
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTTY => "ENOTTY",
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::ENOLINK => "ENOLINK",
        libc::EREMOTEIO => "EREMOTEIO",
        libc::EBADMSG => "EBADMSG",
        libc::EILSEQ => "EILSEQ",
        libc::ENODATA => "ENODATA",
        libc::ESTALE => "ESTALE",
        libc::EBUSY => "EBUSY",
        _ => return None,
    })
}

/// "ENOSPC: No space left on device" (the log path only: it allocates).
fn describe_errno(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    match errno_name(errno) {
        Some(name) => format!("{name}: {text}"),
        None => format!("errno {errno}: {text}"),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct KindState {
    /// The first error of this kind on the current node was logged, at this
    /// time or the last summary's.
    last_line: Option<Instant>,
    /// Errors since the last line.
    count: u64,
    /// The latest of them.
    errno: i32,
    /// They did not all have the same errno.
    mixed: bool,
    offset_bytes: u64,
    len_bytes: u64,
}

/// One queue's backing-error reporter (see the module documentation).
#[derive(Debug)]
pub(crate) struct BackingErrorLog {
    export: Box<str>,
    queue: usize,
    interval: Duration,
    /// The node the states below are about; errors on another node (after
    /// a pivot) start over with a first line.
    node: String,
    kinds: [KindState; KINDS],
}

impl BackingErrorLog {
    /// A reporter for queue `queue` of export `export`.
    pub(crate) fn new(export: &str, queue: usize) -> Self {
        Self::with_interval(
            export,
            queue,
            Duration::from_millis(BACKING_ERROR_LOG_INTERVAL_MS),
        )
    }

    /// As [`new`](Self::new), with another summary interval.
    pub(crate) fn with_interval(export: &str, queue: usize, interval: Duration) -> Self {
        BackingErrorLog {
            export: export.into(),
            queue,
            interval,
            node: String::new(),
            kinds: [KindState::default(); KINDS],
        }
    }

    /// Counts a failed backing operation, logging if it is the first of its
    /// kind on `node` or a summary is due.
    pub(crate) fn record(
        &mut self,
        node: &str,
        op: BlockOp,
        errno: i32,
        offset_bytes: u64,
        len_bytes: u64,
    ) {
        self.record_at(Instant::now(), node, op, errno, offset_bytes, len_bytes);
    }

    /// [`record`](Self::record) at a given time. Returns whether a line was
    /// logged.
    pub(crate) fn record_at(
        &mut self,
        now: Instant,
        node: &str,
        op: BlockOp,
        errno: i32,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> bool {
        if self.node != node {
            self.flush(now);
            node.clone_into(&mut self.node);
            self.kinds = [KindState::default(); KINDS];
        }
        let k = kind_of(op);
        let s = &mut self.kinds[k];
        let Some(last_line) = s.last_line else {
            s.last_line = Some(now);
            tracing::error!(
                "node {}: {} of {len_bytes} bytes at offset {offset_bytes} failed ({}) on export {} \
                 (queue {}); further {} errors on this queue are counted and summed up every {} s \
                 while they continue",
                self.node,
                KIND_NAMES[k],
                describe_errno(errno),
                self.export,
                self.queue,
                KIND_NAMES[k],
                self.interval.as_secs_f64(),
            );
            return true;
        };
        s.mixed |= s.count > 0 && s.errno != errno;
        s.count += 1;
        s.errno = errno;
        s.offset_bytes = offset_bytes;
        s.len_bytes = len_bytes;
        if now.saturating_duration_since(last_line) < self.interval {
            return false;
        }
        self.summarize(k, now);
        true
    }

    /// Logs the summary of kind `k` and starts counting again.
    fn summarize(&mut self, k: usize, now: Instant) {
        let s = &mut self.kinds[k];
        let over = s
            .last_line
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        tracing::error!(
            "node {}: {} {} errors ({}{}) in the last {:.1} s on export {} (queue {}), \
             the latest {} bytes at offset {}",
            self.node,
            s.count,
            KIND_NAMES[k],
            if s.mixed { "latest " } else { "" },
            describe_errno(s.errno),
            over.as_secs_f64(),
            self.export,
            self.queue,
            s.len_bytes,
            s.offset_bytes,
        );
        s.count = 0;
        s.mixed = false;
        s.last_line = Some(now);
    }

    /// Logs the summary of every kind with uncounted errors.
    pub(crate) fn flush(&mut self, now: Instant) {
        for k in 0..KINDS {
            if self.kinds[k].count > 0 {
                self.summarize(k, now);
            }
        }
    }

    /// Errors of `op`'s kind not yet in a line.
    #[cfg(test)]
    fn pending(&self, op: BlockOp) -> u64 {
        self.kinds[kind_of(op)].count
    }
}

impl Drop for BackingErrorLog {
    fn drop(&mut self) {
        self.flush(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: BlockOp = BlockOp::Write { fua: false };
    const INTERVAL: Duration = Duration::from_millis(BACKING_ERROR_LOG_INTERVAL_MS);

    #[test]
    fn first_error_then_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut log = BackingErrorLog::new("vm0", 0);
        assert!(log.record_at(t0, "d0", WRITE, libc::ENOSPC, 0, 4096));
        let mut lines = 0;
        for i in 1..=100_000u32 {
            // 100 000 errors over 2.5 intervals.
            let t = t0 + INTERVAL * i / 40_000;
            if log.record_at(t, "d0", WRITE, libc::ENOSPC, 0, 4096) {
                lines += 1;
            }
        }
        assert_eq!(lines, 2, "a summary at 1 and 2 intervals");
        // Those after the second summary wait for the next one.
        assert_eq!(log.pending(WRITE), 100_000 - 2 * 40_000);
        // Reads are a kind of their own: their first error is logged at once.
        assert!(log.record_at(t0 + INTERVAL * 3, "d0", BlockOp::Read, libc::EIO, 0, 512));
        assert_eq!(log.pending(BlockOp::Read), 0);
    }

    #[test]
    fn another_node_starts_over() {
        let t0 = Instant::now();
        let mut log = BackingErrorLog::new("vm0", 1);
        assert!(log.record_at(t0, "d0", BlockOp::Flush, libc::EIO, 0, 0));
        assert!(!log.record_at(t0, "d0", BlockOp::Flush, libc::EIO, 0, 0));
        assert!(log.record_at(t0, "d1", BlockOp::Flush, libc::EIO, 0, 0));
        assert_eq!(log.pending(BlockOp::Flush), 0);
    }

    #[test]
    fn errno_text() {
        assert_eq!(
            describe_errno(libc::ENOSPC),
            "ENOSPC: No space left on device"
        );
        assert!(describe_errno(4000).starts_with("errno 4000: "));
    }
}
