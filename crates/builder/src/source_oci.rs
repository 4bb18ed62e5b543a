//! Reads OCI images (layouts) for conversion: manifest, config, and each
//! layer as a verified, decompressed tar stream.

use std::io::{self, Read};

use darter_oci::media::{LayerCompression, tar_layer_compression};
use darter_oci::{Descriptor, ImageManifest, LayoutRef, OciDigest, OciLayout};
use sha2::{Digest as _, Sha256};

use crate::BuildError;

/// An OCI image to convert: its manifest (one platform), config, and
/// layers as compressed byte streams. Implemented here for OCI layouts and
/// in `darter-remote` for registries.
pub trait SourceImage {
    /// How to name it in the image's annotations and messages.
    fn name(&self) -> String;
    /// The manifest's digest.
    fn manifest_digest(&self) -> &OciDigest;
    /// The (platform) manifest.
    fn manifest(&self) -> &ImageManifest;
    /// The image config, as JSON.
    fn config(&self) -> &serde_json::Value;
    /// Opens a layer's bytes as stored (compressed). Verified by the caller.
    fn open_layer(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, BuildError>;
}

/// An image in an OCI layout.
#[derive(Debug)]
pub struct LayoutImage {
    layout: OciLayout,
    reference: LayoutRef,
    manifest_digest: OciDigest,
    manifest: ImageManifest,
    config: serde_json::Value,
}

impl LayoutImage {
    /// Opens `reference`, picking `platform` (`os/arch[/variant]`, default
    /// the host's) from a multi-platform index.
    pub fn open(reference: &LayoutRef, platform: Option<&str>) -> Result<Self, BuildError> {
        let layout = OciLayout::open(&reference.path)?;
        let desc = layout.resolve(reference.tag.as_deref())?;
        let (desc, manifest) = layout.read_manifest(&desc, platform)?;
        let manifest_digest = darter_oci::descriptor_digest(&desc)?;
        let config_digest = darter_oci::descriptor_digest(manifest.config())?;
        let raw = layout.read_blob(&config_digest, manifest.config().size(), "config")?;
        let config = parse_config(&raw, &config_digest)?;
        Ok(LayoutImage {
            layout,
            reference: reference.clone(),
            manifest_digest,
            manifest,
            config,
        })
    }
}

/// Parses an image config, naming it on failure.
pub fn parse_config(raw: &[u8], digest: &OciDigest) -> Result<serde_json::Value, BuildError> {
    serde_json::from_slice(raw).map_err(|e| BuildError::Source {
        what: format!("config {digest}"),
        detail: e.to_string(),
    })
}

impl SourceImage for LayoutImage {
    fn name(&self) -> String {
        self.reference.to_string()
    }
    fn manifest_digest(&self) -> &OciDigest {
        &self.manifest_digest
    }
    fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }
    fn config(&self) -> &serde_json::Value {
        &self.config
    }
    fn open_layer(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>, BuildError> {
        let digest = darter_oci::descriptor_digest(desc)?;
        Ok(Box::new(self.layout.open_blob(&digest, desc.size())?))
    }
}

/// The config's `rootfs.diff_ids`, one per layer of the manifest.
pub(crate) fn diff_ids(image: &dyn SourceImage) -> Vec<Option<String>> {
    let ids = image
        .config()
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array());
    (0..image.manifest().layers().len())
        .map(|i| {
            ids.and_then(|a| a.get(i))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// Opens layer `desc` of `image` as a tar stream whose digests are checked
/// by [`VerifiedLayer::finish`].
pub(crate) fn open_layer(
    image: &dyn SourceImage,
    desc: &Descriptor,
    diff_id: Option<String>,
) -> Result<VerifiedLayer, BuildError> {
    let digest = darter_oci::descriptor_digest(desc)?;
    let media = desc.media_type().to_string();
    let compression = tar_layer_compression(&media).ok_or_else(|| BuildError::Source {
        what: format!("layer {digest}"),
        detail: format!("media type {media} is not a tar layer"),
    })?;
    let raw = image.open_layer(desc)?;
    let packed = Hashing::new(io::BufReader::with_capacity(1 << 20, raw));
    let tar = match compression {
        LayerCompression::None => Tar::Plain(packed),
        LayerCompression::Gzip => Tar::Gzip(flate2::read::MultiGzDecoder::new(packed)),
        LayerCompression::Zstd => Tar::Zstd(
            zstd::stream::read::Decoder::new(packed)
                .map_err(|e| BuildError::layer(digest.as_str(), e.to_string()))?,
        ),
    };
    Ok(VerifiedLayer {
        digest,
        size: desc.size(),
        diff_id,
        tar: Hashing::new(tar),
    })
}

type Packed = Hashing<io::BufReader<Box<dyn Read + Send>>>;

/// The decompressing reader of a layer, which gives back the compressed
/// stream when done so it can be hashed to its end.
enum Tar {
    Plain(Packed),
    Gzip(flate2::read::MultiGzDecoder<Packed>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<Packed>>),
}

impl Read for Tar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Tar::Plain(r) => r.read(buf),
            Tar::Gzip(r) => r.read(buf),
            Tar::Zstd(r) => r.read(buf),
        }
    }
}

impl Tar {
    fn into_packed(self) -> Packed {
        match self {
            Tar::Plain(r) => r,
            Tar::Gzip(r) => r.into_inner(),
            Tar::Zstd(r) => r.finish().into_inner(),
        }
    }
}

/// A layer being read: the tar stream, hashed both before and after
/// decompression.
pub(crate) struct VerifiedLayer {
    pub(crate) digest: OciDigest,
    size: u64,
    diff_id: Option<String>,
    tar: Hashing<Tar>,
}

impl VerifiedLayer {
    /// The uncompressed tar stream.
    pub(crate) fn reader(&mut self) -> &mut dyn Read {
        &mut self.tar
    }

    /// Reads what is left of both streams and checks both digests.
    pub(crate) fn finish(self) -> Result<(), BuildError> {
        let Self {
            digest,
            size,
            diff_id,
            mut tar,
        } = self;
        let layer_err = |e: io::Error| BuildError::layer(digest.as_str(), e.to_string());
        io::copy(&mut tar, &mut io::sink()).map_err(layer_err)?;
        let (diff, inner) = tar.finish();
        let mut packed = inner.into_packed();
        io::copy(&mut packed, &mut io::sink()).map_err(layer_err)?;
        let read = packed.count;
        let (actual, _) = packed.finish();
        if read != size {
            return Err(BuildError::layer(
                digest.as_str(),
                format!("layer has {read} bytes, the manifest says {size}"),
            ));
        }
        if actual != digest {
            return Err(BuildError::DigestMismatch {
                what: "layer".into(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        match diff_id {
            Some(expected) if expected != diff.as_str() => Err(BuildError::DigestMismatch {
                what: format!("layer {digest} (uncompressed, rootfs.diff_ids)"),
                expected,
                actual: diff.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (OciDigest, R) {
        (
            OciDigest::from_bytes(self.hasher.finalize().into()),
            self.inner,
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}
