//! The bootstrap: an EROFS image of the merged tree whose first 1024 bytes
//! (unused by EROFS) hold Darter's header, and whose tail holds the blob
//! table: for every blob (EROFS extra device) its OCI digest, sizes, and the
//! digest of its chunk table.

use crate::ReadAt;
use crate::blob::{BLOB_TRAILER_SIZE, BLOCK_BITS, BLOCK_SIZE, BlobSummary, BlobTrailer};
use crate::compress::Compression;
use crate::digest::{Digest, DigestAlgo};
use crate::erofs::ondisk::{DeviceSlot, SUPER_OFFSET};
use crate::erofs::{self, Erofs, ReadError, WriteError};
use crate::le::{Fields, FieldsMut};
use crate::tree::Tree;

/// ON-DISK: bootstrap header magic at offset 0.
pub const BOOTSTRAP_MAGIC: [u8; 8] = *b"DARTERBS";
/// ON-DISK: bootstrap format version written by this code.
pub const BOOTSTRAP_VERSION: u32 = 1;
/// ON-DISK: size of the header area (EROFS starts its superblock here).
pub const HEADER_SIZE: usize = 64;
/// ON-DISK: size of the blob table's own header.
pub const EXT_HEADER_SIZE: usize = 16;
/// ON-DISK: size of one blob table entry.
pub const BLOB_ENTRY_SIZE: usize = 128;

/// Errors opening a bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The EROFS part is bad.
    #[error(transparent)]
    Erofs(#[from] ReadError),
    /// The Darter header or blob table is bad.
    #[error("bad Darter bootstrap header: {0}")]
    BadHeader(String),
    /// A blob table entry is inconsistent.
    #[error("blob table entry {index} is invalid: {detail}")]
    BadBlobEntry {
        /// Index (device id - 1).
        index: usize,
        /// What is wrong.
        detail: String,
    },
}

/// What the bootstrap records about one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    /// sha256 of the whole blob: its OCI descriptor digest.
    pub blob_digest: [u8; 32],
    /// Size of the blob file.
    pub blob_size: u64,
    /// The blob's trailer, as it must appear at the blob's end.
    pub trailer: BlobTrailer,
}

impl BlobEntry {
    /// The entry for a blob just written.
    pub fn new(blob_sha256: [u8; 32], summary: &BlobSummary) -> Self {
        BlobEntry {
            blob_digest: blob_sha256,
            blob_size: summary.blob_size,
            trailer: summary.trailer,
        }
    }

    /// `sha256:<hex>`, the blob's OCI digest.
    pub fn oci_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.blob_digest))
    }

    /// The byte range a reader fetches to map the blob: chunk table and trailer.
    pub fn tail_range(&self) -> std::ops::Range<u64> {
        self.trailer.table_offset..self.blob_size
    }

    /// Decodes the chunk table from the bytes of [`Self::tail_range`],
    /// checking that the trailer is the one the bootstrap recorded and the
    /// table matches its digest.
    pub fn decode_tail(
        &self,
        tail: &[u8],
    ) -> Result<crate::blob::ChunkTable, crate::blob::BlobError> {
        let want = (self.blob_size - self.trailer.table_offset) as usize;
        if tail.len() != want {
            return Err(crate::blob::BlobError::Truncated {
                what: "chunk table and trailer",
                needed: self.blob_size,
                len: self.trailer.table_offset + tail.len() as u64,
            });
        }
        let (table, trailer) = tail.split_at(want - BLOB_TRAILER_SIZE);
        if trailer != self.trailer.encode() {
            return Err(crate::blob::BlobError::BadField {
                field: "trailer",
                detail: "differs from the trailer recorded in the bootstrap".into(),
            });
        }
        self.trailer.decode_table(table)
    }

    fn encode(&self, out: &mut [u8]) {
        let t = &self.trailer;
        let mut f = FieldsMut(out);
        f.bytes(0, &self.blob_digest);
        f.u64(32, self.blob_size);
        f.u64(40, t.uncompressed_size);
        f.u64(48, t.chunk_count);
        f.u64(56, t.table_offset);
        f.u64(64, t.table_stored_size);
        f.u64(72, t.table_size);
        f.u8(80, t.table_compression.code());
        f.u8(81, t.table_digest.algo().code());
        f.u8(82, t.chunk_size_bits);
        f.bytes(88, t.table_digest.bytes());
    }

    fn decode(raw: &[u8], index: usize) -> Result<Self, BootstrapError> {
        let f = Fields(raw);
        let bad = |detail: String| BootstrapError::BadBlobEntry { index, detail };
        let table_compression = Compression::from_code(f.u8(80))
            .ok_or_else(|| bad(format!("unknown table compression {}", f.u8(80))))?;
        let algo = DigestAlgo::from_code(f.u8(81))
            .ok_or_else(|| bad(format!("unknown digest algorithm {}", f.u8(81))))?;
        if !f.is_zero(83..88) || !f.is_zero(120..128) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let entry = BlobEntry {
            blob_digest: f.array(0),
            blob_size: f.u64(32),
            trailer: BlobTrailer {
                uncompressed_size: f.u64(40),
                chunk_count: f.u64(48),
                table_offset: f.u64(56),
                table_stored_size: f.u64(64),
                table_size: f.u64(72),
                table_compression,
                chunk_size_bits: f.u8(82),
                table_digest: Digest::new(algo, f.array(88)),
            },
        };
        // Round-trip through the trailer codec to apply all of its checks.
        BlobTrailer::decode(&entry.trailer.encode(), entry.blob_size)
            .map_err(|e| bad(e.to_string()))?;
        Ok(entry)
    }

    fn device_slot(&self) -> DeviceSlot {
        let mut tag = [0u8; 64];
        tag.copy_from_slice(hex::encode(self.blob_digest).as_bytes());
        DeviceSlot {
            tag,
            blocks: (self.trailer.uncompressed_size >> BLOCK_BITS) as u32,
            mapped_blkaddr: 0,
        }
    }
}

/// Image-wide parameters recorded in the bootstrap header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapInfo {
    /// Digest algorithm of every chunk.
    pub digest_algo: DigestAlgo,
    /// log2 of the chunk size.
    pub chunk_size_bits: u8,
    /// Blobs in device order: entry `i` is EROFS device `i + 1`.
    pub blobs: Vec<BlobEntry>,
}

/// Writes a bootstrap for `tree`, whose chunk indexes refer to `info.blobs`.
pub fn write_bootstrap(
    tree: &Tree,
    info: &BootstrapInfo,
    build_time: u64,
) -> Result<Vec<u8>, WriteError> {
    let mut extra = vec![0u8; EXT_HEADER_SIZE + BLOB_ENTRY_SIZE * info.blobs.len()];
    {
        let mut f = FieldsMut(&mut extra);
        f.u32(0, info.blobs.len() as u32);
        f.u32(4, BLOB_ENTRY_SIZE as u32);
    }
    for (i, blob) in info.blobs.iter().enumerate() {
        let at = EXT_HEADER_SIZE + i * BLOB_ENTRY_SIZE;
        blob.encode(&mut extra[at..at + BLOB_ENTRY_SIZE]);
    }
    let extra_len = extra.len() as u64;
    let opts = erofs::ImageOptions {
        chunk_bits: info.chunk_size_bits,
        build_time,
        devices: info.blobs.iter().map(BlobEntry::device_slot).collect(),
        extra,
    };
    let mut image = erofs::write_image(tree, &opts)?;
    let mut f = FieldsMut(&mut image.bytes[..HEADER_SIZE]);
    f.bytes(0, &BOOTSTRAP_MAGIC);
    f.u32(8, BOOTSTRAP_VERSION);
    f.u64(16, image.extra_offset);
    f.u64(24, extra_len);
    f.u8(32, info.digest_algo.code());
    f.u8(33, info.chunk_size_bits);
    Ok(image.bytes)
}

/// An open bootstrap: the EROFS reader plus the blob table.
#[derive(Debug)]
pub struct Bootstrap<R> {
    erofs: Erofs<R>,
    info: BootstrapInfo,
}

impl<R: ReadAt> Bootstrap<R> {
    /// Opens and validates a bootstrap.
    pub fn open(r: R) -> Result<Self, BootstrapError> {
        let size = r.size();
        let bad = |m: String| BootstrapError::BadHeader(m);
        let mut header = [0u8; HEADER_SIZE];
        if size < HEADER_SIZE as u64 {
            return Err(bad(format!("{size} bytes is too short for a bootstrap")));
        }
        r.read_exact_at(&mut header, 0)
            .map_err(|source| ReadError::Io {
                offset: 0,
                len: HEADER_SIZE,
                source,
            })?;
        let f = Fields(&header);
        if f.array::<8>(0) != BOOTSTRAP_MAGIC {
            return Err(bad("wrong magic: not a Darter bootstrap".into()));
        }
        if f.u32(8) != BOOTSTRAP_VERSION {
            return Err(bad(format!(
                "version {} (this Darter reads {BOOTSTRAP_VERSION})",
                f.u32(8)
            )));
        }
        if f.u32(12) != 0 || !f.is_zero(34..HEADER_SIZE) {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        check_zero_padding(&r)?;
        let digest_algo = DigestAlgo::from_code(f.u8(32))
            .ok_or_else(|| bad(format!("digest algorithm {}", f.u8(32))))?;
        let chunk_size_bits = f.u8(33);
        if !(12..=24).contains(&chunk_size_bits) {
            return Err(bad(format!("chunk size bits {chunk_size_bits}")));
        }
        let (ext_offset, ext_size) = (f.u64(16), f.u64(24));
        let ext_fits = ext_offset
            .checked_add(ext_size)
            .is_some_and(|end| end <= size)
            && ext_size >= EXT_HEADER_SIZE as u64
            && ext_offset % u64::from(BLOCK_SIZE) == 0;
        if !ext_fits {
            return Err(bad(format!(
                "blob table at {ext_offset} of {ext_size} bytes does not fit"
            )));
        }
        let mut ext = vec![0u8; ext_size as usize];
        r.read_exact_at(&mut ext, ext_offset)
            .map_err(|source| ReadError::Io {
                offset: ext_offset,
                len: ext.len(),
                source,
            })?;
        let blobs = decode_blob_table(&ext, chunk_size_bits)?;
        let erofs = Erofs::open(r)?.with_uniform_chunk_bits(u32::from(chunk_size_bits));
        let info = BootstrapInfo {
            digest_algo,
            chunk_size_bits,
            blobs,
        };
        check_devices(&erofs, &info)?;
        Ok(Bootstrap { erofs, info })
    }

    /// The EROFS image.
    pub fn erofs(&self) -> &Erofs<R> {
        &self.erofs
    }

    /// Image parameters and blobs.
    pub fn info(&self) -> &BootstrapInfo {
        &self.info
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        1 << self.info.chunk_size_bits
    }
}

/// Bytes from the end of the header to the EROFS superblock are reserved:
/// they must be zero.
fn check_zero_padding<R: ReadAt>(r: &R) -> Result<(), BootstrapError> {
    let mut padding = [0u8; SUPER_OFFSET - HEADER_SIZE];
    r.read_exact_at(&mut padding, HEADER_SIZE as u64)
        .map_err(|source| ReadError::Io {
            offset: HEADER_SIZE as u64,
            len: padding.len(),
            source,
        })?;
    match padding.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(at) => Err(BootstrapError::BadHeader(format!(
            "reserved byte {} (between the header and the EROFS superblock) is not zero",
            HEADER_SIZE + at
        ))),
    }
}

fn decode_blob_table(ext: &[u8], chunk_size_bits: u8) -> Result<Vec<BlobEntry>, BootstrapError> {
    let f = Fields(ext);
    let (count, entry_size) = (f.u32(0) as usize, f.u32(4) as usize);
    let bad = |m: String| BootstrapError::BadHeader(m);
    if entry_size != BLOB_ENTRY_SIZE || !f.is_zero(8..16) {
        return Err(bad(format!("blob table entry size {entry_size}")));
    }
    if count
        .checked_mul(BLOB_ENTRY_SIZE)
        .map(|n| n + EXT_HEADER_SIZE)
        != Some(ext.len())
    {
        return Err(bad(format!(
            "blob table of {} bytes cannot hold {count} entries",
            ext.len()
        )));
    }
    (0..count)
        .map(|i| {
            let at = EXT_HEADER_SIZE + i * BLOB_ENTRY_SIZE;
            let entry = BlobEntry::decode(&ext[at..at + BLOB_ENTRY_SIZE], i)?;
            if entry.trailer.chunk_size_bits != chunk_size_bits {
                return Err(BootstrapError::BadBlobEntry {
                    index: i,
                    detail: format!(
                        "chunk size bits {} differ from the image's {chunk_size_bits}",
                        entry.trailer.chunk_size_bits
                    ),
                });
            }
            Ok(entry)
        })
        .collect()
}

fn check_devices<R: ReadAt>(erofs: &Erofs<R>, info: &BootstrapInfo) -> Result<(), BootstrapError> {
    let devices = erofs.devices();
    if devices.len() != info.blobs.len() {
        return Err(BootstrapError::BadHeader(format!(
            "{} EROFS devices but {} blobs",
            devices.len(),
            info.blobs.len()
        )));
    }
    for (index, (dev, blob)) in devices.iter().zip(&info.blobs).enumerate() {
        if *dev != blob.device_slot() {
            return Err(BootstrapError::BadBlobEntry {
                index,
                detail: "EROFS device slot disagrees with the blob table".into(),
            });
        }
    }
    Ok(())
}
