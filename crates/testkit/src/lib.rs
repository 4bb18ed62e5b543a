//! Test support shared by Darter's integration tests: builders of tricky
//! directory trees, a tree comparator, and fixtures that run real things
//! (a registry, image builds, the `darter` binary) with cleanup on drop.
//!
//! Only tests and benchmarks depend on this crate. It may panic on setup
//! failures (that is a failed test); it must never leave mounts, processes
//! or namespaces behind.
