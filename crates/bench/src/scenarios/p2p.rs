//! P2P distribution (issue 6): N peers, each in its own network namespace
//! with its own rate cap, fetch the same blob at once through their
//! registry mirrors, with the registry behind a 200 Mbit/s TBF
//! (`darter_testkit::p2pbed`). The baseline is the same clients on the
//! same links fetching straight from the registry. Per N: each client's
//! completion time (median, max) and the bytes the registry sent.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use darter_testkit::netns::LinkRate;
use darter_testkit::p2pbed::{BedPeer, P2pBed, P2pBedConfig, process_cpu_seconds};

use crate::model::{Aim, Bar, Chart, ChartKind, Samples, ScenarioReport, Table, Unit, Verdict};
use crate::scenario::{Bench, Scenario};

const REGISTRY_RATE: LinkRate = LinkRate::mbit(200);
const PEER_RATE: LinkRate = LinkRate::mbit(1000);
const REPOSITORY: &str = "bench/p2p";
const FULL_BLOB: u64 = 1 << 30;
const QUICK_BLOB: u64 = 32 << 20;
const FULL_COUNTS: [usize; 3] = [1, 5, 20];
const QUICK_COUNTS: [usize; 2] = [1, 5];
/// Disk kept free besides the piece stores and the registry's copy.
const DISK_MARGIN: u64 = 4 << 30;
/// Overrides of the blob size (MiB) and the peer counts (`1,5,20`).
const BLOB_ENV: &str = "DARTER_BENCH_P2P_BLOB_MIB";
const COUNTS_ENV: &str = "DARTER_BENCH_P2P_PEERS";
/// Aims of issue 6.
const REGISTRY_BYTES_AIM: f64 = 1.2;
const SCALING_AIM: f64 = 2.0;
const SPEEDUP_AIM: f64 = 3.0;

#[derive(Debug)]
pub struct P2p;

/// Completion times (seconds) of every client, and what the registry sent.
#[derive(Debug)]
struct Fetches {
    seconds: Samples,
    registry_bytes: u64,
}

/// One N, without and with P2P.
#[derive(Debug)]
struct Round {
    peers: usize,
    direct: Fetches,
    p2p: Fetches,
    cpu: CpuPerGib,
}

/// CPU seconds (user and system) per GiB delivered to clients, in the P2P
/// phase: of every peer process (the seed too) and of the clients.
#[derive(Debug, Clone, Copy)]
struct CpuPerGib {
    peers: f64,
    clients: f64,
}

impl CpuPerGib {
    /// Runs `phase` and divides the CPU it took by the `delivered` bytes.
    fn measure<T>(
        bed: &P2pBed,
        delivered: u64,
        phase: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, CpuPerGib)> {
        let clients = || process_cpu_seconds(std::process::id());
        let (peers_before, clients_before) = (bed.peers_cpu_seconds()?, clients()?);
        let result = phase()?;
        let gib = delivered as f64 / (1u64 << 30) as f64;
        let cpu = CpuPerGib {
            peers: (bed.peers_cpu_seconds()? - peers_before) / gib,
            clients: (clients()? - clients_before) / gib,
        };
        Ok((result, cpu))
    }
}

/// The blob size and peer counts of this run, and why they are what they are.
#[derive(Debug)]
struct Plan {
    blob: u64,
    counts: Vec<usize>,
    notes: Vec<String>,
}

impl Scenario for P2p {
    fn name(&self) -> &'static str {
        "p2p"
    }

    fn title(&self) -> &'static str {
        "P2P distribution of one blob to N peers at once, with and without P2P (issue 6)"
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        let scratch = bench.scratch("p2p")?;
        let plan = plan(bench.size.quick, scratch.path())?;
        tracing::info!(blob = plan.blob, counts = ?plan.counts, "p2p plan");
        let mut data = vec![0u8; usize::try_from(plan.blob)?];
        fastrand::Rng::with_seed(6).fill(&mut data);
        let mut rounds = Vec::new();
        for &peers in &plan.counts {
            let bed = P2pBed::start(&P2pBedConfig {
                darter: bench.darter.exe.clone(),
                peers,
                registry_rate: REGISTRY_RATE,
                peer_rate: PEER_RATE,
                parent_dir: scratch.path().to_path_buf(),
                store_limit: plan.blob * 2,
            })?;
            let digest = bed.push_blob(REPOSITORY, &data)?;
            let registry = bed.registry_addr();
            let direct = fetch_all(&bed, &digest, plan.blob, peers, |peer| {
                peer.fetch_from(registry, REPOSITORY, &digest)
            })
            .with_context(|| format!("{peers} clients straight from the registry"))?;
            let (p2p, cpu) = CpuPerGib::measure(&bed, plan.blob * peers as u64, || {
                fetch_all(&bed, &digest, plan.blob, 1, |peer| {
                    peer.fetch_through_mirror(REPOSITORY, &digest)
                })
                .with_context(|| format!("{peers} clients through their peers"))
            })?;
            tracing::info!(
                peers,
                direct_max = direct.seconds.max(),
                p2p_max = p2p.seconds.max(),
                p2p_registry_bytes = p2p.registry_bytes,
                peer_cpu_per_gib = cpu.peers,
                client_cpu_per_gib = cpu.clients,
                "p2p round"
            );
            rounds.push(Round {
                peers,
                direct,
                p2p,
                cpu,
            });
        }
        Ok(report(self, &plan, &rounds))
    }
}

/// The blob size and counts: `--quick` is small; the full run is 1 GiB to
/// 1, 5 and 20 peers, with a smaller blob when the disk cannot hold their
/// piece stores and the registry's copy. The environment may override both
/// (N = 50 is opt-in, `1,5,20,50`: its baseline alone takes about 36
/// minutes at 200 Mbit/s).
fn plan(quick: bool, dir: &Path) -> anyhow::Result<Plan> {
    let mut notes = Vec::new();
    let mut counts: Vec<usize> = if quick {
        QUICK_COUNTS.to_vec()
    } else {
        FULL_COUNTS.to_vec()
    };
    if let Ok(list) = std::env::var(COUNTS_ENV) {
        counts = list
            .split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{COUNTS_ENV}={list:?} is not a list of numbers"))?;
        notes.push(format!("Peer counts set with `{COUNTS_ENV}={list}`."));
    }
    let mut blob = if quick { QUICK_BLOB } else { FULL_BLOB };
    if let Ok(mib) = std::env::var(BLOB_ENV) {
        blob = mib
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{BLOB_ENV}={mib:?} is not a number of MiB"))?
            << 20;
        notes.push(format!("Blob size set with `{BLOB_ENV}={mib}`."));
    }
    let free = free_bytes(dir)?;
    let needed = |peers: usize, blob: u64| (peers as u64 + 2) * blob + DISK_MARGIN;
    let largest = counts.iter().copied().max().unwrap_or(1);
    while needed(largest, blob) > free && blob > QUICK_BLOB {
        blob /= 2;
    }
    if needed(largest, blob) > free {
        bail!(
            "{} free in {}: not enough for {largest} piece stores",
            Unit::Bytes.show(free as f64),
            dir.display()
        );
    }
    if !quick && blob < FULL_BLOB && std::env::var(BLOB_ENV).is_err() {
        notes.push(format!(
            "**The blob is {} MiB, not 1 GiB**: {largest} piece stores of 1 GiB do not fit in \
             the {} free on this disk.",
            blob >> 20,
            Unit::Bytes.show(free as f64)
        ));
    }
    Ok(Plan {
        blob,
        counts,
        notes,
    })
}

fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(dir).with_context(|| format!("statvfs of {}", dir.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Every peer's client fetches the blob at once with `fetch`; each must
/// get exactly the blob. Returns their completion times and the bytes the
/// registry sent meanwhile (expected: `copies` of the blob).
fn fetch_all(
    bed: &P2pBed,
    digest: &str,
    size: u64,
    copies: usize,
    fetch: impl Fn(&BedPeer) -> anyhow::Result<darter_testkit::blob_http::Fetched> + Sync,
) -> anyhow::Result<Fetches> {
    let before = bed.registry_bytes_served();
    let results: Vec<anyhow::Result<f64>> = std::thread::scope(|scope| {
        let fetch = &fetch;
        let clients: Vec<_> = bed
            .peers()
            .iter()
            .map(|peer| {
                scope.spawn(move || {
                    let started = Instant::now();
                    let fetched = fetch(peer)?;
                    let seconds = started.elapsed().as_secs_f64();
                    if !fetched.is_blob(digest, size) {
                        bail!("{} did not get the blob: {fetched:?}", peer.name());
                    }
                    Ok(seconds)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked")))
            })
            .collect()
    });
    let seconds = results.into_iter().collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(Fetches {
        seconds: Samples::new(seconds),
        registry_bytes: settled_registry_bytes(bed, before, size * copies as u64),
    })
}

/// What the registry sent since `before`, once its access log shows at
/// least `expected` bytes (it logs a response after sending it) or a few
/// seconds have passed.
fn settled_registry_bytes(bed: &P2pBed, before: u64, expected: u64) -> u64 {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let sent = bed.registry_bytes_served().saturating_sub(before);
        if sent >= expected || Instant::now() > deadline {
            return sent;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn report(scenario: &P2p, plan: &Plan, rounds: &[Round]) -> ScenarioReport {
    let mut out = ScenarioReport::new(scenario.name(), scenario.title());
    let blob = plan.blob as f64;
    out.method = vec![
        format!(
            "A bridge in its own network namespace joins, each through a veth pair and in a \
             namespace of its own: the registry (`docker-registry`) behind a {REGISTRY_RATE} TBF \
             on what it sends, `darter scheduler`, a seed peer and N peers (`darter peer`), each \
             peer and the seed capped at {PEER_RATE} each way. A new bed (empty piece stores) \
             for every N."
        ),
        format!(
            "The blob is {} MiB of random bytes. Without P2P, every client, inside its peer's \
             namespace, GETs it straight from the registry over that peer's capped link; with \
             P2P, through its peer's registry mirror. All N clients start at once; each checks \
             the sha256 of what it received. One round per N (without P2P first): a round at \
             N = 20 moves 20 copies of the blob. Completion time is per client; registry bytes \
             are the response bytes in the registry's access log.",
            plan.blob >> 20
        ),
        "CPU per GiB delivered (P2P phase): user plus system seconds from `/proc/PID/stat` of \
         every peer process (the seed too), and of the benchmark process whose threads are the \
         clients (each hashes what it receives), divided by N times the blob size. Unlike the \
         times, these do not depend on what else the machine runs."
            .to_owned(),
    ];
    let mut table = Table::new(
        "Completion time per client (median / max) and registry bytes / blob size",
        &[
            "N",
            "without P2P",
            "with P2P",
            "speed-up (max)",
            "registry / blob without",
            "registry / blob with P2P",
            "peer CPU s / GiB delivered",
            "client CPU s / GiB",
        ],
    );
    let mut bars = Vec::new();
    for r in rounds {
        let times = |s: &Samples| {
            format!(
                "{} / {}",
                Unit::Seconds.show(s.median()),
                Unit::Seconds.show(s.max())
            )
        };
        table.row(vec![
            r.peers.to_string(),
            times(&r.direct.seconds),
            times(&r.p2p.seconds),
            Unit::Ratio.show(r.direct.seconds.max() / r.p2p.seconds.max()),
            Unit::Ratio.show(r.direct.registry_bytes as f64 / blob),
            Unit::Ratio.show(r.p2p.registry_bytes as f64 / blob),
            format!("{:.2}", r.cpu.peers),
            format!("{:.2}", r.cpu.clients),
        ]);
        for (fetches, darter, how) in [(&r.direct, false, "registry"), (&r.p2p, true, "P2P")] {
            bars.push(Bar {
                label: format!("N={} {how}", r.peers),
                value: fetches.seconds.max(),
                darter,
            });
        }
    }
    out.tables.push(table);
    out.charts.push(Chart {
        file: "p2p.png".into(),
        title: "Seconds until every client has the blob".into(),
        kind: ChartKind::Bars {
            value_label: "seconds (slowest client)".into(),
            bars,
            reference: None,
        },
    });
    out.aims = aims(rounds, blob);
    out.notes = plan.notes.clone();
    out
}

/// The three aims of issue 6, at the largest N measured.
fn aims(rounds: &[Round], blob: f64) -> Vec<Aim> {
    let worst_registry = rounds
        .iter()
        .map(|r| r.p2p.registry_bytes as f64 / blob)
        .fold(f64::NAN, f64::max);
    let first = rounds.first();
    let last = rounds.last();
    let largest = last.map_or(0, |r| r.peers);
    let single = first.map_or(0, |r| r.peers);
    let scaling = match (first, last) {
        (Some(a), Some(b)) => b.p2p.seconds.max() / a.p2p.seconds.max(),
        _ => f64::NAN,
    };
    let speedup = last.map_or(f64::NAN, |r| r.direct.seconds.max() / r.p2p.seconds.max());
    vec![
        Aim::new(
            "issue 6",
            "registry bytes at most 1.2x the blob size for every N (with P2P)",
            format!("{} at worst", Unit::Ratio.show(worst_registry)),
            Verdict::at_most(worst_registry, REGISTRY_BYTES_AIM),
        ),
        Aim::new(
            "issue 6",
            "completion time (slowest client) at the largest N within 2x of N = 1",
            format!(
                "N = {largest} takes {} of N = {single}",
                Unit::Ratio.show(scaling)
            ),
            Verdict::at_most(scaling, SCALING_AIM),
        ),
        Aim::new(
            "issue 6",
            "at the largest N at least 3x faster than without P2P (slowest client)",
            format!("{} faster at N = {largest}", Unit::Ratio.show(speedup)),
            Verdict::at_least(speedup, SPEEDUP_AIM),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU: CpuPerGib = CpuPerGib {
        peers: 1.0,
        clients: 1.0,
    };

    fn fetches(seconds: &[f64], registry_bytes: u64) -> Fetches {
        Fetches {
            seconds: Samples::new(seconds.to_vec()),
            registry_bytes,
        }
    }

    #[test]
    fn aims_are_checked_at_the_largest_n_against_n_1_and_the_baseline() {
        let rounds = [
            Round {
                peers: 1,
                direct: fetches(&[10.0], 100),
                p2p: fetches(&[11.0], 100),
                cpu: CPU,
            },
            Round {
                peers: 20,
                direct: fetches(&[150.0, 200.0], 2000),
                p2p: fetches(&[15.0, 20.0], 110),
                cpu: CPU,
            },
        ];
        let checked = aims(&rounds, 100.0);
        let verdicts: Vec<Verdict> = checked.iter().map(|a| a.verdict).collect();
        assert_eq!(verdicts, [Verdict::Met, Verdict::Met, Verdict::Met]);
        assert_eq!(checked[2].measured, "10.00x faster at N = 20");

        let slow = [
            Round {
                peers: 1,
                direct: fetches(&[10.0], 100),
                p2p: fetches(&[10.0], 130),
                cpu: CPU,
            },
            Round {
                peers: 5,
                direct: fetches(&[50.0], 500),
                p2p: fetches(&[30.0], 100),
                cpu: CPU,
            },
        ];
        let verdicts: Vec<Verdict> = aims(&slow, 100.0).iter().map(|a| a.verdict).collect();
        assert_eq!(
            verdicts,
            [Verdict::NotMet, Verdict::NotMet, Verdict::NotMet]
        );
        let none: Vec<Verdict> = aims(&[], 100.0).iter().map(|a| a.verdict).collect();
        assert_eq!(none, [Verdict::NotMeasured; 3]);
    }

    #[test]
    fn the_quick_plan_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(true, dir.path()).unwrap();
        assert_eq!(plan.counts, QUICK_COUNTS);
        assert_eq!(plan.blob, QUICK_BLOB);
    }
}
