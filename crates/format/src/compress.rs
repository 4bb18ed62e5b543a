//! Per-frame compression codecs. Pure functions on byte slices.

use std::fmt;
use std::str::FromStr;

/// How a frame's bytes are stored in a blob.
///
/// ON-DISK: the numeric codes are stored in every chunk record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Stored as is.
    None,
    /// A single zstd frame (the default).
    #[default]
    Zstd,
    /// A raw LZ4 block (no frame header; the decompressed size is in the chunk record).
    Lz4,
}

impl Compression {
    /// ON-DISK code.
    pub const fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }

    /// Decodes an on-disk code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            2 => Some(Compression::Lz4),
            _ => None,
        }
    }

    /// Command-line and JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(format!(
                "unknown compressor {other:?} (expected zstd, lz4 or none)"
            )),
        }
    }
}

/// Why a frame could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The codec rejected the input.
    #[error("{codec} data is corrupt: {detail}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// What the codec said.
        detail: String,
    },
    /// The output size differs from the size recorded for the frame.
    #[error("{codec} frame decompressed to {actual} bytes, expected {expected}")]
    WrongSize {
        /// Codec name.
        codec: &'static str,
        /// Size recorded in the chunk table.
        expected: usize,
        /// Size produced.
        actual: usize,
    },
}

/// A reusable compressor (keeps the zstd context between frames, which
/// matters at hundreds of frames per second).
pub struct Compressor {
    kind: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("kind", &self.kind)
            .finish()
    }
}

impl Compressor {
    /// A compressor for `kind` at zstd `level` (ignored by the other codecs).
    pub fn new(kind: Compression, level: i32) -> std::io::Result<Self> {
        let zstd = match kind {
            Compression::Zstd => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Compressor { kind, zstd })
    }

    /// Compresses `input`. Returns the codec actually used and the stored
    /// bytes: [`Compression::None`] (and a copy of the input) when
    /// compression would not make the frame smaller.
    pub fn compress(&mut self, input: &[u8]) -> std::io::Result<(Compression, Vec<u8>)> {
        let packed = match (self.kind, self.zstd.as_mut()) {
            (Compression::Zstd, Some(z)) => z.compress(input)?,
            (Compression::Lz4, _) => lz4_flex::block::compress(input),
            _ => return Ok((Compression::None, input.to_vec())),
        };
        if packed.len() < input.len() {
            Ok((self.kind, packed))
        } else {
            Ok((Compression::None, input.to_vec()))
        }
    }
}

/// Decompresses one stored frame into exactly `expected_len` bytes.
pub fn decompress(
    kind: Compression,
    stored: &[u8],
    expected_len: usize,
) -> Result<Vec<u8>, DecompressError> {
    let out = match kind {
        Compression::None => stored.to_vec(),
        Compression::Zstd => {
            let mut out = Vec::with_capacity(expected_len);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(stored, &mut out))
                .map_err(|e| DecompressError::Corrupt {
                    codec: "zstd",
                    detail: e.to_string(),
                })?;
            out
        }
        Compression::Lz4 => {
            let mut out = vec![0u8; expected_len];
            let n = lz4_flex::block::decompress_into(stored, &mut out).map_err(|e| {
                DecompressError::Corrupt {
                    codec: "lz4",
                    detail: e.to_string(),
                }
            })?;
            out.truncate(n);
            out
        }
    };
    if out.len() != expected_len {
        return Err(DecompressError::WrongSize {
            codec: kind.name(),
            expected: expected_len,
            actual: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_codec() {
        let compressible = b"darter ".repeat(1000);
        let random: Vec<u8> = (0u32..4096)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for kind in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let mut c = Compressor::new(kind, 3).unwrap();
            for input in [&compressible[..], &random[..], &[][..]] {
                let (used, stored) = c.compress(input).unwrap();
                assert!(stored.len() <= input.len());
                assert_eq!(decompress(used, &stored, input.len()).unwrap(), input);
            }
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut c = Compressor::new(Compression::Zstd, 3).unwrap();
        let (used, _) = c.compress(b"x").unwrap();
        assert_eq!(used, Compression::None);
    }

    #[test]
    fn wrong_size_and_garbage_are_errors() {
        let mut c = Compressor::new(Compression::Zstd, 3).unwrap();
        let input = vec![7u8; 10_000];
        let (used, stored) = c.compress(&input).unwrap();
        assert!(decompress(used, &stored, 9_999).is_err());
        assert!(decompress(used, &stored, 10_001).is_err());
        assert!(decompress(Compression::Zstd, b"garbage!", 10).is_err());
        assert!(decompress(Compression::Lz4, &[0xff; 16], 10).is_err());
    }
}
