//! A daemon that lives for months gives back what each client took: 10,000 frontend
//! connections to one export, some of them doing I/O, leave its descriptors, threads and
//! resident memory where they were.

use std::time::{Duration, Instant};

use sluice_tests::{make_file, pattern, Client, Daemon, Resources, EXIT_TIMEOUT, MIB};

/// Connections in the soak (issue 9: "connects and disconnects a frontend 10,000 times").
const SOAK_CONNECTIONS: usize = 10_000;
/// Every this many connections does I/O (a write and its read-back on each queue).
const IO_EVERY: usize = 10;
/// Resident memory may end this much above where it was after warm-up (allocator caches,
/// the latency histograms' pages being touched): a leak of even 1 KiB per connection
/// would exceed it by far.
const RSS_TOLERANCE_KIB: u64 = 2048;
/// Queues of the export (each connection gets one worker thread and engine per queue).
const QUEUES: usize = 2;

#[test]
fn ten_thousand_connections_leave_descriptors_threads_and_memory_as_they_were() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("soak.sock");
    let sock_arg = sock.to_str().expect("utf-8");
    let image = dir.path().join("soak.img");
    make_file(&image, 64 * MIB);
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            image.to_str().expect("utf-8"),
            "--vhost-user",
            sock_arg,
            "--queues",
            "2",
            "--queue-depth",
            "8",
        ],
        1,
    );
    let connect = || Client::connect(&sock, QUEUES, 4).expect("connect");
    let io = |c: &mut Client, i: usize| {
        let off = (i as u64 * 4096) % (32 * MIB);
        let data = pattern(off, 4096, i as u64);
        assert_eq!(c.write(off, &data), 0, "write on connection {i}");
        let back = c.read(off, 4096).expect("read back");
        assert!(
            back == data,
            "connection {i}: read back differs from what it wrote"
        );
    };
    // Warm-up: the first connections size the allocator's caches and touch the pages
    // every connection uses; measure from there.
    for i in 0..20 {
        let mut c = connect();
        io(&mut c, i);
    }
    wait_for_idle_threads(&daemon);
    let start = daemon.resources();
    let started = Instant::now();
    for i in 0..SOAK_CONNECTIONS {
        let mut c = connect();
        if i % IO_EVERY == 0 {
            io(&mut c, i);
        }
        drop(c);
    }
    let took = started.elapsed();
    wait_for_idle_threads(&daemon);
    let end = daemon.resources();
    eprintln!("{SOAK_CONNECTIONS} connections in {took:?}: start {start:?}, end {end:?}");
    assert_eq!(
        (end.fds, end.eventfds),
        (start.fds, start.eventfds),
        "descriptors (all, eventfds) after {SOAK_CONNECTIONS} connections"
    );
    assert_eq!(
        end.threads, start.threads,
        "threads after {SOAK_CONNECTIONS} connections"
    );
    assert!(
        end.rss_kib <= start.rss_kib + RSS_TOLERANCE_KIB,
        "RSS grew from {} to {} KiB over {SOAK_CONNECTIONS} connections (tolerance {RSS_TOLERANCE_KIB} KiB)",
        start.rss_kib,
        end.rss_kib
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// A connection's worker threads are joined just after the frontend leaves; wait until the
/// thread count has been steady for a moment (bounded).
fn wait_for_idle_threads(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last: Option<Resources> = None;
    while Instant::now() < deadline {
        let now = daemon.resources();
        if last.is_some_and(|l| l.threads == now.threads && l.fds == now.fds) {
            return;
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(200));
    }
}
