//! Live counters of a chunk store.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters, updated lock-free by readers, fetchers and the prefetcher.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) backend_bytes: AtomicU64,
    pub(crate) backend_requests: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) verify_failures: AtomicU64,
    pub(crate) prefetch_bytes: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) decompressed_bytes: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Bytes received from the backend (registry, layout, peer).
    pub backend_bytes: u64,
    /// Requests sent to the backend.
    pub backend_requests: u64,
    /// Chunks served from memory or the disk cache.
    pub cache_hits: u64,
    /// Chunks that had to be fetched.
    pub cache_misses: u64,
    /// Chunks (fetched or cached) whose digest did not match.
    pub verify_failures: u64,
    /// Bytes fetched by the background prefetcher.
    pub prefetch_bytes: u64,
    /// File bytes returned to readers.
    pub read_bytes: u64,
    /// Bytes produced by decompressing frames.
    pub decompressed_bytes: u64,
    /// Compressed bytes of all the image's blob data (the whole image).
    pub image_bytes: u64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now; `image_bytes` is filled in by the store.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            backend_bytes: g(&self.backend_bytes),
            backend_requests: g(&self.backend_requests),
            cache_hits: g(&self.cache_hits),
            cache_misses: g(&self.cache_misses),
            verify_failures: g(&self.verify_failures),
            prefetch_bytes: g(&self.prefetch_bytes),
            read_bytes: g(&self.read_bytes),
            decompressed_bytes: g(&self.decompressed_bytes),
            image_bytes: 0,
        }
    }
}

/// A blob source that counts the requests and bytes it serves, so the
/// counters cover everything fetched: bootstrap and chunk tables included.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    stats: std::sync::Arc<Stats>,
}

impl<S> Counted<S> {
    /// Wraps `inner`, counting into `stats`.
    pub fn new(inner: S, stats: std::sync::Arc<Stats>) -> Self {
        Counted { inner, stats }
    }
}

impl<S: darter_image::BlobSource> darter_image::BlobSource for Counted<S> {
    fn read_range(
        &self,
        digest: &darter_oci::OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, darter_image::SourceError> {
        Stats::add(&self.stats.backend_requests, 1);
        let data = self.inner.read_range(digest, offset, len)?;
        Stats::add(&self.stats.backend_bytes, data.len() as u64);
        Ok(data)
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}
