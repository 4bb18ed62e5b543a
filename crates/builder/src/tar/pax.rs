//! PAX extended header records, `"%d %s=%s\n"` (POSIX.1-2001 pax): each
//! record is cut at its decimal length prefix, so a value may hold any
//! bytes, newlines and `=` included. Also what the records mean: the
//! keywords that override header fields and those that carry xattrs.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

use super::{MAX_PATH, TarErrorKind, Timestamp};

/// star, GNU tar and Go write xattrs as `SCHILY.xattr.NAME=VALUE`, raw.
const SCHILY_XATTR: &[u8] = b"SCHILY.xattr.";
/// libarchive writes `LIBARCHIVE.xattr.URL-ENCODED-NAME=BASE64-VALUE`.
const LIBARCHIVE_XATTR: &[u8] = b"LIBARCHIVE.xattr.";
/// libarchive leaves out base64 padding; accept it either way.
const LIBARCHIVE_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// Digits of the longest length prefix worth reading (any `u64`).
const MAX_LENGTH_DIGITS: usize = 20;

/// One record of an extended header, borrowed from its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    /// Where the record starts in the body.
    pub(crate) at: usize,
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// Cuts an extended header body into records, in order (keywords may
/// repeat). NUL bytes after the last record are padding. On error, says
/// where in the body the bad record starts.
pub(crate) fn parse_records(body: &[u8]) -> Result<Vec<Record<'_>>, (usize, TarErrorKind)> {
    let mut records = Vec::new();
    let mut at = 0;
    while body[at..].iter().any(|&b| b != 0) {
        let (key, value, len) =
            parse_record(&body[at..]).map_err(|detail| (at, TarErrorKind::PaxRecord(detail)))?;
        records.push(Record { at, key, value });
        at += len;
    }
    Ok(records)
}

/// One record at the start of `rest`: (key, value, record length).
fn parse_record(rest: &[u8]) -> Result<(&[u8], &[u8], usize), String> {
    let digits = rest
        .iter()
        .take(MAX_LENGTH_DIGITS + 1)
        .position(|&b| b == b' ')
        .map(|space| &rest[..space])
        .filter(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit))
        .ok_or("the record does not start with a decimal length and a space")?;
    let len = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
        .ok_or("the length prefix is out of range")?;
    // The length counts itself, the space, "KEY=VALUE" and the newline.
    let body_start = digits.len() + 1;
    if len > rest.len() {
        return Err(format!(
            "length {len} runs past the end of the header ({} bytes left)",
            rest.len()
        ));
    }
    if len < body_start + 3 {
        return Err(format!("length {len} is too short for a record"));
    }
    let Some((b'\n', key_value)) = rest[body_start..len].split_last() else {
        return Err(format!(
            "the record of length {len} does not end with a newline"
        ));
    };
    let eq = key_value
        .iter()
        .position(|&b| b == b'=')
        .ok_or("the record has no '='")?;
    if eq == 0 {
        return Err("the record has an empty keyword".into());
    }
    Ok((&key_value[..eq], &key_value[eq + 1..], len))
}

/// Whom a record applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// An `x` header: the next entry only. An empty value undoes a global
    /// value or restores the header field; an empty xattr value is kept
    /// (the attribute exists and is empty).
    Entry,
    /// A `g` header: every entry after it. An empty value removes the
    /// global value.
    Global,
}

/// Values PAX records give an entry in place of its header fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Overrides {
    pub(crate) path: Option<Vec<u8>>,
    pub(crate) linkpath: Option<Vec<u8>>,
    pub(crate) size: Option<u64>,
    pub(crate) uid: Option<u64>,
    pub(crate) gid: Option<u64>,
    pub(crate) mtime: Option<Timestamp>,
    pub(crate) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Overrides {
    /// Applies one record (keywords other than those of [`Overrides`] and
    /// the xattr ones, such as atime, uname or comment, are skipped).
    pub(crate) fn apply(
        &mut self,
        key: &[u8],
        value: &[u8],
        scope: Scope,
    ) -> Result<(), TarErrorKind> {
        let applied = match key {
            b"path" => path_value(value).map(|v| self.path = v),
            b"linkpath" => path_value(value).map(|v| self.linkpath = v),
            b"size" => optional(value, decimal).map(|v| self.size = v),
            b"uid" => optional(value, decimal).map(|v| self.uid = v),
            b"gid" => optional(value, decimal).map(|v| self.gid = v),
            b"mtime" => optional(value, parse_time).map(|v| self.mtime = v),
            _ => {
                if let Some(name) = key.strip_prefix(SCHILY_XATTR) {
                    self.set_xattr(name.to_vec(), value.to_vec(), scope)
                } else if let Some(name) = key.strip_prefix(LIBARCHIVE_XATTR) {
                    let name = percent_encoding::percent_decode(name).collect();
                    LIBARCHIVE_BASE64
                        .decode(value)
                        .map_err(|e| format!("value is not base64: {e}"))
                        .and_then(|value| self.set_xattr(name, value, scope))
                } else {
                    Ok(())
                }
            }
        };
        applied.map_err(|detail| value_error(key, detail))
    }

    fn set_xattr(&mut self, name: Vec<u8>, value: Vec<u8>, scope: Scope) -> Result<(), String> {
        if name.is_empty() || name.contains(&0) {
            return Err("the xattr name is empty or holds a NUL byte".into());
        }
        if scope == Scope::Global && value.is_empty() {
            self.xattrs.remove(&name);
        } else {
            self.xattrs.insert(name, value);
        }
        Ok(())
    }

    /// Bytes of names and values held (what copying them costs).
    pub(crate) fn held_bytes(&self) -> usize {
        let paths = [&self.path, &self.linkpath].map(|p| p.as_ref().map_or(0, Vec::len));
        let xattrs: usize = self.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        paths.iter().sum::<usize>() + xattrs
    }
}

pub(crate) fn value_error(key: &[u8], detail: String) -> TarErrorKind {
    TarErrorKind::PaxValue {
        key: String::from_utf8_lossy(key).into_owned(),
        detail,
    }
}

/// An empty value means "no value" (see [`Scope`]).
pub(crate) fn optional<T>(
    value: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(value).map(Some)
    }
}

/// A path or link target: no NUL (it could not be a file name), not
/// longer than [`MAX_PATH`].
pub(crate) fn path_value(value: &[u8]) -> Result<Option<Vec<u8>>, String> {
    check_path(value)?;
    optional(value, |v| Ok(v.to_vec()))
}

pub(crate) fn check_path(value: &[u8]) -> Result<(), String> {
    if value.contains(&0) {
        return Err("the path holds a NUL byte".into());
    }
    if value.len() > MAX_PATH {
        return Err(format!(
            "the path is {} bytes long, more than the limit of {MAX_PATH}",
            value.len()
        ));
    }
    Ok(())
}

/// A non-negative decimal number.
pub(crate) fn decimal(value: &[u8]) -> Result<u64, String> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "{:?} is not a decimal number",
            String::from_utf8_lossy(value)
        ));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{} is out of range", String::from_utf8_lossy(value)))
}

/// A PAX time, `[-]SECONDS[.FRACTION]`; digits beyond nanoseconds are cut
/// off. Negative times count back from the epoch, so `-1.25` is
/// (-2 s, 750,000,000 ns).
pub(crate) fn parse_time(value: &[u8]) -> Result<Timestamp, String> {
    let bad = || format!("{:?} is not a time", String::from_utf8_lossy(value));
    let (negative, unsigned) = match value.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let mut parts = unsigned.splitn(2, |&b| b == b'.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next().unwrap_or_default();
    let digits = |d: &[u8]| d.iter().all(u8::is_ascii_digit);
    if whole.is_empty() || !digits(whole) || !digits(fraction) {
        return Err(bad());
    }
    let secs = decimal(whole)
        .ok()
        .and_then(|s| i64::try_from(s).ok())
        .ok_or_else(bad)?;
    let nsec = fraction
        .iter()
        .chain(std::iter::repeat(&b'0'))
        .take(9)
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    Ok(match (negative, nsec) {
        (false, _) => Timestamp { secs, nsec },
        (true, 0) => Timestamp { secs: -secs, nsec },
        (true, _) => Timestamp {
            secs: -secs - 1,
            nsec: 1_000_000_000 - nsec,
        },
    })
}

/// A record with a correct length prefix, for tests that write headers.
#[cfg(test)]
pub(crate) fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3;
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len += 1;
    }
    [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
}

/// Base64 as libarchive writes it, for tests that make such records.
#[cfg(test)]
pub(crate) fn libarchive_base64(value: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use darter_format::tree::Xattr;

    fn keys_and_values(body: &[u8]) -> Result<Vec<Xattr>, usize> {
        parse_records(body)
            .map(|records| {
                records
                    .iter()
                    .map(|r| (r.key.to_vec(), r.value.to_vec()))
                    .collect()
            })
            .map_err(|(at, _)| at)
    }

    #[test]
    fn records_are_cut_at_their_length_prefix() {
        let binary: Vec<u8> = (0..=255).collect();
        let values: [&[u8]; 8] = [
            b"plain",
            b"new\nline",
            b"\n",
            b"a=b=c",
            b"ends with newline\n",
            b"",
            b"5 fake=record\n",
            &binary,
        ];
        for value in values {
            let body = [record(b"path", value), record(b"SCHILY.xattr.user.x", b"1")].concat();
            assert_eq!(
                keys_and_values(&body),
                Ok(vec![
                    (b"path".to_vec(), value.to_vec()),
                    (b"SCHILY.xattr.user.x".to_vec(), b"1".to_vec())
                ]),
                "{value:?}"
            );
        }
    }

    #[test]
    fn record_lengths_near_digit_boundaries() {
        for value_len in 0..2000 {
            let value = vec![b'v'; value_len];
            let rec = record(b"k", &value);
            let parsed = parse_records(&rec).unwrap();
            assert_eq!(parsed.len(), 1);
            assert_eq!(parsed[0].value, value.as_slice());
        }
    }

    #[test]
    fn malformed_records_are_refused_where_they_start() {
        let good = record(b"uid", b"1");
        type Case = (&'static [u8], &'static str);
        let cases: &[Case] = &[
            (b"x path=a\n", "not a length"),
            (b" 9 path=a\n", "leading space"),
            (b"+10 path=a\n", "sign"),
            (b"10path=a\n", "no space"),
            (b"11 path=a\n", "too long for the rest"),
            (b"8 path=a\n", "too short: the newline is outside"),
            (b"10 path=ab", "no newline"),
            (b"4 =\n", "shorter than any record"),
            (b"7 =abc\n", "empty keyword"),
            (b"7 abcd\n", "no '='"),
            (b"0 \n", "zero length"),
            (b"99999999999999999999999 path=a\n", "absurd length"),
            (b"99999999999999999999 path=a\n", "out-of-range length"),
            (b"9 path=a\0\0", "NUL where the newline should be"),
        ];
        for (bad, why) in cases {
            let body = [good.as_slice(), bad].concat();
            assert_eq!(keys_and_values(&body), Err(good.len()), "{why}");
        }
    }

    #[test]
    fn trailing_nuls_are_padding() {
        let body = [record(b"path", b"a").as_slice(), &[0; 20]].concat();
        assert_eq!(parse_records(&body).unwrap().len(), 1);
        assert!(parse_records(&[0; 512]).unwrap().is_empty());
        let body = [record(b"path", b"a").as_slice(), b"\x00\x001"].concat();
        assert!(parse_records(&body).is_err(), "NULs, then more");
    }

    #[test]
    fn times() {
        type Case = (&'static [u8], Option<(i64, u32)>);
        let cases: &[Case] = &[
            (b"1700000000", Some((1_700_000_000, 0))),
            (b"1700000000.5", Some((1_700_000_000, 500_000_000))),
            (
                b"1700000000.123456789123",
                Some((1_700_000_000, 123_456_789)),
            ),
            (b"1.", Some((1, 0))),
            (b"0.000000001", Some((0, 1))),
            (b"-5", Some((-5, 0))),
            (b"-1.25", Some((-2, 750_000_000))),
            (b"abc", None),
            (b"1.x", None),
            (b".5", None),
            (b"-", None),
            (b"1.2.3", None),
            (b"+1", None),
            (b"99999999999999999999", None),
        ];
        for (value, want) in cases {
            let got = parse_time(value).ok().map(|t| (t.secs, t.nsec));
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(value));
        }
    }

    fn applied(records: &[(&[u8], &[u8])], scope: Scope) -> Result<Overrides, TarErrorKind> {
        let mut overrides = Overrides::default();
        for (key, value) in records {
            overrides.apply(key, value, scope)?;
        }
        Ok(overrides)
    }

    #[test]
    fn keywords_override_header_fields() {
        let o = applied(
            &[
                (b"path", b"dir/new\nline"),
                (b"linkpath", b"target"),
                (b"size", b"12345678901234"),
                (b"uid", b"4294967294"),
                (b"gid", b"100000"),
                (b"mtime", b"1700000000.000000042"),
                (b"atime", b"whatever"),
                (b"comment", b"ignored"),
                (b"SCHILY.xattr.security.capability", b"\x01\0\0\x02\x0a\0\n"),
                (b"SCHILY.xattr.user.empty", b""),
                (b"LIBARCHIVE.xattr.user.%E2%9C%93%3D", b"b25lCnR3bw"),
                (b"LIBARCHIVE.xattr.user.padded", b"YQ=="),
            ],
            Scope::Entry,
        )
        .unwrap();
        assert_eq!(o.path.as_deref(), Some(&b"dir/new\nline"[..]));
        assert_eq!(o.linkpath.as_deref(), Some(&b"target"[..]));
        assert_eq!(o.size, Some(12_345_678_901_234));
        assert_eq!((o.uid, o.gid), (Some(4_294_967_294), Some(100_000)));
        assert_eq!(
            o.mtime,
            Some(Timestamp {
                secs: 1_700_000_000,
                nsec: 42
            })
        );
        let xattrs: Vec<(&[u8], &[u8])> = o
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        assert_eq!(
            xattrs,
            [
                (&b"security.capability"[..], &b"\x01\0\0\x02\x0a\0\n"[..]),
                (b"user.empty", b""),
                (b"user.padded", b"a"),
                ("user.\u{2713}=".as_bytes(), b"one\ntwo"),
            ]
        );
    }

    #[test]
    fn empty_values_undo() {
        let mut o = applied(&[(b"path", b"a"), (b"uid", b"7")], Scope::Global).unwrap();
        o.apply(b"SCHILY.xattr.user.a", b"1", Scope::Global)
            .unwrap();
        o.apply(b"path", b"", Scope::Entry).unwrap();
        o.apply(b"SCHILY.xattr.user.a", b"", Scope::Global).unwrap();
        assert_eq!((o.path, o.uid), (None, Some(7)));
        assert!(o.xattrs.is_empty(), "an empty global value removes it");
    }

    #[test]
    fn bad_values_are_refused_naming_the_keyword() {
        let cases: [(&[u8], &[u8]); 10] = [
            (b"size", b"-1"),
            (b"size", b"1e3"),
            (b"uid", b"18446744073709551616"),
            (b"gid", b" 5"),
            (b"mtime", b"yesterday"),
            (b"path", b"a\0b"),
            (b"linkpath", &[b'l'; MAX_PATH + 1]),
            (b"SCHILY.xattr.", b"v"),
            (b"SCHILY.xattr.user.a\0b", b"v"),
            (b"LIBARCHIVE.xattr.user.a", b"not base64!"),
        ];
        for (key, value) in cases {
            let err = applied(&[(key, value)], Scope::Entry).unwrap_err();
            let TarErrorKind::PaxValue { key: named, .. } = &err else {
                panic!("{err}");
            };
            assert_eq!(named.as_bytes(), key, "{err}");
        }
        let longest = vec![b'p'; MAX_PATH];
        assert!(applied(&[(b"path", &longest)], Scope::Entry).is_ok());
    }

    #[test]
    fn libarchive_values_decode_what_the_encoder_writes() {
        let value: Vec<u8> = (0..=255).rev().collect();
        let encoded = libarchive_base64(&value);
        let o = applied(
            &[(b"LIBARCHIVE.xattr.user.bin", encoded.as_bytes())],
            Scope::Entry,
        )
        .unwrap();
        assert_eq!(o.xattrs[&b"user.bin"[..]], value);
    }
}
