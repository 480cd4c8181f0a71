//! Draining many exports: close-all stops admitting on every export before it waits on
//! any and drains them all at once under one deadline; a second signal exits at once after
//! a flush; a forced `export-remove` answers every request it takes before it lets go.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::{
    make_file, path_str, pattern, run_to_exit, Client, Daemon, Op, WriteStorm, EXIT_TIMEOUT, MIB,
};

const DISK_BYTES: u64 = 16 * MIB;

/// `n` image files, each served over its own vhost-user socket `x<i>.sock`.
fn exports(dir: &Path, n: usize) -> (Daemon, Vec<PathBuf>) {
    let mut toml = String::new();
    let mut socks = Vec::new();
    for i in 0..n {
        let img = dir.join(format!("d{i}.img"));
        make_file(&img, DISK_BYTES);
        let sock = dir.join(format!("x{i}.sock"));
        toml += &format!(
            "[[disk]]\nname = \"d{i}\"\npath = \"{}\"\n\n[[export]]\nname = \"x{i}\"\ndisk = \"d{i}\"\ntype = \"vhost-user\"\nsocket = \"{}\"\nqueue_depth = 8\n\n",
            path_str(&img),
            path_str(&sock)
        );
        socks.push(sock);
    }
    let config = dir.join("sluice.toml");
    std::fs::write(&config, toml).expect("write config");
    (
        Daemon::spawn(&["serve", "--config", path_str(&config)], n),
        socks,
    )
}

/// A guest that keeps writing whatever happens (fio with `continue_on_error`): one
/// write at a time, errors ignored, until the connection is gone or it is told to stop.
/// Records when it last had a write acknowledged.
struct StubbornWriter {
    stop: Arc<AtomicBool>,
    last_ok: Arc<Mutex<Option<Instant>>>,
    oks: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl StubbornWriter {
    fn start(sock: &Path, seed: u64) -> StubbornWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let last_ok = Arc::new(Mutex::new(None));
        let oks = Arc::new(AtomicU64::new(0));
        let mut client = Client::connect(sock, 1, 1).expect("connect writer");
        let thread = thread::spawn({
            let (stop, last_ok, oks) = (stop.clone(), last_ok.clone(), oks.clone());
            move || {
                let mut h = client.queue(0);
                // Generous: a loaded 2-core machine can stall one write for seconds.
                h.set_timeout(Duration::from_secs(5));
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = (i * 4096) % DISK_BYTES;
                    let op = Op::Write {
                        offset,
                        data: pattern(offset, 4096, seed),
                        fua: false,
                    };
                    match h.run(&[op]) {
                        Ok(outs) if outs[0].ret == 0 => {
                            *last_ok.lock().expect("lock") = Some(Instant::now());
                            oks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        // No answer: the export is gone.
                        Err(_) => break,
                    }
                    i += 1;
                }
            }
        });
        StubbornWriter {
            stop,
            last_ok,
            oks,
            thread,
        }
    }

    /// One writer per socket, each with writes acknowledged already.
    fn on_each(socks: &[PathBuf]) -> Vec<StubbornWriter> {
        let writers: Vec<StubbornWriter> = socks
            .iter()
            .enumerate()
            .map(|(i, s)| StubbornWriter::start(s, i as u64))
            .collect();
        for w in &writers {
            w.wait_for_oks(20);
        }
        writers
    }

    fn wait_for_oks(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.oks.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "writer made no progress");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn end(self) -> Option<Instant> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        let last = *self.last_ok.lock().expect("lock");
        last
    }
}

/// Issue 9, item 4: 8 exports with writers took 57 s to exit, one export after another,
/// and the exports not yet drained kept acknowledging writes meanwhile.
#[test]
fn close_all_drains_every_export_at_once_under_one_deadline() {
    const EXPORTS: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut daemon, socks) = exports(dir.path(), EXPORTS);
    let writers = StubbornWriter::on_each(&socks);
    let sigterm = Instant::now();
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    let took = sigterm.elapsed();
    daemon.assert_exit_ok(status);
    // The writers never stop sending, so each export waits its whole quiet window
    // (DETACH_QUIET_LIMIT_MS, 5 s); in parallel that is one window, not eight.
    assert!(
        took < Duration::from_secs(12),
        "{EXPORTS} busy exports took {took:?} to close\n{}",
        daemon.stderr()
    );
    for (i, w) in writers.into_iter().enumerate() {
        let last = w.end().expect("the writer had writes acknowledged");
        // Only a write already in flight at SIGTERM may still succeed.
        assert!(
            last < sigterm + Duration::from_millis(500),
            "export x{i} acknowledged a write {:?} after SIGTERM",
            last.saturating_duration_since(sigterm)
        );
    }
}

/// A second SIGTERM during close-all says what is still pending, flushes and exits at
/// once (code 1: close-all did not finish).
#[test]
fn a_second_signal_during_close_all_flushes_and_exits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut daemon, socks) = exports(dir.path(), 2);
    let writers = StubbornWriter::on_each(&socks);
    daemon.signal(libc::SIGTERM);
    // The stubborn writers keep close-all in its drain step for 5 s.
    thread::sleep(Duration::from_millis(1000));
    assert!(
        daemon.wait(Duration::ZERO).is_none(),
        "close-all should still be waiting for the writers\n{}",
        daemon.stderr()
    );
    let second = Instant::now();
    daemon.signal(libc::SIGTERM);
    // The program's own exit is what the second signal asks for; the kernel's teardown
    // of its memory after that can take seconds on a loaded 2-core machine.
    let pid = daemon.pid();
    while !sluice_tests::main_thread_exited(pid) {
        assert!(
            second.elapsed() < Duration::from_secs(3),
            "still running 3 s after a second SIGTERM\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let took = second.elapsed();
    let status = daemon
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("not reaped after its exit\n{}", daemon.stderr()));
    assert_eq!(status.code(), Some(1), "exit status\n{}", daemon.stderr());
    assert!(
        took < Duration::from_secs(2),
        "exit took {took:?} after the second signal"
    );
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("still pending"))
        .unwrap_or_else(|| panic!("no line about the second signal\n{stderr}"));
    assert!(
        line.contains("drain") && line.contains("export x0") && line.contains("export x1"),
        "the line names the pending step and exports: {line}"
    );
    assert!(
        stderr.contains("every open node flushed"),
        "the nodes were flushed\n{stderr}"
    );
    for w in writers {
        w.end();
    }
}

/// Issue 9, item 3: `export-remove --force` with a client connected left `in_flight: 16`
/// and the client waiting forever. Forced removal answers every request it takes.
#[test]
fn forced_removal_answers_every_request_before_letting_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.img");
    make_file(&img, DISK_BYTES);
    let sock = dir.path().join("x.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&img),
            "--vhost-user",
            path_str(&sock),
            "--queue-depth",
            "16",
        ],
        1,
    );
    let mut client = Client::connect(&sock, 1, 16).expect("connect");
    let blocks = DISK_BYTES / 4096;
    let storm = WriteStorm::new(0, blocks, 16, 1_000_000, 0xF0F0);
    let removed = thread::scope(|s| {
        let h = client.queue(0);
        let storm = &storm;
        s.spawn(move || storm.run(h));
        storm
            .wait_acked(500, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
        let control = daemon.control.to_str().expect("utf-8").to_owned();
        let out = run_to_exit(&[
            "ctl",
            "--control",
            &control,
            "--json",
            "export-remove",
            "x",
            "--force",
        ]);
        storm.mark_gone();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !storm.is_done() {
            if Instant::now() >= deadline {
                storm.stop();
                panic!("the writer still runs 15 s after the forced removal");
            }
            thread::sleep(Duration::from_millis(10));
        }
        out
    });
    assert_eq!(
        removed.status.code(),
        Some(0),
        "export-remove --force: {}{}",
        removed.stdout,
        removed.stderr
    );
    let result: serde_json::Value =
        serde_json::from_str(removed.stdout.trim()).expect("JSON result");
    assert_eq!(result["stats"]["in_flight"], 0, "{result}");
    // The writer ended on an error status, not on a request nobody answered (its
    // queue gives up after 5 s without a completion).
    let end = storm.end();
    assert!(
        end.contains("failed with"),
        "the writer ended with {end:?}, not with an error status\n{}",
        daemon.stderr()
    );
    // Every acknowledged write is in the file.
    let file = std::fs::read(&img).expect("read image");
    storm.check_file(&file, "forced removal");
}

/// Issue 10: close-all waits without the control-plane lock (the monitor answers while
/// exports drain), and a `job_cancel` during close-all gets a clear error instead of
/// racing close-all's own cancel step.
#[test]
fn during_close_all_the_monitor_answers_and_refuses_job_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut daemon, socks) = exports(dir.path(), 1);
    let target = dir.path().join("target.img");
    make_file(&target, DISK_BYTES);
    let control = path_str(&daemon.control).to_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--control", control.as_str()];
        all.extend_from_slice(args);
        run_to_exit(&all)
    };
    let added = ctl(&["node-add", "tgt", path_str(&target)]);
    assert_eq!(added.status.code(), Some(0), "node-add: {}", added.stderr);
    let mirror = ctl(&["mirror", "--node", "d0", "--target", "tgt", "--id", "m0"]);
    assert_eq!(mirror.status.code(), Some(0), "mirror: {}", mirror.stderr);
    // A writer that never stops keeps close-all in its drain step for 5 s.
    let writers = StubbornWriter::on_each(&socks);
    daemon.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let nodes = ctl(&["nodes"]);
    let took = asked.elapsed();
    assert_eq!(
        nodes.status.code(),
        Some(0),
        "nodes during close-all: {}",
        nodes.stderr
    );
    assert!(
        took < Duration::from_secs(2),
        "the monitor took {took:?} to answer during close-all"
    );
    let cancel = ctl(&["job-cancel", "m0"]);
    assert_ne!(
        cancel.status.code(),
        Some(0),
        "job-cancel during close-all: {}",
        cancel.stdout
    );
    assert!(
        cancel.stderr.contains("shutting down"),
        "job-cancel during close-all says why: {}",
        cancel.stderr
    );
    let status = daemon
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", daemon.stderr()));
    daemon.assert_exit_ok(status);
    assert!(
        daemon.stderr().contains("close-all: cancel job m0"),
        "close-all cancelled the job itself\n{}",
        daemon.stderr()
    );
    for w in writers {
        w.end();
    }
}
