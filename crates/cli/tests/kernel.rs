//! Through the kernel's eyes: `darter export` writes a plain EROFS
//! bootstrap plus one device image per blob, which `fsck.erofs` accepts and
//! the kernel mounts as the identical tree.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use darter_testkit::fixtures::multi_layer_whiteout_image;
use darter_testkit::process::run;
use darter_testkit::tree::TrickyTree;

/// `fsck.erofs --device=... BOOTSTRAP [--extract=OUT]`.
fn fsck_erofs(exported: &Exported, extract: Option<&Path>) -> Command {
    let mut fsck = Command::new("fsck.erofs");
    fsck.args(exported.device_args());
    if let Some(out) = extract {
        fsck.arg(format!("--extract={}", out.display()));
    }
    fsck.arg(&exported.bootstrap);
    fsck
}

/// With 4 KiB chunks every all-zero block is a hole in the image, so even
/// the kernel's view of holes matches the source exactly. Paths beyond
/// PATH_MAX included.
#[test]
fn tricky_tree_mounted_by_the_kernel_is_identical_holes_included() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    let image = oci(&work.path().join("layout"), "small");
    build(&tree, &image, &["--chunk-size", "4K"]);

    let exported = export(&image, &work.path().join("export"));
    let mount = KernelMount::new(&exported, &work.path().join("mnt"));
    assert_same_tree(&tree, mount.path());
}

/// An image converted from four layers has one blob per layer with new
/// data: the kernel maps each as its own device.
#[test]
fn multi_blob_image_passes_fsck_and_mounts_as_the_merged_tree() {
    let work = tempfile::tempdir().unwrap();
    let fixture = multi_layer_whiteout_image(work.path()).unwrap();
    let image = oci(&work.path().join("darter"), "whiteouts");
    build(fixture.image.skopeo_ref(), &image, &[]);

    let exported = export(&image, &work.path().join("export"));
    assert!(exported.devices.len() >= 2, "{exported:?}");
    run(&mut fsck_erofs(&exported, None));
    let mount = KernelMount::new(&exported, &work.path().join("mnt"));
    assert_same_tree(&fixture.expected_rootfs, mount.path());
}

/// `fsck.erofs` verifies every kind of entry the format holds (xattrs,
/// hardlinks, devices, holes, odd names, paths beyond PATH_MAX).
#[test]
fn fsck_erofs_accepts_every_kind_of_entry() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    let image = oci(&work.path().join("layout"), "small");
    build(&tree, &image, &[]);
    let exported = export(&image, &work.path().join("export"));
    run(&mut fsck_erofs(&exported, None));
}

/// `fsck.erofs --extract` (erofs-utils 1.5, the version Debian 12 ships)
/// reproduces the tree, for the tree it can extract: it writes no xattrs,
/// no hardlinks (each name becomes its own copy), chmods before chowning
/// (which clears setuid and setgid on files), skips holes instead of
/// seeking over them (erofs-utils fixed that in 2024), and cannot create
/// paths beyond PATH_MAX. So the tree here has none of those; everything
/// else must come out exact. Built against a
/// parent so that fsck reads two devices.
#[test]
fn fsck_erofs_extracts_the_tree_from_two_devices() {
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full");
    // Extraction builds paths in PATH_MAX buffers (and crashes beyond).
    TrickyTree::small().deep_paths(false).create(&full).unwrap();
    let tree = work.path().join("tree");
    copy_without_what_fsck_cannot_extract(&full, &tree);
    let base = work.path().join("base");
    copy_tree(&tree, &base);
    std::fs::remove_dir_all(base.join("bigdir")).unwrap();
    std::fs::remove_dir_all(base.join("regular")).unwrap();

    let layout = work.path().join("layout");
    build(&base, &oci(&layout, "base"), &[]);
    let image = oci(&layout, "full");
    build(&tree, &image, &["--parent", &oci(&layout, "base")]);

    let exported = export(&image, &work.path().join("export"));
    assert_eq!(exported.devices.len(), 2, "{exported:?}");
    let out = work.path().join("extracted");
    run(&mut fsck_erofs(&exported, Some(&out)));
    assert_same_tree(&tree, &out);
}

/// Copies `src` to `dst` without xattrs, hardlinks, setuid/setgid bits on
/// files, and files with holes or zero blocks (which become holes).
fn copy_without_what_fsck_cannot_extract(src: &Path, dst: &Path) {
    std::fs::create_dir(dst).unwrap();
    run(Command::new("cp")
        .args(["-a", "--no-preserve=links,xattr"])
        .arg(src.join("."))
        .arg(dst));
    std::fs::remove_dir_all(dst.join("sparse")).unwrap();
    let mut clear_setid = Command::new("find");
    clear_setid.arg(dst).args([
        "-type", "f", "-perm", "/6000", "-exec", "chmod", "ug-s", "{}", "+",
    ]);
    run(&mut clear_setid);
}
