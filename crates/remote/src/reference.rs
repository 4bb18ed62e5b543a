//! The IMAGE argument: a local OCI layout or a registry reference.

use std::fmt;

use darter_oci::LayoutRef;
use darter_registry::Reference;

/// Where an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:PATH[:TAG]`.
    Layout(LayoutRef),
    /// `[docker://]REGISTRY/REPO[:TAG|@DIGEST]` with docker's defaults.
    Registry(Reference),
}

/// A malformed IMAGE argument.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    /// Bad `oci:` reference.
    #[error(transparent)]
    Layout(#[from] darter_oci::ReferenceError),
    /// Bad registry reference.
    #[error(
        "{input:?} is not an image reference (oci:PATH[:TAG] or [docker://]REGISTRY/REPO[:TAG|@DIGEST]): {source}"
    )]
    Registry {
        /// What was given.
        input: String,
        /// Why it is invalid.
        source: darter_registry::ReferenceError,
    },
}

impl ImageRef {
    /// Parses an IMAGE argument.
    pub fn parse(s: &str) -> Result<Self, RefError> {
        if s.starts_with("oci:") {
            return Ok(ImageRef::Layout(LayoutRef::parse(s)?));
        }
        let plain = s.strip_prefix("docker://").unwrap_or(s);
        plain
            .parse()
            .map(ImageRef::Registry)
            .map_err(|source| RefError::Registry {
                input: s.to_owned(),
                source,
            })
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Layout(l) => l.tag.as_deref(),
            ImageRef::Registry(r) => r.tag(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout(l) => l.fmt(f),
            ImageRef::Registry(r) => r.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_parse() {
        let cases = [
            ("oci:/x:t", "oci:/x:t"),
            ("docker://127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
            ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
            ("debian", "docker.io/library/debian:latest"),
        ];
        for (input, shown) in cases {
            assert_eq!(
                ImageRef::parse(input).unwrap().to_string(),
                shown,
                "{input}"
            );
        }
        for bad in ["oci:", "example.com/UPPER/case", "a b"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
