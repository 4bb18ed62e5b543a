//! Verifies a whole image: the digest chain, every chunk, and the EROFS
//! metadata, reporting each problem with the blob, chunk and files it
//! affects.

use std::collections::HashMap;

use darter_format::blob::BLOCK_BITS;
use darter_format::erofs::ondisk::mode;

use crate::error::ImageError;
use crate::image::{ChunkLocation, Image};
use crate::source::BlobSource;

/// At most this many paths are listed per damaged chunk.
const MAX_FILES_PER_PROBLEM: usize = 5;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What is wrong.
    pub message: String,
    /// The blob involved, if any.
    pub blob: Option<String>,
    /// The chunk index in that blob's table, if any.
    pub chunk: Option<usize>,
    /// Files whose content the problem affects.
    pub files: Vec<String>,
}

/// The result of [`check`].
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Inodes whose metadata was checked.
    pub inodes: u64,
    /// Chunks whose digest was verified.
    pub chunks: u64,
    /// Uncompressed bytes verified.
    pub bytes: u64,
    /// Problems found; empty means the image is sound.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True if nothing is wrong.
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks everything the image holds. Opening the image already verified
/// the manifest and bootstrap links; this verifies the rest.
pub fn check<S: BlobSource>(image: &Image<S>) -> CheckReport {
    let mut report = CheckReport::default();
    let users = check_metadata(image, &mut report);
    for blob in 0..image.blobs().len() {
        let digest = image.blobs()[blob].oci_digest();
        let count = match image.chunk_table(blob) {
            Ok(t) => t.records().len(),
            Err(e) => {
                report.problems.push(Problem {
                    message: e.to_string(),
                    blob: Some(digest),
                    chunk: None,
                    files: Vec::new(),
                });
                continue;
            }
        };
        for index in 0..count {
            let loc = ChunkLocation { blob, index };
            match image.read_chunk(loc) {
                Ok(data) => {
                    report.chunks += 1;
                    report.bytes += data.len() as u64;
                }
                Err(e) => report.problems.push(Problem {
                    message: e.to_string(),
                    blob: Some(digest.clone()),
                    chunk: Some(index),
                    files: users.get(&loc).cloned().unwrap_or_default(),
                }),
            }
        }
    }
    report
}

/// Walks the tree checking every inode; returns which files use each chunk.
fn check_metadata<S: BlobSource>(
    image: &Image<S>,
    report: &mut CheckReport,
) -> HashMap<ChunkLocation, Vec<String>> {
    let erofs = image.bootstrap().erofs();
    let chunk_size = image.bootstrap().chunk_size();
    let mut users: HashMap<ChunkLocation, Vec<String>> = HashMap::new();
    let mut problems = Vec::new();
    let walked = erofs.walk(&mut |parent, entry, inode| {
        report.inodes += 1;
        let mut path = parent.to_vec();
        if path.len() > 1 {
            path.push(b'/');
        }
        path.extend_from_slice(&entry.name);
        let lossy = String::from_utf8_lossy(&path).into_owned();
        let result = (|| -> Result<(), ImageError> {
            erofs.xattrs(inode)?;
            match inode.mode & mode::S_IFMT {
                mode::S_IFLNK => {
                    erofs.symlink_target(inode)?;
                }
                mode::S_IFREG if inode.size > 0 => {
                    for n in 0..inode.chunk_count(BLOCK_BITS) {
                        let idx = erofs.chunk_index(inode, n)?;
                        if idx.is_hole() {
                            continue;
                        }
                        let loc = image.locate(idx)?;
                        let record = image.record(loc)?;
                        let needed = (inode.size - n * chunk_size).min(chunk_size);
                        if u64::from(record.size) != needed {
                            return Err(ImageError::ChunkSize {
                                digest: image.blobs()[loc.blob].oci_digest(),
                                index: loc.index,
                                size: record.size,
                                needed,
                            });
                        }
                        let list = users.entry(loc).or_default();
                        if list.len() < MAX_FILES_PER_PROBLEM {
                            list.push(lossy.clone());
                        }
                    }
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err(e) = result {
            problems.push(Problem {
                message: e.to_string(),
                blob: None,
                chunk: None,
                files: vec![lossy],
            });
        }
        Ok(())
    });
    if let Err(e) = walked {
        problems.push(Problem {
            message: format!("directory tree: {e}"),
            blob: None,
            chunk: None,
            files: Vec::new(),
        });
    }
    report.problems.extend(problems);
    users
}
