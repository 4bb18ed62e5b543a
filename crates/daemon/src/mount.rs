//! One mount's lifecycle.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use darter_cache::{CacheDir, ChunkStore, Counted, Stats, StoreOptions};
use darter_fuse::{DarterFs, FsOptions, prepare_mountpoint};
use darter_image::{BlobSource, Image};
use fuser::{MountOption, SessionACL};

use crate::api::{StatsReport, socket_path};
use crate::{http, metrics};

/// Kernel readahead of a mount: one chunk, so sequential reads of a large
/// file ask for whole chunks.
const READAHEAD_KIB: u32 = 1024;

/// How to run a mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The shared chunk cache directory.
    pub cache_dir: PathBuf,
    /// Fetch the whole image in the background.
    pub prefetch_all: bool,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// FUSE request threads.
    pub threads: usize,
    /// Chunk store tuning.
    pub store: StoreOptions,
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The mountpoint is unusable.
    #[error(transparent)]
    Mountpoint(#[from] darter_fuse::MountpointError),
    /// The cache directory is unusable.
    #[error(transparent)]
    Cache(#[from] darter_cache::CacheError),
    /// The image cannot be opened.
    #[error(transparent)]
    Image(#[from] darter_image::ImageError),
    /// Setting up a socket or the mount failed.
    #[error("{op} {what}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// On what.
        what: String,
        /// Error.
        source: std::io::Error,
    },
}

/// An image to mount, before its bootstrap is fetched: the manifest and
/// where its blobs come from.
#[derive(Debug)]
pub struct ImageSpec<S> {
    /// How the user named it (for logs, stats and the mount table).
    pub name: String,
    /// The manifest's digest.
    pub digest: darter_oci::OciDigest,
    /// The manifest.
    pub manifest: darter_oci::ImageManifest,
    /// The blobs.
    pub blobs: S,
}

/// Opens `spec` (fetching the bootstrap, counted as backend traffic),
/// mounts it at `mountpoint` and serves it until it is unmounted or the
/// process gets SIGINT/SIGTERM (which unmount cleanly). `ready` runs once
/// the mount answers requests.
pub fn mount<S: BlobSource + 'static>(
    spec: ImageSpec<S>,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    let io = |op, what: &dyn std::fmt::Display| {
        let what = what.to_string();
        move |source| DaemonError::Io { op, what, source }
    };
    let image_name = spec.name.as_str();
    prepare_mountpoint(mountpoint)?;
    let disk = CacheDir::open(&opts.cache_dir)?;
    let stats = Arc::new(Stats::default());
    let image = Image::open(
        spec.digest,
        spec.manifest,
        Counted::new(spec.blobs, stats.clone()),
    )?;
    let store = Arc::new(ChunkStore::new(
        Arc::new(image),
        Some(disk),
        opts.store,
        stats,
    ));
    let fs = DarterFs::new(store.clone(), FsOptions::default());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("darter:{image_name}")),
        MountOption::Subtype("darter".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(io("mount at", &mountpoint.display()))?;
    if let Err(e) = darter_fuse::set_readahead(mountpoint, READAHEAD_KIB) {
        tracing::warn!(error = %e, "cannot raise the mount's readahead; large reads will be split");
    }
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    let started = Instant::now();
    let report = {
        let store = store.clone();
        let (image, mountpoint) = (image_name.to_owned(), mountpoint.to_owned());
        Arc::new(move || StatsReport {
            image: image.clone(),
            mountpoint: mountpoint.clone(),
            pid: std::process::id(),
            uptime_seconds: started.elapsed().as_secs_f64(),
            stats: store.stats(),
        })
    };
    let socket = socket_path(mountpoint);
    let api = bind_api(&socket)?;
    spawn_api(api, report.clone());
    if let Some(addr) = opts.metrics_addr {
        let listener = TcpListener::bind(addr).map_err(io("listen on", &addr))?;
        spawn_metrics(listener, report);
    }
    let shutdown = Arc::new(Shutdown::new(store.clone(), socket, mountpoint.to_owned()));
    spawn_signal_handler(unmounter, shutdown.clone())?;
    fetch_chunk_tables(&store);
    let prefetch = opts.prefetch_all.then(|| {
        let store = store.clone();
        std::thread::spawn(move || store.prefetch_all())
    });
    tracing::info!(image = image_name, mountpoint = %mountpoint.display(), "mounted");
    ready();
    let result = session.run().map_err(io("serve", &mountpoint.display()));
    shutdown.mark_ended();
    shutdown.finish();
    if let Some(p) = prefetch {
        let _ = p.join();
    }
    result
}

/// How long a daemon told to stop waits, once its mount is gone from its
/// own mount namespace, for the kernel to end the FUSE session.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);

/// The end of a mount's life: what is done once (stop the store, which
/// writes out the queued cache writes; remove the API socket), and whether
/// the session loop has returned.
struct Shutdown<S> {
    store: Arc<ChunkStore<S>>,
    socket: PathBuf,
    mountpoint: PathBuf,
    finished: Once,
    ended: Mutex<bool>,
    ended_changed: Condvar,
}

impl<S: BlobSource + 'static> Shutdown<S> {
    fn new(store: Arc<ChunkStore<S>>, socket: PathBuf, mountpoint: PathBuf) -> Self {
        Shutdown {
            store,
            socket,
            mountpoint,
            finished: Once::new(),
            ended: Mutex::new(false),
            ended_changed: Condvar::new(),
        }
    }

    fn finish(&self) {
        self.finished.call_once(|| {
            self.store.stop();
            let _ = std::fs::remove_file(&self.socket);
            tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        });
    }

    fn mark_ended(&self) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.ended_changed.notify_all();
    }

    /// True if the session loop returned within `timeout`.
    fn wait_ended(&self, timeout: Duration) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, _) = self
            .ended_changed
            .wait_timeout_while(ended, timeout, |ended| !*ended)
            .unwrap_or_else(|e| e.into_inner());
        *ended
    }

    /// After a signal's clean unmount (a mount detached lazily because it
    /// is in use keeps serving its users instead): the kernel ends the
    /// session once the filesystem has no mount left anywhere. A copy of
    /// the mount in another mount namespace (made by `unshare`, a container
    /// runtime, `ip netns` while the mount existed) keeps it alive, and the
    /// daemon would serve it forever although it was told to stop: stop
    /// anyway. Exiting closes the FUSE connection, so such copies answer
    /// ENOTCONN.
    fn end_after_signal(&self) {
        if self.wait_ended(SESSION_END_WAIT) {
            return;
        }
        tracing::warn!(
            mountpoint = %self.mountpoint.display(),
            "the mount lives on in another mount namespace; stopping anyway"
        );
        self.finish();
        std::process::exit(0);
    }
}

fn bind_api(socket: &Path) -> Result<UnixListener, DaemonError> {
    let io = |op, source| DaemonError::Io {
        op,
        what: socket.display().to_string(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
    }
    // A socket left by a dead daemon for this mountpoint is replaced.
    let _ = std::fs::remove_file(socket);
    UnixListener::bind(socket).map_err(|e| io("listen on", e))
}

type Reporter = Arc<dyn Fn() -> StatsReport + Send + Sync>;

fn spawn_api(listener: UnixListener, report: Reporter) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let report = report.clone();
            std::thread::spawn(move || {
                let answer = match http::read_get(&stream) {
                    Ok(Some(path)) if path == "/stats" => {
                        serde_json::to_vec(&report()).map(|b| ("200 OK", b)).ok()
                    }
                    Ok(Some(_)) => Some(("404 Not Found", b"{}".to_vec())),
                    _ => Some(("400 Bad Request", b"{}".to_vec())),
                };
                if let Some((status, body)) = answer {
                    let _ = http::respond(&stream, status, "application/json", &body);
                }
            });
        }
    });
}

fn spawn_metrics(listener: TcpListener, report: Reporter) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let report = report.clone();
            std::thread::spawn(move || {
                let (status, body) = match http::read_get(&stream) {
                    Ok(Some(path)) if path == "/metrics" => ("200 OK", metrics::render(&report())),
                    _ => ("404 Not Found", String::new()),
                };
                let _ = http::respond(
                    &stream,
                    status,
                    "text/plain; version=0.0.4",
                    body.as_bytes(),
                );
            });
        }
    });
}

/// SIGINT and SIGTERM unmount, which ends the session loop cleanly.
fn spawn_signal_handler<S: BlobSource + 'static>(
    unmounter: Arc<Mutex<fuser::SessionUnmounter>>,
    shutdown: Arc<Shutdown<S>>,
) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|source| {
        DaemonError::Io {
            op: "install",
            what: "signal handlers".into(),
            source,
        }
    })?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "unmounting on signal");
            if unmount_when_idle(&unmounter, &shutdown.mountpoint) == Unmounted::Cleanly {
                shutdown.end_after_signal();
            }
        }
    });
    Ok(())
}

/// How long an unmount on a signal waits for the mount to be idle.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(5);
const UNMOUNT_RETRY: Duration = Duration::from_millis(20);

/// How a signal's unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unmounted {
    /// Gone from this mount namespace.
    Cleanly,
    /// Still in use (open files, an overlay over it): detached, and served
    /// until the last user lets go.
    Lazily,
}

/// Unmounts, retrying while the kernel says the mount is busy (requests
/// still in flight for files already closed make it so for a moment);
/// past [`UNMOUNT_BUSY_WAIT`], or where a plain unmount is not allowed (an
/// unprivileged mount), detaches it lazily, so the daemon still ends once
/// the last user lets go.
fn unmount_when_idle(unmounter: &Mutex<fuser::SessionUnmounter>, mountpoint: &Path) -> Unmounted {
    let deadline = Instant::now() + UNMOUNT_BUSY_WAIT;
    loop {
        match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => return Unmounted::Cleanly,
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(UNMOUNT_RETRY);
            }
            Err(e) => {
                if e != rustix::io::Errno::PERM {
                    tracing::warn!(error = %e, "unmount failed; detaching the mount lazily");
                }
                // As root, detach; otherwise ask fuser (fusermount3) to.
                let detached =
                    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH)
                        .map_err(std::io::Error::from)
                        .or_else(|_| {
                            unmounter
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .unmount()
                        });
                if let Err(e) = detached {
                    tracing::error!(error = %e, "lazy unmount failed");
                }
                return Unmounted::Lazily;
            }
        }
    }
}

/// Fetches every blob's chunk table in the background, so the first read
/// of each blob does not wait for it (a reader that needs a table first
/// waits for this fetch instead of making its own).
fn fetch_chunk_tables<S: BlobSource + 'static>(store: &Arc<ChunkStore<S>>) {
    let store = store.clone();
    let spawned = std::thread::Builder::new()
        .name("darter-tables".into())
        .spawn(move || {
            for blob in 0..store.image().blobs().len() {
                if let Err(e) = store.image().chunk_table(blob) {
                    tracing::warn!(blob, error = %e, "cannot fetch a chunk table");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start fetching the chunk tables");
    }
}
