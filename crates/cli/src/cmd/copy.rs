//! `darter copy`.

use anyhow::Context as _;

use crate::cli::CopyArgs;
use crate::output::print_json;
use crate::units::human;

use super::{Context, Outcome, image_ref};

pub fn run(args: &CopyArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let (from, to) = (image_ref(&args.source)?, image_ref(&args.destination)?);
    let report = darter_remote::copy(ctx.stores(), &from, &to)
        .with_context(|| format!("copying {} to {}", args.source, args.destination))?;
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "copied {} to {} ({}): {} blobs ({}): {} present, {} mounted, {} copied; sent {} of {}",
            args.source,
            report.image,
            report.manifest_digest,
            report.blobs,
            human(report.image_bytes),
            report.present,
            report.mounted,
            report.copied,
            human(report.sent_bytes),
            human(report.image_bytes),
        );
    }
    Ok(Outcome::Success)
}
