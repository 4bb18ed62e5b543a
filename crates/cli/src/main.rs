//! The `darter` command: argument parsing, logging, and exit codes. Each
//! subcommand lives in `cmd/`; the work itself lives in the library crates.

#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod config;
mod output;
mod units;

use std::process::ExitCode;

use clap::Parser;

/// Exit status when a check finds problems (the command itself worked).
const EXIT_PROBLEMS: u8 = 3;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.verbose, args.quiet);
    match cmd::run(args) {
        Ok(cmd::Outcome::Success) => ExitCode::SUCCESS,
        Ok(cmd::Outcome::Problems) => ExitCode::from(EXIT_PROBLEMS),
        Err(e) => {
            eprintln!("darter: error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DARTER_LOG")
        // fuser warns about its own unmount racing ours; its errors still show.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},fuser=error")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The error and its causes on one line. Library errors often include
/// their cause in their own message too; a cause already said is skipped.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
