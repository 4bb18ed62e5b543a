//! Blob reads: existence and size (HEAD), verified streaming GET that
//! resumes with `Range` after transient failures, and exact byte-range GETs.

use std::ops::{Range, RangeFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use darter_format::Digest;
use darter_format::digest::Hasher;
use futures_util::{Stream, StreamExt as _};
use reqwest::header::{HeaderValue, RANGE};
use reqwest::{Method, Response, StatusCode};
use tokio::io::AsyncRead;
use tracing::warn;
use url::Url;

use crate::auth::Scope;
use crate::client::{Client, Failure, Request, bad_response, header_u64, status_failure};
use crate::error::{ErrorKind, OperationContext, RegistryError};
use crate::manifest::digest_mismatch;
use crate::reference::Repository;

/// Most memory reserved for a range read before its bytes arrive.
const INITIAL_RANGE_BUFFER: u64 = 4 << 20;

/// A byte range of a blob, as HTTP `Range` can express it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRange {
    /// Bytes `start..end` (end exclusive).
    Bounded {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// From `start` to the end of the blob.
    From(u64),
    /// The last `n` bytes (all of a shorter blob).
    Suffix(u64),
}

impl From<Range<u64>> for BlobRange {
    fn from(range: Range<u64>) -> BlobRange {
        BlobRange::Bounded {
            start: range.start,
            end: range.end,
        }
    }
}

impl From<RangeFrom<u64>> for BlobRange {
    fn from(range: RangeFrom<u64>) -> BlobRange {
        BlobRange::From(range.start)
    }
}

impl BlobRange {
    /// The `Range` header value, or why the range is empty.
    fn header(&self) -> Result<String, String> {
        match *self {
            BlobRange::Bounded { start, end } if start < end => {
                Ok(format!("bytes={start}-{}", end - 1))
            }
            BlobRange::Bounded { start, end } => Err(format!("empty range {start}..{end}")),
            BlobRange::From(start) => Ok(format!("bytes={start}-")),
            BlobRange::Suffix(0) => Err("empty suffix range".to_owned()),
            BlobRange::Suffix(len) => Ok(format!("bytes=-{len}")),
        }
    }

    /// The offsets `start..end` this range covers in a blob of `size` bytes,
    /// or `None` if it starts past the end.
    fn resolve(&self, size: u64) -> Option<(u64, u64)> {
        let (start, end) = match *self {
            BlobRange::Bounded { start, end } => (start, end.min(size)),
            BlobRange::From(start) => (start, size),
            BlobRange::Suffix(len) => (size.saturating_sub(len), size),
        };
        (start < end).then_some((start, end))
    }
}

/// Bytes read from a blob by [`Client::get_blob_range`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSlice {
    /// Offset of `data` in the blob.
    pub offset: u64,
    /// The blob's total size, when the registry said.
    pub blob_size: Option<u64>,
    /// The bytes.
    pub data: Bytes,
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    end_inclusive: u64,
    total: Option<u64>,
}

fn parse_content_range(value: &str) -> Option<ContentRange> {
    let spec = value.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        digits => Some(digits.parse().ok()?),
    };
    let parsed = ContentRange {
        start: start.parse().ok()?,
        end_inclusive: end.parse().ok()?,
        total,
    };
    let sane = parsed.start <= parsed.end_inclusive
        && parsed
            .total
            .is_none_or(|total| parsed.end_inclusive < total);
    sane.then_some(parsed)
}

/// The blob size in a 416's `Content-Range: bytes */SIZE`.
fn unsatisfied_range_size(response: &Response) -> Option<u64> {
    let value = response.headers().get("content-range")?.to_str().ok()?;
    value.trim().strip_prefix("bytes */")?.parse().ok()
}

fn content_range(response: &Response) -> Option<ContentRange> {
    parse_content_range(response.headers().get("content-range")?.to_str().ok()?)
}

/// The body's bytes `skip..skip + len`. Stops reading once it has them; with
/// `must_end`, more bytes after them are a protocol error.
async fn read_exact_range(
    response: Response,
    skip: u64,
    len: u64,
    must_end: bool,
) -> Result<Bytes, ErrorKind> {
    // The length may come from the server: let memory follow the bytes
    // that actually arrive instead of trusting it up front.
    let mut data = BytesMut::with_capacity(len.min(INITIAL_RANGE_BUFFER) as usize);
    let mut to_skip = skip;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|e| ErrorKind::transport("reading blob", e))?;
        let skipped = to_skip.min(chunk.len() as u64);
        to_skip -= skipped;
        let _ = chunk.split_to(skipped as usize);
        let wanted = (len - data.len() as u64).min(chunk.len() as u64) as usize;
        if must_end && wanted < chunk.len() {
            return Err(bad_response("body is longer than its Content-Range"));
        }
        data.extend_from_slice(&chunk[..wanted]);
        if data.len() as u64 == len && !must_end {
            return Ok(data.freeze());
        }
    }
    if data.len() as u64 != len {
        return Err(ErrorKind::Truncated {
            expected: skip + len,
            received: skip - to_skip + data.len() as u64,
        });
    }
    Ok(data.freeze())
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A blob being streamed: yields its bytes in order, resuming with `Range`
/// after transient failures, and ends with an error instead of `None` if the
/// bytes do not hash to the blob's digest. Never buffers the whole blob.
pub struct BlobStream {
    size: Option<u64>,
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStream")
            .field("size", &self.size)
            .finish()
    }
}

impl BlobStream {
    /// The blob size the registry announced, if it did.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The stream as an [`AsyncRead`] (e.g. for a gzip+tar decoder); errors
    /// become `io::Error`s wrapping the [`RegistryError`].
    pub fn into_reader(self) -> impl AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.map(|item| item.map_err(std::io::Error::other)))
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// An open GET of a blob from some offset.
struct OpenBody {
    body: ByteStream,
    /// Bytes to drop first (the registry ignored `Range` and sent it all).
    skip: u64,
    size: Option<u64>,
}

/// State of a [`BlobStream`] between chunks.
struct StreamState {
    client: Client,
    repository: Repository,
    digest: Digest,
    context: OperationContext,
    open: Option<OpenBody>,
    offset: u64,
    size: Option<u64>,
    hasher: Hasher,
    failures_without_progress: u32,
    finished: bool,
}

impl StreamState {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, RegistryError>> {
        if self.finished {
            return None;
        }
        let result = self.next_chunk_or_failure().await;
        match result {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(error) => {
                self.finished = true;
                Some(Err(error))
            }
        }
    }

    async fn next_chunk_or_failure(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            let open = match &mut self.open {
                Some(open) => open,
                None => {
                    let (client, offset) = (self.client.clone(), self.offset);
                    let (repository, digest) = (&self.repository, &self.digest);
                    let reopened = client
                        .with_retries(&self.context, || {
                            client.open_blob(repository, digest, offset)
                        })
                        .await?;
                    self.open.insert(reopened)
                }
            };
            let kind = match open.body.next().await {
                Some(Ok(mut chunk)) => {
                    let skipped = open.skip.min(chunk.len() as u64);
                    open.skip -= skipped;
                    let _ = chunk.split_to(skipped as usize);
                    if chunk.is_empty() {
                        continue;
                    }
                    let end = self.offset + chunk.len() as u64;
                    if self.size.is_some_and(|size| end > size) {
                        return Err(self.fail(bad_response("blob body longer than its size")));
                    }
                    self.hasher.update(&chunk);
                    self.offset = end;
                    self.failures_without_progress = 0;
                    return Ok(Some(chunk));
                }
                Some(Err(error)) => ErrorKind::transport("reading blob", error),
                None => match self.size {
                    Some(size) if self.offset < size => ErrorKind::Truncated {
                        expected: size,
                        received: self.offset,
                    },
                    _ => return self.verify().map(|()| None),
                },
            };
            self.prepare_resume(kind).await?;
        }
    }

    /// Drops the broken connection and waits before reopening at the current
    /// offset, unless the failure is permanent or keeps repeating.
    async fn prepare_resume(&mut self, kind: ErrorKind) -> Result<(), RegistryError> {
        self.open = None;
        self.failures_without_progress += 1;
        let policy = &self.client.config().retry;
        if !kind.is_retryable() || self.failures_without_progress >= policy.max_attempts {
            let attempts = self.failures_without_progress;
            return Err(self.fail(kind).with_attempts(attempts));
        }
        let backoff = policy.backoff(self.failures_without_progress);
        warn!(context = %self.context, offset = self.offset, error = %kind, ?backoff, "blob stream broke, resuming");
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    fn verify(&mut self) -> Result<(), RegistryError> {
        let hasher = std::mem::replace(&mut self.hasher, Hasher::new(self.digest.algo()));
        let actual = hasher.finish();
        if actual == self.digest {
            Ok(())
        } else {
            Err(self.fail(digest_mismatch(&self.digest, &actual)))
        }
    }

    fn fail(&self, kind: ErrorKind) -> RegistryError {
        RegistryError::new(self.context.clone(), None, kind)
    }
}

impl Client {
    fn blob_context(
        operation: &'static str,
        repository: &Repository,
        digest: &Digest,
    ) -> OperationContext {
        OperationContext {
            operation,
            repository: repository.to_string(),
            object: Some(digest.to_string()),
        }
    }

    fn blob_request<'a>(
        &self,
        method: Method,
        repository: &'a Repository,
        digest: &Digest,
        scopes: &'a [Scope],
        range: Option<&str>,
    ) -> Result<Request<'a>, Failure> {
        let url = self.repository_url(repository, &format!("blobs/{digest}"))?;
        let request = Request::new(method, url.clone(), repository, scopes);
        match range {
            Some(range) => {
                let value = HeaderValue::try_from(range)
                    .map_err(|_| Failure::at(&url, ErrorKind::InvalidRequest(range.to_owned())))?;
                Ok(request.header(RANGE, value))
            }
            None => Ok(request),
        }
    }

    /// The blob's size if `repository` has it, `None` if not (HEAD).
    pub async fn blob_size(
        &self,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let context = Client::blob_context("check blob", repository, digest);
        let scopes = [Scope::pull(repository)];
        self.with_retries(&context, || self.head_blob(repository, digest, &scopes))
            .await
    }

    /// HEAD of a blob with the given scopes (push checks reuse their token).
    pub(crate) async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        scopes: &[Scope],
    ) -> Result<Option<u64>, Failure> {
        let request = self.blob_request(Method::HEAD, repository, digest, scopes, None)?;
        let response = self.execute(&request).await?;
        match response.status() {
            StatusCode::OK => {
                let size = header_u64(&response, "content-length").ok_or_else(|| {
                    Failure::at(
                        &request.url,
                        bad_response("HEAD answer has no Content-Length"),
                    )
                })?;
                Ok(Some(size))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_failure(response).await),
        }
    }

    /// Streams a blob (see [`BlobStream`]): verified against `digest` at the
    /// end, resumed from the current offset after transient failures.
    pub async fn get_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
    ) -> Result<BlobStream, RegistryError> {
        let context = Client::blob_context("get blob", repository, digest);
        let open = self
            .with_retries(&context, || self.open_blob(repository, digest, 0))
            .await?;
        let size = open.size;
        let state = StreamState {
            client: self.clone(),
            repository: repository.clone(),
            digest: *digest,
            context,
            open: Some(open),
            offset: 0,
            size,
            hasher: Hasher::new(digest.algo()),
            failures_without_progress: 0,
            finished: false,
        };
        let inner = futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next_chunk().await?;
            Some((item, state))
        });
        Ok(BlobStream {
            size,
            inner: Box::pin(inner),
        })
    }

    /// GETs a blob from `offset` (with `Range` unless 0).
    async fn open_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<OpenBody, Failure> {
        let scopes = [Scope::pull(repository)];
        let range = (offset > 0).then(|| format!("bytes={offset}-"));
        let request =
            self.blob_request(Method::GET, repository, digest, &scopes, range.as_deref())?;
        let response = self.execute(&request).await?;
        let url = response.url().clone();
        let (skip, size) = match response.status() {
            StatusCode::OK => (offset, response.content_length()),
            StatusCode::PARTIAL_CONTENT => {
                let range = content_range(&response)
                    .filter(|r| r.start == offset)
                    .ok_or_else(|| Failure::at(&url, bad_response("wrong Content-Range")))?;
                (0, range.total)
            }
            _ => return Err(status_failure(response).await),
        };
        Ok(OpenBody {
            body: Box::pin(response.bytes_stream()),
            skip,
            size,
        })
    }

    /// Reads `range` of a blob into memory (for chunk-sized reads; stream
    /// large reads with [`Client::get_blob`]). The answer must cover exactly
    /// the requested bytes: a range reaching past the end of the blob is
    /// [`ErrorKind::RangeNotSatisfiable`], a short body is retried. A
    /// registry that ignores `Range` is handled by skipping to the range and
    /// closing the connection after it.
    pub async fn get_blob_range(
        &self,
        repository: &Repository,
        digest: &Digest,
        range: impl Into<BlobRange>,
    ) -> Result<BlobSlice, RegistryError> {
        let range = range.into();
        let context = Client::blob_context("read blob range", repository, digest);
        let header = range.header().map_err(|what| {
            RegistryError::new(context.clone(), None, ErrorKind::InvalidRequest(what))
        })?;
        self.with_retries(&context, || {
            self.get_blob_range_once(repository, digest, range, &header)
        })
        .await
    }

    async fn get_blob_range_once(
        &self,
        repository: &Repository,
        digest: &Digest,
        range: BlobRange,
        header: &str,
    ) -> Result<BlobSlice, Failure> {
        let scopes = [Scope::pull(repository)];
        let request = self.blob_request(Method::GET, repository, digest, &scopes, Some(header))?;
        let response = self.execute(&request).await?;
        let url = response.url().clone();
        let unsatisfiable = |blob_size| {
            Failure::at(
                &url,
                ErrorKind::RangeNotSatisfiable {
                    requested: header.to_owned(),
                    blob_size,
                },
            )
        };
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                read_partial(&url, response, range, header, unsatisfiable).await
            }
            StatusCode::OK => read_from_full_body(&url, response, range, unsatisfiable).await,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                Err(unsatisfiable(unsatisfied_range_size(&response)))
            }
            _ => Err(status_failure(response).await),
        }
    }
}

/// A 206 answer: its Content-Range must be exactly what was asked for.
async fn read_partial(
    url: &Url,
    response: Response,
    range: BlobRange,
    header: &str,
    unsatisfiable: impl Fn(Option<u64>) -> Failure,
) -> Result<BlobSlice, Failure> {
    let served = content_range(&response)
        .ok_or_else(|| Failure::at(url, bad_response("206 without a valid Content-Range")))?;
    let wanted = match (range, served.total) {
        (BlobRange::Bounded { start, end }, _) => Some((start, end)),
        (_, Some(total)) => range.resolve(total),
        (BlobRange::From(start), None) => Some((start, served.end_inclusive + 1)),
        (BlobRange::Suffix(_), None) => {
            return Err(Failure::at(
                url,
                bad_response("suffix range answered without blob size"),
            ));
        }
    };
    let (start, end) = wanted.ok_or_else(|| {
        Failure::at(
            url,
            bad_response("206 for a range that starts past the end"),
        )
    })?;
    let served_span = (served.start, served.end_inclusive + 1);
    if served_span != (start, end) {
        let clipped_at_end = served
            .total
            .is_some_and(|total| served_span == (start, total) && end > total);
        if clipped_at_end {
            return Err(unsatisfiable(served.total));
        }
        return Err(Failure::at(
            url,
            bad_response(format!(
                "asked for {header}, got bytes {}-{}",
                served.start, served.end_inclusive
            )),
        ));
    }
    let len = served_span.1 - served_span.0;
    if response
        .content_length()
        .is_some_and(|announced| announced != len)
    {
        return Err(Failure::at(
            url,
            bad_response("Content-Length disagrees with Content-Range"),
        ));
    }
    let data = read_exact_range(response, 0, len, true)
        .await
        .map_err(|kind| Failure::at(url, kind))?;
    Ok(BlobSlice {
        offset: served.start,
        blob_size: served.total,
        data,
    })
}

/// A 200 answer to a range request: the registry sent the whole blob.
async fn read_from_full_body(
    url: &Url,
    response: Response,
    range: BlobRange,
    unsatisfiable: impl Fn(Option<u64>) -> Failure,
) -> Result<BlobSlice, Failure> {
    let size = response.content_length().ok_or_else(|| {
        Failure::at(
            url,
            bad_response("registry ignored Range and sent no Content-Length"),
        )
    })?;
    warn!(url = %crate::error::redact_url(url), "registry ignored Range; reading past the skipped bytes");
    let (start, end) = range
        .resolve(size)
        .ok_or_else(|| unsatisfiable(Some(size)))?;
    if matches!(range, BlobRange::Bounded { end: wanted_end, .. } if wanted_end > size) {
        return Err(unsatisfiable(Some(size)));
    }
    let data = read_exact_range(response, start, end - start, false)
        .await
        .map_err(|kind| Failure::at(url, kind))?;
    Ok(BlobSlice {
        offset: start,
        blob_size: Some(size),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers() {
        let cases = [
            (BlobRange::from(0..1), Ok("bytes=0-0")),
            (BlobRange::from(10..20), Ok("bytes=10-19")),
            (BlobRange::from(5..), Ok("bytes=5-")),
            (BlobRange::Suffix(7), Ok("bytes=-7")),
            (BlobRange::from(3..3), Err(())),
            (BlobRange::Bounded { start: 4, end: 2 }, Err(())),
            (BlobRange::Suffix(0), Err(())),
        ];
        for (range, want) in cases {
            assert_eq!(
                range.header().map_err(|_| ()),
                want.map(str::to_owned),
                "{range:?}"
            );
        }
    }

    #[test]
    fn range_resolution_against_a_size() {
        let cases = [
            (BlobRange::from(0..10), 100, Some((0, 10))),
            (BlobRange::from(90..110), 100, Some((90, 100))),
            (BlobRange::from(100..110), 100, None),
            (BlobRange::from(99..), 100, Some((99, 100))),
            (BlobRange::from(100..), 100, None),
            (BlobRange::Suffix(10), 100, Some((90, 100))),
            (BlobRange::Suffix(1000), 100, Some((0, 100))),
            (BlobRange::Suffix(1), 0, None),
        ];
        for (range, size, want) in cases {
            assert_eq!(range.resolve(size), want, "{range:?} of {size}");
        }
    }

    #[test]
    fn content_range_parsing() {
        let ok = |start, end_inclusive, total| {
            Some(ContentRange {
                start,
                end_inclusive,
                total,
            })
        };
        let cases = [
            ("bytes 0-9/100", ok(0, 9, Some(100))),
            ("bytes 5-5/*", ok(5, 5, None)),
            (" bytes 90-99/100 ", ok(90, 99, Some(100))),
            ("bytes 9-0/100", None),
            ("bytes 0-100/100", None),
            ("bytes */100", None),
            ("items 0-9/100", None),
            ("bytes 0-x/100", None),
            ("bytes 0-9", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_content_range(text), want, "{text:?}");
        }
    }
}
