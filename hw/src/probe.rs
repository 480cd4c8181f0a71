//! The fd side of probing: fstat, block ioctls, statx, fstatfs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{ProbeError, ProbeErrorKind};
use crate::sysfs::{parse_queue_limits, round_down, QueueLimits};
use crate::{BackingKind, DiscardLimits, Profile};

/// Where sysfs is mounted.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

/// The largest single transfer advertised for a file (1 MiB), and for a
/// block device whose sysfs directory is missing. A filesystem maps one file
/// I/O onto any number of extents, so the disk's limit says nothing about a
/// file; 1 MiB bounds bounce buffers and per-request latency.
pub const FILE_MAX_TRANSFER_BYTES: u32 = 1 << 20;

/// The smallest block size any Linux block device has.
const SECTOR_BYTES: u32 = 512;

/// The largest block size the kernel accepts (`blk_validate_block_size`
/// with 4 KiB pages); used to bound the filesystem block size of a file.
const MAX_BLOCK_BYTES: u32 = 64 * 1024;

/// Filesystems whose `fallocate` implements `FALLOC_FL_ZERO_RANGE`, by
/// `statfs.f_type`: ext4, xfs, btrfs, f2fs, bcachefs.
const ZERO_RANGE_FILESYSTEMS: [u32; 5] =
    [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0xCA45_1A4E];

/// Opens `path` read-only and probes it. See [`probe_file_with_sysfs`].
pub fn probe(path: &Path) -> Result<Profile, ProbeError> {
    // O_NONBLOCK: opening a FIFO by mistake must fail the probe, not wait
    // for a writer. It changes nothing for block devices and files.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| ProbeError::new(path, ProbeErrorKind::Open { error }))?;
    probe_file(&file, path)
}

/// Probes an already-open file (the daemon opens `O_DIRECT` first and probes
/// that fd, so what is probed is what is served), with sysfs at `/sys`.
/// `path` is only for the profile and error messages.
pub fn probe_file(file: &File, path: &Path) -> Result<Profile, ProbeError> {
    probe_file_with_sysfs(file, path, Path::new(DEFAULT_SYSFS_ROOT))
}

/// Probes an already-open block device or regular file, reading sysfs under
/// `sysfs_root` (`/sys` in production, a fixture tree in tests).
///
/// A block device whose `<sysfs_root>/dev/block/MAJ:MIN` is missing (a
/// container without sysfs) is probed by ioctls alone, with safe
/// assumptions: volatile write cache, no native FUA, no discard, no write
/// zeroes. A file whose filesystem has no disk in sysfs (tmpfs, overlay,
/// btrfs) gets rotational false, 1 queue, no model or serial.
pub fn probe_file_with_sysfs(
    file: &File,
    path: &Path,
    sysfs_root: &Path,
) -> Result<Profile, ProbeError> {
    let err = |kind| ProbeError::new(path, kind);
    let meta = file
        .metadata()
        .map_err(|error| err(ProbeErrorKind::Stat { error }))?;
    let file_type = meta.file_type();
    let profile = if file_type.is_block_device() {
        probe_block(file, path, meta.rdev(), sysfs_root)?
    } else if file_type.is_file() {
        probe_regular(file, path, &meta, sysfs_root).map_err(err)?
    } else {
        let found = if file_type.is_dir() {
            "directory"
        } else if file_type.is_char_device() {
            "character device"
        } else if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_socket() {
            "socket"
        } else if file_type.is_symlink() {
            "symbolic link"
        } else {
            "file of unknown type"
        };
        return Err(err(ProbeErrorKind::NotBlockOrFile { found }));
    };
    check_invariants(&profile);
    tracing::debug!(?profile, "probed");
    Ok(profile)
}

fn probe_block(
    file: &File,
    path: &Path,
    rdev: u64,
    sysfs_root: &Path,
) -> Result<Profile, ProbeError> {
    let err = |kind| ProbeError::new(path, kind);
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));

    // A block device's size is where its end is (the kernel answers
    // lseek(SEEK_END) with the BLKGETSIZE64 value); nothing reads through
    // this descriptor's position.
    let capacity_bytes = {
        use std::io::Seek;
        let mut f = file;
        f.seek(io::SeekFrom::End(0)).map_err(|error| {
            err(ProbeErrorKind::Ioctl {
                name: "lseek(SEEK_END) for the size",
                error,
            })
        })?
    };

    let logical_ioctl = rustix::fs::ioctl_blksszget(file).map_err(|e| {
        err(ProbeErrorKind::Ioctl {
            name: "BLKSSZGET",
            error: e.into(),
        })
    })?;
    let logical_ioctl = block_size_from_ioctl(logical_ioctl, "BLKSSZGET").map_err(err)?;

    let physical_ioctl = rustix::fs::ioctl_blkpbszget(file).map_err(|e| {
        err(ProbeErrorKind::Ioctl {
            name: "BLKPBSZGET",
            error: e.into(),
        })
    })?;
    let physical_ioctl = block_size_from_ioctl(physical_ioctl, "BLKPBSZGET").map_err(err)?;

    let dir = sysfs_root
        .join("dev/block")
        .join(format!("{major}:{minor}"));
    let limits = if dir.exists() {
        let q = parse_queue_limits(&dir).map_err(|e| e.at(path))?;
        for (what, sysfs, ioctl, from_ioctl) in [
            (
                "logical block size",
                q.logical_block_size_bytes,
                "BLKSSZGET",
                logical_ioctl,
            ),
            (
                "physical block size",
                q.physical_block_size_bytes,
                "BLKPBSZGET",
                physical_ioctl,
            ),
        ] {
            if sysfs != from_ioctl {
                return Err(err(ProbeErrorKind::Mismatch {
                    what,
                    sysfs: sysfs.into(),
                    ioctl,
                    from_ioctl: from_ioctl.into(),
                }));
            }
        }
        Some(q)
    } else {
        tracing::warn!(
            path = %path.display(),
            sysfs = %dir.display(),
            "no sysfs directory for this block device: assuming a volatile write cache, \
             no native FUA, no discard, no write zeroes; mount sysfs to learn more"
        );
        None
    };

    let logical = logical_ioctl;
    let (dio_mem_align_bytes, dio_offset_align_bytes) = statx_dio_align(file)
        .map_err(err)?
        .unwrap_or((logical, logical));

    let profile = match limits {
        Some(q) => Profile {
            path: path.to_path_buf(),
            kind: BackingKind::BlockDevice { major, minor },
            capacity_bytes,
            logical_block_size_bytes: logical,
            physical_block_size_bytes: physical_ioctl,
            dio_mem_align_bytes,
            dio_offset_align_bytes,
            volatile_write_cache: q.volatile_write_cache,
            fua: q.fua,
            // sysfs counts these in 512-byte sectors: keep whole logical
            // blocks so a maximal request is still a valid one.
            discard: Some(whole_blocks(q.discard_max_bytes, logical))
                .filter(|max| *max > 0)
                .map(|max_bytes| DiscardLimits {
                    max_bytes,
                    // The kernel sets a discard granularity of at least one
                    // logical block; 0 only in a hand-made tree.
                    granularity_bytes: q.discard_granularity_bytes.max(logical),
                }),
            write_zeroes_max_bytes: Some(whole_blocks(q.write_zeroes_max_bytes, logical))
                .filter(|max| *max > 0),
            max_transfer_bytes: q.max_transfer_bytes(),
            rotational: q.rotational,
            model: q.model,
            serial: q.serial,
            hw_queues: q.hw_queues,
        },
        None => Profile {
            path: path.to_path_buf(),
            kind: BackingKind::BlockDevice { major, minor },
            capacity_bytes,
            logical_block_size_bytes: logical,
            physical_block_size_bytes: physical_ioctl.max(logical),
            dio_mem_align_bytes,
            dio_offset_align_bytes,
            // Assume the worst: flushes are then always sent, which is
            // correct (if slower) on a device without a volatile cache.
            volatile_write_cache: true,
            fua: false,
            discard: None,
            write_zeroes_max_bytes: None,
            max_transfer_bytes: FILE_MAX_TRANSFER_BYTES.max(logical),
            rotational: false,
            model: None,
            serial: None,
            hw_queues: 1,
        },
    };
    Ok(profile)
}

fn probe_regular(
    file: &File,
    path: &Path,
    meta: &std::fs::Metadata,
    sysfs_root: &Path,
) -> Result<Profile, ProbeErrorKind> {
    let disk = filesystem_disk(path, meta.dev(), sysfs_root);
    let dio = statx_dio_align(file)?;

    // The filesystem's DIO offset alignment is the unit an O_DIRECT transfer
    // must respect: export that as the logical block (never below a sector).
    let logical = match dio {
        Some((_, offset)) => offset.max(SECTOR_BYTES),
        None => disk
            .as_ref()
            .map_or(SECTOR_BYTES, |q| q.logical_block_size_bytes),
    };
    let (dio_mem_align_bytes, dio_offset_align_bytes) = dio.unwrap_or((logical, logical));

    let fs_block = u32::try_from(meta.blksize())
        .ok()
        .filter(|b| b.is_power_of_two() && *b <= MAX_BLOCK_BYTES)
        .unwrap_or(logical);
    let physical = fs_block.max(logical);

    // Punching a hole frees whole filesystem blocks and zeroes partial ones.
    let discard_max = u64::from(round_down(u32::MAX, physical));
    let write_zeroes_max_bytes = zero_range_supported(file).then_some(discard_max);

    Ok(Profile {
        path: path.to_path_buf(),
        kind: BackingKind::RegularFile,
        capacity_bytes: meta.len(),
        logical_block_size_bytes: logical,
        physical_block_size_bytes: physical,
        dio_mem_align_bytes,
        dio_offset_align_bytes,
        volatile_write_cache: true,
        fua: true,
        discard: Some(DiscardLimits {
            max_bytes: discard_max,
            granularity_bytes: physical,
        }),
        write_zeroes_max_bytes,
        max_transfer_bytes: FILE_MAX_TRANSFER_BYTES.max(logical),
        rotational: disk.as_ref().is_some_and(|q| q.rotational),
        model: disk.as_ref().and_then(|q| q.model.clone()),
        serial: disk.as_ref().and_then(|q| q.serial.clone()),
        hw_queues: disk.as_ref().map_or(1, |q| q.hw_queues),
    })
}

/// The queue limits of the disk holding a file's filesystem (`st_dev`),
/// when sysfs has one. Hints only: a broken directory is logged, not fatal.
fn filesystem_disk(path: &Path, dev: u64, sysfs_root: &Path) -> Option<QueueLimits> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // Major 0 is the kernel's anonymous block device: tmpfs, overlay, btrfs
    // subvolumes, 9p… no disk in sysfs.
    if major == 0 {
        return None;
    }
    let dir = sysfs_root
        .join("dev/block")
        .join(format!("{major}:{minor}"));
    if !dir.exists() {
        return None;
    }
    match parse_queue_limits(&dir) {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot read the disk below this file's filesystem; using defaults");
            None
        }
    }
}

/// `bytes` rounded down to whole `block`s (a power of two).
fn whole_blocks(bytes: u64, block: u32) -> u64 {
    bytes & !(u64::from(block) - 1)
}

fn block_size_from_ioctl<T>(value: T, name: &'static str) -> Result<u32, ProbeErrorKind>
where
    T: Copy + std::fmt::Display + TryInto<u32>,
{
    match value.try_into() {
        Ok(n) if n.is_power_of_two() && (SECTOR_BYTES..=MAX_BLOCK_BYTES).contains(&n) => Ok(n),
        _ => Err(ProbeErrorKind::Ioctl {
            name,
            error: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("returned {value}, not a power of two from 512 to 65536"),
            ),
        }),
    }
}

/// `(stx_dio_mem_align, stx_dio_offset_align)` when the kernel reports them.
///
/// Linux 6.1 added `STATX_DIOALIGN` for files (ext4, xfs, f2fs, btrfs…);
/// block device nodes report it from 6.11. `None` when the kernel or
/// filesystem does not fill it (mask bit clear), when the values are 0
/// (the file does not support `O_DIRECT`), or when statx itself is missing
/// (old kernel, seccomp).
fn statx_dio_align(file: &File) -> Result<Option<(u32, u32)>, ProbeErrorKind> {
    use rustix::fs::{AtFlags, StatxFlags};
    let stx = match rustix::fs::statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(stx) => stx,
        Err(e) => {
            let error = io::Error::from(e);
            return match error.raw_os_error() {
                Some(libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP) => {
                    tracing::debug!(%error, "statx unavailable: DIO alignment falls back to the logical block size");
                    Ok(None)
                }
                _ => Err(ProbeErrorKind::Statx { error }),
            };
        }
    };
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
        return Ok(None);
    }
    let (mem, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    if mem == 0 || offset == 0 {
        return Ok(None);
    }
    if !mem.is_power_of_two() || !offset.is_power_of_two() {
        tracing::warn!(
            mem,
            offset,
            "statx reported DIO alignments that are not powers of two; ignoring them"
        );
        return Ok(None);
    }
    Ok(Some((mem, offset)))
}

/// Whether the file's filesystem is one known to implement
/// `FALLOC_FL_ZERO_RANGE`. The flag cannot be probed without writing (a
/// zero-length fallocate fails with `EINVAL` before the filesystem sees it).
fn zero_range_supported(file: &File) -> bool {
    // f_type's width differs by architecture; every magic fits in 32 bits.
    rustix::fs::fstatfs(file).is_ok_and(|sfs| ZERO_RANGE_FILESYSTEMS.contains(&(sfs.f_type as u32)))
}

/// The invariants promised on [`Profile`]; a violation is a bug here.
fn check_invariants(p: &Profile) {
    let lbs = p.logical_block_size_bytes;
    assert!(lbs.is_power_of_two() && lbs >= SECTOR_BYTES, "{p:?}");
    assert!(p.physical_block_size_bytes.is_power_of_two(), "{p:?}");
    assert!(p.physical_block_size_bytes >= lbs, "{p:?}");
    assert!(p.dio_mem_align_bytes.is_power_of_two(), "{p:?}");
    assert!(p.dio_offset_align_bytes.is_power_of_two(), "{p:?}");
    assert!(
        p.max_transfer_bytes > 0 && p.max_transfer_bytes % lbs == 0,
        "{p:?}"
    );
    assert!(p.hw_queues >= 1, "{p:?}");
    if let Some(d) = p.discard {
        assert!(d.max_bytes > 0 && d.granularity_bytes > 0, "{p:?}");
    }
}
