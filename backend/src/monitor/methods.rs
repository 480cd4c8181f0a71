//! The monitor's methods: parameters in, daemon operation, JSON out.

use std::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{code, RpcError, StopRequest};
use crate::config::{DiskParams, ExportParams};
use crate::daemon::{Daemon, MirrorParams};

/// Every method with a one-line description (`rpc_methods` lists them).
pub const METHODS: &[(&str, &str)] = &[
    ("node_add", "open a node held by the monitor: {name, path, read_only?, create_size?}"),
    ("node_remove", "flush and close a node nobody else holds: {name}"),
    ("node_list", "nodes with their holders"),
    ("export_add", "start an export on a node: {name, node, type, socket?|ublk_id?, queues?, queue_depth?, read_only?, serial?, poll_us?}"),
    ("export_remove", "detach an export: {name, mode: \"safe\" (wait for in-flight) | \"force\"}"),
    ("export_list", "exports with their node and counters"),
    ("export_stats", "counters and latency percentiles of one export: {name}"),
    ("job_mirror", "copy a node to a target node while it is served: {node, target, id?, chunk_bytes?, max_in_flight?}"),
    ("job_list", "jobs with their progress"),
    ("job_status", "one job's phase and progress: {id}"),
    ("job_cancel", "stop a job and flush its target: {id}"),
    ("job_complete", "pivot a ready mirror: its exports switch to the target: {id}"),
    ("daemon_stats", "process-wide counters: heap allocations so far"),
    ("rpc_methods", "this list"),
    ("shutdown", "close everything in order and exit"),
];

fn params<T: DeserializeOwned>(v: Value) -> Result<T, RpcError> {
    let v = if v.is_null() { json!({}) } else { v };
    serde_json::from_value(v)
        .map_err(|e| RpcError::new(code::INVALID_PARAMS, format!("invalid params: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveExport {
    name: String,
    #[serde(default)]
    mode: RemoveMode,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RemoveMode {
    #[default]
    Safe,
    Force,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobId {
    id: String,
}

fn invalid(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, e.to_string())
}

/// Runs `method`.
pub fn call(
    method: &str,
    p: Value,
    daemon: &Daemon,
    stop: &mpsc::Sender<StopRequest>,
) -> Result<Value, RpcError> {
    let cwd = std::env::current_dir().map_err(|e| RpcError::new(code::FAILED, e.to_string()))?;
    match method {
        "node_add" => {
            let disk = params::<DiskParams>(p)?.resolve(&cwd).map_err(invalid)?;
            Ok(json!(daemon.add_node(&disk)?))
        }
        "node_remove" => {
            let Named { name } = params(p)?;
            daemon.remove_node(&name)?;
            Ok(json!({"removed": name}))
        }
        "node_list" => {
            params::<NoParams>(p)?;
            Ok(json!(daemon.list_nodes()))
        }
        "export_add" => {
            let export = params::<ExportParams>(p)?
                .resolve(&cwd, None)
                .map_err(invalid)?;
            Ok(daemon.add_export(&export)?)
        }
        "export_remove" => {
            let RemoveExport { name, mode } = params(p)?;
            let totals = daemon.remove_export(&name, mode == RemoveMode::Force)?;
            Ok(json!({"removed": name, "stats": totals}))
        }
        "export_list" => {
            params::<NoParams>(p)?;
            Ok(json!(daemon.list_exports()))
        }
        "export_stats" => {
            let Named { name } = params(p)?;
            Ok(json!(daemon.export_stats(&name)?))
        }
        "job_mirror" => {
            let p: MirrorParams = params(p)?;
            Ok(json!(daemon.start_mirror(&p)?))
        }
        "job_list" => {
            params::<NoParams>(p)?;
            Ok(json!(daemon.list_jobs()))
        }
        "job_status" => {
            let JobId { id } = params(p)?;
            Ok(json!(daemon.job_status(&id)?))
        }
        "job_cancel" => {
            let JobId { id } = params(p)?;
            Ok(json!(daemon.cancel_job(&id)?))
        }
        "job_complete" => {
            let JobId { id } = params(p)?;
            Ok(json!(daemon.complete_job(&id)?))
        }
        "daemon_stats" => {
            params::<NoParams>(p)?;
            Ok(json!({"heap_allocations": crate::alloc::allocations()}))
        }
        "rpc_methods" => Ok(json!(METHODS
            .iter()
            .map(|(m, d)| json!({"method": m, "description": d}))
            .collect::<Vec<_>>())),
        "shutdown" => {
            params::<NoParams>(p)?;
            let _ = stop.send(StopRequest::Monitor);
            Ok(json!({"shutting_down": true}))
        }
        other => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("unknown method {other:?}; rpc_methods lists them"),
        )),
    }
}
