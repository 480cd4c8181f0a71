//! The monitor's methods: parameters in, daemon operation, JSON out.

use std::path::Path;
use std::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::rpc::{code, RpcError, StopRequest};
use crate::api::{
    DaemonStats, DiskParams, ExportParams, ExportQosParams, ExportRemoveParams, ExportRemoved,
    JobIdParams, MethodInfo, MirrorParams, NameParams, NoParams, NodeRemoved, QosLimits,
    RemoveMode, ShutdownAnswer,
};
use crate::config::{check_qos_group, DiskConfig, ExportConfig};
use crate::daemon::Daemon;

/// Every method with a one-line description (`rpc_methods` lists them).
pub const METHODS: &[(&str, &str)] = &[
    ("node_add", "open a node held by the monitor: {name, path, read_only?, create_size?}"),
    ("node_remove", "flush and close a node nobody else holds: {name}"),
    ("node_reopen", "open a removed node's drive again when the same drive is back at its path; its exports serve it again: {name}"),
    ("node_list", "nodes with their holders"),
    ("export_add", "start an export on a node: {name, node, type, socket?|ublk_id?, queues?, queue_depth?, read_only?, serial?, poll_us?, qos?, qos_group?}"),
    ("export_remove", "detach an export: {name, mode: \"safe\" (wait for in-flight) | \"force\"}"),
    ("export_list", "exports with their node and counters"),
    ("export_stats", "counters and latency percentiles of one export: {name}"),
    ("export_counters", "every export's cumulative per-queue counters (requests, errors, bytes read and written, flushes, in flight) and non-empty latency buckets (upper_ns, count), with the daemon's CLOCK_MONOTONIC ns; rates come from two samples (sluice ctl top)"),
    ("export_qos", "set, lift or read the QoS limits of an export's group (its own unless it is in a named one): {export, group?, qos?: {iops?, read_iops?, write_iops?, bps?, read_bps?, write_bps?, burst_seconds?}, clear?}; qos replaces every limit"),
    ("job_mirror", "copy a node to a target node while it is served: {node, target, id?, chunk_bytes?, max_in_flight?}"),
    ("job_list", "jobs with their progress"),
    ("job_status", "one job's phase and progress: {id}"),
    ("job_cancel", "stop a job and flush its target: {id}"),
    ("job_complete", "pivot a ready mirror: its exports switch to the target: {id}"),
    ("daemon_stats", "process-wide counters: heap allocations so far (the metrics server's apart)"),
    ("events_subscribe", "this connection streams the daemon's events from now on (node_added, node_closed, node_removed, node_reopened, export_added, export_removed, export_stopped, frontend_connected, frontend_disconnected, job_progress, job_ready, job_completed, job_cancelled, job_failed) as JSON-RPC notifications {\"method\": \"event\", \"params\": EVENT} until it closes"),
    ("rpc_methods", "this list"),
    ("shutdown", "close everything in order and exit"),
];

fn params<T: DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v)
        .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("invalid params: {e}")))
}

/// A result as the JSON the monitor answers with.
fn answer(result: &impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(result).map_err(|e| {
        RpcError::new(
            code::FAILED,
            format!("the answer cannot be written as JSON: {e}"),
        )
    })
}

fn invalid(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, e.to_string())
}

/// One monitor call with its parameters parsed and validated: what
/// [`parse_call`] makes of a method name and its params, before the daemon
/// is touched.
#[derive(Debug, Clone)]
pub enum Call {
    /// `node_add`.
    NodeAdd(DiskConfig),
    /// `node_remove`.
    NodeRemove {
        /// Node name.
        name: String,
    },
    /// `node_list`.
    NodeList,
    /// `node_reopen`.
    NodeReopen {
        /// Node name.
        name: String,
    },
    /// `export_add`.
    ExportAdd(ExportConfig),
    /// `export_remove`.
    ExportRemove {
        /// Export name.
        name: String,
        /// `mode: "force"`: do not wait for in-flight requests.
        force: bool,
    },
    /// `export_list`.
    ExportList,
    /// `export_stats`.
    ExportStats {
        /// Export name.
        name: String,
    },
    /// `export_counters`.
    ExportCounters,
    /// `export_qos`.
    ExportQos {
        /// Export name.
        export: String,
        /// Move the export into this group first.
        group: Option<String>,
        /// New limits (`clear`: none); `None`: only read them.
        limits: Option<QosLimits>,
    },
    /// `job_mirror`.
    JobMirror(MirrorParams),
    /// `job_list`.
    JobList,
    /// `job_status`.
    JobStatus {
        /// Job id.
        id: String,
    },
    /// `job_cancel`.
    JobCancel {
        /// Job id.
        id: String,
    },
    /// `job_complete`.
    JobComplete {
        /// Job id.
        id: String,
    },
    /// `daemon_stats`.
    DaemonStats,
    /// `events_subscribe` (the connection then streams events).
    EventsSubscribe,
    /// `rpc_methods`.
    RpcMethods,
    /// `shutdown`.
    Shutdown,
}

impl Call {
    /// The method name this call answers to.
    pub fn method(&self) -> &'static str {
        match self {
            Call::NodeAdd(_) => "node_add",
            Call::NodeRemove { .. } => "node_remove",
            Call::NodeList => "node_list",
            Call::NodeReopen { .. } => "node_reopen",
            Call::ExportAdd(_) => "export_add",
            Call::ExportRemove { .. } => "export_remove",
            Call::ExportList => "export_list",
            Call::ExportStats { .. } => "export_stats",
            Call::ExportCounters => "export_counters",
            Call::ExportQos { .. } => "export_qos",
            Call::JobMirror(_) => "job_mirror",
            Call::JobList => "job_list",
            Call::JobStatus { .. } => "job_status",
            Call::JobCancel { .. } => "job_cancel",
            Call::JobComplete { .. } => "job_complete",
            Call::DaemonStats => "daemon_stats",
            Call::EventsSubscribe => "events_subscribe",
            Call::RpcMethods => "rpc_methods",
            Call::Shutdown => "shutdown",
        }
    }
}

/// Parses and validates `method` with its params (an object, or null for
/// none); relative paths are taken from `cwd`. Pure: no daemon, no I/O.
pub fn parse_call(method: &str, p: Value, cwd: &Path) -> Result<Call, RpcError> {
    Ok(match method {
        "node_add" => Call::NodeAdd(params::<DiskParams>(p)?.resolve(cwd).map_err(invalid)?),
        "node_remove" => {
            let NameParams { name } = params(p)?;
            Call::NodeRemove { name }
        }
        "node_list" => {
            params::<NoParams>(p)?;
            Call::NodeList
        }
        "node_reopen" => {
            let NameParams { name } = params(p)?;
            Call::NodeReopen { name }
        }
        "export_add" => Call::ExportAdd(
            params::<ExportParams>(p)?
                .resolve(cwd, None)
                .map_err(invalid)?,
        ),
        "export_remove" => {
            let ExportRemoveParams { name, mode } = params(p)?;
            Call::ExportRemove {
                name,
                force: mode == RemoveMode::Force,
            }
        }
        "export_list" => {
            params::<NoParams>(p)?;
            Call::ExportList
        }
        "export_stats" => {
            let NameParams { name } = params(p)?;
            Call::ExportStats { name }
        }
        "export_counters" => {
            params::<NoParams>(p)?;
            Call::ExportCounters
        }
        "export_qos" => {
            let ExportQosParams {
                export,
                group,
                qos,
                clear,
            } = params(p)?;
            if let Some(g) = &group {
                check_qos_group(g).map_err(invalid)?;
            }
            let limits = match (qos, clear) {
                (Some(_), true) => {
                    return Err(invalid(
                        "give either qos (new limits) or clear (no limits), not both",
                    ))
                }
                (Some(q), false) => Some(q.resolve().map_err(invalid)?),
                (None, true) => Some(QosLimits::default()),
                (None, false) => None,
            };
            Call::ExportQos {
                export,
                group,
                limits,
            }
        }
        "job_mirror" => Call::JobMirror(params(p)?),
        "job_list" => {
            params::<NoParams>(p)?;
            Call::JobList
        }
        "job_status" => {
            let JobIdParams { id } = params(p)?;
            Call::JobStatus { id }
        }
        "job_cancel" => {
            let JobIdParams { id } = params(p)?;
            Call::JobCancel { id }
        }
        "job_complete" => {
            let JobIdParams { id } = params(p)?;
            Call::JobComplete { id }
        }
        "daemon_stats" => {
            params::<NoParams>(p)?;
            Call::DaemonStats
        }
        "rpc_methods" => Call::RpcMethods,
        "events_subscribe" => {
            params::<NoParams>(p)?;
            Call::EventsSubscribe
        }
        "shutdown" => {
            params::<NoParams>(p)?;
            Call::Shutdown
        }
        other => {
            return Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!("unknown method {other:?}; rpc_methods lists them"),
            ))
        }
    })
}

/// Runs a parsed call on the daemon.
pub(super) fn run(
    call: Call,
    daemon: &Daemon,
    stop: &mpsc::Sender<StopRequest>,
) -> Result<Value, RpcError> {
    match call {
        Call::NodeAdd(disk) => answer(&daemon.add_node(&disk)?),
        Call::NodeRemove { name } => {
            daemon.remove_node(&name)?;
            answer(&NodeRemoved { removed: name })
        }
        Call::NodeList => answer(&daemon.list_nodes()),
        Call::NodeReopen { name } => answer(&daemon.reopen_node(&name)?),
        Call::ExportAdd(export) => answer(&daemon.add_export(&export)?),
        Call::ExportRemove { name, force } => {
            let stats = daemon.remove_export(&name, force)?;
            answer(&ExportRemoved {
                removed: name,
                stats,
            })
        }
        Call::ExportList => answer(&daemon.list_exports()),
        Call::ExportStats { name } => answer(&daemon.export_stats(&name)?),
        Call::ExportCounters => answer(&daemon.export_counters()),
        Call::ExportQos {
            export,
            group,
            limits,
        } => answer(&daemon.export_qos(&export, group.as_deref(), limits.as_ref())?),
        Call::JobMirror(p) => answer(&daemon.start_mirror(&p)?),
        Call::JobList => answer(&daemon.list_jobs()),
        Call::JobStatus { id } => answer(&daemon.job_status(&id)?),
        Call::JobCancel { id } => answer(&daemon.cancel_job(&id)?),
        Call::JobComplete { id } => answer(&daemon.complete_job(&id)?),
        Call::DaemonStats => answer(&DaemonStats {
            heap_allocations: crate::alloc::allocations(),
            metrics_heap_allocations: crate::alloc::metrics_allocations(),
        }),
        // The connection handler streams the events once this answer is out.
        Call::EventsSubscribe => Ok(json!({"subscribed": true})),
        Call::RpcMethods => answer(
            &METHODS
                .iter()
                .map(|(method, description)| MethodInfo {
                    method: (*method).to_owned(),
                    description: (*description).to_owned(),
                })
                .collect::<Vec<_>>(),
        ),
        Call::Shutdown => {
            let _ = stop.send(StopRequest::Monitor);
            answer(&ShutdownAnswer {
                shutting_down: true,
            })
        }
    }
}

/// Runs `method`: [`parse_call`] in the daemon's working directory, then
/// [`run`].
pub(super) fn call(
    method: &str,
    p: Value,
    daemon: &Daemon,
    stop: &mpsc::Sender<StopRequest>,
) -> Result<Value, RpcError> {
    let cwd = std::env::current_dir().map_err(|e| RpcError::new(code::FAILED, e.to_string()))?;
    run(parse_call(method, p, &cwd)?, daemon, stop)
}
