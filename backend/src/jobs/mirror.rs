//! The mirror job: a live copy of a node to a target node while an export
//! keeps serving the source.
//!
//! The whole source is marked dirty; a copier thread takes dirty chunks and
//! copies them (read from the source, write to the target, at most
//! `max_in_flight` chunks at a time). The job is write-blocking from the
//! start: every guest write goes to both nodes and completes when both have
//! it, so the copy converges however fast the guest writes; other
//! modifications (discard, write-zeroes) are logged back into the bitmap.
//! When the bitmap is empty the job is *ready*. Completion pauses the
//! export, copies what is left, flushes the target and switches the export
//! over; cancellation stops the copy and flushes the target.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{Event, JobPhase, JobStatus};
use crate::binding::MirrorTap;
use crate::engine::{Engine, SubmitError};
use crate::events::Events;
use crate::graph::FlushError;
use crate::limits::JOB_PROGRESS_EVENT_INTERVAL_MS;
use crate::node::Node;
use crate::request::{BlockOp, BlockRequest, RequestError, RequestResult};

/// Default copy chunk: also the dirty-bitmap granularity. Small, because a
/// 4 KiB guest write dirties a whole chunk and costs a whole chunk's copy.
pub(crate) const MIRROR_CHUNK_BYTES: u64 = 64 << 10;
/// Default number of chunk copies in flight.
pub(crate) const MIRROR_MAX_IN_FLIGHT: u16 = 16;
/// Largest accepted chunk.
pub(super) const MIRROR_MAX_CHUNK_BYTES: u64 = 16 << 20;
/// Most chunk copies in flight accepted.
pub(super) const MIRROR_MAX_IN_FLIGHT_LIMIT: u16 = 64;
/// How long an idle copier sleeps before it looks for new dirty chunks.
pub(super) const MIRROR_IDLE_POLL_MS: u64 = 2;

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    ready: AtomicBool,
    in_flight_chunks: AtomicU64,
    error: Mutex<Option<String>>,
}

/// Why a mirror job cannot start, complete or cancel.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Source and target are the same node.
    #[error("a node cannot be mirrored to itself")]
    OntoItself,
    /// `chunk_bytes` out of range.
    #[error("chunk_bytes must be a power of two from 4096 to {MIRROR_MAX_CHUNK_BYTES}, not {0}")]
    ChunkBytes(u64),
    /// `max_in_flight` out of range.
    #[error("max_in_flight must be 1..={MIRROR_MAX_IN_FLIGHT_LIMIT}, not {0}")]
    MaxInFlight(u16),
    /// The target cannot hold the source.
    #[error("target {target} ({target_bytes} bytes) is smaller than source {source_node} ({source_bytes} bytes)")]
    TargetTooSmall {
        /// The target node.
        target: String,
        /// Its capacity.
        target_bytes: u64,
        /// The source node.
        source_node: String,
        /// Its capacity.
        source_bytes: u64,
    },
    /// The target cannot be written.
    #[error("target {0} is read-only")]
    TargetReadOnly(String),
    /// The copier thread could not be made.
    #[error("cannot spawn the copier: {0}")]
    Spawn(#[source] std::io::Error),
    /// The copier did not stop in time (a node does not answer); it is
    /// left running with its buffers.
    #[error("job {id}: the copier did not stop within {timeout_ms} ms (a node does not answer); left running")]
    CopierStuck {
        /// The job.
        id: String,
        /// How long it was given.
        timeout_ms: u128,
    },
    /// The background copy had failed before.
    #[error("job {id} failed earlier: {error}")]
    FailedEarlier {
        /// The job.
        id: String,
        /// What failed then (as `job_status` reports it).
        error: String,
    },
    /// The pivot's last copy failed.
    #[error("the last copy: {0}")]
    Copy(#[from] CopyError),
    /// The target's flush failed.
    #[error(transparent)]
    Flush(#[from] FlushError),
}

/// Why copying chunks failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The copy buffers could not be allocated.
    #[error("cannot allocate {0} bytes of copy buffers")]
    Buffers(usize),
    /// An engine could not be built.
    #[error("{node} ring: {source}")]
    Ring {
        /// `source` or `target`.
        node: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The engine refused a copy.
    #[error("chunk {chunk}: {source}")]
    Submit {
        /// The chunk.
        chunk: usize,
        /// Why.
        #[source]
        source: SubmitError,
    },
    /// `io_uring_enter` failed.
    #[error("{what}: {source}")]
    Enter {
        /// What the copier was doing.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a chunk of the source failed.
    #[error("read chunk {0} of the source: {1}")]
    Read(usize, #[source] RequestError),
    /// Writing a chunk to the target failed.
    #[error("write chunk {0} of the target: {1}")]
    Write(usize, #[source] RequestError),
    /// The pivot's last copy ran out of time.
    #[error(
        "the last copy did not finish within {MIRROR_FINISH_TIMEOUT_MS} ms ({0} copies in flight)"
    )]
    FinishTimeout(u32),
}

/// A running mirror job.
#[derive(Debug)]
pub(crate) struct MirrorJob {
    id: String,
    source: Arc<Node>,
    target: Arc<Node>,
    tap: Arc<MirrorTap>,
    shared: Arc<Shared>,
    chunk_bytes: u64,
    max_in_flight: u16,
    copier: Option<JoinHandle<()>>,
}

impl MirrorJob {
    /// Checks the pair and prepares the job; nothing is copied until
    /// [`MirrorJob::start_copier`], so that the caller can hook the bitmap
    /// into the source's exports first (a modification that lands before the
    /// hook and after a chunk's copy would otherwise be missed).
    pub(crate) fn new(
        id: &str,
        source: Arc<Node>,
        target: Arc<Node>,
        chunk_bytes: u64,
        max_in_flight: u16,
    ) -> Result<Self, JobError> {
        if Arc::ptr_eq(&source, &target) {
            return Err(JobError::OntoItself);
        }
        if !chunk_bytes.is_power_of_two() || !(4096..=MIRROR_MAX_CHUNK_BYTES).contains(&chunk_bytes)
        {
            return Err(JobError::ChunkBytes(chunk_bytes));
        }
        if !(1..=MIRROR_MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            return Err(JobError::MaxInFlight(max_in_flight));
        }
        let (src_cap, tgt_cap) = (
            source.limits().capacity_bytes,
            target.limits().capacity_bytes,
        );
        if tgt_cap < src_cap {
            return Err(JobError::TargetTooSmall {
                target: target.name().to_owned(),
                target_bytes: tgt_cap,
                source_node: source.name().to_owned(),
                source_bytes: src_cap,
            });
        }
        if target.read_only() {
            return Err(JobError::TargetReadOnly(target.name().to_owned()));
        }
        // Write-blocking from the start (see the module docs).
        let tap = Arc::new(MirrorTap::new(src_cap, chunk_bytes, target.clone()));
        Ok(MirrorJob {
            id: id.to_owned(),
            source,
            target,
            tap,
            shared: Arc::new(Shared::default()),
            chunk_bytes,
            max_in_flight,
            copier: None,
        })
    }

    /// Starts the background copy. Its thread tells `events` the job's
    /// progress (at most once per `JOB_PROGRESS_EVENT_INTERVAL_MS`), when
    /// it is ready, and when it fails.
    pub(crate) fn start_copier(&mut self, events: Events) -> Result<(), JobError> {
        let (chunk_bytes, max_in_flight) = (self.chunk_bytes, self.max_in_flight);
        let (source, target, tap, shared) = (
            self.source.clone(),
            self.target.clone(),
            self.tap.clone(),
            self.shared.clone(),
        );
        let id = self.id.clone();
        let copier = std::thread::Builder::new()
            .name(format!("mirror-{}", self.id))
            .spawn(move || {
                let total = source.limits().capacity_bytes;
                let failed = |e: String| {
                    *shared.error.lock().unwrap() = Some(e.clone());
                    events.emit(Event::JobFailed {
                        job: id.clone(),
                        error: e,
                    });
                };
                let mut copier =
                    match Copier::new(source, target, tap.clone(), chunk_bytes, max_in_flight) {
                        Ok(c) => c,
                        Err(e) => return failed(e.to_string()),
                    };
                let mut reporter = ProgressReporter {
                    id: id.clone(),
                    events: &events,
                    last: None,
                    ready_told: false,
                };
                let mut tick = || {
                    let (done_bytes, dirty_bytes) = progress(&tap, &shared, chunk_bytes, total);
                    reporter.tick(
                        shared.ready.load(Ordering::Acquire),
                        done_bytes,
                        total,
                        dirty_bytes,
                    );
                };
                if let Err(e) = copier.run(&shared, None, &mut tick) {
                    tracing::error!("mirror job: {e}");
                    failed(e.to_string());
                }
            })
            .map_err(JobError::Spawn)?;
        self.copier = Some(copier);
        tracing::info!(
            job = %self.id,
            source = self.source.name(),
            target = self.target.name(),
            "mirror started"
        );
        Ok(())
    }

    /// Job id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Source node.
    pub(crate) fn source(&self) -> &Arc<Node> {
        &self.source
    }

    /// Target node.
    pub(crate) fn target(&self) -> &Arc<Node> {
        &self.target
    }

    /// What the source's exports share with the job.
    pub(crate) fn tap(&self) -> &Arc<MirrorTap> {
        &self.tap
    }

    /// Whether source and target have been in sync.
    pub(crate) fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Current status.
    pub(crate) fn status(&self) -> JobStatus {
        let total = self.source.limits().capacity_bytes;
        let (done_bytes, dirty_bytes) = progress(&self.tap, &self.shared, self.chunk_bytes, total);
        let error = self.shared.error.lock().unwrap().clone();
        JobStatus {
            id: self.id.clone(),
            kind: "mirror".into(),
            source: self.source.name().to_owned(),
            target: self.target.name().to_owned(),
            phase: if error.is_some() {
                JobPhase::Failed
            } else if self.is_ready() {
                JobPhase::Ready
            } else {
                JobPhase::Running
            },
            done_bytes,
            total_bytes: total,
            dirty_bytes,
            chunk_bytes: self.chunk_bytes,
            max_in_flight: self.max_in_flight,
            error,
        }
    }

    /// Stops the background copier (in-flight chunk copies finish), waiting
    /// at most until `deadline`. Returns false when the copier is still
    /// running then (a device that does not answer): it is left to finish
    /// on its own, owning its buffers and engines.
    fn stop_copier(&mut self, deadline: Instant) -> bool {
        self.shared.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.copier.take() else {
            return true;
        };
        while !t.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = t.join();
        true
    }

    /// Completion, once nothing writes the source any more (its exports are
    /// paused): copies every chunk still dirty and flushes the target.
    pub(crate) fn finish_copy(&mut self) -> Result<(), JobError> {
        if !self.stop_copier(Instant::now() + Duration::from_millis(COPIER_STOP_TIMEOUT_MS)) {
            return Err(JobError::CopierStuck {
                id: self.id.clone(),
                timeout_ms: u128::from(COPIER_STOP_TIMEOUT_MS),
            });
        }
        if let Some(error) = self.shared.error.lock().unwrap().clone() {
            return Err(JobError::FailedEarlier {
                id: self.id.clone(),
                error,
            });
        }
        let mut copier = Copier::new(
            self.source.clone(),
            self.target.clone(),
            self.tap.clone(),
            self.chunk_bytes,
            self.max_in_flight,
        )?;
        let shared = Shared::default();
        let deadline = Instant::now() + Duration::from_millis(MIRROR_FINISH_TIMEOUT_MS);
        copier.run(&shared, Some(deadline), &mut || {})?;
        drop(copier);
        Ok(crate::graph::flush_bounded(
            self.target.clone(),
            std::time::Duration::from_millis(crate::limits::FLUSH_TIMEOUT_MS),
        )?)
    }

    /// Cancellation: stop copying and flush what reached the target, both
    /// by `deadline`.
    pub(crate) fn cancel(&mut self, deadline: Instant) -> Result<(), JobError> {
        let started = Instant::now();
        if !self.stop_copier(deadline) {
            return Err(JobError::CopierStuck {
                id: self.id.clone(),
                timeout_ms: started.elapsed().as_millis(),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        Ok(crate::graph::flush_bounded(
            self.target.clone(),
            Duration::from_millis(crate::limits::FLUSH_TIMEOUT_MS).min(left),
        )?)
    }
}

/// A job's bytes in sync and bytes dirty, of `total_bytes`.
fn progress(tap: &MirrorTap, shared: &Shared, chunk_bytes: u64, total_bytes: u64) -> (u64, u64) {
    let dirty = tap.bitmap().dirty() as u64;
    let pending = (dirty + shared.in_flight_chunks.load(Ordering::Relaxed))
        .saturating_mul(chunk_bytes)
        .min(total_bytes);
    (total_bytes - pending, dirty * chunk_bytes)
}

/// What a copier tells the event stream as it goes: `job_progress` when it
/// starts and then at most once per `JOB_PROGRESS_EVENT_INTERVAL_MS` until
/// the job is ready, then `job_ready` once.
struct ProgressReporter<'a> {
    id: String,
    events: &'a Events,
    last: Option<Instant>,
    ready_told: bool,
}

impl ProgressReporter<'_> {
    /// Called by the copier once per pass of its loop.
    fn tick(&mut self, ready: bool, done_bytes: u64, total_bytes: u64, dirty_bytes: u64) {
        if self.ready_told {
            return;
        }
        if ready {
            self.ready_told = true;
            self.events.emit(Event::JobReady {
                job: self.id.clone(),
                total_bytes,
            });
            return;
        }
        let interval = Duration::from_millis(JOB_PROGRESS_EVENT_INTERVAL_MS);
        if self.last.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        self.last = Some(Instant::now());
        self.events.emit(Event::JobProgress {
            job: self.id.clone(),
            done_bytes,
            total_bytes,
            dirty_bytes,
        });
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        // Cancel and completion stop the copier first, with their own
        // bounds; a job dropped without either (the process is exiting after
        // close-all gave up on it) waits only briefly.
        if !self.stop_copier(Instant::now() + Duration::from_millis(COPIER_DROP_WAIT_MS)) {
            tracing::error!(job = %self.id, "the mirror copier did not stop; left running");
        }
    }
}

/// How long dropping a job whose copier still runs waits for it.
const COPIER_DROP_WAIT_MS: u64 = 1_000;

/// How long stopping the copier may take: its in-flight copies get
/// `DRAIN_TIMEOUT_MS` per engine (reads, then writes), plus a margin.
const COPIER_STOP_TIMEOUT_MS: u64 = 2 * crate::limits::DRAIN_TIMEOUT_MS + 1_000;
/// How long the pivot's last copy (what is still dirty when the exports are
/// paused: little, since the job was ready) may take.
const MIRROR_FINISH_TIMEOUT_MS: u64 = 30_000;

/// Page-aligned copy buffers, allocated once per copier.
struct Buffers {
    ptr: *mut u8,
    layout: Layout,
    chunk_bytes: usize,
}

impl Buffers {
    fn new(count: usize, chunk_bytes: usize) -> Result<Self, CopyError> {
        let bytes = count * chunk_bytes;
        let layout = Layout::from_size_align(bytes, 4096).map_err(|_| CopyError::Buffers(bytes))?;
        // SAFETY: the layout has a non-zero size (count and chunk are >= 1).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CopyError::Buffers(bytes));
        }
        Ok(Buffers {
            ptr,
            layout,
            chunk_bytes,
        })
    }

    fn iov(&self, i: usize, len: usize) -> libc::iovec {
        assert!(len <= self.chunk_bytes && (i + 1) * self.chunk_bytes <= self.layout.size());
        libc::iovec {
            iov_base: self.ptr.wrapping_add(i * self.chunk_bytes).cast(),
            iov_len: len,
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // The slots' rule: memory the kernel may still write into is never
        // handed back. A copy to or from a device that stopped answering
        // (after `run`'s bounded drain) keeps its buffer forever.
        let in_flight = self.reads.in_flight() + self.writes.in_flight();
        if in_flight == 0 {
            // SAFETY: no copy is in flight, so no SQE refers to the buffers;
            // they are dropped exactly once, here.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.buffers) };
        } else {
            tracing::error!(
                source = self.reads.node().name(),
                target = self.writes.node().name(),
                in_flight,
                "mirror copier stopped with copies the devices never completed; leaking their buffers"
            );
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the copier drops its
        // buffers only when no copy is in flight (see `Drop for Copier`).
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

#[derive(Clone, Copy)]
struct Copy {
    chunk: usize,
    buf: usize,
    len: usize,
    /// The chunk's mirrored-write generation when the copy started.
    generation: u32,
}

struct Copier {
    // Field order is drop order: engines (and their in-flight I/O) go before
    // the buffers they point into. The buffers are freed by `Drop for
    // Copier` only once neither engine has a copy in flight.
    reads: Engine<Copy>,
    writes: Engine<Copy>,
    buffers: std::mem::ManuallyDrop<Buffers>,
    tap: Arc<MirrorTap>,
    capacity_bytes: u64,
    chunk_bytes: u64,
    free: Vec<usize>,
    /// Chunk copied by each buffer, to never copy one chunk twice at once
    /// (a stale copy landing after a fresh one would undo it).
    busy: Vec<Option<usize>>,
    cursor: usize,
}

impl Copier {
    fn new(
        source: Arc<Node>,
        target: Arc<Node>,
        tap: Arc<MirrorTap>,
        chunk_bytes: u64,
        max_in_flight: u16,
    ) -> Result<Self, CopyError> {
        let n = usize::from(max_in_flight);
        Ok(Copier {
            reads: Engine::new(source, max_in_flight).map_err(|source| CopyError::Ring {
                node: "source",
                source,
            })?,
            writes: Engine::new(target, max_in_flight).map_err(|source| CopyError::Ring {
                node: "target",
                source,
            })?,
            buffers: std::mem::ManuallyDrop::new(Buffers::new(n, chunk_bytes as usize)?),
            capacity_bytes: tap.bitmap().chunks() as u64 * chunk_bytes,
            tap,
            chunk_bytes,
            free: (0..n).rev().collect(),
            busy: vec![None; n],
            cursor: 0,
        })
    }

    /// Submits copy `c` (a read into, or a write from, its own buffer).
    fn submit(
        engine: &mut Engine<Copy>,
        buffers: &Buffers,
        op: BlockOp,
        offset: u64,
        c: Copy,
    ) -> Result<(), CopyError> {
        let iov = [buffers.iov(c.buf, c.len)];
        let req = BlockRequest {
            op,
            offset_bytes: offset,
            len_bytes: c.len as u64,
            segments: &iov,
        };
        // SAFETY: `iov` is buffer `c.buf` of this copier's allocation
        // (bounds asserted by `iov`), readable and writable, and used by
        // one copy at a time (`busy`). The copier owns the buffers for as
        // long as its engines live, and `Drop for Copier` never frees them
        // while a copy is in flight.
        unsafe { engine.submit(&req, c) }.map_err(|source| CopyError::Submit {
            chunk: c.chunk,
            source,
        })
    }

    /// Copies dirty chunks until told to stop; with `until_clean` (a
    /// deadline), returns as soon as nothing is dirty or in flight, or fails
    /// at the deadline.
    /// `tick` is called once per pass (the copier's progress reports).
    fn run(
        &mut self,
        shared: &Shared,
        until_clean: Option<Instant>,
        tick: &mut dyn FnMut(),
    ) -> Result<(), CopyError> {
        let source_capacity = self
            .reads
            .node()
            .limits()
            .capacity_bytes
            .min(self.capacity_bytes);
        loop {
            if shared.stop.load(Ordering::Acquire) && until_clean.is_none() {
                break;
            }
            tick();
            if until_clean.is_some_and(|d| Instant::now() >= d) {
                return Err(CopyError::FinishTimeout(
                    self.reads.in_flight() + self.writes.in_flight(),
                ));
            }
            // Start copies while buffers are free.
            while let Some(&buf) = self.free.last() {
                let bitmap = self.tap.bitmap();
                let Some(chunk) = bitmap.take_next(self.cursor) else {
                    break;
                };
                if self.busy.contains(&Some(chunk)) {
                    // Still being copied: look again once that copy lands.
                    bitmap.set(chunk);
                    break;
                }
                let Some(generation) = self.tap.copy_begin(chunk) else {
                    // A guest write to both nodes is in flight there: a copy
                    // now could land after it on the target. Later.
                    bitmap.set(chunk);
                    self.cursor = chunk + 1;
                    break;
                };
                self.free.pop();
                self.cursor = chunk + 1;
                let offset = chunk as u64 * self.chunk_bytes;
                let len = self.chunk_bytes.min(source_capacity - offset) as usize;
                self.busy[buf] = Some(chunk);
                let c = Copy {
                    chunk,
                    buf,
                    len,
                    generation,
                };
                Self::submit(&mut self.reads, &self.buffers, BlockOp::Read, offset, c)?;
                shared.in_flight_chunks.fetch_add(1, Ordering::Relaxed);
            }
            self.reads
                .submit_pending()
                .map_err(|source| CopyError::Enter {
                    what: "submit reads",
                    source,
                })?;
            // Reads that landed become writes.
            let mut landed = Vec::new();
            self.reads.reap(|c, r: RequestResult| landed.push((c, r)));
            for (c, r) in landed {
                r.map_err(|e| CopyError::Read(c.chunk, e))?;
                let offset = c.chunk as u64 * self.chunk_bytes;
                Self::submit(
                    &mut self.writes,
                    &self.buffers,
                    BlockOp::Write { fua: false },
                    offset,
                    c,
                )?;
            }
            self.writes
                .submit_pending()
                .map_err(|source| CopyError::Enter {
                    what: "submit writes",
                    source,
                })?;
            let mut written = Vec::new();
            self.writes.reap(|c, r: RequestResult| written.push((c, r)));
            for (c, r) in written {
                r.map_err(|e| CopyError::Write(c.chunk, e))?;
                if self.tap.copy_raced(c.chunk, c.generation) {
                    // A guest write to both nodes started during the copy
                    // and may have reached the target before it.
                    self.tap.bitmap().set(c.chunk);
                }
                self.busy[c.buf] = None;
                self.free.push(c.buf);
                shared.in_flight_chunks.fetch_sub(1, Ordering::Relaxed);
            }
            let in_flight = self.reads.in_flight() + self.writes.in_flight();
            if in_flight == 0 && self.tap.bitmap().dirty() == 0 {
                if until_clean.is_some() {
                    return Ok(());
                }
                // In sync, and every new write goes to both nodes.
                shared.ready.store(true, Ordering::Release);
                std::thread::sleep(Duration::from_millis(MIRROR_IDLE_POLL_MS));
                continue;
            }
            if in_flight == 0 {
                // Every dirty chunk has a guest write in flight: wait a bit.
                std::thread::sleep(Duration::from_millis(MIRROR_IDLE_POLL_MS));
            } else {
                let wait = Duration::from_millis(MIRROR_IDLE_POLL_MS);
                let r = if self.writes.in_flight() > 0 {
                    self.writes.wait_for_completion(wait)
                } else {
                    self.reads.wait_for_completion(wait)
                };
                r.map_err(|source| CopyError::Enter {
                    what: "waiting for copies",
                    source,
                })?;
            }
        }
        // Stopped: let the copies in flight land; a chunk read but not
        // written goes back into the bitmap for whoever copies next.
        let bitmap = self.tap.bitmap();
        let timeout = Duration::from_millis(crate::limits::DRAIN_TIMEOUT_MS);
        self.reads.drain(timeout, |c, _| bitmap.set(c.chunk));
        self.writes.drain(timeout, |c, r| {
            if r.is_err() {
                bitmap.set(c.chunk);
            }
        });
        Ok(())
    }
}
