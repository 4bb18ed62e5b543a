use super::*;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&database_path(dir.path())).unwrap();
    (dir, store)
}

fn new<'a>(key: &'a str, parent: Option<&'a str>, kind: Kind) -> NewSnapshot<'a> {
    NewSnapshot {
        key,
        parent,
        kind,
        labels: Labels::new(),
    }
}

/// Creates `key` (placing nothing) and returns its id.
fn create(store: &Store, key: &str, parent: Option<&str>, kind: Kind) -> u64 {
    store
        .create(new(key, parent, kind), |_| Ok(()))
        .unwrap()
        .0
        .record
        .id
}

/// Creates and commits `name` on `parent`; returns its id.
fn layer(store: &Store, name: &str, parent: Option<&str>) -> u64 {
    let key = format!("extract {name}");
    let id = create(store, &key, parent, Kind::Active);
    store
        .commit(&key, id, name, Labels::new(), Usage::default())
        .unwrap();
    id
}

#[test]
fn parent_chains_are_nearest_first() {
    let (_dir, store) = open();
    let base = layer(&store, "base", None);
    let middle = layer(&store, "middle", Some("base"));
    let top = layer(&store, "top", Some("middle"));
    let (container, parents) = store
        .create(new("container", Some("top"), Kind::Active), |_| Ok(()))
        .unwrap();
    assert_eq!(parents, [top, middle, base]);
    assert_eq!(container.record.parent.as_deref(), Some("top"));
    assert_eq!(
        store.get_with_parents("container").unwrap().1,
        [top, middle, base]
    );
    assert_eq!(store.get_with_parents("base").unwrap().1, Vec::<u64>::new());
}

#[test]
fn ids_are_never_reused() {
    let (_dir, store) = open();
    let first = create(&store, "a", None, Kind::Active);
    store.remove("a").unwrap();
    let second = create(&store, "a", None, Kind::Active);
    assert!(second > first, "{second} after {first}");
}

#[test]
fn commit_keeps_the_id_and_parent_and_replaces_labels() {
    let (_dir, store) = open();
    layer(&store, "base", None);
    let labels = Labels::from([("from".to_owned(), "prepare".to_owned())]);
    let (active, _) = store
        .create(
            NewSnapshot {
                labels,
                ..new("key", Some("base"), Kind::Active)
            },
            |_| Ok(()),
        )
        .unwrap();
    let committed_labels = Labels::from([("from".to_owned(), "commit".to_owned())]);
    let usage = Usage {
        size: 8192,
        inodes: 3,
    };
    let committed = store
        .commit(
            "key",
            active.record.id,
            "name",
            committed_labels.clone(),
            usage,
        )
        .unwrap();
    assert_eq!(committed.record.id, active.record.id);
    assert_eq!(committed.record.kind, Kind::Committed);
    assert_eq!(committed.record.parent.as_deref(), Some("base"));
    assert_eq!(committed.record.labels, committed_labels);
    assert_eq!(committed.record.usage, Some(usage));
    assert!(matches!(store.get("key"), Err(Error::NotFound { .. })));
    assert_eq!(store.get("name").unwrap(), committed);
    // The parent's child link followed the rename.
    assert!(
        matches!(store.remove("base"), Err(Error::HasChildren { children, .. }) if children == "\"name\"")
    );
}

#[test]
fn refusals_name_the_snapshot_and_change_nothing() {
    let (_dir, store) = open();
    layer(&store, "base", None);
    let active = create(&store, "active", Some("base"), Kind::Active);
    let view = create(&store, "view", Some("base"), Kind::View);
    let before = store.list().unwrap();
    let cases: Vec<(&str, Result<Snapshot, Error>)> = vec![
        (
            "prepare existing",
            store
                .create(new("active", None, Kind::Active), |_| Ok(()))
                .map(|c| c.0),
        ),
        (
            "missing parent",
            store
                .create(new("x", Some("nope"), Kind::Active), |_| Ok(()))
                .map(|c| c.0),
        ),
        (
            "active parent",
            store
                .create(new("x", Some("active"), Kind::View), |_| Ok(()))
                .map(|c| c.0),
        ),
        (
            "commit a view",
            store.commit("view", view, "n", Labels::new(), Usage::default()),
        ),
        (
            "commit onto a name",
            store.commit("active", active, "base", Labels::new(), Usage::default()),
        ),
        (
            "commit a replaced key",
            store.commit("active", active + 100, "n", Labels::new(), Usage::default()),
        ),
        (
            "commit missing",
            store.commit("nope", 1, "n", Labels::new(), Usage::default()),
        ),
        ("remove a parent", store.remove("base")),
        ("remove missing", store.remove("nope")),
    ];
    let expected = [
        "snapshot \"active\" already exists",
        "parent \"nope\" of snapshot \"x\" does not exist",
        "parent \"active\" of snapshot \"x\" is active, not committed",
        "snapshot \"view\" is view; only an active snapshot can be committed",
        "snapshot \"base\" already exists",
        "snapshot \"active\" does not exist",
        "snapshot \"nope\" does not exist",
        "snapshot \"base\" has children (\"active\", \"view\"); remove them first",
        "snapshot \"nope\" does not exist",
    ];
    for ((what, result), expected) in cases.into_iter().zip(expected) {
        let err = result.expect_err(what);
        assert_eq!(err.to_string(), expected, "{what}");
    }
    assert_eq!(store.list().unwrap(), before);
}

#[test]
fn removing_children_frees_the_parent() {
    let (_dir, store) = open();
    layer(&store, "base", None);
    create(&store, "a", Some("base"), Kind::Active);
    create(&store, "b", Some("base"), Kind::View);
    store.remove("a").unwrap();
    assert!(matches!(
        store.remove("base"),
        Err(Error::HasChildren { .. })
    ));
    store.remove("b").unwrap();
    store.remove("base").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_failed_placement_records_nothing_and_keeps_the_id() {
    let (_dir, store) = open();
    let placed = std::cell::Cell::new(None);
    let err = store
        .create(new("a", None, Kind::Active), |id| {
            placed.set(Some(id));
            Err(Error::InvalidArgument("disk full".into()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(matches!(store.get("a"), Err(Error::NotFound { .. })));
    // The id was not taken: the transaction rolled back as a whole.
    assert_eq!(Some(create(&store, "a", None, Kind::Active)), placed.get());
}

#[test]
fn records_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(dir.path());
    let before = {
        let store = Store::open(&path).unwrap();
        layer(&store, "base", None);
        create(&store, "c", Some("base"), Kind::Active);
        store
            .update_labels("base", |labels| {
                labels.insert("k".into(), "v".into());
                Ok(())
            })
            .unwrap();
        store.list().unwrap()
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(store.list().unwrap(), before);
    assert_eq!(store.get("base").unwrap().record.labels["k"], "v");
}

#[test]
fn a_second_process_cannot_open_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(dir.path());
    let _first = Store::open(&path).unwrap();
    assert!(matches!(Store::open(&path), Err(Error::Locked { .. })));
}

#[test]
fn a_database_of_another_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(dir.path());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(FORMAT_KEY, 99)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedFormat { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn a_corrupt_record_is_an_error_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(dir.path());
    drop(Store::open(&path).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SNAPSHOTS)
            .unwrap()
            .insert("bad", b"{not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let err = store.get("bad").unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { key, .. } if key == "bad"),
        "{err}"
    );
    assert!(store.list().is_err());
}

#[test]
fn writers_wait_while_paused() {
    let (_dir, store) = open();
    let id = create(&store, "a", None, Kind::Active);
    let store = std::sync::Arc::new(store);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (created_tx, created_rx) = std::sync::mpsc::channel();
    let ids = store
        .with_writers_paused(|ids| {
            let writer = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                started_tx.send(()).unwrap();
                create(&writer, "b", None, Kind::Active);
                created_tx.send(()).unwrap();
            });
            started_rx.recv().unwrap();
            // The writer started but cannot get in while we hold the lock.
            let early = created_rx.recv_timeout(std::time::Duration::from_millis(200));
            assert!(early.is_err());
            ids.clone()
        })
        .unwrap();
    assert_eq!(ids, BTreeSet::from([id]));
    created_rx.recv().unwrap();
    assert!(store.get("b").is_ok());
}
