//! An OCI image layout directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use crate::digest::{OciDigest, Sha256Writer};
use crate::media;

/// Manifests, indexes and configs larger than this are refused (hostile
/// input protection; real ones are a few KiB).
pub const MAX_JSON_SIZE: u64 = 8 << 20;

/// The annotation naming a manifest's tag in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors working with a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The directory is not an OCI layout.
    #[error("{path} is not an OCI image layout (no valid oci-layout file)")]
    NotALayout {
        /// The directory.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// JSON that does not parse.
    #[error("{path}: invalid JSON: {detail}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// A digest string is malformed.
    #[error("{0}")]
    BadDigest(String),
    /// A blob is missing.
    #[error("blob {digest} is missing from {layout}")]
    MissingBlob {
        /// The blob.
        digest: String,
        /// The layout.
        layout: PathBuf,
    },
    /// A blob's content does not match its digest or size.
    #[error("blob {digest} in {layout} is corrupt: {detail}")]
    Corrupt {
        /// The blob.
        digest: String,
        /// The layout.
        layout: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The tag is not in `index.json`.
    #[error("no image tagged {tag:?} in {layout} (tags: {known})")]
    TagNotFound {
        /// The tag asked for.
        tag: String,
        /// The layout.
        layout: PathBuf,
        /// Tags that exist.
        known: String,
    },
    /// No tag given and the layout does not hold exactly one image.
    #[error("{layout} holds {count} images; name one with oci:{}:TAG", layout.display())]
    Ambiguous {
        /// The layout.
        layout: PathBuf,
        /// How many manifests it lists.
        count: usize,
    },
    /// A JSON blob exceeds [`MAX_JSON_SIZE`].
    #[error("{what} {digest} is {size} bytes, more than the {MAX_JSON_SIZE}-byte limit")]
    TooLarge {
        /// What kind of blob.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// Its size.
        size: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let marker = path.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|_| LayoutError::NotALayout {
            path: path.to_owned(),
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| LayoutError::NotALayout {
                path: path.to_owned(),
            })?;
        if value
            .get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .is_none()
        {
            return Err(LayoutError::NotALayout {
                path: path.to_owned(),
            });
        }
        Ok(OciLayout {
            root: path.to_owned(),
        })
    }

    /// Opens a layout, creating an empty one if `path` does not hold one.
    pub fn create(path: &Path) -> Result<Self, LayoutError> {
        if let Ok(layout) = Self::open(path) {
            return Ok(layout);
        }
        let blobs = path.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;
        let layout = OciLayout {
            root: path.to_owned(),
        };
        layout.write_atomic(
            &path.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        if !path.join("index.json").exists() {
            layout.write_index(&empty_index())?;
        }
        Ok(layout)
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &OciDigest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// True if the blob is present.
    pub fn has_blob(&self, digest: &OciDigest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob, checking that its size is the one expected.
    pub fn open_blob(&self, digest: &OciDigest, size: u64) -> Result<File, LayoutError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::MissingBlob {
                digest: digest.to_string(),
                layout: self.root.clone(),
            },
            _ => LayoutError::Io {
                op: "open",
                path: path.clone(),
                source: e,
            },
        })?;
        let actual = file.metadata().map_err(io_err("stat", &path))?.len();
        if actual != size {
            return Err(self.corrupt(digest, format!("size is {actual}, descriptor says {size}")));
        }
        Ok(file)
    }

    /// Reads a small blob whole and verifies its digest.
    pub fn read_blob(
        &self,
        digest: &OciDigest,
        size: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, LayoutError> {
        if size > MAX_JSON_SIZE {
            return Err(LayoutError::TooLarge {
                what,
                digest: digest.to_string(),
                size,
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        self.open_blob(digest, size)?
            .take(size)
            .read_to_end(&mut data)
            .map_err(io_err("read", &self.blob_path(digest)))?;
        let actual = OciDigest::of(&data);
        if &actual != digest {
            return Err(self.corrupt(digest, format!("content hashes to {actual}")));
        }
        Ok(data)
    }

    fn corrupt(&self, digest: &OciDigest, detail: String) -> LayoutError {
        LayoutError::Corrupt {
            digest: digest.to_string(),
            layout: self.root.clone(),
            detail,
        }
    }

    /// Starts writing a blob; it becomes visible only when committed.
    pub fn begin_blob(&self) -> Result<BlobUpload, LayoutError> {
        let dir = self.root.join("blobs").join("sha256");
        let file = tempfile::Builder::new()
            .prefix(".upload-")
            .tempfile_in(&dir)
            .map_err(io_err("create temp file in", &dir))?;
        Ok(BlobUpload {
            writer: Sha256Writer::new(io::BufWriter::with_capacity(1 << 20, file)),
            layout: self.clone(),
        })
    }

    /// Writes a whole blob from memory.
    pub fn put_blob(&self, data: &[u8]) -> Result<(OciDigest, u64), LayoutError> {
        let mut upload = self.begin_blob()?;
        upload
            .write_all(data)
            .map_err(io_err("write", &self.root))?;
        upload.commit()
    }

    /// The parsed `index.json`.
    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.root.join("index.json");
        let data = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&data).map_err(|e| LayoutError::Json {
            path,
            detail: e.to_string(),
        })
    }

    /// The manifest descriptor for `tag`, or the only manifest when `tag`
    /// is `None`.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.index()?;
        let manifests = index.manifests();
        let tag_of = |d: &Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        match tag {
            Some(tag) => manifests
                .iter()
                .find(|d| tag_of(d).as_deref() == Some(tag))
                .cloned()
                .ok_or_else(|| LayoutError::TagNotFound {
                    tag: tag.to_owned(),
                    layout: self.root.clone(),
                    known: manifests
                        .iter()
                        .filter_map(tag_of)
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            None if manifests.len() == 1 => Ok(manifests[0].clone()),
            None => Err(LayoutError::Ambiguous {
                layout: self.root.clone(),
                count: manifests.len(),
            }),
        }
    }

    /// Points `tag` at `desc` (replacing what it pointed at) in `index.json`.
    pub fn set_tag(&self, mut desc: Descriptor, tag: &str) -> Result<(), LayoutError> {
        let mut index = self.index()?;
        let mut annotations = desc.annotations().clone().unwrap_or_default();
        annotations.insert(REF_NAME.to_owned(), tag.to_owned());
        desc.set_annotations(Some(annotations));
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .map(String::as_str)
                    != Some(tag)
            })
            .cloned()
            .collect();
        manifests.push(desc);
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    /// Reads the manifest `desc` points at; an index is resolved to the
    /// manifest for `platform` (`os/arch`), the host's by default.
    pub fn read_manifest(
        &self,
        desc: &Descriptor,
        platform: Option<&str>,
    ) -> Result<(Descriptor, ImageManifest), LayoutError> {
        let digest = descriptor_digest(desc)?;
        let data = self.read_blob(&digest, desc.size(), "manifest")?;
        let media = desc.media_type().to_string();
        let declared = serde_json::from_slice::<serde_json::Value>(&data)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            });
        let is_index = media::is_index(&media) || declared.as_deref().is_some_and(media::is_index);
        let json_err = |e: serde_json::Error| LayoutError::Json {
            path: self.blob_path(&digest),
            detail: e.to_string(),
        };
        if is_index {
            let index: ImageIndex = serde_json::from_slice(&data).map_err(json_err)?;
            let chosen = choose_platform(&index, platform).ok_or_else(|| LayoutError::Corrupt {
                digest: digest.to_string(),
                layout: self.root.clone(),
                detail: format!(
                    "index has no manifest for platform {}",
                    platform.unwrap_or(&host_platform())
                ),
            })?;
            return self.read_manifest(&chosen, None);
        }
        let manifest = serde_json::from_slice(&data).map_err(json_err)?;
        Ok((desc.clone(), manifest))
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        let data = serde_json::to_vec(index).map_err(|e| LayoutError::Json {
            path: self.root.join("index.json"),
            detail: e.to_string(),
        })?;
        self.write_atomic(&self.root.join("index.json"), &data)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), LayoutError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).map_err(io_err("create temp file in", dir))?;
        tmp.write_all(data).map_err(io_err("write", path))?;
        tmp.as_file().sync_all().map_err(io_err("sync", path))?;
        tmp.persist(path).map_err(|e| LayoutError::Io {
            op: "rename onto",
            path: path.to_owned(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// The digest of a descriptor, validated.
pub fn descriptor_digest(desc: &Descriptor) -> Result<OciDigest, LayoutError> {
    desc.digest()
        .to_string()
        .parse()
        .map_err(LayoutError::BadDigest)
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_manifests(Vec::new());
    index.set_media_type(Some(MediaType::ImageIndex));
    index
}

/// The host platform as `os/arch` in OCI terms.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

fn choose_platform(index: &ImageIndex, platform: Option<&str>) -> Option<Descriptor> {
    let want = platform.map_or_else(host_platform, str::to_owned);
    index
        .manifests()
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                let base = format!("{}/{}", p.os(), p.architecture());
                let full = p.variant().as_ref().map(|v| format!("{base}/{v}"));
                want == base || Some(&want) == full.as_ref()
            })
        })
        .cloned()
}

/// A blob being written into a layout.
#[derive(Debug)]
pub struct BlobUpload {
    writer: Sha256Writer<io::BufWriter<tempfile::NamedTempFile>>,
    layout: OciLayout,
}

impl Write for BlobUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl BlobUpload {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.writer.written()
    }

    /// Moves the blob into place under its digest. Dropping an upload
    /// without committing deletes the temp file.
    pub fn commit(self) -> Result<(OciDigest, u64), LayoutError> {
        let (buffered, digest, size) = self.writer.finish();
        let root = self.layout.root.clone();
        let tmp = buffered.into_inner().map_err(|e| LayoutError::Io {
            op: "flush",
            path: root.clone(),
            source: e.into_error(),
        })?;
        tmp.as_file().sync_all().map_err(io_err("sync", &root))?;
        let dest = self.layout.blob_path(&digest);
        tmp.persist(&dest).map_err(|e| LayoutError::Io {
            op: "rename onto",
            path: dest.clone(),
            source: e.error,
        })?;
        Ok((digest, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let (digest, size) = layout.put_blob(b"{}").unwrap();
        assert_eq!(layout.read_blob(&digest, size, "config").unwrap(), b"{}");
        assert!(layout.read_blob(&digest, size + 1, "config").is_err());
        // A blob corrupted on disk is caught by its digest.
        fs::write(layout.blob_path(&digest), b"[]").unwrap();
        assert!(matches!(
            layout.read_blob(&digest, 2, "config"),
            Err(LayoutError::Corrupt { .. })
        ));

        let desc = Descriptor::new(
            MediaType::ImageManifest,
            size,
            oci_spec::image::Digest::try_from(digest.as_str()).unwrap(),
        );
        layout.set_tag(desc.clone(), "a").unwrap();
        layout.set_tag(desc.clone(), "b").unwrap();
        layout.set_tag(desc, "a").unwrap();
        let reopened = OciLayout::open(dir.path()).unwrap();
        assert_eq!(reopened.index().unwrap().manifests().len(), 2);
        assert!(reopened.resolve(Some("a")).is_ok());
        assert!(matches!(
            reopened.resolve(Some("c")),
            Err(LayoutError::TagNotFound { .. })
        ));
        assert!(matches!(
            reopened.resolve(None),
            Err(LayoutError::Ambiguous { .. })
        ));
        assert!(matches!(
            OciLayout::open(Path::new("/nonexistent")),
            Err(LayoutError::NotALayout { .. })
        ));
    }

    #[test]
    fn uncommitted_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let mut up = layout.begin_blob().unwrap();
        up.write_all(b"partial").unwrap();
        drop(up);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }
}
