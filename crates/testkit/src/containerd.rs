//! A real containerd for tests (Debian package `containerd`, 1.6): a plain
//! process with its root, state, sockets and log in a temp dir of its own,
//! CRI disabled unless asked for ([`Options::cri`], see [`crate::cri`]),
//! optionally with proxy snapshotters (`[proxy_plugins]`) and run through a
//! command prefix (e.g. into a network namespace, as the benchmarks do;
//! `ctr` then runs through it too).
//!
//! [`Containerd::start`] returns once `ctr version` answers. Dropping it,
//! also when a test fails, kills containerd, the shims it started and
//! their containers, undoes the mounts they left below the temp dir, and
//! deletes it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::cri::{self, CriClient, CriError, CriOptions};
use crate::process::{ChildGuard, MountGuard, mounts_under, try_run};

/// The containerd namespace [`Containerd::ctr`] uses.
pub const NAMESPACE: &str = "darter-test";
/// How long containerd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processes it leaves may take to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// containerd did not start.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd exited with {status} before answering; its log:\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("containerd does not answer after {timeout:?}; its log:\n{log}")]
    Timeout { timeout: Duration, log: String },
    #[error("cannot import the CRI sandbox image: {reason}; containerd's log:\n{log}")]
    SandboxImage { reason: String, log: String },
    #[error(transparent)]
    Cri(#[from] CriError),
}

/// A running containerd; everything it started dies with it on drop.
#[derive(Debug)]
pub struct Containerd {
    // Fields drop in order: the process group first, then the directory
    // (after `Drop::drop` has cleaned up the rest).
    process: ChildGuard,
    socket: PathBuf,
    /// What containerd and `ctr` run through.
    prefix: Vec<OsString>,
    dir: Option<tempfile::TempDir>,
}

/// How to start a [`Containerd`].
#[derive(Debug, Default, Clone)]
pub struct Options<'a> {
    /// Snapshotters `(name, socket)` registered as proxy plugins
    /// (containerd connects to them lazily, so they may start later).
    pub proxy_snapshotters: &'a [(&'a str, &'a Path)],
    /// Where its temp dir goes (default: the system's temp dir).
    pub parent: Option<&'a Path>,
    /// Words before `containerd` and `ctr` on their command lines, e.g.
    /// `nsenter --net=PATH --`. The program they start must exec the
    /// command (its pid is then containerd's).
    pub command_prefix: Vec<OsString>,
    /// Enables the CRI plugin so configured; containerd then answers once
    /// CRI knows its sandbox image (imported through the snapshotter CRI
    /// uses, which must be served by then).
    pub cri: Option<CriOptions<'a>>,
}

impl Containerd {
    /// Starts containerd with snapshotters `(name, socket)` registered as
    /// proxy plugins and waits until it answers.
    pub fn start(proxy_snapshotters: &[(&str, &Path)]) -> Result<Containerd, ContainerdError> {
        Containerd::start_with(&Options {
            proxy_snapshotters,
            ..Options::default()
        })
    }

    /// Starts containerd as `options` say and waits until it answers.
    pub fn start_with(options: &Options<'_>) -> Result<Containerd, ContainerdError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ContainerdError::Io { what, path, source }
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix("darter-containerd-");
        let dir = match options.parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(io("create a temp dir for", Path::new("containerd")))?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), options)).map_err(io("write", &config))?;
        let log_path = dir.path().join("containerd.log");
        let log = std::fs::File::create(&log_path).map_err(io("create", &log_path))?;
        let mut cmd = prefixed(&options.command_prefix, "containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("reopen", &log_path))?)
            .stderr(log);
        let process = ChildGuard::spawn(&mut cmd).map_err(io("start", Path::new("containerd")))?;
        let mut started = Containerd {
            process,
            socket,
            prefix: options.command_prefix.clone(),
            dir: Some(dir),
        };
        started.wait_until_answering()?;
        if let Some(cri) = &options.cri {
            started.import_sandbox_image(cri.snapshotter)?;
        }
        Ok(started)
    }

    /// Imports [`cri::SANDBOX_IMAGE`] (unpacked by `snapshotter`) and waits
    /// until CRI knows it (CRI learns of images from containerd's events).
    fn import_sandbox_image(&self, snapshotter: &str) -> Result<(), ContainerdError> {
        let failed = |reason: String| ContainerdError::SandboxImage {
            reason,
            log: self.log(),
        };
        let archive = self.path().join("sandbox-image.tar");
        cri::write_sandbox_image(&archive)
            .map_err(|err| failed(format!("cannot write {}: {err}", archive.display())))?;
        let mut import = self.ctr_in(cri::K8S_NAMESPACE, ["images", "import", "--snapshotter"]);
        import.arg(snapshotter).arg(&archive);
        try_run(&mut import).map_err(|err| failed(err.to_string()))?;
        let client = self.cri()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match client.image_id(cri::SANDBOX_IMAGE) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(failed(format!(
                        "CRI does not list it after {START_TIMEOUT:?}"
                    )));
                }
                Err(status) => return Err(failed(format!("CRI ImageStatus: {status}"))),
            }
        }
    }

    /// A client of containerd's CRI services (needs [`Options::cri`]).
    pub fn cri(&self) -> Result<CriClient, CriError> {
        CriClient::connect(&self.socket)
    }

    fn wait_until_answering(&mut self) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut delay = Duration::from_millis(5);
        loop {
            if let Ok(Some(status)) = self.process.child().try_wait() {
                return Err(ContainerdError::Exited {
                    status,
                    log: self.log(),
                });
            }
            if self.socket.exists() && try_run(&mut self.ctr(["version"])).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ContainerdError::Timeout {
                    timeout: START_TIMEOUT,
                    log: self.log(),
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Everything containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("containerd.log")).unwrap_or_default()
    }

    /// containerd's temp dir (root, state, sockets, log).
    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    /// `ctr --address SOCKET --namespace darter-test ARGS` (after the
    /// command prefix).
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_in(NAMESPACE, args)
    }

    /// [`Containerd::ctr`] in the containerd namespace `namespace` (e.g.
    /// CRI's [`cri::K8S_NAMESPACE`]).
    pub fn ctr_in<I, S>(&self, namespace: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut ctr = prefixed(&self.prefix, "ctr");
        ctr.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args);
        ctr
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims run in process groups of their own, and the containers
        // below them: find them before killing containerd reparents them.
        let strays = self.started_processes();
        if let Some(group) = i32::try_from(self.process.id())
            .ok()
            .and_then(Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
        kill_all(&strays);
        let deadline = Instant::now() + KILL_TIMEOUT;
        while strays.iter().any(|&pid| is_running(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(dir) = self.dir.take() else { return };
        // Container root filesystems and containerd's temporary mounts,
        // deepest first.
        let mut mounts = mounts_under(dir.path()).unwrap_or_default();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        drop(mounts.into_iter().map(MountGuard::new).collect::<Vec<_>>());
        match mounts_under(dir.path()) {
            Ok(left) if left.is_empty() => drop(dir),
            left => {
                // Deleting would reach into whatever is still mounted.
                let kept = dir.keep();
                tracing::warn!(path = %kept.display(), ?left, "mounts left; keeping containerd's directory");
            }
        }
    }
}

impl Containerd {
    /// The shims serving this containerd (named by its socket on their
    /// command line) and all their descendants.
    fn started_processes(&self) -> BTreeSet<u32> {
        let table = process_table();
        let address = self.socket.as_os_str().as_encoded_bytes();
        let mut found: BTreeSet<u32> = table
            .iter()
            .filter(|(_, (_, cmdline))| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| arg == address || arg.ends_with(address))
            })
            .map(|(&pid, _)| pid)
            .filter(|&pid| pid != self.process.id())
            .collect();
        loop {
            let more: Vec<u32> = table
                .iter()
                .filter(|(pid, (ppid, _))| found.contains(ppid) && !found.contains(pid))
                .map(|(&pid, _)| pid)
                .collect();
            if more.is_empty() {
                return found;
            }
            found.extend(more);
        }
    }
}

/// `program` after `prefix`.
fn prefixed(prefix: &[OsString], program: &str) -> Command {
    match prefix {
        [] => Command::new(program),
        [first, rest @ ..] => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// Every process: pid → (parent pid, command line).
fn process_table() -> BTreeMap<u32, (u32, Vec<u8>)> {
    let mut table = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if let Some(ppid) = ppid {
            table.insert(pid, (ppid, cmdline));
        }
    }
    table
}

fn kill_all(pids: &BTreeSet<u32>) {
    for &pid in pids {
        if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

/// Whether `pid` exists and is not a zombie (an exited daemon whose
/// parent has not reaped it yet is not running).
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// containerd's config: everything below `dir`, CRI off unless asked
/// for, the proxies.
fn config_toml(dir: &Path, options: &Options<'_>) -> String {
    let socket = dir.join("containerd.sock");
    let disabled = if options.cri.is_some() {
        ""
    } else {
        "\"io.containerd.grpc.v1.cri\""
    };
    let mut toml = format!(
        "version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\
         [grpc]\n  address = {grpc}\n\
         [ttrpc]\n  address = {ttrpc}\n\
         [debug]\n  address = \"\"\n\
         [metrics]\n  address = \"\"\n",
        root = toml_string(&dir.join("root")),
        state = toml_string(&dir.join("state")),
        grpc = toml_string(&socket),
        ttrpc = toml_string(&socket.with_extension("sock.ttrpc")),
    );
    if let Some(cri) = &options.cri {
        toml += &cri::config_toml(dir, cri);
    }
    for (name, address) in options.proxy_snapshotters {
        toml += &format!(
            "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {address}\n",
            name = toml_string(Path::new(name)),
            address = toml_string(address),
        );
    }
    toml
}

/// A TOML basic string (JSON's string syntax is one).
fn toml_string(path: &Path) -> String {
    serde_json::Value::from(path.to_string_lossy()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Started through a prefix (here `env`, which execs containerd with
    /// a variable set) in a directory of the caller's: both hold, and
    /// `ctr` reaches it.
    #[test]
    fn containerd_runs_through_its_command_prefix_in_the_given_directory() {
        let parent = tempfile::tempdir().unwrap();
        let containerd = Containerd::start_with(&Options {
            parent: Some(parent.path()),
            command_prefix: vec!["env".into(), "DARTER_PREFIXED=yes".into()],
            ..Options::default()
        })
        .unwrap();
        assert!(containerd.path().starts_with(parent.path()));
        let environ = std::fs::read(format!("/proc/{}/environ", containerd.pid())).unwrap();
        assert!(
            environ
                .split(|&b| b == 0)
                .any(|v| v == b"DARTER_PREFIXED=yes"),
            "containerd itself has the prefix's variable"
        );
        let ctr = containerd.ctr(["version"]);
        assert_eq!(ctr.get_program(), "env");
        crate::process::run(&mut containerd.ctr(["version"]));
        drop(containerd);
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    #[test]
    fn config_keeps_everything_in_its_directory_and_names_the_proxies() {
        let dir = Path::new("/t/ctd \"1\"");
        let proxy = Path::new("/t/snap.sock");
        let options = Options {
            proxy_snapshotters: &[("darter", proxy)],
            ..Options::default()
        };
        let toml = config_toml(dir, &options);
        for needle in [
            r#"root = "/t/ctd \"1\"/root""#,
            r#"state = "/t/ctd \"1\"/state""#,
            r#"address = "/t/ctd \"1\"/containerd.sock""#,
            r#"address = "/t/ctd \"1\"/containerd.sock.ttrpc""#,
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#,
            "[proxy_plugins.\"darter\"]\n  type = \"snapshot\"\n  address = \"/t/snap.sock\"",
        ] {
            assert!(toml.contains(needle), "{needle} in\n{toml}");
        }
    }

    /// With CRI on (and containerd's own overlayfs snapshotter), the
    /// sandbox image is there at start, a host-network pod runs a
    /// container of it through the CRI API, its exit code and log are
    /// CRI's, and nothing is left after drop.
    #[test]
    fn cri_runs_a_pod_offline_and_everything_goes_on_drop() {
        let containerd = Containerd::start_with(&Options {
            cri: Some(CriOptions {
                snapshotter: "overlayfs",
                plain_http_registries: &[],
            }),
            ..Options::default()
        })
        .unwrap();
        let cri = containerd.cri().unwrap();
        let logs = containerd.path().join("pod-logs");
        let started = cri
            .run_container("sleeper", cri::SANDBOX_IMAGE, &["/bin/sleep", "0.1"], &logs)
            .unwrap_or_else(|e| panic!("{e}\n{}", containerd.log()));
        let code = cri
            .wait_exited(&started.container_id, START_TIMEOUT)
            .unwrap();
        assert_eq!(code, 0);
        assert!(started.log_path.exists(), "{:?}", started.log_path);
        let failing = cri
            .run_container("failing", cri::SANDBOX_IMAGE, &["/bin/sleep", "x"], &logs)
            .unwrap();
        let code = cri
            .wait_exited(&failing.container_id, START_TIMEOUT)
            .unwrap();
        assert_eq!(code, 1);
        let log = std::fs::read_to_string(&failing.log_path).unwrap();
        assert!(
            log.contains(" stderr F ") && log.contains("invalid time interval"),
            "{log}"
        );
        cri.remove_pod(&started.pod_id).unwrap();
        let pid = containerd.pid();
        let dir = containerd.path().to_path_buf();
        drop(containerd);
        assert!(!is_running(pid));
        assert!(!dir.exists());
    }

    /// A real containerd answers, runs nothing after drop, and leaves no
    /// directory behind.
    #[test]
    fn containerd_starts_answers_and_is_gone_after_drop() {
        let containerd = Containerd::start(&[]).unwrap();
        let version = crate::process::run(&mut containerd.ctr(["version"]));
        assert!(String::from_utf8_lossy(&version.stdout).contains("Server:"));
        let plugins = crate::process::run(&mut containerd.ctr(["plugins", "ls"]));
        let plugins = String::from_utf8_lossy(&plugins.stdout).into_owned();
        let cri = |line: &str| {
            line.split_whitespace()
                .take(2)
                .eq(["io.containerd.grpc.v1", "cri"])
        };
        assert!(
            plugins
                .lines()
                .any(|l| l.starts_with("io.containerd.grpc.v1")),
            "{plugins}"
        );
        assert!(!plugins.lines().any(cri), "{plugins}");
        let pid = containerd.pid();
        let dir = containerd.path().to_path_buf();
        drop(containerd);
        assert!(!is_running(pid));
        assert!(!dir.exists());
    }
}
