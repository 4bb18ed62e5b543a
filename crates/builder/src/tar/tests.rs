//! Whole archives: hand-made edge cases, round trips through the `tar`
//! crate's writer and Python's tarfile (PAX and GNU formats), and sparse
//! files written by GNU tar in all four of its sparse formats.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;

use super::*;

/// Reads every entry and its whole data.
fn read_all(archive: &[u8]) -> Result<Vec<(EntryHeader, Vec<u8>)>, TarError> {
    let mut reader = TarReader::new(archive);
    let mut entries = Vec::new();
    while let Some(mut entry) = reader.next_entry()? {
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(into_tar_error)?;
        assert_eq!(data.len() as u64, entry.header.size, "{:?}", entry.header);
        entries.push((entry.header, data));
    }
    assert!(
        reader.next_entry().unwrap().is_none(),
        "the end stays the end"
    );
    Ok(entries)
}

fn into_tar_error(e: io::Error) -> TarError {
    match e.into_inner().map(|inner| inner.downcast::<TarError>()) {
        Some(Ok(tar)) => *tar,
        other => panic!("a data error that is not a TarError: {other:?}"),
    }
}

// ---------------------------------------------------------------------
// Hand-made archives.

const END: [u8; 1024] = [0; 1024];

/// A ustar header block.
fn header_block(path: &[u8], typeflag: u8, size: u64) -> Vec<u8> {
    let mut header = ::tar::Header::new_ustar();
    let len = path.len().min(100);
    header.as_old_mut().name[..len].copy_from_slice(&path[..len]);
    // Written as is: `EntryType` would turn NUL into '0'.
    header.as_old_mut().linkflag = [typeflag];
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    header.as_bytes().to_vec()
}

/// A header with its data and padding.
fn member(path: &[u8], typeflag: u8, data: &[u8]) -> Vec<u8> {
    let mut bytes = header_block(path, typeflag, data.len() as u64);
    bytes.extend_from_slice(data);
    bytes.resize(bytes.len().next_multiple_of(BLOCK_SIZE), 0);
    bytes
}

fn file(path: &str, data: &[u8]) -> Vec<u8> {
    member(path.as_bytes(), b'0', data)
}

/// A PAX header (`x` or `g`) holding `records`.
fn pax(typeflag: u8, records: &[(&str, &[u8])]) -> Vec<u8> {
    let body: Vec<u8> = records
        .iter()
        .flat_map(|(key, value)| pax::record(key.as_bytes(), value))
        .collect();
    member(b"PaxHeaders/entry", typeflag, &body)
}

fn archive(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn paths(entries: &[(EntryHeader, Vec<u8>)]) -> Vec<String> {
    entries
        .iter()
        .map(|(h, _)| String::from_utf8_lossy(&h.path).into_owned())
        .collect()
}

#[test]
fn the_end_of_an_archive() {
    let one = file("one", b"1");
    let ok: [(&str, Vec<u8>); 5] = [
        ("two zero blocks", archive(&[one.clone(), END.to_vec()])),
        (
            "more zero blocks",
            archive(&[one.clone(), END.to_vec(), END.to_vec()]),
        ),
        ("end of stream at a block boundary", one.clone()),
        ("one zero block", archive(&[one.clone(), vec![0; 512]])),
        ("one and a half zero blocks", archive(&[one, vec![0; 700]])),
    ];
    for (what, bytes) in ok {
        let entries = read_all(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(paths(&entries), ["one"], "{what}");
    }
    assert!(read_all(&[]).unwrap().is_empty(), "an empty stream");
}

/// Errors name the entry and the byte they are about.
#[track_caller]
fn assert_fails(bytes: &[u8], entry: Option<&str>, offset: u64, what: &str) -> TarError {
    let err = read_all(bytes).expect_err(what);
    assert_eq!(err.entry.as_deref(), entry, "{what}: {err}");
    assert_eq!(err.offset, offset, "{what}: {err}");
    err
}

#[test]
fn truncated_archives_are_errors() {
    let one = file("one", &[7; 600]);
    assert_eq!(one.len(), 1536);
    let two = file("two", b"2");
    let cases: [(usize, Option<&str>, u64, &str); 6] = [
        (1536 + 100, Some("two"), 1536, "inside a header block"),
        (
            1536 + 2,
            Some("tw"),
            1536,
            "inside a header block, inside the name",
        ),
        (700, Some("one"), 700, "inside the data"),
        (1200, Some("one"), 1200, "inside the padding"),
        (512, Some("one"), 512, "right after the header"),
        (
            1536 + 512 + 1,
            Some("two"),
            1536 + 513,
            "inside the padding of the last entry",
        ),
    ];
    let bytes = archive(&[one, two]);
    for (cut, entry, offset, what) in cases {
        let err = assert_fails(&bytes[..cut], entry, offset, what);
        assert!(
            matches!(err.kind, TarErrorKind::Truncated(_)),
            "{what}: {err}"
        );
    }
}

#[test]
fn unread_data_is_skipped_and_truncation_still_found() {
    let bytes = archive(&[file("one", &[1; 5000]), file("two", b"2"), END.to_vec()]);
    let mut reader = TarReader::new(&bytes[..]);
    let mut first = reader.next_entry().unwrap().unwrap();
    let mut some = [0; 10];
    first.read_exact(&mut some).unwrap();
    let second = reader.next_entry().unwrap().unwrap();
    assert_eq!(second.header.path, b"two");

    let mut reader = TarReader::new(&bytes[..3000]);
    reader.next_entry().unwrap().unwrap();
    let err = reader.next_entry().unwrap_err();
    assert_eq!(
        (err.entry.as_deref(), err.offset),
        (Some("one"), 3000),
        "{err}"
    );
    let again = reader.next_entry().unwrap_err();
    assert!(matches!(again.kind, TarErrorKind::AfterError), "{again}");
}

#[test]
fn data_errors_name_the_entry_and_offset() {
    let bytes = archive(&[file("big", &[1; 5000])]);
    let mut reader = TarReader::new(&bytes[..2000]);
    let mut entry = reader.next_entry().unwrap().unwrap();
    let err = entry.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    let err = into_tar_error(err);
    assert_eq!((err.entry.as_deref(), err.offset), (Some("big"), 2000));
    assert_eq!(
        err.to_string(),
        "tar entry \"big\" at byte 2000: the stream ends inside the entry's data"
    );
}

#[test]
fn a_header_after_a_zero_block_is_an_error() {
    let bytes = archive(&[file("one", b"1"), vec![0; 512], file("hidden", b"2")]);
    let err = assert_fails(&bytes, Some("hidden"), 1536, "zero block, then a header");
    assert!(matches!(err.kind, TarErrorKind::Misplaced(_)), "{err}");
}

#[test]
fn bad_headers_are_named_by_their_name_field() {
    let mut bad_sum = file("corrupt", b"1");
    bad_sum[0] = b'C';
    let bytes = archive(&[file("ok", b""), bad_sum]);
    let err = assert_fails(&bytes, Some("Corrupt"), 512, "checksum");
    assert!(matches!(err.kind, TarErrorKind::Checksum { .. }), "{err}");

    let mut bad_size = header_block(b"sized", b'0', 0);
    bad_size[124..136].copy_from_slice(b"0000000009x\0");
    let mut header = ::tar::Header::from_byte_slice(&bad_size).clone();
    header.set_cksum();
    let err = assert_fails(header.as_bytes(), Some("sized"), 0, "size");
    assert!(
        matches!(err.kind, TarErrorKind::BadNumber { field: "size", .. }),
        "{err}"
    );
}

#[test]
fn unknown_entry_types_are_errors_naming_the_entry() {
    for typeflag in [b'8', b'V', b'D', b'M', b'N', b'X', b'A', 0x7f] {
        let bytes = archive(&[file("ok", b"1"), member(b"odd", typeflag, b"")]);
        let err = assert_fails(&bytes, Some("odd"), 1024, "unknown type");
        assert!(
            matches!(err.kind, TarErrorKind::UnknownType(t) if t == typeflag),
            "{err}"
        );
    }
}

#[test]
fn entry_types_and_header_only_entries() {
    let bytes = archive(&[
        member(b"file", b'0', b"0"),
        member(b"old-file", b'\0', b"old"),
        member(b"old-dir/", b'\0', b""),
        member(b"contiguous", b'7', b"7"),
        // Header-only types have no data whatever the size says (as Go
        // reads them): the "data" here is the next header.
        header_block(b"dir-with-size", b'5', 512),
        member(b"dir", b'5', b""),
        member(b"fifo", b'6', b""),
        END.to_vec(),
    ]);
    let entries = read_all(&bytes).unwrap();
    let kinds: Vec<(String, EntryKind, u64)> = entries
        .iter()
        .map(|(h, _)| {
            (
                String::from_utf8_lossy(&h.path).into_owned(),
                h.kind,
                h.size,
            )
        })
        .collect();
    let want = [
        ("file", EntryKind::File, 1),
        ("old-file", EntryKind::File, 3),
        ("old-dir/", EntryKind::Directory, 0),
        ("contiguous", EntryKind::File, 1),
        ("dir-with-size", EntryKind::Directory, 0),
        ("dir", EntryKind::Directory, 0),
        ("fifo", EntryKind::Fifo, 0),
    ]
    .map(|(p, k, s)| (p.to_owned(), k, s));
    assert_eq!(kinds, want);
}

/// Regression: the `tar` crate cut PAX records at newlines (tar-rs
/// issues 452 and 428), refusing such values or falling back to the
/// truncated ustar name.
#[test]
fn pax_values_with_newlines_and_binary_bytes_override_the_header() {
    let name = "new\nline/".to_owned() + &"n".repeat(150);
    let capability = b"\x01\x00\x00\x02\x0a\x00\x00\x00\x0a\n";
    let bytes = archive(&[
        pax(
            b'x',
            &[
                ("path", name.as_bytes()),
                ("linkpath", b"target\nwith newline"),
                ("uid", b"4294967294"),
                ("gid", b"100000"),
                ("mtime", b"1700000000.5"),
                ("SCHILY.xattr.security.capability", capability),
                ("SCHILY.xattr.user.b", b"=\n="),
                ("SCHILY.xattr.user.a", b"first"),
                ("SCHILY.xattr.user.a", b"later wins"),
                ("uname", b"ignored"),
            ],
        ),
        member(b"truncated-ustar-name", b'2', b""),
        END.to_vec(),
    ]);
    let entries = read_all(&bytes).unwrap();
    let (h, _) = &entries[0];
    assert_eq!(h.path, name.as_bytes());
    assert_eq!(h.link, b"target\nwith newline");
    assert_eq!((h.uid, h.gid), (4_294_967_294, 100_000));
    assert_eq!(
        h.mtime,
        Timestamp {
            secs: 1_700_000_000,
            nsec: 500_000_000
        }
    );
    let want: Vec<Xattr> = [
        (&b"security.capability"[..], &capability[..]),
        (b"user.a", b"later wins"),
        (b"user.b", b"=\n="),
    ]
    .map(|(k, v)| (k.to_vec(), v.to_vec()))
    .to_vec();
    assert_eq!(h.xattrs, want);
}

#[test]
fn pax_size_overrides_the_header_size() {
    let bytes = archive(&[
        pax(b'x', &[("size", b"3")]),
        header_block(b"f", b'0', 99),
        b"abc".to_vec(),
        vec![0; 509],
        file("next", b"n"),
    ]);
    let entries = read_all(&bytes).unwrap();
    assert_eq!(entries[0].1, b"abc");
    assert_eq!(paths(&entries), ["f", "next"]);
}

#[test]
fn global_headers_apply_to_all_later_entries() {
    let bytes = archive(&[
        file("before", b""),
        pax(
            b'g',
            &[
                ("uid", b"7"),
                ("mtime", b"5.25"),
                ("SCHILY.xattr.user.g", b"global"),
                ("comment", b"x"),
            ],
        ),
        file("plain", b""),
        pax(
            b'x',
            &[
                ("uid", b"8"),
                ("SCHILY.xattr.user.g", b"mine"),
                ("mtime", b""),
            ],
        ),
        file("overridden", b""),
        pax(b'g', &[("uid", b""), ("SCHILY.xattr.user.g", b"")]),
        file("after", b""),
    ]);
    let entries = read_all(&bytes).unwrap();
    let seen: Vec<(String, u64, i64, Vec<Xattr>)> = entries
        .into_iter()
        .map(|(h, _)| {
            (
                String::from_utf8(h.path).unwrap(),
                h.uid,
                h.mtime.secs,
                h.xattrs,
            )
        })
        .collect();
    let x = |v: &[u8]| vec![(b"user.g".to_vec(), v.to_vec())];
    assert_eq!(
        seen,
        [
            ("before".into(), 0, 1_700_000_000, vec![]),
            ("plain".into(), 7, 5, x(b"global")),
            ("overridden".into(), 8, 1_700_000_000, x(b"mine")),
            ("after".into(), 0, 5, vec![]),
        ]
    );
}

#[test]
fn misplaced_and_oversized_extended_headers() {
    let big = vec![b'v'; MAX_EXTENDED_HEADER as usize];
    let half = vec![b'v'; MAX_EXTENDED_HEADER as usize / 2];
    let global = vec![b'v'; MAX_GLOBAL_VALUES];
    let long = "l".repeat(MAX_PATH + 1);
    let cases: [(&str, Vec<u8>, u64); 6] = [
        (
            "x header over the limit",
            archive(&[pax(b'x', &[("comment", &big)]), file("f", b"")]),
            0,
        ),
        (
            "x headers over the limit together",
            archive(&[
                pax(b'x', &[("comment", &half)]),
                pax(b'x', &[("comment", &half)]),
                file("f", b""),
            ]),
            pax(b'x', &[("comment", &half)]).len() as u64,
        ),
        (
            "global values over the limit",
            archive(&[pax(b'g', &[("SCHILY.xattr.user.a", &global)])]),
            0,
        ),
        (
            "a global header inside an entry's headers",
            archive(&[
                pax(b'x', &[("uid", b"1")]),
                pax(b'g', &[("uid", b"2")]),
                file("f", b""),
            ]),
            1024,
        ),
        (
            "an extended header and no entry",
            archive(&[pax(b'x', &[("path", b"lost")]), END.to_vec()]),
            1024,
        ),
        (
            "a GNU long name over the limit",
            archive(&[
                member(b"././@LongLink", b'L', long.as_bytes()),
                file("f", b""),
            ]),
            0,
        ),
    ];
    for (what, bytes, offset) in cases {
        let err = read_all(&bytes).expect_err(what);
        assert_eq!(err.offset, offset, "{what}: {err}");
    }
    let err = read_all(&archive(&[pax(b'x', &[("path", b"lost")]), END.to_vec()])).unwrap_err();
    assert_eq!(err.entry.as_deref(), Some("lost"), "{err}");
}

#[test]
fn pax_errors_point_at_the_record() {
    let good = pax::record(b"uid", b"1");
    let body = [good.as_slice(), b"9 mtime=yesterday\n"].concat();
    let bytes = archive(&[member(b"PaxHeaders/f", b'x', &body), file("f", b"")]);
    let err = assert_fails(
        &bytes,
        Some("PaxHeaders/f"),
        512 + good.len() as u64,
        "bad record",
    );
    assert!(matches!(err.kind, TarErrorKind::PaxRecord(_)), "{err}");

    let body = [good.as_slice(), &pax::record(b"mtime", b"yesterday")].concat();
    let bytes = archive(&[member(b"PaxHeaders/f", b'x', &body), file("f", b"")]);
    let err = assert_fails(
        &bytes,
        Some("PaxHeaders/f"),
        512 + good.len() as u64,
        "bad value",
    );
    assert_eq!(
        err.to_string(),
        format!(
            "tar entry \"PaxHeaders/f\" at byte {}: PAX record \"mtime\": \"yesterday\" is not a time",
            512 + good.len()
        )
    );
}

#[test]
fn gnu_long_names_and_links() {
    let name = "d/".repeat(100) + "file";
    let target = "t".repeat(300);
    let bytes = archive(&[
        member(b"././@LongLink", b'L', &[name.as_bytes(), b"\0"].concat()),
        member(
            b"././@LongLink",
            b'K',
            &[target.as_bytes(), b"\0garbage"].concat(),
        ),
        member(b"d/d/d/d/d/cut", b'1', b""),
        END.to_vec(),
    ]);
    let entries = read_all(&bytes).unwrap();
    assert_eq!(entries[0].0.path, name.as_bytes());
    assert_eq!(entries[0].0.link, target.as_bytes());
    assert_eq!(entries[0].0.kind, EntryKind::HardLink);
}

#[test]
fn old_gnu_sparse_needs_a_gnu_header() {
    let bytes = archive(&[member(b"sparse", b'S', b""), END.to_vec()]);
    let err = assert_fails(&bytes, Some("sparse"), 0, "S in ustar");
    assert!(matches!(err.kind, TarErrorKind::Misplaced(_)), "{err}");
}

#[test]
fn pax_sparse_maps_must_match_the_data() {
    type Case<'a> = (&'a [(&'a str, &'a [u8])], &'a [u8], Option<&'a [u8]>);
    let cases: [Case<'_>; 4] = [
        (
            &[("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"2,3,8,2")],
            b"abcde",
            Some(b"\0\0abc\0\0\0de"),
        ),
        (
            &[("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"2,3")],
            b"abcde",
            None,
        ),
        (
            &[("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"2,9")],
            b"abcdefghi",
            None,
        ),
        (
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.realsize", b"10"),
            ],
            b"1\n2\n3\n",
            None,
        ),
    ];
    for (records, data, want) in cases {
        let bytes = archive(&[pax(b'x', records), member(b"s", b'0', data), END.to_vec()]);
        match (read_all(&bytes), want) {
            (Ok(entries), Some(want)) => assert_eq!(entries[0].1, want),
            (Err(e), None) => assert!(matches!(e.kind, TarErrorKind::Sparse(_)), "{e}"),
            (got, _) => panic!("{records:?}: {:?}", got.map(|e| e.len())),
        }
    }
}

// ---------------------------------------------------------------------
// Round trips: archives written by the `tar` crate and by Python.

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Spec {
    path: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timestamp,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Path components the writers keep as they are: no `.`/`..`, with
/// newlines, `=`, spaces, UTF-8 and bytes that are not UTF-8.
fn component() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(b"abcxyz019_-".to_vec()),
            1 => prop::sample::select(b"\n =\xff\xc3\xa9".to_vec()),
        ],
        1..40,
    )
    .prop_filter("not . or ..", |c| c != b"." && c != b"..")
}

fn path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(component(), 1..8).prop_map(|c| c.join(&b'/'))
}

fn kind() -> impl Strategy<Value = Kind> {
    let device = (0u32..4096, 0u32..100_000);
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(Kind::File),
        1 => Just(Kind::Dir),
        1 => path().prop_map(Kind::Symlink),
        1 => path().prop_map(Kind::HardLink),
        1 => device.clone().prop_map(|(a, b)| Kind::Char(a, b)),
        1 => device.prop_map(|(a, b)| Kind::Block(a, b)),
        1 => Just(Kind::Fifo),
    ]
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..70_000, 0o7_777_777u64..4_294_967_295]
}

fn spec(nanoseconds: bool, xattrs: bool) -> impl Strategy<Value = Spec> {
    let xattr = (
        "user\\.[a-z]{1,10}",
        prop::collection::vec(any::<u8>(), 0..40),
    );
    let xattr_count = if xattrs { 0..4usize } else { 0..1 };
    (
        path(),
        kind(),
        0u32..0o10000,
        id(),
        id(),
        0i64..20_000_000_000,
        if nanoseconds {
            0u32..1_000_000_000
        } else {
            0..1
        },
        prop::collection::btree_map(xattr.0, xattr.1, xattr_count),
    )
        .prop_map(|(path, kind, mode, uid, gid, secs, nsec, xattrs)| Spec {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime: Timestamp { secs, nsec },
            xattrs: xattrs.into_iter().collect(),
        })
}

impl Spec {
    /// What reading the entry back must give.
    fn expected(&self, dir_suffix: &[u8]) -> (EntryHeader, Vec<u8>) {
        let (kind, link, data) = match &self.kind {
            Kind::File(data) => (EntryKind::File, vec![], data.clone()),
            Kind::Dir => (EntryKind::Directory, vec![], vec![]),
            Kind::Symlink(t) => (EntryKind::Symlink, t.clone(), vec![]),
            Kind::HardLink(t) => (EntryKind::HardLink, t.clone(), vec![]),
            Kind::Char(major, minor) => (
                EntryKind::CharDevice {
                    major: *major,
                    minor: *minor,
                },
                vec![],
                vec![],
            ),
            Kind::Block(major, minor) => (
                EntryKind::BlockDevice {
                    major: *major,
                    minor: *minor,
                },
                vec![],
                vec![],
            ),
            Kind::Fifo => (EntryKind::Fifo, vec![], vec![]),
        };
        let mut path = self.path.clone();
        if kind == EntryKind::Directory {
            path.extend_from_slice(dir_suffix);
        }
        let header = EntryHeader {
            path,
            link,
            kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            size: data.len() as u64,
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
                .collect(),
        };
        (header, data)
    }

    fn typeflag(&self) -> ::tar::EntryType {
        use ::tar::EntryType as T;
        match self.kind {
            Kind::File(_) => T::Regular,
            Kind::Dir => T::Directory,
            Kind::Symlink(_) => T::Symlink,
            Kind::HardLink(_) => T::Link,
            Kind::Char(..) => T::Char,
            Kind::Block(..) => T::Block,
            Kind::Fifo => T::Fifo,
        }
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(data) => data,
            _ => &[],
        }
    }

    fn link(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Symlink(t) | Kind::HardLink(t) => Some(t),
            _ => None,
        }
    }

    fn fill_header(&self, header: &mut ::tar::Header) {
        header.set_entry_type(self.typeflag());
        header.set_mode(self.mode);
        header.set_uid(self.uid);
        header.set_gid(self.gid);
        header.set_mtime(self.mtime.secs as u64);
        header.set_size(self.data().len() as u64);
        if let Kind::Char(major, minor) | Kind::Block(major, minor) = self.kind {
            header.set_device_major(major).unwrap();
            header.set_device_minor(minor).unwrap();
        }
    }

    /// PAX: every value in records, the ustar fields cut short.
    fn append_pax(&self, builder: &mut ::tar::Builder<Vec<u8>>) {
        let mtime = pax_time(self.mtime);
        let (uid, gid) = (self.uid.to_string(), self.gid.to_string());
        let mut records: Vec<(String, &[u8])> = vec![
            ("path".into(), &self.path),
            ("mtime".into(), mtime.as_bytes()),
            ("uid".into(), uid.as_bytes()),
            ("gid".into(), gid.as_bytes()),
        ];
        if let Some(link) = self.link() {
            records.push(("linkpath".into(), link));
        }
        for (name, value) in &self.xattrs {
            records.push((format!("SCHILY.xattr.{name}"), value));
        }
        builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        let mut header = ::tar::Header::new_ustar();
        self.fill_header(&mut header);
        let cut = self.path.len().min(100);
        header.as_old_mut().name[..cut].copy_from_slice(&self.path[..cut]);
        header.set_cksum();
        builder.append(&header, self.data()).unwrap();
    }

    /// GNU: long names in `L`/`K` entries, big numbers in base-256.
    fn append_gnu(&self, builder: &mut ::tar::Builder<Vec<u8>>) {
        let mut header = ::tar::Header::new_gnu();
        self.fill_header(&mut header);
        let path = Path::new(std::ffi::OsStr::from_bytes(&self.path));
        match self.link() {
            Some(link) => {
                let link = Path::new(std::ffi::OsStr::from_bytes(link));
                builder.append_link(&mut header, path, link).unwrap();
            }
            None => builder.append_data(&mut header, path, self.data()).unwrap(),
        }
    }

    fn python(&self) -> serde_json::Value {
        let kind = match self.kind {
            Kind::File(_) => "file",
            Kind::Dir => "dir",
            Kind::Symlink(_) => "symlink",
            Kind::HardLink(_) => "hardlink",
            Kind::Char(..) => "char",
            Kind::Block(..) => "block",
            Kind::Fifo => "fifo",
        };
        let (major, minor) = match self.kind {
            Kind::Char(a, b) | Kind::Block(a, b) => (a, b),
            _ => (0, 0),
        };
        let mut pax: Vec<[String; 2]> = self
            .xattrs
            .iter()
            .map(|(k, v)| [hex::encode(format!("SCHILY.xattr.{k}")), hex::encode(v)])
            .collect();
        if self.mtime.nsec != 0 {
            let mtime = pax_time(self.mtime);
            pax.push([hex::encode("mtime"), hex::encode(mtime)]);
        }
        serde_json::json!({
            "path": hex::encode(&self.path),
            "link": hex::encode(self.link().unwrap_or_default()),
            "data": hex::encode(self.data()),
            "kind": kind,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime": self.mtime.secs,
            "major": major,
            "minor": minor,
            "pax": pax,
        })
    }
}

/// A time as a PAX record writes it: `-1.25` is (-2 s, 750,000,000 ns).
fn pax_time(t: Timestamp) -> String {
    match (t.secs, t.nsec) {
        (secs, nsec) if secs >= 0 => format!("{secs}.{nsec:09}"),
        (secs, 0) => secs.to_string(),
        (secs, nsec) => format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nsec),
    }
}

fn finish(mut builder: ::tar::Builder<Vec<u8>>) -> Vec<u8> {
    builder.finish().unwrap();
    builder.into_inner().unwrap()
}

fn write_with_python(format: &str, specs: &[Spec]) -> Vec<u8> {
    let entries: Vec<_> = specs.iter().map(Spec::python).collect();
    let input = serde_json::json!({"format": format, "entries": entries}).to_string();
    let mut child = Command::new("python3")
        .args(["-c", include_str!("testdata/write_tar.py")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "python3 failed");
    output.stdout
}

#[track_caller]
fn assert_reads_back(archive: &[u8], specs: &[Spec], dir_suffix: &[u8], what: &str) {
    let entries = read_all(archive).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want: Vec<_> = specs.iter().map(|s| s.expected(dir_suffix)).collect();
    assert_eq!(entries.len(), want.len(), "{what}");
    for (got, want) in entries.iter().zip(&want) {
        assert_eq!(got, want, "{what}");
    }
}

/// The `tar` crate cannot cut long names that are not UTF-8 for GNU
/// headers (Python's GNU archives cover those).
fn ascii_names(mut spec: Spec) -> Spec {
    let ascii = |bytes: &mut Vec<u8>| {
        bytes
            .iter_mut()
            .filter(|b| !b.is_ascii())
            .for_each(|b| *b = b'u');
    };
    ascii(&mut spec.path);
    if let Kind::Symlink(target) | Kind::HardLink(target) = &mut spec.kind {
        ascii(target);
    }
    spec
}

/// GNU and old formats have neither nanoseconds nor xattrs.
fn without_pax_only_fields(mut spec: Spec) -> Spec {
    spec.mtime.nsec = 0;
    spec.xattrs.clear();
    spec
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tar_crate_pax_archives_read_back(specs in prop::collection::vec(spec(true, true), 1..12)) {
        let mut builder = ::tar::Builder::new(Vec::new());
        for spec in &specs {
            spec.append_pax(&mut builder);
        }
        assert_reads_back(&finish(builder), &specs, b"", "tar crate, PAX");
    }

    #[test]
    fn tar_crate_gnu_archives_read_back(specs in prop::collection::vec(spec(false, false), 1..12)) {
        let specs: Vec<Spec> = specs.into_iter().map(ascii_names).collect();
        let mut builder = ::tar::Builder::new(Vec::new());
        for spec in &specs {
            spec.append_gnu(&mut builder);
        }
        assert_reads_back(&finish(builder), &specs, b"", "tar crate, GNU");
    }
}

proptest! {
    // Each case starts a Python interpreter.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn python_pax_archives_read_back(specs in prop::collection::vec(spec(true, true), 1..12)) {
        let archive = write_with_python("pax", &specs);
        assert_reads_back(&archive, &specs, b"/", "Python, PAX");
    }

    #[test]
    fn python_gnu_archives_read_back(specs in prop::collection::vec(spec(false, false), 1..12)) {
        let specs: Vec<Spec> = specs.into_iter().map(without_pax_only_fields).collect();
        let archive = write_with_python("gnu", &specs);
        assert_reads_back(&archive, &specs, b"/", "Python, GNU");
    }
}

/// Python writes negative times in base-256 (GNU) or as PAX records.
#[test]
fn python_negative_times() {
    let mut spec = Spec {
        path: b"old".to_vec(),
        kind: Kind::File(b"x".to_vec()),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp {
            secs: -86_400,
            nsec: 0,
        },
        xattrs: vec![],
    };
    assert_reads_back(
        &write_with_python("gnu", &[spec.clone()]),
        &[spec.clone()],
        b"/",
        "GNU",
    );
    spec.mtime = Timestamp {
        secs: -2,
        nsec: 750_000_000,
    };
    assert_reads_back(
        &write_with_python("pax", &[spec.clone()]),
        &[spec],
        b"/",
        "PAX",
    );
}

// ---------------------------------------------------------------------
// Sparse files written by GNU tar.

/// A sparse file: `size` bytes with data at the given (offset, bytes).
struct SparseFile {
    name: &'static str,
    size: u64,
    runs: Vec<(u64, Vec<u8>)>,
}

impl SparseFile {
    fn create(&self, dir: &Path) -> Vec<u8> {
        let file = std::fs::File::create(dir.join(self.name)).unwrap();
        file.set_len(self.size).unwrap();
        let mut content = vec![0; self.size as usize];
        for (offset, bytes) in &self.runs {
            file.write_all_at(bytes, *offset).unwrap();
            let at = *offset as usize;
            content[at..at + bytes.len()].copy_from_slice(bytes);
        }
        content
    }
}

fn sparse_files() -> Vec<SparseFile> {
    let block = |fill: u8| vec![fill; 4096];
    vec![
        SparseFile {
            name: "holes-around",
            size: 3 << 20,
            runs: vec![(1 << 20, block(b'a')), ((2 << 20) + 8192, block(b'b'))],
        },
        SparseFile {
            name: "data-at-both-ends",
            size: (1 << 20) + 100,
            runs: vec![(0, block(b's')), (1 << 20, vec![b'e'; 100])],
        },
        // More runs than an old GNU header holds: extension blocks.
        SparseFile {
            name: "many-runs",
            size: 64 * 65536,
            runs: (0..64u64)
                .map(|i| (i * 65536, block(i as u8 + 1)))
                .collect(),
        },
        SparseFile {
            name: "all-hole",
            size: 1 << 20,
            runs: vec![],
        },
    ]
}

/// GNU tar's formats and a marker each one's archive must contain.
const GNU_TAR_SPARSE: [(&[&str], &[u8]); 4] = [
    (&["--format=gnu"], b"ustar  \0"),
    (
        &["--format=posix", "--sparse-version=0.0"],
        b"GNU.sparse.offset=",
    ),
    (
        &["--format=posix", "--sparse-version=0.1"],
        b"GNU.sparse.map=",
    ),
    (
        &["--format=posix", "--sparse-version=1.0"],
        b"GNU.sparse.major=1",
    ),
];

#[test]
fn gnu_tar_sparse_files_read_as_their_logical_content() {
    let work = tempfile::tempdir().unwrap();
    let files = sparse_files();
    let contents: Vec<Vec<u8>> = files.iter().map(|f| f.create(work.path())).collect();
    for (options, marker) in GNU_TAR_SPARSE {
        let output = Command::new("tar")
            .args(["--sparse", "-cf", "-", "-C"])
            .arg(work.path())
            .args(options)
            .args(files.iter().map(|f| f.name))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{options:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let archive = output.stdout;
        let what = format!("{options:?}");
        assert!(
            archive.windows(marker.len()).any(|w| w == marker),
            "{what}: not sparse"
        );
        assert!(
            archive.len() < 1 << 20,
            "{what}: {} bytes, the holes were stored",
            archive.len()
        );
        let entries = read_all(&archive).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(entries.len(), files.len(), "{what}");
        for ((header, data), (file, content)) in entries.iter().zip(files.iter().zip(&contents)) {
            assert_eq!(header.path, file.name.as_bytes(), "{what}");
            assert_eq!(header.size, file.size, "{what}: {}", file.name);
            assert!(data == content, "{what}: {} differs", file.name);
        }
    }
    let old_gnu = Command::new("tar")
        .args(["--sparse", "--format=gnu", "-cf", "-", "-C"])
        .arg(work.path())
        .arg("many-runs")
        .output()
        .unwrap()
        .stdout;
    assert_eq!(old_gnu[156], b'S');
    assert_eq!(old_gnu[482], 1, "the map continues in extension blocks");
}
