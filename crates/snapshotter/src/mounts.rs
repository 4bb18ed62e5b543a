//! The mounts containerd performs for a snapshot, as containerd's overlay
//! snapshotter returns them:
//!
//! - no parent: a bind mount of the snapshot's own `fs` (overlayfs needs at
//!   least one lower layer), read-write unless it is a view;
//! - an active snapshot with parents: overlay with `upperdir`/`workdir` in
//!   the snapshot and the parents' `fs` as `lowerdir`, nearest first;
//! - a view of one parent: a read-only bind mount of that parent's `fs`;
//! - a view of more: a read-only overlay (`lowerdir` only).

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

use crate::store::Kind;

/// What decides a snapshot's mounts.
#[derive(Debug)]
pub struct MountSpec<'a> {
    pub kind: Kind,
    /// The snapshot's `fs` and `work` directories.
    pub fs: &'a Path,
    pub work: &'a Path,
    /// The parents' `fs` directories, nearest first.
    pub parents: &'a [PathBuf],
    /// Options every overlay mount gets (e.g. `index=off`).
    pub overlay_options: &'a [String],
}

/// The mounts for `spec`.
pub fn mounts(spec: &MountSpec<'_>) -> Vec<Mount> {
    let read_only = spec.kind != Kind::Active;
    match (spec.parents, read_only) {
        ([], _) => vec![bind(spec.fs, read_only)],
        ([only], true) => vec![bind(only, true)],
        (parents, _) => {
            let mut options = spec.overlay_options.to_vec();
            if !read_only {
                options.push(format!("workdir={}", spec.work.display()));
                options.push(format!("upperdir={}", spec.fs.display()));
            }
            let lower: Vec<String> = parents.iter().map(|p| p.display().to_string()).collect();
            options.push(format!("lowerdir={}", lower.join(":")));
            vec![Mount {
                r#type: "overlay".to_owned(),
                source: "overlay".to_owned(),
                target: String::new(),
                options,
            }]
        }
    }
}

fn bind(source: &Path, read_only: bool) -> Mount {
    Mount {
        r#type: "bind".to_owned(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![
            if read_only { "ro" } else { "rw" }.to_owned(),
            "rbind".to_owned(),
        ],
    }
}

/// Options for every overlay mount on this kernel: `index=off` where the
/// kernel knows the option, as containerd does. With the inode index on,
/// overlayfs refuses or misbehaves when lower layers are shared by several
/// mounts with different upper directories, which is the normal case here.
pub fn overlay_options() -> Vec<String> {
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        vec!["index=off".to_owned()]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(mounts: &[Mount]) -> Vec<String> {
        mounts
            .iter()
            .map(|m| format!("{} {} {}", m.r#type, m.source, m.options.join(",")))
            .collect()
    }

    #[test]
    fn mounts_follow_containerds_overlay_snapshotter() {
        let p = |s: &str| PathBuf::from(s);
        let cases: [(Kind, Vec<PathBuf>, &str); 6] = [
            (Kind::Active, vec![], "bind /s/9/fs rw,rbind"),
            (Kind::View, vec![], "bind /s/9/fs ro,rbind"),
            (
                Kind::Active,
                vec![p("/s/2/fs")],
                "overlay overlay index=off,workdir=/s/9/work,upperdir=/s/9/fs,lowerdir=/s/2/fs",
            ),
            (
                Kind::Active,
                vec![p("/s/3/fs"), p("/s/2/fs"), p("/s/1/fs")],
                "overlay overlay index=off,workdir=/s/9/work,upperdir=/s/9/fs,lowerdir=/s/3/fs:/s/2/fs:/s/1/fs",
            ),
            (Kind::View, vec![p("/s/2/fs")], "bind /s/2/fs ro,rbind"),
            (
                Kind::View,
                vec![p("/s/3/fs"), p("/s/2/fs")],
                "overlay overlay index=off,lowerdir=/s/3/fs:/s/2/fs",
            ),
        ];
        let overlay_options = vec!["index=off".to_owned()];
        for (kind, parents, expected) in cases {
            let spec = MountSpec {
                kind,
                fs: Path::new("/s/9/fs"),
                work: Path::new("/s/9/work"),
                parents: &parents,
                overlay_options: &overlay_options,
            };
            assert_eq!(summary(&mounts(&spec)), [expected], "{kind:?} {parents:?}");
        }
    }
}
