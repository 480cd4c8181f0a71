//! A restarted sluice picks up a ring where the previous one died, with no kick from the
//! frontend. Each test plays QEMU reconnecting to a freshly started daemon after a previous
//! sluice was killed: it builds guest memory (a memfd) and a 128-descriptor split ring by
//! hand, fills the inflight buffer (`GET_INFLIGHT_FD`, then written as the dead sluice
//! left it), and starts queue 0 the way QEMU does (`SET_FEATURES`, `SET_INFLIGHT_FD`,
//! `SET_MEM_TABLE`, the vring messages, `SET_VRING_ENABLE`). The test never writes the kick
//! eventfd: whatever happens must happen because the ring started.
//!
//! The hang these guard against (the 5-kill VM test's): a sluice killed after publishing
//! completions in the used ring but before signalling the call eventfd leaves a guest
//! whose `used_event` (`VIRTIO_RING_F_EVENT_IDX`) the used index has already passed, so no
//! later completion ever interrupts it, and a guest driver waiting for those completions
//! never kicks again. The fix: each queue worker signals the call eventfd once when its
//! ring starts running. That the restarted sluice looks at a ring nobody kicks at all is
//! owed to vhost-user-backend, which hands the backend one event for each ring when its
//! kick descriptor is registered (0.24.0's event loop does): the second and third tests
//! need it.
//!
//! * [`published_but_unsignalled_completions_are_signalled_at_start`]: the used ring holds
//!   completions the guest was never told about (`used_event` behind the used index) and
//!   nothing is in flight: the call eventfd must be signalled, and nothing added to the
//!   used ring.
//! * [`a_read_in_flight_is_resubmitted_at_start`]: the inflight buffer marks a read the dead
//!   sluice took and never answered: it must be run again and answered with the disk's
//!   data, and the buffer cleared for it.
//! * [`the_last_batch_is_repaired_not_run_again`]: a write the dead sluice completed and
//!   published, but whose inflight entry it had not cleared (the region's `used_idx` one
//!   behind the used ring): the entry must be cleared, the write not run again (the disk
//!   keeps its old data), and the used ring left as it is.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use sluice_tests::vring::{
    negotiate, start_device, wait_readable, wait_until, Desc, GuestMemory, InflightBuffer,
    InflightDesc, InflightHeader, SplitRing, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE,
};
use sluice_tests::{first_difference, pattern, serve_file, Daemon, ServedFile, EXIT_TIMEOUT, MIB};
use vhost::vhost_user::Frontend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The export's queues (QEMU's buffer covers all; only queue 0 is started).
const QUEUES: u16 = 2;
/// Descriptors in the ring.
const RING: u16 = 128;
/// Guest memory.
const MEM_BYTES: usize = 4 * MIB as usize;
/// The disk.
const DISK_BYTES: u64 = 8 * MIB;
/// Seed of the pattern the disk is filled with.
const DISK_SEED: u64 = 0x5eed_d15c;
/// The used index where the dead sluice stopped (well past 0, and not a multiple of the
/// ring size, so slots and indices differ).
const U: u16 = 1000;
/// How long anything the ring's start causes may take.
const BOUND: Duration = Duration::from_secs(10);
/// How long to watch, after the start, for what must not happen.
const SETTLE: Duration = Duration::from_millis(300);
/// Where request buffers live in guest memory (the ring is below).
const BUFFERS: u64 = MIB;

/// A daemon serving a pattern-filled disk, and a frontend that negotiated with it and holds
/// the daemon's inflight buffer, with guest memory and queue 0's ring laid out but not yet
/// started.
struct Restart {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    disk: PathBuf,
    frontend: Frontend,
    features: u64,
    inflight: InflightBuffer,
    mem: GuestMemory,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
}

impl Restart {
    fn new() -> Restart {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, pattern(0, DISK_BYTES as usize, DISK_SEED)).expect("fill disk");
        let ServedFile { daemon, sock, .. } =
            serve_file(dir.path(), DISK_BYTES, &["--queues", &QUEUES.to_string()]);
        let want = 1u64 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        let (mut frontend, features) = negotiate(&sock, QUEUES, want);
        assert_eq!(
            features & want,
            want,
            "sluice must offer VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX: acked {features:#x}"
        );
        let inflight = InflightBuffer::get(&mut frontend, QUEUES, RING);
        let mem = GuestMemory::new(MEM_BYTES);
        let (ring, end) = SplitRing::layout(RING, 0x1000);
        assert!(end <= BUFFERS);
        Restart {
            _dir: dir,
            daemon,
            disk,
            frontend,
            features,
            inflight,
            mem,
            ring,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    /// The region of queue 0 as a dead sluice left it: version 1, `used_idx`,
    /// `last_batch_head`; every descriptor idle but those in `descs`.
    fn set_region(&self, used_idx: u16, last_batch_head: u16, descs: &[(u16, InflightDesc)]) {
        self.inflight.set_header(
            0,
            InflightHeader {
                features: 0,
                version: 1,
                desc_num: RING,
                last_batch_head,
                used_idx,
            },
        );
        for &(head, d) in descs {
            self.inflight.set_desc(0, head, d);
        }
    }

    /// A virtio-blk request of type `kind` at `sector` in descriptors `heads` (3 of them):
    /// the 16-byte header, 4096 bytes of data (`data` for a write, device-writable for a
    /// read), a device-writable status byte (set to 0xff, so an answer shows). Its buffers
    /// start at `buffers`.
    fn set_request(&self, heads: [u16; 3], kind: u32, sector: u64, data: &[u8], buffers: u64) {
        assert_eq!(data.len(), 4096);
        let (hdr, dat, status) = (buffers, buffers + 0x1000, buffers + 0x2000);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(hdr, &h);
        self.mem.write(dat, data);
        self.mem.write(status, &[0xff]);
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        self.ring.set_chain(
            &self.mem,
            &heads,
            &[
                Desc {
                    addr: hdr,
                    len: 16,
                    flags: 0,
                    next: 0,
                },
                Desc {
                    addr: dat,
                    len: 4096,
                    flags: data_flags,
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
    }

    /// Fills the rings' history before `U`: the guest made `count` chains available and
    /// the dead sluice answered them all.
    fn set_history(&self, count: u16) {
        for pos in U.wrapping_sub(count)..U {
            let head = pos % RING;
            self.ring.set_avail_entry(&self.mem, pos, head);
            self.ring.set_used_entry(&self.mem, pos, u32::from(head), 1);
        }
    }

    /// Starts queue 0 as QEMU does when it reconnects (base `U`); never kicks.
    fn start(&mut self) {
        start_device(
            &mut self.frontend,
            self.features,
            &self.inflight,
            &self.mem,
            0,
            &self.ring,
            U,
            &self.kick,
            &self.call,
        );
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.disk).expect("open disk");
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).expect("read disk");
        b
    }

    /// Fails the test with `what`, and the daemon's log.
    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n--- sluice stderr ---\n{}", self.daemon.stderr());
    }

    fn expect_call(&self, why: &str) {
        if !wait_readable(&self.call, BOUND) {
            self.fail(&format!(
                "the call eventfd was not signalled within {BOUND:?} after the ring started: {why}"
            ));
        }
    }

    /// SIGTERM, and a clean exit.
    fn stop(self) {
        let Restart {
            mut daemon,
            frontend,
            ..
        } = self;
        drop(frontend);
        let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
        daemon.assert_exit_ok(status);
    }
}

#[test]
fn published_but_unsignalled_completions_are_signalled_at_start() {
    let mut t = Restart::new();
    // Ten completions published, the last interrupt for the first of them: the guest's
    // used_event is ten behind the used index, so only a signal tells it.
    t.set_history(10);
    t.ring.set_avail_idx(&t.mem, U);
    t.ring.set_used_idx(&t.mem, U);
    t.ring.set_used_event(&t.mem, U - 10);
    t.set_region(U, (U - 1) % RING, &[]);
    let before: Vec<_> = (0..RING).map(|p| t.ring.used_entry(&t.mem, p)).collect();

    t.start();
    t.expect_call(
        "a guest whose used_event the used index already passed is never interrupted again",
    );
    std::thread::sleep(SETTLE);
    let used = t.ring.used_idx(&t.mem);
    if used != U {
        t.fail(&format!(
            "the used index moved from {U} to {used} with nothing available"
        ));
    }
    let after: Vec<_> = (0..RING).map(|p| t.ring.used_entry(&t.mem, p)).collect();
    assert!(before == after, "the used ring's entries changed");
    let h = t.inflight.header(0);
    assert_eq!((h.version, h.used_idx), (1, U), "region header {h:?}");
    t.stop();
}

#[test]
fn a_read_in_flight_is_resubmitted_at_start() {
    let mut t = Restart::new();
    const H: u16 = 5;
    const SECTOR: u64 = 2048 + 8;
    t.set_history(10);
    // The guest made the read available at U; the dead sluice took it (marked in flight,
    // counter 7) and died before answering.
    t.set_request(
        [H, H + 1, H + 2],
        VIRTIO_BLK_T_IN,
        SECTOR,
        &[0u8; 4096],
        BUFFERS,
    );
    t.ring.set_avail_entry(&t.mem, U, H);
    t.ring.set_avail_idx(&t.mem, U + 1);
    t.ring.set_used_idx(&t.mem, U);
    t.ring.set_used_event(&t.mem, U);
    t.set_region(
        U,
        (U - 1) % RING,
        &[(
            H,
            InflightDesc {
                inflight: 1,
                next: 0,
                counter: 7,
            },
        )],
    );

    t.start();
    if !wait_until(BOUND, || t.ring.used_idx(&t.mem) == U + 1) {
        t.fail(&format!(
            "the read in flight (head {H}) was not answered within {BOUND:?} of the ring's \
             start: used index {} (want {})",
            t.ring.used_idx(&t.mem),
            U + 1
        ));
    }
    assert_eq!(
        t.ring.used_entry(&t.mem, U),
        (u32::from(H), 4097),
        "the used element for the resubmitted read"
    );
    let status = t.mem.read(BUFFERS + 0x2000, 1)[0];
    assert_eq!(status, VIRTIO_BLK_S_OK as u8, "the read's status");
    let got = t.mem.read(BUFFERS + 0x1000, 4096);
    let want = t.disk_bytes(SECTOR * 512, 4096);
    if let Some(diff) = first_difference("the resubmitted read's data", SECTOR * 512, &got, &want) {
        panic!("{diff}");
    }
    t.expect_call("the answer to the resubmitted read crossed used_event");
    if !wait_until(BOUND, || {
        t.inflight.desc(0, H).inflight == 0 && t.inflight.header(0).used_idx == U + 1
    }) {
        t.fail(&format!(
            "the inflight region was not cleared for the answered read: desc {:?}, header {:?}",
            t.inflight.desc(0, H),
            t.inflight.header(0)
        ));
    }
    t.stop();
}

#[test]
fn the_last_batch_is_repaired_not_run_again() {
    let mut t = Restart::new();
    const H2: u16 = 9;
    const SECTOR: u64 = 4096 + 16;
    t.set_history(10);
    // A write of data the disk does not hold, made available at U-1, completed and
    // published by the dead sluice ({H2, 1} at U-1, used index U), which died before it
    // cleared the entry (region used_idx U-1, H2 the last batch, still marked).
    let data = pattern(SECTOR * 512, 4096, !DISK_SEED);
    let original = t.disk_bytes(SECTOR * 512, 4096);
    assert!(data != original);
    t.set_request(
        [H2, H2 + 1, H2 + 2],
        VIRTIO_BLK_T_OUT,
        SECTOR,
        &data,
        BUFFERS,
    );
    t.mem.write(BUFFERS + 0x2000, &[VIRTIO_BLK_S_OK as u8]);
    t.ring.set_avail_entry(&t.mem, U - 1, H2);
    t.ring.set_used_entry(&t.mem, U - 1, u32::from(H2), 1);
    t.ring.set_avail_idx(&t.mem, U);
    t.ring.set_used_idx(&t.mem, U);
    t.ring.set_used_event(&t.mem, U - 1);
    t.set_region(
        U - 1,
        H2,
        &[(
            H2,
            InflightDesc {
                inflight: 1,
                next: 0,
                counter: 3,
            },
        )],
    );

    t.start();
    // The repair is the first thing the ring's start does; then watch a while for a
    // write that must not come.
    if !wait_until(BOUND, || {
        t.inflight.desc(0, H2).inflight == 0 && t.inflight.header(0).used_idx == U
    }) {
        t.fail(&format!(
            "the last batch was not repaired within {BOUND:?} of the ring's start: desc {H2} \
             {:?}, header {:?} (want inflight 0, used_idx {U})",
            t.inflight.desc(0, H2),
            t.inflight.header(0)
        ));
    }
    std::thread::sleep(SETTLE);
    let now = t.disk_bytes(SECTOR * 512, 4096);
    if now != original {
        t.fail("the answered write was run again: the disk holds its data");
    }
    let used = t.ring.used_idx(&t.mem);
    if used != U {
        t.fail(&format!(
            "the used index moved from {U} to {used}: the answered write was answered again"
        ));
    }
    t.expect_call("the guest must look at its used ring once the ring runs");
    t.stop();
}
