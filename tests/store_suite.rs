//! openraft's storage conformance suite, run against the redb store.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempalias::raft::store::{self, LogStore, StateMachine};
use tempalias::raft::TypeConfig;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(&dir.path().join("t.redb")).expect("open store");
        // The suite purges entries its state machine never applies, which a
        // purge of a node's store would wait for (`tests/store_purge.rs`).
        Ok((dir, log.purge_without_waiting(), sm))
    }
}

#[test]
fn redb_store_passes_openraft_suite() {
    Suite::test_all(RedbBuilder).expect("storage suite");
}
