//! What the benchmarks ran on and how busy the machine was meanwhile.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::model::Samples;

/// The machine and the source the results belong to.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_bytes: u64,
    pub date: String,
    pub git_commit: String,
}

impl Machine {
    /// Reads /proc and asks git about the workspace at `repo`.
    pub fn describe(repo: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            memory_bytes: mem_total(&meminfo).unwrap_or(0),
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            git_commit: git_commit(repo),
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `HEAD`'s hash, noting uncommitted changes (which the results include).
fn git_commit(repo: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return "unknown (not a git checkout)".to_owned();
    };
    let changed = git(&["status", "--porcelain"]).map_or(0, |s| s.lines().count());
    match changed {
        0 => head.trim().to_owned(),
        n => format!("{} plus uncommitted changes in {n} paths", head.trim()),
    }
}

/// The 1-minute load average now.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Samples the load average in the background for the whole run.
#[derive(Debug)]
pub struct LoadMonitor {
    started: Instant,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const LOAD_INTERVAL: Duration = Duration::from_secs(2);

impl LoadMonitor {
    pub fn start() -> LoadMonitor {
        let started = Instant::now();
        let samples = Arc::new(Mutex::new(vec![(0.0, load_average())]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(LOAD_INTERVAL);
                    let at = started.elapsed().as_secs_f64();
                    lock(&samples).push((at, load_average()));
                }
            })
        };
        LoadMonitor {
            started,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Seconds since the monitor started.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// All samples so far: (seconds since start, load average).
    pub fn series(&self) -> Vec<(f64, f64)> {
        lock(&self.samples).clone()
    }

    /// The load averages sampled between `from` and `to` (seconds since
    /// start), plus one taken now if the window is still open.
    pub fn between(&self, from: f64, to: f64) -> Samples {
        let mut values: Vec<f64> = self
            .series()
            .into_iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|(_, load)| load)
            .collect();
        if values.is_empty() {
            values.push(load_average());
        }
        Samples::new(values)
    }
}

impl Drop for LoadMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_model_and_memory() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn load_average_is_read_from_proc() {
        let load = load_average();
        assert!(load.is_finite() && load >= 0.0, "{load}");
    }

    #[test]
    fn monitor_reports_samples_inside_a_window() {
        let monitor = LoadMonitor::start();
        let window = monitor.between(0.0, monitor.now());
        assert!(!window.values.is_empty());
        assert!(window.median().is_finite());
    }
}
