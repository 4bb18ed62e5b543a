//! EROFS on-disk structures, as defined by the Linux kernel's
//! `fs/erofs/erofs_fs.h`. Everything here is ON-DISK: changing a value
//! changes the format (and the kernel will stop reading it).

use crate::le::{Fields, FieldsMut};

/// Offset of the superblock; the bytes before it are free for Darter's header.
pub const SUPER_OFFSET: usize = 1024;
/// Superblock magic.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the superblock without extension slots.
pub const SUPERBLOCK_SIZE: usize = 128;
/// Inode slots are 32 bytes: `nid = offset / 32`.
pub const ISLOT_BITS: u32 = 5;
/// Size of an extended (64-byte) inode.
pub const INODE_EXTENDED_SIZE: usize = 64;
/// Size of a compact (32-byte) inode.
pub const INODE_COMPACT_SIZE: usize = 32;
/// Size of a device table slot.
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Size of a directory entry record.
pub const DIRENT_SIZE: usize = 12;
/// Size of an inode chunk index.
pub const CHUNK_INDEX_SIZE: usize = 8;
/// Size of the inline xattr body header.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Size of an xattr entry header.
pub const XATTR_ENTRY_SIZE: usize = 4;
/// Longest file name.
pub const NAME_LEN: usize = 255;
/// Block address meaning "hole".
pub const NULL_ADDR: u32 = u32::MAX;

/// `feature_incompat`: files use chunk-based layout.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `feature_incompat`: a device table is present.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// `feature_compat`: compact inodes carry their own mtime.
pub const FEATURE_COMPAT_MTIME: u32 = 0x2;
/// Incompatible features this reader understands.
pub const SUPPORTED_INCOMPAT: u32 = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;

/// Chunk format: mask of the chunk size bits (`chunk = block << bits`).
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// Chunk format: 8-byte indexes (with device ids) instead of a block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

/// Data layouts (`i_format` bits 1..3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Data in consecutive blocks at `raw_blkaddr`.
    FlatPlain,
    /// Full blocks at `raw_blkaddr`, the tail inline after the inode.
    FlatInline,
    /// Chunk indexes after the inode.
    ChunkBased,
}

impl DataLayout {
    /// The on-disk value.
    pub const fn code(self) -> u16 {
        match self {
            DataLayout::FlatPlain => 0,
            DataLayout::FlatInline => 2,
            DataLayout::ChunkBased => 4,
        }
    }

    /// Decodes a layout this reader supports (compressed layouts are not).
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            0 => Some(DataLayout::FlatPlain),
            2 => Some(DataLayout::FlatInline),
            4 => Some(DataLayout::ChunkBased),
            _ => None,
        }
    }
}

/// File types in directory entries.
pub mod file_type {
    /// Unknown.
    pub const UNKNOWN: u8 = 0;
    /// Regular file.
    pub const REG: u8 = 1;
    /// Directory.
    pub const DIR: u8 = 2;
    /// Character device.
    pub const CHRDEV: u8 = 3;
    /// Block device.
    pub const BLKDEV: u8 = 4;
    /// Named pipe.
    pub const FIFO: u8 = 5;
    /// Socket.
    pub const SOCK: u8 = 6;
    /// Symbolic link.
    pub const SYMLINK: u8 = 7;
}

/// `st_mode` file type bits.
pub mod mode {
    /// Mask of the type bits.
    pub const S_IFMT: u16 = 0o170000;
    /// Socket.
    pub const S_IFSOCK: u16 = 0o140000;
    /// Symbolic link.
    pub const S_IFLNK: u16 = 0o120000;
    /// Regular file.
    pub const S_IFREG: u16 = 0o100000;
    /// Block device.
    pub const S_IFBLK: u16 = 0o060000;
    /// Directory.
    pub const S_IFDIR: u16 = 0o040000;
    /// Character device.
    pub const S_IFCHR: u16 = 0o020000;
    /// Named pipe.
    pub const S_IFIFO: u16 = 0o010000;

    /// The directory entry file type for a mode.
    pub fn file_type(mode: u16) -> u8 {
        use super::file_type as ft;
        match mode & S_IFMT {
            S_IFREG => ft::REG,
            S_IFDIR => ft::DIR,
            S_IFCHR => ft::CHRDEV,
            S_IFBLK => ft::BLKDEV,
            S_IFIFO => ft::FIFO,
            S_IFSOCK => ft::SOCK,
            S_IFLNK => ft::SYMLINK,
            _ => ft::UNKNOWN,
        }
    }
}

/// The xattr name prefixes EROFS can store, by index.
const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
];

/// Splits a full xattr name into its EROFS prefix index and the rest.
/// Returns `None` for namespaces EROFS cannot store.
pub fn xattr_split(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES.iter().find_map(|&(index, prefix)| {
        let rest = name.strip_prefix(prefix)?;
        let is_acl = index == 2 || index == 3;
        // ACL names are whole names; the others need a non-empty suffix.
        match (is_acl, rest.is_empty()) {
            (true, true) | (false, false) => Some((index, rest)),
            _ => None,
        }
    })
}

/// The full name for a prefix index and suffix, if the index is known.
pub fn xattr_join(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let prefix = XATTR_PREFIXES.iter().find(|p| p.0 == index)?.1;
    let mut name = prefix.to_vec();
    name.extend_from_slice(suffix);
    Some(name)
}

/// Size of the inline xattr body for an `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (usize::from(icount) - 1)
    }
}

/// Encodes a Linux `dev_t` the way EROFS stores `rdev` (the kernel's
/// `new_encode_dev`). Returns `None` if the numbers do not fit.
pub fn encode_rdev(major: u32, minor: u32) -> Option<u32> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// Decodes an EROFS `rdev` into (major, minor).
pub fn decode_rdev(rdev: u32) -> (u32, u32) {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    (major, minor)
}

/// The superblock fields Darter reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SuperBlock {
    /// `feature_compat`.
    pub feature_compat: u32,
    /// log2 of the block size.
    pub blkszbits: u8,
    /// nid of the root directory.
    pub root_nid: u16,
    /// Number of inodes.
    pub inos: u64,
    /// Build time, also the mtime of compact inodes.
    pub build_time: u64,
    /// Nanoseconds of the build time.
    pub build_time_nsec: u32,
    /// Size of the image in blocks.
    pub blocks: u32,
    /// Block where nid 0 lives.
    pub meta_blkaddr: u32,
    /// Block of the shared xattr area.
    pub xattr_blkaddr: u32,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Volume name.
    pub volume_name: [u8; 16],
    /// `feature_incompat`.
    pub feature_incompat: u32,
    /// Number of devices besides the primary one.
    pub extra_devices: u16,
    /// Device table offset in 128-byte slots.
    pub devt_slotoff: u16,
    /// Extension slot count (superblock is `128 + 16 * n` bytes).
    pub sb_extslots: u8,
    /// Number of long xattr prefixes (unsupported when non-zero).
    pub xattr_prefix_count: u8,
    /// Directory block bits beyond the block size (unsupported when non-zero).
    pub dirblkbits: u8,
}

impl SuperBlock {
    /// Encodes the 128-byte superblock.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut out = [0u8; SUPERBLOCK_SIZE];
        let mut f = FieldsMut(&mut out);
        f.u32(0, MAGIC);
        f.u32(8, self.feature_compat);
        f.u8(12, self.blkszbits);
        f.u8(13, self.sb_extslots);
        f.u16(14, self.root_nid);
        f.u64(16, self.inos);
        f.u64(24, self.build_time);
        f.u32(32, self.build_time_nsec);
        f.u32(36, self.blocks);
        f.u32(40, self.meta_blkaddr);
        f.u32(44, self.xattr_blkaddr);
        f.bytes(48, &self.uuid);
        f.bytes(64, &self.volume_name);
        f.u32(80, self.feature_incompat);
        f.u16(86, self.extra_devices);
        f.u16(88, self.devt_slotoff);
        f.u8(90, self.dirblkbits);
        f.u8(91, self.xattr_prefix_count);
        out
    }

    /// Decodes a superblock; `None` if the magic is wrong.
    pub fn decode(raw: &[u8; SUPERBLOCK_SIZE]) -> Option<Self> {
        let f = Fields(raw);
        if f.u32(0) != MAGIC {
            return None;
        }
        Some(SuperBlock {
            feature_compat: f.u32(8),
            blkszbits: f.u8(12),
            sb_extslots: f.u8(13),
            root_nid: f.u16(14),
            inos: f.u64(16),
            build_time: f.u64(24),
            build_time_nsec: f.u32(32),
            blocks: f.u32(36),
            meta_blkaddr: f.u32(40),
            xattr_blkaddr: f.u32(44),
            uuid: f.array(48),
            volume_name: f.array(64),
            feature_incompat: f.u32(80),
            extra_devices: f.u16(86),
            devt_slotoff: f.u16(88),
            dirblkbits: f.u8(90),
            xattr_prefix_count: f.u8(91),
        })
    }
}

/// One extra device (a Darter blob's uncompressed address space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Identifier; Darter stores the blob's sha256 as 64 hex characters.
    pub tag: [u8; 64],
    /// Size of the device in blocks.
    pub blocks: u32,
    /// Start in a flat address space (0: addressed by device id).
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    /// Encodes a slot.
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut out = [0u8; DEVICE_SLOT_SIZE];
        let mut f = FieldsMut(&mut out);
        f.bytes(0, &self.tag);
        f.u32(64, self.blocks);
        f.u32(68, self.mapped_blkaddr);
        out
    }

    /// Decodes a slot.
    pub fn decode(raw: &[u8; DEVICE_SLOT_SIZE]) -> Self {
        let f = Fields(raw);
        DeviceSlot {
            tag: f.array(0),
            blocks: f.u32(64),
            mapped_blkaddr: f.u32(68),
        }
    }
}

/// An 8-byte chunk index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkIndex {
    /// Device id: 0 is the bootstrap itself, `n` the n-th extra device.
    pub device_id: u16,
    /// Block address on that device, or [`NULL_ADDR`] for a hole.
    pub blkaddr: u32,
}

impl ChunkIndex {
    /// A hole.
    pub const HOLE: ChunkIndex = ChunkIndex {
        device_id: 0,
        blkaddr: NULL_ADDR,
    };

    /// True for a hole.
    pub fn is_hole(&self) -> bool {
        self.blkaddr == NULL_ADDR
    }

    /// Encodes the entry.
    pub fn encode(&self) -> [u8; CHUNK_INDEX_SIZE] {
        let mut out = [0u8; CHUNK_INDEX_SIZE];
        let mut f = FieldsMut(&mut out);
        f.u16(2, self.device_id);
        f.u32(4, self.blkaddr);
        out
    }

    /// Decodes the entry.
    pub fn decode(raw: &[u8; CHUNK_INDEX_SIZE]) -> Self {
        let f = Fields(raw);
        ChunkIndex {
            device_id: f.u16(2),
            blkaddr: f.u32(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_round_trip() {
        for (major, minor) in [(0, 0), (1, 3), (8, 1), (4095, 0xfffff), (259, 65536)] {
            let enc = encode_rdev(major, minor).unwrap();
            assert_eq!(decode_rdev(enc), (major, minor));
        }
        assert_eq!(encode_rdev(1, 3), Some(0x103));
        assert_eq!(encode_rdev(4096, 0), None);
    }

    #[test]
    fn xattr_prefixes() {
        type Case<'a> = (&'a [u8], Option<(u8, &'a [u8])>);
        let cases: [Case<'_>; 7] = [
            (b"user.foo", Some((1, b"foo"))),
            (b"security.capability", Some((6, b"capability"))),
            (b"trusted.overlay.opaque", Some((4, b"overlay.opaque"))),
            (b"system.posix_acl_access", Some((2, b""))),
            (b"system.posix_acl_access2", None),
            (b"user.", None),
            (b"other.x", None),
        ];
        for (name, want) in cases {
            assert_eq!(xattr_split(name), want, "{}", String::from_utf8_lossy(name));
            if let Some((i, rest)) = want {
                assert_eq!(xattr_join(i, rest).unwrap(), name);
            }
        }
    }

    #[test]
    fn superblock_round_trip() {
        let sb = SuperBlock {
            blkszbits: 12,
            root_nid: 40,
            inos: 7,
            blocks: 9,
            feature_incompat: SUPPORTED_INCOMPAT,
            extra_devices: 2,
            devt_slotoff: 9,
            ..SuperBlock::default()
        };
        assert_eq!(SuperBlock::decode(&sb.encode()), Some(sb));
    }
}
