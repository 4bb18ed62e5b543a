//! The life of a mount: clean unmounts on SIGINT/SIGTERM and `umount`,
//! recovery of a mountpoint left behind by a killed daemon, `darter stats`
//! and the Prometheus endpoint, and what a second mount on a served
//! mountpoint gets.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;

use std::ffi::OsStr;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::darter;
use darter_testkit::process::{ChildGuard, free_port, wait_until};
use mount_common::{
    BuiltImage, DAEMON_TIMEOUT, KERNEL_EROFS, Mounted, Work, api_socket, assert_mount_matches,
    devices_dir, is_mounted, noise_files,
};
use rustix::process::Signal;

const KIB: usize = 1 << 10;

/// A small image of a few files; returns (source, image).
fn small_image(work: &Work) -> (std::path::PathBuf, BuiltImage) {
    let source = work.path("source");
    noise_files(&source, &[("a", 300 * KIB), ("dir/b", 5000), ("dir/c", 0)]);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    (source, image)
}

/// Asserts that nothing is left of the mount at `mountpoint`: not in the
/// mount table, no API socket, `darter stats` refuses.
fn assert_gone(mountpoint: &Path) {
    assert!(
        !is_mounted(mountpoint),
        "{} is still mounted",
        mountpoint.display()
    );
    let devices = devices_dir(mountpoint);
    assert!(
        !devices.exists(),
        "the devices directory {} is left behind",
        devices.display()
    );
    let socket = api_socket(mountpoint);
    assert!(!socket.exists(), "{} is left behind", socket.display());
    darter([OsStr::new("stats"), mountpoint.as_os_str()]).fails_with(1);
}

/// How a foreground mount is asked to stop.
type Stop = (&'static str, fn(&Mounted));

const STOPS: &[Stop] = &[
    ("SIGINT", |m| m.signal(Signal::INT)),
    ("SIGTERM", |m| m.signal(Signal::TERM)),
    ("umount", |m| unmount_with(&["umount"], m)),
    ("fusermount3 -u", |m| {
        unmount_with(&["fusermount3", "-u"], m)
    }),
];

/// Runs an unmount command until it works, as a user would: the kernel
/// refuses it (EBUSY) while requests for files already closed (read-ahead)
/// are still being answered.
fn unmount_with(command: &[&str], mount: &Mounted) {
    wait_until(DAEMON_TIMEOUT, &format!("{command:?} to unmount"), || {
        Command::new(command[0])
            .args(&command[1..])
            .arg(mount.path())
            .output()
            .is_ok_and(|out| out.status.success())
    });
}

#[test]
fn a_foreground_mount_stops_cleanly_on_signals_and_unmounts() {
    stops_cleanly(&[], STOPS);
}

/// Through the kernel's EROFS driver: a signal unmounts the EROFS mount
/// and then the devices; a plain `umount` of the EROFS mount makes the
/// daemon unmount its devices and end.
#[test]
fn a_kernel_erofs_mount_stops_cleanly_on_signals_and_umount() {
    stops_cleanly(KERNEL_EROFS, &STOPS[..3]);
}

fn stops_cleanly(frontend: &[&str], stops: &[Stop]) {
    let work = Work::new();
    let (source, image) = small_image(&work);
    for (how, stop) in stops {
        let mut mount = work.mount(&image, &format!("mnt-{}", how.replace(' ', "-")), frontend);
        let mountpoint = mount.path().to_owned();
        assert!(
            is_mounted(&mountpoint) && api_socket(&mountpoint).exists(),
            "{how}"
        );
        assert_mount_matches(&source, mount.path());

        stop(&mount);
        let status = mount.wait_exit();
        assert!(
            status.success(),
            "{how}: darter mount exited with {status}:\n{}",
            mount.log()
        );
        assert_gone(&mountpoint);
        let log = mount.log();
        assert!(
            !log.contains("ERROR") && !log.contains("panicked"),
            "{how}:\n{log}"
        );
    }
}

/// Regression: a daemon told to stop hung when a copy of its mount lived
/// on in another mount namespace (made by `unshare`, a container runtime or
/// `ip netns` while the mount existed): the kernel ends the FUSE session
/// only once no namespace has the mount, so the unmount on the signal
/// never ended the daemon's session loop.
#[test]
fn a_signal_stops_a_mount_that_lives_on_in_another_mount_namespace() {
    let work = Work::new();
    let (_, image) = small_image(&work);
    let mut mount = work.mount(&image, "mnt", &[]);
    let mountpoint = mount.path().to_owned();
    let mut holder = Command::new("unshare");
    holder.args(["--mount", "--propagation", "private", "sleep", "600"]);
    let holder = ChildGuard::spawn(&mut holder).unwrap();
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let (ours, holders) = (namespace("self"), holder.id().to_string());
    let needle = format!(" {} ", mountpoint.display());
    wait_until(
        DAEMON_TIMEOUT,
        "another namespace to have the mount",
        || {
            namespace(&holders).is_some_and(|ns| Some(ns) != ours)
                && std::fs::read_to_string(format!("/proc/{holders}/mountinfo"))
                    .is_ok_and(|m| m.contains(&needle))
        },
    );

    mount.signal(Signal::TERM);
    let status = mount.wait_exit();
    assert!(status.success(), "exited with {status}:\n{}", mount.log());
    assert_gone(&mountpoint);
    let log = mount.log();
    assert!(log.contains("another mount namespace"), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
}

/// A signal on a mount still in use (an open file here; an overlay over it
/// in a container) detaches it and goes on serving its users until the last
/// lets go: stopping after a signal must not break a running container.
#[test]
fn a_signal_on_a_mount_in_use_detaches_it_and_serves_until_the_last_user_leaves() {
    let work = Work::new();
    let source = work.path("source");
    noise_files(&source, &[("big", 4 << 20)]);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let mut mount = work.mount(&image, "mnt", &[]);
    let mountpoint = mount.path().to_owned();
    let mut open = std::fs::File::open(mount.join("big")).unwrap();
    let mut head = [0u8; 4096];
    open.read_exact(&mut head).unwrap();

    mount.signal(Signal::TERM);
    wait_until(DAEMON_TIMEOUT, "the busy mount to be detached", || {
        mount.log().contains("detaching the mount lazily") && !is_mounted(&mountpoint)
    });
    // Past the time a cleanly unmounted daemon waits before it stops
    // anyway, this one still serves the open file.
    let pid = mount.pid();
    let observed = std::time::Instant::now();
    while observed.elapsed() < std::time::Duration::from_secs(3) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        assert!(
            matches!(state, Some("S" | "R" | "D")),
            "the daemon ended: {stat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let expected = std::fs::read(source.join("big")).unwrap();
    let mut tail = vec![0u8; 1 << 20];
    std::io::Seek::seek(&mut open, std::io::SeekFrom::Start(3 << 20)).unwrap();
    open.read_exact(&mut tail).unwrap();
    assert!(tail == expected[3 << 20..], "wrong bytes after the detach");

    drop(open);
    let status = mount.wait_exit();
    assert!(status.success(), "exited with {status}:\n{}", mount.log());
    assert!(!mount.log().contains("stopping anyway"), "{}", mount.log());
}

/// Regression: a mountpoint given as a relative path (`darter mount IMAGE
/// mnt`) kept the FUSE default readahead of 128 KiB, with a warning, since
/// its parent directory "" could not be resolved.
#[test]
fn a_relative_mountpoint_gets_a_readahead_of_one_chunk() {
    let work = Work::new();
    let (_, image) = small_image(&work);
    let mountpoint = work.mountpoint("mnt");
    let mut cmd =
        mount_common::mount_command(&image.reference, Path::new("mnt"), &work.cache(), &[]);
    cmd.current_dir(mountpoint.parent().unwrap());
    let mount = Mounted::spawn_foreground(cmd, &mountpoint, None);
    let device = rustix::fs::stat(mount.path()).unwrap().st_dev;
    let (major, minor) = (rustix::fs::major(device), rustix::fs::minor(device));
    let readahead =
        std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb")).unwrap();
    assert_eq!(readahead.trim(), "1024", "{}", mount.log());
}

/// Regression: the stale mount was looked for with stat(2), which the
/// kernel answers for a FUSE root from its attribute cache (valid for the
/// mount's long timeouts) even after the daemon died; so a mountpoint that
/// had been used was not recognized as stale and the next mount failed
/// with ENOTCONN.
#[test]
fn stale_mountpoint_with_cached_root_attributes_is_recovered_by_the_next_mount() {
    let work = Work::new();
    let (source, image) = small_image(&work);
    let mut dead = work.mount(&image, "mnt", &[]);
    let mountpoint = dead.path().to_owned();
    std::fs::metadata(&mountpoint).unwrap();
    std::fs::read(dead.join("a")).unwrap();
    dead.kill();
    let err = std::fs::read_dir(&mountpoint).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::NOTCONN.raw_os_error()),
        "a killed daemon's mount should be stale: {err}"
    );

    let again = Mounted::detached(&image.reference, &mountpoint, &work.cache(), &[]);
    let mounts = darter_testkit::process::mounts_under(&mountpoint).unwrap();
    assert_eq!(
        mounts,
        std::slice::from_ref(&mountpoint),
        "the stale mount should be gone, not covered"
    );
    assert_mount_matches(&source, again.path());
    let log = again.log();
    assert!(
        log.contains("stale"),
        "the recovery should be logged:\n{log}"
    );
}

/// A killed daemon leaves the kernel's EROFS mount in place, answering
/// from what it cached but failing every read it would have to ask the
/// devices for; the next mount replaces it, and its dead devices mount.
#[test]
fn a_kernel_erofs_mount_left_by_a_killed_daemon_is_recovered_by_the_next_mount() {
    let work = Work::new();
    let (source, image) = small_image(&work);
    let mut dead = work.mount(&image, "mnt", KERNEL_EROFS);
    let mountpoint = dead.path().to_owned();
    dead.kill();
    let err = std::fs::read(mountpoint.join("a")).unwrap_err();
    let failed = [rustix::io::Errno::NOTCONN, rustix::io::Errno::IO]
        .map(|e| Some(e.raw_os_error()))
        .contains(&err.raw_os_error());
    assert!(
        failed,
        "reading a file the dead daemon never served should fail: {err}"
    );

    let again = Mounted::detached(&image.reference, &mountpoint, &work.cache(), KERNEL_EROFS);
    let mounts = darter_testkit::process::mounts_under(&mountpoint).unwrap();
    assert_eq!(
        mounts,
        std::slice::from_ref(&mountpoint),
        "the stale mount should be gone, not covered"
    );
    let devices = darter_testkit::process::mounts_under(&devices_dir(&mountpoint)).unwrap();
    assert_eq!(
        devices.len(),
        1,
        "one devices mount, the new one: {devices:?}"
    );
    assert_mount_matches(&source, again.path());
    let log = again.log();
    assert!(
        log.contains("stale"),
        "the recovery should be logged:\n{log}"
    );
}

#[test]
fn a_served_mountpoint_is_not_mounted_twice() {
    let work = Work::new();
    let (_, image) = small_image(&work);
    let mount = work.mount(&image, "mnt", &[]);
    darter([
        OsStr::new("mount"),
        OsStr::new(&image.reference),
        mount.path().as_os_str(),
        OsStr::new("--cache"),
        work.path("cache2").as_os_str(),
    ])
    .fails_with(1)
    .mentions(&["already served", &format!("pid {}", mount.pid())]);
    assert_eq!(
        mount.stats().pid,
        mount.pid(),
        "the first mount should still serve"
    );
}

#[test]
fn stats_of_a_path_no_daemon_serves_is_a_clear_error() {
    let work = Work::new();
    let plain = work.mountpoint("plain");
    let missing = work.path("missing");
    for path in [&plain, &missing] {
        for json in [false, true] {
            let mut args = vec![OsStr::new("stats"), path.as_os_str()];
            if json {
                args.push(OsStr::new("--json"));
            }
            let out = darter(args).fails_with(1);
            let shown = path.display().to_string();
            let out = out.mentions(&["no Darter daemon serves", &shown]);
            assert!(out.stdout.is_empty(), "{out:?}");
        }
    }
}

/// `GET path` on `addr`; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample of metric `name` in a Prometheus exposition.
fn sample(exposition: &str, name: &str) -> u64 {
    let line = exposition
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("no sample of {name}:\n{exposition}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn metrics_endpoint_serves_the_counters() {
    let work = Work::new();
    let (source, image) = small_image(&work);
    let addr = format!("127.0.0.1:{}", free_port());
    let mount = work.mount(&image, "mnt", &["--metrics-addr", &addr]);
    assert_mount_matches(&source, mount.path());
    let stats = mount.stats();

    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    for (name, value) in [
        ("darter_backend_bytes_total", stats.backend_bytes),
        ("darter_backend_requests_total", stats.backend_requests),
        ("darter_cache_hits_total", stats.cache_hits),
        ("darter_cache_misses_total", stats.cache_misses),
        ("darter_verify_failures_total", stats.verify_failures),
        ("darter_prefetch_bytes_total", stats.prefetch_bytes),
        ("darter_read_bytes_total", stats.read_bytes),
        ("darter_decompressed_bytes_total", stats.decompressed_bytes),
        ("darter_image_bytes", stats.image_bytes),
    ] {
        assert_eq!(sample(&body, name), value, "{name}:\n{body}");
        assert!(body.contains(&format!("# TYPE {name} ")), "{name}:\n{body}");
    }
    assert!(stats.read_bytes > 0 && stats.backend_bytes > 0, "{stats:?}");
    assert!(
        body.contains(&format!("image=\"{}\"", image.reference)),
        "{body}"
    );

    let (status, _) = http_get(&addr, "/nothing");
    assert!(status.contains(" 404 "), "{status}");
}
