//! A fresh containerd for the network scenarios: a plain process (CRI
//! disabled) with its own root, state and socket in a directory of the
//! run, started inside the client's namespace of a [`NetBed`], and `ctr`
//! runs of a container timed to the first line it prints.
//!
//! Containers run with `--net-host`, i.e. in the client's namespace, so
//! that whatever a failed run leaves behind (shims, container processes)
//! dies with that namespace. Killing containerd (on drop) stops the rest.

use std::cell::Cell;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_testkit::process::ChildGuard;

use crate::netbed::NetBed;
use crate::tools;

/// The containerd namespace the harness uses.
const NAMESPACE: &str = "bench";
/// How long containerd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one container may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// `PATH` for containers on a plain root filesystem (`--rootfs`), which
/// have no image config to take it from: Debian's (and the images') default.
const ROOTFS_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a container runs on.
#[derive(Debug, Clone, Copy)]
pub enum Rootfs<'a> {
    /// An image pulled into containerd (its overlayfs snapshot).
    Image(&'a str),
    /// A directory, e.g. an overlay over a Darter mount (`ctr run --rootfs`).
    Dir(&'a Path),
}

/// A containerd process; killed on drop.
#[derive(Debug)]
pub struct Containerd<'bed> {
    bed: &'bed NetBed,
    dir: PathBuf,
    socket: PathBuf,
    // Last: the process dies after the fields above are gone (nothing
    // depends on that, but it reads in the order things were made).
    process: ChildGuard,
    runs: Cell<usize>,
}

impl<'bed> Containerd<'bed> {
    /// Starts containerd with everything in `dir` (an empty directory) and
    /// waits until it answers.
    pub fn start(bed: &'bed NetBed, dir: &Path) -> anyhow::Result<Containerd<'bed>> {
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(dir, &socket)?)
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut containerd = Command::new("containerd");
        containerd.arg("--config").arg(&config);
        let mut cmd = bed.client(&containerd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning a log handle")?)
            .stderr(log);
        let process = ChildGuard::spawn(&mut cmd).with_context(|| format!("starting {cmd:?}"))?;
        let mut started = Containerd {
            bed,
            dir: dir.to_path_buf(),
            socket,
            process,
            runs: Cell::new(0),
        };
        started
            .wait_until_serving()
            .with_context(|| format!("containerd log {}", log_path.display()))?;
        Ok(started)
    }

    fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.process.child().try_wait()? {
                bail!("containerd exited with {status}");
            }
            if self.socket.exists() && tools::output(&mut self.ctr(["version"])).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd does not answer after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ctr -a SOCKET -n bench ARGS` in the client's namespace.
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut ctr = Command::new("ctr");
        ctr.arg("-a")
            .arg(&self.socket)
            .args(["-n", NAMESPACE])
            .args(args);
        self.bed.client(&ctr)
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
            Rootfs::Dir(dir) => args.extend([
                OsStr::new("--env"),
                OsStr::new(ROOTFS_PATH),
                OsStr::new("--rootfs"),
                dir.as_os_str(),
                OsStr::new(&id),
            ]),
        }
        args.extend(argv.iter().map(OsStr::new));
        let stderr_path = self.dir.join(format!("{id}.stderr"));
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

/// containerd's config: everything below `dir`, CRI off.
fn config_toml(dir: &Path, socket: &Path) -> anyhow::Result<String> {
    // JSON strings are TOML basic strings.
    let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).context("quoting a path");
    Ok(format!(
        "version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = {socket}\n\
         [ttrpc]\n  address = {ttrpc}\n\
         [debug]\n  address = \"\"\n\
         [metrics]\n  address = \"\"\n",
        root = quote(&dir.join("root"))?,
        state = quote(&dir.join("state"))?,
        socket = quote(socket)?,
        ttrpc = quote(&socket.with_extension("sock.ttrpc"))?,
    ))
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
        let pid = i32::try_from(containerd.process.id()).unwrap();
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

    #[test]
    fn config_keeps_everything_in_its_directory() {
        let dir = Path::new("/w/run-1/ctd-0");
        let toml = config_toml(dir, &dir.join("containerd.sock")).unwrap();
        for needle in [
            "root = \"/w/run-1/ctd-0/root\"",
            "state = \"/w/run-1/ctd-0/state\"",
            "address = \"/w/run-1/ctd-0/containerd.sock\"",
            "address = \"/w/run-1/ctd-0/containerd.sock.ttrpc\"",
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]",
        ] {
            assert!(toml.contains(needle), "{needle} in\n{toml}");
        }
    }
}
