//! The engine: one io_uring ring per export queue, owned by that queue's
//! thread, with a bounded table of in-flight slots.
//!
//! A request enters through [`Engine::submit`]: a free slot of the
//! [`SlotTable`] copies its iovecs (the kernel reads them from there, so they
//! must not move) and yields one SQE whose `user_data` is the slot index.
//! [`Engine::reap`] hands each completion back with the front's context. The
//! slot — iovecs, bounce buffer and context — stays owned by the table until
//! its completion is reaped; dropping an engine with requests in flight first
//! waits for them (bounded), and leaks the memory rather than free it under
//! the kernel.
//!
//! The op table lives in [`SlotTable`], which owns no ring: the ublk front
//! uses it on libublk's ring, so both fronts build the same SQEs.

mod bounce;
mod slots;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::binding::Binding;
use crate::limits::DRAIN_TIMEOUT_MS;
use crate::node::Node;
use crate::request::{BlockRequest, RequestError, RequestResult};

pub(crate) use slots::{Half, NodeFile, Prepared, SlotTable};

/// `user_data` bit of the target half of a mirrored write.
const MIRROR_HALF: u64 = 1 << 32;

/// Why the engine refused a request before it reached the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Every slot is in flight; the front admitted more than `queue_depth`.
    #[error("no free in-flight slot")]
    Busy,
    /// The request cannot be served (misaligned write, oversized bounce...).
    #[error("request refused: {0:?}")]
    Refused(RequestError),
}

/// Per-queue I/O engine owning its ring. `C` is the front's per-request
/// context, returned with the request's result.
pub(crate) struct Engine<C> {
    // Field order is drop order: the ring goes first, so the kernel holds no
    // reference to slot memory when the table is released.
    ring: IoUring,
    table: SlotTable<C>,
    free: Vec<u16>,
    /// Completions produced without the kernel: slot and raw result.
    ready: Vec<(u16, i32)>,
    completion_event: EventFd,
    unsubmitted: u32,
}

impl<C> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("table", &self.table)
            .finish()
    }
}

impl<C> Engine<C> {
    /// Builds the engine of one queue: a ring of `queue_depth` entries with the
    /// node's descriptor registered as fixed file 0, and `queue_depth` slots.
    pub(crate) fn new(node: Arc<Node>, queue_depth: u16) -> io::Result<Self> {
        let completion_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        Self::with_completion_event(node, queue_depth, &completion_event, None)
    }

    /// [`Engine::new`] posting completions to an existing eventfd (a queue
    /// that rebuilds its engine keeps the eventfd its poller watches), and,
    /// for an export's queue, doing the data-path work of the mirror jobs
    /// on its `binding`.
    pub(crate) fn with_completion_event(
        node: Arc<Node>,
        queue_depth: u16,
        event: &EventFd,
        binding: Option<Arc<Binding>>,
    ) -> io::Result<Self> {
        assert!(queue_depth > 0);
        // Every request is one SQE and at most `queue_depth` are in flight,
        // so the SQ cannot overflow; the CQ is twice that by default.
        // A mirrored write is two SQEs: room for every slot to be one.
        let entries = 2 * u32::from(queue_depth);
        // COOP_TASKRUN: completions are not pushed at us with an IPI while the
        // queue polls in userspace; TASKRUN_FLAG: the kernel raises
        // IORING_SQ_TASKRUN instead, and `reap` enters the kernel to post them.
        // Without the flag a polling queue would see its completions only at
        // its next system call or interrupt.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        if let Some(fd) = node.raw_fd() {
            ring.submitter().register_files(&[fd])?;
        }
        let completion_event = event.try_clone()?;
        ring.submitter()
            .register_eventfd(completion_event.as_raw_fd())?;
        let mut table = SlotTable::new(node, queue_depth, NodeFile::Fixed(0))?;
        if let Some(binding) = binding {
            table = table.with_binding(binding);
        }
        Ok(Engine {
            ring,
            table,
            free: (0..queue_depth).rev().collect(),
            ready: Vec::with_capacity(usize::from(queue_depth)),
            completion_event,
            unsubmitted: 0,
        })
    }

    /// The node this engine serves.
    pub(crate) fn node(&self) -> &Arc<Node> {
        self.table.node()
    }

    /// Number of in-flight slots (the queue depth).
    pub(crate) fn depth(&self) -> u16 {
        self.table.depth() as u16
    }

    /// Requests submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> u32 {
        self.table.in_flight()
    }

    /// Whether another request can be admitted.
    pub(crate) fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// Clears the completion eventfd (after a wake-up on it).
    pub(crate) fn clear_completion_event(&self) {
        let _ = self.completion_event.read();
    }

    /// Queues one request (two SQEs for a write while a mirror runs on
    /// the engine's binding). The SQEs reach the kernel at the next
    /// [`Engine::submit_pending`] (so a batch costs one system call).
    ///
    /// # Safety
    /// Every segment of `req` must be memory valid for the request's
    /// direction (writable for reads, readable for writes) for its whole
    /// length, and stay so until the request's completion is reaped; if the
    /// engine is dropped with the request still in flight, that memory must
    /// never be freed (the kernel may still use it).
    pub(crate) unsafe fn submit(
        &mut self,
        req: &BlockRequest<'_>,
        ctx: C,
    ) -> Result<(), SubmitError> {
        let index = self.free.pop().ok_or(SubmitError::Busy)?;
        // SAFETY: our caller's promise about `req`'s segments.
        match unsafe { self.table.begin(index, req, ctx) } {
            Ok(Prepared::Sqe(entry)) => self.push(&entry.user_data(u64::from(index))),
            Ok(Prepared::Mirrored { source, target }) => {
                self.push(&source.user_data(u64::from(index)));
                self.push(&target.user_data(u64::from(index) | MIRROR_HALF));
            }
            Ok(Prepared::Done(res)) => self.ready.push((index, res)),
            Err(e) => {
                self.free.push(index);
                return Err(SubmitError::Refused(e));
            }
        }
        Ok(())
    }

    fn push(&mut self, entry: &io_uring::squeue::Entry) {
        // SAFETY: every SQE references only a slot's iovecs, its bounce
        // buffer and the front's segments, all of which stay valid until the
        // completion for that slot is reaped (slots are never reused before
        // that, and Drop waits).
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            // Cannot happen: SQ entries >= 2 x slots. Flush and retry.
            let _ = self.ring.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }
                .expect("submission queue full with a free slot");
        }
        self.unsubmitted += 1;
    }

    /// Hands queued SQEs to the kernel.
    pub(crate) fn submit_pending(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EAGAIN/EBUSY: the kernel is short of memory or the CQ is
                // full; reaping makes room, the SQEs stay queued.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands every available completion to `on_complete`; returns how many.
    pub(crate) fn reap(&mut self, mut on_complete: impl FnMut(C, RequestResult)) -> u32 {
        // Completion work the kernel deferred to us (COOP_TASKRUN): run it
        // so its CQEs are posted. One atomic load when there is none.
        if self.ring.submission().taskrun() {
            let _ = self.ring.submit();
        }
        let mut count = 0;
        while let Some((index, res)) = self.ready.pop() {
            if let Some((ctx, result)) = self.table.finish(index, Half::Source, res) {
                self.free.push(index);
                on_complete(ctx, result);
                count += 1;
            }
        }
        while let Some(cqe) = self.ring.completion().next() {
            let index = (cqe.user_data() & 0xffff) as u16;
            let half = if cqe.user_data() & MIRROR_HALF != 0 {
                Half::Target
            } else {
                Half::Source
            };
            if let Some((ctx, result)) = self.table.finish(index, half, cqe.result()) {
                self.free.push(index);
                on_complete(ctx, result);
                count += 1;
            }
        }
        count
    }

    /// Blocks until at least one completion is available or `timeout` passes.
    pub(crate) fn wait_for_completion(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.ready.is_empty() || !self.ring.completion().is_empty() {
            return Ok(());
        }
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until nothing is in flight, reaping into `on_complete`, for at
    /// most `timeout`. Returns whether the engine is idle.
    pub(crate) fn drain(
        &mut self,
        timeout: Duration,
        mut on_complete: impl FnMut(C, RequestResult),
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let _ = self.submit_pending();
        loop {
            self.reap(&mut on_complete);
            if self.in_flight() == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if let Err(e) =
                self.wait_for_completion((deadline - now).min(Duration::from_millis(100)))
            {
                tracing::error!(node = self.node().name(), "waiting for completions: {e}");
                return false;
            }
        }
    }
}

impl<C> Drop for Engine<C> {
    fn drop(&mut self) {
        // Wait for the kernel to finish with every slot; the ring is then
        // dropped before the table (field order). If the device never
        // answers, the table leaks its memory instead of freeing it.
        if self.in_flight() > 0 && !self.drain(Duration::from_millis(DRAIN_TIMEOUT_MS), |_, _| {}) {
            tracing::error!(
                node = self.node().name(),
                in_flight = self.in_flight(),
                "requests still in flight after {DRAIN_TIMEOUT_MS} ms"
            );
        }
    }
}

#[cfg(test)]
mod tests;
