//! The daemon's state: the block graph, the exports and the jobs, the
//! operations the monitor runs on them, and close-all (drain, detach,
//! release, flush, cancel). The process around it (signals, readiness) is
//! `lifecycle.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::api::{
    CountersSample, Event, ExportDescription, ExportInfo, ExportStats, MirrorParams, NodeInfo,
    QosLimits,
};
use crate::config::{DiskConfig, ExportConfig, ServeConfig};
use crate::events::Events;
use crate::export::vhost_user::VhostUserExport;
use crate::export::{
    start_export, DrainBounds, Export, ExportTotals, LatencyHistogram, QueueSnapshot,
};
use crate::graph::{flush_bounded, Graph, GraphError, Holder};
use crate::jobs::{JobStatus, MirrorJob, MIRROR_CHUNK_BYTES, MIRROR_MAX_IN_FLIGHT};
use crate::limits::{
    CLOSE_ALL_TIMEOUT_MS, DRAIN_TIMEOUT_MS, EMERGENCY_FLUSH_TIMEOUT_MS, FLUSH_TIMEOUT_MS,
    JOB_CANCEL_TIMEOUT_MS,
};
use crate::node::{DiskSpec, Node};
use crate::qos::{ExportQos, QosGroup};

/// Why the daemon could not start: the first node or export that failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StartError(#[from] pub OpError);

/// A running daemon: the block graph, the exports, and the jobs. The monitor
/// and the signal handler work on it through `&self`; the state sits behind
/// one mutex that only the control plane takes.
#[derive(Debug)]
pub struct Daemon {
    state: Mutex<State>,
    /// Set once close-all begins: the monitor refuses changes from then on.
    closing: AtomicBool,
    /// Undoing a failed start: close-all logs its steps at debug level, and
    /// leaves the ublk devices this start took over waiting for the next
    /// server instead of removing them.
    undoing_start: AtomicBool,
    /// What close-all is waiting for, for a second signal to report.
    pending: Mutex<Pending>,
    /// Every node ever opened, so that a second signal can flush what is
    /// still open without the state lock (close-all may hold it).
    opened: Mutex<Vec<Weak<Node>>>,
    /// Clients streaming events (`events_subscribe`); a closed one is
    /// dropped at the next event. Shared with the exports' connection
    /// threads and the jobs' copiers.
    events: Events,
}

/// What one metrics scrape reads ([`Daemon::metrics_samples`]).
#[derive(Debug)]
pub(crate) struct MetricsSamples {
    pub exports: Vec<ExportSample>,
    pub nodes: Vec<NodeSample>,
    pub jobs: Vec<JobStatus>,
}

/// One export's counters at a scrape.
#[derive(Debug)]
pub(crate) struct ExportSample {
    pub name: String,
    /// `vhost-user` or `ublk`.
    pub kind: &'static str,
    /// The node it serves now.
    pub node: String,
    /// Per queue, in queue order.
    pub queues: Vec<QueueSnapshot>,
    /// Summed over its queues.
    pub latency: LatencyHistogram,
}

/// One node at a scrape.
#[derive(Debug)]
pub(crate) struct NodeSample {
    pub name: String,
    /// Its drive went away.
    pub removed: bool,
    pub capacity_bytes: u64,
}

/// The close-all step under way and what it still waits for.
#[derive(Debug, Default)]
struct Pending {
    step: &'static str,
    items: std::collections::BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    graph: Graph,
    exports: BTreeMap<String, Export>,
    /// Export names being added or removed right now: reserved, so two
    /// monitor clients cannot race on one name.
    exports_busy: std::collections::BTreeSet<String>,
    jobs: BTreeMap<String, MirrorJob>,
    next_job: u64,
    /// Each export's `on_removed` policy.
    on_removed: BTreeMap<String, crate::api::OnRemoved>,
    /// Nodes to reopen by themselves when their removed drive comes back.
    reattach: std::collections::BTreeSet<String>,
    /// Named QoS groups, held by their exports (a group none is in goes).
    qos_groups: BTreeMap<String, Weak<QosGroup>>,
}

impl State {
    /// The named QoS group `name`, made without limits if none is in it.
    fn qos_group(&mut self, name: &str) -> Arc<QosGroup> {
        self.qos_groups.retain(|_, g| g.strong_count() > 0);
        if let Some(g) = self.qos_groups.get(name).and_then(Weak::upgrade) {
            return g;
        }
        let g = Arc::new(QosGroup::new(Some(name.to_owned())));
        self.qos_groups.insert(name.to_owned(), Arc::downgrade(&g));
        g
    }
}

impl State {
    /// The exports serving node `name`.
    fn exports_of(&self, name: &str) -> impl Iterator<Item = &Export> {
        let name = name.to_owned();
        self.exports
            .values()
            .filter(move |x| x.node().name() == name)
    }
}

/// Why a control operation failed. [`OpError::kind`] sorts them into what
/// the monitor answers (one JSON-RPC code each).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No export has that name.
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    /// No job has that id.
    #[error("no job named {0:?}")]
    NoSuchJob(String),
    /// The export name is taken.
    #[error("an export named {0:?} already exists")]
    ExportExists(String),
    /// Another client is adding or removing that export.
    #[error("export {0:?} is being added or removed right now")]
    ExportBusy(String),
    /// Another export serves that socket.
    #[error("socket {} is export {export}'s socket; choose another path", socket.display())]
    SocketTaken {
        /// The socket asked for.
        socket: PathBuf,
        /// The export that has it.
        export: String,
    },
    /// The job id is taken.
    #[error("a job named {0:?} already exists")]
    JobExists(String),
    /// `job_complete` before the job is ready.
    #[error("job {id:?} is not ready yet ({done_bytes} of {total_bytes} bytes in sync)")]
    JobNotReady {
        /// The job.
        id: String,
        /// Bytes in sync.
        done_bytes: u64,
        /// Bytes to copy.
        total_bytes: u64,
    },
    /// A pivot could not pause an export of the source.
    #[error("export {export} did not drain: queues {queues:?} busy")]
    NotDrained {
        /// The export.
        export: String,
        /// Its queues that stayed busy.
        queues: Vec<usize>,
    },
    /// An image file could not be created.
    #[error("create image {}: {source}", path.display())]
    CreateImage {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The block graph refused (no such node, name taken, in use).
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// A node could not be opened.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// An export could not start or stop.
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    /// A job could not start, complete or cancel.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// A node's flush failed.
    #[error(transparent)]
    Flush(#[from] crate::graph::FlushError),
    /// `node_reopen` of a node whose drive was not removed.
    #[error("node {0:?} is not removed: nothing to reopen")]
    NotRemoved(String),
    /// `node_reopen` of a node a job holds.
    #[error("node {node:?} is held by job {job}: cancel the job first")]
    NodeInJob {
        /// The node.
        node: String,
        /// The job.
        job: String,
    },
    /// The removed drive is not back.
    #[error(
        "node {node:?}: its drive is not back (nothing at {path}, and no block device has its \
         serial)"
    )]
    DriveNotBack {
        /// The node.
        node: String,
        /// Its path.
        path: String,
    },
    /// The drive at the node's path is another one.
    #[error(
        "node {node:?}: the drive now at {path} is not the one that was removed (serial, size \
         or block size differ); add it as a new node (node-add) and mirror onto it instead"
    )]
    NotTheSameDrive {
        /// The node.
        node: String,
        /// Its path.
        path: String,
    },
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// What kind of failure an [`OpError`] is, for the monitor's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpErrorKind {
    /// The request names something that does not exist.
    NotFound,
    /// The request conflicts with the current state (name taken, in use).
    Conflict,
    /// The request's parameters are wrong.
    Invalid,
    /// The operation was attempted and failed.
    Failed,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl OpError {
    /// What kind of failure this is.
    pub fn kind(&self) -> OpErrorKind {
        use crate::jobs::JobError;
        match self {
            OpError::NoSuchExport(_)
            | OpError::NoSuchJob(_)
            | OpError::Graph(GraphError::NoSuchNode(_)) => OpErrorKind::NotFound,
            OpError::ExportExists(_)
            | OpError::NotRemoved(_)
            | OpError::NodeInJob { .. }
            | OpError::NotTheSameDrive { .. }
            | OpError::DriveNotBack { .. }
            | OpError::ExportBusy(_)
            | OpError::SocketTaken { .. }
            | OpError::JobExists(_)
            | OpError::JobNotReady { .. }
            | OpError::Graph(_) => OpErrorKind::Conflict,
            OpError::Job(
                JobError::OntoItself
                | JobError::ChunkBytes(_)
                | JobError::MaxInFlight(_)
                | JobError::TargetTooSmall { .. }
                | JobError::TargetReadOnly(_),
            ) => OpErrorKind::Invalid,
            OpError::ShuttingDown => OpErrorKind::ShuttingDown,
            OpError::NotDrained { .. }
            | OpError::CreateImage { .. }
            | OpError::Node(_)
            | OpError::Export(_)
            | OpError::Job(_)
            | OpError::Flush(_) => OpErrorKind::Failed,
        }
    }
}

/// Image files a start created, removed again (on drop) unless the start
/// succeeds to the end and calls [`CreatedFiles::keep`].
#[derive(Debug, Default)]
pub struct CreatedFiles(Vec<PathBuf>);

impl CreatedFiles {
    /// The start succeeded: the images stay.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn create_image_if_missing(disk: &DiskConfig, created: &mut CreatedFiles) -> Result<(), OpError> {
    let (Some(size), DiskSpec::Path(path)) = (disk.create_size_bytes, &disk.spec) else {
        return Ok(());
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => {
            created.0.push(path.clone());
            f.set_len(size).map_err(|source| OpError::CreateImage {
                path: path.clone(),
                source,
            })?;
            tracing::info!("created sparse image {} ({} bytes)", path.display(), size);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(OpError::CreateImage {
            path: path.clone(),
            source,
        }),
    }
}

impl Daemon {
    /// Opens every node and starts every export. On failure everything
    /// already started is stopped again and images this call created are
    /// removed: nothing half-created is left behind. On success the images
    /// it created come back too: the caller keeps them once the rest of its
    /// start-up (the control socket) has worked, or drops them after
    /// close-all if it fails.
    pub fn start(config: &ServeConfig) -> Result<(Arc<Daemon>, CreatedFiles), StartError> {
        let daemon = Arc::new(Daemon {
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
            undoing_start: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            opened: Mutex::new(Vec::new()),
            events: Events::default(),
        });
        let mut created = CreatedFiles::default();
        let result = (|| {
            for disk in &config.disks {
                let read_only = config.disk_read_only(disk);
                daemon.open_node(disk, read_only, &mut created)?;
            }
            for e in &config.exports {
                daemon.add_export(e)?;
            }
            Ok::<(), OpError>(())
        })();
        if let Err(e) = result {
            // Undo quietly: the error line is what the user reads.
            daemon.undoing_start();
            let _ = daemon.close_all();
            return Err(StartError(e));
        }
        Ok((daemon, created))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps behind
        // (every change is a single insert or remove), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_open(&self) -> Result<(), OpError> {
        if self.closing.load(Ordering::SeqCst) {
            Err(OpError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn open_node(
        &self,
        disk: &DiskConfig,
        read_only: bool,
        created: &mut CreatedFiles,
    ) -> Result<NodeInfo, OpError> {
        if self.state().graph.contains(&disk.name) {
            return Err(GraphError::NameTaken(disk.name.clone()).into());
        }
        create_image_if_missing(disk, created)?;
        let node = Arc::new(Node::open(&disk.name, &disk.spec, read_only)?);
        self.remember_opened(&node);
        let mut state = self.state();
        state.graph.insert(node, Holder::Monitor)?;
        if disk.reattach {
            state.reattach.insert(disk.name.clone());
        }
        Ok(node_info(&state.graph, &disk.name))
    }

    /// Keeps a weak reference for the emergency flush of a second signal.
    fn remember_opened(&self, node: &Arc<Node>) {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        opened.retain(|n| n.strong_count() > 0);
        opened.push(Arc::downgrade(node));
    }

    /// `node_reopen`: the drive of a removed node is back at its path (the
    /// same drive: serial, size and block size match): opens it again, and
    /// each export of the node pauses, moves to it and resumes (the
    /// pivot's mechanism), so consumers that saw I/O errors are served
    /// again.
    pub fn reopen_node(&self, name: &str) -> Result<NodeInfo, OpError> {
        self.check_open()?;
        let state = self.state();
        let old = state.graph.get(name)?.clone();
        if !old.is_removed() {
            return Err(OpError::NotRemoved(name.to_owned()));
        }
        if let Some(job) = state.graph.holders(name).into_iter().find_map(|h| match h {
            Holder::Job(id) => Some(id),
            _ => None,
        }) {
            return Err(OpError::NodeInJob {
                node: name.to_owned(),
                job,
            });
        }
        let serial = |n: &Node| n.profile().and_then(|p| p.serial.clone());
        let same_drive = |n: &Node| {
            n.limits().capacity_bytes == old.limits().capacity_bytes
                && n.limits().logical_block_size_bytes == old.limits().logical_block_size_bytes
                && serial(n) == serial(&old)
        };
        // At its path, or, when a drive with its serial came back under
        // another name (its old name is still held by our descriptor), there.
        let at_path = match old.spec() {
            crate::node::DiskSpec::Path(p) if p.exists() => {
                Some(Node::open(name, old.spec(), old.read_only())?)
            }
            _ => None,
        };
        let new = match at_path {
            Some(n) if same_drive(&n) => n,
            other => {
                let found = serial(&old)
                    .and_then(|s| crate::hotplug::find_drive(&s, old.limits().capacity_bytes));
                match found {
                    Some(path) => {
                        Node::open(name, &crate::node::DiskSpec::Path(path), old.read_only())?
                    }
                    None if other.is_some() => {
                        return Err(OpError::NotTheSameDrive {
                            node: name.to_owned(),
                            path: old.spec().to_string(),
                        })
                    }
                    None => {
                        return Err(OpError::DriveNotBack {
                            node: name.to_owned(),
                            path: old.spec().to_string(),
                        })
                    }
                }
            }
        };
        if !same_drive(&new) {
            return Err(OpError::NotTheSameDrive {
                node: name.to_owned(),
                path: new.spec().to_string(),
            });
        }
        let new = Arc::new(new);
        let mut state = state;
        self.remember_opened(&new);
        state.graph.replace(new.clone())?;
        let timeout = Duration::from_millis(DRAIN_TIMEOUT_MS);
        let mut exports = Vec::new();
        for x in state.exports_of(name) {
            // Nothing is in flight on a removed node for long: its requests
            // fail at once.
            if let Err(stuck) = x.pause(timeout) {
                tracing::error!(
                    export = x.name(),
                    "queues {stuck:?} did not pause; moving them anyway"
                );
            }
            x.switch_node(new.clone());
            x.resume();
            exports.push(x.name().to_owned());
        }
        tracing::warn!(
            node = name,
            "the drive of node {name} ({}) is back: reopened; exports {exports:?} serve it again",
            new.spec()
        );
        self.emit(Event::NodeReopened {
            node: name.to_owned(),
            exports,
        });
        Ok(node_info(&state.graph, name))
    }

    /// `node-add`: opens a node the monitor holds.
    pub fn add_node(&self, disk: &DiskConfig) -> Result<NodeInfo, OpError> {
        self.check_open()?;
        let mut created = CreatedFiles::default();
        let info = self.open_node(disk, disk.read_only, &mut created)?;
        created.keep();
        self.emit(Event::NodeAdded {
            node: info.name.clone(),
            disk: info.disk.clone(),
            capacity_bytes: info.capacity_bytes,
        });
        Ok(info)
    }

    /// `node-remove`: the monitor lets go of a node nobody else holds; it
    /// is flushed and closed.
    pub fn remove_node(&self, name: &str) -> Result<(), OpError> {
        self.check_open()?;
        let node = self.state().graph.remove_by_monitor(name)?;
        self.close_node(node)
    }

    /// Flushes and closes a node that left the graph (its last holder let
    /// it go), and says so.
    fn close_node(&self, node: Arc<Node>) -> Result<(), OpError> {
        let name = node.name().to_owned();
        let flushed = flush_bounded(node, Duration::from_millis(FLUSH_TIMEOUT_MS));
        self.emit(Event::NodeClosed { node: name });
        Ok(flushed?)
    }

    /// `export-add`: starts an export on an existing node, which it holds.
    pub fn add_export(&self, config: &ExportConfig) -> Result<ExportDescription, OpError> {
        self.check_open()?;
        let holder = Holder::Export(config.name.clone());
        let node = {
            let mut state = self.state();
            if state.exports.contains_key(&config.name) {
                return Err(OpError::ExportExists(config.name.clone()));
            }
            if state.exports_busy.contains(&config.name) {
                return Err(OpError::ExportBusy(config.name.clone()));
            }
            if let crate::config::ExportKind::VhostUser { socket, .. } = &config.kind {
                // One socket spelt two ways (`a/../x.sock`, a symlinked
                // directory) is still one socket.
                let key = crate::unix_socket::path_key(socket);
                let taken = state.exports.values().find(|x| {
                    x.socket()
                        .is_some_and(|s| crate::unix_socket::path_key(s) == key)
                });
                if let Some(other) = taken {
                    return Err(OpError::SocketTaken {
                        socket: socket.clone(),
                        export: other.name().to_owned(),
                    });
                }
            }
            let node = state.graph.hold(&config.disk, holder.clone())?;
            state.exports_busy.insert(config.name.clone());
            let group = match &config.qos_group {
                Some(name) => state.qos_group(name),
                None => Arc::new(QosGroup::new(None)),
            };
            if let Some(limits) = &config.qos {
                group.set(limits, crate::qos::now_ns());
            }
            (node, Arc::new(ExportQos::new(group)))
        };
        let (node, qos) = node;
        let started = start_export(node, config, &self.events, qos);
        let mut state = self.state();
        state.exports_busy.remove(&config.name);
        match started {
            Ok(x) if self.closing.load(Ordering::SeqCst) => {
                // Close-all began while this export started: it has taken
                // the exports already, so this one detaches itself.
                drop(state);
                let _ = x.drain(DrainBounds::FORCE);
                if let Err(e) = self.detach_one(x, Duration::from_millis(DRAIN_TIMEOUT_MS), false) {
                    tracing::error!("export {}: {e}", config.name);
                }
                Err(OpError::ShuttingDown)
            }
            Ok(x) => {
                let description = x.describe();
                state
                    .on_removed
                    .insert(config.name.clone(), config.on_removed);
                state.exports.insert(config.name.clone(), x);
                drop(state);
                self.emit(Event::ExportAdded {
                    export: config.name.clone(),
                    node: config.disk.clone(),
                    endpoint: description.endpoint.clone(),
                });
                Ok(description)
            }
            Err(e) => {
                let _ = state.graph.release(&config.disk, &holder);
                Err(e.into())
            }
        }
    }

    /// `export-remove`: safe mode waits for in-flight requests (drain) before
    /// it detaches; forced mode fails what is queued and detaches at once.
    /// The export's node reference goes back to the graph.
    pub fn remove_export(&self, name: &str, force: bool) -> Result<ExportTotals, OpError> {
        self.check_open()?;
        let x = {
            let mut state = self.state();
            let x = state
                .exports
                .remove(name)
                .ok_or_else(|| OpError::NoSuchExport(name.to_owned()))?;
            state.exports_busy.insert(name.to_owned());
            x
        };
        // Unreserve the name once the export is gone and its node released.
        struct Unreserve<'a>(&'a Daemon, &'a str);
        impl Drop for Unreserve<'_> {
            fn drop(&mut self) {
                self.0.state().exports_busy.remove(self.1);
            }
        }
        let _unreserve = Unreserve(self, name);
        let timeout = Duration::from_millis(DRAIN_TIMEOUT_MS);
        let bounds = if force {
            DrainBounds::FORCE
        } else {
            DrainBounds::SAFE
        };
        if let Err(stuck) = x.drain(bounds) {
            tracing::warn!(
                export = name,
                "queues {stuck:?} still have requests the device has not completed after {} ms; \
                 detaching anyway (those requests are never answered)",
                bounds.in_flight.as_millis()
            );
        }
        let totals = x.totals();
        let detached = self.detach_one(x, timeout, true);
        detached.map(|()| totals)
    }

    /// Detaches one export and gives its node reference back; closes the
    /// node if that was the last reference. `announce`: emit
    /// `export_removed` (not for an export nobody was told of).
    fn detach_one(&self, x: Export, timeout: Duration, announce: bool) -> Result<(), OpError> {
        let name = x.name().to_owned();
        let node = x.node().name().to_owned();
        let result = if self.undoing_start.load(Ordering::Relaxed) && x.taken_over() {
            tracing::warn!(
                export = name,
                "leaving the ublk device this start took over waiting for the next server"
            );
            x.abandon();
            Ok(())
        } else {
            x.detach(timeout).map(|_| ()).map_err(OpError::from)
        };
        if announce {
            self.emit(Event::ExportRemoved {
                export: name.clone(),
                node: node.clone(),
            });
        }
        let released = self.state().graph.release(&node, &Holder::Export(name));
        match released {
            Ok(Some(last)) => self.close_node(last)?,
            Ok(None) => {}
            Err(e) => tracing::error!("{e}"),
        }
        result
    }

    /// `job_mirror`: starts copying `node` to `target` while its exports
    /// keep serving it.
    pub fn start_mirror(&self, p: &MirrorParams) -> Result<JobStatus, OpError> {
        self.check_open()?;
        let mut state = self.state();
        let id = match &p.id {
            Some(id) if state.jobs.contains_key(id) => return Err(OpError::JobExists(id.clone())),
            Some(id) => id.clone(),
            None => loop {
                let id = format!("mirror{}", state.next_job);
                state.next_job += 1;
                if !state.jobs.contains_key(&id) {
                    break id;
                }
            },
        };
        let source = state.graph.get(&p.node)?.clone();
        let target = state.graph.get(&p.target)?.clone();
        let target_users: Vec<Holder> = state
            .graph
            .holders(&p.target)
            .into_iter()
            .filter(|h| *h != Holder::Monitor)
            .collect();
        if !target_users.is_empty() {
            return Err(GraphError::InUse {
                name: p.target.clone(),
                holders: target_users,
            }
            .into());
        }
        let mut job = MirrorJob::new(
            &id,
            source,
            target,
            p.chunk_bytes.unwrap_or(MIRROR_CHUNK_BYTES),
            p.max_in_flight.unwrap_or(MIRROR_MAX_IN_FLIGHT),
        )?;
        let holder = Holder::Job(id.clone());
        state.graph.hold(&p.node, holder.clone())?;
        state.graph.hold(&p.target, holder)?;
        for x in state.exports_of(&p.node) {
            x.binding().set_mirror(Some(job.tap().clone()));
        }
        if let Err(e) = job.start_copier(self.events.clone()) {
            for x in state.exports_of(&p.node) {
                x.binding().set_mirror(None);
            }
            let holder = Holder::Job(id.clone());
            let _ = state.graph.release(&p.node, &holder);
            let _ = state.graph.release(&p.target, &holder);
            return Err(e.into());
        }
        let status = job.status();
        state.jobs.insert(id, job);
        Ok(status)
    }

    /// `job_list`.
    pub fn list_jobs(&self) -> Vec<JobStatus> {
        self.state().jobs.values().map(MirrorJob::status).collect()
    }

    /// `job_status`.
    pub fn job_status(&self, id: &str) -> Result<JobStatus, OpError> {
        self.state()
            .jobs
            .get(id)
            .map(MirrorJob::status)
            .ok_or_else(|| OpError::NoSuchJob(id.to_owned()))
    }

    fn take_job(&self, id: &str) -> Result<MirrorJob, OpError> {
        self.state()
            .jobs
            .remove(id)
            .ok_or_else(|| OpError::NoSuchJob(id.to_owned()))
    }

    /// Gives a finished job's node references back, closing nodes it held
    /// last.
    fn release_job(&self, job: &MirrorJob) -> Result<(), OpError> {
        let holder = Holder::Job(job.id().to_owned());
        let mut closing = Vec::new();
        {
            let mut state = self.state();
            for node in [job.source().name(), job.target().name()] {
                if let Ok(Some(last)) = state.graph.release(node, &holder) {
                    closing.push(last);
                }
            }
        }
        for node in closing {
            self.close_node(node)?;
        }
        Ok(())
    }

    /// `job_cancel`: stop copying, flush the target and let both nodes go;
    /// the source and its exports are untouched.
    pub fn cancel_job(&self, id: &str) -> Result<JobStatus, OpError> {
        // During close-all, its last step cancels every job itself.
        self.check_open()?;
        let mut job = self.take_job(id)?;
        for x in self.state().exports_of(job.source().name()) {
            x.binding().set_mirror(None);
        }
        let status = job.status();
        let cancelled = job.cancel(Instant::now() + Duration::from_millis(JOB_CANCEL_TIMEOUT_MS));
        let released = self.release_job(&job);
        tracing::info!(job = id, "mirror cancelled");
        self.emit(Event::JobCancelled { job: id.to_owned() });
        cancelled?;
        released?;
        Ok(status)
    }

    /// `job_complete`: pivot. Every export of the source pauses (drain), the
    /// rest is copied, the target flushed, the exports switch to the target
    /// and resume; the source is released.
    pub fn complete_job(&self, id: &str) -> Result<JobStatus, OpError> {
        self.check_open()?;
        let mut job = self.take_job(id)?;
        let put_back = |job: MirrorJob, e: OpError| {
            self.state().jobs.insert(job.id().to_owned(), job);
            Err(e)
        };
        if !job.is_ready() {
            let st = job.status();
            return put_back(
                job,
                OpError::JobNotReady {
                    id: id.to_owned(),
                    done_bytes: st.done_bytes,
                    total_bytes: st.total_bytes,
                },
            );
        }
        // The pivot happens under the state lock, so no export comes or goes
        // meanwhile; guest requests wait in their rings for its duration.
        let pivot = {
            let mut state = self.state();
            let result = pivot_exports(&state, &mut job);
            if let Ok(names) = &result {
                for name in names {
                    let holder = Holder::Export(name.clone());
                    let _ = state.graph.hold(job.target().name(), holder.clone());
                    let _ = state.graph.release(job.source().name(), &holder);
                }
            }
            result
        };
        let names = match pivot {
            Ok(names) => names,
            Err(e) => return put_back(job, e),
        };
        let mut status = job.status();
        status.done_bytes = status.total_bytes;
        self.release_job(&job)?;
        tracing::info!(job = id, exports = ?names, target = job.target().name(), "mirror completed: exports switched to the target");
        self.emit(Event::JobCompleted {
            job: id.to_owned(),
            source: job.source().name().to_owned(),
            target: job.target().name().to_owned(),
            exports: names,
        });
        Ok(status)
    }

    /// `node-list`.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        let state = self.state();
        state
            .graph
            .nodes()
            .map(|(n, _, _)| node_info(&state.graph, n))
            .collect()
    }

    /// `export-list` / `export-stats`.
    pub fn list_exports(&self) -> Vec<ExportInfo> {
        self.state()
            .exports
            .values()
            .map(|x| ExportInfo {
                description: x.describe(),
                node: x.node().name().to_owned(),
                stats: x.totals(),
                qos: qos_shown(x),
            })
            .collect()
    }

    /// `export_stats`: counters and latency percentiles of one export.
    pub fn export_stats(&self, name: &str) -> Result<ExportStats, OpError> {
        let state = self.state();
        let x = state
            .exports
            .get(name)
            .ok_or_else(|| OpError::NoSuchExport(name.to_owned()))?;
        Ok(ExportStats {
            name: name.to_owned(),
            node: x.node().name().to_owned(),
            stats: x.totals(),
            latency: x.latency(),
            qos: qos_shown(x),
        })
    }

    /// `export_counters`: every export's per-queue counters and latency
    /// histograms, with the time they were read.
    pub fn export_counters(&self) -> CountersSample {
        let state = self.state();
        let exports = state.exports.values().map(Export::counters).collect();
        CountersSample {
            monotonic_ns: monotonic_ns(),
            exports,
        }
    }

    /// What a metrics scrape shows, read under the state lock: each
    /// export's per-queue counters and summed latency histogram (relaxed
    /// loads of the atomics its queue threads write; nothing on the request
    /// path changes), each node's state and size, each job's progress.
    pub(crate) fn metrics_samples(&self) -> MetricsSamples {
        let state = self.state();
        MetricsSamples {
            exports: state
                .exports
                .values()
                .map(|x| ExportSample {
                    name: x.name().to_owned(),
                    kind: x.kind(),
                    node: x.node().name().to_owned(),
                    queues: x.queues().iter().map(QueueSnapshot::of).collect(),
                    latency: LatencyHistogram::of(x.queues()),
                })
                .collect(),
            nodes: state
                .graph
                .nodes()
                .map(|(_, n, _)| NodeSample {
                    name: n.name().to_owned(),
                    removed: n.is_removed(),
                    capacity_bytes: n.limits().capacity_bytes,
                })
                .collect(),
            jobs: state.jobs.values().map(MirrorJob::status).collect(),
        }
    }

    /// `export_qos`: moves the export into `group` (if given), sets its
    /// group's limits (if given; all at once) and answers the limits in
    /// force. Queues see a change at their next request, and a queue
    /// sleeping on a throttled one within `QOS_MAX_WAIT_MS`.
    pub fn export_qos(
        &self,
        name: &str,
        group: Option<&str>,
        limits: Option<&QosLimits>,
    ) -> Result<QosLimits, OpError> {
        self.check_open()?;
        let mut state = self.state();
        let qos = state
            .exports
            .get(name)
            .ok_or_else(|| OpError::NoSuchExport(name.to_owned()))?
            .qos()
            .clone();
        if let Some(g) = group {
            if qos.group().name() != Some(g) {
                let group = state.qos_group(g);
                qos.set_group(group);
                tracing::info!(export = name, group = g, "export moved into QoS group");
            }
        }
        let group = qos.group();
        if let Some(limits) = limits {
            group.set(limits, crate::qos::now_ns());
            let now = group.limits();
            if now.any() {
                tracing::info!(
                    export = name,
                    group = group.name(),
                    "QoS limits set: {}",
                    serde_json::to_string(&now).unwrap_or_default()
                );
            } else {
                tracing::info!(export = name, group = group.name(), "QoS limits lifted");
            }
        }
        Ok(group.limits())
    }

    /// One JSON line per export, printed when it accepts its consumer
    /// (socket listening, or `/dev/ublkbN` present).
    pub fn ready_lines(&self) -> Vec<String> {
        self.state()
            .exports
            .values()
            .map(|x| x.describe().to_string())
            .collect()
    }

    /// `f` of every vhost-user export (the attach help reads their
    /// configuration).
    pub fn map_vhost_user_exports<R>(&self, f: impl Fn(&VhostUserExport) -> R) -> Vec<R> {
        self.state()
            .exports
            .values()
            .filter_map(|x| match x {
                Export::VhostUser(x) => Some(f(x)),
                Export::Ublk(_) => None,
            })
            .collect()
    }

    /// Whether close-all has begun.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// A stream of the daemon's events from now on (ends when the daemon
    /// goes).
    pub(crate) fn subscribe_events(&self) -> mpsc::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        self.events.emit(event);
    }

    /// Finds nodes whose drive went away (marked by the data path, or gone
    /// from sysfs) and reports each once: a warning naming the node, its
    /// device and its exports, an event, and each export's `on_removed`
    /// policy. Called by the hot-plug watcher.
    pub(crate) fn check_removed_nodes(self: &Arc<Self>) {
        let nodes: Vec<Arc<Node>> = self
            .state()
            .graph
            .nodes()
            .map(|(_, n, _)| n.clone())
            .filter(|n| n.device_number().is_some())
            .collect();
        for node in nodes {
            if !node.is_removed() && node.device_gone() {
                node.mark_removed();
            }
            if !node.take_removal_report() {
                self.try_reattach(&node);
                continue;
            }
            let (exports, stop): (Vec<String>, Vec<String>) = {
                let state = self.state();
                let exports: Vec<String> = state
                    .exports_of(node.name())
                    .map(|x| x.name().to_owned())
                    .collect();
                let stop = exports
                    .iter()
                    .filter(|x| {
                        state.on_removed.get(*x) == Some(&crate::api::OnRemoved::Stop)
                            && state.exports.get(*x).is_some_and(|x| x.ublk_id().is_some())
                    })
                    .cloned()
                    .collect();
                (exports, stop)
            };
            let device = node.spec().to_string();
            tracing::warn!(
                node = node.name(),
                "the drive of node {} ({device}) was removed: its exports {exports:?} fail every \
                 request with an I/O error",
                node.name()
            );
            self.emit(Event::NodeRemoved {
                node: node.name().to_owned(),
                device,
                exports,
            });
            for name in stop {
                let daemon = self.clone();
                std::thread::spawn(move || match daemon.remove_export(&name, true) {
                    Ok(_) => {
                        tracing::warn!(export = name, "stopped: its node's drive was removed");
                        daemon.emit(Event::ExportStopped {
                            export: name,
                            reason: "its node's drive was removed".into(),
                        });
                    }
                    Err(e) => tracing::error!(export = name, "cannot stop: {e}"),
                });
            }
        }
    }

    /// A removed node with `reattach = true` whose path is back: reopens it
    /// (`reopen_node`). Failures are logged at debug level: the watcher asks
    /// again at its next check.
    fn try_reattach(&self, node: &Arc<Node>) {
        if !node.is_removed() || !self.state().reattach.contains(node.name()) {
            return;
        }
        if let Err(e) = self.reopen_node(node.name()) {
            tracing::debug!(node = node.name(), "reattach: {e}");
        }
    }

    /// The ublk device ids this daemon serves.
    pub(crate) fn ublk_ids(&self) -> Vec<u32> {
        self.state()
            .exports
            .values()
            .filter_map(Export::ublk_id)
            .collect()
    }

    /// The start failed and close-all is about to undo it: its steps are
    /// logged at debug level (the error line is what the user reads), and
    /// ublk devices that this start took over from a dead server are left
    /// waiting, as they were found, for the next one.
    pub fn undoing_start(&self) {
        self.undoing_start.store(true, Ordering::Relaxed);
    }

    /// Close-all, after the seed commit (`bdrv_close_all` rewrite): every
    /// holder gives its node references back voluntarily, in order, so that
    /// cached data is flushed and any later access fails gracefully. Each
    /// step is logged and bounded; returns whether every step finished in
    /// time.
    pub fn close_all(&self) -> bool {
        self.closing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_millis(CLOSE_ALL_TIMEOUT_MS);
        // The exports leave the state now: no step waits with the
        // control-plane lock held (the monitor keeps answering, and refuses
        // changes), and an export added meanwhile detaches itself.
        let exports = std::mem::take(&mut self.state().exports);
        let mut clean = true;
        clean &= self.drain_exports(&exports, deadline);
        clean &= self.detach_exports(exports, deadline);
        clean &= self.release_monitor_nodes(deadline);
        clean &= self.flush_nodes(deadline);
        clean &= self.cancel_jobs(deadline);
        self.set_pending("done", std::iter::empty());
        clean
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.undoing_start.load(Ordering::Relaxed) {
            tracing::debug!("{msg}");
        } else {
            tracing::info!("{msg}");
        }
    }

    fn set_pending(&self, step: &'static str, items: impl IntoIterator<Item = String>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.step = step;
        p.items = items.into_iter().collect();
    }

    fn done_pending(&self, item: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .remove(item);
    }

    /// What close-all is doing and still waits for, e.g. "drain: exports vm0, vm1".
    pub fn pending(&self) -> String {
        let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.step.is_empty() {
            return "close-all has not started".into();
        }
        let items: Vec<&str> = p.items.iter().map(String::as_str).collect();
        format!("{}: {}", p.step, items.join(", "))
    }

    /// Step 1: every export stops admitting (all of them before any wait),
    /// then all drain at once, each within the close-all deadline.
    fn drain_exports(&self, exports: &BTreeMap<String, Export>, deadline: Instant) -> bool {
        for x in exports.values() {
            x.stop_admitting();
        }
        self.set_pending("drain", exports.keys().map(|n| format!("export {n}")));
        for x in exports.values() {
            self.log(format_args!(
                "close-all: drain export {} ({} in flight)",
                x.name(),
                x.totals().in_flight
            ));
        }
        let bounds = DrainBounds::SAFE.until(deadline);
        std::thread::scope(|s| {
            let waits: Vec<_> = exports
                .values()
                .map(|x| {
                    s.spawn(move || {
                        let r = x.drain(bounds);
                        self.done_pending(&format!("export {}", x.name()));
                        r
                    })
                })
                .collect();
            let mut clean = true;
            for (x, wait) in exports.values().zip(waits) {
                if let Err(stuck) = wait.join().unwrap_or_else(|_| Err(Vec::new())) {
                    tracing::error!(
                        "close-all: export {}: queues {stuck:?} still have requests in flight after {} ms",
                        x.name(),
                        bounds.in_flight.as_millis()
                    );
                    clean = false;
                }
            }
            clean
        })
    }

    /// Step 2: detach every export (all at once); each gives its node
    /// reference back.
    fn detach_exports(&self, exports: BTreeMap<String, Export>, deadline: Instant) -> bool {
        self.set_pending("detach", exports.keys().map(|n| format!("export {n}")));
        let timeout = Duration::from_millis(DRAIN_TIMEOUT_MS)
            .min(deadline.saturating_duration_since(Instant::now()));
        std::thread::scope(|s| {
            let detaches: Vec<_> = exports
                .into_iter()
                .map(|(name, x)| {
                    self.log(format_args!(
                        "close-all: detach export {name} ({:?})",
                        x.totals()
                    ));
                    s.spawn(move || {
                        let r = self.detach_one(x, timeout, true);
                        self.done_pending(&format!("export {name}"));
                        r.map_err(|e| format!("close-all: detach export {name}: {e}"))
                    })
                })
                .collect();
            let mut clean = true;
            for d in detaches {
                if let Err(e) = d.join().unwrap_or_else(|_| Err("detach panicked".into())) {
                    tracing::error!("{e}");
                    clean = false;
                }
            }
            clean
        })
    }

    /// Step 3: the monitor lets go of the nodes it created; a node nobody
    /// else holds is flushed and closed.
    fn release_monitor_nodes(&self, deadline: Instant) -> bool {
        let mut clean = true;
        let names = self.state().graph.held_by(&Holder::Monitor);
        self.set_pending("release", names.iter().map(|n| format!("node {n}")));
        for name in names {
            let released = self.state().graph.release(&name, &Holder::Monitor);
            if let Ok(Some(node)) = released {
                let timeout = Duration::from_millis(FLUSH_TIMEOUT_MS)
                    .min(deadline.saturating_duration_since(Instant::now()));
                match flush_bounded(node, timeout) {
                    Ok(()) => self.log(format_args!(
                        "close-all: release node {name}: flushed and closed"
                    )),
                    Err(e) => {
                        tracing::error!("close-all: release node {name}: {e}");
                        clean = false;
                    }
                }
            }
            self.done_pending(&format!("node {name}"));
        }
        clean
    }

    /// Step 4: flush every node still open (held by jobs).
    fn flush_nodes(&self, deadline: Instant) -> bool {
        let nodes: Vec<Arc<Node>> = self
            .state()
            .graph
            .nodes()
            .map(|(_, n, _)| n.clone())
            .collect();
        self.set_pending("flush", nodes.iter().map(|n| format!("node {}", n.name())));
        let mut clean = true;
        for node in nodes {
            let name = node.name().to_owned();
            let timeout = Duration::from_millis(FLUSH_TIMEOUT_MS)
                .min(deadline.saturating_duration_since(Instant::now()));
            match flush_bounded(node, timeout) {
                Ok(()) => self.log(format_args!("close-all: flush node {name}: done")),
                Err(e) => {
                    tracing::error!("close-all: {e}");
                    clean = false;
                }
            }
            self.done_pending(&format!("node {name}"));
        }
        clean
    }

    /// A second SIGINT/SIGTERM during close-all: flushes every node still
    /// open, all at once, within `EMERGENCY_FLUSH_TIMEOUT_MS`, without the
    /// state lock (close-all may hold it). Returns whether all flushes
    /// finished without error.
    pub fn emergency_flush(&self) -> bool {
        let nodes: Vec<Arc<Node>> = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // All at once, one thread each (a flush that never returns keeps
        // its thread; the process is about to exit), under one deadline.
        let deadline = Instant::now() + Duration::from_millis(EMERGENCY_FLUSH_TIMEOUT_MS);
        let (tx, rx) = mpsc::channel();
        for node in &nodes {
            let (node, tx) = (node.clone(), tx.clone());
            std::thread::spawn(move || {
                let _ = tx.send((node.name().to_owned(), node.flush()));
            });
        }
        let mut clean = true;
        let mut pending: std::collections::BTreeSet<&str> =
            nodes.iter().map(|n| n.name()).collect();
        while !pending.is_empty() {
            let Ok((name, result)) =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                tracing::error!(
                    "flush of nodes {pending:?} did not finish within {EMERGENCY_FLUSH_TIMEOUT_MS} ms"
                );
                return false;
            };
            pending.remove(name.as_str());
            if let Err(e) = result {
                tracing::error!("{e}");
                clean = false;
            }
        }
        clean
    }
}

/// Pauses every export of the job's source, whatever its front, copies what
/// is left, switches them to the target and resumes them. Returns their
/// names; on failure everything is resumed on the source.
fn pivot_exports(state: &State, job: &mut MirrorJob) -> Result<Vec<String>, OpError> {
    let exports: Vec<&Export> = state.exports_of(job.source().name()).collect();
    let timeout = Duration::from_millis(DRAIN_TIMEOUT_MS);
    for (i, x) in exports.iter().enumerate() {
        if let Err(stuck) = x.pause(timeout) {
            exports[..i].iter().for_each(|x| x.resume());
            return Err(OpError::NotDrained {
                export: x.name().to_owned(),
                queues: stuck,
            });
        }
    }
    if let Err(e) = job.finish_copy() {
        exports.iter().for_each(|x| x.resume());
        return Err(e.into());
    }
    for x in &exports {
        x.switch_node(job.target().clone());
        x.binding().set_mirror(None);
        x.resume();
    }
    Ok(exports.iter().map(|x| x.name().to_owned()).collect())
}

impl Daemon {
    /// Step 5, the seed's loop: cancel the remaining jobs one at a time
    /// until no node is left, by `deadline`. Every node still open must be
    /// held by a job; one that is not is reported (it would never close).
    fn cancel_jobs(&self, deadline: Instant) -> bool {
        let mut clean = true;
        loop {
            let (next, leftovers) = {
                let state = self.state();
                if state.graph.is_empty() {
                    return clean;
                }
                if Instant::now() >= deadline {
                    let left: Vec<&str> = state.graph.nodes().map(|(n, _, _)| n).collect();
                    tracing::error!(
                        "close-all: jobs still hold nodes {left:?} at the close-all deadline"
                    );
                    return false;
                }
                let next = state.graph.nodes().find_map(|(_, _, holders)| {
                    holders.into_iter().find_map(|h| match h {
                        Holder::Job(id) => Some(id),
                        _ => None,
                    })
                });
                let leftovers: Vec<String> = state
                    .graph
                    .nodes()
                    .map(|(n, _, h)| format!("{n} (held by {h:?})"))
                    .collect();
                (next, leftovers)
            };
            let Some(id) = next else {
                tracing::error!("close-all: nodes left that no job holds: {leftovers:?}");
                return false;
            };
            self.set_pending("cancel", [format!("job {id}")]);
            let Ok(mut job) = self.take_job(&id) else {
                // A `job_cancel` that began before close-all owns it now and
                // is letting its nodes go: wait for that, not in a spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            self.log(format_args!("close-all: cancel job {id}"));
            let cancelled = job.cancel(deadline);
            // Its nodes are let go even if the copier is stuck: the loop
            // goes on to the next job either way.
            let released = self.release_job(&job);
            self.emit(Event::JobCancelled { job: id.clone() });
            for e in [cancelled.err().map(OpError::from), released.err()]
                .into_iter()
                .flatten()
            {
                tracing::error!("close-all: cancel job {id}: {e}");
                clean = false;
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

fn node_info(graph: &Graph, name: &str) -> NodeInfo {
    let node = graph.get(name).expect("listed node exists");
    NodeInfo {
        name: name.to_owned(),
        disk: node.spec().to_string(),
        capacity_bytes: node.limits().capacity_bytes,
        read_only: node.read_only(),
        state: if node.is_removed() {
            crate::api::NodeState::Removed
        } else {
            crate::api::NodeState::Open
        },
        holders: graph.holders(name),
    }
}

/// An export's QoS as `export_list` and `export_stats` show it: when a
/// limit is set or the export is in a named group.
fn qos_shown(x: &Export) -> Option<QosLimits> {
    let limits = x.qos().group().limits();
    (limits.any() || limits.group.is_some()).then_some(limits)
}
