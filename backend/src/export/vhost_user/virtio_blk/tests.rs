//! Decoding tests on chains built with `virtio_queue::mock` in real guest
//! memory: every malformed shape must end in a status, never a panic.

use super::*;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

const R: u16 = 0;
const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const MEM_BYTES: u64 = 0x10_0000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xF000;

fn geometry(read_only: bool) -> Geometry {
    Geometry {
        limits: NodeLimits {
            capacity_bytes: 1 << 20,
            logical_block_size_bytes: 512,
            physical_block_size_bytes: 4096,
            dio_mem_align_bytes: 512,
            dio_offset_align_bytes: 512,
            volatile_write_cache: true,
            fua: true,
            discard_max_bytes: Some(1 << 20),
            discard_granularity_bytes: 4096,
            write_zeroes_max_bytes: Some(1 << 20),
            max_transfer_bytes: 1 << 20,
        },
        read_only,
        queues: 2,
        size_max: 1 << 16,
        seg_max: 8,
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr, len, flags, 0,
    ))
}

fn header(mem: &GuestMemoryMmap, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn run(
    mem: &GuestMemoryMmap,
    geo: &Geometry,
    descs: &[RawDescriptor],
) -> (Decoded, [libc::iovec; MAX_SEGMENTS]) {
    let vq = MockSplitQueue::new(mem, 256);
    let chain = vq.build_desc_chain(descs).unwrap();
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGMENTS];
    let d = decode(chain, mem, geo, &mut iov);
    (d, iov)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap()
}

fn failed(d: &Decoded) -> Option<RequestError> {
    match d.command {
        Command::Fail(e) => Some(e),
        _ => None,
    }
}

#[test]
fn read_translates_guest_buffers() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 8);
    let (d, iov) = run(
        &mem,
        &geometry(false),
        &[desc(HDR, 16, R), desc(DATA, 4096, W), desc(STATUS, 1, W)],
    );
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::Read,
            offset_bytes: 4096,
            len_bytes: 4096,
            segments: 1
        }
    );
    assert_eq!(d.status_addr, Some(GuestAddress(STATUS)));
    assert_eq!(d.used_len_ok, 4097);
    assert_eq!(
        iov[0].iov_base as *mut u8,
        mem.get_host_address(GuestAddress(DATA)).unwrap()
    );
    assert_eq!(iov[0].iov_len, 4096);
}

#[test]
fn header_split_and_data_sharing_descriptors() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_OUT, 2);
    // Header over two descriptors; the second also carries 512 bytes of data;
    // the status byte ends a descriptor that also carries nothing else.
    let (d, iov) = run(
        &mem,
        &geometry(false),
        &[
            desc(HDR, 8, R),
            desc(HDR + 8, 8 + 512, R),
            desc(DATA, 512, R),
            desc(STATUS, 1, W),
        ],
    );
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::Write { fua: false },
            offset_bytes: 1024,
            len_bytes: 1024,
            segments: 2
        }
    );
    assert_eq!(
        iov[0].iov_base as *mut u8,
        mem.get_host_address(GuestAddress(HDR + 16)).unwrap()
    );
    assert_eq!(d.used_len_ok, 1);
}

#[test]
fn status_byte_may_share_the_last_data_descriptor() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (d, _) = run(
        &mem,
        &geometry(false),
        &[desc(HDR, 16, R), desc(DATA, 513, W)],
    );
    assert_eq!(d.status_addr, Some(GuestAddress(DATA + 512)));
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::Read,
            offset_bytes: 0,
            len_bytes: 512,
            segments: 1
        }
    );
}

#[test]
fn out_of_range_and_malformed_requests_fail_with_a_status() {
    let mem = memory();
    let geo = geometry(false);
    let cases: &[(u32, u64, &[RawDescriptor], RequestError)] = &[
        // beyond capacity (1 MiB = 2048 sectors)
        (
            VIRTIO_BLK_T_IN,
            2048,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // straddling the end
        (
            VIRTIO_BLK_T_OUT,
            2047,
            &[desc(HDR, 16, R), desc(DATA, 1024, R), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // sector * 512 overflows
        (
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // length not a multiple of 512
        (
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // read whose data the device may not write
        (
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // write whose data is device-writable
        (
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // data outside guest memory
        (
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HDR, 16, R),
                desc(MEM_BYTES - 256, 512, W),
                desc(STATUS, 1, W),
            ],
            RequestError::Invalid,
        ),
        // segment larger than size_max
        (
            VIRTIO_BLK_T_IN,
            0,
            &[
                desc(HDR, 16, R),
                desc(0x20000, 1 << 17, W),
                desc(STATUS, 1, W),
            ],
            RequestError::Invalid,
        ),
        // header too short
        (
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HDR, 8, R), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // header device-writable
        (
            VIRTIO_BLK_T_IN,
            0,
            &[desc(HDR, 16, W), desc(STATUS, 1, W)],
            RequestError::Invalid,
        ),
        // unknown type
        (
            99,
            0,
            &[desc(HDR, 16, R), desc(STATUS, 1, W)],
            RequestError::Unsupported,
        ),
    ];
    for (i, (t, sector, descs, want)) in cases.iter().enumerate() {
        header(&mem, *t, *sector);
        let (d, _) = run(&mem, &geo, descs);
        assert_eq!(failed(&d), Some(*want), "case {i}: {d:?}");
        assert!(d.status_addr.is_some(), "case {i}");
        assert!(d.reason.is_some(), "case {i}");
    }
}

#[test]
fn too_many_segments_fail() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![desc(HDR, 16, R)];
    descs.extend((0..9).map(|i| desc(DATA + i * 512, 512, W)));
    descs.push(desc(STATUS, 1, W));
    let (d, _) = run(&mem, &geometry(false), &descs);
    assert_eq!(failed(&d), Some(RequestError::Invalid));
    // Longer than the decoder collects at all: still answered.
    let mut descs = vec![desc(HDR, 16, R)];
    descs.extend((0..(MAX_SEGMENTS as u64 + 4)).map(|i| desc(DATA + i * 512, 512, W)));
    descs.push(desc(STATUS, 1, W));
    let (d, _) = run(&mem, &geometry(false), &descs);
    assert_eq!(failed(&d), Some(RequestError::Invalid));
    assert_eq!(d.status_addr, Some(GuestAddress(STATUS)));
}

#[test]
fn chain_without_status_byte_is_unanswerable() {
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (d, _) = run(
        &mem,
        &geometry(false),
        &[desc(HDR, 16, R), desc(DATA, 512, R)],
    );
    assert_eq!(d.status_addr, None);
    let (d, _) = run(
        &mem,
        &geometry(false),
        &[desc(HDR, 16, R), desc(MEM_BYTES + 4096, 1, W)],
    );
    assert_eq!(d.status_addr, None);
}

#[test]
fn read_only_refuses_modifications() {
    let mem = memory();
    let geo = geometry(true);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (d, _) = run(
        &mem,
        &geo,
        &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
    );
    assert_eq!(failed(&d), Some(RequestError::Invalid));
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let (d, _) = run(
        &mem,
        &geo,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
    );
    assert_eq!(failed(&d), Some(RequestError::Invalid));
    assert_eq!(geo.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(geo.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

fn range_payload(mem: &GuestMemoryMmap, sector: u64, num: u32, flags: u32) {
    let mut p = [0u8; 16];
    p[0..8].copy_from_slice(&sector.to_le_bytes());
    p[8..12].copy_from_slice(&num.to_le_bytes());
    p[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&p, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let mem = memory();
    let geo = geometry(false);
    let descs = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    range_payload(&mem, 8, 16, 0);
    let (d, _) = run(&mem, &geo, &descs);
    assert_eq!(d.reason, None);
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::Discard,
            offset_bytes: 4096,
            len_bytes: 8192,
            segments: 0
        }
    );
    // unmap on a discard, and unknown flags, are UNSUPP per the spec
    range_payload(&mem, 8, 16, 1);
    assert_eq!(
        failed(&run(&mem, &geo, &descs).0),
        Some(RequestError::Unsupported)
    );
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range_payload(&mem, 8, 16, 1);
    let (d, _) = run(&mem, &geo, &descs);
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::WriteZeroes { unmap: true },
            offset_bytes: 4096,
            len_bytes: 8192,
            segments: 0
        }
    );
    range_payload(&mem, 8, 16, 2);
    assert_eq!(
        failed(&run(&mem, &geo, &descs).0),
        Some(RequestError::Unsupported)
    );
    // beyond capacity, zero length, two ranges (max_discard_seg = 1)
    range_payload(&mem, 2040, 16, 0);
    assert_eq!(
        failed(&run(&mem, &geo, &descs).0),
        Some(RequestError::Invalid)
    );
    range_payload(&mem, 0, 0, 0);
    assert_eq!(
        failed(&run(&mem, &geo, &descs).0),
        Some(RequestError::Invalid)
    );
    let two = [desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)];
    range_payload(&mem, 0, 8, 0);
    assert_eq!(
        failed(&run(&mem, &geo, &two).0),
        Some(RequestError::Unsupported)
    );
}

#[test]
fn flush_and_get_id() {
    let mem = memory();
    let geo = geometry(false);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let (d, _) = run(&mem, &geo, &[desc(HDR, 16, R), desc(STATUS, 1, W)]);
    assert_eq!(
        d.command,
        Command::Block {
            op: BlockOp::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            segments: 0
        }
    );
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (d, _) = run(
        &mem,
        &geo,
        &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
    );
    assert_eq!(d.command, Command::GetId { segments: 1 });
    assert_eq!(d.used_len_ok, 21);
}

#[test]
fn status_mapping_is_total() {
    assert_eq!(status_of(Ok(())), STATUS_OK);
    assert_eq!(status_of(Err(RequestError::Io(libc::EIO))), STATUS_IOERR);
    assert_eq!(status_of(Err(RequestError::Invalid)), STATUS_IOERR);
    assert_eq!(status_of(Err(RequestError::Unsupported)), STATUS_UNSUPP);
}

#[test]
fn config_space_layout() {
    let geo = geometry(false);
    let c = geo.config_space();
    let u32_at = |off: usize| u32::from_le_bytes(c[off..off + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048); // sectors
    assert_eq!(u32_at(8), 1 << 16); // size_max
    assert_eq!(u32_at(12), 8); // seg_max
    assert_eq!(u32_at(20), 512); // blk_size
    assert_eq!(c[24], 3); // physical_block_exp: 4096 = 512 << 3
    assert_eq!(c[32], 1); // wce: write back
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2); // num_queues
    assert_eq!(u32_at(36), 2048); // max_discard_sectors
    assert_eq!(u32_at(40), 1); // max_discard_seg
    assert_eq!(u32_at(44), 8); // discard_sector_alignment
    assert_eq!(u32_at(48), 2048); // max_write_zeroes_sectors
    assert_eq!(c[56], 1); // write_zeroes_may_unmap
    let f = geo.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_TOPOLOGY,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
}
