//! Registry authentication: `WWW-Authenticate` challenges, Basic auth, and
//! Bearer tokens from the registry's token service, cached per (registry,
//! scopes) and renewed before they expire or when the registry rejects them.
//!
//! Requests start anonymous. The first 401 from a registry tells us its
//! scheme; from then on every request to it is authorised up front.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;
use tracing::debug;

use crate::client::{Failure, read_limited, status_failure};
use crate::credentials::{Credential, CredentialSource, Secret};
use crate::error::ErrorKind;
use crate::reference::Repository;

/// Token lifetime when the token service does not say (distribution spec).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew at most this long before expiry.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(30);
/// Largest token-service answer read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;

/// A `type:name:actions` access scope, e.g. `repository:a/b:pull,push`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Scope(String);

impl Scope {
    /// Read access to `repository`.
    pub(crate) fn pull(repository: &Repository) -> Scope {
        Scope(format!("repository:{}:pull", repository.path()))
    }

    /// Read and write access to `repository`.
    pub(crate) fn push(repository: &Repository) -> Scope {
        Scope(format!("repository:{}:pull,push", repository.path()))
    }
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// Send username and password.
    Basic,
    /// Get a token from `realm`. The challenge's own `scope` is not kept:
    /// it describes one request, and every request states the scopes it
    /// needs itself.
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Picks the challenge to answer from a 401's headers: Bearer over Basic.
pub(crate) fn challenge_from(headers: &HeaderMap) -> Option<Challenge> {
    let mut challenges: Vec<Challenge> = headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(parse_challenges)
        .filter_map(|raw| raw.into_challenge())
        .collect();
    challenges.sort_by_key(|c| matches!(c, Challenge::Basic));
    challenges.into_iter().next()
}

/// A challenge as written: scheme plus lower-cased parameter names.
#[derive(Debug, PartialEq, Eq)]
struct RawChallenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl RawChallenge {
    fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    }

    fn into_challenge(self) -> Option<Challenge> {
        if self.scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else if self.scheme.eq_ignore_ascii_case("bearer") {
            Some(Challenge::Bearer {
                realm: self.param("realm")?,
                service: self.param("service"),
            })
        } else {
            None
        }
    }
}

/// Parses `scheme k=v, k="quoted, \"value\"", scheme2 k=v` (RFC 9110
/// challenge lists; several challenges may share one header).
fn parse_challenges(header: &str) -> Vec<RawChallenge> {
    let mut lexer = Lexer { rest: header };
    let mut challenges = Vec::new();
    loop {
        lexer.skip_separators();
        if lexer.rest.is_empty() {
            return challenges;
        }
        let Some(scheme) = lexer.token() else {
            lexer.skip_char();
            continue;
        };
        let mut challenge = RawChallenge {
            scheme,
            params: Vec::new(),
        };
        loop {
            let before_param = lexer.rest;
            lexer.skip_separators();
            let Some(name) = lexer.token() else { break };
            lexer.skip_whitespace();
            if !lexer.eat('=') {
                // A token without '=' starts the next challenge.
                lexer.rest = before_param;
                break;
            }
            lexer.skip_whitespace();
            let value = lexer.value();
            challenge.params.push((name.to_ascii_lowercase(), value));
        }
        challenges.push(challenge);
    }
}

struct Lexer<'a> {
    rest: &'a str,
}

impl Lexer<'_> {
    fn is_token_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
    }

    fn skip_whitespace(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    fn skip_separators(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t', ',']);
    }

    fn skip_char(&mut self) {
        let mut chars = self.rest.chars();
        chars.next();
        self.rest = chars.as_str();
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn token(&mut self) -> Option<String> {
        let end = self
            .rest
            .find(|c| !Self::is_token_char(c))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let (token, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(token.to_owned())
    }

    /// A quoted string (with `\` escapes) or a bare value up to `,`/space.
    fn value(&mut self) -> String {
        if !self.eat('"') {
            let end = self.rest.find([',', ' ', '\t']).unwrap_or(self.rest.len());
            let (value, rest) = self.rest.split_at(end);
            self.rest = rest;
            return value.to_owned();
        }
        let mut value = String::new();
        let mut chars = self.rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => value.extend(chars.next()),
                other => value.push(other),
            }
        }
        self.rest = chars.as_str();
        value
    }
}

/// What to put in `Authorization`, and which cached token it came from (so
/// a 401 can invalidate exactly that token).
#[derive(Debug)]
pub(crate) struct Authorization {
    pub(crate) header: HeaderValue,
    token: Option<(Arc<TokenSlot>, u64)>,
}

/// A cached bearer token and when to renew it.
struct CachedToken {
    value: Secret,
    renew_at: Instant,
    generation: u64,
}

/// One (registry, scopes) token; the async lock makes concurrent requests
/// share one token fetch.
#[derive(Default)]
pub(crate) struct TokenSlot {
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for TokenSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSlot")
    }
}

/// Per-client authentication state.
#[derive(Debug)]
pub(crate) struct AuthState {
    source: CredentialSource,
    challenges: Mutex<HashMap<String, Challenge>>,
    credentials: tokio::sync::Mutex<HashMap<String, Option<Credential>>>,
    tokens: Mutex<HashMap<(String, String), Arc<TokenSlot>>>,
    generations: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked mid-insert.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuthState {
    pub(crate) fn new(source: CredentialSource) -> AuthState {
        AuthState {
            source,
            challenges: Mutex::new(HashMap::new()),
            credentials: tokio::sync::Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
        }
    }

    async fn credential(&self, registry: &str) -> Result<Option<Credential>, Failure> {
        let mut cache = self.credentials.lock().await;
        if let Some(known) = cache.get(registry) {
            return Ok(known.clone());
        }
        let found = self
            .source
            .lookup(registry)
            .await
            .map_err(|e| Failure::without_url(ErrorKind::Credentials(e)))?;
        debug!(
            registry,
            found = found.is_some(),
            "looked up registry credentials"
        );
        cache.insert(registry.to_owned(), found.clone());
        Ok(found)
    }

    /// The `Authorization` for a request to `registry` needing `scopes`, or
    /// `None` while the registry has not asked for authentication.
    pub(crate) async fn authorization(
        &self,
        http: &reqwest::Client,
        registry: &str,
        scopes: &[Scope],
    ) -> Result<Option<Authorization>, Failure> {
        let challenge = lock(&self.challenges).get(registry).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.basic(registry).await?.map(|header| Authorization {
                header,
                token: None,
            })),
            Some(Challenge::Bearer { realm, service }) => {
                let mut wanted: Vec<String> = scopes.iter().map(|s| s.0.clone()).collect();
                wanted.sort();
                wanted.dedup();
                let endpoint = TokenEndpoint {
                    realm: &realm,
                    service: service.as_deref(),
                    scopes: &wanted,
                };
                self.bearer(http, registry, &endpoint).await.map(Some)
            }
        }
    }

    async fn basic(&self, registry: &str) -> Result<Option<HeaderValue>, Failure> {
        Ok(match self.credential(registry).await? {
            Some(Credential::Basic { username, password }) => {
                Some(basic_header(&username, &password))
            }
            _ => None,
        })
    }

    async fn bearer(
        &self,
        http: &reqwest::Client,
        registry: &str,
        endpoint: &TokenEndpoint<'_>,
    ) -> Result<Authorization, Failure> {
        let key = (registry.to_owned(), endpoint.scopes.join(" "));
        let slot = lock(&self.tokens).entry(key).or_default().clone();
        let mut cached = slot.token.lock().await;
        let fresh = cached.as_ref().filter(|t| Instant::now() < t.renew_at);
        let (value, generation) = match fresh {
            Some(token) => (token.value.clone(), token.generation),
            None => {
                let credential = self.credential(registry).await?;
                let fetched = endpoint.fetch(http, credential.as_ref()).await?;
                let generation = self.generations.fetch_add(1, Ordering::Relaxed);
                let value = fetched.value.clone();
                *cached = Some(CachedToken {
                    generation,
                    ..fetched
                });
                (value, generation)
            }
        };
        drop(cached);
        let mut header =
            HeaderValue::try_from(format!("Bearer {}", value.expose())).map_err(|_| {
                Failure::without_url(bad_token("the token is not a valid header value"))
            })?;
        header.set_sensitive(true);
        Ok(Authorization {
            header,
            token: Some((slot, generation)),
        })
    }

    /// Learns from a 401: remembers the registry's challenge and drops the
    /// token that was refused. Returns true if retrying with fresh
    /// authorization can make a difference.
    pub(crate) async fn on_unauthorized(
        &self,
        registry: &str,
        headers: &HeaderMap,
        used: Option<&Authorization>,
    ) -> Result<bool, Failure> {
        let Some(challenge) = challenge_from(headers) else {
            return Ok(false);
        };
        lock(&self.challenges).insert(registry.to_owned(), challenge.clone());
        if let Some((slot, generation)) = used.and_then(|auth| auth.token.as_ref()) {
            let mut cached = slot.token.lock().await;
            if cached.as_ref().is_some_and(|t| t.generation == *generation) {
                debug!(registry, "registry refused a cached token; renewing it");
                *cached = None;
            }
            return Ok(true);
        }
        Ok(match challenge {
            Challenge::Bearer { .. } => true,
            // Basic again after sending Basic means the credentials are wrong.
            Challenge::Basic => used.is_none() && self.basic(registry).await?.is_some(),
        })
    }
}

fn bad_token(what: &str) -> ErrorKind {
    ErrorKind::BadResponse(format!("token service: {what}"))
}

fn basic_header(username: &str, password: &Secret) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{username}:{}", password.expose()));
    // Base64 output is always a valid header value.
    let mut header = HeaderValue::try_from(format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    header.set_sensitive(true);
    header
}

/// Where and what to ask the token service for.
struct TokenEndpoint<'a> {
    realm: &'a str,
    service: Option<&'a str>,
    scopes: &'a [String],
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<Secret>,
    access_token: Option<Secret>,
    expires_in: Option<u64>,
    issued_at: Option<String>,
}

impl TokenEndpoint<'_> {
    /// Gets a token: GET with Basic credentials (or anonymously), or the
    /// OAuth2 refresh-token POST when the credential is an identity token.
    async fn fetch(
        &self,
        http: &reqwest::Client,
        credential: Option<&Credential>,
    ) -> Result<CachedToken, Failure> {
        let realm = url::Url::parse(self.realm).map_err(|e| {
            let what = format!("challenge realm {:?} is not a URL: {e}", self.realm);
            Failure::without_url(ErrorKind::BadResponse(what))
        })?;
        let (url, request) = self.request(http, realm, credential);
        let failure = |kind| Failure::at(&url, kind);
        let response = request
            .send()
            .await
            .map_err(|e| failure(ErrorKind::transport("token request", e)))?;
        let status = response.status();
        debug!(url = %crate::error::redact_url(&url), status = status.as_u16(), "token request");
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(failure(ErrorKind::Unauthorized {
                status: status.as_u16(),
                reason: "the token service refused the credentials".to_owned(),
            }));
        }
        if !status.is_success() {
            return Err(status_failure(response).await);
        }
        let received_at = Instant::now();
        let body = read_limited(response, MAX_TOKEN_RESPONSE)
            .await
            .map_err(&failure)?;
        parse_token(&body, received_at).map_err(failure)
    }

    /// The token request for `credential`, and its URL.
    fn request(
        &self,
        http: &reqwest::Client,
        mut url: url::Url,
        credential: Option<&Credential>,
    ) -> (url::Url, reqwest::RequestBuilder) {
        if let Some(Credential::IdentityToken { token, .. }) = credential {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", token.expose())
                .append_pair("client_id", crate::client::CLIENT_ID)
                .append_pair("scope", &self.scopes.join(" "));
            if let Some(service) = self.service {
                form.append_pair("service", service);
            }
            let request = http
                .post(url.clone())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.finish());
            return (url, request);
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = self.service {
                query.append_pair("service", service);
            }
            for scope in self.scopes {
                query.append_pair("scope", scope);
            }
        }
        let request = http.get(url.clone());
        let request = match credential {
            Some(Credential::Basic { username, password }) => request.header(
                reqwest::header::AUTHORIZATION,
                basic_header(username, password),
            ),
            _ => request,
        };
        (url, request)
    }
}

/// A token-service answer, received at `received_at`, as a cached token.
fn parse_token(body: &[u8], received_at: Instant) -> Result<CachedToken, ErrorKind> {
    let parsed: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| bad_token(&format!("answer is not token JSON: {e}")))?;
    let non_empty = |t: &Secret| !t.expose().is_empty();
    let value = parsed
        .token
        .filter(non_empty)
        .or(parsed.access_token.filter(non_empty))
        .ok_or_else(|| bad_token("answer has neither token nor access_token"))?;
    let remaining = remaining_lifetime(parsed.expires_in, parsed.issued_at.as_deref());
    Ok(CachedToken {
        value,
        renew_at: received_at + remaining - renew_margin(remaining),
        generation: 0,
    })
}

/// How long a token has left: `expires_in` (default 60 s) minus its age by
/// `issued_at`, when that is a sane RFC 3339 time in the past.
fn remaining_lifetime(expires_in: Option<u64>, issued_at: Option<&str>) -> Duration {
    let lifetime = match expires_in {
        Some(0) | None => DEFAULT_TOKEN_LIFETIME,
        Some(secs) => Duration::from_secs(secs),
    };
    let age = issued_at
        .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
        .and_then(|issued| SystemTime::now().duration_since(issued).ok())
        .filter(|age| *age < lifetime)
        .unwrap_or_default();
    lifetime - age
}

/// Renew a quarter of the lifetime early, but at most 30 s early.
fn renew_margin(remaining: Duration) -> Duration {
    (remaining / 4).min(MAX_RENEW_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(scheme: &str, params: &[(&str, &str)]) -> RawChallenge {
        RawChallenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn challenge_parsing_table() {
        let cases: Vec<(&str, Vec<RawChallenge>)> = vec![
            (
                "Basic realm=\"Registry Realm\"",
                vec![raw("Basic", &[("realm", "Registry Realm")])],
            ),
            (
                r#"Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull,push""#,
                vec![raw(
                    "Bearer",
                    &[
                        ("realm", "https://auth.io/token"),
                        ("service", "registry.io"),
                        ("scope", "repository:a/b:pull,push"),
                    ],
                )],
            ),
            (
                r#"Bearer realm = "r" , error="invalid_token", Basic realm=x"#,
                vec![
                    raw("Bearer", &[("realm", "r"), ("error", "invalid_token")]),
                    raw("Basic", &[("realm", "x")]),
                ],
            ),
            (
                r#"bearer REALM="a \"quoted\" \\ realm",scope=repository:x:pull"#,
                vec![raw(
                    "bearer",
                    &[
                        ("realm", r#"a "quoted" \ realm"#),
                        ("scope", "repository:x:pull"),
                    ],
                )],
            ),
            (
                "Negotiate, Basic",
                vec![raw("Negotiate", &[]), raw("Basic", &[])],
            ),
            ("", vec![]),
            ("  ,, ", vec![]),
            (
                r#"Bearer realm="unterminated"#,
                vec![raw("Bearer", &[("realm", "unterminated")])],
            ),
        ];
        for (header, want) in cases {
            assert_eq!(parse_challenges(header), want, "{header:?}");
        }
    }

    #[test]
    fn bearer_is_preferred_and_needs_a_realm() {
        let mut headers = HeaderMap::new();
        headers.append(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=x"));
        headers.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer realm="http://t/token",service="s""#),
        );
        assert_eq!(
            challenge_from(&headers),
            Some(Challenge::Bearer {
                realm: "http://t/token".into(),
                service: Some("s".into()),
            })
        );
        let mut no_realm = HeaderMap::new();
        no_realm.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer service=s"),
        );
        assert_eq!(challenge_from(&no_realm), None);
    }

    #[test]
    fn token_lifetime_and_renewal_margin() {
        assert_eq!(remaining_lifetime(None, None), Duration::from_secs(60));
        assert_eq!(remaining_lifetime(Some(0), None), Duration::from_secs(60));
        assert_eq!(
            remaining_lifetime(Some(300), None),
            Duration::from_secs(300)
        );
        let ten_s_ago = humantime::format_rfc3339(SystemTime::now() - Duration::from_secs(10));
        let left = remaining_lifetime(Some(300), Some(&ten_s_ago.to_string()));
        assert!(
            left <= Duration::from_secs(290) && left > Duration::from_secs(285),
            "{left:?}"
        );
        let future = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(100));
        assert_eq!(
            remaining_lifetime(Some(300), Some(&future.to_string())),
            Duration::from_secs(300)
        );
        assert_eq!(
            remaining_lifetime(Some(300), Some("garbage")),
            Duration::from_secs(300)
        );
        assert_eq!(
            renew_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(renew_margin(Duration::from_secs(3600)), MAX_RENEW_MARGIN);
    }

    #[test]
    fn token_answers_in_all_shapes() {
        let now = Instant::now();
        let cases = [
            (r#"{"token":"t1","expires_in":100}"#, Some(("t1", 75))),
            (r#"{"access_token":"t2"}"#, Some(("t2", 45))),
            (
                r#"{"token":"","access_token":"t3","expires_in":3600}"#,
                Some(("t3", 3570)),
            ),
            (r#"{"token":""}"#, None),
            (r#"{"expires_in":10}"#, None),
            ("<html>", None),
        ];
        for (body, want) in cases {
            let parsed = parse_token(body.as_bytes(), now);
            match (parsed, want) {
                (Ok(token), Some((value, renew_secs))) => {
                    assert_eq!(token.value.expose(), value, "{body}");
                    assert_eq!(
                        token.renew_at - now,
                        Duration::from_secs(renew_secs),
                        "{body}"
                    );
                }
                (Err(e), None) => assert!(matches!(e, ErrorKind::BadResponse(_)), "{body}: {e}"),
                (Ok(_), None) => panic!("{body} parsed"),
                (Err(e), Some(_)) => panic!("{body}: {e}"),
            }
        }
    }

    #[test]
    fn basic_header_is_sensitive_base64() {
        let header = basic_header("alice", &Secret::new("pw"));
        assert!(header.is_sensitive());
        assert_eq!(header.to_str().unwrap(), "Basic YWxpY2U6cHc=");
    }
}
