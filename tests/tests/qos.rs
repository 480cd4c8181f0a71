//! QoS limits with the real binary and libblkio: a limit holds requests back
//! (wide bounds, never a speed assertion on the unthrottled path), `ctl qos`
//! changes and lifts it at run time, a group's limit covers the sum of its
//! exports, close-all is not slowed by requests waiting for tokens and loses
//! no acknowledged write, and bad values are refused with clear errors.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{
    assert_all_ok, path_str, pattern, rpc, run_to_exit, serve_file, Client, Daemon, Finished, Op,
    ServedFile, EXIT_TIMEOUT, MIB,
};

const BLOCK: usize = 4096;

fn ctl(control: &Path, args: &[&str]) -> Finished {
    let mut all = vec!["ctl", "--control", path_str(control)];
    all.extend_from_slice(args);
    run_to_exit(&all)
}

fn reads(n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| Op::Read {
            offset: (i % 1024 * BLOCK) as u64,
            len: BLOCK,
        })
        .collect()
}

/// How long `ops` take at `depth` on a fresh connection to `sock`.
fn timed(sock: &Path, depth: usize, ops: &[Op]) -> Duration {
    let mut client = Client::connect(sock, 1, depth).expect("connect");
    let started = Instant::now();
    let outs = client.run(0, ops).expect("run");
    let took = started.elapsed();
    assert_all_ok("requests", &outs);
    took
}

/// 400 reads at depth 8 under `--qos-iops 200` take about 2 s (at least 1.5);
/// lifted with `ctl qos --clear`, the same 400 take less than that.
#[test]
fn a_limit_holds_requests_back_and_clear_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:64M",
            "--vhost-user",
            path_str(&sock),
            "--qos-iops",
            "200",
            "--qos-burst",
            "0.05",
        ],
        1,
    );
    let limited = timed(&sock, 8, &reads(400));
    assert!(
        limited >= Duration::from_millis(1500),
        "400 reads at 200 IOPS took only {limited:?}"
    );
    let list = rpc(&daemon.control, "export_list", json!({})).unwrap();
    assert_eq!(
        list[0]["qos"],
        json!({"iops": 200, "burst_seconds": 0.05}),
        "{list}"
    );
    let out = ctl(&daemon.control, &["qos", "q", "--clear"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "no limits");
    let free = timed(&sock, 8, &reads(400));
    assert!(
        free < limited / 2,
        "without a limit 400 reads took {free:?} (limited: {limited:?})"
    );
    let list = rpc(&daemon.control, "export_list", json!({})).unwrap();
    assert!(list[0].get("qos").is_none(), "{list}");
}

/// A limit set while requests wait for tokens applies within a second: at
/// 5 IOPS, 300 reads would take a minute; raised to 100000 they finish at once.
#[test]
fn a_changed_limit_applies_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:64M",
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    // Set at run time, with the group's JSON-RPC method.
    let set = rpc(
        &daemon.control,
        "export_qos",
        json!({"export": "q", "qos": {"iops": 5, "burst_seconds": 0.001}}),
    )
    .unwrap();
    assert_eq!(set, json!({"iops": 5, "burst_seconds": 0.001}));
    let runner = thread::spawn({
        let sock = sock.clone();
        move || {
            let mut client = Client::connect(&sock, 1, 8).expect("connect");
            let mut q = client.queue(0);
            q.set_timeout(Duration::from_secs(60));
            let outs = q.run(&reads(300)).expect("run");
            assert_all_ok("reads", &outs);
            Instant::now()
        }
    });
    thread::sleep(Duration::from_millis(1500));
    let stats = rpc(&daemon.control, "export_stats", json!({"name": "q"})).unwrap();
    let done = stats["stats"]["requests"].as_u64().unwrap();
    // 5 per second (and the one the empty bucket lets through), with room
    // for a slow start.
    assert!(done <= 12, "{done} requests done in 1.5 s at 5 IOPS");
    let out = ctl(&daemon.control, &["qos", "q", "--iops", "100000"]);
    assert!(out.status.success(), "{}", out.stderr);
    let changed = Instant::now();
    let finished = runner.join().expect("runner");
    let after = finished.saturating_duration_since(changed);
    // Within a second by design (a throttled queue looks again every
    // 100 ms); the bound leaves room for a loaded machine.
    assert!(
        after < Duration::from_secs(3),
        "the raised limit took {after:?} to apply"
    );
}

/// Two exports in one group share its limit: 200 reads on each at once, at a
/// group limit of 200 IOPS, take about 2 s in all (at least 1.5 s), where each
/// alone would need 1. `export_list` names the group; `ctl qos --group` moves
/// a third export in, `--clear` lifts the group's limit for all of them.
#[test]
fn a_group_limits_the_sum_of_its_exports() {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from("[[disk]]\nname = \"d\"\npath = \"null:64M\"\n\n");
    for name in ["a", "b", "c"] {
        let group = if name == "c" {
            String::new()
        } else {
            "qos_group = \"tenant-a\"\n".into()
        };
        toml += &format!(
            "[[export]]\nname = \"{name}\"\ndisk = \"d\"\ntype = \"vhost-user\"\nsocket = \"{}\"\n{group}\n",
            path_str(&dir.path().join(format!("{name}.sock")))
        );
        if name == "a" {
            toml += "[export.qos]\niops = 200\nburst_seconds = 0.05\n\n";
        }
    }
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, toml).unwrap();
    let daemon = Daemon::spawn(&["serve", "--config", path_str(&config)], 3);
    let started = Instant::now();
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let sock = dir.path().join(format!("{name}.sock"));
            thread::spawn(move || timed(&sock, 8, &reads(200)))
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let both = started.elapsed();
    assert!(
        both >= Duration::from_millis(1500),
        "2 × 200 reads in a 200 IOPS group took only {both:?}"
    );
    let list = rpc(&daemon.control, "export_list", json!({})).unwrap();
    let qos_of = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["export"] == name)
            .unwrap()
            .get("qos")
            .cloned()
    };
    let group = json!({"iops": 200, "burst_seconds": 0.05, "group": "tenant-a"});
    assert_eq!(qos_of(&list, "a"), Some(group.clone()));
    assert_eq!(qos_of(&list, "b"), Some(group.clone()));
    assert_eq!(qos_of(&list, "c"), None);
    let out = ctl(
        &daemon.control,
        &["--json", "qos", "c", "--group", "tenant-a"],
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), group);
    let out = ctl(&daemon.control, &["qos", "b", "--clear"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "no limits (group tenant-a)");
    let stats = rpc(&daemon.control, "export_stats", json!({"name": "a"})).unwrap();
    assert_eq!(stats["qos"], json!({"group": "tenant-a"}), "{stats}");
}

/// SIGTERM while writes wait for tokens (256 bytes per second: one 4 KiB
/// write every 16 s): the daemon exits as promptly as without a limit (the
/// waiting writes fail, as a drain fails new requests; none waits out its
/// tokens), and every write acknowledged before is in the file.
#[test]
fn close_all_is_not_slowed_by_throttled_requests() {
    let dir = tempfile::tempdir().unwrap();
    let ServedFile {
        mut daemon,
        disk: img,
        sock,
    } = serve_file(
        dir.path(),
        16 * MIB,
        &["--qos-write-bps", "256", "--qos-burst", "16"],
    );
    let writes: Vec<Op> = (0..32)
        .map(|i| Op::Write {
            offset: (i * BLOCK) as u64,
            data: pattern((i * BLOCK) as u64, BLOCK, 7),
            fua: false,
        })
        .collect();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = thread::spawn({
        let (acked, writes) = (acked.clone(), writes.clone());
        move || {
            let mut client = Client::connect(&sock, 1, 8).expect("connect");
            let mut q = client.queue(0);
            q.set_timeout(Duration::from_secs(30));
            let _ = q.run_with(&writes, |i, out| {
                if out.ret == 0 {
                    acked.lock().unwrap().push(i);
                }
            });
        }
    });
    // The burst is through (a write that finds tokens passes whole, into
    // debt); the next waits 16 s or more for its tokens.
    thread::sleep(Duration::from_millis(1500));
    let before = acked.lock().unwrap().len();
    assert!(
        (1..=2).contains(&before),
        "{before} of 32 writes acknowledged at 256 B/s with a 4 KiB burst after 1.5 s"
    );
    let signalled = Instant::now();
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    let took = signalled.elapsed();
    daemon.assert_exit_ok(status);
    // A drain with a frontend connected waits for the guest to go quiet
    // (DETACH_QUIET_MS, at most DETACH_QUIET_LIMIT_MS = 5 s); the write
    // waiting for its tokens alone would need 16 s.
    assert!(took < Duration::from_secs(8), "close-all took {took:?}");
    writer.join().expect("writer");
    let data = std::fs::read(&img).unwrap();
    for &i in acked.lock().unwrap().iter() {
        let off = i * BLOCK;
        assert!(
            data[off..off + BLOCK] == pattern(off as u64, BLOCK, 7)[..],
            "acknowledged write {i} is not on disk"
        );
    }
}

/// Zero, negative and unparsable limits are refused with the option or key
/// and what to write instead, on the command line, in the config and by
/// `ctl qos`.
#[test]
fn bad_limits_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--disk",
            "null:64M",
            "--vhost-user",
            path_str(&sock),
        ];
        args.extend_from_slice(extra);
        run_to_exit(&args)
    };
    for (args, want) in [
        (
            &["--qos-iops", "0"][..],
            "sluice: --qos-iops: must be at least 1 request per second, not 0; leave it out for no limit",
        ),
        (
            &["--qos-write-iops", "-3"][..],
            "sluice: --qos-write-iops: must be at least 1 request per second, not -3",
        ),
        (
            &["--qos-bps", "fast"][..],
            "sluice: --qos-bps: invalid size \"fast\": expected a number",
        ),
        (
            &["--qos-read-bps", "0"][..],
            "sluice: --qos-read-bps: must be at least 1 byte per second, not 0",
        ),
        (
            &["--qos-iops", "10", "--qos-burst", "0"][..],
            "sluice: --qos-burst: must be 0.001..=3600 seconds, not 0",
        ),
    ] {
        let out = serve(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
        assert!(!sock.exists());
    }
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\nname = \"d\"\npath = \"null:1M\"\n[[export]]\nname = \"e\"\ndisk = \"d\"\n\
             type = \"vhost-user\"\nsocket = \"{}\"\n[export.qos]\nbps = \"-5M\"\n",
            path_str(&sock)
        ),
    )
    .unwrap();
    let out = run_to_exit(&["serve", "--config", path_str(&config)]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("export \"e\": qos.bps: invalid size \"-5M\": expected a number"),
        "{}",
        out.stderr
    );

    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:64M",
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    for (args, want) in [
        (
            &["qos", "q", "--iops", "0"][..],
            "qos.iops: must be at least 1 request per second, not 0",
        ),
        (
            &["qos", "nope", "--iops", "10"][..],
            "no export named \"nope\"",
        ),
        (
            &["qos", "q", "--group", "a/b"][..],
            "qos.group: \"a/b\" is not a group name",
        ),
        (
            &["qos", "q", "--bps", "1Q"][..],
            "qos.bps: invalid size \"1Q\": unknown suffix",
        ),
    ] {
        let out = ctl(&daemon.control, args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
    let err = rpc(
        &daemon.control,
        "export_qos",
        json!({"export": "q", "qos": {"iops": 5}, "clear": true}),
    )
    .unwrap_err();
    assert!(
        err["message"].as_str().unwrap().contains("not both"),
        "{err}"
    );
    // Nothing was set by the refusals.
    let out = ctl(&daemon.control, &["qos", "q"]);
    assert_eq!(out.stdout.trim(), "no limits");
}
