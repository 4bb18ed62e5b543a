//! OCI media types and annotations of Darter images (see `docs/format.md`).

// On-disk format: changing a media type changes the format.
//
// Both types sit under `application/vnd.oci.image.layer.`, the prefix by
// which containerd (`images.IsLayerType`) and CRI tell layers from other
// blobs: only then do they label a layer's Prepare for a remote snapshotter
// and skip downloading what it already provides.

/// Media type of a blob layer.
pub const MEDIA_TYPE_BLOB: &str = "application/vnd.oci.image.layer.darter.blob.v1";
/// Media type of the bootstrap layer (zstd-compressed EROFS image).
pub const MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.oci.image.layer.darter.bootstrap.v1+zstd";
/// The blob media type of images built before layer media types; still read.
pub const LEGACY_MEDIA_TYPE_BLOB: &str = "application/vnd.darter.blob.v1";
/// The bootstrap media type of images built before layer media types; still
/// read.
pub const LEGACY_MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.darter.bootstrap.v1+zstd";

/// Whether a layer of this media type is a Darter bootstrap.
pub fn is_bootstrap_media_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_BOOTSTRAP || media_type == LEGACY_MEDIA_TYPE_BOOTSTRAP
}

/// Whether a layer of this media type is a Darter blob.
pub fn is_blob_media_type(media_type: &str) -> bool {
    media_type == MEDIA_TYPE_BLOB || media_type == LEGACY_MEDIA_TYPE_BLOB
}
/// Annotation on every layer and the manifest: the format version.
pub const ANNOTATION_VERSION: &str = "dev.darter.version";
/// Annotation on the bootstrap layer: sha256 of the uncompressed bootstrap.
pub const ANNOTATION_BOOTSTRAP_DIGEST: &str = "dev.darter.bootstrap.uncompressed-digest";
/// Annotation on the bootstrap layer: size of the uncompressed bootstrap.
pub const ANNOTATION_BOOTSTRAP_SIZE: &str = "dev.darter.bootstrap.uncompressed-size";
/// Annotation on a blob layer: digest of its chunk table.
pub const ANNOTATION_TABLE_DIGEST: &str = "dev.darter.blob.table-digest";
/// Annotation on a blob layer: size of its uncompressed address space.
pub const ANNOTATION_UNCOMPRESSED_SIZE: &str = "dev.darter.blob.uncompressed-size";
/// Annotation on the manifest: the chunk size.
pub const ANNOTATION_CHUNK_SIZE: &str = "dev.darter.chunk-size";
/// Annotation on the manifest: the chunk digest algorithm.
pub const ANNOTATION_DIGEST_ALGO: &str = "dev.darter.digest";
/// Annotation on the manifest: the image it was converted from, if any.
pub const ANNOTATION_SOURCE: &str = "dev.darter.source";
/// Value of [`ANNOTATION_VERSION`].
pub const FORMAT_VERSION: &str = "1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_and_legacy_media_types_are_recognised_and_kept_apart() {
        let cases = [
            (MEDIA_TYPE_BOOTSTRAP, true, false),
            (LEGACY_MEDIA_TYPE_BOOTSTRAP, true, false),
            (MEDIA_TYPE_BLOB, false, true),
            (LEGACY_MEDIA_TYPE_BLOB, false, true),
            ("application/vnd.oci.image.layer.v1.tar+gzip", false, false),
            (
                "application/vnd.oci.image.layer.darter.bootstrap.v1",
                false,
                false,
            ),
        ];
        for (media_type, bootstrap, blob) in cases {
            assert_eq!(
                is_bootstrap_media_type(media_type),
                bootstrap,
                "{media_type}"
            );
            assert_eq!(is_blob_media_type(media_type), blob, "{media_type}");
        }
        for current in [MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP] {
            assert!(current.starts_with("application/vnd.oci.image.layer."));
        }
    }
}
