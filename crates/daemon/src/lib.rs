//! Running Darter mounts.
//!
//! Owns: the lifecycle of a mount (stale mountpoint recovery, the FUSE
//! session on several threads, clean unmount on SIGINT/SIGTERM), the local
//! API socket that `darter stats` talks to (HTTP over a unix socket, so
//! `curl --unix-socket` works too), Prometheus metrics over TCP, and the
//! background prefetcher.
//!
//! Must not: parse image formats or fetch chunks itself (`darter-image`,
//! `darter-cache`), or outlive its mount.

#![forbid(unsafe_code)]

pub mod api;
mod http;
mod metrics;
mod mount;

pub use mount::{DaemonError, ImageSpec, MountOptions, mount};
