//! Opening images from layouts and registries alike.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use darter_builder::{ImageSink, LayoutImage, LayoutSink, SourceImage};
use darter_format::DigestAlgo;
use darter_image::{BlobSource, Image, LayoutBlobs};
use darter_oci::{ImageManifest, OciDigest, OciLayout};
use darter_registry::{Client, ClientConfig, Platform};

use crate::journal::PushJournal;
use crate::reference::{ImageRef, RefError};
use crate::registry::{RegistryBlobs, RegistryImage, RegistrySink};

/// Errors opening or writing images.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Bad IMAGE argument.
    #[error(transparent)]
    Ref(#[from] RefError),
    /// Local layout problem.
    #[error(transparent)]
    Layout(#[from] darter_oci::LayoutError),
    /// Registry problem (after retries).
    #[error(transparent)]
    Registry(#[from] darter_registry::RegistryError),
    /// Opening the Darter image failed.
    #[error(transparent)]
    Image(#[from] darter_image::ImageError),
    /// Writing failed.
    #[error(transparent)]
    Build(#[from] darter_builder::BuildError),
    /// A manifest that cannot be used.
    #[error("manifest of {image}: {detail}")]
    Manifest {
        /// The image.
        image: String,
        /// What is wrong.
        detail: String,
    },
    /// The async runtime could not start.
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
}

/// A manifest and the means to read its blobs.
pub struct OpenedManifest {
    /// The image as the user named it.
    pub name: String,
    /// Manifest digest.
    pub digest: OciDigest,
    /// Manifest media type.
    pub media_type: String,
    /// The manifest's exact bytes.
    pub bytes: Vec<u8>,
    /// The manifest, parsed.
    pub manifest: ImageManifest,
    /// Its blobs.
    pub blobs: Box<dyn BlobSource>,
    /// For registry images: the repository, for cross-repository mounts.
    pub mount_from: Option<String>,
}

impl std::fmt::Debug for OpenedManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedManifest")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Where a build's push journals live and what identifies the build.
#[derive(Debug, Clone)]
pub struct PushJournalKey {
    /// The directory of journals (created when first written).
    pub dir: PathBuf,
    /// Everything that decides the build's output besides the contents of
    /// its source: the source's name (and digest, for images), the parent,
    /// the chunking and compression settings. Builds with the same key
    /// write the same blobs in the same order from the same source bytes.
    pub build: String,
}

/// The connection to registries, made on first use.
pub(crate) struct Remote {
    pub(crate) client: Client,
    pub(crate) rt: Arc<tokio::runtime::Runtime>,
}

/// Access to every kind of image store.
pub struct Stores {
    config: ClientConfig,
    remote: OnceLock<Arc<Remote>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Stores using `config` for registries.
    pub fn new(config: ClientConfig) -> Self {
        Stores {
            config,
            remote: OnceLock::new(),
        }
    }

    pub(crate) fn remote(&self) -> Result<Arc<Remote>, RemoteError> {
        if let Some(r) = self.remote.get() {
            return Ok(r.clone());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("darter-net")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let client = Client::new(self.config.clone())?;
        Ok(self
            .remote
            .get_or_init(|| {
                Arc::new(Remote {
                    client,
                    rt: Arc::new(rt),
                })
            })
            .clone())
    }

    /// Opens the manifest `image` names (for an index, the one for
    /// `platform`, the host's by default).
    pub fn open_manifest(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
    ) -> Result<OpenedManifest, RemoteError> {
        let name = image.to_string();
        let bad = |detail: String| RemoteError::Manifest {
            image: name.clone(),
            detail,
        };
        match image {
            ImageRef::Layout(r) => {
                let layout = OciLayout::open(&r.path)?;
                let desc = layout.resolve(r.tag.as_deref())?;
                let (desc, manifest) = layout.read_manifest(&desc, platform)?;
                let digest = darter_oci::descriptor_digest(&desc)?;
                let bytes = layout.read_blob(&digest, desc.size(), "manifest")?;
                Ok(OpenedManifest {
                    name,
                    digest,
                    media_type: desc.media_type().to_string(),
                    bytes,
                    manifest,
                    blobs: Box::new(LayoutBlobs::new(layout)),
                    mount_from: None,
                })
            }
            ImageRef::Registry(r) => {
                let remote = self.remote()?;
                let platform: Platform = match platform {
                    Some(p) => p
                        .parse()
                        .map_err(|e| bad(format!("bad platform {p:?}: {e}")))?,
                    None => Platform::host(),
                };
                let m = remote
                    .rt
                    .block_on(remote.client.get_manifest_for_platform(r, &platform))?;
                let manifest: ImageManifest =
                    serde_json::from_slice(&m.bytes).map_err(|e| bad(e.to_string()))?;
                let digest = oci_digest(&m.digest).map_err(bad)?;
                Ok(OpenedManifest {
                    name,
                    digest,
                    media_type: m.media_type,
                    bytes: m.bytes.to_vec(),
                    manifest,
                    blobs: Box::new(RegistryBlobs::new(remote, r.repository().clone())),
                    mount_from: Some(r.repository().path().to_owned()),
                })
            }
        }
    }

    /// Opens a Darter image for reading (bootstrap fetched and verified).
    pub fn open_image(&self, image: &ImageRef) -> Result<Image<Box<dyn BlobSource>>, RemoteError> {
        let m = self.open_manifest(image, None)?;
        Ok(Image::open(m.digest, m.manifest, m.blobs)?)
    }

    /// Opens an OCI or Docker image for conversion.
    pub fn source_image(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
    ) -> Result<Box<dyn SourceImage>, RemoteError> {
        match image {
            ImageRef::Layout(r) => Ok(Box::new(LayoutImage::open(r, platform)?)),
            ImageRef::Registry(r) => {
                let m = self.open_manifest(image, platform)?;
                let remote = self.remote()?;
                Ok(Box::new(RegistryImage::open(remote, r.clone(), m)?))
            }
        }
    }

    /// A destination for writing an image, and the tag to give it
    /// (`latest` when the reference names none).
    pub fn sink(&self, image: &ImageRef) -> Result<(Box<dyn ImageSink>, String), RemoteError> {
        self.build_sink(image, None)
    }

    /// Like [`Stores::sink`], for a build: a registry destination keeps a
    /// push journal in `journal.dir`, so that rerunning the same build after
    /// an interruption does not send again the data blobs that reached the
    /// registry, and resumes the upload it was in.
    pub fn build_sink(
        &self,
        image: &ImageRef,
        journal: Option<&PushJournalKey>,
    ) -> Result<(Box<dyn ImageSink>, String), RemoteError> {
        let tag = image.tag().unwrap_or("latest").to_owned();
        match image {
            ImageRef::Layout(r) => {
                Ok((Box::new(LayoutSink::new(OciLayout::create(&r.path)?)), tag))
            }
            ImageRef::Registry(r) => {
                if r.digest().is_some() && r.tag().is_none() {
                    return Err(RemoteError::Manifest {
                        image: r.to_string(),
                        detail: "cannot push to a digest; name a tag".into(),
                    });
                }
                let repository = r.repository();
                let journal = journal
                    .map(|key| PushJournal::open(&key.dir, &repository.to_string(), &key.build));
                let sink = RegistrySink::new(self.remote()?, repository.clone(), journal);
                Ok((Box::new(sink), tag))
            }
        }
    }

    /// Where a registry image's blobs can be mounted from (its repository),
    /// if `image` is in a registry.
    pub fn mount_from(image: &ImageRef) -> Option<String> {
        match image {
            ImageRef::Registry(r) => Some(r.repository().path().to_owned()),
            ImageRef::Layout(_) => None,
        }
    }
}

/// An OCI digest from the registry client's digest type.
pub(crate) fn oci_digest(d: &darter_registry::Digest) -> Result<OciDigest, String> {
    if d.algo() != DigestAlgo::Sha256 {
        return Err(format!("digest {d} is not sha256"));
    }
    Ok(OciDigest::from_bytes(*d.bytes()))
}

/// The registry client's digest type from an OCI digest.
pub(crate) fn registry_digest(d: &OciDigest) -> darter_registry::Digest {
    darter_registry::Digest::new(DigestAlgo::Sha256, d.bytes())
}
