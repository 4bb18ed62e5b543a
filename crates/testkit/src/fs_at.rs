//! Filesystem helpers that work relative to directory file descriptors, so
//! paths longer than PATH_MAX can be created and read, and symlinks are
//! never followed.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Dir, Mode, OFlags};

/// Extended attributes of one inode, by name.
pub(crate) type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the directory `path` itself (the root of a walk or of a tree to
/// create). A symlink naming the root is followed; nothing below it is.
pub(crate) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Opens the directory `name` inside `dir` for reading, refusing symlinks.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?)
}

/// Opens `name` inside `dir` without following it and without any access
/// to its data: works for every file type, including symlinks and devices.
pub(crate) fn open_inode_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

/// Opens the inode behind `fd` (typically an `O_PATH` descriptor of a
/// regular file) again, for reading its data.
pub(crate) fn reopen_readable(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(proc_fd_path(fd), flags, Mode::empty())?)
}

/// Opens the directory at `components` below `root`, one component at a time.
pub(crate) fn open_dir_path(root: BorrowedFd<'_>, components: &[Vec<u8>]) -> io::Result<OwnedFd> {
    let mut dir = open_dir_at(root, b".")?;
    for component in components {
        dir = open_dir_at(dir.as_fd(), component)?;
    }
    Ok(dir)
}

/// Names in a directory except `.` and `..`, sorted bytewise.
pub(crate) fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// The path through which the xattr syscalls reach the inode behind `fd`,
/// even when `fd` is an `O_PATH` descriptor of a symlink or device: the
/// kernel resolves the magic link to that exact inode and stops there.
fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// All extended attributes of the inode behind `fd` (any file type).
pub(crate) fn read_xattrs(fd: BorrowedFd<'_>) -> io::Result<Xattrs> {
    let path = proc_fd_path(fd);
    let list = read_sized(|buf| {
        if buf.is_empty() {
            rustix::fs::listxattr_query(&path)
        } else {
            rustix::fs::listxattr(&path, buf)
        }
    })?;
    let mut xattrs = Xattrs::new();
    for name in list.split(|&b| b == 0).filter(|name| !name.is_empty()) {
        let value = read_sized(|buf| {
            if buf.is_empty() {
                rustix::fs::getxattr_query(&path, name)
            } else {
                rustix::fs::getxattr(&path, name, buf)
            }
        })?;
        xattrs.insert(name.to_vec(), value);
    }
    Ok(xattrs)
}

/// Runs a size-query-then-fetch syscall pair, retrying when the value grew
/// in between (ERANGE). `call` gets an empty buffer for the size query.
fn read_sized(mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    loop {
        let size = call(&mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// Sets one extended attribute on the inode behind `fd`.
pub(crate) fn set_xattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::empty();
    Ok(rustix::fs::setxattr(proc_fd_path(fd), name, value, flags)?)
}

/// Renders path bytes for humans: printable ASCII as is, everything else
/// (non-UTF-8 bytes, control characters, backslash) escaped, so two
/// different names never render the same.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(byte)),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    out
}

/// [`escape_bytes`] for a path.
pub fn escape_path(path: &Path) -> String {
    escape_bytes(path.as_os_str().as_bytes())
}

/// Joins path components into a relative path (`.` for none).
pub(crate) fn join_components(components: &[Vec<u8>]) -> std::path::PathBuf {
    if components.is_empty() {
        return std::path::PathBuf::from(".");
    }
    let joined = components.join(&b'/');
    std::path::PathBuf::from(OsStr::from_bytes(&joined))
}
