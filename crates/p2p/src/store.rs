//! The piece store: one directory per task under `ROOT/tasks/`, named by
//! digest, holding the blob's bytes (`data`, written piece by piece at
//! their offsets) and, once the whole blob is verified, `meta.json` (size,
//! piece size, piece digests, and the BLAKE3 sums pieces read back are
//! checked against). Only complete tasks survive a restart. When
//! a new task would pass the size limit, the least recently used complete
//! tasks no one is reading are deleted whole.
//!
//! Pieces are written and read with direct I/O where the filesystem
//! allows it: a peer passes each blob through once and serves it from the
//! disk, and filling the page cache with it costs more CPU than the rest
//! of the peer's work on a virtual machine (every new page is a fault in
//! the host). Where direct I/O is refused (tmpfs, some network
//! filesystems) or a piece is not aligned, the page cache is used.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::buffer::{BufferPool, DIRECT_IO_ALIGN, PieceBuf};
use crate::piece::{BlobDigest, PIECE_SIZE};

/// What `meta.json` records of a complete task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMeta {
    pub size: u64,
    pub piece_size: u64,
    /// `sha256:<hex>` of each piece.
    pub piece_digests: Vec<String>,
    /// BLAKE3 (hex) of each piece as written, checked when it is read back
    /// for a client (absent in stores of older peers: sha256 is checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub piece_sums: Vec<String>,
    /// The chained sha256 state after each piece (hex, "" where unknown),
    /// passed on to peers that fetch from this one (absent in stores of
    /// older peers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub piece_chain: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("piece store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("task {task} ({size} bytes) does not fit in the piece store limit of {limit} bytes")]
    Full {
        task: BlobDigest,
        size: u64,
        limit: u64,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    meta: Option<TaskMeta>,
    last_used: u64,
    readers: usize,
}

#[derive(Debug, Default)]
struct Index {
    tasks: HashMap<BlobDigest, Entry>,
    clock: u64,
}

impl Index {
    fn used(&self) -> u64 {
        self.tasks.values().map(|e| e.size).sum()
    }
}

/// The piece store of one peer.
#[derive(Debug)]
pub struct PieceStore {
    root: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    pool: Arc<BufferPool>,
    /// Whether the filesystem takes direct I/O.
    direct: bool,
}

/// Keeps a task out of GC while it is fetched or read.
#[derive(Debug)]
pub struct Pinned {
    store: Arc<PieceStore>,
    task: BlobDigest,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(entry) = self.store.index().tasks.get_mut(&self.task) {
            entry.readers = entry.readers.saturating_sub(1);
        }
    }
}

impl PieceStore {
    /// Opens (creating) the store at `root`, keeping complete tasks and
    /// deleting partial ones.
    pub fn open(root: &Path, limit: u64) -> Result<Arc<PieceStore>, StoreError> {
        std::fs::create_dir_all(root).map_err(io_error(root))?;
        PieceStore::open_with_io(root, limit, takes_direct_io(root))
    }

    /// As [`Self::open`], with direct I/O or without.
    fn open_with_io(root: &Path, limit: u64, direct: bool) -> Result<Arc<PieceStore>, StoreError> {
        let tasks_dir = root.join("tasks");
        std::fs::create_dir_all(&tasks_dir).map_err(io_error(&tasks_dir))?;
        let mut index = Index::default();
        for dirent in std::fs::read_dir(&tasks_dir).map_err(io_error(&tasks_dir))? {
            let path = dirent.map_err(io_error(&tasks_dir))?.path();
            match load_task(&path) {
                Some((task, meta)) => {
                    index.clock += 1;
                    index.tasks.insert(
                        task,
                        Entry {
                            size: meta.size,
                            meta: Some(meta),
                            last_used: index.clock,
                            readers: 0,
                        },
                    );
                }
                None => {
                    info!(path = %path.display(), "removing a partial task");
                    remove_dir(&path);
                }
            }
        }
        Ok(Arc::new(PieceStore {
            root: root.to_owned(),
            limit,
            index: Mutex::new(index),
            pool: BufferPool::new(PIECE_SIZE as usize),
            direct,
        }))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn task_dir(&self, task: &BlobDigest) -> PathBuf {
        self.root
            .join("tasks")
            .join(format!("sha256-{}", task.hex()))
    }

    fn data_path(&self, task: &BlobDigest) -> PathBuf {
        self.task_dir(task).join("data")
    }

    /// The complete tasks, to report to a scheduler.
    pub fn complete_tasks(&self) -> Vec<(BlobDigest, TaskMeta)> {
        let index = self.index();
        index
            .tasks
            .iter()
            .filter_map(|(task, entry)| Some((*task, entry.meta.clone()?)))
            .collect()
    }

    /// A complete task's meta, pinning it while the caller reads.
    pub fn open_complete(self: &Arc<Self>, task: &BlobDigest) -> Option<(TaskMeta, Pinned)> {
        let mut index = self.index();
        index.clock += 1;
        let clock = index.clock;
        let entry = index.tasks.get_mut(task)?;
        let meta = entry.meta.clone()?;
        entry.last_used = clock;
        entry.readers += 1;
        Some((meta, self.pin_counted(*task)))
    }

    fn pin_counted(self: &Arc<Self>, task: BlobDigest) -> Pinned {
        Pinned {
            store: self.clone(),
            task,
        }
    }

    /// Makes room for and creates a new, empty task of `size` bytes (any
    /// earlier copy is dropped), pinned.
    pub fn create(self: &Arc<Self>, task: &BlobDigest, size: u64) -> Result<Pinned, StoreError> {
        let evicted = {
            let mut index = self.index();
            index.tasks.remove(task);
            let evicted = make_room(&mut index, size, self.limit);
            if index.used() + size > self.limit {
                return Err(StoreError::Full {
                    task: *task,
                    size,
                    limit: self.limit,
                });
            }
            index.clock += 1;
            let last_used = index.clock;
            index.tasks.insert(
                *task,
                Entry {
                    size,
                    meta: None,
                    last_used,
                    readers: 1,
                },
            );
            evicted
        };
        for old in evicted {
            info!(task = %old, "piece store GC: removing task");
            remove_dir(&self.task_dir(&old));
        }
        let dir = self.task_dir(task);
        remove_dir(&dir);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let data = self.data_path(task);
        let file = File::create(&data).map_err(io_error(&data))?;
        file.set_len(size).map_err(io_error(&data))?;
        Ok(self.pin_counted(*task))
    }

    /// A buffer for `len` bytes of a piece, to fill and [`Self::write`].
    pub fn buffer(&self, len: usize) -> PieceBuf {
        self.pool.take(len)
    }

    /// Whether bytes at `offset` go through direct I/O.
    fn direct_at(&self, offset: u64) -> bool {
        self.direct && offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
    }

    fn open_data(&self, task: &BlobDigest, write: bool, direct: bool) -> Result<File, StoreError> {
        let data = self.data_path(task);
        let mut options = std::fs::OpenOptions::new();
        options.read(!write).write(write);
        if direct {
            options.custom_flags(O_DIRECT);
        }
        options.open(&data).map_err(io_error(&data))
    }

    /// Writes bytes of a task at `offset`: directly if the address, offset
    /// and length are aligned (a [`PieceBuf`] of a whole piece), else (a
    /// blob's short last piece) through the page cache.
    pub fn write(&self, task: &BlobDigest, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let direct = self.direct_at(offset)
            && bytes.len().is_multiple_of(DIRECT_IO_ALIGN)
            && bytes.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0;
        let file = self.open_data(task, true, direct)?;
        file.write_all_at(bytes, offset)
            .map_err(io_error(&self.data_path(task)))
    }

    /// Reads `len` bytes of a task at `offset`.
    pub fn read(&self, task: &BlobDigest, offset: u64, len: usize) -> Result<PieceBuf, StoreError> {
        let direct = self.direct_at(offset);
        let file = self.open_data(task, false, direct)?;
        let mut piece = self.pool.take(len);
        let target = if direct {
            piece.aligned_mut()
        } else {
            &mut piece[..]
        };
        let mut got = 0;
        while got < len {
            match file.read_at(&mut target[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(&self.data_path(task))(e)),
            }
        }
        if got < len {
            let short = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{got} of {len} bytes at offset {offset}"),
            );
            return Err(io_error(&self.data_path(task))(short));
        }
        piece.truncate(len);
        Ok(piece)
    }

    /// Records a verified task as complete.
    pub fn finish(&self, task: &BlobDigest, meta: TaskMeta) -> Result<(), StoreError> {
        let dir = self.task_dir(task);
        let tmp = dir.join("meta.json.tmp");
        let json = serde_json::to_vec(&meta).map_err(|e| io_error(&tmp)(e.into()))?;
        std::fs::write(&tmp, json).map_err(io_error(&tmp))?;
        let path = dir.join("meta.json");
        std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
        if let Some(entry) = self.index().tasks.get_mut(task) {
            entry.meta = Some(meta);
        }
        Ok(())
    }

    /// Forgets a task and deletes its files (a failed fetch, corrupt data).
    pub fn discard(&self, task: &BlobDigest) {
        self.index().tasks.remove(task);
        remove_dir(&self.task_dir(task));
    }
}

/// Removes least recently used complete, unread tasks until `size` more
/// bytes fit, and returns them; removes nothing if they would not make
/// enough room.
fn make_room(index: &mut Index, size: u64, limit: u64) -> Vec<BlobDigest> {
    let evictable = |e: &Entry| e.meta.is_some() && e.readers == 0;
    let kept: u64 = index
        .tasks
        .values()
        .filter(|e| !evictable(e))
        .map(|e| e.size)
        .sum();
    if kept.saturating_add(size) > limit {
        return Vec::new();
    }
    let mut evicted = Vec::new();
    while index.used() + size > limit {
        let victim = index
            .tasks
            .iter()
            .filter(|(_, e)| evictable(e))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(task, _)| *task);
        let Some(victim) = victim else { break };
        index.tasks.remove(&victim);
        evicted.push(victim);
    }
    evicted
}

/// A complete task directory's digest and meta; `None` for anything else.
fn load_task(dir: &Path) -> Option<(BlobDigest, TaskMeta)> {
    let name = dir.file_name()?.to_str()?;
    let task: BlobDigest = format!("sha256:{}", name.strip_prefix("sha256-")?)
        .parse()
        .ok()?;
    let meta: TaskMeta =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let data_len = std::fs::metadata(dir.join("data")).ok()?.len();
    (data_len == meta.size).then_some((task, meta))
}

/// `O_DIRECT`, as `OpenOptionsExt::custom_flags` takes it.
const O_DIRECT: i32 = rustix::fs::OFlags::DIRECT.bits() as i32;

/// Whether files in `dir` take direct I/O: a probe file is written once.
fn takes_direct_io(dir: &Path) -> bool {
    let probe = dir.join(".direct-io-probe");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(O_DIRECT)
        .open(&probe)
        .and_then(|file| {
            let block = BufferPool::new(DIRECT_IO_ALIGN).take(DIRECT_IO_ALIGN);
            file.write_all_at(&block, 0)
        });
    let _ = std::fs::remove_file(&probe);
    if let Err(error) = &written {
        info!(dir = %dir.display(), %error, "no direct I/O here: pieces go through the page cache");
    }
    written.is_ok()
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => warn!(path = %dir.display(), %error, "cannot remove task directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> TaskMeta {
        TaskMeta {
            size,
            piece_size: size,
            piece_digests: vec![BlobDigest::of(b"x").to_string()],
            piece_sums: vec![blake3::hash(b"x").to_hex().to_string()],
            piece_chain: Vec::new(),
        }
    }

    fn task(n: u8) -> BlobDigest {
        BlobDigest::of(&[n])
    }

    /// A store in `dir` holding task 1 complete, with `data`.
    fn store_holding(dir: &Path, data: &[u8]) -> Arc<PieceStore> {
        let store = PieceStore::open(dir, 1000).unwrap();
        let size = data.len() as u64;
        drop(store.create(&task(1), size).unwrap());
        write(&store, 1, 0, data);
        store.finish(&task(1), meta(size)).unwrap();
        store
    }

    fn write(store: &PieceStore, n: u8, offset: u64, data: &[u8]) {
        let mut piece = store.buffer(data.len());
        piece.copy_from_slice(data);
        store.write(&task(n), offset, &piece).unwrap();
    }

    #[test]
    fn pieces_read_back_as_written_with_and_without_direct_io() {
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = PieceStore::open_with_io(dir.path(), 1 << 20, direct).unwrap();
            assert_eq!(store.direct, direct);
            let size = 3 * DIRECT_IO_ALIGN as u64 + 100;
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            drop(store.create(&task(1), size).unwrap());
            let piece = 2 * DIRECT_IO_ALIGN;
            // The short last piece first: the file keeps its size.
            write(&store, 1, piece as u64, &data[piece..]);
            write(&store, 1, 0, &data[..piece]);
            let path = store.data_path(&task(1));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
            assert_eq!(std::fs::read(&path).unwrap(), data);
            let tail = store
                .read(&task(1), piece as u64, data.len() - piece)
                .unwrap();
            assert_eq!(&*tail, &data[piece..]);
            // An unaligned offset goes through the page cache.
            assert_eq!(&*store.read(&task(1), 5, 10).unwrap(), &data[5..15]);
        }
    }

    #[test]
    fn complete_tasks_survive_a_reopen_and_partial_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_holding(dir.path(), b"0123456789");
        drop(store.create(&task(2), 10).unwrap());
        drop(store);
        let store = PieceStore::open(dir.path(), 1000).unwrap();
        assert_eq!(store.complete_tasks(), vec![(task(1), meta(10))]);
        assert_eq!(&*store.read(&task(1), 2, 3).unwrap(), b"234");
        assert!(matches!(
            store.read(&task(1), 8, 3),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        assert!(!store.task_dir(&task(2)).exists());
    }

    #[test]
    fn tasks_stored_by_peers_that_kept_no_sums_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_holding(dir.path(), b"x");
        let older = serde_json::json!({
            "size": 1,
            "piece_size": 1,
            "piece_digests": [BlobDigest::of(b"x").to_string()],
        });
        std::fs::write(
            store.task_dir(&task(1)).join("meta.json"),
            older.to_string(),
        )
        .unwrap();
        drop(store);
        let store = PieceStore::open(dir.path(), 1000).unwrap();
        let (_, loaded) = &store.complete_tasks()[0];
        assert!(loaded.piece_sums.is_empty());
        assert_eq!(loaded.piece_digests, meta(1).piece_digests);
    }

    #[test]
    fn gc_removes_least_recently_used_unread_tasks_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = PieceStore::open(dir.path(), 30).unwrap();
        for n in 1..=3 {
            drop(store.create(&task(n), 10).unwrap());
            store.finish(&task(n), meta(10)).unwrap();
        }
        // Task 1 is used again and task 2 is being read: task 3 goes first.
        drop(store.open_complete(&task(1)).unwrap());
        let reading = store.open_complete(&task(2)).unwrap();
        drop(store.create(&task(4), 10).unwrap());
        let left = |store: &PieceStore| {
            let mut tasks: Vec<_> = store.complete_tasks().into_iter().map(|(t, _)| t).collect();
            tasks.sort();
            tasks
        };
        let mut expected = vec![task(1), task(2)];
        expected.sort();
        assert_eq!(left(&store), expected);
        assert!(!store.task_dir(&task(3)).exists());
        // Only task 1 could go, and that would not make room for 25 bytes:
        // the new task is refused and task 1 stays.
        assert!(matches!(
            store.create(&task(5), 25),
            Err(StoreError::Full {
                size: 25,
                limit: 30,
                ..
            })
        ));
        assert_eq!(left(&store), expected);
        drop(reading);
        drop(store.create(&task(6), 20).unwrap());
        assert!(store.complete_tasks().is_empty());
    }
}
