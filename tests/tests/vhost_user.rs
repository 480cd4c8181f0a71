//! The vhost-user-blk export, driven through its socket by libblkio (and, where libblkio
//! cannot say it, by a raw virtio-blk client): data integrity across queues, FUA, discard,
//! write-zeroes, bounds, read-only, null nodes, loop devices, reconnects and SIGTERM with
//! requests in flight.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::{
    assert_all_ok, assert_gone, first_difference, make_file, needs_root_and_loop, path_str,
    pattern, Client, ClientOpts, Daemon, LoopDevice, Op, RawClient, WriteStorm, EXIT_TIMEOUT, MIB,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK,
};

const DISK_BYTES: u64 = 64 * MIB;
const BLOCK: usize = 4096;

/// A tempdir with a 64 MiB zero file `disk.img` and a socket path `vm.sock` in it.
struct Setup {
    _dir: tempfile::TempDir,
    file: PathBuf,
    sock: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, DISK_BYTES);
    let sock = dir.path().join("vm.sock");
    Setup {
        _dir: dir,
        file,
        sock,
    }
}

fn serve_args(disk: &str, sock: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--disk".into(),
        disk.into(),
        "--vhost-user".into(),
        sock.to_str().expect("utf-8 path").into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn connect(sock: &Path, queues: usize, depth: usize) -> Client {
    Client::connect(sock, queues, depth).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Reads the backing file with std::fs (buffered: coherent with the daemon's O_DIRECT
/// writes, which invalidate the page cache).
fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn check_ready_event(d: &Daemon, sock: &Path, capacity: u64, queues: u64, depth: u64, ro: bool) {
    assert_eq!(d.ready.len(), 1, "ready events: {:?}", d.ready);
    let ev = &d.ready[0];
    assert_eq!(ev["type"], "vhost-user", "ready event {ev}");
    assert_eq!(ev["socket"], path_str(sock), "ready event {ev}");
    assert_eq!(ev["capacity_bytes"], capacity, "ready event {ev}");
    assert_eq!(ev["queues"], queues, "ready event {ev}");
    assert_eq!(ev["queue_depth"], depth, "ready event {ev}");
    assert_eq!(ev["read_only"], ro, "ready event {ev}");
    assert!(ev["export"].is_string(), "ready event {ev}");
    assert!(ev["disk"].is_string(), "ready event {ev}");
}

/// 2048 4 KiB blocks (8 MiB) spread over the 64 MiB disk, one per 32 KiB, at a varying
/// position inside each 32 KiB stretch.
fn spread_blocks() -> Vec<u64> {
    (0..2048u64)
        .map(|b| b * 32 * 1024 + (b % 8) * BLOCK as u64)
        .collect()
}

const SEED: u64 = 0x5115_CE00;

/// Test 1 (both backings): distinct patterns written through 2 queues at depth 32 (each
/// queue its own blocks and seed, both queues at once), flushed, read back crosswise (each
/// queue reads the other's blocks) and compared; then SIGTERM → exit 0, socket removed,
/// and the backing store holds exactly those bytes and zeroes elsewhere.
fn two_queue_roundtrip(disk_arg: &str, sock: &Path) -> Vec<u8> {
    let mut daemon = Daemon::spawn(
        &serve_args(disk_arg, sock, &["--queues", "2", "--queue-depth", "32"]),
        1,
    );
    check_ready_event(&daemon, sock, DISK_BYTES, 2, 32, false);
    let mut client = connect(sock, 2, 32);
    assert_eq!(client.capacity, DISK_BYTES, "capacity seen by libblkio");

    let blocks = spread_blocks();
    let writes: Vec<Vec<Op>> = (0..2)
        .map(|q| {
            blocks
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == q)
                .map(|(_, &off)| Op::Write {
                    offset: off,
                    data: pattern(off, BLOCK, SEED + q as u64),
                    fua: false,
                })
                .collect()
        })
        .collect();
    {
        let handles = client.queues_mut();
        std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .zip(&writes)
                .enumerate()
                .map(|(q, (mut h, ops))| {
                    s.spawn(move || {
                        let outs = h.run(ops).unwrap_or_else(|e| panic!("queue {q}: {e}"));
                        assert_all_ok(&format!("writes on queue {q}"), &outs);
                        let flush = h.run(&[Op::Flush]).unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(flush[0].ret, 0, "flush on queue {q}");
                    })
                })
                .collect();
            for j in joins {
                j.join().expect("queue thread");
            }
        });
    }

    // Read back crosswise: queue q reads what queue 1-q wrote.
    for q in 0..2 {
        let other = 1 - q;
        let offs: Vec<u64> = blocks
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == other)
            .map(|(_, &o)| o)
            .collect();
        let ops: Vec<Op> = offs
            .iter()
            .map(|&offset| Op::Read { offset, len: BLOCK })
            .collect();
        let outs = client.run(q, &ops).unwrap_or_else(|e| panic!("{e}"));
        assert_all_ok(&format!("reads on queue {q}"), &outs);
        for (off, out) in offs.iter().zip(&outs) {
            let want = pattern(*off, BLOCK, SEED + other as u64);
            if let Some(d) = first_difference("read back", *off, &out.data, &want) {
                panic!("{d}");
            }
        }
    }

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(sock);
    drop(client);

    let mut image = vec![0u8; DISK_BYTES as usize];
    for (i, &off) in blocks.iter().enumerate() {
        let at = off as usize;
        image[at..at + BLOCK].copy_from_slice(&pattern(off, BLOCK, SEED + (i % 2) as u64));
    }
    image
}

fn compare_image(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = first_difference(what, 0, got, want) {
        panic!("{d}");
    }
}

#[test]
fn two_queues_patterns_flush_sigterm_file() {
    let s = setup();
    let image = two_queue_roundtrip(path_str(&s.file), &s.sock);
    compare_image("backing file after exit", &read_file(&s.file), &image);
}

#[test]
fn two_queues_patterns_flush_sigterm_loop_device() {
    if let Err(reason) = needs_root_and_loop() {
        eprintln!("skipped: needs root and a loop device: {reason}");
        return;
    }
    let s = setup();
    let image = {
        let dev = LoopDevice::attach(&s.file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            dev.direct_io(),
            Some(true),
            "loop device without direct I/O"
        );
        two_queue_roundtrip(path_str(dev.path()), &s.sock)
        // The loop device is detached here, before the file is read.
    };
    compare_image("loop backing file after exit", &read_file(&s.file), &image);
}

/// Test 2: FUA writes (`BLKIO_REQ_FUA`; libblkio turns them into write + flush because
/// virtio-blk has no FUA bit) succeed and land; discard succeeds; write-zeroes with and
/// without unmap read back zeroes and leave the neighbours alone; GET_ID returns the serial.
#[test]
fn fua_discard_write_zeroes_and_serial() {
    let s = setup();
    let serial = "sluice-serial-1";
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--queue-depth", "16", "--serial", serial],
        ),
        1,
    );
    let mut client = connect(&s.sock, 1, 16);

    // FUA writes at depth, then check them both through the export and in the file.
    let fua_offs: Vec<u64> = (0..64u64).map(|i| 8 * MIB + i * 64 * 1024).collect();
    let ops: Vec<Op> = fua_offs
        .iter()
        .map(|&off| Op::Write {
            offset: off,
            data: pattern(off, BLOCK, 0xF0A),
            fua: true,
        })
        .collect();
    let outs = client.run(0, &ops).unwrap_or_else(|e| panic!("{e}"));
    assert_all_ok("FUA writes", &outs);
    let file_now = read_file(&s.file);
    for &off in &fua_offs {
        let want = pattern(off, BLOCK, 0xF0A);
        let got = client.read(off, BLOCK).expect("read after FUA write");
        if let Some(d) = first_difference("FUA write read back", off, &got, &want) {
            panic!("{d}");
        }
        let at = off as usize;
        if let Some(d) =
            first_difference("FUA write in file", off, &file_now[at..at + BLOCK], &want)
        {
            panic!("{d}");
        }
    }

    // Discard: succeeds (contents afterwards are unspecified by virtio).
    let disc = 16 * MIB;
    assert_eq!(
        client.write(disc, &pattern(disc, 128 * 1024, 0xD15)),
        0,
        "write before discard"
    );
    let max_discard = client.get_u64("max-discard-len").unwrap_or(0);
    eprintln!(
        "device limits: max-discard-len {max_discard} discard-alignment {:?} max-write-zeroes-len {:?}",
        client.get_i32("discard-alignment"),
        client.get_u64("max-write-zeroes-len")
    );
    assert_eq!(client.discard(disc, MIB), 0, "discard of 1 MiB");
    assert!(client.read(disc, BLOCK).is_ok(), "read after discard");

    // Write zeroes: with unmap allowed and with NO_UNMAP, each over 1 MiB in the middle of
    // a 3 MiB stretch of pattern.
    let base = 32 * MIB;
    for i in 0..24u64 {
        let off = base + i * 128 * 1024;
        assert_eq!(
            client.write(off, &pattern(off, 128 * 1024, 0x2E)),
            0,
            "pattern write"
        );
    }
    assert_eq!(
        client.write_zeroes(base + MIB, MIB / 2, true),
        0,
        "write zeroes (unmap)"
    );
    assert_eq!(
        client.write_zeroes(base + MIB + MIB / 2, MIB / 2, false),
        0,
        "write zeroes (NO_UNMAP)"
    );
    for i in 0..24u64 {
        let off = base + i * 128 * 1024;
        let got = client
            .read(off, 128 * 1024)
            .expect("read after write zeroes");
        let zeroed = (8..16).contains(&i);
        let want = if zeroed {
            vec![0u8; 128 * 1024]
        } else {
            pattern(off, 128 * 1024, 0x2E)
        };
        if let Some(d) = first_difference("after write zeroes", off, &got, &want) {
            panic!("{d}");
        }
    }

    // GET_ID: libblkio cannot send it, so a raw virtio-blk client does, after libblkio has
    // disconnected (a vhost-user backend serves one frontend at a time).
    drop(client);
    let mut raw = RawClient::connect(&s.sock).unwrap_or_else(|e| panic!("{e}"));
    let (status, id) = raw.get_id().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, VIRTIO_BLK_S_OK, "GET_ID status");
    let mut want = serial.as_bytes().to_vec();
    want.resize(VIRTIO_BLK_ID_BYTES, 0);
    assert_eq!(id, want, "GET_ID answer {:?}", String::from_utf8_lossy(&id));
    drop(raw);

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// Test 3: reads and writes beyond or straddling the capacity fail (negative ret), alone
/// and mixed with good requests at depth; the export keeps serving, the file does not grow.
#[test]
fn out_of_range_requests_fail_and_export_keeps_serving() {
    let s = setup();
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--queue-depth", "8", "--poll-us", "50"],
        ),
        1,
    );
    let mut client = connect(&s.sock, 1, 8);
    let cap = client.capacity;
    assert_eq!(cap, DISK_BYTES);
    let bad_offsets = [
        (cap, BLOCK),                    // starts at the end
        (cap - BLOCK as u64, 2 * BLOCK), // straddles the end
        (cap - 512, 1024),               // straddles by one sector
        (cap + MIB, BLOCK),              // far beyond
        (1u64 << 50, BLOCK),             // very far beyond
    ];
    for &(offset, len) in &bad_offsets {
        let r = client.read(offset, len);
        assert!(
            r.is_err(),
            "read of {len} at {offset:#x} (capacity {cap:#x}) succeeded"
        );
        let good = client.read(0, BLOCK);
        assert!(good.is_ok(), "good read after bad read failed: {good:?}");
        let ret = client.write(offset, &pattern(offset, len, 7));
        assert!(
            ret < 0,
            "write of {len} at {offset:#x} (capacity {cap:#x}) returned {ret}"
        );
        let good = client.read(cap - BLOCK as u64, BLOCK);
        assert!(
            good.is_ok(),
            "good read of the last block after bad write: {good:?}"
        );
    }
    // Mixed at depth: every other request is out of range.
    let mut ops = Vec::new();
    for i in 0..16u64 {
        if i % 2 == 0 {
            ops.push(Op::Write {
                offset: cap - BLOCK as u64 + (i % 4) * 512,
                data: pattern(0, 2 * BLOCK, i),
                fua: false,
            });
        } else {
            let offset = i * MIB;
            ops.push(Op::Write {
                offset,
                data: pattern(offset, BLOCK, i),
                fua: false,
            });
        }
    }
    let outs = client.run(0, &ops).unwrap_or_else(|e| panic!("{e}"));
    for (i, o) in outs.iter().enumerate() {
        if i % 2 == 0 {
            assert!(o.ret < 0, "straddling write {i} returned {}", o.ret);
        } else {
            assert_eq!(o.ret, 0, "good write {i} between bad ones");
        }
    }
    for i in (1..16u64).step_by(2) {
        let offset = i * MIB;
        let got = client.read(offset, BLOCK).expect("read back");
        if let Some(d) = first_difference("good write", offset, &got, &pattern(offset, BLOCK, i)) {
            panic!("{d}");
        }
    }
    // The last block is writable and the file did not grow.
    let last = cap - BLOCK as u64;
    assert_eq!(
        client.write(last, &pattern(last, BLOCK, 9)),
        0,
        "write of the last block"
    );
    assert_eq!(
        client.read(last, BLOCK).expect("read last"),
        pattern(last, BLOCK, 9)
    );
    assert_eq!(
        std::fs::metadata(&s.file).expect("stat").len(),
        DISK_BYTES,
        "backing file size changed"
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// Test 4: a `--read-only` export advertises read-only (libblkio refuses to start a
/// read-write connection), serves reads, and refuses writes that a frontend sends anyway
/// (raw client, which does not negotiate `VIRTIO_BLK_F_RO`); the file is unchanged.
#[test]
fn read_only_export_refuses_writes() {
    let s = setup();
    let original = pattern(0, 2 * MIB as usize, 0x0EAD);
    std::fs::write(&s.file, &original).expect("prefill");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.file)
        .expect("open");
    f.set_len(DISK_BYTES).expect("set_len");
    drop(f);
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--read-only", "--queue-depth", "4"],
        ),
        1,
    );
    check_ready_event(&daemon, &s.sock, DISK_BYTES, 1, 4, true);

    // libblkio without read-only: start must fail with EROFS because the export offers
    // VIRTIO_BLK_F_RO.
    match Client::connect(&s.sock, 1, 4) {
        Ok(_) => panic!("read-write libblkio connection to a read-only export started"),
        Err(e) => assert!(
            e.contains("start") && e.to_lowercase().contains("read-only"),
            "unexpected error: {e}"
        ),
    }

    // libblkio with read-only: reads work.
    let mut opts = ClientOpts::new(1, 4);
    opts.read_only = true;
    let mut client = Client::connect_with(&s.sock, opts).unwrap_or_else(|e| panic!("{e}"));
    let got = client
        .read(4096, BLOCK)
        .expect("read from read-only export");
    assert_eq!(
        got,
        original[4096..4096 + BLOCK],
        "read from read-only export"
    );
    assert!(client.write(0, &[0u8; BLOCK]) < 0, "libblkio write");
    drop(client);

    // A frontend that ignores the read-only bit: the write must fail and change nothing.
    let mut raw = RawClient::connect(&s.sock).unwrap_or_else(|e| panic!("{e}"));
    let status = raw
        .write(0, &pattern(0, BLOCK, 0xBAD))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        status, VIRTIO_BLK_S_OK,
        "write to a read-only export succeeded"
    );
    let (status, got) = raw.read(0, BLOCK).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, VIRTIO_BLK_S_OK, "raw read status");
    assert_eq!(got, original[..BLOCK], "data after refused write");
    drop(raw);

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_eq!(
        read_file(&s.file)[..original.len()],
        original[..],
        "read-only backing file changed"
    );
}

/// Test 5: a `null:64M` node has a 64 MiB capacity and answers reads with zeroes (the
/// buffers hold 0xAA before each read).
#[test]
fn null_node_reads_zeroes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("null.sock");
    let mut daemon = Daemon::spawn(
        &serve_args("null:64M", &sock, &["--queues", "2", "--queue-depth", "32"]),
        1,
    );
    check_ready_event(&daemon, &sock, DISK_BYTES, 2, 32, false);
    let mut client = connect(&sock, 2, 32);
    assert_eq!(client.capacity, DISK_BYTES);
    for q in 0..2 {
        let ops: Vec<Op> = (0..128u64)
            .map(|i| Op::Read {
                offset: (i * 509 * 4096 + q as u64 * 8192) % (DISK_BYTES - 64 * 1024),
                len: 64 * 1024,
            })
            .collect();
        let outs = client.run(q, &ops).unwrap_or_else(|e| panic!("{e}"));
        assert_all_ok("null reads", &outs);
        for (op, out) in ops.iter().zip(&outs) {
            assert!(
                out.data.iter().all(|&b| b == 0),
                "null read {op:?} returned non-zero bytes"
            );
        }
    }
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&sock);
}

/// Test 6: after the first client disconnects, a second one connects and sees what the
/// first wrote; what the second writes is visible to a third.
#[test]
fn second_client_sees_first_clients_data() {
    let s = setup();
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--queues", "2", "--queue-depth", "8"],
        ),
        1,
    );
    let offs: Vec<u64> = (0..32u64).map(|i| i * 2 * MIB + 12288).collect();
    {
        let mut first = connect(&s.sock, 2, 8);
        let ops: Vec<Op> = offs
            .iter()
            .map(|&o| Op::Write {
                offset: o,
                data: pattern(o, BLOCK, 1),
                fua: false,
            })
            .collect();
        let outs = first.run(1, &ops).unwrap_or_else(|e| panic!("{e}"));
        assert_all_ok("first client's writes", &outs);
    }
    {
        let mut second = connect(&s.sock, 1, 8);
        for &o in &offs {
            let got = second.read(o, BLOCK).expect("second client's read");
            if let Some(d) = first_difference("second client", o, &got, &pattern(o, BLOCK, 1)) {
                panic!("{d}");
            }
        }
        assert_eq!(second.write(offs[3], &pattern(offs[3], BLOCK, 2)), 0);
    }
    {
        let mut third = connect(&s.sock, 2, 4);
        let got = third.read(offs[3], BLOCK).expect("third client's read");
        assert_eq!(got, pattern(offs[3], BLOCK, 2), "third client");
    }
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&s.sock);
}

/// Test 7: SIGTERM while a thread keeps queue 0 busy with writes at depth 32: the daemon
/// exits 0 within a bounded time and removes its socket, and every write acknowledged
/// before it went away is in the file (a block may also hold a later, unacknowledged write
/// of the same block, never anything else).
#[test]
fn sigterm_with_writes_in_flight_keeps_acknowledged_writes() {
    const BLOCKS: u64 = DISK_BYTES / BLOCK as u64;
    const CHUNK: u64 = 256;
    const MAX_WRITES: u64 = 8 * BLOCKS; // bound the worker even if SIGTERM is ignored
    let s = setup();
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--queues", "2", "--queue-depth", "32"],
        ),
        1,
    );
    let mut client = connect(&s.sock, 2, 32);

    let storm = WriteStorm::new(0, BLOCKS, CHUNK, MAX_WRITES, 0);

    let status = std::thread::scope(|sc| {
        let h = client.queue(0);
        let storm = &storm;
        let worker = sc.spawn(move || storm.run(h));

        // Let some writes complete, then signal while the worker is mid-stream.
        if let Err(failure) = storm.wait_acked(300, Duration::from_secs(30)) {
            // wait_acked stopped the worker; the kill unblocks it before the scope joins it.
            daemon.kill();
            panic!(
                "before SIGTERM: {failure}\n--- stderr ---\n{}",
                daemon.stderr()
            );
        }
        let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
        worker.join().expect("worker thread");
        status
    });
    daemon.assert_exit_ok(status);
    assert_gone(&s.sock);
    eprintln!(
        "worker: {} acknowledged, {} submitted, ended with: {}",
        storm.acked_count(),
        storm.submitted(),
        storm.end()
    );
    drop(client);

    // Each acknowledged write, or a later write of the same block, is in the file.
    let checked = storm.check_file(&read_file(&s.file), "disk.img");
    assert!(checked >= 300, "only {checked} blocks checked");
}

/// Memory the frontend maps while a queue is busy (vhost-user `ADD_MEM_REG` after start,
/// as libblkio does for every buffer region and QEMU does on memory hotplug) is usable by
/// that queue: requests whose buffers live in the new region succeed and land. A queue
/// that keeps using the map it had when it woke up fails them ("data buffer outside guest
/// memory"). Whether the queue is still busy when the region arrives depends on timing,
/// so a backend with that bug fails this test often, not always; a correct one never.
#[test]
fn memory_mapped_while_queue_busy_is_used() {
    const WRITES: u64 = 6000;
    let s = setup();
    let mut daemon = Daemon::spawn(
        &serve_args(
            path_str(&s.file),
            &s.sock,
            &["--queue-depth", "32", "--poll-us", "1000"],
        ),
        1,
    );
    let mut client = connect(&s.sock, 1, 32);
    let switch = AtomicUsize::new(0);
    let switched_at = AtomicUsize::new(usize::MAX);
    let acked = AtomicUsize::new(0);
    let outs = std::thread::scope(|sc| {
        let (mut h, mut mapper) = client.queue_and_mapper(0);
        h.set_buffer_switch(&switch);
        let (acked, switched_at) = (&acked, &switched_at);
        let ops: Vec<Op> = (0..WRITES)
            .map(|w| {
                let off = (w * BLOCK as u64) % DISK_BYTES;
                Op::Write {
                    offset: off,
                    data: pattern(off, BLOCK, 0x3E3),
                    fua: false,
                }
            })
            .collect();
        let worker = sc.spawn(move || {
            h.run_with(&ops, |_, _| {
                acked.fetch_add(1, Ordering::SeqCst);
            })
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::SeqCst) < 500 && !worker.is_finished() {
            assert!(Instant::now() < deadline, "500 writes took over 30 s");
            std::thread::sleep(Duration::from_micros(200));
        }
        let addr = mapper.map_buffers().unwrap_or_else(|e| panic!("{e}"));
        switched_at.store(acked.load(Ordering::SeqCst), Ordering::SeqCst);
        switch.store(addr, Ordering::SeqCst);
        worker.join().expect("worker")
    });
    let outs = outs.unwrap_or_else(|e| panic!("{e}"));
    let switched_at = switched_at.load(Ordering::SeqCst);
    let failed: Vec<usize> = (0..outs.len()).filter(|&i| outs[i].ret != 0).collect();
    assert!(
        failed.is_empty(),
        "{} of {WRITES} writes failed (first {:?}; buffers switched to the new region after \
         about {switched_at} completions)",
        failed.len(),
        &failed[..failed.len().min(8)]
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    drop(client);
    let file = read_file(&s.file);
    for w in (0..WRITES).step_by(97) {
        let off = (w * BLOCK as u64) % DISK_BYTES;
        let at = off as usize;
        if let Some(d) = first_difference(
            "write",
            off,
            &file[at..at + BLOCK],
            &pattern(off, BLOCK, 0x3E3),
        ) {
            panic!("{d}");
        }
    }
}
