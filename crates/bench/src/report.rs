//! Writes the results: `RESULTS.md` (generated, never edited by hand),
//! its PNG charts and `results.json`, into the output directory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::chart;
use crate::machine::Machine;
use crate::model::{
    Aim, Chart, ChartKind, DaemonPeak, Samples, ScenarioReport, Table, Unit, Verdict, show_samples,
};

/// The daemon's peak RSS aim (issue 3; issue 5 reports it per scenario).
const PEAK_RSS_AIM_BYTES: f64 = 40e6;

/// A scenario that failed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub scenario: String,
    pub error: String,
}

/// One run of the harness.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub machine: Machine,
    /// The command that reproduces this run.
    pub command: String,
    /// Which `darter` binary was measured.
    pub darter: String,
    pub quick: bool,
    pub rounds: usize,
    /// (seconds since start, 1-minute load average).
    pub load: Vec<(f64, f64)>,
    pub seconds: f64,
    pub scenarios: Vec<ScenarioReport>,
    pub failures: Vec<Failure>,
}

impl Run {
    /// The memory section's table, from every scenario's daemons, and its
    /// aim, from the daemons that served the python image (issue 3 states
    /// the aim for that image; the AI image's peak is shown without one).
    fn memory(&self) -> Option<(Table, Aim)> {
        let peaks: Vec<(&str, &DaemonPeak)> = self
            .scenarios
            .iter()
            .flat_map(|s| s.daemon_peaks.iter().map(move |p| (s.title.as_str(), p)))
            .collect();
        let mut table = Table::new(
            "Peak resident memory (VmHWM) of the mount daemon, over rounds",
            &["scenario", "after", "VmHWM", "aim applies"],
        );
        for (scenario, peak) in &peaks {
            table.row(vec![
                (*scenario).to_owned(),
                peak.operation.clone(),
                show_samples(Unit::Bytes, &peak.vm_hwm),
                if peak.on_python_image {
                    "yes"
                } else {
                    "no (larger image)"
                }
                .to_owned(),
            ]);
        }
        let under_aim: Vec<&DaemonPeak> = peaks
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| p.on_python_image)
            .collect();
        let worst = under_aim
            .iter()
            .max_by(|a, b| a.vm_hwm.median().total_cmp(&b.vm_hwm.median()))?;
        let aim = Aim::new(
            "issue 3",
            "daemon peak RSS under 40 MB (python image)",
            format!(
                "{} (median over rounds, after {}; the largest of {} operations on the python \
                 image)",
                Unit::Bytes.show(worst.vm_hwm.median()),
                worst.operation,
                under_aim.len()
            ),
            Verdict::at_most(worst.vm_hwm.median(), PEAK_RSS_AIM_BYTES),
        );
        Some((table, aim))
    }

    fn all_aims(&self) -> Vec<(String, Aim)> {
        let mut aims: Vec<(String, Aim)> = self
            .scenarios
            .iter()
            .flat_map(|s| s.aims.iter().map(|a| (s.title.clone(), a.clone())))
            .collect();
        if let Some((_, aim)) = self.memory() {
            aims.push(("Memory".to_owned(), aim));
        }
        aims
    }

    fn load_chart(&self) -> Chart {
        Chart {
            file: "load.png".to_owned(),
            title: "1-minute load average during the run (2 cores)".to_owned(),
            kind: ChartKind::Line {
                x_label: "seconds since start".to_owned(),
                y_label: "load average".to_owned(),
                points: self.load.clone(),
            },
        }
    }
}

/// Writes RESULTS.md, the charts and results.json into `dir`.
pub fn write(run: &Run, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let load_chart = run.load_chart();
    let charts = run
        .scenarios
        .iter()
        .flat_map(|s| s.charts.iter())
        .chain(std::iter::once(&load_chart));
    for c in charts {
        chart::draw(c, dir)?;
    }
    let markdown = render(run);
    let results = dir.join("RESULTS.md");
    std::fs::write(&results, markdown).with_context(|| format!("writing {}", results.display()))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(run).context("serialising the results")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    Ok(())
}

/// The whole RESULTS.md.
pub fn render(run: &Run) -> String {
    let mut md = String::new();
    header(&mut md, run);
    aims_summary(&mut md, run);
    for failure in &run.failures {
        let _ = writeln!(
            md,
            "## {} (FAILED)\n\nThis scenario did not complete:\n\n```\n{}\n```\n",
            failure.scenario, failure.error
        );
    }
    for scenario in &run.scenarios {
        scenario_section(&mut md, scenario);
    }
    if let Some((table, aim)) = run.memory() {
        md.push_str("## Memory\n\n");
        md.push_str(&markdown_table(&table));
        let _ = writeln!(
            md,
            "Aim: {} — {}: {}\n",
            aim.statement,
            aim.measured,
            aim.verdict.label()
        );
    }
    md.push_str("## Noise\n\n");
    let _ = writeln!(
        md,
        "The machine is shared: other agents compile and test on it during the run. \
         Every measurement alternates baseline and Darter within each round and reports \
         the median with the range over rounds; a wide range marks a noisy figure.\n\n\
         ![Load average over the run]({})\n",
        run.load_chart().file
    );
    md
}

fn header(md: &mut String, run: &Run) {
    let m = &run.machine;
    let load = Samples::new(run.load.iter().map(|(_, l)| *l).collect());
    md.push_str("# Darter benchmark results\n\n");
    md.push_str(
        "<!-- Generated by darter-bench: do not edit by hand, rerun the command below. -->\n\n",
    );
    let _ = writeln!(
        md,
        "Every figure below comes from one run of this command, from the workspace root, as root:\n\n\
         ```sh\n{}\n```\n",
        run.command
    );
    let mode = if run.quick {
        "quick (small inputs)"
    } else {
        "full"
    };
    let rows = [
        ("Date", m.date.clone()),
        ("Git commit", m.git_commit.clone()),
        ("Darter binary", run.darter.clone()),
        ("CPU", format!("{} ({} cores)", m.cpu_model, m.cores)),
        ("Kernel", m.kernel.clone()),
        ("Memory", Unit::Bytes.show(m.memory_bytes as f64)),
        (
            "Mode",
            format!(
                "{mode}; {} rounds per measurement, baseline and Darter alternating; \
                 figures are `median [min-max]` over rounds",
                run.rounds
            ),
        ),
        (
            "Load average (1 min)",
            format!(
                "median {:.1}, min {:.1}, max {:.1} on {} cores (see Noise)",
                load.median(),
                load.min(),
                load.max(),
                m.cores
            ),
        ),
        ("Duration", Unit::Seconds.show(run.seconds)),
    ];
    let mut table = Table::new("", &["", ""]);
    for (k, v) in rows {
        table.row(vec![k.to_owned(), v]);
    }
    md.push_str(&markdown_table(&table));
}

fn aims_summary(md: &mut String, run: &Run) {
    let aims = run.all_aims();
    md.push_str("## Aims\n\n");
    if aims.is_empty() {
        md.push_str("No aims were checked in this run.\n\n");
        return;
    }
    let met = aims
        .iter()
        .filter(|(_, a)| a.verdict == Verdict::Met)
        .count();
    let _ = writeln!(md, "{met} of {} aims met.\n", aims.len());
    let mut table = Table::new("", &["scenario", "aim", "from", "measured", "verdict"]);
    for (scenario, aim) in aims {
        table.row(vec![
            scenario,
            aim.statement,
            aim.source,
            aim.measured,
            aim.verdict.label().to_owned(),
        ]);
    }
    md.push_str(&markdown_table(&table));
}

fn scenario_section(md: &mut String, s: &ScenarioReport) {
    let _ = writeln!(md, "## {}\n", s.title);
    let _ = writeln!(
        md,
        "Scenario `{}`; took {}; load average median {:.1} (min {:.1}, max {:.1}).\n",
        s.name,
        Unit::Seconds.show(s.seconds),
        s.load.samples.median(),
        s.load.samples.min(),
        s.load.samples.max()
    );
    for paragraph in &s.method {
        let _ = writeln!(md, "{paragraph}\n");
    }
    for table in &s.tables {
        md.push_str(&markdown_table(table));
    }
    for c in &s.charts {
        let _ = writeln!(md, "![{}]({})\n", c.title, c.file);
    }
    if !s.aims.is_empty() {
        md.push_str("Aims:\n\n");
        for aim in &s.aims {
            let _ = writeln!(
                md,
                "- {} ({}): {} — **{}**",
                aim.statement,
                aim.source,
                aim.measured,
                aim.verdict.label().trim_matches('*')
            );
        }
        md.push('\n');
    }
    for note in &s.notes {
        let _ = writeln!(md, "{note}\n");
    }
}

/// A GitHub-flavoured markdown table, with its title in bold above it.
pub fn markdown_table(table: &Table) -> String {
    let mut md = String::new();
    if !table.title.is_empty() {
        let _ = writeln!(md, "**{}**\n", table.title);
    }
    let line = |cells: &[String]| {
        let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", escaped.join(" | "))
    };
    md.push_str(&line(&table.columns));
    md.push_str(&line(&vec!["---".to_owned(); table.columns.len()]));
    for row in &table.rows {
        md.push_str(&line(row));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadSummary;

    fn machine() -> Machine {
        Machine {
            cpu_model: "Test CPU".into(),
            cores: 2,
            kernel: "6.1".into(),
            memory_bytes: 1 << 30,
            date: "2025-01-01T00:00:00Z".into(),
            git_commit: "abc".into(),
        }
    }

    fn run_with(scenarios: Vec<ScenarioReport>) -> Run {
        Run {
            machine: machine(),
            command: "cargo run --release -p darter-bench -- all".into(),
            darter: "built from the workspace".into(),
            quick: false,
            rounds: 5,
            load: vec![(0.0, 2.0), (2.0, 4.0)],
            seconds: 90.0,
            scenarios,
            failures: vec![Failure {
                scenario: "registry".into(),
                error: "no registry".into(),
            }],
        }
    }

    #[test]
    fn tables_escape_pipes() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["x|y".into(), "z".into()]);
        assert_eq!(
            markdown_table(&t),
            "**T**\n\n| a | b |\n| --- | --- |\n| x\\|y | z |\n\n"
        );
    }

    #[test]
    fn results_show_command_machine_aims_failures_and_memory() {
        let mut s = ScenarioReport::new("build", "Build");
        s.aims
            .push(Aim::new("issue 2", "fast", "300 MB/s".into(), Verdict::Met));
        s.aims.push(Aim::new(
            "issue 2",
            "small",
            "70 MB".into(),
            Verdict::NotMet,
        ));
        s.daemon_peaks.push(DaemonPeak {
            operation: "read-all".into(),
            vm_hwm: Samples::new(vec![30e6, 50e6, 60e6]),
            on_python_image: true,
        });
        s.daemon_peaks.push(DaemonPeak {
            operation: "cold start of a larger image".into(),
            vm_hwm: Samples::new(vec![90e6]),
            on_python_image: false,
        });
        s.load = LoadSummary {
            samples: Samples::new(vec![3.0]),
        };
        let md = render(&run_with(vec![s]));
        for needle in [
            "cargo run --release -p darter-bench -- all",
            "Test CPU (2 cores)",
            "| Kernel | 6.1 |",
            "1 of 3 aims met.",
            "| Build | small | issue 2 | 70 MB | **NOT MET** |",
            "daemon peak RSS under 40 MB (python image) | issue 3 | 50.0 MB (median over rounds, \
             after read-all; the largest of 1 operations on the python image) | **NOT MET**",
            "| Build | read-all | 50.0 MB [30.0 MB-60.0 MB] | yes |",
            "| Build | cold start of a larger image | 90.0 MB | no (larger image) |",
            "## registry (FAILED)",
            "no registry",
            "median 3.0, min 2.0, max 4.0",
            "![Load average over the run](load.png)",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
        }
    }
}
