//! Shared by the file-access scenarios: operations timed cold (page cache
//! dropped) and then warm, and what a mount's daemon did meanwhile.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::model::{DaemonPeak, Samples, Table, Unit, show_samples};
use crate::mount::{DarterMount, MountStats, Tmpfs};
use crate::scenario::{Bench, BuiltImage, MountMode, Scratch, Variant};
use crate::tools;
use crate::walk;

/// Warm repetitions after each cold run.
pub const WARM_RUNS: usize = 3;

/// Something done to a tree, which returns an amount to check that
/// baseline and Darter did the same work.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// `find ROOT`: the amount is the number of lines printed.
    Find,
    /// `lstat` every entry, read every regular file: bytes read.
    ReadAll,
    /// Read one file (relative to the root) sequentially: bytes read.
    ReadFile(&'a Path),
}

impl Op<'_> {
    fn run(self, root: &Path) -> anyhow::Result<u64> {
        match self {
            Op::Find => {
                let out = tools::output(Command::new("find").arg(root))?;
                Ok(out.iter().filter(|b| **b == b'\n').count() as u64)
            }
            Op::ReadAll => Ok(walk::walk(root, true)?.read_bytes),
            Op::ReadFile(file) => walk::read_file(&root.join(file)),
        }
    }
}

/// One cold run and [`WARM_RUNS`] warm runs of an operation.
#[derive(Debug, Clone)]
pub struct ColdWarm {
    pub cold: f64,
    pub warm: Vec<f64>,
    /// What the operation returned (the same every time, or it fails).
    pub amount: u64,
}

/// Drops the page cache, then runs `op` on the local tree `root` once
/// cold and [`WARM_RUNS`] times warm.
pub fn native_cold_then_warm(op: Op<'_>, root: &Path) -> anyhow::Result<ColdWarm> {
    tools::drop_caches()?;
    cold_then_warm(op, root, || {
        tools::write_back();
        Ok(())
    })
}

/// What happens between the cold run and the warm ones, for the report.
pub const SETTLE_METHOD: &str = "Between the cold run and the warm ones, the background work \
    the cold run caused is let finish: dirty pages are written back (`sync`, both sides) and \
    the Darter daemon is waited on until it has used no CPU for 100 ms (its cache writes and \
    read-ahead), as a warm read in use meets it.";

/// How the breakdown tables are made, for the report.
pub const BREAKDOWN_METHOD: &str = "Breakdown: the cold Darter run is repeated (in the same \
    alternating rounds) with the chunk cache on a tmpfs, which takes away writing the chunk cache \
    to ext4, and then also with the image's blobs read into the page cache beforehand, which \
    takes away reading the backend from disk. What remains over the baseline is the daemon's \
    work (decompression, verification, FUSE round trips) and waiting on it; its CPU time is \
    shown.";

/// Where a cold Darter mount keeps its chunk cache and finds its image's
/// blobs. The variants besides [`ColdSetup::OnDisk`] take disk I/O away
/// piece by piece, so the differences show where the cold time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdSetup {
    /// Chunk cache and blobs on the local disk: the real thing.
    OnDisk,
    /// Chunk cache on a tmpfs: no cache-file writes to ext4.
    CacheInMemory,
    /// Chunk cache on a tmpfs and the blobs read into the page cache
    /// before: no disk I/O at all.
    CacheAndBlobsInMemory,
}

impl ColdSetup {
    pub const ALL: [ColdSetup; 3] = [
        ColdSetup::OnDisk,
        ColdSetup::CacheInMemory,
        ColdSetup::CacheAndBlobsInMemory,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ColdSetup::OnDisk => "Darter, chunk cache and blobs on disk",
            ColdSetup::CacheInMemory => "Darter, chunk cache on tmpfs",
            ColdSetup::CacheAndBlobsInMemory => {
                "Darter, chunk cache on tmpfs, blobs in the page cache"
            }
        }
    }

    /// What this setup takes away compared with the one before it.
    fn removes(self) -> &'static str {
        match self {
            ColdSetup::OnDisk => "",
            ColdSetup::CacheInMemory => " (writing the chunk cache to ext4)",
            ColdSetup::CacheAndBlobsInMemory => " (reading blobs from disk)",
        }
    }
}

/// The baseline variant, then one Darter variant per [`ColdSetup`] (in
/// [`ColdSetup::ALL`] order, so that `runs[1]` is the real setup).
pub fn baseline_and_setups<'a, T>(
    baseline: Variant<'a, T>,
    darter: impl Fn(ColdSetup) -> Variant<'a, T>,
) -> Vec<Variant<'a, T>> {
    std::iter::once(baseline)
        .chain(ColdSetup::ALL.into_iter().map(darter))
        .collect()
}

/// A cold mount; its tmpfs (if any) outlives it (fields drop in order).
#[derive(Debug)]
struct ColdMount {
    mount: DarterMount,
    _cache: Option<Tmpfs>,
}

/// Runs `work` on a cold mount of `image` (see [`cold_mount`]) and
/// unmounts it; returns what `work` returned and what the daemon did.
pub fn with_cold_mount<T>(
    bench: &Bench,
    image: &BuiltImage,
    scratch: &Scratch,
    setup: ColdSetup,
    work: impl FnOnce(&DarterMount) -> anyhow::Result<T>,
) -> anyhow::Result<(T, DaemonUse)> {
    let cold = cold_mount(bench, image, scratch, setup)?;
    let value = work(&cold.mount)?;
    let daemon = DaemonUse::of(&cold.mount)?;
    cold.mount.unmount()?;
    Ok((value, daemon))
}

/// Drops the page cache, then mounts `image` afresh with an empty chunk
/// cache: a node that has just mounted the image (the daemon runs, the
/// image's metadata is loaded, no file data is in memory). The mount's
/// own time is the mount scenario's business.
fn cold_mount(
    bench: &Bench,
    image: &BuiltImage,
    scratch: &Scratch,
    setup: ColdSetup,
) -> anyhow::Result<ColdMount> {
    let cache_dir = bench.fresh_dir(scratch, "chunk-cache")?;
    let cache = match setup {
        ColdSetup::OnDisk => None,
        ColdSetup::CacheInMemory | ColdSetup::CacheAndBlobsInMemory => {
            Some(Tmpfs::mount(&cache_dir)?)
        }
    };
    tools::drop_caches()?;
    if setup == ColdSetup::CacheAndBlobsInMemory {
        read_blobs(&image.layout)?;
    }
    let (mount, _) = bench.fresh_mount(
        &image.reference,
        scratch,
        MountMode::Daemon,
        Some(&cache_dir),
    )?;
    Ok(ColdMount {
        mount,
        _cache: cache,
    })
}

/// Reads every blob of an OCI layout, leaving them in the page cache.
fn read_blobs(layout: &Path) -> anyhow::Result<()> {
    let blobs = layout.join("blobs").join("sha256");
    let entries =
        std::fs::read_dir(&blobs).with_context(|| format!("listing {}", blobs.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", blobs.display()))?
            .path();
        walk::read_file(&path)?;
    }
    Ok(())
}

/// For [`breakdown_table`]: each setup's cold times and daemon CPU times,
/// from the rounds of the Darter variants (in [`ColdSetup::ALL`] order).
pub fn setup_samples<R>(
    darter_runs: &[Vec<R>],
    cold: impl Fn(&R) -> f64,
    daemon_cpu: impl Fn(&R) -> Option<f64>,
) -> Vec<(ColdSetup, Samples, Samples)> {
    ColdSetup::ALL
        .into_iter()
        .zip(darter_runs)
        .map(|(setup, rounds)| {
            let times = Samples::new(rounds.iter().map(&cold).collect());
            let cpu = Samples::new(rounds.iter().filter_map(&daemon_cpu).collect());
            (setup, times, cpu)
        })
        .collect()
}

/// Where the extra cold time goes: each setup's cold time, what taking
/// away one source of I/O saved, and the daemon's CPU time.
pub fn breakdown_table(
    title: &str,
    native: &Samples,
    darter: &[(ColdSetup, Samples, Samples)],
) -> Table {
    let mut table = Table::new(
        title,
        &[
            "setup",
            "cold time",
            "saved vs the row above",
            "daemon CPU",
            "vs local disk",
        ],
    );
    table.row(vec![
        "local disk (baseline)".to_owned(),
        show_samples(Unit::Seconds, native),
        String::new(),
        String::new(),
        Unit::Ratio.show(1.0),
    ]);
    let mut previous: Option<f64> = None;
    for (setup, time, cpu) in darter {
        let saved = previous.map_or(String::new(), |p| {
            format!(
                "{}{}",
                Unit::Seconds.show(p - time.median()),
                setup.removes()
            )
        });
        table.row(vec![
            setup.label().to_owned(),
            show_samples(Unit::Seconds, time),
            saved,
            show_samples(Unit::Seconds, cpu),
            Unit::Ratio.show(time.median() / native.median()),
        ]);
        previous = Some(time.median());
    }
    table
}

/// Runs `op` on `root` once (cold: the caller made it so), lets the
/// background work the cold run caused finish (`settle`), then runs it
/// [`WARM_RUNS`] times (warm).
pub fn cold_then_warm(
    op: Op<'_>,
    root: &Path,
    settle: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<ColdWarm> {
    let (cold, amount) = seconds(|| op.run(root))?;
    settle()?;
    let mut warm = Vec::with_capacity(WARM_RUNS);
    for _ in 0..WARM_RUNS {
        let (secs, again) = seconds(|| op.run(root))?;
        if again != amount {
            bail!("{op:?} on {} gave {again}, then {amount}", root.display());
        }
        warm.push(secs);
    }
    Ok(ColdWarm { cold, warm, amount })
}

/// Runs `f`, returning its wall time in seconds and its result.
pub fn seconds<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    let started = Instant::now();
    let value = f()?;
    Ok((started.elapsed().as_secs_f64(), value))
}

/// Cold and warm samples of several rounds.
pub fn cold_samples(rounds: &[&ColdWarm]) -> Samples {
    Samples::new(rounds.iter().map(|r| r.cold).collect())
}

/// Each round's median warm time.
pub fn warm_samples(rounds: &[&ColdWarm]) -> Samples {
    Samples::new(
        rounds
            .iter()
            .map(|r| Samples::new(r.warm.clone()).median())
            .collect(),
    )
}

/// Fails unless Darter did the same work as the baseline.
pub fn same_amount(what: &str, baseline: &ColdWarm, darter: &ColdWarm) -> anyhow::Result<()> {
    if baseline.amount != darter.amount {
        bail!(
            "{what}: the baseline gave {} but Darter {} (the mounted tree differs?)",
            baseline.amount,
            darter.amount
        );
    }
    Ok(())
}

/// What one mount's daemon did: its counters, peak memory and CPU time.
#[derive(Debug, Clone, Copy)]
pub struct DaemonUse {
    pub stats: MountStats,
    pub peak_rss: u64,
    pub cpu_seconds: f64,
}

impl DaemonUse {
    /// Asks `mount`'s daemon; fails if it saw chunks that did not verify
    /// (the benchmark's inputs are sound, so that is a bug to report).
    pub fn of(mount: &DarterMount) -> anyhow::Result<DaemonUse> {
        let stats = mount.stats()?;
        if stats.verify_failures > 0 {
            bail!(
                "{} chunks failed verification on {}",
                stats.verify_failures,
                mount.path().display()
            );
        }
        Ok(DaemonUse {
            stats,
            peak_rss: mount.peak_rss()?,
            cpu_seconds: mount.cpu()?.as_secs_f64(),
        })
    }
}

/// A table of what the daemons did in each round, by median.
pub fn daemon_table(title: &str, uses: &[(&str, Vec<DaemonUse>)]) -> Table {
    let mut table = Table::new(
        title,
        &[
            "after",
            "backend bytes",
            "backend requests",
            "cache misses",
            "decompressed",
            "read by programs",
            "daemon CPU",
            "peak RSS",
        ],
    );
    for (what, rounds) in uses {
        let col = |f: &dyn Fn(&DaemonUse) -> f64, unit: Unit| {
            show_samples(unit, &Samples::new(rounds.iter().map(f).collect()))
        };
        table.row(vec![
            (*what).to_owned(),
            col(&|u| u.stats.backend_bytes as f64, Unit::Bytes),
            col(&|u| u.stats.backend_requests as f64, Unit::Count),
            col(&|u| u.stats.cache_misses as f64, Unit::Count),
            col(&|u| u.stats.decompressed_bytes as f64, Unit::Bytes),
            col(&|u| u.stats.read_bytes as f64, Unit::Bytes),
            col(&|u| u.cpu_seconds, Unit::Seconds),
            col(&|u| u.peak_rss as f64, Unit::Bytes),
        ]);
    }
    table
}

/// The peak RSS of some daemons, for the memory section.
pub fn peak(operation: &str, uses: &[DaemonUse]) -> DaemonPeak {
    DaemonPeak {
        operation: operation.to_owned(),
        vm_hwm: Samples::new(uses.iter().map(|u| u.peak_rss as f64).collect()),
        on_python_image: true,
    }
}
