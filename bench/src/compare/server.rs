//! The servers the runner compares: sluice and qemu-storage-daemon, each started pinned with
//! `taskset`, exporting one node over a vhost-user-blk socket.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

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
    pub fn start(spec: &Spec) -> Result<Server, String> {
        let socket = spec.work_dir.join(format!("{}.sock", spec.name));
        let log = spec.work_dir.join(format!("{}.log", spec.name));
        let _ = fs::remove_file(&socket);
        let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
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
            .map_err(|e| {
                format!(
                    "starting taskset -c {} {}: {e} (taskset is in util-linux)",
                    spec.cpu,
                    spec.program.display()
                )
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

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{} exited before its socket accepted ({status}): {}",
                    self.name,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: socket {} did not accept within {timeout:?}: {}",
                    self.name,
                    self.socket.display(),
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        format!("log {}: {tail}", self.log.display())
    }

    /// The process's resident memory now and at its peak.
    pub fn memory(&self) -> Result<Memory, String> {
        let pid = self.child.as_ref().expect("running").id();
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| format!("no {key} in {path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(mut self) -> Result<(), String> {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "{} exited with {status} after SIGTERM: {}",
                        self.name,
                        self.log_tail()
                    ))
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not exit within 15 s of SIGTERM (killed): {}",
                        self.name,
                        self.log_tail()
                    ));
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
pub fn device_size(path: &Path) -> Result<u64, String> {
    let mut f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", path.display()))
}

/// Finds `program` (a path, or a name on $PATH).
pub fn find_program(program: &Path) -> Result<PathBuf, String> {
    if program.components().count() > 1 {
        return if program.is_file() {
            Ok(program.to_path_buf())
        } else {
            Err(format!("{} not found", program.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{} not found on PATH", program.display()))
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
