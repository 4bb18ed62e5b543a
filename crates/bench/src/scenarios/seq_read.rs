//! Sequential read of one large file of random bytes (issue 3): a fresh
//! Darter mount with an empty cache against the same file on local disk,
//! cold and warm.

use std::path::Path;

use crate::inputs::RANDOM_FILE;
use crate::model::{
    Aim, Bar, Chart, ChartKind, Comparison, Samples, ScenarioReport, Unit, Verdict,
    comparison_table,
};
use crate::scenario::{Bench, Scenario, alternate};
use crate::scenarios::access::{
    BREAKDOWN_METHOD, ColdWarm, DaemonUse, Op, SETTLE_METHOD, WARM_RUNS, baseline_and_setups,
    breakdown_table, cold_samples, cold_then_warm, daemon_table, native_cold_then_warm, peak,
    same_amount, setup_samples, warm_samples, with_cold_mount,
};

/// Warm sequential read aim, bytes per second.
const WARM_READ_AIM: f64 = 2.5e9;

#[derive(Debug)]
pub struct SeqRead;

struct Round {
    read: ColdWarm,
    daemon: Option<DaemonUse>,
}

impl Scenario for SeqRead {
    fn name(&self) -> &'static str {
        "seq-read"
    }

    fn title(&self) -> &'static str {
        "Sequential read of a large random file (issue 3)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let (tree, image) = bench.random_image()?;
        let scratch = bench.scratch("seq-read")?;
        let file = Path::new(RANDOM_FILE);
        let bench = &*bench;
        let mut variants = baseline_and_setups(
            Box::new(|| {
                Ok(Round {
                    read: native_cold_then_warm(Op::ReadFile(file), &tree)?,
                    daemon: None,
                })
            }),
            |setup| {
                let (image, scratch) = (&image, &scratch);
                Box::new(move || {
                    let (read, daemon) = with_cold_mount(bench, image, scratch, setup, |mount| {
                        cold_then_warm(Op::ReadFile(file), mount.path(), || mount.settle())
                    })?;
                    Ok(Round {
                        read,
                        daemon: Some(daemon),
                    })
                })
            },
        );
        let runs = alternate(bench.size.runs, &mut variants)?;
        drop(variants);
        report(self, bench.size.random_file_bytes, &runs)
    }
}

fn report(scenario: &SeqRead, bytes: u64, runs: &[Vec<Round>]) -> anyhow::Result<ScenarioReport> {
    let (native, darter) = (&runs[0], &runs[1]);
    for (n, d) in runs[1..].iter().flat_map(|v| native.iter().zip(v)) {
        same_amount("sequential read", &n.read, &d.read)?;
    }
    let rate = |s: Samples| Samples::new(s.values.iter().map(|t| bytes as f64 / t).collect());
    let reads = |rounds: &[Round]| rounds.iter().map(|r| r.read.clone()).collect::<Vec<_>>();
    let (native_reads, darter_reads) = (reads(native), reads(darter));
    let native_refs: Vec<&ColdWarm> = native_reads.iter().collect();
    let darter_refs: Vec<&ColdWarm> = darter_reads.iter().collect();
    let cold = Comparison::new(
        "cold read (page cache dropped; Darter: fresh mount, empty cache)",
        Unit::BytesPerSecond,
        rate(cold_samples(&native_refs)),
        rate(cold_samples(&darter_refs)),
    );
    let warm = Comparison::new(
        format!("warm read (median of {WARM_RUNS} reads per round)"),
        Unit::BytesPerSecond,
        rate(warm_samples(&native_refs)),
        rate(warm_samples(&darter_refs)),
    );
    let mut r = ScenarioReport::new(scenario.name(), scenario.title());
    r.method.push(format!(
        "A Darter image of one {} file of random bytes (stored uncompressed: it does not \
         shrink), read start to end with 1 MiB `read` calls, against the same file on the \
         local ext4 disk. Each round: drop the page cache (for Darter: then mount afresh with an \
         empty chunk cache), read once (cold), read {WARM_RUNS} more times (warm).",
        Unit::Bytes.show(bytes as f64)
    ));
    r.method.push(SETTLE_METHOD.to_owned());
    r.method.push(BREAKDOWN_METHOD.to_owned());
    r.tables.push(comparison_table(
        "Throughput (higher is better)",
        "local disk",
        &[cold.clone(), warm.clone()],
    ));
    let setups = setup_samples(
        &runs[1..],
        |r| r.read.cold,
        |r| r.daemon.map(|d| d.cpu_seconds),
    );
    let native_cold = Samples::new(native.iter().map(|r| r.read.cold).collect());
    r.tables.push(breakdown_table(
        "Cold read: where Darter's extra time goes",
        &native_cold,
        &setups,
    ));
    let uses: Vec<DaemonUse> = darter.iter().filter_map(|r| r.daemon).collect();
    r.tables.push(daemon_table(
        "What the Darter daemon did (per round, after the cold and warm reads)",
        &[("cold + warm reads", uses.clone())],
    ));
    r.daemon_peaks
        .push(peak("sequential reads of the random file", &uses));
    r.charts.push(Chart {
        file: "seq-read.png".into(),
        title: format!(
            "Sequential read of a {} file (GB/s)",
            Unit::Bytes.show(bytes as f64)
        ),
        kind: ChartKind::Bars {
            value_label: "GB/s".into(),
            bars: vec![
                bar("local disk, cold", &cold.baseline, false),
                bar("Darter, cold (empty cache)", &cold.darter, true),
                bar("local disk, warm", &warm.baseline, false),
                bar("Darter, warm", &warm.darter, true),
            ],
            reference: Some((WARM_READ_AIM / 1e9, "aim: 2.5 GB/s warm".into())),
        },
    });
    let warm_darter = warm.darter.median();
    r.aims.push(Aim::new(
        "issue 3",
        "warm sequential read at least 2.5 GB/s",
        format!(
            "{} ({} of local disk)",
            Unit::BytesPerSecond.show(warm_darter),
            Unit::Ratio.show(warm.ratio())
        ),
        Verdict::at_least(warm_darter, WARM_READ_AIM),
    ));
    Ok(r)
}

fn bar(label: &str, s: &Samples, darter: bool) -> Bar {
    Bar {
        label: label.to_owned(),
        value: s.median() / 1e9,
        darter,
    }
}
