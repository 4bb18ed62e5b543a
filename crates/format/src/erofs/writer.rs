//! Serializes a [`Tree`] into an EROFS image.
//!
//! Layout: the superblock at 1024, the device table right after it, then
//! every inode (extended form) in breadth-first order with its inline
//! xattrs and either chunk indexes or an inline data tail, then the blocks
//! of directories and long symlinks that do not fit inline, then the
//! caller's extra bytes (Darter's extension), each region block aligned.

use super::ondisk::{
    self, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, ChunkIndex, DEVICE_SLOT_SIZE, DIRENT_SIZE,
    DataLayout, DeviceSlot, INODE_EXTENDED_SIZE, ISLOT_BITS, SUPER_OFFSET, SUPERBLOCK_SIZE,
    SuperBlock,
};
use crate::blob::{BLOCK_BITS, BLOCK_SIZE, align_up};
use crate::le::FieldsMut;
use crate::tree::{NodeId, NodeKind, Tree, is_valid_name};

const BS: usize = BLOCK_SIZE as usize;

/// Why a tree cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    /// The root is missing or not a directory.
    #[error("the root node must be a directory")]
    BadRoot,
    /// A directory entry name is not allowed.
    #[error("invalid file name {name:?} in {dir}")]
    InvalidName {
        /// Directory path.
        dir: String,
        /// The name, lossily decoded.
        name: String,
    },
    /// Two entries of one directory have the same name.
    #[error("duplicate name {name:?} in {dir}")]
    DuplicateName {
        /// Directory path.
        dir: String,
        /// The name.
        name: String,
    },
    /// A directory is reachable by more than one entry.
    #[error("directory {path} is linked more than once")]
    DirectoryHardlink {
        /// One of its paths.
        path: String,
    },
    /// An entry points at a node that does not exist.
    #[error("entry {path} points at missing node {node}")]
    MissingNode {
        /// Entry path.
        path: String,
        /// The node id.
        node: NodeId,
    },
    /// A node cannot be represented.
    #[error("{path}: {detail}")]
    Unrepresentable {
        /// Node path.
        path: String,
        /// What does not fit.
        detail: String,
    },
    /// The whole image would exceed EROFS limits.
    #[error("image too large: {0}")]
    TooLarge(String),
}

/// Everything besides the tree that goes into the image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// log2 of the chunk size of regular files.
    pub chunk_bits: u8,
    /// Superblock build time.
    pub build_time: u64,
    /// Extra devices, in device-id order (id 1 first).
    pub devices: Vec<DeviceSlot>,
    /// Bytes stored after the filesystem, block aligned, invisible to EROFS.
    pub extra: Vec<u8>,
}

/// A written image.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    /// The image; bytes `0..1024` are zero, free for a header.
    pub bytes: Vec<u8>,
    /// Where [`ImageOptions::extra`] starts.
    pub extra_offset: u64,
    /// Number of inodes written.
    pub inodes: u64,
}

/// Data of an inode that lives in the bootstrap (directories, symlinks).
#[derive(Debug)]
struct FlatData {
    size: u64,
    inline: bool,
    blkaddr: u32,
}

#[derive(Debug)]
enum Data {
    Nothing,
    Chunks(usize),
    Flat(FlatData),
}

#[derive(Debug)]
struct Slot {
    node: NodeId,
    parent: NodeId,
    xattrs: Vec<u8>,
    data: Data,
    pos: u64,
}

/// Writes `tree` as an EROFS image.
pub fn write_image(tree: &Tree, opts: &ImageOptions) -> Result<WrittenImage, WriteError> {
    let walk = Walk::new(tree)?;
    let mut slots = walk.plan(tree, opts)?;
    let meta_start = align_up(
        (SUPER_OFFSET + SUPERBLOCK_SIZE + DEVICE_SLOT_SIZE * opts.devices.len()) as u64,
        1 << ISLOT_BITS,
    );
    let meta_end = place_inodes(&mut slots, meta_start);
    let data_end = place_flat_blocks(&mut slots, align_up(meta_end, BS as u64))?;
    let extra_offset = align_up(data_end, BS as u64);
    let total = align_up(extra_offset + opts.extra.len() as u64, BS as u64);
    let blocks = u32::try_from(total >> BLOCK_BITS)
        .map_err(|_| WriteError::TooLarge(format!("{total} bytes of metadata")))?;

    let mut nids = vec![0u64; tree.nodes.len()];
    for s in &slots {
        nids[s.node as usize] = s.pos >> ISLOT_BITS;
    }
    let root_nid = u16::try_from(nids[0]).map_err(|_| WriteError::TooLarge("root nid".into()))?;
    let mut out = vec![0u8; total as usize];
    let sb = SuperBlock {
        blkszbits: BLOCK_BITS,
        root_nid,
        inos: slots.len() as u64,
        build_time: opts.build_time,
        blocks,
        volume_name: *b"darter\0\0\0\0\0\0\0\0\0\0",
        feature_incompat: ondisk::FEATURE_INCOMPAT_CHUNKED_FILE
            | if opts.devices.is_empty() {
                0
            } else {
                ondisk::FEATURE_INCOMPAT_DEVICE_TABLE
            },
        extra_devices: u16::try_from(opts.devices.len())
            .map_err(|_| WriteError::TooLarge("more than 65535 devices".into()))?,
        devt_slotoff: ((SUPER_OFFSET + SUPERBLOCK_SIZE) / DEVICE_SLOT_SIZE) as u16,
        ..SuperBlock::default()
    };
    out[SUPER_OFFSET..SUPER_OFFSET + SUPERBLOCK_SIZE].copy_from_slice(&sb.encode());
    for (i, dev) in opts.devices.iter().enumerate() {
        let at = SUPER_OFFSET + SUPERBLOCK_SIZE + i * DEVICE_SLOT_SIZE;
        out[at..at + DEVICE_SLOT_SIZE].copy_from_slice(&dev.encode());
    }
    for (ino, slot) in slots.iter().enumerate() {
        let ctx = InodeContext {
            tree,
            nids: &nids,
            nlink: walk.nlink[slot.node as usize],
            ino: ino as u32 + 1,
            chunk_bits: opts.chunk_bits,
        };
        ctx.write(slot, &mut out);
    }
    let at = extra_offset as usize;
    out[at..at + opts.extra.len()].copy_from_slice(&opts.extra);
    Ok(WrittenImage {
        bytes: out,
        extra_offset,
        inodes: slots.len() as u64,
    })
}

/// Breadth-first traversal: validates the tree and fixes the inode order.
struct Walk {
    /// (node, parent directory) in inode order.
    order: Vec<(NodeId, NodeId)>,
    /// Link count of every node.
    nlink: Vec<u32>,
    /// For error messages: the first (parent, name) that reached a node.
    reached_by: Vec<Option<(NodeId, Vec<u8>)>>,
}

impl Walk {
    fn new(tree: &Tree) -> Result<Self, WriteError> {
        if !matches!(tree.nodes.first().map(|n| &n.kind), Some(NodeKind::Dir(_))) {
            return Err(WriteError::BadRoot);
        }
        let n = tree.nodes.len();
        let mut walk = Walk {
            order: vec![(0, 0)],
            nlink: vec![0; n],
            reached_by: vec![None; n],
        };
        let mut next = 0;
        while next < walk.order.len() {
            let (dir, _) = walk.order[next];
            next += 1;
            let NodeKind::Dir(entries) = &tree.nodes[dir as usize].kind else {
                continue;
            };
            walk.nlink[dir as usize] += 2;
            let mut sorted: Vec<_> = entries.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            for (i, e) in sorted.iter().enumerate() {
                walk.visit_entry(tree, dir, e, sorted.get(i + 1).map(|n| &n.name[..]))?;
            }
        }
        Ok(walk)
    }

    fn visit_entry(
        &mut self,
        tree: &Tree,
        dir: NodeId,
        e: &crate::tree::Entry,
        next_name: Option<&[u8]>,
    ) -> Result<(), WriteError> {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if !is_valid_name(&e.name) {
            return Err(WriteError::InvalidName {
                dir: self.path(dir),
                name: lossy(&e.name),
            });
        }
        if next_name == Some(&e.name[..]) {
            return Err(WriteError::DuplicateName {
                dir: self.path(dir),
                name: lossy(&e.name),
            });
        }
        let child = e.node as usize;
        let Some(node) = tree.nodes.get(child) else {
            return Err(WriteError::MissingNode {
                path: self.child_path(dir, &e.name),
                node: e.node,
            });
        };
        let is_dir = matches!(node.kind, NodeKind::Dir(_));
        let first_visit = self.reached_by[child].is_none() && child != 0;
        if is_dir && !first_visit {
            return Err(WriteError::DirectoryHardlink {
                path: self.child_path(dir, &e.name),
            });
        }
        if is_dir {
            self.nlink[dir as usize] += 1;
        } else {
            self.nlink[child] += 1;
        }
        if first_visit {
            self.reached_by[child] = Some((dir, e.name.clone()));
            self.order.push((e.node, dir));
        }
        Ok(())
    }

    fn path(&self, node: NodeId) -> String {
        let mut parts = Vec::new();
        let mut cur = node as usize;
        while let Some((parent, name)) = &self.reached_by[cur] {
            parts.push(String::from_utf8_lossy(name).into_owned());
            cur = *parent as usize;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn child_path(&self, dir: NodeId, name: &[u8]) -> String {
        let base = self.path(dir);
        let sep = if base.ends_with('/') { "" } else { "/" };
        format!("{base}{sep}{}", String::from_utf8_lossy(name))
    }

    fn plan(&self, tree: &Tree, opts: &ImageOptions) -> Result<Vec<Slot>, WriteError> {
        let chunk_size = 1u64 << opts.chunk_bits;
        self.order
            .iter()
            .map(|&(node_id, parent)| {
                let node = &tree.nodes[node_id as usize];
                let fail = |detail: String| WriteError::Unrepresentable {
                    path: self.path(node_id),
                    detail,
                };
                let xattrs = encode_xattrs(&node.meta.xattrs).map_err(fail)?;
                let data = match &node.kind {
                    NodeKind::Dir(entries) => Data::Flat(FlatData {
                        size: dir_size(entries.iter().map(|e| &e.name[..])),
                        inline: false,
                        blkaddr: 0,
                    }),
                    NodeKind::Symlink(target) => {
                        if target.is_empty() || target.len() >= BS || target.contains(&0) {
                            return Err(fail(format!("symlink target of {} bytes", target.len())));
                        }
                        Data::Flat(FlatData {
                            size: target.len() as u64,
                            inline: false,
                            blkaddr: 0,
                        })
                    }
                    NodeKind::File(f) => {
                        let want = f.size.div_ceil(chunk_size);
                        if f.chunks.len() as u64 != want {
                            return Err(fail(format!(
                                "{} chunk indexes for {} bytes (expected {want})",
                                f.chunks.len(),
                                f.size
                            )));
                        }
                        if f.size == 0 {
                            Data::Nothing
                        } else {
                            Data::Chunks(f.chunks.len())
                        }
                    }
                    NodeKind::CharDev(ma, mi) | NodeKind::BlockDev(ma, mi) => {
                        ondisk::encode_rdev(*ma, *mi)
                            .ok_or_else(|| fail(format!("device number {ma}:{mi} does not fit")))?;
                        Data::Nothing
                    }
                    NodeKind::Fifo | NodeKind::Socket => Data::Nothing,
                };
                Ok(Slot {
                    node: node_id,
                    parent,
                    xattrs,
                    data,
                    pos: 0,
                })
            })
            .collect()
    }
}

/// Assigns inode positions; returns the end of the inode area.
fn place_inodes(slots: &mut [Slot], start: u64) -> u64 {
    let mut pos = start;
    for slot in slots {
        let base = (INODE_EXTENDED_SIZE + slot.xattrs.len()) as u64;
        let len = match &mut slot.data {
            Data::Nothing => base,
            Data::Chunks(n) => {
                align_up(base, CHUNK_INDEX_SIZE as u64) + (*n * CHUNK_INDEX_SIZE) as u64
            }
            Data::Flat(flat) => {
                let tail = flat.size % BS as u64;
                flat.inline = tail > 0 && base + tail <= BS as u64;
                if flat.inline {
                    if pos % BS as u64 + base + tail > BS as u64 {
                        pos = align_up(pos, BS as u64);
                    }
                    base + tail
                } else {
                    base
                }
            }
        };
        slot.pos = pos;
        pos = align_up(pos + len, 1 << ISLOT_BITS);
    }
    pos
}

/// Assigns blocks to flat data that is not inline; returns the end.
fn place_flat_blocks(slots: &mut [Slot], start: u64) -> Result<u64, WriteError> {
    let mut cursor = start;
    for slot in slots {
        if let Data::Flat(flat) = &mut slot.data {
            let full = if flat.inline {
                flat.size / BS as u64
            } else {
                flat.size.div_ceil(BS as u64)
            };
            if full > 0 {
                flat.blkaddr = u32::try_from(cursor >> BLOCK_BITS)
                    .map_err(|_| WriteError::TooLarge("metadata exceeds 2^32 blocks".into()))?;
                cursor += full * BS as u64;
            }
        }
    }
    Ok(cursor)
}

struct InodeContext<'a> {
    tree: &'a Tree,
    nids: &'a [u64],
    nlink: u32,
    ino: u32,
    chunk_bits: u8,
}

impl InodeContext<'_> {
    fn write(&self, slot: &Slot, out: &mut [u8]) {
        let node = &self.tree.nodes[slot.node as usize];
        let pos = slot.pos as usize;
        let (layout, size, i_u) = match (&node.kind, &slot.data) {
            (NodeKind::File(f), Data::Chunks(_)) => {
                let format = u16::from(self.chunk_bits - BLOCK_BITS) | CHUNK_FORMAT_INDEXES;
                (DataLayout::ChunkBased, f.size, u32::from(format))
            }
            (NodeKind::CharDev(ma, mi) | NodeKind::BlockDev(ma, mi), _) => (
                DataLayout::FlatPlain,
                0,
                ondisk::encode_rdev(*ma, *mi).unwrap_or(0),
            ),
            (_, Data::Flat(flat)) => {
                let layout = if flat.inline {
                    DataLayout::FlatInline
                } else {
                    DataLayout::FlatPlain
                };
                (layout, flat.size, flat.blkaddr)
            }
            _ => (DataLayout::FlatPlain, 0, 0),
        };
        let header = &mut out[pos..pos + INODE_EXTENDED_SIZE];
        let mut f = FieldsMut(header);
        f.u16(0, 1 | (layout.code() << 1));
        f.u16(2, xattr_icount(slot.xattrs.len()));
        f.u16(4, node.kind.type_bits() | (node.meta.perm & 0o7777));
        f.u64(8, size);
        f.u32(16, i_u);
        f.u32(20, self.ino);
        f.u32(24, node.meta.uid);
        f.u32(28, node.meta.gid);
        f.u64(32, node.meta.mtime);
        f.u32(40, node.meta.mtime_nsec);
        f.u32(44, self.nlink);
        let xattr_at = pos + INODE_EXTENDED_SIZE;
        out[xattr_at..xattr_at + slot.xattrs.len()].copy_from_slice(&slot.xattrs);
        let tail_at = xattr_at + slot.xattrs.len();
        match (&node.kind, &slot.data) {
            (NodeKind::File(file), Data::Chunks(_)) => {
                let at = align_up(tail_at as u64, CHUNK_INDEX_SIZE as u64) as usize;
                for (i, c) in file.chunks.iter().enumerate() {
                    let idx = if c.is_hole() { ChunkIndex::HOLE } else { *c };
                    let p = at + i * CHUNK_INDEX_SIZE;
                    out[p..p + CHUNK_INDEX_SIZE].copy_from_slice(&idx.encode());
                }
            }
            (kind, Data::Flat(flat)) => {
                let content = match kind {
                    NodeKind::Dir(entries) => self.dir_bytes(slot, entries),
                    NodeKind::Symlink(target) => target.clone(),
                    _ => Vec::new(),
                };
                let full = if flat.inline {
                    (flat.size as usize / BS) * BS
                } else {
                    content.len()
                };
                let blk = (flat.blkaddr as usize) << BLOCK_BITS;
                out[blk..blk + full].copy_from_slice(&content[..full]);
                if flat.inline {
                    let tail = &content[full..];
                    out[tail_at..tail_at + tail.len()].copy_from_slice(tail);
                }
            }
            _ => {}
        }
    }

    fn dir_bytes(&self, slot: &Slot, entries: &[crate::tree::Entry]) -> Vec<u8> {
        let dot = (
            b".".to_vec(),
            self.nids[slot.node as usize],
            ondisk::file_type::DIR,
        );
        let dotdot = (
            b"..".to_vec(),
            self.nids[slot.parent as usize],
            ondisk::file_type::DIR,
        );
        let mut all: Vec<(Vec<u8>, u64, u8)> = vec![dot, dotdot];
        all.extend(entries.iter().map(|e| {
            let kind = &self.tree.nodes[e.node as usize].kind;
            (
                e.name.clone(),
                self.nids[e.node as usize],
                ondisk::mode::file_type(kind.type_bits()),
            )
        }));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        encode_dir(&all)
    }
}

fn xattr_icount(ibody_len: usize) -> u16 {
    if ibody_len == 0 {
        0
    } else {
        // encode_xattrs bounds the body so this cannot truncate.
        (1 + (ibody_len - ondisk::XATTR_IBODY_HEADER_SIZE) / 4) as u16
    }
}

/// Encodes inline xattrs (header plus entries), or nothing if there are none.
fn encode_xattrs(xattrs: &[crate::tree::Xattr]) -> Result<Vec<u8>, String> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let (index, suffix) = ondisk::xattr_split(name).ok_or_else(|| {
            format!(
                "xattr {:?} is in a namespace EROFS cannot store",
                String::from_utf8_lossy(name)
            )
        })?;
        if suffix.len() > 255 || value.len() > usize::from(u16::MAX) {
            return Err(format!(
                "xattr {:?} is too long",
                String::from_utf8_lossy(name)
            ));
        }
        entries.push((index, suffix, value));
    }
    entries.sort();
    let mut out = vec![0u8; ondisk::XATTR_IBODY_HEADER_SIZE];
    for (index, suffix, value) in entries {
        out.push(suffix.len() as u8);
        out.push(index);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(align_up(out.len() as u64, 4) as usize, 0);
    }
    let max = ondisk::xattr_ibody_size(u16::MAX);
    if out.len() > max {
        return Err(format!(
            "{} bytes of xattrs exceed the EROFS limit of {max}",
            out.len()
        ));
    }
    Ok(out)
}

/// Splits sorted names into directory blocks: the index ranges per block.
fn dir_blocks<'a>(names: impl Iterator<Item = &'a [u8]>) -> Vec<(usize, usize, usize)> {
    // (first entry, end entry, used bytes)
    let mut blocks = Vec::new();
    let (mut first, mut used) = (0usize, 0usize);
    let mut count = 0usize;
    for (i, name) in names.enumerate() {
        let need = DIRENT_SIZE + name.len();
        if used + need > BS {
            blocks.push((first, i, used));
            first = i;
            used = 0;
        }
        used += need;
        count = i + 1;
    }
    blocks.push((first, count, used));
    blocks
}

/// The byte size of a directory holding `names` plus `.` and `..`.
fn dir_size<'a>(names: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut all: Vec<&[u8]> = vec![b".", b".."];
    all.extend(names);
    all.sort();
    let blocks = dir_blocks(all.into_iter());
    let last = blocks.last().map_or(0, |b| b.2);
    ((blocks.len() - 1) * BS + last) as u64
}

/// Encodes sorted `(name, nid, file_type)` entries as directory blocks.
fn encode_dir(entries: &[(Vec<u8>, u64, u8)]) -> Vec<u8> {
    let blocks = dir_blocks(entries.iter().map(|e| &e.0[..]));
    let mut out = Vec::with_capacity(blocks.len() * BS);
    for (bi, &(first, end, used)) in blocks.iter().enumerate() {
        let base = out.len();
        let n = end - first;
        out.resize(base + if bi + 1 == blocks.len() { used } else { BS }, 0);
        let mut nameoff = n * DIRENT_SIZE;
        for (k, (name, nid, ft)) in entries[first..end].iter().enumerate() {
            let at = base + k * DIRENT_SIZE;
            let mut f = FieldsMut(&mut out[at..at + DIRENT_SIZE]);
            f.u64(0, *nid);
            f.u16(8, nameoff as u16);
            f.u8(10, *ft);
            out[base + nameoff..base + nameoff + name.len()].copy_from_slice(name);
            nameoff += name.len();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_blocks_fill_without_overflow() {
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("name-{i:05}").into_bytes())
            .collect();
        let blocks = dir_blocks(names.iter().map(|n| &n[..]));
        let mut covered = 0;
        for &(first, end, used) in &blocks {
            assert_eq!(first, covered);
            assert!(used <= BS);
            covered = end;
        }
        assert_eq!(covered, names.len());
        // Each block is full: the next entry would not have fitted.
        for w in blocks.windows(2) {
            assert!(w[0].2 + DIRENT_SIZE + names[w[1].0].len() > BS);
        }
    }

    #[test]
    fn xattr_body_is_aligned_and_counted() {
        let body = encode_xattrs(&[(b"user.a".to_vec(), b"xyz".to_vec())]).unwrap();
        assert_eq!(body.len(), 12 + 8);
        assert_eq!(xattr_icount(body.len()), 3);
        assert_eq!(ondisk::xattr_ibody_size(3), body.len());
        assert!(encode_xattrs(&[(b"weird.a".to_vec(), vec![])]).is_err());
    }
}
