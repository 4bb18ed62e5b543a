//! Errors reading images.

use darter_format::blob::BlobError;
use darter_format::bootstrap::BootstrapError;
use darter_format::compress::DecompressError;
use darter_format::erofs::ReadError;

use crate::source::SourceError;

/// Everything that can go wrong opening or reading an image. Variants name
/// the blob (by digest), chunk and offset involved.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The OCI layout could not be read.
    #[error(transparent)]
    Layout(#[from] darter_oci::LayoutError),
    /// The manifest is not that of a Darter image or is inconsistent.
    #[error("manifest {digest}: {detail}")]
    Manifest {
        /// Manifest digest.
        digest: String,
        /// What is wrong.
        detail: String,
    },
    /// The bootstrap does not match the manifest's digest.
    #[error("bootstrap {expected} does not match its digest (read {actual})")]
    BootstrapDigest {
        /// Digest the manifest records.
        expected: String,
        /// Digest of the bytes read.
        actual: String,
    },
    /// The bootstrap is malformed.
    #[error("bootstrap {digest}: {source}")]
    Bootstrap {
        /// Its digest.
        digest: String,
        /// The problem.
        source: BootstrapError,
    },
    /// EROFS metadata is malformed.
    #[error("bootstrap metadata: {0}")]
    Metadata(#[from] ReadError),
    /// A blob's trailer or chunk table is bad.
    #[error("blob {digest}: {source}")]
    Blob {
        /// The blob.
        digest: String,
        /// The problem.
        source: BlobError,
    },
    /// Reading blob bytes failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An EROFS chunk index points at no chunk.
    #[error("blob {digest} has no chunk at block {blkaddr} (device {device})")]
    NoSuchChunk {
        /// Device id.
        device: u16,
        /// The blob.
        digest: String,
        /// Block address.
        blkaddr: u32,
    },
    /// A frame failed to decompress.
    #[error("blob {digest}, chunk {index} (frame at offset {offset}): {source}")]
    Decompress {
        /// The blob.
        digest: String,
        /// Chunk index in the table.
        index: usize,
        /// Frame offset in the blob.
        offset: u64,
        /// The codec error.
        source: DecompressError,
    },
    /// A chunk's bytes do not match its digest.
    #[error(
        "blob {digest}, chunk {index} (frame at offset {offset}): digest mismatch, expected {expected}, got {actual}"
    )]
    ChunkDigest {
        /// The blob.
        digest: String,
        /// Chunk index in the table.
        index: usize,
        /// Frame offset in the blob.
        offset: u64,
        /// Recorded digest.
        expected: String,
        /// Digest of the bytes.
        actual: String,
    },
    /// A file's chunk is shorter or longer than the file needs.
    #[error("blob {digest}, chunk {index}: {size} bytes where the file needs {needed}")]
    ChunkSize {
        /// The blob.
        digest: String,
        /// Chunk index.
        index: usize,
        /// Chunk size recorded.
        size: u32,
        /// Bytes the file needs.
        needed: u64,
    },
    /// An error about a specific file.
    #[error("{path}: {source}")]
    File {
        /// Path in the image.
        path: String,
        /// The problem.
        source: Box<ImageError>,
    },
    /// Local I/O (writing an unpacked tree or export).
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ImageError {
    /// Wraps this error with the image path of the file it concerns.
    pub fn in_file(self, path: &[u8]) -> ImageError {
        ImageError::File {
            path: String::from_utf8_lossy(path).into_owned(),
            source: Box::new(self),
        }
    }
}
