//! `darter snapshotter`: containerd's proxy snapshotter, in the foreground,
//! serving Darter images lazily: each image's top layer is a mount of the
//! node daemon (`darter daemon` on `ROOT/daemon.sock`, started if none
//! answers) at the snapshot's directory.
//!
//! The snapshotter is also the mounts' keeper (`darter_daemon::keeper`, on
//! `ROOT/keeper.sock`): it holds a copy of each mount's FUSE device, so a
//! node daemon that dies (killed, crashed, SIGTERM) leaves its mounts
//! waiting rather than broken; it starts one new node daemon and has it
//! take every such mount over.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use darter_daemon::api::{self, MountRequest};
use darter_daemon::keeper::{Keeper, MountRecord};
use darter_remote::ImageRef;
use darter_snapshotter::{ImageLayers, LazyError, LazyMounts, MountStats, is_mount_point};

use crate::cli::SnapshotterArgs;
use crate::config::Config;

use super::daemon::NodeDaemon;
use super::pull::FetchedImage;
use super::{Context, Outcome, RegistryClients};

/// How often to look whether a mount is gone.
const UNMOUNT_POLL: Duration = Duration::from_millis(20);
/// How long an unmount waits for a mount to be idle before detaching it.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(5);
/// How many times a lost mount's takeover is tried before giving up.
const TAKEOVER_ATTEMPTS: u32 = 3;
/// How long to wait before the next attempt (times the attempt).
const TAKEOVER_BACKOFF: Duration = Duration::from_secs(1);

pub fn run(args: &SnapshotterArgs, ctx: &Context, config: &Config) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let mounts = Mounts {
        node: NodeDaemon {
            socket: args.root.join("daemon.sock"),
            forward: ctx.forwarded_flags().to_vec(),
            cache: None,
            metrics: None,
        },
        keeper: args.root.join("keeper.sock"),
        frontend: super::mount::frontend(None, &config.mount)?,
        prefetch_all: super::mount::prefetch_all(None, &config.mount)?,
        threads: super::mount::threads(None, &config.mount),
        restarting: Arc::new(Mutex::new(())),
    };
    let status = mounts.node.ensure()?;
    tracing::info!(pid = status.pid, socket = %mounts.node.socket.display(), "the node daemon serves the lazy mounts");
    let restarter = mounts.clone();
    let keeper = Keeper::listen(
        &mounts.keeper,
        Box::new(move |lost| restarter.take_over_in_background(lost)),
    )
    .context("starting the mounts' keeper")?;
    let lazy = DarterMounts {
        registries: RegistryClients::new(config, ctx),
        mounts,
        keeper,
    };
    darter_snapshotter::run_with(&args.root, &args.socket, Some(Arc::new(lazy)), args.metrics)
        .with_context(|| {
            format!(
                "serving snapshots from {} at {}",
                args.root.display(),
                args.socket.display()
            )
        })?;
    Ok(Outcome::Success)
}

/// Lazy mounts made by this `darter` binary: mounts of the node daemon,
/// kept by this process.
struct DarterMounts {
    registries: RegistryClients,
    mounts: Mounts,
    keeper: Arc<Keeper>,
}

impl std::fmt::Debug for DarterMounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DarterMounts")
            .field("mounts", &self.mounts)
            .finish_non_exhaustive()
    }
}

/// The node daemon's mounts under this keeper.
#[derive(Debug, Clone)]
struct Mounts {
    node: NodeDaemon,
    /// The keeper's socket.
    keeper: PathBuf,
    frontend: darter_daemon::Frontend,
    /// As the config file's `[mount]` says.
    prefetch_all: bool,
    threads: usize,
    /// Held while a lost node daemon is being replaced: the losses of its
    /// N mounts start one daemon, not N.
    restarting: Arc<Mutex<()>>,
}

impl Mounts {
    /// Has the node daemon on `socket` mount `image` at `mountpoint` (or
    /// take it over).
    fn mount(
        &self,
        socket: &Path,
        image: &str,
        mountpoint: &Path,
        frontend: darter_daemon::Frontend,
        takeover: bool,
    ) -> Result<api::StatsReport, LazyError> {
        let request = MountRequest {
            image: image.to_owned(),
            mountpoint: mountpoint.to_owned(),
            frontend,
            prefetch_all: self.prefetch_all,
            threads: self.threads,
            keeper: Some(self.keeper.clone()),
            takeover,
            credentials: None,
            plain_http: false,
            cache_dir: None,
        };
        Ok(api::request_mount(socket, &request)?)
    }

    /// Starts, on a thread of its own, the takeover of the mount whose
    /// daemon was `lost`.
    fn take_over_in_background(&self, lost: MountRecord) {
        let mounts = self.clone();
        let spawned = std::thread::Builder::new()
            .name("darter-takeover".into())
            .spawn(move || mounts.take_over(&lost));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a daemon to take a mount over");
        }
    }

    /// A node daemon that answers on `node`'s socket: the running one, or
    /// one started now. Serialised, so the mounts of one dead daemon start
    /// one new daemon.
    fn restart_node(&self, node: &NodeDaemon) -> anyhow::Result<u32> {
        let _one_at_a_time = self
            .restarting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(node.ensure()?.pid)
    }

    fn take_over(&self, lost: &MountRecord) {
        let why = "its daemon ended without its mount going away (killed, crashed or signalled)";
        // Where the lost daemon served, which is where the next one serves.
        let node = NodeDaemon {
            socket: lost
                .daemon_socket
                .clone()
                .unwrap_or_else(|| self.node.socket.clone()),
            ..self.node.clone()
        };
        for attempt in 1..=TAKEOVER_ATTEMPTS {
            let taken = self
                .restart_node(&node)
                .map_err(|e| LazyError::from(format!("{e:#}")))
                .and_then(|_| {
                    self.mount(
                        &node.socket,
                        &lost.image,
                        &lost.mountpoint,
                        lost.frontend,
                        true,
                    )
                });
            match taken {
                Ok(report) => {
                    tracing::warn!(
                        mountpoint = %lost.mountpoint.display(),
                        old_pid = lost.pid,
                        new_pid = report.pid,
                        why,
                        "restarted a mount daemon"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(
                        mountpoint = %lost.mountpoint.display(),
                        old_pid = lost.pid,
                        attempt,
                        error = %e,
                        "cannot restart the mount daemon"
                    );
                    std::thread::sleep(TAKEOVER_BACKOFF * attempt);
                }
            }
        }
    }
}

impl LazyMounts for DarterMounts {
    fn image_layers(&self, image: &str) -> Result<ImageLayers, LazyError> {
        let reference = ImageRef::parse(image)?;
        let stores = self.registries.stores_for(&reference, None, false);
        // The error with its causes, in one message.
        let fetched = FetchedImage::fetch(&stores, &reference).map_err(|err| format!("{err:#}"))?;
        Ok(ImageLayers {
            is_darter: fetched.is_darter,
            diff_ids: fetched.diff_ids,
        })
    }

    fn mount_stats(&self, mountpoint: &Path) -> Option<MountStats> {
        let report = api::query_stats(mountpoint).ok()?;
        Some(MountStats {
            pid: report.pid,
            backend_bytes: report.stats.backend_bytes,
            backend_requests: report.stats.backend_requests,
        })
    }

    fn mount(&self, image: &str, mountpoint: &Path) -> Result<(), LazyError> {
        self.mounts.node.ensure().map_err(|e| format!("{e:#}"))?;
        let socket = &self.mounts.node.socket;
        self.mounts
            .mount(socket, image, mountpoint, self.mounts.frontend, false)
            .map(drop)
    }

    /// A daemon answers for `mountpoint` and something is mounted there (a
    /// daemon whose mount was taken away answers until it has exited).
    fn is_served(&self, mountpoint: &Path) -> bool {
        api::query_stats(mountpoint).is_ok() && is_mount_point(mountpoint)
    }

    /// Stops keeping the mount and has the node daemon unmount it (the
    /// kernel frontend's devices too) and forget it; what is still mounted
    /// there then (no daemon answered) is unmounted here.
    fn unmount(&self, mountpoint: &Path) -> Result<(), LazyError> {
        self.keeper.forget(mountpoint);
        match api::request_unmount(&self.mounts.node.socket, mountpoint) {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(mountpoint = %mountpoint.display(), error = %e, "the node daemon did not unmount")
            }
        }
        unmount_when_idle(mountpoint)?;
        unmount_when_idle(&api::devices_dir(mountpoint))?;
        Ok(())
    }
}

/// Unmounts `path`, retrying while the kernel says it is busy (requests in
/// flight for files just closed), and past [`UNMOUNT_BUSY_WAIT`] detaches
/// it: it is served until its last user lets go. Nothing mounted there is
/// fine.
fn unmount_when_idle(path: &Path) -> Result<(), LazyError> {
    use rustix::mount::{UnmountFlags, unmount};
    let deadline = Instant::now() + UNMOUNT_BUSY_WAIT;
    loop {
        match unmount(path, UnmountFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(UNMOUNT_POLL);
            }
            Err(rustix::io::Errno::BUSY) => {
                tracing::warn!(path = %path.display(), "mount busy; detaching it");
                return Ok(unmount(path, UnmountFlags::DETACH)?);
            }
            Err(e) => return Err(format!("unmounting {}: {e}", path.display()).into()),
        }
    }
}
