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
mod snapshotter_common;

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
use snapshotter_common::{DarterRegistry, UnmountUnder};

/// The proxy plugin's name in containerd's config (`--snapshotter darter`).
const PLUGIN: &str = "darter";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `darter snapshotter` process on a socket and root in `dir`; killed on
/// drop.
struct Snapshotter {
    dir: PathBuf,
    process: ChildGuard,
    /// The node daemon it started, killed after it.
    _node_daemon: snapshotter_common::NodeDaemonsUnder,
}

impl Snapshotter {
    /// Starts it and waits until the socket answers. The socket and root
    /// are `dir/snapshotter.sock` and `dir/root`; it logs to
    /// `dir/snapshotter.log` (appending, across restarts).
    fn start(dir: &Path) -> Snapshotter {
        Snapshotter::start_with_config(dir, Path::new("/dev/null"))
    }

    /// [`Snapshotter::start`] with the darter config file `config` (the
    /// lazy mounts it makes get it too).
    fn start_with_config(dir: &Path, config: &Path) -> Snapshotter {
        Snapshotter::start_with(dir, config, &[])
    }

    /// [`Snapshotter::start_with_config`], with more arguments.
    fn start_with(dir: &Path, config: &Path, args: &[String]) -> Snapshotter {
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
            .args(args)
            .env("DARTER_CONFIG", config)
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
            _node_daemon: snapshotter_common::NodeDaemonsUnder(Some(dir.join("root"))),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// SIGKILL, and wait until it is gone (its node daemon stays).
    fn kill(self) {
        let Snapshotter {
            process,
            mut _node_daemon,
            ..
        } = self;
        drop(process);
        _node_daemon.0 = None;
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

/// What the snapshotter at `socket` lists, asserted to be `count`
/// committed layers, each on a committed parent.
#[track_caller]
fn committed_layers(socket: &Path, count: usize) -> Vec<Listed> {
    let layers = listed(socket);
    assert_eq!(layers.len(), count, "{layers:?}");
    assert!(
        layers
            .iter()
            .all(|(_, kind, _)| *kind == Kind::Committed as i32),
        "{layers:?}"
    );
    assert_parents_committed(&layers);
    layers
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
    // Two layers, one snapshot each.
    let layers = committed_layers(&snapshotter.socket(), 2);
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

/// A Darter image in a registry, pulled with `darter pull` into a
/// containerd whose `darter` snapshotter mounts it lazily. Declared in
/// this order, they are dropped so that containers go first, then the lazy
/// mounts (and the node daemon), then the snapshotter and its directory.
struct LazySetup {
    containerd: Containerd,
    _lazy_mounts: UnmountUnder,
    snapshotter: Option<Snapshotter>,
    dir: tempfile::TempDir,
    scratch: registry_common::Scratch,
    _registry: darter_testkit::registry::TestRegistry,
    /// `HOST/test/python:darter`, as containerd names the image.
    reference: String,
    /// The plain OCI image it was converted from.
    plain: String,
}

/// How [`LazySetup`] starts its snapshotter.
#[derive(Debug, Default)]
struct SnapshotterOptions {
    /// Serve Prometheus metrics on this port of 127.0.0.1.
    metrics_port: Option<u16>,
    /// Plain HTTP to the registry only through the global `--plain-http`,
    /// not through the config file.
    plain_http_flag_only: bool,
}

impl LazySetup {
    /// Converts the python image to a Darter image in the registry, starts
    /// the snapshotter and containerd, and pulls the image with `darter pull`.
    fn pulled() -> LazySetup {
        LazySetup::pulled_with(&SnapshotterOptions::default())
    }

    /// [`LazySetup::pulled`], the snapshotter started with `options`.
    fn pulled_with(options: &SnapshotterOptions) -> LazySetup {
        let DarterRegistry {
            registry,
            scratch,
            reference,
            config,
        } = DarterRegistry::start();
        let host = registry.host();

        let mut args = Vec::new();
        let mut snapshotter_config = config;
        if let Some(port) = options.metrics_port {
            args.extend(["--metrics".to_owned(), format!("127.0.0.1:{port}")]);
        }
        if options.plain_http_flag_only {
            snapshotter_config = scratch.path("config-without-plain-http.toml");
            let cache = format!("[mount]\ncache = {:?}\n", scratch.path("cache"));
            std::fs::write(&snapshotter_config, cache).unwrap();
            args.push("--plain-http".to_owned());
        }
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = Snapshotter::start_with(dir.path(), &snapshotter_config, &args);
        let lazy_mounts = UnmountUnder(dir.path().to_path_buf());
        let containerd = Containerd::start(&[(PLUGIN, &snapshotter.socket())]).unwrap();
        let setup = LazySetup {
            containerd,
            _lazy_mounts: lazy_mounts,
            snapshotter: Some(snapshotter),
            dir,
            scratch,
            _registry: registry,
            reference,
            plain: format!("{host}/test/python:oci"),
        };
        setup.darter_pull(&setup.reference).ok();
        setup
    }

    fn darter_pull(&self, reference: &str) -> common::Outcome {
        let socket = self.containerd.socket().as_os_str().to_owned();
        self.scratch.darter([
            "pull".as_ref(),
            reference.as_ref(),
            "--address".as_ref(),
            socket.as_os_str(),
            "--namespace".as_ref(),
            darter_testkit::containerd::NAMESPACE.as_ref(),
        ] as [&std::ffi::OsStr; 6])
    }

    fn snapshotter(&self) -> &Snapshotter {
        self.snapshotter.as_ref().unwrap()
    }

    /// `darter status --json` of the snapshotter.
    fn status(&self) -> darter_snapshotter::NodeStatus {
        snapshotter_common::snapshotter_status(&self.snapshotter().root())
    }

    /// The one lazy mount below the snapshotter's root.
    fn lazy_mount(&self) -> PathBuf {
        let mounts = mounts_under(&self.snapshotter().root()).unwrap();
        let [mount] = &mounts[..] else {
            panic!("one lazy mount expected: {mounts:?}");
        };
        mount.clone()
    }
}

#[test]
fn a_darter_image_runs_from_a_lazy_mount_and_removal_unmounts_it() {
    let setup = LazySetup::pulled();
    let socket = setup.snapshotter().socket();

    // Every layer committed by the snapshotter itself, none downloaded:
    // two blob layers (empty) and the bootstrap (the lazy mount).
    committed_layers(&socket, 3);
    let lazy = setup.lazy_mount();
    let at_pull = mount_common::try_stats(&lazy).expect("the lazy mount serves");

    run_python(&setup.containerd, &setup.reference, "lazy-1");
    let after_run = mount_common::try_stats(&lazy).unwrap();
    assert_eq!(after_run.pid, at_pull.pid);
    assert!(
        after_run.backend_bytes > at_pull.backend_bytes
            && after_run.backend_bytes < after_run.image_bytes / 10,
        "running python fetches part of the image: {after_run:?}"
    );

    ctr(
        &setup.containerd,
        &["images", "rm", "--sync", &setup.reference],
    );
    assert_eq!(listed(&socket), Vec::<Listed>::new());
    let node = darter_daemon::api::node_status(&setup.snapshotter().root().join("daemon.sock"))
        .expect("the node daemon keeps running");
    assert_eq!(node.pid, after_run.pid);
    assert!(
        node.mounts.is_empty(),
        "the node daemon forgot the mount: {node:?}"
    );
    assert_all_gone(
        &setup.snapshotter().root(),
        &[setup.dir.path(), setup.containerd.path()],
    );
}

/// `GET PATH` of 127.0.0.1:`port`: the body of a 200 answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

#[test]
fn a_plain_image_is_pulled_in_full_by_darter_pull_and_counted_as_a_fallback() {
    let port = darter_testkit::process::free_port();
    let setup = LazySetup::pulled_with(&SnapshotterOptions {
        metrics_port: Some(port),
        ..SnapshotterOptions::default()
    });
    let socket = setup.snapshotter().socket();
    let before = setup.status();
    let daemon = mount_common::try_stats(&setup.lazy_mount()).unwrap().pid;
    let [mount] = &before.lazy_mounts[..] else {
        panic!("one lazy mount: {before:?}");
    };
    assert_eq!(mount.daemon.map(|d| d.pid), Some(daemon), "{before:?}");
    assert_eq!(mount.mountpoint, setup.lazy_mount());
    assert!(before.fallbacks.values().all(|&n| n == 0), "{before:?}");

    setup.darter_pull(&setup.plain).ok().mentions(&[
        "not a Darter image: pulling in full",
        "2 layers, all downloaded and unpacked",
    ]);
    // Its two layers unpacked, beside the Darter image's three.
    committed_layers(&socket, 5);
    // Counted once, in `darter status` and in the metrics, and logged.
    let after = setup.status();
    assert_eq!(after.fallbacks["not-darter"], 1, "{after:?}");
    assert_eq!(after.fallbacks.values().sum::<u64>(), 1, "{after:?}");
    let images = |s: &darter_snapshotter::NodeStatus| -> Vec<String> {
        s.lazy_mounts.iter().map(|m| m.image.clone()).collect()
    };
    assert_eq!(
        images(&after),
        images(&before),
        "the plain image is not lazy"
    );
    let metrics = http_get(port, "/metrics");
    for line in [
        "darter_lazy_mounts 1\n",
        "darter_lazy_fallbacks_total{reason=\"not-darter\"} 1\n",
        "darter_lazy_fallbacks_total{reason=\"registry-error\"} 0\n",
        &format!("pid=\"{daemon}\"}}"),
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let log = log_of(setup.dir.path());
    assert!(
        log.contains("WARN") && log.contains("the client pulls this image in full"),
        "{log}"
    );
    let text = common::darter([
        "status".as_ref(),
        "--socket".as_ref(),
        darter_snapshotter::status_socket(&setup.snapshotter().root()).as_os_str(),
    ] as [&std::ffi::OsStr; 3])
    .ok();
    text.mentions(&[
        "lazy mounts      1",
        "pulled in full   1",
        "not-darter     1",
    ]);
    // Pulled again, nothing is unpacked, and nothing more counted.
    setup.darter_pull(&setup.plain).ok();
    assert_eq!(setup.status().fallbacks["not-darter"], 1);
    run_python(&setup.containerd, &setup.plain, "plain-1");

    ctr(&setup.containerd, &["images", "rm", "--sync", &setup.plain]);
    committed_layers(&socket, 3);
    run_python(&setup.containerd, &setup.reference, "lazy-beside-plain");
}

#[test]
fn a_restarted_snapshotter_mounts_its_remote_layers_again() {
    let mut setup = LazySetup::pulled();
    let lazy = setup.lazy_mount();
    let before = listed(&setup.snapshotter().socket());

    let daemon = mount_common::try_stats(&lazy).unwrap().pid;

    // The snapshotter, the node daemon and the mount all gone, as after a
    // reboot.
    setup.snapshotter.take().unwrap().kill();
    let pid = rustix::process::Pid::from_raw(daemon as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    drop(darter_testkit::process::MountGuard::new(&lazy));
    wait_until(START_TIMEOUT, "the lazy mount and its daemon to go", || {
        mounts_under(&lazy).unwrap().is_empty() && !darter_testkit::containerd::is_running(daemon)
    });

    let config = setup.scratch.path("config.toml");
    setup.snapshotter = Some(Snapshotter::start_with_config(setup.dir.path(), &config));
    assert_eq!(listed(&setup.snapshotter().socket()), before);
    let again = mount_common::try_stats(&lazy).expect("mounted again before serving");
    assert_ne!(again.pid, daemon);
    wait_until(
        START_TIMEOUT,
        "containerd to reach the restarted snapshotter",
        || {
            darter_testkit::process::try_run(&mut setup.containerd.ctr([
                "snapshots",
                "--snapshotter",
                PLUGIN,
                "ls",
            ]))
            .is_ok()
        },
    );
    run_python(&setup.containerd, &setup.reference, "lazy-after-restart");
}

/// The bug: `darter snapshotter --plain-http` read manifests over HTTPS
/// (only the config file's `plain_http` applied to its own reads), so it
/// could not tell a Darter image from an unreadable one and fell back.
#[test]
fn regression_the_snapshotter_ignored_plain_http_for_its_own_registry_reads() {
    let setup = LazySetup::pulled_with(&SnapshotterOptions {
        plain_http_flag_only: true,
        ..SnapshotterOptions::default()
    });
    committed_layers(&setup.snapshotter().socket(), 3);
    mount_common::try_stats(&setup.lazy_mount()).expect("served lazily");
    let status = setup.status();
    assert_eq!(status.fallbacks["registry-error"], 0, "{status:?}");
    run_python(&setup.containerd, &setup.reference, "plain-http-flag");
}
