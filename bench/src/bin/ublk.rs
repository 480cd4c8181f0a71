//! `sluice-ublk-bench`: fio on a drive, on sluice's ublk export of it and on rublk's, side by
//! side. See `sluice_bench::ublk`.
//!
//! * `--device /dev/nvme0n1`: runs the matrix on this machine (root, `ublk_drv` loaded);
//! * `--vm`: boots the VM harness's guest (tests/vm/prepare.sh) with an emulated NVMe drive
//!   and runs this same program in it with `--device /dev/nvme0n1`, then copies the results
//!   out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice_bench::compare::{prepare_backing_file, Point};
use sluice_bench::parse::{parse_duration, parse_size};
use sluice_bench::ublk::{self, Options, Target};

/// Runs every point (4 KiB random read/write at depth 1/32/128 on 1 and 2 queues; 128 KiB
/// sequential read/write at depth 8) on the raw drive, on sluice's ublk export of it and on
/// rublk's loop target over it, repeated and interleaved, and writes ublk.json, ublk.md and
/// ublk.svg. The write points destroy the drive's data.
#[derive(Debug, Parser)]
#[command(name = "sluice-ublk-bench", version)]
struct Args {
    /// The drive (a block device) to measure on this machine. Its data is overwritten.
    #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
    device: Option<PathBuf>,
    /// Boot the VM harness's guest with an emulated NVMe drive and run there (root; run
    /// `sudo tests/vm/prepare.sh` first).
    #[arg(long)]
    vm: bool,
    /// The guest kernel for --vm: a release pinned in tests/vm/kernel-version (default: the
    /// first, or SLUICE_VM_KERNEL).
    #[arg(long, requires = "vm")]
    kernel: Option<String>,
    /// Size of the emulated drive's image for --vm (written in full once, then reused).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    image_size: u64,
    /// Work directory: server logs; with --vm also the image and the guest's files.
    #[arg(long, default_value = "/var/tmp/sluice-ublk-bench")]
    work: PathBuf,
    /// Where ublk.json, ublk.md and ublk.svg go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Measured time per run.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    runtime: Duration,
    /// Unmeasured warm-up per run (the job files have 2 s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ramp: Duration,
    /// Runs per cell (median and range reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Targets, comma-separated: raw, sluice, rublk, rublk-zc (default: raw,sluice,rublk).
    #[arg(long, value_delimiter = ',', value_parser = Target::parse)]
    targets: Option<Vec<Target>>,
    /// Points, comma-separated ids such as randread-4k-qd32-q2 (default: all 14).
    #[arg(long, value_delimiter = ',')]
    points: Option<Vec<String>>,
    /// Queue depth of both servers' ublk devices.
    #[arg(long, default_value_t = 128)]
    queue_depth: usize,
    /// The sluice binary (default: `sluice` next to this program).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// The rublk binary (`cargo install --root DIR rublk` puts it in DIR/bin).
    #[arg(long, default_value = "rublk")]
    rublk: PathBuf,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// ublk device ids of sluice, rublk and rublk-zc.
    #[arg(long, default_value_t = 0)]
    sluice_id: u32,
    #[arg(long, default_value_t = 1)]
    rublk_id: u32,
    #[arg(long, default_value_t = 2)]
    rublk_zc_id: u32,
    /// A sentence for the report about where this ran.
    #[arg(long, default_value = "")]
    note: String,
}

fn points(args: &Args) -> Result<Vec<Point>, String> {
    let all = Point::standard();
    match &args.points {
        None => Ok(all),
        Some(ids) => ids
            .iter()
            .map(|id| {
                all.iter().find(|p| &p.id() == id).copied().ok_or_else(|| {
                    let names: Vec<String> = all.iter().map(Point::id).collect();
                    format!("unknown point {id:?} ({})", names.join(", "))
                })
            })
            .collect(),
    }
}

fn default_sluice() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("sluice")))
        .unwrap_or_else(|| PathBuf::from("sluice"))
}

/// An absolute path for the guest (which sees the host's root at the same paths), found on
/// PATH when `p` is a bare name.
fn host_path(p: &Path) -> Result<PathBuf, String> {
    sluice_bench::compare::server::find_program(p)
        .map_err(|e| e.to_string())
        .and_then(|f| std::fs::canonicalize(&f).map_err(|e| format!("{}: {e}", f.display())))
}

fn run_vm(args: &Args, targets: &[Target]) -> Result<(), String> {
    use sluice_tests::vm::{default_kernel, Vm};
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(|| default_kernel().into());
    std::fs::create_dir_all(&args.work)
        .map_err(|e| format!("creating {}: {e}", args.work.display()))?;
    let work = std::fs::canonicalize(&args.work).map_err(|e| e.to_string())?;
    let image = work.join("nvme.img");
    eprintln!(
        "ublk-bench: the drive's image {} ({} MiB)",
        image.display(),
        args.image_size >> 20
    );
    prepare_backing_file(&image, args.image_size, false).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let sluice = host_path(args.sluice.as_deref().unwrap_or(&default_sluice())).map_err(|e| {
        format!("{e} (build it: cargo build --release -p sluice, or pass --sluice)")
    })?;
    let fio = host_path(&args.fio)?;
    let rublk = if targets
        .iter()
        .any(|t| matches!(t, Target::Rublk | Target::RublkZc))
    {
        host_path(&args.rublk).map_err(|e| {
            format!(
                "{e}: cargo install --root DIR rublk and pass --rublk DIR/bin/rublk, or leave \
                 rublk out (--targets raw,sluice)"
            )
        })?
    } else {
        args.rublk.clone()
    };
    let qemu = sluice_bench::compare::server::version(Path::new(sluice_tests::vm::QEMU));
    let host_cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_default();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let note = format!(
        "A QEMU guest under software emulation (TCG, 2 vCPUs; {qemu}) on {host_cpu}, host \
         Linux {}; the drive is QEMU's emulated NVMe on a raw image file. Emulation numbers: \
         read the ratios, not the IOPS. {}",
        host_kernel.trim(),
        args.note
    );
    let q = |p: &Path| format!("'{}'", p.display());
    let mut cmd = vec![
        q(&exe),
        "--device /dev/nvme0n1".into(),
        format!("--out {}", q(&work.join("out"))),
        "--work /tmp/ublk-bench".into(),
        format!("--runtime {}ms", args.runtime.as_millis()),
        format!("--ramp {}ms", args.ramp.as_millis()),
        format!("--repeats {}", args.repeats),
        format!(
            "--targets {}",
            targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(",")
        ),
        format!("--queue-depth {}", args.queue_depth),
        format!("--sluice {}", q(&sluice)),
        format!("--rublk {}", q(&rublk)),
        format!("--fio {}", q(&fio)),
        format!("--note '{}'", note.replace('\'', "'\\''")),
    ];
    if let Some(p) = &args.points {
        cmd.push(format!("--points {}", p.join(",")));
    }
    let job = format!("{}\nreport bench.exit $?\nreport done yes\n", cmd.join(" "));
    let n_points = points(args)?.len() as u64;
    let per_run = args.runtime + args.ramp + Duration::from_secs(3);
    let bound = Duration::from_secs(300)
        + per_run * (n_points * targets.len() as u64 * args.repeats as u64) as u32;
    eprintln!(
        "ublk-bench: booting the guest (Linux {kernel}), bound {} s; console: {}",
        bound.as_secs(),
        work.join("vm-console.log").display()
    );
    let run = Vm::new(&work)
        .kernel(&kernel)
        .memory_mib(2048)
        .nvme(&image, "ublk-bench")
        .module("ublk_drv")
        .timeout(bound)
        .run(&job)
        .map_err(|e| e.to_string())?;
    let tail: Vec<&str> = run.console.lines().collect();
    let from = tail.len().saturating_sub(60);
    if run.results.get("bench.exit").map(String::as_str) != Some("0") {
        return Err(format!(
            "the benchmark in the guest failed (exit {:?}); console tail:\n{}",
            run.results.get("bench.exit"),
            tail[from..].join("\n")
        ));
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    for f in ["ublk.json", "ublk.md", "ublk.svg"] {
        let from = work.join("out").join(f);
        let to = args.out.join(f);
        std::fs::copy(&from, &to)
            .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
        println!("{}", to.display());
    }
    eprintln!(
        "ublk-bench: the guest ran {:.0} s",
        run.elapsed.as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let targets = args
        .targets
        .clone()
        .unwrap_or_else(|| Target::DEFAULT.to_vec());
    if args.repeats == 0 {
        eprintln!("sluice-ublk-bench: --repeats must be at least 1");
        return ExitCode::FAILURE;
    }
    if args.vm {
        return match run_vm(&args, &targets) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-ublk-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let points = match points(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sluice-ublk-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        device: args
            .device
            .clone()
            .expect("clap requires --device without --vm"),
        out_dir: args.out.clone(),
        work_dir: args.work.clone(),
        runtime: args.runtime,
        ramp: args.ramp,
        repeats: args.repeats,
        targets,
        points,
        queue_depth: args.queue_depth,
        sluice: args.sluice.clone().unwrap_or_else(default_sluice),
        rublk: args.rublk.clone(),
        fio: args.fio.clone(),
        sluice_id: args.sluice_id,
        rublk_id: args.rublk_id,
        rublk_zc_id: args.rublk_zc_id,
        note: args.note.clone(),
    };
    let results = match ublk::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-ublk-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match ublk::write_results(&results, &opts.out_dir) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
        }
        Err(e) => {
            eprintln!("sluice-ublk-bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    if results.failures() > 0 {
        eprintln!(
            "sluice-ublk-bench: {} runs failed (see ublk.md)",
            results.failures()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
