//! Tasks and pieces: a task is a blob named by its sha256 digest, cut into
//! fixed-size pieces; which pieces a peer has is a bitmap.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The size of every piece but a blob's last.
pub const PIECE_SIZE: u64 = 4 << 20;

/// A blob's digest: `sha256:` and 64 lowercase hex digits, the only form
/// the piece server and the store accept (it also names directories).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobDigest([u8; 32]);

/// A string that is not `sha256:<64 lowercase hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a sha256 digest: {0:?}")]
pub struct BadDigest(pub String);

impl BlobDigest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> BlobDigest {
        BlobDigest(Sha256::digest(data).into())
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From a finished hasher.
    pub fn from_hasher(hasher: Sha256) -> BlobDigest {
        BlobDigest(hasher.finalize().into())
    }
}

impl FromStr for BlobDigest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<BlobDigest, BadDigest> {
        let bad = || BadDigest(s.chars().take(80).collect());
        let hex_part = s.strip_prefix("sha256:").ok_or_else(bad)?;
        let lowercase = hex_part
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if hex_part.len() != 64 || !lowercase {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad())?;
        Ok(BlobDigest(bytes))
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// How a blob of `size` bytes is cut into pieces of `piece_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceLayout {
    pub size: u64,
    pub piece_size: u64,
}

impl PieceLayout {
    /// The layout every peer uses for a blob of `size` bytes.
    pub fn new(size: u64) -> PieceLayout {
        PieceLayout {
            size,
            piece_size: PIECE_SIZE,
        }
    }

    /// How many pieces there are (an empty blob has none).
    pub fn count(&self) -> usize {
        usize::try_from(self.size.div_ceil(self.piece_size)).unwrap_or(usize::MAX)
    }

    /// The byte range of piece `index`.
    pub fn range(&self, index: usize) -> Range<u64> {
        let start = (index as u64)
            .saturating_mul(self.piece_size)
            .min(self.size);
        start..(start.saturating_add(self.piece_size)).min(self.size)
    }

    /// The pieces that hold bytes of `range`.
    pub fn pieces_of(&self, range: &Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let first = range.start / self.piece_size;
        let last = (range.end - 1) / self.piece_size;
        usize::try_from(first).unwrap_or(usize::MAX)
            ..usize::try_from(last + 1).unwrap_or(usize::MAX)
    }
}

/// Which pieces a peer has: one bit per piece, least significant bit first
/// (the wire form of `have` in the scheduler protocol).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    bytes: Vec<u8>,
    len: usize,
}

impl Bitmap {
    /// `len` pieces, none present.
    pub fn new(len: usize) -> Bitmap {
        Bitmap {
            bytes: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// `len` pieces, all present.
    pub fn full(len: usize) -> Bitmap {
        let mut bitmap = Bitmap::new(len);
        (0..len).for_each(|i| bitmap.set(i));
        bitmap
    }

    /// The wire form, read as `len` pieces (missing bytes are absent pieces,
    /// bits past `len` are ignored).
    pub fn from_wire(bytes: &[u8], len: usize) -> Bitmap {
        let mut bitmap = Bitmap::new(len);
        for (mine, theirs) in bitmap.bytes.iter_mut().zip(bytes) {
            *mine = *theirs;
        }
        if let Some(last) = bitmap.bytes.last_mut()
            && !len.is_multiple_of(8)
        {
            *last &= (1u8 << (len % 8)) - 1;
        }
        bitmap
    }

    pub fn wire(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, index: usize) -> bool {
        index < self.len && self.bytes[index / 8] & (1 << (index % 8)) != 0
    }

    pub fn set(&mut self, index: usize) {
        if index < self.len {
            self.bytes[index / 8] |= 1 << (index % 8);
        }
    }

    /// How many pieces are present.
    pub fn count(&self) -> usize {
        self.bytes.iter().map(|b| b.count_ones() as usize).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    pub fn any(&self) -> bool {
        self.bytes.iter().any(|b| *b != 0)
    }
}

/// Whether two secrets are equal, in time independent of where they differ
/// (both are hashed first, so also of their lengths).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_only_in_canonical_form() {
        let hex = "a".repeat(64);
        for (text, ok) in [
            (format!("sha256:{hex}"), true),
            (format!("sha256:{}", "A".repeat(64)), false),
            (format!("sha512:{hex}"), false),
            (format!("sha256:{}", &hex[1..]), false),
            (format!("sha256:../{}", &hex[3..]), false),
            (hex.clone(), false),
            (String::new(), false),
        ] {
            assert_eq!(text.parse::<BlobDigest>().is_ok(), ok, "{text}");
        }
        let digest: BlobDigest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(digest.to_string(), format!("sha256:{hex}"));
    }

    #[test]
    fn layout_cuts_blobs_into_pieces() {
        let piece = PIECE_SIZE;
        for (size, count, last) in [
            (0, 0, 0..0),
            (1, 1, 0..1),
            (piece, 1, 0..piece),
            (piece + 1, 2, piece..piece + 1),
            (3 * piece, 3, 2 * piece..3 * piece),
        ] {
            let layout = PieceLayout::new(size);
            assert_eq!(layout.count(), count, "size {size}");
            if count > 0 {
                assert_eq!(layout.range(count - 1), last, "size {size}");
            }
        }
        let layout = PieceLayout::new(3 * piece);
        assert_eq!(layout.pieces_of(&(0..1)), 0..1);
        assert_eq!(layout.pieces_of(&(piece - 1..piece + 1)), 0..2);
        assert_eq!(layout.pieces_of(&(piece..3 * piece)), 1..3);
        assert_eq!(layout.pieces_of(&(5..5)), 0..0);
    }

    #[test]
    fn bitmaps_round_trip_through_the_wire_and_ignore_extra_bits() {
        let mut bitmap = Bitmap::new(10);
        for i in [0, 3, 9, 10, 200] {
            bitmap.set(i);
        }
        assert_eq!(bitmap.count(), 3);
        assert_eq!(Bitmap::from_wire(bitmap.wire(), 10), bitmap);
        let noisy = Bitmap::from_wire(&[0xff, 0xff, 0xff], 10);
        assert_eq!(noisy.count(), 10);
        assert!(noisy.is_full());
        let short = Bitmap::from_wire(&[0x01], 10);
        assert_eq!(short.count(), 1);
        assert!(short.get(0) && !short.get(9));
        assert!(bitmap.get(3) && !bitmap.get(4));
        assert!(Bitmap::full(9).is_full());
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(secrets_equal(b"token", b"token"));
        assert!(!secrets_equal(b"token", b"tokem"));
        assert!(!secrets_equal(b"token", b"token2"));
        assert!(!secrets_equal(b"", b"x"));
    }
}
