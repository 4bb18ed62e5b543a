//! The on-disk chunk cache: one file per chunk, named by its digest, so a
//! chunk is stored once whichever image or mount fetched it.
//!
//! Crash safety: a chunk is written to `tmp/` and renamed into place, and
//! every read verifies the digest, so a torn or corrupted file is found,
//! deleted and fetched again instead of being served.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use darter_format::Digest;

/// A cache file's mtime is refreshed on use at most this often (it is the
/// LRU clock, and touching on every read would cost a syscall per read).
const TOUCH_INTERVAL: Duration = Duration::from_secs(600);
/// Niceness of the background cache writer thread.
const WRITER_NICENESS: i32 = 10;
/// Temp files older than this belong to dead writers and are removed.
const STALE_TEMP: Duration = Duration::from_secs(3600);

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
    /// A cached chunk did not match its digest (it has been removed).
    #[error("cached chunk {path} is corrupt (expected {digest}); removed")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The digest it should have.
        digest: Digest,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn rename_err(path: &Path, source: io::Error) -> CacheError {
    CacheError::Io {
        op: "rename onto",
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
    /// Chunk files removed.
    pub removed: u64,
}

/// A chunk cache directory.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
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

impl CacheDir {
    /// Opens (creating) a cache directory.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        for sub in ["chunks", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        Ok(CacheDir {
            root: root.to_owned(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("chunks")
            .join(digest.algo().name())
            .join(&hex[..2])
            .join(hex)
    }

    /// Reads chunk `digest` if cached. A file that does not verify is
    /// removed and reported as [`CacheError::Corrupt`].
    pub fn get(&self, digest: &Digest, len: usize) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.path(digest);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CacheError::Io {
                    op: "open",
                    path,
                    source: e,
                });
            }
        };
        let mut data = Vec::with_capacity(len);
        Read::by_ref(&mut file)
            .take(len as u64 + 1)
            .read_to_end(&mut data)
            .map_err(io_err("read", &path))?;
        if data.len() != len || !digest.matches(&data) {
            let _ = fs::remove_file(&path);
            return Err(CacheError::Corrupt {
                path,
                digest: *digest,
            });
        }
        touch_if_old(&file);
        Ok(Some(data))
    }

    /// True if chunk `digest` is cached (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Stores a verified chunk. Concurrent writers of the same chunk are
    /// harmless: each renames a complete file into place.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let path = self.path(digest);
        if path.is_file() {
            return Ok(());
        }
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(io_err("create temp file in", &tmp_dir))?;
        tmp.write_all(data).map_err(io_err("write", tmp.path()))?;
        // The fan-out directory usually exists: try the rename first.
        let tmp = match tmp.persist(&path) {
            Ok(_) => return Ok(()),
            Err(e) if e.error.kind() == io::ErrorKind::NotFound => e.file,
            Err(e) => return Err(rename_err(&path, e.error)),
        };
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        tmp.persist(&path)
            .map(drop)
            .map_err(|e| rename_err(&path, e.error))
    }

    /// Bytes used by cached chunks.
    pub fn usage(&self) -> Result<u64, CacheError> {
        Ok(self.files()?.iter().map(|f| f.1).sum())
    }

    /// Removes least recently used chunks until at most `max_bytes` remain,
    /// and temp files left by dead writers. Safe while mounts run: a mount
    /// that misses a removed chunk fetches it again.
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, CacheError> {
        self.remove_stale_temps()?;
        let mut files = self.files()?;
        let before: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|f| f.0);
        let mut total = before;
        let mut removed = 0;
        for (_, size, path) in files {
            if total <= max_bytes {
                break;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    total -= size;
                    removed += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => total -= size,
                Err(e) => {
                    return Err(CacheError::Io {
                        op: "remove",
                        path,
                        source: e,
                    });
                }
            }
        }
        Ok(GcReport {
            before,
            after: total,
            removed,
        })
    }

    /// The digests of every cached chunk (from file names; not verified).
    pub fn digests(&self) -> Result<std::collections::HashSet<Digest>, CacheError> {
        let mut out = std::collections::HashSet::new();
        for (_, _, path) in self.files()? {
            let algo: Option<darter_format::DigestAlgo> = path
                .parent()
                .and_then(Path::parent)
                .and_then(Path::file_name)
                .and_then(|a| a.to_str()?.parse().ok());
            let name = path.file_name().and_then(|n| n.to_str());
            if let (Some(algo), Some(hex)) = (algo, name)
                && let Ok(digest) = format!("{algo}:{hex}").parse::<Digest>()
            {
                out.insert(digest);
            }
        }
        Ok(out)
    }

    /// (mtime, size, path) of every chunk file.
    fn files(&self) -> Result<Vec<(SystemTime, u64, PathBuf)>, CacheError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.join("chunks")];
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(CacheError::Io {
                        op: "list",
                        path: dir,
                        source: e,
                    });
                }
            };
            for entry in entries {
                let entry = entry.map_err(io_err("list", &dir))?;
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else if meta.is_file() {
                    out.push((
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                        entry.path(),
                    ));
                }
            }
        }
        Ok(out)
    }

    fn remove_stale_temps(&self) -> Result<(), CacheError> {
        let dir = self.root.join("tmp");
        let now = SystemTime::now();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TEMP);
            if old {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// Writes verified chunks to a [`CacheDir`] on a background thread, so a
/// read does not wait for the cache file. When more than the byte budget is
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

/// The chunks a [`CacheWriter`] has queued, and their bytes in all.
#[derive(Debug, Default)]
struct Pending {
    chunks: Mutex<HashMap<Digest, Arc<Vec<u8>>>>,
    bytes: AtomicUsize,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Vec<u8>>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
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
                for digest in rx {
                    let Some(data) = drained.lock().get(&digest).cloned() else {
                        continue;
                    };
                    if let Err(e) = target.put(&digest, &data) {
                        tracing::warn!(error = %e, "cannot write to the disk cache");
                    }
                    drained.lock().remove(&digest);
                    drained.bytes.fetch_sub(data.len(), Ordering::Relaxed);
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
            tracing::warn!(error = %e, "cannot write to the disk cache");
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

fn touch_if_old(file: &fs::File) {
    let Ok(modified) = file.metadata().and_then(|m| m.modified()) else {
        return;
    };
    if SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default()
        > TOUCH_INTERVAL
    {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darter_format::DigestAlgo;

    #[test]
    fn put_get_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let data = b"chunk bytes".to_vec();
        let d = DigestAlgo::Blake3.digest(&data);
        assert!(cache.get(&d, data.len()).unwrap().is_none());
        cache.put(&d, &data).unwrap();
        assert_eq!(cache.get(&d, data.len()).unwrap(), Some(data.clone()));
        // Flip a byte on disk: the read notices, removes it and says so.
        let path = cache.path(&d);
        let mut bad = fs::read(&path).unwrap();
        bad[0] ^= 1;
        fs::write(&path, bad).unwrap();
        assert!(matches!(
            cache.get(&d, data.len()),
            Err(CacheError::Corrupt { .. })
        ));
        assert!(!path.exists());
        // A truncated file is corrupt too.
        cache.put(&d, &data).unwrap();
        fs::write(&path, &data[..3]).unwrap();
        assert!(matches!(
            cache.get(&d, data.len()),
            Err(CacheError::Corrupt { .. })
        ));
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
    }

    #[test]
    fn gc_removes_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::open(dir.path()).unwrap();
        let mut digests = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let d = DigestAlgo::Blake3.digest(&data);
            cache.put(&d, &data).unwrap();
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + u64::from(i));
            fs::File::options()
                .write(true)
                .open(cache.path(&d))
                .unwrap()
                .set_modified(t)
                .unwrap();
            digests.push(d);
        }
        let report = cache.gc(2500).unwrap();
        assert_eq!(
            report,
            GcReport {
                before: 5000,
                after: 2000,
                removed: 3
            }
        );
        assert!(!cache.contains(&digests[0]) && !cache.contains(&digests[2]));
        assert!(cache.contains(&digests[3]) && cache.contains(&digests[4]));
        let listed = cache.digests().unwrap();
        assert_eq!(listed, [digests[3], digests[4]].into_iter().collect());
    }
}
