//! Interrupted pushes: `darter copy` and `darter build` killed with SIGKILL
//! in the middle of an upload (a fault proxy holds a chosen request until
//! the process is dead) leave the registry consistent: the tag is absent
//! or still names the complete old image. A rerun finishes the push
//! without sending again the blobs that completed.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{manifest, manifest_descriptor, noise, num, oci, write_file};
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule};
use darter_testkit::process::{ChildGuard, wait_until};
use darter_testkit::registry::TestRegistry;
use mount_common::noise_files;
use registry_common::{RegistrySettings, Scratch, docker, stored_blobs};
use rustix::process::{Pid, Signal};

const MIB: usize = 1 << 20;
/// Longer than any test: a held request is never let through.
const HOLD: Duration = Duration::from_secs(600);
/// How long the push may take to reach the held request.
const REACH_TIMEOUT: Duration = Duration::from_secs(60);

/// A registry behind a fault proxy, and a scratch dir speaking plain HTTP
/// to both.
fn proxied() -> (TestRegistry, FaultProxy, Scratch) {
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.addr());
    let scratch = Scratch::new(
        &[registry.host(), proxy.host()],
        RegistrySettings::default(),
    );
    (registry, proxy, scratch)
}

/// Runs `darter ARGS`, holds the first request `hold` matches (`method`,
/// path containing `path`) at the proxy, and kills darter with SIGKILL
/// while it waits for the answer. Returns darter's stderr.
fn kill_when_held(
    scratch: &Scratch,
    proxy: &FaultProxy,
    args: &[&str],
    hold: (&str, &str),
) -> String {
    let (method, path) = hold;
    proxy.inject(
        FaultRule::new(Fault::Delay(HOLD))
            .method(method)
            .path_contains(path),
    );
    let log = scratch.path("killed.log");
    let mut cmd = scratch.darter_command(args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut darter = ChildGuard::spawn(&mut cmd).unwrap();
    wait_until(
        REACH_TIMEOUT,
        &format!("darter to send {method} *{path}*"),
        || {
            assert!(
                darter.child().try_wait().unwrap().is_none(),
                "darter ended before reaching the held request:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            proxy.pending_faults() == 0
        },
    );
    let pid = Pid::from_raw(darter.id() as i32).unwrap();
    rustix::process::kill_process(pid, Signal::KILL).unwrap();
    let status = darter.child().wait().unwrap();
    assert_eq!(status.signal(), Some(9), "darter was not killed mid-push");
    proxy.clear_faults();
    std::fs::read_to_string(&log).unwrap()
}

/// A layout with `old` (one big data blob) and `new` (built on `old`: the
/// big blob plus one of its own).
fn two_versions(scratch: &Scratch) -> PathBuf {
    let old = scratch.path("old");
    noise_files(&old, &[("big", 12 * MIB), ("etc/conf", 4000)]);
    let new = scratch.path("new");
    common::copy_tree(&old, &new);
    write_file(&new.join("opt/added"), &noise(99, 3 * MIB));
    let layout = scratch.path("layout");
    scratch.build(&old, &oci(&layout, "old"), &[]);
    scratch.build(
        &new,
        &oci(&layout, "new"),
        &["--parent", &oci(&layout, "old")],
    );
    layout
}

/// The manifest digest a registry tag names now, or `None` if the
/// registry does not know the tag.
fn tagged(scratch: &Scratch, image: &str) -> Option<String> {
    let out = scratch.darter(["inspect", image, "--json"]);
    if out.status == Some(1) && out.stderr.contains("MANIFEST_UNKNOWN") {
        return None;
    }
    Some(out.ok().json()["manifest"].as_str().unwrap().to_owned())
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

#[test]
fn killed_copy_keeps_the_old_image_tagged_and_a_rerun_sends_only_what_is_missing() {
    let (registry, proxy, scratch) = proxied();
    let layout = two_versions(&scratch);
    let image = docker(&proxy.host(), "interrupt/app:v1");
    let old_digest = scratch.copy(&oci(&layout, "old"), &image)["manifest_digest"]
        .as_str()
        .unwrap()
        .to_owned();

    // The new version's blobs, in the order copy sends them: config, big
    // (already in the registry), added, bootstrap. Hold the closing PUT of
    // `added`: its bytes are uploaded, the blob is not complete.
    let new_manifest = manifest(&layout, "new");
    let layers = new_manifest["layers"].as_array().unwrap();
    let (config, added, bootstrap) = (&new_manifest["config"], &layers[1], &layers[2]);
    let added_digest = added["digest"].as_str().unwrap();
    let new_source = oci(&layout, "new");
    let stderr = kill_when_held(
        &scratch,
        &proxy,
        &["copy", &new_source, &image],
        ("PUT", hex(added_digest)),
    );

    assert_eq!(
        tagged(&scratch, &image).as_deref(),
        Some(old_digest.as_str()),
        "{stderr}"
    );
    scratch.check_sound(&image);
    let stored = stored_blobs(&registry.storage_dir());
    assert!(stored.contains(&config["digest"].as_str().unwrap().to_owned()));
    assert!(!stored.contains(&added_digest.to_owned()), "{stored:?}");

    let rerun = scratch.copy(&new_source, &image);
    assert_eq!(
        (num(&rerun, "/present"), num(&rerun, "/copied")),
        (2, 2),
        "config and big were there, added and bootstrap were not: {rerun:#}"
    );
    let manifest_size = num(&manifest_descriptor(&layout, "new"), "/size");
    assert_eq!(
        num(&rerun, "/sent_bytes"),
        num(added, "/size") + num(bootstrap, "/size") + manifest_size,
        "{rerun:#}"
    );
    assert_eq!(
        tagged(&scratch, &image).unwrap(),
        manifest_descriptor(&layout, "new")["digest"]
            .as_str()
            .unwrap()
    );
    scratch.check_sound(&image);
}

/// `darter build DIR -o IMAGE --json`, returning the report.
fn build_args<'a>(tree: &'a Path, image: &'a str) -> Vec<&'a str> {
    vec!["build", tree.to_str().unwrap(), "-o", image, "--json"]
}

#[test]
fn killed_build_leaves_no_tag_and_a_rerun_completes_the_image() {
    let (registry, proxy, scratch) = proxied();
    let tree = scratch.path("tree");
    noise_files(&tree, &[("big", 20 * MIB), ("etc/conf", 4000)]);
    let image = docker(&proxy.host(), "interrupt/built:v1");
    let args = build_args(&tree, &image);

    // Killed while streaming the data blob: its first PATCH is held.
    kill_when_held(&scratch, &proxy, &args, ("PATCH", "/blobs/uploads/"));
    assert_eq!(tagged(&scratch, &image), None);
    assert_eq!(stored_blobs(&registry.storage_dir()), Vec::<String>::new());

    // Killed after every blob is complete: the manifest PUT is held.
    kill_when_held(&scratch, &proxy, &args, ("PUT", "/manifests/"));
    assert_eq!(tagged(&scratch, &image), None);
    let complete = stored_blobs(&registry.storage_dir());
    assert_eq!(
        complete.len(),
        3,
        "data blob, bootstrap, config: {complete:?}"
    );

    let rerun = scratch.darter(&args).ok().json();
    let reference = scratch.build(&tree, &oci(&scratch.path("layout"), "v1"), &[]);
    assert_eq!(rerun["manifest_digest"], reference["manifest_digest"]);
    assert_eq!(
        tagged(&scratch, &image).unwrap(),
        rerun["manifest_digest"].as_str().unwrap()
    );
    scratch.check_sound(&image);
    let manifest_size = num(&manifest_descriptor(&scratch.path("layout"), "v1"), "/size");
    // The bootstrap and config are known before they are sent, so the
    // registry is asked first and they are skipped. The data blob is
    // produced while it is uploaded: its digest is known only at the end.
    assert_eq!(
        num(&rerun, "/sent_bytes"),
        num(&rerun, "/new_blob_bytes") + manifest_size,
        "{rerun:#}"
    );
}
