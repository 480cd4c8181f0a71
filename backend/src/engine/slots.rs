//! The request mapping shared by every ring: a table of in-flight slots that
//! turns a [`BlockRequest`] into one SQE and a CQE result back into a
//! [`RequestResult`]. It does not own a ring, so the vhost-user engine and the
//! ublk queue (whose ring belongs to libublk) build the same SQEs from it.
//!
//! A table bound to an export's [`Binding`] also does a mirror job's data-path
//! work for every front: while a mirror runs, a write becomes two SQEs (the
//! node and the target, from the same memory) and the slot completes when
//! both have; other modifications are logged into the dirty bitmap.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::bounce::BounceRegion;
use crate::binding::{Binding, MirrorTap};
use crate::iovec::{gather, scatter, zero};
use crate::limits::{BOUNCE_SLOT_BYTES, MAX_SEGMENTS};
use crate::node::{Backing, Node};
use crate::request::{BlockOp, BlockRequest, RequestError, RequestResult};

/// `BLOCK_URING_CMD_DISCARD` (`_IO(0x12, 0)`, Linux 6.12+): an asynchronous
/// block discard. The start goes in `sqe->addr`, the length in `sqe->addr3`
/// (the first 8 bytes of the command area).
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// `BLKDISCARD` (`_IO(0x12, 119)`): the synchronous fallback for kernels
/// without the io_uring command.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// What a slot needs from the ring after [`SlotTable::begin`].
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Push this SQE (after setting its `user_data`); the slot is in flight
    /// until [`SlotTable::finish`] is called with its CQE result.
    Sqe(squeue::Entry),
    /// A write while a mirror runs: push both SQEs, with `user_data` that
    /// tells their completions apart; the slot is in flight until
    /// [`SlotTable::finish`] was called for each [`Half`].
    Mirrored {
        /// The write to the node.
        source: squeue::Entry,
        /// The same write to the mirror target.
        target: squeue::Entry,
    },
    /// Done without the kernel (null node, synchronous fallback): call
    /// [`SlotTable::finish`] with this result.
    Done(i32),
}

/// Which SQE of a slot completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    /// The request on the node (every slot has one).
    Source,
    /// The mirror target's copy of a write ([`Prepared::Mirrored`]).
    Target,
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
    /// The mirror this write also went to (held until both halves
    /// completed, which keeps the target open while the kernel uses it).
    mirror: Option<Arc<MirrorTap>>,
    /// SQEs still to complete: 1, or 2 for a mirrored write.
    halves_pending: u8,
    /// The node's result, kept while the target's half is outstanding.
    source_res: i32,
    /// Whether the target took the whole write.
    target_ok: bool,
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

/// How the SQEs of a [`SlotTable`] name its node on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeFile {
    /// Registered at this index of the ring's file table (saves a file
    /// lookup per request; for rings whose table is built once).
    Fixed(u32),
    /// By its descriptor. For a ring with requests that stay pending
    /// indefinitely (ublk's FETCH commands): before Linux 6.13 a file
    /// removed from a ring's table is released only once every request
    /// issued before the removal completed, so a pivot could never let
    /// the old drive go.
    Descriptor,
}

/// The node as an SQE names it: one arm per kind, each building `$sqe`
/// with `$f` bound to that kind's target type.
macro_rules! on_node {
    ($file:expr, $f:ident => $sqe:expr) => {
        match $file {
            Target::Fixed($f) => $sqe,
            Target::Fd($f) => $sqe,
        }
    };
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Fixed(types::Fixed),
    Fd(types::Fd),
}

/// In-flight slots of one queue and the op table that fills them.
pub(crate) struct SlotTable<C> {
    slots: Box<[Slot<C>]>,
    bounce: BounceRegion,
    node: Arc<Node>,
    /// How SQEs name the node.
    file: NodeFile,
    in_flight: u32,
    mem_align_mask: u64,
    offset_align_mask: u64,
    uring_discard: bool,
    short_transfer_log: crate::logging::Throttle,
    /// The export's binding: its mirror tap, if one runs.
    binding: Option<Arc<Binding>>,
}

// SAFETY: the raw pointers inside slots point to front memory that the front
// keeps valid until completion; a table moves between threads only while idle.
unsafe impl<C: Send> Send for SlotTable<C> {}

impl<C> std::fmt::Debug for SlotTable<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotTable")
            .field("node", &self.node.name())
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<C> SlotTable<C> {
    /// `depth` slots for `node`, whose descriptor the ring registered at
    /// index `file`.
    pub(crate) fn new(node: Arc<Node>, depth: u16, file: NodeFile) -> io::Result<Self> {
        assert!(depth > 0);
        let depth = usize::from(depth);
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
                mirror: None,
                halves_pending: 0,
                source_res: 0,
                target_ok: false,
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let limits = *node.limits();
        Ok(SlotTable {
            slots,
            bounce: BounceRegion::new(depth, BOUNCE_SLOT_BYTES)?,
            file,
            in_flight: 0,
            mem_align_mask: u64::from(limits.dio_mem_align_bytes.max(1)) - 1,
            offset_align_mask: u64::from(limits.dio_offset_align_bytes.max(1)) - 1,
            uring_discard: matches!(node.backing(), Backing::BlockDevice(_)),
            short_transfer_log: crate::logging::Throttle::per_ms(
                crate::limits::DATA_PATH_LOG_INTERVAL_MS,
            ),
            node,
            binding: None,
        })
    }

    /// Makes the table do the data-path work of the mirror jobs that run on
    /// `binding` (the export's).
    pub(crate) fn with_binding(mut self, binding: Arc<Binding>) -> Self {
        self.binding = Some(binding);
        self
    }

    /// Number of slots.
    pub(crate) fn depth(&self) -> usize {
        self.slots.len()
    }

    /// The node.
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Slots between `begin` and `finish`.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether slot `index` is in flight.
    pub(crate) fn is_busy(&self, index: u16) -> bool {
        self.slots[usize::from(index)].ctx.is_some()
    }

    /// Fills slot `index` (which must be free) for `req`. On success the slot
    /// is in flight and owns copies of the request's iovecs, and the SQEs it
    /// returns hand them to the kernel. On error the slot stays free.
    /// A write while a mirror runs is [`Prepared::Mirrored`].
    ///
    /// # Safety
    /// Every segment of `req` must be memory valid for the request's
    /// direction (writable for reads, readable for writes) for its whole
    /// length, and stay so until [`SlotTable::finish`] of this slot; if the
    /// table is dropped with the slot in flight, that memory must never be
    /// freed. (A null node writes zeroes into a read's segments at once.)
    pub(crate) unsafe fn begin(
        &mut self,
        index: u16,
        req: &BlockRequest<'_>,
        ctx: C,
    ) -> Result<Prepared, RequestError> {
        assert!(!self.is_busy(index), "slot {index} is already in flight");
        if req.segments.len() > MAX_SEGMENTS {
            return Err(RequestError::Invalid);
        }
        if self.node.is_removed() {
            // The drive went away: I/O error, whatever the op.
            return Err(RequestError::Io(libc::EIO));
        }
        let i = usize::from(index);
        let mut prepared = self.prepare(i, req)?;
        let slot = &mut self.slots[i];
        slot.halves_pending = 1;
        if let (Prepared::Sqe(source), BlockOp::Write { .. }, Some(binding)) =
            (&prepared, req.op, &self.binding)
        {
            // Only writes look at the mirror (and take a reference to it).
            if let Some(tap) = binding.write_tap() {
                if let Some(target) = tap.target().raw_fd() {
                    // Counted before the SQEs exist: the copier leaves the
                    // chunk alone from now on.
                    tap.begin_write(req.offset_bytes, req.len_bytes);
                    prepared = Prepared::Mirrored {
                        source: source.clone(),
                        target: slot.mirror_write(target),
                    };
                    slot.mirror = Some(tap);
                    slot.halves_pending = 2;
                    slot.target_ok = false;
                }
            }
        }
        slot.ctx = Some(ctx);
        self.in_flight += 1;
        Ok(prepared)
    }

    fn prepare(&mut self, i: usize, req: &BlockRequest<'_>) -> Result<Prepared, RequestError> {
        let file = match self.file {
            NodeFile::Fixed(i) => Target::Fixed(types::Fixed(i)),
            // A null node has no descriptor, and no SQE is built for it.
            NodeFile::Descriptor => Target::Fd(types::Fd(self.node.raw_fd().unwrap_or(-1))),
        };
        let aligned = self.is_dio_aligned(req);
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

        if matches!(self.node.backing(), Backing::Null) {
            // Null node: reads see zeroes, everything else succeeds.
            if req.op == BlockOp::Read {
                // SAFETY: the front vouches that the segments are writable
                // memory of their stated lengths until completion.
                unsafe { zero(slot.segments()) };
            }
            return Ok(Prepared::Done(
                i32::try_from(slot.expected_bytes).unwrap_or(i32::MAX),
            ));
        }

        let entry = match req.op {
            BlockOp::Read | BlockOp::Write { .. } => {
                let is_write = matches!(req.op, BlockOp::Write { .. });
                let rw_flags = match req.op {
                    BlockOp::Write { fua: true } => libc::RWF_DSYNC,
                    _ => 0,
                };
                if aligned {
                    let iov = slot.iovecs.as_ptr();
                    let n = slot.iov_count as u32;
                    if is_write {
                        on_node!(file, f => opcode::Writev::new(f, iov, n)
                            .offset(req.offset_bytes)
                            .rw_flags(rw_flags)
                            .build())
                    } else {
                        on_node!(file, f => opcode::Readv::new(f, iov, n)
                            .offset(req.offset_bytes)
                            .build())
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
                        on_node!(file, f => opcode::Writev::new(f, &slot.bounce_iov, 1)
                            .offset(start)
                            .rw_flags(rw_flags)
                            .build())
                    } else {
                        slot.bounce = BounceUse::ReadCopyOut {
                            skip: (req.offset_bytes - start) as usize,
                            len: req.len_bytes as usize,
                        };
                        slot.expected_bytes = span as u64;
                        on_node!(file, f => opcode::Readv::new(f, &slot.bounce_iov, 1)
                            .offset(start)
                            .build())
                    }
                }
            }
            BlockOp::Flush => {
                if self.node.read_only() {
                    return Ok(Prepared::Done(0));
                }
                on_node!(file, f => opcode::Fsync::new(f)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build())
            }
            BlockOp::Discard => match self.node.backing() {
                Backing::BlockDevice(_) if self.uring_discard => {
                    let mut cmd = [0u8; 16];
                    cmd[..8].copy_from_slice(&req.len_bytes.to_ne_bytes());
                    on_node!(file, f => opcode::UringCmd16::new(f, BLOCK_URING_CMD_DISCARD)
                        .addr(Some(req.offset_bytes))
                        .cmd(cmd)
                        .build())
                }
                Backing::BlockDevice(f) => {
                    return Ok(Prepared::Done(blk_discard_sync(
                        f.as_raw_fd(),
                        req.offset_bytes,
                        req.len_bytes,
                    )));
                }
                _ => on_node!(file, f => opcode::Fallocate::new(f, req.len_bytes)
                    .offset(req.offset_bytes)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()),
            },
            BlockOp::WriteZeroes { unmap } => {
                // On a block device both modes become a zero-out; PUNCH_HOLE
                // lets the device deallocate, ZERO_RANGE asks it not to.
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                } | libc::FALLOC_FL_KEEP_SIZE;
                on_node!(file, f => opcode::Fallocate::new(f, req.len_bytes)
                    .offset(req.offset_bytes)
                    .mode(mode)
                    .build())
            }
        };
        Ok(Prepared::Sqe(entry))
    }

    fn is_dio_aligned(&self, req: &BlockRequest<'_>) -> bool {
        if (req.offset_bytes | req.len_bytes) & self.offset_align_mask != 0 {
            return false;
        }
        let mem_mask = self.mem_align_mask;
        req.segments
            .iter()
            .all(|s| (s.iov_base as u64 | s.iov_len as u64) & mem_mask == 0)
    }

    /// Records the raw result of one SQE of slot `index` (or of
    /// [`Prepared::Done`], as [`Half::Source`]). Once every half is in, ends
    /// the slot: copies bounce data out, checks the length, settles the
    /// mirror's bookkeeping, and returns the front's context with the
    /// result; the slot is free again. `None` while a half is outstanding.
    pub(crate) fn finish(
        &mut self,
        index: u16,
        half: Half,
        res: i32,
    ) -> Option<(C, RequestResult)> {
        let slot = &mut self.slots[usize::from(index)];
        match half {
            Half::Source => slot.source_res = res,
            Half::Target => slot.target_ok = res >= 0 && res as u64 == slot.len_bytes,
        }
        slot.halves_pending -= 1;
        if slot.halves_pending > 0 {
            return None;
        }
        let res = slot.source_res;
        Some(self.end(index, res))
    }

    /// Ends slot `index` at once with `-errno`, whatever halves are still
    /// outstanding: for SQEs that never reached the ring.
    pub(crate) fn abort(&mut self, index: u16, errno: i32) -> (C, RequestResult) {
        self.end(index, -errno)
    }

    fn end(&mut self, index: u16, res: i32) -> (C, RequestResult) {
        let i = usize::from(index);
        let mut res = res;
        if self.slots[i].op == BlockOp::Discard
            && self.uring_discard
            && matches!(-res, libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
        {
            // The kernel predates BLOCK_URING_CMD_DISCARD: fall back to the
            // ioctl for this and every later discard on this queue.
            tracing::info!(
                node = self.node.name(),
                "io_uring block discard unavailable ({}); using BLKDISCARD",
                io::Error::from_raw_os_error(-res)
            );
            self.uring_discard = false;
            if let Some(fd) = self.node.raw_fd() {
                res = blk_discard_sync(fd, self.slots[i].offset_bytes, self.slots[i].len_bytes);
            }
        }
        let slot = &mut self.slots[i];
        let ctx = slot
            .ctx
            .take()
            .expect("completion for a slot that is not in flight");
        let result = if res < 0 {
            // A drive that goes away answers ENOSPC (an NVMe namespace being
            // removed) or ENODEV/ENXIO as well as EIO, before sysfs has
            // forgotten it; to a consumer a block device's failure is an
            // I/O error ("no space left" on a disk would read as a full thin
            // pool). A file's ENOSPC is its file system's, and true.
            let errno = match (-res, self.node.backing()) {
                _ if self.node.failed_because_removed(-res) => libc::EIO,
                (libc::ENOSPC | libc::ENODEV | libc::ENXIO, Backing::BlockDevice(_)) => libc::EIO,
                (errno, _) => errno,
            };
            Err(RequestError::Io(errno))
        } else if slot.op.moves_data() && res as u64 != slot.expected_bytes {
            // O_DIRECT transfers inside capacity are never short unless the
            // device failed part of them.
            if let Some(suppressed) = self.short_transfer_log.allow() {
                tracing::warn!(
                    node = self.node.name(),
                    op = slot.op.name(),
                    suppressed,
                    "short transfer: {res} of {} bytes",
                    slot.expected_bytes
                );
            }
            Err(RequestError::Io(libc::EIO))
        } else {
            if let BounceUse::ReadCopyOut { skip, len } = slot.bounce {
                debug_assert!(skip + len <= self.bounce.slot_bytes());
                let src = self.bounce.slot_ptr(i).wrapping_add(skip);
                // SAFETY: the kernel is done with the bounce buffer (its
                // completion was reaped); the segments are the front's
                // writable memory, valid until this completion is handed back.
                unsafe { scatter(src, slot.segments()) };
            }
            Ok(())
        };
        // A mirror copies what changed: a write that went to both nodes is
        // counted done (its chunks copied again unless both halves took
        // it); any other modification is logged once it is on the node.
        if let Some(tap) = slot.mirror.take() {
            tap.end_write(
                slot.offset_bytes,
                slot.len_bytes,
                result.is_ok() && slot.target_ok,
            );
        } else if slot.op.modifies() {
            if let Some(binding) = &self.binding {
                binding.log_modification(slot.offset_bytes, slot.len_bytes);
            }
        }
        slot.iov_count = 0;
        slot.halves_pending = 0;
        self.in_flight -= 1;
        (ctx, result)
    }
}

impl<C> Slot<C> {
    /// For the write in this slot: the same write aimed at the descriptor
    /// `target` (a mirror target), reading the same memory (the front's
    /// segments or the slot's bounce buffer).
    fn mirror_write(&self, target: RawFd) -> squeue::Entry {
        let fua = matches!(self.op, BlockOp::Write { fua: true });
        let (iov, n) = match self.bounce {
            BounceUse::Write => (&self.bounce_iov as *const libc::iovec, 1),
            _ => (self.iovecs.as_ptr(), self.iov_count as u32),
        };
        opcode::Writev::new(types::Fd(target), iov, n)
            .offset(self.offset_bytes)
            .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
            .build()
    }
}

impl<C> Drop for SlotTable<C> {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Requests the device never completed may still DMA into these
            // buffers: leak them rather than hand the memory back.
            tracing::error!(
                node = self.node.name(),
                in_flight = self.in_flight,
                "slot table dropped with requests in flight; leaking their buffers"
            );
            let slots = std::mem::take(&mut self.slots);
            std::mem::forget(slots);
            let bounce = std::mem::replace(&mut self.bounce, BounceRegion::empty());
            std::mem::forget(bounce);
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
