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

/// The sha256 of a blob, stopped after a whole number of 64-byte blocks:
/// the eight state words of the compression function. A seed records the
/// state after each piece it hashed in order; a peer then verifies piece
/// `k` by hashing it on from the state after piece `k - 1` and comparing
/// with the state after `k` (the last piece: finishing gives the blob's
/// digest). Each byte is hashed once, and pieces verified that way chain,
/// state to state, from sha256's initial value to the blob's digest: no
/// second pass over the blob is needed to check it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState([u32; 8]);

impl ChainState {
    /// sha256's initial value: the state before the first piece.
    pub const INITIAL: ChainState = ChainState([
        0x6a09_e667,
        0xbb67_ae85,
        0x3c6e_f372,
        0xa54f_f53a,
        0x510e_527f,
        0x9b05_688c,
        0x1f83_d9ab,
        0x5be0_cd19,
    ]);

    /// The state after hashing `bytes` on from this one; `None` unless
    /// `bytes` is a whole number of blocks.
    pub fn advance(self, bytes: &[u8]) -> Option<ChainState> {
        let (blocks, rest) = bytes.as_chunks::<64>();
        if !rest.is_empty() {
            return None;
        }
        let mut state = self.0;
        sha2::block_api::compress256(&mut state, blocks);
        Some(ChainState(state))
    }

    /// The digest of a blob of `total` bytes whose last bytes, `tail`, are
    /// hashed on from this state.
    pub fn finish(self, tail: &[u8], total: u64) -> BlobDigest {
        let (blocks, rest) = tail.as_chunks::<64>();
        let mut state = self.0;
        sha2::block_api::compress256(&mut state, blocks);
        // Padding: 0x80, zeros, then the length in bits, big-endian, to
        // end on a block boundary (one block, or two if the length does
        // not fit after the rest).
        let mut padding = [0u8; 128];
        padding[..rest.len()].copy_from_slice(rest);
        padding[rest.len()] = 0x80;
        let end = if rest.len() < 56 { 64 } else { 128 };
        padding[end - 8..end].copy_from_slice(&total.wrapping_mul(8).to_be_bytes());
        let (padded, _) = padding[..end].as_chunks::<64>();
        sha2::block_api::compress256(&mut state, padded);
        let mut digest = [0u8; 32];
        for (out, word) in digest.chunks_exact_mut(4).zip(state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        BlobDigest(digest)
    }

    /// The wire form: 64 lowercase hex digits of the words, big-endian.
    pub fn to_hex(self) -> String {
        let bytes: Vec<u8> = self.0.iter().flat_map(|w| w.to_be_bytes()).collect();
        hex::encode(bytes)
    }

    /// From [`Self::to_hex`]'s form; `None` for anything else.
    pub fn from_hex(text: &str) -> Option<ChainState> {
        let lowercase = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if text.len() != 64 || !lowercase {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        let mut words = [0u32; 8];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_be_bytes(chunk.try_into().ok()?);
        }
        Some(ChainState(words))
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
    fn chained_states_finish_to_the_sha256_of_the_whole() {
        for len in [
            0usize, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4113,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
            let expected = BlobDigest::of(&data);
            // Cut into a prefix of whole blocks and a tail, in pieces of one
            // block and of two.
            for piece in [64, 128] {
                let whole = len / piece * piece;
                let mut state = ChainState::INITIAL;
                for chunk in data[..whole].chunks(piece) {
                    let next = state.advance(chunk).unwrap();
                    assert_eq!(ChainState::from_hex(&next.to_hex()), Some(next));
                    state = next;
                }
                assert_eq!(
                    state.finish(&data[whole..], len as u64),
                    expected,
                    "{len}/{piece}"
                );
            }
            assert_eq!(ChainState::INITIAL.finish(&data, len as u64), expected);
        }
    }

    #[test]
    fn chain_states_need_whole_blocks_and_canonical_hex() {
        assert_eq!(ChainState::INITIAL.advance(&[0; 65]), None);
        assert_eq!(ChainState::INITIAL.advance(&[]), Some(ChainState::INITIAL));
        for bad in ["", "00", &"A".repeat(64), &"0".repeat(65), &"g".repeat(64)] {
            assert_eq!(ChainState::from_hex(bad), None, "{bad:?}");
        }
    }

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
