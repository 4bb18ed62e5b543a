//! Damaged images: flipped and truncated bytes in blobs, chunk tables,
//! trailers and bootstraps. `darter check` reports each with the blob,
//! chunk and files affected (exit 3); other commands refuse with a message
//! that names the damaged part (exit 1); nothing panics.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// 200 KiB of noise: one chunk, a frame of its own, stored raw.
const VICTIM_SIZE: usize = 200 * 1024;

/// An image of four files: `a-victim` and `c-copy` share one chunk (equal
/// content), `b-healthy` has its own, and `d-text` is compressible (a zstd
/// frame). Chunks are placed in name order: 0 `a-victim`, 1 `b-healthy`,
/// 2 `d-text`.
struct Damaged {
    work: tempfile::TempDir,
    layout: PathBuf,
    image: String,
    blob: String,
    parts: BlobParts,
}

impl Damaged {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        write_file(&tree.join("a-victim"), &noise(1, VICTIM_SIZE));
        write_file(&tree.join("b-healthy"), &noise(2, VICTIM_SIZE));
        write_file(&tree.join("c-copy"), &noise(1, VICTIM_SIZE));
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        write_file(&tree.join("d-text"), text.as_bytes());
        let layout = work.path().join("layout");
        let image = oci(&layout, "t");
        build(&tree, &image, &[]);
        check_sound(&image);
        let blob = data_blob_digests(&layout, "t").remove(0);
        let parts = blob_parts(&blob_path(&layout, &blob));
        assert_eq!(parts.records.len(), 3, "{parts:?}");
        assert_eq!(parts.records[0].compressed_offset, 0);
        assert_eq!(parts.records[2].compression, 1, "d-text is zstd: {parts:?}");
        Damaged {
            work,
            layout,
            image,
            blob,
            parts,
        }
    }

    fn blob_file(&self) -> PathBuf {
        blob_path(&self.layout, &self.blob)
    }

    fn check(&self) -> Outcome {
        darter(["check", &self.image])
    }

    fn check_json(&self) -> Value {
        darter(["check", &self.image, "--json"])
            .fails_with(3)
            .json()
    }

    /// `unpack` and `export` refuse the damaged image, naming `mentions`
    /// (`export` writes whole blobs, so it names no file).
    fn other_commands_refuse(&self, mentions: &[&str], file: Option<&str>) {
        let out = self.work.path().join("unpacked");
        darter_to_dir("unpack", &self.image, &out)
            .fails_with(1)
            .mentions(mentions)
            .mentions(&file.into_iter().collect::<Vec<_>>());
        let exported = self.work.path().join("exported");
        darter_to_dir("export", &self.image, &exported)
            .fails_with(1)
            .mentions(mentions);
    }
}

#[test]
fn check_passes_a_sound_image() {
    let damaged = Damaged::new();
    let report = darter(["check", &damaged.image, "--json"]).ok().json();
    assert_eq!(report["problems"], json!([]), "{report:#}");
    assert_eq!(num(&report, "/chunks"), 3, "{report:#}");
}

/// A flipped byte inside a raw frame (digest mismatch) and inside a zstd
/// frame (decompression error or digest mismatch): `check` names the blob,
/// the chunk and every file using it, and nothing else.
#[test]
fn flipped_chunk_byte_is_reported_with_blob_chunk_and_files() {
    let cases: [(usize, &[&str], &[&str]); 2] = [
        (0, &["/a-victim", "/c-copy"], &["b-healthy", "d-text"]),
        (2, &["/d-text"], &["a-victim", "b-healthy", "c-copy"]),
    ];
    for (chunk, files, healthy) in cases {
        let damaged = Damaged::new();
        let record = damaged.parts.records[chunk];
        flip_byte(&damaged.blob_file(), record.compressed_offset + 1000);

        let out = damaged.check().fails_with(3);
        let chunk_text = format!("chunk {chunk}");
        out.mentions(&[&damaged.blob, &chunk_text, "DAMAGED"])
            .mentions(files);
        let report = damaged.check_json();
        let problems = report["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{report:#}");
        assert_eq!(problems[0]["blob"], damaged.blob.as_str());
        assert_eq!(problems[0]["chunk"], chunk);
        let mut listed: Vec<&str> = problems[0]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        listed.sort_unstable();
        assert_eq!(listed, files, "{report:#}");
        for name in healthy {
            assert!(!report.to_string().contains(name), "{name}: {report:#}");
        }
        damaged.other_commands_refuse(&[&damaged.blob, &chunk_text], Some(&files[0][1..]));
    }
}

/// Damage in the stored chunk table, the trailer, or a blob cut short or
/// gone: `check` reports the blob (exit 3).
#[test]
fn damaged_chunk_tables_trailers_and_blobs_are_reported() {
    type Damage = fn(&Damaged);
    let cases: [(&str, Damage, &str); 6] = [
        (
            "table byte",
            |d| flip_byte(&d.blob_file(), d.parts.table_offset + 3),
            "chunk table",
        ),
        (
            "last table byte",
            |d| flip_byte(&d.blob_file(), d.parts.size - BLOB_TRAILER_SIZE - 1),
            "chunk table",
        ),
        (
            "trailer byte",
            |d| flip_byte(&d.blob_file(), d.parts.size - BLOB_TRAILER_SIZE + 20),
            "trailer",
        ),
        (
            "one byte short",
            |d| truncate(&d.blob_file(), d.parts.size - 1),
            "",
        ),
        (
            "cut before its table",
            |d| truncate(&d.blob_file(), d.parts.table_offset / 2),
            "",
        ),
        (
            "missing",
            |d| std::fs::remove_file(d.blob_file()).unwrap(),
            "",
        ),
    ];
    for (what, damage, mentions) in cases {
        let damaged = Damaged::new();
        damage(&damaged);
        let out = damaged.check();
        assert_eq!(out.status, Some(3), "{what}: {out:?}");
        out.mentions(&[&damaged.blob, mentions, "DAMAGED"]);
        let report = damaged.check_json();
        assert!(
            report["problems"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["blob"].is_null() || p["blob"] == damaged.blob.as_str()),
            "{what}: {report:#}"
        );
        damaged.other_commands_refuse(&[&damaged.blob], None);
    }
}

/// The stored bootstrap no longer matches the digest the manifest gives
/// it: nothing uses a byte of it.
#[test]
fn bootstrap_not_matching_its_digest_is_refused() {
    type Damage = fn(&Path);
    let flipped: Damage = |f| flip_byte(f, 100);
    let one_byte_short: Damage = |f| truncate(f, std::fs::metadata(f).unwrap().len() - 1);
    let missing: Damage = |f| std::fs::remove_file(f).unwrap();
    for damage in [flipped, one_byte_short, missing] {
        let damaged = Damaged::new();
        let bootstrap = bootstrap_digest(&damaged.layout, "t");
        damage(&blob_path(&damaged.layout, &bootstrap));
        for command in ["check", "inspect"] {
            darter([command, &damaged.image])
                .refuses()
                .mentions(&[&bootstrap]);
        }
        damaged.other_commands_refuse(&[&bootstrap], None);
    }
}

/// Replaces the bootstrap of image `t` with `raw` (compressed and digested
/// properly, manifest and index updated): damage a reader can only find
/// by parsing it. Returns the new image reference.
fn resign_bootstrap(layout: &Path, raw: &[u8]) -> String {
    let stored = zstd::bulk::compress(raw, 3).unwrap();
    let bootstrap = put_blob(layout, &stored);
    let mut manifest = manifest(layout, "t");
    let raw_digest = sha256(raw);
    for layer in manifest["layers"].as_array_mut().unwrap() {
        if layer["mediaType"] == BOOTSTRAP_MEDIA_TYPE {
            layer["digest"] = json!(bootstrap);
            layer["size"] = json!(stored.len());
            let annotations = &mut layer["annotations"];
            annotations["dev.darter.bootstrap.uncompressed-digest"] = json!(raw_digest);
            annotations["dev.darter.bootstrap.uncompressed-size"] = json!(raw.len().to_string());
        }
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = put_blob(layout, &bytes);
    let mut index = index(layout);
    let mut descriptor = manifest_descriptor(layout, "t");
    descriptor["digest"] = json!(digest);
    descriptor["size"] = json!(bytes.len());
    descriptor["annotations"]["org.opencontainers.image.ref.name"] = json!("resigned");
    let manifests = index["manifests"].as_array_mut().unwrap();
    manifests.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != "resigned");
    manifests.push(descriptor);
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    oci(layout, "resigned")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    std::fs::write(blob_path(layout, &digest), bytes).unwrap();
    digest
}

fn raw_bootstrap(layout: &Path) -> Vec<u8> {
    let stored = std::fs::read(blob_path(layout, &bootstrap_digest(layout, "t"))).unwrap();
    zstd::decode_all(stored.as_slice()).unwrap()
}

/// Bootstraps whose digest matches (the manifest was re-signed) but whose
/// content is malformed: each is refused with a message, by every command.
#[test]
fn malformed_bootstraps_are_refused() {
    let damaged = Damaged::new();
    let raw = raw_bootstrap(&damaged.layout);
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, &str); 6] = [
        ("Darter magic", |b| b[0] ^= 0xff, "header"),
        ("Darter version", |b| b[8] = 9, "header"),
        ("reserved header byte", |b| b[40] = 1, "header"),
        ("EROFS magic", |b| b[1024] ^= 0xff, ""),
        ("cut in half", |b| b.truncate(b.len() / 2), ""),
        ("empty", Vec::clear, ""),
    ];
    for (what, damage, mentions) in cases {
        let mut bad = raw.clone();
        damage(&mut bad);
        let image = resign_bootstrap(&damaged.layout, &bad);
        for command in ["check", "inspect"] {
            let out = darter([command, &image]).refuses();
            assert!(out.text().contains(mentions), "{what}: {out:?}");
        }
        let out = damaged
            .work
            .path()
            .join(format!("out-{}", what.replace(' ', "-")));
        darter_to_dir("unpack", &image, &out).refuses();
    }
}

/// Offsets worth flipping in a bootstrap: the Darter header, samples of
/// the reserved zeros up to the EROFS superblock, the superblock, every
/// non-zero byte (inodes, names, chunk indexes, the blob table), and a
/// sample of the zero padding elsewhere.
fn offsets_to_flip(raw: &[u8]) -> Vec<usize> {
    (0..raw.len())
        .filter(|&i| match i {
            0..64 | 1024..1152 => true,
            64..1024 => i % 61 == 0,
            _ => raw[i] != 0 || i % 251 == 0,
        })
        .collect()
}

/// Regression: bytes 64..1024 of a bootstrap are reserved (zero), but
/// readers accepted anything there.
#[test]
fn nonzero_reserved_bytes_before_the_superblock_were_accepted() {
    let damaged = Damaged::new();
    let mut raw = raw_bootstrap(&damaged.layout);
    raw[500] = 1;
    let image = resign_bootstrap(&damaged.layout, &raw);
    darter(["check", &image])
        .refuses()
        .mentions(&["reserved byte 500"]);
}

/// Regression: a chunk-based inode may name its own chunk size in EROFS,
/// and readers took the bootstrap's for every file. A file of three 1 MiB
/// chunks whose inode claimed 2 MiB chunks passed `check`, and `unpack`
/// wrote two chunks and zeros where the third belonged (while the kernel,
/// reading the inode's chunk size, showed other bytes).
#[test]
fn inode_chunk_size_differing_from_the_bootstrap_was_accepted() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    write_file(&tree.join("big"), &noise(7, (5 << 20) / 2));
    let layout = work.path().join("layout");
    build(&tree, &oci(&layout, "t"), &["--chunk-size", "1M"]);
    let mut raw = raw_bootstrap(&layout);
    let at = inode_field_offset(&raw, b"big", INODE_I_U);
    raw[at] += 1; // chunk bits: 2 MiB instead of 1 MiB
    let image = resign_bootstrap(&layout, &raw);
    darter(["check", &image])
        .refuses()
        .mentions(&["differs from the image's"]);
    darter_to_dir("unpack", &image, &work.path().join("out"))
        .refuses()
        .mentions(&["differs from the image's"]);
}

/// Where `i_u` (chunk format, block address or device number) lies in an
/// EROFS inode, compact or extended.
const INODE_I_U: usize = 16;

/// The offset in `raw` of byte `field` of the inode of `name` in the root
/// directory.
fn inode_field_offset(raw: &[u8], name: &[u8], field: usize) -> usize {
    let bootstrap = darter_format::bootstrap::Bootstrap::open(raw).unwrap();
    let erofs = bootstrap.erofs();
    let root = erofs.inode(erofs.root_nid()).unwrap();
    let entry = erofs.lookup(&root, name).unwrap().unwrap();
    let sb = erofs.superblock();
    let start = (u64::from(sb.meta_blkaddr) << sb.blkszbits) + (entry.nid << 5);
    usize::try_from(start).unwrap() + field
}

/// Whatever byte of a (re-signed) bootstrap is flipped, no command
/// panics; any flip in the Darter header area is refused; and when
/// `check` calls an image sound, `unpack` writes it out.
#[test]
fn bytes_flipped_anywhere_in_the_bootstrap_never_panic() {
    let damaged = Damaged::new();
    let raw = raw_bootstrap(&damaged.layout);
    let (mut sound, mut refused) = (0, 0);
    for offset in offsets_to_flip(&raw) {
        let mut bad = raw.clone();
        bad[offset] ^= 0x5a;
        let image = resign_bootstrap(&damaged.layout, &bad);
        let check = darter(["check", &image]);
        if check.status == Some(0) {
            assert!(offset >= 1024, "flip at {offset} not noticed: {check:?}");
            sound += 1;
            let out = damaged.work.path().join("unpacked");
            darter_to_dir("unpack", &image, &out).ok();
            std::fs::remove_dir_all(&out).unwrap();
        } else {
            refused += 1;
            check.refuses();
        }
    }
    eprintln!("{refused} flips refused, {sound} made another sound image");
}

/// A hostile bootstrap (re-signed, so its digest matches) whose directory
/// entry names are paths: `../NAME` or an absolute path. Unpacking must not
/// create anything outside the target.
#[test]
fn entry_names_that_are_paths_do_not_escape_the_target() {
    let work = tempfile::tempdir().unwrap();
    let escaped_up = work.path().join("up-escaped");
    let escaped_abs = work.path().join("abs-escaped");
    let names: [Vec<u8>; 2] = [
        b"../up-escaped".to_vec(),
        escaped_abs.as_os_str().as_encoded_bytes().to_vec(),
    ];
    for name in names {
        // A file whose name has the same length, to be overwritten in place.
        let placeholder = vec![b'Q'; name.len()];
        let tree = work.path().join("tree");
        write_file(
            &tree.join(std::str::from_utf8(&placeholder).unwrap()),
            b"payload\n",
        );
        let layout = work.path().join("layout");
        build(&tree, &oci(&layout, "t"), &[]);
        let mut raw = raw_bootstrap(&layout);
        let at = raw
            .windows(placeholder.len())
            .position(|w| w == placeholder.as_slice())
            .expect("the name is in the bootstrap");
        raw[at..at + name.len()].copy_from_slice(&name);
        let image = resign_bootstrap(&layout, &raw);

        let target = work.path().join("target");
        let unpacked = darter_to_dir("unpack", &image, &target);
        assert!(
            !escaped_up.exists() && !escaped_abs.exists(),
            "{unpacked:?}"
        );
        unpacked.refuses().mentions(&["invalid name"]);
        darter(["check", &image])
            .refuses()
            .mentions(&["invalid name"]);
        for dir in [&tree, &layout, &target] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
