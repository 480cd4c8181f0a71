//! Pure parsing of one block device's sysfs directory: no ioctl, no fd.
//!
//! The directory is `/sys/dev/block/MAJ:MIN` (a symlink into
//! `/sys/devices/…/block/NAME`) or `/sys/block/NAME`. A partition's directory
//! (`…/sda/sda1`, which has a `partition` file) has no `queue/`, `device/` or
//! `mq/`: they belong to the whole disk, its parent directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{ProbeError, ProbeErrorKind};

/// Queue limits and identity of one disk, as its sysfs directory states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLimits {
    /// The directory the values were read from: the one given, or for a
    /// partition its parent (the whole disk), symlinks resolved.
    pub disk_dir: PathBuf,
    /// Whether the directory given was a partition's.
    pub partition: bool,
    /// `queue/logical_block_size`: the smallest unit the device addresses.
    pub logical_block_size_bytes: u32,
    /// `queue/physical_block_size`: the unit below which writes are
    /// read-modify-write in the device.
    pub physical_block_size_bytes: u32,
    /// `queue/write_cache` is `write back`: completed writes may sit in a
    /// volatile cache until a flush.
    pub volatile_write_cache: bool,
    /// `queue/fua` is 1: the device honours Force Unit Access natively
    /// (otherwise the block layer emulates it with a flush). Absent before
    /// Linux 4.x: taken as 0.
    pub fua: bool,
    /// `queue/discard_max_bytes`: 0 when the device cannot discard. Absent:
    /// taken as 0.
    pub discard_max_bytes: u64,
    /// `queue/discard_granularity`. Absent: taken as 0.
    pub discard_granularity_bytes: u32,
    /// `queue/write_zeroes_max_bytes`: 0 when the device cannot zero a range
    /// without data transfer. Absent: taken as 0.
    pub write_zeroes_max_bytes: u64,
    /// `queue/max_hw_sectors_kb`: what the driver can take in one request.
    /// virtio-blk reports 2147483647 here (no limit).
    pub max_hw_sectors_kb: u64,
    /// `queue/max_sectors_kb`: where the block layer splits requests
    /// (at most `max_hw_sectors_kb`, tunable by the administrator).
    pub max_sectors_kb: u64,
    /// `queue/rotational` is 1. Loop devices say 1 whatever backs them.
    pub rotational: bool,
    /// `device/model`, trimmed; `None` when absent or empty (loop, virtio).
    pub model: Option<String>,
    /// The first non-empty of `device/serial` (NVMe controller or
    /// subsystem), `serial` (virtio-blk), `device/vpd_pg80` (SCSI/SATA unit
    /// serial number page), `wwid` (NVMe namespace), `device/wwid` (SCSI).
    pub serial: Option<String>,
    /// The number of numbered entries in `mq/` (blk-mq hardware queues); 1
    /// for bio-based devices (dm, md, zram), which have no `mq/`.
    pub hw_queues: u32,
}

impl QueueLimits {
    /// The largest single transfer to advertise, in bytes: `max_sectors_kb`,
    /// not `max_hw_sectors_kb`, because that is where the block layer splits
    /// requests anyway (and virtio-blk's "no limit" 2147483647 KiB does not
    /// fit in a u32 of bytes). Whole logical blocks, at least one, at most
    /// `u32::MAX` rounded down.
    pub fn max_transfer_bytes(&self) -> u32 {
        let bytes = self.max_sectors_kb.saturating_mul(1024);
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        round_down(bytes, self.logical_block_size_bytes).max(self.logical_block_size_bytes)
    }
}

/// `x` rounded down to a multiple of `unit` (a power of two, nonzero).
pub(crate) fn round_down(x: u32, unit: u32) -> u32 {
    debug_assert!(unit.is_power_of_two());
    x & !(unit - 1)
}

/// Parses `queue/*`, `device/model`, the serial number and `mq/` of the
/// block device whose sysfs directory is `block_dir`
/// (`/sys/dev/block/MAJ:MIN` or `/sys/block/NAME`; for a partition, its
/// parent's are read).
///
/// Required: `queue/logical_block_size`, `queue/physical_block_size`,
/// `queue/write_cache`, `queue/max_hw_sectors_kb`, `queue/max_sectors_kb`,
/// `queue/rotational`. A missing required file, or any present file that
/// does not parse, is an error naming the file. Identity files (model,
/// serial) are informational: unreadable means `None`.
pub fn parse_queue_limits(block_dir: &Path) -> Result<QueueLimits, ProbeError> {
    let err = |kind| ProbeError::new(block_dir, kind);
    let partition = exists(&block_dir.join("partition")).map_err(err)?;
    let disk_dir = if partition {
        // sysfs nests a partition inside its disk: …/block/sda/sda1. The
        // /sys/dev/block/MAJ:MIN entry is a symlink, so resolve it before
        // taking the parent.
        let resolved = fs::canonicalize(block_dir).map_err(|error| {
            err(ProbeErrorKind::SysfsRead {
                file: block_dir.to_path_buf(),
                error,
            })
        })?;
        match resolved.parent() {
            Some(parent) => parent.to_path_buf(),
            None => {
                return Err(err(ProbeErrorKind::SysfsParse {
                    file: resolved.clone(),
                    value: String::new(),
                    expected: "a partition directory inside its disk's directory",
                }))
            }
        }
    } else {
        block_dir.to_path_buf()
    };
    parse_disk(&disk_dir, partition).map_err(err)
}

fn parse_disk(disk: &Path, partition: bool) -> Result<QueueLimits, ProbeErrorKind> {
    let queue = disk.join("queue");
    let logical = block_size(&queue.join("logical_block_size"))?;
    let physical = block_size(&queue.join("physical_block_size"))?;
    if physical < logical {
        return Err(ProbeErrorKind::SysfsParse {
            file: queue.join("physical_block_size"),
            value: physical.to_string(),
            expected: "a size no smaller than queue/logical_block_size",
        });
    }

    let write_cache_file = queue.join("write_cache");
    let volatile_write_cache = match required(&write_cache_file)?.as_str() {
        "write back" => true,
        "write through" => false,
        other => {
            return Err(ProbeErrorKind::SysfsParse {
                file: write_cache_file,
                value: other.to_owned(),
                expected: "\"write back\" or \"write through\"",
            })
        }
    };

    let fua = optional_flag(&queue.join("fua"))?.unwrap_or(false);
    let discard_max_bytes = optional_u64(&queue.join("discard_max_bytes"))?.unwrap_or(0);
    let granularity_file = queue.join("discard_granularity");
    let discard_granularity_bytes = match optional_u64(&granularity_file)? {
        None => 0,
        Some(g) => u32::try_from(g).map_err(|_| ProbeErrorKind::SysfsParse {
            file: granularity_file,
            value: g.to_string(),
            expected: "a granularity below 4 GiB",
        })?,
    };
    let write_zeroes_max_bytes = optional_u64(&queue.join("write_zeroes_max_bytes"))?.unwrap_or(0);
    let max_hw_sectors_kb = required_u64(&queue.join("max_hw_sectors_kb"))?;
    let max_sectors_kb = required_u64(&queue.join("max_sectors_kb"))?;
    let rotational = required_flag(&queue.join("rotational"))?;

    let device = disk.join("device");
    let model = identity(&device.join("model"));
    let serial = identity(&device.join("serial"))
        .or_else(|| identity(&disk.join("serial")))
        .or_else(|| vpd_unit_serial(&device.join("vpd_pg80")))
        .or_else(|| identity(&disk.join("wwid")))
        .or_else(|| identity(&device.join("wwid")));

    let hw_queues = count_hw_queues(&disk.join("mq"))?;

    Ok(QueueLimits {
        disk_dir: disk.to_path_buf(),
        partition,
        logical_block_size_bytes: logical,
        physical_block_size_bytes: physical,
        volatile_write_cache,
        fua,
        discard_max_bytes,
        discard_granularity_bytes,
        write_zeroes_max_bytes,
        max_hw_sectors_kb,
        max_sectors_kb,
        rotational,
        model,
        serial,
        hw_queues,
    })
}

fn exists(path: &Path) -> Result<bool, ProbeErrorKind> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(ProbeErrorKind::SysfsRead {
            file: path.to_path_buf(),
            error,
        }),
    }
}

/// The file's contents trimmed, or `None` if it does not exist.
fn optional(file: &Path) -> Result<Option<String>, ProbeErrorKind> {
    match fs::read(file) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(e) => Err(ProbeErrorKind::SysfsParse {
                file: file.to_path_buf(),
                value: String::from_utf8_lossy(e.as_bytes()).trim().to_owned(),
                expected: "text",
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ProbeErrorKind::SysfsRead {
            file: file.to_path_buf(),
            error,
        }),
    }
}

fn required(file: &Path) -> Result<String, ProbeErrorKind> {
    optional(file)?.ok_or_else(|| ProbeErrorKind::SysfsRead {
        file: file.to_path_buf(),
        error: io::Error::from(io::ErrorKind::NotFound),
    })
}

fn parse_u64(file: &Path, text: String) -> Result<u64, ProbeErrorKind> {
    text.parse().map_err(|_| ProbeErrorKind::SysfsParse {
        file: file.to_path_buf(),
        value: text,
        expected: "a decimal integer",
    })
}

fn optional_u64(file: &Path) -> Result<Option<u64>, ProbeErrorKind> {
    optional(file)?.map(|t| parse_u64(file, t)).transpose()
}

fn required_u64(file: &Path) -> Result<u64, ProbeErrorKind> {
    parse_u64(file, required(file)?)
}

fn parse_flag(file: &Path, text: String) -> Result<bool, ProbeErrorKind> {
    match text.as_str() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(ProbeErrorKind::SysfsParse {
            file: file.to_path_buf(),
            value: text,
            expected: "0 or 1",
        }),
    }
}

fn optional_flag(file: &Path) -> Result<Option<bool>, ProbeErrorKind> {
    optional(file)?.map(|t| parse_flag(file, t)).transpose()
}

fn required_flag(file: &Path) -> Result<bool, ProbeErrorKind> {
    parse_flag(file, required(file)?)
}

/// A block size: a power of two from 512 bytes to 64 KiB (the kernel's
/// `blk_validate_block_size` allows at most 64 KiB on 4 KiB-page systems).
fn block_size(file: &Path) -> Result<u32, ProbeErrorKind> {
    let text = required(file)?;
    match text.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (512..=65536).contains(&n) => Ok(n),
        _ => Err(ProbeErrorKind::SysfsParse {
            file: file.to_path_buf(),
            value: text,
            expected: "a power of two from 512 to 65536",
        }),
    }
}

/// An informational string: trimmed of whitespace and NULs, `None` when
/// absent, unreadable (some need root) or empty.
fn identity(file: &Path) -> Option<String> {
    let bytes = fs::read(file).ok()?;
    clean(&bytes)
}

fn clean(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!text.is_empty()).then(|| text.to_owned())
}

/// The serial number from a SCSI "Unit Serial Number" VPD page (0x80) as
/// the kernel caches it in `device/vpd_pg80`: a 4-byte header whose byte 1
/// is the page code and bytes 2..4 the big-endian length, then ASCII.
/// libata fills it from the ATA IDENTIFY serial number for SATA disks.
fn vpd_unit_serial(file: &Path) -> Option<String> {
    let page = fs::read(file).ok()?;
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let body = &page[4..];
    clean(&body[..len.min(body.len())])
}

fn count_hw_queues(mq: &Path) -> Result<u32, ProbeErrorKind> {
    let entries = match fs::read_dir(mq) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(1),
        Err(error) => {
            return Err(ProbeErrorKind::SysfsRead {
                file: mq.to_path_buf(),
                error,
            })
        }
    };
    let mut count: u32 = 0;
    for entry in entries {
        let entry = entry.map_err(|error| ProbeErrorKind::SysfsRead {
            file: mq.to_path_buf(),
            error,
        })?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            count = count.saturating_add(1);
        }
    }
    Ok(count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a disk directory under `root` from (relative path, contents).
    fn tree(root: &Path, files: &[(&str, &str)]) {
        for (rel, contents) in files {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
    }

    fn queue(write_cache: &str, fua: &str, rotational: &str) -> Vec<(&'static str, String)> {
        vec![
            ("queue/logical_block_size", "512\n".into()),
            ("queue/physical_block_size", "4096\n".into()),
            ("queue/write_cache", format!("{write_cache}\n")),
            ("queue/fua", format!("{fua}\n")),
            ("queue/max_hw_sectors_kb", "2048\n".into()),
            ("queue/max_sectors_kb", "1280\n".into()),
            ("queue/rotational", format!("{rotational}\n")),
        ]
    }

    fn write_queue(root: &Path, q: &[(&str, String)]) {
        let files: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        tree(root, &files);
    }

    fn mq(root: &Path, n: u32) {
        for i in 0..n {
            fs::create_dir_all(root.join("mq").join(i.to_string())).unwrap();
        }
    }

    #[test]
    fn nvme_like() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("nvme0n1");
        write_queue(&disk, &queue("write back", "1", "0"));
        tree(
            &disk,
            &[
                ("queue/discard_max_bytes", "2199023255040\n"),
                ("queue/discard_granularity", "512\n"),
                ("queue/write_zeroes_max_bytes", "131072\n"),
                ("device/model", "QEMU NVMe Ctrl                          \n"),
                ("device/serial", "deadbeef            \n"),
                ("wwid", "nvme.1b36-64656164626565...\n"),
            ],
        );
        mq(&disk, 4);
        let q = parse_queue_limits(&disk).unwrap();
        assert_eq!(
            q,
            QueueLimits {
                disk_dir: disk.clone(),
                partition: false,
                logical_block_size_bytes: 512,
                physical_block_size_bytes: 4096,
                volatile_write_cache: true,
                fua: true,
                discard_max_bytes: 2_199_023_255_040,
                discard_granularity_bytes: 512,
                write_zeroes_max_bytes: 131_072,
                max_hw_sectors_kb: 2048,
                max_sectors_kb: 1280,
                rotational: false,
                model: Some("QEMU NVMe Ctrl".into()),
                serial: Some("deadbeef".into()),
                hw_queues: 4,
            }
        );
        assert_eq!(q.max_transfer_bytes(), 1280 * 1024);
    }

    #[test]
    fn sata_like_serial_from_vpd_page() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("sda");
        write_queue(&disk, &queue("write back", "0", "1"));
        tree(&disk, &[("device/model", "QEMU HARDDISK   \n")]);
        let mut page = vec![0x00, 0x80, 0x00, 0x14];
        page.extend_from_slice(b"QM00001             ");
        fs::write(disk.join("device/vpd_pg80"), page).unwrap();
        mq(&disk, 1);
        let q = parse_queue_limits(&disk).unwrap();
        assert!(q.volatile_write_cache);
        assert!(!q.fua);
        assert!(q.rotational);
        assert_eq!(q.discard_max_bytes, 0);
        assert_eq!(q.write_zeroes_max_bytes, 0);
        assert_eq!(q.model.as_deref(), Some("QEMU HARDDISK"));
        assert_eq!(q.serial.as_deref(), Some("QM00001"));
        assert_eq!(q.hw_queues, 1);
    }

    #[test]
    fn loop_like_has_no_device_dir() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("loop0");
        write_queue(&disk, &queue("write through", "0", "1"));
        tree(&disk, &[("loop/backing_file", "/tmp/x.img\n")]);
        mq(&disk, 1);
        let q = parse_queue_limits(&disk).unwrap();
        assert!(!q.volatile_write_cache);
        assert_eq!(q.model, None);
        assert_eq!(q.serial, None);
        assert_eq!(q.hw_queues, 1);
    }

    #[test]
    fn virtio_like_serial_at_disk_level_and_huge_max_hw() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vda");
        let mut q = queue("write back", "0", "1");
        q[4].1 = "2147483647\n".into(); // max_hw_sectors_kb: virtio's "no limit"
        q[5].1 = "2147483647\n".into();
        write_queue(&disk, &q);
        tree(
            &disk,
            &[("serial", "vol-1234\n"), ("device/vendor", "0x1af4\n")],
        );
        let q = parse_queue_limits(&disk).unwrap();
        assert_eq!(q.serial.as_deref(), Some("vol-1234"));
        assert_eq!(q.model, None);
        assert_eq!(q.hw_queues, 1, "no mq/ means one queue");
        assert_eq!(q.max_transfer_bytes(), u32::MAX - 511);
    }

    #[test]
    fn partition_reads_its_parent_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("devices/pci0000:00/block/sda");
        write_queue(&disk, &queue("write back", "0", "1"));
        tree(
            &disk,
            &[
                ("device/model", "Disk\n"),
                ("sda1/partition", "1\n"),
                ("sda1/start", "2048\n"),
            ],
        );
        mq(&disk, 2);
        let by_dev = dir.path().join("dev/block");
        fs::create_dir_all(&by_dev).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/pci0000:00/block/sda/sda1",
            by_dev.join("8:1"),
        )
        .unwrap();
        let q = parse_queue_limits(&by_dev.join("8:1")).unwrap();
        assert!(q.partition);
        assert_eq!(q.disk_dir, fs::canonicalize(&disk).unwrap());
        assert_eq!(q.model.as_deref(), Some("Disk"));
        assert_eq!(q.hw_queues, 2);
    }

    #[test]
    fn missing_required_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("sdb");
        let q: Vec<_> = queue("write back", "0", "0")
            .into_iter()
            .filter(|(k, _)| *k != "queue/logical_block_size")
            .collect();
        write_queue(&disk, &q);
        let e = parse_queue_limits(&disk).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e.kind(), ProbeErrorKind::SysfsRead { file, .. } if file.ends_with("queue/logical_block_size")),
            "{msg}"
        );
        assert!(
            msg.starts_with(&format!("probe {}: cannot read ", disk.display())),
            "{msg}"
        );
        assert!(msg.contains("queue/logical_block_size"), "{msg}");
    }

    #[test]
    fn garbage_names_the_file_and_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "queue/write_cache",
                "write maybe",
                "\"write back\" or \"write through\"",
            ),
            ("queue/fua", "yes", "0 or 1"),
            ("queue/logical_block_size", "500", "a power of two"),
            ("queue/physical_block_size", "256", "a power of two"),
            ("queue/max_sectors_kb", "-1", "a decimal integer"),
            ("queue/discard_max_bytes", "lots", "a decimal integer"),
            ("queue/rotational", "2", "0 or 1"),
        ];
        for (rel, value, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let disk = dir.path().join("sdc");
            write_queue(&disk, &queue("write back", "0", "0"));
            tree(&disk, &[(rel, value)]);
            let e = parse_queue_limits(&disk).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("cannot parse {}", disk.join(rel).display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("found {value:?}")), "{msg}");
            assert!(msg.contains(expected), "{rel}: {msg}");
        }
    }

    #[test]
    fn physical_smaller_than_logical_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("sdd");
        write_queue(&disk, &queue("write back", "0", "0"));
        tree(
            &disk,
            &[
                ("queue/logical_block_size", "4096"),
                ("queue/physical_block_size", "512"),
            ],
        );
        let msg = parse_queue_limits(&disk).unwrap_err().to_string();
        assert!(msg.contains("physical_block_size"), "{msg}");
    }

    #[test]
    fn absent_optional_files_default_to_off() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("old");
        let q: Vec<_> = queue("write through", "1", "0")
            .into_iter()
            .filter(|(k, _)| *k != "queue/fua")
            .collect();
        write_queue(&disk, &q);
        let q = parse_queue_limits(&disk).unwrap();
        assert!(!q.fua);
        assert_eq!((q.discard_max_bytes, q.discard_granularity_bytes), (0, 0));
        assert_eq!(q.write_zeroes_max_bytes, 0);
    }

    #[test]
    fn vpd_page_with_wrong_code_or_short_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vpd");
        fs::write(&f, [0x00, 0x83, 0x00, 0x02, b'a', b'b']).unwrap();
        assert_eq!(vpd_unit_serial(&f), None);
        fs::write(&f, [0x00, 0x80]).unwrap();
        assert_eq!(vpd_unit_serial(&f), None);
        // Declared length longer than the data: take what is there.
        fs::write(&f, [0x00, 0x80, 0x00, 0x40, b' ', b'S', b'N', 0]).unwrap();
        assert_eq!(vpd_unit_serial(&f).as_deref(), Some("SN"));
    }

    #[test]
    fn round_down_to_block() {
        assert_eq!(round_down(u32::MAX, 512), 4_294_966_784);
        assert_eq!(round_down(u32::MAX, 4096), 4_294_963_200);
        assert_eq!(round_down(8192, 4096), 8192);
    }
}
