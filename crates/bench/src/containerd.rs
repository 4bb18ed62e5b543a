//! containerd for the network scenarios: `darter_testkit`'s containerd
//! (a plain process, CRI disabled, its root, state and socket in a
//! directory of the run) started inside the client's namespace of a
//! [`NetBed`], optionally with the Darter snapshotter as a proxy plugin,
//! and `ctr` runs of a container timed to the first line it prints.
//!
//! Containers run with `--net-host`, i.e. in the client's namespace, so
//! that whatever a failed run leaves behind (shims, container processes)
//! dies with that namespace. Dropping containerd stops the rest.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_testkit::containerd::Options;
use darter_testkit::process::ChildGuard;

use crate::mount::MountStats;
use crate::netbed::NetBed;
use crate::tools::{self, Darter};

/// How long the snapshotter may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one container may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// `PATH` for containers on a plain root filesystem (`--rootfs`), which
/// have no image config to take it from: Debian's (and the images') default.
const ROOTFS_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The name the Darter snapshotter has in containerd's config.
pub const DARTER_SNAPSHOTTER: &str = "darter";

/// What a container runs on.
#[derive(Debug, Clone, Copy)]
pub enum Rootfs<'a> {
    /// An image pulled into containerd (its overlayfs snapshot).
    Image(&'a str),
    /// An image pulled into the Darter snapshotter (`darter pull`).
    DarterImage(&'a str),
    /// A directory, e.g. an overlay over a Darter mount (`ctr run --rootfs`).
    Dir(&'a Path),
}

/// A containerd process in the client's namespace; killed on drop.
#[derive(Debug)]
pub struct Containerd {
    inner: darter_testkit::containerd::Containerd,
    runs: Cell<usize>,
}

impl Containerd {
    /// Starts containerd with everything below `dir` and waits until it
    /// answers.
    pub fn start(bed: &NetBed, dir: &Path) -> anyhow::Result<Containerd> {
        Containerd::start_with_snapshotter(bed, dir, None)
    }

    /// [`Containerd::start`], with the Darter snapshotter serving at
    /// `snapshotter` (a socket) as [`DARTER_SNAPSHOTTER`].
    pub fn start_with_snapshotter(
        bed: &NetBed,
        dir: &Path,
        snapshotter: Option<&Path>,
    ) -> anyhow::Result<Containerd> {
        let proxies: Vec<(&str, &Path)> = snapshotter
            .map(|socket| (DARTER_SNAPSHOTTER, socket))
            .into_iter()
            .collect();
        let inner = darter_testkit::containerd::Containerd::start_with(&Options {
            proxy_snapshotters: &proxies,
            parent: Some(dir),
            command_prefix: bed.client_prefix(),
            cri: None,
        })
        .with_context(|| format!("starting containerd in {}", dir.display()))?;
        Ok(Containerd {
            inner,
            runs: Cell::new(0),
        })
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        self.inner.socket()
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS` in the client's namespace.
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.ctr(args)
    }

    /// `ctr content fetch --plain-http REFERENCE`: downloads the image
    /// (manifest, config, layers) into the content store.
    pub fn fetch(&self, reference: &str) -> anyhow::Result<()> {
        tools::output(&mut self.ctr(["content", "fetch", "--plain-http", reference]))?;
        Ok(())
    }

    /// `ctr image pull --plain-http REFERENCE`: fetches what the content
    /// store lacks and unpacks the layers into snapshots.
    pub fn pull(&self, reference: &str) -> anyhow::Result<()> {
        tools::output(&mut self.ctr(["image", "pull", "--plain-http", reference]))?;
        Ok(())
    }

    /// `ctr image rm --sync REFERENCE`: the image and, once collected, its
    /// snapshots are gone (a Darter snapshotter undoes its lazy mount).
    pub fn remove_image(&self, reference: &str) -> anyhow::Result<()> {
        tools::output(&mut self.ctr(["image", "rm", "--sync", reference]))?;
        Ok(())
    }

    /// `ctr run --rm --net-host` of `argv` on `rootfs`; checks that it
    /// printed exactly `expected` and returns when its first line came.
    pub fn run(
        &self,
        rootfs: Rootfs<'_>,
        argv: &[&str],
        expected: &str,
    ) -> anyhow::Result<Instant> {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let id = format!("run-{n}");
        let mut args: Vec<&OsStr> = ["run", "--rm", "--net-host"].map(OsStr::new).to_vec();
        match rootfs {
            Rootfs::Image(reference) => args.extend([OsStr::new(reference), OsStr::new(&id)]),
            Rootfs::DarterImage(reference) => {
                args.extend(["--snapshotter", DARTER_SNAPSHOTTER, reference, &id].map(OsStr::new))
            }
            Rootfs::Dir(dir) => args.extend([
                OsStr::new("--env"),
                OsStr::new(ROOTFS_PATH),
                OsStr::new("--rootfs"),
                dir.as_os_str(),
                OsStr::new(&id),
            ]),
        }
        args.extend(argv.iter().map(OsStr::new));
        let stderr_path = self.inner.path().join(format!("{id}.stderr"));
        let mut cmd = self.ctr(args);
        cmd.stderr(
            std::fs::File::create(&stderr_path)
                .with_context(|| format!("creating {}", stderr_path.display()))?,
        );
        let output = first_line(&mut cmd, RUN_TIMEOUT).with_context(|| {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            format!("{cmd:?}: {}", stderr.trim_end())
        })?;
        if output.stdout != expected {
            bail!("{cmd:?} printed {:?}, expected {expected:?}", output.stdout);
        }
        Ok(output.first_line_at)
    }
}

/// `darter snapshotter` in the client's namespace (so its lazy mounts
/// fetch through the link), with a chunk cache of its own. Dropping it
/// kills it and its node daemon, and undoes its lazy mounts.
#[derive(Debug)]
pub struct DarterSnapshotter {
    dir: PathBuf,
    darter: Darter,
    process: Option<ChildGuard>,
}

impl DarterSnapshotter {
    /// Starts it with everything below `dir` (an empty directory) and
    /// waits until its socket answers.
    pub fn start(bed: &NetBed, darter: &Darter, dir: &Path) -> anyhow::Result<DarterSnapshotter> {
        let config = dir.join("darter.toml");
        let cache = serde_json::to_string(&dir.join("cache").to_string_lossy())?;
        std::fs::write(&config, format!("[mount]\ncache = {cache}\n"))
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.join("snapshotter.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut snapshotter = darter.command();
        snapshotter
            .arg("--config")
            .arg(&config)
            .args(["--plain-http", "snapshotter", "--socket"])
            .arg(dir.join("snapshotter.sock"))
            .arg("--root")
            .arg(dir.join("root"));
        let mut cmd = bed.client(&snapshotter);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let mut started = DarterSnapshotter {
            dir: dir.to_path_buf(),
            darter: darter.clone(),
            process: Some(
                ChildGuard::spawn(&mut cmd).with_context(|| format!("starting {cmd:?}"))?,
            ),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(started.socket()).is_err() {
            let exited = started.process.as_mut().map(|p| p.child().try_wait());
            if let Some(Ok(Some(status))) = exited {
                bail!(
                    "darter snapshotter exited with {status}; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                bail!("darter snapshotter does not serve after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(started)
    }

    /// Its snapshots socket (containerd's proxy plugin address).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    /// The counters of its one lazy mount (`darter status`, then `darter
    /// stats` of the mountpoint it names).
    pub fn lazy_mount_stats(&self) -> anyhow::Result<MountStats> {
        let root = self.dir.join("root");
        let status = self.darter.json([
            "status".as_ref(),
            "--json".as_ref(),
            "--snapshotter-root".as_ref(),
            root.as_os_str(),
        ])?;
        let mounts = status["lazy_mounts"]
            .as_array()
            .context("darter status: no lazy_mounts")?;
        let [mount] = &mounts[..] else {
            bail!("darter status lists {} lazy mounts, not one", mounts.len());
        };
        let mountpoint = mount["mountpoint"]
            .as_str()
            .context("a lazy mount without mountpoint")?;
        let stats =
            self.darter
                .json(["stats".as_ref(), OsStr::new(mountpoint), "--json".as_ref()])?;
        serde_json::from_value(stats).context("reading darter stats --json")
    }
}

impl Drop for DarterSnapshotter {
    fn drop(&mut self) {
        drop(self.process.take());
        crate::mount::unmount_all_under(&self.dir);
    }
}

/// What a command printed, and when its first line came.
#[derive(Debug)]
struct FirstLine {
    first_line_at: Instant,
    stdout: String,
}

/// Runs `cmd` (stdin and stdout are set here) to a successful exit within
/// `timeout`, noting when the first line of its stdout arrived.
fn first_line(cmd: &mut Command, timeout: Duration) -> anyhow::Result<FirstLine> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let deadline = Instant::now() + timeout;
    let mut child = ChildGuard::spawn(cmd).context("starting it")?;
    let stdout = child
        .child()
        .stdout
        .take()
        .context("no pipe for its stdout")?;
    let (tx, first) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || -> std::io::Result<String> {
        let mut reader = BufReader::new(stdout);
        let mut text = String::new();
        reader.read_line(&mut text)?;
        let _ = tx.send(Instant::now());
        reader.read_to_string(&mut text)?;
        Ok(text)
    });
    let first_line_at = first
        .recv_timeout(timeout)
        .with_context(|| format!("no output within {timeout:?}"))?;
    let status = loop {
        if let Some(status) = child.child().try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    drop(child);
    let stdout = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?
        .context("reading its stdout")?;
    if !status.success() {
        bail!("failed ({status}), printed {stdout:?}");
    }
    Ok(FirstLine {
        first_line_at,
        stdout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_timed_before_the_command_ends() {
        let started = Instant::now();
        let out = first_line(
            &mut tools::shell("echo one; sleep 0.3; echo two", &[]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, "one\ntwo\n");
        let to_first = out.first_line_at - started;
        assert!(to_first < Duration::from_millis(250), "{to_first:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn failures_and_hangs_are_errors() {
        let failed = first_line(
            &mut tools::shell("echo x; exit 3", &[]),
            Duration::from_secs(10),
        );
        assert!(format!("{:#}", failed.unwrap_err()).contains("printed \"x\\n\""));
        let started = Instant::now();
        let hung = first_line(
            &mut tools::shell("sleep 30", &[]),
            Duration::from_millis(200),
        );
        assert!(hung.is_err());
        // The guard killed it: no 30 s wait.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// A real containerd in a real bed runs a container on a directory,
    /// times its first line, refuses wrong output, and leaves nothing
    /// running when dropped.
    #[test]
    fn containers_run_on_a_directory_and_nothing_outlives_containerd() {
        let rootfs = darter_testkit::fixtures::debian_minbase_rootfs().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bed = NetBed::start(dir.path()).unwrap();
        let ctd_dir = dir.path().join("containerd");
        std::fs::create_dir(&ctd_dir).unwrap();
        let overlay_dir = dir.path().join("overlay");
        std::fs::create_dir(&overlay_dir).unwrap();
        let overlay = crate::testbed::Overlay::mount(&rootfs, &overlay_dir).unwrap();
        let containerd = Containerd::start(&bed, &ctd_dir).unwrap();
        let pid = i32::try_from(containerd.inner.pid()).unwrap();
        let argv = ["sh", "-c", "echo one; sleep 0.3; echo two"];
        let started = Instant::now();
        let first = containerd
            .run(Rootfs::Dir(overlay.path()), &argv, "one\ntwo\n")
            .unwrap();
        assert!(first - started < started.elapsed() - Duration::from_millis(250));
        let wrong = containerd.run(Rootfs::Dir(overlay.path()), &["echo", "three"], "four\n");
        assert!(format!("{:#}", wrong.unwrap_err()).contains("three"));
        assert!(bed.client_processes().unwrap().contains(&pid));
        drop(containerd);
        darter_testkit::process::wait_until(
            Duration::from_secs(10),
            "the client namespace to be empty",
            || bed.client_processes().unwrap().is_empty(),
        );
        drop(overlay);
    }
}
