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
