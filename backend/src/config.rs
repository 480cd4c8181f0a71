//! What `sluice serve` runs: disks and exports, from the command line or a
//! TOML file, validated before anything is opened or bound.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{DiskParams, ExportParams};
use crate::limits::{
    DEFAULT_POLL_WINDOW_US, DEFAULT_QUEUES, DEFAULT_QUEUE_DEPTH, MAX_POLL_WINDOW_US, MAX_QUEUES,
    MAX_QUEUE_DEPTH,
};
use crate::monitor::default_control_path;
use crate::node::DiskSpec;
use crate::size::parse_size_bytes;
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
    },
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
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
}

/// Default socket mode: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// `value` (or `default` when absent) if it is in `min..=max`; else an error
/// that names the setting and the range.
fn in_range<T: TryFrom<u64>>(
    ctx: &str,
    what: &str,
    value: Option<u64>,
    default: T,
    min: u64,
    max: u64,
) -> Result<T, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    match T::try_from(v) {
        Ok(t) if (min..=max).contains(&v) => Ok(t),
        _ => bad(format!("{ctx}{what} must be {min}..={max}, not {v}")),
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
        let spec = match DiskSpec::parse(&self.path).map_err(|e| ConfigError(e.to_string()))? {
            DiskSpec::Path(p) => DiskSpec::Path(resolve(base_dir, &p)),
            null => null,
        };
        let create_size_bytes = self
            .create_size
            .as_deref()
            .map(parse_size_bytes)
            .transpose()
            .map_err(|e| ConfigError(format!("disk {:?}: create_size: {e}", self.name)))?;
        let disk = DiskConfig {
            name: self.name,
            spec,
            read_only: self.read_only,
            create_size_bytes,
        };
        disk.validate()?;
        Ok(disk)
    }
}

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return bad("a disk needs a name");
        }
        if let (Some(_), DiskSpec::Null { .. }) = (self.create_size_bytes, &self.spec) {
            return bad(format!(
                "disk {:?}: create_size makes no sense for a null disk",
                self.name
            ));
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
                    return bad(format!(
                        "export {:?}: type vhost-user needs socket = \"PATH\"",
                        self.name
                    ));
                };
                ExportKind::VhostUser {
                    socket: resolve(base_dir, &socket),
                    socket_mode: self.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
                }
            }
            "ublk" => ExportKind::Ublk { id: self.ublk_id },
            other => {
                return bad(format!(
                    "export {:?}: unknown type {other:?} (supported: \"vhost-user\", \"ublk\")",
                    self.name
                ))
            }
        };
        let ctx = format!("export {:?}: ", self.name);
        let export = ExportConfig {
            queues: in_range(
                &ctx,
                "queues",
                self.queues,
                DEFAULT_QUEUES,
                1,
                MAX_QUEUES.into(),
            )?,
            queue_depth: in_range(
                &ctx,
                "queue_depth",
                self.queue_depth,
                DEFAULT_QUEUE_DEPTH,
                1,
                MAX_QUEUE_DEPTH.into(),
            )?,
            poll_window_us: in_range(
                &ctx,
                "poll_us",
                self.poll_us,
                default_poll_us.unwrap_or(DEFAULT_POLL_WINDOW_US),
                0,
                MAX_POLL_WINDOW_US.into(),
            )?,
            serial: self.serial.unwrap_or_else(|| self.name.clone()),
            name: self.name,
            disk: self.disk,
            kind,
            read_only: self.read_only,
        };
        export.validate()?;
        Ok(export)
    }
}

impl ExportConfig {
    /// Checks the export's own limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ctx = format!("export {:?}", self.name);
        if self.name.is_empty() {
            return bad("an export needs a name");
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return bad(format!(
                "{ctx}: queues must be 1..={MAX_QUEUES}, not {}",
                self.queues
            ));
        }
        if !(1..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return bad(format!(
                "{ctx}: queue_depth must be 1..={MAX_QUEUE_DEPTH}, not {}",
                self.queue_depth
            ));
        }
        if self.poll_window_us > MAX_POLL_WINDOW_US {
            return bad(format!(
                "{ctx}: poll_us must be at most {MAX_POLL_WINDOW_US}, not {}",
                self.poll_window_us
            ));
        }
        if let ExportKind::VhostUser { socket_mode, .. } = &self.kind {
            if *socket_mode & !0o777 != 0 {
                return bad(format!(
                    "{ctx}: socket_mode {socket_mode:o} is not a permission mode"
                ));
            }
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Parses a TOML configuration. Relative paths are taken relative to
    /// `base_dir` (the config file's directory).
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let poll_us: Option<u32> = file
            .daemon
            .poll_us
            .map(|v| {
                in_range(
                    "[daemon] ",
                    "poll_us",
                    Some(v),
                    0,
                    0,
                    MAX_POLL_WINDOW_US.into(),
                )
            })
            .transpose()?;
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
        let config = ServeConfig {
            disks,
            exports,
            control,
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
                return bad(format!("disk name {:?} used twice", d.name));
            }
        }
        let mut export_names = HashSet::new();
        // Socket paths are compared by what they name: `a/../s.sock` is `s.sock`.
        let control = self.control.clone().unwrap_or_else(default_control_path);
        let control_key = path_key(&control);
        let mut sockets: HashMap<PathBuf, &str> = HashMap::new();
        let mut ublk_ids = HashSet::new();
        for e in &self.exports {
            e.validate()?;
            let ctx = format!("export {:?}", e.name);
            if !export_names.insert(e.name.as_str()) {
                return bad(format!("{ctx}: name used twice"));
            }
            if !names.contains(e.disk.as_str()) {
                return bad(format!("{ctx}: no disk named {:?}", e.disk));
            }
            match &e.kind {
                ExportKind::VhostUser { socket, .. } => {
                    let key = path_key(socket);
                    if key == control_key {
                        return bad(format!(
                            "{ctx}: socket {} is also the control socket {}; give one of them \
                             another path",
                            socket.display(),
                            control.display()
                        ));
                    }
                    if let Some(first) = sockets.insert(key, &e.name) {
                        return bad(format!(
                            "{ctx}: socket {} used twice (export {first:?} has it too, \
                             spelt differently perhaps); give each export its own socket",
                            socket.display()
                        ));
                    }
                }
                ExportKind::Ublk { id: Some(id) } => {
                    if !ublk_ids.insert(*id) {
                        return bad(format!("{ctx}: ublk id {id} used twice"));
                    }
                }
                ExportKind::Ublk { id: None } => {}
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
    fn embedded_default_is_valid() {
        let c = ServeConfig::from_toml(EMBEDDED_DEFAULT, Path::new("/work")).unwrap();
        assert_eq!(c.exports.len(), 1);
        assert_eq!(c.disks[0].create_size_bytes, Some(1 << 30));
    }
}
