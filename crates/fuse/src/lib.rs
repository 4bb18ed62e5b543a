//! The read-only FUSE filesystem that serves a Darter image.
//!
//! Owns: translating FUSE requests into bootstrap lookups (metadata comes
//! straight from the verified EROFS bootstrap) and chunk-store reads (file
//! data), the kernel caching policy (the image is immutable, so entries,
//! attributes, directories and pages are cached for as long as the kernel
//! likes), and mountpoint housekeeping (recovering a mountpoint left
//! behind by a dead daemon).
//!
//! Must not: fetch or verify chunks itself (that is `darter-cache`), write
//! anything, or answer a read with bytes the store did not verify.

#![forbid(unsafe_code)]

mod fs;
mod mountpoint;

pub use fs::{DarterFs, FsOptions};
pub use mountpoint::{MountpointError, prepare_mountpoint, set_readahead};
