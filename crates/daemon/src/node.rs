//! The process around mounts: one chunk cache handle, the signal handler,
//! the Prometheus endpoint and, for the node daemon (`darter daemon`), the
//! API that mounts, unmounts and lists images. A foreground `darter mount`
//! is the same process holding a single mount, without the API.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use darter_cache::CacheDir;
use darter_image::BlobSource;

use crate::api::{ErrorBody, MountListing, MountRequest, NodeStatus, UnmountRequest};
use crate::mount::{Running, Unmounted};
use crate::{DaemonError, ImageSpec, MountOptions, http, metrics};

/// How long a process told to stop waits, once a mount is gone from its
/// own mount namespace, for the kernel to end the FUSE session.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);
/// How long `DELETE /mounts` waits for the session to end after a clean
/// unmount.
const UNMOUNT_END_WAIT: Duration = Duration::from_secs(30);

/// What the process holds for all its mounts.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The shared chunk cache directory.
    pub cache_dir: PathBuf,
    /// Serve Prometheus metrics of every mount here.
    pub metrics_addr: Option<SocketAddr>,
}

/// Opens the image a mount request names (the registry clients live with
/// the caller).
pub trait ImageOpener: Send + Sync {
    /// The manifest and blobs of `request.image`, with its credentials; an
    /// error message naming the image.
    fn open(&self, request: &MountRequest) -> Result<ImageSpec<Box<dyn BlobSource>>, String>;

    /// Chunk store tuning for where `image` lives.
    fn store_options(&self, image: &str) -> darter_cache::StoreOptions;
}

/// A mountpoint in the table: being mounted, or served.
enum Slot {
    Starting,
    Serving(Arc<Running>),
}

/// A process serving mounts.
pub struct Node {
    cache_dir: PathBuf,
    /// One handle per cache directory, the daemon's own first.
    caches: Mutex<HashMap<PathBuf, CacheDir>>,
    /// The node API socket, if this process serves one.
    socket: Option<PathBuf>,
    mounts: Mutex<HashMap<PathBuf, Slot>>,
    changed: Condvar,
}

impl Node {
    /// Opens the cache, and starts the metrics endpoint and the signal
    /// handler: SIGINT/SIGTERM unmount every mount without a keeper
    /// (cleanly; one in use is detached and served until its last user
    /// leaves), leave the kept ones mounted, and end the process.
    pub fn start(opts: &NodeOptions, socket: Option<&Path>) -> Result<Arc<Node>, DaemonError> {
        let cache = CacheDir::open(&opts.cache_dir)?;
        let node = Arc::new(Node {
            cache_dir: opts.cache_dir.clone(),
            caches: Mutex::new(HashMap::from([(opts.cache_dir.clone(), cache)])),
            socket: socket.map(Path::to_owned),
            mounts: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        });
        if let Some(addr) = opts.metrics_addr {
            let listener = TcpListener::bind(addr).map_err(|source| DaemonError::Io {
                op: "listen on",
                what: addr.to_string(),
                source,
            })?;
            spawn_metrics(listener, node.clone());
        }
        spawn_signal_handler(node.clone())?;
        Ok(node)
    }

    fn table(&self) -> MutexGuard<'_, HashMap<PathBuf, Slot>> {
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mounts served now.
    fn serving(&self) -> Vec<Arc<Running>> {
        self.table()
            .values()
            .filter_map(|slot| match slot {
                Slot::Serving(m) => Some(m.clone()),
                Slot::Starting => None,
            })
            .collect()
    }

    /// The handle of the cache at `dir` (the daemon's own if None), opened
    /// once.
    fn cache(&self, dir: Option<&Path>) -> Result<CacheDir, DaemonError> {
        let dir = dir.unwrap_or(&self.cache_dir);
        let mut caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cache) = caches.get(dir) {
            return Ok(cache.clone());
        }
        let cache = CacheDir::open(dir)?;
        caches.insert(dir.to_owned(), cache.clone());
        Ok(cache)
    }

    /// Mounts `spec` at `mountpoint` (see [`MountOptions`]) with the cache
    /// at `cache_dir` (the process's own if None) and returns once it
    /// serves. A mountpoint this process serves or is mounting is refused.
    pub fn mount<S: BlobSource + 'static>(
        self: &Arc<Self>,
        spec: ImageSpec<S>,
        mountpoint: &Path,
        opts: &MountOptions,
        cache_dir: Option<&Path>,
    ) -> Result<(), DaemonError> {
        let cache = self.cache(cache_dir)?;
        self.reserve(mountpoint)?;
        let node = Arc::downgrade(self);
        let on_end: crate::mount::OnEnd = Box::new(move |ended| {
            if let Some(node) = node.upgrade() {
                node.forget(ended);
            }
        });
        let started = crate::mount::start(
            spec,
            mountpoint,
            opts,
            cache,
            self.socket.as_deref(),
            on_end,
        );
        let mut table = self.table();
        match started {
            Ok(running) if running.outcome().is_none() => {
                table.insert(mountpoint.to_owned(), Slot::Serving(running));
                Ok(())
            }
            Ok(_) => {
                table.remove(mountpoint);
                self.changed.notify_all();
                Ok(())
            }
            Err(e) => {
                table.remove(mountpoint);
                self.changed.notify_all();
                Err(e)
            }
        }
    }

    fn reserve(&self, mountpoint: &Path) -> Result<(), DaemonError> {
        let mut table = self.table();
        if table.contains_key(mountpoint) {
            return Err(DaemonError::AlreadyServed {
                mountpoint: mountpoint.to_owned(),
            });
        }
        table.insert(mountpoint.to_owned(), Slot::Starting);
        Ok(())
    }

    /// Drops a mount whose session ended from the table.
    fn forget(&self, ended: &Arc<Running>) {
        let mut table = self.table();
        if let Some(Slot::Serving(m)) = table.get(&ended.mountpoint)
            && Arc::ptr_eq(m, ended)
        {
            table.remove(&ended.mountpoint);
            tracing::info!(mountpoint = %ended.mountpoint.display(), "the mount is gone; forgotten");
        }
        self.changed.notify_all();
    }

    /// Waits until the process serves no mount.
    fn wait_empty(&self) {
        let table = self.table();
        let _empty = self
            .changed
            .wait_while(table, |t| !t.is_empty())
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Unmounts the mount at `mountpoint` (waiting while it is busy, then
    /// detaching it) and waits until its session has ended.
    fn unmount(&self, mountpoint: &Path) -> Result<(), String> {
        let mount = match self.table().get(mountpoint) {
            Some(Slot::Serving(m)) => m.clone(),
            Some(Slot::Starting) => {
                return Err(format!("{} is still being mounted", mountpoint.display()));
            }
            None => {
                return Err(format!(
                    "this daemon serves nothing at {}",
                    mountpoint.display()
                ));
            }
        };
        if mount.unmount() == Unmounted::Cleanly && !mount.wait_ended(Some(UNMOUNT_END_WAIT)) {
            tracing::warn!(mountpoint = %mountpoint.display(), "the unmounted mount lives on in another mount namespace");
        }
        Ok(())
    }

    fn status(&self) -> NodeStatus {
        let mut mounts: Vec<MountListing> = self
            .serving()
            .iter()
            .map(|m| MountListing {
                report: m.report(),
                frontend: m.frontend,
                keeper: m.keeper.clone(),
            })
            .collect();
        mounts.sort_by(|a, b| a.report.mountpoint.cmp(&b.report.mountpoint));
        NodeStatus {
            pid: std::process::id(),
            cache_dir: self.cache_dir.clone(),
            mounts,
        }
    }

    /// On SIGINT/SIGTERM: unmounts what no keeper keeps, waits for those
    /// sessions to end, and ends the process.
    fn stop(&self, signal: i32) -> ! {
        let mounts = self.serving();
        let (kept, unkept): (Vec<_>, Vec<_>) = mounts.iter().partition(|m| m.keeper.is_some());
        if !kept.is_empty() {
            tracing::info!(
                signal,
                kept = kept.len(),
                "stopping; the keeper keeps its mounts for the next daemon"
            );
        }
        if !unkept.is_empty() {
            tracing::info!(signal, "unmounting on signal");
        }
        let unmounted: Vec<(&Arc<Running>, Unmounted)> =
            unkept.iter().map(|m| (*m, m.unmount())).collect();
        for (mount, how) in &unmounted {
            match how {
                // A detached mount in use is served until its last user leaves.
                Unmounted::Lazily => {
                    mount.wait_ended(None);
                }
                // The kernel ends the session once the filesystem has no
                // mount left anywhere. A copy of the mount in another
                // mount namespace (`unshare`, a container runtime, `ip
                // netns`) keeps it alive, and the process would serve it
                // forever although it was told to stop: stop anyway.
                // Exiting closes the FUSE connection, so such copies
                // answer ENOTCONN.
                Unmounted::Cleanly => {
                    if !mount.wait_ended(Some(SESSION_END_WAIT)) {
                        tracing::warn!(
                            mountpoint = %mount.mountpoint.display(),
                            "the mount lives on in another mount namespace; stopping anyway"
                        );
                    }
                }
            }
        }
        for mount in &mounts {
            mount.finish();
        }
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
        std::process::exit(0);
    }

    /// Serves the node API on `socket` (mode 0600; a stale socket file is
    /// replaced) until the process ends.
    fn serve_api(self: &Arc<Self>, listener: &UnixListener, opener: &Arc<dyn ImageOpener>) {
        for stream in listener.incoming().flatten() {
            let (node, opener) = (self.clone(), opener.clone());
            std::thread::spawn(move || {
                let (status, body) = match http::read_request(&stream) {
                    Ok(Some(request)) => node.answer(&request, opener.as_ref()),
                    _ => error_answer("400 Bad Request", "not an HTTP request".into()),
                };
                let _ = http::respond(&stream, status, "application/json", &body);
            });
        }
    }

    fn answer(
        self: &Arc<Self>,
        request: &http::Request,
        opener: &dyn ImageOpener,
    ) -> (&'static str, Vec<u8>) {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/mounts") => json_answer(&self.status()),
            ("POST", "/mounts") => match serde_json::from_slice::<MountRequest>(&request.body) {
                Ok(mount) => self.answer_mount(&mount, opener),
                Err(e) => error_answer("400 Bad Request", format!("bad mount request: {e}")),
            },
            ("DELETE", "/mounts") => {
                match serde_json::from_slice::<UnmountRequest>(&request.body) {
                    Ok(UnmountRequest { mountpoint }) => match self.unmount(&mountpoint) {
                        Ok(()) => json_answer(&serde_json::json!({})),
                        Err(e) => error_answer("404 Not Found", e),
                    },
                    Err(e) => error_answer("400 Bad Request", format!("bad unmount request: {e}")),
                }
            }
            _ => error_answer(
                "404 Not Found",
                format!("no {} {}", request.method, request.path),
            ),
        }
    }

    fn answer_mount(
        self: &Arc<Self>,
        request: &MountRequest,
        opener: &dyn ImageOpener,
    ) -> (&'static str, Vec<u8>) {
        tracing::info!(image = %request.image, mountpoint = %request.mountpoint.display(), takeover = request.takeover, "mount requested");
        let spec = match opener.open(request) {
            Ok(spec) => spec,
            Err(e) => return error_answer("502 Bad Gateway", e),
        };
        let opts = MountOptions {
            prefetch_all: request.prefetch_all,
            threads: request.threads,
            store: opener.store_options(&request.image),
            frontend: request.frontend,
            keeper: request.keeper.clone(),
            takeover: request.takeover,
        };
        match self.mount(
            spec,
            &request.mountpoint,
            &opts,
            request.cache_dir.as_deref(),
        ) {
            Ok(()) => match self.table().get(&request.mountpoint) {
                Some(Slot::Serving(m)) => json_answer(&m.report()),
                _ => error_answer(
                    "500 Internal Server Error",
                    format!(
                        "the mount at {} ended at once",
                        request.mountpoint.display()
                    ),
                ),
            },
            Err(e @ DaemonError::AlreadyServed { .. }) => {
                error_answer("409 Conflict", e.to_string())
            }
            Err(e) => error_answer("500 Internal Server Error", error_chain(&e)),
        }
    }
}

fn json_answer(value: &impl serde::Serialize) -> (&'static str, Vec<u8>) {
    match serde_json::to_vec(value) {
        Ok(body) => ("200 OK", body),
        Err(e) => error_answer("500 Internal Server Error", e.to_string()),
    }
}

fn error_answer(status: &'static str, error: String) -> (&'static str, Vec<u8>) {
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    (status, body)
}

/// An error and its causes on one line (a cause its message already holds
/// is not repeated).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn spawn_metrics(listener: TcpListener, node: Arc<Node>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let node = node.clone();
            std::thread::spawn(move || {
                let (status, body) = match http::read_request(&stream) {
                    Ok(Some(r)) if r.method == "GET" && r.path == "/metrics" => {
                        let reports: Vec<_> = node.serving().iter().map(|m| m.report()).collect();
                        ("200 OK", metrics::render(&reports))
                    }
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

fn spawn_signal_handler(node: Arc<Node>) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|source| {
        DaemonError::Io {
            op: "install",
            what: "signal handlers".into(),
            source,
        }
    })?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            node.stop(signal);
        }
    });
    Ok(())
}

/// The one-off form (`darter mount` in the foreground): opens `spec`,
/// mounts it at `mountpoint` (or takes the mount there over) in this
/// process and serves it until it is unmounted or the process gets
/// SIGINT/SIGTERM (which unmount cleanly, unless a keeper keeps the mount).
pub fn mount<S: BlobSource + 'static>(
    spec: ImageSpec<S>,
    mountpoint: &Path,
    node: &NodeOptions,
    opts: &MountOptions,
) -> Result<(), DaemonError> {
    let node = Node::start(node, None)?;
    node.mount(spec, mountpoint, opts, None)?;
    let mount = node.serving().into_iter().next();
    node.wait_empty();
    match mount.and_then(|m| m.outcome()) {
        Some(Err(message)) => Err(DaemonError::Io {
            op: "serve",
            what: mountpoint.display().to_string(),
            source: std::io::Error::other(message),
        }),
        _ => Ok(()),
    }
}

/// How long a new daemon waits for the lock of one that is ending (a
/// dying process closes its keeper connections before its lock is gone).
const LOCK_WAIT: Duration = Duration::from_secs(10);
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// Takes the daemon lock `lock` of `socket`, waiting while its holder
/// does not answer there (it is ending); a daemon that answers keeps it.
fn take_lock(lock: &std::fs::File, lock_path: &Path, socket: &Path) -> Result<(), DaemonError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let taken = rustix::fs::flock(lock, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        let held = match taken {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if crate::api::node_status(socket).is_ok() || std::time::Instant::now() > deadline {
            return Err(crate::mount::socket_error(
                "serve",
                socket,
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another node daemon holds {} ({held})", lock_path.display()),
                ),
            ));
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// The node daemon (`darter daemon`): serves the API on `socket` (mode
/// 0600) and every mount asked for there, with images opened by `opener`,
/// until SIGINT/SIGTERM.
pub fn run_node(
    socket: &Path,
    opts: &NodeOptions,
    opener: &Arc<dyn ImageOpener>,
) -> Result<(), DaemonError> {
    let io = |op, source| crate::mount::socket_error(op, socket, source);
    crate::mount::create_socket_dir(socket)?;
    // One daemon per socket: the lock is held for the process's life, so
    // two daemons started at once never take each other's socket.
    let lock_path = socket.with_extension("lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io("open the lock of", e))?;
    take_lock(&lock, &lock_path, socket)?;
    // A socket left by a dead daemon is replaced.
    let _ = std::fs::remove_file(socket);
    let node = Node::start(opts, Some(socket))?;
    // Bound under a umask that leaves it to the owner: it carries
    // registry credentials.
    let old_mask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(socket);
    rustix::process::umask(old_mask);
    let listener = listener.map_err(|e| io("listen on", e))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("restrict", e))?;
    tracing::info!(socket = %socket.display(), cache = %opts.cache_dir.display(), "the node daemon serves");
    node.serve_api(&listener, opener);
    drop(lock);
    Ok(())
}
