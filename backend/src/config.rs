//! What `sluice serve` runs: disks and exports, from the command line or a
//! TOML file, validated before anything is opened or bound.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{ByteRate, DiskParams, ExportParams, QosLimits, QosSpec};
use crate::limits::{
    DEFAULT_POLL_WINDOW_US, DEFAULT_QUEUES, DEFAULT_QUEUE_DEPTH, MAX_POLL_WINDOW_US, MAX_QUEUES,
    MAX_QUEUE_DEPTH, QOS_MAX_BURST_SECONDS, QOS_MIN_BURST_SECONDS,
};
use crate::node::{DiskSpec, SpecError};
use crate::size::{parse_size_bytes, SizeError};
use crate::unix_socket::path_key;

/// The configuration `sluice serve` runs when given no arguments: a sparse
/// 1 GiB image in the current directory, served over `./sluice.sock`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// A validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Backing nodes, by name.
    pub disks: Vec<DiskConfig>,
    /// Exports, each naming one disk.
    pub exports: Vec<ExportConfig>,
    /// Control socket path; `None` for the default (see `monitor`).
    pub control: Option<PathBuf>,
    /// Where to serve Prometheus metrics; `None`: not served.
    pub metrics: Option<MetricsAddr>,
}

/// Where `GET /metrics` is served (`--metrics`, `[daemon] metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address with a numeric IP (`127.0.0.1:9412`, `[::1]:9412`).
    Tcp(std::net::SocketAddr),
    /// A UNIX socket path (`/run/sluice/metrics.sock`, `unix:metrics.sock`).
    Unix(PathBuf),
}

impl MetricsAddr {
    /// Parses `text`: a path starting with `/`, or anything after `unix:`,
    /// is a UNIX socket (a relative one is taken from `base_dir`); anything
    /// else must be an IP address and port.
    pub fn parse(text: &str, base_dir: &Path) -> Result<MetricsAddr, ConfigError> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConfigError::MetricsAddr(text.to_owned()));
            }
            return Ok(MetricsAddr::Unix(resolve(base_dir, Path::new(path))));
        }
        if text.starts_with('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        text.parse()
            .map(MetricsAddr::Tcp)
            .map_err(|_| ConfigError::MetricsAddr(text.to_owned()))
    }
}

impl std::fmt::Display for MetricsAddr {
    /// `127.0.0.1:9412`, or `unix:/run/sluice/metrics.sock`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One backing node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Name exports refer to.
    pub name: String,
    /// Path or `null:SIZE`.
    pub spec: DiskSpec,
    /// Open without write access.
    pub read_only: bool,
    /// Create the image file sparse with this size if it is missing.
    pub create_size_bytes: Option<u64>,
    /// Reopen it when its removed drive comes back.
    pub reattach: bool,
}

/// One export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Export name.
    pub name: String,
    /// Disk it serves.
    pub disk: String,
    /// Protocol and endpoint.
    pub kind: ExportKind,
    /// Number of queues.
    pub queues: u16,
    /// In-flight requests per queue.
    pub queue_depth: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial (GET_ID); defaults to the export name.
    pub serial: String,
    /// Polling window.
    pub poll_window_us: u32,
    /// What the export does when its node's drive goes away.
    pub on_removed: crate::api::OnRemoved,
    /// QoS limits (of its group, when it is in one); `None`: none given.
    pub qos: Option<QosLimits>,
    /// The QoS group it is in.
    pub qos_group: Option<String>,
}

/// Protocol of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportKind {
    /// vhost-user-blk on a UNIX socket.
    VhostUser {
        /// Socket path.
        socket: PathBuf,
        /// Socket file mode.
        socket_mode: u32,
    },
    /// `/dev/ublkbN` through the kernel's ublk driver.
    Ublk {
        /// Device id to ask for; `None` lets the driver choose.
        id: Option<u32>,
        /// Create it with user recovery (a restarted sluice takes it over).
        recovery: bool,
    },
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

/// Why a configuration was refused: one variant per refusal, each message
/// naming the disk or export and what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML does not parse, or has a field that does not belong or lacks
    /// one that must be there.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A disk's `path` is not a path or `null:SIZE`.
    #[error("{0}")]
    DiskSpec(#[from] SpecError),
    /// A disk has an empty name.
    #[error("a disk needs a name")]
    DiskWithoutName,
    /// Two disks have the same name.
    #[error("disk name {disk:?} used twice")]
    DuplicateDisk {
        /// The name.
        disk: String,
    },
    /// A disk's `create_size` does not parse.
    #[error("disk {disk:?}: create_size: {source}")]
    CreateSize {
        /// The disk.
        disk: String,
        /// Why the size does not parse.
        #[source]
        source: SizeError,
    },
    /// A null disk has a `create_size`.
    #[error("disk {disk:?}: create_size makes no sense for a null disk")]
    CreateSizeOnNull {
        /// The disk.
        disk: String,
    },
    /// An export has an empty name.
    #[error("an export needs a name")]
    ExportWithoutName,
    /// Two exports have the same name.
    #[error("export {export:?}: name used twice")]
    DuplicateExport {
        /// The name.
        export: String,
    },
    /// An export's `type` is not one sluice serves.
    #[error("export {export:?}: unknown type {kind:?} (supported: \"vhost-user\", \"ublk\")")]
    UnknownType {
        /// The export.
        export: String,
        /// The type it asks for.
        kind: String,
    },
    /// A vhost-user export has no `socket`.
    #[error("export {export:?}: type vhost-user needs socket = \"PATH\"")]
    MissingSocket {
        /// The export.
        export: String,
    },
    /// An export serves a disk that is not configured.
    #[error("export {export:?}: no disk named {disk:?}")]
    NoSuchDisk {
        /// The export.
        export: String,
        /// The disk it names.
        disk: String,
    },
    /// A number an export sets is outside its range.
    #[error("export {export:?}: {source}")]
    ExportSetting {
        /// The export.
        export: String,
        /// The setting and its range.
        #[source]
        source: OutOfRange,
    },
    /// An export's polling window is longer than the longest allowed.
    #[error("export {export:?}: poll_us must be at most {MAX_POLL_WINDOW_US}, not {poll_us}")]
    PollWindowTooLong {
        /// The export.
        export: String,
        /// The window asked for.
        poll_us: u32,
    },
    /// An export's `socket_mode` has bits beyond the permission bits.
    #[error("export {export:?}: socket_mode {mode:o} is not a permission mode")]
    SocketMode {
        /// The export.
        export: String,
        /// The mode asked for.
        mode: u32,
    },
    /// An export's socket is the control socket.
    #[error(
        "export {export:?}: socket {socket} is also the control socket {control}; give one of \
         them another path"
    )]
    SocketIsControl {
        /// The export.
        export: String,
        /// Its socket, as given.
        socket: PathBuf,
        /// The control socket, as given (or the default).
        control: PathBuf,
    },
    /// Two exports name the same socket, however spelt.
    #[error(
        "export {export:?}: socket {socket} used twice (export {first:?} has it too, spelt \
         differently perhaps); give each export its own socket"
    )]
    DuplicateSocket {
        /// The second export.
        export: String,
        /// Its socket, as given.
        socket: PathBuf,
        /// The export that has it first.
        first: String,
    },
    /// Two ublk exports ask for the same device id.
    #[error("export {export:?}: ublk id {id} used twice")]
    DuplicateUblkId {
        /// The second export.
        export: String,
        /// The id.
        id: u32,
    },
    /// A number in `[daemon]` is outside its range.
    #[error("[daemon] {0}")]
    DaemonSetting(#[source] OutOfRange),
    /// The metrics address is neither an IP address and port nor a path.
    #[error(
        "metrics address {0:?}: expected an IP address and port (127.0.0.1:9412, [::1]:9412) \
         or a UNIX socket path (/run/sluice/metrics.sock, unix:metrics.sock)"
    )]
    MetricsAddr(String),
    /// The metrics socket is the control socket or an export's socket.
    #[error("metrics socket {socket} is also {what}; give it a path of its own")]
    MetricsSocketTaken {
        /// The metrics socket, as given.
        socket: PathBuf,
        /// "the control socket", "export \"vm0\"'s socket".
        what: String,
    },
    /// An export's QoS limits do not check out.
    #[error("export {export:?}: {source}")]
    Qos {
        /// The export.
        export: String,
        /// The limit and what is wrong with it.
        #[source]
        source: QosError,
    },
    /// Two exports of one QoS group give it different limits.
    #[error(
        "export {export:?}: QoS group {group:?} has other limits in export {first:?}; give the \
         group's limits in one export (or the same in each)"
    )]
    QosGroupConflict {
        /// The second export.
        export: String,
        /// The group.
        group: String,
        /// The export that set the group's limits first.
        first: String,
    },
}

/// Why a QoS limit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("qos.{key}: {reason}")]
pub struct QosError {
    /// The key (`iops`, `read_bps`, `burst_seconds`...).
    pub key: &'static str,
    /// What is wrong and what to write instead.
    pub reason: String,
}

impl QosSpec {
    /// Checks the limits: rates are positive whole numbers (bytes may have
    /// a suffix: `"200M"`), the burst is between 0.001 and 3600 seconds.
    pub fn resolve(&self) -> Result<QosLimits, QosError> {
        let iops = |key: &'static str, v: Option<i64>| -> Result<Option<u64>, QosError> {
            match v {
                None => Ok(None),
                Some(n) if n >= 1 => Ok(Some(n as u64)),
                Some(n) => Err(QosError {
                    key,
                    reason: format!(
                        "must be at least 1 request per second, not {n}; leave it out for no limit"
                    ),
                }),
            }
        };
        let bps = |key: &'static str, v: &Option<ByteRate>| -> Result<Option<u64>, QosError> {
            let n = match v {
                None => return Ok(None),
                Some(ByteRate::Number(n)) if *n < 0 => {
                    return Err(QosError {
                        key,
                        reason: format!("must be a positive number of bytes per second, not {n}"),
                    })
                }
                Some(ByteRate::Number(n)) => *n as u64,
                Some(ByteRate::Text(t)) => parse_size_bytes(t).map_err(|e| QosError {
                    key,
                    reason: format!("{e}; bytes per second"),
                })?,
            };
            if n == 0 {
                return Err(QosError {
                    key,
                    reason: "must be at least 1 byte per second, not 0; leave it out for no limit"
                        .into(),
                });
            }
            Ok(Some(n))
        };
        let burst_seconds = match self.burst_seconds {
            None => None,
            Some(b) if (QOS_MIN_BURST_SECONDS..=QOS_MAX_BURST_SECONDS).contains(&b) => Some(b),
            Some(b) => {
                return Err(QosError {
                    key: "burst_seconds",
                    reason: format!(
                        "must be {QOS_MIN_BURST_SECONDS}..={QOS_MAX_BURST_SECONDS} seconds, not {b}"
                    ),
                })
            }
        };
        let mut limits = QosLimits {
            iops: iops("iops", self.iops)?,
            read_iops: iops("read_iops", self.read_iops)?,
            write_iops: iops("write_iops", self.write_iops)?,
            bps: bps("bps", &self.bps)?,
            read_bps: bps("read_bps", &self.read_bps)?,
            write_bps: bps("write_bps", &self.write_bps)?,
            burst_seconds,
            group: None,
        };
        if limits.any() {
            limits.burst_seconds =
                Some(burst_seconds.unwrap_or(crate::limits::QOS_DEFAULT_BURST_SECONDS));
        }
        Ok(limits)
    }
}

/// Checks a QoS group's name: a non-empty word of letters, digits, `-`, `_`
/// and `.`.
pub fn check_qos_group(group: &str) -> Result<(), QosError> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(QosError {
            key: "group",
            reason: format!(
                "{group:?} is not a group name (1 to 64 letters, digits, '-', '_' or '.')"
            ),
        })
    }
}

/// A number outside the range its setting accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} must be {min}..={max}, not {value}")]
pub struct OutOfRange {
    /// The setting, as the file spells it (`queues`, `poll_us`, ...).
    pub setting: &'static str,
    /// Smallest value accepted.
    pub min: u64,
    /// Largest value accepted.
    pub max: u64,
    /// The value given.
    pub value: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    disk: Vec<DiskParams>,
    #[serde(default)]
    export: Vec<ExportParams>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    poll_us: Option<u64>,
    control: Option<PathBuf>,
    metrics: Option<String>,
}

/// Default socket mode: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// `value` (or `default` when absent) if it is in `min..=max`; else an error
/// that names the setting and the range.
fn in_range<T: TryFrom<u64>>(
    setting: &'static str,
    value: Option<u64>,
    default: T,
    min: u64,
    max: u64,
) -> Result<T, OutOfRange> {
    let Some(v) = value else {
        return Ok(default);
    };
    match T::try_from(v) {
        Ok(t) if (min..=max).contains(&v) => Ok(t),
        _ => Err(OutOfRange {
            setting,
            min,
            max,
            value: v,
        }),
    }
}

fn resolve(base_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base_dir.join(p)
    }
}

impl DiskParams {
    /// Checks and completes the disk; relative paths are taken from `base_dir`.
    pub fn resolve(self, base_dir: &Path) -> Result<DiskConfig, ConfigError> {
        let spec = match DiskSpec::parse(&self.path)? {
            DiskSpec::Path(p) => DiskSpec::Path(resolve(base_dir, &p)),
            null => null,
        };
        let create_size_bytes = self
            .create_size
            .as_deref()
            .map(parse_size_bytes)
            .transpose()
            .map_err(|source| ConfigError::CreateSize {
                disk: self.name.clone(),
                source,
            })?;
        let disk = DiskConfig {
            name: self.name,
            spec,
            read_only: self.read_only,
            create_size_bytes,
            reattach: self.reattach,
        };
        disk.validate()?;
        Ok(disk)
    }
}

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::DiskWithoutName);
        }
        if let (Some(_), DiskSpec::Null { .. }) = (self.create_size_bytes, &self.spec) {
            return Err(ConfigError::CreateSizeOnNull {
                disk: self.name.clone(),
            });
        }
        Ok(())
    }
}

impl ExportParams {
    /// Checks and completes the export; relative paths are taken from
    /// `base_dir`, the polling window defaults to `default_poll_us`.
    pub fn resolve(
        self,
        base_dir: &Path,
        default_poll_us: Option<u32>,
    ) -> Result<ExportConfig, ConfigError> {
        let kind = match self.kind.as_str() {
            "vhost-user" => {
                let Some(socket) = self.socket else {
                    return Err(ConfigError::MissingSocket { export: self.name });
                };
                ExportKind::VhostUser {
                    socket: resolve(base_dir, &socket),
                    socket_mode: self.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
                }
            }
            "ublk" => ExportKind::Ublk {
                id: self.ublk_id,
                recovery: self.ublk_recovery.unwrap_or(true),
            },
            other => {
                return Err(ConfigError::UnknownType {
                    export: self.name,
                    kind: other.to_owned(),
                })
            }
        };
        let setting = |source| ConfigError::ExportSetting {
            export: self.name.clone(),
            source,
        };
        let queues = in_range("queues", self.queues, DEFAULT_QUEUES, 1, MAX_QUEUES.into())
            .map_err(setting)?;
        let queue_depth = in_range(
            "queue_depth",
            self.queue_depth,
            DEFAULT_QUEUE_DEPTH,
            1,
            MAX_QUEUE_DEPTH.into(),
        )
        .map_err(setting)?;
        let poll_window_us = in_range(
            "poll_us",
            self.poll_us,
            default_poll_us.unwrap_or(DEFAULT_POLL_WINDOW_US),
            0,
            MAX_POLL_WINDOW_US.into(),
        )
        .map_err(setting)?;
        let qos_err = |source| ConfigError::Qos {
            export: self.name.clone(),
            source,
        };
        let qos = self
            .qos
            .as_ref()
            .map(QosSpec::resolve)
            .transpose()
            .map_err(qos_err)?;
        if let Some(group) = &self.qos_group {
            check_qos_group(group).map_err(qos_err)?;
        }
        let export = ExportConfig {
            qos,
            qos_group: self.qos_group,
            queues,
            queue_depth,
            poll_window_us,
            serial: self.serial.unwrap_or_else(|| self.name.clone()),
            name: self.name,
            disk: self.disk,
            kind,
            read_only: self.read_only,
            on_removed: self.on_removed.unwrap_or_default(),
        };
        export.validate()?;
        Ok(export)
    }
}

impl ExportConfig {
    /// Checks the export's own limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::ExportWithoutName);
        }
        let out_of_range = |setting, max: u16, value: u16| ConfigError::ExportSetting {
            export: self.name.clone(),
            source: OutOfRange {
                setting,
                min: 1,
                max: max.into(),
                value: value.into(),
            },
        };
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return Err(out_of_range("queues", MAX_QUEUES, self.queues));
        }
        if !(1..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return Err(out_of_range(
                "queue_depth",
                MAX_QUEUE_DEPTH,
                self.queue_depth,
            ));
        }
        if self.poll_window_us > MAX_POLL_WINDOW_US {
            return Err(ConfigError::PollWindowTooLong {
                export: self.name.clone(),
                poll_us: self.poll_window_us,
            });
        }
        if let ExportKind::VhostUser { socket_mode, .. } = &self.kind {
            if *socket_mode & !0o777 != 0 {
                return Err(ConfigError::SocketMode {
                    export: self.name.clone(),
                    mode: *socket_mode,
                });
            }
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Parses a TOML configuration. Relative paths are taken relative to
    /// `base_dir` (the config file's directory).
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text)?;
        let poll_us: Option<u32> = file
            .daemon
            .poll_us
            .map(|v| in_range("poll_us", Some(v), 0, 0, MAX_POLL_WINDOW_US.into()))
            .transpose()
            .map_err(ConfigError::DaemonSetting)?;
        let disks = file
            .disk
            .into_iter()
            .map(|d| d.resolve(base_dir))
            .collect::<Result<Vec<_>, _>>()?;
        let exports = file
            .export
            .into_iter()
            .map(|e| e.resolve(base_dir, poll_us))
            .collect::<Result<Vec<_>, _>>()?;
        let control = file.daemon.control.map(|p| resolve(base_dir, &p));
        let metrics = file
            .daemon
            .metrics
            .map(|m| MetricsAddr::parse(&m, base_dir))
            .transpose()?;
        let config = ServeConfig {
            disks,
            exports,
            control,
            metrics,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks names, references and limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for d in &self.disks {
            d.validate()?;
            if !names.insert(d.name.as_str()) {
                return Err(ConfigError::DuplicateDisk {
                    disk: d.name.clone(),
                });
            }
        }
        let mut export_names = HashSet::new();
        // Socket paths are compared by what they name: `a/../s.sock` is `s.sock`.
        let control = self.control.clone().unwrap_or_else(default_control_path);
        let control_key = path_key(&control);
        let mut sockets: HashMap<PathBuf, &str> = HashMap::new();
        let mut ublk_ids = HashSet::new();
        let mut groups: HashMap<&str, (&str, &QosLimits)> = HashMap::new();
        for e in &self.exports {
            e.validate()?;
            if let (Some(group), Some(limits)) = (&e.qos_group, &e.qos) {
                if let Some((first, theirs)) = groups.insert(group, (&e.name, limits)) {
                    if theirs != limits {
                        return Err(ConfigError::QosGroupConflict {
                            export: e.name.clone(),
                            group: group.clone(),
                            first: first.to_owned(),
                        });
                    }
                }
            }
            let export = || e.name.clone();
            if !export_names.insert(e.name.as_str()) {
                return Err(ConfigError::DuplicateExport { export: export() });
            }
            if !names.contains(e.disk.as_str()) {
                return Err(ConfigError::NoSuchDisk {
                    export: export(),
                    disk: e.disk.clone(),
                });
            }
            match &e.kind {
                ExportKind::VhostUser { socket, .. } => {
                    let key = path_key(socket);
                    if key == control_key {
                        return Err(ConfigError::SocketIsControl {
                            export: export(),
                            socket: socket.clone(),
                            control,
                        });
                    }
                    if let Some(first) = sockets.insert(key, &e.name) {
                        return Err(ConfigError::DuplicateSocket {
                            export: export(),
                            socket: socket.clone(),
                            first: first.to_owned(),
                        });
                    }
                }
                ExportKind::Ublk { id: Some(id), .. } => {
                    if !ublk_ids.insert(*id) {
                        return Err(ConfigError::DuplicateUblkId {
                            export: export(),
                            id: *id,
                        });
                    }
                }
                ExportKind::Ublk { id: None, .. } => {}
            }
        }
        if let Some(MetricsAddr::Unix(socket)) = &self.metrics {
            let key = path_key(socket);
            let what = if key == control_key {
                Some("the control socket".to_owned())
            } else {
                sockets
                    .get(&key)
                    .map(|export| format!("export {export:?}'s socket"))
            };
            if let Some(what) = what {
                return Err(ConfigError::MetricsSocketTaken {
                    socket: socket.clone(),
                    what,
                });
            }
        }
        Ok(())
    }

    /// Whether every export of `disk` is read-only (then the node is opened
    /// without write access).
    pub fn disk_read_only(&self, disk: &DiskConfig) -> bool {
        disk.read_only
            || self
                .exports
                .iter()
                .filter(|e| e.disk == disk.name)
                .all(|e| e.read_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        let base = Path::new("/etc/sluice");
        let parse = |t: &str| MetricsAddr::parse(t, base);
        assert_eq!(
            parse("127.0.0.1:9412").unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9412".parse().unwrap())
        );
        assert_eq!(
            parse("[::1]:0").unwrap(),
            MetricsAddr::Tcp("[::1]:0".parse().unwrap())
        );
        assert_eq!(
            parse("/run/sluice/m.sock").unwrap(),
            MetricsAddr::Unix("/run/sluice/m.sock".into())
        );
        assert_eq!(
            parse("unix:m.sock").unwrap(),
            MetricsAddr::Unix("/etc/sluice/m.sock".into())
        );
        assert_eq!(
            parse("unix:/m.sock").unwrap().to_string(),
            "unix:/m.sock".to_string()
        );
        for bad in ["localhost:9412", "9412", "127.0.0.1", "unix:", "m.sock", ""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected an IP address and port"), "{bad}: {e}");
        }
        let file = |metrics: &str| {
            format!(
                "[daemon]\ncontrol='/r/c.sock'\nmetrics='{metrics}'\n[[disk]]\nname='x'\n\
                 path='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\n\
                 socket='/r/a.sock'"
            )
        };
        let ok = ServeConfig::from_toml(&file("unix:m.sock"), Path::new("/r")).unwrap();
        assert_eq!(ok.metrics, Some(MetricsAddr::Unix("/r/m.sock".into())));
        let none = ServeConfig::from_toml("", Path::new("/r")).unwrap();
        assert_eq!(none.metrics, None, "off by default");
        for (taken, what) in [
            ("/r/x/../c.sock", "the control socket"),
            ("unix:a.sock", "export \"a\"'s socket"),
        ] {
            let e = ServeConfig::from_toml(&file(taken), Path::new("/r"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(what) && e.contains("a path of its own"), "{e}");
        }
        let e = ServeConfig::from_toml(&file("nowhere"), Path::new("/r"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics address \"nowhere\""), "{e}");
    }

    #[test]
    fn parses_a_two_export_config() {
        let text = r#"
            [daemon]
            poll_us = 10
            [[disk]]
            name = "d0"
            path = "disk.img"
            create_size = "1G"
            [[disk]]
            name = "n"
            path = "null:64M"
            [[export]]
            name = "vm0"
            disk = "d0"
            type = "vhost-user"
            socket = "/run/vm0.sock"
            queues = 2
            queue_depth = 64
            [[export]]
            name = "bench"
            disk = "n"
            type = "vhost-user"
            socket = "bench.sock"
            read_only = true
            socket_mode = 0o660
        "#;
        let c = ServeConfig::from_toml(text, Path::new("/etc/sluice")).unwrap();
        assert_eq!(
            c.disks[0].spec,
            DiskSpec::Path("/etc/sluice/disk.img".into())
        );
        assert_eq!(c.disks[0].create_size_bytes, Some(1 << 30));
        assert_eq!(c.exports[0].queues, 2);
        assert_eq!(c.exports[0].poll_window_us, 10);
        assert_eq!(c.exports[0].serial, "vm0");
        assert_eq!(
            c.exports[1].kind,
            ExportKind::VhostUser {
                socket: "/etc/sluice/bench.sock".into(),
                socket_mode: 0o660
            }
        );
        assert!(c.disk_read_only(&c.disks[1]));
        assert!(!c.disk_read_only(&c.disks[0]));
    }

    #[test]
    fn refuses_bad_configs() {
        let cases = [
            ("[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='s'", "no disk named"),
            ("[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='nbd'", "unknown type"),
            ("[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='s'\nqueues=0", "queues must be"),
            ("[[disk]]\nname='x'\npath='null:1M'\nbogus=1", "unknown field"),
            ("[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='s'\nqueues=99999999999", "queues must be 1..=64, not 99999999999"),
            ("[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='s'\nqueue_depth=70000", "queue_depth must be 1..=1024, not 70000"),
            ("[daemon]\npoll_us=5000000000", "poll_us must be 0..=1000000"),
            ("[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='d/../s'\n[[export]]\nname='b'\ndisk='x'\ntype='vhost-user'\nsocket='./s'", "used twice"),
            ("[daemon]\ncontrol='c.sock'\n[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='d/../c.sock'", "also the control socket"),
        ];
        for (text, want) in cases {
            let err = ServeConfig::from_toml(text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn qos_limits_and_groups() {
        let text = r#"
            [[disk]]
            name = "x"
            path = "null:1G"

            [[export]]
            name = "a"
            disk = "x"
            type = "vhost-user"
            socket = "a.sock"
            qos_group = "tenant-a"
            [export.qos]
            iops = 5000
            bps = "200M"
            write_bps = 1048576
            burst_seconds = 1

            [[export]]
            name = "b"
            disk = "x"
            type = "vhost-user"
            socket = "b.sock"
            qos_group = "tenant-a"

            [[export]]
            name = "c"
            disk = "x"
            type = "vhost-user"
            socket = "c.sock"
            [export.qos]
            read_iops = 10
        "#;
        let c = ServeConfig::from_toml(text, Path::new("/")).unwrap();
        let a = c.exports[0].qos.clone().unwrap();
        assert_eq!(a.iops, Some(5000));
        assert_eq!(a.bps, Some(200 << 20));
        assert_eq!(a.write_bps, Some(1 << 20));
        assert_eq!(a.burst_seconds, Some(1.0));
        assert_eq!(c.exports[0].qos_group.as_deref(), Some("tenant-a"));
        assert_eq!(c.exports[1].qos, None);
        assert_eq!(c.exports[1].qos_group.as_deref(), Some("tenant-a"));
        let limits = c.exports[2].qos.clone().unwrap();
        assert_eq!(limits.read_iops, Some(10));
        assert_eq!(
            limits.burst_seconds,
            Some(crate::limits::QOS_DEFAULT_BURST_SECONDS)
        );

        let export = |qos: &str| {
            format!(
                "[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\ndisk='x'\n\
                 type='vhost-user'\nsocket='s'\n{qos}"
            )
        };
        let cases = [
            ("[export.qos]\niops=0", "export \"a\": qos.iops: must be at least 1 request per second, not 0; leave it out for no limit"),
            ("[export.qos]\nwrite_iops=-5", "qos.write_iops: must be at least 1 request per second, not -5"),
            ("[export.qos]\nbps='lots'", "qos.bps: invalid size \"lots\": expected a number"),
            ("[export.qos]\nread_bps='10X'", "qos.read_bps: invalid size \"10X\": unknown suffix"),
            ("[export.qos]\nbps=-1", "qos.bps: must be a positive number of bytes per second, not -1"),
            ("[export.qos]\nbps='0M'", "qos.bps: must be at least 1 byte per second, not 0"),
            ("[export.qos]\niops=5\nburst_seconds=0", "qos.burst_seconds: must be 0.001..=3600 seconds, not 0"),
            ("[export.qos]\niops=5\nburst_seconds=nan", "qos.burst_seconds: must be 0.001..=3600 seconds, not NaN"),
            ("[export.qos]\niops=1.5", "invalid type: floating point"),
            ("[export.qos]\nspeed=5", "unknown field `speed`"),
            ("qos_group='a b'", "qos.group: \"a b\" is not a group name"),
        ];
        for (qos, want) in cases {
            let err = ServeConfig::from_toml(&export(qos), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{qos:?}: {err}");
        }
        let conflict = format!(
            "{}\nqos_group='g'\n[export.qos]\niops=5\n[[export]]\nname='b'\ndisk='x'\n\
             type='vhost-user'\nsocket='t'\nqos_group='g'\n[export.qos]\niops=6",
            export("")
        );
        let err = ServeConfig::from_toml(&conflict, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("export \"b\": QoS group \"g\" has other limits in export \"a\""),
            "{err}"
        );
    }

    /// What users read: each refusal's variant and its whole message.
    #[test]
    fn refusals_are_typed_and_say_what_to_change() {
        let disk = "[[disk]]\nname='x'\npath='null:1M'\n";
        let ublk = |name: &str, extra: &str| {
            format!("[[export]]\nname='{name}'\ndisk='x'\ntype='ublk'\n{extra}\n")
        };
        let vhost = |extra: &str| {
            format!("{disk}[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'\nsocket='s'\n{extra}")
        };
        type Is = fn(&ConfigError) -> bool;
        let cases: Vec<(String, Is, &str)> =
            vec![
            (
                "[[disk]]\nname=''\npath='null:1M'".into(),
                |e| matches!(e, ConfigError::DiskWithoutName),
                "a disk needs a name",
            ),
            (
                format!("{disk}{disk}"),
                |e| matches!(e, ConfigError::DuplicateDisk { disk } if disk == "x"),
                "disk name \"x\" used twice",
            ),
            (
                "[[disk]]\nname='x'\npath='null:100'".into(),
                |e| matches!(e, ConfigError::DiskSpec(SpecError::NullSizeNotBlocks { .. })),
                "disk \"null:100\": a null node's size must be a non-zero multiple of 512 bytes",
            ),
            (
                "[[disk]]\nname='x'\npath=''".into(),
                |e| matches!(e, ConfigError::DiskSpec(SpecError::EmptyPath)),
                "disk \"\": empty path",
            ),
            (
                "[[disk]]\nname='x'\npath='img'\ncreate_size='12Q'".into(),
                |e| matches!(e, ConfigError::CreateSize { disk, .. } if disk == "x"),
                "disk \"x\": create_size: invalid size \"12Q\": unknown suffix (examples: 4096, \
                 64K, 512M, 1G)",
            ),
            (
                "[[disk]]\nname='x'\npath='null:1M'\ncreate_size='1G'".into(),
                |e| matches!(e, ConfigError::CreateSizeOnNull { .. }),
                "disk \"x\": create_size makes no sense for a null disk",
            ),
            (
                format!("{disk}{}", ublk("", "")),
                |e| matches!(e, ConfigError::ExportWithoutName),
                "an export needs a name",
            ),
            (
                format!("{}{}", vhost(""), ublk("a", "")),
                |e| matches!(e, ConfigError::DuplicateExport { export } if export == "a"),
                "export \"a\": name used twice",
            ),
            (
                format!("{disk}[[export]]\nname='a'\ndisk='x'\ntype='nbd'"),
                |e| matches!(e, ConfigError::UnknownType { kind, .. } if kind == "nbd"),
                "export \"a\": unknown type \"nbd\" (supported: \"vhost-user\", \"ublk\")",
            ),
            (
                format!("{disk}[[export]]\nname='a'\ndisk='x'\ntype='vhost-user'"),
                |e| matches!(e, ConfigError::MissingSocket { .. }),
                "export \"a\": type vhost-user needs socket = \"PATH\"",
            ),
            (
                "[[export]]\nname='a'\ndisk='y'\ntype='ublk'".into(),
                |e| matches!(e, ConfigError::NoSuchDisk { disk, .. } if disk == "y"),
                "export \"a\": no disk named \"y\"",
            ),
            (
                vhost("queues=0"),
                |e| {
                    matches!(e, ConfigError::ExportSetting { source, .. }
                        if *source == OutOfRange { setting: "queues", min: 1, max: 64, value: 0 })
                },
                "export \"a\": queues must be 1..=64, not 0",
            ),
            (
                vhost("queue_depth=70000"),
                |e| matches!(e, ConfigError::ExportSetting { .. }),
                "export \"a\": queue_depth must be 1..=1024, not 70000",
            ),
            (
                vhost("poll_us=70000000"),
                |e| matches!(e, ConfigError::ExportSetting { .. }),
                "export \"a\": poll_us must be 0..=1000000, not 70000000",
            ),
            (
                vhost("socket_mode=0o7777"),
                |e| matches!(e, ConfigError::SocketMode { mode: 0o7777, .. }),
                "export \"a\": socket_mode 7777 is not a permission mode",
            ),
            (
                format!(
                    "[daemon]\ncontrol='/r/c.sock'\n{disk}[[export]]\nname='a'\ndisk='x'\n\
                     type='vhost-user'\nsocket='/r/d/../c.sock'"
                ),
                |e| matches!(e, ConfigError::SocketIsControl { .. }),
                "export \"a\": socket /r/d/../c.sock is also the control socket /r/c.sock; give \
                 one of them another path",
            ),
            (
                format!(
                    "{}[[export]]\nname='b'\ndisk='x'\ntype='vhost-user'\nsocket='./s'",
                    vhost("")
                ),
                |e| matches!(e, ConfigError::DuplicateSocket { first, .. } if first == "a"),
                "export \"b\": socket /r/./s used twice (export \"a\" has it too, spelt \
                 differently perhaps); give each export its own socket",
            ),
            (
                format!("{disk}{}{}", ublk("a", "ublk_id=3"), ublk("b", "ublk_id=3")),
                |e| matches!(e, ConfigError::DuplicateUblkId { id: 3, .. }),
                "export \"b\": ublk id 3 used twice",
            ),
            (
                "[daemon]\npoll_us=5000000000".into(),
                |e| matches!(e, ConfigError::DaemonSetting(OutOfRange { setting: "poll_us", .. })),
                "[daemon] poll_us must be 0..=1000000, not 5000000000",
            ),
        ];
        for (text, is, want) in cases {
            let err = ServeConfig::from_toml(&text, Path::new("/r")).unwrap_err();
            assert!(is(&err), "{text:?}: {err:?}");
            assert_eq!(err.to_string(), want, "{text:?}");
        }
        // TOML errors keep toml's own message and are the error's source.
        let err = ServeConfig::from_toml("[[disk]]\nname='x'", Path::new("/r")).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err:?}");
        assert!(err.to_string().contains("missing field `path`"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn validate_refuses_what_the_command_line_builds() {
        let export = ExportConfig {
            name: "e".into(),
            disk: "d".into(),
            kind: ExportKind::Ublk {
                id: None,
                recovery: true,
            },
            queues: 1,
            queue_depth: 1,
            read_only: false,
            serial: "e".into(),
            poll_window_us: MAX_POLL_WINDOW_US + 1,
            on_removed: crate::api::OnRemoved::Fail,
            qos: None,
            qos_group: None,
        };
        let err = export.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::PollWindowTooLong { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "export \"e\": poll_us must be at most 1000000, not 1000001"
        );
        let err = ExportConfig {
            queue_depth: 0,
            ..export
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "export \"e\": queue_depth must be 1..=1024, not 0"
        );
    }

    #[test]
    fn the_packaged_example_config_is_valid() {
        let text = include_str!("../../packaging/sluice.toml.example");
        let config = ServeConfig::from_toml(text, Path::new("/etc/sluice")).unwrap();
        assert_eq!(config.disks.len(), 1);
        assert!(config.disks[0].reattach);
        assert_eq!(config.exports.len(), 1);
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = ServeConfig::from_toml(EMBEDDED_DEFAULT, Path::new("/work")).unwrap();
        assert_eq!(c.exports.len(), 1);
        assert_eq!(c.disks[0].create_size_bytes, Some(1 << 30));
    }
}
