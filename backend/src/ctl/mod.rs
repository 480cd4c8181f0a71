//! `sluice ctl`: the monitor's command-line client. It sends one JSON-RPC
//! request per line and prints a human table, or the JSON result with
//! `--json`. Requests are built from the [`api`](crate::api) params and
//! answers read into its result types.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::{
    DaemonStats, ExportDescription, ExportEndpoint, ExportInfo, ExportRemoved, ExportStats,
    JobIdParams, JobPhase, JobStatus, MethodInfo, NodeInfo, NodeRemoved, ShutdownAnswer,
};
use crate::graph::Holder;

pub mod top;

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
        #[source]
        source: std::io::Error,
    },
    /// The connection could not be duplicated for reading and writing.
    #[error("control socket {path}: {source}")]
    Clone {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A request's params do not serialize.
    #[error("control socket {path}: params of {method}: {source}")]
    Params {
        /// The socket.
        path: PathBuf,
        /// The method called.
        method: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Sending the request failed.
    #[error("control socket {path}: send: {source}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the reply failed (or timed out).
    #[error("control socket {path}: receive: {source}")]
    Receive {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon hung up before it answered.
    #[error("control socket {path}: the daemon closed the connection")]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The reply is not JSON.
    #[error("control socket {path}: bad reply: {source}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon answered with a JSON-RPC error.
    #[error("{message} (error {code})")]
    Rpc {
        /// JSON-RPC code.
        code: i64,
        /// The daemon's message.
        message: String,
    },
    /// The daemon's result is not what the method returns.
    #[error("unexpected answer to {method} from {path}: {source}")]
    Answer {
        /// The method called.
        method: String,
        /// The socket.
        path: PathBuf,
        /// Why it does not read as the method's result.
        #[source]
        source: serde_json::Error,
    },
    /// The job `--wait` watched failed.
    #[error("job {id} failed: {} (error 0)", error.as_deref().unwrap_or("-"))]
    JobFailed {
        /// The job.
        id: String,
        /// The job's error, as the daemon reports it.
        error: Option<String>,
    },
}

/// Reads `result`, the daemon at `path`'s answer to `method`, as `R`.
pub fn read_answer<R: DeserializeOwned>(
    method: &str,
    path: &Path,
    result: &Value,
) -> Result<R, CtlError> {
    R::deserialize(result).map_err(|source| CtlError::Answer {
        method: method.to_owned(),
        path: path.to_owned(),
        source,
    })
}

impl CtlClient {
    /// Connects to the monitor at `path`.
    pub fn connect(path: &Path) -> Result<Self, CtlError> {
        let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(CTL_REPLY_TIMEOUT_MS)));
        let writer = stream.try_clone().map_err(|source| CtlError::Clone {
            path: path.to_owned(),
            source,
        })?;
        Ok(CtlClient {
            path: path.to_owned(),
            writer,
            reader: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// How long a reply may take (default `CTL_REPLY_TIMEOUT_MS`).
    pub fn set_reply_timeout(&self, timeout: Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(timeout));
    }

    /// The next notification the daemon sends (after `events_subscribe`):
    /// its params; `None` when the daemon closed the connection.
    pub fn next_notification(&mut self) -> Result<Option<Value>, CtlError> {
        Ok(self
            .read_message()?
            .map(|note| note.get("params").cloned().unwrap_or(Value::Null)))
    }

    /// The daemon's next line as JSON; `None` when it closed the connection.
    fn read_message(&mut self) -> Result<Option<Value>, CtlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| CtlError::Receive {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|source| CtlError::BadReply {
                path: self.path.clone(),
                source,
            })
    }

    /// Calls `method` with `params`; returns the result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CtlError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.writer, "{request}").map_err(|source| CtlError::Send {
            path: self.path.clone(),
            source,
        })?;
        let Some(reply) = self.read_message()? else {
            return Err(CtlError::Closed {
                path: self.path.clone(),
            });
        };
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

    /// Calls `method` with typed `params`; returns the result as it came.
    pub fn call_with(&mut self, method: &str, params: &impl Serialize) -> Result<Value, CtlError> {
        let params = serde_json::to_value(params).map_err(|source| CtlError::Params {
            path: self.path.clone(),
            method: method.to_owned(),
            source,
        })?;
        self.call(method, params)
    }

    /// Reads `result`, this daemon's answer to `method`, as `R`.
    pub fn read_answer<R: DeserializeOwned>(
        &self,
        method: &str,
        result: &Value,
    ) -> Result<R, CtlError> {
        read_answer(method, &self.path, result)
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// A latency in µs as the JSON has it (`-` for one beyond every bucket,
/// which JSON writes as `null`).
fn micros(us: f64) -> String {
    match Value::from(us) {
        Value::Null => "-".into(),
        n => n.to_string(),
    }
}

fn holders(list: &[Holder]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    let names: Vec<String> = list
        .iter()
        .map(|h| match h {
            Holder::Monitor => "monitor".to_owned(),
            Holder::Export(name) => format!("export {name}"),
            Holder::Job(name) => format!("job {name}"),
        })
        .collect();
    names.join(", ")
}

/// How often `--wait` asks for a job's progress.
pub const CTL_JOB_POLL_MS: u64 = 200;

/// Polls `job_status` until the job is ready (or failed), drawing a progress
/// bar on stderr when `show` is set. Returns the last status as it came.
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
    let params = JobIdParams { id: id.to_owned() };
    loop {
        let raw = client.call_with("job_status", &params)?;
        let st: JobStatus = client.read_answer("job_status", &raw)?;
        bar.set_length(st.total_bytes);
        bar.set_position(st.done_bytes);
        match st.phase {
            JobPhase::Ready => {
                bar.finish_with_message(format!("job {id} ready"));
                return Ok(raw);
            }
            JobPhase::Failed => {
                bar.abandon_with_message(format!("job {id} failed"));
                return Err(CtlError::JobFailed {
                    id: id.to_owned(),
                    error: st.error,
                });
            }
            JobPhase::Running => std::thread::sleep(Duration::from_millis(CTL_JOB_POLL_MS)),
        }
    }
}

fn jobs_table(jobs: &[JobStatus]) -> String {
    let mut t = table(&[
        "job", "type", "source", "target", "phase", "progress", "dirty",
    ]);
    for j in jobs {
        let pct = if j.total_bytes > 0 {
            j.done_bytes as f64 * 100.0 / j.total_bytes as f64
        } else {
            100.0
        };
        t.add_row(vec![
            j.id.clone(),
            j.kind.clone(),
            j.source.clone(),
            j.target.clone(),
            j.phase.as_str().to_owned(),
            format!("{pct:.1}% of {}", crate::size::HumanBytes(j.total_bytes)),
            crate::size::HumanBytes(j.dirty_bytes).to_string(),
        ]);
    }
    t.to_string()
}

/// A result shown as its JSON, once it reads as a `T` (what `method`
/// answers).
fn json_as<T: DeserializeOwned>(
    method: &str,
    path: &Path,
    result: &Value,
) -> Result<String, CtlError> {
    read_answer::<T>(method, path, result)?;
    Ok(serde_json::to_string_pretty(result).unwrap_or_default())
}

/// One event (`sluice ctl events`) as a line for a person.
pub fn render_event(event: &Value) -> String {
    match serde_json::from_value::<crate::api::Event>(event.clone()) {
        Ok(crate::api::Event::NodeRemoved {
            node,
            device,
            exports,
        }) => format!(
            "node_removed: node {node} ({device}): its drive was removed; exports failing: {}",
            if exports.is_empty() {
                "none".to_owned()
            } else {
                exports.join(", ")
            }
        ),
        Ok(crate::api::Event::NodeReopened { node, exports }) => format!(
            "node_reopened: node {node}: its drive is back; exports serving it again: {}",
            if exports.is_empty() {
                "none".to_owned()
            } else {
                exports.join(", ")
            }
        ),
        Ok(crate::api::Event::ExportStopped { export, reason }) => {
            format!("export_stopped: export {export}: {reason}")
        }
        Ok(crate::api::Event::NodeAdded {
            node,
            disk,
            capacity_bytes,
        }) => format!(
            "node_added: node {node} ({disk}, {})",
            crate::size::HumanBytes(capacity_bytes)
        ),
        Ok(crate::api::Event::NodeClosed { node }) => {
            format!("node_closed: node {node}: flushed and closed")
        }
        Ok(crate::api::Event::ExportAdded {
            export,
            node,
            endpoint,
        }) => format!(
            "export_added: export {export} on node {node}: {}",
            match endpoint {
                ExportEndpoint::VhostUser { socket } => format!("vhost-user {}", socket.display()),
                ExportEndpoint::Ublk { device, .. } => format!("ublk {}", device.display()),
            }
        ),
        Ok(crate::api::Event::ExportRemoved { export, node }) => {
            format!("export_removed: export {export} (node {node})")
        }
        Ok(crate::api::Event::FrontendConnected { export }) => {
            format!("frontend_connected: export {export}: a vhost-user frontend connected")
        }
        Ok(crate::api::Event::FrontendDisconnected { export, error }) => match error {
            None => format!("frontend_disconnected: export {export}: the frontend left"),
            Some(e) => format!("frontend_disconnected: export {export}: {e}"),
        },
        Ok(crate::api::Event::JobProgress {
            job,
            done_bytes,
            total_bytes,
            dirty_bytes,
        }) => format!(
            "job_progress: job {job}: {} of {} in sync, {} dirty",
            crate::size::HumanBytes(done_bytes),
            crate::size::HumanBytes(total_bytes),
            crate::size::HumanBytes(dirty_bytes)
        ),
        Ok(crate::api::Event::JobReady { job, total_bytes }) => format!(
            "job_ready: job {job}: {} in sync; job-complete pivots",
            crate::size::HumanBytes(total_bytes)
        ),
        Ok(crate::api::Event::JobCompleted {
            job,
            source,
            target,
            exports,
        }) => format!(
            "job_completed: job {job}: exports {} moved from node {source} to node {target}",
            if exports.is_empty() {
                "none".to_owned()
            } else {
                exports.join(", ")
            }
        ),
        Ok(crate::api::Event::JobCancelled { job }) => format!("job_cancelled: job {job}"),
        Ok(crate::api::Event::JobFailed { job, error }) => {
            format!("job_failed: job {job}: {error}")
        }
        // A newer daemon's event: as it came.
        Err(_) => event.to_string(),
    }
}

/// QoS limits in one line: `iops 5000, bps 200M, burst 0.1 s (group g)`,
/// or `no limits`.
fn qos_text(q: &crate::api::QosLimits) -> String {
    let mut parts = Vec::new();
    for (key, v) in [
        ("iops", q.iops),
        ("read_iops", q.read_iops),
        ("write_iops", q.write_iops),
    ] {
        if let Some(v) = v {
            parts.push(format!("{key} {v}"));
        }
    }
    for (key, v) in [
        ("bps", q.bps),
        ("read_bps", q.read_bps),
        ("write_bps", q.write_bps),
    ] {
        if let Some(v) = v {
            parts.push(format!("{key} {}", crate::size::HumanBytes(v)));
        }
    }
    if let Some(b) = q.burst_seconds {
        parts.push(format!("burst {b} s"));
    }
    let mut text = if parts.is_empty() {
        "no limits".to_owned()
    } else {
        parts.join(", ")
    };
    if let Some(g) = &q.group {
        text.push_str(&format!(" (group {g})"));
    }
    text
}

/// Renders a method's result, the daemon at `path`'s answer, for a person:
/// a table, or the JSON for answers that are not lists. A result that is not
/// what the method returns is an error.
pub fn render(method: &str, result: &Value, path: &Path) -> Result<String, CtlError> {
    let pretty = || serde_json::to_string_pretty(result).unwrap_or_default();
    Ok(match method {
        "node_list" => {
            let nodes: Vec<NodeInfo> = read_answer(method, path, result)?;
            let mut t = table(&["node", "disk", "capacity", "ro", "state", "holders"]);
            for n in &nodes {
                t.add_row(vec![
                    n.name.clone(),
                    n.disk.clone(),
                    crate::size::HumanBytes(n.capacity_bytes).to_string(),
                    n.read_only.to_string(),
                    match n.state {
                        crate::api::NodeState::Open => "open",
                        crate::api::NodeState::Removed => "removed",
                    }
                    .to_owned(),
                    holders(&n.holders),
                ]);
            }
            t.to_string()
        }
        "export_list" => {
            let exports: Vec<ExportInfo> = read_answer(method, path, result)?;
            let mut t = table(&[
                "export",
                "type",
                "endpoint",
                "node",
                "queues",
                "requests",
                "errors",
                "in flight",
                "qos",
            ]);
            for x in &exports {
                let d = &x.description;
                let (kind, endpoint) = match &d.endpoint {
                    ExportEndpoint::VhostUser { socket } => ("vhost-user", socket.display()),
                    ExportEndpoint::Ublk { device, .. } => ("ublk", device.display()),
                };
                t.add_row(vec![
                    d.export.clone(),
                    kind.to_owned(),
                    endpoint.to_string(),
                    x.node.clone(),
                    d.queues.to_string(),
                    x.stats.requests.to_string(),
                    x.stats.errors.to_string(),
                    x.stats.in_flight.to_string(),
                    x.qos.as_ref().map(qos_text).unwrap_or_else(|| "-".into()),
                ]);
            }
            t.to_string()
        }
        "export_qos" => {
            let limits: crate::api::QosLimits = read_answer(method, path, result)?;
            qos_text(&limits)
        }
        "export_stats" => {
            let ExportStats {
                name,
                stats: st,
                latency: lat,
                ..
            } = read_answer(method, path, result)?;
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
                name,
                st.requests.to_string(),
                st.errors.to_string(),
                crate::size::HumanBytes(st.bytes_read).to_string(),
                crate::size::HumanBytes(st.bytes_written).to_string(),
                st.flushes.to_string(),
                st.in_flight.to_string(),
                micros(lat.p50_us),
                micros(lat.p99_us),
                micros(lat.p999_us),
            ]);
            t.to_string()
        }
        "job_list" => jobs_table(&read_answer::<Vec<JobStatus>>(method, path, result)?),
        "job_status" | "job_mirror" | "job_cancel" | "job_complete" => {
            jobs_table(&[read_answer::<JobStatus>(method, path, result)?])
        }
        "rpc_methods" => {
            let methods: Vec<MethodInfo> = read_answer(method, path, result)?;
            let mut t = table(&["method", "description"]);
            for m in methods {
                t.add_row(vec![m.method, m.description]);
            }
            t.to_string()
        }
        // Shown as the JSON they are, once they read as what they should be.
        "node_add" | "node_reopen" => json_as::<NodeInfo>(method, path, result)?,
        "node_remove" => json_as::<NodeRemoved>(method, path, result)?,
        "export_add" => json_as::<ExportDescription>(method, path, result)?,
        "export_remove" => json_as::<ExportRemoved>(method, path, result)?,
        "daemon_stats" => json_as::<DaemonStats>(method, path, result)?,
        "shutdown" => json_as::<ShutdownAnswer>(method, path, result)?,
        _ => pretty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_socket_and_keep_their_cause() {
        let path = Path::new("/run/s/control.sock");
        let err = read_answer::<Vec<NodeInfo>>("node_list", path, &json!({"x": 1})).unwrap_err();
        assert!(matches!(err, CtlError::Answer { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            err.to_string(),
            "unexpected answer to node_list from /run/s/control.sock: invalid type: map, \
             expected a sequence"
        );
        let err =
            CtlClient::connect(&std::env::temp_dir().join("sluice-no-such.sock")).unwrap_err();
        assert!(matches!(err, CtlError::Connect { .. }), "{err:?}");
        assert!(err
            .to_string()
            .ends_with("(is sluice running? pass --control PATH)"));
        let err = CtlError::JobFailed {
            id: "m0".into(),
            error: Some("read error".into()),
        };
        assert_eq!(err.to_string(), "job m0 failed: read error (error 0)");
        let err = CtlError::JobFailed {
            id: "m0".into(),
            error: None,
        };
        assert_eq!(err.to_string(), "job m0 failed: - (error 0)");
    }
}
