//! `darter snapshotter`: containerd's proxy snapshotter, in the foreground,
//! serving Darter images lazily: each image's top layer is a `darter mount
//! -d` daemon of its own at the snapshot's directory. (One node daemon
//! serving every image is the next step.)
//!
//! The snapshotter is also the mounts' keeper (`darter_daemon::keeper`, on
//! `ROOT/keeper.sock`): it holds a copy of each mount's FUSE device, so a
//! daemon that dies (killed, crashed, SIGTERM) leaves its mount waiting
//! rather than broken, and it starts `darter mount --takeover` to serve it
//! again.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use darter_daemon::api;
use darter_daemon::keeper::{Keeper, MountRecord};
use darter_remote::{ImageRef, Stores};
use darter_snapshotter::{ImageLayers, LazyError, LazyMounts, MountStats, is_mount_point};

use crate::cli::SnapshotterArgs;
use crate::config::Config;

use super::pull::FetchedImage;
use super::{Context, Outcome};

/// How long a mount daemon may take to exit once asked to.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often to look whether it has.
const UNMOUNT_POLL: Duration = Duration::from_millis(20);
/// How long an unmount waits for a mount to be idle before detaching it.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(5);
/// How many times a lost daemon is restarted before giving up.
const TAKEOVER_ATTEMPTS: u32 = 3;
/// How long to wait before the next attempt (times the attempt).
const TAKEOVER_BACKOFF: Duration = Duration::from_secs(1);

pub fn run(args: &SnapshotterArgs, ctx: &Context, config: &Config) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let daemons = Daemons {
        exe: std::env::current_exe().context("finding the darter executable")?,
        forward: ctx.forwarded_flags().to_vec(),
        keeper: args.root.join("keeper.sock"),
    };
    let restarter = daemons.clone();
    let keeper = Keeper::listen(
        &daemons.keeper,
        Box::new(move |lost| restarter.take_over_in_background(lost)),
    )
    .context("starting the mounts' keeper")?;
    let lazy = DarterMounts {
        registries: RegistryReads {
            config: config.client_config(&[], None),
            plain_http: ctx.plain_http(),
            stores: Mutex::new(HashMap::new()),
        },
        daemons,
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

/// The snapshotter's own registry reads (manifests and configs). Its
/// images arrive at run time, so the global `--plain-http` applies to each
/// registry as it comes (the CLI's stores know only the registries named
/// on the command line, and the snapshotter's has none).
struct RegistryReads {
    config: darter_registry::ClientConfig,
    plain_http: bool,
    /// One client per registry (`""` for layouts), kept for its
    /// connections and tokens.
    stores: Mutex<HashMap<String, Arc<Stores>>>,
}

impl RegistryReads {
    fn stores_for(&self, image: &ImageRef) -> Arc<Stores> {
        let registry = match image {
            ImageRef::Registry(r) => r.registry().to_owned(),
            ImageRef::Layout(_) => String::new(),
        };
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        let made = stores.entry(registry.clone()).or_insert_with(|| {
            let mut config = self.config.clone();
            if self.plain_http && !registry.is_empty() {
                config = config.with_plain_http(registry);
            }
            Arc::new(Stores::new(config))
        });
        Arc::clone(made)
    }
}

/// Lazy mounts made by this `darter` binary: `darter mount IMAGE DIR -d`
/// daemons, kept by this process.
struct DarterMounts {
    registries: RegistryReads,
    daemons: Daemons,
    keeper: Arc<Keeper>,
}

impl std::fmt::Debug for DarterMounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DarterMounts")
            .field("daemons", &self.daemons)
            .finish_non_exhaustive()
    }
}

/// How mount daemons are started.
#[derive(Debug, Clone)]
struct Daemons {
    exe: PathBuf,
    /// Global flags (config file, plain HTTP, verbosity) the mounts get too.
    forward: Vec<OsString>,
    /// The keeper's socket.
    keeper: PathBuf,
}

impl Daemons {
    /// Runs `darter mount IMAGE MOUNTPOINT -d --keeper SOCKET EXTRA...`.
    fn mount(&self, image: &str, mountpoint: &Path, extra: &[&str]) -> Result<(), LazyError> {
        let output = Command::new(&self.exe)
            .args(&self.forward)
            .arg("mount")
            .arg(image)
            .arg(mountpoint)
            .arg("-d")
            .arg("--keeper")
            .arg(&self.keeper)
            .args(extra)
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

    /// Starts, on a thread of its own, a daemon that takes over the mount
    /// whose daemon was `lost`.
    fn take_over_in_background(&self, lost: MountRecord) {
        let daemons = self.clone();
        let spawned = std::thread::Builder::new()
            .name("darter-takeover".into())
            .spawn(move || daemons.take_over(&lost));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a daemon to take a mount over");
        }
    }

    fn take_over(&self, lost: &MountRecord) {
        let why = "its daemon ended without its mount going away (killed, crashed or signalled)";
        let frontend = lost.frontend.as_str();
        for attempt in 1..=TAKEOVER_ATTEMPTS {
            let started = self.mount(
                &lost.image,
                &lost.mountpoint,
                &["--takeover", "--frontend", frontend],
            );
            match started.and_then(|()| Ok(api::query_stats(&lost.mountpoint)?.pid)) {
                Ok(new_pid) => {
                    tracing::warn!(
                        mountpoint = %lost.mountpoint.display(),
                        old_pid = lost.pid,
                        new_pid,
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
        let stores = self.registries.stores_for(&reference);
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
        self.daemons.mount(image, mountpoint, &[])
    }

    /// A daemon answers for `mountpoint` and something is mounted there (a
    /// daemon whose mount was taken away answers until it has exited).
    fn is_served(&self, mountpoint: &Path) -> bool {
        api::query_stats(mountpoint).is_ok() && is_mount_point(mountpoint)
    }

    /// Stops keeping the mount, unmounts it (the kernel frontend's devices
    /// too), which ends its daemon, and waits until the daemon has exited.
    fn unmount(&self, mountpoint: &Path) -> Result<(), LazyError> {
        let kept = self.keeper.forget(mountpoint);
        let report = api::query_stats(mountpoint).ok();
        unmount_when_idle(mountpoint)?;
        unmount_when_idle(&api::devices_dir(mountpoint))?;
        let Some(pid) = report.map(|r| r.pid).or(kept.map(|k| k.pid)) else {
            return Ok(());
        };
        let deadline = Instant::now() + UNMOUNT_TIMEOUT;
        while is_running(pid) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the mount daemon (pid {pid}) is still running after {UNMOUNT_TIMEOUT:?}"
                )
                .into());
            }
            std::thread::sleep(UNMOUNT_POLL);
        }
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

/// Whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}
