//! The engine against a real file opened O_DIRECT and a null node.

use super::*;
use crate::node::DiskSpec;
use crate::request::BlockOp;
use std::alloc::{alloc_zeroed, dealloc, Layout};

struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    fn iov(&self, skip: usize, len: usize) -> libc::iovec {
        assert!(skip + len <= self.layout.size());
        libc::iovec {
            // SAFETY: in bounds, checked above.
            iov_base: unsafe { self.ptr.add(skip) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

fn file_node(dir: &tempfile::TempDir, len: u64) -> Option<Arc<Node>> {
    named_file_node(dir, "disk.img", len)
}

fn named_file_node(dir: &tempfile::TempDir, name: &str, len: u64) -> Option<Arc<Node>> {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    match Node::open("t", &DiskSpec::Path(path), false) {
        Ok(n) => Some(Arc::new(n)),
        Err(e) => {
            eprintln!("skipped: temp dir cannot do O_DIRECT: {e}");
            None
        }
    }
}

fn run(
    engine: &mut Engine<u32>,
    op: BlockOp,
    offset_bytes: u64,
    len_bytes: u64,
    segs: &[libc::iovec],
) -> RequestResult {
    let req = BlockRequest {
        op,
        offset_bytes,
        len_bytes,
        segments: segs,
    };
    // SAFETY: the callers' segments are live test buffers of the stated
    // lengths, and the request is drained before this function returns.
    unsafe { engine.submit(&req, 7) }.map_err(|e| match e {
        SubmitError::Refused(e) => e,
        SubmitError::Busy => panic!("busy"),
    })?;
    let mut out = None;
    assert!(engine.drain(Duration::from_secs(10), |ctx, r| {
        assert_eq!(ctx, 7);
        out = Some(r);
    }));
    out.expect("completed")
}

#[test]
fn read_write_flush_discard_zeroes_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some(node) = file_node(&dir, 4 << 20) else {
        return;
    };
    let mut e = Engine::<u32>::new(node.clone(), 8).unwrap();
    let mut buf = Aligned::new(64 << 10);
    for (i, b) in buf.bytes().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    // Two segments, aligned: straight to the device.
    let segs = [buf.iov(0, 8192), buf.iov(8192, 8192)];
    run(&mut e, BlockOp::Write { fua: false }, 1 << 20, 16384, &segs).unwrap();
    run(
        &mut e,
        BlockOp::Write { fua: true },
        2 << 20,
        4096,
        &[buf.iov(0, 4096)],
    )
    .unwrap();
    run(&mut e, BlockOp::Flush, 0, 0, &[]).unwrap();
    let mut back = Aligned::new(64 << 10);
    run(&mut e, BlockOp::Read, 1 << 20, 16384, &[back.iov(0, 16384)]).unwrap();
    assert_eq!(back.bytes()[..16384], buf.bytes()[..16384]);

    // Misaligned memory: through the bounce buffer, both directions.
    let mut odd = Aligned::new(64 << 10);
    run(&mut e, BlockOp::Read, 1 << 20, 4096, &[odd.iov(3, 4096)]).unwrap();
    assert_eq!(odd.bytes()[3..4099], buf.bytes()[..4096]);
    odd.bytes()[3..4099].fill(0x5A);
    run(
        &mut e,
        BlockOp::Write { fua: false },
        3 << 20,
        4096,
        &[odd.iov(3, 4096)],
    )
    .unwrap();
    run(&mut e, BlockOp::Read, 3 << 20, 4096, &[back.iov(0, 4096)]).unwrap();
    assert!(back.bytes()[..4096].iter().all(|&b| b == 0x5A));

    // Discard punches a hole; write-zeroes zeroes; both read back zero.
    run(&mut e, BlockOp::Discard, 1 << 20, 8192, &[]).unwrap();
    run(
        &mut e,
        BlockOp::WriteZeroes { unmap: false },
        (1 << 20) + 8192,
        8192,
        &[],
    )
    .unwrap();
    run(&mut e, BlockOp::Read, 1 << 20, 16384, &[back.iov(0, 16384)]).unwrap();
    assert!(back.bytes()[..16384].iter().all(|&b| b == 0));
    drop(e);

    let on_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(on_disk[2 << 20..(2 << 20) + 4096], buf.bytes()[..4096]);
    assert!(on_disk[3 << 20..(3 << 20) + 4096]
        .iter()
        .all(|&b| b == 0x5A));
}

#[test]
fn depth_bounds_admission_and_drop_waits() {
    let dir = tempfile::tempdir().unwrap();
    let Some(node) = file_node(&dir, 4 << 20) else {
        return;
    };
    let mut e = Engine::<u32>::new(node, 4).unwrap();
    let buf = Aligned::new(16 << 10);
    for i in 0..4u32 {
        let segs = [buf.iov(i as usize * 4096, 4096)];
        let req = BlockRequest {
            op: BlockOp::Write { fua: false },
            offset_bytes: u64::from(i) * 4096,
            len_bytes: 4096,
            segments: &segs,
        };
        // SAFETY: `buf` outlives `e` (dropped below, which waits for these).
        unsafe { e.submit(&req, i) }.unwrap();
    }
    assert!(!e.has_free_slot());
    let segs = [buf.iov(0, 4096)];
    let req = BlockRequest {
        op: BlockOp::Read,
        offset_bytes: 0,
        len_bytes: 4096,
        segments: &segs,
    };
    // SAFETY: refused (no free slot) before anything reaches the kernel.
    assert_eq!(unsafe { e.submit(&req, 9) }, Err(SubmitError::Busy));
    e.submit_pending().unwrap();
    assert_eq!(e.in_flight(), 4);
    // Dropping with requests in flight waits for them before freeing slots.
    drop(e);
}

#[test]
fn null_node_reads_zeroes_and_drops_writes() {
    let node = Arc::new(
        Node::open(
            "n",
            &DiskSpec::Null {
                capacity_bytes: 1 << 20,
            },
            false,
        )
        .unwrap(),
    );
    let mut e = Engine::<u32>::new(node, 4).unwrap();
    let mut buf = Aligned::new(4096);
    buf.bytes().fill(0xAA);
    run(
        &mut e,
        BlockOp::Write { fua: false },
        0,
        4096,
        &[buf.iov(0, 4096)],
    )
    .unwrap();
    run(&mut e, BlockOp::Read, 0, 4096, &[buf.iov(0, 4096)]).unwrap();
    assert!(buf.bytes().iter().all(|&b| b == 0));
    run(&mut e, BlockOp::Flush, 0, 0, &[]).unwrap();
    run(&mut e, BlockOp::Discard, 0, 4096, &[]).unwrap();
}

#[test]
fn a_bound_engine_mirrors_writes_and_logs_other_modifications() {
    use crate::binding::{Binding, MirrorTap};
    const CHUNK: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (Some(source), Some(target)) = (
        named_file_node(&dir, "source.img", 1 << 20),
        named_file_node(&dir, "target.img", 1 << 20),
    ) else {
        return;
    };
    let binding = Arc::new(Binding::new(source.clone()));
    let event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
    let mut e =
        Engine::<u32>::with_completion_event(source, 8, &event, Some(binding.clone())).unwrap();
    let mut buf = Aligned::new(3 * 4096);
    for (i, b) in buf.bytes().iter_mut().enumerate() {
        *b = (i % 249) as u8 + 1;
    }

    // No mirror: a plain write, the target untouched.
    run(
        &mut e,
        BlockOp::Write { fua: false },
        0,
        4096,
        &[buf.iov(0, 4096)],
    )
    .unwrap();
    let target_bytes = || std::fs::read(dir.path().join("target.img")).unwrap();
    assert!(target_bytes()[..4096].iter().all(|&b| b == 0));

    let tap = Arc::new(MirrorTap::new(1 << 20, CHUNK, target));
    while tap.bitmap().take_next(0).is_some() {}
    binding.set_mirror(Some(tap.clone()));

    // A write goes to both nodes, aligned and (memory off by 512) bounced;
    // both halves took it, so no chunk is dirty and none is in flight.
    run(
        &mut e,
        BlockOp::Write { fua: true },
        CHUNK,
        8192,
        &[buf.iov(0, 8192)],
    )
    .unwrap();
    run(
        &mut e,
        BlockOp::Write { fua: false },
        3 * CHUNK,
        4096,
        &[buf.iov(512, 4096)],
    )
    .unwrap();
    let t = target_bytes();
    assert_eq!(&t[CHUNK as usize..][..8192], &buf.bytes()[..8192]);
    assert_eq!(&t[3 * CHUNK as usize..][..4096], &buf.bytes()[512..4608]);
    assert_eq!(
        tap.bitmap().dirty(),
        0,
        "mirrored writes leave nothing to copy"
    );
    assert!(tap.copy_begin(1).is_some() && tap.copy_begin(3).is_some());

    // Other modifications reach only the source and are logged.
    run(&mut e, BlockOp::Discard, 5 * CHUNK, 4096, &[]).unwrap();
    run(
        &mut e,
        BlockOp::WriteZeroes { unmap: false },
        7 * CHUNK,
        4096,
        &[],
    )
    .unwrap();
    assert_eq!(tap.bitmap().dirty(), 2);

    // A write whose target half fails (a target opened read-only: EBADF)
    // fails nothing for the consumer but marks its chunk to be copied again.
    let read_only = Node::open("ro", &DiskSpec::Path(dir.path().join("target.img")), true).unwrap();
    binding.set_mirror(Some(Arc::new(MirrorTap::new(
        1 << 20,
        CHUNK,
        Arc::new(read_only),
    ))));
    let small_tap = binding.write_tap().unwrap();
    while small_tap.bitmap().take_next(0).is_some() {}
    run(
        &mut e,
        BlockOp::Write { fua: false },
        9 * CHUNK,
        4096,
        &[buf.iov(0, 4096)],
    )
    .unwrap();
    assert_eq!(small_tap.bitmap().dirty(), 1, "the target missed it");
}
