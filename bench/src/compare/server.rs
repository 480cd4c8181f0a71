//! The servers the runner compares: sluice and qemu-storage-daemon, each started pinned with
//! `taskset`, exporting one node over a vhost-user-blk socket.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Why a server could not be started, measured or stopped, or a file or program not found.
/// Messages name the server, and end in the last lines of its log where it has one.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server's log file could not be created.
    #[error("creating {}: {source}", path.display())]
    CreateLog {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log file's handle could not be duplicated for the server's stderr.
    #[error("duplicating {}: {source}", path.display())]
    DuplicateLog {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `taskset` could not be run.
    #[error("starting taskset -c {cpu} {}: {source} (taskset is in util-linux)", program.display())]
    Spawn {
        /// The CPU the server was to be pinned to.
        cpu: usize,
        /// The server program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server exited before its socket accepted a connection.
    #[error("{name} exited before its socket accepted ({status}): {log}")]
    ExitedEarly {
        /// The server's name.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log: LogTail,
    },
    /// The server's socket did not accept a connection in time.
    #[error("{name}: socket {} did not accept within {timeout:?}: {log}", socket.display())]
    NotReady {
        /// The server's name.
        name: String,
        /// The socket.
        socket: PathBuf,
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        log: LogTail,
    },
    /// The server's /proc status could not be read.
    #[error("reading {path}: {source}")]
    ReadStatus {
        /// `/proc/PID/status`.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server's /proc status lacks a memory field.
    #[error("no {key} in {path}")]
    StatusField {
        /// The field, e.g. `VmRSS:`.
        key: &'static str,
        /// `/proc/PID/status`.
        path: String,
    },
    /// The server exited with a failure after SIGTERM.
    #[error("{name} exited with {status} after SIGTERM: {log}")]
    StopFailed {
        /// The server's name.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log: LogTail,
    },
    /// The server did not exit after SIGTERM and was killed.
    #[error("{name} did not exit within 15 s of SIGTERM (killed): {log}")]
    StopTimeout {
        /// The server's name.
        name: String,
        /// The end of its log.
        log: LogTail,
    },
    /// A backing file or device could not be opened.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The file or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The size of a backing file or device could not be found.
    #[error("size of {}: {source}", path.display())]
    Size {
        /// The file or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A program given as a path is not a file.
    #[error("{} not found", .0.display())]
    NotFound(PathBuf),
    /// A program given as a name is not in any $PATH directory.
    #[error("{} not found on PATH", .0.display())]
    NotOnPath(PathBuf),
}

/// The last lines of a server's log, for an error message: `log PATH: line | line`.
#[derive(Clone, Debug)]
pub struct LogTail {
    /// The log file.
    pub path: PathBuf,
    /// Its last 5 lines, joined with ` | ` (empty if it could not be read).
    pub tail: String,
}

impl fmt::Display for LogTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log {}: {}", self.path.display(), self.tail)
    }
}

/// Which server program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ServerKind {
    Sluice,
    /// qemu-storage-daemon.
    Qsd,
}

/// What the export serves.
#[derive(Clone, Debug)]
pub enum BackingSpec {
    File(PathBuf),
    /// A null node of this many bytes.
    Null(u64),
}

/// How to start one server.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: ServerKind,
    /// Names the socket and log files.
    pub name: String,
    pub backing: BackingSpec,
    pub queues: usize,
    /// The CPU the whole process is pinned to.
    pub cpu: usize,
    pub sluice_poll_us: u32,
    pub sluice_queue_depth: usize,
    pub program: PathBuf,
    pub work_dir: PathBuf,
    pub ready_timeout: Duration,
}

impl Spec {
    /// The argument vector after the program name.
    pub fn args(&self, socket: &Path) -> Vec<String> {
        let q = self.queues.to_string();
        match self.kind {
            ServerKind::Sluice => {
                let disk = match &self.backing {
                    BackingSpec::File(f) => f.display().to_string(),
                    BackingSpec::Null(size) => format!("null:{size}"),
                };
                let control = self.work_dir.join(format!("{}.ctl", self.name));
                vec![
                    "serve".into(),
                    "--disk".into(),
                    disk,
                    "--vhost-user".into(),
                    socket.display().to_string(),
                    "--queues".into(),
                    q,
                    "--queue-depth".into(),
                    self.sluice_queue_depth.to_string(),
                    "--poll-us".into(),
                    self.sluice_poll_us.to_string(),
                    "--control".into(),
                    control.display().to_string(),
                ]
            }
            ServerKind::Qsd => {
                // One iothread, as QEMU's docs recommend for exports, with its default
                // adaptive polling (poll-max-ns=0 measured the same on a shared core).
                let iothread = "iothread,id=iot0".to_owned();
                let blockdev = match &self.backing {
                    BackingSpec::File(f) => {
                        let driver = if is_block_device(f) {
                            "host_device"
                        } else {
                            "file"
                        };
                        // locking=off: the runner's other servers have the same file open.
                        format!(
                            "driver={driver},node-name=disk,filename={},cache.direct=on,aio=io_uring,locking=off",
                            f.display()
                        )
                    }
                    BackingSpec::Null(size) => {
                        format!("driver=null-co,node-name=disk,size={size},read-zeroes=on")
                    }
                };
                vec![
                    "--object".into(),
                    iothread,
                    "--blockdev".into(),
                    blockdev,
                    "--export".into(),
                    format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},num-queues={q},writable=on,iothread=iot0",
                        socket.display()
                    ),
                ]
            }
        }
    }
}

/// Resident memory of a process, from /proc/PID/status.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// A running server; killed if dropped without [`Server::stop`].
pub struct Server {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    name: String,
}

impl Server {
    /// Starts the server pinned to `spec.cpu` and waits until its socket accepts.
    pub fn start(spec: &Spec) -> Result<Server, ServerError> {
        let socket = spec.work_dir.join(format!("{}.sock", spec.name));
        let log = spec.work_dir.join(format!("{}.log", spec.name));
        let _ = fs::remove_file(&socket);
        let out = File::create(&log).map_err(|source| ServerError::CreateLog {
            path: log.clone(),
            source,
        })?;
        let err = out
            .try_clone()
            .map_err(|source| ServerError::DuplicateLog {
                path: log.clone(),
                source,
            })?;
        let args = spec.args(&socket);
        let child = Command::new("taskset")
            .arg("-c")
            .arg(spec.cpu.to_string())
            .arg(&spec.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ServerError::Spawn {
                cpu: spec.cpu,
                program: spec.program.clone(),
                source,
            })?;
        let mut server = Server {
            child: Some(child),
            socket,
            log,
            name: spec.name.clone(),
        };
        server.wait_ready(spec.ready_timeout)?;
        Ok(server)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ServerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServerError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    log: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(ServerError::NotReady {
                    name: self.name.clone(),
                    socket: self.socket.clone(),
                    timeout,
                    log: self.log_tail(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> LogTail {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        LogTail {
            path: self.log.clone(),
            tail: lines[lines.len().saturating_sub(5)..].join(" | "),
        }
    }

    /// The process's resident memory now and at its peak.
    pub fn memory(&self) -> Result<Memory, ServerError> {
        let pid = self.child.as_ref().expect("running").id();
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).map_err(|source| ServerError::ReadStatus {
            path: path.clone(),
            source,
        })?;
        let field = |key: &'static str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| ServerError::StatusField {
                    key,
                    path: path.clone(),
                })
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(mut self) -> Result<(), ServerError> {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(ServerError::StopFailed {
                        name: self.name.clone(),
                        status,
                        log: self.log_tail(),
                    })
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ServerError::StopTimeout {
                        name: self.name.clone(),
                        log: self.log_tail(),
                    });
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, sig: i32) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child,
    // so it cannot have been recycled for another process.
    unsafe { libc::kill(pid, sig) };
}

fn is_block_device(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Size in bytes of a file or block device.
pub fn device_size(path: &Path) -> Result<u64, ServerError> {
    let mut f = File::open(path).map_err(|source| ServerError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    f.seek(SeekFrom::End(0))
        .map_err(|source| ServerError::Size {
            path: path.to_path_buf(),
            source,
        })
}

/// Finds `program` (a path, or a name on $PATH).
pub fn find_program(program: &Path) -> Result<PathBuf, ServerError> {
    if program.components().count() > 1 {
        return if program.is_file() {
            Ok(program.to_path_buf())
        } else {
            Err(ServerError::NotFound(program.to_path_buf()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| ServerError::NotOnPath(program.to_path_buf()))
}

/// The first line of `program --version`.
pub fn version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ServerKind, backing: BackingSpec) -> Spec {
        Spec {
            kind,
            name: "t".into(),
            backing,
            queues: 2,
            cpu: 1,
            sluice_poll_us: 50,
            sluice_queue_depth: 128,
            program: "x".into(),
            work_dir: "/w".into(),
            ready_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn sluice_arguments() {
        let a = spec(ServerKind::Sluice, BackingSpec::Null(1 << 30)).args(Path::new("/w/s"));
        let a = a.join(" ");
        assert_eq!(
            a,
            "serve --disk null:1073741824 --vhost-user /w/s --queues 2 --queue-depth 128 \
             --poll-us 50 --control /w/t.ctl"
        );
        let a = spec(ServerKind::Sluice, BackingSpec::File("/f".into())).args(Path::new("/s"));
        assert!(a.join(" ").contains("--disk /f"));
    }

    #[test]
    fn missing_programs_and_files_are_typed_errors() {
        let e = find_program(Path::new("/nonexistent/prog")).unwrap_err();
        assert!(
            matches!(&e, ServerError::NotFound(p) if p == Path::new("/nonexistent/prog")),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "/nonexistent/prog not found");
        let e = find_program(Path::new("sluice-no-such-program")).unwrap_err();
        assert!(matches!(e, ServerError::NotOnPath(_)), "{e:?}");
        assert_eq!(e.to_string(), "sluice-no-such-program not found on PATH");
        assert!(find_program(Path::new("sh")).is_ok());

        let e = device_size(Path::new("/nonexistent/disk.img")).unwrap_err();
        assert!(
            matches!(&e, ServerError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("opening /nonexistent/disk.img: "),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn log_tail_names_the_log() {
        let log = LogTail {
            path: "/w/t.log".into(),
            tail: "a | b".into(),
        };
        let e = ServerError::StopTimeout {
            name: "t".into(),
            log,
        };
        assert_eq!(
            e.to_string(),
            "t did not exit within 15 s of SIGTERM (killed): log /w/t.log: a | b"
        );
    }

    #[test]
    fn qsd_arguments() {
        let a = spec(ServerKind::Qsd, BackingSpec::File("/f".into())).args(Path::new("/s"));
        assert_eq!(a[1], "iothread,id=iot0");
        assert!(
            a[3].starts_with("driver=file,node-name=disk,filename=/f,cache.direct=on,aio=io_uring")
        );
        assert!(a[5].contains("num-queues=2") && a[5].contains("iothread=iot0"));
        let a = spec(ServerKind::Qsd, BackingSpec::Null(4096)).args(Path::new("/s"));
        assert_eq!(
            a[3],
            "driver=null-co,node-name=disk,size=4096,read-zeroes=on"
        );
    }
}
