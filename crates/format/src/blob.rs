//! Blobs: compressed frames of chunks, followed by a chunk table and a
//! fixed-size trailer.
//!
//! A blob's *uncompressed address space* is the EROFS device the bootstrap
//! points into. Chunks sit in it at block-aligned addresses; consecutive
//! small chunks are packed into one *frame* (one compression unit) so small
//! files compress well, while a chunk of frame size or more is a frame of its
//! own. See `docs/format.md` for the normative layout.

use std::io::Write;
use std::ops::Range;

use crate::compress::{Compression, Compressor};
use crate::digest::{Digest, DigestAlgo};
use crate::le::{Fields, FieldsMut};

/// ON-DISK: EROFS block size, also the alignment of chunks in a blob's
/// uncompressed address space.
pub const BLOCK_SIZE: u32 = 4096;
/// ON-DISK: log2 of [`BLOCK_SIZE`].
pub const BLOCK_BITS: u8 = 12;
/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest allowed chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Chunk size used when none is given.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Frame span used when none is given: small chunks are packed up to this
/// many uncompressed bytes per compression unit.
pub const DEFAULT_FRAME_SIZE: u32 = 128 << 10;
/// ON-DISK: size of one chunk record.
pub const CHUNK_RECORD_SIZE: usize = 64;
/// ON-DISK: size of the blob trailer.
pub const BLOB_TRAILER_SIZE: usize = 128;
/// ON-DISK: offset of the trailer's self-checksum (a digest of the bytes
/// before it, with the table's digest algorithm).
const TRAILER_CHECKSUM_AT: usize = 96;
/// ON-DISK: blob trailer magic.
pub const BLOB_TRAILER_MAGIC: [u8; 8] = *b"DARTBLOB";
/// ON-DISK: blob format version written by this code.
pub const BLOB_VERSION: u32 = 1;
/// Upper bound on a stored chunk table, so a hostile trailer cannot make a
/// reader allocate without limit (64 Mi chunks of 4 KiB would be 256 TiB).
pub const MAX_TABLE_SIZE: u64 = 1 << 32;

/// Errors in blob trailers and chunk tables.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is shorter than its trailer or than the ranges it declares.
    #[error("blob is truncated: {what} needs bytes up to {needed}, blob has {len}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Offset one past the last byte needed.
        needed: u64,
        /// Actual blob length.
        len: u64,
    },
    /// The trailer magic is wrong: not a Darter blob.
    #[error("not a Darter blob: trailer magic is {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A field holds a value this version does not accept.
    #[error("blob {field} is invalid: {detail}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The stored chunk table does not match its digest.
    #[error("chunk table digest mismatch: recorded {expected}, computed {actual}")]
    TableDigest {
        /// Digest recorded by the trusted side.
        expected: Digest,
        /// Digest of the bytes read.
        actual: Digest,
    },
    /// The chunk table could not be decompressed.
    #[error("chunk table cannot be decompressed: {0}")]
    TableDecompress(#[from] crate::compress::DecompressError),
    /// A chunk record is inconsistent.
    #[error("chunk record {index} is invalid: {detail}")]
    BadRecord {
        /// Index in the table.
        index: usize,
        /// What is wrong.
        detail: String,
    },
}

/// Where one chunk lives: in its frame in the compressed blob and in the
/// blob's uncompressed address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Offset of the chunk's frame in the blob.
    pub compressed_offset: u64,
    /// Stored size of the frame.
    pub compressed_size: u32,
    /// Start of the chunk in the uncompressed address space, in blocks.
    pub blkaddr: u32,
    /// Length of the chunk in bytes.
    pub size: u32,
    /// Offset of the chunk inside its decompressed frame.
    pub frame_offset: u32,
    /// Decompressed length of the frame.
    pub frame_size: u32,
    /// How the frame is stored.
    pub compression: Compression,
    /// Digest of the chunk's uncompressed bytes (algorithm from the table).
    pub digest: [u8; 32],
}

impl ChunkRecord {
    /// Start of the chunk in the uncompressed address space, in bytes.
    pub fn uncompressed_offset(&self) -> u64 {
        u64::from(self.blkaddr) << BLOCK_BITS
    }

    /// Start of the chunk's frame in the uncompressed address space.
    pub fn frame_start(&self) -> u64 {
        self.uncompressed_offset() - u64::from(self.frame_offset)
    }

    /// Byte range of the chunk's frame in the blob.
    pub fn compressed_range(&self) -> Range<u64> {
        self.compressed_offset..self.compressed_offset + u64::from(self.compressed_size)
    }

    /// Byte range of the chunk inside its decompressed frame.
    pub fn range_in_frame(&self) -> Range<usize> {
        self.frame_offset as usize..(self.frame_offset + self.size) as usize
    }

    fn encode(&self, out: &mut [u8]) {
        let mut f = FieldsMut(out);
        f.u64(0, self.compressed_offset);
        f.u32(8, self.compressed_size);
        f.u32(12, self.blkaddr);
        f.u32(16, self.size);
        f.u32(20, self.frame_offset);
        f.u32(24, self.frame_size);
        f.u8(28, self.compression.code());
        f.bytes(32, &self.digest);
    }

    fn decode(raw: &[u8], index: usize) -> Result<Self, BlobError> {
        let f = Fields(raw);
        let bad = |detail: String| BlobError::BadRecord { index, detail };
        let compression = Compression::from_code(f.u8(28))
            .ok_or_else(|| bad(format!("unknown compression code {}", f.u8(28))))?;
        if !f.is_zero(29..32) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        Ok(ChunkRecord {
            compressed_offset: f.u64(0),
            compressed_size: f.u32(8),
            blkaddr: f.u32(12),
            size: f.u32(16),
            frame_offset: f.u32(20),
            frame_size: f.u32(24),
            compression,
            digest: f.array(32),
        })
    }
}

/// The decoded, validated chunk table of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkTable {
    algo: DigestAlgo,
    records: Vec<ChunkRecord>,
}

impl ChunkTable {
    /// The digest algorithm of every chunk in the table.
    pub fn algo(&self) -> DigestAlgo {
        self.algo
    }

    /// All records, sorted by uncompressed address.
    pub fn records(&self) -> &[ChunkRecord] {
        &self.records
    }

    /// The digest of record `index`.
    pub fn digest(&self, index: usize) -> Digest {
        Digest::new(self.algo, self.records[index].digest)
    }

    /// Index of the chunk that starts at block `blkaddr`, if any.
    pub fn find(&self, blkaddr: u32) -> Option<usize> {
        self.records
            .binary_search_by_key(&blkaddr, |r| r.blkaddr)
            .ok()
    }

    /// Indexes of the chunks in the frame stored at `compressed_offset`.
    /// (Validation guarantees frame offsets increase with record order.)
    pub fn frame_at(&self, compressed_offset: u64) -> Option<Range<usize>> {
        let start = self
            .records
            .partition_point(|r| r.compressed_offset < compressed_offset);
        let end = self
            .records
            .partition_point(|r| r.compressed_offset <= compressed_offset);
        (start < end).then_some(start..end)
    }

    /// Encodes the raw (uncompressed) table.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.records.len() * CHUNK_RECORD_SIZE];
        for (record, slot) in self
            .records
            .iter()
            .zip(out.chunks_exact_mut(CHUNK_RECORD_SIZE))
        {
            record.encode(slot);
        }
        out
    }

    /// Decodes and validates a raw table against the blob it belongs to:
    /// records sorted and disjoint in the address space, inside it, with
    /// frames inside the data area and consistent across their members.
    pub fn decode(
        raw: &[u8],
        algo: DigestAlgo,
        geometry: &BlobGeometry,
    ) -> Result<Self, BlobError> {
        if !raw.len().is_multiple_of(CHUNK_RECORD_SIZE) {
            return Err(BlobError::BadField {
                field: "table_size",
                detail: format!("{} is not a multiple of {CHUNK_RECORD_SIZE}", raw.len()),
            });
        }
        let records = raw
            .chunks_exact(CHUNK_RECORD_SIZE)
            .enumerate()
            .map(|(i, r)| ChunkRecord::decode(r, i))
            .collect::<Result<Vec<_>, _>>()?;
        let table = ChunkTable { algo, records };
        table.validate(geometry)?;
        Ok(table)
    }

    fn validate(&self, geometry: &BlobGeometry) -> Result<(), BlobError> {
        let mut prev_end = 0u64;
        for (index, r) in self.records.iter().enumerate() {
            let bad = |detail: String| BlobError::BadRecord { index, detail };
            let start = r.uncompressed_offset();
            let end = start + u64::from(r.size);
            if r.size == 0 || r.size > geometry.chunk_size {
                return Err(bad(format!(
                    "size {} outside 1..={}",
                    r.size, geometry.chunk_size
                )));
            }
            if start < prev_end {
                return Err(bad(format!(
                    "starts at {start}, overlapping the previous chunk ending at {prev_end}"
                )));
            }
            if end > geometry.uncompressed_size {
                return Err(bad(format!(
                    "ends at {end}, past the address space of {} bytes",
                    geometry.uncompressed_size
                )));
            }
            if r.frame_offset > r.frame_size
                || r.size > r.frame_size - r.frame_offset
                || u64::from(r.frame_offset) > start
                || r.frame_size > MAX_CHUNK_SIZE
            {
                return Err(bad(format!(
                    "lies outside its frame (offset {} + size {} > frame {})",
                    r.frame_offset, r.size, r.frame_size
                )));
            }
            if r.compression == Compression::None && r.compressed_size != r.frame_size {
                return Err(bad(
                    "raw frame whose stored and decompressed sizes differ".into()
                ));
            }
            // Checked: a wrapped end would pass the bound and leave an
            // inverted `compressed_range()` for readers to trip over.
            let frame_end = r
                .compressed_offset
                .checked_add(u64::from(r.compressed_size));
            if frame_end.is_none_or(|end| end > geometry.data_end) {
                return Err(bad(format!(
                    "frame at {} of {} bytes runs past the data area ending at {}",
                    r.compressed_offset, r.compressed_size, geometry.data_end
                )));
            }
            if index > 0 {
                let p = &self.records[index - 1];
                let same_frame = p.compressed_offset == r.compressed_offset;
                let consistent = p.compressed_size == r.compressed_size
                    && p.frame_size == r.frame_size
                    && p.compression == r.compression
                    && p.frame_start() == r.frame_start();
                if same_frame && !consistent {
                    return Err(bad("disagrees with the other chunks of its frame".into()));
                }
                if !same_frame && r.compressed_offset < p.compressed_range().end {
                    return Err(bad("frame overlaps the previous frame".into()));
                }
            }
            prev_end = end;
        }
        Ok(())
    }
}

/// The facts about a blob a chunk table is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobGeometry {
    /// Size of the uncompressed address space.
    pub uncompressed_size: u64,
    /// End of the frame data (where the chunk table starts).
    pub data_end: u64,
    /// Largest chunk allowed.
    pub chunk_size: u32,
}

/// The fixed-size record at the end of every blob: where its chunk table is
/// and what it hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobTrailer {
    /// Size of the uncompressed address space (a multiple of the block size).
    pub uncompressed_size: u64,
    /// Number of chunk records.
    pub chunk_count: u64,
    /// Offset of the stored chunk table (= end of the frame data).
    pub table_offset: u64,
    /// Stored (compressed) size of the chunk table.
    pub table_stored_size: u64,
    /// Raw size of the chunk table.
    pub table_size: u64,
    /// How the chunk table is stored.
    pub table_compression: Compression,
    /// Chunk size the blob was built with (log2).
    pub chunk_size_bits: u8,
    /// Digest of the stored chunk table bytes; its algorithm is also the
    /// algorithm of every chunk digest.
    pub table_digest: Digest,
}

impl BlobTrailer {
    /// Encodes the trailer.
    pub fn encode(&self) -> [u8; BLOB_TRAILER_SIZE] {
        let mut out = [0u8; BLOB_TRAILER_SIZE];
        let mut f = FieldsMut(&mut out);
        f.bytes(0, &BLOB_TRAILER_MAGIC);
        f.u32(8, BLOB_VERSION);
        f.u64(16, self.uncompressed_size);
        f.u64(24, self.chunk_count);
        f.u64(32, self.table_offset);
        f.u64(40, self.table_stored_size);
        f.u64(48, self.table_size);
        f.u8(56, self.table_compression.code());
        f.u8(57, self.table_digest.algo().code());
        f.u8(58, BLOCK_BITS);
        f.u8(59, self.chunk_size_bits);
        f.bytes(64, self.table_digest.bytes());
        let checksum = self.table_digest.algo().digest(&out[..TRAILER_CHECKSUM_AT]);
        out[TRAILER_CHECKSUM_AT..].copy_from_slice(checksum.bytes());
        out
    }

    /// Decodes and validates a trailer read from the last
    /// [`BLOB_TRAILER_SIZE`] bytes of a blob of `blob_size` bytes.
    pub fn decode(raw: &[u8], blob_size: u64) -> Result<Self, BlobError> {
        if raw.len() != BLOB_TRAILER_SIZE || blob_size < BLOB_TRAILER_SIZE as u64 {
            return Err(BlobError::Truncated {
                what: "trailer",
                needed: BLOB_TRAILER_SIZE as u64,
                len: blob_size.min(raw.len() as u64),
            });
        }
        let f = Fields(raw);
        let magic: [u8; 8] = f.array(0);
        if magic != BLOB_TRAILER_MAGIC {
            return Err(BlobError::BadMagic { found: magic });
        }
        let bad = |field: &'static str, detail: String| BlobError::BadField { field, detail };
        if f.u32(8) != BLOB_VERSION {
            return Err(bad(
                "version",
                format!("{} (this Darter reads version {BLOB_VERSION})", f.u32(8)),
            ));
        }
        let algo = DigestAlgo::from_code(f.u8(57))
            .ok_or_else(|| bad("digest_algo", format!("unknown code {}", f.u8(57))))?;
        let checksum = algo.digest(&raw[..TRAILER_CHECKSUM_AT]);
        if checksum.bytes()[..] != raw[TRAILER_CHECKSUM_AT..] {
            return Err(bad(
                "checksum",
                "trailer checksum mismatch (the trailer is corrupt)".into(),
            ));
        }
        if f.u32(12) != 0 || !f.is_zero(60..64) {
            return Err(bad("reserved", "reserved bytes are not zero".into()));
        }
        let table_compression = Compression::from_code(f.u8(56))
            .ok_or_else(|| bad("table_compression", format!("unknown code {}", f.u8(56))))?;
        if f.u8(58) != BLOCK_BITS {
            return Err(bad(
                "block_bits",
                format!("{} (expected {BLOCK_BITS})", f.u8(58)),
            ));
        }
        let chunk_size_bits = f.u8(59);
        if !(MIN_CHUNK_SIZE.trailing_zeros()..=MAX_CHUNK_SIZE.trailing_zeros())
            .contains(&u32::from(chunk_size_bits))
        {
            return Err(bad("chunk_size_bits", chunk_size_bits.to_string()));
        }
        let trailer = BlobTrailer {
            uncompressed_size: f.u64(16),
            chunk_count: f.u64(24),
            table_offset: f.u64(32),
            table_stored_size: f.u64(40),
            table_size: f.u64(48),
            table_compression,
            chunk_size_bits,
            table_digest: Digest::new(algo, f.array(64)),
        };
        trailer.validate(blob_size)?;
        Ok(trailer)
    }

    fn validate(&self, blob_size: u64) -> Result<(), BlobError> {
        let bad = |field: &'static str, detail: String| BlobError::BadField { field, detail };
        let expected_end = self
            .table_offset
            .checked_add(self.table_stored_size)
            .and_then(|end| end.checked_add(BLOB_TRAILER_SIZE as u64));
        if expected_end != Some(blob_size) {
            return Err(bad(
                "table_offset",
                format!(
                    "table at {} of {} bytes plus trailer does not end the {blob_size}-byte blob",
                    self.table_offset, self.table_stored_size
                ),
            ));
        }
        if !self.uncompressed_size.is_multiple_of(u64::from(BLOCK_SIZE)) {
            return Err(bad(
                "uncompressed_size",
                format!("{} is not block aligned", self.uncompressed_size),
            ));
        }
        if self.uncompressed_size >> BLOCK_BITS > u64::from(u32::MAX) {
            return Err(bad(
                "uncompressed_size",
                format!("{} exceeds 2^32 blocks", self.uncompressed_size),
            ));
        }
        let records = self.chunk_count.checked_mul(CHUNK_RECORD_SIZE as u64);
        if records != Some(self.table_size) || self.table_size > MAX_TABLE_SIZE {
            return Err(bad(
                "table_size",
                format!("{} for {} chunks", self.table_size, self.chunk_count),
            ));
        }
        if self.table_compression == Compression::None && self.table_stored_size != self.table_size
        {
            return Err(bad(
                "table_stored_size",
                "raw table with a different stored size".into(),
            ));
        }
        Ok(())
    }

    /// The geometry chunk records are validated against.
    pub fn geometry(&self) -> BlobGeometry {
        BlobGeometry {
            uncompressed_size: self.uncompressed_size,
            data_end: self.table_offset,
            chunk_size: 1 << self.chunk_size_bits,
        }
    }

    /// Checks the stored table bytes against the digest, decompresses and
    /// decodes them.
    pub fn decode_table(&self, stored: &[u8]) -> Result<ChunkTable, BlobError> {
        let actual = self.table_digest.algo().digest(stored);
        if actual != self.table_digest {
            return Err(BlobError::TableDigest {
                expected: self.table_digest,
                actual,
            });
        }
        let raw = crate::compress::decompress(
            self.table_compression,
            stored,
            usize::try_from(self.table_size).map_err(|_| BlobError::BadField {
                field: "table_size",
                detail: "does not fit in memory".into(),
            })?,
        )?;
        ChunkTable::decode(&raw, self.table_digest.algo(), &self.geometry())
    }
}

/// One chunk waiting to be written: its data and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedChunk {
    /// Block address assigned in the uncompressed address space.
    pub blkaddr: u32,
    /// Length in bytes.
    pub size: u32,
    /// Digest of the bytes.
    pub digest: [u8; 32],
}

/// A frame ready for compression: contiguous uncompressed bytes (chunks and
/// the zero padding between them) and the chunks it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Start of the frame in the uncompressed address space (block aligned).
    pub start: u64,
    /// Uncompressed bytes.
    pub data: Vec<u8>,
    /// Chunks inside, in address order.
    pub chunks: Vec<PlacedChunk>,
}

/// Assigns block addresses to chunks and packs small consecutive chunks
/// into frames of at most `frame_size` uncompressed bytes. Deterministic:
/// the same sequence of chunks always gives the same layout.
#[derive(Debug)]
pub struct FramePacker {
    frame_size: u32,
    cursor: u64,
    pending: Option<Frame>,
}

impl FramePacker {
    /// A packer starting at address 0.
    pub fn new(frame_size: u32) -> Self {
        FramePacker {
            frame_size,
            cursor: 0,
            pending: None,
        }
    }

    /// Places one chunk. Returns its block address and any frames that are
    /// now complete (zero, one or two).
    pub fn push(&mut self, data: &[u8], digest: [u8; 32]) -> Result<(u32, Vec<Frame>), BlobError> {
        let mut sealed = Vec::new();
        let start = self.cursor;
        let blkaddr = u32::try_from(start >> BLOCK_BITS).map_err(|_| BlobError::BadField {
            field: "uncompressed_size",
            detail: "blob address space exceeds 2^32 blocks; split the input".into(),
        })?;
        let size = u32::try_from(data.len()).map_err(|_| BlobError::BadField {
            field: "chunk size",
            detail: format!("{} bytes", data.len()),
        })?;
        let chunk = PlacedChunk {
            blkaddr,
            size,
            digest,
        };
        let fits_pending = self.pending.as_ref().is_some_and(|frame| {
            start - frame.start + data.len() as u64 <= u64::from(self.frame_size)
        });
        if !fits_pending {
            sealed.extend(self.pending.take());
        }
        let frame = self.pending.get_or_insert_with(|| Frame {
            start,
            data: Vec::new(),
            chunks: Vec::new(),
        });
        frame.data.resize((start - frame.start) as usize, 0);
        frame.data.extend_from_slice(data);
        frame.chunks.push(chunk);
        self.cursor = align_up(start + data.len() as u64, u64::from(BLOCK_SIZE));
        if frame.data.len() >= self.frame_size as usize {
            sealed.extend(self.pending.take());
        }
        Ok((blkaddr, sealed))
    }

    /// Seals the last frame. Returns it (if any) and the size of the
    /// address space.
    pub fn finish(mut self) -> (Option<Frame>, u64) {
        (self.pending.take(), self.cursor)
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

/// What a finished blob looks like, for the bootstrap's blob table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSummary {
    /// The trailer written.
    pub trailer: BlobTrailer,
    /// Total size of the blob file.
    pub blob_size: u64,
    /// The chunk table.
    pub table: ChunkTable,
}

/// Writes a blob: frames in order, then the chunk table and trailer.
#[derive(Debug)]
pub struct BlobWriter<W: Write> {
    out: W,
    algo: DigestAlgo,
    chunk_size: u32,
    offset: u64,
    records: Vec<ChunkRecord>,
}

impl<W: Write> BlobWriter<W> {
    /// Starts a blob whose chunks use `algo` and `chunk_size`.
    pub fn new(out: W, algo: DigestAlgo, chunk_size: u32) -> Self {
        BlobWriter {
            out,
            algo,
            chunk_size,
            offset: 0,
            records: Vec::new(),
        }
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends one frame, stored as `stored` with `compression`.
    pub fn write_frame(
        &mut self,
        frame: &Frame,
        compression: Compression,
        stored: &[u8],
    ) -> std::io::Result<()> {
        let too_big = |what: &str| std::io::Error::other(format!("frame {what} exceeds 4 GiB"));
        let compressed_size = u32::try_from(stored.len()).map_err(|_| too_big("stored size"))?;
        let frame_size = u32::try_from(frame.data.len()).map_err(|_| too_big("size"))?;
        for c in &frame.chunks {
            self.records.push(ChunkRecord {
                compressed_offset: self.offset,
                compressed_size,
                blkaddr: c.blkaddr,
                size: c.size,
                frame_offset: ((u64::from(c.blkaddr) << BLOCK_BITS) - frame.start) as u32,
                frame_size,
                compression,
                digest: c.digest,
            });
        }
        self.out.write_all(stored)?;
        self.offset += stored.len() as u64;
        Ok(())
    }

    /// Writes the chunk table and trailer; returns the writer and summary.
    pub fn finish(mut self, uncompressed_size: u64) -> std::io::Result<(W, BlobSummary)> {
        let table = ChunkTable {
            algo: self.algo,
            records: std::mem::take(&mut self.records),
        };
        let raw = table.encode();
        let (table_compression, stored) = Compressor::new(Compression::Zstd, 3)?.compress(&raw)?;
        let trailer = BlobTrailer {
            uncompressed_size: align_up(uncompressed_size, u64::from(BLOCK_SIZE)),
            chunk_count: table.records.len() as u64,
            table_offset: self.offset,
            table_stored_size: stored.len() as u64,
            table_size: raw.len() as u64,
            table_compression,
            chunk_size_bits: self.chunk_size.trailing_zeros() as u8,
            table_digest: self.algo.digest(&stored),
        };
        self.out.write_all(&stored)?;
        self.out.write_all(&trailer.encode())?;
        let blob_size = self.offset + stored.len() as u64 + BLOB_TRAILER_SIZE as u64;
        Ok((
            self.out,
            BlobSummary {
                trailer,
                blob_size,
                table,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(chunks: &[Vec<u8>], frame_size: u32) -> (Vec<u8>, BlobSummary, Vec<u32>) {
        let mut packer = FramePacker::new(frame_size);
        let mut writer = BlobWriter::new(Vec::new(), DigestAlgo::Blake3, DEFAULT_CHUNK_SIZE);
        let mut compressor = Compressor::new(Compression::Zstd, 3).unwrap();
        let mut addrs = Vec::new();
        let mut write = |frame: Frame, writer: &mut BlobWriter<Vec<u8>>| {
            let (c, stored) = compressor.compress(&frame.data).unwrap();
            writer.write_frame(&frame, c, &stored).unwrap();
        };
        for data in chunks {
            let digest = *DigestAlgo::Blake3.digest(data).bytes();
            let (addr, sealed) = packer.push(data, digest).unwrap();
            addrs.push(addr);
            for f in sealed {
                write(f, &mut writer);
            }
        }
        let (last, size) = packer.finish();
        if let Some(f) = last {
            write(f, &mut writer);
        }
        let (bytes, summary) = writer.finish(size).unwrap();
        (bytes, summary, addrs)
    }

    fn read_back(blob: &[u8]) -> ChunkTable {
        let size = blob.len() as u64;
        let trailer = BlobTrailer::decode(&blob[blob.len() - BLOB_TRAILER_SIZE..], size).unwrap();
        let start = trailer.table_offset as usize;
        let end = start + trailer.table_stored_size as usize;
        trailer.decode_table(&blob[start..end]).unwrap()
    }

    #[test]
    fn packs_small_chunks_and_isolates_big_ones() {
        let chunks = vec![
            vec![1u8; 100],
            vec![2u8; 5000],
            vec![3u8; 200 << 10],
            vec![4u8; 10],
        ];
        let (blob, summary, addrs) = build(&chunks, 64 << 10);
        assert_eq!(addrs, vec![0, 1, 3, 3 + 50]);
        let table = read_back(&blob);
        assert_eq!(table, summary.table);
        let recs = table.records();
        assert_eq!(recs[0].compressed_offset, recs[1].compressed_offset);
        assert_ne!(recs[1].compressed_offset, recs[2].compressed_offset);
        assert_eq!(table.frame_at(recs[1].compressed_offset), Some(0..2));
        assert_eq!(table.frame_at(recs[3].compressed_offset), Some(3..4));
        assert_eq!(table.frame_at(1), None);
        // Every chunk decompresses back to its input through its frame.
        for (i, data) in chunks.iter().enumerate() {
            let r = &recs[i];
            let stored =
                &blob[r.compressed_range().start as usize..r.compressed_range().end as usize];
            let frame =
                crate::compress::decompress(r.compression, stored, r.frame_size as usize).unwrap();
            assert_eq!(&frame[r.range_in_frame()], &data[..]);
            assert!(table.digest(i).matches(data));
            assert_eq!(table.find(r.blkaddr), Some(i));
        }
    }

    /// Found by the `chunk_table` fuzz target: `compressed_offset +
    /// compressed_size` overflowed (a panic with overflow checks, and a
    /// wrapped end that passed the data-area bound without them).
    #[test]
    fn frame_end_overflow_is_rejected_not_wrapped() {
        let record = ChunkRecord {
            compressed_offset: u64::MAX - 10,
            compressed_size: 100,
            blkaddr: 0,
            size: 10,
            frame_offset: 0,
            frame_size: 10,
            compression: Compression::Zstd,
            digest: [0; 32],
        };
        let raw = ChunkTable {
            algo: DigestAlgo::Blake3,
            records: vec![record],
        }
        .encode();
        let geometry = BlobGeometry {
            uncompressed_size: 4096,
            data_end: 1000,
            chunk_size: 4096,
        };
        let result = ChunkTable::decode(&raw, DigestAlgo::Blake3, &geometry);
        assert!(
            matches!(result, Err(BlobError::BadRecord { index: 0, ref detail }) if detail.contains("runs past the data area")),
            "{result:?}"
        );
    }

    #[test]
    fn corrupted_trailer_and_table_are_rejected() {
        let (blob, _, _) = build(&[vec![9u8; 3000], vec![8u8; 7000]], 64 << 10);
        let n = blob.len();
        // Every single-byte flip in the trailer's meaningful fields or in the
        // stored table must be caught.
        for pos in (n - BLOB_TRAILER_SIZE - 40)..n {
            let mut bad = blob.clone();
            bad[pos] ^= 0x40;
            let size = bad.len() as u64;
            let result = BlobTrailer::decode(&bad[n - BLOB_TRAILER_SIZE..], size).and_then(|t| {
                let start = t.table_offset as usize;
                let end = start + t.table_stored_size as usize;
                if end > bad.len() {
                    return Err(BlobError::Truncated {
                        what: "table",
                        needed: end as u64,
                        len: size,
                    });
                }
                t.decode_table(&bad[start..end])
            });
            assert!(result.is_err(), "flip at {pos} went unnoticed");
        }
        assert!(BlobTrailer::decode(&blob[n - BLOB_TRAILER_SIZE..], n as u64 + 1).is_err());
        assert!(BlobTrailer::decode(&blob[..10], 10).is_err());
    }
}
