//! `--metrics`: the real daemon scraped over TCP and a UNIX socket while a
//! libblkio client does I/O; the counters must be exactly what the client
//! did, and promtool must accept the text.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::metrics::{exists, promtool_check, Endpoint, Response};
use sluice_tests::{
    assert_all_ok, path_str, pattern, run_to_exit, serve_file, Client, Op, Resources, ServedFile,
    EXIT_TIMEOUT, MIB,
};

const DISK: u64 = 64 * MIB;

fn assert_promtool_accepts(text: &str) {
    match promtool_check(text) {
        None => eprintln!("skipped: promtool not installed (tests/run.sh installs it)"),
        Some(Ok(())) => {}
        Some(Err(said)) => panic!("promtool check metrics refused the scrape:\n{said}\n{text}"),
    }
}

/// `q`'s label set on export `vm`.
fn q(queue: &str) -> [(&str, &str); 4] {
    [
        ("export", "vm"),
        ("node", "disk0"),
        ("type", "vhost-user"),
        ("queue", queue),
    ]
}

#[test]
fn counters_are_what_the_client_did() {
    let dir = tempfile::tempdir().unwrap();
    let ServedFile {
        mut daemon, sock, ..
    } = serve_file(
        dir.path(),
        DISK,
        &["--queues", "2", "--metrics", "127.0.0.1:0"],
    );
    let metrics = Endpoint::of(&daemon.ready);
    assert!(metrics.0.starts_with("127.0.0.1:"), "{metrics:?}");
    let before = metrics.scrape();
    assert_eq!(
        before.count("sluice_node_capacity_bytes", &[("node", "disk0")]),
        DISK
    );
    assert_eq!(
        before.count("sluice_node_state", &[("node", "disk0"), ("state", "open")]),
        1
    );
    assert_eq!(
        before.count(
            "sluice_node_state",
            &[("node", "disk0"), ("state", "removed")]
        ),
        0
    );
    assert_eq!(
        before.count(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1
    );
    let started = before.sum("process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 120.0,
        "start time {started}, now {now}"
    );
    let base = |name: &str| before.count(name, &[("export", "vm")]);
    let base_other = base("sluice_other_requests_completed_total");
    let base_count = base("sluice_request_duration_seconds_count");

    // Scrape all along while the client works.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, metrics) = (stop.clone(), metrics.clone());
        std::thread::spawn(move || {
            let (mut scrapes, mut reads) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let now = metrics.scrape().count("sluice_reads_completed_total", &[]);
                assert!(reads <= now && now <= 309, "reads {reads}, then {now}");
                reads = now;
                scrapes += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            scrapes
        })
    };
    let mut client = Client::connect(&sock, 2, 16).expect("connect");
    // Queue 0: 300 reads of 4 KiB, 200 writes of 8 KiB, 7 flushes (no FUA:
    // libblkio sends a FUA write as a write and a flush to a device without
    // FUA, as a file is).
    let mut ops = Vec::new();
    for i in 0..300u64 {
        ops.push(Op::Read {
            offset: (i * 4096 * 13) % DISK,
            len: 4096,
        });
        if i < 200 {
            let offset = (i * 8192 * 5) % DISK;
            ops.push(Op::Write {
                offset,
                data: pattern(offset, 8192, 1),
                fua: false,
            });
        }
        if i % 50 == 0 && i < 350 {
            ops.push(Op::Flush);
        }
    }
    ops.push(Op::Flush);
    assert_all_ok("queue 0", &client.run(0, &ops).expect("queue 0"));
    // Queue 1: 5 discards and 3 write-zeroes of 64 KiB, 9 reads of 512 bytes.
    let mut ops = Vec::new();
    for i in 0..5u64 {
        ops.push(Op::Discard {
            offset: i * 65536,
            len: 65536,
        });
    }
    for i in 0..3u64 {
        ops.push(Op::WriteZeroes {
            offset: MIB + i * 65536,
            len: 65536,
            unmap: false,
        });
    }
    for i in 0..9u64 {
        ops.push(Op::Read {
            offset: i * 512,
            len: 512,
        });
    }
    assert_all_ok("queue 1", &client.run(1, &ops).expect("queue 1"));
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().expect("scraper");
    assert!(scrapes > 0);

    let after = metrics.scrape();
    let n = |name: &str, queue: &str| after.count(name, &q(queue));
    assert_eq!(n("sluice_reads_completed_total", "0"), 300);
    assert_eq!(n("sluice_reads_completed_total", "1"), 9);
    assert_eq!(n("sluice_writes_completed_total", "0"), 200);
    assert_eq!(n("sluice_writes_completed_total", "1"), 0);
    assert_eq!(n("sluice_flushes_completed_total", "0"), 7);
    assert_eq!(n("sluice_discards_completed_total", "1"), 5);
    assert_eq!(n("sluice_write_zeroes_completed_total", "1"), 3);
    assert_eq!(n("sluice_read_bytes_total", "0"), 300 * 4096);
    assert_eq!(n("sluice_read_bytes_total", "1"), 9 * 512);
    assert_eq!(n("sluice_written_bytes_total", "0"), 200 * 8192);
    for queue in ["0", "1"] {
        assert_eq!(n("sluice_requests_in_flight", queue), 0, "at rest");
        assert_eq!(n("sluice_request_errors_total", queue), 0);
        assert!(
            after.sum("sluice_queue_polling_seconds_total", &q(queue)) > 0.0,
            "queue {queue} worked"
        );
    }
    assert_eq!(
        after
            .matching("sluice_request_errors_total", &q("0"))
            .count(),
        4,
        "one series per error kind"
    );
    // The histogram counts every request answered: those above, and any
    // GET_ID the client sent.
    let other = after.count("sluice_other_requests_completed_total", &[("export", "vm")]);
    let completed = 300 + 9 + 200 + 7 + 5 + 3 + (other - base_other);
    let hist = [("export", "vm"), ("node", "disk0"), ("type", "vhost-user")];
    assert_eq!(
        after.count("sluice_request_duration_seconds_count", &hist) - base_count,
        completed
    );
    // Buckets are cumulative, end at +Inf with the count, and run from
    // 1.536 µs to 2^30 ns.
    let buckets: Vec<(f64, f64)> = after
        .matching("sluice_request_duration_seconds_bucket", &hist)
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s.value)
        })
        .collect();
    assert_eq!(buckets.len(), 41);
    assert_eq!(buckets[0].0, 1.536e-6);
    assert_eq!(buckets[39].0, (1u64 << 30) as f64 / 1e9);
    assert!(buckets
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    assert_eq!(
        buckets[40].1,
        after.sum("sluice_request_duration_seconds_count", &hist)
    );
    let sum = after.sum("sluice_request_duration_seconds_sum", &hist);
    assert!(sum > 0.0 && sum < completed as f64 * 10.0, "{sum}");
    assert_promtool_accepts(&after.text);

    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

#[test]
fn unix_socket_other_paths_and_bad_clients() {
    let dir = tempfile::tempdir().unwrap();
    let msock = dir.path().join("metrics.sock");
    let ServedFile {
        mut daemon, sock, ..
    } = serve_file(
        dir.path(),
        DISK,
        &["--metrics", &format!("unix:{}", path_str(&msock))],
    );
    let metrics = Endpoint::of(&daemon.ready);
    assert_eq!(metrics.0, format!("unix:{}", path_str(&msock)));
    let mut client = Client::connect(&sock, 1, 4).expect("connect");
    assert_eq!(client.write(0, &pattern(0, 4096, 3)), 0);
    let first = metrics.scrape();
    assert_eq!(first.count("sluice_writes_completed_total", &q("0")), 1);
    assert_eq!(first.count("sluice_written_bytes_total", &q("0")), 4096);
    assert_promtool_accepts(&first.text);

    // Another path, another method, HEAD.
    let r = metrics.get("/");
    assert_eq!(r.status, 404, "{r:?}");
    let r = metrics.get("/metrics/");
    assert_eq!(r.status, 404, "{r:?}");
    let r = Response::parse(
        &metrics
            .exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap(),
    );
    assert_eq!(r.status, 405, "{r:?}");
    let r = Response::parse(&metrics.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n").unwrap());
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.is_empty(), "HEAD has no body");
    // Malformed: not HTTP, a head that never ends, a client that hangs up
    // mid-request, and one that says nothing (the server waits for it at
    // most its request timeout, 2 s, before it serves the next).
    let r = Response::parse(&metrics.exchange(b"\x16\x03\x01 hello\r\n\r\n").unwrap());
    assert_eq!(r.status, 400, "{r:?}");
    let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(10_000));
    let r = Response::parse(&metrics.exchange(long.as_bytes()).unwrap());
    assert_eq!(r.status, 400, "{r:?}");
    {
        let mut s = UnixStream::connect(&msock).unwrap();
        s.write_all(b"GET /met").unwrap();
    }
    let threads = Resources::of(daemon.pid()).threads;
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&msock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        Resources::of(daemon.pid()).threads,
        threads,
        "silent clients cost no thread"
    );
    let t = Instant::now();
    let mut silent_answer = Vec::new();
    let mut first_silent = &silent[0];
    first_silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server closes a client that sent nothing in time, unanswered.
    assert_eq!(first_silent.read_to_end(&mut silent_answer).unwrap(), 0);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(silent);
    let again = metrics.scrape();
    assert_eq!(again.count("sluice_writes_completed_total", &q("0")), 1);
    assert!(client.read(0, 4096).is_ok(), "the daemon still serves I/O");

    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert!(!exists(&msock), "the metrics socket is removed at exit");
}

#[test]
fn an_address_in_use_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_to_exit(&[
        "serve",
        "--disk",
        "null:16M",
        "--vhost-user",
        path_str(&sock),
        "--control",
        path_str(&dir.path().join("c.sock")),
        "--metrics",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("metrics address {addr}: cannot listen"))
            && out.stderr.contains("choose another address"),
        "{}",
        out.stderr
    );
    assert!(!exists(&sock), "nothing is left behind");
    assert!(!exists(&dir.path().join("c.sock")));
    // And one that is not an address at all is refused before anything starts.
    let out = run_to_exit(&[
        "serve",
        "--disk",
        "null:16M",
        "--vhost-user",
        path_str(&sock),
        "--metrics",
        "localhost:9412",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("metrics address \"localhost:9412\""),
        "{}",
        out.stderr
    );
    drop(taken);
}
