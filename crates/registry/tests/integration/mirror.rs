//! A registry's reads through a configured pull-through mirror (a fault
//! proxy in front of the registry stands in for one and logs what it saw):
//! manifests and blobs, whole and ranged, go to the mirror; pushes go to
//! the registry.

use darter_registry::ClientConfig;

use crate::common::{config_for, patterned, push_bytes, read_blob, repo};

#[tokio::test]
async fn reads_go_to_the_mirror_and_writes_to_the_registry() {
    let (registry, mirror) = crate::common::proxied_registry();
    let host = registry.host();
    let config: ClientConfig =
        config_for(&host).with_mirror(&host, format!("http://{}", mirror.host()));
    let client = darter_registry::Client::new(config).unwrap();
    let repository = repo(&host, "mirrored/blob");
    let bytes = patterned(100_000, 7);
    let digest = push_bytes(&client, &repository, &bytes).await;
    let writes_at_mirror = mirror
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET" && r.method != "HEAD")
        .count();
    assert_eq!(writes_at_mirror, 0, "{:?}", mirror.requests());
    mirror.clear_log();

    assert_eq!(read_blob(&client, &repository, &digest).await, bytes);
    let slice = client
        .get_blob_range(&repository, &digest, 1000..2000)
        .await
        .unwrap();
    assert_eq!(&slice.data[..], &bytes[1000..2000]);
    let gets: Vec<String> = mirror
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && matches!(r.status, Some(200 | 206)))
        .map(|r| r.path)
        .collect();
    let path = format!("/v2/mirrored/blob/blobs/{digest}");
    assert_eq!(gets, [path.clone(), path], "{:?}", mirror.requests());
}

#[tokio::test]
async fn a_mirror_url_that_is_not_http_is_refused_naming_it() {
    let (registry, _mirror) = crate::common::proxied_registry();
    let host = registry.host();
    let config = config_for(&host).with_mirror(&host, "ftp://mirror.example");
    let client = darter_registry::Client::new(config).unwrap();
    let repository = repo(&host, "mirrored/blob");
    let digest = crate::common::sha256(b"x");
    let err = client
        .get_blob_range(&repository, &digest, 0..1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ftp://mirror.example"), "{err}");
}

#[tokio::test]
async fn a_mirror_that_cannot_be_reached_falls_back_to_the_registry() {
    let (registry, _proxy) = crate::common::proxied_registry();
    let host = registry.host();
    // A port nothing listens on: the mirror (a local P2P peer) is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = darter_registry::Client::new(config_for(&host)).unwrap();
    let repository = repo(&host, "mirrored/down");
    let bytes = patterned(50_000, 3);
    let digest = push_bytes(&client, &repository, &bytes).await;

    let mirrored =
        darter_registry::Client::new(config_for(&host).with_mirror(&host, down)).unwrap();
    assert_eq!(read_blob(&mirrored, &repository, &digest).await, bytes);
    let slice = mirrored
        .get_blob_range(&repository, &digest, 100..200)
        .await
        .unwrap();
    assert_eq!(&slice.data[..], &bytes[100..200]);
}
