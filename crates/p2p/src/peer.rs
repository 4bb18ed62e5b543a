//! The peer daemon: wires the piece store, the control channel, the
//! registry mirror, the piece server and the metrics server together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use tracing::info;

use crate::P2pError;
use crate::http::serve;
use crate::mirror::Mirror;
use crate::piece_server::{PieceServer, SeedRation};
use crate::scheduler_client::{Identity, SchedulerLink};
use crate::store::PieceStore;
use crate::task::Peer;

/// How a peer runs.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The schedulers' `host:port`s (at least one; each task has one of
    /// them, chosen by rendezvous hashing).
    pub schedulers: Vec<String>,
    /// The upstream registry's base URL, e.g. `https://registry.example`.
    pub upstream: String,
    /// Where containerd reaches the registry mirror.
    pub mirror_listen: SocketAddr,
    /// Where other peers fetch pieces.
    pub piece_listen: SocketAddr,
    /// The piece server's address as other peers reach it (default
    /// `piece_listen`).
    pub advertise: Option<String>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The piece store's directory.
    pub store: PathBuf,
    /// The piece store's size limit in bytes.
    pub store_limit: u64,
    /// The cluster token.
    pub token: Vec<u8>,
    /// Fetch from the origin for the cluster.
    pub seed: bool,
    /// Concurrent piece uploads offered to other peers.
    pub upload_capacity: u32,
    /// Location labels (zone, rack, ...).
    pub labels: HashMap<String, String>,
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, P2pError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| P2pError::Listen { addr, source })
}

/// Runs a peer until SIGINT or SIGTERM.
pub fn run_peer(config: &PeerConfig) -> Result<(), P2pError> {
    crate::runtime()?.block_on(async {
        let store =
            PieceStore::open(&config.store, config.store_limit).map_err(|e| P2pError::Store {
                path: config.store.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let mirror = bind(config.mirror_listen).await?;
        let pieces = bind(config.piece_listen).await?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let data_addr = match &config.advertise {
            Some(addr) => addr.clone(),
            None => pieces
                .local_addr()
                .map_err(|source| P2pError::Listen {
                    addr: config.piece_listen,
                    source,
                })?
                .to_string(),
        };
        let identity = Identity {
            peer_id: data_addr.clone(),
            data_addr,
            upload_capacity: config.upload_capacity,
            labels: config.labels.clone(),
            seed: config.seed,
        };
        let link = SchedulerLink::new(&config.schedulers, &config.token, identity)?;
        let token = reqwest::header::HeaderValue::from_bytes(&config.token).map_err(|_| {
            P2pError::HttpClient("the cluster token is not a valid header value".into())
        })?;
        let peer = Arc::new(Peer::new(
            store.clone(),
            link.clone(),
            crate::http::client()?,
            token,
            config.seed,
            &config.upstream,
        ));
        let active_uploads = Arc::new(AtomicU32::new(0));
        tokio::spawn(link.clone().keep_alive(store, active_uploads.clone()));
        let piece_server = Arc::new(PieceServer {
            peer: peer.clone(),
            token: config.token.clone(),
            active_uploads,
            upload_capacity: config.upload_capacity,
            ration: SeedRation::default(),
        });
        tokio::spawn(serve(pieces, move |request| {
            piece_server.clone().handle(request)
        }));
        let mirror_service = Arc::new(Mirror::new(peer.clone()));
        tokio::spawn(serve(mirror, move |request| {
            mirror_service.clone().handle(request)
        }));
        if let Some(metrics) = metrics {
            let counters = peer.counters.clone();
            tokio::spawn(crate::http::serve_metrics(metrics, move || {
                counters.render()
            }));
        }
        info!(
            mirror = %config.mirror_listen, pieces = %config.piece_listen,
            schedulers = ?config.schedulers, upstream = %config.upstream, seed = config.seed,
            "peer running"
        );
        crate::http::stop_signal().await;
        info!("peer stopping");
        Ok(())
    })
}
