//! A real OCI registry for tests: CNCF distribution (Debian package
//! `docker-registry`) on a free loopback port with its own storage, either
//! anonymous, with htpasswd Basic auth, or with Bearer token auth backed by
//! an in-process [`TokenService`] whose tokens the registry trusts.
//!
//! [`TestRegistry`] waits until `/v2/` answers and kills the registry and
//! removes its files on drop. [`TestRegistry::start_placed`] runs it
//! elsewhere (e.g. inside a network namespace, behind a command prefix
//! such as `nsenter --net=...`) at a given address.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::Request;
use hyper::body::Incoming;

use crate::faultproxy::{Body, LoopbackServer, response};

/// The registry binary from the Debian package.
const REGISTRY_BINARY: &str = "docker-registry";
/// The `service` the registry expects in tokens.
pub const TOKEN_SERVICE_NAME: &str = "darter-test-registry";
/// The user named in tokens issued for a refresh token.
pub const REFRESH_TOKEN_USER: &str = "refresh-token-user";
/// The `iss` the registry trusts.
const TOKEN_ISSUER: &str = "darter-test-issuer";
/// distribution accepts tokens this long past `exp` (clock-skew leeway).
const REGISTRY_TOKEN_LEEWAY: Duration = Duration::from_secs(60);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// How a [`TestRegistry`] authenticates clients.
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    /// Anyone may pull and push.
    Anonymous,
    /// Basic auth against these `(user, password)` pairs (bcrypt htpasswd).
    Htpasswd(Vec<(String, String)>),
    /// Bearer tokens from a [`TokenService`] started with this config.
    Token(TokenConfig),
}

/// Where and how a [`TestRegistry`] runs when not on a free loopback port
/// of the caller's own network namespace.
pub struct RegistryPlacement {
    /// Prepended to the registry's command line, e.g.
    /// `["nsenter", "--net=/run/netns/NAME"]`. It must exec the registry
    /// (not fork it), so that killing the child kills the registry.
    pub command_prefix: Vec<OsString>,
    /// The address to listen on (it must be free where the registry runs).
    pub addr: SocketAddr,
    /// The directory to create the registry's temporary directory in
    /// (`None`: the system's temp directory).
    pub parent_dir: Option<PathBuf>,
    /// Whether the registry answers at `addr` yet, e.g. [`answers_http`]
    /// called from inside the registry's network namespace.
    pub probe: Box<dyn Fn(SocketAddr) -> bool>,
}

impl std::fmt::Debug for RegistryPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryPlacement")
            .field("command_prefix", &self.command_prefix)
            .field("addr", &self.addr)
            .field("parent_dir", &self.parent_dir)
            .finish_non_exhaustive()
    }
}

/// How to start the registry process and tell that it serves.
struct Launch<'a> {
    command_prefix: &'a [OsString],
    probe: &'a dyn Fn(SocketAddr) -> bool,
}

/// A running registry; killed and cleaned up on drop.
#[derive(Debug)]
pub struct TestRegistry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    token_service: Option<TokenService>,
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> TestRegistry {
        TestRegistry::start_with(&RegistryAuth::Anonymous)
    }

    /// A registry with the given authentication. Panics (failing the test)
    /// if the registry binary is missing or does not come up.
    pub fn start_with(auth: &RegistryAuth) -> TestRegistry {
        let (dir, token_service, auth_yaml) = prepare(auth, None);
        let launch = Launch {
            command_prefix: &[],
            probe: &answers_http,
        };
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr = free_loopback_addr();
            match spawn_registry(dir.path(), addr, &auth_yaml, &launch) {
                Ok(child) => {
                    return TestRegistry {
                        child,
                        addr,
                        dir,
                        token_service,
                    };
                }
                // Another test may have grabbed the port between our probe
                // and the registry's bind: try another one.
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("docker-registry did not start:\n{log}"),
            }
        }
        panic!("docker-registry found no free port:\n{last_log}");
    }

    /// A registry started as `placement` says. Panics (failing the test)
    /// if it does not come up.
    pub fn start_placed(auth: &RegistryAuth, placement: &RegistryPlacement) -> TestRegistry {
        let (dir, token_service, auth_yaml) = prepare(auth, placement.parent_dir.as_deref());
        let launch = Launch {
            command_prefix: &placement.command_prefix,
            probe: &placement.probe,
        };
        match spawn_registry(dir.path(), placement.addr, &auth_yaml, &launch) {
            Ok(child) => TestRegistry {
                child,
                addr: placement.addr,
                dir,
                token_service,
            },
            Err(log) => panic!("docker-registry did not start at {placement:?}:\n{log}"),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the registry stores blobs and manifests.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// How many requests for `/v2/...` the registry has answered so far,
    /// counted in its access log. The log line is written once the answer
    /// is sent, so a count taken right after a client saw its last answer
    /// may still miss that one request.
    pub fn requests_served(&self) -> u64 {
        let log = std::fs::read_to_string(log_path(self.dir.path(), self.addr)).unwrap_or_default();
        log.lines().filter(|line| is_api_request(line)).count() as u64
    }

    /// How many response body bytes the registry has sent for `/v2/...`
    /// requests so far, from its access log (late as [`Self::requests_served`]).
    pub fn bytes_served(&self) -> u64 {
        let log = std::fs::read_to_string(log_path(self.dir.path(), self.addr)).unwrap_or_default();
        log.lines()
            .filter(|line| is_api_request(line))
            .filter_map(response_size)
            .sum()
    }

    /// The token service, for registries started with [`RegistryAuth::Token`].
    pub fn token_service(&self) -> Option<&TokenService> {
        self.token_service.as_ref()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's directory (in `parent`, or the temp directory), its token
/// service, and the `auth` section of its config.
fn prepare(
    auth: &RegistryAuth,
    parent: Option<&Path>,
) -> (tempfile::TempDir, Option<TokenService>, String) {
    let mut builder = tempfile::Builder::new();
    builder.prefix("darter-registry-");
    let dir = match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .expect("registry temp dir");
    let token_service = match auth {
        RegistryAuth::Token(config) => Some(TokenService::start(config.clone())),
        _ => None,
    };
    let auth_yaml = auth_section(auth, dir.path(), token_service.as_ref());
    (dir, token_service, auth_yaml)
}

fn free_loopback_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    probe.local_addr().expect("probe address")
}

/// Whether an access log line (combined log format) records a request for
/// the registry API: `... [time] "METHOD /v2/... HTTP/1.1" status ...`.
fn is_api_request(line: &str) -> bool {
    line.split_once("] \"")
        .and_then(|(_, request)| request.split_once(' '))
        .is_some_and(|(method, path)| {
            method.chars().all(|c| c.is_ascii_uppercase()) && path.starts_with("/v2/")
        })
}

/// The response size of an access log line: `... "REQUEST" STATUS SIZE ...`.
fn response_size(line: &str) -> Option<u64> {
    let (_, request_and_rest) = line.split_once("] \"")?;
    let (_, rest) = request_and_rest.split_once("\" ")?;
    rest.split(' ').nth(1)?.parse().ok()
}

/// Where the registry at `addr` with its data in `dir` logs.
fn log_path(dir: &Path, addr: SocketAddr) -> PathBuf {
    dir.join(format!("registry-{}.log", addr.port()))
}

/// Writes the config, starts the registry and waits until `/v2/` answers.
/// On failure returns the registry's log.
fn spawn_registry(
    dir: &Path,
    addr: SocketAddr,
    auth_yaml: &str,
    launch: &Launch<'_>,
) -> Result<Child, String> {
    let config = dir.join("config.yml");
    let log_path = log_path(dir, addr);
    // The access log (one line per request, on stdout) is what
    // `requests_served` counts.
    let yaml = format!(
        "version: 0.1\n\
         log: {{level: warn}}\n\
         storage:\n  filesystem: {{rootdirectory: {storage}}}\n  delete: {{enabled: true}}\n  \
         maintenance: {{uploadpurging: {{enabled: false}}}}\n\
         http: {{addr: \"{addr}\", secret: darter-test-secret}}\n\
         {auth_yaml}",
        storage = yaml_string(&dir.join("storage")),
    );
    std::fs::write(&config, yaml).expect("write registry config");
    let log = std::fs::File::create(&log_path).expect("create registry log");
    let log_err = log.try_clone().expect("clone registry log handle");
    let mut command = match launch.command_prefix.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(REGISTRY_BINARY);
            command
        }
        None => Command::new(REGISTRY_BINARY),
    };
    let mut child = command
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {REGISTRY_BINARY} ({e}); install it with `apt-get install -y docker-registry`")
        });
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}:\n{}", read_log()));
        }
        if (launch.probe)(addr) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "/v2/ not answering after {STARTUP_TIMEOUT:?}:\n{}",
                read_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True once something at `addr` answers `GET /v2/` with an HTTP status line.
pub fn answers_http(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// A path as a double-quoted YAML (JSON) string.
fn yaml_string(path: &Path) -> String {
    serde_json::to_string(&path.to_string_lossy()).expect("strings serialise")
}

fn auth_section(auth: &RegistryAuth, dir: &Path, tokens: Option<&TokenService>) -> String {
    match (auth, tokens) {
        (RegistryAuth::Htpasswd(users), _) => {
            let path = dir.join("htpasswd");
            std::fs::write(&path, htpasswd(users)).expect("write htpasswd");
            format!(
                "auth:\n  htpasswd: {{realm: darter-test, path: {}}}\n",
                yaml_string(&path)
            )
        }
        (RegistryAuth::Token(_), Some(tokens)) => {
            let bundle = dir.join("token-ca.pem");
            std::fs::write(&bundle, &tokens.certificate_pem).expect("write token cert bundle");
            format!(
                "auth:\n  token: {{realm: \"{}/token\", service: {TOKEN_SERVICE_NAME}, \
                 issuer: {TOKEN_ISSUER}, rootcertbundle: {}}}\n",
                tokens.url(),
                yaml_string(&bundle)
            )
        }
        _ => String::new(),
    }
}

/// An htpasswd file with bcrypt hashes (cost 4: fast, still what
/// distribution verifies).
fn htpasswd(users: &[(String, String)]) -> String {
    users
        .iter()
        .map(|(user, password)| {
            let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
            format!("{user}:{hash}\n")
        })
        .collect()
}

/// Settings of a [`TokenService`].
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// How long the registry accepts each token.
    pub validity: Duration,
    /// The `expires_in` told to clients; `None` leaves it out (clients then
    /// assume 60 s). Telling more than `validity` makes the registry reject
    /// tokens clients still think valid.
    pub expires_in: Option<u64>,
    /// Users allowed to get tokens, as `(user, password)`; empty means
    /// anonymous clients get tokens too.
    pub users: Vec<(String, String)>,
    /// Put the token in `access_token` instead of `token`.
    pub use_access_token_field: bool,
    /// An OAuth2 refresh token (docker's `identitytoken`) accepted by the
    /// `grant_type=refresh_token` POST; `None` refuses such POSTs.
    pub refresh_token: Option<String>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            validity: Duration::from_secs(300),
            expires_in: Some(300),
            users: Vec::new(),
            use_access_token_field: false,
            refresh_token: None,
        }
    }
}

/// One request the token service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic-auth user, if any.
    pub user: Option<String>,
    /// The `scope` parameters.
    pub scopes: Vec<String>,
    /// True for the OAuth2 refresh-token POST.
    pub via_refresh_token: bool,
    /// The HTTP status answered.
    pub status: u16,
}

/// An in-process token service (JWT, ES256, certificate in `x5c`) granting
/// every requested action to authenticated users.
#[derive(Debug)]
pub struct TokenService {
    server: LoopbackServer,
    certificate_pem: String,
    log: Arc<Mutex<Vec<TokenRequest>>>,
}

struct Issuer {
    config: TokenConfig,
    key: ring::signature::EcdsaKeyPair,
    certificate_der: Vec<u8>,
    log: Arc<Mutex<Vec<TokenRequest>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TokenService {
    /// Starts the service with a fresh self-signed signing certificate.
    pub fn start(config: TokenConfig) -> TokenService {
        let certified = rcgen::generate_simple_self_signed(vec![TOKEN_ISSUER.to_owned()])
            .expect("generate token signing certificate");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &certified.signing_key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .expect("load token signing key");
        let log = Arc::new(Mutex::new(Vec::new()));
        let issuer = Arc::new(Issuer {
            config,
            key,
            certificate_der: certified.cert.der().to_vec(),
            log: log.clone(),
        });
        let server = LoopbackServer::start(move |request| {
            let issuer = issuer.clone();
            async move { issuer.answer(request).await }
        });
        TokenService {
            server,
            certificate_pem: certified.cert.pem(),
            log,
        }
    }

    /// `http://127.0.0.1:PORT` (the realm is `URL/token`).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.log).clone()
    }

    /// How many tokens were issued.
    pub fn issued(&self) -> usize {
        lock(&self.log).iter().filter(|r| r.status == 200).count()
    }
}

impl Issuer {
    /// GET with optional Basic credentials, or the OAuth2 refresh-token POST.
    async fn answer(&self, request: Request<Incoming>) -> hyper::Response<Body> {
        let (parts, body) = request.into_parts();
        let via_refresh_token = parts.method == hyper::Method::POST;
        let (params, user) = if via_refresh_token {
            let form = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let params = form_params(&form);
            let user = self.refresh_token_user(&params);
            (params, user)
        } else {
            let query = parts.uri.query().unwrap_or_default();
            let user = basic_user(&parts.headers, &self.config.users);
            (form_params(query.as_bytes()), user)
        };
        let scopes: Vec<String> = params
            .iter()
            .filter(|(key, _)| key == "scope")
            .flat_map(|(_, value)| {
                value
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            })
            .collect();
        lock(&self.log).push(TokenRequest {
            user: user.clone().ok().flatten(),
            scopes: scopes.clone(),
            via_refresh_token,
            status: if user.is_ok() { 200 } else { 401 },
        });
        match user {
            Err(()) => response(
                401,
                &[("www-authenticate", "Basic realm=token")],
                "bad credentials",
            ),
            Ok(user) => {
                let body = self.token_json(user.as_deref(), &scopes);
                response(200, &[("content-type", "application/json")], body)
            }
        }
    }

    /// The user of a valid `grant_type=refresh_token` form.
    fn refresh_token_user(&self, params: &[(String, String)]) -> Result<Option<String>, ()> {
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let valid = param("grant_type") == Some("refresh_token")
            && param("refresh_token").is_some()
            && param("refresh_token") == self.config.refresh_token.as_deref();
        if valid {
            Ok(Some(REFRESH_TOKEN_USER.to_owned()))
        } else {
            Err(())
        }
    }

    fn token_json(&self, user: Option<&str>, scopes: &[String]) -> String {
        let now = SystemTime::now();
        let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("clock after 1970");
        let unix_now = since_epoch(now).as_secs();
        // The registry accepts tokens until exp + leeway: aim that at the
        // validity, rounded up so no token dies early.
        let valid_until = since_epoch(now + self.config.validity).as_secs() + 1;
        let exp = valid_until.saturating_sub(REGISTRY_TOKEN_LEEWAY.as_secs());
        let access: Vec<serde_json::Value> =
            scopes.iter().filter_map(|s| access_entry(s)).collect();
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER,
            "sub": user.unwrap_or(""),
            "aud": TOKEN_SERVICE_NAME,
            "exp": exp,
            "nbf": unix_now.saturating_sub(1),
            "iat": unix_now,
            "jti": format!("{unix_now}-{}", lock(&self.log).len()),
            "access": access,
        });
        let certificate = base64::engine::general_purpose::STANDARD.encode(&self.certificate_der);
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [certificate]});
        let jwt = self.sign(&header, &claims);
        let field = if self.config.use_access_token_field {
            "access_token"
        } else {
            "token"
        };
        let mut body = serde_json::json!({
            field: jwt,
            "issued_at": humantime::format_rfc3339_millis(now).to_string(),
        });
        if let Some(expires_in) = self.config.expires_in {
            body["expires_in"] = expires_in.into();
        }
        body.to_string()
    }

    fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .expect("ECDSA signing");
        format!("{signing_input}.{}", b64.encode(signature.as_ref()))
    }
}

fn form_params(form: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(form).into_owned().collect()
}

/// `repository:NAME:a,b` as a JWT access claim entry.
fn access_entry(scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some(serde_json::json!({
        "type": kind,
        "name": name,
        "actions": actions.split(',').collect::<Vec<_>>(),
    }))
}

/// `Ok(Some(user))` for valid Basic credentials, `Ok(None)` for anonymous
/// requests when no users are configured, `Err` otherwise.
fn basic_user(
    headers: &hyper::HeaderMap,
    users: &[(String, String)],
) -> Result<Option<String>, ()> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    match presented {
        None if users.is_empty() => Ok(None),
        None => Err(()),
        Some(pair) => {
            let (user, password) = pair.split_once(':').ok_or(())?;
            let known = users.iter().any(|(u, p)| u == user && p == password);
            if known || users.is_empty() {
                Ok(Some(user.to_owned()))
            } else {
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET path` with optional Basic credentials; returns the status code.
    fn get_status(addr: SocketAddr, path: &str, auth: Option<&str>) -> u16 {
        let mut stream = TcpStream::connect(addr).unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply[9..12].parse().unwrap()
    }

    #[test]
    fn anonymous_registry_answers_and_cleans_up() {
        let registry = TestRegistry::start();
        assert_eq!(get_status(registry.addr(), "/v2/", None), 200);
        assert!(registry.url().starts_with("http://127.0.0.1:"));
        let storage = registry.storage_dir();
        let addr = registry.addr();
        let dir = storage.parent().unwrap().to_owned();
        drop(registry);
        assert!(!dir.exists());
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn requests_served_counts_api_requests_from_the_access_log() {
        let registry = TestRegistry::start();
        let before = registry.requests_served();
        assert_eq!(get_status(registry.addr(), "/v2/", None), 200);
        assert_eq!(get_status(registry.addr(), "/v2/a/manifests/b", None), 404);
        assert_eq!(get_status(registry.addr(), "/not-the-api", None), 404);
        crate::process::wait_until(
            Duration::from_secs(10),
            "the access log to record two API requests",
            || registry.requests_served() == before + 2,
        );
    }

    #[test]
    fn access_log_lines_are_told_from_other_log_lines() {
        for (line, api) in [
            (
                r#"127.0.0.1 - - [28/Nov/2026:14:11:22 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl""#,
                true,
            ),
            (
                r#"10.0.0.2 - - [28/Nov/2026:14:11:22 +0000] "HEAD /v2/x/blobs/sha256:00 HTTP/1.1" 404 157 "" "c""#,
                true,
            ),
            (
                r#"10.0.0.2 - - [28/Nov/2026:14:11:22 +0000] "GET /debug HTTP/1.1" 404 1 "" "c""#,
                false,
            ),
            (
                r#"time="2026" level=error msg="response completed" http.request.uri="/v2/x""#,
                false,
            ),
            ("", false),
        ] {
            assert_eq!(is_api_request(line), api, "{line}");
        }
    }

    #[test]
    fn access_log_lines_tell_response_sizes() {
        let line = r#"127.0.0.1 - - [28/Nov/2026:14:11:22 +0000] "GET /v2/a/blobs/x HTTP/1.1" 206 4194304 "" "c""#;
        assert_eq!(response_size(line), Some(4_194_304));
        assert_eq!(
            response_size(r#"x [t] "HEAD /v2/ HTTP/1.1" 200 - "" "c""#),
            None
        );
        assert_eq!(response_size("garbage"), None);
    }

    #[test]
    fn placed_registry_runs_behind_the_prefix_in_the_given_directory() {
        let parent = tempfile::tempdir().unwrap();
        let probes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = probes.clone();
        let placement = RegistryPlacement {
            // `env NAME=VALUE PROGRAM` execs PROGRAM: the registry is the child.
            command_prefix: vec!["env".into(), "DARTER_PLACED=1".into()],
            addr: free_loopback_addr(),
            parent_dir: Some(parent.path().to_path_buf()),
            probe: Box::new(move |addr| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                answers_http(addr)
            }),
        };
        let registry = TestRegistry::start_placed(&RegistryAuth::Anonymous, &placement);
        assert_eq!(registry.addr(), placement.addr);
        assert!(registry.storage_dir().starts_with(parent.path()));
        assert!(probes.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        assert_eq!(get_status(registry.addr(), "/v2/", None), 200);
        let environ = std::fs::read(format!("/proc/{}/environ", registry.child.id())).unwrap();
        assert!(
            environ.split(|b| *b == 0).any(|v| v == b"DARTER_PLACED=1"),
            "the registry did not run behind the prefix"
        );
        let addr = registry.addr();
        drop(registry);
        assert!(TcpStream::connect(addr).is_err());
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    #[test]
    fn htpasswd_registry_checks_passwords() {
        let users = vec![("alice".to_owned(), "wonderland".to_owned())];
        let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users));
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
        );
        let bad = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:nope")
        );
        assert_eq!(get_status(registry.addr(), "/v2/", None), 401);
        assert_eq!(get_status(registry.addr(), "/v2/", Some(&bad)), 401);
        assert_eq!(get_status(registry.addr(), "/v2/", Some(&good)), 200);
    }

    #[test]
    fn registry_trusts_tokens_from_the_token_service() {
        let registry = TestRegistry::start_with(&RegistryAuth::Token(TokenConfig::default()));
        let tokens = registry.token_service().unwrap();
        assert_eq!(get_status(registry.addr(), "/v2/", None), 401);
        let mut stream = TcpStream::connect(tokens.server.addr()).unwrap();
        write!(
            stream,
            "GET /token?service=s&scope=repository:a/b:pull HTTP/1.0\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let body: serde_json::Value =
            serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let token = body["token"].as_str().unwrap();
        assert_eq!(body["expires_in"], 300);
        let bearer = format!("Bearer {token}");
        assert_eq!(get_status(registry.addr(), "/v2/", Some(&bearer)), 200);
        assert_eq!(
            get_status(registry.addr(), "/v2/", Some("Bearer forged.token.x")),
            401
        );
        assert_eq!(tokens.issued(), 1);
        assert_eq!(tokens.requests()[0].scopes, ["repository:a/b:pull"]);
    }
}
