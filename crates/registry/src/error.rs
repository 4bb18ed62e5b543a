//! The error type of every registry operation.
//!
//! A [`RegistryError`] names the operation, the repository and object (tag or
//! digest), the URL (with secret-looking query values redacted: URLs never
//! carry credentials or tokens here), the number of attempts made, and an
//! [`ErrorKind`] that says what went wrong and whether retrying can help.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use darter_format::Digest;

use crate::credentials::CredentialError;

/// What an operation was doing when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationContext {
    /// e.g. "get manifest", "push blob".
    pub operation: &'static str,
    /// `registry/path` of the repository.
    pub repository: String,
    /// The tag or digest the operation was about, if any.
    pub object: Option<String>,
}

impl fmt::Display for OperationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.operation, self.repository)?;
        match &self.object {
            Some(object) if object.contains(':') => write!(f, "@{object}"),
            Some(tag) => write!(f, ":{tag}"),
            None => Ok(()),
        }
    }
}

/// A failed registry operation. Its `Display` is the whole story on one line
/// (it has no `source()`, so nothing is printed twice).
#[derive(Debug)]
pub struct RegistryError(Box<ErrorDetails>);

#[derive(Debug)]
struct ErrorDetails {
    context: OperationContext,
    url: Option<String>,
    attempts: u32,
    kind: ErrorKind,
}

impl std::error::Error for RegistryError {}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let details = &self.0;
        write!(f, "{}", details.context)?;
        if let Some(url) = &details.url {
            write!(f, " ({url})")?;
        }
        if details.attempts > 1 {
            write!(f, " after {} attempts", details.attempts)?;
        }
        write!(f, ": {}", details.kind)
    }
}

impl RegistryError {
    pub(crate) fn new(context: OperationContext, url: Option<String>, kind: ErrorKind) -> Self {
        RegistryError(Box::new(ErrorDetails {
            context,
            url,
            attempts: 1,
            kind,
        }))
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.0.attempts = attempts;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The operation, repository and object.
    pub fn context(&self) -> &OperationContext {
        &self.0.context
    }

    /// The (redacted) URL of the failing request, if a request was made.
    pub fn url(&self) -> Option<&str> {
        self.0.url.as_deref()
    }

    /// How many attempts were made before giving up.
    pub fn attempts(&self) -> u32 {
        self.0.attempts
    }

    /// The HTTP status, if the failure was an HTTP answer.
    pub fn status(&self) -> Option<u16> {
        match &self.0.kind {
            ErrorKind::Status { status, .. } | ErrorKind::Unauthorized { status, .. } => {
                Some(*status)
            }
            ErrorKind::RangeNotSatisfiable { .. } => Some(416),
            _ => None,
        }
    }

    /// The digest the operation was about, if any.
    pub fn digest(&self) -> Option<Digest> {
        self.0.context.object.as_deref()?.parse().ok()
    }

    /// True if the failure was transient (a retry might succeed). Errors
    /// returned by the client have already been retried as far as the
    /// policy allows.
    pub fn is_retryable(&self) -> bool {
        self.0.kind.is_retryable()
    }

    /// True for "the registry does not have it" (HTTP 404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An HTTP status the operation cannot use.
    #[error("HTTP {status}{}", registry_message(code, message))]
    Status {
        /// The status code.
        status: u16,
        /// The registry's error code (e.g. `MANIFEST_UNKNOWN`), if it sent one.
        code: Option<String>,
        /// The registry's error message, shortened.
        message: Option<String>,
    },
    /// Authentication failed or was refused (401/403 after authenticating).
    #[error("HTTP {status} unauthorized: {reason}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// Why (never includes credentials).
        reason: String,
    },
    /// The connection failed, timed out or broke.
    #[error("{what}: {}", error_chain(error))]
    Transport {
        /// Which step (connect, send, read body).
        what: &'static str,
        /// True for failures a retry can fix (nearly all of them).
        retryable: bool,
        /// The underlying error, with its URL stripped.
        error: reqwest::Error,
    },
    /// The body ended before its announced length.
    #[error("body truncated: got {received} of {expected} bytes")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// Content does not hash to its digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A response larger than the client accepts.
    #[error("response larger than the {limit}-byte limit")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The requested byte range is outside the blob.
    #[error("range {requested} not satisfiable{}", blob_size.map(|s| format!(" (blob is {s} bytes)")).unwrap_or_default())]
    RangeNotSatisfiable {
        /// The range asked for, as in the `Range` header.
        requested: String,
        /// The blob's size, if the registry said.
        blob_size: Option<u64>,
    },
    /// The registry broke the protocol (bad header, wrong range, ...).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The caller asked for something impossible.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An index has no manifest for the wanted platform.
    #[error("no manifest for platform {wanted} (index has: {available})")]
    NoMatchingPlatform {
        /// The wanted platform.
        wanted: String,
        /// The platforms listed, comma-separated.
        available: String,
    },
    /// Credentials could not be read.
    #[error("{0}")]
    Credentials(CredentialError),
    /// Reading the local data to upload failed.
    #[error("cannot read {path}: {error}")]
    Source {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The operation's overall deadline passed.
    #[error("deadline of {deadline:?} exceeded{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    DeadlineExceeded {
        /// The configured deadline.
        deadline: Duration,
        /// The failure that caused the last retry, if any.
        last_error: Option<Box<ErrorKind>>,
    },
    /// The registry no longer knows an upload session (e.g. distribution
    /// drops one whose PATCH broke off mid-body). Bytes sent in it are
    /// gone; a new upload can succeed.
    #[error("upload session lost after {acknowledged} acknowledged bytes: {cause}")]
    UploadSessionLost {
        /// Bytes the registry had acknowledged before it lost the session.
        acknowledged: u64,
        /// The answer that showed the loss.
        cause: Box<ErrorKind>,
    },
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

fn registry_message(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(" {code}: {message}"),
        (Some(code), None) => format!(" {code}"),
        (None, Some(message)) => format!(": {message}"),
        (None, None) => String::new(),
    }
}

impl ErrorKind {
    /// True if a retry might succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ErrorKind::Status { status, .. } => is_retryable_status(*status),
            ErrorKind::Transport { retryable, .. } => *retryable,
            ErrorKind::Truncated { .. } | ErrorKind::UploadSessionLost { .. } => true,
            _ => false,
        }
    }

    /// Classifies a reqwest error from step `what`.
    pub(crate) fn transport(what: &'static str, source: reqwest::Error) -> ErrorKind {
        let retryable = !source.is_builder() && !source.is_redirect() && !is_tls_failure(&source);
        ErrorKind::Transport {
            what,
            retryable,
            error: source.without_url(),
        }
    }
}

/// True if a TLS handshake failed (untrusted certificate, a server not
/// speaking TLS): retrying cannot change that.
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(current) = next {
        // io::Error hides its payload from source(); look inside, through
        // io::Errors wrapping io::Errors.
        let mut wrapped = Some(current);
        while let Some(candidate) = wrapped {
            if candidate.is::<rustls::Error>() {
                return true;
            }
            wrapped = candidate
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        next = current.source();
    }
    false
}

/// An error and its sources, joined with ": " (reqwest's own message is terse;
/// the cause, e.g. "Connection refused", is in its sources).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
    text
}

/// 5xx except "not implemented", 408 and 429.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status) && status != 501 && status != 505
}

/// Query parameters that never carry secrets and help debugging.
const PUBLIC_QUERY_KEYS: [&str; 6] = ["digest", "mount", "from", "n", "last", "service"];

/// The URL with user info removed and query values other than
/// [`PUBLIC_QUERY_KEYS`] replaced (pre-signed object-store URLs carry
/// signatures; upload URLs carry opaque state).
pub(crate) fn redact_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    // Both only fail for URLs that cannot have user info (not http/https).
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if PUBLIC_QUERY_KEYS.contains(&key.as_ref()) {
                    value.into_owned()
                } else {
                    "REDACTED".to_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        let cases = [
            (200, false),
            (401, false),
            (404, false),
            (408, true),
            (416, false),
            (429, true),
            (500, true),
            (501, false),
            (502, true),
            (503, true),
            (504, true),
        ];
        for (status, want) in cases {
            assert_eq!(is_retryable_status(status), want, "{status}");
        }
    }

    #[test]
    fn urls_lose_user_info_and_secret_query_values() {
        let cases = [
            ("http://u:p@h.io/v2/", "http://h.io/v2/"),
            (
                "https://s3.io/b?X-Amz-Signature=abc&digest=sha256%3A00",
                "https://s3.io/b?X-Amz-Signature=REDACTED&digest=sha256%3A00",
            ),
            (
                "http://h.io/v2/a/blobs/uploads/x?_state=zzz",
                "http://h.io/v2/a/blobs/uploads/x?_state=REDACTED",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(&url.parse().unwrap()), want);
        }
    }

    #[test]
    fn display_names_operation_repository_object_and_url() {
        let context = OperationContext {
            operation: "get blob",
            repository: "h.io/a".into(),
            object: Some("sha256:00".into()),
        };
        let err = RegistryError::new(
            context,
            Some("http://h.io/v2/a/blobs/sha256:00".into()),
            ErrorKind::Status {
                status: 404,
                code: Some("BLOB_UNKNOWN".into()),
                message: Some("blob unknown to registry".into()),
            },
        )
        .with_attempts(1);
        assert_eq!(
            err.to_string(),
            "get blob h.io/a@sha256:00 (http://h.io/v2/a/blobs/sha256:00): \
             HTTP 404 BLOB_UNKNOWN: blob unknown to registry"
        );
        assert!(err.is_not_found());
        assert!(!err.is_retryable());
    }
}
