//! How a mount fetches: adjacent missing chunks needed by one read in one
//! backend request, its read-ahead in one more (in the background, so the
//! read does not wait for it), and concurrent readers of one chunk waiting
//! on a single fetch.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::path::Path;
use std::sync::Barrier;

use common::noise;
use mount_common::{BuiltImage, Counters, Mounted, Work, noise_files};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// A small file read first, so the blob's chunk table is fetched before
/// the counters are compared.
const WARM: &str = "warm";
const READERS: usize = 8;
/// One big chunk, so that fetching it takes long enough for every reader
/// to arrive while it is in flight.
const BIG_CHUNK: &[&str] = &["--chunk-size", "8M"];
const BIG: usize = 8 * MIB;

/// Mounts `image` on a fresh mountpoint and cache named `name`, and reads
/// [`WARM`] (fetching the chunk table).
fn warm_mount(work: &Work, image: &BuiltImage, name: &str) -> Mounted {
    let threads = READERS.to_string();
    let mount = Mounted::foreground(
        &image.reference,
        &work.mountpoint(name),
        &work.path(&format!("{name}-cache")),
        &["--threads", &threads],
    );
    std::fs::read(mount.join(WARM)).unwrap();
    mount
}

fn delta(before: &Counters, after: &Counters) -> (u64, u64) {
    (
        after.backend_requests - before.backend_requests,
        after.backend_bytes - before.backend_bytes,
    )
}

/// (build options, file size, backend requests, why).
const MERGE_CASES: &[(&[&str], usize, u64, &str)] = &[
    (
        &["--chunk-size", "16K", "--frame-size", "16K"],
        512 * KIB,
        1,
        "one read covers the file's 32 chunks: one request",
    ),
    (
        &[],
        2 * MIB,
        2,
        "the first read needs the first 1 MiB chunk and its read-ahead the second: \
         one request each",
    ),
];

#[test]
fn adjacent_missing_chunks_of_one_read_and_of_its_readahead_are_fetched_in_one_request_each() {
    for &(options, size, requests, why) in MERGE_CASES {
        let work = Work::new();
        let source = work.path("source");
        noise_files(&source, &[(WARM, 100), ("file", size)]);
        let image = BuiltImage::build(&source, &work.path("layout"), options);
        let mount = warm_mount(&work, &image, "mnt");
        let before = mount.stats();

        // One read(2) of the whole file.
        let data = std::fs::read(mount.join("file")).unwrap();

        assert!(
            data == std::fs::read(source.join("file")).unwrap(),
            "{why}: wrong bytes"
        );
        let after = mount.stats();
        assert_eq!(
            delta(&before, &after),
            (requests, size as u64),
            "{why}: the file's {size} raw-stored bytes ({before:?} -> {after:?})"
        );
    }
}

/// Reads every path with one thread each, all starting at once; asserts
/// each got `expected`.
fn read_all_at_once(paths: &[&Path], expected: &[u8]) {
    let start = Barrier::new(paths.len());
    std::thread::scope(|s| {
        for path in paths {
            let start = &start;
            s.spawn(move || {
                start.wait();
                let data = std::fs::read(path).unwrap();
                assert!(data == expected, "{}: wrong bytes", path.display());
            });
        }
    });
}

/// One file of one chunk; the counters of one reader on one mount,
/// then of many at once on another mount of the same image.
#[test]
fn concurrent_readers_of_one_uncached_file_fetch_it_once() {
    let work = Work::new();
    let source = work.path("source");
    noise_files(&source, &[(WARM, 100), ("file", BIG)]);
    let expected = std::fs::read(source.join("file")).unwrap();
    let image = BuiltImage::build(&source, &work.path("layout"), BIG_CHUNK);

    let alone = warm_mount(&work, &image, "alone");
    let before = alone.stats();
    read_all_at_once(&[&alone.join("file")], &expected);
    let one_reader = delta(&before, &alone.stats());
    assert_eq!(one_reader, (1, BIG as u64));

    let crowd = warm_mount(&work, &image, "crowd");
    let before = crowd.stats();
    let path = crowd.join("file");
    read_all_at_once(&[path.as_path(); READERS], &expected);
    let after = crowd.stats();
    assert_eq!(
        delta(&before, &after),
        one_reader,
        "{READERS} readers should cost what one does: {before:?} -> {after:?}"
    );
}

/// Different files (different inodes, so the kernel cannot merge their
/// reads) with the same content share one chunk: readers of all of them at
/// once must wait on one fetch of it.
#[test]
fn concurrent_reads_of_one_chunk_through_different_files_wait_on_one_fetch() {
    let work = Work::new();
    let source = work.path("source");
    noise_files(&source, &[(WARM, 100)]);
    let content = noise(7, BIG);
    let names: Vec<String> = (0..READERS).map(|i| format!("copy-{i}")).collect();
    for name in &names {
        std::fs::write(source.join(name), &content).unwrap();
    }
    let image = BuiltImage::build(&source, &work.path("layout"), BIG_CHUNK);
    assert_eq!(
        image.unique_chunks(),
        2,
        "the copies should share one chunk"
    );
    let mount = warm_mount(&work, &image, "mnt");
    let before = mount.stats();

    let paths: Vec<_> = names.iter().map(|n| mount.join(n)).collect();
    let paths: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    read_all_at_once(&paths, &content);

    let after = mount.stats();
    assert_eq!(
        delta(&before, &after),
        (1, BIG as u64),
        "one fetch of the shared chunk: {before:?} -> {after:?}"
    );
}
