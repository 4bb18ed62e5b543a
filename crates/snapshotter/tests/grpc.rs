//! The snapshots API over a real unix socket, as containerd's proxy plugin
//! calls it: status codes, concurrency, listing, and the socket's life.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_snapshots::tonic::{Code, Status};
use darter_snapshotter::api::snapshots::v1::snapshots_client::SnapshotsClient;
use darter_snapshotter::api::snapshots::v1::{
    CommitSnapshotRequest, Kind, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use darter_snapshotter::{OverlaySnapshotter, ServeError, connect, serve};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Client = SnapshotsClient<containerd_snapshots::tonic::transport::Channel>;

/// A snapshotter served on a socket in a temp dir; stops on drop.
struct Served {
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Served {
    async fn start() -> Served {
        Served::start_in(tempfile::tempdir().unwrap()).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Served {
        let root = dir.path().join("root");
        let socket = dir.path().join("snapshotter.sock");
        let snapshotter = OverlaySnapshotter::open(&root).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(snapshotter, &socket, None, async {
                let _ = stopped.await;
            })
            .await
        });
        let served = Served {
            dir,
            stop: Some(stop),
            task: Some(task),
        };
        wait_for_socket(&served.socket()).await;
        served
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    async fn client(&self) -> Client {
        connect(&self.socket()).await.unwrap()
    }

    /// Stops serving and returns how serving ended.
    async fn stop(mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn wait_for_socket(socket: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(socket).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never served",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn prepare(client: &mut Client, key: &str, parent: &str) -> Result<(), Status> {
    client
        .prepare(PrepareSnapshotRequest {
            snapshotter: "darter".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        })
        .await
        .map(drop)
}

async fn commit(client: &mut Client, name: &str, key: &str) -> Result<(), Status> {
    client
        .commit(CommitSnapshotRequest {
            snapshotter: "darter".into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::from([("layer".to_owned(), name.to_owned())]),
        })
        .await
        .map(drop)
}

async fn list(client: &mut Client, filters: &[&str]) -> Vec<(String, i32, String)> {
    let mut stream = client
        .list(ListSnapshotsRequest {
            snapshotter: "darter".into(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(batch.info.into_iter().map(|i| (i.name, i.kind, i.parent)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_codes_containerd_maps() {
    let served = Served::start().await;
    let mut c = served.client().await;
    prepare(&mut c, "extract-1", "").await.unwrap();
    commit(&mut c, "layer-1", "extract-1").await.unwrap();
    prepare(&mut c, "container", "layer-1").await.unwrap();
    c.view(ViewSnapshotRequest {
        snapshotter: "darter".into(),
        key: "view".into(),
        parent: "layer-1".into(),
        labels: HashMap::new(),
    })
    .await
    .unwrap();

    let code = |r: Result<(), Status>| r.unwrap_err().code();
    assert_eq!(
        code(prepare(&mut c, "container", "").await),
        Code::AlreadyExists
    );
    assert_eq!(code(prepare(&mut c, "x", "missing").await), Code::NotFound);
    assert_eq!(
        code(prepare(&mut c, "x", "container").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(commit(&mut c, "layer-1", "container").await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(commit(&mut c, "n", "view").await),
        Code::FailedPrecondition
    );
    assert_eq!(code(commit(&mut c, "n", "missing").await), Code::NotFound);
    let mounts = |key: &str| MountsRequest {
        snapshotter: "darter".into(),
        key: key.into(),
    };
    assert_eq!(
        c.mounts(mounts("layer-1")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let remove = |key: &str| RemoveSnapshotRequest {
        snapshotter: "darter".into(),
        key: key.into(),
    };
    assert_eq!(
        c.remove(remove("layer-1")).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        c.remove(remove("missing")).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad_filter = c
        .list(ListSnapshotsRequest {
            snapshotter: "darter".into(),
            filters: vec!["kind~=act".into()],
        })
        .await;
    let status = match bad_filter {
        Ok(response) => response.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let stat = c
        .stat(StatSnapshotRequest {
            snapshotter: "darter".into(),
            key: "layer-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(stat.kind, Kind::Committed as i32);
    assert_eq!(stat.labels["layer"], "layer-1");
    let view_mounts = c.mounts(mounts("view")).await.unwrap().into_inner().mounts;
    assert_eq!(view_mounts[0].r#type, "bind");
    assert_eq!(view_mounts[0].options, ["ro", "rbind"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_of_one_key_one_wins_the_rest_already_exist() {
    const CLIENTS: usize = 16;
    let served = Served::start().await;
    let mut racers = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = served.client().await;
        racers.push(tokio::spawn(async move {
            prepare(&mut client, "same", "").await
        }));
    }
    let mut codes = Vec::new();
    for racer in racers {
        codes.push(racer.await.unwrap().map_err(|s| s.code()));
    }
    assert_eq!(codes.iter().filter(|c| c.is_ok()).count(), 1, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Ok(()) | Err(Code::AlreadyExists))),
        "{codes:?}"
    );
    assert_eq!(
        std::fs::read_dir(served.root().join("snapshots"))
            .unwrap()
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_everything_and_filters() {
    // More than one response message (containerd's wrapper sends batches of 100).
    const LAYERS: usize = 130;
    let served = Served::start().await;
    let mut c = served.client().await;
    let mut parent = String::new();
    for i in 0..LAYERS {
        let key = format!("extract-{i}");
        prepare(&mut c, &key, &parent).await.unwrap();
        parent = format!("layer-{i}");
        commit(&mut c, &parent, &key).await.unwrap();
    }
    prepare(&mut c, "container", &parent).await.unwrap();
    let all = list(&mut c, &[]).await;
    assert_eq!(all.len(), LAYERS + 1);
    let active = list(&mut c, &["kind==active"]).await;
    assert_eq!(
        active,
        [("container".into(), Kind::Active as i32, parent.clone())]
    );
    let some = list(&mut c, &["labels.layer==layer-3", "name==layer-7"]).await;
    let names: Vec<&str> = some.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["layer-3", "layer-7"]);
    let mounts = c
        .mounts(MountsRequest {
            snapshotter: "darter".into(),
            key: "container".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    assert_eq!(lowerdir.split(':').count(), LAYERS);
    let root = served.root();
    let nearest = format!("{}/snapshots/{LAYERS}/fs", root.display());
    assert!(lowerdir.starts_with(&nearest), "{lowerdir}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_replaces_a_stale_one_and_goes_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("snapshotter.sock");
    // What a killed snapshotter leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let served = Served::start_in(dir).await;
    let meta = std::fs::metadata(served.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A second snapshotter on the same socket is refused, and leaves it be.
    let other_root = tempfile::tempdir().unwrap();
    let second = serve(
        OverlaySnapshotter::open(other_root.path()).unwrap(),
        &served.socket(),
        None,
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(second, Err(ServeError::SocketInUse { .. })),
        "{second:?}"
    );
    let mut c = served.client().await;
    prepare(&mut c, "k", "").await.unwrap();

    // A second process on the same root is refused too.
    let locked = OverlaySnapshotter::open(&served.root()).unwrap_err();
    assert_eq!(locked.code(), Code::Unavailable, "{locked}");

    let socket = served.socket();
    served.stop().await.unwrap();
    assert!(!socket.exists());
}

/// The status socket under the root answers while the snapshots API is
/// served (nothing mounted lazily, nothing fallen back), only to root, and
/// is gone once serving stops.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_socket_answers_while_serving_and_goes_with_it() {
    let served = Served::start().await;
    let socket = darter_snapshotter::status_socket(&served.root());
    wait_for_socket(&socket).await;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let asked = socket.clone();
    let status = tokio::task::spawn_blocking(move || darter_snapshotter::query_status(&asked))
        .await
        .unwrap()
        .unwrap();
    assert!(status.lazy_mounts.is_empty(), "{status:?}");
    let reasons: Vec<&str> = status.fallbacks.keys().map(String::as_str).collect();
    assert_eq!(reasons, ["not-a-layer", "not-darter", "registry-error"]);
    assert!(status.fallbacks.values().all(|&n| n == 0), "{status:?}");
    served.stop().await.unwrap();
    assert!(!socket.exists(), "removed when serving stops");
}
