//! Fetching one task (blob) into the piece store: from parents the
//! scheduler names, several at once, each piece verified against the digest
//! recorded from the origin; or from the origin itself when the scheduler
//! says so, when it is unreachable, or when no parent serves in time. A
//! task ends verified (the whole blob matches its digest) or failed, and
//! readers follow its progress piece by piece.
//!
//! Where bytes are checked: each piece once on receipt, in memory, before
//! it is written. Where the seed recorded the chained sha256 states around
//! it ([`ChainState`]), the piece is hashed on from the state before it and
//! must reach the state after it (the last piece: the blob's digest); that
//! one pass also checks it as part of the whole blob. Otherwise the piece's
//! own sha256 must match the digest recorded from the origin, and the
//! whole-blob hash, which follows the pieces in order, reads it back once
//! more. A piece from the origin records its digest and, when the pieces
//! before it are in, its chain state. A piece read back from the store for
//! a client is checked against the BLAKE3 sum taken of its verified bytes
//! on receipt (a few times cheaper than sha256 again), so a store file that
//! changed on disk is caught before a byte of it is sent.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::buffer::PieceBuf;
use crate::metrics::Counters;
use crate::piece::{Bitmap, BlobDigest, ChainState, PieceLayout};
use crate::proto::schedule_response::Decision;
use crate::scheduler_client::{PieceProofs, SchedulerLink};
use crate::store::{PieceStore, Pinned, StoreError, TaskMeta};

/// Pieces fetched from parents at once, per task.
const PARALLEL_PIECES: usize = 4;
/// How long one piece request to a parent may take.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// A parent that sends nothing for this long in the middle of a piece (it
/// died, or its link did) is given up for that piece.
const PIECE_STALL: Duration = Duration::from_secs(3);
/// Without progress from peers for this long, a peer goes to the origin.
const PEER_PATIENCE: Duration = Duration::from_secs(10);
/// How long to wait before asking the scheduler again after `WAIT`.
const WAIT_INTERVAL: Duration = Duration::from_millis(100);
/// Attempts at the origin before a task fails.
const ORIGIN_ATTEMPTS: usize = 3;
/// Most pieces one origin request asks for: between requests, pieces a
/// client waits for (a `Range` GET) go first.
const ORIGIN_BATCH: usize = 4;

/// Where the blob is in the origin registry, and the credentials of the
/// client that asked for it.
#[derive(Clone)]
pub struct Origin {
    /// The repository the client asked in.
    pub repository: String,
    /// The blob's URL in the upstream registry.
    pub url: String,
    pub authorization: Option<reqwest::header::HeaderValue>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("repository", &self.repository)
            .field("url", &self.url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a task or a read of it failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    #[error("origin {url}: {reason}")]
    Origin { url: String, reason: String },
    #[error("blob {task} fetched has digest {actual}")]
    BlobMismatch {
        task: BlobDigest,
        actual: BlobDigest,
    },
    #[error(
        "blob {task}: the sha256 state after piece {piece} differs from the one recorded \
         from the origin"
    )]
    ChainMismatch { task: BlobDigest, piece: usize },
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("piece {piece} of {task} in the local store does not match its digest")]
    CorruptLocalPiece { task: BlobDigest, piece: usize },
    #[error("piece {piece} of {task} is not verified yet")]
    UnverifiedPiece { task: BlobDigest, piece: usize },
    #[error("task {task} ended before its blob was hashed: {reason}")]
    Ended { task: BlobDigest, reason: String },
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> TaskError {
        TaskError::Store(Arc::new(e))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Verified,
    Failed(String),
}

/// What readers see of a task.
#[derive(Debug, Clone)]
pub struct TaskState {
    pub have: Bitmap,
    /// sha256 of each piece, when known.
    pub digests: Vec<Option<BlobDigest>>,
    /// The chained sha256 state after each piece but the last, when known.
    pub chain: Vec<Option<ChainState>>,
    /// Pieces checked on receipt by hashing on from the chain state before
    /// them: the whole-blob hash need not read them again.
    pub chained: Bitmap,
    /// BLAKE3 of each piece as written to the store, once verified.
    pub stored_sums: Vec<Option<blake3::Hash>>,
    pub outcome: Outcome,
}

impl TaskState {
    fn empty(count: usize) -> TaskState {
        TaskState {
            have: Bitmap::new(count),
            digests: vec![None; count],
            chain: vec![None; count],
            chained: Bitmap::new(count),
            stored_sums: vec![None; count],
            outcome: Outcome::Running,
        }
    }

    fn wire_digests(&self) -> Vec<String> {
        self.digests
            .iter()
            .map(|d| d.map(|d| d.to_string()).unwrap_or_default())
            .collect()
    }

    fn wire_chain(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|c| c.map(ChainState::to_hex).unwrap_or_default())
            .collect()
    }

    fn proofs(&self) -> PieceProofs {
        PieceProofs {
            digests: self.wire_digests(),
            chain_states: self.wire_chain(),
        }
    }

    /// The chain state before piece `index`, if known.
    fn chain_before(&self, index: usize) -> Option<ChainState> {
        match index.checked_sub(1) {
            None => Some(ChainState::INITIAL),
            Some(previous) => self.chain.get(previous).copied().flatten(),
        }
    }

    /// How piece `index` of `task` can be checked on receipt: along the
    /// chain if its states are known, else by its digest.
    fn check_for(&self, task: &BlobDigest, layout: PieceLayout, index: usize) -> Option<Check> {
        let digest = self.digests.get(index).copied().flatten()?;
        let last = index + 1 == layout.count();
        let end = if last {
            Some(ChainEnd::Blob(*task, layout.size))
        } else {
            self.chain
                .get(index)
                .copied()
                .flatten()
                .map(ChainEnd::State)
        };
        Some(match (self.chain_before(index), end) {
            (Some(before), Some(end)) => Check::Chain {
                digest,
                before,
                end,
            },
            _ => Check::Digest(digest),
        })
    }
}

/// Where hashing a piece on from the state before it must arrive.
#[derive(Debug, Clone, Copy)]
enum ChainEnd {
    /// The state after the piece.
    State(ChainState),
    /// The last piece: the digest of the blob of this size.
    Blob(BlobDigest, u64),
}

/// How a piece from a parent is checked on receipt.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// Hashed on along the chain (one pass that also counts for the whole
    /// blob); `digest` is the piece's own, recorded for the store.
    Chain {
        digest: BlobDigest,
        before: ChainState,
        end: ChainEnd,
    },
    /// By its own sha256 only.
    Digest(BlobDigest),
}

impl Check {
    /// What is recorded of `piece` if it passes; `None` if it does not.
    fn verify(self, piece: &[u8]) -> Option<Receipt> {
        match self {
            Check::Chain {
                digest,
                before,
                end: ChainEnd::State(after),
            } => (before.advance(piece) == Some(after)).then_some(Receipt {
                digest,
                chain: Some(after),
                chained: true,
            }),
            Check::Chain {
                digest,
                before,
                end: ChainEnd::Blob(blob, size),
            } => (before.finish(piece, size) == blob).then_some(Receipt {
                digest,
                chain: None,
                chained: true,
            }),
            Check::Digest(digest) => (BlobDigest::of(piece) == digest).then_some(Receipt {
                digest,
                chain: None,
                chained: false,
            }),
        }
    }
}

/// What is recorded of a piece accepted into the store.
#[derive(Debug, Clone, Copy)]
struct Receipt {
    digest: BlobDigest,
    /// The chain state after it, if known.
    chain: Option<ChainState>,
    /// Whether it was hashed along the chain (see [`TaskState::chained`]).
    chained: bool,
}

impl Receipt {
    /// A piece fetched from the origin: its digest, and if the state
    /// before it is known, the state after it (for the last piece: whether
    /// the blob's digest is reached).
    fn of_origin_piece(
        piece: &[u8],
        before: Option<ChainState>,
        blob: BlobDigest,
        layout: PieceLayout,
        index: usize,
    ) -> Receipt {
        let digest = BlobDigest::of(piece);
        let last = index + 1 == layout.count();
        let (chain, chained) = match before {
            None => (None, false),
            Some(before) if last => (None, before.finish(piece, layout.size) == blob),
            Some(before) => {
                let after = before.advance(piece);
                (after, after.is_some())
            }
        };
        Receipt {
            digest,
            chain,
            chained,
        }
    }
}

/// One blob, being fetched or complete.
#[derive(Debug)]
pub struct Task {
    pub digest: BlobDigest,
    pub layout: PieceLayout,
    pub state: watch::Sender<TaskState>,
    /// Pieces clients wait for: fetched before the others.
    wanted: Mutex<Bitmap>,
    _pinned: Pinned,
}

impl Task {
    fn new(digest: BlobDigest, layout: PieceLayout, state: TaskState, pinned: Pinned) -> Task {
        let (state, _) = watch::channel(state);
        Task {
            digest,
            layout,
            state,
            wanted: Mutex::new(Bitmap::new(layout.count())),
            _pinned: pinned,
        }
    }

    /// Asks for `pieces` to be fetched before the others.
    pub fn want(&self, pieces: Range<usize>) {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        pieces.for_each(|i| wanted.set(i));
    }

    /// Whether a client waits for piece `index`.
    fn is_wanted(&self, index: usize) -> bool {
        self.wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index)
    }

    fn update(&self, f: impl FnOnce(&mut TaskState)) {
        self.state.send_modify(f);
    }

    /// Waits until `ready` holds of the state; `Err` with the reason if the
    /// task fails first.
    pub async fn wait_for(&self, ready: impl Fn(&TaskState) -> bool) -> Result<TaskState, String> {
        let mut receiver = self.state.subscribe();
        loop {
            {
                let state = receiver.borrow_and_update();
                if let Outcome::Failed(reason) = &state.outcome {
                    return Err(reason.clone());
                }
                if ready(&state) {
                    return Ok(state.clone());
                }
            }
            if receiver.changed().await.is_err() {
                return Err("task abandoned".into());
            }
        }
    }
}

/// Everything a peer's tasks share.
#[derive(Debug)]
pub struct Peer {
    pub store: Arc<PieceStore>,
    pub link: SchedulerLink,
    pub http: reqwest::Client,
    pub token: reqwest::header::HeaderValue,
    pub counters: Arc<Counters>,
    pub seed: bool,
    /// The upstream registry's base URL, without a trailing `/`.
    pub upstream: String,
    running: Mutex<HashMap<BlobDigest, Arc<Task>>>,
}

impl Peer {
    pub fn new(
        store: Arc<PieceStore>,
        link: SchedulerLink,
        http: reqwest::Client,
        token: reqwest::header::HeaderValue,
        seed: bool,
        upstream: &str,
    ) -> Peer {
        Peer {
            upstream: upstream.trim_end_matches('/').to_owned(),
            store,
            link,
            http,
            token,
            counters: Arc::default(),
            seed,
            running: Mutex::default(),
        }
    }

    /// Where `digest` is in `repository` of the upstream registry.
    pub fn origin(
        &self,
        repository: &str,
        digest: &BlobDigest,
        authorization: Option<reqwest::header::HeaderValue>,
    ) -> Origin {
        Origin {
            repository: repository.to_owned(),
            url: format!("{}/v2/{repository}/blobs/{digest}", self.upstream),
            authorization,
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<BlobDigest, Arc<Task>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A task being fetched, or a complete one from the store.
    pub fn existing_task(&self, digest: &BlobDigest) -> Option<Arc<Task>> {
        self.existing_task_locked(&self.running(), digest)
    }

    /// As [`Self::existing_task`], under the lock of the running tasks: a
    /// task leaves them only after the store has it complete, so one of
    /// the two always has it.
    fn existing_task_locked(
        &self,
        running: &HashMap<BlobDigest, Arc<Task>>,
        digest: &BlobDigest,
    ) -> Option<Arc<Task>> {
        if let Some(task) = running.get(digest) {
            return Some(task.clone());
        }
        let (meta, pinned) = self.store.open_complete(digest)?;
        let layout = PieceLayout {
            size: meta.size,
            piece_size: meta.piece_size,
        };
        let digests = meta.piece_digests.iter().map(|d| d.parse().ok()).collect();
        let mut chain: Vec<_> = meta
            .piece_chain
            .iter()
            .map(|c| ChainState::from_hex(c))
            .collect();
        chain.resize(layout.count(), None);
        let mut stored_sums: Vec<_> = meta
            .piece_sums
            .iter()
            .map(|s| blake3::Hash::from_hex(s).ok())
            .collect();
        // A meta without (enough) sums: its pieces are checked by sha256.
        stored_sums.resize(layout.count(), None);
        let state = TaskState {
            have: Bitmap::full(layout.count()),
            digests,
            chain,
            chained: Bitmap::full(layout.count()),
            stored_sums,
            outcome: Outcome::Verified,
        };
        Some(Arc::new(Task::new(*digest, layout, state, pinned)))
    }

    /// The task for `digest`, starting its fetch unless it is running or
    /// complete already, with the pieces holding `wanted` (bytes a client
    /// waits for) fetched first. They are marked before the fetch starts,
    /// which may otherwise pick its first pieces without them.
    pub fn task(
        self: &Arc<Self>,
        digest: &BlobDigest,
        size: u64,
        origin: Origin,
        wanted: &Range<u64>,
    ) -> Result<Arc<Task>, TaskError> {
        let mut running = self.running();
        if let Some(task) = self.existing_task_locked(&running, digest) {
            task.want(task.layout.pieces_of(wanted));
            return Ok(task);
        }
        let pinned = self.store.create(digest, size)?;
        let layout = PieceLayout::new(size);
        let state = TaskState::empty(layout.count());
        let task = Arc::new(Task::new(*digest, layout, state, pinned));
        task.want(layout.pieces_of(wanted));
        running.insert(*digest, task.clone());
        tokio::spawn(self.clone().drive(task.clone(), origin));
        tokio::spawn(self.clone().report_progress(task.clone()));
        Ok(task)
    }

    /// Fetches, verifies and records a task, then forgets it as running
    /// (readers find it complete in the store).
    async fn drive(self: Arc<Self>, task: Arc<Task>, origin: Origin) {
        let hashing = tokio::spawn(self.clone().hash_blob(task.clone()));
        let result = match self.fetch(&task, &origin).await {
            Ok(()) => match hashing.await {
                Ok(Ok(actual)) => self.finish(&task, actual).await,
                Ok(Err(error)) => Err(error),
                Err(error) => Err(join_error(&error).into()),
            },
            Err(error) => {
                hashing.abort();
                Err(error)
            }
        };
        match result {
            Ok(()) => {
                info!(task = %task.digest, size = task.layout.size, "task complete and verified");
                task.update(|s| s.outcome = Outcome::Verified);
            }
            Err(error) => {
                warn!(task = %task.digest, %error, "task failed");
                self.store.discard(&task.digest);
                task.update(|s| s.outcome = Outcome::Failed(error.to_string()));
            }
        }
        self.running().remove(&task.digest);
    }

    /// Tells the scheduler what the task holds each time that changes.
    async fn report_progress(self: Arc<Self>, task: Arc<Task>) {
        let mut receiver = task.state.subscribe();
        loop {
            let state = receiver.borrow_and_update().clone();
            let complete = match state.outcome {
                Outcome::Failed(_) => return,
                Outcome::Verified => true,
                Outcome::Running => false,
            };
            if state.have.any() {
                self.link
                    .report(
                        &task.digest,
                        task.layout,
                        &state.have,
                        complete,
                        state.proofs(),
                    )
                    .await;
            }
            if complete || receiver.changed().await.is_err() {
                return;
            }
        }
    }

    /// Fetches every missing piece.
    async fn fetch(&self, task: &Task, origin: &Origin) -> Result<(), TaskError> {
        let mut last_progress = Instant::now();
        let mut bad_parents = HashSet::new();
        let mut origin_failures = 0;
        loop {
            let missing = task.state.borrow().have.count() < task.layout.count();
            if !missing {
                return Ok(());
            }
            let decision = match self.link.schedule(&task.digest, task.layout.size).await {
                Ok(answer) => self.follow(task, answer, origin, &mut bad_parents).await,
                Err(status) => {
                    debug!(task = %task.digest, %status, "scheduler unavailable: going to the origin");
                    Step::Fallback
                }
            };
            let step = match decision {
                Step::Progress => {
                    last_progress = Instant::now();
                    continue;
                }
                Step::Stalled if self.seed => Step::Origin,
                Step::Stalled if last_progress.elapsed() > PEER_PATIENCE => Step::Fallback,
                other => other,
            };
            let fetched = match step {
                Step::Origin => self.fetch_from_origin(task, origin, usize::MAX).await,
                Step::Fallback => {
                    Counters::add(&self.counters.origin_fallbacks, 1);
                    self.fetch_from_origin(task, origin, 1).await
                }
                Step::Stalled => {
                    tokio::time::sleep(WAIT_INTERVAL).await;
                    Ok(())
                }
                Step::Progress => Ok(()),
            };
            match fetched {
                // A fallback batch is not progress: without peers that
                // serve, the next round falls back again at once.
                Ok(()) if matches!(step, Step::Origin) => last_progress = Instant::now(),
                Ok(()) => {}
                Err(error) => {
                    origin_failures += 1;
                    warn!(task = %task.digest, %error, attempt = origin_failures, "origin fetch failed");
                    if origin_failures >= ORIGIN_ATTEMPTS {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Acts on a schedule answer other than going to the origin.
    async fn follow(
        &self,
        task: &Task,
        answer: crate::proto::ScheduleResponse,
        origin: &Origin,
        bad_parents: &mut HashSet<String>,
    ) -> Step {
        match answer.decision() {
            Decision::Origin => Step::Origin,
            Decision::Wait => Step::Stalled,
            Decision::Seed => {
                if let Some(seed) = answer.parents.first() {
                    self.ask_seed(&seed.data_addr, task, origin).await;
                }
                Step::Stalled
            }
            Decision::Parents if answer.piece_size != task.layout.piece_size => {
                warn!(task = %task.digest, piece_size = answer.piece_size, "scheduler uses another piece size");
                Step::Origin
            }
            Decision::Parents => {
                task.update(|s| {
                    for (mine, known) in s.digests.iter_mut().zip(&answer.piece_digests) {
                        if mine.is_none() {
                            *mine = known.parse().ok();
                        }
                    }
                    for (mine, known) in s.chain.iter_mut().zip(&answer.chain_states) {
                        if mine.is_none() {
                            *mine = ChainState::from_hex(known);
                        }
                    }
                });
                let parents: Vec<Offer> = answer
                    .parents
                    .into_iter()
                    .filter(|p| !bad_parents.contains(&p.peer_id))
                    .map(|p| Offer {
                        have: Bitmap::from_wire(&p.have, task.layout.count()),
                        peer_id: p.peer_id,
                        addr: p.data_addr,
                        seed: p.seed,
                    })
                    .collect();
                if self.fetch_from_parents(task, &parents, bad_parents).await > 0 {
                    Step::Progress
                } else {
                    Step::Stalled
                }
            }
        }
    }

    /// Fetches the missing pieces the parents have, several at once;
    /// returns how many arrived.
    async fn fetch_from_parents(
        &self,
        task: &Task,
        parents: &[Offer],
        bad_parents: &mut HashSet<String>,
    ) -> usize {
        let wanted: Vec<(usize, Check, Vec<&Offer>)> = {
            let state = task.state.borrow();
            (0..task.layout.count())
                .filter(|i| !state.have.get(*i))
                .filter_map(|i| {
                    let expected = state.check_for(&task.digest, task.layout, i)?;
                    let (mut holders, seeds): (Vec<_>, Vec<_>) = parents
                        .iter()
                        .filter(|p| p.have.get(i))
                        .partition(|p| !p.seed);
                    // Spread pieces over parents: each starts at another
                    // one; seeds come last.
                    if !holders.is_empty() {
                        let shift = i % holders.len();
                        holders.rotate_left(shift);
                    }
                    holders.extend(seeds);
                    if holders.is_empty() {
                        return None;
                    }
                    Some((i, expected, holders))
                })
                .collect()
        };
        let (mut wanted, rest): (Vec<_>, Vec<_>) =
            wanted.into_iter().partition(|(i, _, _)| task.is_wanted(*i));
        wanted.extend(rest);
        let bad = Mutex::new(std::mem::take(bad_parents));
        let mut wanted = wanted.into_iter();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut fetched = 0;
        loop {
            while in_flight.len() < PARALLEL_PIECES {
                let Some((index, expected, holders)) = wanted.next() else {
                    break;
                };
                in_flight.push(self.fetch_piece(task, index, expected, holders, &bad));
            }
            match in_flight.next().await {
                Some(true) => fetched += 1,
                Some(false) => {}
                None => break,
            }
        }
        drop(in_flight);
        *bad_parents = bad.into_inner().unwrap_or_else(PoisonError::into_inner);
        fetched
    }

    /// Fetches one piece from the first of `holders` that serves it right.
    async fn fetch_piece(
        &self,
        task: &Task,
        index: usize,
        expected: Check,
        holders: Vec<&Offer>,
        bad: &Mutex<HashSet<String>>,
    ) -> bool {
        let range = task.layout.range(index);
        for Offer { peer_id, addr, .. } in holders {
            if bad
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(peer_id)
            {
                continue;
            }
            let url = format!("http://{addr}/pieces/{}/{index}", task.digest);
            let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
            let piece = match self.get_piece(&url, len).await {
                Ok(piece) => piece,
                Err(error) => {
                    debug!(%url, %error, "parent could not serve a piece");
                    continue;
                }
            };
            let from_peers = &self.counters.bytes_from_peers;
            let kept = self
                .keep_piece(task, index, piece, from_peers, move |piece| {
                    (piece.len() == len)
                        .then(|| expected.verify(piece))
                        .flatten()
                })
                .await;
            match kept {
                Ok(true) => return true,
                Ok(false) => {
                    warn!(task = %task.digest, piece = index, parent = %peer_id, "parent served a bad piece");
                    Counters::add(&self.counters.bad_pieces, 1);
                    bad.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(peer_id.clone());
                    self.link
                        .report_bad_peer(peer_id, &task.digest, index)
                        .await;
                }
                Err(error) => {
                    warn!(task = %task.digest, %error, "cannot store a piece");
                    return false;
                }
            }
        }
        false
    }

    /// Asks a seed peer to fetch the task from the origin for the cluster,
    /// with the credentials of the client that asked for it.
    async fn ask_seed(&self, seed_addr: &str, task: &Task, origin: &Origin) {
        let url = format!("http://{seed_addr}/tasks/{}", task.digest);
        let order = SeedOrder {
            repository: origin.repository.clone(),
            size: task.layout.size,
        };
        let mut request = self
            .http
            .post(&url)
            .header(crate::TOKEN_HEADER, self.token.clone())
            .timeout(PIECE_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&order).unwrap_or_default());
        if let Some(authorization) = &origin.authorization {
            request = request.header(ORIGIN_AUTHORIZATION, authorization.clone());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                debug!(%url, "seed fetches from the origin");
            }
            Ok(response) => warn!(%url, status = %response.status(), "seed refused the task"),
            Err(error) => warn!(%url, %error, "seed unreachable"),
        }
    }

    /// A piece of `len` bytes from a parent (fewer if it sends fewer);
    /// fails if the parent stalls for [`PIECE_STALL`] or sends more than
    /// `len` bytes.
    async fn get_piece(&self, url: &str, len: usize) -> Result<PieceBuf, String> {
        let response = tokio::time::timeout(
            PIECE_STALL,
            self.http
                .get(url)
                .header(crate::TOKEN_HEADER, self.token.clone())
                .timeout(PIECE_TIMEOUT)
                .send(),
        )
        .await
        .map_err(|_| format!("no answer for {PIECE_STALL:?}"))?
        .map_err(|e| e.to_string())?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        let mut body = response.bytes_stream();
        let mut piece = self.store.buffer(len);
        let mut filled = 0;
        loop {
            let chunk = tokio::time::timeout(PIECE_STALL, body.next())
                .await
                .map_err(|_| {
                    format!("stalled for {PIECE_STALL:?} after {filled} of {len} bytes")
                })?;
            match chunk {
                None => {
                    piece.truncate(filled);
                    return Ok(piece);
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(chunk)) => {
                    let end = filled + chunk.len();
                    let target = piece
                        .get_mut(filled..end)
                        .ok_or_else(|| format!("more than the piece's {len} bytes"))?;
                    target.copy_from_slice(&chunk);
                    filled = end;
                }
            }
        }
    }

    /// Passes a piece to `check` and, if that accepts it, writes it to the
    /// store, records its BLAKE3 sum and what `check` returned, counts its
    /// bytes in `counter` and marks it present; both on a blocking thread
    /// (`check` hashes). `Ok(false)`: `check` refused the piece.
    async fn keep_piece(
        &self,
        task: &Task,
        index: usize,
        piece: PieceBuf,
        counter: &std::sync::atomic::AtomicU64,
        check: impl FnOnce(&[u8]) -> Option<Receipt> + Send + 'static,
    ) -> Result<bool, StoreError> {
        let store = self.store.clone();
        let task_digest = task.digest;
        let offset = task.layout.range(index).start;
        let len = piece.len() as u64;
        let kept = tokio::task::spawn_blocking(move || {
            let Some(receipt) = check(&piece) else {
                return Ok(None);
            };
            let sum = blake3::hash(&piece);
            store
                .write(&task_digest, offset, &piece)
                .map(|()| Some((receipt, sum)))
        })
        .await
        .unwrap_or_else(|e| Err(join_error(&e)))?;
        let Some((receipt, sum)) = kept else {
            return Ok(false);
        };
        Counters::add(counter, len);
        task.update(|s| {
            s.have.set(index);
            s.digests[index] = Some(receipt.digest);
            if receipt.chain.is_some() {
                s.chain[index] = receipt.chain;
            }
            if receipt.chained {
                s.chained.set(index);
            }
            s.stored_sums[index] = Some(sum);
        });
        Ok(true)
    }

    /// Fetches missing pieces from the origin, a batch of consecutive
    /// pieces per range request, at most `batches` of them (or until none
    /// is missing), pieces clients wait for first, recording each piece's
    /// digest.
    async fn fetch_from_origin(
        &self,
        task: &Task,
        origin: &Origin,
        batches: usize,
    ) -> Result<(), TaskError> {
        for _ in 0..batches {
            let have = task.state.borrow().have.clone();
            let wanted = task
                .wanted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let Some(pieces) = next_origin_batch(&have, &wanted) else {
                return Ok(());
            };
            self.fetch_run_from_origin(task, origin, pieces).await?;
        }
        Ok(())
    }

    async fn fetch_run_from_origin(
        &self,
        task: &Task,
        origin: &Origin,
        pieces: Range<usize>,
    ) -> Result<(), TaskError> {
        let failed = |reason: String| TaskError::Origin {
            url: origin.url.clone(),
            reason,
        };
        let start = task.layout.range(pieces.start).start;
        let end = task.layout.range(pieces.end - 1).end;
        let mut request = self
            .http
            .get(&origin.url)
            .header(reqwest::header::RANGE, format!("bytes={start}-{}", end - 1));
        if let Some(authorization) = &origin.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = request.send().await.map_err(|e| failed(e.to_string()))?;
        let whole = response.status() == reqwest::StatusCode::OK && start == 0;
        if response.status() != reqwest::StatusCode::PARTIAL_CONTENT && !whole {
            return Err(failed(format!(
                "status {} for bytes {start}-{}",
                response.status(),
                end - 1
            )));
        }
        let mut body = response.bytes_stream();
        let mut pending = bytes::Bytes::new();
        for index in pieces {
            let range = task.layout.range(index);
            let len = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
            let mut piece = self.store.buffer(len);
            let mut filled = 0;
            while filled < len {
                if pending.is_empty() {
                    pending = match body.next().await {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(e)) => return Err(failed(e.to_string())),
                        None => {
                            return Err(failed(format!(
                                "body ended at byte {} of {start}-{}",
                                range.start + filled as u64,
                                end - 1
                            )));
                        }
                    };
                }
                let take = pending.len().min(len - filled);
                piece[filled..filled + take].copy_from_slice(&pending.split_to(take));
                filled += take;
            }
            let before = task.state.borrow().chain_before(index);
            let (blob, layout) = (task.digest, task.layout);
            let from_origin = &self.counters.bytes_from_origin;
            self.keep_piece(task, index, piece, from_origin, move |piece| {
                Some(Receipt::of_origin_piece(piece, before, blob, layout, index))
            })
            .await?;
        }
        Ok(())
    }

    /// The sha256 of the whole blob, following the pieces in order as
    /// they arrive: a piece hashed along the chain on receipt is passed
    /// over (after checking that the chain it was hashed on from is the
    /// one computed so far); any other is read back from the store once.
    async fn hash_blob(self: Arc<Self>, task: Arc<Task>) -> Result<BlobDigest, TaskError> {
        let count = task.layout.count();
        let mut state = ChainState::INITIAL;
        for index in 0..count {
            let seen = task
                .wait_for(|s| s.have.get(index))
                .await
                .map_err(|reason| TaskError::Ended {
                    task: task.digest,
                    reason,
                })?;
            let broken = TaskError::ChainMismatch {
                task: task.digest,
                piece: index,
            };
            let last = index + 1 == count;
            if seen.chained.get(index) {
                if seen.chain_before(index) != Some(state) {
                    return Err(broken);
                }
                if last {
                    return Ok(task.digest);
                }
                state = seen.chain[index].ok_or(broken)?;
                continue;
            }
            let size = task.layout.size;
            let hashed = self
                .read_then(&task, index, move |piece| {
                    if last {
                        Hashed::Blob(state.finish(&piece, size))
                    } else {
                        Hashed::Piece(state.advance(&piece))
                    }
                })
                .await?;
            let range = task.layout.range(index);
            Counters::add(&self.counters.bytes_rehashed, range.end - range.start);
            match hashed {
                Hashed::Blob(digest) => return Ok(digest),
                Hashed::Piece(Some(after))
                    if seen.chain[index].is_none_or(|known| known == after) =>
                {
                    state = after;
                    task.update(|s| s.chain[index] = Some(after));
                }
                Hashed::Piece(_) => return Err(broken),
            }
        }
        Ok(state.finish(&[], 0))
    }

    /// Checks the whole blob's sha256 (`actual`) against its digest and
    /// records the task complete.
    async fn finish(&self, task: &Task, actual: BlobDigest) -> Result<(), TaskError> {
        if actual != task.digest {
            return Err(TaskError::BlobMismatch {
                task: task.digest,
                actual,
            });
        }
        let meta = {
            let state = task.state.borrow();
            TaskMeta {
                size: task.layout.size,
                piece_size: task.layout.piece_size,
                piece_digests: state.wire_digests(),
                piece_chain: state.wire_chain(),
                piece_sums: state
                    .stored_sums
                    .iter()
                    .map(|s| s.map(|s| s.to_hex().to_string()).unwrap_or_default())
                    .collect(),
            }
        };
        let store = self.store.clone();
        let digest = task.digest;
        tokio::task::spawn_blocking(move || store.finish(&digest, meta))
            .await
            .unwrap_or_else(|e| Err(join_error(&e)))?;
        Ok(())
    }

    /// A piece of a task, read from the store and checked: against the
    /// BLAKE3 sum of the bytes verified on receipt, or for a task from an
    /// earlier run without sums, against the piece's sha256 digest.
    pub async fn read_verified(&self, task: &Task, index: usize) -> Result<PieceBuf, TaskError> {
        let (sum, expected) = {
            let state = task.state.borrow();
            (state.stored_sums[index], state.digests[index])
        };
        let unverified = || TaskError::UnverifiedPiece {
            task: task.digest,
            piece: index,
        };
        if sum.is_none() && expected.is_none() {
            return Err(unverified());
        }
        let (bytes, intact) = self
            .read_then(task, index, move |bytes| {
                let intact = match (sum, expected) {
                    (Some(sum), _) => blake3::hash(&bytes) == sum,
                    (None, expected) => Some(BlobDigest::of(&bytes)) == expected,
                };
                (bytes, intact)
            })
            .await?;
        if !intact {
            warn!(task = %task.digest, piece = index, "corrupt piece in the local store; dropping the task");
            self.store.discard(&task.digest);
            return Err(TaskError::CorruptLocalPiece {
                task: task.digest,
                piece: index,
            });
        }
        Ok(bytes)
    }

    /// A piece of a task, as stored.
    pub async fn read_piece(&self, task: &Task, index: usize) -> Result<PieceBuf, TaskError> {
        Ok(self.read_then(task, index, |bytes| bytes).await?)
    }

    /// Reads a piece from the store and passes it to `then`, both on a
    /// blocking thread (`then` may hash it).
    async fn read_then<T: Send + 'static>(
        &self,
        task: &Task,
        index: usize,
        then: impl FnOnce(PieceBuf) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        let digest = task.digest;
        let range = task.layout.range(index);
        tokio::task::spawn_blocking(move || {
            store
                .read(&digest, range.start, (range.end - range.start) as usize)
                .map(then)
        })
        .await
        .unwrap_or_else(|e| Err(join_error(&e)))
    }
}

/// The header that carries the client's `Authorization` to a seed.
pub const ORIGIN_AUTHORIZATION: &str = "x-darter-origin-authorization";

/// What a peer asks a seed to fetch (`POST /tasks/<digest>`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SeedOrder {
    pub repository: String,
    pub size: u64,
}

/// A parent the scheduler offered, and the pieces it has.
#[derive(Debug)]
struct Offer {
    peer_id: String,
    addr: String,
    have: Bitmap,
    seed: bool,
}

/// What hashing a piece read back gave: the state after it, or after the
/// last piece, the blob's digest.
#[derive(Debug)]
enum Hashed {
    Piece(Option<ChainState>),
    Blob(BlobDigest),
}

/// What one round of a fetch achieved.
#[derive(Debug)]
enum Step {
    Progress,
    Stalled,
    /// The scheduler made this peer the blob's origin fetcher (or it is a
    /// seed): every missing piece comes from the origin.
    Origin,
    /// The scheduler is unreachable, or no parent served for
    /// [`PEER_PATIENCE`]: one batch from the origin, then the scheduler is
    /// asked again, so one slow answer does not commit a peer to fetching
    /// the rest of the blob from the registry.
    Fallback,
}

/// Runs of consecutive missing pieces.
fn missing_runs(have: &Bitmap) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for index in (0..have.len()).filter(|i| !have.get(*i)) {
        match runs.last_mut() {
            Some(run) if run.end == index => run.end += 1,
            _ => runs.push(index..index + 1),
        }
    }
    runs
}

/// The next run of missing pieces to ask the origin for: at most
/// [`ORIGIN_BATCH`] pieces, starting at the first wanted missing piece if
/// any, else at the first missing piece.
fn next_origin_batch(have: &Bitmap, wanted: &Bitmap) -> Option<Range<usize>> {
    let runs = missing_runs(have);
    let start = runs
        .iter()
        .flat_map(Clone::clone)
        .find(|i| wanted.get(*i))
        .or_else(|| runs.first().map(|run| run.start))?;
    let run = runs.iter().find(|run| run.contains(&start))?;
    Some(start..run.end.min(start + ORIGIN_BATCH))
}

fn join_error(e: &tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        path: "<blocking task>".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pieces_group_into_runs() {
        let mut have = Bitmap::new(8);
        for i in [0, 3, 4, 7] {
            have.set(i);
        }
        assert_eq!(missing_runs(&have), vec![1..3, 5..7]);
        assert_eq!(missing_runs(&Bitmap::new(3)), vec![0..3]);
        assert!(missing_runs(&Bitmap::full(3)).is_empty());
    }

    #[test]
    fn origin_batches_start_at_wanted_pieces_and_stay_short() {
        let mut have = Bitmap::new(12);
        for i in [0, 1, 9] {
            have.set(i);
        }
        let nothing = Bitmap::new(12);
        assert_eq!(next_origin_batch(&have, &nothing), Some(2..6));
        let mut wanted = Bitmap::new(12);
        wanted.set(8);
        wanted.set(1);
        assert_eq!(next_origin_batch(&have, &wanted), Some(8..9));
        wanted.set(10);
        assert_eq!(next_origin_batch(&have, &wanted), Some(8..9));
        have.set(8);
        assert_eq!(next_origin_batch(&have, &wanted), Some(10..12));
        assert_eq!(next_origin_batch(&Bitmap::full(12), &wanted), None);
    }

    /// A blob of three pieces of 128 bytes and a last one of 10, and the
    /// state of a task that knows their digests and chain states.
    fn chained_blob() -> (Vec<u8>, BlobDigest, PieceLayout, TaskState) {
        let data: Vec<u8> = (0..394u32).map(|i| (i * 7 % 256) as u8).collect();
        let layout = PieceLayout {
            size: data.len() as u64,
            piece_size: 128,
        };
        let mut state = TaskState::empty(layout.count());
        let mut chain = ChainState::INITIAL;
        for (index, piece) in data.chunks(128).enumerate() {
            state.digests[index] = Some(BlobDigest::of(piece));
            if index + 1 < layout.count() {
                chain = chain.advance(piece).unwrap();
                state.chain[index] = Some(chain);
            }
        }
        let blob = BlobDigest::of(&data);
        (data, blob, layout, state)
    }

    #[test]
    fn pieces_with_known_chain_states_are_checked_along_the_chain() {
        let (data, blob, layout, state) = chained_blob();
        for (index, piece) in data.chunks(128).enumerate() {
            let check = state.check_for(&blob, layout, index).unwrap();
            assert!(matches!(check, Check::Chain { .. }), "{index}");
            let receipt = check.verify(piece).unwrap();
            assert!(receipt.chained);
            assert_eq!(receipt.digest, BlobDigest::of(piece));
            let mut bad = piece.to_vec();
            bad[0] ^= 1;
            assert!(check.verify(&bad).is_none(), "{index}");
        }
    }

    #[test]
    fn a_piece_whose_chain_state_is_unknown_is_checked_by_its_digest() {
        let (data, blob, layout, mut state) = chained_blob();
        state.chain[0] = None;
        let piece = &data[128..256];
        // Piece 1 lacks the state before it, piece 0 the state after it.
        for index in [0, 1] {
            let check = state.check_for(&blob, layout, index).unwrap();
            assert!(matches!(check, Check::Digest(_)), "{index}");
        }
        let receipt = state
            .check_for(&blob, layout, 1)
            .unwrap()
            .verify(piece)
            .unwrap();
        assert!(!receipt.chained);
        state.digests[2] = None;
        assert!(state.check_for(&blob, layout, 2).is_none());
    }

    #[test]
    fn origin_pieces_in_order_extend_the_chain_and_the_last_must_reach_the_blob() {
        let (data, blob, layout, state) = chained_blob();
        let pieces: Vec<&[u8]> = data.chunks(128).collect();
        let mut before = Some(ChainState::INITIAL);
        for (index, piece) in pieces.iter().enumerate() {
            let receipt = Receipt::of_origin_piece(piece, before, blob, layout, index);
            assert!(receipt.chained, "{index}");
            assert_eq!(receipt.chain, state.chain[index]);
            before = receipt.chain;
        }
        let out_of_order = Receipt::of_origin_piece(pieces[2], None, blob, layout, 2);
        assert!(!out_of_order.chained && out_of_order.chain.is_none());
        let wrong_blob = BlobDigest::of(b"another blob");
        let last = Receipt::of_origin_piece(pieces[3], state.chain[2], wrong_blob, layout, 3);
        assert!(
            !last.chained,
            "a last piece that misses the digest is hashed again"
        );
    }

    #[test]
    fn origin_debug_hides_credentials() {
        let origin = Origin {
            repository: "a".into(),
            url: "http://r/v2/a/blobs/sha256:00".into(),
            authorization: Some(reqwest::header::HeaderValue::from_static("Bearer secret")),
        };
        let shown = format!("{origin:?}");
        assert!(!shown.contains("secret") && shown.contains("redacted"));
    }
}
