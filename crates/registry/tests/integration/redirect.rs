//! Registries that redirect blob reads to object storage: the client follows
//! the redirect, keeps `Range`, and never sends `Authorization` to the other
//! host. The "registry" and the "object store" are small loopback servers
//! that record what they receive.

use std::sync::{Arc, Mutex};

use darter_registry::{Client, CredentialSource, ErrorKind, Secret};
use darter_testkit::faultproxy::{LoopbackServer, response};
use hyper::Method;

use crate::common::*;

const PASSWORD: &str = "front-door-password";
const SIGNATURE: &str = "storage-signature-secret";

/// What a server saw: method, path, Authorization, Range.
type Seen = Arc<Mutex<Vec<(Method, String, Option<String>, Option<String>)>>>;

fn record(seen: &Seen, request: &hyper::Request<hyper::body::Incoming>) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    seen.lock().unwrap().push((
        request.method().clone(),
        request.uri().to_string(),
        header("authorization"),
        header("range"),
    ));
}

/// An object store serving `blob` whole (it ignores `Range`, as some do),
/// or a 500 for paths containing "broken".
fn object_store(blob: Vec<u8>, seen: Seen) -> LoopbackServer {
    LoopbackServer::start(move |request| {
        record(&seen, &request);
        let reply = if request.uri().path().contains("broken") {
            response(500, &[], "storage on fire")
        } else {
            let len = blob.len().to_string();
            response(200, &[("content-length", len.as_str())], blob.clone())
        };
        async move { reply }
    })
}

/// A registry front that wants Basic auth and redirects blob requests to
/// `storage_url`.
fn front(storage_url: String, seen: Seen) -> LoopbackServer {
    LoopbackServer::start(move |request| {
        record(&seen, &request);
        let authorized = request.headers().contains_key("authorization");
        let path = request.uri().path().to_owned();
        let reply = if !authorized {
            response(401, &[("www-authenticate", r#"Basic realm="front""#)], "")
        } else {
            let target = if path.contains("/broken/") {
                "broken"
            } else {
                "data"
            };
            let location = format!("{storage_url}/{target}?X-Amz-Signature={SIGNATURE}");
            response(
                307,
                &[("location", location.as_str()), ("content-length", "0")],
                "",
            )
        };
        async move { reply }
    })
}

#[tokio::test]
async fn redirected_blob_reads_do_not_leak_authorization() {
    let blob = patterned(50_000, 9);
    let digest = sha256(&blob);
    let storage_seen = Seen::default();
    let front_seen = Seen::default();
    let storage = object_store(blob.clone(), storage_seen.clone());
    let registry = front(storage.url(), front_seen.clone());
    let host = registry.addr().to_string();
    let credentials =
        CredentialSource::anonymous().with_explicit(&host, "bob", Secret::new(PASSWORD));
    let client = Client::new(config_for(&host).with_credentials(credentials)).unwrap();
    let repository = repo(&host, "cdn/app");

    assert_eq!(
        client.blob_size(&repository, &digest).await.unwrap(),
        Some(blob.len() as u64)
    );
    let slice = client
        .get_blob_range(&repository, &digest, 1000..1100)
        .await
        .unwrap();
    assert_eq!(&slice.data[..], &blob[1000..1100]);
    let suffix = client
        .get_blob_range(&repository, &digest, darter_registry::BlobRange::Suffix(10))
        .await
        .unwrap();
    assert_eq!(
        (&suffix.data[..], suffix.offset),
        (&blob[blob.len() - 10..], blob.len() as u64 - 10)
    );
    let streamed = read_blob(&client, &repository, &digest).await;
    assert_eq!(streamed, blob);

    let storage_seen = storage_seen.lock().unwrap().clone();
    assert_eq!(storage_seen.len(), 4, "{storage_seen:?}");
    assert!(
        storage_seen.iter().all(|(_, _, auth, _)| auth.is_none()),
        "{storage_seen:?}"
    );
    let ranges: Vec<Option<&str>> = storage_seen
        .iter()
        .map(|(_, _, _, r)| r.as_deref())
        .collect();
    assert_eq!(
        ranges,
        [None, Some("bytes=1000-1099"), Some("bytes=-10"), None]
    );
    let front_seen = front_seen.lock().unwrap().clone();
    let authorized = front_seen
        .iter()
        .filter(|(_, _, auth, _)| auth.is_some())
        .count();
    assert_eq!(
        authorized, 4,
        "every registry request after the challenge is authorised"
    );
}

#[tokio::test]
async fn storage_errors_keep_signatures_out_of_messages() {
    let storage = object_store(Vec::new(), Seen::default());
    let registry = front(storage.url(), Seen::default());
    let host = registry.addr().to_string();
    let credentials =
        CredentialSource::anonymous().with_explicit(&host, "bob", Secret::new(PASSWORD));
    let client = Client::new(config_for(&host).with_credentials(credentials)).unwrap();
    let err = client
        .get_blob_range(&repo(&host, "cdn/broken"), &sha256(b"z"), 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Status { status: 500, .. }),
        "{err}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(SIGNATURE) && !shown.contains(PASSWORD),
        "{shown}"
    );
    assert!(
        err.url().unwrap().contains("X-Amz-Signature=REDACTED"),
        "{shown}"
    );
    assert!(err.url().unwrap().starts_with(&storage.url()), "{shown}");
}
