//! `sluice-bench`: a fio-like load generator on libblkio (crate `blkio` 0.5).
//!
//! It drives either libblkio's `virtio-blk-vhost-user` driver (a vhost-user-blk socket, e.g.
//! one that sluice serves) or its `io_uring` driver (a file or block device opened
//! `O_DIRECT`: the baseline without any backend in between), with the same engine:
//!
//! * one thread per queue, each with its own libblkio queue, optionally pinned to a CPU;
//! * `iodepth` requests in flight per queue, each slot with its own preallocated buffer in
//!   one memory region mapped for the device; a completed slot is resubmitted at once;
//! * random or sequential reads, writes or a read/write mix;
//! * a ramp time whose I/O is not counted, then `runtime` of measured I/O;
//! * latency (submission call to reaped completion) in a fixed log-linear [`Histogram`],
//!   so the hot loop does not allocate;
//! * client CPU time of the queue threads over the measured window (`getrusage`
//!   `RUSAGE_THREAD`).
//!
//! Every libblkio wait is bounded: the connect/start handshake runs on a helper thread with
//! [`Config::io_timeout`], and each `do_io` gets that timeout, so a dead or stuck backend
//! makes [`run`] fail with a message instead of hanging.
//!
//! libblkio's virtio-blk driver puts every request in 3 descriptors and does not use
//! indirect descriptors, so the vring (`queue-size`) is sized to the next power of two
//! ≥ 3 × depth; a smaller ring would silently cap the depth.

pub mod compare;
pub mod hist;
pub mod parse;
pub mod ublk;

use std::io;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use serde_json::json;

pub use hist::Histogram;

/// Which libblkio driver to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `virtio-blk-vhost-user`: `path` is a vhost-user-blk socket.
    VhostUser,
    /// `io_uring`: `path` is a file or block device, opened with `direct=true`.
    IoUring,
}

impl Driver {
    /// The name on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Driver::VhostUser => "vhost-user",
            Driver::IoUring => "io-uring",
        }
    }

    fn blkio_name(self) -> &'static str {
        match self {
            Driver::VhostUser => "virtio-blk-vhost-user",
            Driver::IoUring => "io_uring",
        }
    }
}

/// The access pattern, with fio's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
    /// Sequential mix (fio `rw`/`readwrite`), reads in `rwmixread` percent of requests.
    ReadWrite,
    /// Random mix (fio `randrw`).
    RandRw,
}

impl Rw {
    /// The name on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::ReadWrite => "rw",
            Rw::RandRw => "randrw",
        }
    }

    /// Parses a fio-style name (`readwrite` is accepted for `rw`).
    pub fn parse(s: &str) -> Result<Rw, BenchError> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "rw" | "readwrite" => Rw::ReadWrite,
            "randrw" => Rw::RandRw,
            _ => return Err(BenchError::UnknownPattern(s.into())),
        })
    }

    /// Random offsets (otherwise sequential).
    pub fn random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }

    /// Percentage of reads given the mix setting.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            Rw::Read | Rw::RandRead => 100,
            Rw::Write | Rw::RandWrite => 0,
            Rw::ReadWrite | Rw::RandRw => rwmixread.min(100),
        }
    }
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub driver: Driver,
    /// Socket (vhost-user) or file/block device (io_uring).
    pub path: PathBuf,
    pub rw: Rw,
    /// Reads in percent of requests for the mixed patterns.
    pub rwmixread: u8,
    /// Block size in bytes (a multiple of the device's request alignment).
    pub bs: usize,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Queues, one thread each.
    pub queues: usize,
    /// Measured time.
    pub runtime: Duration,
    /// Unmeasured warm-up before `runtime`.
    pub ramp: Duration,
    /// CPUs for the queue threads: queue i runs on `cpus[i % len]`; empty: not pinned.
    pub cpus: Vec<usize>,
    /// Use only the first `size` bytes of the device (rounded down to `bs`); `None`: all.
    pub size: Option<u64>,
    /// Bound on the connect handshake and on each wait for completions.
    pub io_timeout: Duration,
    /// Use libblkio poll queues (vhost-user only): the client busy-polls its used rings
    /// instead of sleeping on a completion eventfd, so no wake-up of the client is measured.
    pub poll: bool,
}

impl Config {
    /// Defaults like fio's: 4 KiB random reads, depth 1, one queue, 10 s, no ramp.
    pub fn new(driver: Driver, path: impl Into<PathBuf>) -> Config {
        Config {
            driver,
            path: path.into(),
            rw: Rw::RandRead,
            rwmixread: 50,
            bs: 4096,
            iodepth: 1,
            queues: 1,
            runtime: Duration::from_secs(10),
            ramp: Duration::ZERO,
            cpus: Vec::new(),
            size: None,
            io_timeout: Duration::from_secs(10),
            poll: false,
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        if self.bs == 0 || self.bs % 512 != 0 {
            return Err(BenchError::BlockSizeNotSectors(self.bs));
        }
        if self.bs > MAX_BS {
            return Err(BenchError::BlockSizeTooLarge(self.bs));
        }
        if self.iodepth == 0 || self.queues == 0 {
            return Err(BenchError::NoDepthOrQueues);
        }
        if self.runtime.is_zero() {
            return Err(BenchError::ZeroRuntime);
        }
        if self.io_timeout.is_zero() {
            return Err(BenchError::ZeroIoTimeout);
        }
        if self.rwmixread > 100 {
            return Err(BenchError::RwMixRead(self.rwmixread));
        }
        if self.poll && self.driver != Driver::VhostUser {
            return Err(BenchError::PollNeedsVhostUser);
        }
        if self.driver == Driver::VhostUser && 3 * self.iodepth > MAX_VRING {
            return Err(BenchError::DepthAboveVring {
                iodepth: self.iodepth,
            });
        }
        Ok(())
    }
}

/// libblkio's largest virtio-blk `queue-size`.
const MAX_VRING: usize = 32768;

/// The largest block size a run takes.
const MAX_BS: usize = 64 << 20;

/// Latency summary in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    pub mean: f64,
    pub min: u64,
    pub max: u64,
    pub p50: u64,
    pub p99: u64,
    pub p99_9: u64,
}

/// One run's results.
#[derive(Clone, Debug)]
pub struct Report {
    pub config: Config,
    /// The device's capacity and the bytes the run addressed.
    pub capacity: u64,
    pub span: u64,
    /// Measured wall time (mean over the queue threads).
    pub elapsed: Duration,
    pub read_ios: u64,
    pub write_ios: u64,
    /// Completions per second (sum over queues of ios / own measured time).
    pub iops: f64,
    /// Bytes per second.
    pub bw: f64,
    pub lat: Latency,
    /// CPU time of the queue threads during the measured window.
    pub cpu_user: Duration,
    pub cpu_sys: Duration,
}

impl Report {
    /// Total completions counted.
    pub fn ios(&self) -> u64 {
        self.read_ios + self.write_ios
    }

    /// Client CPU (user + sys) as percent of one CPU over the measured time.
    pub fn cpu_percent(&self) -> f64 {
        let wall = self.elapsed.as_secs_f64();
        if wall == 0.0 {
            0.0
        } else {
            100.0 * (self.cpu_user + self.cpu_sys).as_secs_f64() / wall
        }
    }

    /// The machine-readable form: one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        json!({
            "driver": c.driver.name(),
            "path": c.path.display().to_string(),
            "rw": c.rw.name(),
            "rwmixread": c.rw.read_percent(c.rwmixread),
            "bs": c.bs,
            "iodepth": c.iodepth,
            "queues": c.queues,
            "client_poll": c.poll,
            "runtime_s": c.runtime.as_secs_f64(),
            "ramp_s": c.ramp.as_secs_f64(),
            "cpus": c.cpus,
            "capacity_bytes": self.capacity,
            "span_bytes": self.span,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ios": self.ios(),
            "read_ios": self.read_ios,
            "write_ios": self.write_ios,
            "iops": self.iops,
            "bw_bytes_per_s": self.bw,
            "bw_mib_per_s": self.bw / f64::from(1 << 20),
            "lat_ns": {
                "mean": self.lat.mean,
                "min": self.lat.min,
                "max": self.lat.max,
                "p50": self.lat.p50,
                "p99": self.lat.p99,
                "p99_9": self.lat.p99_9,
            },
            "cpu": {
                "user_s": self.cpu_user.as_secs_f64(),
                "sys_s": self.cpu_sys.as_secs_f64(),
                "total_s": (self.cpu_user + self.cpu_sys).as_secs_f64(),
                "percent": self.cpu_percent(),
            },
        })
    }

    /// The human-readable form: one line.
    pub fn human(&self) -> String {
        let c = &self.config;
        let us = |ns: f64| ns / 1000.0;
        let mix = match c.rw {
            Rw::ReadWrite | Rw::RandRw => format!(" rwmixread={}", c.rwmixread),
            _ => String::new(),
        };
        format!(
            "{} {}{mix} bs={} iodepth={} queues={}{}: {:.1}k IOPS, {:.1} MiB/s, \
             lat us mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, \
             client cpu {:.0}% (user {:.2}s sys {:.2}s) over {:.2}s",
            c.driver.name(),
            c.rw.name(),
            c.bs,
            c.iodepth,
            c.queues,
            if c.poll { " (polling)" } else { "" },
            self.iops / 1000.0,
            self.bw / f64::from(1 << 20),
            us(self.lat.mean),
            us(self.lat.p50 as f64),
            us(self.lat.p99 as f64),
            us(self.lat.p99_9 as f64),
            us(self.lat.max as f64),
            self.cpu_percent(),
            self.cpu_user.as_secs_f64(),
            self.cpu_sys.as_secs_f64(),
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Why a run failed: a setting that cannot work, a libblkio step that failed (named, with
/// libblkio's error as the source), or a request, wait or queue thread that failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An access pattern that is not one of fio's names.
    #[error("unknown pattern {0:?} (read, write, randread, randwrite, rw, randrw)")]
    UnknownPattern(String),
    /// A block size that is not a positive multiple of 512.
    #[error("block size {0} is not a multiple of 512")]
    BlockSizeNotSectors(usize),
    /// A block size above the 64 MiB a run takes.
    #[error("block size {0} is above 64 MiB")]
    BlockSizeTooLarge(usize),
    /// A depth or a queue count of 0.
    #[error("iodepth and queues must be at least 1")]
    NoDepthOrQueues,
    /// A measured time of 0.
    #[error("runtime must be above 0")]
    ZeroRuntime,
    /// An I/O timeout of 0.
    #[error("io timeout must be above 0")]
    ZeroIoTimeout,
    /// A read share above 100 percent.
    #[error("rwmixread {0} is above 100")]
    RwMixRead(u8),
    /// Poll queues asked for with a driver other than vhost-user.
    #[error("polling (libblkio poll queues) is for the vhost-user driver only")]
    PollNeedsVhostUser,
    /// A depth whose requests do not fit in libblkio's largest vring.
    #[error(
        "iodepth {iodepth} needs a vring of {ring} entries (3 descriptors per request); \
         libblkio allows at most {MAX_VRING}",
        ring = (3 * .iodepth).next_power_of_two()
    )]
    DepthAboveVring {
        /// Requests in flight per queue.
        iodepth: usize,
    },
    /// A path libblkio cannot take (its properties are C strings).
    #[error("path {} is not UTF-8", .0.display())]
    PathNotUtf8(PathBuf),
    /// libblkio could not make an instance of the driver.
    #[error("blkio new: {}", blkio_detail(.source))]
    Create {
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// Setting or reading a libblkio property failed.
    #[error("{what}: {}", blkio_detail(.source))]
    Property {
        /// The step, e.g. `set queue-size 32` or `get capacity`.
        what: String,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// libblkio could not connect to the socket or open the file.
    #[error("connect to {}: {}", path.display(), blkio_detail(.source))]
    Connect {
        /// The socket (vhost-user) or file (io_uring).
        path: PathBuf,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// libblkio could not start the device's queues.
    #[error("start: {}", blkio_detail(.source))]
    Start {
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// libblkio could not allocate the request buffers' memory region.
    #[error("alloc_mem_region {len}: {}", blkio_detail(.source))]
    AllocRegion {
        /// The region's size in bytes.
        len: usize,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// libblkio could not map the memory region for the device.
    #[error("map_mem_region: {}", blkio_detail(.source))]
    MapRegion {
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// More queues than libblkio's property (an `i32`) takes.
    #[error("too many queues")]
    TooManyQueues(usize),
    /// A depth whose io_uring ring size does not fit libblkio's property (an `i32`).
    #[error("iodepth too large")]
    DepthTooLarge(usize),
    /// libblkio started another number of queues than asked for.
    #[error("asked for {asked} queues, libblkio started {started}")]
    QueueCount {
        /// The queues asked for.
        asked: usize,
        /// The queues started.
        started: usize,
    },
    /// The block size does not suit the device.
    #[error("block size {bs} is not a multiple of the device's request alignment {alignment}")]
    RequestAlignment {
        /// The block size.
        bs: usize,
        /// The device's request alignment.
        alignment: usize,
    },
    /// The thread that runs the connect handshake could not be made.
    #[error("spawning the connect thread: {0}")]
    SpawnConnect(#[source] io::Error),
    /// The connect handshake did not finish within the I/O timeout.
    #[error("{driver} {}: no answer within {timeout:?} while connecting", path.display())]
    ConnectTimeout {
        /// The driver's name.
        driver: &'static str,
        /// The socket or file.
        path: PathBuf,
        /// The I/O timeout.
        timeout: Duration,
    },
    /// The thread that ran the connect handshake panicked.
    #[error("connect thread panicked")]
    ConnectPanicked,
    /// A CPU that a `cpu_set_t` cannot hold.
    #[error("CPU {0} is beyond CPU_SETSIZE")]
    CpuBeyondSetSize(usize),
    /// `sched_setaffinity` refused the CPU (offline, or outside this process's cpuset).
    #[error("pinning a queue thread to CPU {cpu}: {source}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// The error from `sched_setaffinity(2)`.
        #[source]
        source: io::Error,
    },
    /// No request completed within the I/O timeout: the backend is dead or stuck.
    #[error(
        "queue {queue}: no completion within {timeout:?} with {in_flight} request(s) in \
         flight: is the backend alive?: {}",
        blkio_detail(.source)
    )]
    NoCompletion {
        /// The queue.
        queue: usize,
        /// The I/O timeout.
        timeout: Duration,
        /// Requests in flight on the queue.
        in_flight: usize,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// Waiting for completions failed otherwise.
    #[error("queue {queue}: do_io with {in_flight} in flight: {}", blkio_detail(.source))]
    DoIo {
        /// The queue.
        queue: usize,
        /// Requests in flight on the queue.
        in_flight: usize,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// A completion for a request this queue did not submit.
    #[error("queue {queue}: completion with bad user_data {user_data}")]
    BadUserData {
        /// The queue.
        queue: usize,
        /// The completion's `user_data`.
        user_data: usize,
    },
    /// The device failed a request.
    #[error("queue {queue}: {op} failed: {source} ({ret})")]
    Request {
        /// The queue.
        queue: usize,
        /// `read` or `write`.
        op: &'static str,
        /// The completion's return value (a negative errno).
        ret: i32,
        /// The errno as an error.
        #[source]
        source: io::Error,
    },
    /// The device (or its `--size` part) has fewer blocks than there are queues.
    #[error(
        "the device ({span} bytes used of {capacity}) holds {blocks} blocks of {bs}: \
         fewer than the {queues} queues"
    )]
    TooFewBlocks {
        /// The bytes the run would use.
        span: u64,
        /// The device's capacity.
        capacity: u64,
        /// Blocks of `bs` in `span`.
        blocks: u64,
        /// The block size.
        bs: u64,
        /// The queues.
        queues: usize,
    },
    /// A queue thread could not be made.
    #[error("spawning a queue thread: {0}")]
    SpawnQueue(#[source] io::Error),
    /// A queue thread panicked.
    #[error("a queue thread panicked")]
    QueuePanicked,
}

impl BenchError {
    /// A `map_err` for a libblkio property step: `set path`, `get capacity`.
    fn property(what: impl Into<String>) -> impl FnOnce(blkio::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Property { what, source }
    }
}

/// libblkio's message, with the errno's text unless the message has it already.
fn blkio_detail(e: &blkio::Error) -> String {
    // libblkio's message often is the errno text already ("… (os error 2)").
    if e.message().contains("os error") {
        e.message().to_owned()
    } else {
        let errno = io::Error::from_raw_os_error(e.errno().raw_os_error());
        format!("{} ({errno})", e.message())
    }
}

/// A started libblkio instance with its queues and one mapped buffer region.
struct Session {
    // Field order is drop order: queues before the Blkio instance owning the region.
    queues: Vec<Blkioq>,
    /// Kept alive for the queues and the region (never read).
    _blkio: Blkio,
    region_addr: usize,
    capacity: u64,
    /// Bytes per request slot (bs rounded up to the buffer alignment).
    slot_bytes: usize,
}

fn open(cfg: &Config) -> Result<Session, BenchError> {
    let path = cfg
        .path
        .to_str()
        .ok_or_else(|| BenchError::PathNotUtf8(cfg.path.clone()))?;
    let mut b =
        Blkio::new(cfg.driver.blkio_name()).map_err(|source| BenchError::Create { source })?;
    b.set_str("path", path)
        .map_err(BenchError::property("set path"))?;
    let read_only = cfg.rw.read_percent(cfg.rwmixread) == 100;
    if cfg.driver == Driver::IoUring {
        b.set_bool("direct", true)
            .map_err(BenchError::property("set direct"))?;
        // A read-only run opens the file read-only, like fio with readonly=1.
        b.set_bool("read-only", read_only)
            .map_err(BenchError::property("set read-only"))?;
    }
    b.connect().map_err(|source| BenchError::Connect {
        path: cfg.path.clone(),
        source,
    })?;
    let queues = i32::try_from(cfg.queues).map_err(|_| BenchError::TooManyQueues(cfg.queues))?;
    // Poll queues have no completion eventfd: do_io spins on the used ring.
    let (kind, other) = if cfg.poll {
        ("num-poll-queues", "num-queues")
    } else {
        ("num-queues", "num-poll-queues")
    };
    b.set_i32(kind, queues)
        .map_err(BenchError::property(format!("set {kind} {queues}")))?;
    if cfg.poll {
        b.set_i32(other, 0)
            .map_err(BenchError::property(format!("set {other} 0")))?;
    }
    match cfg.driver {
        Driver::VhostUser => {
            let size = (3 * cfg.iodepth).next_power_of_two();
            b.set_i32("queue-size", size as i32)
                .map_err(BenchError::property(format!("set queue-size {size}")))?;
        }
        Driver::IoUring => {
            let entries = cfg.iodepth.next_power_of_two().max(8);
            let entries =
                i32::try_from(entries).map_err(|_| BenchError::DepthTooLarge(cfg.iodepth))?;
            b.set_i32("num-entries", entries)
                .map_err(BenchError::property(format!("set num-entries {entries}")))?;
        }
    }
    let mut started = b.start().map_err(|source| BenchError::Start { source })?;
    if cfg.poll {
        started.queues = std::mem::take(&mut started.poll_queues);
    }
    if started.queues.len() != cfg.queues {
        return Err(BenchError::QueueCount {
            asked: cfg.queues,
            started: started.queues.len(),
        });
    }
    let capacity = b
        .get_u64("capacity")
        .map_err(BenchError::property("get capacity"))?;
    let req_align = b
        .get_i32("request-alignment")
        .map_err(BenchError::property("get request-alignment"))? as usize;
    if req_align > 0 && cfg.bs % req_align != 0 {
        return Err(BenchError::RequestAlignment {
            bs: cfg.bs,
            alignment: req_align,
        });
    }
    let buf_align = b
        .get_i32("buf-alignment")
        .map_err(BenchError::property("get buf-alignment"))?
        .max(1) as usize;
    let region_align = b
        .get_u64("mem-region-alignment")
        .map_err(BenchError::property("get mem-region-alignment"))?
        .max(4096) as usize;
    let slot_bytes = cfg.bs.next_multiple_of(buf_align.max(4096));
    let len = (cfg.queues * cfg.iodepth * slot_bytes).next_multiple_of(region_align);
    let region = b
        .alloc_mem_region(len)
        .map_err(|source| BenchError::AllocRegion { len, source })?;
    b.map_mem_region(&region)
        .map_err(|source| BenchError::MapRegion { source })?;
    // Non-zero, non-uniform write data, so no layer can short-cut zero pages.
    // SAFETY: the region is `len` bytes of fresh read-write memory that libblkio mapped for
    // us; no request is in flight yet, so nothing else accesses it.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, len) };
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29) as u8
            | 1;
    }
    Ok(Session {
        queues: started.queues,
        _blkio: b,
        region_addr: region.addr,
        capacity,
        slot_bytes,
    })
}

/// [`open`] on a helper thread, bounded by `cfg.io_timeout`: the vhost-user handshake has no
/// timeout of its own. On timeout the helper is abandoned.
fn open_bounded(cfg: &Config) -> Result<Session, BenchError> {
    let (tx, rx) = mpsc::channel();
    let c = cfg.clone();
    thread::Builder::new()
        .name("blkio-connect".into())
        .spawn(move || {
            let _ = tx.send(open(&c));
        })
        .map_err(BenchError::SpawnConnect)?;
    match rx.recv_timeout(cfg.io_timeout) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(BenchError::ConnectTimeout {
            driver: cfg.driver.name(),
            path: cfg.path.clone(),
            timeout: cfg.io_timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(BenchError::ConnectPanicked),
    }
}

/// What one queue thread measured.
struct QueueResult {
    hist: Histogram,
    reads: u64,
    writes: u64,
    elapsed: Duration,
    user: Duration,
    sys: Duration,
}

/// `RUSAGE_THREAD` (Linux; the libc crate has it only for some C libraries).
const RUSAGE_THREAD: libc::c_int = 1;

/// User and system CPU time of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `struct rusage` to the valid pointer we pass.
    let rc = unsafe { libc::getrusage(RUSAGE_THREAD, ru.as_mut_ptr()) };
    if rc != 0 {
        return (Duration::ZERO, Duration::ZERO);
    }
    // SAFETY: zero-initialised and filled in by a successful getrusage.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), BenchError> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(BenchError::CpuBeyondSetSize(cpu));
    }
    // SAFETY: CPU_SET only writes inside `set`, and `cpu` < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from a valid set;
    // pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(BenchError::Pin {
            cpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// xorshift64*: fast, good enough for offsets and the read/write mix.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n (n > 0), by multiply-high.
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Per-queue parameters for [`queue_loop`].
struct QueueJob {
    index: usize,
    cpu: Option<usize>,
    /// This queue's `depth` request buffers of `slot_bytes`.
    buffers: usize,
    slot_bytes: usize,
    /// Block range this queue addresses: random over [first, first + blocks), sequential
    /// from `first` with wrap-around.
    first_block: u64,
    blocks: u64,
    start: Instant,
}

fn queue_loop(q: &mut Blkioq, cfg: &Config, job: &QueueJob) -> Result<QueueResult, BenchError> {
    if let Some(cpu) = job.cpu {
        pin_to(cpu)?;
    }
    let depth = cfg.iodepth;
    let bs = cfg.bs as u64;
    let random = cfg.rw.random();
    let read_pct = u64::from(cfg.rw.read_percent(cfg.rwmixread));
    let mut rng =
        Rng::new((job.index as u64 + 1) ^ (job.start.elapsed().as_nanos() as u64).rotate_left(32));
    let mut seq_next = 0u64;

    // All per-request state preallocated: submit time per slot, completion array.
    let mut submitted_at = vec![job.start; depth];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut hist = Histogram::new();
    let (mut reads, mut writes) = (0u64, 0u64);

    let ramp_end = job.start + cfg.ramp;
    let end = ramp_end + cfg.runtime;
    let mut measuring = cfg.ramp.is_zero();
    let mut measure_start = job.start;
    let mut cpu_start = if measuring {
        thread_cpu()
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let mut stop: Option<(Instant, (Duration, Duration))> = None;

    // user_data is the slot index; is_write[slot] says what the slot's request is.
    let mut is_write = vec![false; depth];
    let mut submit =
        |q: &mut Blkioq, slot: usize, submitted_at: &mut [Instant], is_write: &mut [bool]| {
            let block = if random {
                rng.below(job.blocks)
            } else {
                let b = seq_next;
                seq_next = if seq_next + 1 >= job.blocks {
                    0
                } else {
                    seq_next + 1
                };
                b
            };
            let offset = (job.first_block + block) * bs;
            let write = read_pct < 100 && (read_pct == 0 || rng.below(100) >= read_pct);
            let buf = (job.buffers + slot * job.slot_bytes) as *mut u8;
            is_write[slot] = write;
            submitted_at[slot] = Instant::now();
            if write {
                q.write(offset, buf, cfg.bs, slot, ReqFlags::empty());
            } else {
                q.read(offset, buf, cfg.bs, slot, ReqFlags::empty());
            }
        };

    for slot in 0..depth {
        submit(q, slot, &mut submitted_at, &mut is_write);
    }
    let mut in_flight = depth;

    while in_flight > 0 {
        let mut timeout = cfg.io_timeout;
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|source| {
                if source.errno() == blkio::Errno::TIME {
                    BenchError::NoCompletion {
                        queue: job.index,
                        timeout: cfg.io_timeout,
                        in_flight,
                        source,
                    }
                } else {
                    BenchError::DoIo {
                        queue: job.index,
                        in_flight,
                        source,
                    }
                }
            })?;
        let now = Instant::now();
        let stopping = stop.is_some() || now >= end;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` elements.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if slot >= depth {
                return Err(BenchError::BadUserData {
                    queue: job.index,
                    user_data: slot,
                });
            }
            if c.ret != 0 {
                return Err(BenchError::Request {
                    queue: job.index,
                    op: if is_write[slot] { "write" } else { "read" },
                    ret: c.ret,
                    source: io::Error::from_raw_os_error(-c.ret),
                });
            }
            if measuring && stop.is_none() {
                let ns = now.saturating_duration_since(submitted_at[slot]).as_nanos();
                hist.record(u64::try_from(ns).unwrap_or(u64::MAX));
                if is_write[slot] {
                    writes += 1;
                } else {
                    reads += 1;
                }
            }
            if stopping {
                in_flight -= 1;
            } else {
                submit(q, slot, &mut submitted_at, &mut is_write);
            }
        }
        if !measuring && now >= ramp_end {
            measuring = true;
            measure_start = now;
            cpu_start = thread_cpu();
        }
        if measuring && stop.is_none() && now >= end {
            stop = Some((now, thread_cpu()));
        }
    }
    let (stop_at, cpu_end) = stop.expect("the loop ends only after stopping");
    Ok(QueueResult {
        hist,
        reads,
        writes,
        elapsed: stop_at.saturating_duration_since(measure_start),
        user: cpu_end.0.saturating_sub(cpu_start.0),
        sys: cpu_end.1.saturating_sub(cpu_start.1),
    })
}

/// Runs one benchmark and returns its report; errors name the failing step (connect,
/// start, a request, a wait that ran out of time).
pub fn run(cfg: &Config) -> Result<Report, BenchError> {
    cfg.validate()?;
    let mut session = open_bounded(cfg)?;
    let bs = cfg.bs as u64;
    let span = cfg.size.unwrap_or(session.capacity).min(session.capacity);
    let blocks = span / bs;
    if blocks < cfg.queues as u64 {
        return Err(BenchError::TooFewBlocks {
            span,
            capacity: session.capacity,
            blocks,
            bs,
            queues: cfg.queues,
        });
    }
    let start = Instant::now();
    let per_queue_bytes = cfg.iodepth * session.slot_bytes;
    let slot_bytes = session.slot_bytes;
    let base = session.region_addr;
    let results: Vec<Result<QueueResult, BenchError>> = thread::scope(|s| {
        let handles: Vec<_> = session
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                // Sequential runs give each queue its own stretch of the device, as fio
                // jobs with offset_increment would; random runs use all of it.
                let (first_block, qblocks) = if cfg.rw.random() {
                    (0, blocks)
                } else {
                    let per = blocks / cfg.queues as u64;
                    (i as u64 * per, per)
                };
                let job = QueueJob {
                    index: i,
                    cpu: (!cfg.cpus.is_empty()).then(|| cfg.cpus[i % cfg.cpus.len()]),
                    buffers: base + i * per_queue_bytes,
                    slot_bytes,
                    first_block,
                    blocks: qblocks,
                    start,
                };
                thread::Builder::new()
                    .name(format!("bench-q{i}"))
                    .spawn_scoped(s, move || queue_loop(q, cfg, &job))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or(Err(BenchError::QueuePanicked)),
                Err(e) => Err(BenchError::SpawnQueue(e)),
            })
            .collect()
    });
    let mut hist = Histogram::new();
    let (mut reads, mut writes, mut iops, mut bw) = (0u64, 0u64, 0f64, 0f64);
    let (mut user, mut sys, mut elapsed) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for r in results {
        let r = r?;
        hist.merge(&r.hist);
        reads += r.reads;
        writes += r.writes;
        let secs = r.elapsed.as_secs_f64();
        if secs > 0.0 {
            let ios = (r.reads + r.writes) as f64;
            iops += ios / secs;
            bw += ios * bs as f64 / secs;
        }
        user += r.user;
        sys += r.sys;
        elapsed += r.elapsed;
    }
    Ok(Report {
        config: cfg.clone(),
        capacity: session.capacity,
        span: blocks * bs,
        elapsed: elapsed / cfg.queues as u32,
        read_ios: reads,
        write_ios: writes,
        iops,
        bw,
        lat: Latency {
            mean: hist.mean(),
            min: hist.min(),
            max: hist.max(),
            p50: hist.percentile(50.0),
            p99: hist.percentile(99.0),
            p99_9: hist.percentile(99.9),
        },
        cpu_user: user,
        cpu_sys: sys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_names_round_trip() {
        for rw in [
            Rw::Read,
            Rw::Write,
            Rw::RandRead,
            Rw::RandWrite,
            Rw::ReadWrite,
            Rw::RandRw,
        ] {
            assert_eq!(Rw::parse(rw.name()).unwrap(), rw);
        }
        assert_eq!(Rw::parse("readwrite").unwrap(), Rw::ReadWrite);
        let e = Rw::parse("trim").unwrap_err();
        assert!(
            matches!(&e, BenchError::UnknownPattern(s) if s == "trim"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            r#"unknown pattern "trim" (read, write, randread, randwrite, rw, randrw)"#
        );
        assert_eq!(Rw::RandRead.read_percent(30), 100);
        assert_eq!(Rw::Write.read_percent(30), 0);
        assert_eq!(Rw::RandRw.read_percent(30), 30);
    }

    #[test]
    fn config_validation() {
        let ok = Config::new(Driver::VhostUser, "/nonexistent.sock");
        assert!(ok.validate().is_ok());
        let refused = |change: &dyn Fn(&mut Config)| {
            let mut c = ok.clone();
            change(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            refused(&|c| c.bs = 1000),
            BenchError::BlockSizeNotSectors(1000)
        ));
        assert!(matches!(
            refused(&|c| c.bs = 0),
            BenchError::BlockSizeNotSectors(0)
        ));
        assert!(matches!(
            refused(&|c| c.bs = 128 << 20),
            BenchError::BlockSizeTooLarge(_)
        ));
        assert!(matches!(
            refused(&|c| c.iodepth = 0),
            BenchError::NoDepthOrQueues
        ));
        assert!(matches!(
            refused(&|c| c.queues = 0),
            BenchError::NoDepthOrQueues
        ));
        assert!(matches!(
            refused(&|c| c.runtime = Duration::ZERO),
            BenchError::ZeroRuntime
        ));
        assert!(matches!(
            refused(&|c| c.io_timeout = Duration::ZERO),
            BenchError::ZeroIoTimeout
        ));
        assert!(matches!(
            refused(&|c| c.rwmixread = 101),
            BenchError::RwMixRead(101)
        ));
        assert!(matches!(
            refused(&|c| {
                c.driver = Driver::IoUring;
                c.poll = true;
            }),
            BenchError::PollNeedsVhostUser
        ));
        // 3 × depth above libblkio's 32768-entry vring limit.
        let e = refused(&|c| c.iodepth = 20_000);
        assert!(
            matches!(e, BenchError::DepthAboveVring { iodepth: 20_000 }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "iodepth 20000 needs a vring of 65536 entries (3 descriptors per request); \
             libblkio allows at most 32768"
        );
        let mut c = ok;
        c.iodepth = 20_000;
        c.driver = Driver::IoUring;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn rng_below_stays_in_range_and_spreads() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] += 1;
        }
        for (i, &n) in seen.iter().enumerate() {
            assert!((9_000..11_000).contains(&n), "bucket {i}: {n}");
        }
    }

    #[test]
    fn connecting_to_nothing_fails_fast() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-none-{}", std::process::id()));
        let mut c = Config::new(Driver::VhostUser, dir.join("missing.sock"));
        c.runtime = Duration::from_millis(100);
        c.io_timeout = Duration::from_secs(5);
        let t = Instant::now();
        let e = run(&c).unwrap_err();
        assert!(matches!(e, BenchError::Connect { .. }), "{e:?}");
        assert!(e.to_string().starts_with("connect to "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
