//! `sluice ctl`: the monitor's command-line client. It sends one JSON-RPC
//! request per line and prints a human table, or the JSON result with
//! `--json`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde_json::{json, Value};

/// How long `ctl` waits for an answer (export removal may wait for the
/// drain, bounded by the daemon's own timeouts).
pub const CTL_REPLY_TIMEOUT_MS: u64 = 120_000;

/// A connection to the monitor.
#[derive(Debug)]
pub struct CtlClient {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket could not be reached.
    #[error("control socket {path}: {source} (is sluice running? pass --control PATH)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Talking to it failed.
    #[error("control socket {path}: {reason}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The daemon answered with a JSON-RPC error.
    #[error("{message} (error {code})")]
    Rpc {
        /// JSON-RPC code.
        code: i64,
        /// The daemon's message.
        message: String,
    },
}

impl CtlClient {
    /// Connects to the monitor at `path`.
    pub fn connect(path: &Path) -> Result<Self, CtlError> {
        let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(CTL_REPLY_TIMEOUT_MS)));
        let io = |e: std::io::Error| CtlError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        Ok(CtlClient {
            path: path.to_owned(),
            writer: stream.try_clone().map_err(io)?,
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Calls `method` with `params`; returns the result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CtlError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let io = |reason: String| CtlError::Io {
            path: self.path.clone(),
            reason,
        };
        writeln!(self.writer, "{request}").map_err(|e| io(format!("send: {e}")))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| io(format!("receive: {e}")))?;
        if n == 0 {
            return Err(io("the daemon closed the connection".into()));
        }
        let reply: Value =
            serde_json::from_str(&line).map_err(|e| io(format!("bad reply: {e}")))?;
        if let Some(err) = reply.get("error") {
            return Err(CtlError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_owned(),
            });
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn holders(v: &Value) -> String {
    let list: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(
                    |h| match (h.get("kind").and_then(Value::as_str), h.get("name")) {
                        (Some("monitor"), _) => "monitor".to_owned(),
                        (Some(kind), Some(name)) => format!("{kind} {}", s(name)),
                        _ => h.to_string(),
                    },
                )
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// How often `--wait` asks for a job's progress.
pub const CTL_JOB_POLL_MS: u64 = 200;

/// Polls `job_status` until the job is ready (or failed), drawing a progress
/// bar on stderr when `show` is set. Returns the last status.
pub fn wait_for_job(client: &mut CtlClient, id: &str, show: bool) -> Result<Value, CtlError> {
    let bar = indicatif::ProgressBar::new(0);
    if show {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("job {id}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    loop {
        let st = client.call("job_status", json!({"id": id}))?;
        bar.set_length(st["total_bytes"].as_u64().unwrap_or(0));
        bar.set_position(st["done_bytes"].as_u64().unwrap_or(0));
        match st["phase"].as_str() {
            Some("ready") => {
                bar.finish_with_message(format!("job {id} ready"));
                return Ok(st);
            }
            Some("failed") => {
                bar.abandon_with_message(format!("job {id} failed"));
                return Err(CtlError::Rpc {
                    code: 0,
                    message: format!("job {id} failed: {}", s(&st["error"])),
                });
            }
            _ => std::thread::sleep(Duration::from_millis(CTL_JOB_POLL_MS)),
        }
    }
}

/// Renders a method's result for a person.
pub fn render(method: &str, result: &Value) -> String {
    match method {
        "node_list" => {
            let mut t = table(&["node", "disk", "capacity", "ro", "holders"]);
            for n in result.as_array().into_iter().flatten() {
                t.add_row(vec![
                    s(&n["name"]),
                    s(&n["disk"]),
                    crate::size::HumanBytes(n["capacity_bytes"].as_u64().unwrap_or(0)).to_string(),
                    s(&n["read_only"]),
                    holders(&n["holders"]),
                ]);
            }
            t.to_string()
        }
        "export_list" => {
            let mut t = table(&[
                "export",
                "type",
                "endpoint",
                "node",
                "queues",
                "requests",
                "errors",
                "in flight",
            ]);
            for x in result.as_array().into_iter().flatten() {
                let endpoint = x
                    .get("socket")
                    .or_else(|| x.get("device"))
                    .unwrap_or(&Value::Null);
                t.add_row(vec![
                    s(&x["export"]),
                    s(&x["type"]),
                    s(endpoint),
                    s(&x["node"]),
                    s(&x["queues"]),
                    s(&x["stats"]["requests"]),
                    s(&x["stats"]["errors"]),
                    s(&x["stats"]["in_flight"]),
                ]);
            }
            t.to_string()
        }
        "export_stats" => {
            let st = &result["stats"];
            let lat = &result["latency"];
            let mut t = table(&[
                "export",
                "requests",
                "errors",
                "read",
                "written",
                "flushes",
                "in flight",
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
            ]);
            t.add_row(vec![
                s(&result["name"]),
                s(&st["requests"]),
                s(&st["errors"]),
                crate::size::HumanBytes(st["bytes_read"].as_u64().unwrap_or(0)).to_string(),
                crate::size::HumanBytes(st["bytes_written"].as_u64().unwrap_or(0)).to_string(),
                s(&st["flushes"]),
                s(&st["in_flight"]),
                s(&lat["p50_us"]),
                s(&lat["p99_us"]),
                s(&lat["p999_us"]),
            ]);
            t.to_string()
        }
        "job_list" | "job_status" | "job_mirror" | "job_cancel" | "job_complete" => {
            let jobs = match result {
                Value::Array(a) => a.clone(),
                one => vec![one.clone()],
            };
            let mut t = table(&[
                "job", "type", "source", "target", "phase", "progress", "dirty",
            ]);
            for j in &jobs {
                let (done, total) = (
                    j["done_bytes"].as_u64().unwrap_or(0),
                    j["total_bytes"].as_u64().unwrap_or(0),
                );
                let pct = if total > 0 {
                    done as f64 * 100.0 / total as f64
                } else {
                    100.0
                };
                t.add_row(vec![
                    s(&j["id"]),
                    s(&j["type"]),
                    s(&j["source"]),
                    s(&j["target"]),
                    s(&j["phase"]),
                    format!("{pct:.1}% of {}", crate::size::HumanBytes(total)),
                    crate::size::HumanBytes(j["dirty_bytes"].as_u64().unwrap_or(0)).to_string(),
                ]);
            }
            t.to_string()
        }
        "rpc_methods" => {
            let mut t = table(&["method", "description"]);
            for m in result.as_array().into_iter().flatten() {
                t.add_row(vec![s(&m["method"]), s(&m["description"])]);
            }
            t.to_string()
        }
        _ => serde_json::to_string_pretty(result).unwrap_or_default(),
    }
}
