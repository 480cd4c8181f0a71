//! The `sluice serve` process around the daemon's state: signals caught
//! before anything exists, start-up, the control socket, the ready lines and
//! systemd's `READY=1`, then close-all on SIGINT/SIGTERM or the monitor's
//! `shutdown`, with a second signal heard while it runs.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::default_control_path;
use crate::config::ServeConfig;
use crate::daemon::Daemon;
use crate::export::vhost_user::VhostUserExport;
use crate::limits::CLOSE_ALL_TIMEOUT_MS;
use crate::metrics::MetricsServer;
use crate::monitor::{Monitor, StopRequest};

/// Runs `sluice serve` until SIGINT/SIGTERM or the monitor's `shutdown`.
/// Returns the process exit code.
pub fn serve(config: &ServeConfig, attach_help: bool) -> i32 {
    // Catch the signals before anything exists, so a signal during start-up
    // also ends in an orderly close.
    let signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let (stop_tx, stop_rx) = mpsc::channel();
    {
        let stop_tx = stop_tx.clone();
        let mut signals = signals;
        std::thread::spawn(move || {
            for signal in signals.forever() {
                if stop_tx.send(StopRequest::Signal(signal)).is_err() {
                    break;
                }
            }
        });
    }
    let (daemon, created) = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("sluice: {e}");
            return 1;
        }
    };
    let control = config.control.clone().unwrap_or_else(default_control_path);
    let monitor = match Monitor::start(&control, daemon.clone(), stop_tx) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sluice: {e}");
            daemon.undoing_start();
            daemon.close_all();
            // Nodes are closed: the images this start created can go.
            drop(created);
            return 1;
        }
    };
    let metrics = match &config.metrics {
        None => None,
        Some(addr) => match MetricsServer::start(addr, Arc::downgrade(&daemon)) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("sluice: {e}");
                monitor.stop();
                daemon.undoing_start();
                daemon.close_all();
                drop(created);
                return 1;
            }
        },
    };
    created.keep();
    if let Err(e) = crate::hotplug::spawn_watcher(Arc::downgrade(&daemon)) {
        tracing::warn!(
            "cannot start the hot-plug watcher: {e}; a removed drive is noticed only when its \
             requests fail"
        );
    }
    crate::export::ublk::warn_about_waiting_devices(&daemon.ublk_ids());
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in daemon.ready_lines() {
            let _ = writeln!(out, "{line}");
        }
        if let Some(m) = &metrics {
            let ready = crate::api::MetricsReady {
                event: crate::api::ReadyEvent::Ready,
                metrics: m.addr().to_owned(),
            };
            let _ = writeln!(out, "{ready}");
        }
        let control = crate::api::ControlReady {
            event: crate::api::ReadyEvent::Ready,
            control: monitor.path().to_owned(),
        };
        let _ = writeln!(out, "{control}");
        let _ = out.flush();
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }
    if attach_help {
        for help in daemon.map_vhost_user_exports(attach_help_for) {
            eprintln!("{help}");
        }
    }
    let why = stop_rx.recv().unwrap_or(StopRequest::Monitor);
    match why {
        StopRequest::Signal(signal) => tracing::info!(
            signal,
            "shutting down (within {CLOSE_ALL_TIMEOUT_MS} ms; a second signal exits at once after a flush)"
        ),
        StopRequest::Monitor => tracing::info!("shutting down (monitor request)"),
    }
    let (done_tx, done_rx) = mpsc::channel();
    {
        let daemon = daemon.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(daemon.close_all());
        });
    }
    // Close-all runs on its own thread so that a second SIGINT/SIGTERM (an
    // impatient operator, or systemd's stop timeout) is heard meanwhile.
    let clean = loop {
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(clean) => break clean,
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(StopRequest::Signal(signal)) = stop_rx.try_recv() {
            tracing::error!(
                signal,
                "second signal during close-all; still pending: {}; flushing the nodes still open and exiting now",
                daemon.pending()
            );
            let flushed = daemon.emergency_flush();
            tracing::error!(
                "exiting before close-all finished ({})",
                if flushed {
                    "every open node flushed"
                } else {
                    "some flushes failed or did not finish: see above"
                }
            );
            stop_servers(monitor, metrics);
            return 1;
        }
    };
    stop_servers(monitor, metrics);
    if clean {
        tracing::info!("all exports detached and nodes flushed");
        0
    } else {
        tracing::error!("shutdown incomplete: see the errors above");
        1
    }
}

/// After close-all: the control socket and the metrics server stop (their
/// threads joined, their socket files removed).
fn stop_servers(monitor: Monitor, metrics: Option<MetricsServer>) {
    if let Some(m) = metrics {
        m.stop();
    }
    monitor.stop();
}

fn attach_help_for(x: &VhostUserExport) -> String {
    let sock = x
        .config()
        .socket
        .canonicalize()
        .unwrap_or_else(|_| x.config().socket.clone());
    format!(
        "\nsluice serves {} over {}. Attach it to QEMU with:\n  \
         qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \\\n    \
         -machine q35,memory-backend=mem \\\n    \
         -chardev socket,id=disk0,path={},reconnect-ms=1000 \\\n    \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={} ...\n\
         (reconnect-ms, QEMU 9.2+, or reconnect=1 before: the VM waits out a restart of sluice\n\
         and its requests in flight run again.)\n\
         Stop with Ctrl-C: in-flight requests finish and the image is flushed.",
        x.node().spec(),
        sock.display(),
        sock.display(),
        x.config().queues,
    )
}
