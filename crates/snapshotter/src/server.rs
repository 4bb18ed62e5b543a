//! Serving the snapshots API on a unix socket (what containerd's
//! `[proxy_plugins]` connect to), and a client for the same socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::tonic::codegen::http::Uri;
use containerd_snapshots::tonic::codegen::{Context, Poll, Service};
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Server};
use tokio::net::{UnixListener, UnixStream};

use crate::error::ServeError;
use crate::remote::LazyMounts;
use crate::snapshotter::OverlaySnapshotter;
use crate::status;

/// Mode of the socket: only root may drive the snapshotter.
const SOCKET_MODE: u32 = 0o600;
/// How long requests in flight may take to finish once asked to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `snapshotter` at `socket` until `shutdown` completes, then lets
/// requests in flight finish (for a while) and removes the socket. Its
/// status is served on the status socket under its root and, given
/// `metrics`, as Prometheus metrics on that TCP address.
pub async fn serve(
    snapshotter: OverlaySnapshotter,
    socket: &Path,
    metrics: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let _status = StatusServers::start(&snapshotter, metrics).await?;
    let listener = bind(socket)?;
    let _socket_file = SocketFile(socket.to_path_buf());
    tracing::info!(socket = %socket.display(), root = %snapshotter.snapshots().root().display(), "serving containerd's snapshots API");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        );
    tokio::pin!(server);
    let transport = |source| ServeError::Transport {
        path: socket.to_path_buf(),
        source,
    };
    tokio::select! {
        result = &mut server => return result.map_err(transport),
        () = shutdown => {}
    }
    tracing::info!("stopping");
    let _ = stop.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(result) => result.map_err(transport),
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still in flight; stopping anyway");
            Ok(())
        }
    }
}

/// Opens the snapshotter at `root` and serves it at `socket` until SIGINT
/// or SIGTERM, on a runtime of its own: the whole life of `darter
/// snapshotter`.
pub fn run(root: &Path, socket: &Path) -> Result<(), ServeError> {
    run_with(root, socket, None, None)
}

/// [`run`], serving Darter images lazily through `lazy`, and Prometheus
/// metrics on `metrics` if given.
pub fn run_with(
    root: &Path,
    socket: &Path,
    lazy: Option<Arc<dyn LazyMounts>>,
    metrics: Option<SocketAddr>,
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "start an async runtime for",
            path: socket.to_path_buf(),
            source,
        })?;
    runtime.block_on(async {
        let signals = termination_signals().map_err(|source| ServeError::Io {
            what: "listen for signals while serving",
            path: socket.to_path_buf(),
            source,
        })?;
        let root = root.to_path_buf();
        let snapshotter =
            tokio::task::spawn_blocking(move || OverlaySnapshotter::open_with(&root, lazy))
                .await
                .map_err(|err| crate::Error::Task(err.to_string()))??;
        serve(snapshotter, socket, metrics, signals).await
    })
}

/// The status servers of a snapshotter: its status socket and, maybe, its
/// metrics port. Stopped and the socket removed on drop.
struct StatusServers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _socket_file: SocketFile,
}

impl StatusServers {
    async fn start(
        snapshotter: &OverlaySnapshotter,
        metrics: Option<SocketAddr>,
    ) -> Result<StatusServers, ServeError> {
        let socket = status::status_socket(snapshotter.snapshots().root());
        let listener = bind(&socket)?;
        let socket_file = SocketFile(socket);
        let mut tasks = vec![tokio::spawn(status::serve_status(
            listener,
            snapshotter.shared(),
        ))];
        if let Some(address) = metrics {
            let tcp = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::Metrics { address, source })?;
            tracing::info!(%address, "serving Prometheus metrics at /metrics");
            tasks.push(tokio::spawn(status::serve_status(
                tcp,
                snapshotter.shared(),
            )));
        }
        Ok(StatusServers {
            tasks,
            _socket_file: socket_file,
        })
    }
}

impl Drop for StatusServers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn termination_signals() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "asked to stop");
    })
}

/// Binds `socket`, replacing a socket file nobody serves (left by a killed
/// process) and refusing one that answers. Only root may connect.
fn bind(socket: &Path) -> Result<UnixListener, ServeError> {
    let io = |what| {
        move |source| ServeError::Io {
            what,
            path: socket.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(ServeError::SocketInUse {
                    path: socket.to_path_buf(),
                });
            }
            tracing::info!(socket = %socket.display(), "replacing a stale socket");
            std::fs::remove_file(socket).map_err(io("remove the stale socket"))?;
        }
        Ok(_) => {
            return Err(ServeError::Io {
                what: "bind",
                path: socket.to_path_buf(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "not a socket"),
            });
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io("inspect")(err)),
    }
    let listener = UnixListener::bind(socket).map_err(io("bind"))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io("chmod"))?;
    Ok(listener)
}

/// Removes the socket file when serving ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            tracing::warn!(socket = %self.0.display(), %err, "cannot remove the socket");
        }
    }
}

/// A client of the snapshots service at `socket` (as containerd talks to
/// it): for tests and tools.
pub async fn connect(socket: &Path) -> Result<SnapshotsClient<Channel>, ServeError> {
    // The URI is required by the API and ignored by the connector.
    let channel = Endpoint::from_static("http://darter-snapshotter")
        .connect_with_connector(UnixConnector(socket.to_path_buf()))
        .await
        .map_err(|source| ServeError::Transport {
            path: socket.to_path_buf(),
            source,
        })?;
    Ok(SnapshotsClient::new(channel))
}

/// Connects every channel to one unix socket.
#[derive(Debug, Clone)]
struct UnixConnector(PathBuf);

type Connecting = Pin<Box<dyn Future<Output = io::Result<UnixStream>> + Send>>;

impl Service<Uri> for UnixConnector {
    type Response = UnixStream;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Connecting {
        let path = self.0.clone();
        Box::pin(async move { UnixStream::connect(path).await })
    }
}
