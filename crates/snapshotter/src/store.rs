//! The metadata store: one record per snapshot key, in a redb database.
//!
//! Every change is one redb write transaction, durable when it commits
//! (redb fsyncs before `commit` returns) and invisible if the process dies
//! before. Write transactions are exclusive, which is what makes concurrent
//! Prepare/Commit/Remove of one key safe: each sees the state the previous
//! one committed.
//!
//! Tables:
//! - `snapshots`: key → [`Record`] (JSON).
//! - `children`: parent key → child keys, so that removing a parent with
//!   children is refused without scanning every record.
//! - `meta`: the format version and the next snapshot id. Ids are never
//!   reused, so a directory left by a crash can never be mistaken for a
//!   snapshot created later.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::{
    Database, DatabaseError, MultimapTableDefinition, ReadableDatabase as _, ReadableMultimapTable,
    ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;

const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<'_, &str, &str> = MultimapTableDefinition::new("children");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

const FORMAT_KEY: &str = "format";
const NEXT_ID_KEY: &str = "next_id";
/// The record format this code reads and writes.
const FORMAT: u64 = 1;
/// How many children an error message names.
const CHILDREN_NAMED: usize = 3;

/// Snapshot labels (sorted, so records and listings are deterministic).
pub type Labels = BTreeMap<String, String>;

/// containerd's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Read-write, can be committed.
    Active,
    /// Read-only, cannot be committed.
    View,
    /// Immutable; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of one snapshot's own directory, parents excluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated.
    pub size: u64,
    /// Distinct inodes.
    pub inodes: u64,
}

/// Where a snapshot's `fs` directory gets its content from.
///
/// This is the extension point for layers this snapshotter does not write
/// itself. A variant for a Darter image mounted lazily (FUSE) at the
/// snapshot's `fs` directory keeps `lowerdir` and the directory layout as
/// they are; it adds what to do where these `match`es are: before the
/// directory is deleted (unmount), and when the snapshotter starts (mount
/// again, or adopt a mount handed over by the previous process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// A directory on the snapshotter's own filesystem: the bind mount or
    /// overlay upper directory containerd writes through, frozen by Commit.
    Directory,
    /// A Darter image mounted lazily (a `darter mount` daemon) at the
    /// snapshot's `fs` directory: the image's whole merged tree, fetched as
    /// it is read. Always committed. The record is written before the mount
    /// is made and forgotten before it is undone, so a snapshotter starting
    /// after a crash mounts again what a record names and unmounts what no
    /// record names.
    Remote {
        /// The image reference the mount serves (`REGISTRY/REPO:TAG`,
        /// `oci:PATH[:TAG]`).
        image: String,
        /// Where it is mounted: the snapshot's `fs` directory.
        mountpoint: PathBuf,
    },
}

/// What the store keeps per snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory (`snapshots/<id>`); kept by Commit.
    pub id: u64,
    pub kind: Kind,
    /// The parent's key: always a committed snapshot.
    pub parent: Option<String>,
    pub labels: Labels,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured when committed; active snapshots are measured on demand.
    pub usage: Option<Usage>,
    pub layer: Layer,
}

/// A snapshot: its key and record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub key: String,
    pub record: Record,
}

/// A snapshot to create.
#[derive(Debug)]
pub struct NewSnapshot<'a> {
    pub key: &'a str,
    pub parent: Option<&'a str>,
    pub kind: Kind,
    pub labels: Labels,
}

/// The metadata database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database at `path`. Only one process may have
    /// it open: a second one gets [`Error::Locked`].
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Database::create(path).map_err(|err| match err {
            DatabaseError::DatabaseAlreadyOpen => Error::Locked {
                path: path.to_path_buf(),
            },
            other => Error::db(other),
        })?;
        let txn = db.begin_write().map_err(Error::db)?;
        {
            txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            txn.open_multimap_table(CHILDREN).map_err(Error::db)?;
            let mut meta = txn.open_table(META).map_err(Error::db)?;
            let found = meta.get(FORMAT_KEY).map_err(Error::db)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(FORMAT_KEY, FORMAT).map_err(Error::db)?;
                }
                Some(FORMAT) => {}
                Some(found) => {
                    return Err(Error::UnsupportedFormat {
                        path: path.to_path_buf(),
                        found,
                        expected: FORMAT,
                    });
                }
            }
        }
        txn.commit().map_err(Error::db)?;
        Ok(Store { db })
    }

    /// The snapshot `key`.
    pub fn get(&self, key: &str) -> Result<Snapshot, Error> {
        Ok(self.get_with_parents(key)?.0)
    }

    /// The snapshot `key` and the ids of its parent chain, nearest first
    /// (the order of overlayfs' `lowerdir`), read at one point in time.
    pub fn get_with_parents(&self, key: &str) -> Result<(Snapshot, Vec<u64>), Error> {
        let txn = self.db.begin_read().map_err(Error::db)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
        let record = read(&snapshots, key)?.ok_or_else(|| not_found(key))?;
        let parents = parent_ids(&snapshots, key, record.parent.as_deref())?;
        Ok((
            Snapshot {
                key: key.to_owned(),
                record,
            },
            parents,
        ))
    }

    /// Every snapshot, sorted by key.
    pub fn list(&self) -> Result<Vec<Snapshot>, Error> {
        let txn = self.db.begin_read().map_err(Error::db)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
        let mut out = Vec::new();
        for entry in snapshots.iter().map_err(Error::db)? {
            let (key, value) = entry.map_err(Error::db)?;
            out.push(Snapshot {
                key: key.value().to_owned(),
                record: decode(key.value(), value.value())?,
            });
        }
        Ok(out)
    }

    /// Records a new active snapshot or view and returns it with its parent
    /// ids. `place(id)` runs inside the transaction, before it commits: it
    /// puts the snapshot's directory in place, so that a committed record
    /// always has its directory. If `place` fails nothing is recorded; if
    /// the process dies after `place`, the directory is an orphan that
    /// [`Store::with_writers_paused`] lets the caller find.
    pub fn create(
        &self,
        new: NewSnapshot<'_>,
        place: impl FnOnce(u64) -> Result<(), Error>,
    ) -> Result<(Snapshot, Vec<u64>), Error> {
        self.insert(new, |_| Layer::Directory, None, place)
    }

    /// Records the committed snapshot `new.key` (whose `kind` must be
    /// committed) directly, with no active snapshot before it: a layer this
    /// snapshotter did not write. `layer_of(id)` says where its files come
    /// from; `place` as for [`Store::create`].
    pub fn create_committed(
        &self,
        new: NewSnapshot<'_>,
        layer_of: impl FnOnce(u64) -> Layer,
        place: impl FnOnce(u64) -> Result<(), Error>,
    ) -> Result<Snapshot, Error> {
        if new.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "snapshot {:?} would be recorded committed while {}",
                new.key,
                new.kind.name()
            )));
        }
        Ok(self.insert(new, layer_of, Some(Usage::default()), place)?.0)
    }

    fn insert(
        &self,
        new: NewSnapshot<'_>,
        layer_of: impl FnOnce(u64) -> Layer,
        usage: Option<Usage>,
        place: impl FnOnce(u64) -> Result<(), Error>,
    ) -> Result<(Snapshot, Vec<u64>), Error> {
        let txn = self.db.begin_write().map_err(Error::db)?;
        let created = {
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            if read(&snapshots, new.key)?.is_some() {
                return Err(Error::AlreadyExists {
                    key: new.key.to_owned(),
                });
            }
            let parents = match new.parent {
                None => Vec::new(),
                Some(parent) => committed_parent_chain(&snapshots, new.key, parent)?,
            };
            let id = take_next_id(&txn)?;
            let now = SystemTime::now();
            let record = Record {
                id,
                kind: new.kind,
                parent: new.parent.map(str::to_owned),
                labels: new.labels,
                created: now,
                updated: now,
                usage,
                layer: layer_of(id),
            };
            write(&mut snapshots, new.key, &record)?;
            if let Some(parent) = new.parent {
                let mut children = txn.open_multimap_table(CHILDREN).map_err(Error::db)?;
                children.insert(parent, new.key).map_err(Error::db)?;
            }
            place(id)?;
            (
                Snapshot {
                    key: new.key.to_owned(),
                    record,
                },
                parents,
            )
        };
        txn.commit().map_err(Error::db)?;
        Ok(created)
    }

    /// Turns the active snapshot `key` (which must still have id `id`) into
    /// the committed snapshot `name` with `labels` (not inherited) and
    /// `usage`. The directory stays where it is.
    pub fn commit(
        &self,
        key: &str,
        id: u64,
        name: &str,
        labels: Labels,
        usage: Usage,
    ) -> Result<Snapshot, Error> {
        let txn = self.db.begin_write().map_err(Error::db)?;
        let committed = {
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            let active = read(&snapshots, key)?
                .filter(|record| record.id == id)
                .ok_or_else(|| not_found(key))?;
            if active.kind != Kind::Active {
                return Err(Error::NotActive {
                    key: key.to_owned(),
                    kind: active.kind.name(),
                });
            }
            if read(&snapshots, name)?.is_some() {
                return Err(Error::AlreadyExists {
                    key: name.to_owned(),
                });
            }
            let now = SystemTime::now();
            let record = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                usage: Some(usage),
                ..active
            };
            snapshots.remove(key).map_err(Error::db)?;
            write(&mut snapshots, name, &record)?;
            if let Some(parent) = record.parent.as_deref() {
                let mut children = txn.open_multimap_table(CHILDREN).map_err(Error::db)?;
                children.remove(parent, key).map_err(Error::db)?;
                children.insert(parent, name).map_err(Error::db)?;
            }
            Snapshot {
                key: name.to_owned(),
                record,
            }
        };
        txn.commit().map_err(Error::db)?;
        Ok(committed)
    }

    /// Forgets the snapshot `key`, refusing while it has children. Returns
    /// what it was; its directory is now the caller's to delete.
    pub fn remove(&self, key: &str) -> Result<Snapshot, Error> {
        let txn = self.db.begin_write().map_err(Error::db)?;
        let removed = {
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            let record = read(&snapshots, key)?.ok_or_else(|| not_found(key))?;
            let mut children = txn.open_multimap_table(CHILDREN).map_err(Error::db)?;
            let named = child_keys(&children, key, CHILDREN_NAMED + 1)?;
            if !named.is_empty() {
                return Err(Error::HasChildren {
                    key: key.to_owned(),
                    children: name_some(&named),
                });
            }
            snapshots.remove(key).map_err(Error::db)?;
            if let Some(parent) = record.parent.as_deref() {
                children.remove(parent, key).map_err(Error::db)?;
            }
            Snapshot {
                key: key.to_owned(),
                record,
            }
        };
        txn.commit().map_err(Error::db)?;
        Ok(removed)
    }

    /// Changes the labels of `key` with `change` and stamps it updated.
    pub fn update_labels(
        &self,
        key: &str,
        change: impl FnOnce(&mut Labels) -> Result<(), Error>,
    ) -> Result<Snapshot, Error> {
        let txn = self.db.begin_write().map_err(Error::db)?;
        let updated = {
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            let mut record = read(&snapshots, key)?.ok_or_else(|| not_found(key))?;
            change(&mut record.labels)?;
            record.updated = SystemTime::now();
            write(&mut snapshots, key, &record)?;
            Snapshot {
                key: key.to_owned(),
                record,
            }
        };
        txn.commit().map_err(Error::db)?;
        Ok(updated)
    }

    /// Runs `f` with the ids of every recorded snapshot while no snapshot
    /// can be created or removed (it holds the write lock and commits
    /// nothing): what a sweep of orphan directories needs, since `create`
    /// places a directory before its record commits.
    pub fn with_writers_paused<T>(&self, f: impl FnOnce(&BTreeSet<u64>) -> T) -> Result<T, Error> {
        let txn = self.db.begin_write().map_err(Error::db)?;
        let ids = {
            let snapshots = txn.open_table(SNAPSHOTS).map_err(Error::db)?;
            let mut ids = BTreeSet::new();
            for entry in snapshots.iter().map_err(Error::db)? {
                let (key, value) = entry.map_err(Error::db)?;
                ids.insert(decode(key.value(), value.value())?.id);
            }
            ids
        };
        let out = f(&ids);
        txn.abort().map_err(Error::db)?;
        Ok(out)
    }
}

fn not_found(key: &str) -> Error {
    Error::NotFound {
        key: key.to_owned(),
    }
}

fn read(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>, Error> {
    match table.get(key).map_err(Error::db)? {
        Some(value) => decode(key, value.value()).map(Some),
        None => Ok(None),
    }
}

fn write(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    record: &Record,
) -> Result<(), Error> {
    let bytes = serde_json::to_vec(record).map_err(|err| Error::Corrupt {
        key: key.to_owned(),
        message: err.to_string(),
    })?;
    table.insert(key, bytes.as_slice()).map_err(Error::db)?;
    Ok(())
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(bytes).map_err(|err| Error::Corrupt {
        key: key.to_owned(),
        message: err.to_string(),
    })
}

/// The ids of `parent` (which must exist and be committed) and its
/// ancestors, nearest first.
fn committed_parent_chain(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    parent: &str,
) -> Result<Vec<u64>, Error> {
    let record = read(table, parent)?.ok_or_else(|| Error::ParentNotFound {
        key: key.to_owned(),
        parent: parent.to_owned(),
    })?;
    if record.kind != Kind::Committed {
        return Err(Error::ParentNotCommitted {
            key: key.to_owned(),
            parent: parent.to_owned(),
            kind: record.kind.name(),
        });
    }
    parent_ids(table, key, Some(parent))
}

/// The ids of the chain that starts at `parent`, nearest first. A missing
/// ancestor or a loop can only come from a damaged database.
fn parent_ids(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    parent: Option<&str>,
) -> Result<Vec<u64>, Error> {
    let mut ids = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = parent.map(str::to_owned);
    while let Some(name) = next {
        let record = read(table, &name)?.ok_or_else(|| Error::Corrupt {
            key: key.to_owned(),
            message: format!("ancestor {name:?} is missing"),
        })?;
        if !seen.insert(record.id) {
            return Err(Error::Corrupt {
                key: key.to_owned(),
                message: format!("its parent chain loops at {name:?}"),
            });
        }
        ids.push(record.id);
        next = record.parent;
    }
    Ok(ids)
}

/// Up to `limit` children of `key`.
fn child_keys(
    children: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
    limit: usize,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for child in children.get(key).map_err(Error::db)?.take(limit) {
        out.push(child.map_err(Error::db)?.value().to_owned());
    }
    Ok(out)
}

/// `"a", "b", "c", ...` for at most [`CHILDREN_NAMED`] names.
fn name_some(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(CHILDREN_NAMED)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > CHILDREN_NAMED {
        text.push_str(", ...");
    }
    text
}

/// Allocates the next snapshot id (1, 2, ...) in `txn`.
fn take_next_id(txn: &WriteTransaction) -> Result<u64, Error> {
    let mut meta = txn.open_table(META).map_err(Error::db)?;
    let id = meta
        .get(NEXT_ID_KEY)
        .map_err(Error::db)?
        .map_or(1, |v| v.value());
    meta.insert(NEXT_ID_KEY, id + 1).map_err(Error::db)?;
    Ok(id)
}

/// The path of the database inside a snapshotter root.
pub fn database_path(root: &Path) -> PathBuf {
    root.join("metadata.redb")
}

#[cfg(test)]
mod tests;
