//! Per-target rules: a cap on live aliases per target address, and
//! confirmation by the target before its aliases forward (`[limits]
//! max_aliases_per_target`, `confirm_targets`).
//!
//! The rules are pure functions of the stored target record, the number of
//! live aliases and the entry's replicated time, so every replica decides the
//! same; [`Tables`] applies them to three tables of the state machine:
//!
//! - `targets`: target key -> [`TargetRecord`] (last confirmation, the
//!   confirmation request waiting for the target);
//! - `confirm_tokens`: SHA-256 of a confirmation token -> [`TokenRow`], so a
//!   confirmation finds its target without the link naming the address;
//! - `target_aliases`: `"<target key>\0<alias id>"` -> the alias's
//!   `valid_until`. One row per alias that counts against the cap. A plain
//!   counter cannot notice expiry (no entry is applied when an alias
//!   expires), so the count is a range read over this target's rows only,
//!   skipping rows whose time has passed; the purge deletes those. Counting
//!   never reads the alias table.
//!
//! Confirmation is per target, not per alias: one mail asks the target once,
//! and one click lets every waiting alias to it forward.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::expiry::{self, Budget, Indexes};
use super::idempotency;
use super::state::{self, Change};
use super::store::{get_json, DbError, ALIASES};
use super::types::{AliasRecord, Command, IdempotencyRecord, Response, TargetPolicy};

/// Target key -> JSON [`TargetRecord`].
pub(super) const TARGETS: TableDefinition<&str, &[u8]> = TableDefinition::new("targets");
/// Token digest -> JSON [`TokenRow`].
pub(super) const CONFIRM_TOKENS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("confirm_tokens");
/// `"<target key>\0<alias id>"` -> `valid_until_ms` of an alias that counts.
pub(super) const TARGET_ALIASES: TableDefinition<&str, u64> =
    TableDefinition::new("target_aliases");
/// Marker in `sm_meta`: `target_aliases` was built from the alias table
/// (databases from before this table get it built once when opened).
const INDEX_BUILT: &str = "target_index_built";

/// How long a confirmation link works, and how long a target that did not
/// follow it is left alone: no second mail goes to it before this has passed,
/// however many aliases are created for it meanwhile.
pub const CONFIRM_REQUEST_TTL_MS: u64 = 2 * 86_400_000;

/// How long a confirmation is remembered (replicated time). The longest
/// `confirm_valid_days` allowed is shorter, so a purge never forgets a
/// confirmation that some node's configuration still honours.
pub const CONFIRMATION_KEEP_MS: u64 = 400 * 86_400_000;

/// The longest `[limits] confirm_valid_days` accepted (see above).
pub const MAX_CONFIRM_VALID_DAYS: u32 = 366;

/// What the replicated state knows about one target address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Replicated time of the target's last confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_ms: Option<u64>,
    /// The confirmation request sent to the target and not yet followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// The token of the last confirmation, so a confirmation applied again
    /// (a retried write) answers as the first one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_token: Option<String>,
}

/// A confirmation request waiting for the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// SHA-256 of the token mailed to the target.
    pub token_hash: String,
    /// Replicated time of the request.
    pub requested_ms: u64,
}

impl Pending {
    fn live(&self, now_ms: u64) -> bool {
        now_ms < self.requested_ms.saturating_add(CONFIRM_REQUEST_TTL_MS)
    }
}

/// Where a confirmation token leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub target: String,
    pub requested_ms: u64,
}

impl TokenRow {
    /// The replicated time from which the link no longer works and the
    /// purge forgets the row (its index time, `expiry.rs`).
    pub fn lapses_at(&self) -> u64 {
        self.requested_ms.saturating_add(CONFIRM_REQUEST_TTL_MS)
    }
}

/// The key of a target in these tables: the address in lower case. Mail
/// systems treat local parts without regard to case, so `Me@x` and `me@x`
/// are one mailbox: one count, one confirmation. Sub-address tags stay part
/// of the key (which delimiter a target's system uses is unknown here).
pub fn target_key(target: &str) -> String {
    target.to_ascii_lowercase()
}

/// True while an alias counts against its target's cap: it is not revoked,
/// not used up and (checked at count time) not expired.
pub fn counted(rec: &AliasRecord) -> bool {
    !rec.revoked && rec.used < rec.max_usage
}

/// True when the target confirmed within `within_ms` before `now_ms`.
pub fn confirmed_within(t: Option<&TargetRecord>, within_ms: u64, now_ms: u64) -> bool {
    t.and_then(|t| t.confirmed_ms)
        .is_some_and(|c| now_ms < c.saturating_add(within_ms))
}

/// What the rules say about a new alias.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Not created; the answer says why.
    Refused(Response),
    Admitted {
        /// The alias waits for its target's confirmation.
        awaiting: bool,
        /// The target record to store, when the create changed it (it asks
        /// the target for confirmation with this create's token).
        target: Option<TargetRecord>,
    },
}

/// Decides a new alias for a target that has `live` live aliases.
pub fn admit(
    target: Option<&TargetRecord>,
    live: u32,
    policy: &TargetPolicy,
    now_ms: u64,
) -> Admission {
    if policy.max_per_target > 0 && live >= policy.max_per_target {
        return Admission::Refused(Response::TargetFull {
            max: policy.max_per_target,
        });
    }
    let awaiting =
        policy.confirm_within_ms > 0 && !confirmed_within(target, policy.confirm_within_ms, now_ms);
    let asked = target
        .and_then(|t| t.pending.as_ref())
        .is_some_and(|p| p.live(now_ms));
    let target = match &policy.confirm_token_hash {
        // One request per target at a time: a client creating many aliases
        // cannot make the service mail the target more than once.
        Some(token_hash) if awaiting && !asked => {
            let mut t = target.cloned().unwrap_or_default();
            t.pending = Some(Pending {
                token_hash: token_hash.clone(),
                requested_ms: now_ms,
            });
            Some(t)
        }
        _ => None,
    };
    Admission::Admitted { awaiting, target }
}

/// True when the create with `policy` is the one whose token the target was
/// asked with (so its taking node mails the link). Also true when that
/// create is applied again, so a retried write whose first answer was lost
/// still gets the mail sent; a different create never sends.
pub fn sends_confirmation(
    target: Option<&TargetRecord>,
    policy: &TargetPolicy,
    now_ms: u64,
) -> bool {
    let Some(token_hash) = &policy.confirm_token_hash else {
        return false;
    };
    target
        .and_then(|t| t.pending.as_ref())
        .is_some_and(|p| p.live(now_ms) && p.token_hash == *token_hash)
}

/// What a confirmation does.
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// Store this record, and let the target's waiting aliases forward.
    Confirmed(TargetRecord),
    /// Already confirmed with this token: nothing changes.
    Again,
    /// Unknown, lapsed or replaced token.
    Invalid,
}

/// Applies a confirmation with `token_hash` to the target it names.
pub fn confirm(target: Option<&TargetRecord>, token_hash: &str, now_ms: u64) -> Confirmation {
    let Some(t) = target else {
        return Confirmation::Invalid;
    };
    match &t.pending {
        Some(p) if p.token_hash == token_hash && p.live(now_ms) => {
            Confirmation::Confirmed(TargetRecord {
                confirmed_ms: Some(now_ms),
                pending: None,
                confirmed_token: Some(token_hash.to_string()),
            })
        }
        _ if t.confirmed_token.as_deref() == Some(token_hash) => Confirmation::Again,
        _ => Confirmation::Invalid,
    }
}

/// Forgets the request with `token_hash` (its mail could not be sent);
/// `None` when it is not the pending one.
pub fn withdraw(target: Option<&TargetRecord>, token_hash: &str) -> Option<TargetRecord> {
    let t = target?;
    if t.pending.as_ref()?.token_hash != token_hash {
        return None;
    }
    Some(TargetRecord {
        pending: None,
        ..t.clone()
    })
}

/// True when a purge at `now_ms` may delete the record: no live request and
/// no confirmation within [`CONFIRMATION_KEEP_MS`].
pub fn purgeable(t: &TargetRecord, now_ms: u64) -> bool {
    !t.pending.as_ref().is_some_and(|p| p.live(now_ms))
        && !confirmed_within(Some(t), CONFIRMATION_KEEP_MS, now_ms)
}

/// The replicated time from which [`purgeable`] holds for `t` (it holds at
/// every later time too): the later of the end of its request and the end of
/// the keeping of its confirmation. The time its row is indexed by
/// (`expiry.rs`).
pub fn purgeable_from(t: &TargetRecord) -> u64 {
    let asked = t
        .pending
        .as_ref()
        .map_or(0, |p| p.requested_ms.saturating_add(CONFIRM_REQUEST_TTL_MS));
    let confirmed = t
        .confirmed_ms
        .map_or(0, |c| c.saturating_add(CONFIRMATION_KEEP_MS));
    asked.max(confirmed)
}

type JsonTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

fn index_key(target: &str, id: &str) -> String {
    format!("{}\0{id}", target_key(target))
}

/// Creates the tables (and, for a database from before them, builds the
/// index from the alias table once). Returns whether it built the index
/// (then its expiry index must be built again too).
///
/// # Errors
/// [`DbError`] when the database cannot be written.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<bool, DbError> {
    txn.open_table(TARGETS)?;
    txn.open_table(CONFIRM_TOKENS)?;
    let mut index = txn.open_table(TARGET_ALIASES)?;
    let mut meta = txn.open_table(super::store::SM_META)?;
    if meta.get(INDEX_BUILT)?.is_none() {
        rebuild_index(&txn.open_table(ALIASES)?, &mut index)?;
        meta.insert(INDEX_BUILT, b"true".as_slice())?;
        return Ok(true);
    }
    Ok(false)
}

fn rebuild_index(
    aliases: &impl ReadableTable<&'static str, &'static [u8]>,
    index: &mut redb::Table<'_, &'static str, u64>,
) -> Result<(), DbError> {
    index.retain(|_, _| false)?;
    for item in aliases.iter()? {
        let (_, v) = item?;
        let rec: AliasRecord = serde_json::from_slice(v.value())?;
        if counted(&rec) {
            index.insert(index_key(&rec.target, &rec.id).as_str(), rec.valid_until_ms)?;
        }
    }
    Ok(())
}

/// After a snapshot was installed in `txn`: `build` when the snapshot
/// carried no per-target rows although some alias in it counts (one
/// converted from the JSON format of releases before these tables); the
/// index is then built from the aliases, and `true` is returned (its expiry
/// index must be built again). A snapshot without rows because none of its
/// aliases counts needs no build: the empty index is right, and a pass over
/// every alias (seconds at a million) would find nothing.
///
/// # Errors
/// [`DbError`] when the database cannot be read or written.
pub(super) fn index_installed(txn: &WriteTransaction, build: bool) -> Result<bool, DbError> {
    let mut index = txn.open_table(TARGET_ALIASES)?;
    let built = build && redb::ReadableTableMetadata::is_empty(&index)?;
    if built {
        rebuild_index(&txn.open_table(ALIASES)?, &mut index)?;
    }
    let mut meta = txn.open_table(super::store::SM_META)?;
    meta.insert(INDEX_BUILT, b"true".as_slice())?;
    Ok(built)
}

/// Just the fields of a stored alias that [`counted`] reads.
#[derive(serde::Deserialize)]
struct CountedFields {
    max_usage: u32,
    used: u32,
    #[serde(default)]
    revoked: bool,
}

/// [`counted`] of a stored alias record, decoding only what it reads; a
/// record that does not decode is taken as counted (so the index is built
/// from the aliases, which then reports the error).
pub(super) fn stored_counted(v: &[u8]) -> bool {
    serde_json::from_slice::<CountedFields>(v).map_or(true, |r| !r.revoked && r.used < r.max_usage)
}

/// The three tables, open in one apply transaction.
pub(super) struct Tables<'t> {
    targets: JsonTable<'t>,
    tokens: JsonTable<'t>,
    index: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    /// Opens the tables in `txn`.
    ///
    /// # Errors
    /// [`DbError`] when a table cannot be opened.
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self, DbError> {
        Ok(Self {
            targets: txn.open_table(TARGETS)?,
            tokens: txn.open_table(CONFIRM_TOKENS)?,
            index: txn.open_table(TARGET_ALIASES)?,
        })
    }

    /// Keeps the tables derived from the alias table in step with an alias
    /// row written by the store (create, reserve, commit, release, revoke):
    /// this index, its expiry index and the alias expiry index. The one
    /// other alias write, the confirmation's (below), changes none of the
    /// fields they are made of; the purge keeps them itself.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be written.
    pub(super) fn sync(
        &mut self,
        expiry: &mut Indexes<'_>,
        before: Option<&AliasRecord>,
        after: Option<&AliasRecord>,
    ) -> Result<(), DbError> {
        let was = before.is_some_and(counted);
        let is = after.is_some_and(counted);
        match (was, is, before, after) {
            (true, false, Some(b), _) => {
                let key = index_key(&b.target, &b.id);
                // Gone already when a purge deleted it as expired.
                let old = self.index.remove(key.as_str())?.map(|v| v.value());
                expiry::reindex(&mut expiry.target_aliases, &key, old, None)?;
            }
            (false, true, _, Some(a)) => {
                let key = index_key(&a.target, &a.id);
                let old = self
                    .index
                    .insert(key.as_str(), a.valid_until_ms)?
                    .map(|v| v.value());
                expiry::reindex(
                    &mut expiry.target_aliases,
                    &key,
                    old,
                    Some(a.valid_until_ms),
                )?;
            }
            _ => {}
        }
        if let Some(id) = after.or(before).map(|r| r.id.as_str()) {
            expiry::reindex(
                &mut expiry.aliases,
                id,
                before.map(|r| r.valid_until_ms),
                after.map(|r| r.valid_until_ms),
            )?;
        }
        Ok(())
    }

    /// Live aliases of a target at `now_ms` (its index rows whose alias has
    /// not expired), counted up to `max` only: the rules need no more, so a
    /// create reads at most `max` live rows (plus rows expired since the last
    /// purge). `max == 0` (no cap) reads nothing.
    fn live(&self, target: &str, now_ms: u64, max: u32) -> Result<u32, DbError> {
        if max == 0 {
            return Ok(0);
        }
        let key = target_key(target);
        let (from, to) = (format!("{key}\0"), format!("{key}\u{1}"));
        let mut n = 0u32;
        for item in self.index.range::<&str>(from.as_str()..to.as_str())? {
            let (_, until) = item?;
            if until.value() > now_ms {
                n += 1;
                if n >= max {
                    break;
                }
            }
        }
        Ok(n)
    }

    fn target(&self, target: &str) -> Result<Option<TargetRecord>, DbError> {
        get_json(&self.targets, &target_key(target))
    }

    /// Applies the commands this module owns; `None` for everything else
    /// (a purge too: the store calls [`Tables::purge`] for its part).
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read or written.
    pub(super) fn apply(
        &mut self,
        aliases: &mut JsonTable<'_>,
        keys: &mut JsonTable<'_>,
        expiry: &mut Indexes<'_>,
        cmd: &Command,
        now_ms: u64,
    ) -> Result<Option<Response>, DbError> {
        match cmd {
            Command::CreateLimited { policy, create } => self
                .create(aliases, keys, expiry, policy, create, now_ms)
                .map(Some),
            Command::ConfirmTarget { token_hash } => {
                self.confirm(aliases, expiry, token_hash, now_ms).map(Some)
            }
            Command::WithdrawConfirmation { token_hash } => {
                let row: Option<TokenRow> = get_json(&self.tokens, token_hash)?;
                if let Some(row) = row {
                    let current = self.target(&row.target)?;
                    if let Some(next) = withdraw(current.as_ref(), token_hash) {
                        self.put_target(expiry, &row.target, &next)?;
                        expiry::remove_json(
                            &mut self.tokens,
                            &mut expiry.tokens,
                            token_hash,
                            expiry::token_time,
                        )?;
                    }
                }
                Ok(Some(Response::Withdrawn))
            }
            _ => Ok(None),
        }
    }

    /// This module's part of a purge: index rows of expired aliases, lapsed
    /// links and targets with nothing left to remember, read from their
    /// expiry indexes: the same rows as the scan of earlier releases, as
    /// many as `budget` allows, oldest first, in this order.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be read or written.
    pub(super) fn purge(
        &mut self,
        expiry: &mut Indexes<'_>,
        now_ms: u64,
        budget: &mut Budget,
    ) -> Result<(), DbError> {
        for key in budget.take(&mut expiry.target_aliases, now_ms)? {
            self.index.remove(key.as_str())?;
        }
        for key in budget.take(&mut expiry.tokens, now_ms)? {
            self.tokens.remove(key.as_str())?;
        }
        for key in budget.take(&mut expiry.targets, now_ms)? {
            self.targets.remove(key.as_str())?;
        }
        Ok(())
    }

    /// The purge as releases before the expiry indexes applied it: a scan
    /// of each table. Kept to check that the indexes delete the same rows.
    /// Returns how many rows went.
    #[cfg(test)]
    pub(super) fn purge_by_scan(&mut self, now_ms: u64) -> Result<u64, DbError> {
        use redb::ReadableTableMetadata;
        let before = self.index.len()? + self.tokens.len()? + self.targets.len()?;
        self.index.retain(|_, until| until > now_ms)?;
        self.tokens.retain(|_, v| {
            serde_json::from_slice::<TokenRow>(v)
                .is_ok_and(|r| now_ms < r.requested_ms.saturating_add(CONFIRM_REQUEST_TTL_MS))
        })?;
        self.targets.retain(|_, v| {
            serde_json::from_slice::<TargetRecord>(v).is_ok_and(|t| !purgeable(&t, now_ms))
        })?;
        Ok(before - (self.index.len()? + self.tokens.len()? + self.targets.len()?))
    }

    fn put_target(
        &mut self,
        expiry: &mut Indexes<'_>,
        target: &str,
        t: &TargetRecord,
    ) -> Result<(), DbError> {
        expiry::put_json(
            &mut self.targets,
            &mut expiry.targets,
            &target_key(target),
            serde_json::to_vec(t)?.as_slice(),
            purgeable_from(t),
            expiry::target_time,
        )
    }

    /// A create under `policy`: plain or keyed as `create` is, with the cap
    /// and the confirmation decided for a new alias.
    fn create(
        &mut self,
        aliases: &mut JsonTable<'_>,
        keys: &mut JsonTable<'_>,
        expiry: &mut Indexes<'_>,
        policy: &TargetPolicy,
        create: &Command,
        now_ms: u64,
    ) -> Result<Response, DbError> {
        // The inner command's own outcome, before any per-target rule.
        let (change, response, claim) = match create {
            Command::CreateAlias { id, .. } => {
                let current: Option<AliasRecord> = get_json(aliases, id)?;
                let (change, response) = state::apply(current.as_ref(), create, now_ms);
                (change, response, None)
            }
            Command::CreateAliasKeyed {
                key_hash,
                fingerprint,
                create: inner,
            } => {
                let claim: Option<IdempotencyRecord> = get_json(keys, key_hash)?;
                let claimed_alias: Option<AliasRecord> = match &claim {
                    Some(c) => get_json(aliases, &c.alias_id)?,
                    None => None,
                };
                let current: Option<AliasRecord> = match state::command_id(inner) {
                    Some(id) => get_json(aliases, id)?,
                    None => None,
                };
                let o = idempotency::apply(
                    claim.as_ref(),
                    claimed_alias.as_ref(),
                    current.as_ref(),
                    fingerprint,
                    inner,
                    now_ms,
                );
                (o.change, o.response, o.claim.map(|c| (key_hash.clone(), c)))
            }
            // Nothing else is ever wrapped.
            _ => return Ok(Response::None),
        };
        let Change::Put(mut rec) = change else {
            // Not created: a retry of this very create answers as its first
            // application did; a replay or a taken id as they are.
            return Ok(match response {
                Response::Created(rec) if rec.awaiting_confirmation => {
                    let target = self.target(&rec.target)?;
                    Response::CreatedUnconfirmed {
                        send_confirmation: sends_confirmation(target.as_ref(), policy, now_ms),
                        alias: rec,
                    }
                }
                other => other,
            });
        };
        let target = self.target(&rec.target)?;
        let live = self.live(&rec.target, now_ms, policy.max_per_target)?;
        let (awaiting, changed) = match admit(target.as_ref(), live, policy, now_ms) {
            Admission::Refused(r) => return Ok(r),
            Admission::Admitted { awaiting, target } => (awaiting, target),
        };
        rec.awaiting_confirmation = awaiting;
        aliases.insert(rec.id.as_str(), serde_json::to_vec(&rec)?.as_slice())?;
        if let Some((key_hash, claim)) = claim {
            expiry::put_json(
                keys,
                &mut expiry.keys,
                &key_hash,
                serde_json::to_vec(&claim)?.as_slice(),
                idempotency::expires_at(&claim),
                expiry::key_time,
            )?;
        }
        self.sync(expiry, None, Some(&rec))?;
        let mut stored = target;
        if let Some(next) = changed {
            // The new request replaces the old one, whose link stops working.
            if let Some(old) = stored.as_ref().and_then(|t| t.pending.as_ref()) {
                expiry::remove_json(
                    &mut self.tokens,
                    &mut expiry.tokens,
                    &old.token_hash,
                    expiry::token_time,
                )?;
            }
            if let Some(p) = &next.pending {
                let row = TokenRow {
                    target: target_key(&rec.target),
                    requested_ms: p.requested_ms,
                };
                expiry::put_json(
                    &mut self.tokens,
                    &mut expiry.tokens,
                    &p.token_hash,
                    serde_json::to_vec(&row)?.as_slice(),
                    row.lapses_at(),
                    expiry::token_time,
                )?;
            }
            self.put_target(expiry, &rec.target, &next)?;
            stored = Some(next);
        }
        if !awaiting {
            return Ok(Response::Created(rec));
        }
        Ok(Response::CreatedUnconfirmed {
            send_confirmation: sends_confirmation(stored.as_ref(), policy, now_ms),
            alias: rec,
        })
    }

    /// A confirmation: the target record, then every waiting alias to it.
    fn confirm(
        &mut self,
        aliases: &mut JsonTable<'_>,
        expiry: &mut Indexes<'_>,
        token_hash: &str,
        now_ms: u64,
    ) -> Result<Response, DbError> {
        let row: Option<TokenRow> = get_json(&self.tokens, token_hash)?;
        let Some(row) = row else {
            return Ok(Response::NotFound);
        };
        let current = self.target(&row.target)?;
        match confirm(current.as_ref(), token_hash, now_ms) {
            Confirmation::Invalid => Ok(Response::NotFound),
            Confirmation::Again => Ok(Response::TargetConfirmed),
            Confirmation::Confirmed(next) => {
                self.put_target(expiry, &row.target, &next)?;
                let key = target_key(&row.target);
                let (from, to) = (format!("{key}\0"), format!("{key}\u{1}"));
                let mut ids = Vec::new();
                for item in self.index.range::<&str>(from.as_str()..to.as_str())? {
                    let (k, _) = item?;
                    if let Some((_, id)) = k.value().split_once('\0') {
                        ids.push(id.to_string());
                    }
                }
                for id in ids {
                    let rec: Option<AliasRecord> = get_json(aliases, &id)?;
                    if let Some(mut rec) = rec.filter(|r| r.awaiting_confirmation) {
                        // Neither counted nor valid_until changes: the
                        // derived tables stay as they are.
                        rec.awaiting_confirmation = false;
                        aliases.insert(id.as_str(), serde_json::to_vec(&rec)?.as_slice())?;
                    }
                }
                Ok(Response::TargetConfirmed)
            }
        }
    }
}

/// Where a confirmation link stands, as a replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// The target may confirm with it.
    Pending,
    /// The target already confirmed with it.
    Confirmed,
    /// Unknown, lapsed or replaced.
    Invalid,
}

/// Reads where the link of `token_hash` stands at `now_ms`.
///
/// # Errors
/// [`DbError`] when the database cannot be read.
pub(super) fn link_state(
    read: &redb::ReadTransaction,
    token_hash: &str,
    now_ms: u64,
) -> Result<LinkState, DbError> {
    let row: Option<TokenRow> = get_json(&read.open_table(CONFIRM_TOKENS)?, token_hash)?;
    let Some(row) = row else {
        return Ok(LinkState::Invalid);
    };
    let target: Option<TargetRecord> = get_json(&read.open_table(TARGETS)?, &row.target)?;
    Ok(match confirm(target.as_ref(), token_hash, now_ms) {
        Confirmation::Confirmed(_) => LinkState::Pending,
        Confirmation::Again => LinkState::Confirmed,
        Confirmation::Invalid => LinkState::Invalid,
    })
}

/// A confirmation token's digest, as the replicated state stores it.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("tempalias confirmation\0{token}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn policy(max: u32, within_days: u64, token: Option<&str>) -> TargetPolicy {
        TargetPolicy {
            max_per_target: max,
            confirm_within_ms: within_days * DAY,
            confirm_token_hash: token.map(String::from),
        }
    }

    fn admitted(a: Admission) -> (bool, Option<TargetRecord>) {
        match a {
            Admission::Admitted { awaiting, target } => (awaiting, target),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cap_counts_live_aliases_and_zero_means_none() {
        assert_eq!(
            admit(None, 3, &policy(3, 0, None), 0),
            Admission::Refused(Response::TargetFull { max: 3 })
        );
        assert_eq!(
            admitted(admit(None, 2, &policy(3, 0, None), 0)),
            (false, None)
        );
        assert_eq!(
            admitted(admit(None, 10_000, &policy(0, 0, None), 0)),
            (false, None)
        );
    }

    #[test]
    fn an_unconfirmed_target_is_asked_once() {
        let p = policy(0, 30, Some("t1"));
        let (awaiting, t) = admitted(admit(None, 0, &p, 1000));
        assert!(awaiting);
        let t = t.expect("the first create asks");
        assert_eq!(
            t.pending,
            Some(Pending {
                token_hash: "t1".into(),
                requested_ms: 1000
            })
        );
        assert!(sends_confirmation(Some(&t), &p, 1000));
        // A second create (its own token) waits too but asks nobody.
        let p2 = policy(0, 30, Some("t2"));
        assert_eq!(admitted(admit(Some(&t), 1, &p2, 2000)), (true, None));
        assert!(!sends_confirmation(Some(&t), &p2, 2000));
        // Once the request lapsed, the next create asks again.
        let later = 1000 + CONFIRM_REQUEST_TTL_MS;
        let (_, again) = admitted(admit(Some(&t), 1, &p2, later));
        assert_eq!(again.unwrap().pending.unwrap().token_hash, "t2");
        assert!(
            !sends_confirmation(Some(&t), &p, later),
            "a lapsed request sends nothing"
        );
    }

    #[test]
    fn a_recent_confirmation_lets_new_aliases_forward() {
        let t = TargetRecord {
            confirmed_ms: Some(10 * DAY),
            ..Default::default()
        };
        let p = policy(0, 30, Some("t"));
        assert_eq!(admitted(admit(Some(&t), 0, &p, 39 * DAY)), (false, None));
        // Older than the validity: a new alias waits and asks again.
        let (awaiting, next) = admitted(admit(Some(&t), 0, &p, 40 * DAY));
        assert!(awaiting);
        let next = next.unwrap();
        assert_eq!(next.confirmed_ms, Some(10 * DAY), "the old date is kept");
        // Without confirmation required nothing waits.
        assert_eq!(
            admitted(admit(None, 0, &policy(0, 0, Some("t")), 0)),
            (false, None)
        );
    }

    #[test]
    fn confirmation_takes_the_pending_token_once_and_answers_alike_again() {
        let p = policy(0, 30, Some("tok"));
        let (_, t) = admitted(admit(None, 0, &p, 0));
        let t = t.unwrap();
        assert_eq!(confirm(Some(&t), "wrong", 5), Confirmation::Invalid);
        assert_eq!(confirm(None, "tok", 5), Confirmation::Invalid);
        let Confirmation::Confirmed(c) = confirm(Some(&t), "tok", 5) else {
            panic!("not confirmed");
        };
        assert_eq!(c.confirmed_ms, Some(5));
        assert!(c.pending.is_none());
        assert_eq!(confirm(Some(&c), "tok", 6), Confirmation::Again);
        // A lapsed link confirms nothing.
        assert_eq!(
            confirm(Some(&t), "tok", CONFIRM_REQUEST_TTL_MS),
            Confirmation::Invalid
        );
    }

    #[test]
    fn withdraw_only_forgets_its_own_request() {
        let (_, t) = admitted(admit(None, 0, &policy(0, 30, Some("a")), 0));
        let t = t.unwrap();
        assert_eq!(withdraw(Some(&t), "b"), None);
        let w = withdraw(Some(&t), "a").unwrap();
        assert!(w.pending.is_none());
        // Then a new create asks again at once.
        let (_, again) = admitted(admit(Some(&w), 0, &policy(0, 30, Some("c")), 1));
        assert!(again.is_some());
    }

    #[test]
    fn purge_keeps_live_requests_and_recent_confirmations() {
        let asked = TargetRecord {
            pending: Some(Pending {
                token_hash: "x".into(),
                requested_ms: 0,
            }),
            ..Default::default()
        };
        assert!(!purgeable(&asked, 1));
        assert!(purgeable(&asked, CONFIRM_REQUEST_TTL_MS));
        let confirmed = TargetRecord {
            confirmed_ms: Some(0),
            ..Default::default()
        };
        assert!(!purgeable(&confirmed, CONFIRMATION_KEEP_MS - 1));
        assert!(purgeable(&confirmed, CONFIRMATION_KEEP_MS));
        assert!(u64::from(MAX_CONFIRM_VALID_DAYS) * DAY < CONFIRMATION_KEEP_MS);
    }

    #[test]
    fn purgeable_from_is_the_first_time_purgeable_holds() {
        let pending = |at| {
            Some(Pending {
                token_hash: "x".into(),
                requested_ms: at,
            })
        };
        let times = [0, 1, DAY, 3 * DAY, 500 * DAY, u64::MAX - 1, u64::MAX];
        let mut records = vec![TargetRecord::default()];
        for &a in &times {
            records.push(TargetRecord {
                pending: pending(a),
                ..Default::default()
            });
            for &c in &times {
                records.push(TargetRecord {
                    confirmed_ms: Some(c),
                    pending: pending(a),
                    confirmed_token: None,
                });
                records.push(TargetRecord {
                    confirmed_ms: Some(c),
                    ..Default::default()
                });
            }
        }
        let probes = [
            0,
            1,
            CONFIRM_REQUEST_TTL_MS - 1,
            CONFIRM_REQUEST_TTL_MS,
            CONFIRMATION_KEEP_MS,
            CONFIRMATION_KEEP_MS + 3 * DAY,
            u64::MAX - 1,
            u64::MAX,
        ];
        for t in &records {
            let from = purgeable_from(t);
            let around = [from.saturating_sub(1), from, from.saturating_add(1)];
            for now in probes.iter().chain(&around) {
                assert_eq!(purgeable(t, *now), *now >= from, "{t:?} at {now}");
            }
        }
        let row = TokenRow {
            target: "t".into(),
            requested_ms: 5,
        };
        assert_eq!(row.lapses_at(), 5 + CONFIRM_REQUEST_TTL_MS);
    }

    #[test]
    fn keys_ignore_case_and_tokens_are_domain_separated() {
        assert_eq!(target_key("Me@Example.NET"), "me@example.net");
        assert_ne!(token_hash("a"), crate::alias::token_hash("a"));
    }

    fn stored(max_usage: u32, used: u32, revoked: bool) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": "a00000000001", "domain": "t.example", "target": "Me@example.net",
            "token_hash": "h", "created_ms": 0, "valid_until_ms": 5 * DAY,
            "max_usage": max_usage, "used": used, "reservations": {}, "revoked": revoked
        }))
        .unwrap()
    }

    #[test]
    fn stored_counted_reads_what_counted_reads() {
        for (max, used, revoked) in [(2, 0, false), (2, 2, false), (2, 0, true), (1, 3, false)] {
            let v = stored(max, used, revoked);
            let rec: AliasRecord = serde_json::from_slice(&v).unwrap();
            assert_eq!(stored_counted(&v), counted(&rec), "{max} {used} {revoked}");
        }
        // Not an alias record: counted, so the index is built (and the
        // build reports what is wrong with it).
        assert!(stored_counted(b"{}"));
    }

    /// The index is built from the aliases only when the install asks for
    /// it; otherwise it is left as the snapshot brought it, and marked built.
    #[test]
    fn index_installed_builds_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        for build in [false, true] {
            let txn = db.begin_write().unwrap();
            txn.delete_table(TARGET_ALIASES).unwrap();
            txn.open_table(ALIASES)
                .unwrap()
                .insert("a00000000001", stored(2, 0, false).as_slice())
                .unwrap();
            assert_eq!(index_installed(&txn, build).unwrap(), build);
            let index = txn.open_table(TARGET_ALIASES).unwrap();
            let rows: Vec<(String, u64)> = index
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value().to_string(), v.value())
                })
                .collect();
            if build {
                assert_eq!(
                    rows,
                    [(index_key("Me@example.net", "a00000000001"), 5 * DAY)]
                );
            } else {
                assert!(rows.is_empty(), "{rows:?}");
            }
            let meta = txn.open_table(super::super::store::SM_META).unwrap();
            assert!(meta.get(INDEX_BUILT).unwrap().is_some());
        }
    }
}
