//! Darter images are ordinary OCI images to other tools: `skopeo inspect`
//! reads them and `skopeo copy` carries them unchanged.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use darter_testkit::process::run;
use darter_testkit::tree::TrickyTree;
use serde_json::Value;

fn skopeo(args: &[&str]) -> Vec<u8> {
    run(Command::new("skopeo").args(args)).stdout
}

#[test]
fn skopeo_inspects_and_copies_images_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    TrickyTree::small().create(&tree).unwrap();
    let layout = work.path().join("layout");
    // Two blobs: built against a parent with part of the tree.
    let base = work.path().join("base");
    copy_tree(&tree.join("regular"), &base);
    build(&base, &oci(&layout, "base"), &[]);
    let image = oci(&layout, "v1");
    let report = build(&tree, &image, &["--parent", &oci(&layout, "base")]);
    assert_eq!(num(&report, "/blobs"), 2, "{report:#}");

    let inspected: Value = serde_json::from_slice(&skopeo(&["inspect", &image])).unwrap();
    let descriptor = manifest_descriptor(&layout, "v1");
    assert_eq!(inspected["Digest"], descriptor["digest"]);
    let manifest = manifest(&layout, "v1");
    let layers: Vec<&Value> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["digest"])
        .collect();
    let listed: Vec<&Value> = inspected["Layers"].as_array().unwrap().iter().collect();
    assert_eq!(listed, layers);
    let raw = skopeo(&["inspect", "--raw", &image]);
    let digest = descriptor["digest"].as_str().unwrap();
    assert_eq!(raw, std::fs::read(blob_path(&layout, digest)).unwrap());

    let copy_layout = work.path().join("copy");
    let copy = oci(&copy_layout, "copied");
    skopeo(&["copy", &image, &copy]);
    assert_eq!(
        manifest_descriptor(&copy_layout, "copied")["digest"],
        digest
    );
    check_sound(&copy);
    let out = work.path().join("out");
    unpack(&copy, &out);
    assert_same_tree(&tree, &out);
}
