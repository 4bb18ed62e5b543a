//! The devices filesystem: what the kernel's EROFS driver reads when it
//! mounts a Darter image itself.
//!
//! One directory with the verified bootstrap (`bootstrap`) and, per blob,
//! its uncompressed address space (`blob-N`, N = EROFS device id,
//! `docs/format.md` section 2.1). The kernel mounts `bootstrap` as a
//! file-backed EROFS image with each `blob-N` as a device; every lookup,
//! stat, open and cached read of the image is then native EROFS, and only
//! page-cache misses of file data come here, as reads of an address space.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use darter_cache::ChunkStore;
use darter_format::erofs::ondisk::mode::{S_IFMT, S_IFREG};
use darter_image::BlobSource;

use crate::takeover::{AbiSlot, KernelAbi};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request,
};

/// The name of the bootstrap file.
pub const BOOTSTRAP_FILE: &str = "bootstrap";

/// The name of the file holding EROFS device `device` (1-based).
pub fn device_file(device: usize) -> String {
    format!("blob-{device}")
}

const ROOT: u64 = 1;
const BOOTSTRAP_INO: u64 = 2;
/// Device `n` is inode `n + BOOTSTRAP_INO`.
const FIRST_DEVICE_INO: u64 = 3;

/// What an inode of the devices filesystem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Root,
    Bootstrap,
    /// Blob index (device id - 1).
    Blob(usize),
}

/// Serves one image's bootstrap and address spaces.
pub struct DevicesFs<S> {
    store: Arc<ChunkStore<S>>,
    ttl: Duration,
    /// What the kernel offered at FUSE_INIT, for a daemon taking over.
    abi: AbiSlot,
}

impl<S> std::fmt::Debug for DevicesFs<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicesFs").finish_non_exhaustive()
    }
}

impl<S: BlobSource + 'static> DevicesFs<S> {
    /// The devices of `store`'s image. The files never change, so the
    /// kernel may cache everything for as long as it likes.
    pub fn new(store: Arc<ChunkStore<S>>) -> Self {
        DevicesFs {
            store,
            ttl: Duration::from_secs(24 * 3600),
            abi: AbiSlot::default(),
        }
    }

    /// Where [`Filesystem::init`] records what the kernel offered.
    pub fn abi_slot(&self) -> AbiSlot {
        self.abi.clone()
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        match ino.0 {
            ROOT => Ok(Node::Root),
            BOOTSTRAP_INO => Ok(Node::Bootstrap),
            n => {
                let blob = usize::try_from(n - FIRST_DEVICE_INO).map_err(|_| Errno::ENOENT)?;
                if blob < self.store.image().blobs().len() {
                    Ok(Node::Blob(blob))
                } else {
                    Err(Errno::ENOENT)
                }
            }
        }
    }

    fn ino(node: Node) -> INodeNo {
        INodeNo(match node {
            Node::Root => ROOT,
            Node::Bootstrap => BOOTSTRAP_INO,
            Node::Blob(blob) => FIRST_DEVICE_INO + blob as u64,
        })
    }

    fn bootstrap(&self) -> &[u8] {
        self.store.image().bootstrap().erofs().reader()
    }

    /// Every entry of the root directory, in order.
    fn entries(&self) -> Vec<(Node, String)> {
        let blobs = self.store.image().blobs().len();
        std::iter::once((Node::Bootstrap, BOOTSTRAP_FILE.to_owned()))
            .chain((0..blobs).map(|b| (Node::Blob(b), device_file(b + 1))))
            .collect()
    }

    fn attr(&self, node: Node) -> FileAttr {
        let (kind, perm, size) = match node {
            Node::Root => (FileType::Directory, 0o500, 0),
            Node::Bootstrap => (FileType::RegularFile, 0o400, self.bootstrap().len() as u64),
            Node::Blob(b) => (
                FileType::RegularFile,
                0o400,
                self.store.image().blobs()[b].trailer.uncompressed_size,
            ),
        };
        FileAttr {
            ino: Self::ino(node),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if node == Node::Root { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// Files [`DevicesFs::files_using`] names at most.
const FILES_NAMED: usize = 4;

impl<S: BlobSource + 'static> DevicesFs<S> {
    /// The files whose data lies in `range` of blob `blob`'s address space,
    /// for the log line of a failed read (the kernel asked for device
    /// bytes, not for a file). Walks the whole tree: only failures pay.
    fn files_using(&self, blob: usize, range: std::ops::Range<u64>) -> String {
        let erofs = self.store.image().bootstrap().erofs();
        let chunk_size = self.store.image().bootstrap().chunk_size();
        let device = u16::try_from(blob + 1).unwrap_or(u16::MAX);
        let mut named = Vec::new();
        let _ = erofs.walk(&mut |parent, entry, inode| {
            if named.len() >= FILES_NAMED || inode.mode & S_IFMT != S_IFREG {
                return Ok(());
            }
            for n in 0..inode.size.div_ceil(chunk_size) {
                let idx = erofs.chunk_index(inode, n)?;
                let start = u64::from(idx.blkaddr) << 12;
                let len = (inode.size - n * chunk_size).min(chunk_size);
                if !idx.is_hole()
                    && idx.device_id == device
                    && start < range.end
                    && start + len > range.start
                {
                    let mut path = parent.to_vec();
                    if !path.ends_with(b"/") {
                        path.push(b'/');
                    }
                    path.extend_from_slice(&entry.name);
                    named.push(String::from_utf8_lossy(&path).into_owned());
                    break;
                }
            }
            Ok(())
        });
        if named.is_empty() {
            format!(
                "bytes {}..{} of device {}",
                range.start,
                range.end,
                blob + 1
            )
        } else {
            named.join(", ")
        }
    }
}

impl<S: BlobSource + 'static> Filesystem for DevicesFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = self.abi.set(KernelAbi::of(config));
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        // Capabilities the kernel lacks are simply not used.
        let _ = config.add_capabilities(wanted);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self
            .entries()
            .into_iter()
            .find(|(_, n)| OsStr::new(n) == name)
        {
            Some((node, _)) => reply.entry(&self.ttl, &self.attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&self.ttl, &self.attr(node)),
            Err(e) => reply.error(e),
        }
    }

    /// No OPEN/RELEASE round trips, and pages kept (`FOPEN_KEEP_CACHE`).
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino) {
            Ok(Node::Bootstrap) => {
                let bytes = self.bootstrap();
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                reply.data(&bytes[start..end]);
            }
            Ok(Node::Blob(blob)) => {
                let end = offset.saturating_add(u64::from(size));
                let files = || self.files_using(blob, offset..end);
                match self
                    .store
                    .read_address_space(blob, offset, u64::from(size), &files)
                {
                    Ok(data) => reply.data(&data),
                    Err(_) => reply.error(Errno::EIO),
                }
            }
            Ok(Node::Root) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (node, name)) in self.entries().into_iter().enumerate().skip(skip) {
            if reply.add(Self::ino(node), (i + 1) as u64, FileType::RegularFile, name) {
                break;
            }
        }
        reply.ok();
    }
}
