//! `sluice ctl --json events` against the real daemon: each event the control plane and
//! the vhost-user connection thread emit, caused for real (monitor calls through `sluice
//! ctl`, a mirror job between small image files, a libblkio client connecting and leaving),
//! read as the JSON lines the command prints.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{
    make_file, path_str, run_to_exit, sluice_bin, Client, Daemon, EXIT_TIMEOUT, MIB,
};

/// Bound on one event arriving after the test caused it (a mirror of a few MiB included).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// `sluice ctl --json events`, its lines read by a thread of its own.
struct Events {
    child: Child,
    lines: Receiver<String>,
}

impl Events {
    fn subscribe(control: &Path) -> Events {
        let mut child = Command::new(sluice_bin())
            .args(["ctl", "--control", path_str(control), "--json", "events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sluice ctl events");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Events { child, lines }
    }

    /// [`Events::subscribe`], returning once the subscription is live: the command has
    /// its answer when it first prints, so a probe node is added (and removed) until its
    /// `node_added` (and `node_closed`) come through.
    fn subscribe_live(control: &Path) -> Events {
        let events = Events::subscribe(control);
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let first = loop {
            ctl(
                control,
                "node_add",
                json!({"name": "probe", "path": "null:1M"}),
            );
            if let Ok(line) = events.lines.recv_timeout(Duration::from_millis(200)) {
                break serde_json::from_str::<Value>(&line).unwrap();
            }
            ctl(control, "node_remove", json!({"name": "probe"}));
            // Subscribed in between: its node_closed, and the next node_add's event follows.
            let _ = events.lines.recv_timeout(Duration::from_millis(200));
            assert!(Instant::now() < deadline, "events never subscribed");
        };
        assert_eq!(
            first,
            json!({"event": "node_added", "node": "probe", "disk": "null:1M",
                   "capacity_bytes": MIB})
        );
        ctl(control, "node_remove", json!({"name": "probe"}));
        events.expect(json!({"event": "node_closed", "node": "probe"}));
        events
    }

    /// The next event, as its JSON line parsed.
    fn next(&self, waiting_for: &str) -> Value {
        let line = self.lines.recv_timeout(EVENT_TIMEOUT).unwrap_or_else(|e| {
            panic!("no event within {EVENT_TIMEOUT:?} waiting for {waiting_for}: {e}")
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"))
    }

    /// The next event, which must be `want` (compared whole).
    fn expect(&self, want: Value) {
        let got = self.next(&want.to_string());
        assert_eq!(got, want);
    }

    /// No event comes for `quiet`.
    fn expect_none(&self, quiet: Duration) {
        if let Ok(line) = self.lines.recv_timeout(quiet) {
            panic!("unexpected event: {line}");
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl(control: &Path, method: &str, params: Value) -> Value {
    let f = run_to_exit(&[
        "ctl",
        "--control",
        path_str(control),
        "--json",
        "call",
        method,
        &params.to_string(),
    ]);
    assert!(f.status.success(), "{method} {params}: {}", f.stderr);
    serde_json::from_str(&f.stdout).unwrap()
}

#[test]
fn every_event_comes_as_one_json_line_when_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, tgt, back) = (d.join("src.img"), d.join("tgt.img"), d.join("back.img"));
    for f in [&src, &tgt, &back] {
        make_file(f, 4 * MIB);
    }
    let vm0 = d.join("vm0.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&src),
            "--vhost-user",
            path_str(&vm0),
        ],
        1,
    );
    let control = daemon.control.clone();
    let events = Events::subscribe_live(&control);

    // An export added and served: a frontend connects and leaves; removed.
    ctl(
        &control,
        "node_add",
        json!({"name": "extra", "path": "null:8M"}),
    );
    events.expect(
        json!({"event": "node_added", "node": "extra", "disk": "null:8M",
                         "capacity_bytes": 8 * MIB}),
    );
    let vm2 = d.join("vm2.sock");
    ctl(
        &control,
        "export_add",
        json!({"name": "vm2", "node": "extra", "type": "vhost-user", "socket": path_str(&vm2)}),
    );
    events.expect(
        json!({"event": "export_added", "export": "vm2", "node": "extra",
                         "type": "vhost-user", "socket": path_str(&vm2)}),
    );
    let mut client = Client::connect(&vm2, 1, 4).expect("libblkio connects");
    events.expect(json!({"event": "frontend_connected", "export": "vm2"}));
    assert_eq!(client.write(0, &[1u8; 4096]), 0);
    events.expect_none(Duration::from_millis(300));
    drop(client);
    events.expect(json!({"event": "frontend_disconnected", "export": "vm2"}));
    ctl(&control, "export_remove", json!({"name": "vm2"}));
    events.expect(json!({"event": "export_removed", "export": "vm2", "node": "extra"}));
    // The monitor still holds the node: it is closed only by node_remove.
    ctl(&control, "node_remove", json!({"name": "extra"}));
    events.expect(json!({"event": "node_closed", "node": "extra"}));

    // A mirror: progress (when it starts), ready, completed.
    ctl(
        &control,
        "node_add",
        json!({"name": "tgt", "path": path_str(&tgt)}),
    );
    events.expect(
        json!({"event": "node_added", "node": "tgt", "disk": path_str(&tgt),
                         "capacity_bytes": 4 * MIB}),
    );
    let started = Instant::now();
    ctl(
        &control,
        "job_mirror",
        json!({"node": "disk0", "target": "tgt", "id": "m1"}),
    );
    let mut progress = Vec::new();
    let ready = loop {
        let e = events.next("job_ready");
        if e["event"] != "job_progress" {
            break e;
        }
        assert_eq!(e["job"], "m1", "{e}");
        assert_eq!(e["total_bytes"], 4 * MIB, "{e}");
        let (done, dirty) = (
            e["done_bytes"].as_u64().unwrap(),
            e["dirty_bytes"].as_u64().unwrap(),
        );
        assert!(done + dirty <= 4 * MIB, "{e}");
        progress.push(done);
    };
    assert_eq!(
        ready,
        json!({"event": "job_ready", "job": "m1", "total_bytes": 4 * MIB})
    );
    // The first progress event comes when the copy starts, the next ones at most once a
    // second.
    assert!(!progress.is_empty(), "no job_progress before job_ready");
    let seconds = started.elapsed().as_secs();
    assert!(
        progress.len() as u64 <= seconds + 1,
        "{} progress events in {seconds} s",
        progress.len()
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    ctl(&control, "job_complete", json!({"id": "m1"}));
    events.expect(
        json!({"event": "job_completed", "job": "m1", "source": "disk0",
                         "target": "tgt", "exports": ["vm0"]}),
    );

    // A mirror cancelled: vm0 serves tgt now; copy it to another image.
    ctl(
        &control,
        "node_add",
        json!({"name": "back", "path": path_str(&back)}),
    );
    events.expect(
        json!({"event": "node_added", "node": "back", "disk": path_str(&back),
                         "capacity_bytes": 4 * MIB}),
    );
    ctl(
        &control,
        "job_mirror",
        json!({"node": "tgt", "target": "back", "id": "m2"}),
    );
    let e = events.next("m2's first progress");
    assert_eq!(
        (e["event"].as_str(), e["job"].as_str()),
        (Some("job_progress"), Some("m2")),
        "{e}"
    );
    // It may be ready before the cancel.
    ctl(&control, "job_cancel", json!({"id": "m2"}));
    let mut e = events.next("job_cancelled");
    while e["event"] == "job_progress" || e["event"] == "job_ready" {
        assert_eq!(e["job"], "m2", "{e}");
        e = events.next("job_cancelled");
    }
    assert_eq!(e, json!({"event": "job_cancelled", "job": "m2"}));
    events.expect_none(Duration::from_millis(300));

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// A mirror whose target's writes fail (a FUSE file that answers every write EIO, as a
/// drive with bad media does) ends with one `job_failed` event that says what failed.
#[test]
fn a_mirror_whose_target_fails_writes_sends_job_failed() {
    if let Err(why) = sluice_tests::needs_fuse() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_file(&disk, 4 * MIB);
    let mut bad = sluice_tests::HangingFile::start(dir.path(), 4 * MIB).expect("hangfs");
    let sock = dir.path().join("vm0.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&disk),
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    let control = daemon.control.clone();
    let events = Events::subscribe_live(&control);
    ctl(
        &control,
        "node_add",
        json!({"name": "bad", "path": path_str(bad.path())}),
    );
    assert_eq!(events.next("node_added")["event"], "node_added");
    bad.fail_writes().expect("hangfs failing writes");
    ctl(
        &control,
        "job_mirror",
        json!({"node": "disk0", "target": "bad", "id": "m"}),
    );
    let mut e = events.next("job_failed");
    while e["event"] == "job_progress" {
        e = events.next("job_failed");
    }
    assert_eq!(e["event"], "job_failed", "{e}");
    assert_eq!(e["job"], "m", "{e}");
    let error = e["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("target") && error.contains("error"),
        "the error must say the target's write failed: {e}"
    );
    events.expect_none(Duration::from_millis(300));
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    drop(bad);
}
