//! Helpers for the tests that run `darter snapshotter` with lazy mounts: a
//! registry holding the python image converted to a Darter image, and
//! guards that unmount what the lazy mounts left and kill node daemons.
//!
//! A test binary using these declares `mod common; mod registry_common;
//! mod snapshotter_common;`.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use darter_testkit::process::{MountGuard, mounts_under};
use darter_testkit::registry::TestRegistry;

use crate::registry_common::{Scratch, docker, registry_with_python};

/// Unmounts everything below a directory on drop, and kills the node
/// daemons whose socket is there (the snapshotter's `ROOT/daemon.sock`).
pub struct UnmountUnder(pub PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let mut mounts = mounts_under(&self.0).unwrap_or_default();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        drop(mounts.into_iter().map(MountGuard::new).collect::<Vec<_>>());
        kill_node_daemons_under(&self.0);
    }
}

/// Kills, on drop, the node daemons whose socket is below a directory (a
/// snapshotter's, started by it); None: disarmed.
pub struct NodeDaemonsUnder(pub Option<PathBuf>);

impl Drop for NodeDaemonsUnder {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            kill_node_daemons_under(dir);
        }
    }
}

/// Kills the node daemons whose socket is below `dir`, each once it
/// serves no mount (or after a while).
fn kill_node_daemons_under(dir: &Path) {
    {
        for (pid, socket) in node_daemons_under(dir) {
            // Once it has seen its mounts go (no keeper then restarts it).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while darter_daemon::api::node_status(&socket).is_ok_and(|s| !s.mounts.is_empty())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// The `darter daemon` processes whose `--socket` is below `dir`, and
/// their sockets.
pub fn node_daemons_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let daemon = args.get(1..)?.iter().any(|a| *a == b"daemon");
            let at = args.iter().position(|a| *a == b"--socket")?;
            let socket = Path::new(std::ffi::OsStr::from_bytes(args.get(at + 1)?));
            (args.first()?.starts_with(crate::common::DARTER.as_bytes())
                && daemon
                && socket.starts_with(dir))
            .then(|| (pid, socket.to_owned()))
        })
        .collect()
}

/// The python image in a fresh registry, plain at `test/python:oci` and
/// converted to a Darter image at `test/python:darter`.
pub struct DarterRegistry {
    pub registry: TestRegistry,
    pub scratch: Scratch,
    /// `HOST/test/python:darter`, as containerd names the image.
    pub reference: String,
    /// The scratch's darter config, with the mounts' chunk cache set to
    /// the test's own.
    pub config: PathBuf,
}

impl DarterRegistry {
    pub fn start() -> DarterRegistry {
        let (registry, scratch, _source) = registry_with_python("test/python");
        let host = registry.host();
        let reference = format!("{host}/test/python:darter");
        scratch.build(docker(&host, "test/python:oci"), &reference, &[]);
        let config = scratch.path("config.toml");
        let toml = std::fs::read_to_string(&config).unwrap();
        let toml = format!("[mount]\ncache = {:?}\n\n{toml}", scratch.path("cache"));
        std::fs::write(&config, toml).unwrap();
        DarterRegistry {
            registry,
            scratch,
            reference,
            config,
        }
    }
}

/// Starts `darter snapshotter` on `dir/snapshotter.sock` with root
/// `dir/root` and the darter config `config`, logging every snapshot
/// operation (with its labels) to `dir/snapshotter.log`, appended across
/// restarts; returns once the socket answers.
pub fn start_snapshotter(dir: &Path, config: &Path) -> darter_testkit::process::ChildGuard {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("snapshotter.log"))
        .unwrap();
    let socket = dir.join("snapshotter.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = std::process::Command::new(crate::common::DARTER);
    cmd.args(["snapshotter", "--socket"])
        .arg(&socket)
        .arg("--root")
        .arg(dir.join("root"))
        .env("DARTER_CONFIG", config)
        .env("DARTER_LOG", "info,darter_snapshotter=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let snapshotter = darter_testkit::process::ChildGuard::spawn(&mut cmd).unwrap();
    let serving = std::time::Duration::from_secs(60);
    darter_testkit::process::wait_until(serving, "darter snapshotter to serve", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    snapshotter
}

/// `darter status --json` of the snapshotter whose root is `root`.
pub fn snapshotter_status(root: &Path) -> darter_snapshotter::NodeStatus {
    let out = crate::common::darter([
        "status".as_ref(),
        "--json".as_ref(),
        "--snapshotter-root".as_ref(),
        root.as_os_str(),
    ] as [&std::ffi::OsStr; 4])
    .ok();
    serde_json::from_str(&out.stdout).unwrap()
}
