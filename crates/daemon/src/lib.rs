//! Running Darter mounts.
//!
//! Owns: the lifecycle of a mount (stale mountpoint recovery, the FUSE
//! session on several threads, clean unmount on SIGINT/SIGTERM), the local
//! API socket that `darter stats` talks to (HTTP over a unix socket, so
//! `curl --unix-socket` works too), Prometheus metrics over TCP, and the
//! background prefetcher. A mount is served either entirely over FUSE or
//! through the kernel's EROFS driver (`kernel.rs`), which mounts the
//! bootstrap itself over the devices the daemon serves. Under a keeper
//! (`keeper.rs`, the snapshotter) a mount outlives its daemon: the keeper
//! holds a copy of the FUSE device, and a restarted daemon takes the mount
//! over with the requests the dead one left unanswered.
//!
//! Must not: parse image formats or fetch chunks itself (`darter-image`,
//! `darter-cache`), or outlive its mount (it may end before it, under a
//! keeper).

#![forbid(unsafe_code)]

pub mod api;
mod http;
pub mod keeper;
mod kernel;
mod metrics;
mod mount;

pub use mount::{DaemonError, Frontend, ImageSpec, MountOptions, mount};
