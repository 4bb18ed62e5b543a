//! The filesystem tree a bootstrap describes, as plain data: what the
//! builder produces and the EROFS writer consumes.

use crate::erofs::ondisk::ChunkIndex;

/// An extended attribute: full name (`user.foo`) and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// Index of a node in [`Tree::nodes`].
pub type NodeId = u32;

/// A whole tree. Node 0 is the root directory. A node referenced by several
/// directory entries is a hardlink group (directories must not be).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// All nodes; unreachable ones are ignored by the writer.
    pub nodes: Vec<Node>,
}

/// Ownership, permissions, times and extended attributes of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes (full names), sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Metadata.
    pub meta: Meta,
    /// Type and content.
    pub kind: NodeKind,
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name: 1 to 255 bytes, no `/` or NUL, not `.` or `..`.
    pub name: Vec<u8>,
    /// The node it names.
    pub node: NodeId,
}

/// Regular file content: its size and where each chunk lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileData {
    /// Size in bytes.
    pub size: u64,
    /// One entry per chunk of the image's chunk size (`ceil(size / chunk)`).
    pub chunks: Vec<ChunkIndex>,
}

/// The kinds of node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory and its entries (any order; the writer sorts them).
    Dir(Vec<Entry>),
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl NodeKind {
    /// The `st_mode` type bits.
    pub fn type_bits(&self) -> u16 {
        use crate::erofs::ondisk::mode::*;
        match self {
            NodeKind::Dir(_) => S_IFDIR,
            NodeKind::File(_) => S_IFREG,
            NodeKind::Symlink(_) => S_IFLNK,
            NodeKind::CharDev(..) => S_IFCHR,
            NodeKind::BlockDev(..) => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
            NodeKind::Socket => S_IFSOCK,
        }
    }
}

/// True if `name` may appear in a directory.
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= crate::erofs::ondisk::NAME_LEN
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}
