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
mod sink;
mod source_dir;
mod source_oci;
mod source_tar;
pub mod tar;

use std::path::PathBuf;
use std::time::Instant;

use darter_format::bootstrap::BlobEntry;
use darter_format::erofs::ondisk::ChunkIndex;
use darter_image::{BlobSource, Image};

pub use chunker::{ChunkSettings, ChunkStats};
pub use sink::{BlobSink, COPY_PIECE, ImageSink, LayoutSink, Transfer};
pub use source_oci::{LayoutImage, SourceImage, parse_config};

/// What to build from.
pub enum Source {
    /// A directory tree.
    Dir(PathBuf),
    /// An OCI or Docker image (a layout or a registry).
    Image(Box<dyn SourceImage>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            Source::Image(i) => f.debug_tuple("Image").field(&i.name()).finish(),
        }
    }
}

/// A previous version of the image: its chunks are referenced instead of
/// stored again.
pub struct Parent {
    /// The opened parent image.
    pub image: Image<Box<dyn BlobSource>>,
    /// A repository of the destination's registry holding its blobs, for
    /// cross-repository mounts (`None` for layouts).
    pub mount_from: Option<String>,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("image", self.image.manifest_digest())
            .field("mount_from", &self.mount_from)
            .finish()
    }
}

/// Build options besides the source and output.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Chunking and compression.
    pub settings: ChunkSettings,
    /// The tag to give the result.
    pub tag: String,
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
    /// Bytes the image references (all its blobs, bootstrap, config, manifest).
    pub image_bytes: u64,
    /// Bytes actually sent to the destination (what it lacked).
    pub sent_bytes: u64,
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
    /// Reading a blob to copy failed.
    #[error(transparent)]
    Blob(#[from] darter_image::SourceError),
    /// The destination failed (a registry push).
    #[error("{destination}: {detail}")]
    Destination {
        /// Where.
        destination: String,
        /// What happened.
        detail: String,
    },
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

    /// A layer-level error.
    pub fn layer(digest: &str, detail: String) -> Self {
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

/// Builds `source` into `sink`, reusing the chunks of `parent`.
pub fn build(
    source: &Source,
    parent: Option<&Parent>,
    sink: &dyn ImageSink,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let mut chunker = chunker::Chunker::new(opts.settings);
    let parent_blobs = match parent {
        Some(p) => output::load_parent(&p.image, &mut chunker)?,
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
            start_blob(&mut chunker, sink, first_new_device)?;
            source_dir::add_dir(&mut tree, &mut chunker, dir, progress)?;
            new_blobs.extend(finish_blob(&mut chunker)?);
            (None, dir.display().to_string())
        }
        Source::Image(src) => {
            let layers = src.manifest().layers().clone();
            // Blobs become visible only once every layer is verified: a bad
            // layer anywhere leaves the destination as it was.
            let mut verified = Vec::new();
            for ((i, desc), diff_id) in layers
                .iter()
                .enumerate()
                .zip(source_oci::diff_ids(src.as_ref()))
            {
                progress.phase(&format!("layer {}/{}", i + 1, layers.len()));
                let mut layer = source_oci::open_layer(src.as_ref(), desc, diff_id)?;
                start_blob(&mut chunker, sink, first_new_device + verified.len())?;
                let name = layer.digest.to_string();
                source_tar::apply_tar(
                    &mut tree,
                    &mut chunker,
                    i as u32 + 1,
                    &name,
                    layer.reader(),
                    progress,
                )?;
                let blob = chunker
                    .finish_blob()
                    .map_err(|e| BuildError::io("write blob for", name.as_bytes(), e))?;
                layer.finish()?;
                verified.extend(blob);
            }
            for blob in verified {
                new_blobs.push(commit(blob)?);
            }
            (
                Some(src.config().clone()),
                format!("{}@{}", src.name(), src.manifest_digest()),
            )
        }
    };
    tree.for_each_file(|f| bytes_in += f.size);
    let stats = chunker.stats();
    progress.phase("writing bootstrap");
    let image = output::ImageParts {
        tree,
        parents: &parent_blobs,
        parent,
        new: &new_blobs,
        config,
        source_name: &source_name,
    };
    let written = output::write_image(sink, image, opts)?;
    let non_hole = stats.chunk_ref_bytes;
    Ok(BuildReport {
        image: format!("{}:{}", sink.name(), opts.tag),
        image_bytes: written.image_bytes,
        sent_bytes: sink.sent_bytes(),
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
    sink: &dyn ImageSink,
    device: usize,
) -> Result<(), BuildError> {
    let device = u16::try_from(device).map_err(|_| BuildError::Unsupported {
        path: String::new(),
        detail: "more than 65535 blobs".into(),
    })?;
    let upload = sink.begin_blob()?;
    chunker
        .start_blob(device, upload)
        .map_err(|e| BuildError::io("start blob in", sink.name().as_bytes(), e))
}

fn finish_blob(chunker: &mut chunker::Chunker) -> Result<Option<BlobEntry>, BuildError> {
    let blob = chunker
        .finish_blob()
        .map_err(|e| BuildError::io("write blob", b"", e))?;
    blob.map(commit).transpose()
}

fn commit(
    (sink, summary): (Box<dyn BlobSink>, darter_format::blob::BlobSummary),
) -> Result<BlobEntry, BuildError> {
    let (digest, _) = sink
        .commit()
        .map_err(|e| BuildError::io("commit blob", b"", e))?;
    Ok(BlobEntry::new(digest.bytes(), &summary))
}

/// Renumbers chunk indexes after unused blobs are dropped: `map[old] = new`.
pub(crate) fn renumber(chunks: &mut [ChunkIndex], map: &[u16]) {
    for c in chunks.iter_mut().filter(|c| !c.is_hole()) {
        c.device_id = map[usize::from(c.device_id)];
    }
}
