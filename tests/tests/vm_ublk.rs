//! The real sluice serving emulated drives as `/dev/ublkbN` through the kernel's ublk driver,
//! inside a QEMU guest (the host kernel has no ublk driver). sluice, fio, mkfs.ext4 and the
//! libblkio client `qd1_latency` are the host's binaries, run in the guest over the shared
//! root. Two boots:
//!
//! [`ublk_over_nvme_and_sata`] — NVMe and SATA drives, one boot, three daemons in turn:
//! 1. `--disk /dev/nvme0n1 --ublk 0 --queues 2`: ublkb0 has 2 hardware queues and the
//!    write cache, FUA, block sizes, discard and write-zeroes limits of nvme0n1; fio
//!    (io_uring, O_DIRECT, 4 KiB random writes, 64 MiB, crc32c verify) passes; in the QEMU
//!    trace of the NVMe drive, bracketed by O_DIRECT reads of nvme0n1 at unusual LBAs, a
//!    plain write through ublkb0 reaches the drive without a flush, a guest fsync of ublkb0
//!    reaches it as a flush, an `oflag=dsync` write as a write (whose FUA bit the guest's
//!    block tracepoints show on nvme0n1: QEMU's trace has no FUA field), and sluice's
//!    shutdown as a flush; SIGTERM → exit 0, ublkb0 gone, and a pattern written through
//!    ublkb0 reads back raw from nvme0n1 (in the guest with O_DIRECT, and from the image on
//!    the host).
//! 2. `--disk /dev/sda --ublk 5 --queues 2`: same parameter match (the AHCI disk has discard
//!    but no write zeroes, and ublkb5 must say the same); a second sluice asking for ublk id
//!    5 is refused with a clear message and a non-zero exit and disturbs nothing; then fio
//!    verify and ext4 (mkfs, files, sync, umount, `fsck.ext4 -fn` clean, files intact).
//! 3. One sluice from a config file: nvme0n1 as ublk id 1, sda over a vhost-user socket;
//!    both ready lines; fio on ublkb1 while `qd1_latency` reads through the socket; SIGTERM
//!    → exit 0, ublkb1 and the socket gone.
//!
//! [`ublk_sigterm_with_io_in_flight`] — SIGTERM to sluice while fio (queue depth 32) has
//! writes in flight on ublkb0: sluice exits 0, ublkb0 goes away, fio ends (with errors) within a
//! bound, no task hangs, and a pattern fsync'ed before the storm is on the NVMe drive.
//!
//! Both run on every kernel pinned in tests/vm/kernel-version (Linux 6.12 and 6.18; the first
//! boot also prints the ublk driver's feature bits), one after the other; `SLUICE_VM_KERNEL`
//! picks one. Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`); `cargo test` builds `qd1_latency`.

use std::time::Duration;

use sluice_tests::vm::{available_kernels, qd1_latency_bin, skip_unless_available, Vm, VmRun};
use sluice_tests::{assert_file_holds, make_file, path_str, pattern, sluice_bin, MIB};

const NVME_BYTES: u64 = 256 * MIB;
const SATA_BYTES: u64 = 256 * MIB;
/// The pattern the guest writes through ublkb0 and finds raw on nvme0n1 (1 MiB, [`SEED`]).
const PATTERN_OFFSET: u64 = 100 * MIB;
const PATTERN_BYTES: usize = MIB as usize;
const SEED: u64 = 0x0b1c_u64 << 48 | 0x5eed;
/// Where the storm boot fsyncs its pattern: beyond the 128 MiB the storm writes.
const STORM_PATTERN_OFFSET: u64 = 200 * MIB;
const STORM_BYTES: u64 = 128 * MIB;
/// 4 KiB blocks of nvme0n1 (through ublkb0 for the writes) used to make the trace
/// attributable: `MARKS` are O_DIRECT reads of nvme0n1 itself, between which the guest does
/// one thing to ublkb0. Nothing else touches 230–256 MiB.
const PLAIN_BLOCK: u64 = 230 * 256 + 7;
const FUA_BLOCK: u64 = 230 * 256 + 19;
const MARKS: [u64; 6] = [
    240 * 256 + 11,
    240 * 256 + 23,
    240 * 256 + 37,
    240 * 256 + 51,
    240 * 256 + 67,
    240 * 256 + 83,
];
/// The queue parameters ublkbN must share with its backing drive.
const PARAMS: [&str; 7] = [
    "write_cache",
    "fua",
    "logical_block_size",
    "physical_block_size",
    "discard_max_bytes",
    "discard_granularity",
    "write_zeroes_max_bytes",
];

/// Shell helpers shared by both jobs.
const HELPERS: &str = r#"
set -uo pipefail
S=@SLUICE@
W=$SLUICE_VM_WORK
T=/sys/kernel/tracing
[ -e $T/events/block ] || mount -t tracefs nodev $T
# gone NAME DEV: reports NAME.gone yes when neither /dev/DEV nor /sys/block/DEV exists.
gone() {
    if [ -e /dev/$2 ] || [ -e /sys/block/$2 ]; then report "$1.gone" no; else report "$1.gone" yes; fi
}
# params NAME UBLK BACKING: the queue parameters of both, and ublk's hardware queues.
params() {
    for f in PARAMS; do
        report "$1.ublk.$f" "$(cat /sys/block/$2/queue/$f)"
        report "$1.backing.$f" "$(cat /sys/block/$3/queue/$f)"
    done
    report "$1.hw_queues" "$(ls /sys/block/$2/mq | wc -l)"
}
# same NAME FILE DD_ARGS...: reports NAME same|differs for FILE and what dd DD_ARGS reads.
same() {
    local name=$1 file=$2; shift 2
    if dd "$@" status=none | cmp - "$file"; then report "$name" same; else report "$name" differs; fi
}
"#;

const JOB_NVME_SATA: &str = r#"
# marker BLOCK: an O_DIRECT 4 KiB read of nvme0n1 itself, a landmark in the QEMU trace.
marker() { dd if=/dev/nvme0n1 of=/dev/null bs=4k count=1 skip=$1 iflag=direct status=none; }
# rwbs DEV SECTOR: the rwbs flags of the traced requests issued to DEV (maj,min) at SECTOR.
rwbs() {
    awk -v dev="$1" -v sec="$2" '{ for (i = 1; i <= NF; i++) if ($i == "block_rq_issue:") {
        if ($(i + 1) == dev && $(i + 5) == sec) print $(i + 2); break } }' $T/trace | tr '\n' ' '
}

# ---- 1. nvme0n1 as ublkb0, from the command line ----
# sluice logs the driver's feature bits (UBLK_U_CMD_GET_FEATURES) at debug level.
SLUICE_LOG=info,sluice::export::ublk=debug start nvme 1 --disk /dev/nvme0n1 --ublk 0 --queues 2
p=$pid
report ublk.features "$(grep -o 'ublk driver features 0x[0-9a-f]*' /tmp/nvme.err | head -1 | awk '{ print $4 }')"
report nvme.ready "$(ready nvme)"
params nvme ublkb0 nvme0n1
fio_verify nvme /dev/ublkb0 64M
lap nvme_fio

dev_ublk=$(tr : , </sys/block/ublkb0/dev)
dev_nvme=$(tr : , </sys/block/nvme0n1/dev)
echo >$T/trace
echo 1 >$T/events/block/block_rq_issue/enable
marker MARK0
dd if=$W/pattern.bin of=/dev/ublkb0 bs=4k count=1 seek=PLAIN_BLOCK oflag=direct status=none
marker MARK1
sync /dev/ublkb0
report nvme.fsync $?
marker MARK2
dd if=$W/pattern.bin of=/dev/ublkb0 bs=4k count=1 seek=FUA_BLOCK oflag=direct,dsync status=none
report nvme.dsync_write $?
marker MARK3
echo 0 >$T/events/block/block_rq_issue/enable
grep -v '^#' $T/trace
report rwbs.plain.ublk "$(rwbs $dev_ublk $((PLAIN_BLOCK * 8)))"
report rwbs.plain.nvme "$(rwbs $dev_nvme $((PLAIN_BLOCK * 8)))"
report rwbs.fua.ublk "$(rwbs $dev_ublk $((FUA_BLOCK * 8)))"
report rwbs.fua.nvme "$(rwbs $dev_nvme $((FUA_BLOCK * 8)))"

dd if=$W/pattern.bin of=/dev/ublkb0 bs=1M seek=PATTERN_MIB oflag=direct status=none
same nvme.readback $W/pattern.bin if=/dev/ublkb0 bs=1M skip=PATTERN_MIB count=1 iflag=direct
marker MARK4
stop nvme $p
marker MARK5
gone nvme ublkb0
same nvme.raw $W/pattern.bin if=/dev/nvme0n1 bs=1M skip=PATTERN_MIB count=1 iflag=direct
lap nvme_rest

# ---- 2. sda as ublkb5; a second server for id 5 is refused ----
start sata 1 --disk /dev/sda --ublk 5 --queues 2
p=$pid
report sata.ready "$(ready sata)"
params sata ublkb5 sda
before=$(ls /sys/class/ublk-char | tr '\n' ' ')
timeout 30 "$S" serve --disk null:64M --ublk 5 >/tmp/dup.out 2>/tmp/dup.err
report dup.exit $?
cat /tmp/dup.err
report dup.error "$(grep '^sluice:' /tmp/dup.err | tail -1)"
report dup.ready_lines "$(grep -c '"event":"ready"' /tmp/dup.out)"
report dup.ublk_devices_before "$before"
report dup.ublk_devices_after "$(ls /sys/class/ublk-char | tr '\n' ' ')"
if kill -0 $p 2>/dev/null; then report dup.first_alive yes; else report dup.first_alive no; fi
fio_verify sata /dev/ublkb5 64M
lap sata_fio

ext4_check /dev/ublkb5
stop sata $p
gone sata ublkb5
lap sata_rest

# ---- 3. one daemon from a config file: ublk and vhost-user ----
cat >/tmp/sluice.toml <<'EOF'
[daemon]
metrics = "unix:/tmp/metrics.sock"

[[disk]]
name = "nvme"
path = "/dev/nvme0n1"

[[disk]]
name = "sata"
path = "/dev/sda"

[[export]]
name = "local"
disk = "nvme"
type = "ublk"
ublk_id = 1
queues = 2

[[export]]
name = "vm"
disk = "sata"
type = "vhost-user"
socket = "/tmp/vm.sock"
EOF
start mixed 2 --config /tmp/sluice.toml
p=$pid
report mixed.ready_lines "$(ready mixed | wc -l)"
report mixed.ready.local "$(ready mixed | grep '"export":"local"')"
report mixed.ready.vm "$(ready mixed | grep '"export":"vm"')"
if [ -S /tmp/vm.sock ]; then report mixed.socket yes; else report mixed.socket no; fi
report mixed.hw_queues "$(ls /sys/block/ublkb1/mq | wc -l)"
fio --name=mixed --filename=/dev/ublkb1 --ioengine=io_uring --direct=1 --eta=never --rw=randwrite --bs=4k \
    --size=64M --iodepth=16 --verify=crc32c --output=/tmp/fio-mixed.log &
fpid=$!
# The vhost-user client starts once fio's writes are flowing through ublkb1.
for _ in $(seq 200); do
    [ "$(awk '{ print $5 }' /sys/block/ublkb1/stat)" -ge 256 ] && break
    sleep 0.05
done
report mixed.ublk_writes_before_client "$(awk '{ print $5 }' /sys/block/ublkb1/stat)"
timeout 60 @QD1@ /tmp/vm.sock QD1_READS >/tmp/qd1.out 2>&1
report mixed.client_exit $?
cat /tmp/qd1.out
report mixed.client "$(tail -1 /tmp/qd1.out)"
if kill -0 $fpid 2>/dev/null; then report mixed.fio_running_after_client yes; else report mixed.fio_running_after_client no; fi
if wait $fpid; then report mixed.fio ok; else report mixed.fio "failed:$?"; cat /tmp/fio-mixed.log; fi
# Quiet now: the kernel's count of ublkb1's requests and sluice's metrics.
report mixed.kernel_reads "$(awk '{ print $1 }' /sys/block/ublkb1/stat)"
report mixed.kernel_writes "$(awk '{ print $5 }' /sys/block/ublkb1/stat)"
python3 - >/tmp/metrics.txt <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect("/tmp/metrics.sock")
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\n\r\n")
answer = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    answer += chunk
head, _, body = answer.partition(b"\r\n\r\n")
sys.stdout.write(body.decode())
sys.exit(0 if head.startswith(b"HTTP/1.1 200") else 1)
PY
report mixed.metrics_scrape $?
# The sum over a ublk export's queues of one series.
local_sum() { grep "^$1{export=\"local\",node=\"nvme\",type=\"ublk\"" /tmp/metrics.txt | awk '{ s += $2 } END { print s + 0 }'; }
report mixed.metrics.reads "$(local_sum sluice_reads_completed_total)"
report mixed.metrics.writes "$(local_sum sluice_writes_completed_total)"
report mixed.metrics.errors "$(local_sum sluice_request_errors_total)"
report mixed.metrics.in_flight "$(local_sum sluice_requests_in_flight)"
report mixed.metrics.polling "$(local_sum sluice_queue_polling_seconds_total)"
report mixed.metrics.sleeping "$(local_sum sluice_queue_sleeping_seconds_total)"
if command -v promtool >/dev/null; then
    promtool check metrics </tmp/metrics.txt >/tmp/promtool.out 2>&1
    report mixed.metrics.promtool $?
    cat /tmp/promtool.out
else
    report mixed.metrics.promtool absent
fi
# A ublk export added and removed at runtime through the control socket.
"$S" ctl node-add rt null:64M >/tmp/rt.out 2>&1
report runtime.node_add $?
"$S" ctl export-add rtx --node rt --ublk 9 >>/tmp/rt.out 2>&1
report runtime.add $?
if [ -b /dev/ublkb9 ]; then report runtime.device yes; else report runtime.device no; fi
dd if=/dev/zero of=/dev/ublkb9 bs=4k count=16 oflag=direct status=none
report runtime.io $?
"$S" ctl export-remove rtx >>/tmp/rt.out 2>&1
report runtime.remove $?
if [ -e /dev/ublkb9 ]; then report runtime.gone no; else report runtime.gone yes; fi
"$S" ctl node-remove rt >>/tmp/rt.out 2>&1
report runtime.node_remove $?
cat /tmp/rt.out
stop mixed $p
gone mixed ublkb1
if [ -e /tmp/vm.sock ]; then report mixed.socket_gone no; else report mixed.socket_gone yes; fi
lap mixed
"#;

const JOB_STORM: &str = r#"
hung_task_watch
start storm 1 --disk /dev/nvme0n1 --ublk 0 --queues 2
p=$pid
dd if=$W/pattern.bin of=/dev/ublkb0 bs=1M seek=STORM_PATTERN_MIB oflag=direct conv=fsync status=none
report storm.pattern_fsync $?
lap storm_start
timeout -k 5 60 fio --name=storm --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --eta=never \
    --rw=randwrite --bs=4k --offset=0 --size=STORM_BYTES --iodepth=32 --time_based --runtime=45 \
    --output=/tmp/fio-storm.log 2>&1 &
fpid=$!
# Signal once fio has done some work and has writes in flight right now.
# (What was seen right before the signal is reported: a second read could
# land in a gap between fio's batches.)
for _ in $(seq 400); do
    w=$(awk '{ print $5 }' /sys/block/ublkb0/stat)
    f=$(awk '{ print $2 }' /sys/block/ublkb0/inflight)
    [ "$w" -ge 1000 ] && [ "$f" -gt 0 ] && break
    sleep 0.05
done
report storm.writes_before_sigterm "$w"
report storm.inflight_at_sigterm "$f"
t0=$(date +%s.%N)
stop storm $p
report storm.stop_seconds "$(since $t0)"
timeout 30 tail --pid=$fpid -f /dev/null
wait $fpid
report storm.fio_exit $?
report storm.fio_seconds_after_sigterm "$(since $t0)"
report storm.fio_error "$(grep -m1 -i 'error' /tmp/fio-storm.log | cut -c1-160)"
report storm.sluice_drain "$(grep -o 'drain export.*' /tmp/storm.err | head -1)"
gone storm ublkb0
report storm.d_state "$(ps -eo stat=,comm= | awk '$1 ~ /^D/ { print $2 }' | tr '\n' ' ')"
hung_tasks storm.hung_tasks $t0
lap storm_sigterm_and_watch
dmesg | grep -iE 'ublk|blocked|hung|I/O error' | tail -20
same storm.raw $W/pattern.bin if=/dev/nvme0n1 bs=1M skip=STORM_PATTERN_MIB count=1 iflag=direct
"#;

/// The job text: helpers, then `body`, with the placeholders filled in.
fn job(body: &str) -> String {
    let mut text = format!("{HELPERS}{body}")
        .replace("@SLUICE@", path_str(&sluice_bin()))
        .replace("PARAMS", &PARAMS.join(" "))
        .replace("PLAIN_BLOCK", &PLAIN_BLOCK.to_string())
        .replace("FUA_BLOCK", &FUA_BLOCK.to_string())
        .replace(
            "STORM_PATTERN_MIB",
            &(STORM_PATTERN_OFFSET / MIB).to_string(),
        )
        .replace("PATTERN_MIB", &(PATTERN_OFFSET / MIB).to_string())
        .replace("STORM_BYTES", &STORM_BYTES.to_string())
        .replace("QD1_READS", "300");
    for (i, m) in MARKS.iter().enumerate() {
        text = text.replace(&format!("MARK{i}"), &m.to_string());
    }
    text.push_str("\nreport done yes\n");
    text
}

/// The pci_nvme_* events of a QEMU trace, in order: (name, arguments).
fn nvme_events(run: &VmRun) -> Vec<(&str, &str)> {
    run.trace
        .lines()
        .filter_map(|l| {
            let ev = &l[l.find("pci_nvme_")?..];
            Some(ev.split_once(' ').unwrap_or((ev, "")))
        })
        .collect()
}

/// Checks the ublk queue parameters against the backing drive's and prints both.
fn ensure_params_match(run: &VmRun, name: &str, ublk: &str, backing: &str) {
    for p in PARAMS {
        let u = run.result(&format!("{name}.ublk.{p}"));
        let b = run.result(&format!("{name}.backing.{p}"));
        eprintln!("  {p:24} {ublk}={u:14} {backing}={b}");
        run.ensure(
            u == b,
            format!("/sys/block/{ublk}/queue/{p} is {u:?} but {backing}'s is {b:?}"),
        );
    }
    run.ensure_eq(&format!("{name}.hw_queues"), "2");
}

fn ready_json(run: &VmRun, key: &str) -> serde_json::Value {
    let line = run.result(key);
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{key}: not JSON ({e}): {line}"))
}

/// The ublk feature bits (`UBLK_F_*`, include/uapi/linux/ublk_cmd.h) by bit number.
const UBLK_FEATURES: [&str; 20] = [
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
];

/// `0x1ffb` → `SUPPORT_ZERO_COPY URING_CMD_COMP_IN_TASK …`.
fn feature_names(bits: u64) -> String {
    (0..64)
        .filter(|i| bits & (1 << i) != 0)
        .map(|i| {
            UBLK_FEATURES
                .get(i)
                .map_or_else(|| format!("bit{i}"), |n| (*n).to_owned())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs on every pinned kernel whose cache is ready (6.12 and 6.18: the ublk UAPI differs).
#[test]
fn ublk_over_nvme_and_sata() {
    if skip_unless_available() {
        return;
    }
    for kernel in available_kernels() {
        ublk_over_nvme_and_sata_on(kernel);
    }
}

fn ublk_over_nvme_and_sata_on(kernel: &str) {
    eprintln!("==== vm_ublk nvme+sata on {kernel}");
    let qd1 = qd1_latency_bin();
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    let sata = dir.path().join("sata.img");
    make_file(&nvme, NVME_BYTES);
    make_file(&sata, SATA_BYTES);
    let want = pattern(PATTERN_OFFSET, PATTERN_BYTES, SEED);
    std::fs::write(dir.path().join("pattern.bin"), &want).expect("pattern.bin");

    let run = Vm::new(dir.path())
        .kernel(kernel)
        .nvme(&nvme, "sluice-nvme0")
        .sata(&sata)
        .module("ublk_drv")
        .module("ext4")
        .qemu_trace("pci_nvme_read")
        .qemu_trace("pci_nvme_write")
        .qemu_trace("pci_nvme_flush*")
        .timeout(Duration::from_secs(300))
        .run(&job(JOB_NVME_SATA).replace("@QD1@", path_str(&qd1)))
        .expect("boot");
    run.print_timings(&format!("vm_ublk nvme+sata on {kernel}"));
    run.ensure_complete();
    let features = run.result("ublk.features");
    let bits = u64::from_str_radix(features.trim_start_matches("0x"), 16).unwrap_or(0);
    eprintln!(
        "ublk driver features on {kernel}: {features} = {}",
        feature_names(bits)
    );
    run.ensure(
        bits != 0,
        format!("no ublk driver features logged ({features:?})"),
    );

    // ---- 1. nvme0n1 as ublkb0 ----
    let ready = ready_json(&run, "nvme.ready");
    eprintln!("nvme ready line: {ready}");
    run.ensure(
        ready["device"] == "/dev/ublkb0" && ready["queues"] == 2 && ready["type"] == "ublk",
        format!("nvme ready line: {ready}"),
    );
    eprintln!("ublkb0 over nvme0n1:");
    ensure_params_match(&run, "nvme", "ublkb0", "nvme0n1");
    run.ensure_eq("nvme.ublk.fua", "1");
    run.ensure_eq("nvme.ublk.write_cache", "write back");
    run.ensure_eq("nvme.fio", "ok");
    run.ensure_eq("nvme.readback", "same");
    run.ensure_eq("nvme.exit", "0");
    run.ensure_eq("nvme.gone", "yes");
    run.ensure_eq("nvme.raw", "same");
    assert_file_holds(&nvme, PATTERN_OFFSET, &want, "pattern in nvme.img");

    // ---- what reached the NVMe drive (QEMU trace), between the marker reads ----
    let events = nvme_events(&run);
    let mut names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    eprintln!(
        "QEMU trace: {} pci_nvme events, names {names:?}",
        events.len()
    );
    let lbs: u64 = run
        .result("nvme.backing.logical_block_size")
        .parse()
        .expect("logical block size");
    let lba_arg = |block: u64| format!(" lba {:#x}", block * 4096 / lbs);
    let at =
        |e: &(&str, &str), name: &str, block: u64| e.0 == name && e.1.ends_with(&lba_arg(block));
    let mark_pos: Vec<usize> = MARKS
        .iter()
        .map(|&m| {
            let hits: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| at(e, "pci_nvme_read", m))
                .map(|(i, _)| i)
                .collect();
            run.ensure(
                hits.len() == 1,
                format!(
                    "marker read of block {m} ({}) seen {} times in the QEMU trace, not once",
                    lba_arg(m).trim(),
                    hits.len()
                ),
            );
            hits[0]
        })
        .collect();
    run.ensure(
        mark_pos.windows(2).all(|w| w[0] < w[1]),
        format!("marker reads out of order in the QEMU trace: {mark_pos:?}"),
    );
    let window = |k: usize| &events[mark_pos[k] + 1..mark_pos[k + 1]];
    let flushes = |k: usize| {
        window(k)
            .iter()
            .filter(|(n, _)| *n == "pci_nvme_flush_ns")
            .count()
    };
    let show = |k: usize| {
        window(k)
            .iter()
            .map(|(n, a)| format!("{n} {a}"))
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    let windows = [
        "plain O_DIRECT write to ublkb0",
        "fsync of ublkb0",
        "O_DIRECT|O_DSYNC write to ublkb0",
        "1 MiB pattern written through ublkb0 and read back",
        "SIGTERM to sluice",
    ];
    for (k, what) in windows.iter().enumerate() {
        eprintln!(
            "trace window {k} ({what}), {} events:\n  {}",
            window(k).len(),
            show(k)
        );
    }
    run.ensure(
        window(0)
            .iter()
            .any(|e| at(e, "pci_nvme_write", PLAIN_BLOCK)),
        format!(
            "no pci_nvme_write at{} after the plain write",
            lba_arg(PLAIN_BLOCK)
        ),
    );
    run.ensure(
        flushes(0) == 0,
        format!(
            "a plain write through ublkb0 caused {} NVMe flushes",
            flushes(0)
        ),
    );
    run.ensure(
        flushes(1) >= 1,
        format!(
            "the guest's fsync of ublkb0 reached the NVMe drive as no flush:\n  {}",
            show(1)
        ),
    );
    run.ensure_eq("nvme.fsync", "0");
    run.ensure_eq("nvme.dsync_write", "0");
    run.ensure(
        window(2).iter().any(|e| at(e, "pci_nvme_write", FUA_BLOCK)),
        format!(
            "no pci_nvme_write at{} after the dsync write",
            lba_arg(FUA_BLOCK)
        ),
    );
    eprintln!(
        "dsync write window: {} flush(es) (the kernel syncs an O_DSYNC block-device write \
         after it, FUA or not); QEMU's trace has no FUA bit",
        flushes(2)
    );
    run.ensure(
        flushes(4) >= 1,
        format!(
            "sluice's SIGTERM close-all reached the NVMe drive as no flush:\n  {}",
            show(4)
        ),
    );
    // The FUA bit, as the guest's block tracepoints show it ("W" then "F" in rwbs):
    // the dsync write reaches ublkb0 with FUA, and sluice's write to nvme0n1 carries it on;
    // the plain write carries it nowhere.
    let has_fua = |rwbs: &str| rwbs.split_whitespace().any(|r| r.starts_with("WF"));
    let is_write = |rwbs: &str| rwbs.split_whitespace().any(|r| r.starts_with('W'));
    for side in ["ublk", "nvme"] {
        let plain = run.result(&format!("rwbs.plain.{side}"));
        let fua = run.result(&format!("rwbs.fua.{side}"));
        eprintln!("block_rq_issue rwbs on {side}: plain write {plain:?}, dsync write {fua:?}");
        run.ensure(
            is_write(plain) && !has_fua(plain),
            format!("plain write on {side}: rwbs {plain:?}, expected a write without FUA"),
        );
        run.ensure(
            has_fua(fua),
            format!("dsync write on {side}: rwbs {fua:?}, expected a FUA write (WF…)"),
        );
    }

    // ---- 2. sda as ublkb5, and a second server for id 5 ----
    eprintln!("ublkb5 over sda:");
    ensure_params_match(&run, "sata", "ublkb5", "sda");
    eprintln!(
        "second `--ublk 5`: exit {}, {:?}",
        run.result("dup.exit"),
        run.result("dup.error")
    );
    let dup_exit: i32 = run.result("dup.exit").parse().expect("dup.exit");
    run.ensure(
        dup_exit != 0 && dup_exit != 124,
        format!("a second server for ublk id 5 exited with {dup_exit}, expected a refusal"),
    );
    let dup_error = run.result("dup.error");
    run.ensure(
        dup_error.contains("ublk device 5 is served by process") && dup_error.contains("(sluice)"),
        format!("the refusal does not name the taken id and its server: {dup_error:?}"),
    );
    run.ensure_eq("dup.ready_lines", "0");
    run.ensure_eq(
        "dup.ublk_devices_after",
        run.result("dup.ublk_devices_before"),
    );
    run.ensure_eq("dup.first_alive", "yes");
    run.ensure_eq("sata.fio", "ok");
    run.ensure_eq("ext4.fsck", "clean");
    run.ensure_eq("ext4.files", "intact");
    run.ensure_eq("sata.exit", "0");
    run.ensure_eq("sata.gone", "yes");

    // ---- 3. ublk and vhost-user in one daemon ----
    run.ensure_eq("mixed.ready_lines", "2");
    let local = ready_json(&run, "mixed.ready.local");
    let vm = ready_json(&run, "mixed.ready.vm");
    run.ensure(
        local["type"] == "ublk" && local["device"] == "/dev/ublkb1",
        format!("ready line of the ublk export: {local}"),
    );
    run.ensure(
        vm["type"] == "vhost-user" && vm["socket"] == "/tmp/vm.sock",
        format!("ready line of the vhost-user export: {vm}"),
    );
    run.ensure_eq("mixed.socket", "yes");
    run.ensure_eq("mixed.hw_queues", "2");
    run.ensure_eq("mixed.client_exit", "0");
    let client = ready_json(&run, "mixed.client");
    eprintln!(
        "qd1_latency over vhost-user while fio ran on ublkb1: {client} (ublkb1 had {} writes \
         when it started)",
        run.result("mixed.ublk_writes_before_client")
    );
    run.ensure(client["reads"] == 300, format!("qd1_latency: {client}"));
    run.ensure(
        run.result_u64("mixed.ublk_writes_before_client") >= 256,
        "fio had not started writing to ublkb1 when the vhost-user client started",
    );
    run.ensure_eq("mixed.fio_running_after_client", "yes");
    run.ensure_eq("mixed.fio", "ok");
    // The metrics of the ublk export against the kernel's own count of
    // ublkb1's requests (/sys/block/ublkb1/stat: what node_exporter reads),
    // both taken once fio was done and the device quiet.
    run.ensure_eq("mixed.metrics_scrape", "0");
    eprintln!(
        "ublkb1: kernel {} reads, {} writes; sluice metrics {} reads, {} writes, polling {} s, \
         sleeping {} s",
        run.result("mixed.kernel_reads"),
        run.result("mixed.kernel_writes"),
        run.result("mixed.metrics.reads"),
        run.result("mixed.metrics.writes"),
        run.result("mixed.metrics.polling"),
        run.result("mixed.metrics.sleeping"),
    );
    run.ensure_eq("mixed.metrics.reads", run.result("mixed.kernel_reads"));
    run.ensure_eq("mixed.metrics.writes", run.result("mixed.kernel_writes"));
    run.ensure_eq("mixed.metrics.errors", "0");
    run.ensure_eq("mixed.metrics.in_flight", "0");
    for key in ["mixed.metrics.polling", "mixed.metrics.sleeping"] {
        let seconds: f64 = run.result(key).parse().expect("seconds");
        run.ensure(seconds > 0.0, format!("{key} is {seconds}"));
    }
    match run.result("mixed.metrics.promtool") {
        "absent" => eprintln!("skipped: promtool not installed (tests/run.sh installs it)"),
        verdict => run.ensure(
            verdict == "0",
            "promtool check metrics refused the ublk export's scrape",
        ),
    }
    run.ensure_eq("mixed.exit", "0");
    run.ensure_eq("mixed.gone", "yes");
    run.ensure_eq("mixed.socket_gone", "yes");
    // Runtime add and removal of a ublk export through the monitor.
    for (key, want) in [
        ("runtime.node_add", "0"),
        ("runtime.add", "0"),
        ("runtime.device", "yes"),
        ("runtime.io", "0"),
        ("runtime.remove", "0"),
        ("runtime.gone", "yes"),
        ("runtime.node_remove", "0"),
    ] {
        run.ensure_eq(key, want);
    }
}

/// Runs on every pinned kernel whose cache is ready.
#[test]
fn ublk_sigterm_with_io_in_flight() {
    if skip_unless_available() {
        return;
    }
    for kernel in available_kernels() {
        ublk_sigterm_with_io_in_flight_on(kernel);
    }
}

fn ublk_sigterm_with_io_in_flight_on(kernel: &str) {
    eprintln!("==== vm_ublk storm on {kernel}");
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    make_file(&nvme, NVME_BYTES);
    let want = pattern(STORM_PATTERN_OFFSET, PATTERN_BYTES, SEED);
    std::fs::write(dir.path().join("pattern.bin"), &want).expect("pattern.bin");

    let run = Vm::new(dir.path())
        .kernel(kernel)
        .nvme(&nvme, "sluice-nvme0")
        .module("ublk_drv")
        .timeout(Duration::from_secs(180))
        .run(&job(JOB_STORM))
        .expect("boot");
    run.print_timings(&format!("vm_ublk storm on {kernel}"));
    run.ensure_complete();
    eprintln!(
        "SIGTERM after {} writes with {} in flight: sluice exit {} after {} s; fio exit {} \
         after {} s; hung-task timeout {}",
        run.result("storm.writes_before_sigterm"),
        run.result("storm.inflight_at_sigterm"),
        run.result("storm.exit"),
        run.result("storm.stop_seconds"),
        run.result("storm.fio_exit"),
        run.result("storm.fio_seconds_after_sigterm"),
        run.result("hung_task_timeout"),
    );
    eprintln!(
        "fio's error: {:?}; sluice: {:?}",
        run.result("storm.fio_error"),
        run.result("storm.sluice_drain")
    );
    run.ensure_eq("storm.pattern_fsync", "0");
    run.ensure(
        run.result_u64("storm.inflight_at_sigterm") > 0,
        "no write was in flight on ublkb0 when sluice got SIGTERM",
    );
    run.ensure_eq("storm.exit", "0");
    run.ensure_eq("storm.gone", "yes");
    // fio was under `timeout -k 5 60` with a 45 s runtime: 124/137 would mean it hung and was
    // killed, 0 that sluice's exit went unnoticed for 45 s.
    let fio_exit: i32 = run.result("storm.fio_exit").parse().expect("fio exit");
    let fio_after: f64 = run
        .result("storm.fio_seconds_after_sigterm")
        .parse()
        .expect("seconds");
    run.ensure(
        ![124, 137].contains(&fio_exit) && fio_after < 30.0,
        format!("fio exited with {fio_exit} {fio_after} s after SIGTERM to sluice"),
    );
    run.ensure_eq("storm.d_state", "");
    run.ensure(
        run.result("hung_task_timeout") != "none",
        "the guest kernel has no hung-task detector",
    );
    run.ensure_eq("storm.hung_tasks", "0");
    run.ensure_eq("storm.raw", "same");
    assert_file_holds(
        &nvme,
        STORM_PATTERN_OFFSET,
        &want,
        "fsync'ed pattern in nvme.img",
    );
}
