//! `darter mount` through P2P peers, all real: the config file names a
//! peer's registry mirror for the registry (`[registries."HOST"] mirror`),
//! so the mount's manifest and chunk reads (range GETs of blobs) go
//! through the peer, blobs served from its piece store, the pieces a read
//! covers fetched first. Two peers mounting one image take it from the registry
//! once. With a bearer-token registry the mount gets its token itself
//! through the mirror's passed-through challenge, and the seed fetches
//! with the mount's `Authorization`.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod p2p_common;
mod registry_common;

use std::path::Path;

use common::assert_same_tree;
use darter_testkit::process::wait_until;
use darter_testkit::registry::{RegistryAuth, TestRegistry, TokenConfig};
use mount_common::noise_files;
use p2p_common::{Cluster, Peer, START_TIMEOUT};
use registry_common::{MountSpec, RegistryMount, RegistrySettings, Scratch, assert_no_secrets};

const REPOSITORY: &str = "p2p/tree";
const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// A tree of several 4 MiB pieces of incompressible data and small files.
fn write_tree(root: &Path) {
    noise_files(
        root,
        &[
            ("big/one", 9 << 20),
            ("big/two", 7 << 20),
            ("mid/three", 1 << 20),
            ("small/a", 100),
            ("small/b", 4096),
            ("small/deep/c", 70_000),
        ],
    );
}

/// A scratch directory speaking plain HTTP to the registry, with a source
/// tree in `tree`.
fn scratch_with_tree(cluster: &Cluster) -> Scratch {
    let scratch = Scratch::new(&[cluster.registry.host()], RegistrySettings::default());
    write_tree(&scratch.dir("tree"));
    scratch
}

/// Mounts the registry's `REPOSITORY:v1` at `mnt-NAME`, pulling through
/// `peer`'s mirror (the config file says so).
fn mount_through(
    scratch: &Scratch,
    cluster: &Cluster,
    peer: &Peer,
    name: &str,
    spec: &MountSpec<'_>,
) -> RegistryMount {
    let host = cluster.registry.host();
    scratch.write_config(&format!(
        "[registries.\"{host}\"]\nplain_http = true\nmirror = \"http://{}\"\n",
        peer.mirror
    ));
    RegistryMount::start(
        scratch,
        &format!("{host}/{REPOSITORY}:v1"),
        &scratch.path(&format!("mnt-{name}")),
        &scratch.path(&format!("cache-{name}")),
        spec,
    )
}

#[test]
fn two_mounts_through_two_peers_read_the_tree_and_the_registry_sends_the_image_once() {
    let cluster = Cluster::start();
    let a = cluster.peer("a", false);
    let b = cluster.peer("b", false);
    cluster.wait_peers(2);
    let scratch = scratch_with_tree(&cluster);
    let image = format!("{}/{REPOSITORY}:v1", cluster.registry.host());
    scratch.build(scratch.path("tree"), &image, &[]);
    let before = cluster.registry.bytes_served();

    let mount_a = mount_through(&scratch, &cluster, &a, "a", &MountSpec::default());
    assert_same_tree(&scratch.path("tree"), mount_a.path());
    let blob_bytes = a.counter("bytes_from_origin");
    assert!(blob_bytes > 16 << 20, "{blob_bytes}");
    assert_eq!(a.counter("bytes_from_peers"), 0);
    assert!(a.counter("bytes_served_to_clients") >= 16 << 20);

    // b's mount takes every blob byte from a.
    let mount_b = mount_through(&scratch, &cluster, &b, "b", &MountSpec::default());
    assert_same_tree(&scratch.path("tree"), mount_b.path());
    assert_eq!(b.counter("bytes_from_origin"), 0);
    assert_eq!(b.counter("bytes_from_peers"), blob_bytes);
    assert_eq!(a.counter("bytes_served_to_peers"), blob_bytes);

    // The registry sent the blobs once (besides them, only manifests).
    wait_until(
        START_TIMEOUT,
        "the registry to log the blobs' bytes",
        || cluster.registry.bytes_served() - before >= blob_bytes,
    );
    let registry_bytes = cluster.registry.bytes_served() - before;
    assert!(
        registry_bytes < blob_bytes + (256 << 10),
        "the registry sent {registry_bytes} bytes for {blob_bytes} blob bytes"
    );
}

#[test]
fn a_mount_through_a_peer_of_a_token_registry_gets_its_token_itself_and_the_seed_uses_it() {
    let config = TokenConfig {
        users: vec![(USER.to_owned(), PASSWORD.to_owned())],
        ..TokenConfig::default()
    };
    let cluster = Cluster::with_registry(TestRegistry::start_with(&RegistryAuth::Token(config)));
    let seed = cluster.peer("seed", true);
    let a = cluster.peer("a", false);
    cluster.wait_peers(2);
    let scratch = scratch_with_tree(&cluster);
    let image = format!("{}/{REPOSITORY}:v1", cluster.registry.host());
    let tree = scratch.path("tree").display().to_string();
    scratch
        .darter_with_stdin(
            [
                "--username",
                USER,
                "--password-stdin",
                "build",
                &tree,
                "-o",
                &image,
            ],
            Some(&format!("{PASSWORD}\n")),
        )
        .ok();

    // The mirror passes the registry's challenge through: the client is
    // sent to the token service itself.
    let challenged = a.get("/v2/", &[]);
    assert_eq!(challenged.status, 401, "{challenged:?}");
    let realm = format!(
        "bearer realm=\"{}",
        cluster.registry.token_service().unwrap().url()
    );
    assert!(challenged.head.contains(&realm), "{challenged:?}");
    let issued_before = cluster.registry.token_service().unwrap().issued();

    let spec = MountSpec {
        login: Some((USER, PASSWORD)),
        ..MountSpec::default()
    };
    let mount = mount_through(&scratch, &cluster, &a, "a", &spec);
    assert_same_tree(&scratch.path("tree"), mount.path());

    let tokens = cluster.registry.token_service().unwrap().requests();
    assert!(
        tokens[issued_before..].iter().any(|r| r.status == 200
            && r.user.as_deref() == Some(USER)
            && r.scopes == [format!("repository:{REPOSITORY}:pull")]),
        "{tokens:#?}"
    );
    // The seed fetched every blob with the mount's token; a took them from
    // the seed.
    let blob_bytes = seed.counter("bytes_from_origin");
    assert!(blob_bytes > 16 << 20, "{blob_bytes}");
    assert_eq!(a.counter("bytes_from_origin"), 0);
    assert_eq!(a.counter("bytes_from_peers"), blob_bytes);
    assert_no_secrets(
        &[
            ("seed log", &seed.process.log()),
            ("peer log", &a.process.log()),
            ("mount log", &mount.log()),
        ],
        USER,
        PASSWORD,
    );
}
