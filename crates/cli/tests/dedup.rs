//! Deduplication: a chunk already present (elsewhere in the build, or in
//! the `--parent` image) is referenced, never stored again; `inspect` and
//! the build report show it.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

const KIB: usize = 1024;

/// Files of assorted sizes under `dir`, each with its own content: some
/// span several 1 MiB chunks, some share a frame.
fn varied_files(dir: &Path, seed: u64) {
    write_file(&dir.join("big"), &noise(seed, 2 * 1024 * KIB + 5000));
    write_file(&dir.join("medium"), &noise(seed + 1, 300 * KIB));
    for i in 0..8 {
        write_file(
            &dir.join(format!("small/{i}")),
            &noise(seed + 10 + i, 3 * KIB),
        );
    }
}

#[test]
fn a_subtree_present_twice_is_stored_once() {
    let work = tempfile::tempdir().unwrap();
    let once = work.path().join("once");
    varied_files(&once.join("a"), 1);
    let twice = work.path().join("twice");
    copy_tree(&once, &twice);
    copy_tree(&once.join("a"), &twice.join("b"));

    let layout = work.path().join("layout");
    let single = inspect_after_build(&once, &oci(&layout, "once"));
    let report = round_trip_dir(
        &twice,
        &oci(&layout, "twice"),
        &work.path().join("out"),
        &[],
    );
    let double = inspect(&oci(&layout, "twice"));

    let refs = num(&single, "/chunk_refs");
    assert_eq!(num(&double, "/chunk_refs"), 2 * refs, "{double:#}");
    for same in ["/unique_chunks", "/unique_chunk_bytes", "/stored_bytes"] {
        assert_eq!(num(&double, same), num(&single, same), "{same}: {double:#}");
    }
    assert_eq!(num(&double, "/blobs/0/chunks"), refs, "{double:#}");
    assert_eq!(num(&double, "/file_bytes"), 2 * num(&single, "/file_bytes"));
    let ratio = double["dedup_ratio"].as_f64().unwrap();
    assert!((ratio - 2.0).abs() < 1e-9, "dedup ratio {ratio}");

    assert_eq!(num(&report, "/chunks/chunk_refs"), 2 * refs, "{report:#}");
    assert_eq!(num(&report, "/chunks/new_chunks"), refs, "{report:#}");
    assert_eq!(num(&report, "/chunks/deduped"), refs, "{report:#}");
}

fn inspect_after_build(tree: &Path, image: &str) -> serde_json::Value {
    build(tree, image, &[]);
    inspect(image)
}

const CHUNK: usize = 64 * KIB;

/// Version 1: `big` is 8 chunks of 64 KiB, plus other files.
fn version_1(dir: &Path) {
    write_file(&dir.join("big"), &noise(100, 8 * CHUNK));
    varied_files(&dir.join("other"), 200);
}

/// Version 2 differs by one file, and in that file by one chunk.
fn version_2(v1: &Path, v2: &Path) {
    copy_tree(v1, v2);
    let mut big = std::fs::read(v2.join("big")).unwrap();
    big[3 * CHUNK + 100..3 * CHUNK + 150].copy_from_slice(&noise(300, 50));
    std::fs::write(v2.join("big"), big).unwrap();
}

/// A new version built against its parent stores one new chunk in one new
/// blob and references the parent's blob for everything else; written to
/// another layout, the parent's blob is copied along so the image is whole.
#[test]
fn parent_build_stores_only_the_changed_chunk() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    version_1(&v1);
    version_2(&v1, &v2);
    let chunk_size = ["--chunk-size", "64K"];
    let old_layout = work.path().join("old");
    let parent = oci(&old_layout, "v1");
    build(&v1, &parent, &chunk_size);
    let parent_stats = inspect(&parent);
    let parent_blob = parent_stats["blobs"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();

    let new_layout = work.path().join("new");
    let image = oci(&new_layout, "v2");
    let report = build(
        &v2,
        &image,
        &[chunk_size[0], chunk_size[1], "--parent", &parent],
    );
    assert_eq!(num(&report, "/chunks/new_chunks"), 1, "{report:#}");
    assert_eq!(
        num(&report, "/chunks/new_bytes"),
        CHUNK as u64,
        "{report:#}"
    );
    assert_eq!(num(&report, "/new_blobs"), 1, "{report:#}");
    assert_eq!(num(&report, "/blobs"), 2, "{report:#}");
    let refs = num(&report, "/chunks/chunk_refs");
    assert_eq!(num(&report, "/chunks/deduped"), refs - 1, "{report:#}");

    let stats = inspect(&image);
    assert_eq!(
        stats["blobs"][0]["digest"],
        parent_blob.as_str(),
        "{stats:#}"
    );
    let parent_chunks = num(&parent_stats, "/blobs/0/chunks");
    assert_eq!(
        num(&stats, "/blobs/0/chunks_used"),
        parent_chunks - 1,
        "{stats:#}"
    );
    assert_eq!(num(&stats, "/blobs/1/chunks"), 1, "{stats:#}");
    // Noise does not compress: the frame is stored raw, exactly one chunk.
    assert_eq!(
        num(&stats, "/blobs/1/data_bytes"),
        CHUNK as u64,
        "{stats:#}"
    );
    let new_blob = stats["blobs"][1]["digest"].as_str().unwrap();
    let new_blob_size = std::fs::metadata(blob_path(&new_layout, new_blob))
        .unwrap()
        .len();
    assert_eq!(num(&report, "/new_blob_bytes"), new_blob_size, "{report:#}");

    // Besides the parent's copied blob: the new blob, bootstrap, config
    // and manifest, nothing else.
    let old: BTreeSet<String> = blobs(&old_layout).into_keys().collect();
    let new: BTreeSet<String> = blobs(&new_layout).into_keys().collect();
    assert!(new.contains(parent_blob.trim_start_matches("sha256:")));
    assert_eq!(new.difference(&old).count(), 4, "{new:?} vs {old:?}");
    check_sound(&image);
    let out = work.path().join("out");
    unpack(&image, &out);
    assert_same_tree(&v2, &out);
}

/// The usual case: the new version goes into the parent's layout, which
/// grows by exactly the new blob, bootstrap, config and manifest.
#[test]
fn parent_build_into_the_same_layout_adds_only_new_blobs() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    version_1(&v1);
    version_2(&v1, &v2);
    let layout = work.path().join("layout");
    build(&v1, &oci(&layout, "v1"), &["--chunk-size", "64K"]);
    let before: BTreeSet<String> = blobs(&layout).into_keys().collect();
    let args = ["--chunk-size", "64K", "--parent", &oci(&layout, "v1")];
    let report = build(&v2, &oci(&layout, "v2"), &args);
    assert_eq!(num(&report, "/chunks/new_chunks"), 1, "{report:#}");
    let after: BTreeSet<String> = blobs(&layout).into_keys().collect();
    assert!(after.is_superset(&before));
    assert_eq!(after.len() - before.len(), 4, "{after:?}");
    check_sound(&oci(&layout, "v1"));
    check_sound(&oci(&layout, "v2"));
}

/// Chunks of another size or digest can never match: refused, not ignored.
#[test]
fn parent_with_other_chunk_settings_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    version_1(&v1);
    let layout = work.path().join("layout");
    build(&v1, &oci(&layout, "v1"), &["--chunk-size", "64K"]);
    let others: [&[&str]; 2] = [
        &["--chunk-size", "1M"],
        &["--chunk-size", "64K", "--digest", "sha256"],
    ];
    for other in others {
        let mut args = vec!["build", v1.to_str().unwrap(), "-o"];
        let target = oci(&layout, "v2");
        let parent = oci(&layout, "v1");
        args.extend([target.as_str(), "--parent", parent.as_str()]);
        args.extend(other);
        darter(&args)
            .fails_with(1)
            .mentions(&["parent", "--chunk-size", "--digest"]);
    }
    let tags: Vec<String> = index(&layout)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["annotations"]["org.opencontainers.image.ref.name"].to_string())
        .collect();
    assert_eq!(tags, ["\"v1\""], "a refused build tags nothing");
}
