//! The piece server: the data channel other peers fetch from, on its own
//! port. Every request must carry the cluster token; content is named only
//! by digest and piece index. Pieces are sent as stored: the fetching peer
//! verifies each against the digest recorded from the origin (a peer whose
//! disk corrupted a piece is reported and no longer chosen). A seed also
//! takes orders to fetch a task from the origin (`POST /tasks/<digest>`),
//! and rations its copies of each piece ([`SeedRation`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tracing::{debug, warn};

use crate::http::{Body, full, text};
use crate::metrics::Counters;
use crate::mirror::valid_repository;
use crate::piece::{BlobDigest, secrets_equal};
use crate::task::{ORIGIN_AUTHORIZATION, Peer, SeedOrder};

/// Largest seed order body accepted.
const MAX_ORDER: usize = 4096;

/// The piece server's shared state.
#[derive(Debug)]
pub struct PieceServer {
    pub peer: Arc<Peer>,
    pub token: Vec<u8>,
    /// Piece uploads in progress (reported to the scheduler as load).
    pub active_uploads: Arc<AtomicU32>,
    /// Most piece uploads at once; more are answered 503 at once, and the
    /// peer asking tries another parent. A parent that took every request
    /// would share its link among all of them, and a seed's link carries
    /// what it fetches from the origin too.
    pub upload_capacity: u32,
    /// A seed's copies of each piece so far.
    pub ration: SeedRation,
}

/// Copies of a piece a seed sends at once, before peers hold it.
const SEED_COPIES: u32 = 2;
/// After those, one more copy of the piece each this long.
const SEED_COPY_INTERVAL: Duration = Duration::from_secs(1);
/// Pieces a ration remembers before it forgets old ones.
const RATION_ENTRIES: usize = 65_536;
/// How long a ration remembers a piece, once it has too many.
const RATION_MEMORY: Duration = Duration::from_secs(120);

/// A seed sends each piece to a few peers and leaves the rest to fetch it
/// from them. All peers following a blob as it arrives from the origin
/// want each new piece at once, when the seed is its only holder: served
/// to all of them, the seed's link would carry every copy (and the fetch
/// from the origin would slow down behind them). Refused peers ask another
/// parent a moment later. More copies are allowed as time passes, so a
/// piece whose first takers died still spreads.
#[derive(Debug, Default)]
pub struct SeedRation {
    sent: Mutex<HashMap<(BlobDigest, usize), (u32, Instant)>>,
}

impl SeedRation {
    /// Whether one more copy of piece `index` of `task` may go now; counts
    /// it if so.
    pub fn allow(&self, task: &BlobDigest, index: usize, now: Instant) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if sent.len() >= RATION_ENTRIES {
            sent.retain(|_, (_, first)| now.duration_since(*first) < RATION_MEMORY);
        }
        let (copies, first) = sent.entry((*task, index)).or_insert((0, now));
        let waited = now.duration_since(*first).as_millis() / SEED_COPY_INTERVAL.as_millis();
        let allowed = u128::from(SEED_COPIES) + waited;
        if u128::from(*copies) < allowed {
            *copies += 1;
            true
        } else {
            false
        }
    }
}

/// Decrements the upload count when an upload ends, however it ends.
struct Upload<'a>(&'a AtomicU32);

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PieceServer {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let presented = request
            .headers()
            .get(crate::TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !secrets_equal(presented, &self.token) {
            return text(401, "missing or wrong cluster token\n");
        }
        let path = request.uri().path().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let digest = parts.get(1).and_then(|d| d.parse::<BlobDigest>().ok());
        match (request.method(), parts.as_slice(), digest) {
            (&Method::GET, ["pieces", _, "meta"], Some(digest)) => self.meta(&digest),
            (&Method::GET, ["pieces", _, index], Some(digest)) => match index.parse() {
                Ok(index) => self.piece(&digest, index).await,
                Err(_) => text(400, "bad piece index\n"),
            },
            (&Method::POST, ["tasks", _], Some(digest)) => self.seed_order(digest, request).await,
            _ => text(404, "not found\n"),
        }
    }

    fn meta(&self, digest: &BlobDigest) -> Response<Body> {
        let Some(task) = self.peer.existing_task(digest) else {
            return text(404, "no such task\n");
        };
        let state = task.state.borrow().clone();
        let meta = serde_json::json!({
            "size": task.layout.size,
            "piece_size": task.layout.piece_size,
            "piece_digests": state.digests.iter()
                .map(|d| d.map(|d| d.to_string()).unwrap_or_default())
                .collect::<Vec<_>>(),
        });
        let mut response = Response::new(full(meta.to_string()));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    async fn piece(&self, digest: &BlobDigest, index: usize) -> Response<Body> {
        let Some(task) = self.peer.existing_task(digest) else {
            return text(404, "no such task\n");
        };
        if !task.state.borrow().have.get(index) {
            return text(404, "no such piece\n");
        }
        if self.peer.seed && !self.ration.allow(digest, index, Instant::now()) {
            return text(
                503,
                "this seed sent the piece to enough peers: ask one of them\n",
            );
        }
        let started = self.active_uploads.fetch_add(1, Ordering::Relaxed);
        let _upload = Upload(&self.active_uploads);
        if started >= self.upload_capacity {
            return text(503, "all upload slots are busy\n");
        }
        match self.peer.read_piece(&task, index).await {
            Ok(bytes) => {
                Counters::add(
                    &self.peer.counters.bytes_served_to_peers,
                    bytes.len() as u64,
                );
                Response::new(full(bytes::Bytes::from_owner(bytes)))
            }
            Err(error) => {
                warn!(task = %digest, piece = index, %error, "cannot read a piece to serve");
                text(500, "cannot read the piece\n")
            }
        }
    }

    async fn seed_order(&self, digest: BlobDigest, request: Request<Incoming>) -> Response<Body> {
        if !self.peer.seed {
            return text(403, "not a seed peer\n");
        }
        let authorization = request.headers().get(ORIGIN_AUTHORIZATION).cloned();
        let body = match http_body_util::Limited::new(request.into_body(), MAX_ORDER)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return text(400, "order body too large or broken\n"),
        };
        let order: SeedOrder = match serde_json::from_slice(&body) {
            Ok(order) => order,
            Err(e) => return text(400, format!("bad order: {e}\n")),
        };
        if !valid_repository(&order.repository) {
            return text(400, "bad repository name\n");
        }
        let origin = self.peer.origin(&order.repository, &digest, authorization);
        match self.peer.task(&digest, order.size, origin, &(0..0)) {
            Ok(_) => {
                debug!(task = %digest, "seed order taken");
                text(202, "fetching\n")
            }
            Err(error) => text(503, format!("{error}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_sends_a_few_copies_of_a_piece_then_one_more_each_interval() {
        let ration = SeedRation::default();
        let task = BlobDigest::of(b"blob");
        let start = Instant::now();
        assert!(ration.allow(&task, 0, start));
        assert!(ration.allow(&task, 0, start));
        assert!(!ration.allow(&task, 0, start));
        // Other pieces and tasks have their own rations.
        assert!(ration.allow(&task, 1, start));
        assert!(ration.allow(&BlobDigest::of(b"other"), 0, start));
        let later = start + SEED_COPY_INTERVAL;
        assert!(ration.allow(&task, 0, later));
        assert!(!ration.allow(&task, 0, later));
        assert!(ration.allow(&task, 0, start + 3 * SEED_COPY_INTERVAL));
    }
}
