//! `darter mount`.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_daemon::api;
use darter_daemon::{Frontend, MountOptions};

use crate::cli::MountArgs;
use crate::config::MountConfig;

use super::{Context, Outcome, image_ref};

/// FUSE request threads when not configured.
const DEFAULT_THREADS: usize = 4;
/// How long `-d` waits for the daemon to serve (the bootstrap may come
/// from a slow registry).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(args: &MountArgs, ctx: &Context, config: &MountConfig) -> anyhow::Result<Outcome> {
    let prefetch_all = match args
        .prefetch
        .as_deref()
        .or(config.prefetch.as_deref())
        .unwrap_or("none")
    {
        "none" => false,
        "all" => true,
        other => bail!("--prefetch must be none or all, not {other:?}"),
    };
    let frontend = match args
        .frontend
        .as_deref()
        .or(config.frontend.as_deref())
        .unwrap_or("fuse")
    {
        "fuse" => Frontend::Fuse,
        "erofs" => Frontend::Erofs,
        other => bail!("--frontend must be fuse or erofs, not {other:?}"),
    };
    if let Ok(existing) = api::query_stats(&args.mountpoint) {
        bail!(
            "{} is already served by darter (pid {}, image {})",
            args.mountpoint.display(),
            existing.pid,
            existing.image
        );
    }
    let opts = MountOptions {
        cache_dir: args
            .cache
            .clone()
            .or_else(|| config.cache.clone())
            .unwrap_or_else(darter_cache::default_cache_dir),
        prefetch_all,
        metrics_addr: args.metrics_addr.or(config.metrics_addr),
        threads: args.threads.or(config.threads).unwrap_or(DEFAULT_THREADS),
        store: store_options(&args.image),
        frontend,
        keeper: args.keeper.clone(),
        takeover: args.takeover,
    };
    if args.daemon {
        return detach(args, ctx, &opts, prefetch_all);
    }
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
    darter_daemon::mount(spec, &args.mountpoint, &opts, || {})
        .with_context(|| format!("mounting {} at {}", args.image, args.mountpoint.display()))?;
    Ok(Outcome::Success)
}

/// glibc malloc tuning for the daemon: one arena. By default each thread
/// that frees chunk-sized buffers gets an arena of its own, and glibc keeps
/// their freed memory: peak RSS was 1.6x the live data after reading every
/// file of the python image. (A fixed mmap threshold returns it too, but
/// mapping and unmapping every buffer made cold reads 1.5x slower.)
const DAEMON_MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=1";

/// Runs the mount as a background process and returns once it serves:
/// the same command in the foreground, in its own process group (so the
/// terminal's signals do not reach it), logging to a file.
fn detach(
    args: &MountArgs,
    ctx: &Context,
    opts: &MountOptions,
    prefetch_all: bool,
) -> anyhow::Result<Outcome> {
    let log_path = api::socket_path(&args.mountpoint).with_extension("log");
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A daemon taking over appends to its predecessor's log.
    let log = std::fs::File::options()
        .create(true)
        .write(true)
        .append(opts.takeover)
        .truncate(!opts.takeover)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the darter executable")?;
    let mut cmd = Command::new(exe);
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", DAEMON_MALLOC_TUNABLES);
    }
    cmd.args(ctx.forwarded_flags());
    if let Some((user, _)) = ctx.login() {
        cmd.arg("--username").arg(user).arg("--password-stdin");
    }
    cmd.arg("mount")
        .arg(&args.image)
        .arg(&args.mountpoint)
        .arg("--cache")
        .arg(&opts.cache_dir);
    cmd.arg("--prefetch")
        .arg(if prefetch_all { "all" } else { "none" });
    cmd.arg("--threads").arg(opts.threads.to_string());
    cmd.arg("--frontend").arg(opts.frontend.as_str());
    if let Some(addr) = opts.metrics_addr {
        cmd.arg("--metrics-addr").arg(addr.to_string());
    }
    if let Some(keeper) = &opts.keeper {
        cmd.arg("--keeper").arg(keeper);
    }
    if opts.takeover {
        cmd.arg("--takeover");
    }
    let stdin = if ctx.login().is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    if let (Some((_, password)), Some(mut stdin)) = (ctx.login(), child.stdin.take()) {
        // The password goes through a pipe, never the command line or environment.
        use std::io::Write as _;
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .context("passing the password to the mount daemon")?;
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "the mount daemon exited ({status}) before serving:\n{}",
                log.trim_end()
            );
        }
        if api::query_stats(&args.mountpoint).is_ok_and(|r| r.pid == child.id()) {
            println!(
                "mounted {} at {} (pid {}, log {})",
                args.image,
                args.mountpoint.display(),
                child.id(),
                log_path.display()
            );
            return Ok(Outcome::Success);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the mount daemon did not serve {} within {:?}; see {}",
                display(&args.mountpoint),
                READY_TIMEOUT,
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Chunk store tuning for where the image lives: from a local layout a
/// request costs less than fetching a few hundred KiB more, so frames that
/// follow are fetched along; over a network every extra byte counts.
fn store_options(image: &str) -> darter_cache::StoreOptions {
    let local = matches!(
        darter_remote::ImageRef::parse(image),
        Ok(darter_remote::ImageRef::Layout(_))
    );
    darter_cache::StoreOptions {
        blob_readahead: if local { LOCAL_BLOB_READAHEAD } else { 0 },
        ..darter_cache::StoreOptions::default()
    }
}

/// Compressed bytes fetched along after a miss from a local layout.
const LOCAL_BLOB_READAHEAD: u64 = 512 << 10;
