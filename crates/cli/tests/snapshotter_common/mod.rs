//! Helpers for the tests that run `darter snapshotter` with lazy mounts: a
//! registry holding the python image converted to a Darter image, and a
//! guard that unmounts what the lazy mounts left.
//!
//! A test binary using these declares `mod common; mod registry_common;
//! mod snapshotter_common;`.

use std::path::PathBuf;

use darter_testkit::process::{MountGuard, mounts_under};
use darter_testkit::registry::TestRegistry;

use crate::registry_common::{Scratch, docker, registry_with_python};

/// Unmounts everything below a directory on drop (a lazy mount's daemon
/// exits when its mount goes).
pub struct UnmountUnder(pub PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let mut mounts = mounts_under(&self.0).unwrap_or_default();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        drop(mounts.into_iter().map(MountGuard::new).collect::<Vec<_>>());
    }
}

/// The python image in a fresh registry, plain at `test/python:oci` and
/// converted to a Darter image at `test/python:darter`.
pub struct DarterRegistry {
    pub registry: TestRegistry,
    pub scratch: Scratch,
    /// `HOST/test/python:darter`, as containerd names the image.
    pub reference: String,
    /// The scratch's darter config, with the mounts' chunk cache set to
    /// the test's own.
    pub config: PathBuf,
}

impl DarterRegistry {
    pub fn start() -> DarterRegistry {
        let (registry, scratch, _source) = registry_with_python("test/python");
        let host = registry.host();
        let reference = format!("{host}/test/python:darter");
        scratch.build(docker(&host, "test/python:oci"), &reference, &[]);
        let config = scratch.path("config.toml");
        let toml = std::fs::read_to_string(&config).unwrap();
        let toml = format!("[mount]\ncache = {:?}\n\n{toml}", scratch.path("cache"));
        std::fs::write(&config, toml).unwrap();
        DarterRegistry {
            registry,
            scratch,
            reference,
            config,
        }
    }
}
