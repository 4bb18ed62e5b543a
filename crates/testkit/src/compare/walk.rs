//! The lockstep walk over both trees and the per-inode comparison.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::FileType;

use super::content::ContentComparer;
use super::{CompareOptions, DiffKind, Difference, FileKind, Mtime, Side};
use crate::fs_at::{self, Xattrs};

/// The facts about one inode that are compared.
struct Inode {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Mtime,
    size: u64,
    nlink: u64,
    rdev: (u32, u32),
    dev_ino: DevIno,
    block_size: u64,
}

fn kind_of(file_type: FileType) -> FileKind {
    match file_type {
        FileType::RegularFile => FileKind::Regular,
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
        FileType::Unknown => FileKind::Unknown,
    }
}

fn inode_of(fd: BorrowedFd<'_>) -> io::Result<Inode> {
    let st = rustix::fs::fstat(fd)?;
    let rdev = st.st_rdev;
    Ok(Inode {
        kind: kind_of(FileType::from_raw_mode(st.st_mode)),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: Mtime {
            sec: st.st_mtime,
            nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(u32::MAX),
        },
        size: u64::try_from(st.st_size).unwrap_or(0),
        nlink: st.st_nlink,
        rdev: (rustix::fs::major(rdev), rustix::fs::minor(rdev)),
        dev_ino: (st.st_dev, st.st_ino),
        block_size: u64::try_from(st.st_blksize).unwrap_or(4096).max(512),
    })
}

/// Both trees' fds of one directory, shared by the pending subdirectories
/// so that only the ancestors of pending work stay open.
struct DirPair {
    expected: OwnedFd,
    actual: OwnedFd,
}

struct PendingDir {
    parents: Rc<DirPair>,
    name: Vec<u8>,
    path: PathBuf,
}

struct Walker<'a> {
    opts: &'a CompareOptions,
    diffs: Vec<Difference>,
    links: LinkTracker,
    content: ContentComparer,
    pending: Vec<PendingDir>,
}

pub(super) fn compare(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<Difference> {
    let mut walker = Walker {
        opts,
        diffs: Vec::new(),
        links: LinkTracker::default(),
        content: ContentComparer::new(),
        pending: Vec::new(),
    };
    let root = Path::new(".");
    let expected_root = fs_at::open_root(expected);
    let actual_root = fs_at::open_root(actual);
    if let Some(pair) = walker.pair(root, expected_root, actual_root) {
        if !opts.ignore_root_metadata {
            walker.compare_inodes(root, pair.expected.as_fd(), pair.actual.as_fd());
        }
        walker.walk_dir(&Rc::new(pair), root);
    }
    while let Some(dir) = walker.pending.pop() {
        let expected = fs_at::open_dir_at(dir.parents.expected.as_fd(), &dir.name);
        let actual = fs_at::open_dir_at(dir.parents.actual.as_fd(), &dir.name);
        drop(dir.parents);
        if let Some(pair) = walker.pair(&dir.path, expected, actual) {
            walker.walk_dir(&Rc::new(pair), &dir.path);
        }
    }
    let Walker {
        mut diffs, links, ..
    } = walker;
    diffs.extend(links.differences());
    diffs
}

/// Whether `actual` is `expected` at second precision: same second (any
/// nanoseconds, i.e. kept or truncated), or rounded up to the next whole
/// second as Go's archive/tar (umoci) does from half a second on.
fn same_second(expected: Mtime, actual: Mtime) -> bool {
    let rounded_up =
        expected.nsec >= 500_000_000 && actual.nsec == 0 && actual.sec == expected.sec + 1;
    actual.sec == expected.sec || rounded_up
}

fn child_path(parent: &Path, name: &[u8]) -> PathBuf {
    let name = Path::new(OsStr::from_bytes(name));
    if parent == Path::new(".") {
        name.to_path_buf()
    } else {
        parent.join(name)
    }
}

impl Walker<'_> {
    fn report(&mut self, path: &Path, kind: DiffKind) {
        self.diffs.push(Difference {
            path: path.to_path_buf(),
            kind,
        });
    }

    fn unreadable(&mut self, path: &Path, side: Side, what: &str, error: &io::Error) {
        self.report(
            path,
            DiffKind::Unreadable {
                side,
                error: format!("{what}: {error}"),
            },
        );
    }

    /// Both results, or `None` after reporting each side that failed to
    /// do `what`.
    fn both<T>(
        &mut self,
        path: &Path,
        what: &str,
        expected: io::Result<T>,
        actual: io::Result<T>,
    ) -> Option<(T, T)> {
        match (expected, actual) {
            (Ok(expected), Ok(actual)) => Some((expected, actual)),
            (expected, actual) => {
                for (side, result) in [
                    (Side::Expected, expected.err()),
                    (Side::Actual, actual.err()),
                ] {
                    if let Some(err) = result {
                        self.unreadable(path, side, what, &err);
                    }
                }
                None
            }
        }
    }

    /// Both opened directories, or `None` after reporting which failed.
    fn pair(
        &mut self,
        path: &Path,
        expected: io::Result<OwnedFd>,
        actual: io::Result<OwnedFd>,
    ) -> Option<DirPair> {
        let (expected, actual) = self.both(path, "open", expected, actual)?;
        Some(DirPair { expected, actual })
    }

    fn walk_dir(&mut self, dirs: &Rc<DirPair>, path: &Path) {
        let expected_names = fs_at::read_dir_names(dirs.expected.as_fd());
        let actual_names = fs_at::read_dir_names(dirs.actual.as_fd());
        let Some((expected_names, actual_names)) =
            self.both(path, "read directory", expected_names, actual_names)
        else {
            return;
        };
        let (mut e, mut a) = (
            expected_names.iter().peekable(),
            actual_names.iter().peekable(),
        );
        loop {
            let order = match (e.peek(), a.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(x), Some(y)) => x.cmp(y),
            };
            match order {
                Ordering::Less => {
                    if let Some(name) = e.next() {
                        self.report_one_sided(dirs, path, name, Side::Expected);
                    }
                }
                Ordering::Greater => {
                    if let Some(name) = a.next() {
                        self.report_one_sided(dirs, path, name, Side::Actual);
                    }
                }
                Ordering::Equal => {
                    if let (Some(name), Some(_)) = (e.next(), a.next()) {
                        self.compare_entry(dirs, path, name);
                    }
                }
            }
        }
    }

    fn report_one_sided(&mut self, dirs: &DirPair, parent: &Path, name: &[u8], side: Side) {
        let path = child_path(parent, name);
        let dir = match side {
            Side::Expected => dirs.expected.as_fd(),
            Side::Actual => dirs.actual.as_fd(),
        };
        let kind = match fs_at::open_inode_at(dir, name).and_then(|fd| inode_of(fd.as_fd())) {
            Ok(inode) => inode.kind,
            Err(err) => return self.unreadable(&path, side, "stat", &err),
        };
        let diff = match side {
            Side::Expected => DiffKind::MissingInActual(kind),
            Side::Actual => DiffKind::UnexpectedInActual(kind),
        };
        self.report(&path, diff);
    }

    fn compare_entry(&mut self, dirs: &Rc<DirPair>, parent: &Path, name: &[u8]) {
        let path = child_path(parent, name);
        let expected = fs_at::open_inode_at(dirs.expected.as_fd(), name);
        let actual = fs_at::open_inode_at(dirs.actual.as_fd(), name);
        let Some(pair) = self.pair(&path, expected, actual) else {
            return;
        };
        let both_dirs = self.compare_inodes(&path, pair.expected.as_fd(), pair.actual.as_fd());
        if both_dirs {
            let parents = Rc::clone(dirs);
            self.pending.push(PendingDir {
                parents,
                name: name.to_vec(),
                path,
            });
        }
    }

    /// Compares two inodes (any type, `O_PATH` fds are enough); returns
    /// whether both are directories to descend into.
    fn compare_inodes(&mut self, path: &Path, e_fd: BorrowedFd<'_>, a_fd: BorrowedFd<'_>) -> bool {
        let Some((e, a)) = self.both(path, "stat", inode_of(e_fd), inode_of(a_fd)) else {
            return false;
        };
        if e.kind != a.kind {
            self.report(
                path,
                DiffKind::FileKind {
                    expected: e.kind,
                    actual: a.kind,
                },
            );
            return false;
        }
        self.compare_metadata(path, &e, &a);
        self.compare_xattrs(path, e_fd, a_fd);
        if e.kind == FileKind::Directory {
            return true;
        }
        if e.nlink != a.nlink {
            self.report(
                path,
                DiffKind::Nlink {
                    expected: e.nlink,
                    actual: a.nlink,
                },
            );
        }
        self.links.record(path, &e, &a);
        match e.kind {
            FileKind::Regular => self.compare_regular(path, &e, &a, e_fd, a_fd),
            FileKind::Symlink => self.compare_symlink(path, e_fd, a_fd),
            FileKind::CharDevice | FileKind::BlockDevice if e.rdev != a.rdev => {
                self.report(
                    path,
                    DiffKind::Rdev {
                        expected: e.rdev,
                        actual: a.rdev,
                    },
                );
            }
            _ => {}
        }
        false
    }

    fn compare_metadata(&mut self, path: &Path, e: &Inode, a: &Inode) {
        if e.mode != a.mode {
            self.report(
                path,
                DiffKind::Mode {
                    expected: e.mode,
                    actual: a.mode,
                },
            );
        }
        if e.uid != a.uid {
            self.report(
                path,
                DiffKind::Uid {
                    expected: e.uid,
                    actual: a.uid,
                },
            );
        }
        if e.gid != a.gid {
            self.report(
                path,
                DiffKind::Gid {
                    expected: e.gid,
                    actual: a.gid,
                },
            );
        }
        let skip_mtime = e.kind == FileKind::Directory && self.opts.ignore_dir_mtime;
        let mtime_differs = if self.opts.ignore_mtime_nsec {
            !same_second(e.mtime, a.mtime)
        } else {
            e.mtime != a.mtime
        };
        if mtime_differs && !skip_mtime {
            self.report(
                path,
                DiffKind::Mtime {
                    expected: e.mtime,
                    actual: a.mtime,
                },
            );
        }
    }

    fn read_xattrs(&mut self, path: &Path, side: Side, fd: BorrowedFd<'_>) -> Option<Xattrs> {
        match fs_at::read_xattrs(fd) {
            Ok(mut xattrs) => {
                xattrs.retain(|name, _| !self.opts.ignores_xattr(name));
                Some(xattrs)
            }
            // A filesystem without xattr support has none.
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
                Some(Xattrs::new())
            }
            Err(err) => {
                self.unreadable(path, side, "read xattrs", &err);
                None
            }
        }
    }

    fn compare_xattrs(&mut self, path: &Path, e_fd: BorrowedFd<'_>, a_fd: BorrowedFd<'_>) {
        let expected = self.read_xattrs(path, Side::Expected, e_fd);
        let actual = self.read_xattrs(path, Side::Actual, a_fd);
        let (Some(expected), Some(actual)) = (expected, actual) else {
            return;
        };
        let names: std::collections::BTreeSet<&Vec<u8>> =
            expected.keys().chain(actual.keys()).collect();
        for name in names {
            let (e, a) = (expected.get(name), actual.get(name));
            if e != a {
                let kind = DiffKind::Xattr {
                    name: name.clone(),
                    expected: e.cloned(),
                    actual: a.cloned(),
                };
                self.report(path, kind);
            }
        }
    }

    fn compare_symlink(&mut self, path: &Path, e_fd: BorrowedFd<'_>, a_fd: BorrowedFd<'_>) {
        let read = |fd| -> io::Result<Vec<u8>> {
            Ok(rustix::fs::readlinkat(fd, "", Vec::new())?.into_bytes())
        };
        let Some((expected, actual)) = self.both(path, "read symlink", read(e_fd), read(a_fd))
        else {
            return;
        };
        if expected != actual {
            self.report(path, DiffKind::SymlinkTarget { expected, actual });
        }
    }

    fn compare_regular(
        &mut self,
        path: &Path,
        e: &Inode,
        a: &Inode,
        e_fd: BorrowedFd<'_>,
        a_fd: BorrowedFd<'_>,
    ) {
        if e.size != a.size {
            self.report(
                path,
                DiffKind::Size {
                    expected: e.size,
                    actual: a.size,
                },
            );
            return;
        }
        if e.size == 0 {
            return;
        }
        let reopen = |fd| fs_at::reopen_readable(fd).map(File::from);
        let Some((e_file, a_file)) = self.both(path, "open", reopen(e_fd), reopen(a_fd)) else {
            return;
        };
        let check_holes = self.opts.check_holes.then_some(a.block_size);
        match self.content.compare(&e_file, &a_file, e.size, check_holes) {
            Ok(kinds) => {
                for kind in kinds {
                    self.report(path, kind);
                }
            }
            Err((side, err)) => self.unreadable(path, side, "read content", &err),
        }
    }
}

/// Device and inode number: what makes two paths hardlinks.
type DevIno = (u64, u64);

/// A path with its inode in each tree.
struct LinkedPath {
    path: PathBuf,
    expected: DevIno,
    actual: DevIno,
}

/// Which paths share an inode on each side. Only paths with a link count
/// above one on either side are recorded: the others are alone in both.
#[derive(Default)]
struct LinkTracker {
    paths: Vec<LinkedPath>,
}

impl LinkTracker {
    fn record(&mut self, path: &Path, e: &Inode, a: &Inode) {
        if e.nlink > 1 || a.nlink > 1 {
            let (expected, actual) = (e.dev_ino, a.dev_ino);
            self.paths.push(LinkedPath {
                path: path.to_path_buf(),
                expected,
                actual,
            });
        }
    }

    fn differences(self) -> Vec<Difference> {
        let mut expected_groups: HashMap<DevIno, Vec<&Path>> = HashMap::new();
        let mut actual_groups: HashMap<DevIno, Vec<&Path>> = HashMap::new();
        for linked in &self.paths {
            expected_groups
                .entry(linked.expected)
                .or_default()
                .push(&linked.path);
            actual_groups
                .entry(linked.actual)
                .or_default()
                .push(&linked.path);
        }
        let others = |group: Option<&Vec<&Path>>, me: &Path| -> Vec<PathBuf> {
            let mut paths: Vec<PathBuf> = group
                .into_iter()
                .flatten()
                .filter(|p| **p != me)
                .map(|p| p.to_path_buf())
                .collect();
            paths.sort();
            paths
        };
        let mut diffs = Vec::new();
        for linked in &self.paths {
            let expected = others(expected_groups.get(&linked.expected), &linked.path);
            let actual = others(actual_groups.get(&linked.actual), &linked.path);
            if expected != actual {
                diffs.push(Difference {
                    path: linked.path.clone(),
                    kind: DiffKind::Hardlinks { expected, actual },
                });
            }
        }
        diffs
    }
}
