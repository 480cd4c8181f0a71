//! The monitor: JSON-RPC 2.0 over a UNIX socket, one request per line (the
//! convention of SPDK's and QEMU's monitors). `sluice ctl` is its client.
//!
//! Every client gets its own thread (at most `MAX_CONTROL_CLIENTS`); a
//! malformed request gets a JSON-RPC error and the connection goes on; a
//! client that hangs up mid-request harms nothing (the operation finishes,
//! its answer is dropped). Idle clients cannot lock the socket: a client
//! that sends nothing for `CONTROL_IDLE_TIMEOUT_MS` is closed, and when every
//! slot is taken the client idle longest is closed to serve the new one.

mod methods;
mod rpc;

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::Daemon;
use crate::unix_socket::{self, BindError};

pub use methods::{parse_call, Call, METHODS};
pub use rpc::{code, RpcError, StopRequest};

/// Most monitor clients served at once.
pub const MAX_CONTROL_CLIENTS: usize = 16;
/// Longest request line accepted.
pub const MAX_CONTROL_REQUEST_BYTES: u64 = 64 * 1024;
/// A client that sends nothing for this long while the monitor waits for its
/// next request is closed. Time spent running its request does not count,
/// so a long `export_remove` or a `ctl --wait` poll is never cut.
/// `SLUICE_CONTROL_IDLE_TIMEOUT_MS` in the environment overrides it.
pub const CONTROL_IDLE_TIMEOUT_MS: u64 = 300_000;
/// The environment variable that sets the idle timeout (milliseconds, ≥ 1).
pub const CONTROL_IDLE_TIMEOUT_ENV: &str = "SLUICE_CONTROL_IDLE_TIMEOUT_MS";
/// A client that takes none of its reply for this long is closed, so a
/// client that stops reading cannot hold a monitor thread forever.
pub const CONTROL_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Mode of the control socket: owner only.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;

/// Why the control socket could not be served. Each message names the
/// socket (or the setting) and what to pass instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// `SLUICE_CONTROL_IDLE_TIMEOUT_MS` is not a number of milliseconds ≥ 1.
    #[error(
        "{CONTROL_IDLE_TIMEOUT_ENV}={}: expected a number of milliseconds, at least 1 \
         (default {CONTROL_IDLE_TIMEOUT_MS})",
        value.to_string_lossy()
    )]
    IdleTimeout {
        /// The variable's value.
        value: OsString,
    },
    /// A missing directory above the socket could not be created.
    #[error(
        "control socket {path}: cannot create directory {dir}: {source}; create it or pass \
         --control PATH"
    )]
    CreateDir {
        /// The socket.
        path: PathBuf,
        /// The directory it goes in.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is a directory: the user gave the directory, not the socket.
    #[error(
        "control socket {path}: is a directory, not a socket; pass the socket's own path, \
         e.g. --control {}",
        path.join("control.sock").display()
    )]
    IsADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// Another process (another sluice, most likely) serves the socket.
    #[error("control socket {path}: busy: another sluice serves it; pass --control PATH")]
    Busy {
        /// The socket.
        path: PathBuf,
    },
    /// The socket could not be bound for another reason.
    #[error("control socket {path}: {source}; pass --control PATH")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: BindError,
    },
    /// The thread that serves the socket could not be started.
    #[error("control socket {path}: cannot spawn its thread: {source}")]
    Spawn {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The running control socket.
#[derive(Debug)]
pub struct Monitor {
    path: PathBuf,
    /// Directories `start` created for the socket, deepest first: removed
    /// again at stop (when empty), so a run leaves nothing behind.
    created_dirs: Vec<PathBuf>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Binds `path` (mode 0600; a stale socket is replaced, a live one or
    /// anything that is not a socket is refused) and serves it. A missing
    /// directory is created, and removed again at [`Monitor::stop`].
    pub fn start(
        path: &Path,
        daemon: Arc<Daemon>,
        stop: mpsc::Sender<StopRequest>,
    ) -> Result<Monitor, MonitorError> {
        let idle_timeout = idle_timeout()?;
        let created_dirs = create_dirs(path)?;
        let listener = match bind(path) {
            Ok(l) => l,
            Err(e) => {
                remove_dirs(&created_dirs);
                return Err(e);
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let spawned = {
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("monitor".into())
                .spawn(move || accept_loop(listener, daemon, stop, stopping, idle_timeout))
        };
        let thread = match spawned {
            Ok(t) => t,
            Err(source) => {
                let _ = std::fs::remove_file(path);
                remove_dirs(&created_dirs);
                return Err(MonitorError::Spawn {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Monitor {
            path: path.to_owned(),
            created_dirs,
            stopping,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, removes the socket and the directories made for it.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept() with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        remove_dirs(&self.created_dirs);
    }
}

/// How long a client may wait between requests: `CONTROL_IDLE_TIMEOUT_MS`, or
/// the environment's `SLUICE_CONTROL_IDLE_TIMEOUT_MS`.
fn idle_timeout() -> Result<Duration, MonitorError> {
    let Some(value) = std::env::var_os(CONTROL_IDLE_TIMEOUT_ENV) else {
        return Ok(Duration::from_millis(CONTROL_IDLE_TIMEOUT_MS));
    };
    match value.to_str().and_then(|s| s.parse::<u64>().ok()) {
        Some(ms) if ms >= 1 => Ok(Duration::from_millis(ms)),
        _ => Err(MonitorError::IdleTimeout { value }),
    }
}

/// Creates the missing directories above `path`; returns them deepest first.
fn create_dirs(path: &Path) -> Result<Vec<PathBuf>, MonitorError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(Vec::new());
    };
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .map(Path::to_owned)
        .collect();
    std::fs::create_dir_all(dir).map_err(|source| MonitorError::CreateDir {
        path: path.to_owned(),
        dir: dir.to_owned(),
        source,
    })?;
    Ok(missing)
}

/// Removes directories `create_dirs` made, deepest first; one that is no
/// longer empty stays (with everything above it).
fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, MonitorError> {
    unix_socket::bind(path, CONTROL_SOCKET_MODE).map_err(|e| {
        let path = path.to_owned();
        match e {
            BindError::NotASocket {
                what: "a directory",
            } => MonitorError::IsADirectory { path },
            BindError::Busy => MonitorError::Busy { path },
            source => MonitorError::Bind { path, source },
        }
    })
}

/// One connected client, as the accept loop sees it.
struct ClientSlot {
    id: u64,
    /// The client's socket, to close it when it is evicted.
    conn: UnixStream,
    /// Since when the client has been waiting to send its next request;
    /// `None` while one of its requests runs.
    idle_since: Option<Instant>,
}

/// The served clients. The accept loop admits and evicts; each client
/// thread marks itself busy and idle around its requests.
#[derive(Default)]
struct Clients {
    slots: Mutex<Vec<ClientSlot>>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, Vec<ClientSlot>> {
        // Every change is one push, remove or field store: consistent even
        // after a panic elsewhere.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `conn`. When all are taken, the client idle longest
    /// is evicted; when none is idle (every client runs a request), `None`.
    fn admit(&self, id: u64, conn: &UnixStream) -> io::Result<Option<()>> {
        let handle = conn.try_clone()?;
        let mut slots = self.lock();
        if slots.len() >= MAX_CONTROL_CLIENTS {
            let oldest = slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.idle_since.map(|t| (t, i)))
                .min();
            let Some((since, i)) = oldest else {
                return Ok(None);
            };
            let evicted = slots.swap_remove(i);
            tracing::info!(
                "monitor: all {MAX_CONTROL_CLIENTS} client slots taken; closing the client idle \
                 longest ({} s) to serve a new one",
                since.elapsed().as_secs()
            );
            // Its thread sees end-of-file, finds its slot gone and says why.
            let _ = evicted.conn.shutdown(Shutdown::Read);
        }
        slots.push(ClientSlot {
            id,
            conn: handle,
            idle_since: Some(Instant::now()),
        });
        Ok(Some(()))
    }

    /// Marks client `id` busy (`false`) or idle (`true`); `false` when it was
    /// evicted meanwhile.
    fn set_idle(&self, id: u64, idle: bool) -> bool {
        let mut slots = self.lock();
        match slots.iter_mut().find(|s| s.id == id) {
            Some(s) => {
                s.idle_since = idle.then(Instant::now);
                true
            }
            None => false,
        }
    }

    fn leave(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }
}

fn accept_loop(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    stop: mpsc::Sender<StopRequest>,
    stopping: Arc<AtomicBool>,
    idle_timeout: Duration,
) {
    let clients = Arc::new(Clients::default());
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        next_id += 1;
        let id = next_id;
        match clients.admit(id, &conn) {
            Ok(Some(())) => {}
            Ok(None) => {
                let _ =
                    conn.set_write_timeout(Some(Duration::from_millis(CONTROL_WRITE_TIMEOUT_MS)));
                let reply = error_response(
                    Value::Null,
                    RpcError::new(
                        code::FAILED,
                        format!(
                            "too many monitor clients: all {MAX_CONTROL_CLIENTS} are running \
                             requests; retry when one has finished"
                        ),
                    ),
                );
                let _ = write_reply(&mut conn, &reply);
                continue;
            }
            Err(e) => {
                tracing::warn!("monitor: cannot take a new client: {e}");
                continue;
            }
        }
        let spawned = {
            let (daemon, stop, clients) = (daemon.clone(), stop.clone(), clients.clone());
            std::thread::Builder::new()
                .name("monitor-client".into())
                .spawn(move || {
                    let served = serve_client(conn, id, idle_timeout, &clients, &daemon, &stop);
                    if let Err(e) = served {
                        tracing::debug!("monitor client ended: {e}");
                    }
                    clients.leave(id);
                })
        };
        if let Err(e) = spawned {
            tracing::warn!("monitor: cannot spawn a client thread: {e}");
            clients.leave(id);
        }
    }
}

/// Writes `reply` and its newline in one piece: one `write` for the whole
/// line, not one per JSON token.
fn write_reply(conn: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    conn.write_all(&line)
}

/// Tells a client why it is being closed (best effort) before it goes.
fn say_goodbye(conn: &mut UnixStream, why: String) {
    let _ = write_reply(
        conn,
        &error_response(Value::Null, RpcError::new(code::FAILED, why)),
    );
}

fn serve_client(
    conn: UnixStream,
    id: u64,
    idle_timeout: Duration,
    clients: &Clients,
    daemon: &Daemon,
    stop: &mpsc::Sender<StopRequest>,
) -> io::Result<()> {
    conn.set_read_timeout(Some(idle_timeout))?;
    conn.set_write_timeout(Some(Duration::from_millis(CONTROL_WRITE_TIMEOUT_MS)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let evicted = || {
        format!(
            "closed: this connection was idle longest when all {MAX_CONTROL_CLIENTS} monitor \
             client slots were taken; reconnect to go on"
        )
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_CONTROL_REQUEST_BYTES)
            .read_until(b'\n', &mut line);
        let n = match read {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                say_goodbye(
                    &mut writer,
                    format!(
                        "closed: idle, no request for {} ms; reconnect to go on",
                        idle_timeout.as_millis()
                    ),
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Busy from here until the reply is out: a running request is never
        // evicted. A client evicted meanwhile stops here.
        if !clients.set_idle(id, false) {
            say_goodbye(&mut writer, evicted());
            return Ok(());
        }
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_CONTROL_REQUEST_BYTES {
            let reply = error_response(
                Value::Null,
                RpcError::new(
                    code::INVALID_REQUEST,
                    format!("request longer than {MAX_CONTROL_REQUEST_BYTES} bytes"),
                ),
            );
            write_reply(&mut writer, &reply)?;
            return Ok(());
        }
        // Subscribed before the answer goes out, so no event falls between.
        let mut events = None;
        let reply = match std::str::from_utf8(&line) {
            Ok(text) if text.trim().is_empty() => None,
            Ok(text) => {
                let text = text.trim();
                if parse_request(text.as_bytes()).is_ok_and(|r| r.method == "events_subscribe") {
                    events = Some(daemon.subscribe_events());
                }
                handle_line(text, daemon, stop)
            }
            Err(e) => Some(error_response(
                Value::Null,
                RpcError::new(
                    code::PARSE_ERROR,
                    format!(
                        "parse error: the request is not valid UTF-8 (at byte {})",
                        e.valid_up_to()
                    ),
                ),
            )),
        };
        let subscribed = reply.as_ref().is_some_and(|r| r.get("result").is_some());
        if let Some(reply) = reply {
            write_reply(&mut writer, &reply)?;
        }
        if let (Some(events), true) = (events, subscribed) {
            return stream_events(&mut writer, reader.get_ref(), events, id, clients, daemon);
        }
        if !clients.set_idle(id, true) {
            say_goodbye(&mut writer, evicted());
            return Ok(());
        }
    }
}

/// After `events_subscribe`: writes each event as a notification until the
/// client closes the connection (or sends anything: a subscribed
/// connection takes no more requests), is evicted, or the daemon closes.
/// An idle subscriber is evictable like any idle client.
fn stream_events(
    writer: &mut UnixStream,
    conn: &UnixStream,
    events: mpsc::Receiver<crate::api::Event>,
    id: u64,
    clients: &Clients,
    daemon: &Daemon,
) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let check = Duration::from_millis(crate::limits::EVENT_STREAM_CHECK_MS);
    loop {
        if !clients.set_idle(id, true) {
            return Ok(());
        }
        match events.recv_timeout(check) {
            Ok(event) => {
                let note = json!({"jsonrpc": "2.0", "method": "event", "params": event});
                write_reply(writer, &note)?;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if daemon.is_closing() {
                    return Ok(());
                }
                // Readable (or hung up): the client closed, or broke the
                // stream's contract by sending.
                let mut fds = [PollFd::new(conn, PollFlags::IN | PollFlags::RDHUP)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                if rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0) {
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// A request that passed the JSON-RPC 2.0 envelope checks; its method and
/// params are checked by [`parse_call`].
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request id; `None` for a notification (no answer is sent).
    pub id: Option<Value>,
    /// The method name.
    pub method: String,
    /// The params: an object, or null when absent.
    pub params: Value,
}

/// Parses one request line (without its newline) into a [`Request`]. Pure:
/// no daemon, no I/O. `Err` is the JSON-RPC error response to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, Value> {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Err(error_response(
                Value::Null,
                RpcError::new(code::PARSE_ERROR, format!("parse error: {e}")),
            ))
        }
    };
    let Value::Object(mut obj) = request else {
        return Err(error_response(
            Value::Null,
            RpcError::new(
                code::INVALID_REQUEST,
                "a request is one JSON object per line (batches are not supported)",
            ),
        ));
    };
    let id = obj.remove("id");
    // JSON-RPC 2.0 ids are strings, numbers or null; an answer must not echo
    // anything else.
    if id
        .as_ref()
        .is_some_and(|id| !(id.is_null() || id.is_string() || id.is_number()))
    {
        return Err(error_response(
            Value::Null,
            RpcError::new(
                code::INVALID_REQUEST,
                "\"id\" must be a string, a number or null",
            ),
        ));
    }
    let invalid = |msg: &str| {
        Err(error_response(
            id.clone().unwrap_or(Value::Null),
            RpcError::new(code::INVALID_REQUEST, msg),
        ))
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("\"jsonrpc\" must be \"2.0\"");
    }
    let Some(Value::String(method)) = obj.remove("method") else {
        return invalid("\"method\" must be a string");
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return invalid("\"params\" must be an object");
    }
    Ok(Request { id, method, params })
}

/// Answers one request line; `None` for notifications (no `id`).
pub fn handle_line(line: &str, daemon: &Daemon, stop: &mpsc::Sender<StopRequest>) -> Option<Value> {
    let request = match parse_request(line.as_bytes()) {
        Ok(r) => r,
        Err(reply) => return Some(reply),
    };
    let result = methods::call(&request.method, request.params, daemon, stop);
    let id = request.id?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => error_response(id, e),
    })
}

/// The JSON-RPC 2.0 error response for request `id`.
pub fn error_response(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_control_sockets_say_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        let err = bind(d).unwrap_err();
        assert!(matches!(err, MonitorError::IsADirectory { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "control socket {}: is a directory, not a socket; pass the socket's own path, \
                 e.g. --control {}/control.sock",
                d.display(),
                d.display()
            )
        );

        let file = d.join("f");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind(&file).unwrap_err();
        assert!(
            matches!(
                err,
                MonitorError::Bind {
                    source: BindError::NotASocket { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "control socket {}: exists and is a regular file, not a socket; nothing was \
                 removed; pass --control PATH",
                file.display()
            )
        );

        let sock = d.join("c.sock");
        let _live = bind(&sock).unwrap();
        let err = bind(&sock).unwrap_err();
        assert!(matches!(err, MonitorError::Busy { .. }), "{err:?}");
        assert!(err
            .to_string()
            .ends_with("busy: another sluice serves it; pass --control PATH"));

        let under_file = file.join("sub/c.sock");
        let err = create_dirs(&under_file).unwrap_err();
        assert!(matches!(err, MonitorError::CreateDir { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
        assert!(
            err.to_string()
                .ends_with("; create it or pass --control PATH"),
            "{err}"
        );

        let err = MonitorError::IdleTimeout { value: "0".into() };
        assert_eq!(
            err.to_string(),
            "SLUICE_CONTROL_IDLE_TIMEOUT_MS=0: expected a number of milliseconds, at least 1 \
             (default 300000)"
        );
    }
}
