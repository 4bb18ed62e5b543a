//! The snapshotter's directory:
//!
//! ```text
//! ROOT/metadata.redb         the metadata store
//! ROOT/snapshots/<id>/fs     a snapshot's files (overlay upperdir, or lowerdir once committed)
//! ROOT/snapshots/<id>/work   overlayfs' workdir (active snapshots only)
//! ROOT/staging/<random>/     a snapshot's directory being made, before it gets its id
//! ROOT/trash/<id>/           a removed snapshot's directory being deleted
//! ```
//!
//! A directory enters `snapshots/` by one rename (inside the transaction
//! that records it) and leaves it by one rename (after the transaction that
//! forgets it), so after a crash each snapshot directory either belongs to
//! a record or is an orphan that [`Layout::trash_orphans`] finds. Everything
//! in `staging/` and `trash/` is garbage once no operation is using it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::Error;
use crate::store::{Kind, Usage};

/// Mode of the root and its subdirectories: snapshots may hold files that
/// only root should reach (a container's setuid binaries, secrets).
const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a new `fs` directory, as containerd's overlay snapshotter makes it.
const FS_DIR_MODE: u32 = 0o755;
/// Mode of a new `work` directory.
const WORK_DIR_MODE: u32 = 0o711;

/// Paths inside a snapshotter root.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    /// Held while deleting from `trash/`: a Remove and a Cleanup may reach
    /// the same directory, and two deletions of one tree trip over each
    /// other.
    deleting: Mutex<()>,
}

/// A snapshot directory made in `staging/`, not yet in place. Deleted on
/// drop unless [`Staged::place`] moved it.
#[derive(Debug)]
pub struct Staged {
    dir: tempfile::TempDir,
}

impl Layout {
    /// Creates the root and its subdirectories as needed.
    pub fn create(root: &Path) -> Result<Layout, Error> {
        let layout = Layout {
            root: root.to_path_buf(),
            deleting: Mutex::new(()),
        };
        for dir in [
            layout.root.clone(),
            layout.snapshots(),
            layout.staging(),
            layout.trash(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_DIR_MODE)
                .create(&dir)
                .map_err(Error::io("create", &dir))?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn trash(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// `snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }

    /// `snapshots/<id>/fs`.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// `snapshots/<id>/work`.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Makes a snapshot directory in `staging/`: `fs`, and `work` for an
    /// active snapshot. `fs` gets the owner of `owner_of` (the parent's
    /// `fs`), as containerd's overlay snapshotter does, so that an image
    /// whose root directory belongs to a remapped user keeps it.
    pub fn stage(&self, kind: Kind, owner_of: Option<&Path>) -> Result<Staged, Error> {
        let staging = self.staging();
        let dir = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&staging)
            .map_err(Error::io("create a directory in", &staging))?;
        let fs_dir = dir.path().join("fs");
        make_dir(&fs_dir, FS_DIR_MODE)?;
        if kind == Kind::Active {
            make_dir(&dir.path().join("work"), WORK_DIR_MODE)?;
        }
        if let Some(parent_fs) = owner_of {
            let owner = fs::metadata(parent_fs).map_err(Error::io("read", parent_fs))?;
            let mine = fs::metadata(&fs_dir).map_err(Error::io("read", &fs_dir))?;
            if (owner.uid(), owner.gid()) != (mine.uid(), mine.gid()) {
                rustix::fs::chown(
                    &fs_dir,
                    Some(rustix::fs::Uid::from_raw(owner.uid())),
                    Some(rustix::fs::Gid::from_raw(owner.gid())),
                )
                .map_err(|e| Error::io("chown", &fs_dir)(e.into()))?;
            }
        }
        Ok(Staged { dir })
    }

    /// Moves snapshot `id`'s directory to `trash/` (already gone is fine:
    /// a sweep got there first) and deletes it. Refuses if anything is
    /// mounted below it.
    pub fn delete_snapshot_dir(&self, id: u64) -> Result<(), Error> {
        let from = self.snapshot_dir(id);
        refuse_if_mounted_below(&from)?;
        let to = self.trash().join(id.to_string());
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(Error::io("move to the trash", &from)(err)),
        }
        sync_dir(&self.snapshots())?;
        let _deleting = self.lock_deletions();
        delete_tree(&to)
    }

    fn lock_deletions(&self) -> MutexGuard<'_, ()> {
        self.deleting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves every directory in `snapshots/` whose id is not in `live` to
    /// `trash/`: what a crash left between placing a directory and
    /// committing its record, or between forgetting a record and deleting
    /// its directory. The caller must keep snapshots from being created
    /// meanwhile. Returns how many it moved.
    pub fn trash_orphans(&self, live: &BTreeSet<u64>) -> Result<usize, Error> {
        let snapshots = self.snapshots();
        let mut moved = 0;
        for entry in fs::read_dir(&snapshots).map_err(Error::io("list", &snapshots))? {
            let entry = entry.map_err(Error::io("list", &snapshots))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                tracing::warn!(path = %entry.path().display(), "unexpected entry in the snapshots directory; leaving it");
                continue;
            };
            if live.contains(&id) {
                continue;
            }
            let to = self.trash().join(format!("orphan-{id}"));
            fs::rename(entry.path(), &to).map_err(Error::io("move to the trash", entry.path()))?;
            tracing::info!(id, "moved an orphan snapshot directory to the trash");
            moved += 1;
        }
        if moved > 0 {
            sync_dir(&snapshots)?;
        }
        Ok(moved)
    }

    /// The `fs` directories of snapshots not in `live` that something is
    /// mounted on.
    pub fn mounted_orphans(&self, live: &BTreeSet<u64>) -> Result<Vec<PathBuf>, Error> {
        let snapshots = self.snapshots();
        let mut out = Vec::new();
        for entry in fs::read_dir(&snapshots).map_err(Error::io("list", &snapshots))? {
            let entry = entry.map_err(Error::io("list", &snapshots))?;
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            let fs_dir = entry.path().join("fs");
            if id.is_some_and(|id| !live.contains(&id)) && is_mount_point(&fs_dir) {
                out.push(fs_dir);
            }
        }
        Ok(out)
    }

    /// Deletes everything in `trash/`.
    pub fn empty_trash(&self) -> Result<(), Error> {
        let _deleting = self.lock_deletions();
        empty_dir(&self.trash())
    }

    /// Deletes everything in `staging/`: only while no snapshot is being
    /// made, i.e. before serving.
    pub fn empty_staging(&self) -> Result<(), Error> {
        empty_dir(&self.staging())
    }
}

impl Staged {
    /// Renames the staged directory to `snapshots/<id>` and makes the
    /// rename durable, so that a record committed after this never points
    /// at a directory a power loss undid. A directory already there can
    /// only be an orphan (ids are never reused, and `id` is not recorded
    /// yet): it is deleted first.
    pub fn place(self, layout: &Layout, id: u64) -> Result<(), Error> {
        let target = layout.snapshot_dir(id);
        if fs::symlink_metadata(&target).is_ok() {
            tracing::warn!(path = %target.display(), "replacing an orphan snapshot directory");
            layout.delete_snapshot_dir(id)?;
        }
        let staged = self.dir.keep();
        if let Err(err) = fs::rename(&staged, &target) {
            let _ = delete_tree(&staged);
            return Err(Error::io("move into place", &staged)(err));
        }
        sync_dir(&layout.snapshots())
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(Error::io("create", path))?;
    // The umask may have cleared bits of `mode`.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(Error::io("chmod", path))
}

/// fsyncs a directory, making the renames in it durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync", dir))
}

fn empty_dir(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let entry = entry.map_err(Error::io("list", dir))?;
        delete_tree(&entry.path())?;
    }
    Ok(())
}

/// Deletes `path` and everything below it, unless something is mounted
/// there (deleting would reach into the mounted filesystem). Already gone
/// is fine.
fn delete_tree(path: &Path) -> Result<(), Error> {
    refuse_if_mounted_below(path)?;
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(Error::io("delete", path)(err)),
    }
}

/// Refuses to delete `dir` if it, or the `fs` directory in it, is a mount
/// point (a layer mounted there, a leftover bind mount): deleting would
/// reach into the mounted filesystem.
fn refuse_if_mounted_below(dir: &Path) -> Result<(), Error> {
    let mounts: Vec<PathBuf> = [dir.to_path_buf(), dir.join("fs")]
        .into_iter()
        .filter(|path| is_mount_point(path))
        .collect();
    if mounts.is_empty() {
        return Ok(());
    }
    Err(Error::MountedBelow {
        path: dir.to_path_buf(),
        mounts,
    })
}

/// Whether `path` is the root of a mount (statx `STATX_ATTR_MOUNT_ROOT`;
/// on kernels without it, whether it is on another device than its
/// parent). A path that does not exist is not.
pub fn is_mount_point(path: &Path) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags, statx};
    let flags = AtFlags::NO_AUTOMOUNT | AtFlags::SYMLINK_NOFOLLOW;
    let Ok(stat) = statx(CWD, path, flags, StatxFlags::BASIC_STATS) else {
        return false;
    };
    if stat
        .stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
    {
        return stat.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    }
    let parent = path.parent().unwrap_or(path);
    statx(CWD, parent, flags, StatxFlags::BASIC_STATS).is_ok_and(|up| {
        (up.stx_dev_major, up.stx_dev_minor) != (stat.stx_dev_major, stat.stx_dev_minor)
    })
}

/// Disk usage of the tree at `dir`: allocated bytes and distinct inodes,
/// hard links counted once, not following symlinks or crossing into other
/// filesystems (what containerd's `fs.DiskUsage` reports).
pub fn disk_usage(dir: &Path) -> Result<Usage, Error> {
    let top = fs::symlink_metadata(dir).map_err(Error::io("read", dir))?;
    let device = top.dev();
    let mut seen = BTreeSet::new();
    let mut usage = Usage::default();
    let mut pending = vec![(dir.to_path_buf(), top)];
    while let Some((path, meta)) = pending.pop() {
        if meta.dev() != device {
            continue;
        }
        if seen.insert(meta.ino()) {
            usage.inodes += 1;
            usage.size += meta.blocks() * 512;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(Error::io("list", &path))? {
                let entry = entry.map_err(Error::io("list", &path))?;
                let child = entry.path();
                let meta = fs::symlink_metadata(&child).map_err(Error::io("read", &child))?;
                pending.push((child, meta));
            }
        }
    }
    Ok(usage)
}

/// Flushes the filesystem that holds `dir` to disk, so that a committed
/// layer is as durable as its record.
pub fn sync_filesystem(dir: &Path) -> Result<(), Error> {
    let handle = fs::File::open(dir).map_err(Error::io("open", dir))?;
    rustix::fs::syncfs(&handle).map_err(|e| Error::io("sync the filesystem of", dir)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_layout() -> (tempfile::TempDir, Layout) {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::create(root.path()).unwrap();
        (root, layout)
    }

    /// An active snapshot's directory placed as `id`.
    fn place(layout: &Layout, id: u64) {
        layout
            .stage(Kind::Active, None)
            .unwrap()
            .place(layout, id)
            .unwrap();
    }

    #[test]
    fn staged_directories_have_containerds_modes() {
        let (root, layout) = new_layout();
        place(&layout, 7);
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(layout.fs_dir(7)), FS_DIR_MODE);
        assert_eq!(mode(layout.work_dir(7)), WORK_DIR_MODE);
        assert_eq!(mode(root.path().join("snapshots")), PRIVATE_DIR_MODE);
        layout
            .stage(Kind::View, None)
            .unwrap()
            .place(&layout, 8)
            .unwrap();
        assert!(layout.fs_dir(8).is_dir());
        assert!(!layout.work_dir(8).exists());
    }

    #[test]
    fn the_new_fs_takes_the_parents_owner() {
        let (_root, layout) = new_layout();
        place(&layout, 1);
        rustix::fs::chown(
            layout.fs_dir(1),
            Some(rustix::fs::Uid::from_raw(100_000)),
            Some(rustix::fs::Gid::from_raw(100_001)),
        )
        .unwrap();
        let staged = layout.stage(Kind::Active, Some(&layout.fs_dir(1))).unwrap();
        staged.place(&layout, 2).unwrap();
        let meta = fs::metadata(layout.fs_dir(2)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (100_000, 100_001));
    }

    #[test]
    fn a_dropped_stage_leaves_nothing() {
        let (root, layout) = new_layout();
        drop(layout.stage(Kind::Active, None).unwrap());
        assert_eq!(
            fs::read_dir(root.path().join("staging")).unwrap().count(),
            0
        );
    }

    #[test]
    fn placing_over_an_orphan_replaces_it() {
        let (root, layout) = new_layout();
        fs::create_dir_all(layout.fs_dir(3).join("stale")).unwrap();
        place(&layout, 3);
        assert!(!layout.fs_dir(3).join("stale").exists());
        assert!(layout.work_dir(3).is_dir());
        assert_eq!(fs::read_dir(root.path().join("trash")).unwrap().count(), 0);
    }

    #[test]
    fn orphans_go_to_the_trash_and_live_ones_stay() {
        let (root, layout) = new_layout();
        for id in [1, 2, 3] {
            place(&layout, id);
        }
        fs::create_dir(root.path().join("snapshots/not-an-id")).unwrap();
        let moved = layout.trash_orphans(&BTreeSet::from([2])).unwrap();
        assert_eq!(moved, 2);
        assert!(layout.snapshot_dir(2).is_dir());
        assert!(!layout.snapshot_dir(1).exists() && !layout.snapshot_dir(3).exists());
        assert!(root.path().join("snapshots/not-an-id").is_dir());
        layout.empty_trash().unwrap();
        assert_eq!(fs::read_dir(root.path().join("trash")).unwrap().count(), 0);
    }

    #[test]
    fn deleting_refuses_to_reach_into_a_mount() {
        let (_root, layout) = new_layout();
        place(&layout, 1);
        let source = tempfile::tempdir().unwrap();
        fs::write(source.path().join("precious"), b"keep").unwrap();
        let fs_dir = layout.fs_dir(1);
        rustix::mount::mount_bind(source.path(), &fs_dir).unwrap();
        let _unmount = darter_testkit::process::MountGuard::new(&fs_dir);
        let err = layout.delete_snapshot_dir(1).unwrap_err();
        assert!(matches!(err, Error::MountedBelow { .. }), "{err}");
        assert!(fs_dir.is_dir(), "the snapshot stays where it is");
        assert_eq!(fs::read(source.path().join("precious")).unwrap(), b"keep");
    }

    #[test]
    fn usage_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let empty = disk_usage(dir.path()).unwrap();
        assert_eq!(empty.inodes, 1);
        fs::write(dir.path().join("a"), vec![1u8; 100_000]).unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("d/link")).unwrap();
        let usage = disk_usage(dir.path()).unwrap();
        assert_eq!(usage.inodes, 4, "{usage:?}");
        let file_blocks = fs::metadata(dir.path().join("a")).unwrap().blocks() * 512;
        assert!(usage.size >= empty.size + file_blocks, "{usage:?}");
        assert!(usage.size < empty.size + 2 * file_blocks, "{usage:?}");
    }
}
