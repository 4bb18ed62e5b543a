//! `darter-bench`: Darter's benchmark harness.
//!
//! Owns: building what the benchmarks need (the release `darter` binary,
//! cached inputs), running each scenario with its baseline and Darter side
//! by side in alternating rounds, and writing `docs/benchmarks/RESULTS.md`
//! with its charts. Scenarios implement [`scenario::Scenario`] and fill in
//! the results model ([`model`]); the report writer ([`report`]) only
//! renders it, so scenarios that need a registry or containerd plug in the
//! same way.
//!
//! Must not: change product code or its inputs (fixtures are read, never
//! written), leave mounts or daemons behind (also on failure or a signal),
//! or write anything but the output directory and its own work directory.
//!
//! Run as root from the workspace:
//! `cargo run --release -p darter-bench -- all` (or `--quick all`, or
//! scenario names; `--list` shows them).

#![forbid(unsafe_code)]

mod chart;
mod containerd;
mod inputs;
mod machine;
mod model;
mod mount;
mod netbed;
mod opened;
mod report;
mod scenario;
mod scenarios;
mod testbed;
mod tools;
mod walk;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Parser;

use crate::machine::Machine;
use crate::model::Verdict;
use crate::report::{Failure, Run};
use crate::scenario::{Bench, Scenario, Size};
use crate::tools::Darter;

/// Runs Darter's benchmarks and writes docs/benchmarks/RESULTS.md.
#[derive(Debug, Parser)]
#[command(name = "darter-bench")]
struct Cli {
    /// Scenarios to run, or `all`.
    #[arg(required_unless_present = "list")]
    scenarios: Vec<String>,
    /// Small inputs and fewer rounds: a few minutes (for CI).
    #[arg(long)]
    quick: bool,
    /// Side-by-side rounds per measurement (default 5, or 3 with --quick).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Where to write RESULTS.md and the charts (default: docs/benchmarks of the workspace;
    /// with --quick, WORK/quick-results, so a quick run never replaces the published figures).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Use this darter binary instead of building it.
    #[arg(long, value_name = "PATH")]
    darter: Option<PathBuf>,
    /// Work directory for images, mounts and caches of this run.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/darter-bench")]
    work: PathBuf,
    /// `darter mount --frontend` for every Darter mount (default: darter's).
    #[arg(long, value_name = "KIND")]
    frontend: Option<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DARTER_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("darter-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let available = scenarios::all();
    if cli.list {
        for s in &available {
            println!("{:12} {}", s.name(), s.title());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut selected = select(available, &cli.scenarios)?;
    if cli.quick && cli.scenarios.iter().any(|n| n == "all") {
        selected.retain(|s| s.in_quick_runs());
    }
    if !rustix::process::geteuid().is_root() {
        bail!("run as root: the benchmarks mount filesystems, chroot and drop caches");
    }
    let size = Size {
        quick: cli.quick,
        runs: cli.runs.unwrap_or(if cli.quick { 3 } else { 5 }).max(1),
        random_file_bytes: if cli.quick { 128 << 20 } else { 1 << 30 },
    };
    let workspace = tools::workspace_root();
    let out = match (&cli.out, cli.quick) {
        (Some(out), _) => out.clone(),
        (None, false) => workspace.join("docs/benchmarks"),
        (None, true) => cli.work.join("quick-results"),
    };
    let run_dir = prepare_work_dir(&cli.work)?;
    install_signal_cleanup(&run_dir)?;
    let (mut darter, mut darter_origin) = match &cli.darter {
        Some(exe) => (
            Darter {
                exe: exe.clone(),
                frontend: None,
            },
            format!(
                "{} (given with --darter, not built from this workspace)",
                exe.display()
            ),
        ),
        None => (
            Darter::build()?,
            "built from this workspace (`cargo build --release -p darter`)".to_owned(),
        ),
    };
    if let Some(frontend) = &cli.frontend {
        darter.frontend = Some(frontend.clone());
        darter_origin.push_str(&format!(", mounting with `--frontend {frontend}`"));
    }
    let machine = Machine::describe(&workspace);
    let started = Instant::now();
    let mut bench = Bench::new(darter, size, run_dir.clone());
    let (reports, failures) = run_scenarios(&mut bench, &selected);
    let run = Run {
        machine,
        command: reproduce_command(),
        darter: darter_origin,
        quick: size.quick,
        rounds: size.runs,
        load: bench.load.series(),
        seconds: started.elapsed().as_secs_f64(),
        scenarios: reports,
        failures,
    };
    drop(bench);
    mount::unmount_all_under(&run_dir);
    std::fs::remove_dir_all(&run_dir)
        .with_context(|| format!("removing the work directory {}", run_dir.display()))?;
    report::write(&run, &out)?;
    print_summary(&run, &out);
    Ok(if run.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The scenarios named on the command line, in `all`'s order.
fn select(
    available: Vec<Box<dyn Scenario>>,
    names: &[String],
) -> anyhow::Result<Vec<Box<dyn Scenario>>> {
    let known: Vec<&str> = available.iter().map(|s| s.name()).collect();
    if let Some(unknown) = names
        .iter()
        .find(|n| *n != "all" && !known.contains(&n.as_str()))
    {
        bail!(
            "unknown scenario {unknown:?}; known: all, {}",
            known.join(", ")
        );
    }
    let everything = names.iter().any(|n| n == "all");
    Ok(available
        .into_iter()
        .filter(|s| everything || names.iter().any(|n| n == s.name()))
        .collect())
}

fn run_scenarios(
    bench: &mut Bench,
    selected: &[Box<dyn Scenario>],
) -> (Vec<model::ScenarioReport>, Vec<Failure>) {
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for scenario in selected {
        tracing::info!(scenario = scenario.name(), "running");
        let from = bench.load.now();
        let started = Instant::now();
        match scenario.run(bench) {
            Ok(mut report) => {
                report.seconds = started.elapsed().as_secs_f64();
                report.load.samples = bench.load.between(from, bench.load.now());
                reports.push(report);
            }
            Err(err) => {
                tracing::error!(scenario = scenario.name(), "failed: {err:#}");
                failures.push(Failure {
                    scenario: scenario.title().to_owned(),
                    error: format!("{err:#}"),
                });
            }
        }
    }
    (reports, failures)
}

/// Creates `WORK/run-PID` after clearing what earlier, killed runs left:
/// their mounts are detached and their directories removed.
fn prepare_work_dir(work: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    for entry in std::fs::read_dir(work).with_context(|| format!("listing {}", work.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", work.display()))?
            .path();
        let pid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            tracing::warn!(path = %path.display(), "cleaning up after an earlier run");
            mount::unmount_all_under(&path);
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let run_dir = work.join(format!("run-{}", std::process::id()));
    std::fs::create_dir(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    Ok(run_dir)
}

/// On SIGINT or SIGTERM: detach every mount of this run, then exit.
fn install_signal_cleanup(run_dir: &Path) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let run_dir = run_dir.to_path_buf();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("darter-bench: signal {signal}: unmounting and exiting");
            mount::unmount_all_under(&run_dir);
            netbed::remove_own_namespaces();
            let _ = std::fs::remove_dir_all(&run_dir);
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// `cargo run --release -p darter-bench -- ARGS`, as this run was called.
fn reproduce_command() -> String {
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    format!("cargo run --release -p darter-bench -- {}", args.join(" "))
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn print_summary(run: &Run, out: &Path) {
    println!("results: {}", out.join("RESULTS.md").display());
    for s in &run.scenarios {
        for aim in &s.aims {
            let mark = match aim.verdict {
                Verdict::Met => "met    ",
                Verdict::NotMet => "NOT MET",
                Verdict::NotMeasured => "n/a    ",
            };
            println!("  {mark} {}: {} ({})", s.name, aim.statement, aim.measured);
        }
    }
    for f in &run.failures {
        println!("  FAILED {}: {}", f.scenario, f.error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_named_scenarios_in_order_and_rejects_unknown_ones() {
        let names = |v: &[&str]| -> Vec<String> { v.iter().map(|s| (*s).to_owned()).collect() };
        let picked = select(scenarios::all(), &names(&["python", "build"])).unwrap();
        let picked: Vec<&str> = picked.iter().map(|s| s.name()).collect();
        assert_eq!(picked, ["build", "python"]);
        assert_eq!(
            select(scenarios::all(), &names(&["all"])).unwrap().len(),
            scenarios::all().len()
        );
        let err = select(scenarios::all(), &names(&["nope"])).err().unwrap();
        assert!(
            err.to_string().contains("unknown scenario \"nope\""),
            "{err}"
        );
    }

    #[test]
    fn the_command_is_quoted_for_a_shell() {
        assert_eq!(shell_quote("--quick"), "--quick");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn earlier_runs_are_cleaned_up_and_live_ones_kept() {
        let work = tempfile::tempdir().unwrap();
        // No process has pid 4294967: the kernel caps pids at 2^22.
        let dead = work.path().join("run-4294967");
        let live = work.path().join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(dead.join("x")).unwrap();
        let run_dir = prepare_work_dir(work.path()).unwrap();
        assert!(!dead.exists());
        assert_eq!(run_dir, live);
        assert!(run_dir.is_dir());
    }
}
