//! `darter check`.

use crate::cli::CheckArgs;
use crate::output::print_json;
use crate::units::human;

use super::{Context, Outcome};

pub fn run(args: &CheckArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let image = ctx.open_image(&args.image)?;
    let report = darter_image::check(&image);
    if args.json {
        print_json(&report)?;
    } else {
        for p in &report.problems {
            let mut line = format!("problem: {}", p.message);
            if !p.files.is_empty() {
                line.push_str(&format!(" (affects {})", p.files.join(", ")));
            }
            println!("{line}");
        }
        let verdict = if report.is_sound() {
            "sound"
        } else {
            "DAMAGED"
        };
        println!(
            "{}: {verdict}: {} inodes, {} chunks ({}) verified, {} problem(s)",
            args.image,
            report.inodes,
            report.chunks,
            human(report.bytes),
            report.problems.len()
        );
    }
    Ok(if report.is_sound() {
        Outcome::Success
    } else {
        Outcome::Problems
    })
}
