use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;

const LIMITS: Limits = Limits {
    queues: 2,
    queue_size: 256,
};

fn request(num_queues: u16, queue_size: u16) -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    }
}

/// A fresh buffer as GET_INFLIGHT_FD makes it, and its mapping as
/// SET_INFLIGHT_FD makes it.
fn fresh(num_queues: u16, queue_size: u16) -> (File, VhostUserInflight, Arc<InflightRegion>) {
    let (msg, file) = create(&request(num_queues, queue_size), LIMITS).expect("create");
    let region = InflightRegion::map(&file, &msg, LIMITS).expect("map");
    (file, msg, region)
}

/// What a successor process maps: the same file, mapped again.
fn remap(file: &File, msg: &VhostUserInflight, queue: u16) -> QueueInflight {
    InflightRegion::map(file, msg, LIMITS)
        .expect("map again")
        .queue(queue)
        .expect("queue")
}

fn read<const N: usize>(file: &File, offset: usize) -> [u8; N] {
    let mut b = [0u8; N];
    file.read_exact_at(&mut b, offset as u64).expect("read");
    b
}

fn read_u16(file: &File, offset: usize) -> u16 {
    u16::from_ne_bytes(read(file, offset))
}

fn read_u64(file: &File, offset: usize) -> u64 {
    u64::from_ne_bytes(read(file, offset))
}

fn poke(file: &File, offset: usize, bytes: &[u8]) {
    file.write_all_at(bytes, offset as u64).expect("write");
}

/// A ring of `size` whose guest made a whole ring available past `used`.
fn ring(size: u16, used: u16) -> RingIndices {
    RingIndices {
        size,
        used,
        avail: used.wrapping_add(size),
    }
}

fn desc_at(queue_size: u16, queue: u16, head: u16) -> usize {
    usize::from(queue) * queue_region_bytes(queue_size) + HEADER_BYTES + usize::from(head) * 16
}

#[test]
fn sizes_match_the_spec_and_the_other_implementations() {
    // The header is 16 bytes and each descriptor's state 16 (the spec's
    // packed C structs); vhost's own struct agrees on the descriptor.
    assert_eq!(
        std::mem::size_of::<vhost::vhost_user::message::DescStateSplit>(),
        DESC_STATE_BYTES
    );
    for q in [1u16, 2, 3, 4, 5, 64, 127, 128, 256, 1000, 1024] {
        let n = usize::from(q);
        let bytes = queue_region_bytes(q);
        assert!(bytes >= HEADER_BYTES + 16 * n, "{q}");
        assert_eq!(bytes % QUEUE_REGION_ALIGN, 0, "{q}");
        assert!(bytes - (HEADER_BYTES + 16 * n) < QUEUE_REGION_ALIGN, "{q}");
        // libvhost-user rounds 16·n + 2 up to 64 bytes, DPDK 16·n + 16: the
        // same for every n, so a buffer sized by either maps here.
        assert_eq!(bytes, (16 * n + 2).next_multiple_of(64), "{q}");
    }
    assert_eq!(queue_region_bytes(128), 2112);
    assert_eq!(region_bytes(2, 128), 4224);
}

#[test]
fn create_makes_a_sealed_zeroed_buffer_of_the_exact_size() {
    let (msg, file) = create(&request(2, 128), LIMITS).unwrap();
    assert_eq!(msg.mmap_size, 4224);
    assert_eq!(msg.mmap_offset, 0);
    assert_eq!((msg.num_queues, msg.queue_size), (2, 128));
    assert_eq!(file.metadata().unwrap().len(), 4224);
    let seals = rustix::fs::fcntl_get_seals(&file).unwrap();
    assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
    assert!(file.set_len(64).is_err(), "a sealed buffer cannot shrink");
    let mut all = vec![1u8; 4224];
    file.read_exact_at(&mut all, 0).unwrap();
    assert!(
        all.iter().all(|&b| b == 0),
        "every queue starts at version 0"
    );
}

#[test]
fn create_refuses_what_the_export_cannot_serve() {
    for (q, s) in [(0, 128), (3, 128), (1, 0), (1, 257)] {
        assert!(
            matches!(
                create(&request(q, s), LIMITS),
                Err(InflightError::Queues { .. } | InflightError::QueueSize { .. })
            ),
            "{q} queues of {s}"
        );
    }
}

#[test]
fn fields_sit_where_the_spec_puts_them() {
    let (file, _msg, region) = fresh(2, 8);
    // Queue 1, so the per-queue offset counts too.
    let mut q = region.queue(1).unwrap();
    assert!(region.queue(2).is_none());
    assert_eq!(q.recover(ring(8, 40)).unwrap(), Recovery::Fresh);
    let base = queue_region_bytes(8);
    assert_eq!(read_u64(&file, base), 0, "features");
    assert_eq!(read_u16(&file, base + 8), 1, "version");
    assert_eq!(read_u16(&file, base + 10), 8, "desc_num");
    assert_eq!(read_u16(&file, base + 14), 40, "used_idx");
    // Queue 0 is untouched.
    assert_eq!(read_u16(&file, 8), 0);

    q.mark(3);
    let d3 = desc_at(8, 1, 3);
    assert_eq!(read::<1>(&file, d3), [1], "inflight");
    assert_eq!(read_u64(&file, d3 + 8), 1, "counter");
    q.mark(5);
    assert_eq!(read_u64(&file, desc_at(8, 1, 5) + 8), 2, "counter");
    q.link(3);
    assert_eq!(
        read_u16(&file, d3 + 6),
        0,
        "next: the previous last_batch_head"
    );
    assert_eq!(read_u16(&file, base + 12), 3, "last_batch_head");
    q.clear(3, 41);
    assert_eq!(read::<1>(&file, d3), [0]);
    assert_eq!(read_u16(&file, base + 14), 41);
    q.link(5);
    assert_eq!(read_u16(&file, desc_at(8, 1, 5) + 6), 3, "next");
    assert_eq!(read_u16(&file, base + 12), 5);
    // Padding stays zero.
    assert_eq!(read::<5>(&file, d3 + 1), [0; 5]);
}

#[test]
fn heads_past_the_ring_are_not_tracked() {
    let (file, _msg, region) = fresh(1, 8);
    let mut q = region.queue(0).unwrap();
    q.recover(ring(8, 0)).unwrap();
    let before: Vec<u8> = {
        let mut b = vec![0; region_bytes(1, 8)];
        file.read_exact_at(&mut b, 0).unwrap();
        b
    };
    q.mark(8);
    q.link(u16::MAX);
    let mut after = vec![0; region_bytes(1, 8)];
    file.read_exact_at(&mut after, 0).unwrap();
    assert_eq!(before, after);
}

// --- what a successor finds after a crash at every point -------------------

/// The request path's writes, one store sequence each, as the worker does
/// them: `Pop` (mark), `Link`, `Publish` (the used ring's index moves past the
/// head: the guest sees it answered), `Clear`.
#[derive(Debug, Clone, Copy)]
enum Step {
    Pop(u16),
    Link(u16),
    Publish(u16),
    Clear(u16),
}

fn complete(head: u16) -> [Step; 3] {
    [Step::Link(head), Step::Publish(head), Step::Clear(head)]
}

/// Runs `steps` on `q` (whose ring's used index is `*used`), then checks
/// that a successor mapping `file` finds exactly the heads taken and not
/// answered, in the order they were taken, and that the ring resumes where
/// it should. Returns what the successor resubmits.
fn run_and_recover(
    file: &File,
    msg: &VhostUserInflight,
    q: &mut QueueInflight,
    used: &mut u16,
    steps: &[Step],
    mut taken: Vec<u16>,
) -> Vec<u16> {
    let mut answered = HashSet::new();
    for &step in steps {
        match step {
            Step::Pop(h) => {
                q.mark(h);
                taken.push(h);
            }
            Step::Link(h) => q.link(h),
            Step::Publish(h) => {
                *used = used.wrapping_add(1);
                answered.insert(h);
            }
            Step::Clear(h) => q.clear(h, *used),
        }
    }
    let want: Vec<u16> = taken
        .iter()
        .copied()
        .filter(|h| !answered.contains(h))
        .collect();
    let mut successor = remap(file, msg, 0);
    let got = successor
        .recover(ring(q.desc_num(), *used))
        .expect("recover");
    assert_eq!(
        got,
        Recovery::Resume {
            resubmit: want.clone()
        },
        "after {steps:?}"
    );
    want
}

#[test]
fn a_successor_finds_what_was_in_flight_after_a_crash_at_any_point() {
    // Out of order: 2 (slow) is taken first and answered last; 5, 1, 7 are
    // answered in between; 6 never is.
    let mut steps = vec![Step::Pop(2), Step::Pop(5), Step::Pop(1)];
    steps.extend(complete(5));
    steps.extend(complete(1));
    steps.push(Step::Pop(7));
    steps.push(Step::Pop(6));
    steps.extend(complete(7));
    steps.extend(complete(2));
    for crash in 0..=steps.len() {
        let (file, msg, region) = fresh(1, 8);
        let mut q = region.queue(0).unwrap();
        let mut used = 100u16;
        assert_eq!(q.recover(ring(8, used)).unwrap(), Recovery::Fresh);
        let resubmit = run_and_recover(&file, &msg, &mut q, &mut used, &steps[..crash], vec![]);
        // Every head taken is answered in the used ring or resubmitted.
        let popped = steps[..crash]
            .iter()
            .filter(|s| matches!(s, Step::Pop(_)))
            .count();
        let published = steps[..crash]
            .iter()
            .filter(|s| matches!(s, Step::Publish(_)))
            .count();
        assert_eq!(resubmit.len() + published, popped, "crash after {crash}");
    }
}

#[test]
fn counters_keep_the_order_across_several_crashes() {
    let (file, msg, region) = fresh(1, 8);
    let mut q = region.queue(0).unwrap();
    let mut used = u16::MAX - 2; // the used index wraps on the way
    q.recover(ring(8, used)).unwrap();
    let first = [
        Step::Pop(4),
        Step::Pop(0),
        Step::Pop(3),
        Step::Link(0),
        Step::Publish(0),
        Step::Clear(0),
    ];
    let left = run_and_recover(&file, &msg, &mut q, &mut used, &first, vec![]);
    assert_eq!(left, [4, 3]);

    // The successor resubmits 4 and 3 (marks stay), takes 6 and 1, answers 3
    // and 6 and crashes between publishing 6 and clearing it.
    let mut successor = remap(&file, &msg, 0);
    successor.recover(ring(8, used)).unwrap();
    let second = [
        Step::Pop(6),
        Step::Pop(1),
        Step::Link(3),
        Step::Publish(3),
        Step::Clear(3),
        Step::Link(6),
        Step::Publish(6),
    ];
    let left = run_and_recover(&file, &msg, &mut successor, &mut used, &second, vec![4, 3]);
    assert_eq!(left, [4, 1]);
}

#[test]
fn a_batch_of_several_is_repaired_along_its_list() {
    // Another backend may answer in batches: all linked, the used index moved
    // by the batch, then cleared. A crash before the clears leaves the whole
    // batch marked; the list from last_batch_head says which.
    let (file, msg, region) = fresh(1, 8);
    let mut q = region.queue(0).unwrap();
    q.recover(ring(8, 10)).unwrap();
    for h in [1, 2, 3, 4] {
        q.mark(h);
    }
    q.link(3);
    q.link(1);
    q.link(4);
    // The guest's used index moves by 3 (the batch), nothing is cleared.
    let mut successor = remap(&file, &msg, 0);
    assert_eq!(
        successor.recover(ring(8, 13)).unwrap(),
        Recovery::Resume { resubmit: vec![2] }
    );
    let base = 0;
    assert_eq!(read_u16(&file, base + 14), 13, "used_idx repaired");
    for h in [1, 3, 4] {
        assert_eq!(read::<1>(&file, desc_at(8, 0, h)), [0], "{h} cleared");
    }
}

#[test]
fn nothing_in_flight_resumes_at_the_used_index() {
    let (file, msg, region) = fresh(1, 4);
    let mut q = region.queue(0).unwrap();
    q.recover(ring(4, 7)).unwrap();
    q.mark(0);
    q.link(0);
    q.clear(0, 8);
    let mut successor = remap(&file, &msg, 0);
    assert_eq!(
        successor.recover(ring(4, 8)).unwrap(),
        Recovery::Resume { resubmit: vec![] }
    );
}

// --- hostile buffers ------------------------------------------------------

fn map_err(file: &File, msg: &VhostUserInflight) -> InflightError {
    InflightRegion::map(file, msg, LIMITS).expect_err("a bad buffer must be refused")
}

#[test]
fn map_refuses_a_size_that_is_not_exact() {
    let (msg, file) = create(&request(2, 128), LIMITS).unwrap();
    for size in [0, 1, 4223, 4225, 4224 - 64, 4224 + 64, u64::MAX] {
        let bad = VhostUserInflight {
            mmap_size: size,
            ..msg
        };
        assert!(
            matches!(map_err(&file, &bad), InflightError::Size { want: 4224, .. }),
            "{size}"
        );
    }
    // The same bytes described as other queues.
    for (q, s) in [(1, 128), (2, 127), (1, 256)] {
        let bad = VhostUserInflight {
            num_queues: q,
            queue_size: s,
            ..msg
        };
        assert!(matches!(map_err(&file, &bad), InflightError::Size { .. }));
    }
    for (q, s) in [(0, 128), (3, 128), (2, 0), (2, 1024)] {
        let bad = VhostUserInflight {
            num_queues: q,
            queue_size: s,
            ..msg
        };
        assert!(matches!(
            map_err(&file, &bad),
            InflightError::Queues { .. } | InflightError::QueueSize { .. }
        ));
    }
}

#[test]
fn map_refuses_a_buffer_outside_its_file() {
    let (msg, file) = create(&request(1, 4), LIMITS).unwrap();
    let page = page_size();
    for offset in [1, 64, page - 1, page + 8, u64::MAX - 63, 1 << 63] {
        let bad = VhostUserInflight {
            mmap_offset: offset,
            ..msg
        };
        assert!(
            matches!(map_err(&file, &bad), InflightError::Offset(_)),
            "{offset}"
        );
    }
    // Page-aligned, but past the end of the 64-byte file.
    let bad = VhostUserInflight {
        mmap_offset: page,
        ..msg
    };
    assert!(matches!(
        map_err(&file, &bad),
        InflightError::PastEnd { .. }
    ));
    let bad = VhostUserInflight {
        mmap_offset: u64::MAX - page + 1,
        ..msg
    };
    assert!(matches!(
        map_err(&file, &bad),
        InflightError::PastEnd { .. } | InflightError::Offset(_)
    ));
}

#[test]
fn map_refuses_a_file_that_could_shrink() {
    let msg = VhostUserInflight {
        mmap_size: region_bytes(1, 4) as u64,
        ..request(1, 4)
    };
    // A plain file: no seals at all.
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(msg.mmap_size).unwrap();
    assert!(matches!(map_err(&plain, &msg), InflightError::NotSealed));
    // A memfd sealed against growing only.
    let fd = rustix::fs::memfd_create("t", MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, msg.mmap_size).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW).unwrap();
    assert!(matches!(
        map_err(&File::from(fd), &msg),
        InflightError::NotSealed
    ));
}

#[test]
fn map_refuses_unknown_headers() {
    let (msg, file) = create(&request(2, 8), LIMITS).unwrap();
    let q1 = queue_region_bytes(8);
    poke(&file, q1 + 8, &2u16.to_ne_bytes());
    assert!(matches!(
        map_err(&file, &msg),
        InflightError::Version {
            queue: 1,
            version: 2
        }
    ));
    poke(&file, q1 + 8, &1u16.to_ne_bytes());
    poke(&file, q1 + 10, &8u16.to_ne_bytes());
    poke(&file, q1, &1u64.to_ne_bytes());
    assert!(matches!(
        map_err(&file, &msg),
        InflightError::Features { queue: 1, .. }
    ));
    poke(&file, q1, &0u64.to_ne_bytes());
    poke(&file, q1 + 10, &7u16.to_ne_bytes());
    assert!(matches!(
        map_err(&file, &msg),
        InflightError::DescNum {
            queue: 1,
            desc_num: 7,
            queue_size: 8
        }
    ));
    poke(&file, q1 + 10, &8u16.to_ne_bytes());
    InflightRegion::map(&file, &msg, LIMITS).expect("valid again");
}

/// A queue region in use (version 1, two heads in flight), for corrupting.
fn in_use() -> (File, VhostUserInflight) {
    let (file, msg, region) = fresh(1, 8);
    let mut q = region.queue(0).unwrap();
    q.recover(ring(8, 20)).unwrap();
    q.mark(1);
    q.mark(2);
    (file, msg)
}

fn recover_err(file: &File, msg: &VhostUserInflight, used: u16) -> InflightError {
    remap(file, msg, 0)
        .recover(ring(8, used))
        .expect_err("a bad region must be refused")
}

#[test]
fn recover_refuses_hostile_regions_and_leaves_them_alone() {
    // A ring of another size than the region.
    let (file, msg) = in_use();
    assert!(matches!(
        remap(&file, &msg, 0).recover(ring(16, 20)),
        Err(InflightError::RingSize {
            ring_size: 16,
            desc_num: 8
        })
    ));
    // A flag that is neither 0 nor 1.
    poke(&file, desc_at(8, 0, 5), &[7]);
    assert!(matches!(
        recover_err(&file, &msg, 20),
        InflightError::Flag { head: 5, value: 7 }
    ));
    poke(&file, desc_at(8, 0, 5), &[0]);
    // Two heads with one counter: the order is unknown.
    poke(&file, desc_at(8, 0, 2) + 8, &1u64.to_ne_bytes());
    assert!(matches!(
        recover_err(&file, &msg, 20),
        InflightError::DuplicateCounter {
            first: 1,
            second: 2,
            counter: 1
        }
    ));
    // A counter nothing can follow.
    poke(&file, desc_at(8, 0, 2) + 8, &u64::MAX.to_ne_bytes());
    assert!(matches!(
        recover_err(&file, &msg, 20),
        InflightError::CounterExhausted { head: 2 }
    ));
    poke(&file, desc_at(8, 0, 2) + 8, &2u64.to_ne_bytes());
    // The used ring far past used_idx: a batch longer than the ring.
    assert!(matches!(
        recover_err(&file, &msg, 29),
        InflightError::BatchTooLong {
            batch: 9,
            desc_num: 8
        }
    ));
    // ... or behind it (a wrapped difference).
    assert!(matches!(
        recover_err(&file, &msg, 19),
        InflightError::BatchTooLong { .. }
    ));
    // A batch whose list leaves the ring.
    poke(&file, 12, &8u16.to_ne_bytes());
    assert!(matches!(
        recover_err(&file, &msg, 21),
        InflightError::BatchIndex {
            index: 8,
            desc_num: 8
        }
    ));
    poke(&file, 12, &1u16.to_ne_bytes());
    poke(&file, desc_at(8, 0, 1) + 6, &300u16.to_ne_bytes());
    assert!(matches!(
        recover_err(&file, &msg, 22),
        InflightError::BatchIndex { index: 300, .. }
    ));
    // More in flight than the guest ever made available.
    assert!(matches!(
        remap(&file, &msg, 0).recover(RingIndices {
            size: 8,
            used: 20,
            avail: 21
        }),
        Err(InflightError::MoreThanTaken {
            in_flight: 2,
            taken: 1
        })
    ));
    // A header changed after the map.
    let mut mapped = remap(&file, &msg, 0);
    poke(&file, 8, &9u16.to_ne_bytes());
    assert!(matches!(
        mapped.recover(ring(8, 20)),
        Err(InflightError::Version { .. })
    ));
    poke(&file, 8, &1u16.to_ne_bytes());
    // None of this wrote anything: the region still says what it said.
    assert_eq!(read_u16(&file, 14), 20, "used_idx untouched");
    assert_eq!(read::<1>(&file, desc_at(8, 0, 1)), [1]);
    assert_eq!(
        remap(&file, &msg, 0).recover(ring(8, 20)).unwrap(),
        Recovery::Resume {
            resubmit: vec![1, 2]
        }
    );
}

#[test]
fn a_cycle_in_the_batch_list_ends_with_the_batch() {
    // next links that loop (3 -> 4 -> 3 ...): the walk stops after the batch
    // size, whatever the links say.
    let (file, msg) = in_use();
    poke(&file, 12, &3u16.to_ne_bytes());
    poke(&file, desc_at(8, 0, 3) + 6, &4u16.to_ne_bytes());
    poke(&file, desc_at(8, 0, 4) + 6, &3u16.to_ne_bytes());
    assert_eq!(
        remap(&file, &msg, 0).recover(ring(8, 28)).unwrap(),
        Recovery::Resume {
            resubmit: vec![1, 2]
        }
    );
}

/// What tracking adds to each request: mark at pop, link and clear around the used
/// ring's update, 32 requests in flight. A measurement, not a check: run it with
/// `cargo test --release -p sluice --lib inflight_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn inflight_cost() {
    use std::hint::black_box;
    let (_file, _msg, region) = fresh(1, 256);
    let mut q = region.queue(0).unwrap();
    q.recover(ring(256, 0)).unwrap();
    const N: u32 = 20_000_000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut used = 0u16;
        let t = std::time::Instant::now();
        for i in 0..N {
            let popped = black_box((i % 256) as u16);
            q.mark(popped);
            let done = black_box(((i + 224) % 256) as u16);
            q.link(done);
            used = used.wrapping_add(1);
            q.clear(done, used);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(N));
    }
    eprintln!("inflight tracking: {best:.2} ns per request (mark + link + clear, best of 5)");
}
