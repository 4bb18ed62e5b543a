//! Mountpoint housekeeping.

use std::io;
use std::os::unix::ffi::OsStringExt;
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
    if stale_kernel_mount(path) {
        detach_stale(path)?;
        return prepare_mountpoint(path).map(|_| true);
    }
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
            detach_stale(path)?;
            prepare_mountpoint(path).map(|_| true)
        }
        Err(e) => Err(MountpointError::NotADirectory {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

fn detach_stale(path: &Path) -> Result<(), MountpointError> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
        MountpointError::Stale {
            path: path.to_owned(),
            source: e.into(),
        }
    })?;
    tracing::warn!(mountpoint = %path.display(), "removed a stale mount left by a dead daemon");
    Ok(())
}

/// True if a kernel EROFS mount of a Darter image is on top at `path` and
/// the daemon that served its devices is dead: the mount itself still
/// answers `statfs` (the kernel holds the superblock), but its devices'
/// FUSE mount answers ENOTCONN, so every uncached read would fail.
fn stale_kernel_mount(path: &Path) -> bool {
    let Ok(Some(top)) = top_mount(path) else {
        return false;
    };
    top.fstype == "erofs"
        && top
            .source
            .parent()
            .is_some_and(|devices| rustix::fs::statfs(devices).err() == Some(Errno::NOTCONN))
}

/// `stat` of `path`, after a `statfs` that a dead FUSE daemon's mount fails
/// with ENOTCONN. `stat` alone does not tell: the kernel answers it for a
/// FUSE root from its attribute cache, which a mount with long timeouts
/// keeps valid long after its daemon died; `statfs` always asks the daemon.
fn probe(path: &Path) -> rustix::io::Result<rustix::fs::Stat> {
    rustix::fs::statfs(path)?;
    rustix::fs::stat(path)
}

/// Sets the kernel readahead of the filesystem mounted at `path` (its
/// backing device's `read_ahead_kb`). FUSE connections start at 128 KiB,
/// which splits every large sequential read into 128 KiB requests; a
/// chunk is 1 MiB. The device comes from `/proc/self/mountinfo`, not from
/// stat(2): a stat would wait for the FUSE session to answer.
pub fn set_readahead(path: &Path, kib: u32) -> io::Result<()> {
    let top = top_mount(path)?.ok_or_else(|| {
        io::Error::other(format!("{} is not in /proc/self/mountinfo", path.display()))
    })?;
    std::fs::write(
        format!("/sys/class/bdi/{}/read_ahead_kb", top.device),
        format!("{kib}\n"),
    )
}

/// The mount on top at a path, as `/proc/self/mountinfo` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopMount {
    /// `major:minor` of the filesystem.
    pub device: String,
    /// Filesystem type (`fuse.darter`, `erofs`, ...).
    pub fstype: String,
    /// The mount source (for a file-backed EROFS mount, the image file).
    pub source: PathBuf,
}

/// The mount on top at `path`, if `path` is a mountpoint.
pub fn top_mount(path: &Path) -> io::Result<Option<TopMount>> {
    top_mount_in(&std::fs::read_to_string("/proc/self/mountinfo")?, path)
}

/// [`top_mount`] in a mount table already read (`/proc/self/mountinfo`).
pub fn top_mount_in(mountinfo: &str, path: &Path) -> io::Result<Option<TopMount>> {
    let canonical = canonical_mountpoint(path)?;
    // Fields: id parent major:minor root mountpoint options [optional...]
    // - fstype source superoptions; the last match is the mount on top.
    Ok(mountinfo.lines().rev().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let device = fields.nth(2)?;
        let mountpoint = fields.nth(1)?;
        if unescape_mountinfo(mountpoint) != canonical.as_os_str().as_encoded_bytes() {
            return None;
        }
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let source = after.next()?;
        Some(TopMount {
            device: device.to_owned(),
            fstype: fstype.to_owned(),
            source: PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(source))),
        })
    }))
}

/// The canonical form of a mountpoint path, without stat-ing the path
/// itself (that would wait on a FUSE mount there).
fn canonical_mountpoint(path: &Path) -> io::Result<PathBuf> {
    let parent = match path.parent() {
        // `mnt` has the parent "", which canonicalize refuses.
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => path,
    };
    Ok(std::fs::canonicalize(parent)?.join(path.file_name().unwrap_or_default()))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
    }
}
