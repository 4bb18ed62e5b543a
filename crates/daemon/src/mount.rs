//! One mount inside a daemon process: its FUSE session (mounted here, or
//! taken over from the keeper), the kernel EROFS mount of the `erofs`
//! frontend, the link to its keeper and its stats socket. What belongs to
//! the process (signals, the cache directory, metrics, the node API) is in
//! `node.rs`.

use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use darter_cache::{CacheDir, ChunkStore, Counted, Stats, StatsSnapshot, StoreOptions};
use darter_fuse::{DarterFs, DevicesFs, FsOptions, prepare_mountpoint};
use darter_image::{BlobSource, Image};
use fuser::{MountOption, SessionACL};

use crate::api::{StatsReport, socket_path};
use crate::http;
use crate::keeper::KeeperLink;
use crate::kernel::{KernelMount, prepare_devices_dir};

/// Kernel readahead of a mount: one chunk, so sequential reads of a large
/// file ask for whole chunks.
const READAHEAD_KIB: u32 = 1024;

/// How to run one mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Fetch the whole image in the background.
    pub prefetch_all: bool,
    /// FUSE request threads.
    pub threads: usize,
    /// Chunk store tuning.
    pub store: StoreOptions,
    /// How the kernel sees the mount.
    pub frontend: Frontend,
    /// The keeper to hand the mount's FUSE device to. Under a keeper,
    /// SIGINT/SIGTERM end the daemon without unmounting (a restart: the
    /// keeper has another daemon take the mount over).
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
    /// This process already serves (or is mounting) the mountpoint.
    #[error("{} is already served by this daemon", mountpoint.display())]
    AlreadyServed {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
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
    /// The frontend `--frontend` and the config file name so.
    pub fn from_name(name: &str) -> Option<Frontend> {
        [Frontend::Fuse, Frontend::Erofs]
            .into_iter()
            .find(|f| f.as_str() == name)
    }

    /// The name `--frontend` and the config file take (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Fuse => "fuse",
            Frontend::Erofs => "erofs",
        }
    }
}

/// Called once when a mount's session has ended (unmounted), with the
/// mount.
pub(crate) type OnEnd = Box<dyn FnOnce(&Arc<Running>) + Send>;

/// Opens `spec` (fetching the bootstrap, counted as backend traffic) with
/// the chunk cache `cache`, mounts it at `mountpoint` (or takes the mount
/// there over, see [`MountOptions::takeover`]) and returns once it serves;
/// the session runs on threads of its own until it is unmounted, and then
/// `on_end` runs. `daemon_socket` is the node API socket of this process,
/// recorded with the keeper.
pub(crate) fn start<S: BlobSource + 'static>(
    spec: ImageSpec<S>,
    mountpoint: &Path,
    opts: &MountOptions,
    cache: CacheDir,
    daemon_socket: Option<&Path>,
    on_end: OnEnd,
) -> Result<Arc<Running>, DaemonError> {
    if !opts.takeover {
        prepare_mountpoint(mountpoint)?;
    }
    let stats = Arc::new(Stats::default());
    let image = Image::open(
        spec.digest,
        spec.manifest,
        Counted::new(spec.blobs, stats.clone()),
    )?;
    let store = Arc::new(ChunkStore::new(
        Arc::new(image),
        Some(cache),
        opts.store,
        stats,
    ));
    let config = |kind: &str| fuse_config(&spec.name, opts, kind);
    let (session, kernel) = match opts.frontend {
        Frontend::Fuse => {
            let fs = DarterFs::new(store.clone(), FsOptions::default());
            let abi = fs.abi_slot();
            let session = Served::start(fs, &abi, mountpoint, mountpoint, &config(""), opts)?;
            (session, None)
        }
        Frontend::Erofs => {
            let devices = crate::api::devices_dir(mountpoint);
            if !opts.takeover {
                prepare_devices_dir(&devices)?;
            }
            let fs = DevicesFs::new(store.clone());
            let abi = fs.abi_slot();
            let session = Served::start(fs, &abi, &devices, mountpoint, &config("devices:"), opts)?;
            let kernel = KernelMount {
                devices,
                mountpoint: mountpoint.to_owned(),
                blob_count: store.image().blobs().len(),
            };
            (session, Some(kernel))
        }
    };
    let Served {
        run,
        unmounter,
        device,
        abi,
        taken_over,
    } = session;
    // Unmounted in this order: the kernel mount holds its devices.
    let unmount_order: Vec<PathBuf> = std::iter::once(mountpoint.to_owned())
        .chain(kernel.as_ref().map(|k| k.devices.clone()))
        .collect();
    let running = Arc::new(Running {
        image: spec.name,
        mountpoint: mountpoint.to_owned(),
        frontend: opts.frontend,
        keeper: opts.keeper.clone(),
        daemon_socket: daemon_socket.map(Path::to_owned),
        started: Instant::now(),
        stats: Box::new({
            let store = store.clone();
            move || store.stats()
        }),
        stop_store: Box::new({
            let store = store.clone();
            move || store.stop()
        }),
        socket: socket_path(mountpoint),
        unmount_order,
        unmounter: Mutex::new(unmounter),
        link: Mutex::new(None),
        finished: Once::new(),
        ended: Mutex::new(None),
        ended_changed: Condvar::new(),
    });
    fetch_chunk_tables(&store);
    let serving = running.clone();
    let devices = kernel.as_ref().map(|k| k.devices.clone());
    let recorded_devices = devices.clone();
    std::thread::Builder::new()
        .name("darter-session".into())
        .spawn(move || {
            let served = run();
            serving.session_ended(served, devices.as_deref());
            on_end(&serving);
        })
        .map_err(|source| DaemonError::Io {
            op: "start serving",
            what: mountpoint.display().to_string(),
            source,
        })?;
    if let Some(kernel) = kernel {
        let mounted = if taken_over { Ok(()) } else { kernel.mount() };
        if let Err(e) = mounted {
            running.unmount_path(&kernel.devices);
            running.wait_ended(None);
            return Err(e);
        }
        let watcher = running.clone();
        let watched = kernel.devices.clone();
        kernel.watch_unmount(move || {
            tracing::info!("the kernel mount is gone; unmounting its devices");
            watcher.unmount_path(&watched);
        });
    }
    if let Some(keeper) = opts.keeper.as_deref() {
        let record = crate::keeper::MountRecord {
            mountpoint: mountpoint.to_owned(),
            image: running.image.clone(),
            frontend: opts.frontend,
            devices: recorded_devices,
            pid: std::process::id(),
            abi,
            daemon_socket: daemon_socket.map(Path::to_owned),
        };
        *running.link.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(KeeperLink::start(keeper, record, device));
    }
    match bind_stats_socket(&running.socket) {
        Ok(listener) => spawn_stats_api(listener, running.clone()),
        Err(e) => {
            running.unmount();
            return Err(e);
        }
    }
    if opts.prefetch_all {
        std::thread::spawn(move || store.prefetch_all());
    }
    tracing::info!(image = %running.image, mountpoint = %mountpoint.display(), "mounted");
    Ok(running)
}

fn fuse_config(name: &str, opts: &MountOptions, kind: &str) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("darter:{kind}{name}")),
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

/// A mount being served by this process.
pub(crate) struct Running {
    /// How the user named the image.
    pub image: String,
    pub mountpoint: PathBuf,
    pub frontend: Frontend,
    /// The keeper holding its device: a stop leaves it mounted.
    pub keeper: Option<PathBuf>,
    /// The node API socket of this process, if it serves one.
    daemon_socket: Option<PathBuf>,
    started: Instant,
    stats: Box<dyn Fn() -> StatsSnapshot + Send + Sync>,
    /// Stops the chunk store (writes out the queued cache writes).
    stop_store: Box<dyn Fn() + Send + Sync>,
    /// The mountpoint's stats socket.
    socket: PathBuf,
    /// The mountpoint, then the kernel frontend's devices directory.
    unmount_order: Vec<PathBuf>,
    unmounter: Mutex<fuser::SessionUnmounter>,
    link: Mutex<Option<KeeperLink>>,
    finished: Once,
    /// The session's outcome, once it has ended.
    ended: Mutex<Option<Result<(), String>>>,
    ended_changed: Condvar,
}

impl Running {
    /// The counters now.
    pub fn report(&self) -> StatsReport {
        StatsReport {
            image: self.image.clone(),
            mountpoint: self.mountpoint.clone(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            daemon_socket: self.daemon_socket.clone(),
            stats: (self.stats)(),
        }
    }

    /// Unmounts the mount (the devices after the kernel mount). See
    /// [`unmount_when_idle`].
    pub fn unmount(&self) -> Unmounted {
        // Every path is unmounted, whatever became of the ones before.
        let outcomes: Vec<Unmounted> = self
            .unmount_order
            .iter()
            .map(|path| self.unmount_path(path))
            .collect();
        if outcomes.iter().all(|u| *u == Unmounted::Cleanly) {
            Unmounted::Cleanly
        } else {
            Unmounted::Lazily
        }
    }

    fn unmount_path(&self, path: &Path) -> Unmounted {
        unmount_when_idle(&self.unmounter, path)
    }

    /// True if the session has ended within `timeout` (forever if None).
    pub fn wait_ended(&self, timeout: Option<Duration>) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let still = |ended: &mut Option<_>| ended.is_none();
        let ended = match timeout {
            Some(timeout) => {
                self.ended_changed
                    .wait_timeout_while(ended, timeout, still)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self
                .ended_changed
                .wait_while(ended, still)
                .unwrap_or_else(|e| e.into_inner()),
        };
        ended.is_some()
    }

    /// How the session ended (None while it serves).
    pub fn outcome(&self) -> Option<Result<(), String>> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What is done once at the end: stop the store, remove the stats
    /// socket.
    pub fn finish(&self) {
        self.finished.call_once(|| {
            (self.stop_store)();
            let _ = std::fs::remove_file(&self.socket);
            tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        });
    }

    fn session_ended(&self, served: std::io::Result<()>, devices: Option<&Path>) {
        if let Some(link) = self.link.lock().unwrap_or_else(|e| e.into_inner()).take() {
            link.unmounted();
        }
        if let Some(devices) = devices {
            // Empty once the session has ended; nothing to do if not.
            let _ = std::fs::remove_dir(devices);
        }
        if let Err(e) = &served {
            tracing::error!(mountpoint = %self.mountpoint.display(), error = %e, "the FUSE session failed");
        }
        self.finish();
        let outcome = served.map_err(|e| format!("serving {}: {e}", self.mountpoint.display()));
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.ended_changed.notify_all();
    }
}

/// The stats socket, bound now (a socket left by a dead daemon for this
/// mountpoint is replaced) and answered once the mount serves.
fn bind_stats_socket(socket: &Path) -> Result<UnixListener, DaemonError> {
    create_socket_dir(socket)?;
    let _ = std::fs::remove_file(socket);
    UnixListener::bind(socket).map_err(|e| socket_error("listen on", socket, e))
}

/// A socket operation's error, naming the socket.
pub(crate) fn socket_error(op: &'static str, socket: &Path, source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        op,
        what: socket.display().to_string(),
        source,
    }
}

/// Creates the directory `socket` goes in.
pub(crate) fn create_socket_dir(socket: &Path) -> Result<(), DaemonError> {
    match socket.parent() {
        Some(dir) => std::fs::create_dir_all(dir)
            .map_err(|e| socket_error("create directory for", socket, e)),
        None => Ok(()),
    }
}

fn spawn_stats_api(listener: UnixListener, mount: Arc<Running>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if mount.outcome().is_some() {
                return;
            }
            let mount = mount.clone();
            std::thread::spawn(move || {
                let (status, body) = match http::read_request(&stream) {
                    Ok(Some(r)) if r.method == "GET" && r.path == "/stats" => {
                        match serde_json::to_vec(&mount.report()) {
                            Ok(body) => ("200 OK", body),
                            Err(_) => ("500 Internal Server Error", b"{}".to_vec()),
                        }
                    }
                    Ok(Some(_)) => ("404 Not Found", b"{}".to_vec()),
                    _ => ("400 Bad Request", b"{}".to_vec()),
                };
                let _ = http::respond(&stream, status, "application/json", &body);
            });
        }
    });
}

/// How long an unmount waits for the mount to be idle.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(5);
const UNMOUNT_RETRY: Duration = Duration::from_millis(20);

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unmounted {
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
