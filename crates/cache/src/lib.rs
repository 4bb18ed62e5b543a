//! Serving file bytes of a Darter image from a verified chunk cache.
//!
//! Owns: the on-disk chunk cache shared by every mount ([`CacheDir`]:
//! chunks appended to pack files and found through an in-memory index,
//! verification on every read, LRU garbage collection of whole packs), and
//! the [`ChunkStore`] that answers "bytes `[off, off+len)` of this file":
//! memory, then disk, then the backend, fetching missing frames in merged
//! ranged requests, in parallel, with concurrent readers of one frame
//! waiting on a single fetch, and an optional background prefetch of
//! everything.
//!
//! Must not: know about FUSE or HTTP (backends are `darter_image::BlobSource`),
//! or return a byte that did not match its chunk digest.

#![forbid(unsafe_code)]

mod disk;
mod memory;
mod pack;
mod stats;
mod store;

pub use disk::{CacheDir, CacheError, CacheWriter, GcReport, default_cache_dir};
pub use stats::{Counted, Stats, StatsSnapshot};
pub use store::{ChunkStore, ReadError, StoreOptions};
