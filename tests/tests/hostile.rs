//! A hostile or buggy frontend costs only its own queue: a corrupted ring is marked broken
//! with one log line, burns no CPU, leaves other exports serving and the daemon stoppable,
//! and is served again after the frontend reconnects.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use sluice_tests::{
    path_str, pattern, Client, Daemon, RawClient, EXIT_TIMEOUT, MIB, VIRTIO_BLK_S_OK,
};

/// Two null disks, each over its own vhost-user socket: `victim` and `bystander`.
fn two_exports(dir: &Path) -> Daemon {
    let config = dir.join("sluice.toml");
    let toml = format!(
        r#"[[disk]]
name = "d0"
path = "null:64M"

[[disk]]
name = "d1"
path = "null:64M"

[[export]]
name = "victim"
disk = "d0"
type = "vhost-user"
socket = "{s0}"

[[export]]
name = "bystander"
disk = "d1"
type = "vhost-user"
socket = "{s1}"
"#,
        s0 = path_str(&dir.join("victim.sock")),
        s1 = path_str(&dir.join("bystander.sock")),
    );
    std::fs::write(&config, toml).expect("write config");
    Daemon::spawn(&["serve", "--config", path_str(&config)], 2)
}

/// Issue 9, item 1: an available index 1000 entries ahead of a 16-entry ring made
/// virtio-queue log in a tight loop (16.5 GB in 5 minutes), spun a core and kept the
/// daemon from exiting on SIGTERM.
#[test]
fn a_corrupted_ring_is_broken_quietly_and_spares_everyone_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = two_exports(dir.path());
    let victim_sock = dir.path().join("victim.sock");

    let mut raw = RawClient::connect(&victim_sock).expect("connect to victim");
    assert_eq!(raw.get_id().expect("GET_ID before").0, VIRTIO_BLK_S_OK);
    let before = daemon.resources();
    raw.publish_bogus_avail_idx(1000)
        .expect("publish bogus index");
    // Kick it a few more times, as a guest that keeps trying would.
    for _ in 0..50 {
        raw.publish_bogus_avail_idx(0).expect("kick");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_secs(1));
    let after = daemon.resources();

    // No CPU: the queue is not polled. 2 s of wall time, at most 0.2 s of CPU (the
    // spinning daemon used all 2 s of a core).
    let cpu_ticks = after.cpu_ticks - before.cpu_ticks;
    assert!(
        cpu_ticks <= 20,
        "the daemon used {cpu_ticks} ticks (1/100 s) of CPU in 2 s with a broken ring\n{}",
        daemon.stderr()
    );

    // One line names the export, the queue and the reason; nothing floods the log.
    let stderr = daemon.stderr();
    let broken: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("queue broken"))
        .collect();
    assert_eq!(
        broken.len(),
        1,
        "one 'queue broken' line expected:\n{stderr}"
    );
    assert!(
        broken[0].contains("victim")
            && broken[0].contains("queue=0")
            && broken[0].contains("ahead"),
        "the line names export, queue and reason: {}",
        broken[0]
    );
    assert!(
        stderr.lines().count() < 20,
        "the log grew by {} lines:\n{stderr}",
        stderr.lines().count()
    );

    // The other export never notices.
    let mut other = Client::connect(&dir.path().join("bystander.sock"), 1, 4).expect("bystander");
    let data = pattern(0, 64 * 1024, 7);
    assert_eq!(other.write(0, &data), 0, "bystander write");
    assert_eq!(
        other.read(0, data.len()).expect("bystander read").len(),
        data.len()
    );
    drop(other);

    // A fresh connection (a restarted or reset frontend) is served again.
    drop(raw);
    let mut again = RawClient::connect(&victim_sock).expect("reconnect to victim");
    assert_eq!(
        again.get_id().expect("GET_ID after reconnect").0,
        VIRTIO_BLK_S_OK
    );
    let (status, _) = again.read(MIB, 4096).expect("read after reconnect");
    assert_eq!(status, VIRTIO_BLK_S_OK);

    // And SIGTERM still stops everything promptly, with a clean exit.
    let started = Instant::now();
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        started.elapsed()
    );
    drop(again);
}

/// A broken ring does not stop the daemon's exit while its frontend stays connected and
/// keeps kicking.
#[test]
fn sigterm_with_a_broken_ring_still_connected_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = two_exports(dir.path());
    let mut raw = RawClient::connect(&dir.path().join("victim.sock")).expect("connect");
    raw.publish_bogus_avail_idx(1000)
        .expect("publish bogus index");
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    daemon.signal(libc::SIGTERM);
    while daemon.wait(Duration::from_millis(10)).is_none() {
        let _ = raw.publish_bogus_avail_idx(0);
        assert!(
            started.elapsed() < EXIT_TIMEOUT,
            "still running {:?} after SIGTERM\n{}",
            started.elapsed(),
            daemon.stderr()
        );
    }
    let status = daemon.wait(Duration::ZERO).expect("exited");
    daemon.assert_exit_ok(status);
}

/// Sets the daemon's soft open-file limit to `n` (the hard limit stays).
fn set_nofile(pid: u32, n: u64) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads another process's limit into `old`, a valid rlimit.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit (read): {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: n.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets another process's limit from `new`, a valid rlimit; no old-value pointer.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Issue 9, item 2: at the descriptor limit the export failed every new connection and
/// its thread spun at 0.8 CPU writing 100 MB of ERROR lines in 41 s. Now it backs off,
/// logs a summary, and takes frontends again once descriptors are back.
#[test]
fn out_of_descriptors_the_listener_backs_off_quietly_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = two_exports(dir.path());
    let sock = dir.path().join("bystander.sock");
    // The first frontend uses the connection built at start; later ones need new
    // descriptors (eventfds, rings).
    drop(Client::connect(&sock, 1, 4).expect("first client"));
    thread::sleep(Duration::from_millis(200));
    let fds = daemon.resources().fds as u64;
    set_nofile(daemon.pid(), fds + 1);
    let before = daemon.resources();
    let stuck = thread::spawn({
        let sock = sock.clone();
        move || Client::connect(&sock, 1, 4).map(|_| ())
    });
    thread::sleep(Duration::from_secs(3));
    let after = daemon.resources();
    let cpu_ticks = after.cpu_ticks - before.cpu_ticks;
    let stderr = daemon.stderr();
    // Whatever the line says, it quotes the OS error.
    let failures = stderr
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(
        cpu_ticks <= 30,
        "{cpu_ticks} ticks (1/100 s) of CPU in 3 s out of descriptors\n{stderr}"
    );
    assert!(
        (1..=2).contains(&failures),
        "{failures} lines about running out of descriptors in 3 s (one, then one per 10 s)\n{stderr}"
    );
    set_nofile(daemon.pid(), 1024);
    let _ = stuck.join();
    // Descriptors are back: frontends are served again.
    let mut c = Client::connect(&sock, 1, 4).expect("client after the limit was raised");
    let data = pattern(0, 4096, 3);
    assert_eq!(c.write(0, &data), 0);
    drop(c);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// A frontend whose memory table maps more of a file than the file holds (a memfd of 1 MiB
/// described as 4 MiB) and puts a request header in the part with nothing behind it: the
/// daemon touching that page would die of SIGBUS, and every export with it. The queue
/// refuses the table before it touches guest memory (one line naming the region and the
/// file's size), the daemon lives, the other export serves, and SIGTERM exits cleanly.
#[test]
fn a_memory_table_past_the_end_of_its_file_is_refused_not_a_sigbus() {
    use sluice_tests::vring::{
        negotiate, wait_until, Desc, GuestMemory, SplitRing, VIRTIO_F_VERSION_1, VRING_DESC_F_WRITE,
    };
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = two_exports(dir.path());
    let (mut f, features) = negotiate(
        &dir.path().join("victim.sock"),
        1,
        1u64 << VIRTIO_F_VERSION_1,
    );
    let file_bytes = MIB as usize;
    let mem = GuestMemory::new(file_bytes);
    let mut region = mem.region();
    region.memory_size = 4 * MIB;
    let (ring, end) = SplitRing::layout(16, 0x1000);
    // A read whose header lies at 2 MiB, past the file's end; its status byte inside.
    let (header, status, data) = (2 * MIB, end, end + 4096);
    ring.set_chain(
        &mem,
        &[0, 1, 2],
        &[
            Desc {
                addr: header,
                len: 16,
                flags: 0,
                next: 0,
            },
            Desc {
                addr: data,
                len: 4096,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            },
            Desc {
                addr: status,
                len: 1,
                flags: VRING_DESC_F_WRITE as u16,
                next: 0,
            },
        ],
    );
    ring.set_avail_entry(&mem, 0, 0);
    ring.set_avail_idx(&mem, 1);
    let (kick, call) = (
        EventFd::new(EFD_NONBLOCK).expect("kick"),
        EventFd::new(EFD_NONBLOCK).expect("call"),
    );
    f.set_features(features).expect("SET_FEATURES");
    f.set_mem_table(&[region]).expect("SET_MEM_TABLE");
    f.set_vring_num(0, ring.size).expect("SET_VRING_NUM");
    f.set_vring_base(0, 0).expect("SET_VRING_BASE");
    f.set_vring_addr(0, &ring.config(&mem))
        .expect("SET_VRING_ADDR");
    f.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
    f.set_vring_call(0, &call).expect("SET_VRING_CALL");
    f.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    kick.write(1).expect("kick");

    let refused = wait_until(Duration::from_secs(10), || {
        daemon.stderr().contains("memory table is refused")
    });
    let exited = daemon.wait(Duration::from_millis(300));
    let stderr = daemon.stderr();
    assert!(exited.is_none(), "the daemon died: {exited:?}\n{stderr}");
    assert!(refused, "no line refusing the memory table:\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("memory table is refused"))
        .unwrap();
    assert!(
        line.contains("victim") && line.contains(&format!("a file of {file_bytes} bytes")),
        "the line names the export and the file's size: {line}"
    );
    assert_eq!(
        ring.used_idx(&mem),
        0,
        "nothing is answered from that table"
    );

    let mut other = Client::connect(&dir.path().join("bystander.sock"), 1, 4).expect("bystander");
    let data = pattern(0, 64 * 1024, 9);
    assert_eq!(other.write(0, &data), 0, "bystander write");
    drop(other);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    drop(f);
}
