//! The comparison runner end to end: the built `sluice-compare` binary runs real fio, real
//! libblkio, a real qemu-storage-daemon and the real sluice binary on a small backing file,
//! in both placements, and writes its JSON, markdown and SVG. Short runs: this checks the
//! runner, not speed.
//!
//! qemu-storage-daemon comes from qemu-utils (bookworm-backports), which
//! `tests/vm/prepare.sh` installs; without it (e.g. `tests/run.sh --no-vm` on a fresh
//! machine) the qsd targets are left out and said so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_bench::compare::{Placement, Results, Target};

/// 2 placements × 2 points × 6 targets × 2 repeats of 0.4 s, plus start-up, take well
/// under this.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn qsd_available() -> bool {
    sluice_bench::compare::server::find_program(Path::new("qemu-storage-daemon")).is_ok()
}

/// Runs `sluice-compare ARGS`, killed after `limit`.
fn compare(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-compare"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-compare");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "sluice-compare did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait_with_output")
}

/// A work directory on a filesystem with O_DIRECT (not tmpfs).
fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-compare-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

#[test]
fn runs_every_target_in_both_placements_and_writes_the_report() {
    let dir = work_dir();
    let out_dir = dir.path().join("results");
    let sluice = sluice_tests::sluice_bin();
    let mut targets: Vec<Target> = Target::ALL.to_vec();
    if !qsd_available() {
        eprintln!("qemu-storage-daemon not found (install qemu-utils): qsd targets left out");
        targets.retain(|t| !matches!(t, Target::QsdFile | Target::QsdNull));
    }
    let target_list: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    let target_list = target_list.join(",");
    let args = [
        "--dir",
        dir.path().to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--file-size",
        "64M",
        "--null-size",
        "64M",
        "--points",
        "randread-4k-qd1-q1,randwrite-4k-qd32-q2",
        "--targets",
        &target_list,
        "--runtime",
        "300ms",
        "--ramp",
        "100ms",
        "--repeats",
        "2",
        "--sluice",
        sluice.to_str().unwrap(),
    ];
    let out = compare(&args, RUN_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sluice-compare failed: {stderr}");

    // The backing file was written in full: real data, not holes.
    let backing = dir.path().join("backing.img");
    let meta = std::fs::metadata(&backing).expect("backing file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 >= 64 << 20, "backing file is sparse");

    let json = std::fs::read_to_string(out_dir.join("compare.json")).expect("compare.json");
    let r: Results = serde_json::from_str(&json).expect("compare.json parses");
    assert_eq!(r.failures(), 0);
    assert_eq!(
        r.cells.len(),
        2 * 2 * targets.len(),
        "one cell per placement, point, target"
    );
    for c in &r.cells {
        let what = format!(
            "{} {} {}",
            c.placement.name(),
            c.point.id(),
            c.target.name()
        );
        assert_eq!(c.samples.len(), 2, "{what}: two repeats");
        for s in &c.samples {
            assert!(s.iops > 0.0 && s.lat_mean_ns > 0.0, "{what}: {s:?}");
            assert!(s.lat_p50_ns <= s.lat_p99_ns, "{what}: {s:?}");
        }
    }
    // Every server got its memory recorded, once per placement and queue count.
    let servers = targets.iter().filter(|t| t.server().is_some()).count();
    assert_eq!(r.rss.len(), 2 * 2 * servers, "{:?}", r.rss);
    for m in &r.rss {
        assert!(
            m.rss_ready_kib > 0 && m.rss_peak_kib >= m.rss_after_kib,
            "{m:?}"
        );
    }
    assert!(
        r.machine.sluice_version.starts_with("sluice"),
        "{:?}",
        r.machine
    );

    let md = std::fs::read_to_string(out_dir.join("compare.md")).expect("compare.md");
    for p in [Placement::Split, Placement::Shared] {
        assert!(md.contains(&format!("## {}:", p.name())), "{md}");
    }
    assert!(
        md.contains("sluice/fio") && md.contains("| randwrite-4k-qd32-q2 |"),
        "{md}"
    );
    assert!(md.contains("Depth-1 mean latency"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("compare.svg")).expect("compare.svg");
    assert!(svg.starts_with("<svg") && svg.contains("shared placement, null backing"));

    // The markdown and plot can be rebuilt from the JSON alone.
    let again = dir.path().join("again");
    let out = compare(
        &[
            "--from-json",
            out_dir.join("compare.json").to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(again.join("compare.md")).unwrap(),
        md
    );
}

#[test]
fn missing_tools_and_bad_arguments_are_clear_errors() {
    let dir = work_dir();
    let d = dir.path().to_str().unwrap();
    let missing: PathBuf = dir.path().join("no-such-sluice");
    let out = compare(
        &[
            "--dir",
            d,
            "--targets",
            "sluice-null",
            "--sluice",
            missing.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not found") && err.contains("cargo build"),
        "{err}"
    );

    let out = compare(
        &["--dir", d, "--points", "randread-3k"],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown point") && err.contains("randread-4k-qd1-q1"),
        "{err}"
    );

    let nofile = dir.path().join("missing.img");
    let out = compare(
        &[
            "--dir",
            d,
            "--targets",
            "fio-io_uring",
            "--file",
            nofile.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing.img"), "{err}");
}
