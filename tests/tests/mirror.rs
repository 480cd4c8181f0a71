//! The mirror job against the real daemon: a live copy while a libblkio
//! client writes, completion (pivot) onto the target, cancellation, and a
//! shutdown that cancels a running job last.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{make_file, pattern, rpc, Client, Daemon, Op, EXIT_TIMEOUT, MIB};

const BLOCK: usize = 4096;

fn wait_ready(control: &Path, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = rpc(control, "job_status", json!({"id": id})).expect("job_status");
        match st["phase"].as_str() {
            Some("ready") => return st,
            Some("failed") => panic!("job failed: {st}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "job not ready after {timeout:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    dir: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    sock: PathBuf,
}

fn original(bytes: u64) -> Vec<u8> {
    let mut image = Vec::with_capacity(bytes as usize);
    for off in (0..bytes).step_by(MIB as usize) {
        image.extend_from_slice(&pattern(off, MIB as usize, 0xA11));
    }
    image
}

fn setup(bytes: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    // The source starts with data everywhere, the target with zeroes.
    std::fs::write(&source, original(bytes)).unwrap();
    make_file(&target, bytes);
    let sock = dir.path().join("vm.sock");
    Setup {
        dir,
        source,
        target,
        sock,
    }
}

fn serve(s: &Setup) -> Daemon {
    let config = s.dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\nname = \"src\"\npath = {:?}\n[[export]]\nname = \"vm\"\ndisk = \"src\"\n\
             type = \"vhost-user\"\nsocket = {:?}\nqueues = 2\n",
            s.source, s.sock
        ),
    )
    .unwrap();
    let d = Daemon::spawn(&["serve", "--config", config.to_str().unwrap()], 1);
    rpc(
        &d.control,
        "node_add",
        json!({"name": "dst", "path": s.target}),
    )
    .expect("node_add");
    d
}

#[test]
fn mirror_while_writing_then_pivot_onto_the_target() {
    const BYTES: u64 = 64 * MIB;
    let s = setup(BYTES);
    let mut daemon = serve(&s);
    let blocks = (BYTES as usize) / BLOCK;
    // The last seed written to each block (0 = never written).
    let written: Vec<AtomicU64> = (0..blocks).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let phase_counts = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            let mut client = Client::connect(&s.sock, 1, 16).expect("connect");
            let mut seed = 1u64;
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            while !stop.load(Ordering::SeqCst) {
                let mut ops = Vec::new();
                let mut seeds = Vec::new();
                for _ in 0..32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = (x % blocks as u64) as usize;
                    seed += 1;
                    let off = (b * BLOCK) as u64;
                    ops.push(Op::Write {
                        offset: off,
                        data: pattern(off, BLOCK, seed),
                        fua: false,
                    });
                    seeds.push((b, seed));
                }
                // One block written twice in a batch may land in either order:
                // keep batches free of duplicates.
                seeds.sort_unstable();
                seeds.dedup_by_key(|(b, _)| *b);
                if seeds.len() < ops.len() {
                    continue;
                }
                let outs = client.run(0, &ops).expect("writes");
                assert!(outs.iter().all(|o| o.ret == 0), "a write failed");
                for (b, seed) in seeds {
                    written[b].store(seed, Ordering::SeqCst);
                }
                phase_counts
                    .lock()
                    .unwrap()
                    .push((Instant::now(), ops.len()));
                // No pause: the writer saturates the export. The job still
                // becomes ready because, once in sync, writes go to both
                // nodes (write-blocking).
            }
        });

        std::thread::sleep(Duration::from_millis(500));
        let job = rpc(
            &daemon.control,
            "job_mirror",
            json!({"node": "src", "target": "dst", "id": "m0"}),
        )
        .expect("job_mirror");
        assert_eq!(job["id"], "m0");
        assert_eq!(job["total_bytes"], BYTES);
        // Held by the job now: the target cannot be removed.
        let err = rpc(&daemon.control, "node_remove", json!({"name": "dst"})).unwrap_err();
        assert!(err["message"].as_str().unwrap().contains("job m0"), "{err}");
        let started = Instant::now();
        let st = wait_ready(&daemon.control, "m0", Duration::from_secs(60));
        eprintln!(
            "mirror of {BYTES} bytes ready after {:?}: {st}",
            started.elapsed()
        );
        // Still writing while the pivot happens.
        std::thread::sleep(Duration::from_millis(300));
        let done = rpc(&daemon.control, "job_complete", json!({"id": "m0"})).expect("job_complete");
        assert_eq!(done["done_bytes"], BYTES);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
    });

    // The export now serves the target, the job is gone, the source is
    // held by the monitor only.
    let exports = rpc(&daemon.control, "export_list", json!({})).unwrap();
    assert_eq!(exports[0]["node"], "dst", "{exports}");
    assert_eq!(
        rpc(&daemon.control, "job_list", json!({})).unwrap(),
        json!([])
    );
    let nodes = rpc(&daemon.control, "node_list", json!({})).unwrap();
    let src = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "src")
        .unwrap();
    assert_eq!(src["holders"], json!([{"kind": "monitor"}]), "{nodes}");
    // A write after the pivot goes to the target only.
    let mut client = Client::connect(&s.sock, 1, 4).expect("connect after pivot");
    assert_eq!(client.write(0, &pattern(0, BLOCK, 0xFEED)), 0);
    drop(client);
    // Once the monitor lets go of the source, nothing in the daemon keeps
    // it open: every queue left it at the pivot.
    assert!(holds_open(daemon.pid(), &s.source), "the monitor holds src");
    rpc(&daemon.control, "node_remove", json!({"name": "src"})).expect("node_remove src");
    let held = holds_open(daemon.pid(), &s.source);
    assert!(!held, "the daemon still has {} open", s.source.display());
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);

    let src = std::fs::read(&s.source).unwrap();
    let dst = std::fs::read(&s.target).unwrap();
    assert_eq!(&dst[..BLOCK], &pattern(0, BLOCK, 0xFEED)[..]);
    assert_ne!(
        &src[..BLOCK],
        &pattern(0, BLOCK, 0xFEED)[..],
        "post-pivot write reached the source"
    );
    // Every block of the target holds the last write to it (or the
    // original data): nothing acknowledged before or across the pivot is
    // missing.
    let orig = original(BYTES);
    for b in 1..blocks {
        let off = (b * BLOCK) as u64;
        let seed = written[b].load(Ordering::SeqCst);
        let want = if seed == 0 {
            orig[b * BLOCK..(b + 1) * BLOCK].to_vec()
        } else {
            pattern(off, BLOCK, seed)
        };
        assert!(
            dst[b * BLOCK..(b + 1) * BLOCK] == want[..],
            "target block {b} (seed {seed}) differs"
        );
    }
    let counts = phase_counts.into_inner().unwrap();
    eprintln!("client wrote {} batches during the test", counts.len());
}

/// Whether process `pid` has a descriptor open on `path`.
fn holds_open(pid: u32, path: &std::path::Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == path))
}

/// Starts a mirror of 128 MiB that is slow on purpose (small chunks, one at
/// a time), so that it is still running when the test acts.
fn start_slow_mirror(daemon: &Daemon, id: &str) {
    rpc(
        &daemon.control,
        "job_mirror",
        json!({"node": "src", "target": "dst", "id": id, "chunk_bytes": 65536, "max_in_flight": 1}),
    )
    .expect("job_mirror");
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn cancel_midway_leaves_source_and_export_untouched() {
    const BYTES: u64 = 128 * MIB;
    let s = setup(BYTES);
    let mut daemon = serve(&s);
    start_slow_mirror(&daemon, "slow");
    let st = rpc(&daemon.control, "job_status", json!({"id": "slow"})).unwrap();
    assert_eq!(st["phase"], "running", "{st}");
    let err = rpc(&daemon.control, "job_complete", json!({"id": "slow"})).unwrap_err();
    assert!(
        err["message"].as_str().unwrap().contains("not ready"),
        "{err}"
    );
    rpc(&daemon.control, "job_cancel", json!({"id": "slow"})).expect("job_cancel");
    assert_eq!(
        rpc(&daemon.control, "job_list", json!({})).unwrap(),
        json!([])
    );
    let err = rpc(&daemon.control, "job_status", json!({"id": "slow"})).unwrap_err();
    assert_eq!(err["code"], -32001);
    // The export still serves the source; the target is free again.
    let mut client = Client::connect(&s.sock, 1, 4).expect("connect");
    let data = client.read(5 * MIB, BLOCK).expect("read");
    assert_eq!(data, pattern(5 * MIB, BLOCK, 0xA11));
    assert_eq!(client.write(0, &pattern(0, BLOCK, 7)), 0);
    drop(client);
    rpc(&daemon.control, "node_remove", json!({"name": "dst"})).expect("target released");
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_eq!(
        &std::fs::read(&s.source).unwrap()[..BLOCK],
        &pattern(0, BLOCK, 7)[..]
    );
}

#[test]
fn shutdown_cancels_a_running_job_last() {
    const BYTES: u64 = 128 * MIB;
    let s = setup(BYTES);
    let mut daemon = serve(&s);
    start_slow_mirror(&daemon, "late");
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    let log = daemon.stderr();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
    };
    let steps = [
        at("close-all: drain export vm"),
        at("close-all: detach export vm"),
        at("close-all: flush node"),
        at("close-all: cancel job late"),
    ];
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "close-all steps out of order:\n{log}"
    );
}

#[test]
fn completed_mirror_is_byte_for_byte_the_source() {
    const BYTES: u64 = 32 * MIB;
    let s = setup(BYTES);
    let mut daemon = serve(&s);
    // Some writes before the job, so the source is not just the original.
    let mut client = Client::connect(&s.sock, 1, 8).expect("connect");
    for i in 0..64u64 {
        let off = i * 7 * 65536 % BYTES;
        assert_eq!(client.write(off, &pattern(off, BLOCK, 0xB0 + i)), 0);
    }
    rpc(
        &daemon.control,
        "job_mirror",
        json!({"node": "src", "target": "dst", "id": "m"}),
    )
    .expect("job_mirror");
    wait_ready(&daemon.control, "m", Duration::from_secs(60));
    rpc(&daemon.control, "job_complete", json!({"id": "m"})).expect("job_complete");
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    let src = std::fs::read(&s.source).unwrap();
    let dst = std::fs::read(&s.target).unwrap();
    assert_eq!(src.len(), dst.len());
    if let Some(at) = src.iter().zip(&dst).position(|(a, b)| a != b) {
        panic!("target differs from the source at byte {at}");
    }
}
