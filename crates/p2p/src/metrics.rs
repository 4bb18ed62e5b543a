//! A peer's counters, in Prometheus' text format at `/metrics`, and
//! [`PeerStatus`], what `darter peer status` reads back from there; the
//! scheduler's gauges and counters, rendered from its status.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Every counter a peer keeps.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_from_origin: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub bytes_served_to_peers: AtomicU64,
    pub bytes_served_to_clients: AtomicU64,
    pub bad_pieces: AtomicU64,
    pub origin_fallbacks: AtomicU64,
    pub bytes_rehashed: AtomicU64,
}

/// (name, help, value) of each counter.
fn counter_table(c: &Counters) -> [(&'static str, &'static str, &AtomicU64); 7] {
    [
        (
            "bytes_from_origin",
            "Blob bytes fetched from the origin registry.",
            &c.bytes_from_origin,
        ),
        (
            "bytes_from_peers",
            "Verified piece bytes fetched from other peers.",
            &c.bytes_from_peers,
        ),
        (
            "bytes_served_to_peers",
            "Piece bytes sent to other peers.",
            &c.bytes_served_to_peers,
        ),
        (
            "bytes_served_to_clients",
            "Blob bytes sent to mirror clients.",
            &c.bytes_served_to_clients,
        ),
        (
            "bad_pieces",
            "Pieces from peers that failed verification.",
            &c.bad_pieces,
        ),
        (
            "origin_fallbacks",
            "Fetches from the origin because no peer could serve in time or the scheduler was down.",
            &c.origin_fallbacks,
        ),
        (
            "bytes_rehashed",
            "Blob bytes read back from the store to hash the whole blob (pieces not checked along the sha256 chain on receipt).",
            &c.bytes_rehashed,
        ),
    ]
}

/// The metric name of a counter.
fn metric_name(counter: &str) -> String {
    format!("darter_p2p_{counter}_total")
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in counter_table(self) {
            let name = metric_name(name);
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// Appends one metric (`darter_scheduler_NAME`) to a Prometheus page.
fn push_metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let name = format!("darter_scheduler_{name}");
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

/// The scheduler's Prometheus page, from its status.
pub fn render_scheduler(status: &crate::proto::StatusResponse) -> String {
    let count = |n: usize| n as u64;
    let sum = |f: fn(&crate::proto::TaskView) -> u32| {
        status.tasks.iter().map(|t| u64::from(f(t))).sum::<u64>()
    };
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "peers",
            "gauge",
            "Registered peers.",
            count(status.peers.len()),
        ),
        (
            "seed_peers",
            "gauge",
            "Registered seed peers.",
            count(status.peers.iter().filter(|p| p.seed).count()),
        ),
        (
            "blocked_peers",
            "gauge",
            "Peers reported by enough peers that no one is sent to them.",
            count(status.peers.iter().filter(|p| p.blocked).count()),
        ),
        (
            "reported_peers",
            "gauge",
            "Peers with bad-piece reports that still count.",
            count(status.peers.iter().filter(|p| p.reporters > 0).count()),
        ),
        (
            "tasks",
            "gauge",
            "Tasks (blobs) known.",
            count(status.tasks.len()),
        ),
        (
            "origin_fetchers",
            "gauge",
            "Peers fetching a task from the origin, summed over tasks.",
            sum(|t| t.origin_fetchers),
        ),
        (
            "verified_holders",
            "gauge",
            "Peers holding a whole verified task, summed over tasks.",
            sum(|t| t.verified),
        ),
        (
            "schedule_parents_total",
            "counter",
            "Schedule answers naming parents.",
            status.decisions_parents,
        ),
        (
            "schedule_origin_total",
            "counter",
            "Schedule answers sending the requester to the origin.",
            status.decisions_origin,
        ),
        (
            "schedule_wait_total",
            "counter",
            "Schedule answers telling the requester to wait.",
            status.decisions_wait,
        ),
        (
            "schedule_seed_total",
            "counter",
            "Schedule answers sending a seed to the origin.",
            status.decisions_seed,
        ),
        (
            "bad_peer_reports_total",
            "counter",
            "Bad-piece reports received.",
            status.bad_peer_reports,
        ),
    ] {
        push_metric(&mut out, name, kind, help, value);
    }
    out
}

/// A peer's counters as `darter peer status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub bytes_from_origin: u64,
    pub bytes_from_peers: u64,
    pub bytes_served_to_peers: u64,
    pub bytes_served_to_clients: u64,
    pub bad_pieces: u64,
    pub origin_fallbacks: u64,
    pub bytes_rehashed: u64,
}

impl PeerStatus {
    /// Reads the counters out of a `/metrics` page; `None` if one is missing.
    pub fn parse(text: &str) -> Option<PeerStatus> {
        let value = |counter: &str| {
            let name = metric_name(counter);
            text.lines().find_map(|line| {
                let (metric, value) = line.split_once(' ')?;
                (metric == name).then(|| value.trim().parse().ok())?
            })
        };
        Some(PeerStatus {
            bytes_from_origin: value("bytes_from_origin")?,
            bytes_from_peers: value("bytes_from_peers")?,
            bytes_served_to_peers: value("bytes_served_to_peers")?,
            bytes_served_to_clients: value("bytes_served_to_clients")?,
            bad_pieces: value("bad_pieces")?,
            origin_fallbacks: value("origin_fallbacks")?,
            bytes_rehashed: value("bytes_rehashed")?,
        })
    }

    /// Fetches `http://ADDR/metrics` from a peer's metrics server.
    pub fn fetch(addr: std::net::SocketAddr) -> Result<PeerStatus, crate::P2pError> {
        let url = format!("http://{addr}/metrics");
        let failed = |reason: String| crate::P2pError::Status {
            url: url.clone(),
            reason,
        };
        let text = crate::runtime()?.block_on(async {
            let response = crate::http::client()?
                .get(&url)
                .send()
                .await
                .map_err(|e| failed(e.to_string()))?;
            if !response.status().is_success() {
                return Err(failed(format!("status {}", response.status())));
            }
            response.text().await.map_err(|e| failed(e.to_string()))
        })?;
        PeerStatus::parse(&text).ok_or_else(|| failed("not a Darter peer's metrics".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_counters_parse_back() {
        let counters = Counters::default();
        Counters::add(&counters.bytes_from_origin, 7);
        Counters::add(&counters.bytes_served_to_clients, 1 << 40);
        Counters::add(&counters.bad_pieces, 2);
        let text = counters.render();
        assert!(text.contains("darter_p2p_bytes_from_peers_total 0\n"));
        let status = PeerStatus::parse(&text).unwrap();
        assert_eq!(status.bytes_from_origin, 7);
        assert_eq!(status.bytes_served_to_clients, 1 << 40);
        assert_eq!(status.bad_pieces, 2);
        assert_eq!(
            PeerStatus::parse("darter_p2p_bytes_from_origin_total 1\n"),
            None
        );
    }
}
