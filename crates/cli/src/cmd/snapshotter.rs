//! `darter snapshotter`: containerd's proxy snapshotter, in the foreground,
//! serving Darter images lazily: each image's top layer is a `darter mount
//! -d` daemon of its own at the snapshot's directory. (One node daemon
//! serving every image is the next step.)

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use darter_daemon::api;
use darter_remote::{ImageRef, Stores};
use darter_snapshotter::{LazyError, LazyMounts, is_mount_point};

use crate::cli::SnapshotterArgs;
use crate::config::Config;

use super::pull::FetchedImage;
use super::{Context, Outcome};

/// How long a mount daemon may take to exit once asked to.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to look whether it has.
const UNMOUNT_POLL: Duration = Duration::from_millis(20);

pub fn run(args: &SnapshotterArgs, ctx: &Context, config: &Config) -> anyhow::Result<Outcome> {
    let lazy = DarterMounts {
        stores: Stores::new(config.client_config(&[], None)),
        exe: std::env::current_exe().context("finding the darter executable")?,
        forward: ctx.forwarded_flags().to_vec(),
    };
    darter_snapshotter::run_with(&args.root, &args.socket, Some(Arc::new(lazy))).with_context(
        || {
            format!(
                "serving snapshots from {} at {}",
                args.root.display(),
                args.socket.display()
            )
        },
    )?;
    Ok(Outcome::Success)
}

/// Lazy mounts made by this `darter` binary: `darter mount IMAGE DIR -d`.
struct DarterMounts {
    stores: Stores,
    exe: PathBuf,
    /// Global flags (config file, plain HTTP, verbosity) the mounts get too.
    forward: Vec<OsString>,
}

impl std::fmt::Debug for DarterMounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DarterMounts")
            .field("exe", &self.exe)
            .finish_non_exhaustive()
    }
}

impl LazyMounts for DarterMounts {
    fn darter_diff_ids(&self, image: &str) -> Result<Option<Vec<String>>, LazyError> {
        let reference = ImageRef::parse(image)?;
        // The error with its causes, in one message.
        let fetched =
            FetchedImage::fetch(&self.stores, &reference).map_err(|err| format!("{err:#}"))?;
        Ok(fetched.is_darter.then_some(fetched.diff_ids))
    }

    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), LazyError> {
        let output = Command::new(&self.exe)
            .args(&self.forward)
            .arg("mount")
            .arg(image)
            .arg(mountpoint)
            .arg("-d")
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "darter mount exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )
        .into())
    }

    /// A daemon answers for `mountpoint` and something is mounted there (a
    /// daemon whose mount was taken away answers until it has exited).
    fn is_served(&self, mountpoint: &Path) -> bool {
        api::query_stats(mountpoint).is_ok() && is_mount_point(mountpoint)
    }

    /// SIGTERM to the daemon serving `mountpoint` (it unmounts), then waits
    /// until it has exited.
    fn unmount(&self, mountpoint: &Path) -> Result<(), LazyError> {
        let Ok(report) = api::query_stats(mountpoint) else {
            return Ok(());
        };
        let pid = i32::try_from(report.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| format!("the daemon reports pid {}", report.pid))?;
        match rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(err) => return Err(err.into()),
        }
        let deadline = Instant::now() + UNMOUNT_TIMEOUT;
        while is_running(report.pid) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the mount daemon (pid {}) is still running after {UNMOUNT_TIMEOUT:?}",
                    report.pid
                )
                .into());
            }
            std::thread::sleep(UNMOUNT_POLL);
        }
        Ok(())
    }
}

/// Whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}
