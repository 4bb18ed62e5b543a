use std::fs;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::SeekFrom;

use super::*;
use crate::fs_at;

fn small_tree() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    TrickyTree::small().create(&root).unwrap();
    (dir, root)
}

fn xattrs_of(path: &Path) -> fs_at::Xattrs {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    fs_at::read_xattrs(fd.as_fd()).unwrap()
}

fn meta(root: &Path, rel: &str) -> fs::Metadata {
    fs::symlink_metadata(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn permission_bits_are_exact_including_setuid_setgid_sticky() {
    let (_dir, root) = small_tree();
    for mode in [
        0o0000, 0o0777, 0o4755, 0o2755, 0o1777, 0o6755, 0o7777, 0o0444,
    ] {
        let file = meta(&root, &format!("modes/file-{mode:04o}"));
        assert_eq!(file.mode() & 0o7777, mode, "file mode {mode:04o}");
    }
    for mode in [0o0000, 0o0555, 0o1777, 0o2755, 0o0700, 0o7777] {
        let dir = meta(&root, &format!("modes/dir-{mode:04o}"));
        assert_eq!(dir.mode() & 0o7777, mode, "dir mode {mode:04o}");
        assert!(root.join(format!("modes/dir-{mode:04o}/child")).exists());
    }
    assert_eq!(meta(&root, ".").mode() & 0o7777, 0o755);
}

#[test]
fn owners_include_large_ids_on_every_type() {
    let (_dir, root) = small_tree();
    for (uid, gid) in [
        (0, 0),
        (1000, 1000),
        (65534, 65534),
        (100_000, 100_000),
        (1000, 65534),
    ] {
        let file = meta(&root, &format!("owners/{uid}-{gid}"));
        assert_eq!((file.uid(), file.gid()), (uid, gid));
    }
    let big = meta(&root, "owners/3000000-3000000");
    assert_eq!((big.uid(), big.gid()), (3_000_000, 3_000_000));
    let dir = meta(&root, "owners/dir-100000");
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (100_000, 100_000, 0o750)
    );
    let symlink = meta(&root, "owners/symlink-1000");
    assert!(symlink.file_type().is_symlink());
    assert_eq!((symlink.uid(), symlink.gid()), (1000, 1000));
    assert_eq!(meta(&root, "owners/fifo-65534").uid(), 65534);
}

#[test]
fn mtimes_keep_nanoseconds_and_directory_times_survive_children() {
    let (_dir, root) = small_tree();
    let cases = [
        ("times/epoch", 0, 0),
        ("times/epoch-plus-1ns", 0, 1),
        ("times/1980", 315_532_800, 123_456_789),
        ("times/after-2038", 2_147_483_648, 999_999_999),
        ("times/year-2100", 4_102_444_800, 500_000_001),
        ("times/dir-year-2200", 7_258_118_400, 7),
        ("times/symlink", 1_234_567_890, 987_654_321),
    ];
    for (rel, sec, nsec) in cases {
        let m = meta(&root, rel);
        assert_eq!((m.mtime(), m.mtime_nsec()), (sec, nsec), "{rel}");
    }
    // Directories full of children still carry their planned, distinct
    // times (set after the children were created).
    let mtimes: std::collections::HashSet<(i64, i64)> = ["regular", "bigdir", "hardlinks", "names"]
        .iter()
        .map(|rel| meta(&root, rel))
        .map(|m| (m.mtime(), m.mtime_nsec()))
        .collect();
    assert_eq!(mtimes.len(), 4);
    assert!(
        mtimes
            .iter()
            .all(|&(sec, _)| (1_600_000_000..1_700_000_000).contains(&sec))
    );
}

#[test]
fn xattrs_include_empty_binary_and_a_valid_capability() {
    let (_dir, root) = small_tree();
    let several = xattrs_of(&root.join("xattrs/several"));
    assert_eq!(several[&b"user.empty"[..]], b"");
    assert_eq!(several[&b"user.binary"[..]], (0..=255).collect::<Vec<u8>>());
    assert_eq!(several[&b"user.long"[..]].len(), 1500);
    assert_eq!(several.len(), 7);
    let capability = xattrs_of(&root.join(CAPABILITY_FILE));
    assert_eq!(capability[&b"security.capability"[..]], CAPABILITY_V2);
    let dir = xattrs_of(&root.join("xattrs/dir"));
    assert_eq!(dir[&b"user.dir"[..]], b"directory xattr");
    // `getcap` decodes the value, proving the kernel took it as valid v2.
    let getcap =
        crate::process::run(std::process::Command::new("getcap").arg(root.join(CAPABILITY_FILE)));
    let text = String::from_utf8_lossy(&getcap.stdout);
    assert!(
        text.contains("cap_net_bind_service=ep"),
        "getcap said {text:?}"
    );
}

#[test]
fn every_file_type_is_present() {
    let (_dir, root) = small_tree();
    let null = meta(&root, "special/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    let max = meta(&root, "special/char-max-numbers");
    assert_eq!(rustix::fs::major(max.rdev()), 4095);
    assert_eq!(rustix::fs::minor(max.rdev()), 1_048_575);
    assert!(meta(&root, "special/sda").file_type().is_block_device());
    assert!(meta(&root, "special/fifo").file_type().is_fifo());
    assert!(!root.join("special/socket").exists());
    let long = fs::read_link(root.join("symlinks/long")).unwrap();
    assert_eq!(long.as_os_str().len(), 4000);
    assert_eq!(
        fs::read_link(root.join("symlinks/absolute")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(!root.join("symlinks/dangling").exists());
    assert_eq!(meta(&root, "regular/empty").len(), 0);
    assert_eq!(meta(&root, LARGE_FILE).len(), MIB + 4099);
}

#[test]
fn hardlink_groups_span_directories_and_types() {
    let (_dir, root) = small_tree();
    let a = meta(&root, HARDLINKED_FILE);
    assert_eq!(a.nlink(), 5);
    for other in ["hardlinks/b", "hardlinks/sub/c", "links-elsewhere/d"] {
        assert_eq!(meta(&root, other).ino(), a.ino(), "{other}");
    }
    assert_eq!(meta(&root, "hardlinks/empty-1").nlink(), 3);
    let symlink = meta(&root, "hardlinks/symlink-2");
    assert!(symlink.file_type().is_symlink());
    assert_eq!(symlink.nlink(), 2);
    assert_eq!(meta(&root, "hardlinks/fifo-2").nlink(), 2);
    assert_eq!(meta(&root, "hardlinks/setuid-2").mode() & 0o7777, 0o4755);
}

#[test]
fn sparse_files_keep_holes_between_data_extents() {
    let (_dir, root) = small_tree();
    let file = fs::File::open(root.join(SPARSE_FILE)).unwrap();
    let size = file.metadata().unwrap().len();
    assert_eq!(size, 16 * MIB);
    let mut extents = Vec::new();
    let mut pos = 0;
    while let Ok(start) = rustix::fs::seek(&file, SeekFrom::Data(pos)) {
        let end = rustix::fs::seek(&file, SeekFrom::Hole(start)).unwrap();
        extents.push(start..end);
        pos = end;
        if pos >= size {
            break;
        }
    }
    assert_eq!(extents.len(), 3, "{extents:?}");
    assert_eq!(extents[0].start, 0);
    assert_eq!(extents[2].end, size);
    assert!(file.metadata().unwrap().blocks() * 512 < MIB);
    let all_hole = fs::File::open(root.join("sparse/all-hole")).unwrap();
    assert_eq!(all_hole.metadata().unwrap().blocks(), 0);
}

#[test]
fn odd_names_exist_and_whiteout_like_names_only_on_request() {
    let (_dir, root) = small_tree();
    let names: Vec<Vec<u8>> = fs::read_dir(root.join("names"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    for wanted in [
        &b"non-utf8-\xff\xfe\x80"[..],
        b"new\nline",
        b"tab\there",
        b"-rf",
        b"   ",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{}",
            crate::escape_bytes(wanted)
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.len() == 255 && n.starts_with(b"max-"))
    );
    assert!(
        names
            .iter()
            .any(|n| n.len() == 255 && n.starts_with("\u{e9}".as_bytes()))
    );
    assert!(!names.iter().any(|n| n.starts_with(b".wh.")));

    let dir = tempfile::tempdir().unwrap();
    TrickyTree::small()
        .whiteout_like_names(true)
        .unix_sockets(true)
        .big_dir_entries(3)
        .create(dir.path())
        .unwrap();
    assert!(dir.path().join("names/.wh..wh..opq").is_file());
    assert!(meta(dir.path(), "special/socket").file_type().is_socket());
    assert_eq!(fs::read_dir(dir.path().join(BIG_DIR)).unwrap().count(), 3);
}

#[test]
fn deep_directory_is_beyond_path_max_and_reachable_with_at_calls() {
    let (_dir, root) = small_tree();
    let deep = TrickyTree::deep_dir();
    assert!(deep.as_os_str().len() > 4096, "{}", deep.as_os_str().len());
    let by_path = fs::metadata(root.join(&deep).join("file"));
    assert_eq!(
        by_path.unwrap_err().raw_os_error(),
        Some(rustix::io::Errno::NAMETOOLONG.raw_os_error())
    );
    let root_fd = fs_at::open_root(&root).unwrap();
    let components = deep_dir_components();
    let deep_fd = fs_at::open_dir_path(root_fd.as_fd(), &components).unwrap();
    let file = fs_at::open_inode_at(deep_fd.as_fd(), b"hardlink").unwrap();
    assert_eq!(rustix::fs::fstat(&file).unwrap().st_nlink, 5);
    let xattrs = fs_at::read_xattrs(deep_fd.as_fd()).unwrap();
    assert_eq!(xattrs[&b"user.deep"[..]], b"beyond PATH_MAX");
}

#[test]
fn big_dir_has_the_configured_number_of_entries() {
    let (_dir, root) = small_tree();
    assert_eq!(fs::read_dir(root.join(BIG_DIR)).unwrap().count(), 200);
    let dir = tempfile::tempdir().unwrap();
    TrickyTree::small()
        .big_dir_entries(1001)
        .create(dir.path())
        .unwrap();
    let big_dir = dir.path().join(BIG_DIR);
    assert_eq!(fs::read_dir(&big_dir).unwrap().count(), 1001);
    assert_eq!(
        fs::read_link(big_dir.join("entry-000500")).unwrap(),
        Path::new("entry-000000")
    );
    assert_eq!(
        fs::read(big_dir.join("entry-001000")).unwrap(),
        b"entry 1000\n"
    );
}

#[test]
#[should_panic(expected = "sparse_size must be at least 1 MiB")]
fn too_small_sparse_size_is_refused() {
    let _ = TrickyTree::small().sparse_size(4096);
}
