//! A declarative list of filesystem entries with exact metadata, and the
//! writer that realizes it with `*at` syscalls relative to directory fds
//! (so paths beyond PATH_MAX work).

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};

use super::TreeError;
use crate::fs_at::{self, join_components};

/// Modification time with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mtime {
    pub sec: i64,
    pub nsec: u32,
}

/// Ownership, permission bits, time and xattrs of one inode.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: Mtime,
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    fn new(mode: u32, mtime: Mtime) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: Vec::new(),
        }
    }
}

/// What a regular file holds: literal bytes, or generated pseudorandom data
/// in the given ranges with holes everywhere else (one full range gives a
/// dense file).
#[derive(Clone, Debug)]
pub(crate) enum Content {
    Bytes(Vec<u8>),
    Generated {
        size: u64,
        data: Vec<Range<u64>>,
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Special {
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

#[derive(Clone, Debug)]
pub(crate) enum Node {
    Dir,
    File(Content),
    Symlink(Vec<u8>),
    /// Another name for the (earlier) entry at this path.
    Hardlink(Vec<Vec<u8>>),
    Special(Special),
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) path: Vec<Vec<u8>>,
    pub(crate) node: Node,
    pub(crate) meta: Meta,
}

impl Entry {
    pub(crate) fn mode(&mut self, mode: u32) -> &mut Self {
        self.meta.mode = mode;
        self
    }

    pub(crate) fn owner(&mut self, uid: u32, gid: u32) -> &mut Self {
        self.meta.uid = uid;
        self.meta.gid = gid;
        self
    }

    pub(crate) fn mtime(&mut self, sec: i64, nsec: u32) -> &mut Self {
        self.meta.mtime = Mtime { sec, nsec };
        self
    }

    pub(crate) fn xattr(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.meta.xattrs.push((name.to_owned(), value.to_vec()));
        self
    }
}

/// Entries in creation order: parents before children, hardlink targets
/// before their links. The root directory's own metadata is applied too.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    root: Meta,
    entries: Vec<Entry>,
    whole_seconds: bool,
}

/// Splits `a/b/c` into components; names cannot contain `/`, so any byte
/// string that is not `/`-separated is a single name.
pub(crate) fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

impl Plan {
    /// An empty plan whose entries get distinct nanosecond-precise mtimes.
    pub(crate) fn new() -> Self {
        Self::with_whole_seconds(false)
    }

    /// An empty plan; with `whole_seconds`, default mtimes have no
    /// nanoseconds (for trees that go through tools that drop them).
    pub(crate) fn with_whole_seconds(whole_seconds: bool) -> Self {
        let mut plan = Plan {
            root: Meta::new(0o755, Mtime { sec: 0, nsec: 0 }),
            entries: Vec::new(),
            whole_seconds,
        };
        plan.root.mtime = plan.default_mtime(0);
        plan
    }

    /// Deterministic, distinct times for entries that do not set one, so
    /// two realizations of a plan are identical.
    fn default_mtime(&self, index: usize) -> Mtime {
        let i = i64::try_from(index).unwrap_or(i64::MAX / 4096);
        let nsec =
            (i.wrapping_mul(987_654_321).wrapping_add(123_456_789)).rem_euclid(1_000_000_000);
        let nsec = if self.whole_seconds {
            0
        } else {
            u32::try_from(nsec).unwrap_or(1)
        };
        Mtime {
            sec: 1_600_000_000 + i * 3_607,
            nsec,
        }
    }

    pub(crate) fn root_meta(&mut self) -> &mut Meta {
        &mut self.root
    }

    /// The planned entry at `path`, to change it for a later state.
    pub(crate) fn entry_mut(&mut self, path: &[u8]) -> Result<&mut Entry, TreeError> {
        let wanted = components(path);
        match self.entries.iter_mut().find(|e| e.path == wanted) {
            Some(entry) => Ok(entry),
            None => {
                let err = io::Error::new(io::ErrorKind::NotFound, "no such planned entry");
                Err(TreeError::new(
                    "find planned entry",
                    &join_components(&wanted),
                    err,
                ))
            }
        }
    }

    /// Removes every entry at or below `path` (for building later states).
    pub(crate) fn remove(&mut self, path: &[u8]) {
        let prefix = components(path);
        self.entries.retain(|e| !e.path.starts_with(&prefix));
    }

    fn push(&mut self, path: &[u8], node: Node, mode: u32) -> &mut Entry {
        let meta = Meta::new(mode, self.default_mtime(self.entries.len() + 1));
        self.entries.push(Entry {
            path: components(path),
            node,
            meta,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last]
    }

    pub(crate) fn dir(&mut self, path: &[u8]) -> &mut Entry {
        self.push(path, Node::Dir, 0o755)
    }

    pub(crate) fn file(&mut self, path: &[u8], content: &[u8]) -> &mut Entry {
        self.push(path, Node::File(Content::Bytes(content.to_vec())), 0o644)
    }

    pub(crate) fn generated_file(
        &mut self,
        path: &[u8],
        size: u64,
        data: Vec<Range<u64>>,
    ) -> &mut Entry {
        let seed = self.entries.len() as u64 + 1;
        self.push(
            path,
            Node::File(Content::Generated { size, data, seed }),
            0o644,
        )
    }

    /// A file of `size` pseudorandom bytes, fully allocated.
    pub(crate) fn dense_file(&mut self, path: &[u8], size: u64) -> &mut Entry {
        self.generated_file(path, size, std::iter::once(0..size).collect())
    }

    pub(crate) fn symlink(&mut self, path: &[u8], target: &[u8]) -> &mut Entry {
        self.push(path, Node::Symlink(target.to_vec()), 0o777)
    }

    pub(crate) fn hardlink(&mut self, path: &[u8], target: &[u8]) {
        self.push(path, Node::Hardlink(components(target)), 0);
    }

    pub(crate) fn special(&mut self, path: &[u8], special: Special) -> &mut Entry {
        self.push(path, Node::Special(special), 0o644)
    }

    /// Creates every entry below `root` (created if missing; existing
    /// content is left alone), then sets directory modes and times last,
    /// because creating children changes a directory's mtime.
    pub(crate) fn write(&self, root: &Path) -> Result<(), TreeError> {
        std::fs::create_dir_all(root).map_err(|e| TreeError::new("create root", root, e))?;
        let root_fd = fs_at::open_root(root).map_err(|e| TreeError::new("open root", root, e))?;
        let mut writer = Writer {
            root: root_fd,
            root_path: root,
            parent: None,
        };
        writer.apply_owner_and_xattrs(writer.root.as_fd(), &[], &self.root)?;
        for entry in &self.entries {
            writer.create(entry)?;
        }
        writer.parent = None;
        writer.finish_dir(&[], &self.root)?;
        for entry in self.entries.iter().filter(|e| matches!(e.node, Node::Dir)) {
            writer.finish_dir(&entry.path, &entry.meta)?;
        }
        Ok(())
    }
}

struct Writer<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    /// The most recently used parent directory, reused by siblings.
    parent: Option<(Vec<Vec<u8>>, Rc<OwnedFd>)>,
}

fn to_timestamps(mtime: Mtime) -> Timestamps {
    let spec = Timespec {
        tv_sec: mtime.sec,
        tv_nsec: mtime.nsec.into(),
    };
    Timestamps {
        last_access: spec,
        last_modification: spec,
    }
}

impl Writer<'_> {
    fn error(&self, op: &'static str, path: &[Vec<u8>], err: impl Into<io::Error>) -> TreeError {
        TreeError::new(op, &self.root_path.join(join_components(path)), err.into())
    }

    fn parent_of(&mut self, path: &[Vec<u8>]) -> Result<Rc<OwnedFd>, TreeError> {
        let parent_path = &path[..path.len().saturating_sub(1)];
        if let Some((cached_path, fd)) = &self.parent
            && cached_path == parent_path
        {
            return Ok(Rc::clone(fd));
        }
        let fd = fs_at::open_dir_path(self.root.as_fd(), parent_path)
            .map_err(|e| self.error("open parent directory of", path, e))?;
        let fd = Rc::new(fd);
        self.parent = Some((parent_path.to_vec(), Rc::clone(&fd)));
        Ok(fd)
    }

    fn create(&mut self, entry: &Entry) -> Result<(), TreeError> {
        let path = &entry.path;
        let Some(name) = path.last() else {
            return Err(self.error("create (empty path)", path, io::ErrorKind::InvalidInput));
        };
        let name = name.clone();
        match &entry.node {
            Node::Dir => self.create_dir(path, &name, &entry.meta),
            Node::File(content) => self.create_file(path, &name, content, &entry.meta),
            Node::Symlink(target) => {
                let parent = self.parent_of(path)?;
                let result = rustix::fs::symlinkat(target.as_slice(), &*parent, name.as_slice());
                result.map_err(|e| self.error("create symlink", path, e))?;
                self.finish_non_regular(path, &name, &entry.meta, false)
            }
            Node::Special(special) => {
                let (file_type, dev) = match *special {
                    Special::CharDevice { major, minor } => {
                        (FileType::CharacterDevice, rustix::fs::makedev(major, minor))
                    }
                    Special::BlockDevice { major, minor } => {
                        (FileType::BlockDevice, rustix::fs::makedev(major, minor))
                    }
                    Special::Fifo => (FileType::Fifo, 0),
                    Special::Socket => (FileType::Socket, 0),
                };
                let parent = self.parent_of(path)?;
                let mode = Mode::from_raw_mode(0o600);
                let result = rustix::fs::mknodat(&*parent, name.as_slice(), file_type, mode, dev);
                result.map_err(|e| self.error("create special file", path, e))?;
                self.finish_non_regular(path, &name, &entry.meta, true)
            }
            Node::Hardlink(target) => self.create_hardlink(path, &name, target),
        }
    }

    fn create_dir(&mut self, path: &[Vec<u8>], name: &[u8], meta: &Meta) -> Result<(), TreeError> {
        let parent = self.parent_of(path)?;
        let result = rustix::fs::mkdirat(&*parent, name, Mode::from_raw_mode(0o700));
        result.map_err(|e| self.error("create directory", path, e))?;
        let fd =
            fs_at::open_dir_at(parent.as_fd(), name).map_err(|e| self.error("open", path, e))?;
        self.apply_owner_and_xattrs(fd.as_fd(), path, meta)
    }

    fn create_file(
        &mut self,
        path: &[Vec<u8>],
        name: &[u8],
        content: &Content,
        meta: &Meta,
    ) -> Result<(), TreeError> {
        let parent = self.parent_of(path)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(
            &*parent,
            name,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.error("create file", path, e))?;
        write_content(fd.as_fd(), content).map_err(|e| self.error("write", path, e))?;
        // Owner before mode and xattrs: chown clears setuid/setgid bits and
        // security.capability.
        self.apply_owner_and_xattrs(fd.as_fd(), path, meta)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.error("chmod", path, e))?;
        rustix::fs::futimens(&fd, &to_timestamps(meta.mtime))
            .map_err(|e| self.error("set times of", path, e))
    }

    fn finish_non_regular(
        &mut self,
        path: &[Vec<u8>],
        name: &[u8],
        meta: &Meta,
        set_mode: bool,
    ) -> Result<(), TreeError> {
        let parent = self.parent_of(path)?;
        let fd =
            fs_at::open_inode_at(parent.as_fd(), name).map_err(|e| self.error("open", path, e))?;
        self.apply_owner_and_xattrs(fd.as_fd(), path, meta)?;
        if set_mode {
            rustix::fs::chmodat(
                &*parent,
                name,
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| self.error("chmod", path, e))?;
        }
        let times = to_timestamps(meta.mtime);
        rustix::fs::utimensat(&*parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.error("set times of", path, e))
    }

    fn create_hardlink(
        &mut self,
        path: &[Vec<u8>],
        name: &[u8],
        target: &[Vec<u8>],
    ) -> Result<(), TreeError> {
        let Some((target_name, target_dir)) = target.split_last() else {
            return Err(self.error("hardlink to empty path", path, io::ErrorKind::InvalidInput));
        };
        let target_parent = fs_at::open_dir_path(self.root.as_fd(), target_dir)
            .map_err(|e| self.error("open hardlink target directory for", path, e))?;
        let parent = self.parent_of(path)?;
        let result = rustix::fs::linkat(
            &target_parent,
            target_name.as_slice(),
            &*parent,
            name,
            AtFlags::empty(),
        );
        result.map_err(|e| self.error("create hardlink", path, e))
    }

    fn apply_owner_and_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        path: &[Vec<u8>],
        meta: &Meta,
    ) -> Result<(), TreeError> {
        let uid = Uid::from_raw(meta.uid);
        let gid = Gid::from_raw(meta.gid);
        let result = rustix::fs::chownat(fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH);
        result.map_err(|e| self.error("chown", path, e))?;
        for (name, value) in &meta.xattrs {
            fs_at::set_xattr(fd, name, value).map_err(|e| self.error("set xattr on", path, e))?;
        }
        Ok(())
    }

    fn finish_dir(&self, path: &[Vec<u8>], meta: &Meta) -> Result<(), TreeError> {
        let fd = fs_at::open_dir_path(self.root.as_fd(), path)
            .map_err(|e| self.error("open directory", path, e))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.error("chmod", path, e))?;
        rustix::fs::futimens(&fd, &to_timestamps(meta.mtime))
            .map_err(|e| self.error("set times of", path, e))
    }
}

const WRITE_CHUNK: usize = 1 << 20;

fn write_content(fd: BorrowedFd<'_>, content: &Content) -> io::Result<()> {
    match content {
        Content::Bytes(bytes) => write_all_at(fd, bytes, 0),
        Content::Generated { size, data, seed } => {
            rustix::fs::ftruncate(fd, *size)?;
            let mut buf = vec![0u8; WRITE_CHUNK];
            for range in data {
                let mut offset = range.start;
                while offset < range.end {
                    let len = usize::try_from(range.end - offset)
                        .map_or(WRITE_CHUNK, |n| n.min(WRITE_CHUNK));
                    fill_pseudorandom(*seed, offset, &mut buf[..len]);
                    write_all_at(fd, &buf[..len], offset)?;
                    offset += len as u64;
                }
            }
            Ok(())
        }
    }
}

fn write_all_at(fd: BorrowedFd<'_>, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        let written = rustix::io::pwrite(fd, bytes, offset)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

/// Fills `buf` with the bytes at `offset` of an endless pseudorandom stream
/// identified by `seed` (splitmix64 over 8-byte words), so any range can be
/// generated independently and reproduced.
pub(crate) fn fill_pseudorandom(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut out = buf;
    while !out.is_empty() {
        let word = splitmix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (pos / 8)).to_le_bytes();
        let skip = (pos % 8) as usize;
        let take = (8 - skip).min(out.len());
        out[..take].copy_from_slice(&word[skip..skip + take]);
        out = &mut out[take..];
        pos += take as u64;
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
