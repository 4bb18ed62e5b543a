use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use darter_testkit::process::MountGuard;
use rustix::mount::{MountFlags, MountPropagationFlags};

use super::*;

fn open() -> (tempfile::TempDir, Snapshots) {
    let root = tempfile::tempdir().unwrap();
    let snapshots = Snapshots::open(root.path()).unwrap();
    (root, snapshots)
}

/// Performs `mounts` at `target` as containerd would; unmounted on drop.
fn mount(mounts: &[Mount], target: &Path) -> MountGuard {
    let [m] = mounts else {
        panic!("expected one mount: {mounts:?}")
    };
    fs::create_dir_all(target).unwrap();
    match m.r#type.as_str() {
        "bind" => {
            rustix::mount::mount_bind_recursive(Path::new(&m.source), target).unwrap();
            if m.options.iter().any(|o| o == "ro") {
                let flags = MountFlags::BIND | MountFlags::RDONLY;
                rustix::mount::mount_remount(target, flags, "").unwrap();
            }
        }
        "overlay" => {
            let options = std::ffi::CString::new(m.options.join(",")).unwrap();
            let data = Some(options.as_c_str());
            rustix::mount::mount("overlay", target, "overlay", MountFlags::empty(), data).unwrap();
        }
        other => panic!("unexpected mount type {other}"),
    }
    // Keep the mount out of other tests' way: no propagation.
    rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE).unwrap();
    MountGuard::new(target)
}

/// Commits `files` as snapshot `name` on `parent`, written through the
/// mounts of an active snapshot, as containerd's unpacker does.
fn layer(s: &Snapshots, work: &Path, name: &str, parent: &str, files: &[(&str, &str)]) {
    let key = format!("extract-{name}");
    let mounts = s
        .prepare(Kind::Active, &key, parent, Labels::new())
        .unwrap();
    {
        let target = work.join(&key);
        let _mounted = mount(&mounts, &target);
        for (path, content) in files {
            fs::write(target.join(path), content).unwrap();
        }
    }
    s.commit(name, &key, Labels::new()).unwrap();
}

fn snapshot_dirs(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn keys(s: &Snapshots) -> Vec<(String, Kind, Option<String>)> {
    s.list(&[])
        .unwrap()
        .into_iter()
        .map(|s| (s.key, s.record.kind, s.record.parent))
        .collect()
}

#[test]
fn layers_stack_through_real_overlay_mounts() {
    let (root, s) = open();
    let work = tempfile::tempdir().unwrap();
    layer(&s, work.path(), "base", "", &[("a", "base"), ("b", "base")]);
    layer(
        &s,
        work.path(),
        "top",
        "base",
        &[("b", "top"), ("c", "top")],
    );

    let mounts = s
        .prepare(Kind::Active, "container", "top", Labels::new())
        .unwrap();
    let rootfs = work.path().join("rootfs");
    {
        let _mounted = mount(&mounts, &rootfs);
        let read = |p: &str| fs::read_to_string(rootfs.join(p)).unwrap();
        assert_eq!(
            (read("a"), read("b"), read("c")),
            ("base".into(), "top".into(), "top".into())
        );
        fs::write(rootfs.join("d"), "container").unwrap();
        fs::remove_file(rootfs.join("a")).unwrap();
    }
    // The container's changes went to its own directory only.
    let base_fs = PathBuf::from(
        &s.prepare(Kind::View, "v-base", "base", Labels::new())
            .unwrap()[0]
            .source,
    );
    assert_eq!(fs::read_to_string(base_fs.join("a")).unwrap(), "base");

    let view_mounts = s
        .prepare(Kind::View, "v-top", "top", Labels::new())
        .unwrap();
    assert_eq!(view_mounts[0].r#type, "overlay");
    let view = work.path().join("view");
    let _mounted = mount(&view_mounts, &view);
    assert_eq!(fs::read_to_string(view.join("b")).unwrap(), "top");
    assert!(!view.join("d").exists());
    assert_eq!(
        fs::write(view.join("e"), "x").unwrap_err().raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    assert_eq!(snapshot_dirs(root.path()).len(), 5);
}

#[test]
fn mounts_are_those_prepare_returned_and_only_for_uncommitted() {
    let (_root, s) = open();
    let work = tempfile::tempdir().unwrap();
    layer(&s, work.path(), "base", "", &[("a", "1")]);
    let prepared = s.prepare(Kind::Active, "c", "base", Labels::new()).unwrap();
    assert_eq!(s.mounts("c").unwrap(), prepared);
    let err = s.mounts("base").unwrap_err();
    assert!(matches!(err, Error::NotMountable { .. }), "{err}");
    assert!(matches!(s.mounts("nope"), Err(Error::NotFound { .. })));
}

#[test]
fn remove_deletes_the_directory_and_refuses_parents() {
    let (root, s) = open();
    let work = tempfile::tempdir().unwrap();
    layer(&s, work.path(), "base", "", &[("a", "1")]);
    s.prepare(Kind::Active, "c", "base", Labels::new()).unwrap();
    assert_eq!(snapshot_dirs(root.path()), ["1", "2"]);
    assert!(matches!(s.remove("base"), Err(Error::HasChildren { .. })));
    assert_eq!(snapshot_dirs(root.path()), ["1", "2"]);
    s.remove("c").unwrap();
    s.remove("base").unwrap();
    assert!(snapshot_dirs(root.path()).is_empty());
    assert!(keys(&s).is_empty());
    assert_eq!(fs::read_dir(root.path().join("trash")).unwrap().count(), 0);
}

#[test]
fn usage_is_measured_live_for_active_and_at_commit_for_committed() {
    let (root, s) = open();
    let mounts = s.prepare(Kind::Active, "k", "", Labels::new()).unwrap();
    let fs_dir = PathBuf::from(&mounts[0].source);
    let empty = s.usage("k").unwrap();
    assert_eq!(empty.inodes, 1);
    fs::write(fs_dir.join("f"), vec![7u8; 64 << 10]).unwrap();
    let written = s.usage("k").unwrap();
    assert_eq!(written.inodes, 2);
    assert!(written.size >= empty.size + (64 << 10), "{written:?}");
    s.commit("n", "k", Labels::new()).unwrap();
    assert_eq!(s.usage("n").unwrap(), written);
    // Committed usage is the recorded one, not measured again.
    fs::write(root.path().join("snapshots/1/fs/g"), b"late").unwrap();
    assert_eq!(s.usage("n").unwrap(), written);
}

#[test]
fn update_changes_labels_as_containerd_does() {
    let (_root, s) = open();
    let start = Labels::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
    s.prepare(Kind::Active, "k", "", start).unwrap();
    let given = |pairs: &[(&str, &str)]| Info {
        name: "k".into(),
        labels: pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Info::default()
    };
    let labels = |s: &Snapshots| -> Vec<(String, String)> {
        s.stat("k").unwrap().record.labels.into_iter().collect()
    };
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());

    s.update(&given(&[("b", "3"), ("c", "4")]), &["labels.b".into()])
        .unwrap();
    assert_eq!(labels(&s), [pair("a", "1"), pair("b", "3")]);
    s.update(&given(&[]), &["labels.a".into()]).unwrap();
    assert_eq!(labels(&s), [pair("b", "3")]);
    s.update(&given(&[("x", "y")]), &["labels".into()]).unwrap();
    assert_eq!(labels(&s), [pair("x", "y")]);
    s.update(&given(&[("z", "1")]), &[]).unwrap();
    assert_eq!(labels(&s), [pair("z", "1")]);

    let before = s.stat("k").unwrap();
    let err = s.update(&given(&[]), &["parent".into()]).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert_eq!(s.stat("k").unwrap(), before);
    let huge = "v".repeat(MAX_LABEL_BYTES);
    let err = s.update(&given(&[("k", &huge)]), &[]).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let missing = Info {
        name: "nope".into(),
        ..Info::default()
    };
    assert!(matches!(
        s.update(&missing, &[]),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn empty_names_are_invalid() {
    let (_root, s) = open();
    let err = s.prepare(Kind::Active, "", "", Labels::new()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    s.prepare(Kind::Active, "k", "", Labels::new()).unwrap();
    let err = s.commit("", "k", Labels::new()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// What a process killed at any point of Prepare, Commit or Remove leaves:
/// a staged directory, a placed directory whose record never committed,
/// a forgotten record whose directory remains, a half-emptied trash.
#[test]
fn reopening_after_a_crash_keeps_records_and_deletes_orphans() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let before = {
        let s = Snapshots::open(root.path()).unwrap();
        layer(&s, work.path(), "base", "", &[("a", "1")]);
        s.prepare(Kind::Active, "c", "base", Labels::new()).unwrap();
        keys(&s)
    };
    let r = root.path();
    fs::create_dir_all(r.join("staging/new-crashed/fs")).unwrap();
    fs::create_dir_all(r.join("snapshots/3/fs/etc")).unwrap(); // placed, never recorded
    fs::create_dir_all(r.join("snapshots/40/work")).unwrap(); // forgotten, not deleted
    fs::create_dir_all(r.join("trash/17/fs/usr")).unwrap();

    let s = Snapshots::open(root.path()).unwrap();
    assert_eq!(keys(&s), before);
    assert_eq!(snapshot_dirs(root.path()), ["1", "2"]);
    for dir in ["staging", "trash"] {
        assert_eq!(fs::read_dir(r.join(dir)).unwrap().count(), 0, "{dir}");
    }
    // And it goes on working: the next id is past every id ever handed out.
    let c2 = s
        .prepare(Kind::Active, "c2", "base", Labels::new())
        .unwrap();
    assert!(
        c2[0].options.iter().any(|o| o.contains("/snapshots/3/fs")),
        "{c2:?}"
    );
    assert_eq!(fs::read_to_string(r.join("snapshots/1/fs/a")).unwrap(), "1");
}

#[test]
fn cleanup_sweeps_orphans_while_serving() {
    let (root, s) = open();
    s.prepare(Kind::Active, "k", "", Labels::new()).unwrap();
    fs::create_dir_all(root.path().join("snapshots/99/fs")).unwrap();
    s.cleanup().unwrap();
    assert_eq!(snapshot_dirs(root.path()), ["1"]);
}

#[test]
fn concurrent_prepares_of_one_key_have_one_winner() {
    const RACERS: usize = 8;
    let (root, s) = open();
    let s = Arc::new(s);
    let barrier = Arc::new(Barrier::new(RACERS));
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let (s, barrier) = (Arc::clone(&s), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                s.prepare(Kind::Active, "same", "", Labels::new())
            })
        })
        .collect();
    let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for result in &results {
        if let Err(err) = result {
            assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
        }
    }
    assert_eq!(snapshot_dirs(root.path()).len(), 1);
    assert_eq!(
        fs::read_dir(root.path().join("staging")).unwrap().count(),
        0
    );
}

#[test]
fn concurrent_commit_and_remove_of_one_key_leave_one_consistent_outcome() {
    for round in 0..20 {
        let (root, s) = open();
        let s = Arc::new(s);
        let mounts = s.prepare(Kind::Active, "k", "", Labels::new()).unwrap();
        for i in 0..50 {
            fs::write(Path::new(&mounts[0].source).join(i.to_string()), b"x").unwrap();
        }
        let barrier = Arc::new(Barrier::new(2));
        let committer = {
            let (s, barrier) = (Arc::clone(&s), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                s.commit("n", "k", Labels::new())
            })
        };
        barrier.wait();
        let removed = s.remove("k");
        let committed = committer.join().unwrap();
        match (&committed, &removed) {
            (Ok(()), Err(Error::NotFound { .. })) => {
                assert_eq!(keys(&s), [("n".to_owned(), Kind::Committed, None)]);
                assert_eq!(snapshot_dirs(root.path()), ["1"]);
            }
            (Err(Error::NotFound { .. }), Ok(())) => {
                assert!(keys(&s).is_empty());
                assert!(snapshot_dirs(root.path()).is_empty());
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
}

#[test]
fn something_mounted_in_the_trash_neither_stops_opening_nor_gets_deleted() {
    let root = tempfile::tempdir().unwrap();
    drop(Snapshots::open(root.path()).unwrap());
    let mounted = root.path().join("trash/5/fs");
    fs::create_dir_all(&mounted).unwrap();
    let source = tempfile::tempdir().unwrap();
    fs::write(source.path().join("precious"), b"keep").unwrap();
    rustix::mount::mount_bind(source.path(), &mounted).unwrap();
    let unmount = MountGuard::new(&mounted);

    let s = Snapshots::open(root.path()).unwrap();
    assert_eq!(fs::read(source.path().join("precious")).unwrap(), b"keep");
    assert!(matches!(s.cleanup(), Err(Error::MountedBelow { .. })));
    drop(unmount);
    s.cleanup().unwrap();
    assert_eq!(fs::read_dir(root.path().join("trash")).unwrap().count(), 0);
    assert_eq!(fs::read(source.path().join("precious")).unwrap(), b"keep");
}

/// Lazy mounts made with bind mounts of one directory: real mounts, at the
/// places the snapshotter asks for, for an image whose layers are
/// `diff_ids` (`None`: not a Darter image).
#[derive(Debug)]
struct BindMounts {
    tree: tempfile::TempDir,
    diff_ids: Option<Vec<String>>,
    /// How often the image's layers were read.
    reads: std::sync::atomic::AtomicUsize,
}

impl BindMounts {
    fn new(diff_ids: Option<&[&str]>) -> Arc<BindMounts> {
        let tree = tempfile::tempdir().unwrap();
        fs::write(tree.path().join("from-the-image"), b"lazy").unwrap();
        Arc::new(BindMounts {
            tree,
            diff_ids: diff_ids.map(|ids| ids.iter().map(|&id| id.to_owned()).collect()),
            reads: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

impl LazyMounts for BindMounts {
    fn image_layers(&self, image: &str) -> Result<ImageLayers, remote::LazyError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if image == UNREADABLE_IMAGE {
            return Err(format!("{image}: connection refused").into());
        }
        Ok(match &self.diff_ids {
            Some(diff_ids) => ImageLayers {
                is_darter: true,
                diff_ids: diff_ids.clone(),
            },
            None => ImageLayers {
                is_darter: false,
                diff_ids: vec!["sha256:plain1".into(), "sha256:plain2".into()],
            },
        })
    }

    fn mount_stats(&self, mountpoint: &Path) -> Option<remote::MountStats> {
        self.is_served(mountpoint).then_some(remote::MountStats {
            pid: std::process::id(),
            backend_bytes: 7,
            backend_requests: 1,
        })
    }

    fn mount(&self, _image: &str, mountpoint: &Path) -> Result<(), remote::LazyError> {
        Ok(rustix::mount::mount_bind(self.tree.path(), mountpoint)?)
    }

    fn is_served(&self, mountpoint: &Path) -> bool {
        mountpoint.join("from-the-image").exists()
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), remote::LazyError> {
        Ok(rustix::mount::unmount(
            mountpoint,
            rustix::mount::UnmountFlags::empty(),
        )?)
    }
}

const IMAGE: &str = "127.0.0.1:5000/app@sha256:feed";
/// An image [`BindMounts`] cannot read.
const UNREADABLE_IMAGE: &str = "127.0.0.1:1/gone:latest";

fn remote_labels(target: &str) -> Labels {
    Labels::from([
        (remote::LABEL_TARGET.to_owned(), target.to_owned()),
        (remote::LABEL_IMAGE_REF.to_owned(), IMAGE.to_owned()),
    ])
}

/// Prepares every layer of `chain` as `darter pull` does; asserts each
/// is answered AlreadyExists.
fn prepare_remote_chain(s: &Snapshots, chain: &[String]) {
    for (i, target) in chain.iter().enumerate() {
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        let key = format!("extract-{i} {target}");
        let err = s
            .prepare(Kind::Active, &key, parent, remote_labels(target))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    }
}

/// Unmounts whatever is left below `root` when a test fails.
struct UnmountBelow(PathBuf);

impl Drop for UnmountBelow {
    fn drop(&mut self) {
        for mount in darter_testkit::process::mounts_under(&self.0).unwrap_or_default() {
            drop(MountGuard::new(mount));
        }
    }
}

#[test]
fn a_darter_image_is_committed_remotely_with_its_top_layer_mounted() {
    let diff_ids = ["sha256:b1", "sha256:b2", "sha256:boot"];
    let lazy = BindMounts::new(Some(&diff_ids));
    let root = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(root.path().to_path_buf());
    let s = Snapshots::open_with(root.path(), Some(lazy)).unwrap();
    let chain = remote::chain_ids(&diff_ids.map(str::to_owned));
    prepare_remote_chain(&s, &chain);

    let listed = keys(&s);
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (i, target) in chain.iter().enumerate() {
        let snapshot = s.stat(target).unwrap();
        assert_eq!(snapshot.record.kind, Kind::Committed);
        assert_eq!(snapshot.record.labels, remote_labels(target));
        let expected_parent = (i > 0).then(|| chain[i - 1].clone());
        assert_eq!(snapshot.record.parent, expected_parent);
        let fs_dir = root
            .path()
            .join(format!("snapshots/{}/fs", snapshot.record.id));
        match (&snapshot.record.layer, i == 2) {
            (Layer::Remote { image, mountpoint }, true) => {
                assert_eq!((image.as_str(), mountpoint), (IMAGE, &fs_dir));
                assert_eq!(fs::read(fs_dir.join("from-the-image")).unwrap(), b"lazy");
            }
            (Layer::Directory, false) => {
                assert_eq!(
                    fs::read_dir(&fs_dir).unwrap().count(),
                    0,
                    "blob layers are empty"
                );
            }
            (layer, _) => panic!("layer {i}: {layer:?}"),
        }
    }
    // Preparing it again (another namespace) finds it there.
    prepare_remote_chain(&s, &chain);
    assert_eq!(keys(&s), listed);

    // A container on top sees the lazy mount through overlayfs.
    let mounts = s
        .prepare(Kind::Active, "container", &chain[2], Labels::new())
        .unwrap();
    let top_fs = s.stat(&chain[2]).unwrap().record.id;
    assert!(
        mounts[0]
            .options
            .iter()
            .any(|o| o.starts_with(&format!("lowerdir={}", s.layout.fs_dir(top_fs).display()))),
        "{mounts:?}"
    );

    // Removing the top layer unmounts it and deletes its directory.
    s.remove("container").unwrap();
    let top = s.stat(&chain[2]).unwrap();
    s.remove(&chain[2]).unwrap();
    assert!(!s.layout.snapshot_dir(top.record.id).exists());
    assert!(
        darter_testkit::process::mounts_under(root.path())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn layers_of_other_images_are_prepared_for_unpacking() {
    let root = tempfile::tempdir().unwrap();
    // Not a Darter image.
    let s = Snapshots::open_with(root.path(), Some(BindMounts::new(None))).unwrap();
    let mounts = s
        .prepare(Kind::Active, "extract-0", "", remote_labels("sha256:x"))
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    drop(s);
    // A Darter image, but not one of its layers.
    let s = Snapshots::open_with(root.path(), Some(BindMounts::new(Some(&["sha256:a"])))).unwrap();
    s.prepare(Kind::Active, "extract-1", "", remote_labels("sha256:x"))
        .unwrap();
    // An image it cannot read: maybe a plain one only containerd can reach.
    let mut labels = remote_labels("sha256:a");
    labels.insert(
        remote::LABEL_IMAGE_REF.to_owned(),
        UNREADABLE_IMAGE.to_owned(),
    );
    s.prepare(Kind::Active, "extract-2", "", labels).unwrap();
    assert_eq!(keys(&s).len(), 3);
    assert!(keys(&s).iter().all(|(_, kind, _)| *kind == Kind::Active));
}

#[test]
fn reopening_mounts_remote_layers_again_and_unmounts_forgotten_ones() {
    let diff_ids = ["sha256:only"];
    let lazy = BindMounts::new(Some(&diff_ids));
    let root = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(root.path().to_path_buf());
    let top_fs = {
        let s = Snapshots::open_with(root.path(), Some(lazy.clone())).unwrap();
        prepare_remote_chain(&s, &remote::chain_ids(&diff_ids.map(str::to_owned)));
        s.layout.fs_dir(s.stat("sha256:only").unwrap().record.id)
    };
    // As after a reboot: the mount is gone. And a mount whose record a
    // crash forgot before unmounting it.
    rustix::mount::unmount(&top_fs, rustix::mount::UnmountFlags::empty()).unwrap();
    let forgotten = root.path().join("snapshots/99/fs");
    fs::create_dir_all(&forgotten).unwrap();
    lazy.mount(IMAGE, &forgotten).unwrap();

    let _s = Snapshots::open_with(root.path(), Some(lazy.clone())).unwrap();
    assert!(lazy.is_served(&top_fs), "mounted again");
    assert!(
        !root.path().join("snapshots/99").exists(),
        "unmounted and deleted"
    );
    assert_eq!(
        darter_testkit::process::mounts_under(root.path()).unwrap(),
        [top_fs]
    );
}

#[test]
fn a_darter_images_layers_are_read_once_and_its_mount_is_in_the_status() {
    let diff_ids = ["sha256:b1", "sha256:boot"];
    let lazy = BindMounts::new(Some(&diff_ids));
    let root = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(root.path().to_path_buf());
    let s = Snapshots::open_with(root.path(), Some(lazy.clone())).unwrap();
    let chain = remote::chain_ids(&diff_ids.map(str::to_owned));
    prepare_remote_chain(&s, &chain);
    assert_eq!(
        lazy.reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one read of the manifest and config for both layers"
    );

    let status = s.status().unwrap();
    let top = s.stat(&chain[1]).unwrap();
    assert_eq!(
        status.lazy_mounts,
        [LazyMountStatus {
            snapshot: chain[1].clone(),
            image: IMAGE.to_owned(),
            mountpoint: s.layout.fs_dir(top.record.id),
            daemon: Some(remote::MountStats {
                pid: std::process::id(),
                backend_bytes: 7,
                backend_requests: 1,
            }),
        }]
    );
    assert!(status.fallbacks.values().all(|&n| n == 0), "{status:?}");
}

#[test]
fn fallbacks_are_counted_by_reason() {
    let count = |s: &Snapshots, reason: &str| s.status().unwrap().fallbacks[reason];
    let root = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(root.path().to_path_buf());
    // A plain image, prepared layer by layer as containerd's CRI does:
    // counted once, at its top layer.
    let s = Snapshots::open_with(root.path(), Some(BindMounts::new(None))).unwrap();
    let plain = remote::chain_ids(&["sha256:plain1".to_owned(), "sha256:plain2".to_owned()]);
    for (i, target) in plain.iter().enumerate() {
        s.prepare(Kind::Active, &format!("p-{i}"), "", remote_labels(target))
            .unwrap();
        assert_eq!(count(&s, "not-darter"), i as u64);
    }
    // An image it cannot read: its top is unknown, so each layer counts.
    for i in 0..2 {
        let mut labels = remote_labels("sha256:a");
        labels.insert(
            remote::LABEL_IMAGE_REF.to_owned(),
            UNREADABLE_IMAGE.to_owned(),
        );
        s.prepare(Kind::Active, &format!("u-{i}"), "", labels)
            .unwrap();
    }
    assert_eq!(count(&s, "registry-error"), 2);
    // A client's report (`darter pull`); one of an unknown reason is not
    // counted.
    for (key, reason) in [("r-0", "not-darter"), ("r-1", "bogus")] {
        let labels = Labels::from([(crate::LABEL_FALLBACK.to_owned(), reason.to_owned())]);
        s.prepare(Kind::Active, key, "", labels).unwrap();
    }
    assert_eq!(count(&s, "not-darter"), 2);
    assert_eq!(s.status().unwrap().fallbacks.values().sum::<u64>(), 4);
    drop(s);
    // A Darter image asked for a layer not its own.
    let s = Snapshots::open_with(root.path(), Some(BindMounts::new(Some(&["sha256:a"])))).unwrap();
    s.prepare(Kind::Active, "n-0", "", remote_labels("sha256:x"))
        .unwrap();
    assert_eq!(count(&s, "not-a-layer"), 1);
    assert!(s.status().unwrap().lazy_mounts.is_empty());
}
