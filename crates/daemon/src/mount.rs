//! One mount's lifecycle.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use darter_cache::{CacheDir, ChunkStore, Counted, Stats, StoreOptions};
use darter_fuse::{DarterFs, DevicesFs, FsOptions, prepare_mountpoint};
use darter_image::{BlobSource, Image};
use fuser::{MountOption, SessionACL};

use crate::api::{StatsReport, socket_path};
use crate::keeper::KeeperLink;
use crate::kernel::{KernelMount, prepare_devices_dir};
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
    /// How the kernel sees the mount.
    pub frontend: Frontend,
    /// The keeper to hand the mount's FUSE device to. Under a keeper,
    /// SIGINT/SIGTERM end the daemon without unmounting (a restart: the
    /// keeper starts another daemon that takes the mount over).
    pub keeper: Option<PathBuf>,
    /// Take over the mount already at the mountpoint, whose device the
    /// keeper holds, instead of mounting.
    pub takeover: bool,
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
    /// The kernel refused the EROFS mount of the kernel frontend.
    #[error(
        "the kernel refused to mount {} as EROFS at {}: {source} (the erofs frontend needs \
         root and Linux 6.12 or later with file-backed EROFS; --frontend fuse works everywhere)",
        bootstrap.display(),
        mountpoint.display()
    )]
    KernelMount {
        /// The bootstrap file on the devices filesystem.
        bootstrap: PathBuf,
        /// Where it was to be mounted.
        mountpoint: PathBuf,
        /// What mount(2) said.
        source: std::io::Error,
    },
    /// The keeper has no device for the mount, or cannot be reached.
    #[error(transparent)]
    Keeper(#[from] crate::keeper::KeeperError),
    /// The taken-over FUSE connection cannot be served.
    #[error(transparent)]
    Takeover(#[from] darter_fuse::TakeoverError),
    /// A takeover was asked for without a keeper.
    #[error("taking over {} needs a keeper", mountpoint.display())]
    TakeoverWithoutKeeper {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
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

/// How the kernel sees a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// The daemon answers every request of the mounted tree over FUSE
    /// (lookups, attributes, directories and file data).
    #[default]
    Fuse,
    /// The kernel mounts the bootstrap as EROFS itself; the daemon serves
    /// over FUSE, on a private directory, only the bootstrap and the blobs'
    /// address spaces the kernel reads on page-cache misses. Lookups,
    /// stats and cached reads are native EROFS. Needs root and a kernel
    /// with file-backed EROFS mounts (6.12 or later).
    Erofs,
}

impl Frontend {
    /// The name `--frontend` and the config file take (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Fuse => "fuse",
            Frontend::Erofs => "erofs",
        }
    }
}

/// Opens `spec` (fetching the bootstrap, counted as backend traffic),
/// mounts it at `mountpoint` (or takes the mount there over, see
/// [`MountOptions::takeover`]) and serves it until it is unmounted or the
/// process gets SIGINT/SIGTERM (which unmount cleanly, unless a keeper
/// keeps the mount). `ready` runs once the mount answers requests.
pub fn mount<S: BlobSource + 'static>(
    spec: ImageSpec<S>,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    if !opts.takeover {
        prepare_mountpoint(mountpoint)?;
    }
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
    let mount = Mount {
        name: spec.name,
        mountpoint: mountpoint.to_owned(),
        store,
    };
    match opts.frontend {
        Frontend::Fuse => {
            let fs = DarterFs::new(mount.store.clone(), FsOptions::default());
            let abi = fs.abi_slot();
            let config = mount.fuse_config(opts, "");
            let session = Served::start(fs, &abi, mountpoint, mountpoint, &config, opts)?;
            mount.serve(session, None, opts, ready)
        }
        Frontend::Erofs => {
            let devices = crate::api::devices_dir(mountpoint);
            if !opts.takeover {
                prepare_devices_dir(&devices)?;
            }
            let fs = DevicesFs::new(mount.store.clone());
            let abi = fs.abi_slot();
            let config = mount.fuse_config(opts, "devices:");
            let session = Served::start(fs, &abi, &devices, mountpoint, &config, opts)?;
            let kernel = KernelMount {
                devices,
                mountpoint: mountpoint.to_owned(),
                blob_count: mount.store.image().blobs().len(),
            };
            mount.serve(session, Some(kernel), opts, ready)
        }
    }
}

fn start_session<FS: fuser::Filesystem>(
    fs: FS,
    at: &Path,
    config: &fuser::Config,
) -> Result<fuser::Session<FS>, DaemonError> {
    let session = fuser::Session::new(fs, at, config).map_err(|source| DaemonError::Io {
        op: "mount at",
        what: at.display().to_string(),
        source,
    })?;
    if let Err(e) = darter_fuse::set_readahead(at, READAHEAD_KIB) {
        tracing::warn!(error = %e, "cannot raise the mount's readahead; large reads will be split");
    }
    Ok(session)
}

/// A FUSE session ready to run: mounted by this daemon, or taken over
/// from the keeper.
struct Served {
    run: Box<dyn FnOnce() -> std::io::Result<()> + Send>,
    unmounter: fuser::SessionUnmounter,
    /// The connection's device and what its kernel offered, for the keeper.
    device: OwnedFd,
    abi: darter_fuse::KernelAbi,
    taken_over: bool,
}

impl Served {
    /// Mounts `fs` at `at` (the mountpoint, or the devices directory of
    /// the mount at `mountpoint`), or takes that mount over from the keeper.
    fn start<FS: fuser::Filesystem + Send + 'static>(
        fs: FS,
        abi: &darter_fuse::AbiSlot,
        at: &Path,
        mountpoint: &Path,
        config: &fuser::Config,
        opts: &MountOptions,
    ) -> Result<Served, DaemonError> {
        let dup_error = |source| DaemonError::Io {
            op: "duplicate the FUSE device of",
            what: at.display().to_string(),
            source,
        };
        if opts.takeover {
            let keeper =
                opts.keeper
                    .as_deref()
                    .ok_or_else(|| DaemonError::TakeoverWithoutKeeper {
                        mountpoint: mountpoint.to_owned(),
                    })?;
            let (record, device) = crate::keeper::take_device(keeper, mountpoint)?;
            let kept = device.try_clone().map_err(dup_error)?;
            let mut taken = darter_fuse::take_over(fs, device, record.abi, config.clone())?;
            tracing::info!(mountpoint = %mountpoint.display(), previous_pid = record.pid, "took the mount over");
            return Ok(Served {
                unmounter: taken.session_mut().unmount_callable(),
                run: Box::new(move || taken.run()),
                device: kept,
                abi: record.abi,
                taken_over: true,
            });
        }
        let mut session = start_session(fs, at, config)?;
        let device = session.as_fd().try_clone_to_owned().map_err(dup_error)?;
        let abi = abi.get().copied().ok_or_else(|| DaemonError::Io {
            op: "negotiate FUSE_INIT at",
            what: at.display().to_string(),
            source: std::io::Error::other("the session did not record the kernel's offer"),
        })?;
        Ok(Served {
            unmounter: session.unmount_callable(),
            run: Box::new(move || session.run()),
            device,
            abi,
            taken_over: false,
        })
    }
}

/// One image being mounted.
struct Mount<S> {
    name: String,
    mountpoint: PathBuf,
    store: Arc<ChunkStore<S>>,
}

impl<S: BlobSource + 'static> Mount<S> {
    fn fuse_config(&self, opts: &MountOptions, kind: &str) -> fuser::Config {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("darter:{kind}{}", self.name)),
            MountOption::Subtype("darter".into()),
            MountOption::DefaultPermissions,
            MountOption::Dev,
            MountOption::Suid,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(opts.threads.max(1));
        // A cloned device is a file of its own, and a daemon's death ends
        // (ECONNABORTED) the requests read through it: under a keeper
        // every thread reads the one device the keeper holds a copy of.
        config.clone_fd = opts.keeper.is_none();
        config
    }

    /// Serves `session` (at the mountpoint, or at the devices directory
    /// under `kernel`'s EROFS mount) until it ends.
    fn serve(
        self,
        session: Served,
        kernel: Option<KernelMount>,
        opts: &MountOptions,
        ready: impl FnOnce(),
    ) -> Result<(), DaemonError> {
        let Served {
            run,
            unmounter,
            device,
            abi,
            taken_over,
        } = session;
        let unmounter = Arc::new(Mutex::new(unmounter));
        let socket = socket_path(&self.mountpoint);
        let shutdown = Arc::new(Shutdown::new(
            self.store.clone(),
            socket.clone(),
            self.mountpoint.clone(),
        ));
        // Unmounted in this order: the kernel mount holds its devices.
        let unmount_order: Vec<PathBuf> = std::iter::once(self.mountpoint.clone())
            .chain(kernel.as_ref().map(|k| k.devices.clone()))
            .collect();
        let on_signal = match opts.keeper {
            Some(_) => OnSignal::LeaveMounted,
            None => OnSignal::Unmount(unmount_order),
        };
        spawn_signal_handler(unmounter.clone(), shutdown.clone(), on_signal)?;
        let keep = |devices: Option<PathBuf>| {
            opts.keeper.as_deref().map(|keeper| {
                let record = crate::keeper::MountRecord {
                    mountpoint: self.mountpoint.clone(),
                    image: self.name.clone(),
                    frontend: opts.frontend,
                    devices,
                    pid: std::process::id(),
                    abi,
                };
                KeeperLink::start(keeper, record, device)
            })
        };
        fetch_chunk_tables(&self.store);
        let serve_error = |source| DaemonError::Io {
            op: "serve",
            what: self.mountpoint.display().to_string(),
            source,
        };
        let result = match kernel {
            None => {
                let link = keep(None);
                self.start_api(&socket, opts)?;
                ready();
                let served = run().map_err(serve_error);
                link.inspect(KeeperLink::unmounted);
                served
            }
            Some(kernel) => {
                let serving = std::thread::spawn(run);
                let mounted = if taken_over { Ok(()) } else { kernel.mount() };
                if let Err(e) = mounted {
                    unmount_when_idle(&unmounter, &kernel.devices);
                    let _ = serving.join();
                    let _ = std::fs::remove_dir(&kernel.devices);
                    return Err(e);
                }
                let devices = kernel.devices.clone();
                let link = keep(Some(devices.clone()));
                let watched = devices.clone();
                kernel.watch_unmount(move || {
                    tracing::info!("the kernel mount is gone; unmounting its devices");
                    unmount_when_idle(&unmounter, &watched);
                });
                self.start_api(&socket, opts)?;
                ready();
                let served = serving
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the FUSE session panicked")))
                    .map_err(serve_error);
                link.inspect(KeeperLink::unmounted);
                // Empty once the session has ended; nothing to do if not.
                let _ = std::fs::remove_dir(&devices);
                served
            }
        };
        shutdown.mark_ended();
        shutdown.finish();
        result
    }

    /// The API socket and metrics, and the prefetcher: what tells the
    /// world the mount is ready.
    fn start_api(&self, socket: &Path, opts: &MountOptions) -> Result<(), DaemonError> {
        let started = Instant::now();
        let report: Reporter = {
            let store = self.store.clone();
            let (image, mountpoint) = (self.name.clone(), self.mountpoint.clone());
            Arc::new(move || StatsReport {
                image: image.clone(),
                mountpoint: mountpoint.clone(),
                pid: std::process::id(),
                uptime_seconds: started.elapsed().as_secs_f64(),
                stats: store.stats(),
            })
        };
        spawn_api(bind_api(socket)?, report.clone());
        if let Some(addr) = opts.metrics_addr {
            let listener = TcpListener::bind(addr).map_err(|source| DaemonError::Io {
                op: "listen on",
                what: addr.to_string(),
                source,
            })?;
            spawn_metrics(listener, report);
        }
        if opts.prefetch_all {
            let store = self.store.clone();
            std::thread::spawn(move || store.prefetch_all());
        }
        tracing::info!(image = %self.name, mountpoint = %self.mountpoint.display(), "mounted");
        Ok(())
    }
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

/// What SIGINT and SIGTERM do.
enum OnSignal {
    /// Unmount these paths, in this order, which ends the session loop
    /// cleanly.
    Unmount(Vec<PathBuf>),
    /// End the daemon and leave the mount to the keeper, which holds its
    /// device and starts another daemon.
    LeaveMounted,
}

fn spawn_signal_handler<S: BlobSource + 'static>(
    unmounter: Arc<Mutex<fuser::SessionUnmounter>>,
    shutdown: Arc<Shutdown<S>>,
    on_signal: OnSignal,
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
            let OnSignal::Unmount(unmount_order) = on_signal else {
                tracing::info!(
                    signal = sig,
                    "stopping; the keeper keeps the mount for the next daemon"
                );
                shutdown.finish();
                std::process::exit(0);
            };
            tracing::info!(signal = sig, "unmounting on signal");
            // Every path is unmounted, whatever became of the ones before.
            let outcomes: Vec<Unmounted> = unmount_order
                .iter()
                .map(|path| unmount_when_idle(&unmounter, path))
                .collect();
            if outcomes.iter().all(|u| *u == Unmounted::Cleanly) {
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
            // EINVAL: not a mount point (any more): someone else unmounted
            // it first (the user, or the kernel frontend's watcher).
            Ok(()) | Err(rustix::io::Errno::INVAL) => return Unmounted::Cleanly,
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
