//! What can go wrong, and the gRPC status code containerd expects for it.
//!
//! containerd turns status codes back into its own error kinds
//! (`errdefs.FromGRPC`) and acts on them: `AlreadyExists` on Prepare is how a
//! remote snapshotter says "the layer is already there", `NotFound` and
//! `FailedPrecondition` drive its garbage collector. The codes below follow
//! containerd's own overlay snapshotter.

use std::path::PathBuf;

use containerd_snapshots::tonic::{Code, Status};

/// A failed snapshot operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {key:?} does not exist")]
    NotFound { key: String },
    #[error("snapshot {key:?} already exists")]
    AlreadyExists { key: String },
    #[error("parent {parent:?} of snapshot {key:?} does not exist")]
    ParentNotFound { key: String, parent: String },
    #[error("parent {parent:?} of snapshot {key:?} is {kind}, not committed")]
    ParentNotCommitted {
        key: String,
        parent: String,
        kind: &'static str,
    },
    #[error("snapshot {key:?} is {kind}; only an active snapshot can be committed")]
    NotActive { key: String, kind: &'static str },
    #[error("snapshot {key:?} is committed; only active snapshots and views have mounts")]
    NotMountable { key: String },
    #[error("snapshot {key:?} has children ({children}); remove them first")]
    HasChildren { key: String, children: String },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("filter {filter:?}: {message} at byte {position}")]
    Filter {
        filter: String,
        position: usize,
        message: String,
    },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to delete {}: still mounted below it: {mounts:?}", path.display())]
    MountedBelow { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("metadata database {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("metadata database {} has format {found}, this darter reads format {expected}", path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("metadata database: {0}")]
    Database(#[source] Box<redb::Error>),
    #[error("metadata record of snapshot {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("a background task failed: {0}")]
    Task(String),
    #[error("lazy mount of {image} at {}: cannot {what}: {source}", mountpoint.display())]
    Lazy {
        what: &'static str,
        image: String,
        mountpoint: PathBuf,
        #[source]
        source: crate::remote::LazyError,
    },
}

impl Error {
    /// An I/O error on `path` while trying to `what`.
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    /// Any of redb's error types.
    pub(crate) fn db(source: impl Into<redb::Error>) -> Error {
        Error::Database(Box::new(source.into()))
    }

    /// The gRPC status code containerd maps to the matching `errdefs` kind.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound { .. } | Error::ParentNotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::ParentNotCommitted { .. } | Error::InvalidArgument(_) | Error::Filter { .. } => {
                Code::InvalidArgument
            }
            Error::NotActive { .. } | Error::NotMountable { .. } | Error::HasChildren { .. } => {
                Code::FailedPrecondition
            }
            Error::Locked { .. } => Code::Unavailable,
            Error::Io { .. }
            | Error::MountedBelow { .. }
            | Error::UnsupportedFormat { .. }
            | Error::Database(_)
            | Error::Corrupt { .. }
            | Error::Task(_)
            | Error::Lazy { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

/// Serving the API on a socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Open(#[from] Error),
    #[error("{} is already served by another process", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics at {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {}: {source}", path.display())]
    Transport {
        path: PathBuf,
        #[source]
        source: containerd_snapshots::tonic::transport::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_ones_containerd_acts_on() {
        let key = || "k".to_owned();
        let cases = [
            (Error::NotFound { key: key() }, Code::NotFound),
            (
                Error::ParentNotFound {
                    key: key(),
                    parent: "p".into(),
                },
                Code::NotFound,
            ),
            (Error::AlreadyExists { key: key() }, Code::AlreadyExists),
            (
                Error::ParentNotCommitted {
                    key: key(),
                    parent: "p".into(),
                    kind: "active",
                },
                Code::InvalidArgument,
            ),
            (
                Error::NotActive {
                    key: key(),
                    kind: "view",
                },
                Code::FailedPrecondition,
            ),
            (Error::NotMountable { key: key() }, Code::FailedPrecondition),
            (
                Error::HasChildren {
                    key: key(),
                    children: "c".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains("\"k\""), "{status:?}");
        }
    }
}
