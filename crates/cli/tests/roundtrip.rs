//! Round trips: a directory or an OCI image goes in, `darter unpack` (and
//! the kernel) must give back exactly what went in.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use darter_testkit::compare::{CompareOptions, compare_trees};
use darter_testkit::fixtures::{
    Compression, MediaTypes, RawEntry, RawLayer, RawLayout, debian_python_oci,
    multi_layer_whiteout_image, oci_layout_from_dirs, umoci_unpack,
};
use darter_testkit::tree::{BIG_DIR, SPARSE_FILE, TrickyTree};

/// The slow one: every kind of entry at full size (100,000-entry
/// directory, 3 GiB sparse file, paths beyond PATH_MAX), with default
/// options, through `unpack` and through a kernel mount of the export.
#[test]
fn full_tricky_tree_round_trips_exactly_through_unpack_and_the_kernel() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::full().create(&tree).unwrap();
    let image = oci(&work.path().join("layout"), "full");

    round_trip_dir(&tree, &image, &work.path().join("unpacked"), &[]);

    let stats = inspect(&image);
    let sparse_size = std::fs::metadata(tree.join(SPARSE_FILE)).unwrap().len();
    assert!(
        num(&stats, "/hole_bytes") > sparse_size - (8 << 20),
        "the sparse file's holes are holes in the image: {stats:#}"
    );
    assert!(
        num(&stats, "/blob_bytes") < 128 << 20,
        "holes are not stored: {stats:#}"
    );
    let entries = std::fs::read_dir(tree.join(BIG_DIR)).unwrap().count() as u64;
    assert!(num(&stats, "/files") > entries * 9 / 10, "{stats:#}");

    let exported = export(&image, &work.path().join("export"));
    let mount = KernelMount::new(&exported, &work.path().join("mnt"));
    // With 1 MiB chunks the kernel maps a chunk holding any data whole, so
    // holes are only holes at chunk granularity there (the 4 KiB-chunk test
    // in kernel.rs checks holes through the kernel exactly).
    let opts = CompareOptions {
        check_holes: false,
        ..CompareOptions::default()
    };
    compare_trees(&tree, mount.path(), &opts).unwrap();
}

/// Whiteouts, opaque directories, a file replaced by a directory and back,
/// hardlinks and PAX records across four layers: the result is what umoci
/// makes of the same image, and what the layers mean.
#[test]
fn multi_layer_whiteout_image_unpacks_like_umoci() {
    let work = tempfile::tempdir().unwrap();
    let fixture = multi_layer_whiteout_image(work.path()).unwrap();
    let source = fixture.image.skopeo_ref();
    let image = oci(&work.path().join("darter"), "whiteouts");
    let report = build(&source, &image, &[]);
    assert!(
        num(&report, "/blobs") >= 2,
        "one blob per layer with data: {report:#}"
    );
    check_sound(&image);

    let unpacked = work.path().join("unpacked");
    unpack(&image, &unpacked);
    let reference = umoci_unpack(
        &fixture.image.layout,
        &fixture.image.tag,
        &work.path().join("bundle"),
    )
    .unwrap();
    assert_same_tree(&reference, &unpacked);
    assert_same_tree(&fixture.expected_rootfs, &unpacked);
}

/// Every kind of entry through tar layers made by umoci (two layers: the
/// second changes files, modes, owners and xattrs of the first and deletes
/// some). Compared with umoci's own unpacking exactly, and with the source
/// trees allowing only for what umoci's tar writer loses: nanoseconds
/// (rounded) and empty xattr values (dropped).
#[test]
fn tricky_tree_oci_image_unpacks_like_umoci() {
    let work = tempfile::tempdir().unwrap();
    // umoci copies trees by path, so no paths beyond PATH_MAX.
    let first = work.path().join("state-1");
    TrickyTree::small()
        .deep_paths(false)
        .create(&first)
        .unwrap();
    let second = work.path().join("state-2");
    copy_tree(&first, &second);
    second_layer_changes(&second);
    let layout = work.path().join("source");
    let source = oci_layout_from_dirs(&layout, "tricky", &[&first, &second]).unwrap();

    let image = oci(&work.path().join("darter"), "tricky");
    build(source.skopeo_ref(), &image, &[]);
    check_sound(&image);
    let unpacked = work.path().join("unpacked");
    unpack(&image, &unpacked);

    let reference = umoci_unpack(&layout, "tricky", &work.path().join("bundle")).unwrap();
    assert_same_tree(&reference, &unpacked);
    let tar_losses = CompareOptions {
        ignore_mtime_nsec: true,
        ignored_xattrs: vec!["user.empty".into()],
        ..CompareOptions::default()
    };
    compare_trees(&second, &unpacked, &tar_losses).unwrap();
}

/// What the second layer of [`tricky_tree_oci_image_unpacks_like_umoci`]
/// changes: content and an xattr, deletions (whiteouts), a new hardlink,
/// mode and owner.
fn second_layer_changes(tree: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(tree.join("regular/small"), b"changed in layer 2\n").unwrap();
    std::fs::remove_file(tree.join("symlinks/dangling")).unwrap();
    std::fs::remove_dir_all(tree.join("owners/dir-100000")).unwrap();
    std::fs::hard_link(
        tree.join("regular/one-block"),
        tree.join("regular/one-block-link"),
    )
    .unwrap();
    std::fs::set_permissions(
        tree.join("regular/no-newline"),
        std::fs::Permissions::from_mode(0o4711),
    )
    .unwrap();
    std::os::unix::fs::lchown(tree.join("regular/empty"), Some(4242), Some(4343)).unwrap();
    rustix::fs::setxattr(
        tree.join("regular/small"),
        "user.added",
        b"in layer 2",
        rustix::fs::XattrFlags::CREATE,
    )
    .unwrap();
}

/// A real distribution image (Debian bookworm minbase + python3, two gzip
/// layers by umoci, 8,000+ entries): the result is what umoci makes of it.
#[test]
fn debian_python_image_unpacks_like_umoci() {
    let work = tempfile::tempdir().unwrap();
    let source = debian_python_oci().unwrap();
    let image = oci(&work.path().join("darter"), "python");
    build(source.skopeo_ref(), &image, &[]);
    check_sound(&image);
    let unpacked = work.path().join("unpacked");
    unpack(&image, &unpacked);
    let reference = umoci_unpack(&source.layout, &source.tag, &work.path().join("bundle")).unwrap();
    assert_same_tree(&reference, &unpacked);
}

/// PAX records are length-prefixed, so a value may hold a newline: names
/// and link targets with newlines (beyond 100 bytes, or not ASCII, they
/// only fit in PAX records) and binary xattr values such as a
/// `security.capability` whose bit mask contains 0x0A. Go's archive/tar
/// (umoci, Docker, BuildKit) writes such records for every such file.
#[test]
fn pax_records_with_newlines_in_their_values_convert() {
    let work = tempfile::tempdir().unwrap();
    let name = format!("new\nline-{}", "n".repeat(120));
    let target = format!("target\nwith a newline-{}", "t".repeat(110));
    // VFS capability v2 with CAP_DAC_OVERRIDE | CAP_FOWNER (0x0a) permitted.
    let mut capability = vec![0x01, 0x00, 0x00, 0x02, 0x0a];
    capability.resize(20, 0);
    let layer = RawLayer::new(Compression::Gzip)
        .entry(RawEntry::file(&name, b"named with a newline\n"))
        .entry(RawEntry::symlink("link", &target))
        .entry(
            RawEntry::file("capable", b"#!/bin/true\n").xattr("security.capability", &capability),
        )
        .entry(RawEntry::file("binary", b"x").xattr("user.binary", b"one\ntwo"));
    let source = RawLayout::new(MediaTypes::Oci)
        .layer(layer)
        .write(&work.path().join("source"), "pax")
        .unwrap();
    let image = oci(&work.path().join("darter"), "pax");
    build(source.image.skopeo_ref(), &image, &[]);
    let out = work.path().join("out");
    unpack(&image, &out);
    assert_eq!(
        std::fs::read(out.join(&name)).unwrap(),
        b"named with a newline\n"
    );
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        std::path::PathBuf::from(&target)
    );
    let xattr = |file: &str, key: &str| {
        let mut buf = vec![0u8; 256];
        let n = rustix::fs::getxattr(out.join(file), key, &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    assert_eq!(xattr("capable", "security.capability"), capability);
    assert_eq!(xattr("binary", "user.binary"), b"one\ntwo");
}
