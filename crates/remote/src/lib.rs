//! Images wherever they live.
//!
//! Owns: the IMAGE syntax users type (`oci:PATH[:TAG]`, or a registry
//! reference with or without `docker://`), opening a manifest from either
//! kind of store, and adapting registries (async, `darter-registry`) to
//! the synchronous interfaces the rest of Darter uses: a
//! [`darter_image::BlobSource`] of HTTP range reads for mounts and checks,
//! a [`darter_builder::SourceImage`] streaming layers for conversion, and
//! a [`darter_builder::ImageSink`] that pushes while the builder writes,
//! uploading only what the registry lacks, and keeps a push journal so that
//! a rerun of an interrupted build skips or resumes the data blobs already
//! sent (a hint only: the registry and the rebuilt bytes are checked).
//! [`copy`] moves images between any two stores.
//!
//! Must not: parse image formats (`darter-format`, `darter-oci`) or
//! implement the registry protocol (`darter-registry`).

#![forbid(unsafe_code)]

mod copy;
mod journal;
mod push;
mod reference;
mod registry;
mod stores;

pub use copy::{CopyReport, copy};
pub use reference::{ImageRef, RefError};
pub use registry::{RegistryBlobs, RegistryImage, RegistrySink};
pub use stores::{OpenedManifest, PushJournalKey, RemoteError, Stores};
