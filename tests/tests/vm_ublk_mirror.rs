//! A node served over ublk is mirrored to a second drive while in use, and pivoted: inside a
//! QEMU guest with two emulated NVMe drives, the real sluice serves `nvme0n1` as
//! `/dev/ublkb0` (2 queues), and the guest
//! 1. makes an ext4 file system on ublkb0, mounts it, writes files and starts fio (io_uring,
//!    O_DIRECT, random 4 KiB writes with crc32c verify) on a file in it;
//! 2. while fio writes: `sluice ctl node-add` `nvme1n1`, `sluice ctl mirror`, waits for the
//!    job to be ready, writes more files, `sluice ctl job-complete`;
//! 3. writes files after the pivot, waits for fio (its verify pass reads back through the
//!    pivoted device), `sluice ctl node-remove` of the first drive; the first drive is then
//!    released (an `O_EXCL` open of `nvme0n1` from another process succeeds);
//! 4. ublkb0 kept its major:minor and its mount the whole time; unmounts, `fsck.ext4 -fn`
//!    clean, the files intact; the whole of ublkb0 hashed;
//! 5. a second mirror, back onto `nvme0n1`, is started and cancelled: ublkb0 is untouched
//!    and still served by `nvme1n1`;
//! 6. SIGTERM → exit 0; then `nvme1n1` itself holds what ublkb0 held, byte for byte
//!    (hash), `fsck.ext4 -fn` of `nvme1n1` is clean and its files intact.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::time::Duration;

use sluice_tests::vm::{skip_unless_available, Vm};
use sluice_tests::{make_file, path_str, sluice_bin, MIB};

const NVME_BYTES: u64 = 128 * MIB;

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
C=/tmp/ctl.sock
ctl() { "$S" ctl --control $C "$@"; }
# files FROM TO: writes files f<FROM>..f<TO> (64 KiB x i, random) into the mount, adds
# their sums to /tmp/sums.
files() {
    for i in $(seq $1 $2); do
        dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=$((i % 7 + 1)) status=none
        (cd /mnt/t && sha256sum f$i) >>/tmp/sums
    done
}
# phase ID: the job's phase.
phase() { ctl --json job-status $1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["phase"])'; }
# wait_ready ID: waits (120 s at most) for the job to be ready; reports ID.ready.
wait_ready() {
    for _ in $(seq 1200); do
        p=$(phase $1)
        if [ "$p" = ready ]; then report "$1.ready" yes; return 0; fi
        if [ "$p" != running ]; then break; fi
        sleep 0.1
    done
    report "$1.ready" "no:$p"; ctl --json job-status $1
    return 1
}
# exclusive DEV: whether another process can open DEV with O_EXCL (nobody claims it).
exclusive() {
    python3 -c "import os, sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)" $1 2>/dev/null \
        && echo free || echo claimed
}

start sluice 1 --disk /dev/nvme0n1 --ublk 0 --queues 2 --control $C
report dev.before "$(cat /sys/block/ublkb0/dev)"
report nvme0.while_served "$(exclusive /dev/nvme0n1)"
lap start

# ---- 1. ext4 in use, fio verify on a file in it ----
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/t
if ! mount -t ext4 /dev/ublkb0 /mnt/t; then report mounted no; exit 1; fi
report mounted yes
: >/tmp/sums
files 1 8
timeout -k 5 300 fio --name=mirror --filename=/mnt/t/fio.dat --size=24M --ioengine=io_uring \
    --direct=1 --eta=never --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c \
    --output=/tmp/fio.log &
fio_pid=$!
sleep 1
lap fs

# ---- 2. mirror to nvme1n1 while fio writes; complete ----
ctl node-add target /dev/nvme1n1
report node_add $?
ctl mirror --node disk0 --target target --id m1
report mirror $?
wait_ready m1
files 9 12
if kill -0 $fio_pid 2>/dev/null; then report fio.during_complete running; else report fio.during_complete finished; fi
ctl job-complete m1
report complete $?
lap mirror

# ---- 3. after the pivot ----
files 13 16
wait $fio_pid
report fio.exit $?
cat /tmp/fio.log
sync
ctl node-remove disk0
report node_remove $?
report nvme0.after_remove "$(exclusive /dev/nvme0n1)"
report nvme1.while_served "$(exclusive /dev/nvme1n1)"
ctl nodes
lap after

# ---- 4. the device and the file system ----
report dev.after "$(cat /sys/block/ublkb0/dev)"
if grep -q '^/dev/ublkb0 /mnt/t ' /proc/mounts; then report still_mounted yes; else report still_mounted no; fi
umount /mnt/t
if fsck.ext4 -fn /dev/ublkb0; then report fsck clean; else report fsck "failed:$?"; fi
mount -t ext4 -o ro /dev/ublkb0 /mnt/t
if (cd /mnt/t && sha256sum --quiet -c /tmp/sums); then report files intact; else report files damaged; fi
umount /mnt/t
report ublk.sum "$(dd if=/dev/ublkb0 bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)"
lap check

# ---- 5. a second mirror, back onto nvme0n1, cancelled ----
ctl node-add back /dev/nvme0n1
report back.node_add $?
ctl mirror --node target --target back --id m2
report back.mirror $?
sleep 1
ctl job-cancel m2
report back.cancel $?
ctl node-remove back
report back.ublk.sum "$(dd if=/dev/ublkb0 bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)"
lap cancel

# ---- 6. stop; the second drive on its own ----
stop sluice $pid
report switched "$(grep -c 'queue switched node' /tmp/sluice.err)"
report nvme1.sum "$(dd if=/dev/nvme1n1 bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)"
if fsck.ext4 -fn /dev/nvme1n1; then report nvme1.fsck clean; else report nvme1.fsck "failed:$?"; fi
mount -t ext4 -o ro /dev/nvme1n1 /mnt/t
if (cd /mnt/t && sha256sum --quiet -c /tmp/sums); then report nvme1.files intact; else report nvme1.files damaged; fi
umount /mnt/t
lap stop
report done yes
"#;

#[test]
fn ublk_node_mirrored_and_pivoted_while_mounted() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, target) = (dir.path().join("nvme0.img"), dir.path().join("nvme1.img"));
    make_file(&source, NVME_BYTES);
    make_file(&target, NVME_BYTES);
    let run = Vm::new(dir.path())
        .nvme(&source, "sluice-nvme0")
        .nvme(&target, "sluice-nvme1")
        .module("ublk_drv")
        .module("ext4")
        .timeout(Duration::from_secs(540))
        .run(&JOB.replace("@SLUICE@", path_str(&sluice_bin())))
        .expect("boot");
    run.print_timings("vm_ublk_mirror");
    run.ensure_complete();
    eprintln!(
        "fio during job-complete: {}; queues switched: {}",
        run.result("fio.during_complete"),
        run.result("switched")
    );
    // While served, sluice holds nvme0n1 exclusively.
    run.ensure_eq("nvme0.while_served", "claimed");
    run.ensure_eq("mounted", "yes");
    for key in ["node_add", "mirror", "complete", "node_remove"] {
        run.ensure_eq(key, "0");
    }
    run.ensure_eq("m1.ready", "yes");
    run.ensure_eq("fio.exit", "0");
    // The first drive is released; the second is now the one held.
    run.ensure_eq("nvme0.after_remove", "free");
    run.ensure_eq("nvme1.while_served", "claimed");
    // The device kept its identity and its mount.
    run.ensure_eq("dev.after", run.result("dev.before"));
    run.ensure_eq("still_mounted", "yes");
    run.ensure_eq("fsck", "clean");
    run.ensure_eq("files", "intact");
    // Every queue moved to the target.
    run.ensure_eq("switched", "2");
    // A cancelled mirror changes nothing the consumer sees.
    for key in ["back.node_add", "back.mirror", "back.cancel"] {
        run.ensure_eq(key, "0");
    }
    run.ensure_eq("back.ublk.sum", run.result("ublk.sum"));
    run.ensure_eq("sluice.exit", "0");
    // The second drive holds the data byte for byte.
    run.ensure_eq("nvme1.sum", run.result("ublk.sum"));
    run.ensure_eq("nvme1.fsck", "clean");
    run.ensure_eq("nvme1.files", "intact");
}
