//! Fuzzing harness for Darter's parsers of untrusted input.
//!
//! Owns the byte layouts the fuzz targets read ([`input`]) and the code that
//! drives `darter-format` and the tar reader of `darter-builder` with them
//! ([`exercise`]; the `tar` target takes raw tar streams): the targets in
//! `fuzz_targets/` are one-line wrappers, and the seed generator
//! (`examples/make_seeds.rs`) encodes real images through the same
//! [`input`] functions, so seeds and targets cannot drift apart.
//!
//! It must not weaken what it tests: an input the parser rejects is fine,
//! a panic, an endless loop or an unbounded allocation is a finding, and
//! the exercise functions assert the properties the parsers promise
//! (round trips, lookups that find what a walk listed).

#![forbid(unsafe_code)]

pub mod exercise;
pub mod input;
