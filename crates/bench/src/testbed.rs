//! What the network scenarios share: the image under test (pluggable: an
//! OCI layout fixture, the command to run in it and what it must print),
//! its preparation on a [`NetBed`] (pushed as plain OCI, converted
//! registry to registry into a Darter image, both outside any timing), a
//! lazy `darter mount` from inside the client's namespace, a writable
//! overlay over it, and the files the workload opens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darter_testkit::fixtures::{self, FixtureError, OciImage};
use darter_testkit::process::MountGuard;

use crate::containerd::{Containerd, Rootfs};
use crate::model::ScenarioReport;
use crate::mount::{MountStats, force_unmount, kill_daemons, node_socket};
use crate::netbed::NetBed;
use crate::opened::{opened_by, resolve_in_root};
use crate::scenario::{Bench, Scenario};
use crate::tools::{self, Darter};

/// Where commands are looked up in the images (Debian's default `PATH`).
const SEARCH_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// How long a daemon may take to exit once its mount is gone.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Darter's default chunk size and zstd level, for estimating how much the
/// files a workload opens weigh compressed.
const ESTIMATE_CHUNK_BYTES: usize = 1 << 20;
const ESTIMATE_ZSTD_LEVEL: i32 = 3;

/// An image the network scenarios start, and the command they run in it.
/// Another image is one more constant (e.g. the AI inference fixture with
/// its workload's `argv` and `expected_stdout`).
#[derive(Debug)]
pub struct ImageUnderTest {
    /// The repository in the test registry: `bench/NAME`.
    pub name: &'static str,
    /// The plain OCI image (a cached fixture).
    pub oci: fn() -> Result<OciImage, FixtureError>,
    /// The same tree unpacked (to see which files the command opens).
    pub rootfs: fn() -> Result<PathBuf, FixtureError>,
    /// The command, looked up in the image's `PATH`.
    pub argv: &'static [&'static str],
    /// Everything it prints on stdout when it works.
    pub expected_stdout: &'static str,
    /// The issue whose aims the cold start checks.
    pub issue: &'static str,
    /// Aims of the AI image: containerd / Darter cold start at least this
    /// much, fetching under this fraction of the image.
    pub large_image_aims: Option<LargeImageAims>,
}

/// Issue 5's cold-start aims for the large image.
#[derive(Debug, Clone, Copy)]
pub struct LargeImageAims {
    pub min_speedup: f64,
    pub max_fetched_fraction: f64,
}

/// Debian minbase + python3, printing 1.
pub const PYTHON: ImageUnderTest = ImageUnderTest {
    name: "python",
    oci: fixtures::debian_python_oci,
    rootfs: fixtures::debian_python_rootfs,
    argv: &["python3", "-c", "print(1)"],
    expected_stdout: "1\n",
    issue: "issue 4",
    large_image_aims: None,
};

/// The AI inference image (python3 + tensorflow-cpu and friends, 2.4 GB),
/// importing tensorflow and summing a tensor.
pub const AI: ImageUnderTest = ImageUnderTest {
    name: "ai",
    oci: fixtures::ai_inference_oci,
    rootfs: fixtures::ai_inference_rootfs,
    argv: fixtures::AI_INFERENCE_WORKLOAD.argv,
    expected_stdout: fixtures::AI_INFERENCE_WORKLOAD.expected_stdout,
    issue: "issue 5",
    large_image_aims: Some(LargeImageAims {
        min_speedup: 10.0,
        max_fetched_fraction: 0.15,
    }),
};

impl ImageUnderTest {
    /// Runs the command in a container on `rootfs` and checks its output;
    /// returns when its first line came.
    pub fn start(&self, containerd: &Containerd, rootfs: Rootfs<'_>) -> anyhow::Result<Instant> {
        containerd.run(rootfs, self.argv, self.expected_stdout)
    }

    /// The command as a shell would show it.
    pub fn command_line(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.contains([' ', '(', ')', '\'']) {
                    format!("'{a}'")
                } else {
                    (*a).to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A scenario that starts an image under test on a [`Testbed`].
#[derive(Debug)]
pub struct ImageScenario {
    pub name: &'static str,
    pub title: &'static str,
    pub image: &'static ImageUnderTest,
    pub run: fn(&ImageScenario, &Bench) -> anyhow::Result<ScenarioReport>,
}

impl Scenario for ImageScenario {
    fn name(&self) -> &'static str {
        self.name
    }

    fn title(&self) -> &'static str {
        self.title
    }

    fn run(&self, bench: &mut Bench) -> anyhow::Result<ScenarioReport> {
        (self.run)(self, bench)
    }

    fn in_quick_runs(&self) -> bool {
        self.image.large_image_aims.is_none()
    }
}

/// A [`NetBed`] whose registry holds the image twice: as plain OCI
/// (`bench/NAME:oci`) and converted to Darter (`bench/NAME:darter`).
#[derive(Debug)]
pub struct Testbed {
    pub bed: NetBed,
    pub image: &'static ImageUnderTest,
    /// `ADDR/bench/NAME:oci`.
    pub oci_ref: String,
    /// `docker://ADDR/bench/NAME:darter`.
    pub darter_ref: String,
    /// Compressed bytes of the OCI image's layers.
    pub oci_layer_bytes: u64,
    /// Bytes of the Darter image's blobs and bootstrap.
    pub darter_image_bytes: u64,
}

impl Testbed {
    /// Starts the bed with the registry's storage below `dir`, pushes the
    /// OCI image and converts it (with the link not limited).
    pub fn prepare(
        darter: &Darter,
        image: &'static ImageUnderTest,
        dir: &Path,
    ) -> anyhow::Result<Testbed> {
        let oci = (image.oci)().with_context(|| format!("building the {} fixture", image.name))?;
        let bed = NetBed::start(dir)?;
        let host = bed.registry_host();
        let oci_ref = format!("{host}/bench/{}:oci", image.name);
        let darter_ref = format!("docker://{host}/bench/{}:darter", image.name);
        tracing::info!(image = oci_ref, "pushing the OCI image");
        let mut skopeo = Command::new("skopeo");
        skopeo
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(oci.skopeo_ref())
            .arg(format!("docker://{oci_ref}"));
        tools::output(&mut bed.client(&skopeo))?;
        tracing::info!(image = darter_ref, "converting it to Darter");
        let mut build = darter.command();
        build.args(["build", &format!("docker://{oci_ref}"), "-o", &darter_ref]);
        build.args(["--plain-http", "--json"]);
        let built = tools::output(&mut bed.client(&build))?;
        let built: serde_json::Value =
            serde_json::from_slice(&built).context("parsing darter build --json")?;
        let darter_image_bytes = built["image_bytes"]
            .as_u64()
            .context("no image_bytes in darter build --json")?;
        Ok(Testbed {
            bed,
            image,
            oci_ref,
            darter_ref,
            oci_layer_bytes: layer_bytes(&oci)?,
            darter_image_bytes,
        })
    }
}

/// The summed sizes of the layers of the first manifest in `image`'s layout.
fn layer_bytes(image: &OciImage) -> anyhow::Result<u64> {
    let read_json = |path: PathBuf| -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let blob = |digest: &serde_json::Value| -> anyhow::Result<PathBuf> {
        let digest = digest.as_str().context("a digest is not a string")?;
        let (algorithm, hex) = digest.split_once(':').context("a digest without ':'")?;
        Ok(image.layout.join("blobs").join(algorithm).join(hex))
    };
    let index = read_json(image.layout.join("index.json"))?;
    let manifest = read_json(blob(&index["manifests"][0]["digest"])?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("a manifest without layers")?;
    Ok(layers.iter().filter_map(|l| l["size"].as_u64()).sum())
}

/// A `darter mount -d` made from inside the client's namespace; detached
/// on drop (its daemon then exits).
#[derive(Debug)]
pub struct ClientMount {
    darter: Darter,
    mountpoint: PathBuf,
    unmounted: bool,
}

impl ClientMount {
    /// `darter mount REFERENCE MOUNTPOINT -d --plain-http --cache CACHE`
    /// with a node daemon of its own (`--socket MOUNTPOINT.sock`),
    /// returning once it serves.
    pub fn mount(
        bed: &NetBed,
        darter: &Darter,
        reference: &str,
        mountpoint: &Path,
        cache: &Path,
    ) -> anyhow::Result<ClientMount> {
        // Guarded before the command runs: a failed mount may still be there.
        let guarded = ClientMount {
            darter: darter.clone(),
            mountpoint: mountpoint.to_path_buf(),
            unmounted: false,
        };
        let mut mount = darter.mount_command();
        mount
            .arg(reference)
            .arg(mountpoint)
            .args(["-d", "--plain-http", "--cache"])
            .arg(cache)
            .arg("--socket")
            .arg(node_socket(mountpoint));
        tools::output(&mut bed.client(&mount))?;
        Ok(guarded)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `darter stats --json`.
    pub fn stats(&self) -> anyhow::Result<MountStats> {
        let value = self.darter.json([
            "stats".as_ref(),
            self.mountpoint.as_os_str(),
            "--json".as_ref(),
        ])?;
        serde_json::from_value(value).context("reading darter stats --json")
    }

    /// Unmounts, stops the node daemon (which outlives its mounts) and
    /// waits for it to exit.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        let pid = self.stats()?.pid;
        self.unmounted = true;
        force_unmount(&self.mountpoint);
        if let Some(daemon) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(daemon, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
        while alive(pid) {
            if Instant::now() > deadline {
                bail!(
                    "the daemon {pid} of {} did not exit",
                    self.mountpoint.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// Whether process `pid` runs (a zombie has exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(
        |stat| !matches!(stat.rsplit_once(") "), Some((_, rest)) if rest.starts_with('Z')),
    )
}

impl Drop for ClientMount {
    fn drop(&mut self) {
        if !self.unmounted {
            force_unmount(&self.mountpoint);
            let socket = node_socket(&self.mountpoint);
            kill_daemons(|arg| arg == socket);
        }
    }
}

/// A writable overlay over a read-only tree; detached on drop.
#[derive(Debug)]
pub struct Overlay {
    merged: PathBuf,
    _mounted: MountGuard,
}

impl Overlay {
    /// Mounts `lower` with upper, work and merged directories created in
    /// `dir` (which must exist).
    pub fn mount(lower: &Path, dir: &Path) -> anyhow::Result<Overlay> {
        let [upper, work, merged] = ["upper", "work", "merged"].map(|d| dir.join(d));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let options = overlay_options(lower, &upper, &work)?;
        rustix::mount::mount(
            "overlay",
            &merged,
            "overlay",
            rustix::mount::MountFlags::empty(),
            Some(options.as_c_str()),
        )
        .with_context(|| {
            format!(
                "mounting an overlay of {} on {}",
                lower.display(),
                merged.display()
            )
        })?;
        Ok(Overlay {
            _mounted: MountGuard::new(&merged),
            merged,
        })
    }

    pub fn path(&self) -> &Path {
        &self.merged
    }
}

/// `lowerdir=..,upperdir=..,workdir=..`; refuses paths the option syntax
/// cannot carry.
fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> anyhow::Result<std::ffi::CString> {
    let mut options = String::new();
    for (key, path) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let path = path
            .to_str()
            .filter(|p| !p.contains([',', ':', '\\', '\0']))
            .with_context(|| format!("{} cannot be an overlay {key}", path.display()))?;
        if !options.is_empty() {
            options.push(',');
        }
        options.push_str(&format!("{key}={path}"));
    }
    std::ffi::CString::new(options).context("overlay options with a NUL")
}

/// The files a workload opens (from `strace` of it chrooted into an
/// overlay of the unpacked image, so the cached tree stays untouched) and
/// what they weigh.
#[derive(Debug, Clone, Copy)]
pub struct OpenedWeight {
    pub files: usize,
    /// Their sizes.
    pub bytes: u64,
    /// Their contents compressed as Darter's builder does by default (zstd
    /// level 3, 1 MiB chunks, each file alone): an estimate, since Darter
    /// images do not tell compressed sizes per file.
    pub zstd_bytes: u64,
}

pub fn opened_weight(image: &ImageUnderTest, dir: &Path) -> anyhow::Result<OpenedWeight> {
    let rootfs = (image.rootfs)().with_context(|| format!("building the {} rootfs", image.name))?;
    let overlay = Overlay::mount(&rootfs, dir)?;
    let root = overlay.path();
    let proc = root.join("proc");
    rustix::mount::mount(
        "proc",
        &proc,
        "proc",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .with_context(|| format!("mounting proc on {}", proc.display()))?;
    let _proc = MountGuard::new(&proc);
    let (program, args) = image.argv.split_first().context("an empty argv")?;
    let program = find_program(root, program)?;
    let path = format!("PATH={}", SEARCH_PATH.join(":"));
    let envs = [("PATH", &path["PATH=".len()..])];
    let opened = opened_by(root, &program, args, &envs, dir)?;
    let mut zstd_bytes = 0;
    for file in &opened.files {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        zstd_bytes +=
            zstd_size(&data).with_context(|| format!("compressing {}", file.display()))?;
    }
    Ok(OpenedWeight {
        files: opened.files.len(),
        bytes: opened.bytes,
        zstd_bytes,
    })
}

/// `program` looked up in the image's `PATH` (absolute names as they are).
fn find_program(root: &Path, program: &str) -> anyhow::Result<String> {
    if program.starts_with('/') {
        return Ok(program.to_owned());
    }
    SEARCH_PATH
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|candidate| resolve_in_root(root, Path::new(candidate)).is_some_and(|p| p.is_file()))
        .with_context(|| format!("no {program} in the PATH of {}", root.display()))
}

/// Bytes of `data` compressed in Darter's default chunks at its default level.
fn zstd_size(data: &[u8]) -> anyhow::Result<u64> {
    let mut total = 0;
    for chunk in data.chunks(ESTIMATE_CHUNK_BYTES) {
        total += zstd::bulk::compress(chunk, ESTIMATE_ZSTD_LEVEL)?.len() as u64;
    }
    Ok(total)
}

/// Seconds between two instants (zero if `to` is earlier).
pub fn seconds(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_refuse_what_they_cannot_carry() {
        let ok = overlay_options(Path::new("/l"), Path::new("/u"), Path::new("/w")).unwrap();
        assert_eq!(ok.to_str().unwrap(), "lowerdir=/l,upperdir=/u,workdir=/w");
        for bad in ["/a,b", "/a:b", "/a\\b"] {
            assert!(overlay_options(Path::new(bad), Path::new("/u"), Path::new("/w")).is_err());
        }
    }

    #[test]
    fn compressed_estimate_shrinks_redundant_data_and_counts_every_chunk() {
        assert_eq!(zstd_size(b"").unwrap(), 0);
        let zeros = vec![0u8; 3 << 20];
        let size = zstd_size(&zeros).unwrap();
        // Three chunks, each a few bytes of frame.
        assert!(size > 3 && size < 3_000, "{size}");
        let mut noise = vec![0u8; 1 << 20];
        fastrand::Rng::with_seed(7).fill(&mut noise);
        assert!(zstd_size(&noise).unwrap() >= 1 << 20);
    }

    #[test]
    fn programs_are_found_in_the_image_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        std::fs::write(dir.path().join("usr/bin/python3.11"), b"x").unwrap();
        std::os::unix::fs::symlink("python3.11", dir.path().join("usr/bin/python3")).unwrap();
        assert_eq!(
            find_program(dir.path(), "python3").unwrap(),
            "/usr/bin/python3"
        );
        assert_eq!(find_program(dir.path(), "/x/y").unwrap(), "/x/y");
        assert!(find_program(dir.path(), "perl").is_err());
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        assert_eq!(PYTHON.command_line(), "python3 -c 'print(1)'");
    }
}
