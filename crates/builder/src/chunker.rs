//! Turns file contents into chunks: hashing, hole detection and dedup on
//! the calling thread (cheap, and order-dependent for determinism), frame
//! compression on worker threads, and in-order blob writing on a writer
//! thread. Memory stays bounded: at most a few frames are in flight.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use darter_format::DigestAlgo;

pub use crate::sink::BlobSink;
use darter_format::blob::{BlobSummary, BlobWriter, Frame, FramePacker};
use darter_format::compress::{Compression, Compressor};
use darter_format::erofs::ondisk::ChunkIndex;
use darter_format::tree::FileData;

/// Largest regular file accepted (16 TiB): beyond what any image holds, and
/// a cap on what a hostile archive header can make the builder read.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// How chunks are cut, hashed and compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSettings {
    /// Chunk size (a power of two, 4 KiB to 16 MiB).
    pub chunk_size: u32,
    /// Small chunks are packed into frames of up to this many bytes.
    pub frame_size: u32,
    /// Codec for frames.
    pub compression: Compression,
    /// zstd level.
    pub level: i32,
    /// Chunk digest algorithm.
    pub digest: DigestAlgo,
    /// Compression threads.
    pub jobs: usize,
}

/// Counters of what chunking did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    /// Non-hole chunk references made by files.
    pub chunk_refs: u64,
    /// Uncompressed bytes of those references.
    pub chunk_ref_bytes: u64,
    /// References satisfied by a chunk already present (this build or the parent).
    pub deduped: u64,
    /// Bytes of deduplicated references.
    pub deduped_bytes: u64,
    /// New chunks written.
    pub new_chunks: u64,
    /// Uncompressed bytes of new chunks.
    pub new_bytes: u64,
    /// Compressed bytes of new frames.
    pub stored_bytes: u64,
    /// File bytes that are holes (all-zero chunks).
    pub hole_bytes: u64,
}

struct Job {
    seq: u64,
    frame: Frame,
}

type Done = io::Result<(u64, Frame, Compression, Vec<u8>)>;

/// A blob written to its end, not yet committed.
type FinishedBlob = (Box<dyn BlobSink>, BlobSummary);

/// One blob being written.
struct BlobBuilder {
    device_id: u16,
    packer: FramePacker,
    backend: Backend,
    chunks: u64,
}

/// Where sealed frames go: compressed right here (one job: no thread
/// hand-offs, the fastest on one core), or by a pool of workers feeding a
/// writer thread that restores their order.
enum Backend {
    Inline {
        compressor: Compressor,
        writer: BlobWriter<Box<dyn BlobSink>>,
    },
    Pool(Pool),
}

struct Pool {
    seq: u64,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    end: Option<Sender<u64>>,
    writer: Option<JoinHandle<io::Result<FinishedBlob>>>,
}

impl BlobBuilder {
    fn start(device_id: u16, sink: Box<dyn BlobSink>, s: &ChunkSettings) -> io::Result<Self> {
        let writer = BlobWriter::new(sink, s.digest, s.chunk_size);
        let backend = if s.jobs <= 1 {
            Backend::Inline {
                compressor: Compressor::new(s.compression, s.level)?,
                writer,
            }
        } else {
            Backend::Pool(Pool::start(writer, s)?)
        };
        Ok(BlobBuilder {
            device_id,
            packer: FramePacker::new(s.frame_size),
            backend,
            chunks: 0,
        })
    }

    fn add(&mut self, data: &[u8], digest: [u8; 32]) -> io::Result<ChunkIndex> {
        let (blkaddr, sealed) = self.packer.push(data, digest).map_err(io::Error::other)?;
        for frame in sealed {
            self.backend.submit(frame)?;
        }
        self.chunks += 1;
        Ok(ChunkIndex {
            device_id: self.device_id,
            blkaddr,
        })
    }

    fn finish(mut self) -> io::Result<(Box<dyn BlobSink>, BlobSummary)> {
        let (last, size) = self.packer.finish();
        if let Some(frame) = last {
            self.backend.submit(frame)?;
        }
        match self.backend {
            Backend::Inline { writer, .. } => writer.finish(size),
            Backend::Pool(pool) => pool.finish(size),
        }
    }
}

impl Backend {
    fn submit(&mut self, frame: Frame) -> io::Result<()> {
        match self {
            Backend::Inline { compressor, writer } => {
                let (c, stored) = compressor.compress(&frame.data)?;
                writer.write_frame(&frame, c, &stored)
            }
            Backend::Pool(pool) => pool.submit(frame),
        }
    }
}

impl Pool {
    fn start(writer: BlobWriter<Box<dyn BlobSink>>, s: &ChunkSettings) -> io::Result<Self> {
        let (job_tx, job_rx) = bounded::<Job>(s.jobs * 2);
        let (done_tx, done_rx) = bounded::<Done>(s.jobs * 2);
        let mut workers = Vec::with_capacity(s.jobs);
        for _ in 0..s.jobs {
            let mut compressor = Compressor::new(s.compression, s.level)?;
            let (rx, tx) = (job_rx.clone(), done_tx.clone());
            workers.push(std::thread::spawn(move || {
                for Job { seq, frame } in rx {
                    let done = compressor
                        .compress(&frame.data)
                        .map(|(c, stored)| (seq, frame, c, stored));
                    if tx.send(done).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(done_tx);
        let (end_tx, end_rx) = bounded::<u64>(1);
        let writer = std::thread::spawn(move || write_in_order(writer, done_rx, &end_rx));
        Ok(Pool {
            seq: 0,
            jobs: Some(job_tx),
            workers,
            end: Some(end_tx),
            writer: Some(writer),
        })
    }

    fn submit(&mut self, frame: Frame) -> io::Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("blob already finished"))?;
        tx.send(Job { seq, frame })
            .map_err(|_| io::Error::other("compression workers stopped"))
    }

    fn finish(mut self, size: u64) -> io::Result<(Box<dyn BlobSink>, BlobSummary)> {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            w.join()
                .map_err(|_| io::Error::other("compression worker panicked"))?;
        }
        // The writer may have stopped early on an error; its result says why.
        if let Some(end) = self.end.take() {
            let _ = end.send(size);
        }
        self.writer
            .take()
            .ok_or_else(|| io::Error::other("blob already finished"))?
            .join()
            .map_err(|_| io::Error::other("blob writer panicked"))?
    }
}

impl Drop for Pool {
    /// A blob dropped unfinished (the build failed): stops the threads and
    /// waits for them, so that the writer drops its sink, which discards
    /// the upload, before the process can exit and leave it behind.
    fn drop(&mut self) {
        drop(self.jobs.take());
        drop(self.end.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_in_order(
    mut writer: BlobWriter<Box<dyn BlobSink>>,
    done: Receiver<Done>,
    end: &Receiver<u64>,
) -> io::Result<(Box<dyn BlobSink>, BlobSummary)> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let mut failure = None;
    for result in done {
        match result {
            Ok((seq, frame, c, stored)) => {
                pending.insert(seq, (frame, c, stored));
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
        while let Some((frame, c, stored)) = pending.remove(&next) {
            if failure.is_none()
                && let Err(e) = writer.write_frame(&frame, c, &stored)
            {
                failure = Some(e);
            }
            next += 1;
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let size = end
        .recv()
        .map_err(|_| io::Error::other("blob size never arrived"))?;
    writer.finish(size)
}

/// Cuts files into chunks, deduplicates them and writes new ones into the
/// current blob.
pub struct Chunker {
    settings: ChunkSettings,
    known: HashMap<[u8; 32], ChunkIndex>,
    blob: Option<BlobBuilder>,
    stats: ChunkStats,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Chunker {
    /// A chunker with no known chunks.
    pub fn new(settings: ChunkSettings) -> Self {
        Chunker {
            settings,
            known: HashMap::new(),
            blob: None,
            stats: ChunkStats::default(),
            buf: Vec::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ChunkSettings {
        &self.settings
    }

    /// Counters so far.
    pub fn stats(&self) -> ChunkStats {
        self.stats
    }

    /// Declares a chunk that already exists (in a parent image), so equal
    /// chunks are referenced instead of stored.
    pub fn know(&mut self, digest: [u8; 32], at: ChunkIndex) {
        self.known.entry(digest).or_insert(at);
    }

    /// Starts a new blob, device `device_id`, written to `sink`.
    pub fn start_blob(&mut self, device_id: u16, sink: Box<dyn BlobSink>) -> io::Result<()> {
        if self.blob.is_some() {
            return Err(io::Error::other("a blob is already open"));
        }
        self.blob = Some(BlobBuilder::start(device_id, sink, &self.settings)?);
        Ok(())
    }

    /// Finishes the current blob. Returns the sink and summary, or `None`
    /// (and drops the sink) if no new chunk went into it.
    pub fn finish_blob(&mut self) -> io::Result<Option<(Box<dyn BlobSink>, BlobSummary)>> {
        let Some(blob) = self.blob.take() else {
            return Ok(None);
        };
        let had_chunks = blob.chunks > 0;
        let (sink, summary) = blob.finish()?;
        if !had_chunks {
            return Ok(None);
        }
        self.stats.stored_bytes += summary.trailer.table_offset;
        Ok(Some((sink, summary)))
    }

    /// Chunks one piece of a file (at most one chunk long).
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<ChunkIndex> {
        if data.iter().all(|&b| b == 0) {
            self.stats.hole_bytes += data.len() as u64;
            return Ok(ChunkIndex::HOLE);
        }
        self.stats.chunk_refs += 1;
        self.stats.chunk_ref_bytes += data.len() as u64;
        let digest = *self.settings.digest.digest(data).bytes();
        if let Some(&at) = self.known.get(&digest) {
            self.stats.deduped += 1;
            self.stats.deduped_bytes += data.len() as u64;
            return Ok(at);
        }
        let blob = self
            .blob
            .as_mut()
            .ok_or_else(|| io::Error::other("no blob is open"))?;
        let at = blob.add(data, digest)?;
        self.known.insert(digest, at);
        self.stats.new_chunks += 1;
        self.stats.new_bytes += data.len() as u64;
        Ok(at)
    }

    /// Chunks a whole file read sequentially from `reader` (`size` bytes).
    pub fn chunk_stream(&mut self, reader: &mut dyn Read, size: u64) -> io::Result<FileData> {
        if size > MAX_FILE_SIZE {
            return Err(io::Error::other(format!(
                "file of {size} bytes is larger than the {MAX_FILE_SIZE}-byte limit"
            )));
        }
        let chunk_size = u64::from(self.settings.chunk_size);
        // A declared size is not trusted for an allocation up front.
        let mut chunks = Vec::with_capacity(size.div_ceil(chunk_size).min(1 << 16) as usize);
        let mut buf = std::mem::take(&mut self.buf);
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk_size) as usize;
            buf.resize(n, 0);
            reader.read_exact(&mut buf)?;
            chunks.push(self.chunk(&buf)?);
            left -= n as u64;
        }
        self.buf = buf;
        Ok(FileData { size, chunks })
    }

    /// A chunk of the given length known to be all zeros (a hole in a sparse source).
    pub fn hole(&mut self, len: u64) -> ChunkIndex {
        self.stats.hole_bytes += len;
        ChunkIndex::HOLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn settings(jobs: usize) -> ChunkSettings {
        ChunkSettings {
            chunk_size: 64 << 10,
            frame_size: 16 << 10,
            compression: Compression::Zstd,
            level: 3,
            digest: DigestAlgo::Blake3,
            jobs,
        }
    }

    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl BlobSink for Shared {
        fn commit(self: Box<Self>) -> io::Result<(darter_oci::OciDigest, u64)> {
            let data = self.0.lock().unwrap();
            Ok((darter_oci::OciDigest::of(&data), data.len() as u64))
        }
    }
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(jobs: usize) -> (Vec<u8>, Vec<FileData>, ChunkStats) {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut c = Chunker::new(settings(jobs));
        c.start_blob(1, Box::new(Shared(out.clone()))).unwrap();
        let mut files = Vec::new();
        for i in 0..50u32 {
            let data: Vec<u8> = (0..(i * 3001)).map(|j| ((j ^ i) % 7) as u8).collect();
            files.push(c.chunk_stream(&mut &data[..], data.len() as u64).unwrap());
        }
        let dup: Vec<u8> = (0..(10 * 3001u32)).map(|j| ((j ^ 10) % 7) as u8).collect();
        files.push(c.chunk_stream(&mut &dup[..], dup.len() as u64).unwrap());
        files.push(
            c.chunk_stream(&mut &vec![0u8; 200_000][..], 200_000)
                .unwrap(),
        );
        assert!(c.finish_blob().unwrap().is_some());
        let bytes = out.lock().unwrap().clone();
        (bytes, files, c.stats())
    }

    #[test]
    fn output_is_identical_whatever_the_thread_count() {
        let (one, files1, stats1) = run(1);
        let (four, files4, stats4) = run(4);
        assert_eq!(one, four);
        assert_eq!(files1, files4);
        assert_eq!(stats1, stats4);
        // The duplicate file reuses the chunks of file 10; the zero file is all holes.
        assert_eq!(files1[50], files1[10]);
        assert!(files1[51].chunks.iter().all(|c| c.is_hole()));
        assert_eq!(stats1.hole_bytes, 200_000);
        assert!(stats1.deduped >= files1[10].chunks.len() as u64);
    }

    #[test]
    fn empty_blob_is_dropped() {
        let mut c = Chunker::new(settings(2));
        c.start_blob(1, Box::new(Shared(Default::default())))
            .unwrap();
        c.chunk_stream(&mut &[0u8; 10][..], 10).unwrap();
        assert!(c.finish_blob().unwrap().is_none());
    }
}
