//! Registry credentials: explicit ones from the command line, else docker's
//! `config.json` (`credHelpers`, `credsStore`, `auths`), the same sources and
//! order docker uses.
//!
//! Secrets are held in [`Secret`], whose `Debug` and `Display` never show the
//! value, so credentials cannot leak through logs or error messages.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::reference::DOCKER_HUB;

/// The key docker uses for Docker Hub in `config.json` and with helpers.
const DOCKER_HUB_SERVER_URL: &str = "https://index.docker.io/v1/";
/// Longest time a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// The username a helper returns when its secret is an identity token.
const IDENTITY_TOKEN_USERNAME: &str = "<token>";

/// A secret string (password, token). Its `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret value, for putting on the wire. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or personal access token), sent with Basic
    /// auth to the registry or its token service.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the
    /// token service for access tokens.
    IdentityToken {
        /// The user name (may be empty).
        username: String,
        /// The refresh token.
        token: Secret,
    },
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `config.json` exists but cannot be read.
    #[error("cannot read docker config {path}: {error}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// `config.json` is not valid JSON of the expected shape.
    #[error("cannot parse docker config {path}: {error}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        error: serde_json::Error,
    },
    /// An `auths` entry's `auth` field is not base64 of `user:password`.
    #[error("docker config {path}: the auth entry for {registry} is not base64 of USER:PASSWORD")]
    BadAuthEntry {
        /// The file.
        path: PathBuf,
        /// The registry key of the entry.
        registry: String,
    },
    /// A credential helper name that could escape its directory.
    #[error("invalid credential helper name {helper:?} for {registry}")]
    BadHelperName {
        /// The name from the config.
        helper: String,
        /// The registry.
        registry: String,
    },
    /// The helper could not be run or misbehaved.
    #[error("credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    Helper {
        /// The helper's name.
        helper: String,
        /// The registry.
        registry: String,
        /// What went wrong (stderr or exit status; helpers print no secrets there).
        reason: String,
    },
}

/// Where a [`Client`](crate::Client) gets credentials from.
///
/// Lookup order for a registry: explicit credentials, then the docker config's
/// `credHelpers` entry, then its `credsStore`, then its `auths` entry.
#[derive(Debug, Clone, Default)]
pub struct CredentialSource {
    docker_config: Option<PathBuf>,
    helper_dirs: Option<Vec<PathBuf>>,
    explicit: HashMap<String, Credential>,
}

impl CredentialSource {
    /// No credentials at all: every request is anonymous.
    pub fn anonymous() -> CredentialSource {
        CredentialSource::default()
    }

    /// Docker's config from `$DOCKER_CONFIG/config.json`, else
    /// `$HOME/.docker/config.json` (a missing file means no credentials).
    pub fn from_environment() -> CredentialSource {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")));
        match dir {
            Some(dir) => CredentialSource::from_docker_config_dir(dir),
            None => CredentialSource::anonymous(),
        }
    }

    /// Docker's config from `DIR/config.json`.
    pub fn from_docker_config_dir(dir: impl Into<PathBuf>) -> CredentialSource {
        CredentialSource {
            docker_config: Some(dir.into().join("config.json")),
            ..CredentialSource::default()
        }
    }

    /// Looks for `docker-credential-*` helpers only in `dirs` instead of `PATH`.
    pub fn with_helper_dirs(mut self, dirs: Vec<PathBuf>) -> CredentialSource {
        self.helper_dirs = Some(dirs);
        self
    }

    /// Uses `username`/`password` for `registry` (e.g. from `--username` and
    /// `--password-stdin`), overriding anything in the docker config.
    pub fn with_explicit(
        mut self,
        registry: &str,
        username: impl Into<String>,
        password: Secret,
    ) -> CredentialSource {
        let credential = Credential::Basic {
            username: username.into(),
            password,
        };
        self.explicit.insert(normalise_server(registry), credential);
        self
    }

    /// The credentials for `registry` (`host[:port]`, Docker Hub as
    /// `docker.io`), or `None` to go anonymous.
    pub async fn lookup(&self, registry: &str) -> Result<Option<Credential>, CredentialError> {
        let registry = normalise_server(registry);
        if let Some(credential) = self.explicit.get(&registry) {
            return Ok(Some(credential.clone()));
        }
        let Some(path) = &self.docker_config else {
            return Ok(None);
        };
        let Some(config) = read_docker_config(path).await? else {
            return Ok(None);
        };
        let helper = config
            .cred_helpers
            .iter()
            .find(|(key, _)| normalise_server(key) == registry)
            .map(|(_, helper)| helper)
            .or(config.creds_store.as_ref())
            .filter(|helper| !helper.is_empty());
        if let Some(helper) = helper
            && let Some(credential) = self.run_helper(helper, &registry).await?
        {
            return Ok(Some(credential));
        }
        config.auth_entry(path, &registry)
    }

    async fn run_helper(
        &self,
        helper: &str,
        registry: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let fail = |reason: String| CredentialError::Helper {
            helper: helper.to_owned(),
            registry: registry.to_owned(),
            reason,
        };
        if helper.contains(['/', '\\']) || helper.starts_with('.') {
            return Err(CredentialError::BadHelperName {
                helper: helper.to_owned(),
                registry: registry.to_owned(),
            });
        }
        let program = self.helper_program(helper).ok_or_else(|| {
            fail(format!(
                "docker-credential-{helper} not found in the helper directories"
            ))
        })?;
        let mut child = spawn_helper(&program)
            .await
            .map_err(|e| fail(format!("cannot run {}: {e}", program.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(server_url(registry).as_bytes())
                .await
                .map_err(|e| fail(format!("cannot write to its stdin: {e}")))?;
        }
        let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {HELPER_TIMEOUT:?}")))?
            .map_err(|e| fail(format!("cannot read its output: {e}")))?;
        if !output.status.success() {
            let stdout = String::from_utf8_lossy(&output.stdout);
            if stdout.contains("credentials not found") {
                return Ok(None);
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(fail(format!("{}: {}", output.status, first_line(&stderr))));
        }
        parse_helper_output(&output.stdout).map(Some).map_err(fail)
    }

    fn helper_program(&self, helper: &str) -> Option<PathBuf> {
        let name = format!("docker-credential-{helper}");
        match &self.helper_dirs {
            Some(dirs) => dirs.iter().map(|dir| dir.join(&name)).find(|p| p.is_file()),
            None => Some(PathBuf::from(name)),
        }
    }
}

/// Starts `program get`. Retries briefly on ETXTBSY: a helper just written
/// (e.g. installed a moment ago) stays "busy" while any process forked
/// meanwhile still holds its write descriptor.
async fn spawn_helper(program: &Path) -> std::io::Result<tokio::process::Child> {
    let mut attempt = 0;
    loop {
        let spawned = tokio::process::Command::new(program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// The server URL docker hands helpers and uses as `auths` key.
fn server_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_SERVER_URL.to_owned()
    } else {
        registry.to_owned()
    }
}

/// Maps the many spellings of a server (`https://host/v2/`, `index.docker.io`,
/// ...) to the registry name used in references.
fn normalise_server(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
        other => other.to_owned(),
    }
}

fn first_line(text: &str) -> String {
    const MAX: usize = 200;
    let line = text.lines().next().unwrap_or("").trim();
    line.chars().take(MAX).collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperOutput {
    username: String,
    secret: Secret,
}

fn parse_helper_output(stdout: &[u8]) -> Result<Credential, String> {
    let output: HelperOutput = serde_json::from_slice(stdout)
        .map_err(|e| format!("output is not {{\"Username\",\"Secret\"}} JSON: {e}"))?;
    Ok(if output.username == IDENTITY_TOKEN_USERNAME {
        Credential::IdentityToken {
            username: String::new(),
            token: output.secret,
        }
    } else {
        Credential::Basic {
            username: output.username,
            password: output.secret,
        }
    })
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<Secret>,
    username: Option<String>,
    password: Option<Secret>,
    identitytoken: Option<Secret>,
}

impl DockerConfig {
    fn auth_entry(
        &self,
        path: &Path,
        registry: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let Some((key, entry)) = self
            .auths
            .iter()
            .find(|(key, _)| normalise_server(key) == registry)
        else {
            return Ok(None);
        };
        let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
        if let Some(auth) = entry.auth.as_ref().filter(|a| !a.expose().is_empty()) {
            let bad = || CredentialError::BadAuthEntry {
                path: path.to_owned(),
                registry: key.clone(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.expose().trim())
                .map_err(|_| bad())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
            username = Some(user.to_owned());
            password = Some(Secret::new(pass));
        }
        if let Some(token) = entry
            .identitytoken
            .clone()
            .filter(|t| !t.expose().is_empty())
        {
            return Ok(Some(Credential::IdentityToken {
                username: username.unwrap_or_default(),
                token,
            }));
        }
        Ok(match (username, password) {
            (Some(username), Some(password)) => Some(Credential::Basic { username, password }),
            _ => None,
        })
    }
}

async fn read_docker_config(path: &Path) -> Result<Option<DockerConfig>, CredentialError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| CredentialError::ParseConfig {
                    path: path.to_owned(),
                    error,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CredentialError::ReadConfig {
            path: path.to_owned(),
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn basic(user: &str, pass: &str) -> Option<Credential> {
        Some(Credential::Basic {
            username: user.into(),
            password: Secret::new(pass),
        })
    }

    fn write_config(dir: &Path, json: &str) -> CredentialSource {
        std::fs::write(dir.join("config.json"), json).unwrap();
        CredentialSource::from_docker_config_dir(dir).with_helper_dirs(vec![dir.to_owned()])
    }

    /// Writes `docker-credential-NAME` that logs its stdin and prints `reply`.
    fn write_helper(dir: &Path, name: &str, script_body: &str) {
        let path = dir.join(format!("docker-credential-{name}"));
        let script = format!(
            "#!/bin/sh\nread server\necho \"$1 $server\" >> {}/{name}.log\n{script_body}\n",
            dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn secrets_are_redacted() {
        let credential = basic("alice", "hunter2").unwrap();
        let shown = format!("{credential:?} {}", Secret::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
    }

    #[test]
    fn server_spellings_normalise() {
        let cases = [
            ("https://index.docker.io/v1/", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            ("http://h.io:5000/v2/", "h.io:5000"),
            ("h.io", "h.io"),
        ];
        for (key, want) in cases {
            assert_eq!(normalise_server(key), want, "{key}");
        }
        assert_eq!(server_url("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_url("h.io:5000"), "h.io:5000");
    }

    #[tokio::test]
    async fn auths_entries_in_all_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let source = write_config(
            dir.path(),
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnMzY3JldA=="},
                "plain.io": {"username": "u", "password": "p"},
                "http://tok.io/v2/": {"auth": "", "identitytoken": "refresh"},
                "bad.io": {"auth": "!!notbase64"},
                "empty.io": {}
            }}"#,
        );
        assert_eq!(
            source.lookup("docker.io").await.unwrap(),
            basic("hub", "s3cret")
        );
        assert_eq!(source.lookup("plain.io").await.unwrap(), basic("u", "p"));
        assert_eq!(
            source.lookup("tok.io").await.unwrap(),
            Some(Credential::IdentityToken {
                username: String::new(),
                token: Secret::new("refresh")
            })
        );
        assert_eq!(source.lookup("empty.io").await.unwrap(), None);
        assert_eq!(source.lookup("other.io").await.unwrap(), None);
        let err = source.lookup("bad.io").await.unwrap_err();
        assert!(matches!(err, CredentialError::BadAuthEntry { .. }), "{err}");
    }

    #[tokio::test]
    async fn explicit_credentials_override_config() {
        let dir = tempfile::tempdir().unwrap();
        let source = write_config(dir.path(), r#"{"auths": {"h.io": {"auth": "YTpi"}}}"#)
            .with_explicit("h.io", "cli", Secret::new("pw"));
        assert_eq!(source.lookup("h.io").await.unwrap(), basic("cli", "pw"));
    }

    #[tokio::test]
    async fn missing_config_means_anonymous_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CredentialSource::from_docker_config_dir(dir.path());
        assert_eq!(missing.lookup("h.io").await.unwrap(), None);
        let garbage = write_config(dir.path(), "{not json");
        let err = garbage.lookup("h.io").await.unwrap_err();
        assert!(matches!(err, CredentialError::ParseConfig { .. }), "{err}");
        assert!(err.to_string().contains("config.json"));
    }

    #[tokio::test]
    async fn cred_helpers_take_precedence_and_get_the_server_url() {
        let dir = tempfile::tempdir().unwrap();
        write_helper(
            dir.path(),
            "special",
            r#"echo '{"ServerURL":"x","Username":"sp","Secret":"one"}'"#,
        );
        write_helper(
            dir.path(),
            "store",
            r#"echo '{"Username":"<token>","Secret":"idtok"}'"#,
        );
        let source = write_config(
            dir.path(),
            r#"{"credsStore": "store", "credHelpers": {"h.io:5000": "special"},
                "auths": {"h.io:5000": {"auth": "YTpi"}}}"#,
        );
        assert_eq!(
            source.lookup("h.io:5000").await.unwrap(),
            basic("sp", "one")
        );
        assert_eq!(
            source.lookup("docker.io").await.unwrap(),
            Some(Credential::IdentityToken {
                username: String::new(),
                token: Secret::new("idtok")
            })
        );
        let special_log = std::fs::read_to_string(dir.path().join("special.log")).unwrap();
        assert_eq!(special_log, "get h.io:5000\n");
        let store_log = std::fs::read_to_string(dir.path().join("store.log")).unwrap();
        assert_eq!(store_log, "get https://index.docker.io/v1/\n");
    }

    #[tokio::test]
    async fn helper_not_found_falls_back_to_auths() {
        let dir = tempfile::tempdir().unwrap();
        write_helper(
            dir.path(),
            "store",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        let source = write_config(
            dir.path(),
            r#"{"credsStore": "store", "auths": {"h.io": {"auth": "YTpi"}}}"#,
        );
        assert_eq!(source.lookup("h.io").await.unwrap(), basic("a", "b"));
    }

    #[tokio::test]
    async fn helper_failures_are_typed_and_name_the_helper() {
        let dir = tempfile::tempdir().unwrap();
        write_helper(dir.path(), "broken", "echo 'keychain locked' >&2; exit 3");
        write_helper(dir.path(), "garbage", "echo 'not json'");
        let cases = [
            (r#"{"credsStore": "broken"}"#, "keychain locked"),
            (
                r#"{"credsStore": "garbage"}"#,
                "not {\"Username\",\"Secret\"} JSON",
            ),
            (r#"{"credsStore": "absent"}"#, "not found"),
        ];
        for (config, want) in cases {
            let source = write_config(dir.path(), config);
            let err = source.lookup("h.io").await.unwrap_err();
            assert!(matches!(err, CredentialError::Helper { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
            assert!(err.to_string().contains("h.io"), "{err}");
        }
        let source = write_config(dir.path(), r#"{"credsStore": "../evil"}"#);
        let err = source.lookup("h.io").await.unwrap_err();
        assert!(
            matches!(err, CredentialError::BadHelperName { .. }),
            "{err}"
        );
    }
}
