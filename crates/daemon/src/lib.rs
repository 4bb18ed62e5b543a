//! Running Darter mounts.
//!
//! Owns: the node daemon (`node.rs`, `darter daemon`): one process serving
//! every lazy mount of the node, with one chunk cache handle, one signal
//! handler, one Prometheus endpoint, and a local API (HTTP over a unix
//! socket, so `curl --unix-socket` works too) that mounts, unmounts and
//! lists them; a foreground `darter mount` is the same process holding a
//! single mount. Per mount (`mount.rs`): stale mountpoint recovery, the
//! FUSE session on several threads, the stats socket `darter stats` talks
//! to, clean unmount, and the background prefetcher. A mount is served
//! either entirely over FUSE or through the kernel's EROFS driver
//! (`kernel.rs`), which mounts the bootstrap itself over the devices the
//! daemon serves. Under a keeper (`keeper.rs`, the snapshotter) a mount
//! outlives its daemon: the keeper holds a copy of the FUSE device, and a
//! restarted daemon takes the mount over with the requests the dead one
//! left unanswered.
//!
//! Must not: parse image formats or fetch chunks itself (`darter-image`,
//! `darter-cache`), talk to registries (the caller opens images, through
//! [`ImageOpener`]), or outlive the mounts it was told to stop (it may end
//! before a mount kept by a keeper).

#![forbid(unsafe_code)]

pub mod api;
mod http;
pub mod keeper;
mod kernel;
mod metrics;
mod mount;
mod node;

pub use mount::{DaemonError, Frontend, ImageSpec, MountOptions};
pub use node::{ImageOpener, NodeOptions, mount, run_node};
