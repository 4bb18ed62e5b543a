//! Subcommand implementations: each turns parsed arguments into library
//! calls and prints the result.

mod build;
mod cache;
mod check;
mod export;
mod inspect;
mod mount;
mod stats;
mod unpack;

use anyhow::Context as _;
use darter_oci::LayoutRef;

use crate::cli::{Cli, Command};

/// How a command ended (errors are `Err`).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All good.
    Success,
    /// The command ran and found problems (e.g. `check`).
    Problems,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let config = crate::config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Build(a) => build::run(&a, &config.build, cli.quiet),
        Command::Inspect(a) => inspect::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Unpack(a) => unpack::run(&a),
        Command::Export(a) => export::run(&a),
        Command::Mount(a) => mount::run(&a, &config.mount),
        Command::Stats(a) => stats::run(&a),
        Command::Cache(crate::cli::CacheCommand::Gc(a)) => cache::gc(&a, &config.mount),
    }
}

/// Parses an image reference (only `oci:` layouts for now).
fn layout_ref(s: &str) -> anyhow::Result<LayoutRef> {
    LayoutRef::parse(s)
        .with_context(|| format!("image {s:?}: only oci:PATH[:TAG] images are supported"))
}

/// Opens a Darter image for reading.
fn open_image(s: &str) -> anyhow::Result<darter_image::Image<darter_image::LayoutBlobs>> {
    let reference = layout_ref(s)?;
    darter_image::open_layout(&reference).with_context(|| format!("opening {s}"))
}
