//! OCI media types and annotations of Darter images (see `docs/format.md`).

/// Media type of a blob layer.
pub const MEDIA_TYPE_BLOB: &str = "application/vnd.darter.blob.v1";
/// Media type of the bootstrap layer (zstd-compressed EROFS image).
pub const MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.darter.bootstrap.v1+zstd";
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
