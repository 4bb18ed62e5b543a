//! Helpers for the tests that drive the real `darter` binary against a
//! real registry (`docker-registry`, started per test by the testkit):
//! running `darter` with a per-test config file and an optional password on
//! stdin, pushing plain OCI images with skopeo, mounting registry images
//! (also with credentials), measuring the registry's storage, and checking
//! that no secret reached any output.
//!
//! A test binary using these declares `mod common; mod mount_common;
//! mod registry_common;`. Each binary uses a different subset.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use darter_testkit::fixtures::{OciImage, debian_python_oci};
use darter_testkit::process::{ChildGuard, MountGuard, wait_until};
use darter_testkit::registry::TestRegistry;
use rustix::process::{Pid, Signal};
use serde_json::Value;

use crate::common::{DARTER, Outcome};
use crate::mount_common::{Counters, DAEMON_TIMEOUT, Work, try_stats};

/// `[registry]` settings of a test's config file.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistrySettings {
    /// Seconds one registry operation may take, retries included.
    pub deadline: Option<u64>,
    /// Attempts per operation.
    pub attempts: Option<u32>,
}

/// A test's scratch directory (deleted at the end) with a darter config
/// file in it. Declare it before any mount so the mounts go first.
pub struct Scratch {
    work: Work,
    config: PathBuf,
}

impl Scratch {
    /// A scratch directory whose config file speaks plain HTTP to `hosts`
    /// (`127.0.0.1:PORT`) and has `settings` under `[registry]`.
    pub fn new(hosts: &[impl AsRef<str>], settings: RegistrySettings) -> Self {
        let work = Work::new();
        let config = work.path("config.toml");
        let mut toml = String::from("[registry]\n");
        if let Some(deadline) = settings.deadline {
            toml += &format!("deadline = {deadline}\n");
        }
        if let Some(attempts) = settings.attempts {
            toml += &format!("attempts = {attempts}\n");
        }
        for host in hosts {
            let host = host.as_ref();
            toml += &format!("\n[registries.\"{host}\"]\nplain_http = true\n");
        }
        std::fs::write(&config, toml).unwrap();
        work.mountpoint("home");
        Scratch { work, config }
    }

    /// Replaces the config file with `toml`.
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config, toml).unwrap();
    }

    /// `name` inside the scratch directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path(name)
    }

    /// An empty directory `name` (created).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.work.mountpoint(name)
    }

    /// `darter --config CONFIG ARGS` (see [`Scratch::darter_command`]).
    pub fn darter<I, S>(&self, args: I) -> Outcome
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.darter_with_stdin(args, None)
    }

    /// Like [`Scratch::darter`], writing `stdin` (e.g. a password) to its
    /// standard input.
    pub fn darter_with_stdin<I, S>(&self, args: I, stdin: Option<&str>) -> Outcome
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.darter_command(args), stdin)
    }

    /// `darter --config CONFIG ARGS`, hermetic: its own `HOME` (no docker
    /// credentials from the machine, push journals under
    /// [`Scratch::push_journal_dir`]), no log filter from the environment.
    pub fn darter_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(DARTER);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("HOME", self.path("home"))
            .env_remove("XDG_STATE_HOME")
            .env_remove("DOCKER_CONFIG")
            .env_remove("DARTER_CONFIG")
            .env_remove("DARTER_LOG")
            .env_remove("RUST_BACKTRACE");
        cmd
    }

    /// Where `darter build` keeps its push journals (under `HOME`).
    pub fn push_journal_dir(&self) -> PathBuf {
        self.path("home/.local/state/darter/push-journal")
    }

    /// The push journals `darter build` left (interrupted pushes).
    pub fn push_journals(&self) -> Vec<PathBuf> {
        let entries = match std::fs::read_dir(self.push_journal_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("{}: {e}", self.push_journal_dir().display()),
        };
        let mut journals: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        journals.sort();
        journals
    }

    /// `darter build SOURCE -o IMAGE --json EXTRA...`, asserting success;
    /// returns the report.
    #[track_caller]
    pub fn build(&self, source: impl AsRef<OsStr>, image: &str, extra: &[&str]) -> Value {
        let mut args = vec![
            OsStr::new("build"),
            source.as_ref(),
            OsStr::new("-o"),
            OsStr::new(image),
            OsStr::new("--json"),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.darter(args).ok().json()
    }

    /// `darter inspect IMAGE --json`, asserting success.
    #[track_caller]
    pub fn inspect(&self, image: &str) -> Value {
        self.darter(["inspect", image, "--json"]).ok().json()
    }

    /// `darter check IMAGE`, asserting the image is sound.
    #[track_caller]
    pub fn check_sound(&self, image: &str) {
        let out = self.darter(["check", image]).ok();
        assert!(out.stdout.contains(": sound:"), "{out:?}");
    }

    /// `darter copy FROM TO --json`, asserting success; returns the report.
    #[track_caller]
    pub fn copy(&self, from: &str, to: &str) -> Value {
        self.darter(["copy", from, to, "--json"]).ok().json()
    }
}

/// Runs `cmd` to the end, writing `stdin` (e.g. a password) to its
/// standard input; its output as an [`Outcome`].
pub fn run(mut cmd: Command, stdin: Option<&str>) -> Outcome {
    let command = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Outcome::new(command, &out)
}

/// `docker://HOST/PATH` (PATH is `repo[:tag]` or `repo@digest`).
pub fn docker(host: &str, path: &str) -> String {
    format!("docker://{host}/{path}")
}

/// A fresh registry holding the Debian python3 image (two gzip layers made
/// by umoci) as a plain OCI image at `REPO:oci`, and a scratch directory
/// speaking plain HTTP to it.
pub fn registry_with_python(repo: &str) -> (TestRegistry, Scratch, OciImage) {
    let registry = TestRegistry::start();
    let scratch = Scratch::new(&[registry.host()], RegistrySettings::default());
    let source = debian_python_oci().unwrap();
    skopeo_push(
        &source.layout,
        &source.tag,
        &registry.host(),
        &format!("{repo}:oci"),
    );
    (registry, scratch, source)
}

/// Pushes `oci:LAYOUT:TAG` to `docker://HOST/REPO_TAG` with skopeo, as a
/// plain OCI image.
pub fn skopeo_push(layout: &Path, tag: &str, host: &str, repo_tag: &str) {
    darter_testkit::process::run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(docker(host, repo_tag)),
    );
}

/// The raw manifest of a registry image (`skopeo inspect --raw`).
pub fn raw_manifest(host: &str, path: &str) -> Vec<u8> {
    darter_testkit::process::run(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(docker(host, path)),
    )
    .stdout
}

/// Total bytes of the regular files below `dir` (the registry's storage:
/// blobs, links, upload sessions), apparent sizes, as `find` lists them.
pub fn stored_file_bytes(dir: &Path) -> u64 {
    let listing = darter_testkit::process::run(
        Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-printf", "%s\\n"]),
    );
    String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .map(|size| size.parse::<u64>().unwrap())
        .sum()
}

/// The blob digests (`sha256:HEX`) a filesystem-backed registry stores.
pub fn stored_blobs(storage: &Path) -> Vec<String> {
    let root = storage.join("docker/registry/v2/blobs/sha256");
    let mut out = Vec::new();
    for prefix in std::fs::read_dir(&root).into_iter().flatten() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let blob = blob.unwrap();
            if blob.path().join("data").is_file() {
                out.push(format!("sha256:{}", blob.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

/// Where a mount's daemon runs.
enum Daemon {
    /// `darter mount` in the foreground: our child, logging to a file.
    Foreground(ChildGuard),
    /// `darter mount -d`: a daemon that is not our child.
    Detached(u32),
}

/// A registry image mounted by `darter mount` (optionally logging in with
/// `--username --password-stdin`). Dropping it unmounts and kills the
/// daemon, also when the test fails.
pub struct RegistryMount {
    // Fields drop in order: unmount first, then the daemon goes.
    unmount: MountGuard,
    daemon: Daemon,
    log: PathBuf,
}

/// How to start a [`RegistryMount`].
#[derive(Default)]
pub struct MountSpec<'a> {
    /// `(user, password)`: passed with `--username USER --password-stdin`.
    pub login: Option<(&'a str, &'a str)>,
    /// `darter mount -d` instead of a foreground daemon.
    pub detach: bool,
    /// Extra arguments (e.g. `-vv`).
    pub extra: &'a [&'a str],
}

impl RegistryMount {
    /// Mounts `image` at `mountpoint` (created) with the chunk cache
    /// `cache`; returns once the mount serves.
    #[track_caller]
    pub fn start(
        scratch: &Scratch,
        image: &str,
        mountpoint: &Path,
        cache: &Path,
        spec: &MountSpec<'_>,
    ) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        // A node daemon of this mount's own (unless the test names one),
        // its files beside the mount.
        let mut socket = mountpoint.as_os_str().to_owned();
        socket.push(".sock");
        let mut args: Vec<&OsStr> = Vec::new();
        if let Some((user, _)) = spec.login {
            args.extend([
                OsStr::new("--username"),
                OsStr::new(user),
                OsStr::new("--password-stdin"),
            ]);
        }
        args.extend([
            OsStr::new("mount"),
            OsStr::new(image),
            mountpoint.as_os_str(),
            OsStr::new("--cache"),
            cache.as_os_str(),
        ]);
        if spec.detach {
            args.push(OsStr::new("-d"));
            if !spec.extra.contains(&"--socket") {
                args.extend([OsStr::new("--socket"), &socket]);
            }
        }
        args.extend(spec.extra.iter().map(OsStr::new));
        let password = spec.login.map(|(_, password)| format!("{password}\n"));
        let unmount = MountGuard::new(mountpoint);
        if spec.detach {
            let out = scratch.darter_with_stdin(args, password.as_deref()).ok();
            let counters = try_stats(mountpoint).expect("darter mount -d returned before serving");
            let log = crate::mount_common::daemon_log_path(mountpoint);
            assert!(
                out.stdout.contains(&format!("pid {}", counters.pid)),
                "{out:?}"
            );
            return RegistryMount {
                unmount,
                daemon: Daemon::Detached(counters.pid),
                log,
            };
        }
        let mut name = mountpoint.file_name().unwrap().to_owned();
        name.push(".log");
        let log = mountpoint.with_file_name(name);
        let mut cmd = scratch.darter_command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut child = ChildGuard::spawn(&mut cmd).unwrap();
        let mut stdin = child.child().stdin.take().unwrap();
        stdin
            .write_all(password.unwrap_or_default().as_bytes())
            .unwrap();
        drop(stdin);
        let pid = child.id();
        wait_until(DAEMON_TIMEOUT, "the mount daemon to serve", || {
            if let Some(status) = child.child().try_wait().unwrap() {
                panic!(
                    "darter mount exited ({status}) before serving:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            try_stats(mountpoint).is_some_and(|c| c.pid == pid)
        });
        RegistryMount {
            unmount,
            daemon: Daemon::Foreground(child),
            log,
        }
    }

    pub fn path(&self) -> &Path {
        self.unmount.path()
    }

    /// `path()/rel`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }

    pub fn pid(&self) -> u32 {
        match &self.daemon {
            Daemon::Foreground(child) => child.id(),
            Daemon::Detached(pid) => *pid,
        }
    }

    /// The counters now, from the daemon that serves this mount (which
    /// must still be alive and answering).
    #[track_caller]
    pub fn stats(&self) -> Counters {
        let counters = try_stats(self.path())
            .unwrap_or_else(|| panic!("darter stats failed; daemon log:\n{}", self.log()));
        assert_eq!(counters.pid, self.pid(), "stats answered by another daemon");
        counters
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A foreground daemon is killed by its ChildGuard. A detached one
        // is a node daemon of this mount's own, which outlives the mount.
        if let Daemon::Detached(pid) = self {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(DARTER.as_bytes())
                && let Some(pid) = Pid::from_raw(*pid as i32)
            {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
    }
}

/// Standard base64 (with padding) of `data`: what a Basic `Authorization`
/// header carries.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in data.chunks(3) {
        let bytes = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let bits = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(bits >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Asserts that none of `texts` (outputs and logs, named by their key)
/// contains the password, the Basic credentials it makes, or a JWT (every
/// bearer token the test token service issues starts with `eyJ`).
#[track_caller]
pub fn assert_no_secrets(texts: &[(&str, &str)], user: &str, password: &str) {
    let basic = base64(format!("{user}:{password}").as_bytes());
    for (what, text) in texts {
        for secret in [password, basic.as_str(), "eyJ"] {
            assert!(
                !text.contains(secret),
                "{what} contains a secret ({secret:?}):\n{text}"
            );
        }
    }
}

/// Reads `path` and asserts its bytes are `expected` (never a wrong byte).
#[track_caller]
pub fn assert_reads(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        got == expected,
        "{} served {} bytes that differ from the {} original bytes",
        path.display(),
        got.len(),
        expected.len()
    );
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), as logs written
/// to a file may carry them.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
