//! Reads EROFS images through [`ReadAt`], validating every structure it
//! touches: a hostile image yields [`ReadError`], never a panic or an
//! out-of-bounds read.

use std::collections::HashSet;

use super::ondisk::{
    self, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, ChunkIndex,
    DEVICE_SLOT_SIZE, DIRENT_SIZE, DataLayout, DeviceSlot, INODE_COMPACT_SIZE, INODE_EXTENDED_SIZE,
    ISLOT_BITS, SUPER_OFFSET, SUPERBLOCK_SIZE, SuperBlock,
};
use crate::ReadAt;
use crate::le::Fields;
use crate::tree::Xattr;

/// Errors reading an EROFS image.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The underlying reader failed.
    #[error("cannot read {len} bytes at offset {offset}: {source}")]
    Io {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: usize,
        /// The error.
        source: std::io::Error,
    },
    /// A structure lies (partly) beyond the end of the image.
    #[error("{what} at offset {offset} runs past the end of the {size}-byte image")]
    OutOfBounds {
        /// What was read.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Image size.
        size: u64,
    },
    /// The superblock is missing or unusable.
    #[error("bad superblock: {0}")]
    BadSuperblock(String),
    /// An inode is corrupt.
    #[error("inode {nid} is corrupt: {detail}")]
    BadInode {
        /// The inode.
        nid: u64,
        /// What is wrong.
        detail: String,
    },
    /// A directory block is corrupt.
    #[error("directory inode {nid}, block {block}: {detail}")]
    BadDir {
        /// The directory.
        nid: u64,
        /// Block index within the directory.
        block: u64,
        /// What is wrong.
        detail: String,
    },
    /// The tree structure is inconsistent (cycles, wrong `.`/`..`).
    #[error("{path}: {detail}")]
    BadTree {
        /// Where.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Valid EROFS that uses a feature Darter does not read.
    #[error("unsupported EROFS feature: {0}")]
    Unsupported(String),
}

/// Called by [`Erofs::walk`] with the parent path, the entry and its inode.
pub type WalkVisitor<'a> = dyn FnMut(&[u8], &DirEntry, &Inode) -> Result<(), ReadError> + 'a;

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Its nid.
    pub nid: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: u64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Link count.
    pub nlink: u32,
    /// 32-bit inode number.
    pub ino: u32,
    /// Data layout.
    pub layout: DataLayout,
    /// Raw `i_u` (block address, rdev or chunk format).
    pub i_u: u32,
    xattr_icount: u16,
    inode_size: usize,
}

impl Inode {
    /// The file type bits of the mode.
    pub fn file_type(&self) -> u16 {
        self.mode & ondisk::mode::S_IFMT
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.file_type() == ondisk::mode::S_IFDIR
    }

    /// log2 of the chunk size (chunk-based inodes).
    pub fn chunk_bits(&self, blkszbits: u8) -> u32 {
        u32::from(blkszbits) + (self.i_u & u32::from(CHUNK_FORMAT_BLKBITS_MASK))
    }

    /// Number of chunks of a chunk-based file.
    pub fn chunk_count(&self, blkszbits: u8) -> u64 {
        self.size.div_ceil(1u64 << self.chunk_bits(blkszbits))
    }

    /// Device numbers of a device node.
    pub fn rdev(&self) -> (u32, u32) {
        ondisk::decode_rdev(self.i_u)
    }
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name bytes.
    pub name: Vec<u8>,
    /// Target inode.
    pub nid: u64,
    /// EROFS file type.
    pub file_type: u8,
}

/// An open EROFS image.
#[derive(Debug)]
pub struct Erofs<R> {
    r: R,
    sb: SuperBlock,
    devices: Vec<DeviceSlot>,
    size: u64,
    bs: u64,
    /// The chunk size (log2) every chunk-based inode must use, when the
    /// image promises one (a Darter bootstrap does).
    uniform_chunk_bits: Option<u32>,
}

impl<R: ReadAt> Erofs<R> {
    /// Opens an image, validating the superblock and device table.
    pub fn open(r: R) -> Result<Self, ReadError> {
        let size = r.size();
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        read_at(&r, size, "superblock", &mut raw, SUPER_OFFSET as u64)?;
        let sb = SuperBlock::decode(&raw)
            .ok_or_else(|| ReadError::BadSuperblock("wrong magic: not an EROFS image".into()))?;
        if !(9..=16).contains(&sb.blkszbits) {
            return Err(ReadError::BadSuperblock(format!(
                "block size bits {}",
                sb.blkszbits
            )));
        }
        let unknown = sb.feature_incompat & !ondisk::SUPPORTED_INCOMPAT;
        if unknown != 0 {
            return Err(ReadError::Unsupported(format!(
                "incompatible feature bits {unknown:#x}"
            )));
        }
        if sb.xattr_prefix_count != 0 || sb.dirblkbits != 0 {
            return Err(ReadError::Unsupported(
                "long xattr prefixes or large directory blocks".into(),
            ));
        }
        let bs = 1u64 << sb.blkszbits;
        if u64::from(sb.blocks) * bs > size {
            return Err(ReadError::BadSuperblock(format!(
                "image is truncated: {size} bytes, superblock says {} blocks",
                sb.blocks
            )));
        }
        let mut devices = Vec::with_capacity(usize::from(sb.extra_devices));
        let devt = u64::from(sb.devt_slotoff) * DEVICE_SLOT_SIZE as u64;
        for i in 0..u64::from(sb.extra_devices) {
            let mut slot = [0u8; DEVICE_SLOT_SIZE];
            read_at(
                &r,
                size,
                "device slot",
                &mut slot,
                devt + i * DEVICE_SLOT_SIZE as u64,
            )?;
            devices.push(DeviceSlot::decode(&slot));
        }
        let image = Erofs {
            r,
            sb,
            devices,
            size,
            bs,
            uniform_chunk_bits: None,
        };
        image.inode(image.root_nid())?;
        Ok(image)
    }

    /// Makes every chunk-based inode with a chunk size other than
    /// `2^chunk_bits` corrupt. EROFS lets each inode choose; readers that
    /// place chunk `n` at `n << chunk_bits` for every file (and a
    /// kernel-mounted tree that must show the same bytes) need them equal.
    pub fn with_uniform_chunk_bits(mut self, chunk_bits: u32) -> Self {
        self.uniform_chunk_bits = Some(chunk_bits);
        self
    }

    /// The superblock.
    pub fn superblock(&self) -> &SuperBlock {
        &self.sb
    }

    /// The extra devices, in device-id order (id 1 first).
    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The root directory's nid.
    pub fn root_nid(&self) -> u64 {
        u64::from(self.sb.root_nid)
    }

    /// The underlying reader.
    pub fn reader(&self) -> &R {
        &self.r
    }

    fn read(&self, what: &'static str, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
        read_at(&self.r, self.size, what, buf, offset)
    }

    fn iloc(&self, nid: u64) -> Option<u64> {
        (u64::from(self.sb.meta_blkaddr) * self.bs).checked_add(nid.checked_mul(1 << ISLOT_BITS)?)
    }

    /// Reads and validates inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode, ReadError> {
        let bad = |detail: String| ReadError::BadInode { nid, detail };
        let pos = self
            .iloc(nid)
            .ok_or_else(|| bad("nid out of range".into()))?;
        let mut raw = [0u8; INODE_EXTENDED_SIZE];
        self.read("inode", &mut raw[..INODE_COMPACT_SIZE], pos)?;
        let format = Fields(&raw).u16(0);
        if format & !0xf != 0 {
            return Err(bad(format!("unknown i_format bits {format:#x}")));
        }
        let extended = format & 1 == 1;
        let layout = DataLayout::from_code((format >> 1) & 0x7)
            .ok_or_else(|| bad(format!("unsupported data layout {}", (format >> 1) & 0x7)))?;
        if extended {
            self.read(
                "inode",
                &mut raw[INODE_COMPACT_SIZE..],
                pos + INODE_COMPACT_SIZE as u64,
            )?;
        }
        let f = Fields(&raw);
        let mut inode = Inode {
            nid,
            mode: f.u16(4),
            uid: 0,
            gid: 0,
            size: 0,
            mtime: self.sb.build_time,
            mtime_nsec: self.sb.build_time_nsec,
            nlink: 0,
            ino: 0,
            layout,
            i_u: f.u32(16),
            xattr_icount: f.u16(2),
            inode_size: if extended {
                INODE_EXTENDED_SIZE
            } else {
                INODE_COMPACT_SIZE
            },
        };
        if extended {
            inode.size = f.u64(8);
            inode.ino = f.u32(20);
            inode.uid = f.u32(24);
            inode.gid = f.u32(28);
            inode.mtime = f.u64(32);
            inode.mtime_nsec = f.u32(40);
            inode.nlink = f.u32(44);
        } else {
            inode.nlink = u32::from(f.u16(6));
            inode.size = u64::from(f.u32(8));
            inode.ino = f.u32(20);
            inode.uid = u32::from(f.u16(24));
            inode.gid = u32::from(f.u16(26));
            if self.sb.feature_compat & ondisk::FEATURE_COMPAT_MTIME != 0 {
                inode.mtime = self
                    .sb
                    .build_time
                    .checked_add(u64::from(f.u32(12)))
                    .ok_or_else(|| bad("compact mtime overflows the build time".into()))?;
            }
        }
        self.validate_inode(&inode)?;
        Ok(inode)
    }

    fn validate_inode(&self, inode: &Inode) -> Result<(), ReadError> {
        use ondisk::mode::*;
        let bad = |detail: String| ReadError::BadInode {
            nid: inode.nid,
            detail,
        };
        let kind = inode.file_type();
        let flat_ok = matches!(inode.layout, DataLayout::FlatPlain | DataLayout::FlatInline);
        match kind {
            S_IFREG => {}
            S_IFDIR | S_IFLNK if flat_ok => {}
            S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK if inode.layout == DataLayout::FlatPlain => {}
            S_IFDIR | S_IFLNK | S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK => {
                return Err(bad(format!(
                    "type {kind:o} cannot use layout {:?}",
                    inode.layout
                )));
            }
            other => return Err(bad(format!("unknown file type {other:o}"))),
        }
        if kind == S_IFLNK && (inode.size == 0 || inode.size >= 4096) {
            return Err(bad(format!("symlink of {} bytes", inode.size)));
        }
        match inode.layout {
            DataLayout::ChunkBased => {
                let format = inode.i_u & 0xffff;
                if format & !u32::from(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) != 0 {
                    return Err(bad(format!("unknown chunk format {format:#x}")));
                }
                let chunk_bits = inode.chunk_bits(self.sb.blkszbits);
                if chunk_bits > 40 {
                    return Err(bad("chunk size above 1 TiB".into()));
                }
                if let Some(uniform) = self.uniform_chunk_bits
                    && chunk_bits != uniform
                {
                    return Err(bad(format!(
                        "chunk size 2^{chunk_bits} differs from the image's 2^{uniform}"
                    )));
                }
            }
            DataLayout::FlatPlain | DataLayout::FlatInline
                if kind == S_IFREG || kind == S_IFDIR || kind == S_IFLNK =>
            {
                let full_blocks = if inode.layout == DataLayout::FlatInline {
                    inode.size / self.bs
                } else {
                    inode.size.div_ceil(self.bs)
                };
                let end = full_blocks
                    .checked_add(u64::from(inode.i_u))
                    .and_then(|b| b.checked_mul(self.bs));
                if full_blocks > 0 && end.is_none_or(|end| end > self.size) {
                    return Err(bad(format!(
                        "{full_blocks} data blocks at block {} run past the image",
                        inode.i_u
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn meta_end(&self, inode: &Inode) -> u64 {
        self.iloc(inode.nid).unwrap_or(0)
            + inode.inode_size as u64
            + ondisk::xattr_ibody_size(inode.xattr_icount) as u64
    }

    /// Reads `len` bytes at `offset` of a flat (plain or inline) inode.
    pub fn read_flat(&self, inode: &Inode, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let bad = |detail: String| ReadError::BadInode {
            nid: inode.nid,
            detail,
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= inode.size)
            .ok_or_else(|| {
                bad(format!(
                    "read of {len} at {offset} past size {}",
                    inode.size
                ))
            })?;
        let mut out = vec![0u8; len];
        let inline_from = match inode.layout {
            DataLayout::FlatInline => (inode.size / self.bs) * self.bs,
            DataLayout::FlatPlain => u64::MAX,
            DataLayout::ChunkBased => return Err(bad("not a flat inode".into())),
        };
        let mut pos = offset;
        while pos < end {
            let chunk_end = if pos < inline_from {
                end.min(inline_from)
            } else {
                end
            };
            let dst = &mut out[(pos - offset) as usize..(chunk_end - offset) as usize];
            if pos < inline_from {
                self.read("file data", dst, u64::from(inode.i_u) * self.bs + pos)?;
            } else {
                let tail_at = self.meta_end(inode);
                let tail_len = inode.size - inline_from;
                if tail_at % self.bs + tail_len > self.bs {
                    return Err(bad("inline data crosses a block boundary".into()));
                }
                self.read("inline data", dst, tail_at + (pos - inline_from))?;
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    /// A symlink's target.
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>, ReadError> {
        let target = self.read_flat(inode, 0, inode.size as usize)?;
        if target.contains(&0) {
            return Err(ReadError::BadInode {
                nid: inode.nid,
                detail: "symlink target contains NUL".into(),
            });
        }
        Ok(target)
    }

    /// Number of directory blocks.
    pub fn dir_block_count(&self, dir: &Inode) -> u64 {
        dir.size.div_ceil(self.bs)
    }

    /// Entries of directory block `block`, in on-disk (sorted) order.
    pub fn dir_block(&self, dir: &Inode, block: u64) -> Result<Vec<DirEntry>, ReadError> {
        let bad = |detail: String| ReadError::BadDir {
            nid: dir.nid,
            block,
            detail,
        };
        if !dir.is_dir() {
            return Err(ReadError::BadInode {
                nid: dir.nid,
                detail: "not a directory".into(),
            });
        }
        let start = block * self.bs;
        if start >= dir.size {
            return Err(bad("block past the end of the directory".into()));
        }
        let len = (dir.size - start).min(self.bs) as usize;
        let raw = self.read_flat(dir, start, len)?;
        if len < DIRENT_SIZE {
            return Err(bad(format!("{len} bytes cannot hold a dirent")));
        }
        let first_nameoff = usize::from(Fields(&raw).u16(8));
        if first_nameoff < DIRENT_SIZE || first_nameoff % DIRENT_SIZE != 0 || first_nameoff >= len {
            return Err(bad(format!("first name offset {first_nameoff}")));
        }
        let count = first_nameoff / DIRENT_SIZE;
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let f = Fields(&raw[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE]);
            let nameoff = usize::from(f.u16(8));
            let name_end = if i + 1 < count {
                usize::from(Fields(&raw[(i + 1) * DIRENT_SIZE..]).u16(8))
            } else {
                raw[nameoff.min(len)..]
                    .iter()
                    .position(|&b| b == 0)
                    .map_or(len, |p| nameoff + p)
            };
            if nameoff < first_nameoff || name_end <= nameoff || name_end > len {
                return Err(bad(format!(
                    "entry {i} has name bounds {nameoff}..{name_end}"
                )));
            }
            let name = &raw[nameoff..name_end];
            if name.len() > ondisk::NAME_LEN || name.iter().any(|&b| b == b'/' || b == 0) {
                return Err(bad(format!(
                    "entry {i} has an invalid name {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            entries.push(DirEntry {
                name: name.to_vec(),
                nid: f.u64(0),
                file_type: f.u8(10),
            });
        }
        Ok(entries)
    }

    /// All entries of a directory, including `.` and `..`.
    pub fn dir_entries(&self, dir: &Inode) -> Result<Vec<DirEntry>, ReadError> {
        let mut all = Vec::new();
        for block in 0..self.dir_block_count(dir) {
            all.extend(self.dir_block(dir, block)?);
        }
        Ok(all)
    }

    /// Looks a name up in a directory by binary search over its blocks.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>, ReadError> {
        let (mut lo, mut hi) = (0u64, self.dir_block_count(dir));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entries = self.dir_block(dir, mid)?;
            let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
                return Ok(None);
            };
            if name < &first.name[..] {
                hi = mid;
            } else if name > &last.name[..] {
                lo = mid + 1;
            } else {
                return Ok(entries
                    .binary_search_by(|e| e.name[..].cmp(name))
                    .ok()
                    .map(|i| entries[i].clone()));
            }
        }
        Ok(None)
    }

    /// Extended attributes (inline and shared), as full names and values.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>, ReadError> {
        let body_len = ondisk::xattr_ibody_size(inode.xattr_icount);
        if body_len == 0 {
            return Ok(Vec::new());
        }
        let bad = |detail: String| ReadError::BadInode {
            nid: inode.nid,
            detail,
        };
        if body_len < ondisk::XATTR_IBODY_HEADER_SIZE {
            return Err(bad("xattr body shorter than its header".into()));
        }
        let at = self.iloc(inode.nid).unwrap_or(0) + inode.inode_size as u64;
        let mut body = vec![0u8; body_len];
        self.read("xattrs", &mut body, at)?;
        let shared = usize::from(body[4]);
        let entries_at = ondisk::XATTR_IBODY_HEADER_SIZE + 4 * shared;
        if entries_at > body_len {
            return Err(bad(format!(
                "{shared} shared xattrs overflow the xattr body"
            )));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let id = Fields(&body[12 + 4 * i..16 + 4 * i]).u32(0);
            let pos = u64::from(self.sb.xattr_blkaddr) * self.bs + u64::from(id) * 4;
            let mut head = [0u8; 4];
            self.read("shared xattr", &mut head, pos)?;
            let (name_len, value_len) = (usize::from(head[0]), usize::from(Fields(&head).u16(2)));
            let mut entry = vec![0u8; 4 + name_len + value_len];
            self.read("shared xattr", &mut entry, pos)?;
            out.push(decode_xattr(&entry, inode.nid)?.0);
        }
        let mut rest = &body[entries_at..];
        while !rest.is_empty() {
            let (pair, used) = decode_xattr(rest, inode.nid)?;
            out.push(pair);
            rest = &rest[used.min(rest.len())..];
        }
        Ok(out)
    }

    /// Chunk index `chunk` of a chunk-based file.
    pub fn chunk_index(&self, inode: &Inode, chunk: u64) -> Result<ChunkIndex, ReadError> {
        let bad = |detail: String| ReadError::BadInode {
            nid: inode.nid,
            detail,
        };
        if inode.layout != DataLayout::ChunkBased {
            return Err(bad("not chunk-based".into()));
        }
        if chunk >= inode.chunk_count(self.sb.blkszbits) {
            return Err(bad(format!("chunk {chunk} past the end of the file")));
        }
        let format = inode.i_u as u16;
        if format & CHUNK_FORMAT_INDEXES == 0 {
            let at = align_up(self.meta_end(inode), 4) + chunk * 4;
            let mut raw = [0u8; 4];
            self.read("block map", &mut raw, at)?;
            return Ok(ChunkIndex {
                device_id: 0,
                blkaddr: u32::from_le_bytes(raw),
            });
        }
        let at = align_up(self.meta_end(inode), CHUNK_INDEX_SIZE as u64)
            + chunk * CHUNK_INDEX_SIZE as u64;
        let mut raw = [0u8; CHUNK_INDEX_SIZE];
        self.read("chunk index", &mut raw, at)?;
        let idx = ChunkIndex::decode(&raw);
        if !idx.is_hole() && usize::from(idx.device_id) > self.devices.len() {
            return Err(bad(format!(
                "chunk {chunk} refers to missing device {}",
                idx.device_id
            )));
        }
        Ok(idx)
    }

    /// Visits every entry below the root depth-first, with its path, after
    /// checking the tree's shape: `.` and `..` are right, names are sorted
    /// and unique, entry types match inodes, and no directory is reached
    /// twice. `visit` gets the parent path, the entry and its inode.
    pub fn walk(&self, visit: &mut WalkVisitor<'_>) -> Result<(), ReadError> {
        let root = self.inode(self.root_nid())?;
        if !root.is_dir() {
            return Err(ReadError::BadTree {
                path: "/".into(),
                detail: "root is not a directory".into(),
            });
        }
        let mut seen_dirs = HashSet::from([root.nid]);
        // Each directory block belongs to one directory in a sound image, so
        // all directories together are smaller than the image. Directories
        // sharing blocks could make a walk quadratic in the image size.
        let mut dir_bytes = 0u64;
        let mut stack = vec![(b"/".to_vec(), root.clone(), root.nid)];
        while let Some((path, dir, parent)) = stack.pop() {
            dir_bytes = dir_bytes.saturating_add(dir.size);
            if dir_bytes > self.size {
                return Err(ReadError::BadTree {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    detail: format!(
                        "directories hold more bytes ({dir_bytes}) than the image ({}): blocks are shared",
                        self.size
                    ),
                });
            }
            let entries = self.dir_entries(&dir)?;
            let tree_err = |detail: String| ReadError::BadTree {
                path: String::from_utf8_lossy(&path).into_owned(),
                detail,
            };
            if entries.windows(2).any(|w| w[0].name >= w[1].name) {
                return Err(tree_err(
                    "directory entries are not sorted and unique".into(),
                ));
            }
            let dot = entries.iter().find(|e| e.name == b".").map(|e| e.nid);
            let dotdot = entries.iter().find(|e| e.name == b"..").map(|e| e.nid);
            if dot != Some(dir.nid) || dotdot != Some(parent) {
                return Err(tree_err(format!(
                    "'.' is {dot:?} and '..' is {dotdot:?}, expected {} and {parent}",
                    dir.nid
                )));
            }
            for e in entries
                .iter()
                .rev()
                .filter(|e| e.name != b"." && e.name != b"..")
            {
                let inode = self.inode(e.nid)?;
                if e.file_type != ondisk::mode::file_type(inode.mode) {
                    return Err(tree_err(format!(
                        "entry {:?} has type {} but its inode has mode {:o}",
                        String::from_utf8_lossy(&e.name),
                        e.file_type,
                        inode.mode
                    )));
                }
                visit(&path, e, &inode)?;
                if inode.is_dir() {
                    if !seen_dirs.insert(inode.nid) {
                        return Err(tree_err(format!(
                            "directory inode {} is reached twice",
                            inode.nid
                        )));
                    }
                    let mut child = path.clone();
                    if child.len() > 1 {
                        child.push(b'/');
                    }
                    child.extend_from_slice(&e.name);
                    stack.push((child, inode, dir.nid));
                }
            }
        }
        Ok(())
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Decodes one xattr entry; returns the pair and the aligned size used.
fn decode_xattr(raw: &[u8], nid: u64) -> Result<(Xattr, usize), ReadError> {
    let bad = |detail: String| ReadError::BadInode { nid, detail };
    if raw.len() < ondisk::XATTR_ENTRY_SIZE {
        return Err(bad("truncated xattr entry".into()));
    }
    let f = Fields(raw);
    let (name_len, index, value_len) = (usize::from(f.u8(0)), f.u8(1), usize::from(f.u16(2)));
    let end = ondisk::XATTR_ENTRY_SIZE + name_len + value_len;
    if end > raw.len() {
        return Err(bad(format!(
            "xattr entry of {end} bytes overflows the xattr body"
        )));
    }
    let suffix = &raw[4..4 + name_len];
    let name = ondisk::xattr_join(index, suffix)
        .ok_or_else(|| bad(format!("unsupported xattr name index {index}")))?;
    let value = raw[4 + name_len..end].to_vec();
    Ok(((name, value), align_up(end as u64, 4) as usize))
}

fn read_at<R: ReadAt>(
    r: &R,
    size: u64,
    what: &'static str,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ReadError> {
    let in_bounds = offset
        .checked_add(buf.len() as u64)
        .is_some_and(|end| end <= size);
    if !in_bounds {
        return Err(ReadError::OutOfBounds { what, offset, size });
    }
    r.read_exact_at(buf, offset)
        .map_err(|source| ReadError::Io {
            offset,
            len: buf.len(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erofs::writer::{ImageOptions, write_image};
    use crate::tree::{Meta, Node, NodeKind, Tree};

    /// Found by fuzzing the bootstrap reader: a compact inode's mtime is
    /// the superblock build time plus a 32-bit offset, and a build time
    /// near `u64::MAX` made that addition overflow (a panic).
    #[test]
    fn compact_mtime_overflow_is_an_error() {
        let tree = Tree {
            nodes: vec![Node {
                meta: Meta {
                    perm: 0o755,
                    ..Meta::default()
                },
                kind: NodeKind::Dir(vec![]),
            }],
        };
        let opts = ImageOptions {
            chunk_bits: 20,
            build_time: u64::MAX,
            devices: vec![],
            extra: vec![],
        };
        let mut bytes = write_image(&tree, &opts).unwrap().bytes;
        let root = Erofs::open(&bytes[..]).unwrap().root_nid();
        // Turn on per-inode mtimes and make the root a compact inode whose
        // mtime offset is 1.
        bytes[SUPER_OFFSET + 8] |= ondisk::FEATURE_COMPAT_MTIME as u8;
        let at = (root << ISLOT_BITS) as usize;
        bytes[at] &= !1;
        bytes[at + 12..at + 16].copy_from_slice(&1u32.to_le_bytes());
        let result = Erofs::open(&bytes[..]);
        assert!(
            matches!(result, Err(ReadError::BadInode { nid, ref detail }) if nid == root && detail.contains("mtime")),
            "{result:?}"
        );
    }
}
