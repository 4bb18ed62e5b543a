//! Builds from a directory: a depth-first walk in name order, through
//! directory file descriptors (so paths longer than `PATH_MAX` work and
//! nothing is followed), skipping holes of sparse files without reading them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use darter_format::tree::{FileData, Meta, NodeKind, Xattr};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, Stat};
use rustix::io::Errno;

use crate::chunker::Chunker;
use crate::{BuildError, Progress};

struct Level {
    fd: OwnedFd,
    path: Vec<u8>,
    names: Vec<Vec<u8>>,
    next: usize,
}

/// Adds the tree under `root` to `tree` (as one layer).
pub(crate) fn add_dir(
    tree: &mut crate::merge::MergeTree,
    chunker: &mut Chunker,
    root: &Path,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    let root_bytes = root.as_os_str().as_encoded_bytes();
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("open", root_bytes))?;
    let st = rustix::fs::fstat(&fd).map_err(io_err("stat", root_bytes))?;
    let xattrs = read_xattrs(XattrTarget::Fd(fd.as_fd()), root_bytes)?;
    tree.set_root_meta(meta_of(&st, xattrs, root_bytes)?);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = Vec::new();
    let names = list(&fd, root_bytes)?;
    let mut stack = vec![Level {
        fd,
        path: Vec::new(),
        names,
        next: 0,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.get(top.next).cloned() else {
            stack.pop();
            continue;
        };
        top.next += 1;
        let mut path = top.path.clone();
        path.push(b'/');
        path.extend_from_slice(&name);
        let dir = top.fd.as_fd();
        let st = rustix::fs::statat(dir, &name[..], AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_err("stat", &path))?;
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != FileType::Directory && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = links.get(&key) {
                tree.link(&path, first)
                    .map_err(|e| BuildError::merge(e, "directory source"))?;
                continue;
            }
            links.insert(key, path.clone());
        }
        let kind = match file_type {
            FileType::Directory => {
                let fd = open_at(dir, &name, OFlags::DIRECTORY, &path)?;
                let meta = meta_of(&st, read_xattrs(XattrTarget::Fd(fd.as_fd()), &path)?, &path)?;
                tree.put(&path, meta, NodeKind::Dir(Vec::new()))
                    .map_err(|e| BuildError::merge(e, "directory source"))?;
                let names = list(&fd, &path)?;
                stack.push(Level {
                    fd,
                    path,
                    names,
                    next: 0,
                });
                continue;
            }
            FileType::RegularFile => {
                let fd = open_at(dir, &name, OFlags::empty(), &path)?;
                let meta = meta_of(&st, read_xattrs(XattrTarget::Fd(fd.as_fd()), &path)?, &path)?;
                // Only a file with fewer blocks than bytes can have holes.
                let sparse = (st.st_blocks as u64).saturating_mul(512) < st.st_size as u64;
                let data = chunk_file(chunker, &fd, st.st_size as u64, sparse, &path, &mut buf)?;
                progress.add_bytes(data.size);
                tree.put(&path, meta, NodeKind::File(data))
                    .map_err(|e| BuildError::merge(e, "directory source"))?;
                progress.add_file();
                continue;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, &name[..], Vec::new())
                    .map_err(io_err("readlink", &path))?;
                NodeKind::Symlink(target.into_bytes())
            }
            FileType::CharacterDevice => {
                NodeKind::CharDev(rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev))
            }
            FileType::BlockDevice => {
                NodeKind::BlockDev(rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev))
            }
            FileType::Fifo => NodeKind::Fifo,
            FileType::Socket => NodeKind::Socket,
            FileType::Unknown => {
                return Err(BuildError::Unsupported {
                    path: lossy(&path),
                    detail: "unknown file type".into(),
                });
            }
        };
        let meta = meta_of(&st, read_xattrs(XattrTarget::At(dir, &name), &path)?, &path)?;
        tree.put(&path, meta, kind)
            .map_err(|e| BuildError::merge(e, "directory source"))?;
        progress.add_file();
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn io_err<'a>(op: &'static str, path: &'a [u8]) -> impl FnOnce(Errno) -> BuildError + 'a {
    move |e| BuildError::io(op, path, e.into())
}

fn list(fd: &OwnedFd, path: &[u8]) -> Result<Vec<Vec<u8>>, BuildError> {
    let mut dir = rustix::fs::Dir::read_from(fd).map_err(io_err("list", path))?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(io_err("list", path))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

fn meta_of(st: &Stat, xattrs: Vec<Xattr>, path: &[u8]) -> Result<Meta, BuildError> {
    let (mtime, mtime_nsec) = if st.st_mtime < 0 {
        tracing::warn!(path = %lossy(path), "mtime before 1970 stored as 1970-01-01");
        (0, 0)
    } else {
        (st.st_mtime as u64, st.st_mtime_nsec as u32)
    };
    Ok(Meta {
        perm: (st.st_mode & 0o7777) as u16,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime,
        mtime_nsec,
        xattrs,
    })
}

/// What to read xattrs of: an open file, or a name in a directory (for
/// symlinks and special files, which cannot be opened safely).
#[derive(Clone, Copy)]
enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

impl XattrTarget<'_> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrTarget::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            XattrTarget::At(dir, name) => rustix::fs::llistxattr(proc_path(*dir, name), buf),
        }
    }

    fn get(&self, key: &[u8], buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrTarget::Fd(fd) => rustix::fs::fgetxattr(fd, key, buf),
            XattrTarget::At(dir, name) => rustix::fs::lgetxattr(proc_path(*dir, name), key, buf),
        }
    }
}

/// A path that reaches `name` in `dir` whatever the length of dir's path.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

/// Reads all xattrs of `target`, sorted by name, refusing namespaces a
/// Darter image cannot hold (rather than silently dropping them).
fn read_xattrs(target: XattrTarget<'_>, path: &[u8]) -> Result<Vec<Xattr>, BuildError> {
    let mut list = vec![0u8; 1024];
    let n = loop {
        match target.list(&mut list) {
            Ok(n) => break n,
            Err(Errno::RANGE) => list.resize(list.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(BuildError::io("list xattrs of", path, e.into())),
        }
    };
    let mut out = Vec::new();
    for key in list[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
        if darter_format::erofs::ondisk::xattr_split(key).is_none() {
            return Err(BuildError::Unsupported {
                path: lossy(path),
                detail: format!(
                    "xattr {:?} is in a namespace Darter images cannot hold",
                    lossy(key)
                ),
            });
        }
        let mut value = vec![0u8; 256];
        let len = loop {
            match target.get(key, &mut value) {
                Ok(len) => break len,
                Err(Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(e) => return Err(BuildError::io("read xattr of", path, e.into())),
            }
        };
        value.truncate(len);
        out.push((key.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

fn open_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    extra: OFlags,
    path: &[u8],
) -> Result<OwnedFd, BuildError> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | extra;
    rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(io_err("open", path))
}

/// Chunks a regular file, finding holes with `SEEK_DATA`/`SEEK_HOLE` so a
/// sparse file of many GiB costs only its data.
fn chunk_file(
    chunker: &mut Chunker,
    fd: &OwnedFd,
    size: u64,
    sparse: bool,
    path: &[u8],
    buf: &mut Vec<u8>,
) -> Result<FileData, BuildError> {
    let chunk_size = u64::from(chunker.settings().chunk_size);
    let mut chunks = Vec::with_capacity(size.div_ceil(chunk_size) as usize);
    buf.resize(chunk_size as usize, 0);
    // [data_start, data_end): the data extent known around the cursor.
    let (mut data_start, mut data_end) = (0u64, 0u64);
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(chunk_size);
        if !sparse {
            (data_start, data_end) = (0, size);
        } else if offset >= data_end {
            (data_start, data_end) =
                next_data_extent(fd, offset, size).map_err(io_err("seek in", path))?;
        }
        if data_start >= offset + len {
            chunks.push(chunker.hole(len));
        } else {
            let piece = &mut buf[..len as usize];
            read_exact_at(fd, piece, offset).map_err(|e| BuildError::io("read", path, e))?;
            chunks.push(
                chunker
                    .chunk(piece)
                    .map_err(|e| BuildError::io("chunk", path, e))?,
            );
        }
        offset += len;
    }
    Ok(FileData { size, chunks })
}

/// The next data extent at or after `offset`: (start, end). A file system
/// without hole support reports the whole file as data.
fn next_data_extent(fd: &OwnedFd, offset: u64, size: u64) -> rustix::io::Result<(u64, u64)> {
    let start = match rustix::fs::seek(fd, SeekFrom::Data(offset)) {
        Ok(s) => s,
        Err(Errno::NXIO) => return Ok((size, size)),
        Err(Errno::INVAL) | Err(Errno::NOTSUP) => return Ok((offset, size)),
        Err(e) => return Err(e),
    };
    let end = rustix::fs::seek(fd, SeekFrom::Hole(start))?;
    Ok((start, end.max(start)))
}

fn read_exact_at(fd: &OwnedFd, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = rustix::io::pread(fd, &mut *buf, at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being read",
            ));
        }
        buf = &mut buf[n..];
        at += n as u64;
    }
    Ok(())
}
