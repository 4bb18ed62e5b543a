//! Everything a mount serves is verified: a damaged chunk in a blob makes
//! reads of the file holding it fail with EIO (and is logged with its blob,
//! chunk and file) while other files read fine; a damaged chunk in the
//! cache is dropped and fetched again; a daemon killed while filling its
//! cache leaves nothing that is later served wrong.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use common::{flip_byte, noise, write_file};
use darter_testkit::process::wait_until;
use mount_common::{
    BuiltImage, CachedChunk, DAEMON_TIMEOUT, KERNEL_EROFS, Mounted, Work, assert_eio,
    assert_mount_matches, cached_chunk_location, cached_chunks, locate_chunk, noise_files,
    sha256_hex,
};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Chunk digests the tests can compute (sha2 is at hand, blake3 is not).
const SHA256: &[&str] = &["--digest", "sha256"];

/// Text that zstd compresses well, different for each `seed`.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("line {line} of file {seed}: the quick brown fox\n").as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// Files of a small image: (path, content). `victim-raw` is one chunk
/// stored raw (noise does not compress), `victim-zstd` one zstd frame.
fn verify_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("victim-raw".to_owned(), noise(1, 512 * KIB)),
        ("victim-zstd".to_owned(), text(2, 600 * KIB)),
        ("big-neighbour".to_owned(), noise(3, 3 * MIB)),
    ];
    for i in 0..20 {
        files.push((format!("small/{i}.txt"), text(100 + i, 3000)));
    }
    for (path, content) in &files {
        write_file(&root.join(path), content);
    }
    files
}

/// (file, its frame's compression, which byte of its frame to flip given
/// the frame's length): a wrong byte of raw data is a digest mismatch, a
/// wrong zstd magic number a frame that does not decompress.
type BlobDamage = (&'static str, u8, fn(u64) -> u64);

const BLOB_DAMAGE: &[BlobDamage] = &[("victim-raw", 0, |len| len / 2), ("victim-zstd", 1, |_| 0)];

#[test]
fn flipped_byte_in_a_blob_fails_only_the_affected_file_with_eio() {
    flipped_byte_in_a_blob(&[]);
}

/// Through the kernel's EROFS driver the daemon is asked for device bytes,
/// not files: the log still names the file that holds the damaged chunk.
#[test]
fn flipped_byte_in_a_blob_fails_only_the_affected_file_with_eio_through_the_kernel_erofs_frontend()
{
    flipped_byte_in_a_blob(KERNEL_EROFS);
}

fn flipped_byte_in_a_blob(frontend: &[&str]) {
    let work = Work::new();
    let source = work.path("source");
    let files = verify_tree(&source);
    let image = BuiltImage::build(&source, &work.path("layout"), SHA256);
    let victims: Vec<_> = BLOB_DAMAGE
        .iter()
        .map(|&(name, compression, byte_to_flip)| {
            let content = &files.iter().find(|(p, _)| p == name).unwrap().1;
            let chunk = locate_chunk(&image, content);
            assert_eq!(chunk.compression, compression, "{name}: {chunk:?}");
            flip_byte(
                &chunk.blob,
                chunk.frame_offset + byte_to_flip(chunk.frame_len),
            );
            (name, chunk)
        })
        .collect();

    let cache = work.path("cache");
    let mount = Mounted::detached(&image.reference, &work.mountpoint("mnt"), &cache, frontend);
    for (name, _) in &victims {
        assert_eio(std::fs::read(mount.join(name)), name);
        // Still refused the second time: nothing unverified was kept.
        assert_eio(std::fs::read(mount.join(name)), name);
    }
    for (path, content) in &files {
        if !path.starts_with("victim") {
            assert!(
                std::fs::read(mount.join(path)).unwrap() == *content,
                "{path}"
            );
        }
    }

    let stats = mount.stats();
    assert!(
        stats.verify_failures >= BLOB_DAMAGE.len() as u64,
        "{stats:?}"
    );
    let log = mount.log();
    for (name, chunk) in &victims {
        let content = &files.iter().find(|(p, _)| p == name).unwrap().1;
        assert!(
            cached_chunk_location(&cache, content).is_none(),
            "a damaged chunk of {name} reached the cache"
        );
        for needle in [
            chunk.blob_digest.clone(),
            format!("chunk {}", chunk.index),
            format!("/{name}"),
        ] {
            assert!(
                log.contains(&needle),
                "the log does not mention {needle:?}:\n{log}"
            );
        }
    }
}

/// (file, how its record's bytes in the cache pack are damaged).
type Damage = (&'static str, fn(&CachedChunk));

const CACHE_DAMAGE: &[Damage] = &[
    ("flipped", |c| flip_byte(&c.pack, c.offset + 1000)),
    ("first-byte", |c| flip_byte(&c.pack, c.offset)),
    ("last-byte", |c| flip_byte(&c.pack, c.offset + c.len - 1)),
    ("zeroed", |c| {
        let pack = std::fs::OpenOptions::new()
            .write(true)
            .open(&c.pack)
            .unwrap();
        pack.write_all_at(&vec![0; c.len as usize], c.offset)
            .unwrap();
    }),
];

#[test]
fn damaged_cached_chunks_are_dropped_and_fetched_again() {
    let work = Work::new();
    let source = work.path("source");
    let sizes: Vec<(&str, usize)> = CACHE_DAMAGE.iter().map(|(n, _)| (*n, 256 * KIB)).collect();
    noise_files(&source, &sizes);
    let image = BuiltImage::build(&source, &work.path("layout"), SHA256);
    let cache = work.path("cache");
    {
        let first = work.mount(&image, "first", &[]);
        for (name, _) in CACHE_DAMAGE {
            std::fs::read(first.join(name)).unwrap();
        }
    }
    for (name, damage) in CACHE_DAMAGE {
        let content = std::fs::read(source.join(name)).unwrap();
        damage(&cached_chunk_location(&cache, &content).unwrap());
    }

    // A new mount has neither page cache nor memory cache: it must go to disk.
    let second = work.mount(&image, "second", &[]);
    for (name, _) in CACHE_DAMAGE {
        let content = std::fs::read(source.join(name)).unwrap();
        assert!(
            std::fs::read(second.join(name)).unwrap() == content,
            "{name}: wrong bytes"
        );
        // The damaged record is marked dead and the chunk appended again by
        // the daemon's background writer.
        wait_until(DAEMON_TIMEOUT, "the cache to be repaired", || {
            cached_chunk_location(&cache, &content).is_some_and(|c| c.bytes() == content)
        });
    }
    let stats = second.stats();
    assert_eq!(
        stats.verify_failures,
        CACHE_DAMAGE.len() as u64,
        "{stats:?}"
    );
    assert!(
        stats.backend_bytes >= image.metadata_bytes() + (CACHE_DAMAGE.len() * 256 * KIB) as u64,
        "the damaged chunks should have been fetched again: {stats:?}"
    );
    let log = second.log();
    let dropped = log.matches("dropped corrupt cached chunk").count();
    assert_eq!(dropped, CACHE_DAMAGE.len(), "{log}");
}

/// Every record the cache would serve holds exactly the bytes its digest
/// is the sha256 of.
fn assert_cache_consistent(cache: &Path) {
    for chunk in cached_chunks(cache) {
        assert_eq!(chunk.algo, 2, "{chunk:?}");
        assert_eq!(
            sha256_hex(&chunk.bytes()),
            hex::encode(chunk.digest),
            "{chunk:?}"
        );
    }
}

/// Every pack in `cache` and its size.
fn pack_sizes(cache: &Path) -> BTreeMap<PathBuf, u64> {
    std::fs::read_dir(cache.join("packs"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let size = std::fs::metadata(&path).unwrap().len();
            (path, size)
        })
        .collect()
}

#[test]
fn daemon_killed_while_filling_its_cache_leaves_no_chunk_served_wrong() {
    let work = Work::new();
    let source = work.path("source");
    let files: Vec<(String, usize)> = (0..48).map(|i| (format!("f{i:02}"), 2 * MIB + i)).collect();
    let files: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    noise_files(&source, &files);
    let image = BuiltImage::build(&source, &work.path("layout"), SHA256);
    let cache = work.path("cache");
    let mountpoint = work.mountpoint("mnt");

    let mut doomed = Mounted::foreground(
        &image.reference,
        &mountpoint,
        &cache,
        &["--prefetch", "all"],
    );
    // A reader of the last file too, so demand fetches are in flight as well.
    let reader = {
        let path = doomed.join("f47");
        std::thread::spawn(move || std::fs::read(path).map(|d| d.len()))
    };
    wait_until(
        DAEMON_TIMEOUT,
        "the prefetch to start writing the cache",
        || doomed.stats().prefetch_bytes > 0,
    );
    doomed.kill();
    let _ = reader.join().unwrap();
    let cached = cached_chunks(&cache).len() as u64;
    eprintln!(
        "killed with {cached} of {} chunks cached",
        image.unique_chunks()
    );
    assert!(
        cached < image.unique_chunks(),
        "the daemon finished before it was killed"
    );
    assert_cache_consistent(&cache);
    let left = pack_sizes(&cache);

    // The next mount on the stale mountpoint with the same cache.
    let again = Mounted::foreground(&image.reference, &mountpoint, &cache, &[]);
    assert_mount_matches(&source, again.path());
    let stats = again.stats();
    assert_eq!(stats.verify_failures, 0, "{stats:?}");
    assert_cache_consistent(&cache);
    // It appended to packs of its own, not after a torn tail.
    let now = pack_sizes(&cache);
    for (pack, size) in &left {
        assert_eq!(now.get(pack), Some(size), "{}", pack.display());
    }
}
