//! `darter stats`.

use anyhow::Context as _;

use crate::cli::StatsArgs;
use crate::output::print_json;
use crate::units::human;

use super::Outcome;

pub fn run(args: &StatsArgs) -> anyhow::Result<Outcome> {
    let r = darter_daemon::api::query_stats(&args.mountpoint)
        .with_context(|| format!("asking for the counters of {}", args.mountpoint.display()))?;
    if args.json {
        print_json(&r)?;
        return Ok(Outcome::Success);
    }
    let s = &r.stats;
    println!("image            {}", r.image);
    println!(
        "mountpoint       {} (pid {}, up {:.0} s)",
        r.mountpoint.display(),
        r.pid,
        r.uptime_seconds
    );
    println!(
        "backend          {} in {} requests",
        human(s.backend_bytes),
        s.backend_requests
    );
    println!(
        "image size       {} ({:.1}% fetched)",
        human(s.image_bytes),
        100.0 * s.backend_bytes as f64 / s.image_bytes.max(1) as f64
    );
    println!(
        "chunks           {} cache hits, {} misses, {} verify failures",
        s.cache_hits, s.cache_misses, s.verify_failures
    );
    println!("prefetched       {}", human(s.prefetch_bytes));
    println!(
        "served           {} read, {} decompressed",
        human(s.read_bytes),
        human(s.decompressed_bytes)
    );
    Ok(Outcome::Success)
}
