//! One node daemon serves every lazy mount: `darter mount -d` of two
//! images on one socket are served by one process with one chunk cache,
//! listed by its API, unmounted one at a time (by `darter unmount` or a
//! plain `umount`) while the rest serve, and a SIGTERM unmounts what no
//! keeper keeps. All real: the `darter` binary, FUSE, unix sockets.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::{darter, noise, write_file};
use darter_daemon::api::node_status;
use darter_testkit::containerd::is_running;
use darter_testkit::process::{mounts_under, wait_until};
use mount_common::{
    BuiltImage, DAEMON_TIMEOUT, Mounted, Work, assert_mount_matches, is_mounted, node_socket,
};
use rustix::process::{Pid, Signal};

const MIB: usize = 1 << 20;

/// Two images that share a large file and each have one of their own;
/// returns their sources and images.
fn two_images(work: &Work) -> [(PathBuf, BuiltImage); 2] {
    let shared = noise(1, 4 * MIB);
    [("one", 10), ("two", 11)].map(|(name, seed)| {
        let source = work.path(&format!("source-{name}"));
        write_file(&source.join("shared"), &shared);
        write_file(&source.join(format!("own-{name}")), &noise(seed, 300 << 10));
        let image = BuiltImage::build(&source, &work.path(&format!("layout-{name}")), &[]);
        (source, image)
    })
}

/// The mountpoints the node daemon at `socket` lists.
fn listed(socket: &Path) -> Vec<PathBuf> {
    node_status(socket)
        .unwrap()
        .mounts
        .into_iter()
        .map(|m| m.report.mountpoint)
        .collect()
}

#[test]
fn two_images_are_served_by_one_node_daemon_sharing_its_cache() {
    let work = Work::new();
    let [(source_one, one), (source_two, two)] = two_images(&work);
    let cache = work.cache();
    let socket = node_socket(&cache);
    let first = Mounted::detached(&one.reference, &work.mountpoint("one"), &cache, &[]);
    assert_mount_matches(&source_one, first.path());
    let second = Mounted::detached(&two.reference, &work.mountpoint("two"), &cache, &[]);
    assert_mount_matches(&source_two, second.path());

    let (a, b) = (first.stats(), second.stats());
    assert_eq!(a.pid, b.pid, "one process serves both mounts");
    // The shared file's chunks came from the cache the first mount filled.
    assert!(
        b.cache_hits > 0 && b.backend_bytes < a.backend_bytes / 2,
        "the second image should fetch only what the first did not: {a:?} {b:?}"
    );
    let status = node_status(&socket).unwrap();
    assert_eq!(status.pid, a.pid);
    assert_eq!(
        listed(&socket),
        vec![first.path().to_owned(), second.path().to_owned()]
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket carries credentials");

    // Unmounting one (through the daemon serving it, found from the
    // mount) leaves the other serving.
    darter([OsStr::new("unmount"), first.path().as_os_str()]).ok();
    assert!(!is_mounted(first.path()));
    assert_eq!(listed(&socket), vec![second.path().to_owned()]);
    assert_mount_matches(&source_two, second.path());
    assert_eq!(second.stats().pid, a.pid);

    // A plain umount is noticed; the daemon keeps running with no mount.
    let umount = std::process::Command::new("umount")
        .arg(second.path())
        .status()
        .unwrap();
    assert!(umount.success());
    wait_until(
        DAEMON_TIMEOUT,
        "the daemon to drop the unmounted mount",
        || listed(&socket).is_empty(),
    );
    assert!(is_running(a.pid), "the daemon keeps running with no mount");
    assert!(!second.log().contains("ERROR"), "{}", second.log());
}

#[test]
fn sigterm_of_the_node_daemon_unmounts_its_mounts_cleanly() {
    let work = Work::new();
    let [(source_one, one), (source_two, two)] = two_images(&work);
    let cache = work.cache();
    let mounts =
        [(&one, "one", &source_one), (&two, "two", &source_two)].map(|(image, name, source)| {
            let mount = Mounted::detached(&image.reference, &work.mountpoint(name), &cache, &[]);
            assert_mount_matches(source, mount.path());
            mount
        });
    let pid = mounts[0].pid();
    assert_eq!(mounts[1].pid(), pid);

    rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::TERM).unwrap();
    wait_until(DAEMON_TIMEOUT, "the node daemon to exit", || {
        !is_running(pid)
    });
    let left = mounts_under(&work.path("")).unwrap();
    assert_eq!(left, Vec::<PathBuf>::new(), "mounts left behind");
    for mount in &mounts {
        assert!(!mount_common::api_socket(mount.path()).exists());
    }
    let log = mounts[0].log();
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
}
