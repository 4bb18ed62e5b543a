//! One 512-byte header block: its checksum, numeric fields (octal or GNU
//! base-256), names, and which layout it uses (V7, POSIX ustar, star or
//! GNU).

use std::ops::Range;

use super::TarErrorKind;

/// Tar streams are made of blocks of this many bytes.
pub(crate) const BLOCK_SIZE: usize = 512;
/// One block.
pub(crate) type Block = [u8; BLOCK_SIZE];

const NAME: Range<usize> = 0..100;
const MODE: Range<usize> = 100..108;
const UID: Range<usize> = 108..116;
const GID: Range<usize> = 116..124;
const SIZE: Range<usize> = 124..136;
const MTIME: Range<usize> = 136..148;
const CHECKSUM: Range<usize> = 148..156;
const TYPEFLAG: usize = 156;
const LINKNAME: Range<usize> = 157..257;
const MAGIC: Range<usize> = 257..263;
const DEVMAJOR: Range<usize> = 329..337;
const DEVMINOR: Range<usize> = 337..345;
const USTAR_PREFIX: Range<usize> = 345..500;
/// star keeps atime and ctime after a shorter prefix, and says so with a
/// trailer at the end of the block.
const STAR_PREFIX: Range<usize> = 345..476;
const STAR_TRAILER: Range<usize> = 508..512;
/// Old GNU sparse headers: four (offset, size) pairs, then the
/// "more pairs follow in extension blocks" flag, then the logical size.
pub(crate) const GNU_SPARSE_PAIRS: usize = 386;
pub(crate) const GNU_SPARSE_PAIRS_IN_HEADER: usize = 4;
const GNU_REAL_SIZE: Range<usize> = 483..495;

/// Which header layout a block uses; it decides what the bytes after the
/// link name mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Seventh Edition: no magic, nothing after the link name.
    V7,
    /// POSIX ustar (also pax): a 155-byte path prefix.
    Ustar,
    /// star: ustar with a 131-byte prefix followed by times.
    Star,
    /// GNU: times, long-name and sparse fields where ustar has the prefix.
    Gnu,
}

/// A header block whose checksum is right.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header<'b> {
    block: &'b Block,
    format: Format,
}

impl<'b> Header<'b> {
    /// Checks the checksum and works out the layout.
    pub(crate) fn parse(block: &'b Block) -> Result<Self, TarErrorKind> {
        verify_checksum(block)?;
        Ok(Header {
            block,
            format: detect_format(block),
        })
    }

    pub(crate) fn format(&self) -> Format {
        self.format
    }

    pub(crate) fn block(&self) -> &'b Block {
        self.block
    }

    pub(crate) fn typeflag(&self) -> u8 {
        self.block[TYPEFLAG]
    }

    /// The path, with the ustar prefix joined on.
    pub(crate) fn path(&self) -> Vec<u8> {
        let name = text(&self.block[NAME]);
        let prefix = match self.format {
            Format::Ustar => text(&self.block[USTAR_PREFIX]),
            Format::Star => text(&self.block[STAR_PREFIX]),
            Format::V7 | Format::Gnu => b"",
        };
        if prefix.is_empty() {
            name.to_vec()
        } else {
            [prefix, b"/", name].concat()
        }
    }

    pub(crate) fn link_name(&self) -> &'b [u8] {
        text(&self.block[LINKNAME])
    }

    pub(crate) fn mode(&self) -> Result<u32, TarErrorKind> {
        narrow(number(&self.block[MODE], "mode")?, "mode")
    }

    pub(crate) fn uid(&self) -> Result<u64, TarErrorKind> {
        unsigned(&self.block[UID], "uid")
    }

    pub(crate) fn gid(&self) -> Result<u64, TarErrorKind> {
        unsigned(&self.block[GID], "gid")
    }

    pub(crate) fn size(&self) -> Result<u64, TarErrorKind> {
        unsigned(&self.block[SIZE], "size")
    }

    pub(crate) fn mtime(&self) -> Result<i64, TarErrorKind> {
        number(&self.block[MTIME], "mtime")
    }

    /// Device major and minor numbers.
    pub(crate) fn device(&self) -> Result<(u32, u32), TarErrorKind> {
        let major = narrow(number(&self.block[DEVMAJOR], "devmajor")?, "devmajor")?;
        let minor = narrow(number(&self.block[DEVMINOR], "devminor")?, "devminor")?;
        Ok((major, minor))
    }

    /// The logical size of an old GNU sparse file.
    pub(crate) fn gnu_real_size(&self) -> Result<u64, TarErrorKind> {
        unsigned(&self.block[GNU_REAL_SIZE], "sparse real size")
    }
}

/// The name field of any block, for naming it in an error before it is
/// known to be a header.
pub(crate) fn raw_name(block: &Block) -> &[u8] {
    text(&block[NAME])
}

pub(crate) fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Bytes of padding after `size` bytes of data, up to the block boundary.
pub(crate) fn padding(size: u64) -> u64 {
    size.next_multiple_of(BLOCK_SIZE as u64) - size
}

/// A string field: its bytes up to the first NUL.
fn text(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn detect_format(block: &Block) -> Format {
    match &block[MAGIC] {
        b"ustar\0" if &block[STAR_TRAILER] == b"tar\0" => Format::Star,
        b"ustar\0" => Format::Ustar,
        // Old GNU tar writes "ustar " followed by version " \0".
        b"ustar " => Format::Gnu,
        _ => Format::V7,
    }
}

/// The stored checksum must be the sum of the block's bytes with the
/// checksum field read as spaces; historic writers summed signed bytes.
fn verify_checksum(block: &Block) -> Result<(), TarErrorKind> {
    let stored = number(&block[CHECKSUM], "checksum")?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &byte) in block.iter().enumerate() {
        let byte = if CHECKSUM.contains(&i) { b' ' } else { byte };
        unsigned += i64::from(byte);
        signed += i64::from(i8::from_ne_bytes([byte]));
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(TarErrorKind::Checksum {
            stored,
            unsigned,
            signed,
        })
    }
}

/// A numeric field that must not be negative.
pub(crate) fn unsigned(field: &[u8], name: &'static str) -> Result<u64, TarErrorKind> {
    let value = number(field, name)?;
    u64::try_from(value).map_err(|_| TarErrorKind::OutOfRange {
        field: name,
        value: value.into(),
    })
}

fn narrow(value: i64, name: &'static str) -> Result<u32, TarErrorKind> {
    u32::try_from(value).map_err(|_| TarErrorKind::OutOfRange {
        field: name,
        value: value.into(),
    })
}

/// A numeric field: octal digits padded with spaces or NULs, or GNU
/// base-256 when the first byte has its high bit set.
pub(crate) fn number(field: &[u8], name: &'static str) -> Result<i64, TarErrorKind> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => base256(field, name),
        _ => octal(field, name),
    }
}

fn octal(field: &[u8], name: &'static str) -> Result<i64, TarErrorKind> {
    let pad = |b: &u8| *b == 0 || *b == b' ';
    let start = field.iter().position(|b| !pad(b)).unwrap_or(field.len());
    let end = field.iter().rposition(|b| !pad(b)).map_or(start, |i| i + 1);
    field[start..end]
        .iter()
        .try_fold(0i64, |value, &digit| match digit {
            b'0'..=b'7' => value.checked_mul(8)?.checked_add(i64::from(digit - b'0')),
            _ => None,
        })
        .ok_or_else(|| TarErrorKind::BadNumber {
            field: name,
            value: String::from_utf8_lossy(field).into_owned(),
        })
}

/// Big-endian two's complement: bit 7 of the first byte marks the
/// encoding, bit 6 is the sign.
fn base256(field: &[u8], name: &'static str) -> Result<i64, TarErrorKind> {
    let out_of_range = |value| TarErrorKind::OutOfRange { field: name, value };
    // Fields are at most 12 bytes: 94 bits of magnitude fit an i128.
    if field.len() > 12 {
        return Err(out_of_range(i128::MAX));
    }
    let first = i128::from(field[0] & 0x3f) - if field[0] & 0x40 != 0 { 0x40 } else { 0 };
    let value = field[1..]
        .iter()
        .fold(first, |value, &byte| value * 256 + i128::from(byte));
    i64::try_from(value).map_err(|_| out_of_range(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header block for `name` with a correct checksum.
    fn block_with(fields: &[(Range<usize>, &[u8])]) -> Block {
        let mut block = [0u8; BLOCK_SIZE];
        block[MAGIC].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        for (range, value) in fields {
            block[range.start..range.start + value.len()].copy_from_slice(value);
        }
        set_checksum(&mut block);
        block
    }

    fn set_checksum(block: &mut Block) {
        block[CHECKSUM].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[CHECKSUM].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    #[test]
    fn numeric_fields() {
        type Case = (&'static [u8], Result<i64, ()>);
        let cases: &[Case] = &[
            (b"0000644\0", Ok(0o644)),
            (b"644 \0\0\0\0", Ok(0o644)),
            (b"  644 \0", Ok(0o644)),
            (b"\0\0\0\0\0\0\0\0", Ok(0)),
            (b"        ", Ok(0)),
            (b"", Ok(0)),
            (b"77777777777\0", Ok(0o77777777777)),
            (b"0000648\0", Err(())),
            (b"06 44\0\0\0", Err(())),
            (b"-0000001", Err(())),
            (b"0x10\0\0\0\0", Err(())),
            // GNU base-256: positive, negative, and beyond i64.
            (&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00], Ok(256)),
            (&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], Ok(0)),
            (
                &[
                    0x80, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
                Ok(i64::MAX),
            ),
            (&[0xff; 12], Ok(-1)),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe], Ok(-2)),
            (&[0x80, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0], Err(())),
            (
                &[
                    0xbf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
                Err(()),
            ),
            (&[0x80, 0, 0, 0, 0, 0, 0, 0x01], Ok(1)),
        ];
        for (field, want) in cases {
            let got = number(field, "test").map_err(|_| ());
            assert_eq!(got, *want, "{field:?}");
        }
    }

    #[test]
    fn unsigned_fields_refuse_negative_numbers() {
        let err = unsigned(&[0xff; 12], "size").unwrap_err();
        assert!(
            matches!(
                err,
                TarErrorKind::OutOfRange {
                    field: "size",
                    value: -1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn checksums_accept_unsigned_and_signed_sums_only() {
        let mut block = block_with(&[(NAME, "caf\u{e9}".as_bytes()), (MODE, b"0000644\0")]);
        assert!(Header::parse(&block).is_ok(), "unsigned sum");
        // The signed sum of a block with bytes >= 0x80 differs.
        let (unsigned, signed): (i64, i64) = block
            .iter()
            .enumerate()
            .map(|(i, &b)| if CHECKSUM.contains(&i) { b' ' } else { b })
            .fold((0, 0), |(u, s), b| {
                (u + i64::from(b), s + i64::from(i8::from_ne_bytes([b])))
            });
        assert_ne!(unsigned, signed);
        block[CHECKSUM].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
        assert!(Header::parse(&block).is_ok(), "signed sum");
        block[CHECKSUM].copy_from_slice(format!("{:06o}\0 ", unsigned + 1).as_bytes());
        let err = Header::parse(&block).unwrap_err();
        assert!(matches!(err, TarErrorKind::Checksum { .. }), "{err}");
        block[CHECKSUM].copy_from_slice(b"nonsense");
        let err = Header::parse(&block).unwrap_err();
        assert!(
            matches!(
                err,
                TarErrorKind::BadNumber {
                    field: "checksum",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn formats_and_paths() {
        let name: &[u8] = b"file";
        let prefix: &[u8] = b"some/dir";
        let ustar = block_with(&[(NAME, name), (USTAR_PREFIX, prefix)]);
        let mut gnu = ustar;
        gnu[MAGIC].copy_from_slice(b"ustar ");
        gnu[263..265].copy_from_slice(b" \0");
        set_checksum(&mut gnu);
        let mut v7 = ustar;
        v7[MAGIC].fill(0);
        v7[263..265].fill(0);
        set_checksum(&mut v7);
        let mut star = ustar;
        star[STAR_TRAILER].copy_from_slice(b"tar\0");
        set_checksum(&mut star);
        let cases: [(&Block, Format, &[u8]); 4] = [
            (&ustar, Format::Ustar, b"some/dir/file"),
            (&star, Format::Star, b"some/dir/file"),
            // GNU and V7 have no prefix: the bytes there mean something else.
            (&gnu, Format::Gnu, b"file"),
            (&v7, Format::V7, b"file"),
        ];
        for (block, format, path) in cases {
            let header = Header::parse(block).unwrap();
            assert_eq!(header.format(), format);
            assert_eq!(header.path(), path, "{format:?}");
        }
    }

    #[test]
    fn fields_of_a_full_header() {
        let block = block_with(&[
            (NAME, b"a-name-of-exactly-one-hundred-bytes-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            (MODE, b"0004755\0"),
            (UID, b"0001750\0"),
            (GID, &[0x80, 0, 0, 0, 0, 0x01, 0x86, 0xa0]),
            (SIZE, b"00000000012\0"),
            (MTIME, b"14524770400\0"),
            (TYPEFLAG..TYPEFLAG + 1, b"3"),
            (LINKNAME, b"target"),
            (DEVMAJOR, b"0000010\0"),
            (DEVMINOR, b"0000003\0"),
        ]);
        let header = Header::parse(&block).unwrap();
        assert_eq!(header.path().len(), 100, "a full name field has no NUL");
        assert_eq!(header.mode().unwrap(), 0o4755);
        assert_eq!(header.uid().unwrap(), 1000);
        assert_eq!(header.gid().unwrap(), 100_000);
        assert_eq!(header.size().unwrap(), 10);
        assert_eq!(header.mtime().unwrap(), 1_700_000_000);
        assert_eq!(header.typeflag(), b'3');
        assert_eq!(header.link_name(), b"target");
        assert_eq!(header.device().unwrap(), (8, 3));
    }

    #[test]
    fn padding_to_the_block_boundary() {
        for (size, pad) in [
            (0, 0),
            (1, 511),
            (511, 1),
            (512, 0),
            (513, 511),
            (1 << 40, 0),
        ] {
            assert_eq!(padding(size), pad, "{size}");
        }
    }
}
