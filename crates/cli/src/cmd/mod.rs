//! Subcommand implementations: each turns parsed arguments into library
//! calls and prints the result.

mod build;
mod cache;
mod check;
mod copy;
mod daemon;
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
        Command::Mount(a) => mount::run(&a, &ctx, &config),
        Command::Unmount(a) => daemon::unmount(&a),
        Command::Daemon(a) => daemon::run(&a, &ctx, &config),
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

/// A registry (`""` for layouts), a login (user, password), and whether
/// plain HTTP was asked for.
type ClientKey = (String, Option<(String, String)>, bool);

/// Registry clients for images that arrive at run time (the snapshotter's,
/// the node daemon's): one per registry and login, kept for its connections
/// and tokens. The global `--plain-http` applies to each registry as it
/// comes (the CLI's own stores know only the registries named on the
/// command line).
pub(crate) struct RegistryClients {
    config: darter_registry::ClientConfig,
    plain_http: bool,
    /// Keyed by registry (`""` for layouts) and login.
    stores: std::sync::Mutex<std::collections::HashMap<ClientKey, std::sync::Arc<Stores>>>,
}

impl RegistryClients {
    pub(crate) fn new(config: &crate::config::Config, ctx: &Context) -> Self {
        RegistryClients {
            config: config.client_config(&[], None),
            plain_http: ctx.plain_http(),
            stores: std::sync::Mutex::default(),
        }
    }

    /// The client for `image`'s registry with `login` (user, password),
    /// over plain HTTP if `plain_http` (or `--plain-http`) says so.
    pub(crate) fn stores_for(
        &self,
        image: &ImageRef,
        login: Option<(&str, &str)>,
        plain_http: bool,
    ) -> std::sync::Arc<Stores> {
        let registry = match image {
            ImageRef::Registry(r) => r.registry().to_owned(),
            ImageRef::Layout(_) => String::new(),
        };
        let login = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let mut stores = self
            .stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let plain_http = plain_http || self.plain_http;
        let key = (registry.clone(), login.clone(), plain_http);
        let made = stores.entry(key).or_insert_with(|| {
            let mut config = self.config.clone();
            if plain_http && !registry.is_empty() {
                config = config.with_plain_http(registry.clone());
            }
            if let Some((user, password)) = login {
                config.credentials = config.credentials.clone().with_explicit(
                    &registry,
                    user,
                    darter_registry::Secret::new(password),
                );
            }
            std::sync::Arc::new(Stores::new(config))
        });
        std::sync::Arc::clone(made)
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
        | Command::Unmount(_)
        | Command::Daemon(_)
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
