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
    Client, DeadlineMode, Failure, Request, RequestBody, bad_response, expect_status,
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
/// registry holds.
struct UploadProgress {
    session: Url,
    offset: u64,
}

/// The bytes a registry holds, from `Range: 0-LAST`. Registries send `0-0`
/// for an empty upload as well as a 1-byte one; it is read as empty (a wrong
/// guess ends in the registry's digest check failing, never in bad data).
fn upload_range_offset(response: &Response) -> Option<u64> {
    let value = response.headers().get("range")?.to_str().ok()?;
    let last: u64 = value.trim().strip_prefix("0-")?.parse().ok()?;
    Some(if last == 0 { 0 } else { last + 1 })
}

/// `request` carrying `body`, `len` raw bytes.
fn octet_stream<'a>(request: Request<'a>, body: RequestBody<'a>, len: u64) -> Request<'a> {
    request
        .header(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM))
        .header(CONTENT_LENGTH, HeaderValue::from(len))
        .body(body)
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
            repository,
            digest,
            source,
            size,
            mount_from,
            scopes: &scopes,
        };
        self.retry_loop(&context, DeadlineMode::BetweenAttempts, || {
            self.push_blob_once(&push)
        })
        .await
    }

    async fn push_blob_once(&self, push: &BlobPush<'_>) -> Result<PushOutcome, Failure> {
        if let Some(present) = self
            .head_blob(push.repository, push.digest, push.scopes)
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
        if push.size <= self.config().upload_chunk_size {
            let body = RequestBody::Source {
                source: push.source,
                offset: 0,
                len: push.size,
            };
            self.finish_upload(push, session, body, push.size).await?;
        } else {
            let session = self.upload_chunks(push, session).await?;
            self.finish_upload(push, session, RequestBody::Empty, 0)
                .await?;
        }
        Ok(PushOutcome::Uploaded)
    }

    /// POSTs a new upload (with a mount attempt if asked). `None` means the
    /// mount succeeded; otherwise the session URL.
    async fn start_upload(&self, push: &BlobPush<'_>) -> Result<Option<Url>, Failure> {
        let mut url = self.repository_url(push.repository, "blobs/uploads/")?;
        if let Some(from) = push.mount_from {
            url.query_pairs_mut()
                .append_pair("mount", &push.digest.to_string())
                .append_pair("from", from.path());
        }
        let request = push.request(Method::POST, url);
        let response = self.execute(&request).await?;
        let accepted = [StatusCode::CREATED, StatusCode::ACCEPTED];
        let response = expect_status(response, &accepted).await?;
        if response.status() == StatusCode::CREATED && push.mount_from.is_some() {
            debug!(digest = %push.digest, "blob mounted from another repository");
            return Ok(None);
        }
        resolve_location(&request.url, &response).map(Some)
    }

    /// PATCHes the source in chunks; after a transient failure asks the
    /// registry how far it got and continues from there.
    async fn upload_chunks(&self, push: &BlobPush<'_>, session: Url) -> Result<Url, Failure> {
        let chunk_size = self.config().upload_chunk_size.max(1);
        let policy = &self.config().retry;
        let mut progress = UploadProgress { session, offset: 0 };
        let mut stalls = 0;
        while progress.offset < push.size {
            let end = (progress.offset + chunk_size).min(push.size);
            match self.patch_chunk(push, &progress, end).await {
                Ok(next) if next.offset > progress.offset && next.offset <= end => {
                    progress = next;
                    stalls = 0;
                }
                Ok(next) => {
                    let what = format!(
                        "upload offset went from {} to {} after sending up to {end}",
                        progress.offset, next.offset
                    );
                    return Err(Failure::at(&next.session, bad_response(what)));
                }
                Err(failure) if failure.kind.is_retryable() && stalls + 1 < policy.max_attempts => {
                    stalls += 1;
                    let backoff = policy.backoff(stalls);
                    warn!(digest = %push.digest, offset = progress.offset, error = %failure.kind, ?backoff, "chunk upload failed, resuming");
                    tokio::time::sleep(backoff).await;
                    // If even the status query fails, the whole push is retried.
                    progress = self
                        .upload_status(push, &progress.session)
                        .await
                        .map_err(|_| failure)?;
                }
                Err(failure) => return Err(failure),
            }
        }
        Ok(progress.session)
    }

    async fn patch_chunk(
        &self,
        push: &BlobPush<'_>,
        progress: &UploadProgress,
        end: u64,
    ) -> Result<UploadProgress, Failure> {
        let len = end - progress.offset;
        let content_range = format!("{}-{}", progress.offset, end - 1);
        let content_range = HeaderValue::try_from(content_range).map_err(|_| {
            Failure::without_url(ErrorKind::InvalidRequest("bad Content-Range".to_owned()))
        })?;
        let body = RequestBody::Source {
            source: push.source,
            offset: progress.offset,
            len,
        };
        let request = push.request(Method::PATCH, progress.session.clone());
        let request = octet_stream(request, body, len)
            .header(HeaderName::from_static("content-range"), content_range);
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::ACCEPTED]).await?;
        Ok(UploadProgress {
            session: resolve_location(&request.url, &response)
                .unwrap_or_else(|_| request.url.clone()),
            offset: upload_range_offset(&response).unwrap_or(end),
        })
    }

    async fn upload_status(
        &self,
        push: &BlobPush<'_>,
        session: &Url,
    ) -> Result<UploadProgress, Failure> {
        let request = push.request(Method::GET, session.clone());
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::NO_CONTENT, StatusCode::OK]).await?;
        Ok(UploadProgress {
            session: resolve_location(session, &response).unwrap_or_else(|_| session.clone()),
            offset: upload_range_offset(&response).unwrap_or(0),
        })
    }

    /// The closing PUT with `?digest=`, carrying `body` (the whole blob for
    /// a monolithic upload, nothing after chunks).
    async fn finish_upload(
        &self,
        push: &BlobPush<'_>,
        mut session: Url,
        body: RequestBody<'_>,
        len: u64,
    ) -> Result<(), Failure> {
        session
            .query_pairs_mut()
            .append_pair("digest", &push.digest.to_string());
        let request = octet_stream(push.request(Method::PUT, session), body, len);
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::CREATED]).await?;
        match header_digest(&response) {
            Some(stored) if stored != *push.digest => Err(Failure::at(
                &request.url,
                digest_mismatch(push.digest, &stored),
            )),
            _ => Ok(()),
        }
    }
}

/// Everything one blob push needs, passed down the steps.
struct BlobPush<'a> {
    repository: &'a Repository,
    digest: &'a Digest,
    source: &'a BlobSource,
    size: u64,
    mount_from: Option<&'a Repository>,
    scopes: &'a [Scope],
}

impl<'a> BlobPush<'a> {
    /// A bodiless request in this push's repository and scopes.
    fn request(&self, method: Method, url: Url) -> Request<'a> {
        Request::new(method, url, self.repository, self.scopes)
    }
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
}
