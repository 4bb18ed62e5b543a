//! `darter status`: the node's lazy mounts and fallback counts, as the
//! `darter snapshotter` serving them reports them on its status socket.

use anyhow::Context as _;
use darter_snapshotter::{NodeStatus, query_status, status_socket};

use crate::cli::StatusArgs;
use crate::output::print_json;
use crate::units::human;

use super::Outcome;

pub fn run(args: &StatusArgs) -> anyhow::Result<Outcome> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| status_socket(&args.snapshotter_root));
    let status = query_status(&socket).with_context(|| {
        format!(
            "asking the snapshotter at {} for its status",
            socket.display()
        )
    })?;
    if args.json {
        print_json(&status)?;
    } else {
        print_text(&status);
    }
    Ok(Outcome::Success)
}

fn print_text(status: &NodeStatus) {
    println!("lazy mounts      {}", status.lazy_mounts.len());
    for mount in &status.lazy_mounts {
        let daemon = match &mount.daemon {
            Some(d) => format!(
                "pid {}, {} fetched in {} requests",
                d.pid,
                human(d.backend_bytes),
                d.backend_requests
            ),
            None => "no daemon answers".to_owned(),
        };
        println!("  {}", mount.image);
        println!("    at {} ({daemon})", mount.mountpoint.display());
    }
    let total: u64 = status.fallbacks.values().sum();
    println!("pulled in full   {total} (fallbacks since the snapshotter started)");
    for (reason, count) in &status.fallbacks {
        println!("  {reason:15}{count}");
    }
}
