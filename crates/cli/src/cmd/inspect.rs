//! `darter inspect`.

use crate::cli::InspectArgs;
use crate::output::print_json;
use crate::units::human;

use super::{Context, Outcome};

pub fn run(args: &InspectArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let image = ctx.open_image(&args.image)?;
    let s = darter_image::inspect(&image)?;
    if args.json {
        print_json(&s)?;
        return Ok(Outcome::Success);
    }
    println!("image      {}", args.image);
    println!("manifest   {}", s.manifest);
    println!("chunks     {} bytes, {} digests", s.chunk_size, s.digest);
    println!(
        "tree       {} files, {} dirs, {} symlinks, {} other",
        s.files, s.dirs, s.symlinks, s.specials
    );
    println!(
        "file data  {} ({} in holes)",
        human(s.file_bytes),
        human(s.hole_bytes)
    );
    println!(
        "dedup      {} chunk references -> {} unique chunks ({}), ratio {:.2}",
        s.chunk_refs,
        s.unique_chunks,
        human(s.unique_chunk_bytes),
        s.dedup_ratio
    );
    println!(
        "stored     {} compressed (ratio {:.2}), blobs {}, bootstrap {} ({} raw)",
        human(s.stored_bytes),
        s.compression_ratio,
        human(s.blob_bytes),
        human(s.bootstrap_bytes),
        human(s.bootstrap_raw_bytes)
    );
    for (i, b) in s.blobs.iter().enumerate() {
        println!(
            "blob {:<5} {} {} ({} chunks, {} used by this image)",
            i + 1,
            b.digest,
            human(b.size),
            b.chunks,
            b.chunks_used
        );
    }
    Ok(Outcome::Success)
}
