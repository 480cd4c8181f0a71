//! The engine: one io_uring ring per export queue, owned by that queue's
//! thread, with a bounded table of in-flight slots.
//!
//! A request enters through [`Engine::submit`], which copies its iovecs into a
//! free slot (the kernel reads them from there, so they must not move) and
//! queues one SQE whose `user_data` is the slot index. [`Engine::reap`] hands
//! each completion back with the front's context. The slot — iovecs, bounce
//! buffer and context — stays owned by the engine until its completion is
//! reaped; dropping an engine with requests in flight first waits for them
//! (bounded), and leaks the memory rather than free it under the kernel.

mod bounce;

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::limits::{BOUNCE_SLOT_BYTES, DRAIN_TIMEOUT_MS, MAX_SEGMENTS};
use crate::node::{Backing, Node};
use crate::request::{BlockOp, BlockRequest, RequestError, RequestResult};

use bounce::BounceRegion;
pub use bounce::{gather, scatter, zero};

/// `BLOCK_URING_CMD_DISCARD` (`_IO(0x12, 0)`, Linux 6.12+): an asynchronous
/// block discard. The start goes in `sqe->addr`, the length in `sqe->addr3`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// `BLKDISCARD` (`_IO(0x12, 119)`): the synchronous fallback for kernels
/// without the io_uring command.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// The file index of the node in the ring's registered-file table.
const NODE_FIXED_FILE: types::Fixed = types::Fixed(0);

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

/// How a slot's data reaches the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BounceUse {
    /// Straight between the front's buffers and the device.
    None,
    /// Read into the slot's bounce buffer; copy `len` bytes from `skip` out.
    ReadCopyOut { skip: usize, len: usize },
    /// Written from the slot's bounce buffer.
    Write,
}

struct Slot<C> {
    /// The front's context; `Some` exactly while the slot is in flight.
    ctx: Option<C>,
    op: BlockOp,
    /// Bytes a successful read or write transfers.
    expected_bytes: u64,
    /// The request's range, kept for the synchronous discard fallback.
    offset_bytes: u64,
    len_bytes: u64,
    /// The front's data segments (read by the kernel on direct I/O, by the
    /// engine on bounce copies).
    iovecs: [libc::iovec; MAX_SEGMENTS],
    iov_count: usize,
    bounce: BounceUse,
    /// The single iovec over the bounce buffer handed to the kernel.
    bounce_iov: libc::iovec,
}

impl<C> Slot<C> {
    fn segments(&self) -> &[libc::iovec] {
        &self.iovecs[..self.iov_count]
    }
}

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Per-queue I/O engine. `C` is the front's per-request context, returned with
/// the request's result.
pub struct Engine<C: Copy> {
    // Drop order matters: the ring is torn down (and with it the kernel's
    // references to slots and bounce buffers) before the memory is released
    // and the node's descriptor can close. See `Drop`.
    ring: ManuallyDrop<IoUring>,
    slots: ManuallyDrop<Box<[Slot<C>]>>,
    bounce: ManuallyDrop<BounceRegion>,
    node: Arc<Node>,
    free: Vec<u16>,
    /// Completions produced without the kernel (null node, refused-late and
    /// synchronous fallbacks): slot and raw result.
    ready: Vec<(u16, i32)>,
    completion_event: EventFd,
    in_flight: u32,
    unsubmitted: u32,
    mem_align_mask: u64,
    offset_align_mask: u64,
    uring_discard: bool,
}

// SAFETY: the raw pointers inside slots (iovecs) point to front memory that
// the front keeps valid until completion; the engine as a whole moves between
// threads only while idle (it is created by one thread and then owned by its
// queue thread).
unsafe impl<C: Copy + Send> Send for Engine<C> {}

impl<C: Copy> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node.name())
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<C: Copy> Engine<C> {
    /// Builds the engine of one queue: a ring of `queue_depth` entries with the
    /// node's descriptor registered as fixed file 0, `queue_depth` slots, and
    /// a bounce buffer per slot.
    pub fn new(node: Arc<Node>, queue_depth: u16) -> io::Result<Self> {
        assert!(queue_depth > 0);
        let depth = usize::from(queue_depth);
        // Every request is one SQE and at most `queue_depth` are in flight,
        // so the SQ cannot overflow; the CQ is twice that by default.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(u32::from(queue_depth))
            .or_else(|_| IoUring::new(u32::from(queue_depth)))?;
        if let Some(fd) = node.raw_fd() {
            ring.submitter().register_files(&[fd])?;
        }
        let completion_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter()
            .register_eventfd(completion_event.as_raw_fd())?;
        let slots = (0..depth)
            .map(|_| Slot {
                ctx: None,
                op: BlockOp::Flush,
                expected_bytes: 0,
                offset_bytes: 0,
                len_bytes: 0,
                iovecs: [EMPTY_IOVEC; MAX_SEGMENTS],
                iov_count: 0,
                bounce: BounceUse::None,
                bounce_iov: EMPTY_IOVEC,
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let limits = *node.limits();
        Ok(Engine {
            ring: ManuallyDrop::new(ring),
            slots: ManuallyDrop::new(slots),
            bounce: ManuallyDrop::new(BounceRegion::new(depth, BOUNCE_SLOT_BYTES)?),
            free: (0..queue_depth).rev().collect(),
            ready: Vec::with_capacity(depth),
            completion_event,
            in_flight: 0,
            unsubmitted: 0,
            mem_align_mask: u64::from(limits.dio_mem_align_bytes.max(1)) - 1,
            offset_align_mask: u64::from(limits.dio_offset_align_bytes.max(1)) - 1,
            uring_discard: matches!(node.backing(), Backing::BlockDevice(_)),
            node,
        })
    }

    /// The node this engine serves.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether another request can be admitted.
    pub fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// An eventfd that becomes readable when completions are posted.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_event.as_raw_fd()
    }

    /// Clears the completion eventfd (after a wake-up on it).
    pub fn clear_completion_event(&self) {
        let _ = self.completion_event.read();
    }

    /// Queues one request. The SQE reaches the kernel at the next
    /// [`Engine::submit_pending`] (so a batch costs one system call).
    ///
    /// The request's segments must stay valid until its completion is reaped.
    pub fn submit(&mut self, req: &BlockRequest<'_>, ctx: C) -> Result<(), SubmitError> {
        if req.segments.len() > MAX_SEGMENTS {
            return Err(SubmitError::Refused(RequestError::Invalid));
        }
        let index = self.free.pop().ok_or(SubmitError::Busy)?;
        match self.prepare(index, req) {
            Ok(entry) => {
                let slot = &mut self.slots[usize::from(index)];
                slot.ctx = Some(ctx);
                self.in_flight += 1;
                if let Some(entry) = entry {
                    let entry = entry.user_data(u64::from(index));
                    // SAFETY: the SQE references only the slot's iovecs, its
                    // bounce buffer and the front's segments, all of which
                    // stay valid until the completion for `index` is reaped
                    // (slots are never reused before that, and Drop waits).
                    let pushed = unsafe { self.ring.submission().push(&entry) };
                    if pushed.is_err() {
                        // Cannot happen: SQ entries >= slots. Flush and retry.
                        let _ = self.ring.submit();
                        // SAFETY: as above.
                        unsafe { self.ring.submission().push(&entry) }
                            .expect("submission queue full with a free slot");
                    }
                    self.unsubmitted += 1;
                }
                Ok(())
            }
            Err(e) => {
                self.free.push(index);
                Err(SubmitError::Refused(e))
            }
        }
    }

    /// Fills slot `index` for `req`; returns the SQE, or `None` when the
    /// request completed without the kernel (its result is in `ready`).
    fn prepare(
        &mut self,
        index: u16,
        req: &BlockRequest<'_>,
    ) -> Result<Option<io_uring::squeue::Entry>, RequestError> {
        let fd = self.node.raw_fd();
        let i = usize::from(index);
        let slot = &mut self.slots[i];
        slot.op = req.op;
        slot.offset_bytes = req.offset_bytes;
        slot.len_bytes = req.len_bytes;
        slot.bounce = BounceUse::None;
        slot.iov_count = req.segments.len();
        slot.iovecs[..req.segments.len()].copy_from_slice(req.segments);
        slot.expected_bytes = if req.op.moves_data() {
            req.len_bytes
        } else {
            0
        };

        let Some(_fd) = fd else {
            // Null node: reads see zeroes, everything else succeeds.
            if req.op == BlockOp::Read {
                // SAFETY: the front vouches that the segments are writable
                // memory of their stated lengths until completion.
                unsafe { zero(slot.segments()) };
            }
            let res = i32::try_from(slot.expected_bytes).unwrap_or(i32::MAX);
            self.ready.push((index, res));
            return Ok(None);
        };

        let entry = match req.op {
            BlockOp::Read | BlockOp::Write { .. } => {
                let aligned = self.is_dio_aligned(req);
                let slot = &mut self.slots[i];
                let is_write = matches!(req.op, BlockOp::Write { .. });
                let rw_flags = match req.op {
                    BlockOp::Write { fua: true } => libc::RWF_DSYNC,
                    _ => 0,
                };
                if aligned {
                    let iov = slot.iovecs.as_ptr();
                    let n = slot.iov_count as u32;
                    if is_write {
                        opcode::Writev::new(NODE_FIXED_FILE, iov, n)
                            .offset(req.offset_bytes)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Readv::new(NODE_FIXED_FILE, iov, n)
                            .offset(req.offset_bytes)
                            .build()
                    }
                } else {
                    // Bounce: widen to the offset alignment (reads only; a
                    // misaligned write would need read-modify-write, which a
                    // guest honouring the advertised block size never needs).
                    let mask = self.offset_align_mask;
                    let start = req.offset_bytes & !mask;
                    let end = (req.offset_bytes + req.len_bytes + mask) & !mask;
                    let span = (end - start) as usize;
                    if span > self.bounce.slot_bytes() {
                        return Err(RequestError::Invalid);
                    }
                    let buf = self.bounce.slot_ptr(i);
                    let slot = &mut self.slots[i];
                    slot.bounce_iov = libc::iovec {
                        iov_base: buf.cast(),
                        iov_len: span,
                    };
                    if is_write {
                        if start != req.offset_bytes || end != req.offset_bytes + req.len_bytes {
                            return Err(RequestError::Invalid);
                        }
                        // SAFETY: the segments are readable front memory; the
                        // bounce buffer holds `span` >= len bytes and is ours.
                        unsafe { gather(slot.segments(), buf) };
                        slot.bounce = BounceUse::Write;
                        opcode::Writev::new(NODE_FIXED_FILE, &slot.bounce_iov, 1)
                            .offset(start)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        slot.bounce = BounceUse::ReadCopyOut {
                            skip: (req.offset_bytes - start) as usize,
                            len: req.len_bytes as usize,
                        };
                        slot.expected_bytes = span as u64;
                        opcode::Readv::new(NODE_FIXED_FILE, &slot.bounce_iov, 1)
                            .offset(start)
                            .build()
                    }
                }
            }
            BlockOp::Flush => {
                if self.node.read_only() {
                    self.ready.push((index, 0));
                    return Ok(None);
                }
                opcode::Fsync::new(NODE_FIXED_FILE)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
            BlockOp::Discard => match self.node.backing() {
                Backing::BlockDevice(_) if self.uring_discard => {
                    let mut cmd = [0u8; 16];
                    cmd[..8].copy_from_slice(&req.len_bytes.to_ne_bytes());
                    opcode::UringCmd16::new(NODE_FIXED_FILE, BLOCK_URING_CMD_DISCARD)
                        .addr(Some(req.offset_bytes))
                        .cmd(cmd)
                        .build()
                }
                Backing::BlockDevice(f) => {
                    let res = blk_discard_sync(f.as_raw_fd(), req.offset_bytes, req.len_bytes);
                    self.ready.push((index, res));
                    return Ok(None);
                }
                _ => opcode::Fallocate::new(NODE_FIXED_FILE, req.len_bytes)
                    .offset(req.offset_bytes)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
            },
            BlockOp::WriteZeroes { unmap } => {
                // On a block device both modes become a zero-out; PUNCH_HOLE
                // lets the device deallocate, ZERO_RANGE asks it not to.
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                } | libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(NODE_FIXED_FILE, req.len_bytes)
                    .offset(req.offset_bytes)
                    .mode(mode)
                    .build()
            }
        };
        Ok(Some(entry))
    }

    fn is_dio_aligned(&self, req: &BlockRequest<'_>) -> bool {
        let off_mask = self.offset_align_mask;
        let mem_mask = self.mem_align_mask;
        if (req.offset_bytes | req.len_bytes) & off_mask != 0 {
            return false;
        }
        req.segments
            .iter()
            .all(|s| (s.iov_base as u64 | s.iov_len as u64) & mem_mask == 0)
    }

    /// Hands queued SQEs to the kernel.
    pub fn submit_pending(&mut self) -> io::Result<()> {
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
    pub fn reap(&mut self, mut on_complete: impl FnMut(C, RequestResult)) -> u32 {
        let mut count = 0;
        while let Some((index, res)) = self.ready.pop() {
            self.complete(index, res, &mut on_complete);
            count += 1;
        }
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let index = cqe.user_data() as u16;
            let mut res = cqe.result();
            let op = self.slots[usize::from(index)].op;
            if op == BlockOp::Discard
                && matches!(-res, libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
                && self.uring_discard
            {
                // The kernel predates BLOCK_URING_CMD_DISCARD: fall back to the
                // ioctl for this and every later discard on this queue.
                tracing::info!(
                    node = self.node.name(),
                    "io_uring block discard unavailable ({}); using BLKDISCARD",
                    io::Error::from_raw_os_error(-res)
                );
                self.uring_discard = false;
                res = self.redo_discard_sync(index);
            }
            self.complete(index, res, &mut on_complete);
            count += 1;
        }
        count
    }

    fn redo_discard_sync(&mut self, index: u16) -> i32 {
        let slot = &self.slots[usize::from(index)];
        match self.node.raw_fd() {
            Some(fd) => blk_discard_sync(fd, slot.offset_bytes, slot.len_bytes),
            None => 0,
        }
    }

    fn complete(&mut self, index: u16, res: i32, on_complete: &mut impl FnMut(C, RequestResult)) {
        let slot = &mut self.slots[usize::from(index)];
        let ctx = slot
            .ctx
            .take()
            .expect("completion for a slot that is not in flight");
        let result = if res < 0 {
            Err(RequestError::Io(-res))
        } else if slot.op.moves_data() && res as u64 != slot.expected_bytes {
            // O_DIRECT transfers inside capacity are never short unless the
            // device failed part of them.
            tracing::warn!(
                node = self.node.name(),
                op = slot.op.name(),
                "short transfer: {res} of {} bytes",
                slot.expected_bytes
            );
            Err(RequestError::Io(libc::EIO))
        } else {
            if let BounceUse::ReadCopyOut { skip, len } = slot.bounce {
                let src = self.bounce.slot_ptr(usize::from(index));
                debug_assert!(skip + len <= self.bounce.slot_bytes());
                // SAFETY: the kernel is done with the bounce buffer (its
                // completion was reaped); the segments are the front's
                // writable memory, valid until this completion is handed back.
                unsafe { scatter(src.wrapping_add(skip), slot.segments()) };
            }
            Ok(())
        };
        slot.iov_count = 0;
        self.in_flight -= 1;
        self.free.push(index);
        on_complete(ctx, result);
    }

    /// Blocks until at least one completion is available or `timeout` passes.
    pub fn wait_for_completion(&mut self, timeout: Duration) -> io::Result<()> {
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
    pub fn drain(
        &mut self,
        timeout: Duration,
        mut on_complete: impl FnMut(C, RequestResult),
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let _ = self.submit_pending();
        loop {
            self.reap(&mut on_complete);
            if self.in_flight == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if let Err(e) =
                self.wait_for_completion((deadline - now).min(Duration::from_millis(100)))
            {
                tracing::error!(node = self.node.name(), "waiting for completions: {e}");
                return false;
            }
        }
    }
}

fn blk_discard_sync(fd: RawFd, offset_bytes: u64, len_bytes: u64) -> i32 {
    let range: [u64; 2] = [offset_bytes, len_bytes];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which
    // points to a live local array of exactly that shape.
    let rc = unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) };
    if rc < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        0
    }
}

impl<C: Copy> Drop for Engine<C> {
    fn drop(&mut self) {
        let idle =
            self.in_flight == 0 || self.drain(Duration::from_millis(DRAIN_TIMEOUT_MS), |_, _| {});
        // SAFETY: each field is dropped exactly once here and never used
        // again. The ring goes first: once it is gone the kernel holds no
        // reference to a slot or bounce buffer of a reaped request.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if idle {
            // SAFETY: nothing is in flight, so no buffer is with the kernel.
            unsafe {
                ManuallyDrop::drop(&mut self.slots);
            }
            // SAFETY: as above; dropped once.
            unsafe { ManuallyDrop::drop(&mut self.bounce) };
        } else {
            // Requests the device never completed may still DMA into these
            // buffers: leak them rather than hand the memory back.
            tracing::error!(
                node = self.node.name(),
                in_flight = self.in_flight,
                "requests still in flight after {DRAIN_TIMEOUT_MS} ms; leaking their buffers"
            );
        }
    }
}

#[cfg(test)]
mod tests;
