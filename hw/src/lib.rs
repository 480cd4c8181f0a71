//! Probing block devices and files into one [`Profile`]: what sluice needs
//! to know about a backing store before it serves it.
//!
//! Sources, by module:
//! - [`sysfs`](parse_queue_limits): `queue/*`, `device/model`, serial
//!   numbers and `mq/` of `/sys/dev/block/MAJ:MIN`, parsed without touching
//!   the device (unit-tested on fixture trees);
//! - `probe`: the open fd: `fstat`, block ioctls (`BLKGETSIZE64`,
//!   `BLKSSZGET`, `BLKPBSZGET`), `statx(STATX_DIOALIGN)`, `fstatfs`.
//!
//! Nothing here opens a device for writing or issues I/O to it.

mod error;
mod probe;
mod sysfs;

use std::path::PathBuf;

pub use error::{ProbeError, ProbeErrorKind};
pub use probe::{
    probe, probe_file, probe_file_with_sysfs, DEFAULT_SYSFS_ROOT, FILE_MAX_TRANSFER_BYTES,
};
pub use sysfs::{parse_queue_limits, QueueLimits};

/// What backs a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingKind {
    /// A block device node (a whole disk or a partition).
    BlockDevice {
        /// The device's major number.
        major: u32,
        /// The device's minor number.
        minor: u32,
    },
    /// A regular file on a filesystem.
    RegularFile,
}

/// How much one discard may cover, and in what unit it frees space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiscardLimits {
    /// The largest single discard, in bytes; a multiple of the logical
    /// block size.
    pub max_bytes: u64,
    /// The unit the device (or filesystem) frees space in; ranges smaller
    /// than this, or unaligned ends, may free nothing.
    pub granularity_bytes: u32,
}

/// What sluice knows about one backing device or file.
///
/// Invariants (checked by the probe): block sizes and alignments are powers
/// of two; `logical_block_size_bytes` is at least 512 and no larger than
/// `physical_block_size_bytes`; `max_transfer_bytes` is a nonzero multiple
/// of the logical block size; `hw_queues` is at least 1.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Profile {
    /// The path as the caller gave it.
    pub path: PathBuf,
    /// Block device or regular file.
    pub kind: BackingKind,
    /// The size in bytes: `BLKGETSIZE64` for a block device, the file's
    /// length for a file. A file's length need not be a multiple of the
    /// logical block size: an export rounds it down.
    pub capacity_bytes: u64,
    /// The smallest addressable unit. Block device: `queue/logical_block_size`
    /// (checked against `BLKSSZGET`). File: the filesystem's direct-I/O
    /// offset alignment (at least 512), else the logical block size of the
    /// disk below the filesystem, else 512.
    pub logical_block_size_bytes: u32,
    /// The unit below which writes cost a read-modify-write. Block device:
    /// `queue/physical_block_size` (checked against `BLKPBSZGET`). File: the
    /// filesystem block size (`st_blksize`) when it is a power of two up to
    /// 64 KiB, and never below the logical block size.
    pub physical_block_size_bytes: u32,
    /// Memory alignment an `O_DIRECT` buffer needs (`statx` `stx_dio_mem_align`);
    /// the logical block size when the kernel does not report it (block
    /// devices before Linux 6.11, tmpfs).
    pub dio_mem_align_bytes: u32,
    /// Offset and length alignment an `O_DIRECT` transfer needs
    /// (`stx_dio_offset_align`), with the same fallback.
    pub dio_offset_align_bytes: u32,
    /// Completed writes may sit in a volatile cache until a flush: sysfs
    /// `queue/write_cache` says "write back". Always true for a file: its
    /// data is durable only after `fdatasync`.
    pub volatile_write_cache: bool,
    /// Force Unit Access is native: sysfs `queue/fua` is 1 (otherwise the
    /// block layer turns a FUA write into write + flush). Always true for a
    /// file: the filesystem honours `RWF_DSYNC` per write.
    pub fua: bool,
    /// Discard support. Block device: `Some` when `queue/discard_max_bytes`
    /// is nonzero, with `queue/discard_granularity`. File: always `Some`
    /// (hole punching), granularity the filesystem block, max `u32::MAX`
    /// rounded down to the granularity (what one virtio-blk or ublk discard
    /// segment can express, and what a loop device advertises).
    pub discard: Option<DiscardLimits>,
    /// The largest zeroing request without data transfer. Block device:
    /// `queue/write_zeroes_max_bytes` when nonzero. File: the discard
    /// maximum, on filesystems known to implement `FALLOC_FL_ZERO_RANGE`
    /// (ext4, xfs, btrfs, f2fs, bcachefs); `None` elsewhere (tmpfs rejects
    /// it with `EOPNOTSUPP`), where zeroes must be written.
    pub write_zeroes_max_bytes: Option<u64>,
    /// The largest single read or write to advertise. Block device:
    /// `queue/max_sectors_kb` × 1024 (where the block layer splits anyway;
    /// `max_hw_sectors_kb` is "unlimited" on virtio-blk), capped below 4 GiB.
    /// File: [`FILE_MAX_TRANSFER_BYTES`].
    pub max_transfer_bytes: u32,
    /// The device spins (`queue/rotational`); for a file, the disk below
    /// its filesystem, false when there is none. Loop devices say true.
    pub rotational: bool,
    /// `device/model`, trimmed; for a file, the disk below its filesystem.
    pub model: Option<String>,
    /// The serial number (see [`QueueLimits::serial`] for where from),
    /// trimmed; for a file, the disk below its filesystem.
    pub serial: Option<String>,
    /// The number of blk-mq hardware queues (`mq/` entries), at least 1; for
    /// a file, the disk below its filesystem, 1 when there is none.
    pub hw_queues: u32,
}
