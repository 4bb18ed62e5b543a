//! P2P blob distribution, all real: a registry (`docker-registry`) on
//! loopback, `darter scheduler` and several `darter peer` processes, and
//! clients fetching a random 64 MiB blob through the peers' registry
//! mirrors. The registry must send it about once; a peer whose store
//! corrupts a piece is caught, reported and no longer chosen; with the
//! scheduler dead, peers still complete from the origin, and after its
//! restart it relearns what peers hold.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::DARTER;
use darter_registry::{
    BlobSource, Client, ClientConfig, CredentialSource, Digest, Repository, Secret,
};
use darter_testkit::process::{ChildGuard, free_port, wait_until};
use darter_testkit::registry::{RegistryAuth, TestRegistry};
use sha2::{Digest as _, Sha256};

const BLOB_SIZE: usize = 64 << 20;
const PIECE_SIZE: u64 = 4 << 20;
const REPOSITORY: &str = "p2p/blob";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes no compressor or dedup could shortcut (xorshift64*).
fn random_blob(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(BLOB_SIZE);
    while data.len() < BLOB_SIZE {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes `data` to the registry, as `login` (user, password) if given;
/// returns its digest.
fn push_blob(registry: &TestRegistry, data: Vec<u8>, login: Option<(&str, &str)>) -> String {
    let digest = sha256_digest(&data);
    let mut credentials = CredentialSource::anonymous();
    if let Some((user, password)) = login {
        credentials = credentials.with_explicit(&registry.host(), user, Secret::new(password));
    }
    let config = ClientConfig::default()
        .with_plain_http(registry.host())
        .with_credentials(credentials);
    let client = Client::new(config).unwrap();
    let repository = Repository::parse(&format!("{}/{REPOSITORY}", registry.host())).unwrap();
    let parsed: Digest = digest.parse().unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.push_blob(&repository, &parsed, &BlobSource::Bytes(data.into()), None))
        .unwrap();
    digest
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// What one GET through a mirror returned.
#[derive(Debug)]
struct Fetched {
    status: u16,
    /// The response head, lowercased.
    head: String,
    length: u64,
    digest: String,
    /// The body was shorter than its Content-Length, or the connection broke.
    broken: bool,
}

/// `GET path` with HTTP/1.1 and `headers` (`Name: value`) on a fresh
/// connection; hashes the body as it streams.
fn get(addr: SocketAddr, path: &str, headers: &[String]) -> Fetched {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(FETCH_TIMEOUT)).unwrap();
    let headers: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return Fetched {
                status: 0,
                head: String::new(),
                length: 0,
                digest: String::new(),
                broken: true,
            };
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let expected: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut broken = false;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                length += n as u64;
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Fetched {
        status,
        head,
        length,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        broken: broken || length != expected,
    }
}

/// A `darter` process logging to a file; killed on drop.
struct Process {
    guard: ChildGuard,
    log: PathBuf,
}

impl Process {
    fn start(args: &[String], log: PathBuf) -> Process {
        let file = File::create(&log).unwrap();
        let mut cmd = Command::new(DARTER);
        cmd.args(args)
            .arg("-v")
            .env("DARTER_CONFIG", "/dev/null")
            .env_remove("DARTER_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        Process {
            guard: ChildGuard::spawn(&mut cmd).unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        let exited = self.guard.child().try_wait().unwrap();
        assert!(exited.is_none(), "exited with {exited:?}:\n{}", self.log());
    }
}

/// A cluster's shared parts: its directory, token, registry and scheduler.
struct Cluster {
    dir: tempfile::TempDir,
    registry: TestRegistry,
    scheduler_addr: SocketAddr,
    scheduler: Option<Process>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "cluster-secret\n").unwrap();
        let mut cluster = Cluster {
            registry: TestRegistry::start(),
            scheduler_addr: loopback(free_port()),
            scheduler: None,
            dir,
        };
        cluster.start_scheduler();
        cluster
    }

    fn token_file(&self) -> String {
        self.dir.path().join("token").display().to_string()
    }

    fn start_scheduler(&mut self) {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let args = [
            "scheduler".into(),
            "--listen".into(),
            self.scheduler_addr.to_string(),
            "--token-file".into(),
            self.token_file(),
        ];
        let mut scheduler =
            Process::start(&args, self.dir.path().join(format!("scheduler-{n}.log")));
        wait_until(START_TIMEOUT, "the scheduler to listen", || {
            scheduler.assert_running();
            accepts(self.scheduler_addr)
        });
        self.scheduler = Some(scheduler);
    }

    /// Waits until the running scheduler has logged `line` `count` times.
    fn wait_scheduler_log(&self, line: &str, count: usize) {
        let scheduler = self.scheduler.as_ref().unwrap();
        wait_until(
            START_TIMEOUT,
            &format!("{count} x {line:?} in the scheduler log"),
            || scheduler.log().matches(line).count() >= count,
        );
    }

    fn peer(&self, name: &str, seed: bool) -> Peer {
        let store = self.dir.path().join(format!("store-{name}"));
        let (mirror, pieces, metrics) = (
            loopback(free_port()),
            loopback(free_port()),
            loopback(free_port()),
        );
        let mut args: Vec<String> = [
            "peer",
            "--scheduler",
            &self.scheduler_addr.to_string(),
            "--upstream",
            &self.registry.url(),
            "--mirror-listen",
            &mirror.to_string(),
            "--piece-listen",
            &pieces.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
            "--store",
            &store.display().to_string(),
            "--store-size",
            "1G",
            "--token-file",
            &self.token_file(),
        ]
        .map(String::from)
        .to_vec();
        if seed {
            args.push("--seed".into());
        }
        let mut process = Process::start(&args, self.dir.path().join(format!("peer-{name}.log")));
        wait_until(START_TIMEOUT, &format!("peer {name} to listen"), || {
            process.assert_running();
            accepts(mirror) && accepts(metrics)
        });
        Peer {
            mirror,
            pieces,
            metrics,
            store,
            _process: process,
        }
    }
}

struct Peer {
    mirror: SocketAddr,
    pieces: SocketAddr,
    metrics: SocketAddr,
    store: PathBuf,
    _process: Process,
}

impl Peer {
    fn fetch(&self, digest: &str) -> Fetched {
        self.get(&format!("/v2/{REPOSITORY}/blobs/{digest}"), &[])
    }

    /// `GET path` through the peer's mirror.
    fn get(&self, path: &str, headers: &[String]) -> Fetched {
        get(self.mirror, path, headers)
    }

    /// The counters, through `darter peer status --json`.
    fn status(&self) -> serde_json::Value {
        let out = Command::new(DARTER)
            .args(["peer", "status", "--json", "--metrics-addr"])
            .arg(self.metrics.to_string())
            .env("DARTER_CONFIG", "/dev/null")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn counter(&self, name: &str) -> u64 {
        self.status()[name].as_u64().unwrap()
    }

    fn data_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.store
            .join("tasks")
            .join(format!("sha256-{hex}"))
            .join("data")
    }
}

/// A cluster holding a random blob (from `blob_seed`), with a seed peer
/// and peers named `names`, all registered with the scheduler.
fn seeded_cluster(blob_seed: u64, names: &[&str]) -> (Cluster, String, Peer, Vec<Peer>) {
    let cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, random_blob(blob_seed), None);
    let seed = cluster.peer("seed", true);
    let peers: Vec<Peer> = names.iter().map(|n| cluster.peer(n, false)).collect();
    cluster.wait_scheduler_log("peer registered", names.len() + 1);
    (cluster, digest, seed, peers)
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
            .map(|peer| scope.spawn(|| peer.fetch(&digest)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for one in &fetched {
        assert_correct(one, &digest);
    }

    // The seed fetched the blob from the registry once; the others took
    // every piece from peers.
    let size = BLOB_SIZE as u64;
    assert_eq!(seed.counter("bytes_from_origin"), size);
    for peer in &peers {
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
fn a_peer_serving_a_corrupt_piece_is_caught_reported_and_no_longer_chosen() {
    let (cluster, digest, seed, peers) = seeded_cluster(2, &["b", "c"]);
    let (b, c) = (&peers[0], &peers[1]);
    assert_correct(&seed.fetch(&digest), &digest);
    cluster.wait_scheduler_log("peer holds the whole task", 1);
    corrupt_piece(&seed.data_file(&digest), 2);

    // b gets the bad piece from the seed, rejects it, reports the seed and
    // takes the pieces it still lacks from the registry instead (how many
    // good ones came from the seed first depends on what was in flight).
    assert_correct(&b.fetch(&digest), &digest);
    assert_eq!(b.counter("bad_pieces"), 1);
    let from_origin = b.counter("bytes_from_origin");
    assert!(from_origin >= PIECE_SIZE, "{from_origin}");
    assert_eq!(
        from_origin + b.counter("bytes_from_peers"),
        BLOB_SIZE as u64
    );
    cluster.wait_scheduler_log("no longer chosen", 1);

    // c is sent to b only: the seed serves no one any more.
    cluster.wait_scheduler_log("peer holds the whole task", 2);
    let seed_served = seed.counter("bytes_served_to_peers");
    assert_correct(&c.fetch(&digest), &digest);
    assert_eq!(c.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(c.counter("bad_pieces"), 0);
    assert_eq!(seed.counter("bytes_served_to_peers"), seed_served);

    // The seed's own client never gets the corrupt byte: the response
    // breaks, the copy is dropped, and the next request fetches it again.
    let broken = seed.fetch(&digest);
    assert!(broken.broken, "{broken:?}");
    assert_ne!(broken.digest, digest);
    assert_correct(&seed.fetch(&digest), &digest);
}

#[test]
fn without_a_scheduler_peers_fetch_from_the_registry_and_a_restarted_one_relearns_holders() {
    let mut cluster = Cluster::start();
    let digest = push_blob(&cluster.registry, random_blob(3), None);
    let a = cluster.peer("a", false);
    let b = cluster.peer("b", false);
    cluster.wait_scheduler_log("peer registered", 2);
    drop(cluster.scheduler.take());

    let digest = digest.as_str();
    let fetched: Vec<Fetched> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|peer| scope.spawn(move || peer.fetch(digest)))
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
    cluster.wait_scheduler_log("peer holds the whole task", 2);
    let c = cluster.peer("c", false);
    cluster.wait_scheduler_log("peer registered", 3);
    assert_correct(&c.fetch(digest), digest);
    assert_eq!(c.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(c.counter("bytes_from_origin"), 0);
}

#[test]
fn a_dead_parent_costs_only_a_retry_at_another_parent() {
    let (cluster, digest, seed, peers) = seeded_cluster(4, &["a", "b"]);
    let (a, b) = (&peers[0], &peers[1]);
    assert_correct(&a.fetch(&digest), &digest);
    cluster.wait_scheduler_log("peer holds the whole task", 2);

    // The seed dies; the scheduler still lists it until its keepalives
    // are missed, so b is sent to it and to a.
    drop(seed);
    assert_correct(&b.fetch(&digest), &digest);
    assert_eq!(b.counter("bytes_from_peers"), BLOB_SIZE as u64);
    assert_eq!(b.counter("bytes_from_origin"), 0);
    assert_eq!(a.counter("bytes_served_to_peers"), BLOB_SIZE as u64);
}

#[test]
fn the_mirror_serves_blobs_only_to_clients_the_registry_admits_and_passes_credentials_on() {
    let users = vec![("alice".to_owned(), "wonderland".to_owned())];
    let mut cluster = Cluster::start();
    cluster.registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users));
    let digest = push_blob(
        &cluster.registry,
        random_blob(5),
        Some(("alice", "wonderland")),
    );
    let peer = cluster.peer("a", false);
    cluster.wait_scheduler_log("peer registered", 1);
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
