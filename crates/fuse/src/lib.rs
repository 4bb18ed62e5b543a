//! The read-only FUSE filesystem that serves a Darter image.
//!
//! Owns: translating FUSE requests into bootstrap lookups (metadata comes
//! straight from the verified EROFS bootstrap) and chunk-store reads (file
//! data), the kernel caching policy (the image is immutable, so entries,
//! attributes, directories and pages are cached for as long as the kernel
//! likes), and mountpoint housekeeping (recovering a mountpoint left
//! behind by a dead daemon). For the kernel EROFS path it serves the
//! devices filesystem (`devices.rs`): the verified bootstrap and each
//! blob's uncompressed address space as files, which the kernel's EROFS
//! driver mounts. `takeover.rs` serves a connection another process
//! mounted (a restarted daemon): a replayed FUSE_INIT, a relay between the
//! device and the session, and the kernel's resend of unanswered requests.
//!
//! Must not: fetch or verify chunks itself (that is `darter-cache`), write
//! anything, or answer a read with bytes the store did not verify.

#![forbid(unsafe_code)]

mod devices;
mod fs;
mod mountpoint;
mod takeover;

pub use devices::{BOOTSTRAP_FILE, DevicesFs, device_file};
pub use fs::{DarterFs, FsOptions};
pub use mountpoint::{
    MountpointError, TopMount, prepare_mountpoint, set_readahead, top_mount, top_mount_in,
};
pub use takeover::{AbiSlot, KernelAbi, TakenOver, TakeoverError, resend_unanswered, take_over};
