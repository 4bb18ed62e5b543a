//! The snapshot operations, with containerd's semantics: synchronous on
//! [`Snapshots`], and as containerd's `Snapshotter` trait (run on tokio's
//! blocking pool) on [`OverlaySnapshotter`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, tonic};

use crate::error::Error;
use crate::filter::Filters;
use crate::layout::{self, Layout};
use crate::mounts::{self, MountSpec};
use crate::remote::{self, ImageLayers, LayersCache, LazyMounts};
use crate::status::{self, FallbackReason, Fallbacks, LazyMountStatus, NodeStatus};
use crate::store::{self, Kind, Labels, Layer, NewSnapshot, Snapshot, Store, Usage};

/// Longest key plus value of one label, as containerd's `labels.Validate`.
const MAX_LABEL_BYTES: usize = 4096;
/// Images whose layers are remembered (a Prepare per layer reads them).
const LAYERS_CACHE_IMAGES: usize = 64;

/// An overlayfs snapshotter over one root directory.
#[derive(Debug)]
pub struct Snapshots {
    layout: Layout,
    store: Store,
    overlay_options: Vec<String>,
    /// Serves Darter images lazily; without it every layer is unpacked.
    lazy: Option<Arc<dyn LazyMounts>>,
    /// Held while a remote layer is being committed and mounted, so that a
    /// concurrent Prepare of the same layer answers only once it serves.
    remote_lock: Mutex<()>,
    /// The manifests' and configs' say on layers, by pinned reference.
    layers: LayersCache,
    /// Images unpacked in full instead of mounted lazily.
    fallbacks: Fallbacks,
}

impl Snapshots {
    /// Opens the snapshotter at `root` (created if needed) and clears what
    /// an earlier process left half done: staged directories, directories
    /// of snapshots it never recorded or had already forgotten, the trash.
    /// What cannot be cleared now (e.g. something mounted there) is logged
    /// and left for the next Cleanup: it takes no snapshot's place.
    pub fn open(root: &Path) -> Result<Snapshots, Error> {
        Snapshots::open_with(root, None)
    }

    /// [`Snapshots::open`], serving Darter images lazily through `lazy`:
    /// remote layers whose mount is gone (the machine rebooted, a mount
    /// daemon died) are mounted again before it returns.
    pub fn open_with(root: &Path, lazy: Option<Arc<dyn LazyMounts>>) -> Result<Snapshots, Error> {
        let layout = Layout::create(root)?;
        // The database lock first: another process may be serving `root`.
        let store = Store::open(&store::database_path(root))?;
        let snapshots = Snapshots {
            layout,
            store,
            overlay_options: mounts::overlay_options(),
            lazy,
            remote_lock: Mutex::new(()),
            layers: LayersCache::new(LAYERS_CACHE_IMAGES),
            fallbacks: Fallbacks::default(),
        };
        if let Err(err) = snapshots
            .layout
            .empty_staging()
            .and_then(|()| snapshots.cleanup())
        {
            tracing::warn!(%err, "cannot clear what an earlier process left; going on");
        }
        snapshots.mount_remote_layers()?;
        Ok(snapshots)
    }

    /// Mounts every remote layer that no mount serves. One that fails is
    /// logged: its snapshot stays, and its users get errors until removed.
    fn mount_remote_layers(&self) -> Result<(), Error> {
        for snapshot in self.store.list()? {
            let Layer::Remote { image, mountpoint } = &snapshot.record.layer else {
                continue;
            };
            let Some(lazy) = &self.lazy else {
                tracing::warn!(
                    key = snapshot.key,
                    image,
                    "a remote layer, and no lazy mounts to serve it"
                );
                continue;
            };
            if lazy.is_served(mountpoint) {
                continue;
            }
            match lazy.mount(image, mountpoint) {
                Ok(()) => tracing::info!(key = snapshot.key, image, "mounted a remote layer again"),
                Err(err) => {
                    tracing::warn!(key = snapshot.key, image, %err, "cannot mount a remote layer again");
                }
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Creates the active snapshot (`kind` Active) or view `key` on
    /// `parent` ("" for none) and returns its mounts.
    pub fn prepare(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Error> {
        require_name("key", key)?;
        validate_labels(&labels)?;
        // What containerd sent decides remote snapshots: worth seeing.
        tracing::debug!(key, parent, ?labels, "prepare");
        let parent = (!parent.is_empty()).then_some(parent);
        if let Some(reason) = labels.get(status::LABEL_FALLBACK) {
            self.count_reported_fallback(key, reason, &labels);
        }
        if kind == Kind::Active
            && let Some((target, image)) = remote::remote_request(&labels)
            && self.commit_remote(target, &image, parent, &labels)?
        {
            return Err(Error::AlreadyExists {
                key: target.to_owned(),
            });
        }
        // The parent's owner, read ahead; `create` checks the parent again.
        let parent_fs = parent
            .and_then(|p| self.store.get(p).ok())
            .map(|p| self.layout.fs_dir(p.record.id));
        let staged = self.layout.stage(kind, parent_fs.as_deref())?;
        let new = NewSnapshot {
            key,
            parent,
            kind,
            labels,
        };
        let (snapshot, parents) = self
            .store
            .create(new, |id| staged.place(&self.layout, id))?;
        tracing::debug!(
            key,
            parent,
            id = snapshot.record.id,
            kind = kind.name(),
            "created"
        );
        Ok(self.mounts_of(&snapshot, &parents))
    }

    /// Commits the layer `target` of the Darter image `image` on `parent`
    /// without anything written to it, as containerd's remote snapshotters
    /// do; whether it did (false: not a Darter image or not one of its
    /// layers, to be unpacked as usual). A layer already committed is
    /// there: true.
    fn commit_remote(
        &self,
        target: &str,
        image: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<bool, Error> {
        let Some(lazy) = &self.lazy else {
            return Ok(false);
        };
        let _one_at_a_time = self
            .remote_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self
            .store
            .get(target)
            .is_ok_and(|s| s.record.kind == Kind::Committed)
        {
            return Ok(true);
        }
        let Some(is_top) = self.remote_position(target, image, lazy.as_ref()) else {
            return Ok(false);
        };
        let staged = self.layout.stage(Kind::View, None)?;
        let new = NewSnapshot {
            key: target,
            parent,
            kind: Kind::Committed,
            labels: labels.clone(),
        };
        let layer_of = |id| {
            if is_top {
                Layer::Remote {
                    image: image.to_owned(),
                    mountpoint: self.layout.fs_dir(id),
                }
            } else {
                // Its files are in the bootstrap's tree, which the top
                // layer mounts.
                Layer::Directory
            }
        };
        let snapshot = self
            .store
            .create_committed(new, layer_of, |id| staged.place(&self.layout, id))?;
        if let Layer::Remote { mountpoint, .. } = &snapshot.record.layer
            && let Err(source) = lazy.mount(image, mountpoint)
        {
            let err = Error::Lazy {
                what: "mount",
                image: image.to_owned(),
                mountpoint: mountpoint.clone(),
                source,
            };
            // Not served: forget it, so that a retry starts afresh.
            if let Err(undo) = self.remove(target) {
                tracing::warn!(target, %undo, "cannot forget a remote layer that failed to mount");
            }
            return Err(err);
        }
        tracing::debug!(
            target,
            image,
            id = snapshot.record.id,
            is_top,
            "committed a remote layer"
        );
        Ok(true)
    }

    /// Whether `target` is the top layer of the Darter image `image` (the
    /// lazy mount), or `None` (counted and logged as a fallback) if its
    /// layers are to be unpacked.
    fn remote_position(&self, target: &str, image: &str, lazy: &dyn LazyMounts) -> Option<bool> {
        // An image it cannot read may well be a plain one whose registry
        // only the caller can reach: containerd unpacks it, as remote
        // snapshotters do when they cannot help. Its top layer is unknown,
        // so each of its layers counts.
        let layers: ImageLayers = match self.layers.get(lazy, image) {
            Ok(layers) => layers,
            Err(err) => {
                self.fallback(
                    FallbackReason::RegistryError,
                    image,
                    target,
                    &err.to_string(),
                );
                return None;
            }
        };
        let chain = remote::chain_ids(&layers.diff_ids);
        let position = chain.iter().position(|id| id == target);
        match (layers.is_darter, position) {
            (true, Some(position)) => Some(position + 1 == chain.len()),
            (true, None) => {
                self.fallback(FallbackReason::NotALayer, image, target, "");
                None
            }
            // A plain image counts once: at its top layer.
            (false, Some(position)) if position + 1 == chain.len() => {
                self.fallback(FallbackReason::NotDarter, image, target, "");
                None
            }
            (false, _) => None,
        }
    }

    /// Counts and logs a fallback the snapshotter itself decided on.
    fn fallback(&self, reason: FallbackReason, image: &str, target: &str, err: &str) {
        self.fallbacks.count(reason);
        tracing::warn!(
            image,
            target,
            reason = reason.name(),
            err,
            "not served lazily: its layers are unpacked in full"
        );
    }

    /// Counts a fallback a client reports with [`status::LABEL_FALLBACK`].
    fn count_reported_fallback(&self, key: &str, reason: &str, labels: &Labels) {
        let image = labels
            .get(remote::LABEL_IMAGE_REF)
            .map_or("(not named)", String::as_str);
        match FallbackReason::from_name(reason) {
            Some(known) => {
                self.fallbacks.count(known);
                tracing::warn!(
                    image,
                    key,
                    reason,
                    "the client pulls this image in full: not served lazily"
                );
            }
            None => tracing::warn!(
                image,
                key,
                reason,
                "a fallback of an unknown reason: not counted"
            ),
        }
    }

    /// The lazy mounts and the fallbacks counted since start.
    pub fn status(&self) -> Result<NodeStatus, Error> {
        let lazy_mounts = self
            .store
            .list()?
            .into_iter()
            .filter_map(|snapshot| match snapshot.record.layer {
                Layer::Remote { image, mountpoint } => Some(LazyMountStatus {
                    daemon: self
                        .lazy
                        .as_ref()
                        .and_then(|lazy| lazy.mount_stats(&mountpoint)),
                    snapshot: snapshot.key,
                    image,
                    mountpoint,
                }),
                Layer::Directory => None,
            })
            .collect();
        Ok(NodeStatus {
            lazy_mounts,
            fallbacks: self.fallbacks.by_name(),
        })
    }

    /// The mounts of the active snapshot or view `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let (snapshot, parents) = self.store.get_with_parents(key)?;
        if snapshot.record.kind == Kind::Committed {
            return Err(Error::NotMountable {
                key: key.to_owned(),
            });
        }
        Ok(self.mounts_of(&snapshot, &parents))
    }

    fn mounts_of(&self, snapshot: &Snapshot, parents: &[u64]) -> Vec<Mount> {
        let id = snapshot.record.id;
        let parent_dirs: Vec<_> = parents.iter().map(|&p| self.layout.fs_dir(p)).collect();
        mounts::mounts(&MountSpec {
            kind: snapshot.record.kind,
            fs: &self.layout.fs_dir(id),
            work: &self.layout.work_dir(id),
            parents: &parent_dirs,
            overlay_options: &self.overlay_options,
        })
    }

    /// Commits the active snapshot `key` as `name`: measures it, flushes it
    /// to disk, then records it (the key is gone afterwards).
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<(), Error> {
        require_name("name", name)?;
        validate_labels(&labels)?;
        let active = self.store.get(key)?;
        if active.record.kind != Kind::Active {
            return Err(Error::NotActive {
                key: key.to_owned(),
                kind: active.record.kind.name(),
            });
        }
        let id = active.record.id;
        let fs = self.layout.fs_dir(id);
        let started = std::time::Instant::now();
        let usage = layout::disk_usage(&fs)
            .and_then(|usage| layout::sync_filesystem(&fs).map(|()| usage))
            .map_err(|err| self.unless_gone(key, id, err))?;
        self.store.commit(key, id, name, labels, usage)?;
        tracing::debug!(
            key,
            name,
            id,
            size = usage.size,
            inodes = usage.inodes,
            measured_and_synced_in = ?started.elapsed(),
            "committed"
        );
        Ok(())
    }

    /// `err`, or NotFound if `key` was removed (or replaced) meanwhile: a
    /// concurrent Remove took the directory away.
    fn unless_gone(&self, key: &str, id: u64, err: Error) -> Error {
        match self.store.get(key) {
            Ok(snapshot) if snapshot.record.id == id => err,
            Ok(_) | Err(Error::NotFound { .. }) => Error::NotFound {
                key: key.to_owned(),
            },
            Err(other) => other,
        }
    }

    /// Removes `key` (refused while it has children) and deletes its
    /// directory. Once the record is gone the removal has happened: a
    /// directory that cannot be deleted now is left to [`Snapshots::cleanup`].
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        let removed = self.store.remove(key)?;
        let id = removed.record.id;
        if let Layer::Remote { image, mountpoint } = &removed.record.layer {
            self.unmount_remote(image, mountpoint);
        }
        if let Err(err) = self.layout.delete_snapshot_dir(id) {
            tracing::warn!(key, id, %err, "removed; its directory is left for cleanup");
        }
        tracing::debug!(key, id, "removed");
        Ok(())
    }

    /// Undoes a lazy mount whose record is gone. A failure is logged: the
    /// directory stays mounted and [`Snapshots::cleanup`] tries again.
    fn unmount_remote(&self, image: &str, mountpoint: &Path) {
        let Some(lazy) = &self.lazy else {
            tracing::warn!(image, mountpoint = %mountpoint.display(), "no lazy mounts to unmount a remote layer");
            return;
        };
        if let Err(err) = lazy.unmount(mountpoint) {
            tracing::warn!(image, mountpoint = %mountpoint.display(), %err, "cannot unmount a remote layer");
        }
    }

    pub fn stat(&self, key: &str) -> Result<Snapshot, Error> {
        self.store.get(key)
    }

    /// Updates the labels of `info.name`, the only mutable field, as
    /// containerd does: with no field paths, or `labels`, the labels become
    /// `info.labels`; `labels.KEY` sets one label (or removes it, when
    /// `info.labels` has no value for it).
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Snapshot, Error> {
        let given: Labels = info.labels.clone().into_iter().collect();
        validate_labels(&given)?;
        for path in fieldpaths {
            if path != "labels" && !path.starts_with("labels.") {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {path:?} of snapshot {:?}: only labels are mutable",
                    info.name
                )));
            }
        }
        self.store.update_labels(&info.name, |labels| {
            if fieldpaths.is_empty() || fieldpaths.iter().any(|p| p == "labels") {
                labels.clone_from(&given);
            }
            for label in fieldpaths.iter().filter_map(|p| p.strip_prefix("labels.")) {
                match given.get(label).filter(|v| !v.is_empty()) {
                    Some(value) => labels.insert(label.to_owned(), value.clone()),
                    None => labels.remove(label),
                };
            }
            Ok(())
        })
    }

    /// The disk usage of `key` itself: measured now for an active snapshot,
    /// as measured at commit time otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage, Error> {
        let snapshot = self.store.get(key)?;
        let id = snapshot.record.id;
        match snapshot.record.kind {
            Kind::Active => layout::disk_usage(&self.layout.fs_dir(id))
                .map_err(|err| self.unless_gone(key, id, err)),
            Kind::View | Kind::Committed => Ok(snapshot.record.usage.unwrap_or_default()),
        }
    }

    /// The snapshots `filters` select (containerd's filter syntax).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Snapshot>, Error> {
        let filters = Filters::parse(filters)?;
        let mut all = self.store.list()?;
        all.retain(|s| filters.matches(s));
        Ok(all)
    }

    /// Deletes directories no snapshot owns: orphans of crashes, and
    /// removals whose deletion failed earlier.
    pub fn cleanup(&self) -> Result<(), Error> {
        let moved = self.store.with_writers_paused(|live| {
            // A lazy mount whose record a crash forgot before unmounting.
            for mountpoint in self.layout.mounted_orphans(live)? {
                self.unmount_remote("(forgotten)", &mountpoint);
            }
            self.layout.trash_orphans(live)
        })??;
        if moved > 0 {
            tracing::info!(moved, "found orphan snapshot directories");
        }
        self.layout.empty_trash()
    }
}

fn require_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the snapshot {what} is empty"
        )));
    }
    Ok(())
}

fn validate_labels(labels: &Labels) -> Result<(), Error> {
    for (key, value) in labels {
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "label {key:?} and its value are longer than {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// containerd's view of a snapshot.
fn info(snapshot: Snapshot) -> Info {
    let record = snapshot.record;
    Info {
        kind: match record.kind {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: snapshot.key,
        parent: record.parent.unwrap_or_default(),
        labels: record.labels.into_iter().collect(),
        created_at: record.created,
        updated_at: record.updated,
    }
}

/// [`Snapshots`] as containerd's snapshots service.
#[derive(Debug, Clone)]
pub struct OverlaySnapshotter {
    inner: Arc<Snapshots>,
}

impl OverlaySnapshotter {
    /// Opens the snapshotter at `root`, as [`Snapshots::open`].
    pub fn open(root: &Path) -> Result<OverlaySnapshotter, Error> {
        OverlaySnapshotter::open_with(root, None)
    }

    /// Opens the snapshotter at `root`, as [`Snapshots::open_with`].
    pub fn open_with(
        root: &Path,
        lazy: Option<Arc<dyn LazyMounts>>,
    ) -> Result<OverlaySnapshotter, Error> {
        Ok(OverlaySnapshotter {
            inner: Arc::new(Snapshots::open_with(root, lazy)?),
        })
    }

    pub fn snapshots(&self) -> &Snapshots {
        &self.inner
    }

    pub(crate) fn shared(&self) -> Arc<Snapshots> {
        Arc::clone(&self.inner)
    }

    /// Runs `op` on the blocking pool: every operation does file system or
    /// database I/O, and a write transaction may wait for another.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Snapshots) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = Arc::clone(&self.inner);
        let result = tokio::task::spawn_blocking(move || op(&inner))
            .await
            .map_err(|err| Error::Task(err.to_string()))?;
        if let Err(err) = &result {
            tracing::debug!(%err, "request refused");
        }
        result
    }
}

fn labels(map: HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for OverlaySnapshotter {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.blocking(move |s| s.stat(&key).map(info)).await
    }

    async fn update(&self, given: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        let fieldpaths = fieldpaths.unwrap_or_default();
        self.blocking(move |s| s.update(&given, &fieldpaths).map(info))
            .await
    }

    async fn usage(&self, key: String) -> Result<containerd_snapshots::Usage, Error> {
        let usage = self.blocking(move |s| s.usage(&key)).await?;
        Ok(containerd_snapshots::Usage {
            inodes: i64::try_from(usage.inodes).unwrap_or(i64::MAX),
            size: i64::try_from(usage.size).unwrap_or(i64::MAX),
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        given: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.prepare(Kind::Active, &key, &parent, labels(given)))
            .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        given: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.blocking(move |s| s.prepare(Kind::View, &key, &parent, labels(given)))
            .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        given: HashMap<String, String>,
    ) -> Result<(), Error> {
        self.blocking(move |s| s.commit(&name, &key, labels(given)))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        self.blocking(move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Error> {
        self.blocking(Snapshots::cleanup).await
    }

    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, Error>>>;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Error> {
        let listed = self.blocking(move |s| s.list(&filters)).await?;
        let infos: Vec<Result<Info, Error>> = listed.into_iter().map(|s| Ok(info(s))).collect();
        Ok(tokio_stream::iter(infos))
    }
}

#[cfg(test)]
mod tests;
