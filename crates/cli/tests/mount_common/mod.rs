//! Helpers for the tests that mount images with the real `darter` binary
//! through real FUSE: mounts that are unmounted, and daemons that are
//! killed once they serve nothing, when the test ends (also when it
//! fails), the counters `darter stats --json` reports, and where a chunk
//! lives in a blob and in the chunk cache.
//!
//! A test binary using these declares `mod common; mod mount_common;`
//! (the generic helpers for driving `darter` live in `common`).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use darter_testkit::compare::{CompareOptions, compare_trees};
use darter_testkit::process::{ChildGuard, MountGuard, wait_until};
use rustix::process::{Pid, Signal};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::common::{DARTER, darter, num, oci};

/// How long a daemon may take to start serving or to stop.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory for one test, deleted at the end. Declare it before
/// any [`Mounted`] so the mounts go first.
pub struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Self {
        Work {
            dir: tempfile::Builder::new()
                .prefix("darter-mount-test-")
                .tempdir()
                .unwrap(),
        }
    }

    /// `name` inside the scratch directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An empty directory `name` to mount on.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// The test's chunk cache directory.
    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    /// `darter mount IMAGE DIR --cache CACHE EXTRA...` in the foreground on
    /// a new directory `name`, with the test's chunk cache.
    #[track_caller]
    pub fn mount(&self, image: &BuiltImage, name: &str, extra: &[&str]) -> Mounted {
        Mounted::foreground(
            &image.reference,
            &self.mountpoint(name),
            &self.cache(),
            extra,
        )
    }

    /// `darter unpack IMAGE` into a new directory; returns it.
    #[track_caller]
    pub fn unpack(&self, image: &BuiltImage) -> PathBuf {
        let dir = self.path("unpacked");
        crate::common::unpack(&image.reference, &dir);
        dir
    }
}

/// An image built for a test.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `oci:LAYOUT:TAG`.
    pub reference: String,
    pub layout: PathBuf,
    pub tag: String,
    /// `darter inspect --json`.
    pub inspect: Value,
}

impl BuiltImage {
    /// Builds `source` into a new layout at `layout`, tag `t`, with extra
    /// `darter build` options.
    #[track_caller]
    pub fn build(source: &Path, layout: &Path, extra: &[&str]) -> Self {
        let reference = oci(layout, "t");
        crate::common::build(source, &reference, extra);
        let inspect = crate::common::inspect(&reference);
        BuiltImage {
            reference,
            layout: layout.to_owned(),
            tag: "t".into(),
            inspect,
        }
    }

    /// Bytes a mount may fetch besides chunk data: the stored bootstrap
    /// and, for each blob, its chunk table and trailer (everything after
    /// the frames).
    pub fn metadata_bytes(&self) -> u64 {
        metadata_bytes(&self.inspect)
    }

    /// Compressed bytes of all frames (what `image_bytes` reports).
    pub fn stored_bytes(&self) -> u64 {
        num(&self.inspect, "/stored_bytes")
    }

    /// Unique chunks of the image (one cache record each).
    pub fn unique_chunks(&self) -> u64 {
        num(&self.inspect, "/unique_chunks")
    }
}

/// The counters of `darter stats --json`, with their names as documented
/// (deliberately not the daemon's own type: this pins the JSON contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct Counters {
    pub pid: u32,
    pub backend_bytes: u64,
    pub backend_requests: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub verify_failures: u64,
    pub prefetch_bytes: u64,
    pub read_bytes: u64,
    pub decompressed_bytes: u64,
    pub image_bytes: u64,
}

/// `darter stats MOUNTPOINT --json`, or `None` if it fails.
pub fn try_stats(mountpoint: &Path) -> Option<Counters> {
    let out = darter([
        OsStr::new("stats"),
        mountpoint.as_os_str(),
        OsStr::new("--json"),
    ]);
    if out.status != Some(0) {
        return None;
    }
    Some(serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}")))
}

/// Which process serves a mount.
enum Daemon {
    /// `darter mount` in the foreground: our child, in its own process
    /// group, logging to a file of ours.
    Foreground { child: ChildGuard },
    /// `darter mount -d`: the node daemon on `socket`, not our child, which
    /// may serve other mounts too.
    Detached { pid: u32, socket: PathBuf },
}

/// A `darter mount` serving a directory. Dropping it unmounts the directory,
/// gives the daemon a moment to finish cleanly (it removes the mount's API
/// socket) and then kills it (a node daemon only once it serves nothing).
pub struct Mounted {
    mountpoint: PathBuf,
    /// Taken (unmounting) when the mount is dropped.
    unmount: Option<MountGuard>,
    daemon: Daemon,
    log: PathBuf,
}

/// How long a dropped mount's daemon gets to exit by itself.
const EXIT_GRACE: Duration = Duration::from_secs(10);

impl Mounted {
    /// `darter mount IMAGE MOUNTPOINT --cache CACHE EXTRA...` in the
    /// foreground, as our child; returns once it serves.
    #[track_caller]
    pub fn foreground(image: &str, mountpoint: &Path, cache: &Path, extra: &[&str]) -> Self {
        Self::spawn_foreground(
            mount_command(image, mountpoint, cache, extra),
            mountpoint,
            None,
        )
    }

    /// `darter mount -d --socket SOCKET ...`, with the node daemon of the
    /// test's cache ([`node_socket`]): returns once the command has
    /// returned (the daemon serves by then).
    #[track_caller]
    pub fn detached(image: &str, mountpoint: &Path, cache: &Path, extra: &[&str]) -> Self {
        let mut cmd = mount_command(image, mountpoint, cache, extra);
        let socket = node_socket(cache);
        cmd.arg("-d").arg("--socket").arg(&socket);
        Self::run_detached(cmd, mountpoint, &socket, None)
    }

    /// Runs `cmd`, a foreground `darter [FLAGS] mount ...` serving
    /// `mountpoint`, as our child with `stdin` written to it (e.g. a
    /// password) and its log in a file beside the mountpoint; returns once
    /// it serves.
    #[track_caller]
    pub fn spawn_foreground(mut cmd: Command, mountpoint: &Path, stdin: Option<&[u8]>) -> Self {
        let log = log_path_beside(mountpoint);
        cmd.stdin(stdin_for(stdin))
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut child = ChildGuard::spawn(&mut cmd).unwrap();
        feed(child.child().stdin.take(), stdin);
        let pid = child.id();
        let mut mounted = Mounted {
            mountpoint: mountpoint.to_owned(),
            unmount: Some(MountGuard::new(mountpoint)),
            daemon: Daemon::Foreground { child },
            log,
        };
        mounted.wait_serving(pid);
        mounted
    }

    /// Runs `cmd`, a `darter [FLAGS] mount -d --socket SOCKET ...` serving
    /// `mountpoint`, with `stdin` written to it, and asserts that it
    /// returned only once the node daemon served, naming its pid and log.
    #[track_caller]
    pub fn run_detached(
        mut cmd: Command,
        mountpoint: &Path,
        socket: &Path,
        stdin: Option<&[u8]>,
    ) -> Self {
        let guard = MountGuard::new(mountpoint);
        cmd.stdin(stdin_for(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        feed(child.stdin.take(), stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "darter mount -d failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let counters = try_stats(mountpoint).expect("darter mount -d returned before serving");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = socket.with_extension("log");
        assert!(
            stdout.contains(&format!("pid {}", counters.pid))
                && stdout.contains(&log.display().to_string()),
            "mount -d should name the daemon's pid {} and its log {}: {stdout}",
            counters.pid,
            log.display()
        );
        Mounted {
            mountpoint: mountpoint.to_owned(),
            unmount: Some(guard),
            daemon: Daemon::Detached {
                pid: counters.pid,
                socket: socket.to_owned(),
            },
            log,
        }
    }

    #[track_caller]
    fn wait_serving(&mut self, pid: u32) {
        let mountpoint = self.path().to_owned();
        wait_until(DAEMON_TIMEOUT, "the mount daemon to serve", || {
            if let Daemon::Foreground { child } = &mut self.daemon
                && let Some(status) = child.child().try_wait().unwrap()
            {
                panic!(
                    "darter mount exited ({status}) before serving:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            try_stats(&mountpoint).is_some_and(|c| c.pid == pid)
        });
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `path()/rel`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }

    pub fn pid(&self) -> u32 {
        match &self.daemon {
            Daemon::Foreground { child } => child.id(),
            Daemon::Detached { pid, .. } => *pid,
        }
    }

    /// The counters now.
    #[track_caller]
    pub fn stats(&self) -> Counters {
        let c = try_stats(self.path())
            .unwrap_or_else(|| panic!("darter stats failed; log:\n{}", self.log()));
        assert_eq!(c.pid, self.pid(), "stats answered by another daemon");
        c
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// SIGKILLs the daemon and waits until it is gone, leaving its mount
    /// behind (stale); the guard still detaches it at the end.
    pub fn kill(&mut self) {
        self.signal(Signal::KILL);
        wait_until(DAEMON_TIMEOUT, "the killed daemon to go", || {
            self.daemon.exited()
        });
    }

    /// Waits for a foreground daemon to exit by itself.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let Daemon::Foreground { child } = &mut self.daemon else {
            panic!("only a foreground daemon can be waited for");
        };
        let mut status = None;
        wait_until(DAEMON_TIMEOUT, "darter mount to exit", || {
            status = child.child().try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.unmount.take());
        // Not wait_until: a panic while a failed test unwinds would abort.
        let deadline = Instant::now() + EXIT_GRACE;
        while !self.daemon.done_with(&self.mountpoint) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A kernel EROFS mount's devices, if a daemon about to be killed
        // still has them mounted: no stale mount outlives the test.
        let devices = devices_dir(&self.mountpoint);
        drop(MountGuard::new(&devices));
        let _ = std::fs::remove_dir(&devices);
        // Then the daemon field drops, killing what is left.
    }
}

impl Daemon {
    fn exited(&mut self) -> bool {
        match self {
            Daemon::Foreground { child } => !matches!(child.child().try_wait(), Ok(None)),
            Daemon::Detached { pid, .. } => !Path::new(&format!("/proc/{pid}")).exists(),
        }
    }

    /// Whether the daemon no longer serves `mountpoint`: a foreground one
    /// has exited, a node daemon has dropped the mount (or is gone).
    fn done_with(&mut self, mountpoint: &Path) -> bool {
        if self.exited() {
            return true;
        }
        match self {
            Daemon::Foreground { .. } => false,
            Daemon::Detached { socket, .. } => darter_daemon::api::node_status(socket)
                .map_or(true, |s| {
                    s.mounts.iter().all(|m| m.report.mountpoint != mountpoint)
                }),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // ChildGuard kills a foreground daemon itself. A node daemon is
        // killed once it serves nothing (the test's other mounts keep it).
        if let Daemon::Detached { pid, socket } = self {
            let serves =
                darter_daemon::api::node_status(socket).is_ok_and(|s| !s.mounts.is_empty());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if serves {
                return;
            }
            if cmdline.starts_with(DARTER.as_bytes())
                && let Some(pid) = Pid::from_raw(*pid as i32)
            {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
    }
}

/// `darter mount IMAGE MOUNTPOINT --cache CACHE EXTRA...`, hermetic (no
/// config file, no log filter from the environment).
pub fn mount_command(image: &str, mountpoint: &Path, cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(DARTER);
    cmd.arg("mount")
        .arg(image)
        .arg(mountpoint)
        .arg("--cache")
        .arg(cache)
        .args(extra)
        .env("DARTER_CONFIG", "/dev/null")
        .env_remove("DARTER_LOG");
    cmd
}

/// Writes `input`, if any, to a child's stdin and closes it.
fn feed(pipe: Option<ChildStdin>, input: Option<&[u8]>) {
    if let Some(input) = input {
        pipe.expect("stdin is piped").write_all(input).unwrap();
    }
}

/// A pipe if there is something to write, else nothing.
fn stdin_for(input: Option<&[u8]>) -> Stdio {
    if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    }
}

fn log_path_beside(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.file_name().unwrap().to_owned();
    name.push(".log");
    mountpoint.with_file_name(name)
}

/// `darter mount` flags for the kernel EROFS frontend.
pub const KERNEL_EROFS: &[&str] = &["--frontend", "erofs"];

/// Where the daemon serving `mountpoint` through the kernel EROFS frontend
/// mounts its devices (as the daemon names it).
pub fn devices_dir(mountpoint: &Path) -> PathBuf {
    darter_daemon::api::devices_dir(mountpoint)
}

/// The API socket of the daemon serving `mountpoint` (as the daemon names it).
pub fn api_socket(mountpoint: &Path) -> PathBuf {
    darter_daemon::api::socket_path(mountpoint)
}

/// The node daemon socket the tests' `mount -d` use with the chunk cache
/// `cache`: one daemon per test cache, so parallel tests never share one.
pub fn node_socket(cache: &Path) -> PathBuf {
    cache.with_extension("sock")
}

/// Where the node daemon serving `mountpoint` logs: beside its API socket
/// (the `--socket` on its command line, else the default one).
pub fn daemon_log_path(mountpoint: &Path) -> PathBuf {
    let socket = try_stats(mountpoint)
        .and_then(|c| std::fs::read(format!("/proc/{}/cmdline", c.pid)).ok())
        .and_then(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let at = args.iter().position(|a| *a == b"--socket")?;
            Some(PathBuf::from(
                String::from_utf8_lossy(args.get(at + 1)?).into_owned(),
            ))
        })
        .unwrap_or_else(darter_daemon::api::default_node_socket);
    socket.with_extension("log")
}

/// True if `path` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    darter_testkit::process::mounts_under(path)
        .unwrap()
        .iter()
        .any(|m| m == path)
}

/// Asserts that `result` failed with EIO.
#[track_caller]
pub fn assert_eio<T: std::fmt::Debug>(result: io::Result<T>, what: &str) {
    match result {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {}
        other => panic!("{what}: expected EIO, got {other:?}"),
    }
}

/// Compares a mounted tree with the unpacked one. FUSE has no holes
/// (SEEK_HOLE sees only data), so holes are compared as zeros.
#[track_caller]
pub fn assert_mount_matches(expected: &Path, mounted: &Path) {
    let opts = CompareOptions {
        check_holes: false,
        ..CompareOptions::default()
    };
    compare_trees(expected, mounted, &opts).unwrap();
}

/// Writes `files` (relative path, size) into `root`: distinct
/// incompressible bytes per file, so each file's chunks are its own.
pub fn noise_files(root: &Path, files: &[(&str, usize)]) {
    for (i, (name, size)) in files.iter().enumerate() {
        crate::common::write_file(
            &root.join(name),
            &crate::common::noise(1000 + i as u64, *size),
        );
    }
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Where a chunk is stored in an image built with `--digest sha256`, read
/// from the blob's trailer and chunk table (docs/format.md, section 2).
#[derive(Debug, Clone)]
pub struct StoredChunk {
    /// The blob file.
    pub blob: PathBuf,
    /// The blob's OCI digest (`sha256:HEX`).
    pub blob_digest: String,
    /// Index of the chunk's record in the blob's chunk table.
    pub index: usize,
    /// The stored frame holding the chunk: offset and length in the blob.
    pub frame_offset: u64,
    pub frame_len: u64,
    /// 0 none, 1 zstd, 2 lz4.
    pub compression: u8,
}

const TRAILER_LEN: usize = 128;
const RECORD_LEN: usize = 64;
const DIGEST_SHA256: u8 = 2;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Finds the chunk whose bytes are `chunk` in the image `image` (built
/// with `--digest sha256`).
#[track_caller]
pub fn locate_chunk(image: &BuiltImage, chunk: &[u8]) -> StoredChunk {
    let want = Sha256::digest(chunk);
    for blob_digest in crate::common::data_blob_digests(&image.layout, &image.tag) {
        let blob = crate::common::blob_path(&image.layout, &blob_digest);
        let bytes = std::fs::read(&blob).unwrap();
        let trailer = &bytes[bytes.len() - TRAILER_LEN..];
        assert_eq!(&trailer[..8], b"DARTBLOB");
        assert_eq!(
            trailer[57], DIGEST_SHA256,
            "build the image with --digest sha256"
        );
        let (table_offset, stored_len, table_len) = (
            u64_at(trailer, 32),
            u64_at(trailer, 40),
            u64_at(trailer, 48),
        );
        let stored = &bytes[table_offset as usize..(table_offset + stored_len) as usize];
        let table = match trailer[56] {
            0 => stored.to_vec(),
            1 => zstd::bulk::decompress(stored, table_len as usize).unwrap(),
            other => panic!("unknown table compression {other}"),
        };
        let found = table.chunks(RECORD_LEN).position(|r| r[32..64] == want[..]);
        if let Some(index) = found {
            let r = &table[index * RECORD_LEN..][..RECORD_LEN];
            return StoredChunk {
                blob,
                blob_digest,
                index,
                frame_offset: u64_at(r, 0),
                frame_len: u64::from(u32::from_le_bytes(r[8..12].try_into().unwrap())),
                compression: r[28],
            };
        }
    }
    panic!(
        "no chunk with sha256 {} in {}",
        hex::encode(want),
        image.reference
    );
}

/// The bootstrap and every chunk table (with its trailer) of the image
/// `darter inspect --json` described.
pub fn metadata_bytes(inspect: &Value) -> u64 {
    let tables: u64 = inspect["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| num(b, "/size") - num(b, "/data_bytes"))
        .sum();
    num(inspect, "/bootstrap_bytes") + tables
}

/// A chunk record in a pack of the chunk cache, as docs/format.md
/// (section 8) defines them, parsed here independently of `darter-cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedChunk {
    /// The pack file.
    pub pack: PathBuf,
    /// Where the chunk's bytes start in the pack (after the record header).
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// The digest algorithm code (1 blake3, 2 sha256).
    pub algo: u8,
    /// The chunk digest.
    pub digest: [u8; 32],
}

impl CachedChunk {
    /// The chunk's bytes as they are in the pack now.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        File::open(&self.pack)
            .unwrap()
            .read_exact_at(&mut out, self.offset)
            .unwrap();
        out
    }
}

/// Length of a pack record's header (docs/format.md, section 8).
pub const PACK_HEADER_LEN: u64 = 64;
const PACK_MAX_LEN: u64 = 16 << 20;

/// The record at the start of `bytes`, if it is whole and valid: (live,
/// algorithm, digest, data length).
fn pack_record(bytes: &[u8]) -> Option<(bool, u8, [u8; 32], u64)> {
    let h = bytes.get(..PACK_HEADER_LEN as usize)?;
    let live = match &h[..8] {
        b"DARTCHNK" => true,
        b"DARTDEAD" => false,
        _ => return None,
    };
    let valid = h[8] == 1
        && matches!(h[9], 1 | 2)
        && h[10..12] == [0, 0]
        && h[48..56] == [0; 8]
        && Sha256::digest(&h[8..56])[..8] == h[56..64];
    let len = u64::from(u32::from_le_bytes(h[12..16].try_into().unwrap()));
    let whole = (bytes.len() as u64) >= PACK_HEADER_LEN + len;
    (valid && len <= PACK_MAX_LEN && whole)
        .then(|| (live, h[9], h[16..48].try_into().unwrap(), len))
}

/// Every live, whole record of every pack in `cache`: each pack is read up
/// to its first record that is not whole or not valid.
pub fn cached_chunks(cache: &Path) -> Vec<CachedChunk> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache.join("packs")) else {
        return out;
    };
    for entry in entries {
        let pack = entry.unwrap().path();
        if pack.extension() != Some(OsStr::new("pack")) {
            continue;
        }
        // A pack may be removed by gc while we look.
        let Ok(bytes) = std::fs::read(&pack) else {
            continue;
        };
        let mut at = 0u64;
        while let Some((live, algo, digest, len)) = pack_record(&bytes[at as usize..]) {
            if live {
                out.push(CachedChunk {
                    pack: pack.clone(),
                    offset: at + PACK_HEADER_LEN,
                    len,
                    algo,
                    digest,
                });
            }
            at += PACK_HEADER_LEN + len;
        }
    }
    out
}

/// The live cache record of chunk `chunk` (of an image built with
/// `--digest sha256`), if any.
pub fn cached_chunk_location(cache: &Path, chunk: &[u8]) -> Option<CachedChunk> {
    let want: [u8; 32] = Sha256::digest(chunk).into();
    cached_chunks(cache)
        .into_iter()
        .find(|c| c.algo == 2 && c.digest == want)
}

/// Runs `f` and says how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}
