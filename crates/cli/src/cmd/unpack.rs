//! `darter unpack`.

use anyhow::Context as _;

use crate::cli::UnpackArgs;
use crate::output::print_json;
use crate::units::human;

use super::{Context, Outcome};

pub fn run(args: &UnpackArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let image = ctx.open_image(&args.image)?;
    let report = darter_image::unpack(&image, &args.dir)
        .with_context(|| format!("unpacking {} into {}", args.image, args.dir.display()))?;
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "unpacked {} into {}: {} files ({}), {} dirs, {} other, {} hardlinks",
            args.image,
            args.dir.display(),
            report.files,
            human(report.bytes),
            report.dirs,
            report.specials,
            report.hardlinks
        );
        if report.skipped_unprivileged > 0 {
            println!(
                "note: {} ownership/device/xattr operations skipped (not root)",
                report.skipped_unprivileged
            );
        }
    }
    Ok(Outcome::Success)
}
