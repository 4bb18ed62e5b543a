//! Builds Darter images from a directory or an OCI image.
//!
//! Owns: merging layers with OCI semantics ([`merge`]), cutting files
//! into chunks with dedup against the build itself and a parent image,
//! compressing frames on several threads ([`chunker`]), and writing the
//! blobs, bootstrap, config and manifest into an OCI layout.
//!
//! Must not: read Darter images except a parent's chunk tables (through
//! `darter-image`), or hold file contents in memory beyond the frames in
//! flight. Output is deterministic: the same input and options give
//! byte-identical blobs, bootstrap and manifest, whatever the thread count.

#![forbid(unsafe_code)]

pub mod chunker;
pub mod merge;
mod output;
mod source_dir;
mod source_oci;
mod source_tar;

use std::path::PathBuf;
use std::time::Instant;

use darter_format::bootstrap::BlobEntry;
use darter_format::erofs::ondisk::ChunkIndex;
use darter_oci::{LayoutRef, OciLayout};

pub use chunker::{ChunkSettings, ChunkStats};

/// What to build from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory tree.
    Dir(PathBuf),
    /// An image in an OCI layout.
    Oci(LayoutRef),
}

/// Build options besides the source and output.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Chunking and compression.
    pub settings: ChunkSettings,
    /// A previous version of the image whose chunks are reused.
    pub parent: Option<LayoutRef>,
    /// Platform (`os/arch[/variant]`) to pick from a multi-platform source.
    pub platform: Option<String>,
}

/// Receives progress as a build goes (drives progress bars).
pub trait Progress: Sync {
    /// `n` more input bytes were processed.
    fn add_bytes(&self, n: u64);
    /// One more filesystem entry was added.
    fn add_file(&self);
    /// A new phase started (e.g. "layer 2/5").
    fn phase(&self, what: &str);
}

/// Progress that goes nowhere.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn add_bytes(&self, _: u64) {}
    fn add_file(&self) {}
    fn phase(&self, _: &str) {}
}

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    /// The image written.
    pub image: String,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Entries in the tree (all types).
    pub entries: u64,
    /// Regular file bytes read.
    pub bytes_in: u64,
    /// Chunking counters.
    pub chunks: ChunkStats,
    /// Blobs the image references.
    pub blobs: usize,
    /// Blobs written by this build.
    pub new_blobs: usize,
    /// Bytes of blobs written by this build.
    pub new_blob_bytes: u64,
    /// Bytes of the compressed bootstrap.
    pub bootstrap_bytes: u64,
    /// Non-hole input bytes divided by the bytes of new chunks.
    pub dedup_ratio: f64,
    /// Wall time.
    pub seconds: f64,
}

/// Everything that can make a build fail.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A filesystem operation on the source or output failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// Error.
        source: std::io::Error,
    },
    /// An entry could not be merged into the tree.
    #[error("{context}{source}")]
    Merge {
        /// Where (layer and entry), if known.
        context: String,
        /// The problem.
        source: merge::MergeError,
    },
    /// A layer is unreadable.
    #[error("layer {digest}: {detail}")]
    Layer {
        /// Layer digest.
        digest: String,
        /// What is wrong.
        detail: String,
    },
    /// Content does not match its digest.
    #[error("{what}: digest mismatch, expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// Something the format cannot hold.
    #[error("{path}: {detail}")]
    Unsupported {
        /// Where.
        path: String,
        /// What.
        detail: String,
    },
    /// The source image is unusable.
    #[error("{what}: {detail}")]
    Source {
        /// Which part.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// The parent image is unusable.
    #[error("parent image: {0}")]
    Parent(String),
    /// OCI layout problems.
    #[error(transparent)]
    Layout(#[from] darter_oci::LayoutError),
    /// The tree cannot be written as EROFS.
    #[error(transparent)]
    Write(#[from] darter_format::erofs::WriteError),
    /// Reading the parent image failed.
    #[error(transparent)]
    Image(#[from] darter_image::ImageError),
}

impl BuildError {
    pub(crate) fn io(op: &'static str, path: &[u8], source: std::io::Error) -> Self {
        BuildError::Io {
            op,
            path: String::from_utf8_lossy(path).into_owned(),
            source,
        }
    }

    pub(crate) fn merge(source: merge::MergeError, context: &str) -> Self {
        BuildError::Merge {
            context: context.to_owned(),
            source,
        }
    }

    pub(crate) fn layer(digest: &str, detail: String) -> Self {
        BuildError::Layer {
            digest: digest.to_owned(),
            detail,
        }
    }

    /// Adds the layer and entry an error happened in.
    pub(crate) fn with_layer_entry(self, layer: &str, entry: &[u8]) -> Self {
        let entry = String::from_utf8_lossy(entry);
        match self {
            BuildError::Merge { source, .. } => BuildError::Merge {
                context: format!("layer {layer}, entry {entry:?}: "),
                source,
            },
            BuildError::Unsupported { detail, .. } => BuildError::Unsupported {
                path: format!("layer {layer}, entry {entry:?}"),
                detail,
            },
            BuildError::Io { op, source, .. } => BuildError::Io {
                op,
                path: format!("layer {layer}, entry {entry:?}"),
                source,
            },
            other => other,
        }
    }
}

/// Builds `source` into the OCI layout image `output`.
pub fn build(
    source: &Source,
    output: &LayoutRef,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let out = OciLayout::create(&output.path)?;
    let mut chunker = chunker::Chunker::new(opts.settings);
    let parent_blobs = match &opts.parent {
        Some(p) => output::load_parent(p, &mut chunker, &out)?,
        None => Vec::new(),
    };
    let mut tree = merge::MergeTree::new();
    let mut new_blobs: Vec<BlobEntry> = Vec::new();
    let mut bytes_in = 0u64;
    let first_new_device = parent_blobs.len() + 1;
    let (config, source_name) = match source {
        Source::Dir(dir) => {
            progress.phase("reading directory");
            tree.begin_layer(1);
            start_blob(&mut chunker, &out, first_new_device)?;
            source_dir::add_dir(&mut tree, &mut chunker, dir, progress)?;
            new_blobs.extend(finish_blob(&mut chunker)?);
            (None, dir.display().to_string())
        }
        Source::Oci(reference) => {
            let src = source_oci::OciSource::open(reference, opts.platform.as_deref())?;
            let layers = src.manifest.layers().clone();
            for ((i, desc), diff_id) in layers.iter().enumerate().zip(src.diff_ids()) {
                progress.phase(&format!("layer {}/{}", i + 1, layers.len()));
                let mut layer = src.open_layer(desc, diff_id)?;
                start_blob(&mut chunker, &out, first_new_device + new_blobs.len())?;
                let name = layer.digest.to_string();
                source_tar::apply_tar(
                    &mut tree,
                    &mut chunker,
                    i as u32 + 1,
                    &name,
                    layer.reader(),
                    progress,
                )?;
                // Verify before committing: a bad layer leaves nothing behind.
                let blob = chunker.finish_blob().map_err(|e| {
                    BuildError::io("write blob for", layer.digest.as_str().as_bytes(), e)
                })?;
                layer.finish()?;
                new_blobs.extend(commit(blob)?);
            }
            (
                Some(src.config.clone()),
                format!("{reference}@{}", src.manifest_digest),
            )
        }
    };
    tree.for_each_file(|f| bytes_in += f.size);
    let stats = chunker.stats();
    progress.phase("writing bootstrap");
    let written = output::write_image(
        &out,
        output,
        tree,
        &parent_blobs,
        &new_blobs,
        opts,
        config,
        &source_name,
    )?;
    let non_hole = stats.chunk_ref_bytes;
    Ok(BuildReport {
        image: output.to_string(),
        manifest_digest: written.manifest_digest,
        entries: written.entries,
        bytes_in,
        chunks: stats,
        blobs: written.blobs,
        new_blobs: new_blobs.len(),
        new_blob_bytes: new_blobs.iter().map(|b| b.blob_size).sum(),
        bootstrap_bytes: written.bootstrap_bytes,
        dedup_ratio: if stats.new_bytes == 0 {
            1.0
        } else {
            non_hole as f64 / stats.new_bytes as f64
        },
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn start_blob(
    chunker: &mut chunker::Chunker,
    out: &OciLayout,
    device: usize,
) -> Result<(), BuildError> {
    let device = u16::try_from(device).map_err(|_| BuildError::Unsupported {
        path: String::new(),
        detail: "more than 65535 blobs".into(),
    })?;
    let upload = out.begin_blob()?;
    chunker.start_blob(device, Box::new(upload)).map_err(|e| {
        BuildError::io(
            "start blob in",
            out.root().as_os_str().as_encoded_bytes(),
            e,
        )
    })
}

fn finish_blob(chunker: &mut chunker::Chunker) -> Result<Option<BlobEntry>, BuildError> {
    let blob = chunker
        .finish_blob()
        .map_err(|e| BuildError::io("write blob", b"", e))?;
    commit(blob)
}

fn commit(
    blob: Option<(Box<dyn chunker::BlobSink>, darter_format::blob::BlobSummary)>,
) -> Result<Option<BlobEntry>, BuildError> {
    let Some((sink, summary)) = blob else {
        return Ok(None);
    };
    let (digest, _) = sink
        .commit()
        .map_err(|e| BuildError::io("commit blob", b"", e))?;
    Ok(Some(BlobEntry::new(digest.bytes(), &summary)))
}

/// Renumbers chunk indexes after unused blobs are dropped: `map[old] = new`.
pub(crate) fn renumber(chunks: &mut [ChunkIndex], map: &[u16]) {
    for c in chunks.iter_mut().filter(|c| !c.is_hole()) {
        c.device_id = map[usize::from(c.device_id)];
    }
}
