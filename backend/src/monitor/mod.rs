//! The monitor: JSON-RPC 2.0 over a UNIX socket, one request per line (the
//! convention of SPDK's and QEMU's monitors). `sluice ctl` is its client.
//!
//! Every client gets its own thread (at most `MAX_CONTROL_CLIENTS`); a
//! malformed request gets a JSON-RPC error and the connection goes on; a
//! client that hangs up mid-request harms nothing (the operation finishes,
//! its answer is dropped).

mod methods;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use serde_json::{json, Value};

use crate::daemon::{Daemon, OpError};

pub use methods::{parse_call, Call, METHODS};

/// Most monitor clients served at once.
pub const MAX_CONTROL_CLIENTS: usize = 16;
/// Longest request line accepted.
pub const MAX_CONTROL_REQUEST_BYTES: u64 = 64 * 1024;

/// JSON-RPC 2.0 error codes.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Wrong parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The operation failed.
    pub const FAILED: i64 = -32000;
    /// The named node, export or job does not exist.
    pub const NOT_FOUND: i64 = -32001;
    /// The request conflicts with the current state (in use, name taken).
    pub const CONFLICT: i64 = -32002;
    /// The daemon is shutting down.
    pub const SHUTTING_DOWN: i64 = -32003;
}

/// Why the daemon should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The monitor's `shutdown` method.
    Monitor,
}

/// The default control socket: `$RUNTIME_DIRECTORY`, else
/// `$XDG_RUNTIME_DIR/sluice`, else `/run/sluice`, then `control.sock`.
pub fn default_control_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        return Path::new(&dir).join("control.sock");
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run"));
    base.join("sluice").join("control.sock")
}

/// A JSON-RPC error: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC code.
    pub code: i64,
    /// What went wrong and what to do.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

impl From<OpError> for RpcError {
    fn from(e: OpError) -> Self {
        let c = match e {
            OpError::NotFound(_) => code::NOT_FOUND,
            OpError::Conflict(_) => code::CONFLICT,
            OpError::Invalid(_) => code::INVALID_PARAMS,
            OpError::Failed(_) => code::FAILED,
            OpError::ShuttingDown => code::SHUTTING_DOWN,
        };
        RpcError::new(c, e.to_string())
    }
}

/// The running control socket.
#[derive(Debug)]
pub struct Monitor {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Binds `path` (mode 0600; a stale socket is replaced, a live one is
    /// refused) and serves it.
    pub fn start(
        path: &Path,
        daemon: Arc<Daemon>,
        stop: mpsc::Sender<StopRequest>,
    ) -> Result<Monitor, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "control socket {}: cannot create {}: {e}",
                    path.display(),
                    dir.display()
                )
            })?;
        }
        let listener = bind(path)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("monitor".into())
                .spawn(move || accept_loop(listener, daemon, stop, stopping))
                .map_err(|e| format!("control socket: cannot spawn thread: {e}"))?
        };
        Ok(Monitor {
            path: path.to_owned(),
            stopping,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept() with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bind(path: &Path) -> Result<UnixListener, String> {
    let err = |r: String| format!("control socket {}: {r}", path.display());
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err(
                "busy: another sluice serves it; pass --control PATH".into()
            ));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot set mode 600: {e}")))?;
    Ok(listener)
}

fn accept_loop(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    stop: mpsc::Sender<StopRequest>,
    stopping: Arc<AtomicBool>,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut conn) = conn else { continue };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CONTROL_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let reply = error_response(
                Value::Null,
                RpcError::new(
                    code::FAILED,
                    format!("too many monitor clients (at most {MAX_CONTROL_CLIENTS})"),
                ),
            );
            let _ = writeln!(conn, "{reply}");
            continue;
        }
        let (daemon, stop, clients) = (daemon.clone(), stop.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("monitor-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(conn, &daemon, &stop) {
                    tracing::debug!("monitor client ended: {e}");
                }
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("monitor: cannot spawn a client thread");
        }
    }
}

fn serve_client(
    conn: UnixStream,
    daemon: &Daemon,
    stop: &mpsc::Sender<StopRequest>,
) -> io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take(MAX_CONTROL_REQUEST_BYTES)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 == MAX_CONTROL_REQUEST_BYTES {
            let reply = error_response(
                Value::Null,
                RpcError::new(
                    code::INVALID_REQUEST,
                    format!("request longer than {MAX_CONTROL_REQUEST_BYTES} bytes"),
                ),
            );
            writeln!(writer, "{reply}")?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        if let Some(reply) = handle_line(line.trim(), daemon, stop) {
            writeln!(writer, "{reply}")?;
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
