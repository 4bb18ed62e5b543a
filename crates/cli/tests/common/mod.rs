//! Helpers shared by the integration tests that drive the real `darter`
//! binary: running it hermetically, reading its JSON, looking inside OCI
//! layouts, damaging images on purpose, and kernel EROFS mounts that are
//! undone on drop.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use darter_testkit::compare::{CompareOptions, compare_trees};
use darter_testkit::process::MountGuard;
use serde_json::Value;

/// The binary under test.
pub const DARTER: &str = env!("CARGO_BIN_EXE_darter");

/// Exit status of a Rust panic: never acceptable, whatever the input.
const PANIC_STATUS: i32 = 101;

/// What one run of `darter` did.
pub struct Outcome {
    pub command: String,
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exited with {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.command, self.status, self.stderr, self.stdout
        )
    }
}

impl Outcome {
    /// What the command `command` (as shown in messages) left in `out`.
    pub fn new(command: String, out: &std::process::Output) -> Self {
        Outcome {
            command,
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success (status 0); returns self for reading the output.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.status, Some(0), "expected success: {self:?}");
        self
    }

    /// Asserts that the command failed with `status`, without panicking,
    /// and with an error message on stderr (or, for `check`, stdout).
    #[track_caller]
    pub fn fails_with(self, status: i32) -> Self {
        self.assert_no_panic();
        assert_eq!(self.status, Some(status), "wrong exit status: {self:?}");
        assert!(
            !self.stderr.trim().is_empty() || !self.stdout.trim().is_empty(),
            "failed without saying why: {self:?}"
        );
        self
    }

    /// Asserts a clean refusal: status 1 (error) or 3 (`check` found
    /// damage), never a panic or a signal.
    #[track_caller]
    pub fn refuses(self) -> Self {
        self.assert_no_panic();
        assert!(
            matches!(self.status, Some(1) | Some(3)),
            "expected exit status 1 or 3: {self:?}"
        );
        self
    }

    #[track_caller]
    fn assert_no_panic(&self) {
        assert!(
            self.status.is_some(),
            "killed by a signal (crash): {self:?}"
        );
        assert_ne!(self.status, Some(PANIC_STATUS), "panicked: {self:?}");
        assert!(!self.stderr.contains("panicked"), "panicked: {self:?}");
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// stdout and stderr together, for "the message names X" assertions.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Asserts that the output mentions every one of `needles`.
    #[track_caller]
    pub fn mentions(self, needles: &[&str]) -> Self {
        let text = self.text();
        for needle in needles {
            assert!(
                text.contains(needle),
                "output does not mention {needle:?}: {self:?}"
            );
        }
        self
    }
}

/// Runs `darter ARGS` with no config file, no log filter from the
/// environment and no terminal: the same result whatever the machine.
pub fn darter<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(DARTER);
    cmd.args(args)
        .env("DARTER_CONFIG", "/dev/null")
        .env_remove("DARTER_LOG")
        .env_remove("RUST_BACKTRACE");
    let command = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    Outcome::new(command, &out)
}

/// `oci:LAYOUT:TAG`.
pub fn oci(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// `darter build SOURCE -o IMAGE --json EXTRA...`; returns the report.
#[track_caller]
pub fn build(source: impl AsRef<OsStr>, image: &str, extra: &[&str]) -> Value {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("build"),
        source.as_ref(),
        OsStr::new("-o"),
        OsStr::new(image),
        OsStr::new("--json"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    darter(args).ok().json()
}

/// `darter inspect IMAGE --json`.
#[track_caller]
pub fn inspect(image: &str) -> Value {
    darter(["inspect", image, "--json"]).ok().json()
}

/// `darter check IMAGE`, asserting the image is sound.
#[track_caller]
pub fn check_sound(image: &str) {
    let out = darter(["check", image]).ok();
    assert!(out.stdout.contains(": sound:"), "{out:?}");
}

/// `darter COMMAND IMAGE DIR` (unpack, export).
pub fn darter_to_dir(command: &str, image: &str, dir: &Path) -> Outcome {
    darter([OsStr::new(command), OsStr::new(image), dir.as_os_str()])
}

/// `darter unpack IMAGE DIR`.
#[track_caller]
pub fn unpack(image: &str, dir: &Path) {
    darter_to_dir("unpack", image, dir).ok();
}

/// Compares every property, holes included.
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    compare_trees(expected, actual, &CompareOptions::default()).unwrap();
}

/// Builds `source` into `image`, checks it, unpacks it into `out` and
/// compares the result with `source` exactly. Returns the build report.
#[track_caller]
pub fn round_trip_dir(source: &Path, image: &str, out: &Path, extra: &[&str]) -> Value {
    let report = build(source, image, extra);
    check_sound(image);
    unpack(image, out);
    assert_same_tree(source, out);
    report
}

/// What `darter export` wrote.
#[derive(Debug)]
pub struct Exported {
    pub bootstrap: PathBuf,
    pub devices: Vec<PathBuf>,
}

impl Exported {
    /// `--device=PATH` for each device, in device order.
    pub fn device_args(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| format!("--device={}", d.display()))
            .collect()
    }
}

/// `darter export IMAGE DIR --json`.
#[track_caller]
pub fn export(image: &str, dir: &Path) -> Exported {
    let report = darter([
        OsStr::new("export"),
        OsStr::new(image),
        dir.as_os_str(),
        OsStr::new("--json"),
    ])
    .ok()
    .json();
    let path = |v: &Value| PathBuf::from(v.as_str().expect("a path string"));
    Exported {
        bootstrap: path(&report["bootstrap"]),
        devices: report["devices"]
            .as_array()
            .expect("a device list")
            .iter()
            .map(path)
            .collect(),
    }
}

/// An EROFS image mounted by the kernel from files, unmounted on drop
/// (also when the test fails).
pub struct KernelMount {
    guard: MountGuard,
}

impl KernelMount {
    /// Mounts `exported` read-only at `mountpoint` (created): a file-backed
    /// mount (mount(2) with the bootstrap file as source, no loop device),
    /// each blob's device image named with `device=`.
    pub fn new(exported: &Exported, mountpoint: &Path) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let options: Vec<String> = exported
            .devices
            .iter()
            .map(|d| format!("device={}", d.display()))
            .collect();
        let options = std::ffi::CString::new(options.join(",")).unwrap();
        rustix::mount::mount(
            &exported.bootstrap,
            mountpoint,
            "erofs",
            rustix::mount::MountFlags::RDONLY,
            options.as_c_str(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "mounting {} ({:?}) at {}: {e}",
                exported.bootstrap.display(),
                options,
                mountpoint.display()
            )
        });
        KernelMount {
            guard: MountGuard::new(mountpoint),
        }
    }

    pub fn path(&self) -> &Path {
        self.guard.path()
    }
}

/// The blob files of an OCI layout (name -> bytes), finished uploads only.
pub fn blobs(layout: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = layout.join("blobs/sha256");
    let mut blobs = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !name.starts_with('.') {
            blobs.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
    blobs
}

/// Path of blob `digest` (`sha256:HEX`) in `layout`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

/// The parsed `index.json` of a layout.
pub fn index(layout: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap()
}

/// The manifest descriptor tagged `tag` in `layout`.
pub fn manifest_descriptor(layout: &Path, tag: &str) -> Value {
    index(layout)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))
        .clone()
}

/// The manifest tagged `tag` in `layout`.
pub fn manifest(layout: &Path, tag: &str) -> Value {
    let digest = manifest_descriptor(layout, tag)["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    serde_json::from_slice(&std::fs::read(blob_path(layout, &digest)).unwrap()).unwrap()
}

/// Media type of Darter blob layers.
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.darter.blob.v1";
/// Media type of the bootstrap layer.
pub const BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.darter.bootstrap.v1+zstd";

/// Digests of the data blobs of image `tag`, in device order.
pub fn data_blob_digests(layout: &Path, tag: &str) -> Vec<String> {
    layer_digests(layout, tag, BLOB_MEDIA_TYPE)
}

/// Digest of the stored bootstrap of image `tag`.
pub fn bootstrap_digest(layout: &Path, tag: &str) -> String {
    let mut found = layer_digests(layout, tag, BOOTSTRAP_MEDIA_TYPE);
    assert_eq!(found.len(), 1, "one bootstrap layer");
    found.remove(0)
}

fn layer_digests(layout: &Path, tag: &str, media_type: &str) -> Vec<String> {
    manifest(layout, tag)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == media_type)
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// Inverts every bit of the byte at `offset` of `file`.
pub fn flip_byte(file: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0xff;
    f.write_all_at(&byte, offset).unwrap();
}

/// Cuts `file` to `len` bytes.
pub fn truncate(file: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Deterministic incompressible bytes (a simple xorshift stream).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` at `path`, creating parent directories.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

/// `cp -a SRC/. DST` (DST created): keeps everything the comparator checks.
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    darter_testkit::process::run(Command::new("cp").arg("-a").arg(src.join(".")).arg(dst));
}

/// A u64 field of inspect/build JSON.
#[track_caller]
pub fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v:#}"))
}

/// Size of a blob's trailer (docs/format.md, section 2.4).
pub const BLOB_TRAILER_SIZE: u64 = 128;

/// One 64-byte chunk record (docs/format.md, section 2.2), the fields the
/// tests look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub compressed_offset: u64,
    pub compressed_size: u32,
    pub size: u32,
    /// 0 none, 1 zstd, 2 lz4.
    pub compression: u8,
}

/// Where a blob's parts are, read from its trailer and chunk table as the
/// format document describes them (independently of the product's code).
#[derive(Clone, Debug)]
pub struct BlobParts {
    pub size: u64,
    pub table_offset: u64,
    pub table_stored_size: u64,
    pub records: Vec<ChunkRecord>,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Reads the trailer and chunk table of the blob file at `path`.
pub fn blob_parts(path: &Path) -> BlobParts {
    let blob = std::fs::read(path).unwrap();
    let trailer = &blob[blob.len() - BLOB_TRAILER_SIZE as usize..];
    assert_eq!(&trailer[..8], b"DARTBLOB", "{}", path.display());
    let table_offset = le_u64(trailer, 32);
    let table_stored_size = le_u64(trailer, 40);
    let table_size = le_u64(trailer, 48);
    let stored = &blob[table_offset as usize..(table_offset + table_stored_size) as usize];
    let table = match trailer[56] {
        0 => stored.to_vec(),
        1 => zstd::bulk::decompress(stored, table_size as usize).unwrap(),
        other => panic!("unknown table compression {other}"),
    };
    assert_eq!(table.len() as u64, table_size);
    let records = table
        .chunks(64)
        .map(|r| ChunkRecord {
            compressed_offset: le_u64(r, 0),
            compressed_size: le_u32(r, 8),
            size: le_u32(r, 16),
            compression: r[28],
        })
        .collect();
    BlobParts {
        size: blob.len() as u64,
        table_offset,
        table_stored_size,
        records,
    }
}
