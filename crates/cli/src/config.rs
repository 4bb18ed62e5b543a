//! The TOML configuration file. Command-line flags override it; it
//! overrides built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Defaults for `darter build`.
    #[serde(default)]
    pub build: BuildConfig,
    /// Defaults for `darter mount`.
    #[serde(default)]
    pub mount: MountConfig,
    /// How registries are talked to.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Per-registry settings, keyed by `host[:port]`.
    #[serde(default)]
    pub registries: std::collections::BTreeMap<String, RegistryEntry>,
}

/// `[registry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Seconds one registry operation (a chunk fetch, say) may take,
    /// retries included, before it fails (and a read gets EIO).
    pub deadline: Option<u64>,
    /// Attempts per operation.
    pub attempts: Option<u32>,
}

/// `[registries."HOST:PORT"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// Talk plain HTTP.
    #[serde(default)]
    pub plain_http: bool,
    /// Read (pull) through this mirror, e.g. a Darter P2P peer's
    /// `http://127.0.0.1:PORT`; pushes still go to the registry.
    pub mirror: Option<String>,
}

/// `[mount]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// Chunk cache directory.
    pub cache: Option<PathBuf>,
    /// none or all.
    pub prefetch: Option<String>,
    /// Prometheus metrics address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// FUSE request threads.
    pub threads: Option<usize>,
    /// fuse or erofs.
    pub frontend: Option<String>,
}

/// `[build]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildConfig {
    /// Chunk size, e.g. "1M".
    pub chunk_size: Option<String>,
    /// zstd, lz4 or none.
    pub compressor: Option<String>,
    /// zstd level.
    pub level: Option<i32>,
    /// blake3 or sha256.
    pub digest: Option<String>,
    /// Frame size, e.g. "128K".
    pub frame_size: Option<String>,
    /// Compression threads.
    pub jobs: Option<usize>,
}

/// Loads the config from `explicit`, else `$DARTER_CONFIG`, else the first
/// of the per-user and system files that exists; none is fine.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
    let env = std::env::var_os("DARTER_CONFIG").map(PathBuf::from);
    let path = match explicit.map(Path::to_path_buf).or(env) {
        Some(p) => p,
        None => match default_paths().into_iter().find(|p| p.is_file()) {
            Some(p) => p,
            None => return Ok(Config::default()),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Where `darter build` keeps its push journals: `$XDG_STATE_HOME/darter/push-journal`,
/// else `~/.local/state/darter/push-journal`; `None` without either variable.
pub fn push_journal_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("darter").join("push-journal"))
}

fn default_paths() -> Vec<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("darter").join("config.toml"));
    user.into_iter()
        .chain([PathBuf::from("/etc/darter/config.toml")])
        .collect()
}

impl Config {
    /// The registry client settings: the config file's, plus plain HTTP for
    /// `plain_http_hosts` (from `--plain-http`) and explicit credentials.
    pub fn client_config(
        &self,
        plain_http_hosts: &[String],
        login: Option<(String, String, String)>,
    ) -> darter_registry::ClientConfig {
        let mut c = darter_registry::ClientConfig::default();
        for (host, entry) in &self.registries {
            if entry.plain_http {
                c.plain_http.insert(host.clone());
            }
            if let Some(mirror) = &entry.mirror {
                c.mirrors.insert(host.clone(), mirror.clone());
            }
        }
        c.plain_http.extend(plain_http_hosts.iter().cloned());
        if let Some(secs) = self.registry.deadline {
            c.retry.operation_deadline = Duration::from_secs(secs);
        }
        if let Some(n) = self.registry.attempts {
            c.retry.max_attempts = n.max(1);
        }
        if let Some((registry, user, password)) = login {
            let creds = darter_registry::CredentialSource::from_environment();
            c.credentials =
                creds.with_explicit(&registry, user, darter_registry::Secret::new(password));
        }
        c
    }
}
