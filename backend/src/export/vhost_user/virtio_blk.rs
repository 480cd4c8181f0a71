//! virtio-blk on the wire: feature bits, the config space, and decoding a
//! descriptor chain into a validated block request. Guest input is hostile:
//! every field is checked before any I/O, and nothing here panics on it.

use std::mem::offset_of;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::limits::{MAX_SEGMENTS, SERIAL_MAX_BYTES};
use crate::node::NodeLimits;
use crate::request::{BlockOp, RequestError};

/// virtio-blk counts in 512-byte sectors whatever the block size.
pub(crate) const SECTOR_BYTES: u64 = 512;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
pub(crate) const HEADER_BYTES: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub(crate) const DISCARD_SEGMENT_BYTES: usize = 16;

/// Status byte values.
pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The request failed.
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The request type or a flag is not supported.
pub(crate) const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What an export advertises and validates against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Node limits (capacity, block sizes, discard...).
    pub limits: NodeLimits,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Number of queues.
    pub queues: u16,
    /// Largest data segment.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
}

impl Geometry {
    fn discard(&self) -> bool {
        !self.read_only && self.limits.discard_max_bytes.is_some()
    }

    fn write_zeroes(&self) -> bool {
        !self.read_only && self.limits.write_zeroes_max_bytes.is_some()
    }

    fn discard_max_sectors(&self) -> u32 {
        sectors_u32(self.limits.discard_max_bytes.unwrap_or(0))
    }

    fn write_zeroes_max_sectors(&self) -> u32 {
        sectors_u32(self.limits.write_zeroes_max_bytes.unwrap_or(0))
    }

    /// The virtio feature bits this export offers.
    pub(crate) fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.discard() {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes() {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The config space (`struct virtio_blk_config`, little endian) up to
    /// the write-zeroes fields; later fields (secure erase, zoned) read as 0.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        let l = &self.limits;
        let mut b = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &(l.capacity_bytes / SECTOR_BYTES).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &self.size_max.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &self.seg_max.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &l.logical_block_size_bytes.to_le_bytes(),
        );
        let per_physical = (l.physical_block_size_bytes / l.logical_block_size_bytes.max(1)).max(1);
        put(
            offset_of!(virtio_blk_config, physical_block_exp),
            &[per_physical.trailing_zeros() as u8],
        );
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &(per_physical.min(u32::from(u16::MAX)) as u16).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, wce),
            &[u8::from(l.volatile_write_cache)],
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.queues.to_le_bytes(),
        );
        if self.discard() {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &self.discard_max_sectors().to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &1u32.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &((u64::from(l.discard_granularity_bytes) / SECTOR_BYTES).max(1) as u32)
                    .to_le_bytes(),
            );
        }
        if self.write_zeroes() {
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &self.write_zeroes_max_sectors().to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &1u32.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
                &[u8::from(l.discard_max_bytes.is_some())],
            );
        }
        b
    }
}

fn sectors_u32(bytes: u64) -> u32 {
    (bytes / SECTOR_BYTES).min(u64::from(u32::MAX)) as u32
}

/// What a chain asks for, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// A block operation; data segments (if any) are in the caller's iovecs.
    Block {
        /// The operation.
        op: BlockOp,
        /// Start on the node.
        offset_bytes: u64,
        /// Length of the range.
        len_bytes: u64,
        /// Number of iovecs filled.
        segments: usize,
    },
    /// GET_ID: write the serial into `segments` iovecs.
    GetId {
        /// Number of iovecs filled.
        segments: usize,
    },
    /// Complete with this status without I/O.
    Fail(RequestError),
}

/// A decoded chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// Guest address of the status byte; `None` when the chain has no usable
    /// one (then the chain is returned unanswered).
    pub status_addr: Option<GuestAddress>,
    /// What to do.
    pub command: Command,
    /// Bytes the device writes into the chain on success, status included.
    pub used_len_ok: u32,
    /// Why the request is malformed, for the rate-limited log.
    pub reason: Option<&'static str>,
}

#[derive(Clone, Copy)]
struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// Decodes one descriptor chain. Data buffers are translated into host
/// iovecs in `iovecs`; everything is bounds- and direction-checked.
pub(crate) fn decode(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    geo: &Geometry,
    iovecs: &mut [libc::iovec; MAX_SEGMENTS],
) -> Decoded {
    // Collect the chain (header, data..., status) without allocating. A chain
    // longer than we take is drained so its status byte can still answer.
    let mut segs = [Seg {
        addr: 0,
        len: 0,
        write: false,
    }; MAX_SEGMENTS + 2];
    let mut n = 0;
    let mut too_long = false;
    let mut last = None;
    for d in descriptors {
        let seg = Seg {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        };
        last = Some(seg);
        if n < segs.len() {
            segs[n] = seg;
            n += 1;
        } else {
            too_long = true;
        }
    }
    let no_status = |reason| Decoded {
        status_addr: None,
        command: Command::Fail(RequestError::Invalid),
        used_len_ok: 0,
        reason: Some(reason),
    };
    let Some(status_seg) = last else {
        return no_status("empty chain");
    };
    if !status_seg.write || status_seg.len == 0 {
        return no_status("last descriptor is not a writable status byte");
    }
    let Some(status_addr) = status_seg.addr.checked_add(u64::from(status_seg.len) - 1) else {
        return no_status("status byte address overflows");
    };
    if mem.get_slice(GuestAddress(status_addr), 1).is_err() {
        return no_status("status byte outside guest memory");
    }
    let status_addr = GuestAddress(status_addr);
    let fail = |e: RequestError, reason| Decoded {
        status_addr: Some(status_addr),
        command: Command::Fail(e),
        used_len_ok: 1,
        reason: Some(reason),
    };
    if too_long {
        return fail(
            RequestError::Invalid,
            "more descriptors than seg_max allows",
        );
    }
    // The status byte ends the last descriptor; the rest of it is data.
    segs[n - 1].len -= 1;

    // Header: the first 16 device-readable bytes, possibly spread over
    // several descriptors (VERSION_1 implies any layout).
    let mut header = [0u8; HEADER_BYTES];
    let mut have = 0;
    let mut first = 0;
    while have < HEADER_BYTES && first < n {
        let s = &mut segs[first];
        if s.write {
            return fail(
                RequestError::Invalid,
                "request header is not device-readable",
            );
        }
        let take = (HEADER_BYTES - have).min(s.len as usize);
        if mem
            .read_slice(&mut header[have..have + take], GuestAddress(s.addr))
            .is_err()
        {
            return fail(RequestError::Invalid, "request header outside guest memory");
        }
        have += take;
        s.addr += take as u64;
        s.len -= take as u32;
        if s.len == 0 {
            first += 1;
        }
    }
    if have < HEADER_BYTES {
        return fail(
            RequestError::Invalid,
            "request header shorter than 16 bytes",
        );
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let data = &segs[first..n];
    let nonempty = || data.iter().filter(|s| s.len > 0);

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            if write && geo.read_only {
                return fail(RequestError::Invalid, "write to a read-only export");
            }
            let (count, len) = match translate(data, !write, mem, geo, iovecs) {
                Ok(v) => v,
                Err(reason) => return fail(RequestError::Invalid, reason),
            };
            if len % SECTOR_BYTES != 0 {
                return fail(
                    RequestError::Invalid,
                    "data length is not a multiple of 512",
                );
            }
            let Some(offset_bytes) = range(sector, len, geo) else {
                return fail(RequestError::Invalid, "sector range beyond capacity");
            };
            Decoded {
                status_addr: Some(status_addr),
                command: Command::Block {
                    op: if write {
                        BlockOp::Write { fua: false }
                    } else {
                        BlockOp::Read
                    },
                    offset_bytes,
                    len_bytes: len,
                    segments: count,
                },
                used_len_ok: if write {
                    1
                } else {
                    (len as u32).saturating_add(1)
                },
                reason: None,
            }
        }
        VIRTIO_BLK_T_FLUSH => Decoded {
            status_addr: Some(status_addr),
            command: Command::Block {
                op: BlockOp::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                segments: 0,
            },
            used_len_ok: 1,
            reason: None,
        },
        VIRTIO_BLK_T_GET_ID => match translate(data, true, mem, geo, iovecs) {
            Ok((count, len)) => Decoded {
                status_addr: Some(status_addr),
                command: Command::GetId { segments: count },
                used_len_ok: (len.min(SERIAL_MAX_BYTES as u64) as u32) + 1,
                reason: None,
            },
            Err(reason) => fail(RequestError::Invalid, reason),
        },
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let supported = if discard {
                geo.discard()
            } else {
                geo.write_zeroes()
            };
            if !supported {
                return fail(
                    if geo.read_only {
                        RequestError::Invalid
                    } else {
                        RequestError::Unsupported
                    },
                    "discard/write-zeroes not offered on this export",
                );
            }
            // We offer max_*_seg = 1: exactly one 16-byte range descriptor.
            let total: u64 = nonempty().map(|s| u64::from(s.len)).sum();
            if nonempty().any(|s| s.write)
                || total == 0
                || total % DISCARD_SEGMENT_BYTES as u64 != 0
            {
                return fail(
                    RequestError::Invalid,
                    "malformed discard/write-zeroes payload",
                );
            }
            if total > DISCARD_SEGMENT_BYTES as u64 {
                return fail(
                    RequestError::Unsupported,
                    "more than max_discard_seg ranges",
                );
            }
            let mut raw = [0u8; DISCARD_SEGMENT_BYTES];
            let mut have = 0;
            for s in nonempty() {
                let take = s.len as usize;
                if mem
                    .read_slice(&mut raw[have..have + take], GuestAddress(s.addr))
                    .is_err()
                {
                    return fail(RequestError::Invalid, "discard range outside guest memory");
                }
                have += take;
            }
            let range_sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Unknown flags, and unmap on a discard, are UNSUPP per the spec.
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return fail(
                    RequestError::Unsupported,
                    "unsupported discard/write-zeroes flags",
                );
            }
            let max = if discard {
                geo.discard_max_sectors()
            } else {
                geo.write_zeroes_max_sectors()
            };
            if num_sectors == 0 || num_sectors > max {
                return fail(
                    RequestError::Invalid,
                    "discard/write-zeroes length out of limits",
                );
            }
            let len = u64::from(num_sectors) * SECTOR_BYTES;
            let Some(offset_bytes) = range(range_sector, len, geo) else {
                return fail(RequestError::Invalid, "sector range beyond capacity");
            };
            let op = if discard {
                BlockOp::Discard
            } else {
                BlockOp::WriteZeroes { unmap }
            };
            Decoded {
                status_addr: Some(status_addr),
                command: Command::Block {
                    op,
                    offset_bytes,
                    len_bytes: len,
                    segments: 0,
                },
                used_len_ok: 1,
                reason: None,
            }
        }
        _ => fail(RequestError::Unsupported, "unknown request type"),
    }
}

/// Checks `sector * 512 + len <= capacity` without overflow; returns the
/// byte offset.
fn range(sector: u64, len: u64, geo: &Geometry) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_BYTES)?;
    let end = offset.checked_add(len)?;
    (end <= geo.limits.capacity_bytes).then_some(offset)
}

/// Translates data segments into host iovecs, checking direction, count and
/// size limits and that every buffer lies inside one guest memory region.
fn translate(
    data: &[Seg],
    device_writes: bool,
    mem: &GuestMemoryMmap,
    geo: &Geometry,
    iovecs: &mut [libc::iovec; MAX_SEGMENTS],
) -> Result<(usize, u64), &'static str> {
    let mut count = 0;
    let mut total = 0u64;
    for s in data.iter().filter(|s| s.len > 0) {
        if s.write != device_writes {
            return Err("data descriptor has the wrong direction");
        }
        if s.len > geo.size_max {
            return Err("data descriptor larger than size_max");
        }
        if count == MAX_SEGMENTS || count as u32 >= geo.seg_max {
            return Err("more data descriptors than seg_max");
        }
        let slice = mem
            .get_slice(GuestAddress(s.addr), s.len as usize)
            .map_err(|_| "data buffer outside guest memory")?;
        iovecs[count] = libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len as usize,
        };
        count += 1;
        total += u64::from(s.len);
    }
    Ok((count, total))
}

/// The one place a request result becomes a virtio-blk status.
pub(crate) fn status_of(result: Result<(), RequestError>) -> u8 {
    match result {
        Ok(()) => STATUS_OK,
        Err(RequestError::Unsupported) => STATUS_UNSUPP,
        Err(RequestError::Invalid) | Err(RequestError::Io(_)) => STATUS_IOERR,
    }
}

#[cfg(test)]
mod tests;
