//! Caching: warm reads come from the kernel's page cache, concurrent
//! readers of the whole tree get correct data, `--prefetch all` fills the
//! shared cache in the background while on-demand reads go first, and
//! `darter cache gc` trims the cache under a running mount without
//! breaking it, and a full cache disk costs only the caching.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use common::darter;
use darter_testkit::process::{run, wait_until};
use darter_testkit::tree::TrickyTree;
use mount_common::{
    BuiltImage, PACK_HEADER_LEN, Work, assert_mount_matches, cached_chunks, locate_chunk,
    noise_files, timed,
};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[test]
fn second_read_of_a_file_comes_from_the_page_cache() {
    let work = Work::new();
    let source = work.path("source");
    noise_files(&source, &[("file", 3 * MIB + 5), ("small", 100)]);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let mount = work.mount(&image, "mnt", &[]);
    for name in ["file", "small"] {
        let expected = std::fs::read(source.join(name)).unwrap();
        assert!(
            std::fs::read(mount.join(name)).unwrap() == expected,
            "{name}"
        );
        let first = mount.stats();
        assert!(first.read_bytes >= expected.len() as u64, "{first:?}");

        // Again, in this process and in another one (a new open).
        assert!(
            std::fs::read(mount.join(name)).unwrap() == expected,
            "{name}"
        );
        let cat = run(Command::new("cat").arg(mount.join(name)));
        assert!(cat.stdout == expected, "{name} through cat");

        let second = mount.stats();
        assert_eq!(
            (
                second.read_bytes,
                second.backend_requests,
                second.cache_hits
            ),
            (first.read_bytes, first.backend_requests, first.cache_hits),
            "{name}: warm reads reached the daemon"
        );
    }
}

#[test]
fn two_concurrent_full_tree_readers_get_correct_data() {
    let work = Work::new();
    let source = work.path("source");
    TrickyTree::small().create(&source).unwrap();
    let files: Vec<(String, usize)> = (0..40)
        .map(|i| (format!("data/{i}"), 100 * KIB * i))
        .collect();
    let files: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    noise_files(&source, &files);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let unpacked = work.unpack(&image);
    let mount = work.mount(&image, "mnt", &[]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| assert_mount_matches(&unpacked, mount.path()));
        }
    });
    let stats = mount.stats();
    assert_eq!(stats.verify_failures, 0, "{stats:?}");
}

#[test]
fn prefetch_all_fills_the_cache_in_the_background_while_reads_go_first() {
    let work = Work::new();
    let source = work.path("source");
    let mut files: Vec<(String, usize)> =
        (0..24).map(|i| (format!("bulk/{i:02}"), 4 * MIB)).collect();
    // Built last, so it is at the end of the blob: the prefetcher gets to it last.
    files.push(("zz-last".into(), 64 * KIB));
    let files: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    noise_files(&source, &files);
    let image = BuiltImage::build(&source, &work.path("layout"), &["--digest", "sha256"]);
    let last = std::fs::read(source.join("zz-last")).unwrap();
    let place = locate_chunk(&image, &last);
    assert!(
        place.frame_offset + place.frame_len == image.stored_bytes(),
        "zz-last should be the last frame of the blob: {place:?}"
    );
    let cache = work.cache();
    let mount = work.mount(&image, "mnt", &["--prefetch", "all"]);
    let (data, took) = timed(|| std::fs::read(mount.join("zz-last")).unwrap());
    let during = mount.stats();
    assert!(data == last, "wrong bytes");
    eprintln!(
        "the on-demand read took {took:?}; {} of {} bytes prefetched by then",
        during.prefetch_bytes, during.image_bytes
    );
    assert!(
        during.prefetch_bytes < during.image_bytes - place.frame_len && during.cache_misses >= 1,
        "the read should have fetched its chunk itself, before the prefetcher got there: \
         {during:?}"
    );
    assert!(took < Duration::from_secs(5), "the read waited {took:?}");

    let (_, filled) = timed(|| {
        wait_until(
            Duration::from_secs(300),
            "the prefetch to fill the cache",
            || cached_chunks(&cache).len() as u64 == image.unique_chunks(),
        );
    });
    let done = mount.stats();
    eprintln!("the cache was full {filled:?} after the read: {done:?}");
    assert!(
        done.prefetch_bytes >= done.image_bytes - place.frame_len
            && done.prefetch_bytes <= done.image_bytes,
        "the prefetcher should have fetched the rest of the image once: {done:?}"
    );
    assert_eq!(done.verify_failures, 0, "{done:?}");
}

/// Writes `count` files of `size` noise bytes, `f00`, `f01`, ..., into
/// `source`; returns their names.
fn equal_files(source: &std::path::Path, count: usize, size: usize) -> Vec<String> {
    let names: Vec<String> = (0..count).map(|i| format!("f{i:02}")).collect();
    let files: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), size)).collect();
    noise_files(source, &files);
    names
}

#[test]
fn cache_gc_under_a_running_mount_shrinks_the_cache_and_reads_stay_correct() {
    let work = Work::new();
    let source = work.path("source");
    let files = equal_files(&source, 16, 512 * KIB);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let cache = work.cache();
    let mount = work.mount(&image, "mnt", &[]);
    for name in &files[..8] {
        std::fs::read(mount.join(name)).unwrap();
    }
    // Chunks reach the disk cache from a background writer.
    wait_until(
        Duration::from_secs(30),
        "the 8 chunks read to reach the disk cache",
        || cached_chunks(&cache).len() == 8,
    );
    let before = mount.stats();

    let report = darter([
        OsStr::new("cache"),
        OsStr::new("gc"),
        OsStr::new("--max-size"),
        OsStr::new("1K"),
        OsStr::new("--cache"),
        cache.as_os_str(),
        OsStr::new("--json"),
    ])
    .ok()
    .json();
    assert_eq!(
        (
            common::num(&report, "/before"),
            common::num(&report, "/after"),
            common::num(&report, "/removed")
        ),
        (8 * (512 * KIB as u64 + PACK_HEADER_LEN), 0, 8),
        "{report}"
    );
    assert!(cached_chunks(&cache).is_empty());

    for name in &files {
        let expected = std::fs::read(source.join(name)).unwrap();
        assert!(
            std::fs::read(mount.join(name)).unwrap() == expected,
            "{name}"
        );
    }
    let after = mount.stats();
    assert!(
        after.backend_bytes - before.backend_bytes >= 8 * 512 * KIB as u64,
        "the other half should have been fetched: {before:?} -> {after:?}"
    );
    // A second mount on the same cache has no page cache: it reads the
    // cache (and fetches what gc removed).
    let second = work.mount(&image, "second", &[]);
    assert_mount_matches(&source, second.path());
    assert_eq!(second.stats().verify_failures, 0);
}

/// Regression: with the cache's disk full, every failed append made a new,
/// empty pack file and logged a warning: a full disk grew a file and a log
/// line per chunk. A full cache disk costs only the caching: reads are
/// right, the packs stay few, the warnings rare.
#[test]
fn a_full_cache_disk_costs_only_the_caching() {
    let work = Work::new();
    let source = work.path("source");
    equal_files(&source, 24, 300 * KIB);
    let image = BuiltImage::build(&source, &work.path("layout"), &["--compressor", "none"]);
    let cache = work.cache();
    std::fs::create_dir_all(&cache).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&cache));
    let _cache_mount = darter_testkit::process::MountGuard::new(&cache);

    let mount = work.mount(&image, "mnt", &[]);
    assert_mount_matches(&source, mount.path());
    drop(mount);
    let packs = std::fs::read_dir(cache.join("packs")).unwrap().count();
    assert!(packs <= 2, "{packs} pack files for a full disk");
    // The foreground daemon's log, beside its mountpoint (it has exited).
    let log = std::fs::read_to_string(work.mountpoint("mnt").with_file_name("mnt.log")).unwrap();
    let warnings = log.matches("cannot write to the disk cache").count();
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{log}");
}
