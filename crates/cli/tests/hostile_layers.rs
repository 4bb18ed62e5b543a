//! Hostile OCI images: tar layers that try to climb out of the root or
//! write through symlinks, links to nothing, truncated or mislabelled
//! layers, and layers whose digest is not what the manifest says. Each is
//! refused with a message naming the layer and entry, or confined to the
//! image root; nothing is written outside the target, and a failed build
//! leaves the output layout as it was.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use darter_testkit::fixtures::{Compression, MediaTypes, RawEntry, RawImage, RawLayer, RawLayout};

/// A directory outside everything darter is told about, holding one
/// canary file; it must look the same after every test.
struct Outside {
    dir: PathBuf,
}

const CANARY: &[u8] = b"the host's own file\n";

impl Outside {
    fn new(work: &Path) -> Self {
        let dir = work.join("outside");
        write_file(&dir.join("canary"), CANARY);
        Outside { dir }
    }

    /// `self.dir` as an absolute path without the leading `/`, which is
    /// where an entry aimed at it lands inside an image root.
    fn inside(&self, root: &Path) -> PathBuf {
        root.join(self.dir.strip_prefix("/").unwrap())
    }

    fn path_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    #[track_caller]
    fn assert_untouched(&self) {
        let entries: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["canary"], "something was written outside");
        assert_eq!(std::fs::read(self.dir.join("canary")).unwrap(), CANARY);
    }
}

fn write_layout(work: &Path, layers: Vec<RawLayer>) -> RawImage {
    let mut layout = RawLayout::new(MediaTypes::Oci);
    for layer in layers {
        layout = layout.layer(layer);
    }
    layout.write(&work.join("source"), "hostile").unwrap()
}

/// Builds with several compression threads, so a failure finds frames in
/// flight.
fn build_outcome(source: &RawImage, output: &str) -> Outcome {
    darter([
        "build",
        &source.image.skopeo_ref(),
        "-o",
        output,
        "--jobs",
        "16",
    ])
}

fn plain() -> RawLayer {
    RawLayer::new(Compression::None)
}

#[test]
fn entries_with_dot_dot_are_refused() {
    for path in ["../escape", "a/../../escape", "./../../x", "dir/.."] {
        let work = tempfile::tempdir().unwrap();
        let outside = Outside::new(work.path());
        let layer = plain()
            .entry(RawEntry::file("harmless", b"fine\n"))
            .entry(RawEntry::file(path, b"pwned\n"));
        let source = write_layout(work.path(), vec![layer]);
        let output = oci(&work.path().join("out"), "t");
        build_outcome(&source, &output).fails_with(1).mentions(&[
            &source.layer_digests[0],
            path,
            "'..'",
        ]);
        outside.assert_untouched();
        assert_eq!(
            index(&work.path().join("out"))["manifests"],
            serde_json::json!([])
        );
    }
}

/// Absolute entry paths are relative to the image root.
#[test]
fn absolute_paths_land_inside_the_root() {
    let work = tempfile::tempdir().unwrap();
    let outside = Outside::new(work.path());
    let layer = plain()
        .entry(RawEntry::file(
            format!("{}/abs-file", outside.path_str()),
            b"abs\n",
        ))
        .entry(RawEntry::file("/top-level", b"top\n"));
    let source = write_layout(work.path(), vec![layer]);
    let image = oci(&work.path().join("out"), "t");
    build_outcome(&source, &image).ok();
    let root = work.path().join("root");
    unpack(&image, &root);
    assert_eq!(
        std::fs::read(outside.inside(&root).join("abs-file")).unwrap(),
        b"abs\n"
    );
    assert_eq!(std::fs::read(root.join("top-level")).unwrap(), b"top\n");
    outside.assert_untouched();
}

/// Symlinks aimed outside (absolute, relative climbing above the root, at
/// `/` itself), then entries written through them in the same and a later
/// layer: they are resolved as if the image root were `/`. A symlink at an
/// entry's own path is replaced, never followed.
#[test]
fn entries_written_through_symlinks_stay_inside_the_root() {
    let work = tempfile::tempdir().unwrap();
    let outside = Outside::new(work.path());
    let o = outside.path_str();
    let climb = format!("{}{}", "../".repeat(40), o.trim_start_matches('/'));
    // Never created on the host; a unique name so a leftover is ours.
    let host_name = format!("darter-escape-test-{}", std::process::id());
    let first = plain()
        .entry(RawEntry::dir("links/"))
        .entry(RawEntry::symlink("links/absolute", o))
        .entry(RawEntry::symlink("links/climbing", &climb))
        .entry(RawEntry::symlink("links/root", "/"))
        .entry(RawEntry::symlink("links/canary", format!("{o}/canary")))
        .entry(RawEntry::file("links/absolute/via-absolute", b"1\n"))
        .entry(RawEntry::file("links/climbing/via-climbing", b"2\n"));
    let second = RawLayer::new(Compression::Gzip)
        .entry(RawEntry::dir("links/climbing/new-dir/"))
        .entry(RawEntry::file("links/climbing/new-dir/deeper", b"3\n"))
        .entry(RawEntry::file(format!("links/root/{host_name}"), b"4\n"))
        .entry(RawEntry::file("links/canary", b"replaced, not followed\n"));
    let source = write_layout(work.path(), vec![first, second]);
    let image = oci(&work.path().join("out"), "t");
    build_outcome(&source, &image).ok();
    let root = work.path().join("root");
    unpack(&image, &root);

    let landed = outside.inside(&root);
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(read(landed.join("via-absolute")), b"1\n");
    assert_eq!(read(landed.join("via-climbing")), b"2\n");
    assert_eq!(read(landed.join("new-dir/deeper")), b"3\n");
    assert_eq!(read(root.join(&host_name)), b"4\n");
    assert_eq!(read(root.join("links/canary")), b"replaced, not followed\n");
    assert_eq!(
        std::fs::read_link(root.join("links/absolute")).unwrap(),
        outside.dir
    );
    assert_eq!(
        std::fs::read_link(root.join("links/climbing")).unwrap(),
        PathBuf::from(&climb)
    );
    outside.assert_untouched();
    assert!(
        !Path::new("/").join(&host_name).exists(),
        "wrote into the host's /"
    );
}

#[test]
fn hardlinks_to_missing_targets_are_refused() {
    let cases: [(&str, &str, &str); 4] = [
        ("link", "missing", "does not exist"),
        ("link", "/etc/passwd", "does not exist"),
        ("link", "../outside/canary", "does not exist"),
        ("link", "dir", "directory"),
    ];
    for (link, target, why) in cases {
        let work = tempfile::tempdir().unwrap();
        let outside = Outside::new(work.path());
        let layer = plain()
            .entry(RawEntry::dir("dir/"))
            .entry(RawEntry::hardlink(link, target));
        let source = write_layout(work.path(), vec![layer]);
        let output = oci(&work.path().join("out"), "t");
        build_outcome(&source, &output).fails_with(1).mentions(&[
            &source.layer_digests[0],
            link,
            target,
            why,
        ]);
        outside.assert_untouched();
    }
}

/// Truncated archives (an entry claiming more bytes than follow, up to
/// 1 TiB) and compression that is not what the media type says.
#[test]
fn truncated_and_mislabelled_layers_are_refused() {
    let cases: Vec<(RawLayer, &str)> = vec![
        (
            plain().entry(RawEntry::file("short", b"only this").declared_size(1 << 20)),
            "short",
        ),
        (
            RawLayer::new(Compression::Gzip)
                .entry(RawEntry::file("huge", b"only this").declared_size(1 << 40)),
            "huge",
        ),
        (
            RawLayer::new(Compression::Zstd)
                .entry(RawEntry::file("f", b"zstd data"))
                .media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            "",
        ),
        (
            RawLayer::new(Compression::Gzip)
                .entry(RawEntry::file("f", b"gzip data"))
                .media_type("application/vnd.oci.image.layer.v1.tar"),
            "",
        ),
    ];
    for (layer, entry) in cases {
        let work = tempfile::tempdir().unwrap();
        let source = write_layout(work.path(), vec![layer]);
        let output = oci(&work.path().join("out"), "t");
        build_outcome(&source, &output)
            .fails_with(1)
            .mentions(&[&source.layer_digests[0], entry]);
    }
}

/// Every file of a layout, by relative path.
fn snapshot(layout: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![layout.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(layout).unwrap().to_path_buf(), bytes);
            }
        }
    }
    files
}

/// Builds `layers` into a layout that already holds an image; the build
/// must fail with status 1 mentioning `mentions` (and the last layer's
/// digest), and leave every file of the layout as it was: no new blob, no
/// temp file, no tag.
fn assert_failed_build_leaves_output_as_it_was(layers: Vec<RawLayer>, mentions: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let source = write_layout(work.path(), layers);
    let out = work.path().join("out");
    let tree = work.path().join("tree");
    write_file(&tree.join("file"), &noise(9, 10_000));
    build(&tree, &oci(&out, "existing"), &[]);
    let before = snapshot(&out);

    let failing = source.layer_digests.last().unwrap();
    build_outcome(&source, &oci(&out, "new"))
        .fails_with(1)
        .mentions(&[failing])
        .mentions(mentions);
    let after = snapshot(&out);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "files in the output layout"
    );
    assert!(after == before, "the output layout changed");
}

fn good_layer(seed: u64) -> RawLayer {
    RawLayer::new(Compression::Gzip)
        .entry(RawEntry::file(format!("data-{seed}"), noise(seed, 300_000)))
}

/// A layer whose bytes do not hash to the digest the manifest gives it,
/// alone or after a good layer.
#[test]
fn layer_with_wrong_digest_fails_and_leaves_the_output_as_it_was() {
    assert_failed_build_leaves_output_as_it_was(
        vec![good_layer(1).wrong_digest()],
        &["digest mismatch"],
    );
    assert_failed_build_leaves_output_as_it_was(
        vec![good_layer(1), good_layer(2).wrong_digest()],
        &["digest mismatch"],
    );
}

/// Regression: a build failing with frames in flight on compression
/// threads exited before the blob writer thread had deleted its temp file.
#[test]
fn failed_build_left_its_unfinished_upload_behind() {
    // Enough 1 MiB frames to keep the threads busy when the build fails.
    let layer = plain()
        .entry(RawEntry::file("big", noise(1, 48 << 20)))
        .entry(RawEntry::file("../escape", b"x"));
    assert_failed_build_leaves_output_as_it_was(vec![layer], &["../escape"]);
}

/// Regression: each layer's blob was committed as soon as that layer was
/// read, so a conversion failing at a later layer left the earlier layers'
/// blobs in the output layout.
#[test]
fn failed_conversion_left_blobs_of_earlier_layers_behind() {
    let bad = plain().entry(RawEntry::file("../escape", b"x"));
    assert_failed_build_leaves_output_as_it_was(
        vec![good_layer(1), good_layer(2), bad],
        &["../escape"],
    );
}
