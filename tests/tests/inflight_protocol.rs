//! The inflight messages (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) against the real
//! daemon, sent by the vhost crate's own frontend: sluice offers the feature, answers
//! `GET_INFLIGHT_FD` with a sealed memfd of exactly the spec's size, takes it back with
//! `SET_INFLIGHT_FD`, and refuses a hostile buffer (a size that is not exact, too many
//! queues, a file that could shrink, an unknown header) with an error reply and a log line
//! naming what is wrong, without a crash, and goes on serving.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sluice_tests::{serve_file, vring, Client, Daemon, EXIT_TIMEOUT, MIB};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};

const QUEUES: u16 = 2;
/// Bytes of one queue region for 128 descriptors: a 16-byte header and 16 bytes per
/// descriptor, rounded up to 64.
const REGION_128: u64 = 2112;

fn serve(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let served = serve_file(dir, 64 * MIB, &["--queues", &QUEUES.to_string()]);
    (served.daemon, served.sock)
}

/// A frontend that negotiated the inflight messages (acking every virtio feature offered)
/// and asks for a reply to each message.
fn negotiate(sock: &Path) -> Frontend {
    vring::negotiate(sock, QUEUES, u64::MAX).0
}

fn ask(num_queues: u16, queue_size: u16) -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    }
}

#[test]
fn get_and_set_inflight_fd_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut daemon, sock) = serve(dir.path());
    let mut f = negotiate(&sock);

    let (reply, file) = f
        .get_inflight_fd(&ask(QUEUES, 128))
        .expect("GET_INFLIGHT_FD");
    assert_eq!(reply.mmap_size, u64::from(QUEUES) * REGION_128);
    assert_eq!(reply.mmap_offset, 0);
    assert_eq!((reply.num_queues, reply.queue_size), (QUEUES, 128));
    assert_eq!(file.metadata().unwrap().len(), reply.mmap_size);
    // SAFETY: F_GET_SEALS on a descriptor we own; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "seals {seals:#x}");
    let mut bytes = vec![1u8; reply.mmap_size as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "a new buffer is all zeroes");

    // QEMU sends it back at every device start.
    f.set_inflight_fd(&reply, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    f.set_inflight_fd(&reply, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD again");
    // A buffer for fewer queues than the export has is fine (QEMU's num-queues may be
    // lower).
    let (one, one_file) = f.get_inflight_fd(&ask(1, 256)).expect("GET, 1 queue");
    assert_eq!(one.mmap_size, 4160);
    f.set_inflight_fd(&one, one_file.as_raw_fd())
        .expect("SET, 1 queue");
    drop(f);

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert!(!daemon.stderr().contains("refused"), "{}", daemon.stderr());
}

/// Connects, gets a good buffer, and sends `SET_INFLIGHT_FD` with what `spoil` makes of
/// it: it must be refused. A refused message ends the connection (vhost-user-backend
/// stops serving a frontend whose message failed, as QEMU disconnects when a device
/// start fails), so each case has its own.
fn refused(
    sock: &Path,
    what: &str,
    spoil: impl FnOnce(VhostUserInflight, File) -> (VhostUserInflight, File),
) {
    let mut f = negotiate(sock);
    let (good, file) = f.get_inflight_fd(&ask(QUEUES, 128)).expect("GET");
    let (bad, file) = spoil(good, file);
    assert!(
        f.set_inflight_fd(&bad, file.as_raw_fd()).is_err(),
        "SET_INFLIGHT_FD with {what} must be refused"
    );
}

#[test]
fn hostile_inflight_buffers_are_refused_and_the_daemon_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut daemon, sock) = serve(dir.path());

    // Not the exact size for what it describes.
    for size in [2 * REGION_128 - 1, 2 * REGION_128 + 64, REGION_128, 1 << 40] {
        refused(&sock, &format!("mmap_size {size}"), |good, file| {
            (
                VhostUserInflight {
                    mmap_size: size,
                    ..good
                },
                file,
            )
        });
    }
    // More queues than the export has, rings larger than it takes.
    refused(&sock, "3 queues", |good, file| {
        (
            VhostUserInflight {
                num_queues: 3,
                mmap_size: 3 * REGION_128,
                ..good
            },
            file,
        )
    });
    refused(&sock, "4096 descriptors", |good, file| {
        (
            VhostUserInflight {
                queue_size: 4096,
                ..good
            },
            file,
        )
    });
    // Past the end of the file, or at an offset that is not a page.
    refused(&sock, "an offset past the end", |good, file| {
        (
            VhostUserInflight {
                mmap_offset: 4096,
                ..good
            },
            file,
        )
    });
    refused(&sock, "an unaligned offset", |good, file| {
        (
            VhostUserInflight {
                mmap_offset: 64,
                ..good
            },
            file,
        )
    });
    // A plain file of the right size: it could be truncated under the mapping.
    refused(&sock, "an unsealed file", |good, _| {
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(good.mmap_size).unwrap();
        (good, plain)
    });
    // A header that says version 7 in queue 1.
    refused(&sock, "region version 7", |good, file| {
        file.write_all_at(&7u16.to_ne_bytes(), REGION_128 + 8)
            .unwrap();
        (good, file)
    });

    // Each refusal is one line saying what is wrong.
    let stderr = daemon.stderr();
    for what in [
        "mmap_size is 4223 bytes; 2 queues of 128 descriptors take exactly 4224",
        "the frontend describes 3 queues; this export has 1 to 2",
        "the frontend describes rings of 4096 descriptors",
        "does not fit in its file",
        "is not a multiple of the page size",
        "not sealed against shrinking",
        "queue 1: region version 7",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("SET_INFLIGHT_FD refused") && l.contains(what)),
            "no refusal naming {what:?}\n{stderr}"
        );
    }

    // The daemon is alive and serves the next frontend.
    let mut client = Client::connect(&sock, 1, 4).expect("connect after the refusals");
    let data = vec![0x5au8; 4096];
    assert_eq!(client.write(MIB, &data), 0);
    assert!(
        client.read(MIB, 4096).expect("read") == data,
        "the write after the refusals reads back"
    );
    drop(client);
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}
