//! `darter copy` between layouts and registries, both ways, and between
//! registries: the manifest is copied byte for byte (same digest), only
//! what the destination lacks is sent (blobs it has are skipped after a
//! HEAD, blobs in another repository of the same registry are mounted, not
//! uploaded), the `--json` summary counts it, and every copy passes
//! `darter check`.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::path::Path;

use common::{
    assert_same_tree, blobs, copy_tree, manifest_descriptor, noise, num, oci, write_file,
};
use darter_testkit::registry::TestRegistry;
use mount_common::noise_files;
use registry_common::{RegistrySettings, Scratch, docker, stored_blobs, stored_file_bytes};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// A layout with tag `v1`: two data blobs (one from the parent `base`,
/// one of its own, the first bigger than a copy piece), bootstrap and
/// config. Returns the layout and the tree of `v1`.
fn two_blob_layout(scratch: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = scratch.path("base");
    noise_files(&base, &[("big", 12 * MIB), ("etc/small", 3000)]);
    let tree = scratch.path("tree");
    copy_tree(&base, &tree);
    write_file(&tree.join("opt/added"), &noise(99, 2 * MIB));
    let layout = scratch.path("layout");
    scratch.build(&base, &oci(&layout, "base"), &[]);
    let report = scratch.build(
        &tree,
        &oci(&layout, "v1"),
        &["--parent", &oci(&layout, "base")],
    );
    assert_eq!(num(&report, "/blobs"), 2, "{report:#}");
    (layout, tree)
}

/// Asserts the copy counters of a `darter copy --json` report.
#[track_caller]
fn assert_counts(report: &Value, present: u64, mounted: u64, copied: u64) {
    let counts = (
        num(report, "/present"),
        num(report, "/mounted"),
        num(report, "/copied"),
    );
    assert_eq!(
        counts,
        (present, mounted, copied),
        "(present, mounted, copied): {report:#}"
    );
    assert_eq!(num(report, "/blobs"), present + mounted + copied);
}

#[test]
fn copies_between_layouts_and_registries_send_only_what_is_missing() {
    let registry = TestRegistry::start();
    let other_registry = TestRegistry::start();
    let host = registry.host();
    let scratch = Scratch::new(
        &[host.clone(), other_registry.host()],
        RegistrySettings::default(),
    );
    let (layout, tree) = two_blob_layout(&scratch);
    let digest = manifest_descriptor(&layout, "v1")["digest"].clone();
    let manifest_size = num(&manifest_descriptor(&layout, "v1"), "/size");
    let blob_count = 4; // config, two data blobs, bootstrap

    // Layout to registry: everything is sent.
    let in_a = docker(&host, "copy/a:v1");
    let report = scratch.copy(&oci(&layout, "v1"), &in_a);
    assert_counts(&report, 0, 0, blob_count);
    assert_eq!(report["manifest_digest"], digest);
    let image_bytes = num(&report, "/image_bytes");
    assert_eq!(num(&report, "/sent_bytes"), image_bytes + manifest_size);
    scratch.check_sound(&in_a);

    // Again: every blob is there, only the manifest goes.
    let again = scratch.copy(&oci(&layout, "v1"), &in_a);
    assert_counts(&again, blob_count, 0, 0);
    assert_eq!(num(&again, "/sent_bytes"), manifest_size);

    // To another repository of the same registry: mounted, not uploaded.
    let stored = stored_blobs(&registry.storage_dir());
    let bytes_before = stored_file_bytes(&registry.storage_dir());
    let in_b = docker(&host, "copy/b:v1");
    let mounted = scratch.copy(&in_a, &in_b);
    assert_counts(&mounted, 0, blob_count, 0);
    assert_eq!(num(&mounted, "/sent_bytes"), manifest_size);
    assert_eq!(mounted["manifest_digest"], digest);
    assert_eq!(stored_blobs(&registry.storage_dir()), stored);
    let growth = stored_file_bytes(&registry.storage_dir()) - bytes_before;
    assert!(
        growth < 16 << 10,
        "a cross-repository copy stored {growth} bytes"
    );
    scratch.check_sound(&in_b);

    // Registry to layout: byte-identical blobs.
    let copy_layout = scratch.path("copy-layout");
    let back = scratch.copy(&in_b, &oci(&copy_layout, "v1"));
    assert_counts(&back, 0, 0, blob_count);
    assert_eq!(back["manifest_digest"], digest);
    assert_eq!(blobs(&copy_layout), blobs_of_tag(&layout));
    scratch.check_sound(&oci(&copy_layout, "v1"));
    let out = scratch.path("unpacked");
    scratch
        .darter([
            Path::new("unpack"),
            Path::new(&oci(&copy_layout, "v1")),
            &out,
        ])
        .ok();
    assert_same_tree(&tree, &out);

    // Registry to another registry: no mounts across registries.
    let elsewhere = docker(&other_registry.host(), "copy/c:v1");
    let across = scratch.copy(&in_b, &elsewhere);
    assert_counts(&across, 0, 0, blob_count);
    assert_eq!(num(&across, "/sent_bytes"), image_bytes + manifest_size);
    assert_eq!(across["manifest_digest"], digest);
    scratch.check_sound(&elsewhere);
}

/// The blobs of `layout` that tag `v1` uses (the layout also holds the
/// bootstrap, config and manifest of `base`).
fn blobs_of_tag(layout: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let manifest = common::manifest(layout, "v1");
    let mut wanted: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|d| {
            d["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_owned()
        })
        .collect();
    wanted.push(
        manifest_descriptor(layout, "v1")["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned(),
    );
    blobs(layout)
        .into_iter()
        .filter(|(name, _)| wanted.contains(name))
        .collect()
}
