//! The ublk export: `/dev/ublkbN` served through the kernel's ublk driver
//! (libublk). One thread per queue; the backing I/O of a queue goes on the
//! same io_uring as its ublk commands, built by the engine's [`SlotTable`]
//! (the op table the vhost-user front uses too).

pub(crate) mod op;
mod recovery;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::op::{check_io, CheckedIo, IoLimits, IoRefusal};
use super::error_log::BackingErrorLog;
use super::{wait_idle, ExportError, ExportTotals, LatencyPercentiles, QueueShared};
use crate::binding::Binding;
use crate::engine::{Half, NodeFile, Prepared, SlotTable};
use crate::limits::DATA_PATH_LOG_INTERVAL_MS;
use crate::logging::Throttle;
use crate::node::Node;
use crate::qos::{Class, ExportQos};
use crate::request::{BlockOp, BlockRequest, RequestError, RequestResult};

/// The ublk control device.
pub(crate) const UBLK_CONTROL: &str = "/dev/ublk-control";
/// Largest I/O the device takes in one request (`max_sectors`); also the size
/// of each tag's buffer.
pub(crate) const UBLK_MAX_IO_BYTES: u32 = 1 << 20;
/// How long start-up waits for the device to appear.
pub(crate) const UBLK_START_TIMEOUT_MS: u64 = 30_000;
/// How the queue ring's SQEs name the node: by descriptor, not as a
/// registered file, since libublk's FETCH commands stay pending on that ring
/// and would keep a replaced file registered (see [`NodeFile::Descriptor`]).
const NODE_FILE: NodeFile = NodeFile::Descriptor;

/// How one ublk export is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UblkConfig {
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
    /// Create the device with user recovery: if sluice dies, the kernel
    /// keeps it and holds its I/O until a new sluice takes it over.
    pub recovery: bool,
}

/// A running ublk export.
pub(crate) struct UblkExport {
    config: UblkConfig,
    ctrl: Arc<UblkCtrl>,
    dev_id: u32,
    shared: Arc<UblkShared>,
    thread: Option<JoinHandle<()>>,
    /// The device was left by a dead server and taken over.
    taken_over: bool,
}

/// What the queue threads share with the control plane.
struct UblkShared {
    /// The node, the mirror tap and the pause.
    binding: Arc<Binding>,
    queues: Box<[QueueShared]>,
    /// Per queue: written to wake the queue thread out of `io_uring_enter`
    /// (a pause to acknowledge, a resume to act on).
    wakers: Box<[EventFd]>,
    /// The export's QoS limits.
    qos: Arc<ExportQos>,
}

impl UblkShared {
    fn wake_all(&self) {
        for w in self.wakers.iter() {
            let _ = w.write(1);
        }
    }
}

impl std::fmt::Debug for UblkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkExport")
            .field("config", &self.config)
            .field("dev_id", &self.dev_id)
            .finish()
    }
}

/// What went wrong with a ublk device.
#[derive(Debug, thiserror::Error)]
pub enum UblkFailure {
    /// No control device: the driver is not loaded.
    #[error("{UBLK_CONTROL} not found: modprobe ublk_drv (Linux 6.0+)")]
    NoDriver,
    /// The driver predates GET_FEATURES.
    #[error("{UBLK_CONTROL} does not answer GET_FEATURES: ublk_drv from Linux 6.5+ is needed")]
    OldDriver,
    /// libublk's per-thread control ring could not be built.
    #[error("cannot set up the ublk control ring: {0}")]
    ControlRing(#[source] libublk::UblkError),
    /// A live process serves the id asked for.
    #[error(
        "ublk device {id} is served by process {pid} ({comm}): choose another id, or stop that \
         process"
    )]
    IdServed {
        /// The device id.
        id: u32,
        /// The process.
        pid: i32,
        /// Its command name.
        comm: String,
    },
    /// An existing device could not be inspected.
    #[error("ublk device {dev_id}: cannot read its state: {source}")]
    Inspect {
        /// The device id.
        dev_id: u32,
        /// libublk's error.
        #[source]
        source: libublk::UblkError,
    },
    /// A dead device could not be removed.
    #[error(
        "ublk device {dev_id} is left over by a dead server and cannot be removed: {source}; \
         choose another id"
    )]
    Remove {
        /// The device id.
        dev_id: u32,
        /// libublk's error.
        #[source]
        source: libublk::UblkError,
    },
    /// A device waits to be recovered, but not by a server like this one.
    #[error(
        "ublk device {dev_id} waits for its server to come back ({capacity_bytes} bytes in \
         {logical_block_size_bytes}-byte blocks), but node {node} has {node_capacity_bytes} bytes \
         in {node_logical_block_size_bytes}-byte blocks: run the command that created it, or \
         choose another id"
    )]
    RecoverMismatch {
        /// The device id.
        dev_id: u32,
        /// Its size.
        capacity_bytes: u64,
        /// Its block size.
        logical_block_size_bytes: u32,
        /// The node this export serves.
        node: String,
        /// The node's size.
        node_capacity_bytes: u64,
        /// The node's block size.
        node_logical_block_size_bytes: u32,
    },
    /// Taking over a quiesced device failed.
    #[error("cannot recover ublk device {dev_id} (START_USER_RECOVERY): {source}")]
    Recover {
        /// The device id.
        dev_id: u32,
        /// libublk's error.
        #[source]
        source: libublk::UblkError,
    },
    /// ADD_DEV failed.
    #[error("cannot add ublk device: {0}")]
    Add(#[source] libublk::UblkError),
    /// The device was added but did not start.
    #[error("cannot start ublk device {dev_id}: {source}")]
    Run {
        /// The device id.
        dev_id: u32,
        /// libublk's error.
        #[source]
        source: libublk::UblkError,
    },
    /// The serving thread died before the device started.
    #[error("ublk device {0}: the serving thread ended before the device started")]
    ThreadEnded(u32),
    /// START_DEV did not finish.
    #[error("ublk device {0} did not start within {UBLK_START_TIMEOUT_MS} ms")]
    StartTimeout(u32),
    /// A control command (STOP_DEV, DEL_DEV) got no answer in time.
    #[error("{command} of ublk device {dev_id}: no answer within {timeout_ms} ms")]
    ControlTimeout {
        /// The command.
        command: &'static str,
        /// The device id.
        dev_id: u32,
        /// How long it was given.
        timeout_ms: u128,
    },
    /// The queue threads did not end after STOP_DEV.
    #[error("ublk device {dev_id} queues did not stop within {timeout_ms} ms")]
    QueuesStuck {
        /// The device id.
        dev_id: u32,
        /// How long they were given.
        timeout_ms: u128,
    },
    /// A thread or an eventfd could not be made.
    #[error("{what}: {source}")]
    Os {
        /// What was being made.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl UblkFailure {
    fn of(self, config: &UblkConfig) -> ExportError {
        ExportError::Ublk {
            export: config.name.clone(),
            source: self,
        }
    }
}

/// Checks that the ublk driver is there and answers, before anything is
/// created.
pub(crate) fn probe_driver() -> Result<u64, UblkFailure> {
    if !Path::new(UBLK_CONTROL).exists() {
        return Err(UblkFailure::NoDriver);
    }
    UblkCtrl::get_features().ok_or(UblkFailure::OldDriver)
}

/// libublk sends control commands through a ring that lives in a
/// thread-local; every thread that touches a `UblkCtrl` needs one.
fn ensure_ctrl_ring() -> Result<(), UblkFailure> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(io_uring::IoUring::<io_uring::squeue::Entry128>::builder().build(32)?);
        }
        Ok(())
    })
    .map_err(UblkFailure::ControlRing)
}

/// ublk devices that exist now (ids of `/sys/class/ublk-char/ublkcN`).
pub(crate) fn existing_devices() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// Devices that wait to be taken over (their server died, recovery on)
/// and that none of `served` is: their I/O is held until an export with
/// their id is started again. One warning each, saying what to do.
pub(crate) fn warn_about_waiting_devices(served: &[u32]) {
    if !Path::new(UBLK_CONTROL).exists() || ensure_ctrl_ring().is_err() {
        return;
    }
    for id in existing_devices()
        .into_iter()
        .filter(|id| !served.contains(id))
    {
        if let Ok(recovery::Leftover::Recoverable { .. }) = recovery::inspect(id) {
            tracing::warn!(
                "ublk device {id} waits for its server (it died; the device's I/O is held): start \
                 its export again with the same node and `ublk_id = {id}` (or `sluice ctl \
                 export-add NAME --node NODE --ublk {id}`) to take it over"
            );
        }
    }
}

impl UblkExport {
    /// Creates and starts the device; returns once `/dev/ublkbN` exists.
    pub(crate) fn start(
        node: Arc<Node>,
        config: UblkConfig,
        qos: Arc<ExportQos>,
    ) -> Result<Self, ExportError> {
        let features = probe_driver().map_err(|e| e.of(&config))?;
        ensure_ctrl_ring().map_err(|e| e.of(&config))?;
        tracing::debug!(export = %config.name, "ublk driver features {features:#x}");
        let leftovers = existing_devices();
        let limits = *node.limits();
        // Some((queues, depth)) of a device to take over.
        let mut recover = None;
        match config.id.filter(|id| leftovers.contains(id)) {
            None if !leftovers.is_empty() => {
                tracing::info!("other ublk devices exist ({leftovers:?}); not touched")
            }
            None => {}
            Some(id) => match recovery::inspect(id).map_err(|e| e.of(&config))? {
                recovery::Leftover::Served { pid, comm } => {
                    return Err(UblkFailure::IdServed { id, pid, comm }.of(&config));
                }
                recovery::Leftover::Recoverable {
                    capacity_bytes,
                    logical_block_size_bytes,
                    ..
                } if capacity_bytes != limits.capacity_bytes
                    || logical_block_size_bytes != limits.logical_block_size_bytes =>
                {
                    return Err(UblkFailure::RecoverMismatch {
                        dev_id: id,
                        capacity_bytes,
                        logical_block_size_bytes,
                        node: node.name().to_owned(),
                        node_capacity_bytes: limits.capacity_bytes,
                        node_logical_block_size_bytes: limits.logical_block_size_bytes,
                    }
                    .of(&config));
                }
                recovery::Leftover::Recoverable {
                    queues,
                    queue_depth,
                    ..
                } => {
                    tracing::warn!(
                        export = %config.name,
                        "ublk device {id} was left by a server that died: taking it over \
                         (its {queues} queues of depth {queue_depth}; held and unfinished \
                         requests are served now)"
                    );
                    recover = Some((queues, queue_depth));
                }
                recovery::Leftover::Dead { state } => {
                    recovery::remove(id, Duration::from_millis(UBLK_DEL_MIN_MS))
                        .map_err(|e| e.of(&config))?;
                    tracing::warn!(
                        export = %config.name,
                        "ublk device {id} was left {} by a server that died and cannot be \
                         recovered: removed, creating it again",
                        recovery::state_name(state)
                    );
                }
            },
        }
        let io_buf_bytes = limits
            .max_transfer_bytes
            .clamp(limits.logical_block_size_bytes.max(4096), UBLK_MAX_IO_BYTES);
        let read_only = config.read_only || node.read_only();
        let recovery_flags =
            u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        let ctrl_flags = if !config.recovery {
            0
        } else if features & recovery_flags == recovery_flags {
            recovery_flags
        } else {
            tracing::warn!(
                export = %config.name,
                "this kernel's ublk driver has no user recovery: if sluice dies, the device goes"
            );
            0
        };
        let ctrl = if let Some((queues, queue_depth)) = recover {
            let id = config.id.expect("recovering an id asked for");
            // libublk sizes its per-queue tables from these; the kernel's
            // device info replaces the rest.
            let ctrl = UblkCtrlBuilder::default()
                .name("sluice")
                .id(id as i32)
                .nr_queues(queues)
                .depth(queue_depth)
                .io_buf_bytes(io_buf_bytes)
                .ctrl_flags(ctrl_flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|source| UblkFailure::Recover { dev_id: id, source }.of(&config))?;
            // Waits (libublk: up to 30 s) while the kernel still releases
            // the dead server's char device.
            ctrl.start_user_recover()
                .map_err(|source| UblkFailure::Recover { dev_id: id, source }.of(&config))?;
            ctrl
        } else {
            UblkCtrlBuilder::default()
                .name("sluice")
                .id(config.id.map(|i| i as i32).unwrap_or(-1))
                .nr_queues(config.queues)
                .depth(config.queue_depth)
                .io_buf_bytes(io_buf_bytes)
                .ctrl_flags(ctrl_flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| UblkFailure::Add(e).of(&config))?
        };
        let ctrl = Arc::new(ctrl);
        let info = ctrl.dev_info();
        let dev_id = info.dev_id;
        // A recovered device keeps the geometry it was created with.
        let (queues, depth) = (info.nr_hw_queues, info.queue_depth);
        if (queues, depth) != (config.queues, config.queue_depth) {
            tracing::warn!(
                export = %config.name,
                "ublk device {dev_id} has {queues} queues of depth {depth} (asked: {} of {})",
                config.queues,
                config.queue_depth
            );
        }
        let mut config = config;
        (config.queues, config.queue_depth) = (queues, depth);
        let wakers = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC))
            .collect::<std::io::Result<Box<[EventFd]>>>()
            .map_err(|source| {
                UblkFailure::Os {
                    what: "eventfd",
                    source,
                }
                .of(&config)
            })?;
        let shared = Arc::new(UblkShared {
            binding: Arc::new(Binding::new(node.clone())),
            queues: (0..queues).map(|_| QueueShared::default()).collect(),
            wakers,
            qos,
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let ctrl = ctrl.clone();
            let shape = DeviceShape {
                limits: *node.limits(),
                rotational: node.profile().is_some_and(|p| p.rotational),
                read_only,
                export: config.name.clone(),
            };
            let shared = shared.clone();
            let name = config.name.clone();
            std::thread::Builder::new()
                .name(format!("ublk-{dev_id}"))
                .spawn(move || {
                    if let Err(e) = ensure_ctrl_ring() {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let q_name = name.clone();
                    let failed_tx = ready_tx.clone();
                    let result = ctrl.run_target(
                        move |dev: &mut UblkDev| set_params(dev, &shape),
                        move |qid: u16, dev: &UblkDev| {
                            serve_queue(qid, dev, &q_name, &shared, depth)
                        },
                        move |ctrl: &UblkCtrl| {
                            let _ = ready_tx.send(Ok(ctrl.get_bdev_path()));
                        },
                    );
                    if let Err(e) = result {
                        tracing::error!(export = %name, "ublk device {dev_id} failed: {e}");
                        let _ = failed_tx.send(Err(UblkFailure::Run { dev_id, source: e }));
                    }
                })
                .map_err(|source| {
                    UblkFailure::Os {
                        what: "cannot spawn the ublk thread",
                        source,
                    }
                    .of(&config)
                })?
        };
        match ready_rx.recv_timeout(Duration::from_millis(UBLK_START_TIMEOUT_MS)) {
            Ok(Ok(path)) => tracing::info!(export = %config.name, "serving {path}"),
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.of(&config));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                return Err(UblkFailure::ThreadEnded(dev_id).of(&config));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = ctrl.kill_dev();
                return Err(UblkFailure::StartTimeout(dev_id).of(&config));
            }
        }
        Ok(UblkExport {
            config,
            ctrl,
            dev_id,
            shared,
            thread: Some(thread),
            taken_over: recover.is_some(),
        })
    }

    /// The export's configuration.
    pub(crate) fn config(&self) -> &UblkConfig {
        &self.config
    }

    /// The node it serves now.
    pub(crate) fn node(&self) -> Arc<Node> {
        self.shared.binding.node()
    }

    /// The node, mirror tap and pause its queues share.
    pub(crate) fn binding(&self) -> &Arc<Binding> {
        &self.shared.binding
    }

    /// Its QoS.
    pub(crate) fn qos(&self) -> &Arc<ExportQos> {
        &self.shared.qos
    }

    /// From now on QoS limits are ignored: requests parked for tokens
    /// start at once (a drain, close-all).
    pub(crate) fn ignore_qos(&self) {
        self.shared.qos.bypass();
        self.shared.wake_all();
    }

    /// Pivot, step one: queues park new requests (the kernel keeps them
    /// waiting); waits until every queue has acknowledged the pause and
    /// nothing is in flight on the node. On timeout the export is resumed
    /// and the busy queues are returned.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        let deadline = Instant::now() + timeout;
        let generation = self.shared.binding.pause();
        self.shared.wake_all();
        let quiet = |q: &QueueShared| {
            q.pause_ack.load(Ordering::Acquire) >= generation
                && q.in_flight.load(Ordering::Relaxed) == 0
        };
        loop {
            let busy: Vec<usize> = (0..self.shared.queues.len())
                .filter(|&i| !quiet(&self.shared.queues[i]))
                .collect();
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.resume();
                return Err(busy);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Pivot, step three: queues start the requests they parked, on the
    /// binding's node (which they switch to first).
    pub(crate) fn resume(&self) {
        self.shared.binding.resume();
        self.shared.wake_all();
    }

    /// Whether the device was left by a dead server and taken over.
    pub(crate) fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// The device id.
    pub(crate) fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `/dev/ublkbN`.
    pub(crate) fn bdev_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Whether writes are refused.
    pub(crate) fn read_only(&self) -> bool {
        self.config.read_only || self.node().read_only()
    }

    /// Cumulative statistics.
    pub(crate) fn totals(&self) -> ExportTotals {
        ExportTotals::of(&self.shared.queues)
    }

    /// Each queue's counters.
    pub(crate) fn queues(&self) -> &[QueueShared] {
        &self.shared.queues
    }

    /// Completion latency percentiles.
    pub(crate) fn latency(&self) -> LatencyPercentiles {
        LatencyPercentiles::of(&self.shared.queues)
    }

    /// Drain: wait until nothing is in flight. Admission stays open: the
    /// kernel's own quiesce at stop (and its final flush) must still be
    /// served. Returns the queues that stayed busy.
    pub(crate) fn drain(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        self.ignore_qos();
        let deadline = std::time::Instant::now() + timeout;
        let stuck: Vec<usize> = self
            .shared
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
    pub(crate) fn detach(mut self, timeout: Duration) -> Result<Arc<Node>, ExportError> {
        let deadline = std::time::Instant::now() + timeout;
        // STOP_DEV waits in the kernel for in-flight I/O, which our queues
        // serve meanwhile; a device that never finishes must not hang us.
        let dev_id = self.dev_id;
        match ctrl_bounded(&self.ctrl, "STOP_DEV", UblkCtrl::stop_dev, dev_id, timeout) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(export = %self.config.name, "stopping ublk device {dev_id}: {e}")
            }
            Err(e) => return Err(e.of(&self.config)),
        }
        let thread = self.thread.take().expect("detached twice");
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !thread.is_finished() {
            return Err(UblkFailure::QueuesStuck {
                dev_id,
                timeout_ms: timeout.as_millis(),
            }
            .of(&self.config));
        }
        let _ = thread.join();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ctrl_bounded(
            &self.ctrl,
            "DEL_DEV",
            UblkCtrl::del_dev,
            dev_id,
            left.max(Duration::from_millis(UBLK_DEL_MIN_MS)),
        ) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(export = %self.config.name, "deleting ublk device {dev_id}: {e}")
            }
            Err(e) => return Err(e.of(&self.config)),
        }
        Ok(self.node())
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
    name: &'static str,
    command: fn(&UblkCtrl) -> Result<i32, libublk::UblkError>,
    dev_id: u32,
    timeout: Duration,
) -> Result<Result<i32, libublk::UblkError>, UblkFailure> {
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
        .map_err(|source| UblkFailure::Os {
            what: "cannot spawn a control thread",
            source,
        })?;
    rx.recv_timeout(timeout)
        .map_err(|_| UblkFailure::ControlTimeout {
            command: name,
            dev_id,
            timeout_ms: timeout.as_millis(),
        })
}

/// What the device's parameters are made of: taken from the node when the
/// export starts, so that libublk's set-up closure (which lives as long as
/// the device) does not keep the node itself open after a pivot.
struct DeviceShape {
    limits: crate::node::NodeLimits,
    rotational: bool,
    read_only: bool,
    /// The export's name, recorded in libublk's run file for udev
    /// ([`export_of_device`]).
    export: String,
}

/// libublk's run file of device `id` (written at start, removed with the
/// device).
fn run_file(id: u32) -> PathBuf {
    Path::new(&UblkCtrl::run_dir()).join(format!("{id:04}.json"))
}

/// The name of the export serving `/dev/ublkb<id>`, from libublk's run file
/// (`target_data.export`): what `sluice udev-info` tells udev. `None` when
/// the device is not sluice's or not running.
pub(crate) fn export_of_device(id: u32) -> Option<String> {
    let text = std::fs::read_to_string(run_file(id)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(json["target_data"]["export"].as_str()?.to_owned())
}

/// Device parameters from the node's profile.
fn set_params(dev: &mut UblkDev, shape: &DeviceShape) -> Result<(), libublk::UblkError> {
    let (l, read_only) = (&shape.limits, shape.read_only);
    dev.set_target_json(serde_json::json!({ "export": shape.export }));
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
    if shape.rotational {
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

/// The pseudo-tag of the wake-up poll on a queue's eventfd: above every real
/// tag (`queue_depth` <= 4096), so libublk hands its completion to us as
/// target I/O without touching any tag's state.
const WAKE_TAG: u16 = u16::MAX;
/// The pseudo-tag of the poll on a queue's QoS timer (parked requests'
/// tokens are due).
const QOS_TAG: u16 = u16::MAX - 1;
/// `tgt_data` of a mirrored write's second SQE (the mirror target's half).
const TARGET_HALF: u32 = 1;

/// Serves one queue until the device stops.
fn serve_queue(qid: u16, dev: &UblkDev, export: &str, shared: &UblkShared, depth: u16) {
    let bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(export, "ublk queue {qid}: cannot start: {e}");
            return;
        }
    };
    let waker = &shared.wakers[usize::from(qid)];
    let qos_timer = match TimerFd::new() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(export, "ublk queue {qid}: cannot make its QoS timer: {e}");
            return;
        }
    };
    let mut server = match QueueServer::new(qid, dev, export, shared, depth, &bufs, qos_timer) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(export, "ublk queue {qid}: cannot allocate slots: {e}");
            return;
        }
    };
    if let Err(e) = arm_wake(&queue, waker) {
        tracing::error!(
            export,
            "ublk queue {qid}: cannot watch its wake-up eventfd: {e}"
        );
        return;
    }
    queue.wait_and_handle_io(|q, tag, io| server.handle(q, tag, io, waker));
}

/// Polls the queue's wake-up eventfd on its ring (one shot; re-armed after
/// each wake-up): the control plane's way into a thread that sleeps in
/// `io_uring_enter`.
fn arm_wake(q: &UblkQueue, waker: &EventFd) -> Result<(), libublk::UblkError> {
    let sqe = opcode::PollAdd::new(types::Fd(waker.as_raw_fd()), libc::POLLIN as u32)
        .build()
        .user_data(UblkIOCtx::build_user_data(WAKE_TAG, 0, 0, true));
    q.ublk_submit_sqe_sync(sqe)
}

/// One queue's state, owned by its thread: the slot table on the node it
/// serves now, the tags held back while paused, the throttled logs.
struct QueueServer<'a> {
    qid: u16,
    export: &'a str,
    shared: &'a UblkShared,
    queue: &'a QueueShared,
    bufs: &'a [libublk::helpers::IoBuf<u8>],
    table: SlotTable<(BlockOp, Instant)>,
    depth: u16,
    io_limits: IoLimits,
    /// Tags that arrived while paused or while QoS held the queue back, in
    /// arrival order (capacity `depth`, so parking never allocates): started
    /// on resume, or as their QoS tokens come due.
    parked: Vec<u16>,
    /// Fires when the first parked tag's QoS tokens are due; polled on the
    /// queue's ring (`QOS_TAG`) while armed.
    qos_timer: TimerFd,
    qos_timer_armed: bool,
    /// The last pause generation this queue acknowledged.
    seen_pause: u64,
    /// The binding switched node but the queue could not follow: requests
    /// fail until it can (never served by the old node after a pivot).
    stale: bool,
    logs: UblkQueueLogs,
    errors: BackingErrorLog,
    /// Where the current batch of CQEs began, or the last one ended.
    batch_mark: Instant,
}

impl<'a> QueueServer<'a> {
    fn new(
        qid: u16,
        dev: &UblkDev,
        export: &'a str,
        shared: &'a UblkShared,
        depth: u16,
        bufs: &'a [libublk::helpers::IoBuf<u8>],
        qos_timer: TimerFd,
    ) -> std::io::Result<Self> {
        let node = shared.binding.node();
        let io_limits = IoLimits {
            capacity_bytes: node.limits().capacity_bytes,
            max_io_bytes: u64::from(dev.dev_info.max_io_buf_bytes),
            read_only: dev.tgt.params.basic.attrs & sys::UBLK_ATTR_READ_ONLY != 0,
        };
        Ok(QueueServer {
            qid,
            export,
            shared,
            queue: &shared.queues[usize::from(qid)],
            bufs,
            table: SlotTable::new(node, depth, NODE_FILE)?.with_binding(shared.binding.clone()),
            depth,
            io_limits,
            parked: Vec::with_capacity(usize::from(depth)),
            qos_timer,
            qos_timer_armed: false,
            seen_pause: shared.binding.pause_generation(),
            stale: false,
            logs: UblkQueueLogs::default(),
            errors: BackingErrorLog::new(export, usize::from(qid)),
            batch_mark: Instant::now(),
        })
    }

    /// Every CQE of the queue's ring, timed by batch: libublk hands over
    /// the CQEs of one `io_uring_enter` with the first and the last marked,
    /// so the time before the first is the wait (sleeping) and the time up
    /// to the last the handling (polling): two clock reads per batch. (A
    /// batch whose last CQE libublk keeps to itself, a ublk command that
    /// failed, leaves its handling to be counted as the next wait.)
    fn handle(&mut self, q: &UblkQueue, tag: u16, io: &UblkIOCtx, waker: &EventFd) {
        if io.is_first_cqe() {
            let now = Instant::now();
            self.queue
                .add_sleeping_ns(now.duration_since(self.batch_mark).as_nanos() as u64);
            self.batch_mark = now;
        }
        self.handle_cqe(q, tag, io, waker);
        if io.is_last_cqe() {
            let now = Instant::now();
            self.queue
                .add_polling_ns(now.duration_since(self.batch_mark).as_nanos() as u64);
            self.batch_mark = now;
        }
    }

    /// One CQE: a wake-up, a backing I/O completion, or a new request from
    /// the kernel.
    fn handle_cqe(&mut self, q: &UblkQueue, tag: u16, io: &UblkIOCtx, waker: &EventFd) {
        // Acknowledge a pause before anything else: from here on this
        // thread reads `is_paused() == true` and starts nothing new, and
        // what it has in flight is in `in_flight` already.
        let generation = self.shared.binding.pause_generation();
        if generation != self.seen_pause {
            self.seen_pause = generation;
            self.queue.pause_ack.store(generation, Ordering::Release);
        }
        if io.is_tgt_io() && tag == WAKE_TAG {
            let _ = waker.read();
            if let Err(e) = arm_wake(q, waker) {
                self.logs.submit.error(
                    self.export,
                    self.qid,
                    format_args!("cannot re-arm its wake-up: {e}"),
                );
            }
            self.follow_node();
            self.start_parked(q);
            return;
        }
        if io.is_tgt_io() && tag == QOS_TAG {
            // Disarming consumes the expiry too.
            let _ = self.qos_timer.clear();
            self.qos_timer_armed = false;
            self.start_parked(q);
            return;
        }
        if io.is_tgt_io() {
            let half = if (io.user_data() >> 24) & 0xffff == u64::from(TARGET_HALF) {
                Half::Target
            } else {
                Half::Source
            };
            if let Some((ctx, result)) = self.table.finish(tag, half, io.result()) {
                self.done(q, tag, ctx, result);
            }
            return;
        }
        if self.shared.binding.is_paused() || !self.parked.is_empty() {
            // A pivot is under way (the request waits for the resume), or
            // earlier requests wait for QoS tokens: it queues behind them.
            self.parked.push(tag);
            if !self.qos_timer_armed {
                // Nothing would start them (a timer that could not be
                // armed): try now.
                self.start_parked(q);
            }
            return;
        }
        if let Some(wait) = self.qos_wait(q, tag) {
            self.parked.push(tag);
            self.arm_qos_timer(q, wait);
            return;
        }
        self.start(q, tag);
    }

    /// Starts parked tags in arrival order, unless paused, until one must
    /// wait for QoS tokens (the timer is armed for it).
    fn start_parked(&mut self, q: &UblkQueue) {
        if self.shared.binding.is_paused() {
            return;
        }
        let mut started = 0;
        while started < self.parked.len() {
            let tag = self.parked[started];
            if let Some(wait) = self.qos_wait(q, tag) {
                self.arm_qos_timer(q, wait);
                break;
            }
            self.start(q, tag);
            started += 1;
        }
        // Shifts in place: no allocation.
        self.parked.drain(..started);
    }

    /// How long `tag` must wait for QoS tokens (`None`: it may start, and
    /// its tokens are taken). A request `check_io` refuses costs nothing:
    /// it is answered at once.
    fn qos_wait(&self, q: &UblkQueue, tag: u16) -> Option<Duration> {
        if !self.shared.qos.enforced() {
            return None;
        }
        let iod = q.get_iod(tag);
        let io = check_io(
            iod.op_flags,
            iod.start_sector,
            iod.nr_sectors,
            &self.io_limits,
        )
        .ok()?;
        let (class, bytes) = Class::of(io.op, io.len_bytes);
        self.shared.qos.admit(class, bytes)
    }

    /// Wakes the queue in `wait`: arms the timer and polls it on the ring
    /// (once; a poll already armed stays, it fires no later than needed
    /// since waits are bounded by `QOS_MAX_WAIT_MS`).
    fn arm_qos_timer(&mut self, q: &UblkQueue, wait: Duration) {
        if self.qos_timer_armed {
            return;
        }
        let armed = self
            .qos_timer
            .reset(wait.max(Duration::from_micros(1)), None)
            .map_err(std::io::Error::from)
            .and_then(|()| {
                let sqe = opcode::PollAdd::new(
                    types::Fd(self.qos_timer.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(UblkIOCtx::build_user_data(QOS_TAG, 0, 0, true));
                q.ublk_submit_sqe_sync(sqe)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            });
        match armed {
            Ok(()) => self.qos_timer_armed = true,
            Err(e) => {
                // The parked requests then start at the next wake-up or
                // request; say so (rate-limited).
                self.logs.submit.error(
                    self.export,
                    self.qid,
                    format_args!("cannot arm its QoS timer: {e}"),
                );
            }
        }
    }

    /// Follows a pivot: once idle, a slot table on the binding's node (the
    /// old table, and with it this queue's reference to the old node, goes).
    fn follow_node(&mut self) {
        let binding = &self.shared.binding;
        if binding.serves(self.table.node()) || self.table.in_flight() > 0 {
            return;
        }
        let node = binding.node();
        let switched = SlotTable::new(node.clone(), self.depth, NODE_FILE)
            .map(|t| t.with_binding(binding.clone()));
        match switched {
            Ok(table) => {
                tracing::info!(
                    export = self.export,
                    queue = self.qid,
                    node = node.name(),
                    "queue switched node"
                );
                self.table = table;
                self.stale = false;
            }
            Err(e) => {
                self.stale = true;
                self.logs.submit.error(
                    self.export,
                    self.qid,
                    format_args!(
                        "cannot switch to node {}: {e}; requests fail until it can",
                        node.name()
                    ),
                );
            }
        }
    }

    /// Completes the ublk command of `tag` with `res`.
    fn complete(&mut self, q: &UblkQueue, tag: u16, res: i32) {
        let bufs = self.bufs;
        let buf = &bufs[usize::from(tag)];
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            self.logs.complete.error(
                self.export,
                self.qid,
                format_args!("tag {tag}: cannot complete: {e}"),
            );
        }
    }

    /// A request's backing I/O is over: count it and answer the kernel.
    fn done(
        &mut self,
        q: &UblkQueue,
        tag: u16,
        (op, started): (BlockOp, Instant),
        result: RequestResult,
    ) {
        let iod = q.get_iod(tag);
        let (offset_bytes, len_bytes) = (iod.start_sector << 9, u64::from(iod.nr_sectors) << 9);
        if let Err(RequestError::Io(errno)) = result {
            self.errors
                .record(self.table.node().name(), op, errno, offset_bytes, len_bytes);
        }
        self.queue.record_latency(
            Some(op),
            len_bytes,
            result,
            started.elapsed().as_nanos() as u64,
        );
        self.queue
            .in_flight
            .store(self.table.in_flight(), Ordering::Relaxed);
        self.complete(
            q,
            tag,
            match result {
                Ok(()) if op.moves_data() => len_bytes as i32,
                Ok(()) => 0,
                Err(e) => -errno_of(e),
            },
        );
    }

    /// A new request: check it, and put its backing I/O on the ring.
    fn start(&mut self, q: &UblkQueue, tag: u16) {
        let iod = q.get_iod(tag);
        // The kernel is trusted less than nothing: check what it sends.
        let CheckedIo {
            op,
            offset_bytes,
            len_bytes,
        } = match check_io(
            iod.op_flags,
            iod.start_sector,
            iod.nr_sectors,
            &self.io_limits,
        ) {
            Ok(io) => io,
            Err(IoRefusal::UnknownOp(code)) => {
                self.logs.unsupported.warn(
                    self.export,
                    self.qid,
                    format_args!("unsupported op {code}"),
                );
                self.queue.record(None, 0, Err(RequestError::Unsupported));
                return self.complete(q, tag, -libc::EOPNOTSUPP);
            }
            Err(IoRefusal::Invalid(op)) => {
                self.queue.record(Some(op), 0, Err(RequestError::Invalid));
                return self.complete(q, tag, -libc::EIO);
            }
        };
        if self.stale {
            self.follow_node();
            if self.stale {
                self.queue
                    .record(Some(op), 0, Err(RequestError::Io(libc::EIO)));
                return self.complete(q, tag, -libc::EIO);
            }
        }
        let bufs = self.bufs;
        let buf = &bufs[usize::from(tag)];
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
        // after its backing I/O was reaped. `bufs` lives until
        // `serve_queue` returns, and the queue loop returns only once the
        // device stopped, which the kernel allows only after every request
        // it issued was completed by us (a slot table dropped earlier
        // leaks, see its `Drop`).
        let prepared = unsafe { self.table.begin(tag, &req, (op, Instant::now())) };
        let user_data =
            |half: u32| UblkIOCtx::build_user_data(tag, iod.op_flags & 0xff, half, true);
        let submitted = match prepared {
            Ok(Prepared::Sqe(sqe)) => q.ublk_submit_sqe_sync(sqe.user_data(user_data(0))),
            Ok(Prepared::Mirrored { source, target }) => {
                q.ublk_submit_sqe_sync(source.user_data(user_data(0)))
                    .map(|()| {
                        if let Err(e) =
                            q.ublk_submit_sqe_sync(target.user_data(user_data(TARGET_HALF)))
                        {
                            // The node's half is on its way: the target's
                            // counts as failed, and the mirror copies the
                            // chunk again.
                            self.logs.submit.error(
                                self.export,
                                self.qid,
                                format_args!(
                                    "tag {tag}: cannot submit the mirror target's write: {e}"
                                ),
                            );
                            let _ = self.table.finish(tag, Half::Target, -libc::EIO);
                        }
                    })
            }
            Ok(Prepared::Done(res)) => {
                if let Some((ctx, result)) = self.table.finish(tag, Half::Source, res) {
                    self.done(q, tag, ctx, result);
                }
                return;
            }
            Err(e) => {
                self.queue.record(Some(op), 0, Err(e));
                return self.complete(q, tag, -errno_of(e));
            }
        };
        self.queue
            .in_flight
            .store(self.table.in_flight(), Ordering::Relaxed);
        if let Err(e) = submitted {
            // ublk_submit_sqe_sync queues the SQE and only fails when the
            // ring's submission queue cannot take it even after a submit, so
            // nothing of this request reached the kernel (a mirrored write's
            // second SQE is handled above).
            self.logs.submit.error(
                self.export,
                self.qid,
                format_args!("tag {tag}: cannot submit: {e}"),
            );
            let ctx = self.table.abort(tag, libc::EIO);
            self.done(q, tag, ctx.0, ctx.1);
        }
    }
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
