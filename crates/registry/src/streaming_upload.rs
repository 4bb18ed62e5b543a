//! [`StreamingUpload`]: pushing a blob while it is being produced, when
//! neither its size nor its digest is known up front (e.g. a layer being
//! converted). Each append is sent in PATCH chunks right away, resuming
//! after transient failures like chunked pushes do; the closing PUT names
//! the digest and the registry checks it. Only the bytes of the current
//! append are held. An [`UploadCheckpoint`] lets another process pick the
//! session up where it stood.

use bytes::Bytes;
use darter_format::Digest;
use reqwest::{Method, StatusCode};
use tracing::{debug, warn};
use url::Url;

use crate::auth::Scope;
use crate::client::{Client, DeadlineMode, Failure, RequestBody, RetryBudget};
use crate::error::{ErrorKind, OperationContext, RegistryError, redact_url};
use crate::reference::Repository;
use crate::upload::{BlobSource, PushOutcome, SourceWindow, UploadProgress, UploadTarget};

/// A blob upload in progress, started by
/// [`Client::begin_streaming_upload`]. Appended bytes go to the registry
/// in PATCH requests as they come; [`StreamingUpload::finish`] completes the
/// blob, [`StreamingUpload::cancel`] abandons it. Dropping it without either
/// leaves the session to the registry's purge of stale uploads.
///
/// ```no_run
/// # async fn demo(
/// #     client: darter_registry::Client,
/// #     repository: darter_registry::Repository,
/// #     pieces: Vec<bytes::Bytes>,
/// #     digest_at_the_end: darter_registry::Digest,
/// # ) -> Result<(), darter_registry::RegistryError> {
/// let mut upload = client.begin_streaming_upload(&repository).await?;
/// for piece in pieces {
///     upload.append(piece).await?;
/// }
/// upload.finish(&digest_at_the_end).await?;
/// # Ok(()) }
/// ```
pub struct StreamingUpload {
    client: Client,
    repository: Repository,
    scopes: [Scope; 1],
    progress: UploadProgress,
    /// Set when an append failed: the registry may lack bytes the caller
    /// has already handed over, so the blob cannot be completed.
    broken: bool,
}

impl std::fmt::Debug for StreamingUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingUpload")
            .field("repository", &self.repository)
            .field("session", &redact_url(&self.progress.session))
            .field("uploaded", &self.progress.offset)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Where a [`StreamingUpload`] stood: its session URL and the bytes the
/// registry had acknowledged. Kept (say, in a file) so that a later process
/// can go on with [`Client::resume_streaming_upload`]. The URL may carry
/// signed state or credentials in its query: `Debug` shows it redacted, and
/// it belongs only where the user's credentials could be stored.
#[derive(Clone, PartialEq, Eq)]
pub struct UploadCheckpoint {
    session: Url,
    uploaded: u64,
}

impl UploadCheckpoint {
    /// A checkpoint read back from storage; `None` unless `session_url` is
    /// an absolute http(s) URL. Whether it belongs to the repository is
    /// checked when it is resumed.
    pub fn from_parts(session_url: &str, uploaded: u64) -> Option<UploadCheckpoint> {
        let session = Url::parse(session_url).ok()?;
        matches!(session.scheme(), "http" | "https")
            .then_some(UploadCheckpoint { session, uploaded })
    }

    /// The session URL, to store.
    pub fn session_url(&self) -> &str {
        self.session.as_str()
    }

    /// Bytes the registry had acknowledged.
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }
}

impl std::fmt::Debug for UploadCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadCheckpoint")
            .field("session", &redact_url(&self.session))
            .field("uploaded", &self.uploaded)
            .finish()
    }
}

impl Client {
    /// Starts an upload session in `repository` for a blob of unknown size
    /// and digest (needs push access).
    pub async fn begin_streaming_upload(
        &self,
        repository: &Repository,
    ) -> Result<StreamingUpload, RegistryError> {
        let scopes = [Scope::push(repository)];
        let context = upload_context("start blob upload", repository, None);
        let target = UploadTarget {
            repository,
            scopes: &scopes,
        };
        let session = self
            .with_retries(&context, || self.open_upload_session(target))
            .await?;
        debug!(%repository, session = %redact_url(&session), "streaming blob upload started");
        Ok(self.streaming_upload(repository, scopes, UploadProgress { session, offset: 0 }))
    }

    /// Goes on with the upload `checkpoint` describes (one a process that
    /// died left behind, say): asks the registry how many bytes the session
    /// holds, which [`StreamingUpload::uploaded`] then tells; the next
    /// append continues from there. `Ok(None)` if the registry no longer
    /// knows the session (404: finished, cancelled or purged). A session
    /// URL outside `repository`'s uploads on this client's registry is
    /// refused without a request: it came from storage, and requests must
    /// not go elsewhere.
    pub async fn resume_streaming_upload(
        &self,
        repository: &Repository,
        checkpoint: &UploadCheckpoint,
    ) -> Result<Option<StreamingUpload>, RegistryError> {
        let context = upload_context("resume blob upload", repository, None);
        let session = &checkpoint.session;
        let uploads = self
            .repository_url(repository, "blobs/uploads/")
            .map_err(|failure| failure.into_error(&context, 1))?;
        if session.origin() != uploads.origin() || !session.path().starts_with(uploads.path()) {
            let why = format!("the upload session is not one of {}", redact_url(&uploads));
            let kind = ErrorKind::InvalidRequest(why);
            return Err(RegistryError::new(context, Some(redact_url(session)), kind));
        }
        let scopes = [Scope::push(repository)];
        let target = UploadTarget {
            repository,
            scopes: &scopes,
        };
        let stored = UploadProgress {
            session: session.clone(),
            offset: checkpoint.uploaded,
        };
        let status = self
            .with_retries(&context, || self.session_status(target, &stored))
            .await;
        let progress = match status {
            Ok(progress) => progress,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        debug!(%repository, session = %redact_url(&progress.session), uploaded = progress.offset, "streaming blob upload resumed");
        Ok(Some(self.streaming_upload(repository, scopes, progress)))
    }

    fn streaming_upload(
        &self,
        repository: &Repository,
        scopes: [Scope; 1],
        progress: UploadProgress,
    ) -> StreamingUpload {
        StreamingUpload {
            client: self.clone(),
            repository: repository.clone(),
            scopes,
            progress,
            broken: false,
        }
    }
}

impl StreamingUpload {
    /// Sends `data` as the next bytes of the blob, in PATCH requests of at
    /// most [`ClientConfig::upload_chunk_size`](crate::ClientConfig::upload_chunk_size).
    /// A transient failure is retried with backoff, resuming from the offset
    /// the registry reports, while the [`RetryPolicy`](crate::RetryPolicy)
    /// allows (its attempts and deadline count from the last chunk stored);
    /// `data` is kept until the registry acknowledged all of it. After a
    /// failure the upload can only be cancelled.
    pub async fn append(&mut self, data: Bytes) -> Result<(), RegistryError> {
        let context = upload_context("append to blob upload", &self.repository, None);
        self.ensure_usable(&context)?;
        let start = self.progress.offset;
        let window = SourceWindow {
            start,
            end: start + data.len() as u64,
            source: &BlobSource::Bytes(data),
        };
        let mut budget = RetryBudget::new(&self.client.config().retry);
        let target = UploadTarget {
            repository: &self.repository,
            scopes: &self.scopes,
        };
        let sent = self
            .client
            .upload_window(target, &mut self.progress, window, &mut budget)
            .await;
        sent.map_err(|failure| {
            self.broken = true;
            failure.into_error(&context, budget.failures().max(1))
        })
    }

    /// Bytes the registry has acknowledged.
    pub fn uploaded(&self) -> u64 {
        self.progress.offset
    }

    /// Where the upload stands, to resume it later in another process.
    pub fn checkpoint(&self) -> UploadCheckpoint {
        UploadCheckpoint {
            session: self.progress.session.clone(),
            uploaded: self.progress.offset,
        }
    }

    /// Completes the upload with the closing PUT `?digest=`; the registry
    /// checks the bytes against `digest`. A repository that already had the
    /// blob is fine too. Returns [`PushOutcome::Uploaded`].
    pub async fn finish(self, digest: &Digest) -> Result<PushOutcome, RegistryError> {
        let context = upload_context("finish blob upload", &self.repository, Some(digest));
        self.ensure_usable(&context)?;
        let mut retrying = false;
        self.client
            .retry_loop(&context, DeadlineMode::BetweenAttempts, || {
                let after_failure = std::mem::replace(&mut retrying, true);
                self.finish_once(digest, after_failure)
            })
            .await?;
        debug!(repository = %self.repository, %digest, size = self.progress.offset, "streamed blob stored");
        Ok(PushOutcome::Uploaded)
    }

    async fn finish_once(&self, digest: &Digest, after_failure: bool) -> Result<(), Failure> {
        // The failed PUT may have completed the blob before its answer was
        // lost; the session is gone then, but the blob is there.
        if after_failure
            && self
                .client
                .head_blob(&self.repository, digest, &self.scopes)
                .await?
                .is_some()
        {
            return Ok(());
        }
        let session = self.progress.session.clone();
        let body = RequestBody::Empty;
        self.client
            .finish_upload(self.target(), session, digest, body, 0)
            .await
    }

    /// Abandons the upload: DELETE on the session, best effort (a failure
    /// is logged; the registry purges stale sessions eventually).
    pub async fn cancel(self) {
        let session = &self.progress.session;
        let request = self.target().request(Method::DELETE, session.clone());
        let session = redact_url(session);
        match self.client.execute(&request).await {
            Ok(response) if response.status().is_success() => {
                debug!(repository = %self.repository, %session, "blob upload cancelled");
            }
            Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                debug!(repository = %self.repository, %session, "blob upload already gone");
            }
            Ok(response) => {
                let status = response.status().as_u16();
                warn!(repository = %self.repository, %session, status, "registry refused to cancel a blob upload");
            }
            Err(failure) => {
                warn!(repository = %self.repository, %session, error = %failure.kind, "cannot cancel a blob upload");
            }
        }
    }

    fn target(&self) -> UploadTarget<'_> {
        UploadTarget {
            repository: &self.repository,
            scopes: &self.scopes,
        }
    }

    fn ensure_usable(&self, context: &OperationContext) -> Result<(), RegistryError> {
        if !self.broken {
            return Ok(());
        }
        let why = "an earlier append failed, so the registry may lack bytes of the blob; \
                   cancel the upload and start again";
        let kind = ErrorKind::InvalidRequest(why.to_owned());
        Err(RegistryError::new(
            context.clone(),
            Some(redact_url(&self.progress.session)),
            kind,
        ))
    }
}

fn upload_context(
    operation: &'static str,
    repository: &Repository,
    digest: Option<&Digest>,
) -> OperationContext {
    OperationContext {
        operation,
        repository: repository.to_string(),
        object: digest.map(ToString::to_string),
    }
}
