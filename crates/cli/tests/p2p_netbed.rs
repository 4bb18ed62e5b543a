//! P2P over real, slow links (root only): the registry, `darter
//! scheduler`, a seed and three peers, each in its own network namespace
//! on a bridge (`darter_testkit::p2pbed`), the registry behind a 200 Mbit/s
//! TBF and every peer capped at 100 Mbit/s each way. Three clients fetch
//! a random 96 MiB blob through their peers' mirrors at once; one peer is
//! killed with SIGKILL while it is serving pieces to the others.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{DARTER, noise};
use darter_testkit::blob_http::Fetched;
use darter_testkit::netns::LinkRate;
use darter_testkit::p2pbed::{P2pBed, P2pBedConfig, PeerCounters};
use darter_testkit::process::wait_until;

const BLOB_SIZE: usize = 96 << 20;
const PEERS: usize = 3;
const REPOSITORY: &str = "p2p/netbed";
/// How long the clients may take, killed parent included (about 10 s
/// without one at these rates).
const FETCH_TIMEOUT: Duration = Duration::from_secs(90);

fn start_bed() -> P2pBed {
    P2pBed::start(&P2pBedConfig {
        darter: PathBuf::from(DARTER),
        peers: PEERS,
        registry_rate: LinkRate::mbit(200),
        peer_rate: LinkRate::mbit(100),
        parent_dir: std::env::temp_dir(),
        store_limit: 1 << 30,
    })
    .unwrap()
}

/// A peer to kill: it has sent other peers some pieces, not a whole blob's
/// worth, and has not got the whole blob itself, so it is mid-transfer
/// both ways.
fn serving_mid_transfer(counters: &PeerCounters) -> bool {
    let size = BLOB_SIZE as u64;
    let received = counters.get("bytes_from_peers") + counters.get("bytes_from_origin");
    let served = counters.get("bytes_served_to_peers");
    served > 0 && served < size && received < size
}

#[test]
fn peers_on_slow_links_get_the_blob_through_their_mirrors_when_a_parent_dies_mid_transfer() {
    let bed = start_bed();
    let namespaces = bed.namespaces();
    let data = noise(6, BLOB_SIZE);
    let digest = bed.push_blob(REPOSITORY, &data).unwrap();
    drop(data);
    let before = bed.registry_bytes_served();
    let size = BLOB_SIZE as u64;

    let (fetched, victim) = std::thread::scope(|scope| {
        let (bed, digest) = (&bed, digest.as_str());
        let clients: Vec<_> = bed
            .peers()
            .iter()
            .map(|peer| scope.spawn(move || peer.fetch_through_mirror(REPOSITORY, digest)))
            .collect();
        let victim = kill_a_parent_mid_transfer(bed);
        let fetched: Vec<anyhow::Result<Fetched>> =
            clients.into_iter().map(|c| c.join().unwrap()).collect();
        (fetched, victim)
    });

    for (i, (peer, fetched)) in bed.peers().iter().zip(fetched).enumerate() {
        let fetched = fetched.unwrap();
        if i == victim {
            // Its client's response breaks: never a whole answer of wrong bytes.
            assert!(fetched.broken, "{fetched:?}");
            continue;
        }
        assert!(
            fetched.is_blob(&digest, size),
            "{}: {fetched:?}\n{}",
            peer.name(),
            peer.log()
        );
        let counters = peer.counters().unwrap();
        assert_eq!(counters.get("bad_pieces"), 0, "{counters:?}");
        assert_eq!(
            counters.get("bytes_served_to_clients"),
            size,
            "{counters:?}"
        );
        assert_eq!(
            counters.get("bytes_from_peers") + counters.get("bytes_from_origin"),
            size,
            "{counters:?}"
        );
    }
    let seed = bed.seed().counters().unwrap();
    assert_eq!(seed.get("bytes_from_origin"), size, "{seed:?}");

    // The registry logs a response once it is sent: wait for the seed's.
    wait_until(
        Duration::from_secs(10),
        "the registry to log the blob's bytes",
        || bed.registry_bytes_served() - before >= size,
    );
    let registry_bytes = bed.registry_bytes_served() - before;
    assert!(
        registry_bytes * 10 <= size * 12,
        "the registry sent {registry_bytes} bytes for a {size}-byte blob"
    );

    drop(bed);
    for path in namespaces {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

/// Waits until a peer serves pieces mid-transfer, kills it with SIGKILL
/// and returns its index.
fn kill_a_parent_mid_transfer(bed: &P2pBed) -> usize {
    let started = Instant::now();
    loop {
        let counters: Vec<PeerCounters> = bed
            .peers()
            .iter()
            .map(|peer| peer.counters().unwrap())
            .collect();
        if let Some(victim) = counters.iter().position(serving_mid_transfer) {
            bed.peers()[victim].kill();
            return victim;
        }
        assert!(
            started.elapsed() < FETCH_TIMEOUT,
            "no peer served pieces mid-transfer: {counters:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
