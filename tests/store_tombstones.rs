//! Purged aliases leave a tombstone that survives snapshots, so mail to them
//! is refused as expired, not counted as a guessed id.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tempalias::raft::store;
use tempalias::raft::{Command, Request, Response, TypeConfig};

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

#[tokio::test]
async fn purge_leaves_a_tombstone_that_snapshots_carry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut sm) = store::open(&dir.path().join("a.redb")).expect("open store");
    let create = Command::CreateAlias {
        id: "abcdefghijkl".into(),
        domain: "t.example".into(),
        target: "me@example.net".into(),
        token_hash: "h".into(),
        valid_for_ms: 1_000,
        max_usage: 1,
    };
    let out = sm
        .apply(vec![
            entry(1, 0, create),
            // Long past expiry and the retention: the purge deletes it.
            entry(2, 100_000, Command::Purge { keep_ms: 10_000 }),
        ])
        .await
        .expect("apply");
    assert!(matches!(out[0], Response::Created(_)));
    assert_eq!(
        out[1],
        // The alias and its per-target row.
        Response::Purged {
            count: 1,
            rows: 2,
            more: false
        }
    );
    let reader = sm.reader();
    assert!(reader.alias("abcdefghijkl").expect("read").is_none());
    assert!(reader.was_purged("abcdefghijkl").expect("read"));
    assert!(!reader.was_purged("neverexisted").expect("read"));

    // A node that catches up by snapshot knows the tombstone too.
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot");
    let dir2 = tempfile::tempdir().expect("temp dir");
    let (_log2, mut sm2) = store::open(&dir2.path().join("b.redb")).expect("open store");
    sm2.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .expect("install");
    assert!(sm2.reader().was_purged("abcdefghijkl").expect("read"));

    // Tombstones themselves go after a year of replicated time.
    let year = store::TOMBSTONE_KEEP_MS;
    sm2.apply(vec![entry(
        3,
        100_000 + year + 1,
        Command::Purge { keep_ms: 10_000 },
    )])
    .await
    .expect("apply");
    assert!(!sm2.reader().was_purged("abcdefghijkl").expect("read"));
}
