//! Drives `darter-format`'s readers with one fuzz input each and asserts
//! what they promise. Errors are expected answers to hostile bytes; a panic
//! (including a failed assertion here) is a finding.

use darter_format::blob::{BLOB_TRAILER_SIZE, BlobGeometry, BlobTrailer, ChunkTable};
use darter_format::bootstrap::{BlobEntry, Bootstrap};
use darter_format::compress::{Compression, decompress};
use darter_format::erofs::ondisk::{DataLayout, mode};
use darter_format::erofs::{Erofs, Inode};

use crate::input::{ChunkTableInput, FrameInput};

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
