//! `darter mount`: with `-d` through the node daemon (`darter daemon`,
//! started if none answers), else served by this process until unmounted
//! (the one-off, debugging form).

use anyhow::{Context as _, bail};
use darter_daemon::api::{self, Credentials, MountRequest};
use darter_daemon::{Frontend, MountOptions, NodeOptions};

use crate::cli::MountArgs;
use crate::config::{Config, MountConfig};

use super::daemon::{NodeDaemon, absolute, store_options};
use super::{Context, Outcome, image_ref};

/// FUSE request threads when not configured.
const DEFAULT_THREADS: usize = 4;

pub fn run(args: &MountArgs, ctx: &Context, full_config: &Config) -> anyhow::Result<Outcome> {
    let config = &full_config.mount;
    let prefetch_all = prefetch_all(args.prefetch.as_deref(), config)?;
    let frontend = frontend(args.frontend.as_deref(), config)?;
    if let Ok(existing) = api::query_stats(&args.mountpoint) {
        bail!(
            "{} is already served by darter (pid {}, image {})",
            args.mountpoint.display(),
            existing.pid,
            existing.image
        );
    }
    let cache_dir = args
        .cache
        .clone()
        .or_else(|| config.cache.clone())
        .unwrap_or_else(darter_cache::default_cache_dir);
    let metrics_addr = args.metrics_addr.or(config.metrics_addr);
    let threads = threads(args.threads, config);
    if args.daemon {
        let node = NodeDaemon {
            socket: args
                .socket
                .clone()
                .unwrap_or_else(|| api::node_socket_for_cache(&cache_dir)),
            forward: ctx.forwarded_flags().to_vec(),
            cache: Some(cache_dir.clone()),
            metrics: metrics_addr,
        };
        let request = MountRequest {
            image: args.image.clone(),
            mountpoint: absolute(&args.mountpoint)?,
            frontend,
            prefetch_all,
            threads,
            keeper: args.keeper.as_deref().map(absolute).transpose()?,
            takeover: args.takeover,
            credentials: ctx.login().map(|(username, password)| Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            }),
            plain_http: ctx.plain_http() || plain_http_config(full_config, &args.image),
            cache_dir: Some(absolute(&cache_dir)?),
        };
        return through_node_daemon(&node, &request);
    }
    let opts = MountOptions {
        prefetch_all,
        threads,
        store: store_options(&args.image),
        frontend,
        keeper: args.keeper.clone(),
        takeover: args.takeover,
    };
    let reference = image_ref(&args.image)?;
    let m = ctx
        .stores()
        .open_manifest(&reference, None)
        .with_context(|| format!("opening {}", args.image))?;
    let spec = darter_daemon::ImageSpec {
        name: args.image.clone(),
        digest: m.digest,
        manifest: m.manifest,
        blobs: m.blobs,
    };
    let node = NodeOptions {
        cache_dir,
        metrics_addr,
    };
    darter_daemon::mount(spec, &args.mountpoint, &node, &opts)
        .with_context(|| format!("mounting {} at {}", args.image, args.mountpoint.display()))?;
    Ok(Outcome::Success)
}

/// `mount -d`: has the node daemon (started if none answers) serve the
/// mount with its cache; returns once it does. The credentials travel in
/// the request, on the daemon's 0600 socket.
fn through_node_daemon(node: &NodeDaemon, request: &MountRequest) -> anyhow::Result<Outcome> {
    node.ensure()?;
    let report = api::request_mount(&node.socket, request).with_context(|| {
        format!(
            "mounting {} at {} (node daemon log {})",
            request.image,
            request.mountpoint.display(),
            node.log_path().display()
        )
    })?;
    println!(
        "mounted {} at {} (pid {}, log {})",
        request.image,
        request.mountpoint.display(),
        report.pid,
        node.log_path().display()
    );
    Ok(Outcome::Success)
}

/// The frontend `--frontend` (or else the config file) names; FUSE by
/// default.
pub(super) fn frontend(flag: Option<&str>, config: &MountConfig) -> anyhow::Result<Frontend> {
    let name = flag.or(config.frontend.as_deref()).unwrap_or("fuse");
    Frontend::from_name(name)
        .with_context(|| format!("--frontend must be fuse or erofs, not {name:?}"))
}

/// Whether `--prefetch` (or else the config file) says `all`.
pub(super) fn prefetch_all(flag: Option<&str>, config: &MountConfig) -> anyhow::Result<bool> {
    match flag.or(config.prefetch.as_deref()).unwrap_or("none") {
        "none" => Ok(false),
        "all" => Ok(true),
        other => bail!("--prefetch must be none or all, not {other:?}"),
    }
}

/// FUSE request threads: `--threads`, else the config file's.
pub(super) fn threads(flag: Option<usize>, config: &MountConfig) -> usize {
    flag.or(config.threads).unwrap_or(DEFAULT_THREADS)
}

/// Whether the config file says to reach `image`'s registry over plain
/// HTTP.
fn plain_http_config(config: &Config, image: &str) -> bool {
    match darter_remote::ImageRef::parse(image) {
        Ok(darter_remote::ImageRef::Registry(r)) => config
            .registries
            .get(r.registry())
            .is_some_and(|entry| entry.plain_http),
        _ => false,
    }
}
