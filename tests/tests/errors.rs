//! Backing-device errors are logged: the first of each operation kind with its details,
//! then summaries with counts, never one line per failed request. The backing file lives
//! on a tmpfs mounted with a small size, so writes to its holes fail with ENOSPC once the
//! tmpfs is full (tmpfs takes O_DIRECT since Linux 6.6).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::{make_file, Client, Daemon, Op, EXIT_TIMEOUT, MIB};

/// The tmpfs: the first writes fit, the rest fail.
const TMPFS_BYTES: u64 = MIB;
/// The sparse image on it, much bigger than the tmpfs.
const DISK_BYTES: u64 = 64 * MIB;
const BLOCK: usize = 4096;
/// The daemon's summary interval (`BACKING_ERROR_LOG_INTERVAL_MS`).
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// A tmpfs of `TMPFS_BYTES` mounted on a temporary directory; unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    /// `Err` says why this host cannot run the test.
    fn mount() -> Result<SmallTmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(format!(
                "mounting a tmpfs needs root; running as uid {euid}"
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_BYTES}"))
            .arg("sluice-test")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallTmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A daemon serving a 64 MiB sparse image on a 1 MiB tmpfs as export `vm0` (node `disk0`).
struct Full {
    daemon: Daemon,
    sock: PathBuf,
    // Dropped after the daemon (field order).
    _tmpfs: SmallTmpfs,
    _dir: tempfile::TempDir,
}

fn serve_on_small_tmpfs() -> Option<Full> {
    let tmpfs = match SmallTmpfs::mount() {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipping: {why}");
            return None;
        }
    };
    let image = tmpfs.path().join("disk.img");
    make_file(&image, DISK_BYTES);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vm0.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            image.to_str().expect("utf-8"),
            "--vhost-user",
            sock.to_str().expect("utf-8"),
            "--queue-depth",
            "16",
        ],
        1,
    );
    Some(Full {
        daemon,
        sock,
        _tmpfs: tmpfs,
        _dir: dir,
    })
}

/// `count` 4 KiB writes, one per 64 KiB, from `first` on: more than the tmpfs holds.
fn writes(first: u64, count: u64) -> Vec<Op> {
    (0..count)
        .map(|i| Op::Write {
            offset: (first + i * 64 * 1024) % DISK_BYTES,
            data: vec![0x5a; BLOCK],
            fua: false,
        })
        .collect()
}

/// Lines of `stderr` that contain every one of `words`.
fn lines_with<'a>(stderr: &'a str, words: &[&str]) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// The counts of the summary lines for `kind` ("node disk0: N write errors (...").
fn summary_counts(stderr: &str, kind: &str) -> Vec<u64> {
    let marker = format!(" {kind} errors (");
    stderr
        .lines()
        .filter_map(|l| {
            let (before, _) = l.split_once(&marker)?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn enospc_is_logged_once_then_counted() {
    let Some(mut full) = serve_on_small_tmpfs() else {
        return;
    };
    let mut client = Client::connect(&full.sock, 1, 16).unwrap_or_else(|e| panic!("{e}"));
    // 1024 writes of 4 KiB: about 256 fit, the rest fail; then the failing ones again.
    let mut failed = 0usize;
    for round in 0..4 {
        let outs = client
            .run(0, &writes(0, 1024))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        failed += outs.iter().filter(|o| o.ret != 0).count();
    }
    assert!(
        failed >= 2000,
        "only {failed} writes failed: is the tmpfs full?"
    );
    let stderr = full.daemon.stderr();
    let first = lines_with(&stderr, &["node disk0", "write of", "ENOSPC", "export vm0"]);
    assert_eq!(
        first.len(),
        1,
        "one first-error line for {failed} failed writes; stderr:\n{stderr}"
    );
    assert!(first[0].contains("No space left on device"), "{}", first[0]);
    // Far fewer lines than errors: at most one summary per interval has been due.
    assert!(
        stderr.lines().count() < 20,
        "{failed} errors made {} lines:\n{stderr}",
        stderr.lines().count()
    );

    // Once the frontend goes, its queue's uncounted errors are summed up: the first line
    // plus the summaries account for every failed write.
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counted: u64 = 0;
    while Instant::now() < deadline {
        counted = summary_counts(&full.daemon.stderr(), "write").iter().sum();
        if 1 + counted >= failed as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = full.daemon.stderr();
    assert_eq!(
        1 + counted,
        failed as u64,
        "errors in the log vs. failed writes after the disconnect; stderr:\n{stderr}"
    );
    let status = full.daemon.sigterm_and_wait(EXIT_TIMEOUT);
    full.daemon.assert_exit_ok(status);
}

#[test]
fn continued_errors_are_summed_up_every_interval() {
    let Some(mut full) = serve_on_small_tmpfs() else {
        return;
    };
    let mut client = Client::connect(&full.sock, 1, 16).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let mut failed = 0u64;
    let mut round = 0;
    // Keep failing for a little more than one interval.
    while start.elapsed() < SUMMARY_INTERVAL + Duration::from_secs(1) {
        let outs = client
            .run(0, &writes(round * 4096, 256))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        failed += outs.iter().filter(|o| o.ret != 0).count() as u64;
        round += 1;
    }
    let elapsed = start.elapsed();
    // Before the frontend goes: the summary came while the errors went on.
    let stderr = full.daemon.stderr();
    let counts = summary_counts(&stderr, "write");
    assert!(
        !counts.is_empty(),
        "no summary after {elapsed:?} of errors ({failed} failed writes); stderr:\n{stderr}"
    );
    let max_summaries = (elapsed.as_secs_f64() / SUMMARY_INTERVAL.as_secs_f64()).ceil() as usize;
    assert!(
        counts.len() <= max_summaries,
        "{} summaries in {elapsed:?}; stderr:\n{stderr}",
        counts.len()
    );
    let summary = lines_with(
        &stderr,
        &["node disk0", "write errors (ENOSPC", "export vm0"],
    );
    assert_eq!(summary.len(), counts.len(), "stderr:\n{stderr}");
    assert!(
        counts.iter().sum::<u64>() < failed,
        "counts {counts:?} of {failed}"
    );
    drop(client);
    let status = full.daemon.sigterm_and_wait(EXIT_TIMEOUT);
    full.daemon.assert_exit_ok(status);
}
