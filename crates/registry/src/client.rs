//! The [`Client`] and its request machinery: URL building, authentication
//! on 401, manual redirects (no `Authorization` to other origins), bounded
//! body reads, error mapping and the retry loop. The operations themselves
//! live in `manifest`, `blob` and `upload`.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;
use tracing::{debug, warn};
use url::Url;

use crate::auth::{AuthState, Authorization, Scope};
use crate::config::{ClientConfig, RetryPolicy};
use crate::error::{ErrorKind, OperationContext, RegistryError, redact_url};
use crate::reference::{Repository, registry_api_host};
use crate::upload::BlobSource;

/// `client_id` sent to OAuth2 token endpoints.
pub(crate) const CLIENT_ID: &str = "darter";
/// Redirect hops followed before giving up.
const MAX_REDIRECTS: u32 = 5;
/// Largest registry error body read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Longest registry error message kept.
const MAX_ERROR_MESSAGE: usize = 300;

tokio::task_local! {
    /// The (redacted) URL of the last request the running attempt sent, so
    /// that an attempt cut short by the operation deadline (a stall) still
    /// names where it hung.
    static URL_IN_FLIGHT: RefCell<Option<String>>;
}

/// A registry client. Cheap to clone; clones share connections, credentials
/// and cached tokens, so one client serves a whole process (e.g. every read
/// of a long-lived mount).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    auth: AuthState,
}

/// A failure inside one attempt, before it gets its operation context.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) url: Option<String>,
    pub(crate) kind: ErrorKind,
}

impl Failure {
    pub(crate) fn at(url: &Url, kind: ErrorKind) -> Failure {
        Failure {
            url: Some(redact_url(url)),
            kind,
        }
    }

    pub(crate) fn without_url(kind: ErrorKind) -> Failure {
        Failure { url: None, kind }
    }

    pub(crate) fn into_error(self, context: &OperationContext, attempts: u32) -> RegistryError {
        RegistryError::new(context.clone(), self.url, self.kind).with_attempts(attempts)
    }
}

/// What a request sends as its body.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RequestBody<'a> {
    Empty,
    Bytes(&'a Bytes),
    /// `len` bytes of `source` from `offset`, streamed.
    Source {
        source: &'a BlobSource,
        offset: u64,
        len: u64,
    },
}

/// One logical request: `Client::execute` may send it several times (after
/// a 401, along redirects).
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) registry: &'a str,
    pub(crate) scopes: &'a [Scope],
    pub(crate) headers: HeaderMap,
    pub(crate) body: RequestBody<'a>,
}

impl<'a> Request<'a> {
    /// A bodiless request to `repository`'s registry needing `scopes`.
    pub(crate) fn new(
        method: Method,
        url: Url,
        repository: &'a Repository,
        scopes: &'a [Scope],
    ) -> Request<'a> {
        Request {
            method,
            url,
            registry: repository.registry(),
            scopes,
            headers: HeaderMap::new(),
            body: RequestBody::Empty,
        }
    }

    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Request<'a> {
        self.headers.insert(name, value);
        self
    }

    pub(crate) fn body(mut self, body: RequestBody<'a>) -> Request<'a> {
        self.body = body;
        self
    }
}

impl Client {
    /// A client with `config`. Fails only if TLS cannot be set up.
    pub fn new(config: ClientConfig) -> Result<Client, RegistryError> {
        let setup_error = |what: String| {
            let context = OperationContext {
                operation: "create client",
                repository: String::new(),
                object: None,
            };
            RegistryError::new(context, None, ErrorKind::Setup(what))
        };
        let tls = tls_config().map_err(|e| setup_error(format!("TLS: {e}")))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| setup_error(e.to_string()))?;
        let auth = AuthState::new(config.credentials.clone());
        Ok(Client {
            inner: Arc::new(Inner { http, config, auth }),
        })
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// `SCHEME://HOST/` of `registry`'s API.
    fn registry_base(&self, registry: &str) -> Result<Url, Failure> {
        let scheme = if self.config().plain_http.contains(registry) {
            "http"
        } else {
            "https"
        };
        let text = format!("{scheme}://{}/", registry_api_host(registry));
        Url::parse(&text).map_err(|e| {
            Failure::without_url(ErrorKind::InvalidRequest(format!(
                "bad registry URL {text}: {e}"
            )))
        })
    }

    /// `SCHEME://HOST/v2/REPO/SUFFIX` for `repository`.
    pub(crate) fn repository_url(
        &self,
        repository: &Repository,
        suffix: &str,
    ) -> Result<Url, Failure> {
        let base = self.registry_base(repository.registry())?;
        base.join(&format!("v2/{}/{suffix}", repository.path()))
            .map_err(|e| Failure::at(&base, ErrorKind::InvalidRequest(e.to_string())))
    }

    /// `url` of `registry` at its configured mirror, if it has one.
    fn at_mirror(&self, registry: &str, url: &Url) -> Result<Option<Url>, Failure> {
        let Some(mirror) = self.config().mirrors.get(registry) else {
            return Ok(None);
        };
        let bad_mirror = |reason: String| {
            Failure::without_url(ErrorKind::InvalidRequest(format!(
                "bad mirror URL {mirror:?} for {registry}: {reason}"
            )))
        };
        let base = Url::parse(mirror).map_err(|e| bad_mirror(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(bad_mirror("not an http(s) URL with a host".into()));
        }
        let mut rebased = url.clone();
        rebased
            .set_scheme(base.scheme())
            .and_then(|()| rebased.set_host(base.host_str()).map_err(drop))
            .and_then(|()| rebased.set_port(base.port()))
            .map_err(|()| bad_mirror("cannot rebase a URL on it".into()))?;
        Ok(Some(rebased))
    }

    /// Sends `request`, answering one 401 with fresh authorization and
    /// following redirects for GET/HEAD. `Authorization` only ever goes to
    /// the registry's own origin (scheme, host, port), or for reads to its
    /// configured mirror, which passes it on; never to object stores or
    /// upload hosts elsewhere.
    pub(crate) async fn execute(&self, request: &Request<'_>) -> Result<Response, Failure> {
        let mut origin = self.registry_base(request.registry)?.origin();
        let follows_redirects = request.method == Method::GET || request.method == Method::HEAD;
        let mut url = request.url.clone();
        let mut at_mirror = false;
        if follows_redirects
            && url.origin() == origin
            && let Some(mirrored) = self.at_mirror(request.registry, &url)?
        {
            origin = mirrored.origin();
            url = mirrored;
            at_mirror = true;
        }
        let mut auth_retried = false;
        let mut redirects = 0;
        loop {
            let same_origin = url.origin() == origin;
            let auth = if same_origin {
                let http = &self.inner.http;
                self.inner
                    .auth
                    .authorization(http, request.registry, request.scopes)
                    .await?
            } else {
                None
            };
            // Outside a retry loop no deadline can cut the request short.
            let _ = URL_IN_FLIGHT.try_with(|u| u.replace(Some(redact_url(&url))));
            let response = match self.send_once(request, &url, auth.as_ref()).await {
                Ok(response) => response,
                // A mirror that cannot be reached (a local P2P peer that is
                // down) must not fail the read: the registry still serves it.
                Err(SendFailure::Connect(failure)) if at_mirror => {
                    warn!(mirror = %redact_url(&url), error = %failure.kind, "the mirror cannot be reached; reading from the registry");
                    at_mirror = false;
                    url = request.url.clone();
                    origin = self.registry_base(request.registry)?.origin();
                    continue;
                }
                Err(SendFailure::Connect(failure) | SendFailure::Other(failure)) => {
                    return Err(failure);
                }
            };
            let status = response.status();
            debug!(method = %request.method, url = %redact_url(&url), status = status.as_u16(), "registry request");
            if status == StatusCode::UNAUTHORIZED && same_origin && !auth_retried {
                auth_retried = true;
                let auth_state = &self.inner.auth;
                let headers = response.headers();
                if auth_state
                    .on_unauthorized(request.registry, headers, auth.as_ref())
                    .await?
                {
                    continue;
                }
                return Ok(response);
            }
            let location = response.headers().get(LOCATION);
            if follows_redirects && status.is_redirection() && location.is_some() {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(Failure::at(&url, bad_response("too many redirects")));
                }
                url = resolve_location(&url, &response)?;
                continue;
            }
            return Ok(response);
        }
    }

    /// One HTTP exchange of `request` at `url`.
    async fn send_once(
        &self,
        request: &Request<'_>,
        url: &Url,
        auth: Option<&Authorization>,
    ) -> Result<Response, SendFailure> {
        let mut builder = self
            .inner
            .http
            .request(request.method.clone(), url.clone())
            .headers(request.headers.clone());
        if let Some(auth) = auth {
            builder = builder.header(AUTHORIZATION, auth.header.clone());
        }
        if let Some(body) = request
            .body
            .to_reqwest()
            .await
            .map_err(SendFailure::Other)?
        {
            builder = builder.body(body);
        }
        builder.send().await.map_err(|e| {
            let connect = e.is_connect();
            let failure = Failure::at(url, ErrorKind::transport("request failed", e));
            if connect {
                SendFailure::Connect(failure)
            } else {
                SendFailure::Other(failure)
            }
        })
    }

    /// Runs `attempt` until it succeeds, fails for good, runs out of
    /// attempts, or the operation deadline passes (cutting a running
    /// attempt short).
    pub(crate) async fn with_retries<T, F, Fut>(
        &self,
        context: &OperationContext,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.retry_loop(context, DeadlineMode::CutAttempts, attempt)
            .await
    }

    /// The retry loop; `mode` says whether the deadline may cut a running
    /// attempt ([`DeadlineMode::BetweenAttempts`] suits uploads, whose
    /// length depends on the blob size and link speed; stalls are caught by
    /// the connection timeouts instead).
    pub(crate) async fn retry_loop<T, F, Fut>(
        &self,
        context: &OperationContext,
        mode: DeadlineMode,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut budget = RetryBudget::new(&self.config().retry);
        let mut last_error: Option<Failure> = None;
        loop {
            let outcome = match mode {
                DeadlineMode::CutAttempts => {
                    let cut = tokio::time::timeout_at(budget.deadline, attempt());
                    URL_IN_FLIGHT
                        .scope(RefCell::new(None), async {
                            cut.await
                                .map_err(|_elapsed| URL_IN_FLIGHT.with(RefCell::take))
                        })
                        .await
                }
                DeadlineMode::BetweenAttempts => Ok(attempt().await),
            };
            let failure = match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(failure)) => failure,
                Err(url_in_flight) => {
                    let url =
                        url_in_flight.or_else(|| last_error.as_ref().and_then(|f| f.url.clone()));
                    let kind = ErrorKind::DeadlineExceeded {
                        deadline: budget.policy.operation_deadline,
                        last_error: last_error.map(|f| Box::new(f.kind)),
                    };
                    let attempts = budget.failures + 1;
                    return Err(Failure { url, kind }.into_error(context, attempts));
                }
            };
            let Some(backoff) = budget.retry_after(&failure.kind) else {
                return Err(failure.into_error(context, budget.failures));
            };
            warn!(%context, attempt = budget.failures, error = %failure.kind, ?backoff, "transient registry failure, retrying");
            tokio::time::sleep(backoff).await;
            last_error = Some(failure);
        }
    }
}

/// What is left of the [`RetryPolicy`] for one operation: failures in a row
/// count against `max_attempts`, and no retry starts whose backoff would end
/// past the deadline.
#[derive(Debug)]
pub(crate) struct RetryBudget<'a> {
    policy: &'a RetryPolicy,
    deadline: tokio::time::Instant,
    failures: u32,
}

impl<'a> RetryBudget<'a> {
    /// A full budget, its deadline `operation_deadline` from now.
    pub(crate) fn new(policy: &'a RetryPolicy) -> RetryBudget<'a> {
        RetryBudget {
            policy,
            deadline: tokio::time::Instant::now() + policy.operation_deadline,
            failures: 0,
        }
    }

    /// Failed attempts since the start or the last progress.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure of `kind`. Returns the pause before the next
    /// attempt, or `None` if the failure is final, the attempts are used up
    /// or the pause would end past the deadline.
    pub(crate) fn retry_after(&mut self, kind: &ErrorKind) -> Option<Duration> {
        self.failures += 1;
        let backoff = self.policy.backoff(self.failures);
        let out_of_time = tokio::time::Instant::now() + backoff >= self.deadline;
        let allowed = kind.is_retryable() && self.failures < self.policy.max_attempts;
        (allowed && !out_of_time).then_some(backoff)
    }

    /// The operation moved forward (e.g. a chunk was stored): the budget is
    /// full again, so long transfers may recover from any number of spaced
    /// out failures while a persistent one still ends within the deadline.
    pub(crate) fn progressed(&mut self) {
        *self = RetryBudget::new(self.policy);
    }
}

/// Whether the operation deadline may interrupt a running attempt.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeadlineMode {
    /// The deadline cuts the running attempt.
    CutAttempts,
    /// The deadline only stops further retries.
    BetweenAttempts,
}

impl RequestBody<'_> {
    async fn to_reqwest(self) -> Result<Option<reqwest::Body>, Failure> {
        match self {
            RequestBody::Empty => Ok(None),
            RequestBody::Bytes(bytes) => Ok(Some(reqwest::Body::from(bytes.clone()))),
            RequestBody::Source {
                source,
                offset,
                len,
            } => source.body(offset, len).await.map(Some),
        }
    }
}

fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth())
}

pub(crate) fn bad_response(what: impl Into<String>) -> ErrorKind {
    ErrorKind::BadResponse(what.into())
}

/// The absolute URL of a response's `Location` header.
pub(crate) fn resolve_location(base: &Url, response: &Response) -> Result<Url, Failure> {
    let location = response
        .headers()
        .get(LOCATION)
        .ok_or_else(|| Failure::at(base, bad_response("no Location header")))?;
    location
        .to_str()
        .ok()
        .and_then(|text| base.join(text).ok())
        .ok_or_else(|| Failure::at(base, bad_response("Location header is not a URL")))
}

/// A header parsed as a number.
pub(crate) fn header_u64(response: &Response, name: &str) -> Option<u64> {
    response
        .headers()
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the whole body, failing if it is (or announces to be) larger than
/// `limit`.
pub(crate) async fn read_limited(response: Response, limit: u64) -> Result<Bytes, ErrorKind> {
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(ErrorKind::TooLarge { limit });
    }
    let mut body = BytesMut::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ErrorKind::transport("reading body", e))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ErrorKind::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    code: Option<String>,
    message: Option<String>,
}

/// Turns a response with an unusable status into a [`Failure`], keeping the
/// registry's error code and message (shortened) when it sent them.
pub(crate) async fn status_failure(response: Response) -> Failure {
    let status = response.status().as_u16();
    let url = response.url().clone();
    let body = read_limited(response, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let entry = serde_json::from_slice::<ErrorBody>(&body)
        .ok()
        .and_then(|b| b.errors.into_iter().next());
    let (code, message) = match entry {
        Some(entry) => (entry.code, entry.message),
        None => (None, None),
    };
    let message = message.map(|m| m.chars().take(MAX_ERROR_MESSAGE).collect::<String>());
    let kind = if status == 401 || status == 403 {
        let reason = match (&code, &message) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.clone(),
            (None, Some(message)) => message.clone(),
            (None, None) => "credentials missing, wrong, or lacking access".to_owned(),
        };
        ErrorKind::Unauthorized { status, reason }
    } else {
        ErrorKind::Status {
            status,
            code,
            message,
        }
    };
    Failure::at(&url, kind)
}

/// Fails unless the response has one of `expected` statuses.
pub(crate) async fn expect_status(
    response: Response,
    expected: &[StatusCode],
) -> Result<Response, Failure> {
    if expected.contains(&response.status()) {
        Ok(response)
    } else {
        Err(status_failure(response).await)
    }
}

/// Why one HTTP exchange failed: no connection could be made (the server
/// is down or unreachable), or anything else.
#[derive(Debug)]
enum SendFailure {
    Connect(Failure),
    Other(Failure),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> ErrorKind {
        ErrorKind::Status {
            status,
            code: None,
            message: None,
        }
    }

    fn policy(max_attempts: u32, deadline: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            operation_deadline: deadline,
        }
    }

    #[tokio::test]
    async fn retry_budgets_count_failures_in_a_row() {
        let policy = policy(3, Duration::from_secs(60));
        let mut budget = RetryBudget::new(&policy);
        assert!(budget.retry_after(&status(503)).is_some());
        assert!(budget.retry_after(&status(503)).is_some());
        assert!(
            budget.retry_after(&status(503)).is_none(),
            "third failure ends it"
        );
        assert_eq!(budget.failures(), 3);
        budget.progressed();
        assert_eq!(budget.failures(), 0);
        assert!(
            budget.retry_after(&status(503)).is_some(),
            "progress refills it"
        );
        assert!(
            budget.retry_after(&status(404)).is_none(),
            "final failures end it"
        );
    }

    /// Regression: when the deadline cut the first attempt (a registry that
    /// stalls), the error named no URL, so a mount's log could not say
    /// where reads hung.
    #[tokio::test]
    async fn deadline_cutting_a_stalled_first_attempt_named_no_url() {
        use darter_testkit::faultproxy::{LoopbackServer, response};
        let stalling = LoopbackServer::start(|_request| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            response(200, &[], "")
        });
        let host = stalling.addr().to_string();
        let config = ClientConfig {
            retry: policy(3, Duration::from_millis(300)),
            credentials: crate::CredentialSource::anonymous(),
            ..ClientConfig::default()
        }
        .with_plain_http(host.clone());
        let client = Client::new(config).unwrap();
        let repository = Repository::parse(&format!("{host}/stalls/here")).unwrap();
        let digest = darter_format::DigestAlgo::Sha256.digest(b"blob");
        let err = client
            .get_blob_range(&repository, &digest, 0..1)
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::DeadlineExceeded { .. }),
            "{err}"
        );
        let url = format!("http://{host}/v2/stalls/here/blobs/{digest}");
        assert_eq!(err.url(), Some(url.as_str()), "{err}");
        assert!(err.to_string().contains(&url), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budgets_end_at_the_deadline_and_progress_moves_it() {
        let policy = policy(1000, Duration::from_secs(1));
        let mut budget = RetryBudget::new(&policy);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(budget.retry_after(&status(503)).is_some());
        tokio::time::advance(Duration::from_millis(95)).await;
        assert!(
            budget.retry_after(&status(503)).is_none(),
            "backoff would pass it"
        );
        budget.progressed();
        assert!(budget.retry_after(&status(503)).is_some());
    }
}
