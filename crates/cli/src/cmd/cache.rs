//! `darter cache`.

use anyhow::Context as _;

use crate::cli::CacheGcArgs;
use crate::config::MountConfig;
use crate::output::print_json;
use crate::units::{human, parse_size};

use super::Outcome;

pub fn gc(args: &CacheGcArgs, config: &MountConfig) -> anyhow::Result<Outcome> {
    let max = parse_size(&args.max_size)
        .map_err(anyhow::Error::msg)
        .context("--max-size")?;
    let dir = args
        .cache
        .clone()
        .or_else(|| config.cache.clone())
        .unwrap_or_else(darter_cache::default_cache_dir);
    let cache = darter_cache::CacheDir::open(&dir)?;
    let report = cache
        .gc(max)
        .with_context(|| format!("collecting garbage in {}", dir.display()))?;
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "{}: {} -> {} ({} chunks removed)",
            dir.display(),
            human(report.before),
            human(report.after),
            report.removed
        );
    }
    Ok(Outcome::Success)
}
