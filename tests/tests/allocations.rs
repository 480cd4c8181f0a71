//! The request path allocates nothing: the daemon counts its heap
//! allocations (monitor method `daemon_stats`), and thousands of requests
//! through a vhost-user export must not add to the count beyond what the
//! monitor calls themselves cost.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::{pattern, serve_file, Client, Op, ServedFile, EXIT_TIMEOUT, MIB};

/// `daemon_stats`: (heap allocations, the metrics server's apart).
fn stats(control: &Path) -> (u64, u64) {
    let mut s = UnixStream::connect(control).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "daemon_stats"});
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    let reply: Value = serde_json::from_str(&line).expect("JSON");
    let field = |name: &str| reply["result"][name].as_u64().expect(name);
    (field("heap_allocations"), field("metrics_heap_allocations"))
}

fn allocations(control: &Path) -> u64 {
    stats(control).0
}

fn run_requests(client: &mut Client, q: usize, disk_bytes: u64, seed: u64) {
    // Reads and writes (aligned), a flush per batch: the common path.
    let mut ops = Vec::new();
    for i in 0..256u64 {
        let off = (i * 4096 * 7 + seed * 4096) % disk_bytes;
        if i % 2 == 0 {
            ops.push(Op::Read {
                offset: off,
                len: 4096,
            });
        } else {
            ops.push(Op::Write {
                offset: off,
                data: pattern(off, 4096, seed),
                fua: false,
            });
        }
    }
    ops.push(Op::Flush);
    let outs = client.run(q, &ops).expect("requests");
    assert!(outs.iter().all(|o| o.ret == 0), "a request failed");
}

#[test]
fn the_request_path_allocates_nothing() {
    requests_allocate_nothing(&[]);
}

/// With QoS limits that hold requests back (5140 requests at 20000 IOPS
/// with a 10 ms burst: about a quarter of a second of waiting in the queues
/// and on their timers), nothing is allocated either.
#[test]
fn throttled_requests_allocate_nothing() {
    requests_allocate_nothing(&[
        "--qos-iops",
        "20000",
        "--qos-bps",
        "1G",
        "--qos-burst",
        "0.01",
    ]);
}

fn requests_allocate_nothing(extra: &[&str]) {
    const DISK: u64 = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--queues", "2"];
    args.extend_from_slice(extra);
    let ServedFile {
        mut daemon, sock, ..
    } = serve_file(dir.path(), DISK, &args);
    let mut client = Client::connect(&sock, 2, 16).expect("connect");
    // Warm up: first requests on each queue may set up per-thread state.
    for q in 0..2 {
        run_requests(&mut client, q, DISK, 1);
    }
    // What two monitor calls cost on their own.
    let a = allocations(&daemon.control);
    let b = allocations(&daemon.control);
    let per_call = b - a;
    // The same two calls around 20 batches (5140 requests) on both queues.
    let c = allocations(&daemon.control);
    for round in 0..10u64 {
        for q in 0..2 {
            run_requests(&mut client, q, DISK, round + 2);
        }
    }
    let d = allocations(&daemon.control);
    eprintln!(
        "monitor call: {per_call} allocations; around 5140 requests: {}",
        d - c
    );
    // A few allocations of slack for the calls' own variation (longer
    // numbers in the replies); one per request would be thousands.
    assert!(
        d - c <= per_call + 4,
        "5140 requests made {} heap allocations beyond the monitor's own {per_call}",
        (d - c).saturating_sub(per_call)
    );
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// Scraping while I/O runs adds nothing to the request path's count: the
/// metrics server's thread counts its own allocations apart (a scrape
/// formats text, so it allocates), and the other threads' count over a
/// window of I/O with scrapes in parallel is what it is without them.
#[test]
fn scraping_adds_no_allocation_to_the_request_path() {
    use sluice_tests::metrics::Endpoint;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const DISK: u64 = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let ServedFile {
        mut daemon, sock, ..
    } = serve_file(
        dir.path(),
        DISK,
        &["--queues", "2", "--metrics", "127.0.0.1:0"],
    );
    let metrics = Endpoint::of(&daemon.ready);
    let mut client = Client::connect(&sock, 2, 16).expect("connect");
    for q in 0..2 {
        run_requests(&mut client, q, DISK, 1);
    }
    // A scrape before the windows, so that whatever a first scrape sets up
    // is done.
    metrics.scrape();
    let a = allocations(&daemon.control);
    let b = allocations(&daemon.control);
    let per_call = b - a;
    let window = |client: &mut Client, seed: u64| {
        let (c, mc) = stats(&daemon.control);
        for round in 0..10u64 {
            for q in 0..2 {
                run_requests(client, q, DISK, seed + round);
            }
        }
        let (d, md) = stats(&daemon.control);
        (d - c, md - mc)
    };
    let (quiet, quiet_metrics) = window(&mut client, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, metrics) = (stop.clone(), metrics.clone());
        std::thread::spawn(move || {
            let mut scrapes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                metrics.scrape();
                scrapes += 1;
            }
            scrapes
        })
    };
    let (scraped, scraped_metrics) = window(&mut client, 20);
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().expect("scraper");
    eprintln!(
        "monitor call: {per_call} allocations; 5140 requests: {quiet} without scrapes, {scraped} \
         with {scrapes} scrapes in parallel, whose server made {scraped_metrics} apart"
    );
    assert_eq!(quiet_metrics, 0, "no scrape, no metrics allocation");
    assert!(
        scrapes > 0 && scraped_metrics > 0,
        "the scrapes ran and were counted apart"
    );
    // Same slack as above: the monitor calls' own variation.
    assert!(
        quiet <= per_call + 4 && scraped <= per_call + 4,
        "5140 requests made {quiet} heap allocations without scrapes and {scraped} with \
         {scrapes} in parallel (the monitor calls alone: {per_call})"
    );
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}
