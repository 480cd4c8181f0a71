//! The `sluice` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sluice::config::{
    DiskConfig, ExportConfig, ExportKind, ServeConfig, DEFAULT_SOCKET_MODE, EMBEDDED_DEFAULT,
};
use sluice::limits::{DEFAULT_POLL_WINDOW_US, DEFAULT_QUEUES, DEFAULT_QUEUE_DEPTH};
use sluice::node::DiskSpec;

/// A userspace block-device backend: serves drives and images to VMs over
/// vhost-user-blk, one io_uring ring per queue, O_DIRECT.
#[derive(Debug, Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disks until SIGINT/SIGTERM. With no arguments, serves a sparse
    /// 1 GiB image ./sluice-disk.img over ./sluice.sock.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML file describing disks and exports.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["disk", "vhost_user", "ublk"])]
    config: Option<PathBuf>,
    /// Backing block device or file, or null:SIZE (e.g. null:1G).
    #[arg(long, value_name = "PATH|null:SIZE")]
    disk: Option<String>,
    /// vhost-user-blk socket to serve the disk on.
    #[arg(long, value_name = "SOCKET", requires = "disk")]
    vhost_user: Option<PathBuf>,
    /// Also (or instead) serve the disk as /dev/ublkbN through the kernel's
    /// ublk driver; ID picks N, default: the driver chooses.
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "auto", requires = "disk")]
    ublk: Option<String>,
    /// Number of queues (one worker thread and io_uring ring each).
    #[arg(long, default_value_t = DEFAULT_QUEUES)]
    queues: u16,
    /// In-flight requests per queue.
    #[arg(long, default_value_t = DEFAULT_QUEUE_DEPTH)]
    queue_depth: u16,
    /// Refuse writes, discards and write-zeroes.
    #[arg(long)]
    read_only: bool,
    /// Serial number the guest reads (GET_ID, 20 bytes at most).
    #[arg(long)]
    serial: Option<String>,
    /// Microseconds an idle queue keeps polling before it sleeps.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_WINDOW_US)]
    poll_us: u32,
    /// Socket file mode (octal).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("not an octal mode: {e}"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let Some(Command::Serve(args)) = cli
        .command
        .or_else(|| Cli::parse_from(["sluice", "serve"]).command)
    else {
        unreachable!("`sluice serve` parses");
    };
    let (config, attach_help) = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    match sluice::daemon::serve(&config, attach_help) {
        0 => ExitCode::SUCCESS,
        code => ExitCode::from(code.clamp(1, 255) as u8),
    }
}

fn build_config(args: &ServeArgs) -> Result<(ServeConfig, bool), String> {
    let cwd = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        let base = path.parent().map(|p| cwd.join(p)).unwrap_or(cwd);
        let config = ServeConfig::from_toml(&text, &base)
            .map_err(|e| format!("config {}: {e}", path.display()))?;
        return Ok((config, false));
    }
    let Some(disk) = &args.disk else {
        let config = ServeConfig::from_toml(EMBEDDED_DEFAULT, &cwd)
            .map_err(|e| format!("embedded default: {e}"))?;
        return Ok((config, true));
    };
    if args.vhost_user.is_none() && args.ublk.is_none() {
        return Err("--disk needs an export: --vhost-user SOCKET and/or --ublk [ID]".into());
    }
    let spec = DiskSpec::parse(disk).map_err(|e| e.to_string())?;
    let export = |name: String, kind: ExportKind| ExportConfig {
        name,
        disk: "disk0".into(),
        kind,
        queues: args.queues,
        queue_depth: args.queue_depth,
        read_only: args.read_only,
        serial: args.serial.clone().unwrap_or_else(|| "sluice".into()),
        poll_window_us: args.poll_us,
    };
    let mut exports = Vec::new();
    if let Some(socket) = &args.vhost_user {
        let name = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vhost-user".into());
        exports.push(export(
            name,
            ExportKind::VhostUser {
                socket: cwd.join(socket),
                socket_mode: args.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
            },
        ));
    }
    if let Some(id) = &args.ublk {
        let id = match id.as_str() {
            "auto" => None,
            n => Some(
                n.parse::<u32>()
                    .map_err(|_| format!("--ublk {n:?}: expected a device number"))?,
            ),
        };
        exports.push(export("ublk".into(), ExportKind::Ublk { id }));
    }
    let config = ServeConfig {
        disks: vec![DiskConfig {
            name: "disk0".into(),
            spec,
            read_only: args.read_only,
            create_size_bytes: None,
        }],
        exports,
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok((config, false))
}
