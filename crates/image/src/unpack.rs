//! Writes an image's tree into a directory.
//!
//! Everything is created relative to directory file descriptors this code
//! opened itself, with `O_NOFOLLOW`, so no name in the image can make it
//! write outside the target, whatever symlinks the image holds, and paths
//! longer than `PATH_MAX` work.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use darter_format::blob::BLOCK_SIZE;
use darter_format::erofs::ondisk::mode::{self, S_IFMT};
use darter_format::erofs::{DirEntry, Inode};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::ImageError;
use crate::image::Image;
use crate::source::BlobSource;

/// What an unpack did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnpackReport {
    /// Regular files written (hardlinks count once).
    pub files: u64,
    /// Directories created, the target included.
    pub dirs: u64,
    /// Symlinks, devices, fifos and sockets created.
    pub specials: u64,
    /// Extra links made to existing files.
    pub hardlinks: u64,
    /// File bytes written (holes excluded).
    pub bytes: u64,
    /// Operations skipped because the process lacks privileges (ownership,
    /// device nodes, trusted/security xattrs); always 0 when run as root.
    pub skipped_unprivileged: u64,
}

/// Unpacks `image` into `target`, which must be empty or absent.
pub fn unpack<S: BlobSource>(image: &Image<S>, target: &Path) -> Result<UnpackReport, ImageError> {
    let target_str = target.display().to_string();
    let io = |op: &'static str| {
        let p = target_str.clone();
        move |e: std::io::Error| ImageError::Io {
            op,
            path: p,
            source: e,
        }
    };
    std::fs::create_dir_all(target).map_err(io("create"))?;
    if std::fs::read_dir(target)
        .map_err(io("read"))?
        .next()
        .is_some()
    {
        return Err(ImageError::Io {
            op: "unpack into",
            path: target_str,
            source: std::io::Error::other("directory is not empty; refusing to overwrite it"),
        });
    }
    let root_fd = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("open")(e.into()))?;
    let mut unpacker = Unpacker {
        image,
        report: UnpackReport::default(),
        privileged: rustix::process::geteuid().is_root(),
        first_link: HashMap::new(),
        root_fd: root_fd.try_clone().map_err(io("dup"))?,
    };
    unpacker.run(root_fd)?;
    Ok(unpacker.report)
}

struct OpenDir {
    fd: OwnedFd,
    inode: Inode,
    entries: Vec<DirEntry>,
    next: usize,
    path: Vec<u8>,
}

struct Unpacker<'a, S> {
    image: &'a Image<S>,
    report: UnpackReport,
    privileged: bool,
    /// nid -> path components of the first link written, for hardlinks.
    first_link: HashMap<u64, Vec<Vec<u8>>>,
    root_fd: OwnedFd,
}

fn errno_io<'a>(op: &'static str, path: &'a [u8]) -> impl FnOnce(Errno) -> ImageError + 'a {
    move |e| ImageError::Io {
        op,
        path: String::from_utf8_lossy(path).into_owned(),
        source: e.into(),
    }
}

impl<S: BlobSource> Unpacker<'_, S> {
    fn run(&mut self, root_fd: OwnedFd) -> Result<(), ImageError> {
        let erofs = self.image.bootstrap().erofs();
        let root = erofs.inode(erofs.root_nid())?;
        // Validate the whole tree's shape (cycles, shared directory blocks,
        // `.`/`..`, entry types) before writing anything.
        erofs.walk(&mut |_, _, _| Ok(()))?;
        let mut seen_dirs = std::collections::HashSet::from([root.nid]);
        let mut stack = vec![OpenDir {
            fd: root_fd,
            entries: erofs.dir_entries(&root)?,
            inode: root,
            next: 0,
            path: b"/".to_vec(),
        }];
        self.report.dirs += 1;
        while let Some(top) = stack.last_mut() {
            let Some(entry) = top.entries.get(top.next).cloned() else {
                let done = stack.pop().expect("stack is not empty");
                self.apply_meta(done.fd.as_fd(), None, &done.inode, &done.path)?;
                continue;
            };
            top.next += 1;
            if entry.name == b"." || entry.name == b".." {
                continue;
            }
            let path = join(&top.path, &entry.name);
            let components: Vec<Vec<u8>> = stack
                .iter()
                .skip(1)
                .map(|d| last_component(&d.path))
                .chain([entry.name.clone()])
                .collect();
            let parent = stack
                .last()
                .expect("stack is not empty")
                .fd
                .try_clone()
                .map_err(|e| ImageError::Io {
                    op: "dup",
                    path: String::from_utf8_lossy(&path).into_owned(),
                    source: e,
                })?;
            let inode = erofs.inode(entry.nid)?;
            if inode.is_dir() {
                if !seen_dirs.insert(inode.nid) {
                    return Err(ImageError::Metadata(
                        darter_format::erofs::ReadError::BadTree {
                            path: String::from_utf8_lossy(&path).into_owned(),
                            detail: "directory reached twice (cycle)".into(),
                        },
                    ));
                }
                rustix::fs::mkdirat(&parent, &entry.name[..], Mode::from_raw_mode(0o700))
                    .map_err(errno_io("mkdir", &path))?;
                let fd = rustix::fs::openat(
                    &parent,
                    &entry.name[..],
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno_io("open", &path))?;
                self.report.dirs += 1;
                let entries = erofs.dir_entries(&inode)?;
                stack.push(OpenDir {
                    fd,
                    inode,
                    entries,
                    next: 0,
                    path,
                });
                continue;
            }
            if let Some(first) = self.first_link.get(&inode.nid) {
                let first = first.clone();
                self.link(&first, parent.as_fd(), &entry.name, &path)?;
                continue;
            }
            self.create(parent.as_fd(), &entry.name, &inode, &path)
                .map_err(|e| e.in_file(&path))?;
            if inode.nlink > 1 {
                self.first_link.insert(inode.nid, components);
            }
        }
        Ok(())
    }

    fn link(
        &mut self,
        first: &[Vec<u8>],
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
    ) -> Result<(), ImageError> {
        let (target_name, parents) = first.split_last().expect("a link path has a name");
        let mut fd = self.root_fd.try_clone().map_err(|e| ImageError::Io {
            op: "dup",
            path: String::from_utf8_lossy(path).into_owned(),
            source: e,
        })?;
        for c in parents {
            fd = rustix::fs::openat(
                &fd,
                &c[..],
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno_io("open", path))?;
        }
        rustix::fs::linkat(&fd, &target_name[..], dir, name, AtFlags::empty())
            .map_err(errno_io("link", path))?;
        self.report.hardlinks += 1;
        Ok(())
    }

    fn create(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        inode: &Inode,
        path: &[u8],
    ) -> Result<(), ImageError> {
        let perm = Mode::from_raw_mode(u32::from(inode.mode & 0o7777));
        match inode.mode & S_IFMT {
            mode::S_IFREG => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(errno_io("create", path))?;
                self.write_content(&fd, inode, path)?;
                self.report.files += 1;
                self.apply_meta(fd.as_fd(), None, inode, path)
            }
            mode::S_IFLNK => {
                let target = self.image.bootstrap().erofs().symlink_target(inode)?;
                rustix::fs::symlinkat(&target[..], dir, name).map_err(errno_io("symlink", path))?;
                self.report.specials += 1;
                self.apply_meta(dir, Some(name), inode, path)
            }
            kind => {
                let (file_type, dev) = match kind {
                    mode::S_IFCHR => (FileType::CharacterDevice, inode.rdev()),
                    mode::S_IFBLK => (FileType::BlockDevice, inode.rdev()),
                    mode::S_IFIFO => (FileType::Fifo, (0, 0)),
                    _ => (FileType::Socket, (0, 0)),
                };
                let is_device =
                    matches!(file_type, FileType::CharacterDevice | FileType::BlockDevice);
                if is_device && !self.privileged {
                    self.report.skipped_unprivileged += 1;
                    return Ok(());
                }
                rustix::fs::mknodat(
                    dir,
                    name,
                    file_type,
                    perm,
                    rustix::fs::makedev(dev.0, dev.1),
                )
                .map_err(errno_io("mknod", path))?;
                self.report.specials += 1;
                self.apply_meta(dir, Some(name), inode, path)
            }
        }
    }

    fn write_content(
        &mut self,
        fd: &OwnedFd,
        inode: &Inode,
        path: &[u8],
    ) -> Result<(), ImageError> {
        let chunk_size = self.image.bootstrap().chunk_size();
        let chunks = if inode.size == 0 {
            0
        } else {
            inode.chunk_count(darter_format::blob::BLOCK_BITS)
        };
        for n in 0..chunks {
            let Some(data) = self.image.read_file_chunk(inode, n)? else {
                continue;
            };
            let base = n * chunk_size;
            // Zero blocks are left as holes, so sparse files stay sparse.
            for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().all(|&b| b == 0) {
                    continue;
                }
                let at = base + (i * BLOCK_SIZE as usize) as u64;
                write_all_at(fd, block, at).map_err(errno_io("write", path))?;
                self.report.bytes += block.len() as u64;
            }
        }
        rustix::fs::ftruncate(fd, inode.size).map_err(errno_io("truncate", path))
    }

    /// Sets owner, mode, xattrs and times, in the order that keeps each:
    /// chown clears setuid bits and capabilities, so it goes first.
    fn apply_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        name: Option<&[u8]>,
        inode: &Inode,
        path: &[u8],
    ) -> Result<(), ImageError> {
        if inode.uid == u32::MAX || inode.gid == u32::MAX {
            return Err(ImageError::Metadata(
                darter_format::erofs::ReadError::BadInode {
                    nid: inode.nid,
                    detail: "uid or gid is -1".into(),
                },
            ));
        }
        let (uid, gid) = (
            rustix::fs::Uid::from_raw(inode.uid),
            rustix::fs::Gid::from_raw(inode.gid),
        );
        let is_link = inode.mode & S_IFMT == mode::S_IFLNK;
        let owned = match name {
            None => rustix::fs::fchown(fd, Some(uid), Some(gid)),
            Some(n) => rustix::fs::chownat(fd, n, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW),
        };
        self.allow_unprivileged(owned, "chown", path)?;
        let perm = Mode::from_raw_mode(u32::from(inode.mode & 0o7777));
        match (name, is_link) {
            (None, _) => rustix::fs::fchmod(fd, perm).map_err(errno_io("chmod", path))?,
            (Some(n), false) => rustix::fs::chmodat(fd, n, perm, AtFlags::empty())
                .map_err(errno_io("chmod", path))?,
            (Some(_), true) => {}
        }
        for (key, value) in self.image.bootstrap().erofs().xattrs(inode)? {
            let set = match name {
                None => {
                    rustix::fs::fsetxattr(fd, &key[..], &value, rustix::fs::XattrFlags::empty())
                }
                Some(n) => rustix::fs::lsetxattr(
                    proc_path(fd, n),
                    &key[..],
                    &value,
                    rustix::fs::XattrFlags::empty(),
                ),
            };
            self.allow_unprivileged(set, "setxattr", path)?;
        }
        let t = Timespec {
            tv_sec: inode.mtime as i64,
            tv_nsec: i64::from(inode.mtime_nsec.min(999_999_999)),
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        match name {
            None => rustix::fs::futimens(fd, &times),
            Some(n) => rustix::fs::utimensat(fd, n, &times, AtFlags::SYMLINK_NOFOLLOW),
        }
        .map_err(errno_io("set times of", path))
    }

    fn allow_unprivileged(
        &mut self,
        r: rustix::io::Result<()>,
        op: &'static str,
        path: &[u8],
    ) -> Result<(), ImageError> {
        match r {
            Err(Errno::PERM) | Err(Errno::ACCESS) if !self.privileged => {
                self.report.skipped_unprivileged += 1;
                Ok(())
            }
            other => other.map_err(errno_io(op, path)),
        }
    }
}

/// A path that reaches `name` in the directory `dir` without a length
/// limit on the directory's own path.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut at: u64) -> rustix::io::Result<()> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(fd, data, at)?;
        data = &data[n..];
        at += n as u64;
    }
    Ok(())
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.len() > 1 {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn last_component(path: &[u8]) -> Vec<u8> {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path).to_vec()
}
