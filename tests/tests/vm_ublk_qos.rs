//! QoS on a real `/dev/ublkb0` in a QEMU guest: sluice serves an emulated NVMe drive with
//! `--qos-iops 200`; fio (4 KiB random reads, depth 16, 3 s) completes and is held to
//! roughly the limit (wide bounds: this is software emulation); `sluice ctl qos --clear`
//! lifts it and the same fio runs faster than the limit allows; with the limit set again
//! at 20 IOPS and fio waiting on parked requests, SIGTERM still stops sluice promptly
//! (close-all starts what is parked) with exit 0, and no task hangs.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::time::Duration;

use sluice_tests::vm::{skip_unless_available, Vm};
use sluice_tests::{make_file, sluice_bin, MIB};

const NVME_BYTES: u64 = 128 * MIB;

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
W=$SLUICE_VM_WORK
C=/tmp/sluice-control.sock
hung_task_watch
# fio_iops NAME: 3 s of 4 KiB random reads at depth 16 on ublkb0; reports NAME.exit and
# NAME.iops (whole IOPS).
fio_iops() {
    timeout -k 5 60 fio --name=$1 --filename=/dev/ublkb0 --rw=randread --bs=4k \
        --iodepth=16 --ioengine=io_uring --direct=1 --time_based --runtime=3 \
        --output-format=json --output=$W/$1.json 2>/tmp/$1.err
    report "$1.exit" $?
    report "$1.iops" "$(grep -o '"iops" *: *[0-9.]*' $W/$1.json | head -1 | sed 's/.*: *//; s/\..*//')"
    if [ -s /tmp/$1.err ]; then echo "--- fio $1 stderr ---"; cat /tmp/$1.err; fi
}

start sluice 1 --disk /dev/nvme0n1 --ublk 0 --control $C --qos-iops 200 --qos-burst 0.05
report ready "$(ready sluice)"
fio_iops limited
"$S" ctl --control $C qos ublk --clear
report clear $?
fio_iops free
"$S" ctl --control $C qos ublk --iops 20 --burst 0.01
report set_again $?
# fio waits on parked requests (16 in flight at 20 IOPS) when SIGTERM comes.
timeout -k 5 60 fio --name=parked --filename=/dev/ublkb0 --rw=randread --bs=4k --iodepth=16 \
    --ioengine=io_uring --direct=1 --time_based --runtime=30 --output-format=json \
    --output=$W/parked.json >/dev/null 2>&1 &
fio_pid=$!
sleep 2
t=$(date +%s.%N)
stop sluice $pid
report stop_seconds "$(since $t)"
wait $fio_pid
report parked.exit $?
hung_tasks hung $t
report done yes
"#;

#[test]
fn qos_on_ublk() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    make_file(&nvme, NVME_BYTES);
    let job = JOB.replace("@SLUICE@", sluice_bin().to_str().expect("utf-8 path"));
    let run = Vm::new(dir.path())
        .nvme(&nvme, "sluice-nvme0")
        .module("ublk_drv")
        .timeout(Duration::from_secs(150))
        .run(&job)
        .expect("boot");
    run.print_timings("vm_ublk_qos");
    run.ensure_complete();
    for key in [
        "limited.exit",
        "clear",
        "free.exit",
        "set_again",
        "sluice.exit",
    ] {
        let v = run.result(key);
        run.ensure(v == "0", format!("{key} = {v}"));
    }
    let limited = run.result_u64("limited.iops");
    let free = run.result_u64("free.iops");
    eprintln!("fio under --qos-iops 200: {limited} IOPS; after --clear: {free} IOPS (TCG)");
    // 200 IOPS for 3 s plus a 10-request burst: about 203. Wide bounds: the
    // guest's clock and fio's accounting under emulation.
    run.ensure(
        (100..=300).contains(&limited),
        format!("fio got {limited} IOPS under a 200 IOPS limit"),
    );
    run.ensure(
        free > 400,
        format!("fio got {free} IOPS with the limit lifted (limited: {limited})"),
    );
    let stop: f64 = run.result("stop_seconds").parse().unwrap_or(f64::MAX);
    eprintln!(
        "SIGTERM with fio parked at 20 IOPS: sluice gone after {stop} s; fio exit {}",
        run.result("parked.exit")
    );
    // Close-all removes the device; the parked requests start at once
    // instead of at 20 per second (16 of them: almost a second), and the
    // emulated machine is slow: a wide bound.
    run.ensure(
        stop < 10.0,
        format!("SIGTERM with parked requests took {stop} s"),
    );
    let hung = run.result("hung");
    run.ensure(
        hung == "0" || hung == "none",
        format!("{hung} hung-task reports"),
    );
}
