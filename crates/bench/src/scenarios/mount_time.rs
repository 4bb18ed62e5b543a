//! Mount time (issue 3): from the exec of `darter mount` to the first
//! request the mount answers, for `-d` and in the foreground, with the
//! page cache warm and dropped; and the idle daemon's memory.

use crate::model::{
    Aim, Bar, Chart, ChartKind, DaemonPeak, Samples, ScenarioReport, Table, Unit, Verdict,
    show_samples,
};
use crate::scenario::{Bench, MountMode, Scenario, Variant, alternate};
use crate::tools;

/// Mount time aim, seconds.
const MOUNT_AIM: f64 = 0.050;

#[derive(Debug)]
pub struct MountTime;

/// One mount: seconds to serving, to the `-d` command's return, and the
/// daemon's peak memory right after.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    to_serving: f64,
    to_return: f64,
    peak_rss: u64,
}

impl Scenario for MountTime {
    fn name(&self) -> &'static str {
        "mount"
    }

    fn title(&self) -> &'static str {
        "Mount time (issue 3)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let image = bench.python_image()?;
        let scratch = bench.scratch("mount")?;
        let bench = &*bench;
        let daemon_mount = |drop_caches: bool| -> anyhow::Result<Sample> {
            if drop_caches {
                tools::drop_caches()?;
            }
            let (mount, timing) =
                bench.fresh_mount(&image.reference, &scratch, MountMode::Daemon, None)?;
            let peak_rss = mount.peak_rss()?;
            mount.unmount()?;
            Ok(Sample {
                to_serving: timing.to_serving.as_secs_f64(),
                to_return: timing.to_return.map_or(f64::NAN, |d| d.as_secs_f64()),
                peak_rss,
            })
        };
        let mut variants: Vec<Variant<'_, Sample>> = vec![
            Box::new(|| daemon_mount(false)),
            Box::new(|| daemon_mount(true)),
            Box::new(|| {
                let (mount, timing) =
                    bench.fresh_mount(&image.reference, &scratch, MountMode::Foreground, None)?;
                mount.unmount()?;
                Ok(Sample {
                    to_serving: timing.to_serving.as_secs_f64(),
                    to_return: f64::NAN,
                    peak_rss: 0,
                })
            }),
            Box::new(|| {
                let mut version = bench.darter.command();
                version.arg("--version");
                let wall = tools::timed(&mut version)?.wall.as_secs_f64();
                Ok(Sample {
                    to_serving: wall,
                    to_return: wall,
                    peak_rss: 0,
                })
            }),
        ];
        // Mounts are quick: more rounds for steadier medians.
        let rounds = (bench.size.runs * 2).max(6);
        let runs = alternate(rounds, &mut variants)?;
        drop(variants);
        Ok(report(self, &runs))
    }
}

fn report(scenario: &MountTime, runs: &[Vec<Sample>]) -> ScenarioReport {
    let column = |v: &[Sample], f: fn(&Sample) -> f64| Samples::new(v.iter().map(f).collect());
    let labels = [
        "`darter mount -d`, page cache warm",
        "`darter mount -d`, page cache dropped",
        "`darter mount` (foreground), page cache warm",
        "process start floor: `darter --version`",
    ];
    let mut table = Table::new(
        "Mount time (lower is better)",
        &[
            "mount",
            "exec to first answered request",
            "exec to `-d` returning",
        ],
    );
    let mut bars = Vec::new();
    for (i, (label, samples)) in labels.iter().zip(runs).enumerate() {
        let serving = column(samples, |s| s.to_serving);
        let returned = column(samples, |s| s.to_return);
        table.row(vec![
            (*label).to_owned(),
            show_samples(Unit::Seconds, &serving),
            if returned.median().is_nan() {
                "-".to_owned()
            } else {
                show_samples(Unit::Seconds, &returned)
            },
        ]);
        bars.push(Bar {
            label: label.replace('`', ""),
            value: serving.median() * 1e3,
            darter: i < 3,
        });
    }
    let mut r = ScenarioReport::new(scenario.name(), scenario.title());
    r.method.push(
        "Each round mounts the python image at a new mountpoint with a new empty cache \
         directory and unmounts it again. \"First answered request\": a thread of the harness \
         polls `statfs(2)` on the mountpoint every 0.2 ms from just before the exec; the first \
         answer with the FUSE magic number comes from the daemon, so it serves from then on. \
         `darter mount -d` itself returns once the daemon answers on its API socket (it polls \
         every 20 ms)."
            .to_owned(),
    );
    r.tables.push(table);
    r.charts.push(Chart {
        file: "mount.png".into(),
        title: "Mount time: exec to serving (ms)".into(),
        kind: ChartKind::Bars {
            value_label: "ms".into(),
            bars,
            reference: Some((MOUNT_AIM * 1e3, "aim: 50 ms".into())),
        },
    });
    let detached = column(&runs[0], |s| s.to_serving);
    r.aims.push(Aim::new(
        "issue 3",
        "mount time (exec of `darter mount -d` to serving) under 50 ms",
        Unit::Seconds.show(detached.median()),
        Verdict::at_most(detached.median(), MOUNT_AIM),
    ));
    r.daemon_peaks.push(DaemonPeak {
        operation: "mounting (idle)".into(),
        vm_hwm: column(&runs[0], |s| s.peak_rss as f64),
        on_python_image: true,
    });
    r.notes
        .push("For scale (issue 3): Nydus 2.4 takes 34 ms to mount.".to_owned());
    r
}
