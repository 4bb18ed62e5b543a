//! Restart without harm: a mount daemon killed (SIGKILL) or stopped
//! (SIGTERM) under a keeper leaves its mount waiting, not broken; reads
//! made while no daemon runs complete with the right bytes once the next
//! daemon takes the mount over. All real: FUSE, `darter mount`, and for the
//! containerd tests a registry, `darter snapshotter` (the keeper) and a
//! containerd whose container reads the image in a loop.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;
mod snapshotter_common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::DARTER;
use darter_daemon::keeper::{Keeper, MountRecord};
use darter_testkit::containerd::{Containerd, is_running};
use darter_testkit::process::{ChildGuard, mounts_under, run, wait_until};
use mount_common::{
    BuiltImage, DAEMON_TIMEOUT, KERNEL_EROFS, Mounted, Work, node_socket, noise_files, try_stats,
};
use rustix::process::{Pid, Signal};
use sha2::{Digest as _, Sha256};
use snapshotter_common::{DarterRegistry, UnmountUnder, start_snapshotter};

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn signal(pid: u32, signal: Signal) {
    rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), signal).unwrap();
}

/// The state letter of task `tid` of process `pid` (`R`, `S`, `D`, ...).
fn task_state(pid: u32, tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether the task sleeps (in the kernel, waiting: for a FUSE answer here).
fn sleeps(pid: u32, tid: u32) -> bool {
    matches!(task_state(pid, tid), Some('S' | 'D'))
}

/// A keeper in the test process, telling the test of lost daemons.
fn test_keeper(socket: &Path) -> (std::sync::Arc<Keeper>, mpsc::Receiver<MountRecord>) {
    let (lost, losses) = mpsc::channel();
    let lost = std::sync::Mutex::new(lost);
    let keeper = Keeper::listen(
        socket,
        Box::new(move |record| {
            let _ = lost.lock().unwrap().send(record);
        }),
    )
    .unwrap();
    (keeper, losses)
}

/// A daemon under a test keeper is SIGKILLed; a read of a file nobody read
/// yet, made while no daemon runs, waits, and completes with the file's
/// bytes once `darter mount --takeover` serves the mount again.
fn read_waits_for_a_takeover(frontend: &[&str]) {
    let work = Work::new();
    let source = work.path("source");
    noise_files(&source, &[("big", 3 << 20), ("dir/small", 5000)]);
    let image = BuiltImage::build(&source, &work.path("layout"), &[]);
    let socket = work.path("keeper.sock");
    let (keeper, losses) = test_keeper(&socket);
    let mountpoint = work.mountpoint("mnt");
    let cache = work.cache();
    let keeper_arg = socket.to_str().unwrap();
    let mut args = vec!["--keeper", keeper_arg];
    args.extend_from_slice(frontend);
    let mut mounted = Mounted::detached(&image.reference, &mountpoint, &cache, &args);
    assert_eq!(
        std::fs::read(mounted.join("dir/small")).unwrap(),
        std::fs::read(source.join("dir/small")).unwrap()
    );
    wait_until(DAEMON_TIMEOUT, "the keeper to hold the device", || {
        keeper.record(&mountpoint).is_some()
    });
    let old = mounted.pid();

    mounted.kill();
    let lost = losses.recv_timeout(DAEMON_TIMEOUT).unwrap();
    assert_eq!((lost.pid, &lost.mountpoint), (old, &mountpoint));

    // A read while no daemon runs.
    let (tid_tx, tid_rx) = mpsc::channel();
    let big = mounted.join("big");
    let reader = std::thread::spawn(move || {
        tid_tx
            .send(rustix::thread::gettid().as_raw_nonzero().get() as u32)
            .unwrap();
        std::fs::read(big)
    });
    let tid = tid_rx.recv().unwrap();
    wait_until(DAEMON_TIMEOUT, "the read to wait for a daemon", || {
        sleeps(std::process::id(), tid)
    });
    assert!(!reader.is_finished(), "the read finished with no daemon");

    let mut takeover = Command::new(DARTER);
    takeover
        .args(["mount", &image.reference])
        .arg(&mountpoint)
        .arg("--cache")
        .arg(&cache)
        .args(["-d", "--takeover", "--socket"])
        .arg(node_socket(&cache))
        .args(&args);
    run(&mut takeover);
    assert_eq!(
        reader.join().unwrap().unwrap(),
        std::fs::read(source.join("big")).unwrap(),
        "the waiting read gets the file's bytes"
    );
    let new = try_stats(&mountpoint).unwrap().pid;
    assert_ne!(new, old);
    drop(mounted);
    stop_when_idle(&node_socket(&cache), new);
}

#[test]
fn a_fuse_read_waits_for_the_daemon_that_takes_the_mount_over() {
    read_waits_for_a_takeover(&[]);
}

#[test]
fn a_kernel_erofs_read_waits_for_the_daemon_that_takes_the_mount_over() {
    read_waits_for_a_takeover(KERNEL_EROFS);
}

/// The daemon is killed while it fetches the chunk a read needs: it had
/// read that FUSE request and never answered it. The daemon that takes
/// over has the kernel resend it (FUSE_NOTIFY_RESEND) and answers it: the
/// read completes with the right bytes instead of waiting forever.
#[test]
fn a_request_the_killed_daemon_had_read_is_answered_by_the_next() {
    use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule};
    use registry_common::{MountSpec, RegistryMount, RegistrySettings, Scratch, docker};

    let registry = darter_testkit::registry::TestRegistry::start();
    let proxy = FaultProxy::start(registry.addr());
    let scratch = Scratch::new(
        &[registry.host(), proxy.host()],
        RegistrySettings::default(),
    );
    let tree = scratch.path("tree");
    common::write_file(&tree.join("warm"), b"read first: fetches the chunk table\n");
    let victim = common::noise(7, 1 << 20);
    common::write_file(&tree.join("victim"), &victim);
    scratch.build(&tree, &docker(&registry.host(), "test/resend:v1"), &[]);

    let socket = scratch.path("keeper.sock");
    let (keeper, losses) = test_keeper(&socket);
    let image = docker(&proxy.host(), "test/resend:v1");
    let mountpoint = scratch.path("mnt");
    let cache = scratch.path("cache");
    let node = node_socket(&cache);
    let keeper_args = [
        "--keeper",
        socket.to_str().unwrap(),
        "--socket",
        node.to_str().unwrap(),
    ];
    let spec = MountSpec {
        detach: true,
        extra: &keeper_args,
        ..MountSpec::default()
    };
    let mount = RegistryMount::start(&scratch, &image, &mountpoint, &cache, &spec);
    assert_eq!(
        std::fs::read(mountpoint.join("warm")).unwrap(),
        b"read first: fetches the chunk table\n"
    );
    wait_until(DAEMON_TIMEOUT, "the keeper to hold the device", || {
        keeper.record(&mountpoint).is_some()
    });

    // The next blob fetch hangs at the proxy: the daemon holds the read.
    let blob_requests = || {
        proxy
            .requests()
            .iter()
            .filter(|r| r.path.contains("/blobs/"))
            .count()
    };
    let before = blob_requests();
    proxy.inject(
        FaultRule::new(Fault::Delay(Duration::from_secs(3600)))
            .path_contains("/blobs/")
            .times(1),
    );
    let path = mountpoint.join("victim");
    let reader = std::thread::spawn(move || std::fs::read(path));
    wait_until(DAEMON_TIMEOUT, "the daemon to fetch for the read", || {
        blob_requests() > before
    });
    let old = mount.pid();
    signal(old, Signal::KILL);
    assert_eq!(losses.recv_timeout(DAEMON_TIMEOUT).unwrap().pid, old);
    assert!(!reader.is_finished(), "the read finished with no daemon");

    let mut takeover = scratch.darter_command(["mount", image.as_str()]);
    takeover
        .arg(&mountpoint)
        .arg("--cache")
        .arg(&cache)
        .args(["-d", "--takeover"])
        .args(keeper_args);
    run(&mut takeover);
    assert_eq!(reader.join().unwrap().unwrap(), victim);
    let new = try_stats(&mountpoint).unwrap().pid;
    assert_ne!(new, old);
    drop(mount);
    stop_when_idle(&node, new);
}

/// The node daemon `pid` on `socket` forgets its mount once it is
/// unmounted, and ends on SIGTERM (no mount left to unmount).
#[track_caller]
fn stop_when_idle(socket: &Path, pid: u32) {
    wait_until(
        DAEMON_TIMEOUT,
        "the node daemon to forget the mount",
        || darter_daemon::api::node_status(socket).is_ok_and(|s| s.mounts.is_empty()),
    );
    signal(pid, Signal::TERM);
    wait_until(DAEMON_TIMEOUT, "the node daemon to end", || {
        !is_running(pid)
    });
}

/// The proxy plugin's name in containerd's config.
const PLUGIN: &str = "darter";

/// `darter snapshotter` (the keeper) with containerd and a Darter image
/// pulled lazily. Dropped containers first, then the lazy mounts (their
/// daemons end), then the snapshotter.
struct Setup {
    containerd: Containerd,
    _lazy_mounts: UnmountUnder,
    snapshotter: ChildGuard,
    /// The darter config the snapshotter and its mounts use.
    config: PathBuf,
    dir: tempfile::TempDir,
    scratch: registry_common::Scratch,
    _registry: darter_testkit::registry::TestRegistry,
    reference: String,
}

impl Setup {
    fn pulled() -> Setup {
        let DarterRegistry {
            registry,
            scratch,
            reference,
            config,
        } = DarterRegistry::start();

        let dir = tempfile::tempdir().unwrap();
        let snapshotter = start_snapshotter(dir.path(), &config);
        let socket = dir.path().join("snapshotter.sock");
        let lazy_mounts = UnmountUnder(dir.path().to_path_buf());
        let containerd = Containerd::start(&[(PLUGIN, &socket)]).unwrap();
        let setup = Setup {
            containerd,
            _lazy_mounts: lazy_mounts,
            snapshotter,
            config,
            dir,
            scratch,
            _registry: registry,
            reference,
        };
        let reference = setup.reference.clone();
        setup.pull(&reference);
        setup
    }

    /// `darter unpack` of the image into a new directory: the expected
    /// tree.
    fn unpack_expected(&self) -> PathBuf {
        let expected = self.scratch.path("expected");
        self.scratch
            .darter([
                "unpack".as_ref(),
                self.reference.as_ref(),
                expected.as_os_str(),
            ] as [&std::ffi::OsStr; 3])
            .ok();
        expected
    }

    /// `darter pull IMAGE` into the test's containerd.
    fn pull(&self, image: &str) {
        let address = self.containerd.socket().as_os_str().to_owned();
        self.scratch
            .darter([
                "pull".as_ref(),
                image.as_ref(),
                "--address".as_ref(),
                address.as_os_str(),
                "--namespace".as_ref(),
                darter_testkit::containerd::NAMESPACE.as_ref(),
            ] as [&std::ffi::OsStr; 6])
            .ok();
    }

    /// SIGKILLs the snapshotter and starts it again.
    fn restart_snapshotter(&mut self) {
        signal(self.snapshotter.id(), Signal::KILL);
        self.snapshotter.child().wait().unwrap();
        self.snapshotter = start_snapshotter(self.dir.path(), &self.config);
        // containerd's connection to the killed snapshotter backs off
        // before it dials again; until then its calls (the garbage
        // collector's removals too) fail with the old error.
        wait_until(
            START_TIMEOUT,
            "containerd to reach the new snapshotter",
            || {
                let mut ls = self
                    .containerd
                    .ctr(["snapshots", "--snapshotter", PLUGIN, "ls"]);
                ls.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            },
        );
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("snapshotter.log"));
        registry_common::strip_ansi(&log.unwrap_or_default())
    }

    fn ctr(&self, args: &[&str]) -> String {
        String::from_utf8(run(&mut self.containerd.ctr(args)).stdout).unwrap()
    }

    /// The one lazy mount below the snapshotter's root.
    fn lazy_mount(&self) -> PathBuf {
        let mounts = mounts_under(&self.root()).unwrap();
        let [mount] = &mounts[..] else {
            panic!("one lazy mount expected: {mounts:?}");
        };
        mount.clone()
    }

    /// The container that reads the image: named after the test's
    /// directory, as runc's state of a namespace is shared by every
    /// containerd.
    fn container(&self) -> String {
        let dir = self.dir.path().file_name().unwrap().to_str().unwrap();
        format!("reader{}", dir.replace('.', "-"))
    }

    /// The pid of the daemon serving the lazy mount.
    fn daemon(&self) -> u32 {
        try_stats(&self.lazy_mount()).unwrap().pid
    }
}

/// sha256 of each regular file (by path in the image) chosen from the
/// image's python library: `count` files from `under` (relative to the
/// library), from the unpacked `tree`.
fn hashes(tree: &Path, library: &str, under: &str, count: usize) -> BTreeMap<String, String> {
    let dir = tree.join(library).join(under);
    let mut files: Vec<PathBuf> = walk(&dir)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect();
    files.sort();
    files
        .into_iter()
        .take(count)
        .map(|p| {
            let image_path = format!("/{}", p.strip_prefix(tree).unwrap().display());
            (
                image_path,
                hex::encode(Sha256::digest(std::fs::read(&p).unwrap())),
            )
        })
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(walk(&entry.path()));
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    out
}

/// The python library directory of the unpacked image (`usr/lib/python3.N`).
fn python_library(tree: &Path) -> String {
    let mut found: Vec<String> = std::fs::read_dir(tree.join("usr/lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            n.starts_with("python3.") && tree.join("usr/lib").join(n).join("os.py").is_file()
        })
        .collect();
    found.sort();
    format!("usr/lib/{}", found.pop().expect("a python library"))
}

/// The container's loop: reads every file (dropping its pages after, so the
/// next pass asks the mount again), checks its hash, and after each pass
/// writes `{"passes": N, "errors": [...]}` to /out/status.
const READ_LOOP: &str = r#"
import hashlib, json, os, sys
files = json.loads(sys.argv[1])
passes, errors = 0, []
while True:
    for path, want in files.items():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = b""
                while chunk := os.read(fd, 1 << 20):
                    data += chunk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            if hashlib.sha256(data).hexdigest() != want:
                errors.append(f"{path}: wrong bytes")
        except OSError as e:
            errors.append(f"{path}: {e}")
    passes += 1
    with open("/out/status.tmp", "w") as f:
        json.dump({"passes": passes, "errors": errors}, f)
    os.replace("/out/status.tmp", "/out/status")
"#;

/// A read made by `ctr task exec`, in steps the test drives through
/// files in /out: imports, says it is ready (`ready-TAG`), waits for
/// `go-TAG`, says it reads (`reading-TAG`), and prints the file's sha256.
const READ_ONCE: &str = r#"
import hashlib, os, sys, time
path, tag = sys.argv[1], sys.argv[2]
open(f"/out/ready-{tag}", "w").close()
while not os.path.exists(f"/out/go-{tag}"):
    time.sleep(0.01)
open(f"/out/reading-{tag}", "w").close()
with open(path, "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest(), flush=True)
"#;

/// (passes, errors) the container's loop reported last.
fn loop_status(out: &Path) -> (u64, Vec<String>) {
    let Ok(text) = std::fs::read_to_string(out.join("status")) else {
        return (0, Vec::new());
    };
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    let errors = status["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    (status["passes"].as_u64().unwrap(), errors)
}

/// Waits until the loop has made `more` passes after the `after`th, and
/// asserts it saw no error.
#[track_caller]
fn loop_goes_on_without_error(out: &Path, after: u64, more: u64) -> u64 {
    let mut passes = 0;
    wait_until(START_TIMEOUT, "the container's read loop to go on", || {
        passes = loop_status(out).0;
        passes >= after + more
    });
    let (_, errors) = loop_status(out);
    assert_eq!(errors, Vec::<String>::new(), "the container saw errors");
    passes
}

/// The pid of the process whose command line holds `marker`.
fn process_with(marker: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            // The container's python, not the `ctr` that started it.
            (cmdline.starts_with(b"python3\0")
                && String::from_utf8_lossy(&cmdline).contains(marker))
            .then_some(pid)
        })
}

/// Stops the keeper, ends the daemon with `sig`, has the container read
/// `file` (never read before) while no daemon runs, and lets the keeper go
/// on: the read completes with `want` and a new daemon serves.
fn restart_under_a_read(setup: &Setup, out: &Path, sig: Signal, tag: &str, file: &str, want: &str) {
    let container = setup.container();
    let marker = format!("{file}#{tag}");
    let script = format!("{READ_ONCE}# {marker}");
    let exec_id = format!("read-{tag}");
    let mut exec = setup.containerd.ctr([
        "task",
        "exec",
        "--exec-id",
        &exec_id,
        &container,
        "python3",
        "-c",
        &script,
        file,
        tag,
    ]);
    exec.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut reader = ChildGuard::spawn(&mut exec).unwrap();
    let stdout = reader.child().stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = lines_tx.send(line.unwrap());
        }
    });
    wait_until(START_TIMEOUT, "the reader to start", || {
        out.join(format!("ready-{tag}")).exists()
    });

    let old = setup.daemon();
    signal(setup.snapshotter.id(), Signal::STOP);
    signal(old, sig);
    wait_until(DAEMON_TIMEOUT, "the daemon to end", || !is_running(old));
    std::fs::write(out.join(format!("go-{tag}")), "").unwrap();
    // Past `reading-TAG` the reader only opens and reads the file: asleep
    // there, it waits for the mount.
    wait_until(DAEMON_TIMEOUT, "the read to wait for a daemon", || {
        out.join(format!("reading-{tag}")).exists()
            && process_with(&marker).is_some_and(|pid| sleeps(pid, pid))
    });
    assert!(!is_running(old));
    assert!(
        lines.try_recv().is_err(),
        "the read finished with no daemon"
    );

    signal(setup.snapshotter.id(), Signal::CONT);
    let hash = lines
        .recv_timeout(START_TIMEOUT)
        .unwrap_or_else(|e| panic!("no answer to the waiting read ({e}); log:\n{}", setup.log()));
    assert_eq!(hash, want, "{file} read while no daemon ran");
    let status = reader.child().wait().unwrap();
    assert!(status.success(), "ctr task exec: {status}");
    let new = setup.daemon();
    assert_ne!(new, old);
    let log = setup.log();
    assert!(
        log.contains("restarted a mount daemon") && log.contains(&format!("old_pid={old}")),
        "{log}"
    );
}

#[test]
fn a_container_reading_its_lazy_image_sees_no_error_when_the_daemon_restarts() {
    let mut setup = Setup::pulled();
    let expected = setup.unpack_expected();
    let library = python_library(&expected);
    let looped = hashes(&expected, &library, "email", 20);
    let unread = hashes(&expected, &library, "xmlrpc", 3);
    assert_eq!((looped.len(), unread.len()), (20, 3), "{library}");
    let out = setup.scratch.dir("out");
    let container = &setup.container();
    let bind = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let files = serde_json::to_string(&looped).unwrap();
    setup.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        PLUGIN,
        "--mount",
        &bind,
        &setup.reference,
        container,
        "python3",
        "-c",
        READ_LOOP,
        &files,
    ]);
    let mut passes = loop_goes_on_without_error(&out, 0, 2);

    let unread: Vec<(String, String)> = unread.into_iter().collect();
    for (sig, (file, want)) in [Signal::KILL, Signal::TERM].into_iter().zip(&unread) {
        restart_under_a_read(&setup, &out, sig, &sig.as_raw().to_string(), file, want);
        passes = loop_goes_on_without_error(&out, passes, 2);
    }

    // A snapshotter killed and started again keeps the running daemon's
    // device again (the daemon hands it over once more), so the next
    // daemon death is harmless too.
    let adopted = |log: &str| log.matches("keeping the mount's device").count();
    let before = adopted(&setup.log());
    setup.restart_snapshotter();
    wait_until(
        START_TIMEOUT,
        "the new snapshotter to keep the device",
        || adopted(&setup.log()) > before,
    );
    let (file, want) = &unread[2];
    restart_under_a_read(&setup, &out, Signal::KILL, "adopted", file, want);
    loop_goes_on_without_error(&out, passes, 2);

    // Removing the container and the image unmounts the lazy mount; the
    // node daemon forgets it and keeps running.
    let daemon = setup.daemon();
    let lazy = setup.lazy_mount();
    setup.ctr(&["task", "kill", "-s", "SIGKILL", container]);
    wait_until(START_TIMEOUT, "the container to stop", || {
        setup
            .ctr(&["task", "ls"])
            .lines()
            .all(|l| !l.starts_with(container) || l.contains("STOPPED"))
    });
    setup.ctr(&["task", "rm", container]);
    setup.ctr(&["containers", "rm", container]);
    setup.ctr(&["images", "rm", "--sync", &setup.reference]);
    let node_socket = setup.root().join("daemon.sock");
    let gone = std::panic::catch_unwind(|| {
        wait_until(DAEMON_TIMEOUT, "the daemon to forget the mount", || {
            darter_daemon::api::node_status(&node_socket).is_ok_and(|s| s.mounts.is_empty())
        });
    });
    assert!(
        gone.is_ok(),
        "daemon {daemon} still serves {}; snapshotter log:\n{}\ncontainerd log:\n{}",
        lazy.display(),
        setup.log(),
        setup.containerd.log()
    );
    assert!(is_running(daemon), "the node daemon keeps running");
    assert_eq!(
        mounts_under(setup.dir.path()).unwrap(),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        mounts_under(setup.containerd.path()).unwrap(),
        Vec::<PathBuf>::new()
    );
    let log = setup.log();
    assert!(!log.contains("cannot restart"), "{log}");
}

/// Two images lazily mounted by the snapshotter share one node daemon;
/// SIGKILLed, it is replaced by ONE new daemon (the losses of both mounts
/// start one), which takes both mounts over: they read right again.
#[test]
fn one_new_node_daemon_takes_every_lazy_mount_of_a_killed_one_over() {
    let setup = Setup::pulled();
    let second = setup.reference.replace(":darter", ":darter-small-chunks");
    let source = registry_common::docker(&setup._registry.host(), "test/python:oci");
    setup
        .scratch
        .build(&source, &second, &["--chunk-size", "256K"]);
    setup.pull(&second);
    let mounts = mounts_under(&setup.root()).unwrap();
    assert_eq!(mounts.len(), 2, "two lazy mounts: {mounts:?}");
    let old = try_stats(&mounts[0]).unwrap().pid;
    assert_eq!(
        try_stats(&mounts[1]).unwrap().pid,
        old,
        "one daemon serves both"
    );

    let expected = setup.unpack_expected();
    let library = python_library(&expected);
    let files = hashes(&expected, &library, "json", 5);
    assert_eq!(files.len(), 5, "{library}");

    signal(old, Signal::KILL);
    wait_until(DAEMON_TIMEOUT, "the daemon to end", || !is_running(old));
    let mut new = 0;
    wait_until(START_TIMEOUT, "a new daemon to serve both mounts", || {
        let pids: Vec<Option<u32>> = mounts.iter().map(|m| try_stats(m).map(|c| c.pid)).collect();
        new = pids[0].unwrap_or(old);
        pids.iter().all(|p| p.is_some_and(|p| p != old && p == new))
    });
    for mount in &mounts {
        for (path, want) in &files {
            let bytes = std::fs::read(mount.join(path.trim_start_matches('/'))).unwrap();
            assert_eq!(
                &hex::encode(Sha256::digest(&bytes)),
                want,
                "{path} in {}",
                mount.display()
            );
        }
    }
    let daemons = snapshotter_common::node_daemons_under(setup.dir.path());
    assert_eq!(
        daemons.iter().map(|(pid, _)| *pid).collect::<Vec<_>>(),
        vec![new],
        "one new node daemon, not one per mount"
    );
    let log = setup.log();
    assert_eq!(
        log.matches("restarted a mount daemon").count(),
        2,
        "both mounts taken over:\n{log}"
    );
}
