//! Where a built image goes: an OCI layout here, a registry in
//! `darter-remote`. Blobs are streamed into the sink as they are written.

use std::io::{self, Write};

use darter_image::BlobSource;
use darter_oci::{OciDigest, OciLayout};

use crate::BuildError;

/// One blob being written; it becomes visible only when committed.
pub trait BlobSink: Write + Send {
    /// Makes the blob durable and visible; returns its sha256 digest and size.
    fn commit(self: Box<Self>) -> io::Result<(OciDigest, u64)>;
}

impl BlobSink for darter_oci::BlobUpload {
    fn commit(self: Box<Self>) -> io::Result<(OciDigest, u64)> {
        darter_oci::BlobUpload::commit(*self).map_err(io::Error::other)
    }
}

/// What [`ImageSink::ensure_blob`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// The destination already had it.
    Present,
    /// Linked from another repository of the same registry.
    Mounted,
    /// Copied; this many bytes were sent.
    Copied(u64),
}

/// A destination for images.
pub trait ImageSink: Sync {
    /// A description for messages (`oci:/path`, `registry/repo`).
    fn name(&self) -> String;
    /// Starts a new blob, streamed as it is written.
    fn begin_blob(&self) -> Result<Box<dyn BlobSink>, BuildError>;
    /// Stores a small blob from memory (config, bootstrap), skipping it if present.
    fn put_blob(&self, data: &[u8]) -> Result<(OciDigest, u64), BuildError>;
    /// Makes sure the destination has blob `digest` (of `size` bytes),
    /// copying it from `source` if not: a blob the image references but
    /// this build did not write (a parent's, or anything `copy` moves).
    /// `mount_from` names a repository of the same registry that has it.
    fn ensure_blob(
        &self,
        digest: &OciDigest,
        size: u64,
        source: &dyn BlobSource,
        mount_from: Option<&str>,
    ) -> Result<Transfer, BuildError>;
    /// Stores the manifest and points `tag` at it.
    fn put_manifest(
        &self,
        data: &[u8],
        media_type: &str,
        tag: &str,
    ) -> Result<OciDigest, BuildError>;
    /// Bytes sent to the destination so far.
    fn sent_bytes(&self) -> u64;
}

/// Copying blobs between stores reads this much at a time.
pub const COPY_PIECE: u64 = 8 << 20;

/// An OCI layout as a sink.
#[derive(Debug)]
pub struct LayoutSink {
    layout: OciLayout,
    sent: std::sync::atomic::AtomicU64,
}

impl LayoutSink {
    /// Writes into `layout`.
    pub fn new(layout: OciLayout) -> Self {
        LayoutSink {
            layout,
            sent: 0.into(),
        }
    }

    fn count(&self, n: u64) {
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ImageSink for LayoutSink {
    fn name(&self) -> String {
        format!("oci:{}", self.layout.root().display())
    }

    fn begin_blob(&self) -> Result<Box<dyn BlobSink>, BuildError> {
        Ok(Box::new(self.layout.begin_blob()?))
    }

    fn put_blob(&self, data: &[u8]) -> Result<(OciDigest, u64), BuildError> {
        let digest = OciDigest::of(data);
        if !self.layout.has_blob(&digest) {
            self.layout.put_blob(data)?;
            self.count(data.len() as u64);
        }
        Ok((digest, data.len() as u64))
    }

    fn ensure_blob(
        &self,
        digest: &OciDigest,
        size: u64,
        source: &dyn BlobSource,
        _mount_from: Option<&str>,
    ) -> Result<Transfer, BuildError> {
        if self.layout.has_blob(digest) {
            return Ok(Transfer::Present);
        }
        let mut upload = self.layout.begin_blob()?;
        let mut offset = 0;
        while offset < size {
            let piece = source.read_range(digest, offset, COPY_PIECE.min(size - offset))?;
            upload
                .write_all(&piece)
                .map_err(|e| BuildError::io("write", self.name().as_bytes(), e))?;
            offset += piece.len() as u64;
        }
        let (copied, _) = upload.commit()?;
        if &copied != digest {
            return Err(BuildError::DigestMismatch {
                what: format!("blob copied from {}", source.name()),
                expected: digest.to_string(),
                actual: copied.to_string(),
            });
        }
        self.count(size);
        Ok(Transfer::Copied(size))
    }

    fn put_manifest(
        &self,
        data: &[u8],
        media_type: &str,
        tag: &str,
    ) -> Result<OciDigest, BuildError> {
        let (digest, size) = self.put_blob(data)?;
        let desc: darter_oci::Descriptor = serde_json::from_value(serde_json::json!({
            "mediaType": media_type, "digest": digest.as_str(), "size": size,
        }))
        .map_err(|e| BuildError::Source {
            what: "manifest descriptor".into(),
            detail: e.to_string(),
        })?;
        self.layout.set_tag(desc, tag)?;
        Ok(digest)
    }

    fn sent_bytes(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}
