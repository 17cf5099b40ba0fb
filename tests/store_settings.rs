//! The store's own tables beside the aliases: cluster-wide maintenance and
//! idempotency keys are applied, carried by snapshots and purged.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tempalias::raft::store::{self, StateMachine};
use tempalias::raft::types::{ClusterMaintenance, IDEMPOTENCY_KEY_TTL_MS};
use tempalias::raft::{Command, Request, Response, TypeConfig};

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn keyed(id: &str, token_hash: &str, fingerprint: &str) -> Command {
    Command::CreateAliasKeyed {
        key_hash: "k1".into(),
        fingerprint: fingerprint.into(),
        create: Box::new(Command::CreateAlias {
            id: id.into(),
            domain: "t.example".into(),
            target: "me@example.net".into(),
            token_hash: token_hash.into(),
            valid_for_ms: 2 * IDEMPOTENCY_KEY_TTL_MS,
            max_usage: 2,
        }),
    }
}

async fn apply(sm: &mut StateMachine, e: Entry<TypeConfig>) -> Response {
    sm.apply(vec![e]).await.expect("apply").remove(0)
}

#[tokio::test]
async fn maintenance_and_keys_are_applied_snapshotted_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = store::open(&dir.path().join("a.redb")).unwrap();
    let reader = sm.reader();
    assert_eq!(
        reader.cluster_maintenance().unwrap(),
        ClusterMaintenance::default()
    );

    let r = apply(
        &mut sm,
        entry(1, 1000, Command::SetMaintenance { on: true }),
    )
    .await;
    assert_eq!(
        r,
        Response::Maintenance(ClusterMaintenance {
            on: true,
            since_ms: 1000
        })
    );
    // Setting it again keeps the original time.
    apply(
        &mut sm,
        entry(2, 2000, Command::SetMaintenance { on: true }),
    )
    .await;
    assert_eq!(reader.cluster_maintenance().unwrap().since_ms, 1000);

    let first = match apply(&mut sm, entry(3, 3000, keyed("aaaaaaaaaa", "h1", "fp"))).await {
        Response::Created(rec) => rec,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        apply(&mut sm, entry(4, 4000, keyed("bbbbbbbbbb", "h2", "fp"))).await,
        Response::Replayed(first.clone())
    );
    assert!(reader.alias("bbbbbbbbbb").unwrap().is_none());

    // A snapshot carries both into another replica.
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let (_log2, mut sm2) = store::open(&dir2.path().join("b.redb")).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let reader2 = sm2.reader();
    assert!(reader2.cluster_maintenance().unwrap().on);
    assert_eq!(
        apply(&mut sm2, entry(5, 5000, keyed("cccccccccc", "h3", "other"))).await,
        Response::KeyReused
    );

    // A purge after the key's lifetime forgets it; the alias stays (it is
    // still valid), and the key can be used again.
    let later = 3000 + IDEMPOTENCY_KEY_TTL_MS;
    apply(&mut sm2, entry(6, later, Command::Purge { keep_ms: 0 })).await;
    assert!(reader2.alias("aaaaaaaaaa").unwrap().is_some());
    match apply(
        &mut sm2,
        entry(7, later + 1, keyed("dddddddddd", "h4", "other")),
    )
    .await
    {
        Response::Created(rec) => assert_eq!(rec.id, "dddddddddd"),
        other => panic!("{other:?}"),
    }
    let off = apply(
        &mut sm2,
        entry(8, later + 2, Command::SetMaintenance { on: false }),
    )
    .await;
    assert!(matches!(
        off,
        Response::Maintenance(ClusterMaintenance { on: false, .. })
    ));
}
