//! Darter's OCI Distribution registry client.
//!
//! Owns everything between Darter and a registry: image [`Reference`]s
//! (docker's grammar and defaults), credentials (explicit, docker's
//! `config.json`, credential helpers), authentication (Basic; Bearer tokens
//! cached per scope and renewed before expiry or after a 401, so long-lived
//! mounts keep working), and the operations: manifests (get, verify, pick a
//! platform, put), blobs (HEAD, verified resumable streams, exact range
//! reads, pushes with dedup, cross-repository mounts and chunked uploads,
//! and [`StreamingUpload`]s of blobs produced on the fly whose size and
//! digest are known only at the end, resumable from an [`UploadCheckpoint`]).
//! Transient failures are retried with backoff within a per-operation
//! deadline; everything else is a [`RegistryError`] naming the operation,
//! repository, digest and URL.
//!
//! It must not: interpret image contents (that is `darter-oci`/`darter-format`),
//! buffer whole blobs in memory, follow redirects with credentials to other
//! hosts, or let a secret reach a log line, `Debug` output or an error.
//!
//! ```no_run
//! # async fn demo() -> Result<(), darter_registry::RegistryError> {
//! use darter_registry::{Client, ClientConfig, Platform, Reference};
//! let client = Client::new(ClientConfig::default())?;
//! let reference: Reference = "debian:bookworm".parse().expect("valid reference");
//! let manifest = client.get_manifest_for_platform(&reference, &Platform::host()).await?;
//! println!("{} {}", manifest.media_type, manifest.digest);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod auth;
mod blob;
mod client;
mod config;
mod credentials;
mod error;
pub mod manifest;
mod reference;
mod streaming_upload;
mod upload;

pub use blob::{BlobRange, BlobSlice, BlobStream};
pub use client::Client;
pub use config::{ClientConfig, RetryPolicy};
pub use credentials::{Credential, CredentialError, CredentialSource, Secret};
pub use darter_format::Digest;
pub use error::{ErrorKind, OperationContext, RegistryError};
pub use manifest::{Manifest, Platform};
pub use reference::{DEFAULT_TAG, DOCKER_HUB, Reference, ReferenceError, Repository};
pub use streaming_upload::{StreamingUpload, UploadCheckpoint};
pub use upload::{BlobSource, PushOutcome};
