//! The markdown report and the SVG plot of a ublk benchmark run.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;

use super::{Results, Target, UblkBenchError};
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
    let targets = r.targets.clone();
    let root = SVGBackend::new(path, (1400, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let value = |p: &Point, t: Target| {
        r.cell(p, t)
            .and_then(|c| c.iops())
            .map(|s| (s.median / 1e3, s.min / 1e3, s.max / 1e3))
    };
    let mut hi: f64 = 1.0;
    let mut lo: f64 = f64::MAX;
    for p in &points {
        for &t in &targets {
            if let Some((_, min, max)) = value(p, t) {
                hi = hi.max(max);
                lo = lo.min(min);
            }
        }
    }
    let lo = if lo == f64::MAX {
        0.1
    } else {
        (lo / 2.0).max(0.01)
    };
    let n = points.len().max(1);
    let title = format!(
        "ublk, Linux {}: median kIOPS (log scale), whiskers: range of the runs",
        r.setup.kernel
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo..hi * 6.0).log_scale())
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = points.iter().map(|p| p.short_label()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (*x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 12))
        .y_desc("kIOPS")
        .draw()
        .map_err(|e| err(&e))?;
    let width = 0.8 / targets.len().max(1) as f64;
    for (ti, &t) in targets.iter().enumerate() {
        let c = color(t);
        let bars: Vec<_> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                value(p, t).map(|(med, _, _)| {
                    let x0 = i as f64 - 0.4 + ti as f64 * width;
                    Rectangle::new([(x0, lo), (x0 + width, med)], c.filled())
                })
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(t.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        let whiskers: Vec<_> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                value(p, t).map(|(_, min, max)| {
                    let x = i as f64 - 0.4 + (ti as f64 + 0.5) * width;
                    PathElement::new(vec![(x, min), (x, max)], BLACK.stroke_width(1))
                })
            })
            .collect();
        chart.draw_series(whiskers).map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
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
