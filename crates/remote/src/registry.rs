//! Registries behind Darter's synchronous interfaces.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use darter_builder::{BlobSink, BuildError, COPY_PIECE, ImageSink, SourceImage, Transfer};
use darter_image::{BlobSource, SourceError};
use darter_oci::{Descriptor, ImageManifest, OciDigest};
use darter_registry::{Reference, Repository};

use crate::journal::PushJournal;
use crate::push::Pusher;
use crate::stores::{OpenedManifest, Remote, RemoteError, oci_digest, registry_digest};

/// A registry repository's blobs, read by HTTP range requests.
pub struct RegistryBlobs {
    remote: Arc<Remote>,
    repository: Repository,
}

impl RegistryBlobs {
    pub(crate) fn new(remote: Arc<Remote>, repository: Repository) -> Self {
        RegistryBlobs { remote, repository }
    }
}

impl std::fmt::Debug for RegistryBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBlobs")
            .field("repository", &self.repository.to_string())
            .finish()
    }
}

impl BlobSource for RegistryBlobs {
    fn read_range(
        &self,
        digest: &OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        let err = |detail: String| SourceError::new(self, digest, offset, len, detail);
        if len == 0 {
            return Ok(Vec::new());
        }
        let slice = self
            .remote
            .rt
            .block_on(self.remote.client.get_blob_range(
                &self.repository,
                &registry_digest(digest),
                offset..offset + len,
            ))
            .map_err(|e| err(e.to_string()))?;
        if slice.offset != offset || slice.data.len() as u64 != len {
            return Err(err(format!(
                "registry returned {} bytes at {} instead",
                slice.data.len(),
                slice.offset
            )));
        }
        Ok(slice.data.to_vec())
    }

    fn name(&self) -> String {
        self.repository.to_string()
    }
}

/// An image in a registry, for conversion: layers stream from the registry.
pub struct RegistryImage {
    remote: Arc<Remote>,
    reference: Reference,
    opened: OpenedManifest,
    config: serde_json::Value,
}

impl RegistryImage {
    pub(crate) fn open(
        remote: Arc<Remote>,
        reference: Reference,
        opened: OpenedManifest,
    ) -> Result<Self, RemoteError> {
        let config_desc = opened.manifest.config();
        let digest = darter_oci::descriptor_digest(config_desc)?;
        if config_desc.size() > darter_oci::MAX_JSON_SIZE {
            return Err(RemoteError::Manifest {
                image: opened.name.clone(),
                detail: format!("config of {} bytes", config_desc.size()),
            });
        }
        let raw = opened
            .blobs
            .read_range(&digest, 0, config_desc.size())
            .map_err(BuildError::from)?;
        if OciDigest::of(&raw) != digest {
            return Err(RemoteError::Manifest {
                image: opened.name.clone(),
                detail: format!("config does not match its digest {digest}"),
            });
        }
        let config = darter_builder::parse_config(&raw, &digest)?;
        Ok(RegistryImage {
            remote,
            reference,
            opened,
            config,
        })
    }
}

impl std::fmt::Debug for RegistryImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryImage")
            .field("reference", &self.reference.to_string())
            .finish_non_exhaustive()
    }
}

impl SourceImage for RegistryImage {
    fn name(&self) -> String {
        self.reference.to_string()
    }
    fn manifest_digest(&self) -> &OciDigest {
        &self.opened.digest
    }
    fn manifest(&self) -> &ImageManifest {
        &self.opened.manifest
    }
    fn config(&self) -> &serde_json::Value {
        &self.config
    }
    fn open_layer(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, BuildError> {
        let digest = darter_oci::descriptor_digest(desc)?;
        let stream = self
            .remote
            .rt
            .block_on(
                self.remote
                    .client
                    .get_blob(self.reference.repository(), &registry_digest(&digest)),
            )
            .map_err(|e| BuildError::layer(digest.as_str(), e.to_string()))?;
        let reader = tokio_util::io::SyncIoBridge::new_with_handle(
            stream.into_reader(),
            self.remote.rt.handle().clone(),
        );
        Ok(Box::new(reader))
    }
}

/// A registry repository as a destination. Counts what it sends. With a
/// push journal, a rerun of an interrupted push skips or resumes the data
/// blobs it had sent (see `push.rs`); the `n`th blob begun is the journal's
/// blob `n`, which the builder's determinism makes the same blob each run.
pub struct RegistrySink {
    pusher: Arc<Pusher>,
}

impl RegistrySink {
    pub(crate) fn new(
        remote: Arc<Remote>,
        repository: Repository,
        journal: Option<PushJournal>,
    ) -> Self {
        RegistrySink {
            pusher: Arc::new(Pusher::new(remote, repository, journal)),
        }
    }
}

impl std::fmt::Debug for RegistrySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySink")
            .field("repository", &self.pusher.name())
            .finish()
    }
}

impl ImageSink for RegistrySink {
    fn name(&self) -> String {
        self.pusher.name()
    }

    fn begin_blob(&self) -> Result<Box<dyn BlobSink>, BuildError> {
        Ok(Box::new(self.pusher.begin_blob()))
    }

    fn put_blob(&self, data: &[u8]) -> Result<(OciDigest, u64), BuildError> {
        let digest = OciDigest::of(data);
        let size = data.len() as u64;
        let source = Bytes::copy_from_slice(data).into();
        let pusher = &self.pusher;
        pusher
            .push(&digest, size, &source)
            .map_err(|e| pusher.fail(e))?;
        Ok((digest, size))
    }

    fn ensure_blob(
        &self,
        digest: &OciDigest,
        size: u64,
        source: &dyn BlobSource,
        mount_from: Option<&str>,
    ) -> Result<Transfer, BuildError> {
        let pusher = &self.pusher;
        let (remote, repository) = (&pusher.remote, &pusher.repository);
        let client = &remote.client;
        let rd = registry_digest(digest);
        if remote
            .rt
            .block_on(client.blob_size(repository, &rd))
            .map_err(|e| pusher.fail(e))?
            .is_some()
        {
            return Ok(Transfer::Present);
        }
        if let Some(from) = mount_from {
            let from = Repository::parse(&format!("{}/{from}", repository.registry()))
                .map_err(|e| pusher.fail(e))?;
            if remote
                .rt
                .block_on(client.mount_blob(repository, &rd, &from))
                .map_err(|e| pusher.fail(e))?
            {
                return Ok(Transfer::Mounted);
            }
        }
        let mut upload = remote
            .rt
            .block_on(client.begin_streaming_upload(repository))
            .map_err(|e| pusher.fail(e))?;
        let mut offset = 0;
        while offset < size {
            let piece = source.read_range(digest, offset, COPY_PIECE.min(size - offset))?;
            offset += piece.len() as u64;
            remote
                .rt
                .block_on(upload.append(Bytes::from(piece)))
                .map_err(|e| pusher.fail(e))?;
        }
        remote
            .rt
            .block_on(upload.finish(&rd))
            .map_err(|e| pusher.fail(e))?;
        pusher.count_sent(size);
        Ok(Transfer::Copied(size))
    }

    fn put_manifest(
        &self,
        data: &[u8],
        media_type: &str,
        tag: &str,
    ) -> Result<OciDigest, BuildError> {
        let pusher = &self.pusher;
        let reference =
            Reference::with_tag(pusher.repository.clone(), tag).map_err(|e| pusher.fail(e))?;
        let digest = pusher
            .remote
            .rt
            .block_on(pusher.remote.client.put_manifest(
                &reference,
                media_type,
                Bytes::copy_from_slice(data),
            ))
            .map_err(|e| pusher.fail(e))?;
        pusher.count_sent(data.len() as u64);
        pusher.complete();
        oci_digest(&digest).map_err(|e| pusher.fail(e))
    }

    fn sent_bytes(&self) -> u64 {
        self.pusher.sent_bytes()
    }
}
