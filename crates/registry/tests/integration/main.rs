//! Integration tests of darter-registry against real registries (Debian's
//! `docker-registry`), real token services and fault-injecting proxies.

// Test helpers outside #[test] functions unwrap too: a failure is a failed test.
#![allow(clippy::unwrap_used)]

mod auth;
mod common;
mod faults;
mod mirror;
mod pull_push;
mod redirect;
mod streaming;
