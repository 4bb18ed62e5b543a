//! Network namespaces for tests and benchmarks: namespaces that are
//! deleted with every process inside them when dropped, veth links made
//! straight inside namespaces, TBF rate limits, and running a command or a
//! closure inside a namespace.
//!
//! Every namespace is named `darter-ns-PID-SEQ-...` after the process that
//! made it, so that [`remove_stale_namespaces`] can delete those of dead
//! processes (a run killed with SIGKILL cannot clean up after itself) and
//! [`remove_own_namespaces`] those of this process on a signal. Names are
//! unique per process and group ([`group_name`]), so tests and benchmark
//! beds run in parallel.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::try_run;
use crate::registry::{RegistryAuth, RegistryPlacement, TestRegistry, answers_http};

/// Every namespace made here starts with this.
const NAME_PREFIX: &str = "darter-ns-";
/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// How long the processes of a namespace may take to die when killed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The TBF queue holds at most this much time of traffic.
const TBF_LATENCY: &str = "50ms";
/// Smallest TBF bucket: a 64 KiB GSO packet must fit in it.
const MIN_BURST_BYTES: u64 = 64 << 10;

/// Groups of namespaces made by this process so far.
static GROUPS: AtomicUsize = AtomicUsize::new(0);

/// A new unique name for a group of namespaces of one kind (e.g. `bed`),
/// `darter-ns-PID-SEQ-KIND`; members append `-ROLE` to it.
pub fn group_name(kind: &str) -> String {
    let seq = GROUPS.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}-{seq}-{kind}", std::process::id())
}

/// Runs `cmd` (stdin closed) and returns its stdout; the error shows the
/// command, its status and stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    Ok(try_run(cmd.stdin(Stdio::null()))?.stdout)
}

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
    pub fn tbf_args(self) -> Vec<String> {
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

/// A network namespace this process created, with its loopback up. On
/// drop, every process inside it is killed and the namespace deleted.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (see [`group_name`]).
    pub fn create(name: String) -> anyhow::Result<Netns> {
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        output(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `tc -n NAME ARGS`.
    pub fn tc(&self, args: &[&str]) -> anyhow::Result<()> {
        output(Command::new("tc").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Shapes the egress of `dev` to `rate` (TBF), or removes the shaping
    /// `dev` has (`None`).
    pub fn shape(&self, dev: &str, rate: Option<LinkRate>) -> anyhow::Result<()> {
        match rate {
            Some(rate) => {
                let tbf = rate.tbf_args();
                let mut args = vec!["qdisc", "replace", "dev", dev, "root"];
                args.extend(tbf.iter().map(String::as_str));
                self.tc(&args)
            }
            None => self.tc(&["qdisc", "del", "dev", dev, "root"]),
        }
    }

    /// Gives `dev` the address `cidr` (e.g. `10.0.0.1/24`) and brings it up.
    pub fn address(&self, dev: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// `inner` run inside this namespace (through `nsenter`, which execs
    /// it: the child's pid is the program's). Program, arguments,
    /// environment and directory are carried over; stdio is not (a
    /// `Command` does not tell it): set it on the result.
    pub fn wrap(&self, inner: &Command) -> Command {
        let [program, prefix @ ..] = self.command_prefix();
        let mut cmd = Command::new(program);
        cmd.args(prefix)
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

    /// The words that run the program following them inside this
    /// namespace (`nsenter --net=PATH --`; it execs the program).
    pub fn command_prefix(&self) -> [OsString; 3] {
        ["nsenter".into(), net_option(&self.path()), "--".into()]
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        inside(&self.path(), f)
    }

    /// A registry (`docker-registry`, anonymous) serving at `addr` inside
    /// this namespace, with its files in a new directory below `parent`,
    /// probed from `probe_from` (which also proves the link works). The
    /// registry fixture panics when it does not come up; that becomes an
    /// error here.
    pub fn start_registry(
        &self,
        addr: SocketAddr,
        probe_from: &Netns,
        parent: &Path,
    ) -> anyhow::Result<TestRegistry> {
        let probe_path = probe_from.path();
        let placement = RegistryPlacement {
            command_prefix: vec!["nsenter".into(), net_option(&self.path())],
            addr,
            parent_dir: Some(parent.to_path_buf()),
            probe: Box::new(move |addr| {
                inside(&probe_path, || answers_http(addr)).unwrap_or(false)
            }),
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
            anyhow::anyhow!("the registry did not start in {}: {message}", self.name)
        })
    }

    /// The live processes inside.
    pub fn pids(&self) -> anyhow::Result<Vec<i32>> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = remove_namespace(&self.name) {
            tracing::warn!(netns = self.name, "cannot remove the namespace: {err:#}");
        }
    }
}

/// `--net=PATH`, nsenter's option to enter the namespace at `path`.
pub fn net_option(path: &Path) -> OsString {
    let mut option = OsString::from("--net=");
    option.push(path);
    option
}

/// Runs `f` on a thread that has joined the network namespace at `path`
/// (a thread's namespace is its own: the caller's is untouched).
pub fn inside<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
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

/// A veth pair made straight inside two namespaces (so its fixed names
/// cannot collide with another bed's), `a_if` in `a` and `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    output(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))
    .map(drop)
    .with_context(|| format!("linking {} and {}", a.name, b.name))
}

/// The pid in a namespace name `darter-ns-PID-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes the namespaces of processes that no longer run.
pub fn remove_stale_namespaces() {
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
    output(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// The live processes in namespace `name` (`ip netns pids`; zombies have
/// left their namespaces and are not listed).
fn pids_in(name: &str) -> anyhow::Result<Vec<i32>> {
    let out = output(Command::new("ip").args(["netns", "pids", name]))?;
    Ok(String::from_utf8_lossy(&out)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
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
    fn namespace_names_carry_their_owner() {
        assert_eq!(owner_pid("darter-ns-1234-0-bed-reg"), Some(1234));
        assert_eq!(owner_pid("darter-ns-x-0-reg"), None);
        assert_eq!(owner_pid("other-1234-0-reg"), None);
        let (a, b) = (group_name("bed"), group_name("bed"));
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
    }

    #[test]
    fn stale_namespaces_are_removed_with_their_processes() {
        // No process has pid 4294967: the kernel caps pids at 2^22.
        let name = format!("{NAME_PREFIX}4294967-0-test-cli");
        let _ = remove_namespace(&name);
        let ns = Netns::create(name.clone()).unwrap();
        let mut sleeper = ns.wrap(Command::new("sleep").arg("600"));
        let mut child = sleeper.spawn().unwrap();
        std::mem::forget(ns);
        crate::process::wait_until(Duration::from_secs(5), "sleep in the ns", || {
            pids_in(&name).is_ok_and(|p| !p.is_empty())
        });
        remove_stale_namespaces();
        assert!(!Path::new(NETNS_DIR).join(&name).exists());
        assert!(!child.wait().unwrap().success());
    }
}
