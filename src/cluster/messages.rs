//! Payloads of the cluster RPCs (JSON inside `Payload.json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::raft::types::{Command, NodeId, Response};

/// A write forwarded by a follower to the leader. The leader stamps the time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub cmd: Command,
}

/// The leader's answer to a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ForwardResponse {
    Applied {
        response: Response,
    },
    /// The receiver is not (or no longer) the leader; nothing was proposed.
    NotLeader {
        leader: Option<NodeId>,
    },
    /// Proposed but not known to be committed (timeout, lost quorum).
    Failed {
        message: String,
    },
}

/// The leader's read index: a follower that has applied up to `index` may
/// answer a read linearizably.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadIndexResponse {
    pub index: Option<u64>,
    pub error: Option<String>,
    /// A follower lease for the asker, in milliseconds from when it asked
    /// (`raft/follower_lease.rs`); absent when none was asked for or granted,
    /// and from leaders that do not grant leases (older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

/// One node's view of itself and the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: NodeId,
    /// `Leader`, `Follower`, `Candidate`, `Learner` or `Shutdown`.
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// False until the node has a membership (formed or joined a cluster).
    pub initialized: bool,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Every member's cluster address.
    pub nodes: BTreeMap<NodeId, String>,
    /// On the leader: each peer's last replicated index.
    pub replication: BTreeMap<NodeId, Option<u64>>,
    /// Milliseconds since a quorum last acknowledged this leader.
    pub millis_since_quorum_ack: Option<u64>,
    /// This node's clock (ms since the epoch) when it answered: the leader's
    /// clock becomes replicated time, so peers watch for skew.
    #[serde(default)]
    pub now_ms: u64,
    /// Whether this node hears a live leader now (or is one with a quorum
    /// behind it). Peers count the nodes that do not before they allow
    /// elections (src/raft/liveness.rs); absent from older nodes, which then
    /// count as leaderless, as every node did before.
    #[serde(default)]
    pub leader_alive: bool,
    /// Term of this node's last applied entry: with `last_log_index`, which
    /// peer is most up to date, so that one campaigns first.
    #[serde(default)]
    pub last_log_term: Option<u64>,
    /// This node can apply entries that carry several commands
    /// (`Command::Batch`): a leader batches only when every member says so,
    /// so a node of an older version, which would fail to decode them,
    /// never receives one (absent from such a node: false).
    #[serde(default)]
    pub applies_batches: bool,
    /// This node can apply `Command::PurgeBounded`: a leader proposes
    /// bounded purges only when every member says so, and the unbounded
    /// `Command::Purge` otherwise (absent from an older node: false).
    #[serde(default)]
    pub applies_bounded_purges: bool,
}

#[cfg(test)]
impl StatusReport {
    /// The report of a member `id` of this release, initialized, term 1,
    /// alive; tests change the fields they are about.
    pub(crate) fn for_test(id: NodeId) -> Self {
        Self {
            id,
            state: String::new(),
            term: 1,
            leader: None,
            last_log_index: Some(1),
            last_applied: None,
            snapshot_index: None,
            purged_index: None,
            initialized: true,
            voters: vec![],
            learners: vec![],
            nodes: BTreeMap::new(),
            replication: BTreeMap::new(),
            millis_since_quorum_ack: None,
            now_ms: 0,
            leader_alive: true,
            last_log_term: Some(1),
            applies_batches: true,
            applies_bounded_purges: true,
        }
    }
}

/// A membership change asked of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MembershipChange {
    /// Add a non-voting member that receives the log (or a snapshot).
    AddLearner { id: NodeId, addr: String },
    /// Turn a learner into a voter.
    Promote { id: NodeId },
    /// Remove a voter or learner from the cluster.
    Remove { id: NodeId },
}

/// The answer to a membership change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipResponse {
    pub ok: bool,
    pub message: String,
}
