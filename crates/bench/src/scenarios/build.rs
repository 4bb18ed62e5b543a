//! Build throughput and output size (issue 2): `darter build` of the
//! Debian python rootfs on one core and on all cores, side by side with
//! `mkfs.erofs` and `tar | gzip -6` of the same tree; sizes against the
//! gzip OCI layers of the same tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::inputs;
use crate::model::{
    Aim, Bar, Chart, ChartKind, Samples, ScenarioReport, Table, Unit, Verdict, show_samples,
};
use crate::scenario::{Bench, Scenario, Variant, alternate};
use crate::tools::{self, Darter, on_one_core, shell};
use crate::walk;

/// The per-core throughput aim, bytes of input per second.
const THROUGHPUT_AIM: f64 = 250e6;

#[derive(Debug)]
pub struct Build;

/// A program that turns a tree into one output.
struct Tool {
    label: &'static str,
    darter: bool,
    one_core: bool,
    /// The command that builds `tree` into `out`.
    command: fn(&Darter, &Path, &Path) -> Command,
}

const TOOLS: &[Tool] = &[
    Tool {
        label: "darter build (zstd 3), 1 core",
        darter: true,
        one_core: true,
        command: |darter, tree, out| {
            let mut cmd = darter.command_on_one_core();
            darter_build_args(&mut cmd, tree, out).args(["--jobs", "1"]);
            cmd
        },
    },
    Tool {
        label: "darter build (zstd 3), all cores",
        darter: true,
        one_core: false,
        command: |darter, tree, out| {
            let mut cmd = darter.command();
            darter_build_args(&mut cmd, tree, out);
            cmd
        },
    },
    Tool {
        label: "mkfs.erofs -zlz4hc, 1 core",
        darter: false,
        one_core: true,
        command: |_, tree, out| {
            let mut cmd = on_one_core("mkfs.erofs");
            cmd.args(["--quiet", "-zlz4hc"]).arg(out).arg(tree);
            cmd
        },
    },
    Tool {
        label: "mkfs.erofs uncompressed, 1 core",
        darter: false,
        one_core: true,
        command: |_, tree, out| {
            let mut cmd = on_one_core("mkfs.erofs");
            cmd.arg("--quiet").arg(out).arg(tree);
            cmd
        },
    },
    Tool {
        label: "tar | gzip -6, 1 core",
        darter: false,
        one_core: true,
        command: |_, tree, out| pinned_tar_pipe("gzip -6", tree, out),
    },
    Tool {
        label: "tar | zstd -3, 1 core",
        darter: false,
        one_core: true,
        command: |_, tree, out| pinned_tar_pipe("zstd -q -3 -T1", tree, out),
    },
];

/// Label of the `tar | gzip -6` tool, the size reference.
const TAR_GZIP: usize = 4;

/// `darter build TREE -o oci:OUT:bench --json`.
pub fn darter_build_args<'c>(cmd: &'c mut Command, tree: &Path, out: &Path) -> &'c mut Command {
    cmd.arg("build")
        .arg(tree)
        .arg("-o")
        .arg(format!("oci:{}:bench", out.display()))
        .arg("--json")
}

/// `taskset -c 0 sh -c 'tar -C TREE -cf - . | COMPRESSOR > OUT'`.
fn pinned_tar_pipe(compressor: &str, tree: &Path, out: &Path) -> Command {
    let script = format!("tar -C \"$1\" -cf - . | {compressor} > \"$2\"");
    let sh = shell(&script, &[tree.as_os_str(), out.as_os_str()]);
    let mut cmd = on_one_core(sh.get_program());
    cmd.args(sh.get_args());
    cmd
}

/// What one build cost and produced.
#[derive(Debug, Clone, Copy)]
pub struct BuildRun {
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub output_bytes: u64,
}

/// Builds with `command` into a fresh `out` and measures it.
pub fn measure_build(command: &mut Command, out: &Path) -> anyhow::Result<BuildRun> {
    remove_output(out)?;
    let timed = tools::timed(command)?;
    Ok(BuildRun {
        seconds: timed.wall.as_secs_f64(),
        cpu_seconds: timed.cpu.as_secs_f64(),
        output_bytes: output_bytes(out)?,
    })
}

fn remove_output(out: &Path) -> anyhow::Result<()> {
    let removed = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(out),
        Ok(_) => std::fs::remove_file(out),
        Err(_) => Ok(()),
    };
    removed.with_context(|| format!("removing {}", out.display()))
}

/// A file's size, or an OCI layout's blob bytes.
fn output_bytes(out: &Path) -> anyhow::Result<u64> {
    let meta = std::fs::metadata(out).with_context(|| format!("stat {}", out.display()))?;
    if meta.is_dir() {
        inputs::layout_blob_bytes(out)
    } else {
        Ok(meta.len())
    }
}

/// The input: the python rootfs, read once so that every tool finds it
/// in the page cache.
pub struct Input {
    pub tree: PathBuf,
    pub totals: walk::WalkTotals,
    pub gzip_oci_bytes: u64,
    pub gzip_oci_layers: usize,
}

impl Input {
    pub fn prepare(bench: &Bench) -> anyhow::Result<Input> {
        let tree = bench.python_rootfs()?;
        let layers = inputs::oci_layer_sizes(&bench.python_oci()?)?;
        let totals = walk::walk(&tree, true)?;
        Ok(Input {
            tree,
            totals,
            gzip_oci_bytes: layers.iter().sum(),
            gzip_oci_layers: layers.len(),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "Input: the Debian bookworm minbase + python3 root filesystem (testkit fixture), \
             {} entries, {} regular files holding {}, read once beforehand so every tool finds \
             it in the page cache. Throughput is input file bytes divided by wall time. \
             The reference image is the same tree as a plain OCI image made by umoci: \
             {} gzip layers, {} in all.",
            self.totals.entries,
            self.totals.files,
            Unit::Bytes.show(self.totals.file_bytes as f64),
            self.gzip_oci_layers,
            Unit::Bytes.show(self.gzip_oci_bytes as f64)
        )
    }

    /// Input bytes per second of wall time.
    pub fn throughput(&self, runs: &[BuildRun]) -> Samples {
        self.per(runs, |r| r.seconds)
    }

    /// Input bytes per second of CPU time: what one core does when it is
    /// not shared (on a busy machine a pinned build gets only part of its
    /// core, which wall time counts against it).
    pub fn cpu_throughput(&self, runs: &[BuildRun]) -> Samples {
        self.per(runs, |r| r.cpu_seconds)
    }

    fn per(&self, runs: &[BuildRun], seconds: fn(&BuildRun) -> f64) -> Samples {
        Samples::new(
            runs.iter()
                .map(|r| self.totals.file_bytes as f64 / seconds(r))
                .collect(),
        )
    }
}

/// The median output size of some builds (they are deterministic).
pub fn output_size(runs: &[BuildRun]) -> f64 {
    Samples::new(runs.iter().map(|r| r.output_bytes as f64).collect()).median()
}

impl Scenario for Build {
    fn name(&self) -> &'static str {
        "build"
    }

    fn title(&self) -> &'static str {
        "Build throughput and size (issue 2)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let input = Input::prepare(bench)?;
        let scratch = bench.scratch("build")?;
        let darter = bench.darter.clone();
        let mut variants: Vec<Variant<'_, BuildRun>> = TOOLS
            .iter()
            .enumerate()
            .map(|(i, tool)| {
                let out = scratch.path().join(format!("out-{i}"));
                let (darter, tree) = (&darter, &input.tree);
                Box::new(move || measure_build(&mut (tool.command)(darter, tree, &out), &out))
                    as Variant<'_, BuildRun>
            })
            .collect();
        let runs = alternate(bench.size.runs, &mut variants)?;
        drop(variants);
        Ok(report(self, &input, &runs))
    }
}

fn report(scenario: &Build, input: &Input, runs: &[Vec<BuildRun>]) -> ScenarioReport {
    let mut r = ScenarioReport::new(scenario.name(), scenario.title());
    r.method.push(input.describe());
    r.method.push(
        "Each round runs every tool once, in an order rotated from round to round; \
         \"1 core\" runs are pinned with `taskset -c 0` (`darter build --jobs 1`). \
         CPU time is user + system time of the tool and its children (10 ms resolution). \
         On a shared machine a pinned build gets only part of its core, so the per-core aim \
         is checked against input bytes per CPU-second; wall-time throughput is shown too."
            .to_owned(),
    );
    let gzip_oci = input.gzip_oci_bytes as f64;
    let mut table = Table::new(
        "Build throughput and output size",
        &[
            "tool",
            "throughput (wall time)",
            "per CPU-second",
            "wall time",
            "CPU time",
            "output",
            "output / gzip OCI image",
        ],
    );
    let mut speed_bars = Vec::new();
    let mut size_bars = vec![Bar {
        label: format!("OCI image, {} gzip layers", input.gzip_oci_layers),
        value: gzip_oci / 1e6,
        darter: false,
    }];
    for (tool, runs) in TOOLS.iter().zip(runs) {
        let throughput = input.throughput(runs);
        let size = output_size(runs);
        table.row(vec![
            tool.label.to_owned(),
            show_samples(Unit::BytesPerSecond, &throughput),
            show_samples(Unit::BytesPerSecond, &input.cpu_throughput(runs)),
            show_samples(
                Unit::Seconds,
                &Samples::new(runs.iter().map(|r| r.seconds).collect()),
            ),
            show_samples(
                Unit::Seconds,
                &Samples::new(runs.iter().map(|r| r.cpu_seconds).collect()),
            ),
            Unit::Bytes.show(size),
            Unit::Ratio.show(size / gzip_oci),
        ]);
        speed_bars.push(Bar {
            label: tool.label.to_owned(),
            value: input.cpu_throughput(runs).median() / 1e6,
            darter: tool.darter,
        });
        if tool.one_core {
            size_bars.push(Bar {
                label: tool.label.trim_end_matches(", 1 core").to_owned(),
                value: size / 1e6,
                darter: tool.darter,
            });
        }
    }
    table.row(vec![
        format!(
            "(reference) plain OCI image, {} gzip layers",
            input.gzip_oci_layers
        ),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        Unit::Bytes.show(gzip_oci),
        Unit::Ratio.show(1.0),
    ]);
    r.tables.push(table);
    r.charts.push(Chart {
        file: "build-throughput.png".into(),
        title: "Build throughput, Debian python3 rootfs (MB of input per CPU-second)".into(),
        kind: ChartKind::Bars {
            value_label: "MB per CPU-second".into(),
            bars: speed_bars,
            reference: Some((THROUGHPUT_AIM / 1e6, "aim: 250 MB/s per core".into())),
        },
    });
    r.charts.push(Chart {
        file: "build-size.png".into(),
        title: "Output size, Debian python3 rootfs (MB)".into(),
        kind: ChartKind::Bars {
            value_label: "MB".into(),
            bars: size_bars,
            reference: Some((gzip_oci / 1e6, "gzip OCI image".into())),
        },
    });
    let one_core = input.throughput(&runs[0]);
    let one_core_cpu = input.cpu_throughput(&runs[0]);
    let darter_size = output_size(&runs[0]);
    let tar_gzip = output_size(&runs[TAR_GZIP]);
    r.aims.push(Aim::new(
        "issue 2",
        "build at least 250 MB/s per core with zstd",
        format!(
            "{} per CPU-second on 1 core ({} by wall time: the shared core gave the pinned \
             build {:.0}% of its time)",
            Unit::BytesPerSecond.show(one_core_cpu.median()),
            Unit::BytesPerSecond.show(one_core.median()),
            100.0 * one_core.median() / one_core_cpu.median()
        ),
        Verdict::at_least(one_core_cpu.median(), THROUGHPUT_AIM),
    ));
    for (source, statement, reference) in [
        (
            "issues 2, 5",
            "image no larger than the gzip OCI image",
            gzip_oci,
        ),
        (
            "issue 2",
            "image no larger than gzip -6 of one tar of the tree",
            tar_gzip,
        ),
    ] {
        r.aims.push(Aim::new(
            source,
            statement,
            format!(
                "{} vs {} ({})",
                Unit::Bytes.show(darter_size),
                Unit::Bytes.show(reference),
                Unit::Ratio.show(darter_size / reference)
            ),
            Verdict::at_most(darter_size, reference),
        ));
    }
    r.notes.push(format!(
        "For scale (issue 2): Nydus 2.4 on this kind of machine builds this tree at 153 MB/s on \
         one core into 69.6 MB (blob + bootstrap), 6% larger than `gzip -6` of the tar. \
         Darter here: {} per CPU-second on one core, {} output, {} of `gzip -6` of the tar.",
        Unit::BytesPerSecond.show(one_core_cpu.median()),
        Unit::Bytes.show(darter_size),
        Unit::Ratio.show(darter_size / tar_gzip)
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_reference_is_tar_gzip_and_darter_one_core_comes_first() {
        assert!(TOOLS[TAR_GZIP].label.starts_with("tar | gzip -6"));
        assert!(TOOLS[0].darter && TOOLS[0].one_core);
    }

    #[test]
    fn tar_pipes_run_pinned_through_sh() {
        let cmd = pinned_tar_pipe("gzip -6", Path::new("/t"), Path::new("/o.tgz"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "taskset");
        assert_eq!(
            args,
            [
                "-c",
                "0",
                "sh",
                "-c",
                "tar -C \"$1\" -cf - . | gzip -6 > \"$2\"",
                "sh",
                "/t",
                "/o.tgz"
            ]
        );
    }
}
