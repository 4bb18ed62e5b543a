//! Subcommand implementations: each turns parsed arguments into library
//! calls and prints the result.

mod build;
mod cache;
mod check;
mod copy;
mod export;
mod inspect;
mod mount;
pub(crate) mod p2p;
mod pull;
mod snapshotter;
mod stats;
mod status;
mod unpack;

use anyhow::Context as _;
use darter_image::{BlobSource, Image};
use darter_remote::{ImageRef, Stores};

use crate::cli::{Cli, Command};

/// How a command ended (errors are `Err`).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All good.
    Success,
    /// The command ran and found problems (e.g. `check`).
    Problems,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let config = crate::config::load(cli.config.as_deref())?;
    let ctx = Context::new(&cli, &config)?;
    match cli.command {
        Command::Build(a) => build::run(&a, &ctx, &config.build, cli.quiet),
        Command::Inspect(a) => inspect::run(&a, &ctx),
        Command::Check(a) => check::run(&a, &ctx),
        Command::Unpack(a) => unpack::run(&a, &ctx),
        Command::Export(a) => export::run(&a, &ctx),
        Command::Copy(a) => copy::run(&a, &ctx),
        Command::Mount(a) => mount::run(&a, &ctx, &config.mount),
        Command::Stats(a) => stats::run(&a),
        Command::Cache(crate::cli::CacheCommand::Gc(a)) => cache::gc(&a, &config.mount),
        Command::Snapshotter(a) => snapshotter::run(&a, &ctx, &config),
        Command::Pull(a) => pull::run(&a, &ctx),
        Command::Status(a) => status::run(&a),
        Command::Scheduler(a) => p2p::scheduler(&a),
        Command::Peer(a) => p2p::peer(&a),
    }
}

/// What every command needs to reach images: the stores, set up from the
/// config file and the global flags.
pub struct Context {
    stores: Stores,
    /// Global flags a re-executed `darter` (mount -d) must get too.
    forward: Vec<std::ffi::OsString>,
    /// Explicit registry login: (registry, user, password).
    login: Option<(String, String, String)>,
}

impl Context {
    fn new(cli: &Cli, config: &crate::config::Config) -> anyhow::Result<Self> {
        let hosts: Vec<String> = image_args(&cli.command)
            .iter()
            .filter_map(|s| match ImageRef::parse(s) {
                Ok(ImageRef::Registry(r)) => Some(r.registry().to_owned()),
                _ => None,
            })
            .collect();
        let plain = if cli.plain_http {
            hosts.clone()
        } else {
            Vec::new()
        };
        let login = match (&cli.username, cli.password_stdin) {
            (Some(user), true) => {
                let mut password = String::new();
                std::io::stdin()
                    .read_line(&mut password)
                    .context("reading the password from standard input")?;
                let password = password.trim_end_matches(['\r', '\n']).to_owned();
                let registry = hosts
                    .first()
                    .cloned()
                    .context("--username needs a registry image on the command line")?;
                Some((registry, user.clone(), password))
            }
            _ => None,
        };
        let mut forward = Vec::new();
        if let Some(path) = &cli.config {
            forward.extend(["--config".into(), path.clone().into_os_string()]);
        }
        if cli.plain_http {
            forward.push("--plain-http".into());
        }
        forward.extend((0..cli.verbose).map(|_| "-v".into()));
        Ok(Context {
            stores: Stores::new(config.client_config(&plain, login.clone())),
            forward,
            login,
        })
    }

    /// Whether `--plain-http` was given.
    pub fn plain_http(&self) -> bool {
        self.forward.iter().any(|flag| flag == "--plain-http")
    }

    /// Global flags to pass on when running `darter` again.
    pub fn forwarded_flags(&self) -> &[std::ffi::OsString] {
        &self.forward
    }

    /// The explicit login (user, password), if one was given.
    pub fn login(&self) -> Option<(&str, &str)> {
        self.login
            .as_ref()
            .map(|(_, u, p)| (u.as_str(), p.as_str()))
    }

    /// The stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Opens a Darter image for reading, wherever it is.
    pub fn open_image(&self, s: &str) -> anyhow::Result<Image<Box<dyn BlobSource>>> {
        let reference = image_ref(s)?;
        self.stores
            .open_image(&reference)
            .with_context(|| format!("opening {s}"))
    }
}

/// Every IMAGE argument of a command (to know which registries it talks to).
fn image_args(command: &Command) -> Vec<&str> {
    match command {
        Command::Build(a) => [
            // A directory source is no image, even when its name parses as
            // one (`rootfs` would be docker.io/library/rootfs and take the
            // login meant for the destination), as `build` itself decides.
            (!std::path::Path::new(&a.source).is_dir()).then_some(a.source.as_str()),
            Some(a.output.as_str()),
            a.parent.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect(),
        Command::Inspect(a) => vec![&a.image],
        Command::Check(a) => vec![&a.image],
        Command::Unpack(a) => vec![&a.image],
        Command::Export(a) => vec![&a.image],
        Command::Copy(a) => vec![&a.source, &a.destination],
        Command::Mount(a) => vec![&a.image],
        Command::Pull(a) => vec![&a.image],
        Command::Stats(_)
        | Command::Status(_)
        | Command::Cache(_)
        | Command::Snapshotter(_)
        | Command::Scheduler(_)
        | Command::Peer(_) => Vec::new(),
    }
}

/// Parses an IMAGE argument.
fn image_ref(s: &str) -> anyhow::Result<ImageRef> {
    ImageRef::parse(s).with_context(|| format!("image {s:?}"))
}
