//! Issue 10: a node whose I/O hangs (a FUSE file that stops answering, see
//! `tests/fuse/hangfs.py` and [`HangingFile`]) may cost requests, never the
//! shutdown: SIGTERM still ends the daemon within close-all's bound (README
//! "Faults": 30 s, `CLOSE_ALL_TIMEOUT_MS`), exit code 1, and the log names what
//! did not finish. When the daemon misses the bound, the failure message
//! carries where every thread of it waits (`/proc/PID/task/*/stack` and gdb).
//! A thread waiting for a FUSE answer cannot die until the server answers or
//! goes away, so "exits" means sluice's main thread ended (exit_group) in
//! bound; the kernel reaps it once the test kills the FUSE server.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::{
    first_difference, needs_fuse, path_str, pattern, run_to_exit, Client, Daemon, HangingFile, Op,
    WriteStorm, MIB,
};

/// `CLOSE_ALL_TIMEOUT_MS` in backend/src/limits.rs, the bound README "Faults" documents.
const CLOSE_ALL: Duration = Duration::from_secs(30);
/// What exiting may take after close-all gave up (threads end, the process is reaped).
const EXIT_SLACK: Duration = Duration::from_secs(3);
const DISK_BYTES: u64 = 64 * MIB;

/// Skips (with the reason printed) when FUSE cannot run here.
fn fuse_or_skip(test: &str) -> bool {
    match needs_fuse() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

/// Runs a command for diagnostics, killed after `timeout`; its output or what went wrong.
fn diagnostic(cmd: &mut Command, timeout: Duration) -> String {
    let out = tempfile::tempfile().expect("output file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("dup")))
        .stderr(Stdio::from(out.try_clone().expect("dup")))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return format!("<{cmd:?}: {e}>"),
    };
    let status = sluice_tests::wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = sluice_tests::wait_timeout(&mut child, Duration::from_secs(5));
    }
    let mut text = String::new();
    {
        use std::io::{Read, Seek};
        let mut out = out;
        let _ = out.rewind();
        let _ = out.read_to_string(&mut text);
    }
    match status {
        Some(_) => text,
        None => format!("{text}\n<killed after {timeout:?}>"),
    }
}

/// Where every thread of `pid` waits: state, kernel wait channel and kernel stack from
/// /proc, then gdb's user-space backtraces.
fn where_it_hangs(pid: u32) -> String {
    let mut out = String::new();
    let mut tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    tasks.sort();
    for t in &tasks {
        let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .unwrap_or("?");
        out.push_str(&format!(
            "task {} ({}) state {state} wchan {} syscall {}\n{}",
            t.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            read("comm").trim(),
            read("wchan"),
            read("syscall").trim(),
            read("stack")
        ));
    }
    // gdb's attach stops every thread, and a thread waiting for a FUSE answer cannot be
    // stopped (the stop only becomes a FUSE interrupt the server ignores): gdb would
    // wait forever and leave the daemon stopped. Its backtraces are only taken when no
    // thread waits there.
    if out.contains("request_wait_answer") {
        out.push_str(
            "--- gdb: not attached (a thread waits in request_wait_answer; ptrace cannot stop it) ---\n",
        );
        return out;
    }
    out.push_str("--- gdb ---\n");
    out.push_str(&diagnostic(
        Command::new("gdb").args([
            "-batch",
            "-nx",
            "-iex",
            "set pagination off",
            "-p",
            &pid.to_string(),
            "-ex",
            "thread apply all bt",
        ]),
        Duration::from_secs(20),
    ));
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is the daemon, a child
        // of this test that has not been reaped. SIGCONT undoes a stop a killed gdb left.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    out
}

/// Sends SIGTERM and waits for the exit within the close-all bound plus slack. Prints and
/// returns how long it took; when the daemon misses the bound, collects where it hangs,
/// lets the hanging file go (which unblocks the kernel) and panics with all of it.
fn sigterm_within_bound(
    daemon: &mut Daemon,
    fs: &mut Option<HangingFile>,
    test: &str,
) -> (std::process::ExitStatus, Duration) {
    let pid = daemon.pid();
    let start = Instant::now();
    daemon.signal(libc::SIGTERM);
    let bound = CLOSE_ALL + EXIT_SLACK;
    // Poll, noting when the daemon logs that it gave up and when its main thread has
    // exited: a thread waiting for a FUSE answer cannot die (not even by SIGKILL) until
    // the server answers or goes away, so the kernel keeps a daemon that has exited
    // unreaped for as long as one of its requests hangs there.
    let mut gave_up_at = None;
    let mut exited_at = None;
    let status = loop {
        if let Some(s) = daemon.wait(Duration::from_millis(100)) {
            break Some(s);
        }
        if gave_up_at.is_none() && daemon.stderr().contains("shutdown incomplete") {
            gave_up_at = Some(start.elapsed());
        }
        if exited_at.is_none() && sluice_tests::main_thread_exited(pid) {
            exited_at = Some(start.elapsed());
        }
        if exited_at.is_some() || start.elapsed() >= bound {
            break None;
        }
    };
    let took = start.elapsed();
    if let Some(status) = status {
        eprintln!("{test}: sluice exited {took:.2?} after SIGTERM ({status}; bound {CLOSE_ALL:?})");
        return (status, took);
    }
    if let (Some(exited), Some(_)) = (exited_at, gave_up_at) {
        // sluice ended in bound; what is left are kernel threads of it stuck in the FUSE
        // file. Show them, let the file system go, and take the exit status.
        let stuck = where_it_hangs(pid);
        drop(fs.take());
        let status = daemon.wait(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!("{test}: sluice not reaped 10 s after the FUSE server was killed")
        });
        eprintln!(
            "{test}: sluice exited {exited:.2?} after SIGTERM (bound {CLOSE_ALL:?}); the \
             kernel reaped it only once the FUSE server was killed ({:.2?}, {status}): its \
             threads still waiting for the file:\n{stuck}",
            start.elapsed()
        );
        return (status, exited);
    }
    let stacks = where_it_hangs(pid);
    // Let the FUSE server go: the kernel fails its pending requests with ENOTCONN.
    drop(fs.take());
    let after = daemon.wait(Duration::from_secs(10));
    let logged = match gave_up_at {
        Some(t) => format!("it logged \"shutdown incomplete\" {t:.2?} after SIGTERM"),
        None => "it never logged \"shutdown incomplete\"".to_owned(),
    };
    let msg = format!(
        "{test}: sluice still running {took:.2?} after SIGTERM (bound {CLOSE_ALL:?} + \
         {EXIT_SLACK:?}); {logged}; once the FUSE server was killed it {}\n\
         --- where it hangs ---\n{stacks}\n--- stderr ---\n{}",
        match after {
            Some(s) => format!("exited ({s}) {:.2?} after SIGTERM", start.elapsed()),
            None => "still did not exit within 10 s".to_owned(),
        },
        daemon.stderr()
    );
    eprintln!("{msg}");
    panic!("{msg}");
}

/// Asserts exit code 1 and a log that names what did not finish.
fn assert_incomplete_exit(
    daemon: &Daemon,
    status: std::process::ExitStatus,
    names: &[&str],
    test: &str,
) {
    let stderr = daemon.stderr();
    assert_eq!(
        status.code(),
        Some(1),
        "{test}: exit {status}, want 1\n--- stderr ---\n{stderr}"
    );
    assert!(
        stderr.contains("shutdown incomplete"),
        "{test}: no \"shutdown incomplete\" line\n--- stderr ---\n{stderr}"
    );
    for name in names {
        let named = stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("close-all") && l.contains(name));
        assert!(
            named,
            "{test}: no close-all error naming {name:?}\n--- stderr ---\n{stderr}"
        );
    }
}

fn ctl(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    let control = path_str(&daemon.control).to_owned();
    let mut all = vec!["ctl", "--control", &control, "--json"];
    all.extend_from_slice(args);
    let out = run_to_exit(&all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "sluice {all:?}: {}{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("sluice {all:?}: not JSON ({e}): {}", out.stdout))
}

/// (a) a disk on the FUSE file serves like any file; (b) once it stops answering, a
/// write gets no completion, and SIGTERM still ends the daemon within close-all's bound,
/// exit 1, naming the export whose queue did not drain.
#[test]
fn a_disk_that_stops_answering_still_closes_in_bound() {
    const TEST: &str = "a_disk_that_stops_answering_still_closes_in_bound";
    if !fuse_or_skip(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fs = Some(HangingFile::start(dir.path(), DISK_BYTES).expect("hangfs"));
    let disk = fs.as_ref().expect("fs").path().to_owned();
    let sock = dir.path().join("vm.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&disk),
            "--vhost-user",
            path_str(&sock),
            "--queue-depth",
            "16",
        ],
        1,
    );
    let mut client = Client::connect(&sock, 1, 16).expect("connect");
    assert_eq!(client.capacity, DISK_BYTES, "capacity of the FUSE file");

    // (a) It works: writes, a flush, reads back, and the data is in the backing file.
    let ops: Vec<Op> = (0..16u64)
        .map(|i| Op::Write {
            offset: i * 64 * 1024,
            data: pattern(i * 64 * 1024, 64 * 1024, 0x4A46),
            fua: i == 0,
        })
        .chain(std::iter::once(Op::Flush))
        .collect();
    let outs = client.run(0, &ops).expect("writes before the hang");
    sluice_tests::assert_all_ok("writes and flush before the hang", &outs);
    for i in 0..16u64 {
        let off = i * 64 * 1024;
        let got = client.read(off, 64 * 1024).expect("read back");
        if let Some(d) = first_difference("read back", off, &got, &pattern(off, 64 * 1024, 0x4A46))
        {
            panic!("{d}");
        }
    }
    let backing = std::fs::read(fs.as_ref().expect("fs").backing()).expect("backing file");
    for i in 0..16u64 {
        let off = (i * 64 * 1024) as usize;
        let want = pattern(off as u64, 64 * 1024, 0x4A46);
        if let Some(d) = first_difference(
            "backing file",
            off as u64,
            &backing[off..off + want.len()],
            &want,
        ) {
            panic!("{d}");
        }
    }

    // (b) It stops answering: a write gets no completion.
    fs.as_mut().expect("fs").hang().expect("hang");
    let mut q = client.queue(0);
    q.set_timeout(Duration::from_secs(3));
    let r = q.run(&[Op::Write {
        offset: 8 * MIB,
        data: pattern(8 * MIB, 4096, 0xDEAD),
        fua: false,
    }]);
    assert!(
        r.is_err(),
        "a write to the hanging file completed: {r:?}\n--- stderr ---\n{}",
        daemon.stderr()
    );
    eprintln!("{TEST}: the write after the hang: {}", r.unwrap_err());

    let (status, took) = sigterm_within_bound(&mut daemon, &mut fs, TEST);
    assert!(took <= CLOSE_ALL + EXIT_SLACK);
    assert_incomplete_exit(&daemon, status, &["export vm"], TEST);
    drop(client);
}

/// (c) A mirror whose target stops answering while a client writes: SIGTERM still ends
/// the daemon within close-all's bound, exit 1, naming what did not finish.
#[test]
fn mirror_to_a_hanging_target_still_closes_in_bound() {
    const TEST: &str = "mirror_to_a_hanging_target_still_closes_in_bound";
    if !fuse_or_skip(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    sluice_tests::make_file(&src, DISK_BYTES);
    let mut fs = Some(HangingFile::start(dir.path(), DISK_BYTES).expect("hangfs"));
    let target = fs.as_ref().expect("fs").path().to_owned();
    let sock = dir.path().join("vm.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&src),
            "--vhost-user",
            path_str(&sock),
            "--queue-depth",
            "16",
        ],
        1,
    );
    let nodes = ctl(&daemon, &["nodes"]);
    let source_node = nodes
        .as_array()
        .and_then(|a| a.first())
        .and_then(|n| n["name"].as_str())
        .unwrap_or_else(|| panic!("no node in {nodes}"))
        .to_owned();
    ctl(&daemon, &["node-add", "tgt", path_str(&target)]);

    let mut client = Client::connect(&sock, 1, 16).expect("connect");
    let storm = WriteStorm::new(0, DISK_BYTES / 4096, 16, 1_000_000, 0x3177);
    let (status, took) = thread::scope(|s| {
        let h = client.queue(0);
        let storm = &storm;
        s.spawn(move || storm.run(h));
        let fail = |e: String, daemon: &Daemon| -> ! {
            storm.stop();
            panic!("{e}\n--- stderr ---\n{}", daemon.stderr());
        };
        if let Err(e) = storm.wait_acked(200, Duration::from_secs(10)) {
            fail(e, &daemon);
        }
        let job = ctl(
            &daemon,
            &["mirror", "--node", &source_node, "--target", "tgt"],
        );
        eprintln!("{TEST}: mirror started: {job}");
        // Writes go on through the mirror (each to both nodes) before the target hangs.
        let before = storm.acked_count();
        if let Err(e) = storm.wait_acked(before + 200, Duration::from_secs(10)) {
            fail(e, &daemon);
        }
        let jobs = ctl(&daemon, &["jobs"]);
        eprintln!("{TEST}: before the hang: {jobs}");
        fs.as_mut().expect("fs").hang().expect("hang");
        // The writer now waits on writes the target never answers; its queue gives up
        // after 5 s without a completion.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !storm.is_done() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if !storm.is_done() {
            fail(
                "the writer still runs 10 s after the target hung".into(),
                &daemon,
            );
        }
        eprintln!("{TEST}: the writer after the hang: {}", storm.end());
        sigterm_within_bound(&mut daemon, &mut fs, TEST)
    });
    assert!(took <= CLOSE_ALL + EXIT_SLACK);
    assert_incomplete_exit(&daemon, status, &["export vm", "tgt"], TEST);
    drop(client);
}
