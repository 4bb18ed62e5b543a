//! An opened image: manifest, verified bootstrap, lazily fetched and
//! verified chunk tables, and verified chunk reads.

use std::sync::{Arc, Mutex, OnceLock};

use darter_format::blob::{ChunkRecord, ChunkTable};
use darter_format::bootstrap::{BlobEntry, Bootstrap};
use darter_format::erofs::Inode;
use darter_format::erofs::ondisk::ChunkIndex;
use darter_format::oci as media;
use darter_oci::{ImageManifest, OciDigest};

use crate::error::ImageError;
use crate::source::BlobSource;

/// Bootstraps larger than this (uncompressed) are refused.
const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;
/// Decompressed frames kept for sequential readers (frames pack small files).
const FRAME_CACHE_ENTRIES: usize = 8;

/// Where a chunk of a file lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    /// Index into the bootstrap's blob table (device id - 1).
    pub blob: usize,
    /// Index into that blob's chunk table.
    pub index: usize,
}

type FrameKey = (usize, u64);

/// An opened Darter image.
pub struct Image<S> {
    manifest_digest: OciDigest,
    manifest: ImageManifest,
    bootstrap: Bootstrap<Vec<u8>>,
    bootstrap_stored_size: u64,
    source: S,
    tables: Vec<OnceLock<ChunkTable>>,
    /// Held while a table is fetched, so concurrent first readers fetch it once.
    table_fetch: Mutex<()>,
    frames: Mutex<Vec<(FrameKey, Arc<Vec<u8>>)>>,
}

impl<S> std::fmt::Debug for Image<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("manifest", &self.manifest_digest)
            .finish_non_exhaustive()
    }
}

impl<S: BlobSource> Image<S> {
    /// Opens an image from its manifest: fetches the bootstrap, checks it
    /// against the manifest's digest, and checks that the manifest lists
    /// every blob the bootstrap uses.
    pub fn open(
        manifest_digest: OciDigest,
        manifest: ImageManifest,
        source: S,
    ) -> Result<Self, ImageError> {
        let bad = |detail: String| ImageError::Manifest {
            digest: manifest_digest.to_string(),
            detail,
        };
        let boot_desc = manifest
            .layers()
            .iter()
            .rfind(|l| media::is_bootstrap_media_type(l.media_type().as_ref()))
            .ok_or_else(|| {
                bad(format!(
                    "no layer of type {}: not a Darter image (convert it with `darter build`)",
                    media::MEDIA_TYPE_BOOTSTRAP
                ))
            })?
            .clone();
        let boot_digest = darter_oci::descriptor_digest(&boot_desc)?;
        let stored = source.read_range(&boot_digest, 0, boot_desc.size())?;
        let actual = OciDigest::of(&stored);
        if actual != boot_digest {
            return Err(ImageError::BootstrapDigest {
                expected: boot_digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let raw = decompress_bootstrap(&stored)
            .map_err(|d| bad(format!("bootstrap {boot_digest}: {d}")))?;
        let bootstrap = Bootstrap::open(raw).map_err(|source| ImageError::Bootstrap {
            digest: boot_digest.to_string(),
            source,
        })?;
        for blob in &bootstrap.info().blobs {
            let listed = manifest
                .layers()
                .iter()
                .any(|l| l.digest().to_string() == blob.oci_digest() && l.size() == blob.blob_size);
            if !listed {
                return Err(bad(format!(
                    "bootstrap uses blob {} ({} bytes), which the manifest does not list",
                    blob.oci_digest(),
                    blob.blob_size
                )));
            }
        }
        let tables = bootstrap
            .info()
            .blobs
            .iter()
            .map(|_| OnceLock::new())
            .collect();
        Ok(Image {
            manifest_digest,
            manifest,
            bootstrap,
            bootstrap_stored_size: boot_desc.size(),
            source,
            tables,
            table_fetch: Mutex::new(()),
            frames: Mutex::new(Vec::new()),
        })
    }

    /// The manifest's digest.
    pub fn manifest_digest(&self) -> &OciDigest {
        &self.manifest_digest
    }

    /// The manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// The bootstrap.
    pub fn bootstrap(&self) -> &Bootstrap<Vec<u8>> {
        &self.bootstrap
    }

    /// Size of the bootstrap as stored (compressed).
    pub fn bootstrap_stored_size(&self) -> u64 {
        self.bootstrap_stored_size
    }

    /// The blob source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The blobs, in device order.
    pub fn blobs(&self) -> &[BlobEntry] {
        &self.bootstrap.info().blobs
    }

    /// The chunk table of blob `blob`, fetched (one ranged read of the
    /// blob's tail) and verified on first use.
    pub fn chunk_table(&self, blob: usize) -> Result<&ChunkTable, ImageError> {
        if let Some(t) = self.tables[blob].get() {
            return Ok(t);
        }
        let _fetching = self.table_fetch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.tables[blob].get() {
            return Ok(t);
        }
        let entry = &self.blobs()[blob];
        let digest = blob_digest(entry);
        let range = entry.tail_range();
        let tail = self
            .source
            .read_range(&digest, range.start, range.end - range.start)?;
        let table = entry
            .decode_tail(&tail)
            .map_err(|source| ImageError::Blob {
                digest: digest.to_string(),
                source,
            })?;
        Ok(self.tables[blob].get_or_init(|| table))
    }

    /// Finds the chunk an EROFS chunk index points at.
    pub fn locate(&self, idx: ChunkIndex) -> Result<ChunkLocation, ImageError> {
        let blob = usize::from(idx.device_id)
            .checked_sub(1)
            .filter(|&b| b < self.blobs().len())
            .ok_or_else(|| ImageError::NoSuchChunk {
                device: idx.device_id,
                digest: "(no such device)".into(),
                blkaddr: idx.blkaddr,
            })?;
        let table = self.chunk_table(blob)?;
        let index = table
            .find(idx.blkaddr)
            .ok_or_else(|| ImageError::NoSuchChunk {
                device: idx.device_id,
                digest: self.blobs()[blob].oci_digest(),
                blkaddr: idx.blkaddr,
            })?;
        Ok(ChunkLocation { blob, index })
    }

    /// The record of a located chunk.
    pub fn record(&self, loc: ChunkLocation) -> Result<ChunkRecord, ImageError> {
        Ok(self.chunk_table(loc.blob)?.records()[loc.index])
    }

    /// Reads one chunk: fetches its frame, decompresses it and verifies the
    /// chunk's digest. Returns exactly the chunk's bytes.
    pub fn read_chunk(&self, loc: ChunkLocation) -> Result<Vec<u8>, ImageError> {
        let table = self.chunk_table(loc.blob)?;
        let record = table.records()[loc.index];
        let frame = self.frame(loc.blob, &record, loc.index)?;
        let chunk = &frame[record.range_in_frame()];
        let expected = table.digest(loc.index);
        if !expected.matches(chunk) {
            self.forget_frame(loc.blob, record.compressed_offset);
            return Err(ImageError::ChunkDigest {
                digest: self.blobs()[loc.blob].oci_digest(),
                index: loc.index,
                offset: record.compressed_offset,
                expected: expected.to_string(),
                actual: expected.algo().digest(chunk).to_string(),
            });
        }
        Ok(chunk.to_vec())
    }

    /// Reads chunk `chunk_no` of a regular file: its bytes (exactly the
    /// file's bytes in that chunk), or `None` for a hole.
    pub fn read_file_chunk(
        &self,
        inode: &Inode,
        chunk_no: u64,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        let erofs = self.bootstrap.erofs();
        let idx = erofs.chunk_index(inode, chunk_no)?;
        if idx.is_hole() {
            return Ok(None);
        }
        let loc = self.locate(idx)?;
        let data = self.read_chunk(loc)?;
        let chunk_size = self.bootstrap.chunk_size();
        let needed = (inode.size - chunk_no * chunk_size).min(chunk_size);
        if data.len() as u64 != needed {
            return Err(ImageError::ChunkSize {
                digest: self.blobs()[loc.blob].oci_digest(),
                index: loc.index,
                size: data.len() as u32,
                needed,
            });
        }
        Ok(Some(data))
    }

    fn frame(
        &self,
        blob: usize,
        record: &ChunkRecord,
        index: usize,
    ) -> Result<Arc<Vec<u8>>, ImageError> {
        let key = (blob, record.compressed_offset);
        if let Some(f) = self.cached_frame(key) {
            return Ok(f);
        }
        let entry = &self.blobs()[blob];
        let digest = blob_digest(entry);
        let stored = self.source.read_range(
            &digest,
            record.compressed_offset,
            u64::from(record.compressed_size),
        )?;
        let frame = darter_format::compress::decompress(
            record.compression,
            &stored,
            record.frame_size as usize,
        )
        .map_err(|source| ImageError::Decompress {
            digest: digest.to_string(),
            index,
            offset: record.compressed_offset,
            source,
        })?;
        let frame = Arc::new(frame);
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if frames.len() >= FRAME_CACHE_ENTRIES {
            frames.remove(0);
        }
        frames.push((key, frame.clone()));
        Ok(frame)
    }

    fn cached_frame(&self, key: FrameKey) -> Option<Arc<Vec<u8>>> {
        let frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        frames
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f.clone())
    }

    fn forget_frame(&self, blob: usize, offset: u64) {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        frames.retain(|(k, _)| *k != (blob, offset));
    }
}

/// The OCI digest of a blob table entry.
pub(crate) fn blob_digest(entry: &BlobEntry) -> OciDigest {
    OciDigest::from_bytes(entry.blob_digest)
}

fn decompress_bootstrap(stored: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(stored).map_err(|e| e.to_string())?;
    std::io::Read::read_to_end(
        &mut std::io::Read::take(decoder, MAX_BOOTSTRAP_SIZE + 1),
        &mut out,
    )
    .map_err(|e| format!("zstd: {e}"))?;
    if out.len() as u64 > MAX_BOOTSTRAP_SIZE {
        return Err(format!(
            "decompresses to more than {MAX_BOOTSTRAP_SIZE} bytes"
        ));
    }
    Ok(out)
}
