//! Darter's peer-to-peer blob distribution: when many nodes pull the same
//! image at once, they fetch each blob's pieces from each other and the
//! registry sends it about once.
//!
//! It owns the scheduler ([`run_scheduler`]: the gRPC control plane that
//! knows which peer holds which pieces and picks parents; its state read
//! back by [`scheduler_status`]) and the peer
//! daemon ([`run_peer`]: a registry mirror for containerd, a piece server
//! for other peers on a separate port, and a size-limited piece store on
//! disk), plus the peers' Prometheus counters ([`PeerStatus`]).
//!
//! It must not: let an unverified byte reach a client (every piece is
//! checked against the digest recorded from the origin, and the whole blob
//! against its digest before a whole-blob response completes; a `Range`
//! response cannot be checked against the blob's digest, its client checks
//! what it reads, as it would reading from the origin), serve pieces to
//! anyone without the cluster token or by anything but digest, log or
//! echo a client's credentials or the cluster token, or depend on the
//! scheduler being up (without it peers fetch from the origin).

#![forbid(unsafe_code)]

mod admission;
mod buffer;
mod http;
mod metrics;
mod mirror;
mod peer;
mod piece;
mod piece_server;
mod scheduler;
mod scheduler_client;
mod store;
mod task;

/// The generated gRPC code of `proto/scheduler.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::unwrap_used
)]
pub mod proto {
    tonic::include_proto!("darter.p2p.v1");
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use metrics::PeerStatus;
pub use peer::{PeerConfig, run_peer};
pub use piece::{BadDigest, BlobDigest, PIECE_SIZE};
pub use scheduler::{SchedulerPolicy, SchedulerService, SchedulerState};
pub use scheduler_client::{scheduler_for, scheduler_status};

/// The header that carries the cluster token, on gRPC and piece requests.
pub const TOKEN_HEADER: &str = "x-darter-cluster-token";

/// Why a scheduler or peer could not run.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading the cluster token from {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("the gRPC server stopped: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("piece store {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(String),
    #[error("peer status from {url}: {reason}")]
    Status { url: String, reason: String },
    #[error("a peer needs at least one scheduler")]
    NoScheduler,
}

/// The cluster token in `path` (surrounding whitespace trimmed).
pub fn read_token(path: &Path) -> Result<Vec<u8>, P2pError> {
    let raw = std::fs::read(path).map_err(|source| P2pError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = raw.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(P2pError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// Runs the scheduler on `listen` (and its Prometheus metrics at
/// `http://METRICS/metrics`) until SIGINT or SIGTERM.
pub fn run_scheduler(
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    token: Vec<u8>,
    policy: SchedulerPolicy,
) -> Result<(), P2pError> {
    runtime()?.block_on(async {
        let listener = peer::bind(listen).await?;
        let metrics = match metrics {
            Some(addr) => Some(peer::bind(addr).await?),
            None => None,
        };
        let service = SchedulerService::new(policy);
        if let Some(metrics) = metrics {
            tokio::spawn(http::serve_metrics(metrics, {
                let service = service.clone();
                move || service.metrics()
            }));
        }
        tracing::info!(%listen, "scheduler listening");
        serve_scheduler(listener, token, service, http::stop_signal()).await
    })
}

/// Serves the scheduler on `listener` until `shutdown` completes.
// tonic's `Status` is large, and what its interceptors must return.
#[allow(clippy::result_large_err)]
pub async fn serve_scheduler(
    listener: tokio::net::TcpListener,
    token: Vec<u8>,
    service: SchedulerService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), P2pError> {
    let service = proto::scheduler_server::SchedulerServer::with_interceptor(
        service,
        move |request: tonic::Request<()>| {
            let presented = request
                .metadata()
                .get(TOKEN_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if piece::secrets_equal(presented, &token) {
                Ok(request)
            } else {
                Err(tonic::Status::unauthenticated(
                    "missing or wrong cluster token",
                ))
            }
        },
    );
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, P2pError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(P2pError::Runtime)
}
