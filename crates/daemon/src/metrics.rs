//! Prometheus text exposition of a process's mounts: each counter a
//! series per mount, labelled by image and mountpoint.

use std::fmt::Write as _;

use crate::api::StatsReport;

/// Renders `reports`, one per mount, and the number of mounts in the
/// Prometheus text format (version 0.0.4).
pub(crate) fn render(reports: &[StatsReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP darter_daemon_mounts Mounts this process serves."
    );
    let _ = writeln!(out, "# TYPE darter_daemon_mounts gauge");
    let _ = writeln!(out, "darter_daemon_mounts {}", reports.len());
    for (i, (name, kind, help)) in ROWS.iter().enumerate() {
        let _ = writeln!(out, "# HELP darter_{name} {help}");
        let _ = writeln!(out, "# TYPE darter_{name} {kind}");
        for report in reports {
            let image = escape(&report.image);
            let mountpoint = escape(&report.mountpoint.display().to_string());
            let value = values(&report.stats)[i];
            let _ = writeln!(
                out,
                "darter_{name}{{image=\"{image}\",mountpoint=\"{mountpoint}\"}} {value}"
            );
        }
    }
    out
}

/// Each series' name, type and help, in the order of [`values`].
const ROWS: [(&str, &str, &str); 9] = [
    (
        "backend_bytes_total",
        "counter",
        "Bytes received from the backend (registry, layout, peer).",
    ),
    (
        "backend_requests_total",
        "counter",
        "Requests sent to the backend.",
    ),
    (
        "cache_hits_total",
        "counter",
        "Chunks served from memory or the disk cache.",
    ),
    (
        "cache_misses_total",
        "counter",
        "Chunks that had to be fetched.",
    ),
    (
        "verify_failures_total",
        "counter",
        "Chunks whose digest did not match.",
    ),
    (
        "prefetch_bytes_total",
        "counter",
        "Bytes fetched by the background prefetcher.",
    ),
    (
        "read_bytes_total",
        "counter",
        "File bytes returned to readers.",
    ),
    (
        "decompressed_bytes_total",
        "counter",
        "Bytes produced by decompressing frames.",
    ),
    (
        "image_bytes",
        "gauge",
        "Compressed bytes of the image's blob data.",
    ),
];

fn values(s: &darter_cache::StatsSnapshot) -> [u64; 9] {
    [
        s.backend_bytes,
        s.backend_requests,
        s.cache_hits,
        s.cache_misses,
        s.verify_failures,
        s.prefetch_bytes,
        s.read_bytes,
        s.decompressed_bytes,
        s.image_bytes,
    ]
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_labels() {
        let report = StatsReport {
            image: "oci:/x:\"t\"".into(),
            mountpoint: "/mnt".into(),
            pid: 1,
            uptime_seconds: 0.0,
            daemon_socket: None,
            stats: darter_cache::StatsSnapshot {
                backend_bytes: 42,
                ..Default::default()
            },
        };
        let other = StatsReport {
            mountpoint: "/mnt2".into(),
            ..report.clone()
        };
        let text = render(&[report, other]);
        assert!(text.contains("# TYPE darter_backend_bytes_total counter\n"));
        assert_eq!(text.matches("# TYPE darter_backend_bytes_total").count(), 1);
        assert!(text.contains(
            "darter_backend_bytes_total{image=\"oci:/x:\\\"t\\\"\",mountpoint=\"/mnt\"} 42\n"
        ));
        assert!(text.contains("mountpoint=\"/mnt2\"} 42\n"));
        assert!(text.contains("darter_daemon_mounts 2\n"));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 19);
    }
}
