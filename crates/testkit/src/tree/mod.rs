//! [`TrickyTree`]: creates a directory tree holding everything a container
//! filesystem can hold, with exact, deterministic metadata, to prove that a
//! round trip (pack, convert, mount, unpack) loses nothing.
//!
//! Must run as root (device nodes, foreign owners, `security.capability`).
//! All creation goes through `*at` syscalls relative to directory fds, so the
//! deep paths (longer than PATH_MAX) work; directory modes and mtimes are set
//! last because creating children changes them.
//!
//! Two creations with the same options are identical except for inode
//! numbers, so a tree can be compared against an independently created copy.
//!
//! Layout (relative to the root):
//! - `regular/`: empty, small, block-boundary and large pseudorandom files
//! - `sparse/`: sparse files (data at start, middle and end; holes at start,
//!   at end, and an all-hole file)
//! - `modes/`: files and directories with 0000, 0777, 04755, 02755, 01777,
//!   07777, 0444 and read-only or unreadable directories with children
//! - `owners/`: uid/gid 0, 1000, 65534, 100000 and 3000000 (too big for a
//!   plain tar header) on files, a directory, a symlink and a fifo
//! - `times/`: epoch, 1 ns, 1980, past 2038, 2100 and a 2200 directory
//! - `xattrs/`: several `user.*` values (empty, binary, long), a valid v2
//!   `security.capability`, and a directory with user xattrs
//! - `symlinks/`: relative, absolute, dangling, to a directory, self loop,
//!   and a 4000-byte target
//! - `special/`: char and block devices (incl. maximal major/minor), fifo,
//!   and a unix socket when [`TrickyTree::unix_sockets`] is on
//! - `names/`: names with non-UTF-8 bytes, newline, tab, spaces, leading
//!   `-`, control characters, 255 bytes, NFC vs NFD twins; `.wh.`-prefixed
//!   names only with [`TrickyTree::whiteout_like_names`]
//! - `hardlinks/`: a 5-name group across directories (one beyond PATH_MAX),
//!   a setuid pair, three links to an empty file, a hardlinked symlink and
//!   a hardlinked fifo
//! - `deep/`: a directory chain whose path exceeds PATH_MAX (4096), unless
//!   [`TrickyTree::deep_paths`] is off
//! - `bigdir/`: a directory with N entries

mod plan;
mod tricky;

use std::io;
use std::path::{Path, PathBuf};

pub use plan::Mtime;
pub(crate) use plan::Plan;
pub(crate) use tricky::{CAPABILITY_V2, deep_dir_components};

use crate::fs_at::escape_path;

/// The sparse file with data at start, middle and end.
pub const SPARSE_FILE: &str = "sparse/extents";
/// A dense pseudorandom file of [`TrickyTree::large_file_size`] bytes.
pub const LARGE_FILE: &str = "regular/large";
/// The directory with [`TrickyTree::big_dir_entries`] entries.
pub const BIG_DIR: &str = "bigdir";
/// One name of the five-name hardlink group.
pub const HARDLINKED_FILE: &str = "hardlinks/a";
/// A file carrying a `security.capability` xattr.
pub const CAPABILITY_FILE: &str = "xattrs/capability";

/// Creating a tree failed: which operation, on which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", escape_path(path))]
pub struct TreeError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl TreeError {
    pub(crate) fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        TreeError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Options of a tricky tree; start from [`TrickyTree::small`] (quick tests)
/// or [`TrickyTree::full`] (the real thing) and adjust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrickyTree {
    big_dir_entries: usize,
    sparse_size: u64,
    large_file_size: u64,
    unix_sockets: bool,
    whiteout_like_names: bool,
    deep_paths: bool,
}

const MIB: u64 = 1 << 20;

impl TrickyTree {
    /// Every kind of entry, in small sizes: 200-entry big dir, 16 MiB sparse
    /// file, 1 MiB large file. Creates in well under a second.
    pub fn small() -> Self {
        TrickyTree {
            big_dir_entries: 200,
            sparse_size: 16 * MIB,
            large_file_size: MIB + 4099,
            unix_sockets: false,
            whiteout_like_names: false,
            deep_paths: true,
        }
    }

    /// The real thing: 100,000-entry big dir, 3 GiB sparse file, 64 MiB
    /// large file.
    pub fn full() -> Self {
        TrickyTree {
            big_dir_entries: 100_000,
            sparse_size: 3 << 30,
            large_file_size: 64 * MIB + 4099,
            ..Self::small()
        }
    }

    /// Number of entries in [`BIG_DIR`].
    pub fn big_dir_entries(mut self, entries: usize) -> Self {
        self.big_dir_entries = entries;
        self
    }

    /// Apparent size of [`SPARSE_FILE`]; at least 1 MiB so its three data
    /// extents are separated by holes.
    pub fn sparse_size(mut self, bytes: u64) -> Self {
        assert!(
            bytes >= MIB,
            "sparse_size must be at least 1 MiB, got {bytes}"
        );
        self.sparse_size = bytes;
        self
    }

    /// Size of [`LARGE_FILE`].
    pub fn large_file_size(mut self, bytes: u64) -> Self {
        self.large_file_size = bytes;
        self
    }

    /// Adds `special/socket` (off by default: tar cannot carry sockets).
    pub fn unix_sockets(mut self, include: bool) -> Self {
        self.unix_sockets = include;
        self
    }

    /// Adds names starting with `.wh.` (off by default: in OCI layers they
    /// are whiteout markers, not files).
    pub fn whiteout_like_names(mut self, include: bool) -> Self {
        self.whiteout_like_names = include;
        self
    }

    /// Whether `deep/` (paths beyond PATH_MAX, and the fifth name of the
    /// [`HARDLINKED_FILE`] group) is created; on by default. Tools that use
    /// plain paths (cp, GNU tar, umoci) cannot copy or pack such trees.
    pub fn deep_paths(mut self, include: bool) -> Self {
        self.deep_paths = include;
        self
    }

    /// Relative path of the deepest directory of `deep/` (longer than
    /// PATH_MAX); it holds `file`, `symlink` and `hardlink`.
    pub fn deep_dir() -> PathBuf {
        crate::fs_at::join_components(&deep_dir_components())
    }

    /// Creates the tree in `root` (created if missing, should be empty).
    /// The root directory itself gets mode 0755, owner 0:0 and a fixed mtime.
    pub fn create(&self, root: &Path) -> Result<(), TreeError> {
        tracing::debug!(root = %root.display(), options = ?self, "creating tricky tree");
        tricky::plan(self).write(root)
    }
}

#[cfg(test)]
mod tests;
