//! The plot: per placement, two panels of grouped bars (the file targets, the null
//! targets), median kIOPS per point on a log axis, with the repeats' range as a whisker.
//! Points are labelled short (`rr 4k qd32 q2`: rr/rw random read/write, sr/sw sequential).

use std::io;
use std::path::{Path, PathBuf};

use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;

use super::{Backing, Placement, Point, Results, Target};

const PANEL_W: u32 = 1400;
const PANEL_H: u32 = 400;

fn color(t: Target) -> RGBColor {
    match t {
        Target::Fio => RGBColor(90, 90, 90),
        Target::BlkioUring => RGBColor(170, 170, 170),
        Target::QsdFile | Target::QsdNull => RGBColor(214, 120, 40),
        Target::SluiceFile | Target::SluiceNull => RGBColor(40, 110, 200),
    }
}

/// What plotters' SVG backend fails with.
pub type DrawError = DrawingAreaErrorKind<io::Error>;

/// Why the plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing a panel (or the background) failed.
    #[error("plotting {}: {source}", path.display())]
    Draw {
        /// The SVG file.
        path: PathBuf,
        /// plotters' error.
        #[source]
        source: DrawError,
    },
    /// Writing the finished SVG file failed.
    #[error("writing the plot {}: {source}", path.display())]
    Write {
        /// The SVG file.
        path: PathBuf,
        /// plotters' error (it holds the OS error).
        #[source]
        source: DrawError,
    },
}

/// Writes the SVG plot of `r` to `path`.
pub fn svg(r: &Results, path: &Path) -> Result<(), PlotError> {
    let placements: Vec<Placement> = Placement::ALL
        .into_iter()
        .filter(|p| r.cells.iter().any(|c| c.placement == *p))
        .collect();
    let mut points: Vec<Point> = Vec::new();
    for c in &r.cells {
        if !points.contains(&c.point) {
            points.push(c.point);
        }
    }
    let rows = 2 * placements.len().max(1);
    let root = SVGBackend::new(path, (PANEL_W, rows as u32 * PANEL_H)).into_drawing_area();
    let draw = |source| PlotError::Draw {
        path: path.to_path_buf(),
        source,
    };
    root.fill(&WHITE).map_err(draw)?;
    let panels = root.split_evenly((rows, 1));
    for (row, placement) in placements.iter().enumerate() {
        for (col, backing) in [Backing::File, Backing::Null].into_iter().enumerate() {
            let targets: Vec<Target> = Target::ALL
                .into_iter()
                .filter(|t| t.backing() == backing && r.cells.iter().any(|c| c.target == *t))
                .collect();
            let area = &panels[row * 2 + col];
            panel(r, area, *placement, backing, &targets, &points).map_err(draw)?;
        }
    }
    root.present().map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn panel(
    r: &Results,
    area: &Area,
    placement: Placement,
    backing: Backing,
    targets: &[Target],
    points: &[Point],
) -> Result<(), DrawError> {
    let title = format!(
        "{} placement, {} backing: median kIOPS (log scale), whiskers: range of the runs",
        placement.name(),
        match backing {
            Backing::File => "file",
            Backing::Null => "null",
        }
    );
    let series: Vec<BarSeries> = targets
        .iter()
        .map(|&t| BarSeries {
            name: t.name().to_owned(),
            color: color(t),
            kiops: points
                .iter()
                .map(|p| {
                    r.cell(placement, p, t)
                        .and_then(|c| c.iops())
                        .map(kiops_range)
                })
                .collect(),
        })
        .collect();
    grouped_bars(area, &title, points, &series)
}

/// A spread of IOPS as (median, min, max) kIOPS.
pub fn kiops_range(s: super::Spread) -> (f64, f64, f64) {
    (s.median / 1e3, s.min / 1e3, s.max / 1e3)
}

/// One target's bars in [`grouped_bars`]: its legend name, its colour, and per point
/// (median, min, max) kIOPS, `None` where it has no result.
pub struct BarSeries {
    /// The legend's name.
    pub name: String,
    /// The bars' colour.
    pub color: RGBColor,
    /// Per point, in the order of the points.
    pub kiops: Vec<Option<(f64, f64, f64)>>,
}

/// Grouped bars on `area`: per point, one bar per series (median kIOPS on a log axis)
/// with the runs' range as a whisker, a legend in the upper right.
pub fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    points: &[Point],
    series: &[BarSeries],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut hi: f64 = 1.0;
    let mut lo: f64 = f64::MAX;
    for (_, min, max) in series.iter().flat_map(|s| s.kiops.iter().flatten()) {
        hi = hi.max(*max);
        lo = lo.min(*min);
    }
    let lo = if lo == f64::MAX {
        0.1
    } else {
        (lo / 2.0).max(0.01)
    };
    let n = points.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        // Category i is centred on x = i, so the mesh's integer ticks label the points;
        // the headroom above the tallest bar keeps the legend clear of the bars.
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo..hi * 6.0).log_scale())?;
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
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (si, s) in series.iter().enumerate() {
        let c = s.color;
        let bars: Vec<_> = s
            .kiops
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.map(|(med, _, _)| {
                    let x0 = i as f64 - 0.4 + si as f64 * width;
                    Rectangle::new([(x0, lo), (x0 + width, med)], c.filled())
                })
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        let whiskers: Vec<_> = s
            .kiops
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.map(|(_, min, max)| {
                    let x = i as f64 - 0.4 + (si as f64 + 0.5) * width;
                    PathElement::new(vec![(x, min), (x, max)], BLACK.stroke_width(1))
                })
            })
            .collect();
        chart.draw_series(whiskers)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        serde_json::from_str(include_str!("../../results/compare.json")).expect("compare.json")
    }

    #[test]
    fn plots_a_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("compare.svg");
        svg(&results(), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<svg"));
    }

    #[test]
    fn an_unwritable_file_is_a_write_error() {
        let path = Path::new("/nonexistent/dir/compare.svg");
        let e = svg(&results(), path).unwrap_err();
        assert!(
            matches!(&e, PlotError::Write { path: p, .. } if p == path),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("writing the plot /nonexistent/dir/compare.svg: "),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
