//! Interrupted pushes: `darter copy` and `darter build` killed with SIGKILL
//! in the middle of an upload (a fault proxy holds a chosen request until
//! the process is dead) leave the registry consistent: the tag is absent
//! or still names the complete old image. A rerun finishes the push
//! without sending again the blobs that completed; a rerun of `build`
//! also goes on with the data blob upload it was killed in. Build's push
//! journal (under `HOME`) is only a hint: a source changed since, or a
//! journal file that is garbage, costs uploads, never a wrong image.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{manifest, manifest_descriptor, noise, num, oci, write_file};
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule};
use darter_testkit::fixtures::{Compression, MediaTypes, RawEntry, RawLayer, RawLayout};
use darter_testkit::process::{ChildGuard, wait_until};
use darter_testkit::registry::TestRegistry;
use mount_common::noise_files;
use registry_common::{
    RegistrySettings, Scratch, docker, stored_blobs, stored_file_bytes, strip_ansi,
};
use rustix::process::{Pid, Signal};
use serde_json::Value;

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

/// A registry behind a fault proxy, a tree with a 20 MiB file (its data
/// blob is streamed in 8 MiB PATCHes) and the registry image to build it
/// into.
struct TreePush {
    registry: TestRegistry,
    proxy: FaultProxy,
    scratch: Scratch,
    tree: PathBuf,
    image: String,
}

impl TreePush {
    /// Pushes to `interrupt/REPO:v1`.
    fn new(repo: &str) -> Self {
        let (registry, proxy, scratch) = proxied();
        let tree = scratch.path("tree");
        noise_files(&tree, &[("big", 20 * MIB), ("etc/conf", 4000)]);
        let image = docker(&proxy.host(), &format!("interrupt/{repo}:v1"));
        TreePush {
            registry,
            proxy,
            scratch,
            tree,
            image,
        }
    }

    /// `build TREE -o IMAGE --json`.
    fn args(&self) -> Vec<&str> {
        build_args(&self.tree, &self.image)
    }

    /// Replaces the 20 MiB file by another of the same size.
    fn change_big_file(&self, seed: u64) {
        write_file(&self.tree.join("big"), &noise(seed, 20 * MIB));
    }

    /// Kills the build when it sends the manifest: every blob is in the
    /// registry and the push journal names the data blob.
    fn kill_at_manifest(&self) {
        let args = self.args();
        kill_when_held(&self.scratch, &self.proxy, &args, ("PUT", "/manifests/"));
        assert_eq!(self.scratch.push_journals().len(), 1);
    }

    /// Kills the build after the data blob's first 8 MiB PATCH.
    fn kill_mid_upload(&self) {
        let scene = (&self.registry, &self.scratch, &self.proxy);
        kill_mid_upload(scene, &self.args(), &self.image, 1);
    }

    /// Reruns the build, checks that the image is what the tree builds
    /// into; returns the report and the log.
    fn rerun(&self) -> (Value, String) {
        let (report, log) = build_logged(&self.scratch, &self.args());
        assert_built_from(&self.scratch, &self.tree, &self.image, &report);
        (report, log)
    }
}

#[test]
fn killed_build_leaves_no_tag_and_a_rerun_completes_the_image() {
    let push = TreePush::new("built");
    let TreePush {
        registry,
        proxy,
        scratch,
        tree,
        image,
    } = &push;
    let args = push.args();

    // Killed while streaming the data blob: its first PATCH is held.
    kill_when_held(scratch, proxy, &args, ("PATCH", "/blobs/uploads/"));
    assert_eq!(tagged(scratch, image), None);
    assert_eq!(stored_blobs(&registry.storage_dir()), Vec::<String>::new());

    // Killed after every blob is complete: the manifest PUT is held.
    kill_when_held(scratch, proxy, &args, ("PUT", "/manifests/"));
    assert_eq!(tagged(scratch, image), None);
    let complete = stored_blobs(&registry.storage_dir());
    assert_eq!(
        complete.len(),
        3,
        "data blob, bootstrap, config: {complete:?}"
    );
    assert_eq!(scratch.push_journals().len(), 1);
    let stored_before = stored_file_bytes(&registry.storage_dir());

    proxy.clear_log();
    let rerun = scratch.darter(&args).ok().json();
    assert_built_from(scratch, tree, image, &rerun);
    let manifest_digest = rerun["manifest_digest"].as_str().unwrap();

    // The bootstrap and config are known before they are sent, so the
    // registry is asked first and they are skipped. The data blob's digest
    // is known only once it is rebuilt: the push journal named it, the
    // registry had it, so it was rebuilt without being sent.
    let manifest_size = num(&manifest_descriptor(&scratch.path("layout"), "v1"), "/size");
    assert_eq!(num(&rerun, "/sent_bytes"), manifest_size, "{rerun:#}");
    let uploads: Vec<_> = (proxy.requests().into_iter())
        .filter(|r| r.path.contains("/blobs/uploads/"))
        .collect();
    assert_eq!(uploads, Vec::new(), "no blob upload in the rerun");
    let mut with_manifest = complete;
    with_manifest.push(manifest_digest.to_owned());
    with_manifest.sort();
    assert_eq!(stored_blobs(&registry.storage_dir()), with_manifest);
    // The manifest, and the tag and revision links (71 bytes each).
    let grown = stored_file_bytes(&registry.storage_dir()) - stored_before;
    assert!(
        grown <= manifest_size + 3 * 71,
        "storage grew by {grown} bytes for a {manifest_size}-byte manifest"
    );
}

/// Runs `darter -v ARGS` (a build with `--json`), asserting success;
/// returns the report and the log.
fn build_logged(scratch: &Scratch, args: &[&str]) -> (Value, String) {
    let out = scratch.darter([&["-v"], args].concat()).ok();
    (out.json(), strip_ansi(&out.stderr))
}

/// Asserts that `image` in the registry is what building `source` into a
/// layout gives, and sound, and that the push left no journal.
#[track_caller]
fn assert_built_from(scratch: &Scratch, source: impl AsRef<OsStr>, image: &str, report: &Value) {
    let reference = scratch.build(source, &oci(&scratch.path("layout"), "v1"), &[]);
    assert_eq!(report["manifest_digest"], reference["manifest_digest"]);
    assert_eq!(
        tagged(scratch, image).unwrap(),
        report["manifest_digest"].as_str().unwrap()
    );
    scratch.check_sound(image);
    assert_eq!(scratch.push_journals(), Vec::<PathBuf>::new());
}

#[test]
fn a_rerun_after_the_source_changed_uploads_the_changed_blob() {
    let push = TreePush::new("changed");
    push.kill_at_manifest();

    // The journal's digest for the data blob, which the registry has, is
    // not the rebuilt blob's any more.
    push.change_big_file(77);
    let (rerun, log) = push.rerun();
    assert!(log.contains("checking the rebuilt bytes"), "{log}");
    assert!(
        log.contains("differs from what the interrupted push sent"),
        "{log}"
    );
    assert_eq!(
        num(&rerun, "/sent_bytes"),
        num(&rerun, "/image_bytes"),
        "every blob changed, and was sent: {rerun:#}"
    );
}

#[test]
fn a_garbage_push_journal_is_ignored_with_a_warning() {
    let push = TreePush::new("garbage");
    push.kill_at_manifest();
    for journal in push.scratch.push_journals() {
        std::fs::write(&journal, b"{\"version\":1,\"blobs\":[\x00\xff").unwrap();
    }

    let (rerun, log) = push.rerun();
    assert!(
        log.contains("WARN") && log.contains("ignoring push journal"),
        "{log}"
    );
    let layout = push.scratch.path("layout");
    let manifest_size = num(&manifest_descriptor(&layout, "v1"), "/size");
    assert_eq!(
        num(&rerun, "/sent_bytes"),
        num(&rerun, "/new_blob_bytes") + manifest_size,
        "without the journal the data blob is sent again: {rerun:#}"
    );
}

/// Kills `darter build ARGS` while it uploads data blobs: the first
/// `through` PATCHes (8 MiB each) go through, the next is held.
fn kill_mid_upload(
    (registry, scratch, proxy): (&TestRegistry, &Scratch, &FaultProxy),
    args: &[&str],
    image: &str,
    through: usize,
) {
    let uploads = "/blobs/uploads/";
    proxy.inject(
        FaultRule::new(Fault::Delay(Duration::ZERO))
            .method("PATCH")
            .path_contains(uploads)
            .times(through),
    );
    kill_when_held(scratch, proxy, args, ("PATCH", uploads));
    assert_eq!(tagged(scratch, image), None);
    assert_eq!(stored_blobs(&registry.storage_dir()), Vec::<String>::new());
    assert_eq!(scratch.push_journals().len(), 1);
}

#[test]
fn a_build_killed_mid_upload_resumes_that_upload_on_rerun() {
    let push = TreePush::new("resumed");
    push.kill_mid_upload();

    let (rerun, log) = push.rerun();
    assert!(log.contains("resuming the upload"), "{log}");
    let (sent, blob) = (num(&rerun, "/sent_bytes"), num(&rerun, "/new_blob_bytes"));
    assert!(
        sent + 8 * MIB as u64 <= blob + 64 * 1024,
        "the first 8 MiB were not sent again ({sent} sent, blob {blob}): {rerun:#}"
    );
}

#[test]
fn a_resumed_upload_of_a_changed_source_is_refused_and_sent_whole() {
    let push = TreePush::new("resumed-changed");
    push.kill_mid_upload();

    // The registry holds the old first 8 MiB; the rebuilt blob starts
    // otherwise, so the registry refuses the resumed upload's digest.
    push.change_big_file(78);
    let (rerun, log) = push.rerun();
    assert!(log.contains("resuming the upload"), "{log}");
    assert!(log.contains("does not complete as this blob"), "{log}");
    let (sent, blob) = (num(&rerun, "/sent_bytes"), num(&rerun, "/new_blob_bytes"));
    // Bootstrap, config and manifest are a few KiB; the tail sent to the
    // old session is 12 MiB.
    assert!(
        sent > blob + MIB as u64,
        "the tail to the old session, then the whole blob ({sent} sent, blob {blob}): {rerun:#}"
    );
}

#[test]
fn a_conversion_killed_mid_upload_resumes_every_layer_it_had_streamed() {
    let (registry, proxy, scratch) = proxied();
    // Two layers of one 12 MiB file each: each data blob streams its first
    // 8 MiB while its layer is read; the rest goes once both are verified.
    let layer = |name: &str, seed| {
        RawLayer::new(Compression::None).entry(RawEntry::file(name, noise(seed, 12 * MIB)))
    };
    let source = RawLayout::new(MediaTypes::Oci)
        .layer(layer("first", 1))
        .layer(layer("second", 2))
        .write(&scratch.path("source"), "src")
        .unwrap()
        .image
        .skopeo_ref();
    let image = docker(&proxy.host(), "interrupt/converted:v1");
    let args = vec!["build", &source, "-o", &image, "--json"];

    // Held: the third PATCH, the first layer's last bytes.
    kill_mid_upload((&registry, &scratch, &proxy), &args, &image, 2);

    let (rerun, log) = build_logged(&scratch, &args);
    assert_built_from(&scratch, &source, &image, &rerun);
    let resumed = log.lines().filter(|l| l.contains("resuming the upload"));
    assert_eq!(resumed.count(), 2, "{log}");
    let (sent, blobs) = (num(&rerun, "/sent_bytes"), num(&rerun, "/new_blob_bytes"));
    assert_eq!(num(&rerun, "/new_blobs"), 2);
    assert!(
        sent + 16 * MIB as u64 <= blobs + 64 * 1024,
        "8 MiB of each blob were not sent again ({sent} sent, blobs {blobs}): {rerun:#}"
    );
}
