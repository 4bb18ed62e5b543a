//! Darter's containerd snapshotter: containerd's snapshots API
//! (`containerd.services.snapshots.v1`, served on a unix socket that
//! containerd reaches as a `[proxy_plugins]` entry) over overlayfs, with
//! the semantics of containerd's own overlay snapshotter.
//!
//! It owns one root directory: the metadata store (`store.rs`, redb, every
//! change one durable transaction), the snapshot directories
//! (`layout.rs`), the mounts it hands out (`mounts.rs`), List filters
//! (`filter.rs`), the operations (`snapshotter.rs`) and the socket
//! (`server.rs`). After a crash the metadata is as the last committed
//! transaction left it, and directories no record owns are deleted.
//!
//! Layers of Darter images are remote snapshots (`remote.rs`): committed
//! without containerd downloading anything, the image's last layer being a
//! lazy mount that a [`LazyMounts`] implementation (the `darter` binary)
//! makes and undoes at the snapshot's `fs` directory.
//!
//! It counts every image it (or a client, `darter pull`) unpacks in full
//! instead of serving it lazily, and serves the node's lazy mounts and those
//! counts (`status.rs`: JSON for `darter status`, Prometheus metrics).
//!
//! It must not mount anything itself (containerd performs the mounts it
//! returns, `LazyMounts` the lazy ones), touch files outside its root, or
//! trust its database blindly: a damaged record is an error naming its
//! key, never a panic.

#![forbid(unsafe_code)]

mod error;
mod filter;
mod layout;
mod mounts;
mod remote;
mod server;
mod snapshotter;
mod status;
mod store;

pub use containerd_snapshots::{api, tonic};
pub use error::{Error, ServeError};
pub use layout::is_mount_point;
pub use remote::{
    ImageLayers, LABEL_CRI_IMAGE_REF, LABEL_IMAGE_REF, LABEL_TARGET, LazyError, LazyMounts,
    MountStats, chain_ids,
};
pub use server::{connect, run, run_with, serve};
pub use snapshotter::{OverlaySnapshotter, Snapshots};
pub use status::{
    FallbackReason, LABEL_FALLBACK, LazyMountStatus, NodeStatus, StatusError, query_status,
    status_socket,
};
pub use store::{Kind, Labels, Layer, Record, Snapshot, Usage};
