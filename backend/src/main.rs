//! The `sluice` command line.

use std::num::ParseIntError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sluice::api::{
    ByteRate, DiskParams, ExportParams, ExportQosParams, ExportRemoveParams, JobIdParams,
    JobStatus, MirrorParams, NameParams, NoParams, QosSpec, RemoveMode,
};
use sluice::config::{
    ConfigError, DiskConfig, ExportConfig, ExportKind, MetricsAddr, ServeConfig,
    DEFAULT_SOCKET_MODE, EMBEDDED_DEFAULT,
};
use sluice::limits::{
    DEFAULT_POLL_WINDOW_US, DEFAULT_QUEUES, DEFAULT_QUEUE_DEPTH, MAX_POLL_WINDOW_US, MAX_QUEUES,
    MAX_QUEUE_DEPTH,
};
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
    /// Talk to a running daemon through its control socket.
    Ctl(CtlArgs),
    /// For udev (`IMPORT{program}` in udev/60-sluice.rules): the properties
    /// of block device DEVNAME, `SLUICE_EXPORT=<export>` for a ublkbN that
    /// sluice serves, nothing otherwise.
    UdevInfo {
        /// The kernel's device name (`%k`), e.g. ublkb0.
        devname: String,
    },
    /// Write the man pages (sluice.8 and one per command, roff) into DIR;
    /// the package is built with them.
    #[command(hide = true)]
    Manpages {
        /// Where the pages go.
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// Control socket (default: $RUNTIME_DIRECTORY/control.sock, else
    /// $XDG_RUNTIME_DIR/sluice/control.sock, else /run/sluice/control.sock).
    #[arg(long, value_name = "PATH", global = true)]
    control: Option<PathBuf>,
    /// Print the JSON result instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// List nodes and who holds them.
    Nodes,
    /// Open a node (held by the monitor).
    NodeAdd {
        /// Node name.
        name: String,
        /// Block device, image file, or null:SIZE.
        disk: String,
        /// Open without write access.
        #[arg(long)]
        read_only: bool,
        /// Create the image sparse with this size if it is missing.
        #[arg(long, value_name = "SIZE")]
        create_size: Option<String>,
    },
    /// Flush and close a node nobody else holds.
    NodeRemove {
        /// Node name.
        name: String,
    },
    /// Open a removed node's drive again (the same drive came back at its
    /// path); its exports serve it again.
    NodeReopen {
        /// Node name.
        name: String,
    },
    /// List exports with their counters.
    Exports,
    /// Start an export on a node.
    ExportAdd {
        /// Export name.
        name: String,
        /// The node to serve.
        #[arg(long)]
        node: String,
        /// Serve over this vhost-user-blk socket.
        #[arg(long, value_name = "SOCKET", conflicts_with = "ublk")]
        vhost_user: Option<PathBuf>,
        /// Serve as /dev/ublkbID (driver picks ID if omitted).
        #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "auto")]
        ublk: Option<String>,
        /// ublk: no crash recovery (if sluice dies, the device goes and its I/O fails).
        #[arg(long, requires = "ublk")]
        ublk_no_recovery: bool,
        /// Number of queues.
        #[arg(long, value_parser = queues_parser())]
        queues: Option<u16>,
        /// In-flight requests per queue.
        #[arg(long, value_parser = queue_depth_parser())]
        queue_depth: Option<u16>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Serial (GET_ID).
        #[arg(long)]
        serial: Option<String>,
        /// Polling window in µs.
        #[arg(long, value_parser = poll_us_parser())]
        poll_us: Option<u32>,
    },
    /// Detach an export: waits for in-flight requests, or fails them with --force.
    ExportRemove {
        /// Export name.
        name: String,
        /// Do not wait for in-flight requests.
        #[arg(long)]
        force: bool,
    },
    /// Counters and latency percentiles of one export.
    Stats {
        /// Export name.
        name: String,
    },
    /// Set, lift (--clear) or show the QoS limits of an export (of its
    /// group, when it is in one). The limits given replace all the group's
    /// limits; one not given is lifted.
    Qos {
        /// Export name.
        export: String,
        /// Move the export into this QoS group first (the group's limits
        /// apply to the sum of its exports).
        #[arg(long)]
        group: Option<String>,
        /// Lift every limit.
        #[arg(long, conflicts_with_all = ["iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps", "burst"])]
        clear: bool,
        #[command(flatten)]
        limits: QosArgs,
    },
    /// Start a mirror job: copy NODE to TARGET while it is served.
    Mirror {
        /// Source node.
        #[arg(long)]
        node: String,
        /// Target node (add it first with node-add).
        #[arg(long)]
        target: String,
        /// Job id (default: mirrorN).
        #[arg(long)]
        id: Option<String>,
        /// Copy chunk in bytes.
        #[arg(long)]
        chunk_bytes: Option<u64>,
        /// Chunk copies in flight.
        #[arg(long)]
        max_in_flight: Option<u16>,
        /// Show a progress bar until the job is ready.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs with their progress.
    Jobs,
    /// One job's status; --wait shows a progress bar until it is ready.
    JobStatus {
        /// Job id.
        id: String,
        /// Wait for the job to become ready.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a job; its target is flushed, the source is untouched.
    JobCancel {
        /// Job id.
        id: String,
    },
    /// Pivot a ready mirror: its exports switch to the target.
    JobComplete {
        /// Job id.
        id: String,
    },
    /// Close everything in order and stop the daemon.
    Shutdown,
    /// Call any method with JSON params (see `sluice ctl methods`).
    Call {
        /// Method name.
        method: String,
        /// Params as a JSON object.
        params: Option<String>,
    },
    /// List the monitor's methods.
    Methods,
    /// Print the daemon's events (exports and nodes added and removed, job
    /// progress, frontends connecting, a drive removed...) as they come,
    /// one per line, until the daemon stops or Ctrl-C.
    Events,
    /// A live view of every export's load, refreshed every interval: IOPS,
    /// MB/s read and written, mean and p99 latency of the interval, requests
    /// in flight, errors per second, busiest first. Keys: q quits, p shows
    /// the queues. When stdout is not a terminal, prints one snapshot (two
    /// samples one interval apart) as a plain table and exits.
    Top {
        /// Refresh interval in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = sluice::ctl::top::TOP_DEFAULT_INTERVAL_MS,
              value_parser = clap::value_parser!(u64).range(
                  sluice::ctl::top::TOP_MIN_INTERVAL_MS..=sluice::ctl::top::TOP_MAX_INTERVAL_MS))]
        interval_ms: u64,
        /// Start with each export's queues shown (the p key toggles them).
        #[arg(long)]
        per_queue: bool,
    },
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
    /// The ublk device without crash recovery: if sluice dies, the device
    /// goes and its I/O fails (by default the kernel keeps it, holding its
    /// I/O, and the same command started again takes it over).
    #[arg(long, requires = "ublk")]
    ublk_no_recovery: bool,
    /// Number of queues (one worker thread and io_uring ring each).
    #[arg(long, default_value_t = DEFAULT_QUEUES, value_parser = queues_parser())]
    queues: u16,
    /// In-flight requests per queue.
    #[arg(long, default_value_t = DEFAULT_QUEUE_DEPTH, value_parser = queue_depth_parser())]
    queue_depth: u16,
    /// Refuse writes, discards and write-zeroes.
    #[arg(long)]
    read_only: bool,
    /// Serial number the guest reads (GET_ID, 20 bytes at most).
    #[arg(long)]
    serial: Option<String>,
    /// Microseconds an idle queue keeps polling before it sleeps.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_WINDOW_US, value_parser = poll_us_parser())]
    poll_us: u32,
    /// Socket file mode (octal).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Control socket for `sluice ctl` (default under the runtime directory).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at GET /metrics on ADDR: an IP address and
    /// port (127.0.0.1:9412), or a UNIX socket path (/run/sluice/metrics.sock,
    /// unix:metrics.sock). Default: not served.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    #[command(flatten)]
    qos: ServeQosArgs,
}

/// QoS limits on the command line (`serve --qos-*`, `ctl qos`).
#[derive(Debug, Default, clap::Args)]
struct QosArgs {
    /// Requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    iops: Option<i64>,
    /// Read requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    read_iops: Option<i64>,
    /// Write requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    write_iops: Option<i64>,
    /// Bytes per second (200M, 1G, bytes).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    bps: Option<String>,
    /// Bytes per second read.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    read_bps: Option<String>,
    /// Bytes per second written.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    write_bps: Option<String>,
    /// Seconds of each rate an idle export may send at once (default 0.1).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    burst: Option<f64>,
}

impl QosArgs {
    /// The limits given, if any.
    fn spec(&self) -> Option<QosSpec> {
        let rate = |v: &Option<String>| v.clone().map(ByteRate::Text);
        let spec = QosSpec {
            iops: self.iops,
            read_iops: self.read_iops,
            write_iops: self.write_iops,
            bps: rate(&self.bps),
            read_bps: rate(&self.read_bps),
            write_bps: rate(&self.write_bps),
            burst_seconds: self.burst,
        };
        (spec != QosSpec::default()).then_some(spec)
    }
}

/// `serve --qos-*`: the one-disk command line's limits.
#[derive(Debug, Default, clap::Args)]
struct ServeQosArgs {
    /// QoS: requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    qos_iops: Option<i64>,
    /// QoS: read requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    qos_read_iops: Option<i64>,
    /// QoS: write requests per second.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    qos_write_iops: Option<i64>,
    /// QoS: bytes per second (200M, 1G, bytes).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    qos_bps: Option<String>,
    /// QoS: bytes per second read.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    qos_read_bps: Option<String>,
    /// QoS: bytes per second written.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    qos_write_bps: Option<String>,
    /// QoS: seconds of each rate an idle export may send at once (default 0.1).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    qos_burst: Option<f64>,
}

impl ServeQosArgs {
    fn spec(&self) -> Option<QosSpec> {
        QosArgs {
            iops: self.qos_iops,
            read_iops: self.qos_read_iops,
            write_iops: self.qos_write_iops,
            bps: self.qos_bps.clone(),
            read_bps: self.qos_read_bps.clone(),
            write_bps: self.qos_write_bps.clone(),
            burst: self.qos_burst,
        }
        .spec()
    }
}

/// Why the command line was refused before anything was started or sent:
/// `sluice: <message>` (or `sluice ctl: <message>`) and exit code 2.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The current directory, which relative paths are taken from, is gone.
    #[error("current directory: {0}")]
    CurrentDir(#[source] std::io::Error),
    /// The `--config` file could not be read.
    #[error("config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `--config` file was refused.
    #[error("config {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    /// The configuration built into the binary was refused (a bug).
    #[error("embedded default: {0}")]
    EmbeddedDefault(#[source] ConfigError),
    /// The configuration the options describe was refused.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A `--qos-*` value was refused.
    #[error("--qos-{option}: {reason}")]
    Qos { option: String, reason: String },
    /// `--disk` without `--vhost-user` or `--ublk`.
    #[error("--disk needs an export: --vhost-user SOCKET and/or --ublk [ID]")]
    DiskWithoutExport,
    /// `ctl export-add` without `--vhost-user` or `--ublk`.
    #[error("export-add needs --vhost-user SOCKET or --ublk [ID]")]
    ExportWithoutEndpoint,
    /// `--ublk ID` is not a number.
    #[error("--ublk {given:?}: expected a device number")]
    UblkId {
        given: String,
        #[source]
        source: ParseIntError,
    },
    /// `--socket-mode` is not octal.
    #[error("not an octal mode: {0}")]
    SocketMode(#[source] ParseIntError),
    /// A path that must go into JSON as text is not UTF-8.
    #[error("{0}: not a UTF-8 path")]
    NotUtf8Path(PathBuf),
    /// The params `ctl call` was given are not JSON.
    #[error("params: {0}")]
    CallParams(#[source] serde_json::Error),
    /// A request's params do not serialize.
    #[error("params: {0}")]
    Params(#[source] serde_json::Error),
}

/// Counts heap allocations, so the monitor can show the request path makes
/// none (see `sluice::alloc`).
#[global_allocator]
static ALLOCATOR: sluice::alloc::CountingAllocator = sluice::alloc::CountingAllocator;

// Numbers are parsed with their real limits, so an error states the range
// that is accepted, not the range of the integer type.
fn queues_parser() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES))
}

fn queue_depth_parser() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUE_DEPTH))
}

fn poll_us_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(0..=i64::from(MAX_POLL_WINDOW_US))
}

fn parse_mode(s: &str) -> Result<u32, CliError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(CliError::SocketMode)
}

fn main() -> ExitCode {
    sluice::logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A bad value is one line, like every other refused argument;
        // usage errors, --help and --version keep clap's own output.
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("sluice: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let args = match cli.command {
        Some(Command::Serve(a)) => a,
        Some(Command::Ctl(c)) => return ctl(c),
        Some(Command::Manpages { dir }) => {
            return match write_manpages(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice manpages: {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            };
        }
        Some(Command::UdevInfo { devname }) => {
            print!("{}", sluice::udev::properties(&devname));
            return ExitCode::SUCCESS;
        }
        None => match Cli::parse_from(["sluice", "serve"]).command {
            Some(Command::Serve(a)) => a,
            _ => unreachable!("`sluice serve` parses"),
        },
    };
    let (config, attach_help) = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    match sluice::lifecycle::serve(&config, attach_help) {
        0 => ExitCode::SUCCESS,
        code => ExitCode::from(code.clamp(1, 255) as u8),
    }
}

fn build_config(args: &ServeArgs) -> Result<(ServeConfig, bool), CliError> {
    let cwd = std::env::current_dir().map_err(CliError::CurrentDir)?;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
            path: path.clone(),
            source,
        })?;
        let base = path
            .parent()
            .map(|p| cwd.join(p))
            .unwrap_or_else(|| cwd.clone());
        let refused = |source| CliError::Config {
            path: path.clone(),
            source,
        };
        let mut config = ServeConfig::from_toml(&text, &base).map_err(refused)?;
        if let Some(c) = &args.control {
            config.control = Some(cwd.join(c));
        }
        if let Some(m) = &args.metrics {
            config.metrics = Some(MetricsAddr::parse(m, &cwd)?);
        }
        if args.control.is_some() || args.metrics.is_some() {
            config.validate().map_err(refused)?;
        }
        return Ok((config, false));
    }
    let metrics = |cwd: &Path| {
        args.metrics
            .as_deref()
            .map(|m| MetricsAddr::parse(m, cwd))
            .transpose()
    };
    let Some(disk) = &args.disk else {
        let mut config =
            ServeConfig::from_toml(EMBEDDED_DEFAULT, &cwd).map_err(CliError::EmbeddedDefault)?;
        config.control = args.control.as_ref().map(|c| cwd.join(c));
        config.metrics = metrics(&cwd)?;
        config.validate()?;
        return Ok((config, true));
    };
    if args.vhost_user.is_none() && args.ublk.is_none() {
        return Err(CliError::DiskWithoutExport);
    }
    let spec = DiskSpec::parse(disk).map_err(ConfigError::from)?;
    let qos = args
        .qos
        .spec()
        .map(|q| q.resolve())
        .transpose()
        .map_err(|e| CliError::Qos {
            option: e.key.replace('_', "-").replace("burst-seconds", "burst"),
            reason: e.reason,
        })?;
    let export = |name: String, kind: ExportKind| ExportConfig {
        qos: qos.clone(),
        qos_group: None,
        name,
        disk: "disk0".into(),
        kind,
        queues: args.queues,
        queue_depth: args.queue_depth,
        read_only: args.read_only,
        serial: args.serial.clone().unwrap_or_else(|| "sluice".into()),
        poll_window_us: args.poll_us,
        on_removed: Default::default(),
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
            n => Some(parse_ublk_id(n)?),
        };
        exports.push(export(
            "ublk".into(),
            ExportKind::Ublk {
                id,
                recovery: !args.ublk_no_recovery,
            },
        ));
    }
    let config = ServeConfig {
        disks: vec![DiskConfig {
            name: "disk0".into(),
            spec,
            read_only: args.read_only,
            create_size_bytes: None,
            reattach: false,
        }],
        control: Some(match &args.control {
            Some(c) => cwd.join(c),
            None => one_liner_control_path(&exports),
        }),
        exports,
        metrics: metrics(&cwd)?,
    };
    config.validate()?;
    Ok((config, false))
}

/// sluice.8 and sluice-COMMAND.8 for every command that is not hidden.
fn write_manpages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cli = <Cli as clap::CommandFactory>::command();
    let page = |cmd: clap::Command, file: String| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .section("8")
            .date(env!("CARGO_PKG_VERSION"))
            .render(&mut out)?;
        std::fs::write(dir.join(file), out)
    };
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("sluice-{}", sub.get_name());
        page(sub.clone().name(name.clone()), format!("{name}.8"))?;
    }
    page(cli, "sluice.8".into())
}

/// `sluice ctl events`: one line per event, JSON with `--json`.
fn ctl_events(path: &std::path::Path, json: bool) -> ExitCode {
    let result = sluice::ctl::CtlClient::connect(path).and_then(|mut c| {
        c.call("events_subscribe", serde_json::json!({}))?;
        while let Some(event) = c.next_notification()? {
            let line = if json {
                event.to_string()
            } else {
                sluice::ctl::render_event(&event)
            };
            println!("{line}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// A one-liner's control socket when none is given: the service's
/// `$RUNTIME_DIRECTORY/control.sock` under systemd; otherwise one per
/// export, so that one-liners side by side never collide: next to the
/// vhost-user socket (`vm0.sock` → `vm0.control.sock`), or for ublk in the
/// default directory (`ublk3.control.sock`).
fn one_liner_control_path(exports: &[ExportConfig]) -> PathBuf {
    let default = sluice::config::default_control_path();
    if std::env::var_os("RUNTIME_DIRECTORY").is_some() {
        return default;
    }
    let dir = default.parent().map(PathBuf::from).unwrap_or_default();
    match exports.first().map(|e| &e.kind) {
        Some(ExportKind::VhostUser { socket, .. }) => {
            let stem = socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "vhost-user".into());
            socket.with_file_name(format!("{stem}.control.sock"))
        }
        Some(ExportKind::Ublk { id: Some(id), .. }) => dir.join(format!("ublk{id}.control.sock")),
        _ => default,
    }
}

/// The device number of `--ublk ID`.
fn parse_ublk_id(given: &str) -> Result<u32, CliError> {
    given.parse().map_err(|source| CliError::UblkId {
        given: given.to_owned(),
        source,
    })
}

fn ctl(args: CtlArgs) -> ExitCode {
    let path = args
        .control
        .clone()
        .unwrap_or_else(sluice::config::default_control_path);
    if let CtlCommand::Events = args.command {
        return ctl_events(&path, args.json);
    }
    if let CtlCommand::Top {
        interval_ms,
        per_queue,
    } = args.command
    {
        let interval = std::time::Duration::from_millis(interval_ms);
        return match sluice::ctl::top::run(&path, interval, per_queue) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice ctl top: {e}");
                ExitCode::from(1)
            }
        };
    }
    let wait_for = match &args.command {
        CtlCommand::Mirror { wait: true, .. } => Some(None),
        CtlCommand::JobStatus { id, wait: true } => Some(Some(id.clone())),
        _ => None,
    };
    let (method, params) = match ctl_request(&args.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let waiting = wait_for.is_some();
    let call_method = method.clone();
    let result = sluice::ctl::CtlClient::connect(&path).and_then(|mut c| {
        let v = c.call(&call_method, params)?;
        match wait_for {
            Some(id) => {
                let id = match id {
                    Some(id) => id,
                    None => c.read_answer::<JobStatus>(&call_method, &v)?.id,
                };
                sluice::ctl::wait_for_job(&mut c, &id, !args.json)
            }
            None => Ok(v),
        }
    });
    let method = if waiting {
        "job_status".to_owned()
    } else {
        method
    };
    // --json prints the result as it came; a table needs it to read as the
    // method's result.
    let shown = result.and_then(|v| {
        if args.json {
            Ok(serde_json::to_string_pretty(&v).unwrap_or_default())
        } else {
            sluice::ctl::render(&method, &v, &path)
        }
    });
    match shown {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// `p` as the params of a request.
fn params(p: &impl serde::Serialize) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(p).map_err(CliError::Params)
}

/// `p` as a string, for params that carry a path as text.
fn path_text(p: PathBuf) -> Result<String, CliError> {
    p.into_os_string()
        .into_string()
        .map_err(|p| CliError::NotUtf8Path(p.into()))
}

fn ctl_request(cmd: &CtlCommand) -> Result<(String, serde_json::Value), CliError> {
    let abs = |p: &PathBuf| {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.clone())
    };
    let job = |id: &String| params(&JobIdParams { id: id.clone() });
    Ok(match cmd {
        CtlCommand::Nodes => ("node_list".into(), params(&NoParams {})?),
        CtlCommand::NodeAdd {
            name,
            disk,
            read_only,
            create_size,
        } => {
            let path = if disk.starts_with("null:") {
                disk.clone()
            } else {
                path_text(abs(&PathBuf::from(disk)))?
            };
            let p = DiskParams {
                name: name.clone(),
                path,
                read_only: *read_only,
                create_size: create_size.clone(),
                reattach: false,
            };
            ("node_add".into(), params(&p)?)
        }
        CtlCommand::NodeReopen { name } => (
            "node_reopen".into(),
            params(&NameParams { name: name.clone() })?,
        ),
        CtlCommand::NodeRemove { name } => (
            "node_remove".into(),
            params(&NameParams { name: name.clone() })?,
        ),
        CtlCommand::Exports => ("export_list".into(), params(&NoParams {})?),
        CtlCommand::ExportAdd {
            name,
            node,
            vhost_user,
            ublk,
            ublk_no_recovery,
            queues,
            queue_depth,
            read_only,
            serial,
            poll_us,
        } => {
            let (kind, socket, ublk_id) = match (vhost_user, ublk) {
                (Some(sock), None) => ("vhost-user", Some(abs(sock)), None),
                (None, Some(id)) if id == "auto" => ("ublk", None, None),
                (None, Some(id)) => ("ublk", None, Some(parse_ublk_id(id)?)),
                _ => return Err(CliError::ExportWithoutEndpoint),
            };
            let p = ExportParams {
                name: name.clone(),
                disk: node.clone(),
                kind: kind.into(),
                socket,
                socket_mode: None,
                ublk_id,
                ublk_recovery: ublk_no_recovery.then_some(false),
                on_removed: None,
                queues: queues.map(u64::from),
                queue_depth: queue_depth.map(u64::from),
                read_only: *read_only,
                serial: serial.clone(),
                poll_us: poll_us.map(u64::from),
                qos: None,
                qos_group: None,
            };
            ("export_add".into(), params(&p)?)
        }
        CtlCommand::ExportRemove { name, force } => {
            let p = ExportRemoveParams {
                name: name.clone(),
                mode: if *force {
                    RemoveMode::Force
                } else {
                    RemoveMode::Safe
                },
            };
            ("export_remove".into(), params(&p)?)
        }
        CtlCommand::Stats { name } => (
            "export_stats".into(),
            params(&NameParams { name: name.clone() })?,
        ),
        CtlCommand::Qos {
            export,
            group,
            clear,
            limits,
        } => {
            let p = ExportQosParams {
                export: export.clone(),
                group: group.clone(),
                qos: limits.spec(),
                clear: *clear,
            };
            ("export_qos".into(), params(&p)?)
        }
        CtlCommand::Mirror {
            node,
            target,
            id,
            chunk_bytes,
            max_in_flight,
            ..
        } => {
            let p = MirrorParams {
                id: id.clone(),
                node: node.clone(),
                target: target.clone(),
                chunk_bytes: *chunk_bytes,
                max_in_flight: *max_in_flight,
            };
            ("job_mirror".into(), params(&p)?)
        }
        CtlCommand::Jobs => ("job_list".into(), params(&NoParams {})?),
        CtlCommand::JobStatus { id, .. } => ("job_status".into(), job(id)?),
        CtlCommand::JobCancel { id } => ("job_cancel".into(), job(id)?),
        CtlCommand::JobComplete { id } => ("job_complete".into(), job(id)?),
        CtlCommand::Shutdown => ("shutdown".into(), params(&NoParams {})?),
        CtlCommand::Methods => ("rpc_methods".into(), params(&NoParams {})?),
        CtlCommand::Events => ("events_subscribe".into(), params(&NoParams {})?),
        CtlCommand::Top { .. } => ("export_counters".into(), params(&NoParams {})?),
        CtlCommand::Call { method, params } => {
            let p = match params {
                Some(text) => serde_json::from_str(text).map_err(CliError::CallParams)?,
                None => serde_json::json!({}),
            };
            (method.clone(), p)
        }
    })
}
