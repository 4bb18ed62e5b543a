//! A rate-limited network test bed: two network namespaces, the registry's
//! and the client's, joined by a veth pair whose two ends each shape their
//! egress with a TBF qdisc, and a real registry (`docker-registry`) serving
//! inside the registry's namespace.
//!
//! Traffic only ever flows between the two namespaces this run created:
//! neither has a route anywhere else. The namespaces come from
//! `darter_testkit::netns` (named after this process); dropping the
//! [`NetBed`] kills every process inside them and deletes them, and
//! [`NetBed::start`] first removes those of earlier runs whose process is
//! gone (a run killed with SIGKILL cannot clean up after itself).
//!
//! The veth ends live only inside the namespaces (created there directly),
//! so their fixed names and the private addresses cannot collide with
//! another run's: each pair of namespaces is a network of its own. The
//! subnet still varies per bed, so that logs of parallel runs tell them
//! apart.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use darter_testkit::netns::{self, Netns};
pub use darter_testkit::netns::{LinkRate, remove_own_namespaces};
use darter_testkit::registry::TestRegistry;

/// The veth end in the registry's namespace.
const REGISTRY_IF: &str = "reg0";
/// The veth end in the client's namespace.
const CLIENT_IF: &str = "cli0";
const REGISTRY_PORT: u16 = 5000;

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
        netns::remove_stale_namespaces();
        let base = netns::group_name("bench");
        let registry_ns = Netns::create(format!("{base}-reg"))?;
        let client_ns = Netns::create(format!("{base}-cli"))?;
        let subnet = subnet_of(&base);
        let (registry_ip, client_ip) = (
            Ipv4Addr::new(10, 231, subnet, 1),
            Ipv4Addr::new(10, 231, subnet, 2),
        );
        link(&registry_ns, &client_ns, registry_ip, client_ip)
            .with_context(|| format!("linking {} and {}", registry_ns.name(), client_ns.name()))?;
        let addr = SocketAddr::V4(SocketAddrV4::new(registry_ip, REGISTRY_PORT));
        let registry = registry_ns.start_registry(addr, &client_ns, registry_parent)?;
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
        if rate.is_some() || self.rate.is_some() {
            self.registry_ns.shape(REGISTRY_IF, rate)?;
            self.client_ns.shape(CLIENT_IF, rate)?;
        }
        self.rate = rate;
        Ok(())
    }

    /// `inner` run inside the client's namespace (set stdio on the result).
    pub fn client(&self, inner: &Command) -> Command {
        self.client_ns.wrap(inner)
    }

    /// The words that run a program inside the client's namespace.
    pub fn client_prefix(&self) -> Vec<std::ffi::OsString> {
        self.client_ns.command_prefix().into()
    }

    /// The processes running in the client's namespace.
    #[cfg(test)]
    pub fn client_processes(&self) -> anyhow::Result<Vec<i32>> {
        self.client_ns.pids()
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
                self.registry_ns.name()
            )
        })
    }

    /// The median time a TCP connect from the client to the registry takes
    /// (one round trip), over a few connects.
    pub fn round_trip(&self) -> anyhow::Result<Duration> {
        let addr = self.registry.addr();
        let samples = self
            .client_ns
            .run(|| {
                (0..5)
                    .map(|_| {
                        let started = Instant::now();
                        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            .map(|_| started.elapsed())
                    })
                    .collect::<std::io::Result<Vec<Duration>>>()
            })?
            .with_context(|| format!("connecting to {addr} from {}", self.client_ns.name()))?;
        let mut sorted = samples;
        sorted.sort();
        Ok(sorted[sorted.len() / 2])
    }
}

/// A /24 for the bed `name` (1..=254): only for logs of parallel runs to
/// tell beds apart, since each bed is a network of its own.
fn subnet_of(name: &str) -> u8 {
    let mixed = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
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
    netns::veth(registry_ns, REGISTRY_IF, client_ns, CLIENT_IF)?;
    for (ns, dev, ip) in [
        (registry_ns, REGISTRY_IF, registry_ip),
        (client_ns, CLIENT_IF, client_ip),
    ] {
        ns.address(dev, &format!("{ip}/24"))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use darter_testkit::process::ChildGuard;

    use super::*;

    #[test]
    fn bed_subnets_are_valid_and_vary() {
        for n in 0..1000 {
            assert!((1..=254).contains(&subnet_of(&format!("darter-ns-4194304-{n}-bench"))));
        }
        assert_ne!(subnet_of("a-0"), subnet_of("a-1"));
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

    /// The whole bed, for real: the registry answers from the client
    /// namespace only, the counter counts what it serves, the rate limit
    /// holds, and nothing is left behind.
    #[test]
    fn bed_serves_counts_limits_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut bed = NetBed::start(dir.path()).unwrap();
        let host = bed.registry_host();
        assert!(host.starts_with("10.231."), "{host}");
        let names = [bed.registry_ns.path(), bed.client_ns.path()];
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
        darter_testkit::process::wait_until(Duration::from_secs(10), "iperf3 -s", || {
            bed.client_ns
                .run(|| TcpStream::connect(iperf).is_ok())
                .unwrap()
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
        netns::output(&mut bed.client(&client)).unwrap();
        let took = started.elapsed();
        let served = bed.registry_tx_bytes().unwrap() - before;
        assert!((4 << 20..(4 << 20) + 400_000).contains(&served), "{served}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        bed.limit(None).unwrap();
        assert_eq!(bed.rate, None);

        drop(bed);
        for path in names {
            assert!(!path.exists(), "{}", path.display());
        }
    }
}
