//! A real P2P cluster for the tests: a registry (`docker-registry`) on
//! loopback, `darter scheduler` and `darter peer` processes, each with its
//! own ports and directories, killed on drop; a plain HTTP client for the
//! peers' mirrors; and readers of the peers' and the scheduler's status.
//!
//! A test binary using these declares `mod common; mod p2p_common;`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use darter_registry::{
    BlobSource, Client, ClientConfig, CredentialSource, Digest, Repository, Secret,
};
use darter_testkit::blob_http;
pub use darter_testkit::blob_http::{Fetched, sha256_digest};
use darter_testkit::process::{ChildGuard, free_port, wait_until};
use darter_testkit::registry::TestRegistry;
use serde_json::Value;

use crate::common::DARTER;

pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Pushes `data` to `repository` of the registry, as `login` (user,
/// password) if given; returns its digest.
pub fn push_blob(
    registry: &TestRegistry,
    repository: &str,
    data: Vec<u8>,
    login: Option<(&str, &str)>,
) -> String {
    let digest = sha256_digest(&data);
    let mut credentials = CredentialSource::anonymous();
    if let Some((user, password)) = login {
        credentials = credentials.with_explicit(&registry.host(), user, Secret::new(password));
    }
    let config = ClientConfig::default()
        .with_plain_http(registry.host())
        .with_credentials(credentials);
    let client = Client::new(config).unwrap();
    let repository = Repository::parse(&format!("{}/{repository}", registry.host())).unwrap();
    let parsed: Digest = digest.parse().unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.push_blob(&repository, &parsed, &BlobSource::Bytes(data.into()), None))
        .unwrap();
    digest
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// `GET path` from `addr` (see [`blob_http::get`]).
pub fn get(addr: SocketAddr, path: &str, headers: &[String]) -> Fetched {
    blob_http::get(addr, path, headers).unwrap()
}

/// A `darter` process logging to a file; killed on drop.
pub struct Process {
    guard: ChildGuard,
    log: PathBuf,
}

impl Process {
    pub fn start(args: &[String], log: PathBuf) -> Process {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        let exited = self.guard.child().try_wait().unwrap();
        assert!(exited.is_none(), "exited with {exited:?}:\n{}", self.log());
    }
}

/// `darter ARGS` run to the end, asserting success; its stdout as JSON.
fn darter_json(args: &[String]) -> Value {
    let out = Command::new(DARTER)
        .args(args)
        .env("DARTER_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "darter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A cluster's shared parts: its directory, token, registry and scheduler.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub registry: TestRegistry,
    pub scheduler_addr: SocketAddr,
    pub scheduler_metrics: SocketAddr,
    pub scheduler: Option<Process>,
    /// More schedulers ([`Cluster::add_scheduler`]): peers started after
    /// one is added are given all of them.
    pub more_schedulers: Vec<(SocketAddr, Process)>,
}

/// How to start a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerSpec {
    /// `--seed`.
    pub seed: bool,
    /// Where its piece server listens (default: a free port).
    pub pieces: Option<SocketAddr>,
    /// `--advertise` (e.g. a fault proxy in front of its piece server).
    pub advertise: Option<SocketAddr>,
    /// `--upstream` (default: the cluster's registry).
    pub upstream: Option<SocketAddr>,
}

impl Cluster {
    /// A cluster around a fresh anonymous registry.
    pub fn start() -> Cluster {
        Cluster::with_registry(TestRegistry::start())
    }

    pub fn with_registry(registry: TestRegistry) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "cluster-secret\n").unwrap();
        let mut cluster = Cluster {
            registry,
            scheduler_addr: loopback(free_port()),
            scheduler_metrics: loopback(free_port()),
            scheduler: None,
            more_schedulers: Vec::new(),
            dir,
        };
        cluster.start_scheduler();
        cluster
    }

    pub fn token_file(&self) -> String {
        self.dir.path().join("token").display().to_string()
    }

    pub fn start_scheduler(&mut self) {
        self.scheduler = Some(self.spawn_scheduler(self.scheduler_addr, self.scheduler_metrics));
    }

    /// Starts another scheduler; returns where it listens.
    pub fn add_scheduler(&mut self) -> SocketAddr {
        let addr = loopback(free_port());
        let process = self.spawn_scheduler(addr, loopback(free_port()));
        self.more_schedulers.push((addr, process));
        addr
    }

    fn spawn_scheduler(&self, addr: SocketAddr, metrics: SocketAddr) -> Process {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let args = [
            "scheduler".into(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--token-file".into(),
            self.token_file(),
        ];
        let mut scheduler =
            Process::start(&args, self.dir.path().join(format!("scheduler-{n}.log")));
        wait_until(START_TIMEOUT, "the scheduler to listen", || {
            scheduler.assert_running();
            accepts(addr) && accepts(metrics)
        });
        scheduler
    }

    /// Every scheduler's address, the first one's first.
    pub fn scheduler_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.scheduler_addr)
            .chain(self.more_schedulers.iter().map(|(addr, _)| *addr))
            .collect()
    }

    /// What the scheduler knows, through `darter scheduler status --json`.
    pub fn status(&self) -> Value {
        self.status_of(self.scheduler_addr)
    }

    /// What the scheduler at `addr` knows.
    pub fn status_of(&self, addr: SocketAddr) -> Value {
        darter_json(&[
            "scheduler".into(),
            "status".into(),
            "--json".into(),
            "--scheduler".into(),
            addr.to_string(),
            "--token-file".into(),
            self.token_file(),
        ])
    }

    /// Waits until the scheduler's status satisfies `condition`.
    pub fn wait_status(&self, what: &str, condition: impl Fn(&Value) -> bool) {
        wait_until(START_TIMEOUT, what, || condition(&self.status()));
    }

    /// Waits until `count` peers are registered.
    pub fn wait_peers(&self, count: usize) {
        self.wait_status(&format!("{count} peers registered"), |s| {
            s["peers"].as_array().unwrap().len() >= count
        });
    }

    /// Waits until `count` peers hold the whole of `digest`, verified.
    pub fn wait_verified(&self, digest: &str, count: u64) {
        self.wait_status(&format!("{count} peers holding {digest}"), |s| {
            s["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["task"] == digest && t["verified"].as_u64().unwrap() >= count)
        });
    }

    /// The scheduler's Prometheus page (with the response head).
    pub fn scheduler_metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.scheduler_metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        reply
    }

    /// The value of the scheduler's metric `name` (`darter_scheduler_NAME`).
    pub fn scheduler_metric(&self, name: &str) -> u64 {
        let name = format!("darter_scheduler_{name} ");
        let page = self.scheduler_metrics();
        page.lines()
            .find_map(|line| line.strip_prefix(&name))
            .unwrap_or_else(|| {
                panic!(
                    "no {name}in
{page}"
                )
            })
            .trim()
            .parse()
            .unwrap()
    }

    pub fn peer(&self, name: &str, seed: bool) -> Peer {
        self.peer_with(
            name,
            PeerSpec {
                seed,
                ..PeerSpec::default()
            },
        )
    }

    pub fn peer_with(&self, name: &str, spec: PeerSpec) -> Peer {
        let store = self.dir.path().join(format!("store-{name}"));
        let (mirror, metrics) = (loopback(free_port()), loopback(free_port()));
        let pieces = spec.pieces.unwrap_or_else(|| loopback(free_port()));
        let upstream = spec
            .upstream
            .map_or_else(|| self.registry.url(), |addr| format!("http://{addr}"));
        let mut args: Vec<String> = [
            "peer",
            "--upstream",
            &upstream,
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
        for scheduler in self.scheduler_addrs() {
            args.extend(["--scheduler".into(), scheduler.to_string()]);
        }
        if spec.seed {
            args.push("--seed".into());
        }
        if let Some(advertise) = spec.advertise {
            args.extend(["--advertise".into(), advertise.to_string()]);
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
            process,
        }
    }
}

pub struct Peer {
    pub mirror: SocketAddr,
    pub pieces: SocketAddr,
    pub metrics: SocketAddr,
    pub store: PathBuf,
    pub process: Process,
}

impl Peer {
    /// `GET /v2/REPOSITORY/blobs/DIGEST` through the peer's mirror.
    pub fn fetch(&self, repository: &str, digest: &str) -> Fetched {
        self.get(&format!("/v2/{repository}/blobs/{digest}"), &[])
    }

    /// `GET path` through the peer's mirror.
    pub fn get(&self, path: &str, headers: &[String]) -> Fetched {
        get(self.mirror, path, headers)
    }

    /// The counters, through `darter peer status --json`.
    pub fn status(&self) -> Value {
        darter_json(&[
            "peer".into(),
            "status".into(),
            "--json".into(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
        ])
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status()[name].as_u64().unwrap()
    }

    /// Where the peer stores `digest`'s bytes.
    pub fn data_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.store
            .join("tasks")
            .join(format!("sha256-{hex}"))
            .join("data")
    }
}
