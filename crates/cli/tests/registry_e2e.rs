//! End to end against a real registry: the Debian python3 image (two gzip
//! layers made by umoci) pushed as a plain OCI image is converted
//! registry-to-registry by `darter build`, mounted lazily from the
//! registry by `darter mount`, runs python3 in a chroot, and the mounted
//! tree is exactly what `umoci unpack` makes of the original image.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::process::Command;

use common::num;
use darter_testkit::fixtures::umoci_unpack;
use darter_testkit::process::run;
use mount_common::{assert_mount_matches, metadata_bytes, timed};
use registry_common::{MountSpec, RegistryMount, docker, registry_with_python};

#[test]
fn debian_python_image_converted_in_a_registry_runs_from_a_lazy_mount_of_it() {
    let ((registry, scratch, source), pushed) = timed(|| registry_with_python("test/python"));
    let host = registry.host();

    let target = docker(&host, "test/python:darter");
    let (report, converted) =
        timed(|| scratch.build(docker(&host, "test/python:oci"), &target, &[]));
    assert_eq!(
        num(&report, "/new_blobs"),
        2,
        "one blob per layer: {report:#}"
    );
    assert_eq!(
        num(&report, "/sent_bytes"),
        num(&report, "/image_bytes"),
        "a fresh repository lacks everything: {report:#}"
    );
    let inspect = scratch.inspect(&target);
    assert_eq!(inspect["manifest"], report["manifest_digest"]);

    // The plain form of the reference, without docker://.
    let (mount, mounted) = timed(|| {
        RegistryMount::start(
            &scratch,
            &format!("{host}/test/python:darter"),
            &scratch.path("mnt"),
            &scratch.path("cache"),
            &MountSpec::default(),
        )
    });
    let at_mount = mount.stats();
    let bootstrap = num(&inspect, "/bootstrap_bytes");
    assert!(
        (bootstrap..=metadata_bytes(&inspect)).contains(&at_mount.backend_bytes),
        "mounting fetches the bootstrap and, in the background, at most the chunk tables: \
         {at_mount:?}, bootstrap {bootstrap}, with tables {}",
        metadata_bytes(&inspect)
    );

    let (python, ran) = timed(|| {
        run(Command::new("chroot")
            .arg(mount.path())
            .args([
                "python3",
                "-c",
                "import sys; print('hello from', sys.implementation.name, 6 * 7)",
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    });
    assert_eq!(
        String::from_utf8_lossy(&python.stdout),
        "hello from cpython 42\n"
    );
    let after_python = mount.stats();

    let reference = umoci_unpack(&source.layout, &source.tag, &scratch.path("bundle")).unwrap();
    let ((), compared) = timed(|| assert_mount_matches(&reference, mount.path()));

    let stats = mount.stats();
    assert_eq!(stats.verify_failures, 0, "{stats:?}");
    let whole_image = metadata_bytes(&inspect) + num(&inspect, "/stored_bytes");
    assert!(
        stats.backend_bytes <= whole_image,
        "reading everything fetched {} bytes, more than the {whole_image} of the image: {stats:?}",
        stats.backend_bytes
    );
    eprintln!(
        "registry start and skopeo push {pushed:?}; registry-to-registry conversion {converted:?} ({} bytes sent); \
         mount {mounted:?}; python3 {ran:?} fetching {} bytes in {} requests; \
         umoci comparison of the whole tree {compared:?}",
        num(&report, "/sent_bytes"),
        after_python.backend_bytes,
        after_python.backend_requests
    );
}
