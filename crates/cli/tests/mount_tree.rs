//! A mounted image shows exactly the tree `darter unpack` writes for it:
//! types, content, modes, owners, times, xattrs (getxattr/listxattr),
//! hardlink counts and inode sharing, symlinks, device nodes; and `statfs`
//! on the mount answers sensibly.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::path::Path;
use std::process::Command;

use darter_testkit::process::run;
use darter_testkit::tree::{CAPABILITY_FILE, TrickyTree};
use mount_common::{BuiltImage, KERNEL_EROFS, Work, assert_mount_matches};

/// `statfs(2)`'s magic for FUSE file systems.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// `statfs(2)`'s magic for EROFS.
const EROFS_SUPER_MAGIC: i64 = 0xE0F5_E1E2;

#[test]
fn tricky_tree_mount_matches_unpack() {
    mount_matches_unpack(&TrickyTree::small(), &[]);
}

/// The same tree through the kernel's EROFS driver, which reads the
/// bootstrap and the devices the daemon serves.
#[test]
fn tricky_tree_mounted_through_the_kernel_erofs_frontend_matches_unpack() {
    mount_matches_unpack(&TrickyTree::small(), KERNEL_EROFS);
}

/// The full-size tree (a 3 GiB sparse file, a 64 MiB file of many chunks)
/// with a 10,000-entry directory (dozens of directory blocks) instead of
/// 100,000: the full one takes minutes to create, unpack and compare in a
/// debug build, without exercising anything more.
#[test]
fn large_tricky_tree_mount_matches_unpack() {
    mount_matches_unpack(&TrickyTree::full().big_dir_entries(10_000), &[]);
}

fn mount_matches_unpack(tree: &TrickyTree, frontend: &[&str]) {
    let work = Work::new();
    let source = work.path("source");
    tree.create(&source).unwrap();
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let unpacked = work.unpack(&image);
    let mount = work.mount(&image, "mnt", frontend);
    assert_mount_matches(&unpacked, mount.path());
    assert_capability_xattr_served(&unpacked, mount.path());
    let magic = if frontend == KERNEL_EROFS {
        EROFS_SUPER_MAGIC
    } else {
        FUSE_SUPER_MAGIC
    };
    assert_statfs_sensible(&image, &unpacked, mount.path(), magic);
}

/// The comparator reads xattrs with listxattr + getxattr; this also asks
/// for one by name with a too-small buffer (ERANGE) and a missing one.
fn assert_capability_xattr_served(unpacked: &Path, mounted: &Path) {
    let name = "security.capability";
    let expected = xattr_of(&unpacked.join(CAPABILITY_FILE), name);
    let file = mounted.join(CAPABILITY_FILE);
    assert_eq!(xattr_of(&file, name), expected);
    let mut small = vec![0u8; expected.len() - 1];
    assert_eq!(
        rustix::fs::lgetxattr(&file, name, &mut small),
        Err(rustix::io::Errno::RANGE)
    );
    let mut buf = [0u8; 16];
    assert_eq!(
        rustix::fs::lgetxattr(&file, "user.absent", &mut buf),
        Err(rustix::io::Errno::NODATA)
    );
}

fn xattr_of(path: &Path, name: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 64 << 10];
    let len = rustix::fs::lgetxattr(path, name, &mut buf)
        .unwrap_or_else(|e| panic!("getxattr {name} of {}: {e}", path.display()));
    buf.truncate(len);
    buf
}

/// A read-only file system (of type `magic`) of 4 KiB blocks, holding at
/// least the image's data, with no free blocks and one used inode per
/// distinct inode of the tree.
fn assert_statfs_sensible(image: &BuiltImage, unpacked: &Path, mounted: &Path, magic: i64) {
    let st = rustix::fs::statfs(mounted).unwrap();
    assert_eq!(st.f_type, magic, "{st:?}");
    assert_eq!(st.f_bsize, 4096, "{st:?}");
    let vfs = rustix::fs::statvfs(mounted).unwrap();
    let shown = format!(
        "statvfs of {}: flags {:?}, {} blocks ({} free, {} available), {} inodes ({} free), \
         names up to {}",
        mounted.display(),
        vfs.f_flag,
        vfs.f_blocks,
        vfs.f_bfree,
        vfs.f_bavail,
        vfs.f_files,
        vfs.f_ffree,
        vfs.f_namemax
    );
    assert!(
        vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
        "{shown}"
    );
    let data = common::num(&image.inspect, "/unique_chunk_bytes");
    assert!(
        vfs.f_blocks * 4096 >= data,
        "{shown}: less than {data} bytes"
    );
    assert_eq!((vfs.f_bfree, vfs.f_bavail), (0, 0), "{shown}");
    // FUSE reports the inodes with none free; the kernel's EROFS driver
    // reports "unlimited" inodes with all but the used ones free.
    assert_eq!(
        vfs.f_files - vfs.f_ffree,
        distinct_inodes(unpacked),
        "{shown}"
    );
    assert_eq!(vfs.f_namemax, 255, "{shown}");
}

/// Distinct inodes below `root` (hardlinks once); `find` copes with paths
/// beyond PATH_MAX.
fn distinct_inodes(root: &Path) -> u64 {
    let out = run(Command::new("find").arg(root).args(["-printf", "%i\\n"]));
    let mut inodes: Vec<&[u8]> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes.len() as u64
}
