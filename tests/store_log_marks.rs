//! The log marks the leader answers `ReadIndex` from without its Raft core:
//! "settled" (every entry committed, so the last index is the committed
//! one) only while nothing is in flight, and the last index never below an
//! entry the log holds.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use tempalias::raft::store;

mod common;
use common::{blank, log_id};

#[tokio::test]
async fn settled_only_when_the_last_entry_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let (mut log, mut sm) = store::open(&path).unwrap();
    let marks = log.marks();
    // An empty log with nothing committed: settled, no index.
    assert_eq!(marks.settled(), Some(None));

    log.blocking_append([blank(1), blank(2), blank(3)])
        .await
        .unwrap();
    // Entries 1-3 are in flight.
    assert_eq!(marks.settled(), None);
    log.save_committed(Some(log_id(2))).await.unwrap();
    assert_eq!(marks.settled(), None);
    log.save_committed(Some(log_id(3))).await.unwrap();
    assert_eq!(marks.settled(), Some(Some(3)));

    // A new entry unsettles it until it is committed.
    log.blocking_append([blank(4)]).await.unwrap();
    assert_eq!(marks.settled(), None);
    log.save_committed(Some(log_id(4))).await.unwrap();
    assert_eq!(marks.settled(), Some(Some(4)));

    // A follower's conflicting tail is truncated: the mark follows the log
    // down (4 was never committed in this story, so commit 3 again).
    log.blocking_append([blank(5), blank(6)]).await.unwrap();
    log.truncate(log_id(5)).await.unwrap();
    assert_eq!(marks.settled(), Some(Some(4)));

    // Purging up to an index never lowers the mark (a snapshot install can
    // leave the log ending at the snapshot). A purge waits for the state
    // machine (`store_purge.rs`): it has applied up to 3, then reached 10
    // (as when it installs a snapshot there).
    sm.apply((1..=3).map(blank)).await.unwrap();
    log.purge(log_id(3)).await.unwrap();
    assert_eq!(marks.settled(), Some(Some(4)));
    sm.apply((4..=10).map(blank)).await.unwrap();
    log.purge(log_id(10)).await.unwrap();
    assert_eq!(marks.settled(), None);
    drop((log, sm));

    // Reopened: the last index is read back from the log, the committed mark
    // starts empty, so nothing is settled until openraft saves it again.
    let (mut log, _sm) = store::open(&path).unwrap();
    let marks = log.marks();
    assert_eq!(marks.settled(), None);
    log.save_committed(Some(log_id(10))).await.unwrap();
    assert_eq!(marks.settled(), Some(Some(10)));
}

/// An apply gate that opens when told to, and records the indexes it was
/// asked about.
struct Gate {
    open: tokio::sync::watch::Receiver<bool>,
    asked: std::sync::Mutex<Vec<u64>>,
}

impl store::ApplyGate for Gate {
    fn before_apply(
        &self,
        index: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        self.asked.lock().unwrap().push(index);
        let mut open = self.open.clone();
        Box::pin(async move {
            let _ = open.wait_for(|o| *o).await;
        })
    }
}

#[tokio::test]
async fn nothing_is_applied_before_the_apply_gate_opens() {
    // The follower read leases' gate (raft/follower_lease.rs): entries stay
    // invisible to readers until every lease holder has them.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = store::open(&dir.path().join("t.redb")).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let gate = std::sync::Arc::new(Gate {
        open: rx,
        asked: Default::default(),
    });
    sm.set_apply_gate(gate.clone());
    let applied = log.applied();
    let marks = log.marks();
    log.blocking_append([blank(1), blank(2)]).await.unwrap();
    assert_eq!(marks.last(), Some(2));
    log.save_committed(Some(log_id(2))).await.unwrap();
    assert_eq!(marks.committed(), Some(2));

    let apply = tokio::spawn(async move {
        sm.apply((1..=2).map(blank)).await.unwrap();
        sm
    });
    // The gate was asked about the last entry and holds the apply back.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while gate.asked.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the gate was asked");
    assert_eq!(*gate.asked.lock().unwrap(), vec![2]);
    assert!(!apply.is_finished());
    assert_eq!(applied.index(), None);

    tx.send(true).unwrap();
    let mut sm = tokio::time::timeout(std::time::Duration::from_secs(10), apply)
        .await
        .expect("applied once the gate opened")
        .unwrap();
    assert_eq!(
        sm.applied_state().await.unwrap().0.map(|l| l.index),
        Some(2)
    );
}
