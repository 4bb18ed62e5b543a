//! What a scenario is, the context it runs in (tools, inputs, scratch
//! space, fresh mounts), and the alternating runner every side-by-side
//! measurement uses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use darter_testkit::fixtures::{self, OciImage};

use crate::inputs;
use crate::machine::LoadMonitor;
use crate::model::ScenarioReport;
use crate::mount::{self, DarterMount, MountTiming};
use crate::tools::Darter;

/// One benchmark scenario: runs its baseline and Darter side by side and
/// reports what it measured. Scenarios that need a registry or containerd
/// set them up themselves, through the same context.
pub trait Scenario {
    /// The name used on the command line.
    fn name(&self) -> &'static str;
    /// A one-line description (`--help`, report headings).
    fn title(&self) -> &'static str;
    /// Runs the scenario.
    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport>;
    /// Whether `--quick all` runs it (not when its input alone takes
    /// longer than a quick run should).
    fn in_quick_runs(&self) -> bool {
        true
    }
}

/// How big the run is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// `--quick`: fewer runs, smaller inputs.
    pub quick: bool,
    /// Side-by-side rounds per measurement.
    pub runs: usize,
    /// Size of the random file for sequential reads.
    pub random_file_bytes: u64,
}

/// Everything scenarios share: the binary under test, inputs (built once
/// per run, or cached across runs), scratch space, the load monitor.
#[derive(Debug)]
pub struct Bench {
    pub darter: Darter,
    pub size: Size,
    pub load: LoadMonitor,
    work: PathBuf,
    python_image: Option<BuiltImage>,
    random_image: Option<(PathBuf, BuiltImage)>,
    counter: AtomicUsize,
}

impl Bench {
    pub fn new(darter: Darter, size: Size, work: PathBuf) -> Bench {
        Bench {
            darter,
            size,
            load: LoadMonitor::start(),
            work,
            python_image: None,
            random_image: None,
            counter: AtomicUsize::new(0),
        }
    }

    /// A fresh directory under the run's work directory, removed (after
    /// detaching anything mounted below it) when dropped.
    pub fn scratch(&self, name: &str) -> anyhow::Result<Scratch> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Scratch::create(self.work.join(format!("{name}-{n}")))
    }

    /// The Debian minbase + python3 root filesystem (cached fixture).
    pub fn python_rootfs(&self) -> anyhow::Result<PathBuf> {
        fixtures::debian_python_rootfs().context("building the debian python3 rootfs fixture")
    }

    /// The same tree as a plain OCI image with gzip layers (cached fixture).
    pub fn python_oci(&self) -> anyhow::Result<OciImage> {
        fixtures::debian_python_oci().context("building the debian python3 OCI fixture")
    }

    /// The python rootfs built into a Darter image with default options
    /// (once per run: the format may have changed since the last run).
    pub fn python_image(&mut self) -> anyhow::Result<BuiltImage> {
        if let Some(image) = &self.python_image {
            return Ok(image.clone());
        }
        let rootfs = self.python_rootfs()?;
        let image = self.build_image(&rootfs, "python")?;
        self.python_image = Some(image.clone());
        Ok(image)
    }

    /// The directory holding one file of random bytes (cached across
    /// runs) and its Darter image (once per run).
    pub fn random_image(&mut self) -> anyhow::Result<(PathBuf, BuiltImage)> {
        if let Some(built) = &self.random_image {
            return Ok(built.clone());
        }
        let tree = inputs::random_file_tree(self.size.random_file_bytes)?;
        let image = self.build_image(&tree, "random")?;
        self.random_image = Some((tree.clone(), image.clone()));
        Ok((tree, image))
    }

    fn build_image(&self, tree: &Path, name: &str) -> anyhow::Result<BuiltImage> {
        let layout = self.work.join("images").join(name);
        let image = BuiltImage {
            reference: format!("oci:{}:bench", layout.display()),
            layout,
        };
        let reference = image.reference.as_str();
        tracing::info!(image = reference, tree = %tree.display(), "building a Darter image");
        self.darter
            .json([
                "build".as_ref(),
                tree.as_os_str(),
                "-o".as_ref(),
                reference.as_ref(),
                "--json".as_ref(),
            ])
            .with_context(|| format!("darter build {} -o {reference}", tree.display()))?;
        Ok(image)
    }

    /// Mounts `image` at a new mountpoint in `scratch` with the chunk
    /// cache in `cache`, or a new empty directory.
    pub fn fresh_mount(
        &self,
        image: &str,
        scratch: &Scratch,
        mode: MountMode,
        cache: Option<&Path>,
    ) -> anyhow::Result<(DarterMount, MountTiming)> {
        let mountpoint = self.fresh_dir(scratch, "mnt")?;
        let cache = match cache {
            Some(dir) => dir.to_path_buf(),
            None => self.fresh_dir(scratch, "cache")?,
        };
        match mode {
            MountMode::Daemon => DarterMount::daemon(&self.darter, image, &mountpoint, &cache),
            MountMode::Foreground => {
                DarterMount::foreground(&self.darter, image, &mountpoint, &cache)
            }
        }
    }

    /// A new empty directory in `scratch`.
    pub fn fresh_dir(&self, scratch: &Scratch, name: &str) -> anyhow::Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = scratch.path().join(format!("{name}-{n}"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

/// How `darter mount` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMode {
    /// `darter mount -d`: returns once the daemon serves.
    Daemon,
    /// `darter mount` as a child of the harness until unmounted.
    Foreground,
}

/// A Darter image the harness built, in an OCI layout of its own.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `oci:LAYOUT:bench`.
    pub reference: String,
    pub layout: PathBuf,
}

/// A directory removed on drop, after detaching mounts below it.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create(path: PathBuf) -> anyhow::Result<Scratch> {
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        mount::unmount_all_under(&self.path);
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %err, "cannot remove scratch directory");
        }
    }
}

/// One side of a side-by-side measurement.
pub type Variant<'a, T> = Box<dyn FnMut() -> anyhow::Result<T> + 'a>;

/// Runs every variant once per round for `rounds` rounds, rotating which
/// one goes first, so that drifting background load hits all alike.
/// Returns each variant's results in round order.
pub fn alternate<T>(rounds: usize, variants: &mut [Variant<'_, T>]) -> anyhow::Result<Vec<Vec<T>>> {
    let n = variants.len();
    let mut results: Vec<Vec<T>> = (0..n).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..rounds {
        for v in rotation(round, n) {
            results[v].push(variants[v]()?);
        }
    }
    Ok(results)
}

/// The order of `n` variants in round `round`: 0..n rotated by `round`.
fn rotation(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (round + i) % n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_which_variant_goes_first() {
        let order: Vec<Vec<usize>> = (0..4).map(|r| rotation(r, 3).collect()).collect();
        assert_eq!(order, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
        let two: Vec<Vec<usize>> = (0..2).map(|r| rotation(r, 2).collect()).collect();
        assert_eq!(two, [[0, 1], [1, 0]]);
    }

    #[test]
    fn alternate_collects_each_variants_results_and_stops_on_error() {
        let log = std::cell::RefCell::new(Vec::new());
        let mut variants: Vec<Variant<'_, char>> = vec![
            Box::new(|| {
                log.borrow_mut().push('a');
                Ok('a')
            }),
            Box::new(|| {
                log.borrow_mut().push('b');
                Ok('b')
            }),
        ];
        let results = alternate(3, &mut variants).unwrap();
        assert_eq!(results, [vec!['a'; 3], vec!['b'; 3]]);
        assert_eq!(*log.borrow(), ['a', 'b', 'b', 'a', 'a', 'b']);

        let mut failing: Vec<Variant<'_, ()>> = vec![Box::new(|| anyhow::bail!("broken"))];
        assert!(alternate(2, &mut failing).is_err());
    }

    #[test]
    fn scratch_directories_are_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(dir.path().join("s")).unwrap();
        std::fs::write(scratch.path().join("f"), b"x").unwrap();
        let path = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!path.exists());
    }
}
