//! The control socket ("monitor") seen from outside: JSON-RPC 2.0 over a UNIX socket, one
//! request per line, driven against the real daemon while libblkio clients do I/O on its
//! exports. Runtime node/export add and remove (safe with I/O in flight, forced, idle),
//! counters and latency percentiles, refusals with their error codes, malformed input,
//! many clients at once and clients that hang up mid-request, `sluice ctl`, and the
//! `shutdown` method's ordered close-all.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{
    assert_all_ok, assert_gone, first_difference, make_file, path_str, pattern, run_to_exit,
    Client, Daemon, Finished, Op, WriteStorm, EXIT_TIMEOUT, MIB,
};

const DISK_BYTES: u64 = 64 * MIB;
const BLOCK: usize = 4096;
/// Bound on one monitor call: a safe export removal may wait for the drain and the
/// detach, each bounded by the daemon's 10 s `DRAIN_TIMEOUT_MS`.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for a state change the test caused (a request whose sender hung up).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const FAILED: i64 = -32000;
const NOT_FOUND: i64 = -32001;
const CONFLICT: i64 = -32002;

/// The daemon's `MAX_CONTROL_CLIENTS`.
const MAX_CONTROL_CLIENTS: usize = 16;

// ---------------------------------------------------------------------------------------
// A JSON-RPC client with bounded waits
// ---------------------------------------------------------------------------------------

/// A JSON-RPC error as the daemon sent it.
#[derive(Debug, Clone)]
struct RpcErr {
    code: i64,
    message: String,
}

/// One monitor connection. Every read is bounded by [`RPC_TIMEOUT`].
struct Rpc {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Rpc {
    fn try_connect(path: &Path) -> std::io::Result<Rpc> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(RPC_TIMEOUT))?;
        stream.set_write_timeout(Some(RPC_TIMEOUT))?;
        Ok(Rpc {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    fn connect(path: &Path) -> Rpc {
        Self::try_connect(path)
            .unwrap_or_else(|e| panic!("connecting to control socket {}: {e}", path.display()))
    }

    fn set_read_timeout(&self, t: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(t))
            .expect("set_read_timeout");
    }

    /// Sends raw bytes (a line must end with `\n` to be a request).
    fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// The next line: `Ok(None)` on EOF, `Err` on a timeout or a reset.
    fn read_line(&mut self) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        Ok((n > 0).then_some(line))
    }

    /// The next reply, parsed.
    ///
    /// # Panics
    /// On EOF, timeout or a line that is not JSON.
    fn reply(&mut self) -> Value {
        match self.read_line() {
            Ok(Some(line)) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}")),
            Ok(None) => panic!("the monitor closed the connection instead of replying"),
            Err(e) => panic!("no reply from the monitor: {e}"),
        }
    }

    /// Sends `line` and returns the reply.
    fn raw(&mut self, line: &str) -> Value {
        self.send_raw(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending {line:?}: {e}"));
        self.reply()
    }

    /// Sends a request without waiting for the reply; returns its id.
    fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_raw(format!("{req}\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        id
    }

    /// Calls `method` and returns its result or error, checking the reply's shape.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, RpcErr> {
        let id = self.send(method, params);
        let reply = self.reply();
        assert_eq!(reply["jsonrpc"], "2.0", "{method}: reply {reply}");
        assert_eq!(
            reply["id"], id,
            "{method}: reply to another request: {reply}"
        );
        if let Some(err) = reply.get("error") {
            assert!(
                reply.get("result").is_none(),
                "{method}: reply with result and error: {reply}"
            );
            return Err(RpcErr {
                code: err["code"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{method}: error without code: {reply}")),
                message: err["message"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method}: error without message: {reply}"))
                    .to_owned(),
            });
        }
        Ok(reply
            .get("result")
            .cloned()
            .unwrap_or_else(|| panic!("{method}: reply without result or error: {reply}")))
    }

    /// Calls `method`, which must succeed.
    fn ok(&mut self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {} ({})", e.message, e.code))
    }

    /// Calls `method`, which must fail with `code`; returns the message.
    fn err(&mut self, method: &str, params: Value, code: i64) -> String {
        match self.call(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded ({v}); expected error {code}"),
            Err(e) => {
                assert_eq!(
                    e.code, code,
                    "{method} {params}: error {} ({:?}), expected {code}",
                    e.code, e.message
                );
                e.message
            }
        }
    }
}

/// The error object of a raw reply: (code, message), asserting `id`.
fn error_of(reply: &Value, id: &Value) -> (i64, String) {
    assert_eq!(reply["jsonrpc"], "2.0", "reply {reply}");
    assert_eq!(&reply["id"], id, "reply {reply}");
    assert!(reply.get("result").is_none(), "expected an error: {reply}");
    let code = reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code: {reply}"));
    let msg = reply["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {reply}"))
        .to_owned();
    (code, msg)
}

// ---------------------------------------------------------------------------------------
// Daemon set-up and views of its state
// ---------------------------------------------------------------------------------------

/// A tempdir with a 64 MiB file `base.img`, served as export `base` (node `disk0`) over
/// `base.sock` with 2 queues of depth 32, and the monitor on the harness's control socket.
struct Env {
    dir: tempfile::TempDir,
    daemon: Daemon,
    base_img: PathBuf,
    base_sock: PathBuf,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let base_img = dir.path().join("base.img");
        make_file(&base_img, DISK_BYTES);
        let base_sock = dir.path().join("base.sock");
        let daemon = Daemon::spawn(
            &[
                "serve",
                "--disk",
                path_str(&base_img),
                "--vhost-user",
                path_str(&base_sock),
                "--queues",
                "2",
                "--queue-depth",
                "32",
            ],
            1,
        );
        assert_eq!(daemon.ready[0]["export"], "base", "{}", daemon.ready[0]);
        wait_control_ready(&daemon);
        Env {
            dir,
            daemon,
            base_img,
            base_sock,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rpc(&self) -> Rpc {
        Rpc::connect(&self.daemon.control)
    }

    /// SIGTERM, exit 0, every socket gone.
    fn stop(mut self, sockets: &[&Path]) {
        let status = self.daemon.sigterm_and_wait(EXIT_TIMEOUT);
        self.daemon.assert_exit_ok(status);
        assert_gone(&self.base_sock);
        assert_gone(&self.daemon.control);
        for s in sockets {
            assert_gone(s);
        }
    }
}

/// Waits for the `{"event":"ready","control":PATH}` line that follows the export lines.
fn wait_control_ready(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for line in daemon.stdout_lines() {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("non-JSON stdout line ({e}): {line:?}"));
            if v["event"] == "ready" && v.get("control").is_some() {
                assert_eq!(v["control"], path_str(&daemon.control), "{v}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no control ready line within 10 s\n--- stderr ---\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// node name → holders as (kind, name) strings, e.g. `["monitor", "export base"]`.
fn nodes(rpc: &mut Rpc) -> Vec<(String, Vec<String>)> {
    let list = rpc.ok("node_list", json!({}));
    list.as_array()
        .unwrap_or_else(|| panic!("node_list is not an array: {list}"))
        .iter()
        .map(|n| {
            let holders = n["holders"]
                .as_array()
                .unwrap_or_else(|| panic!("holders is not an array: {n}"))
                .iter()
                .map(|h| match (h["kind"].as_str(), h.get("name")) {
                    (Some("monitor"), None) => "monitor".to_owned(),
                    (Some(kind), Some(Value::String(name))) => format!("{kind} {name}"),
                    _ => panic!("holder of unexpected shape: {h}"),
                })
                .collect();
            (n["name"].as_str().expect("node name").to_owned(), holders)
        })
        .collect()
}

fn holders_of(rpc: &mut Rpc, node: &str) -> Option<Vec<String>> {
    nodes(rpc)
        .into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, h)| h)
}

/// export name → the export_list entry.
fn exports(rpc: &mut Rpc) -> Vec<(String, Value)> {
    let list = rpc.ok("export_list", json!({}));
    list.as_array()
        .unwrap_or_else(|| panic!("export_list is not an array: {list}"))
        .iter()
        .map(|x| {
            (
                x["export"].as_str().expect("export name").to_owned(),
                x.clone(),
            )
        })
        .collect()
}

fn export_names(rpc: &mut Rpc) -> Vec<String> {
    exports(rpc).into_iter().map(|(n, _)| n).collect()
}

fn vhost_export(name: &str, node: &str, sock: &Path) -> Value {
    json!({
        "name": name,
        "node": node,
        "type": "vhost-user",
        "socket": path_str(sock),
        "queues": 2,
        "queue_depth": 32,
    })
}

/// Polls `cond` every 10 ms until it holds, for at most `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// I/O helpers
// ---------------------------------------------------------------------------------------

fn connect(sock: &Path) -> Client {
    Client::connect(sock, 2, 32).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()))
}

/// Blocks 0..128 of the round trip; queue q writes the blocks ≡ q mod 2.
const ROUNDTRIP_BLOCKS: u64 = 128;
/// The writers that run during removal use the blocks from here on.
const WRITER_FIRST_BLOCK: u64 = 256;

/// Writes [`ROUNDTRIP_BLOCKS`] blocks with `seed` through both queues, flushes, and reads
/// them back crosswise (each queue reads the other's). A null node reads back zeroes.
/// Returns the number of requests completed.
fn roundtrip(client: &mut Client, seed: u64, null: bool) -> u64 {
    let offs = |q: u64| -> Vec<u64> {
        (0..ROUNDTRIP_BLOCKS)
            .filter(|b| b % 2 == q)
            .map(|b| b * BLOCK as u64)
            .collect()
    };
    for q in 0..2u64 {
        let ops: Vec<Op> = offs(q)
            .into_iter()
            .map(|offset| Op::Write {
                offset,
                data: pattern(offset, BLOCK, seed),
                fua: false,
            })
            .chain([Op::Flush])
            .collect();
        let outs = client
            .run(q as usize, &ops)
            .unwrap_or_else(|e| panic!("writes on queue {q}: {e}"));
        assert_all_ok(&format!("writes on queue {q}"), &outs);
    }
    for q in 0..2u64 {
        let other = offs(1 - q);
        let ops: Vec<Op> = other
            .iter()
            .map(|&offset| Op::Read { offset, len: BLOCK })
            .collect();
        let outs = client
            .run(q as usize, &ops)
            .unwrap_or_else(|e| panic!("reads on queue {q}: {e}"));
        assert_all_ok(&format!("reads on queue {q}"), &outs);
        for (&off, out) in other.iter().zip(&outs) {
            let want = if null {
                vec![0u8; BLOCK]
            } else {
                pattern(off, BLOCK, seed)
            };
            if let Some(d) = first_difference("read back", off, &out.data, &want) {
                panic!("{d}");
            }
        }
    }
    2 * (ROUNDTRIP_BLOCKS + 1)
}

fn check_roundtrip_in_file(file: &[u8], seed: u64, what: &str) {
    for b in 0..ROUNDTRIP_BLOCKS {
        let off = b * BLOCK as u64;
        let got = &file[off as usize..off as usize + BLOCK];
        if let Some(d) = first_difference(what, off, got, &pattern(off, BLOCK, seed)) {
            panic!("{d}");
        }
    }
}

/// A [`WriteStorm`] over the disk from block [`WRITER_FIRST_BLOCK`] on, seeded by `seed`.
fn writer_storm(seed: u64) -> WriteStorm {
    let blocks = DISK_BYTES / BLOCK as u64 - WRITER_FIRST_BLOCK;
    WriteStorm::new(WRITER_FIRST_BLOCK, blocks, 64, 400_000, seed)
}

/// Waits until `n` of `log`'s writes are acknowledged (and the writer still runs).
fn wait_acked(log: &WriteStorm, n: usize, daemon: &Daemon) {
    if let Err(f) = log.wait_acked(n, Duration::from_secs(30)) {
        panic!("{f}\n--- stderr ---\n{}", daemon.stderr());
    }
}

/// After the removal (marked with [`WriteStorm::mark_gone`]): the writer must stop by
/// itself (its requests fail or time out) within `timeout`; no write started after the
/// removal may have succeeded.
fn wait_stopped_by_removal(log: &WriteStorm, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !log.is_done() {
        if Instant::now() >= deadline {
            log.stop();
            panic!(
                "the writer kept going {timeout:?} after its export was removed \
                 ({} acknowledged)",
                log.acked_count()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = log.succeeded_after_gone();
    assert_eq!(
        after,
        0,
        "{after} write(s) submitted after the export's removal succeeded (writer ended: {})",
        log.end()
    );
}

/// One more write on `q` after the export's removal: must fail or time out.
fn assert_request_fails(client: &mut Client, q: usize, what: &str) {
    let mut h = client.queue(q);
    h.set_timeout(Duration::from_secs(3));
    let offset = WRITER_FIRST_BLOCK * BLOCK as u64;
    match h.run(&[Op::Write {
        offset,
        data: vec![0x5A; BLOCK],
        fua: false,
    }]) {
        Err(_) => {}
        Ok(outs) => assert_ne!(outs[0].ret, 0, "{what}: a write after removal succeeded"),
    }
}

/// Removes export `name` (with `mode`) while a writer keeps queue 0 of `client` busy.
/// Returns the removal's result and the writer's log after it stopped.
fn remove_while_writing(
    env: &Env,
    client: &mut Client,
    name: &str,
    mode: &str,
    sock: &Path,
    seed: u64,
) -> (Value, WriteStorm) {
    let log = writer_storm(seed);
    let mut rpc = env.rpc();
    let result = std::thread::scope(|s| {
        let h = client.queue(0);
        let log = &log;
        s.spawn(move || log.run(h));
        wait_acked(log, 200, &env.daemon);
        let t0 = Instant::now();
        let result = rpc.call("export_remove", json!({"name": name, "mode": mode}));
        let took = t0.elapsed();
        log.mark_gone();
        let result = match result {
            Ok(v) => v,
            Err(e) => {
                log.stop();
                panic!(
                    "export_remove {name} ({mode}) with I/O in flight: {} ({})\n--- stderr ---\n{}",
                    e.message,
                    e.code,
                    env.daemon.stderr()
                );
            }
        };
        eprintln!(
            "export_remove {name} ({mode}) with I/O in flight took {took:?}; writer had {} acked",
            log.acked_count()
        );
        // The socket is gone when the removal returns.
        if sock.exists() {
            log.stop();
            panic!(
                "{} still exists after export_remove {name} returned",
                sock.display()
            );
        }
        wait_stopped_by_removal(log, SETTLE_TIMEOUT);
        result
    });
    eprintln!("writer on {name} ended with: {}", log.end());
    assert_eq!(result["removed"], name, "export_remove result {result}");
    assert!(
        result["stats"]["requests"].as_u64().unwrap_or(0) >= 200,
        "export_remove stats: {result}"
    );
    if mode == "safe" {
        // Forced removal takes its totals before the in-flight requests are failed.
        assert_eq!(
            result["stats"]["in_flight"], 0,
            "export_remove stats: {result}"
        );
    }
    assert_request_fails(client, 1, name);
    (result, log)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Test 1: three nodes (a file, a file the daemon creates, a null disk) and three
/// vhost-user exports added at runtime next to the one from the command line; each serves
/// a client; export_list and export_stats report them; one is removed safely while its
/// client writes, one forcibly while its client writes, one safely while idle. The nodes
/// stay, held by the monitor only, until node_remove; the data written through the removed
/// exports is in the files.
#[test]
fn runtime_add_and_remove_of_three_exports() {
    let env = Env::start();
    let mut rpc = env.rpc();
    let (a_img, b_img) = (env.path("a.img"), env.path("b.img"));
    make_file(&a_img, DISK_BYTES);
    let (a_sock, b_sock, z_sock) = (env.path("a.sock"), env.path("b.sock"), env.path("z.sock"));

    // Nodes.
    let na = rpc.ok("node_add", json!({"name": "na", "path": path_str(&a_img)}));
    assert_eq!(na["name"], "na", "{na}");
    assert_eq!(na["capacity_bytes"], DISK_BYTES, "{na}");
    assert_eq!(na["read_only"], false, "{na}");
    let nb = rpc.ok(
        "node_add",
        json!({"name": "nb", "path": path_str(&b_img), "create_size": "64M"}),
    );
    assert_eq!(nb["capacity_bytes"], DISK_BYTES, "{nb}");
    assert_eq!(
        std::fs::metadata(&b_img).map(|m| m.len()).ok(),
        Some(DISK_BYTES),
        "node_add with create_size made no 64 MiB image"
    );
    let nz = rpc.ok("node_add", json!({"name": "nz", "path": "null:64M"}));
    assert_eq!(nz["capacity_bytes"], DISK_BYTES, "{nz}");
    for n in ["na", "nb", "nz"] {
        assert_eq!(
            holders_of(&mut rpc, n),
            Some(vec!["monitor".to_owned()]),
            "node {n}"
        );
    }

    // Exports.
    for (x, n, sock) in [
        ("xa", "na", &a_sock),
        ("xb", "nb", &b_sock),
        ("xz", "nz", &z_sock),
    ] {
        let d = rpc.ok("export_add", vhost_export(x, n, sock));
        assert_eq!(d["export"], x, "{d}");
        assert_eq!(d["type"], "vhost-user", "{d}");
        assert_eq!(d["socket"], path_str(sock), "{d}");
        assert_eq!(d["queues"], 2, "{d}");
        assert_eq!(d["queue_depth"], 32, "{d}");
        assert_eq!(d["capacity_bytes"], DISK_BYTES, "{d}");
        assert!(sock.exists(), "{} missing after export_add", sock.display());
        assert_eq!(
            holders_of(&mut rpc, n),
            Some(vec!["monitor".to_owned(), format!("export {x}")]),
            "node {n}"
        );
    }

    // Each serves a client.
    let (seed_a, seed_b, seed_z) = (0xA11CE, 0xB0B, 0x2E20);
    let mut ca = connect(&a_sock);
    let mut cb = connect(&b_sock);
    let mut cz = connect(&z_sock);
    assert_eq!(ca.capacity, DISK_BYTES);
    let ops_a = roundtrip(&mut ca, seed_a, false);
    roundtrip(&mut cb, seed_b, false);
    roundtrip(&mut cz, seed_z, true);

    // export_list: all four with their nodes.
    let list = exports(&mut rpc);
    let mut seen: Vec<(String, String)> = list
        .iter()
        .map(|(n, x)| {
            assert_eq!(x["type"], "vhost-user", "{x}");
            assert!(x["stats"]["requests"].is_u64(), "{x}");
            (n.clone(), x["node"].as_str().expect("node").to_owned())
        })
        .collect();
    seen.sort();
    let want: Vec<(String, String)> = [("base", "disk0"), ("xa", "na"), ("xb", "nb"), ("xz", "nz")]
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(seen, want, "export_list: {list:?}");
    let xa = &list.iter().find(|(n, _)| n == "xa").expect("xa").1;
    assert_eq!(xa["socket"], path_str(&a_sock), "{xa}");

    // export_stats of xa: counters and latency percentiles. Counters are updated as
    // requests complete; wait (bounded) until all of them are counted.
    let mut stats = Value::Null;
    wait_until(
        "export_stats counts the round trip",
        Duration::from_secs(5),
        || {
            stats = rpc.ok("export_stats", json!({"name": "xa"}));
            stats["stats"]["requests"].as_u64().unwrap_or(0) >= ops_a
        },
    );
    eprintln!("export_stats xa: {stats}");
    assert_eq!(stats["name"], "xa", "{stats}");
    assert_eq!(stats["node"], "na", "{stats}");
    let st = &stats["stats"];
    let bytes = ROUNDTRIP_BLOCKS * BLOCK as u64;
    assert_eq!(st["requests"], ops_a, "{stats}");
    assert_eq!(st["errors"], 0, "{stats}");
    assert_eq!(st["bytes_written"], bytes, "{stats}");
    assert_eq!(st["bytes_read"], bytes, "{stats}");
    assert_eq!(st["flushes"], 2, "{stats}");
    assert_eq!(st["in_flight"], 0, "{stats}");
    let lat = &stats["latency"];
    let (p50, p99, p999) = (
        lat["p50_us"].as_f64().expect("p50_us"),
        lat["p99_us"].as_f64().expect("p99_us"),
        lat["p999_us"].as_f64().expect("p999_us"),
    );
    assert!(lat["samples"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "latency {lat}");
    assert!(p999.is_finite() && p999 < 10_000_000.0, "latency {lat}");
    // An export nobody used has no samples.
    let base = rpc.ok("export_stats", json!({"name": "base"}));
    assert_eq!(base["stats"]["requests"], 0, "{base}");
    assert_eq!(base["latency"]["samples"], 0, "{base}");

    // xa: safe removal while its client writes.
    let (_, log_a) = remove_while_writing(&env, &mut ca, "xa", "safe", &a_sock, 0xAAAA);
    // xb: forced removal while its client writes.
    let (_, log_b) = remove_while_writing(&env, &mut cb, "xb", "force", &b_sock, 0xBBBB);
    // xz: safe removal, idle.
    let t0 = Instant::now();
    let r = rpc.ok("export_remove", json!({"name": "xz", "mode": "safe"}));
    eprintln!("export_remove xz (idle) took {:?}: {r}", t0.elapsed());
    assert_eq!(r["removed"], "xz", "{r}");
    assert_gone(&z_sock);
    assert_request_fails(&mut cz, 0, "xz");
    assert_eq!(export_names(&mut rpc), vec!["base".to_owned()]);

    // The nodes stay, held by the monitor only.
    for n in ["na", "nb", "nz"] {
        assert_eq!(
            holders_of(&mut rpc, n),
            Some(vec!["monitor".to_owned()]),
            "node {n}"
        );
    }
    for n in ["na", "nb", "nz"] {
        assert_eq!(
            rpc.ok("node_remove", json!({"name": n})),
            json!({"removed": n})
        );
    }
    let left = nodes(&mut rpc);
    assert_eq!(
        left,
        vec![(
            "disk0".to_owned(),
            vec!["monitor".to_owned(), "export base".to_owned()]
        )],
        "node_list after node_remove"
    );
    drop((ca, cb, cz));

    // The data written through the removed exports is in the files.
    let fa = std::fs::read(&a_img).expect("read a.img");
    let fb = std::fs::read(&b_img).expect("read b.img");
    check_roundtrip_in_file(&fa, seed_a, "a.img round trip");
    check_roundtrip_in_file(&fb, seed_b, "b.img round trip");
    let checked_a = log_a.check_file(&fa, "a.img");
    let checked_b = log_b.check_file(&fb, "b.img");
    assert!(
        checked_a >= 200 && checked_b >= 200,
        "{checked_a} / {checked_b} blocks checked"
    );

    // The command-line export still serves.
    let mut c = connect(&env.base_sock);
    roundtrip(&mut c, 0xBA5E, false);
    drop(c);
    env.stop(&[&a_sock, &b_sock, &z_sock]);
}

/// Test 2: refusals carry the right code and name what is in the way, and change nothing.
#[test]
fn refusals_name_the_conflict_and_change_nothing() {
    let env = Env::start();
    let mut rpc = env.rpc();
    let before_nodes = nodes(&mut rpc);

    // node_remove of a node an export serves.
    let msg = rpc.err("node_remove", json!({"name": "disk0"}), CONFLICT);
    assert!(msg.contains("in use by export base"), "message {msg:?}");
    // export_add on an unknown node.
    let sock = env.path("x.sock");
    let msg = rpc.err("export_add", vhost_export("x", "nope", &sock), NOT_FOUND);
    assert!(msg.contains("nope"), "message {msg:?}");
    assert!(
        !sock.exists(),
        "a refused export_add left {}",
        sock.display()
    );
    // export_add with a taken name.
    let msg = rpc.err("export_add", vhost_export("base", "disk0", &sock), CONFLICT);
    assert!(msg.contains("base"), "message {msg:?}");
    assert!(
        !sock.exists(),
        "a refused export_add left {}",
        sock.display()
    );
    // node_add with a taken name.
    let msg = rpc.err(
        "node_add",
        json!({"name": "disk0", "path": "null:1M"}),
        CONFLICT,
    );
    assert!(msg.contains("disk0"), "message {msg:?}");
    // export_remove / node_remove / export_stats of unknown names.
    let msg = rpc.err(
        "export_remove",
        json!({"name": "nope", "mode": "safe"}),
        NOT_FOUND,
    );
    assert!(msg.contains("nope"), "message {msg:?}");
    rpc.err(
        "export_remove",
        json!({"name": "nope", "mode": "force"}),
        NOT_FOUND,
    );
    rpc.err("node_remove", json!({"name": "nope"}), NOT_FOUND);
    rpc.err("export_stats", json!({"name": "nope"}), NOT_FOUND);
    // An export on a socket another export serves is a conflict naming that export,
    // and gives its node back.
    let msg = rpc.err(
        "export_add",
        vhost_export("x2", "disk0", &env.base_sock),
        CONFLICT,
    );
    assert!(msg.contains("export base's socket"), "message {msg:?}");
    // A node on a missing file fails.
    let missing = env.path("missing.img");
    rpc.err(
        "node_add",
        json!({"name": "m", "path": path_str(&missing)}),
        FAILED,
    );
    assert!(!missing.exists());

    // Nothing changed.
    assert_eq!(
        nodes(&mut rpc),
        before_nodes,
        "node_list after the refusals"
    );
    assert_eq!(export_names(&mut rpc), vec!["base".to_owned()]);
    let mut c = connect(&env.base_sock);
    roundtrip(&mut c, 7, false);
    drop(c);
    env.stop(&[&sock]);
}

/// Test 3: malformed requests get the JSON-RPC error they deserve and the daemon keeps
/// serving: the same connection answers the next request, a new connection works, and
/// the vhost-user export still serves I/O.
#[test]
fn bad_requests_keep_the_daemon_serving() {
    let env = Env::start();
    let mut rpc = env.rpc();
    let null = Value::Null;

    let (code, msg) = error_of(&rpc.raw("{not json"), &null);
    assert_eq!(code, PARSE_ERROR, "{msg}");
    let (code, msg) = error_of(&rpc.raw(r#"{"jsonrpc":"2.0","id":1,"method":"#), &null);
    assert_eq!(code, PARSE_ERROR, "{msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"[{"jsonrpc":"2.0","id":1,"method":"node_list"}]"#),
        &null,
    );
    assert_eq!(code, INVALID_REQUEST, "batch: {msg}");
    let (code, _) = error_of(&rpc.raw("42"), &null);
    assert_eq!(code, INVALID_REQUEST, "a number");
    let (code, msg) = error_of(&rpc.raw(r#"{"id":2,"method":"node_list"}"#), &json!(2));
    assert_eq!(code, INVALID_REQUEST, "no jsonrpc: {msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"{"jsonrpc":"1.0","id":3,"method":"node_list"}"#),
        &json!(3),
    );
    assert_eq!(code, INVALID_REQUEST, "jsonrpc 1.0: {msg}");
    let (code, msg) = error_of(&rpc.raw(r#"{"jsonrpc":"2.0","id":4}"#), &json!(4));
    assert_eq!(code, INVALID_REQUEST, "no method: {msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"{"jsonrpc":"2.0","id":5,"method":17}"#),
        &json!(5),
    );
    assert_eq!(code, INVALID_REQUEST, "method not a string: {msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"{"jsonrpc":"2.0","id":"six","method":"no_such_method"}"#),
        &json!("six"),
    );
    assert_eq!(code, METHOD_NOT_FOUND, "{msg}");
    assert!(msg.contains("no_such_method"), "{msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"{"jsonrpc":"2.0","id":7,"method":"node_list","params":"x"}"#),
        &json!(7),
    );
    assert_eq!(code, INVALID_REQUEST, "params a string: {msg}");
    let (code, msg) = error_of(
        &rpc.raw(r#"{"jsonrpc":"2.0","id":8,"method":"node_remove","params":["disk0"]}"#),
        &json!(8),
    );
    eprintln!("params as an array: error {code} ({msg})");
    assert!(
        code == INVALID_REQUEST || code == INVALID_PARAMS,
        "params as an array: {code} {msg}"
    );
    assert_eq!(holders_of(&mut rpc, "disk0").map(|h| h.len()), Some(2));

    // Parameters of the wrong type, unknown fields, missing fields, bad values: -32602.
    let sock = env.path("x.sock");
    for (method, params) in [
        ("node_remove", json!({"name": 5})),
        ("node_remove", json!({})),
        ("node_list", json!({"verbose": true})),
        ("export_list", json!({"all": 1})),
        (
            "node_add",
            json!({"name": "n", "path": "null:1M", "colour": "red"}),
        ),
        ("node_add", json!({"name": "n"})),
        (
            "node_add",
            json!({"name": "n", "path": "null:1M", "read_only": "yes"}),
        ),
        ("node_add", json!({"name": "n", "path": "null:100"})),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "nbd", "socket": path_str(&sock)}),
        ),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "vhost-user"}),
        ),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "vhost-user", "socket": path_str(&sock), "queues": "two"}),
        ),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "vhost-user", "socket": path_str(&sock), "queues": -1}),
        ),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "vhost-user", "socket": path_str(&sock), "queues": 0}),
        ),
        (
            "export_add",
            json!({"name": "x", "node": "disk0", "type": "vhost-user", "socket": path_str(&sock), "queue_depth": 100000}),
        ),
        ("export_remove", json!({"name": "base", "mode": "gentle"})),
        ("export_remove", json!({"name": "base", "force": true})),
        ("export_stats", json!({"name": ["base"]})),
        ("shutdown", json!({"now": true})),
    ] {
        let msg = rpc.err(method, params.clone(), INVALID_PARAMS);
        assert!(!msg.is_empty(), "{method} {params}");
    }
    assert!(
        !sock.exists(),
        "a refused export_add left {}",
        sock.display()
    );

    // Notifications get no reply; the next request on the same connection answers.
    rpc.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"node_list\"}\n")
        .expect("send");
    rpc.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"no_such_method\"}\n")
        .expect("send");
    rpc.send_raw(
        b"{\"jsonrpc\":\"2.0\",\"method\":\"node_add\",\"params\":{\"name\":\"quiet\",\"path\":\"null:1M\"}}\n",
    )
    .expect("send");
    rpc.send_raw(b"\n   \n").expect("send");
    let reply = rpc.raw(r#"{"jsonrpc":"2.0","id":42,"method":"node_list"}"#);
    assert_eq!(
        reply["id"], 42,
        "the first reply after notifications: {reply}"
    );
    let names: Vec<&str> = reply["result"]
        .as_array()
        .expect("node list")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(
        names.contains(&"quiet"),
        "the notified node_add did not run: {reply}"
    );
    rpc.ok("node_remove", json!({"name": "quiet"}));

    // A request line over 64 KiB: an error, then the connection may close.
    {
        let mut big = Rpc::connect(&env.daemon.control);
        let pad = "x".repeat(80 * 1024);
        let line = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"node_list\",\"params\":{{\"pad\":\"{pad}\"}}}}\n"
        );
        big.send_raw(line.as_bytes()).expect("send a long line");
        big.set_read_timeout(Duration::from_secs(20));
        match big.read_line() {
            Ok(Some(l)) => {
                let v: Value = serde_json::from_str(&l).expect("reply is JSON");
                let (code, msg) = error_of(&v, &Value::Null);
                assert_eq!(code, INVALID_REQUEST, "{msg}");
                assert!(msg.contains("65536"), "{msg}");
            }
            other => panic!("no error reply to a request over 64 KiB: {other:?}"),
        }
        // Either the connection closed or it still answers; neither may hang.
        let after = big
            .send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"node_list\"}\n")
            .and_then(|()| big.read_line());
        eprintln!("after the long line: {after:?}");
        assert!(
            !matches!(&after, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
            "the connection hung after a long line"
        );
    }

    // Bytes that are not UTF-8: an error reply or a closed connection, not a hang.
    {
        let mut bin = Rpc::connect(&env.daemon.control);
        bin.set_read_timeout(Duration::from_secs(20));
        bin.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\xfe\"}\n")
            .expect("send");
        let got = bin.read_line();
        eprintln!("after invalid UTF-8: {got:?}");
        match got {
            Ok(Some(l)) => {
                let v: Value = serde_json::from_str(&l).expect("reply is JSON");
                assert!(v.get("error").is_some(), "{v}");
            }
            Ok(None) => {}
            Err(e) => assert!(
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut,
                "no answer and no close after invalid UTF-8"
            ),
        }
    }

    // A client that sends half a request and hangs up.
    {
        let mut half = Rpc::connect(&env.daemon.control);
        half.send_raw(br#"{"jsonrpc":"2.0","id":1,"meth"#)
            .expect("send");
    }

    // The first connection still answers, a new one works, the export serves.
    assert_eq!(holders_of(&mut rpc, "disk0").map(|h| h.len()), Some(2));
    let mut fresh = env.rpc();
    let list = nodes(&mut fresh);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].0, "disk0");
    let methods = fresh.ok("rpc_methods", json!({}));
    let names: Vec<&str> = methods
        .as_array()
        .expect("rpc_methods is an array")
        .iter()
        .map(|m| m["method"].as_str().expect("method name"))
        .collect();
    for m in [
        "node_add",
        "node_remove",
        "node_list",
        "export_add",
        "export_remove",
        "export_list",
        "export_stats",
        "rpc_methods",
        "shutdown",
    ] {
        assert!(names.contains(&m), "rpc_methods lacks {m}: {methods}");
    }
    let mut c = connect(&env.base_sock);
    roundtrip(&mut c, 3, false);
    drop(c);
    env.stop(&[&sock]);
}

/// Test 4: eight clients at once, 50 calls each, all answered; a connection beyond
/// `MAX_CONTROL_CLIENTS` is served and the one idle longest is closed with a line that says
/// why; clients that hang up before reading their answer (export_add; export_remove of an
/// export with I/O in flight) harm nothing: the operation completes and the daemon serves on.
#[test]
fn many_clients_and_clients_that_hang_up() {
    let env = Env::start();
    let control = env.daemon.control.clone();
    // An idle connection stays open throughout and must not get in anybody's way.
    let mut idle = env.rpc();

    std::thread::scope(|s| {
        let joins: Vec<_> = (0..8)
            .map(|t| {
                let control = &control;
                s.spawn(move || {
                    let mut rpc = Rpc::connect(control);
                    for i in 0..50 {
                        if (i + t) % 2 == 0 {
                            let n = nodes(&mut rpc);
                            assert_eq!(n.len(), 1, "thread {t} call {i}: {n:?}");
                            assert_eq!(n[0].0, "disk0");
                        } else {
                            let x = export_names(&mut rpc);
                            assert_eq!(x, vec!["base".to_owned()], "thread {t} call {i}");
                        }
                    }
                })
            })
            .collect();
        for j in joins {
            j.join().expect("client thread");
        }
    });

    // `idle` has waited longest so far; a call makes it the most recent.
    assert_eq!(export_names(&mut idle), vec!["base".to_owned()]);
    // MAX_CONTROL_CLIENTS connections are served (`idle` and the held ones). One more is
    // served too: the connection idle longest is closed to make room, with a line that
    // says why. That is the first held one, not `idle`, which has just been used.
    let mut held: Vec<Rpc> = (0..MAX_CONTROL_CLIENTS - 1)
        .map(|i| served(&control).unwrap_or_else(|| panic!("held connection {i} not served")))
        .collect();
    assert_eq!(export_names(&mut idle), vec!["base".to_owned()]);
    let extra = served(&control).expect("a connection beyond the limit was not served");
    held[0].set_read_timeout(Duration::from_secs(10));
    let line = held[0]
        .read_line()
        .expect("the connection idle longest was not closed")
        .expect("the connection idle longest was closed without a word");
    let v: Value = serde_json::from_str(&line).expect("JSON");
    let (code, msg) = error_of(&v, &Value::Null);
    assert_eq!(code, FAILED, "{msg}");
    assert!(msg.contains("idle longest"), "{msg}");
    assert!(
        matches!(held[0].read_line(), Ok(None)),
        "the evicted connection stays open"
    );
    for (i, h) in held.iter_mut().enumerate().skip(1) {
        assert_eq!(nodes(h).len(), 1, "held connection {i}");
    }
    drop((held, extra));
    assert_eq!(export_names(&mut idle), vec!["base".to_owned()]);

    // export_add from a client that hangs up at once: the export appears and serves.
    idle.ok("node_add", json!({"name": "hn", "path": "null:64M"}));
    let sock = env.path("h.sock");
    {
        let mut gone = env.rpc();
        gone.send("export_add", vhost_export("hx", "hn", &sock));
    }
    wait_until("the abandoned export_add completes", SETTLE_TIMEOUT, || {
        export_names(&mut idle).contains(&"hx".to_owned())
    });
    assert!(sock.exists());
    let mut client = connect(&sock);
    roundtrip(&mut client, 1, true);
    assert_eq!(
        holders_of(&mut idle, "hn"),
        Some(vec!["monitor".to_owned(), "export hx".to_owned()])
    );

    // export_remove from a client that hangs up at once, with I/O in flight.
    let log = writer_storm(0x4A46);
    std::thread::scope(|s| {
        let h = client.queue(0);
        let log = &log;
        s.spawn(move || log.run(h));
        wait_acked(log, 200, &env.daemon);
        {
            let mut gone = env.rpc();
            gone.send("export_remove", json!({"name": "hx", "mode": "safe"}));
        }
        // The export leaves export_list when its removal begins; the removal is complete
        // when its node reference is back (after the detach removed the socket).
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let listed = export_names(&mut idle).contains(&"hx".to_owned());
            let holders = holders_of(&mut idle, "hn");
            if !listed && holders == Some(vec!["monitor".to_owned()]) {
                break;
            }
            if Instant::now() >= deadline {
                log.stop();
                panic!(
                    "the abandoned export_remove did not complete within {SETTLE_TIMEOUT:?}: \
                     listed {listed}, holders of hn {holders:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log.mark_gone();
        if sock.exists() {
            log.stop();
            panic!(
                "{} still exists after the export's removal completed",
                sock.display()
            );
        }
        wait_stopped_by_removal(log, SETTLE_TIMEOUT);
    });
    assert_request_fails(&mut client, 1, "hx");
    drop(client);
    assert_eq!(
        holders_of(&mut idle, "hn"),
        Some(vec!["monitor".to_owned()])
    );
    idle.ok("node_remove", json!({"name": "hn"}));

    // Everything still works.
    assert_eq!(export_names(&mut idle), vec!["base".to_owned()]);
    let mut fresh = env.rpc();
    assert_eq!(nodes(&mut fresh).len(), 1);
    let mut c = connect(&env.base_sock);
    roundtrip(&mut c, 4, false);
    drop(c);
    drop((idle, fresh));
    env.stop(&[&sock]);
}

/// Two clients add an export of the same name at the same moment: exactly one succeeds and
/// the other is refused with -32002. Up to 40 rounds, since it is a race; when both
/// succeed, the test goes on to show what becomes of the export that was not kept: whether
/// its socket keeps serving after the name's removal and after the daemon's exit.
#[test]
fn concurrent_export_add_of_one_name_admits_one() {
    let env = Env::start();
    let mut rpc = env.rpc();
    rpc.ok("node_add", json!({"name": "cn", "path": "null:16M"}));
    let mut sockets = vec![];
    let mut failure = None;
    for round in 0..40 {
        let name = format!("dup{round}");
        let socks = [
            env.path(&format!("dup{round}-a.sock")),
            env.path(&format!("dup{round}-b.sock")),
        ];
        let barrier = Barrier::new(2);
        let results: Vec<Result<Value, RpcErr>> = std::thread::scope(|s| {
            let joins: Vec<_> = socks
                .iter()
                .map(|sock| {
                    let (barrier, name, control) = (&barrier, &name, &env.daemon.control);
                    s.spawn(move || {
                        let mut c = Rpc::connect(control);
                        barrier.wait();
                        c.call("export_add", vhost_export(name, "cn", sock))
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("thread"))
                .collect()
        });
        sockets.extend(socks.clone());
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.code == CONFLICT))
            .count();
        if ok == 1 && conflicts == 1 {
            assert_eq!(
                export_names(&mut rpc),
                vec!["base".to_owned(), name.clone()]
            );
            rpc.ok("export_remove", json!({"name": name, "mode": "safe"}));
            for s in &socks {
                assert!(!s.exists(), "round {round}: {} left behind", s.display());
            }
            continue;
        }
        // Both (or neither) admitted: collect what the daemon shows, then fail.
        let listed: Vec<(String, Value)> = exports(&mut rpc)
            .into_iter()
            .filter(|(n, _)| *n == name)
            .collect();
        let live = |socks: &[PathBuf]| -> Vec<String> {
            socks
                .iter()
                .filter(|s| UnixStream::connect(s).is_ok())
                .map(|s| s.display().to_string())
                .collect()
        };
        let live_before = live(&socks);
        let removed = rpc.call("export_remove", json!({"name": name, "mode": "safe"}));
        let live_after_remove = live(&socks);
        let names_after_remove = export_names(&mut rpc);
        let holders = holders_of(&mut rpc, "cn");
        failure = Some(format!(
            "round {round}: two export_add of {name:?} at once, expected one success and one \
             -32002:\n  results: {:?}\n  export_list entries named {name:?}: {}\n  sockets \
             accepting connections: {live_before:?}\n  export_remove {name:?}: {:?}\n  \
             sockets still accepting after that: {live_after_remove:?}\n  export_list \
             afterwards: {names_after_remove:?}\n  holders of node cn: {holders:?}",
            results
                .iter()
                .map(|r| match r {
                    Ok(v) => format!("ok (socket {})", v["socket"]),
                    Err(e) => format!("error {} {:?}", e.code, e.message),
                })
                .collect::<Vec<_>>(),
            listed.len(),
            removed.map(|v| v["removed"].clone()).map_err(|e| e.code),
        ));
        break;
    }
    let mut env = env;
    let status = env.daemon.sigterm_and_wait(EXIT_TIMEOUT);
    let left: Vec<String> = sockets
        .iter()
        .filter(|s| s.exists())
        .map(|s| s.display().to_string())
        .collect();
    if let Some(f) = failure {
        panic!(
            "{f}\n  daemon exit: {status}\n  sockets left on disk after the exit: {left:?}\n\
             --- stderr ---\n{}",
            env.daemon.stderr()
        );
    }
    env.daemon.assert_exit_ok(status);
    assert!(left.is_empty(), "sockets left after the exit: {left:?}");
    assert_gone(&env.daemon.control);
}

/// export_add of a name whose export_remove is still running: the export it creates must
/// be a holder of its node for as long as it is listed, so node_remove of that node is
/// refused. Up to 10 rounds, since it is a race.
#[test]
fn export_add_during_export_remove_of_one_name_keeps_the_node_held() {
    let env = Env::start();
    let mut rpc = env.rpc();
    rpc.ok("node_add", json!({"name": "rn", "path": "null:16M"}));
    let mut sockets = vec![];
    for round in 0..10 {
        let (a, b) = (
            env.path(&format!("r{round}-a.sock")),
            env.path(&format!("r{round}-b.sock")),
        );
        sockets.push(a.clone());
        sockets.push(b.clone());
        rpc.ok("export_add", vhost_export("rx", "rn", &a));
        let control = &env.daemon.control;
        let (removed, added, conflicts) = std::thread::scope(|s| {
            let remover = s.spawn(move || {
                let mut c = Rpc::connect(control);
                c.call("export_remove", json!({"name": "rx", "mode": "safe"}))
            });
            let adder = s.spawn(|| {
                let mut c = Rpc::connect(control);
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut conflicts = 0;
                loop {
                    match c.call("export_add", vhost_export("rx", "rn", &b)) {
                        Ok(v) => return (Ok(v), conflicts),
                        Err(e) if e.code == CONFLICT && Instant::now() < deadline => {
                            conflicts += 1;
                        }
                        Err(e) => return (Err(e), conflicts),
                    }
                }
            });
            let removed = remover.join().expect("remover");
            let (added, conflicts) = adder.join().expect("adder");
            (removed, added, conflicts)
        });
        let removed = removed.unwrap_or_else(|e| panic!("export_remove rx: {e:?}"));
        assert_eq!(removed["removed"], "rx");
        let added = added.unwrap_or_else(|e| panic!("export_add rx (second): {e:?}"));
        assert_eq!(added["socket"], path_str(&b), "{added}");
        assert!(
            !a.exists(),
            "{} left after its export's removal",
            a.display()
        );
        assert_eq!(
            export_names(&mut rpc),
            vec!["base".to_owned(), "rx".to_owned()]
        );
        let holders = holders_of(&mut rpc, "rn");
        let node_remove = rpc.call("node_remove", json!({"name": "rn"}));
        let serving = Client::connect(&b, 1, 4).and_then(|mut c| {
            c.run(
                0,
                &[Op::Read {
                    offset: 0,
                    len: BLOCK,
                }],
            )
            .map(|o| o[0].ret)
        });
        assert!(
            holders == Some(vec!["monitor".to_owned(), "export rx".to_owned()])
                && matches!(&node_remove, Err(e) if e.code == CONFLICT),
            "round {round}: export rx (socket {}) was added while the previous rx was being \
             removed ({conflicts} conflict(s) before it was admitted); it is listed on node \
             rn, but node rn's holders are {holders:?} and node_remove rn gave {node_remove:?}; \
             the export still serves I/O: {serving:?}\n--- stderr ---\n{}",
            b.display(),
            env.daemon.stderr()
        );
        rpc.ok("export_remove", json!({"name": "rx", "mode": "safe"}));
        assert!(!b.exists());
    }
    rpc.ok("node_remove", json!({"name": "rn"}));
    let refs: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
    env.stop(&refs);
}

/// A new connection that answers a node_list, or `None` when the daemon refused it.
fn served(control: &Path) -> Option<Rpc> {
    let mut c = Rpc::connect(control);
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"node_list\"}\n")
        .ok()?;
    let line = c.read_line().ok()??;
    let v: Value = serde_json::from_str(&line).ok()?;
    (v["id"] == 0 && v.get("result").is_some()).then_some(c)
}

fn ctl(control: &Path, args: &[&str]) -> Finished {
    let mut all = vec!["ctl", "--control", path_str(control)];
    all.extend_from_slice(args);
    run_to_exit(&all)
}

fn assert_ctl_ok(what: &str, f: &Finished) {
    assert!(
        f.status.success(),
        "sluice ctl {what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        f.status,
        f.stdout,
        f.stderr
    );
}

/// Test 5: `sluice ctl`: tables, JSON, errors as one line on stderr with a non-zero exit,
/// a missing socket named in the message, and runtime add/stats/remove/shutdown through it.
#[test]
fn ctl_client_commands() {
    let mut env = Env::start();
    let control = env.daemon.control.clone();

    // nodes: a table with the node and its holders.
    let f = ctl(&control, &["nodes"]);
    assert_ctl_ok("nodes", &f);
    eprintln!("sluice ctl nodes:\n{}", f.stdout);
    for want in ["disk0", "monitor", "export base", "64"] {
        assert!(
            f.stdout.contains(want),
            "ctl nodes lacks {want:?}:\n{}",
            f.stdout
        );
    }
    // --json exports: valid JSON with the export and its node.
    let f = ctl(&control, &["--json", "exports"]);
    assert_ctl_ok("--json exports", &f);
    let v: Value = serde_json::from_str(&f.stdout)
        .unwrap_or_else(|e| panic!("ctl --json exports is not JSON ({e}):\n{}", f.stdout));
    let list = v.as_array().expect("an array");
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["export"], "base", "{v}");
    assert_eq!(list[0]["node"], "disk0", "{v}");
    assert_eq!(list[0]["socket"], path_str(&env.base_sock), "{v}");
    // The flag may also follow the subcommand (it is global).
    let f = ctl(&control, &["exports", "--json"]);
    assert_ctl_ok("exports --json", &f);
    assert!(
        serde_json::from_str::<Value>(&f.stdout).is_ok(),
        "{}",
        f.stdout
    );
    let f = ctl(&control, &["exports"]);
    assert_ctl_ok("exports", &f);
    for want in ["base", "vhost-user", "disk0", path_str(&env.base_sock)] {
        assert!(
            f.stdout.contains(want),
            "ctl exports lacks {want:?}:\n{}",
            f.stdout
        );
    }

    // node-remove of a node in use: non-zero exit, one line on stderr naming the export.
    let f = ctl(&control, &["node-remove", "disk0"]);
    assert!(
        !f.status.success(),
        "node-remove of a node in use succeeded"
    );
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr:\n{}", f.stderr);
    assert!(lines[0].contains("export base"), "stderr: {}", lines[0]);
    assert!(lines[0].contains("-32002"), "stderr: {}", lines[0]);
    assert!(f.stdout.is_empty(), "stdout: {}", f.stdout);

    // A control socket that does not exist.
    let missing = env.path("nowhere/control.sock");
    let f = run_to_exit(&["ctl", "--control", path_str(&missing), "nodes"]);
    assert!(
        !f.status.success(),
        "ctl against a missing socket succeeded"
    );
    assert!(
        f.stderr.contains(path_str(&missing)),
        "stderr does not name the path: {}",
        f.stderr
    );
    assert_eq!(f.stderr.lines().count(), 1, "stderr:\n{}", f.stderr);

    // Add a node (created) and an export through ctl, use it, look at its stats, remove it.
    let img = env.path("ctl.img");
    let sock = env.path("ctl.sock");
    let f = ctl(
        &control,
        &["node-add", "cnode", path_str(&img), "--create-size", "16M"],
    );
    assert_ctl_ok("node-add", &f);
    assert_eq!(
        std::fs::metadata(&img).map(|m| m.len()).ok(),
        Some(16 * MIB)
    );
    let f = ctl(
        &control,
        &[
            "export-add",
            "cx",
            "--node",
            "cnode",
            "--vhost-user",
            path_str(&sock),
            "--queues",
            "2",
            "--queue-depth",
            "32",
        ],
    );
    assert_ctl_ok("export-add", &f);
    assert!(sock.exists());
    let mut client = connect(&sock);
    assert_eq!(client.capacity, 16 * MIB);
    let ops = roundtrip(&mut client, 0xC7, false);
    let mut rpc = env.rpc();
    wait_until("stats count the round trip", Duration::from_secs(5), || {
        rpc.ok("export_stats", json!({"name": "cx"}))["stats"]["requests"]
            .as_u64()
            .unwrap_or(0)
            >= ops
    });
    let f = ctl(&control, &["stats", "cx"]);
    assert_ctl_ok("stats", &f);
    eprintln!("sluice ctl stats cx:\n{}", f.stdout);
    for want in ["cx", "p50", "p99", &ops.to_string()] {
        assert!(
            f.stdout.contains(want),
            "ctl stats lacks {want:?}:\n{}",
            f.stdout
        );
    }
    let f = ctl(&control, &["--json", "stats", "cx"]);
    assert_ctl_ok("--json stats", &f);
    let v: Value = serde_json::from_str(&f.stdout).expect("stats JSON");
    assert_eq!(v["stats"]["requests"], ops, "{v}");
    assert!(v["latency"]["p50_us"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    let f = ctl(&control, &["nodes"]);
    assert!(f.stdout.contains("export cx"), "{}", f.stdout);
    let f = ctl(&control, &["export-remove", "cx"]);
    assert_ctl_ok("export-remove", &f);
    assert_gone(&sock);
    drop(client);
    let f = ctl(&control, &["node-remove", "cnode"]);
    assert_ctl_ok("node-remove", &f);
    let file = std::fs::read(&img).expect("read ctl.img");
    check_roundtrip_in_file(&file, 0xC7, "ctl.img");

    // methods, call.
    let f = ctl(&control, &["methods"]);
    assert_ctl_ok("methods", &f);
    for m in ["node_add", "export_remove", "export_stats", "shutdown"] {
        assert!(f.stdout.contains(m), "ctl methods lacks {m}:\n{}", f.stdout);
    }
    let f = ctl(&control, &["--json", "call", "node_list"]);
    assert_ctl_ok("call node_list", &f);
    let v: Value = serde_json::from_str(&f.stdout).expect("call JSON");
    assert_eq!(v[0]["name"], "disk0", "{v}");
    let f = ctl(&control, &["call", "export_stats", r#"{"name":"base"}"#]);
    assert_ctl_ok("call export_stats", &f);
    let f = ctl(&control, &["call", "no_such_method"]);
    assert!(!f.status.success());
    assert!(f.stderr.contains("-32601"), "stderr: {}", f.stderr);
    assert_eq!(f.stderr.lines().count(), 1, "stderr:\n{}", f.stderr);
    let f = ctl(&control, &["call", "node_remove", "{\"name\":"]);
    assert!(!f.status.success());
    assert_eq!(f.stderr.lines().count(), 1, "stderr:\n{}", f.stderr);

    // shutdown through ctl: the daemon exits 0 and removes its sockets.
    let f = ctl(&control, &["shutdown"]);
    assert_ctl_ok("shutdown", &f);
    let status = env
        .daemon
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("still running after ctl shutdown\n{}", env.daemon.stderr()));
    env.daemon.assert_exit_ok(status);
    assert_gone(&env.base_sock);
    assert_gone(&control);
}

/// Test 6: the `shutdown` method closes everything in order (drain, detach, release node …
/// flushed and closed), exits 0 and removes every socket; the data written through a
/// runtime export is in its file.
#[test]
fn shutdown_method_closes_all_in_order() {
    let mut env = Env::start();
    let mut rpc = env.rpc();
    let img = env.path("s.img");
    make_file(&img, DISK_BYTES);
    let sock = env.path("s.sock");
    rpc.ok("node_add", json!({"name": "sn", "path": path_str(&img)}));
    rpc.ok("node_add", json!({"name": "spare", "path": "null:1M"}));
    rpc.ok("export_add", vhost_export("sx", "sn", &sock));
    let mut client = connect(&sock);
    roundtrip(&mut client, 0x5D, false);
    let mut base_client = connect(&env.base_sock);
    roundtrip(&mut base_client, 0x5E, false);

    let t0 = Instant::now();
    let r = rpc.ok("shutdown", json!({}));
    assert_eq!(r, json!({"shutting_down": true}));
    let status = env
        .daemon
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("still running after shutdown\n{}", env.daemon.stderr()));
    eprintln!("exited {:?} after the shutdown request", t0.elapsed());
    env.daemon.assert_exit_ok(status);
    assert_gone(&sock);
    assert_gone(&env.base_sock);
    assert_gone(&env.daemon.control);
    // The connection is closed or refuses further work; it never hangs.
    let after = rpc
        .send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":99,\"method\":\"node_list\"}\n")
        .and_then(|()| rpc.read_line());
    assert!(
        !matches!(&after, Ok(Some(l)) if l.contains("\"result\"")),
        "a request after the exit was answered: {after:?}"
    );
    drop((client, base_client));

    let stderr = env.daemon.stderr();
    eprintln!("--- daemon stderr ---\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let find = |pat: &str| -> Vec<usize> {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(pat))
            .map(|(i, _)| i)
            .collect()
    };
    let requested = find("shutting down (monitor request)");
    let drains = find("close-all: drain export");
    let detaches = find("close-all: detach export");
    let releases = find("close-all: release node");
    let done = find("all exports detached and nodes flushed");
    for (what, idx) in [
        ("shutting down (monitor request)", &requested),
        ("drain", &drains),
        ("detach", &detaches),
        ("release", &releases),
        ("all exports detached", &done),
    ] {
        assert!(!idx.is_empty(), "no {what:?} line in stderr:\n{stderr}");
    }
    for x in ["base", "sx"] {
        assert_eq!(
            find(&format!("close-all: drain export {x} ")).len(),
            1,
            "{stderr}"
        );
        assert_eq!(
            find(&format!("close-all: detach export {x} ")).len(),
            1,
            "{stderr}"
        );
    }
    for n in ["disk0", "sn", "spare"] {
        let l = find(&format!("close-all: release node {n}: flushed and closed"));
        assert_eq!(l.len(), 1, "node {n}:\n{stderr}");
    }
    let last = |v: &[usize]| *v.iter().max().expect("non-empty");
    let first = |v: &[usize]| *v.iter().min().expect("non-empty");
    assert!(
        last(&requested) < first(&drains)
            && last(&drains) < first(&detaches)
            && last(&detaches) < first(&releases)
            && last(&releases) < first(&done),
        "close-all steps out of order:\n{stderr}"
    );

    let file = std::fs::read(&img).expect("read s.img");
    check_roundtrip_in_file(&file, 0x5D, "s.img");
    let file = std::fs::read(&env.base_img).expect("read base.img");
    check_roundtrip_in_file(&file, 0x5E, "base.img");
}

/// SIGTERM with the monitor idle: exit 0, and the control socket is gone.
#[test]
fn sigterm_removes_the_control_socket() {
    let env = Env::start();
    let mut rpc = env.rpc();
    assert_eq!(nodes(&mut rpc).len(), 1);
    assert!(env.daemon.control.exists());
    drop(rpc);
    let control = env.daemon.control.clone();
    env.stop(&[&control]);
}

/// Issue 9 item 5: idle connections cannot lock the control socket. Far more idle
/// connections than `MAX_CONTROL_CLIENTS` are opened and left alone; `sluice ctl` is still
/// served at once (the longest-idle connections are closed to make room, with a line that
/// says why), and `sluice ctl shutdown` stops the daemon.
#[test]
fn idle_clients_do_not_lock_out_the_control_socket() {
    let mut env = Env::start();
    let control = env.daemon.control.clone();
    let mut idle: Vec<UnixStream> = (0..3 * MAX_CONTROL_CLIENTS)
        .map(|i| {
            UnixStream::connect(&control).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();

    let t0 = Instant::now();
    let f = ctl(&control, &["nodes"]);
    assert_ctl_ok("nodes with idle connections open", &f);
    assert!(f.stdout.contains("disk0"), "{}", f.stdout);

    // The connections opened first were idle longest and were closed, each told why.
    let mut closed = 0;
    for (i, s) in idle.iter_mut().enumerate().take(MAX_CONTROL_CLIENTS) {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut got = String::new();
        match BufReader::new(&*s).read_line(&mut got) {
            Ok(0) => closed += 1,
            Ok(_) => {
                let v: Value = serde_json::from_str(&got)
                    .unwrap_or_else(|e| panic!("connection {i}: not JSON ({e}): {got:?}"));
                let (code, msg) = error_of(&v, &Value::Null);
                assert_eq!(code, FAILED, "{msg}");
                assert!(msg.contains("idle"), "connection {i}: {msg}");
                closed += 1;
            }
            Err(e) => panic!("connection {i} was neither served nor closed: {e}"),
        }
    }
    assert_eq!(closed, MAX_CONTROL_CLIENTS);

    let f = ctl(&control, &["shutdown"]);
    assert_ctl_ok("shutdown with idle connections open", &f);
    let status = env
        .daemon
        .wait(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("still running after shutdown\n{}", env.daemon.stderr()));
    env.daemon.assert_exit_ok(status);
    eprintln!("served and shut down in {:?}", t0.elapsed());
    drop(idle);
    assert_gone(&control);
}

/// Issue 9 item 9: a request line that is not UTF-8 gets a JSON-RPC parse error (-32700)
/// and the connection goes on serving.
#[test]
fn invalid_utf8_gets_a_parse_error_and_the_connection_goes_on() {
    let env = Env::start();
    let mut rpc = env.rpc();
    rpc.set_read_timeout(Duration::from_secs(20));
    for bytes in [
        &b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\xfe\"}\n"[..],
        &b"\x00\x01\x02\x80\x81binary\xc3\n"[..],
    ] {
        rpc.send_raw(bytes).expect("send");
        let line = match rpc.read_line() {
            Ok(Some(l)) => l,
            other => panic!("no reply to {bytes:?}: {other:?}"),
        };
        let v: Value = serde_json::from_str(&line).expect("reply is JSON");
        let (code, msg) = error_of(&v, &Value::Null);
        assert_eq!(code, PARSE_ERROR, "{msg}");
        assert!(msg.contains("UTF-8"), "{msg}");
    }
    assert_eq!(nodes(&mut rpc).len(), 1, "the connection stopped serving");
    drop(rpc);
    env.stop(&[]);
}

/// Issue 9 item 9: every reply reaches the client in one piece. The client waits in
/// `recv` before each reply is sent; if the daemon wrote a reply in many small writes, the
/// first `recv` would return only its beginning.
#[test]
fn each_reply_is_written_whole() {
    use std::io::Read;
    let env = Env::start();
    let mut s = UnixStream::connect(&env.daemon.control).expect("connect");
    s.set_read_timeout(Some(RPC_TIMEOUT)).expect("timeout");
    let mut split = Vec::new();
    for id in 0..20 {
        let req = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"rpc_methods\"}}\n");
        s.write_all(req.as_bytes()).expect("send");
        let mut buf = vec![0u8; 256 * 1024];
        let n = s.read(&mut buf).expect("recv");
        if buf[..n].last() != Some(&b'\n') {
            // Take the rest so the next round starts clean.
            let mut rest = Vec::new();
            let mut r = BufReader::new(&s);
            r.read_until(b'\n', &mut rest).expect("rest of the reply");
            split.push(format!(
                "reply {id}: first recv {n} bytes of {}",
                n + rest.len()
            ));
        }
    }
    assert!(
        split.is_empty(),
        "replies arrived in pieces:\n{}",
        split.join("\n")
    );
    drop(s);
    env.stop(&[]);
}

/// Issue 9 item 5: a client that sends nothing for the idle timeout
/// (`SLUICE_CONTROL_IDLE_TIMEOUT_MS`, here 500 ms) is closed with a line that says why;
/// one that keeps calling (every 200 ms, like `sluice ctl --wait`) for four times as long
/// stays connected.
#[test]
fn idle_client_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("n.sock");
    let mut daemon = Daemon::try_spawn_env(
        &[
            "serve",
            "--disk",
            "null:16M",
            "--vhost-user",
            path_str(&sock),
        ],
        1,
        &[("SLUICE_CONTROL_IDLE_TIMEOUT_MS", "500")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    wait_control_ready(&daemon);
    let mut quiet = Rpc::connect(&daemon.control);
    let mut busy = Rpc::connect(&daemon.control);
    assert_eq!(nodes(&mut quiet).len(), 1);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2000) {
        assert_eq!(nodes(&mut busy).len(), 1, "a polling client was cut");
        std::thread::sleep(Duration::from_millis(200));
    }
    quiet.set_read_timeout(Duration::from_secs(10));
    let line = quiet
        .read_line()
        .expect("the idle client was not closed")
        .expect("the idle client was closed without a word");
    let v: Value = serde_json::from_str(&line).expect("JSON");
    let (code, msg) = error_of(&v, &Value::Null);
    assert_eq!(code, FAILED, "{msg}");
    assert!(msg.contains("idle") && msg.contains("500 ms"), "{msg}");
    assert!(
        matches!(quiet.read_line(), Ok(None)),
        "the idle connection stays open"
    );
    assert_eq!(nodes(&mut busy).len(), 1);
    drop((quiet, busy));
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}
