//! The `oci:PATH[:TAG]` image reference, as skopeo spells it.

use std::path::PathBuf;

/// An image in a local OCI layout directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory.
    pub path: PathBuf,
    /// The tag (`org.opencontainers.image.ref.name`), if given.
    pub tag: Option<String>,
}

/// Why an `oci:` reference is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Not an `oci:` reference.
    #[error("{0:?} is not an oci:PATH[:TAG] reference")]
    NotLayout(String),
    /// Empty path.
    #[error("{0:?} has an empty path")]
    EmptyPath(String),
    /// Invalid tag.
    #[error("{reference:?} has an invalid tag {tag:?}")]
    BadTag {
        /// The reference.
        reference: String,
        /// The tag.
        tag: String,
    },
}

impl LayoutRef {
    /// Parses `oci:PATH[:TAG]`. Like skopeo, the path ends at the first `:`.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let rest = s
            .strip_prefix("oci:")
            .ok_or_else(|| ReferenceError::NotLayout(s.into()))?;
        let (path, tag) = match rest.split_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(ReferenceError::EmptyPath(s.into()));
        }
        if let Some(t) = tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(ReferenceError::BadTag {
                    reference: s.into(),
                    tag: t.into(),
                });
            }
        }
        Ok(LayoutRef {
            path: PathBuf::from(path),
            tag: tag.map(str::to_owned),
        })
    }
}

impl std::fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}", self.path.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            ("oci:/tmp/x", "/tmp/x", None),
            ("oci:/tmp/x:latest", "/tmp/x", Some("latest")),
            ("oci:rel/dir:v1.2_3-a", "rel/dir", Some("v1.2_3-a")),
        ];
        for (s, path, tag) in ok {
            let r = LayoutRef::parse(s).unwrap();
            assert_eq!((r.path.to_str().unwrap(), r.tag.as_deref()), (path, tag));
            assert_eq!(r.to_string(), s);
        }
        for bad in [
            "docker://x",
            "oci:",
            "oci::tag",
            "oci:/x:",
            "oci:/x:a/b",
            "oci:/x:a:b",
        ] {
            assert!(LayoutRef::parse(bad).is_err(), "{bad}");
        }
    }
}
