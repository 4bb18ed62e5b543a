//! Streaming uploads (blobs pushed while produced, digest known at the end)
//! against a real registry, directly and behind a fault proxy.

use std::time::{Duration, Instant};

use bytes::Bytes;
use darter_registry::{
    Client, ClientConfig, ErrorKind, PushOutcome, Repository, RetryPolicy, StreamingUpload,
    UploadCheckpoint,
};
use darter_testkit::faultproxy::{Fault, FaultProxy, FaultRule};
use darter_testkit::registry::TestRegistry;

use crate::common::*;

const MIB: usize = 1 << 20;

/// Appends `data` in pieces cycling through `sizes`, checking the
/// acknowledged count after each; returns the piece sizes used.
async fn append_in_pieces(
    upload: &mut StreamingUpload,
    data: &Bytes,
    sizes: &[usize],
) -> Vec<usize> {
    let mut pieces = Vec::new();
    let mut offset = 0;
    for &size in sizes.iter().cycle() {
        if offset == data.len() {
            break;
        }
        let end = (offset + size).min(data.len());
        upload.append(data.slice(offset..end)).await.unwrap();
        assert_eq!(upload.uploaded(), end as u64);
        pieces.push(end - offset);
        offset = end;
    }
    pieces
}

/// Sizes of the uploaded-bytes files of `repository`'s upload sessions
/// in the registry's storage.
fn session_data_sizes(registry: &TestRegistry, repository: &str) -> Vec<u64> {
    let dir = registry
        .storage_dir()
        .join("docker/registry/v2/repositories")
        .join(repository)
        .join("_uploads");
    let sessions = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    sessions
        .iter()
        .filter_map(|session| std::fs::metadata(session.join("data")).ok())
        .map(|meta| meta.len())
        .collect()
}

#[tokio::test]
async fn a_blob_streamed_in_odd_pieces_reads_back_identical() {
    let (_registry, proxy) = proxied_registry();
    let client = chunking_client_for(&proxy.host());
    let repository = repo(&proxy.host(), "stream/pieces");
    let data = Bytes::from(patterned(5 * MIB + 12_345, 20));
    let digest = sha256(&data);

    // A producer task owns the upload (it must be Send). The first piece is
    // one byte: the registry answers `Range: 0-0` for it, as for nothing.
    let producer = {
        let (client, repository, data) = (client.clone(), repository.clone(), data.clone());
        tokio::spawn(async move {
            let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
            let sizes = [1, 300 << 10, (5 * MIB) / 2 + 3, (700 << 10) - 5];
            let pieces = append_in_pieces(&mut upload, &data, &sizes).await;
            (upload.finish(&digest).await.unwrap(), pieces)
        })
    };
    let (outcome, pieces) = producer.await.unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);

    let chunks_per_piece = pieces.iter().map(|len| len.div_ceil(MIB));
    let expected_patches: usize = chunks_per_piece.sum();
    assert!(
        expected_patches > pieces.len(),
        "some piece spans several chunks"
    );
    let log = proxy.requests();
    assert_eq!(
        (
            statuses(&proxy, "POST").len(),
            statuses(&proxy, "PATCH").len(),
            statuses(&proxy, "PUT").len()
        ),
        (1, expected_patches, 1),
        "{log:?}"
    );
    assert!(
        log.iter().all(|r| r.status.is_some_and(|s| s < 300)),
        "{log:?}"
    );
    assert_eq!(
        client.blob_size(&repository, &digest).await.unwrap(),
        Some(data.len() as u64)
    );
    assert!(
        read_blob(&client, &repository, &digest).await == data,
        "read-back differs"
    );
}

#[tokio::test]
async fn an_empty_streamed_blob_is_stored() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "stream/empty");
    let digest = sha256(b"");
    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload.append(Bytes::new()).await.unwrap();
    assert_eq!(upload.uploaded(), 0);
    assert_eq!(upload.finish(&digest).await.unwrap(), PushOutcome::Uploaded);
    assert_eq!(
        client.blob_size(&repository, &digest).await.unwrap(),
        Some(0)
    );
    assert!(read_blob(&client, &repository, &digest).await.is_empty());
}

#[tokio::test]
async fn streaming_a_blob_the_repository_already_has_still_finishes() {
    let registry = TestRegistry::start();
    let client = chunking_client_for(&registry.host());
    let repository = repo(&registry.host(), "stream/again");
    let data = Bytes::from(patterned(MIB + 1000, 21));
    let digest = push_bytes(&client, &repository, &data).await;

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    append_in_pieces(&mut upload, &data, &[400_000]).await;
    assert_eq!(upload.finish(&digest).await.unwrap(), PushOutcome::Uploaded);
    assert!(read_blob(&client, &repository, &digest).await == data);
}

#[tokio::test]
async fn a_wrong_digest_at_finish_is_refused_by_the_registry() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "stream/wrong");
    let data = Bytes::from(patterned(70_000, 22));
    let claimed = sha256(b"something else");

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload.append(data.clone()).await.unwrap();
    let shown = format!("{upload:?}");
    assert!(
        shown.contains("_state=REDACTED") && shown.contains("70000"),
        "{shown}"
    );
    let err = upload.finish(&claimed).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    assert!(err.to_string().contains("stream/wrong"), "{err}");
    assert_eq!(err.digest(), Some(claimed));
    let url = err.url().unwrap();
    assert!(
        url.contains("/blobs/uploads/") && url.contains("digest="),
        "{url}"
    );
    assert!(
        url.contains("_state=REDACTED"),
        "upload state must be redacted: {url}"
    );
    assert_eq!(client.blob_size(&repository, &claimed).await.unwrap(), None);
    assert_eq!(
        client.blob_size(&repository, &sha256(&data)).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn transient_faults_mid_stream_are_survived() {
    let (_registry, proxy) = proxied_registry();
    let client = chunking_client_for(&proxy.host());
    let repository = repo(&proxy.host(), "stream/flaky");
    let data = Bytes::from(patterned(4 * MIB + 777, 23));
    let digest = sha256(&data);
    let (first, second, third) = (MIB + MIB / 2, 3 * MIB, data.len());

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload.append(data.slice(..first)).await.unwrap();
    proxy.inject(FaultRule::new(Fault::Status(503)).method("PATCH"));
    proxy.inject(FaultRule::new(Fault::Reset).method("PATCH"));
    upload.append(data.slice(first..second)).await.unwrap();
    proxy.inject(FaultRule::new(Fault::Reset).method("PATCH"));
    proxy.inject(FaultRule::new(Fault::Status(502)).method("GET"));
    upload.append(data.slice(second..third)).await.unwrap();
    assert_eq!(upload.uploaded(), data.len() as u64);
    assert_eq!(upload.finish(&digest).await.unwrap(), PushOutcome::Uploaded);

    assert_eq!(proxy.pending_faults(), 0);
    let log = proxy.requests();
    assert_eq!(
        statuses(&proxy, "POST").len(),
        1,
        "one session throughout: {log:?}"
    );
    let patch_statuses = statuses(&proxy, "PATCH");
    assert!(
        patch_statuses.contains(&Some(503)) && patch_statuses.contains(&None),
        "{log:?}"
    );
    let status_queries = log
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/uploads/"))
        .count();
    assert_eq!(
        status_queries, 4,
        "one per broken chunk, one retried: {log:?}"
    );
    assert!(
        read_blob(&client, &repository, &digest).await == data,
        "read-back differs"
    );
}

#[tokio::test]
async fn a_persistent_fault_fails_within_the_deadline() {
    let (_registry, proxy) = proxied_registry();
    let deadline = Duration::from_secs(1);
    let config = ClientConfig {
        upload_chunk_size: MIB as u64,
        retry: RetryPolicy {
            max_attempts: 10_000,
            operation_deadline: deadline,
            ..fast_retry()
        },
        ..config_for(&proxy.host())
    };
    let client = Client::new(config).unwrap();
    let repository = repo(&proxy.host(), "stream/down");
    let data = Bytes::from(patterned(3 * MIB, 24));

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload.append(data.slice(..MIB + 5)).await.unwrap();
    proxy.inject(
        FaultRule::new(Fault::Status(503))
            .method("PATCH")
            .times(100_000),
    );
    let started = Instant::now();
    let err = upload.append(data.slice(MIB + 5..)).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < deadline + Duration::from_secs(2), "{elapsed:?}");
    assert!(
        elapsed > deadline / 2,
        "gave up before the deadline: {elapsed:?}"
    );
    // The proxy answers 503 before reading the chunk, so the client sees
    // either the status or the connection closing under its body.
    let refused = err.status() == Some(503) || matches!(err.kind(), ErrorKind::Transport { .. });
    assert!(refused && err.is_retryable(), "{err}");
    assert!(err.attempts() > 2, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("append to blob upload") && text.contains("stream/down"),
        "{text}"
    );
    assert!(err.url().unwrap().contains("/blobs/uploads/"), "{err}");
    assert_eq!(
        upload.uploaded(),
        (MIB + 5) as u64,
        "acknowledged bytes stay counted"
    );

    // The registry may now lack bytes the caller handed over: no way on.
    proxy.clear_faults();
    let again = upload.append(data.slice(..1)).await.unwrap_err();
    assert!(
        matches!(again.kind(), ErrorKind::InvalidRequest(_)),
        "{again}"
    );
    let finish = upload.finish(&sha256(&data)).await.unwrap_err();
    assert!(
        finish.to_string().contains("earlier append failed"),
        "{finish}"
    );
}

#[tokio::test]
async fn a_chunk_cut_mid_body_loses_the_session_and_says_so() {
    // distribution stores the partial chunk, then refuses the session.
    let (_registry, proxy) = proxied_registry();
    let client = chunking_client_for(&proxy.host());
    let repository = repo(&proxy.host(), "stream/cut");
    let data = Bytes::from(patterned(2 * MIB, 25));

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload.append(data.slice(..MIB)).await.unwrap();
    proxy.inject(FaultRule::new(Fault::CutRequestBody(100_000)).method("PATCH"));
    let err = upload.append(data.slice(MIB..)).await.unwrap_err();
    let ErrorKind::UploadSessionLost {
        acknowledged,
        cause,
    } = err.kind()
    else {
        panic!("expected a lost session: {err}");
    };
    assert_eq!(*acknowledged, MIB as u64);
    assert!(
        matches!(**cause, ErrorKind::Status { status: 404, .. }),
        "{err}"
    );
    assert!(err.is_retryable(), "a new upload can succeed: {err}");
    assert!(err.to_string().contains("BLOB_UPLOAD"), "{err}");
    upload.cancel().await;
}

#[tokio::test]
async fn cancel_leaves_no_blob() {
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.addr());
    let client = chunking_client_for(&proxy.host());
    let path = "stream/cancelled";
    let repository: Repository = repo(&proxy.host(), path);
    let data = Bytes::from(patterned(MIB + 300, 26));

    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    append_in_pieces(&mut upload, &data, &[700_000]).await;
    let held = vec![data.len() as u64];
    assert_eq!(session_data_sizes(&registry, path), held);
    upload.cancel().await;

    let deletes: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].status, Some(204), "{deletes:?}");
    assert_eq!(session_data_sizes(&registry, path), Vec::<u64>::new());
    assert_eq!(
        client.blob_size(&repository, &sha256(&data)).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn an_upload_resumed_from_a_checkpoint_by_another_client_completes_the_blob() {
    let (registry, proxy) = proxied_registry();
    let path = "stream/resumed";
    let repository = repo(&proxy.host(), path);
    let data = Bytes::from(patterned(3 * MIB + 4321, 27));
    let digest = sha256(&data);
    let first = 2 * MIB + 17;

    // One client uploads part of the blob and is gone without a word.
    let checkpoint = {
        let client = chunking_client_for(&proxy.host());
        let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
        upload.append(data.slice(..first)).await.unwrap();
        upload.checkpoint()
    };
    assert_eq!(checkpoint.uploaded(), first as u64);
    let shown = format!("{checkpoint:?}");
    assert!(shown.contains("_state=REDACTED"), "{shown}");
    let stored = UploadCheckpoint::from_parts(checkpoint.session_url(), checkpoint.uploaded());
    assert_eq!(stored.as_ref(), Some(&checkpoint));

    proxy.clear_log();
    let client = chunking_client_for(&proxy.host());
    let mut upload = client
        .resume_streaming_upload(&repository, &stored.unwrap())
        .await
        .unwrap()
        .expect("the session is still open");
    assert_eq!(upload.uploaded(), first as u64);
    upload.append(data.slice(first..)).await.unwrap();
    assert_eq!(upload.finish(&digest).await.unwrap(), PushOutcome::Uploaded);

    let log = proxy.requests();
    assert_eq!(statuses(&proxy, "POST").len(), 0, "no new session: {log:?}");
    assert_eq!(statuses(&proxy, "PATCH").len(), 2, "1 MiB chunks: {log:?}");
    assert!(read_blob(&client, &repository, &digest).await == data);
    assert_eq!(session_data_sizes(&registry, path), Vec::<u64>::new());
}

#[tokio::test]
async fn resuming_a_session_the_registry_dropped_finds_nothing() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "stream/dropped");
    let mut upload = client.begin_streaming_upload(&repository).await.unwrap();
    upload
        .append(Bytes::from(patterned(5000, 28)))
        .await
        .unwrap();
    let checkpoint = upload.checkpoint();
    upload.cancel().await;

    let resumed = client
        .resume_streaming_upload(&repository, &checkpoint)
        .await
        .unwrap();
    assert!(resumed.is_none());
}

#[tokio::test]
async fn a_checkpoint_naming_another_host_or_repository_sends_nothing() {
    let registry = TestRegistry::start();
    let elsewhere = FaultProxy::start(registry.addr());
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "stream/mine");
    let foreign = [
        format!(
            "http://{}/v2/stream/mine/blobs/uploads/x?_state=s",
            elsewhere.host()
        ),
        format!("http://{}/v2/stream/other/blobs/uploads/x", registry.host()),
        format!("http://{}/v2/stream/mine/manifests/x", registry.host()),
    ];
    for url in foreign {
        let checkpoint = UploadCheckpoint::from_parts(&url, 10).unwrap();
        let err = client
            .resume_streaming_upload(&repository, &checkpoint)
            .await
            .unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::InvalidRequest(_)), "{err}");
        assert!(!err.to_string().contains("_state=s"), "{err}");
    }
    assert_eq!(elsewhere.requests(), Vec::new());
    for not_a_session in ["", "/v2/stream/mine/blobs/uploads/x", "ftp://h/v2/"] {
        assert_eq!(UploadCheckpoint::from_parts(not_a_session, 1), None);
    }
}
