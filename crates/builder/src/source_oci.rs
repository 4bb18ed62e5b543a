//! Reads OCI images (layouts) for conversion: manifest, config, and each
//! layer as a verified, decompressed tar stream.

use std::io::{self, Read};

use darter_oci::media::{LayerCompression, tar_layer_compression};
use darter_oci::{Descriptor, ImageManifest, LayoutRef, OciDigest, OciLayout};
use sha2::{Digest as _, Sha256};

use crate::BuildError;

/// An OCI image opened for conversion.
#[derive(Debug)]
pub(crate) struct OciSource {
    layout: OciLayout,
    pub(crate) manifest_digest: OciDigest,
    pub(crate) manifest: ImageManifest,
    /// The image config as JSON, kept whole so unknown fields survive.
    pub(crate) config: serde_json::Value,
}

impl OciSource {
    pub(crate) fn open(reference: &LayoutRef, platform: Option<&str>) -> Result<Self, BuildError> {
        let layout = OciLayout::open(&reference.path)?;
        let desc = layout.resolve(reference.tag.as_deref())?;
        let (desc, manifest) = layout.read_manifest(&desc, platform)?;
        let manifest_digest = darter_oci::descriptor_digest(&desc)?;
        let config_digest = darter_oci::descriptor_digest(manifest.config())?;
        let raw = layout.read_blob(&config_digest, manifest.config().size(), "config")?;
        let config = serde_json::from_slice(&raw).map_err(|e| BuildError::Source {
            what: format!("config {config_digest}"),
            detail: e.to_string(),
        })?;
        Ok(OciSource {
            layout,
            manifest_digest,
            manifest,
            config,
        })
    }

    /// The config's `rootfs.diff_ids`, one per layer.
    pub(crate) fn diff_ids(&self) -> Vec<Option<String>> {
        let ids = self
            .config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array());
        (0..self.manifest.layers().len())
            .map(|i| {
                ids.and_then(|a| a.get(i))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Opens layer `desc` as a tar stream whose digests are checked by
    /// [`VerifiedLayer::finish`].
    pub(crate) fn open_layer(
        &self,
        desc: &Descriptor,
        diff_id: Option<String>,
    ) -> Result<VerifiedLayer, BuildError> {
        let digest = darter_oci::descriptor_digest(desc)?;
        let media = desc.media_type().to_string();
        let compression = tar_layer_compression(&media).ok_or_else(|| BuildError::Source {
            what: format!("layer {digest}"),
            detail: format!("media type {media} is not a tar layer"),
        })?;
        let file = self.layout.open_blob(&digest, desc.size())?;
        let packed = Hashing::new(io::BufReader::with_capacity(1 << 20, file));
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
            diff_id,
            tar: Hashing::new(tar),
        })
    }
}

type Packed = Hashing<io::BufReader<std::fs::File>>;

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
            diff_id,
            mut tar,
        } = self;
        let layer_err = |e: io::Error| BuildError::layer(digest.as_str(), e.to_string());
        io::copy(&mut tar, &mut io::sink()).map_err(layer_err)?;
        let (diff, inner) = tar.finish();
        let mut packed = inner.into_packed();
        io::copy(&mut packed, &mut io::sink()).map_err(layer_err)?;
        let (actual, _) = packed.finish();
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
