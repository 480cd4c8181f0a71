//! Daemon lifecycle seen from outside: a frontend killed with requests in
//! flight costs only its own connection; systemd readiness notification.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_tests::{make_file, pattern, Client, Daemon, Op};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 64 * MIB;
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const CLIENT_ENV: &str = "SLUICE_TEST_WRITER_SOCKET";

fn writes(seed: u64, count: u64) -> Vec<Op> {
    (0..count)
        .map(|i| {
            let offset = (i * 4096) % DISK_BYTES;
            Op::Write {
                offset,
                data: pattern(offset, 4096, seed),
                fua: false,
            }
        })
        .collect()
}

/// Not a test on its own: the child process of
/// `frontend_killed_with_requests_in_flight_costs_only_its_connection`. It
/// writes at depth 32 forever and prints a line per completed batch.
#[test]
#[ignore = "helper process, started by another test"]
fn writer_process() {
    let Ok(sock) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut client = Client::connect(Path::new(&sock), 1, 32).expect("connect");
    let ops = writes(0xDEAD, 256);
    loop {
        client.run(0, &ops).expect("writes");
        println!("batch");
    }
}

#[test]
fn frontend_killed_with_requests_in_flight_costs_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (a_img, b_img) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_file(&a_img, DISK_BYTES);
    make_file(&b_img, DISK_BYTES);
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\nname = \"a\"\npath = {a:?}\n[[disk]]\nname = \"b\"\npath = {b:?}\n\
             [[export]]\nname = \"a\"\ndisk = \"a\"\ntype = \"vhost-user\"\nsocket = {asock:?}\n\
             [[export]]\nname = \"b\"\ndisk = \"b\"\ntype = \"vhost-user\"\nsocket = {bsock:?}\n",
            a = a_img,
            b = b_img,
            asock = a_sock,
            bsock = b_sock
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&["serve", "--config", config.to_str().unwrap()], 2);

    // Another export keeps serving throughout: a client on b writes in a loop.
    let stop = AtomicBool::new(false);
    let b_batches = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            let mut client = Client::connect(&b_sock, 1, 16).expect("connect b");
            let ops = writes(0xB0B, 128);
            while !stop.load(Ordering::SeqCst) {
                let outs = client.run(0, &ops).expect("b writes");
                assert!(outs.iter().all(|o| o.ret == 0), "a write on b failed");
                b_batches.fetch_add(1, Ordering::SeqCst);
            }
        });

        // The victim: a separate process writing at depth 32 on a.
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_process", "--ignored", "--nocapture"])
            .env(CLIENT_ENV, &a_sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut batches = 0;
        while batches < 3 {
            assert!(Instant::now() < deadline, "the writer made no progress");
            match lines.next() {
                Some(Ok(l)) if l == "batch" => batches += 1,
                Some(_) => {}
                None => panic!("the writer exited early"),
            }
        }
        // Requests are in flight right now (the writer never stops).
        child.kill().unwrap();
        child.wait().unwrap();

        // Export a is usable again by a new frontend, with its data intact.
        let before = b_batches.load(Ordering::SeqCst);
        let mut again = Client::connect(&a_sock, 1, 8).expect("reconnect a");
        let data = again.read(0, 4096).expect("read a");
        assert_eq!(
            data,
            pattern(0, 4096, 0xDEAD),
            "a lost the killed client's write"
        );
        assert_eq!(again.write(4096, &pattern(4096, 4096, 7)), 0);
        drop(again);
        let deadline = Instant::now() + Duration::from_secs(30);
        while b_batches.load(Ordering::SeqCst) < before + 2 {
            assert!(Instant::now() < deadline, "export b stopped serving");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
        b.join().unwrap();
    });
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

#[test]
fn tells_systemd_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let sock = dir.path().join("vm.sock");
    let args = [
        "serve",
        "--disk",
        "null:16M",
        "--vhost-user",
        sock.to_str().unwrap(),
    ];
    let mut daemon =
        Daemon::try_spawn_env(&args, 1, &[("NOTIFY_SOCKET", notify.to_str().unwrap())])
            .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 256];
    let n = listener
        .recv(&mut buf)
        .expect("no notification within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.lines().any(|l| l == "READY=1"), "got {msg:?}");
    // Readiness is only announced once the socket accepts connections.
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// Issue 9, item 7: an image that `create_size` created was left behind when a later
/// start step failed. Every failing control socket (busy, a directory, a path too long
/// for a UNIX socket) now takes the new image with it; an image that existed stays.
#[test]
fn a_failed_start_removes_the_image_it_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:1M",
            "--vhost-user",
            dir.path().join("busy.sock").to_str().expect("utf-8"),
        ],
        1,
    );
    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir).expect("mkdir");
    let too_long = dir.path().join("x".repeat(120)).join("control.sock");
    let image = dir.path().join("new.img");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\nname = \"d\"\npath = \"{}\"\ncreate_size = \"8M\"\n\n[[export]]\nname = \"x\"\ndisk = \"d\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n",
            image.display(),
            dir.path().join("x.sock").display()
        ),
    )
    .expect("write config");
    for control in [&busy.control, &a_dir, &too_long] {
        let out = sluice_tests::run_to_exit(&[
            "serve",
            "--config",
            config.to_str().expect("utf-8"),
            "--control",
            control.to_str().expect("utf-8"),
        ]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "--control {}: {}",
            control.display(),
            out.stderr
        );
        assert!(
            !image.exists(),
            "--control {} failed ({}) but left the image it created",
            control.display(),
            out.stderr.trim()
        );
    }
    // An image that was there before is never removed.
    make_file(&image, 8 * MIB);
    let out = sluice_tests::run_to_exit(&[
        "serve",
        "--config",
        config.to_str().expect("utf-8"),
        "--control",
        busy.control.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(image.exists(), "an existing image was removed");
    drop(busy);
}
