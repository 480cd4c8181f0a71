//! `sluice ctl top` against the real daemon with libblkio doing I/O: in a real terminal
//! (a detached tmux session of a fixed size, read with `capture-pane`, typed into with
//! `send-keys`), and off a terminal (the one-snapshot plain table). Also the
//! `export_counters` method the view is computed from.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{
    assert_all_ok, path_str, run_to_exit, sluice_bin, Client, Daemon, Op, EXIT_TIMEOUT,
};

const BLOCK: usize = 4096;
/// Bound on the screen showing what the test waits for.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The view's columns (the snapshot's header, and the screen's).
const HEADER: [&str; 12] = [
    "export", "type", "node", "IOPS", "r/s", "w/s", "rMB/s", "wMB/s", "avg µs", "p99 µs",
    "inflight", "err/s",
];

fn serve(dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("vm0.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:64M",
            "--vhost-user",
            path_str(&sock),
            "--queues",
            "2",
        ],
        1,
    );
    (daemon, sock)
}

/// A batch of reads on queue 0 and writes on queue 1.
fn io_batch(client: &mut Client, n: u64) -> (u64, u64) {
    let reads: Vec<Op> = (0..n)
        .map(|i| Op::Read {
            offset: i * BLOCK as u64,
            len: BLOCK,
        })
        .collect();
    let writes: Vec<Op> = (0..n)
        .map(|i| Op::Write {
            offset: i * BLOCK as u64,
            data: vec![7; BLOCK],
            fua: false,
        })
        .collect();
    assert_all_ok("reads", &client.run(0, &reads).expect("reads"));
    assert_all_ok("writes", &client.run(1, &writes).expect("writes"));
    (n, n)
}

/// A tmux server of the test's own (its socket in the test's directory), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// `None` (the test skips) when tmux is not installed.
    fn start(dir: &Path, command: &str) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            eprintln!("SKIP: tmux is not installed (tests/run.sh installs it)");
            return None;
        }
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let out = tmux
            .cmd(&["new-session", "-d", "-x", "120", "-y", "30", command])
            .output()
            .expect("tmux new-session");
        assert!(out.status.success(), "tmux new-session: {out:?}");
        Some(tmux)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        c
    }

    fn output(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.output(&["capture-pane", "-p", "-t", "0"])
    }

    fn keys(&self, keys: &str) {
        self.output(&["send-keys", "-t", "0", keys]);
    }

    /// Whether the pane shows the alternate screen (a full-screen program is on).
    fn alternate_on(&self) -> bool {
        self.output(&["display-message", "-p", "-t", "0", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits until `cond` holds for the screen, doing `between` meanwhile; returns it.
    fn wait_screen(
        &self,
        what: &str,
        mut between: impl FnMut(),
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not on the screen within {SCREEN_TIMEOUT:?}:\n{screen}"
            );
            between();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]).output();
    }
}

/// The cells of the screen line (or table line) whose first cell is `name`.
fn row<'s>(screen: &'s str, name: &str) -> Option<Vec<&'s str>> {
    screen.lines().find_map(|l| {
        let cells: Vec<&str> = l
            .split(|c: char| c == '│' || c.is_whitespace())
            .filter(|c| !c.is_empty())
            .collect();
        (cells.first() == Some(&name)).then_some(cells)
    })
}

fn number(cell: &str) -> f64 {
    cell.parse()
        .unwrap_or_else(|e| panic!("{cell:?} is not a number: {e}"))
}

/// The command tmux runs: top, then what the terminal is like once it returned.
fn top_then_report(control: &Path) -> String {
    format!(
        "sh -c '{} ctl --control {} top --interval-ms 200; rc=$?; \
         echo \"top exited $rc, modes: $(stty -a | tr \" ;\" \"\\n\\n\" \
         | grep -x -e icanon -e -icanon -e echo -e -echo | tr \"\\n\" \" \")END-OF-TOP\"; \
         sleep 600'",
        sluice_bin().display(),
        control.display()
    )
}

#[test]
fn top_in_a_terminal_shows_the_load_queues_on_p_and_restores_the_terminal_on_q() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, sock) = serve(dir.path());
    let Some(tmux) = Tmux::start(dir.path(), &top_then_report(&daemon.control)) else {
        return;
    };
    let mut client = Client::connect(&sock, 2, 16).expect("libblkio connects");

    let screen = tmux.wait_screen(
        "the vm0 row with IOPS > 0",
        || {
            io_batch(&mut client, 64);
        },
        |s| row(s, "vm0").is_some_and(|r| r.len() == HEADER.len() && number(r[3]) > 0.0),
    );
    let header: Vec<&str> = screen
        .lines()
        .find(|l| l.contains("IOPS"))
        .expect("a header")
        .split("  ")
        .map(|c| c.trim_matches(|c: char| c == '│' || c.is_whitespace()))
        .filter(|c| !c.is_empty())
        .collect();
    // "avg µs" and "p99 µs" hold one space each: compare the header's words.
    let words: Vec<&str> = header.iter().flat_map(|c| c.split(' ')).collect();
    let want: Vec<&str> = HEADER.iter().flat_map(|c| c.split(' ')).collect();
    assert_eq!(words, want, "{screen}");
    let vm0 = row(&screen, "vm0").unwrap();
    assert_eq!(&vm0[1..3], ["vhost-user", "disk0"], "{screen}");
    // The batches read and write: both kinds are counted, and add up to the IOPS.
    assert!(number(vm0[4]) > 0.0 && number(vm0[5]) > 0.0, "{screen}");
    assert!(
        (number(vm0[4]) + number(vm0[5]) - number(vm0[3])).abs() <= 1.0,
        "{screen}"
    );
    assert!(number(vm0[6]) > 0.0 || number(vm0[7]) > 0.0, "{screen}");
    assert!(screen.contains("q quit") && screen.contains("p per-queue rows (off)"));
    assert!(row(&screen, "vm0/q0").is_none(), "{screen}");
    assert!(tmux.alternate_on(), "top runs on the alternate screen");

    tmux.keys("p");
    let screen = tmux.wait_screen(
        "the queue rows after p",
        || {
            io_batch(&mut client, 16);
        },
        |s| row(s, "vm0/q0").is_some() && row(s, "vm0/q1").is_some(),
    );
    assert!(screen.contains("p per-queue rows (on)"), "{screen}");
    assert_eq!(row(&screen, "vm0/q1").unwrap()[1], "queue", "{screen}");

    tmux.keys("q");
    let screen = tmux.wait_screen("top's exit", || {}, |s| s.contains("END-OF-TOP"));
    // Restored: the normal screen, in canonical mode with echo.
    assert!(
        screen.contains("top exited 0, modes: icanon echo END-OF-TOP"),
        "{screen}"
    );
    assert!(!tmux.alternate_on(), "{screen}");
    assert!(!screen.contains("IOPS"), "the view is gone: {screen}");
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

#[test]
fn top_says_the_daemon_went_away_and_exits_1_with_the_terminal_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, _sock) = serve(dir.path());
    let Some(tmux) = Tmux::start(dir.path(), &top_then_report(&daemon.control)) else {
        return;
    };
    tmux.wait_screen("the vm0 row", || {}, |s| row(s, "vm0").is_some());
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    let screen = tmux.wait_screen("top's exit", || {}, |s| s.contains("END-OF-TOP"));
    assert!(
        screen.contains("top exited 1, modes: icanon echo END-OF-TOP"),
        "{screen}"
    );
    let message = screen.replace('\n', "");
    assert!(
        message.contains(&format!(
            "sluice ctl top: the daemon at {} went away",
            daemon.control.display()
        )),
        "{screen}"
    );
    assert!(!tmux.alternate_on(), "{screen}");
}

#[test]
fn top_off_a_terminal_prints_one_snapshot_and_export_counters_count_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, sock) = serve(dir.path());
    let mut client = Client::connect(&sock, 2, 16).expect("libblkio connects");
    let out = tempfile::tempfile().unwrap();
    let mut top = Command::new(sluice_bin())
        .args(["ctl", "--control", path_str(&daemon.control)])
        .args(["top", "--interval-ms", "500", "--per-queue"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sluice ctl top");
    let (mut reads, mut writes) = (0, 0);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = top.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "top still running");
        let (r, w) = io_batch(&mut client, 32);
        reads += r;
        writes += w;
    };
    assert!(status.success(), "{status:?}");
    let text = {
        use std::io::{Read, Seek};
        let mut f = out;
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    };
    let table: Vec<Vec<&str>> = text
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(table[0], HEADER, "{text}");
    assert_eq!(table.len(), 4, "an export row and two queue rows: {text}");
    let find = |name: &str| {
        table
            .iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("no {name} row: {text}"))
    };
    let (vm0, q0, q1) = (find("vm0"), find("vm0/q0"), find("vm0/q1"));
    assert_eq!(vm0.len(), 12, "{text}");
    // Queue 0 only reads, queue 1 only writes, 4 KiB each: r/s and w/s are the IOPS,
    // MB/s = IOPS × 4096 / 10^6.
    let (iops0, iops1) = (number(q0[3]), number(q1[3]));
    assert!(iops0 > 0.0 && iops1 > 0.0, "{text}");
    assert_eq!(
        (q0[3], q0[5], q1[3], q1[4]),
        (q0[4], "0", q1[5], "0"),
        "{text}"
    );
    assert_eq!((q0[7], q1[6]), ("0.00", "0.00"), "{text}");
    let mb = |iops: f64| iops * BLOCK as f64 / 1e6;
    assert!(
        (number(q0[6]) - mb(iops0)).abs() <= 0.01 + mb(1.0),
        "{text}"
    );
    assert!(
        (number(q1[7]) - mb(iops1)).abs() <= 0.01 + mb(1.0),
        "{text}"
    );
    assert!((number(vm0[3]) - iops0 - iops1).abs() <= 1.0, "{text}");
    assert!(number(vm0[8]) > 0.0 && number(vm0[9]) >= number(q0[9]).min(number(q1[9])));
    assert_eq!(vm0[11], "0", "{text}");

    // The counters the view comes from: every request, once the client is idle.
    let f = run_to_exit(&[
        "ctl",
        "--control",
        path_str(&daemon.control),
        "--json",
        "call",
        "export_counters",
    ]);
    assert!(f.status.success(), "{}", f.stderr);
    let v: Value = serde_json::from_str(&f.stdout).unwrap();
    assert!(v["monotonic_ns"].as_u64().unwrap() > 0);
    let x = &v["exports"][0];
    assert_eq!(
        (x["export"].as_str(), x["type"].as_str()),
        (Some("vm0"), Some("vhost-user"))
    );
    let q = |i: usize, k: &str| x["queues"][i][k].as_u64().unwrap();
    assert_eq!((q(0, "queue"), q(1, "queue")), (0, 1));
    assert_eq!(
        (q(0, "requests"), q(0, "bytes_read"), q(0, "bytes_written")),
        (reads, reads * 4096, 0)
    );
    assert_eq!(
        (q(1, "requests"), q(1, "bytes_written"), q(1, "bytes_read")),
        (writes, writes * 4096, 0)
    );
    for i in 0..2 {
        assert_eq!(q(i, "in_flight"), 0);
        assert_eq!(q(i, "errors"), 0);
        let buckets = x["queues"][i]["latency"].as_array().unwrap();
        let counted: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
        assert_eq!(
            counted,
            q(i, "requests"),
            "every request is in the histogram"
        );
        let bounds: Vec<u64> = buckets
            .iter()
            .map(|b| b["upper_ns"].as_u64().unwrap())
            .collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        assert!(buckets.iter().all(|b| b["count"].as_u64().unwrap() > 0));
    }
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}
