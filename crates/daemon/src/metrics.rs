//! Prometheus text exposition of a mount's counters.

use std::fmt::Write as _;

use crate::api::StatsReport;

/// Renders `report` in the Prometheus text format (version 0.0.4).
pub(crate) fn render(report: &StatsReport) -> String {
    let s = &report.stats;
    let image = escape(&report.image);
    let mountpoint = escape(&report.mountpoint.display().to_string());
    let rows: [(&str, &str, &str, u64); 9] = [
        (
            "backend_bytes_total",
            "counter",
            "Bytes received from the backend (registry, layout, peer).",
            s.backend_bytes,
        ),
        (
            "backend_requests_total",
            "counter",
            "Requests sent to the backend.",
            s.backend_requests,
        ),
        (
            "cache_hits_total",
            "counter",
            "Chunks served from memory or the disk cache.",
            s.cache_hits,
        ),
        (
            "cache_misses_total",
            "counter",
            "Chunks that had to be fetched.",
            s.cache_misses,
        ),
        (
            "verify_failures_total",
            "counter",
            "Chunks whose digest did not match.",
            s.verify_failures,
        ),
        (
            "prefetch_bytes_total",
            "counter",
            "Bytes fetched by the background prefetcher.",
            s.prefetch_bytes,
        ),
        (
            "read_bytes_total",
            "counter",
            "File bytes returned to readers.",
            s.read_bytes,
        ),
        (
            "decompressed_bytes_total",
            "counter",
            "Bytes produced by decompressing frames.",
            s.decompressed_bytes,
        ),
        (
            "image_bytes",
            "gauge",
            "Compressed bytes of the image's blob data.",
            s.image_bytes,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP darter_{name} {help}");
        let _ = writeln!(out, "# TYPE darter_{name} {kind}");
        let _ = writeln!(
            out,
            "darter_{name}{{image=\"{image}\",mountpoint=\"{mountpoint}\"}} {value}"
        );
    }
    out
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
            stats: darter_cache::StatsSnapshot {
                backend_bytes: 42,
                ..Default::default()
            },
        };
        let text = render(&report);
        assert!(text.contains("# TYPE darter_backend_bytes_total counter\n"));
        assert!(text.contains(
            "darter_backend_bytes_total{image=\"oci:/x:\\\"t\\\"\",mountpoint=\"/mnt\"} 42\n"
        ));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 9);
    }
}
