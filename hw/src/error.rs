//! The one error of this crate: which path, and what failed.

use std::io;
use std::path::{Path, PathBuf};

/// A probe that failed: the path that was probed and what went wrong.
///
/// Displays as `probe <path>: <what failed>`, e.g.
/// `probe /dev/sdz: cannot open: No such file or directory (os error 2)`.
#[derive(Debug, thiserror::Error)]
#[error("probe {}: {kind}", path.display())]
pub struct ProbeError {
    path: PathBuf,
    kind: ProbeErrorKind,
}

impl ProbeError {
    pub(crate) fn new(path: &Path, kind: ProbeErrorKind) -> Self {
        Self {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// Re-labels the error with the path the caller probed (the device node
    /// or file), keeping what failed (which names the sysfs file).
    pub(crate) fn at(mut self, path: &Path) -> Self {
        path.clone_into(&mut self.path);
        self
    }

    /// The path that was probed: a device node or file, or for
    /// [`crate::parse_queue_limits`] the sysfs directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What failed.
    pub fn kind(&self) -> &ProbeErrorKind {
        &self.kind
    }
}

/// What failed during a probe. Each message says what to check.
///
/// The OS error is part of the message (not a `source()`), so a report that
/// prints the chain does not print it twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeErrorKind {
    /// `open(2)` of the path failed.
    #[error("cannot open: {error}")]
    Open {
        /// The error from `open(2)`.
        error: io::Error,
    },
    /// `fstat(2)` of the open file failed.
    #[error("cannot stat the open file: {error}")]
    Stat {
        /// The error from `fstat(2)`.
        error: io::Error,
    },
    /// The path is neither a block device nor a regular file.
    #[error("not a block device or regular file (it is a {found}); give a disk, a partition or an image file")]
    NotBlockOrFile {
        /// What it is instead, e.g. "directory".
        found: &'static str,
    },
    /// A block-device ioctl failed.
    #[error("ioctl {name} failed: {error}")]
    Ioctl {
        /// The ioctl's name, e.g. "BLKGETSIZE64".
        name: &'static str,
        /// The error from `ioctl(2)`.
        error: io::Error,
    },
    /// `statx(2)` failed with an error other than "not supported".
    #[error("statx failed: {error}")]
    Statx {
        /// The error from `statx(2)`.
        error: io::Error,
    },
    /// A sysfs file could not be read (or a directory not listed).
    #[error("cannot read {}: {error}; is sysfs mounted and is this a block device's directory?", file.display())]
    SysfsRead {
        /// The sysfs file or directory.
        file: PathBuf,
        /// The error from reading it.
        error: io::Error,
    },
    /// A sysfs file held something other than what the kernel writes there.
    #[error("cannot parse {}: found {value:?}, expected {expected}", file.display())]
    SysfsParse {
        /// The sysfs file.
        file: PathBuf,
        /// Its contents, trimmed.
        value: String,
        /// What the kernel writes there.
        expected: &'static str,
    },
    /// sysfs and an ioctl disagree about the same device: the sysfs root
    /// does not describe this device, or the device changed under us.
    #[error("{what}: sysfs says {sysfs}, ioctl {ioctl} says {from_ioctl}; is the sysfs root right for this device?")]
    Mismatch {
        /// The quantity, e.g. "logical block size".
        what: &'static str,
        /// The value read from sysfs.
        sysfs: u64,
        /// The ioctl's name.
        ioctl: &'static str,
        /// The value the ioctl returned.
        from_ioctl: u64,
    },
}
