//! Python in a chroot of the mount (issue 3): `import json, sqlite3,
//! email, http.client` and `print(1)` with an empty cache against the same
//! tree on local disk, and how many bytes Darter fetched and decompressed
//! compared with the files python opened.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::model::{
    Aim, Bar, Chart, ChartKind, Comparison, Samples, ScenarioReport, Table, Unit, Verdict,
    comparison_table, show_samples,
};
use crate::opened::{OpenedFiles, opened_by};
use crate::scenario::{Bench, Scenario, alternate};
use crate::scenarios::access::{
    BREAKDOWN_METHOD, DaemonUse, WARM_RUNS, baseline_and_setups, breakdown_table, daemon_table,
    peak, setup_samples, with_cold_mount,
};
use crate::tools;

const PYTHON: &str = "/usr/bin/python3";
const IMPORT: &str = "import json, sqlite3, email, http.client";
const PRINT: &str = "print(1)";
/// Python must not write `__pycache__` into the fixture (the mount is
/// read-only anyway): both sides run the same way.
const ENV: &[(&str, &str)] = &[("PYTHONDONTWRITEBYTECODE", "1")];
/// The cold import may take this much longer than native.
const IMPORT_AIM_RATIO: f64 = 1.5;
/// Darter may decompress this many times the bytes of the files opened.
const DECOMPRESS_AIM_RATIO: f64 = 2.0;

#[derive(Debug)]
pub struct Python;

struct Round {
    import_cold: f64,
    import_warm: f64,
    print_cold: f64,
    /// Darter only: the daemon after the cold import, and after print(1).
    import_daemon: Option<DaemonUse>,
    print_daemon: Option<DaemonUse>,
}

/// `chroot ROOT python3 -c CODE`, timed; checks what it printed.
fn run_python(root: &Path, code: &str, expected: &str) -> anyhow::Result<f64> {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .arg(PYTHON)
        .args(["-c", code])
        .envs(ENV.iter().copied());
    let timed = tools::timed(&mut cmd)?;
    let printed = String::from_utf8_lossy(&timed.stdout);
    if printed != expected {
        bail!(
            "python3 -c {code:?} in {} printed {printed:?}",
            root.display()
        );
    }
    Ok(timed.wall.as_secs_f64())
}

/// Cold import, warm imports, cold print(1); `fresh` makes a cold root
/// (and returns what its daemon did) for each of the two cold runs.
fn round(
    mut fresh: impl FnMut(
        &mut dyn FnMut(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<DaemonUse>>,
) -> anyhow::Result<Round> {
    let (mut import_cold, mut warm) = (0.0, Vec::new());
    let import_daemon = fresh(&mut |root| {
        import_cold = run_python(root, IMPORT, "")?;
        for _ in 0..WARM_RUNS {
            warm.push(run_python(root, IMPORT, "")?);
        }
        Ok(())
    })?;
    let mut print_cold = 0.0;
    let print_daemon = fresh(&mut |root| {
        print_cold = run_python(root, PRINT, "1\n")?;
        Ok(())
    })?;
    Ok(Round {
        import_cold,
        import_warm: Samples::new(warm).median(),
        print_cold,
        import_daemon,
        print_daemon,
    })
}

impl Scenario for Python {
    fn name(&self) -> &'static str {
        "python"
    }

    fn title(&self) -> &'static str {
        "Python in a chroot of the mount, empty cache (issue 3)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let rootfs = bench.python_rootfs()?;
        let image = bench.python_image()?;
        let scratch = bench.scratch("python")?;
        let import_opened = opened_by(&rootfs, PYTHON, &["-c", IMPORT], ENV, scratch.path())?;
        let print_opened = opened_by(&rootfs, PYTHON, &["-c", PRINT], ENV, scratch.path())?;
        let bench = &*bench;
        let mut variants = baseline_and_setups(
            Box::new(|| {
                round(|work| {
                    tools::drop_caches()?;
                    work(&rootfs)?;
                    Ok(None)
                })
            }),
            |setup| {
                let (image, scratch) = (&image, &scratch);
                Box::new(move || {
                    round(|work| {
                        // The warm runs are served by the kernel's caches:
                        // the counters are the cold run's.
                        let ((), daemon) =
                            with_cold_mount(bench, image, scratch, setup, |mount| {
                                work(mount.path())
                            })?;
                        Ok(Some(daemon))
                    })
                })
            },
        );
        // Python runs are short and their cold times noisy: twice the rounds.
        let runs = alternate(bench.size.runs * 2, &mut variants)?;
        drop(variants);
        Ok(report(self, &runs, &import_opened, &print_opened))
    }
}

fn report(
    scenario: &Python,
    runs: &[Vec<Round>],
    import_opened: &OpenedFiles,
    print_opened: &OpenedFiles,
) -> ScenarioReport {
    let (native, darter) = (&runs[0], &runs[1]);
    let samples =
        |rounds: &[Round], f: fn(&Round) -> f64| Samples::new(rounds.iter().map(f).collect());
    let compare = |what: &str, f: fn(&Round) -> f64| {
        Comparison::new(what, Unit::Seconds, samples(native, f), samples(darter, f))
    };
    let import_cold = compare(&format!("`{IMPORT}`, cold"), |r| r.import_cold);
    let import_warm = compare(&format!("`{IMPORT}`, warm"), |r| r.import_warm);
    let print_cold = compare(&format!("`{PRINT}`, cold"), |r| r.print_cold);
    let import_uses: Vec<DaemonUse> = darter.iter().filter_map(|r| r.import_daemon).collect();
    let print_uses: Vec<DaemonUse> = darter.iter().filter_map(|r| r.print_daemon).collect();

    let mut r = ScenarioReport::new(scenario.name(), scenario.title());
    r.method.push(format!(
        "`chroot ROOT {PYTHON} -c CODE` with `PYTHONDONTWRITEBYTECODE=1`, where ROOT is the \
         Debian python tree on local disk or a fresh `darter mount -d` of its image with an \
         empty chunk cache. Cold: page cache dropped first (for Darter, before mounting: the \
         daemon runs and has the image's metadata, no file data is in memory); warm: the \
         median of {WARM_RUNS} runs right after. The files python opens are taken from \
         `strace -f -y -e trace=openat` of the native run, plus the interpreter and its ELF loader (opened by the kernel)."
    ));
    r.method.push(BREAKDOWN_METHOD.to_owned());
    r.tables.push(comparison_table(
        "Wall time (lower is better)",
        "local disk",
        &[import_cold.clone(), import_warm, print_cold],
    ));
    let setups = setup_samples(
        &runs[1..],
        |r| r.import_cold,
        |r| r.import_daemon.map(|d| d.cpu_seconds),
    );
    r.tables.push(breakdown_table(
        &format!("Cold `{IMPORT}`: where Darter's extra time goes"),
        &import_cold.baseline,
        &setups,
    ));
    r.tables.push(daemon_table(
        "What the Darter daemon did (per round, cold run)",
        &[(IMPORT, import_uses.clone()), (PRINT, print_uses.clone())],
    ));
    let decompressed = Samples::new(
        import_uses
            .iter()
            .map(|u| u.stats.decompressed_bytes as f64)
            .collect(),
    );
    let fetched_print = Samples::new(
        print_uses
            .iter()
            .map(|u| u.stats.backend_bytes as f64)
            .collect(),
    );
    let image_bytes = print_uses
        .first()
        .map_or(f64::NAN, |u| u.stats.image_bytes as f64);
    let mut bytes = Table::new(
        "Bytes: files opened vs what Darter decompressed and fetched",
        &[
            "program",
            "files opened",
            "their size",
            "Darter decompressed",
            "Darter fetched",
            "fetched / image",
        ],
    );
    let fetched_import = Samples::new(
        import_uses
            .iter()
            .map(|u| u.stats.backend_bytes as f64)
            .collect(),
    );
    for (code, opened, decompressed, fetched) in [
        (IMPORT, import_opened, decompressed.clone(), fetched_import),
        (
            PRINT,
            print_opened,
            Samples::new(
                print_uses
                    .iter()
                    .map(|u| u.stats.decompressed_bytes as f64)
                    .collect(),
            ),
            fetched_print.clone(),
        ),
    ] {
        bytes.row(vec![
            format!("`{code}`"),
            opened.files.len().to_string(),
            Unit::Bytes.show(opened.bytes as f64),
            show_samples(Unit::Bytes, &decompressed),
            show_samples(Unit::Bytes, &fetched),
            format!("{:.1}%", 100.0 * fetched.median() / image_bytes),
        ]);
    }
    r.tables.push(bytes);
    r.daemon_peaks
        .push(peak("cold python import", &import_uses));
    let decompress_ratio = decompressed.median() / import_opened.bytes as f64;
    r.charts.push(Chart {
        file: "python.png".into(),
        title: "Python in a chroot, cold (ms)".into(),
        kind: ChartKind::Bars {
            value_label: "ms".into(),
            bars: vec![
                time_bar("import: local disk", &import_cold.baseline, false),
                time_bar("import: Darter, empty cache", &import_cold.darter, true),
            ],
            reference: Some((
                import_cold.baseline.median() * 1e3 * IMPORT_AIM_RATIO,
                "aim: 1.5x local disk".into(),
            )),
        },
    });
    r.aims.push(Aim::new(
        "issue 3",
        "cold python import (empty cache) within 1.5x native",
        format!(
            "{} ({} vs {})",
            Unit::Ratio.show(import_cold.ratio()),
            Unit::Seconds.show(import_cold.darter.median()),
            Unit::Seconds.show(import_cold.baseline.median())
        ),
        Verdict::at_most(import_cold.ratio(), IMPORT_AIM_RATIO),
    ));
    r.aims.push(Aim::new(
        "issue 3",
        "decompress at most twice the bytes of the files python opens",
        format!(
            "{} ({} for {} of files)",
            Unit::Ratio.show(decompress_ratio),
            Unit::Bytes.show(decompressed.median()),
            Unit::Bytes.show(import_opened.bytes as f64)
        ),
        Verdict::at_most(decompress_ratio, DECOMPRESS_AIM_RATIO),
    ));
    r.notes.push(format!(
        "`{PRINT}` with an empty cache fetched {} of the {} image ({:.1}%). For scale \
         (issue 3): Nydus 2.4 takes 2.9x native for the cold import and decompresses 66 MB of \
         chunks for 10 MB of files.",
        Unit::Bytes.show(fetched_print.median()),
        Unit::Bytes.show(image_bytes),
        100.0 * fetched_print.median() / image_bytes
    ));
    r
}

fn time_bar(label: &str, s: &Samples, darter: bool) -> Bar {
    Bar {
        label: label.to_owned(),
        value: s.median() * 1e3,
        darter,
    }
}
