//! The VM harness (rung 3 of the testing ladder in `shared/design.md`): boots a Debian 6.12
//! kernel (or another pinned one: [`kernels`], [`Vm::kernel`], `SLUICE_VM_KERNEL`) under QEMU (software emulation, `-accel tcg,thread=multi`) where the NVMe, AHCI,
//! virtio-blk and ublk drivers are real, runs one bash job in it and hands back what
//! happened.
//!
//! * `tests/vm/prepare.sh` (root, idempotent) installs QEMU 10 from bookworm-backports, the
//!   guest tools and the kernel pinned in `tests/vm/kernel-version`, and builds the busybox
//!   initramfs around `tests/vm/init` into [`cache_dir`]. [`vm_available`] says why a test
//!   has to skip when that has not happened.
//! * The guest sees the host's root read-only over 9p under an overlay in guest RAM, so
//!   host binaries (bash, fio, mkfs.ext4, `target/debug/sluice`) run unchanged, and the
//!   [`Vm`]'s work directory read-write at the same path as on the host. Nothing else of
//!   the host is writable from the guest.
//! * The job runs as root in the work directory with `SLUICE_VM=1`, `SLUICE_VM_WORK` and
//!   `SLUICE_VM_MODROOT` (for `modprobe -d "$SLUICE_VM_MODROOT" …`) set, after the modules
//!   of the attached devices (and those asked for with [`Vm::module`]) are loaded. Its
//!   `report KEY VALUE` lines land in [`VmRun::results`] (`lap NAME` reports
//!   `NAME.seconds` since the previous lap); its output is on the console. More shell
//!   helpers shared by the jobs (`since`, `hung_task_watch`, `hung_tasks`, `fio_verify`,
//!   `ext4_check`) are in [`JOB_PRELUDE`]. [`VmRun::ensure`] and its kin check what a job
//!   reported and quote the console when it is wrong.
//! * Every boot is bounded by [`Vm::timeout`]: QEMU is killed and the error quotes the
//!   console's tail. QEMU also dies with the thread that started it (`PR_SET_PDEATHSIG`).
//!   Boots are serialised by a lock file: two guests on two cores would only slow each
//!   other past their timeouts.
//!
//! Files in the work directory, rewritten by each boot: `vm-job.sh`, `vm-status`,
//! `vm-results`, `vm-console.log`, `vm-qemu.log` (QEMU's stderr), `vm-trace.log`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `tests/vm/kernel-version`: `<release> <debian version> [<suite> [<package>]]` lines, the
/// one place the guest kernels are pinned; the first is the default.
const KERNEL_VERSION_FILE: &str = include_str!("../vm/kernel-version");
/// The guest init the cache must have been built with (prepare.sh copies it there).
const GUEST_INIT: &str = include_str!("../vm/init");
/// Where prepare.sh puts the cache unless `SLUICE_VM_CACHE` says otherwise.
pub const DEFAULT_CACHE_BASE: &str = "/var/cache/sluice-vm";
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// Default bound on one boot, job included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);
/// How much of the console an error quotes.
const CONSOLE_TAIL_LINES: usize = 40;

/// Shell functions every job can use, defined before it runs (`$vm_results` is the
/// `vm-results` file). Functions that check something report what they saw and return
/// non-zero when it is wrong, so a job under `set -e` stops there.
pub const JOB_PRELUDE: &str = r#"
# report KEY VALUE: one result for VmRun::results, also echoed on the console.
report() { printf '%s=%s\n' "$1" "$2" >>"$vm_results"; echo "report: $1=$2"; }
# since T: the seconds from T (a `date +%s.%N` value) to now, to a tenth.
since() { awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $1 }"; }
# lap NAME: reports NAME.seconds, the time since the previous lap (or the start).
lap_t=$(date +%s.%N)
lap() { local t=$lap_t; lap_t=$(date +%s.%N); report "$1.seconds" "$(since "$t")"; }
# The sluice binary for start: `S=...` in the job (set before the first start).
# start NAME READY_LINES ARGS...: sluice serve ARGS in the background (pid in $pid), waits
# for READY_LINES ready lines on its stdout.
start() {
    local name=$1 want=$2; shift 2
    "$S" serve "$@" >/tmp/$name.out 2>/tmp/$name.err &
    pid=$!
    for _ in $(seq 300); do
        if [ "$(ready $name | wc -l)" -ge "$want" ]; then
            cat /tmp/$name.out
            report "$name.started" yes
            return 0
        fi
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    echo "sluice $name did not get ready"; cat /tmp/$name.out /tmp/$name.err
    report "$name.started" no
    exit 1
}
# stop NAME PID: SIGTERM, waits (30 s at most, then SIGKILL); reports NAME.exit.
stop() {
    kill -TERM $2
    if ! timeout 30 tail --pid=$2 -f /dev/null; then
        echo "sluice $1 still running 30 s after SIGTERM: SIGKILL"
        kill -KILL $2
    fi
    wait $2
    report "$1.exit" $?
    echo "--- sluice $1 stderr ---"; cat /tmp/$1.err
}
# ready NAME: the ready lines of exports (not of the control socket) sluice NAME printed.
ready() { grep '"event":"ready"' /tmp/$1.out | grep '"export":'; }
# hung_task_watch: has the kernel report a task blocked for 3 s (the default is 120 s);
# reports hung_task_timeout (none: the kernel has no hung-task detector).
hung_task_watch() {
    if [ -w /proc/sys/kernel/hung_task_timeout_secs ]; then
        echo 3 >/proc/sys/kernel/hung_task_timeout_secs
        report hung_task_timeout "$(cat /proc/sys/kernel/hung_task_timeout_secs)"
    else
        report hung_task_timeout none
    fi
}
# hung_tasks KEY T: once two hung-task periods (7 s) have passed since T (a `date +%s.%N`
# value), reports KEY: how many hung-task reports dmesg holds.
hung_tasks() {
    sleep "$(awk "BEGIN { r = 7 - ($(date +%s.%N) - $2); print (r > 0 ? r : 0) }")"
    report "$1" "$(dmesg | grep -c 'blocked for more than')"
}
# fio_verify NAME DEV SIZE: random 4 KiB O_DIRECT writes through io_uring at depth 16 on
# the first SIZE of DEV, verified with crc32c; reports NAME.fio (ok or failed:STATUS).
fio_verify() {
    if fio --name=$1 --filename=$2 --ioengine=io_uring --direct=1 --eta=never --rw=randwrite --bs=4k \
        --size=$3 --iodepth=16 --verify=crc32c --output=/tmp/fio-$1.log; then
        report "$1.fio" ok
    else
        report "$1.fio" "failed:$?"; cat /tmp/fio-$1.log
        return 1
    fi
}
# ext4_check DEV: mkfs.ext4 on DEV, 16 files written, sync, umount, `fsck.ext4 -fn`, then
# mounted read-only and the files checked; reports ext4.fsck (clean or failed:STATUS) and
# ext4.files (intact or damaged).
ext4_check() {
    local ok=0
    mkfs.ext4 -q -F $1
    mkdir -p /mnt/t
    mount -t ext4 $1 /mnt/t
    for i in $(seq 1 16); do
        dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=$((i * 4)) status=none
    done
    (cd /mnt/t && sha256sum f*) >/tmp/sums
    sync
    umount /mnt/t
    if fsck.ext4 -fn $1; then report ext4.fsck clean; else report ext4.fsck "failed:$?"; ok=1; fi
    mount -t ext4 -o ro $1 /mnt/t
    if (cd /mnt/t && sha256sum --quiet -c /tmp/sums); then
        report ext4.files intact
    else
        report ext4.files damaged; ok=1
    fi
    umount /mnt/t
    return $ok
}
"#;

/// Every pinned guest kernel release (`uname -r` in the guest), in the order of
/// `tests/vm/kernel-version`: the first is the default, the others (Linux 6.18 LTS) are for
/// the tests that run on every kernel (the ublk ones).
pub fn kernels() -> Vec<&'static str> {
    let k: Vec<&'static str> = KERNEL_VERSION_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        !k.is_empty(),
        "tests/vm/kernel-version has no '<release> <version>' line"
    );
    k
}

/// The first pinned guest kernel release: the default of [`Vm::new`] unless
/// `SLUICE_VM_KERNEL` names another ([`default_kernel`]).
pub fn kernel_release() -> &'static str {
    kernels()[0]
}

/// The kernel a [`Vm`] boots unless [`Vm::kernel`] says otherwise: `SLUICE_VM_KERNEL` (one
/// of [`kernels`], e.g. to run any VM test on 6.18) or else [`kernel_release`].
///
/// # Panics
/// When `SLUICE_VM_KERNEL` names a kernel that is not pinned.
pub fn default_kernel() -> &'static str {
    match std::env::var("SLUICE_VM_KERNEL") {
        Ok(want) if !want.is_empty() => {
            kernels()
                .into_iter()
                .find(|k| *k == want)
                .unwrap_or_else(|| {
                    panic!(
                        "SLUICE_VM_KERNEL={want} is not pinned in tests/vm/kernel-version ({:?})",
                        kernels()
                    )
                })
        }
        _ => kernel_release(),
    }
}

/// The prepared cache of the default kernel: `$SLUICE_VM_CACHE/<release>`, default
/// `/var/cache/sluice-vm/<release>`.
pub fn cache_dir() -> PathBuf {
    cache_dir_for(default_kernel())
}

/// The prepared cache of kernel `release`.
pub fn cache_dir_for(release: &str) -> PathBuf {
    cache_base().join(release)
}

fn cache_base() -> PathBuf {
    std::env::var_os("SLUICE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_BASE))
}

/// `Ok` when VM tests can run here on the default kernel; otherwise why not, for a
/// "skipped: …" line: not root, the cache missing, stale or incomplete (run
/// `tests/vm/prepare.sh`), or QEMU missing.
pub fn vm_available() -> Result<(), String> {
    vm_available_for(default_kernel())
}

/// [`vm_available`] for kernel `release`.
pub fn vm_available_for(release: &str) -> Result<(), String> {
    if std::env::var_os("SLUICE_SKIP_VM").is_some() {
        return Err("SLUICE_SKIP_VM is set (tests/run.sh --no-vm)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("VM tests run as root; this is uid {euid}"));
    }
    let cache = cache_dir_for(release);
    let fix = "run `sudo tests/vm/prepare.sh`";
    let ready = cache.join("READY");
    let stamp = fs::read_to_string(&ready)
        .map_err(|e| format!("no VM cache at {} ({e}): {fix}", ready.display()))?;
    if !stamp.contains(&format!("kernel={release} ")) {
        return Err(format!(
            "the VM cache {} was built for another kernel ({}): {fix}",
            cache.display(),
            stamp.trim()
        ));
    }
    for f in [
        "vmlinuz".to_owned(),
        "initramfs.cpio".to_owned(),
        format!("root/lib/modules/{release}/modules.dep"),
    ] {
        if !cache.join(&f).is_file() {
            return Err(format!("the VM cache {} lacks {f}: {fix}", cache.display()));
        }
    }
    match fs::read_to_string(cache.join("init")) {
        Ok(init) if init == GUEST_INIT => {}
        _ => {
            return Err(format!(
                "tests/vm/init changed since the VM cache {} was built: {fix}",
                cache.display()
            ))
        }
    }
    match Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`{QEMU} --version` failed ({s}): {fix}")),
        Err(e) => Err(format!("{QEMU} not runnable ({e}): {fix}")),
    }
}

// ---------------------------------------------------------------------------------------
// The builder
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Device {
    Nvme { image: PathBuf, serial: String },
    Sata { image: PathBuf },
    VhostUserBlk { socket: PathBuf, num_queues: u16 },
}

/// One guest's configuration; [`Vm::run`] boots it (any number of times).
#[derive(Clone, Debug)]
pub struct Vm {
    work_dir: PathBuf,
    kernel: String,
    memory_mib: u32,
    cpus: u32,
    devices: Vec<Device>,
    modules: Vec<String>,
    trace_events: Vec<String>,
    kernel_args: Vec<String>,
    timeout: Duration,
    reconnect_ms: Option<u32>,
}

impl Vm {
    /// A guest with 1024 MiB, 2 vCPUs, no disks and [`DEFAULT_TIMEOUT`], sharing `work_dir`
    /// (which must exist) read-write at the same path.
    pub fn new(work_dir: impl Into<PathBuf>) -> Vm {
        Vm {
            work_dir: work_dir.into(),
            kernel: default_kernel().to_owned(),
            memory_mib: 1024,
            cpus: 2,
            devices: Vec::new(),
            modules: Vec::new(),
            trace_events: Vec::new(),
            kernel_args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            reconnect_ms: None,
        }
    }

    /// Boots kernel `release`, one of [`kernels`] (default: [`default_kernel`]).
    ///
    /// # Panics
    /// When `release` is not pinned in `tests/vm/kernel-version`.
    pub fn kernel(mut self, release: &str) -> Vm {
        assert!(
            kernels().contains(&release),
            "kernel {release} is not pinned in tests/vm/kernel-version ({:?})",
            kernels()
        );
        self.kernel = release.to_owned();
        self
    }

    /// The kernel release this guest boots.
    pub fn kernel_release(&self) -> &str {
        &self.kernel
    }

    /// Guest memory (also the size of the shared memfd that vhost-user devices map).
    pub fn memory_mib(mut self, mib: u32) -> Vm {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs. virtio-blk uses at most one queue per vCPU.
    pub fn cpus(mut self, cpus: u32) -> Vm {
        self.cpus = cpus;
        self
    }

    /// An emulated NVMe drive on a raw `image` (`nvme0n1`, … in attach order); loads `nvme`.
    /// The guest boots with `nvme_core.multipath=N`, so the namespace is a plain blk-mq disk.
    pub fn nvme(mut self, image: impl Into<PathBuf>, serial: &str) -> Vm {
        self.devices.push(Device::Nvme {
            image: image.into(),
            serial: serial.to_owned(),
        });
        self.module("nvme")
    }

    /// An emulated SATA disk on an AHCI controller of its own (`sda`, …); loads `ahci` and
    /// `sd_mod`.
    pub fn sata(mut self, image: impl Into<PathBuf>) -> Vm {
        self.devices.push(Device::Sata {
            image: image.into(),
        });
        self.module("ahci").module("sd_mod")
    }

    /// A vhost-user-blk device served on `socket` by a backend that is already listening
    /// (`vda`, …); loads `virtio_blk`. Guest memory becomes a shared memfd.
    pub fn vhost_user_blk(mut self, socket: impl Into<PathBuf>, num_queues: u16) -> Vm {
        self.devices.push(Device::VhostUserBlk {
            socket: socket.into(),
            num_queues,
        });
        self.module("virtio_blk")
    }

    /// QEMU reconnects every vhost-user device's socket `ms` milliseconds after its backend
    /// went away (`-chardev socket,…,reconnect-ms=MS`, QEMU 9.2+), and restores the device
    /// on the new backend; without it a backend that goes away is gone for good.
    pub fn vhost_user_reconnect_ms(mut self, ms: u32) -> Vm {
        self.reconnect_ms = Some(ms);
        self
    }

    /// Loads `name` (and what it depends on) from the cache before the job runs.
    pub fn module(mut self, name: &str) -> Vm {
        if !self.modules.iter().any(|m| m == name) {
            self.modules.push(name.to_owned());
        }
        self
    }

    /// Enables QEMU trace events matching `pattern` (e.g. `pci_nvme_flush*`), written to
    /// [`VmRun::trace`].
    pub fn qemu_trace(mut self, pattern: &str) -> Vm {
        self.trace_events.push(pattern.to_owned());
        self
    }

    /// Appends one argument to the kernel command line.
    pub fn kernel_arg(mut self, arg: &str) -> Vm {
        self.kernel_args.push(arg.to_owned());
        self
    }

    /// Bound on the whole boot, job included.
    pub fn timeout(mut self, timeout: Duration) -> Vm {
        self.timeout = timeout;
        self
    }

    /// The QEMU command line for a boot whose work directory is `work` (absolute).
    fn qemu_args(&self, work: &Path) -> Result<Vec<OsString>, VmError> {
        let cache = cache_dir_for(&self.kernel);
        let modroot = cache.join("root");
        let mut append = vec![
            "console=ttyS0".to_owned(),
            "quiet".to_owned(),
            "panic=-1".to_owned(),
            "nvme_core.multipath=N".to_owned(),
            format!("sluice.work={}", kernel_path(work)?),
            format!("sluice.job={}", kernel_path(&work.join("vm-job.sh"))?),
            format!("sluice.status={}", kernel_path(&work.join("vm-status"))?),
            format!("sluice.modroot={}", kernel_path(&modroot)?),
        ];
        if !self.modules.is_empty() {
            append.push(format!("sluice.modules={}", self.modules.join(",")));
        }
        append.extend(self.kernel_args.iter().cloned());

        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-no-reboot".into(),
            "-display".into(),
            "none".into(),
            // /dev/kvm exists on these machines but cannot run a guest (QEMU pauses on an
            // "emulation failure" instead of exiting): always TCG.
            "-accel".into(),
            "tcg,thread=multi".into(),
            // `max` has SSE4.2 (crc32c-intel, which ext4 pulls in) and the rest a modern
            // kernel expects.
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-kernel".into(),
            qemu_value(&cache.join("vmlinuz")),
            "-initrd".into(),
            qemu_value(&cache.join("initramfs.cpio")),
            "-append".into(),
            append.join(" "),
            "-chardev".into(),
            format!(
                "file,id=con,path={}",
                qemu_value(&work.join("vm-console.log"))
            ),
            "-serial".into(),
            "chardev:con".into(),
            "-virtfs".into(),
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
                .into(),
            "-virtfs".into(),
            format!(
                "local,path={},mount_tag=work,security_model=none,multidevs=remap",
                qemu_value(work)
            ),
        ];
        // i440fx ("pc") rather than q35: q35 brings an ICH9 AHCI controller whose six empty
        // ports the guest probes at every boot (≈2 s under emulation).
        let vhost_user = self
            .devices
            .iter()
            .any(|d| matches!(d, Device::VhostUserBlk { .. }));
        if vhost_user {
            // vhost-user backends map guest memory: it must be a shared file descriptor.
            a.extend([
                "-machine".into(),
                "pc,memory-backend=mem".into(),
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ),
            ]);
        } else {
            a.extend(["-machine".into(), "pc".into()]);
        }
        for (i, d) in self.devices.iter().enumerate() {
            match d {
                Device::Nvme { image, serial } => a.extend([
                    "-drive".into(),
                    format!(
                        "file={},if=none,id=nvm{i},format=raw",
                        qemu_value(&absolute(image)?)
                    ),
                    "-device".into(),
                    format!("nvme,serial={},drive=nvm{i}", serial.replace(',', ",,")),
                ]),
                Device::Sata { image } => a.extend([
                    "-drive".into(),
                    format!(
                        "file={},if=none,id=sata{i},format=raw",
                        qemu_value(&absolute(image)?)
                    ),
                    "-device".into(),
                    format!("ahci,id=ahci{i}"),
                    "-device".into(),
                    format!("ide-hd,drive=sata{i},bus=ahci{i}.0"),
                ]),
                Device::VhostUserBlk { socket, num_queues } => a.extend([
                    "-chardev".into(),
                    format!(
                        "socket,id=vu{i},path={}{}",
                        qemu_value(socket),
                        self.reconnect_ms
                            .map_or(String::new(), |ms| format!(",reconnect-ms={ms}"))
                    ),
                    "-device".into(),
                    format!("vhost-user-blk-pci,chardev=vu{i},num-queues={num_queues}"),
                ]),
            }
        }
        // QEMU keeps the `file=` of the last -trace option: give it to every
        // one, so several patterns all land in vm-trace.log.
        let trace_file = qemu_value(&work.join("vm-trace.log"));
        for ev in &self.trace_events {
            a.push("-trace".into());
            a.push(format!(
                "enable={},file={trace_file}",
                ev.replace(',', ",,")
            ));
        }
        Ok(a.into_iter().map(OsString::from).collect())
    }

    /// Boots the guest, runs `job` (bash) in it and waits for the power-off.
    ///
    /// `Ok` whenever the job ran to its end, whatever its exit status ([`VmRun::exit_code`];
    /// [`VmRun::assert_success`] checks it). `Err` when the guest never reported a status:
    /// QEMU failed, the guest died before or during the job, or the boot outlived
    /// [`Vm::timeout`] (QEMU is then killed).
    pub fn run(&self, job: &str) -> Result<VmRun, VmError> {
        vm_available_for(&self.kernel).map_err(VmError::Unavailable)?;
        let work = fs::canonicalize(&self.work_dir).map_err(|e| {
            VmError::Setup(format!("work directory {}: {e}", self.work_dir.display()))
        })?;
        let args = self.qemu_args(&work)?;
        let io = |what: &str, e: std::io::Error| VmError::Setup(format!("{what}: {e}"));
        for name in [
            "vm-status",
            "vm-results",
            "vm-console.log",
            "vm-trace.log",
            "vm-qemu.log",
        ] {
            match fs::remove_file(work.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(name, e)),
            }
        }
        let results = work.join("vm-results");
        let script = format!(
            "# Written by tests/src/vm.rs: the job of one boot.\n\
             vm_results='{}'\n\
             {JOB_PRELUDE}\n\
             {job}\n",
            results.display()
        );
        fs::write(work.join("vm-job.sh"), script).map_err(|e| io("writing vm-job.sh", e))?;
        let qemu_log = File::create(work.join("vm-qemu.log")).map_err(|e| io("vm-qemu.log", e))?;

        let _lock = BootLock::acquire()?;
        let started = Instant::now();
        let mut cmd = Command::new(QEMU);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                qemu_log.try_clone().map_err(|e| io("vm-qemu.log", e))?,
            ))
            .stderr(Stdio::from(qemu_log));
        // SAFETY: `die_with_parent` runs in the child between fork and exec; it only calls
        // prctl(2), which is async-signal-safe, allocates nothing and touches no memory of
        // ours.
        unsafe {
            cmd.pre_exec(die_with_parent);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmError::Setup(format!("spawning {QEMU}: {e}")))?;
        let status = crate::wait_timeout(&mut child, self.timeout);
        let elapsed = started.elapsed();
        let read = |name: &str| {
            fs::read(work.join(name))
                .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
                .unwrap_or_default()
        };
        let Some(qemu_status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmError::Hung {
                after: elapsed,
                console_tail: tail(&read("vm-console.log")),
                qemu_log: read("vm-qemu.log"),
            });
        };
        let console = read("vm-console.log");
        let qemu_log = read("vm-qemu.log");
        let status_text = read("vm-status");
        let Ok(exit_code) = status_text.trim().parse::<i32>() else {
            return Err(VmError::NoStatus {
                qemu_status: qemu_status.to_string(),
                after: elapsed,
                console_tail: tail(&console),
                qemu_log,
            });
        };
        let results = read("vm-results")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(VmRun {
            exit_code,
            console,
            trace: read("vm-trace.log"),
            qemu_log,
            results,
            elapsed,
        })
    }
}

/// In QEMU's process before exec: have the kernel kill it when the thread that started it
/// (the one that waits for it) goes away, so a test that panics or is killed leaves no guest
/// behind.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number by value; no memory is involved.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `path` made absolute (relative to the current directory), without resolving links.
fn absolute(path: &Path) -> Result<PathBuf, VmError> {
    std::path::absolute(path).map_err(|e| VmError::Setup(format!("path {}: {e}", path.display())))
}

/// A path as one QEMU option value: commas doubled.
fn qemu_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// A path as one kernel command-line word: the guest init splits on whitespace.
fn kernel_path(path: &Path) -> Result<String, VmError> {
    let s = path
        .to_str()
        .ok_or_else(|| VmError::Setup(format!("path {} is not UTF-8", path.display())))?;
    if s.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        return Err(VmError::Setup(format!(
            "path {s:?} cannot go on the kernel command line (whitespace or quotes)"
        )));
    }
    Ok(s.to_owned())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    lines[from..].join("\n")
}

/// Serialises boots across threads and processes: `flock` on `<cache base>/boot.lock`.
struct BootLock {
    _file: File,
}

impl BootLock {
    fn acquire() -> Result<BootLock, VmError> {
        let path = cache_base().join("boot.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| VmError::Setup(format!("lock file {}: {e}", path.display())))?;
        loop {
            // SAFETY: flock(2) on a descriptor that `file` owns and keeps open; no memory
            // is involved. The lock goes with the descriptor when `file` is dropped.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(BootLock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(VmError::Setup(format!("flock {}: {e}", path.display())));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Results and errors
// ---------------------------------------------------------------------------------------

/// A boot whose job ran to its end.
#[derive(Debug)]
pub struct VmRun {
    /// The job's exit status.
    pub exit_code: i32,
    /// Everything on the guest's serial console (kernel messages, the job's output).
    pub console: String,
    /// The QEMU trace events asked for with [`Vm::qemu_trace`].
    pub trace: String,
    /// QEMU's own stdout and stderr.
    pub qemu_log: String,
    /// What the job said with `report KEY VALUE`, the last value of each key.
    pub results: BTreeMap<String, String>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
}

impl VmRun {
    /// Panics, quoting the console, unless the job exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.exit_code == 0,
            "the guest job exited with {} after {:.1?}\n--- console ---\n{}\n--- qemu ---\n{}",
            self.exit_code,
            self.elapsed,
            self.console,
            self.qemu_log
        );
    }

    /// The value the job reported for `key`.
    ///
    /// # Panics
    /// When it reported none, quoting the console.
    pub fn result(&self, key: &str) -> &str {
        match self.results.get(key) {
            Some(v) => v,
            None => panic!(
                "the guest job reported no {key:?} (reported: {:?})\n--- console ---\n{}",
                self.results.keys().collect::<Vec<_>>(),
                self.console
            ),
        }
    }

    /// [`VmRun::result`] parsed as a `u64`.
    pub fn result_u64(&self, key: &str) -> u64 {
        let v = self.result(key);
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("the guest reported {key}={v:?}, not a number: {e}"))
    }

    /// Panics with `msg` and the console unless `ok`.
    #[track_caller]
    pub fn ensure(&self, ok: bool, msg: impl fmt::Display) {
        self.ensure_with(ok, msg, "");
    }

    /// [`VmRun::ensure`] that also quotes `evidence` (what the host saw: a daemon's log, …)
    /// after the console.
    #[track_caller]
    pub fn ensure_with(&self, ok: bool, msg: impl fmt::Display, evidence: &str) {
        if !ok {
            let sep = if evidence.is_empty() { "" } else { "\n" };
            panic!("{msg}\n--- console ---\n{}{sep}{evidence}", self.console);
        }
    }

    /// Panics, quoting the console, unless the job reported `want` for `key`.
    #[track_caller]
    pub fn ensure_eq(&self, key: &str, want: &str) {
        self.ensure_eq_with(key, want, "");
    }

    /// [`VmRun::ensure_eq`] that also quotes `evidence` (see [`VmRun::ensure_with`]).
    #[track_caller]
    pub fn ensure_eq_with(&self, key: &str, want: &str, evidence: &str) {
        let got = self.result(key);
        self.ensure_with(
            got == want,
            format!("{key}: the guest reported {got:?}, expected {want:?}"),
            evidence,
        );
    }

    /// Panics, quoting the console, unless the job ran to its end: it exited 0 after it
    /// reported `done=yes` (its last line, so a job that stops early is told apart).
    #[track_caller]
    pub fn ensure_complete(&self) {
        self.ensure(
            self.exit_code == 0 && self.results.get("done").is_some_and(|v| v == "yes"),
            format!(
                "the guest job ended with status {} before its end (reported: {:?})",
                self.exit_code, self.results
            ),
        );
    }

    /// Prints how long the boot took and the job's laps (`lap NAME`), for `test`.
    pub fn print_timings(&self, test: &str) {
        let laps: Vec<String> = self
            .results
            .iter()
            .filter_map(|(k, v)| Some(format!("{} {v} s", k.strip_suffix(".seconds")?)))
            .collect();
        eprintln!(
            "{test}: boot and job took {:.1?} ({})",
            self.elapsed,
            laps.join(", ")
        );
    }
}

/// [`Vm::run`]'s result for a guest whose disk `daemon` serves from the host: the run, or
/// (when the boot failed) a panic with the error and the daemon's stderr, after the
/// daemon is killed.
pub fn expect_boot(run: Result<VmRun, VmError>, daemon: &mut crate::Daemon) -> VmRun {
    match run {
        Ok(run) => run,
        Err(e) => {
            daemon.kill();
            panic!("{e}\n--- sluice stderr ---\n{}", daemon.stderr());
        }
    }
}

/// Why a boot gave no job status.
#[non_exhaustive]
pub enum VmError {
    /// The machine cannot run VM tests ([`vm_available`]).
    Unavailable(String),
    /// Something on the host side: a path, a file, spawning QEMU.
    Setup(String),
    /// The boot outlived its timeout; QEMU was killed.
    Hung {
        after: Duration,
        console_tail: String,
        qemu_log: String,
    },
    /// QEMU exited but the guest never wrote the job's status (QEMU refused its arguments,
    /// the guest init failed, the kernel panicked, the job killed the guest).
    NoStatus {
        qemu_status: String,
        after: Duration,
        console_tail: String,
        qemu_log: String,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Unavailable(why) => write!(f, "VM tests cannot run here: {why}"),
            VmError::Setup(why) => write!(f, "VM set-up: {why}"),
            VmError::Hung {
                after,
                console_tail,
                qemu_log,
            } => write!(
                f,
                "guest hung after {} s (QEMU killed)\n--- console (tail) ---\n{console_tail}\n--- qemu ---\n{qemu_log}",
                after.as_secs()
            ),
            VmError::NoStatus {
                qemu_status,
                after,
                console_tail,
                qemu_log,
            } => write!(
                f,
                "QEMU exited ({qemu_status}) after {:.1} s without a job status\n--- console (tail) ---\n{console_tail}\n--- qemu ---\n{qemu_log}",
                after.as_secs_f64()
            ),
        }
    }
}

// Debug shows the same text, so `.unwrap()` and `.expect()` print a readable console.
impl fmt::Debug for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for VmError {}

/// Prints "skipped: <reason>" to stderr and returns true when VM tests cannot run here.
pub fn skip_unless_available() -> bool {
    match vm_available() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipped: {why}");
            true
        }
    }
}

/// The pinned kernels a test that runs on every kernel boots here: each of [`kernels`]
/// whose cache is ready, after a "skipped: <release>: <reason>" line for each that is not;
/// only `SLUICE_VM_KERNEL` when that is set.
pub fn available_kernels() -> Vec<&'static str> {
    let wanted = match std::env::var("SLUICE_VM_KERNEL") {
        Ok(k) if !k.is_empty() => vec![default_kernel()],
        _ => kernels(),
    };
    wanted
        .into_iter()
        .filter(|k| match vm_available_for(k) {
            Ok(()) => true,
            Err(why) => {
                eprintln!("skipped: {k}: {why}");
                false
            }
        })
        .collect()
}

/// `qd1_latency` next to this test executable: `<target>/debug/deps/vm_ublk-…` →
/// `<target>/debug/examples/qd1_latency` (`cargo test` builds examples).
pub fn qd1_latency_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/qd1_latency"))
        .expect("test executable in <target>/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p sluice-tests --example qd1_latency`",
        bin.display()
    );
    bin
}
