//! Darter's streaming tar reader: the archives OCI layers are made of
//! (POSIX ustar and pax, GNU, V7), read entry by entry from any `Read`,
//! without seeking and holding no more than one entry's headers.
//!
//! Why not the `tar` crate: it cuts PAX extended headers at newlines
//! instead of at each record's length prefix, so any value holding a
//! newline (a name, a link target, a binary xattr such as a
//! `security.capability`) is refused or replaced by the truncated ustar
//! name.
//!
//! What it reads: header layouts and numbers (`header.rs`), PAX records,
//! local and global (`pax.rs`), GNU long names and links, and sparse files
//! in the old GNU and the PAX 0.0, 0.1 and 1.0 formats (`sparse.rs`), whose
//! holes read as zeros. What it refuses, with a [`TarError`] naming the
//! entry and the byte offset in the stream: bad checksums and numbers,
//! unknown entry types, archives that end inside an entry, and headers
//! beyond the limits below.
//!
//! Entries of the header-only types (links, devices, directories, fifos)
//! have no data whatever their size field says, as Go's archive/tar (the
//! reader of containerd, Docker and BuildKit) and Python's tarfile read
//! them.

mod header;
mod pax;
mod sparse;

use std::fmt;
use std::io::{self, Read};

use darter_format::tree::Xattr;

use header::{BLOCK_SIZE, Block, Format, Header};
use pax::{Overrides, Scope};
use sparse::{Cursor, PaxSparse, Run, Segment, SparseMap, SparseRecords, sparse_error};

/// Most bytes of PAX extended headers (`x`) before one entry.
pub const MAX_EXTENDED_HEADER: u64 = 1 << 20;
/// Most bytes of global PAX values (`g`) in effect at once. Smaller than
/// [`MAX_EXTENDED_HEADER`]: every later entry gets a copy.
pub const MAX_GLOBAL_VALUES: usize = 64 << 10;
/// Longest path or link target (four times Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4 * 4096;
/// Most runs of data in one sparse file.
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 20;

/// A time as seconds and nanoseconds since the epoch (negative before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Whole seconds, rounded down.
    pub secs: i64,
    /// Nanoseconds after `secs`, below 1,000,000,000.
    pub nsec: u32,
}

/// What an entry is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (types `0`, NUL, `7`, and sparse files).
    #[default]
    File,
    /// A hard link to [`EntryHeader::link`], an earlier entry.
    HardLink,
    /// A symbolic link to [`EntryHeader::link`].
    Symlink,
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A directory.
    Directory,
    /// A named pipe.
    Fifo,
}

/// An entry's metadata, with its PAX records, GNU long names and global
/// values applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryHeader {
    /// The path as stored (not cleaned).
    pub path: Vec<u8>,
    /// The link target of hard and symbolic links (empty for others).
    pub link: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// The mode field (permission bits, and whatever else the writer put).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time (PAX records give nanoseconds).
    pub mtime: Timestamp,
    /// Bytes the entry reads as: the logical size of a sparse file, 0 for
    /// the header-only types.
    pub size: u64,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<Xattr>,
}

/// Why a tar stream cannot be read, and where.
#[derive(Debug)]
pub struct TarError {
    /// The byte in the tar stream where the problem was found: a header
    /// block, a PAX record, or the position of a failed data read.
    pub offset: u64,
    /// The entry's path, lossily decoded, as far as it is known (the name
    /// field of the offending block before its PAX records are read).
    pub entry: Option<String>,
    /// What is wrong.
    pub kind: TarErrorKind,
}

/// What is wrong with a tar stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TarErrorKind {
    /// The underlying reader (decompression, network) failed.
    #[error("reading the stream failed: {0}")]
    Io(io::Error),
    /// The stream ends where more is needed.
    #[error("the stream ends inside {0}")]
    Truncated(&'static str),
    /// The header checksum is wrong.
    #[error(
        "header checksum {stored} matches neither the unsigned ({unsigned}) nor the signed ({signed}) sum of the block"
    )]
    Checksum {
        /// What the field says.
        stored: i64,
        /// The sum of the bytes.
        unsigned: i64,
        /// The sum of the bytes as signed values.
        signed: i64,
    },
    /// A numeric header field is not a number.
    #[error("{field} field {value:?} is not an octal or base-256 number")]
    BadNumber {
        /// Which field.
        field: &'static str,
        /// Its bytes.
        value: String,
    },
    /// A number does not fit what it stands for.
    #[error("{field} {value} is out of range")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: i128,
    },
    /// A header is larger than the limits allow.
    #[error("{what} of {size} bytes is more than the limit of {limit}")]
    TooLarge {
        /// Which header.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A PAX record is not `LENGTH KEY=VALUE\n`.
    #[error("malformed PAX record: {0}")]
    PaxRecord(String),
    /// A PAX record's value is unusable.
    #[error("PAX record {key:?}: {detail}")]
    PaxValue {
        /// The keyword.
        key: String,
        /// What is wrong with the value.
        detail: String,
    },
    /// The entry type is none this reader knows.
    #[error("entry type {} is not supported", describe_type(*.0))]
    UnknownType(u8),
    /// A sparse file's map is unusable.
    #[error("sparse file: {0}")]
    Sparse(String),
    /// A header where it makes no sense.
    #[error("{0}")]
    Misplaced(&'static str),
    /// [`TarReader::next_entry`] was called after it failed.
    #[error("the archive was already unreadable here")]
    AfterError,
}

fn describe_type(flag: u8) -> String {
    if flag.is_ascii_graphic() {
        format!("'{}'", char::from(flag))
    } else {
        format!("0x{flag:02x}")
    }
}

impl TarError {
    fn new(offset: u64, entry: Option<&[u8]>, kind: TarErrorKind) -> Self {
        TarError {
            offset,
            entry: entry
                .filter(|e| !e.is_empty())
                .map(|e| String::from_utf8_lossy(e).into_owned()),
            kind,
        }
    }

    /// The `io::ErrorKind` this error has when it comes out of
    /// [`Entry::read`].
    fn io_kind(&self) -> io::ErrorKind {
        match &self.kind {
            TarErrorKind::Io(e) => e.kind(),
            TarErrorKind::Truncated(_) => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        }
    }
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "tar entry {entry:?} at byte {}: ", self.offset)?,
            None => write!(f, "tar stream at byte {}: ", self.offset)?,
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for TarError {}

/// Reads a tar stream entry by entry.
pub struct TarReader<R> {
    input: Input<R>,
    globals: Overrides,
    body: Body,
    /// The path of the entry `body` belongs to, for messages.
    body_path: Vec<u8>,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Reading,
    Ended,
    /// Failed at this offset: the position in the stream is unknown.
    Failed(u64),
}

impl<R> fmt::Debug for TarReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TarReader")
            .field("offset", &self.input.offset)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// One entry: its header, and its data through [`Read`] (the logical
/// content, `header.size` bytes). Data not read is skipped by the next
/// [`TarReader::next_entry`].
pub struct Entry<'a, R> {
    /// Metadata.
    pub header: EntryHeader,
    reader: &'a mut TarReader<R>,
}

impl<R> fmt::Debug for Entry<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Read for Entry<'_, R> {
    /// Errors wrap a [`TarError`] (naming the entry and offset).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read_body(buf)
    }
}

impl<R: Read> TarReader<R> {
    /// Reads the archive in `input`, which starts at its first header.
    pub fn new(input: R) -> Self {
        TarReader {
            input: Input {
                inner: input,
                offset: 0,
            },
            globals: Overrides::default(),
            body: Body::Plain(Plain::default()),
            body_path: Vec::new(),
            state: State::Reading,
        }
    }

    /// The next entry, or `None` after the end of the archive: two zero
    /// blocks, or the end of the stream at a block boundary or after one
    /// zero block. Skips what is left of the previous entry's data.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, R>>, TarError> {
        match self.state {
            State::Reading => {}
            State::Ended => return Ok(None),
            State::Failed(offset) => {
                return Err(TarError::new(offset, None, TarErrorKind::AfterError));
            }
        }
        match self.read_entry() {
            Ok(Some(header)) => Ok(Some(Entry {
                header,
                reader: self,
            })),
            Ok(None) => {
                self.state = State::Ended;
                Ok(None)
            }
            Err(e) => {
                self.state = State::Failed(e.offset);
                Err(e)
            }
        }
    }

    fn read_entry(&mut self) -> Result<Option<EntryHeader>, TarError> {
        self.finish_body()?;
        let mut pending = Pending::new(&self.globals);
        let mut block = [0u8; BLOCK_SIZE];
        loop {
            let at = self.input.offset;
            if !self.next_header_block(&mut block)? {
                if !pending.started {
                    return Ok(None);
                }
                return Err(TarError::new(
                    at,
                    pending.known_path(),
                    TarErrorKind::Misplaced(
                        "the archive ends after an extended header, before its entry",
                    ),
                ));
            }
            let fail = |kind| TarError::new(at, Some(header::raw_name(&block)), kind);
            let header = Header::parse(&block).map_err(fail)?;
            match header.typeflag() {
                b'x' => {
                    let limit = MAX_EXTENDED_HEADER - pending.extended_bytes;
                    let body = self.read_header_data(&header, at, limit, "PAX extended header")?;
                    pending.extended_bytes += body.len() as u64;
                    pending.started = true;
                    apply_records(&body, at, &header, |key, value| pending.apply(key, value))?;
                }
                b'g' => {
                    if pending.started {
                        return Err(fail(TarErrorKind::Misplaced(
                            "a global PAX header between an entry's extended header and the entry",
                        )));
                    }
                    self.read_global_header(&header, at)?;
                    pending = Pending::new(&self.globals);
                }
                b'L' | b'K' => {
                    let name =
                        self.read_header_data(&header, at, MAX_PATH as u64 + 1, "GNU long name")?;
                    let name = name.split(|&b| b == 0).next().unwrap_or_default().to_vec();
                    pax::check_path(&name)
                        .map_err(|d| fail(pax::value_error(b"GNU long name", d)))?;
                    let slot = match header.typeflag() {
                        b'L' => &mut pending.long_name,
                        _ => &mut pending.long_link,
                    };
                    *slot = Some(name);
                    pending.started = true;
                }
                _ => return self.start_entry(&header, at, pending).map(Some),
            }
        }
    }

    /// Reads the next header block into `block`; false at the end of the
    /// archive.
    fn next_header_block(&mut self, block: &mut Block) -> Result<bool, TarError> {
        let at = self.input.offset;
        block.fill(0);
        let n = self.input.fill(block).map_err(|e| io_error(at, e))?;
        if n == 0 {
            return Ok(false);
        }
        if n < BLOCK_SIZE {
            let name = Some(header::raw_name(block));
            return Err(TarError::new(
                at,
                name,
                TarErrorKind::Truncated("a header block"),
            ));
        }
        if !header::is_zero(block) {
            return Ok(true);
        }
        let second = self.input.offset;
        let n = self.input.fill(block).map_err(|e| io_error(second, e))?;
        if header::is_zero(&block[..n]) {
            Ok(false)
        } else {
            Err(TarError::new(
                second,
                Some(header::raw_name(block)),
                TarErrorKind::Misplaced(
                    "a header after a zero block: the end of the archive is ambiguous",
                ),
            ))
        }
    }

    /// The data of a PAX or GNU long-name header (at most `limit` bytes),
    /// and its padding.
    fn read_header_data(
        &mut self,
        header: &Header<'_>,
        at: u64,
        limit: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, TarError> {
        let fail = |kind| TarError::new(at, Some(header::raw_name(header.block())), kind);
        let size = header.size().map_err(fail)?;
        if size > limit {
            return Err(fail(TarErrorKind::TooLarge { what, size, limit }));
        }
        let mut data = vec![0; size as usize];
        let padding = header::padding(size);
        let io = |e| fail(TarErrorKind::Io(e));
        if self.input.fill(&mut data).map_err(io)? < data.len()
            || self.input.skip(padding).map_err(io)? < padding
        {
            return Err(fail(TarErrorKind::Truncated(what)));
        }
        Ok(data)
    }

    fn read_global_header(&mut self, header: &Header<'_>, at: u64) -> Result<(), TarError> {
        let body = self.read_header_data(header, at, MAX_EXTENDED_HEADER, "PAX global header")?;
        let globals = &mut self.globals;
        apply_records(&body, at, header, |key, value| {
            // A sparse map describes one file, never all that follow.
            if key.starts_with(GNU_SPARSE) {
                return Ok(());
            }
            globals.apply(key, value, Scope::Global)
        })?;
        let held = self.globals.held_bytes();
        if held > MAX_GLOBAL_VALUES {
            let kind = TarErrorKind::TooLarge {
                what: "global PAX values",
                size: held as u64,
                limit: MAX_GLOBAL_VALUES as u64,
            };
            return Err(TarError::new(
                at,
                Some(header::raw_name(header.block())),
                kind,
            ));
        }
        Ok(())
    }

    fn start_entry(
        &mut self,
        header: &Header<'_>,
        at: u64,
        pending: Pending,
    ) -> Result<EntryHeader, TarError> {
        let mut entry = EntryHeader {
            path: pending.path(header),
            ..EntryHeader::default()
        };
        let layout = pending
            .describe(header, &mut entry)
            .map_err(|kind| TarError::new(at, Some(&entry.path), kind))?;
        self.body_path.clone_from(&entry.path);
        self.body = self
            .open_body(layout)
            .map_err(|kind| TarError::new(self.input.offset, Some(&entry.path), kind))?;
        Ok(entry)
    }

    /// Reads what sparse files keep before their data: old GNU extension
    /// blocks, the 1.0 map.
    fn open_body(&mut self, layout: Layout) -> Result<Body, TarErrorKind> {
        match layout {
            Layout::Plain(size) => Ok(Body::Plain(Plain::new(size))),
            Layout::Sparse { physical, map } => sparse_body(Plain::new(physical), map),
            Layout::OldGnuSparse {
                physical,
                size,
                mut segments,
                mut extended,
            } => {
                let mut block = [0; BLOCK_SIZE];
                while extended {
                    if self.input.fill(&mut block).map_err(TarErrorKind::Io)? < BLOCK_SIZE {
                        return Err(TarErrorKind::Truncated("a sparse extension block"));
                    }
                    extended =
                        sparse::old_gnu_pairs(&block, 0, sparse::EXTENSION_PAIRS, &mut segments)?;
                }
                sparse_body(Plain::new(physical), SparseMap::new(segments, size)?)
            }
            Layout::SparseInData { physical, size } => {
                let mut plain = Plain::new(physical);
                let input = &mut self.input;
                let segments = sparse::read_data_map(&mut |block| plain.read_block(input, block))?;
                sparse_body(plain, SparseMap::new(segments, size)?)
            }
        }
    }

    /// Skips what is left of the current entry's data and its padding.
    fn finish_body(&mut self) -> Result<(), TarError> {
        let (Body::Plain(plain) | Body::Sparse(plain, _)) = &mut self.body;
        plain
            .skip_rest(&mut self.input)
            .map_err(|kind| TarError::new(self.input.offset, Some(&self.body_path), kind))?;
        self.body = Body::Plain(Plain::default());
        Ok(())
    }

    fn read_body(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let input = &mut self.input;
        let read = match &mut self.body {
            Body::Plain(plain) => plain.read(input, buf),
            Body::Sparse(plain, cursor) => read_sparse(plain, cursor, input, buf),
        };
        read.map_err(|kind| {
            let error = TarError::new(self.input.offset, Some(&self.body_path), kind);
            io::Error::new(error.io_kind(), error)
        })
    }
}

const GNU_SPARSE: &[u8] = b"GNU.sparse.";

/// Parses a PAX header's body and hands each record to `apply`; errors
/// point at the record.
fn apply_records(
    body: &[u8],
    at: u64,
    header: &Header<'_>,
    mut apply: impl FnMut(&[u8], &[u8]) -> Result<(), TarErrorKind>,
) -> Result<(), TarError> {
    let body_at = at + BLOCK_SIZE as u64;
    let fail = |offset: usize, kind| {
        TarError::new(
            body_at + offset as u64,
            Some(header::raw_name(header.block())),
            kind,
        )
    };
    let records = pax::parse_records(body).map_err(|(offset, kind)| fail(offset, kind))?;
    for record in records {
        apply(record.key, record.value).map_err(|kind| fail(record.at, kind))?;
    }
    Ok(())
}

fn io_error(at: u64, e: io::Error) -> TarError {
    TarError::new(at, None, TarErrorKind::Io(e))
}

/// What an entry's headers said before its own header: PAX records,
/// GNU long names, and how many bytes of them were read.
#[derive(Debug)]
struct Pending {
    overrides: Overrides,
    sparse: SparseRecords,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    extended_bytes: u64,
    /// Whether any header of the entry was read yet.
    started: bool,
}

impl Pending {
    fn new(globals: &Overrides) -> Self {
        Pending {
            overrides: globals.clone(),
            sparse: SparseRecords::default(),
            long_name: None,
            long_link: None,
            extended_bytes: 0,
            started: false,
        }
    }

    fn apply(&mut self, key: &[u8], value: &[u8]) -> Result<(), TarErrorKind> {
        match key.strip_prefix(GNU_SPARSE) {
            Some(sparse_key) => self.sparse.apply(sparse_key, value),
            None => self.overrides.apply(key, value, Scope::Entry),
        }
    }

    /// The path as far as the headers so far tell it.
    fn known_path(&self) -> Option<&[u8]> {
        self.sparse
            .name()
            .or(self.overrides.path.as_deref())
            .or(self.long_name.as_deref())
    }

    fn path(&self, header: &Header<'_>) -> Vec<u8> {
        self.known_path()
            .map_or_else(|| header.path(), <[u8]>::to_vec)
    }

    /// Fills in `entry` (all but its path) and says how its data is
    /// stored.
    fn describe(
        self,
        header: &Header<'_>,
        entry: &mut EntryHeader,
    ) -> Result<Layout, TarErrorKind> {
        let typeflag = header.typeflag();
        entry.kind = match typeflag {
            b'0' | b'7' | b'S' => EntryKind::File,
            // Before POSIX, a trailing slash was what made a directory.
            b'\0' if entry.path.ends_with(b"/") => EntryKind::Directory,
            b'\0' => EntryKind::File,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => {
                let (major, minor) = header.device()?;
                EntryKind::CharDevice { major, minor }
            }
            b'4' => {
                let (major, minor) = header.device()?;
                EntryKind::BlockDevice { major, minor }
            }
            b'5' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            other => return Err(TarErrorKind::UnknownType(other)),
        };
        let o = self.overrides;
        entry.link = o
            .linkpath
            .or(self.long_link)
            .unwrap_or_else(|| header.link_name().to_vec());
        entry.mode = header.mode()?;
        entry.uid = o.uid.map_or_else(|| header.uid(), Ok)?;
        entry.gid = o.gid.map_or_else(|| header.gid(), Ok)?;
        entry.mtime = match o.mtime {
            Some(t) => t,
            None => Timestamp {
                secs: header.mtime()?,
                nsec: 0,
            },
        };
        entry.xattrs = o.xattrs.into_iter().collect();
        let physical = o.size.map_or_else(|| header.size(), Ok)?;
        let pax_sparse = self.sparse.format()?;
        if entry.kind != EntryKind::File {
            if pax_sparse.is_some() {
                return Err(sparse_error("a sparse map on an entry that is not a file"));
            }
            return Ok(Layout::Plain(0));
        }
        if typeflag == b'S' {
            return old_gnu_sparse(header, physical, entry);
        }
        Ok(match pax_sparse {
            None => {
                entry.size = physical;
                Layout::Plain(physical)
            }
            Some(PaxSparse::InRecords(map)) => {
                entry.size = map.size();
                Layout::Sparse { physical, map }
            }
            Some(PaxSparse::InData(size)) => {
                entry.size = size;
                Layout::SparseInData { physical, size }
            }
        })
    }
}

/// An old GNU sparse file (type `S`): the first runs are in the header.
fn old_gnu_sparse(
    header: &Header<'_>,
    physical: u64,
    entry: &mut EntryHeader,
) -> Result<Layout, TarErrorKind> {
    if header.format() != Format::Gnu {
        return Err(TarErrorKind::Misplaced(
            "an old GNU sparse entry (type 'S') in a header that is not GNU",
        ));
    }
    let mut segments = Vec::new();
    let extended = sparse::old_gnu_pairs(
        header.block(),
        header::GNU_SPARSE_PAIRS,
        header::GNU_SPARSE_PAIRS_IN_HEADER,
        &mut segments,
    )?;
    entry.size = header.gnu_real_size()?;
    Ok(Layout::OldGnuSparse {
        physical,
        size: entry.size,
        segments,
        extended,
    })
}

/// How an entry's data is laid out in the stream.
#[derive(Debug)]
enum Layout {
    Plain(u64),
    /// PAX 0.0 and 0.1.
    Sparse {
        physical: u64,
        map: SparseMap,
    },
    /// Old GNU: some runs, and whether more follow in extension blocks.
    OldGnuSparse {
        physical: u64,
        size: u64,
        segments: Vec<Segment>,
        extended: bool,
    },
    /// PAX 1.0: the map is at the start of the data.
    SparseInData {
        physical: u64,
        size: u64,
    },
}

/// The data of the current entry still in the stream.
#[derive(Debug)]
enum Body {
    Plain(Plain),
    Sparse(Plain, Cursor),
}

fn sparse_body(plain: Plain, map: SparseMap) -> Result<Body, TarErrorKind> {
    if map.data_bytes() != plain.remaining {
        return Err(sparse_error(format!(
            "the map holds {} bytes of data, the entry {}",
            map.data_bytes(),
            plain.remaining
        )));
    }
    Ok(Body::Sparse(plain, Cursor::new(map)))
}

fn read_sparse<R: Read>(
    plain: &mut Plain,
    cursor: &mut Cursor,
    input: &mut Input<R>,
    buf: &mut [u8],
) -> Result<usize, TarErrorKind> {
    let n = match cursor.run() {
        Run::End => return Ok(0),
        Run::Hole(len) => {
            let n = clamp(buf.len(), len);
            buf[..n].fill(0);
            n
        }
        Run::Data(len) => {
            let n = clamp(buf.len(), len);
            plain.read(input, &mut buf[..n])?
        }
    };
    cursor.advance(n as u64);
    Ok(n)
}

/// `len` bytes at most, but no more than `limit`.
fn clamp(len: usize, limit: u64) -> usize {
    usize::try_from(limit).map_or(len, |limit| len.min(limit))
}

/// Stored data of an entry: what is left of it, then its padding.
#[derive(Debug, Default)]
struct Plain {
    remaining: u64,
    padding: u64,
}

impl Plain {
    fn new(size: u64) -> Self {
        Plain {
            remaining: size,
            padding: header::padding(size),
        }
    }

    fn read<R: Read>(
        &mut self,
        input: &mut Input<R>,
        buf: &mut [u8],
    ) -> Result<usize, TarErrorKind> {
        let want = clamp(buf.len(), self.remaining);
        if want == 0 {
            return Ok(0);
        }
        let n = input.read(&mut buf[..want]).map_err(TarErrorKind::Io)?;
        if n == 0 {
            return Err(TarErrorKind::Truncated("the entry's data"));
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            self.skip_rest(input)?;
        }
        Ok(n)
    }

    /// A whole block of the data (the sparse 1.0 map).
    fn read_block<R: Read>(
        &mut self,
        input: &mut Input<R>,
        block: &mut Block,
    ) -> Result<(), TarErrorKind> {
        if self.remaining < BLOCK_SIZE as u64 {
            return Err(sparse_error("the map runs past the entry's data"));
        }
        if input.fill(block).map_err(TarErrorKind::Io)? < BLOCK_SIZE {
            return Err(TarErrorKind::Truncated("the entry's sparse map"));
        }
        self.remaining -= BLOCK_SIZE as u64;
        Ok(())
    }

    fn skip_rest<R: Read>(&mut self, input: &mut Input<R>) -> Result<(), TarErrorKind> {
        let data = std::mem::take(&mut self.remaining);
        let padding = std::mem::take(&mut self.padding);
        if input.skip(data).map_err(TarErrorKind::Io)? < data {
            return Err(TarErrorKind::Truncated("the entry's data"));
        }
        if input.skip(padding).map_err(TarErrorKind::Io)? < padding {
            return Err(TarErrorKind::Truncated(
                "the padding after the entry's data",
            ));
        }
        Ok(())
    }
}

/// The tar stream, counting what was read from it.
struct Input<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until `buf` is full or the stream ends; returns the count.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }

    /// Skips up to `n` bytes; returns how many there were.
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut scratch = [0u8; 8192];
        let mut skipped = 0;
        while skipped < n {
            let want = clamp(scratch.len(), n - skipped);
            match self.read(&mut scratch[..want])? {
                0 => break,
                got => skipped += got as u64,
            }
        }
        Ok(skipped)
    }
}

#[cfg(test)]
mod tests;
