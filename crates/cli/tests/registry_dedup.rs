//! Dedup push: the Debian python3 image converted into a registry, then a
//! new version with one 10 MiB file added, built with `--parent` (the
//! previous version in the registry). The push sends at most that file's
//! compressed chunks plus the new bootstrap, chunk table, config and
//! manifest, as the build summary and the registry's own storage growth
//! both show.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use common::{copy_tree, noise, num, write_file};
use darter_testkit::fixtures::debian_python_rootfs;
use mount_common::timed;
use registry_common::{
    MountSpec, RegistryMount, assert_reads, docker, raw_manifest, registry_with_python,
    stored_file_bytes,
};
use serde_json::Value;

const MIB: usize = 1 << 20;
const CHANGED_FILE: &str = "usr/share/darter-test/model.bin";
const CHANGED_SIZE: usize = 10 * MIB;
/// What the registry stores besides blob bytes for a push: link files
/// (repository layers, manifest revision, tag) of a few dozen bytes each.
const REGISTRY_BOOKKEEPING: u64 = 16 << 10;

/// The blobs of `inspect` (digest, size).
fn blobs(inspect: &Value) -> Vec<(String, u64)> {
    inspect["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["digest"].as_str().unwrap().to_owned(), num(b, "/size")))
        .collect()
}

/// The sizes of the config and the manifest of a registry image.
fn config_and_manifest_bytes(host: &str, path: &str) -> (u64, u64) {
    let raw = raw_manifest(host, path);
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    (num(&manifest, "/config/size"), raw.len() as u64)
}

#[test]
fn rebuilding_with_one_changed_file_pushes_only_its_chunks_and_new_metadata() {
    let (registry, scratch, _) = registry_with_python("dedup/python");
    let host = registry.host();
    let v1 = docker(&host, "dedup/python:v1");
    let (first, first_took) = timed(|| scratch.build(docker(&host, "dedup/python:oci"), &v1, &[]));
    let v1_inspect = scratch.inspect(&v1);

    // The next version: the same tree (the root filesystem the image was
    // made from) with one 10 MiB file added.
    let tree = scratch.path("v2-tree");
    let ((), copied) = timed(|| copy_tree(&debian_python_rootfs().unwrap(), &tree));
    let changed = noise(7, CHANGED_SIZE);
    write_file(&tree.join(CHANGED_FILE), &changed);

    let stored_before = stored_file_bytes(&registry.storage_dir());
    let v2 = docker(&host, "dedup/python:v2");
    let (report, second_took) = timed(|| scratch.build(&tree, &v2, &["--parent", &v1]));
    let growth = stored_file_bytes(&registry.storage_dir()) - stored_before;

    let v2_inspect = scratch.inspect(&v2);
    let old = blobs(&v1_inspect);
    let new: Vec<(String, u64)> = blobs(&v2_inspect)
        .into_iter()
        .filter(|b| !old.contains(b))
        .collect();
    assert_eq!(new.len(), 1, "one new blob: {v2_inspect:#}");
    let new_blob = v2_inspect["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["digest"] == new[0].0.as_str())
        .unwrap();
    assert_eq!(
        num(new_blob, "/chunk_bytes"),
        CHANGED_SIZE as u64,
        "the new blob holds the changed file's chunks and nothing else: {new_blob:#}"
    );
    assert_eq!(
        num(&report, "/chunks/new_chunks"),
        (CHANGED_SIZE / MIB) as u64
    );
    assert_eq!(num(&report, "/new_blob_bytes"), new[0].1);

    // The file's compressed chunks with their chunk table, the bootstrap,
    // config and manifest.
    let (config, manifest) = config_and_manifest_bytes(&host, "dedup/python:v2");
    let bound = new[0].1 + num(&v2_inspect, "/bootstrap_bytes") + config + manifest;
    let sent = num(&report, "/sent_bytes");
    assert!(
        sent <= bound,
        "sent {sent} bytes, more than the changed file's blob, bootstrap, config and manifest \
         ({bound}): {report:#}"
    );
    assert!(sent >= new[0].1, "the new chunks were not sent? {report:#}");
    assert!(
        growth <= bound + REGISTRY_BOOKKEEPING,
        "the registry grew by {growth} bytes, more than {bound} + bookkeeping"
    );
    assert!(
        growth >= new[0].1,
        "the registry grew by only {growth} bytes"
    );
    assert_eq!(
        num(&report, "/image_bytes"),
        blobs(&v2_inspect).iter().map(|b| b.1).sum::<u64>()
            + num(&v2_inspect, "/bootstrap_bytes")
            + config
            + manifest,
        "image_bytes counts everything the image references: {report:#}"
    );

    // The new version is whole: the changed file and an old one read back
    // from a mount of it.
    let mount = RegistryMount::start(
        &scratch,
        &v2,
        &scratch.path("mnt"),
        &scratch.path("cache"),
        &MountSpec::default(),
    );
    assert_reads(&mount.join(CHANGED_FILE), &changed);
    assert_reads(
        &mount.join("usr/bin/python3"),
        &std::fs::read(tree.join("usr/bin/python3")).unwrap(),
    );
    eprintln!(
        "v1: converted in {first_took:?}, sent {} bytes; copied its rootfs in {copied:?}; \
         v2 (+10 MiB file): built in {second_took:?}, sent {sent} of {} bytes \
         (bound {bound}), registry grew by {growth} bytes",
        num(&first, "/sent_bytes"),
        num(&report, "/image_bytes"),
    );
}
