//! The markdown report and the SVG plot of a ublk benchmark run.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;

use super::{Results, Target, UblkBenchError};
use crate::compare::plot::{grouped_bars, kiops_range, BarSeries};
use crate::compare::{Point, Spread};

/// The goal at depth 32 and 128: sluice at least this share of the raw drive.
pub const RAW_GOAL: f64 = 0.9;

fn kiops(s: &Spread) -> String {
    format!("{:.1}k ±{:.0}%", s.median / 1e3, s.plus_minus_percent())
}

/// Two ranges overlap: the difference of their medians is within the runs' noise.
fn overlap(a: &Spread, b: &Spread) -> bool {
    a.min <= b.max && b.min <= a.max
}

/// What point `p` misses of the goals (empty: nothing), for the table's last column.
pub fn misses(r: &Results, p: &Point) -> Vec<String> {
    let get = |t| r.cell(p, t).and_then(|c| c.iops());
    let mut m = Vec::new();
    let sluice = get(Target::Sluice);
    if let (Some(s), Some(k)) = (sluice, get(Target::Rublk)) {
        if s.median < k.median {
            if overlap(&s, &k) {
                m.push("< rublk (within noise)".to_owned());
            } else {
                m.push("< rublk".to_owned());
            }
        }
    }
    if let (Some(s), Some(raw)) = (sluice, get(Target::Raw)) {
        if p.iodepth >= 32 && p.bs == 4096 && s.median < RAW_GOAL * raw.median {
            m.push(format!("< {RAW_GOAL} × raw"));
        }
    }
    m
}

/// The report: setup, the kIOPS table with ratios and misses, the depth-1 latencies, and the
/// plot.
pub fn markdown(r: &Results, svg_name: &str) -> String {
    let s = &r.setup;
    let mut o = String::new();
    let _ = writeln!(o, "# ublk: sluice against rublk and the raw drive\n");
    let _ = writeln!(
        o,
        "Measured {} on {} ({} CPUs), Linux {}. {}\n",
        s.date_utc, s.cpu_model, s.cpus, s.kernel, s.note
    );
    let _ = writeln!(
        o,
        "Drive {} ({} MiB). Each cell: {} runs of {} s after {} s of ramp, interleaved with \
         the other targets; median kIOPS ± half the range. The whole matrix took {:.0} s. \
         {}; {}; {}.\n",
        s.device,
        s.device_bytes >> 20,
        s.repeats,
        s.runtime_s,
        s.ramp_s,
        s.elapsed_s,
        s.sluice_version,
        if s.rublk_version.is_empty() {
            "rublk not run"
        } else {
            &s.rublk_version
        },
        s.fio_version
    );
    let _ = writeln!(
        o,
        "Servers (Q = the point's queue count, depth {}):\n",
        s.queue_depth
    );
    for (name, cmd) in &s.servers {
        let _ = writeln!(o, "- {name}: `{cmd}`");
    }
    let _ = writeln!(
        o,
        "- raw: fio on the drive itself.\n\nfio: the options of `bench/fio/*.fio` \
         (io_uring, direct=1), numjobs = queues.\n"
    );
    if !s.ublk_features.is_empty() {
        let _ = writeln!(o, "ublk driver features: {}\n", s.ublk_features);
    }
    let points = r.points();
    let has = |t| r.targets.contains(&t);
    let mut head = String::from("| point |");
    let mut rule = String::from("|---|");
    for t in &r.targets {
        let _ = write!(head, " {} |", t.name());
        rule.push_str("---|");
    }
    let ratios: Vec<(Target, Target)> = [
        (Target::Sluice, Target::Raw),
        (Target::Rublk, Target::Raw),
        (Target::Sluice, Target::Rublk),
        (Target::RublkZc, Target::Rublk),
    ]
    .into_iter()
    .filter(|(a, b)| has(*a) && has(*b))
    .collect();
    for (a, b) in &ratios {
        let _ = write!(head, " {}/{} |", a.name(), b.name());
        rule.push_str("---|");
    }
    head.push_str(" misses |");
    rule.push_str("---|");
    let _ = writeln!(o, "{head}\n{rule}");
    for p in &points {
        let mut row = format!("| {} |", p.id());
        for &t in &r.targets {
            let c = r.cell(p, t);
            match c.and_then(|c| c.iops()) {
                Some(sp) => {
                    let _ = write!(row, " {} |", kiops(&sp));
                }
                None => {
                    let e = c.map_or(0, |c| c.errors.len());
                    let _ = write!(row, " failed ({e}) |");
                }
            }
        }
        for (a, b) in &ratios {
            let m = |t| r.cell(p, t).and_then(|c| c.iops()).map(|s| s.median);
            match (m(*a), m(*b)) {
                (Some(x), Some(y)) if y > 0.0 => {
                    let _ = write!(row, " {:.2}× |", x / y);
                }
                _ => row.push_str(" – |"),
            }
        }
        let _ = writeln!(row, " {} |", misses(r, p).join(", "));
        o.push_str(&row);
    }
    let _ = writeln!(
        o,
        "\nGoals (issue 14): sluice ≥ rublk at every point (\"within noise\": the runs' ranges \
         overlap); sluice ≥ {RAW_GOAL} × raw at depth 32 and 128.\n"
    );
    let _ = writeln!(o, "Depth-1 mean latency, µs (median of the runs' means):\n");
    let mut head = String::from("| point |");
    let mut rule = String::from("|---|");
    for t in &r.targets {
        let _ = write!(head, " {} |", t.name());
        rule.push_str("---|");
    }
    let _ = writeln!(o, "{head}\n{rule}");
    for p in points.iter().filter(|p| p.iodepth == 1) {
        let mut row = format!("| {} |", p.id());
        for &t in &r.targets {
            match r.cell(p, t).and_then(|c| c.lat_mean_ns()) {
                Some(sp) => {
                    let _ = write!(row, " {:.0} |", sp.median / 1e3);
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{row}");
    }
    let failures = r.failures();
    if failures > 0 {
        let _ = writeln!(o, "\n{failures} runs failed:\n");
        for c in &r.cells {
            for e in &c.errors {
                let _ = writeln!(o, "- {} {}: {}", c.point.id(), c.target.name(), e);
            }
        }
    }
    let _ = writeln!(o, "\n![median kIOPS per point and target]({svg_name})");
    o
}

fn color(t: Target) -> RGBColor {
    match t {
        Target::Raw => RGBColor(90, 90, 90),
        Target::Sluice => RGBColor(40, 110, 200),
        Target::Rublk => RGBColor(214, 120, 40),
        Target::RublkZc => RGBColor(240, 180, 90),
    }
}

/// Grouped bars: median kIOPS per point and target on a log axis, the runs' range as a
/// whisker.
pub fn svg(r: &Results, path: &Path) -> Result<(), UblkBenchError> {
    let err = |e: &dyn std::fmt::Display| UblkBenchError::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let points = r.points();
    let root = SVGBackend::new(path, (1400, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let series: Vec<BarSeries> = r
        .targets
        .iter()
        .map(|&t| BarSeries {
            name: t.name().to_owned(),
            color: color(t),
            kiops: points
                .iter()
                .map(|p| r.cell(p, t).and_then(|c| c.iops()).map(kiops_range))
                .collect(),
        })
        .collect();
    let title = format!(
        "ublk, Linux {}: median kIOPS (log scale), whiskers: range of the runs",
        r.setup.kernel
    );
    grouped_bars(&root, &title, &points, &series).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Cell, Setup};
    use super::*;
    use crate::compare::Sample;

    fn sample(iops: f64) -> Sample {
        Sample {
            iops,
            bw_bytes_per_s: iops * 4096.0,
            lat_mean_ns: 1e9 / iops,
            lat_p50_ns: 0.0,
            lat_p99_ns: 0.0,
            lat_p99_9_ns: 0.0,
            client_cpu_percent: 0.0,
        }
    }

    fn results() -> Results {
        let p = Point::standard()[1]; // randread-4k-qd32-q1
        let cell = |t, v: &[f64]| Cell {
            point: p,
            target: t,
            samples: v.iter().map(|&x| sample(x)).collect(),
            errors: Vec::new(),
        };
        Results {
            setup: Setup {
                date_utc: "d".into(),
                kernel: "6.18".into(),
                cpu_model: "cpu".into(),
                cpus: 2,
                note: String::new(),
                device: "/dev/nvme0n1".into(),
                device_bytes: 1 << 30,
                runtime_s: 3.0,
                ramp_s: 1.0,
                repeats: 2,
                queue_depth: 128,
                sluice_version: "sluice".into(),
                rublk_version: "rublk".into(),
                fio_version: "fio".into(),
                servers: Vec::new(),
                ublk_features: String::new(),
                elapsed_s: 1.0,
            },
            targets: vec![Target::Raw, Target::Sluice, Target::Rublk],
            cells: vec![
                cell(Target::Raw, &[100e3, 110e3]),
                cell(Target::Sluice, &[80e3, 82e3]),
                cell(Target::Rublk, &[81e3, 90e3]),
            ],
        }
    }

    #[test]
    fn the_table_names_the_misses() {
        let r = results();
        let p = Point::standard()[1];
        assert_eq!(misses(&r, &p), ["< rublk (within noise)", "< 0.9 × raw"]);
        let md = markdown(&r, "ublk.svg");
        assert!(md.contains("| randread-4k-qd32-q1 | 105.0k ±5% | 81.0k ±1% | 85.5k ±5% | 0.77× | 0.81× | 0.95× |"), "{md}");
    }

    #[test]
    fn plots_a_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ublk.svg");
        svg(&results(), &path).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("<svg"));
    }
}
