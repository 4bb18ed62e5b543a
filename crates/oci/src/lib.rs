//! OCI image layouts on disk (the `oci:PATH[:TAG]` transport): reading and
//! writing blobs with digest verification, manifests, and tags in
//! `index.json`, plus the OCI and Docker media types images come in.
//!
//! This crate owns the on-disk layout directory and nothing else: it knows
//! nothing about Darter's own format (see `darter-format`) nor about
//! registries (see `darter-registry`). Writes are atomic (temp file +
//! rename), so an interrupted build never leaves a half blob or a broken
//! `index.json`.

#![forbid(unsafe_code)]

mod digest;
mod layout;
pub mod media;
mod reference;

pub use digest::{OciDigest, Sha256Writer};
pub use layout::{
    BlobUpload, LayoutError, MAX_JSON_SIZE, OciLayout, descriptor_digest, host_platform,
};
pub use reference::{LayoutRef, ReferenceError};

pub use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
