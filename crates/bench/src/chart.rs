//! PNG charts of the results (plotters, bitmap backend). Text is drawn
//! with a TrueType font from the system (Debian: fonts-dejavu-core).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context as _, anyhow, bail};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::model::{Bar, Chart, ChartKind, Point};

const WIDTH: u32 = 1000;
const DARTER_COLOUR: RGBColor = RGBColor(0xd9, 0x5f, 0x02);
const BASELINE_COLOUR: RGBColor = RGBColor(0x75, 0x70, 0xb3);
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Draws `chart` into `dir/chart.file`.
pub fn draw(chart: &Chart, dir: &Path) -> anyhow::Result<()> {
    register_font()?;
    let path = dir.join(&chart.file);
    let drawn = match &chart.kind {
        ChartKind::Bars {
            value_label,
            bars,
            reference,
        } => draw_bars(&path, &chart.title, value_label, bars, reference.as_ref()),
        ChartKind::Scatter {
            x_label,
            y_label,
            points,
        } => draw_scatter(&path, &chart.title, x_label, y_label, points),
        ChartKind::Line {
            x_label,
            y_label,
            points,
        } => draw_line(&path, &chart.title, x_label, y_label, points),
    };
    drawn.with_context(|| format!("drawing {}", path.display()))
}

/// Registers the first system font found as `sans-serif`, once.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let (path, bytes) = FONT_CANDIDATES
                .iter()
                .find_map(|p| std::fs::read(p).ok().map(|b| (*p, b)))
                .ok_or_else(|| {
                    format!("no TrueType font for the charts; install fonts-dejavu-core (looked for {FONT_CANDIDATES:?})")
                })?;
            // Fonts stay registered for the life of the process.
            let bytes: &'static [u8] = Vec::leak(bytes);
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable TrueType font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn bar_colour(bar: &Bar) -> RGBColor {
    if bar.darter {
        DARTER_COLOUR
    } else {
        BASELINE_COLOUR
    }
}

/// Horizontal bars, one per label, each with its value written at its end.
fn draw_bars(
    path: &Path,
    title: &str,
    value_label: &str,
    bars: &[Bar],
    reference: Option<&(f64, String)>,
) -> anyhow::Result<()> {
    let finite: Vec<&Bar> = bars.iter().filter(|b| b.value.is_finite()).collect();
    if finite.is_empty() {
        bail!("no finite values to draw");
    }
    let n = finite.len();
    let top = finite
        .iter()
        .map(|b| b.value)
        .chain(reference.map(|r| r.0))
        .fold(0.0, f64::max);
    let height = 140 + 48 * u32::try_from(n).unwrap_or(u32::MAX / 64);
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let labels: Vec<String> = finite.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(360)
        // A segmented 0..k range has k + 1 slots.
        .build_cartesian_2d(0.0..top * 1.2, (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(value_label)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(finite.iter().enumerate().map(|(i, bar)| {
        let mut rect = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (bar.value, SegmentValue::Exact(i + 1)),
            ],
            bar_colour(bar).filled(),
        );
        rect.set_margin(6, 6, 0, 0);
        rect
    }))?;
    chart.draw_series(finite.iter().enumerate().map(|(i, bar)| {
        Text::new(
            format!(" {}", short_number(bar.value)),
            (bar.value, SegmentValue::CenterOf(i)),
            ("sans-serif", 14),
        )
    }))?;
    if let Some((value, label)) = reference {
        chart
            .draw_series(LineSeries::new(
                [
                    (*value, SegmentValue::Exact(0)),
                    (*value, SegmentValue::Exact(n)),
                ],
                RED.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Labelled points.
fn draw_scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[Point],
) -> anyhow::Result<()> {
    let finite: Vec<&Point> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    if finite.is_empty() {
        bail!("no finite points to draw");
    }
    let (x_range, y_range) = (
        padded_range(finite.iter().map(|p| p.x)),
        padded_range(finite.iter().map(|p| p.y)),
    );
    let root = BitMapBackend::new(path, (WIDTH, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(finite.iter().map(|p| {
        EmptyElement::at((p.x, p.y))
            + Circle::new((0, 0), 5, DARTER_COLOUR.filled())
            + Text::new(p.label.clone(), (8, -6), ("sans-serif", 13))
    }))?;
    root.present()?;
    Ok(())
}

/// One line, e.g. the load average over the run.
fn draw_line(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> anyhow::Result<()> {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if finite.is_empty() {
        bail!("no finite points to draw");
    }
    let x_max = finite.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = finite.iter().map(|p| p.1).fold(1.0, f64::max);
    let root = BitMapBackend::new(path, (WIDTH, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(LineSeries::new(finite, BASELINE_COLOUR.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

/// The range of `values` with 10% room on each side (never empty).
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.05).max(1e-9);
    (lo - pad)..(hi + pad)
}

/// A value with three significant digits, for bar ends.
fn short_number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_png(path: &Path) -> bool {
        std::fs::read(path)
            .unwrap()
            .starts_with(b"\x89PNG\r\n\x1a\n")
    }

    #[test]
    fn draws_every_kind_of_chart_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let charts = [
            Chart {
                file: "bars.png".into(),
                title: "Build throughput".into(),
                kind: ChartKind::Bars {
                    value_label: "MB/s".into(),
                    bars: vec![
                        Bar {
                            label: "darter".into(),
                            value: 230.0,
                            darter: true,
                        },
                        Bar {
                            label: "gzip".into(),
                            value: 40.0,
                            darter: false,
                        },
                        Bar {
                            label: "skipped".into(),
                            value: f64::NAN,
                            darter: false,
                        },
                    ],
                    reference: Some((250.0, "aim".into())),
                },
            },
            Chart {
                file: "scatter.png".into(),
                title: "Sweep".into(),
                kind: ChartKind::Scatter {
                    x_label: "MB".into(),
                    y_label: "MB/s".into(),
                    points: vec![
                        Point {
                            label: "l1".into(),
                            x: 70.0,
                            y: 300.0,
                        },
                        Point {
                            label: "l3".into(),
                            x: 65.0,
                            y: 220.0,
                        },
                    ],
                },
            },
            Chart {
                file: "line.png".into(),
                title: "Load".into(),
                kind: ChartKind::Line {
                    x_label: "s".into(),
                    y_label: "load".into(),
                    points: vec![(0.0, 5.0), (2.0, 6.5)],
                },
            },
        ];
        for chart in &charts {
            draw(chart, dir.path()).unwrap();
            assert!(is_png(&dir.path().join(&chart.file)), "{}", chart.file);
        }
    }

    #[test]
    fn a_chart_without_values_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            file: "empty.png".into(),
            title: "Nothing".into(),
            kind: ChartKind::Bars {
                value_label: "x".into(),
                bars: vec![Bar {
                    label: "nan".into(),
                    value: f64::NAN,
                    darter: true,
                }],
                reference: None,
            },
        };
        assert!(draw(&chart, dir.path()).is_err());
    }

    #[test]
    fn ranges_are_padded_and_never_empty() {
        let r = padded_range([5.0, 5.0].into_iter());
        assert!(r.start < 5.0 && r.end > 5.0);
        let r = padded_range([0.0, 10.0].into_iter());
        assert_eq!((r.start, r.end), (-1.0, 11.0));
    }
}
