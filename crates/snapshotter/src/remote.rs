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

use std::fmt::Debug;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// containerd's label naming the committed snapshot a Prepare is for.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The image a remote layer belongs to, as `darter pull` labels it.
/// containerd passes only labels under `containerd.io/snapshot/` on to a
/// snapshotter, hence the prefix.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/dev.darter.image-ref";
/// The same, as containerd's CRI plugin labels it.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

/// An error from a [`LazyMounts`] implementation.
pub type LazyError = Box<dyn std::error::Error + Send + Sync>;

/// What the snapshotter needs to serve Darter images lazily. The `darter`
/// binary implements it (registry reads, `darter mount -d`); the
/// snapshotter itself mounts nothing.
pub trait LazyMounts: Send + Sync + Debug {
    /// The `rootfs.diff_ids` of `image` if it is a Darter image, `None`
    /// if it is another kind of image.
    fn darter_diff_ids(&self, image: &str) -> Result<Option<Vec<String>>, LazyError>;
    /// Mounts `image` at `mountpoint` (an empty directory) and returns once
    /// the mount serves.
    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), LazyError>;
    /// Whether a mount serves `mountpoint`.
    fn is_served(&self, mountpoint: &Path) -> bool;
    /// Unmounts `mountpoint` and returns once the mount is gone.
    fn unmount(&self, mountpoint: &Path) -> Result<(), LazyError>;
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

/// The target and image of a Prepare that asks for a remote layer.
pub(crate) fn remote_request(labels: &crate::store::Labels) -> Option<(&str, &str)> {
    let target = labels.get(LABEL_TARGET)?;
    let image = labels
        .get(LABEL_IMAGE_REF)
        .or_else(|| labels.get(LABEL_CRI_IMAGE_REF))?;
    Some((target.as_str(), image.as_str()))
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

    #[test]
    fn remote_requests_need_a_target_and_an_image() {
        let labels = |pairs: &[(&str, &str)]| -> crate::store::Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<(&'a str, &'a str)>);
        let cases: [Case<'_>; 4] = [
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
            assert_eq!(remote_request(&labels(given)), expected, "{given:?}");
        }
    }
}
