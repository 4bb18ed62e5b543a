use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

use super::*;
use crate::fs_at;
use crate::tree::{HARDLINKED_FILE, SPARSE_FILE, TrickyTree};

fn create(root: &Path, tree: &TrickyTree) {
    tree.create(root).unwrap();
}

fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let spec = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    let times = Timestamps {
        last_access: spec,
        last_modification: spec,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// Runs `mutate`, then puts back the mtimes that `paths` had before (the
/// mutation's side effects on them are not what a case tests).
fn keeping_mtimes(paths: &[PathBuf], mutate: impl FnOnce()) {
    let saved: Vec<(PathBuf, i64, i64)> = paths
        .iter()
        .map(|p| {
            let m = fs::symlink_metadata(p).unwrap();
            (p.clone(), m.mtime(), m.mtime_nsec())
        })
        .collect();
    mutate();
    for (path, sec, nsec) in saved {
        if fs::symlink_metadata(&path).is_ok() {
            set_mtime(&path, sec, u32::try_from(nsec).unwrap());
        }
    }
}

/// `rel` and its parent directory, below `root`.
fn with_parent(root: &Path, rel: &str) -> Vec<PathBuf> {
    let path = root.join(rel);
    vec![path.parent().unwrap().to_path_buf(), path]
}

fn blake3_of(path: &Path) -> String {
    blake3::hash(&fs::read(path).unwrap()).to_hex().to_string()
}

fn diff(path: &str, kind: DiffKind) -> Difference {
    Difference {
        path: PathBuf::from(path),
        kind,
    }
}

fn mtime_diff(path: &str, expected: (i64, u32), actual: (i64, u32)) -> Vec<Difference> {
    let expected = Mtime {
        sec: expected.0,
        nsec: expected.1,
    };
    let actual = Mtime {
        sec: actual.0,
        nsec: actual.1,
    };
    vec![diff(path, DiffKind::Mtime { expected, actual })]
}

fn xattr_diff(
    path: &str,
    name: &str,
    expected: Option<&[u8]>,
    actual: Option<&[u8]>,
) -> Vec<Difference> {
    let kind = DiffKind::Xattr {
        name: name.as_bytes().to_vec(),
        expected: expected.map(<[u8]>::to_vec),
        actual: actual.map(<[u8]>::to_vec),
    };
    vec![diff(path, kind)]
}

fn ignoring_nsec() -> CompareOptions {
    CompareOptions {
        ignore_mtime_nsec: true,
        ..CompareOptions::default()
    }
}

fn differences(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<Difference> {
    match compare_trees(expected, actual, opts) {
        Ok(()) => Vec::new(),
        Err(tree_diff) => tree_diff.differences,
    }
}

struct Case {
    name: &'static str,
    mutate: fn(&Path),
    opts: fn() -> CompareOptions,
    /// The exact differences, given the expected and actual roots.
    expect: fn(&Path, &Path) -> Vec<Difference>,
}

fn strict() -> CompareOptions {
    CompareOptions::default()
}

fn nothing(_: &Path, _: &Path) -> Vec<Difference> {
    Vec::new()
}

fn write_at(path: &Path, bytes: &[u8], offset: u64) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>) {
    std::os::unix::fs::lchown(path, uid, gid).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "missing file",
            mutate: |a| {
                keeping_mtimes(&[a.join("regular")], || {
                    fs::remove_file(a.join("regular/small")).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "regular/small",
                    DiffKind::MissingInActual(FileKind::Regular),
                )]
            },
        },
        Case {
            name: "unexpected symlink",
            mutate: |a| {
                keeping_mtimes(&[a.join("regular")], || {
                    std::os::unix::fs::symlink("x", a.join("regular/extra")).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "regular/extra",
                    DiffKind::UnexpectedInActual(FileKind::Symlink),
                )]
            },
        },
        Case {
            name: "missing directory is reported once",
            mutate: |a| {
                keeping_mtimes(&[a.join("xattrs")], || {
                    fs::remove_dir_all(a.join("xattrs/dir")).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "xattrs/dir",
                    DiffKind::MissingInActual(FileKind::Directory),
                )]
            },
        },
        Case {
            name: "file replaced by directory",
            mutate: |a| {
                keeping_mtimes(&[a.join("regular")], || {
                    fs::remove_file(a.join("regular/no-newline")).unwrap();
                    fs::create_dir(a.join("regular/no-newline")).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                let kind = DiffKind::FileKind {
                    expected: FileKind::Regular,
                    actual: FileKind::Directory,
                };
                vec![diff("regular/no-newline", kind)]
            },
        },
        Case {
            name: "size",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, "regular/small"), || {
                    fs::OpenOptions::new()
                        .append(true)
                        .open(a.join("regular/small"))
                        .unwrap()
                        .write_all(b"!")
                        .unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "regular/small",
                    DiffKind::Size {
                        expected: 14,
                        actual: 15,
                    },
                )]
            },
        },
        Case {
            name: "content, same size",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, "regular/small"), || {
                    write_at(&a.join("regular/small"), b"L", 3);
                });
            },
            opts: strict,
            expect: |e, a| {
                vec![diff(
                    "regular/small",
                    DiffKind::Content {
                        offset: 3,
                        expected_blake3: blake3_of(&e.join("regular/small")),
                        actual_blake3: blake3_of(&a.join("regular/small")),
                    },
                )]
            },
        },
        Case {
            name: "content in the last data extent of a sparse file",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, SPARSE_FILE), || {
                    write_at(&a.join(SPARSE_FILE), b"\0\0", (16 << 20) - 2);
                });
            },
            opts: strict,
            expect: |e, a| {
                let (e_bytes, a_bytes) = (
                    fs::read(e.join(SPARSE_FILE)).unwrap(),
                    fs::read(a.join(SPARSE_FILE)).unwrap(),
                );
                let offset = e_bytes
                    .iter()
                    .zip(&a_bytes)
                    .position(|(x, y)| x != y)
                    .unwrap() as u64;
                assert!(offset >= (16 << 20) - 2);
                vec![diff(
                    SPARSE_FILE,
                    DiffKind::Content {
                        offset,
                        expected_blake3: blake3_of(&e.join(SPARSE_FILE)),
                        actual_blake3: blake3_of(&a.join(SPARSE_FILE)),
                    },
                )]
            },
        },
        Case {
            name: "hole filled with zeros",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, SPARSE_FILE), || {
                    write_at(&a.join(SPARSE_FILE), &[0; 8192], 1 << 20);
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    SPARSE_FILE,
                    DiffKind::HolesFilled {
                        first_offset: 1 << 20,
                        bytes: 8192,
                    },
                )]
            },
        },
        Case {
            name: "hole filled with zeros, holes not checked",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, SPARSE_FILE), || {
                    write_at(&a.join(SPARSE_FILE), &[0; 8192], 1 << 20);
                });
            },
            opts: || CompareOptions {
                check_holes: false,
                ..CompareOptions::default()
            },
            expect: nothing,
        },
        Case {
            name: "data written into a hole, holes not checked",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, SPARSE_FILE), || {
                    write_at(&a.join(SPARSE_FILE), b"x", 2 << 20);
                });
            },
            opts: || CompareOptions {
                check_holes: false,
                ..CompareOptions::default()
            },
            expect: |e, a| {
                vec![diff(
                    SPARSE_FILE,
                    DiffKind::Content {
                        offset: 2 << 20,
                        expected_blake3: blake3_of(&e.join(SPARSE_FILE)),
                        actual_blake3: blake3_of(&a.join(SPARSE_FILE)),
                    },
                )]
            },
        },
        Case {
            name: "setuid bit",
            mutate: |a| {
                fs::set_permissions(a.join("modes/file-4755"), fs::Permissions::from_mode(0o755))
                    .unwrap();
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "modes/file-4755",
                    DiffKind::Mode {
                        expected: 0o4755,
                        actual: 0o755,
                    },
                )]
            },
        },
        Case {
            name: "sticky bit of a directory",
            mutate: |a| {
                fs::set_permissions(a.join("modes/dir-1777"), fs::Permissions::from_mode(0o777))
                    .unwrap();
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "modes/dir-1777",
                    DiffKind::Mode {
                        expected: 0o1777,
                        actual: 0o777,
                    },
                )]
            },
        },
        Case {
            name: "uid",
            mutate: |a| chown(&a.join("owners/1000-1000"), Some(1001), None),
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "owners/1000-1000",
                    DiffKind::Uid {
                        expected: 1000,
                        actual: 1001,
                    },
                )]
            },
        },
        Case {
            name: "gid of a symlink",
            mutate: |a| chown(&a.join("owners/symlink-1000"), None, Some(0)),
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "owners/symlink-1000",
                    DiffKind::Gid {
                        expected: 1000,
                        actual: 0,
                    },
                )]
            },
        },
        Case {
            name: "mtime nanoseconds",
            mutate: |a| set_mtime(&a.join("times/1980"), 315_532_800, 0),
            opts: strict,
            expect: |_, _| mtime_diff("times/1980", (315_532_800, 123_456_789), (315_532_800, 0)),
        },
        Case {
            name: "mtime nanoseconds ignored",
            mutate: |a| set_mtime(&a.join("times/1980"), 315_532_800, 0),
            opts: ignoring_nsec,
            expect: nothing,
        },
        Case {
            name: "mtime rounded up to the next second, nanoseconds ignored",
            mutate: |a| set_mtime(&a.join("times/year-2100"), 4_102_444_801, 0),
            opts: ignoring_nsec,
            expect: nothing,
        },
        Case {
            name: "mtime rounded up from under half a second, nanoseconds ignored",
            mutate: |a| set_mtime(&a.join("times/1980"), 315_532_801, 0),
            opts: ignoring_nsec,
            expect: |_, _| mtime_diff("times/1980", (315_532_800, 123_456_789), (315_532_801, 0)),
        },
        Case {
            name: "mtime seconds of a symlink",
            mutate: |a| set_mtime(&a.join("times/symlink"), 1_234_567_891, 987_654_321),
            opts: ignoring_nsec,
            expect: |_, _| {
                mtime_diff(
                    "times/symlink",
                    (1_234_567_890, 987_654_321),
                    (1_234_567_891, 987_654_321),
                )
            },
        },
        Case {
            name: "directory mtime",
            mutate: |a| set_mtime(&a.join("times/dir-year-2200"), 1, 0),
            opts: strict,
            expect: |_, _| {
                let (expected, actual) = (
                    Mtime {
                        sec: 7_258_118_400,
                        nsec: 7,
                    },
                    Mtime { sec: 1, nsec: 0 },
                );
                vec![diff(
                    "times/dir-year-2200",
                    DiffKind::Mtime { expected, actual },
                )]
            },
        },
        Case {
            name: "directory mtime ignored",
            mutate: |a| set_mtime(&a.join("times/dir-year-2200"), 1, 0),
            opts: || CompareOptions {
                ignore_dir_mtime: true,
                ..CompareOptions::default()
            },
            expect: nothing,
        },
        Case {
            name: "xattr value",
            mutate: |a| {
                rustix::fs::setxattr(
                    a.join("xattrs/several"),
                    "user.alpha",
                    b"changed",
                    rustix::fs::XattrFlags::REPLACE,
                )
                .unwrap();
            },
            opts: strict,
            expect: |_, _| {
                xattr_diff(
                    "xattrs/several",
                    "user.alpha",
                    Some(b"first"),
                    Some(b"changed"),
                )
            },
        },
        Case {
            name: "empty xattr removed",
            mutate: |a| rustix::fs::removexattr(a.join("xattrs/several"), "user.empty").unwrap(),
            opts: strict,
            expect: |_, _| xattr_diff("xattrs/several", "user.empty", Some(b""), None),
        },
        Case {
            name: "xattr added to a directory",
            mutate: |a| {
                rustix::fs::setxattr(
                    a.join("xattrs/dir"),
                    "user.new",
                    b"\x00",
                    rustix::fs::XattrFlags::CREATE,
                )
                .unwrap();
            },
            opts: strict,
            expect: |_, _| xattr_diff("xattrs/dir", "user.new", None, Some(b"\0")),
        },
        Case {
            name: "capability removed",
            mutate: |a| {
                rustix::fs::removexattr(a.join("xattrs/capability"), "security.capability")
                    .unwrap();
            },
            opts: strict,
            expect: |_, _| {
                xattr_diff(
                    "xattrs/capability",
                    "security.capability",
                    Some(&crate::tree::CAPABILITY_V2),
                    None,
                )
            },
        },
        Case {
            name: "ignored xattr names and prefixes",
            mutate: |a| {
                let flags = rustix::fs::XattrFlags::empty();
                rustix::fs::setxattr(a.join("xattrs/dir"), "user.ignored", b"1", flags).unwrap();
                rustix::fs::setxattr(a.join("xattrs/several"), "user.alpha", b"2", flags).unwrap();
            },
            opts: || CompareOptions {
                ignored_xattrs: vec!["user.ignored".into(), "user.al".into()],
                ..CompareOptions::default()
            },
            // "user.al" is not a prefix pattern (no trailing dot).
            expect: |_, _| xattr_diff("xattrs/several", "user.alpha", Some(b"first"), Some(b"2")),
        },
        Case {
            name: "ignored xattr prefix",
            mutate: |a| {
                let flags = rustix::fs::XattrFlags::empty();
                rustix::fs::setxattr(a.join("xattrs/several"), "user.alpha", b"2", flags).unwrap();
            },
            opts: || CompareOptions {
                ignored_xattrs: vec!["user.".into()],
                ..CompareOptions::default()
            },
            expect: nothing,
        },
        Case {
            name: "symlink target",
            mutate: |a| {
                keeping_mtimes(&with_parent(a, "symlinks/relative"), || {
                    fs::remove_file(a.join("symlinks/relative")).unwrap();
                    std::os::unix::fs::symlink("../regular/empty", a.join("symlinks/relative"))
                        .unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                let kind = DiffKind::SymlinkTarget {
                    expected: b"../regular/small".to_vec(),
                    actual: b"../regular/empty".to_vec(),
                };
                vec![diff("symlinks/relative", kind)]
            },
        },
        Case {
            name: "device numbers",
            mutate: |a| {
                let path = a.join("special/null");
                keeping_mtimes(&with_parent(a, "special/null"), || {
                    fs::remove_file(&path).unwrap();
                    let mode = rustix::fs::Mode::from_raw_mode(0o666);
                    rustix::fs::mknodat(
                        CWD,
                        &path,
                        rustix::fs::FileType::CharacterDevice,
                        mode,
                        rustix::fs::makedev(1, 5),
                    )
                    .unwrap();
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    "special/null",
                    DiffKind::Rdev {
                        expected: (1, 3),
                        actual: (1, 5),
                    },
                )]
            },
        },
        Case {
            name: "hardlink broken into a copy",
            mutate: |a| {
                keeping_mtimes(&[a.join("hardlinks")], || {
                    let copy = a.join("hardlinks/copy");
                    crate::process::run(
                        std::process::Command::new("cp")
                            .arg("-a")
                            .arg(a.join(HARDLINKED_FILE))
                            .arg(&copy),
                    );
                    fs::rename(&copy, a.join("hardlinks/b")).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                let deep = TrickyTree::deep_dir().join("hardlink");
                let group = [
                    PathBuf::from(HARDLINKED_FILE),
                    "hardlinks/b".into(),
                    "hardlinks/sub/c".into(),
                    "links-elsewhere/d".into(),
                    deep,
                ];
                let mut diffs = Vec::new();
                for path in &group {
                    let broken = path == Path::new("hardlinks/b");
                    let others = |without_b: bool| -> Vec<PathBuf> {
                        let mut others: Vec<PathBuf> = group
                            .iter()
                            .filter(|p| {
                                *p != path && !(without_b && *p == Path::new("hardlinks/b"))
                            })
                            .cloned()
                            .collect();
                        others.sort();
                        others
                    };
                    let nlink = DiffKind::Nlink {
                        expected: 5,
                        actual: if broken { 1 } else { 4 },
                    };
                    let actual = if broken { Vec::new() } else { others(true) };
                    diffs.push(Difference {
                        path: path.clone(),
                        kind: nlink,
                    });
                    diffs.push(Difference {
                        path: path.clone(),
                        kind: DiffKind::Hardlinks {
                            expected: others(false),
                            actual,
                        },
                    });
                }
                diffs
            },
        },
        Case {
            name: "content beyond PATH_MAX",
            mutate: |a| {
                let root = fs_at::open_root(a).unwrap();
                let components = crate::tree::deep_dir_components();
                let dir = fs_at::open_dir_path(root.as_fd(), &components).unwrap();
                let flags = rustix::fs::OFlags::WRONLY;
                let file =
                    rustix::fs::openat(&dir, "file", flags, rustix::fs::Mode::empty()).unwrap();
                let before = rustix::fs::fstat(&file).unwrap();
                rustix::io::pwrite(&file, b"D", 0).unwrap();
                let spec = Timespec {
                    tv_sec: before.st_mtime,
                    tv_nsec: before.st_mtime_nsec as i64,
                };
                rustix::fs::futimens(
                    &file,
                    &Timestamps {
                        last_access: spec,
                        last_modification: spec,
                    },
                )
                .unwrap();
            },
            opts: strict,
            expect: |_, _| {
                let kind = DiffKind::Content {
                    offset: 0,
                    expected_blake3: blake3::hash(b"deep content\n").to_hex().to_string(),
                    actual_blake3: blake3::hash(b"Deep content\n").to_hex().to_string(),
                };
                vec![Difference {
                    path: TrickyTree::deep_dir().join("file"),
                    kind,
                }]
            },
        },
        Case {
            name: "non-UTF-8 name missing",
            mutate: |a| {
                let name = std::ffi::OsStr::from_bytes(b"names/non-utf8-\xff\xfe\x80");
                keeping_mtimes(&[a.join("names")], || {
                    fs::remove_file(a.join(name)).unwrap();
                });
            },
            opts: strict,
            expect: |_, _| {
                let path =
                    PathBuf::from(std::ffi::OsStr::from_bytes(b"names/non-utf8-\xff\xfe\x80"));
                vec![Difference {
                    path,
                    kind: DiffKind::MissingInActual(FileKind::Regular),
                }]
            },
        },
        Case {
            name: "root mode",
            mutate: |a| fs::set_permissions(a, fs::Permissions::from_mode(0o700)).unwrap(),
            opts: strict,
            expect: |_, _| {
                vec![diff(
                    ".",
                    DiffKind::Mode {
                        expected: 0o755,
                        actual: 0o700,
                    },
                )]
            },
        },
        Case {
            name: "root metadata ignored",
            mutate: |a| fs::set_permissions(a, fs::Permissions::from_mode(0o700)).unwrap(),
            opts: || CompareOptions {
                ignore_root_metadata: true,
                ..CompareOptions::default()
            },
            expect: nothing,
        },
    ]
}

#[test]
fn each_mutation_is_reported_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join("expected");
    let tree = TrickyTree::small().big_dir_entries(20);
    create(&expected, &tree);
    for (i, case) in cases().iter().enumerate() {
        let actual = dir.path().join(format!("actual-{i}"));
        create(&actual, &tree);
        assert_eq!(
            differences(&expected, &actual, &strict()),
            Vec::new(),
            "before mutating: {}",
            case.name
        );
        (case.mutate)(&actual);
        let found = differences(&expected, &actual, &(case.opts)());
        let mut wanted = (case.expect)(&expected, &actual);
        wanted.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(found, wanted, "case: {}", case.name);
        fs::remove_dir_all(&actual).unwrap();
    }
}

#[test]
fn independent_creations_compare_equal() {
    let dir = tempfile::tempdir().unwrap();
    let tree = TrickyTree::small()
        .unix_sockets(true)
        .whiteout_like_names(true);
    create(&dir.path().join("a"), &tree);
    create(&dir.path().join("b"), &tree);
    compare_trees(
        &dir.path().join("a"),
        &dir.path().join("b"),
        &CompareOptions::default(),
    )
    .unwrap();
}

#[test]
fn missing_root_is_reported_as_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let err = compare_trees(
        dir.path(),
        &dir.path().join("nope"),
        &CompareOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.differences.len(), 1);
    assert!(
        matches!(&err.differences[0].kind, DiffKind::Unreadable { side: Side::Actual, error } if error.contains("No such file"))
    );
}

#[test]
fn report_names_paths_escaped_and_values_readably() {
    let dir = tempfile::tempdir().unwrap();
    let (e, a) = (dir.path().join("e"), dir.path().join("a"));
    let tree = TrickyTree::small().big_dir_entries(1);
    create(&e, &tree);
    create(&a, &tree);
    fs::set_permissions(a.join("modes/file-4755"), fs::Permissions::from_mode(0o755)).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"names/new\nline");
    keeping_mtimes(&[a.join("names")], || {
        fs::remove_file(a.join(name)).unwrap();
    });
    let flags = rustix::fs::XattrFlags::REPLACE;
    rustix::fs::setxattr(a.join("xattrs/several"), "user.binary", b"\x00\x01", flags).unwrap();
    let report = compare_trees(&e, &a, &CompareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        report.starts_with("3 difference(s) between expected "),
        "{report}"
    );
    assert!(
        report.contains("  modes/file-4755: mode: expected 4755, actual 0755\n"),
        "{report}"
    );
    assert!(
        report.contains("  names/new\\nline: regular file missing in actual\n"),
        "{report}"
    );
    assert!(
        report.contains("xattr user.binary: expected \"\\x00\\x01\\x02"),
        "{report}"
    );
    assert!(
        report.contains("(256 bytes), actual \"\\x00\\x01\"\n"),
        "{report}"
    );
}

/// The real-size tree (100,000-entry directory, 3 GiB sparse file): two
/// creations compare equal, and one missing entry among the 100,000 is
/// found. Prints the timings.
#[test]
fn full_trees_compare_equal_and_fast() {
    let dir = tempfile::tempdir().unwrap();
    let (e, a) = (dir.path().join("e"), dir.path().join("a"));
    let started = Instant::now();
    create(&e, &TrickyTree::full());
    create(&a, &TrickyTree::full());
    let created = started.elapsed();
    let started = Instant::now();
    compare_trees(&e, &a, &CompareOptions::default()).unwrap();
    let compared = started.elapsed();
    eprintln!("full tricky tree: created twice in {created:?}, compared in {compared:?}");
    let victim = a.join(crate::tree::BIG_DIR).join("entry-054321");
    keeping_mtimes(&[a.join(crate::tree::BIG_DIR)], || {
        fs::remove_file(&victim).unwrap();
    });
    let found = differences(&e, &a, &CompareOptions::default());
    assert_eq!(
        found,
        vec![diff(
            "bigdir/entry-054321",
            DiffKind::MissingInActual(FileKind::Regular)
        )]
    );
}
