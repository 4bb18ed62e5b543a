//! Blob pushes: skip what the registry has, mount across repositories, then
//! upload in one PUT (small blobs) or PATCH chunks (large ones), streaming
//! from the source. A broken chunk resumes from the offset the registry
//! reports; the registry's digest check at the final PUT is the final word.

use std::io::SeekFrom;
use std::path::PathBuf;

use bytes::Bytes;
use darter_format::Digest;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tracing::{debug, warn};
use url::Url;

use crate::auth::Scope;
use crate::client::{
    Client, DeadlineMode, Failure, Request, RequestBody, RetryBudget, bad_response, expect_status,
    resolve_location,
};
use crate::error::{ErrorKind, OperationContext, RegistryError};
use crate::manifest::{digest_mismatch, header_digest};
use crate::reference::Repository;

/// Read buffer when streaming a file into a request.
const FILE_READ_CHUNK: usize = 256 << 10;
const OCTET_STREAM: &str = "application/octet-stream";

/// Where the bytes of a blob to push come from. Sources are re-readable from
/// any offset, so a failed upload resumes instead of starting over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobSource {
    /// A file, streamed (never read into memory whole).
    File(PathBuf),
    /// Bytes in memory (configs, small blobs).
    Bytes(Bytes),
}

impl BlobSource {
    /// The source's size in bytes.
    pub async fn size(&self) -> std::io::Result<u64> {
        match self {
            BlobSource::File(path) => Ok(tokio::fs::metadata(path).await?.len()),
            BlobSource::Bytes(bytes) => Ok(bytes.len() as u64),
        }
    }

    fn read_error(&self, error: std::io::Error) -> Failure {
        let path = match self {
            BlobSource::File(path) => path.clone(),
            BlobSource::Bytes(_) => PathBuf::from("<memory>"),
        };
        Failure::without_url(ErrorKind::Source { path, error })
    }

    /// `len` bytes from `offset` as a streaming request body.
    pub(crate) async fn body(&self, offset: u64, len: u64) -> Result<reqwest::Body, Failure> {
        match self {
            BlobSource::Bytes(bytes) => {
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(offset + len).ok())
                    .filter(|(_, end)| *end <= bytes.len());
                let (start, end) = range.ok_or_else(|| {
                    let kind = ErrorKind::InvalidRequest(format!(
                        "range {offset}+{len} outside a {}-byte buffer",
                        bytes.len()
                    ));
                    Failure::without_url(kind)
                })?;
                Ok(reqwest::Body::from(bytes.slice(start..end)))
            }
            BlobSource::File(path) => {
                let mut file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| self.read_error(e))?;
                file.seek(SeekFrom::Start(offset))
                    .await
                    .map_err(|e| self.read_error(e))?;
                let reader = file.take(len);
                let stream = tokio_util::io::ReaderStream::with_capacity(reader, FILE_READ_CHUNK);
                Ok(reqwest::Body::wrap_stream(stream))
            }
        }
    }
}

impl From<Bytes> for BlobSource {
    fn from(bytes: Bytes) -> BlobSource {
        BlobSource::Bytes(bytes)
    }
}

impl From<Vec<u8>> for BlobSource {
    fn from(bytes: Vec<u8>) -> BlobSource {
        BlobSource::Bytes(bytes.into())
    }
}

/// What [`Client::push_blob`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository already had the blob; nothing was sent.
    AlreadyPresent,
    /// The registry linked the blob from the `mount_from` repository.
    Mounted,
    /// The bytes were uploaded.
    Uploaded,
}

/// Where an upload session stands: its next URL and how many bytes the
/// registry acknowledged.
#[derive(Debug, Clone)]
pub(crate) struct UploadProgress {
    pub(crate) session: Url,
    pub(crate) offset: u64,
}

/// Bytes at hand for an upload: `source` holds blob bytes `start..end`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceWindow<'a> {
    pub(crate) source: &'a BlobSource,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl SourceWindow<'_> {
    /// Blob bytes `offset..end` as a request body.
    fn body(&self, offset: u64, end: u64) -> RequestBody<'_> {
        RequestBody::Source {
            source: self.source,
            offset: offset - self.start,
            len: end - offset,
        }
    }
}

/// The repository of an upload and the auth scopes its requests need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UploadTarget<'a> {
    pub(crate) repository: &'a Repository,
    pub(crate) scopes: &'a [Scope],
}

impl<'a> UploadTarget<'a> {
    /// A bodiless request in this upload's repository and scopes.
    pub(crate) fn request(&self, method: Method, url: Url) -> Request<'a> {
        Request::new(method, url, self.repository, self.scopes)
    }
}

/// The last byte index in an upload answer's `Range: 0-LAST`.
fn upload_range_last(response: &Response) -> Option<u64> {
    let value = response.headers().get("range")?.to_str().ok()?;
    value.trim().strip_prefix("0-")?.parse().ok()
}

/// The bytes a registry holds according to `Range: 0-LAST`. Registries send
/// `0-0` for an empty upload as well as a 1-byte one; `floor`, a count the
/// registry is known to hold at least, decides (a wrong guess ends in the
/// registry refusing the next chunk or the digest, never in bad data).
fn upload_range_offset(response: &Response, floor: u64) -> Option<u64> {
    upload_range_last(response).map(|last| if last == 0 { floor.min(1) } else { last + 1 })
}

/// `request` carrying `body`, `len` raw bytes.
fn octet_stream<'a>(request: Request<'a>, body: RequestBody<'a>, len: u64) -> Request<'a> {
    request
        .header(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM))
        .header(CONTENT_LENGTH, HeaderValue::from(len))
        .body(body)
}

/// `failure` of a session the registry no longer knows, which had
/// `acknowledged` bytes.
fn session_lost(failure: Failure, acknowledged: u64) -> Failure {
    let kind = ErrorKind::UploadSessionLost {
        acknowledged,
        cause: Box::new(failure.kind),
    };
    Failure {
        url: failure.url,
        kind,
    }
}

fn is_not_found(kind: &ErrorKind) -> bool {
    matches!(kind, ErrorKind::Status { status: 404, .. })
}

impl Client {
    /// Pushes a blob to `repository` unless it is already there: tries a
    /// cross-repository mount from `mount_from` (same registry only), then
    /// uploads from `source` (one PUT up to
    /// [`ClientConfig::upload_chunk_size`](crate::ClientConfig::upload_chunk_size),
    /// PATCH chunks above). Safe to re-run after an interruption: present
    /// blobs are skipped.
    pub async fn push_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        source: &BlobSource,
        mount_from: Option<&Repository>,
    ) -> Result<PushOutcome, RegistryError> {
        let context = OperationContext {
            operation: "push blob",
            repository: repository.to_string(),
            object: Some(digest.to_string()),
        };
        let size = source
            .size()
            .await
            .map_err(|e| source.read_error(e).into_error(&context, 1))?;
        let mount_from = mount_from
            .filter(|from| from.registry() == repository.registry() && *from != repository);
        let mut scopes = vec![Scope::push(repository)];
        scopes.extend(mount_from.map(Scope::pull));
        let push = BlobPush {
            target: UploadTarget {
                repository,
                scopes: &scopes,
            },
            digest,
            source,
            size,
            mount_from,
        };
        self.retry_loop(&context, DeadlineMode::BetweenAttempts, || {
            self.push_blob_once(&push)
        })
        .await
    }

    async fn push_blob_once(&self, push: &BlobPush<'_>) -> Result<PushOutcome, Failure> {
        let target = push.target;
        if let Some(present) = self
            .head_blob(target.repository, push.digest, target.scopes)
            .await?
        {
            if present != push.size {
                warn!(digest = %push.digest, present, local = push.size, "registry has the blob with another size than the local source");
            }
            return Ok(PushOutcome::AlreadyPresent);
        }
        let Some(session) = self.start_upload(push).await? else {
            return Ok(PushOutcome::Mounted);
        };
        let window = SourceWindow {
            source: push.source,
            start: 0,
            end: push.size,
        };
        if push.size <= self.config().upload_chunk_size {
            let body = window.body(0, push.size);
            self.finish_upload(target, session, push.digest, body, push.size)
                .await?;
        } else {
            let mut progress = UploadProgress { session, offset: 0 };
            let mut budget = RetryBudget::new(&self.config().retry);
            // A lost session fails this attempt; the retry starts a new one.
            self.upload_window(target, &mut progress, window, &mut budget)
                .await?;
            let (session, body) = (progress.session, RequestBody::Empty);
            self.finish_upload(target, session, push.digest, body, 0)
                .await?;
        }
        Ok(PushOutcome::Uploaded)
    }

    /// Starts the upload, with a mount attempt if asked. `None` means the
    /// mount succeeded; otherwise the session URL.
    async fn start_upload(&self, push: &BlobPush<'_>) -> Result<Option<Url>, Failure> {
        match push.mount_from {
            Some(from) => self.try_mount(push.target, push.digest, from).await,
            None => self.open_upload_session(push.target).await.map(Some),
        }
    }

    /// POSTs a cross-repository mount of `digest` from `from`. `None` means
    /// it was mounted; otherwise the registry opened an upload session
    /// instead, whose URL is returned.
    async fn try_mount(
        &self,
        target: UploadTarget<'_>,
        digest: &Digest,
        from: &Repository,
    ) -> Result<Option<Url>, Failure> {
        let mut url = self.repository_url(target.repository, "blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from.path());
        let request = target.request(Method::POST, url);
        let response = self.execute(&request).await?;
        let accepted = [StatusCode::CREATED, StatusCode::ACCEPTED];
        let response = expect_status(response, &accepted).await?;
        if response.status() == StatusCode::CREATED {
            debug!(%digest, %from, "blob mounted from another repository");
            return Ok(None);
        }
        resolve_location(&request.url, &response).map(Some)
    }

    /// Links blob `digest` from repository `from` of the same registry into
    /// `repository` without transferring it. Returns false when the
    /// registry would not (the blob is not in `from`, or `from` is on
    /// another registry); the caller then uploads it. Needs push on
    /// `repository` and pull on `from`.
    pub async fn mount_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        from: &Repository,
    ) -> Result<bool, RegistryError> {
        if from.registry() != repository.registry() || from == repository {
            return Ok(false);
        }
        let scopes = [Scope::push(repository), Scope::pull(from)];
        let target = UploadTarget {
            repository,
            scopes: &scopes,
        };
        let context = OperationContext {
            operation: "mount blob",
            repository: repository.to_string(),
            object: Some(digest.to_string()),
        };
        let session = self
            .retry_loop(&context, DeadlineMode::BetweenAttempts, || {
                self.try_mount(target, digest, from)
            })
            .await?;
        let Some(session) = session else {
            return Ok(true);
        };
        // The registry opened an upload session instead; close it.
        let request = target.request(Method::DELETE, session);
        if let Err(failure) = self.execute(&request).await {
            debug!(error = %failure.kind, "cannot close the upload session a refused mount opened");
        }
        Ok(false)
    }

    /// POSTs a new upload session; its URL.
    pub(crate) async fn open_upload_session(
        &self,
        target: UploadTarget<'_>,
    ) -> Result<Url, Failure> {
        let url = self.repository_url(target.repository, "blobs/uploads/")?;
        let request = target.request(Method::POST, url);
        let response = self.execute(&request).await?;
        let accepted = [StatusCode::ACCEPTED, StatusCode::CREATED];
        let response = expect_status(response, &accepted).await?;
        resolve_location(&request.url, &response)
    }

    /// PATCHes blob bytes `progress.offset..window.end` in chunks of at most
    /// `upload_chunk_size`, keeping `progress` current. After a transient
    /// failure it backs off, asks the registry how far it got and goes on
    /// from there, within `budget`. A session the registry has dropped is
    /// [`ErrorKind::UploadSessionLost`].
    pub(crate) async fn upload_window(
        &self,
        target: UploadTarget<'_>,
        progress: &mut UploadProgress,
        window: SourceWindow<'_>,
        budget: &mut RetryBudget<'_>,
    ) -> Result<(), Failure> {
        let chunk_size = self.config().upload_chunk_size.max(1);
        let mut resuming = false;
        loop {
            let step = if resuming {
                self.upload_status(target, progress, window).await
            } else if progress.offset < window.end {
                let end = (progress.offset + chunk_size).min(window.end);
                self.patch_chunk(target, progress, window, end).await
            } else {
                return Ok(());
            };
            let failure = match step {
                Ok(next) => {
                    if !resuming {
                        budget.progressed();
                    }
                    *progress = next;
                    resuming = false;
                    continue;
                }
                Err(failure) => failure,
            };
            let gone = (resuming && !failure.kind.is_retryable()) || is_not_found(&failure.kind);
            if gone {
                return Err(session_lost(failure, progress.offset));
            }
            let Some(backoff) = budget.retry_after(&failure.kind) else {
                return Err(failure);
            };
            warn!(repository = %target.repository, offset = progress.offset, error = %failure.kind, ?backoff, "blob upload failed, resuming");
            tokio::time::sleep(backoff).await;
            resuming = true;
        }
    }

    /// Sends blob bytes `progress.offset..end`; the registry must take some
    /// and no more.
    async fn patch_chunk(
        &self,
        target: UploadTarget<'_>,
        progress: &UploadProgress,
        window: SourceWindow<'_>,
        end: u64,
    ) -> Result<UploadProgress, Failure> {
        let content_range = format!("{}-{}", progress.offset, end - 1);
        let content_range = HeaderValue::try_from(content_range).map_err(|_| {
            Failure::without_url(ErrorKind::InvalidRequest("bad Content-Range".to_owned()))
        })?;
        let body = window.body(progress.offset, end);
        let request = target.request(Method::PATCH, progress.session.clone());
        let request = octet_stream(request, body, end - progress.offset)
            .header(HeaderName::from_static("content-range"), content_range);
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::ACCEPTED]).await?;
        // An accepted chunk leaves the registry with at least one byte.
        let offset = upload_range_offset(&response, end).unwrap_or(end);
        if offset <= progress.offset || offset > end {
            let what = format!(
                "upload offset went from {} to {offset} after sending up to {end}",
                progress.offset
            );
            return Err(Failure::at(&request.url, bad_response(what)));
        }
        Ok(UploadProgress {
            session: resolve_location(&request.url, &response)
                .unwrap_or_else(|_| request.url.clone()),
            offset,
        })
    }

    /// Asks how many bytes the registry holds; they must lie in `window`,
    /// the bytes that can still be sent.
    async fn upload_status(
        &self,
        target: UploadTarget<'_>,
        progress: &UploadProgress,
        window: SourceWindow<'_>,
    ) -> Result<UploadProgress, Failure> {
        let status = self.session_status(target, progress).await?;
        if !(window.start..=window.end).contains(&status.offset) {
            let what = format!(
                "registry holds {} bytes of the upload, outside the {}..={} still at hand",
                status.offset, window.start, window.end
            );
            return Err(Failure::at(&progress.session, bad_response(what)));
        }
        Ok(status)
    }

    /// Asks how many bytes the registry holds of the upload session
    /// (`progress.offset` is a count it is known to hold at least).
    pub(crate) async fn session_status(
        &self,
        target: UploadTarget<'_>,
        progress: &UploadProgress,
    ) -> Result<UploadProgress, Failure> {
        let session = &progress.session;
        let request = target.request(Method::GET, session.clone());
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::NO_CONTENT, StatusCode::OK]).await?;
        let offset = upload_range_offset(&response, progress.offset).unwrap_or(0);
        Ok(UploadProgress {
            session: resolve_location(session, &response).unwrap_or_else(|_| session.clone()),
            offset,
        })
    }

    /// The closing PUT with `?digest=`, carrying `body` (the whole blob for
    /// a monolithic upload, nothing after chunks).
    pub(crate) async fn finish_upload(
        &self,
        target: UploadTarget<'_>,
        mut session: Url,
        digest: &Digest,
        body: RequestBody<'_>,
        len: u64,
    ) -> Result<(), Failure> {
        session
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let request = octet_stream(target.request(Method::PUT, session), body, len);
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::CREATED]).await?;
        match header_digest(&response) {
            Some(stored) if stored != *digest => {
                Err(Failure::at(&request.url, digest_mismatch(digest, &stored)))
            }
            _ => Ok(()),
        }
    }
}

/// Everything one blob push needs, passed down the steps.
struct BlobPush<'a> {
    target: UploadTarget<'a>,
    digest: &'a Digest,
    source: &'a BlobSource,
    size: u64,
    mount_from: Option<&'a Repository>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_report_size_and_failures_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(BlobSource::File(path).size().await.unwrap(), 5);
        assert_eq!(BlobSource::from(b"abc".to_vec()).size().await.unwrap(), 3);
        let missing = BlobSource::File(dir.path().join("missing"));
        let err = missing.body(0, 1).await.unwrap_err();
        assert!(err.kind.to_string().contains("missing"), "{}", err.kind);
        let short = BlobSource::from(b"abc".to_vec());
        assert!(short.body(2, 2).await.is_err());
        assert!(short.body(1, 2).await.is_ok());
    }

    fn answer_with_range(range: Option<&str>) -> Response {
        let mut answer = hyper::Response::builder().status(202);
        if let Some(range) = range {
            answer = answer.header("range", range);
        }
        Response::from(answer.body(Vec::new()).unwrap())
    }

    #[test]
    fn upload_ranges_read_as_byte_counts() {
        // (Range header, bytes known to be held, bytes read)
        let cases = [
            (Some("0-99"), 0, Some(100)),
            (Some(" 0-4095 "), 7, Some(4096)),
            // 0-0 is both "empty" and "one byte": the floor decides.
            (Some("0-0"), 0, Some(0)),
            (Some("0-0"), 1, Some(1)),
            (Some("0-0"), 5000, Some(1)),
            (Some("bytes=0-9"), 0, None),
            (Some("5-9"), 0, None),
            (Some("0-x"), 0, None),
            (None, 0, None),
        ];
        for (range, floor, want) in cases {
            let answer = answer_with_range(range);
            assert_eq!(
                upload_range_offset(&answer, floor),
                want,
                "{range:?} {floor}"
            );
        }
    }
}
