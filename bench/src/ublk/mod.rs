//! The ublk benchmark behind `sluice-ublk-bench`: one drive, three ways onto it, side by side.
//!
//! * `raw`: fio on the drive itself (io_uring, `direct=1`): the limit;
//! * `sluice`: fio on `/dev/ublkb<N>` from `sluice serve --disk <drive> --ublk <N>`;
//! * `rublk`: fio on `/dev/ublkb<M>` from `rublk add loop -f <drive>` (the reference ublk
//!   server of libublk's author, direct I/O on the same drive); `rublk-zc` is the same with
//!   `--zero-copy` (`UBLK_F_AUTO_BUF_REG`, Linux 6.16+), not run unless asked for.
//!
//! Both servers get the same queue count and depth. For each queue count the runner starts
//! them once, then repeats `for point { for target { fio } }`, so slow drifts spread over all
//! targets instead of landing on one; each cell reports the median and the range of its
//! repeats. The workloads are those of `bench/fio/*.fio`, given to fio as command-line options
//! (a job file's `ramp_time` cannot be overridden; see [`fio_args`] and its test).

pub mod report;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::compare::fio::{self, FioError};
use crate::compare::{Point, Sample, Spread};
use crate::Rw;

/// The ublk control device: present when `ublk_drv` is loaded.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";
/// Bound on a server's start and stop (emulated guests are slow).
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the benchmark (or one run of it) failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum UblkBenchError {
    /// No ublk driver.
    #[error("{UBLK_CONTROL} is missing: load the ublk driver (modprobe ublk_drv, Linux 6.0+)")]
    NoDriver,
    /// A program is missing.
    #[error("{} not found: {hint}", program.display())]
    NoProgram {
        /// The program.
        program: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// The drive is not a block device.
    #[error("{} is not a block device: pass the drive (e.g. --device /dev/nvme0n1)", .0.display())]
    NotBlockDevice(PathBuf),
    /// The ublk device a target would use exists already.
    #[error("{} exists already: delete that ublk device or pick other ids (--sluice-id, --rublk-id)", .0.display())]
    Busy(PathBuf),
    /// A target name that is not known.
    #[error("unknown target {0:?} (raw, sluice, rublk, rublk-zc)")]
    UnknownTarget(String),
    /// Something on the way failed: a process, a file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A server did not start, or did not stop.
    #[error("{0}")]
    Server(String),
    /// The results could not be serialised.
    #[error("to JSON: {0}")]
    ToJson(#[source] serde_json::Error),
    /// The plot could not be made.
    #[error("plotting {}: {msg}", path.display())]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// plotters' error.
        msg: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UblkBenchError {
    let what = what.into();
    move |source| UblkBenchError::Io { what, source }
}

/// One way onto the drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// fio on the drive itself: the limit.
    Raw,
    /// fio on sluice's ublk export of the drive.
    Sluice,
    /// fio on rublk's loop target over the drive.
    Rublk,
    /// rublk's loop target with `--zero-copy` (auto buffer registration).
    RublkZc,
}

impl Target {
    /// Every target; the default set leaves out `rublk-zc`.
    pub const ALL: [Target; 4] = [Target::Raw, Target::Sluice, Target::Rublk, Target::RublkZc];
    /// What runs when `--targets` is not given.
    pub const DEFAULT: [Target; 3] = [Target::Raw, Target::Sluice, Target::Rublk];

    pub fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::Sluice => "sluice",
            Target::Rublk => "rublk",
            Target::RublkZc => "rublk-zc",
        }
    }

    pub fn parse(s: &str) -> Result<Target, UblkBenchError> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UblkBenchError::UnknownTarget(s.into()))
    }
}

/// The runner's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The drive every target ends on. Its data is overwritten by the write points.
    pub device: PathBuf,
    pub out_dir: PathBuf,
    /// Server logs go here.
    pub work_dir: PathBuf,
    pub runtime: Duration,
    pub ramp: Duration,
    pub repeats: usize,
    pub targets: Vec<Target>,
    pub points: Vec<Point>,
    /// Queue depth of both servers' ublk devices.
    pub queue_depth: usize,
    pub sluice: PathBuf,
    pub rublk: PathBuf,
    pub fio: PathBuf,
    /// ublk device ids: sluice, rublk, rublk-zc.
    pub sluice_id: u32,
    pub rublk_id: u32,
    pub rublk_zc_id: u32,
    /// A line for the report about where this ran (e.g. the emulated guest).
    pub note: String,
}

/// All repeats of one (point, target).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub point: Point,
    pub target: Target,
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
}

impl Cell {
    pub fn iops(&self) -> Option<Spread> {
        Spread::of(self.samples.iter().map(|s| s.iops))
    }

    pub fn lat_mean_ns(&self) -> Option<Spread> {
        Spread::of(self.samples.iter().map(|s| s.lat_mean_ns))
    }
}

/// Where and how a run was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    pub date_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub note: String,
    pub device: String,
    pub device_bytes: u64,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub repeats: usize,
    pub queue_depth: usize,
    pub sluice_version: String,
    pub rublk_version: String,
    pub fio_version: String,
    /// The servers' command lines, with `Q` for the queue count.
    pub servers: Vec<(String, String)>,
    /// The ublk driver's feature bits (`UBLK_U_CMD_GET_FEATURES`), when rublk could say.
    pub ublk_features: String,
    /// Seconds from the first fio run to the last.
    pub elapsed_s: f64,
}

/// Everything one run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub setup: Setup,
    pub targets: Vec<Target>,
    pub cells: Vec<Cell>,
}

impl Results {
    pub fn cell(&self, point: &Point, target: Target) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| &c.point == point && c.target == target)
    }

    pub fn points(&self) -> Vec<Point> {
        let mut points: Vec<Point> = Vec::new();
        for c in &self.cells {
            if !points.contains(&c.point) {
                points.push(c.point);
            }
        }
        points
    }

    pub fn failures(&self) -> usize {
        self.cells.iter().map(|c| c.errors.len()).sum()
    }
}

/// `4k`, `128k`, or bytes.
fn size_text(bytes: usize) -> String {
    if bytes % 1024 == 0 {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

/// fio's arguments for `point` on `dev`: the options of `bench/fio/<job>.fio` (checked by a
/// test) with the runtime and ramp given here, plus the JSON report with latency percentiles.
pub fn fio_args(point: &Point, dev: &Path, runtime: Duration, ramp: Duration) -> Vec<String> {
    let job = match point.rw {
        Rw::Read => "seqread",
        Rw::Write => "seqwrite",
        rw => rw.name(),
    };
    let mut a = vec![
        format!("--name={job}-{}", size_text(point.bs)),
        format!("--filename={}", dev.display()),
        "--allow_file_create=0".into(),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--time_based".into(),
        format!("--runtime={}ms", runtime.as_millis().max(1)),
        format!("--ramp_time={}ms", ramp.as_millis()),
        "--group_reporting".into(),
        format!("--rw={}", point.rw.name()),
        format!("--bs={}", size_text(point.bs)),
        format!("--iodepth={}", point.iodepth),
        format!("--numjobs={}", point.queues),
        "--randrepeat=0".into(),
        "--lat_percentiles=1".into(),
        "--output-format=json".into(),
    ];
    if point.rw.random() {
        a.push("--norandommap".into());
    }
    a
}

/// A child process with a bound on its wait.
fn wait_bounded(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to its end within `timeout`; its output, or why not.
fn run_bounded(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
) -> Result<std::process::Output, UblkBenchError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running {what}")))?;
    // Drain the pipes on threads, so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut err, &mut v);
        v
    });
    match wait_bounded(&mut child, timeout).map_err(io_err(format!("waiting for {what}")))? {
        Some(status) => Ok(std::process::Output {
            status,
            stdout: t_out.join().unwrap_or_default(),
            stderr: t_err.join().unwrap_or_default(),
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(UblkBenchError::Server(format!(
                "{what} did not finish within {} s (killed)",
                timeout.as_secs()
            )))
        }
    }
}

fn block_device_bytes(dev: &Path) -> Result<u64, UblkBenchError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = fs::metadata(dev).map_err(io_err(format!("stat {}", dev.display())))?;
    if !meta.file_type().is_block_device() {
        return Err(UblkBenchError::NotBlockDevice(dev.into()));
    }
    crate::compare::server::device_size(dev).map_err(|e| UblkBenchError::Server(e.to_string()))
}

fn ublk_dev(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Waits (bounded) until `path` exists.
fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    path.exists()
}

/// sluice serving the drive as `/dev/ublkb<id>`.
struct SluiceServer {
    child: Child,
    err_log: PathBuf,
}

impl SluiceServer {
    fn args(opts: &Options, queues: usize) -> Vec<String> {
        vec![
            "serve".into(),
            "--disk".into(),
            opts.device.display().to_string(),
            "--ublk".into(),
            opts.sluice_id.to_string(),
            "--queues".into(),
            queues.to_string(),
            "--queue-depth".into(),
            opts.queue_depth.to_string(),
        ]
    }

    fn start(opts: &Options, queues: usize) -> Result<SluiceServer, UblkBenchError> {
        let err_log = opts.work_dir.join(format!("sluice-q{queues}.err"));
        let err =
            File::create(&err_log).map_err(io_err(format!("creating {}", err_log.display())))?;
        let mut child = Command::new(&opts.sluice)
            .args(Self::args(opts, queues))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(io_err(format!("running {}", opts.sluice.display())))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("\"event\":\"ready\"") && line.contains("\"export\"") {
                    let _ = tx.send(line);
                }
            }
        });
        let mut server = SluiceServer { child, err_log };
        match rx.recv_timeout(SERVER_TIMEOUT) {
            Ok(_) => Ok(server),
            Err(_) => {
                let _ = server.child.kill();
                let _ = server.child.wait();
                Err(UblkBenchError::Server(format!(
                    "sluice did not print its ready line within {} s; its log {}:\n{}",
                    SERVER_TIMEOUT.as_secs(),
                    server.err_log.display(),
                    fs::read_to_string(&server.err_log).unwrap_or_default()
                )))
            }
        }
    }

    fn stop(mut self) -> Result<(), UblkBenchError> {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet (so the
        // pid cannot have been reused); no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status =
            wait_bounded(&mut self.child, SERVER_TIMEOUT).map_err(io_err("waiting for sluice"))?;
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(UblkBenchError::Server(format!(
                "sluice exited with {s} after SIGTERM; its log: {}",
                self.err_log.display()
            ))),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(UblkBenchError::Server(format!(
                    "sluice still ran {} s after SIGTERM (killed); its log: {}",
                    SERVER_TIMEOUT.as_secs(),
                    self.err_log.display()
                )))
            }
        }
    }
}

/// rublk's loop target over the drive as `/dev/ublkb<id>` (rublk daemonizes itself).
struct RublkServer {
    rublk: PathBuf,
    id: u32,
}

impl RublkServer {
    fn args(opts: &Options, id: u32, queues: usize, zero_copy: bool) -> Vec<String> {
        let mut a = vec![
            "add".into(),
            "loop".into(),
            "-n".into(),
            id.to_string(),
            "-f".into(),
            opts.device.display().to_string(),
            "-q".into(),
            queues.to_string(),
            "-d".into(),
            opts.queue_depth.to_string(),
            "--quiet".into(),
        ];
        if zero_copy {
            a.push("--zero-copy".into());
        }
        a
    }

    fn start(
        opts: &Options,
        id: u32,
        queues: usize,
        zero_copy: bool,
    ) -> Result<RublkServer, UblkBenchError> {
        let args = Self::args(opts, id, queues, zero_copy);
        let out = run_bounded(
            Command::new(&opts.rublk).args(&args),
            "rublk add",
            SERVER_TIMEOUT,
        )?;
        let server = RublkServer {
            rublk: opts.rublk.clone(),
            id,
        };
        if !out.status.success() {
            return Err(UblkBenchError::Server(format!(
                "rublk {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if !wait_for_path(&ublk_dev(id), SERVER_TIMEOUT) {
            let _ = server.stop();
            return Err(UblkBenchError::Server(format!(
                "rublk {} exited 0 but {} did not appear within {} s",
                args.join(" "),
                ublk_dev(id).display(),
                SERVER_TIMEOUT.as_secs()
            )));
        }
        Ok(server)
    }

    fn stop(self) -> Result<(), UblkBenchError> {
        let out = run_bounded(
            Command::new(&self.rublk).args(["del", "-n", &self.id.to_string()]),
            "rublk del",
            SERVER_TIMEOUT,
        )?;
        if out.status.success() {
            Ok(())
        } else {
            Err(UblkBenchError::Server(format!(
                "rublk del -n {} exited with {}: {}",
                self.id,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// Checks the driver, the programs and the ids before anything starts.
fn check(opts: &Options) -> Result<u64, UblkBenchError> {
    let bytes = block_device_bytes(&opts.device)?;
    let ublk = opts.targets.iter().any(|t| *t != Target::Raw);
    if ublk && !Path::new(UBLK_CONTROL).exists() {
        return Err(UblkBenchError::NoDriver);
    }
    let find = |p: &Path, hint| {
        crate::compare::server::find_program(p).map_err(|_| UblkBenchError::NoProgram {
            program: p.into(),
            hint,
        })
    };
    find(&opts.fio, "install fio (apt-get install fio)")?;
    if opts.targets.contains(&Target::Sluice) {
        find(
            &opts.sluice,
            "build it (cargo build --release -p sluice) or pass --sluice",
        )?;
        if ublk_dev(opts.sluice_id).exists() {
            return Err(UblkBenchError::Busy(ublk_dev(opts.sluice_id)));
        }
    }
    for (t, id) in [
        (Target::Rublk, opts.rublk_id),
        (Target::RublkZc, opts.rublk_zc_id),
    ] {
        if opts.targets.contains(&t) {
            find(
                &opts.rublk,
                "cargo install --root DIR rublk, then pass --rublk DIR/bin/rublk (or leave the rublk targets out: --targets raw,sluice)",
            )?;
            if ublk_dev(id).exists() {
                return Err(UblkBenchError::Busy(ublk_dev(id)));
            }
        }
    }
    Ok(bytes)
}

/// The device a target's fio runs on.
fn target_device(opts: &Options, t: Target) -> PathBuf {
    match t {
        Target::Raw => opts.device.clone(),
        Target::Sluice => ublk_dev(opts.sluice_id),
        Target::Rublk => ublk_dev(opts.rublk_id),
        Target::RublkZc => ublk_dev(opts.rublk_zc_id),
    }
}

fn run_fio(opts: &Options, point: &Point, dev: &Path) -> Result<Sample, UblkBenchError> {
    let bound = opts.runtime + opts.ramp + Duration::from_secs(60);
    let out = run_bounded(
        Command::new(&opts.fio).args(fio_args(point, dev, opts.runtime, opts.ramp)),
        "fio",
        bound,
    )?;
    if !out.status.success() {
        return Err(UblkBenchError::Server(
            FioError::Exit {
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }
            .to_string(),
        ));
    }
    fio::parse(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| UblkBenchError::Server(e.to_string()))
}

/// The servers of one queue count.
struct Servers {
    sluice: Option<SluiceServer>,
    rublk: Vec<RublkServer>,
}

impl Servers {
    fn start(opts: &Options, queues: usize) -> Result<Servers, UblkBenchError> {
        let mut s = Servers {
            sluice: None,
            rublk: Vec::new(),
        };
        let started = (|| {
            if opts.targets.contains(&Target::Sluice) {
                s.sluice = Some(SluiceServer::start(opts, queues)?);
            }
            if opts.targets.contains(&Target::Rublk) {
                s.rublk
                    .push(RublkServer::start(opts, opts.rublk_id, queues, false)?);
            }
            if opts.targets.contains(&Target::RublkZc) {
                s.rublk
                    .push(RublkServer::start(opts, opts.rublk_zc_id, queues, true)?);
            }
            Ok(())
        })();
        match started {
            Ok(()) => Ok(s),
            Err(e) => {
                let _ = s.stop();
                Err(e)
            }
        }
    }

    fn stop(self) -> Result<(), UblkBenchError> {
        let mut first = Ok(());
        for r in self.rublk {
            if let Err(e) = r.stop() {
                first = first.and(Err(e));
            }
        }
        if let Some(s) = self.sluice {
            if let Err(e) = s.stop() {
                first = first.and(Err(e));
            }
        }
        first
    }
}

fn rublk_features(opts: &Options) -> String {
    if !opts
        .targets
        .iter()
        .any(|t| matches!(t, Target::Rublk | Target::RublkZc))
    {
        return String::new();
    }
    run_bounded(
        Command::new(&opts.rublk).arg("features"),
        "rublk features",
        Duration::from_secs(10),
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|w| w != "UBLK")
            .collect::<Vec<_>>()
            .join(" ")
    })
    .unwrap_or_default()
}

/// Runs the whole matrix; progress on stderr.
pub fn run(opts: &Options) -> Result<Results, UblkBenchError> {
    let device_bytes = check(opts)?;
    fs::create_dir_all(&opts.work_dir)
        .map_err(io_err(format!("creating {}", opts.work_dir.display())))?;
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let version = crate::compare::server::version;
    let mut servers = Vec::new();
    if opts.targets.contains(&Target::Sluice) {
        let mut a = SluiceServer::args(opts, 0);
        a[6] = "Q".into();
        servers.push(("sluice".into(), format!("sluice {}", a.join(" "))));
    }
    for (t, id, zc) in [
        (Target::Rublk, opts.rublk_id, false),
        (Target::RublkZc, opts.rublk_zc_id, true),
    ] {
        if opts.targets.contains(&t) {
            let mut a = RublkServer::args(opts, id, 0, zc);
            a[7] = "Q".into();
            servers.push((t.name().into(), format!("rublk {}", a.join(" "))));
        }
    }
    let mut setup = Setup {
        date_utc: date,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default(),
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count(),
        note: opts.note.clone(),
        device: opts.device.display().to_string(),
        device_bytes,
        runtime_s: opts.runtime.as_secs_f64(),
        ramp_s: opts.ramp.as_secs_f64(),
        repeats: opts.repeats,
        queue_depth: opts.queue_depth,
        sluice_version: version(&opts.sluice),
        rublk_version: if opts
            .targets
            .iter()
            .any(|t| matches!(t, Target::Rublk | Target::RublkZc))
        {
            version(&opts.rublk)
        } else {
            String::new()
        },
        fio_version: version(&opts.fio),
        servers,
        ublk_features: rublk_features(opts),
        elapsed_s: 0.0,
    };
    let mut cells: Vec<Cell> = Vec::new();
    for p in &opts.points {
        for &t in &opts.targets {
            cells.push(Cell {
                point: *p,
                target: t,
                samples: Vec::new(),
                errors: Vec::new(),
            });
        }
    }
    let mut queue_counts: Vec<usize> = opts.points.iter().map(|p| p.queues).collect();
    queue_counts.sort_unstable();
    queue_counts.dedup();
    let total = opts.points.len() * opts.targets.len() * opts.repeats;
    let started = Instant::now();
    let mut done = 0;
    for q in queue_counts {
        eprintln!("ublk-bench: starting the servers with {q} queue(s)");
        let servers = Servers::start(opts, q)?;
        for rep in 0..opts.repeats {
            for p in opts.points.iter().filter(|p| p.queues == q) {
                for &t in &opts.targets {
                    let dev = target_device(opts, t);
                    let r = run_fio(opts, p, &dev);
                    done += 1;
                    let cell = cells
                        .iter_mut()
                        .find(|c| c.point == *p && c.target == t)
                        .expect("a cell for every point and target");
                    match r {
                        Ok(s) => {
                            eprintln!(
                                "ublk-bench: [{done}/{total}] {} {} run {}: {:.1}k IOPS, {:.0} µs mean ({:.0} s)",
                                p.id(),
                                t.name(),
                                rep + 1,
                                s.iops / 1e3,
                                s.lat_mean_ns / 1e3,
                                started.elapsed().as_secs_f64()
                            );
                            cell.samples.push(s);
                        }
                        Err(e) => {
                            eprintln!(
                                "ublk-bench: [{done}/{total}] {} {} run {}: FAILED: {e}",
                                p.id(),
                                t.name(),
                                rep + 1
                            );
                            cell.errors.push(e.to_string());
                        }
                    }
                }
            }
        }
        servers.stop()?;
    }
    setup.elapsed_s = started.elapsed().as_secs_f64();
    Ok(Results {
        setup,
        targets: opts.targets.clone(),
        cells,
    })
}

/// Writes `ublk.json`, `ublk.md` and `ublk.svg` into `dir`; returns their paths.
pub fn write_results(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, UblkBenchError> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let json = dir.join("ublk.json");
    let md = dir.join("ublk.md");
    let svg = dir.join("ublk.svg");
    let text = serde_json::to_string_pretty(results).map_err(UblkBenchError::ToJson)?;
    fs::write(&json, text).map_err(io_err(format!("writing {}", json.display())))?;
    fs::write(&md, report::markdown(results, "ublk.svg"))
        .map_err(io_err(format!("writing {}", md.display())))?;
    report::svg(results, &svg)?;
    Ok(vec![json, md, svg])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options of a `bench/fio` job file, its variables filled in, without the runtime
    /// and ramp (which the benchmark shortens) and the filename.
    fn job_options(file: &str, qd: usize, jobs: usize) -> Vec<String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fio").join(file);
        let text = fs::read_to_string(&path).expect("job file");
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(';') && !l.starts_with('['))
            .map(|l| {
                l.replace("${QD}", &qd.to_string())
                    .replace("${JOBS}", &jobs.to_string())
            })
            .filter(|l| {
                !["filename=", "runtime=", "ramp_time="]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| format!("--{l}"))
            .collect()
    }

    #[test]
    fn fio_arguments_are_the_job_files() {
        let dev = Path::new("/dev/ublkb0");
        let rt = Duration::from_secs(3);
        let ramp = Duration::from_secs(1);
        for p in Point::standard() {
            let file = match p.rw {
                Rw::RandRead => "randread-4k.fio",
                Rw::RandWrite => "randwrite-4k.fio",
                Rw::Read => "seqread-128k.fio",
                Rw::Write => "seqwrite-128k.fio",
                other => panic!("no job file for {other:?}"),
            };
            let args = fio_args(&p, dev, rt, ramp);
            for o in job_options(file, p.iodepth, p.queues) {
                // The job file names its job in a section header; we name it with --name.
                assert!(args.contains(&o), "{}: {o} missing from {args:?}", p.id());
            }
            assert!(args.contains(&"--filename=/dev/ublkb0".to_owned()));
            assert!(args.contains(&"--runtime=3000ms".to_owned()));
            assert!(args.contains(&"--ramp_time=1000ms".to_owned()));
            assert!(args.contains(&format!("--name={}", file.trim_end_matches(".fio"))));
        }
    }

    #[test]
    fn targets_parse_and_name() {
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()).unwrap(), t);
        }
        let e = Target::parse("spdk").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown target \"spdk\" (raw, sluice, rublk, rublk-zc)"
        );
    }
}
