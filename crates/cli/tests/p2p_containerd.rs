//! containerd pulling a real OCI image (Debian with python3, two gzip
//! layers) through P2P peers, all real: each containerd's `hosts.toml`
//! names its peer's registry mirror (`capabilities = ["pull", "resolve"]`),
//! manifests pass through it, blobs come P2P. The second containerd's peer
//! takes every blob from the first peer, not the registry, and the image
//! runs.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod p2p_common;
mod registry_common;

use std::path::{Path, PathBuf};

use darter_testkit::containerd::Containerd;
use darter_testkit::process::run;
use p2p_common::{Cluster, Peer};
use registry_common::{raw_manifest, registry_with_python};
use serde_json::Value;

const REPOSITORY: &str = "p2p/python";

/// A hosts directory sending `registry`'s pulls and resolves to `mirror`.
fn hosts_dir(dir: &Path, registry: &str, mirror: &Peer) -> PathBuf {
    let hosts = dir.join(format!("hosts-{}", mirror.mirror.port()));
    let file = hosts.join(registry).join("hosts.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        format!(
            "server = \"http://{registry}\"\n\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.mirror
        ),
    )
    .unwrap();
    hosts
}

/// `ctr images pull --hosts-dir HOSTS IMAGE` on `containerd`.
fn pull(containerd: &Containerd, hosts: &Path, image: &str) {
    let out = run(containerd
        .ctr(["images", "pull", "--hosts-dir"])
        .arg(hosts)
        .arg(image));
    assert!(out.status.success(), "{out:?}");
}

/// The sizes of the image's config and layer blobs.
fn blob_bytes(manifest: &Value) -> u64 {
    let layers = manifest["layers"].as_array().unwrap();
    std::iter::once(&manifest["config"])
        .chain(layers)
        .map(|d| d["size"].as_u64().unwrap())
        .sum()
}

#[test]
fn containerd_pulls_an_image_through_peers_and_the_second_pull_comes_from_the_first_peer() {
    let (registry, _scratch, _source) = registry_with_python(REPOSITORY);
    let host = registry.host();
    let manifest: Value =
        serde_json::from_slice(&raw_manifest(&host, &format!("{REPOSITORY}:oci"))).unwrap();
    let blobs = blob_bytes(&manifest);
    let cluster = Cluster::with_registry(registry);
    let a = cluster.peer("a", false);
    let b = cluster.peer("b", false);
    cluster.wait_peers(2);
    let image = format!("{host}/{REPOSITORY}:oci");

    let first = Containerd::start(&[]).unwrap();
    pull(&first, &hosts_dir(cluster.dir.path(), &host, &a), &image);
    assert_eq!(a.counter("bytes_from_origin"), blobs);
    assert_eq!(a.counter("bytes_served_to_clients"), blobs);

    let second = Containerd::start(&[]).unwrap();
    pull(&second, &hosts_dir(cluster.dir.path(), &host, &b), &image);
    assert_eq!(b.counter("bytes_from_origin"), 0);
    assert_eq!(b.counter("bytes_from_peers"), blobs);
    assert_eq!(b.counter("bytes_served_to_clients"), blobs);
    assert_eq!(a.counter("bytes_served_to_peers"), blobs);

    let ran = run(second.ctr(["run", "--rm", &image, "p2p-python"]).args([
        "python3",
        "-c",
        "print('hello from p2p', 6 * 7)",
    ]));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello from p2p 42\n");
}
