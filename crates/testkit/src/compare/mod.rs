//! [`compare_trees`]: proves two directory trees are identical in every
//! property a container image carries, and lists every difference.
//!
//! Compared per path: presence, file type, size, content (streamed,
//! sparse-aware), holes (optional), the 12 permission bits, uid, gid, mtime
//! with nanoseconds, every xattr, symlink target, device major/minor, link
//! count, and the hardlink structure (which paths share an inode).
//! Not compared: atime, ctime, inode numbers, directory sizes and
//! directory link counts (filesystem-specific).
//!
//! The walk uses `*at` syscalls relative to directory fds (paths beyond
//! PATH_MAX work), never follows symlinks, and keeps only one pair of
//! directory fds open per level of depth. A directory missing on one side
//! is reported once, not once per descendant.

mod content;
mod walk;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::fs_at::{escape_bytes, escape_path};
pub use crate::tree::Mtime;

/// What to compare; [`Default`] compares everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompareOptions {
    /// Ranges that are holes in `expected` must be holes in `actual` (up to
    /// `actual`'s block size at the edges), not allocated zeros.
    pub check_holes: bool,
    /// Skip directory mtimes (for sources that do not restore them).
    pub ignore_dir_mtime: bool,
    /// Compare mtimes to the second only, for sources that drop
    /// nanoseconds: `actual` may be `expected` truncated, or rounded to the
    /// nearest second (as Go's archive/tar, hence umoci, does).
    pub ignore_mtime_nsec: bool,
    /// Skip mode, owner, mtime and xattrs of the two roots themselves.
    pub ignore_root_metadata: bool,
    /// Xattr names to skip; an entry ending in `.` skips every name with
    /// that prefix (e.g. `trusted.overlay.`).
    pub ignored_xattrs: Vec<String>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            check_holes: true,
            ignore_dir_mtime: false,
            ignore_mtime_nsec: false,
            ignore_root_metadata: false,
            ignored_xattrs: Vec::new(),
        }
    }
}

impl CompareOptions {
    fn ignores_xattr(&self, name: &[u8]) -> bool {
        self.ignored_xattrs.iter().any(|ignored| {
            let ignored = ignored.as_bytes();
            if ignored.ends_with(b".") {
                name.starts_with(ignored)
            } else {
                name == ignored
            }
        })
    }
}

/// File type of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Unknown,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
            FileKind::CharDevice => "char device",
            FileKind::BlockDevice => "block device",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::Unknown => "unknown file type",
        })
    }
}

/// Which of the two trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Expected,
    Actual,
}

/// One property of one path that differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiffKind {
    MissingInActual(FileKind),
    UnexpectedInActual(FileKind),
    FileKind {
        expected: FileKind,
        actual: FileKind,
    },
    Size {
        expected: u64,
        actual: u64,
    },
    /// Same size, different bytes: first differing offset and whole-file
    /// blake3 hashes (hex).
    Content {
        offset: u64,
        expected_blake3: String,
        actual_blake3: String,
    },
    /// Ranges that are holes in `expected` are allocated in `actual`.
    HolesFilled {
        first_offset: u64,
        bytes: u64,
    },
    Mode {
        expected: u32,
        actual: u32,
    },
    Uid {
        expected: u32,
        actual: u32,
    },
    Gid {
        expected: u32,
        actual: u32,
    },
    Mtime {
        expected: Mtime,
        actual: Mtime,
    },
    Xattr {
        name: Vec<u8>,
        expected: Option<Vec<u8>>,
        actual: Option<Vec<u8>>,
    },
    SymlinkTarget {
        expected: Vec<u8>,
        actual: Vec<u8>,
    },
    /// Device numbers as (major, minor).
    Rdev {
        expected: (u32, u32),
        actual: (u32, u32),
    },
    Nlink {
        expected: u64,
        actual: u64,
    },
    /// The other paths (within both trees) sharing this path's inode.
    Hardlinks {
        expected: Vec<PathBuf>,
        actual: Vec<PathBuf>,
    },
    Unreadable {
        side: Side,
        error: String,
    },
}

/// A difference at a path relative to the roots (`.` is the root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub kind: DiffKind,
}

/// Every difference found, sorted by path.
#[derive(Clone, PartialEq, Eq)]
pub struct TreeDiff {
    pub expected_root: PathBuf,
    pub actual_root: PathBuf,
    pub differences: Vec<Difference>,
}

impl std::error::Error for TreeDiff {}

/// Shows the `Display` report, so that `.unwrap()` in a test prints one
/// readable line per difference.
impl fmt::Debug for TreeDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How many differences [`TreeDiff`]'s `Display` prints before summarizing.
const DISPLAY_LIMIT: usize = 500;

impl fmt::Display for TreeDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} difference(s) between expected {} and actual {}:",
            self.differences.len(),
            escape_path(&self.expected_root),
            escape_path(&self.actual_root)
        )?;
        for difference in self.differences.iter().take(DISPLAY_LIMIT) {
            writeln!(f, "  {difference}")?;
        }
        if self.differences.len() > DISPLAY_LIMIT {
            let rest = self.differences.len() - DISPLAY_LIMIT;
            writeln!(
                f,
                "  ... and {rest} more (all are in TreeDiff::differences)"
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", escape_path(&self.path), self.kind)
    }
}

impl fmt::Display for Mtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.sec, self.nsec)
    }
}

/// Escaped bytes, shortened in the middle when long (the length is shown).
fn show_bytes(bytes: &[u8]) -> String {
    const HEAD: usize = 80;
    const TAIL: usize = 40;
    if bytes.len() <= HEAD + TAIL {
        return format!("\"{}\"", escape_bytes(bytes));
    }
    let head = escape_bytes(&bytes[..HEAD]);
    let tail = escape_bytes(&bytes[bytes.len() - TAIL..]);
    format!("\"{head}\"...\"{tail}\" ({} bytes)", bytes.len())
}

fn show_optional(value: Option<&Vec<u8>>) -> String {
    value.map_or_else(|| "absent".to_owned(), |v| show_bytes(v))
}

fn show_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| escape_path(p)).collect();
    format!("[{}]", shown.join(", "))
}

impl fmt::Display for DiffKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiffKind::MissingInActual(kind) => write!(f, "{kind} missing in actual"),
            DiffKind::UnexpectedInActual(kind) => write!(f, "unexpected {kind} in actual"),
            DiffKind::FileKind { expected, actual } => {
                write!(f, "type: expected {expected}, actual {actual}")
            }
            DiffKind::Size { expected, actual } => {
                write!(f, "size: expected {expected}, actual {actual}")
            }
            DiffKind::Content {
                offset,
                expected_blake3,
                actual_blake3,
            } => write!(
                f,
                "content differs from byte {offset} (blake3 expected {expected_blake3}, \
                 actual {actual_blake3})"
            ),
            DiffKind::HolesFilled {
                first_offset,
                bytes,
            } => write!(
                f,
                "{bytes} byte(s) of holes are allocated in actual, first at offset {first_offset}"
            ),
            DiffKind::Mode { expected, actual } => {
                write!(f, "mode: expected {expected:04o}, actual {actual:04o}")
            }
            DiffKind::Uid { expected, actual } => {
                write!(f, "uid: expected {expected}, actual {actual}")
            }
            DiffKind::Gid { expected, actual } => {
                write!(f, "gid: expected {expected}, actual {actual}")
            }
            DiffKind::Mtime { expected, actual } => {
                write!(f, "mtime: expected {expected}, actual {actual}")
            }
            DiffKind::Xattr {
                name,
                expected,
                actual,
            } => write!(
                f,
                "xattr {}: expected {}, actual {}",
                escape_bytes(name),
                show_optional(expected.as_ref()),
                show_optional(actual.as_ref())
            ),
            DiffKind::SymlinkTarget { expected, actual } => write!(
                f,
                "symlink target: expected {}, actual {}",
                show_bytes(expected),
                show_bytes(actual)
            ),
            DiffKind::Rdev { expected, actual } => write!(
                f,
                "device: expected {}:{}, actual {}:{}",
                expected.0, expected.1, actual.0, actual.1
            ),
            DiffKind::Nlink { expected, actual } => {
                write!(f, "link count: expected {expected}, actual {actual}")
            }
            DiffKind::Hardlinks { expected, actual } => write!(
                f,
                "hardlinked with {} in expected, with {} in actual",
                show_paths(expected),
                show_paths(actual)
            ),
            DiffKind::Unreadable { side, error } => write!(f, "cannot read {side:?} side: {error}"),
        }
    }
}

/// Compares the trees at `expected` and `actual`; `Err` lists every
/// difference (see the module docs for what is compared).
pub fn compare_trees(
    expected: &Path,
    actual: &Path,
    opts: &CompareOptions,
) -> Result<(), TreeDiff> {
    let mut differences = walk::compare(expected, actual, opts);
    if differences.is_empty() {
        return Ok(());
    }
    differences.sort_by(|a, b| a.path.cmp(&b.path));
    Err(TreeDiff {
        expected_root: expected.to_path_buf(),
        actual_root: actual.to_path_buf(),
        differences,
    })
}

#[cfg(test)]
mod tests;
