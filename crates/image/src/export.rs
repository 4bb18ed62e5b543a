//! Writes an image as plain EROFS: the bootstrap and one uncompressed
//! device image per blob, for `fsck.erofs --device=...` and kernel mounts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use darter_format::blob::BLOCK_SIZE;

use crate::error::ImageError;
use crate::image::{ChunkLocation, Image, blob_digest};
use crate::source::BlobSource;

/// Files written by [`export`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    /// The bootstrap (EROFS primary device).
    pub bootstrap: PathBuf,
    /// Device images, in device-id order (pass them in this order).
    pub devices: Vec<PathBuf>,
}

/// Exports `image` into `dir` (created if needed).
pub fn export<S: BlobSource>(image: &Image<S>, dir: &Path) -> Result<ExportReport, ImageError> {
    let io = |op: &'static str, path: &Path| {
        let p = path.display().to_string();
        move |e: std::io::Error| ImageError::Io {
            op,
            path: p,
            source: e,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let bootstrap = dir.join("bootstrap.erofs");
    std::fs::write(&bootstrap, image.bootstrap().erofs().reader())
        .map_err(io("write", &bootstrap))?;
    let mut devices = Vec::new();
    for (blob, entry) in image.blobs().iter().enumerate() {
        let digest = blob_digest(entry);
        let path = dir.join(format!("device-{}-{}.img", blob + 1, &digest.hex()[..12]));
        let file = File::create(&path).map_err(io("create", &path))?;
        file.set_len(entry.trailer.uncompressed_size)
            .map_err(io("size", &path))?;
        let records = image.chunk_table(blob)?.records().len();
        for index in 0..records {
            let loc = ChunkLocation { blob, index };
            let data = image.read_chunk(loc)?;
            let start = image.record(loc)?.uncompressed_offset();
            for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    file.write_all_at(block, start + (i * BLOCK_SIZE as usize) as u64)
                        .map_err(io("write", &path))?;
                }
            }
        }
        devices.push(path);
    }
    Ok(ExportReport { bootstrap, devices })
}
