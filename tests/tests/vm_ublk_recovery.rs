//! A ublk device outlives its server: inside a QEMU guest, the real sluice serves an emulated
//! NVMe drive as `/dev/ublkb0` (2 queues), with ext4 mounted on it and fio (io_uring,
//! O_DIRECT, random 4 KiB writes, crc32c verify) plus a checksummed file writer running in
//! it. Five times, sluice is killed with SIGKILL and the same command started again: the
//! device stays (quiesced, its I/O held), the new sluice takes it over, and the pause is
//! measured. Afterwards fio exits 0, every file verifies, dmesg has no I/O error on ublkb0,
//! major:minor never changed, and after `umount` `fsck.ext4 -fn` is clean. A SIGTERM still
//! removes the device. Then the other cases of an id that exists:
//! - a device made with `--ublk-no-recovery` whose server was killed is removed and created
//!   again by the next `sluice serve` (one log line says so);
//! - an id that a live sluice serves is refused, naming that process, and the live one is
//!   undisturbed.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::time::Duration;

use sluice_tests::vm::{skip_unless_available, Vm};
use sluice_tests::{make_file, path_str, sluice_bin, MIB};

const NVME_BYTES: u64 = 256 * MIB;
const KILLS: u32 = 5;

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
ublk_errors() { dmesg | grep -i 'ublkb0' | grep -ci 'error'; }
serve() { start "$1" 1 --disk /dev/nvme0n1 --ublk 0 --queues 2; }
# An upgrade is a new binary started over a killed one: the even kills start this copy.
cp "$S" /tmp/sluice-upgraded
OLD=$S

# ---- 1. a mounted ublkb0, written to ----
serve r0
report dev.before "$(cat /sys/block/ublkb0/dev)"
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/t
if ! mount -t ext4 /dev/ublkb0 /mnt/t; then report mounted no; exit 1; fi
report mounted yes
hung_task_watch
timeout -k 5 400 fio --name=crash --filename=/mnt/t/fio.dat --size=96M --ioengine=io_uring \
    --direct=1 --eta=never --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c \
    --output=/tmp/fio.log &
fio_pid=$!
# A second writer: files with their sums, each synced.
: >/tmp/sums
(
    i=0
    while [ ! -e /tmp/stop-writer ]; do
        i=$((i + 1))
        dd if=/dev/urandom of=/mnt/t/f$i bs=16k count=$((i % 5 + 1)) conv=fsync status=none || break
        (cd /mnt/t && sha256sum f$i) >>/tmp/sums
    done
) &
writer=$!
sleep 2
lap setup

# ---- 2. SIGKILL and the same command, KILLS times ----
for k in $(seq KILLS); do
    if kill -0 $fio_pid 2>/dev/null; then report kill$k.fio running; else report kill$k.fio done; fi
    t0=$(date +%s.%N)
    kill -KILL $pid
    wait $pid 2>/dev/null
    if [ -b /dev/ublkb0 ]; then report kill$k.device_kept yes; else report kill$k.device_kept no; fi
    report kill$k.state "$(cat /sys/block/ublkb0/dev 2>/dev/null)"
    if [ $((k % 2)) = 0 ]; then S=/tmp/sluice-upgraded; else S=$OLD; fi
    serve r$k
    report kill$k.binary "$(readlink /proc/$pid/exe)"
    report kill$k.pause "$(since $t0)"
    grep -q 'taking it over' /tmp/r$k.err && report kill$k.recovered yes || report kill$k.recovered no
    sleep 2
done
S=$OLD
lap kills
report recover.line "$(grep -m1 'taking it over' /tmp/r1.err)"

wait $fio_pid
report fio.exit $?
cat /tmp/fio.log
touch /tmp/stop-writer
wait $writer
report files.count "$(wc -l </tmp/sums)"
if (cd /mnt/t && sha256sum --quiet -c /tmp/sums); then report files intact; else report files damaged; fi
report dev.after "$(cat /sys/block/ublkb0/dev)"
umount /mnt/t
if fsck.ext4 -fn /dev/ublkb0; then report fsck clean; else report fsck "failed:$?"; fi
report ublk_errors "$(ublk_errors)"
hung_tasks hung_tasks "$(date +%s.%N)"
lap check

# ---- 3. a live server's id is refused, naming it ----
timeout 30 "$S" serve --disk null:64M --ublk 0 >/tmp/dup.out 2>/tmp/dup.err
report dup.exit $?
report dup.error "$(grep '^sluice:' /tmp/dup.err | tail -1)"
report dup.pid "$pid"
if kill -0 $pid 2>/dev/null && [ -b /dev/ublkb0 ]; then report dup.first_alive yes; else report dup.first_alive no; fi

# ---- 4. SIGTERM still removes the device ----
stop r$KILLS_LAST $pid
if [ -e /dev/ublkb0 ] || [ -e /sys/class/ublk-char/ublkc0 ]; then report sigterm.gone no; else report sigterm.gone yes; fi
lap sigterm

# ---- 5. a device made without recovery, its server killed: removed, made again ----
start stale 1 --disk /dev/nvme0n1 --ublk 3 --ublk-no-recovery
kill -KILL $pid
wait $pid 2>/dev/null
sleep 1
if [ -e /sys/class/ublk-char/ublkc3 ]; then report stale.left yes; else report stale.left no; fi
start stale2 1 --disk /dev/nvme0n1 --ublk 3
grep -q 'cannot be recovered: removed' /tmp/stale2.err && report stale.removed_line yes || report stale.removed_line no
report stale.line "$(grep -m1 'cannot be recovered' /tmp/stale2.err)"
if [ -b /dev/ublkb3 ]; then report stale.served yes; else report stale.served no; fi
stop stale2 $pid
if [ -e /sys/class/ublk-char/ublkc3 ]; then report stale.gone no; else report stale.gone yes; fi
lap stale

# ---- 6. a device nobody takes over is named at start-up; its export takes it over ----
start orphan 1 --disk null:64M --ublk 7 --control /tmp/orphan.sock
kill -KILL $pid
wait $pid 2>/dev/null
start other 1 --disk null:64M --ublk 8 --control /tmp/other.sock
other=$pid
report orphan.line "$(grep -m1 'ublk device 7 waits for its server' /tmp/other.err)"
# A start that takes the device over and then fails (its control socket is taken) leaves it
# waiting, as it found it.
timeout 60 "$S" serve --disk null:64M --ublk 7 --control /tmp/other.sock >/tmp/failed.out 2>/tmp/failed.err
report orphan.failed_exit $?
report orphan.failed_error "$(grep '^sluice:' /tmp/failed.err | tail -1)"
if [ -b /dev/ublkb7 ]; then report orphan.kept yes; else report orphan.kept no; fi
start orphan2 1 --disk null:64M --ublk 7 --control /tmp/orphan2.sock
grep -q 'taking it over' /tmp/orphan2.err && report orphan.recovered yes || report orphan.recovered no
dd if=/dev/ublkb7 of=/dev/null bs=4k count=1 iflag=direct status=none
report orphan.read $?
stop orphan2 $pid
stop other $other
if [ -e /sys/class/ublk-char/ublkc7 ] || [ -e /sys/class/ublk-char/ublkc8 ]; then report orphan.gone no; else report orphan.gone yes; fi
lap orphan
report done yes
"#;

#[test]
fn ublk_device_survives_sigkill_and_restart() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    make_file(&nvme, NVME_BYTES);
    let job = JOB
        .replace("@SLUICE@", path_str(&sluice_bin()))
        .replace("$KILLS_LAST", &KILLS.to_string())
        .replace("KILLS", &KILLS.to_string());
    let run = Vm::new(dir.path())
        .nvme(&nvme, "sluice-nvme0")
        .module("ublk_drv")
        .module("ext4")
        .timeout(Duration::from_secs(560))
        .run(&job)
        .expect("boot");
    run.print_timings("vm_ublk_recovery");
    run.ensure_complete();
    let pauses: Vec<&str> = (1..=KILLS)
        .map(|k| run.result(&format!("kill{k}.pause")))
        .collect();
    eprintln!(
        "SIGKILL to a taken-over device, per kill (s): {pauses:?}; fio during the kills: {:?}; \
         {} files written",
        (1..=KILLS)
            .map(|k| run.result(&format!("kill{k}.fio")))
            .collect::<Vec<_>>(),
        run.result("files.count")
    );
    eprintln!("{}", run.result("recover.line"));
    eprintln!("{}", run.result("stale.line"));
    run.ensure_eq("mounted", "yes");
    for k in 1..=KILLS {
        run.ensure_eq(&format!("kill{k}.device_kept"), "yes");
        run.ensure_eq(&format!("kill{k}.state"), run.result("dev.before"));
        run.ensure_eq(&format!("kill{k}.recovered"), "yes");
    }
    for k in 1..=KILLS {
        run.ensure(
            run.result(&format!("kill{k}.fio")) == "running",
            format!(
                "fio had finished before SIGKILL {k}: that kill proves nothing about I/O in flight"
            ),
        );
    }
    run.ensure_eq("fio.exit", "0");
    run.ensure_eq("files", "intact");
    run.ensure(
        run.result_u64("files.count") > 0,
        "the writer wrote nothing",
    );
    run.ensure_eq("dev.after", run.result("dev.before"));
    run.ensure_eq("fsck", "clean");
    run.ensure_eq("ublk_errors", "0");
    run.ensure_eq("hung_tasks", "0");
    // An id that a live server holds: refused, naming it.
    run.ensure(
        run.result("dup.exit") != "0",
        "a second server for a live id started",
    );
    let want = format!(
        "ublk device 0 is served by process {} (sluice)",
        run.result("dup.pid")
    );
    run.ensure(
        run.result("dup.error").contains(&want),
        format!(
            "dup.error: {:?}, expected {want:?}",
            run.result("dup.error")
        ),
    );
    run.ensure_eq("dup.first_alive", "yes");
    run.ensure_eq(&format!("r{KILLS}.exit"), "0");
    run.ensure_eq("sigterm.gone", "yes");
    // Without recovery, a killed server's device is removed and made again.
    eprintln!(
        "a no-recovery device after SIGKILL was left behind: {}",
        run.result("stale.left")
    );
    if run.result("stale.left") == "yes" {
        run.ensure_eq("stale.removed_line", "yes");
    }
    run.ensure_eq("stale.served", "yes");
    run.ensure_eq("stale2.exit", "0");
    run.ensure_eq("stale.gone", "yes");
    // The upgraded binary took the device over as the old one did.
    for k in (2..=KILLS).step_by(2) {
        run.ensure_eq(&format!("kill{k}.binary"), "/tmp/sluice-upgraded");
    }
    // A device waiting for a server that nobody starts is named, and its
    // export, started again, takes it over.
    run.ensure(
        !run.result("orphan.line").is_empty(),
        "sluice did not name the ublk device waiting for its server",
    );
    run.ensure(
        run.result("orphan.failed_exit") != "0"
            && run.result("orphan.failed_error").contains("control socket"),
        format!(
            "a start with a taken control socket: exit {}, {:?}",
            run.result("orphan.failed_exit"),
            run.result("orphan.failed_error")
        ),
    );
    run.ensure_eq("orphan.kept", "yes");
    run.ensure_eq("orphan.recovered", "yes");
    run.ensure_eq("orphan.read", "0");
    run.ensure_eq("orphan2.exit", "0");
    run.ensure_eq("other.exit", "0");
    run.ensure_eq("orphan.gone", "yes");
}
