//! Sparse files: where the data is (old GNU `S` headers with their
//! extension blocks, PAX `GNU.sparse.*` formats 0.0, 0.1 and 1.0), and a
//! cursor that walks a map as the file's logical content, holes reading as
//! zeros.
//!
//! The stored runs follow each other without padding, as Go's archive/tar
//! reads them. GNU tar reads each run from a block boundary, which agrees
//! for what it writes: all runs but the last are whole blocks there.

use super::header::{self, BLOCK_SIZE, Block};
use super::pax;
use super::{MAX_SPARSE_SEGMENTS, TarErrorKind};

/// Pairs in an old GNU sparse extension block (then its continue flag).
pub(crate) const EXTENSION_PAIRS: usize = 21;
/// Bytes of one old GNU pair: a 12-byte offset and a 12-byte size.
const PAIR_BYTES: usize = 24;
/// Digits of the longest number in a 1.0 map worth reading (any `u64`).
const MAX_DIGITS: usize = 20;

/// A run of data in a sparse file; everything between runs is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// The data runs of a sparse file, sorted, not overlapping and inside
/// its logical size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseMap {
    segments: Vec<Segment>,
    size: u64,
}

pub(crate) fn sparse_error(detail: impl Into<String>) -> TarErrorKind {
    TarErrorKind::Sparse(detail.into())
}

impl SparseMap {
    pub(crate) fn new(segments: Vec<Segment>, size: u64) -> Result<Self, TarErrorKind> {
        let mut previous_end = 0;
        for s in &segments {
            let end = s
                .offset
                .checked_add(s.len)
                .filter(|&end| end <= size)
                .ok_or_else(|| {
                    sparse_error(format!(
                        "the run of {} bytes at {} ends beyond the file's {size} bytes",
                        s.len, s.offset
                    ))
                })?;
            if s.offset < previous_end {
                return Err(sparse_error(format!(
                    "the run at {} overlaps or comes before the one ending at {previous_end}",
                    s.offset
                )));
            }
            previous_end = end;
        }
        Ok(SparseMap { segments, size })
    }

    /// The logical size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of data stored (no overflow: the runs fit in `size`).
    pub(crate) fn data_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// What the logical bytes at a [`Cursor`] are, and how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    Hole(u64),
    Data(u64),
    End,
}

/// A position in the logical content of a sparse file.
#[derive(Debug)]
pub(crate) struct Cursor {
    map: SparseMap,
    pos: u64,
    next: usize,
}

impl Cursor {
    pub(crate) fn new(map: SparseMap) -> Self {
        Cursor {
            map,
            pos: 0,
            next: 0,
        }
    }

    pub(crate) fn run(&mut self) -> Run {
        while let Some(s) = self.map.segments.get(self.next) {
            if self.pos < s.offset {
                return Run::Hole(s.offset - self.pos);
            }
            let end = s.offset + s.len;
            if self.pos < end {
                return Run::Data(end - self.pos);
            }
            self.next += 1;
        }
        if self.pos < self.map.size {
            Run::Hole(self.map.size - self.pos)
        } else {
            Run::End
        }
    }

    /// Moves on by `n` bytes, at most the length of the current run.
    pub(crate) fn advance(&mut self, n: u64) {
        self.pos += n;
    }
}

/// The `GNU.sparse.*` records of one entry (keywords without the prefix).
#[derive(Debug, Default)]
pub(crate) struct SparseRecords {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    size: Option<u64>,
    realsize: Option<u64>,
    numblocks: Option<u64>,
    /// 0.1: `GNU.sparse.map=offset,size,offset,size...`.
    map: Option<Vec<u64>>,
    /// 0.0: alternating `GNU.sparse.offset` and `GNU.sparse.numbytes`.
    pairs: Vec<u64>,
}

/// Where a PAX sparse file keeps its map.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PaxSparse {
    /// 0.0 and 0.1: in the records.
    InRecords(SparseMap),
    /// 1.0: at the start of the data; the logical size.
    InData(u64),
}

impl SparseRecords {
    /// Applies `GNU.sparse.KEY=VALUE`; unknown keys are skipped.
    pub(crate) fn apply(&mut self, key: &[u8], value: &[u8]) -> Result<(), TarErrorKind> {
        let number = |slot: &mut Option<u64>| pax::decimal(value).map(|v| *slot = Some(v));
        let applied = match key {
            b"major" => number(&mut self.major),
            b"minor" => number(&mut self.minor),
            b"size" => number(&mut self.size),
            b"realsize" => number(&mut self.realsize),
            b"numblocks" => number(&mut self.numblocks),
            b"name" => pax::path_value(value).map(|v| self.name = v),
            b"map" => number_list(value).map(|v| self.map = Some(v)),
            b"offset" => self.push_pair_number(value, 0),
            b"numbytes" => self.push_pair_number(value, 1),
            _ => Ok(()),
        };
        applied.map_err(|detail| pax::value_error(&[b"GNU.sparse.", key].concat(), detail))
    }

    fn push_pair_number(&mut self, value: &[u8], position: usize) -> Result<(), String> {
        if self.pairs.len() % 2 != position {
            return Err("offset and numbytes records do not alternate".into());
        }
        if self.pairs.len() >= 2 * MAX_SPARSE_SEGMENTS {
            return Err(format!("more than {MAX_SPARSE_SEGMENTS} runs"));
        }
        self.pairs.push(pax::decimal(value)?);
        Ok(())
    }

    /// The real name of a 1.0 sparse file (its header has a made-up one).
    pub(crate) fn name(&self) -> Option<&[u8]> {
        self.name.as_deref()
    }

    /// Which PAX sparse format the records describe, if any.
    pub(crate) fn format(self) -> Result<Option<PaxSparse>, TarErrorKind> {
        let has_map = self.map.is_some() || !self.pairs.is_empty();
        match (self.major, self.minor) {
            (None, None) if !has_map => Ok(None),
            (None, None) | (Some(0), Some(0 | 1)) => self.map_in_records().map(Some),
            (Some(1), Some(0)) => {
                let size = self
                    .realsize
                    .or(self.size)
                    .ok_or_else(|| sparse_error("GNU sparse 1.0 without GNU.sparse.realsize"))?;
                Ok(Some(PaxSparse::InData(size)))
            }
            (major, minor) => Err(sparse_error(format!(
                "GNU sparse format {}.{} is not supported",
                major.map_or("?".into(), |v| v.to_string()),
                minor.map_or("?".into(), |v| v.to_string())
            ))),
        }
    }

    fn map_in_records(self) -> Result<PaxSparse, TarErrorKind> {
        let size = self
            .size
            .or(self.realsize)
            .ok_or_else(|| sparse_error("GNU sparse 0.x without GNU.sparse.size"))?;
        let numbers = match (self.map, self.pairs.is_empty()) {
            (None, _) => self.pairs,
            (Some(map), true) => map,
            (Some(_), false) => {
                return Err(sparse_error(
                    "both GNU.sparse.map and GNU.sparse.offset records",
                ));
            }
        };
        if numbers.len() % 2 != 0 {
            return Err(sparse_error("the map has an offset without a size"));
        }
        let runs = numbers.len() / 2;
        if self.numblocks.is_some_and(|n| n != runs as u64) {
            return Err(sparse_error(format!(
                "GNU.sparse.numblocks says {:?} runs, the map has {runs}",
                self.numblocks
            )));
        }
        let segments = numbers
            .chunks_exact(2)
            .map(|p| Segment {
                offset: p[0],
                len: p[1],
            })
            .collect();
        SparseMap::new(segments, size).map(PaxSparse::InRecords)
    }
}

/// `a,b,c`: decimal numbers separated by commas (none if empty).
fn number_list(value: &[u8]) -> Result<Vec<u64>, String> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let count = value.iter().filter(|&&b| b == b',').count() + 1;
    if count > 2 * MAX_SPARSE_SEGMENTS {
        return Err(format!("more than {MAX_SPARSE_SEGMENTS} runs"));
    }
    value.split(|&b| b == b',').map(pax::decimal).collect()
}

/// Adds the (offset, size) pairs of an old GNU sparse header or extension
/// block to `into`: `count` pairs from byte `start`, ended early by an
/// empty offset. Returns the flag after them: whether another extension
/// block follows.
pub(crate) fn old_gnu_pairs(
    block: &Block,
    start: usize,
    count: usize,
    into: &mut Vec<Segment>,
) -> Result<bool, TarErrorKind> {
    for pair in block[start..start + count * PAIR_BYTES].chunks_exact(PAIR_BYTES) {
        let (offset, len) = pair.split_at(PAIR_BYTES / 2);
        if offset[0] == 0 {
            break;
        }
        if into.len() >= MAX_SPARSE_SEGMENTS {
            return Err(sparse_error(format!(
                "more than {MAX_SPARSE_SEGMENTS} runs"
            )));
        }
        into.push(Segment {
            offset: header::unsigned(offset, "sparse offset")?,
            len: header::unsigned(len, "sparse size")?,
        });
    }
    Ok(block[start + count * PAIR_BYTES] != 0)
}

/// Supplies the next block of an entry's data.
pub(crate) type NextBlock<'f> = dyn FnMut(&mut Block) -> Result<(), TarErrorKind> + 'f;

/// Reads the map GNU sparse 1.0 keeps at the start of the data: decimal
/// numbers one a line, the count of runs and then each run's offset and
/// size, padded to a block boundary.
pub(crate) fn read_data_map(next_block: &mut NextBlock<'_>) -> Result<Vec<Segment>, TarErrorKind> {
    let mut lines = Lines {
        block: [0; BLOCK_SIZE],
        pos: BLOCK_SIZE,
        next_block,
    };
    let count = lines.number()?;
    if count > MAX_SPARSE_SEGMENTS as u64 {
        return Err(sparse_error(format!(
            "the map has {count} runs, more than {MAX_SPARSE_SEGMENTS}"
        )));
    }
    // Grown as runs are read, not trusted for the allocation.
    let mut segments = Vec::new();
    for _ in 0..count {
        let offset = lines.number()?;
        let len = lines.number()?;
        segments.push(Segment { offset, len });
    }
    Ok(segments)
}

/// Newline-terminated decimal numbers across blocks.
struct Lines<'n, 'f> {
    block: Block,
    pos: usize,
    next_block: &'n mut NextBlock<'f>,
}

impl Lines<'_, '_> {
    fn number(&mut self) -> Result<u64, TarErrorKind> {
        let bad =
            || sparse_error("the map at the start of the data is not decimal numbers, one a line");
        let (mut value, mut digits) = (0u64, 0);
        loop {
            if self.pos == BLOCK_SIZE {
                (self.next_block)(&mut self.block)?;
                self.pos = 0;
            }
            let byte = self.block[self.pos];
            self.pos += 1;
            match byte {
                b'\n' if digits > 0 => return Ok(value),
                b'0'..=b'9' if digits < MAX_DIGITS => {
                    value = value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(byte - b'0')))
                        .ok_or_else(bad)?;
                    digits += 1;
                }
                _ => return Err(bad()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, len: u64) -> Segment {
        Segment { offset, len }
    }

    #[test]
    fn maps_must_be_sorted_disjoint_and_inside_the_file() {
        type Case = (&'static [(u64, u64)], u64, bool);
        let cases: &[Case] = &[
            (&[], 0, true),
            (&[], 100, true),
            (&[(0, 10), (10, 10), (50, 0), (100, 0)], 100, true),
            (&[(0, 10), (5, 10)], 100, false),
            (&[(50, 10), (0, 10)], 100, false),
            (&[(95, 10)], 100, false),
            (&[(101, 0)], 100, false),
            (&[(u64::MAX, 2)], u64::MAX, false),
        ];
        for (runs, size, ok) in cases {
            let segments = runs.iter().map(|&(o, l)| seg(o, l)).collect();
            assert_eq!(
                SparseMap::new(segments, *size).is_ok(),
                *ok,
                "{runs:?} in {size}"
            );
        }
    }

    #[test]
    fn the_cursor_walks_holes_and_data() {
        let map = SparseMap::new(vec![seg(0, 0), seg(10, 5), seg(15, 5), seg(30, 0)], 40).unwrap();
        assert_eq!(map.data_bytes(), 10);
        let mut cursor = Cursor::new(map);
        let mut runs = Vec::new();
        loop {
            let run = cursor.run();
            runs.push(run);
            match run {
                Run::Hole(n) | Run::Data(n) => cursor.advance(n.min(3)),
                Run::End => break,
            }
        }
        assert_eq!(
            runs,
            [
                Run::Hole(10),
                Run::Hole(7),
                Run::Hole(4),
                Run::Hole(1),
                Run::Data(5),
                Run::Data(2),
                Run::Data(5),
                Run::Data(2),
                // Up to the empty run at 30, then up to the end.
                Run::Hole(10),
                Run::Hole(7),
                Run::Hole(4),
                Run::Hole(1),
                Run::Hole(10),
                Run::Hole(7),
                Run::Hole(4),
                Run::Hole(1),
                Run::End
            ]
        );
    }

    fn records(pairs: &[(&str, &str)]) -> Result<Option<PaxSparse>, TarErrorKind> {
        let mut r = SparseRecords::default();
        for (k, v) in pairs {
            r.apply(k.as_bytes(), v.as_bytes())?;
        }
        r.format()
    }

    fn in_records(runs: &[(u64, u64)], size: u64) -> Option<PaxSparse> {
        let segments = runs.iter().map(|&(o, l)| seg(o, l)).collect();
        Some(PaxSparse::InRecords(
            SparseMap::new(segments, size).unwrap(),
        ))
    }

    #[test]
    fn pax_sparse_formats() {
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<Option<PaxSparse>>,
        );
        let cases: Vec<Case> = vec![
            (&[], Some(None)),
            (&[("name", "real"), ("size", "5")], Some(None)),
            (
                &[
                    ("size", "100"),
                    ("numblocks", "2"),
                    ("offset", "0"),
                    ("numbytes", "10"),
                    ("offset", "90"),
                    ("numbytes", "10"),
                ],
                Some(in_records(&[(0, 10), (90, 10)], 100)),
            ),
            (
                &[
                    ("major", "0"),
                    ("minor", "1"),
                    ("size", "100"),
                    ("numblocks", "2"),
                    ("map", "0,10,90,10"),
                ],
                Some(in_records(&[(0, 10), (90, 10)], 100)),
            ),
            (&[("size", "100"), ("map", "")], Some(in_records(&[], 100))),
            (
                &[("major", "1"), ("minor", "0"), ("realsize", "4096")],
                Some(Some(PaxSparse::InData(4096))),
            ),
            (&[("major", "1"), ("minor", "0")], None),
            (&[("major", "2"), ("minor", "0"), ("realsize", "1")], None),
            (&[("major", "1"), ("realsize", "1")], None),
            (&[("map", "0,10")], None),
            (&[("size", "100"), ("map", "0,10,5")], None),
            (&[("size", "100"), ("map", "0,,5,1")], None),
            (
                &[("size", "100"), ("numblocks", "3"), ("map", "0,10")],
                None,
            ),
            (&[("size", "100"), ("map", "0,200")], None),
            (
                &[
                    ("size", "100"),
                    ("map", "0,10"),
                    ("offset", "20"),
                    ("numbytes", "1"),
                ],
                None,
            ),
            (&[("size", "100"), ("numbytes", "1")], None),
            (&[("size", "100"), ("offset", "1"), ("offset", "2")], None),
            (&[("size", "-1"), ("map", "")], None),
        ];
        for (pairs, want) in cases {
            let got = records(pairs);
            match &want {
                Some(want) => assert_eq!(got.as_ref().ok(), Some(want), "{pairs:?}: {got:?}"),
                None => assert!(got.is_err(), "{pairs:?}: {got:?}"),
            }
        }
    }

    fn blocks_source(data: &[u8]) -> impl FnMut(&mut Block) -> Result<(), TarErrorKind> + '_ {
        let mut chunks = data.chunks(BLOCK_SIZE);
        move |block: &mut Block| {
            let chunk = chunks.next().ok_or(TarErrorKind::Truncated("the map"))?;
            block.fill(0);
            block[..chunk.len()].copy_from_slice(chunk);
            Ok(())
        }
    }

    #[test]
    fn data_maps() {
        // 66 runs: the map crosses the block boundary inside "65000".
        let long_runs: Vec<Segment> = (0..66).map(|i| seg(i * 1000, 5)).collect();
        let mut long = b"66\n".to_vec();
        for run in &long_runs {
            long.extend_from_slice(format!("{}\n{}\n", run.offset, run.len).as_bytes());
        }
        assert!(long[511].is_ascii_digit() && long[512].is_ascii_digit());
        type Case = (Vec<u8>, Option<Vec<Segment>>);
        let cases: Vec<Case> = vec![
            (b"0\n".to_vec(), Some(vec![])),
            (
                b"2\n0\n512\n1024\n0\n".to_vec(),
                Some(vec![seg(0, 512), seg(1024, 0)]),
            ),
            (long, Some(long_runs)),
            (b"1\n0\n".to_vec(), None),
            (b"\n".to_vec(), None),
            (b"1\n 0\n5\n".to_vec(), None),
            (b"1\n0x1\n5\n".to_vec(), None),
            (b"1\n99999999999999999999\n5\n".to_vec(), None),
            (b"1\n000000000000000000001\n5\n".to_vec(), None),
            (b"1048577\n".to_vec(), None),
        ];
        for (data, want) in cases {
            let got = read_data_map(&mut blocks_source(&data));
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{data:?}: {got:?}");
        }
    }

    #[test]
    fn old_gnu_pairs_stop_at_an_empty_offset() {
        let mut block = [0u8; BLOCK_SIZE];
        let put = |block: &mut Block, at: usize, text: &[u8]| {
            block[at..at + text.len()].copy_from_slice(text);
        };
        put(&mut block, 0, b"00000000000\0");
        put(&mut block, 12, b"00000001000\0");
        put(&mut block, 24, b"00000010000\0");
        put(&mut block, 36, &[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        block[EXTENSION_PAIRS * PAIR_BYTES] = 1;
        let mut runs = Vec::new();
        let more = old_gnu_pairs(&block, 0, EXTENSION_PAIRS, &mut runs).unwrap();
        assert!(more);
        assert_eq!(runs, [seg(0, 0o1000), seg(0o10000, 1)]);

        put(&mut block, 48, b"00000000010\0");
        put(&mut block, 60, b"garbage!\0\0\0\0");
        let err = old_gnu_pairs(&block, 0, EXTENSION_PAIRS, &mut runs).unwrap_err();
        assert!(
            matches!(
                err,
                TarErrorKind::BadNumber {
                    field: "sparse size",
                    ..
                }
            ),
            "{err}"
        );
    }
}
