//! Backing nodes: a block device or regular file opened `O_DIRECT`, or a null
//! node for measuring the protocol path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_hw::{BackingKind, Profile};

use crate::size::{parse_size_bytes, HumanBytes, SizeError};

/// Where a node's data lives, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// A block device or regular file.
    Path(PathBuf),
    /// Reads return zeroes, writes are dropped: `null:SIZE`.
    Null {
        /// Capacity the node reports.
        capacity_bytes: u64,
    },
}

impl DiskSpec {
    /// Parses `PATH` or `null:SIZE`.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        if let Some(size) = spec.strip_prefix("null:") {
            let capacity_bytes = parse_size_bytes(size).map_err(|source| SpecError::NullSize {
                spec: spec.to_owned(),
                source,
            })?;
            if capacity_bytes == 0 || capacity_bytes % 512 != 0 {
                return Err(SpecError::NullSizeNotBlocks {
                    spec: spec.to_owned(),
                });
            }
            return Ok(DiskSpec::Null { capacity_bytes });
        }
        if spec.is_empty() {
            return Err(SpecError::EmptyPath);
        }
        Ok(DiskSpec::Path(PathBuf::from(spec)))
    }
}

/// Why a disk specification (`PATH` or `null:SIZE`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The size of a `null:SIZE` disk does not parse.
    #[error("disk {spec:?}: {source}")]
    NullSize {
        /// What the user wrote.
        spec: String,
        /// Why the size does not parse.
        #[source]
        source: SizeError,
    },
    /// The size of a `null:SIZE` disk is zero or not whole sectors.
    #[error("disk {spec:?}: a null node's size must be a non-zero multiple of 512 bytes")]
    NullSizeNotBlocks {
        /// What the user wrote.
        spec: String,
    },
    /// The path is empty.
    #[error("disk \"\": empty path")]
    EmptyPath,
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSpec::Path(p) => write!(f, "{}", p.display()),
            DiskSpec::Null { capacity_bytes } => write!(f, "null:{}", HumanBytes(*capacity_bytes)),
        }
    }
}

/// Why a node could not be opened or flushed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// open(2) failed.
    #[error("open {path}: {source}{hint}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Probing the device failed.
    #[error(transparent)]
    Probe(#[from] sluice_hw::ProbeError),
    /// The path is neither a block device nor a regular file.
    #[error("{path}: not a block device or regular file")]
    NotBlockOrFile {
        /// The path.
        path: PathBuf,
    },
    /// The device or image is smaller than one logical block.
    #[error(
        "{path}: capacity {capacity_bytes} bytes is smaller than one block; grow the image \
         (truncate -s 1G FILE)"
    )]
    SmallerThanABlock {
        /// The path.
        path: PathBuf,
        /// Its capacity.
        capacity_bytes: u64,
    },
    /// The node's drive was removed: nothing can be flushed.
    #[error("node {name}: its drive was removed; not flushed")]
    Removed {
        /// The node.
        name: String,
    },
    /// The final flush failed.
    #[error("flush {name}: {source}")]
    Flush {
        /// The node.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// How requests reach the node's data.
#[derive(Debug)]
pub enum Backing {
    /// A block device: discard goes down as a block discard, never as a hole
    /// punch (which the kernel would turn into a zero-out).
    BlockDevice(File),
    /// A regular file: discard punches a hole.
    File(File),
    /// No data at all.
    Null,
}

/// A backing store and what the daemon knows about it.
#[derive(Debug)]
pub struct Node {
    name: String,
    spec: DiskSpec,
    backing: Backing,
    read_only: bool,
    limits: NodeLimits,
    profile: Option<Profile>,
    /// Its block device went away (hot-remove): every request fails with
    /// EIO from now on, and nothing is flushed. Written once.
    removed: AtomicBool,
    /// The removal was reported (logged, sent as an event).
    removal_reported: AtomicBool,
}

/// The limits and capabilities fronts advertise and validate against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NodeLimits {
    /// Size of the node.
    pub capacity_bytes: u64,
    /// Smallest addressable unit.
    pub logical_block_size_bytes: u32,
    /// Unit the device writes atomically.
    pub physical_block_size_bytes: u32,
    /// `O_DIRECT` buffer address alignment.
    pub dio_mem_align_bytes: u32,
    /// `O_DIRECT` offset and length alignment.
    pub dio_offset_align_bytes: u32,
    /// Completed writes need a flush to be durable.
    pub volatile_write_cache: bool,
    /// The device honours FUA writes natively.
    pub fua: bool,
    /// Largest discard, when discard is supported.
    pub discard_max_bytes: Option<u64>,
    /// Discard granularity.
    pub discard_granularity_bytes: u32,
    /// Largest write-zeroes, when supported.
    pub write_zeroes_max_bytes: Option<u64>,
    /// Largest transfer the device takes in one command.
    pub max_transfer_bytes: u32,
}

impl Node {
    /// Opens a node. Paths are opened `O_DIRECT` (block devices also
    /// `O_EXCL`, so a mounted device is refused) and probed through the open
    /// descriptor.
    pub fn open(name: &str, spec: &DiskSpec, read_only: bool) -> Result<Node, NodeError> {
        match spec {
            DiskSpec::Null { capacity_bytes } => Ok(Node {
                name: name.to_owned(),
                spec: spec.clone(),
                backing: Backing::Null,
                read_only,
                limits: NodeLimits {
                    capacity_bytes: *capacity_bytes,
                    logical_block_size_bytes: 512,
                    physical_block_size_bytes: 4096,
                    dio_mem_align_bytes: 1,
                    dio_offset_align_bytes: 512,
                    volatile_write_cache: false,
                    fua: true,
                    discard_max_bytes: Some(u64::from(u32::MAX) & !4095),
                    discard_granularity_bytes: 4096,
                    write_zeroes_max_bytes: Some(u64::from(u32::MAX) & !4095),
                    max_transfer_bytes: u32::MAX,
                },
                profile: None,
                removed: AtomicBool::new(false),
                removal_reported: AtomicBool::new(false),
            }),
            DiskSpec::Path(path) => Self::open_path(name, spec, path, read_only),
        }
    }

    fn open_path(
        name: &str,
        spec: &DiskSpec,
        path: &Path,
        read_only: bool,
    ) -> Result<Node, NodeError> {
        let meta = std::fs::metadata(path).map_err(|source| NodeError::Open {
            path: path.to_owned(),
            hint: if source.kind() == io::ErrorKind::NotFound {
                ": check the path, or create the image first (truncate -s 1G FILE)"
            } else {
                ""
            },
            source,
        })?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(NodeError::NotBlockOrFile {
                path: path.to_owned(),
            });
        }
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if is_block {
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| {
                let hint = match source.raw_os_error() {
                    Some(libc::EINVAL) => {
                        ": the filesystem cannot do direct I/O (O_DIRECT); put the image on ext4, xfs or btrfs, or use a block device"
                    }
                    Some(libc::EBUSY) => {
                        ": the device is in use (mounted, or held by another program); unmount it or stop that program"
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                        ": no permission; run as a user that may write it, or export it --read-only"
                    }
                    _ => "",
                };
                NodeError::Open {
                    path: path.to_owned(),
                    source,
                    hint,
                }
            })?;
        let profile = sluice_hw::probe_file(&file, path)?;
        if profile.capacity_bytes < u64::from(profile.logical_block_size_bytes) {
            return Err(NodeError::SmallerThanABlock {
                path: path.to_owned(),
                capacity_bytes: profile.capacity_bytes,
            });
        }
        // A trailing partial block cannot be addressed through O_DIRECT: it is
        // not served. Say so, or the guest silently sees a smaller disk.
        let block_bytes = u64::from(profile.logical_block_size_bytes.max(512));
        let tail_bytes = profile.capacity_bytes % block_bytes;
        let capacity_bytes = profile.capacity_bytes - tail_bytes;
        if tail_bytes != 0 {
            tracing::warn!(
                "{}: size {} bytes is not a multiple of the {block_bytes}-byte logical block; \
                 serving {capacity_bytes} bytes, the last {tail_bytes} bytes are not served \
                 (resize the image to a multiple of {block_bytes} bytes to serve them)",
                path.display(),
                profile.capacity_bytes,
            );
        }
        let limits = NodeLimits {
            capacity_bytes,
            logical_block_size_bytes: profile.logical_block_size_bytes,
            physical_block_size_bytes: profile.physical_block_size_bytes,
            dio_mem_align_bytes: profile.dio_mem_align_bytes.max(1),
            dio_offset_align_bytes: profile
                .dio_offset_align_bytes
                .max(profile.logical_block_size_bytes),
            volatile_write_cache: profile.volatile_write_cache,
            fua: profile.fua,
            discard_max_bytes: profile.discard.as_ref().map(|d| d.max_bytes),
            discard_granularity_bytes: profile
                .discard
                .as_ref()
                .map(|d| d.granularity_bytes)
                .unwrap_or(0),
            write_zeroes_max_bytes: profile.write_zeroes_max_bytes,
            max_transfer_bytes: profile.max_transfer_bytes,
        };
        let backing = match profile.kind {
            BackingKind::BlockDevice { .. } => Backing::BlockDevice(file),
            BackingKind::RegularFile => Backing::File(file),
        };
        Ok(Node {
            name: name.to_owned(),
            spec: spec.clone(),
            backing,
            read_only,
            limits,
            profile: Some(profile),
            removed: AtomicBool::new(false),
            removal_reported: AtomicBool::new(false),
        })
    }

    /// The block device's number (`None` for files and null nodes).
    pub(crate) fn device_number(&self) -> Option<(u32, u32)> {
        match self.profile.as_ref()?.kind {
            BackingKind::BlockDevice { major, minor } => Some((major, minor)),
            BackingKind::RegularFile => None,
        }
    }

    /// Whether the node's drive went away. One relaxed load: the request
    /// path asks it for every request.
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// True once, the first time it is asked after the node was marked
    /// removed: whoever gets it reports the removal.
    pub(crate) fn take_removal_report(&self) -> bool {
        self.is_removed() && !self.removal_reported.swap(true, Ordering::AcqRel)
    }

    /// Marks the drive as gone; true the first time.
    pub(crate) fn mark_removed(&self) -> bool {
        !self.removed.swap(true, Ordering::AcqRel)
    }

    /// Whether the block device is gone from the system: its
    /// `/sys/dev/block/MAJ:MIN` no longer exists (a device removed while
    /// open keeps its descriptor, but sysfs forgets it). Never for files.
    pub(crate) fn device_gone(&self) -> bool {
        self.device_number().is_some_and(|(major, minor)| {
            !Path::new(&format!("/sys/dev/block/{major}:{minor}")).exists()
        })
    }

    /// A request failed with `errno`: whether that is because the drive went
    /// away (checked against sysfs only for the errors a removed device
    /// gives: EIO, ENOSPC, ENODEV, ENXIO). Marks the node removed if so.
    pub(crate) fn failed_because_removed(&self, errno: i32) -> bool {
        if self.is_removed() {
            return true;
        }
        matches!(errno, libc::EIO | libc::ENOSPC | libc::ENODEV | libc::ENXIO)
            && self.device_gone()
            && {
                self.mark_removed();
                true
            }
    }

    /// The node's name in the daemon.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the node was opened from.
    pub fn spec(&self) -> &DiskSpec {
        &self.spec
    }

    /// How requests reach the data.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The descriptor requests go to, `None` for a null node.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match &self.backing {
            Backing::BlockDevice(f) | Backing::File(f) => Some(f.as_raw_fd()),
            Backing::Null => None,
        }
    }

    /// Opened without write access.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Limits and capabilities.
    pub fn limits(&self) -> &NodeLimits {
        &self.limits
    }

    /// The probed profile (none for null nodes).
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// Makes every completed write durable (`fdatasync`). Used off the request
    /// path, by shutdown; queues flush through their own rings.
    pub fn flush(&self) -> Result<(), NodeError> {
        if self.is_removed() {
            return Err(NodeError::Removed {
                name: self.name.clone(),
            });
        }
        let (Backing::BlockDevice(file) | Backing::File(file)) = &self.backing else {
            return Ok(());
        };
        if self.read_only {
            return Ok(());
        }
        // `sync_data` is fdatasync(2).
        file.sync_data().map_err(|source| NodeError::Flush {
            name: self.name.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            DiskSpec::parse("null:1G").unwrap(),
            DiskSpec::Null {
                capacity_bytes: 1 << 30
            }
        );
        assert_eq!(
            DiskSpec::parse("/dev/nvme0n1").unwrap(),
            DiskSpec::Path("/dev/nvme0n1".into())
        );
        let err = DiskSpec::parse("null:100").unwrap_err();
        assert!(
            matches!(err, SpecError::NullSizeNotBlocks { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "disk \"null:100\": a null node's size must be a non-zero multiple of 512 bytes"
        );
        assert!(matches!(
            DiskSpec::parse("null:0"),
            Err(SpecError::NullSizeNotBlocks { .. })
        ));
        let err = DiskSpec::parse("null:12Q").unwrap_err();
        assert!(matches!(err, SpecError::NullSize { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "disk \"null:12Q\": invalid size \"12Q\": unknown suffix (examples: 4096, 64K, \
             512M, 1G)"
        );
        assert_eq!(DiskSpec::parse(""), Err(SpecError::EmptyPath));
        assert_eq!(SpecError::EmptyPath.to_string(), "disk \"\": empty path");
        assert_eq!(DiskSpec::parse("null:64M").unwrap().to_string(), "null:64M");
    }

    #[test]
    fn missing_path_says_what_to_do() {
        let err = Node::open("d0", &DiskSpec::Path("/nonexistent/disk.img".into()), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/disk.img") && err.contains("truncate"),
            "{err}"
        );
    }

    #[test]
    fn opens_a_file_with_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        match Node::open("d0", &DiskSpec::Path(path.clone()), false) {
            Ok(node) => {
                assert_eq!(node.limits().capacity_bytes, 8 << 20);
                assert!(matches!(node.backing(), Backing::File(_)));
                node.flush().unwrap();
            }
            Err(NodeError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipped: the temp filesystem cannot do O_DIRECT");
            }
            Err(e) => panic!("{e}"),
        }
    }
}
