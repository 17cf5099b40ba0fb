//! Expiry indexes: the rows of the state machine's growing tables ordered by
//! the time from which the purge may delete them, so that a purge reads only
//! what is due instead of scanning whole tables.
//!
//! A purge used to decide row by row over every alias, every tombstone (kept
//! a year, so millions), every idempotency key, the per-target index, the
//! confirmation tokens and the target records, all inside the state
//! machine's write transaction. At about 790,000 aliases that took longer
//! than a write's timeout: the writes queued behind it failed and the
//! cluster elected a new leader. Now each of those tables has an index table
//! keyed by `(time, key)`, written in the same transaction as every insert,
//! update and delete of the row it indexes; a purge is a range read up to
//! its bound plus point deletes.
//!
//! What each index is keyed by, and which rows a purge at `now` deletes:
//!
//! | table | index time | deleted when |
//! |---|---|---|
//! | `aliases` | `valid_until_ms` | time ≤ `now − keep_ms`, then [`AliasLiveness::purgeable`] decides (an open reservation keeps the alias) |
//! | `purged` | the purge time | time ≤ `now − TOMBSTONE_KEEP_MS` |
//! | `idempotency_keys` | [`idempotency::expires_at`] | time ≤ `now` |
//! | `target_aliases` | the alias's `valid_until_ms` | time ≤ `now` |
//! | `confirm_tokens` | [`TokenRow::lapses_at`] | time ≤ `now` |
//! | `targets` | [`targets::purgeable_from`] | time ≤ `now` |
//!
//! A bounded purge (`Command::PurgeBounded`) takes the due rows of each
//! index in index order, oldest first, until its [`Budget`] is spent: the
//! same rows on every replica, since every replica holds the same index.
//!
//! Each rule is the old per-row decision rewritten as "from this time on",
//! which it is exactly (each old rule is monotone in one stored time), so a
//! purge deletes the same rows as the scan did: every replica, old or new,
//! reaches the same state from the same log. A row whose value does not
//! decode is indexed at time 0, so the next purge reads it and treats it as
//! the scan did: an idempotency key, token or target record is deleted, an
//! alias fails the purge's apply (the scan decoded every alias and failed
//! the same way).
//!
//! The indexes are derived data: snapshots do not carry them (the format is
//! unchanged) and installing one rebuilds them from the installed tables; a
//! database written before them gets them built once when opened (a version
//! marker in `sm_meta`). Changing what an index is keyed by (a retention
//! constant, say) needs a new [`VERSION`], which rebuilds them on open.
//! Every apply transaction also records the `last_applied` the indexes are
//! current for ([`APPLIED_KEY`]): an earlier release run on the database in
//! between (an upgrade rolled back) applies entries without keeping the
//! indexes, leaves that record behind `last_applied`, and the indexes are
//! built again at the next open instead of being trusted stale.
//!
//! [`AliasLiveness::purgeable`]: super::types::AliasLiveness::purgeable
//! [`TokenRow::lapses_at`]: super::targets::TokenRow::lapses_at

use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::Deserialize;

use super::idempotency;
use super::store::{DbError, ALIASES, IDEMPOTENCY, PURGED, SM_META};
use super::targets::{self, TargetRecord, TokenRow, CONFIRM_TOKENS, TARGETS, TARGET_ALIASES};
use super::types::IdempotencyRecord;

/// One index: `(time, key of the indexed row)` -> nothing.
pub(super) type Index<'t> = redb::Table<'t, (u64, &'static str), ()>;
type Def = TableDefinition<'static, (u64, &'static str), ()>;

/// Aliases by `valid_until_ms`.
pub(super) const ALIASES_BY_EXPIRY: Def = TableDefinition::new("expiry_aliases");
/// Tombstones by purge time.
pub(super) const PURGED_BY_TIME: Def = TableDefinition::new("expiry_purged");
/// Idempotency keys by the time they are forgotten.
pub(super) const KEYS_BY_EXPIRY: Def = TableDefinition::new("expiry_idempotency_keys");
/// Per-target index rows by the alias's `valid_until_ms`.
pub(super) const TARGET_ALIASES_BY_EXPIRY: Def = TableDefinition::new("expiry_target_aliases");
/// Confirmation tokens by the time their link lapses.
pub(super) const TOKENS_BY_EXPIRY: Def = TableDefinition::new("expiry_confirm_tokens");
/// Target records by the time a purge may forget them.
pub(super) const TARGETS_BY_EXPIRY: Def = TableDefinition::new("expiry_targets");

/// Every index, in the order [`rebuild`] reports them.
pub(super) const ALL: [Def; 6] = [
    ALIASES_BY_EXPIRY,
    PURGED_BY_TIME,
    KEYS_BY_EXPIRY,
    TARGET_ALIASES_BY_EXPIRY,
    TOKENS_BY_EXPIRY,
    TARGETS_BY_EXPIRY,
];

/// Marker in `sm_meta`: the version of the indexes present.
pub(super) const VERSION_KEY: &str = "expiry_index_version";
/// Marker in `sm_meta`: the `last_applied` the indexes are current for,
/// written in the same transaction as every change to the indexed tables.
/// An earlier release leaves it alone while it applies entries (and leaves
/// the indexes stale), so after a downgrade and upgrade it differs from
/// `last_applied` and the indexes are built again at open.
pub(super) const APPLIED_KEY: &str = "expiry_index_applied";
/// The index layout this build writes (see the module documentation).
const VERSION: &[u8] = b"1";

/// The indexes, open in one apply transaction.
pub(super) struct Indexes<'t> {
    pub aliases: Index<'t>,
    pub purged: Index<'t>,
    pub keys: Index<'t>,
    pub target_aliases: Index<'t>,
    pub tokens: Index<'t>,
    pub targets: Index<'t>,
}

impl<'t> Indexes<'t> {
    /// Opens the indexes in `txn`.
    ///
    /// # Errors
    /// [`DbError`] when a table cannot be opened.
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, DbError> {
        Ok(Self {
            aliases: txn.open_table(ALIASES_BY_EXPIRY)?,
            purged: txn.open_table(PURGED_BY_TIME)?,
            keys: txn.open_table(KEYS_BY_EXPIRY)?,
            target_aliases: txn.open_table(TARGET_ALIASES_BY_EXPIRY)?,
            tokens: txn.open_table(TOKENS_BY_EXPIRY)?,
            targets: txn.open_table(TARGETS_BY_EXPIRY)?,
        })
    }
}

/// Moves the index row of `key` from time `old` to time `new` (`None`: the
/// row is not, or no longer, in the indexed table).
///
/// # Errors
/// [`DbError`] when the index cannot be written.
pub(super) fn reindex(
    index: &mut Index<'_>,
    key: &str,
    old: Option<u64>,
    new: Option<u64>,
) -> Result<(), DbError> {
    if old == new {
        return Ok(());
    }
    if let Some(at) = old {
        index.remove((at, key))?;
    }
    if let Some(at) = new {
        index.insert((at, key), ())?;
    }
    Ok(())
}

type JsonTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// Writes a JSON row and moves its index row to `due`; `due_of` reads the
/// time of the row it replaces, if any.
///
/// # Errors
/// [`DbError`] when a table cannot be written.
pub(super) fn put_json(
    table: &mut JsonTable<'_>,
    index: &mut Index<'_>,
    key: &str,
    value: &[u8],
    due: u64,
    due_of: fn(&[u8]) -> u64,
) -> Result<(), DbError> {
    let old = table.insert(key, value)?.map(|v| due_of(v.value()));
    reindex(index, key, old, Some(due))
}

/// Removes a JSON row and its index row.
///
/// # Errors
/// [`DbError`] when a table cannot be written.
pub(super) fn remove_json(
    table: &mut JsonTable<'_>,
    index: &mut Index<'_>,
    key: &str,
    due_of: fn(&[u8]) -> u64,
) -> Result<(), DbError> {
    let old = table.remove(key)?.map(|v| due_of(v.value()));
    reindex(index, key, old, None)
}

/// One end of a range of index keys.
type End = Bound<(u64, &'static str)>;

/// The range of the index rows at or before `bound`.
fn upto(bound: u64) -> (End, End) {
    match bound.checked_add(1) {
        // `(bound + 1, "")` is the first key after every `(bound, _)`.
        Some(next) => (Bound::Unbounded, Bound::Excluded((next, ""))),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// The rows of `index` at or before `bound`, as `(time, key)` (what the
/// tests compare).
///
/// # Errors
/// [`DbError`] when the index cannot be read.
#[cfg(test)]
pub(super) fn due(index: &Index<'_>, bound: u64) -> Result<Vec<(u64, String)>, DbError> {
    let mut out = Vec::new();
    for item in index.range::<(u64, &str)>(upto(bound))? {
        let (k, _) = item?;
        let (at, key) = k.value();
        out.push((at, key.to_string()));
    }
    Ok(out)
}

/// Removes the rows of `index` at or before `bound`, the first `limit` of
/// them in index order (oldest first), and returns their keys, sorted (the
/// order in which the indexed table is cheapest to write): the rows of the
/// indexed table that the caller deletes. The flag is true when rows at or
/// before `bound` remain (the limit stopped it).
///
/// # Errors
/// [`DbError`] when the index cannot be written.
pub(super) fn take_due(
    index: &mut Index<'_>,
    bound: u64,
    limit: u64,
) -> Result<(Vec<String>, bool), DbError> {
    let mut out = Vec::new();
    {
        // Only the rows read from the iterator are removed.
        let taken = index
            .extract_from_if::<(u64, &str), _>(upto(bound), |_, _| true)?
            .take(usize::try_from(limit).unwrap_or(usize::MAX));
        for item in taken {
            let (k, _) = item?;
            out.push(k.value().1.to_string());
        }
    }
    let more =
        out.len() as u64 == limit && index.range::<(u64, &str)>(upto(bound))?.next().is_some();
    out.sort_unstable();
    Ok((out, more))
}

/// The rows of `index` at or before `bound` that come after `after` (all of
/// them from the first when `None`), the first `limit` of them in index
/// order, as `(time, key)`; the flag is true when more such rows follow.
///
/// # Errors
/// [`DbError`] when the index cannot be read.
pub(super) fn due_page(
    index: &Index<'_>,
    bound: u64,
    after: Option<&(u64, String)>,
    limit: u64,
) -> Result<(Vec<(u64, String)>, bool), DbError> {
    let (_, end) = upto(bound);
    let start = match after {
        Some((at, key)) => Bound::Excluded((*at, key.as_str())),
        None => Bound::Unbounded,
    };
    let mut out = Vec::new();
    let mut rows = index.range::<(u64, &str)>((start, end))?;
    let mut more = false;
    for item in rows.by_ref() {
        let (k, _) = item?;
        if out.len() as u64 == limit {
            more = true;
            break;
        }
        let (at, key) = k.value();
        out.push((at, key.to_string()));
    }
    Ok((out, more))
}

/// What one purge entry may still delete: a [`Command::PurgeBounded`]
/// stops at its `max_rows`, a [`Command::Purge`] never does. Every table a
/// purge deletes from spends from the one budget, in a fixed order, so
/// replicas applying the same entry delete the same rows.
///
/// [`Command::PurgeBounded`]: super::types::Command::PurgeBounded
/// [`Command::Purge`]: super::types::Command::Purge
#[derive(Debug)]
pub(super) struct Budget {
    left: u64,
    /// Rows deleted from the replicated tables.
    rows: u64,
    /// The bound stopped some part of the purge with rows still due.
    more: bool,
}

impl Budget {
    /// At most `max_rows` rows (`None`: no bound). A bound of 0 is taken as
    /// 1, so that every bounded entry makes progress.
    pub(super) fn new(max_rows: Option<u64>) -> Self {
        Self {
            left: max_rows.map_or(u64::MAX, |n| n.max(1)),
            rows: 0,
            more: false,
        }
    }

    /// Rows the entry may still delete.
    pub(super) fn left(&self) -> u64 {
        self.left
    }

    /// Records `n` rows of a replicated table deleted.
    pub(super) fn deleted(&mut self, n: u64) {
        self.rows += n;
        self.charge(n);
    }

    /// Spends `n` without counting them as deleted rows (index rows
    /// without their indexed row, which a purge drops on the way).
    pub(super) fn charge(&mut self, n: u64) {
        self.left = self.left.saturating_sub(n);
    }

    /// Records that rows remain due beyond what this entry deleted.
    pub(super) fn stopped(&mut self) {
        self.more = true;
    }

    /// Rows deleted from the replicated tables so far.
    pub(super) fn rows(&self) -> u64 {
        self.rows
    }

    /// Whether rows remain due that this entry's bound left.
    pub(super) fn more(&self) -> bool {
        self.more
    }

    /// Removes the rows of `index` at or before `bound` that the budget
    /// allows (oldest first), spends them, and returns their keys sorted:
    /// the rows of the indexed table the caller deletes.
    ///
    /// # Errors
    /// [`DbError`] when the index cannot be written.
    pub(super) fn take(
        &mut self,
        index: &mut Index<'_>,
        bound: u64,
    ) -> Result<Vec<String>, DbError> {
        let (keys, more) = take_due(index, bound, self.left)?;
        self.deleted(keys.len() as u64);
        if more {
            self.stopped();
        }
        Ok(keys)
    }
}

/// How many rows of `index` are at or before `bound`.
///
/// # Errors
/// [`DbError`] when the index cannot be read.
pub(super) fn count_due(
    index: &impl ReadableTable<(u64, &'static str), ()>,
    bound: u64,
) -> Result<u64, DbError> {
    let mut n = 0;
    for item in index.range::<(u64, &str)>(upto(bound))? {
        item?;
        n += 1;
    }
    Ok(n)
}

/// The latest `valid_until_ms` a purge at `now_ms` keeping `keep_ms` may
/// delete (`None`: nothing): exactly the `v` with
/// `v.saturating_add(keep_ms) <= now_ms`, the first half of
/// [`super::types::AliasLiveness::purgeable`].
pub(super) fn alias_bound(now_ms: u64, keep_ms: u64) -> Option<u64> {
    if now_ms == u64::MAX {
        Some(u64::MAX)
    } else {
        now_ms.checked_sub(keep_ms)
    }
}

/// Just the field of a stored alias its index is keyed by.
#[derive(Deserialize)]
struct ValidUntil {
    valid_until_ms: u64,
}

/// Index time of a stored alias (0 when it does not decode, so the next
/// purge reads it and reports the error, as the scan did).
pub(super) fn alias_time(v: &[u8]) -> u64 {
    serde_json::from_slice::<ValidUntil>(v).map_or(0, |r| r.valid_until_ms)
}

/// Index time of a stored idempotency claim.
pub(super) fn key_time(v: &[u8]) -> u64 {
    serde_json::from_slice::<IdempotencyRecord>(v).map_or(0, |c| idempotency::expires_at(&c))
}

/// Index time of a stored confirmation token row.
pub(super) fn token_time(v: &[u8]) -> u64 {
    serde_json::from_slice::<TokenRow>(v).map_or(0, |r| r.lapses_at())
}

/// Index time of a stored target record.
pub(super) fn target_time(v: &[u8]) -> u64 {
    serde_json::from_slice::<TargetRecord>(v).map_or(0, |t| targets::purgeable_from(&t))
}

/// Creates the indexes, building them from the tables when the database
/// has none of this version yet (written by an earlier release) or `force`
/// (an indexed table was just built): once, at open.
///
/// # Errors
/// [`DbError`] when the database cannot be read or written.
pub(super) fn create_tables(txn: &WriteTransaction, force: bool) -> Result<(), DbError> {
    let current = !force && {
        let meta = txn.open_table(SM_META)?;
        let version = meta.get(VERSION_KEY)?.map(|v| v.value().to_vec());
        let marked = meta.get(APPLIED_KEY)?.map(|v| v.value().to_vec());
        version.as_deref() == Some(VERSION) && marked == Some(applied_of(&meta)?)
    };
    if current {
        for def in ALL {
            txn.open_table(def)?;
        }
        return Ok(());
    }
    let started = std::time::Instant::now();
    let rows = rebuild(txn)?;
    if rows.iter().all(|n| *n == 0) {
        // A new database: nothing to tell.
        return Ok(());
    }
    tracing::info!(
        aliases = rows[0],
        tombstones = rows[1],
        idempotency_keys = rows[2],
        target_aliases = rows[3],
        confirm_tokens = rows[4],
        targets = rows[5],
        ms = started.elapsed().as_millis() as u64,
        "expiry indexes built (a database an earlier release wrote or last applied to)"
    );
    Ok(())
}

/// Builds every index from the tables it indexes (replacing what is there)
/// and marks them current; returns the rows of each, in the order of
/// [`ALL`]. Used at open for databases without them, and after installing a
/// snapshot that needed its per-target index built.
///
/// # Errors
/// [`DbError`] when the database cannot be read or written.
pub(super) fn rebuild(txn: &WriteTransaction) -> Result<[u64; 6], DbError> {
    for def in ALL {
        txn.delete_table(def)?;
    }
    let mut ix = Indexes::open(txn)?;
    let mut b = Builder::default();
    fill_json(&txn.open_table(ALIASES)?, &mut b, &mut ix, Which::Aliases)?;
    for item in txn.open_table(PURGED)?.iter()? {
        let (k, v) = item?;
        b.add(&mut ix, Which::Purged, v.value(), k.value())?;
    }
    fill_json(&txn.open_table(IDEMPOTENCY)?, &mut b, &mut ix, Which::Keys)?;
    for item in txn.open_table(TARGET_ALIASES)?.iter()? {
        let (k, v) = item?;
        b.add(&mut ix, Which::TargetAliases, v.value(), k.value())?;
    }
    fill_json(
        &txn.open_table(CONFIRM_TOKENS)?,
        &mut b,
        &mut ix,
        Which::Tokens,
    )?;
    fill_json(&txn.open_table(TARGETS)?, &mut b, &mut ix, Which::Targets)?;
    b.finish(&mut ix)?;
    mark_current(&mut txn.open_table(SM_META)?)?;
    Ok([
        ix.aliases.len()?,
        ix.purged.len()?,
        ix.keys.len()?,
        ix.target_aliases.len()?,
        ix.tokens.len()?,
        ix.targets.len()?,
    ])
}

fn fill_json(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    b: &mut Builder,
    ix: &mut Indexes<'_>,
    which: Which,
) -> Result<(), DbError> {
    for item in table.iter()? {
        let (k, v) = item?;
        b.add(ix, which, which.time(v.value()), k.value())?;
    }
    Ok(())
}

/// Which index a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Aliases,
    Purged,
    Keys,
    TargetAliases,
    Tokens,
    Targets,
}

impl Which {
    /// The index time of a stored JSON row of this table (not for the two
    /// tables whose value is the time itself).
    pub(super) fn time(self, v: &[u8]) -> u64 {
        match self {
            Which::Aliases => alias_time(v),
            Which::Keys => key_time(v),
            Which::Tokens => token_time(v),
            Which::Targets => target_time(v),
            Which::Purged | Which::TargetAliases => 0,
        }
    }
}

impl<'t> Indexes<'t> {
    fn get(&mut self, which: Which) -> &mut Index<'t> {
        match which {
            Which::Aliases => &mut self.aliases,
            Which::Purged => &mut self.purged,
            Which::Keys => &mut self.keys,
            Which::TargetAliases => &mut self.target_aliases,
            Which::Tokens => &mut self.tokens,
            Which::Targets => &mut self.targets,
        }
    }
}

/// Rows buffered before they are written sorted. A table is read (or a
/// snapshot streamed) in key order, which is random in time: written one by
/// one, a million index rows each land on a random page of the index. A
/// sorted run of this many rows is written in one pass in index order
/// instead, so consecutive rows mostly share a page. Only one run is held
/// at a time, for one index (tables and snapshots come one table after the
/// other): at most this many keys, 1-2 MiB with their strings.
const RUN: usize = 16 * 1024;

/// Builds indexes from rows in any order, in sorted runs of [`RUN`], one
/// index at a time: rows for another index first write and free the run.
#[derive(Default)]
pub(super) struct Builder {
    run: Vec<(u64, String)>,
    /// The index the buffered rows go to.
    which: Option<Which>,
}

impl Builder {
    /// Adds the row `key` at time `at` to an index.
    ///
    /// # Errors
    /// [`DbError`] when the index cannot be written.
    pub(super) fn add(
        &mut self,
        ix: &mut Indexes<'_>,
        which: Which,
        at: u64,
        key: &str,
    ) -> Result<(), DbError> {
        if self.which != Some(which) {
            // The previous table is done: its run is written and its
            // memory given back.
            self.flush(ix)?;
            self.run = Vec::new();
            self.which = Some(which);
        }
        self.run.push((at, key.to_string()));
        if self.run.len() >= RUN {
            self.flush(ix)?;
        }
        Ok(())
    }

    fn flush(&mut self, ix: &mut Indexes<'_>) -> Result<(), DbError> {
        let Some(which) = self.which else {
            return Ok(());
        };
        let index = ix.get(which);
        self.run.sort_unstable();
        for (at, key) in self.run.drain(..) {
            index.insert((at, key.as_str()), ())?;
        }
        Ok(())
    }

    /// Writes what is buffered (the caller then marks the indexes current,
    /// [`mark_current`]).
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be written.
    pub(super) fn finish(mut self, ix: &mut Indexes<'_>) -> Result<(), DbError> {
        self.flush(ix)
    }

    /// How many rows are buffered, and how many they have room for.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.run.len(), self.run.capacity())
    }
}

type MetaTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// The stored `last_applied`, as stored (empty when there is none).
fn applied_of(meta: &MetaTable<'_>) -> Result<Vec<u8>, DbError> {
    Ok(meta
        .get("last_applied")?
        .map(|v| v.value().to_vec())
        .unwrap_or_default())
}

/// Records in `sm_meta` that the indexes of this version are present and
/// current for the stored `last_applied` (write that first).
///
/// # Errors
/// [`DbError`] when the table cannot be read or written.
pub(super) fn mark_current(meta: &mut MetaTable<'_>) -> Result<(), DbError> {
    let applied = applied_of(meta)?;
    meta.insert(VERSION_KEY, VERSION)?;
    mark_applied(meta, &applied)
}

/// Records that the indexes are current for `applied` (the bytes just
/// stored as `last_applied`): every apply transaction does, as it keeps
/// the indexes.
///
/// # Errors
/// [`DbError`] when the table cannot be written.
pub(super) fn mark_applied(meta: &mut MetaTable<'_>, applied: &[u8]) -> Result<(), DbError> {
    meta.insert(APPLIED_KEY, applied)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_bound_is_exactly_the_saturating_rule() {
        let keeps = [0, 1, 7, 1000, u64::MAX - 1, u64::MAX];
        let times = [0, 1, 6, 7, 8, 999, 1000, 1001, u64::MAX - 1, u64::MAX];
        for &keep in &keeps {
            for &now in &times {
                for &v in &times {
                    let rule = v.saturating_add(keep) <= now;
                    let index = alias_bound(now, keep).is_some_and(|b| v <= b);
                    assert_eq!(rule, index, "v={v} keep={keep} now={now}");
                }
            }
        }
    }

    #[test]
    fn the_builder_holds_one_run_of_one_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("x.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut ix = Indexes::open(&txn).unwrap();
            let mut b = Builder::default();
            let n = RUN as u64 + 10;
            for i in 0..n {
                let key = format!("a{i:08}");
                b.add(&mut ix, Which::Aliases, (i * 7919) % 1000, &key)
                    .unwrap();
                assert!(b.held().0 < RUN);
            }
            // A full run was written; the rest waits.
            assert_eq!(ix.aliases.len().unwrap(), RUN as u64);
            assert_eq!(b.held().0, 10);
            // Rows of another index: the aliases' run is written and freed.
            b.add(&mut ix, Which::Purged, 5, "p").unwrap();
            assert_eq!(ix.aliases.len().unwrap(), n);
            assert_eq!(b.held().0, 1);
            assert!(b.held().1 < RUN, "{:?}", b.held());
            // Rows coming back to an index they left still all arrive.
            b.add(&mut ix, Which::Aliases, 0, "late").unwrap();
            b.finish(&mut ix).unwrap();
            assert_eq!(ix.aliases.len().unwrap(), n + 1);
            assert_eq!(ix.purged.len().unwrap(), 1);
            assert_eq!(due(&ix.aliases, 0).unwrap()[0], (0, "a00000000".into()));
        }
        txn.commit().unwrap();
    }

    #[test]
    fn limited_reads_and_takes_go_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("x.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut ix = txn.open_table(ALIASES_BY_EXPIRY).unwrap();
            for (at, k) in [(1, "z"), (2, "a"), (2, "b"), (3, "c"), (9, "late")] {
                ix.insert((at, k), ()).unwrap();
            }
            let row = |at: u64, k: &str| (at, k.to_string());
            let (page, more) = due_page(&ix, 3, None, 2).unwrap();
            assert_eq!(page, vec![row(1, "z"), row(2, "a")]);
            assert!(more);
            let (page, more) = due_page(&ix, 3, Some(&row(2, "a")), 2).unwrap();
            assert_eq!(page, vec![row(2, "b"), row(3, "c")]);
            assert!(!more, "(9, late) is not due");
            assert_eq!(due_page(&ix, 3, None, 0).unwrap(), (vec![], true));
            assert_eq!(due_page(&ix, 0, None, 5).unwrap(), (vec![], false));
            // The oldest two, returned sorted by key.
            assert_eq!(
                take_due(&mut ix, 3, 2).unwrap(),
                (vec!["a".to_string(), "z".into()], true)
            );
            assert_eq!(
                take_due(&mut ix, 3, 2).unwrap(),
                (vec!["b".to_string(), "c".into()], false)
            );
            assert_eq!(take_due(&mut ix, 3, 2).unwrap(), (vec![], false));
            assert_eq!(ix.len().unwrap(), 1);
            let mut budget = Budget::new(Some(0));
            assert_eq!(budget.left(), 1, "a bound of 0 still makes progress");
            assert_eq!(budget.take(&mut ix, u64::MAX).unwrap(), vec!["late"]);
            assert_eq!((budget.left(), budget.rows(), budget.more()), (0, 1, false));
        }
        txn.commit().unwrap();
    }

    #[test]
    fn upto_includes_the_bound_and_nothing_after() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("x.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut ix = txn.open_table(ALIASES_BY_EXPIRY).unwrap();
            for (at, k) in [(0, "a"), (5, ""), (5, "zz"), (6, ""), (u64::MAX, "m")] {
                ix.insert((at, k), ()).unwrap();
            }
            let keys = |b| -> Vec<(u64, String)> { due(&ix, b).unwrap() };
            assert_eq!(keys(4), vec![(0, "a".to_string())]);
            assert_eq!(keys(5).len(), 3);
            assert_eq!(keys(u64::MAX - 1).len(), 4);
            assert_eq!(keys(u64::MAX).len(), 5);
            assert_eq!(count_due(&ix, 5).unwrap(), 3);
            assert_eq!(
                take_due(&mut ix, 5, u64::MAX).unwrap(),
                (vec!["".to_string(), "a".into(), "zz".into()], false)
            );
            assert_eq!(ix.len().unwrap(), 2);
        }
        txn.commit().unwrap();
    }
}
