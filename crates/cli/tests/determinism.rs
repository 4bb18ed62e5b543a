//! Determinism: the same input and options give byte-identical blobs,
//! bootstrap, config and manifest, whatever the number of threads.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use darter_testkit::fixtures::{Compression, MediaTypes, RawEntry, RawLayer, RawLayout};
use darter_testkit::tree::TrickyTree;

/// Builds `source` into a fresh layout per entry of `jobs` and asserts
/// that every layout holds exactly the same bytes.
fn assert_identical_builds(source: &str, work: &Path, extra: &[&str], jobs: &[&str]) {
    let layouts: Vec<PathBuf> = jobs
        .iter()
        .map(|j| {
            let layout = work.join(format!("layout-jobs-{j}"));
            let mut args = extra.to_vec();
            args.extend(["--jobs", j]);
            build(source, &oci(&layout, "t"), &args);
            layout
        })
        .collect();
    let first = &layouts[0];
    let stats = inspect(&oci(first, "t"));
    assert!(
        num(&stats, "/blobs/0/chunks") > 50,
        "enough chunks for threads to race: {stats:#}"
    );
    for other in &layouts[1..] {
        assert_eq!(
            std::fs::read(first.join("index.json")).unwrap(),
            std::fs::read(other.join("index.json")).unwrap(),
            "index.json of {} and {}",
            first.display(),
            other.display()
        );
        let (a, b) = (blobs(first), blobs(other));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "blobs of {} and {}",
            first.display(),
            other.display()
        );
        assert!(a == b, "blob contents differ");
    }
}

#[test]
fn directory_builds_are_byte_identical_whatever_the_thread_count() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    let source = tree.to_str().unwrap();
    assert_identical_builds(
        source,
        work.path(),
        &["--chunk-size", "16K", "--frame-size", "8K"],
        &["1", "2", "7", "1"],
    );
}

/// Two layers (gzip, zstd) of compressible and incompressible files.
fn layered_image(layout: &Path) -> String {
    let mut first = RawLayer::new(Compression::Gzip).entry(RawEntry::dir("data/"));
    let mut second = RawLayer::new(Compression::Zstd);
    for i in 0..24u64 {
        let text = format!("line {i}\n").repeat(2000 + i as usize * 100);
        first = first
            .entry(RawEntry::file(
                format!("data/noise-{i}"),
                noise(i, 20_000 + i as usize),
            ))
            .entry(RawEntry::file(format!("data/text-{i}"), text));
        second = second.entry(RawEntry::file(
            format!("data/more-{i}"),
            noise(100 + i, 9_000),
        ));
    }
    let second = second.entry(RawEntry::file("data/.wh.text-3", b""));
    let written = RawLayout::new(MediaTypes::Oci)
        .layer(first)
        .layer(second)
        .write(layout, "layered")
        .unwrap();
    written.image.skopeo_ref()
}

#[test]
fn image_conversions_are_byte_identical_whatever_the_thread_count() {
    let work = tempfile::tempdir().unwrap();
    let source = layered_image(&work.path().join("source"));
    assert_identical_builds(
        &source,
        work.path(),
        &["--chunk-size", "4K"],
        &["1", "3", "1"],
    );
}
