//! SIGKILL to the real sluice on the host, and the same command started again, while a
//! QEMU guest (`reconnect-ms`) has requests in flight on the vhost-user-blk disk it serves:
//! no request is lost, none hangs (issue 11, inflight I/O tracking).
//!
//! 1. [`a_slow_read_in_flight_survives_sigkill_and_restart`]: the disk is a FUSE file
//!    (`tests/fuse/hangfs.py`) whose reads of one 64 KiB range are answered
//!    [`SLOW_DELAY`] late. On one vCPU, so on one virtqueue, the guest writes thousands of
//!    4 KiB blocks elsewhere with fio (io_uring, depth 16, crc32c verify) and meanwhile
//!    reads that range (O_DIRECT): later writes complete while the read is still in
//!    flight, so the ring's used index moves past it. Once
//!    [`WRITES_BEFORE_KILL`] writes are done, the host SIGKILLs sluice (the kernel reaps it
//!    only when the file system answers the read it was serving), starts the same command
//!    again, and QEMU reconnects. The slow read must complete with the range's data, fio
//!    must verify, and the guest's hung-task detector (3 s) and dmesg must stay quiet.
//!    Without inflight tracking QEMU puts the ring back at the used index, which the read
//!    is behind: it is never popped again and the guest waits forever.
//! 2. [`fio_verify_at_depth_64_on_two_queues_across_five_kills`]: fio (two jobs, one per
//!    vCPU and so per virtqueue, depth 64 each, crc32c verify) in rounds over a plain
//!    file while the host SIGKILLs and restarts sluice five times (every other restart
//!    starts a copy of the binary: an upgrade); every round must verify. The pause each kill costs the guest (kill to the new sluice's
//!    `frontend connected`) is printed.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh) or, for
//! the first, cannot run FUSE. Needs `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::vm::{expect_boot, skip_unless_available, Vm};
use sluice_tests::{
    make_file, needs_fuse, path_str, pattern, sluice_bin, Daemon, HangingFile, SlowRead,
    EXIT_TIMEOUT, MIB,
};

/// QEMU tries to reconnect this often once the backend has gone.
const RECONNECT_MS: u32 = 1000;

// --- the slow read -------------------------------------------------------------------------

const SLOW_DISK_BYTES: u64 = 256 * MIB;
/// The range whose reads are answered late: 64 KiB at 200 MiB.
const SLOW_OFFSET: u64 = 200 * MIB;
const SLOW_BYTES: u64 = 64 * 1024;
const SLOW_DELAY: Duration = Duration::from_secs(8);
const SLOW_SEED: u64 = 0x510e << 48 | 0x11;
/// fio's writes: 16 MiB at 64 MiB, far from the slow range.
const FAST_OFFSET_MIB: u64 = 64;
const FAST_MIB: u64 = 16;
/// Writes the guest must have completed after the slow read was issued (on the same
/// virtqueue) before it asks for the kill.
const WRITES_BEFORE_KILL: u64 = 200;
/// How long the slow read may take after the kill, at most (two delays, the restart, the
/// reconnect, and emulation's slowness).
const SLOW_BOUND_SECS: u64 = 90;

const SLOW_JOB: &str = r#"
set -uo pipefail
dev=/dev/vda
W=$SLUICE_VM_WORK
now() { date +%s.%N; }
writes() { awk '{ print $5 }' /sys/block/vda/stat; }
hung_task_watch
t0=$(now)
# Everything runs on vCPU 0, so on virtqueue 0 (blk-mq maps vCPU N to queue N): the read
# and the writes share one ring, whose used index the writes move past the read.

# --- fast writes, verified, running first ---
w0=$(writes)
taskset -c 0 fio --name=fast --filename=$dev --ioengine=io_uring --direct=1 --eta=never \
    --rw=randwrite --bs=4k --offset=FAST_OFFSETM --size=FAST_SIZEM --iodepth=16 \
    --verify=crc32c --output=/tmp/fio.log >/tmp/fio.out 2>&1 &
fpid=$!
for _ in $(seq 1500); do
    [ $(( $(writes) - w0 )) -ge 50 ] && break
    kill -0 $fpid 2>/dev/null || break
    sleep 0.02
done
report writes_before_read "$(( $(writes) - w0 ))"

# --- the slow read, in flight from here on ---
w1=$(writes)
taskset -c 0 dd if=$dev of=/tmp/slow.bin bs=SLOW_BYTES count=1 skip=SLOW_BLOCK iflag=direct \
    status=none &
spid=$!
r=0
for _ in $(seq 250); do
    r=$(awk '{ print $1 }' /sys/block/vda/inflight)
    [ "$r" -gt 0 ] && break
    sleep 0.02
done
report slow_inflight "$r"

# --- writes after it complete while it is in flight ---
w=0
for _ in $(seq 1500); do
    w=$(( $(writes) - w1 ))
    [ "$w" -ge WRITES_BEFORE_KILL ] && break
    kill -0 $fpid 2>/dev/null || break
    sleep 0.02
done
report writes_before_kill "$w"
kill -0 $spid 2>/dev/null && report slow_running_at_kill yes || report slow_running_at_kill no
kill -0 $fpid 2>/dev/null && report fio_running_at_kill yes || report fio_running_at_kill no
report inflight_at_kill "$(tr -s ' ' </sys/block/vda/inflight)"
: >"$W/kill-now"
for _ in $(seq 1200); do [ -e "$W/restarted" ] && break; sleep 0.05; done
[ -e "$W/restarted" ] && report restarted_seen yes || report restarted_seen no

# --- the slow read completes, with the range's data ---
if timeout SLOW_BOUND tail --pid=$spid -f /dev/null; then
    wait $spid
    report slow_read_exit $?
    report slow_read_seconds "$(since $t0)"
    if cmp -s /tmp/slow.bin "$W/slow.bin"; then report slow_data ok; else report slow_data WRONG; fi
else
    report slow_read_exit hung
    report inflight_hung "$(tr -s ' ' </sys/block/vda/inflight)"
fi

# --- fio ends and verifies ---
if timeout 180 tail --pid=$fpid -f /dev/null; then
    wait $fpid
    report fio_exit $?
else
    report fio_exit hung
fi
echo "--- fio ---"; cat /tmp/fio.out /tmp/fio.log | tail -40
hung_tasks hung_tasks $t0
report dmesg_io_errors "$(dmesg | grep -cE 'I/O error|critical target error|end of device')"
echo "--- dmesg since vda ---"; dmesg | sed -n '/\[vda\]/,$p'
report done yes
"#;

/// `sluice serve` for `disk` on `sock` with 2 queues; the same arguments every time, the
/// control socket included ("the same command").
fn serve_args(disk: &Path, sock: &Path, control: &Path) -> Vec<String> {
    [
        "serve",
        "--disk",
        path_str(disk),
        "--vhost-user",
        path_str(sock),
        "--queues",
        "2",
        "--control",
        path_str(control),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until `path` exists, or `done` is set, or `within` has passed.
fn wait_for_file(path: &Path, done: &AtomicBool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if done.load(Ordering::SeqCst) || Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// SIGKILL, and the time until the kernel reaped the process.
fn kill_and_reap(daemon: &mut Daemon, bound: Duration) -> Duration {
    let t = Instant::now();
    daemon.signal(libc::SIGKILL);
    let status = daemon.wait(bound);
    assert!(
        status.is_some(),
        "sluice still not reaped {bound:?} after SIGKILL\n{}",
        daemon.stderr()
    );
    t.elapsed()
}

/// Waits until `daemon`'s log says `what`.
fn wait_log(daemon: &Daemon, what: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if daemon.stderr().contains(what) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

const RESUBMITTED: &str = "resubmitting the requests a previous sluice had in flight";

#[test]
fn a_slow_read_in_flight_survives_sigkill_and_restart() {
    if skip_unless_available() {
        return;
    }
    if let Err(why) = needs_fuse() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let mut fs = HangingFile::start_slow(
        work,
        SLOW_DISK_BYTES,
        SlowRead {
            offset: SLOW_OFFSET,
            len: SLOW_BYTES,
            delay: SLOW_DELAY,
        },
    )
    .expect("the slow FUSE file");
    // The range's data, in the file under the FUSE file and for the guest to compare.
    let want = pattern(SLOW_OFFSET, SLOW_BYTES as usize, SLOW_SEED);
    {
        use std::os::unix::fs::FileExt;
        let backing = std::fs::OpenOptions::new()
            .write(true)
            .open(fs.backing())
            .expect("open the backing file");
        backing
            .write_all_at(&want, SLOW_OFFSET)
            .expect("write the slow range");
    }
    std::fs::write(work.join("slow.bin"), &want).expect("slow.bin");
    let sock = work.join("vu.sock");
    let args = serve_args(fs.path(), &sock, &work.join("control.sock"));
    let mut daemon = Daemon::spawn(&args, 1);

    let job = SLOW_JOB
        .replace("SLOW_BYTES", &SLOW_BYTES.to_string())
        .replace("SLOW_BLOCK", &(SLOW_OFFSET / SLOW_BYTES).to_string())
        .replace("FAST_OFFSET", &FAST_OFFSET_MIB.to_string())
        .replace("FAST_SIZE", &FAST_MIB.to_string())
        .replace("WRITES_BEFORE_KILL", &WRITES_BEFORE_KILL.to_string())
        .replace("SLOW_BOUND", &SLOW_BOUND_SECS.to_string());
    let vm = Vm::new(work)
        .vhost_user_blk(&sock, 2)
        .vhost_user_reconnect_ms(RECONNECT_MS)
        .timeout(Duration::from_secs(300));

    let vm_done = AtomicBool::new(false);
    let (run, host) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let run = vm.run(&job);
            vm_done.store(true, Ordering::SeqCst);
            run
        });
        let host = s.spawn(|| -> Result<_, String> {
            if !wait_for_file(&work.join("kill-now"), &vm_done, Duration::from_secs(200)) {
                return Err("the guest never asked for the kill".into());
            }
            // The file system has the read (it answers it SLOW_DELAY after this line).
            let started = fs.wait_line("slow-read start", Duration::from_secs(1))?;
            let reaped_after = kill_and_reap(&mut daemon, SLOW_DELAY + Duration::from_secs(30));
            let first_log = daemon.stderr();
            let t = Instant::now();
            let again = Daemon::try_spawn(&args, 1)?;
            std::fs::write(work.join("restarted"), b"").expect("restarted");
            // The new sluice resubmits the read: the file system gets it again.
            let resubmitted = fs
                .wait_line("slow-read start", Duration::from_secs(60))
                .is_ok();
            Ok((
                started,
                reaped_after,
                t.elapsed(),
                resubmitted,
                first_log,
                again,
            ))
        });
        let run = guest.join().expect("VM thread");
        (run, host.join().expect("host thread"))
    });
    let run = expect_boot(run, &mut daemon);
    let (started, reaped_after, _, resubmitted, first_log, mut again) = match host {
        Ok(h) => h,
        Err(e) => {
            daemon.kill();
            panic!(
                "{e}\nguest reported: {:?}\n--- console ---\n{}\n--- sluice stderr ---\n{}",
                run.results,
                run.console,
                daemon.stderr()
            );
        }
    };
    let second_log = again.stderr();
    for l in second_log
        .lines()
        .filter(|l| l.contains(RESUBMITTED) || l.contains("the ring resumes"))
    {
        eprintln!("restarted sluice: {l}");
    }
    eprintln!(
        "vm_vhost_user_crash (slow read): boot and job {:.1?}; {} writes done and {} in flight \
         when the guest asked for the kill; the file system had the read ({started}); sluice \
         reaped {reaped_after:.1?} after SIGKILL; the read reached the file again after the \
         restart: {resubmitted}; the slow read took {} s in all; guest reported {:?}",
        run.elapsed,
        run.result("writes_before_kill"),
        run.result("inflight_at_kill"),
        run.results
            .get("slow_read_seconds")
            .map_or("(never)", String::as_str),
        run.results
    );
    let evidence = format!(
        "guest reported: {:?}\n--- qemu ---\n{}\n--- first sluice's stderr ---\n{first_log}\n\
         --- second sluice's stderr ---\n{second_log}",
        run.results, run.qemu_log
    );
    // The setting: the read was in flight while later writes completed.
    run.ensure_eq_with("done", "yes", &evidence);
    run.ensure_eq_with("slow_running_at_kill", "yes", &evidence);
    run.ensure_eq_with("fio_running_at_kill", "yes", &evidence);
    run.ensure_with(
        run.result_u64("writes_before_kill") >= WRITES_BEFORE_KILL,
        "fio had not written enough before the kill",
        &evidence,
    );
    run.ensure_eq_with("restarted_seen", "yes", &evidence);
    // The outcome: the read completes with the right data, the writes verify, nothing
    // hangs, no I/O error.
    run.ensure_eq_with("slow_read_exit", "0", &evidence);
    run.ensure_eq_with("slow_data", "ok", &evidence);
    run.ensure_eq_with("fio_exit", "0", &evidence);
    run.ensure_eq_with("hung_tasks", "0", &evidence);
    run.ensure_eq_with("dmesg_io_errors", "0", &evidence);
    run.ensure_with(
        second_log.contains(RESUBMITTED),
        "the restarted sluice did not say it resubmitted requests",
        &evidence,
    );
    let status = again.sigterm_and_wait(EXIT_TIMEOUT);
    again.assert_exit_ok(status);
}

// --- five kills under fio --------------------------------------------------------------------

const FIO_DISK_BYTES: u64 = 256 * MIB;
const KILLS: usize = 5;
/// fio runs this long with the new sluice before the next kill.
const BETWEEN_KILLS: Duration = Duration::from_millis(2500);

const FIO_JOB: &str = r#"
set -uo pipefail
dev=/dev/vda
W=$SLUICE_VM_WORK
now() { date +%s.%N; }
hung_task_watch
t0=$(now)
# Two jobs, one per vCPU (blk-mq maps vCPU N to virtqueue N), depth 64 each, on their own
# 32 MiB, crc32c-verified once written. Rounds until the host has done its kills, then one
# more.
round() {
    fio --name=r$1 --filename=$dev --ioengine=io_uring --direct=1 --eta=never \
        --rw=randwrite --bs=4k --size=32M --offset_increment=64M --numjobs=2 \
        --cpus_allowed=0,1 --cpus_allowed_policy=split --iodepth=64 --verify=crc32c \
        --output=/tmp/fio-$1.log >/tmp/fio-$1.out 2>&1
}
rounds=0 failed=0 last=0
: >"$W/fio-running"
while :; do
    rounds=$((rounds + 1))
    if ! round $rounds; then
        failed=$((failed + 1))
        echo "--- fio round $rounds failed ---"; cat /tmp/fio-$rounds.out /tmp/fio-$rounds.log
    fi
    [ "$last" = 1 ] && break
    [ -e "$W/kills-done" ] && last=1
    [ $rounds -ge 100 ] && break
done
report rounds $rounds
report fio_failed $failed
report kills_done_seen "$([ -e "$W/kills-done" ] && echo yes || echo no)"
hung_tasks hung_tasks $t0
report dmesg_io_errors "$(dmesg | grep -cE 'I/O error|critical target error|end of device')"
echo "--- dmesg since vda ---"; dmesg | sed -n '/\[vda\]/,$p'
report done yes
"#;

/// One kill: how long the guest's disk was without a backend (SIGKILL to the new sluice's
/// `frontend connected`), and how many requests the new sluice resubmitted.
struct Kill {
    pause: Duration,
    resubmitted: usize,
}

fn resubmitted_in(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(RESUBMITTED))
        .filter_map(|l| {
            l.split("requests=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

#[test]
fn fio_verify_at_depth_64_on_two_queues_across_five_kills() {
    if skip_unless_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    let disk = work.join("disk.img");
    make_file(&disk, FIO_DISK_BYTES);
    let sock = work.join("vu.sock");
    let args = serve_args(&disk, &sock, &work.join("control.sock"));
    let mut daemon = Daemon::spawn(&args, 1);
    let original = sluice_bin();
    let upgraded = work.join("sluice-upgraded");
    std::fs::copy(&original, &upgraded).expect("copy the sluice binary");

    let vm = Vm::new(work)
        .vhost_user_blk(&sock, 2)
        .vhost_user_reconnect_ms(RECONNECT_MS)
        .timeout(Duration::from_secs(420));
    let vm_done = AtomicBool::new(false);
    let logs: std::sync::Mutex<Vec<String>> = Default::default();
    let (run, host) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let run = vm.run(FIO_JOB);
            vm_done.store(true, Ordering::SeqCst);
            run
        });
        let host = s.spawn(|| -> Result<Vec<Kill>, String> {
            if !wait_for_file(
                &work.join("fio-running"),
                &vm_done,
                Duration::from_secs(200),
            ) {
                return Err("the guest never started fio".into());
            }
            let mut kills = Vec::new();
            for k in 0..KILLS {
                std::thread::sleep(BETWEEN_KILLS);
                if vm_done.load(Ordering::SeqCst) {
                    return Err(format!("the guest finished before kill {}", k + 1));
                }
                let t = Instant::now();
                kill_and_reap(&mut daemon, Duration::from_secs(30));
                logs.lock().unwrap().push(daemon.stderr());
                // An upgrade is a new binary started over a killed one: every other
                // restart starts the copy.
                let bin = if k % 2 == 0 { &upgraded } else { &original };
                daemon = Daemon::try_spawn_bin(bin, &args, 1, &[])?;
                if !wait_log(&daemon, "frontend connected", Duration::from_secs(30)) {
                    return Err(format!("QEMU did not reconnect after kill {}", k + 1));
                }
                let pause = t.elapsed();
                // The resubmission follows the ring's start, a moment after the connection.
                std::thread::sleep(Duration::from_millis(500));
                kills.push(Kill {
                    pause,
                    resubmitted: resubmitted_in(&daemon.stderr()),
                });
            }
            std::fs::write(work.join("kills-done"), b"").expect("kills-done");
            Ok(kills)
        });
        let run = guest.join().expect("VM thread");
        (run, host.join().expect("host thread"))
    });
    let run = expect_boot(run, &mut daemon);
    let earlier = logs.into_inner().unwrap().join("\n--- next sluice ---\n");
    let evidence = format!(
        "guest reported: {:?}\n--- earlier sluices' stderr ---\n{earlier}\n\
         --- last sluice's stderr ---\n{}",
        run.results,
        daemon.stderr()
    );
    let kills = match host {
        Ok(k) => k,
        Err(e) => {
            daemon.kill();
            panic!("{e}\n--- console ---\n{}\n{evidence}", run.console);
        }
    };
    let pauses: Vec<String> = kills
        .iter()
        .map(|k| format!("{:.2} s", k.pause.as_secs_f64()))
        .collect();
    let resubmitted: Vec<usize> = kills.iter().map(|k| k.resubmitted).collect();
    eprintln!(
        "vm_vhost_user_crash (fio): boot and job {:.1?}; {} fio rounds; {KILLS} kills, pauses \
         (SIGKILL to the reconnect) {}; requests resubmitted after each: {resubmitted:?}",
        run.elapsed,
        run.result("rounds"),
        pauses.join(", ")
    );
    run.ensure_eq_with("done", "yes", &evidence);
    run.ensure_eq_with("kills_done_seen", "yes", &evidence);
    run.ensure_eq_with("fio_failed", "0", &evidence);
    run.ensure_eq_with("hung_tasks", "0", &evidence);
    run.ensure_eq_with("dmesg_io_errors", "0", &evidence);
    run.ensure_with(
        resubmitted.iter().sum::<usize>() > 0,
        "no kill found a request in flight: the test did not exercise resubmission",
        &evidence,
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}
