//! Fetching one task (blob) into the piece store: from parents the
//! scheduler names, several at once, each piece verified against the digest
//! recorded from the origin; or from the origin itself when the scheduler
//! says so, when it is unreachable, or when no parent serves in time. A
//! task ends verified (the whole blob matches its digest) or failed, and
//! readers follow its progress piece by piece.
//!
//! Where bytes are checked: each piece once on receipt, in memory, before
//! it is written (its sha256 against the digest recorded from the origin;
//! a piece from the origin records that digest); the whole blob's sha256
//! is computed once, piece by piece as the pieces arrive in order, and
//! checked when the last one is in. A piece read back from the store for a
//! client is checked against the BLAKE3 sum taken of its verified bytes on
//! receipt (a few times cheaper than sha256 again), so a store file that
//! changed on disk is caught before a byte of it is sent.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Counters;
use crate::piece::{Bitmap, BlobDigest, PieceLayout};
use crate::proto::schedule_response::Decision;
use crate::scheduler_client::SchedulerLink;
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
    /// BLAKE3 of each piece as written to the store, once verified.
    pub stored_sums: Vec<Option<blake3::Hash>>,
    pub outcome: Outcome,
}

impl TaskState {
    fn wire_digests(&self) -> Vec<String> {
        self.digests
            .iter()
            .map(|d| d.map(|d| d.to_string()).unwrap_or_default())
            .collect()
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
            stored_sums,
            outcome: Outcome::Verified,
        };
        Some(Arc::new(Task::new(*digest, layout, state, pinned)))
    }

    /// The task for `digest`, starting its fetch unless it is running or
    /// complete already.
    pub fn task(
        self: &Arc<Self>,
        digest: &BlobDigest,
        size: u64,
        origin: Origin,
    ) -> Result<Arc<Task>, TaskError> {
        let mut running = self.running();
        if let Some(task) = self.existing_task_locked(&running, digest) {
            return Ok(task);
        }
        let pinned = self.store.create(digest, size)?;
        let layout = PieceLayout::new(size);
        let state = TaskState {
            have: Bitmap::new(layout.count()),
            digests: vec![None; layout.count()],
            stored_sums: vec![None; layout.count()],
            outcome: Outcome::Running,
        };
        let task = Arc::new(Task::new(*digest, layout, state, pinned));
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
                        state.wire_digests(),
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
                    Counters::add(&self.counters.origin_fallbacks, 1);
                    Step::Origin
                }
            };
            let step = match decision {
                Step::Progress => {
                    last_progress = Instant::now();
                    continue;
                }
                Step::Stalled if self.seed || last_progress.elapsed() > PEER_PATIENCE => {
                    if !self.seed {
                        Counters::add(&self.counters.origin_fallbacks, 1);
                    }
                    Step::Origin
                }
                other => other,
            };
            match step {
                Step::Origin => match self.fetch_from_origin(task, origin).await {
                    Ok(()) => last_progress = Instant::now(),
                    Err(error) => {
                        origin_failures += 1;
                        warn!(task = %task.digest, %error, attempt = origin_failures, "origin fetch failed");
                        if origin_failures >= ORIGIN_ATTEMPTS {
                            return Err(error);
                        }
                    }
                },
                Step::Stalled => tokio::time::sleep(WAIT_INTERVAL).await,
                Step::Progress => {}
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
                });
                let parents: Vec<Offer> = answer
                    .parents
                    .into_iter()
                    .filter(|p| !bad_parents.contains(&p.peer_id))
                    .map(|p| Offer {
                        have: Bitmap::from_wire(&p.have, task.layout.count()),
                        peer_id: p.peer_id,
                        addr: p.data_addr,
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
        let wanted: Vec<(usize, BlobDigest, Vec<&Offer>)> = {
            let state = task.state.borrow();
            (0..task.layout.count())
                .filter(|i| !state.have.get(*i))
                .filter_map(|i| {
                    let expected = state.digests[i]?;
                    let mut holders: Vec<_> = parents.iter().filter(|p| p.have.get(i)).collect();
                    if holders.is_empty() {
                        return None;
                    }
                    // Spread pieces over parents: each starts at another one.
                    let shift = i % holders.len();
                    holders.rotate_left(shift);
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
        expected: BlobDigest,
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
            let bytes = match self.get_piece(&url, range.end - range.start).await {
                Ok(bytes) => bytes,
                Err(error) => {
                    debug!(%url, %error, "parent could not serve a piece");
                    continue;
                }
            };
            let length_ok = bytes.len() as u64 == range.end - range.start;
            if !length_ok || BlobDigest::of(&bytes) != expected {
                warn!(task = %task.digest, piece = index, parent = %peer_id, "parent served a bad piece");
                Counters::add(&self.counters.bad_pieces, 1);
                bad.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(peer_id.clone());
                self.link
                    .report_bad_peer(peer_id, &task.digest, index)
                    .await;
                continue;
            }
            let from_peers = &self.counters.bytes_from_peers;
            if let Err(error) = self
                .keep_piece(task, index, bytes, expected, from_peers)
                .await
            {
                warn!(task = %task.digest, %error, "cannot store a piece");
                return false;
            }
            return true;
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

    /// A piece of `len` bytes from a parent; fails if the parent stalls
    /// for [`PIECE_STALL`] or sends more than `len` bytes.
    async fn get_piece(&self, url: &str, len: u64) -> Result<Vec<u8>, String> {
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
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        loop {
            let chunk = tokio::time::timeout(PIECE_STALL, body.next())
                .await
                .map_err(|_| {
                    format!(
                        "stalled for {PIECE_STALL:?} after {} of {len} bytes",
                        bytes.len()
                    )
                })?;
            match chunk {
                None => return Ok(bytes),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(chunk)) if bytes.len() as u64 + chunk.len() as u64 > len => {
                    return Err(format!("more than the piece's {len} bytes"));
                }
                Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
            }
        }
    }

    /// Writes a verified piece (sha256 `digest`) to the store, records
    /// its BLAKE3 sum, counts its bytes in `counter` and marks it present.
    async fn keep_piece(
        &self,
        task: &Task,
        index: usize,
        bytes: Vec<u8>,
        digest: BlobDigest,
        counter: &std::sync::atomic::AtomicU64,
    ) -> Result<(), StoreError> {
        let store = self.store.clone();
        let task_digest = task.digest;
        let offset = task.layout.range(index).start;
        let len = bytes.len() as u64;
        let sum = tokio::task::spawn_blocking(move || {
            let sum = blake3::hash(&bytes);
            store.write(&task_digest, offset, &bytes).map(|()| sum)
        })
        .await
        .unwrap_or_else(|e| Err(join_error(&e)))?;
        Counters::add(counter, len);
        task.update(|s| {
            s.have.set(index);
            s.digests[index] = Some(digest);
            s.stored_sums[index] = Some(sum);
        });
        Ok(())
    }

    /// Fetches every missing piece from the origin, a batch of
    /// consecutive pieces per range request, pieces clients wait for
    /// first, recording each piece's digest.
    async fn fetch_from_origin(&self, task: &Task, origin: &Origin) -> Result<(), TaskError> {
        loop {
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
        let mut index = pieces.start;
        let mut buffer = Vec::with_capacity(task.layout.piece_size as usize);
        while index < pieces.end {
            let range = task.layout.range(index);
            let piece_len = (range.end - range.start) as usize;
            if buffer.len() >= piece_len {
                let rest = buffer.split_off(piece_len);
                let piece = std::mem::replace(&mut buffer, rest);
                let digest = BlobDigest::of(&piece);
                let from_origin = &self.counters.bytes_from_origin;
                self.keep_piece(task, index, piece, digest, from_origin)
                    .await?;
                index += 1;
                continue;
            }
            match body.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(failed(e.to_string())),
                None => {
                    return Err(failed(format!(
                        "body ended at byte {} of {start}-{}",
                        range.start + buffer.len() as u64,
                        end - 1
                    )));
                }
            }
        }
        Ok(())
    }

    /// The sha256 of the whole blob, hashed piece by piece in order as
    /// the pieces arrive (each read back from the store once).
    async fn hash_blob(self: Arc<Self>, task: Arc<Task>) -> Result<BlobDigest, TaskError> {
        let mut hasher = Sha256::new();
        for index in 0..task.layout.count() {
            task.wait_for(|s| s.have.get(index))
                .await
                .map_err(|reason| TaskError::Ended {
                    task: task.digest,
                    reason,
                })?;
            hasher = self
                .read_then(&task, index, move |bytes| {
                    hasher.update(&bytes);
                    hasher
                })
                .await?;
        }
        Ok(BlobDigest::from_hasher(hasher))
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
    pub async fn read_verified(&self, task: &Task, index: usize) -> Result<Vec<u8>, TaskError> {
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
    pub async fn read_piece(&self, task: &Task, index: usize) -> Result<Vec<u8>, TaskError> {
        Ok(self.read_then(task, index, |bytes| bytes).await?)
    }

    /// Reads a piece from the store and passes it to `then`, both on a
    /// blocking thread (`then` may hash it).
    async fn read_then<T: Send + 'static>(
        &self,
        task: &Task,
        index: usize,
        then: impl FnOnce(Vec<u8>) -> T + Send + 'static,
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
}

/// What one round of a fetch achieved.
#[derive(Debug)]
enum Step {
    Progress,
    Stalled,
    Origin,
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
