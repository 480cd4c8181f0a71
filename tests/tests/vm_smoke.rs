//! VM harness smoke test: one boot with an emulated NVMe drive and an emulated SATA disk.
//! The guest runs the pinned kernel and sees both disks through their real drivers with the
//! cache and FUA properties `shared/design.md` lists (nvme0n1: write back, FUA; sda: write
//! back, no FUA), and a flushed write reaches the emulated NVMe drive as a flush (QEMU
//! trace). Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh).

use std::time::Duration;

use sluice_tests::vm::{default_kernel, skip_unless_available, Vm, VmError};
use sluice_tests::{make_file, MIB};

const JOB: &str = r#"
set -euo pipefail
report uptime_at_job "$(cut -d' ' -f1 /proc/uptime)"
report kernel "$(uname -r)"
report ublk_control "$(test -c /dev/ublk-control && echo present || echo missing)"
report block "$(ls /sys/block | tr '\n' ' ')"
for d in nvme0n1 sda; do
    q=/sys/block/$d/queue
    echo "$d: size=$(cat /sys/block/$d/size) write_cache=$(cat $q/write_cache) fua=$(cat $q/fua)" \
        "logical=$(cat $q/logical_block_size) physical=$(cat $q/physical_block_size)" \
        "discard_max=$(cat $q/discard_max_bytes) write_zeroes_max=$(cat $q/write_zeroes_max_bytes)" \
        "hw_queues=$(ls /sys/block/$d/mq | wc -l)"
    report "$d.write_cache" "$(cat $q/write_cache)"
    report "$d.fua" "$(cat $q/fua)"
    report "$d.bytes" "$(blockdev --getsize64 /dev/$d)"
done
report nvme0n1.serial "$(cat /sys/block/nvme0n1/device/serial | tr -d ' ')"
# One write followed by a flush, for the trace.
dd if=/dev/zero of=/dev/nvme0n1 bs=4096 count=1 oflag=direct conv=fsync status=none
"#;

#[test]
fn guest_sees_nvme_and_sata_with_their_cache_and_fua() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    let sata = dir.path().join("sata.img");
    make_file(&nvme, 64 * MIB);
    make_file(&sata, 32 * MIB);

    let run = Vm::new(dir.path())
        .nvme(&nvme, "sluice-nvme0")
        .sata(&sata)
        .module("ublk_drv")
        .qemu_trace("pci_nvme_flush*")
        .timeout(Duration::from_secs(120))
        .run(JOB)
        .expect("boot");
    eprintln!(
        "vm_smoke: boot and job took {:.1?}; the job started {} s after the kernel",
        run.elapsed,
        run.results.get("uptime_at_job").map_or("?", String::as_str)
    );
    run.assert_success();
    if !run.qemu_log.trim().is_empty() {
        eprintln!("vm_smoke: QEMU said:\n{}", run.qemu_log.trim_end());
    }

    assert_eq!(run.result("kernel"), default_kernel());
    let block: Vec<&str> = run.result("block").split_whitespace().collect();
    assert!(
        block.contains(&"nvme0n1") && block.contains(&"sda"),
        "/sys/block: {block:?}"
    );
    assert_eq!(run.result("nvme0n1.write_cache"), "write back");
    assert_eq!(run.result("nvme0n1.fua"), "1");
    assert_eq!(run.result("nvme0n1.bytes"), (64 * MIB).to_string());
    assert_eq!(run.result("nvme0n1.serial"), "sluice-nvme0");
    assert_eq!(run.result("sda.write_cache"), "write back");
    assert_eq!(run.result("sda.fua"), "0");
    assert_eq!(run.result("sda.bytes"), (32 * MIB).to_string());
    assert_eq!(run.result("ublk_control"), "present", "ublk_drv loaded");
    assert!(
        run.trace.contains("pci_nvme_flush"),
        "no pci_nvme_flush* event in the QEMU trace:\n{}",
        run.trace
    );
}

/// The harness's failure reports, on purpose: a job that never ends is killed at the timeout
/// with the console's tail, and a guest that powers off without a status says so. Two extra
/// boots, so only on request: `cargo test -p sluice-tests --test vm_smoke -- --ignored`.
#[test]
#[ignore = "two extra boots that only test the harness"]
fn harness_reports_hung_guests_and_missing_status() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = Vm::new(dir.path()).timeout(Duration::from_secs(40));

    let err = vm
        .run("echo about to hang; sleep 1000")
        .expect_err("a job that sleeps past the timeout");
    let text = err.to_string();
    assert!(
        matches!(err, VmError::Hung { .. }) && text.starts_with("guest hung after 40 s"),
        "{text}"
    );
    assert!(text.contains("about to hang"), "console tail in: {text}");

    let err = vm
        .run("echo powering off by hand; echo o >/proc/sysrq-trigger; sleep 30")
        .expect_err("a guest that powers off before the job ends");
    let text = err.to_string();
    assert!(matches!(err, VmError::NoStatus { .. }), "{text}");
    assert!(
        text.contains("powering off by hand"),
        "console tail in: {text}"
    );
}
