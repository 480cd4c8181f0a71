//! Harness for sluice's native integration tests (rung 2 of the testing ladder in
//! `shared/design.md`): the real `sluice` binary, driven over its vhost-user-blk socket by
//! independent clients.
//!
//! * [`Daemon`] runs `sluice serve …` with stdout piped, waits (bounded by
//!   [`READY_TIMEOUT`]) for one `{"event":"ready",…}` JSON line per export, captures stderr
//!   into a temporary file that failure messages quote, and kills the process on drop.
//!   [`run_to_exit`] runs a command that is expected to stop by itself (bad arguments).
//! * [`Client`] is libblkio's `virtio-blk-vhost-user` driver (crate `blkio` 0.5): an
//!   independent vhost-user-blk frontend written by QEMU developers. Every wait in it is
//!   bounded by [`IO_TIMEOUT`]: libblkio blocks in `do_io` forever when the backend dies
//!   unless it gets a timeout. libblkio puts every request in 3 descriptors and never
//!   negotiates indirect descriptors, so the vring is sized to at least 3 × depth.
//! * [`RawClient`] uses `virtio-driver`, the virtqueue layer under libblkio, directly, to
//!   send what libblkio cannot: `VIRTIO_BLK_T_GET_ID` (the serial), and writes to an export
//!   that advertises `VIRTIO_BLK_F_RO` (libblkio refuses those itself, so they would never
//!   test the backend).
//! * [`LoopDevice`] attaches a file as a real block device (`losetup --direct-io=on`);
//!   [`needs_root_and_loop`] says why a test has to skip when that is impossible.
//! * [`pattern`] makes data whose every 8-byte word names its absolute offset and a seed,
//!   so misplaced, stale or torn blocks are told apart from correct ones.
//! * [`WriteStorm`] keeps a queue busy with writes while a test takes the export away, and
//!   checks afterwards that every acknowledged write is in the file.
//! * [`vring`] is vhost's own frontend with guest memory and a split ring built by hand, to
//!   start a ring in a chosen state (as QEMU reconnecting to a restarted sluice finds it).
//!
//! The binary is looked up next to the test executable (`<target>/debug/sluice`) or taken
//! from the `SLUICE_BIN` environment variable; build it first with `cargo build -p sluice`.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub mod metrics;
pub mod vm;
pub mod vring;

/// How long a daemon may take to print its ready lines.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one wait for a completion may take before the test gives up on the backend.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after SIGTERM, or a failing command to stop.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// One MiB, for sizes.
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

/// A test path as the `&str` a command line takes.
///
/// # Panics
/// When the path is not UTF-8 (test paths are made by the tests).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Path of the `sluice` binary under test: `$SLUICE_BIN`, or `sluice` in the target profile
/// directory that holds this test executable (`<target>/debug/deps/<test>` → `<target>/debug`).
///
/// # Panics
/// When the binary does not exist, with the command that builds it.
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "sluice binary not found at {} (from SLUICE_BIN)",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("sluice");
        if candidate.is_file() {
            assert_not_stale(&candidate);
            return candidate;
        }
        tried.push(candidate);
    }
    let first = tried
        .get(1)
        .or(tried.first())
        .map_or_else(|| "<unknown>".to_owned(), |p| p.display().to_string());
    panic!("sluice binary not found at {first}: run `cargo build -p sluice` first");
}

/// Panics when a source file of the daemon (backend/, hw/ or vendor/ in this workspace) is newer
/// than the binary: `cargo test -p sluice-tests` does not rebuild it, and a stale daemon
/// fails tests for reasons long fixed.
fn assert_not_stale(bin: &Path) {
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                newest(&path, best);
            } else if let Ok(m) = meta.modified() {
                if best.as_ref().is_none_or(|(t, _)| m > *t) {
                    *best = Some((m, path));
                }
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut best = None;
    for part in [
        "backend/src",
        "backend/Cargo.toml",
        "hw/src",
        "hw/Cargo.toml",
        "vendor/vhost-user-backend/src",
    ] {
        let p = root.join(part);
        if p.is_dir() {
            newest(&p, &mut best);
        } else if let Ok(m) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            if best.as_ref().is_none_or(|(t, _)| m > *t) {
                best = Some((m, p));
            }
        }
    }
    if let Some((t, path)) = best {
        assert!(
            t <= built,
            "sluice binary at {} is older than {}: run `cargo build -p sluice` first \
             (or set SLUICE_BIN to use a binary as it is)",
            bin.display(),
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// Waits up to `timeout` for `child` to exit.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child, which
    // has not been reaped yet, so the pid cannot have been reused.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// One JSON-RPC call on the daemon's control socket `control`: its
/// `result`, or its `error` object. Waits at most 60 s for the answer.
pub fn rpc(
    control: &Path,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, serde_json::Value> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(control)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", control.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    let reply: serde_json::Value = serde_json::from_str(&line).expect("JSON reply");
    match reply.get("error") {
        Some(e) => Err(e.clone()),
        None => Ok(reply["result"].clone()),
    }
}

/// A daemon serving one file over vhost-user: what [`serve_file`] started.
pub struct ServedFile {
    /// The daemon.
    pub daemon: Daemon,
    /// The file it serves (`DIR/disk.img`).
    pub disk: PathBuf,
    /// The export's vhost-user socket (`DIR/vm.sock`).
    pub sock: PathBuf,
}

/// `sluice serve --disk DIR/disk.img --vhost-user DIR/vm.sock EXTRA…`, the
/// file sized to `disk_bytes` first (made sparse, or kept with what a test
/// wrote in it); waits for the export's ready line (and the metrics
/// server's, when `extra` has `--metrics`).
pub fn serve_file(dir: &Path, disk_bytes: u64, extra: &[&str]) -> ServedFile {
    let disk = dir.join("disk.img");
    let sock = dir.join("vm.sock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&disk)
        .and_then(|f| f.set_len(disk_bytes))
        .unwrap_or_else(|e| panic!("sizing {}: {e}", disk.display()));
    let mut args = vec![
        "serve",
        "--disk",
        path_str(&disk),
        "--vhost-user",
        path_str(&sock),
    ];
    args.extend_from_slice(extra);
    let ready = 1 + usize::from(extra.contains(&"--metrics"));
    ServedFile {
        daemon: Daemon::spawn(&args, ready),
        disk,
        sock,
    }
}

/// A running `sluice` daemon. Killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Child,
    stderr: tempfile::NamedTempFile,
    /// The control socket the harness gave the daemon (unless the test
    /// passed its own `--control`).
    pub control: PathBuf,
    _control_dir: tempfile::TempDir,
    /// The parsed ready events, in the order they were printed.
    pub ready: Vec<serde_json::Value>,
    /// Stdout lines after the ready lines, as the reader thread sees them.
    stdout_rest: Receiver<String>,
    args: Vec<String>,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `sluice <args>` and waits for `exports` ready lines.
    ///
    /// # Panics
    /// If the daemon exits or stays silent for [`READY_TIMEOUT`]; the message quotes stderr.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], exports: usize) -> Daemon {
        match Self::try_spawn(args, exports) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Daemon::spawn`] that reports failure instead of panicking.
    pub fn try_spawn<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        exports: usize,
    ) -> Result<Daemon, String> {
        Self::try_spawn_env(args, exports, &[])
    }

    /// [`Daemon::try_spawn`] with extra environment variables.
    pub fn try_spawn_env<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        exports: usize,
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        Self::try_spawn_bin(&sluice_bin(), args, exports, env)
    }

    /// [`Daemon::try_spawn_env`] of the executable at `bin` (a copy of the
    /// binary, for an upgrade).
    pub fn try_spawn_bin<S: AsRef<std::ffi::OsStr>>(
        bin: &Path,
        args: &[S],
        exports: usize,
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let stderr = tempfile::Builder::new()
            .prefix("sluice-stderr-")
            .tempfile()
            .map_err(|e| format!("stderr file: {e}"))?;
        // Tests run daemons side by side: each gets its own control socket
        // unless the test chose one.
        let control_dir = tempfile::Builder::new()
            .prefix("sluice-control-")
            .tempdir()
            .map_err(|e| format!("control dir: {e}"))?;
        let control = control_dir.path().join("control.sock");
        let mut args: Vec<std::ffi::OsString> =
            args.iter().map(|a| a.as_ref().to_owned()).collect();
        let serving = args.first().is_some_and(|a| a == "serve");
        if serving && !args.iter().any(|a| a == "--control") {
            args.push("--control".into());
            args.push(control.clone().into());
        }
        let stderr_handle = stderr.reopen().map_err(|e| format!("stderr file: {e}"))?;
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_handle))
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            stderr,
            control,
            _control_dir: control_dir,
            ready: Vec::new(),
            stdout_rest: rx,
            args: shown,
            exited: None,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while daemon.ready.len() < exports {
            let left = deadline.saturating_duration_since(Instant::now());
            match daemon.stdout_rest.recv_timeout(left) {
                Ok(line) => {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        return Err(daemon.failure(&format!("non-JSON line on stdout: {line:?}")));
                    };
                    if v["event"] == "ready" {
                        daemon.ready.push(v);
                    } else {
                        return Err(daemon.failure(&format!("unexpected event before ready: {v}")));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(daemon.failure(&format!(
                        "no {} ready line(s) within {READY_TIMEOUT:?} (got {})",
                        exports,
                        daemon.ready.len()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_timeout(&mut daemon.child, Duration::from_secs(5));
                    daemon.exited = status;
                    return Err(daemon.failure(&format!(
                        "stdout closed before ready (exit status {status:?})"
                    )));
                }
            }
        }
        Ok(daemon)
    }

    fn failure(&mut self, what: &str) -> String {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = wait_timeout(&mut self.child, Duration::from_secs(5));
        }
        format!(
            "sluice {}: {what}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.stderr()
        )
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_else(|e| format!("<{e}>"))
    }

    /// Stdout lines printed after the ready lines, so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_rest.try_iter().collect()
    }

    /// What the daemon holds now, read from `/proc`.
    pub fn resources(&self) -> Resources {
        Resources::of(self.child.id())
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.exited.is_none(), "daemon already exited");
        send_signal(self.child.id(), signal);
    }

    /// Kills the daemon (SIGKILL) and reaps it, e.g. to unblock clients before failing.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = wait_timeout(&mut self.child, Duration::from_secs(5));
        }
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_timeout(&mut self.child, timeout);
        }
        self.exited
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    ///
    /// # Panics
    /// If the daemon is still running after `timeout` (it is then killed); the message
    /// quotes stderr.
    pub fn sigterm_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait(timeout) {
            Some(status) => status,
            None => {
                let msg = self.failure(&format!("still running {timeout:?} after SIGTERM"));
                panic!("{msg}");
            }
        }
    }

    /// Asserts a successful (code 0) exit, quoting stderr otherwise.
    pub fn assert_exit_ok(&self, status: ExitStatus) {
        assert!(
            status.code() == Some(0),
            "sluice {} exited with {status} (signal {:?})\n--- stderr ---\n{}",
            self.args.join(" "),
            status.signal(),
            self.stderr()
        );
    }
}

/// Whether the main thread of `pid` has exited: `exit_group` ran, and what is left is
/// the kernel's teardown (unmapping memory, io_uring rings, or threads still waiting in a
/// file system), which can outlast the program by seconds on a loaded machine.
pub fn main_thread_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")) else {
        return true;
    };
    let state = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3));
    matches!(state, Some("Z" | "X"))
        || std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stack"))
            .is_ok_and(|s| s.contains("do_exit"))
}

/// A process's resources, from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Open file descriptors.
    pub fds: usize,
    /// Eventfds among them.
    pub eventfds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// User plus system CPU time so far, clock ticks.
    pub cpu_ticks: u64,
}

impl Resources {
    /// Reads them for process `pid`.
    ///
    /// # Panics
    /// When `/proc/PID` cannot be read (the process is gone).
    pub fn of(pid: u32) -> Resources {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let mut fds = 0;
        let mut eventfds = 0;
        for e in std::fs::read_dir(dir.join("fd"))
            .expect("read /proc/PID/fd")
            .flatten()
        {
            fds += 1;
            if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("eventfd")) {
                eventfds += 1;
            }
        }
        let status = std::fs::read_to_string(dir.join("status")).expect("read /proc/PID/status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        let stat = std::fs::read_to_string(dir.join("stat")).expect("read /proc/PID/stat");
        // Fields after the parenthesised command name; utime and stime are fields 14, 15.
        let after = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f[i - 3].parse::<u64>().expect("tick count");
        Resources {
            fds,
            eventfds,
            threads: usize::try_from(field("Threads:")).expect("fits"),
            rss_kib: field("VmRSS:"),
            cpu_ticks: ticks(14) + ticks(15),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = wait_timeout(&mut self.child, Duration::from_secs(5));
        }
        if thread::panicking() {
            // The test failed while this daemon ran: show what it logged.
            eprintln!(
                "--- stderr of sluice {} ---\n{}",
                self.args.join(" "),
                self.stderr()
            );
        }
    }
}

/// What a command that stopped by itself left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sluice <args>`, expecting it to stop by itself within [`EXIT_TIMEOUT`].
///
/// # Panics
/// If it is still running then (it is killed first).
pub fn run_to_exit<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Finished {
    let bin = sluice_bin();
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("dup")))
        .stderr(Stdio::from(err.try_clone().expect("dup")))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    let status = wait_timeout(&mut child, EXIT_TIMEOUT);
    let read_all = |mut f: File| {
        use std::io::Seek;
        let mut s = String::new();
        f.rewind().expect("rewind");
        f.read_to_string(&mut s).expect("read output");
        s
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = wait_timeout(&mut child, Duration::from_secs(5));
        panic!(
            "sluice {:?} still running after {EXIT_TIMEOUT:?}\n--- stderr ---\n{}",
            args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            read_all(err)
        );
    };
    Finished {
        status,
        stdout: read_all(out),
        stderr: read_all(err),
    }
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// `len` bytes of the pattern that belongs at absolute byte `offset` for `seed`: every
/// 8-byte word holds a mix of its own absolute position and the seed, so a block that lands
/// at the wrong place, comes from another writer or is stale cannot compare equal.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    assert!(offset % 8 == 0 && len % 8 == 0, "pattern is made of words");
    let mut out = Vec::with_capacity(len);
    for i in 0..(len as u64 / 8) {
        let pos = offset + i * 8;
        let word = (pos ^ seed.rotate_left(32))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(17)
            ^ seed;
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// Describes where two byte strings first differ, for assertion messages.
pub fn first_difference(what: &str, base_offset: u64, got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!(
            "{what}: length {} instead of {}",
            got.len(),
            want.len()
        ));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i + 16).min(got.len());
    Some(format!(
        "{what}: first difference at byte {} (offset {:#x}): got {:02x?} want {:02x?}",
        i,
        base_offset + i as u64,
        &got[i..end],
        &want[i..end]
    ))
}

/// Panics unless the file at `path` holds `want` at byte `offset`; the message names
/// `what` and where they first differ.
pub fn assert_file_holds(path: &Path, offset: u64, want: &[u8], what: &str) {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut got = vec![0u8; want.len()];
    f.read_exact_at(&mut got, offset)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if let Some(diff) = first_difference(what, offset, &got, want) {
        panic!("{diff}");
    }
}

/// Creates a sparse zero-filled file of `len` bytes.
pub fn make_file(path: &Path, len: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(len).expect("set_len");
}

/// Runs `f` on a helper thread and waits for it up to [`READY_TIMEOUT`].
fn bounded<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
    what: &str,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => Err(format!(
            "{what}: no answer from the backend within {READY_TIMEOUT:?}"
        )),
        Err(RecvTimeoutError::Disconnected) => Err(format!("{what}: set-up thread panicked")),
    }
}

// ---------------------------------------------------------------------------------------
// libblkio client
// ---------------------------------------------------------------------------------------

/// One request for [`QueueHandle::run`].
#[derive(Clone, Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

impl Op {
    fn buffer_len(&self) -> usize {
        match self {
            Op::Read { len, .. } => *len,
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// The completion of one [`Op`].
#[derive(Clone, Debug)]
pub struct Outcome {
    /// 0 on success, a negative errno on failure (as libblkio reports it).
    pub ret: i32,
    /// For reads: the buffer after completion (filled with 0xAA before submission).
    pub data: Vec<u8>,
}

/// Panics, naming `what`, unless every outcome succeeded (it lists the first 8 failures:
/// index and return value).
pub fn assert_all_ok(what: &str, outs: &[Outcome]) {
    let bad: Vec<(usize, i32)> = outs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.ret != 0)
        .map(|(i, o)| (i, o.ret))
        .take(8)
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: failed requests (index, ret): {bad:?}"
    );
}

/// How [`Client::connect_with`] sets libblkio up.
#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    pub num_queues: usize,
    /// Requests in flight per queue.
    pub depth: usize,
    /// The largest request buffer.
    pub max_request_bytes: usize,
    /// libblkio's `read-only` property.
    pub read_only: bool,
    /// The vring size; `None`: the next power of two ≥ 3 × depth.
    pub queue_size: Option<usize>,
}

impl ClientOpts {
    pub fn new(num_queues: usize, depth: usize) -> Self {
        ClientOpts {
            num_queues,
            depth,
            max_request_bytes: 128 * 1024,
            read_only: false,
            queue_size: None,
        }
    }
}

/// A libblkio `virtio-blk-vhost-user` connection with started queues and one mapped memory
/// region that holds `depth` request buffers per queue.
pub struct Client {
    // Field order is drop order: queues before the Blkio instance that owns the memory
    // region they may still reference.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    opts: ClientOpts,
    /// The capacity the device reports, in bytes.
    pub capacity: u64,
}

/// Formats a libblkio error with its errno.
fn blkio_err(what: &str, e: &blkio::Error) -> String {
    format!("{what}: {} ({})", e.message(), e.errno())
}

impl Client {
    /// Connects with `num_queues` queues of `depth` requests.
    pub fn connect(socket: &Path, num_queues: usize, depth: usize) -> Result<Client, String> {
        Self::connect_with(socket, ClientOpts::new(num_queues, depth))
    }

    /// Connects with explicit options. Errors name the libblkio step that failed and carry
    /// its errno (e.g. `Read-only file system` from `start` for an export that advertises
    /// `VIRTIO_BLK_F_RO` to a client that did not set `read-only`).
    ///
    /// The whole set-up runs on a helper thread and is bounded by [`READY_TIMEOUT`]: the
    /// vhost-user handshake blocks without a timeout of its own when the backend accepts
    /// the connection but does not answer (e.g. while it serves another frontend). On
    /// timeout that thread is abandoned; it ends when the daemon goes away.
    pub fn connect_with(socket: &Path, opts: ClientOpts) -> Result<Client, String> {
        let socket = socket.to_owned();
        bounded(move || Self::connect_now(&socket, opts), "libblkio connect")
    }

    fn connect_now(socket: &Path, opts: ClientOpts) -> Result<Client, String> {
        assert!(opts.num_queues > 0 && opts.depth > 0);
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| blkio_err("new", &e))?;
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))
            .map_err(|e| blkio_err("set path", &e))?;
        if opts.read_only {
            b.set_bool("read-only", true)
                .map_err(|e| blkio_err("set read-only", &e))?;
        }
        b.connect().map_err(|e| blkio_err("connect", &e))?;
        let num_queues = i32::try_from(opts.num_queues).expect("queue count");
        b.set_i32("num-queues", num_queues)
            .map_err(|e| blkio_err("set num-queues", &e))?;
        let queue_size = opts
            .queue_size
            .unwrap_or_else(|| (3 * opts.depth).next_power_of_two());
        b.set_i32("queue-size", i32::try_from(queue_size).expect("queue size"))
            .map_err(|e| blkio_err("set queue-size", &e))?;
        let started = b.start().map_err(|e| blkio_err("start", &e))?;
        let capacity = b
            .get_u64("capacity")
            .map_err(|e| blkio_err("get capacity", &e))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| blkio_err("get mem-region-alignment", &e))?;
        let page = 4096u64.max(align);
        let len = (opts.num_queues * opts.depth * opts.max_request_bytes) as u64;
        let len = len.div_ceil(page) * page;
        let region = b
            .alloc_mem_region(usize::try_from(len).expect("region size"))
            .map_err(|e| blkio_err("alloc_mem_region", &e))?;
        b.map_mem_region(&region)
            .map_err(|e| blkio_err("map_mem_region", &e))?;
        Ok(Client {
            queues: started.queues,
            blkio: b,
            region,
            opts,
            capacity,
        })
    }

    /// A libblkio property (`request-alignment`, `max-transfer`, …) as u64.
    pub fn get_u64(&self, name: &str) -> Result<u64, String> {
        self.blkio.get_u64(name).map_err(|e| blkio_err(name, &e))
    }

    /// A libblkio property as i32.
    pub fn get_i32(&self, name: &str) -> Result<i32, String> {
        self.blkio.get_i32(name).map_err(|e| blkio_err(name, &e))
    }

    /// A libblkio property as bool.
    pub fn get_bool(&self, name: &str) -> Result<bool, String> {
        self.blkio.get_bool(name).map_err(|e| blkio_err(name, &e))
    }

    /// A handle on queue `q` for this thread.
    pub fn queue(&mut self, q: usize) -> QueueHandle<'_> {
        self.queues_mut().into_iter().nth(q).expect("queue index")
    }

    /// Handles on all queues, each with its own buffers, to drive them from several threads.
    pub fn queues_mut(&mut self) -> Vec<QueueHandle<'_>> {
        let per_queue = self.opts.depth * self.opts.max_request_bytes;
        let base = self.region.addr;
        let opts = self.opts;
        self.queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| QueueHandle {
                q,
                buffers: base + i * per_queue,
                switch: None,
                depth: opts.depth,
                slot_bytes: opts.max_request_bytes,
                timeout: IO_TIMEOUT,
            })
            .collect()
    }

    /// Queue `q` plus a [`Mapper`] that maps more memory while that queue is driven from
    /// another thread (vhost-user `ADD_MEM_REG` while requests are in flight).
    pub fn queue_and_mapper(&mut self, q: usize) -> (QueueHandle<'_>, Mapper<'_>) {
        let per_queue = self.opts.depth * self.opts.max_request_bytes;
        let base = self.region.addr;
        let opts = self.opts;
        let queue = self.queues.get_mut(q).expect("queue index");
        (
            QueueHandle {
                q: queue,
                buffers: base + q * per_queue,
                switch: None,
                depth: opts.depth,
                slot_bytes: opts.max_request_bytes,
                timeout: IO_TIMEOUT,
            },
            Mapper {
                blkio: &mut self.blkio,
                bytes: per_queue,
            },
        )
    }

    /// Runs `ops` on queue `q`; see [`QueueHandle::run`].
    pub fn run(&mut self, q: usize, ops: &[Op]) -> Result<Vec<Outcome>, String> {
        self.queue(q).run(ops)
    }

    /// Reads `len` bytes at `offset` on queue 0: `Ok(data)` or `Err(ret)`.
    ///
    /// # Panics
    /// When the backend does not answer within [`IO_TIMEOUT`].
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let out = self.one(&Op::Read { offset, len });
        if out.ret == 0 {
            Ok(out.data)
        } else {
            Err(out.ret)
        }
    }

    /// Writes `data` at `offset` on queue 0 and returns the completion's `ret`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.one(&Op::Write {
            offset,
            data: data.to_vec(),
            fua: false,
        })
        .ret
    }

    /// A FUA write (`BLKIO_REQ_FUA`) on queue 0.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.one(&Op::Write {
            offset,
            data: data.to_vec(),
            fua: true,
        })
        .ret
    }

    /// A flush on queue 0.
    pub fn flush(&mut self) -> i32 {
        self.one(&Op::Flush).ret
    }

    /// A discard on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.one(&Op::Discard { offset, len }).ret
    }

    /// A write-zeroes on queue 0 (`unmap`: the device may deallocate).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> i32 {
        self.one(&Op::WriteZeroes { offset, len, unmap }).ret
    }

    fn one(&mut self, op: &Op) -> Outcome {
        let mut out = self
            .run(0, std::slice::from_ref(op))
            .unwrap_or_else(|e| panic!("{op:?}: {e}"));
        out.pop().expect("one outcome")
    }
}

/// Maps further memory regions of a [`Client`] while its queues run.
pub struct Mapper<'c> {
    blkio: &'c mut Blkio,
    bytes: usize,
}

impl Mapper<'_> {
    /// Allocates and maps a region big enough for one queue's buffers and returns its
    /// address (freed with the Client).
    pub fn map_buffers(&mut self) -> Result<usize, String> {
        let len = self.bytes.div_ceil(4096) * 4096;
        let region = self
            .blkio
            .alloc_mem_region(len)
            .map_err(|e| blkio_err("alloc_mem_region", &e))?;
        self.blkio
            .map_mem_region(&region)
            .map_err(|e| blkio_err("map_mem_region", &e))?;
        Ok(region.addr)
    }
}

/// One queue of a [`Client`] with its own request buffers.
pub struct QueueHandle<'c> {
    q: &'c mut Blkioq,
    /// Address of this queue's `depth` buffers of `slot_bytes` inside the mapped region.
    buffers: usize,
    /// When set and non-zero: the address of other buffers to use from then on.
    switch: Option<&'c AtomicUsize>,
    depth: usize,
    slot_bytes: usize,
    timeout: Duration,
}

impl<'c> QueueHandle<'c> {
    /// Sets the bound on each wait for completions (default [`IO_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Uses the buffers at the address in `switch` for requests submitted once it is
    /// non-zero (the address must come from [`Mapper::map_buffers`] of the same Client).
    pub fn set_buffer_switch(&mut self, switch: &'c AtomicUsize) {
        self.switch = Some(switch);
    }

    /// The queue depth of this handle.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Submits `ops` keeping up to `depth` in flight, and returns their outcomes in order.
    /// Each wait for completions is bounded by the handle's timeout; `Err` when it runs out
    /// (the requests still in flight are then abandoned).
    pub fn run(&mut self, ops: &[Op]) -> Result<Vec<Outcome>, String> {
        self.run_with(ops, |_, _| {})
    }

    /// [`QueueHandle::run`] that calls `on_complete(index, outcome)` as each request
    /// completes, in completion order.
    pub fn run_with(
        &mut self,
        ops: &[Op],
        mut on_complete: impl FnMut(usize, &Outcome),
    ) -> Result<Vec<Outcome>, String> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; ops.len()];
        let mut free_slots: Vec<usize> = (0..self.depth).rev().collect();
        let mut slot_of: Vec<(usize, usize)> = vec![(0, usize::MAX); ops.len()];
        let mut next = 0;
        let mut in_flight = 0;
        let mut done = 0;
        let mut completions: Vec<std::mem::MaybeUninit<Completion>> = (0..self.depth)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        while done < ops.len() {
            while next < ops.len() {
                let Some(slot) = free_slots.pop() else { break };
                let base = self
                    .switch
                    .map(|s| s.load(Ordering::SeqCst))
                    .filter(|&a| a != 0)
                    .unwrap_or(self.buffers);
                self.submit(next, base, slot, &ops[next]);
                slot_of[next] = (base, slot);
                next += 1;
                in_flight += 1;
            }
            let mut timeout = self.timeout;
            let n = self
                .q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(|e| {
                    format!(
                        "do_io with {in_flight} request(s) in flight ({done}/{} done): {} ({})",
                        ops.len(),
                        e.message(),
                        e.errno()
                    )
                })?;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` elements.
                let c = unsafe { c.assume_init_ref() };
                let idx = c.user_data;
                assert!(idx < ops.len() && outcomes[idx].is_none(), "bad user_data");
                let (base, slot) = slot_of[idx];
                let data = if c.ret == 0 {
                    if let Op::Read { len, .. } = ops[idx] {
                        self.slot_slice(base, slot, len).to_vec()
                    } else {
                        Vec::new()
                    }
                } else {
                    Vec::new()
                };
                let outcome = Outcome { ret: c.ret, data };
                on_complete(idx, &outcome);
                outcomes[idx] = Some(outcome);
                free_slots.push(slot);
                in_flight -= 1;
                done += 1;
            }
        }
        Ok(outcomes.into_iter().map(|o| o.expect("complete")).collect())
    }

    fn slot_ptr(&self, base: usize, slot: usize) -> *mut u8 {
        assert!(slot < self.depth);
        (base + slot * self.slot_bytes) as *mut u8
    }

    fn slot_slice(&self, base: usize, slot: usize, len: usize) -> &[u8] {
        assert!(len <= self.slot_bytes);
        // SAFETY: the slot lies inside a memory region the Client mapped, which lives as
        // long as the Client this handle borrows; no request using this slot is in flight
        // when it is read (its completion has been reaped).
        unsafe { std::slice::from_raw_parts(self.slot_ptr(base, slot), len) }
    }

    fn submit(&mut self, idx: usize, base: usize, slot: usize, op: &Op) {
        let len = op.buffer_len();
        assert!(
            len <= self.slot_bytes,
            "request of {len} bytes exceeds the {} byte buffers",
            self.slot_bytes
        );
        let buf = self.slot_ptr(base, slot);
        match op {
            Op::Read { offset, len } => {
                // Poison the buffer so that a read that returns success without filling
                // it is caught.
                // SAFETY: the slot is inside the mapped region and no request uses it.
                unsafe { std::ptr::write_bytes(buf, 0xAA, *len) };
                self.q.read(*offset, buf, *len, idx, ReqFlags::empty());
            }
            Op::Write { offset, data, fua } => {
                // SAFETY: the slot is inside the mapped region, holds at least data.len()
                // bytes (checked above) and no request uses it.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
                let flags = if *fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                self.q.write(*offset, buf, data.len(), idx, flags);
            }
            Op::Flush => self.q.flush(idx, ReqFlags::empty()),
            Op::Discard { offset, len } => self.q.discard(*offset, *len, idx, ReqFlags::empty()),
            Op::WriteZeroes { offset, len, unmap } => {
                let flags = if *unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.q.write_zeroes(*offset, *len, idx, flags);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Write storm
// ---------------------------------------------------------------------------------------

/// A stream of 4 KiB writes that keeps one queue busy while a test takes its export away
/// (removal, SIGTERM, …), and records which writes were acknowledged, so that the test can
/// check afterwards that every one of them is in the backing file.
///
/// Write number `w` goes to block `first_block + w % blocks` with the data
/// [`WriteStorm::data_of`]`(w)`. Writes are submitted in chunks; a chunk drains before the
/// next starts, so two writes of one block are never in flight together. Share it by
/// reference: [`WriteStorm::run`] on a thread of its own, the rest from the test.
pub struct WriteStorm {
    first_block: u64,
    blocks: u64,
    chunk: u64,
    budget: u64,
    seed: u64,
    /// Per block of the storm's region: the newest write acknowledged with success.
    acked: Mutex<Vec<Option<u64>>>,
    acked_count: AtomicUsize,
    /// Writes numbered below this were submitted.
    submitted: AtomicU64,
    /// Set by [`WriteStorm::mark_gone`].
    gone: AtomicBool,
    /// Writes that succeeded although their chunk started after `gone` was set.
    succeeded_after_gone: AtomicUsize,
    stop: AtomicBool,
    done: AtomicBool,
    end: Mutex<String>,
}

impl WriteStorm {
    /// The size of every write and block.
    pub const BLOCK: usize = 4096;

    /// A storm over `blocks` blocks starting at block `first_block`, submitting `chunk`
    /// writes at a time, at most `budget` writes in all (a bound for when the export never
    /// goes away), with data seeded by `seed`.
    pub fn new(first_block: u64, blocks: u64, chunk: u64, budget: u64, seed: u64) -> WriteStorm {
        assert!(
            blocks > 0 && chunk > 0,
            "a write storm needs blocks and chunks"
        );
        WriteStorm {
            first_block,
            blocks,
            chunk,
            budget,
            seed,
            acked: Mutex::new(vec![None; blocks as usize]),
            acked_count: AtomicUsize::new(0),
            submitted: AtomicU64::new(0),
            gone: AtomicBool::new(false),
            succeeded_after_gone: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            end: Mutex::new(String::new()),
        }
    }

    /// The byte offset of write number `w`.
    pub fn offset_of(&self, w: u64) -> u64 {
        (self.first_block + w % self.blocks) * Self::BLOCK as u64
    }

    /// The data of write number `w`: a [`pattern`] for its offset, distinct per write.
    pub fn data_of(&self, w: u64) -> Vec<u8> {
        pattern(self.offset_of(w), Self::BLOCK, self.seed ^ (w << 16))
    }

    /// Writes on `h` (each wait for completions bounded by 5 s) until a request fails or a
    /// wait runs out (the export went away), [`WriteStorm::stop`] is called, or the budget
    /// is spent; then records why ([`WriteStorm::end`]) and that it is done.
    pub fn run(&self, mut h: QueueHandle<'_>) {
        h.set_timeout(Duration::from_secs(5));
        let mut k = 0u64;
        let reason = loop {
            if k >= self.budget {
                break "write budget exhausted".to_owned();
            }
            if self.stop.load(Ordering::SeqCst) {
                break "stopped by the test".to_owned();
            }
            let after_gone = self.gone.load(Ordering::SeqCst);
            let ops: Vec<Op> = (k..k + self.chunk)
                .map(|w| Op::Write {
                    offset: self.offset_of(w),
                    data: self.data_of(w),
                    fua: false,
                })
                .collect();
            self.submitted.store(k + self.chunk, Ordering::SeqCst);
            let mut failed = None;
            let r = h.run_with(&ops, |i, out| {
                let w = k + i as u64;
                if out.ret == 0 {
                    if after_gone {
                        self.succeeded_after_gone.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut a = self.acked.lock().expect("lock");
                    let slot = &mut a[(w % self.blocks) as usize];
                    *slot = Some(slot.map_or(w, |old| old.max(w)));
                    self.acked_count.fetch_add(1, Ordering::SeqCst);
                } else if failed.is_none() {
                    failed = Some(format!("write {w} failed with {}", out.ret));
                }
            });
            if let Err(e) = r {
                break e;
            }
            if let Some(f) = failed {
                break f;
            }
            k += self.chunk;
        };
        *self.end.lock().expect("lock") = reason;
        self.done.store(true, Ordering::SeqCst);
    }

    /// Asks [`WriteStorm::run`] to stop before its next chunk.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Records that the export is gone: writes of chunks that start after this and still
    /// succeed are counted by [`WriteStorm::succeeded_after_gone`].
    pub fn mark_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    /// Writes that succeeded although their chunk started after [`WriteStorm::mark_gone`].
    pub fn succeeded_after_gone(&self) -> usize {
        self.succeeded_after_gone.load(Ordering::SeqCst)
    }

    /// Whether [`WriteStorm::run`] has returned.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Why [`WriteStorm::run`] stopped (empty while it runs).
    pub fn end(&self) -> String {
        self.end.lock().expect("lock").clone()
    }

    /// How many writes were acknowledged with success.
    pub fn acked_count(&self) -> usize {
        self.acked_count.load(Ordering::SeqCst)
    }

    /// How many writes were submitted.
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Waits until `n` writes are acknowledged while the storm still runs. When it ends
    /// first or `timeout` passes: stops the storm and says what happened.
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.acked_count() < n {
            let failure = if self.is_done() {
                Some(format!("the writer stopped early: {}", self.end()))
            } else if Instant::now() >= deadline {
                Some(format!("fewer than {n} writes acknowledged in {timeout:?}"))
            } else {
                None
            };
            if let Some(f) = failure {
                self.stop();
                return Err(f);
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Panics (naming `what`) unless every acknowledged write is in `file`, the whole
    /// backing file, or a later submitted write of the same block is; returns how many
    /// blocks were checked.
    pub fn check_file(&self, file: &[u8], what: &str) -> usize {
        let submitted = self.submitted();
        let acked = self.acked.lock().expect("lock");
        let mut checked = 0;
        for (i, a) in acked.iter().enumerate() {
            let Some(k) = *a else { continue };
            let off = self.offset_of(i as u64);
            let got = &file[off as usize..off as usize + Self::BLOCK];
            let ok = (k..submitted)
                .step_by(self.blocks as usize)
                .any(|w| got == self.data_of(w).as_slice());
            if !ok {
                let block = format!("block {}", self.first_block + i as u64);
                let d = first_difference(&block, off, got, &self.data_of(k)).unwrap_or_default();
                panic!("{what}: acknowledged write {k} is not in the file: {d}");
            }
            checked += 1;
        }
        checked
    }
}

// ---------------------------------------------------------------------------------------
// Raw virtio-blk client
// ---------------------------------------------------------------------------------------

/// virtio-blk request types (VIRTIO 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// virtio-blk status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// `VIRTIO_BLK_ID_BYTES`: the size of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Header and status byte of one request, in the ring memory shared with the device.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RawReq {
    req_type: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

type RawTransport = virtio_driver::VhostUser<virtio_driver::VirtioBlkConfig, RawReq>;

/// An mmap of a memfd, unmapped and closed on drop.
struct SharedBuffer {
    addr: *mut u8,
    len: usize,
    fd: libc::c_int,
}

impl SharedBuffer {
    fn new(len: usize) -> SharedBuffer {
        let name = CString::new("sluice-test-buf").expect("no NUL");
        // SAFETY: `name` is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        let off_len = libc::off_t::try_from(len).expect("length fits off_t");
        // SAFETY: `fd` is the memfd we just created.
        let rc = unsafe { libc::ftruncate(fd, off_len) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of `len` bytes of our memfd; no existing memory
        // is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert!(
            addr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        SharedBuffer {
            addr: addr.cast(),
            len,
            fd,
        }
    }
}

// SAFETY: SharedBuffer owns its mapping and descriptor exclusively; moving it to another
// thread moves that ownership, and it hands out no references.
unsafe impl Send for SharedBuffer {}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` is the mapping made in `new` and nothing refers to it once
        // the owner is dropped; `fd` is ours.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
        // SAFETY: `fd` is the memfd we own.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// A one-queue virtio-blk frontend on `virtio-driver`'s vhost-user transport and split
/// virtqueue, sending one request at a time with any request type, and negotiating only
/// `VIRTIO_F_VERSION_1` (so never `VIRTIO_BLK_F_RO`, `FLUSH`, …).
pub struct RawClient {
    // Field order is drop order: the virtqueue points into ring memory owned by the
    // transport, and both point into `buf`'s mapping only through the device.
    vq: virtio_driver::virtqueue::Virtqueue<'static, RawReq>,
    transport: Box<RawTransport>,
    buf: SharedBuffer,
    /// Address of the `idx` field of queue 0's available ring, in the ring memory the
    /// transport owns (an address, not a pointer, so the client stays `Send`).
    avail_idx_addr: usize,
    /// The capacity from the device's config space, in bytes.
    pub capacity: u64,
}

impl RawClient {
    const BUF_BYTES: usize = 64 * 1024;
    const QUEUE_SIZE: u16 = 16;

    /// Connects and sets up queue 0, bounded like [`Client::connect_with`].
    pub fn connect(socket: &Path) -> Result<RawClient, String> {
        let socket = socket.to_owned();
        bounded(move || Self::connect_now(&socket), "raw vhost-user connect")
    }

    fn connect_now(socket: &Path) -> Result<RawClient, String> {
        use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
        use virtio_driver::{VirtioFeatureFlags, VirtioTransport};

        let path = socket.to_str().expect("utf-8 socket path");
        let mut transport: Box<RawTransport> = Box::new(
            virtio_driver::VhostUser::new(path, VirtioFeatureFlags::VERSION_1.bits())
                .map_err(|e| format!("vhost-user connect: {e}"))?,
        );
        let features = VirtioFeatureFlags::from_bits_truncate(VirtioTransport::<
            virtio_driver::VirtioBlkConfig,
            RawReq,
        >::get_features(&*transport));
        let cfg = transport
            .get_config()
            .map_err(|e| format!("get_config: {e}"))?;
        let capacity = 512 * u64::from(cfg.capacity);
        let layout = VirtqueueLayout::new::<RawReq>(1, usize::from(Self::QUEUE_SIZE), features)
            .map_err(|e| format!("layout: {e}"))?;
        let translator = transport.iova_translator();
        let mem = transport
            .alloc_queue_mem(&layout)
            .map_err(|e| format!("alloc_queue_mem: {e}"))?;
        let (ptr, len) = (mem.as_mut_ptr(), mem.len());
        assert!(
            layout.driver_area_offset + 4 <= len,
            "ring memory holds the avail header"
        );
        // SAFETY: within the ring memory (checked above); `idx` follows the 2-byte `flags`.
        let avail_idx_addr = unsafe { ptr.add(layout.driver_area_offset + 2) } as usize;
        // SAFETY: the ring memory is an mmap owned by `transport`, which never moves or
        // unmaps it while alive; `vq` is declared before `transport` in RawClient and so
        // is dropped first, and nothing else accesses the memory from this process.
        let mem: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        let vq = Virtqueue::new(translator, mem, Self::QUEUE_SIZE, features)
            .map_err(|e| format!("virtqueue: {e}"))?;
        transport
            .setup_queues(std::slice::from_ref(&vq))
            .map_err(|e| format!("setup_queues: {e}"))?;
        let buf = SharedBuffer::new(Self::BUF_BYTES);
        transport
            .map_mem_region(buf.addr as usize, buf.len, buf.fd, 0)
            .map_err(|e| format!("map_mem_region: {e}"))?;
        Ok(RawClient {
            vq,
            transport,
            buf,
            avail_idx_addr,
            capacity,
        })
    }

    /// Sends one request of `req_type` at `sector` with `data` (device-readable) or, when
    /// `read_len` is non-zero, a device-writable buffer of `read_len` bytes (poisoned with
    /// 0xAA). Returns the status byte and the device-writable buffer.
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        data: &[u8],
        read_len: usize,
    ) -> Result<(u8, Vec<u8>), String> {
        use virtio_driver::VirtioTransport;

        assert!(data.is_empty() || read_len == 0, "one data direction");
        assert!(data.len() <= self.buf.len && read_len <= self.buf.len);
        if !data.is_empty() {
            // SAFETY: the buffer is our mapping, large enough (checked), and no request is
            // in flight.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf.addr, data.len()) };
        }
        if read_len > 0 {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(self.buf.addr, 0xAA, read_len) };
        }
        let (buf_addr, data_len) = (self.buf.addr, data.len());
        let id = self
            .vq
            .add_request(|req, add_desc| {
                *req = RawReq {
                    req_type,
                    reserved: 0,
                    sector,
                    status: 0xFF,
                };
                add_desc(
                    libc::iovec {
                        iov_base: std::ptr::from_mut(req).cast(),
                        iov_len: 16,
                    },
                    false,
                )?;
                if data_len > 0 {
                    add_desc(
                        libc::iovec {
                            iov_base: buf_addr.cast(),
                            iov_len: data_len,
                        },
                        false,
                    )?;
                }
                if read_len > 0 {
                    add_desc(
                        libc::iovec {
                            iov_base: buf_addr.cast(),
                            iov_len: read_len,
                        },
                        true,
                    )?;
                }
                add_desc(
                    libc::iovec {
                        iov_base: std::ptr::from_mut(&mut req.status).cast(),
                        iov_len: 1,
                    },
                    true,
                )
            })
            .map_err(|e| format!("add_request: {e}"))?;
        VirtioTransport::<virtio_driver::VirtioBlkConfig, RawReq>::get_submission_notifier(
            &*self.transport,
            0,
        )
        .notify()
        .map_err(|e| format!("notify: {e}"))?;
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(c) = self.vq.completions().next() {
                assert_eq!(c.id, id, "one request in flight");
                // SAFETY: the device has completed the request, so it no longer writes the
                // buffer; it is our mapping and at least read_len bytes long.
                let out = unsafe { std::slice::from_raw_parts(self.buf.addr, read_len) };
                return Ok((c.req.status, out.to_vec()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "request type {req_type} at sector {sector}: no completion within {IO_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Behaves as a buggy or hostile driver: publishes an available index `ahead` entries
    /// beyond the one it has actually made available (more than a ring's worth when `ahead`
    /// exceeds the queue size) and kicks the device.
    pub fn publish_bogus_avail_idx(&mut self, ahead: u16) -> Result<(), String> {
        use virtio_driver::VirtioTransport;
        let avail_idx = self.avail_idx_addr as *mut u16;
        // SAFETY: `avail_idx` points into the ring memory the transport owns for as long as
        // `self` lives (see connect_now) and is 2-byte aligned (the avail ring is); the
        // device only reads it.
        let idx = u16::from_le(unsafe { std::ptr::read_volatile(avail_idx) });
        // SAFETY: as above; the virtqueue never reads `idx` back, so overwriting it
        // invalidates nothing on our side.
        unsafe { std::ptr::write_volatile(avail_idx, idx.wrapping_add(ahead).to_le()) };
        VirtioTransport::<virtio_driver::VirtioBlkConfig, RawReq>::get_submission_notifier(
            &*self.transport,
            0,
        )
        .notify()
        .map_err(|e| format!("notify: {e}"))
    }

    /// `VIRTIO_BLK_T_GET_ID`: status and the 20-byte serial buffer.
    pub fn get_id(&mut self) -> Result<(u8, Vec<u8>), String> {
        self.request(VIRTIO_BLK_T_GET_ID, 0, &[], VIRTIO_BLK_ID_BYTES)
    }

    /// `VIRTIO_BLK_T_OUT` of `data` at byte `offset` (a multiple of 512): the status.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<u8, String> {
        assert_eq!(offset % 512, 0);
        Ok(self.request(VIRTIO_BLK_T_OUT, offset / 512, data, 0)?.0)
    }

    /// `VIRTIO_BLK_T_IN` of `len` bytes at byte `offset`: status and data.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<(u8, Vec<u8>), String> {
        assert_eq!(offset % 512, 0);
        self.request(VIRTIO_BLK_T_IN, offset / 512, &[], len)
    }
}

// ---------------------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------------------

/// Why loop-device tests cannot run here, if they cannot: they need root, `losetup` and
/// `/dev/loop-control`.
pub fn needs_root_and_loop() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("running as uid {euid}, not root"));
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control does not exist".into());
    }
    match Command::new("losetup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`losetup --version` failed: {s}")),
        Err(e) => Err(format!("losetup not runnable: {e}")),
    }
}

/// A file attached as a loop device with direct I/O; detached on drop.
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show --direct-io=on <file>`.
    pub fn attach(file: &Path) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show --direct-io=on {}: {}: {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !dev.starts_with("/dev/") {
            return Err(format!("losetup printed {dev:?}"));
        }
        Ok(LoopDevice {
            path: PathBuf::from(dev),
        })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the loop driver reports direct I/O on (`/sys/block/loopN/loop/dio`).
    pub fn direct_io(&self) -> Option<bool> {
        let name = self.path.file_name()?.as_bytes();
        let sys = Path::new("/sys/block")
            .join(std::ffi::OsStr::from_bytes(name))
            .join("loop/dio");
        let s = std::fs::read_to_string(sys).ok()?;
        Some(s.trim() == "1")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Asserts that `path` no longer exists (call it after the daemon has exited).
pub fn assert_gone(path: &Path) {
    assert!(
        !path.exists(),
        "{} still exists after the daemon exited",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------
// A backing file that stops answering (FUSE)
// ---------------------------------------------------------------------------------------

/// How long `hangfs.py` may take to mount and answer, and to confirm a hang.
pub const FUSE_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The FUSE file system script, `tests/fuse/hangfs.py`.
fn hangfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuse/hangfs.py")
}

/// Runs `cmd` with its output captured, killing it after `timeout`: `Ok(stderr)` on
/// success, `Err(what happened)` otherwise.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let err = tempfile::tempfile().map_err(|e| format!("stderr file: {e}"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            err.try_clone().map_err(|e| format!("dup: {e}"))?,
        ))
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let status = wait_timeout(&mut child, timeout);
    let mut text = String::new();
    {
        use std::io::Seek;
        let mut err = err;
        let _ = err.rewind();
        let _ = err.read_to_string(&mut text);
    }
    match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("{shown}: {s}: {}", text.trim())),
        None => {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, Duration::from_secs(2));
            Err(format!("{shown}: still running after {timeout:?}"))
        }
    }
}

/// Why FUSE tests cannot run here, if they cannot: they need root, `/dev/fuse`,
/// `fusermount` (Debian `fuse`), and `python3` with fusepy (`pip install fusepy`), which
/// loads libfuse2's `libfuse.so.2` (Debian `libfuse2`). `tests/run.sh` installs them.
pub fn needs_fuse() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("running as uid {euid}, not root"));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist (modprobe fuse)".into());
    }
    if !hangfs_script().is_file() {
        return Err(format!("{} is missing", hangfs_script().display()));
    }
    run_bounded(Command::new("fusermount").arg("-V"), Duration::from_secs(5))
        .map_err(|e| format!("fusermount not runnable (apt-get install fuse): {e}"))?;
    run_bounded(
        Command::new("python3").args(["-c", "import fuse"]),
        Duration::from_secs(10),
    )
    .map_err(|e| {
        if e.contains("libfuse") {
            format!("libfuse.so.2 missing (apt-get install libfuse2): {e}")
        } else {
            format!("python3 cannot import fusepy (python3 -m pip install fusepy): {e}")
        }
    })?;
    Ok(())
}

/// Reads of a [`HangingFile`] that overlap `len` bytes at `offset` are answered `delay` late.
#[derive(Debug, Clone, Copy)]
pub struct SlowRead {
    pub offset: u64,
    pub len: u64,
    pub delay: Duration,
}

/// One file served by `tests/fuse/hangfs.py` (a FUSE file system, mounted `direct_io`,
/// so `O_DIRECT` opens work) that answers normally until [`HangingFile::hang`]; from then
/// on every read, write, fsync and flush of it is taken from the kernel and never
/// answered, like a drive that stopped answering. Whoever waits for such a request sits in
/// the kernel (`request_wait_answer`, uninterruptible once the request was taken, even by
/// SIGKILL) until the file system goes away: drop lazily unmounts it and kills the server,
/// which fails every pending request with `ENOTCONN`.
pub struct HangingFile {
    child: Child,
    mountpoint: PathBuf,
    file: PathBuf,
    lines: Receiver<String>,
    stderr: tempfile::NamedTempFile,
    hung: bool,
}

impl HangingFile {
    /// Mounts the file system on `dir/hangfs-mnt` serving `size_bytes` (a multiple of
    /// 4096), stored in the sparse file `dir/hangfs-backing.img`, and waits (at most
    /// [`FUSE_READY_TIMEOUT`]) until it answers.
    pub fn start(dir: &Path, size_bytes: u64) -> Result<HangingFile, String> {
        Self::start_with(dir, size_bytes, None)
    }

    /// [`HangingFile::start`], and every read that overlaps `slow` is answered `slow.delay`
    /// late (the file stays fast elsewhere, and for writes). Each such read is announced:
    /// [`HangingFile::wait_line`] sees `slow-read start OFFSET SIZE` when the file system
    /// takes it and `slow-read done OFFSET SIZE` when it answers.
    pub fn start_slow(dir: &Path, size_bytes: u64, slow: SlowRead) -> Result<HangingFile, String> {
        Self::start_with(dir, size_bytes, Some(slow))
    }

    fn start_with(
        dir: &Path,
        size_bytes: u64,
        slow: Option<SlowRead>,
    ) -> Result<HangingFile, String> {
        needs_fuse()?;
        if size_bytes == 0 || size_bytes % 4096 != 0 {
            return Err(format!(
                "size {size_bytes} is not a positive multiple of 4096"
            ));
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mountpoint = dir.join("hangfs-mnt");
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| format!("mkdir {}: {e}", mountpoint.display()))?;
        let stderr = tempfile::Builder::new()
            .prefix("hangfs-stderr-")
            .tempfile()
            .map_err(|e| format!("stderr file: {e}"))?;
        let stderr_handle = stderr.reopen().map_err(|e| format!("stderr file: {e}"))?;
        let mut child = Command::new("python3")
            .arg(hangfs_script())
            .arg(&mountpoint)
            .arg(dir.join("hangfs-backing.img"))
            .arg("disk.img")
            .arg(size_bytes.to_string())
            .arg(dir.join("hangfs-hang"))
            .args(
                slow.map(|s| format!("slow-read={}:{}:{}", s.offset, s.len, s.delay.as_secs_f64())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_handle))
            .spawn()
            .map_err(|e| format!("spawning python3 {}: {e}", hangfs_script().display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fs = HangingFile {
            child,
            file: mountpoint.join("disk.img"),
            mountpoint,
            lines,
            stderr,
            hung: false,
        };
        fs.expect_line("ready")?;
        Ok(fs)
    }

    fn expect_line(&mut self, want: &str) -> Result<(), String> {
        let deadline = Instant::now() + FUSE_READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("within {FUSE_READY_TIMEOUT:?}"),
                        RecvTimeoutError::Disconnected => "before it exited".to_owned(),
                    };
                    return Err(format!(
                        "hangfs did not say {want:?} {why}\n--- hangfs stderr ---\n{}",
                        self.stderr()
                    ));
                }
            }
        }
    }

    /// Waits at most `timeout` for a line from the server that starts with `prefix` (lines
    /// before it are skipped) and returns it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                    "hangfs said no {prefix:?} line within {timeout:?}\n--- hangfs stderr ---\n{}",
                    self.stderr()
                ))
                }
            }
        }
    }

    /// The served file (`<dir>/hangfs-mnt/disk.img`).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The regular file that holds the data (readable while the FUSE file hangs).
    pub fn backing(&self) -> PathBuf {
        self.mountpoint.with_file_name("hangfs-backing.img")
    }

    /// The FUSE server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Makes every read, write, fsync and flush of the file from now on block forever
    /// (SIGUSR1 to the server), and waits (at most [`FUSE_READY_TIMEOUT`]) for the server
    /// to confirm.
    pub fn hang(&mut self) -> Result<(), String> {
        if self.hung {
            return Ok(());
        }
        send_signal(self.child.id(), libc::SIGUSR1);
        self.expect_line("hung")?;
        self.hung = true;
        Ok(())
    }

    /// Makes every write of the file from now on fail with EIO (reads still work)
    /// (SIGUSR2 to the server), and waits (at most [`FUSE_READY_TIMEOUT`]) for the server
    /// to confirm.
    pub fn fail_writes(&mut self) -> Result<(), String> {
        send_signal(self.child.id(), libc::SIGUSR2);
        self.expect_line("failing writes")
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_else(|e| format!("<{e}>"))
    }
}

impl Drop for HangingFile {
    fn drop(&mut self) {
        // Detach the mount first (no new opens), then kill the server: the kernel then
        // fails every request still waiting for it, and their waiters go on.
        let lazy = Duration::from_secs(5);
        if run_bounded(
            Command::new("fusermount")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint),
            lazy,
        )
        .is_err()
        {
            let _ = run_bounded(Command::new("umount").arg("-l").arg(&self.mountpoint), lazy);
        }
        let _ = self.child.kill();
        if wait_timeout(&mut self.child, lazy).is_none() {
            eprintln!(
                "hangfs (pid {}) still running {lazy:?} after SIGKILL",
                self.child.id()
            );
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}
