//! Drives `darter-format`'s readers, `darter-image`'s verified reads and
//! `darter-builder`'s tar reader with one fuzz input each and asserts what
//! they promise. Errors are
//! expected answers to hostile bytes; a panic (including a failed
//! assertion here) is a finding.

use std::io::Read;

use darter_builder::tar::{EntryHeader, EntryKind, MAX_PATH, TarError, TarReader};
use darter_format::blob::{BLOB_TRAILER_SIZE, BlobGeometry, BlobTrailer, ChunkTable};
use darter_format::bootstrap::{BlobEntry, Bootstrap};
use darter_format::compress::{Compression, decompress};
use darter_format::erofs::ondisk::{DataLayout, mode};
use darter_format::erofs::{Erofs, Inode};
use darter_format::oci::{MEDIA_TYPE_BLOB, MEDIA_TYPE_BOOTSTRAP};
use darter_image::{BlobSource, SourceError};
use darter_oci::{ImageManifest, OciDigest};

use crate::input::{ChunkTableInput, FrameInput, ImageInput};

type Image<'a> = Erofs<&'a [u8]>;

/// Opens `data` as a bootstrap and, if it opens, reads every inode the walk
/// reaches: xattrs, symlink targets, directory blocks (checking that
/// [`Erofs::lookup`] finds every listed name), chunk indexes and flat data.
pub fn bootstrap(data: &[u8]) {
    let Ok(bootstrap) = Bootstrap::open(data) else {
        return;
    };
    let image = bootstrap.erofs();
    if let Ok(root) = image.inode(image.root_nid()) {
        read_inode(image, &root);
    }
    let _ = image.walk(&mut |_parent, _entry, inode| {
        read_inode(image, inode);
        Ok(())
    });
}

fn read_inode(image: &Image<'_>, inode: &Inode) {
    let _ = image.xattrs(inode);
    match inode.file_type() {
        mode::S_IFDIR => read_dir(image, inode),
        mode::S_IFLNK => {
            let _ = image.symlink_target(inode);
        }
        _ if inode.layout == DataLayout::ChunkBased => read_chunk_indexes(image, inode),
        _ => {
            // Never more than the image holds: flat data lives inside it.
            let len = inode.size.min(image.size()) as usize;
            let _ = image.read_flat(inode, 0, len);
        }
    }
}

fn read_dir(image: &Image<'_>, dir: &Inode) {
    let Ok(entries) = image.dir_entries(dir) else {
        return;
    };
    // Lookup binary-searches across blocks, so it may only be held to
    // finding names in directories that are sorted as a whole.
    if !entries.windows(2).all(|w| w[0].name < w[1].name) {
        return;
    }
    for entry in &entries {
        match image.lookup(dir, &entry.name) {
            Ok(Some(found)) if found == *entry => {}
            other => panic!(
                "lookup of {:?} in directory {} gave {other:?}, but listing it gave {entry:?}",
                String::from_utf8_lossy(&entry.name),
                dir.nid
            ),
        }
    }
}

/// Reads chunk indexes until the first error: every index that reads is 8
/// bytes of the image, so the loop is bounded by the image size even when
/// the inode claims 2^50 chunks.
fn read_chunk_indexes(image: &Image<'_>, inode: &Inode) {
    let devices = image.devices().len();
    for chunk in 0..inode.chunk_count(image.superblock().blkszbits) {
        let Ok(index) = image.chunk_index(inode, chunk) else {
            return;
        };
        assert!(
            index.is_hole() || usize::from(index.device_id) <= devices,
            "chunk index {index:?} accepted with only {devices} devices"
        );
    }
}

/// Decodes a blob tail (trailer, then table, both directly and through a
/// bootstrap blob entry) or a raw table against a fuzzed geometry, and
/// checks every table that decodes.
pub fn chunk_table(data: &[u8]) {
    match ChunkTableInput::parse(data) {
        Some(ChunkTableInput::Tail { tail, blob_size }) => blob_tail(&tail, blob_size),
        Some(ChunkTableInput::Raw {
            algo,
            geometry,
            records,
        }) => {
            if let Ok(table) = ChunkTable::decode(&records, algo, &geometry) {
                check_table(&table, &geometry);
            }
        }
        None => {}
    }
}

fn blob_tail(tail: &[u8], blob_size: u64) {
    let (stored, trailer_bytes) = tail.split_at(tail.len().saturating_sub(BLOB_TRAILER_SIZE));
    let Ok(trailer) = BlobTrailer::decode(trailer_bytes, blob_size) else {
        return;
    };
    assert_eq!(
        trailer.encode()[..],
        trailer_bytes[..],
        "an accepted trailer must re-encode to the bytes it came from"
    );
    let direct = trailer.decode_table(stored);
    let entry = BlobEntry {
        blob_digest: [0; 32],
        blob_size,
        trailer,
    };
    match (direct, entry.decode_tail(tail)) {
        (Ok(table), Ok(via_entry)) => {
            assert_eq!(table, via_entry, "decode_table and decode_tail disagree");
            check_table(&table, &trailer.geometry());
        }
        (Err(_), Err(_)) => {}
        (direct, via_entry) => {
            panic!("decode_table gave {direct:?} but decode_tail gave {via_entry:?}")
        }
    }
}

/// What a validated table promises its users (the cache and FUSE layers).
fn check_table(table: &ChunkTable, geometry: &BlobGeometry) {
    for (i, record) in table.records().iter().enumerate() {
        assert_eq!(table.find(record.blkaddr), Some(i), "find({record:?})");
        let frame = table.frame_at(record.compressed_offset);
        assert!(
            frame.as_ref().is_some_and(|f| f.contains(&i)),
            "frame_at({}) gave {frame:?}, missing record {i}",
            record.compressed_offset
        );
        assert!(record.range_in_frame().end <= record.frame_size as usize);
        assert!(record.compressed_range().end <= geometry.data_end);
        assert!(
            record.uncompressed_offset() + u64::from(record.size) <= geometry.uncompressed_size
        );
    }
    let again = ChunkTable::decode(&table.encode(), table.algo(), geometry);
    assert_eq!(
        again.ok().as_ref(),
        Some(table),
        "a valid table must survive encode and decode"
    );
}

/// Decompresses the stored bytes with every codec to the fuzzed size;
/// whatever succeeds must have exactly that size.
pub fn frame(data: &[u8]) {
    let Some(input) = FrameInput::parse(data) else {
        return;
    };
    for codec in [Compression::None, Compression::Zstd, Compression::Lz4] {
        if let Ok(out) = decompress(codec, input.stored, input.expected_len) {
            assert_eq!(out.len(), input.expected_len, "{codec} output size");
            if codec == Compression::None {
                assert_eq!(out, input.stored, "a raw frame is its stored bytes");
            }
        }
    }
}

/// Reads at most this much of one entry's data: a sparse map can make a
/// few input bytes stand for terabytes of holes.
const MAX_TAR_DATA: u64 = 1 << 20;

/// Reads `data` as a tar stream with Darter's reader (see [`check_tar`]),
/// and again with the checksum of every ustar or GNU header block made
/// right: a mutation rarely keeps it right, and would never get past it to
/// the fields.
pub fn tar(data: &[u8]) {
    check_tar(data);
    let fixed = with_header_checksums(data);
    if fixed != data {
        check_tar(&fixed);
    }
}

/// Reads a tar stream twice, from the whole slice and one byte per `read`
/// call. Both must see the same entries, data and error (the reader
/// streams, so how the input is cut must not matter), every entry's data
/// must be exactly its size, and every error must point inside the input.
fn check_tar(data: &[u8]) {
    let whole = read_tar(data);
    let trickled = read_tar(OneByte(data));
    assert_eq!(
        whole, trickled,
        "reading one byte at a time changed the result"
    );
    if let Err(error) = &whole.end {
        assert!(
            error.0 <= data.len() as u64,
            "error offset beyond the input of {} bytes: {}",
            data.len(),
            error.1
        );
    }
}

/// `data` with the checksum of each block that has the ustar magic
/// recomputed (the sum of its bytes, the checksum field read as spaces).
fn with_header_checksums(data: &[u8]) -> Vec<u8> {
    const MAGIC: std::ops::Range<usize> = 257..262;
    const CHECKSUM: std::ops::Range<usize> = 148..156;
    let mut fixed = data.to_vec();
    for block in fixed.chunks_exact_mut(512) {
        if &block[MAGIC] == b"ustar" {
            block[CHECKSUM].fill(b' ');
            let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
            block[CHECKSUM].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
    fixed
}

/// What reading a tar stream gave: entries with (a prefix of) their data,
/// then the end or an error (offset and message).
#[derive(Debug, PartialEq, Eq)]
struct TarRead {
    entries: Vec<(EntryHeader, Vec<u8>)>,
    end: Result<(), (u64, String)>,
}

fn read_tar(input: impl Read) -> TarRead {
    let mut reader = TarReader::new(input);
    let mut entries = Vec::new();
    let end = loop {
        let mut entry = match reader.next_entry() {
            Ok(Some(entry)) => entry,
            Ok(None) => break Ok(()),
            Err(e) => break Err((e.offset, e.to_string())),
        };
        let header = entry.header.clone();
        check_tar_header(&header);
        let want = header.size.min(MAX_TAR_DATA);
        let mut content = Vec::new();
        if let Err(e) = (&mut entry).take(want).read_to_end(&mut content) {
            let error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<TarError>());
            let error = error.unwrap_or_else(|| panic!("a data error that is not a TarError: {e}"));
            break Err((error.offset, error.to_string()));
        }
        assert_eq!(
            content.len() as u64,
            want,
            "{header:?}: data shorter than its size"
        );
        if want == header.size {
            let mut more = [0u8; 1];
            assert!(
                matches!(entry.read(&mut more), Ok(0)),
                "{header:?}: data beyond its size"
            );
        }
        entries.push((header, content));
    };
    TarRead { entries, end }
}

fn check_tar_header(header: &EntryHeader) {
    assert!(header.path.len() <= MAX_PATH && header.link.len() <= MAX_PATH);
    assert!(
        header.xattrs.windows(2).all(|w| w[0].0 < w[1].0),
        "xattrs sorted and unique"
    );
    assert!(header.mtime.nsec < 1_000_000_000);
    if header.kind != EntryKind::File {
        assert_eq!(header.size, 0, "{header:?}: only files have data");
    }
}

/// A reader that hands out one byte per call.
struct OneByte<'a>(&'a [u8]);

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match (self.0.split_first(), buf.first_mut()) {
            (Some((&byte, rest)), Some(slot)) => {
                *slot = byte;
                self.0 = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

/// Reads of file chunks one `image` input may make: the walk is bounded
/// by the bootstrap, but every read decompresses a frame of up to 16 MiB.
const MAX_IMAGE_CHUNK_READS: usize = 256;

/// Opens a whole image, bootstrap and blobs from the input (the manifest
/// is made to list them, as `darter build` would), then checks it with
/// [`darter_image::check`] and reads every file's chunks. A chunk that
/// reads must be exactly the file's bytes in that chunk, and read the same
/// again (from the frame cache); an image the check calls sound must read
/// without an error.
pub fn image(data: &[u8]) {
    let Some(input) = ImageInput::parse(data) else {
        return;
    };
    let Some((manifest_digest, manifest, blobs)) = image_parts(&input) else {
        return;
    };
    let Ok(image) = darter_image::Image::open(manifest_digest, manifest, blobs) else {
        return;
    };
    let sound = darter_image::check(&image).is_sound();
    let mut budget = MAX_IMAGE_CHUNK_READS;
    let erofs = image.bootstrap().erofs();
    let _ = erofs.walk(&mut |parent, entry, inode| {
        if inode.file_type() != mode::S_IFREG || inode.layout != DataLayout::ChunkBased {
            return Ok(());
        }
        let chunks = inode.chunk_count(erofs.superblock().blkszbits);
        for n in 0..chunks.min(budget as u64) {
            budget -= 1;
            let first = image.read_file_chunk(inode, n);
            let where_ = || format!("chunk {n} of {:?}/{:?}", parent, entry.name);
            match &first {
                Ok(Some(bytes)) => {
                    let chunk_size = image.bootstrap().chunk_size();
                    let left = inode.size.saturating_sub(n * chunk_size);
                    assert_eq!(bytes.len() as u64, left.min(chunk_size), "{}", where_());
                }
                Ok(None) => {}
                Err(e) => assert!(
                    !sound,
                    "check called the image sound, but {}: {e}",
                    where_()
                ),
            }
            let again = image.read_file_chunk(inode, n);
            assert_eq!(
                first.as_ref().ok(),
                again.as_ref().ok(),
                "{} read differently the second time",
                where_()
            );
        }
        Ok(())
    });
}

/// What `Image::open` takes for `input`: the bootstrap stored as a layer
/// (zstd), a manifest listing it and the blobs its blob table names, and
/// those blobs. `None` if the bootstrap does not open.
fn image_parts(input: &ImageInput<'_>) -> Option<(OciDigest, ImageManifest, MemoryBlobs)> {
    let listed = Bootstrap::open(input.bootstrap).ok()?.info().blobs.clone();
    let stored = zstd::bulk::compress(input.bootstrap, 1).ok()?;
    let bootstrap_digest = OciDigest::of(&stored);
    let mut layers = vec![serde_json::json!({
        "mediaType": MEDIA_TYPE_BOOTSTRAP,
        "digest": bootstrap_digest.to_string(),
        "size": stored.len(),
    })];
    let mut blobs = MemoryBlobs::default();
    blobs.0.insert(bootstrap_digest, stored);
    let mut rest = input.blobs;
    for entry in &listed {
        let digest: OciDigest = entry.oci_digest().parse().ok()?;
        let take = usize::try_from(entry.blob_size)
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let (bytes, after) = rest.split_at(take);
        rest = after;
        blobs
            .0
            .entry(digest.clone())
            .or_insert_with(|| bytes.to_vec());
        layers.push(serde_json::json!({
            "mediaType": MEDIA_TYPE_BLOB,
            "digest": digest.to_string(),
            "size": entry.blob_size,
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": OciDigest::of(b"{}").to_string(),
            "size": 2,
        },
        "layers": layers,
    });
    let text = serde_json::to_vec(&manifest).ok()?;
    let parsed = serde_json::from_slice(&text).ok()?;
    Some((OciDigest::of(&text), parsed, blobs))
}

/// Blobs held in memory, by digest: a read past a blob's end fails, as a
/// registry's would.
#[derive(Default)]
struct MemoryBlobs(std::collections::HashMap<OciDigest, Vec<u8>>);

impl BlobSource for MemoryBlobs {
    fn read_range(
        &self,
        digest: &OciDigest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        let fail = |detail: &str| SourceError::new(self, digest, offset, len, detail);
        let blob = self.0.get(digest).ok_or_else(|| fail("no such blob"))?;
        let start = usize::try_from(offset).map_err(|_| fail("offset too large"))?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| fail("length too large"))?)
            .ok_or_else(|| fail("range overflows"))?;
        blob.get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| fail("range past the end of the blob"))
    }

    fn name(&self) -> String {
        "fuzz input".to_owned()
    }
}
