//! SIGTERM to the real sluice on the host while a QEMU guest runs fio with fsync on the
//! vhost-user-blk disk it serves: "the guest sees I/O errors, not a hang; the host file
//! verifies." One boot:
//!
//! 1. sluice serves a 256 MiB file over a vhost-user socket with 2 queues.
//! 2. The guest writes a 4 MiB pattern (made here with [`pattern`]) with O_DIRECT and
//!    `conv=fsync` at [`PATTERN_OFFSET`] and reads it back.
//! 3. It starts fio (io_uring, O_DIRECT, 4 KiB random writes with an fsync after each,
//!    queue depth 8, time-based 60 s, under `timeout -k 5 90`) on the first 128 MiB and,
//!    once fio has written and has requests in flight, creates `fio-running` in the shared
//!    work directory.
//! 4. A host thread watching for that file writes `sigterm-sent`, sends SIGTERM to sluice
//!    and waits for it to exit, while another thread runs the VM.
//! 5. The guest's side, after the signal: fio ends by itself within [`FIO_BOUND_SECS`]
//!    (not killed by `timeout`: 124/137 would be a hang) with an I/O error; no task or
//!    thread (io_uring's io-wq workers included) stays in D state; the hung-task detector
//!    (set to 3 s) reports nothing.
//!    (It is a weak witness here: `submit_bio_wait` sleeps in slices of half the hung-task
//!    timeout precisely so as not to be reported, so the D-state check is the one that
//!    counts.)
//! 6. After the power-off: sluice exited 0, its socket is gone, the host file holds the
//!    pattern exactly, and nothing but fio and the pattern wrote to it.
//!
//! Every violation of step 5 is listed in one failure message with the evidence: requests
//! still in flight on vda, the guest's I/O errors, whether vda has a request timeout at
//! all, the kicks QEMU received on the vhost-user-blk queues after the backend left (a
//! QEMU trace: `virtio_queue_notify` after the last `vhost_dev_stop`), and what a fresh
//! direct read of vda does once sluice has gone. That read is not asserted: with no
//! backend on the socket, QEMU's vhost-user-blk completes nothing, whatever sluice did
//! before it left.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::vm::{expect_boot, skip_unless_available, Vm};
use sluice_tests::{
    assert_file_holds, assert_gone, make_file, path_str, pattern, Daemon, EXIT_TIMEOUT, MIB,
};

const DISK_BYTES: u64 = 256 * MIB;
/// fio writes in `[0, FIO_MIB)` MiB.
const FIO_MIB: u64 = 128;
/// The pattern the guest fsyncs before fio starts: 4 MiB at 240 MiB.
const PATTERN_OFFSET: u64 = 240 * MIB;
const PATTERN_BYTES: usize = 4 * MIB as usize;
const SEED: u64 = 0x5d << 56 | 0x7e2;
/// Writes the guest must have completed on vda (fio's, after the pattern's) before it asks
/// for the signal.
const WRITES_BEFORE_SIGNAL: u64 = 64;
/// How long fio may take to end after sluice got SIGTERM.
const FIO_BOUND_SECS: u64 = 10;
/// How long the host waits for the guest to ask for the signal.
const SIGNAL_WAIT: Duration = Duration::from_secs(90);

const JOB: &str = r#"
set -uo pipefail
dev=/dev/vda
W=$SLUICE_VM_WORK
now() { date +%s.%N; }
hung_task_watch
report write_cache "$(cat /sys/block/vda/queue/write_cache)"
# The block layer's request timeout (absent when the driver has no timeout handler: then a
# request the device never completes is never failed by the kernel either).
report io_timeout "$(cat /sys/block/vda/queue/io_timeout 2>/dev/null || echo absent)"

# --- the pattern, synced before the storm ---
dd if="$W/pattern.bin" of=$dev bs=1M seek=PATTERN_MIB oflag=direct conv=fsync status=none
report pattern_fsync $?
dd if=$dev bs=1M skip=PATTERN_MIB count=PATTERN_COUNT iflag=direct status=none | cmp -s - "$W/pattern.bin"
report pattern_readback $?

# --- fio with an fsync after every write ---
w0=$(awk '{ print $5 }' /sys/block/vda/stat)
timeout -k 5 90 fio --name=storm --filename=$dev --ioengine=io_uring --direct=1 --eta=never \
    --rw=randwrite --bs=4k --offset=0 --size=FIO_MIBM --iodepth=8 --fsync=1 \
    --time_based --runtime=60 --output=/tmp/fio.log >/tmp/fio.out 2>&1 &
fpid=$!
for _ in $(seq 600); do
    w=$(awk '{ print $5 }' /sys/block/vda/stat)
    f=$(awk '{ print $1 + $2 }' /sys/block/vda/inflight)
    [ $((w - w0)) -ge WRITES_BEFORE_SIGNAL ] && [ "$f" -gt 0 ] && break
    kill -0 $fpid 2>/dev/null || break
    sleep 0.05
done
report writes_before_signal $((w - w0))
report inflight_before_signal "$f"
kill -0 $fpid 2>/dev/null && report fio_running_at_signal yes || report fio_running_at_signal no
: >"$W/fio-running"
# The host sends SIGTERM right after it writes sigterm-sent.
for _ in $(seq 600); do [ -e "$W/sigterm-sent" ] && break; sleep 0.05; done
t0=$(now)
[ -e "$W/sigterm-sent" ] && report signal_seen yes || report signal_seen no

# --- fio must end by itself, with an error ---
if timeout FIO_BOUND tail --pid=$fpid -f /dev/null; then
    wait $fpid
    report fio_exit $?
    report fio_seconds_after_signal "$(since $t0)"
else
    report fio_exit hung
    report fio_seconds_after_signal ">FIO_BOUND"
fi
report fio_err "$(grep -m1 -oE 'err= *[0-9]+[^)]*\)?' /tmp/fio.log | tr -s ' ')"
report fio_error "$(grep -h -m1 -iE 'error' /tmp/fio.out /tmp/fio.log | cut -c1-200)"
report inflight_after_fio "$(tr -s ' ' </sys/block/vda/inflight)"
echo "--- fio output ---"; cat /tmp/fio.out /tmp/fio.log
echo "--- fio tasks ---"; ps -eLo pid=,lwp=,stat=,wchan:32=,comm= | grep -E 'fio|iou'
mount -t debugfs none /sys/kernel/debug 2>/dev/null
for f in /sys/kernel/debug/block/vda/hctx*/busy; do
    [ -s "$f" ] && { echo "--- $f ---"; cat "$f"; }
done

# --- no task stays in D state ---
d=''
for _ in $(seq 12); do
    d=$(ps -eLo lwp=,stat=,wchan:32=,comm= | awk '$2 ~ /^D/ { print $1 ":" $3 ":" $4 }' | tr '\n' ' ')
    [ -z "$d" ] && break
    sleep 0.25
done
report d_state "$d"

# --- evidence only: does a fresh read of vda, after sluice has gone, fail or block? ---
t1=$(now)
timeout -k 1 3 dd if=$dev of=/dev/null bs=4k count=1 skip=1000 iflag=direct status=none 2>/tmp/dd.err
report read_after_exit "$?"
report read_after_exit_seconds "$(since $t1)"
report read_after_exit_error "$(head -c 200 /tmp/dd.err)"
for p in $(ps -eLo lwp=,stat= | awk '$2 ~ /^D/ { print $1 }'); do
    echo "--- stack of task $p ($(cat /proc/$p/comm)) ---"; cat /proc/$p/stack
done

# --- the hung-task detector, two periods past the signal ---
hung_tasks hung_tasks $t0
report dmesg_io_errors "$(dmesg | grep -cE 'I/O error|critical target error|end of device')"
echo "--- dmesg since vda ---"; dmesg | sed -n '/\[vda\]/,$p'
report done yes
"#;

#[test]
fn guest_fio_fsync_while_host_sigterms_sluice() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let disk = work.join("disk.img");
    let sock = work.join("vu.sock");
    make_file(&disk, DISK_BYTES);
    let want = pattern(PATTERN_OFFSET, PATTERN_BYTES, SEED);
    std::fs::write(work.join("pattern.bin"), &want).expect("pattern.bin");

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
    eprintln!("sluice ready: {}", daemon.ready[0]);

    let job = JOB
        .replace("PATTERN_MIB", &(PATTERN_OFFSET / MIB).to_string())
        .replace("PATTERN_COUNT", &(PATTERN_BYTES as u64 / MIB).to_string())
        .replace("FIO_MIB", &FIO_MIB.to_string())
        .replace("WRITES_BEFORE_SIGNAL", &WRITES_BEFORE_SIGNAL.to_string())
        .replace("FIO_BOUND", &FIO_BOUND_SECS.to_string());
    let vm = Vm::new(work)
        .vhost_user_blk(&sock, 2)
        .qemu_trace("virtio_queue_notify")
        .qemu_trace("vhost_dev_st*")
        .qemu_trace("vhost_dev_cleanup")
        .timeout(Duration::from_secs(150));

    let vm_done = AtomicBool::new(false);
    let started = Instant::now();
    let (run, signalled) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let run = vm.run(&job);
            vm_done.store(true, Ordering::SeqCst);
            run
        });
        // The watcher: SIGTERM to sluice once the guest says fio is running.
        let watcher = s.spawn(|| {
            let deadline = Instant::now() + SIGNAL_WAIT;
            while !work.join("fio-running").exists() {
                if vm_done.load(Ordering::SeqCst) || Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let at = started.elapsed();
            std::fs::write(work.join("sigterm-sent"), b"").expect("sigterm-sent");
            let t = Instant::now();
            let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
            Some((at, status, t.elapsed()))
        });
        let run = guest.join().expect("VM thread");
        (run, watcher.join().expect("watcher thread"))
    });
    let run = expect_boot(run, &mut daemon);
    let log = daemon.stderr();
    let Some((signal_at, status, exit_took)) = signalled else {
        daemon.kill();
        panic!(
            "the guest never said fio was running, so no SIGTERM was sent (reported: {:?})\n\
             --- console ---\n{}\n--- sluice stderr ---\n{log}",
            run.results, run.console
        );
    };
    let kicks = kicks_after_backend_left(&run.trace);
    eprintln!(
        "vm_shutdown: boot and job {:.1?}; SIGTERM {:.1?} after the start ({} writes done, {} \
         in flight in the guest), sluice exited ({status}) {:.1?} later; fio after the signal: \
         exit {} after {} s; guest I/O errors in dmesg: {}; QEMU got {kicks} kicks on the \
         vhost-user-blk queues after the backend left",
        run.elapsed,
        signal_at,
        run.result("writes_before_signal"),
        run.result("inflight_before_signal"),
        exit_took,
        run.result("fio_exit"),
        run.result("fio_seconds_after_signal"),
        run.result("dmesg_io_errors"),
    );

    // --- the host: sluice exited 0 on SIGTERM and removed its socket ---
    daemon.assert_exit_ok(status);
    assert_gone(&sock);

    // --- the guest: the pattern was synced, and SIGTERM came while fio was writing ---
    let evidence = format!(
        "guest reported: {:?}\n--- sluice stderr ---\n{log}",
        run.results
    );
    run.ensure_eq_with("done", "yes", &evidence);
    run.ensure_eq_with("pattern_fsync", "0", &evidence);
    run.ensure_eq_with("pattern_readback", "0", &evidence);
    run.ensure_eq_with("fio_running_at_signal", "yes", &evidence);
    run.ensure_eq_with("signal_seen", "yes", &evidence);
    run.ensure_with(
        run.result_u64("writes_before_signal") >= WRITES_BEFORE_SIGNAL,
        "fio had not written enough before the signal",
        &evidence,
    );
    run.ensure_with(
        run.result("hung_task_timeout") != "none",
        "the guest kernel has no hung-task detector",
        &evidence,
    );

    // --- the host file: the synced pattern, and nothing written outside fio's range ---
    assert_file_holds(&disk, PATTERN_OFFSET, &want, "pattern in the host file");
    let f = File::open(&disk).expect("open disk");
    let mut buf = vec![0u8; MIB as usize];
    for off in (FIO_MIB * MIB..PATTERN_OFFSET).step_by(MIB as usize) {
        f.read_exact_at(&mut buf, off).expect("read gap");
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            panic!(
                "non-zero byte at {:#x} of the host file, between fio's range and the pattern",
                off + i as u64
            );
        }
    }

    // --- the guest: I/O errors, not a hang ---
    let mut hang = Vec::new();
    match run.result("fio_exit") {
        "hung" => hang.push(format!(
            "fio was still running {FIO_BOUND_SECS} s after sluice got SIGTERM"
        )),
        "124" | "137" => hang.push(format!(
            "fio had to be killed by `timeout` (exit {})",
            run.result("fio_exit")
        )),
        "0" => hang.push("fio exited 0: the disk going away went unnoticed".to_owned()),
        _ if run.result("fio_error").is_empty() => {
            hang.push("fio failed without an I/O error in its output".to_owned());
        }
        _ => {}
    }
    if !run.result("d_state").is_empty() {
        hang.push(format!(
            "tasks in D state (tid:wchan:comm): {}",
            run.result("d_state")
        ));
    }
    if run.result("hung_tasks") != "0" {
        hang.push(format!(
            "{} hung-task reports in dmesg",
            run.result("hung_tasks")
        ));
    }
    if !hang.is_empty() {
        panic!(
            "SIGTERM to sluice while the guest wrote with fsync: the guest hung instead of \
             seeing I/O errors:\n  - {}\n\
             evidence: requests still in flight on vda (reads writes): {}; I/O errors the \
             guest logged: {}; fio's error: {:?}; vda io_timeout: {}; kicks QEMU got on the \
             vhost-user-blk queues after the backend left (and ignored): {kicks}; a fresh \
             direct read of vda after that: exit {} after {} s\n\
             --- console ---\n{}\n--- qemu ---\n{}\n--- sluice stderr ---\n{log}",
            hang.join("\n  - "),
            run.result("inflight_after_fio"),
            run.result("dmesg_io_errors"),
            run.result("fio_error"),
            run.result("io_timeout"),
            run.result("read_after_exit"),
            run.result("read_after_exit_seconds"),
            run.console,
            run.qemu_log
        );
    }
}

/// Diagnostics from the QEMU trace: kicks (`virtio_queue_notify`) after the last
/// `vhost_dev_stop` on devices that had never been kicked through QEMU before it. While a
/// vhost-user device runs, its kicks go to the backend, not QEMU; once the backend has gone,
/// QEMU's handler gets them and does nothing (the 9p devices are QEMU's own and kick QEMU
/// all along, so they are left out).
fn kicks_after_backend_left(trace: &str) -> usize {
    let lines: Vec<&str> = trace.lines().collect();
    let Some(stop) = lines.iter().rposition(|l| l.contains("vhost_dev_stop")) else {
        return 0;
    };
    let vdev = |l: &str| {
        l.split("virtio_queue_notify vdev ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned)
    };
    let before: std::collections::BTreeSet<String> =
        lines[..stop].iter().filter_map(|l| vdev(l)).collect();
    lines[stop..]
        .iter()
        .filter_map(|l| vdev(l))
        .filter(|v| !before.contains(v))
        .count()
}
