//! The pack file format of the disk cache (docs/format.md, section 8): a
//! pack is chunk records back to back, each a 64-byte header and the
//! chunk's bytes. This module encodes headers and scans packs; it does no
//! caching policy.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use darter_format::blob::MAX_CHUNK_SIZE;
use darter_format::{Digest, DigestAlgo};

/// ON-DISK: magic of a record that may be served.
pub(crate) const LIVE_MAGIC: [u8; 8] = *b"DARTCHNK";
/// ON-DISK: magic of a record found corrupt: skipped, never served.
pub(crate) const DEAD_MAGIC: [u8; 8] = *b"DARTDEAD";
/// ON-DISK: record format version.
pub(crate) const VERSION: u8 = 1;
/// ON-DISK: header length; the chunk's bytes follow it.
pub(crate) const HEADER_LEN: usize = 64;
/// ON-DISK: the longest chunk a record may hold.
pub(crate) const MAX_DATA_LEN: u32 = 16 << 20;
const _: () = assert!(MAX_DATA_LEN >= MAX_CHUNK_SIZE);

/// ON-DISK: the header bytes the checksum covers (all but the magic, which
/// is overwritten to mark a record dead, and the checksum itself).
const CHECKED: std::ops::Range<usize> = 8..56;

/// Bytes a scan reads at once (headers of small records come in one read).
const SCAN_BUFFER: usize = 64 << 10;

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// False if the record was marked dead.
    pub live: bool,
    /// The digest of the chunk's bytes.
    pub digest: Digest,
    /// Length of the chunk's bytes.
    pub len: u32,
}

/// Why a header is not a valid record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadHeader {
    /// Neither magic.
    #[error("no record magic")]
    Magic,
    /// The checksum does not match.
    #[error("header checksum mismatch")]
    Checksum,
    /// A version this reader does not know.
    #[error("unknown record version {0}")]
    Version(u8),
    /// A digest algorithm this reader does not know.
    #[error("unknown digest algorithm {0}")]
    Algo(u8),
    /// Reserved bytes that are not zero.
    #[error("non-zero reserved bytes")]
    Reserved,
    /// Longer than any chunk.
    #[error("record length {0} exceeds {MAX_DATA_LEN}")]
    TooLong(u32),
}

impl Header {
    /// The header of a live record holding `len` bytes of chunk `digest`.
    pub fn encode(digest: &Digest, len: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&LIVE_MAGIC);
        h[8] = VERSION;
        h[9] = digest.algo().code();
        h[12..16].copy_from_slice(&len.to_le_bytes());
        h[16..48].copy_from_slice(digest.bytes());
        let check = checksum(&h);
        h[56..].copy_from_slice(&check);
        h
    }

    /// Parses and checks a header.
    pub fn parse(h: &[u8; HEADER_LEN]) -> Result<Header, BadHeader> {
        let live = match h[..8] {
            ref m if *m == LIVE_MAGIC => true,
            ref m if *m == DEAD_MAGIC => false,
            _ => return Err(BadHeader::Magic),
        };
        if h[56..] != checksum(h) {
            return Err(BadHeader::Checksum);
        }
        if h[8] != VERSION {
            return Err(BadHeader::Version(h[8]));
        }
        let algo = DigestAlgo::from_code(h[9]).ok_or(BadHeader::Algo(h[9]))?;
        if h[10..12] != [0, 0] || h[48..56] != [0; 8] {
            return Err(BadHeader::Reserved);
        }
        let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if len > MAX_DATA_LEN {
            return Err(BadHeader::TooLong(len));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[16..48]);
        Ok(Header {
            live,
            digest: Digest::new(algo, digest),
            len,
        })
    }

    /// Header and data length.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// ON-DISK: the first 8 bytes of the SHA-256 of the checked header bytes.
fn checksum(h: &[u8; HEADER_LEN]) -> [u8; 8] {
    let full = DigestAlgo::Sha256.digest(&h[CHECKED]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&full.bytes()[..8]);
    out
}

/// Where a scan of a pack stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// At the end of the bytes scanned, after a whole record.
    Whole,
    /// At a record that is not whole yet: a writer's append in progress,
    /// or the torn tail of a writer that died. A later scan of a longer
    /// file may find it whole.
    Torn,
    /// At a header that is not valid: nothing after it can be trusted.
    Invalid(BadHeader),
}

/// Scans the records of `file` from `from` (a record start) up to `size`,
/// calling `each` with every whole record's header and offset. Returns the
/// end of the last whole record and why the scan stopped there. Reads
/// headers, skips data.
pub(crate) fn scan(
    file: &File,
    from: u64,
    size: u64,
    mut each: impl FnMut(Header, u64),
) -> io::Result<(u64, ScanEnd)> {
    let mut reader = BufReader::with_capacity(SCAN_BUFFER, file);
    reader.seek(SeekFrom::Start(from))?;
    let mut at = from;
    loop {
        if at >= size {
            return Ok((at, ScanEnd::Whole));
        }
        if size - at < HEADER_LEN as u64 {
            return Ok((at, ScanEnd::Torn));
        }
        let mut bytes = [0u8; HEADER_LEN];
        reader.read_exact(&mut bytes)?;
        let header = match Header::parse(&bytes) {
            Ok(h) => h,
            Err(e) => return Ok((at, ScanEnd::Invalid(e))),
        };
        if size - at < header.record_len() {
            return Ok((at, ScanEnd::Torn));
        }
        each(header, at);
        reader.seek_relative(i64::from(header.len))?;
        at += header.record_len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> (Digest, [u8; HEADER_LEN]) {
        let digest = DigestAlgo::Blake3.digest(b"abc");
        (digest, Header::encode(&digest, 3))
    }

    #[test]
    fn a_header_round_trips_and_stays_valid_when_marked_dead() {
        let (digest, mut h) = header();
        let live = Header::parse(&h).unwrap();
        assert_eq!(
            live,
            Header {
                live: true,
                digest,
                len: 3
            }
        );
        h[..8].copy_from_slice(&DEAD_MAGIC);
        assert_eq!(
            Header::parse(&h).unwrap(),
            Header {
                live: false,
                ..live
            }
        );
    }

    /// (what is changed, the byte, the error).
    type Damage = (&'static str, usize, BadHeader);

    #[test]
    fn damaged_headers_are_refused() {
        const DAMAGE: &[Damage] = &[
            ("magic", 0, BadHeader::Magic),
            ("version", 8, BadHeader::Checksum),
            ("length", 13, BadHeader::Checksum),
            ("digest", 30, BadHeader::Checksum),
            ("checksum", 60, BadHeader::Checksum),
        ];
        for &(what, byte, expected) in DAMAGE {
            let (_, mut h) = header();
            h[byte] ^= 0x40;
            assert_eq!(Header::parse(&h), Err(expected), "{what}");
        }
    }

    /// (which field, how it is changed, the error).
    type BadField = (&'static str, fn(&mut [u8; HEADER_LEN]), BadHeader);

    /// Headers with a valid checksum and a bad field: what a newer or
    /// hostile writer could produce.
    #[test]
    fn checksummed_headers_with_bad_fields_are_refused() {
        let cases: &[BadField] = &[
            ("version", |h| h[8] = 2, BadHeader::Version(2)),
            ("algorithm", |h| h[9] = 9, BadHeader::Algo(9)),
            ("reserved", |h| h[50] = 1, BadHeader::Reserved),
            (
                "length",
                |h| h[12..16].copy_from_slice(&u32::MAX.to_le_bytes()),
                BadHeader::TooLong(u32::MAX),
            ),
        ];
        for (what, change, expected) in cases {
            let (_, mut h) = header();
            change(&mut h);
            let check = checksum(&h);
            h[56..].copy_from_slice(&check);
            assert_eq!(Header::parse(&h), Err(*expected), "{what}");
        }
    }
}
