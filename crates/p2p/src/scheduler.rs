//! The scheduler: which peers hold which pieces, and where a peer should
//! fetch from. All state is in memory; after a restart it is rebuilt from
//! the peers' keepalives and reports.
//!
//! A peer reported for serving a bad piece is never offered again to the
//! reporter, and to others only when no unreported peer holds the pieces;
//! it is blocked for everyone once `block_reporters` distinct peers
//! reported it. Reports expire after `report_ttl`, so one member cannot
//! shut another out for good.

// The gRPC error, `tonic::Status`, is large; it is what the service returns.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::piece::{Bitmap, BlobDigest, PIECE_SIZE};
use crate::proto::schedule_response::Decision;
use crate::proto::scheduler_server::Scheduler;
use crate::proto::{
    BadPeerRequest, BadPeerResponse, Parent, PeerView, RegisterRequest, RegisterResponse,
    ReportRequest, ReportResponse, ScheduleRequest, ScheduleResponse, StatusRequest,
    StatusResponse, TaskView,
};

/// How the scheduler chooses.
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    /// How often peers call `Register` again; three missed calls drop a peer.
    pub keepalive: Duration,
    /// How many peers may fetch one task from the origin at once.
    pub max_origin_per_task: usize,
    /// How many parents one `Schedule` answer lists.
    pub max_parents: usize,
    /// How many distinct peers must report a peer before no one is sent
    /// to it.
    pub block_reporters: usize,
    /// How long a bad-peer report counts.
    pub report_ttl: Duration,
}

impl Default for SchedulerPolicy {
    fn default() -> Self {
        SchedulerPolicy {
            keepalive: Duration::from_secs(2),
            max_origin_per_task: 1,
            max_parents: 4,
            block_reporters: 2,
            report_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Debug)]
struct PeerInfo {
    data_addr: String,
    upload_capacity: u32,
    labels: HashMap<String, String>,
    active_uploads: u32,
    seed: bool,
    /// Times chosen as a parent since its last keepalive (its own count of
    /// uploads does not show them yet).
    chosen: u32,
    last_seen: Instant,
}

#[derive(Debug)]
struct TaskInfo {
    size: u64,
    piece_size: u64,
    /// `sha256:<hex>` per piece, "" until the peer fetching from the
    /// origin reports it.
    piece_digests: Vec<String>,
    /// The chained sha256 state after each piece, from the same source.
    chain_states: Vec<String>,
    holders: HashMap<String, Bitmap>,
    /// Holders that verified the whole blob.
    verified: HashSet<String>,
    origin_fetchers: HashSet<String>,
}

impl TaskInfo {
    fn new(size: u64, piece_size: u64) -> TaskInfo {
        let count = usize::try_from(size.div_ceil(piece_size)).unwrap_or(0);
        TaskInfo {
            size,
            piece_size,
            piece_digests: vec![String::new(); count],
            chain_states: vec![String::new(); count],
            holders: HashMap::new(),
            verified: HashSet::new(),
            origin_fetchers: HashSet::new(),
        }
    }

    /// Takes the digests and chain states of pieces still unknown.
    fn learn(&mut self, digests: &[String], chain_states: &[String], from: &str) {
        learn_unknown(&mut self.piece_digests, digests, from);
        learn_unknown(&mut self.chain_states, chain_states, from);
    }
}

/// Fills the entries of `known` still empty from `reported`; an entry that
/// contradicts a known one is ignored (the first report from the origin
/// wins).
fn learn_unknown(known: &mut [String], reported: &[String], from: &str) {
    for (mine, theirs) in known.iter_mut().zip(reported) {
        if theirs.is_empty() {
            continue;
        }
        if mine.is_empty() {
            theirs.clone_into(mine);
        } else if mine != theirs {
            warn!(
                peer = from,
                "ignoring a piece digest or chain state that contradicts the known one"
            );
        }
    }
}

/// Schedule answers given, by decision.
#[derive(Debug, Default, Clone, Copy)]
struct Decisions {
    parents: u64,
    origin: u64,
    wait: u64,
    seed: u64,
}

impl Decisions {
    fn count(&mut self, decision: Decision) {
        let counter = match decision {
            Decision::Parents => &mut self.parents,
            Decision::Origin => &mut self.origin,
            Decision::Wait => &mut self.wait,
            Decision::Seed => &mut self.seed,
        };
        *counter += 1;
    }
}

/// The scheduler's whole state.
#[derive(Debug)]
pub struct SchedulerState {
    policy: SchedulerPolicy,
    peers: HashMap<String, PeerInfo>,
    tasks: HashMap<BlobDigest, TaskInfo>,
    /// Reported peer → reporter → when (bad-peer reports still counting).
    reports: HashMap<String, HashMap<String, Instant>>,
    decisions: Decisions,
    bad_peer_reports: u64,
}

fn bad_task(task: &str) -> Status {
    Status::invalid_argument(format!("task {task:?} is not a sha256 digest"))
}

fn unknown_peer(peer: &str) -> Status {
    Status::failed_precondition(format!("peer {peer:?} is not registered"))
}

impl SchedulerState {
    pub fn new(policy: SchedulerPolicy) -> SchedulerState {
        SchedulerState {
            policy,
            peers: HashMap::new(),
            tasks: HashMap::new(),
            reports: HashMap::new(),
            decisions: Decisions::default(),
            bad_peer_reports: 0,
        }
    }

    /// How many distinct peers reported `peer` (reports still counting).
    fn reporters(&self, peer: &str) -> usize {
        self.reports.get(peer).map_or(0, HashMap::len)
    }

    fn is_blocked(&self, peer: &str) -> bool {
        self.reporters(peer) >= self.policy.block_reporters.max(1)
    }

    /// Whether `parent` may be offered to `requester`: not blocked, and
    /// not reported by the requester.
    fn may_serve(&self, parent: &str, requester: &str) -> bool {
        !self.is_blocked(parent)
            && self
                .reports
                .get(parent)
                .is_none_or(|by| !by.contains_key(requester))
    }

    /// A peer arrives or keeps alive.
    pub fn register(&mut self, request: RegisterRequest, now: Instant) -> RegisterResponse {
        let first_contact = !self.peers.contains_key(&request.peer_id);
        if first_contact {
            info!(peer = %request.peer_id, addr = %request.data_addr, seed = request.seed, "peer registered");
        }
        self.peers.insert(
            request.peer_id,
            PeerInfo {
                data_addr: request.data_addr,
                upload_capacity: request.upload_capacity,
                labels: request.labels,
                active_uploads: request.active_uploads,
                seed: request.seed,
                chosen: 0,
                last_seen: now,
            },
        );
        RegisterResponse {
            keepalive_interval_ms: u64::try_from(self.policy.keepalive.as_millis())
                .unwrap_or(u64::MAX),
            first_contact,
        }
    }

    /// A peer says what it holds of a task.
    pub fn report(&mut self, request: ReportRequest, now: Instant) -> Result<(), Status> {
        let task: BlobDigest = request.task.parse().map_err(|_| bad_task(&request.task))?;
        self.touch(&request.peer_id, now)?;
        if request.piece_size == 0 {
            return Err(Status::invalid_argument("piece size 0"));
        }
        let info = self
            .tasks
            .entry(task)
            .or_insert_with(|| TaskInfo::new(request.size, request.piece_size));
        if info.size != request.size || info.piece_size != request.piece_size {
            return Err(Status::invalid_argument(format!(
                "task {task} is {} bytes in pieces of {}, not {} in pieces of {}",
                info.size, info.piece_size, request.size, request.piece_size
            )));
        }
        let count = info.piece_digests.len();
        let have = if request.complete {
            Bitmap::full(count)
        } else {
            Bitmap::from_wire(&request.have, count)
        };
        // Piece digests come from the peer fetching from the origin, or
        // (after a scheduler restart) from a peer that verified the whole blob.
        let trusted = info.origin_fetchers.contains(&request.peer_id)
            || (request.complete && info.piece_digests.iter().any(String::is_empty));
        if trusted {
            info.learn(
                &request.piece_digests,
                &request.chain_states,
                &request.peer_id,
            );
        }
        if request.complete {
            info.origin_fetchers.remove(&request.peer_id);
            if info.verified.insert(request.peer_id.clone()) {
                info!(peer = %request.peer_id, %task, "peer holds the whole task");
            }
        }
        info.holders.insert(request.peer_id, have);
        Ok(())
    }

    /// Where `request.peer_id` should fetch `request.task` from.
    pub fn schedule(
        &mut self,
        request: &ScheduleRequest,
        now: Instant,
    ) -> Result<ScheduleResponse, Status> {
        let task: BlobDigest = request.task.parse().map_err(|_| bad_task(&request.task))?;
        self.touch(&request.peer_id, now)?;
        self.expire(now);
        self.tasks
            .entry(task)
            .or_insert_with(|| TaskInfo::new(request.size, PIECE_SIZE));
        let parents = self.parents_for(&task, &request.peer_id);
        let info = &self.tasks[&task];
        let (decision, parents) = if !parents.is_empty() {
            (Decision::Parents, parents)
        } else if info.origin_fetchers.contains(&request.peer_id)
            || info.origin_fetchers.len() < self.policy.max_origin_per_task
        {
            // A seed goes to the origin for ordinary peers.
            match self.seed_for(&task, &request.peer_id) {
                Some(seed) => (Decision::Seed, vec![seed]),
                None => (Decision::Origin, Vec::new()),
            }
        } else {
            (Decision::Wait, Vec::new())
        };
        let fetcher = match decision {
            Decision::Seed => parents.first().map(|p| p.peer_id.clone()),
            Decision::Origin => Some(request.peer_id.clone()),
            Decision::Parents | Decision::Wait => None,
        };
        let Some(info) = self.tasks.get_mut(&task) else {
            return Err(bad_task(&request.task));
        };
        if let Some(fetcher) = fetcher {
            info.origin_fetchers.insert(fetcher);
        }
        let answer = ScheduleResponse {
            decision: decision.into(),
            parents,
            piece_size: info.piece_size,
            piece_digests: info.piece_digests.clone(),
            chain_states: info.chain_states.clone(),
        };
        for parent in &answer.parents {
            if let Some(peer) = self.peers.get_mut(&parent.peer_id) {
                peer.chosen = peer.chosen.saturating_add(1);
            }
        }
        self.decisions.count(decision);
        Ok(answer)
    }

    /// The best holders of pieces of `task` with known digests that may
    /// serve `requester`; peers someone reported only if no one else can.
    fn parents_for(&self, task: &BlobDigest, requester_id: &str) -> Vec<Parent> {
        let (Some(info), Some(requester)) = (self.tasks.get(task), self.peers.get(requester_id))
        else {
            return Vec::new();
        };
        let mut candidates: Vec<(&String, &PeerInfo, &Bitmap)> = info
            .holders
            .iter()
            .filter(|(id, _)| id.as_str() != requester_id && self.may_serve(id, requester_id))
            .filter_map(|(id, have)| {
                let peer = self.peers.get(id)?;
                let useful =
                    (0..have.len()).any(|i| have.get(i) && !info.piece_digests[i].is_empty());
                useful.then_some((id, peer, have))
            })
            .collect();
        if candidates.iter().any(|(id, _, _)| self.reporters(id) == 0) {
            candidates.retain(|(id, _, _)| self.reporters(id) == 0);
        }
        candidates
            .sort_by_key(|(_, peer, have)| std::cmp::Reverse(parent_score(requester, peer, have)));
        candidates.truncate(self.policy.max_parents);
        candidates
            .iter()
            .map(|(id, peer, have)| Parent {
                peer_id: (*id).clone(),
                data_addr: peer.data_addr.clone(),
                have: have.wire().to_vec(),
                complete: have.is_full(),
                seed: peer.seed,
            })
            .collect()
    }

    /// The seed to send to the origin for an ordinary `requester` that is
    /// not fetching `task` from the origin itself.
    fn seed_for(&self, task: &BlobDigest, requester_id: &str) -> Option<Parent> {
        let requester = self.peers.get(requester_id)?;
        let fetching = self
            .tasks
            .get(task)
            .is_some_and(|t| t.origin_fetchers.contains(requester_id));
        if requester.seed || fetching {
            return None;
        }
        let (id, peer) = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.seed && id.as_str() != requester_id && self.may_serve(id, requester_id)
            })
            .max_by_key(|(_, p)| parent_score(requester, p, &Bitmap::new(0)))?;
        Some(Parent {
            peer_id: id.clone(),
            data_addr: peer.data_addr.clone(),
            have: Vec::new(),
            complete: false,
            seed: true,
        })
    }

    /// `request.reporter_id` got a bad piece from `request.peer_id`: the
    /// reporter is not sent to it again, others only when no one else can
    /// serve, no one once enough distinct peers reported it.
    pub fn report_bad_peer(
        &mut self,
        request: &BadPeerRequest,
        now: Instant,
    ) -> Result<(), Status> {
        self.touch(&request.reporter_id, now)?;
        if request.reporter_id == request.peer_id || !self.peers.contains_key(&request.peer_id) {
            return Ok(());
        }
        self.bad_peer_reports += 1;
        self.reports
            .entry(request.peer_id.clone())
            .or_default()
            .insert(request.reporter_id.clone(), now);
        let blocked = self.is_blocked(&request.peer_id);
        warn!(
            peer = %request.peer_id, reporter = %request.reporter_id, task = %request.task,
            piece = request.piece, reporters = self.reporters(&request.peer_id), blocked,
            "peer reported for a bad piece"
        );
        if blocked {
            for info in self.tasks.values_mut() {
                info.origin_fetchers.remove(&request.peer_id);
            }
        }
        Ok(())
    }

    /// What the scheduler knows, for `darter scheduler status`.
    pub fn status(&mut self, now: Instant) -> StatusResponse {
        self.expire(now);
        let mut peers: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(id, p)| PeerView {
                peer_id: id.clone(),
                data_addr: p.data_addr.clone(),
                seed: p.seed,
                upload_capacity: p.upload_capacity,
                active_uploads: p.active_uploads,
                reporters: u32::try_from(self.reporters(id)).unwrap_or(u32::MAX),
                blocked: self.is_blocked(id),
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        let mut tasks: Vec<TaskView> = self
            .tasks
            .iter()
            .map(|(digest, t)| TaskView {
                task: digest.to_string(),
                size: t.size,
                holders: count_u32(t.holders.len()),
                verified: count_u32(t.verified.len()),
                origin_fetchers: count_u32(t.origin_fetchers.len()),
            })
            .collect();
        tasks.sort_by(|a, b| a.task.cmp(&b.task));
        StatusResponse {
            peers,
            tasks,
            decisions_parents: self.decisions.parents,
            decisions_origin: self.decisions.origin,
            decisions_wait: self.decisions.wait,
            decisions_seed: self.decisions.seed,
            bad_peer_reports: self.bad_peer_reports,
        }
    }

    fn touch(&mut self, peer: &str, now: Instant) -> Result<(), Status> {
        let info = self.peers.get_mut(peer).ok_or_else(|| unknown_peer(peer))?;
        info.last_seen = now;
        Ok(())
    }

    /// Forgets peers not heard from for three keepalive intervals.
    fn expire(&mut self, now: Instant) {
        let limit = self.policy.keepalive * 3;
        let gone: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_seen) > limit)
            .map(|(id, _)| id.clone())
            .collect();
        let ttl = self.policy.report_ttl;
        for by in self.reports.values_mut() {
            by.retain(|_, at| now.duration_since(*at) <= ttl);
        }
        self.reports.retain(|_, by| !by.is_empty());
        for id in gone {
            info!(peer = %id, "peer expired");
            self.peers.remove(&id);
            for info in self.tasks.values_mut() {
                info.holders.remove(&id);
                info.verified.remove(&id);
                info.origin_fetchers.remove(&id);
            }
        }
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Higher is better: a free upload slot first, then shared location
/// labels, then more free slots, then more pieces.
fn parent_score(
    requester: &PeerInfo,
    parent: &PeerInfo,
    have: &Bitmap,
) -> (bool, usize, u32, usize) {
    let busy = parent.active_uploads.saturating_add(parent.chosen);
    let free = parent.upload_capacity.saturating_sub(busy);
    let shared_labels = requester
        .labels
        .iter()
        .filter(|(k, v)| parent.labels.get(*k) == Some(*v))
        .count();
    (free > 0, shared_labels, free, have.count())
}

/// The gRPC service over a [`SchedulerState`].
#[derive(Debug, Clone)]
pub struct SchedulerService {
    state: Arc<Mutex<SchedulerState>>,
}

impl SchedulerService {
    pub fn new(policy: SchedulerPolicy) -> SchedulerService {
        SchedulerService {
            state: Arc::new(Mutex::new(SchedulerState::new(policy))),
        }
    }

    /// The Prometheus text exposition of the scheduler's state.
    pub fn metrics(&self) -> String {
        let status = self.state().status(Instant::now());
        crate::metrics::render_scheduler(&status)
    }

    fn state(&self) -> MutexGuard<'_, SchedulerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let answer = self.state().register(request.into_inner(), Instant::now());
        Ok(Response::new(answer))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.state().report(request.into_inner(), Instant::now())?;
        Ok(Response::new(ReportResponse {}))
    }

    async fn schedule(
        &self,
        request: Request<ScheduleRequest>,
    ) -> Result<Response<ScheduleResponse>, Status> {
        let answer = self.state().schedule(request.get_ref(), Instant::now())?;
        Ok(Response::new(answer))
    }

    async fn report_bad_peer(
        &self,
        request: Request<BadPeerRequest>,
    ) -> Result<Response<BadPeerResponse>, Status> {
        self.state()
            .report_bad_peer(request.get_ref(), Instant::now())?;
        Ok(Response::new(BadPeerResponse {}))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.state().status(Instant::now())))
    }
}

#[cfg(test)]
mod tests;
