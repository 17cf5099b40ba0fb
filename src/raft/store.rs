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
//! simply re-applied from the log (openraft replays from `last_applied`).
//!
//! A log purge never deletes an entry the state machine may still need: it
//! first waits until the state machine has applied or installed up to the
//! purge point ([`Applied`]), then commits with `Durability::Immediate`,
//! which makes the state it waited for durable too (redb persists commits in
//! order). A follower that installs a snapshot is told by openraft to purge
//! while the install still runs; without the wait a crash in between would
//! leave the log purged past a state machine that never got the snapshot.
//! The reasons are in `docs/architecture.md` ("A purge waits for the state
//! machine").
//!
//! redb calls block (they may fsync), so each runs on tokio's blocking pool.
//! Reads of the newest log entries, which openraft makes right after each
//! append, are answered from memory instead ([`super::log_tail`]).
//!
//! Every table a purge deletes from has an expiry index ([`super::expiry`]),
//! written in the same transaction as the rows it indexes, so a purge reads
//! only the rows that are due instead of whole tables.
//!
//! Snapshots are files next to the database (`<db>.snapshots/`, format in
//! [`super::snapshot`]), built by streaming the tables out of one read
//! transaction and installed by streaming records into one write transaction;
//! the database only records which file is current. Memory stays bounded by
//! redb's cache ([`StoreOptions::cache_bytes`]) whatever the number of aliases.

use std::fmt::Debug;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::expiry;
use super::idempotency;
use super::log_tail::LogTail;
use super::snapshot::{self as format, Kind, SnapshotError};
use super::state::{self, Change};
use super::types::{
    AliasLiveness, AliasRecord, ClusterMaintenance, Command, IdempotencyRecord, NodeId, Response,
    TypeConfig,
};

type Entry = openraft::Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// Raft log: index -> JSON entry.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft metadata: `vote`, `last_purged`. (Releases before the log tail also
/// kept `committed` here, an advisory copy of the commit index; it is no
/// longer written nor read: see `RaftLogStorage for LogStore`.)
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// State machine: alias id -> JSON record.
pub(super) const ALIASES: TableDefinition<&str, &[u8]> = TableDefinition::new("aliases");
/// State-machine metadata: `last_applied`, `last_membership`, `last_now`.
pub(super) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// Replicated settings: `maintenance` (cluster-wide maintenance).
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// Claimed idempotency keys: SHA-256 of the key -> JSON claim.
pub(super) const IDEMPOTENCY: TableDefinition<&str, &[u8]> =
    TableDefinition::new("idempotency_keys");
/// The current snapshot: `meta` (JSON [`SnapshotMeta`]) and `file` (its file
/// name in the snapshot directory). Releases before the streamed format kept
/// the whole snapshot as JSON under `data`; [`open`] converts that once.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
/// Ids of purged aliases -> replicated time of the purge. Mail to a purged
/// alias is then refused as expired, not counted as a guess against the
/// sender's address (a large provider's relays would otherwise be throttled
/// for mail to long-gone aliases). About 30 bytes each.
pub(super) const PURGED: TableDefinition<&str, u64> = TableDefinition::new("purged");

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
    #[error("snapshot file {path}: {error}")]
    SnapshotFile { path: String, error: std::io::Error },
    #[error("snapshot {path}: {error}")]
    Snapshot {
        path: String,
        #[source]
        error: SnapshotError,
    },
    #[error("the database names snapshot file {0}, which is missing")]
    SnapshotMissing(String),
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

/// How far the state machine has got: the watermark a log purge waits for.
///
/// Shared by [`LogStore`] and [`StateMachine`]; set from the state machine's
/// `last_applied` when the database is opened, raised after each apply or
/// snapshot install commits, and marked failed when one fails (openraft then
/// stops the node: a purge waiting for a state that will not come returns an
/// error instead of holding openraft's core forever).
#[derive(Debug)]
pub struct Applied {
    tx: tokio::sync::watch::Sender<Watermark>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Watermark {
    /// Last applied index + 1; 0 when nothing is applied.
    next: u64,
    failed: bool,
}

impl Applied {
    fn new(last_applied: Option<u64>) -> Self {
        Applied {
            tx: tokio::sync::watch::Sender::new(Watermark {
                next: last_applied.map_or(0, |i| i + 1),
                failed: false,
            }),
        }
    }

    /// Records that the state machine has committed everything up to `index`.
    fn raise(&self, index: Option<u64>) {
        let Some(index) = index else { return };
        self.tx.send_if_modified(|w| {
            let raised = w.next <= index;
            if raised {
                w.next = index + 1;
            }
            raised
        });
    }

    /// Records that an apply or install failed.
    fn fail(&self) {
        self.tx.send_modify(|w| w.failed = true);
    }

    /// The last index the state machine has committed, if any.
    pub fn index(&self) -> Option<u64> {
        self.tx.borrow().next.checked_sub(1)
    }

    /// Waits until the state machine has committed up to `index`; `false`
    /// when it failed first.
    async fn reached(&self, index: u64) -> bool {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let reached = match rx.wait_for(|w| w.next > index || w.failed).await {
            Ok(w) => w.next > index,
            Err(_) => false,
        };
        reached
    }
}

/// How a node's database is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// redb's page cache (read cache and write buffer together). redb's own
    /// default is 1 GiB, which a busy node fills: the store's pages beyond
    /// this are read from the OS page cache instead, which does not count
    /// against the process.
    pub cache_bytes: usize,
}

/// The default for [`StoreOptions::cache_bytes`] (`cluster.store_cache_mb`).
pub const DEFAULT_CACHE_MB: usize = 64;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: DEFAULT_CACHE_MB * 1024 * 1024,
        }
    }
}

/// Opens (creating if needed) the database of one node with default options.
///
/// # Errors
/// As [`open_with`].
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), DbError> {
    open_with(path, &StoreOptions::default())
}

/// The directory holding the snapshot files of the database at `db_path`.
pub fn snapshot_dir(db_path: &Path) -> PathBuf {
    db_path.with_extension("snapshots")
}

/// Opens (creating if needed) the database of one node.
///
/// # Errors
/// [`DbError`] when the directory or file cannot be created or opened (for
/// example because another process holds it), or a snapshot left by an older
/// release cannot be converted.
pub fn open_with(path: &Path, options: &StoreOptions) -> Result<(LogStore, StateMachine), DbError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|error| DbError::Dir {
            path: dir.display().to_string(),
            error,
        })?;
    }
    let snapshots = snapshot_dir(path);
    std::fs::create_dir_all(&snapshots).map_err(|error| DbError::Dir {
        path: snapshots.display().to_string(),
        error,
    })?;
    let db = redb::Builder::new()
        .set_cache_size(options.cache_bytes)
        .create(path)?;
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
    let target_index_built = super::targets::create_tables(&txn)?;
    expiry::create_tables(&txn, target_index_built)?;
    txn.commit()?;
    let db = Arc::new(db);
    let files = SnapshotFiles { dir: snapshots };
    files.convert_legacy(&db)?;
    files.rebuild_if_missing(&db)?;
    files.remove_leftovers(&db)?;
    let marks = Arc::new(LogMarks::default());
    marks.set_last(last_log_index(&db)?);
    let applied = Arc::new(Applied::new(last_applied_index(&db)?));
    Ok((
        LogStore {
            db: db.clone(),
            marks,
            tail: Arc::default(),
            applied: applied.clone(),
            purge_waits: true,
        },
        StateMachine {
            db,
            files: Arc::new(files),
            applied,
        },
    ))
}

/// The state machine's `last_applied` index as stored (and durable) at open.
fn last_applied_index(db: &Database) -> Result<Option<u64>, DbError> {
    let txn = db.begin_read()?;
    let applied: Option<LogId<NodeId>> = get_json(&txn.open_table(SM_META)?, "last_applied")?;
    Ok(applied.map(|l| l.index))
}

/// The index of the last entry in the log at open (the last purged one when
/// the log is empty).
fn last_log_index(db: &Database) -> Result<Option<u64>, DbError> {
    let txn = db.begin_read()?;
    if let Some((k, _)) = txn.open_table(LOG)?.last()? {
        return Ok(Some(k.value()));
    }
    let purged: Option<LogId<NodeId>> = get_json(&txn.open_table(RAFT_META)?, "last_purged")?;
    Ok(purged.map(|l| l.index))
}

/// Two positions of this node's log, readable without the Raft core: the
/// index of its last entry and the committed index openraft last reported
/// through [`RaftLogStorage::save_committed`] (kept in memory only).
///
/// They let the leader answer a follower's `ReadIndex` without a round trip
/// through its Raft core (a task wake-up per read barrier that was about a
/// third of the leader's cost of one). A leader's log holds every committed
/// entry (Raft's leader completeness), so its last index is at or above the
/// committed index whenever it is read; it is a safe read index but can
/// include entries still in flight, which the follower would then wait for. When the two are equal nothing is
/// in flight and the last index is the committed one; otherwise the leader
/// asks its core for the exact committed index (`Node::leader_read_index`).
/// The committed mark alone would not do: openraft tells followers about a
/// new committed index before it calls `save_committed`.
#[derive(Debug, Default)]
pub struct LogMarks {
    /// Last index + 1; 0 when the log has no entry.
    last: AtomicU64,
    /// Committed index + 1 as last reported; 0 before the first report.
    committed: AtomicU64,
}

impl LogMarks {
    fn set_last(&self, index: Option<u64>) {
        self.last
            .store(index.map_or(0, |i| i + 1), Ordering::SeqCst);
    }

    fn raise_last(&self, index: u64) {
        self.last.fetch_max(index + 1, Ordering::SeqCst);
    }

    /// The index of the log's last entry (`None`: an empty log), raised when
    /// an append starts, before the entry is persisted.
    pub fn last(&self) -> Option<u64> {
        self.last.load(Ordering::SeqCst).checked_sub(1)
    }

    /// The last index when every entry of the log is known to be committed
    /// (`Some(None)` for an empty log); `None` while entries are in flight.
    pub fn settled(&self) -> Option<Option<u64>> {
        let last = self.last.load(Ordering::SeqCst);
        let committed = self.committed.load(Ordering::SeqCst);
        (last == committed).then(|| last.checked_sub(1))
    }
}

/// The Raft log and vote. Cloning shares the database, the tail and the
/// marks (it is the log reader too).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The newest entries, so that reading back what was just appended
    /// (replication, apply) needs no blocking read (`log_tail.rs`).
    tail: Arc<Mutex<LogTail>>,
    marks: Arc<LogMarks>,
    /// What the state machine has committed: a purge waits for it.
    applied: Arc<Applied>,
    /// Whether a purge waits for [`Self::applied`]; only openraft's
    /// conformance suite turns it off ([`Self::purge_without_waiting`]).
    purge_waits: bool,
}

impl LogStore {
    /// The log's positions (see [`LogMarks`]).
    pub fn marks(&self) -> Arc<LogMarks> {
        self.marks.clone()
    }

    /// How far the state machine has got (see [`Applied`]).
    pub fn applied(&self) -> Arc<Applied> {
        self.applied.clone()
    }

    /// A log store whose purges do not wait for the state machine. Only for
    /// openraft's storage conformance suite, which tests the log alone and
    /// purges entries its state machine never applies; a node never asks
    /// that (see `docs/architecture.md`, "A purge waits for the state
    /// machine"), and a node must not purge this way.
    pub fn purge_without_waiting(mut self) -> Self {
        self.purge_waits = false;
        self
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, LogTail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        if let Some(entries) = self.tail().get(&bounds) {
            return Ok(entries);
        }
        let db = self.db.clone();
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

/// `save_committed` and `read_committed` keep openraft's defaults (nothing
/// stored): openraft 0.9 awaits `save_committed` in its core between
/// committing an entry and applying it, so a stored commit index cost every
/// write a hop to the blocking pool and a redb transaction on its way to the
/// answer. It bought nothing for recovery: it was written without an fsync,
/// like the applies right after it, so both reached the disk with the same
/// next log append; after a restart openraft applies up to `last_applied`
/// and learns the commit index from the leader (a single node, from the
/// entry it commits on becoming leader), as for any lagging follower.
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

    /// Not stored (see `docs/architecture.md`, "Where a write waits"): only
    /// marked for [`LogMarks`].
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        self.marks
            .committed
            .store(committed.map_or(0, |c| c.index + 1), Ordering::SeqCst);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut appended = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e)
                .map_err(|err| io_err(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))?;
            rows.push((e.log_id.index, bytes));
            appended.push(e);
        }
        // Before the write, so the mark is never below an entry that
        // replication could already read.
        if let Some((last, _)) = rows.last() {
            self.marks.set_last(Some(*last));
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
            Ok(rows
                .iter()
                .map(|(_, bytes)| bytes.len())
                .collect::<Vec<_>>())
        })
        .await;
        match result {
            Ok(sizes) => {
                // In the log now: readable from the tail before openraft
                // hears of it.
                self.tail().append(appended.into_iter().zip(sizes));
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
        self.marks.set_last(log_id.index.checked_sub(1));
        // The tail first: it never holds an entry the log may have lost.
        self.tail().truncate(log_id.index);
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

    /// Waits first until the state machine has committed up to `log_id`
    /// (see [`Applied`] and `docs/architecture.md`, "A purge waits for the
    /// state machine"): on a follower openraft asks for this purge while the
    /// snapshot that covers it is still being installed.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        if self.purge_waits && !self.applied.reached(log_id.index).await {
            return Err(io_err(
                ErrorSubject::Logs,
                ErrorVerb::Delete,
                format!(
                    "purge up to {} refused: the state machine failed before reaching it",
                    log_id.index
                ),
            ));
        }
        // After a snapshot install the log may end at the snapshot.
        self.marks.raise_last(log_id.index);
        self.tail().purge(log_id.index);
        let db = self.db.clone();
        let bytes = serde_json::to_vec(&log_id)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        blocking(ErrorSubject::Logs, ErrorVerb::Delete, move || {
            let txn = db.begin_write()?;
            txn.open_table(RAFT_META)?
                .insert("last_purged", bytes.as_slice())?;
            txn.open_table(LOG)?
                .retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            // Durability::Immediate (the default): also makes durable the
            // applies committed before it with Durability::None, which
            // include the state this purge waited for.
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// A snapshot as releases before the streamed format stored it (one JSON
/// value under `data` in the snapshot table); only read, to convert it once.
#[derive(Serialize, Deserialize)]
struct LegacySnapshot {
    last_now: u64,
    aliases: Vec<AliasRecord>,
    /// Purged ids and when they were purged.
    #[serde(default)]
    purged: Vec<(String, u64)>,
    #[serde(default)]
    maintenance: ClusterMaintenance,
    #[serde(default)]
    idempotency: Vec<(String, IdempotencyRecord)>,
}

/// The state machine: alias records and what has been applied.
pub struct StateMachine {
    db: Arc<Database>,
    files: Arc<SnapshotFiles>,
    /// Raised after each apply and install commits (see [`Applied`]).
    applied: Arc<Applied>,
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

    /// Aliases that can still forward at `now_ms` (neither revoked, used up
    /// nor expired: not [`AliasRecord::is_dead`]), and all stored aliases.
    ///
    /// Reads no alias: the per-target index (`targets.rs`) holds one row per
    /// alias that is neither revoked nor used up, with its `valid_until`, so
    /// the live ones are its rows less those whose time has passed, which
    /// its expiry index counts (only the rows expired since the last purge).
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read.
    pub fn count(&self, now_ms: u64) -> Result<(u64, u64), DbError> {
        let txn = self.db.begin_read()?;
        let all = txn.open_table(ALIASES)?.len()?;
        let counted = txn.open_table(super::targets::TARGET_ALIASES)?.len()?;
        let expired =
            expiry::count_due(&txn.open_table(expiry::TARGET_ALIASES_BY_EXPIRY)?, now_ms)?;
        Ok((counted.saturating_sub(expired), all))
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
        let last = entries.last().map(|e| e.log_id.index);
        let db = self.db.clone();
        let result = blocking(ErrorSubject::StateMachine, ErrorVerb::Write, move || {
            apply_entries(&db, &entries, PurgeBy::Index)
        })
        .await;
        match &result {
            // Committed (not yet durable: see `Applied` and the purge).
            Ok(_) => self.applied.raise(last),
            Err(_) => self.applied.fail(),
        }
        result
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            files: self.files.clone(),
        }
    }

    /// An unnamed temporary file in the snapshot directory: openraft writes
    /// the received chunks into it and hands it back to
    /// [`RaftStateMachine::install_snapshot`]. It is unlinked at once, so an
    /// abandoned or crashed transfer leaves nothing behind.
    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<tokio::fs::File>> {
        let files = self.files.clone();
        let file = blocking(ErrorSubject::Snapshot(None), ErrorVerb::Write, move || {
            let path = files.dir.join(format!("receiving-{}.tmp", now_nanos()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|error| file_err(&path, error))?;
            std::fs::remove_file(&path).map_err(|error| file_err(&path, error))?;
            Ok(file)
        })
        .await?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Reads the received file record by record into one write transaction
    /// (the state machine is replaced whole or not at all: nothing is
    /// committed unless the checksum at the end matches), copying it into
    /// this node's own snapshot file on the way.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StoreResult<()> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let received = snapshot.into_std().await;
        let meta = meta.clone();
        let db = self.db.clone();
        let files = self.files.clone();
        let index = meta.last_log_id.map(|l| l.index);
        let result = blocking(subject, ErrorVerb::Write, move || {
            files.install(&db, &meta, received)
        })
        .await;
        match &result {
            // Committed durably (`install_with`).
            Ok(()) => self.applied.raise(index),
            Err(_) => self.applied.fail(),
        }
        result
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let files = self.files.clone();
        let current = blocking(ErrorSubject::Snapshot(None), ErrorVerb::Read, move || {
            files.open_current(&db)
        })
        .await?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

/// Builds snapshots from a consistent read of the state machine.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    files: Arc<SnapshotFiles>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let db = self.db.clone();
        let files = self.files.clone();
        let (meta, file) = blocking(ErrorSubject::Snapshot(None), ErrorVerb::Write, move || {
            files.build(&db)
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

fn file_err(path: &Path, error: std::io::Error) -> DbError {
    DbError::SnapshotFile {
        path: path.display().to_string(),
        error,
    }
}

fn format_err(path: &Path, error: SnapshotError) -> DbError {
    DbError::Snapshot {
        path: path.display().to_string(),
        error,
    }
}

/// Buffer for reading and writing snapshot files: large enough that a file
/// is moved in few system calls, small enough not to matter for memory.
const FILE_BUFFER: usize = 256 * 1024;

/// The snapshot files of one database. Which one is current is recorded in
/// the [`SNAPSHOT`] table; a file is written under a temporary name, synced
/// and renamed before the table names it, and the file it replaces is deleted
/// after that commit (a sender still reading it keeps its open handle).
struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh file name for a snapshot up to `last`.
    fn new_name(last: Option<LogId<NodeId>>) -> String {
        let index = last.map_or_else(|| "none".to_string(), |l| l.index.to_string());
        format!("snapshot-{index}-{}.snap", now_nanos())
    }

    /// Writes a complete snapshot file through `fill` under a temporary
    /// name, syncs it and renames it to `name`.
    fn write_file(
        &self,
        name: &str,
        fill: impl FnOnce(&mut format::Writer<BufWriter<std::fs::File>>) -> Result<(), DbError>,
    ) -> Result<(), DbError> {
        let tmp = self.path(&format!("{name}.tmp"));
        let result = (|| {
            let file = std::fs::File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
            let mut w = format::Writer::new(BufWriter::with_capacity(FILE_BUFFER, file))
                .map_err(|e| format_err(&tmp, e))?;
            fill(&mut w)?;
            let buffered = w.finish().map_err(|e| format_err(&tmp, e))?;
            let file = buffered
                .into_inner()
                .map_err(|e| file_err(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| file_err(&tmp, e))?;
            self.commit_file(&tmp, name)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Renames a synced temporary file to its final name, durably.
    fn commit_file(&self, tmp: &Path, name: &str) -> Result<(), DbError> {
        let path = self.path(name);
        std::fs::rename(tmp, &path).map_err(|e| file_err(&path, e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| file_err(&self.dir, e))
    }

    fn open_file(&self, name: &str) -> Result<std::fs::File, DbError> {
        let path = self.path(name);
        std::fs::File::open(&path).map_err(|e| file_err(&path, e))
    }

    /// Makes `name` the current snapshot unless a newer one is already
    /// current (a snapshot installed while this one was built). Returns
    /// whether it became current; the file it replaced is deleted.
    fn make_current(&self, db: &Database, meta: &Meta, name: &str) -> Result<bool, DbError> {
        let txn = db.begin_write()?;
        let replaced = {
            let mut table = txn.open_table(SNAPSHOT)?;
            let stored: Option<Meta> = get_json(&table, "meta")?;
            if stored.is_some_and(|m| m.last_log_id > meta.last_log_id) {
                None
            } else {
                let old = table.get("file")?.map(|v| v.value().to_vec());
                table.insert("meta", serde_json::to_vec(meta)?.as_slice())?;
                table.insert("file", name.as_bytes())?;
                Some(old)
            }
        };
        txn.commit()?;
        match replaced {
            None => Ok(false),
            Some(old) => {
                if let Some(old) = old.and_then(|o| String::from_utf8(o).ok()) {
                    if old != name {
                        let _ = std::fs::remove_file(self.path(&old));
                    }
                }
                Ok(true)
            }
        }
    }

    /// Streams the state machine as of one read transaction into a new
    /// snapshot file and makes it current.
    fn build(&self, db: &Database) -> Result<(Meta, std::fs::File), DbError> {
        let started = std::time::Instant::now();
        // A read transaction is a consistent view even while applies go on.
        let read = db.begin_read()?;
        let meta_table = read.open_table(SM_META)?;
        let last_applied: Option<LogId<NodeId>> = get_json(&meta_table, "last_applied")?;
        let last_membership: StoredMembership<NodeId, openraft::BasicNode> =
            get_json(&meta_table, "last_membership")?.unwrap_or_default();
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, now_nanos()),
            None => format!("none-{}", now_nanos()),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let name = Self::new_name(last_applied);
        let tmp = self.path(&format!("{name}.tmp"));
        self.write_file(&name, |w| {
            dump(&read, w).map_err(|e| match e {
                DumpError::Db(e) => e,
                DumpError::Format(e) => format_err(&tmp, e),
            })
        })?;
        drop(read);
        // Opened before it may be replaced: the handle stays readable.
        let file = self.open_file(&name)?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let current = self.make_current(db, &meta, &name)?;
        if !current {
            let _ = std::fs::remove_file(self.path(&name));
        }
        tracing::info!(
            index = meta.last_log_id.map(|l| l.index),
            bytes,
            ms = started.elapsed().as_millis() as u64,
            current,
            "snapshot built"
        );
        Ok((meta, file))
    }

    /// Installs a received snapshot file (see
    /// [`RaftStateMachine::install_snapshot`]).
    fn install(&self, db: &Database, meta: &Meta, received: std::fs::File) -> Result<(), DbError> {
        self.install_with(db, meta, received, true)
    }

    /// As [`Self::install`]; `build_indexes: false` leaves the expiry
    /// indexes out (only to measure what building them costs).
    fn install_with(
        &self,
        db: &Database,
        meta: &Meta,
        mut received: std::fs::File,
        build_indexes: bool,
    ) -> Result<(), DbError> {
        let started = std::time::Instant::now();
        let source = PathBuf::from(format!("received snapshot {}", meta.snapshot_id));
        received
            .seek(SeekFrom::Start(0))
            .map_err(|e| file_err(&source, e))?;
        let name = Self::new_name(meta.last_log_id);
        let tmp = self.path(&format!("{name}.tmp"));
        let result = (|| {
            let copy = std::fs::File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
            let mut reader = format::Reader::new(format::Tee {
                reader: BufReader::with_capacity(FILE_BUFFER, received),
                writer: BufWriter::with_capacity(FILE_BUFFER, copy),
            })
            .map_err(|e| format_err(&source, e))?;
            // One transaction: the state machine is replaced whole or not at all.
            let txn = db.begin_write()?;
            // Whether the snapshot carried per-target rows, and whether any
            // of its aliases counts for them (see `targets::index_installed`).
            let (mut carries_index, mut any_counted) = (false, false);
            for table in [
                ALIASES,
                SETTINGS,
                IDEMPOTENCY,
                SM_META,
                super::targets::TARGETS,
                super::targets::CONFIRM_TOKENS,
            ] {
                txn.delete_table(table)?;
            }
            txn.delete_table(PURGED)?;
            txn.delete_table(super::targets::TARGET_ALIASES)?;
            for def in expiry::ALL {
                txn.delete_table(def)?;
            }
            {
                let mut aliases = txn.open_table(ALIASES)?;
                let mut purged = txn.open_table(PURGED)?;
                let mut keys = txn.open_table(IDEMPOTENCY)?;
                let mut settings = txn.open_table(SETTINGS)?;
                let mut sm = txn.open_table(SM_META)?;
                let mut targets = txn.open_table(super::targets::TARGETS)?;
                let mut tokens = txn.open_table(super::targets::CONFIRM_TOKENS)?;
                let mut index = txn.open_table(super::targets::TARGET_ALIASES)?;
                // The expiry indexes are derived and never sent: built here
                // from the records as they are installed.
                let mut expiry_ix = expiry::Indexes::open(&txn)?;
                let mut built = expiry::Builder::default();
                while let Some(rec) = reader.next_record().map_err(|e| format_err(&source, e))? {
                    let key = std::str::from_utf8(&rec.key).map_err(|_| {
                        format_err(
                            &source,
                            SnapshotError::Io(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "a record key is not UTF-8",
                            )),
                        )
                    })?;
                    let which = match rec.kind {
                        Kind::Alias => Some(expiry::Which::Aliases),
                        Kind::IdempotencyKey => Some(expiry::Which::Keys),
                        Kind::ConfirmToken => Some(expiry::Which::Tokens),
                        Kind::Target => Some(expiry::Which::Targets),
                        _ => None,
                    };
                    if let (Some(which), true) = (which, build_indexes) {
                        let at = which.time(&rec.value);
                        built.add(&mut expiry_ix, which, at, key)?;
                    }
                    match rec.kind {
                        Kind::Alias => {
                            // Decoded only until the first alias that counts.
                            any_counted =
                                any_counted || super::targets::stored_counted(rec.value.as_slice());
                            aliases.insert(key, rec.value.as_slice())?;
                        }
                        Kind::Purged | Kind::TargetAlias => {
                            carries_index |= rec.kind == Kind::TargetAlias;
                            let at: [u8; 8] = rec.value.as_slice().try_into().map_err(|_| {
                                format_err(
                                    &source,
                                    SnapshotError::Io(std::io::Error::new(
                                        std::io::ErrorKind::InvalidData,
                                        "a record's time is not 8 bytes",
                                    )),
                                )
                            })?;
                            let at = u64::from_le_bytes(at);
                            let which = if rec.kind == Kind::Purged {
                                purged.insert(key, at)?;
                                expiry::Which::Purged
                            } else {
                                index.insert(key, at)?;
                                expiry::Which::TargetAliases
                            };
                            if build_indexes {
                                built.add(&mut expiry_ix, which, at, key)?;
                            }
                        }
                        Kind::Target => {
                            targets.insert(key, rec.value.as_slice())?;
                        }
                        Kind::ConfirmToken => {
                            tokens.insert(key, rec.value.as_slice())?;
                        }
                        Kind::IdempotencyKey => {
                            keys.insert(key, rec.value.as_slice())?;
                        }
                        Kind::Setting => {
                            settings.insert(key, rec.value.as_slice())?;
                        }
                        Kind::StateMeta => {
                            sm.insert(key, rec.value.as_slice())?;
                        }
                    }
                }
                sm.insert(
                    "last_applied",
                    serde_json::to_vec(&meta.last_log_id)?.as_slice(),
                )?;
                sm.insert(
                    "last_membership",
                    serde_json::to_vec(&meta.last_membership)?.as_slice(),
                )?;
                built.finish(&mut expiry_ix)?;
                if build_indexes {
                    expiry::mark_current(&mut sm)?;
                }
            }
            // The per-target index comes with the snapshot; one converted from
            // the JSON format has none, and it is then built from the aliases.
            let build_index = !carries_index && any_counted;
            if super::targets::index_installed(&txn, build_index)? && build_indexes {
                // Built now: its expiry index was not.
                expiry::rebuild(&txn)?;
            }
            // The checksum matched (next_record returned None): keep the copy.
            let tee = reader.into_inner();
            let copy = tee
                .writer
                .into_inner()
                .map_err(|e| file_err(&tmp, e.into_error()))?;
            copy.sync_all().map_err(|e| file_err(&tmp, e))?;
            self.commit_file(&tmp, &name)?;
            let replaced = {
                let mut table = txn.open_table(SNAPSHOT)?;
                let old = table.get("file")?.map(|v| v.value().to_vec());
                table.insert("meta", serde_json::to_vec(meta)?.as_slice())?;
                table.insert("file", name.as_bytes())?;
                table.remove("data")?;
                old
            };
            // Durability::Immediate (the default): the new state and the
            // record of its snapshot survive a crash together.
            txn.commit()?;
            if let Some(old) = replaced.and_then(|o| String::from_utf8(o).ok()) {
                let _ = std::fs::remove_file(self.path(&old));
            }
            tracing::info!(
                index = meta.last_log_id.map(|l| l.index),
                ms = started.elapsed().as_millis() as u64,
                "snapshot installed"
            );
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(self.path(&name));
        }
        result
    }

    /// The current snapshot's meta and an open handle on its file.
    fn open_current(&self, db: &Database) -> Result<Option<(Meta, std::fs::File)>, DbError> {
        // A build or install may replace (and delete) the file between
        // reading its name and opening it: then the new name is read again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let Some(meta) = get_json::<Meta>(&table, "meta")? else {
                return Ok(None);
            };
            let Some(name) = table.get("file")?.map(|v| v.value().to_vec()) else {
                return Err(DbError::SnapshotMissing(
                    "(none recorded for the current snapshot)".into(),
                ));
            };
            let name = String::from_utf8_lossy(&name).into_owned();
            drop(table);
            drop(txn);
            match std::fs::File::open(self.path(&name)) {
                Ok(f) => return Ok(Some((meta, f))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(DbError::SnapshotMissing(
                        self.path(&name).display().to_string(),
                    ))
                }
                Err(e) => return Err(file_err(&self.path(&name), e)),
            }
        }
    }

    /// Converts a snapshot stored by a release before the streamed format
    /// (one JSON value in the database) into a snapshot file, keeping its
    /// meta. Runs once, at open; holds that old snapshot in memory as the old
    /// release did.
    fn convert_legacy(&self, db: &Database) -> Result<(), DbError> {
        let (meta, data) = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let Some(data) = table.get("data")?.map(|v| v.value().to_vec()) else {
                return Ok(());
            };
            let meta: Option<Meta> = get_json(&table, "meta")?;
            (meta, data)
        };
        let Some(meta) = meta else {
            return Ok(());
        };
        let old: LegacySnapshot = serde_json::from_slice(&data)?;
        drop(data);
        let name = Self::new_name(meta.last_log_id);
        let tmp = self.path(&format!("{name}.tmp"));
        self.write_file(&name, |w| {
            let f = |e| format_err(&tmp, e);
            for rec in &old.aliases {
                w.record(Kind::Alias, rec.id.as_bytes(), &serde_json::to_vec(rec)?)
                    .map_err(f)?;
            }
            for (id, at) in &old.purged {
                w.record(Kind::Purged, id.as_bytes(), &at.to_le_bytes())
                    .map_err(f)?;
            }
            for (key, claim) in &old.idempotency {
                w.record(
                    Kind::IdempotencyKey,
                    key.as_bytes(),
                    &serde_json::to_vec(claim)?,
                )
                .map_err(f)?;
            }
            w.record(
                Kind::Setting,
                b"maintenance",
                &serde_json::to_vec(&old.maintenance)?,
            )
            .map_err(f)?;
            w.record(
                Kind::StateMeta,
                b"last_now",
                &serde_json::to_vec(&old.last_now)?,
            )
            .map_err(f)?;
            Ok(())
        })?;
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOT)?;
            table.insert("file", name.as_bytes())?;
            table.remove("data")?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Builds a new snapshot when the database names a file that is gone (a
    /// data directory restored from a copy of `tempalias.redb` alone). The
    /// state machine is at or past the lost snapshot (both were committed
    /// together or the snapshot came from it), so a snapshot of it replaces
    /// the lost one without losing anything openraft relies on.
    fn rebuild_if_missing(&self, db: &Database) -> Result<(), DbError> {
        let name = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            table
                .get("file")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned())
        };
        match name {
            Some(name) if !self.path(&name).exists() => {
                tracing::warn!(file = %self.path(&name).display(), "snapshot file missing: building a new one");
                self.build(db).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Deletes every file in the snapshot directory but the current one:
    /// temporary files of a build or install cut short by a crash, and a
    /// replaced snapshot whose deletion did not happen. Only at open, when
    /// nothing else uses the directory.
    fn remove_leftovers(&self, db: &Database) -> Result<(), DbError> {
        let current = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            table
                .get("file")?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned())
        };
        let entries = std::fs::read_dir(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| file_err(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if Some(&name) != current.as_ref() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// A failure while streaming the tables out: the database or the file.
enum DumpError {
    Db(DbError),
    Format(SnapshotError),
}

impl<E: Into<DbError>> From<E> for DumpError {
    fn from(e: E) -> Self {
        DumpError::Db(e.into())
    }
}

/// Writes every table a snapshot carries, as stored, from one read
/// transaction. A new replicated table must be added here, in
/// [`SnapshotFiles::install`] and as a [`Kind`].
fn dump(read: &redb::ReadTransaction, w: &mut format::Writer<impl Write>) -> Result<(), DumpError> {
    let fmt = DumpError::Format;
    for item in read.open_table(ALIASES)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::Alias, k.value().as_bytes(), v.value())
            .map_err(fmt)?;
    }
    for item in read.open_table(PURGED)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::Purged, k.value().as_bytes(), &v.value().to_le_bytes())
            .map_err(fmt)?;
    }
    for item in read.open_table(IDEMPOTENCY)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::IdempotencyKey, k.value().as_bytes(), v.value())
            .map_err(fmt)?;
    }
    for item in read.open_table(SETTINGS)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::Setting, k.value().as_bytes(), v.value())
            .map_err(fmt)?;
    }
    if let Some(v) = read.open_table(SM_META)?.get("last_now")? {
        w.record(Kind::StateMeta, b"last_now", v.value())
            .map_err(fmt)?;
    }
    for item in read.open_table(super::targets::TARGETS)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::Target, k.value().as_bytes(), v.value())
            .map_err(fmt)?;
    }
    for item in read.open_table(super::targets::CONFIRM_TOKENS)?.iter()? {
        let (k, v) = item?;
        w.record(Kind::ConfirmToken, k.value().as_bytes(), v.value())
            .map_err(fmt)?;
    }
    for item in read.open_table(super::targets::TARGET_ALIASES)?.iter()? {
        let (k, v) = item?;
        w.record(
            Kind::TargetAlias,
            k.value().as_bytes(),
            &v.value().to_le_bytes(),
        )
        .map_err(fmt)?;
    }
    Ok(())
}

/// How a purge finds what is due: from the expiry indexes, or (only to
/// check those against) by scanning whole tables as earlier releases did.
#[derive(Debug, Clone, Copy)]
enum PurgeBy {
    Index,
    #[cfg(test)]
    Scan,
}

/// Applies `entries` to the state machine in one write transaction.
fn apply_entries(
    db: &Database,
    entries: &[Entry],
    purge: PurgeBy,
) -> Result<Vec<Response>, DbError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::None)?;
    let mut responses = Vec::with_capacity(entries.len());
    {
        let mut meta = txn.open_table(SM_META)?;
        let mut aliases = txn.open_table(ALIASES)?;
        let mut settings = txn.open_table(SETTINGS)?;
        let mut keys = txn.open_table(IDEMPOTENCY)?;
        let mut targets = super::targets::Tables::open(&txn)?;
        let mut expiry = expiry::Indexes::open(&txn)?;
        let mut last_now: u64 = get_json(&meta, "last_now")?.unwrap_or(0);
        let mut membership: Option<StoredMembership<NodeId, openraft::BasicNode>> = None;
        let mut last_applied = None;
        for entry in entries {
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
                        expiry: &mut expiry,
                        purge,
                    };
                    responses.push(apply_command(&mut tables, &req.cmd, last_now)?);
                }
            }
        }
        meta.insert("last_now", serde_json::to_vec(&last_now)?.as_slice())?;
        if let Some(applied) = last_applied {
            let applied = serde_json::to_vec(&applied)?;
            meta.insert("last_applied", applied.as_slice())?;
            // The indexes were kept in this transaction: current up to here.
            expiry::mark_applied(&mut meta, &applied)?;
        }
        if let Some(m) = membership {
            meta.insert("last_membership", serde_json::to_vec(&m)?.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(responses)
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
    /// The expiry indexes of the tables a purge deletes from (`expiry.rs`).
    expiry: &'a mut expiry::Indexes<'t>,
    purge: PurgeBy,
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
    match cmd {
        Command::Purge { keep_ms } => return purge(t, *keep_ms, None, now_ms),
        Command::PurgeBounded { keep_ms, max_rows } => {
            return purge(t, *keep_ms, Some(*max_rows), now_ms);
        }
        _ => {}
    }
    if let Some(response) = t.targets.apply(t.aliases, t.keys, t.expiry, cmd, now_ms)? {
        return Ok(response);
    }
    if let Some(response) = apply_own_tables(t, cmd, now_ms)? {
        return Ok(response);
    }
    Ok(match state::command_id(cmd) {
        Some(id) => {
            let current: Option<AliasRecord> = get_json(t.aliases, id)?;
            let (change, response) = state::apply(current.as_ref(), cmd, now_ms);
            match change {
                Change::Put(rec) => {
                    t.targets.sync(t.expiry, current.as_ref(), Some(&rec))?;
                    t.aliases.insert(id, serde_json::to_vec(&rec)?.as_slice())?;
                }
                Change::Delete => {
                    t.targets.sync(t.expiry, current.as_ref(), None)?;
                    t.aliases.remove(id)?;
                }
                Change::Keep => {}
            }
            response
        }
        None => Response::None,
    })
}

/// Applies a purge: deletes what is due in every table a purge deletes
/// from, at most `max_rows` rows when bounded ([`Command::PurgeBounded`]).
/// The parts spend one budget in a fixed order, oldest rows first within
/// each: aliases (each leaving its tombstone), tombstones past their year,
/// idempotency keys, then the per-target rows, confirmation links and
/// target records. The order does not change what a purge deletes in the
/// end: the parts read and delete different tables, and tombstones are
/// forgotten only once every due alias is gone (a bound that stops the
/// aliases leaves nothing for the later parts).
fn purge(
    t: &mut Tables<'_, '_>,
    keep_ms: u64,
    max_rows: Option<u64>,
    now_ms: u64,
) -> Result<Response, DbError> {
    let mut budget = expiry::Budget::new(max_rows);
    let count = match t.purge {
        PurgeBy::Index => {
            let count = purge_aliases(t, keep_ms, now_ms, &mut budget)?;
            forget_tombstones(t, now_ms, &mut budget)?;
            for key in budget.take(&mut t.expiry.keys, now_ms)? {
                t.keys.remove(key.as_str())?;
            }
            t.targets.purge(t.expiry, now_ms, &mut budget)?;
            count
        }
        #[cfg(test)]
        PurgeBy::Scan => {
            // Earlier releases knew no bound.
            assert!(max_rows.is_none(), "a bounded purge by scan");
            let (count, rows) = purge_aliases_by_scan(t, keep_ms, now_ms)?;
            budget.deleted(rows);
            let before = t.keys.len()?;
            t.keys.retain(|_, v| {
                serde_json::from_slice::<IdempotencyRecord>(v)
                    .map(|c| !idempotency::expired(&c, now_ms))
                    .unwrap_or(false)
            })?;
            budget.deleted(before - t.keys.len()?);
            budget.deleted(t.targets.purge_by_scan(now_ms)?);
            count
        }
    };
    Ok(Response::Purged {
        count,
        rows: budget.rows(),
        more: budget.more(),
    })
}

/// The alias half of a purge: deletes the aliases due (by the expiry
/// index, `valid_until + keep_ms` passed) that hold no live reservation,
/// as many as `budget` allows in index order (earliest `valid_until`
/// first), and leaves a tombstone for each. Reads only due rows. Returns
/// how many aliases went.
///
/// An alias still holding a live reservation is read and skipped without
/// spending the budget: it stays (and stays indexed) until a later purge
/// finds its lease lapsed. There are at most as many as messages in
/// flight, and they never make a bounded purge report more (which would
/// have the leader propose purges that delete nothing).
fn purge_aliases(
    t: &mut Tables<'_, '_>,
    keep_ms: u64,
    now_ms: u64,
    budget: &mut expiry::Budget,
) -> Result<u64, DbError> {
    let Some(bound) = expiry::alias_bound(now_ms, keep_ms) else {
        return Ok(0);
    };
    let mut doomed = Vec::new();
    let mut after = None;
    loop {
        let (page, more) =
            expiry::due_page(&t.expiry.aliases, bound, after.as_ref(), budget.left())?;
        after = page.last().cloned();
        // Index order is time order, which is random in ids: the alias
        // table is read and written in id order, so that consecutive ids
        // share pages.
        let mut candidates = page;
        candidates.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        // Each due id is held once: moved from `candidates` into `doomed`,
        // or dropped with its index row.
        for (at, id) in candidates {
            let Some(v) = t.aliases.get(id.as_str())? else {
                // An index row without its alias cannot arise (every write
                // of the alias table keeps the index); it is derived, so it
                // is simply dropped.
                t.expiry.aliases.remove((at, id.as_str()))?;
                budget.charge(1);
                continue;
            };
            let rec: AliasLiveness = serde_json::from_slice(v.value())?;
            if rec.purgeable(now_ms, keep_ms) {
                budget.deleted(1);
                doomed.push((at, id));
            }
        }
        if !more {
            break;
        }
        if budget.left() == 0 {
            budget.stopped();
            break;
        }
        // Some were held: read on for what they left of the budget.
    }
    // Deleted in id order (pages shared), whatever order they were found in.
    doomed.sort_unstable_by(|a, b| a.1.cmp(&b.1));
    let mut purged = t.txn.open_table(PURGED)?;
    for (at, id) in &doomed {
        t.aliases.remove(id.as_str())?;
        t.expiry.aliases.remove((*at, id.as_str()))?;
        let old = purged.insert(id.as_str(), now_ms)?.map(|v| v.value());
        if let Some(old) = old {
            t.expiry.purged.remove((old, id.as_str()))?;
        }
    }
    // New tombstones all have this purge's time: inserted in id order, they
    // are appended to the index.
    for (_, id) in &doomed {
        t.expiry.purged.insert((now_ms, id.as_str()), ())?;
    }
    Ok(doomed.len() as u64)
}

/// Forgets the tombstones older than [`TOMBSTONE_KEEP_MS`], as many as
/// `budget` allows.
fn forget_tombstones(
    t: &mut Tables<'_, '_>,
    now_ms: u64,
    budget: &mut expiry::Budget,
) -> Result<(), DbError> {
    let horizon = now_ms.saturating_sub(TOMBSTONE_KEEP_MS);
    let old = budget.take(&mut t.expiry.purged, horizon)?;
    if old.is_empty() {
        return Ok(());
    }
    let mut purged = t.txn.open_table(PURGED)?;
    for id in old {
        purged.remove(id.as_str())?;
    }
    Ok(())
}

/// The alias half of a purge as releases before the expiry indexes applied
/// it: a scan of every alias and every tombstone. Kept to check that
/// [`purge_aliases`] leaves exactly the same tables. Returns the aliases
/// deleted, and the rows (aliases and tombstones forgotten).
#[cfg(test)]
fn purge_aliases_by_scan(
    t: &mut Tables<'_, '_>,
    keep_ms: u64,
    now_ms: u64,
) -> Result<(u64, u64), DbError> {
    let mut doomed = Vec::new();
    for item in t.aliases.iter()? {
        let (k, v) = item?;
        let rec: AliasLiveness = serde_json::from_slice(v.value())?;
        if rec.purgeable(now_ms, keep_ms) {
            doomed.push(k.value().to_string());
        }
    }
    let mut purged = t.txn.open_table(PURGED)?;
    for id in &doomed {
        t.aliases.remove(id.as_str())?;
        purged.insert(id.as_str(), now_ms)?;
    }
    let horizon = now_ms.saturating_sub(TOMBSTONE_KEEP_MS);
    let before = purged.len()?;
    purged.retain(|_, at| at > horizon)?;
    let forgotten = before - purged.len()?;
    Ok((doomed.len() as u64, doomed.len() as u64 + forgotten))
}

/// The alias count (live, all) as releases before the expiry indexes
/// computed it: every alias decoded. Kept to check and time
/// [`StateReader::count`] against.
#[cfg(test)]
fn count_aliases_by_scan(db: &Database, now_ms: u64) -> Result<(u64, u64), DbError> {
    let txn = db.begin_read()?;
    let (mut live, mut all) = (0, 0);
    for item in txn.open_table(ALIASES)?.iter()? {
        let (_, v) = item?;
        let rec: AliasLiveness = serde_json::from_slice(v.value())?;
        all += 1;
        if !rec.is_dead(now_ms) {
            live += 1;
        }
    }
    Ok((live, all))
}

/// Applies the commands that live in tables other than the alias table
/// (maintenance, keyed creates). `None` means the command is an alias
/// command for the caller.
fn apply_own_tables(
    t: &mut Tables<'_, '_>,
    cmd: &Command,
    now_ms: u64,
) -> Result<Option<Response>, DbError> {
    match cmd {
        Command::SetMaintenance { on } => {
            let current: ClusterMaintenance =
                get_json(t.settings, "maintenance")?.unwrap_or_default();
            let next = if current.on == *on {
                current
            } else {
                ClusterMaintenance {
                    on: *on,
                    since_ms: now_ms,
                }
            };
            t.settings
                .insert("maintenance", serde_json::to_vec(&next)?.as_slice())?;
            Ok(Some(Response::Maintenance(next)))
        }
        Command::CreateAliasKeyed {
            key_hash,
            fingerprint,
            create,
        } => {
            let claim: Option<IdempotencyRecord> = get_json(t.keys, key_hash)?;
            let claimed_alias: Option<AliasRecord> = match &claim {
                Some(c) => get_json(t.aliases, &c.alias_id)?,
                None => None,
            };
            let current: Option<AliasRecord> = match state::command_id(create) {
                Some(id) => get_json(t.aliases, id)?,
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
                t.targets.sync(t.expiry, current.as_ref(), Some(rec))?;
                t.aliases
                    .insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
            }
            if let Some(c) = &outcome.claim {
                expiry::put_json(
                    t.keys,
                    &mut t.expiry.keys,
                    key_hash,
                    serde_json::to_vec(c)?.as_slice(),
                    idempotency::expires_at(c),
                    expiry::key_time,
                )?;
            }
            Ok(Some(outcome.response))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod purge_bench;
#[cfg(test)]
mod purge_tests;

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
