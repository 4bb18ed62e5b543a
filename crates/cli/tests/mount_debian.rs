//! A real Debian bookworm root file system with python3 (about 210 MB of
//! files), mounted lazily: identical to its unpacked tree, and a program
//! runs from it at once fetching only a small part of the image.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::path::PathBuf;
use std::process::Command;

use darter_testkit::fixtures::debian_python_rootfs;
use darter_testkit::process::run;
use mount_common::{BuiltImage, KERNEL_EROFS, Work, assert_mount_matches};

/// A small file of the rootfs (3,526 bytes in bookworm).
const SMALL_FILE: &str = "etc/skel/.bashrc";
const MIB: u64 = 1 << 20;

/// The python3 rootfs built into a Darter image in `work` (about 4 s).
fn debian_image(work: &Work) -> (PathBuf, BuiltImage) {
    let rootfs = debian_python_rootfs().unwrap();
    let image = BuiltImage::build(&rootfs, &work.path("layout"), &[]);
    (rootfs, image)
}

#[test]
fn debian_rootfs_mount_matches_unpack() {
    debian_rootfs_mount_matches_unpack_with(&[]);
}

#[test]
fn debian_rootfs_mounted_through_the_kernel_erofs_frontend_matches_unpack() {
    debian_rootfs_mount_matches_unpack_with(KERNEL_EROFS);
}

fn debian_rootfs_mount_matches_unpack_with(frontend: &[&str]) {
    let work = Work::new();
    let (_, image) = debian_image(&work);
    let unpacked = work.unpack(&image);
    let mount = work.mount(&image, "mnt", frontend);
    assert_mount_matches(&unpacked, mount.path());
    let stats = mount.stats();
    assert_eq!(stats.verify_failures, 0, "{stats:?}");
    assert!(
        stats.backend_bytes <= image.metadata_bytes() + image.stored_bytes(),
        "reading everything once fetched more than the image: {stats:?}"
    );
}

#[test]
fn reading_one_small_file_fetches_only_metadata_and_its_chunk() {
    reading_one_small_file_fetches_only_metadata_and_its_chunk_with(&[]);
}

#[test]
fn through_the_kernel_erofs_frontend_reading_one_small_file_fetches_only_metadata_and_its_chunk() {
    reading_one_small_file_fetches_only_metadata_and_its_chunk_with(KERNEL_EROFS);
}

fn reading_one_small_file_fetches_only_metadata_and_its_chunk_with(frontend: &[&str]) {
    let work = Work::new();
    let (rootfs, image) = debian_image(&work);
    let file_bytes = common::num(&image.inspect, "/file_bytes");
    assert!(
        file_bytes >= 200_000_000,
        "the image should be 200 MB or more: {file_bytes}"
    );
    let expected = std::fs::read(rootfs.join(SMALL_FILE)).unwrap();
    assert!(
        (2048..=4096).contains(&expected.len()),
        "{SMALL_FILE} is no longer a file of about 4 KiB ({} bytes): pick another",
        expected.len()
    );
    let mount = work.mount(&image, "mnt", frontend);
    let mounted = mount.stats();
    let bootstrap = common::num(&image.inspect, "/bootstrap_bytes");
    let blobs = image.inspect["blobs"].as_array().map_or(1, Vec::len) as u64;
    assert!(
        mounted.backend_bytes >= bootstrap
            && mounted.backend_bytes <= image.metadata_bytes()
            && mounted.backend_requests <= 1 + blobs,
        "mounting should fetch the bootstrap and, in the background, at most the chunk \
         tables: {mounted:?}, bootstrap {bootstrap}, with tables {}",
        image.metadata_bytes()
    );

    assert_eq!(std::fs::read(mount.join(SMALL_FILE)).unwrap(), expected);

    let after = mount.stats();
    let bound = image.metadata_bytes() + 2 * MIB;
    eprintln!(
        "reading {SMALL_FILE} ({} bytes) fetched {} bytes in {} requests (bootstrap {bootstrap}, \
         bootstrap + chunk tables {}, image {} bytes)",
        expected.len(),
        after.backend_bytes,
        after.backend_requests,
        image.metadata_bytes(),
        after.image_bytes
    );
    assert!(
        after.backend_bytes <= bound,
        "fetched {} bytes, more than bootstrap + chunk tables + 2 MiB = {bound}: {after:?}",
        after.backend_bytes
    );
}

#[test]
fn python_runs_in_a_chroot_of_the_mount_fetching_a_small_fraction() {
    python_runs_in_a_chroot_of_the_mount_fetching_a_small_fraction_with(&[]);
}

#[test]
fn python_runs_in_a_chroot_of_a_kernel_erofs_mount_fetching_a_small_fraction() {
    python_runs_in_a_chroot_of_the_mount_fetching_a_small_fraction_with(KERNEL_EROFS);
}

fn python_runs_in_a_chroot_of_the_mount_fetching_a_small_fraction_with(frontend: &[&str]) {
    let work = Work::new();
    let (_, image) = debian_image(&work);
    let mount = work.mount(&image, "mnt", frontend);
    let out = run(Command::new("chroot")
        .arg(mount.path())
        .args(["python3", "-c", "print(1)"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    let stats = mount.stats();
    let fraction = stats.backend_bytes as f64 / stats.image_bytes as f64;
    eprintln!(
        "python3 -c 'print(1)' fetched {} of {} image bytes ({:.1}%) in {} requests",
        stats.backend_bytes,
        stats.image_bytes,
        100.0 * fraction,
        stats.backend_requests
    );
    assert!(
        fraction < 0.15,
        "fetched {:.1}% of the image: {stats:?}",
        100.0 * fraction
    );
}
