//! P2P blob distribution, all real: a registry (`docker-registry`) on
//! loopback, `darter scheduler` and several `darter peer` processes, and
//! clients fetching a random 64 MiB blob through the peers' registry
//! mirrors. The registry must send it about once; a peer whose store
//! corrupts a piece is caught, reported and no longer chosen; with the
//! scheduler dead, peers still complete from the origin, and after its
//! restart it relearns what peers hold; a parent that stalls mid-piece and
//! is killed costs only a retry at another parent; a client reading a blob
//! in ranges costs one upstream admission `HEAD`, not one per range.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod p2p_common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::Duration;

use common::noise;
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule};
use darter_testkit::process::{free_port, wait_until};
use darter_testkit::registry::{RegistryAuth, TestRegistry};
use p2p_common::{
    Cluster, Fetched, Peer, PeerSpec, START_TIMEOUT, loopback, push_blob, sha256_digest,
};

const BLOB_SIZE: usize = 64 << 20;
const PIECE_SIZE: u64 = 4 << 20;
const REPOSITORY: &str = "p2p/blob";

fn random_blob(seed: u64) -> Vec<u8> {
    noise(seed, BLOB_SIZE)
}

/// A cluster holding a random blob (from `blob_seed`), with a seed peer
/// and peers named `names`, all registered with the scheduler.
fn seeded_cluster(blob_seed: u64, names: &[&str]) -> (Cluster, String, Peer, Vec<Peer>) {
    let cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, REPOSITORY, random_blob(blob_seed), None);
    let seed = cluster.peer("seed", true);
    let peers: Vec<Peer> = names.iter().map(|n| cluster.peer(n, false)).collect();
    cluster.wait_peers(names.len() + 1);
    (cluster, digest, seed, peers)
}

/// A registered peer whose upstream is `proxy`.
fn peer_behind(cluster: &Cluster, proxy: &FaultProxy) -> Peer {
    let peer = cluster.peer_with(
        "a",
        PeerSpec {
            upstream: Some(proxy.addr()),
            ..PeerSpec::default()
        },
    );
    cluster.wait_peers(1);
    peer
}

fn assert_correct(fetched: &Fetched, digest: &str) {
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert!(!fetched.broken, "{fetched:?}");
    assert_eq!(fetched.length, BLOB_SIZE as u64);
    assert_eq!(fetched.digest, digest);
}

/// Flips one byte of piece `piece` in a peer's stored copy of the blob.
fn corrupt_piece(path: &Path, piece: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let offset = piece * PIECE_SIZE + 12345;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], offset).unwrap();
}

#[test]
fn peers_fetching_one_blob_at_once_take_it_from_the_registry_about_once() {
    let (cluster, digest, seed, peers) = seeded_cluster(1, &["a", "b", "c"]);
    let before = cluster.registry.bytes_served();

    let fetched: Vec<Fetched> = std::thread::scope(|scope| {
        let handles: Vec<_> = peers
            .iter()
            .map(|peer| scope.spawn(|| peer.fetch(REPOSITORY, &digest)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for one in &fetched {
        assert_correct(one, &digest);
    }

    // The seed fetched the blob from the registry once; the others took
    // every piece from peers. Every piece was checked along the sha256
    // chain the seed recorded, so no peer read a byte back to hash the
    // whole blob.
    let size = BLOB_SIZE as u64;
    assert_eq!(seed.counter("bytes_from_origin"), size);
    assert_eq!(seed.counter("bytes_rehashed"), 0);
    for peer in &peers {
        assert_eq!(peer.counter("bytes_rehashed"), 0);
        assert_eq!(peer.counter("bytes_from_origin"), 0);
        assert_eq!(peer.counter("bytes_from_peers"), size);
        assert_eq!(peer.counter("bytes_served_to_clients"), size);
        assert_eq!(peer.counter("bad_pieces"), 0);
    }
    let served_to_peers: u64 = std::iter::once(&seed)
        .chain(&peers)
        .map(|p| p.counter("bytes_served_to_peers"))
        .sum();
    assert_eq!(served_to_peers, 3 * size);
    wait_until(
        START_TIMEOUT,
        "the registry to log the blob's bytes",
        || cluster.registry.bytes_served() - before >= size,
    );
    let registry_bytes = cluster.registry.bytes_served() - before;
    assert!(
        registry_bytes * 10 <= size * 12,
        "the registry sent {registry_bytes} bytes for a {size}-byte blob"
    );

    // A range, served from the store of a peer that has the blob.
    let data = random_blob(1);
    let (start, end) = (5 * PIECE_SIZE - 100, 5 * PIECE_SIZE + 99);
    let ranged = peers[0].get(
        &format!("/v2/{REPOSITORY}/blobs/{digest}"),
        &[format!("Range: bytes={start}-{end}")],
    );
    assert_eq!(ranged.status, 206, "{ranged:?}");
    assert!(!ranged.broken);
    assert_eq!(
        ranged.digest,
        sha256_digest(&data[start as usize..=end as usize])
    );
}

#[test]
fn a_seed_that_dies_mid_fetch_is_replaced_by_a_peer_going_to_the_origin() {
    let cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, REPOSITORY, random_blob(9), None);
    // The seed reaches the registry through a proxy that stalls its first
    // blob response after two pieces, for longer than the test.
    let proxy = FaultProxy::start(cluster.registry.addr());
    proxy.inject(
        FaultRule::new(Fault::StallBody {
            after: 2 * PIECE_SIZE,
            duration: Duration::from_secs(3600),
        })
        .method("GET")
        .path_contains("/blobs/"),
    );
    let seed = cluster.peer_with(
        "seed",
        PeerSpec {
            seed: true,
            upstream: Some(proxy.addr()),
            ..PeerSpec::default()
        },
    );
    let a = cluster.peer("a", false);
    let b = cluster.peer("b", false);
    cluster.wait_peers(3);

    let fetched: Vec<Fetched> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|peer| scope.spawn(|| peer.fetch(REPOSITORY, &digest)))
            .collect();
        wait_until(START_TIMEOUT, "the seed to stall after two pieces", || {
            proxy.pending_faults() == 0 && seed.counter("bytes_from_origin") == 2 * PIECE_SIZE
        });
        drop(seed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for one in &fetched {
        assert_correct(one, &digest);
    }
    // What the seed never fetched, peers fetched from the registry: the
    // one the scheduler names once the seed is gone, and (on a slow
    // machine) the other if it ran out of patience before that one's
    // pieces came; neither fetched a byte twice.
    let size = BLOB_SIZE as u64;
    let (from_a, from_b) = (
        a.counter("bytes_from_origin"),
        b.counter("bytes_from_origin"),
    );
    assert!(
        from_a + from_b >= size - 2 * PIECE_SIZE && from_a <= size && from_b <= size,
        "peers fetched {from_a} and {from_b} bytes from the registry"
    );
}

#[test]
fn a_peer_serving_a_corrupt_piece_is_caught_reported_and_no_longer_chosen() {
    let (cluster, digest, seed, peers) = seeded_cluster(2, &["b", "c"]);
    let (b, c) = (&peers[0], &peers[1]);
    assert_correct(&seed.fetch(REPOSITORY, &digest), &digest);
    cluster.wait_verified(&digest, 1);
    corrupt_piece(&seed.data_file(&digest), 2);

    // b gets the bad piece from the seed, rejects it, reports the seed and
    // takes the pieces it still lacks from the registry instead (how many
    // good ones came from the seed first depends on what was in flight).
    assert_correct(&b.fetch(REPOSITORY, &digest), &digest);
    assert_eq!(b.counter("bad_pieces"), 1);
    let from_origin = b.counter("bytes_from_origin");
    assert!(from_origin >= PIECE_SIZE, "{from_origin}");
    assert_eq!(
        from_origin + b.counter("bytes_from_peers"),
        BLOB_SIZE as u64
    );
    // One report does not block the seed for everyone (a member could
    // shut others out), but it is offered only when no one else can serve.
    cluster.wait_status("the seed reported", |s| {
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["reporters"] == 1)
    });
    assert_eq!(cluster.scheduler_metric("reported_peers"), 1);
    assert_eq!(cluster.scheduler_metric("blocked_peers"), 0);
    assert_eq!(cluster.scheduler_metric("bad_peer_reports_total"), 1);

    // c is sent to b only, which holds it all.
    cluster.wait_verified(&digest, 2);
    let seed_served = seed.counter("bytes_served_to_peers");
    assert_correct(&c.fetch(REPOSITORY, &digest), &digest);
    assert_eq!(c.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(c.counter("bad_pieces"), 0);
    assert_eq!(seed.counter("bytes_served_to_peers"), seed_served);

    // The seed's own client never gets the corrupt byte: the response
    // breaks, the copy is dropped, and the next request fetches it again.
    let broken = seed.fetch(REPOSITORY, &digest);
    assert!(broken.broken, "{broken:?}");
    assert_ne!(broken.digest, digest);
    assert_correct(&seed.fetch(REPOSITORY, &digest), &digest);
}

#[test]
fn without_a_scheduler_peers_fetch_from_the_registry_and_a_restarted_one_relearns_holders() {
    let mut cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, REPOSITORY, random_blob(3), None);
    let a = cluster.peer("a", false);
    let b = cluster.peer("b", false);
    cluster.wait_peers(2);
    drop(cluster.scheduler.take());

    let digest = digest.as_str();
    let fetched: Vec<Fetched> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|peer| scope.spawn(move || peer.fetch(REPOSITORY, digest)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (one, peer) in fetched.iter().zip([&a, &b]) {
        assert_correct(one, digest);
        assert_eq!(peer.counter("bytes_from_origin"), BLOB_SIZE as u64);
        assert!(peer.counter("origin_fallbacks") >= 1);
    }

    // A new scheduler learns from the peers' keepalives and reports who
    // holds the blob, and sends a newcomer to them.
    cluster.start_scheduler();
    cluster.wait_verified(digest, 2);
    let c = cluster.peer("c", false);
    cluster.wait_peers(3);
    assert_correct(&c.fetch(REPOSITORY, digest), digest);
    assert_eq!(c.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(c.counter("bytes_from_origin"), 0);
}

#[test]
fn with_two_schedulers_each_blob_has_the_one_its_digest_hashes_to_and_outlives_the_other() {
    let mut cluster = Cluster::start();
    cluster.add_scheduler();
    let schedulers = cluster.scheduler_addrs();
    let addrs: Vec<String> = schedulers.iter().map(ToString::to_string).collect();
    // A blob for each scheduler: the first random blobs that hash to it.
    let mut digests: [Option<String>; 2] = [None, None];
    for blob_seed in 100.. {
        let data = random_blob(blob_seed);
        let digest = sha256_digest(&data);
        let task: darter_p2p::BlobDigest = digest.parse().unwrap();
        let owner = darter_p2p::scheduler_for(&task, &addrs).unwrap();
        if digests[owner].is_none() {
            digests[owner] = Some(push_blob(&cluster.registry, REPOSITORY, data, None));
        }
        if digests.iter().all(Option::is_some) {
            break;
        }
    }
    let digests = digests.map(Option::unwrap);
    let _seed = cluster.peer("seed", true);
    let a = cluster.peer("a", false);
    for scheduler in &schedulers {
        wait_until(
            START_TIMEOUT,
            "every peer registered with each scheduler",
            || {
                cluster.status_of(*scheduler)["peers"]
                    .as_array()
                    .unwrap()
                    .len()
                    == 2
            },
        );
    }
    for digest in &digests {
        assert_correct(&a.fetch(REPOSITORY, digest), digest);
    }
    assert_eq!(a.counter("bytes_from_origin"), 0);
    // Each scheduler knows its own blob only.
    for (scheduler, digest) in schedulers.iter().zip(&digests) {
        let status = cluster.status_of(*scheduler);
        let tasks: Vec<&str> = status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task"].as_str().unwrap())
            .collect();
        assert_eq!(tasks, [digest.as_str()], "{scheduler}");
    }

    // The first scheduler dies: its blob comes from the origin, the
    // other's still from peers.
    drop(cluster.scheduler.take());
    let b = cluster.peer("b", false);
    wait_until(
        START_TIMEOUT,
        "b registered with the second scheduler",
        || {
            cluster.status_of(schedulers[1])["peers"]
                .as_array()
                .unwrap()
                .len()
                == 3
        },
    );
    assert_correct(&b.fetch(REPOSITORY, &digests[1]), &digests[1]);
    assert_eq!(b.counter("bytes_from_origin"), 0);
    assert_correct(&b.fetch(REPOSITORY, &digests[0]), &digests[0]);
    assert_eq!(b.counter("bytes_from_origin"), BLOB_SIZE as u64);
    assert_eq!(b.counter("bytes_from_peers"), BLOB_SIZE as u64);
}

#[test]
fn a_dead_parent_costs_only_a_retry_at_another_parent() {
    let (cluster, digest, seed, peers) = seeded_cluster(4, &["a", "b"]);
    let (a, b) = (&peers[0], &peers[1]);
    assert_correct(&a.fetch(REPOSITORY, &digest), &digest);
    cluster.wait_verified(&digest, 2);

    // The seed dies; the scheduler still lists it until its keepalives
    // are missed, so b is sent to it and to a.
    drop(seed);
    assert_correct(&b.fetch(REPOSITORY, &digest), &digest);
    assert_eq!(b.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(b.counter("bytes_from_origin"), 0);
    assert_eq!(a.counter("bytes_served_to_peers"), BLOB_SIZE as u64);
}

#[test]
fn the_mirror_serves_blobs_only_to_clients_the_registry_admits_and_passes_credentials_on() {
    let users = vec![("alice".to_owned(), "wonderland".to_owned())];
    let cluster = Cluster::with_registry(TestRegistry::start_with(&RegistryAuth::Htpasswd(users)));
    let digest = push_blob(
        &cluster.registry,
        REPOSITORY,
        random_blob(5),
        Some(("alice", "wonderland")),
    );
    let peer = cluster.peer("a", false);
    cluster.wait_peers(1);
    let blob = format!("/v2/{REPOSITORY}/blobs/{digest}");

    // Without credentials the registry's challenge comes back, for the
    // API root and for the blob alike, and no blob byte is sent.
    for path in ["/v2/", blob.as_str()] {
        let refused = peer.get(path, &[]);
        assert_eq!(refused.status, 401, "{path}: {refused:?}");
        assert!(
            refused.head.contains("www-authenticate: basic"),
            "{refused:?}"
        );
    }
    assert_eq!(peer.counter("bytes_served_to_clients"), 0);

    let login = "Authorization: Basic YWxpY2U6d29uZGVybGFuZA==".to_owned();
    assert_eq!(peer.get("/v2/", std::slice::from_ref(&login)).status, 200);
    assert_correct(&peer.get(&blob, &[login]), &digest);
    assert_eq!(peer.counter("bytes_from_origin"), BLOB_SIZE as u64);
}

#[test]
fn range_reads_of_one_blob_by_one_client_cost_one_upstream_head_and_refusals_are_not_remembered() {
    let users = vec![("alice".to_owned(), "wonderland".to_owned())];
    let cluster = Cluster::with_registry(TestRegistry::start_with(&RegistryAuth::Htpasswd(users)));
    let data = random_blob(8);
    let digest = push_blob(
        &cluster.registry,
        REPOSITORY,
        data.clone(),
        Some(("alice", "wonderland")),
    );
    let proxy = FaultProxy::start(cluster.registry.addr());
    let peer = peer_behind(&cluster, &proxy);
    let blob = format!("/v2/{REPOSITORY}/blobs/{digest}");
    let heads = || {
        proxy
            .requests()
            .iter()
            .filter(|r| r.method == "HEAD" && r.path == blob)
            .count()
    };
    let alice = "Authorization: Basic YWxpY2U6d29uZGVybGFuZA==".to_owned();
    let wrong_password = "Authorization: Basic YWxpY2U6d3Jvbmc=".to_owned();

    // A refusal is asked about again every time.
    for (n, headers) in [vec![wrong_password.clone()], vec![wrong_password], vec![]]
        .into_iter()
        .enumerate()
    {
        assert_eq!(peer.get(&blob, &headers).status, 401, "{headers:?}");
        assert_eq!(heads(), n + 1);
    }
    assert_eq!(peer.counter("bytes_served_to_clients"), 0);

    // An admitted client reading in ranges: one HEAD for all of them.
    for i in 0..6 {
        let (start, end) = (i * 7 * (1 << 20) + 17, i * 7 * (1 << 20) + 65_552);
        let range = format!("Range: bytes={start}-{end}");
        let ranged = peer.get(&blob, &[alice.clone(), range]);
        assert_eq!(ranged.status, 206, "{ranged:?}");
        assert_eq!(ranged.digest, sha256_digest(&data[start..=end]));
    }
    assert_eq!(heads(), 4);
}

#[test]
fn pieces_are_served_only_to_cluster_members_and_only_by_digest() {
    let cluster = Cluster::start();
    let peer = cluster.peer("a", false);
    let digest = format!("sha256:{}", "0".repeat(64));
    for (path, token, status) in [
        (format!("/pieces/{digest}/0"), None, 401),
        (format!("/pieces/{digest}/0"), Some("wrong"), 401),
        (format!("/pieces/{digest}/0"), Some("cluster-secret"), 404),
        (
            "/pieces/sha256:..%2F..%2Fetc/0".to_owned(),
            Some("cluster-secret"),
            404,
        ),
        ("/metrics".to_owned(), Some("cluster-secret"), 404),
    ] {
        let mut stream = TcpStream::connect(peer.pieces).unwrap();
        let token = token
            .map(|t| format!("x-darter-cluster-token: {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{token}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert_eq!(&reply[9..12], status.to_string(), "{path} with {token:?}");
    }
}

#[test]
fn a_parent_stalling_mid_piece_then_killed_costs_only_a_retry_at_another_parent() {
    let cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, REPOSITORY, random_blob(6), None);
    // a's piece server is reached through a fault proxy.
    let a_pieces = loopback(free_port());
    let proxy = FaultProxy::start(a_pieces);
    let a = cluster.peer_with(
        "a",
        PeerSpec {
            pieces: Some(a_pieces),
            advertise: Some(proxy.addr()),
            ..PeerSpec::default()
        },
    );
    let b = cluster.peer("b", false);
    let c = cluster.peer("c", false);
    cluster.wait_peers(3);
    assert_correct(&a.fetch(REPOSITORY, &digest), &digest);
    cluster.wait_verified(&digest, 1);
    assert_correct(&b.fetch(REPOSITORY, &digest), &digest);
    cluster.wait_verified(&digest, 2);

    // The next piece a sends stops after 1 MiB, for longer than the test.
    proxy.clear_log();
    proxy.inject(
        FaultRule::new(Fault::StallBody {
            after: 1 << 20,
            duration: Duration::from_secs(3600),
        })
        .path_contains("/pieces/"),
    );
    std::thread::scope(|scope| {
        let fetch = scope.spawn(|| c.fetch(REPOSITORY, &digest));
        wait_until(START_TIMEOUT, "a piece from a to stall", || {
            proxy.pending_faults() == 0
        });
        drop(a);
        assert_correct(&fetch.join().unwrap(), &digest);
    });
    let stalled = proxy.requests();
    assert!(
        matches!(stalled[0].fault, Some(Fault::StallBody { .. })),
        "{stalled:?}"
    );
    // Every piece came from peers, those a never finished from b.
    assert_eq!(c.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(c.counter("bytes_from_origin"), 0);
    assert_eq!(c.counter("bad_pieces"), 0);
    assert!(b.counter("bytes_served_to_peers") >= PIECE_SIZE);
}

#[test]
fn a_range_is_served_from_the_pieces_it_covers_before_the_rest_of_the_blob_arrives() {
    let cluster = Cluster::start();
    let data = random_blob(7);
    let digest = push_blob(&cluster.registry, REPOSITORY, data.clone(), None);
    // Every blob GET from the registry stops for good after 5 MiB, so the
    // blob is never complete: only the pieces of the first request arrive.
    let proxy = FaultProxy::start(cluster.registry.addr());
    proxy.inject(
        FaultRule::new(Fault::StallBody {
            after: 5 << 20,
            duration: Duration::from_secs(3600),
        })
        .method("GET")
        .path_contains("/blobs/")
        .times(usize::MAX),
    );
    let a = peer_behind(&cluster, &proxy);

    // Bytes deep in the blob: their piece is fetched first and sent.
    let (start, end) = (12 * PIECE_SIZE + 1000, 12 * PIECE_SIZE + 99_999);
    let ranged = a.get(
        &format!("/v2/{REPOSITORY}/blobs/{digest}"),
        &[format!("Range: bytes={start}-{end}")],
    );
    assert_eq!(ranged.status, 206, "{ranged:?}");
    assert!(!ranged.broken, "{ranged:?}");
    assert_eq!(
        ranged.digest,
        sha256_digest(&data[start as usize..=end as usize])
    );
    let status = cluster.status();
    let task = &status["tasks"][0];
    assert_eq!(task["verified"], 0, "{status:#}");
    assert_eq!(a.counter("bytes_from_origin"), PIECE_SIZE);
}
