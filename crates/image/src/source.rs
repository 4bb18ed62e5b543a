//! Where blob bytes come from.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use darter_oci::{OciDigest, OciLayout};

/// A failed blob read.
#[derive(Debug, thiserror::Error)]
#[error("reading {len} bytes at offset {offset} of blob {digest} from {source_name}: {detail}")]
pub struct SourceError {
    /// The blob.
    pub digest: String,
    /// Offset asked for.
    pub offset: u64,
    /// Length asked for.
    pub len: u64,
    /// Which source.
    pub source_name: String,
    /// What went wrong.
    pub detail: String,
}

impl SourceError {
    /// A failed read of `len` bytes at `offset` of blob `digest` from
    /// `source`, because of `detail`.
    pub fn new(
        source: &(impl BlobSource + ?Sized),
        digest: &OciDigest,
        offset: u64,
        len: u64,
        detail: impl Into<String>,
    ) -> SourceError {
        SourceError {
            digest: digest.to_string(),
            offset,
            len,
            source_name: source.name(),
            detail: detail.into(),
        }
    }
}

/// Random access to the blobs of an image, by digest.
pub trait BlobSource: Send + Sync {
    /// Reads exactly `len` bytes at `offset` of blob `digest`.
    fn read_range(&self, digest: &OciDigest, offset: u64, len: u64)
    -> Result<Vec<u8>, SourceError>;
    /// A short description for messages (`oci:/path`, a registry URL).
    fn name(&self) -> String;
}

/// Blobs in a local OCI layout.
#[derive(Debug)]
pub struct LayoutBlobs {
    layout: OciLayout,
    open: Mutex<HashMap<OciDigest, std::sync::Arc<File>>>,
}

impl LayoutBlobs {
    /// Reads blobs of `layout`.
    pub fn new(layout: OciLayout) -> Self {
        LayoutBlobs {
            layout,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &OciLayout {
        &self.layout
    }

    fn file(&self, digest: &OciDigest) -> std::io::Result<std::sync::Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(digest) {
            return Ok(f.clone());
        }
        let f = std::sync::Arc::new(File::open(self.layout.blob_path(digest))?);
        open.insert(digest.clone(), f.clone());
        Ok(f)
    }
}

impl BlobSource for LayoutBlobs {
    fn read_range(
        &self,
        digest: &OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        let err = |detail: String| SourceError::new(self, digest, offset, len, detail);
        let len_usize = usize::try_from(len).map_err(|_| err("length too large".into()))?;
        let mut buf = vec![0u8; len_usize];
        self.file(digest)
            .and_then(|f| f.read_exact_at(&mut buf, offset))
            .map_err(|e| err(e.to_string()))?;
        Ok(buf)
    }

    fn name(&self) -> String {
        format!("oci:{}", self.layout.root().display())
    }
}

impl<T: BlobSource + ?Sized> BlobSource for Box<T> {
    fn read_range(
        &self,
        digest: &OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        (**self).read_range(digest, offset, len)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

impl<T: BlobSource + ?Sized> BlobSource for std::sync::Arc<T> {
    fn read_range(
        &self,
        digest: &OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        (**self).read_range(digest, offset, len)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}
