//! Prints the path of a cached test fixture, building it first if needed,
//! so scripts (the demo, benchmarks) share the fixtures tests use.
//!
//! Usage: darter-fixture debian-python-rootfs | debian-minbase-rootfs | debian-python-oci
//! (the last prints an `oci:LAYOUT:TAG` reference).

use std::process::ExitCode;

fn main() -> ExitCode {
    let what = std::env::args().nth(1).unwrap_or_default();
    let shown = |p: std::path::PathBuf| p.display().to_string();
    let path = match what.as_str() {
        "debian-python-rootfs" => darter_testkit::fixtures::debian_python_rootfs().map(shown),
        "debian-minbase-rootfs" => darter_testkit::fixtures::debian_minbase_rootfs().map(shown),
        "debian-python-oci" => darter_testkit::fixtures::debian_python_oci()
            .map(|i| format!("oci:{}:{}", i.layout.display(), i.tag)),
        _ => {
            eprintln!(
                "usage: darter-fixture debian-python-rootfs|debian-minbase-rootfs|debian-python-oci"
            );
            return ExitCode::from(2);
        }
    };
    match path {
        Ok(p) => {
            println!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("darter-fixture: {e}");
            ExitCode::FAILURE
        }
    }
}
