//! Statistics about an image: its tree, chunks, blobs and dedup.

use std::collections::HashSet;

use darter_format::blob::BLOCK_BITS;
use darter_format::erofs::ondisk::mode;

use crate::error::ImageError;
use crate::image::{ChunkLocation, Image};
use crate::source::BlobSource;

/// Per-blob figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobStats {
    /// OCI digest.
    pub digest: String,
    /// Size of the blob file.
    pub size: u64,
    /// Compressed bytes of its frames.
    pub data_bytes: u64,
    /// Uncompressed bytes of its chunks.
    pub chunk_bytes: u64,
    /// Chunks in its table.
    pub chunks: u64,
    /// Of those, chunks this image's files use.
    pub chunks_used: u64,
}

/// Whole-image figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageStats {
    /// Manifest digest.
    pub manifest: String,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunk digest algorithm.
    pub digest: String,
    /// Regular files (hardlinks once).
    pub files: u64,
    /// Directories (root included).
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Devices, fifos, sockets.
    pub specials: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
    /// Bytes of those files that are holes.
    pub hole_bytes: u64,
    /// Chunk references from files.
    pub chunk_refs: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
    /// Uncompressed bytes of the distinct chunks.
    pub unique_chunk_bytes: u64,
    /// Compressed bytes of all blobs' frames.
    pub stored_bytes: u64,
    /// Sum of blob sizes (frames, tables, trailers).
    pub blob_bytes: u64,
    /// Bootstrap size as stored (compressed).
    pub bootstrap_bytes: u64,
    /// Bootstrap size uncompressed.
    pub bootstrap_raw_bytes: u64,
    /// Non-hole file bytes divided by unique chunk bytes.
    pub dedup_ratio: f64,
    /// Unique chunk bytes divided by stored bytes.
    pub compression_ratio: f64,
    /// Per blob.
    pub blobs: Vec<BlobStats>,
}

/// Gathers [`ImageStats`]; reads the bootstrap and every chunk table, no chunk data.
pub fn inspect<S: BlobSource>(image: &Image<S>) -> Result<ImageStats, ImageError> {
    let erofs = image.bootstrap().erofs();
    let mut s = ImageStats {
        manifest: image.manifest_digest().to_string(),
        chunk_size: image.bootstrap().chunk_size(),
        digest: image.bootstrap().info().digest_algo.to_string(),
        dirs: 1,
        bootstrap_bytes: image.bootstrap_stored_size(),
        bootstrap_raw_bytes: erofs.size(),
        ..ImageStats::default()
    };
    let mut used: HashSet<ChunkLocation> = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut failure = None;
    erofs.walk(&mut |_, _, inode| {
        match inode.mode & mode::S_IFMT {
            mode::S_IFDIR => s.dirs += 1,
            mode::S_IFLNK => s.symlinks += 1,
            mode::S_IFREG if seen_files.insert(inode.nid) => {
                s.files += 1;
                s.file_bytes += inode.size;
                if inode.size == 0 {
                    return Ok(());
                }
                for n in 0..inode.chunk_count(BLOCK_BITS) {
                    let idx = erofs.chunk_index(inode, n)?;
                    let len = (inode.size - n * s.chunk_size).min(s.chunk_size);
                    if idx.is_hole() {
                        s.hole_bytes += len;
                        continue;
                    }
                    s.chunk_refs += 1;
                    match image.locate(idx) {
                        Ok(loc) => {
                            used.insert(loc);
                        }
                        Err(e) => failure = Some(e),
                    }
                }
            }
            mode::S_IFREG => {}
            _ => s.specials += 1,
        }
        Ok(())
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    for (blob, entry) in image.blobs().iter().enumerate() {
        let table = image.chunk_table(blob)?;
        let mut b = BlobStats {
            digest: entry.oci_digest(),
            size: entry.blob_size,
            data_bytes: entry.trailer.table_offset,
            chunk_bytes: 0,
            chunks: table.records().len() as u64,
            chunks_used: 0,
        };
        for (index, r) in table.records().iter().enumerate() {
            b.chunk_bytes += u64::from(r.size);
            if used.contains(&ChunkLocation { blob, index }) {
                b.chunks_used += 1;
                s.unique_chunks += 1;
                s.unique_chunk_bytes += u64::from(r.size);
            }
        }
        s.stored_bytes += b.data_bytes;
        s.blob_bytes += b.size;
        s.blobs.push(b);
    }
    s.dedup_ratio = ratio(s.file_bytes - s.hole_bytes, s.unique_chunk_bytes);
    s.compression_ratio = ratio(s.unique_chunk_bytes, s.stored_bytes);
    Ok(s)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}
