//! Content digests: the algorithm tag and 32-byte values used for chunks,
//! chunk tables and (always sha256) OCI blobs.

use std::fmt;
use std::str::FromStr;

/// Which hash function produced a [`Digest`].
///
/// ON-DISK: the numeric values are stored in chunk tables and bootstraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DigestAlgo {
    /// BLAKE3 with 32-byte output (the default: about 2x faster than sha256 here).
    #[default]
    Blake3,
    /// SHA-256, for users who need a FIPS-approved hash.
    Sha256,
}

impl DigestAlgo {
    /// ON-DISK code.
    pub const fn code(self) -> u8 {
        match self {
            DigestAlgo::Blake3 => 1,
            DigestAlgo::Sha256 => 2,
        }
    }

    /// Decodes an on-disk code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DigestAlgo::Blake3),
            2 => Some(DigestAlgo::Sha256),
            _ => None,
        }
    }

    /// The name used in `algo:hex` strings and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            DigestAlgo::Blake3 => "blake3",
            DigestAlgo::Sha256 => "sha256",
        }
    }

    /// Hashes `data` in one go.
    pub fn digest(self, data: &[u8]) -> Digest {
        let mut hasher = Hasher::new(self);
        hasher.update(data);
        hasher.finish()
    }
}

impl fmt::Display for DigestAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DigestAlgo {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blake3" => Ok(DigestAlgo::Blake3),
            "sha256" => Ok(DigestAlgo::Sha256),
            other => Err(DigestParseError::UnknownAlgo(other.to_owned())),
        }
    }
}

/// A 32-byte digest together with the algorithm that made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algo: DigestAlgo,
    bytes: [u8; 32],
}

impl Digest {
    /// Wraps raw digest bytes.
    pub const fn new(algo: DigestAlgo, bytes: [u8; 32]) -> Self {
        Digest { algo, bytes }
    }

    /// The algorithm.
    pub const fn algo(&self) -> DigestAlgo {
        self.algo
    }

    /// The raw 32 bytes.
    pub const fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Lower-case hex of the bytes, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// True if this digest is the hash of `data`.
    pub fn matches(&self, data: &[u8]) -> bool {
        self.algo.digest(data) == *self
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    /// The part before `:` is not a known algorithm.
    #[error("unknown digest algorithm {0:?} (expected blake3 or sha256)")]
    UnknownAlgo(String),
    /// No `algo:` prefix.
    #[error("digest {0:?} has no algorithm prefix (expected ALGO:HEX)")]
    NoAlgo(String),
    /// The hex part is not 64 lower-case hex digits.
    #[error("digest {0:?} is not 64 lower-case hex digits")]
    BadHex(String),
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, hex_part) = s
            .split_once(':')
            .ok_or_else(|| DigestParseError::NoAlgo(s.to_owned()))?;
        let algo: DigestAlgo = algo.parse()?;
        let is_lower_hex = hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_lower_hex {
            return Err(DigestParseError::BadHex(s.to_owned()));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| DigestParseError::BadHex(s.to_owned()))?;
        Ok(Digest { algo, bytes })
    }
}

/// Incremental hashing for either algorithm.
#[derive(Clone)]
pub enum Hasher {
    /// BLAKE3 state.
    Blake3(Box<blake3::Hasher>),
    /// SHA-256 state.
    Sha256(sha2::Sha256),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Hasher").field(&self.algo()).finish()
    }
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algo: DigestAlgo) -> Self {
        use sha2::Digest as _;
        match algo {
            DigestAlgo::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            DigestAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> DigestAlgo {
        match self {
            Hasher::Blake3(_) => DigestAlgo::Blake3,
            Hasher::Sha256(_) => DigestAlgo::Sha256,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Blake3(h) => {
                h.update(data);
            }
            Hasher::Sha256(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        use sha2::Digest as _;
        match self {
            Hasher::Blake3(h) => Digest::new(DigestAlgo::Blake3, *h.finalize().as_bytes()),
            Hasher::Sha256(h) => Digest::new(DigestAlgo::Sha256, h.finalize().into()),
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // sha256("abc") and blake3("abc") from the algorithms' published test vectors.
        let cases = [
            (
                DigestAlgo::Sha256,
                "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                DigestAlgo::Blake3,
                "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
            ),
        ];
        for (algo, want) in cases {
            assert_eq!(algo.digest(b"abc").to_string(), want);
            assert_eq!(want.parse::<Digest>().unwrap(), algo.digest(b"abc"));
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        let bad = [
            "sha256",
            "md5:00",
            "sha256:XYZ",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:ba7816bf",
        ];
        for s in bad {
            assert!(s.parse::<Digest>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        for algo in [DigestAlgo::Blake3, DigestAlgo::Sha256] {
            let mut h = Hasher::new(algo);
            h.update(b"hello ");
            h.update(b"world");
            assert_eq!(h.finish(), algo.digest(b"hello world"));
        }
    }
}
