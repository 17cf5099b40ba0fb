//! A log purge waits for the state machine: openraft asks a follower to
//! purge the log up to a snapshot while that snapshot is still being
//! installed, and a purge that went first would leave, after a crash, a log
//! purged past a state machine that never got the snapshot (and a node that
//! cannot start). The purge must not complete before the state it relies on
//! has committed, and must fail, not hang, when that state never comes.

use std::path::Path;
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{Entry, EntryPayload, RaftLogReader, SnapshotMeta};
use tempalias::raft::store::{self, LogStore, StateMachine};
use tempalias::raft::{Command, Request, TypeConfig};

mod common;
use common::{blank, bytes_of, install_bytes, log_id};

/// How long a purge that should be waiting is given to (wrongly) finish.
/// A purge that does not wait finishes in milliseconds.
const MUST_STILL_WAIT: Duration = Duration::from_millis(300);
/// Bound on a purge that should finish.
const MUST_FINISH: Duration = Duration::from_secs(20);

fn create(index: u64, id: &str) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Request {
            now_ms: 100_000,
            cmd: Command::CreateAlias {
                id: id.into(),
                domain: "t.example".into(),
                target: "me@example.net".into(),
                token_hash: "h".into(),
                valid_for_ms: 86_400_000,
                max_usage: 3,
            },
        }),
    }
}

/// A snapshot at index 2000 (2000 aliases) from another node's store.
async fn leader_snapshot(dir: &Path) -> (SnapshotMeta<u64, openraft::BasicNode>, Vec<u8>) {
    let (_log, mut sm) = store::open(&dir.join("leader.redb")).expect("open");
    let entries: Vec<_> = (1..=2000u64)
        .map(|i| create(i, &format!("alias{i:05}")))
        .collect();
    sm.apply(entries).await.expect("apply");
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    let meta = snap.meta.clone();
    (meta, bytes_of(snap).await)
}

/// A follower with log entries 1..=5, of which 1..=2 are applied.
async fn follower(path: &Path) -> (LogStore, StateMachine) {
    let (mut log, mut sm) = store::open(path).expect("open");
    log.blocking_append((1..=5).map(blank)).await.unwrap();
    sm.apply([blank(1), blank(2)]).await.unwrap();
    (log, sm)
}

/// Starts `purge(upto)` on its own task, as openraft's core calls it.
fn spawn_purge(
    log: &LogStore,
    upto: u64,
) -> tokio::task::JoinHandle<Result<(), openraft::StorageError<u64>>> {
    let mut log = log.clone();
    tokio::spawn(async move { log.purge(log_id(upto)).await })
}

/// The log still holds 1..=5 and records no purge.
async fn log_untouched(log: &mut LogStore) {
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, None);
    let entries = log.try_get_log_entries(1..6).await.unwrap();
    assert_eq!(entries.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_for_an_installing_snapshot_waits_for_the_install() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, bytes) = leader_snapshot(dir.path()).await;
    let upto = snap.last_log_id.unwrap().index;
    assert_eq!(upto, 2000);
    let (mut log, mut sm) = follower(&dir.path().join("f.redb")).await;

    // openraft's order: the install is handed to the state machine, then
    // the purge up to the snapshot runs at once.
    let mut purge = spawn_purge(&log, upto);
    assert!(
        tokio::time::timeout(MUST_STILL_WAIT, &mut purge)
            .await
            .is_err(),
        "the purge finished before the state machine reached {upto}"
    );
    log_untouched(&mut log).await;

    install_bytes(&mut sm, &snap, &bytes)
        .await
        .expect("install");
    tokio::time::timeout(MUST_FINISH, purge)
        .await
        .expect("the purge finishes once the install has")
        .unwrap()
        .expect("purge");

    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(upto));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(upto)));
    assert!(log.try_get_log_entries(1..6).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_purge_waits_leaves_a_log_the_node_can_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.redb");
    let (log, sm) = follower(&path).await;
    let mut purge = spawn_purge(&log, 2000);
    assert!(tokio::time::timeout(MUST_STILL_WAIT, &mut purge)
        .await
        .is_err());
    // The process dies before the install commits.
    purge.abort();
    let _ = purge.await;
    drop((log, sm));

    let (mut log, mut sm) = store::open(&path).expect("reopen");
    log_untouched(&mut log).await;
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
    // What openraft reads to catch up from there is all still in the log.
    assert_eq!(log.try_get_log_entries(3..6).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_waits_for_a_slow_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = follower(&dir.path().join("f.redb")).await;
    let mut purge = spawn_purge(&log, 4);
    assert!(tokio::time::timeout(MUST_STILL_WAIT, &mut purge)
        .await
        .is_err());
    log_untouched(&mut log).await;

    sm.apply([blank(3)]).await.unwrap();
    assert!(tokio::time::timeout(MUST_STILL_WAIT, &mut purge)
        .await
        .is_err());
    sm.apply([blank(4)]).await.unwrap();
    tokio::time::timeout(MUST_FINISH, purge)
        .await
        .expect("the purge finishes once 4 is applied")
        .unwrap()
        .expect("purge");
    let entries = log.try_get_log_entries(1..6).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].log_id.index, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_purge_up_to_the_applied_state_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.redb");
    let (log, sm) = follower(&path).await;
    drop((log, sm));

    let (mut log, _sm) = store::open(&path).expect("reopen");
    assert_eq!(log.applied().index(), Some(2));
    tokio::time::timeout(MUST_FINISH, log.purge(log_id(2)))
        .await
        .expect("no wait for what is applied")
        .expect("purge");
    let entries = log.try_get_log_entries(1..6).await.unwrap();
    assert_eq!(entries.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_fails_instead_of_hanging_when_the_install_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (snap, mut bytes) = leader_snapshot(dir.path()).await;
    let (mut log, mut sm) = follower(&dir.path().join("f.redb")).await;
    let mut purge = spawn_purge(&log, 2000);
    assert!(tokio::time::timeout(MUST_STILL_WAIT, &mut purge)
        .await
        .is_err());

    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    assert!(install_bytes(&mut sm, &snap, &bytes).await.is_err());
    let result = tokio::time::timeout(MUST_FINISH, purge)
        .await
        .expect("the purge ends once the install has failed")
        .unwrap();
    assert!(result.is_err(), "the purge went ahead: {result:?}");
    log_untouched(&mut log).await;
}
