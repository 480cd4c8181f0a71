//! The benchmark job files in `bench/fio/` run against a real `/dev/ublkb0` in a QEMU guest:
//! sluice serves an emulated NVMe drive (`--disk /dev/nvme0n1 --ublk 0 --queues 2`) and the
//! guest runs each job file with fio, exactly as a benchmark would (`DEV`, `QD`, `JOBS`,
//! `RUNTIME` in the environment, `--output-format=json`), for [`RUNTIME_SECS`] s after the
//! files' own ramp. One boot.
//!
//! Per run ([`RUNS`]: the random jobs at queue depth 1 with one job and 16 with two, the
//! sequential ones once) it checks that fio exited 0 and its JSON (written to the shared work
//! directory) says: no error, the queue depth and job count the environment asked for (the
//! `${VAR}` substitution worked), I/O in the job's direction only, IOPS > 0; and that
//! `/sys/block/ublkb0/stat` counted that I/O, so it went through ublk. Then SIGTERM: sluice
//! exits 0. The numbers are printed; they are software-emulation numbers, a smoke run:
//! no speed is asserted.
//!
//! Skips with "skipped: …" when the machine is not prepared (tests/vm/prepare.sh). Needs
//! `cargo build -p sluice` first (or `SLUICE_BIN`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_tests::vm::{skip_unless_available, Vm, VmRun};
use sluice_tests::{make_file, sluice_bin, MIB};

const NVME_BYTES: u64 = 256 * MIB;
/// `RUNTIME` for every run (the job files add a 2 s ramp).
const RUNTIME_SECS: u32 = 1;

/// One fio run: the job file (without `.fio`), `QD`, `JOBS`.
struct FioRun {
    file: &'static str,
    qd: u32,
    jobs: u32,
}

impl FioRun {
    /// The key of its reports and the name of its JSON file.
    fn name(&self) -> String {
        format!("{}-qd{}-j{}", self.file, self.qd, self.jobs)
    }

    fn writes(&self) -> bool {
        self.file.contains("write")
    }

    /// The queue depth and job count the job must end up with: the sequential files fix
    /// theirs (8, 1) and ignore `QD` and `JOBS`.
    fn expected_depth_and_jobs(&self) -> (u32, u32) {
        if self.file.starts_with("seq") {
            (8, 1)
        } else {
            (self.qd, self.jobs)
        }
    }
}

const fn fio_run(file: &'static str, qd: u32, jobs: u32) -> FioRun {
    FioRun { file, qd, jobs }
}

const RUNS: [FioRun; 6] = [
    fio_run("randread-4k", 1, 1),
    fio_run("randread-4k", 16, 2),
    fio_run("randwrite-4k", 1, 1),
    fio_run("randwrite-4k", 16, 2),
    fio_run("seqread-128k", 8, 1),
    fio_run("seqwrite-128k", 8, 1),
];

const JOB: &str = r#"
set -uo pipefail
S=@SLUICE@
FIO_DIR=@FIO_DIR@
W=$SLUICE_VM_WORK
# ios: reads and writes completed on ublkb0 so far.
ios() { awk '{ print $1, $5 }' /sys/block/ublkb0/stat; }
# fio_run NAME FILE QD JOBS: one job file on ublkb0, JSON into the work directory.
fio_run() {
    local before after
    before=$(ios)
    DEV=/dev/ublkb0 QD=$3 JOBS=$4 RUNTIME=@RUNTIME@ timeout -k 5 60 \
        fio "$FIO_DIR/$2.fio" --output-format=json --eta=never --output="$W/$1.json" 2>/tmp/$1.err
    report "$1.exit" $?
    after=$(ios)
    report "$1.ublk_reads" $(( ${after% *} - ${before% *} ))
    report "$1.ublk_writes" $(( ${after#* } - ${before#* } ))
    if [ -s /tmp/$1.err ]; then echo "--- fio $1 stderr ---"; cat /tmp/$1.err; fi
    lap "$1"
}

start sluice 1 --disk /dev/nvme0n1 --ublk 0 --queues 2
report ready "$(ready sluice)"
lap start

@RUNS@

stop sluice $pid
lap stop
report done yes
"#;

/// `bench/fio/` of this checkout: the guest sees it at the same path over the shared root.
fn fio_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/fio");
    std::fs::canonicalize(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn job(fio_dir: &Path) -> String {
    let runs: Vec<String> = RUNS
        .iter()
        .map(|r| format!("fio_run {} {} {} {}", r.name(), r.file, r.qd, r.jobs))
        .collect();
    JOB.replace("@SLUICE@", sluice_bin().to_str().expect("utf-8 path"))
        .replace("@FIO_DIR@", fio_dir.to_str().expect("utf-8 path"))
        .replace("@RUNTIME@", &RUNTIME_SECS.to_string())
        .replace("@RUNS@", &runs.join("\n"))
}

/// What fio's JSON says about one direction (`read` or `write`) of the only job (the files
/// use `group_reporting`).
struct Direction {
    iops: f64,
    io_bytes: u64,
    bw_kib: u64,
    clat_mean_us: f64,
}

fn direction(job: &serde_json::Value, dir: &str) -> Direction {
    let d = &job[dir];
    Direction {
        iops: d["iops"].as_f64().unwrap_or(0.0),
        io_bytes: d["io_bytes"].as_u64().unwrap_or(0),
        bw_kib: d["bw"].as_u64().unwrap_or(0),
        clat_mean_us: d["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
    }
}

/// fio's JSON output file, parsed (anything fio printed before the object is skipped).
fn fio_json(run: &VmRun, path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.find('{');
    run.ensure(
        start.is_some(),
        format!("{}: no JSON from fio:\n{text}", path.display()),
    );
    serde_json::from_str(&text[start.unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}):\n{text}", path.display()))
}

#[test]
fn bench_fio_jobs_on_ublk() {
    if skip_unless_available() {
        return;
    }
    let fio_dir = fio_dir();
    for r in &RUNS {
        let f = fio_dir.join(format!("{}.fio", r.file));
        assert!(f.is_file(), "{} missing", f.display());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nvme = dir.path().join("nvme.img");
    make_file(&nvme, NVME_BYTES);

    let run = Vm::new(dir.path())
        .nvme(&nvme, "sluice-nvme0")
        .module("ublk_drv")
        .timeout(Duration::from_secs(120))
        .run(&job(&fio_dir))
        .expect("boot");
    run.print_timings("vm_ublk_fio");
    run.ensure_complete();
    eprintln!("ready: {}", run.result("ready"));

    eprintln!(
        "{:28} {:>10} {:>10} {:>12} {:>12} {:>12}  (TCG: smoke numbers, not performance)",
        "run", "IOPS", "MiB/s", "clat mean µs", "ublk reads", "ublk writes"
    );
    for r in &RUNS {
        let name = r.name();
        let exit = run.result(&format!("{name}.exit"));
        run.ensure(
            exit == "0",
            format!("fio {name} exited with {exit} (see its stderr on the console)"),
        );
        let json = fio_json(&run, &dir.path().join(format!("{name}.json")));
        let jobs = json["jobs"].as_array().cloned().unwrap_or_default();
        run.ensure(
            jobs.len() == 1,
            format!(
                "{name}: {} job entries in fio's JSON, expected 1 (group_reporting)",
                jobs.len()
            ),
        );
        let job = &jobs[0];
        run.ensure(
            job["error"] == 0,
            format!("{name}: fio reports error {}", job["error"]),
        );
        // The environment reached the job: fio echoes the options after substitution.
        let opts = &job["job options"];
        let opt = |k: &str| opts[k].as_str().and_then(|v| v.parse::<u32>().ok());
        let (depth, numjobs) = r.expected_depth_and_jobs();
        run.ensure(
            opt("iodepth") == Some(depth) && opt("numjobs") == Some(numjobs),
            format!("{name}: job options {opts}, expected iodepth {depth} numjobs {numjobs}"),
        );
        let filename = json["global options"]["filename"].as_str().unwrap_or("");
        run.ensure(
            filename == "/dev/ublkb0",
            format!("{name}: fio ran on {filename:?}, not /dev/ublkb0"),
        );
        let (did, idle) = if r.writes() {
            ("write", "read")
        } else {
            ("read", "write")
        };
        let d = direction(job, did);
        let other = direction(job, idle);
        run.ensure(
            d.iops > 0.0 && d.io_bytes > 0,
            format!("{name}: no {did}s ({} IOPS, {} bytes)", d.iops, d.io_bytes),
        );
        run.ensure(
            other.io_bytes == 0,
            format!("{name}: {} bytes of {idle}s in a {did} job", other.io_bytes),
        );
        let ublk_reads = run.result_u64(&format!("{name}.ublk_reads"));
        let ublk_writes = run.result_u64(&format!("{name}.ublk_writes"));
        let ublk_done = if r.writes() { ublk_writes } else { ublk_reads };
        run.ensure(
            ublk_done > 0,
            format!("{name}: /sys/block/ublkb0/stat counted no {did}s during the run"),
        );
        eprintln!(
            "{name:28} {:>10.0} {:>10.1} {:>12.0} {ublk_reads:>12} {ublk_writes:>12}",
            d.iops,
            d.bw_kib as f64 / 1024.0,
            d.clat_mean_us
        );
    }
    let exit = run.result("sluice.exit");
    run.ensure(
        exit == "0",
        format!("sluice exited with {exit} after SIGTERM"),
    );
}
