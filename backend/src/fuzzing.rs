//! Fuzz entry points: one function per fuzz target, taking the raw fuzzer
//! input and asserting the invariants of the code it drives (not merely
//! "no panic"). The `cargo fuzz` targets in `backend/fuzz/fuzz_targets/` call
//! these under libFuzzer; the `corpus_replays` test runs every file of
//! `backend/fuzz/corpus/<target>/` through the same functions on stable, so
//! CI replays the corpus without nightly.
//!
//! Built for tests and with the `fuzzing` feature (which enables
//! `virtio-queue/test-utils` for the mock split queue the virtio-blk target
//! builds its chains with). Nothing here is used by the daemon. The module
//! is always declared and gates itself, so its file is part of every
//! build's dependencies (the integration tests' stale-binary check looks at
//! every file under `backend/src`).
#![cfg(any(test, feature = "fuzzing"))]

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{ExportKind, ServeConfig};
use crate::export::ublk::op::{
    check_io, decode_op, CheckedIo, IoLimits, IoRefusal, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
};
use crate::export::vhost_user::virtio_blk::{
    decode, Command, Decoded, Geometry, DISCARD_SEGMENT_BYTES, HEADER_BYTES, SECTOR_BYTES,
};
use crate::limits::{
    MAX_POLL_WINDOW_US, MAX_QUEUES, MAX_QUEUE_DEPTH, MAX_SEGMENTS, SERIAL_MAX_BYTES,
};
use crate::monitor::{code, error_response, parse_call, parse_request, Call, METHODS};
use crate::node::{DiskSpec, NodeLimits};
use crate::request::BlockOp;

/// A fuzz target's entry point: takes the raw input, panics on a violated
/// invariant.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the file in `backend/fuzz/fuzz_targets/` and
/// the corpus directory) and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_blk_decode", virtio_blk_decode),
    ("ublk_io", ublk_io),
    ("monitor_request", monitor_request),
    ("config_toml", config_toml),
];

/// Reads fixed-width little-endian fields off the fuzzer input; an exhausted
/// input reads as zeroes, so every input is a valid encoding.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn rest(self) -> &'a [u8] {
        self.data
    }
}

// ---------------------------------------------------------------------------
// virtio-blk: `virtio_blk::decode` on chains read by virtio-queue from mock
// guest memory.

/// Size of each guest memory region of the virtio-blk target.
pub const FUZZ_REGION_BYTES: u64 = 0x1_0000;
/// Guest address of region 1; the gap below it (after region 0) is a hole.
pub const FUZZ_REGION1_ADDR: u64 = 0x2_0000;
/// Guest address of region 2, adjacent to region 1: a buffer crossing the
/// boundary is in memory but in no single region.
pub const FUZZ_REGION2_ADDR: u64 = FUZZ_REGION1_ADDR + FUZZ_REGION_BYTES;
/// Guest bytes at the start of region 0 that hold the split queue (the
/// descriptor table, available and used rings of a 256-entry queue fit).
pub const FUZZ_QUEUE_AREA_BYTES: u64 = 0x2000;
/// Guest address where the input's trailing bytes (headers, payloads,
/// indirect tables) are written: the rest of region 0.
pub const FUZZ_BLOB_ADDR: u64 = FUZZ_QUEUE_AREA_BYTES;
/// Largest queue size the target builds, as a power of two exponent (256).
pub const FUZZ_MAX_QUEUE_SIZE_LOG2: u8 = 8;

thread_local! {
    /// Guest memory is mapped once per thread and reset after each input:
    /// mapping it per input would cost most of the time of an execution.
    static GUEST_MEMORY: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), FUZZ_REGION_BYTES as usize),
        (GuestAddress(FUZZ_REGION1_ADDR), FUZZ_REGION_BYTES as usize),
        (GuestAddress(FUZZ_REGION2_ADDR), FUZZ_REGION_BYTES as usize),
    ])
    .expect("fuzzing: cannot map 192 KiB of mock guest memory");
}

/// Decodes the geometry part of a virtio-blk input.
fn fuzz_geometry(input: &mut Input) -> Geometry {
    let capacity_mode = input.u8();
    let capacity = input.u64();
    let logical = input.u32();
    let physical = input.u32();
    let flags = input.u8();
    let discard_max = input.u64();
    let write_zeroes_max = input.u64();
    let granularity = input.u32();
    let size_max = input.u32();
    let seg_max = input.u32();
    let queues = input.u16();
    Geometry {
        limits: NodeLimits {
            // Mostly sector-sized capacities, sometimes any u64.
            capacity_bytes: if capacity_mode & 1 == 0 {
                u64::from(capacity as u32) * SECTOR_BYTES
            } else {
                capacity
            },
            logical_block_size_bytes: logical,
            physical_block_size_bytes: physical,
            dio_mem_align_bytes: logical,
            dio_offset_align_bytes: logical,
            volatile_write_cache: flags & 8 != 0,
            fua: flags & 16 != 0,
            discard_max_bytes: (flags & 2 != 0).then_some(discard_max),
            discard_granularity_bytes: granularity,
            write_zeroes_max_bytes: (flags & 4 != 0).then_some(write_zeroes_max),
            max_transfer_bytes: size_max,
        },
        read_only: flags & 1 != 0,
        queues,
        size_max,
        seg_max,
    }
}

/// Maps a descriptor's (mode, raw address) to a guest address: mostly into
/// or around the regions, sometimes anywhere.
fn fuzz_desc_addr(mode: u8, raw: u64) -> u64 {
    match mode % 4 {
        0 => raw,
        1 => FUZZ_BLOB_ADDR + raw % FUZZ_REGION_BYTES,
        2 => FUZZ_REGION1_ADDR + raw % (2 * FUZZ_REGION_BYTES),
        _ => {
            let end = if raw & 0x100 == 0 {
                FUZZ_REGION_BYTES
            } else {
                FUZZ_REGION2_ADDR
            };
            end - (raw & 0xff)
        }
    }
}

/// Fuzz target `virtio_blk_decode`. Input: a geometry (48 bytes), the queue
/// size exponent, the head index and the descriptor count (4 bytes), that
/// many descriptors (mode u8, addr u64, len u32, flags u16, next u16), and
/// bytes written into guest memory at [`FUZZ_BLOB_ADDR`]. The descriptors go
/// into a mock split queue's table as they are (any flags, next index,
/// address, length: loops, indirect tables, holes); the chain virtio-queue
/// reads from the available ring is decoded and the result checked against
/// the chain.
pub fn virtio_blk_decode(data: &[u8]) {
    virtio_blk_decoded(data);
}

/// Runs one `virtio_blk_decode` input and returns what the decoder made of
/// it (for tests of the input encoding).
fn virtio_blk_decoded(data: &[u8]) -> Decoded {
    GUEST_MEMORY.with(|mem| {
        let (decoded, written_bytes) = virtio_blk_decode_in(mem, data);
        // Reset what the input wrote, so every input starts from zeroes.
        let zeroes = vec![0u8; written_bytes];
        mem.write_slice(&zeroes, GuestAddress(0))
            .expect("fuzzing: region 0 is mapped");
        decoded
    })
}

/// Runs one input; returns the decoded chain and how many bytes at the start
/// of region 0 the input wrote.
fn virtio_blk_decode_in(mem: &GuestMemoryMmap, data: &[u8]) -> (Decoded, usize) {
    let mut input = Input { data };
    let geo = fuzz_geometry(&mut input);
    let queue_size = 1u16 << (input.u8() % (FUZZ_MAX_QUEUE_SIZE_LOG2 + 1));
    let head = input.u16() % queue_size.saturating_mul(2);
    let count = u16::from(input.u8()).min(queue_size);
    let vq = MockSplitQueue::new(mem, queue_size);
    for i in 0..count {
        let mode = input.u8();
        let addr = fuzz_desc_addr(mode, input.u64());
        let (len, flags, next) = (input.u32(), input.u16(), input.u16());
        vq.desc_table()
            .store(
                i,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .expect("fuzzing: the descriptor table is in region 0");
    }
    let blob = input.rest();
    let blob = &blob[..blob
        .len()
        .min((FUZZ_REGION_BYTES - FUZZ_BLOB_ADDR) as usize)];
    mem.write_slice(blob, GuestAddress(FUZZ_BLOB_ADDR))
        .expect("fuzzing: the blob fits region 0");
    vq.avail()
        .ring()
        .ref_at(0)
        .expect("fuzzing: the available ring has an entry 0")
        .store(head);
    vq.avail().idx().store(1);

    check_geometry(&geo);

    let mut queue: Queue = vq.create_queue().expect("fuzzing: the mock queue is valid");
    let chain = queue
        .iter(mem)
        .expect("fuzzing: the mock queue is ready")
        .next()
        .expect("fuzzing: one chain is available");
    let descs: Vec<Descriptor> = chain.clone().collect();
    let mut iovecs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGMENTS];
    let decoded = decode(chain, mem, &geo, &mut iovecs);
    check_decoded(&descs, mem, &geo, &decoded, &iovecs);
    (decoded, FUZZ_BLOB_ADDR as usize + blob.len())
}

fn check_geometry(geo: &Geometry) {
    let config = geo.config_space();
    assert_eq!(config.len(), std::mem::size_of::<virtio_blk_config>());
    let ro = geo.features() & (1 << VIRTIO_BLK_F_RO) != 0;
    assert_eq!(ro, geo.read_only, "RO feature bit disagrees with read_only");
    if geo.read_only {
        assert_eq!(
            geo.features() & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0,
            "a read-only export offers discard or write-zeroes"
        );
    }
}

/// The first device-readable bytes of the chain, up to a header and a
/// discard range (skipping empty descriptors, stopping at the first
/// device-writable one or at bytes outside memory), excluding the last
/// descriptor (the status byte's).
fn readable_prefix(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Vec<u8> {
    const WANT_BYTES: usize = HEADER_BYTES + DISCARD_SEGMENT_BYTES;
    let mut out = Vec::with_capacity(WANT_BYTES);
    for d in &descs[..descs.len().saturating_sub(1)] {
        if out.len() == WANT_BYTES {
            break;
        }
        if d.len() == 0 {
            continue;
        }
        if d.is_write_only() {
            break;
        }
        let mut buf = vec![0u8; (d.len() as usize).min(WANT_BYTES - out.len())];
        if mem.read_slice(&mut buf, d.addr()).is_err() {
            break;
        }
        out.extend_from_slice(&buf);
    }
    out
}

/// Checks the data iovecs: in guest memory, each inside one region and one
/// descriptor of the right direction, within size_max/seg_max; returns
/// their total length.
fn check_iovecs(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    geo: &Geometry,
    iovecs: &[libc::iovec],
    device_writes: bool,
) -> u64 {
    assert!(iovecs.len() <= MAX_SEGMENTS);
    assert!(
        iovecs.len() as u64 <= u64::from(geo.seg_max),
        "{} segments with seg_max {}",
        iovecs.len(),
        geo.seg_max
    );
    // (host start, host end, guest start) of every region.
    let regions: Vec<(usize, usize, u64)> = mem
        .iter()
        .map(|r| {
            let start = mem
                .get_host_address(r.start_addr())
                .expect("a region's start is mapped") as usize;
            (start, start + r.len() as usize, r.start_addr().0)
        })
        .collect();
    let mut total = 0u64;
    for iov in iovecs {
        let (start, end) = (iov.iov_base as usize, iov.iov_base as usize + iov.iov_len);
        assert!(iov.iov_len > 0, "empty iovec");
        assert!(
            iov.iov_len as u64 <= u64::from(geo.size_max),
            "iovec of {} bytes with size_max {}",
            iov.iov_len,
            geo.size_max
        );
        let guest = regions
            .iter()
            .find(|&&(s, e, _)| s <= start && end <= e)
            .map(|&(s, _, g)| g + (start - s) as u64);
        let Some(guest) = guest else {
            panic!(
                "iovec {start:#x}+{} outside every guest memory region",
                iov.iov_len
            );
        };
        let guest_end = guest + iov.iov_len as u64;
        assert!(
            descs.iter().any(|d| d.is_write_only() == device_writes
                && d.addr().0 <= guest
                && d.addr()
                    .0
                    .checked_add(u64::from(d.len()))
                    .is_some_and(|e| guest_end <= e)),
            "iovec at guest {guest:#x}+{} is not inside a descriptor the device may {}",
            iov.iov_len,
            if device_writes { "write" } else { "read" }
        );
        total += iov.iov_len as u64;
    }
    total
}

fn check_decoded(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    geo: &Geometry,
    d: &Decoded,
    iovecs: &[libc::iovec; MAX_SEGMENTS],
) {
    // The status byte: the last byte of the last descriptor, which must be
    // device-writable and in guest memory; without one, no answer.
    let status = descs
        .last()
        .filter(|l| l.is_write_only() && l.len() > 0)
        .and_then(|l| l.addr().0.checked_add(u64::from(l.len()) - 1))
        .filter(|&a| mem.get_slice(GuestAddress(a), 1).is_ok());
    assert_eq!(
        d.status_addr.map(|a| a.0),
        status,
        "status address disagrees with the chain"
    );
    if d.status_addr.is_none() {
        assert!(matches!(d.command, Command::Fail(_)));
        assert_eq!(d.used_len_ok, 0);
        return;
    }
    if let Command::Fail(_) = d.command {
        assert!(d.reason.is_some(), "a failed request has no reason");
        assert_eq!(d.used_len_ok, 1);
        return;
    }
    assert_eq!(d.reason, None, "an accepted request has a failure reason");
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    let prefix = readable_prefix(descs, mem);
    assert!(prefix.len() >= HEADER_BYTES, "accepted without a header");
    let req_type = u32::from_le_bytes(prefix[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(prefix[8..16].try_into().unwrap());
    let overhead = HEADER_BYTES as u64 + 1;
    match d.command {
        Command::Fail(_) => unreachable!("handled above"),
        Command::GetId { segments } => {
            assert_eq!(req_type, VIRTIO_BLK_T_GET_ID);
            let len = check_iovecs(descs, mem, geo, &iovecs[..segments], true);
            assert_eq!(total, overhead + len, "GET_ID buffers miscounted");
            assert_eq!(
                u64::from(d.used_len_ok),
                len.min(SERIAL_MAX_BYTES as u64) + 1
            );
        }
        Command::Block {
            op,
            offset_bytes,
            len_bytes,
            segments,
        } => {
            assert!(
                !(geo.read_only && op.modifies()),
                "{op:?} accepted on a read-only export"
            );
            if op != BlockOp::Flush {
                let end = offset_bytes.checked_add(len_bytes);
                assert!(
                    end.is_some_and(|e| e <= geo.limits.capacity_bytes),
                    "{op:?} {offset_bytes}+{len_bytes} beyond capacity {}",
                    geo.limits.capacity_bytes
                );
                assert_eq!(len_bytes % SECTOR_BYTES, 0);
                assert_eq!(offset_bytes % SECTOR_BYTES, 0);
            }
            match op {
                BlockOp::Read | BlockOp::Write { .. } => {
                    let read = op == BlockOp::Read;
                    assert_eq!(
                        req_type,
                        if read {
                            VIRTIO_BLK_T_IN
                        } else {
                            VIRTIO_BLK_T_OUT
                        }
                    );
                    if !read {
                        assert_eq!(op, BlockOp::Write { fua: false }, "virtio has no FUA");
                    }
                    assert_eq!(sector.checked_mul(SECTOR_BYTES), Some(offset_bytes));
                    let len = check_iovecs(descs, mem, geo, &iovecs[..segments], read);
                    assert_eq!(len, len_bytes, "iovecs do not add up to the length");
                    assert_eq!(total, overhead + len, "data bytes miscounted");
                    let used = if read { len + 1 } else { 1 };
                    assert_eq!(u64::from(d.used_len_ok), used);
                }
                BlockOp::Flush => {
                    assert_eq!(req_type, VIRTIO_BLK_T_FLUSH);
                    assert_eq!((offset_bytes, len_bytes, segments), (0, 0, 0));
                    assert_eq!(d.used_len_ok, 1);
                }
                BlockOp::Discard | BlockOp::WriteZeroes { .. } => {
                    let discard = op == BlockOp::Discard;
                    assert_eq!(
                        req_type,
                        if discard {
                            VIRTIO_BLK_T_DISCARD
                        } else {
                            VIRTIO_BLK_T_WRITE_ZEROES
                        }
                    );
                    let max = if discard {
                        geo.limits.discard_max_bytes
                    } else {
                        geo.limits.write_zeroes_max_bytes
                    };
                    let max = max.expect("accepted without the feature offered");
                    let max_sectors = (max / SECTOR_BYTES).min(u64::from(u32::MAX));
                    assert_eq!(segments, 0);
                    assert_eq!(total, overhead + DISCARD_SEGMENT_BYTES as u64);
                    assert_eq!(prefix.len(), HEADER_BYTES + DISCARD_SEGMENT_BYTES);
                    let payload = &prefix[HEADER_BYTES..];
                    let range_sector = u64::from_le_bytes(payload[0..8].try_into().unwrap());
                    let num = u32::from_le_bytes(payload[8..12].try_into().unwrap());
                    let flags = u32::from_le_bytes(payload[12..16].try_into().unwrap());
                    assert!(num > 0 && u64::from(num) <= max_sectors);
                    assert_eq!(range_sector.checked_mul(SECTOR_BYTES), Some(offset_bytes));
                    assert_eq!(u64::from(num) * SECTOR_BYTES, len_bytes);
                    let unmap = flags == VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
                    assert!(flags == 0 || (unmap && !discard), "flags {flags:#x}");
                    if !discard {
                        assert_eq!(op, BlockOp::WriteZeroes { unmap });
                    }
                    assert_eq!(d.used_len_ok, 1);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// ublk: `check_io` on an io descriptor.

/// Fuzz target `ublk_io`. Input: op_flags u32, start_sector u64,
/// nr_sectors u32, capacity u64, max_io_bytes u32, read_only u8. Checks
/// [`check_io`] against the io descriptor: the op is what `op_flags` says,
/// the byte range is exactly the sector range and inside the device, data
/// fits the io buffer, a read-only device takes no modification.
pub fn ublk_io(data: &[u8]) {
    let mut input = Input { data };
    let op_flags = input.u32();
    let start_sector = input.u64();
    let nr_sectors = input.u32();
    let limits = IoLimits {
        capacity_bytes: input.u64(),
        max_io_bytes: u64::from(input.u32()),
        read_only: input.u8() & 1 != 0,
    };
    let decoded = decode_op(op_flags);
    let code = (op_flags & 0xff) as u8;
    match decoded {
        Ok(BlockOp::Read) => assert_eq!(code, 0),
        Ok(BlockOp::Write { fua }) => {
            assert_eq!(code, 1);
            assert_eq!(fua, op_flags & UBLK_IO_F_FUA != 0);
        }
        Ok(BlockOp::Flush) => assert_eq!(code, 2),
        Ok(BlockOp::Discard) => assert_eq!(code, 3),
        Ok(BlockOp::WriteZeroes { unmap }) => {
            assert_eq!(code, 5);
            assert_eq!(unmap, op_flags & UBLK_IO_F_NOUNMAP == 0);
        }
        Err(c) => {
            assert_eq!(c, code);
            assert!(![0, 1, 2, 3, 5].contains(&code), "op {code} refused");
        }
    }
    match check_io(op_flags, start_sector, nr_sectors, &limits) {
        Err(IoRefusal::UnknownOp(c)) => assert_eq!(decoded, Err(c)),
        Err(IoRefusal::Invalid(op)) => {
            assert_eq!(decoded, Ok(op));
            // Refused only for a reason: out of range, too large, read-only.
            let end = u128::from(start_sector) * 512 + u128::from(nr_sectors) * 512;
            let out_of_range = op != BlockOp::Flush && end > u128::from(limits.capacity_bytes);
            let too_large = op.moves_data() && u64::from(nr_sectors) * 512 > limits.max_io_bytes;
            assert!(
                out_of_range || too_large || (limits.read_only && op.modifies()),
                "{op:?} at sector {start_sector} x {nr_sectors} refused without reason"
            );
        }
        Ok(CheckedIo {
            op,
            offset_bytes,
            len_bytes,
        }) => {
            assert_eq!(decoded, Ok(op));
            if op == BlockOp::Flush {
                assert_eq!((offset_bytes, len_bytes), (0, 0), "a flush has no range");
            } else {
                assert_eq!(
                    u128::from(offset_bytes),
                    u128::from(start_sector) * 512,
                    "byte offset is not the start sector"
                );
                assert_eq!(len_bytes, u64::from(nr_sectors) * 512);
                assert!(
                    u128::from(offset_bytes) + u128::from(len_bytes)
                        <= u128::from(limits.capacity_bytes),
                    "{op:?} {offset_bytes}+{len_bytes} beyond capacity {}",
                    limits.capacity_bytes
                );
            }
            if op.moves_data() {
                assert!(len_bytes <= limits.max_io_bytes);
            }
            assert!(!(limits.read_only && op.modifies()));
        }
    }
}

// ---------------------------------------------------------------------------
// The monitor: `parse_request` and `parse_call`.

/// The working directory `parse_call` resolves relative paths against.
pub const FUZZ_MONITOR_CWD: &str = "/run/sluice-fuzz";

/// Checks that `reply` is a JSON-RPC 2.0 error response that fits one line.
fn check_error_response(reply: &Value) {
    let text = serde_json::to_string(reply).expect("a reply serializes");
    assert!(!text.contains('\n'), "a reply spans lines: {text}");
    let back: Value = serde_json::from_str(&text).expect("a reply parses back");
    let obj = back.as_object().expect("a reply is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["error", "id", "jsonrpc"], "reply {text}");
    assert_eq!(obj["jsonrpc"], "2.0");
    assert!(
        matches!(obj["id"], Value::Null | Value::String(_) | Value::Number(_)),
        "a reply's id must be a string, a number or null: {text}"
    );
    let err = obj["error"].as_object().expect("error is an object");
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message"], "reply {text}");
    assert!(err["code"].is_i64(), "reply {text}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "reply {text}"
    );
}

/// Fuzz target `monitor_request`: one request line through
/// [`parse_request`] and [`parse_call`], as the monitor does before it
/// touches the daemon. Never panics; every error becomes a valid JSON-RPC
/// 2.0 error response; a parsed call is the method asked for, with
/// validated parameters.
pub fn monitor_request(data: &[u8]) {
    let request = match parse_request(data) {
        Ok(r) => r,
        Err(reply) => {
            let c = reply["error"]["code"].as_i64();
            assert!(
                c == Some(code::PARSE_ERROR) || c == Some(code::INVALID_REQUEST),
                "envelope error {reply}"
            );
            return check_error_response(&reply);
        }
    };
    assert!(request.params.is_null() || request.params.is_object());
    let id = request.id.clone().unwrap_or(Value::Null);
    match parse_call(
        &request.method,
        request.params.clone(),
        Path::new(FUZZ_MONITOR_CWD),
    ) {
        Ok(call) => {
            assert_eq!(call.method(), request.method);
            match &call {
                Call::ExportAdd(e) => e.validate().expect("a parsed export_add is valid"),
                Call::NodeAdd(d) => {
                    assert!(!d.name.is_empty(), "node_add without a name");
                    match &d.spec {
                        DiskSpec::Path(p) => assert!(p.is_absolute(), "{}", p.display()),
                        DiskSpec::Null { capacity_bytes } => {
                            assert!(*capacity_bytes > 0 && capacity_bytes % SECTOR_BYTES == 0);
                            assert_eq!(d.create_size_bytes, None);
                        }
                    }
                }
                _ => {}
            }
            // A success reply carries the same id; it must be valid too.
            let reply = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": null});
            let text = serde_json::to_string(&reply).expect("a reply serializes");
            let back: Value = serde_json::from_str(&text).expect("a reply parses back");
            assert!(
                matches!(
                    back["id"],
                    Value::Null | Value::String(_) | Value::Number(_)
                ),
                "a reply's id must be a string, a number or null: {text}"
            );
        }
        Err(e) => {
            let known = METHODS.iter().any(|(m, _)| *m == request.method);
            if known {
                assert_eq!(
                    e.code,
                    code::INVALID_PARAMS,
                    "{}: {}",
                    request.method,
                    e.message
                );
            } else {
                assert_eq!(e.code, code::METHOD_NOT_FOUND);
            }
            check_error_response(&error_response(id, e));
        }
    }
}

// ---------------------------------------------------------------------------
// The TOML config.

/// The directory `config_toml` takes the config file to be in.
pub const FUZZ_CONFIG_DIR: &str = "/etc/sluice-fuzz";

/// Fuzz target `config_toml`: [`ServeConfig::from_toml`] on any text. Never
/// panics; a config that parses is valid: limits in range, names unique and
/// non-empty, every export's disk exists, paths absolute.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match ServeConfig::from_toml(text, Path::new(FUZZ_CONFIG_DIR)) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an empty config error");
            return;
        }
    };
    config
        .validate()
        .expect("a parsed config passes validation again");
    let mut disks = HashSet::new();
    for d in &config.disks {
        assert!(!d.name.is_empty());
        assert!(disks.insert(d.name.as_str()), "disk {:?} twice", d.name);
        match &d.spec {
            DiskSpec::Path(p) => assert!(p.is_absolute(), "relative path {}", p.display()),
            DiskSpec::Null { capacity_bytes } => {
                assert!(*capacity_bytes > 0 && capacity_bytes % SECTOR_BYTES == 0);
                assert_eq!(d.create_size_bytes, None);
            }
        }
    }
    let mut exports = HashSet::new();
    for e in &config.exports {
        assert!(!e.name.is_empty());
        assert!(exports.insert(e.name.as_str()), "export {:?} twice", e.name);
        assert!(disks.contains(e.disk.as_str()), "export of a missing disk");
        assert!((1..=MAX_QUEUES).contains(&e.queues), "queues {}", e.queues);
        assert!((1..=MAX_QUEUE_DEPTH).contains(&e.queue_depth));
        assert!(e.poll_window_us <= MAX_POLL_WINDOW_US);
        if let ExportKind::VhostUser {
            socket,
            socket_mode,
        } = &e.kind
        {
            assert!(socket.is_absolute());
            assert_eq!(socket_mode & !0o777, 0);
        }
    }
    if let Some(control) = &config.control {
        assert!(control.is_absolute());
    }
    if let Some(crate::config::MetricsAddr::Unix(path)) = &config.metrics {
        assert!(
            path.is_absolute(),
            "relative metrics socket {}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    fn replay(dir: &Path, target: Target) -> usize {
        let entries = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{} fails", path.display());
            n += 1;
        }
        n
    }

    /// CI's replay: every file of every target's corpus (and hand-made
    /// seeds, and past crashes in `regressions/`) through the target's
    /// function. A missing or empty corpus
    /// fails, and so does a target in `fuzz_targets/` that is not in
    /// [`TARGETS`] or the other way round.
    #[test]
    fn corpus_replays() {
        let mut files: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
            .expect("backend/fuzz/fuzz_targets is missing")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| format!("{n}.rs")).collect();
        names.sort();
        assert_eq!(files, names, "fuzz_targets/ and fuzzing::TARGETS disagree");
        for (name, target) in TARGETS {
            let corpus = fuzz_dir().join("corpus").join(name);
            assert!(
                replay(&corpus, *target) > 0,
                "corpus {} is empty",
                corpus.display()
            );
            assert!(replay(&fuzz_dir().join("seeds").join(name), *target) > 0);
            // Inputs that made a target fail once (each bug also has a unit
            // test where it was fixed).
            let regressions = fuzz_dir().join("regressions").join(name);
            if regressions.exists() {
                replay(&regressions, *target);
            }
        }
    }

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = fuzz_dir().join("seeds").join(target).join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The virtio-blk seeds encode what their names say (so the fuzzer starts
    /// from every request kind, not from inputs refused at the header).
    #[test]
    fn virtio_seeds_decode_as_named() {
        let block = |name: &str| match virtio_blk_decoded(&seed("virtio_blk_decode", name)) {
            Decoded {
                command:
                    Command::Block {
                        op,
                        offset_bytes,
                        len_bytes,
                        segments,
                    },
                reason: None,
                ..
            } => (op, offset_bytes, len_bytes, segments),
            other => panic!("seed {name}: {other:?}"),
        };
        let failed = |name: &str| {
            let d = virtio_blk_decoded(&seed("virtio_blk_decode", name));
            assert!(matches!(d.command, Command::Fail(_)), "seed {name}: {d:?}");
            d
        };
        assert_eq!(block("read"), (BlockOp::Read, 4096, 4096, 1));
        assert_eq!(block("indirect-read"), (BlockOp::Read, 8192, 4096, 1));
        assert_eq!(block("read-status-shares-data"), (BlockOp::Read, 0, 512, 1));
        let write = BlockOp::Write { fua: false };
        assert_eq!(block("write"), (write, 1024, 1024, 1));
        assert_eq!(block("write-two-segments"), (write, 0, 1024, 2));
        assert_eq!(block("header-split"), (write, 512, 512, 1));
        assert_eq!(block("flush"), (BlockOp::Flush, 0, 0, 0));
        assert_eq!(block("big-queue-head"), (BlockOp::Flush, 0, 0, 0));
        assert_eq!(block("discard"), (BlockOp::Discard, 4096, 4096, 0));
        assert_eq!(
            block("write-zeroes-unmap"),
            (BlockOp::WriteZeroes { unmap: true }, 0, 8192, 0)
        );
        let get_id = virtio_blk_decoded(&seed("virtio_blk_decode", "get-id"));
        assert_eq!(get_id.command, Command::GetId { segments: 1 });
        for name in [
            "write-read-only",
            "read-beyond-capacity",
            "unknown-type",
            "wrong-direction",
            "crosses-regions",
            "outside-memory",
            "too-many-segments",
            // The loop ends at the TTL (the queue size) on a writable
            // descriptor, whose last byte answers; the data has both
            // directions.
            "loop",
        ] {
            assert!(failed(name).status_addr.is_some(), "seed {name}");
        }
        assert_eq!(failed("no-status").status_addr, None);
    }

    /// Every monitor seed named after a method parses into that call.
    #[test]
    fn monitor_seeds_parse_as_named() {
        for (method, _) in METHODS {
            let request = parse_request(&seed("monitor_request", method)).unwrap();
            let call = parse_call(&request.method, request.params, Path::new(FUZZ_MONITOR_CWD))
                .unwrap_or_else(|e| panic!("{method}: {e:?}"));
            assert_eq!(call.method(), *method);
        }
    }

    /// Found by the `monitor_request` fuzz target: a request whose id was an
    /// object or an array got an answer echoing it, which is not JSON-RPC 2.0
    /// (ids are strings, numbers or null). Such a request is invalid, and
    /// the answer's id is null.
    #[test]
    fn monitor_refuses_ids_that_are_not_string_number_or_null() {
        for id in [r#"{"id":"mirror0"}"#, "[1]", "true"] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"node_list"}}"#);
            let reply = parse_request(line.as_bytes()).expect_err(&line);
            assert_eq!(reply["error"]["code"], code::INVALID_REQUEST, "{reply}");
            assert_eq!(reply["id"], Value::Null, "{reply}");
            check_error_response(&reply);
        }
        for id in ["1", r#""one""#, "null", "-2.5"] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"node_list"}}"#);
            let request = parse_request(line.as_bytes()).unwrap();
            assert_eq!(request.id, Some(serde_json::from_str(id).unwrap()));
        }
    }

    /// The config seeds that should parse do.
    #[test]
    fn config_seeds_parse() {
        for name in ["readme", "embedded-default", "null-read-only"] {
            let text = String::from_utf8(seed("config_toml", name)).unwrap();
            ServeConfig::from_toml(&text, Path::new(FUZZ_CONFIG_DIR))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
