//! The on-disk chunk cache, shared by every mount: verified chunks appended
//! to pack files (`packs/*.pack`, docs/format.md section 8), found through
//! an in-memory index of the packs' record headers, so a chunk is stored
//! once whichever image or mount fetched it.
//!
//! Why packs: a file per chunk cost an inode allocation per fetched chunk,
//! which took more CPU in a cold read than the rest of the daemon.
//!
//! Sharing: each process appends to packs of its own (named by time, pid
//! and a counter), holding an exclusive `flock` on the pack while it
//! appends, and indexes what it writes. Packs of other processes are
//! indexed by scanning their headers: all of them at the first lookup,
//! then, when a lookup misses, those that grew or appeared (at most once
//! per [`RESCAN_INTERVAL`]).
//!
//! Crash safety: nothing is fsynced and nothing needs to be. A scan stops
//! at a pack's first record that is not whole or not valid (a writer that
//! dies leaves at most a torn tail, and whoever writes next does so in a
//! new pack), and every read verifies the chunk's digest. A record that
//! fails is marked dead in place (its magic overwritten), so no process
//! serves it again, and the chunk is fetched and appended anew.
//!
//! Garbage collection deletes whole packs, least recently used first (a
//! pack's mtime is its LRU clock), never one being appended to. A reader
//! whose index points into a deleted pack finds it gone and misses.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, IoSlice, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use darter_format::Digest;
use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::pack::{self, DEAD_MAGIC, HEADER_LEN, Header, MAX_DATA_LEN, ScanEnd};

/// A pack's mtime is refreshed on reads at most this often (it is the LRU
/// clock, and touching on every read would cost a syscall per read).
const TOUCH_INTERVAL: Duration = Duration::from_secs(300);
/// Packs of other processes are scanned for new records at most this
/// often (a cold mount misses on nearly every lookup).
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// A writer starts a new pack once its pack is this large.
const PACK_TARGET: u64 = 64 << 20;
/// Records the background writer appends with one system call at most
/// (two buffers each, within the kernel's limit of 1024).
const BATCH_RECORDS: usize = 256;
/// Garbage collection waits this long for an append to a pack it would
/// remove (an append is one write of at most a few MiB).
const APPEND_WAIT: Duration = Duration::from_millis(100);
/// Niceness of the background cache writer thread.
const WRITER_NICENESS: i32 = 10;
/// The directory of pack files.
const PACKS: &str = "packs";
/// A pack file's name ends so.
const PACK_SUFFIX: &str = ".pack";
/// Directories of the previous layout (a file per chunk): never read, and
/// removed by garbage collection.
const LEGACY: [&str; 2] = ["chunks", "tmp"];

/// Packs this process created, for unique names.
static PACKS_CREATED: AtomicU32 = AtomicU32::new(0);

/// Errors of the disk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// Error.
        source: io::Error,
    },
    /// A cached chunk's record did not hold the chunk (it has been dropped).
    #[error("cached chunk {digest} in {path} at offset {offset} is corrupt ({detail}); dropped")]
    Corrupt {
        /// The pack file.
        path: PathBuf,
        /// Where its record starts in the pack.
        offset: u64,
        /// The digest it should have.
        digest: Digest,
        /// What was wrong.
        detail: &'static str,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Bytes in the cache before.
    pub before: u64,
    /// Bytes after.
    pub after: u64,
    /// Chunks removed (records in the packs removed, and files of the
    /// previous one-file-per-chunk layout).
    pub removed: u64,
}

/// A chunk cache directory. Clones share one index and one pack being
/// written.
#[derive(Clone)]
pub struct CacheDir {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CacheDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheDir")
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    /// `root/packs`, opened: packs are opened relative to it.
    packs: OwnedFd,
    index: RwLock<Index>,
    /// Held while scanning; when the last scan finished.
    scanned: Mutex<Option<Instant>>,
    /// Set once the first scan is done.
    loaded: AtomicBool,
    /// The pack this process appends to (None before the first append and
    /// after one fills up or fails).
    writing: Mutex<Option<WritePack>>,
}

/// Which record holds each chunk.
#[derive(Debug, Default)]
struct Index {
    /// Keyed by the first 16 bytes of the chunk digest (half the memory of
    /// the whole digest; a read checks the whole digest in the header).
    slots: HashMap<u128, Slot>,
    /// Every pack seen, by number.
    packs: Vec<PackEntry>,
    by_name: HashMap<String, u32>,
}

/// A record: which pack, where, how long its data.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    pack: u32,
    len: u32,
}

#[derive(Debug)]
struct PackEntry {
    pack: Arc<Pack>,
    /// The end of the last whole record indexed.
    indexed: u64,
    /// The pack's size at its last scan: it is scanned again once larger.
    seen: u64,
    state: PackState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackState {
    /// Another process's pack: scanned when it grows.
    Theirs,
    /// Written by this process, which indexed every record as it wrote it.
    Mine,
    /// Has an invalid record: nothing after it is read.
    Stopped,
    /// Deleted (by garbage collection): its records are out of the index.
    Gone,
}

/// What readers need of a pack, shared outside the index lock.
#[derive(Debug)]
struct Pack {
    name: String,
    /// Unix seconds of the pack's mtime as last set or seen.
    touched: AtomicU64,
}

/// The pack this process appends to.
#[derive(Debug)]
struct WritePack {
    file: File,
    number: u32,
    name: String,
    len: u64,
}

/// A pack file found in the directory.
#[derive(Debug)]
struct PackFile {
    name: String,
    size: u64,
    mtime: SystemTime,
}

/// The default cache location: `/var/cache/darter` for root, else
/// `$XDG_CACHE_HOME/darter` or `~/.cache/darter`.
pub fn default_cache_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/cache/darter");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("darter")
}

fn key(digest: &Digest) -> u128 {
    let mut prefix = [0u8; 16];
    prefix.copy_from_slice(&digest.bytes()[..16]);
    u128::from_le_bytes(prefix)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CacheDir {
    /// Opens (creating) a cache directory. The packs are indexed at the
    /// first lookup (or [`Self::load_index`]).
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        let packs_path = root.join(PACKS);
        fs::create_dir_all(&packs_path).map_err(io_err("create", &packs_path))?;
        let packs = rustix::fs::open(
            &packs_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", &packs_path)(e.into()))?;
        Ok(CacheDir {
            shared: Arc::new(Shared {
                root: root.to_owned(),
                packs,
                index: RwLock::new(Index::default()),
                scanned: Mutex::new(None),
                loaded: AtomicBool::new(false),
                writing: Mutex::new(None),
            }),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    fn pack_path(&self, name: &str) -> PathBuf {
        self.shared.root.join(PACKS).join(name)
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.shared.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.shared.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Indexes the packs now if no lookup has yet (a store calls this on a
    /// background thread, so its first read does not wait for the scan).
    pub fn load_index(&self) {
        if self.shared.loaded.load(Ordering::Acquire) {
            return;
        }
        let mut scanned = lock(&self.shared.scanned);
        if scanned.is_none() {
            self.rescan(&mut scanned);
        }
        self.shared.loaded.store(true, Ordering::Release);
    }

    /// Scans packs that appeared or grew since the last scan, if that was
    /// long enough ago and no other thread is scanning; true if it did.
    fn refresh(&self) -> bool {
        let Ok(mut scanned) = self.shared.scanned.try_lock() else {
            return false;
        };
        if scanned.is_some_and(|t| t.elapsed() < RESCAN_INTERVAL) {
            return false;
        }
        self.rescan(&mut scanned);
        true
    }

    fn rescan(&self, scanned: &mut Option<Instant>) {
        if let Err(e) = self.scan_new_records() {
            tracing::warn!(error = %e, "cannot scan the disk cache for new chunks");
        }
        *scanned = Some(Instant::now());
    }

    /// Where chunk `digest` is cached, looking again (at most once per
    /// [`RESCAN_INTERVAL`]) if the index does not know it.
    fn locate(&self, digest: &Digest) -> Option<(Slot, Arc<Pack>)> {
        self.load_index();
        let find = || {
            let index = self.index();
            let slot = *index.slots.get(&key(digest))?;
            Some((slot, index.packs[slot.pack as usize].pack.clone()))
        };
        find().or_else(|| if self.refresh() { find() } else { None })
    }

    /// Reads chunk `digest` if cached, verifying it. A record that does not
    /// hold it is dropped and reported as [`CacheError::Corrupt`]; a pack
    /// deleted meanwhile is a miss.
    pub fn get(&self, digest: &Digest, len: usize) -> Result<Option<Vec<u8>>, CacheError> {
        let Some((slot, pack)) = self.locate(digest) else {
            return Ok(None);
        };
        let corrupt = |detail| {
            self.drop_slot(digest, slot);
            CacheError::Corrupt {
                path: self.pack_path(&pack.name),
                offset: slot.offset,
                digest: *digest,
                detail,
            }
        };
        if slot.len as usize != len {
            return Err(corrupt("wrong length"));
        }
        let file = match self.open_pack(&pack.name, OFlags::RDONLY) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_pack(slot.pack);
                return Ok(None);
            }
            Err(e) => return Err(io_err("open", &self.pack_path(&pack.name))(e)),
        };
        let mut header = [0u8; HEADER_LEN];
        let mut data = vec![0u8; len];
        match read_record(&file, slot.offset, &mut header, &mut data) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(corrupt("the pack ends inside it"));
            }
            Err(e) => return Err(io_err("read", &self.pack_path(&pack.name))(e)),
        }
        match Header::parse(&header) {
            Ok(h) if !h.live => {
                // Another process found it corrupt.
                self.drop_slot(digest, slot);
                return Ok(None);
            }
            Ok(h) if h.digest == *digest && h.len as usize == len => {}
            Ok(_) => return Err(corrupt("its header names another chunk")),
            Err(_) => return Err(corrupt("its header is damaged")),
        }
        if !digest.matches(&data) {
            self.mark_dead(&pack.name, slot.offset);
            return Err(corrupt("the bytes do not match the digest"));
        }
        touch_if_due(&file, &pack.touched);
        Ok(Some(data))
    }

    /// True if chunk `digest` is cached (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.locate(digest).is_some()
    }

    /// Stores a verified chunk (unless it is cached already).
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        self.put_all(&[(*digest, data)])
    }

    /// Stores verified chunks not cached yet, appending them to this
    /// process's pack with one system call.
    fn put_all(&self, chunks: &[(Digest, &[u8])]) -> Result<(), CacheError> {
        self.load_index();
        let mut fresh: Vec<(Digest, &[u8])> = Vec::with_capacity(chunks.len());
        {
            let index = self.index();
            let mut batch = HashSet::new();
            for &(digest, data) in chunks {
                if data.len() <= MAX_DATA_LEN as usize
                    && !index.slots.contains_key(&key(&digest))
                    && batch.insert(key(&digest))
                {
                    fresh.push((digest, data));
                }
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let mut writing = lock(&self.shared.writing);
        let pack = self.lock_pack(&mut writing)?;
        let start = pack.len;
        let headers: Vec<[u8; HEADER_LEN]> = fresh
            .iter()
            .map(|(digest, data)| Header::encode(digest, data.len() as u32))
            .collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * fresh.len());
        for (header, (_, data)) in headers.iter().zip(&fresh) {
            slices.push(IoSlice::new(header));
            slices.push(IoSlice::new(data));
        }
        let written = write_all_vectored(&pack.file, &mut slices);
        if let Err(e) = written {
            // An append that wrote nothing (a full disk) leaves the pack as
            // it was; whatever part was written is a torn tail: no more
            // appends there.
            let untouched = pack.file.metadata().is_ok_and(|m| m.len() == start);
            let _ = rustix::fs::flock(&pack.file, FlockOperation::Unlock);
            let path = self.pack_path(&pack.name);
            if !untouched {
                *writing = None;
            }
            return Err(io_err("append to", &path)(e));
        }
        let _ = rustix::fs::flock(&pack.file, FlockOperation::Unlock);
        let mut offset = start;
        let mut index = self.index_mut();
        for (digest, data) in &fresh {
            let slot = Slot {
                offset,
                pack: pack.number,
                len: data.len() as u32,
            };
            index.slots.insert(key(digest), slot);
            offset += HEADER_LEN as u64 + data.len() as u64;
        }
        pack.len = offset;
        let entry = &mut index.packs[pack.number as usize];
        (entry.indexed, entry.seen) = (offset, offset);
        entry
            .pack
            .touched
            .store(unix_secs(SystemTime::now()), Ordering::Relaxed);
        drop(index);
        if pack.len >= PACK_TARGET {
            *writing = None;
        }
        Ok(())
    }

    /// This process's pack, locked for an append: a new one if there is
    /// none yet or garbage collection deleted it (or another writer wrote
    /// into it).
    fn lock_pack<'w>(
        &self,
        writing: &'w mut Option<WritePack>,
    ) -> Result<&'w mut WritePack, CacheError> {
        loop {
            let pack = match writing.take() {
                Some(p) => p,
                None => self.create_pack()?,
            };
            let path = || self.pack_path(&pack.name);
            rustix::fs::flock(&pack.file, FlockOperation::LockExclusive)
                .map_err(|e| io_err("lock", &path())(e.into()))?;
            let meta = pack.file.metadata().map_err(io_err("stat", &path()))?;
            if meta.nlink() > 0 && meta.len() == pack.len {
                return Ok(writing.insert(pack));
            }
            if meta.nlink() == 0 {
                self.forget_pack(pack.number);
            }
        }
    }

    fn create_pack(&self) -> Result<WritePack, CacheError> {
        let prefix = format!(
            "{}-{}",
            unix_secs(SystemTime::now()),
            rustix::process::getpid().as_raw_nonzero()
        );
        loop {
            let n = PACKS_CREATED.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{n}{PACK_SUFFIX}");
            let flags =
                OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
            let file = match self.open_pack(&name, flags) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &self.pack_path(&name))(e)),
            };
            let now = unix_secs(SystemTime::now());
            let number = self.add_pack(&name, now, PackState::Mine);
            return Ok(WritePack {
                file,
                number,
                name,
                len: 0,
            });
        }
    }

    fn open_pack(&self, name: &str, flags: OFlags) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.shared.packs,
            name,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::RUSR | Mode::WUSR,
        )?;
        Ok(File::from(fd))
    }

    /// Registers a pack in the index (or, if a scan registered it first,
    /// sets its state); returns its number.
    fn add_pack(&self, name: &str, mtime: u64, state: PackState) -> u32 {
        let mut index = self.index_mut();
        if let Some(&number) = index.by_name.get(name) {
            if state == PackState::Mine {
                index.packs[number as usize].state = state;
            }
            return number;
        }
        let number = index.packs.len() as u32;
        index.packs.push(PackEntry {
            pack: Arc::new(Pack {
                name: name.to_owned(),
                touched: AtomicU64::new(mtime),
            }),
            indexed: 0,
            seen: 0,
            state,
        });
        index.by_name.insert(name.to_owned(), number);
        number
    }

    /// Takes the records of a deleted pack out of the index.
    fn forget_pack(&self, number: u32) {
        let mut index = self.index_mut();
        if let Some(entry) = index.packs.get_mut(number as usize)
            && entry.state != PackState::Gone
        {
            entry.state = PackState::Gone;
            index.slots.retain(|_, s| s.pack != number);
        }
    }

    fn drop_slot(&self, digest: &Digest, slot: Slot) {
        let mut index = self.index_mut();
        let k = key(digest);
        if index
            .slots
            .get(&k)
            .is_some_and(|s| (s.pack, s.offset) == (slot.pack, slot.offset))
        {
            index.slots.remove(&k);
        }
    }

    /// Marks the record at `offset` dead, so no process serves it again.
    fn mark_dead(&self, name: &str, offset: u64) {
        let marked = self
            .open_pack(name, OFlags::WRONLY)
            .and_then(|f| f.write_all_at(&DEAD_MAGIC, offset));
        if let Err(e) = marked {
            tracing::warn!(pack = %self.pack_path(name).display(), offset, error = %e, "cannot mark a corrupt cache record dead");
        }
    }

    /// Indexes the records of packs that appeared or grew, and forgets
    /// packs that were deleted.
    fn scan_new_records(&self) -> Result<(), CacheError> {
        // Packs registered before the listing started and missing from it
        // are gone; packs registered later may simply be too new for it.
        let known = self.index().packs.len();
        let listing = self.list_packs()?;
        let plan: Vec<(&PackFile, Option<u32>, u64)> = {
            let index = self.index();
            listing
                .iter()
                .filter_map(|f| match index.by_name.get(&f.name) {
                    None => Some((f, None, 0)),
                    Some(&n) => {
                        let e = &index.packs[n as usize];
                        (e.state == PackState::Theirs && f.size > e.seen).then_some((
                            f,
                            Some(n),
                            e.indexed,
                        ))
                    }
                })
                .collect()
        };
        for (file, number, from) in plan {
            self.index_pack(file, number, from);
        }
        let listed: HashSet<&str> = listing.iter().map(|f| f.name.as_str()).collect();
        let gone: Vec<u32> = self.index().packs[..known]
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state != PackState::Gone && !listed.contains(e.pack.name.as_str()))
            .map(|(n, _)| n as u32)
            .collect();
        for number in gone {
            self.forget_pack(number);
        }
        Ok(())
    }

    /// Indexes the records of pack `file` (numbered `number` if it is known
    /// already) from offset `from`.
    fn index_pack(&self, file: &PackFile, number: Option<u32>, from: u64) {
        let mut records = Vec::new();
        let scanned = self.scan_pack(&file.name, from, |h, at| {
            if h.live {
                records.push((key(&h.digest), at, h.len));
            }
        });
        let path = || self.pack_path(&file.name);
        let (size, end, stopped) = match scanned {
            Ok((size, end, ScanEnd::Invalid(why))) => {
                tracing::warn!(pack = %path().display(), offset = end, error = %why, "invalid record in a cache pack: ignoring the rest of the pack");
                (size, end, true)
            }
            Ok((size, end, ScanEnd::Whole | ScanEnd::Torn)) => (size, end, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(pack = %path().display(), error = %e, "cannot scan a cache pack: ignoring it");
                (file.size, from, true)
            }
        };
        let number = number
            .unwrap_or_else(|| self.add_pack(&file.name, unix_secs(file.mtime), PackState::Theirs));
        let mut index = self.index_mut();
        for (k, offset, len) in records {
            let slot = Slot {
                offset,
                pack: number,
                len,
            };
            index.slots.entry(k).or_insert(slot);
        }
        let entry = &mut index.packs[number as usize];
        (entry.indexed, entry.seen) = (end, size);
        if stopped {
            entry.state = PackState::Stopped;
        }
    }

    /// Scans pack `name` from `from`: its size, the end of its last whole
    /// record, and why the scan stopped there.
    fn scan_pack(
        &self,
        name: &str,
        from: u64,
        each: impl FnMut(Header, u64),
    ) -> io::Result<(u64, u64, ScanEnd)> {
        let file = self.open_pack(name, OFlags::RDONLY)?;
        let size = file.metadata()?.len();
        let (end, stop) = pack::scan(&file, from, size, each)?;
        Ok((size, end, stop))
    }

    /// Every pack file, with its size and mtime.
    fn list_packs(&self) -> Result<Vec<PackFile>, CacheError> {
        let dir = self.shared.root.join(PACKS);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !name.ends_with(PACK_SUFFIX) {
                continue;
            }
            // Symlinks and directories are not packs; a pack deleted
            // since the listing is skipped.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                out.push(PackFile {
                    name,
                    size: meta.len(),
                    mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// Bytes used by cached chunks (pack files, and files of the previous
    /// layout until garbage collection removes them).
    pub fn usage(&self) -> Result<u64, CacheError> {
        let packs: u64 = self.list_packs()?.iter().map(|p| p.size).sum();
        Ok(packs + self.legacy_files()?.1)
    }

    /// Removes least recently used packs until at most `max_bytes` remain
    /// (never one being appended to), and every file of the previous
    /// layout. Safe while mounts run: a mount that misses a removed chunk
    /// fetches it again.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, CacheError> {
        let (legacy_files, legacy_bytes) = self.remove_legacy()?;
        let mut packs = self.list_packs()?;
        packs.sort_by_key(|p| p.mtime);
        let pack_bytes: u64 = packs.iter().map(|p| p.size).sum();
        let mut total = pack_bytes;
        let mut removed = legacy_files;
        for pack in &packs {
            if total <= max_bytes {
                break;
            }
            match self.remove_pack(&pack.name)? {
                Removal::Removed { chunks } => {
                    total -= pack.size;
                    removed += chunks;
                }
                Removal::Vanished => total -= pack.size,
                Removal::Busy => {}
            }
        }
        Ok(GcReport {
            before: legacy_bytes + pack_bytes,
            after: total,
            removed,
        })
    }

    /// Deletes pack `name` unless a writer is appending to it.
    fn remove_pack(&self, name: &str) -> Result<Removal, CacheError> {
        let path = self.pack_path(name);
        let file = match self.open_pack(name, OFlags::RDONLY) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Vanished),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        if !lock_unless_appending(&file).map_err(io_err("lock", &path))? {
            return Ok(Removal::Busy);
        }
        let size = file.metadata().map_err(io_err("stat", &path))?.len();
        let mut chunks = 0;
        pack::scan(&file, 0, size, |h, _| chunks += u64::from(h.live))
            .map_err(io_err("scan", &path))?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Vanished),
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        let number = self.index().by_name.get(name).copied();
        if let Some(number) = number {
            self.forget_pack(number);
        }
        Ok(Removal::Removed { chunks })
    }

    /// Files and bytes in the directories of the previous layout.
    fn legacy_files(&self) -> Result<(u64, u64), CacheError> {
        let (mut files, mut bytes) = (0, 0);
        let mut dirs: Vec<PathBuf> = LEGACY.iter().map(|d| self.shared.root.join(d)).collect();
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("list", &dir))?;
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else {
                    files += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((files, bytes))
    }

    /// Removes the previous layout's directories: (files, bytes) removed.
    fn remove_legacy(&self) -> Result<(u64, u64), CacheError> {
        let found = self.legacy_files()?;
        for dir in LEGACY {
            let path = self.shared.root.join(dir);
            match fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        Ok(found)
    }

    /// The digests of every cached chunk (from record headers; not
    /// verified).
    pub fn digests(&self) -> Result<HashSet<Digest>, CacheError> {
        let mut out = HashSet::new();
        for file in self.list_packs()? {
            let scanned = self.scan_pack(&file.name, 0, |h, _| {
                if h.live {
                    out.insert(h.digest);
                }
            });
            match scanned {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("scan", &self.pack_path(&file.name))(e)),
            }
        }
        Ok(out)
    }
}

/// What [`CacheDir::remove_pack`] did.
enum Removal {
    Removed {
        chunks: u64,
    },
    /// Deleted by someone else first.
    Vanished,
    /// Being appended to.
    Busy,
}

/// Locks a pack exclusively, waiting up to [`APPEND_WAIT`] for an append
/// in progress; false if it is still being appended to.
fn lock_unless_appending(file: &File) -> io::Result<bool> {
    let deadline = Instant::now() + APPEND_WAIT;
    loop {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(APPEND_WAIT / 20);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a record's header and data (whose length the caller knows) at
/// `offset`, in one system call when it can.
fn read_record(file: &File, offset: u64, header: &mut [u8], data: &mut [u8]) -> io::Result<()> {
    let mut bufs = [io::IoSliceMut::new(header), io::IoSliceMut::new(data)];
    let done = match rustix::io::preadv(file, &mut bufs, offset) {
        Ok(n) => n,
        Err(rustix::io::Errno::INTR) => 0,
        Err(e) => return Err(e.into()),
    };
    // A short read (end of file, a signal) is finished, or reported, by
    // plain reads.
    let in_header = done.min(header.len());
    file.read_exact_at(&mut header[in_header..], offset + in_header as u64)?;
    let in_data = done - in_header;
    file.read_exact_at(
        &mut data[in_data..],
        offset + (header.len() + in_data) as u64,
    )
}

/// Writes every byte of `slices`, with as few system calls as it can.
fn write_all_vectored(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Refreshes a pack's mtime, its LRU clock, if it was last set more than
/// [`TOUCH_INTERVAL`] ago (by this process's reckoning).
fn touch_if_due(file: &File, touched: &AtomicU64) {
    let now = unix_secs(SystemTime::now());
    let last = touched.load(Ordering::Relaxed);
    let due = now.saturating_sub(last) >= TOUCH_INTERVAL.as_secs();
    if due
        && touched
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Writes verified chunks to a [`CacheDir`] on a background thread, so a
/// read does not wait for the cache. When more than the byte budget is
/// queued the caller writes itself (bounded memory). Dropping it writes
/// what is queued.
#[derive(Debug)]
pub struct CacheWriter {
    cache: CacheDir,
    queue: Option<std::sync::mpsc::Sender<Digest>>,
    /// Chunks queued and not written yet: readers find them here.
    pending: Arc<Pending>,
    budget: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Cache write failures are logged at most this often (a full disk fails
/// every write; the chunks are still served, from memory).
const WRITE_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Logs a failed cache write, unless one was logged less than
/// [`WRITE_WARNING_INTERVAL`] ago; says how many went unlogged meanwhile.
fn warn_write_failure(e: &CacheError) {
    static LAST_WARNED: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    let mut last = lock(&LAST_WARNED);
    match last.as_mut() {
        Some((at, unlogged)) if at.elapsed() < WRITE_WARNING_INTERVAL => *unlogged += 1,
        _ => {
            let unlogged = last.map_or(0, |(_, n)| n);
            tracing::warn!(error = %e, unlogged_failures = unlogged, "cannot write to the disk cache");
            *last = Some((Instant::now(), 0));
        }
    }
}

/// The chunks a [`CacheWriter`] has queued, and their bytes in all.
#[derive(Debug, Default)]
struct Pending {
    chunks: Mutex<HashMap<Digest, Arc<Vec<u8>>>>,
    bytes: AtomicUsize,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, Arc<Vec<u8>>>> {
        lock(&self.chunks)
    }

    /// Writes the chunks queued under `digests` in one append.
    fn write(&self, cache: &CacheDir, digests: &[Digest]) {
        let chunks: Vec<(Digest, Arc<Vec<u8>>)> = {
            let pending = self.lock();
            digests
                .iter()
                .filter_map(|d| Some((*d, pending.get(d)?.clone())))
                .collect()
        };
        let slices: Vec<(Digest, &[u8])> = chunks.iter().map(|(d, c)| (*d, &c[..])).collect();
        if let Err(e) = cache.put_all(&slices) {
            warn_write_failure(&e);
        }
        let mut pending = self.lock();
        for (digest, data) in &chunks {
            pending.remove(digest);
            self.bytes.fetch_sub(data.len(), Ordering::Relaxed);
        }
    }
}

impl CacheWriter {
    /// A writer for `cache` that queues up to `budget` bytes of chunks.
    pub fn spawn(cache: CacheDir, budget: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Digest>();
        let target = cache.clone();
        let pending = Arc::new(Pending::default());
        let drained = pending.clone();
        let thread = std::thread::Builder::new()
            .name("darter-cache-writer".into())
            .spawn(move || {
                // Cache writes yield to the reads that wait on the daemon;
                // failing to lower the priority only costs speed.
                let _ = rustix::process::setpriority_process(
                    Some(rustix::thread::gettid()),
                    WRITER_NICENESS,
                );
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < BATCH_RECORDS
                        && let Ok(next) = rx.try_recv()
                    {
                        batch.push(next);
                    }
                    drained.write(&target, &batch);
                }
            })
            .ok();
        CacheWriter {
            cache,
            queue: thread.is_some().then_some(tx),
            pending,
            budget,
            thread,
        }
    }

    /// A chunk queued and not written yet.
    pub fn pending(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.pending.lock().get(digest).cloned()
    }

    /// Stores a verified chunk, soon.
    pub fn put(&self, digest: Digest, data: &Arc<Vec<u8>>) {
        if self.queue_up(digest, data) {
            return;
        }
        if let Err(e) = self.cache.put(&digest, data) {
            warn_write_failure(&e);
        }
    }

    /// Queues a chunk for the writer thread; false if the queue is full
    /// (or the thread gone) and the caller must write it.
    fn queue_up(&self, digest: Digest, data: &Arc<Vec<u8>>) -> bool {
        let Some(queue) = &self.queue else {
            return false;
        };
        let len = data.len();
        if self.pending.bytes.fetch_add(len, Ordering::Relaxed) + len > self.budget {
            self.pending.bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        if self.pending.lock().insert(digest, data.clone()).is_some() {
            // Already queued: its bytes are counted once.
            self.pending.bytes.fetch_sub(len, Ordering::Relaxed);
            return true;
        }
        if queue.send(digest).is_err() {
            self.pending.lock().remove(&digest);
            self.pending.bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darter_format::DigestAlgo;

    fn chunk(seed: u32, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = seed
            .to_le_bytes()
            .iter()
            .cycle()
            .take(len)
            .enumerate()
            .map(|(i, b)| b ^ (i as u8))
            .collect();
        (DigestAlgo::Blake3.digest(&data), data)
    }

    /// The pack files in `root`, oldest name first.
    fn packs(root: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(root.join(PACKS))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "pack"))
            .collect();
        out.sort();
        out
    }

    /// Writes a pack by hand, as another process would: (digest, bytes) records.
    fn write_pack(root: &Path, name: &str, records: &[(Digest, &[u8])]) -> PathBuf {
        let mut bytes = Vec::new();
        for (digest, data) in records {
            bytes.extend_from_slice(&Header::encode(digest, data.len() as u32));
            bytes.extend_from_slice(data);
        }
        fs::create_dir_all(root.join(PACKS)).unwrap();
        let path = root.join(PACKS).join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Waits (polling, up to 10 s) for `cond`.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that `cache` serves every one of `chunks`.
    #[track_caller]
    fn assert_serves(cache: &CacheDir, chunks: &[(Digest, Vec<u8>)]) {
        for (d, data) in chunks {
            assert_eq!(
                cache.get(d, data.len()).unwrap().as_ref(),
                Some(data),
                "{d}"
            );
        }
    }

    fn flip(path: &Path, at: u64) {
        let file = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 1], at).unwrap();
    }

    fn set_mtime(path: &Path, secs: u64) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn chunks_round_trip_and_many_share_one_pack() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let chunks: Vec<_> = (0..50).map(|i| chunk(i, 1000 + i as usize)).collect();
        assert!(cache.get(&chunks[0].0, 1000).unwrap().is_none());
        for (d, data) in &chunks {
            cache.put(d, data).unwrap();
            // Stored once: a second put appends nothing.
            cache.put(d, data).unwrap();
        }
        assert!(chunks.iter().all(|(d, _)| cache.contains(d)));
        assert_serves(&cache, &chunks);
        let stored: u64 = chunks
            .iter()
            .map(|(_, c)| (HEADER_LEN + c.len()) as u64)
            .sum();
        assert_eq!(packs(dir.path()).len(), 1);
        assert_eq!(cache.usage().unwrap(), stored);
        let listed = cache.digests().unwrap();
        assert_eq!(listed, chunks.iter().map(|c| c.0).collect());
    }

    #[test]
    fn a_full_pack_is_followed_by_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let chunks: Vec<_> = (0..65).map(|i| chunk(i, 1 << 20)).collect();
        for (d, data) in &chunks {
            cache.put(d, data).unwrap();
        }
        let sizes: Vec<u64> = packs(dir.path())
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .collect();
        let record = (HEADER_LEN + (1 << 20)) as u64;
        assert_eq!(sizes, [64 * record, record], "{sizes:?}");
        let reopened = CacheDir::open(dir.path()).unwrap();
        assert_serves(&reopened, &chunks);
    }

    #[test]
    fn another_instance_sees_new_chunks_after_a_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let reader = CacheDir::open(dir.path()).unwrap();
        let writer = CacheDir::open(dir.path()).unwrap();
        let (d, data) = chunk(1, 5000);
        assert!(!reader.contains(&d), "indexes the empty cache");
        writer.put(&d, &data).unwrap();
        eventually("the reader to find the chunk", || {
            reader.get(&d, data.len()).unwrap().is_some()
        });
        assert_eq!(reader.get(&d, data.len()).unwrap(), Some(data.clone()));
        // A chunk the reader already has is not appended again by it.
        reader.put(&d, &data).unwrap();
        assert_eq!(packs(dir.path()).len(), 1);
    }

    #[test]
    fn concurrent_writers_each_append_to_packs_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..200).map(|i| chunk(i, 3000)).collect();
        std::thread::scope(|s| {
            for part in chunks.chunks(50) {
                let cache = CacheDir::open(dir.path()).unwrap();
                s.spawn(move || {
                    for (d, data) in part {
                        cache.put(d, data).unwrap();
                    }
                });
            }
        });
        assert_eq!(packs(dir.path()).len(), 4);
        let fresh = CacheDir::open(dir.path()).unwrap();
        assert_serves(&fresh, &chunks);
    }

    /// Regression: a chunk queued for the background writer and already
    /// dropped from memory was fetched from the backend again.
    #[test]
    fn a_queued_chunk_is_readable_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let writer = CacheWriter::spawn(cache.clone(), 1 << 20);
        let chunks: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_le_bytes().repeat(4096)).collect();
        for data in &chunks {
            let d = DigestAlgo::Blake3.digest(data);
            writer.put(d, &Arc::new(data.clone()));
            let readable = writer.pending(&d).is_some_and(|p| *p == *data)
                || cache.get(&d, data.len()).unwrap().as_ref() == Some(data);
            assert!(readable, "chunk {d} is neither queued nor on disk");
        }
        drop(writer);
        for data in &chunks {
            let d = DigestAlgo::Blake3.digest(data);
            assert_eq!(cache.get(&d, data.len()).unwrap().as_ref(), Some(data));
        }
        assert_eq!(packs(dir.path()).len(), 1, "one pack, not a file per chunk");
    }

    #[test]
    fn a_corrupt_record_is_reported_marked_dead_and_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let (d, data) = chunk(1, 3000);
        let (after, after_data) = chunk(2, 3000);
        cache.put(&d, &data).unwrap();
        cache.put(&after, &after_data).unwrap();
        let other = CacheDir::open(dir.path()).unwrap();
        assert!(other.contains(&d));
        let pack = packs(dir.path()).remove(0);
        flip(&pack, HEADER_LEN as u64 + 1234);

        match cache.get(&d, data.len()) {
            Err(CacheError::Corrupt {
                path,
                offset,
                digest,
                ..
            }) => assert_eq!((path, offset, digest), (pack.clone(), 0, d)),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let mut magic = [0u8; 8];
        File::open(&pack)
            .unwrap()
            .read_exact_at(&mut magic, 0)
            .unwrap();
        assert_eq!(magic, DEAD_MAGIC);
        // Served by neither this instance, nor one that indexed it before,
        // nor one that indexes it now; the record after it still is.
        let fresh = CacheDir::open(dir.path()).unwrap();
        for c in [&cache, &other, &fresh] {
            assert!(c.get(&d, data.len()).unwrap().is_none());
            assert_eq!(c.get(&after, 3000).unwrap(), Some(after_data.clone()));
        }
        assert!(!fresh.contains(&d));
        // Fetched again: appended anew and served.
        cache.put(&d, &data).unwrap();
        assert_eq!(cache.get(&d, data.len()).unwrap(), Some(data.clone()));
        let again = CacheDir::open(dir.path()).unwrap();
        assert_eq!(again.get(&d, data.len()).unwrap(), Some(data));
    }

    #[test]
    fn a_record_of_the_wrong_length_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (d, data) = chunk(1, 3000);
        write_pack(dir.path(), "1-1-0.pack", &[(d, &data[..2999])]);
        let cache = CacheDir::open(dir.path()).unwrap();
        assert!(matches!(
            cache.get(&d, data.len()),
            Err(CacheError::Corrupt { .. })
        ));
        assert!(cache.get(&d, data.len()).unwrap().is_none());
    }

    #[test]
    fn a_torn_tail_is_never_served_and_the_next_writer_uses_a_new_pack() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..3).map(|i| chunk(i, 2000)).collect();
        let records: Vec<(Digest, &[u8])> = chunks.iter().map(|(d, c)| (*d, &c[..])).collect();
        let torn = write_pack(dir.path(), "1-1-0.pack", &records);
        let record = (HEADER_LEN + 2000) as u64;
        for cut in [2 * record + 10, 2 * record + HEADER_LEN as u64 + 1999] {
            File::options()
                .write(true)
                .open(&torn)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let cache = CacheDir::open(dir.path()).unwrap();
            for (d, data) in &chunks[..2] {
                assert_eq!(cache.get(d, data.len()).unwrap().as_ref(), Some(data));
            }
            let (last, data) = &chunks[2];
            assert!(
                cache.get(last, data.len()).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        let cache = CacheDir::open(dir.path()).unwrap();
        let (last, data) = &chunks[2];
        cache.put(last, data).unwrap();
        assert_eq!(fs::metadata(&torn).unwrap().len(), 2 * record + 2063);
        assert_eq!(packs(dir.path()).len(), 2);
        let fresh = CacheDir::open(dir.path()).unwrap();
        assert_eq!(fresh.get(last, data.len()).unwrap().as_ref(), Some(data));
    }

    #[test]
    fn a_record_still_being_appended_is_indexed_once_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (d, data) = chunk(7, 10_000);
        let path = write_pack(dir.path(), "1-1-0.pack", &[(d, &data)]);
        let whole = fs::read(&path).unwrap();
        fs::write(&path, &whole[..5000]).unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        assert!(!cache.contains(&d));
        fs::write(&path, &whole).unwrap();
        eventually("the finished record to be indexed", || cache.contains(&d));
        assert_eq!(cache.get(&d, data.len()).unwrap(), Some(data));
    }

    #[test]
    fn hostile_pack_files_are_skipped_without_harm() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (good, good_data) = chunk(1, 4000);
        let (other, other_data) = chunk(2, 4000);
        // A valid record, then garbage: the record is served.
        let mixed = write_pack(root, "1-1-0.pack", &[(good, &good_data)]);
        let mut bytes = fs::read(&mixed).unwrap();
        bytes.extend((0..10_000u32).map(|i| (i * 7919 % 251) as u8));
        fs::write(&mixed, bytes).unwrap();
        // A header claiming the largest length, in a short file.
        let mut huge = Header::encode(&other, MAX_DATA_LEN).to_vec();
        huge.extend_from_slice(&other_data);
        fs::write(root.join(PACKS).join("1-1-1.pack"), huge).unwrap();
        // A record whose bytes are not its digest's (a forgery).
        write_pack(root, "1-1-2.pack", &[(other, &good_data)]);
        fs::write(root.join(PACKS).join("1-1-3.pack"), b"").unwrap();
        fs::write(root.join(PACKS).join("1-1-4.pack"), [0xff; 100]).unwrap();
        fs::create_dir(root.join(PACKS).join("dir.pack")).unwrap();
        std::os::unix::fs::symlink(&mixed, root.join(PACKS).join("link.pack")).unwrap();
        fs::write(root.join(PACKS).join("notes.txt"), b"not a pack").unwrap();

        let cache = CacheDir::open(root).unwrap();
        assert_eq!(cache.get(&good, 4000).unwrap(), Some(good_data));
        assert!(matches!(
            cache.get(&other, 4000),
            Err(CacheError::Corrupt { .. })
        ));
        assert!(cache.get(&other, 4000).unwrap().is_none());
        assert_eq!(cache.digests().unwrap(), [good].into_iter().collect());
        let report = cache.gc(0).unwrap();
        assert_eq!((report.after, report.removed), (0, 1), "{report:?}");
        assert!(cache.get(&good, 4000).unwrap().is_none());
    }

    #[test]
    fn gc_removes_least_recently_used_packs_but_not_one_being_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<_> = (0..5).map(|i| chunk(i, 1000)).collect();
        let paths: Vec<PathBuf> = chunks
            .iter()
            .enumerate()
            .map(|(i, (d, c))| {
                let path = write_pack(dir.path(), &format!("1-1-{i}.pack"), &[(*d, c)]);
                // Names and mtimes in opposite orders: mtime decides.
                set_mtime(&path, 2_000_000 - i as u64);
                path
            })
            .collect();
        // A writer in the middle of an append holds the oldest pack.
        let appending = File::open(&paths[4]).unwrap();
        rustix::fs::flock(&appending, FlockOperation::LockExclusive).unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let record = (HEADER_LEN + 1000) as u64;
        let report = cache.gc(2 * record + 10).unwrap();
        assert_eq!(
            report,
            GcReport {
                before: 5 * record,
                after: 2 * record,
                removed: 3
            }
        );
        let left: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, false, false, false, true]);
        assert!(cache.contains(&chunks[0].0) && cache.contains(&chunks[4].0));
        assert!(!cache.contains(&chunks[1].0));
        drop(appending);
        assert_eq!(cache.gc(0).unwrap().after, 0);
    }

    #[test]
    fn a_reader_whose_pack_was_collected_misses_and_its_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let (d, data) = chunk(1, 3000);
        cache.put(&d, &data).unwrap();
        let reader = CacheDir::open(dir.path()).unwrap();
        assert!(reader.contains(&d));
        let report = CacheDir::open(dir.path()).unwrap().gc(0).unwrap();
        assert_eq!((report.after, report.removed), (0, 1));
        for c in [&reader, &cache] {
            assert!(c.get(&d, data.len()).unwrap().is_none());
        }
        // The writer's pack is gone: it appends to a new one.
        let (e, more) = chunk(2, 3000);
        cache.put(&e, &more).unwrap();
        cache.put(&d, &data).unwrap();
        assert_eq!(packs(dir.path()).len(), 1);
        let fresh = CacheDir::open(dir.path()).unwrap();
        assert_eq!(fresh.get(&e, more.len()).unwrap(), Some(more));
        assert_eq!(fresh.get(&d, data.len()).unwrap(), Some(data));
    }

    #[test]
    fn files_of_the_previous_layout_are_ignored_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let (d, data) = chunk(1, 1000);
        let old = dir.path().join("chunks/blake3").join(&d.hex()[..2]);
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join(d.hex()), &data).unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/.tmpXYZ"), &data[..10]).unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        assert!(!cache.contains(&d));
        assert_eq!(cache.usage().unwrap(), 1010);
        let report = cache.gc(u64::MAX).unwrap();
        assert_eq!(
            report,
            GcReport {
                before: 1010,
                after: 0,
                removed: 2
            }
        );
        assert!(!dir.path().join("chunks").exists() && !dir.path().join("tmp").exists());
    }
}
