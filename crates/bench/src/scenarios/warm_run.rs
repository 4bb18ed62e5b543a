//! Warm run (issue 5 scenario 2): the image under test started again once
//! everything is local. The baseline is containerd with the image already
//! pulled (its overlayfs snapshot); Darter runs on a fresh overlay over a
//! mount that stays up with a warm chunk cache, and, for the case of a
//! node whose mounts went away, on a new mount of the same warm cache.

use std::time::Instant;

use crate::containerd::{Containerd, Rootfs};
use crate::model::{Aim, Samples, ScenarioReport, Table, Unit, Verdict, show_samples};
use crate::netbed::LinkRate;
use crate::scenario::{Bench, Variant, alternate};
use crate::testbed::{ClientMount, ImageScenario, Overlay, Testbed, seconds};

/// Darter's warm start may take this many times containerd's.
const AIM_RATIO: f64 = 1.2;
/// The link stays shaped: a warm start should not use it at all.
const RATE: LinkRate = LinkRate::mbit(1000);

/// One warm start.
#[derive(Debug, Clone, Copy)]
struct Start {
    /// To the first line of output.
    first_output: f64,
    /// What the registry's end of the link sent meanwhile.
    wire_bytes: u64,
}

/// Runs the scenario.
pub fn run(scenario: &ImageScenario, bench: &Bench) -> anyhow::Result<ScenarioReport> {
    let image = scenario.image;
    let scratch = bench.scratch(scenario.name)?;
    let mut testbed = Testbed::prepare(&bench.darter, image, scratch.path())?;
    testbed.bed.limit(Some(RATE))?;
    let tb = &testbed;
    let containerd = Containerd::start(&tb.bed, scratch.path())?;
    containerd.pull(&tb.oci_ref)?;
    let run_image = || image.start(&containerd, Rootfs::Image(&tb.oci_ref));
    run_image()?;
    let cache = bench.fresh_dir(&scratch, "cache")?;
    let mountpoint = bench.fresh_dir(&scratch, "mnt")?;
    let mount = ClientMount::mount(&tb.bed, &bench.darter, &tb.darter_ref, &mountpoint, &cache)?;
    // Warms the chunk cache and the kernel's caches of the mount.
    let run_on_overlay = |lower: &std::path::Path| -> anyhow::Result<Instant> {
        let overlay = Overlay::mount(lower, &bench.fresh_dir(&scratch, "overlay")?)?;
        image.start(&containerd, Rootfs::Dir(overlay.path()))
    };
    run_on_overlay(mount.path())?;
    let measured = |start: &dyn Fn() -> anyhow::Result<Instant>| -> anyhow::Result<Start> {
        let sent_before = tb.bed.registry_tx_bytes()?;
        let started = Instant::now();
        let first = start()?;
        Ok(Start {
            first_output: seconds(started, first),
            wire_bytes: tb.bed.registry_tx_bytes()? - sent_before,
        })
    };
    let mut variants: Vec<Variant<'_, Start>> = vec![
        Box::new(|| measured(&run_image)),
        Box::new(|| measured(&|| run_on_overlay(mount.path()))),
        Box::new(|| {
            measured(&|| {
                let again = bench.fresh_dir(&scratch, "remnt")?;
                let remount =
                    ClientMount::mount(&tb.bed, &bench.darter, &tb.darter_ref, &again, &cache)?;
                let first = run_on_overlay(remount.path())?;
                remount.unmount()?;
                Ok(first)
            })
        }),
    ];
    let runs = alternate(bench.size.runs * 4, &mut variants)?;
    drop(variants);
    mount.unmount()?;
    Ok(report(scenario, &runs))
}

fn report(scenario: &ImageScenario, runs: &[Vec<Start>]) -> ScenarioReport {
    let time = |i: usize| Samples::new(runs[i].iter().map(|s| s.first_output).collect());
    let wire = |i: usize| Samples::new(runs[i].iter().map(|s| s.wire_bytes as f64).collect());
    let baseline = time(0).median();
    let mut r = ScenarioReport::new(scenario.name, scenario.title);
    r.method.push(format!(
        "The same test bed as the cold start, with the link at {RATE}. One containerd (own \
         root, overlayfs snapshotter) has pulled the OCI image and run it once; one \
         `darter mount -d` has run it once on an overlay, which filled its chunk cache. Then, \
         alternating: **containerd** — `ctr run --rm --net-host IMAGE {cmd}` (containerd makes \
         a snapshot per container); **Darter, mounted** — a fresh overlay over the running \
         mount and `ctr run --rm --net-host --rootfs OVERLAY {cmd}`; **Darter, remounted** — \
         a new `darter mount -d` on the same warm chunk cache (as after the mount went away), \
         an overlay and the same `ctr run`, the mount timed too. Timed to the first line the \
         container prints.",
        cmd = scenario.image.command_line()
    ));
    let mut t = Table::new(
        "Warm start to the first line of output (lower is better)",
        &["", "time", "vs containerd", "registry sent"],
    );
    for (i, name) in [
        "containerd, image pulled (overlayfs)",
        "Darter, mounted, warm cache",
        "Darter, remounted on the warm cache",
    ]
    .iter()
    .enumerate()
    {
        t.row(vec![
            (*name).to_owned(),
            show_samples(Unit::Seconds, &time(i)),
            Unit::Ratio.show(time(i).median() / baseline),
            show_samples(Unit::Bytes, &wire(i)),
        ]);
    }
    r.tables.push(t);
    let ratio = time(1).median() / baseline;
    r.aims.push(Aim::new(
        "issue 5",
        "warm run (image already local) within 1.2x of containerd on overlayfs",
        format!(
            "{} ({} vs {})",
            Unit::Ratio.show(ratio),
            Unit::Seconds.show(time(1).median()),
            Unit::Seconds.show(baseline)
        ),
        Verdict::at_most(ratio, AIM_RATIO),
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_compares_each_variant_with_containerd() {
        let starts = |first_output: f64, wire_bytes: u64| {
            vec![
                Start {
                    first_output,
                    wire_bytes
                };
                3
            ]
        };
        let scenario = ImageScenario {
            name: "warm-run",
            title: "t",
            image: &crate::testbed::PYTHON,
            run,
        };
        let r = report(
            &scenario,
            &[starts(0.4, 0), starts(0.46, 0), starts(0.6, 200_000)],
        );
        assert_eq!(r.tables[0].rows[1][2], "1.15x");
        assert_eq!(r.tables[0].rows[2][3], "200 kB [200 kB-200 kB]");
        assert_eq!(r.aims[0].verdict, Verdict::Met);
        let slow = report(&scenario, &[starts(0.4, 0), starts(0.5, 0), starts(0.6, 0)]);
        assert_eq!(slow.aims[0].verdict, Verdict::NotMet);
    }
}
