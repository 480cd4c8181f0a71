//! The udev rules (`udev/60-sluice.rules`) with a real `systemd-udevd` in a QEMU guest: a
//! `sluice` group, the rules installed (their `/usr/bin/sluice` pointed at the built
//! binary), udevd started, then sluice serves a ublk export named `scratch`: udevd handles
//! the device's events as on a host. Checked: the link `/dev/disk/by-sluice/scratch` points
//! at `ublkb0` and reads the device; the device's char and block nodes belong to group
//! `sluice` with mode 0660, and so does the ublk control device (which exists before udevd
//! here, so `udevadm test` runs the rules on it); after SIGTERM the device and its link are
//! gone.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh) or has no
//! udev (`apt-get install udev`; tests/run.sh installs it). Needs `cargo build -p sluice`
//! first (or `SLUICE_BIN`).

use std::path::Path;
use std::time::Duration;

use sluice_tests::vm::{skip_unless_available, Vm};
use sluice_tests::{path_str, sluice_bin};

const UDEVD: &str = "/lib/systemd/systemd-udevd";

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
groupadd -r sluice
mkdir -p /etc/udev/rules.d
sed "s|/usr/bin/sluice|$S|g" @RULES@ >/etc/udev/rules.d/60-sluice.rules
@UDEVD@ --daemon
# Listening once its control socket is there; an event before that is missed.
for _ in $(seq 100); do [ -S /run/udev/control ] && break; sleep 0.05; done
udevadm control --ping
udevadm settle -t 10
# The control device was made (module loaded by the guest's init) before udevd ran: on a
# host udevd sees it at boot. Here `udevadm test` runs the rules on it, which applies them.
udevadm test --action=add /sys/class/misc/ublk-control >/tmp/udev-test.log 2>&1
report control.rule "$(grep -c '60-sluice.rules' /tmp/udev-test.log)"
cat >/tmp/sluice.toml <<EOF
[daemon]
control = "/tmp/ctl.sock"
[[disk]]
name = "d"
path = "null:64M"
[[export]]
name = "scratch"
disk = "d"
type = "ublk"
ublk_id = 0
EOF
start sluice 1 --config /tmp/sluice.toml
udevadm settle -t 10
report udev_info "$("$S" udev-info ublkb0 | tr '\n' ' ')"
report link "$(readlink /dev/disk/by-sluice/scratch)"
dd if=/dev/disk/by-sluice/scratch of=/dev/null bs=4k count=1 iflag=direct status=none
report link.read $?
report perms.control "$(stat -c '%G %a' /dev/ublk-control)"
report perms.block "$(stat -c '%G %a' /dev/ublkb0)"
report perms.char "$(stat -c '%G %a' /dev/ublkc0)"
stop sluice $pid
udevadm settle -t 10
if [ -e /dev/ublkb0 ]; then report device.gone no; else report device.gone yes; fi
if [ -e /dev/disk/by-sluice/scratch ] || [ -L /dev/disk/by-sluice/scratch ]; then report link.gone no; else report link.gone yes; fi
report done yes
"#;

#[test]
fn udev_rules_link_and_permissions() {
    if skip_unless_available() {
        return;
    }
    if !Path::new(UDEVD).exists() {
        eprintln!("skipped: no {UDEVD} (apt-get install udev)");
        return;
    }
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../udev/60-sluice.rules");
    let rules = std::fs::canonicalize(&rules).expect("udev/60-sluice.rules");
    let dir = tempfile::tempdir().expect("tempdir");
    let job = JOB
        .replace("@SLUICE@", path_str(&sluice_bin()))
        .replace("@RULES@", path_str(&rules))
        .replace("@UDEVD@", UDEVD);
    let run = Vm::new(dir.path())
        .module("ublk_drv")
        .timeout(Duration::from_secs(180))
        .run(&job)
        .expect("boot");
    run.print_timings("vm_udev");
    run.ensure_complete();
    run.ensure_eq("udev_info", "SLUICE_EXPORT=scratch ");
    run.ensure_eq("link", "../../ublkb0");
    run.ensure_eq("link.read", "0");
    run.ensure(
        run.result_u64("control.rule") > 0,
        "udevadm test did not use 60-sluice.rules on /dev/ublk-control",
    );
    run.ensure_eq("perms.control", "sluice 660");
    run.ensure_eq("perms.block", "sluice 660");
    run.ensure_eq("perms.char", "sluice 660");
    run.ensure_eq("sluice.exit", "0");
    run.ensure_eq("device.gone", "yes");
    run.ensure_eq("link.gone", "yes");
}
