//! A rate-limited network test bed: two network namespaces, the registry's
//! and the client's, joined by a veth pair whose two ends each shape their
//! egress with a TBF qdisc, and a real registry (`docker-registry`) serving
//! inside the registry's namespace.
//!
//! Traffic only ever flows between the two namespaces this run created:
//! neither has a route anywhere else. Namespaces are named
//! `darter-bench-PID-N-{reg,cli}`; dropping the [`NetBed`] kills every
//! process inside them and deletes them, and [`NetBed::start`] first
//! removes those of earlier runs whose process is gone (a run killed with
//! SIGKILL cannot clean up after itself).
//!
//! The veth ends live only inside the namespaces (created there directly),
//! so their fixed names and the private addresses cannot collide with
//! another run's: each pair of namespaces is a network of its own. The
//! subnet still varies per bed, so that logs of parallel runs tell them
//! apart.

use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_testkit::registry::{RegistryAuth, RegistryPlacement, TestRegistry, answers_http};

use crate::tools;

/// Every namespace this harness creates starts with this.
const NAME_PREFIX: &str = "darter-bench-";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The veth end in the registry's namespace.
const REGISTRY_IF: &str = "reg0";
/// The veth end in the client's namespace.
const CLIENT_IF: &str = "cli0";
const REGISTRY_PORT: u16 = 5000;
/// How long the processes of a namespace may take to die when killed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The TBF queue holds at most this much time of traffic.
const TBF_LATENCY: &str = "50ms";
/// Smallest TBF bucket: a 64 KiB GSO packet must fit in it.
const MIN_BURST_BYTES: u64 = 64 << 10;

/// Beds made by this process so far (names and subnets stay unique).
static BEDS: AtomicUsize = AtomicUsize::new(0);

/// A link rate, as TBF enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRate {
    bits_per_second: u64,
}

impl LinkRate {
    pub const fn mbit(mbit: u64) -> LinkRate {
        LinkRate {
            bits_per_second: mbit * 1_000_000,
        }
    }

    pub fn bytes_per_second(self) -> f64 {
        self.bits_per_second as f64 / 8.0
    }

    /// Seconds `bytes` take to cross the link at this rate.
    pub fn transfer_seconds(self, bytes: f64) -> f64 {
        bytes / self.bytes_per_second()
    }

    /// The TBF bucket: one millisecond of traffic, at least a GSO packet.
    fn burst_bytes(self) -> u64 {
        (self.bits_per_second / 8 / 1000).max(MIN_BURST_BYTES)
    }

    /// The arguments of `tc qdisc replace dev IF root ...`.
    fn tbf_args(self) -> Vec<String> {
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.bits_per_second),
            "burst".into(),
            self.burst_bytes().to_string(),
            "latency".into(),
            TBF_LATENCY.into(),
        ]
    }
}

impl fmt::Display for LinkRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_second;
        if bits >= 1_000_000_000 && bits.is_multiple_of(1_000_000_000) {
            write!(f, "{} Gbit/s", bits / 1_000_000_000)
        } else {
            write!(f, "{} Mbit/s", bits as f64 / 1e6)
        }
    }
}

/// A network namespace this run created. On drop, every process inside it
/// is killed and the namespace deleted.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> anyhow::Result<Netns> {
        tools::output(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Netns { name })
    }

    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    fn ip(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        tools::output(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `tc -n NAME ARGS`.
    fn tc(&self, args: &[&str]) -> anyhow::Result<()> {
        tools::output(Command::new("tc").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// `inner`, run inside this namespace (through `nsenter`, which execs
    /// it: the child's pid is the program's). Program, arguments,
    /// environment and directory are carried over; stdio is not (a
    /// `Command` does not tell it): set it on the result.
    fn wrap(&self, inner: &Command) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(net_option(&self.path()))
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if let Some(dir) = inner.get_current_dir() {
            cmd.current_dir(dir);
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = remove_namespace(&self.name) {
            tracing::warn!(netns = self.name, "cannot remove the namespace: {err:#}");
        }
    }
}

fn net_option(path: &Path) -> OsString {
    let mut option = OsString::from("--net=");
    option.push(path);
    option
}

/// Runs `f` on a thread that has joined the network namespace at `path`
/// (a thread's namespace is its own: the caller's is untouched).
fn inside<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("joining the network namespace {}", path.display()))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| bail!("a thread in {} panicked", path.display()))
    })
}

/// Two namespaces joined by a shaped veth pair, with a registry serving in
/// one of them. Everything is taken down on drop.
#[derive(Debug)]
pub struct NetBed {
    // Fields drop in order: the registry goes before its namespace.
    registry: TestRegistry,
    registry_ns: Netns,
    client_ns: Netns,
    rate: Option<LinkRate>,
}

impl NetBed {
    /// Creates the namespaces and the veth pair (not rate-limited yet) and
    /// starts a registry storing its data in a new directory below
    /// `registry_parent`. Removes the namespaces of dead earlier runs first.
    pub fn start(registry_parent: &Path) -> anyhow::Result<NetBed> {
        remove_stale_namespaces();
        let seq = BEDS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = format!("{NAME_PREFIX}{pid}-{seq}");
        let registry_ns = Netns::create(format!("{base}-reg"))?;
        let client_ns = Netns::create(format!("{base}-cli"))?;
        let subnet = subnet_of(pid, seq);
        let (registry_ip, client_ip) = (
            Ipv4Addr::new(10, 231, subnet, 1),
            Ipv4Addr::new(10, 231, subnet, 2),
        );
        link(&registry_ns, &client_ns, registry_ip, client_ip)
            .with_context(|| format!("linking {} and {}", registry_ns.name, client_ns.name))?;
        let addr = SocketAddr::V4(SocketAddrV4::new(registry_ip, REGISTRY_PORT));
        let registry = start_registry(&registry_ns, &client_ns, addr, registry_parent)?;
        tracing::info!(
            registry = %addr,
            netns = base,
            "network test bed up"
        );
        Ok(NetBed {
            registry,
            registry_ns,
            client_ns,
            rate: None,
        })
    }

    /// `ADDR:PORT` of the registry, as image references name it.
    pub fn registry_host(&self) -> String {
        self.registry.host()
    }

    /// Shapes both directions to `rate`, or removes the limit.
    pub fn limit(&mut self, rate: Option<LinkRate>) -> anyhow::Result<()> {
        for (ns, dev) in [
            (&self.registry_ns, REGISTRY_IF),
            (&self.client_ns, CLIENT_IF),
        ] {
            match rate {
                Some(rate) => {
                    let tbf = rate.tbf_args();
                    let mut args = vec!["qdisc", "replace", "dev", dev, "root"];
                    args.extend(tbf.iter().map(String::as_str));
                    ns.tc(&args)?;
                }
                None if self.rate.is_some() => ns.tc(&["qdisc", "del", "dev", dev, "root"])?,
                None => {}
            }
        }
        self.rate = rate;
        Ok(())
    }

    /// `inner` run inside the client's namespace (set stdio on the result).
    pub fn client(&self, inner: &Command) -> Command {
        self.client_ns.wrap(inner)
    }

    /// The processes running in the client's namespace.
    #[cfg(test)]
    pub fn client_processes(&self) -> anyhow::Result<Vec<i32>> {
        pids_in(&self.client_ns.name)
    }

    /// Requests the registry has answered so far (its access log).
    pub fn registry_requests(&self) -> u64 {
        self.registry.requests_served()
    }

    /// Bytes the registry's end of the link has sent so far (the kernel's
    /// counter, Ethernet framing included).
    pub fn registry_tx_bytes(&self) -> anyhow::Result<u64> {
        let json = self
            .registry_ns
            .ip(&["-s", "-j", "link", "show", "dev", REGISTRY_IF])?;
        tx_bytes(&json).with_context(|| {
            format!(
                "reading the tx counter of {REGISTRY_IF} in {}",
                self.registry_ns.name
            )
        })
    }

    /// The median time a TCP connect from the client to the registry takes
    /// (one round trip), over a few connects.
    pub fn round_trip(&self) -> anyhow::Result<Duration> {
        let addr = self.registry.addr();
        let samples = inside(&self.client_ns.path(), || {
            (0..5)
                .map(|_| {
                    let started = Instant::now();
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        .map(|_| started.elapsed())
                })
                .collect::<std::io::Result<Vec<Duration>>>()
        })?
        .with_context(|| format!("connecting to {addr} from {}", self.client_ns.name))?;
        let mut sorted = samples;
        sorted.sort();
        Ok(sorted[sorted.len() / 2])
    }
}

/// A /24 for bed `seq` of process `pid` (1..=254).
fn subnet_of(pid: u32, seq: usize) -> u8 {
    let mixed = u64::from(pid).wrapping_mul(31).wrapping_add(seq as u64);
    u8::try_from(mixed % 254 + 1).unwrap_or(1)
}

/// Creates the veth pair straight inside both namespaces, addresses it
/// and brings everything up.
fn link(
    registry_ns: &Netns,
    client_ns: &Netns,
    registry_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    tools::output(Command::new("ip").args([
        "link",
        "add",
        REGISTRY_IF,
        "netns",
        &registry_ns.name,
        "type",
        "veth",
        "peer",
        "name",
        CLIENT_IF,
        "netns",
        &client_ns.name,
    ]))?;
    for (ns, dev, ip) in [
        (registry_ns, REGISTRY_IF, registry_ip),
        (client_ns, CLIENT_IF, client_ip),
    ] {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// A registry inside `registry_ns` at `addr`, probed from `client_ns`
/// (which also proves the link works). The test kit panics when a registry
/// does not come up; that becomes an error here.
fn start_registry(
    registry_ns: &Netns,
    client_ns: &Netns,
    addr: SocketAddr,
    parent: &Path,
) -> anyhow::Result<TestRegistry> {
    let client_path = client_ns.path();
    let placement = RegistryPlacement {
        command_prefix: vec!["nsenter".into(), net_option(&registry_ns.path())],
        addr,
        parent_dir: Some(parent.to_path_buf()),
        probe: Box::new(move |addr| inside(&client_path, || answers_http(addr)).unwrap_or(false)),
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        TestRegistry::start_placed(&RegistryAuth::Anonymous, &placement)
    }))
    .map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        anyhow::anyhow!(
            "the registry did not start in {}: {message}",
            registry_ns.name
        )
    })
}

/// `stats64.tx.bytes` of the one link in `ip -s -j link show dev IF`.
fn tx_bytes(json: &[u8]) -> anyhow::Result<u64> {
    let links: serde_json::Value = serde_json::from_slice(json).context("parsing ip's JSON")?;
    links
        .get(0)
        .and_then(|link| link.pointer("/stats64/tx/bytes"))
        .and_then(serde_json::Value::as_u64)
        .context("no stats64.tx.bytes in ip's JSON")
}

/// The pid in a namespace name `darter-bench-PID-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes the namespaces of harness processes that no longer run.
fn remove_stale_namespaces() {
    remove_namespaces_where(|pid| !Path::new(&format!("/proc/{pid}")).exists());
}

/// Removes the namespaces this process created, e.g. on a signal, when no
/// destructor will run.
pub fn remove_own_namespaces() {
    let own = std::process::id();
    remove_namespaces_where(|pid| pid == own);
}

fn remove_namespaces_where(owned_by: impl Fn(u32) -> bool) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let names = entries.filter_map(|e| e.ok()?.file_name().into_string().ok());
    for name in names.filter(|n| owner_pid(n).is_some_and(&owned_by)) {
        tracing::warn!(netns = name, "removing a namespace left behind");
        if let Err(err) = remove_namespace(&name) {
            tracing::warn!(netns = name, "cannot remove it: {err:#}");
        }
    }
}

/// Kills every process in the namespace `name`, waits for them to die,
/// and deletes it.
fn remove_namespace(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = pids_in(name)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} in {name} do not die");
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tools::output(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// The live processes in namespace `name` (`ip netns pids`; zombies have
/// left their namespaces and are not listed).
fn pids_in(name: &str) -> anyhow::Result<Vec<i32>> {
    let out = tools::output(Command::new("ip").args(["netns", "pids", name]))?;
    Ok(String::from_utf8_lossy(&out)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use darter_testkit::process::ChildGuard;

    use super::*;

    #[test]
    fn rates_show_and_shape_as_tbf_wants() {
        let cases = [
            (LinkRate::mbit(100), "100 Mbit/s", "100000000bit", "65536"),
            (LinkRate::mbit(1000), "1 Gbit/s", "1000000000bit", "125000"),
            (
                LinkRate::mbit(10_000),
                "10 Gbit/s",
                "10000000000bit",
                "1250000",
            ),
        ];
        for (rate, shown, tc_rate, burst) in cases {
            assert_eq!(rate.to_string(), shown);
            let args = rate.tbf_args();
            assert_eq!(
                args,
                ["tbf", "rate", tc_rate, "burst", burst, "latency", "50ms"]
            );
        }
        assert_eq!(LinkRate::mbit(100).transfer_seconds(12.5e6), 1.0);
    }

    #[test]
    fn the_tx_counter_is_read_from_ip_json_and_garbage_refused() {
        let json = br#"[{"ifindex":2,"ifname":"reg0","stats64":{"rx":{"bytes":90,"packets":1},
            "tx":{"bytes":123456789012,"packets":7}}}]"#;
        assert_eq!(tx_bytes(json).unwrap(), 123_456_789_012);
        for bad in [&b"[]"[..], b"[{\"stats64\":{}}]", b"not json", b"{}"] {
            assert!(tx_bytes(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn namespace_names_carry_their_owner() {
        assert_eq!(owner_pid("darter-bench-1234-0-reg"), Some(1234));
        assert_eq!(owner_pid("darter-bench-x-0-reg"), None);
        assert_eq!(owner_pid("other-1234-0-reg"), None);
        for seq in 0..1000 {
            assert!((1..=254).contains(&subnet_of(4_194_304, seq)));
        }
        assert_ne!(subnet_of(77, 0), subnet_of(77, 1));
    }

    /// The whole bed, for real: the registry answers from the client
    /// namespace only, the counter counts what it serves, the rate limit
    /// holds, and nothing is left behind.
    #[test]
    fn bed_serves_counts_limits_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut bed = NetBed::start(dir.path()).unwrap();
        let host = bed.registry_host();
        assert!(host.starts_with("10.231."), "{host}");
        let names = [bed.registry_ns.name.clone(), bed.client_ns.name.clone()];
        // Neither namespace has a way out: only the bed's own /24 is routed.
        for ns in [&bed.registry_ns, &bed.client_ns] {
            let routes = String::from_utf8(ns.ip(&["route", "show"]).unwrap()).unwrap();
            assert_eq!(routes.lines().count(), 1, "{routes}");
            assert!(routes.starts_with("10.231."), "{routes}");
        }
        let addr: SocketAddr = host.parse().unwrap();
        assert!(bed.round_trip().unwrap() < Duration::from_millis(50));

        // 4 MB from the registry's side at 100 Mbit/s take at least 0.3 s
        // (the bucket lets a little through at once), and the counter sees
        // all of them (iperf3 -R: the server in the registry's namespace sends).
        let mut server = Command::new("iperf3");
        server.args(["-s", "-p", "5201"]);
        let mut server = bed.registry_ns.wrap(&server);
        server.stdout(Stdio::null()).stderr(Stdio::null());
        let _server = ChildGuard::spawn(&mut server).unwrap();
        let iperf = SocketAddr::new(addr.ip(), 5201);
        let client_path = bed.client_ns.path();
        darter_testkit::process::wait_until(Duration::from_secs(10), "iperf3 -s", || {
            inside(&client_path, || TcpStream::connect(iperf).is_ok()).unwrap()
        });
        bed.limit(Some(LinkRate::mbit(100))).unwrap();
        let before = bed.registry_tx_bytes().unwrap();
        let started = Instant::now();
        let mut client = Command::new("iperf3");
        client.args([
            "-c",
            &iperf.ip().to_string(),
            "-p",
            "5201",
            "-R",
            "-n",
            "4M",
        ]);
        tools::output(&mut bed.client(&client)).unwrap();
        let took = started.elapsed();
        let served = bed.registry_tx_bytes().unwrap() - before;
        assert!((4 << 20..(4 << 20) + 400_000).contains(&served), "{served}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        bed.limit(None).unwrap();
        assert_eq!(bed.rate, None);

        drop(bed);
        for name in names {
            assert!(!Path::new(NETNS_DIR).join(&name).exists(), "{name}");
        }
    }

    #[test]
    fn stale_namespaces_are_removed_with_their_processes() {
        // No process has pid 4294967: the kernel caps pids at 2^22.
        let name = format!("{NAME_PREFIX}4294967-0-cli");
        let _ = remove_namespace(&name);
        let ns = Netns::create(name.clone()).unwrap();
        let mut sleeper = ns.wrap(Command::new("sleep").arg("600"));
        let mut child = sleeper.spawn().unwrap();
        std::mem::forget(ns);
        darter_testkit::process::wait_until(Duration::from_secs(5), "sleep in the ns", || {
            pids_in(&name).is_ok_and(|p| !p.is_empty())
        });
        remove_stale_namespaces();
        assert!(!Path::new(NETNS_DIR).join(&name).exists());
        assert!(!child.wait().unwrap().success());
    }
}
