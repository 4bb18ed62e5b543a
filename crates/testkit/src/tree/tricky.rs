//! The entries of a [`TrickyTree`], one function per area of the layout.

use super::plan::{Plan, Special};
use super::{MIB, TrickyTree};

pub(super) fn plan(options: &TrickyTree) -> Plan {
    let mut plan = Plan::new();
    regular_files(&mut plan, options.large_file_size);
    sparse_files(&mut plan, options.sparse_size);
    modes(&mut plan);
    owners(&mut plan);
    times(&mut plan);
    xattrs(&mut plan);
    symlinks(&mut plan);
    specials(&mut plan, options.unix_sockets);
    names(&mut plan, options.whiteout_like_names);
    hardlinks(&mut plan);
    if options.deep_paths {
        deep(&mut plan);
    }
    big_dir(&mut plan, options.big_dir_entries);
    plan
}

fn regular_files(plan: &mut Plan, large_file_size: u64) {
    plan.dir(b"regular");
    plan.file(b"regular/empty", b"");
    plan.file(b"regular/small", b"hello, darter\n");
    plan.file(b"regular/no-newline", b"x");
    plan.dense_file(b"regular/one-block", 4096);
    plan.dense_file(b"regular/block-plus-one", 4097);
    plan.dense_file(super::LARGE_FILE.as_bytes(), large_file_size);
}

// Single data ranges are meant: the rest of those files is a hole.
#[allow(clippy::single_range_in_vec_init)]
fn sparse_files(plan: &mut Plan, size: u64) {
    const EXTENT: u64 = 64 * 1024;
    plan.dir(b"sparse");
    let middle = (size / 2) & !(EXTENT - 1);
    let extents = vec![0..EXTENT, middle..middle + EXTENT, size - 100_000..size];
    plan.generated_file(super::SPARSE_FILE.as_bytes(), size, extents);
    let tail_hole_size = size.min(8 * MIB);
    plan.generated_file(b"sparse/hole-at-end", tail_hole_size, vec![0..4096]);
    plan.generated_file(
        b"sparse/hole-at-start",
        4 * MIB + 1000,
        vec![4 * MIB..4 * MIB + 1000],
    );
    plan.generated_file(b"sparse/all-hole", MIB + 7, Vec::new());
}

fn modes(plan: &mut Plan) {
    plan.dir(b"modes");
    for mode in [
        0o0000, 0o0777, 0o4755, 0o2755, 0o1777, 0o6755, 0o7777, 0o0444,
    ] {
        plan.file(format!("modes/file-{mode:04o}").as_bytes(), b"mode\n")
            .mode(mode);
    }
    // Children inside directories that the writer cannot enter or write
    // once their final mode is set: unpackers must set it last.
    for mode in [0o0000, 0o0555, 0o1777, 0o2755, 0o0700, 0o7777] {
        let dir = format!("modes/dir-{mode:04o}");
        plan.dir(dir.as_bytes()).mode(mode);
        plan.file(format!("{dir}/child").as_bytes(), b"child\n");
    }
}

fn owners(plan: &mut Plan) {
    plan.dir(b"owners");
    for (uid, gid) in [
        (0, 0),
        (1000, 1000),
        (65534, 65534),
        (100_000, 100_000),
        (1000, 65534),
    ] {
        plan.file(format!("owners/{uid}-{gid}").as_bytes(), b"owned\n")
            .owner(uid, gid);
    }
    // Larger than the 7 octal digits of a plain tar header field.
    plan.file(b"owners/3000000-3000000", b"owned\n")
        .owner(3_000_000, 3_000_000);
    plan.dir(b"owners/dir-100000")
        .owner(100_000, 100_000)
        .mode(0o750);
    plan.file(b"owners/dir-100000/root-child", b"root\n");
    plan.symlink(b"owners/symlink-1000", b"1000-1000")
        .owner(1000, 1000);
    plan.special(b"owners/fifo-65534", Special::Fifo)
        .owner(65534, 65534);
}

fn times(plan: &mut Plan) {
    plan.dir(b"times");
    let cases: [(&str, i64, u32); 5] = [
        ("epoch", 0, 0),
        ("epoch-plus-1ns", 0, 1),
        ("1980", 315_532_800, 123_456_789),
        ("after-2038", 2_147_483_648, 999_999_999),
        ("year-2100", 4_102_444_800, 500_000_001),
    ];
    for (name, sec, nsec) in cases {
        plan.file(format!("times/{name}").as_bytes(), b"time\n")
            .mtime(sec, nsec);
    }
    plan.dir(b"times/dir-year-2200").mtime(7_258_118_400, 7);
    plan.symlink(b"times/symlink", b"epoch")
        .mtime(1_234_567_890, 987_654_321);
}

/// A valid VFS capability v2 value: effective, permitted CAP_NET_BIND_SERVICE.
pub(crate) const CAPABILITY_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc: revision 2 | effective
    0x00, 0x04, 0x00, 0x00, // data[0].permitted: bit 10
    0x00, 0x00, 0x00, 0x00, // data[0].inheritable
    0x00, 0x00, 0x00, 0x00, // data[1].permitted
    0x00, 0x00, 0x00, 0x00, // data[1].inheritable
];

fn xattrs(plan: &mut Plan) {
    plan.dir(b"xattrs");
    let binary: Vec<u8> = (0..=255).collect();
    let long: Vec<u8> = (0..1500u32).map(|i| b'a' + (i % 26) as u8).collect();
    plan.file(b"xattrs/several", b"xattrs\n")
        .xattr("user.alpha", b"first")
        .xattr("user.beta", b"second value")
        .xattr("user.empty", b"")
        .xattr("user.binary", &binary)
        .xattr("user.long", &long)
        .xattr("user.with space", b"v")
        .xattr("user.\u{fc}n\u{ef}code", b"\xff\x00\xfe");
    plan.file(super::CAPABILITY_FILE.as_bytes(), b"#!/bin/true\n")
        .mode(0o755)
        .xattr("security.capability", &CAPABILITY_V2);
    plan.file(b"xattrs/capability-and-user", b"#!/bin/true\n")
        .mode(0o750)
        .owner(1000, 1000)
        .xattr("security.capability", &CAPABILITY_V2)
        .xattr("user.note", b"both");
    plan.dir(b"xattrs/dir")
        .xattr("user.dir", b"directory xattr")
        .xattr("user.empty", b"");
    plan.file(b"xattrs/dir/child", b"child\n")
        .xattr("user.child", b"1");
}

fn symlinks(plan: &mut Plan) {
    plan.dir(b"symlinks");
    plan.symlink(b"symlinks/relative", b"../regular/small");
    plan.symlink(b"symlinks/absolute", b"/etc/passwd");
    plan.symlink(b"symlinks/dangling", b"does/not/exist");
    plan.symlink(b"symlinks/to-dir", b"../regular");
    plan.symlink(b"symlinks/self-loop", b"self-loop");
    plan.symlink(b"symlinks/dot", b".");
    plan.symlink(b"symlinks/long", &long_symlink_target());
}

/// 4000 bytes: longer than any tar header field, near the 4095-byte limit.
fn long_symlink_target() -> Vec<u8> {
    let mut target = Vec::new();
    let mut i = 0;
    while target.len() < 3990 {
        target.extend_from_slice(format!("segment-{i:03}/").as_bytes());
        i += 1;
    }
    target.truncate(3990);
    target.extend_from_slice(b"/last-part");
    target
}

fn specials(plan: &mut Plan, unix_sockets: bool) {
    plan.dir(b"special");
    plan.special(b"special/null", Special::CharDevice { major: 1, minor: 3 })
        .mode(0o666);
    let maximal = Special::CharDevice {
        major: 4095,
        minor: 1_048_575,
    };
    plan.special(b"special/char-max-numbers", maximal)
        .mode(0o600);
    plan.special(b"special/sda", Special::BlockDevice { major: 8, minor: 0 })
        .mode(0o660)
        .owner(0, 6);
    plan.special(b"special/fifo", Special::Fifo).mode(0o620);
    if unix_sockets {
        plan.special(b"special/socket", Special::Socket).mode(0o755);
    }
}

fn odd_names() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        &b"non-utf8-\xff\xfe\x80"[..],
        b"latin1-caf\xe9",
        b"new\nline",
        b"tab\there",
        b" leading space",
        b"trailing space ",
        b"   ",
        b"-leading-dash",
        b"--",
        b"-rf",
        b"...",
        b"..double-dot-prefix",
        b".hidden",
        b"trailing-dot.",
        b"back\\slash",
        b"colon:semi;comma,",
        b"quotes'\"`",
        b"glob*?[a-z]{a,b}",
        b"dollar$HOME",
        b"percent%s%n",
        b"pipe|amp&lt<gt>",
        b"hash#tilde~",
        b"\x01control\x7f\x1b[0m",
        b"CASE",
        b"case",
        "unicode-\u{fc}n\u{ef}c\u{f8}d\u{e9}-\u{540d}\u{524d}-\u{1f980}".as_bytes(),
        "nfc-\u{e9}".as_bytes(),
        "nfc-e\u{301}".as_bytes(),
    ]
    .iter()
    .map(|name| name.to_vec())
    .collect();
    let mut ascii_255 = b"max-".to_vec();
    ascii_255.resize(255, b'n');
    names.push(ascii_255);
    let mut utf8_255 = "\u{e9}".repeat(127).into_bytes();
    utf8_255.push(b'x');
    names.push(utf8_255);
    names
}

fn names(plan: &mut Plan, whiteout_like: bool) {
    plan.dir(b"names");
    let mut names = odd_names();
    if whiteout_like {
        names.push(b".wh.whiteout-like".to_vec());
        names.push(b".wh..wh..opq".to_vec());
    }
    for name in names {
        let mut path = b"names/".to_vec();
        path.extend_from_slice(&name);
        plan.file(&path, &name);
    }
    plan.dir(b"names/dir-\xff\n\t");
    plan.file(b"names/dir-\xff\n\t/child", b"child\n");
    plan.symlink(b"names/link-\xfe", b"target-\xff\n\x01");
}

fn hardlinks(plan: &mut Plan) {
    plan.dir(b"hardlinks");
    plan.dir(b"hardlinks/sub");
    plan.dir(b"links-elsewhere");
    plan.file(super::HARDLINKED_FILE.as_bytes(), b"shared by five names\n")
        .mode(0o640)
        .owner(1000, 1000)
        .xattr("user.linked", b"yes");
    plan.hardlink(b"hardlinks/b", super::HARDLINKED_FILE.as_bytes());
    plan.hardlink(b"hardlinks/sub/c", super::HARDLINKED_FILE.as_bytes());
    plan.hardlink(b"links-elsewhere/d", super::HARDLINKED_FILE.as_bytes());
    // The fifth name is in deep/, beyond PATH_MAX.
    plan.file(b"hardlinks/setuid-1", b"#!/bin/true\n")
        .mode(0o4755);
    plan.hardlink(b"hardlinks/setuid-2", b"hardlinks/setuid-1");
    plan.file(b"hardlinks/empty-1", b"");
    plan.hardlink(b"hardlinks/empty-2", b"hardlinks/empty-1");
    plan.hardlink(b"hardlinks/sub/empty-3", b"hardlinks/empty-1");
    plan.symlink(b"hardlinks/symlink-1", b"a");
    plan.hardlink(b"hardlinks/symlink-2", b"hardlinks/symlink-1");
    plan.special(b"hardlinks/fifo-1", Special::Fifo);
    plan.hardlink(b"hardlinks/fifo-2", b"hardlinks/fifo-1");
}

const DEEP_LEVELS: usize = 22;

/// 22 levels of 200-byte names: the deepest directory's path is about
/// 4.4 KiB, beyond PATH_MAX.
pub(crate) fn deep_dir_components() -> Vec<Vec<u8>> {
    let mut components = vec![b"deep".to_vec()];
    for level in 0..DEEP_LEVELS {
        let mut name = format!("level-{level:02}-").into_bytes();
        name.resize(200, b'd');
        components.push(name);
    }
    components
}

fn deep(plan: &mut Plan) {
    let components = deep_dir_components();
    let mut path = Vec::new();
    for (level, component) in components.iter().enumerate() {
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(component);
        let dir = plan.dir(&path);
        if level + 1 == components.len() {
            dir.xattr("user.deep", b"beyond PATH_MAX");
        }
    }
    let child = |name: &str| [path.as_slice(), b"/", name.as_bytes()].concat();
    plan.file(&child("file"), b"deep content\n")
        .xattr("user.deep-file", b"1");
    let up = "../".repeat(DEEP_LEVELS + 1);
    plan.symlink(&child("symlink"), format!("{up}regular/small").as_bytes());
    plan.hardlink(&child("hardlink"), super::HARDLINKED_FILE.as_bytes());
}

fn big_dir(plan: &mut Plan, entries: usize) {
    plan.dir(super::BIG_DIR.as_bytes());
    for i in 0..entries {
        let path = format!("{}/entry-{i:06}", super::BIG_DIR);
        if i % 1000 == 500 {
            plan.symlink(path.as_bytes(), b"entry-000000");
        } else if i % 100 == 0 {
            plan.file(path.as_bytes(), format!("entry {i}\n").as_bytes());
        } else {
            plan.file(path.as_bytes(), b"");
        }
    }
}
