//! Running the programs under test: building and calling the `darter`
//! binary, timing commands (wall and CPU time), pinning to one core, and
//! dropping the page cache.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The workspace this harness belongs to.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// The `darter` binary under test.
#[derive(Debug, Clone)]
pub struct Darter {
    pub exe: PathBuf,
    /// `darter mount --frontend` (None: darter's default).
    pub frontend: Option<String>,
}

impl Darter {
    /// `cargo build --release -p darter` in this workspace (the same target
    /// directory as the harness, so `CARGO_TARGET_DIR` is honoured).
    pub fn build() -> anyhow::Result<Darter> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = workspace_root().join("Cargo.toml");
        tracing::info!("building darter (cargo build --release -p darter)");
        let output = Command::new(cargo)
            .args(["build", "--release", "-p", "darter", "--bin", "darter"])
            .arg("--message-format=json-render-diagnostics")
            .arg("--manifest-path")
            .arg(&manifest)
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo build -p darter")?;
        if !output.status.success() {
            bail!("cargo build -p darter failed ({})", output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let exe =
            darter_executable(&stdout).context("cargo build did not report a darter executable")?;
        Ok(Darter {
            exe,
            frontend: None,
        })
    }

    /// A `darter` command that ignores config files and log settings of
    /// the machine.
    pub fn command(&self) -> Command {
        hermetic(Command::new(&self.exe))
    }

    /// `darter mount`, with the frontend chosen for this run.
    pub fn mount_command(&self) -> Command {
        let mut cmd = self.command();
        cmd.arg("mount");
        if let Some(frontend) = &self.frontend {
            cmd.args(["--frontend", frontend]);
        }
        cmd
    }

    /// [`Darter::command`] pinned to the first core.
    pub fn command_on_one_core(&self) -> Command {
        hermetic(on_one_core(&self.exe))
    }

    /// `darter ARGS`, whose stdout is JSON.
    pub fn json<I, S>(&self, args: I) -> anyhow::Result<serde_json::Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command();
        cmd.args(args);
        let out = output(&mut cmd)?;
        serde_json::from_slice(&out).with_context(|| format!("parsing the JSON of {cmd:?}"))
    }
}

fn hermetic(mut cmd: Command) -> Command {
    cmd.env("DARTER_CONFIG", "/dev/null")
        .env_remove("DARTER_LOG")
        .env_remove("RUST_LOG");
    cmd
}

/// The `executable` of the `darter` binary artifact in cargo's JSON messages.
fn darter_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "darter")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Runs `cmd`, returning its stdout; fails with its stderr otherwise.
pub fn output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out.stdout)
}

/// What one timed command cost.
#[derive(Debug, Clone)]
pub struct Timed {
    pub wall: Duration,
    /// User + system time of the command and its children.
    pub cpu: Duration,
    pub stdout: Vec<u8>,
}

/// Runs `cmd` to completion and times it. CPU time comes from the
/// harness's reaped-children counters, so commands must not overlap.
pub fn timed(cmd: &mut Command) -> anyhow::Result<Timed> {
    let cpu_before = children_cpu()?;
    let started = Instant::now();
    let stdout = output(cmd)?;
    let wall = started.elapsed();
    let cpu = children_cpu()?.saturating_sub(cpu_before);
    Ok(Timed { wall, cpu, stdout })
}

/// `taskset -c 0 PROGRAM`: the command then runs on the first core only.
pub fn on_one_core(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(program);
    cmd
}

/// `sh -c SCRIPT sh ARGS...`.
pub fn shell(script: &str, args: &[&OsStr]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script, "sh"]).args(args);
    cmd
}

/// How long a process's CPU time must stay unchanged to count as idle
/// (the kernel accounts CPU time in ticks of 10 ms).
const IDLE_WINDOW: Duration = Duration::from_millis(100);
/// How long [`wait_idle`] waits at most.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until process `pid` uses no CPU for [`IDLE_WINDOW`].
pub fn wait_idle(pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let mut last = process_cpu(pid)?;
    loop {
        std::thread::sleep(IDLE_WINDOW);
        let now = process_cpu(pid)?;
        if now == last {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("process {pid} still busy after {IDLE_TIMEOUT:?}");
        }
        last = now;
    }
}

/// Writes every dirty page back to disk, so that the writeback of earlier
/// work does not run during a measurement.
pub fn write_back() {
    rustix::fs::sync();
}

/// Writes dirty pages back, then drops the page cache, dentries and inodes
/// (of the whole machine) so the next read comes from the disk.
pub fn drop_caches() -> anyhow::Result<()> {
    write_back();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("writing /proc/sys/vm/drop_caches (needs root)")
}

/// User + system CPU time of all reaped children of this process.
fn children_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let ticks = ProcStat::parse(&stat).context("parsing /proc/self/stat")?;
    Ok(ticks_to_duration(ticks.cutime + ticks.cstime))
}

/// User + system CPU time of process `pid` so far.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = ProcStat::parse(&stat).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks.utime + ticks.stime))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// CPU time fields of `/proc/PID/stat`, in clock ticks.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl ProcStat {
    /// Fields 14-17 (utime, stime, cutime, cstime). The command name
    /// (field 2) may hold spaces and parentheses, so fields are counted
    /// from its closing parenthesis.
    fn parse(stat: &str) -> Option<ProcStat> {
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        })
    }
}

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    vm_hwm(&status).with_context(|| format!("no VmHWM in {path}"))
}

fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    17 5 30 7 20 0 1 0 100 1000 100 18446744073709551615";
        assert_eq!(
            ProcStat::parse(stat),
            Some(ProcStat {
                utime: 17,
                stime: 5,
                cutime: 30,
                cstime: 7
            })
        );
        assert_eq!(ProcStat::parse("1234 (short) S 1"), None);
    }

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tdarter\nVmPeak:\t  9000 kB\nVmHWM:\t  12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(vm_hwm(status), Some(12345 * 1024));
        assert_eq!(vm_hwm("Name:\tx\n"), None);
    }

    #[test]
    fn own_peak_rss_and_cpu_are_readable() {
        let pid = std::process::id();
        assert!(peak_rss(pid).unwrap() > 0);
        process_cpu(pid).unwrap();
    }

    #[test]
    fn finds_the_darter_executable_in_cargo_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"darter_format"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"darter"},"executable":"/t/release/darter"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            darter_executable(messages),
            Some(PathBuf::from("/t/release/darter"))
        );
        assert_eq!(darter_executable(r#"{"reason":"build-finished"}"#), None);
    }

    #[test]
    fn timed_commands_report_wall_and_child_cpu_time() {
        let t = timed(&mut shell(
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done",
            &[],
        ))
        .unwrap();
        assert!(t.wall > Duration::ZERO);
        assert!(t.cpu > Duration::ZERO, "{t:?}");
        assert!(timed(&mut shell("exit 3", &[])).is_err());
    }
}
