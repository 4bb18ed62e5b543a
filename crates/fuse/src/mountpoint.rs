//! Mountpoint housekeeping.

use std::io;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

/// Why a mountpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MountpointError {
    /// It does not exist or is not a directory.
    #[error("mountpoint {path} is not a directory: {source}")]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// What stat said.
        source: io::Error,
    },
    /// A stale FUSE mount is there and could not be removed.
    #[error("mountpoint {path} holds a stale FUSE mount that cannot be unmounted: {source}")]
    Stale {
        /// The path.
        path: PathBuf,
        /// What unmount said.
        source: io::Error,
    },
}

/// Makes `path` usable as a mountpoint. A mount left behind by a killed
/// daemon answers every request with ENOTCONN ("Transport endpoint is not
/// connected"); it is detached so the new mount can take its place.
/// Returns true if a stale mount was removed.
pub fn prepare_mountpoint(path: &Path) -> Result<bool, MountpointError> {
    match probe(path) {
        Ok(st)
            if rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::Directory =>
        {
            Ok(false)
        }
        Ok(_) => Err(MountpointError::NotADirectory {
            path: path.to_owned(),
            source: io::Error::other("not a directory"),
        }),
        Err(Errno::NOTCONN) => {
            rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
                MountpointError::Stale {
                    path: path.to_owned(),
                    source: e.into(),
                }
            })?;
            tracing::warn!(mountpoint = %path.display(), "removed a stale mount left by a dead daemon");
            prepare_mountpoint(path).map(|_| true)
        }
        Err(e) => Err(MountpointError::NotADirectory {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// `stat` of `path`, after a `statfs` that a dead FUSE daemon's mount fails
/// with ENOTCONN. `stat` alone does not tell: the kernel answers it for a
/// FUSE root from its attribute cache, which a mount with long timeouts
/// keeps valid long after its daemon died; `statfs` always asks the daemon.
fn probe(path: &Path) -> rustix::io::Result<rustix::fs::Stat> {
    rustix::fs::statfs(path)?;
    rustix::fs::stat(path)
}
