//! `darter snapshotter`: containerd's proxy snapshotter, in the foreground.

use anyhow::Context as _;

use crate::cli::SnapshotterArgs;

use super::Outcome;

pub fn run(args: &SnapshotterArgs) -> anyhow::Result<Outcome> {
    darter_snapshotter::run(&args.root, &args.socket).with_context(|| {
        format!(
            "serving snapshots from {} at {}",
            args.root.display(),
            args.socket.display()
        )
    })?;
    Ok(Outcome::Success)
}
