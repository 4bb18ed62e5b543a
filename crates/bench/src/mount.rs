//! Darter mounts made by the harness, timed from the `exec` of `darter
//! mount` to the first request the FUSE daemon answers, and always taken
//! down again: unmounted cleanly when a measurement ends, detached and the
//! daemon killed when it fails.

use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_testkit::process::ChildGuard;
use rustix::mount::UnmountFlags;
use serde::Deserialize;

use crate::tools::{self, Darter};

/// `f_type` of a FUSE filesystem (statfs(2)).
const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
/// `f_type` of EROFS, what the kernel EROFS frontend mounts.
const EROFS_SUPER_MAGIC: u64 = 0xE0F5_E1E2;
/// How long a mount may take to appear or go away.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between polls of the mountpoint while a mount starts.
const SERVE_POLL: Duration = Duration::from_micros(200);

/// The counters of a mount the benchmarks use (`darter stats --json`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct MountStats {
    pub backend_bytes: u64,
    pub backend_requests: u64,
    pub cache_misses: u64,
    pub verify_failures: u64,
    pub read_bytes: u64,
    pub decompressed_bytes: u64,
    pub image_bytes: u64,
    pub pid: u32,
}

/// How long a mount took to come up.
#[derive(Debug, Clone, Copy)]
pub struct MountTiming {
    /// From the exec of `darter mount` to the first statfs the mount answered.
    pub to_serving: Duration,
    /// From the exec of `darter mount -d` to its exit (None in the foreground).
    pub to_return: Option<Duration>,
}

/// A Darter mount; unmounted (and its daemon ended) on drop.
#[derive(Debug)]
pub struct DarterMount {
    darter: Darter,
    mountpoint: PathBuf,
    daemon_pid: u32,
    /// The foreground `darter mount` process, if this mount has one.
    foreground: Option<ChildGuard>,
    unmounted: bool,
}

impl DarterMount {
    /// `darter mount -d IMAGE MOUNTPOINT --cache CACHE --socket
    /// MOUNTPOINT.sock`: a node daemon of its own, with this cache.
    pub fn daemon(
        darter: &Darter,
        image: &str,
        mountpoint: &Path,
        cache: &Path,
    ) -> anyhow::Result<(DarterMount, MountTiming)> {
        let Started {
            mut child,
            watcher,
            started,
            log_path,
        } = start_mount(
            darter,
            image,
            mountpoint,
            cache,
            &[
                "-d".as_ref(),
                "--socket".as_ref(),
                node_socket(mountpoint).as_os_str(),
            ],
        )?;
        let status = wait_for_exit(child.child(), MOUNT_TIMEOUT);
        let to_return = started.elapsed();
        // Kills `darter mount -d` if it hangs (the daemon has its own
        // process group and is dealt with below).
        drop(child);
        let to_serving = watcher.wait(started);
        // Whatever happened, a daemon may be serving now: find it so that
        // the guard can take it down.
        let pid = stats_of(darter, mountpoint).map(|s| s.pid);
        let mount = DarterMount {
            darter: darter.clone(),
            mountpoint: mountpoint.to_path_buf(),
            daemon_pid: pid.as_ref().map_or(0, |p| *p),
            foreground: None,
            unmounted: false,
        };
        match status {
            Some(status) if status.success() => {}
            Some(status) => bail!(
                "darter mount -d {image} {} failed ({status}): {}",
                mountpoint.display(),
                std::fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .trim_end()
            ),
            None => bail!(
                "darter mount -d {image} {} did not return within {MOUNT_TIMEOUT:?}",
                mountpoint.display()
            ),
        }
        pid?;
        let to_serving = to_serving.context("the mount never answered statfs")?;
        let timing = MountTiming {
            to_serving,
            to_return: Some(to_return),
        };
        Ok((mount, timing))
    }

    /// `darter mount IMAGE MOUNTPOINT --cache CACHE` in the foreground, as
    /// a child of the harness.
    pub fn foreground(
        darter: &Darter,
        image: &str,
        mountpoint: &Path,
        cache: &Path,
    ) -> anyhow::Result<(DarterMount, MountTiming)> {
        let Started {
            mut child,
            watcher,
            started,
            log_path,
        } = start_mount(darter, image, mountpoint, cache, &[])?;
        let Some(to_serving) = watcher.wait_while_running(started, child.child()) else {
            force_unmount(mountpoint);
            bail!(
                "darter mount {image} {} did not serve: {}",
                mountpoint.display(),
                failure_detail(child.child(), &log_path)
            );
        };
        let mount = DarterMount {
            darter: darter.clone(),
            mountpoint: mountpoint.to_path_buf(),
            daemon_pid: child.id(),
            foreground: Some(child),
            unmounted: false,
        };
        let timing = MountTiming {
            to_serving,
            to_return: None,
        };
        Ok((mount, timing))
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `darter stats --json`.
    pub fn stats(&self) -> anyhow::Result<MountStats> {
        stats_of(&self.darter, &self.mountpoint)
    }

    /// The daemon's peak resident memory so far.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        tools::peak_rss(self.daemon_pid)
    }

    /// The daemon's CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        tools::process_cpu(self.daemon_pid)
    }

    /// Waits until the daemon has finished its background work (cache
    /// writes, read-ahead) and the kernel has written back what it wrote:
    /// the state a warm read meets in use, a moment after the cold one.
    pub fn settle(&self) -> anyhow::Result<()> {
        tools::wait_idle(self.daemon_pid)?;
        tools::write_back();
        Ok(())
    }

    /// Unmounts and waits for the daemon to exit (a node daemon, which
    /// outlives its mounts, is told to with SIGTERM).
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.unmounted = true;
        unmount_busy_aware(&self.mountpoint)?;
        if self.foreground.is_none()
            && let Some(pid) = rustix::process::Pid::from_raw(self.daemon_pid as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        self.wait_for_daemon_exit()
    }

    fn wait_for_daemon_exit(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let exited = |m: &mut DarterMount| match m.foreground.as_mut() {
            Some(child) => matches!(child.child().try_wait(), Ok(Some(_))),
            None => !process_alive(m.daemon_pid),
        };
        while !exited(self) {
            if Instant::now() > deadline {
                bail!(
                    "the daemon {} of {} did not exit after unmount",
                    self.daemon_pid,
                    self.mountpoint.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for DarterMount {
    fn drop(&mut self) {
        if self.unmounted {
            return;
        }
        force_unmount(&self.mountpoint);
        // A daemon that never served is not known by pid: find it by its
        // command line. (A foreground child is also reaped by its guard.)
        let socket = node_socket(&self.mountpoint);
        kill_daemons(|arg| arg == self.mountpoint || arg == socket);
    }
}

/// Why a foreground mount process did not serve: its exit status and
/// log, if it has exited.
fn failure_detail(child: &mut Child, log: &Path) -> String {
    match child.try_wait() {
        Ok(Some(status)) => {
            let stderr = std::fs::read_to_string(log).unwrap_or_default();
            format!("exited with {status}: {}", stderr.trim_end())
        }
        _ => format!("not serving after {MOUNT_TIMEOUT:?}"),
    }
}

/// A `darter mount` process just started.
struct Started {
    child: ChildGuard,
    /// Watches the mountpoint since just before the exec.
    watcher: ServeWatcher,
    started: Instant,
    /// Where its stderr goes.
    log_path: PathBuf,
}

/// The node daemon socket of a detached mount at `mountpoint`.
pub fn node_socket(mountpoint: &Path) -> PathBuf {
    mountpoint.with_extension("sock")
}

/// Starts `darter mount IMAGE MOUNTPOINT --cache CACHE EXTRA...` with its
/// stderr in `MOUNTPOINT.log`.
fn start_mount(
    darter: &Darter,
    image: &str,
    mountpoint: &Path,
    cache: &Path,
    extra: &[&std::ffi::OsStr],
) -> anyhow::Result<Started> {
    let log_path = mountpoint.with_extension("log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = darter.mount_command();
    cmd.arg(image)
        .arg(mountpoint)
        .arg("--cache")
        .arg(cache)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let watcher = ServeWatcher::start(mountpoint);
    let started = Instant::now();
    let child = ChildGuard::spawn(&mut cmd).with_context(|| format!("starting {cmd:?}"))?;
    Ok(Started {
        child,
        watcher,
        started,
        log_path,
    })
}

fn stats_of(darter: &Darter, mountpoint: &Path) -> anyhow::Result<MountStats> {
    let value = darter.json(["stats".as_ref(), mountpoint.as_os_str(), "--json".as_ref()])?;
    serde_json::from_value(value).context("reading darter stats --json")
}

/// Whether `path` is served by Darter: a FUSE filesystem (whose statfs the
/// daemon answers, so true means it serves), or the kernel EROFS frontend
/// (mounted only once its devices serve).
fn serves_fuse(path: &Path) -> bool {
    rustix::fs::statfs(path)
        .is_ok_and(|s| [FUSE_SUPER_MAGIC, EROFS_SUPER_MAGIC].contains(&(s.f_type as u64)))
}

/// A thread that notes when a mountpoint first answers as FUSE.
struct ServeWatcher {
    served_at: std::sync::mpsc::Receiver<Instant>,
    stop: Arc<AtomicBool>,
}

impl ServeWatcher {
    fn start(mountpoint: &Path) -> ServeWatcher {
        let (tx, served_at) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let path = mountpoint.to_path_buf();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + MOUNT_TIMEOUT;
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                if serves_fuse(&path) {
                    let _ = tx.send(Instant::now());
                    return;
                }
                std::thread::sleep(SERVE_POLL);
            }
        });
        ServeWatcher { served_at, stop }
    }

    /// Time from `started` to serving, once the mount command has returned
    /// (so it serves by now, or it never will).
    fn wait(self, started: Instant) -> Option<Duration> {
        let got = self.served_at.recv_timeout(Duration::from_secs(1)).ok();
        self.stop.store(true, Ordering::Relaxed);
        got.map(|at| at.duration_since(started))
    }

    /// Time from `started` to serving, giving up if `child` exits first.
    fn wait_while_running(self, started: Instant, child: &mut Child) -> Option<Duration> {
        loop {
            match self.served_at.recv_timeout(Duration::from_millis(5)) {
                Ok(at) => return Some(at.duration_since(started)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if !matches!(child.try_wait(), Ok(None)) {
                        self.stop.store(true, Ordering::Relaxed);
                        return None;
                    }
                }
            }
        }
    }
}

/// Unmounts `path`, retrying while it is busy (a reader that is just
/// closing its files); detaches it if it stays busy.
fn unmount_busy_aware(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rustix::mount::unmount(path, UnmountFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => {
                force_unmount(path);
                bail!("cannot unmount {}: {err}", path.display());
            }
        }
    }
}

/// A tmpfs mounted by the harness; detached on drop.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a new tmpfs on the existing directory `path`.
    pub fn mount(path: &Path) -> anyhow::Result<Tmpfs> {
        rustix::mount::mount(
            "tmpfs",
            path,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .with_context(|| format!("mounting a tmpfs on {}", path.display()))?;
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        force_unmount(&self.path);
    }
}

/// Detaches whatever is mounted at `path`; nothing mounted is fine.
pub fn force_unmount(path: &Path) {
    match rustix::mount::unmount(path, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(err) => tracing::warn!(path = %path.display(), %err, "cannot detach mount"),
    }
}

/// Detaches every mount at or below `dir`, deepest first (after a crash or
/// on a signal). Their daemons exit once their mounts are gone.
pub fn unmount_all_under(dir: &Path) {
    let mut mounts = darter_testkit::process::mounts_under(dir).unwrap_or_default();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in mounts {
        tracing::warn!(path = %mount.display(), "detaching a mount left behind");
        force_unmount(&mount);
    }
    kill_daemons(|arg| arg.starts_with(dir));
}

fn process_alive(pid: u32) -> bool {
    // A zombie has exited; only its parent (init) has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(
        |stat| !matches!(stat.rsplit_once(") "), Some((_, rest)) if rest.starts_with('Z')),
    )
}

/// Waits up to `timeout` for `child` to exit.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(SERVE_POLL),
            _ => return None,
        }
    }
}

/// SIGKILLs every `darter mount` or `darter daemon` process with an argument for which
/// `matches` holds (its mountpoint, or a path below the work directory).
pub fn kill_daemons(matches: impl Fn(&Path) -> bool) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let pids = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|p| p != std::process::id()));
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if is_darter_mount_of(&cmdline, &matches)
            && let Some(target) = rustix::process::Pid::from_raw(pid)
        {
            tracing::warn!(pid, "killing a darter mount daemon left behind");
            let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
        }
    }
}

/// Whether a NUL-separated command line is `.../darter mount ...` or
/// `.../darter daemon ...` with an argument `matches` accepts.
fn is_darter_mount_of(cmdline: &[u8], matches: impl Fn(&Path) -> bool) -> bool {
    let args: Vec<&Path> = cmdline
        .split(|b| *b == 0)
        .map(|a| Path::new(std::ffi::OsStr::from_bytes(a)))
        .collect();
    let darter = args
        .first()
        .is_some_and(|exe| exe.file_name().is_some_and(|n| n == "darter"));
    darter
        && args
            .get(1)
            .is_some_and(|a| *a == Path::new("mount") || *a == Path::new("daemon"))
        && args[2..].iter().any(|a| matches(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_darter_mount_command_lines() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        let mnt = Path::new("/w/run-1/mnt-3");
        let cases = [
            (
                line(&[
                    "/t/release/darter",
                    "mount",
                    "oci:/i:b",
                    "/w/run-1/mnt-3",
                    "-d",
                ]),
                true,
            ),
            (
                line(&["darter", "mount", "oci:/i:b", "/w/run-1/mnt-4"]),
                false,
            ),
            (
                line(&["/t/release/darter", "stats", "/w/run-1/mnt-3"]),
                false,
            ),
            (line(&["/usr/bin/find", "mount", "/w/run-1/mnt-3"]), false),
            (Vec::new(), false),
        ];
        for (cmdline, expected) in cases {
            assert_eq!(
                is_darter_mount_of(&cmdline, |a| a == mnt),
                expected,
                "{:?}",
                String::from_utf8_lossy(&cmdline)
            );
        }
        let under = line(&["darter", "mount", "oci:/i:b", "/w/run-1/x/mnt-1"]);
        assert!(is_darter_mount_of(&under, |a| a.starts_with("/w/run-1")));
    }
}
