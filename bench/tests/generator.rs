//! The load generator against real components: the `sluice` daemon serving a null disk over
//! vhost-user (through the built `sluice-bench` binary and through the library), libblkio's
//! io_uring driver on a temporary file, and a backend that dies mid-run.
//!
//! The daemon is started by the tests' harness (`sluice_tests::Daemon`: the
//! built `<target>/debug/sluice` or `$SLUICE_BIN`); build it first with
//! `cargo build -p sluice`. Every wait here is bounded.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sluice_bench::{run, BenchError, Config, Driver, Report, Rw};
use sluice_tests::Daemon;

/// A 1 s run plus connect and set-up takes well under this.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `sluice serve` on a disk over vhost-user (the tests' harness: it waits
/// for the ready line, gives the daemon its own control socket, and kills
/// it on drop).
struct Sluice {
    daemon: Daemon,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sluice {
    fn start(disk: &str, queues: usize) -> Sluice {
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("blk.sock");
        let queues = queues.to_string();
        let args = [
            "serve",
            "--disk",
            disk,
            "--queues",
            &queues,
            "--vhost-user",
            socket.to_str().expect("utf-8 path"),
        ];
        Sluice {
            daemon: Daemon::spawn(&args, 1),
            socket,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        self.daemon.kill();
    }
}

/// Runs `f` on a helper thread and fails the test if it takes longer than `limit`.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("still running after {limit:?}: {e}"))
}

fn check_json(v: &serde_json::Value, driver: &str) {
    for key in [
        "driver",
        "path",
        "rw",
        "bs",
        "iodepth",
        "queues",
        "runtime_s",
        "ramp_s",
        "cpus",
        "elapsed_s",
        "ios",
        "read_ios",
        "write_ios",
        "iops",
        "bw_bytes_per_s",
        "bw_mib_per_s",
        "lat_ns",
        "cpu",
    ] {
        assert!(v.get(key).is_some(), "no {key:?} in {v}");
    }
    for key in ["mean", "min", "max", "p50", "p99", "p99_9"] {
        assert!(v["lat_ns"].get(key).is_some(), "no lat_ns.{key} in {v}");
    }
    for key in ["user_s", "sys_s", "total_s", "percent"] {
        assert!(v["cpu"].get(key).is_some(), "no cpu.{key} in {v}");
    }
    assert_eq!(v["driver"], driver);
    let iops = v["iops"].as_f64().expect("iops is a number");
    assert!(iops > 0.0, "no IOPS: {v}");
    assert!(v["bw_bytes_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let lat = |k: &str| {
        v["lat_ns"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("lat_ns.{k}: {v}"))
    };
    let (min, p50, p99, p999, max) = (lat("min"), lat("p50"), lat("p99"), lat("p99_9"), lat("max"));
    assert!(
        0 < min && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "latencies out of order: {v}"
    );
    let elapsed = v["elapsed_s"].as_f64().unwrap();
    assert!(
        (0.9..3.0).contains(&elapsed),
        "measured {elapsed} s of a 1 s run: {v}"
    );
    assert!(
        v["cpu"]["total_s"].as_f64().unwrap() > 0.0,
        "no client CPU time: {v}"
    );
}

fn check_report(r: &Report, driver: &str) {
    check_json(&r.to_json(), driver);
    assert!(r.ios() > 0);
    assert!(!r.human().is_empty());
}

#[test]
fn binary_randread_against_sluice_json() {
    let sluice = Sluice::start("null:64M", 2);
    let socket = sluice.socket.clone();
    let out = bounded(RUN_TIMEOUT, move || {
        Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
            .args(["--driver", "vhost-user", "--path"])
            .arg(&socket)
            .args([
                "--rw",
                "randread",
                "--bs",
                "4k",
                "--iodepth",
                "8",
                "--queues",
                "2",
                "--runtime",
                "1s",
                "--ramp",
                "200ms",
                "--cpus",
                "0",
                "--io-timeout",
                "5s",
                "--json",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("running sluice-bench")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sluice-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object on stdout: {stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    check_json(&v, "vhost-user");
    assert_eq!(v["rw"], "randread");
    assert_eq!(
        (v["iodepth"].as_u64(), v["queues"].as_u64()),
        (Some(8), Some(2))
    );
    assert_eq!(v["bs"], 4096);
    assert_eq!(v["cpus"], serde_json::json!([0]));
    assert_eq!(v["write_ios"], 0);
    assert_eq!(v["capacity_bytes"], 64 << 20);
}

#[test]
fn library_mixed_sequential_against_sluice() {
    let sluice = Sluice::start("null:64M", 2);
    let mut cfg = Config::new(Driver::VhostUser, &sluice.socket);
    cfg.rw = Rw::ReadWrite;
    cfg.rwmixread = 70;
    cfg.bs = 16 << 10;
    cfg.iodepth = 8;
    cfg.queues = 2;
    cfg.runtime = Duration::from_secs(1);
    cfg.io_timeout = Duration::from_secs(5);
    let r = bounded(RUN_TIMEOUT, move || run(&cfg)).expect("run");
    check_report(&r, "vhost-user");
    // About 70 % reads.
    let share = r.read_ios as f64 / r.ios() as f64;
    assert!((0.6..0.8).contains(&share), "read share {share}: {r:?}");
}

#[test]
fn polling_client_on_poll_queues() {
    let sluice = Sluice::start("null:64M", 2);
    let mut cfg = Config::new(Driver::VhostUser, &sluice.socket);
    cfg.rw = Rw::RandWrite;
    cfg.iodepth = 4;
    cfg.queues = 2;
    cfg.poll = true;
    cfg.runtime = Duration::from_secs(1);
    cfg.io_timeout = Duration::from_secs(5);
    let r = bounded(RUN_TIMEOUT, move || run(&cfg)).expect("run");
    check_report(&r, "vhost-user");
    assert_eq!(r.to_json()["client_poll"], true);
    assert!(r.human().contains("(polling)"), "{}", r.human());
    assert_eq!(r.read_ios, 0);
    // Polling is for the vhost-user driver only.
    let mut cfg = Config::new(Driver::IoUring, "/nonexistent");
    cfg.poll = true;
    let e = run(&cfg).unwrap_err();
    assert!(matches!(e, BenchError::PollNeedsVhostUser), "{e:?}");
    assert!(e.to_string().contains("vhost-user driver only"), "{e}");
}

#[test]
fn io_uring_randread_on_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creating the image");
    let mut cfg = Config::new(Driver::IoUring, &file);
    cfg.iodepth = 8;
    cfg.queues = 2;
    cfg.runtime = Duration::from_secs(1);
    cfg.ramp = Duration::from_millis(200);
    cfg.io_timeout = Duration::from_secs(5);
    let r = bounded(RUN_TIMEOUT, move || run(&cfg)).expect("run");
    check_report(&r, "io-uring");
    assert_eq!(r.capacity, 64 << 20);
    assert_eq!(r.write_ios, 0);
}

#[test]
fn io_uring_reports_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::new(Driver::IoUring, dir.path().join("missing.img"));
    cfg.runtime = Duration::from_millis(100);
    let e = run(&cfg).unwrap_err();
    assert!(matches!(e, BenchError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("connect"), "{e}");
}

/// A backend that dies mid-run makes the run fail within about the I/O timeout, with a
/// message, instead of hanging.
#[test]
fn dead_backend_fails_within_the_timeout() {
    let mut sluice = Sluice::start("null:64M", 1);
    let mut cfg = Config::new(Driver::VhostUser, &sluice.socket);
    cfg.iodepth = 4;
    cfg.runtime = Duration::from_secs(20);
    cfg.io_timeout = Duration::from_secs(1);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let t = Instant::now();
        let _ = tx.send((run(&cfg), t.elapsed()));
    });
    thread::sleep(Duration::from_millis(500));
    sluice.kill();
    let (result, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("run still going 10 s after its backend died");
    let e = result.expect_err("a run whose backend died must fail");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(e.to_string().contains("queue 0"), "{e}");
    eprintln!("dead backend reported as: {e}");
}
