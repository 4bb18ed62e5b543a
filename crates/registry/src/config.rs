//! [`ClientConfig`]: transport, retry and credential settings of a
//! [`Client`](crate::Client).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::credentials::CredentialSource;

/// How transient failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt.
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    pub max_backoff: Duration,
    /// Overall time an operation (all its attempts and backoffs) may take.
    /// Streams are bounded per (re)connection, not in total; a running blob
    /// upload is not cut (its length depends on the blob), the deadline only
    /// stops further retries. Chunked uploads count attempts and deadline
    /// from their last stored chunk.
    pub operation_deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            operation_deadline: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based):
    /// exponential, with "equal jitter" (uniform in the upper half) so that
    /// many clients hitting one failing registry spread out.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        let half = ceiling / 2;
        let jitter_nanos = fastrand::u64(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX));
        half + Duration::from_nanos(jitter_nanos)
    }
}

/// Settings of a [`Client`](crate::Client).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP instead of HTTPS
    /// (the CLI's `--plain-http`).
    pub plain_http: BTreeSet<String>,
    /// Registries (`host[:port]`) whose reads (GET and HEAD) go to a
    /// pull-through mirror at this base URL (`http://HOST:PORT`), e.g. a
    /// Darter P2P peer, with the registry's credentials; writes still go to
    /// the registry.
    pub mirrors: BTreeMap<String, String>,
    /// `User-Agent` header.
    pub user_agent: String,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes; a stalled
    /// connection fails (and is retried) after this.
    pub read_timeout: Duration,
    /// Retries and the per-operation deadline.
    pub retry: RetryPolicy,
    /// Largest manifest accepted (hostile registries could send gigabytes).
    pub max_manifest_size: u64,
    /// Blobs up to this size are uploaded in one PUT; larger ones in PATCH
    /// chunks of this size. Streaming uploads send each append in PATCHes
    /// of at most this size.
    pub upload_chunk_size: u64,
    /// Where credentials come from.
    pub credentials: CredentialSource,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            plain_http: BTreeSet::new(),
            mirrors: BTreeMap::new(),
            user_agent: concat!("darter/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            max_manifest_size: 4 << 20,
            upload_chunk_size: 16 << 20,
            credentials: CredentialSource::from_environment(),
        }
    }
}

impl ClientConfig {
    /// Adds `registry` to the plain-HTTP set.
    pub fn with_plain_http(mut self, registry: impl Into<String>) -> ClientConfig {
        self.plain_http.insert(registry.into());
        self
    }

    /// Sends reads of `registry` to the mirror at `base_url`.
    pub fn with_mirror(
        mut self,
        registry: impl Into<String>,
        base_url: impl Into<String>,
    ) -> ClientConfig {
        self.mirrors.insert(registry.into(), base_url.into());
        self
    }

    /// Replaces the credential source.
    pub fn with_credentials(mut self, credentials: CredentialSource) -> ClientConfig {
        self.credentials = credentials;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for _ in 0..100 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.backoff(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.backoff(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }
}
