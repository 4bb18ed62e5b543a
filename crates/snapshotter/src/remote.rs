//! Remote snapshots: layers of a Darter image that containerd never
//! downloads, because a lazy mount of the whole image serves them.
//!
//! containerd's protocol for remote snapshotters: a client preparing a
//! layer's snapshot names its chain ID in the label [`LABEL_TARGET`]; a
//! snapshotter that can provide that layer itself commits it under that
//! name and answers AlreadyExists, and containerd skips download and
//! unpack (containerd then finds the snapshot by listing with a filter on
//! that label and the parent). Here the image is named by
//! [`LABEL_IMAGE_REF`] (set by `darter pull`) or by containerd's CRI label
//! [`LABEL_CRI_IMAGE_REF`].
//!
//! A Darter image's `rootfs.diff_ids` are its blobs' digests, then the
//! bootstrap's (docs/format.md, section 5), and the bootstrap alone is the
//! whole merged tree. So the blob layers become empty committed snapshots
//! and the last layer's snapshot is the lazy mount of the whole image.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest as _, Sha256};

/// containerd's label naming the committed snapshot a Prepare is for.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The image a remote layer belongs to, as `darter pull` labels it.
/// containerd passes only labels under `containerd.io/snapshot/` on to a
/// snapshotter, hence the prefix.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/dev.darter.image-ref";
/// The same, as containerd's CRI plugin labels it.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the manifest CRI resolved the image to.
const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// An error from a [`LazyMounts`] implementation.
pub type LazyError = Box<dyn std::error::Error + Send + Sync>;

/// What the snapshotter needs to serve Darter images lazily. The `darter`
/// binary implements it (registry reads, mounts of the node daemon); the
/// snapshotter itself mounts nothing.
pub trait LazyMounts: Send + Sync + Debug {
    /// What the manifest and config of `image` say about its layers.
    fn image_layers(&self, image: &str) -> Result<ImageLayers, LazyError>;
    /// Mounts `image` at `mountpoint` (an empty directory) and returns once
    /// the mount serves.
    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), LazyError>;
    /// Whether a mount serves `mountpoint`.
    fn is_served(&self, mountpoint: &Path) -> bool;
    /// Unmounts `mountpoint` and returns once the mount is gone.
    fn unmount(&self, mountpoint: &Path) -> Result<(), LazyError>;
    /// What the daemon serving `mountpoint` reports, if one answers.
    fn mount_stats(&self, mountpoint: &Path) -> Option<MountStats>;
}

/// An image's layers, as its manifest and config describe them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayers {
    /// Whether it is a Darter image (its last layer a Darter bootstrap).
    pub is_darter: bool,
    /// `rootfs.diff_ids`; for a Darter image the blobs', then the
    /// bootstrap's.
    pub diff_ids: Vec<String>,
}

/// A lazy mount's daemon, as it reports itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountStats {
    pub pid: u32,
    /// Bytes it fetched from the registry (metadata included).
    pub backend_bytes: u64,
    pub backend_requests: u64,
}

/// Images' layers by pinned reference (`REPO@sha256:...`, which names
/// one manifest for good), most recently used last, at most `capacity`.
/// References by tag are never cached: a tag may move.
#[derive(Debug)]
pub(crate) struct LayersCache {
    capacity: usize,
    entries: Mutex<VecDeque<(String, ImageLayers)>>,
}

impl LayersCache {
    pub(crate) fn new(capacity: usize) -> LayersCache {
        LayersCache {
            capacity,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// The layers of `image`, from the cache or read through `lazy`.
    pub(crate) fn get(&self, lazy: &dyn LazyMounts, image: &str) -> Result<ImageLayers, LazyError> {
        if !is_pinned(image) {
            return lazy.image_layers(image);
        }
        if let Some(found) = self.lookup(image) {
            return Ok(found);
        }
        // Read without the lock: a registry read may take a while, and two
        // reads of one image at once only cost a second read.
        let layers = lazy.image_layers(image)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|(key, _)| key != image);
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back((image.to_owned(), layers.clone()));
        Ok(layers)
    }

    fn lookup(&self, image: &str) -> Option<ImageLayers> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let at = entries.iter().position(|(key, _)| key == image)?;
        let entry = entries.remove(at)?;
        let layers = entry.1.clone();
        entries.push_back(entry);
        Some(layers)
    }
}

/// Whether `image` names its manifest by digest.
fn is_pinned(image: &str) -> bool {
    image
        .rsplit_once('@')
        .is_some_and(|(repo, digest)| !repo.is_empty() && digest.starts_with("sha256:"))
}

/// The chain IDs of a stack of layers with these `diff_ids`, bottom first,
/// as the OCI image spec defines them: the first layer's is its diff ID,
/// each next one is `sha256(parent_chain_id + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let hash = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(hash))
            }
        };
        out.push(next);
    }
    out
}

/// The target and image of a Prepare that asks for a remote layer. CRI's
/// image reference (often by tag) is pinned to the manifest CRI resolved,
/// when it says which: the layers are then those of that manifest, and
/// cached as such.
pub(crate) fn remote_request(labels: &crate::store::Labels) -> Option<(&str, String)> {
    let target = labels.get(LABEL_TARGET)?;
    if let Some(image) = labels.get(LABEL_IMAGE_REF) {
        return Some((target.as_str(), image.clone()));
    }
    let image = labels.get(LABEL_CRI_IMAGE_REF)?;
    let pinned = match labels.get(LABEL_CRI_MANIFEST_DIGEST) {
        Some(digest) if !is_pinned(image) => format!("{}@{digest}", without_tag(image)),
        _ => image.clone(),
    };
    Some((target.as_str(), pinned))
}

/// `REPO[:TAG]` without its tag (a port's colon comes before a slash).
fn without_tag(image: &str) -> &str {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_image_spec() {
        // One layer is its own chain ID; each next one hashes "PARENT DIFF".
        let ids = chain_ids(&["sha256:a".to_owned(), "sha256:b".to_owned()]);
        assert_eq!(ids[0], "sha256:a");
        let expected = hex::encode(Sha256::digest(b"sha256:a sha256:b"));
        assert_eq!(ids[1], format!("sha256:{expected}"));
        let three = chain_ids(&[
            "sha256:a".to_owned(),
            "sha256:b".to_owned(),
            "sha256:c".to_owned(),
        ]);
        let expected = hex::encode(Sha256::digest(format!("{} sha256:c", ids[1])));
        assert_eq!(three[2], format!("sha256:{expected}"));
        assert!(chain_ids(&[]).is_empty());
    }

    /// Layers read through a counter of reads.
    #[derive(Debug, Default)]
    struct CountedReads(std::sync::atomic::AtomicUsize);

    impl LazyMounts for CountedReads {
        fn image_layers(&self, image: &str) -> Result<ImageLayers, LazyError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(ImageLayers {
                is_darter: false,
                diff_ids: vec![image.to_owned()],
            })
        }
        fn mount(&self, _: &str, _: &Path) -> Result<(), LazyError> {
            Err("not here".into())
        }
        fn is_served(&self, _: &Path) -> bool {
            false
        }
        fn unmount(&self, _: &Path) -> Result<(), LazyError> {
            Ok(())
        }
        fn mount_stats(&self, _: &Path) -> Option<MountStats> {
            None
        }
    }

    #[test]
    fn layers_of_pinned_images_are_read_once_and_the_least_recent_evicted() {
        let reads = CountedReads::default();
        let count = || reads.0.load(std::sync::atomic::Ordering::SeqCst);
        let cache = LayersCache::new(2);
        let [a, b, c] = ["r/a@sha256:1", "r/b@sha256:2", "r/c@sha256:3"];
        for _ in 0..3 {
            assert_eq!(cache.get(&reads, a).unwrap().diff_ids, [a]);
        }
        assert_eq!(count(), 1);
        cache.get(&reads, b).unwrap();
        cache.get(&reads, a).unwrap(); // `b` is now the least recent
        cache.get(&reads, c).unwrap();
        assert_eq!(count(), 3);
        cache.get(&reads, a).unwrap();
        assert_eq!(count(), 3, "a stayed");
        cache.get(&reads, b).unwrap();
        assert_eq!(count(), 4, "b was evicted");
    }

    #[test]
    fn references_by_tag_are_read_every_time() {
        let reads = CountedReads::default();
        let cache = LayersCache::new(8);
        for image in ["r/a:latest", "r/a:latest", "r/a@", "@sha256:1", "r/a@md5:1"] {
            cache.get(&reads, image).unwrap();
        }
        assert_eq!(reads.0.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[test]
    fn remote_requests_need_a_target_and_an_image() {
        let labels = |pairs: &[(&str, &str)]| -> crate::store::Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<(&'a str, &'a str)>);
        let cri_pinned = |image| {
            [
                (LABEL_TARGET, "t"),
                (LABEL_CRI_IMAGE_REF, image),
                (LABEL_CRI_MANIFEST_DIGEST, "sha256:m"),
            ]
        };
        let cases: [Case<'_>; 7] = [
            (
                &cri_pinned("127.0.0.1:5000/a/b:v1"),
                Some(("t", "127.0.0.1:5000/a/b@sha256:m")),
            ),
            (
                &cri_pinned("127.0.0.1:5000/a/b"),
                Some(("t", "127.0.0.1:5000/a/b@sha256:m")),
            ),
            (&cri_pinned("r/a@sha256:x"), Some(("t", "r/a@sha256:x"))),
            (
                &[(LABEL_TARGET, "t"), (LABEL_IMAGE_REF, "i")],
                Some(("t", "i")),
            ),
            (
                &[(LABEL_TARGET, "t"), (LABEL_CRI_IMAGE_REF, "c")],
                Some(("t", "c")),
            ),
            (&[(LABEL_TARGET, "t")], None),
            (&[(LABEL_IMAGE_REF, "i")], None),
        ];
        for (given, expected) in cases {
            let given_labels = labels(given);
            let got = remote_request(&given_labels);
            let got = got.as_ref().map(|(t, i)| (*t, i.as_str()));
            assert_eq!(got, expected, "{given:?}");
        }
    }
}
