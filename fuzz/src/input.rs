//! The byte layouts of fuzz inputs, parsed by the targets and written by
//! the seed generator. Every layout puts small fixed fields first and the
//! free-form bytes last, so libFuzzer's mutations of a field stay local.

use darter_format::DigestAlgo;
use darter_format::blob::{BLOB_TRAILER_SIZE, BlobGeometry};

/// Largest decompressed frame size a `frame` input asks for; the format's
/// own limit (`frame_size ≤ 16 MiB`).
pub const MAX_FRAME_LEN: u32 = 16 << 20;

/// `frame` target input: `expected_len: u32 LE` (reduced modulo
/// [`MAX_FRAME_LEN`] + 1), then the stored frame bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInput<'a> {
    /// Length the frame must decompress to.
    pub expected_len: usize,
    /// The stored (possibly compressed) frame.
    pub stored: &'a [u8],
}

impl<'a> FrameInput<'a> {
    /// Reads an input; `None` if it is too short to hold the header.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (len, stored) = split_array::<4>(data)?;
        let expected_len = u32::from_le_bytes(len) % (MAX_FRAME_LEN + 1);
        Some(FrameInput {
            expected_len: expected_len as usize,
            stored,
        })
    }

    /// Writes an input that [`Self::parse`] reads back as `expected_len`
    /// and `stored`.
    pub fn encode(expected_len: u32, stored: &[u8]) -> Vec<u8> {
        [&expected_len.to_le_bytes()[..], stored].concat()
    }
}

/// `chunk_table` flag: recompute the table digest in the trailer from the
/// stored table, so mutations of the table reach the decoder.
pub const FIX_TABLE_DIGEST: u8 = 1;
/// `chunk_table` flag: recompute the trailer's self-checksum, so mutations
/// of trailer fields reach their validation.
pub const FIX_TRAILER_CHECKSUM: u8 = 2;
/// `chunk_table` flag: the input is a raw table with its own geometry
/// instead of a blob tail.
pub const RAW_TABLE: u8 = 4;

/// `chunk_table` target input. The first byte holds flags.
///
/// Without [`RAW_TABLE`], the rest is a blob's tail: the stored chunk table
/// followed by the 128-byte trailer, as a reader fetches it
/// (`[table_offset, blob_size)`); the blob size is taken as the trailer's
/// `table_offset` plus the tail's length. With [`RAW_TABLE`], the rest is
/// `uncompressed_size: u64`, `data_end: u64`, `chunk_size: u32`,
/// `digest algorithm code: u8` (all LE), then raw chunk records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkTableInput {
    /// A blob tail, with the digests already fixed up as the flags asked.
    Tail {
        /// Stored table followed by the trailer.
        tail: Vec<u8>,
        /// Size of the whole blob the tail ends.
        blob_size: u64,
    },
    /// A raw table with the geometry to validate it against.
    Raw {
        /// Digest algorithm of the chunks.
        algo: DigestAlgo,
        /// The blob facts records are checked against.
        geometry: BlobGeometry,
        /// Raw chunk records.
        records: Vec<u8>,
    },
}

impl ChunkTableInput {
    /// Reads an input; `None` if it is too short or names no known
    /// digest algorithm where one is needed.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        if flags & RAW_TABLE != 0 {
            return parse_raw(rest);
        }
        let mut tail = rest.to_vec();
        if tail.len() >= BLOB_TRAILER_SIZE {
            fix_up_tail(&mut tail, flags);
        }
        let blob_size = tail_blob_size(&tail);
        Some(ChunkTableInput::Tail { tail, blob_size })
    }

    /// Writes a blob-tail input asking for both fix-ups (which leave a
    /// genuine tail unchanged).
    pub fn encode_tail(tail: &[u8]) -> Vec<u8> {
        [&[FIX_TABLE_DIGEST | FIX_TRAILER_CHECKSUM][..], tail].concat()
    }

    /// Writes a raw-table input.
    pub fn encode_raw(algo: DigestAlgo, geometry: &BlobGeometry, records: &[u8]) -> Vec<u8> {
        let mut out = vec![RAW_TABLE];
        out.extend_from_slice(&geometry.uncompressed_size.to_le_bytes());
        out.extend_from_slice(&geometry.data_end.to_le_bytes());
        out.extend_from_slice(&geometry.chunk_size.to_le_bytes());
        out.push(algo.code());
        out.extend_from_slice(records);
        out
    }
}

/// Trailer field offsets this harness rewrites or reads (`docs/format.md`
/// section 2.4).
const TRAILER_TABLE_OFFSET_AT: usize = 32;
const TRAILER_ALGO_AT: usize = 57;
const TRAILER_TABLE_DIGEST_AT: usize = 64;
const TRAILER_CHECKSUM_AT: usize = 96;

fn fix_up_tail(tail: &mut [u8], flags: u8) {
    let (table, trailer) = tail.split_at_mut(tail.len() - BLOB_TRAILER_SIZE);
    let Some(algo) = DigestAlgo::from_code(trailer[TRAILER_ALGO_AT]) else {
        return;
    };
    if flags & FIX_TABLE_DIGEST != 0 {
        trailer[TRAILER_TABLE_DIGEST_AT..TRAILER_CHECKSUM_AT]
            .copy_from_slice(algo.digest(table).bytes());
    }
    if flags & FIX_TRAILER_CHECKSUM != 0 {
        let checksum = algo.digest(&trailer[..TRAILER_CHECKSUM_AT]);
        trailer[TRAILER_CHECKSUM_AT..].copy_from_slice(checksum.bytes());
    }
}

/// The blob size that makes `tail` end the blob: the trailer's
/// `table_offset` plus the tail length (wrapping, so absurd offsets stay
/// absurd and the decoder has to reject them).
fn tail_blob_size(tail: &[u8]) -> u64 {
    let len = tail.len() as u64;
    let Some(trailer) = tail
        .len()
        .checked_sub(BLOB_TRAILER_SIZE)
        .map(|at| &tail[at..])
    else {
        return len;
    };
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&trailer[TRAILER_TABLE_OFFSET_AT..TRAILER_TABLE_OFFSET_AT + 8]);
    u64::from_le_bytes(offset).wrapping_add(len)
}

fn parse_raw(data: &[u8]) -> Option<ChunkTableInput> {
    let (uncompressed_size, rest) = split_array::<8>(data)?;
    let (data_end, rest) = split_array::<8>(rest)?;
    let (chunk_size, rest) = split_array::<4>(rest)?;
    let (&algo, records) = rest.split_first()?;
    Some(ChunkTableInput::Raw {
        algo: DigestAlgo::from_code(algo)?,
        geometry: BlobGeometry {
            uncompressed_size: u64::from_le_bytes(uncompressed_size),
            data_end: u64::from_le_bytes(data_end),
            chunk_size: u32::from_le_bytes(chunk_size),
        },
        records: records.to_vec(),
    })
}

/// `image` target input: `bootstrap_len: u32 LE`, the uncompressed
/// bootstrap, then the bytes of the blobs the bootstrap lists, one after
/// another in its blob table's order, each as long as the table says (the
/// last ones may be cut short: reads past what is there fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInput<'a> {
    /// The bootstrap, uncompressed (the harness stores it as an image does).
    pub bootstrap: &'a [u8],
    /// The blobs, concatenated.
    pub blobs: &'a [u8],
}

impl<'a> ImageInput<'a> {
    /// Reads an input; `None` if it is too short for its header or its
    /// bootstrap length.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (len, rest) = split_array::<4>(data)?;
        let len = usize::try_from(u32::from_le_bytes(len)).ok()?;
        let bootstrap = rest.get(..len)?;
        Some(ImageInput {
            bootstrap,
            blobs: &rest[len..],
        })
    }

    /// Writes an input that [`Self::parse`] reads back as `bootstrap` and
    /// `blobs`; `None` if the bootstrap is 4 GiB or more.
    pub fn encode(bootstrap: &[u8], blobs: &[&[u8]]) -> Option<Vec<u8>> {
        let len = u32::try_from(bootstrap.len()).ok()?;
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(bootstrap);
        blobs.iter().for_each(|blob| out.extend_from_slice(blob));
        Some(out)
    }
}

fn split_array<const N: usize>(data: &[u8]) -> Option<([u8; N], &[u8])> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    Some((*head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_input_round_trips_and_caps_the_size() {
        let encoded = FrameInput::encode(1234, b"abc");
        assert_eq!(
            FrameInput::parse(&encoded),
            Some(FrameInput {
                expected_len: 1234,
                stored: b"abc"
            })
        );
        let huge = FrameInput::encode(u32::MAX, b"");
        let parsed = FrameInput::parse(&huge).map(|f| f.expected_len);
        assert!(parsed.is_some_and(|n| n <= MAX_FRAME_LEN as usize));
        assert_eq!(FrameInput::parse(&[1, 2, 3]), None);
    }

    #[test]
    fn raw_table_input_round_trips() {
        let geometry = BlobGeometry {
            uncompressed_size: 1 << 20,
            data_end: 777,
            chunk_size: 4096,
        };
        let encoded = ChunkTableInput::encode_raw(DigestAlgo::Sha256, &geometry, &[9; 64]);
        assert_eq!(
            ChunkTableInput::parse(&encoded),
            Some(ChunkTableInput::Raw {
                algo: DigestAlgo::Sha256,
                geometry,
                records: vec![9; 64],
            })
        );
    }

    #[test]
    fn tail_input_fixes_up_digests_and_derives_the_blob_size() {
        let mut tail = vec![0u8; 10 + BLOB_TRAILER_SIZE];
        let trailer_at = 10;
        tail[trailer_at + TRAILER_ALGO_AT] = DigestAlgo::Blake3.code();
        tail[trailer_at + TRAILER_TABLE_OFFSET_AT] = 100;
        let Some(ChunkTableInput::Tail {
            tail: fixed,
            blob_size,
        }) = ChunkTableInput::parse(&ChunkTableInput::encode_tail(&tail))
        else {
            panic!("a tail input parses as a tail");
        };
        assert_eq!(blob_size, 100 + tail.len() as u64);
        let trailer = &fixed[trailer_at..];
        let table_digest = DigestAlgo::Blake3.digest(&fixed[..trailer_at]);
        assert_eq!(
            &trailer[TRAILER_TABLE_DIGEST_AT..TRAILER_CHECKSUM_AT],
            table_digest.bytes()
        );
        let checksum = DigestAlgo::Blake3.digest(&trailer[..TRAILER_CHECKSUM_AT]);
        assert_eq!(&trailer[TRAILER_CHECKSUM_AT..], checksum.bytes());
    }

    #[test]
    fn image_input_round_trips() {
        let encoded = ImageInput::encode(b"boot", &[b"ab", b"cde"]).unwrap();
        assert_eq!(
            ImageInput::parse(&encoded),
            Some(ImageInput {
                bootstrap: b"boot",
                blobs: b"abcde"
            })
        );
        assert_eq!(ImageInput::parse(&[9, 0, 0, 0, 1]), None);
    }
}
