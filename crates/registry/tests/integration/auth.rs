//! Authentication against real registries: htpasswd Basic auth, Bearer
//! tokens from a token service (including expiry mid-session), docker
//! credential helpers.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use darter_registry::{
    BlobSource, Client, ClientConfig, CredentialSource, ErrorKind, PushOutcome, Repository, Secret,
};
use darter_testkit::faultproxy::FaultProxy;
use darter_testkit::registry::{REFRESH_TOKEN_USER, RegistryAuth, TestRegistry, TokenConfig};

use crate::common::*;

const USER: &str = "alice";
const PASSWORD: &str = "correct-horse-battery";

fn users() -> Vec<(String, String)> {
    vec![(USER.to_owned(), PASSWORD.to_owned())]
}

fn client_with(host: &str, credentials: CredentialSource) -> Client {
    Client::new(config_for(host).with_credentials(credentials)).unwrap()
}

fn explicit(host: &str, password: &str) -> CredentialSource {
    CredentialSource::anonymous().with_explicit(host, USER, Secret::new(password))
}

/// Pushes a blob and reads it back; the whole authenticated round trip.
async fn push_and_read(
    client: &Client,
    repository: &Repository,
) -> Result<(), darter_registry::RegistryError> {
    let blob = patterned(5000, 1);
    let digest = sha256(&blob);
    client
        .push_blob(repository, &digest, &BlobSource::from(blob.clone()), None)
        .await?;
    let slice = client.get_blob_range(repository, &digest, 100..200).await?;
    assert_eq!(&slice.data[..], &blob[100..200]);
    Ok(())
}

fn assert_no_secret(err: &darter_registry::RegistryError) {
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
}

#[tokio::test]
async fn basic_auth_with_the_right_password_works() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let client = client_with(&registry.host(), explicit(&registry.host(), PASSWORD));
    push_and_read(&client, &repo(&registry.host(), "private/app"))
        .await
        .unwrap();
}

#[tokio::test]
async fn basic_auth_failures_are_unauthorized_and_final() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let repository = repo(&registry.host(), "private/app");
    let wrong = client_with(
        &registry.host(),
        explicit(&registry.host(), "wrong-password"),
    );
    let anonymous = client_for(&registry.host());
    for client in [wrong, anonymous] {
        let err = client
            .blob_size(&repository, &sha256(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Unauthorized { status: 401, .. }),
            "{err}"
        );
        assert!(!err.is_retryable());
        assert_eq!(err.attempts(), 1);
        assert_no_secret(&err);
    }
}

#[tokio::test]
async fn bearer_tokens_are_fetched_with_credentials_and_scoped() {
    let config = TokenConfig {
        users: users(),
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let tokens = registry.token_service().unwrap();
    let client = client_with(&registry.host(), explicit(&registry.host(), PASSWORD));
    let repository = repo(&registry.host(), "team/app");
    push_and_read(&client, &repository).await.unwrap();

    let requests = tokens.requests();
    assert!(
        requests.iter().all(|r| r.user.as_deref() == Some(USER)),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.scopes == ["repository:team/app:pull,push"]),
        "push asks for pull,push: {requests:?}"
    );
    // Tokens are cached per scope: not one fetch per request.
    assert!(tokens.issued() <= 2, "{requests:?}");

    let wrong = client_with(&registry.host(), explicit(&registry.host(), "nope"));
    let err = wrong
        .blob_size(&repository, &sha256(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Unauthorized { .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_no_secret(&err);
}

#[tokio::test]
async fn anonymous_token_services_and_access_token_answers_work() {
    let config = TokenConfig {
        use_access_token_field: true,
        expires_in: None,
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let client = client_for(&registry.host());
    push_and_read(&client, &repo(&registry.host(), "public/app"))
        .await
        .unwrap();
    let requests = registry.token_service().unwrap().requests();
    assert!(
        requests.iter().all(|r| r.user.is_none() && r.status == 200),
        "{requests:?}"
    );
}

#[tokio::test]
async fn mounting_asks_for_pull_on_the_source_repository() {
    let registry = TestRegistry::start_with(&RegistryAuth::Token(TokenConfig::default()));
    let client = client_for(&registry.host());
    let source_repo = repo(&registry.host(), "team/base");
    let target_repo = repo(&registry.host(), "team/app");
    let blob = patterned(3000, 2);
    let digest = push_bytes(&client, &source_repo, &blob).await;
    let outcome = client
        .push_blob(
            &target_repo,
            &digest,
            &BlobSource::from(blob),
            Some(&source_repo),
        )
        .await
        .unwrap();
    assert_eq!(outcome, PushOutcome::Mounted);
    let requests = registry.token_service().unwrap().requests();
    let want = ["repository:team/app:pull,push", "repository:team/base:pull"];
    assert!(requests.iter().any(|r| r.scopes == want), "{requests:?}");
}

/// Pushes a blob (one pull,push token), then reads ranges (pull tokens)
/// until the token service has issued `tokens` tokens in all; every read
/// must succeed. Returns the number of reads.
async fn read_until_tokens_issued(
    client: &Client,
    registry: &TestRegistry,
    repository: &Repository,
    tokens: usize,
) -> usize {
    let blob = patterned(10_000, 3);
    let digest = push_bytes(client, repository, &blob).await;
    let service = registry.token_service().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reads = 0;
    while service.issued() < tokens {
        assert!(Instant::now() < deadline, "no token renewal within 60 s");
        let slice = client
            .get_blob_range(repository, &digest, 10..20)
            .await
            .unwrap();
        assert_eq!(&slice.data[..], &blob[10..20]);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reads
}

/// A token-auth registry (tokens valid `validity`, clients told
/// `expires_in` seconds) behind a logging proxy, and a client for it.
fn token_registry(validity: Duration, expires_in: u64) -> (TestRegistry, FaultProxy, Client) {
    let config = TokenConfig {
        validity,
        expires_in: Some(expires_in),
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let proxy = FaultProxy::start(registry.addr());
    let client = client_for(&proxy.host());
    (registry, proxy, client)
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    let (registry, proxy, client) = token_registry(Duration::from_secs(4), 4);
    let repository = repo(&proxy.host(), "renew/early");
    read_until_tokens_issued(&client, &registry, &repository, 4).await;
    let refused = proxy
        .requests()
        .iter()
        .filter(|r| r.status == Some(401))
        .count();
    assert_eq!(
        refused,
        1,
        "only the first, anonymous request may be refused: {:?}",
        proxy.requests()
    );
}

#[tokio::test]
async fn a_token_refused_mid_session_is_renewed_transparently() {
    // The service claims 300 s but the registry honours tokens for 2 s: the
    // client learns of the expiry only from a 401 in the middle of its work.
    let (registry, proxy, client) = token_registry(Duration::from_secs(2), 300);
    let repository = repo(&proxy.host(), "renew/late");
    let reads = read_until_tokens_issued(&client, &registry, &repository, 4).await;
    assert!(reads > 2);
    let log = proxy.requests();
    let refused = log.iter().filter(|r| r.status == Some(401)).count();
    assert!(
        refused >= 3,
        "expired tokens were refused and replaced: {log:?}"
    );
    // Every refusal was followed by the same request, now accepted.
    for (i, record) in log
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == Some(401))
    {
        let next = &log[i + 1];
        assert_eq!((&next.method, &next.path), (&record.method, &record.path));
        assert!(next.status.is_some_and(|s| s != 401 && s != 403), "{log:?}");
    }
}

#[tokio::test]
async fn credential_helpers_from_the_docker_config_are_used() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let config_dir = tempfile::tempdir().unwrap();
    let helper = config_dir.path().join("docker-credential-test");
    let log = config_dir.path().join("helper.log");
    let script = format!(
        "#!/bin/sh\nread server\necho \"$1 $server\" >> '{}'\n\
         printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n",
        log.display()
    );
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker_config = format!(r#"{{"credHelpers": {{"{}": "test"}}}}"#, registry.host());
    std::fs::write(config_dir.path().join("config.json"), docker_config).unwrap();

    let credentials = CredentialSource::from_docker_config_dir(config_dir.path())
        .with_helper_dirs(vec![config_dir.path().to_owned()]);
    let client = client_with(&registry.host(), credentials);
    push_and_read(&client, &repo(&registry.host(), "helped/app"))
        .await
        .unwrap();
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls,
        format!("get {}\n", registry.host()),
        "helper runs once per registry"
    );
}

#[tokio::test]
async fn docker_config_auths_entries_are_used() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let config_dir = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let docker_config = format!(
        r#"{{"auths": {{"http://{}/v2/": {{"auth": "{auth}"}}}}}}"#,
        registry.host()
    );
    std::fs::write(config_dir.path().join("config.json"), docker_config).unwrap();
    let client = client_with(
        &registry.host(),
        CredentialSource::from_docker_config_dir(config_dir.path()),
    );
    push_and_read(&client, &repo(&registry.host(), "configured/app"))
        .await
        .unwrap();
    // The same registry with the explicit (wrong) password: explicit wins.
    let overridden = CredentialSource::from_docker_config_dir(config_dir.path()).with_explicit(
        &registry.host(),
        USER,
        Secret::new("wrong"),
    );
    let client = client_with(&registry.host(), overridden);
    let err = client
        .blob_size(&repo(&registry.host(), "configured/app"), &sha256(b"x"))
        .await;
    assert!(err.is_err());
}

#[tokio::test]
async fn identity_tokens_are_exchanged_for_access_tokens() {
    let config = TokenConfig {
        users: users(),
        refresh_token: Some("refresh-me".to_owned()),
        ..TokenConfig::default()
    };
    let registry = TestRegistry::start_with(&RegistryAuth::Token(config));
    let write_config = |token: &str| {
        let dir = tempfile::tempdir().unwrap();
        let docker_config = format!(
            r#"{{"auths": {{"{}": {{"username": "{USER}", "identitytoken": "{token}"}}}}}}"#,
            registry.host()
        );
        std::fs::write(dir.path().join("config.json"), docker_config).unwrap();
        dir
    };
    let good = write_config("refresh-me");
    let client = client_with(
        &registry.host(),
        CredentialSource::from_docker_config_dir(good.path()),
    );
    push_and_read(&client, &repo(&registry.host(), "oauth/app"))
        .await
        .unwrap();
    let requests = registry.token_service().unwrap().requests();
    assert!(
        requests
            .iter()
            .all(|r| r.via_refresh_token && r.user.as_deref() == Some(REFRESH_TOKEN_USER)),
        "{requests:?}"
    );

    let bad = write_config("stale");
    let client = client_with(
        &registry.host(),
        CredentialSource::from_docker_config_dir(bad.path()),
    );
    let err = client
        .blob_size(&repo(&registry.host(), "oauth/app"), &sha256(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Unauthorized { .. }),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains("stale"), "{err}");
}

#[tokio::test]
async fn explicit_credentials_for_another_registry_are_not_used() {
    let registry = TestRegistry::start_with(&RegistryAuth::Htpasswd(users()));
    let client = client_with(&registry.host(), explicit("elsewhere.io", PASSWORD));
    let err = client
        .push_blob(
            &repo(&registry.host(), "private/x"),
            &sha256(b"y"),
            &BlobSource::Bytes(Bytes::from_static(b"y")),
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Unauthorized { .. }),
        "{err}"
    );
}

#[test]
fn client_config_debug_shows_no_secrets() {
    let config = ClientConfig::default().with_credentials(
        CredentialSource::anonymous().with_explicit("h.io", USER, Secret::new(PASSWORD)),
    );
    let shown = format!("{config:?} {:?}", Client::new(config.clone()).unwrap());
    assert!(!shown.contains(PASSWORD), "{shown}");
}
