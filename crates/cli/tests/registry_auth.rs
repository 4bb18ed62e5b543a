//! Authenticated registries: htpasswd Basic auth and the Bearer token flow
//! (a token service the test runs), for pushing builds and for the reads of
//! a mount; credentials from `--username --password-stdin` (also forwarded
//! to a `mount -d` daemon) and from `~/.docker/config.json`; tokens that
//! expire while an image is mounted are renewed without a failed read.
//! Wrong or missing credentials fail with a clear error, and no secret
//! (password, Basic credentials, token) appears in any output or log, even
//! at trace level.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::time::Duration;

use common::noise;
use darter_testkit::faultproxy::FaultProxy;
use darter_testkit::process::wait_until;
use darter_testkit::registry::{RegistryAuth, TestRegistry, TokenConfig};
use mount_common::{is_mounted, noise_files};
use registry_common::{
    MountSpec, RegistryMount, RegistrySettings, Scratch, assert_no_secrets, assert_reads, base64,
    docker,
};

const USER: &str = "alice";
const PASSWORD: &str = "correct-horse-7f3a91";
const WRONG_PASSWORD: &str = "wrong-horse-c0ffee";
const MIB: usize = 1 << 20;
const FILES: &[(&str, usize)] = &[("big", 3 * MIB), ("dir/small", 9000), ("dir/mid", 300_000)];
/// Trace logging: everything is logged, nothing may show a secret.
const TRACE: &[&str] = &["-vvv"];

fn users() -> Vec<(String, String)> {
    vec![(USER.to_owned(), PASSWORD.to_owned())]
}

/// Everything a test saw come out of `darter`, for the secrets check.
#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn add(&mut self, what: &str, text: String) {
        self.0.push((what.to_owned(), text));
    }

    fn add_outcome(&mut self, out: &common::Outcome) {
        self.add(&out.command, out.text());
    }

    #[track_caller]
    fn assert_no_secrets(&self) {
        let texts: Vec<(&str, &str)> = self
            .0
            .iter()
            .map(|(what, text)| (what.as_str(), text.as_str()))
            .collect();
        assert_no_secrets(&texts, USER, PASSWORD);
        assert_no_secrets(&texts, USER, WRONG_PASSWORD);
    }
}

/// `darter [--username USER --password-stdin] ARGS -vvv`.
fn darter_as(
    scratch: &Scratch,
    password: Option<&str>,
    args: &[&str],
    seen: &mut Outputs,
) -> common::Outcome {
    let mut all: Vec<&str> = Vec::new();
    if password.is_some() {
        all.extend(["--username", USER, "--password-stdin"]);
    }
    all.extend(args);
    all.extend(TRACE);
    let stdin = password.map(|p| format!("{p}\n"));
    let out = scratch.darter_with_stdin(&all, stdin.as_deref());
    seen.add_outcome(&out);
    out
}

/// Asserts that every file of [`FILES`] reads back exactly from `mount`.
fn assert_files(scratch: &Scratch, mount: &RegistryMount) {
    for (name, _) in FILES {
        let original = std::fs::read(scratch.path("tree").join(name)).unwrap();
        assert_reads(&mount.join(name), &original);
    }
}

/// Pushing without, with wrong and with right credentials, then mounting
/// with them (foreground and `-d`) and with wrong ones.
fn push_and_mount_with_credentials(registry: &TestRegistry, seen: &mut Outputs) -> Scratch {
    let host = registry.host();
    let scratch = Scratch::new(&[&host], RegistrySettings::default());
    noise_files(&scratch.path("tree"), FILES);
    let tree = scratch.path("tree");
    let tree = tree.to_str().unwrap();
    let image = docker(&host, "auth/img:v1");
    let build = ["build", tree, "-o", image.as_str(), "--json"];

    darter_as(&scratch, None, &build, seen)
        .fails_with(1)
        .mentions(&["401", "unauthorized", &host]);
    darter_as(&scratch, Some(WRONG_PASSWORD), &build, seen)
        .fails_with(1)
        .mentions(&["401", "unauthorized", &host]);
    let report = darter_as(&scratch, Some(PASSWORD), &build, seen)
        .ok()
        .json();
    let digest = report["manifest_digest"].as_str().unwrap();

    let inspected = darter_as(
        &scratch,
        Some(PASSWORD),
        &["inspect", &image, "--json"],
        seen,
    )
    .ok()
    .json();
    assert_eq!(inspected["manifest"], digest);

    for (name, detach) in [("fg", false), ("bg", true)] {
        let mount = RegistryMount::start(
            &scratch,
            &image,
            &scratch.path(name),
            &scratch.path(&format!("{name}-cache")),
            &MountSpec {
                login: Some((USER, PASSWORD)),
                detach,
                extra: TRACE,
            },
        );
        assert_files(&scratch, &mount);
        mount.stats();
        seen.add(&format!("daemon log of the {name} mount"), mount.log());
    }

    let refused = scratch.dir("refused");
    let refused_str = refused.to_str().unwrap();
    let cache = scratch.path("refused-cache");
    let mount = [
        "mount",
        image.as_str(),
        refused_str,
        "--cache",
        cache.to_str().unwrap(),
    ];
    darter_as(&scratch, Some(WRONG_PASSWORD), &mount, seen)
        .fails_with(1)
        .mentions(&["401", "unauthorized"]);
    assert!(!is_mounted(&refused));
    scratch
}

#[test]
fn basic_auth_push_and_mount_with_the_password_from_stdin() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let mut seen = Outputs::default();
    let scratch = push_and_mount_with_credentials(&registry, &mut seen);

    // Docker's config file works too (its own HOME, see Scratch).
    let docker_config = scratch.path("home/.docker/config.json");
    std::fs::create_dir_all(docker_config.parent().unwrap()).unwrap();
    let auth = base64(format!("{USER}:{PASSWORD}").as_bytes());
    let json = format!(
        r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
        registry.host()
    );
    std::fs::write(&docker_config, json).unwrap();
    let image = docker(&registry.host(), "auth/img:v1");
    let out = darter_as(&scratch, None, &["check", &image], &mut seen).ok();
    assert!(out.stdout.contains(": sound:"), "{out:?}");
    seen.assert_no_secrets();
}

#[test]
fn bearer_token_flow_push_and_mount() {
    let config = TokenConfig {
        users: users(),
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let mut seen = Outputs::default();
    push_and_mount_with_credentials(&registry, &mut seen);
    seen.assert_no_secrets();

    let tokens = registry.token_service().unwrap().requests();
    let granted = |scope: &str| {
        tokens
            .iter()
            .any(|r| r.status == 200 && r.user.as_deref() == Some(USER) && r.scopes == [scope])
    };
    assert!(granted("repository:auth/img:pull,push"), "{tokens:#?}");
    assert!(granted("repository:auth/img:pull"), "{tokens:#?}");
    assert!(
        tokens.iter().any(|r| r.status == 401),
        "the wrong password reached the token service: {tokens:#?}"
    );
    assert!(
        tokens
            .iter()
            .all(|r| r.status == 401 || r.user.as_deref() == Some(USER)),
        "tokens went only to the user: {tokens:#?}"
    );
}

/// Files of the token-expiry image: each bigger than a compression frame,
/// so each read of a new one is a new registry request.
const EXPIRY_FILES: usize = 200;
const EXPIRY_FILE_SIZE: usize = 160 << 10;

/// How the client is expected to come by its second token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// Before the old one expires: the registry refuses nothing.
    Early,
    /// After the registry refused the expired token (401): that request is
    /// retried with the new one.
    AfterRefusal,
}

/// Mounts an image (through a fault proxy that faults nothing, to see every
/// answer) from a token registry whose tokens live `validity` (telling
/// clients `expires_in`), then reads new files (each a registry request)
/// until the token service has issued a new token, and then some more:
/// every read succeeds with the right bytes.
fn reads_go_on_across_token_renewal(validity: Duration, expires_in: u64, renewal: Renewal) {
    let config = TokenConfig {
        validity,
        expires_in: Some(expires_in),
        users: users(),
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let proxy = FaultProxy::start(registry.addr());
    let tokens = registry.token_service().unwrap();
    let scratch = Scratch::new(
        &[registry.host(), proxy.host()],
        RegistrySettings::default(),
    );
    let names: Vec<String> = (0..EXPIRY_FILES).map(|i| format!("f/{i:03}")).collect();
    for (i, name) in names.iter().enumerate() {
        common::write_file(
            &scratch.path("tree").join(name),
            &noise(i as u64, EXPIRY_FILE_SIZE),
        );
    }
    let mut seen = Outputs::default();
    let tree = scratch.path("tree");
    let pushed = docker(&registry.host(), "auth/expiring:v1");
    let build = ["build", tree.to_str().unwrap(), "-o", pushed.as_str()];
    darter_as(&scratch, Some(PASSWORD), &build, &mut seen).ok();

    let mount = RegistryMount::start(
        &scratch,
        &docker(&proxy.host(), "auth/expiring:v1"),
        &scratch.path("mnt"),
        &scratch.path("cache"),
        &MountSpec {
            login: Some((USER, PASSWORD)),
            extra: TRACE,
            ..MountSpec::default()
        },
    );
    let mut unread = names.iter();
    let mut read_next = || {
        let name = unread
            .next()
            .expect("ran out of files before the token was renewed");
        assert_reads(&mount.join(name), &std::fs::read(tree.join(name)).unwrap());
    };
    read_next();
    proxy.clear_log();
    let issued_before = tokens.issued();
    let started = std::time::Instant::now();
    wait_until(
        validity * 10,
        "the token service to issue a new token",
        || {
            read_next();
            tokens.issued() > issued_before
        },
    );
    let renewed_after = started.elapsed();
    for _ in 0..5 {
        read_next();
    }
    let answers = proxy.requests();
    let refused = answers.iter().filter(|r| r.status == Some(401)).count();
    match renewal {
        Renewal::Early => assert_eq!(refused, 0, "{answers:#?}"),
        Renewal::AfterRefusal => assert!(refused > 0, "{answers:#?}"),
    }
    assert!(
        answers
            .iter()
            .all(|r| matches!(r.status, Some(401) | Some(206))),
        "every refused read was retried, nothing else failed: {answers:#?}"
    );
    let stats = mount.stats();
    let log = mount.log();
    assert!(!log.contains("read failed"), "{log}");
    assert_eq!(stats.verify_failures, 0, "{stats:?}");
    seen.add("daemon log", log);
    seen.assert_no_secrets();
    eprintln!(
        "token valid {validity:?}, announced {expires_in} s: renewed after {renewed_after:?} \
         of reading ({refused} requests refused); {} registry requests, all reads right",
        stats.backend_requests
    );
}

/// The registry stops accepting the token long before the client expects
/// (`expires_in` says 300 s): the refused request is answered with a new
/// token and retried.
#[test]
fn token_refused_mid_mount_is_renewed_without_failing_reads() {
    reads_go_on_across_token_renewal(Duration::from_secs(2), 300, Renewal::AfterRefusal);
}

/// The client renews a token it knows is about to expire, before the
/// registry would refuse it.
#[test]
fn token_expiring_mid_mount_is_renewed_before_it_expires() {
    reads_go_on_across_token_renewal(Duration::from_secs(4), 4, Renewal::Early);
}

/// Regression: `darter build DIR -o IMAGE --username U --password-stdin`
/// with a relative DIR such as `tree` gave the login to
/// `docker.io/library/tree` (the directory's name parsed as an image) and
/// pushed to the destination without credentials (401). The directory is
/// the source, so the credentials go to the destination registry.
#[test]
fn relative_source_dir_took_the_login_meant_for_the_destination() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let scratch = Scratch::new(&[registry.host()], RegistrySettings::default());
    noise_files(&scratch.path("tree"), FILES);
    let image = docker(&registry.host(), "auth/relative:v1");
    let mut cmd = scratch.darter_command([
        "--username",
        USER,
        "--password-stdin",
        "build",
        "tree",
        "-o",
        &image,
        "--json",
    ]);
    cmd.current_dir(scratch.path(""));
    let out = registry_common::run(cmd, Some(&format!("{PASSWORD}\n")));
    assert!(scratch.path("tree").is_dir());
    let report = out.ok().json();
    assert_eq!(
        report["image"],
        format!("{}/auth/relative:latest", registry.host()).replace("latest", "v1")
    );
}
