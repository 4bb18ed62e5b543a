//! Transient failures between client and a real registry, injected by a
//! fault proxy: what is retried, what resumes, what fails at once.

use std::time::Duration;

use bytes::Bytes;
use darter_registry::manifest::OCI_MANIFEST;
use darter_registry::{BlobSource, Client, ClientConfig, ErrorKind, PushOutcome, RetryPolicy};
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule, LoopbackServer, response};
use darter_testkit::registry::TestRegistry;

use crate::common::*;

#[tokio::test]
async fn server_errors_and_resets_are_retried() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "flaky/pull");
    let manifest = push_image(&client, &repository, 1).await;
    let tagged = reference(&proxy.host(), "flaky/pull:v1");
    client
        .put_manifest(&tagged, OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();
    let blob = patterned(64 << 10, 2);
    let digest = push_bytes(&client, &repository, &blob).await;

    let cases = [
        Fault::Status(503),
        Fault::Status(500),
        Fault::Status(429),
        Fault::Reset,
        Fault::TruncateBody(100),
    ];
    for fault in cases {
        proxy.clear_log();
        proxy.inject(FaultRule::new(fault.clone()).times(2).method("GET"));
        let fetched = client.get_manifest(&tagged).await.unwrap();
        assert_eq!(fetched.bytes, manifest, "{fault:?}");
        assert_eq!(
            statuses(&proxy, "GET").len(),
            3,
            "{fault:?}: {:?}",
            proxy.requests()
        );

        proxy.inject(FaultRule::new(fault.clone()).times(2).method("GET"));
        let slice = client
            .get_blob_range(&repository, &digest, 1000..30_000)
            .await
            .unwrap();
        assert_eq!(&slice.data[..], &blob[1000..30_000], "{fault:?}");
        assert_eq!(proxy.pending_faults(), 0);
    }
}

#[tokio::test]
async fn persistent_failures_give_up_with_a_retryable_error() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "flaky/down");
    let digest = push_bytes(&client, &repository, b"data").await;
    proxy.clear_log();
    proxy.inject(FaultRule::new(Fault::Status(503)).times(100));
    let err = client
        .get_blob_range(&repository, &digest, 0..2)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.status(), Some(503));
    assert_eq!(err.attempts(), fast_retry().max_attempts);
    assert_eq!(proxy.requests().len(), fast_retry().max_attempts as usize);
    assert!(err.to_string().contains("after 4 attempts"), "{err}");
}

#[tokio::test]
async fn the_operation_deadline_bounds_all_attempts() {
    let (_registry, proxy) = proxied_registry();
    let mut config = config_for(&proxy.host());
    config.retry = RetryPolicy {
        max_attempts: 100,
        operation_deadline: Duration::from_millis(800),
        ..fast_retry()
    };
    let client = Client::new(config).unwrap();
    let repository = repo(&proxy.host(), "flaky/slow");
    proxy.inject(FaultRule::new(Fault::Delay(Duration::from_secs(30))).times(100));
    let started = std::time::Instant::now();
    let err = client
        .blob_size(&repository, &sha256(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::DeadlineExceeded { .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stalled_connection_times_out_and_is_retried() {
    let (_registry, proxy) = proxied_registry();
    let config = ClientConfig {
        read_timeout: Duration::from_millis(300),
        ..config_for(&proxy.host())
    };
    let client = Client::new(config).unwrap();
    let repository = repo(&proxy.host(), "flaky/stall");
    let blob = patterned(100_000, 3);
    let digest = push_bytes(&client, &repository, &blob).await;
    let stall = Fault::StallBody {
        after: 5000,
        duration: Duration::from_secs(20),
    };
    proxy.inject(FaultRule::new(stall).method("GET"));
    let started = std::time::Instant::now();
    let slice = client
        .get_blob_range(&repository, &digest, 0..50_000)
        .await
        .unwrap();
    assert_eq!(&slice.data[..], &blob[..50_000]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn blob_streams_resume_where_they_broke() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "flaky/stream");
    let blob = patterned(3 << 20, 4);
    let digest = push_bytes(&client, &repository, &blob).await;
    proxy.clear_log();
    proxy.inject(FaultRule::new(Fault::TruncateBody(1 << 20)).method("GET"));
    proxy.inject(FaultRule::new(Fault::Reset).method("GET"));
    proxy.inject(FaultRule::new(Fault::TruncateBody(700_000)).method("GET"));

    let streamed = read_blob(&client, &repository, &digest).await;
    assert_eq!(streamed.len(), blob.len());
    assert!(streamed == blob, "resumed stream differs from the blob");
    assert_eq!(
        statuses(&proxy, "GET"),
        [Some(200), None, Some(206), Some(206)]
    );
}

/// Pushes a 3 MiB file blob in 1 MiB chunks while `faults` hit its PATCH
/// requests; checks it reads back identical and returns the proxy (with its
/// request log) and the registry behind it.
async fn chunked_push_through(faults: &[Fault], path: &str) -> (TestRegistry, FaultProxy) {
    let (registry, proxy) = proxied_registry();
    let client = chunking_client_for(&proxy.host());
    let repository = repo(&proxy.host(), path);
    let dir = tempfile::tempdir().unwrap();
    let blob = patterned((3 << 20) + 77, 5);
    let digest = sha256(&blob);
    let source = BlobSource::File(write_file(dir.path(), "blob", &blob));
    for fault in faults {
        proxy.inject(FaultRule::new(fault.clone()).method("PATCH"));
    }

    let outcome = client
        .push_blob(&repository, &digest, &source, None)
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    assert_eq!(proxy.pending_faults(), 0);
    assert_eq!(read_blob(&client, &repository, &digest).await, blob);
    (registry, proxy)
}

#[tokio::test]
async fn chunked_uploads_resume_after_broken_chunks() {
    let faults = [Fault::Status(502), Fault::Reset];
    let (_registry, proxy) = chunked_push_through(&faults, "flaky/upload").await;
    assert_eq!(
        statuses(&proxy, "POST").len(),
        1,
        "resumed in the same session: {:?}",
        proxy.requests()
    );
    assert!(
        statuses(&proxy, "GET").len() >= 2,
        "status queries: {:?}",
        proxy.requests()
    );
}

#[tokio::test]
async fn a_chunked_push_whose_session_is_lost_starts_over() {
    // A chunk cut off mid-body makes distribution drop the session; the
    // push must not resume in it but open a new one.
    let faults = [Fault::CutRequestBody(200_000)];
    let (_registry, proxy) = chunked_push_through(&faults, "flaky/lost").await;
    assert_eq!(statuses(&proxy, "POST").len(), 2, "{:?}", proxy.requests());
}

#[tokio::test]
async fn rerunning_an_interrupted_push_uploads_only_what_is_missing() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "flaky/rerun");
    let blobs: Vec<Bytes> = (0..3)
        .map(|i| Bytes::from(patterned(20_000, 10 + i)))
        .collect();

    // The push dies at the second blob: every upload start fails.
    let first = BlobSource::Bytes(blobs[0].clone());
    assert_eq!(
        client
            .push_blob(&repository, &sha256(&blobs[0]), &first, None)
            .await
            .unwrap(),
        PushOutcome::Uploaded
    );
    proxy.inject(FaultRule::new(Fault::Status(500)).times(100).method("POST"));
    let second = BlobSource::Bytes(blobs[1].clone());
    assert!(
        client
            .push_blob(&repository, &sha256(&blobs[1]), &second, None)
            .await
            .is_err()
    );

    // The registry recovers; the re-run skips what it has.
    proxy.clear_faults();
    proxy.clear_log();
    let mut outcomes = Vec::new();
    for blob in &blobs {
        let source = BlobSource::Bytes(blob.clone());
        outcomes.push(
            client
                .push_blob(&repository, &sha256(blob), &source, None)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        outcomes,
        [
            PushOutcome::AlreadyPresent,
            PushOutcome::Uploaded,
            PushOutcome::Uploaded
        ]
    );
    assert_eq!(statuses(&proxy, "POST").len(), 2, "{:?}", proxy.requests());
    assert_eq!(statuses(&proxy, "HEAD").len(), 3, "{:?}", proxy.requests());
}

#[tokio::test]
async fn connection_refused_is_transient_and_bounded() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = unused.local_addr().unwrap().to_string();
    drop(unused);
    let client = client_for(&host);
    let err = client
        .get_manifest(&reference(&host, "nobody/home:v1"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err.kind(), ErrorKind::Transport { .. }), "{err}");
    assert_eq!(err.attempts(), fast_retry().max_attempts);
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
}

#[tokio::test]
async fn tls_failures_are_final() {
    // A plain-HTTP server where TLS is expected: the handshake fails the
    // same way every time, so it is not retried.
    let server = LoopbackServer::start(|_request| async { response(200, &[], "") });
    let host = server.addr().to_string();
    let config = ClientConfig {
        plain_http: Default::default(),
        ..config_for(&host)
    };
    let client = Client::new(config).unwrap();
    let err = client
        .get_manifest(&reference(&host, "secure/app:v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Transport {
                retryable: false,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.attempts(), 1);
    assert!(err.url().unwrap().starts_with("https://"), "{err}");
}
