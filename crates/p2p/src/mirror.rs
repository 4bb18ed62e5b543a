//! The registry mirror containerd pulls through (`hosts.toml`): blob GETs
//! (with `Range`) are served from the P2P piece store, everything else is
//! passed to the upstream registry with the client's credentials. Before a
//! blob is served, the upstream registry is asked (`HEAD`, with the
//! client's credentials) whether this client may read it, and how big it
//! is; an admission stands for a minute for that client, repository and
//! digest (`admission.rs`), so a client reading a blob in many ranges asks
//! once. Bytes go out only after their piece is verified (on receipt;
//! read back from the store, against the sum taken then), and in a
//! whole-blob response the last ones only after the whole blob is: a
//! failure aborts the response. A `Range` response is sent as soon as the
//! pieces it covers are here (they are fetched first): its client cannot
//! check the blob's digest on a part of it and checks what it reads itself
//! (a Darter mount verifies every chunk against the chunk table).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::{debug, warn};

use crate::admission::{AdmissionKey, Admissions};
use crate::http::{Body, BodyError, channel_body, empty, requested_range, text};
use crate::metrics::Counters;
use crate::piece::BlobDigest;
use crate::task::{Origin, Outcome, Peer, Task};

/// Request headers passed to the upstream registry.
const FORWARDED_REQUEST_HEADERS: [header::HeaderName; 6] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::RANGE,
    header::USER_AGENT,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

/// Whether `name` is a repository name of the distribution spec's
/// alphabet (it goes into upstream URLs).
pub fn valid_repository(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|component| {
            !component.is_empty()
                && component
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
                && component.bytes().any(|b| b.is_ascii_alphanumeric())
        })
}

/// `(repository, digest)` of `/v2/<repository>/blobs/<digest>`.
fn blob_path(path: &str) -> Option<(&str, BlobDigest)> {
    let (repository, digest) = path.strip_prefix("/v2/")?.rsplit_once("/blobs/")?;
    let digest = digest.parse().ok()?;
    valid_repository(repository).then_some((repository, digest))
}

/// The mirror: the peer it serves blobs from, and the admissions the
/// upstream registry gave its clients lately.
#[derive(Debug)]
pub struct Mirror {
    peer: Arc<Peer>,
    admissions: Admissions,
}

impl Mirror {
    pub fn new(peer: Arc<Peer>) -> Mirror {
        Mirror {
            peer,
            admissions: Admissions::default(),
        }
    }

    /// The mirror's request handler.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let blob = blob_path(request.uri().path()).map(|(r, d)| (r.to_owned(), d));
        match blob {
            Some((repository, digest)) if request.method() == Method::GET => {
                self.serve_blob(request, &repository, digest).await
            }
            _ => pass_through(&self.peer, &request).await,
        }
    }

    /// The blob's size, if the upstream registry lets this client read it:
    /// remembered from an admission of the same client to the same blob
    /// less than [`crate::admission::ADMISSION_TTL`] ago, or asked.
    async fn admitted_size(&self, origin: &Origin, digest: &BlobDigest) -> Result<u64, String> {
        let credentials = origin.authorization.as_ref().map(|v| v.as_bytes());
        let key = AdmissionKey::new(credentials, &origin.repository, digest);
        if let Some(size) = self.admissions.admitted(&key, Instant::now()) {
            return Ok(size);
        }
        let size = upstream_size(&self.peer, origin).await?;
        self.admissions.admit(key, size, Instant::now());
        Ok(size)
    }

    /// A blob GET, served P2P.
    async fn serve_blob(
        &self,
        request: Request<Incoming>,
        repository: &str,
        digest: BlobDigest,
    ) -> Response<Body> {
        let peer = &self.peer;
        let authorization = request.headers().get(header::AUTHORIZATION).cloned();
        let origin = peer.origin(repository, &digest, authorization);
        let size = match self.admitted_size(&origin, &digest).await {
            Ok(size) => size,
            Err(reason) => {
                debug!(%digest, reason, "upstream does not serve the blob to this client: passing through");
                return pass_through(peer, &request).await;
            }
        };
        let range_header = request
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok());
        let Ok(range) = requested_range(range_header, size) else {
            let mut response = text(416, "range not satisfiable\n");
            insert(
                &mut response,
                header::CONTENT_RANGE,
                &format!("bytes */{size}"),
            );
            return response;
        };
        let (status, bytes) = match &range {
            Some(range) => (StatusCode::PARTIAL_CONTENT, range.clone()),
            None => (StatusCode::OK, 0..size),
        };
        let task = match peer.task(&digest, size, origin, &bytes) {
            Ok(task) if task.layout.size == size => task,
            Ok(_) => return text(502, "the blob's size changed upstream\n"),
            Err(error) => {
                warn!(%digest, %error, "cannot serve the blob P2P: passing through");
                return pass_through(peer, &request).await;
            }
        };
        let (sender, body) = channel_body();
        let whole = range.is_none();
        tokio::spawn(stream_blob(
            peer.clone(),
            task,
            bytes.clone(),
            whole,
            sender,
        ));
        let mut response = Response::new(body);
        *response.status_mut() = status;
        insert(
            &mut response,
            header::CONTENT_LENGTH,
            &(bytes.end - bytes.start).to_string(),
        );
        insert(
            &mut response,
            header::CONTENT_TYPE,
            "application/octet-stream",
        );
        insert(&mut response, header::ACCEPT_RANGES, "bytes");
        insert(&mut response, "docker-content-digest", &digest.to_string());
        if range.is_some() {
            let last = bytes.end.saturating_sub(1);
            insert(
                &mut response,
                header::CONTENT_RANGE,
                &format!("bytes {}-{last}/{size}", bytes.start),
            );
        }
        response
    }
}

fn insert(response: &mut Response<Body>, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// The blob's size, if the upstream registry lets this client read it.
async fn upstream_size(peer: &Peer, origin: &Origin) -> Result<u64, String> {
    let mut request = peer.http.head(&origin.url);
    if let Some(authorization) = &origin.authorization {
        request = request.header(header::AUTHORIZATION, authorization.clone());
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no Content-Length".to_owned())
}

/// Sends `bytes` of the task as its pieces arrive, each verified; for the
/// `whole` blob, holds the last bytes back until the whole blob is
/// verified. Any failure ends the body with an error, which aborts the
/// response.
async fn stream_blob(
    peer: Arc<Peer>,
    task: Arc<Task>,
    bytes: Range<u64>,
    whole: bool,
    sender: tokio::sync::mpsc::Sender<Result<Bytes, BodyError>>,
) {
    let result = send_pieces(&peer, &task, &bytes, whole, &sender).await;
    if let Err(error) = result {
        warn!(task = %task.digest, %error, "aborting a blob response");
        let _ = sender.send(Err(error.into())).await;
    }
}

async fn send_pieces(
    peer: &Peer,
    task: &Task,
    bytes: &Range<u64>,
    whole: bool,
    sender: &tokio::sync::mpsc::Sender<Result<Bytes, BodyError>>,
) -> Result<(), String> {
    let pieces = task.layout.pieces_of(bytes);
    let last_piece = pieces.end.checked_sub(1).filter(|_| whole);
    if whole && last_piece.is_none() {
        // Nothing to send but the verdict on the whole blob.
        task.wait_for(|s| s.outcome == Outcome::Verified).await?;
    }
    for index in pieces {
        task.wait_for(|s| s.have.get(index)).await?;
        let piece = peer
            .read_verified(task, index)
            .await
            .map_err(|e| e.to_string())?;
        let range = task.layout.range(index);
        let from = bytes.start.max(range.start) - range.start;
        let to = bytes.end.min(range.end) - range.start;
        let slice = Bytes::from_owner(piece).slice(from as usize..to as usize);
        if Some(index) == last_piece {
            task.wait_for(|s| s.outcome == Outcome::Verified).await?;
        }
        let len = slice.len() as u64;
        if sender.send(Ok(slice)).await.is_err() {
            return Ok(()); // The client left.
        }
        Counters::add(&peer.counters.bytes_served_to_clients, len);
    }
    Ok(())
}

/// Passes a request to the upstream registry and its answer back.
async fn pass_through(peer: &Peer, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(405, "this mirror is read-only\n");
    }
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{path}", peer.upstream);
    let mut upstream = peer.http.request(request.method().clone(), &url);
    for name in &FORWARDED_REQUEST_HEADERS {
        for value in request.headers().get_all(name) {
            upstream = upstream.header(name, value.clone());
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(error) => {
            warn!(%url, %error, "upstream unreachable");
            return text(502, "upstream registry unreachable\n");
        }
    };
    let mut response = Response::new(empty());
    *response.status_mut() = answer.status();
    for (name, value) in answer.headers() {
        if !is_hop_by_hop(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    let frames = answer
        .bytes_stream()
        .map(|chunk| chunk.map(Frame::data).map_err(|e| Box::new(e) as BodyError));
    *response.body_mut() = BodyExt::boxed(StreamBody::new(frames));
    response
}

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blob_paths_with_sha256_digests_go_p2p() {
        let digest = format!("sha256:{}", "0".repeat(64));
        let ok = format!("/v2/library/debian/blobs/{digest}");
        assert_eq!(blob_path(&ok).map(|(r, _)| r), Some("library/debian"));
        for path in [
            format!("/v2/library/debian/manifests/{digest}"),
            format!("/v2/Library/blobs/{digest}"),
            format!("/v2/../x/blobs/{digest}"),
            format!("/v2//blobs/{digest}"),
            format!("/v2/a/blobs/sha512:{}", "0".repeat(128)),
            "/v2/a/blobs/uploads/".to_owned(),
        ] {
            assert!(blob_path(&path).is_none(), "{path}");
        }
    }
}
