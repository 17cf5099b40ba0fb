//! Helpers shared by the store test files (each file is its own crate and
//! uses what it needs).
#![allow(dead_code)]

use std::io::{Read, Seek, SeekFrom, Write};

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Snapshot, SnapshotMeta};
use tempalias::raft::store::StateMachine;
use tempalias::raft::TypeConfig;

/// The log id of `index` in term 1.
pub fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// A blank entry at `index`.
pub fn blank(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Blank,
    }
}

/// Hands `bytes` to the state machine the way openraft does: written into
/// the file `begin_receiving_snapshot` gave, then installed.
pub async fn install_bytes(
    sm: &mut StateMachine,
    meta: &SnapshotMeta<u64, openraft::BasicNode>,
    bytes: &[u8],
) -> Result<(), String> {
    let file = sm.begin_receiving_snapshot().await.expect("begin");
    let mut file = file.into_std().await;
    file.write_all(bytes).unwrap();
    sm.install_snapshot(meta, Box::new(tokio::fs::File::from_std(file)))
        .await
        .map_err(|e| e.to_string())
}

/// The bytes of a built snapshot's file, from its start.
pub async fn bytes_of(snap: Snapshot<TypeConfig>) -> Vec<u8> {
    let mut file = snap.snapshot.into_std().await;
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut out = Vec::new();
    file.read_to_end(&mut out).unwrap();
    out
}
