//! The push journal: what a build's push to a registry got done, kept in a
//! small file so that a rerun after an interruption need not send it again.
//!
//! A journal belongs to one destination repository and one build (its
//! source, parent and the settings that shape its output) and says, per
//! data blob (the `n`th blob the build streams), either the digest and size
//! of the blob the push completed or where its unfinished upload session
//! stood. It only ever gives hints: a rerun checks the registry and the
//! bytes it rebuilds, so a stale, wrong or hostile journal costs uploads,
//! never a wrong image. A file that cannot be read or parsed is ignored
//! with a warning; a push that completes removes it.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use darter_oci::OciDigest;
use darter_registry::UploadCheckpoint;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The file format's version; files of other versions are ignored.
const VERSION: u32 = 1;
/// Larger files are not journals Darter wrote (one holds a few hundred
/// bytes per blob).
const MAX_JOURNAL_SIZE: u64 = 1 << 20;
/// Journals of pushes that never completed are deleted after this long
/// (registries purge upload sessions after about a week).
const STALE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a journal file was not used or not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    /// Reading, writing or removing the file failed.
    #[error("{op} push journal {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The file is not a journal of this push.
    #[error("push journal {path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// What the journal says about one data blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobHint {
    /// The push completed this blob.
    Complete {
        /// Its digest.
        digest: OciDigest,
        /// Its size.
        size: u64,
    },
    /// The push was uploading this blob; the session stood here.
    Partial(UploadCheckpoint),
}

/// The journal of one build's push to one repository.
#[derive(Debug)]
pub(crate) struct PushJournal {
    dir: PathBuf,
    path: PathBuf,
    target: String,
    build: String,
    blobs: BTreeMap<usize, BlobHint>,
    /// Cleared after a write failed: one warning, then no more attempts.
    writable: bool,
}

/// The file, as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalFile {
    version: u32,
    target: String,
    build: String,
    blobs: BTreeMap<usize, BlobRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum BlobRecord {
    Complete { digest: String, size: u64 },
    Partial { session: String, uploaded: u64 },
}

impl PushJournal {
    /// The journal in `dir` of the push of build `build` to repository
    /// `target`, with what an earlier run recorded (nothing if there is no
    /// usable file). Also deletes journals in `dir` too old to be of use.
    pub(crate) fn open(dir: &Path, target: &str, build: &str) -> PushJournal {
        let key = OciDigest::of(format!("{target}\n{build}").as_bytes());
        let path = dir.join(format!("{}.json", key.hex()));
        let mut journal = PushJournal {
            dir: dir.to_owned(),
            path,
            target: target.to_owned(),
            build: build.to_owned(),
            blobs: BTreeMap::new(),
            writable: true,
        };
        match journal.load() {
            Ok(Some(blobs)) => {
                debug!(journal = %journal.path.display(), blobs = blobs.len(), "resuming an interrupted push");
                journal.blobs = blobs;
            }
            Ok(None) => {}
            Err(e) => warn!("ignoring {e}"),
        }
        remove_stale(dir, &journal.path);
        journal
    }

    /// The directory the journal lives in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// What an earlier run recorded about data blob `ordinal`.
    pub(crate) fn hint(&self, ordinal: usize) -> Option<&BlobHint> {
        self.blobs.get(&ordinal)
    }

    /// Records where data blob `ordinal` stands (`None`: nowhere worth
    /// remembering) and writes the journal. A failure to write is logged
    /// (once): the journal is only a hint.
    pub(crate) fn record(&mut self, ordinal: usize, hint: Option<BlobHint>) {
        if self.blobs.get(&ordinal) == hint.as_ref() {
            return;
        }
        match hint {
            Some(hint) => self.blobs.insert(ordinal, hint),
            None => self.blobs.remove(&ordinal),
        };
        if !self.writable {
            return;
        }
        if let Err(e) = self.save() {
            warn!("{e}; an interrupted push will start over");
            self.writable = false;
        }
    }

    /// The push completed: the journal is removed.
    pub(crate) fn complete(&mut self) {
        self.blobs.clear();
        match std::fs::remove_file(&self.path) {
            Ok(()) => debug!(journal = %self.path.display(), "push complete, journal removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => warn!(
                "{}",
                JournalError::Io {
                    op: "remove",
                    path: self.path.clone(),
                    source
                }
            ),
        }
    }

    fn load(&self) -> Result<Option<BTreeMap<usize, BlobHint>>, JournalError> {
        let io_error = |source| JournalError::Io {
            op: "read",
            path: self.path.clone(),
            source,
        };
        let invalid = |detail: String| JournalError::Invalid {
            path: self.path.clone(),
            detail,
        };
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_JOURNAL_SIZE + 1)
            .read_to_end(&mut text)
            .map_err(io_error)?;
        if text.len() as u64 > MAX_JOURNAL_SIZE {
            return Err(invalid(format!("larger than {MAX_JOURNAL_SIZE} bytes")));
        }
        let file: JournalFile =
            serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        if file.version != VERSION {
            return Err(invalid(format!(
                "version {} is not {VERSION}",
                file.version
            )));
        }
        if file.target != self.target || file.build != self.build {
            return Err(invalid("written for another push".to_owned()));
        }
        let mut blobs = BTreeMap::new();
        for (ordinal, record) in file.blobs {
            let hint = record
                .into_hint()
                .map_err(|detail| invalid(format!("blob {ordinal}: {detail}")))?;
            blobs.insert(ordinal, hint);
        }
        Ok(Some(blobs))
    }

    /// Writes the journal to a temporary file, then renames it over the old
    /// one: a reader sees the old or the new journal, never a mix. Only the
    /// owner may read it: session URLs can carry credentials.
    fn save(&self) -> Result<(), JournalError> {
        let io_error = |op, path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { op, path, source }
        };
        let file = JournalFile {
            version: VERSION,
            target: self.target.clone(),
            build: self.build.clone(),
            blobs: (self.blobs.iter())
                .map(|(&ordinal, hint)| (ordinal, BlobRecord::from_hint(hint)))
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file)
            .map_err(|e| io_error("encode", &self.path)(io::Error::other(e)))?;
        std::fs::create_dir_all(&self.dir).map_err(io_error("create", &self.dir))?;
        let temp = self
            .path
            .with_extension(format!("{}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| f.write_all(&text));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(io_error("write", &temp)(e));
        }
        std::fs::rename(&temp, &self.path).map_err(io_error("replace", &self.path))
    }
}

impl BlobRecord {
    fn from_hint(hint: &BlobHint) -> BlobRecord {
        match hint {
            BlobHint::Complete { digest, size } => BlobRecord::Complete {
                digest: digest.to_string(),
                size: *size,
            },
            BlobHint::Partial(checkpoint) => BlobRecord::Partial {
                session: checkpoint.session_url().to_owned(),
                uploaded: checkpoint.uploaded(),
            },
        }
    }

    fn into_hint(self) -> Result<BlobHint, String> {
        match self {
            BlobRecord::Complete { digest, size } => Ok(BlobHint::Complete {
                digest: digest.parse()?,
                size,
            }),
            BlobRecord::Partial { session, uploaded } => {
                UploadCheckpoint::from_parts(&session, uploaded)
                    .map(BlobHint::Partial)
                    .ok_or_else(|| "the upload session is not an http(s) URL".to_owned())
            }
        }
    }
}

/// Deletes the files in `dir` (journals, temporary files of writers that
/// died) not modified for [`STALE_AFTER`], except `keep`. Best effort.
fn remove_stale(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if stale && path != keep {
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(file = %path.display(), "stale push journal removed"),
                Err(e) => {
                    debug!(file = %path.display(), error = %e, "cannot remove a stale push journal")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "registry.example/app";
    const BUILD: &str = "source=/src\nsettings=zstd";

    fn complete(seed: &str, size: u64) -> BlobHint {
        BlobHint::Complete {
            digest: OciDigest::of(seed.as_bytes()),
            size,
        }
    }

    fn partial(url: &str, uploaded: u64) -> BlobHint {
        BlobHint::Partial(UploadCheckpoint::from_parts(url, uploaded).unwrap())
    }

    #[test]
    fn a_journal_reads_back_what_was_recorded_until_the_push_completes() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("push-journal");
        let session = "http://r.example/v2/app/blobs/uploads/u?_state=s";
        let mut journal = PushJournal::open(&journal_dir, TARGET, BUILD);
        assert_eq!(journal.hint(0), None);
        journal.record(0, Some(complete("a", 10)));
        journal.record(1, Some(complete("b", 20)));
        journal.record(2, Some(partial(session, 8 << 20)));
        journal.record(1, None);

        let mut reopened = PushJournal::open(&journal_dir, TARGET, BUILD);
        assert_eq!(reopened.hint(0), Some(&complete("a", 10)));
        assert_eq!(reopened.hint(1), None);
        assert_eq!(reopened.hint(2), Some(&partial(session, 8 << 20)));
        let mode = std::fs::metadata(&reopened.path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        // Another build or another repository has a journal of its own.
        assert_eq!(
            PushJournal::open(&journal_dir, TARGET, "other").hint(0),
            None
        );
        assert_eq!(
            PushJournal::open(&journal_dir, "r/other", BUILD).hint(0),
            None
        );

        reopened.complete();
        assert_eq!(std::fs::read_dir(&journal_dir).unwrap().count(), 0);
        assert_eq!(PushJournal::open(&journal_dir, TARGET, BUILD).hint(0), None);
    }

    #[test]
    fn an_unusable_journal_file_is_ignored_and_replaced() {
        let valid_partial =
            r#"{"state":"partial","session":"http://h/v2/app/blobs/uploads/u","uploaded":5}"#;
        let file = |version: u32, target: &str, blob: &str| {
            format!(
                r#"{{"version":{version},"target":"{target}","build":{BUILD:?},"blobs":{{"0":{blob}}}}}"#
            )
        };
        let cases = [
            String::new(),
            "not json".to_owned(),
            "{}".to_owned(),
            "[1,2,3]".to_owned(),
            " ".repeat(MAX_JOURNAL_SIZE as usize + 1),
            file(VERSION + 1, TARGET, valid_partial),
            file(VERSION, "registry.example/elsewhere", valid_partial),
            file(
                VERSION,
                TARGET,
                r#"{"state":"complete","digest":"sha256:00","size":1}"#,
            ),
            file(
                VERSION,
                TARGET,
                r#"{"state":"complete","digest":"md5:00","size":-1}"#,
            ),
            file(
                VERSION,
                TARGET,
                r#"{"state":"partial","session":"/relative","uploaded":5}"#,
            ),
            file(
                VERSION,
                TARGET,
                r#"{"state":"partial","session":"file:///etc/passwd","uploaded":5}"#,
            ),
            file(VERSION, TARGET, r#"{"state":"gone"}"#),
            file(VERSION, TARGET, valid_partial).replace(r#""0":"#, r#""-1":"#),
        ];
        // The file that works, so the cases above fail for their own reason.
        let good = file(VERSION, TARGET, valid_partial);
        let dir = tempfile::tempdir().unwrap();
        let path = PushJournal::open(dir.path(), TARGET, BUILD).path;
        std::fs::write(&path, &good).unwrap();
        let journal = PushJournal::open(dir.path(), TARGET, BUILD);
        assert!(
            matches!(journal.hint(0), Some(BlobHint::Partial(_))),
            "{good}"
        );
        for text in cases {
            std::fs::write(&path, &text).unwrap();
            let mut journal = PushJournal::open(dir.path(), TARGET, BUILD);
            assert_eq!(journal.hint(0), None, "{text:.200}");
            journal.record(1, Some(complete("b", 3)));
            let journal = PushJournal::open(dir.path(), TARGET, BUILD);
            assert_eq!(journal.hint(1), Some(&complete("b", 3)), "{text:.200}");
        }
    }

    #[test]
    fn a_journal_that_cannot_be_written_only_costs_the_hints() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        // The journal directory would have to be inside a regular file.
        let mut journal = PushJournal::open(&blocker.join("journal"), TARGET, BUILD);
        journal.record(0, Some(complete("a", 1)));
        assert!(!journal.writable);
        assert_eq!(journal.hint(0), Some(&complete("a", 1)));
        journal.complete();
    }

    #[test]
    fn journals_untouched_for_a_month_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.json");
        let recent = dir.path().join("recent.json");
        for path in [&old, &recent] {
            std::fs::write(path, b"{}").unwrap();
        }
        let long_ago = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        PushJournal::open(dir.path(), TARGET, BUILD);
        assert!(!old.exists());
        assert!(recent.exists());
    }
}
