//! Turns Darter images (OCI layouts written by `darter build`) into seed
//! inputs for the fuzz targets, in the layouts of `darter_fuzz::input`:
//!
//! - `bootstrap/`: each image's uncompressed bootstrap;
//! - `chunk_table/`: each blob's tail (stored table + trailer), and its
//!   decoded raw table with the blob's geometry;
//! - `frame/`: a few small stored frames of each blob with their sizes;
//! - `image/`: each image's uncompressed bootstrap followed by its blobs.
//!
//! Usage: `make_seeds OUT_DIR LAYOUT_DIR...` (see `fuzz/seeds.sh`). Files
//! are named `image-` and a content digest, so rerunning adds nothing twice
//! and hand-kept inputs (crash regressions) are told apart.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use darter_format::DigestAlgo;
use darter_format::blob::{BLOB_TRAILER_SIZE, BlobTrailer};
use darter_format::compress::{Compression, decompress};
use darter_format::oci::{ANNOTATION_BOOTSTRAP_SIZE, MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP};
use darter_fuzz::input::{ChunkTableInput, FrameInput, ImageInput};
use serde_json::Value;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Frames larger than this are not worth a seed: seeds stay a few KiB.
const MAX_FRAME_SEED: usize = 8 << 10;
/// Name prefix of generated seeds (`seeds.sh` replaces only these).
const GENERATED_PREFIX: &str = "image-";
/// At most this many frame seeds per blob.
const FRAME_SEEDS_PER_BLOB: usize = 4;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let out = args
        .next()
        .ok_or("usage: make_seeds OUT_DIR LAYOUT_DIR...")?;
    for layout in args {
        seed_image(&layout, &out).map_err(|e| format!("{}: {e}", layout.display()))?;
    }
    Ok(())
}

fn seed_image(layout: &Path, out: &Path) -> Result<()> {
    let index = read_json(&layout.join("index.json"))?;
    let manifest = read_json(&blob_path(layout, &index["manifests"][0])?)?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or("manifest has no layers")?;
    let mut bootstrap = None;
    let mut blobs = Vec::new();
    for layer in layers {
        let bytes = fs::read(blob_path(layout, layer)?)?;
        match layer["mediaType"].as_str() {
            Some(MEDIA_TYPE_BOOTSTRAP) => {
                let size = layer["annotations"][ANNOTATION_BOOTSTRAP_SIZE]
                    .as_str()
                    .ok_or("bootstrap layer without its size annotation")?
                    .parse()?;
                let raw = decompress(Compression::Zstd, &bytes, size)?;
                write_seed(out, "bootstrap", &raw)?;
                bootstrap = Some(raw);
            }
            Some(MEDIA_TYPE_BLOB) => {
                seed_blob(&bytes, out)?;
                blobs.push(bytes);
            }
            other => return Err(format!("unexpected layer media type {other:?}").into()),
        }
    }
    // `darter build` lists the blobs in the order of the bootstrap's table.
    let bootstrap = bootstrap.ok_or("image without a bootstrap layer")?;
    let blobs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let input = ImageInput::encode(&bootstrap, &blobs).ok_or("bootstrap of 4 GiB or more")?;
    write_seed(out, "image", &input)
}

fn seed_blob(blob: &[u8], out: &Path) -> Result<()> {
    let trailer_at = blob
        .len()
        .checked_sub(BLOB_TRAILER_SIZE)
        .ok_or("blob shorter than its trailer")?;
    let trailer = BlobTrailer::decode(&blob[trailer_at..], blob.len() as u64)?;
    let tail = &blob[usize::try_from(trailer.table_offset)?..];
    write_seed(out, "chunk_table", &ChunkTableInput::encode_tail(tail))?;
    let table = trailer.decode_table(&tail[..tail.len() - BLOB_TRAILER_SIZE])?;
    let raw = ChunkTableInput::encode_raw(table.algo(), &trailer.geometry(), &table.encode());
    write_seed(out, "chunk_table", &raw)?;

    let mut frames: Vec<_> = table
        .records()
        .iter()
        .map(|r| (r.compressed_range(), r.frame_size))
        .collect();
    frames.dedup();
    let small = frames
        .into_iter()
        .filter(|(range, _)| range.end - range.start <= MAX_FRAME_SEED as u64);
    for (range, frame_size) in small.take(FRAME_SEEDS_PER_BLOB) {
        let stored = &blob[usize::try_from(range.start)?..usize::try_from(range.end)?];
        write_seed(out, "frame", &FrameInput::encode(frame_size, stored))?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

fn blob_path(layout: &Path, descriptor: &Value) -> Result<PathBuf> {
    let digest = descriptor["digest"]
        .as_str()
        .ok_or("descriptor without a digest")?;
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest} is not sha256"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn write_seed(out: &Path, target: &str, data: &[u8]) -> Result<()> {
    let dir = out.join(target);
    fs::create_dir_all(&dir)?;
    let name = DigestAlgo::Blake3.digest(data).hex();
    let path = dir.join(format!("{GENERATED_PREFIX}{}", &name[..16]));
    fs::write(&path, data)?;
    println!("{} ({} bytes)", path.display(), data.len());
    Ok(())
}
