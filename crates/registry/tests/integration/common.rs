//! Helpers shared by the integration tests: clients with fast retries for
//! loopback registries, deterministic test data, small image pushes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use darter_format::DigestAlgo;
use darter_registry::{
    BlobSource, BlobStream, Client, ClientConfig, CredentialSource, Digest, PushOutcome, Reference,
    RegistryError, Repository, RetryPolicy,
};
use darter_testkit::faultproxy::FaultProxy;
use darter_testkit::registry::TestRegistry;
use futures_util::StreamExt as _;

/// Retries fast enough for tests, still several attempts.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        operation_deadline: Duration::from_secs(60),
    }
}

/// Plain HTTP to `host`, anonymous, fast retries.
pub fn config_for(host: &str) -> ClientConfig {
    ClientConfig {
        retry: fast_retry(),
        credentials: CredentialSource::anonymous(),
        ..ClientConfig::default()
    }
    .with_plain_http(host)
}

pub fn client_for(host: &str) -> Client {
    Client::new(config_for(host)).unwrap()
}

/// Like [`client_for`], uploading blobs over 1 MiB in 1 MiB PATCH chunks.
pub fn chunking_client_for(host: &str) -> Client {
    let config = ClientConfig {
        upload_chunk_size: 1 << 20,
        ..config_for(host)
    };
    Client::new(config).unwrap()
}

/// An anonymous registry behind a fault proxy (which also logs requests).
pub fn proxied_registry() -> (TestRegistry, FaultProxy) {
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.addr());
    (registry, proxy)
}

/// The statuses of the proxied requests with `method`, in order (`None`
/// for resets).
pub fn statuses(proxy: &FaultProxy, method: &str) -> Vec<Option<u16>> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == method)
        .map(|r| r.status)
        .collect()
}

pub fn repo(host: &str, path: &str) -> Repository {
    Repository::parse(&format!("{host}/{path}")).unwrap()
}

pub fn reference(host: &str, name: &str) -> Reference {
    format!("{host}/{name}").parse().unwrap()
}

/// Deterministic, incompressible-looking bytes.
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> Digest {
    DigestAlgo::Sha256.digest(bytes)
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

pub async fn collect(mut stream: BlobStream) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// The whole blob, streamed and verified.
pub async fn read_blob(client: &Client, repository: &Repository, digest: &Digest) -> Vec<u8> {
    collect(client.get_blob(repository, digest).await.unwrap())
        .await
        .unwrap()
}

/// Pushes `bytes` as a blob from memory; returns its digest.
pub async fn push_bytes(client: &Client, repository: &Repository, bytes: &[u8]) -> Digest {
    let digest = sha256(bytes);
    let source = BlobSource::Bytes(Bytes::copy_from_slice(bytes));
    let outcome = client
        .push_blob(repository, &digest, &source, None)
        .await
        .unwrap();
    assert_ne!(outcome, PushOutcome::Mounted);
    digest
}

/// An OCI image manifest over a config and one layer, both pushed.
pub async fn push_image(client: &Client, repository: &Repository, seed: u64) -> Bytes {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let layer = patterned(10_000, seed);
    let config_digest = push_bytes(client, repository, config.as_bytes()).await;
    let layer_digest = push_bytes(client, repository, &layer).await;
    image_manifest(&config_digest, config.len(), &layer_digest, layer.len())
}

pub fn image_manifest(
    config: &Digest,
    config_size: usize,
    layer: &Digest,
    layer_size: usize,
) -> Bytes {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_size}}}]}}"#
    )
    .into()
}
