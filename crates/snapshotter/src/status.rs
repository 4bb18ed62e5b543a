//! The node's lazy-loading status: which images this snapshotter serves
//! lazily (and what each mount's daemon fetched), and how often an image
//! was unpacked in full instead, by reason. Lazy loading must never fail
//! over silently: every fallback is logged at warn and counted here.
//!
//! Served as JSON (`GET /status`) on a unix socket under the root, which
//! `darter status` reads, and as Prometheus text (`GET /metrics`) on the
//! same socket and, optionally, on a TCP address.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::remote::MountStats;
use crate::snapshotter::Snapshots;

/// The label on a Prepare by which a client (`darter pull`) reports that
/// it unpacks the image in full, and why (a [`FallbackReason`] name). Set
/// on the image's top layer only, so that an image counts once.
pub const LABEL_FALLBACK: &str = "containerd.io/snapshot/dev.darter.fallback";

/// The status socket's file name under the snapshotter's root.
const STATUS_SOCKET: &str = "status.sock";
/// Longest response `darter status` reads.
const MAX_RESPONSE: u64 = 16 << 20;
/// How long `darter status` waits for an answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The status socket of the snapshotter whose root is `root`.
pub fn status_socket(root: &Path) -> PathBuf {
    root.join(STATUS_SOCKET)
}

/// Why an image was unpacked in full instead of mounted lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FallbackReason {
    /// It is not a Darter image.
    NotDarter,
    /// Its manifest or config could not be read from the registry.
    RegistryError,
    /// A Darter image, asked for a layer that is not one of its own.
    NotALayer,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 3] = [
        FallbackReason::NotDarter,
        FallbackReason::RegistryError,
        FallbackReason::NotALayer,
    ];

    /// The name in labels, JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            FallbackReason::NotDarter => "not-darter",
            FallbackReason::RegistryError => "registry-error",
            FallbackReason::NotALayer => "not-a-layer",
        }
    }

    pub fn from_name(name: &str) -> Option<FallbackReason> {
        FallbackReason::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Fallbacks counted since the snapshotter started, by reason.
#[derive(Debug, Default)]
pub(crate) struct Fallbacks([AtomicU64; FallbackReason::ALL.len()]);

impl Fallbacks {
    pub(crate) fn count(&self, reason: FallbackReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count (zeros included).
    pub(crate) fn by_name(&self) -> BTreeMap<String, u64> {
        FallbackReason::ALL
            .into_iter()
            .map(|r| {
                (
                    r.name().to_owned(),
                    self.0[r as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// What `GET /status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The images mounted lazily, one per remote layer.
    pub lazy_mounts: Vec<LazyMountStatus>,
    /// Images unpacked in full instead, by reason name (since start).
    pub fallbacks: BTreeMap<String, u64>,
}

/// One lazy mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyMountStatus {
    /// The committed snapshot (containerd's chain ID of the top layer).
    pub snapshot: String,
    pub image: String,
    pub mountpoint: PathBuf,
    /// What its daemon reports; `None` if no daemon answers (the mount is
    /// down).
    pub daemon: Option<MountStats>,
}

impl NodeStatus {
    /// The status in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        metric(
            "darter_lazy_mounts",
            "gauge",
            "Images this snapshotter serves from lazy mounts.",
        );
        let mut lines = format!("darter_lazy_mounts {}\n", self.lazy_mounts.len());
        metric(
            "darter_lazy_fallbacks_total",
            "counter",
            "Images unpacked in full instead of mounted lazily, by reason.",
        );
        for (reason, count) in &self.fallbacks {
            let _ = writeln!(
                lines,
                "darter_lazy_fallbacks_total{{reason=\"{}\"}} {count}",
                escape(reason)
            );
        }
        metric(
            "darter_lazy_mount_fetched_bytes",
            "counter",
            "Bytes a lazy mount's daemon fetched from the registry.",
        );
        for mount in &self.lazy_mounts {
            let Some(daemon) = &mount.daemon else {
                continue;
            };
            let _ = writeln!(
                lines,
                "darter_lazy_mount_fetched_bytes{{image=\"{}\",mountpoint=\"{}\",pid=\"{}\"}} {}",
                escape(&mount.image),
                escape(&mount.mountpoint.to_string_lossy()),
                daemon.pid,
                daemon.backend_bytes
            );
        }
        // HELP and TYPE lines first, then the samples: Prometheus accepts
        // that order, and it keeps this function short.
        out + &lines
    }
}

/// A label value as Prometheus' text format escapes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Answers status requests on `listener` until the task is aborted.
pub(crate) async fn serve_status<L: Accept>(listener: L, snapshots: Arc<Snapshots>) {
    loop {
        let stream = match listener.accept_one().await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(%err, "status: accept failed");
                continue;
            }
        };
        let snapshots = Arc::clone(&snapshots);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let snapshots = Arc::clone(&snapshots);
                async move { Ok::<_, Infallible>(answer(&request, snapshots).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%err, "status: connection ended");
            }
        });
    }
}

/// A listener of the status server: a unix socket or a TCP port.
pub(crate) trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

async fn answer(request: &Request<Incoming>, snapshots: Arc<Snapshots>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    let path = request.uri().path();
    if request.method() != hyper::Method::GET || !matches!(path, "/status" | "/metrics") {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    let prometheus = path == "/metrics";
    let status = tokio::task::spawn_blocking(move || snapshots.status()).await;
    match status {
        Ok(Ok(status)) if prometheus => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            status.prometheus(),
        ),
        Ok(Ok(status)) => match serde_json::to_string_pretty(&status) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(err) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                err.to_string(),
            ),
        },
        Ok(Err(err)) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            err.to_string(),
        ),
        Err(err) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            err.to_string(),
        ),
    }
}

/// Reading a snapshotter's status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot {what} the status socket {}: {source}", socket.display())]
    Io {
        what: &'static str,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the status socket {} answered {status_line:?}", socket.display())]
    Http {
        socket: PathBuf,
        status_line: String,
    },
    #[error("the status socket {} answered JSON that is not a status: {source}", socket.display())]
    Json {
        socket: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Asks the snapshotter serving the status socket `socket` for its status.
pub fn query_status(socket: &Path) -> Result<NodeStatus, StatusError> {
    let body = get(socket, "/status")?;
    serde_json::from_slice(&body).map_err(|source| StatusError::Json {
        socket: socket.to_path_buf(),
        source,
    })
}

/// The body of `GET path` on the unix socket `socket` (HTTP/1.0, so the
/// body ends where the connection does).
fn get(socket: &Path, path: &str) -> Result<Vec<u8>, StatusError> {
    let io = |what| {
        move |source| StatusError::Io {
            what,
            socket: socket.to_path_buf(),
            source,
        }
    };
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(io("connect to"))?;
    stream
        .set_read_timeout(Some(QUERY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(QUERY_TIMEOUT)))
        .map_err(io("set timeouts on"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: darter\r\n\r\n").map_err(io("write to"))?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .map_err(io("read from"))?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(StatusError::Http {
            socket: socket.to_path_buf(),
            status_line,
        });
    }
    Ok(response.get(head_end + 4..).unwrap_or_default().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_names() {
        for reason in FallbackReason::ALL {
            assert_eq!(FallbackReason::from_name(reason.name()), Some(reason));
        }
        assert_eq!(FallbackReason::from_name("other"), None);
    }

    #[test]
    fn fallbacks_count_by_reason_and_list_every_reason() {
        let fallbacks = Fallbacks::default();
        fallbacks.count(FallbackReason::NotDarter);
        fallbacks.count(FallbackReason::NotDarter);
        fallbacks.count(FallbackReason::RegistryError);
        let counted = fallbacks.by_name();
        assert_eq!(counted["not-darter"], 2);
        assert_eq!(counted["registry-error"], 1);
        assert_eq!(counted["not-a-layer"], 0);
    }

    #[test]
    fn prometheus_text_has_the_gauge_the_counters_and_escaped_labels() {
        let status = NodeStatus {
            lazy_mounts: vec![
                LazyMountStatus {
                    snapshot: "sha256:top".into(),
                    image: "reg/app\"x@sha256:1".into(),
                    mountpoint: "/r/snapshots/3/fs".into(),
                    daemon: Some(MountStats {
                        pid: 42,
                        backend_bytes: 1234,
                        backend_requests: 5,
                    }),
                },
                LazyMountStatus {
                    snapshot: "sha256:down".into(),
                    image: "reg/b@sha256:2".into(),
                    mountpoint: "/r/snapshots/4/fs".into(),
                    daemon: None,
                },
            ],
            fallbacks: Fallbacks::default().by_name(),
        };
        let text = status.prometheus();
        for line in [
            "# TYPE darter_lazy_mounts gauge",
            "darter_lazy_mounts 2\n",
            "# TYPE darter_lazy_fallbacks_total counter",
            "darter_lazy_fallbacks_total{reason=\"not-darter\"} 0\n",
            "darter_lazy_mount_fetched_bytes{image=\"reg/app\\\"x@sha256:1\",\
             mountpoint=\"/r/snapshots/3/fs\",pid=\"42\"} 1234\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            !text.contains("reg/b@"),
            "a mount without a daemon has no bytes: {text}"
        );
    }
}
