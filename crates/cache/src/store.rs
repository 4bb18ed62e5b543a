//! The chunk store: file reads served from memory, the disk cache or the
//! backend, with merged, parallel, single-flight fetches.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use darter_format::Digest;
use darter_format::blob::{BLOCK_BITS, ChunkRecord};
use darter_format::compress::decompress;
use darter_format::erofs::Inode;
use darter_image::{BlobSource, ChunkLocation, Image, ImageError};
use darter_oci::OciDigest;

use crate::disk::{CacheDir, CacheError, CacheWriter};
use crate::memory::{MemoryLru, RawFrames};
use crate::stats::{Stats, StatsSnapshot};

/// Tuning of a [`ChunkStore`].
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Bytes of verified chunks kept in memory.
    pub memory_bytes: usize,
    /// Largest merged backend request.
    pub merge_limit: u64,
    /// Largest gap between frames bridged by one request (the gap is
    /// fetched and thrown away; a request costs more than a few KiB).
    pub merge_gap: u64,
    /// On a miss in a sequential read, also fetch the file's following
    /// chunks up to this many bytes past the read (in the background).
    pub readahead: u64,
    /// On a miss, also fetch up to this many compressed bytes of the frames
    /// that follow in the blob (the next files of the same directory, as the
    /// builder lays them out), kept compressed in memory and decompressed
    /// only if read: fewer requests, no extra decompression. Worth it where
    /// a request costs more than the bytes (local disks), not on slow links.
    pub blob_readahead: u64,
    /// Compressed bytes of such frames kept in memory.
    pub raw_bytes: usize,
    /// Backend requests one read may have in flight at once.
    pub parallel: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            memory_bytes: 4 << 20,
            merge_limit: 4 << 20,
            merge_gap: 16 << 10,
            readahead: 1 << 20,
            blob_readahead: 0,
            raw_bytes: 4 << 20,
            parallel: 4,
        }
    }
}

/// Why a read failed. The FUSE layer answers all of these with EIO.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ReadError {
    /// Metadata or chunk table problems.
    #[error("{0}")]
    Image(Arc<ImageError>),
    /// The backend failed (after its own retries).
    #[error("fetching blob {blob} bytes {start}..{end}: {detail}")]
    Backend {
        /// Blob digest.
        blob: String,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// What happened.
        detail: String,
    },
    /// A chunk failed verification (or its frame would not decompress).
    #[error("blob {blob}, chunk {chunk}: {detail}")]
    Verify {
        /// Blob digest.
        blob: String,
        /// Chunk index in the blob's table.
        chunk: usize,
        /// What happened.
        detail: String,
    },
}

impl From<ImageError> for ReadError {
    fn from(e: ImageError) -> Self {
        ReadError::Image(Arc::new(e))
    }
}

impl From<darter_format::erofs::ReadError> for ReadError {
    fn from(e: darter_format::erofs::ReadError) -> Self {
        ReadError::Image(Arc::new(ImageError::Metadata(e)))
    }
}

type FrameKey = (usize, u64);
/// A frame and the fetch in flight for it.
type Claim = (FrameKey, Arc<Flight>);

/// Bytes of chunks waiting for the background cache writer before readers
/// write their own.
const CACHE_WRITE_BUDGET: usize = 8 << 20;

/// Times a range whose bytes fail verification is fetched again.
const VERIFY_RETRIES: u32 = 2;
/// Wait before such a refetch (times the attempt number).
const VERIFY_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// True if a fetched frame (or a chunk in it) failed verification.
fn is_corrupt(r: &FrameResult) -> bool {
    match r {
        Err(ReadError::Verify { .. }) => true,
        Err(_) => false,
        Ok(chunks) => chunks
            .values()
            .any(|c| matches!(c, Err(ReadError::Verify { .. }))),
    }
}
type ChunkResult = Result<Arc<Vec<u8>>, ReadError>;

/// The outcome of fetching one frame: every chunk in it, verified.
type FrameResult = Result<Arc<HashMap<usize, ChunkResult>>, ReadError>;

/// A fetch in progress that other readers of the same frame wait on.
#[derive(Debug, Default)]
struct Flight {
    result: Mutex<Option<FrameResult>>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, r: FrameResult) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> FrameResult {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return r.clone();
            }
            guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Where the last read of each recently read file ended, to tell
/// sequential reads (worth reading ahead) from scattered ones (page faults
/// in a mapped library: reading ahead would fetch bytes nobody reads).
#[derive(Debug, Default)]
struct Streams {
    ends: Mutex<HashMap<u64, u64>>,
}

/// Files [`Streams`] remembers; it forgets them all when full.
const STREAMS: usize = 4096;

impl Streams {
    /// Records a read of `offset..end` of file `nid`; true if it starts the
    /// file or continues the previous read.
    fn follows(&self, nid: u64, offset: u64, end: u64) -> bool {
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        if ends.len() >= STREAMS {
            ends.clear();
        }
        let previous = ends.insert(nid, end);
        offset == 0 || previous == Some(offset)
    }
}

/// What a read covers: `offset..end` of a file or an address space, and
/// the key [`Streams`] knows it by.
#[derive(Debug, Clone, Copy)]
struct Read {
    stream: u64,
    offset: u64,
    end: u64,
}

/// Stream keys of address spaces: above every EROFS nid (nids are at most
/// 2^32 * 128 / 32), so a device's reads never count as a file's.
const ADDRESS_SPACE_STREAMS: u64 = 1 << 48;

/// A chunk to be read: where it is and its record.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    loc: ChunkLocation,
    record: ChunkRecord,
}

/// Serves file bytes of one image.
pub struct ChunkStore<S> {
    image: Arc<Image<S>>,
    disk: Option<CacheDir>,
    memory: Mutex<MemoryLru>,
    writer: Mutex<Option<CacheWriter>>,
    raw: Mutex<RawFrames>,
    flights: Mutex<HashMap<FrameKey, Arc<Flight>>>,
    streams: Streams,
    stats: Arc<Stats>,
    opts: StoreOptions,
    demand: Mutex<usize>,
    idle: Condvar,
    stop: AtomicBool,
}

impl<S> std::fmt::Debug for ChunkStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl<S: BlobSource + 'static> ChunkStore<S> {
    /// A store for `image`, caching chunks in `disk` if given. `stats`
    /// should be the counters of the image's [`crate::Counted`] source, so
    /// backend traffic is counted where it happens.
    pub fn new(
        image: Arc<Image<S>>,
        disk: Option<CacheDir>,
        opts: StoreOptions,
        stats: Arc<Stats>,
    ) -> Self {
        let writer = disk
            .clone()
            .map(|d| CacheWriter::spawn(d, CACHE_WRITE_BUDGET));
        if let Some(d) = disk.clone() {
            // Index the cache now rather than at the first read.
            std::thread::spawn(move || d.load_index());
        }
        ChunkStore {
            image,
            disk,
            memory: Mutex::new(MemoryLru::new(opts.memory_bytes)),
            writer: Mutex::new(writer),
            raw: Mutex::new(RawFrames::new(opts.raw_bytes)),
            flights: Mutex::new(HashMap::new()),
            streams: Streams::default(),
            stats,
            opts,
            demand: Mutex::new(0),
            idle: Condvar::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<Image<S>> {
        &self.image
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.image_bytes = self
            .image
            .blobs()
            .iter()
            .map(|b| b.trailer.table_offset)
            .sum();
        s
    }

    /// Asks a running prefetch to stop, and writes out the chunks still
    /// queued for the disk cache.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.idle.notify_all();
        drop(self.writer.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// The chunk if it is queued for the disk cache.
    fn queued(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|w| w.pending(digest))
    }

    /// True if chunk `digest` is in the disk cache or queued for it (an
    /// in-memory lookup).
    fn on_disk(&self, digest: &Digest) -> bool {
        self.queued(digest).is_some() || self.disk.as_ref().is_some_and(|d| d.contains(digest))
    }

    fn store_on_disk(&self, digest: Digest, data: &Arc<Vec<u8>>) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        match (writer.as_ref(), &self.disk) {
            (Some(w), _) => w.put(digest, data),
            (None, Some(disk)) => {
                if let Err(e) = disk.put(&digest, data) {
                    tracing::warn!(error = %e, "cannot write to the disk cache");
                }
            }
            (None, None) => {}
        }
    }

    /// Reads up to `len` bytes at `offset` of a regular file. `path` names
    /// the file in log messages.
    pub fn read_file(
        self: &Arc<Self>,
        inode: &Inode,
        offset: u64,
        len: u64,
        path: &dyn Fn() -> String,
    ) -> Result<Vec<u8>, ReadError> {
        if offset >= inode.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = inode.size.min(offset.saturating_add(len));
        let cs = self.image.bootstrap().chunk_size();
        let mut placed = Vec::new();
        for n in offset / cs..=(end - 1) / cs {
            if let Some(w) = self.wanted(inode, n)? {
                placed.push((n * cs, w));
            }
        }
        let read = Read {
            stream: inode.nid,
            offset,
            end,
        };
        self.serve(&read, &placed, path, || {
            self.readahead(inode, (end - 1) / cs + 1, end)
        })
    }

    /// Reads up to `len` bytes at `offset` of blob `blob`'s uncompressed
    /// address space (`docs/format.md` section 2.1): the EROFS device the
    /// kernel reads when it mounts the bootstrap itself. Gaps between
    /// chunks read as zeros. `files` names the files using those bytes in
    /// log messages (called only if the read fails).
    pub fn read_address_space(
        self: &Arc<Self>,
        blob: usize,
        offset: u64,
        len: u64,
        files: &dyn Fn() -> String,
    ) -> Result<Vec<u8>, ReadError> {
        let size = self.image.blobs()[blob].trailer.uncompressed_size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len));
        let table = self.image.chunk_table(blob)?;
        let records = table.records();
        let first =
            records.partition_point(|r| r.uncompressed_offset() + u64::from(r.size) <= offset);
        let placed: Vec<(u64, Wanted)> = records[first..]
            .iter()
            .enumerate()
            .take_while(|(_, r)| r.uncompressed_offset() < end)
            .map(|(i, &record)| {
                let loc = ChunkLocation {
                    blob,
                    index: first + i,
                };
                (record.uncompressed_offset(), Wanted { loc, record })
            })
            .collect();
        let read = Read {
            stream: ADDRESS_SPACE_STREAMS + blob as u64,
            offset,
            end,
        };
        let after = first + placed.len();
        // Reads that follow each other are a large file streamed, or the
        // kernel reading neighbouring small files (the builder lays out a
        // directory's files together): both are worth reading ahead.
        self.serve(&read, &placed, files, || {
            self.readahead_in_blob(blob, after, end)
        })
    }

    /// Serves `read` from chunks placed at the given offsets of what is
    /// read (a file or an address space); what no chunk covers is zeros.
    /// `ahead` lists the chunks to read ahead if the read is sequential.
    fn serve(
        self: &Arc<Self>,
        read: &Read,
        placed: &[(u64, Wanted)],
        path: &dyn Fn() -> String,
        ahead: impl FnOnce() -> Vec<Wanted>,
    ) -> Result<Vec<u8>, ReadError> {
        let (offset, end) = (read.offset, read.end);
        let mut out = vec![0u8; (end - offset) as usize];
        let mut found: HashMap<ChunkLocation, Arc<Vec<u8>>> = HashMap::new();
        let mut missing = Vec::new();
        for (_, w) in placed {
            match self.cached(w) {
                Some(data) => {
                    found.insert(w.loc, data);
                }
                None => missing.push(*w),
            }
        }
        let sequential = self.streams.follows(read.stream, offset, end);
        if !missing.is_empty() {
            Stats::add(&self.stats.cache_misses, missing.len() as u64);
            if sequential {
                self.fetch_behind(&ahead());
            }
            let fetched = self.fetch_demand(&missing)?;
            for w in &missing {
                let data = self
                    .take(&fetched, w)
                    .map_err(|e| self.log_failure(e, path))?;
                found.insert(w.loc, data);
            }
        }
        for (chunk_start, w) in placed {
            let data = &found[&w.loc];
            let from = offset.max(*chunk_start);
            let to = end.min(chunk_start + data.len() as u64);
            if to > from {
                out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                    &data[(from - chunk_start) as usize..(to - chunk_start) as usize],
                );
            }
        }
        Stats::add(&self.stats.read_bytes, out.len() as u64);
        Ok(out)
    }

    fn log_failure(&self, e: ReadError, path: &dyn Fn() -> String) -> ReadError {
        tracing::error!(file = %path(), error = %e, "read failed");
        e
    }

    fn wanted(&self, inode: &Inode, n: u64) -> Result<Option<Wanted>, ReadError> {
        let idx = self.image.bootstrap().erofs().chunk_index(inode, n)?;
        if idx.is_hole() {
            return Ok(None);
        }
        let loc = self.image.locate(idx)?;
        let record = self.image.record(loc)?;
        let cs = self.image.bootstrap().chunk_size();
        let needed = (inode.size - n * cs).min(cs);
        if u64::from(record.size) != needed {
            return Err(ImageError::ChunkSize {
                digest: self.blob_name(loc.blob),
                index: loc.index,
                size: record.size,
                needed,
            }
            .into());
        }
        Ok(Some(Wanted { loc, record }))
    }

    fn digest(&self, w: &Wanted) -> Digest {
        Digest::new(self.image.bootstrap().info().digest_algo, w.record.digest)
    }

    fn blob_name(&self, blob: usize) -> String {
        self.image.blobs()[blob].oci_digest()
    }

    /// Looks in memory, then on disk (verifying; a corrupt file is dropped).
    fn cached(&self, w: &Wanted) -> Option<Arc<Vec<u8>>> {
        let data = self.lookup(w)?;
        Stats::add(&self.stats.cache_hits, 1);
        Some(data)
    }

    /// Every chunk of a frame, if all are cached by now: a fetch may have
    /// finished between a reader's look in the cache and its claim.
    fn cached_frame(&self, (blob, offset): FrameKey) -> Option<FrameResult> {
        let table = self.image.chunk_table(blob).ok()?;
        let members = table.frame_at(offset)?;
        let mut chunks = HashMap::new();
        for index in members {
            let record = table.records()[index];
            let w = Wanted {
                loc: ChunkLocation { blob, index },
                record,
            };
            chunks.insert(index, Ok(self.lookup(&w)?));
        }
        Stats::add(&self.stats.cache_hits, chunks.len() as u64);
        Some(Ok(Arc::new(chunks)))
    }

    /// [`Self::cached`] without counting a hit.
    fn lookup(&self, w: &Wanted) -> Option<Arc<Vec<u8>>> {
        let digest = self.digest(w);
        if let Some(data) = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
        {
            return Some(data);
        }
        let queued = self.queued(&digest);
        if queued.is_some() {
            return queued;
        }
        let disk = self.disk.as_ref()?;
        match disk.get(&digest, w.record.size as usize) {
            Ok(Some(data)) => {
                let data = Arc::new(data);
                self.memory
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, data.clone());
                Some(data)
            }
            Ok(None) => None,
            Err(e @ CacheError::Corrupt { .. }) => {
                Stats::add(&self.stats.verify_failures, 1);
                tracing::warn!(blob = %self.blob_name(w.loc.blob), chunk = w.loc.index, error = %e, "dropped corrupt cached chunk; fetching it again");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk cache unavailable for this chunk");
                None
            }
        }
    }

    /// The file's chunks after `from_chunk`, up to the read-ahead window,
    /// that are not cached yet.
    fn readahead(&self, inode: &Inode, from_chunk: u64, end: u64) -> Vec<Wanted> {
        let cs = self.image.bootstrap().chunk_size();
        let limit = inode.size.min(end.saturating_add(self.opts.readahead));
        let mut out = Vec::new();
        let mut n = from_chunk;
        while n * cs < limit && n < inode.chunk_count(BLOCK_BITS) {
            if let Ok(Some(w)) = self.wanted(inode, n)
                && !self.on_disk(&self.digest(&w))
            {
                out.push(w);
            }
            n += 1;
        }
        out
    }

    /// The chunks of blob `blob` from record `from` on that start within
    /// the read-ahead window past `end` of its address space and are not
    /// cached yet.
    fn readahead_in_blob(&self, blob: usize, from: usize, end: u64) -> Vec<Wanted> {
        let Ok(table) = self.image.chunk_table(blob) else {
            return Vec::new();
        };
        let limit = end.saturating_add(self.opts.readahead);
        table.records()[from.min(table.records().len())..]
            .iter()
            .enumerate()
            .take_while(|(_, r)| r.uncompressed_offset() < limit)
            .filter(|(i, _)| !self.on_disk(&table.digest(from + i)))
            .map(|(i, &record)| Wanted {
                loc: ChunkLocation {
                    blob,
                    index: from + i,
                },
                record,
            })
            .collect()
    }

    fn take(&self, fetched: &HashMap<FrameKey, FrameResult>, w: &Wanted) -> ChunkResult {
        let key = (w.loc.blob, w.record.compressed_offset);
        let frame = fetched.get(&key).cloned().unwrap_or_else(|| {
            Err(ReadError::Verify {
                blob: self.blob_name(w.loc.blob),
                chunk: w.loc.index,
                detail: "frame was not fetched".into(),
            })
        })?;
        frame.get(&w.loc.index).cloned().unwrap_or_else(|| {
            Err(ReadError::Verify {
                blob: self.blob_name(w.loc.blob),
                chunk: w.loc.index,
                detail: "chunk missing from its frame".into(),
            })
        })
    }

    /// Starts fetching a file's chunks past a read on a background thread,
    /// so the read does not wait for them (on a slow link they would cost
    /// it their transfer time). The frames are claimed as in flight before
    /// this returns: the reader who needs one next waits for this fetch.
    fn fetch_behind(self: &Arc<Self>, ahead: &[Wanted]) {
        let frames: BTreeSet<FrameKey> = ahead.iter().map(Self::frame_key).collect();
        let (claimed, _) = self.claim(&frames);
        if claimed.is_empty() {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("darter-readahead".into())
            .spawn(move || store.fetch_claimed(claimed, true, false));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a readahead thread");
        }
    }

    fn frame_key(w: &Wanted) -> FrameKey {
        (w.loc.blob, w.record.compressed_offset)
    }

    /// Fetches for a reader: marks demand so the prefetcher steps aside.
    fn fetch_demand(
        &self,
        missing: &[Wanted],
    ) -> Result<HashMap<FrameKey, FrameResult>, ReadError> {
        *self.demand.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let frames: BTreeSet<FrameKey> = missing.iter().map(Self::frame_key).collect();
        let result = self.fetch(&frames, true);
        let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        *demand -= 1;
        if *demand == 0 {
            self.idle.notify_all();
        }
        Ok(result)
    }

    /// Fetches `frames`, joining fetches already in flight and merging the
    /// rest into as few ranged requests as the limits allow, run in parallel.
    fn fetch(
        &self,
        frames: &BTreeSet<FrameKey>,
        keep_in_memory: bool,
    ) -> HashMap<FrameKey, FrameResult> {
        let (mine, theirs) = self.claim(frames);
        let mut results = self.fetch_claimed(mine, keep_in_memory, keep_in_memory);
        for (key, flight) in theirs {
            results.insert(key, flight.wait());
        }
        results
    }

    /// Claims the frames nobody is fetching yet as in flight (mine), and
    /// returns the fetches in flight for the others (theirs).
    fn claim(&self, frames: &BTreeSet<FrameKey>) -> (Vec<Claim>, Vec<Claim>) {
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        for &key in frames {
            match flights.get(&key) {
                Some(f) => theirs.push((key, f.clone())),
                None => {
                    let f = Arc::new(Flight::default());
                    flights.insert(key, f.clone());
                    mine.push((key, f));
                }
            }
        }
        (mine, theirs)
    }

    /// Fetches frames claimed as in flight and settles their flights.
    /// With `blob_readahead`, requests are extended over the frames that
    /// follow them in the blob (see [`StoreOptions::blob_readahead`]).
    fn fetch_claimed(
        &self,
        mut mine: Vec<Claim>,
        keep_in_memory: bool,
        blob_readahead: bool,
    ) -> HashMap<FrameKey, FrameResult> {
        let mut results = HashMap::new();
        // Frames cached or read ahead since the claim need no request.
        mine.retain(|(key, flight)| {
            let r = match self.cached_frame(*key) {
                Some(r) => r,
                None => {
                    let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner()).take(key);
                    let Some(stored) = raw else { return true };
                    self.open_frame(key.0, key.1, &stored, keep_in_memory)
                }
            };
            results.insert(*key, r.clone());
            flight.finish(r);
            self.flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            false
        });
        let ranges = self.merge(&mine, blob_readahead);
        let parallel = self.opts.parallel.max(1);
        for batch in ranges.chunks(parallel) {
            if let [only] = batch {
                // One request: no thread to start and join.
                results.extend(self.fetch_range(only, keep_in_memory));
                continue;
            }
            let done: Vec<Vec<(FrameKey, FrameResult)>> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|r| s.spawn(move || self.fetch_range(r, keep_in_memory)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_default())
                    .collect()
            });
            for (key, r) in done.into_iter().flatten() {
                results.insert(key, r);
            }
        }
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for (key, flight) in &mine {
                let r = results.get(key).cloned().unwrap_or_else(|| {
                    Err(ReadError::Backend {
                        blob: self.blob_name(key.0),
                        start: key.1,
                        end: key.1,
                        detail: "fetch worker failed".into(),
                    })
                });
                flight.finish(r);
                flights.remove(key);
            }
        }
        results
    }

    /// Groups frames into ranged requests: same blob, gaps at most
    /// `merge_gap`, total at most `merge_limit` (a bigger frame goes alone).
    /// On demand reads, each request is then extended over the frames that
    /// follow it in the blob (see [`StoreOptions::blob_readahead`]).
    fn merge(&self, frames: &[Claim], readahead: bool) -> Vec<FetchRange> {
        let mut out: Vec<FetchRange> = Vec::new();
        for ((blob, offset), _) in frames {
            let Ok(table) = self.image.chunk_table(*blob) else {
                continue;
            };
            let Some(members) = table.frame_at(*offset) else {
                continue;
            };
            let size = u64::from(table.records()[members.start].compressed_size);
            let extends = out.last().is_some_and(|r: &FetchRange| {
                r.blob == *blob
                    && *offset >= r.end
                    && *offset - r.end <= self.opts.merge_gap
                    && offset + size - r.start <= self.opts.merge_limit
            });
            if extends {
                let last = out.last_mut().expect("checked above");
                last.end = offset + size;
                last.frames.push(*offset);
            } else {
                out.push(FetchRange {
                    blob: *blob,
                    start: *offset,
                    end: offset + size,
                    frames: vec![*offset],
                    ahead: Vec::new(),
                });
            }
        }
        if readahead {
            for range in &mut out {
                self.extend_ahead(range);
            }
        }
        out
    }

    /// Extends `range` over the frames right after it that are neither
    /// cached nor being fetched, within the readahead budget, registering
    /// them as fetches in flight (a reader who needs one meanwhile waits
    /// for this request instead of fetching it again).
    fn extend_ahead(&self, range: &mut FetchRange) {
        let Ok(table) = self.image.chunk_table(range.blob) else {
            return;
        };
        let records = table.records();
        let budget_end = range.end.saturating_add(self.opts.blob_readahead);
        let Some(last) = range.frames.last() else {
            return;
        };
        let mut next = table.frame_at(*last).map_or(records.len(), |m| m.end);
        while next < records.len() {
            let members = table
                .frame_at(records[next].compressed_offset)
                .unwrap_or(next..next + 1);
            let r = records[members.start];
            let end = r.compressed_offset + u64::from(r.compressed_size);
            if r.compressed_offset != range.end
                || end > budget_end
                || end - range.start > self.opts.merge_limit
            {
                break;
            }
            let key = (range.blob, r.compressed_offset);
            let cached = members.clone().any(|i| self.on_disk(&table.digest(i)));
            if cached
                || self
                    .raw
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&key)
            {
                break;
            }
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            if flights.contains_key(&key) {
                break;
            }
            let flight = Arc::new(Flight::default());
            flights.insert(key, flight.clone());
            range.ahead.push((r.compressed_offset, flight));
            range.end = end;
            next = members.end;
        }
    }

    /// Settles the frames fetched ahead: one a reader now waits for is
    /// opened and handed over; the others are kept compressed.
    fn settle_ahead(&self, range: &FetchRange, fetched: Result<&[u8], &ReadError>) {
        for (offset, flight) in &range.ahead {
            let key = (range.blob, *offset);
            if self
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key)
                .is_none()
            {
                continue;
            }
            let stored = fetched.map(|bytes| self.frame_bytes(range, bytes, *offset));
            // Our reference is one; any other belongs to a waiting reader.
            let waited_for = Arc::strong_count(flight) > 1;
            match stored {
                Ok(Some(b)) if waited_for => {
                    flight.finish(self.open_frame(range.blob, *offset, b, true));
                }
                Ok(Some(b)) => self
                    .raw
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, b.to_vec()),
                Ok(None) => flight.finish(Err(ReadError::Verify {
                    blob: self.blob_name(range.blob),
                    chunk: 0,
                    detail: format!("no frame at offset {offset}"),
                })),
                Err(e) => flight.finish(Err(e.clone())),
            }
        }
    }

    /// The stored bytes of the frame at `offset`, out of a range's bytes.
    fn frame_bytes<'b>(
        &self,
        range: &FetchRange,
        bytes: &'b [u8],
        offset: u64,
    ) -> Option<&'b [u8]> {
        let table = self.image.chunk_table(range.blob).ok()?;
        let members = table.frame_at(offset)?;
        let start = usize::try_from(offset.checked_sub(range.start)?).ok()?;
        bytes.get(start..start + table.records()[members.start].compressed_size as usize)
    }

    /// Fetches a range, fetching it again (after a short backoff) while
    /// what arrives fails verification: bytes damaged in transit are a
    /// transient fault, bytes damaged at the source stay an error.
    fn fetch_range(
        &self,
        range: &FetchRange,
        keep_in_memory: bool,
    ) -> Vec<(FrameKey, FrameResult)> {
        let mut attempt = 0;
        loop {
            let results = self.fetch_range_once(range, keep_in_memory);
            if attempt >= VERIFY_RETRIES || !results.iter().any(|(_, r)| is_corrupt(r)) {
                return results;
            }
            attempt += 1;
            tracing::warn!(source = %self.image.source().name(), blob = %self.blob_name(range.blob), start = range.start, end = range.end, attempt, "fetched bytes failed verification; fetching them again");
            std::thread::sleep(VERIFY_RETRY_BACKOFF * attempt);
        }
    }

    /// One backend request: read, split into frames, decompress and verify
    /// each chunk, store verified chunks.
    fn fetch_range_once(
        &self,
        range: &FetchRange,
        keep_in_memory: bool,
    ) -> Vec<(FrameKey, FrameResult)> {
        let entry = &self.image.blobs()[range.blob];
        let digest = OciDigest::from_bytes(entry.blob_digest);
        let bytes = match self.image.source().read_range(
            &digest,
            range.start,
            range.end - range.start,
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(blob = %digest, start = range.start, end = range.end, error = %e, "backend read failed");
                let err = ReadError::Backend {
                    blob: digest.to_string(),
                    start: range.start,
                    end: range.end,
                    detail: e.to_string(),
                };
                self.settle_ahead(range, Err(&err));
                return range
                    .frames
                    .iter()
                    .map(|&f| ((range.blob, f), Err(err.clone())))
                    .collect();
            }
        };
        if !keep_in_memory {
            Stats::add(&self.stats.prefetch_bytes, bytes.len() as u64);
        }
        self.settle_ahead(range, Ok(&bytes));
        range
            .frames
            .iter()
            .map(|&f| {
                let r = match self.frame_bytes(range, &bytes, f) {
                    Some(b) => self.open_frame(range.blob, f, b, keep_in_memory),
                    None => Err(ReadError::Verify {
                        blob: self.blob_name(range.blob),
                        chunk: 0,
                        detail: format!("no frame at offset {f}"),
                    }),
                };
                ((range.blob, f), r)
            })
            .collect()
    }

    /// Decompresses the frame stored at `offset` of blob `blob` (`stored`
    /// is exactly its bytes), verifies every chunk in it and stores the
    /// good ones.
    fn open_frame(
        &self,
        blob_index: usize,
        offset: u64,
        stored: &[u8],
        keep_in_memory: bool,
    ) -> FrameResult {
        let table = self.image.chunk_table(blob_index)?;
        let blob = self.blob_name(blob_index);
        let members = table.frame_at(offset).ok_or_else(|| ReadError::Verify {
            blob: blob.clone(),
            chunk: 0,
            detail: format!("no frame at offset {offset}"),
        })?;
        let first = table.records()[members.start];
        let frame = decompress(first.compression, stored, first.frame_size as usize).map_err(|e| {
            Stats::add(&self.stats.verify_failures, 1);
            tracing::error!(source = %self.image.source().name(), blob = %blob, chunk = members.start, offset, error = %e, "frame does not decompress");
            ReadError::Verify { blob: blob.clone(), chunk: members.start, detail: e.to_string() }
        })?;
        Stats::add(&self.stats.decompressed_bytes, frame.len() as u64);
        let mut chunks = HashMap::new();
        let mut frame = frame;
        for index in members.clone() {
            let r = table.records()[index];
            // A chunk that is its whole frame takes the buffer: no copy.
            let whole_frame = members.len() == 1 && r.range_in_frame() == (0..frame.len());
            let digest = table.digest(index);
            let result = if digest.matches(&frame[r.range_in_frame()]) {
                let data = Arc::new(if whole_frame {
                    std::mem::take(&mut frame)
                } else {
                    frame[r.range_in_frame()].to_vec()
                });
                self.store_on_disk(digest, &data);
                if keep_in_memory {
                    self.memory
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(digest, data.clone());
                }
                Ok(data)
            } else {
                Stats::add(&self.stats.verify_failures, 1);
                tracing::error!(source = %self.image.source().name(), blob = %blob, chunk = index, expected = %digest, "chunk digest mismatch: refusing to serve it");
                Err(ReadError::Verify {
                    blob: blob.clone(),
                    chunk: index,
                    detail: format!("digest mismatch (expected {digest})"),
                })
            };
            chunks.insert(index, result);
        }
        Ok(Arc::new(chunks))
    }

    /// Fetches every chunk not yet on disk, in large requests, yielding to
    /// on-demand reads. Runs until done or [`Self::stop`].
    pub fn prefetch_all(&self) {
        for blob in 0..self.image.blobs().len() {
            let table = match self.image.chunk_table(blob) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "prefetch: chunk table unavailable");
                    continue;
                }
            };
            let mut batch = BTreeSet::new();
            let mut batch_bytes = 0u64;
            let mut last_frame = None;
            for (index, r) in table.records().iter().enumerate() {
                if last_frame == Some(r.compressed_offset) {
                    continue;
                }
                last_frame = Some(r.compressed_offset);
                if self.on_disk(&table.digest(index)) {
                    continue;
                }
                batch.insert((blob, r.compressed_offset));
                batch_bytes += u64::from(r.compressed_size);
                if batch_bytes >= self.opts.merge_limit {
                    if !self.prefetch_batch(&std::mem::take(&mut batch)) {
                        return;
                    }
                    batch_bytes = 0;
                }
            }
            if !batch.is_empty() && !self.prefetch_batch(&batch) {
                return;
            }
        }
    }

    /// Waits for on-demand reads to finish, then fetches `batch`. Returns
    /// false if asked to stop.
    fn prefetch_batch(&self, batch: &BTreeSet<FrameKey>) -> bool {
        {
            let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
            while *demand > 0 && !self.stop.load(Ordering::Relaxed) {
                demand = self.idle.wait(demand).unwrap_or_else(|e| e.into_inner());
            }
        }
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        for (key, r) in self.fetch(batch, false) {
            if let Err(e) = r {
                tracing::warn!(blob = %self.blob_name(key.0), offset = key.1, error = %e, "prefetch failed for a frame");
            }
        }
        true
    }
}

/// One ranged backend request covering whole frames.
#[derive(Debug, Clone)]
struct FetchRange {
    blob: usize,
    start: u64,
    end: u64,
    /// Frames fetched along (readahead), registered as in flight.
    ahead: Vec<(u64, Arc<Flight>)>,
    frames: Vec<u64>,
}
