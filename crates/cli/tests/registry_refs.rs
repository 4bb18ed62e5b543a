//! Registry references at the command line: `docker://` and plain forms,
//! tags and digests, for every command that reads an image; plain HTTP by
//! flag or config file; and bad references refused with exit status 1 and
//! a message saying what is wrong, before anything is done.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::path::Path;

use common::{assert_same_tree, num};
use darter_testkit::registry::TestRegistry;
use mount_common::{is_mounted, noise_files};
use registry_common::{MountSpec, RegistryMount, RegistrySettings, Scratch, assert_reads, docker};

const MIB: usize = 1 << 20;
const FILES: &[(&str, usize)] = &[("a/big", 3 * MIB), ("a/small", 5000), ("b/c/d", 70_000)];

/// A registry holding a small image built from `tree` as `refs/img:v1`;
/// returns the registry, the scratch dir (plain HTTP to it) and the
/// manifest digest.
fn registry_with_image() -> (TestRegistry, Scratch, String) {
    let registry = TestRegistry::start();
    let scratch = Scratch::new(&[registry.host()], RegistrySettings::default());
    let tree = scratch.path("tree");
    noise_files(&tree, FILES);
    let report = scratch.build(&tree, &docker(&registry.host(), "refs/img:v1"), &[]);
    let digest = report["manifest_digest"].as_str().unwrap().to_owned();
    (registry, scratch, digest)
}

#[test]
fn every_reference_form_reads_the_same_image() {
    let (registry, scratch, digest) = registry_with_image();
    let host = registry.host();
    let forms = [
        format!("docker://{host}/refs/img:v1"),
        format!("{host}/refs/img:v1"),
        format!("docker://{host}/refs/img@{digest}"),
        format!("{host}/refs/img@{digest}"),
        format!("{host}/refs/img:v1@{digest}"),
    ];
    for (i, image) in forms.iter().enumerate() {
        assert_eq!(scratch.inspect(image)["manifest"], digest, "{image}");
        scratch.check_sound(image);
        let out = scratch.path(&format!("unpacked-{i}"));
        scratch
            .darter([Path::new("unpack"), Path::new(image), &out])
            .ok();
        assert_same_tree(&scratch.path("tree"), &out);
    }
    let exported = scratch.path("exported");
    let by_digest = format!("{host}/refs/img@{digest}");
    scratch
        .darter([Path::new("export"), Path::new(&by_digest), &exported])
        .ok();
    assert!(std::fs::read_dir(&exported).unwrap().count() >= 2);

    let mount = RegistryMount::start(
        &scratch,
        &format!("docker://{host}/refs/img@{digest}"),
        &scratch.path("mnt"),
        &scratch.path("cache"),
        &MountSpec::default(),
    );
    for (name, _) in FILES {
        assert_reads(
            &mount.join(name),
            &std::fs::read(scratch.path("tree").join(name)).unwrap(),
        );
    }
    // A digest is a source for copies and parents, never a destination.
    let copied = scratch.copy(&by_digest, &docker(&host, "refs/copy:pinned"));
    assert_eq!(copied["manifest_digest"], digest);
    let rebuilt = scratch.build(
        scratch.path("tree"),
        &docker(&host, "refs/img:v2"),
        &["--parent", &by_digest],
    );
    assert_eq!(num(&rebuilt, "/chunks/new_chunks"), 0, "{rebuilt:#}");
}

#[test]
fn plain_http_comes_from_the_flag_or_the_config_file() {
    let (registry, configured, digest) = registry_with_image();
    let host = registry.host();
    let unconfigured = Scratch::new(&[] as &[&str], RegistrySettings::default());
    let image = format!("{host}/refs/img:v1");
    unconfigured
        .darter(["inspect", &image])
        .fails_with(1)
        .mentions(&[&format!("https://{host}/v2/refs/img/manifests/v1")]);
    let flagged = unconfigured
        .darter(["--plain-http", "inspect", &image, "--json"])
        .ok()
        .json();
    assert_eq!(flagged["manifest"], digest);
    // The flag also works after the subcommand, like every global flag.
    unconfigured.darter(["check", &image, "--plain-http"]).ok();
    assert_eq!(configured.inspect(&image)["manifest"], digest);
}

#[test]
fn bad_references_are_refused_with_exit_status_1_and_say_why() {
    let (registry, scratch, digest) = registry_with_image();
    let host = registry.host();
    let tree = scratch.path("tree");
    let tree = tree.to_str().unwrap();
    let mnt = scratch.dir("mnt");
    let mnt = mnt.to_str().unwrap();
    let not_a_reference = "is not an image reference";
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec!["inspect".into(), format!("docker://{host}/Refs/Upper:v1")],
            vec![not_a_reference.into(), "Refs/Upper".into()],
        ),
        (
            vec!["check".into(), format!("{host}/refs/img:bad tag")],
            vec![not_a_reference.into()],
        ),
        (
            vec![
                "unpack".into(),
                format!("{host}/refs/img@sha256:1234"),
                scratch.path("x").display().to_string(),
            ],
            vec![not_a_reference.into(), "sha256:1234".into()],
        ),
        (
            vec!["inspect".into(), "docker://".into()],
            vec!["docker://".into()],
        ),
        (
            vec!["mount".into(), format!("{host}//refs/img:v1"), mnt.into()],
            vec![not_a_reference.into()],
        ),
        (
            vec![
                "copy".into(),
                format!("{host}/refs/img:v1"),
                format!("docker://{host}/refs/-bad:v1"),
            ],
            vec![not_a_reference.into(), "refs/-bad".into()],
        ),
        (
            vec![
                "build".into(),
                tree.into(),
                "-o".into(),
                format!("{host}/refs/img@{digest}"),
            ],
            vec!["cannot push to a digest".into()],
        ),
        (
            vec!["inspect".into(), format!("{host}/refs/img:missing")],
            vec![format!("{host}/refs/img:missing"), "404".into()],
        ),
        (
            vec![
                "mount".into(),
                format!("{host}/refs/img@sha256:{}", "0".repeat(64)),
                mnt.into(),
            ],
            vec![format!("sha256:{}", "0".repeat(64)), "404".into()],
        ),
    ];
    for (args, needles) in cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let out = scratch.darter(&args).fails_with(1).mentions(&needles);
        assert!(
            out.stderr.starts_with("darter: error: ") && out.stderr.lines().count() <= 3,
            "one clear error message: {out:?}"
        );
        assert!(!is_mounted(Path::new(mnt)), "{args:?} left a mount");
    }
}
