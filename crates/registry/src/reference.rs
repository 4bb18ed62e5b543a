//! Docker-style image references: `[docker://][REGISTRY/]REPO[:TAG][@DIGEST]`.
//!
//! Parsing follows docker's normalisation: a first path component is a
//! registry only if it contains `.` or `:`, is `localhost`, or has upper-case
//! letters; otherwise the registry is `docker.io`, where single-component
//! names get the `library/` prefix. Without tag and digest the tag is
//! `latest`. [`Reference`]'s `Display` prints the fully normalised form, which
//! parses back to the same value.

use std::fmt;
use std::str::FromStr;

use darter_format::{Digest, DigestAlgo};

/// The registry name docker uses for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Other spellings of Docker Hub that normalise to [`DOCKER_HUB`].
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest allowed `REGISTRY/REPO` name, as in docker.
const MAX_NAME_LEN: usize = 255;
/// Longest allowed tag, as in docker.
const MAX_TAG_LEN: usize = 128;

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing to parse.
    #[error("empty image reference")]
    Empty,
    /// A 64-hex-digit string, which docker reserves for image IDs.
    #[error("invalid image reference {input:?}: a 64-hex-digit image ID is not a reference")]
    ImageId {
        /// The rejected input.
        input: String,
    },
    /// The registry part is not `host[:port]`.
    #[error("invalid image reference {input:?}: bad registry {registry:?} (expected HOST[:PORT])")]
    Registry {
        /// The rejected input.
        input: String,
        /// The registry part.
        registry: String,
    },
    /// The repository path has upper-case letters.
    #[error("invalid image reference {input:?}: repository name must be lowercase")]
    Uppercase {
        /// The rejected input.
        input: String,
    },
    /// A path component breaks the repository grammar.
    #[error(
        "invalid image reference {input:?}: bad repository component {component:?} \
         (expected lowercase letters and digits separated by '.', '_', '__' or dashes)"
    )]
    PathComponent {
        /// The rejected input.
        input: String,
        /// The offending component.
        component: String,
    },
    /// `REGISTRY/REPO` is longer than 255 characters.
    #[error("invalid image reference {input:?}: name is {len} characters (at most 255)")]
    NameTooLong {
        /// The rejected input.
        input: String,
        /// Its name length.
        len: usize,
    },
    /// The tag breaks `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
    #[error(
        "invalid image reference {input:?}: bad tag {tag:?} (expected up to 128 of \
         [A-Za-z0-9_.-], not starting with '.' or '-')"
    )]
    Tag {
        /// The rejected input.
        input: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest is not `sha256:` and 64 lower-case hex digits.
    #[error("invalid image reference {input:?}: bad digest {digest:?} (expected sha256:<64 hex>)")]
    Digest {
        /// The rejected input.
        input: String,
        /// The offending digest.
        digest: String,
    },
}

/// A repository on a registry, e.g. `docker.io/library/debian`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    registry: String,
    path: String,
}

impl Repository {
    /// Validates and normalises a repository name (same rules as the name
    /// part of a [`Reference`]), e.g. `ubuntu` or `127.0.0.1:5000/test/img`.
    pub fn parse(name: &str) -> Result<Repository, ReferenceError> {
        let text = name.strip_prefix("docker://").unwrap_or(name);
        if let (_, Some(tag)) = split_tag(text) {
            return Err(ReferenceError::Tag {
                input: name.to_owned(),
                tag: tag.to_owned(),
            });
        }
        if let Some((_, digest)) = text.split_once('@') {
            return Err(ReferenceError::Digest {
                input: name.to_owned(),
                digest: digest.to_owned(),
            });
        }
        Ok(name.parse::<Reference>()?.repository)
    }

    /// The registry: `host[:port]`, with Docker Hub as `docker.io`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `library/debian`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// The host serving `registry`'s API (Docker Hub's differs from its name).
pub(crate) fn registry_api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API_HOST
    } else {
        registry
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// An image reference: a repository plus a tag and/or a digest.
///
/// At least one of tag and digest is present (the tag defaults to
/// `latest`). When both are, the digest is what gets pulled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    repository: Repository,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// `repository:tag`.
    pub fn with_tag(repository: Repository, tag: &str) -> Result<Reference, ReferenceError> {
        if !is_valid_tag(tag) {
            return Err(ReferenceError::Tag {
                input: format!("{repository}:{tag}"),
                tag: tag.to_owned(),
            });
        }
        Ok(Reference {
            repository,
            tag: Some(tag.to_owned()),
            digest: None,
        })
    }

    /// `repository@digest`. The digest must be sha256, the only algorithm
    /// registries address content by.
    pub fn with_digest(
        repository: Repository,
        digest: Digest,
    ) -> Result<Reference, ReferenceError> {
        if digest.algo() != DigestAlgo::Sha256 {
            return Err(ReferenceError::Digest {
                input: format!("{repository}@{digest}"),
                digest: digest.to_string(),
            });
        }
        Ok(Reference {
            repository,
            tag: None,
            digest: Some(digest),
        })
    }

    /// The repository.
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// The registry (shortcut for `repository().registry()`).
    pub fn registry(&self) -> &str {
        self.repository.registry()
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What the registry API addresses a manifest by: the digest if there is
    /// one, else the tag.
    pub(crate) fn manifest_selector(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Reference, ReferenceError> {
        let text = input.strip_prefix("docker://").unwrap_or(input);
        if text.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReferenceError::ImageId {
                input: input.to_owned(),
            });
        }
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(parse_digest(input, digest)?)),
            None => (text, None),
        };
        let (name, tag) = split_tag(name_and_tag);
        if let Some(tag) = tag
            && !is_valid_tag(tag)
        {
            return Err(ReferenceError::Tag {
                input: input.to_owned(),
                tag: tag.to_owned(),
            });
        }
        let repository = parse_name(input, name)?;
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            repository,
            tag,
            digest,
        })
    }
}

/// Splits `name[:tag]`; a `:` before the last `/` belongs to a registry port.
fn split_tag(name_and_tag: &str) -> (&str, Option<&str>) {
    let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
    match name_and_tag[last_slash..].rfind(':') {
        Some(i) => {
            let colon = last_slash + i;
            (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
        }
        None => (name_and_tag, None),
    }
}

fn parse_digest(input: &str, digest: &str) -> Result<Digest, ReferenceError> {
    let bad = || ReferenceError::Digest {
        input: input.to_owned(),
        digest: digest.to_owned(),
    };
    let parsed: Digest = digest.parse().map_err(|_| bad())?;
    if parsed.algo() != DigestAlgo::Sha256 {
        return Err(bad());
    }
    Ok(parsed)
}

/// Splits off and validates the registry, applies Docker Hub defaults, and
/// validates the repository path.
fn parse_name(input: &str, name: &str) -> Result<Repository, ReferenceError> {
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if looks_like_registry(first) => (first, rest.to_owned()),
        _ => (DOCKER_HUB, name.to_owned()),
    };
    if !is_valid_registry(registry) {
        return Err(ReferenceError::Registry {
            input: input.to_owned(),
            registry: registry.to_owned(),
        });
    }
    let registry = if DOCKER_HUB_ALIASES.contains(&registry) {
        DOCKER_HUB
    } else {
        registry
    };
    let path = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::Uppercase {
            input: input.to_owned(),
        });
    }
    if let Some(component) = path.split('/').find(|c| !is_valid_path_component(c)) {
        return Err(ReferenceError::PathComponent {
            input: input.to_owned(),
            component: component.to_owned(),
        });
    }
    let len = registry.len() + 1 + path.len();
    if len > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong {
            input: input.to_owned(),
            len,
        });
    }
    Ok(Repository {
        registry: registry.to_owned(),
        path,
    })
}

/// Docker's rule for "the first component names a registry".
fn looks_like_registry(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

/// `host[:port]`: dot-separated labels of letters, digits and inner dashes,
/// or a bracketed IPv6 address; the port is decimal.
fn is_valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (host, Some(port)),
        _ => (registry, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty() && host.split('.').all(is_valid_host_label)
}

fn is_valid_host_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_valid_path_component(component: &str) -> bool {
    let is_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let run_start = i;
        while i < bytes.len() && is_alnum(&bytes[i]) {
            i += 1;
        }
        if i == run_start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !is_alnum(&bytes[i]) {
            i += 1;
        }
        let separator = &component[sep_start..i];
        let dashes_only = separator.bytes().all(|b| b == b'-');
        if !(matches!(separator, "." | "_" | "__") || dashes_only) {
            return false;
        }
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    match bytes.first() {
        Some(&first) => {
            bytes.len() <= MAX_TAG_LEN
                && is_word(first)
                && bytes.iter().all(|&b| is_word(b) || b == b'.' || b == b'-')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn normalisation_table() {
        let digest = format!("sha256:{HEX}");
        let cases: Vec<(String, String)> = vec![
            ("ubuntu".into(), "docker.io/library/ubuntu:latest".into()),
            (
                "ubuntu:22.04".into(),
                "docker.io/library/ubuntu:22.04".into(),
            ),
            (
                "docker://ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            (
                "library/ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            ("user/app:v1".into(), "docker.io/user/app:v1".into()),
            (
                "docker.io/ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            (
                "index.docker.io/ubuntu".into(),
                "docker.io/library/ubuntu:latest".into(),
            ),
            (
                "registry-1.docker.io/a/b".into(),
                "docker.io/a/b:latest".into(),
            ),
            ("localhost/app".into(), "localhost/app:latest".into()),
            ("localhost:5000/app:t".into(), "localhost:5000/app:t".into()),
            (
                "127.0.0.1:5000/test/img".into(),
                "127.0.0.1:5000/test/img:latest".into(),
            ),
            (
                "ghcr.io/o/r/deep/path:x_y.z-1".into(),
                "ghcr.io/o/r/deep/path:x_y.z-1".into(),
            ),
            ("Registry/app".into(), "Registry/app:latest".into()),
            ("[::1]:5000/app".into(), "[::1]:5000/app:latest".into()),
            (
                "a/b__c/d-----e/f.g_h".into(),
                "docker.io/a/b__c/d-----e/f.g_h:latest".into(),
            ),
            (
                format!("ubuntu@{digest}"),
                format!("docker.io/library/ubuntu@{digest}"),
            ),
            (format!("q.io/a:t@{digest}"), format!("q.io/a:t@{digest}")),
            (
                format!("docker://h:1/a@{digest}"),
                format!("h:1/a@{digest}"),
            ),
        ];
        for (input, want) in cases {
            let parsed: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.to_string(), want, "normalising {input}");
            let again: Reference = want.parse().unwrap();
            assert_eq!(again.to_string(), want, "round trip of {want}");
            assert_eq!(again, parsed);
        }
    }

    #[test]
    fn parts_are_split_as_docker_does() {
        let r: Reference = "localhost:5000/team/app:v2".parse().unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository().path(), "team/app");
        assert_eq!(r.tag(), Some("v2"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.manifest_selector(), "v2");
        assert_eq!(registry_api_host(r.registry()), "localhost:5000");

        let hub: Reference = "alpine".parse().unwrap();
        assert_eq!(registry_api_host(hub.registry()), "registry-1.docker.io");

        let pinned: Reference = format!("app:v1@sha256:{HEX}").parse().unwrap();
        assert_eq!(pinned.manifest_selector(), format!("sha256:{HEX}"));
    }

    #[test]
    fn rejects_with_the_right_reason() {
        type Check = fn(&ReferenceError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (String::new(), |e| matches!(e, ReferenceError::Empty)),
            ("docker://".into(), |e| matches!(e, ReferenceError::Empty)),
            (HEX.into(), |e| matches!(e, ReferenceError::ImageId { .. })),
            ("Ubuntu".into(), |e| {
                matches!(e, ReferenceError::Uppercase { .. })
            }),
            ("docker.io/Library/x".into(), |e| {
                matches!(e, ReferenceError::Uppercase { .. })
            }),
            ("a//b".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("a/-b".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("a/b.".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("a/b___c".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("a/b._c".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("h.io/".into(), |e| {
                matches!(e, ReferenceError::PathComponent { .. })
            }),
            ("h.io:/a".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            ("h.io:99999x/a".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            ("-h.io/a".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            ("h..io/a".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            ("[zz]:1/a".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            ("a:".into(), |e| matches!(e, ReferenceError::Tag { .. })),
            ("a:.x".into(), |e| matches!(e, ReferenceError::Tag { .. })),
            ("a:-x".into(), |e| matches!(e, ReferenceError::Tag { .. })),
            ("a:x/y".into(), |e| {
                matches!(e, ReferenceError::Registry { .. })
            }),
            (format!("a:{}", "t".repeat(129)), |e| {
                matches!(e, ReferenceError::Tag { .. })
            }),
            ("a@sha256:abc".into(), |e| {
                matches!(e, ReferenceError::Digest { .. })
            }),
            ("a@".into(), |e| matches!(e, ReferenceError::Digest { .. })),
            (format!("a@blake3:{HEX}"), |e| {
                matches!(e, ReferenceError::Digest { .. })
            }),
            (format!("a@sha256:{}", HEX.to_uppercase()), |e| {
                matches!(e, ReferenceError::Digest { .. })
            }),
            (format!("h.io/{}", "a".repeat(251)), |e| {
                matches!(e, ReferenceError::NameTooLong { .. })
            }),
        ];
        for (input, check) in cases {
            match input.parse::<Reference>() {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => {
                    assert!(check(&e), "{input:?}: unexpected error {e}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn longest_allowed_name_is_accepted() {
        let name = format!("h.io/{}", "a".repeat(250));
        assert_eq!(name.len(), MAX_NAME_LEN);
        assert!(name.parse::<Reference>().is_ok());
        let tag = format!("a:{}", "t".repeat(128));
        assert!(tag.parse::<Reference>().is_ok());
    }

    #[test]
    fn repository_parse_refuses_tags_and_digests() {
        assert_eq!(
            Repository::parse("ubuntu").unwrap().to_string(),
            "docker.io/library/ubuntu"
        );
        assert!(Repository::parse("ubuntu:1").is_err());
        assert!(Repository::parse(&format!("ubuntu@sha256:{HEX}")).is_err());
    }

    #[test]
    fn constructors_validate() {
        let repo = Repository::parse("h.io/a").unwrap();
        assert!(Reference::with_tag(repo.clone(), "ok").is_ok());
        assert!(Reference::with_tag(repo.clone(), "not ok").is_err());
        let blake = DigestAlgo::Blake3.digest(b"x");
        assert!(Reference::with_digest(repo.clone(), blake).is_err());
        let sha = DigestAlgo::Sha256.digest(b"x");
        let r = Reference::with_digest(repo, sha).unwrap();
        assert_eq!(r.to_string(), format!("h.io/a@{sha}"));
    }

    proptest::proptest! {
        #[test]
        fn display_parses_back(
            registry in "(h[a-z0-9]{0,5}\\.io(:[0-9]{1,5})?|localhost)",
            path in "[a-z0-9]{1,4}(([._]|__|-{1,3})[a-z0-9]{1,4}){0,2}(/[a-z0-9]{1,6}){0,2}",
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
        ) {
            let text = match &tag {
                Some(tag) => format!("{registry}/{path}:{tag}"),
                None => format!("{registry}/{path}"),
            };
            let parsed: Reference = text.parse().unwrap();
            let shown = parsed.to_string();
            let reparsed: Reference = shown.parse().unwrap();
            proptest::prop_assert_eq!(reparsed.to_string(), shown);
            proptest::prop_assert_eq!(parsed.tag(), Some(tag.as_deref().unwrap_or(DEFAULT_TAG)));
        }
    }
}
