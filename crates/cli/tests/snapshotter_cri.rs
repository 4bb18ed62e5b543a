//! containerd's CRI path with `darter snapshotter`, all real: a registry
//! holding the Debian python3 image (plain OCI) and its Darter conversion,
//! the `darter` binary serving the snapshots API, and a containerd whose
//! CRI plugin pulls and runs with `snapshotter = "darter"` and
//! `disable_snapshot_annotations = false`, driven through the CRI API as
//! the kubelet would (PullImage, RunPodSandbox, CreateContainer, ...).

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;
mod snapshotter_common;

use std::time::Duration;

use darter_testkit::containerd::{Containerd, Options};
use darter_testkit::cri::{CriClient, CriOptions, K8S_NAMESPACE};
use darter_testkit::process::{ChildGuard, wait_until};
use snapshotter_common::{DarterRegistry, UnmountUnder, snapshotter_status, start_snapshotter};

/// The proxy plugin's name in containerd's config, and CRI's snapshotter.
const PLUGIN: &str = "darter";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The registry with both images, the snapshotter, and a containerd with
/// CRI on it. Declared in this order, they are dropped so that containers
/// go first, then the lazy mounts, then the snapshotter.
struct CriSetup {
    containerd: Containerd,
    _lazy_mounts: UnmountUnder,
    _snapshotter: ChildGuard,
    dir: tempfile::TempDir,
    darter: DarterRegistry,
}

impl CriSetup {
    fn start() -> CriSetup {
        let darter = DarterRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = start_snapshotter(dir.path(), &darter.config);
        let lazy_mounts = UnmountUnder(dir.path().to_path_buf());
        let host = darter.registry.host();
        let socket = dir.path().join("snapshotter.sock");
        let containerd = Containerd::start_with(&Options {
            proxy_snapshotters: &[(PLUGIN, &socket)],
            cri: Some(CriOptions {
                snapshotter: PLUGIN,
                plain_http_registries: &[&host],
            }),
            ..Options::default()
        })
        .unwrap();
        CriSetup {
            containerd,
            _lazy_mounts: lazy_mounts,
            _snapshotter: snapshotter,
            dir,
            darter,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    /// Each Prepare the snapshotter logged: its key and its labels.
    fn prepares(&self) -> Vec<(String, String)> {
        registry_common::strip_ansi(&self.log())
            .lines()
            .filter(|l| l.contains(" prepare "))
            .filter_map(|l| {
                let key = l.split_once("key=\"")?.1.split_once('"')?.0;
                let labels = l.split_once("labels=")?.1;
                Some((key.to_owned(), labels.to_owned()))
            })
            .collect()
    }

    /// `darter status --json` of the snapshotter.
    fn status(&self) -> darter_snapshotter::NodeStatus {
        snapshotter_status(&self.dir.path().join("root"))
    }

    /// The size of the Darter image's blobs and bootstrap, as its manifest
    /// says.
    fn darter_layer_bytes(&self) -> u64 {
        let host = self.darter.registry.host();
        let raw = registry_common::raw_manifest(&host, "test/python:darter");
        let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum()
    }

    /// Runs `python3 -c print(6*7)` of `image` in a pod through CRI;
    /// asserts it printed 42 (CRI's log: `TIME stdout F 42`).
    fn run_python(&self, cri: &CriClient, name: &str, image: &str) {
        let logs = self.dir.path().join("pod-logs");
        let started = cri
            .run_container(name, image, &["python3", "-c", "print(6*7)"], &logs)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.containerd.log()));
        let code = cri
            .wait_exited(&started.container_id, START_TIMEOUT)
            .unwrap();
        let log = std::fs::read_to_string(&started.log_path).unwrap();
        assert_eq!(code, 0, "{log}");
        let lines: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest))
            .collect();
        assert_eq!(lines, ["stdout F 42"], "{log}");
        cri.remove_pod(&started.pod_id).unwrap();
    }
}

/// The labels (as logged) of the Prepare of each layer containerd unpacks
/// (its key `NS/ID/extract-UNIQUE CHAINID`).
fn extract_prepares(setup: &CriSetup) -> Vec<String> {
    setup
        .prepares()
        .into_iter()
        .filter(|(key, _)| key.contains("/extract-"))
        .map(|(_, labels)| labels)
        .collect()
}

/// What containerd 1.6's CRI plugin sends with snapshot annotations on.
/// A plain image: each layer's Prepare carries the target chain ID and
/// CRI's image reference, manifest and layer digests, so the snapshotter
/// asks the registry about the image, finds a plain one (counted as a
/// fallback) and lets containerd unpack it; it runs through CRI.
///
/// A Darter image: its layers' media types are OCI layer types, so CRI
/// labels their Prepares the same way; the snapshotter mounts the image
/// lazily, containerd downloads none of its blobs, and python runs from
/// the lazy mount.
#[test]
fn cri_pulls_a_plain_image_in_full_and_a_darter_image_lazily() {
    let setup = CriSetup::start();
    let cri = setup.containerd.cri().unwrap();
    let host = setup.darter.registry.host();
    // The sandbox image's one layer, imported by `ctr`, which labels nothing.
    assert_eq!(extract_prepares(&setup), ["{}"]);
    let plain = format!("{host}/test/python:oci");
    cri.pull_image(&plain)
        .unwrap_or_else(|e| panic!("{e}\n{}", setup.containerd.log()));

    let prepares = extract_prepares(&setup);
    assert_eq!(prepares.len(), 3, "one per layer: {prepares:?}");
    for labels in &prepares[1..] {
        assert_cri_labels(labels, &plain);
    }
    let status = setup.status();
    assert!(status.lazy_mounts.is_empty(), "{status:?}");
    assert_eq!(status.fallbacks["not-darter"], 1, "{status:?}");
    assert_eq!(status.fallbacks.values().sum::<u64>(), 1, "{status:?}");
    setup.run_python(&cri, "plain", &plain);

    let before = setup.darter.registry.bytes_served();
    cri.pull_image(&setup.darter.reference)
        .unwrap_or_else(|e| panic!("{e}\n{}", setup.containerd.log()));
    let served = setup.darter.registry.bytes_served() - before;
    let layer_bytes = setup.darter_layer_bytes();
    assert!(
        served < layer_bytes / 10,
        "pulled lazily: {served} of {layer_bytes} bytes"
    );
    let darter_prepares = extract_prepares(&setup).split_off(3);
    assert!(!darter_prepares.is_empty());
    for labels in &darter_prepares {
        assert_cri_labels(labels, &setup.darter.reference);
    }
    let status = setup.status();
    assert_eq!(status.lazy_mounts.len(), 1, "{status:?}");
    assert_eq!(status.fallbacks.values().sum::<u64>(), 1, "{status:?}");
    setup.run_python(&cri, "lazy", &setup.darter.reference);
}

/// The labels CRI gives a layer's Prepare, for `image`.
#[track_caller]
fn assert_cri_labels(labels: &str, image: &str) {
    for needle in [
        "\"containerd.io/snapshot.ref\": \"sha256:".to_owned(),
        format!("\"containerd.io/snapshot/cri.image-ref\": \"{image}\""),
        "\"containerd.io/snapshot/cri.manifest-digest\": \"sha256:".to_owned(),
        "\"containerd.io/snapshot/cri.layer-digest\": \"sha256:".to_owned(),
    ] {
        assert!(labels.contains(&needle), "{needle} in {labels}");
    }
}

/// A Darter image `darter pull` put into CRI's namespace: CRI finds the
/// image there, and its container runs from the lazy mount, which fetched
/// only part of the image. A kubelet pulling it again (`imagePullPolicy:
/// Always`) keeps the lazy mount and downloads no blob.
#[test]
fn a_darter_image_pulled_into_cris_namespace_runs_lazily_through_cri() {
    let setup = CriSetup::start();
    let cri = setup.containerd.cri().unwrap();
    let socket = setup.containerd.socket().as_os_str().to_owned();
    setup
        .darter
        .scratch
        .darter([
            "pull".as_ref(),
            setup.darter.reference.as_ref(),
            "--address".as_ref(),
            socket.as_os_str(),
            "--namespace".as_ref(),
            K8S_NAMESPACE.as_ref(),
        ] as [&std::ffi::OsStr; 6])
        .ok();
    wait_until(START_TIMEOUT, "CRI to know the pulled image", || {
        cri.image_id(&setup.darter.reference).unwrap().is_some()
    });

    setup.run_python(&cri, "lazy", &setup.darter.reference);

    let status = setup.status();
    let [mount] = &status.lazy_mounts[..] else {
        panic!("one lazy mount: {status:?}");
    };
    assert!(status.fallbacks.values().all(|&n| n == 0), "{status:?}");
    let stats = mount_common::try_stats(&mount.mountpoint).expect("the lazy mount serves");
    assert!(
        stats.backend_bytes > 0 && stats.backend_bytes < stats.image_bytes / 10,
        "running python fetched part of the image: {stats:?}"
    );

    let before = setup.darter.registry.bytes_served();
    cri.pull_image(&setup.darter.reference).unwrap();
    let served = setup.darter.registry.bytes_served() - before;
    let layer_bytes = setup.darter_layer_bytes();
    assert!(served < layer_bytes / 10, "{served} of {layer_bytes}");
    assert_eq!(setup.status().lazy_mounts.len(), 1);
    setup.run_python(&cri, "lazy-again", &setup.darter.reference);
}
