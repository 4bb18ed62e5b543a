//! Prints the path of a cached test fixture, building it first if needed,
//! so scripts (the demo, benchmarks) share the fixtures tests use.
//!
//! Usage: `darter-fixture NAME`, with a NAME from `FIXTURES` below. The
//! `-oci` ones print an `oci:LAYOUT:TAG` reference.

use std::path::Path;
use std::process::ExitCode;

use darter_testkit::fixtures::{self, FixtureError};

type Build = fn() -> Result<String, FixtureError>;

const FIXTURES: &[(&str, Build)] = &[
    ("debian-minbase-rootfs", || {
        fixtures::debian_minbase_rootfs().map(|p| shown(&p))
    }),
    ("debian-python-rootfs", || {
        fixtures::debian_python_rootfs().map(|p| shown(&p))
    }),
    ("debian-python-oci", || {
        fixtures::debian_python_oci().map(|i| i.skopeo_ref())
    }),
    ("ai-inference-rootfs", || {
        fixtures::ai_inference_rootfs().map(|p| shown(&p))
    }),
    ("ai-inference-oci", || {
        fixtures::ai_inference_oci().map(|i| i.skopeo_ref())
    }),
];

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn main() -> ExitCode {
    let what = std::env::args().nth(1).unwrap_or_default();
    let Some((_, build)) = FIXTURES.iter().find(|(name, _)| *name == what) else {
        let names: Vec<&str> = FIXTURES.iter().map(|(name, _)| *name).collect();
        eprintln!("usage: darter-fixture {}", names.join("|"));
        return ExitCode::from(2);
    };
    match build() {
        Ok(shown) => {
            println!("{shown}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("darter-fixture: {e}");
            ExitCode::FAILURE
        }
    }
}
