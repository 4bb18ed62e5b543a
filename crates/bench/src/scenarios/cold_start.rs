//! Cold start over a rate-limited link (issue 4, and issue 5 scenario 1):
//! a container of the image under test, from nothing local, with the
//! registry behind a 100 Mbit/s or 1 Gbit/s link. The baseline is a fresh
//! containerd pulling the plain OCI image and running it; Darter mounts
//! the converted image lazily and containerd runs the container on an
//! overlay over the mount; and Darter through containerd: `darter pull`
//! into a containerd whose `darter snapshotter` mounts the image lazily,
//! then `ctr run --snapshotter darter`. All are timed to the container's
//! first line of output, and the registry's end of the link counts what
//! was sent.

use std::time::{Duration, Instant};

use crate::containerd::{Containerd, DARTER_SNAPSHOTTER, DarterSnapshotter, Rootfs};
use crate::model::{
    Aim, Bar, Chart, ChartKind, DaemonPeak, Samples, ScenarioReport, Table, Unit, Verdict,
    show_samples,
};
use crate::mount::MountStats;
use crate::netbed::LinkRate;
use crate::scenario::{Bench, Variant, alternate};
use crate::testbed::{
    ClientMount, ImageScenario, LargeImageAims, OpenedWeight, Overlay, Testbed, opened_weight,
    seconds,
};
use crate::tools;

/// Darter's time to first output may be this many times the floor.
const FLOOR_AIM_RATIO: f64 = 1.5;
/// Darter may fetch this many times the compressed bytes of the files the
/// workload opens.
const FETCH_AIM_RATIO: f64 = 1.5;
/// The rate the floor aim is checked at.
const AIM_RATE: LinkRate = LinkRate::mbit(100);
/// Requests that must follow one another before the first chunk can be
/// asked for: manifest, bootstrap, chunk table.
const METADATA_ROUND_TRIPS: u32 = 3;

/// One side's cold start in one round.
#[derive(Debug, Clone)]
struct Round {
    /// From the start of the pull (or mount) to the first line printed.
    first_output: f64,
    /// Consecutive phases that add up to `first_output`.
    phases: Vec<(&'static str, f64)>,
    /// The same container once more right after, with everything local:
    /// what starting the container itself costs.
    warm_run: f64,
    /// What the registry's end of the link sent.
    wire_bytes: u64,
    /// Requests the registry answered (its access log), the warm run's
    /// included: it needs none.
    registry_requests: u64,
    /// Darter only: its counters right after mounting, and at the end.
    darter: Option<(MountStats, MountStats)>,
    /// Darter only: the daemon's peak resident memory (VmHWM) at the end.
    daemon_peak_rss: u64,
}

/// The rounds at one link rate.
#[derive(Debug)]
struct AtRate {
    rate: LinkRate,
    round_trip: Duration,
    baseline: Vec<Round>,
    darter: Vec<Round>,
    /// Darter through containerd and the Darter snapshotter.
    snapshotter: Vec<Round>,
}

/// Runs the scenario: both link rates (1 Gbit/s only with `--quick`).
pub fn run(scenario: &ImageScenario, bench: &Bench) -> anyhow::Result<ScenarioReport> {
    let scratch = bench.scratch(scenario.name)?;
    let opened = opened_weight(scenario.image, &bench.fresh_dir(&scratch, "opened")?)?;
    let mut testbed = Testbed::prepare(&bench.darter, scenario.image, scratch.path())?;
    let rates: &[LinkRate] = if bench.size.quick {
        &[LinkRate::mbit(1000)]
    } else {
        &[LinkRate::mbit(100), LinkRate::mbit(1000)]
    };
    let mut results = Vec::new();
    for &rate in rates {
        testbed.bed.limit(Some(rate))?;
        let round_trip = testbed.bed.round_trip()?;
        tracing::info!(%rate, ?round_trip, "cold starts");
        let tb = &testbed;
        let mut variants: Vec<Variant<'_, Round>> = vec![
            Box::new(|| containerd_round(bench, tb)),
            Box::new(|| darter_round(bench, tb)),
            Box::new(|| snapshotter_round(bench, tb)),
        ];
        let mut runs = alternate(bench.size.runs, &mut variants)?.into_iter();
        drop(variants);
        let (baseline, darter, snapshotter) = (
            runs.next().unwrap_or_default(),
            runs.next().unwrap_or_default(),
            runs.next().unwrap_or_default(),
        );
        results.push(AtRate {
            rate,
            round_trip,
            baseline,
            darter,
            snapshotter,
        });
    }
    Ok(report(scenario, &testbed, &opened, &results))
}

/// A fresh containerd pulls the OCI image and runs the workload. The pull
/// is two commands, download then unpack (what `ctr image pull` does in
/// turn anyway), so that the report can tell network from disk.
fn containerd_round(bench: &Bench, tb: &Testbed) -> anyhow::Result<Round> {
    let scratch = bench.scratch("cold-containerd")?;
    let containerd = Containerd::start(&tb.bed, scratch.path())?;
    let image = tb.image;
    let sent_before = tb.bed.registry_tx_bytes()?;
    let requests_before = tb.bed.registry_requests();
    let started = Instant::now();
    containerd.fetch(&tb.oci_ref)?;
    let fetched = Instant::now();
    containerd.pull(&tb.oci_ref)?;
    let pulled = Instant::now();
    let first = image.start(&containerd, Rootfs::Image(&tb.oci_ref))?;
    let wire_bytes = tb.bed.registry_tx_bytes()? - sent_before;
    let again = Instant::now();
    let warm = image.start(&containerd, Rootfs::Image(&tb.oci_ref))?;
    let registry_requests = tb.bed.registry_requests() - requests_before;
    Ok(Round {
        first_output: seconds(started, first),
        phases: vec![
            ("ctr content fetch (download)", seconds(started, fetched)),
            (
                "ctr image pull of the fetched image (unpack)",
                seconds(fetched, pulled),
            ),
            ("ctr run, to the first line", seconds(pulled, first)),
        ],
        warm_run: seconds(again, warm),
        wire_bytes,
        registry_requests,
        darter: None,
        daemon_peak_rss: 0,
    })
}

/// `darter mount` with an empty cache, an overlay over it, and a fresh
/// containerd running the workload on the overlay. The time `darter stats`
/// takes after mounting is left out.
fn darter_round(bench: &Bench, tb: &Testbed) -> anyhow::Result<Round> {
    let scratch = bench.scratch("cold-darter")?;
    // Its own temp dir below the scratch: unix socket paths are short.
    let containerd = Containerd::start(&tb.bed, scratch.path())?;
    let mountpoint = bench.fresh_dir(&scratch, "mnt")?;
    let cache = bench.fresh_dir(&scratch, "cache")?;
    let overlay_dir = bench.fresh_dir(&scratch, "overlay")?;
    let image = tb.image;
    let sent_before = tb.bed.registry_tx_bytes()?;
    let requests_before = tb.bed.registry_requests();
    let started = Instant::now();
    let mount = ClientMount::mount(&tb.bed, &bench.darter, &tb.darter_ref, &mountpoint, &cache)?;
    let mounted = Instant::now();
    let at_mount = mount.stats()?;
    let resumed = Instant::now();
    let overlay = Overlay::mount(mount.path(), &overlay_dir)?;
    let overlaid = Instant::now();
    let first = image.start(&containerd, Rootfs::Dir(overlay.path()))?;
    let at_end = mount.stats()?;
    let wire_bytes = tb.bed.registry_tx_bytes()? - sent_before;
    let again = Instant::now();
    let warm = image.start(&containerd, Rootfs::Dir(overlay.path()))?;
    let registry_requests = tb.bed.registry_requests() - requests_before;
    let phases = vec![
        ("darter mount -d", seconds(started, mounted)),
        ("overlay mount", seconds(resumed, overlaid)),
        (
            "ctr run --rootfs, to the first line",
            seconds(overlaid, first),
        ),
    ];
    let round = darter_side(
        phases,
        seconds(again, warm),
        (wire_bytes, registry_requests),
        (at_mount, at_end),
    )?;
    drop(overlay);
    mount.unmount()?;
    Ok(round)
}

/// A round of a Darter side, whose phases add up to the first output,
/// with its wire bytes and registry requests, and the mount's counters
/// after mounting and at the end (its daemon still running).
fn darter_side(
    phases: Vec<(&'static str, f64)>,
    warm_run: f64,
    (wire_bytes, registry_requests): (u64, u64),
    counters: (MountStats, MountStats),
) -> anyhow::Result<Round> {
    Ok(Round {
        first_output: phases.iter().map(|(_, s)| s).sum(),
        phases,
        warm_run,
        wire_bytes,
        registry_requests,
        darter: Some(counters),
        daemon_peak_rss: tools::peak_rss(counters.1.pid)?,
    })
}

/// A fresh `darter snapshotter` (empty chunk cache) and a fresh containerd
/// with it as a proxy plugin: `darter pull` of the Darter image (nothing
/// downloaded; the snapshotter mounts it lazily), then `ctr run
/// --snapshotter darter`. Starting the two is left out, as containerd's
/// start is on the baseline's side.
fn snapshotter_round(bench: &Bench, tb: &Testbed) -> anyhow::Result<Round> {
    let scratch = bench.scratch("cold-snapshotter")?;
    let snapshotter = DarterSnapshotter::start(
        &tb.bed,
        &bench.darter,
        &bench.fresh_dir(&scratch, "snapshotter")?,
    )?;
    let containerd =
        Containerd::start_with_snapshotter(&tb.bed, scratch.path(), Some(&snapshotter.socket()))?;
    let image = tb.image;
    // containerd's name for it: `darter pull` drops the transport.
    let name = tb
        .darter_ref
        .strip_prefix("docker://")
        .unwrap_or(&tb.darter_ref);
    let mut pull = bench.darter.command();
    pull.args(["--plain-http", "pull", &tb.darter_ref, "--address"])
        .arg(containerd.socket())
        .args(["--namespace", darter_testkit::containerd::NAMESPACE])
        .args(["--snapshotter", DARTER_SNAPSHOTTER]);
    let sent_before = tb.bed.registry_tx_bytes()?;
    let requests_before = tb.bed.registry_requests();
    let started = Instant::now();
    tools::output(&mut tb.bed.client(&pull))?;
    let pulled = Instant::now();
    let at_pull = snapshotter.lazy_mount_stats()?;
    let resumed = Instant::now();
    let first = image.start(&containerd, Rootfs::DarterImage(name))?;
    let at_end = snapshotter.lazy_mount_stats()?;
    let wire_bytes = tb.bed.registry_tx_bytes()? - sent_before;
    let again = Instant::now();
    let warm = image.start(&containerd, Rootfs::DarterImage(name))?;
    let registry_requests = tb.bed.registry_requests() - requests_before;
    let phases = vec![
        (
            "darter pull (the snapshotter mounts it lazily)",
            seconds(started, pulled),
        ),
        (
            "ctr run --snapshotter darter, to the first line",
            seconds(resumed, first),
        ),
    ];
    let round = darter_side(
        phases,
        seconds(again, warm),
        (wire_bytes, registry_requests),
        (at_pull, at_end),
    )?;
    // As a node would: the snapshotter unmounts, its daemon exits.
    containerd.remove_image(name)?;
    drop(containerd);
    drop(snapshotter);
    Ok(round)
}

/// The least time the bytes Darter fetched need on the link: their
/// transfer at the link rate plus the metadata requests that cannot
/// overlap (manifest, bootstrap, chunk table).
fn floor_seconds(fetched_bytes: u64, rate: LinkRate, round_trip: Duration) -> f64 {
    rate.transfer_seconds(fetched_bytes as f64)
        + f64::from(METADATA_ROUND_TRIPS) * round_trip.as_secs_f64()
}

fn samples(rounds: &[Round], f: impl Fn(&Round) -> f64) -> Samples {
    Samples::new(rounds.iter().map(f).collect())
}

/// Darter's counters at the end of each round.
fn darter_totals(rounds: &[Round]) -> Vec<MountStats> {
    rounds
        .iter()
        .filter_map(|r| r.darter.map(|(_, end)| end))
        .collect()
}

impl AtRate {
    /// The floor of each Darter round.
    fn floors(&self) -> Samples {
        samples(&self.darter, |r| self.floor_of(r))
    }

    /// The floor of each Darter round plus starting its container with
    /// everything local.
    fn floors_and_starts(&self) -> Samples {
        samples(&self.darter, |r| self.floor_of(r) + r.warm_run)
    }

    fn floor_of(&self, round: &Round) -> f64 {
        let fetched = round.darter.map_or(0, |(_, end)| end.backend_bytes);
        floor_seconds(fetched, self.rate, self.round_trip)
    }

    fn darter_over_floor(&self) -> f64 {
        samples(&self.darter, |r| r.first_output).median() / self.floors().median()
    }

    fn darter_over_baseline(&self) -> f64 {
        samples(&self.darter, |r| r.first_output).median()
            / samples(&self.baseline, |r| r.first_output).median()
    }

    fn snapshotter_over_baseline(&self) -> f64 {
        samples(&self.snapshotter, |r| r.first_output).median()
            / samples(&self.baseline, |r| r.first_output).median()
    }
}

fn report(
    scenario: &ImageScenario,
    testbed: &Testbed,
    opened: &OpenedWeight,
    results: &[AtRate],
) -> ScenarioReport {
    let image = testbed.image;
    let mut r = ScenarioReport::new(scenario.name, scenario.title);
    r.method.push(format!(
        "Two network namespaces joined by a veth pair, both ends shaped by a TBF qdisc to the \
         link rate; a `docker-registry` serves in one, everything else runs in the other. The \
         image is pushed as plain OCI ({} of gzip layers) and converted registry to registry \
         into a Darter image ({}) before anything is timed. Each round, alternating: \
         **containerd** — a fresh containerd (own root, overlayfs snapshotter), \
         `ctr content fetch --plain-http` then `ctr image pull --plain-http` (download, then \
         unpack: what one `ctr image pull` does in turn), then \
         `ctr run --rm --net-host IMAGE {cmd}`; \
         **Darter** — `darter mount -d --plain-http` with an empty chunk cache, an overlay \
         (lower: the mount) and `ctr run --rm --net-host --rootfs OVERLAY {cmd}` on a fresh \
         containerd; **Darter snapshotter** — a fresh `darter snapshotter --plain-http` (empty \
         chunk cache) as containerd's proxy plugin `darter`, `darter pull --plain-http` of the \
         Darter image (nothing downloaded: the snapshotter mounts it lazily) and \
         `ctr run --rm --net-host --snapshotter darter IMAGE {cmd}`. All are timed from the start \
         of the pull (mount) to the first line the container prints; containerd and the \
         snapshotter are started (and answering) before that.",
        Unit::Bytes.show(testbed.oci_layer_bytes as f64),
        Unit::Bytes.show(testbed.darter_image_bytes as f64),
        cmd = image.command_line(),
    ));
    r.method.push(format!(
        "Bytes: the registry's veth tx counter (Ethernet, IP, TCP and HTTP overhead included) \
         and Darter's own `backend_bytes`/`backend_requests` (blob reads only). Requests: \
         every `/v2/` request in the registry's access log during the round (pings, tokens, \
         manifests, blobs), the same count for both sides. Floor: the bytes Darter fetched \
         at the link rate, plus {METADATA_ROUND_TRIPS} round trips (manifest, bootstrap, \
         chunk table: they cannot overlap) of a TCP connect between the namespaces; the aim is \
         checked against it. The floor does not include starting the container, which no \
         image format saves: the column after adds the Darter side's second, all-local run \
         of the same container. The link has no added latency (this kernel has no netem); \
         the TBF queue holds up to 50 ms."
    ));
    let all_darter: Vec<Round> = results.iter().flat_map(|a| a.darter.clone()).collect();
    r.daemon_peaks.push(DaemonPeak {
        operation: format!("cold start of `{}`, both link rates", image.command_line()),
        vm_hwm: samples(&all_darter, |r| r.daemon_peak_rss as f64),
        on_python_image: image.large_image_aims.is_none(),
    });
    r.tables.push(time_table(results));
    r.tables.push(bytes_table(results, testbed));
    r.tables.push(breakdown_table(results));
    r.charts.push(chart(scenario, results));
    let at_aim_rate = results.iter().find(|a| a.rate == AIM_RATE);
    let (floor_ratio, floor_measured) = match at_aim_rate {
        Some(a) => (
            a.darter_over_floor(),
            format!(
                "{} ({} vs a floor of {})",
                Unit::Ratio.show(a.darter_over_floor()),
                Unit::Seconds.show(samples(&a.darter, |r| r.first_output).median()),
                Unit::Seconds.show(a.floors().median())
            ),
        ),
        None => (f64::NAN, format!("no run at {AIM_RATE} (--quick)")),
    };
    if let Some(aims) = image.large_image_aims {
        r.aims.extend(large_image_aims(
            aims,
            at_aim_rate,
            &all_fetched(results),
            testbed,
        ));
    }
    r.aims.push(Aim::new(
        image.issue,
        &format!("cold start at {AIM_RATE} within 1.5x of the floor (fetched bytes / link rate)"),
        floor_measured,
        Verdict::at_most(floor_ratio, FLOOR_AIM_RATIO),
    ));
    let fetched = all_fetched(results);
    let fetch_ratio = fetched.median() / opened.zstd_bytes as f64;
    r.aims.push(Aim::new(
        image.issue,
        &format!(
            "fetch at most 1.5x the compressed bytes of the files `{}` opens",
            image.command_line()
        ),
        format!(
            "{} ({} fetched; the {} files opened are {}, about {} compressed — estimated)",
            Unit::Ratio.show(fetch_ratio),
            Unit::Bytes.show(fetched.median()),
            opened.files,
            Unit::Bytes.show(opened.bytes as f64),
            Unit::Bytes.show(opened.zstd_bytes as f64),
        ),
        Verdict::at_most(fetch_ratio, FETCH_AIM_RATIO),
    ));
    r.notes.push(format!(
        "Files opened: `strace -f -e trace=open,openat` of the command chrooted into an overlay \
         of the unpacked image ({} files, {}), plus the interpreter and its ELF loader. Their \
         compressed size is an estimate: Darter images do not list compressed bytes per file, \
         so each file is compressed alone as the builder does by default (zstd level 3, 1 MiB \
         chunks), giving {}.",
        opened.files,
        Unit::Bytes.show(opened.bytes as f64),
        Unit::Bytes.show(opened.zstd_bytes as f64)
    ));
    r.notes.push(
        "For scale (issue 4): containerd pulling and running a python image of 117 MB took \
         12.6 s at 100 Mbit/s; Nydus 2.4 took 1.51 s, fetching 15.8 MB in 18 range requests."
            .to_owned(),
    );
    r
}

/// Darter's `backend_bytes` of every round at every rate.
fn all_fetched(results: &[AtRate]) -> Samples {
    let all_darter: Vec<Round> = results.iter().flat_map(|a| a.darter.clone()).collect();
    Samples::new(
        darter_totals(&all_darter)
            .iter()
            .map(|s| s.backend_bytes as f64)
            .collect(),
    )
}

/// Issue 5's aims for the large image: the speedup over containerd at the
/// aim rate, and the share of the image fetched.
fn large_image_aims(
    aims: LargeImageAims,
    at_aim_rate: Option<&AtRate>,
    fetched: &Samples,
    testbed: &Testbed,
) -> Vec<Aim> {
    let (speedup, measured) = match at_aim_rate {
        Some(a) => {
            let speedup = 1.0 / a.darter_over_baseline();
            (
                speedup,
                format!(
                    "{:.1}x ({} vs {})",
                    speedup,
                    Unit::Seconds.show(samples(&a.darter, |r| r.first_output).median()),
                    Unit::Seconds.show(samples(&a.baseline, |r| r.first_output).median())
                ),
            )
        }
        None => (f64::NAN, format!("no run at {AIM_RATE} (--quick)")),
    };
    let fraction = fetched.median() / testbed.darter_image_bytes as f64;
    vec![
        Aim::new(
            "issue 5",
            &format!(
                "cold start at {AIM_RATE} at least {}x faster than containerd's pull and run",
                aims.min_speedup
            ),
            measured,
            Verdict::at_least(speedup, aims.min_speedup),
        ),
        Aim::new(
            "issue 5",
            &format!(
                "cold start fetches under {:.0}% of the image",
                aims.max_fetched_fraction * 100.0
            ),
            format!(
                "{:.1}% ({} of {})",
                fraction * 100.0,
                Unit::Bytes.show(fetched.median()),
                Unit::Bytes.show(testbed.darter_image_bytes as f64)
            ),
            Verdict::at_most(fraction, aims.max_fetched_fraction),
        ),
    ]
}

fn time_table(results: &[AtRate]) -> Table {
    let mut t = Table::new(
        "Time to the first line of output, nothing local (lower is better)",
        &[
            "link",
            "containerd: pull + run",
            "Darter: mount + run",
            "Darter / containerd",
            "floor",
            "Darter / floor",
            "floor + local container start",
            "Darter snapshotter: darter pull + ctr run",
            "snapshotter / containerd",
        ],
    );
    for a in results {
        t.row(vec![
            a.rate.to_string(),
            show_samples(Unit::Seconds, &samples(&a.baseline, |r| r.first_output)),
            show_samples(Unit::Seconds, &samples(&a.darter, |r| r.first_output)),
            Unit::Ratio.show(a.darter_over_baseline()),
            show_samples(Unit::Seconds, &a.floors()),
            Unit::Ratio.show(a.darter_over_floor()),
            show_samples(Unit::Seconds, &a.floors_and_starts()),
            show_samples(Unit::Seconds, &samples(&a.snapshotter, |r| r.first_output)),
            Unit::Ratio.show(a.snapshotter_over_baseline()),
        ]);
    }
    t
}

fn bytes_table(results: &[AtRate], testbed: &Testbed) -> Table {
    let mut t = Table::new(
        "What the registry sent",
        &[
            "link",
            "containerd (wire)",
            "Darter (wire)",
            "Darter fetched (its counter)",
            "containerd requests",
            "Darter requests",
            "Darter blob reads (its counter)",
            "fetched / Darter image",
        ],
    );
    for a in results {
        let totals = darter_totals(&a.darter);
        let fetched = Samples::new(totals.iter().map(|s| s.backend_bytes as f64).collect());
        let requests = Samples::new(totals.iter().map(|s| s.backend_requests as f64).collect());
        t.row(vec![
            a.rate.to_string(),
            show_samples(Unit::Bytes, &samples(&a.baseline, |r| r.wire_bytes as f64)),
            show_samples(Unit::Bytes, &samples(&a.darter, |r| r.wire_bytes as f64)),
            show_samples(Unit::Bytes, &fetched),
            show_samples(
                Unit::Count,
                &samples(&a.baseline, |r| r.registry_requests as f64),
            ),
            show_samples(
                Unit::Count,
                &samples(&a.darter, |r| r.registry_requests as f64),
            ),
            show_samples(Unit::Count, &requests),
            format!(
                "{:.1}%",
                100.0 * fetched.median() / testbed.darter_image_bytes as f64
            ),
        ]);
    }
    t
}

/// Phases of both sides (medians), what Darter fetched when, and what the
/// container start alone costs.
fn breakdown_table(results: &[AtRate]) -> Table {
    let mut columns = vec!["phase"];
    let names: Vec<String> = results.iter().map(|a| a.rate.to_string()).collect();
    columns.extend(names.iter().map(String::as_str));
    let mut t = Table::new("Where the time goes (medians over rounds)", &columns);
    let Some(first) = results.first() else {
        return t;
    };
    let row = |label: String, f: &dyn Fn(&AtRate) -> String| {
        let mut cells = vec![label];
        cells.extend(results.iter().map(f));
        cells
    };
    for (side, rounds_of) in [
        (
            "containerd",
            (|a: &AtRate| &a.baseline) as fn(&AtRate) -> &Vec<Round>,
        ),
        ("Darter", |a: &AtRate| &a.darter),
        ("Darter snapshotter", |a: &AtRate| &a.snapshotter),
    ] {
        let phases = rounds_of(first)
            .first()
            .map(|r| r.phases.clone())
            .unwrap_or_default();
        for (i, (phase, _)) in phases.iter().enumerate() {
            t.row(row(format!("{side}: {phase}"), &|a| {
                Unit::Seconds.show(samples(rounds_of(a), |r| r.phases[i].1).median())
            }));
        }
        t.row(row(
            format!("{side}: the same container again, all local"),
            &|a| Unit::Seconds.show(samples(rounds_of(a), |r| r.warm_run).median()),
        ));
    }
    let counter = |f: fn(&(MountStats, MountStats)) -> f64| {
        move |a: &AtRate| {
            Samples::new(
                a.darter
                    .iter()
                    .filter_map(|r| r.darter.as_ref())
                    .map(f)
                    .collect(),
            )
            .median()
        }
    };
    let mount_bytes = counter(|(m, _)| m.backend_bytes as f64);
    let mount_requests = counter(|(m, _)| m.backend_requests as f64);
    let run_bytes = counter(|(m, e)| (e.backend_bytes - m.backend_bytes) as f64);
    let run_requests = counter(|(m, e)| (e.backend_requests - m.backend_requests) as f64);
    t.row(row("Darter: fetched while mounting".into(), &|a| {
        format!(
            "{} in {} requests",
            Unit::Bytes.show(mount_bytes(a)),
            Unit::Count.show(mount_requests(a))
        )
    }));
    t.row(row(
        "Darter: fetched while the container started".into(),
        &|a| {
            format!(
                "{} in {} requests",
                Unit::Bytes.show(run_bytes(a)),
                Unit::Count.show(run_requests(a))
            )
        },
    ));
    t.row(row("Darter: those bytes at the link rate".into(), &|a| {
        Unit::Seconds.show(a.rate.transfer_seconds(mount_bytes(a) + run_bytes(a)))
    }));
    t.row(row(
        "Darter: the rest (to first output, less local container start and transfer time)".into(),
        &|a| {
            let rest = samples(&a.darter, |r| {
                let fetched = r.darter.map_or(0, |(_, end)| end.backend_bytes);
                r.first_output - r.warm_run - a.rate.transfer_seconds(fetched as f64)
            });
            Unit::Seconds.show(rest.median())
        },
    ));
    t.row(row("round trip (TCP connect)".into(), &|a| {
        format!("{} µs", a.round_trip.as_micros())
    }));
    t
}

fn chart(scenario: &ImageScenario, results: &[AtRate]) -> Chart {
    let mut bars = Vec::new();
    for a in results {
        bars.push(Bar {
            label: format!("containerd, {}", a.rate),
            value: samples(&a.baseline, |r| r.first_output).median(),
            darter: false,
        });
        bars.push(Bar {
            label: format!("Darter, {}", a.rate),
            value: samples(&a.darter, |r| r.first_output).median(),
            darter: true,
        });
        bars.push(Bar {
            label: format!("Darter snapshotter, {}", a.rate),
            value: samples(&a.snapshotter, |r| r.first_output).median(),
            darter: true,
        });
    }
    Chart {
        file: format!("{}.png", scenario.name),
        title: format!(
            "Cold start to first output, nothing local (s): {}",
            scenario.image.command_line()
        ),
        kind: ChartKind::Bars {
            value_label: "seconds".into(),
            bars,
            reference: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_transfer_time_plus_metadata_round_trips() {
        let rtt = Duration::from_micros(100);
        let cases = [
            (12_500_000, LinkRate::mbit(100), 1.0003),
            (12_500_000, LinkRate::mbit(1000), 0.1003),
            (0, LinkRate::mbit(100), 0.0003),
        ];
        for (bytes, rate, floor) in cases {
            let got = floor_seconds(bytes, rate, rtt);
            assert!((got - floor).abs() < 1e-9, "{bytes} at {rate}: {got}");
        }
    }

    fn round(first_output: f64, fetched: Option<u64>) -> Round {
        let stats = |bytes| MountStats {
            backend_bytes: bytes,
            ..MountStats::default()
        };
        Round {
            first_output,
            phases: vec![("all", first_output)],
            warm_run: 0.1,
            wire_bytes: 0,
            registry_requests: 0,
            darter: fetched.map(|b| (stats(0), stats(b))),
            daemon_peak_rss: 0,
        }
    }

    #[test]
    fn ratios_compare_medians() {
        let a = AtRate {
            rate: LinkRate::mbit(100),
            round_trip: Duration::ZERO,
            baseline: vec![round(10.0, None), round(12.0, None), round(11.0, None)],
            darter: vec![
                round(0.5, Some(2_500_000)),
                round(0.6, Some(2_500_000)),
                round(0.9, Some(5_000_000)),
            ],
            snapshotter: vec![round(1.1, Some(2_500_000))],
        };
        // Median floor 0.2 s (2.5 MB at 12.5 MB/s), median Darter 0.6 s.
        assert!((a.darter_over_floor() - 3.0).abs() < 1e-9);
        assert!((a.darter_over_baseline() - 0.6 / 11.0).abs() < 1e-9);
        let t = time_table(std::slice::from_ref(&a));
        assert_eq!(t.rows[0][0], "100 Mbit/s");
        assert_eq!(t.rows[0][5], "3.00x");
        assert!((a.snapshotter_over_baseline() - 0.1).abs() < 1e-9);
        assert_eq!(t.rows[0][8], "0.10x");
    }
}
