//! The build-option sweep: `--level` x `--frame-size` on one core, size
//! and speed of each, so the defaults can be chosen from data.

use crate::model::{Chart, ChartKind, Point, ScenarioReport, Table, Unit, show_samples};
use crate::scenario::{Bench, Scenario, Variant, alternate};
use crate::scenarios::build::{BuildRun, Input, darter_build_args, measure_build, output_size};

const LEVELS: &[i32] = &[1, 2, 3];
const FRAME_SIZES: &[&str] = &["64K", "128K", "256K"];
/// The defaults of `darter build` (README), marked in the table.
const DEFAULT: (i32, &str) = (3, "128K");

#[derive(Debug)]
pub struct BuildSweep;

#[derive(Debug, Clone, Copy)]
struct Setting {
    level: i32,
    frame_size: &'static str,
}

fn settings() -> Vec<Setting> {
    LEVELS
        .iter()
        .flat_map(|&level| {
            FRAME_SIZES
                .iter()
                .map(move |&frame_size| Setting { level, frame_size })
        })
        .collect()
}

impl Scenario for BuildSweep {
    fn name(&self) -> &'static str {
        "build-sweep"
    }

    fn title(&self) -> &'static str {
        "Build options: zstd level x frame size (issue 2)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let input = Input::prepare(bench)?;
        let scratch = bench.scratch("sweep")?;
        let settings = settings();
        let darter = bench.darter.clone();
        let mut variants: Vec<Variant<'_, BuildRun>> = settings
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let out = scratch.path().join(format!("out-{i}"));
                let (darter, tree) = (&darter, &input.tree);
                Box::new(move || {
                    let mut cmd = darter.command_on_one_core();
                    darter_build_args(&mut cmd, tree, &out)
                        .args(["--jobs", "1", "--level", &s.level.to_string()])
                        .args(["--frame-size", s.frame_size]);
                    measure_build(&mut cmd, &out)
                }) as Variant<'_, BuildRun>
            })
            .collect();
        // The sweep is for choosing defaults, not an aim: in quick mode one
        // round suffices.
        let rounds = if bench.size.quick { 1 } else { bench.size.runs };
        let runs = alternate(rounds, &mut variants)?;
        drop(variants);
        Ok(report(self, &input, &settings, &runs))
    }
}

fn report(
    scenario: &BuildSweep,
    input: &Input,
    settings: &[Setting],
    runs: &[Vec<BuildRun>],
) -> ScenarioReport {
    let mut r = ScenarioReport::new(scenario.name(), scenario.title());
    r.method.push(input.describe());
    r.method.push(
        "Every setting is built with `taskset -c 0 darter build --jobs 1 --level L \
         --frame-size F` (zstd, 1 MiB chunks), settings rotating from round to round."
            .to_owned(),
    );
    let gzip_oci = input.gzip_oci_bytes as f64;
    let mut table = Table::new(
        "Size and one-core speed per setting",
        &[
            "level",
            "frame size",
            "output",
            "output / gzip OCI image",
            "throughput (1 core, wall time)",
            "per CPU-second",
        ],
    );
    let mut points = Vec::new();
    let mut candidates = Vec::new();
    for (s, runs) in settings.iter().zip(runs) {
        let size = output_size(runs);
        let speed = input.cpu_throughput(runs);
        let default = if (s.level, s.frame_size) == DEFAULT {
            " (default)"
        } else {
            ""
        };
        table.row(vec![
            format!("{}{default}", s.level),
            s.frame_size.to_owned(),
            Unit::Bytes.show(size),
            Unit::Ratio.show(size / gzip_oci),
            show_samples(Unit::BytesPerSecond, &input.throughput(runs)),
            show_samples(Unit::BytesPerSecond, &speed),
        ]);
        points.push(Point {
            label: format!("L{} {}", s.level, s.frame_size),
            x: size / 1e6,
            y: speed.median() / 1e6,
        });
        candidates.push((*s, size, speed.median()));
    }
    r.tables.push(table);
    r.charts.push(Chart {
        file: "build-sweep.png".into(),
        title: "zstd level x frame size: output size vs one-core throughput".into(),
        kind: ChartKind::Scatter {
            x_label: "output size (MB)".into(),
            y_label: "MB of input per CPU-second, 1 core".into(),
            points,
        },
    });
    r.notes.push(recommendation(&candidates, gzip_oci));
    r
}

/// The fastest setting whose output is no larger than the gzip OCI image.
fn recommendation(candidates: &[(Setting, f64, f64)], gzip_oci: f64) -> String {
    let fastest_small = candidates
        .iter()
        .filter(|(_, size, _)| *size <= gzip_oci)
        .max_by(|a, b| a.2.total_cmp(&b.2));
    match fastest_small {
        Some((s, size, speed)) => format!(
            "From this run: the fastest setting whose output is no larger than the gzip OCI \
             image is level {} with {} frames ({}, {} per CPU-second on one core).",
            s.level,
            s.frame_size,
            Unit::Bytes.show(*size),
            Unit::BytesPerSecond.show(*speed)
        ),
        None => {
            "From this run: no setting produced output as small as the gzip OCI image.".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_covers_every_level_and_frame_size_once() {
        let s = settings();
        assert_eq!(s.len(), LEVELS.len() * FRAME_SIZES.len());
        assert!(s.iter().any(|s| (s.level, s.frame_size) == DEFAULT));
    }

    #[test]
    fn recommends_the_fastest_setting_no_larger_than_gzip() {
        let at = |level, frame_size| Setting { level, frame_size };
        let candidates = [
            (at(1, "64K"), 90.0, 400.0),
            (at(2, "128K"), 79.0, 300.0),
            (at(3, "128K"), 75.0, 250.0),
        ];
        let text = recommendation(&candidates, 80.0);
        assert!(text.contains("level 2 with 128K"), "{text}");
        let none = recommendation(&candidates, 10.0);
        assert!(none.contains("no setting"), "{none}");
    }
}
