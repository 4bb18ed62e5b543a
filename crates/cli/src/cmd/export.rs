//! `darter export`.

use anyhow::Context as _;

use crate::cli::ExportArgs;
use crate::output::print_json;

use super::{Context, Outcome};

pub fn run(args: &ExportArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let image = ctx.open_image(&args.image)?;
    let report = darter_image::export(&image, &args.dir)
        .with_context(|| format!("exporting {} into {}", args.image, args.dir.display()))?;
    if args.json {
        return print_json(&report).map(|_| Outcome::Success);
    }
    let devices: Vec<String> = report
        .devices
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    println!("bootstrap {}", report.bootstrap.display());
    for d in &devices {
        println!("device    {d}");
    }
    let fsck_devs: String = devices.iter().map(|d| format!(" --device={d}")).collect();
    println!(
        "check:  fsck.erofs{fsck_devs} --extract=OUT {}",
        report.bootstrap.display()
    );
    let loops: String = devices
        .iter()
        .map(|d| format!(",device=$(losetup -rf --show {d})"))
        .collect();
    println!(
        "mount:  mount -t erofs -o ro{loops} {} MOUNTPOINT",
        report.bootstrap.display()
    );
    Ok(Outcome::Success)
}
