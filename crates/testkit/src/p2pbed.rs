//! A P2P test bed in network namespaces: a bridge in a hub namespace, and
//! joined to it by veth pairs, a registry (`docker-registry`) in its own
//! namespace behind a TBF rate limit, `darter scheduler` in its own, a
//! seed peer and N peers (`darter peer`), each in its own namespace with
//! its own TBF cap in both directions. Clients run inside a peer's
//! namespace, as containerd on that node would, and fetch through its
//! registry mirror, or straight from the registry over the same capped
//! link.
//!
//! Every namespace comes from [`crate::netns`] (named after this process,
//! unique per bed, so beds run in parallel); the bed's files (registry
//! storage, piece stores, logs) live in one temporary directory. Dropping
//! the [`P2pBed`] kills every process, deletes the namespaces and removes
//! the directory, also when a test panics.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;

use crate::blob_http::{self, Fetched};
use crate::netns::{self, LinkRate, Netns};
use crate::process::ChildGuard;
use crate::registry::TestRegistry;

const BRIDGE: &str = "br0";
/// The veth end inside every member namespace.
const MEMBER_IF: &str = "eth0";
const REGISTRY_PORT: u16 = 5000;
const SCHEDULER_PORT: u16 = 7000;
const MIRROR_PORT: u16 = 5001;
const PIECE_PORT: u16 = 7001;
const METRICS_PORT: u16 = 9090;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const TOKEN: &str = "p2p-bed-cluster-token";

/// What to build.
#[derive(Debug, Clone)]
pub struct P2pBedConfig {
    /// The `darter` binary the scheduler and peers run.
    pub darter: PathBuf,
    /// Peers besides the seed.
    pub peers: usize,
    /// The cap on what the registry sends.
    pub registry_rate: LinkRate,
    /// Each peer's (and the seed's) cap, in each direction.
    pub peer_rate: LinkRate,
    /// Where the bed's temporary directory goes (stores need room for
    /// every peer's copy of the blobs).
    pub parent_dir: PathBuf,
    /// Each peer's piece store limit in bytes.
    pub store_limit: u64,
}

/// A peer's counters, as `darter peer status --json` shows them (by the
/// names the peer gives them, e.g. `bytes_served_to_peers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCounters(BTreeMap<String, u64>);

impl PeerCounters {
    fn parse(json: &[u8]) -> anyhow::Result<PeerCounters> {
        let value: serde_json::Value =
            serde_json::from_slice(json).context("parsing darter peer status --json")?;
        let object = value
            .as_object()
            .with_context(|| format!("not a JSON object: {value}"))?;
        let counters = object
            .iter()
            .map(|(name, v)| {
                let n = v.as_u64().with_context(|| format!("{name} is {v}"))?;
                Ok((name.clone(), n))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(PeerCounters(counters))
    }

    /// The counter `name`; a name the peer does not report is a test bug.
    pub fn get(&self, name: &str) -> u64 {
        match self.0.get(name) {
            Some(value) => *value,
            None => panic!("no counter {name:?} in {:?}", self.0),
        }
    }
}

/// A `darter` process in a namespace, logging to a file; killed on drop.
#[derive(Debug)]
struct DarterProcess {
    guard: ChildGuard,
    log: PathBuf,
}

impl DarterProcess {
    fn start(ns: &Netns, darter: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut inner = Command::new(darter);
        inner
            .args(args)
            .arg("-v")
            .env("DARTER_CONFIG", "/dev/null")
            .env_remove("DARTER_LOG");
        let mut cmd = ns.wrap(&inner);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let guard = ChildGuard::spawn(&mut cmd)
            .with_context(|| format!("starting {} {}", darter.display(), args.join(" ")))?;
        Ok(DarterProcess { guard, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(self.guard.id())
    }
}

/// Clock ticks per second of `/proc` times: Linux's `USER_HZ`, 100 on
/// every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds process `pid` has used so far (fields 14
/// and 15 of `/proc/PID/stat`, in clock ticks).
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("no command name in {path}"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |field: usize| -> anyhow::Result<u64> {
        // `after_name` starts at field 3.
        fields
            .get(field - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {field} of {path}: {stat:?}"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / USER_HZ)
}

/// A peer (or the seed) of the bed, in its own namespace.
#[derive(Debug)]
pub struct BedPeer {
    // Fields drop in order: the process before its namespace.
    process: Mutex<Option<DarterProcess>>,
    ns: Netns,
    darter: PathBuf,
    name: String,
    log: PathBuf,
    /// Where clients on this peer's node reach its registry mirror.
    pub mirror: SocketAddr,
    /// Its Prometheus metrics.
    pub metrics: SocketAddr,
}

impl BedPeer {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `GET` of a blob through this peer's mirror, from inside its node.
    pub fn fetch_through_mirror(&self, repository: &str, digest: &str) -> anyhow::Result<Fetched> {
        self.fetch_from(self.mirror, repository, digest)
    }

    /// `GET` of a blob from `addr`, from inside this peer's node (e.g.
    /// straight from the registry, over the peer's capped link).
    pub fn fetch_from(
        &self,
        addr: SocketAddr,
        repository: &str,
        digest: &str,
    ) -> anyhow::Result<Fetched> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        self.ns
            .run(|| blob_http::get(addr, &path, &[]))?
            .with_context(|| format!("GET {path} from {addr} on {}", self.name))
    }

    /// The peer's counters, through `darter peer status --json`.
    pub fn counters(&self) -> anyhow::Result<PeerCounters> {
        let mut status = Command::new(&self.darter);
        status
            .args(["peer", "status", "--json", "--metrics-addr"])
            .arg(self.metrics.to_string())
            .env("DARTER_CONFIG", "/dev/null");
        let out = netns::output(&mut self.ns.wrap(&status))
            .with_context(|| format!("status of peer {}", self.name))?;
        PeerCounters::parse(&out)
    }

    /// Kills the peer with SIGKILL (no goodbye to anyone); it may be
    /// serving while clients fetch through other peers.
    pub fn kill(&self) {
        drop(self.process().take());
    }

    /// Whether the peer's process was killed.
    pub fn killed(&self) -> bool {
        self.process().is_none()
    }

    /// The peer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU seconds (user and system) its process has used; zero once it
    /// was killed.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.process()
            .as_ref()
            .map_or(Ok(0.0), DarterProcess::cpu_seconds)
            .with_context(|| format!("CPU time of peer {}", self.name))
    }

    fn process(&self) -> MutexGuard<'_, Option<DarterProcess>> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether its mirror and metrics servers accept connections.
    fn listening(&self) -> bool {
        let addrs = [self.mirror, self.metrics];
        self.ns
            .run(|| addrs.iter().all(|a| accepts(*a)))
            .unwrap_or(false)
    }
}

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The whole bed. See the module doc.
#[derive(Debug)]
pub struct P2pBed {
    // Fields drop in order: processes, then the registry, then the
    // namespaces, then the directory.
    peers: Vec<BedPeer>,
    seed: BedPeer,
    scheduler: DarterProcess,
    registry: TestRegistry,
    scheduler_ns: Netns,
    registry_ns: Netns,
    hub: Netns,
    dir: tempfile::TempDir,
}

/// Address `host` of the bed's /24.
fn bed_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 232, 0, host)
}

/// Hosts: the registry is .1, the scheduler .2, the seed .3, peers from .10.
const FIRST_PEER_HOST: usize = 10;

impl P2pBed {
    /// Builds the network, starts the registry, the scheduler, the seed and
    /// the peers, and waits until every peer has registered with the
    /// scheduler. Removes the namespaces of dead earlier runs first.
    pub fn start(config: &P2pBedConfig) -> anyhow::Result<P2pBed> {
        let max_peers = 254 - FIRST_PEER_HOST;
        anyhow::ensure!(config.peers <= max_peers, "at most {max_peers} peers");
        netns::remove_stale_namespaces();
        std::fs::create_dir_all(&config.parent_dir)
            .with_context(|| format!("creating {}", config.parent_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("darter-p2pbed-")
            .tempdir_in(&config.parent_dir)
            .with_context(|| format!("a directory in {}", config.parent_dir.display()))?;
        let group = netns::group_name("p2p");
        let hub = Netns::create(format!("{group}-hub"))?;
        hub.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        hub.ip(&["link", "set", BRIDGE, "up"])?;
        let join = |role: &str, host: u8, rate: Option<LinkRate>| -> anyhow::Result<Netns> {
            let ns = Netns::create(format!("{group}-{role}"))?;
            let hub_end = format!("v{host}");
            netns::veth(&ns, MEMBER_IF, &hub, &hub_end)?;
            hub.ip(&["link", "set", &hub_end, "master", BRIDGE])?;
            hub.ip(&["link", "set", &hub_end, "up"])?;
            ns.address(MEMBER_IF, &format!("{}/24", bed_ip(host)))?;
            if let Some(rate) = rate {
                ns.shape(MEMBER_IF, Some(rate))?;
                hub.shape(&hub_end, Some(rate))?;
            }
            Ok(ns)
        };
        let registry_ns = join("reg", 1, None)?;
        registry_ns.shape(MEMBER_IF, Some(config.registry_rate))?;
        let scheduler_ns = join("sched", 2, None)?;
        let registry_addr = SocketAddr::V4(SocketAddrV4::new(bed_ip(1), REGISTRY_PORT));
        let registry = registry_ns.start_registry(registry_addr, &scheduler_ns, dir.path())?;

        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).context("writing the cluster token")?;
        let scheduler_addr = SocketAddr::V4(SocketAddrV4::new(bed_ip(2), SCHEDULER_PORT));
        let scheduler = DarterProcess::start(
            &scheduler_ns,
            &config.darter,
            &[
                "scheduler".into(),
                "--listen".into(),
                scheduler_addr.to_string(),
                "--token-file".into(),
                token.display().to_string(),
            ],
            dir.path().join("scheduler.log"),
        )?;
        wait_for(&format!("the scheduler at {scheduler_addr}"), || {
            scheduler_ns
                .run(|| accepts(scheduler_addr))
                .unwrap_or(false)
        })?;

        let start_peer = |name: String, host: u8, seed: bool| -> anyhow::Result<BedPeer> {
            let ns = join(&name, host, Some(config.peer_rate))?;
            let at = |port| SocketAddr::V4(SocketAddrV4::new(bed_ip(host), port));
            let (mirror, metrics) = (at(MIRROR_PORT), at(METRICS_PORT));
            let store = dir.path().join(format!("store-{name}"));
            let mut args: Vec<String> = vec![
                "peer".into(),
                "--scheduler".into(),
                scheduler_addr.to_string(),
                "--upstream".into(),
                format!("http://{}", registry.addr()),
                "--mirror-listen".into(),
                mirror.to_string(),
                "--piece-listen".into(),
                at(PIECE_PORT).to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
                "--store".into(),
                store.display().to_string(),
                "--store-size".into(),
                config.store_limit.to_string(),
                "--token-file".into(),
                token.display().to_string(),
            ];
            if seed {
                args.push("--seed".into());
            }
            let log = dir.path().join(format!("peer-{name}.log"));
            let process = DarterProcess::start(&ns, &config.darter, &args, log.clone())?;
            Ok(BedPeer {
                process: Mutex::new(Some(process)),
                ns,
                darter: config.darter.clone(),
                name,
                log,
                mirror,
                metrics,
            })
        };
        let seed = start_peer("seed".into(), 3, true)?;
        let peers = (0..config.peers)
            .map(|i| {
                let host = u8::try_from(FIRST_PEER_HOST + i).unwrap_or(u8::MAX);
                start_peer(format!("p{i}"), host, false)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bed = P2pBed {
            peers,
            seed,
            scheduler,
            registry,
            scheduler_ns,
            registry_ns,
            hub,
            dir,
        };
        for peer in std::iter::once(&bed.seed).chain(&bed.peers) {
            wait_for(&format!("peer {} to listen", peer.name), || {
                peer.listening()
            })?;
        }
        let everyone = config.peers + 1;
        wait_for(&format!("{everyone} peers to register"), || {
            bed.scheduler.log().matches("peer registered").count() >= everyone
        })?;
        tracing::info!(
            peers = config.peers,
            dir = %bed.dir.path().display(),
            "P2P test bed up"
        );
        Ok(bed)
    }

    /// The registry's address, as peers and clients reach it.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry.addr()
    }

    /// Uploads `data` to `repository` of the registry (from the
    /// scheduler's namespace, whose link is not capped); returns its digest.
    pub fn push_blob(&self, repository: &str, data: &[u8]) -> anyhow::Result<String> {
        let addr = self.registry.addr();
        self.scheduler_ns
            .run(|| blob_http::push_blob(addr, repository, data))?
    }

    /// Response body bytes the registry has sent so far, from its access
    /// log (see [`TestRegistry::bytes_served`]).
    pub fn registry_bytes_served(&self) -> u64 {
        self.registry.bytes_served()
    }

    /// The ordinary peers (not the seed).
    pub fn peers(&self) -> &[BedPeer] {
        &self.peers
    }

    pub fn seed(&self) -> &BedPeer {
        &self.seed
    }

    /// CPU seconds (user and system) the seed and the peers have used so
    /// far, together.
    pub fn peers_cpu_seconds(&self) -> anyhow::Result<f64> {
        std::iter::once(&self.seed)
            .chain(&self.peers)
            .map(BedPeer::cpu_seconds)
            .sum()
    }

    /// The scheduler's log so far.
    pub fn scheduler_log(&self) -> String {
        self.scheduler.log()
    }

    /// The namespaces' paths (hub, registry, scheduler, seed, peers).
    pub fn namespaces(&self) -> Vec<PathBuf> {
        [&self.hub, &self.registry_ns, &self.scheduler_ns]
            .into_iter()
            .chain(std::iter::once(&self.seed.ns))
            .chain(self.peers.iter().map(|p| &p.ns))
            .map(Netns::path)
            .collect()
    }

    /// The bed's directory (stores, logs, registry storage).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Polls `ready` until it holds; an error naming `what` after
/// [`START_TIMEOUT`].
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while !ready() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {START_TIMEOUT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_status_json_and_garbage_is_refused() {
        let json = br#"{"bytes_from_origin":1,"bytes_from_peers":2}"#;
        let counters = PeerCounters::parse(json).unwrap();
        assert_eq!(counters.get("bytes_from_peers"), 2);
        for bad in [&br#"{"bytes_from_origin":-1}"#[..], b"[1]", b"nope"] {
            assert!(PeerCounters::parse(bad).is_err());
        }
    }

    #[test]
    fn cpu_seconds_grow_with_work_done_and_no_faster_than_the_cpus_can() {
        let pid = std::process::id();
        let before = process_cpu_seconds(pid).unwrap();
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        let used = loop {
            spin = std::hint::black_box(spin.wrapping_add(1));
            let used = process_cpu_seconds(pid).unwrap() - before;
            if used >= 0.3 {
                break used;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{used} s");
        };
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let wall = started.elapsed().as_secs_f64();
        assert!(used <= wall * cpus + 0.05, "{used} CPU s in {wall} s");
        assert!(process_cpu_seconds(u32::MAX).is_err());
    }
}
