//! One vhost-user queue: its vring, its engine and its polling loop, all
//! driven by the queue's own worker thread.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};

use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::chain::Chain;
use super::inflight::{Handoff, QueueInflight, Recovery, RingIndices};
use super::virtio_blk::{decode, status_of, Command, Decoded, Geometry};
use crate::binding::Binding;
use crate::engine::{Engine, SubmitError};
use crate::export::error_log::BackingErrorLog;
use crate::export::QueueShared;
use crate::iovec::scatter;
use crate::limits::{
    BAD_REQUEST_LOG_INTERVAL_MS, DATA_PATH_LOG_INTERVAL_MS, MAX_SEGMENTS, POLL_YIELD_INTERVAL_US,
    SERIAL_MAX_BYTES,
};
use crate::logging::Throttle;
use crate::qos::{Class, ExportQos};
use crate::request::{BlockOp, BlockRequest, RequestError, RequestResult};

/// What the engine carries for each in-flight virtio request.
#[derive(Debug, Clone)]
pub(super) struct VirtioCtx {
    head: u16,
    status_addr: GuestAddress,
    used_len_ok: u32,
    /// `None` for requests answered without a block operation (GET_ID).
    op: Option<BlockOp>,
    offset_bytes: u64,
    len_bytes: u64,
    /// When the chain was popped, for the latency histogram.
    started: Instant,
}

/// State every queue of one export shares.
#[derive(Debug)]
pub(super) struct ExportShared {
    /// New requests are admitted; once cleared they fail with IOERR.
    pub admitting: AtomicBool,
    /// The node, the mirror tap and the pause: a paused queue leaves new
    /// requests in the ring; it moves to a switched node when it has
    /// nothing in flight.
    pub binding: Arc<Binding>,
    /// Per-queue state.
    pub queues: Box<[QueueShared]>,
    /// Each queue's completion eventfd of the current connection: writing
    /// it wakes the queue (after a pause).
    pub wakers: Mutex<Vec<EventFd>>,
    /// The current connection's queue workers. A pause locks each in turn:
    /// holding a worker's lock means it is between wake-ups, so what it has
    /// in flight is exact and its next pop sees the pause.
    pub workers: Mutex<Option<Weak<[Mutex<QueueWorker>]>>>,
    /// Control-plane threads waiting for a worker's lock: a worker that sees
    /// this non-zero leaves its polling loop at once (and wakes itself to
    /// come back), so a queue kept busy by its guest cannot starve a drain.
    pub control_waiting: AtomicU32,
    /// The export's name, for logs.
    pub name: Arc<str>,
    /// The export's QoS limits (its group's buckets).
    pub qos: Arc<ExportQos>,
    /// Bumped by every memory table the frontend sets (`update_memory`,
    /// before the message is answered, so before the frontend can use the
    /// new memory in a ring): a queue compares it with the one it saw last
    /// (one load) instead of loading the map at every turn and every pop.
    pub mem_generation: AtomicU64,
}

impl ExportShared {
    /// Requests in flight over the current connection's queues, counted
    /// while each queue is between wake-ups (`None`: no connection). A
    /// queue whose worker cannot be locked by `deadline` is stuck (its
    /// thread blocked in the kernel, e.g. submitting to a file system that
    /// does not answer): `Err` lists those queues.
    pub(super) fn in_flight_exact(&self, deadline: Instant) -> Option<Result<u32, Vec<usize>>> {
        let workers = self.workers.lock().unwrap().as_ref()?.upgrade()?;
        let mut total = 0;
        let mut stuck = Vec::new();
        for (i, w) in workers.iter().enumerate() {
            match self.lock_worker(w, deadline) {
                Some(worker) => total += worker.engine.in_flight() + worker.held_in_flight(),
                None => stuck.push(i),
            }
        }
        Some(if stuck.is_empty() {
            Ok(total)
        } else {
            Err(stuck)
        })
    }

    /// Locks a queue worker from the control plane, waiting at most until
    /// `deadline`: a polling worker sees `control_waiting` and lets go
    /// within one iteration, but one whose thread is blocked in the kernel
    /// never does, and the control plane must not wait for it forever.
    fn lock_worker<'a>(
        &self,
        w: &'a Mutex<QueueWorker>,
        deadline: Instant,
    ) -> Option<MutexGuard<'a, QueueWorker>> {
        self.control_waiting.fetch_add(1, Ordering::SeqCst);
        let mut pause = Duration::from_micros(20);
        let guard = loop {
            match w.try_lock() {
                Ok(g) => break Some(g),
                Err(TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => break None,
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
            }
        };
        self.control_waiting.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Wakes every queue of the current connection.
    pub(super) fn wake_all(&self) {
        for w in self.wakers.lock().unwrap().iter() {
            let _ = w.write(1);
        }
    }
}

/// The queue thread's own state. Only the queue's worker thread touches it.
pub(super) struct QueueWorker {
    engine: Engine<VirtioCtx>,
    /// The eventfd the engine posts completions to, watched by this queue's
    /// worker; kept across engine rebuilds.
    completion_event: EventFd,
    queue_depth: u16,
    /// The guest memory map requests are decoded against.
    mem: Arc<GuestMemoryMmap>,
    /// Maps replaced while requests were in flight: those requests' buffers
    /// (handed to the kernel as host pointers) must stay mapped, so the old
    /// maps live until the queue is idle.
    retired: Vec<Arc<GuestMemoryMmap>>,
    /// The frontend's newest map was refused by [`check_memory_files`]:
    /// the queue stays broken until it sends one that fits.
    map_refused: bool,
    geometry: Geometry,
    serial: [u8; SERIAL_MAX_BYTES],
    iovecs: Box<[libc::iovec; MAX_SEGMENTS]>,
    shared: Arc<ExportShared>,
    index: usize,
    poll_window: Duration,
    /// Data-path log lines, each limited to one per interval with a count.
    bad_request_log: Throttle,
    submit_error_log: Throttle,
    switch_error_log: Throttle,
    /// The binding switched node and this queue could not follow (no new
    /// ring): requests fail until it can, never served by the old node
    /// after a pivot.
    node_stale: bool,
    /// The binding's node generation this queue's engine follows.
    node_generation: u64,
    /// The memory-table generation (`ExportShared::mem_generation`) of
    /// `mem`: the map is looked up again only when it moved.
    mem_generation: u64,
    /// Why this queue's ring cannot be served (the frontend corrupted it):
    /// nothing is popped until the frontend stops and restarts the ring or
    /// reconnects. Requests already in flight still complete.
    broken: Option<&'static str>,
    backing_errors: BackingErrorLog,
    /// Where the frontend's inflight buffer (`SET_INFLIGHT_FD`) waits for
    /// this queue's ring to start.
    handoff: Arc<Handoff>,
    /// This queue's part of the inflight buffer: every chain taken from the
    /// ring is marked here until the used ring has it.
    inflight: Option<QueueInflight>,
    /// Heads a previous sluice (or connection) had taken and not answered,
    /// in the order it took them: submitted again before anything new.
    resubmit: Vec<u16>,
    /// How many of `resubmit` are submitted.
    resubmitted: usize,
    /// The ring is new to this worker (a new process, or a restarted ring):
    /// signal the guest once it runs. A sluice killed between publishing
    /// completions in the used ring and signalling them leaves a guest that
    /// waits for an interrupt that never comes: with `EVENT_IDX` the used
    /// index has already passed the guest's `used_event`, so no later
    /// completion crosses it again. A spurious interrupt costs the guest
    /// one look at its used ring.
    signal_at_start: bool,
    /// When the last wake-up's work ended (`None` before the first): the
    /// wait since then is this queue's sleeping time.
    last_run_end: Option<Instant>,
    /// The request that found its QoS bucket empty: popped and decoded (its
    /// iovecs in `iovecs`), not submitted. Nothing more is popped until it
    /// goes, so it is the only one; it waits for `qos_timer`.
    held: Option<(u16, Decoded)>,
    /// Fires when the held request's tokens are due (in this worker's epoll
    /// set): a throttled queue sleeps instead of polling.
    qos_timer: TimerFd,
    qos_timer_armed: bool,
}

// SAFETY: the raw pointers in `iovecs` are scratch space rewritten for every
// request and never dereferenced across threads; the engine is Send.
unsafe impl Send for QueueWorker {}

/// What every queue of a connection is set up with.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueParams {
    pub geometry: Geometry,
    pub serial: [u8; SERIAL_MAX_BYTES],
    pub poll_window: Duration,
}

impl QueueWorker {
    /// A worker for queue `index` of an export.
    pub(super) fn new(
        engine: Engine<VirtioCtx>,
        completion_event: EventFd,
        params: QueueParams,
        shared: Arc<ExportShared>,
        index: usize,
        handoff: Arc<Handoff>,
        qos_timer: TimerFd,
    ) -> Self {
        let QueueParams {
            geometry,
            serial,
            poll_window,
        } = params;
        QueueWorker {
            backing_errors: BackingErrorLog::new(&shared.name, index),
            queue_depth: engine.depth(),
            engine,
            completion_event,
            mem: Arc::new(GuestMemoryMmap::new()),
            retired: Vec::new(),
            map_refused: false,
            geometry,
            serial,
            iovecs: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEGMENTS],
            ),
            shared,
            index,
            poll_window,
            bad_request_log: Throttle::per_ms(BAD_REQUEST_LOG_INTERVAL_MS),
            submit_error_log: Throttle::per_ms(DATA_PATH_LOG_INTERVAL_MS),
            switch_error_log: Throttle::per_ms(DATA_PATH_LOG_INTERVAL_MS),
            node_stale: false,
            // Unknown: the first turn looks at both.
            node_generation: u64::MAX,
            mem_generation: u64::MAX,
            broken: None,
            handoff,
            inflight: None,
            resubmit: Vec::new(),
            resubmitted: 0,
            signal_at_start: true,
            last_run_end: None,
            held: None,
            qos_timer,
            qos_timer_armed: false,
        }
    }

    /// The QoS timer to watch.
    pub(super) fn qos_timer_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.qos_timer.as_raw_fd()
    }

    /// 1 while a request waits for QoS tokens and counts as in flight: it
    /// was taken from the ring, so a drain and the frontend's ring stop wait
    /// for its answer. Not while paused: a held request is not on the node,
    /// and it waits for the resume like those left in the ring.
    fn held_in_flight(&self) -> u32 {
        u32::from(self.held.is_some() && !self.shared.binding.is_paused())
    }

    /// How long `decoded` must wait for QoS tokens (`None`: it starts now,
    /// and its tokens are taken). Only block operations of an admitting
    /// export count; what fails without I/O is answered at once.
    fn throttle(&self, decoded: &Decoded) -> Option<Duration> {
        match decoded.command {
            Command::Block { op, len_bytes, .. } if decoded.status_addr.is_some() => {
                let (class, bytes) = Class::of(op, len_bytes);
                self.shared.qos.admit(class, bytes)
            }
            _ => None,
        }
    }

    /// Wakes this worker in `wait` (a throttled request's tokens are due).
    fn arm_qos_timer(&mut self, wait: Duration) {
        if self.qos_timer_armed {
            return;
        }
        // A zero duration would disarm the timer.
        match self
            .qos_timer
            .reset(wait.max(Duration::from_micros(1)), None)
        {
            Ok(()) => self.qos_timer_armed = true,
            Err(e) => {
                // Without the timer the queue polls for the tokens instead
                // of sleeping; say so (rate-limited).
                self.submit_error_log.error(
                    &self.shared.name,
                    self.index as u16,
                    format_args!("cannot arm the QoS timer: {e}; the queue polls instead"),
                );
            }
        }
    }

    /// The completion eventfd to watch.
    pub(super) fn completion_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.completion_event.as_raw_fd()
    }

    /// Follows a pivot: once idle, rebuild the engine on the export's
    /// current node (a new ring with the new fixed file; the eventfd stays).
    fn follow_node(&mut self) {
        let binding = &self.shared.binding;
        let generation = binding.node_generation();
        if generation == self.node_generation || self.engine.in_flight() > 0 {
            return;
        }
        if binding.serves(self.engine.node()) {
            self.node_generation = generation;
            return;
        }
        let node = binding.node();
        match Engine::with_completion_event(
            node.clone(),
            self.queue_depth,
            &self.completion_event,
            Some(binding.clone()),
        ) {
            Ok(engine) => {
                tracing::info!(
                    queue = self.index,
                    node = node.name(),
                    "queue switched node"
                );
                self.engine = engine;
                self.node_stale = false;
                self.node_generation = generation;
            }
            Err(e) => {
                self.node_stale = true;
                self.switch_error_log.error(
                    &self.shared.name,
                    self.index as u16,
                    format_args!(
                        "cannot switch to node {}: {e}; requests fail until it can",
                        node.name()
                    ),
                );
            }
        }
    }

    fn shared(&self) -> &QueueShared {
        &self.shared.queues[self.index]
    }

    /// The frontend stopped the ring (`GET_VRING_BASE`) and starts it again:
    /// a broken ring is served again, and the guest is signalled once the
    /// ring runs.
    fn ring_restarted(&mut self) {
        self.signal_at_start = true;
        if self.broken.take().is_some() {
            tracing::info!(
                export = &*self.shared.name,
                queue = self.index,
                "the frontend restarted the ring: serving it again"
            );
        }
    }

    /// Handles a wake-up (vring kick or completions): works until the queue
    /// has been idle for the polling window, then arms notifications. The
    /// time since the last wake-up ended counts as sleeping, this one's as
    /// polling (two clock reads per wake-up, none per request).
    pub(super) fn run(
        &mut self,
        vring: &VringRwLock,
        atomic_mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) {
        let woke = Instant::now();
        if let Some(slept_since) = self.last_run_end {
            self.shared()
                .add_sleeping_ns(woke.duration_since(slept_since).as_nanos() as u64);
        }
        self.work(vring, atomic_mem, woke);
        let end = Instant::now();
        self.shared()
            .add_polling_ns(end.duration_since(woke).as_nanos() as u64);
        self.last_run_end = Some(end);
    }

    fn work(
        &mut self,
        vring: &VringRwLock,
        atomic_mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        woke: Instant,
    ) {
        self.engine.clear_completion_event();
        if self.qos_timer_armed {
            // Disarming also consumes an expiry, so epoll stops reporting
            // it; `pop` arms it again while a request still waits.
            let _ = self.qos_timer.clear();
            self.qos_timer_armed = false;
        }
        // A plain load first: the flag is almost never set, and an atomic
        // read-modify-write per wake-up would cost the request path.
        let ring_stopped = &self.shared().ring_stopped;
        if ring_stopped.load(Ordering::Relaxed) && ring_stopped.swap(false, Ordering::AcqRel) {
            self.ring_restarted();
        }
        self.follow_node();
        let mut idle_since = woke;
        let mut last_yield = idle_since;
        loop {
            if self.shared.control_waiting.load(Ordering::Relaxed) > 0 {
                // The control plane wants this worker's lock (drain, pause):
                // let go now and come back through our own eventfd.
                let _ = self.completion_event.write(1);
                break;
            }
            self.refresh_memory(atomic_mem);
            // A pivot can happen while this loop polls: never pop onto the
            // old node once the export switched.
            self.follow_node();
            let progress = {
                let mut state = vring.get_mut();
                let reaped = self.reap(&mut state);
                let popped = if self.broken.is_none() {
                    self.pop(&mut state, atomic_mem)
                } else {
                    0
                };
                if let Err(e) = self.engine.submit_pending() {
                    self.submit_error_log.error(
                        &self.shared.name,
                        self.index as u16,
                        format_args!("io_uring submit failed: {e}"),
                    );
                }
                if reaped + popped > 0 && state.needs_notification().unwrap_or(true) {
                    let _ = state.signal_used_queue();
                }
                reaped + popped
            };
            self.shared().in_flight.store(
                self.engine.in_flight() + u32::from(self.held.is_some()),
                Ordering::Relaxed,
            );
            if progress > 0 {
                idle_since = Instant::now();
                continue;
            }
            // Throttled: sleep until the QoS timer (or a completion) wakes
            // us; guest notifications stay off, nothing is popped meanwhile.
            if self.held.is_some() && self.qos_timer_armed {
                break;
            }
            let now = Instant::now();
            if now.duration_since(idle_since) < self.poll_window {
                // Poll, but every POLL_YIELD_INTERVAL_US give the core to
                // anything else runnable on it: another queue's worker, the
                // consumer, or the kernel worker doing our I/O. (A yield per
                // iteration costs a depth-1 request microseconds.)
                if now.duration_since(last_yield) >= Duration::from_micros(POLL_YIELD_INTERVAL_US) {
                    // sched_yield(2) on Linux.
                    std::thread::yield_now();
                    last_yield = now;
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Paused (pivot): requests stay in the ring; sleep without
            // looking at it. Completions and the resume wake us. A broken
            // ring is not looked at either: its bogus index would read as
            // pending work forever.
            if self.shared.binding.is_paused() || self.broken.is_some() {
                break;
            }
            // Going to sleep: re-enable guest notifications and look once
            // more, so a request that raced with the re-enable is not missed.
            // Completions wake us through the engine's eventfd.
            let mut state = vring.get_mut();
            match state.enable_notification() {
                Ok(true) => {
                    idle_since = Instant::now();
                    continue;
                }
                _ => break,
            }
        }
    }

    /// Follows the frontend's memory map (regions are added at any time, e.g.
    /// by libblkio after start or by memory hotplug): new requests use the
    /// newest map at once; maps still referenced by in-flight requests are
    /// retired until the queue is idle.
    ///
    /// A map with a region that reaches past the end of its file is refused
    /// (the queue breaks and keeps the old map): touching such a page would
    /// kill the daemon with SIGBUS, every export with it.
    fn refresh_memory(&mut self, atomic_mem: &GuestMemoryAtomic<GuestMemoryMmap>) {
        let generation = self.shared.mem_generation.load(Ordering::Acquire);
        if generation != self.mem_generation {
            self.mem_generation = generation;
            let current = atomic_mem.memory().into_inner();
            if !Arc::ptr_eq(&current, &self.mem) {
                if let Err(e) = check_memory_files(&current) {
                    tracing::error!(
                        export = &*self.shared.name,
                        queue = self.index,
                        "the frontend's memory table is refused: {e}"
                    );
                    self.map_refused = true;
                } else {
                    self.map_refused = false;
                    let old = std::mem::replace(&mut self.mem, current);
                    if self.engine.in_flight() > 0 || self.held.is_some() {
                        self.retired.push(old);
                    }
                }
            }
        }
        if self.map_refused {
            // Again after a ring restart cleared `broken`.
            self.mark_broken(MAP_PAST_EOF);
        }
        if self.engine.in_flight() == 0 && self.held.is_none() && !self.retired.is_empty() {
            self.retired.clear();
        }
    }

    /// Completes everything the engine has finished. Returns the count.
    fn reap(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> usize {
        let mem = &self.mem;
        let shared = &self.shared.queues[self.index];
        let mut used_ring_ok = true;
        let (errors, binding) = (&mut self.backing_errors, &self.shared.binding);
        let inflight = &mut self.inflight;
        let reaped = self.engine.reap(|ctx, result| {
            if let (Err(RequestError::Io(errno)), Some(op)) = (result, ctx.op) {
                let node = binding.node();
                errors.record(node.name(), op, errno, ctx.offset_bytes, ctx.len_bytes);
            }
            used_ring_ok &= complete(state, mem, shared, inflight.as_mut(), ctx, result);
        }) as usize;
        if !used_ring_ok {
            self.mark_broken("the used ring is not in guest memory");
        }
        reaped
    }

    /// Pops, validates and submits new chains while slots are free.
    fn pop(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        atomic_mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> usize {
        let mut count = 0;
        if self.shared.binding.is_paused() {
            return 0;
        }
        let _ = state.disable_notification();
        // The ring (re)started with an inflight buffer: take it, and with it
        // what a previous sluice left in flight, before anything new.
        if self.handoff.pending(self.index as u16) && !self.start_inflight(state) {
            return 0;
        }
        if self.signal_at_start && ring_running(state) {
            self.signal_at_start = false;
            let _ = state.signal_used_queue();
        }
        if self.resubmitted < self.resubmit.len() {
            count += self.resubmit(state, atomic_mem);
            if self.resubmitted < self.resubmit.len() {
                return count;
            }
        }
        // The request held for QoS goes first, when its tokens are due.
        if let Some((head, decoded)) = self.held {
            if let Some(wait) = self.throttle(&decoded) {
                self.arm_qos_timer(wait);
                return count;
            }
            self.held = None;
            count += 1;
            self.dispatch(state, head, decoded);
        }
        // The frontend owns the available index: check it before every batch
        // (virtio-queue refuses an index more than a ring ahead, but logs and
        // reports it as "nothing to pop", so the ring would look busy and
        // empty at once, forever).
        let mut pending = match self.pending_chains(state) {
            Ok(n) => n,
            Err(reason) => {
                self.mark_broken(reason);
                return 0;
            }
        };
        while pending > 0 && self.engine.has_free_slot() {
            let mem = &*self.mem;
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                self.mark_broken("an available ring entry cannot be read from guest memory");
                break;
            };
            // A chain may use memory the frontend mapped (and had acked)
            // after our last look at the map: look again now that the chain
            // is visible, and if the map changed, put the chain back and
            // take it again against the new map. One atomic load per
            // request; the rare re-pop only on a map change.
            if self.shared.mem_generation.load(Ordering::Acquire) != self.mem_generation {
                state.get_queue_mut().go_to_previous_position();
                self.refresh_memory(atomic_mem);
                if self.broken.is_some() {
                    break;
                }
                continue;
            }
            pending -= 1;
            count += 1;
            let head = chain.head_index();
            if let Some(inflight) = &mut self.inflight {
                inflight.mark(head);
            }
            let decoded = decode(chain, mem, &self.geometry, &mut self.iovecs);
            if let Some(wait) = self.throttle(&decoded) {
                // Taken from the ring (and marked in the inflight region),
                // so it is ours to answer: it waits here, not in the ring.
                self.held = Some((head, decoded));
                self.arm_qos_timer(wait);
                break;
            }
            self.dispatch(state, head, decoded);
        }
        count
    }

    /// Takes the inflight buffer the frontend set, once the ring is started
    /// and enabled and nothing of an earlier start is still in flight:
    /// checks this queue's region against the ring, and when it holds
    /// requests a previous sluice took and did not answer, puts the ring back
    /// where that sluice stood (the used index plus what is in flight) and
    /// queues those requests for resubmission. False while it cannot be taken
    /// yet (nothing is popped meanwhile) or when the region is invalid (the
    /// queue is then broken: serving it without the region could run answered
    /// requests twice or never run the ones in flight).
    fn start_inflight(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    ) -> bool {
        if !ring_running(state) || self.engine.in_flight() > 0 || self.held.is_some() {
            return false;
        }
        let queue = state.get_queue();
        let index = self.index as u16;
        self.resubmit.clear();
        self.resubmitted = 0;
        self.inflight = self.handoff.take(index);
        let Some(inflight) = &mut self.inflight else {
            // The buffer does not cover this queue (the frontend uses fewer).
            return true;
        };
        let mem = &*self.mem;
        let (Ok(used), Ok(avail)) = (
            queue.used_idx(mem, Ordering::Acquire),
            queue.avail_idx(mem, Ordering::Acquire),
        ) else {
            self.inflight = None;
            self.mark_broken("the ring is not in guest memory");
            return false;
        };
        let ring = RingIndices {
            size: queue.size(),
            used: used.0,
            avail: avail.0,
        };
        match inflight.recover(ring) {
            Ok(Recovery::Fresh) => true,
            Ok(Recovery::Resume { resubmit }) => {
                let in_flight = resubmit.len() as u16;
                let queue = state.get_queue_mut();
                let next_avail = ring.used.wrapping_add(in_flight);
                if next_avail != queue.next_avail() {
                    tracing::info!(
                        export = &*self.shared.name,
                        queue = self.index,
                        frontend = queue.next_avail(),
                        resumed = next_avail,
                        "the ring resumes where the inflight buffer says, not at the frontend's base"
                    );
                }
                queue.set_next_avail(next_avail);
                queue.set_next_used(ring.used);
                if !resubmit.is_empty() {
                    tracing::info!(
                        export = &*self.shared.name,
                        queue = self.index,
                        requests = resubmit.len(),
                        "resubmitting the requests a previous sluice had in flight"
                    );
                }
                self.resubmit = resubmit;
                true
            }
            Err(e) => {
                tracing::error!(
                    export = &*self.shared.name,
                    queue = self.index,
                    "the frontend's inflight buffer does not fit this ring: {e}"
                );
                self.inflight = None;
                self.mark_broken("its inflight buffer is invalid");
                false
            }
        }
    }

    /// Submits what is left of `resubmit` while slots are free: each chain is
    /// rebuilt from its head (its region entry stays marked). Returns how
    /// many were taken.
    fn resubmit(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        atomic_mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> usize {
        let mut count = 0;
        while self.resubmitted < self.resubmit.len() && self.engine.has_free_slot() {
            if self.shared.mem_generation.load(Ordering::Acquire) != self.mem_generation {
                self.refresh_memory(atomic_mem);
                if self.broken.is_some() {
                    break;
                }
            }
            let head = self.resubmit[self.resubmitted];
            self.resubmitted += 1;
            count += 1;
            let queue = state.get_queue();
            let mem = &*self.mem;
            let chain = Chain::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
            let decoded = decode(chain, mem, &self.geometry, &mut self.iovecs);
            self.dispatch(state, head, decoded);
        }
        if self.resubmitted == self.resubmit.len() {
            self.resubmit = Vec::new();
            self.resubmitted = 0;
        }
        count
    }

    /// Chains the frontend has made available and we have not popped, or why
    /// the ring cannot be served.
    fn pending_chains(
        &self,
        state: &VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    ) -> Result<u16, &'static str> {
        let queue = state.get_queue();
        let avail = queue
            .avail_idx(&*self.mem, Ordering::Acquire)
            .map_err(|_| "the available ring is not in guest memory")?;
        let pending = avail.0.wrapping_sub(queue.next_avail());
        if pending > queue.size() {
            return Err("the available index is more than a ring ahead of the device");
        }
        Ok(pending)
    }

    /// Stops serving a ring the frontend corrupted: one log line, no CPU.
    fn mark_broken(&mut self, reason: &'static str) {
        if self.broken.is_none() {
            tracing::error!(
                export = &*self.shared.name,
                queue = self.index,
                "queue broken: {reason}; it is not served until the frontend resets the device or reconnects"
            );
        }
        self.broken = Some(reason);
    }

    fn dispatch(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        head: u16,
        decoded: Decoded,
    ) {
        let Some(status_addr) = decoded.status_addr else {
            // No status byte to answer through: give the chain back so the
            // guest does not leak it, and say why.
            self.log_bad(decoded.reason.unwrap_or("malformed chain"));
            self.shared().record(None, 0, Err(RequestError::Invalid));
            if !add_used(state, self.inflight.as_mut(), head, 0) {
                self.mark_broken("the used ring is not in guest memory");
            }
            return;
        };
        let mut ctx = VirtioCtx {
            head,
            status_addr,
            used_len_ok: decoded.used_len_ok,
            op: None,
            offset_bytes: 0,
            len_bytes: 0,
            started: Instant::now(),
        };
        let result = match decoded.command {
            Command::Fail(e) => Err(e),
            _ if !self.shared.admitting.load(Ordering::Relaxed) => {
                Err(RequestError::Io(libc::ESHUTDOWN))
            }
            _ if self.node_stale => Err(RequestError::Io(libc::EIO)),
            Command::GetId { segments } => {
                // SAFETY: `decode` translated these iovecs from device-writable
                // guest buffers inside guest memory, which `self.mem` keeps
                // mapped; we copy at most the serial's length.
                let len: usize = self.iovecs[..segments].iter().map(|v| v.iov_len).sum();
                let n = len.min(SERIAL_MAX_BYTES);
                let mut left = n;
                for v in self.iovecs[..segments].iter_mut() {
                    let take = v.iov_len.min(left);
                    v.iov_len = take;
                    left -= take;
                }
                // SAFETY: see above; lengths were trimmed to `n` in total and
                // the serial buffer holds SERIAL_MAX_BYTES >= n bytes.
                unsafe { scatter(self.serial.as_ptr(), &self.iovecs[..segments]) };
                Ok(())
            }
            Command::Block {
                op,
                offset_bytes,
                len_bytes,
                segments,
            } => {
                ctx.op = Some(op);
                ctx.offset_bytes = offset_bytes;
                ctx.len_bytes = len_bytes;
                let req = BlockRequest {
                    op,
                    offset_bytes,
                    len_bytes,
                    segments: &self.iovecs[..segments],
                };
                // SAFETY: `decode` built these iovecs from descriptors it
                // checked to lie inside `self.mem` with the direction the op
                // needs (device-writable for reads). That map stays mapped
                // while the request is in flight: a newer one retires it
                // only once the queue is idle (`refresh_memory`), and a
                // worker dropped with requests in flight drops its engine
                // first, which waits or leaks.
                let submitted = unsafe { self.engine.submit(&req, ctx.clone()) };
                match submitted {
                    Ok(()) => return,
                    Err(SubmitError::Refused(e)) => {
                        self.log_bad("request misses the device alignment and cannot be bounced");
                        Err(e)
                    }
                    Err(SubmitError::Busy) => unreachable!("popped only with a free slot"),
                }
            }
        };
        if let (Err(_), Some(reason)) = (result, decoded.reason) {
            self.log_bad(reason);
        }
        let shared = &self.shared.queues[self.index];
        if !complete(
            state,
            &self.mem,
            shared,
            self.inflight.as_mut(),
            ctx,
            result,
        ) {
            self.mark_broken("the used ring is not in guest memory");
        }
    }

    fn log_bad(&mut self, reason: &str) {
        self.bad_request_log.warn(
            &self.shared.name,
            self.index as u16,
            format_args!("bad guest request: {reason}"),
        );
    }
}

/// Why a queue whose frontend's memory table was refused is broken.
const MAP_PAST_EOF: &str = "its memory table maps past the end of a file";

/// Every file-backed region of `mem` lies inside its file. A frontend's
/// memory table is taken as it says (vm-memory maps whatever size it is
/// told), but a page past the end of a regular file (a memfd, a hugetlbfs or
/// tmpfs file) has nothing behind it: our access raises SIGBUS. Checked when
/// a queue first sees a map, before it touches it. (A file the frontend
/// shrinks after that is beyond reach: QEMU's memfd backend seals its files
/// against it.)
fn check_memory_files(mem: &GuestMemoryMmap) -> Result<(), String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let Some(file) = region.file_offset() else {
            continue;
        };
        let meta = file.file().metadata().map_err(|e| {
            format!(
                "cannot stat the file of the region at {:#x}: {e}",
                region.start_addr().0
            )
        })?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = file.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(format!(
                "the region at guest address {:#x} maps {} bytes at offset {} of a file of {} bytes",
                region.start_addr().0,
                region.len(),
                file.start(),
                meta.len()
            ));
        }
    }
    Ok(())
}

/// The frontend started the ring (`SET_VRING_KICK`) and enabled it: its
/// addresses and call descriptor are set, and it may be served.
fn ring_running(state: &VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

/// Writes the status byte, returns the chain to the guest and counts it.
/// Returns false when the used ring cannot be written (the caller marks the
/// queue broken).
#[must_use]
fn complete(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
    shared: &QueueShared,
    inflight: Option<&mut QueueInflight>,
    ctx: VirtioCtx,
    result: RequestResult,
) -> bool {
    let status = status_of(result);
    let used_len = if result.is_ok() { ctx.used_len_ok } else { 1 };
    // The address was checked against this memory map when decoded.
    let _ = mem.write_obj(status, ctx.status_addr);
    let used = add_used(state, inflight, ctx.head, used_len);
    shared.record_latency(
        ctx.op,
        ctx.len_bytes,
        result,
        ctx.started.elapsed().as_nanos() as u64,
    );
    used
}

/// Returns chain `head` to the guest through the used ring, keeping the
/// inflight region exact around it (the spec's order: link the head into the
/// last batch, publish the used index, clear the head). Returns false when the
/// used ring cannot be written; the head then stays marked in flight.
#[must_use]
fn add_used(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    inflight: Option<&mut QueueInflight>,
    head: u16,
    len: u32,
) -> bool {
    let Some(inflight) = inflight else {
        return state.add_used(head, len).is_ok();
    };
    inflight.link(head);
    if state.add_used(head, len).is_err() {
        return false;
    }
    inflight.clear(head, state.get_queue().next_used());
    true
}
