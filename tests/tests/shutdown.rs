//! SIGTERM during a write storm from libblkio clients on 2 exports × 2
//! queues: every write a client saw acknowledged before the signal is on
//! disk afterwards, each node is flushed after its export detached, the
//! daemon exits 0 and its sockets are gone.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_tests::{assert_gone, make_file, pattern, Client, Daemon, Op, EXIT_TIMEOUT, MIB};

const DISK_BYTES: u64 = 32 * MIB;
const BLOCK: usize = 4096;
const BLOCKS: u64 = DISK_BYTES / BLOCK as u64;
const QUEUES: u64 = 2;
const BATCH: u64 = 64;

/// Write number `k` of queue `q` goes to block `(k * QUEUES + q) % BLOCKS`
/// with seed `k * QUEUES + q`: the queues never share a block, and a later
/// write of a block has a larger seed.
fn block_and_seed(q: u64, k: u64) -> (u64, u64) {
    let seed = k * QUEUES + q;
    (seed % BLOCKS, seed)
}

struct Export {
    file: PathBuf,
    sock: PathBuf,
    /// Per block: the largest acknowledged seed.
    acked: Mutex<Vec<Option<u64>>>,
    /// Per queue: seeds submitted so far (upper bound for later writes).
    submitted: [AtomicUsize; QUEUES as usize],
}

fn storm(
    x: &Export,
    q: u64,
    h: &mut sluice_tests::QueueHandle<'_>,
    stop: &AtomicBool,
    acks: &AtomicUsize,
) {
    h.set_timeout(Duration::from_secs(5));
    let mut k = 0;
    // Bounded even if the signal never comes.
    while !stop.load(Ordering::SeqCst) && k < 64 * BLOCKS {
        let ops: Vec<Op> = (k..k + BATCH)
            .map(|k| {
                let (b, seed) = block_and_seed(q, k);
                let off = b * BLOCK as u64;
                Op::Write {
                    offset: off,
                    data: pattern(off, BLOCK, seed),
                    fua: false,
                }
            })
            .collect();
        x.submitted[q as usize].store(((k + BATCH) * QUEUES + q) as usize, Ordering::SeqCst);
        let mut failed = false;
        let r = h.run_with(&ops, |i, out| {
            failed |= out.ret != 0;
            if out.ret == 0 {
                let (b, seed) = block_and_seed(q, k + i as u64);
                let mut a = x.acked.lock().unwrap();
                let slot = &mut a[b as usize];
                *slot = Some(slot.map_or(seed, |old| old.max(seed)));
                acks.fetch_add(1, Ordering::SeqCst);
            }
        });
        // After the signal requests fail or time out: that ends the storm.
        if r.is_err() || failed {
            return;
        }
        k += BATCH;
    }
}

fn verify(name: &str, x: &Export) -> usize {
    let file = std::fs::read(&x.file).unwrap();
    let acked = x.acked.lock().unwrap();
    let max_seed = x
        .submitted
        .iter()
        .map(|s| s.load(Ordering::SeqCst) as u64)
        .max()
        .unwrap_or(0);
    let mut checked = 0;
    for (b, a) in acked.iter().enumerate() {
        let Some(seed) = *a else { continue };
        let off = b as u64 * BLOCK as u64;
        let got = &file[off as usize..off as usize + BLOCK];
        // The acknowledged write, or a later write of the same block (which
        // may have reached the disk without its acknowledgement arriving).
        let ok = (seed..=max_seed)
            .step_by(BLOCKS as usize)
            .any(|s| got == pattern(off, BLOCK, s).as_slice());
        assert!(
            ok,
            "export {name}: block {b}: acknowledged write (seed {seed}) is not on disk"
        );
        checked += 1;
    }
    checked
}

#[test]
fn sigterm_during_a_write_storm_on_two_exports_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let exports: Vec<Export> = ["a", "b"]
        .iter()
        .map(|n| {
            let file = dir.path().join(format!("{n}.img"));
            make_file(&file, DISK_BYTES);
            Export {
                file,
                sock: dir.path().join(format!("{n}.sock")),
                acked: Mutex::new(vec![None; BLOCKS as usize]),
                submitted: [AtomicUsize::new(0), AtomicUsize::new(0)],
            }
        })
        .collect();
    let config = dir.path().join("sluice.toml");
    let mut text = String::new();
    for (n, x) in ["a", "b"].iter().zip(&exports) {
        text += &format!(
            "[[disk]]\nname = \"{n}\"\npath = {:?}\n[[export]]\nname = \"{n}\"\ndisk = \"{n}\"\n\
             type = \"vhost-user\"\nsocket = {:?}\nqueues = 2\nqueue_depth = 32\n",
            x.file, x.sock
        );
    }
    std::fs::write(&config, text).unwrap();
    let mut daemon = Daemon::spawn(&["serve", "--config", config.to_str().unwrap()], 2);
    let mut clients: Vec<Client> = exports
        .iter()
        .map(|x| Client::connect(&x.sock, 2, 32).expect("connect"))
        .collect();
    let stop = AtomicBool::new(false);
    let acks = AtomicUsize::new(0);
    let status = std::thread::scope(|sc| {
        let mut workers = Vec::new();
        for (x, client) in exports.iter().zip(clients.iter_mut()) {
            for (q, mut h) in client.queues_mut().into_iter().enumerate() {
                let (stop, acks) = (&stop, &acks);
                workers.push(sc.spawn(move || storm(x, q as u64, &mut h, stop, acks)));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::SeqCst) < 2000 {
            if Instant::now() > deadline {
                stop.store(true, Ordering::SeqCst);
                daemon.kill();
                panic!(
                    "fewer than 2000 writes acknowledged in 60 s:\n{}",
                    daemon.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Mid-storm: all four queues have writes in flight.
        let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
        status
    });
    daemon.assert_exit_ok(status);
    for x in &exports {
        assert_gone(&x.sock);
    }
    drop(clients);
    let checked: Vec<usize> = exports
        .iter()
        .zip(["a", "b"])
        .map(|(x, n)| verify(n, x))
        .collect();
    eprintln!(
        "{} acknowledged writes; blocks checked per export: {checked:?}",
        acks.load(Ordering::SeqCst)
    );
    assert!(
        checked.iter().all(|&c| c >= 200),
        "too few blocks checked: {checked:?}"
    );

    // Each node was flushed after its export let go of it.
    let log = daemon.stderr();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the log:\n{log}"))
    };
    for n in ["a", "b"] {
        let detach = at(&format!("close-all: detach export {n}"));
        let flush = at(&format!("close-all: release node {n}: flushed and closed"));
        assert!(
            detach < flush,
            "node {n} flushed before its export detached:\n{log}"
        );
    }
    assert!(
        log.contains("all exports detached and nodes flushed"),
        "{log}"
    );
}
