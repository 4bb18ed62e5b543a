//! Sparse-aware streaming comparison of two regular files of equal size.
//!
//! Only the data extents of `expected` (found with SEEK_DATA/SEEK_HOLE) are
//! read from both files; inside `expected`'s holes, only the data extents
//! of `actual` are read, and they must be zeros. So two sparse files of
//! several GiB with a few MiB of data compare in milliseconds.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

use super::{DiffKind, Side};

const BUFFER: usize = 1 << 20;

/// Reusable read buffers (one per side).
pub(super) struct ContentComparer {
    expected: Vec<u8>,
    actual: Vec<u8>,
    zeros: Vec<u8>,
}

type SideError = (Side, io::Error);

/// Allocated bytes found in `expected`'s holes.
#[derive(Default)]
struct FilledHoles {
    first_offset: Option<u64>,
    bytes: u64,
}

/// Start of the next data extent at or after `pos`, or `size` if none.
fn next_data(file: &File, pos: u64, size: u64) -> io::Result<u64> {
    match rustix::fs::seek(file, SeekFrom::Data(pos)) {
        Ok(offset) => Ok(offset.min(size)),
        Err(rustix::io::Errno::NXIO) => Ok(size),
        Err(err) => Err(err.into()),
    }
}

/// Start of the next hole at or after `pos` (end of file counts as a hole).
fn next_hole(file: &File, pos: u64, size: u64) -> io::Result<u64> {
    match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
        Ok(offset) => Ok(offset.min(size)),
        Err(rustix::io::Errno::NXIO) => Ok(size),
        Err(err) => Err(err.into()),
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

fn chunk_len(range: &Range<u64>, pos: u64) -> usize {
    usize::try_from(range.end - pos).map_or(BUFFER, |n| n.min(BUFFER))
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

impl ContentComparer {
    pub(super) fn new() -> Self {
        ContentComparer {
            expected: vec![0; BUFFER],
            actual: vec![0; BUFFER],
            zeros: vec![0; BUFFER],
        }
    }

    /// Compares files of equal `size`. With `check_holes` (the block size
    /// of `actual`), also reports allocated blocks inside `expected`'s holes.
    pub(super) fn compare(
        &mut self,
        expected: &File,
        actual: &File,
        size: u64,
        check_holes: Option<u64>,
    ) -> Result<Vec<DiffKind>, SideError> {
        let mut filled = FilledHoles::default();
        let mut pos = 0;
        let mismatch = loop {
            if pos >= size {
                break None;
            }
            let data = next_data(expected, pos, size).map_err(|e| (Side::Expected, e))?;
            if data > pos {
                let hole = pos..data;
                let found = self.check_hole(actual, &hole, size, check_holes, &mut filled)?;
                if found.is_some() {
                    break found;
                }
            }
            if data >= size {
                break None;
            }
            let end = next_hole(expected, data, size).map_err(|e| (Side::Expected, e))?;
            if let Some(offset) = self.compare_range(expected, actual, data..end)? {
                break Some(offset);
            }
            pos = end;
        };
        let mut diffs = Vec::new();
        if let Some(offset) = mismatch {
            diffs.push(DiffKind::Content {
                offset,
                expected_blake3: self.hash(expected).map_err(|e| (Side::Expected, e))?,
                actual_blake3: self.hash(actual).map_err(|e| (Side::Actual, e))?,
            });
        }
        if let Some(first_offset) = filled.first_offset {
            diffs.push(DiffKind::HolesFilled {
                first_offset,
                bytes: filled.bytes,
            });
        }
        Ok(diffs)
    }

    /// First differing offset in `range`, reading both files.
    fn compare_range(
        &mut self,
        expected: &File,
        actual: &File,
        range: Range<u64>,
    ) -> Result<Option<u64>, SideError> {
        let mut pos = range.start;
        while pos < range.end {
            let len = chunk_len(&range, pos);
            let e_buf = &mut self.expected[..len];
            let a_buf = &mut self.actual[..len];
            let e_len = read_full_at(expected, e_buf, pos).map_err(|e| (Side::Expected, e))?;
            if e_len < len {
                let err =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while compared");
                return Err((Side::Expected, err));
            }
            let a_len = read_full_at(actual, a_buf, pos).map_err(|e| (Side::Actual, e))?;
            // Slice equality is a memcmp; locate the byte only on mismatch.
            if e_buf[..a_len] != a_buf[..a_len] {
                let i = e_buf
                    .iter()
                    .zip(a_buf.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(Some(pos + i as u64));
            }
            if a_len < len {
                return Ok(Some(pos + a_len as u64));
            }
            pos += len as u64;
        }
        Ok(None)
    }

    /// Checks `actual` over a hole of `expected`: its data extents there
    /// must be zeros (returns the first non-zero offset otherwise), and
    /// with `check_holes` their whole blocks are counted as filled holes.
    fn check_hole(
        &mut self,
        actual: &File,
        hole: &Range<u64>,
        size: u64,
        check_holes: Option<u64>,
        filled: &mut FilledHoles,
    ) -> Result<Option<u64>, SideError> {
        let mut pos = hole.start;
        while pos < hole.end {
            let data = next_data(actual, pos, size).map_err(|e| (Side::Actual, e))?;
            if data >= hole.end {
                break;
            }
            let end = next_hole(actual, data, size)
                .map_err(|e| (Side::Actual, e))?
                .min(hole.end);
            if let Some(offset) = self.find_nonzero(actual, data..end)? {
                return Ok(Some(offset));
            }
            if let Some(block) = check_holes {
                // Partial blocks at the hole's edges may be allocated on a
                // filesystem with larger blocks.
                let start = data.max(round_up(hole.start, block));
                let stop = end.min(hole.end / block * block);
                if start < stop {
                    filled.first_offset.get_or_insert(start);
                    filled.bytes += stop - start;
                }
            }
            pos = end;
        }
        Ok(None)
    }

    fn find_nonzero(&mut self, file: &File, range: Range<u64>) -> Result<Option<u64>, SideError> {
        let mut pos = range.start;
        while pos < range.end {
            let len = chunk_len(&range, pos);
            let buf = &mut self.actual[..len];
            let read = read_full_at(file, buf, pos).map_err(|e| (Side::Actual, e))?;
            if buf[..read] != self.zeros[..read] {
                let i = buf.iter().position(|&b| b != 0).unwrap_or(0);
                return Ok(Some(pos + i as u64));
            }
            if read < len {
                return Ok(Some(pos + read as u64));
            }
            pos += len as u64;
        }
        Ok(None)
    }

    /// blake3 of the whole file (holes read as zeros), hex.
    fn hash(&mut self, file: &File) -> io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut pos = 0;
        loop {
            let read = read_full_at(file, &mut self.expected, pos)?;
            if read == 0 {
                break;
            }
            hasher.update(&self.expected[..read]);
            pos += read as u64;
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}
