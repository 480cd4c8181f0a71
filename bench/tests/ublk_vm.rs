//! `sluice-ublk-bench --vm` end to end: the built binary boots the test guest with an
//! emulated NVMe drive, runs itself there against the raw drive and sluice's ublk export of
//! it (real fio, the real sluice binary, the guest's real ublk and NVMe drivers) and writes
//! its JSON, markdown and SVG. Short runs, two points: this checks the runner, not speed.
//!
//! rublk is not installed by tests/run.sh; when `SLUICE_TEST_RUBLK` names a rublk binary the
//! rublk target runs too. Skips ("skipped: …") where the VM harness cannot run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_bench::ublk::{Results, Target};

/// Boot (≈7 s), 2 points × 2–3 targets × 2 runs of ≈1.5 s, server starts: well under this.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn the_vm_mode_measures_raw_and_sluice_and_writes_the_report() {
    if sluice_tests::vm::skip_unless_available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("sluice-ublk-bench-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp");
    let out_dir = dir.path().join("results");
    let sluice = sluice_tests::sluice_bin();
    let rublk = std::env::var("SLUICE_TEST_RUBLK").ok();
    let targets = if rublk.is_some() {
        "raw,sluice,rublk"
    } else {
        "raw,sluice"
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-ublk-bench"));
    cmd.args([
        "--vm",
        "--image-size",
        "256M",
        "--runtime",
        "500ms",
        "--ramp",
        "200ms",
    ])
    .args([
        "--repeats",
        "2",
        "--points",
        "randread-4k-qd32-q2,write-128k-qd8-q1",
    ])
    .args(["--targets", targets])
    .arg("--work")
    .arg(dir.path().join("work"))
    .arg("--out")
    .arg(&out_dir)
    .arg("--sluice")
    .arg(&sluice);
    if let Some(r) = &rublk {
        cmd.args(["--rublk", r]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-ublk-bench");
    let deadline = Instant::now() + RUN_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "sluice-ublk-bench --vm did not finish within {RUN_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("wait_with_output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {}; stderr:\n{stderr}",
        out.status
    );
    eprintln!("{stderr}");

    let json = std::fs::read_to_string(out_dir.join("ublk.json")).expect("ublk.json");
    let r: Results = serde_json::from_str(&json).expect("ublk.json parses");
    assert_eq!(r.failures(), 0, "{json}");
    assert_eq!(r.setup.device, "/dev/nvme0n1");
    assert!(
        r.setup.note.contains("software emulation"),
        "{}",
        r.setup.note
    );
    assert_eq!(r.cells.len(), 2 * targets.split(',').count());
    for c in &r.cells {
        assert_eq!(c.samples.len(), 2, "{} {}", c.point.id(), c.target.name());
        assert!(c.samples.iter().all(|s| s.iops > 0.0));
    }
    assert!(r.targets.contains(&Target::Sluice));
    let md = std::fs::read_to_string(out_dir.join("ublk.md")).expect("ublk.md");
    assert!(md.contains("| randread-4k-qd32-q2 |"), "{md}");
    assert!(md.contains("sluice/raw"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("ublk.svg")).expect("ublk.svg");
    assert!(svg.starts_with("<svg"));
}
