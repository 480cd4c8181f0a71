//! The ublk export: `/dev/ublkbN` served through the kernel's ublk driver
//! (libublk). One thread per queue; the backing I/O of a queue goes on the
//! same io_uring as its ublk commands, built by the engine's [`SlotTable`]
//! (the op table the vhost-user front uses too).

mod op;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::types;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

pub use self::op::{
    check_io, decode_op, CheckedIo, IoLimits, IoRefusal, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
};
use super::error_log::BackingErrorLog;
use super::{wait_idle, ExportError, ExportTotals, LatencyPercentiles, QueueShared};
use crate::engine::{Prepared, SlotTable};
use crate::limits::DATA_PATH_LOG_INTERVAL_MS;
use crate::logging::Throttle;
use crate::node::Node;
use crate::request::{BlockOp, BlockRequest, RequestError};

/// The ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";
/// Largest I/O the device takes in one request (`max_sectors`); also the size
/// of each tag's buffer.
pub const UBLK_MAX_IO_BYTES: u32 = 1 << 20;
/// How long start-up waits for the device to appear.
pub const UBLK_START_TIMEOUT_MS: u64 = 30_000;
/// The node's index among the queue ring's registered files (0 is the ublk
/// char device).
const NODE_FIXED_FILE: types::Fixed = types::Fixed(1);

/// How one ublk export is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkConfig {
    /// Export name.
    pub name: String,
    /// Device id to ask for; `None` lets the driver choose.
    pub id: Option<u32>,
    /// Number of queues (one thread each).
    pub queues: u16,
    /// In-flight requests per queue.
    pub queue_depth: u16,
    /// Refuse writes.
    pub read_only: bool,
}

/// A running ublk export.
pub struct UblkExport {
    config: UblkConfig,
    node: Arc<Node>,
    ctrl: Arc<UblkCtrl>,
    dev_id: u32,
    queues: Arc<[QueueShared]>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UblkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkExport")
            .field("config", &self.config)
            .field("dev_id", &self.dev_id)
            .finish()
    }
}

fn start_err(config: &UblkConfig, reason: String) -> ExportError {
    ExportError::Start {
        export: config.name.clone(),
        reason,
    }
}

/// Checks that the ublk driver is there and answers, before anything is
/// created.
pub fn probe_driver() -> Result<u64, String> {
    if !Path::new(UBLK_CONTROL).exists() {
        return Err(format!(
            "{UBLK_CONTROL} not found: modprobe ublk_drv (Linux 6.0+)"
        ));
    }
    UblkCtrl::get_features().ok_or_else(|| {
        format!("{UBLK_CONTROL} does not answer GET_FEATURES: ublk_drv from Linux 6.5+ is needed")
    })
}

/// libublk sends control commands through a ring that lives in a
/// thread-local; every thread that touches a `UblkCtrl` needs one.
fn ensure_ctrl_ring() -> Result<(), String> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(io_uring::IoUring::<io_uring::squeue::Entry128>::builder().build(32)?);
        }
        Ok(())
    })
    .map_err(|e| format!("cannot set up the ublk control ring: {e}"))
}

/// ublk devices that exist now (ids of `/sys/class/ublk-char/ublkcN`).
pub fn existing_devices() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

impl UblkExport {
    /// Creates and starts the device; returns once `/dev/ublkbN` exists.
    pub fn start(node: Arc<Node>, config: UblkConfig) -> Result<Self, ExportError> {
        let features = probe_driver().map_err(|r| start_err(&config, r))?;
        ensure_ctrl_ring().map_err(|r| start_err(&config, r))?;
        tracing::debug!(export = %config.name, "ublk driver features {features:#x}");
        let leftovers = existing_devices();
        if let Some(id) = config.id {
            if leftovers.contains(&id) {
                return Err(start_err(
                    &config,
                    format!(
                        "ublk device {id} already exists (another server, or left over by a crashed one): \
                         choose another id, or stop its server (a dead one's device is removed when its \
                         char device is closed: check `ls -l /proc/*/fd | grep ublkc{id}`)"
                    ),
                ));
            }
        } else if !leftovers.is_empty() {
            tracing::warn!(
                "existing ublk devices {leftovers:?}: not reused; if no server owns them they are left over by a crash"
            );
        }
        let limits = *node.limits();
        let io_buf_bytes = limits
            .max_transfer_bytes
            .clamp(limits.logical_block_size_bytes.max(4096), UBLK_MAX_IO_BYTES);
        let read_only = config.read_only || node.read_only();
        let ctrl = UblkCtrlBuilder::default()
            .name("sluice")
            .id(config.id.map(|i| i as i32).unwrap_or(-1))
            .nr_queues(config.queues)
            .depth(config.queue_depth)
            .io_buf_bytes(io_buf_bytes)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| start_err(&config, format!("cannot add ublk device: {e}")))?;
        let ctrl = Arc::new(ctrl);
        let dev_id = ctrl.dev_info().dev_id;
        let queues: Arc<[QueueShared]> =
            (0..config.queues).map(|_| QueueShared::default()).collect();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let ctrl = ctrl.clone();
            let node = node.clone();
            let queues = queues.clone();
            let name = config.name.clone();
            let depth = config.queue_depth;
            std::thread::Builder::new()
                .name(format!("ublk-{dev_id}"))
                .spawn(move || {
                    if let Err(e) = ensure_ctrl_ring() {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let tgt_node = node.clone();
                    let q_node = node;
                    let q_name = name.clone();
                    let failed_tx = ready_tx.clone();
                    let result = ctrl.run_target(
                        move |dev: &mut UblkDev| set_params(dev, &tgt_node, read_only),
                        move |qid: u16, dev: &UblkDev| {
                            serve_queue(
                                qid,
                                dev,
                                &q_node,
                                depth,
                                &queues[usize::from(qid)],
                                &q_name,
                            )
                        },
                        move |ctrl: &UblkCtrl| {
                            let _ = ready_tx.send(Ok(ctrl.get_bdev_path()));
                        },
                    );
                    if let Err(e) = result {
                        tracing::error!(export = %name, "ublk device {dev_id} failed: {e}");
                        let _ = failed_tx.send(Err(e.to_string()));
                    }
                })
                .map_err(|e| start_err(&config, format!("cannot spawn ublk thread: {e}")))?
        };
        match ready_rx.recv_timeout(Duration::from_millis(UBLK_START_TIMEOUT_MS)) {
            Ok(Ok(path)) => tracing::info!(export = %config.name, "serving {path}"),
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(start_err(
                    &config,
                    format!("cannot start ublk device {dev_id}: {e}"),
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                return Err(start_err(
                    &config,
                    format!(
                        "ublk device {dev_id}: the serving thread ended before the device started"
                    ),
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = ctrl.kill_dev();
                return Err(start_err(
                    &config,
                    format!("ublk device {dev_id} did not start within {UBLK_START_TIMEOUT_MS} ms"),
                ));
            }
        }
        Ok(UblkExport {
            config,
            node,
            ctrl,
            dev_id,
            queues,
            thread: Some(thread),
        })
    }

    /// The export's configuration.
    pub fn config(&self) -> &UblkConfig {
        &self.config
    }

    /// The node it serves.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The device id.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `/dev/ublkbN`.
    pub fn bdev_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.config.read_only || self.node.read_only()
    }

    /// Cumulative statistics.
    pub fn totals(&self) -> ExportTotals {
        ExportTotals::of(&self.queues)
    }

    /// Completion latency percentiles.
    pub fn latency(&self) -> LatencyPercentiles {
        LatencyPercentiles::of(&self.queues)
    }

    /// Drain: wait until nothing is in flight. Admission stays open: the
    /// kernel's own quiesce at stop (and its final flush) must still be
    /// served. Returns the queues that stayed busy.
    pub fn drain(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        let deadline = std::time::Instant::now() + timeout;
        let stuck: Vec<usize> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| {
                !wait_idle(
                    q,
                    deadline.saturating_duration_since(std::time::Instant::now()),
                )
            })
            .map(|(i, _)| i)
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck)
        }
    }

    /// Detach: stop the device while its queues are still served (the
    /// kernel finishes in-flight I/O and the final flush through us), wait
    /// for the queue threads, then delete the device.
    pub fn detach(mut self, timeout: Duration) -> Result<Arc<Node>, ExportError> {
        let deadline = std::time::Instant::now() + timeout;
        let stop_err = |reason: String| ExportError::Stop {
            export: self.config.name.clone(),
            reason,
        };
        // STOP_DEV waits in the kernel for in-flight I/O, which our queues
        // serve meanwhile; a device that never finishes must not hang us.
        let dev_id = self.dev_id;
        match ctrl_bounded(&self.ctrl, UblkCtrl::stop_dev, timeout) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(export = %self.config.name, "stopping ublk device {dev_id}: {e}")
            }
            Err(e) => return Err(stop_err(format!("STOP_DEV of ublk device {dev_id}: {e}"))),
        }
        let thread = self.thread.take().expect("detached twice");
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !thread.is_finished() {
            return Err(stop_err(format!(
                "ublk device {dev_id} queues did not stop within {} ms",
                timeout.as_millis()
            )));
        }
        let _ = thread.join();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ctrl_bounded(
            &self.ctrl,
            UblkCtrl::del_dev,
            left.max(Duration::from_millis(UBLK_DEL_MIN_MS)),
        ) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(export = %self.config.name, "deleting ublk device {dev_id}: {e}")
            }
            Err(e) => return Err(stop_err(format!("DEL_DEV of ublk device {dev_id}: {e}"))),
        }
        Ok(self.node.clone())
    }
}

/// The least time DEL_DEV gets even when the stop used up the detach's
/// timeout: the queues are gone by then, so deleting is quick.
const UBLK_DEL_MIN_MS: u64 = 1_000;

/// Runs a ublk control command on a helper thread (libublk's control ring is
/// per thread) and waits at most `timeout` for it. On a timeout the helper is
/// left to finish by itself; it holds only its own reference to the control
/// device.
fn ctrl_bounded(
    ctrl: &Arc<UblkCtrl>,
    command: fn(&UblkCtrl) -> Result<i32, libublk::UblkError>,
    timeout: Duration,
) -> Result<Result<i32, libublk::UblkError>, String> {
    let (tx, rx) = mpsc::channel();
    let ctrl = ctrl.clone();
    std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let result = match ensure_ctrl_ring() {
                Ok(()) => command(&ctrl),
                Err(e) => Err(libublk::UblkError::OtherError(-libc::EIO)).inspect_err(|_| {
                    tracing::error!("{e}");
                }),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| format!("cannot spawn a control thread: {e}"))?;
    rx.recv_timeout(timeout)
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))
}

/// Device parameters from the node's profile.
fn set_params(dev: &mut UblkDev, node: &Node, read_only: bool) -> Result<(), libublk::UblkError> {
    let l = node.limits();
    if let Some(fd) = node.raw_fd() {
        let tgt = &mut dev.tgt;
        tgt.fds[tgt.nr_fds as usize] = fd;
        tgt.nr_fds += 1;
    }
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let mut attrs = 0;
    if l.volatile_write_cache {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
        // FUA only means something with a volatile cache; FUA writes go
        // down as RWF_DSYNC, which the block layer turns into REQ_FUA.
        if l.fua {
            attrs |= sys::UBLK_ATTR_FUA;
        }
    }
    if read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if node.profile().is_some_and(|p| p.rotational) {
        attrs |= sys::UBLK_ATTR_ROTATIONAL;
    }
    let shift = |bytes: u32| bytes.max(512).trailing_zeros() as u8;
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift(l.logical_block_size_bytes),
            physical_bs_shift: shift(l.physical_block_size_bytes),
            io_opt_shift: shift(l.physical_block_size_bytes),
            io_min_shift: shift(l.logical_block_size_bytes),
            max_sectors,
            dev_sectors: l.capacity_bytes >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    let discard_sectors = l
        .discard_max_bytes
        .map(|b| (b >> 9).min(u64::from(u32::MAX)) as u32);
    let zeroes_sectors = l
        .write_zeroes_max_bytes
        .map(|b| (b >> 9).min(u64::from(u32::MAX)) as u32);
    if !read_only && (discard_sectors.is_some() || zeroes_sectors.is_some()) {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: l.discard_granularity_bytes.max(l.logical_block_size_bytes),
            max_discard_sectors: discard_sectors.unwrap_or(0),
            max_write_zeroes_sectors: zeroes_sectors.unwrap_or(0),
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    dev.tgt.dev_size = l.capacity_bytes;
    dev.tgt.params = params;
    Ok(())
}

/// Serves one queue until the device stops: decode each ublk request with
/// [`check_io`] (op and range), and put its backing I/O on this queue's ring.
fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    node: &Arc<Node>,
    depth: u16,
    shared: &QueueShared,
    export: &str,
) {
    let bufs = dev.alloc_queue_io_bufs();
    let mut errors = BackingErrorLog::new(export, usize::from(qid));
    let mut table = match SlotTable::<(BlockOp, Instant)>::new(node.clone(), depth, NODE_FIXED_FILE)
    {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("ublk queue {qid}: cannot allocate slots: {e}");
            return;
        }
    };
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("ublk queue {qid}: cannot start: {e}");
            return;
        }
    };
    let io_limits = IoLimits {
        capacity_bytes: node.limits().capacity_bytes,
        max_io_bytes: u64::from(dev.dev_info.max_io_buf_bytes),
        read_only: dev.tgt.params.basic.attrs & sys::UBLK_ATTR_READ_ONLY != 0,
    };
    // Per-request trouble is logged once per DATA_PATH_LOG_INTERVAL_MS per
    // kind, with a count; RefCell because the completion closure and the
    // handler both log (one thread, borrowed only on these error paths).
    let logs = std::cell::RefCell::new(UblkQueueLogs::default());
    let log = |pick: fn(&mut UblkQueueLogs) -> &mut Throttle| -> Option<u64> {
        pick(&mut logs.borrow_mut()).allow()
    };
    let handler = |q: &UblkQueue, tag: u16, io: &UblkIOCtx| {
        let buf = &bufs[usize::from(tag)];
        let complete = |res: i32| {
            if let Err(e) = q.complete_io_cmd_unified(
                tag,
                BufDesc::Slice(buf.as_slice()),
                Ok(UblkIORes::Result(res)),
            ) {
                if let Some(suppressed) = log(|l| &mut l.complete) {
                    tracing::error!(
                        export,
                        suppressed,
                        "ublk queue {qid} tag {tag}: cannot complete: {e}"
                    );
                }
            }
        };
        if io.is_tgt_io() {
            let ((op, started), result) = table.finish(tag, io.result());
            let len = u64::from(q.get_iod(tag).nr_sectors) << 9;
            if let Err(RequestError::Io(errno)) = result {
                let offset_bytes = q.get_iod(tag).start_sector << 9;
                errors.record(node.name(), op, errno, offset_bytes, len);
            }
            shared.record_latency(
                Some(op),
                len,
                result.is_ok(),
                started.elapsed().as_nanos() as u64,
            );
            shared.in_flight.store(table.in_flight(), Ordering::Relaxed);
            complete(match result {
                Ok(()) if op.moves_data() => len as i32,
                Ok(()) => 0,
                Err(e) => -errno_of(e),
            });
            return;
        }
        let iod = q.get_iod(tag);
        // The kernel is trusted less than nothing: check what it sends.
        let CheckedIo {
            op,
            offset_bytes,
            len_bytes,
        } = match check_io(iod.op_flags, iod.start_sector, iod.nr_sectors, &io_limits) {
            Ok(io) => io,
            Err(IoRefusal::UnknownOp(code)) => {
                if let Some(suppressed) = log(|l| &mut l.unsupported) {
                    tracing::warn!(
                        export,
                        suppressed,
                        "ublk queue {qid}: unsupported op {code}"
                    );
                }
                shared.record(None, 0, false);
                return complete(-libc::EOPNOTSUPP);
            }
            Err(IoRefusal::Invalid(op)) => {
                shared.record(Some(op), 0, false);
                return complete(-libc::EIO);
            }
        };
        let iov = [libc::iovec {
            iov_base: buf.as_slice().as_ptr() as *mut libc::c_void,
            iov_len: len_bytes as usize,
        }];
        let req = BlockRequest {
            op,
            offset_bytes,
            len_bytes,
            segments: if op.moves_data() { &iov } else { &[] },
        };
        // SAFETY: `iov` is this tag's io buffer, which libublk allocated for
        // the queue (`alloc_queue_io_bufs`, `max_io_bytes` long; `check_io`
        // bounded `len_bytes` by it), used by this tag only: the kernel
        // hands a tag out again only after we completed it, which we do
        // after its backing I/O was reaped. `bufs` lives until this function
        // returns, and the queue loop returns only once the device stopped,
        // which the kernel allows only after every request it issued was
        // completed by us (a slot table dropped earlier leaks, see `Drop`).
        match unsafe { table.begin(tag, &req, (op, Instant::now())) } {
            Ok(Prepared::Sqe(sqe)) => {
                let sqe = sqe.user_data(UblkIOCtx::build_user_data(
                    tag,
                    iod.op_flags & 0xff,
                    0,
                    true,
                ));
                shared.in_flight.store(table.in_flight(), Ordering::Relaxed);
                if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
                    if let Some(suppressed) = log(|l| &mut l.submit) {
                        tracing::error!(
                            export,
                            suppressed,
                            "ublk queue {qid} tag {tag}: cannot submit: {e}"
                        );
                    }
                    let (_, _) = table.finish(tag, -libc::EIO);
                    complete(-libc::EIO);
                }
            }
            Ok(Prepared::Done(res)) => {
                let ((op, started), result) = table.finish(tag, res);
                if let Err(RequestError::Io(errno)) = result {
                    errors.record(node.name(), op, errno, offset_bytes, len_bytes);
                }
                shared.record_latency(
                    Some(op),
                    len_bytes,
                    result.is_ok(),
                    started.elapsed().as_nanos() as u64,
                );
                complete(match result {
                    Ok(()) if op.moves_data() => len_bytes as i32,
                    Ok(()) => 0,
                    Err(e) => -errno_of(e),
                });
            }
            Err(e) => {
                shared.record(Some(op), 0, false);
                complete(-errno_of(e));
            }
        }
    };
    queue.wait_and_handle_io(handler);
}

/// One ublk queue's throttled log lines.
struct UblkQueueLogs {
    complete: Throttle,
    unsupported: Throttle,
    submit: Throttle,
}

impl Default for UblkQueueLogs {
    fn default() -> Self {
        let t = Throttle::per_ms(DATA_PATH_LOG_INTERVAL_MS);
        UblkQueueLogs {
            complete: t,
            unsupported: t,
            submit: t,
        }
    }
}

/// The one place a request error becomes a ublk result.
fn errno_of(e: RequestError) -> i32 {
    match e {
        RequestError::Invalid => libc::EIO,
        RequestError::Unsupported => libc::EOPNOTSUPP,
        RequestError::Io(errno) => errno,
    }
}
