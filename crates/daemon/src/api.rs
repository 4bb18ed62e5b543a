//! The local API: the node daemon's socket (`POST`/`DELETE`/`GET
//! /mounts`) and each mount's stats socket (`GET /stats`), where they are,
//! what they answer, and the clients `darter mount -d`, `darter unmount`,
//! `darter stats` and the snapshotter use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use darter_cache::StatsSnapshot;
use sha2::{Digest as _, Sha256};

/// What `GET /stats` returns.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatsReport {
    /// The image mounted.
    pub image: String,
    /// Where.
    pub mountpoint: PathBuf,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the mount became ready.
    pub uptime_seconds: f64,
    /// The API socket of the node daemon serving it (None: a foreground
    /// `darter mount`).
    #[serde(default)]
    pub daemon_socket: Option<PathBuf>,
    /// The chunk store's counters.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No daemon answers for that mountpoint.
    #[error("no Darter daemon serves {} (socket {}: {source})", mountpoint.display(), socket.display())]
    NoDaemon {
        /// The mountpoint asked about.
        mountpoint: PathBuf,
        /// The socket tried.
        socket: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Nothing answers on a daemon's socket.
    #[error("no Darter daemon answers on {}: {source}", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The daemon refused the request.
    #[error("the Darter daemon at {} refused ({status}): {message}", socket.display())]
    Refused {
        /// The socket.
        socket: PathBuf,
        /// The HTTP status.
        status: u16,
        /// The daemon's error message.
        message: String,
    },
    /// The daemon answered something unexpected.
    #[error("bad answer from the daemon at {}: {detail}", socket.display())]
    BadAnswer {
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Where daemons keep their sockets: `/run/darter` for root, else
/// `$XDG_RUNTIME_DIR/darter` or a per-user directory under /tmp.
pub fn runtime_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/darter");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("darter"),
        None => {
            std::env::temp_dir().join(format!("darter-{}", rustix::process::geteuid().as_raw()))
        }
    }
}

/// The API socket of the daemon serving `mountpoint` (named by a hash of
/// its canonical path, so any spelling of the path finds it).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    mount_state(mountpoint, "sock")
}

/// Where the daemon serving `mountpoint` through the kernel's EROFS driver
/// mounts its devices filesystem (see `darter_fuse::DevicesFs`).
pub fn devices_dir(mountpoint: &Path) -> PathBuf {
    mount_state(mountpoint, "devices")
}

/// `<runtime dir>/mounts/<hash of the canonical mountpoint>.<extension>`.
fn mount_state(mountpoint: &Path, extension: &str) -> PathBuf {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    let hash = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    runtime_dir()
        .join("mounts")
        .join(format!("{}.{extension}", &hex::encode(hash)[..16]))
}

/// Asks the daemon serving `mountpoint` for its counters (on the
/// mountpoint's own stats socket, which the node daemon serves for each of
/// its mounts).
pub fn query_stats(mountpoint: &Path) -> Result<StatsReport, ApiError> {
    let socket = socket_path(mountpoint);
    let answer = call(&socket, "GET", "/stats", None, SHORT_CALL).map_err(|e| match e {
        ApiError::Unreachable { socket, source } => ApiError::NoDaemon {
            mountpoint: mountpoint.to_owned(),
            socket,
            source,
        },
        other => other,
    })?;
    parse(&socket, &answer)
}

/// The node daemon's API socket when none is named: `daemon.sock` in the
/// [`runtime_dir`].
pub fn default_node_socket() -> PathBuf {
    runtime_dir().join("daemon.sock")
}

/// The node daemon `darter mount -d` uses for mounts with the chunk cache
/// `cache`: [`default_node_socket`] for the default cache, else
/// `daemon-<hash of the canonical cache path>.sock` in the
/// [`runtime_dir`] (mounts share a daemon when they share a cache).
pub fn node_socket_for_cache(cache: &Path) -> PathBuf {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let cache = canonical(cache);
    if cache == canonical(&darter_cache::default_cache_dir()) {
        return default_node_socket();
    }
    let hash = Sha256::digest(cache.as_os_str().as_encoded_bytes());
    runtime_dir().join(format!("daemon-{}.sock", &hex::encode(hash)[..16]))
}

/// Registry credentials for one mount, sent in a [`MountRequest`] over the
/// node daemon's socket (mode 0600). Never printed: `Debug` hides them.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

/// `POST /mounts`: what to mount where, and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountRequest {
    /// The image: `oci:PATH[:TAG]` or a registry reference.
    pub image: String,
    /// Where (an absolute path).
    pub mountpoint: PathBuf,
    /// How the kernel sees the mount.
    #[serde(default)]
    pub frontend: crate::Frontend,
    /// Fetch the whole image in the background.
    #[serde(default)]
    pub prefetch_all: bool,
    /// FUSE request threads.
    pub threads: usize,
    /// The keeper to hand the mount's FUSE device to.
    #[serde(default)]
    pub keeper: Option<PathBuf>,
    /// Take over the mount the keeper holds at the mountpoint.
    #[serde(default)]
    pub takeover: bool,
    /// Registry credentials for the image's registry.
    #[serde(default)]
    pub credentials: Option<Credentials>,
    /// Talk to the image's registry over plain HTTP (as the client was
    /// told), whatever the daemon's own configuration says.
    #[serde(default)]
    pub plain_http: bool,
    /// The chunk cache directory, if not the daemon's own (mounts of one
    /// directory share one cache handle).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

/// `DELETE /mounts`: the mount to unmount and forget.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UnmountRequest {
    /// Its mountpoint, as it was mounted.
    pub mountpoint: PathBuf,
}

/// One mount of a node daemon, in `GET /mounts`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountListing {
    /// The counters, image, mountpoint and pid.
    #[serde(flatten)]
    pub report: StatsReport,
    /// How the kernel sees it.
    pub frontend: crate::Frontend,
    /// The keeper holding its device, if any.
    pub keeper: Option<PathBuf>,
}

/// What `GET /mounts` returns.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// The node daemon's process id.
    pub pid: u32,
    /// Its chunk cache directory (a mount may ask for another).
    pub cache_dir: PathBuf,
    /// Its mounts.
    pub mounts: Vec<MountListing>,
}

/// An error answer of the node daemon: `{"error": "..."}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ErrorBody {
    pub error: String,
}

/// The node daemon at `socket`: its pid, cache and mounts.
pub fn node_status(socket: &Path) -> Result<NodeStatus, ApiError> {
    let answer = call(socket, "GET", "/mounts", None, SHORT_CALL)?;
    parse(socket, &answer)
}

/// Has the node daemon at `socket` mount (or take over) what `request`
/// says; returns once the mount serves, with its first counters.
pub fn request_mount(socket: &Path, request: &MountRequest) -> Result<StatsReport, ApiError> {
    let body = serde_json::to_vec(request).map_err(|e| ApiError::BadAnswer {
        socket: socket.to_owned(),
        detail: e.to_string(),
    })?;
    let answer = call(socket, "POST", "/mounts", Some(&body), MOUNT_CALL)?;
    parse(socket, &answer)
}

/// Has the node daemon at `socket` unmount the mount at `mountpoint` (a
/// busy one is detached after a while) and forget it.
pub fn request_unmount(socket: &Path, mountpoint: &Path) -> Result<(), ApiError> {
    let request = UnmountRequest {
        mountpoint: mountpoint.to_owned(),
    };
    let body = serde_json::to_vec(&request).map_err(|e| ApiError::BadAnswer {
        socket: socket.to_owned(),
        detail: e.to_string(),
    })?;
    call(socket, "DELETE", "/mounts", Some(&body), MOUNT_CALL).map(drop)
}

/// How long a query may take.
const SHORT_CALL: Duration = Duration::from_secs(10);
/// How long a mount or unmount may take (the bootstrap may come from a
/// slow registry; an unmount waits for a busy mount).
const MOUNT_CALL: Duration = Duration::from_secs(300);

/// One request on a unix socket; the body of a 2xx answer.
fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, ApiError> {
    let unreachable = |source| ApiError::Unreachable {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).map_err(unreachable)?;
    let mut answer = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(unreachable)?;
    let bad = |detail: String| ApiError::BadAnswer {
        socket: socket.to_owned(),
        detail,
    };
    let text = String::from_utf8(answer).map_err(|_| bad("not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no status in {status_line:?}")))?;
    if !(200..300).contains(&status) {
        let message = serde_json::from_str::<ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| status_line.to_owned());
        return Err(ApiError::Refused {
            socket: socket.to_owned(),
            status,
            message,
        });
    }
    Ok(body.to_owned())
}

fn parse<T: for<'de> serde::Deserialize<'de>>(socket: &Path, body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body).map_err(|e| ApiError::BadAnswer {
        socket: socket.to_owned(),
        detail: e.to_string(),
    })
}
