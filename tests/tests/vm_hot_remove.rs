//! A drive pulled while it is served: inside a QEMU guest, one sluice serves three emulated
//! NVMe drives as `/dev/ublkb0`, `/dev/ublkb1` (`on_removed = "fail"`, the default) and
//! `/dev/ublkb2` (`on_removed = "stop"`), the first two also over vhost-user to a libblkio
//! client in the guest (`qd1_latency`), with `sluice ctl events` listening. fio writes to
//! ublkb0 (with verify) and ublkb1; the guest removes nvme1's and then nvme2's PCI device
//! (`/sys/…/remove`: the kernel's NVMe driver tears the namespace down as on a hot-unplug).
//! Checked: fio on ublkb1 fails with an I/O error, not "no space left"; sluice logs the
//! removal within 2 s, `sluice ctl nodes` says `removed`, the event reaches the listener;
//! a read of ublkb1 fails with EIO and does not hang; ublkb2 goes away (stop policy) with its
//! own event; fio on ublkb0 verifies; SIGTERM exits 0, saying the removed nodes were not
//! flushed.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::time::Duration;

use sluice_tests::vm::{qd1_latency_bin, skip_unless_available, Vm};
use sluice_tests::{make_file, path_str, sluice_bin, MIB};

const NVME_BYTES: u64 = 128 * MIB;

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
C=/tmp/ctl.sock
cat >/tmp/sluice.toml <<EOF
[daemon]
control = "$C"
[[disk]]
name = "d0"
path = "/dev/nvme0n1"
[[disk]]
name = "d1"
path = "/dev/nvme1n1"
reattach = true
[[disk]]
name = "d2"
path = "/dev/nvme2n1"
[[export]]
name = "u0"
disk = "d0"
type = "ublk"
ublk_id = 0
[[export]]
name = "u1"
disk = "d1"
type = "ublk"
ublk_id = 1
[[export]]
name = "u2"
disk = "d2"
type = "ublk"
ublk_id = 2
on_removed = "stop"
[[export]]
name = "v0"
disk = "d0"
type = "vhost-user"
socket = "/tmp/v0.sock"
[[export]]
name = "v1"
disk = "d1"
type = "vhost-user"
socket = "/tmp/v1.sock"
EOF
start sluice 5 --config /tmp/sluice.toml
"$S" ctl --control $C --json events >/tmp/events.out 2>/tmp/events.err &
events=$!
sleep 1
hung_task_watch

timeout -k 5 120 fio --name=keep --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --eta=never \
    --rw=randwrite --bs=4k --size=32M --iodepth=16 --verify=crc32c --output=/tmp/fio0.log &
fio0=$!
timeout -k 5 120 fio --name=pulled --filename=/dev/ublkb1 --ioengine=io_uring --direct=1 --eta=never \
    --rw=randwrite --bs=4k --size=64M --iodepth=16 --time_based --runtime=60 --output=/tmp/fio1.log &
fio1=$!
sleep 2
lap setup

# ---- pull nvme1 ----
t0=$(date +%s.%N)
echo 1 >/sys/class/nvme/nvme1/device/remove
report removed.written $?
for _ in $(seq 100); do
    grep -q 'node d1 .* was removed' /tmp/sluice.err && break
    sleep 0.05
done
report removal.log_seconds "$(since $t0)"
report removal.log "$(grep -m1 'was removed' /tmp/sluice.err)"
wait $fio1
report fio1.exit $?
report fio1.error "$(grep -m1 -o 'error=[A-Za-z /]*' /tmp/fio1.log)"
cat /tmp/fio1.log | head -20
report fio1.seconds_after_removal "$(since $t0)"
report nodes "$("$S" ctl --control $C --json nodes | python3 -c 'import json, sys; print(" ".join(n["name"] + "=" + n["state"] for n in json.load(sys.stdin)))')"
timeout 20 dd if=/dev/ublkb1 of=/dev/null bs=4k count=1 iflag=direct 2>/tmp/dd.err
report read.exit $?
report read.error "$(cat /tmp/dd.err | head -1)"
# vhost-user, through libblkio: the pulled drive's export fails reads (no hang), the other's serves.
timeout 30 @QD1@ /tmp/v1.sock 50 >/tmp/qd1-v1.out 2>&1
report v1.exit $?
timeout 60 @QD1@ /tmp/v0.sock 300 >/tmp/qd1-v0.out 2>&1
report v0.exit $?
lap pull1

# ---- pull nvme2 (on_removed = "stop") ----
echo 1 >/sys/class/nvme/nvme2/device/remove
for _ in $(seq 100); do
    [ -e /dev/ublkb2 ] || break
    sleep 0.1
done
if [ -e /dev/ublkb2 ]; then report stop.gone no; else report stop.gone yes; fi
lap pull2

# ---- the drives come back: d1 by itself (reattach), d2 by hand ----
t1=$(date +%s.%N)
echo 1 >/sys/bus/pci/rescan
for _ in $(seq 100); do
    grep -q 'node d1 .* is back' /tmp/sluice.err && break
    sleep 0.05
done
report reattach.seconds "$(since $t1)"
report reattach.log "$(grep -m1 'node d1 .* is back' /tmp/sluice.err)"
dd if=/dev/urandom of=/tmp/block.bin bs=4k count=1 status=none
dd if=/tmp/block.bin of=/dev/ublkb1 bs=4k seek=100 oflag=direct status=none
report back.write $?
if dd if=/dev/ublkb1 bs=4k skip=100 count=1 iflag=direct status=none | cmp - /tmp/block.bin; then report back.read same; else report back.read differs; fi
timeout 60 @QD1@ /tmp/v1.sock 50 >/tmp/qd1-v1b.out 2>&1
report v1.back_exit $?
"$S" ctl --control $C node-reopen d0 2>/tmp/reopen0.err
report reopen0.exit $?
report reopen0.error "$(cat /tmp/reopen0.err)"
"$S" ctl --control $C node-reopen d2
report reopen2.exit $?
report nodes.after "$("$S" ctl --control $C --json nodes | python3 -c 'import json, sys; print(" ".join(n["name"] + "=" + n["state"] for n in json.load(sys.stdin)))')"
lap back

wait $fio0
report fio0.exit $?
cat /tmp/fio0.log | head -5
sleep 1
report events "$(python3 -c 'import json, sys; print(" ".join(json.loads(l)["event"] + ":" + json.loads(l).get("node", json.loads(l).get("export", "")) for l in open(sys.argv[1])))' /tmp/events.out)"
cat /tmp/events.out
report ublk_nospc "$(dmesg | grep 'critical space allocation' | grep -c ublk)"
dmesg | grep -i 'ublkb1\|nvme1' | tail -5
stop sluice $pid
report not_flushed "$(grep -c 'removed: not flushed' /tmp/sluice.err)"
wait $events
report events.exit $?
hung_tasks hung_tasks "$(date +%s.%N)"
report done yes
"#;

#[test]
fn pulled_drive_fails_with_eio_and_is_reported() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let images: Vec<_> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("nvme{i}.img"));
            make_file(&p, NVME_BYTES);
            p
        })
        .collect();
    let run = Vm::new(dir.path())
        .nvme(&images[0], "sluice-nvme0")
        .nvme(&images[1], "sluice-nvme1")
        .nvme(&images[2], "sluice-nvme2")
        .module("ublk_drv")
        .timeout(Duration::from_secs(300))
        .run(
            &JOB.replace("@SLUICE@", path_str(&sluice_bin()))
                .replace("@QD1@", path_str(&qd1_latency_bin())),
        )
        .expect("boot");
    run.print_timings("vm_hot_remove");
    run.ensure_complete();
    eprintln!(
        "removal logged after {} s: {}; fio on the pulled drive: exit {} ({}), {} s after the \
         removal; events: {}",
        run.result("removal.log_seconds"),
        run.result("removal.log"),
        run.result("fio1.exit"),
        run.result("fio1.error"),
        run.result("fio1.seconds_after_removal"),
        run.result("events"),
    );
    run.ensure_eq("removed.written", "0");
    let logged: f64 = run.result("removal.log_seconds").parse().expect("seconds");
    run.ensure(
        !run.result("removal.log").is_empty() && logged < 2.0,
        format!("the removal was not logged within 2 s ({logged} s)"),
    );
    run.ensure(
        run.result("fio1.exit") != "0",
        "fio on the pulled drive did not fail",
    );
    run.ensure(
        run.result("fio1.error").contains("Input/output error"),
        format!("fio's error: {:?}", run.result("fio1.error")),
    );
    run.ensure_eq("ublk_nospc", "0");
    run.ensure_eq("nodes", "d0=open d1=removed d2=open");
    run.ensure(
        run.result("read.exit") != "0",
        "a read of the pulled drive succeeded",
    );
    run.ensure(
        run.result("read.error").contains("Input/output error"),
        format!("the read's error: {:?}", run.result("read.error")),
    );
    // vhost-user: the pulled drive's export answers reads with errors (the client fails, it
    // is not killed by the timeout); the other drive's export serves.
    let v1: i32 = run.result("v1.exit").parse().expect("v1.exit");
    run.ensure(
        v1 != 0 && v1 != 124 && v1 != 137,
        format!("qd1_latency on the pulled drive's vhost-user export exited {v1}"),
    );
    run.ensure_eq("v0.exit", "0");
    run.ensure_eq("v1.back_exit", "0");
    run.ensure_eq("stop.gone", "yes");
    run.ensure_eq("fio0.exit", "0");
    let events = run.result("events");
    for want in [
        "node_removed:d1",
        "node_removed:d2",
        "export_stopped:u2",
        "node_reopened:d1",
        "node_reopened:d2",
    ] {
        run.ensure(
            events.contains(want),
            format!("event {want} missing: {events}"),
        );
    }
    // The drives come back: d1 by itself, d2 by hand; d1's export serves again.
    eprintln!(
        "reattached after {} s: {}",
        run.result("reattach.seconds"),
        run.result("reattach.log")
    );
    run.ensure(
        !run.result("reattach.log").is_empty(),
        "d1 was not reattached",
    );
    run.ensure_eq("back.write", "0");
    run.ensure_eq("back.read", "same");
    run.ensure(
        run.result("reopen0.exit") != "0",
        "node-reopen of an open node worked",
    );
    run.ensure(
        run.result("reopen0.error").contains("is not removed"),
        format!("node-reopen d0: {:?}", run.result("reopen0.error")),
    );
    run.ensure_eq("reopen2.exit", "0");
    run.ensure_eq("nodes.after", "d0=open d1=open d2=open");
    run.ensure_eq("sluice.exit", "0");
    run.ensure_eq("not_flushed", "0");
    run.ensure_eq("events.exit", "0");
    run.ensure_eq("hung_tasks", "0");
}
