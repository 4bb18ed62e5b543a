//! Walking a tree the way a program does: `lstat` every entry, and for
//! the read-all walk open and read every regular file to the end.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use anyhow::Context as _;

/// Read size: large enough that per-call overhead does not dominate.
const READ_BUFFER: usize = 1 << 20;

/// What a walk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkTotals {
    pub entries: u64,
    pub files: u64,
    /// Apparent size of all regular files.
    pub file_bytes: u64,
    /// Bytes actually read (zero unless reading).
    pub read_bytes: u64,
}

/// Walks `root` (not following symlinks), reading every regular file if
/// `read` is set.
pub fn walk(root: &Path, read: bool) -> anyhow::Result<WalkTotals> {
    let mut totals = WalkTotals::default();
    let mut buffer = if read {
        vec![0; READ_BUFFER]
    } else {
        Vec::new()
    };
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("lstat {}", path.display()))?;
            totals.entries += 1;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                totals.files += 1;
                totals.file_bytes += meta.len();
                if read {
                    totals.read_bytes += read_to_end(&path, &mut buffer)?;
                }
            }
        }
    }
    Ok(totals)
}

/// Reads the file at `path` to its end; returns how many bytes it had.
pub fn read_to_end(path: &Path, buffer: &mut [u8]) -> anyhow::Result<u64> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = file
            .read(buffer)
            .with_context(|| format!("reading {} at {total}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Reads one file sequentially with a 1 MiB buffer; returns its size.
pub fn read_file(path: &Path) -> anyhow::Result<u64> {
    read_to_end(path, &mut vec![0; READ_BUFFER])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_reads_a_small_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/one"), vec![1u8; 3000]).unwrap();
        std::fs::write(root.join("a/b/two"), vec![2u8; (3 << 20) + 5]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("a/link")).unwrap();

        let listed = walk(root, false).unwrap();
        let expected_bytes = 3000 + (3 << 20) + 5;
        assert_eq!(
            listed,
            WalkTotals {
                entries: 5,
                files: 2,
                file_bytes: expected_bytes,
                read_bytes: 0
            }
        );
        let read = walk(root, true).unwrap();
        assert_eq!(read.read_bytes, expected_bytes);
        assert_eq!(read_file(&root.join("a/b/two")).unwrap(), (3 << 20) + 5);
    }

    #[test]
    fn a_missing_root_is_an_error_naming_it() {
        let err = walk(Path::new("/nonexistent/darter-bench"), false).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/darter-bench"),
            "{err:#}"
        );
    }
}
