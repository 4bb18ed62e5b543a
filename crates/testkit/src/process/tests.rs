use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// Whether `pid` has exited (gone, or a zombie waiting for its parent).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn wait_until_returns_once_the_condition_holds() {
    let flag = Arc::new(AtomicBool::new(false));
    let setter = {
        let flag = Arc::clone(&flag);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            flag.store(true, Ordering::SeqCst);
        })
    };
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "the flag", || {
        flag.load(Ordering::SeqCst)
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    setter.join().unwrap();
}

#[test]
#[should_panic(expected = "waiting for the impossible")]
fn wait_until_panics_naming_what_it_waited_for() {
    wait_until(Duration::from_millis(50), "the impossible", || false);
}

#[test]
fn child_guard_kills_the_whole_process_group_on_drop() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 1000 & echo $!; wait"])
        .stdout(Stdio::piped());
    let mut guard = ChildGuard::spawn(&mut cmd).unwrap();
    let leader = guard.id();
    let stdout = guard.child().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let grandchild: u32 = line.trim().parse().unwrap();
    assert!(!has_exited(grandchild));
    drop(guard);
    // The leader was reaped by the guard; the grandchild was killed with it.
    assert!(
        std::fs::metadata(format!("/proc/{leader}")).is_err(),
        "leader {leader} not reaped"
    );
    wait_until(Duration::from_secs(10), "the grandchild to die", || {
        has_exited(grandchild)
    });
}

/// Mounts a fresh tmpfs at `target` (created) and guards it.
fn mount_tmpfs(target: &Path) -> MountGuard {
    std::fs::create_dir(target).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(target));
    MountGuard::new(target)
}

#[test]
fn mount_guard_unmounts_and_tolerates_an_already_unmounted_path() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mnt");
    let guard = mount_tmpfs(&target);
    assert_eq!(mounts_under(&target).unwrap(), vec![target.clone()]);
    drop(guard);
    assert_eq!(mounts_under(&target).unwrap(), Vec::<PathBuf>::new());
    // Dropping a guard for a path that is no longer mounted (or gone) is fine.
    drop(MountGuard::new(&target));
    drop(MountGuard::new(dir.path().join("never-existed")));
}

#[test]
fn mounts_under_reads_escaped_mount_points() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("with space\tand tab");
    let guard = mount_tmpfs(&target);
    assert_eq!(mounts_under(dir.path()).unwrap(), vec![target]);
    drop(guard);
    assert!(mounts_under(dir.path()).unwrap().is_empty());
}

#[test]
fn free_port_can_be_bound() {
    let port = free_port();
    assert_ne!(port, 0);
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
}

#[test]
fn run_returns_the_output_of_a_successful_command() {
    let output = run(Command::new("sh").args(["-c", "echo out; echo err >&2"]));
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
}

#[test]
#[should_panic(expected = "exit status: 3\n--- stderr ---\nthe reason it failed\n")]
fn run_panics_with_status_and_stderr() {
    run(Command::new("sh").args(["-c", "echo the reason it failed >&2; exit 3"]));
}

#[test]
fn try_run_reports_a_command_that_cannot_start() {
    let err = try_run(&mut Command::new("/nonexistent/program")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot start \"/nonexistent/program\""),
        "{text}"
    );
    assert!(std::error::Error::source(&err).is_some());
}
