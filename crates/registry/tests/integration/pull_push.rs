//! Pull and push against a real anonymous registry.

use bytes::Bytes;
use darter_registry::manifest::{OCI_INDEX, OCI_MANIFEST};
use darter_registry::{
    BlobRange, BlobSource, Client, ClientConfig, ErrorKind, Platform, PushOutcome, Reference,
};
use darter_testkit::faultproxy::{Fault, FaultRule};
use darter_testkit::registry::TestRegistry;

use crate::common::*;

#[tokio::test]
async fn manifest_and_blob_round_trip() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "test/roundtrip");
    let dir = tempfile::tempdir().unwrap();

    let layer = patterned(300_000, 1);
    let layer_digest = sha256(&layer);
    let layer_file = write_file(dir.path(), "layer", &layer);
    let outcome = client
        .push_blob(
            &repository,
            &layer_digest,
            &BlobSource::File(layer_file),
            None,
        )
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    let config = br#"{"os":"linux"}"#;
    let config_digest = push_bytes(&client, &repository, config).await;
    let manifest = image_manifest(&config_digest, config.len(), &layer_digest, layer.len());

    let tagged = reference(&registry.host(), "test/roundtrip:v1");
    let digest = client
        .put_manifest(&tagged, OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();
    assert_eq!(digest, sha256(&manifest));

    let by_tag = client.get_manifest(&tagged).await.unwrap();
    assert_eq!(
        (
            by_tag.bytes.clone(),
            by_tag.digest,
            by_tag.media_type.as_str()
        ),
        (manifest.clone(), digest, OCI_MANIFEST)
    );
    assert!(!by_tag.is_index());
    let pinned = Reference::with_digest(repository.clone(), digest).unwrap();
    assert_eq!(client.get_manifest(&pinned).await.unwrap(), by_tag);

    assert_eq!(
        client.blob_size(&repository, &layer_digest).await.unwrap(),
        Some(layer.len() as u64)
    );
    let stream = client.get_blob(&repository, &layer_digest).await.unwrap();
    assert_eq!(stream.size(), Some(layer.len() as u64));
    assert_eq!(collect(stream).await.unwrap(), layer);

    let mut reader = client
        .get_blob(&repository, &config_digest)
        .await
        .unwrap()
        .into_reader();
    let mut read_back = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut read_back)
        .await
        .unwrap();
    assert_eq!(read_back, config);
}

#[tokio::test]
async fn missing_things_are_not_found_and_not_retried() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "test/missing");
    let absent = sha256(b"absent");

    assert_eq!(client.blob_size(&repository, &absent).await.unwrap(), None);
    let err = client
        .get_manifest(&reference(&proxy.host(), "test/missing:nope"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(err.attempts(), 1);
    assert!(err.to_string().contains("get manifest"), "{err}");
    assert!(err.to_string().contains("test/missing:nope"), "{err}");
    let err = client.get_blob(&repository, &absent).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.digest(), Some(absent));
    let gets = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(gets, 2, "404s must not be retried: {:?}", proxy.requests());
}

#[tokio::test]
async fn push_skips_blobs_already_present() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "test/dedup");
    let blob = Bytes::from(patterned(50_000, 2));
    let digest = sha256(&blob);
    let source = BlobSource::Bytes(blob);

    assert_eq!(
        client
            .push_blob(&repository, &digest, &source, None)
            .await
            .unwrap(),
        PushOutcome::Uploaded
    );
    proxy.clear_log();
    assert_eq!(
        client
            .push_blob(&repository, &digest, &source, None)
            .await
            .unwrap(),
        PushOutcome::AlreadyPresent
    );
    let methods: Vec<String> = proxy.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(
        methods,
        ["HEAD"],
        "a present blob costs one HEAD and nothing else"
    );
}

#[tokio::test]
async fn mount_blob_links_only_what_the_other_repository_has() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let base = repo(&proxy.host(), "team/base");
    let app = repo(&proxy.host(), "team/app2");
    let blob = patterned(30_000, 7);
    let digest = push_bytes(&client, &base, &blob).await;

    proxy.clear_log();
    assert!(client.mount_blob(&app, &digest, &base).await.unwrap());
    let log = proxy.requests();
    assert!(
        log.iter().all(|r| r.method != "PUT" && r.method != "PATCH"),
        "{log:?}"
    );
    assert_eq!(read_blob(&client, &app, &digest).await, blob);

    // A blob the source repository lacks is not mounted, and the upload
    // session the registry opened instead is closed.
    let missing = sha256(&patterned(10, 8));
    assert!(
        !client
            .mount_blob(&app, &missing, &repo(&proxy.host(), "team/none"))
            .await
            .unwrap()
    );
    assert!(
        proxy.requests().iter().any(|r| r.method == "DELETE"),
        "{:?}",
        proxy.requests()
    );
    // Same repository or another registry: nothing to do.
    assert!(!client.mount_blob(&app, &digest, &app).await.unwrap());
}

#[tokio::test]
async fn cross_repository_mount_links_without_uploading() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let source_repo = repo(&proxy.host(), "team/base");
    let target_repo = repo(&proxy.host(), "team/app");
    let blob = patterned(40_000, 3);
    let digest = push_bytes(&client, &source_repo, &blob).await;
    let source = BlobSource::Bytes(Bytes::from(blob.clone()));

    proxy.clear_log();
    let outcome = client
        .push_blob(&target_repo, &digest, &source, Some(&source_repo))
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);
    let log = proxy.requests();
    assert!(
        log.iter().all(|r| r.method != "PUT" && r.method != "PATCH"),
        "{log:?}"
    );
    assert!(
        log.iter().any(|r| r.method == "POST"
            && r.path.contains("mount=")
            && r.path.contains("from=team%2Fbase")),
        "{log:?}"
    );
    assert_eq!(read_blob(&client, &target_repo, &digest).await, blob);

    // Mounting from a repository without the blob falls back to uploading.
    let other = patterned(1000, 4);
    let other_digest = sha256(&other);
    let outcome = client
        .push_blob(
            &target_repo,
            &other_digest,
            &BlobSource::from(other),
            Some(&repo(&proxy.host(), "team/empty")),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
}

#[tokio::test]
async fn large_blobs_upload_in_chunks_from_a_file() {
    let (_registry, proxy) = proxied_registry();
    let client = chunking_client_for(&proxy.host());
    let repository = repo(&proxy.host(), "test/chunked");
    let dir = tempfile::tempdir().unwrap();
    let blob = patterned((5 << 20) + 12_345, 5);
    let digest = sha256(&blob);
    let path = write_file(dir.path(), "big", &blob);

    let outcome = client
        .push_blob(&repository, &digest, &BlobSource::File(path), None)
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Uploaded);
    let log = proxy.requests();
    let count = |method: &str| log.iter().filter(|r| r.method == method).count();
    assert_eq!(
        (count("POST"), count("PATCH"), count("PUT")),
        (1, 6, 1),
        "{log:?}"
    );
    let uploads = log.iter().filter(|r| r.method != "HEAD");
    assert!(
        uploads.clone().all(|r| r.status.is_some_and(|s| s < 300)),
        "{log:?}"
    );
    assert_eq!(read_blob(&client, &repository, &digest).await, blob);
}

#[tokio::test]
async fn a_wrong_digest_is_refused_by_the_registry() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "test/wrong");
    let claimed = sha256(b"something else");
    let err = client
        .push_blob(
            &repository,
            &claimed,
            &BlobSource::from(b"actual bytes".to_vec()),
            None,
        )
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    assert_eq!(client.blob_size(&repository, &claimed).await.unwrap(), None);
}

#[tokio::test]
async fn range_reads_return_exactly_the_requested_bytes() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "test/ranges");
    let blob = patterned(100_000, 6);
    let digest = push_bytes(&client, &repository, &blob).await;
    let size = blob.len() as u64;

    let cases: Vec<(BlobRange, u64, u64)> = vec![
        ((0..1).into(), 0, 1),
        ((0..4096).into(), 0, 4096),
        ((12_345..54_321).into(), 12_345, 54_321),
        ((size - 1..size).into(), size - 1, size),
        ((0..size).into(), 0, size),
        ((99_000..).into(), 99_000, size),
        (BlobRange::Suffix(10), size - 10, size),
        (BlobRange::Suffix(size + 500), 0, size),
    ];
    for (range, start, end) in cases {
        let slice = client
            .get_blob_range(&repository, &digest, range)
            .await
            .unwrap();
        assert_eq!(slice.offset, start, "{range:?}");
        assert_eq!(slice.blob_size, Some(size), "{range:?}");
        assert_eq!(
            &slice.data[..],
            &blob[start as usize..end as usize],
            "{range:?}"
        );
    }

    let past_end = client
        .get_blob_range(&repository, &digest, size..size + 10)
        .await
        .unwrap_err();
    assert!(
        matches!(past_end.kind(), ErrorKind::RangeNotSatisfiable { blob_size: Some(s), .. } if *s == size),
        "{past_end}"
    );
    assert_eq!(past_end.status(), Some(416));
    let overlapping = client
        .get_blob_range(&repository, &digest, size - 5..size + 5)
        .await
        .unwrap_err();
    assert!(
        matches!(overlapping.kind(), ErrorKind::RangeNotSatisfiable { .. }),
        "{overlapping}"
    );
    let empty = client
        .get_blob_range(&repository, &digest, 7..7)
        .await
        .unwrap_err();
    assert!(
        matches!(empty.kind(), ErrorKind::InvalidRequest(_)),
        "{empty}"
    );
}

#[tokio::test]
async fn an_index_resolves_to_the_wanted_platform() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "test/multiarch");
    let mut entries = Vec::new();
    let mut manifests = Vec::new();
    for (seed, arch, variant) in [
        (10, "amd64", None),
        (11, "arm64", Some("v8")),
        (12, "arm", Some("v7")),
    ] {
        let manifest = push_image(&client, &repository, seed).await;
        let pinned = Reference::with_digest(repository.clone(), sha256(&manifest)).unwrap();
        let digest = client
            .put_manifest(&pinned, OCI_MANIFEST, manifest.clone())
            .await
            .unwrap();
        let variant = variant
            .map(|v| format!(r#","variant":"{v}""#))
            .unwrap_or_default();
        entries.push(format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{},"platform":{{"os":"linux","architecture":"{arch}"{variant}}}}}"#,
            manifest.len()
        ));
        manifests.push(manifest);
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entries.join(",")
    );
    let tagged = reference(&registry.host(), "test/multiarch:latest");
    client
        .put_manifest(&tagged, OCI_INDEX, Bytes::from(index))
        .await
        .unwrap();
    assert!(client.get_manifest(&tagged).await.unwrap().is_index());

    for (platform, want) in [("linux/amd64", 0), ("linux/arm64", 1), ("linux/arm/v7", 2)] {
        let platform: Platform = platform.parse().unwrap();
        let resolved = client
            .get_manifest_for_platform(&tagged, &platform)
            .await
            .unwrap();
        assert_eq!(resolved.bytes, manifests[want], "{platform}");
        assert_eq!(resolved.media_type, OCI_MANIFEST);
    }
    let err = client
        .get_manifest_for_platform(&tagged, &"linux/s390x".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::NoMatchingPlatform { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("linux/arm64/v8"), "{err}");

    // A plain manifest is its own answer whatever the platform.
    let single = Reference::with_digest(repository.clone(), sha256(&manifests[0])).unwrap();
    let resolved = client
        .get_manifest_for_platform(&single, &"linux/arm64".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resolved.bytes, manifests[0]);
}

#[tokio::test]
async fn put_manifest_by_digest_checks_the_digest() {
    let registry = TestRegistry::start();
    let client = client_for(&registry.host());
    let repository = repo(&registry.host(), "test/bydigest");
    let manifest = push_image(&client, &repository, 20).await;
    let wrong = Reference::with_digest(repository.clone(), sha256(b"other")).unwrap();
    let err = client
        .put_manifest(&wrong, OCI_MANIFEST, manifest.clone())
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::InvalidRequest(_)), "{err}");
    let right = Reference::with_digest(repository.clone(), sha256(&manifest)).unwrap();
    assert_eq!(
        client
            .put_manifest(&right, OCI_MANIFEST, manifest.clone())
            .await
            .unwrap(),
        sha256(&manifest)
    );
    assert_eq!(client.get_manifest(&right).await.unwrap().bytes, manifest);
}

#[tokio::test]
async fn hostile_manifests_are_refused() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "test/hostile");
    let manifest = push_image(&client, &repository, 30).await;
    let tagged = reference(&proxy.host(), "test/hostile:v1");
    let digest = client
        .put_manifest(&tagged, OCI_MANIFEST, manifest.clone())
        .await
        .unwrap();

    // A corrupted manifest fetched by digest (or by tag: the registry's
    // Docker-Content-Digest) fails verification and is not retried.
    let pinned = Reference::with_digest(repository.clone(), digest).unwrap();
    for target in [&pinned, &tagged] {
        proxy.inject(
            FaultRule::new(Fault::FlipByte(10))
                .method("GET")
                .path_contains("/manifests/"),
        );
        proxy.clear_log();
        let err = client.get_manifest(target).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::DigestMismatch { .. }),
            "{err}"
        );
        assert_eq!(
            proxy.requests().len(),
            1,
            "digest mismatch must not be retried"
        );
    }

    let small = ClientConfig {
        max_manifest_size: 100,
        ..config_for(&proxy.host())
    };
    let err = Client::new(small)
        .unwrap()
        .get_manifest(&tagged)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::TooLarge { limit: 100 }),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupted_blob_stream_ends_in_an_error() {
    let (_registry, proxy) = proxied_registry();
    let client = client_for(&proxy.host());
    let repository = repo(&proxy.host(), "test/corrupt");
    let blob = patterned(200_000, 7);
    let digest = push_bytes(&client, &repository, &blob).await;
    proxy.inject(FaultRule::new(Fault::FlipByte(150_000)).method("GET"));
    let err = collect(client.get_blob(&repository, &digest).await.unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::DigestMismatch { .. }),
        "{err}"
    );
    assert_eq!(err.digest(), Some(digest));
}
