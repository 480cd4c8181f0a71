//! What a host operator installs and runs, checked on this host:
//! - the systemd units in `systemd/` pass `systemd-analyze verify` (with their `ExecStart`
//!   pointed at the built binary; `--man=no`, the man page is not installed here), with no
//!   warning at all (an unknown key is only a warning there);
//! - two `sluice serve` one-liners with default options run side by side: each gets its own
//!   control socket next to its export socket, says so in its ready line, and answers
//!   `sluice ctl` there;
//! - `packaging/build-deb.sh` builds a Debian package holding the binary, the units, the udev
//!   rules, the man pages and the example config, with a postinst that makes the `sluice`
//!   group; the binary in it runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::sluice_bin;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = sluice_bin();
    for (unit, as_name) in [
        ("sluice.service", "sluice.service"),
        ("sluice@.service", "sluice@test.service"),
    ] {
        let text = std::fs::read_to_string(units_dir().join(unit)).expect(unit);
        assert!(
            text.contains("ExecStart=/usr/bin/sluice serve --config /etc/sluice/"),
            "{unit}: {text}"
        );
        assert!(text.contains("Type=notify"), "{unit}");
        let path = dir.path().join(as_name);
        std::fs::write(
            &path,
            text.replace("/usr/bin/sluice", bin.to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {:?}\n{said}",
            out.status
        );
    }
}

/// A one-liner started as an operator would (no `--control`, no systemd), its control path
/// read from its ready line.
struct OneLiner {
    child: std::process::Child,
    control: PathBuf,
}

impl OneLiner {
    fn start(socket: &Path, runtime: &Path) -> OneLiner {
        let mut child = Command::new(sluice_bin())
            .args(["serve", "--disk", "null:64M", "--vhost-user"])
            .arg(socket)
            .env_remove("RUNTIME_DIRECTORY")
            .env("XDG_RUNTIME_DIR", runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluice");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        for line in stdout.lines() {
            let line = line.expect("stdout");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON ready line");
            if let Some(control) = v["control"].as_str() {
                return OneLiner {
                    child,
                    control: control.into(),
                };
            }
            assert!(Instant::now() < deadline, "no control ready line");
        }
        let status = child.wait().unwrap();
        panic!("sluice exited ({status}) before its control ready line");
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid, which it still is (not reaped).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

#[test]
fn two_one_liners_side_by_side_with_default_options() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let a = OneLiner::start(&dir.path().join("a.sock"), &runtime);
    let b = OneLiner::start(&dir.path().join("b.sock"), &runtime);
    assert_eq!(a.control, dir.path().join("a.control.sock"));
    assert_eq!(b.control, dir.path().join("b.control.sock"));
    for one in [&a, &b] {
        let out = Command::new(sluice_bin())
            .args(["ctl", "--control"])
            .arg(&one.control)
            .args(["--json", "exports"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let exports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(exports.as_array().map(Vec::len), Some(1), "{exports}");
    }
    assert!(a.stop().success());
    assert!(b.stop().success());
}

#[test]
fn debian_package_holds_what_an_operator_needs() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("skipped: dpkg-deb is not installed");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-deb.sh");
    let built = Command::new(&script)
        .arg(sluice_bin())
        .arg(out.path())
        .output()
        .expect("build-deb.sh");
    assert!(
        built.status.success(),
        "build-deb.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(built.stdout).unwrap().trim());
    assert!(deb.exists(), "{}", deb.display());
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for path in [
        "./usr/bin/sluice",
        "./usr/lib/systemd/system/sluice.service",
        "./usr/lib/systemd/system/sluice@.service",
        "./usr/lib/udev/rules.d/60-sluice.rules",
        "./usr/share/man/man8/sluice.8.gz",
        "./usr/share/man/man8/sluice-serve.8.gz",
        "./usr/share/man/man8/sluice-ctl.8.gz",
        "./usr/share/doc/sluice/examples/sluice.toml",
        "./etc/sluice/",
    ] {
        assert!(
            listing.contains(path),
            "{path} missing from the package:\n{listing}"
        );
    }
    let info = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    for field in [
        "Package: sluice",
        "Depends: libc6",
        "Architecture: ",
        "postinst",
    ] {
        assert!(
            info.contains(field),
            "{field} missing from the control data:\n{info}"
        );
    }
    // What it installs runs, and its man page is roff.
    let root = out.path().join("root");
    let x = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(x.success());
    let version = Command::new(root.join("usr/bin/sluice"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("sluice "),
        "{version:?}"
    );
    let man = Command::new("gzip")
        .arg("-dc")
        .arg(root.join("usr/share/man/man8/sluice-serve.8.gz"))
        .output()
        .unwrap();
    let man = String::from_utf8_lossy(&man.stdout).into_owned();
    assert!(man.contains(".TH sluice-serve 8"), "{man}");
    assert!(man.contains("ublk"), "the serve page lists its options");
    let postinst = Command::new("dpkg-deb")
        .args(["--ctrl-tarfile"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(!postinst.stdout.is_empty());
}
