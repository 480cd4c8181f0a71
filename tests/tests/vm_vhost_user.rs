//! The real sluice serving a 256 MiB file over vhost-user-blk to a real Linux guest, with
//! QEMU as the frontend and the kernel's virtio_blk driver on top — in one boot:
//!
//! * the guest's view of the disk matches what sluice advertised: size, logical and
//!   physical block size, queue count, write cache, discard and write-zeroes limits;
//! * fio (io_uring, O_DIRECT, 4 KiB random writes, 64 MiB, crc32c verify) passes;
//! * ext4: mkfs, mount, write files, sync, umount, `fsck -fn` clean, remount and the files
//!   read back intact;
//! * `blkdiscard`, `blkdiscard -z` and `fallocate --punch-hole` on a written range each read
//!   back as zeroes;
//! * after the guest powers off and sluice exits on SIGTERM (status 0, socket removed),
//!   the host file holds a pattern the guest wrote with O_DIRECT, and the zeroed ranges.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use sluice_tests::vm::{expect_boot, skip_unless_available, Vm};
use sluice_tests::{
    assert_file_holds, assert_gone, make_file, path_str, pattern, Daemon, EXIT_TIMEOUT, MIB,
};

const DISK_BYTES: u64 = 256 * MIB;
/// Where the guest writes [`pattern`] (1 MiB, seed [`SEED`]) at the end of the job.
const PATTERN_OFFSET: u64 = 200 * MIB;
const PATTERN_BYTES: usize = MIB as usize;
const SEED: u64 = 0x51u64 << 56 | 0xce;
/// Ranges the guest fills with random data and then zeroes three ways (MiB offsets, 16 MiB
/// each): discard, write zeroes without unmap, write zeroes with unmap.
const DISCARD_MIB: u64 = 128;
const ZEROOUT_MIB: u64 = 144;
const PUNCH_MIB: u64 = 160;
const RANGE_MIB: u64 = 16;

const JOB: &str = r#"
set -euo pipefail
dev=/dev/vda
q=/sys/block/vda/queue

# --- what the guest sees ---
report bytes "$(blockdev --getsize64 $dev)"
report logical "$(cat $q/logical_block_size)"
report physical "$(cat $q/physical_block_size)"
report minimum_io "$(cat $q/minimum_io_size)"
report hw_queues "$(ls /sys/block/vda/mq | wc -l)"
report write_cache "$(cat $q/write_cache)"
report fua "$(cat $q/fua)"
report discard_max "$(cat $q/discard_max_bytes)"
report discard_granularity "$(cat $q/discard_granularity)"
report write_zeroes_max "$(cat $q/write_zeroes_max_bytes)"
report max_segments "$(cat $q/max_segments)"
report max_segment_size "$(cat $q/max_segment_size)"
report max_hw_sectors_kb "$(cat $q/max_hw_sectors_kb)"
report read_only "$(cat /sys/block/vda/ro)"
report serial "$(cat /sys/block/vda/serial)"
# 64 O_DIRECT reads from each vCPU: blk-mq maps vCPU N to virtqueue N, so both of sluice's
# queues must serve requests; each completion raises that virtqueue's interrupt
# ("virtioK-req.N" in /proc/interrupts, summed over the vCPUs).
vdev=$(basename "$(readlink -f /sys/block/vda/device)")
for cpu in 0 1; do
    taskset -c $cpu dd if=$dev of=/dev/null bs=4k count=64 iflag=direct status=none
done
grep "$vdev" /proc/interrupts
for n in 0 1; do
    report "irqs.req$n" "$(awk -v ncpu="$(nproc)" -v q="$vdev-req.$n" \
        '$NF == q { s = 0; for (i = 2; i <= ncpu + 1; i++) s += $i; print s }' /proc/interrupts)"
done

# --- fio: random O_DIRECT writes through io_uring, verified ---
t0=$(date +%s.%N)
fio_verify vda $dev 64M
report fio_seconds "$(since $t0)"

# --- ext4 ---
ext4_check $dev

# --- discard and write zeroes on data ---
M=$((1 << 20))
zero_check() { # name, MiB offset, MiB length
    if dd if=$dev bs=1M skip=$2 count=$3 iflag=direct status=none | cmp -s -n $(($3 * M)) - /dev/zero; then
        report "$1" zero
    else
        report "$1" NONZERO
        dd if=$dev bs=1M skip=$2 count=$3 iflag=direct status=none | od -A d -t x1 | head -5
    fi
}
dd if=/dev/urandom of=$dev bs=1M seek=DISCARD_MIB count=$((3 * RANGE_MIB)) oflag=direct status=none
blkdiscard -f -o $((DISCARD_MIB * M)) -l $((RANGE_MIB * M)) $dev
zero_check discard DISCARD_MIB RANGE_MIB
blkdiscard -f -z -o $((ZEROOUT_MIB * M)) -l $((RANGE_MIB * M)) $dev
zero_check zeroout ZEROOUT_MIB RANGE_MIB
fallocate --punch-hole --keep-size -o $((PUNCH_MIB * M)) -l $((RANGE_MIB * M)) $dev
zero_check punch PUNCH_MIB RANGE_MIB

# --- a pattern for the host to find after sluice exits ---
dd if="$SLUICE_VM_WORK/pattern.bin" of=$dev bs=1M seek=PATTERN_MIB oflag=direct conv=fsync status=none
report pattern written
"#;

#[test]
fn guest_on_sluice_vhost_user_blk() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let sock = dir.path().join("vu.sock");
    make_file(&disk, DISK_BYTES);
    let want = pattern(PATTERN_OFFSET, PATTERN_BYTES, SEED);
    std::fs::write(dir.path().join("pattern.bin"), &want).expect("pattern.bin");

    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&disk),
            "--vhost-user",
            path_str(&sock),
            "--queues",
            "2",
        ],
        1,
    );
    let ready = daemon.ready[0].clone();
    eprintln!("sluice ready: {ready}");

    let job = JOB
        .replace("DISCARD_MIB", &DISCARD_MIB.to_string())
        .replace("ZEROOUT_MIB", &ZEROOUT_MIB.to_string())
        .replace("PUNCH_MIB", &PUNCH_MIB.to_string())
        .replace("RANGE_MIB", &RANGE_MIB.to_string())
        .replace("PATTERN_MIB", &(PATTERN_OFFSET / MIB).to_string());
    let run = Vm::new(dir.path())
        .vhost_user_blk(&sock, 2)
        .module("ext4")
        .timeout(Duration::from_secs(240))
        .run(&job);
    let run = expect_boot(run, &mut daemon);
    eprintln!(
        "vm_vhost_user: boot and job took {:.1?} (fio {} s); guest saw {:?}",
        run.elapsed,
        run.results.get("fio_seconds").map_or("?", String::as_str),
        run.results
    );
    if run.exit_code != 0 {
        daemon.kill();
        panic!(
            "the guest job exited with {}\n--- console ---\n{}\n--- sluice stderr ---\n{}",
            run.exit_code,
            run.console,
            daemon.stderr()
        );
    }

    // Stop sluice first: whatever the guest saw, the daemon must exit cleanly.
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&sock);
    eprintln!("--- sluice stderr ---\n{}", daemon.stderr());

    // --- the guest's view against what sluice advertised ---
    let ready_u64 = |k: &str| {
        ready[k]
            .as_u64()
            .unwrap_or_else(|| panic!("ready line has no numeric {k}: {ready}"))
    };
    let logical = ready_u64("logical_block_size_bytes");
    assert_eq!(ready_u64("capacity_bytes"), DISK_BYTES, "{ready}");
    assert_eq!(ready_u64("queues"), 2, "{ready}");
    assert_eq!(run.result_u64("bytes"), ready_u64("capacity_bytes"));
    assert_eq!(run.result_u64("logical"), logical);
    assert_eq!(
        run.result_u64("hw_queues"),
        2,
        "queues in /sys/block/vda/mq"
    );
    for q in ["req0", "req1"] {
        assert!(
            run.result_u64(&format!("irqs.{q}")) >= 64,
            "virtqueue {q} completed fewer than the 64 reads sent from its vCPU: {:?}",
            run.results
        );
    }
    let write_cache = ready["write_cache"]
        .as_bool()
        .expect("write_cache in ready");
    assert_eq!(
        run.result("write_cache"),
        if write_cache {
            "write back"
        } else {
            "write through"
        }
    );
    assert_eq!(run.result("read_only"), "0");
    assert_eq!(run.result("serial"), "sluice");
    // A file's physical block is its filesystem's block (st_blksize); sluice punches holes
    // in those units, so it is also the discard granularity, and the largest discard and
    // write-zeroes are the whole blocks below 4 GiB.
    let blksize = std::fs::metadata(&disk).expect("stat disk").blksize();
    let physical = blksize.max(logical);
    let max_zero_bytes = u64::from(u32::MAX) & !(physical - 1);
    assert_eq!(run.result_u64("physical"), physical, "physical block size");
    assert_eq!(run.result_u64("minimum_io"), physical, "minimum_io_size");
    assert_eq!(run.result_u64("discard_granularity"), physical);
    assert_eq!(run.result_u64("discard_max"), max_zero_bytes);
    assert_eq!(run.result_u64("write_zeroes_max"), max_zero_bytes);

    // --- the data checks the guest made ---
    assert_eq!(run.result("vda.fio"), "ok");
    assert_eq!(run.result("ext4.fsck"), "clean");
    assert_eq!(run.result("ext4.files"), "intact");
    for k in ["discard", "zeroout", "punch"] {
        assert_eq!(run.result(k), "zero", "{k} range read back in the guest");
    }
    assert_eq!(run.result("pattern"), "written");

    // --- the host file after sluice exited ---
    assert_file_holds(&disk, PATTERN_OFFSET, &want, "pattern in the host file");
    let f = File::open(&disk).expect("open disk");
    let mut range = vec![0u8; (RANGE_MIB * MIB) as usize];
    for (what, mib) in [
        ("discarded", DISCARD_MIB),
        ("zeroed", ZEROOUT_MIB),
        ("punched", PUNCH_MIB),
    ] {
        f.read_exact_at(&mut range, mib * MIB).expect("read range");
        if let Some(i) = range.iter().position(|&b| b != 0) {
            panic!(
                "{what} range at {mib} MiB of the host file: non-zero byte at offset {:#x}",
                mib * MIB + i as u64
            );
        }
    }
}
