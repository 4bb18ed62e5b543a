//! Build options: every chunk size, compressor and digest round trips and
//! is what the image records; invalid values are refused with a message
//! that names them, before anything is written.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use darter_testkit::tree::TrickyTree;

/// One build configuration and what it must produce.
struct Case {
    chunk_size: &'static str,
    bytes: u64,
    compressor: &'static str,
    /// Chunk record compression code (docs/format.md 2.2).
    code: u8,
    digest: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        chunk_size: "4K",
        bytes: 4 << 10,
        compressor: "lz4",
        code: 2,
        digest: "sha256",
    },
    Case {
        chunk_size: "64K",
        bytes: 64 << 10,
        compressor: "none",
        code: 0,
        digest: "blake3",
    },
    Case {
        chunk_size: "16M",
        bytes: 16 << 20,
        compressor: "zstd",
        code: 1,
        digest: "sha256",
    },
];

#[test]
fn every_chunk_size_compressor_and_digest_round_trips() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    // Something that compresses, so compressors have work to do.
    let text: String = (0..100_000)
        .map(|i| format!("line {i}: all work and no play\n"))
        .collect();
    write_file(&tree.join("compressible/text"), text.as_bytes());
    let layout = work.path().join("layout");
    for case in CASES {
        let tag = format!("{}-{}-{}", case.chunk_size, case.compressor, case.digest);
        let image = oci(&layout, &tag);
        let args = [
            "--chunk-size",
            case.chunk_size,
            "--compressor",
            case.compressor,
            "--digest",
            case.digest,
        ];
        round_trip_dir(&tree, &image, &work.path().join(&tag), &args);

        let stats = inspect(&image);
        assert_eq!(num(&stats, "/chunk_size"), case.bytes, "{tag}: {stats:#}");
        assert_eq!(stats["digest"], case.digest, "{tag}");
        let annotations = &manifest(&layout, &tag)["annotations"];
        assert_eq!(annotations["dev.darter.chunk-size"], case.bytes.to_string());
        assert_eq!(annotations["dev.darter.digest"], case.digest, "{tag}");

        let blob = &data_blob_digests(&layout, &tag)[0];
        let parts = blob_parts(&blob_path(&layout, blob));
        let codes: BTreeSet<u8> = parts.records.iter().map(|r| r.compression).collect();
        assert!(codes.contains(&case.code), "{tag}: codes {codes:?}");
        assert!(
            codes.is_subset(&BTreeSet::from([0, case.code])),
            "{tag}: {codes:?}"
        );
        assert!(
            parts
                .records
                .iter()
                .all(|r| u64::from(r.size) <= case.bytes)
        );
        let (stored, unique) = (
            num(&stats, "/stored_bytes"),
            num(&stats, "/unique_chunk_bytes"),
        );
        if case.code == 0 {
            assert!(stored >= unique, "{tag}: nothing compressed: {stats:#}");
        } else {
            assert!(stored < unique * 3 / 4, "{tag}: compressed: {stats:#}");
        }
    }
}

/// Level and frame size are accepted and the image stays exact.
#[test]
fn zstd_level_and_frame_size_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    let image = oci(&work.path().join("layout"), "t");
    let args = [
        "--level",
        "19",
        "--frame-size",
        "32K",
        "--chunk-size",
        "16K",
    ];
    round_trip_dir(&tree, &image, &work.path().join("out"), &args);
}

/// Settings come from the config file when no flag overrides them.
#[test]
fn config_file_sets_defaults_and_flags_override_it() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_file(&tree.join("file"), &noise(1, 100_000));
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "[build]\nchunk_size = \"8K\"\ndigest = \"sha256\"\n",
    )
    .unwrap();
    let layout = work.path().join("layout");
    let config_arg = format!("--config={}", config.display());
    for (tag, flags, chunk_size) in [
        ("from-config", &[][..], 8192),
        ("flag", &["--chunk-size", "32K"][..], 32768),
    ] {
        let image = oci(&layout, tag);
        let mut args = vec![
            "build",
            tree.to_str().unwrap(),
            "-o",
            &image,
            config_arg.as_str(),
        ];
        args.extend(flags);
        darter(&args).ok();
        let stats = inspect(&image);
        assert_eq!(num(&stats, "/chunk_size"), chunk_size, "{tag}");
        assert_eq!(stats["digest"], "sha256", "{tag}");
    }
}

/// Invalid values: clap's usage errors exit 2, validation errors exit 1;
/// both say what is wrong, and nothing is written.
#[test]
fn invalid_options_are_refused_with_a_clear_message() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_file(&tree.join("file"), b"content\n");
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["--chunk-size", "3000"],
            1,
            &["--chunk-size", "power of two", "3000"],
        ),
        (&["--chunk-size", "2K"], 1, &["--chunk-size", "4K to 16M"]),
        (&["--chunk-size", "32M"], 1, &["--chunk-size", "4K to 16M"]),
        (&["--chunk-size", "1X"], 1, &["--chunk-size", "1X"]),
        (&["--chunk-size", "lots"], 1, &["--chunk-size", "lots"]),
        (&["--frame-size", "1K"], 1, &["--frame-size"]),
        (&["--compressor", "gzip"], 1, &["gzip", "zstd, lz4 or none"]),
        (&["--digest", "md5"], 1, &["md5", "blake3 or sha256"]),
        (&["--level", "99"], 1, &["--level"]),
        (&["--jobs", "many"], 2, &["--jobs", "many"]),
        (&["--level", "high"], 2, &["--level", "high"]),
        (&["--no-such-flag"], 2, &["--no-such-flag"]),
    ];
    for (i, (flags, status, mentions)) in cases.iter().enumerate() {
        let layout = work.path().join(format!("layout-{i}"));
        let image = oci(&layout, "t");
        let mut args = vec!["build", tree.to_str().unwrap(), "-o", &image];
        args.extend(*flags);
        darter(&args).fails_with(*status).mentions(mentions);
        assert!(!layout.exists(), "{flags:?} wrote {}", layout.display());
    }
}

/// Wrong commands, sources and image references.
#[test]
fn invalid_commands_and_references_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_file(&tree.join("file"), b"content\n");
    let tree = tree.to_str().unwrap();
    let missing = work.path().join("missing");
    let missing = missing.to_str().unwrap();
    let layout = work.path().join("layout");
    let image = oci(&layout, "t");
    let not_a_layout = oci(work.path(), "t");
    let cases: &[(&[&str], i32, &[&str])] = &[
        (&["build", tree], 2, &["--output"]),
        (&["frobnicate"], 2, &["frobnicate"]),
        (&["unpack", &image], 2, &["DIR"]),
        (&["build", missing, "-o", &image], 1, &[missing]),
        // Not an image reference of any kind (references that parse are
        // left out: they would reach for a registry).
        (&["build", tree, "-o", "/plain/path"], 1, &["/plain/path"]),
        (&["inspect", &image], 1, &[layout.to_str().unwrap()]),
        (&["check", &not_a_layout], 1, &["not an OCI image layout"]),
        (
            &["unpack", &not_a_layout, missing],
            1,
            &["not an OCI image layout"],
        ),
    ];
    for (args, status, mentions) in cases {
        darter(*args).fails_with(*status).mentions(mentions);
    }
    assert!(!layout.exists(), "nothing was written");
}
