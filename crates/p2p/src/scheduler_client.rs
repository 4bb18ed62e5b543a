//! A peer's side of the control channel: keepalives (re-reporting every
//! complete task when the scheduler did not know the peer, e.g. after the
//! scheduler restarted), reports, schedule requests and bad-peer reports,
//! each with a short deadline so a dead scheduler only costs a timeout.
//! With several schedulers, each task has one, chosen by rendezvous
//! hashing of the task and the schedulers' addresses
//! ([`scheduler_for`]): every peer given the same addresses, in any order,
//! picks the same one, and a scheduler that leaves the list moves only its
//! own tasks. A peer registers with all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::P2pError;
use crate::piece::{Bitmap, BlobDigest, PieceLayout};
use crate::proto::scheduler_client::SchedulerClient;
use crate::proto::{
    BadPeerRequest, RegisterRequest, ReportRequest, ScheduleRequest, ScheduleResponse,
    StatusRequest, StatusResponse,
};
use crate::store::{PieceStore, TaskMeta};

/// What a peer knows to check pieces of a task with, in wire form: each
/// piece's sha256 and the chained sha256 states (see
/// [`crate::piece::ChainState`]), "" where unknown.
#[derive(Debug, Clone, Default)]
pub struct PieceProofs {
    pub digests: Vec<String>,
    pub chain_states: Vec<String>,
}

/// How long one call to the scheduler may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait before trying an unreachable scheduler again.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Adds the cluster token to every call.
#[derive(Clone)]
pub struct TokenInterceptor(AsciiMetadataValue);

impl std::fmt::Debug for TokenInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenInterceptor(<redacted>)")
    }
}

impl Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(crate::TOKEN_HEADER, self.0.clone());
        Ok(request)
    }
}

type Client = SchedulerClient<InterceptedService<Channel, TokenInterceptor>>;

/// A client of the scheduler at `addr` (`host:port`) presenting `token`;
/// connects lazily and reconnects.
fn client(addr: &str, token: &[u8]) -> Result<Client, P2pError> {
    let url = format!("http://{addr}");
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| P2pError::Url {
            url,
            reason: e.to_string(),
        })?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_lazy();
    let token = AsciiMetadataValue::try_from(token)
        .map_err(|_| P2pError::HttpClient("the cluster token is not printable ASCII".into()))?;
    Ok(SchedulerClient::with_interceptor(
        channel,
        TokenInterceptor(token),
    ))
}

/// What the scheduler at `addr` knows (`darter scheduler status`).
pub fn scheduler_status(addr: &str, token: &[u8]) -> Result<StatusResponse, P2pError> {
    crate::runtime()?.block_on(async {
        let answer = client(addr, token)?
            .status(StatusRequest {})
            .await
            .map_err(|status| P2pError::Status {
                url: format!("http://{addr}"),
                reason: status.message().to_owned(),
            })?;
        Ok(answer.into_inner())
    })
}

/// Who this peer is, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub peer_id: String,
    pub data_addr: String,
    pub upload_capacity: u32,
    pub labels: std::collections::HashMap<String, String>,
    pub seed: bool,
}

/// Which of the schedulers at `addrs` is `task`'s: the one whose address
/// hashed with the task's digest gives the highest value (rendezvous
/// hashing). `None` if there are none.
pub fn scheduler_for(task: &BlobDigest, addrs: &[String]) -> Option<usize> {
    let weight = |addr: &String| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(task.to_string().as_bytes());
        hasher.update(b"\n");
        hasher.update(addr.as_bytes());
        *hasher.finalize().as_bytes()
    };
    (0..addrs.len()).max_by_key(|&i| weight(&addrs[i]))
}

/// The control channel to the schedulers.
#[derive(Debug, Clone)]
pub struct SchedulerLink {
    /// A client per scheduler, in the order of `addrs`.
    clients: Arc<[Client]>,
    addrs: Arc<[String]>,
    identity: Arc<Identity>,
}

impl SchedulerLink {
    /// A link to the schedulers at `addrs` (`host:port` each, at least
    /// one); connects lazily and reconnects.
    pub fn new(
        addrs: &[String],
        token: &[u8],
        identity: Identity,
    ) -> Result<SchedulerLink, P2pError> {
        if addrs.is_empty() {
            return Err(P2pError::NoScheduler);
        }
        let clients = addrs
            .iter()
            .map(|addr| client(addr, token))
            .collect::<Result<Vec<_>, P2pError>>()?;
        Ok(SchedulerLink {
            clients: clients.into(),
            addrs: addrs.into(),
            identity: Arc::new(identity),
        })
    }

    /// The client of `task`'s scheduler.
    fn client_for(&self, task: &BlobDigest) -> Client {
        let index = scheduler_for(task, &self.addrs).unwrap_or(0);
        self.clients[index].clone()
    }

    /// Keeps the peer registered with every scheduler, forever.
    pub async fn keep_alive(self, store: Arc<PieceStore>, active_uploads: Arc<AtomicU32>) {
        let loops = (0..self.clients.len())
            .map(|index| self.keep_alive_with(index, &store, &active_uploads));
        futures_util::future::join_all(loops).await;
    }

    /// Keeps the peer registered with scheduler `index`, forever.
    async fn keep_alive_with(&self, index: usize, store: &PieceStore, active_uploads: &AtomicU32) {
        let (client, addr) = (&self.clients[index], &self.addrs[index]);
        loop {
            let request = RegisterRequest {
                peer_id: self.identity.peer_id.clone(),
                data_addr: self.identity.data_addr.clone(),
                upload_capacity: self.identity.upload_capacity,
                labels: self.identity.labels.clone(),
                seed: self.identity.seed,
                active_uploads: active_uploads.load(Ordering::Relaxed),
            };
            let interval = match client.clone().register(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if answer.first_contact {
                        info!(scheduler = %addr, "registered with the scheduler");
                        self.report_all(index, store).await;
                    }
                    Duration::from_millis(answer.keepalive_interval_ms.clamp(100, 60_000))
                }
                Err(status) => {
                    debug!(scheduler = %addr, %status, "scheduler unreachable");
                    RETRY_INTERVAL
                }
            };
            tokio::time::sleep(interval).await;
        }
    }

    /// Reports every complete task whose scheduler is `index`.
    async fn report_all(&self, index: usize, store: &PieceStore) {
        for (task, meta) in store.complete_tasks() {
            if scheduler_for(&task, &self.addrs) == Some(index) {
                self.report_complete(&task, &meta).await;
            }
        }
    }

    /// Reports a verified, complete task with its piece digests.
    pub async fn report_complete(&self, task: &BlobDigest, meta: &TaskMeta) {
        let layout = PieceLayout {
            size: meta.size,
            piece_size: meta.piece_size,
        };
        let have = Bitmap::full(layout.count());
        let proofs = PieceProofs {
            digests: meta.piece_digests.clone(),
            chain_states: meta.piece_chain.clone(),
        };
        self.report(task, layout, &have, true, proofs).await;
    }

    /// Reports the pieces held of a task (and what is known to check
    /// pieces with).
    pub async fn report(
        &self,
        task: &BlobDigest,
        layout: PieceLayout,
        have: &Bitmap,
        complete: bool,
        proofs: PieceProofs,
    ) {
        let request = ReportRequest {
            peer_id: self.identity.peer_id.clone(),
            task: task.to_string(),
            size: layout.size,
            piece_size: layout.piece_size,
            have: have.wire().to_vec(),
            complete,
            piece_digests: proofs.digests,
            chain_states: proofs.chain_states,
        };
        if let Err(status) = self.client_for(task).report(request).await {
            debug!(%task, %status, "report not delivered");
        }
    }

    /// Asks where to fetch `task` from.
    pub async fn schedule(
        &self,
        task: &BlobDigest,
        size: u64,
    ) -> Result<ScheduleResponse, tonic::Status> {
        let request = ScheduleRequest {
            peer_id: self.identity.peer_id.clone(),
            task: task.to_string(),
            size,
        };
        Ok(self.client_for(task).schedule(request).await?.into_inner())
    }

    /// Tells the scheduler `peer` served a bad piece.
    pub async fn report_bad_peer(&self, peer: &str, task: &BlobDigest, piece: usize) {
        let request = BadPeerRequest {
            reporter_id: self.identity.peer_id.clone(),
            peer_id: peer.to_owned(),
            task: task.to_string(),
            piece: piece as u64,
        };
        if let Err(status) = self.client_for(task).report_bad_peer(request).await {
            warn!(%peer, %task, piece, %status, "could not report a bad peer");
        }
    }
}
