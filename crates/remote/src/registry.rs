//! Registries behind Darter's synchronous interfaces.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use darter_builder::{BlobSink, BuildError, COPY_PIECE, ImageSink, SourceImage, Transfer};
use darter_image::{BlobSource, SourceError};
use darter_oci::{Descriptor, ImageManifest, OciDigest};
use darter_registry::{PushOutcome, Reference, Repository, StreamingUpload};

use crate::stores::{OpenedManifest, Remote, RemoteError, oci_digest, registry_digest};

/// Blobs up to this size are buffered and pushed whole (after a HEAD that
/// skips them if present); larger ones stream as they are written.
const BUFFERED_BLOB_LIMIT: usize = 8 << 20;
/// A streaming upload sends this much per append.
const STREAM_PIECE: usize = 8 << 20;

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
        let err = |detail: String| SourceError {
            digest: digest.to_string(),
            offset,
            len,
            source_name: self.name(),
            detail,
        };
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

/// A registry repository as a destination. Counts what it sends.
pub struct RegistrySink {
    remote: Arc<Remote>,
    repository: Repository,
    sent: Arc<AtomicU64>,
}

impl RegistrySink {
    pub(crate) fn new(remote: Arc<Remote>, repository: Repository) -> Self {
        RegistrySink {
            remote,
            repository,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> BuildError {
        BuildError::Destination {
            destination: self.name(),
            detail: e.to_string(),
        }
    }

    /// Pushes a blob held in memory, unless the registry has it.
    fn push_bytes(&self, data: Bytes) -> Result<(OciDigest, u64), BuildError> {
        let digest = OciDigest::of(&data);
        let size = data.len() as u64;
        let outcome = self
            .remote
            .rt
            .block_on(self.remote.client.push_blob(
                &self.repository,
                &registry_digest(&digest),
                &darter_registry::BlobSource::Bytes(data),
                None,
            ))
            .map_err(|e| self.fail(e))?;
        if outcome == PushOutcome::Uploaded {
            self.sent.fetch_add(size, Ordering::Relaxed);
        }
        Ok((digest, size))
    }
}

impl std::fmt::Debug for RegistrySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySink")
            .field("repository", &self.repository.to_string())
            .finish()
    }
}

impl ImageSink for RegistrySink {
    fn name(&self) -> String {
        self.repository.to_string()
    }

    fn begin_blob(&self) -> Result<Box<dyn BlobSink>, BuildError> {
        Ok(Box::new(RegistryUpload {
            sink: RegistrySink {
                remote: self.remote.clone(),
                repository: self.repository.clone(),
                sent: self.sent.clone(),
            },
            buffer: Vec::new(),
            stream: None,
            hasher: darter_oci::Sha256Writer::new(io::sink()),
        }))
    }

    fn put_blob(&self, data: &[u8]) -> Result<(OciDigest, u64), BuildError> {
        self.push_bytes(Bytes::copy_from_slice(data))
    }

    fn ensure_blob(
        &self,
        digest: &OciDigest,
        size: u64,
        source: &dyn BlobSource,
        mount_from: Option<&str>,
    ) -> Result<Transfer, BuildError> {
        let client = &self.remote.client;
        let rd = registry_digest(digest);
        if self
            .remote
            .rt
            .block_on(client.blob_size(&self.repository, &rd))
            .map_err(|e| self.fail(e))?
            .is_some()
        {
            return Ok(Transfer::Present);
        }
        if let Some(from) = mount_from {
            let from = Repository::parse(&format!("{}/{from}", self.repository.registry()))
                .map_err(|e| self.fail(e))?;
            if self
                .remote
                .rt
                .block_on(client.mount_blob(&self.repository, &rd, &from))
                .map_err(|e| self.fail(e))?
            {
                return Ok(Transfer::Mounted);
            }
        }
        let mut upload = self
            .remote
            .rt
            .block_on(client.begin_streaming_upload(&self.repository))
            .map_err(|e| self.fail(e))?;
        let mut offset = 0;
        while offset < size {
            let piece = source.read_range(digest, offset, COPY_PIECE.min(size - offset))?;
            offset += piece.len() as u64;
            self.remote
                .rt
                .block_on(upload.append(Bytes::from(piece)))
                .map_err(|e| self.fail(e))?;
        }
        self.remote
            .rt
            .block_on(upload.finish(&rd))
            .map_err(|e| self.fail(e))?;
        self.sent.fetch_add(size, Ordering::Relaxed);
        Ok(Transfer::Copied(size))
    }

    fn put_manifest(
        &self,
        data: &[u8],
        media_type: &str,
        tag: &str,
    ) -> Result<OciDigest, BuildError> {
        let reference =
            Reference::with_tag(self.repository.clone(), tag).map_err(|e| self.fail(e))?;
        let digest = self
            .remote
            .rt
            .block_on(self.remote.client.put_manifest(
                &reference,
                media_type,
                Bytes::copy_from_slice(data),
            ))
            .map_err(|e| self.fail(e))?;
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        oci_digest(&digest).map_err(|e| self.fail(e))
    }

    fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// A blob being pushed as the builder writes it: buffered while small,
/// streamed in pieces once it is not.
struct RegistryUpload {
    sink: RegistrySink,
    buffer: Vec<u8>,
    stream: Option<StreamingUpload>,
    hasher: darter_oci::Sha256Writer<io::Sink>,
}

impl RegistryUpload {
    fn send_buffer(&mut self) -> io::Result<()> {
        let sink = &self.sink;
        if self.stream.is_none() {
            let started = sink
                .remote
                .rt
                .block_on(sink.remote.client.begin_streaming_upload(&sink.repository));
            self.stream = Some(started.map_err(io::Error::other)?);
        }
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let len = data.len() as u64;
        if let Some(stream) = self.stream.as_mut() {
            sink.remote
                .rt
                .block_on(stream.append(data))
                .map_err(io::Error::other)?;
        }
        sink.sent.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for RegistryUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write_all(buf)?;
        self.buffer.extend_from_slice(buf);
        let limit = if self.stream.is_some() {
            STREAM_PIECE
        } else {
            BUFFERED_BLOB_LIMIT
        };
        if self.buffer.len() >= limit {
            self.send_buffer()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobSink for RegistryUpload {
    fn commit(mut self: Box<Self>) -> io::Result<(OciDigest, u64)> {
        let (_, digest, size) =
            std::mem::replace(&mut self.hasher, darter_oci::Sha256Writer::new(io::sink())).finish();
        if self.stream.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buffer));
            return self.sink.push_bytes(data).map_err(io::Error::other);
        }
        self.send_buffer()?;
        let sink = &self.sink;
        if let Some(stream) = self.stream.take() {
            sink.remote
                .rt
                .block_on(stream.finish(&registry_digest(&digest)))
                .map_err(io::Error::other)?;
        }
        Ok((digest, size))
    }
}

impl Drop for RegistryUpload {
    fn drop(&mut self) {
        // An upload dropped before commit (a failed build) is abandoned so
        // the registry can discard its session.
        if let Some(stream) = self.stream.take() {
            self.sink.remote.rt.block_on(stream.cancel());
        }
    }
}
