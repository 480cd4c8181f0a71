//! What the runner records about the machine and its settings, and the markdown report.

use std::fmt::Write;
use std::fs;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{server, Options, Placement, Point, Results, Target};

/// The machine a run was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub date_utc: String,
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub sluice_version: String,
    pub qsd_version: String,
    pub fio_version: String,
}

impl Machine {
    pub fn probe(opts: &Options) -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Machine {
            date_utc: date,
            hostname: read("/proc/sys/kernel/hostname").trim().to_owned(),
            cpu_model,
            cpus,
            memory_gib: (mem_kib / f64::from(1 << 20) * 10.0).round() / 10.0,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            sluice_version: server::version(&opts.sluice),
            qsd_version: server::version(&opts.qsd),
            fio_version: server::version(&opts.fio),
        }
    }
}

/// The settings of a run, as recorded in its JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub repeats: usize,
    pub client_cpu: usize,
    pub server_cpu: usize,
    #[serde(alias = "sluice_poll_us_split")]
    pub sluice_poll_us: u32,
    pub sluice_queue_depth: usize,
    pub backing_file: String,
    pub backing_file_bytes: u64,
    /// The backing file is a loop device over a file in /dev/shm.
    #[serde(default)]
    pub ram_loop: bool,
    pub null_bytes: u64,
    /// The vhost-user client busy-polled (libblkio poll queues).
    #[serde(default)]
    pub client_poll: bool,
    pub targets: Vec<(String, String)>,
    pub placements: Vec<String>,
}

impl Settings {
    pub fn new(opts: &Options, file: &Path, file_bytes: u64) -> Settings {
        Settings {
            runtime_s: opts.runtime.as_secs_f64(),
            ramp_s: opts.ramp.as_secs_f64(),
            repeats: opts.repeats,
            client_cpu: opts.client_cpu,
            server_cpu: opts.server_cpu,
            sluice_poll_us: opts.sluice_poll_us,
            sluice_queue_depth: opts.sluice_queue_depth,
            backing_file: file.display().to_string(),
            backing_file_bytes: file_bytes,
            ram_loop: opts.ram_loop,
            client_poll: opts.client_poll,
            null_bytes: opts.null_size_bytes,
            targets: opts
                .targets
                .iter()
                .map(|t| (t.name().to_owned(), t.describe().to_owned()))
                .collect(),
            placements: opts
                .placements
                .iter()
                .map(|p| p.name().to_owned())
                .collect(),
        }
    }
}

fn placement_title(r: &Results, p: Placement) -> String {
    let s = &r.settings;
    match p {
        Placement::Split => format!(
            "split: client on CPU {}, server on CPU {}",
            s.client_cpu, s.server_cpu
        ),
        Placement::Shared => format!("shared: client and server both on CPU {}", s.client_cpu),
    }
}

/// The ratio columns: (title, numerator, denominator).
const RATIOS: [(&str, Target, Target); 3] = [
    ("sluice/fio", Target::SluiceFile, Target::Fio),
    ("sluice/qsd", Target::SluiceFile, Target::QsdFile),
    ("null: sluice/qsd", Target::SluiceNull, Target::QsdNull),
];

/// The report: per placement an IOPS table (median kIOPS ± half the range of the repeats,
/// with the ratios the targets are stated in) and a depth-1 latency table; then memory.
pub fn markdown(r: &Results, plot_file: &str) -> String {
    let m = &r.machine;
    let s = &r.settings;
    let mut out = String::new();
    let _ = writeln!(out, "# sluice against qemu-storage-daemon and the drive\n");
    let _ = writeln!(
        out,
        "Measured {} on {} ({} CPUs, {} GiB), Linux {}. {}; {}; {}.\n",
        m.date_utc,
        m.cpu_model,
        m.cpus,
        m.memory_gib,
        m.kernel,
        m.sluice_version,
        m.qsd_version,
        m.fio_version
    );
    let _ = writeln!(
        out,
        "Each cell: {} runs of {} s after {} s of ramp, interleaved with the other targets; \
         median kIOPS ± half the range. Backing file {} ({} MiB{}); null nodes {} MiB. \
         Servers: sluice --poll-us {} --queue-depth {}; qemu-storage-daemon with one iothread \
         (default adaptive polling); both pinned with taskset.{}\n",
        s.repeats,
        s.runtime_s,
        s.ramp_s,
        s.backing_file,
        s.backing_file_bytes >> 20,
        if s.ram_loop {
            ", a loop device over a file in /dev/shm: memory-speed, but its work runs on the same CPUs"
        } else {
            ""
        },
        s.null_bytes >> 20,
        s.sluice_poll_us,
        s.sluice_queue_depth,
        if s.client_poll {
            " The vhost-user client busy-polls (libblkio poll queues) instead of sleeping."
        } else {
            ""
        }
    );
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| r.cells.iter().any(|c| c.target == *t))
        .collect();
    let ratios: Vec<_> = RATIOS
        .iter()
        .filter(|(_, a, b)| targets.contains(a) && targets.contains(b))
        .collect();
    let mut points: Vec<Point> = Vec::new();
    for c in &r.cells {
        if !points.contains(&c.point) {
            points.push(c.point);
        }
    }
    for placement in Placement::ALL {
        if !r.cells.iter().any(|c| c.placement == placement) {
            continue;
        }
        let _ = writeln!(out, "## {}\n", placement_title(r, placement));
        let mut header = vec!["point".to_owned()];
        header.extend(targets.iter().map(|t| t.name().to_owned()));
        header.extend(ratios.iter().map(|(n, _, _)| (*n).to_owned()));
        table_header(&mut out, &header);
        for p in &points {
            let mut row = vec![p.id()];
            for &t in &targets {
                row.push(match r.cell(placement, p, t) {
                    Some(c) if !c.errors.is_empty() && c.samples.is_empty() => "failed".into(),
                    Some(c) => c
                        .iops()
                        .map(|s| {
                            format!("{:.1}k ±{:.0}%", s.median / 1000.0, s.plus_minus_percent())
                        })
                        .unwrap_or_default(),
                    None => String::new(),
                });
            }
            for (_, a, b) in &ratios {
                let med = |t| {
                    r.cell(placement, p, t)
                        .and_then(|c| c.iops())
                        .map(|s| s.median)
                };
                row.push(match (med(*a), med(*b)) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
                    _ => String::new(),
                });
            }
            table_row(&mut out, &row);
        }
        let qd1: Vec<&Point> = points.iter().filter(|p| p.iodepth == 1).collect();
        if !qd1.is_empty() {
            let _ = writeln!(
                out,
                "\nDepth-1 mean latency, µs (median of the runs' means):\n"
            );
            let mut header = vec!["point".to_owned()];
            header.extend(targets.iter().map(|t| t.name().to_owned()));
            let both = targets.contains(&Target::SluiceFile) && targets.contains(&Target::Fio);
            if both {
                header.push("sluice − fio".into());
            }
            table_header(&mut out, &header);
            for p in qd1 {
                let lat = |t| {
                    r.cell(placement, p, t)
                        .and_then(|c| c.lat_mean_ns())
                        .map(|s| s.median / 1000.0)
                };
                let mut row = vec![p.id()];
                for &t in &targets {
                    row.push(lat(t).map(|v| format!("{v:.1}")).unwrap_or_default());
                }
                if both {
                    row.push(match (lat(Target::SluiceFile), lat(Target::Fio)) {
                        (Some(a), Some(b)) => format!("{:+.1}", a - b),
                        _ => String::new(),
                    });
                }
                table_row(&mut out, &row);
            }
        }
        out.push('\n');
    }
    if !r.rss.is_empty() {
        let _ = writeln!(
            out,
            "## Server memory (one export per process; RSS in MiB)\n"
        );
        table_header(
            &mut out,
            &[
                "server",
                "placement",
                "queues",
                "queue depth",
                "ready",
                "after the runs",
                "peak",
            ]
            .map(String::from),
        );
        for x in &r.rss {
            let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
            table_row(
                &mut out,
                &[
                    x.target.name().to_owned(),
                    x.placement.name().to_owned(),
                    x.queues.to_string(),
                    x.queue_depth.map(|d| d.to_string()).unwrap_or("-".into()),
                    mib(x.rss_ready_kib),
                    mib(x.rss_after_kib),
                    mib(x.rss_peak_kib),
                ],
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "## Targets\n");
    for (name, what) in &s.targets {
        let _ = writeln!(out, "- `{name}`: {what}");
    }
    let failures = r.failures();
    if failures > 0 {
        let _ = writeln!(out, "\n**{failures} run(s) failed**; see compare.json.");
    }
    let _ = writeln!(out, "\n![IOPS per point and target]({plot_file})");
    out
}

fn table_header(out: &mut String, cols: &[String]) {
    table_row(out, cols);
    let _ = writeln!(out, "|{}", "---|".repeat(cols.len()));
}

fn table_row(out: &mut String, cols: &[String]) {
    let _ = writeln!(out, "| {} |", cols.join(" | "));
}
