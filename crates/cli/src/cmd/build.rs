//! `darter build`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use darter_builder::{BuildOptions, ChunkSettings, Parent, Source};
use darter_format::DigestAlgo;
use darter_format::blob::{DEFAULT_CHUNK_SIZE, DEFAULT_FRAME_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use darter_format::compress::Compression;
use darter_remote::{PushJournalKey, Stores};

use crate::cli::BuildArgs;
use crate::config::BuildConfig;
use crate::output::{BuildProgress, print_json};
use crate::units::{human, parse_size};

use super::{Context, Outcome, image_ref};

const DEFAULT_ZSTD_LEVEL: i32 = 3;

pub fn run(
    args: &BuildArgs,
    ctx: &Context,
    config: &BuildConfig,
    quiet: bool,
) -> anyhow::Result<Outcome> {
    let settings = settings(args, config)?;
    let stores = ctx.stores();
    let dir = PathBuf::from(&args.source);
    let source = if dir.is_dir() {
        Source::Dir(dir)
    } else {
        let reference = image_ref(&args.source).with_context(|| {
            format!(
                "source {:?} is neither a directory nor an image reference",
                args.source
            )
        })?;
        let image = stores
            .source_image(&reference, args.platform.as_deref())
            .with_context(|| format!("opening {}", args.source))?;
        Source::Image(image)
    };
    let output = image_ref(&args.output)?;
    let parent = match &args.parent {
        None => None,
        Some(p) => {
            let reference = image_ref(p)?;
            let image = stores
                .open_image(&reference)
                .with_context(|| format!("opening parent {p}"))?;
            Some(Parent {
                image,
                mount_from: Stores::mount_from(&reference),
            })
        }
    };
    let journal = crate::config::push_journal_dir().map(|dir| PushJournalKey {
        dir,
        build: build_identity(&source, parent.as_ref(), &settings),
    });
    let (sink, tag) = stores
        .build_sink(&output, journal.as_ref())
        .with_context(|| format!("opening {}", args.output))?;
    let opts = BuildOptions { settings, tag };
    let progress = BuildProgress::new(quiet || args.json);
    let report = darter_builder::build(&source, parent.as_ref(), sink.as_ref(), &opts, &progress);
    progress.finish();
    let report =
        report.with_context(|| format!("building {} from {}", args.output, args.source))?;
    if args.json {
        print_json(&report)?;
    } else if !quiet {
        let c = &report.chunks;
        println!(
            "built {} ({}): {} entries, {} in, {} stored in {} new blob(s) + {} bootstrap; {} chunks, {} deduplicated ({}), dedup ratio {:.2}; sent {} of {} the image references; {:.2} s ({}/s)",
            report.image,
            report.manifest_digest,
            report.entries,
            human(report.bytes_in),
            human(c.stored_bytes),
            report.new_blobs,
            human(report.bootstrap_bytes),
            c.chunk_refs,
            c.deduped,
            human(c.deduped_bytes),
            report.dedup_ratio,
            human(report.sent_bytes),
            human(report.image_bytes),
            report.seconds,
            human((report.bytes_in as f64 / report.seconds.max(1e-9)) as u64),
        );
    }
    Ok(Outcome::Success)
}

/// What decides the blobs a build writes besides the bytes of its source,
/// to tell a rerun of the same build (the thread count does not matter).
fn build_identity(source: &Source, parent: Option<&Parent>, settings: &ChunkSettings) -> String {
    let source = match source {
        Source::Dir(dir) => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.clone())
            .display()
            .to_string(),
        Source::Image(image) => format!("{}@{}", image.name(), image.manifest_digest()),
    };
    let parent = parent.map(|p| p.image.manifest_digest().to_string());
    let ChunkSettings {
        chunk_size,
        frame_size,
        compression,
        level,
        digest,
        jobs: _,
    } = settings;
    format!(
        "source {source}\nparent {}\nchunk-size {chunk_size} frame-size {frame_size} compressor {compression} level {level} digest {digest}",
        parent.as_deref().unwrap_or("none")
    )
}

fn settings(args: &BuildArgs, config: &BuildConfig) -> anyhow::Result<ChunkSettings> {
    let size = |flag: &Option<String>,
                conf: &Option<String>,
                default: u32,
                what: &str|
     -> anyhow::Result<u32> {
        match flag.as_ref().or(conf.as_ref()) {
            None => Ok(default),
            Some(s) => {
                let v = parse_size(s)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("--{what}"))?;
                u32::try_from(v).with_context(|| format!("--{what} {s} is too large"))
            }
        }
    };
    let chunk_size = size(
        &args.chunk_size,
        &config.chunk_size,
        DEFAULT_CHUNK_SIZE,
        "chunk-size",
    )?;
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        bail!("--chunk-size must be a power of two from 4K to 16M, not {chunk_size}");
    }
    let frame_size = size(
        &args.frame_size,
        &config.frame_size,
        DEFAULT_FRAME_SIZE,
        "frame-size",
    )?
    .min(chunk_size);
    if frame_size < MIN_CHUNK_SIZE {
        bail!("--frame-size must be at least 4K");
    }
    let compression: Compression = args
        .compressor
        .as_ref()
        .or(config.compressor.as_ref())
        .map(|s| s.parse().map_err(anyhow::Error::msg))
        .transpose()?
        .unwrap_or_default();
    let digest: DigestAlgo = args
        .digest
        .as_ref()
        .or(config.digest.as_ref())
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or_default();
    let level = args.level.or(config.level).unwrap_or(DEFAULT_ZSTD_LEVEL);
    if !(-7..=22).contains(&level) {
        bail!("--level must be between -7 and 22");
    }
    let jobs = args
        .jobs
        .or(config.jobs)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    Ok(ChunkSettings {
        chunk_size,
        frame_size,
        compression,
        level,
        digest,
        jobs,
    })
}
