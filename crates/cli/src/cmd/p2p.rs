//! `darter scheduler` and `darter peer`: P2P blob distribution
//! (`darter-p2p`). Their arguments live here, next to the commands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::output::print_json;
use crate::units::{human, parse_size};

use super::Outcome;

/// `darter scheduler`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SchedulerArgs {
    #[command(subcommand)]
    pub command: Option<SchedulerCommand>,
    #[command(flatten)]
    pub run: SchedulerRunArgs,
}

/// `darter scheduler ...`.
#[derive(Debug, Subcommand)]
pub enum SchedulerCommand {
    /// Show what a running scheduler knows: peers, tasks, decisions.
    Status(SchedulerStatusArgs),
}

/// `darter scheduler` (running one).
#[derive(Debug, Args)]
pub struct SchedulerRunArgs {
    /// Where peers reach the scheduler (gRPC).
    #[arg(long, value_name = "ADDR", required = true)]
    pub listen: Option<SocketAddr>,
    /// The cluster token peers must present.
    #[arg(long, value_name = "FILE", required = true)]
    pub token_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How many peers may fetch one blob from the origin registry at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_origin_per_task: usize,
    /// How many distinct peers must report a peer for bad pieces before no
    /// one is sent to it.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub block_reporters: usize,
}

/// `darter scheduler status`.
#[derive(Debug, Args)]
pub struct SchedulerStatusArgs {
    /// The scheduler's HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub scheduler: String,
    /// The cluster token.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter peer`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PeerArgs {
    #[command(subcommand)]
    pub command: Option<PeerCommand>,
    #[command(flatten)]
    pub run: PeerRunArgs,
}

/// `darter peer ...`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Show a running peer's counters.
    Status(PeerStatusArgs),
}

/// `darter peer` (running one).
#[derive(Debug, Args)]
pub struct PeerRunArgs {
    /// A scheduler's HOST:PORT (repeatable: each blob has one of them,
    /// picked by rendezvous hashing; give every peer the same list).
    #[arg(long = "scheduler", value_name = "ADDR", required = true)]
    pub schedulers: Vec<String>,
    /// The registry this peer mirrors, e.g. https://registry.example.
    #[arg(long, value_name = "URL", required = true)]
    pub upstream: Option<String>,
    /// Where containerd reaches the registry mirror (hosts.toml).
    #[arg(long, value_name = "ADDR", required = true)]
    pub mirror_listen: Option<SocketAddr>,
    /// Where other peers fetch pieces.
    #[arg(long, value_name = "ADDR", required = true)]
    pub piece_listen: Option<SocketAddr>,
    /// The piece server's HOST:PORT as other peers reach it (default: --piece-listen).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// The piece store's directory.
    #[arg(long, value_name = "DIR", required = true)]
    pub store: Option<PathBuf>,
    /// The piece store's size limit; least recently used blobs go first.
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub store_size: String,
    /// The cluster token (shared by the scheduler and all peers).
    #[arg(long, value_name = "FILE", required = true)]
    pub token_file: Option<PathBuf>,
    /// Fetch blobs from the origin registry for the cluster.
    #[arg(long)]
    pub seed: bool,
    /// Concurrent piece uploads offered to other peers.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub upload_capacity: u32,
    /// A location label (repeatable), e.g. zone=eu-1: peers sharing labels are preferred.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// `darter peer status`.
#[derive(Debug, Args)]
pub struct PeerStatusArgs {
    /// The peer's --metrics-addr.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: SocketAddr,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A flag clap enforces (`required`) unless a subcommand is given.
fn missing(flag: &str) -> anyhow::Error {
    anyhow::anyhow!("{flag} is required")
}

pub fn scheduler(args: &SchedulerArgs) -> anyhow::Result<Outcome> {
    match &args.command {
        Some(SchedulerCommand::Status(status)) => scheduler_status(status),
        None => run_scheduler(&args.run),
    }
}

fn run_scheduler(args: &SchedulerRunArgs) -> anyhow::Result<Outcome> {
    let listen = args.listen.ok_or_else(|| missing("--listen"))?;
    let token_file = args
        .token_file
        .as_ref()
        .ok_or_else(|| missing("--token-file"))?;
    let token = darter_p2p::read_token(token_file)?;
    let policy = darter_p2p::SchedulerPolicy {
        max_origin_per_task: args.max_origin_per_task.max(1),
        block_reporters: args.block_reporters.max(1),
        ..Default::default()
    };
    darter_p2p::run_scheduler(listen, args.metrics_addr, token, policy)
        .with_context(|| format!("running the scheduler on {listen}"))?;
    Ok(Outcome::Success)
}

fn scheduler_status(args: &SchedulerStatusArgs) -> anyhow::Result<Outcome> {
    let token = darter_p2p::read_token(&args.token_file)?;
    let status = darter_p2p::scheduler_status(&args.scheduler, &token)?;
    if args.json {
        print_json(&status)?;
        return Ok(Outcome::Success);
    }
    println!("peers ({})", status.peers.len());
    for p in &status.peers {
        let role = if p.seed { "seed" } else { "peer" };
        let health = if p.blocked {
            "blocked".to_owned()
        } else if p.reporters > 0 {
            format!("reported by {}", p.reporters)
        } else {
            "ok".to_owned()
        };
        println!(
            "  {} {role} at {}, uploads {}/{}, {health}",
            p.peer_id, p.data_addr, p.active_uploads, p.upload_capacity
        );
    }
    println!("tasks ({})", status.tasks.len());
    for t in &status.tasks {
        println!(
            "  {} {}: {} holders, {} verified, {} fetching from the origin",
            t.task,
            human(t.size),
            t.holders,
            t.verified,
            t.origin_fetchers
        );
    }
    println!(
        "decisions: {} parents, {} origin, {} wait, {} seed; {} bad-peer reports",
        status.decisions_parents,
        status.decisions_origin,
        status.decisions_wait,
        status.decisions_seed,
        status.bad_peer_reports
    );
    Ok(Outcome::Success)
}

pub fn peer(args: &PeerArgs) -> anyhow::Result<Outcome> {
    match &args.command {
        Some(PeerCommand::Status(status)) => peer_status(status),
        None => run_peer(&args.run),
    }
}

fn run_peer(args: &PeerRunArgs) -> anyhow::Result<Outcome> {
    let labels = args
        .labels
        .iter()
        .map(|label| {
            label
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("label {label:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let token_file = args
        .token_file
        .as_ref()
        .ok_or_else(|| missing("--token-file"))?;
    let config = darter_p2p::PeerConfig {
        schedulers: args.schedulers.clone(),
        upstream: args.upstream.clone().ok_or_else(|| missing("--upstream"))?,
        mirror_listen: args
            .mirror_listen
            .ok_or_else(|| missing("--mirror-listen"))?,
        piece_listen: args.piece_listen.ok_or_else(|| missing("--piece-listen"))?,
        advertise: args.advertise.clone(),
        metrics_listen: args.metrics_addr,
        store: args.store.clone().ok_or_else(|| missing("--store"))?,
        store_limit: parse_size(&args.store_size).map_err(anyhow::Error::msg)?,
        token: darter_p2p::read_token(token_file)?,
        seed: args.seed,
        upload_capacity: args.upload_capacity,
        labels,
    };
    darter_p2p::run_peer(&config).context("running the peer")?;
    Ok(Outcome::Success)
}

fn peer_status(args: &PeerStatusArgs) -> anyhow::Result<Outcome> {
    let status = darter_p2p::PeerStatus::fetch(args.metrics_addr)?;
    if args.json {
        print_json(&status)?;
        return Ok(Outcome::Success);
    }
    println!("from origin       {}", human(status.bytes_from_origin));
    println!("from peers        {}", human(status.bytes_from_peers));
    println!("served to peers   {}", human(status.bytes_served_to_peers));
    println!(
        "served to clients {}",
        human(status.bytes_served_to_clients)
    );
    println!("bad pieces        {}", status.bad_pieces);
    println!("origin fallbacks  {}", status.origin_fallbacks);
    println!("hashed twice      {}", human(status.bytes_rehashed));
    Ok(Outcome::Success)
}
