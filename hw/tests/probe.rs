//! `probe` on real files and, where root and loop devices are at hand, on a
//! real loop device (a block device with a real blk-mq queue in sysfs).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_hw::{probe, probe_file, probe_file_with_sysfs, BackingKind, ProbeErrorKind, Profile};

const MIB: u64 = 1 << 20;

fn assert_pow2(what: &str, n: u32) {
    assert!(
        n.is_power_of_two(),
        "{what} = {n} is not a nonzero power of two"
    );
}

fn fs_magic(path: &Path) -> u32 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `libc::statfs` is a C struct of integers; all-zero is valid.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a live NUL-terminated path and `sfs` a live, writable
    // statfs the call fills and does not keep.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut sfs) };
    assert_eq!(rc, 0, "statfs {}", path.display());
    sfs.f_type as u32
}

const EXT4_MAGIC: u32 = 0xEF53;
const TMPFS_MAGIC: u32 = 0x0102_1994;

#[test]
fn regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(10 * MIB + 123).unwrap();
    drop(f);

    let p = probe(&path).unwrap();
    eprintln!("regular file on {:#x}: {p:#?}", fs_magic(dir.path()));
    assert_eq!(p.path, path);
    assert_eq!(p.kind, BackingKind::RegularFile);
    assert_eq!(p.capacity_bytes, 10 * MIB + 123);
    assert_pow2("logical", p.logical_block_size_bytes);
    assert!(p.logical_block_size_bytes >= 512);
    assert_pow2("physical", p.physical_block_size_bytes);
    assert!(p.physical_block_size_bytes >= p.logical_block_size_bytes);
    assert_pow2("dio mem align", p.dio_mem_align_bytes);
    assert_pow2("dio offset align", p.dio_offset_align_bytes);
    assert!(p.volatile_write_cache && p.fua);
    let d = p.discard.expect("files discard by punching holes");
    assert_pow2("discard granularity", d.granularity_bytes);
    assert!(d.max_bytes > 0 && d.max_bytes % u64::from(d.granularity_bytes) == 0);
    assert!(d.max_bytes <= u64::from(u32::MAX));
    assert_eq!(p.max_transfer_bytes, sluice_hw::FILE_MAX_TRANSFER_BYTES);
    assert!(p.hw_queues >= 1);
    if fs_magic(dir.path()) == EXT4_MAGIC {
        assert_eq!(
            p.write_zeroes_max_bytes,
            Some(d.max_bytes),
            "ext4 has ZERO_RANGE"
        );
    }

    // The daemon's way: open O_DIRECT, probe that fd.
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    if let Ok(direct) = direct {
        assert_eq!(probe_file(&direct, &path).unwrap(), p);
    }
}

#[test]
fn regular_file_on_tmpfs_falls_back() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() || fs_magic(shm) != TMPFS_MAGIC {
        eprintln!("skipped: needs /dev/shm on tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("disk.img");
    File::create(&path).unwrap().set_len(MIB).unwrap();
    let p = probe(&path).unwrap();
    eprintln!("regular file on tmpfs: {p:#?}");
    // tmpfs reports no STATX_DIOALIGN, has no disk and no ZERO_RANGE.
    assert_eq!(p.logical_block_size_bytes, 512);
    assert_eq!(p.dio_mem_align_bytes, p.logical_block_size_bytes);
    assert_eq!(p.dio_offset_align_bytes, p.logical_block_size_bytes);
    assert_eq!(p.write_zeroes_max_bytes, None);
    assert!(p.discard.is_some());
    assert!(!p.rotational);
    assert_eq!((p.hw_queues, p.model, p.serial), (1, None, None));
}

/// A file's rotational/queues/model/serial come from the disk below its
/// filesystem: here a fixture sysfs in which st_dev is a partition.
#[test]
fn regular_file_takes_hints_from_the_filesystem_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    let dev = f.metadata().unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        eprintln!("skipped: the temporary directory is on an anonymous device ({major}:{minor})");
        return;
    }

    let sys = dir.path().join("sys");
    let disk = sys.join("devices/virtual/block/fake");
    for (rel, contents) in [
        ("queue/logical_block_size", "512"),
        ("queue/physical_block_size", "4096"),
        ("queue/write_cache", "write through"),
        ("queue/max_hw_sectors_kb", "256"),
        ("queue/max_sectors_kb", "256"),
        ("queue/rotational", "1"),
        ("device/model", "Spinning Rust 9000\n"),
        ("device/serial", "  SR-42  \n"),
        ("fake1/partition", "1"),
    ] {
        let file = disk.join(rel);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, contents).unwrap();
    }
    for q in 0..3 {
        fs::create_dir_all(disk.join("mq").join(q.to_string())).unwrap();
    }
    fs::create_dir_all(sys.join("dev/block")).unwrap();
    std::os::unix::fs::symlink(
        "../../devices/virtual/block/fake/fake1",
        sys.join("dev/block").join(format!("{major}:{minor}")),
    )
    .unwrap();

    let p = probe_file_with_sysfs(&f, &path, &sys).unwrap();
    assert!(p.rotational);
    assert_eq!(p.hw_queues, 3);
    assert_eq!(p.model.as_deref(), Some("Spinning Rust 9000"));
    assert_eq!(p.serial.as_deref(), Some("SR-42"));
    // A file is always write-back + FUA, whatever its disk says.
    assert!(p.volatile_write_cache && p.fua);

    // No disk at all in sysfs: defaults.
    let empty = tempfile::tempdir().unwrap();
    let p = probe_file_with_sysfs(&f, &path, empty.path()).unwrap();
    assert!(!p.rotational);
    assert_eq!((p.hw_queues, p.model, p.serial), (1, None, None));
}

#[test]
fn errors_name_the_path_and_what_failed() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nope");
    let e = probe(&missing).unwrap_err();
    assert!(matches!(e.kind(), ProbeErrorKind::Open { .. }));
    assert_eq!(e.path(), missing);
    assert_eq!(
        e.to_string(),
        format!(
            "probe {}: cannot open: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let e = probe(dir.path()).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "probe {}: not a block device or regular file (it is a directory)",
            dir.path().display()
        )),
        "{e}"
    );

    let e = probe(Path::new("/dev/null")).unwrap_err();
    assert!(e.to_string().contains("(it is a character device)"), "{e}");

    // A FIFO without a writer: refused at once, not waited on.
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let e = probe(&fifo).unwrap_err();
        assert!(e.to_string().contains("(it is a FIFO)"), "{e}");
    }
}

/// A loop device attached for one test, detached (partitions first) on
/// drop, even when the test panics.
struct Loop {
    dev: PathBuf,
    partitions: Vec<u32>,
}

impl Loop {
    fn attach(backing: &Path) -> Result<Loop, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let mut last = String::new();
        // `--find` races with anyone else attaching at the same moment: retry.
        for _ in 0..3 {
            let out = Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(backing)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                return Ok(Loop {
                    dev: PathBuf::from(dev),
                    partitions: Vec::new(),
                });
            }
            last = format!(
                "losetup {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Err(last)
    }

    /// Adds partition `n` with BLKPG (`addpart`): works without any
    /// partition-table parser in the kernel.
    fn add_partition(
        &mut self,
        n: u32,
        start_sectors: u64,
        len_sectors: u64,
    ) -> Result<PathBuf, String> {
        let out = Command::new("addpart")
            .arg(&self.dev)
            .args([
                n.to_string(),
                start_sectors.to_string(),
                len_sectors.to_string(),
            ])
            .output()
            .map_err(|e| format!("cannot run addpart: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "addpart: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        self.partitions.push(n);
        let mut name = self.dev.clone().into_os_string();
        name.push(format!("p{n}"));
        Ok(PathBuf::from(name))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for n in self.partitions.drain(..) {
            let _ = Command::new("delpart")
                .arg(&self.dev)
                .arg(n.to_string())
                .status();
        }
        match Command::new("losetup").arg("-d").arg(&self.dev).status() {
            Ok(s) if s.success() => {}
            other => eprintln!(
                "warning: losetup -d {} failed: {other:?}",
                self.dev.display()
            ),
        }
    }
}

fn sysfs_attr(major: u32, minor: u32, rel: &str) -> String {
    fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/{rel}"))
        .unwrap()
        .trim()
        .to_owned()
}

fn block_dev(p: &Profile) -> (u32, u32) {
    match p.kind {
        BackingKind::BlockDevice { major, minor } => (major, minor),
        BackingKind::RegularFile => panic!("expected a block device: {p:?}"),
    }
}

#[test]
fn loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let mut lo = match Loop::attach(&backing) {
        Ok(lo) => lo,
        Err(reason) => {
            eprintln!("skipped: needs root and a loop device ({reason})");
            return;
        }
    };

    let p = probe(&lo.dev).unwrap();
    eprintln!("loop device: {p:#?}");
    let (major, minor) = block_dev(&p);
    assert_eq!(major, 7, "loop devices have major 7");
    assert_eq!(p.capacity_bytes, 64 * MIB);
    assert_eq!(p.logical_block_size_bytes, 512);
    assert_eq!(
        p.volatile_write_cache,
        sysfs_attr(major, minor, "queue/write_cache") == "write back"
    );
    assert_eq!(p.fua, sysfs_attr(major, minor, "queue/fua") == "1");
    assert_eq!(
        p.rotational,
        sysfs_attr(major, minor, "queue/rotational") == "1"
    );
    assert!(p.hw_queues >= 1);
    assert_eq!(p.model, None, "loop devices have no device/model");
    assert_pow2("dio mem align", p.dio_mem_align_bytes);
    assert_pow2("dio offset align", p.dio_offset_align_bytes);
    let max_sectors_kb: u32 = sysfs_attr(major, minor, "queue/max_sectors_kb")
        .parse()
        .unwrap();
    assert_eq!(p.max_transfer_bytes, max_sectors_kb * 1024);
    let discard_max: u64 = sysfs_attr(major, minor, "queue/discard_max_bytes")
        .parse()
        .unwrap();
    assert_eq!(
        p.discard.map(|d| d.max_bytes),
        (discard_max > 0).then_some(discard_max)
    );

    // The daemon's way: the O_DIRECT fd it will serve from.
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.dev)
        .unwrap();
    assert_eq!(probe_file(&direct, &lo.dev).unwrap(), p);

    // No sysfs (a container without /sys): ioctls alone, safe assumptions.
    let empty = tempfile::tempdir().unwrap();
    let bare = probe_file_with_sysfs(&direct, &lo.dev, empty.path()).unwrap();
    assert_eq!(bare.capacity_bytes, 64 * MIB);
    assert_eq!(bare.logical_block_size_bytes, 512);
    assert_eq!(bare.physical_block_size_bytes, p.physical_block_size_bytes);
    assert!(bare.volatile_write_cache && !bare.fua);
    assert_eq!((bare.discard, bare.write_zeroes_max_bytes), (None, None));
    assert_eq!(bare.hw_queues, 1);

    // A sysfs that disagrees with the device's ioctls is refused.
    let wrong = tempfile::tempdir().unwrap();
    let q = wrong
        .path()
        .join(format!("dev/block/{major}:{minor}/queue"));
    fs::create_dir_all(&q).unwrap();
    for (f, v) in [
        ("logical_block_size", "4096"),
        ("physical_block_size", "4096"),
        ("write_cache", "write back"),
        ("max_hw_sectors_kb", "128"),
        ("max_sectors_kb", "128"),
        ("rotational", "0"),
    ] {
        fs::write(q.join(f), v).unwrap();
    }
    let e = probe_file_with_sysfs(&direct, &lo.dev, wrong.path()).unwrap_err();
    assert!(matches!(e.kind(), ProbeErrorKind::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("BLKSSZGET says 512"), "{e}");

    // A partition: its queue and identity are the whole disk's.
    match lo.add_partition(1, 2048, 64 * 2048 - 2048) {
        Ok(part) => {
            let pp = probe(&part).unwrap();
            eprintln!("loop partition: {pp:#?}");
            let (pmajor, pminor) = block_dev(&pp);
            assert_ne!((pmajor, pminor), (major, minor));
            assert_eq!(pp.capacity_bytes, 63 * MIB);
            assert_eq!(pp.logical_block_size_bytes, p.logical_block_size_bytes);
            assert_eq!(pp.volatile_write_cache, p.volatile_write_cache);
            assert_eq!(pp.hw_queues, p.hw_queues);
            assert_eq!(pp.max_transfer_bytes, p.max_transfer_bytes);
        }
        Err(reason) => eprintln!("partition part skipped: {reason}"),
    }
}

#[test]
fn profile_serializes_with_snake_case_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    File::create(&path).unwrap().set_len(4096).unwrap();
    let json = serde_json::to_value(probe(&path).unwrap()).unwrap();
    assert_eq!(json["kind"], "regular_file");
    assert_eq!(json["capacity_bytes"], 4096);
    let block = serde_json::to_value(BackingKind::BlockDevice { major: 7, minor: 0 }).unwrap();
    assert_eq!(
        block,
        serde_json::json!({"block_device": {"major": 7, "minor": 0}})
    );
}
