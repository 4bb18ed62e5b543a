//! The mirror's short memory of admissions: which client the upstream
//! registry let read which blob, and the blob's size. A client reading a
//! blob in many `Range` GETs (a lazy mount reads chunk by chunk) costs one
//! upstream `HEAD` per [`ADMISSION_TTL`] instead of one per GET.
//!
//! Only admissions are remembered, never refusals: a client the registry
//! refused is asked about again at its next request. Clients are told
//! apart by a sha256 of their `Authorization` header; the header itself is
//! not kept. A client whose access is revoked upstream keeps reading a
//! blob it was admitted to for at most the TTL.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::piece::BlobDigest;

/// How long an admission stands.
pub const ADMISSION_TTL: Duration = Duration::from_secs(60);
/// Most admissions remembered at once.
pub const MAX_ADMISSIONS: usize = 4096;

/// Who asked for what: a hash of the client's credentials (or of their
/// absence), the repository and the blob's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdmissionKey([u8; 32]);

impl AdmissionKey {
    pub fn new(
        authorization: Option<&[u8]>,
        repository: &str,
        digest: &BlobDigest,
    ) -> AdmissionKey {
        let mut hasher = Sha256::new();
        // Length prefixes keep the fields apart.
        match authorization {
            Some(credentials) => {
                hasher.update([1]);
                hasher.update((credentials.len() as u64).to_be_bytes());
                hasher.update(credentials);
            }
            None => hasher.update([0]),
        }
        hasher.update((repository.len() as u64).to_be_bytes());
        hasher.update(repository.as_bytes());
        hasher.update(digest.to_string().as_bytes());
        AdmissionKey(hasher.finalize().into())
    }
}

#[derive(Debug, Clone, Copy)]
struct Admitted {
    size: u64,
    until: Instant,
}

/// Admissions, each standing for a while, at most a bounded number.
#[derive(Debug)]
pub struct Admissions {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<AdmissionKey, Admitted>>,
}

impl Default for Admissions {
    fn default() -> Admissions {
        Admissions::new(ADMISSION_TTL, MAX_ADMISSIONS)
    }
}

impl Admissions {
    pub fn new(ttl: Duration, capacity: usize) -> Admissions {
        Admissions {
            ttl,
            capacity,
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<AdmissionKey, Admitted>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The blob's size, if `key` was admitted less than the TTL before `now`.
    pub fn admitted(&self, key: &AdmissionKey, now: Instant) -> Option<u64> {
        let mut entries = self.entries();
        match entries.get(key) {
            Some(admitted) if now < admitted.until => Some(admitted.size),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Records that the upstream registry admitted `key` at `now` to a
    /// blob of `size` bytes. When full, expired admissions go first, then
    /// the oldest.
    pub fn admit(&self, key: AdmissionKey, size: u64, now: Instant) {
        let mut entries = self.entries();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, admitted| now < admitted.until);
            while entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, admitted)| admitted.until)
                    .map(|(key, _)| *key);
                let Some(oldest) = oldest else { break };
                entries.remove(&oldest);
            }
        }
        if self.capacity > 0 {
            let until = now + self.ttl;
            entries.insert(key, Admitted { size, until });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> BlobDigest {
        BlobDigest::of(&[n])
    }

    #[test]
    fn keys_differ_in_credentials_repository_and_digest() {
        let key = |credentials: Option<&[u8]>, repository, n| {
            AdmissionKey::new(credentials, repository, &digest(n))
        };
        let alice: Option<&[u8]> = Some(b"Basic YQ==");
        let base = key(alice, "a/b", 1);
        for (other, what) in [
            (key(Some(b"Basic Yg=="), "a/b", 1), "credentials"),
            (key(None, "a/b", 1), "no credentials"),
            (key(Some(b""), "a/b", 1), "empty credentials"),
            (key(alice, "a/c", 1), "repository"),
            (key(alice, "a/b", 2), "digest"),
        ] {
            assert_ne!(base, other, "{what}");
        }
        assert_eq!(base, key(alice, "a/b", 1));
        assert!(!format!("{base:?}").contains("YQ=="));
    }

    #[test]
    fn an_admission_stands_for_the_ttl_and_only_for_its_key() {
        let admissions = Admissions::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        let key = AdmissionKey::new(Some(b"Bearer t"), "a", &digest(1));
        let stranger = AdmissionKey::new(Some(b"Bearer u"), "a", &digest(1));
        assert_eq!(admissions.admitted(&key, now), None);
        admissions.admit(key, 42, now);
        for (at, expected) in [
            (now, Some(42)),
            (now + Duration::from_secs(59), Some(42)),
            (now + Duration::from_secs(60), None),
            (now + Duration::from_secs(1), None),
        ] {
            assert_eq!(admissions.admitted(&key, at), expected, "{at:?}");
        }
        assert_eq!(admissions.admitted(&stranger, now), None);
    }

    #[test]
    fn admissions_are_bounded_and_the_oldest_go_first() {
        let admissions = Admissions::new(Duration::from_secs(60), 3);
        let start = Instant::now();
        let keys: Vec<_> = (0..5)
            .map(|n| AdmissionKey::new(None, "a", &digest(n)))
            .collect();
        for (n, key) in keys.iter().enumerate() {
            admissions.admit(*key, n as u64, start + Duration::from_secs(n as u64));
            assert!(admissions.len() <= 3);
        }
        let now = start + Duration::from_secs(5);
        let left: Vec<_> = keys.iter().map(|k| admissions.admitted(k, now)).collect();
        assert_eq!(left, [None, None, Some(2), Some(3), Some(4)]);
        let none = Admissions::new(Duration::from_secs(60), 0);
        none.admit(keys[0], 1, start);
        assert_eq!(none.admitted(&keys[0], start), None);
    }
}
