//! `darter daemon`, the node daemon serving every lazy mount of the node,
//! how `darter mount -d` and the snapshotter start it when none answers,
//! and `darter unmount`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_daemon::api::{self, MountRequest};
use darter_daemon::{ImageOpener, ImageSpec, NodeOptions};
use darter_image::BlobSource;
use darter_remote::ImageRef;

use crate::cli::{DaemonArgs, UnmountArgs};
use crate::config::Config;

use super::{Context, Outcome, RegistryClients};

/// How long a started node daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often to look whether it does.
const START_POLL: Duration = Duration::from_millis(20);

/// glibc malloc tuning for the daemon: one arena. By default each thread
/// that frees chunk-sized buffers gets an arena of its own, and glibc keeps
/// their freed memory: peak RSS was 1.6x the live data after reading every
/// file of the python image. (A fixed mmap threshold returns it too, but
/// mapping and unmapping every buffer made cold reads 1.5x slower.)
const DAEMON_MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=1";

pub fn run(args: &DaemonArgs, ctx: &Context, config: &Config) -> anyhow::Result<Outcome> {
    let socket = args.socket.clone().unwrap_or_else(api::default_node_socket);
    let opts = NodeOptions {
        cache_dir: args
            .cache
            .clone()
            .or_else(|| config.mount.cache.clone())
            .unwrap_or_else(darter_cache::default_cache_dir),
        metrics_addr: args.metrics.or(config.mount.metrics_addr),
    };
    let opener: Arc<dyn ImageOpener> = Arc::new(NodeImages {
        registries: RegistryClients::new(config, ctx),
    });
    darter_daemon::run_node(&socket, &opts, &opener)
        .with_context(|| format!("serving the node daemon at {}", socket.display()))?;
    Ok(Outcome::Success)
}

pub fn unmount(args: &UnmountArgs) -> anyhow::Result<Outcome> {
    let mountpoint = absolute(&args.mountpoint)?;
    // The daemon serving the mount says where it listens.
    let socket = args
        .socket
        .clone()
        .or_else(|| api::query_stats(&mountpoint).ok()?.daemon_socket)
        .unwrap_or_else(api::default_node_socket);
    api::request_unmount(&socket, &mountpoint)
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    println!("unmounted {}", mountpoint.display());
    Ok(Outcome::Success)
}

/// `path` made absolute without following a stale mount there (which
/// canonicalize would fail on).
pub(super) fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        return Ok(canonical);
    }
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// The node daemon's images: opened through one registry client per
/// registry and login, shared by every mount.
struct NodeImages {
    registries: RegistryClients,
}

impl ImageOpener for NodeImages {
    fn open(&self, request: &MountRequest) -> Result<ImageSpec<Box<dyn BlobSource>>, String> {
        let reference = ImageRef::parse(&request.image)
            .map_err(|e| format!("image {:?}: {e}", request.image))?;
        let login = request
            .credentials
            .as_ref()
            .map(|c| (c.username.as_str(), c.password.as_str()));
        let stores = self
            .registries
            .stores_for(&reference, login, request.plain_http);
        let m = stores
            .open_manifest(&reference, None)
            .map_err(|e| format!("opening {}: {:#}", request.image, anyhow::Error::new(e)))?;
        Ok(ImageSpec {
            name: request.image.clone(),
            digest: m.digest,
            manifest: m.manifest,
            blobs: m.blobs,
        })
    }

    fn store_options(&self, image: &str) -> darter_cache::StoreOptions {
        store_options(image)
    }
}

/// Chunk store tuning for where the image lives: from a local layout a
/// request costs less than fetching a few hundred KiB more, so frames that
/// follow are fetched along; over a network every extra byte counts.
pub(super) fn store_options(image: &str) -> darter_cache::StoreOptions {
    let local = matches!(ImageRef::parse(image), Ok(ImageRef::Layout(_)));
    darter_cache::StoreOptions {
        blob_readahead: if local { LOCAL_BLOB_READAHEAD } else { 0 },
        ..darter_cache::StoreOptions::default()
    }
}

/// Compressed bytes fetched along after a miss from a local layout.
const LOCAL_BLOB_READAHEAD: u64 = 512 << 10;

/// How to start a node daemon when none answers.
#[derive(Debug, Clone)]
pub(super) struct NodeDaemon {
    /// Its API socket.
    pub socket: PathBuf,
    /// Global flags (config file, plain HTTP, verbosity) it gets too.
    pub forward: Vec<OsString>,
    /// `--cache`, if given.
    pub cache: Option<PathBuf>,
    /// `--metrics`, if given.
    pub metrics: Option<std::net::SocketAddr>,
}

impl NodeDaemon {
    /// Where it logs: beside its socket.
    pub fn log_path(&self) -> PathBuf {
        self.socket.with_extension("log")
    }

    /// The node daemon's status, starting `darter daemon` (detached: its
    /// own process group, logging to [`Self::log_path`]) if none answers,
    /// and waiting until it does.
    pub fn ensure(&self) -> anyhow::Result<api::NodeStatus> {
        if let Ok(status) = api::node_status(&self.socket) {
            return Ok(status);
        }
        let log_path = self.log_path();
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A restarted daemon appends to its predecessor's log.
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the darter executable")?;
        let mut cmd = Command::new(exe);
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", DAEMON_MALLOC_TUNABLES);
        }
        cmd.args(&self.forward)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket);
        if let Some(cache) = &self.cache {
            cmd.arg("--cache").arg(cache);
        }
        if let Some(addr) = self.metrics {
            cmd.arg("--metrics").arg(addr.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let mut child = cmd.spawn().context("starting the node daemon")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Another `darter` may have started one first: ours then
            // exits, and theirs answers.
            if let Ok(status) = api::node_status(&self.socket) {
                return Ok(status);
            }
            if let Some(status) = child.try_wait()? {
                if let Ok(status) = api::node_status(&self.socket) {
                    return Ok(status);
                }
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "the node daemon exited ({status}) before serving {}:\n{}",
                    self.socket.display(),
                    log.trim_end()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "the node daemon did not answer on {} within {START_TIMEOUT:?}; see {}",
                    self.socket.display(),
                    log_path.display()
                );
            }
            std::thread::sleep(START_POLL);
        }
    }
}
