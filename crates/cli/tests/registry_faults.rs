//! Faults between a mount and its registry, injected by a fault proxy in
//! front of a real registry: 5xx answers, connection resets, truncated
//! bodies, stalls and flipped bytes on the chunk reads of a mounted image.
//!
//! Transient faults are retried and the read returns the right bytes.
//! Persistent ones fail the read with EIO within a bounded time (the
//! `[registry] deadline` of the config file) and log a line naming the
//! blob's URL; a wrong byte is never served (every byte read is compared
//! with the original), and the daemon keeps serving: `darter stats`
//! answers, other files read fine, and the failed file reads fine once the
//! registry is healthy again.

// Helpers are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod mount_common;
mod registry_common;

use std::os::unix::fs::FileExt as _;
use std::time::Duration;

use common::{noise, write_file};
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule, RequestRecord};
use darter_testkit::registry::TestRegistry;
use mount_common::{assert_eio, timed};
use registry_common::{
    MountSpec, RegistryMount, RegistrySettings, Scratch, assert_reads, docker, strip_ansi,
};

/// `[registry] deadline` for the mount: how long a chunk read may take,
/// retries included, before it fails.
const DEADLINE: Duration = Duration::from_secs(2);
/// How long a failing read may take in all: the kernel asks the daemon
/// twice for the pages of a failed read (read-ahead, then the read itself),
/// each costing at most the deadline; plus slack for a loaded machine.
const FAILED_READ_BOUND: Duration = Duration::from_secs(8);
/// Each victim file is one chunk bigger than a compression frame, so
/// reading it is exactly one registry request of its own.
const VICTIM_SIZE: usize = 300 << 10;
const VICTIMS: usize = 40;
const REPO: &str = "faults/img";

/// A registry with an image of [`VICTIMS`] files, mounted through a fault
/// proxy; the blob's chunk table is already fetched.
struct Setup {
    // Drop order: the mount first, then the proxy and the registry.
    mount: RegistryMount,
    scratch: Scratch,
    proxy: FaultProxy,
    _registry: TestRegistry,
    /// The data blob's digest.
    blob: String,
    next_victim: usize,
}

impl Setup {
    fn new() -> Self {
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.addr());
        let settings = RegistrySettings {
            deadline: Some(DEADLINE.as_secs()),
            attempts: None,
        };
        let scratch = Scratch::new(&[registry.host(), proxy.host()], settings);
        let tree = scratch.path("tree");
        write_file(&tree.join("warm"), b"read first: fetches the chunk table\n");
        for i in 0..VICTIMS {
            write_file(&tree.join(victim(i)), &noise(i as u64, VICTIM_SIZE));
        }
        let pushed = docker(&registry.host(), &format!("{REPO}:v1"));
        scratch.build(&tree, &pushed, &[]);
        let inspect = scratch.inspect(&pushed);
        let blobs = inspect["blobs"].as_array().unwrap();
        assert_eq!(blobs.len(), 1, "{inspect:#}");
        let blob = blobs[0]["digest"].as_str().unwrap().to_owned();
        let mount = RegistryMount::start(
            &scratch,
            &docker(&proxy.host(), &format!("{REPO}:v1")),
            &scratch.path("mnt"),
            &scratch.path("cache"),
            &MountSpec::default(),
        );
        assert_reads(
            &mount.join("warm"),
            &std::fs::read(tree.join("warm")).unwrap(),
        );
        Setup {
            mount,
            scratch,
            proxy,
            _registry: registry,
            blob,
            next_victim: 0,
        }
    }

    /// The repository the mount reads, through the proxy.
    fn repository(&self) -> String {
        format!("{}/{REPO}", self.proxy.host())
    }

    /// The URL of the data blob, through the proxy.
    fn blob_url(&self) -> String {
        format!("http://{}/v2/{REPO}/blobs/{}", self.proxy.host(), self.blob)
    }

    /// Plans `fault` for the next `times` reads of the data blob.
    fn inject(&self, fault: &Fault, times: usize) {
        self.proxy.inject(
            FaultRule::new(fault.clone())
                .times(times)
                .method("GET")
                .path_contains(&format!("/blobs/{}", self.blob)),
        );
    }

    /// A victim file not read yet.
    fn fresh_victim(&mut self) -> String {
        let name = victim(self.next_victim);
        self.next_victim += 1;
        name
    }

    fn original(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.scratch.path("tree").join(name)).unwrap()
    }

    /// Reads `name` from the mount, asserting it is the original.
    #[track_caller]
    fn assert_reads(&self, name: &str) {
        assert_reads(&self.mount.join(name), &self.original(name));
    }

    /// The daemon's log, without colours.
    fn log(&self) -> String {
        strip_ansi(&self.mount.log())
    }
}

fn victim(i: usize) -> String {
    format!("victims/{i:02}")
}

/// The faults, each as it hits one whole response.
fn faults() -> Vec<Fault> {
    vec![
        Fault::Status(503),
        Fault::Status(500),
        Fault::Reset,
        Fault::TruncateBody(1000),
        Fault::FlipByte(100),
    ]
}

/// (fault applied, status answered) of each request the proxy saw.
fn faulted(log: &[RequestRecord]) -> Vec<(Option<Fault>, Option<u16>)> {
    log.iter().map(|r| (r.fault.clone(), r.status)).collect()
}

#[test]
fn transient_faults_are_retried_and_reads_return_the_right_bytes() {
    let mut setup = Setup::new();
    let stall = Fault::StallBody {
        after: 1000,
        duration: DEADLINE / 4,
    };
    for fault in faults().into_iter().chain([stall]) {
        let before = setup.mount.stats();
        setup.proxy.clear_log();
        // A stall shorter than the deadline only slows the read down: it
        // needs no second try.
        let stalls = matches!(fault, Fault::StallBody { .. });
        let times = if stalls { 1 } else { 2 };
        setup.inject(&fault, times);
        let name = setup.fresh_victim();
        let ((), took) = timed(|| setup.assert_reads(&name));
        let log = setup.proxy.requests();
        assert_eq!(
            setup.proxy.pending_faults(),
            0,
            "{fault:?} did not hit: {log:#?}"
        );
        let tries = if stalls { 1 } else { times + 1 };
        assert_eq!(log.len(), tries, "{fault:?}: {:?}", faulted(&log));
        assert_eq!(log.last().unwrap().status, Some(206), "{fault:?}");
        let after = setup.mount.stats();
        let corrupt = u64::from(matches!(fault, Fault::FlipByte(_))) * 2;
        assert_eq!(
            after.verify_failures - before.verify_failures,
            corrupt,
            "{fault:?}: {after:?}"
        );
        eprintln!("{fault:?} {times}x: read right after {took:?}");
    }
    let log = setup.log();
    assert!(!log.contains("read failed"), "{log}");
}

#[test]
fn persistent_faults_fail_reads_with_eio_in_bounded_time_and_the_daemon_goes_on() {
    let mut setup = Setup::new();
    let stall = Fault::StallBody {
        after: 1000,
        duration: DEADLINE * 30,
    };
    for fault in faults().into_iter().chain([stall]) {
        setup.proxy.clear_log();
        let logged_before = setup.log().len();
        setup.inject(&fault, 1000);
        let name = setup.fresh_victim();
        let path = setup.mount.join(&name);
        let (result, took) = timed(|| std::fs::read(&path));
        assert_eio(result, &format!("{fault:?} on {name}"));
        assert!(
            took <= FAILED_READ_BOUND,
            "{fault:?}: the failing read took {took:?}"
        );
        let tries = setup.proxy.requests().len();
        setup.proxy.clear_faults();

        let log = setup.log()[logged_before..].to_owned();
        // A failed request names its URL; bytes that arrived but failed
        // verification name the repository they came from and the blob.
        let names = match fault {
            Fault::FlipByte(_) => vec![setup.repository(), setup.blob.clone()],
            _ => vec![setup.blob_url()],
        };
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && names.iter().all(|n| l.contains(n))),
            "{fault:?}: no error line names {names:?}:\n{log}"
        );
        let stats = setup.mount.stats();
        eprintln!(
            "{fault:?} always: EIO after {took:?} and {tries} requests; {} verify failures so far",
            stats.verify_failures
        );
        let healthy = setup.fresh_victim();
        setup.assert_reads(&healthy);
        setup.assert_reads(&name);
    }
}

/// Never a wrong byte: with a flipped byte in every answer, no read of any
/// file returns data, and each fails with EIO.
#[test]
fn flipped_bytes_are_never_served() {
    let mut setup = Setup::new();
    setup.inject(&Fault::FlipByte(VICTIM_SIZE as u64 / 2), 10_000);
    let victims: Vec<String> = (0..5).map(|_| setup.fresh_victim()).collect();
    for name in &victims {
        let file = std::fs::File::open(setup.mount.join(name)).unwrap();
        for offset in [0, VICTIM_SIZE as u64 / 2, VICTIM_SIZE as u64 - 1] {
            let mut byte = [0u8];
            assert_eio(
                file.read_exact_at(&mut byte, offset),
                &format!("{name} at {offset}"),
            );
        }
    }
    let stats = setup.mount.stats();
    assert!(stats.verify_failures >= 5 * 3, "{stats:?}");
    // Nothing damaged was cached: once the link is clean, all read right.
    setup.proxy.clear_faults();
    for name in &victims {
        setup.assert_reads(name);
    }
}

/// One read stalled by the registry holds up nothing else: other files
/// read at once while it waits.
#[test]
fn a_stalled_read_does_not_hold_up_other_reads() {
    let mut setup = Setup::new();
    let stalled = setup.fresh_victim();
    let healthy = setup.fresh_victim();
    setup.inject(
        &Fault::StallBody {
            after: 1000,
            duration: DEADLINE * 30,
        },
        1,
    );
    std::thread::scope(|s| {
        let path = setup.mount.join(&stalled);
        let waiting = s.spawn(move || std::fs::read(path));
        darter_testkit::process::wait_until(
            Duration::from_secs(10),
            "the stalled request to reach the proxy",
            || setup.proxy.pending_faults() == 0,
        );
        let ((), took) = timed(|| setup.assert_reads(&healthy));
        assert!(
            took < DEADLINE,
            "a read waited {took:?} behind a stalled one"
        );
        assert!(!waiting.is_finished(), "the stalled read was not stalled");
        // Whatever the stalled read ends with, it is never wrong bytes.
        if let Ok(bytes) = waiting.join().unwrap() {
            assert!(bytes == setup.original(&stalled), "wrong bytes served");
        }
    });
    setup.mount.stats();
}
