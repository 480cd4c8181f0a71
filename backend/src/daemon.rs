//! `sluice serve`: open the nodes, start the exports, say ready, and on
//! SIGINT/SIGTERM close everything in order: drain, detach, flush.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{DiskConfig, ExportKind, ServeConfig};
use crate::export::ublk::{UblkConfig, UblkExport};
use crate::export::vhost_user::{VhostUserConfig, VhostUserExport};
use crate::export::Export;
use crate::limits::{DRAIN_TIMEOUT_MS, FLUSH_TIMEOUT_MS};
use crate::node::{DiskSpec, Node};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// A running daemon: its nodes and exports.
#[derive(Debug)]
pub struct Daemon {
    /// Every node, in configuration order.
    nodes: Vec<Arc<Node>>,
    /// Exports, in configuration order.
    exports: Vec<Export>,
    /// Log close-all steps at debug level (undoing a failed start).
    quiet: bool,
}

/// Image files this start created, removed again if the start fails.
#[derive(Default)]
struct CreatedFiles(Vec<PathBuf>);

impl CreatedFiles {
    fn keep(mut self) {
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

fn create_image_if_missing(
    disk: &DiskConfig,
    created: &mut CreatedFiles,
) -> Result<(), StartError> {
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
            f.set_len(size).map_err(|e| {
                StartError(format!(
                    "create image {}: cannot size it: {e}",
                    path.display()
                ))
            })?;
            tracing::info!("created sparse image {} ({} bytes)", path.display(), size);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StartError(format!("create image {}: {e}", path.display()))),
    }
}

impl Daemon {
    /// Opens every node and starts every export. On failure everything
    /// already started is stopped again and images this call created are
    /// removed: nothing half-created is left behind.
    pub fn start(config: &ServeConfig) -> Result<Daemon, StartError> {
        let mut created = CreatedFiles::default();
        let mut nodes = Vec::new();
        for disk in &config.disks {
            create_image_if_missing(disk, &mut created)?;
            let node = Node::open(&disk.name, &disk.spec, config.disk_read_only(disk))
                .map_err(|e| StartError(e.to_string()))?;
            nodes.push(Arc::new(node));
        }
        let mut daemon = Daemon {
            nodes,
            exports: Vec::new(),
            quiet: false,
        };
        for e in &config.exports {
            let node = daemon
                .nodes
                .iter()
                .find(|n| n.name() == e.disk)
                .expect("validated: export names an existing disk")
                .clone();
            let started = match &e.kind {
                ExportKind::VhostUser {
                    socket,
                    socket_mode,
                } => VhostUserExport::start(
                    node,
                    VhostUserConfig {
                        name: e.name.clone(),
                        socket: socket.clone(),
                        queues: e.queues,
                        queue_depth: e.queue_depth,
                        read_only: e.read_only,
                        serial: e.serial.clone(),
                        poll_window_us: e.poll_window_us,
                        socket_mode: *socket_mode,
                    },
                )
                .map(Export::VhostUser),
                ExportKind::Ublk { id } => UblkExport::start(
                    node,
                    UblkConfig {
                        name: e.name.clone(),
                        id: *id,
                        queues: e.queues,
                        queue_depth: e.queue_depth,
                        read_only: e.read_only,
                    },
                )
                .map(Export::Ublk),
            };
            match started {
                Ok(x) => daemon.exports.push(x),
                Err(err) => {
                    // Undo quietly: the error line is what the user reads.
                    daemon.quiet = true;
                    let _ = daemon.close_all();
                    return Err(StartError(err.to_string()));
                }
            }
        }
        created.keep();
        Ok(daemon)
    }

    /// One JSON line per export, printed when it accepts its consumer
    /// (socket listening, or `/dev/ublkbN` present).
    pub fn ready_lines(&self) -> Vec<String> {
        self.exports
            .iter()
            .map(|x| x.describe().to_string())
            .collect()
    }

    /// The exports.
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// Close-all: every holder gives its node reference back voluntarily, in
    /// order, so that cached data is flushed and later access fails
    /// gracefully. Each step is logged and bounded; returns whether every
    /// step finished in time.
    pub fn close_all(&mut self) -> bool {
        let mut clean = true;
        clean &= self.drain_exports();
        clean &= self.detach_exports();
        clean &= self.flush_nodes();
        self.nodes.clear();
        clean
    }

    /// Step 1: admit nothing new, wait until nothing is in flight.
    fn drain_exports(&self) -> bool {
        let timeout = Duration::from_millis(DRAIN_TIMEOUT_MS);
        let mut clean = true;
        for x in &self.exports {
            tracing::info!(
                export = x.name(),
                in_flight = x.totals().in_flight,
                "close-all: drain"
            );
            if let Err(stuck) = x.drain(timeout) {
                tracing::error!(
                    export = x.name(),
                    "close-all: queues {stuck:?} still have requests in flight after {DRAIN_TIMEOUT_MS} ms"
                );
                clean = false;
            }
        }
        clean
    }

    /// Step 2: detach every export; it gives its node reference back.
    fn detach_exports(&mut self) -> bool {
        let mut clean = true;
        for x in self.exports.drain(..) {
            let name = x.name().to_owned();
            let totals = x.totals();
            if !self.quiet {
                tracing::info!(export = %name, ?totals, "close-all: detach");
            }
            if let Err(e) = x.detach(Duration::from_millis(DRAIN_TIMEOUT_MS)) {
                tracing::error!("close-all: {e}");
                clean = false;
            }
        }
        clean
    }

    /// Step 3 (the monitor's own nodes) arrives with the control socket; step
    /// 4: flush every node still open, each bounded by a timeout.
    fn flush_nodes(&self) -> bool {
        let mut clean = true;
        for node in &self.nodes {
            if !self.quiet {
                tracing::info!(node = node.name(), "close-all: flush");
            }
            let (tx, rx) = mpsc::channel();
            let n = node.clone();
            std::thread::spawn(move || {
                let _ = tx.send(n.flush());
            });
            match rx.recv_timeout(Duration::from_millis(FLUSH_TIMEOUT_MS)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("close-all: {e}");
                    clean = false;
                }
                Err(_) => {
                    tracing::error!(
                        node = node.name(),
                        "close-all: flush did not finish within {FLUSH_TIMEOUT_MS} ms"
                    );
                    clean = false;
                }
            }
        }
        clean
    }
}

/// Runs `sluice serve` until SIGINT/SIGTERM. Returns the process exit code.
pub fn serve(config: &ServeConfig, attach_help: bool) -> i32 {
    // Catch the signals before anything exists, so a signal during start-up
    // also ends in an orderly close.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let mut daemon = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sluice: {e}");
            return 1;
        }
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in daemon.ready_lines() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }
    if attach_help {
        print_attach_help(&daemon);
    }
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    tracing::info!(signal, "shutting down");
    if daemon.close_all() {
        tracing::info!("all exports detached and nodes flushed");
        0
    } else {
        tracing::error!("shutdown incomplete: see the errors above");
        1
    }
}

fn print_attach_help(daemon: &Daemon) {
    for x in daemon.exports() {
        let Export::VhostUser(x) = x else { continue };
        let sock = x
            .config()
            .socket
            .canonicalize()
            .unwrap_or_else(|_| x.config().socket.clone());
        eprintln!(
            "\nsluice serves {} over {}. Attach it to QEMU with:\n  \
             qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \\\n    \
             -machine q35,memory-backend=mem \\\n    \
             -chardev socket,id=disk0,path={} \\\n    \
             -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...\n\
             Stop with Ctrl-C: in-flight requests finish and the image is flushed.",
            x.node().spec(),
            sock.display(),
            sock.display(),
            x.config().queues,
        );
    }
}
