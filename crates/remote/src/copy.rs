//! Copying images between layouts and registries, sending only what the
//! destination lacks.

use darter_builder::Transfer;

use crate::reference::ImageRef;
use crate::stores::{RemoteError, Stores};

/// What [`copy`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyReport {
    /// The destination image.
    pub image: String,
    /// Manifest digest (unchanged by copying).
    pub manifest_digest: String,
    /// Blobs the image references (config and layers).
    pub blobs: usize,
    /// Their total size.
    pub image_bytes: u64,
    /// Blobs the destination already had.
    pub present: usize,
    /// Blobs mounted from another repository of the same registry.
    pub mounted: usize,
    /// Blobs copied.
    pub copied: usize,
    /// Bytes sent to the destination.
    pub sent_bytes: u64,
}

/// Copies `from` to `to`: every blob the destination lacks, then the
/// manifest, byte for byte (so its digest does not change). Re-running an
/// interrupted copy sends only what is still missing.
pub fn copy(stores: &Stores, from: &ImageRef, to: &ImageRef) -> Result<CopyReport, RemoteError> {
    let m = stores.open_manifest(from, None)?;
    let (sink, tag) = stores.sink(to)?;
    let same_registry = match (from, to) {
        (ImageRef::Registry(a), ImageRef::Registry(b)) => a.registry() == b.registry(),
        _ => false,
    };
    let mount_from = if same_registry {
        m.mount_from.as_deref()
    } else {
        None
    };
    let mut report = CopyReport {
        image: format!("{}:{tag}", sink.name()),
        ..CopyReport::default()
    };
    for desc in std::iter::once(m.manifest.config()).chain(m.manifest.layers()) {
        let digest = darter_oci::descriptor_digest(desc)?;
        report.blobs += 1;
        report.image_bytes += desc.size();
        match sink.ensure_blob(&digest, desc.size(), m.blobs.as_ref(), mount_from)? {
            Transfer::Present => report.present += 1,
            Transfer::Mounted => report.mounted += 1,
            Transfer::Copied(_) => report.copied += 1,
        }
    }
    report.manifest_digest = sink
        .put_manifest(&m.bytes, &m.media_type, &tag)?
        .to_string();
    report.sent_bytes = sink.sent_bytes();
    Ok(report)
}
