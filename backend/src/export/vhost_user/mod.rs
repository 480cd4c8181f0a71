//! The vhost-user-blk export: a UNIX socket that QEMU, cloud-hypervisor or
//! libvirt attach, served by one worker thread per queue.
//!
//! Threads: a listener thread per export accepts one frontend at a time and
//! runs the vhost-user protocol through `vhost-user-backend`; that library
//! spawns one worker thread per queue (see `queues_per_thread`), which calls
//! [`BlkBackend::handle_event`] for kicks and engine completions. Every
//! connection gets fresh queue state, so a frontend that goes away takes only
//! its own requests with it, and a new one (a restarted QEMU) starts clean.

mod chain;
pub(crate) mod inflight;
mod queue;
pub(crate) mod virtio_blk;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::inflight::{Handoff, InflightRegion};
use self::queue::{ExportShared, QueueParams, QueueWorker};
use self::virtio_blk::Geometry;
use super::{wait_idle, DrainBounds, ExportError, ExportTotals, LatencyPercentiles, QueueShared};
use crate::api::Event;
use crate::binding::Binding;
use crate::engine::Engine;
use crate::limits::{
    ACCEPT_FAILURE_LOG_INTERVAL_MS, ACCEPT_RETRY_MAX_MS, DETACH_QUIET_MS, MAX_QUEUE_DEPTH,
    MAX_SEGMENTS, SEGMENT_MAX_BYTES, SERIAL_MAX_BYTES,
};
use crate::logging::Throttle;
use crate::node::Node;
use crate::qos::ExportQos;

/// How one vhost-user export is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    /// Export name (logs, ready line).
    pub name: String,
    /// Socket path.
    pub socket: PathBuf,
    /// Number of queues (one worker thread each).
    pub queues: u16,
    /// In-flight requests per queue.
    pub queue_depth: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// GET_ID answer (cut to 20 bytes).
    pub serial: String,
    /// Polling window before a queue sleeps.
    pub poll_window_us: u32,
    /// Socket file mode.
    pub socket_mode: u32,
}

/// Event id of a queue's engine completions in its worker's epoll set (ids up
/// to `num_queues` belong to the library).
fn completion_event_id(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

/// Event id of a queue's QoS timer in its worker's epoll set.
fn qos_timer_event_id(num_queues: usize) -> u64 {
    num_queues as u64 + 2
}

#[derive(Clone)]
struct BlkBackend {
    geometry: Geometry,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    config_space: Arc<Vec<u8>>,
    workers: Arc<[Mutex<QueueWorker>]>,
    shared: Arc<ExportShared>,
    exit_events: Arc<[(Mutex<Option<EventConsumer>>, EventNotifier)]>,
    /// Exit-event descriptors handed to vhost-user-backend, closed when the
    /// last clone of this backend (the library's workers hold clones) goes.
    handed_out: Arc<HandedOutFds>,
    /// The inflight buffer the frontend set, for the queues to take.
    inflight: Arc<Handoff>,
    export: Arc<str>,
}

impl BlkBackend {
    /// What a frontend's inflight buffer may describe.
    fn inflight_limits(&self) -> inflight::Limits {
        inflight::Limits {
            queues: self.geometry.queues,
            queue_size: MAX_QUEUE_DEPTH,
        }
    }

    /// Logs why an inflight message was refused; the frontend gets the error.
    fn inflight_refused(&self, message: &str, e: inflight::InflightError) -> io::Error {
        tracing::error!(
            export = &*self.export,
            "{message} refused: {e}; the frontend cannot start the device with this buffer"
        );
        io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
    }
}

/// vhost-user-backend 0.24 registers the exit event's consumer in its
/// worker's epoll set with `into_raw_fd` and never closes it: one eventfd
/// per queue per connection (a reconnecting frontend exhausted the daemon's
/// descriptors). We remember each one and close it once every worker that
/// could use it is gone. The dependency is pinned to that exact version in
/// Cargo.toml, because a release that closes the descriptor itself would make
/// this a double close.
#[derive(Default)]
struct HandedOutFds(Mutex<Vec<std::os::fd::RawFd>>);

impl Drop for HandedOutFds {
    fn drop(&mut self) {
        for fd in self
            .0
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            // SAFETY: `fd` was the consumer side of an exit eventfd that we
            // created and the library took over with `into_raw_fd` and only
            // registered in its epoll set; that epoll and every worker thread
            // belong to handlers holding clones of this backend, so once the
            // last clone is dropped nothing uses `fd`, and nobody else closes it.
            unsafe { libc::close(fd) };
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_DEPTH)
    }

    fn features(&self) -> u64 {
        self.geometry.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(
        &self,
        request: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, File)> {
        inflight::create(request, self.inflight_limits())
            .map_err(|e| self.inflight_refused("GET_INFLIGHT_FD", e))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::map(&file, msg, self.inflight_limits())
            .map_err(|e| self.inflight_refused("SET_INFLIGHT_FD", e))?;
        tracing::debug!(
            export = &*self.export,
            queues = region.num_queues(),
            queue_size = region.queue_size(),
            "inflight buffer set"
        );
        self.inflight.install(region);
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Called after the new map is in place and before the message is
        // answered: workers see the generation move at their next turn or
        // pop and take the map then (see QueueWorker::refresh_memory).
        self.shared.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        let mut out = vec![0u8; size as usize];
        if start < self.config_space.len() {
            let end = end.min(self.config_space.len());
            out[..end - start].copy_from_slice(&self.config_space[start..end]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache byte is writable in virtio-blk; we cannot turn
        // a device's volatile cache on or off, so accept only its own value.
        let wce = std::mem::offset_of!(virtio_bindings::virtio_blk::virtio_blk_config, wce);
        let unchanged = buf
            .iter()
            .enumerate()
            .all(|(i, b)| self.config_space.get(offset as usize + i) == Some(b));
        if offset as usize == wce && unchanged {
            return Ok(());
        }
        tracing::warn!(
            export = &*self.export,
            offset,
            "guest tried to change read-only config"
        );
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "config space is read-only",
        ))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.geometry.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exit_events.get(thread_index)?;
        let notifier = notifier.try_clone().ok()?;
        let consumer = consumer.lock().unwrap().take()?;
        self.handed_out
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend may only take the ring back once the
        // requests we accepted from it are answered. The worker completes
        // them as their completions arrive; wait for that, bounded.
        let Some(q) = self.shared.queues.get(queue_index as usize) else {
            return Ok(());
        };
        wait_idle(q, Duration::from_millis(crate::limits::DRAIN_TIMEOUT_MS));
        // A stopped ring is restarted with a fresh base: a queue that was
        // broken serves it again.
        q.ring_stopped.store(true, Ordering::Release);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let is_kick = device_event == 0;
        let is_completion = u64::from(device_event) == completion_event_id(self.num_queues())
            || u64::from(device_event) == qos_timer_event_id(self.num_queues());
        if !is_kick && !is_completion {
            return Ok(());
        }
        // Taken once per wake-up, never per request, and only ever by this
        // queue's worker thread: uncontended by construction.
        let mut worker = self.workers[thread_id].lock().unwrap();
        worker.run(vring, &self.mem);
        Ok(())
    }
}

/// A running vhost-user export.
pub struct VhostUserExport {
    config: VhostUserConfig,
    shared: Arc<ExportShared>,
    stop: Arc<StopEvent>,
    stopping: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostUserExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserExport")
            .field("config", &self.config)
            .field("node", &self.node().name())
            .finish()
    }
}

impl VhostUserExport {
    /// Binds the socket and starts accepting frontends. When this returns,
    /// the socket accepts connections.
    /// Frontends connecting and leaving are told to `events`; `qos` limits
    /// what its queues start.
    pub(crate) fn start(
        node: Arc<Node>,
        config: VhostUserConfig,
        events: crate::events::Events,
        qos: Arc<ExportQos>,
    ) -> Result<Self, ExportError> {
        let geometry = Geometry {
            limits: *node.limits(),
            read_only: config.read_only || node.read_only(),
            queues: config.queues,
            size_max: SEGMENT_MAX_BYTES,
            seg_max: MAX_SEGMENTS as u32,
        };
        let shared = Arc::new(ExportShared {
            admitting: AtomicBool::new(true),
            binding: Arc::new(Binding::new(node.clone())),
            queues: (0..config.queues).map(|_| QueueShared::default()).collect(),
            wakers: Mutex::new(Vec::new()),
            workers: Mutex::new(None),
            control_waiting: AtomicU32::new(0),
            mem_generation: AtomicU64::new(0),
            name: config.name.as_str().into(),
            qos,
        });
        // Build the first connection's engines now, so a kernel without
        // io_uring is reported at start, not at the first frontend.
        let first = Connection::new(&config, geometry, &shared)?;
        let listener = bind_socket(&config.socket, config.socket_mode)?;
        let stop = Arc::new(StopEvent::new().map_err(|source| ExportError::Os {
            export: config.name.clone(),
            what: "eventfd",
            source,
        })?);
        let stopping = Arc::new(AtomicBool::new(false));
        let connection = Arc::new(Mutex::new(None));
        let thread = {
            let ctx = ListenerCtx {
                config: config.clone(),
                geometry,
                shared: shared.clone(),
                stop: stop.clone(),
                stopping: stopping.clone(),
                connection: connection.clone(),
                events,
            };
            std::thread::Builder::new()
                .name(format!("vu-{}", config.name))
                .spawn(move || ctx.serve(listener, first))
                .map_err(|source| ExportError::Os {
                    export: config.name.clone(),
                    what: "cannot spawn the listener thread",
                    source,
                })?
        };
        Ok(VhostUserExport {
            config,
            shared,
            stop,
            stopping,
            connection,
            thread: Some(thread),
        })
    }

    /// The export's configuration.
    pub fn config(&self) -> &VhostUserConfig {
        &self.config
    }

    /// The node it serves now.
    pub fn node(&self) -> Arc<Node> {
        self.shared.binding.node()
    }

    /// Whether the guest sees a read-only disk.
    pub fn read_only(&self) -> bool {
        self.config.read_only || self.node().read_only()
    }

    /// The node, mirror tap and pause its queues share.
    pub fn binding(&self) -> &Arc<Binding> {
        &self.shared.binding
    }

    /// Its QoS.
    pub(crate) fn qos(&self) -> &Arc<ExportQos> {
        &self.shared.qos
    }

    /// Pivot, step one: queues leave new requests in the ring; waits until
    /// nothing is in flight. On timeout the export is resumed and the busy
    /// queues are returned.
    pub fn pause(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        self.shared.binding.pause();
        let idle = self.wait_until_idle(timeout);
        if idle.is_err() {
            self.resume();
        }
        idle
    }

    /// Waits until nothing is in flight, counted under each worker's lock
    /// (a worker that looked at `paused`/`admitting` before it changed has
    /// finished that pass). Completions wake the workers themselves. On
    /// timeout returns the busy queues, including those whose thread is
    /// stuck in the kernel (their lock could not be taken).
    fn wait_until_idle(&self, timeout: Duration) -> Result<(), Vec<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.shared.in_flight_exact(deadline) {
                None | Some(Ok(0)) => return Ok(()),
                Some(Err(stuck)) => {
                    tracing::error!(
                        export = %self.config.name,
                        "queues {stuck:?}: the queue thread is blocked in the kernel (the backing \
                         device or file system does not answer)"
                    );
                    return Err(stuck);
                }
                Some(Ok(_)) if Instant::now() >= deadline => {
                    return Err(self
                        .shared
                        .queues
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| q.in_flight.load(Ordering::Relaxed) > 0)
                        .map(|(i, _)| i)
                        .collect())
                }
                Some(Ok(_)) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Pivot, step three: queues take requests again (and are woken, since
    /// the guest's kicks during the pause were consumed).
    pub fn resume(&self) {
        self.shared.binding.resume();
        self.shared.wake_all();
    }

    /// Requests in flight over all queues.
    pub fn in_flight(&self) -> u32 {
        self.shared
            .queues
            .iter()
            .map(|q| q.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Cumulative statistics.
    pub fn totals(&self) -> ExportTotals {
        ExportTotals::of(&self.shared.queues)
    }

    /// Each queue's counters.
    pub(crate) fn queues(&self) -> &[QueueShared] {
        &self.shared.queues
    }

    /// Completion latency percentiles.
    pub fn latency(&self) -> LatencyPercentiles {
        LatencyPercentiles::of(&self.shared.queues)
    }

    /// New requests fail with IOERR from now on. Queues are woken, so that
    /// what already waits in a ring is answered too.
    pub fn stop_admitting(&self) {
        self.shared.admitting.store(false, Ordering::SeqCst);
        // What waits for QoS tokens is answered now too.
        self.shared.qos.bypass();
        self.shared.wake_all();
    }

    /// Drain: admit nothing new (new requests fail with IOERR), wait until
    /// nothing is in flight, then until the guest is quiet (both within
    /// `bounds`). Returns the queues that stayed busy.
    pub fn drain(&self, bounds: DrainBounds) -> Result<(), Vec<usize>> {
        self.stop_admitting();
        self.wait_until_idle(bounds.in_flight)?;
        self.wait_until_guest_quiet(bounds.guest_quiet);
        Ok(())
    }

    /// Keeps failing new requests (admission is closed) until the guest has
    /// sent none for `DETACH_QUIET_MS`, at most `limit`: a guest whose I/O
    /// fails stops sending, while a request it queues after the detach would
    /// sit in a ring nobody reads (QEMU keeps the rings for a reconnect) and
    /// hang the guest.
    fn wait_until_guest_quiet(&self, limit: Duration) {
        // No frontend connected (none ever, or it left): nobody can queue
        // a request, so there is nothing to wait for.
        if self.connection.lock().unwrap().is_none() {
            return;
        }
        let quiet = Duration::from_millis(DETACH_QUIET_MS);
        let started = Instant::now();
        let mut seen = self.totals().requests;
        let mut since = Instant::now();
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.totals().requests;
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
        tracing::warn!(
            export = %self.config.name,
            "the guest kept sending requests for {} ms after the drain; detaching anyway",
            limit.as_millis()
        );
    }

    /// Detach: drop the frontend, stop accepting, remove the socket and give
    /// the node reference back. The frontend sees the socket close.
    pub fn detach(mut self, timeout: Duration) -> Result<Arc<Node>, ExportError> {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.fire();
        if let Some(handle) = self.connection.lock().unwrap().take() {
            handle.shutdown();
        }
        let thread = self.thread.take().expect("detached twice");
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.config.socket);
        if !thread.is_finished() {
            return Err(ExportError::FrontendStuck {
                export: self.config.name.clone(),
                timeout_ms: timeout.as_millis(),
            });
        }
        let _ = thread.join();
        Ok(self.node())
    }
}

/// Per-connection state: fresh engines and workers.
struct Connection {
    backend: BlkBackend,
}

impl Connection {
    fn new(
        config: &VhostUserConfig,
        geometry: Geometry,
        shared: &Arc<ExportShared>,
    ) -> Result<Self, ExportError> {
        let mut serial = [0u8; SERIAL_MAX_BYTES];
        let bytes = config.serial.as_bytes();
        let n = bytes.len().min(SERIAL_MAX_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        let node = shared.binding.node();
        let mut workers = Vec::with_capacity(usize::from(config.queues));
        let mut exit_events = Vec::with_capacity(usize::from(config.queues));
        let mut wakers = Vec::with_capacity(usize::from(config.queues));
        let handoff = Arc::new(Handoff::new(config.queues));
        let params = QueueParams {
            geometry,
            serial,
            poll_window: Duration::from_micros(u64::from(config.poll_window_us)),
        };
        let eventfd_err = |source: io::Error| ExportError::Os {
            export: config.name.clone(),
            what: "eventfd",
            source,
        };
        for q in 0..config.queues {
            let completion_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(eventfd_err)?;
            wakers.push(completion_event.try_clone().map_err(eventfd_err)?);
            let engine = Engine::with_completion_event(node.clone(), config.queue_depth, &completion_event, Some(shared.binding.clone())).map_err(|source| {
                let hint = match source.raw_os_error() {
                    Some(libc::ENOSYS) => ": the kernel has no io_uring (Linux 5.15+ needed)",
                    Some(libc::EPERM) => {
                        ": io_uring is disabled (sysctl kernel.io_uring_disabled) or blocked by seccomp"
                    }
                    Some(libc::ENOMEM) => ": raise RLIMIT_MEMLOCK or lower --queue-depth",
                    _ => "",
                };
                ExportError::Engine {
                    export: config.name.clone(),
                    queue: q,
                    source,
                    hint,
                }
            })?;
            workers.push(Mutex::new(QueueWorker::new(
                engine,
                completion_event,
                params,
                shared.clone(),
                usize::from(q),
                handoff.clone(),
                TimerFd::new().map_err(|source| ExportError::Os {
                    export: config.name.clone(),
                    what: "timerfd",
                    source: source.into(),
                })?,
            )));
            let (consumer, notifier) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map_err(eventfd_err)?;
            exit_events.push((Mutex::new(Some(consumer)), notifier));
        }
        *shared.wakers.lock().unwrap() = wakers;
        let workers: Arc<[Mutex<QueueWorker>]> = workers.into();
        *shared.workers.lock().unwrap() = Some(Arc::downgrade(&workers));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        Ok(Connection {
            backend: BlkBackend {
                geometry,
                config_space: Arc::new(geometry.config_space()),
                mem,
                workers,
                shared: shared.clone(),
                exit_events: exit_events.into(),
                handed_out: Arc::default(),
                inflight: handoff,
                export: config.name.as_str().into(),
            },
        })
    }
}

struct ListenerCtx {
    config: VhostUserConfig,
    geometry: Geometry,
    shared: Arc<ExportShared>,
    stop: Arc<StopEvent>,
    stopping: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    /// Told when a frontend connects and leaves (from this thread, never a
    /// queue's).
    events: crate::events::Events,
}

/// An eventfd that tells the listener to stop: written once, polled (never
/// read) by the listener and the accept back-off.
#[derive(Debug)]
struct StopEvent(std::os::fd::OwnedFd);

impl StopEvent {
    fn new() -> io::Result<Self> {
        use rustix::event::EventfdFlags;
        Ok(StopEvent(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?))
    }

    fn fire(&self) {
        // A full counter (impossible from one write) is the only failure,
        // and it leaves the eventfd readable anyway.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }
}

impl ListenerCtx {
    /// Serves one frontend after another until the export is stopped.
    fn serve(self, listener: UnixListener, first: Connection) {
        // The same socket, watched for pending frontends (vhost's Listener
        // owns the other descriptor and lends it only as a raw fd).
        let watch = match listener.try_clone() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(export = %self.config.name, "cannot watch the socket: {e}");
                return;
            }
        };
        let mut listener = Listener::from(listener);
        let mut next = Some(first);
        let mut failures = AcceptFailures::default();
        while !self.stopping.load(Ordering::SeqCst) {
            match wait_readable(&watch, &self.stop.0) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::error!(export = %self.config.name, "poll on socket failed: {e}");
                    break;
                }
            }
            let conn = match next.take() {
                Some(c) => Ok(c),
                None => Connection::new(&self.config, self.geometry, &self.shared),
            };
            let served = conn
                .map_err(|e| ConnectionError::Setup(Box::new(e)))
                .and_then(|conn| self.serve_one(&mut listener, conn));
            match served {
                Ok(()) => failures.reset(&self.config.name),
                // Out of descriptors, say: the pending frontend stays in the
                // backlog and the socket stays readable, so without a pause
                // this loop would spin and log as fast as it can.
                Err(e) => failures.failed(&self.config.name, &e, &self.stop),
            }
        }
        tracing::debug!(export = %self.config.name, "listener stopped");
    }

    /// Accepts one frontend and serves it until it leaves. Errors: the
    /// frontend could not be accepted or set up.
    fn serve_one(&self, listener: &mut Listener, conn: Connection) -> Result<(), ConnectionError> {
        let name = &self.config.name;
        let backend = conn.backend;
        let completion_fds: Vec<_> = backend
            .workers
            .iter()
            .map(|w| {
                let w = w.lock().unwrap();
                (w.completion_fd(), w.qos_timer_fd())
            })
            .collect();
        let mut daemon = VhostUserDaemon::new(name.clone(), backend.clone(), backend.mem.clone())
            .map_err(ConnectionError::Daemon)?;
        let event_id = completion_event_id(usize::from(self.config.queues));
        let timer_id = qos_timer_event_id(usize::from(self.config.queues));
        for (handler, (fd, timer)) in daemon.get_epoll_handlers().iter().zip(&completion_fds) {
            handler
                .register_listener(*fd, EventSet::IN, event_id)
                .map_err(ConnectionError::WatchCompletions)?;
            handler
                .register_listener(*timer, EventSet::IN, timer_id)
                .map_err(ConnectionError::WatchCompletions)?;
        }
        daemon.start(listener).map_err(ConnectionError::Accept)?;
        *self.connection.lock().unwrap() = daemon.shutdown_handle();
        tracing::info!(export = %name, "frontend connected");
        self.events.emit(Event::FrontendConnected {
            export: name.clone(),
        });
        if self.stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        let error = match daemon.wait() {
            // A frontend that hangs up ends the request loop with
            // `Disconnected`: the ordinary way to leave.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => {
                tracing::info!(export = %name, "frontend disconnected");
                None
            }
            Err(e) => {
                tracing::info!(export = %name, "frontend connection ended: {e}");
                Some(e.to_string())
            }
        };
        self.connection.lock().unwrap().take();
        // Dropping the daemon stops and joins the queue workers; dropping the
        // last backend clone drains each engine before its memory goes.
        drop(daemon);
        drop(backend);
        // Once the connection's workers and engines are gone: a frontend
        // that reconnects on this event finds the export ready for it.
        self.events.emit(Event::FrontendDisconnected {
            export: name.clone(),
            error,
        });
        Ok(())
    }
}

/// Why a frontend could not be taken.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Setup(Box<ExportError>),
    #[error("cannot create vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot watch engine completions: {0}")]
    WatchCompletions(#[source] io::Error),
    #[error("accepting a frontend failed: {0}")]
    Accept(vhost_user_backend::Error),
}

/// Consecutive failures to take a frontend: backs off (bounded) and logs the
/// first failure, then one summary per `ACCEPT_FAILURE_LOG_INTERVAL_MS`.
struct AcceptFailures {
    count: u64,
    log: Throttle,
}

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures {
            count: 0,
            log: Throttle::per_ms(ACCEPT_FAILURE_LOG_INTERVAL_MS),
        }
    }
}

impl AcceptFailures {
    fn failed(&mut self, export: &str, error: &ConnectionError, stop: &StopEvent) {
        self.count += 1;
        if let Some(suppressed) = self.log.allow() {
            tracing::error!(
                export,
                failures = suppressed + 1,
                "cannot take a frontend: {error} (retrying; if descriptors ran out, raise the open-file limit)"
            );
        }
        // 10 ms, doubling up to the limit; a stop request ends the pause.
        let shift = self.count.min(16) as u32;
        let pause_ms = (10u64 << shift).min(ACCEPT_RETRY_MAX_MS);
        let mut fds = [PollFd::new(&stop.0, PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: (pause_ms / 1000) as i64,
            tv_nsec: ((pause_ms % 1000) * 1_000_000) as i64,
        };
        // A timeout or EINTR just ends the pause.
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
    }

    fn reset(&mut self, export: &str) {
        if self.count > 0 {
            tracing::info!(export, failures = self.count, "took a frontend again");
        }
        *self = AcceptFailures::default();
    }
}

/// Waits until `listener` has a pending connection (true) or `stop`
/// fires (false).
fn wait_readable(listener: impl AsFd, stop: impl AsFd) -> io::Result<bool> {
    let mut fds = [
        PollFd::new(&listener, PollFlags::IN),
        PollFd::new(&stop, PollFlags::IN),
    ];
    loop {
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if !fds[1].revents().is_empty() {
            return Ok(false);
        }
        if !fds[0].revents().is_empty() {
            return Ok(true);
        }
    }
}

/// Binds the socket (see [`crate::unix_socket::bind`]: only a stale socket
/// is replaced, the mode is set before anyone can connect).
fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, ExportError> {
    crate::unix_socket::bind(path, mode).map_err(|source| ExportError::Socket {
        path: path.to_owned(),
        source,
    })
}
