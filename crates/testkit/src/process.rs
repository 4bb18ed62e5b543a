//! Helpers for tests that run real processes and mounts: condition polling,
//! guards that clean up on drop (also when the test panics), ports, and a
//! command runner whose failures say what went wrong.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Polls `condition` with a short, growing backoff (1 ms up to 50 ms) until
/// it returns true. Panics naming `what` if `timeout` passes first.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    loop {
        if condition() {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// A child process in its own process group; dropping the guard kills the
/// whole group with SIGKILL and reaps the child.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let child = cmd.process_group(0).spawn()?;
        Ok(ChildGuard { child })
    }

    /// The child's pid (also its process group id).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child, e.g. to take its stdout or wait for it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let group = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw);
        if let Some(group) = group {
            match rustix::process::kill_process_group(group, Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(err) => tracing::warn!(pgid = ?group, %err, "cannot kill process group"),
            }
        }
        if let Err(err) = self.child.wait() {
            tracing::warn!(pid = self.child.id(), %err, "cannot reap child");
        }
    }
}

/// Unmounts `path` lazily (`MNT_DETACH`) on drop; already unmounted is
/// fine. If the kernel refuses (an unprivileged FUSE mount), falls back to
/// `fusermount3 -u -z`.
#[derive(Debug)]
pub struct MountGuard {
    path: PathBuf,
}

impl MountGuard {
    /// Guards the mount at `path` (mounted by the caller).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        MountGuard { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        match rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH) {
            // EINVAL: not a mount point (any more); ENOENT: path is gone.
            Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
            Err(err) => {
                let fallback = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.path)
                    .output();
                if !matches!(&fallback, Ok(out) if out.status.success()) {
                    tracing::warn!(path = %self.path.display(), %err, ?fallback, "cannot unmount");
                }
            }
        }
    }
}

/// Mount points at or below `dir`, from `/proc/self/mountinfo` (to assert
/// that nothing was left mounted, or to refuse deleting a tree that still
/// has mounts).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect())
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok());
        match octal.and_then(|d| u8::from_str_radix(d, 8).ok()) {
            Some(byte) if bytes[i] == b'\\' => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0 to find a free port: {err}"));
    match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(err) => panic!("cannot read the address of a bound listener: {err}"),
    }
}

/// A command that could not be started or did not exit successfully.
#[derive(Debug)]
pub struct CommandError {
    command: String,
    failure: Failure,
}

#[derive(Debug)]
enum Failure {
    Spawn(io::Error),
    Exit {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

/// The last `limit` bytes of `output` as text, marked when cut.
fn tail(output: &[u8], limit: usize) -> String {
    let text = String::from_utf8_lossy(output);
    if text.len() <= limit {
        return text.into_owned();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]{}", &text[start..])
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Failure::Spawn(err) => write!(f, "cannot start {}: {err}", self.command),
            Failure::Exit {
                status,
                stdout,
                stderr,
            } => write!(
                f,
                "{} failed with {status}\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}",
                self.command
            ),
        }
    }
}

impl std::error::Error for CommandError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            Failure::Spawn(err) => Some(err),
            Failure::Exit { .. } => None,
        }
    }
}

/// Runs `cmd` to completion, capturing its output; `Err` unless it exited
/// with status 0. The error shows the command line, the status, stderr and
/// the end of stdout.
pub fn try_run(cmd: &mut Command) -> Result<Output, CommandError> {
    let command = format!("{cmd:?}");
    let output = cmd.output().map_err(|err| CommandError {
        command: command.clone(),
        failure: Failure::Spawn(err),
    })?;
    if output.status.success() {
        return Ok(output);
    }
    Err(CommandError {
        command,
        failure: Failure::Exit {
            status: output.status,
            stdout: tail(&output.stdout, 4096),
            stderr: tail(&output.stderr, 16384),
        },
    })
}

/// [`try_run`] for tests: panics with the command, status and stderr.
pub fn run(cmd: &mut Command) -> Output {
    try_run(cmd).unwrap_or_else(|err| panic!("{err}"))
}

#[cfg(test)]
mod tests;
