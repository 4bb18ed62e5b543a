//! `darter snapshotter` as containerd's proxy snapshotter, all real: a
//! registry holding the Debian python3 image (plain OCI), the `darter`
//! binary serving the snapshots API, and a containerd (its own root, state
//! and socket) configured with `[proxy_plugins.darter]`. Images pulled
//! through it run; what containerd removes is deleted; a snapshotter killed
//! with SIGKILL comes back with every snapshot, and consistent.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::DARTER;
use darter_snapshotter::api::snapshots::v1::snapshots_client::SnapshotsClient;
use darter_snapshotter::api::snapshots::v1::{
    CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest,
};
use darter_testkit::containerd::Containerd;
use darter_testkit::process::{ChildGuard, mounts_under, run, wait_until};
use registry_common::registry_with_python;

/// The proxy plugin's name in containerd's config (`--snapshotter darter`).
const PLUGIN: &str = "darter";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `darter snapshotter` process on a socket and root in `dir`; killed on
/// drop.
struct Snapshotter {
    dir: PathBuf,
    process: ChildGuard,
}

impl Snapshotter {
    /// Starts it and waits until the socket answers. The socket and root
    /// are `dir/snapshotter.sock` and `dir/root`; it logs to
    /// `dir/snapshotter.log` (appending, across restarts).
    fn start(dir: &Path) -> Snapshotter {
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("snapshotter.log"))
            .unwrap();
        let mut cmd = Command::new(DARTER);
        cmd.args(["snapshotter", "--socket"])
            .arg(dir.join("snapshotter.sock"))
            .arg("--root")
            .arg(dir.join("root"))
            .env("DARTER_CONFIG", "/dev/null")
            // Every snapshot operation, without the gRPC stack's chatter.
            .env("DARTER_LOG", "info,darter_snapshotter=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut process = ChildGuard::spawn(&mut cmd).unwrap();
        let socket = dir.join("snapshotter.sock");
        wait_until(START_TIMEOUT, "darter snapshotter to serve", || {
            if let Some(status) = process.child().try_wait().unwrap() {
                panic!("darter snapshotter exited ({status}):\n{}", log_of(dir));
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        Snapshotter {
            dir: dir.to_path_buf(),
            process,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(self) {
        let Snapshotter { process, .. } = self;
        drop(process);
    }

    /// SIGTERM; returns its exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.process.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.process.child().wait().unwrap()
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("snapshotter.log")).unwrap_or_default()
}

/// The directories in `ROOT/snapshots`.
fn snapshot_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Client = SnapshotsClient<darter_snapshotter::tonic::transport::Channel>;

/// (key, kind, parent) of a snapshot, as the snapshotter lists it.
type Listed = (String, i32, String);

/// What the snapshotter itself lists (not containerd's view), sorted.
fn listed(socket: &Path) -> Vec<Listed> {
    runtime().block_on(async {
        let mut client = darter_snapshotter::connect(socket).await.unwrap();
        list(&mut client).await
    })
}

async fn list(client: &mut Client) -> Vec<Listed> {
    let mut stream = client
        .list(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(
            batch
                .info
                .into_iter()
                .map(|i: Info| (i.name, i.kind, i.parent)),
        );
    }
    out.sort();
    out
}

/// Asserts that `listed` is a forest of committed layers with active
/// snapshots on top, each parent present and committed.
#[track_caller]
fn assert_parents_committed(listed: &[Listed]) {
    let kinds: HashMap<&str, i32> = listed
        .iter()
        .map(|(k, kind, _)| (k.as_str(), *kind))
        .collect();
    for (key, _, parent) in listed {
        if !parent.is_empty() {
            assert_eq!(
                kinds.get(parent.as_str()),
                Some(&(Kind::Committed as i32)),
                "parent of {key}: {listed:?}"
            );
        }
    }
}

/// Asserts nothing is mounted below `dirs`, and the snapshotter's root
/// holds no snapshot, staged or trashed directory.
#[track_caller]
fn assert_all_gone(root: &Path, dirs: &[&Path]) {
    for sub in ["snapshots", "staging", "trash"] {
        let left: Vec<_> = std::fs::read_dir(root.join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    for dir in dirs {
        assert_eq!(mounts_under(dir).unwrap(), Vec::<PathBuf>::new());
    }
}

/// `ctr ARGS`, asserting success; its stdout.
fn ctr(containerd: &Containerd, args: &[&str]) -> String {
    String::from_utf8(run(&mut containerd.ctr(args)).stdout).unwrap()
}

/// Pulls `reference` into containerd through the snapshotter.
fn pull(containerd: &Containerd, reference: &str) {
    ctr(
        containerd,
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            PLUGIN,
            reference,
        ],
    );
}

/// Runs python3 from `reference` in a container (removed afterwards);
/// asserts it printed 42.
fn run_python(containerd: &Containerd, reference: &str, id: &str) {
    let out = ctr(
        containerd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            PLUGIN,
            reference,
            id,
            "python3",
            "-c",
            "print(6*7)",
        ],
    );
    assert_eq!(out, "42\n");
}

/// containerd's name (a chain id) of the image's top layer: the committed
/// snapshot that has a parent, as `ctr snapshots ls` shows it.
fn top_layer(containerd: &Containerd) -> String {
    let listing = ctr(containerd, &["snapshots", "--snapshotter", PLUGIN, "ls"]);
    let tops: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [key, parent, "Committed"] if parent.starts_with("sha256:") => Some(key),
                _ => None,
            },
        )
        .collect();
    assert_eq!(tops.len(), 1, "{listing}");
    tops[0].to_owned()
}

#[test]
fn python_image_pulled_through_darter_runs_and_removal_deletes_every_snapshot() {
    let (registry, _scratch, _source) = registry_with_python("test/python");
    let reference = format!("{}/test/python:oci", registry.host());
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = Snapshotter::start(dir.path());
    let containerd = Containerd::start(&[(PLUGIN, &snapshotter.socket())]).unwrap();

    pull(&containerd, &reference);
    let layers = listed(&snapshotter.socket());
    assert_eq!(layers.len(), 2, "two layers, one snapshot each: {layers:?}");
    assert!(
        layers
            .iter()
            .all(|(_, kind, _)| *kind == Kind::Committed as i32),
        "{layers:?}"
    );
    assert_parents_committed(&layers);
    assert_eq!(
        layers
            .iter()
            .filter(|(_, _, parent)| parent.is_empty())
            .count(),
        1
    );
    assert_eq!(snapshot_dirs(&snapshotter.root()).len(), 2);

    run_python(&containerd, &reference, "python-1");

    // A snapshot made and removed by hand through containerd.
    let top = top_layer(&containerd);
    ctr(
        &containerd,
        &[
            "snapshots",
            "--snapshotter",
            PLUGIN,
            "prepare",
            "by-hand",
            &top,
        ],
    );
    let with_active = listed(&snapshotter.socket());
    assert!(
        with_active
            .iter()
            .any(|(key, kind, _)| key.ends_with("/by-hand") && *kind == Kind::Active as i32),
        "{with_active:?}"
    );
    ctr(
        &containerd,
        &["snapshots", "--snapshotter", PLUGIN, "rm", "by-hand"],
    );

    // Removing the image and collecting garbage removes every snapshot:
    // the layers, the container's and the one made by hand.
    ctr(&containerd, &["images", "rm", "--sync", &reference]);
    assert_eq!(listed(&snapshotter.socket()), Vec::<Listed>::new());
    assert_all_gone(&snapshotter.root(), &[dir.path(), containerd.path()]);
    let log = log_of(dir.path());
    assert!(!log.contains("left for cleanup"), "{log}");
}

#[test]
fn a_snapshotter_killed_with_sigkill_comes_back_with_its_snapshots() {
    let (registry, _scratch, _source) = registry_with_python("test/python");
    let reference = format!("{}/test/python:oci", registry.host());
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = Snapshotter::start(dir.path());
    let socket = snapshotter.socket();
    let containerd = Containerd::start(&[(PLUGIN, &socket)]).unwrap();
    pull(&containerd, &reference);
    let before = listed(&socket);
    assert_eq!(before.len(), 2, "{before:?}");

    snapshotter.kill();
    assert!(socket.exists(), "SIGKILL leaves the socket file");
    let snapshotter = Snapshotter::start(dir.path());
    assert_eq!(listed(&socket), before);

    // containerd reconnects to the new process on its own (listing asks
    // the snapshotter for each snapshot's info).
    wait_until(
        START_TIMEOUT,
        "containerd to reach the restarted snapshotter",
        || {
            darter_testkit::process::try_run(&mut containerd.ctr([
                "snapshots",
                "--snapshotter",
                PLUGIN,
                "ls",
            ]))
            .is_ok()
        },
    );
    run_python(&containerd, &reference, "python-after-restart");

    let status = snapshotter.terminate();
    assert!(status.success(), "{status}: {}", log_of(dir.path()));
    assert!(!socket.exists(), "SIGTERM removes the socket");
}

/// Layers and containers created and removed by several clients at once,
/// until the snapshotter goes away.
async fn workload(socket: PathBuf, worker: usize, done: Arc<AtomicUsize>) {
    let Ok(mut client) = darter_snapshotter::connect(&socket).await else {
        return;
    };
    let mut parent = String::new();
    for round in 0.. {
        let name = format!("layer-{worker}-{round}");
        let key = format!("{worker}-{round}");
        let remove_container = round % 2 == 0;
        let finished = one_round(&mut client, &key, &parent, &name, remove_container, &done);
        if finished.await.is_err() {
            return;
        }
        parent = name;
    }
}

/// A layer `name` on `parent` (prepared, committed) and a container on it,
/// removed again if `remove_container`; each call that returned counted
/// in `done`.
async fn one_round(
    client: &mut Client,
    key: &str,
    parent: &str,
    name: &str,
    remove_container: bool,
    done: &AtomicUsize,
) -> Result<(), darter_snapshotter::tonic::Status> {
    let extract = format!("extract-{key}");
    let container = format!("container-{key}");
    client.prepare(prepare_request(&extract, parent)).await?;
    done.fetch_add(1, Ordering::SeqCst);
    let commit = CommitSnapshotRequest {
        name: name.to_owned(),
        key: extract,
        ..Default::default()
    };
    client.commit(commit).await?;
    done.fetch_add(1, Ordering::SeqCst);
    client.prepare(prepare_request(&container, name)).await?;
    done.fetch_add(1, Ordering::SeqCst);
    if remove_container {
        client.remove(remove_request(&container)).await?;
        done.fetch_add(1, Ordering::SeqCst);
    }
    Ok(())
}

fn prepare_request(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        key: key.to_owned(),
        parent: parent.to_owned(),
        ..Default::default()
    }
}

fn remove_request(key: &str) -> RemoveSnapshotRequest {
    RemoveSnapshotRequest {
        key: key.to_owned(),
        ..Default::default()
    }
}

/// The directories a mount uses: a bind mount's source, an overlay's
/// upper, work and lower directories.
fn mount_dirs(mount: &darter_snapshotter::api::types::Mount) -> Vec<&str> {
    if mount.r#type == "bind" {
        return vec![mount.source.as_str()];
    }
    mount
        .options
        .iter()
        .filter_map(|o| {
            ["upperdir=", "workdir=", "lowerdir="]
                .iter()
                .find_map(|prefix| o.strip_prefix(prefix))
        })
        .flat_map(|dirs| dirs.split(':'))
        .collect()
}

#[test]
fn a_snapshotter_killed_mid_workload_restarts_consistent() {
    const WORKERS: usize = 4;
    const OPERATIONS_BEFORE_KILL: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = Snapshotter::start(dir.path());
    let socket = snapshotter.socket();
    let root = snapshotter.root();
    let done = Arc::new(AtomicUsize::new(0));
    let runtime = runtime();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| runtime.spawn(workload(socket.clone(), w, Arc::clone(&done))))
        .collect();
    wait_until(START_TIMEOUT, "the workload to get going", || {
        done.load(Ordering::SeqCst) >= OPERATIONS_BEFORE_KILL
    });
    snapshotter.kill();
    runtime.block_on(async {
        for worker in workers {
            worker.await.unwrap();
        }
    });

    let _snapshotter = Snapshotter::start(dir.path());
    let after = listed(&socket);
    assert!(after.len() >= OPERATIONS_BEFORE_KILL / 4, "{after:?}");
    assert_parents_committed(&after);
    // Exactly one directory per snapshot: none lost, no orphan kept.
    assert_eq!(snapshot_dirs(&root).len(), after.len(), "{after:?}");

    runtime.block_on(async {
        let mut client = darter_snapshotter::connect(&socket).await.unwrap();
        for (key, kind, _) in &after {
            if *kind != Kind::Active as i32 {
                continue;
            }
            let mounts = client
                .mounts(MountsRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .mounts;
            for dir in mount_dirs(&mounts[0]) {
                assert!(Path::new(dir).is_dir(), "{key}: {dir}");
            }
        }
        // Everything can be removed, children first.
        let mut left = list(&mut client).await;
        while !left.is_empty() {
            for (key, _, _) in left
                .iter()
                .filter(|(k, _, _)| !left.iter().any(|(_, _, p)| p == k))
            {
                client.remove(remove_request(key)).await.unwrap();
            }
            left = list(&mut client).await;
        }
    });
    assert_all_gone(&root, &[dir.path()]);
}
