//! Inputs the benchmarks need besides the testkit's Debian fixtures: a
//! tree holding one file of random bytes (cached next to the fixtures),
//! and sizes read from OCI image layouts.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use darter_testkit::fixtures::{OciImage, cache_dir};

/// Name of the file in [`random_file_tree`].
pub const RANDOM_FILE: &str = "random.bin";
const WRITE_CHUNK: usize = 1 << 20;

/// A directory holding one file, `random.bin`, of `bytes` pseudo-random
/// (incompressible) bytes; cached in the fixture cache as
/// `bench-random-<MiB>m-v1`. Built in a staging directory and renamed
/// into place, so a half-written tree is never used.
pub fn random_file_tree(bytes: u64) -> anyhow::Result<PathBuf> {
    let cache = cache_dir();
    let name = format!("bench-random-{}m-v1", bytes >> 20);
    let entry = cache.join(&name);
    if entry.join(RANDOM_FILE).is_file() {
        return Ok(entry);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let staging = cache.join(format!(".{name}.building-{}", std::process::id()));
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    tracing::info!(path = %entry.display(), bytes, "writing a random file (cached afterwards)");
    let written = write_random(&staging.join(RANDOM_FILE), bytes, bytes)
        .and_then(|()| std::fs::rename(&staging, &entry).context("publishing the random tree"));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        // Another run may have published the same entry meanwhile.
        if entry.join(RANDOM_FILE).is_file() {
            return Ok(entry);
        }
    }
    written.map(|()| entry)
}

/// Writes `bytes` pseudo-random bytes (the same for the same `seed`) to a
/// new file at `path`.
pub fn write_random(path: &Path, bytes: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut buffer = vec![0u8; WRITE_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(WRITE_CHUNK, |l| l.min(WRITE_CHUNK));
        rng.fill(&mut buffer[..n]);
        file.write_all(&buffer[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// The compressed sizes of an OCI image's layers, from its manifest.
pub fn oci_layer_sizes(image: &OciImage) -> anyhow::Result<Vec<u64>> {
    let index = read_json(&image.layout.join("index.json"))?;
    let digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == image.tag.as_str())
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("no tag {} in {}", image.tag, image.layout.display()))?;
    let manifest = read_json(&blob_path(&image.layout, digest)?)?;
    let sizes: Option<Vec<u64>> = manifest["layers"]
        .as_array()
        .map(|layers| layers.iter().map(|l| l["size"].as_u64()).collect())
        .unwrap_or_default();
    match sizes {
        Some(sizes) if !sizes.is_empty() => Ok(sizes),
        _ => bail!(
            "manifest {digest} in {} lists no layer sizes",
            image.layout.display()
        ),
    }
}

/// The bytes of every blob in an OCI layout (for a layout holding one
/// image: the whole image, manifest and config included).
pub fn layout_blob_bytes(layout: &Path) -> anyhow::Result<u64> {
    let blobs = layout.join("blobs").join("sha256");
    let mut total = 0;
    for entry in
        std::fs::read_dir(&blobs).with_context(|| format!("listing {}", blobs.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", blobs.display()))?;
        total += entry
            .metadata()
            .with_context(|| format!("stat {}", entry.path().display()))?
            .len();
    }
    Ok(total)
}

fn blob_path(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let (algo, hex) = digest
        .split_once(':')
        .filter(|(_, hex)| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("malformed digest {digest:?} in {}", layout.display()))?;
    Ok(layout.join("blobs").join(algo).join(hex))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_layout(dir: &Path, manifest: &str) -> OciImage {
        let digest = "ab12";
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(digest), manifest).unwrap();
        let index = format!(
            r#"{{"manifests":[{{"digest":"sha256:{digest}","annotations":{{"org.opencontainers.image.ref.name":"t"}}}}]}}"#
        );
        std::fs::write(dir.join("index.json"), index).unwrap();
        OciImage {
            layout: dir.to_path_buf(),
            tag: "t".into(),
        }
    }

    #[test]
    fn reads_layer_sizes_and_blob_totals() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = r#"{"layers":[{"size":63000000},{"size":17000000}]}"#;
        let image = write_layout(dir.path(), manifest);
        assert_eq!(oci_layer_sizes(&image).unwrap(), [63_000_000, 17_000_000]);
        assert_eq!(
            layout_blob_bytes(dir.path()).unwrap(),
            manifest.len() as u64
        );
    }

    #[test]
    fn unknown_tags_and_bad_manifests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = write_layout(dir.path(), r#"{"layers":[{"size":"big"}]}"#);
        let err = oci_layer_sizes(&image).unwrap_err();
        assert!(format!("{err:#}").contains("no layer sizes"), "{err:#}");
        image.tag = "other".into();
        let err = oci_layer_sizes(&image).unwrap_err();
        assert!(format!("{err:#}").contains("no tag other"), "{err:#}");
        assert!(blob_path(dir.path(), "sha256:../../etc").is_err());
    }

    #[test]
    fn random_bytes_are_deterministic_and_incompressible() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_random(&a, (1 << 20) + 17, 7).unwrap();
        write_random(&b, (1 << 20) + 17, 7).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes.len(), (1 << 20) + 17);
        assert_eq!(bytes, std::fs::read(&b).unwrap());
        let distinct: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
