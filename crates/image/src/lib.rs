//! Opening Darter images and reading them with every link of the digest
//! chain verified: manifest -> bootstrap -> chunk tables -> chunks.
//!
//! Owns: locating the bootstrap and blobs of an image through a
//! [`BlobSource`] (an OCI layout here; registries and caches plug in the
//! same way), verified chunk reads ([`Image::read_chunk`]), and the
//! whole-image operations built on them: [`unpack`], [`export`], [`check`]
//! and [`inspect`].
//!
//! Must not: write images (that is `darter-builder`), talk to the network
//! itself, or trust any byte it did not verify against a digest.

#![forbid(unsafe_code)]

mod check;
mod error;
mod export;
mod image;
mod inspect;
mod source;
mod unpack;

pub use check::{CheckReport, Problem, check};
pub use error::ImageError;
pub use export::{ExportReport, export};
pub use image::{ChunkLocation, Image};
pub use inspect::{BlobStats, ImageStats, inspect};
pub use source::{BlobSource, LayoutBlobs, SourceError};
pub use unpack::{UnpackReport, unpack};

use darter_oci::{ImageManifest, LayoutRef, OciDigest, OciLayout};

/// Finds the manifest `reference` names in a local OCI layout: its
/// digest, the manifest, and the layout's blobs, ready for [`Image::open`].
pub fn resolve_layout(
    reference: &LayoutRef,
) -> Result<(OciDigest, ImageManifest, LayoutBlobs), ImageError> {
    let layout = OciLayout::open(&reference.path)?;
    let desc = layout.resolve(reference.tag.as_deref())?;
    let (desc, manifest) = layout.read_manifest(&desc, None)?;
    let digest = darter_oci::descriptor_digest(&desc)?;
    Ok((digest, manifest, LayoutBlobs::new(layout)))
}

/// Opens the Darter image `reference` names in a local OCI layout.
pub fn open_layout(reference: &LayoutRef) -> Result<Image<LayoutBlobs>, ImageError> {
    let (digest, manifest, blobs) = resolve_layout(reference)?;
    Image::open(digest, manifest, blobs)
}
