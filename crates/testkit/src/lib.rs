//! Test support shared by Darter's integration tests: builders of tricky
//! directory trees, a tree comparator, and fixtures that run real things
//! (a registry, image builds, the `darter` binary, network namespaces and
//! a P2P bed in them) with cleanup on drop.
//!
//! Only tests and benchmarks depend on this crate. It may panic on setup
//! failures (that is a failed test); it must never leave mounts, processes
//! or namespaces behind.

pub mod blob_http;
pub mod compare;
pub mod containerd;
pub mod cri;
pub mod faultproxy;
pub mod fixtures;
pub mod netns;
pub mod p2pbed;
pub mod process;
pub mod registry;
pub mod tree;

mod fs_at;

pub use fs_at::{escape_bytes, escape_path};
