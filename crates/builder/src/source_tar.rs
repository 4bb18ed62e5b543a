//! Applies a tar layer to the tree with OCI semantics, streaming file
//! contents into the chunker (nothing of a layer is held in memory).

use std::io::Read;

use darter_format::tree::{Meta, NodeKind};

use crate::chunker::Chunker;
use crate::merge::{MergeTree, split_path};
use crate::tar::{Entry, EntryHeader, EntryKind, TarError, TarReader};
use crate::{BuildError, Progress};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Applies one tar stream as layer `layer`; `layer_name` (its digest) is
/// used in error messages.
pub(crate) fn apply_tar(
    tree: &mut MergeTree,
    chunker: &mut Chunker,
    layer: u32,
    layer_name: &str,
    reader: &mut dyn Read,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    tree.begin_layer(layer);
    let mut archive = TarReader::new(reader);
    while let Some(mut entry) = archive
        .next_entry()
        .map_err(|e| BuildError::layer(layer_name, e.to_string()))?
    {
        apply_entry(tree, chunker, &mut entry, progress)
            .map_err(|e| in_entry(e, layer_name, &entry.header.path))?;
    }
    tree.end_layer();
    Ok(())
}

/// Adds the layer and entry to an error; an unreadable layer is named
/// by the tar reader's own message (entry and offset).
fn in_entry(error: BuildError, layer_name: &str, path: &[u8]) -> BuildError {
    match error {
        BuildError::Io { source, .. } if source.get_ref().is_some_and(|e| e.is::<TarError>()) => {
            BuildError::layer(layer_name, source.to_string())
        }
        other => other.with_layer_entry(layer_name, path),
    }
}

fn apply_entry(
    tree: &mut MergeTree,
    chunker: &mut Chunker,
    entry: &mut Entry<'_, &mut dyn Read>,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    let merge = |e| BuildError::merge(e, "");
    let header = &entry.header;
    let comps = split_path(&header.path).map_err(merge)?;
    let Some((&name, parents)) = comps.split_last() else {
        // The root itself ("./"): only its metadata can change.
        if header.kind == EntryKind::Directory {
            tree.set_root_meta(meta_of(header)?);
        }
        return Ok(());
    };
    let parent = parents.join(&b'/');
    if name == OPAQUE_MARKER {
        return tree.opaque(&parent).map_err(merge);
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        return tree.whiteout(&parent, hidden).map_err(merge);
    }
    let meta = meta_of(header)?;
    let node = match header.kind {
        EntryKind::File => {
            let size = header.size;
            let data = chunker
                .chunk_stream(entry, size)
                .map_err(|e| BuildError::io("read", &entry.header.path, e))?;
            progress.add_bytes(size);
            NodeKind::File(data)
        }
        EntryKind::Directory => NodeKind::Dir(Vec::new()),
        EntryKind::Symlink => NodeKind::Symlink(link_target(header)?.to_vec()),
        EntryKind::HardLink => {
            return tree.link(&header.path, link_target(header)?).map_err(merge);
        }
        EntryKind::CharDevice { major, minor } => NodeKind::CharDev(major, minor),
        EntryKind::BlockDevice { major, minor } => NodeKind::BlockDev(major, minor),
        EntryKind::Fifo => NodeKind::Fifo,
    };
    tree.put(&entry.header.path, meta, node).map_err(merge)?;
    progress.add_file();
    Ok(())
}

fn link_target(header: &EntryHeader) -> Result<&[u8], BuildError> {
    if header.link.is_empty() {
        return Err(unsupported("link without a target".into()));
    }
    Ok(&header.link)
}

fn unsupported(detail: String) -> BuildError {
    BuildError::Unsupported {
        path: String::new(),
        detail,
    }
}

/// Metadata from the header (nanosecond mtimes and xattrs included).
fn meta_of(header: &EntryHeader) -> Result<Meta, BuildError> {
    let id = |what: &str, value: u64| match u32::try_from(value) {
        Ok(u32::MAX) => Err(unsupported(format!("{what} -1 ({value}) is not an owner"))),
        Ok(id) => Ok(id),
        Err(_) => Err(unsupported(format!(
            "{what} {value} does not fit in 32 bits"
        ))),
    };
    for (name, _) in &header.xattrs {
        if darter_format::erofs::ondisk::xattr_split(name).is_none() {
            return Err(unsupported(format!(
                "xattr {:?} is in a namespace Darter images cannot hold",
                String::from_utf8_lossy(name)
            )));
        }
    }
    // Times before the epoch are stored as the epoch.
    let (mtime, mtime_nsec) = match u64::try_from(header.mtime.secs) {
        Ok(secs) => (secs, header.mtime.nsec),
        Err(_) => (0, 0),
    };
    Ok(Meta {
        perm: (header.mode & 0o7777) as u16,
        uid: id("uid", header.uid)?,
        gid: id("gid", header.gid)?,
        mtime,
        mtime_nsec,
        xattrs: header.xattrs.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::Timestamp;

    fn header() -> EntryHeader {
        EntryHeader {
            path: b"f".to_vec(),
            mode: 0o104_755,
            uid: 1000,
            gid: 100_000,
            mtime: Timestamp {
                secs: 1_700_000_000,
                nsec: 42,
            },
            xattrs: vec![(b"user.a".to_vec(), b"\n".to_vec())],
            ..EntryHeader::default()
        }
    }

    #[test]
    fn metadata_from_the_header() {
        let meta = meta_of(&header()).unwrap();
        assert_eq!(meta.perm, 0o4755, "file type bits in the mode are dropped");
        assert_eq!((meta.uid, meta.gid), (1000, 100_000));
        assert_eq!((meta.mtime, meta.mtime_nsec), (1_700_000_000, 42));
        assert_eq!(meta.xattrs, header().xattrs);

        let before_the_epoch = EntryHeader {
            mtime: Timestamp {
                secs: -2,
                nsec: 750_000_000,
            },
            ..header()
        };
        let meta = meta_of(&before_the_epoch).unwrap();
        assert_eq!((meta.mtime, meta.mtime_nsec), (0, 0));
    }

    #[test]
    fn owners_and_xattrs_darter_cannot_hold_are_refused() {
        let cases = [
            (
                "uid -1",
                EntryHeader {
                    uid: u64::from(u32::MAX),
                    ..header()
                },
                "uid -1",
            ),
            (
                "gid -1",
                EntryHeader {
                    gid: u64::from(u32::MAX),
                    ..header()
                },
                "gid -1",
            ),
            (
                "uid beyond 32 bits",
                EntryHeader {
                    uid: 1 << 32,
                    ..header()
                },
                "32 bits",
            ),
            (
                "xattr namespace",
                EntryHeader {
                    xattrs: vec![(b"os2.name".to_vec(), b"v".to_vec())],
                    ..header()
                },
                "namespace",
            ),
        ];
        for (what, header, says) in cases {
            let err = meta_of(&header).unwrap_err().to_string();
            assert!(err.contains(says), "{what}: {err}");
        }
    }
}
