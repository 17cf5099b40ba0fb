//! Types carried by the Raft log and returned by the state machine.

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// openraft type configuration of tempalias.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        // Snapshots are files, streamed in and out (see `raft::snapshot`).
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The node id type.
pub type NodeId = u64;

/// One entry of application data in the Raft log.
///
/// `now_ms` is stamped by the leader when it accepts the write. The state machine
/// decides expiry and lease questions from it (never from the applying node's
/// clock), so every replica computes exactly the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub now_ms: u64,
    pub cmd: Command,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}@{}", self.cmd, self.now_ms)
    }
}

/// What a client asks of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Create an alias. The id and token digest are chosen by the node that took
    /// the request, so replaying the entry is deterministic; the alias expires
    /// `valid_for_ms` after the entry's replicated time.
    CreateAlias {
        id: String,
        domain: String,
        target: String,
        token_hash: String,
        valid_for_ms: u64,
        max_usage: u32,
    },
    /// Hold one use of an alias for a message being forwarded; the hold lapses
    /// at `now + lease_ms`. The reservation id is chosen (at random) by the
    /// node that took the RCPT, so a retried Reserve finds its first
    /// application instead of holding a second use, and a failed one can be
    /// released by id even when its outcome is unknown.
    Reserve {
        id: String,
        lease_ms: u64,
        reservation: u64,
    },
    /// The upstream accepted the message: the held use is spent.
    Commit { id: String, reservation: u64 },
    /// The upstream refused or the transaction was abandoned: give the use back.
    /// The id is remembered for `lease_ms`, so that a Reserve with it that is
    /// applied later (a forward the taking node gave up on) holds nothing.
    Release {
        id: String,
        reservation: u64,
        #[serde(default)]
        lease_ms: u64,
    },
    /// Disable an alias for good.
    Revoke { id: String },
    /// Delete aliases that expired more than `keep_ms` before the entry's time,
    /// so the store does not grow forever. Also forgets idempotency keys,
    /// tombstones, per-target rows, confirmation links and target records
    /// past their retention. Deletes everything due in one entry, however
    /// much that is: proposed only when some member cannot apply
    /// [`Command::PurgeBounded`].
    Purge { keep_ms: u64 },
    /// [`Command::Purge`] deleting at most `max_rows` rows, taken in the
    /// expiry indexes' order (oldest first), so that one entry stays short
    /// however large the backlog; [`Response::Purged`] says whether more are
    /// due and the leader then proposes the next one at once. The bound is
    /// in the entry, so every replica deletes the same rows. A node that
    /// predates this variant cannot decode such an entry (it would stop
    /// rather than purge differently), so a leader proposes it only when
    /// every member has said it can apply it (`src/raft/purge.rs`).
    PurgeBounded { keep_ms: u64, max_rows: u64 },
    /// Turn cluster-wide maintenance on or off: every node drains (SMTP `421`,
    /// HTTP `503`) while it is on. Kept in its own table, not an alias record.
    SetMaintenance { on: bool },
    /// Create an alias and claim an `Idempotency-Key` for it in one entry, so
    /// a replay to any node finds the alias the first request created. `create`
    /// is a [`Command::CreateAlias`]; `key_hash` is the SHA-256 of the client's
    /// key and `fingerprint` the SHA-256 of the normalised request body.
    CreateAliasKeyed {
        key_hash: String,
        fingerprint: String,
        create: Box<Command>,
    },
    /// A create ([`Command::CreateAlias`] or [`Command::CreateAliasKeyed`])
    /// under the per-target rules the taking node's `[limits]` ask for (cap
    /// on live aliases, confirmation by the target), carried in the entry so
    /// every replica decides alike. A wrapper, so that the create commands
    /// keep their shape.
    CreateLimited {
        policy: TargetPolicy,
        create: Box<Command>,
    },
    /// The target followed its confirmation link: every alias to it that
    /// waits for confirmation forwards from now on. `token_hash` is the
    /// SHA-256 of the link's token (see [`super::targets`]).
    ConfirmTarget { token_hash: String },
    /// The confirmation mail of this token could not be sent: forget the
    /// request, so that the next create to the target sends a new one
    /// instead of waiting for the request to lapse.
    WithdrawConfirmation { token_hash: String },
    /// Several commands proposed together as one entry (group proposal, see
    /// `src/raft/batch.rs`): applied in order, in one state-machine
    /// transaction, all at the entry's replicated time; each gets its own
    /// answer in [`Response::Batch`], exactly as if it had been an entry of
    /// its own. A node that predates this variant cannot decode such an
    /// entry, so a leader proposes batches only when every member has said
    /// it can apply them.
    Batch { cmds: Vec<Command> },
}

/// Per-target limits of one create, from the taking node's `[limits]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetPolicy {
    /// Most live aliases one target may have; 0 = no cap.
    #[serde(default)]
    pub max_per_target: u32,
    /// When not 0, the target must have confirmed within this many ms before
    /// the entry's time, or the new alias waits for its confirmation.
    #[serde(default)]
    pub confirm_within_ms: u64,
    /// SHA-256 of a fresh confirmation token made by the taking node: stored
    /// when this create asks the target for confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_token_hash: Option<String>,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    Unknown,
    Expired,
    Revoked,
    /// Every use is spent: permanent.
    UsedUp,
    /// The uses left are all held by messages in flight: this may clear (the
    /// holder fails, or its lease lapses), so SMTP answers with a 4xx.
    Held,
    /// The alias waits until its target confirms that it wants mail from this
    /// service (`[limits] confirm_targets`).
    Unconfirmed,
}

/// What the state machine answers for one applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Entries that carry no command (blank, membership).
    None,
    Created(AliasRecord),
    /// The chosen id is taken; the caller picks another and retries.
    IdTaken,
    Reserved {
        reservation: u64,
        target: String,
    },
    Refused {
        reason: Refusal,
    },
    Committed,
    Released,
    Revoked,
    NotFound,
    /// What a purge deleted: `count` aliases, `rows` rows over every table
    /// it deletes from (the aliases included); `more` when a
    /// [`Command::PurgeBounded`] stopped at its bound with rows still due.
    /// Older nodes answer without the last two (read as 0 and false).
    Purged {
        count: u64,
        #[serde(default)]
        rows: u64,
        #[serde(default)]
        more: bool,
    },
    /// The cluster-wide maintenance state after a [`Command::SetMaintenance`].
    Maintenance(ClusterMaintenance),
    /// A keyed create whose key was already claimed by the same request: the
    /// alias that request created.
    Replayed(AliasRecord),
    /// A keyed create whose key was claimed by a different request body.
    KeyReused,
    /// A create that made (or, retried, found) an alias that waits for its
    /// target's confirmation. `send_confirmation` is true when the create's
    /// own token is the target's pending one: the taking node, which alone
    /// knows the token, mails the link.
    CreatedUnconfirmed {
        alias: AliasRecord,
        send_confirmation: bool,
    },
    /// The target already has `max` live aliases: nothing was created.
    TargetFull {
        max: u32,
    },
    /// A confirmation token was accepted (also when applied again).
    TargetConfirmed,
    /// A confirmation request was forgotten (or was not pending any more).
    Withdrawn,
    /// The answers to a [`Command::Batch`], in the order of its commands.
    Batch {
        responses: Vec<Response>,
    },
}

/// Cluster-wide maintenance as replicated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMaintenance {
    pub on: bool,
    /// Replicated time of the last change (ms since the epoch).
    pub since_ms: u64,
}

/// A claimed `Idempotency-Key`: which alias it created and for what request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub alias_id: String,
    /// SHA-256 of the normalised request that claimed the key.
    pub fingerprint: String,
    /// Replicated time of the claim; the key is forgotten
    /// [`IDEMPOTENCY_KEY_TTL_MS`] later.
    pub claimed_ms: u64,
}

/// How long a claimed idempotency key is remembered (replicated time).
pub const IDEMPOTENCY_KEY_TTL_MS: u64 = 24 * 3_600_000;

/// One alias as held in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub id: String,
    pub domain: String,
    pub target: String,
    pub token_hash: String,
    pub created_ms: u64,
    pub valid_until_ms: u64,
    pub max_usage: u32,
    /// Uses spent (committed).
    pub used: u32,
    /// Uses held for messages in flight: reservation id -> lease end (ms).
    pub reservations: std::collections::BTreeMap<u64, u64>,
    /// Reservations already committed, so a retried commit counts once. At most
    /// `max_usage` entries: an alias is never committed more often than that.
    #[serde(default)]
    pub committed: std::collections::BTreeSet<u64>,
    /// Reservations released (reservation id -> until when it is remembered):
    /// a Reserve applied after its own Release must not hold a use that
    /// nobody will ever commit or release. Pruned once the time has passed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub released: std::collections::BTreeMap<u64, u64>,
    pub revoked: bool,
    /// The alias was created for a target that had not confirmed: it refuses
    /// mail until the target follows its confirmation link.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_confirmation: bool,
}

impl AliasRecord {
    /// Uses neither spent nor held by a live reservation at `now_ms`.
    pub fn available(&self, now_ms: u64) -> u32 {
        let held = self
            .reservations
            .values()
            .filter(|&&until| until > now_ms)
            .count() as u32;
        self.max_usage
            .saturating_sub(self.used)
            .saturating_sub(held)
    }

    /// Uses not yet spent (what a user thinks of as "uses left").
    pub fn remaining(&self) -> u32 {
        self.max_usage.saturating_sub(self.used)
    }

    /// The full address.
    pub fn address(&self) -> String {
        format!("{}@{}", self.id, self.domain)
    }

    /// True when a purge at `now_ms` keeping `keep_ms` may delete this record.
    pub fn purgeable(&self, now_ms: u64, keep_ms: u64) -> bool {
        purgeable(self.valid_until_ms, &self.reservations, now_ms, keep_ms)
    }

    /// True once the alias can never forward again.
    pub fn is_dead(&self, now_ms: u64) -> bool {
        is_dead(
            self.revoked,
            self.valid_until_ms,
            self.used,
            self.max_usage,
            now_ms,
        )
    }
}

fn purgeable(
    valid_until_ms: u64,
    reservations: &std::collections::BTreeMap<u64, u64>,
    now_ms: u64,
    keep_ms: u64,
) -> bool {
    now_ms >= valid_until_ms.saturating_add(keep_ms)
        && reservations.values().all(|&until| until <= now_ms)
}

fn is_dead(revoked: bool, valid_until_ms: u64, used: u32, max_usage: u32, now_ms: u64) -> bool {
    revoked || now_ms >= valid_until_ms || used >= max_usage
}

/// The fields of a stored [`AliasRecord`] that say whether it is alive and
/// whether a purge may delete it, decoded without the rest: a purge decodes
/// every alias its expiry index names as due (a whole backlog after a long
/// pause), and decoding whole records allocated every string and the set of
/// committed uses of each.
#[derive(Debug, Deserialize)]
pub struct AliasLiveness {
    valid_until_ms: u64,
    max_usage: u32,
    used: u32,
    reservations: std::collections::BTreeMap<u64, u64>,
    revoked: bool,
}

impl AliasLiveness {
    /// As [`AliasRecord::purgeable`].
    pub fn purgeable(&self, now_ms: u64, keep_ms: u64) -> bool {
        purgeable(self.valid_until_ms, &self.reservations, now_ms, keep_ms)
    }

    /// As [`AliasRecord::is_dead`].
    pub fn is_dead(&self, now_ms: u64) -> bool {
        is_dead(
            self.revoked,
            self.valid_until_ms,
            self.used,
            self.max_usage,
            now_ms,
        )
    }
}
