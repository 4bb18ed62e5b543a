//! The FUSE filesystem.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use darter_cache::ChunkStore;
use darter_format::erofs::ondisk::{file_type, mode};
use darter_format::erofs::{DirEntry, Inode};
use darter_image::BlobSource;

use crate::takeover::{AbiSlot, KernelAbi};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

/// Kernel caching and request sizing.
#[derive(Debug, Clone, Copy)]
pub struct FsOptions {
    /// How long the kernel may cache entries and attributes. The image is
    /// immutable, so this can be as long as one likes.
    pub ttl: Duration,
    /// Largest readahead the kernel may ask for.
    pub max_readahead: u32,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            ttl: Duration::from_secs(24 * 3600),
            max_readahead: 1 << 20,
        }
    }
}

/// Serves one image.
pub struct DarterFs<S> {
    store: Arc<ChunkStore<S>>,
    root_nid: u64,
    opts: FsOptions,
    /// nid -> (parent nid, name), learnt from lookups, to name files in logs.
    names: Mutex<HashMap<u64, (u64, Vec<u8>)>>,
    /// What the kernel offered at FUSE_INIT, for a daemon taking over.
    abi: AbiSlot,
}

impl<S> std::fmt::Debug for DarterFs<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DarterFs")
            .field("root_nid", &self.root_nid)
            .finish_non_exhaustive()
    }
}

/// Block size reported by stat.
const BLKSIZE: u32 = 4096;

impl<S: BlobSource + 'static> DarterFs<S> {
    /// A filesystem over `store`'s image.
    pub fn new(store: Arc<ChunkStore<S>>, opts: FsOptions) -> Self {
        let root_nid = store.image().bootstrap().erofs().root_nid();
        DarterFs {
            store,
            root_nid,
            opts,
            names: Mutex::new(HashMap::new()),
            abi: AbiSlot::default(),
        }
    }

    /// Where [`Filesystem::init`] records what the kernel offered.
    pub fn abi_slot(&self) -> AbiSlot {
        self.abi.clone()
    }

    fn nid(&self, ino: INodeNo) -> u64 {
        if ino.0 == 1 { self.root_nid } else { ino.0 - 2 }
    }

    fn ino(&self, nid: u64) -> INodeNo {
        INodeNo(if nid == self.root_nid { 1 } else { nid + 2 })
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode, Errno> {
        self.store
            .image()
            .bootstrap()
            .erofs()
            .inode(self.nid(ino))
            .map_err(|e| {
                tracing::error!(ino = ino.0, error = %e, "bad inode");
                Errno::EIO
            })
    }

    fn attr(&self, inode: &Inode) -> FileAttr {
        let t = UNIX_EPOCH + Duration::new(inode.mtime, inode.mtime_nsec.min(999_999_999));
        let kind = kind_of(inode.mode);
        let rdev = match kind {
            FileType::CharDevice | FileType::BlockDevice => {
                let (major, minor) = inode.rdev();
                // The kernel's new_encode_dev layout, which FUSE passes through.
                (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
            }
            _ => 0,
        };
        FileAttr {
            ino: self.ino(inode.nid),
            size: inode.size,
            blocks: inode.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm: inode.mode & 0o7777,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    /// Attributes of a negative entry: only the node number (0) matters.
    fn negative_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(0),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    /// The path of `nid` as far as lookups have revealed it, for logs.
    fn path_of(&self, nid: u64) -> String {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts = Vec::new();
        let mut cur = nid;
        while cur != self.root_nid && parts.len() < 4096 {
            let Some((parent, name)) = names.get(&cur) else {
                parts.push(format!("<inode {cur}>"));
                break;
            };
            parts.push(String::from_utf8_lossy(name).into_owned());
            cur = *parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn dir_entry(&self, e: &DirEntry) -> (INodeNo, FileType) {
        (self.ino(e.nid), entry_kind(e.file_type))
    }
}

fn kind_of(m: u16) -> FileType {
    match m & mode::S_IFMT {
        mode::S_IFDIR => FileType::Directory,
        mode::S_IFLNK => FileType::Symlink,
        mode::S_IFCHR => FileType::CharDevice,
        mode::S_IFBLK => FileType::BlockDevice,
        mode::S_IFIFO => FileType::NamedPipe,
        mode::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn entry_kind(t: u8) -> FileType {
    match t {
        file_type::DIR => FileType::Directory,
        file_type::SYMLINK => FileType::Symlink,
        file_type::CHRDEV => FileType::CharDevice,
        file_type::BLKDEV => FileType::BlockDevice,
        file_type::FIFO => FileType::NamedPipe,
        file_type::SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// Encodes a directory position: the block and the next entry in it.
fn dir_offset(block: u64, next: usize) -> u64 {
    (block << 32) | next as u64
}

impl<S: BlobSource + 'static> Filesystem for DarterFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = self.abi.set(KernelAbi::of(config));
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        // Capabilities the kernel lacks are simply not used.
        let _ = config.add_capabilities(wanted);
        let _ = config.set_max_readahead(self.opts.max_readahead);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.inode(parent).and_then(|dir| {
            let erofs = self.store.image().bootstrap().erofs();
            let entry = erofs.lookup(&dir, name.as_bytes()).map_err(|e| {
                tracing::error!(dir = %self.path_of(dir.nid), error = %e, "lookup failed");
                Errno::EIO
            })?;
            let entry = entry.ok_or(Errno::ENOENT)?;
            let inode = erofs.inode(entry.nid).map_err(|_| Errno::EIO)?;
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(entry.nid)
                .or_insert((dir.nid, entry.name));
            Ok(inode)
        });
        match result {
            Ok(inode) => reply.entry(&self.opts.ttl, &self.attr(&inode), Generation(0)),
            // A negative entry (node 0) with a lifetime: the kernel caches
            // that the name does not exist, so the many failing lookups of a
            // program searching paths (python's imports) are asked once.
            Err(e) if e == Errno::ENOENT => {
                reply.entry(&self.opts.ttl, &self.negative_attr(), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino) {
            Ok(inode) => reply.attr(&self.opts.ttl, &self.attr(&inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self.inode(ino).and_then(|i| {
            if i.mode & mode::S_IFMT != mode::S_IFLNK {
                return Err(Errno::EINVAL);
            }
            self.store
                .image()
                .bootstrap()
                .erofs()
                .symlink_target(&i)
                .map_err(|_| Errno::EIO)
        });
        match target {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    /// ENOSYS makes the kernel stop sending OPEN and RELEASE altogether
    /// and open files with `FOPEN_KEEP_CACHE`: no round trip per open.
    /// Write opens never get here: the mount is read-only.
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
        let result = self.inode(ino).and_then(|inode| {
            if inode.mode & mode::S_IFMT != mode::S_IFREG {
                return Err(Errno::EISDIR);
            }
            let path = || self.path_of(inode.nid);
            self.store
                .read_file(&inode, offset, u64::from(size), &path)
                .map_err(|_| Errno::EIO)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    /// ENOSYS makes the kernel stop sending FLUSH on every close: there
    /// is nothing to flush in a read-only image.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// As for [`Self::open`]: no OPENDIR/RELEASEDIR round trips, and
    /// directories opened with `FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`, so a
    /// directory's entries are read from us once.
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
        let result = self.each_entry(ino, offset, &mut |e, next| {
            let (child, kind) = self.dir_entry(e);
            Ok(reply.add(child, next, kind, OsStr::from_bytes(&e.name)))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let erofs = self.store.image().bootstrap().erofs();
        let result = self.each_entry(ino, offset, &mut |e, next| {
            let inode = erofs.inode(e.nid).map_err(|_| Errno::EIO)?;
            let attr = self.attr(&inode);
            Ok(reply.add(
                attr.ino,
                next,
                OsStr::from_bytes(&e.name),
                &self.opts.ttl,
                &attr,
                Generation(0),
            ))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let sb = self.store.image().bootstrap().erofs().superblock();
        let data_blocks: u64 = self
            .store
            .image()
            .blobs()
            .iter()
            .map(|b| b.trailer.uncompressed_size / u64::from(BLKSIZE))
            .sum();
        reply.statfs(
            u64::from(sb.blocks) + data_blocks,
            0,
            0,
            sb.inos,
            0,
            BLKSIZE,
            255,
            BLKSIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self.xattrs(ino).and_then(|xs| {
            xs.into_iter()
                .find(|(k, _)| k[..] == *name.as_bytes())
                .map(|(_, v)| v)
                .ok_or(Errno::NO_XATTR)
        });
        match value {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino) {
            Ok(xs) => {
                let list: Vec<u8> = xs
                    .into_iter()
                    .flat_map(|(k, _)| k.into_iter().chain([0]))
                    .collect();
                reply_xattr(reply, &list, size);
            }
            Err(e) => reply.error(e),
        }
    }
}

fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// Called for each directory entry with the offset of the next one;
/// returns true when the reply buffer is full.
type EntrySink<'a> = dyn FnMut(&DirEntry, u64) -> Result<bool, Errno> + 'a;

impl<S: BlobSource + 'static> DarterFs<S> {
    fn xattrs(&self, ino: INodeNo) -> Result<Vec<darter_format::tree::Xattr>, Errno> {
        let inode = self.inode(ino)?;
        self.store
            .image()
            .bootstrap()
            .erofs()
            .xattrs(&inode)
            .map_err(|e| {
                tracing::error!(file = %self.path_of(inode.nid), error = %e, "bad xattrs");
                Errno::EIO
            })
    }

    /// Walks a directory's entries from `offset` (see [`dir_offset`]).
    fn each_entry(&self, ino: INodeNo, offset: u64, sink: &mut EntrySink<'_>) -> Result<(), Errno> {
        let dir = self.inode(ino)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let erofs = self.store.image().bootstrap().erofs();
        let (mut block, mut skip) = (offset >> 32, (offset & 0xffff_ffff) as usize);
        while block < erofs.dir_block_count(&dir) {
            let entries = erofs.dir_block(&dir, block).map_err(|e| {
                tracing::error!(dir = %self.path_of(dir.nid), error = %e, "bad directory block");
                Errno::EIO
            })?;
            for (i, e) in entries.iter().enumerate().skip(skip) {
                if sink(e, dir_offset(block, i + 1))? {
                    return Ok(());
                }
            }
            block += 1;
            skip = 0;
        }
        Ok(())
    }
}
