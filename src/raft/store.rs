//! The redb database of one node: Raft log, vote, state machine and snapshot.
//!
//! One file, several tables. Every write is a redb transaction; log appends and
//! votes commit with `Durability::Immediate` (one `fdatasync`), so an acknowledged
//! vote or entry survives a crash. One append is one transaction and one
//! fsync, whatever its number of entries: a follower gets what accumulated
//! during a replication round trip in one append, and on the leader
//! concurrent writes share an entry (`batch.rs`), since openraft 0.9 flushes
//! each proposed entry before it takes the next proposal.
//!
//! State-machine transactions commit with `Durability::None`: redb persists
//! commits in order, so they become durable with the next log append at the
//! latest, and a state machine that lost its last applies after a crash is
//! simply re-applied from the log (openraft replays from `last_applied`). Log
//! purges only ever follow a snapshot, which is itself written durably first.
//!
//! redb calls block (they may fsync), so each runs on tokio's blocking pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::idempotency;
use super::state::{self, Change};
use super::types::{
    AliasRecord, ClusterMaintenance, Command, IdempotencyRecord, NodeId, Response, TypeConfig,
};

type Entry = openraft::Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// Raft log: index -> JSON entry.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft metadata: `vote`, `committed`, `last_purged`.
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// State machine: alias id -> JSON record.
pub(super) const ALIASES: TableDefinition<&str, &[u8]> = TableDefinition::new("aliases");
/// State-machine metadata: `last_applied`, `last_membership`, `last_now`.
pub(super) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// Replicated settings: `maintenance` (cluster-wide maintenance).
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// Claimed idempotency keys: SHA-256 of the key -> JSON claim.
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency_keys");
/// The current snapshot: `meta`, `data`.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// Ids of purged aliases -> replicated time of the purge. Mail to a purged
/// alias is then refused as expired, not counted as a guess against the
/// sender's address (a large provider's relays would otherwise be throttled
/// for mail to long-gone aliases). About 30 bytes each.
const PURGED: TableDefinition<&str, u64> = TableDefinition::new("purged");

/// How long a purged alias's id is remembered.
pub const TOMBSTONE_KEEP_MS: u64 = 365 * 86_400_000;

/// Errors opening or reading the database outside openraft's own calls.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Redb(#[from] redb::Error),
    #[error("stored value does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("cannot create {path}: {error}")]
    Dir { path: String, error: std::io::Error },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self { DbError::Redb(e.into()) }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

/// Runs a blocking database closure on the blocking pool.
async fn blocking<T, F>(subject: ErrorSubject<NodeId>, verb: ErrorVerb, f: F) -> StoreResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io_err(subject, verb, e)),
        Err(e) => Err(io_err(subject, verb, e)),
    }
}

pub(super) fn get_json<T: for<'de> Deserialize<'de>>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, DbError> {
    match table.get(key)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
        None => Ok(None),
    }
}

/// Opens (creating if needed) the database of one node.
///
/// # Errors
/// [`DbError`] when the directory or file cannot be created or opened (for
/// example because another process holds it).
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), DbError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| DbError::Dir {
            path: dir.display().to_string(),
            error,
        })?;
    }
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    {
        txn.open_table(LOG)?;
        txn.open_table(RAFT_META)?;
        txn.open_table(ALIASES)?;
        txn.open_table(SM_META)?;
        txn.open_table(SNAPSHOT)?;
        txn.open_table(PURGED)?;
        txn.open_table(SETTINGS)?;
        txn.open_table(IDEMPOTENCY)?;
    }
    super::targets::create_tables(&txn)?;
    txn.commit()?;
    let db = Arc::new(db);
    Ok((LogStore { db: db.clone() }, StateMachine { db }))
}

/// The Raft log and vote. Cloning shares the database (it is the log reader too).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let db = self.db.clone();
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(ErrorSubject::Logs, ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let mut out = Vec::new();
            for item in table.range::<u64>(bounds)? {
                let (_, v) = item?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(ErrorSubject::Logs, ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            let meta = txn.open_table(RAFT_META)?;
            let last_purged: Option<LogId<NodeId>> = get_json(&meta, "last_purged")?;
            let log = txn.open_table(LOG)?;
            let last = match log.last()? {
                Some((_, v)) => Some(serde_json::from_slice::<Entry>(v.value())?.log_id),
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let db = self.db.clone();
        let bytes = serde_json::to_vec(vote)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        blocking(ErrorSubject::Vote, ErrorVerb::Write, move || {
            let txn = db.begin_write()?;
            txn.open_table(RAFT_META)?
                .insert("vote", bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        let db = self.db.clone();
        blocking(ErrorSubject::Vote, ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            get_json(&txn.open_table(RAFT_META)?, "vote")
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        let db = self.db.clone();
        let bytes = serde_json::to_vec(&committed)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        blocking(ErrorSubject::Store, ErrorVerb::Write, move || {
            let mut txn = db.begin_write()?;
            // Advisory: a lost value only means re-applying from an older point.
            txn.set_durability(Durability::None)?;
            txn.open_table(RAFT_META)?
                .insert("committed", bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        let db = self.db.clone();
        blocking(ErrorSubject::Store, ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            Ok(
                get_json::<Option<LogId<NodeId>>>(&txn.open_table(RAFT_META)?, "committed")?
                    .flatten(),
            )
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e)
                .map_err(|err| io_err(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))?;
            rows.push((e.log_id.index, bytes));
        }
        let db = self.db.clone();
        let result = blocking(ErrorSubject::Logs, ErrorVerb::Write, move || {
            let txn = db.begin_write()?;
            {
                let mut log = txn.open_table(LOG)?;
                for (index, bytes) in &rows {
                    log.insert(*index, bytes.as_slice())?;
                }
            }
            // Durability::Immediate (the default): returns after fdatasync.
            txn.commit()?;
            Ok(())
        })
        .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let db = self.db.clone();
        blocking(ErrorSubject::Logs, ErrorVerb::Delete, move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG)?
                .retain_in::<u64, _>(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let db = self.db.clone();
        let bytes = serde_json::to_vec(&log_id)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        blocking(ErrorSubject::Logs, ErrorVerb::Delete, move || {
            let txn = db.begin_write()?;
            txn.open_table(RAFT_META)?
                .insert("last_purged", bytes.as_slice())?;
            txn.open_table(LOG)?
                .retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// What a snapshot holds: the whole alias table plus the replicated clock,
/// the maintenance flag and the claimed idempotency keys (absent in snapshots
/// written before they existed).
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    last_now: u64,
    aliases: Vec<AliasRecord>,
    /// Purged ids and when they were purged.
    #[serde(default)]
    purged: Vec<(String, u64)>,
    #[serde(default)]
    maintenance: ClusterMaintenance,
    #[serde(default)]
    idempotency: Vec<(String, IdempotencyRecord)>,
    /// Per-target state (`targets.rs`); rebuilt from `aliases` when absent.
    #[serde(default)]
    targets: Option<super::targets::TargetsSnapshot>,
}

/// The state machine: alias records and what has been applied.
pub struct StateMachine {
    db: Arc<Database>,
}

impl StateMachine {
    /// A read-only view for the front ends (shares the database).
    pub fn reader(&self) -> StateReader {
        StateReader {
            db: self.db.clone(),
        }
    }
}

/// Reads the local replica of the state machine. Reads see what this node has
/// applied, which on a follower may trail the leader.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
}

impl StateReader {
    /// The alias with this id, if this replica has it.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn alias(&self, id: &str) -> Result<Option<AliasRecord>, DbError> {
        let txn = self.db.begin_read()?;
        get_json(&txn.open_table(ALIASES)?, id)
    }

    /// Whether an alias with this id existed and was purged (within
    /// [`TOMBSTONE_KEEP_MS`]).
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn was_purged(&self, id: &str) -> Result<bool, DbError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(PURGED)?.get(id)?.is_some())
    }

    /// Cluster-wide maintenance as this replica has applied it.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn cluster_maintenance(&self) -> Result<ClusterMaintenance, DbError> {
        let txn = self.db.begin_read()?;
        Ok(get_json(&txn.open_table(SETTINGS)?, "maintenance")?.unwrap_or_default())
    }

    /// Where a confirmation link stands (see `targets.rs`).
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn confirmation_link(
        &self,
        token_hash: &str,
        now_ms: u64,
    ) -> Result<super::targets::LinkState, DbError> {
        super::targets::link_state(&self.db.begin_read()?, token_hash, now_ms)
    }

    /// Aliases that can still forward at `now_ms`, and all stored aliases.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn count(&self, now_ms: u64) -> Result<(u64, u64), DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ALIASES)?;
        let (mut live, mut all) = (0, 0);
        for item in table.iter()? {
            let (_, v) = item?;
            let rec: AliasRecord = serde_json::from_slice(v.value())?;
            all += 1;
            if !rec.is_dead(now_ms) {
                live += 1;
            }
        }
        Ok((live, all))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let db = self.db.clone();
        blocking(ErrorSubject::StateMachine, ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            let meta = txn.open_table(SM_META)?;
            Ok((
                get_json(&meta, "last_applied")?,
                get_json(&meta, "last_membership")?.unwrap_or_default(),
            ))
        })
        .await
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.db.clone();
        blocking(ErrorSubject::StateMachine, ErrorVerb::Write, move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::None)?;
            let mut responses = Vec::with_capacity(entries.len());
            {
                let mut meta = txn.open_table(SM_META)?;
                let mut aliases = txn.open_table(ALIASES)?;
                let mut settings = txn.open_table(SETTINGS)?;
                let mut keys = txn.open_table(IDEMPOTENCY)?;
                let mut targets = super::targets::Tables::open(&txn)?;
                let mut last_now: u64 = get_json(&meta, "last_now")?.unwrap_or(0);
                let mut membership: Option<StoredMembership<NodeId, openraft::BasicNode>> = None;
                let mut last_applied = None;
                for entry in &entries {
                    last_applied = Some(entry.log_id);
                    match &entry.payload {
                        EntryPayload::Blank => responses.push(Response::None),
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                            responses.push(Response::None);
                        }
                        EntryPayload::Normal(req) => {
                            // Replicated time never runs backwards, even across a
                            // change of leader whose clock lags.
                            last_now = last_now.max(req.now_ms);
                            let mut tables = Tables {
                                txn: &txn,
                                aliases: &mut aliases,
                                settings: &mut settings,
                                keys: &mut keys,
                                targets: &mut targets,
                            };
                            responses.push(apply_command(&mut tables, &req.cmd, last_now)?);
                        }
                    }
                }
                meta.insert("last_now", serde_json::to_vec(&last_now)?.as_slice())?;
                if let Some(applied) = last_applied {
                    meta.insert("last_applied", serde_json::to_vec(&applied)?.as_slice())?;
                }
                if let Some(m) = membership {
                    meta.insert("last_membership", serde_json::to_vec(&m)?.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(responses)
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        let parsed: SnapshotData = serde_json::from_slice(&data)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?;
        let meta_bytes =
            serde_json::to_vec(meta).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let applied_bytes = serde_json::to_vec(&meta.last_log_id)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let membership_bytes = serde_json::to_vec(&meta.last_membership)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let db = self.db.clone();
        blocking(subject, ErrorVerb::Write, move || {
            // One transaction: the state machine is replaced whole or not at all.
            let txn = db.begin_write()?;
            {
                let mut aliases = txn.open_table(ALIASES)?;
                aliases.retain(|_, _| false)?;
                for rec in &parsed.aliases {
                    aliases.insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
                }
                let mut purged = txn.open_table(PURGED)?;
                purged.retain(|_, _| false)?;
                for (id, at) in &parsed.purged {
                    purged.insert(id.as_str(), *at)?;
                }
                let mut settings = txn.open_table(SETTINGS)?;
                settings.retain(|_, _| false)?;
                settings.insert(
                    "maintenance",
                    serde_json::to_vec(&parsed.maintenance)?.as_slice(),
                )?;
                let mut keys = txn.open_table(IDEMPOTENCY)?;
                keys.retain(|_, _| false)?;
                for (key, claim) in &parsed.idempotency {
                    keys.insert(key.as_str(), serde_json::to_vec(claim)?.as_slice())?;
                }
                drop(aliases);
                super::targets::install(&txn, parsed.targets.as_ref())?;
                let mut sm = txn.open_table(SM_META)?;
                sm.insert("last_applied", applied_bytes.as_slice())?;
                sm.insert("last_membership", membership_bytes.as_slice())?;
                sm.insert("last_now", serde_json::to_vec(&parsed.last_now)?.as_slice())?;
                let mut snap = txn.open_table(SNAPSHOT)?;
                snap.insert("meta", meta_bytes.as_slice())?;
                snap.insert("data", data.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        blocking(ErrorSubject::Snapshot(None), ErrorVerb::Read, move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let meta: Option<SnapshotMeta<NodeId, openraft::BasicNode>> = get_json(&table, "meta")?;
            let Some(meta) = meta else { return Ok(None) };
            let data = table
                .get("data")?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
        })
        .await
    }
}

/// Builds snapshots from a consistent read of the state machine.
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let db = self.db.clone();
        blocking(ErrorSubject::Snapshot(None), ErrorVerb::Write, move || {
            // A read transaction is a consistent view even while applies go on.
            let read = db.begin_read()?;
            let meta_table = read.open_table(SM_META)?;
            let last_applied: Option<LogId<NodeId>> = get_json(&meta_table, "last_applied")?;
            let last_membership: StoredMembership<NodeId, openraft::BasicNode> =
                get_json(&meta_table, "last_membership")?.unwrap_or_default();
            let last_now: u64 = get_json(&meta_table, "last_now")?.unwrap_or(0);
            let mut aliases = Vec::new();
            for item in read.open_table(ALIASES)?.iter()? {
                let (_, v) = item?;
                aliases.push(serde_json::from_slice::<AliasRecord>(v.value())?);
            }
            let mut purged = Vec::new();
            for item in read.open_table(PURGED)?.iter()? {
                let (k, v) = item?;
                purged.push((k.value().to_string(), v.value()));
            }
            let maintenance: ClusterMaintenance =
                get_json(&read.open_table(SETTINGS)?, "maintenance")?.unwrap_or_default();
            let mut idempotency = Vec::new();
            for item in read.open_table(IDEMPOTENCY)?.iter()? {
                let (k, v) = item?;
                idempotency.push((k.value().to_string(), serde_json::from_slice(v.value())?));
            }
            let targets = Some(super::targets::snapshot(&read)?);
            drop(read);
            let data = serde_json::to_vec(&SnapshotData {
                last_now,
                aliases,
                purged,
                maintenance,
                idempotency,
                targets,
            })?;
            let snapshot_id = match last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, now_nanos()),
                None => format!("none-{}", now_nanos()),
            };
            let meta = SnapshotMeta {
                last_log_id: last_applied,
                last_membership,
                snapshot_id,
            };
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SNAPSHOT)?;
                // A snapshot installed from the leader while this one was being
                // built may be newer: never replace it with an older one.
                let stored: Option<SnapshotMeta<NodeId, openraft::BasicNode>> =
                    get_json(&table, "meta")?;
                let newer_stored = stored.is_some_and(|m| m.last_log_id >= meta.last_log_id);
                if !newer_stored {
                    table.insert("meta", serde_json::to_vec(&meta)?.as_slice())?;
                    table.insert("data", data.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        })
        .await
    }
}

type Table<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// The state-machine tables one apply transaction writes.
struct Tables<'a, 't> {
    txn: &'a redb::WriteTransaction,
    aliases: &'a mut Table<'t>,
    settings: &'a mut Table<'t>,
    keys: &'a mut Table<'t>,
    /// The per-target index, confirmations and tokens (`targets.rs`).
    targets: &'a mut super::targets::Tables<'t>,
}

/// Applies one command at replicated time `now_ms` and returns its answer.
/// A batch's commands are applied in order, each as if it were an entry of
/// its own at the same time.
fn apply_command(t: &mut Tables<'_, '_>, cmd: &Command, now_ms: u64) -> Result<Response, DbError> {
    if let Command::Batch { cmds } = cmd {
        let mut responses = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            responses.push(apply_command(t, cmd, now_ms)?);
        }
        return Ok(Response::Batch { responses });
    }
    if let Some(response) = t.targets.apply(t.aliases, t.keys, cmd, now_ms)? {
        return Ok(response);
    }
    if let Some(response) = apply_own_tables(t.targets, t.aliases, t.settings, t.keys, cmd, now_ms)?
    {
        return Ok(response);
    }
    let aliases = &mut *t.aliases;
    Ok(match state::command_id(cmd) {
        Some(id) => {
            let current: Option<AliasRecord> = get_json(aliases, id)?;
            let (change, response) = state::apply(current.as_ref(), cmd, now_ms);
            match change {
                Change::Put(rec) => {
                    t.targets.sync(current.as_ref(), Some(&rec))?;
                    aliases.insert(id, serde_json::to_vec(&rec)?.as_slice())?;
                }
                Change::Delete => {
                    t.targets.sync(current.as_ref(), None)?;
                    aliases.remove(id)?;
                }
                Change::Keep => {}
            }
            response
        }
        None => {
            // A command over all aliases (purge).
            let mut doomed = Vec::new();
            for item in aliases.iter()? {
                let (k, v) = item?;
                let rec: AliasRecord = serde_json::from_slice(v.value())?;
                let (change, _) = state::apply(Some(&rec), cmd, now_ms);
                if change == Change::Delete {
                    doomed.push(k.value().to_string());
                }
            }
            let mut purged = t.txn.open_table(PURGED)?;
            for id in &doomed {
                aliases.remove(id.as_str())?;
                purged.insert(id.as_str(), now_ms)?;
            }
            let horizon = now_ms.saturating_sub(TOMBSTONE_KEEP_MS);
            purged.retain(|_, at| at > horizon)?;
            Response::Purged {
                count: doomed.len() as u64,
            }
        }
    })
}

/// Applies the commands that live in tables other than the alias table
/// (maintenance, keyed creates) and the key half of a purge. `None` means the
/// command is an alias command for the caller (a purge still is, after its
/// expired keys are gone).
fn apply_own_tables(
    targets: &mut super::targets::Tables<'_>,
    aliases: &mut Table<'_>,
    settings: &mut Table<'_>,
    keys: &mut Table<'_>,
    cmd: &Command,
    now_ms: u64,
) -> Result<Option<Response>, DbError> {
    match cmd {
        Command::SetMaintenance { on } => {
            let current: ClusterMaintenance =
                get_json(settings, "maintenance")?.unwrap_or_default();
            let next = if current.on == *on {
                current
            } else {
                ClusterMaintenance {
                    on: *on,
                    since_ms: now_ms,
                }
            };
            settings.insert("maintenance", serde_json::to_vec(&next)?.as_slice())?;
            Ok(Some(Response::Maintenance(next)))
        }
        Command::CreateAliasKeyed {
            key_hash,
            fingerprint,
            create,
        } => {
            let claim: Option<IdempotencyRecord> = get_json(keys, key_hash)?;
            let claimed_alias: Option<AliasRecord> = match &claim {
                Some(c) => get_json(aliases, &c.alias_id)?,
                None => None,
            };
            let current: Option<AliasRecord> = match state::command_id(create) {
                Some(id) => get_json(aliases, id)?,
                None => None,
            };
            let outcome = idempotency::apply(
                claim.as_ref(),
                claimed_alias.as_ref(),
                current.as_ref(),
                fingerprint,
                create,
                now_ms,
            );
            if let Change::Put(rec) = &outcome.change {
                targets.sync(current.as_ref(), Some(rec))?;
                aliases.insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
            }
            if let Some(c) = &outcome.claim {
                keys.insert(key_hash.as_str(), serde_json::to_vec(c)?.as_slice())?;
            }
            Ok(Some(outcome.response))
        }
        Command::Purge { .. } => {
            keys.retain(|_, v| {
                serde_json::from_slice::<IdempotencyRecord>(v)
                    .map(|c| !idempotency::expired(&c, now_ms))
                    .unwrap_or(false)
            })?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
