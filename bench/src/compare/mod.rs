//! The comparison runner behind `sluice-compare`: sluice against qemu-storage-daemon and
//! against the drive itself, side by side in one run.
//!
//! Every *target* is one way onto the same backing file (or onto nothing, for the null
//! targets), and every *point* is one workload. The runner interleaves them: for each
//! placement and queue count it starts the servers once, then repeats
//! `for point { for target { run } }` `repeats` times, so slow drifts of this noisy machine
//! spread over all targets instead of landing on one. Each cell reports the median and the
//! spread of its repeats.
//!
//! Placement (which CPU each side runs on) matters a lot on a 2-core machine: a cross-core
//! eventfd wake-up costs tens of microseconds. The client (our load generator, or fio)
//! always runs on `client_cpu`; a server runs on `server_cpu` in the *split* placement and
//! on `client_cpu` as well in the *shared* one. Both servers run with their default
//! polling in both placements: sluice `--poll-us 50` (it yields its core while it polls),
//! qemu-storage-daemon's iothread adaptive polling (`poll-max-ns=0` measured the same).

pub mod fio;
pub mod plot;
pub mod report;
pub mod server;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{BenchError, Config, Driver, Rw};
use fio::FioError;
use plot::PlotError;
use server::{Server, ServerError, ServerKind};

/// Why the comparison (or one run of it) failed, or a name on its command line is unknown.
/// A missing tool's message says how to get it or leave its targets out.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A placement name that is not `split` or `shared`.
    #[error("unknown placement {0:?} (split, shared)")]
    UnknownPlacement(String),
    /// A target name that is not one of [`Target::ALL`].
    #[error("unknown target {0:?} ({names})", names = target_names())]
    UnknownTarget(String),
    /// The sluice binary is not where the options say.
    #[error(
        "sluice binary {} not found: build it (cargo build --release -p sluice) or pass --sluice",
        .0.display()
    )]
    NoSluice(PathBuf),
    /// qemu-storage-daemon is not found, and a qsd target is asked for.
    #[error(
        "{0}: install qemu-utils (apt-get install -t bookworm-backports qemu-utils) or pass \
         --qsd, or leave out the qsd targets"
    )]
    NoQsd(#[source] ServerError),
    /// fio is not found, and the fio target is asked for.
    #[error("{0}: install fio or leave out the fio target")]
    NoFio(#[source] ServerError),
    /// No repeats asked for.
    #[error("repeats must be at least 1")]
    NoRepeats,
    /// Both a backing file and a RAM loop device asked for.
    #[error("--file and --ram-loop exclude each other")]
    FileAndRamLoop,
    /// A directory (the work or output directory, or the backing file's) could not be made.
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file (the backing file or a result) could not be created.
    #[error("creating {}: {source}", path.display())]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a file (the backing file or a result) failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Syncing the backing file to its drive failed.
    #[error("syncing {}: {source}", path.display())]
    Sync {
        /// The backing file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing file cannot be opened `O_DIRECT`, as every target opens it.
    #[error(
        "opening {} with O_DIRECT: {source} (the directory's filesystem must support direct \
         I/O; tmpfs does not before Linux 6.6: pick another --dir)",
        path.display()
    )]
    NoDirectIo {
        /// The backing file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `losetup` could not be run.
    #[error("running losetup (util-linux): {0}")]
    Losetup(#[source] io::Error),
    /// `losetup` could not attach a loop device.
    #[error(
        "losetup --find --show {}: {stderr} (--ram-loop needs root and loop devices)",
        image.display()
    )]
    LosetupFailed {
        /// The image in /dev/shm.
        image: PathBuf,
        /// What losetup printed on stderr, trimmed.
        stderr: String,
    },
    /// The size of the backing file or device could not be found.
    #[error(transparent)]
    DeviceSize(ServerError),
    /// A server could not be started.
    #[error(transparent)]
    StartServer(ServerError),
    /// A server did not stop cleanly.
    #[error("{}: {source}", target.name())]
    StopServer {
        /// The target the server was for.
        target: Target,
        /// What went wrong.
        #[source]
        source: ServerError,
    },
    /// A fio run failed.
    #[error(transparent)]
    Fio(#[from] FioError),
    /// A run of the load generator failed.
    #[error(transparent)]
    Generator(#[from] BenchError),
    /// A vhost-user target without its server.
    #[error("no server for this target")]
    NoServer,
    /// The results could not be serialised.
    #[error("to JSON: {0}")]
    ToJson(#[source] serde_json::Error),
    /// The plot could not be made.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// The target names, for a message.
fn target_names() -> String {
    let names: Vec<_> = Target::ALL.iter().map(|t| t.name()).collect();
    names.join(", ")
}

/// Where the two sides of a run are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Client on `client_cpu`, server on `server_cpu`: each side has its own core.
    Split,
    /// Client and server both on `client_cpu`.
    Shared,
}

impl Placement {
    pub const ALL: [Placement; 2] = [Placement::Split, Placement::Shared];

    pub fn name(self) -> &'static str {
        match self {
            Placement::Split => "split",
            Placement::Shared => "shared",
        }
    }

    pub fn parse(s: &str) -> Result<Placement, CompareError> {
        Placement::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| CompareError::UnknownPlacement(s.into()))
    }
}

/// What the backing of a target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    File,
    Null,
}

/// One way onto the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// fio's io_uring engine, `direct=1`, on the backing file: the physical limit.
    Fio,
    /// libblkio's io_uring driver on the backing file, through our generator: the
    /// harness's own reference (what the generator costs compared to fio).
    BlkioUring,
    /// qemu-storage-daemon's vhost-user-blk export of the backing file.
    QsdFile,
    /// sluice's vhost-user-blk export of the backing file.
    SluiceFile,
    /// qemu-storage-daemon's vhost-user-blk export of a `null-co` node.
    QsdNull,
    /// sluice's vhost-user-blk export of a null node.
    SluiceNull,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Fio,
        Target::BlkioUring,
        Target::QsdFile,
        Target::SluiceFile,
        Target::QsdNull,
        Target::SluiceNull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Fio => "fio-io_uring",
            Target::BlkioUring => "blkio-io_uring",
            Target::QsdFile => "qsd-file",
            Target::SluiceFile => "sluice-file",
            Target::QsdNull => "qsd-null",
            Target::SluiceNull => "sluice-null",
        }
    }

    pub fn parse(s: &str) -> Result<Target, CompareError> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| CompareError::UnknownTarget(s.into()))
    }

    pub fn describe(self) -> &'static str {
        match self {
            Target::Fio => "fio ioengine=io_uring direct=1 on the backing file (physical limit)",
            Target::BlkioUring => "sluice-bench, libblkio io_uring driver, direct, on the backing file",
            Target::QsdFile => {
                "qemu-storage-daemon vhost-user-blk export, file driver cache.direct=on aio=io_uring, one iothread"
            }
            Target::SluiceFile => "sluice vhost-user-blk export of the backing file",
            Target::QsdNull => "qemu-storage-daemon vhost-user-blk export of null-co (read-zeroes=on), one iothread",
            Target::SluiceNull => "sluice vhost-user-blk export of a null node (reads zeroes)",
        }
    }

    pub fn backing(self) -> Backing {
        match self {
            Target::QsdNull | Target::SluiceNull => Backing::Null,
            _ => Backing::File,
        }
    }

    /// The server this target runs behind, if any.
    pub fn server(self) -> Option<ServerKind> {
        match self {
            Target::Fio | Target::BlkioUring => None,
            Target::QsdFile | Target::QsdNull => Some(ServerKind::Qsd),
            Target::SluiceFile | Target::SluiceNull => Some(ServerKind::Sluice),
        }
    }
}

/// One workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    #[serde(serialize_with = "ser_rw", deserialize_with = "de_rw")]
    pub rw: Rw,
    pub bs: usize,
    pub iodepth: usize,
    pub queues: usize,
}

fn ser_rw<S: serde::Serializer>(rw: &Rw, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(rw.name())
}

fn de_rw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Rw, D::Error> {
    let s = String::deserialize(d)?;
    Rw::parse(&s).map_err(serde::de::Error::custom)
}

impl Point {
    /// `randread-4k-qd32-q2`.
    pub fn id(&self) -> String {
        let bs = if self.bs % 1024 == 0 {
            format!("{}k", self.bs / 1024)
        } else {
            self.bs.to_string()
        };
        format!(
            "{}-{bs}-qd{}-q{}",
            self.rw.name(),
            self.iodepth,
            self.queues
        )
    }

    /// A short label for plots: `rr 4k qd32 q2` (rr/rw: random read/write; sr/sw:
    /// sequential read/write).
    pub fn short_label(&self) -> String {
        let rw = match self.rw {
            Rw::RandRead => "rr",
            Rw::RandWrite => "rw",
            Rw::Read => "sr",
            Rw::Write => "sw",
            Rw::ReadWrite => "srw",
            Rw::RandRw => "rrw",
        };
        let id = self.id();
        let rest = id.split_once('-').map_or("", |(_, r)| r);
        format!("{rw} {}", rest.replace('-', " "))
    }

    /// The issue's points: 4 KiB random read and write at depth 1, 32 and 128 with 1 and
    /// 2 queues; 128 KiB sequential read and write at depth 8 on one queue.
    pub fn standard() -> Vec<Point> {
        let mut points = Vec::new();
        for rw in [Rw::RandRead, Rw::RandWrite] {
            for queues in [1, 2] {
                for iodepth in [1, 32, 128] {
                    points.push(Point {
                        rw,
                        bs: 4096,
                        iodepth,
                        queues,
                    });
                }
            }
        }
        for rw in [Rw::Read, Rw::Write] {
            points.push(Point {
                rw,
                bs: 128 << 10,
                iodepth: 8,
                queues: 1,
            });
        }
        points
    }
}

/// The runner's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Sockets, logs and (unless `file` is set) the backing file go here.
    pub work_dir: PathBuf,
    /// Backing file or block device; `None`: `work_dir/backing.img` of `file_size` bytes.
    pub file: Option<PathBuf>,
    /// Back the file targets with a loop device over a `file_size` file in /dev/shm
    /// instead: a steady, memory-speed stand-in for a drive (needs root).
    pub ram_loop: bool,
    pub file_size_bytes: u64,
    /// Size of the null nodes.
    pub null_size_bytes: u64,
    pub out_dir: PathBuf,
    pub runtime: Duration,
    pub ramp: Duration,
    pub repeats: usize,
    pub targets: Vec<Target>,
    pub points: Vec<Point>,
    pub placements: Vec<Placement>,
    pub client_cpu: usize,
    pub server_cpu: usize,
    /// sluice's `--poll-us`.
    pub sluice_poll_us: u32,
    /// sluice's `--queue-depth` (the RSS figure is for this depth).
    pub sluice_queue_depth: usize,
    pub sluice: PathBuf,
    pub qsd: PathBuf,
    pub fio: PathBuf,
    /// Bound on every wait for a server or a request.
    pub io_timeout: Duration,
    /// The vhost-user client busy-polls (libblkio poll queues) instead of sleeping on its
    /// completion eventfd: measures the servers without the client's wake-ups. Meant for
    /// the split placement (a polling client would starve a server on its core).
    pub client_poll: bool,
}

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub iops: f64,
    pub bw_bytes_per_s: f64,
    pub lat_mean_ns: f64,
    pub lat_p50_ns: f64,
    pub lat_p99_ns: f64,
    pub lat_p99_9_ns: f64,
    /// Client CPU in percent of one CPU.
    pub client_cpu_percent: f64,
}

/// All repeats of one (placement, point, target).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub placement: Placement,
    pub point: Point,
    pub target: Target,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
}

/// Memory of one server process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RssRecord {
    pub placement: Placement,
    pub target: Target,
    pub queues: usize,
    pub queue_depth: Option<usize>,
    /// VmRSS right after the export was ready (before any client).
    pub rss_ready_kib: u64,
    /// VmRSS after the last run of the group.
    pub rss_after_kib: u64,
    /// VmHWM: the peak.
    pub rss_peak_kib: u64,
}

/// Everything one run of the runner produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: report::Machine,
    pub settings: report::Settings,
    pub cells: Vec<Cell>,
    pub rss: Vec<RssRecord>,
}

impl Results {
    pub fn cell(&self, placement: Placement, point: &Point, target: Target) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.placement == placement && &c.point == point && c.target == target)
    }

    pub fn failures(&self) -> usize {
        self.cells.iter().map(|c| c.errors.len()).sum()
    }
}

/// Creates (or reuses) the backing file: `size` bytes of real, written data, so reads hit
/// the drive instead of a filesystem's unwritten extents. With `check_direct` it also
/// checks that the file can be opened `O_DIRECT`, as every target will.
pub fn prepare_backing_file(
    path: &Path,
    size: u64,
    check_direct: bool,
) -> Result<(), CompareError> {
    let reusable = fs::metadata(path).is_ok_and(|m| m.len() == size && m.blocks() * 512 >= size);
    if !reusable {
        write_backing_file(path, size)?;
    }
    if check_direct {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| CompareError::NoDirectIo {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

fn write_backing_file(path: &Path, size: u64) -> Result<(), CompareError> {
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    eprintln!(
        "sluice-compare: writing the {} MiB backing file {}",
        size >> 20,
        path.display()
    );
    let mut f = create_file(path)?;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    while written < size {
        let n = CHUNK.min((size - written) as usize);
        // Varied, non-zero content: nothing below can turn it into holes.
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = ((written as usize + i) as u64).wrapping_mul(0x9e37_79b9) as u8 | 1;
        }
        f.write_all(&buf[..n])
            .map_err(|source| CompareError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        written += n as u64;
    }
    f.sync_all().map_err(|source| CompareError::Sync {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), CompareError> {
    fs::create_dir_all(path).map_err(|source| CompareError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

fn create_file(path: &Path) -> Result<File, CompareError> {
    File::create(path).map_err(|source| CompareError::CreateFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A loop device over a file in /dev/shm, detached and removed on drop.
pub struct RamLoop {
    pub device: PathBuf,
    image: PathBuf,
}

impl RamLoop {
    /// Fills a `size`-byte file in /dev/shm with data and attaches a loop device to it.
    pub fn attach(size: u64) -> Result<RamLoop, CompareError> {
        let image = PathBuf::from(format!(
            "/dev/shm/sluice-compare-{}.img",
            std::process::id()
        ));
        prepare_backing_file(&image, size, false)?;
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .map_err(CompareError::Losetup)?;
        if !out.status.success() {
            let _ = fs::remove_file(&image);
            return Err(CompareError::LosetupFailed {
                image,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        eprintln!(
            "sluice-compare: {} is a loop device over {}",
            device.display(),
            image.display()
        );
        Ok(RamLoop { device, image })
    }
}

impl Drop for RamLoop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .status();
        let _ = fs::remove_file(&self.image);
    }
}

/// Runs the whole comparison; per-run failures are recorded in their cell, not fatal.
pub fn run(opts: &Options) -> Result<Results, CompareError> {
    check_tools(opts)?;
    create_dir(&opts.work_dir)?;
    let needs_file = opts.targets.iter().any(|t| t.backing() == Backing::File);
    let ram_loop = if opts.ram_loop && needs_file {
        Some(RamLoop::attach(opts.file_size_bytes)?)
    } else {
        None
    };
    let file = match (&opts.file, &ram_loop) {
        (Some(_), Some(_)) => return Err(CompareError::FileAndRamLoop),
        (Some(f), None) => f.clone(),
        (None, Some(l)) => l.device.clone(),
        (None, None) => {
            let f = opts.work_dir.join("backing.img");
            if needs_file {
                prepare_backing_file(&f, opts.file_size_bytes, true)?;
            }
            f
        }
    };
    let file_size = if needs_file {
        server::device_size(&file).map_err(CompareError::DeviceSize)?
    } else {
        0
    };
    let machine = report::Machine::probe(opts);
    let settings = report::Settings::new(opts, &file, file_size);
    let mut results = Results {
        machine,
        settings,
        cells: Vec::new(),
        rss: Vec::new(),
    };
    let mut queue_counts: Vec<usize> = opts.points.iter().map(|p| p.queues).collect();
    queue_counts.sort_unstable();
    queue_counts.dedup();
    let total = opts.placements.len() * opts.points.len() * opts.targets.len() * opts.repeats;
    let started = Instant::now();
    let mut done = 0usize;
    for &placement in &opts.placements {
        let server_cpu = match placement {
            Placement::Split => opts.server_cpu,
            Placement::Shared => opts.client_cpu,
        };
        for &queues in &queue_counts {
            let points: Vec<Point> = opts
                .points
                .iter()
                .copied()
                .filter(|p| p.queues == queues)
                .collect();
            let mut servers: Vec<(Target, Server)> = Vec::new();
            for &target in &opts.targets {
                let Some(kind) = target.server() else {
                    continue;
                };
                let spec = server::Spec {
                    kind,
                    name: format!("{}-{}-q{queues}", target.name(), placement.name()),
                    backing: match target.backing() {
                        Backing::File => server::BackingSpec::File(file.clone()),
                        Backing::Null => server::BackingSpec::Null(opts.null_size_bytes),
                    },
                    queues,
                    cpu: server_cpu,
                    sluice_poll_us: opts.sluice_poll_us,
                    sluice_queue_depth: opts.sluice_queue_depth,
                    program: match kind {
                        ServerKind::Sluice => opts.sluice.clone(),
                        ServerKind::Qsd => opts.qsd.clone(),
                    },
                    work_dir: opts.work_dir.clone(),
                    ready_timeout: opts.io_timeout,
                };
                servers.push((
                    target,
                    Server::start(&spec).map_err(CompareError::StartServer)?,
                ));
            }
            let rss_ready: Vec<u64> = servers
                .iter()
                .map(|(_, s)| s.memory().map(|m| m.rss_kib).unwrap_or(0))
                .collect();
            for repeat in 0..opts.repeats {
                for point in &points {
                    for &target in &opts.targets {
                        let socket = servers
                            .iter()
                            .find(|(t, _)| *t == target)
                            .map(|(_, s)| s.socket().to_path_buf());
                        let outcome =
                            run_one(opts, target, point, &file, file_size, socket.as_deref());
                        done += 1;
                        progress(
                            done, total, started, placement, point, target, repeat, &outcome,
                        );
                        let cell = cell_mut(&mut results.cells, placement, point, target);
                        match outcome {
                            Ok(s) => cell.samples.push(s),
                            Err(e) => cell.errors.push(e.to_string()),
                        }
                    }
                }
            }
            for ((target, server), ready) in servers.iter().zip(rss_ready) {
                if let Ok(m) = server.memory() {
                    results.rss.push(RssRecord {
                        placement,
                        target: *target,
                        queues,
                        queue_depth: (target.server() == Some(ServerKind::Sluice))
                            .then_some(opts.sluice_queue_depth),
                        rss_ready_kib: ready,
                        rss_after_kib: m.rss_kib,
                        rss_peak_kib: m.hwm_kib,
                    });
                }
            }
            for (target, server) in servers {
                server
                    .stop()
                    .map_err(|source| CompareError::StopServer { target, source })?;
            }
        }
    }
    Ok(results)
}

fn check_tools(opts: &Options) -> Result<(), CompareError> {
    let need = |t: ServerKind| opts.targets.iter().any(|x| x.server() == Some(t));
    if need(ServerKind::Sluice) && !opts.sluice.is_file() {
        return Err(CompareError::NoSluice(opts.sluice.clone()));
    }
    if need(ServerKind::Qsd) {
        server::find_program(&opts.qsd).map_err(CompareError::NoQsd)?;
    }
    if opts.targets.contains(&Target::Fio) {
        server::find_program(&opts.fio).map_err(CompareError::NoFio)?;
    }
    if opts.repeats == 0 {
        return Err(CompareError::NoRepeats);
    }
    Ok(())
}

fn cell_mut<'a>(
    cells: &'a mut Vec<Cell>,
    placement: Placement,
    point: &Point,
    target: Target,
) -> &'a mut Cell {
    let i = match cells
        .iter()
        .position(|c| c.placement == placement && &c.point == point && c.target == target)
    {
        Some(i) => i,
        None => {
            cells.push(Cell {
                placement,
                point: *point,
                target,
                samples: Vec::new(),
                errors: Vec::new(),
            });
            cells.len() - 1
        }
    };
    &mut cells[i]
}

#[allow(clippy::too_many_arguments)]
fn progress(
    done: usize,
    total: usize,
    started: Instant,
    placement: Placement,
    point: &Point,
    target: Target,
    repeat: usize,
    outcome: &Result<Sample, CompareError>,
) {
    let elapsed = started.elapsed().as_secs_f64();
    let left = elapsed / done as f64 * (total - done) as f64;
    let what = match outcome {
        Ok(s) => format!(
            "{:.1}k IOPS, mean {:.1} µs",
            s.iops / 1000.0,
            s.lat_mean_ns / 1000.0
        ),
        Err(e) => format!("FAILED: {e}"),
    };
    eprintln!(
        "[{done}/{total}, ~{:.0} min left] {} {} #{} {}: {what}",
        left / 60.0,
        placement.name(),
        point.id(),
        repeat + 1,
        target.name()
    );
}

/// One measured run of `point` on `target`.
fn run_one(
    opts: &Options,
    target: Target,
    point: &Point,
    file: &Path,
    file_size: u64,
    socket: Option<&Path>,
) -> Result<Sample, CompareError> {
    match target {
        Target::Fio => Ok(fio::run(opts, point, file, file_size)?),
        Target::BlkioUring => generator(opts, Driver::IoUring, file, point),
        _ => {
            let socket = socket.ok_or(CompareError::NoServer)?;
            generator(opts, Driver::VhostUser, socket, point)
        }
    }
}

fn generator(
    opts: &Options,
    driver: Driver,
    path: &Path,
    point: &Point,
) -> Result<Sample, CompareError> {
    let mut cfg = Config::new(driver, path);
    cfg.rw = point.rw;
    cfg.bs = point.bs;
    cfg.iodepth = point.iodepth;
    cfg.queues = point.queues;
    cfg.runtime = opts.runtime;
    cfg.ramp = opts.ramp;
    cfg.cpus = vec![opts.client_cpu];
    cfg.io_timeout = opts.io_timeout;
    cfg.poll = opts.client_poll && driver == Driver::VhostUser;
    let r = crate::run(&cfg)?;
    Ok(Sample {
        iops: r.iops,
        bw_bytes_per_s: r.bw,
        lat_mean_ns: r.lat.mean,
        lat_p50_ns: r.lat.p50 as f64,
        lat_p99_ns: r.lat.p99 as f64,
        lat_p99_9_ns: r.lat.p99_9 as f64,
        client_cpu_percent: r.cpu_percent(),
    })
}

/// Median, minimum and maximum of some values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Half the range relative to the median, in percent (`±x%`).
    pub fn plus_minus_percent(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            50.0 * (self.max - self.min) / self.median
        }
    }
}

impl Cell {
    pub fn iops(&self) -> Option<Spread> {
        Spread::of(self.samples.iter().map(|s| s.iops))
    }

    pub fn lat_mean_ns(&self) -> Option<Spread> {
        Spread::of(self.samples.iter().map(|s| s.lat_mean_ns))
    }
}

/// Writes `compare.json`, `compare.md` and `compare.svg` into `dir`; returns their paths.
pub fn write_results(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, CompareError> {
    create_dir(dir)?;
    let json = dir.join("compare.json");
    let md = dir.join("compare.md");
    let svg = dir.join("compare.svg");
    let text = serde_json::to_string_pretty(results).map_err(CompareError::ToJson)?;
    write_file(&json, text.as_bytes())?;
    write_file(&md, report::markdown(results, "compare.svg").as_bytes())?;
    plot::svg(results, &svg)?;
    Ok(vec![json, md, svg])
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), CompareError> {
    let mut f = create_file(path)?;
    f.write_all(data).map_err(|source| CompareError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_points_are_the_issues() {
        let p = Point::standard();
        assert_eq!(p.len(), 14);
        assert_eq!(p[0].id(), "randread-4k-qd1-q1");
        assert_eq!(p[5].id(), "randread-4k-qd128-q2");
        assert_eq!(p[12].id(), "read-128k-qd8-q1");
        assert_eq!(p[13].id(), "write-128k-qd8-q1");
        assert_eq!(p[5].short_label(), "rr 4k qd128 q2");
        assert_eq!(p[13].short_label(), "sw 128k qd8 q1");
    }

    #[test]
    fn names_parse_back() {
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()).unwrap(), t);
        }
        for p in Placement::ALL {
            assert_eq!(Placement::parse(p.name()).unwrap(), p);
        }
    }

    #[test]
    fn unknown_names_are_typed_errors() {
        let e = Target::parse("spdk").unwrap_err();
        assert!(
            matches!(&e, CompareError::UnknownTarget(s) if s == "spdk"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "unknown target \"spdk\" (fio-io_uring, blkio-io_uring, qsd-file, sluice-file, \
             qsd-null, sluice-null)"
        );
        let e = Placement::parse("apart").unwrap_err();
        assert!(
            matches!(&e, CompareError::UnknownPlacement(s) if s == "apart"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "unknown placement \"apart\" (split, shared)");
    }

    fn options(targets: &[Target]) -> Options {
        Options {
            work_dir: "/nonexistent/work".into(),
            file: None,
            ram_loop: false,
            file_size_bytes: 1 << 20,
            null_size_bytes: 1 << 20,
            out_dir: "/nonexistent/out".into(),
            runtime: Duration::from_millis(100),
            ramp: Duration::ZERO,
            repeats: 1,
            targets: targets.to_vec(),
            points: Point::standard(),
            placements: Placement::ALL.to_vec(),
            client_cpu: 0,
            server_cpu: 1,
            sluice_poll_us: 50,
            sluice_queue_depth: 128,
            sluice: "/nonexistent/sluice".into(),
            qsd: "/nonexistent/qemu-storage-daemon".into(),
            fio: "/nonexistent/fio".into(),
            io_timeout: Duration::from_secs(1),
            client_poll: false,
        }
    }

    #[test]
    fn missing_tools_say_what_to_do() {
        let e = check_tools(&options(&[Target::SluiceNull])).unwrap_err();
        assert!(
            matches!(&e, CompareError::NoSluice(p) if p.ends_with("sluice")),
            "{e:?}"
        );
        assert!(e.to_string().contains("cargo build"), "{e}");
        let e = check_tools(&options(&[Target::QsdNull])).unwrap_err();
        assert!(
            matches!(&e, CompareError::NoQsd(ServerError::NotFound(_))),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            e.to_string(),
            "/nonexistent/qemu-storage-daemon not found: install qemu-utils (apt-get install \
             -t bookworm-backports qemu-utils) or pass --qsd, or leave out the qsd targets"
        );
        let e = check_tools(&options(&[Target::Fio])).unwrap_err();
        assert!(matches!(&e, CompareError::NoFio(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "/nonexistent/fio not found: install fio or leave out the fio target"
        );
        let mut o = options(&[Target::BlkioUring]);
        assert!(check_tools(&o).is_ok());
        o.repeats = 0;
        assert!(matches!(check_tools(&o), Err(CompareError::NoRepeats)));
    }

    #[test]
    fn unwritable_places_name_the_path() {
        let e = prepare_backing_file(Path::new("/proc/sluice-none/backing.img"), 4096, true)
            .unwrap_err();
        assert!(
            matches!(&e, CompareError::CreateDir { path, .. } if path == Path::new("/proc/sluice-none")),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("creating /proc/sluice-none: "),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());

        let r: Results =
            serde_json::from_str(include_str!("../../results/compare.json")).expect("compare.json");
        let e = write_results(&r, Path::new("/proc/sluice-none")).unwrap_err();
        assert!(matches!(&e, CompareError::CreateDir { .. }), "{e:?}");
    }

    #[test]
    fn spread_median_and_range() {
        let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.plus_minus_percent(), 50.0);
        let s = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of([]).is_none());
        assert!(Spread::of([f64::NAN]).is_none());
    }
}
