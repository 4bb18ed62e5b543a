//! The results model: what a scenario measured, which aims it checked, and
//! the tables and charts the report shows. Scenarios fill it in; the report
//! writer only renders it.

use serde::Serialize;

/// Repeated measurements of one quantity (one value per run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    pub values: Vec<f64>,
}

impl Samples {
    pub fn new(values: Vec<f64>) -> Self {
        Samples { values }
    }

    /// The median (mean of the middle two for an even count); NaN if empty.
    pub fn median(&self) -> f64 {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// How to show a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// Seconds, shown as ms or s.
    Seconds,
    /// Bytes, shown as kB, MB or GB (decimal).
    Bytes,
    /// Bytes per second, shown as MB/s or GB/s.
    BytesPerSecond,
    /// A plain number.
    Count,
    /// A factor, shown as `1.23x`.
    Ratio,
}

impl Unit {
    pub fn show(self, value: f64) -> String {
        if !value.is_finite() {
            return "n/a".to_owned();
        }
        match self {
            Unit::Seconds if value < 1.0 => format!("{:.1} ms", value * 1e3),
            Unit::Seconds => format!("{value:.2} s"),
            Unit::Bytes => scaled(value, ""),
            Unit::BytesPerSecond => scaled(value, "/s"),
            Unit::Count if value.fract() == 0.0 => format!("{value:.0}"),
            Unit::Count => format!("{value:.2}"),
            Unit::Ratio => format!("{value:.2}x"),
        }
    }
}

/// Decimal units, three significant digits or so.
fn scaled(value: f64, suffix: &str) -> String {
    let (divisor, prefix) = match value.abs() {
        v if v >= 1e9 => (1e9, "GB"),
        v if v >= 1e6 => (1e6, "MB"),
        v if v >= 1e3 => (1e3, "kB"),
        _ => (1.0, "B"),
    };
    let v = value / divisor;
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {prefix}{suffix}")
}

/// `median [min-max]`, or just the value for a single sample.
pub fn show_samples(unit: Unit, s: &Samples) -> String {
    if s.values.len() <= 1 {
        return unit.show(s.median());
    }
    format!(
        "{} [{}-{}]",
        unit.show(s.median()),
        unit.show(s.min()),
        unit.show(s.max())
    )
}

/// A table in the report, cells already formatted.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

/// One operation measured on the baseline and on Darter in the same runs.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub operation: String,
    pub unit: Unit,
    pub baseline: Samples,
    pub darter: Samples,
}

impl Comparison {
    pub fn new(
        operation: impl Into<String>,
        unit: Unit,
        baseline: Samples,
        darter: Samples,
    ) -> Self {
        Comparison {
            operation: operation.into(),
            unit,
            baseline,
            darter,
        }
    }

    /// Darter's median over the baseline's.
    pub fn ratio(&self) -> f64 {
        self.darter.median() / self.baseline.median()
    }
}

/// A table of comparisons: operation, baseline, Darter, ratio.
pub fn comparison_table(title: &str, baseline: &str, rows: &[Comparison]) -> Table {
    let mut table = Table::new(
        title,
        &["operation", baseline, "Darter", "Darter / baseline"],
    );
    for c in rows {
        table.row(vec![
            c.operation.clone(),
            show_samples(c.unit, &c.baseline),
            show_samples(c.unit, &c.darter),
            Unit::Ratio.show(c.ratio()),
        ]);
    }
    table
}

/// Whether an aim was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Met,
    NotMet,
    /// The figure could not be measured in this run.
    NotMeasured,
}

impl Verdict {
    /// Met if `value <= limit`; not measured if `value` is not a number.
    pub fn at_most(value: f64, limit: f64) -> Verdict {
        Verdict::compare(value, |v| v <= limit)
    }

    /// Met if `value >= limit`; not measured if `value` is not a number.
    pub fn at_least(value: f64, limit: f64) -> Verdict {
        Verdict::compare(value, |v| v >= limit)
    }

    fn compare(value: f64, met: impl FnOnce(f64) -> bool) -> Verdict {
        match value {
            v if !v.is_finite() => Verdict::NotMeasured,
            v if met(v) => Verdict::Met,
            _ => Verdict::NotMet,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "**NOT MET**",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// An aim from an issue, checked against a measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Aim {
    /// Where the aim comes from, e.g. "issue 3".
    pub source: String,
    /// The aim, e.g. "warm `find` within 1.2x native".
    pub statement: String,
    /// The figure it was checked against, formatted.
    pub measured: String,
    pub verdict: Verdict,
}

impl Aim {
    pub fn new(source: &str, statement: &str, measured: String, verdict: Verdict) -> Self {
        Aim {
            source: source.to_owned(),
            statement: statement.to_owned(),
            measured,
            verdict,
        }
    }
}

/// A bar of a bar chart.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// Drawn in Darter's colour.
    pub darter: bool,
}

/// A labelled point of a scatter chart.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

#[derive(Debug, Clone, Serialize)]
pub enum ChartKind {
    /// Horizontal bars, one per label.
    Bars {
        value_label: String,
        bars: Vec<Bar>,
        /// A reference line (e.g. an aim), with its label.
        reference: Option<(f64, String)>,
    },
    /// Labelled points.
    Scatter {
        x_label: String,
        y_label: String,
        points: Vec<Point>,
    },
    /// One line over time.
    Line {
        x_label: String,
        y_label: String,
        points: Vec<(f64, f64)>,
    },
}

/// A PNG chart written next to RESULTS.md.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// File name inside the output directory.
    pub file: String,
    pub title: String,
    pub kind: ChartKind,
}

/// The daemon's peak resident memory (VmHWM) at the end of one measured
/// operation, one sample per round (each round has its own daemon).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonPeak {
    pub operation: String,
    pub vm_hwm: Samples,
    /// Whether the operation ran on the Debian minbase + python3 image,
    /// the image issue 3 states its RSS aim for. Larger images are
    /// reported without an aim.
    pub on_python_image: bool,
}

/// The 1-minute load average while a scenario ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadSummary {
    pub samples: Samples,
}

/// Everything one scenario produced.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub title: String,
    /// How it was measured, one paragraph per entry (markdown).
    pub method: Vec<String>,
    pub tables: Vec<Table>,
    pub charts: Vec<Chart>,
    pub aims: Vec<Aim>,
    /// Observations, breakdowns and caveats (markdown).
    pub notes: Vec<String>,
    pub daemon_peaks: Vec<DaemonPeak>,
    pub load: LoadSummary,
    pub seconds: f64,
}

impl ScenarioReport {
    pub fn new(name: &str, title: &str) -> Self {
        ScenarioReport {
            name: name.to_owned(),
            title: title.to_owned(),
            method: Vec::new(),
            tables: Vec::new(),
            charts: Vec::new(),
            aims: Vec::new(),
            notes: Vec::new(),
            daemon_peaks: Vec::new(),
            load: LoadSummary::default(),
            seconds: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty_samples() {
        let cases: &[(&[f64], f64)] = &[
            (&[3.0, 1.0, 2.0], 2.0),
            (&[4.0, 1.0, 3.0, 2.0], 2.5),
            (&[7.0], 7.0),
        ];
        for (values, median) in cases {
            assert_eq!(
                Samples::new(values.to_vec()).median(),
                *median,
                "{values:?}"
            );
        }
        assert!(Samples::default().median().is_nan());
    }

    #[test]
    fn min_and_max() {
        let s = Samples::new(vec![2.0, 4.0, 3.0]);
        assert_eq!((s.min(), s.max()), (2.0, 4.0));
    }

    #[test]
    fn units_pick_a_readable_scale() {
        let cases = [
            (Unit::Seconds, 0.0123, "12.3 ms"),
            (Unit::Seconds, 2.5, "2.50 s"),
            (Unit::Bytes, 68_100_000.0, "68.1 MB"),
            (Unit::Bytes, 512.0, "512 B"),
            (Unit::BytesPerSecond, 2_600_000_000.0, "2.60 GB/s"),
            (Unit::BytesPerSecond, 253_000_000.0, "253 MB/s"),
            (Unit::Count, 42.0, "42"),
            (Unit::Ratio, 1.234, "1.23x"),
            (Unit::Ratio, f64::NAN, "n/a"),
        ];
        for (unit, value, shown) in cases {
            assert_eq!(unit.show(value), shown, "{unit:?} {value}");
        }
    }

    #[test]
    fn verdicts_compare_and_refuse_missing_figures() {
        assert_eq!(Verdict::at_most(1.1, 1.2), Verdict::Met);
        assert_eq!(Verdict::at_most(1.3, 1.2), Verdict::NotMet);
        assert_eq!(Verdict::at_least(260e6, 250e6), Verdict::Met);
        assert_eq!(Verdict::at_least(200e6, 250e6), Verdict::NotMet);
        assert_eq!(Verdict::at_most(f64::NAN, 1.0), Verdict::NotMeasured);
        assert_eq!(Verdict::at_least(f64::INFINITY, 1.0), Verdict::NotMeasured);
    }

    #[test]
    fn comparison_rows_show_medians_ranges_and_ratio() {
        let c = Comparison::new(
            "find",
            Unit::Seconds,
            Samples::new(vec![0.1, 0.2, 0.3]),
            Samples::new(vec![0.3, 0.4, 0.5]),
        );
        let t = comparison_table("t", "native", &[c]);
        assert_eq!(
            t.rows[0],
            [
                "find",
                "200.0 ms [100.0 ms-300.0 ms]",
                "400.0 ms [300.0 ms-500.0 ms]",
                "2.00x"
            ]
        );
    }
}
