//! Reading the parent image's chunks, and writing the finished image:
//! blobs in device order, the compressed bootstrap, config and manifest.

use std::collections::BTreeSet;

use darter_format::bootstrap::{BlobEntry, BootstrapInfo, write_bootstrap};
use darter_format::erofs::ondisk::ChunkIndex;
use darter_format::oci as dm;
use darter_image::{BlobSource, Image};
use darter_oci::{OciDigest, media};
use serde_json::{Value, json};

use crate::merge::MergeTree;
use crate::sink::ImageSink;
use crate::{BuildError, BuildOptions, Parent, chunker::Chunker};

/// zstd level for the bootstrap: it is fetched first on every mount, so it
/// is worth more effort than chunks, but level 19 costs seconds for large
/// trees (4 s for 50k entries here) to save 8%; 9 takes 0.2 s.
const BOOTSTRAP_ZSTD_LEVEL: i32 = 9;

/// Registers every chunk of the parent image with the chunker, as devices
/// `1..=n`, and returns the parent's blobs.
pub(crate) fn load_parent(
    image: &Image<Box<dyn BlobSource>>,
    chunker: &mut Chunker,
) -> Result<Vec<BlobEntry>, BuildError> {
    let info = image.bootstrap().info();
    let settings = chunker.settings();
    if info.digest_algo != settings.digest
        || image.bootstrap().chunk_size() != u64::from(settings.chunk_size)
    {
        return Err(BuildError::Parent(format!(
            "{} uses {} digests and {}-byte chunks; this build uses {} and {} (use the same --digest and --chunk-size)",
            image.manifest_digest(),
            info.digest_algo,
            image.bootstrap().chunk_size(),
            settings.digest,
            settings.chunk_size
        )));
    }
    for i in 0..image.blobs().len() {
        let device_id =
            u16::try_from(i + 1).map_err(|_| BuildError::Parent("more than 65535 blobs".into()))?;
        for r in image.chunk_table(i)?.records() {
            chunker.know(
                r.digest,
                ChunkIndex {
                    device_id,
                    blkaddr: r.blkaddr,
                },
            );
        }
    }
    Ok(image.blobs().to_vec())
}

/// Everything the image is made of, once chunking is done.
pub(crate) struct ImageParts<'a> {
    pub(crate) tree: MergeTree,
    pub(crate) parents: &'a [BlobEntry],
    pub(crate) parent: Option<&'a Parent>,
    pub(crate) new: &'a [BlobEntry],
    pub(crate) config: Option<Value>,
    pub(crate) source_name: &'a str,
}

/// What [`write_image`] produced.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) manifest_digest: String,
    pub(crate) entries: u64,
    pub(crate) blobs: usize,
    pub(crate) bootstrap_bytes: u64,
    pub(crate) image_bytes: u64,
}

/// Drops blobs no file uses, renumbers devices, makes sure the sink has
/// the parent blobs still used, and writes the bootstrap, config and
/// manifest; tags the manifest.
pub(crate) fn write_image(
    sink: &dyn ImageSink,
    parts: ImageParts<'_>,
    opts: &BuildOptions,
) -> Result<Written, BuildError> {
    let ImageParts {
        mut tree,
        parents,
        parent,
        new,
        config: source_config,
        source_name,
    } = parts;
    let all: Vec<BlobEntry> = parents.iter().chain(new).copied().collect();
    let mut used = BTreeSet::new();
    tree.for_each_file(|f| {
        used.extend(
            f.chunks
                .iter()
                .filter(|c| !c.is_hole())
                .map(|c| c.device_id),
        );
    });
    let mut map = vec![0u16; all.len() + 1];
    let mut kept = Vec::new();
    for (i, &dev) in used.iter().enumerate() {
        map[usize::from(dev)] = i as u16 + 1;
        let entry = all[usize::from(dev) - 1];
        kept.push(entry);
        if let (Some(p), true) = (parent, usize::from(dev) <= parents.len()) {
            let digest = OciDigest::from_bytes(entry.blob_digest);
            sink.ensure_blob(
                &digest,
                entry.blob_size,
                p.image.source(),
                p.mount_from.as_deref(),
            )?;
        }
    }
    tree.for_each_file(|f| crate::renumber(&mut f.chunks, &map));
    let tree = tree.into_tree();
    let info = BootstrapInfo {
        digest_algo: opts.settings.digest,
        chunk_size_bits: opts.settings.chunk_size.trailing_zeros() as u8,
        blobs: kept.clone(),
    };
    let raw = write_bootstrap(&tree, &info, 0)?;
    let raw_digest = OciDigest::of(&raw);
    let packed = zstd::bulk::compress(&raw, BOOTSTRAP_ZSTD_LEVEL)
        .map_err(|e| BuildError::io("compress bootstrap for", sink.name().as_bytes(), e))?;
    let (boot_digest, boot_size) = sink.put_blob(&packed)?;

    let mut layers: Vec<Value> = kept
        .iter()
        .map(|b| {
            descriptor(
                dm::MEDIA_TYPE_BLOB,
                &b.oci_digest(),
                b.blob_size,
                json!({
                    dm::ANNOTATION_VERSION: dm::FORMAT_VERSION,
                    dm::ANNOTATION_TABLE_DIGEST: b.trailer.table_digest.to_string(),
                    dm::ANNOTATION_UNCOMPRESSED_SIZE: b.trailer.uncompressed_size.to_string(),
                }),
            )
        })
        .collect();
    layers.push(descriptor(
        dm::MEDIA_TYPE_BOOTSTRAP,
        boot_digest.as_str(),
        boot_size,
        json!({
            dm::ANNOTATION_VERSION: dm::FORMAT_VERSION,
            dm::ANNOTATION_BOOTSTRAP_DIGEST: raw_digest.to_string(),
            dm::ANNOTATION_BOOTSTRAP_SIZE: raw.len().to_string(),
        }),
    ));
    let diff_ids: Vec<String> = kept
        .iter()
        .map(BlobEntry::oci_digest)
        .chain([raw_digest.to_string()])
        .collect();
    let config = image_config(source_config, &diff_ids);
    let config_bytes = serde_json::to_vec(&config).map_err(|e| BuildError::Source {
        what: "config".into(),
        detail: e.to_string(),
    })?;
    let (config_digest, config_size) = sink.put_blob(&config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": descriptor(media::OCI_CONFIG, config_digest.as_str(), config_size, Value::Null),
        "layers": layers,
        "annotations": {
            dm::ANNOTATION_VERSION: dm::FORMAT_VERSION,
            dm::ANNOTATION_CHUNK_SIZE: opts.settings.chunk_size.to_string(),
            dm::ANNOTATION_DIGEST_ALGO: opts.settings.digest.to_string(),
            dm::ANNOTATION_SOURCE: source_name,
        },
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| BuildError::Source {
        what: "manifest".into(),
        detail: e.to_string(),
    })?;
    let manifest_digest = sink.put_manifest(&manifest_bytes, media::OCI_MANIFEST, &opts.tag)?;
    let image_bytes = kept.iter().map(|b| b.blob_size).sum::<u64>()
        + boot_size
        + config_size
        + manifest_bytes.len() as u64;
    Ok(Written {
        manifest_digest: manifest_digest.to_string(),
        entries: tree.nodes.len() as u64,
        blobs: kept.len(),
        bootstrap_bytes: boot_size,
        image_bytes,
    })
}

fn descriptor(media_type: &str, digest: &str, size: u64, annotations: Value) -> Value {
    let mut d = json!({ "mediaType": media_type, "digest": digest, "size": size });
    if !annotations.is_null() {
        d["annotations"] = annotations;
    }
    d
}

/// The image config: the source's (entrypoint, env, ...) when converting,
/// a minimal one for directories, with `rootfs.diff_ids` for Darter's layers.
fn image_config(source: Option<Value>, diff_ids: &[String]) -> Value {
    let mut config = source.unwrap_or_else(|| {
        let platform = darter_oci::host_platform();
        let arch = platform.rsplit('/').next().unwrap_or("amd64").to_owned();
        json!({ "architecture": arch, "os": "linux", "config": {} })
    });
    if let Some(obj) = config.as_object_mut() {
        // The source's history describes its tar layers, not Darter's.
        obj.remove("history");
        obj.insert(
            "rootfs".into(),
            json!({ "type": "layers", "diff_ids": diff_ids }),
        );
    }
    config
}
