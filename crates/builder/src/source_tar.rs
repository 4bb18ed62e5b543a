//! Applies a tar layer to the tree with OCI semantics, streaming file
//! contents into the chunker (nothing of a layer is held in memory).

use std::io::Read;

use darter_format::tree::{Meta, NodeKind, Xattr};
use tar::EntryType;

use crate::chunker::Chunker;
use crate::merge::{MergeTree, split_path};
use crate::{BuildError, Progress};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

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
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| BuildError::layer(layer_name, format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| BuildError::layer(layer_name, format!("bad tar entry: {e}")))?;
        let path = entry.path_bytes().into_owned();
        apply_entry(tree, chunker, &mut entry, &path, progress)
            .map_err(|e| e.with_layer_entry(layer_name, &path))?;
    }
    tree.end_layer();
    Ok(())
}

fn apply_entry(
    tree: &mut MergeTree,
    chunker: &mut Chunker,
    entry: &mut tar::Entry<'_, &mut dyn Read>,
    path: &[u8],
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    let merge = |e| BuildError::merge(e, "");
    let kind = entry.header().entry_type();
    if matches!(kind, EntryType::XGlobalHeader) {
        return Ok(());
    }
    let comps = split_path(path).map_err(merge)?;
    let Some((&name, parents)) = comps.split_last() else {
        // The root itself ("./"): only its metadata can change.
        if kind.is_dir() {
            tree.set_root_meta(meta_of(entry)?);
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
    let meta = meta_of(entry)?;
    let node = match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let size = entry.size();
            let data = chunker
                .chunk_stream(entry, size)
                .map_err(|e| BuildError::io("read", path, e))?;
            progress.add_bytes(size);
            NodeKind::File(data)
        }
        EntryType::Directory => NodeKind::Dir(Vec::new()),
        EntryType::Symlink => NodeKind::Symlink(link_name(entry)?),
        EntryType::Link => {
            let target = link_name(entry)?;
            return tree.link(path, &target).map_err(merge);
        }
        EntryType::Char | EntryType::Block => {
            let h = entry.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            if kind == EntryType::Char {
                NodeKind::CharDev(major, minor)
            } else {
                NodeKind::BlockDev(major, minor)
            }
        }
        EntryType::Fifo => NodeKind::Fifo,
        other => {
            return Err(BuildError::Unsupported {
                path: String::new(),
                detail: format!("tar entry type {other:?}"),
            });
        }
    };
    tree.put(path, meta, node).map_err(merge)?;
    progress.add_file();
    Ok(())
}

fn link_name(entry: &tar::Entry<'_, &mut dyn Read>) -> Result<Vec<u8>, BuildError> {
    match entry.link_name_bytes() {
        Some(l) if !l.is_empty() => Ok(l.into_owned()),
        _ => Err(BuildError::Unsupported {
            path: String::new(),
            detail: "link without a target".into(),
        }),
    }
}

/// Metadata from the header and its PAX records (nanosecond mtime, xattrs).
fn meta_of(entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<Meta, BuildError> {
    let bad = |what: &str| BuildError::Unsupported {
        path: String::new(),
        detail: format!("unreadable {what} in tar header"),
    };
    let h = entry.header();
    let mode = h.mode().map_err(|_| bad("mode"))?;
    let uid = u32::try_from(h.uid().map_err(|_| bad("uid"))?).map_err(|_| bad("uid"))?;
    let gid = u32::try_from(h.gid().map_err(|_| bad("gid"))?).map_err(|_| bad("gid"))?;
    if uid == u32::MAX || gid == u32::MAX {
        return Err(bad("uid/gid (-1)"));
    }
    let mut mtime = (h.mtime().map_err(|_| bad("mtime"))?, 0u32);
    let mut xattrs: Vec<Xattr> = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(|_| bad("PAX record"))? {
        for ext in pax {
            let ext = ext.map_err(|_| bad("PAX record"))?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    mtime = t;
                }
            } else if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if darter_format::erofs::ondisk::xattr_split(name).is_none() {
                    return Err(BuildError::Unsupported {
                        path: String::new(),
                        detail: format!(
                            "xattr {:?} is in a namespace Darter images cannot hold",
                            String::from_utf8_lossy(name)
                        ),
                    });
                }
                xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
            }
        }
    }
    xattrs.sort();
    xattrs.dedup_by(|a, b| a.0 == b.0);
    Ok(Meta {
        perm: (mode & 0o7777) as u16,
        uid,
        gid,
        mtime: mtime.0,
        mtime_nsec: mtime.1,
        xattrs,
    })
}

/// Parses a PAX time `SECONDS[.FRACTION]`; negative times become 0.
fn parse_pax_time(v: &[u8]) -> Option<(u64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    if s.starts_with('-') {
        return Some((0, 0));
    }
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        type Case<'a> = (&'a [u8], Option<(u64, u32)>);
        let cases: [Case<'_>; 6] = [
            (b"1700000000", Some((1_700_000_000, 0))),
            (b"1700000000.5", Some((1_700_000_000, 500_000_000))),
            (
                b"1700000000.123456789123",
                Some((1_700_000_000, 123_456_789)),
            ),
            (b"-5.2", Some((0, 0))),
            (b"abc", None),
            (b"1.x", None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_pax_time(v), want, "{}", String::from_utf8_lossy(v));
        }
    }
}
