//! Snapshots as files: built by streaming the tables out, installed by
//! streaming them in, refused whole when the file is damaged or of another
//! format version, converted from the JSON snapshot of older releases, and
//! rebuilt when the file has gone missing.

use std::path::Path;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Snapshot};
use tempalias::raft::snapshot::FORMAT_VERSION;
use tempalias::raft::store::{self, StateMachine};
use tempalias::raft::{Command, Request, Response, TargetPolicy, TypeConfig};

mod common;
use common::{bytes_of, install_bytes};

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn create(id: &str, valid_for_ms: u64) -> Command {
    Command::CreateAlias {
        id: id.into(),
        domain: "t.example".into(),
        target: "me@example.net".into(),
        token_hash: "h".into(),
        valid_for_ms,
        max_usage: 3,
    }
}

/// A store with 200 live aliases, one purged alias (a tombstone) and
/// maintenance on, and its snapshot.
async fn source(dir: &Path) -> (StateMachine, Snapshot<TypeConfig>) {
    let (_log, mut sm) = store::open(&dir.join("src.redb")).expect("open");
    let mut entries = vec![entry(1, 0, create("doomed", 1_000))];
    entries.push(entry(2, 100_000, Command::Purge { keep_ms: 10_000 }));
    for i in 0..200u64 {
        entries.push(entry(
            3 + i,
            100_000,
            create(&format!("alias{i:04}"), 86_400_000),
        ));
    }
    entries.push(entry(203, 100_000, Command::SetMaintenance { on: true }));
    sm.apply(entries).await.expect("apply");
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    (sm, snap)
}

/// A receiver that already holds one alias of its own, to see that a refused
/// snapshot leaves it as it was.
async fn receiver(dir: &Path) -> StateMachine {
    let (_log, mut sm) = store::open(&dir.join("dst.redb")).expect("open");
    sm.apply(vec![entry(1, 0, create("mine", 86_400_000))])
        .await
        .expect("apply");
    sm
}

fn snapshot_files(db: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store::snapshot_dir(db))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn round_trip_carries_every_table_and_becomes_the_current_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, snap) = source(dir.path()).await;
    let meta = snap.meta.clone();
    let bytes = bytes_of(snap).await;
    let mut dst = receiver(dir.path()).await;
    install_bytes(&mut dst, &meta, &bytes)
        .await
        .expect("install");

    let r = dst.reader();
    assert!(r.alias("mine").unwrap().is_none(), "replaced whole");
    assert_eq!(r.alias("alias0199").unwrap().unwrap().max_usage, 3);
    assert_eq!(r.count(100_000).unwrap(), (200, 200));
    assert!(r.was_purged("doomed").unwrap());
    assert!(r.cluster_maintenance().unwrap().on);
    let (applied, _) = dst.applied_state().await.unwrap();
    assert_eq!(applied, meta.last_log_id);

    // The receiver keeps the file as its own snapshot: same meta, same bytes,
    // and nothing else left in its snapshot directory.
    let current = dst.get_current_snapshot().await.unwrap().expect("current");
    assert_eq!(current.meta, meta);
    assert_eq!(bytes_of(current).await, bytes);
    assert_eq!(snapshot_files(&dir.path().join("dst.redb")).len(), 1);
}

#[tokio::test]
async fn a_newer_build_replaces_the_older_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, _) = source(dir.path()).await;
    let db = dir.path().join("src.redb");
    let first = snapshot_files(&db);
    src.apply(vec![entry(204, 100_000, create("later", 86_400_000))])
        .await
        .unwrap();
    let snap = src
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(204));
    let second = snapshot_files(&db);
    assert_eq!(second.len(), 1);
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_src, snap) = source(dir.path()).await;
    let meta = snap.meta.clone();
    let bytes = bytes_of(snap).await;
    let mut dst = receiver(dir.path()).await;

    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let truncated = &bytes[..bytes.len() - 100];
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let legacy = br#"{"last_now":0,"aliases":[]}"#.to_vec();
    for (what, bad, expect) in [
        ("flipped byte", flipped, "checksum"),
        ("truncated", truncated.to_vec(), "truncated"),
        ("newer version", newer, "not supported"),
        ("old JSON format", legacy, "not a tempalias snapshot"),
    ] {
        let err = install_bytes(&mut dst, &meta, &bad).await.expect_err(what);
        assert!(err.contains(expect), "{what}: {err}");
        let r = dst.reader();
        assert!(r.alias("mine").unwrap().is_some(), "{what}: state kept");
        assert!(
            r.alias("alias0000").unwrap().is_none(),
            "{what}: nothing half-installed"
        );
        assert!(
            dst.get_current_snapshot().await.unwrap().is_none(),
            "{what}"
        );
    }
    assert!(snapshot_files(&dir.path().join("dst.redb")).is_empty());
}

#[tokio::test]
async fn a_missing_snapshot_file_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("src.redb");
    let last = {
        let (sm, snap) = source(dir.path()).await;
        drop(sm);
        snap.meta.last_log_id
    };
    for name in snapshot_files(&db) {
        std::fs::remove_file(store::snapshot_dir(&db).join(name)).unwrap();
    }
    let (_log, mut sm) = store::open(&db).expect("reopen");
    let current = sm.get_current_snapshot().await.unwrap().expect("rebuilt");
    assert_eq!(current.meta.last_log_id, last);
    let bytes = bytes_of(current).await;
    let mut dst = receiver(dir.path()).await;
    let meta = sm.get_current_snapshot().await.unwrap().unwrap().meta;
    install_bytes(&mut dst, &meta, &bytes)
        .await
        .expect("install");
    assert_eq!(dst.reader().count(100_000).unwrap(), (200, 200));
}

#[tokio::test]
async fn leftovers_of_an_interrupted_build_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("src.redb");
    drop(source(dir.path()).await);
    let stray = store::snapshot_dir(&db).join("snapshot-9-1.snap.tmp");
    std::fs::write(&stray, b"half").unwrap();
    let (_log, _sm) = store::open(&db).expect("reopen");
    assert!(!stray.exists());
    assert_eq!(snapshot_files(&db).len(), 1);
}

/// A database written by a release that kept the snapshot as one JSON value
/// in the `snapshot` table is converted into a snapshot file at open.
#[tokio::test]
async fn a_legacy_json_snapshot_is_converted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.redb");
    let meta = openraft::SnapshotMeta::<u64, openraft::BasicNode> {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 7)),
        last_membership: Default::default(),
        snapshot_id: "1-1-7-0".into(),
    };
    let alias = serde_json::json!({
        "id": "legacy000001", "domain": "t.example", "target": "me@example.net",
        "token_hash": "h", "created_ms": 0, "valid_until_ms": 86_400_000u64,
        "max_usage": 2, "used": 0, "reservations": {}, "revoked": false
    });
    let data = serde_json::json!({
        "last_now": 5, "aliases": [alias], "purged": [["gone00000001", 4]],
        "maintenance": {"on": true, "since_ms": 3},
        "idempotency": [["k", {"alias_id": "legacy000001", "fingerprint": "f", "claimed_ms": 1}]]
    });
    {
        let (_log, _sm) = store::open(&db).expect("create");
    }
    {
        let rdb = redb::Database::create(&db).unwrap();
        let txn = rdb.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("snapshot");
            let mut t = txn.open_table(table).unwrap();
            t.insert("meta", serde_json::to_vec(&meta).unwrap().as_slice())
                .unwrap();
            t.insert("data", serde_json::to_vec(&data).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let (_log, mut sm) = store::open(&db).expect("open converts");
    let current = sm.get_current_snapshot().await.unwrap().expect("converted");
    assert_eq!(current.meta, meta);
    let bytes = bytes_of(current).await;
    let mut dst = receiver(dir.path()).await;
    install_bytes(&mut dst, &meta, &bytes)
        .await
        .expect("install");
    let r = dst.reader();
    assert_eq!(r.alias("legacy000001").unwrap().unwrap().max_usage, 2);
    assert!(r.was_purged("gone00000001").unwrap());
    assert!(r.cluster_maintenance().unwrap().on);
    // The old format has no per-target index: the install built it from
    // the aliases, so the live legacy alias counts against a cap of one.
    let capped = Command::CreateLimited {
        policy: TargetPolicy {
            max_per_target: 1,
            ..Default::default()
        },
        create: Box::new(create("new000000001", 86_400_000)),
    };
    let out = dst.apply([entry(8, 10, capped)]).await.expect("apply");
    assert_eq!(out, [Response::TargetFull { max: 1 }]);
}
