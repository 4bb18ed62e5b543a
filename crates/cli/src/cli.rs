//! Command-line syntax.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Darter: container images that start before they are pulled.
#[derive(Debug, Parser)]
#[command(name = "darter", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (default: $DARTER_CONFIG, then ~/.config/darter/config.toml, then /etc/darter/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace); DARTER_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Talk to the registries named on the command line over plain HTTP (or set
    /// `plain_http = true` under `[registries."HOST:PORT"]` in the config file).
    #[arg(long, global = true)]
    pub plain_http: bool,
    /// Registry user name (with --password-stdin); otherwise ~/.docker/config.json is used.
    #[arg(long, global = true, value_name = "USER", requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long, global = true, requires = "username")]
    pub password_stdin: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a Darter image from a directory or an OCI image.
    Build(BuildArgs),
    /// Show what an image holds: tree, chunks, blobs, dedup.
    Inspect(InspectArgs),
    /// Verify an image completely: digest chain, every chunk, metadata.
    Check(CheckArgs),
    /// Write an image's tree into a directory.
    Unpack(UnpackArgs),
    /// Write an image as plain EROFS (bootstrap + device images) for fsck.erofs and the kernel.
    Export(ExportArgs),
    /// Copy an image between layouts and registries, sending only what the destination lacks.
    Copy(CopyArgs),
    /// Mount an image read-only, fetching only the chunks that are read.
    Mount(MountArgs),
    /// Unmount an image the node daemon serves (`umount DIR` works too).
    Unmount(UnmountArgs),
    /// Run the node daemon until SIGINT or SIGTERM: one process serving every lazy mount of the node (`mount -d` and the snapshotter use it), with one chunk cache and registry client.
    Daemon(DaemonArgs),
    /// Show a mount's live counters.
    Stats(StatsArgs),
    /// Manage the shared chunk cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Serve containerd's snapshots API (a proxy snapshotter) until SIGINT or SIGTERM.
    Snapshotter(SnapshotterArgs),
    /// Run the P2P scheduler (the control plane peers register with) until SIGINT or SIGTERM.
    Scheduler(crate::cmd::p2p::SchedulerArgs),
    /// Run a P2P peer (registry mirror, piece server, piece store), or show one's counters.
    Peer(crate::cmd::p2p::PeerArgs),
    /// Make a Darter image runnable in containerd without downloading its layers.
    Pull(PullArgs),
    /// Show the node's lazy mounts and how often images were pulled in full instead.
    Status(StatusArgs),
}

/// `darter pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image: [docker://]REGISTRY/REPO[:TAG|@DIGEST] (or oci:PATH[:TAG]).
    pub image: String,
    /// containerd's socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,
    /// The containerd snapshotter serving Darter images (a `darter snapshotter`).
    #[arg(long, value_name = "NAME", default_value = "darter")]
    pub snapshotter: String,
    /// The containerd namespace.
    #[arg(short, long, value_name = "NAME", default_value = "default")]
    pub namespace: String,
}

/// `darter snapshotter`.
#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// The unix socket to serve (containerd's `[proxy_plugins.NAME] address`).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/darter/snapshotter.sock"
    )]
    pub socket: PathBuf,
    /// Where snapshots and their metadata live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/darter/snapshotter"
    )]
    pub root: PathBuf,
    /// Also serve Prometheus metrics (`/metrics`) on this TCP address, e.g. 127.0.0.1:9108.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `darter status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The root of the `darter snapshotter` to ask (its status socket is ROOT/status.sock).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/darter/snapshotter",
        conflicts_with = "socket"
    )]
    pub snapshotter_root: PathBuf,
    /// The status socket to ask, instead of the one under --snapshotter-root.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The image to copy.
    pub source: String,
    /// Where to copy it.
    pub destination: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub image: String,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
    /// Chunk cache directory, shared by all mounts (default /var/cache/darter for root, ~/.cache/darter otherwise).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Prefetch: none (default) or all (fill the cache in the background; reads go first).
    #[arg(long, value_name = "MODE")]
    pub prefetch: Option<String>,
    /// Have the node daemon serve the mount (starting `darter daemon` if none answers on --socket) and return once it serves. Without it, this process serves the mount until it is unmounted (the one-off form).
    #[arg(short = 'd', long)]
    pub daemon: bool,
    /// The node daemon's API socket (with -d; default: the daemon of the chunk cache, /run/darter/daemon.sock for root's default cache, else under $XDG_RUNTIME_DIR).
    #[arg(long, value_name = "PATH", requires = "daemon")]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (with -d: if this starts the node daemon).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// FUSE request threads (default 4).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// How the kernel sees the image: fuse (every request goes to the daemon) or erofs (the kernel mounts the image itself and asks the daemon only for file data it has not cached; needs root and Linux 6.12+).
    #[arg(long, value_name = "KIND")]
    pub frontend: Option<String>,
    /// Hand the mount's FUSE device to the keeper listening on SOCKET (the snapshotter's), so the mount outlives this daemon: SIGINT/SIGTERM then end the daemon without unmounting, and reads wait for the next one.
    #[arg(long, value_name = "SOCKET")]
    pub keeper: Option<PathBuf>,
    /// Take over the mount at MOUNTPOINT, whose device the keeper holds, instead of mounting (a restarted daemon).
    #[arg(long, requires = "keeper")]
    pub takeover: bool,
}

/// `darter unmount`.
#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// The node daemon's API socket (default: the one serving the mount).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `darter daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The API socket to serve (mode 0600; default /run/darter/daemon.sock for root, else under $XDG_RUNTIME_DIR).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Chunk cache directory, shared by all mounts (default as for `mount`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Serve Prometheus metrics of every mount at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `darter stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A mountpoint served by `darter mount`.
    pub mountpoint: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Remove least recently used chunks until the cache fits in SIZE (safe while mounts run).
    Gc(CacheGcArgs),
}

/// `darter cache gc`.
#[derive(Debug, Args)]
pub struct CacheGcArgs {
    /// Largest size to keep, e.g. 10G.
    #[arg(long, value_name = "SIZE")]
    pub max_size: String,
    /// Cache directory (default as for `mount`).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A directory, or an OCI/Docker image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub source: String,
    /// Where to write the image: oci:PATH[:TAG] or a registry reference (tag defaults to latest).
    #[arg(short, long, value_name = "IMAGE")]
    pub output: String,
    /// Chunk size: a power of two from 4K to 16M (default 1M).
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
    /// Compression: zstd (default), lz4 or none.
    #[arg(long, value_name = "NAME")]
    pub compressor: Option<String>,
    /// zstd compression level (default 3).
    #[arg(long, value_name = "N")]
    pub level: Option<i32>,
    /// Chunk digest: blake3 (default) or sha256.
    #[arg(long, value_name = "NAME")]
    pub digest: Option<String>,
    /// Pack small chunks into compression frames of up to this size (default 128K).
    #[arg(long, value_name = "SIZE")]
    pub frame_size: Option<String>,
    /// A previous version of the image: chunks it has are referenced, not stored again.
    #[arg(long, value_name = "IMAGE")]
    pub parent: Option<String>,
    /// Platform to convert from a multi-platform source (os/arch[/variant]).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Compression threads (default: all cores).
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub image: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub image: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter unpack`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub image: String,
    /// Target directory (created; must be empty).
    pub dir: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `darter export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image: oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST].
    pub image: String,
    /// Output directory.
    pub dir: PathBuf,
    /// Print the file list as JSON.
    #[arg(long)]
    pub json: bool,
}
