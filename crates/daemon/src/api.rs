//! The local API of a mount daemon: where its socket is, what it answers,
//! and the client `darter stats` uses.

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
    /// The chunk store's counters.
    #[serde(flatten)]
    pub stats: StatsSnapshot,
}

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No daemon answers for that mountpoint.
    #[error("no Darter daemon serves {mountpoint} (socket {socket}: {source})")]
    NoDaemon {
        /// The mountpoint asked about.
        mountpoint: PathBuf,
        /// The socket tried.
        socket: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The daemon answered something unexpected.
    #[error("bad answer from the daemon at {socket}: {detail}")]
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

/// Asks the daemon serving `mountpoint` for its counters.
pub fn query_stats(mountpoint: &Path) -> Result<StatsReport, ApiError> {
    let socket = socket_path(mountpoint);
    let no_daemon = |source| ApiError::NoDaemon {
        mountpoint: mountpoint.to_owned(),
        socket: socket.clone(),
        source,
    };
    let mut stream = UnixStream::connect(&socket).map_err(no_daemon)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(no_daemon)?;
    stream
        .write_all(b"GET /stats HTTP/1.0\r\n\r\n")
        .map_err(no_daemon)?;
    let mut answer = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(no_daemon)?;
    let bad = |detail: String| ApiError::BadAnswer {
        socket: socket.clone(),
        detail,
    };
    let text = String::from_utf8(answer).map_err(|_| bad("not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end".into()))?;
    if !head.starts_with("HTTP/1.0 200") {
        return Err(bad(head.lines().next().unwrap_or_default().to_owned()));
    }
    serde_json::from_str(body).map_err(|e| bad(e.to_string()))
}
