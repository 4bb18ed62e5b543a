//! Manifests: get (verified, size-limited), pick a platform from an index,
//! put.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use darter_format::{Digest, DigestAlgo};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;

use crate::auth::Scope;
use crate::client::{
    Client, Failure, Request, RequestBody, bad_response, expect_status, read_limited,
};
use crate::error::{ErrorKind, OperationContext, RegistryError};
use crate::reference::{Reference, Repository};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header of manifest GETs: every media type we can use.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The registry's digest header on manifest and blob responses.
pub(crate) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// A manifest or index as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Media type, e.g. [`OCI_MANIFEST`].
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
    /// The exact bytes (their digest is the manifest's identity).
    pub bytes: Bytes,
}

impl Manifest {
    /// True for OCI indexes and Docker manifest lists.
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_MANIFEST_LIST
    }
}

/// An OS/architecture/variant triple as in OCI indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// GOARCH spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// e.g. `v7` for 32-bit ARM; `None` matches any variant.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI spelling.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Whether an index entry for `os/architecture/variant` serves this
    /// platform. `arm64` without variant counts as `v8`, as in containerd.
    fn matches(&self, entry: &Platform) -> bool {
        let normalise = |arch: &str, variant: Option<&str>| match (arch, variant) {
            ("arm64", None) => Some("v8".to_owned()),
            (_, variant) => variant.map(str::to_owned),
        };
        self.os == entry.os
            && self.architecture == entry.architecture
            && (self.variant.is_none()
                || normalise(&self.architecture, self.variant.as_deref())
                    == normalise(&entry.architecture, entry.variant.as_deref()))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Platform {
    type Err = String;

    /// `os/arch[/variant]`, e.g. `linux/arm64` or `linux/arm/v7`.
    fn from_str(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: parts
                    .get(2)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*v).to_owned()),
            }),
            _ => Err(format!(
                "invalid platform {text:?} (expected OS/ARCH[/VARIANT])"
            )),
        }
    }
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct MediaTypeField {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
}

fn sha256(bytes: &[u8]) -> Digest {
    DigestAlgo::Sha256.digest(bytes)
}

/// The digest in `Docker-Content-Digest`, if it is a sha256 we can compare.
pub(crate) fn header_digest(response: &Response) -> Option<Digest> {
    let text = response
        .headers()
        .get(DOCKER_CONTENT_DIGEST)?
        .to_str()
        .ok()?;
    text.parse::<Digest>()
        .ok()
        .filter(|d| d.algo() == DigestAlgo::Sha256)
}

pub(crate) fn digest_mismatch(expected: &Digest, actual: &Digest) -> ErrorKind {
    ErrorKind::DigestMismatch {
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}

impl Client {
    /// Fetches the manifest (or index) `reference` names. Verifies its digest
    /// (against the reference's digest, else the registry's
    /// `Docker-Content-Digest`) and refuses bodies over
    /// [`ClientConfig::max_manifest_size`](crate::ClientConfig::max_manifest_size).
    pub async fn get_manifest(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let context = OperationContext {
            operation: "get manifest",
            repository: reference.repository().to_string(),
            object: Some(reference.manifest_selector()),
        };
        self.with_retries(&context, || self.get_manifest_once(reference))
            .await
    }

    async fn get_manifest_once(&self, reference: &Reference) -> Result<Manifest, Failure> {
        let repository = reference.repository();
        let url = self.repository_url(
            repository,
            &format!("manifests/{}", reference.manifest_selector()),
        )?;
        let scopes = [Scope::pull(repository)];
        let request = Request::new(Method::GET, url.clone(), repository, &scopes)
            .header(ACCEPT, HeaderValue::from_static(ACCEPT_MANIFESTS));
        let response = expect_status(self.execute(&request).await?, &[StatusCode::OK]).await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|v| !v.is_empty() && v != "application/json" && v != "text/plain");
        let announced = header_digest(&response);
        let limit = self.config().max_manifest_size;
        let bytes = read_limited(response, limit)
            .await
            .map_err(|kind| Failure::at(&url, kind))?;
        let digest = sha256(&bytes);
        if let Some(expected) = reference.digest().or(announced.as_ref())
            && *expected != digest
        {
            return Err(Failure::at(&url, digest_mismatch(expected, &digest)));
        }
        let media_type = match content_type {
            Some(media_type) => media_type,
            None => serde_json::from_slice::<MediaTypeField>(&bytes)
                .ok()
                .and_then(|m| m.media_type)
                .ok_or_else(|| Failure::at(&url, bad_response("manifest has no media type")))?,
        };
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Fetches `reference`; if it is an index, fetches (by digest) the
    /// manifest for `platform` from the same repository. A plain manifest is
    /// returned as is.
    pub async fn get_manifest_for_platform(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Manifest, RegistryError> {
        let top = self.get_manifest(reference).await?;
        if !top.is_index() {
            return Ok(top);
        }
        let context = OperationContext {
            operation: "resolve platform",
            repository: reference.repository().to_string(),
            object: Some(top.digest.to_string()),
        };
        let fail = |kind| RegistryError::new(context.clone(), None, kind);
        let index: Index = serde_json::from_slice(&top.bytes)
            .map_err(|e| fail(bad_response(format!("index is not valid JSON: {e}"))))?;
        let entry = index
            .manifests
            .iter()
            .find(|entry| entry.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| {
                let available: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|e| e.platform.as_ref().map(ToString::to_string))
                    .collect();
                fail(ErrorKind::NoMatchingPlatform {
                    wanted: platform.to_string(),
                    available: available.join(", "),
                })
            })?;
        let digest: Digest = entry.digest.parse().map_err(|_| {
            fail(bad_response(format!(
                "index entry digest {:?} is invalid",
                entry.digest
            )))
        })?;
        let child = Reference::with_digest(reference.repository().clone(), digest)
            .map_err(|e| fail(bad_response(e.to_string())))?;
        self.get_manifest(&child).await
    }

    /// Uploads a manifest under `reference`'s tag (or, without a tag, its
    /// digest, which must then be the bytes' sha256). Returns the digest.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = sha256(&bytes);
        let selector = match reference.tag() {
            Some(tag) => tag.to_owned(),
            None => digest.to_string(),
        };
        let context = OperationContext {
            operation: "put manifest",
            repository: reference.repository().to_string(),
            object: Some(selector.clone()),
        };
        if let Some(expected) = reference.digest()
            && *expected != digest
        {
            let kind = ErrorKind::InvalidRequest(format!(
                "manifest bytes hash to {digest}, not the reference's {expected}"
            ));
            return Err(RegistryError::new(context, None, kind));
        }
        let content_type = HeaderValue::try_from(media_type).map_err(|_| {
            let kind = ErrorKind::InvalidRequest(format!("bad media type {media_type:?}"));
            RegistryError::new(context.clone(), None, kind)
        })?;
        let repository = reference.repository();
        self.with_retries(&context, || {
            self.put_manifest_once(repository, &selector, &content_type, &bytes, &digest)
        })
        .await?;
        Ok(digest)
    }

    async fn put_manifest_once(
        &self,
        repository: &Repository,
        selector: &str,
        content_type: &HeaderValue,
        bytes: &Bytes,
        digest: &Digest,
    ) -> Result<(), Failure> {
        let url = self.repository_url(repository, &format!("manifests/{selector}"))?;
        let scopes = [Scope::push(repository)];
        let request = Request::new(Method::PUT, url.clone(), repository, &scopes)
            .header(CONTENT_TYPE, content_type.clone())
            .body(RequestBody::Bytes(bytes));
        let response = self.execute(&request).await?;
        let response = expect_status(response, &[StatusCode::CREATED, StatusCode::OK]).await?;
        match header_digest(&response) {
            Some(stored) if stored != *digest => {
                Err(Failure::at(&url, digest_mismatch(digest, &stored)))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn platform_matching_table() {
        let cases = [
            ("linux/amd64", entry("linux", "amd64", None), true),
            ("linux/amd64", entry("windows", "amd64", None), false),
            ("linux/amd64", entry("linux", "arm64", None), false),
            ("linux/arm64", entry("linux", "arm64", Some("v8")), true),
            ("linux/arm64/v8", entry("linux", "arm64", None), true),
            ("linux/arm64/v8", entry("linux", "arm64", Some("v8")), true),
            ("linux/arm/v7", entry("linux", "arm", Some("v6")), false),
            ("linux/arm/v7", entry("linux", "arm", Some("v7")), true),
            ("linux/arm", entry("linux", "arm", Some("v6")), true),
            ("linux/arm/v7", entry("linux", "arm", None), false),
        ];
        for (wanted, candidate, want) in cases {
            let platform: Platform = wanted.parse().unwrap();
            assert_eq!(
                platform.matches(&candidate),
                want,
                "{wanted} vs {candidate}"
            );
        }
    }

    #[test]
    fn platform_parse_and_display() {
        for text in ["linux/amd64", "linux/arm/v7"] {
            assert_eq!(text.parse::<Platform>().unwrap().to_string(), text);
        }
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        let host = Platform::host();
        assert_eq!(host.os, std::env::consts::OS);
        assert!(!host.architecture.is_empty());
    }
}
