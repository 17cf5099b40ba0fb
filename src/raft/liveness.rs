//! Failure detection around openraft: who this node can reach, whether it
//! still hears its leader, and when elections may start.
//!
//! openraft 0.9 alone reacts to a leader only through heartbeats arriving (or
//! not) at a follower. That leaves three gaps this module closes:
//!
//! - **Slow failover.** A follower campaigns only after the leader lease
//!   (`2 x election_timeout_ms`) *plus* a random election timeout, and a
//!   candidate that lacks the last entry is refused and then waits longer
//!   still. Here every node probes every member every heartbeat; once a
//!   quorum says its leader is gone, the most up-to-date reachable voter
//!   campaigns at once (`Raft::trigger().elect()`).
//! - **One-way partitions.** A leader that can send to its followers but not
//!   be reached by them keeps them following while every forwarded write to it
//!   fails. A follower that cannot reach its leader now refuses that leader's
//!   `AppendEntries` (see `cluster::service`), so its lease runs out and the
//!   majority elects a leader it can use.
//! - **Disruptive campaigns.** A node cut off from the others would campaign
//!   with ever higher terms and depose a healthy leader when it comes back.
//!   Elections are enabled on a node only while a quorum of voters (this node
//!   included) reports no live leader: a pre-vote, kept outside Raft.
//!
//! None of this can break Raft's safety: enabling, disabling or triggering an
//! election, and refusing to process an RPC, are all things openraft already
//! tolerates from a slow or lossy network (docs/architecture.md, "Failover").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics, ServerState};
use tokio::time::Instant;

use super::types::NodeId;
use crate::cluster::messages::StatusReport;

/// Consecutive failed probes after which a peer counts as unreachable.
const FAILED_PROBES: u32 = 2;

/// Extra time beyond the leader lease before this node says "no live
/// leader", so openraft's own lease (measured from the same heartbeat a few
/// microseconds later) has surely run out when a candidate asks for a vote.
const LEASE_MARGIN: Duration = Duration::from_millis(60);

/// Timing derived from `[cluster]` settings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often every member is probed (the heartbeat interval).
    pub probe_every: Duration,
    /// Deadline of one probe (the minimum election timeout).
    pub probe_timeout: Duration,
    /// openraft's leader lease (`election_timeout_max`).
    pub lease: Duration,
}

/// What the last successful probe of a peer said.
#[derive(Debug, Clone, Copy)]
struct Report {
    at: Instant,
    leader_alive: bool,
    last_log: (u64, u64),
}

#[derive(Debug, Default)]
struct PeerSeen {
    failures: u32,
    report: Option<Report>,
}

#[derive(Debug, Default)]
struct State {
    /// Last `AppendEntries` from a leader that this node's Raft processed
    /// (not refused for a stale term): who sent it and when.
    contact: Option<(NodeId, Instant)>,
    peers: HashMap<NodeId, PeerSeen>,
    last_trigger: Option<Instant>,
}

/// Shared failure-detector state of one node. Cheap to query: a mutex held
/// for a few map lookups, never across an `.await`.
#[derive(Debug)]
pub struct Liveness {
    id: NodeId,
    timing: Timing,
    state: Mutex<State>,
}

/// What [`Liveness::evaluate`] decided for this node right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// openraft's election timer may run (a quorum has no live leader).
    pub elections_allowed: bool,
    /// This node should campaign at once.
    pub campaign_now: bool,
}

impl Liveness {
    pub fn new(id: NodeId, timing: Timing) -> Self {
        Self {
            id,
            timing,
            state: Mutex::new(State::default()),
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an `AppendEntries` from `leader` that Raft processed.
    pub fn record_contact(&self, leader: NodeId) {
        self.lock().contact = Some((leader, Instant::now()));
    }

    /// Records the outcome of one probe of `peer`.
    pub fn record_probe(&self, peer: NodeId, outcome: Option<&StatusReport>) {
        let now = Instant::now();
        let mut st = self.lock();
        let seen = st.peers.entry(peer).or_default();
        match outcome {
            Some(r) => {
                seen.failures = 0;
                seen.report = Some(Report {
                    at: now,
                    leader_alive: r.leader_alive,
                    last_log: (r.last_log_term.unwrap_or(0), r.last_log_index.unwrap_or(0)),
                });
            }
            None => seen.failures = seen.failures.saturating_add(1),
        }
    }

    /// Forgets peers that left the membership.
    pub fn retain_peers(&self, members: &[NodeId]) {
        self.lock().peers.retain(|id, _| members.contains(id));
    }

    /// Whether `peer` answers: false only on evidence, the last
    /// [`FAILED_PROBES`] probes failing. A peer not probed yet (a learner's
    /// leader before the membership reached it, the first heartbeat after
    /// start) counts as reachable; the evidence follows within two probes.
    pub fn reachable(&self, peer: NodeId) -> bool {
        peer == self.id || Self::reachable_in(&self.lock(), peer)
    }

    fn reachable_in(st: &State, peer: NodeId) -> bool {
        st.peers
            .get(&peer)
            .is_none_or(|p| p.failures < FAILED_PROBES)
    }

    fn alive_window(&self) -> Duration {
        self.timing.lease + LEASE_MARGIN
    }

    /// Whether this node has a leader it hears from: as leader, a quorum
    /// acknowledged it within the lease; as follower, its leader's
    /// `AppendEntries` arrived within the lease.
    pub fn leader_alive(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        match m.state {
            ServerState::Leader => self.leader_has_quorum(m),
            ServerState::Follower | ServerState::Learner => {
                let st = self.lock();
                match (m.current_leader, st.contact) {
                    (Some(l), Some((from, at))) if l == from => at.elapsed() <= self.alive_window(),
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// On a leader: a quorum acknowledged it within the lease. A voter just
    /// elected that has not heard back yet gets the benefit of the doubt (its
    /// first write settles it); a leader removed from the voters gets none.
    pub fn leader_has_quorum(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        let is_voter = membership.voter_ids().any(|v| v == self.id);
        match m.millis_since_quorum_ack {
            _ if voters <= 1 && is_voter => true,
            Some(ms) => Duration::from_millis(ms) <= self.alive_window(),
            None => is_voter,
        }
    }

    /// Whether `from` is this node's leader and cannot be reached from here:
    /// its `AppendEntries` are then refused, so that this node stops following
    /// a leader it cannot forward writes to.
    pub fn refuse_leader(&self, from: NodeId, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        m.state != ServerState::Leader
            && m.current_leader == Some(from)
            && from != self.id
            && !self.reachable(from)
    }

    /// Voters this node can reach now, itself included.
    fn reachable_voters(&self, st: &State, voters: &[NodeId]) -> usize {
        voters
            .iter()
            .filter(|v| **v == self.id || Self::reachable_in(st, **v))
            .count()
    }

    /// Whether a write taken here can still succeed: as leader, a quorum acks
    /// it; otherwise its leader is reachable, or enough voters are reachable
    /// for an election to succeed. When false, callers answer with a
    /// temporary failure at once instead of waiting out their deadline.
    pub fn can_write(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        if m.state == ServerState::Leader {
            return self.leader_has_quorum(m);
        }
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let st = self.lock();
        if let Some(l) = m.current_leader {
            if l == self.id || Self::reachable_in(&st, l) {
                return true;
            }
        }
        self.reachable_voters(&st, &voters) >= quorum(voters.len())
    }

    /// Whether a linearizable read can complete here: writes can, and a
    /// follower that knows its leader also receives its log (a node that can
    /// send to its leader but hears nothing back would wait for entries that
    /// never arrive).
    pub fn can_read(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        if !self.can_write(m) {
            return false;
        }
        match (m.state, m.current_leader) {
            (ServerState::Follower | ServerState::Learner, Some(l)) if l != self.id => {
                self.leader_alive(m)
            }
            _ => true,
        }
    }

    /// Decides whether elections may run here and whether to campaign now.
    pub fn evaluate(&self, m: &RaftMetrics<NodeId, BasicNode>) -> Verdict {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let is_voter = voters.contains(&self.id);
        if voters.len() <= 1 || !is_voter {
            return Verdict {
                elections_allowed: true,
                campaign_now: false,
            };
        }
        let alive_here = self.leader_alive(m);
        let now = Instant::now();
        let mut st = self.lock();
        let fresh = self.alive_window();
        let mine = (m.vote.leader_id().get_term(), m.last_log_index.unwrap_or(0));
        let mine = (last_log_term(m).unwrap_or(mine.0), mine.1);
        // Voters that report no live leader, with their last log ids.
        let mut leaderless: Vec<(NodeId, (u64, u64))> = Vec::new();
        if !alive_here {
            leaderless.push((self.id, mine));
        }
        for v in voters.iter().filter(|v| **v != self.id) {
            if !Self::reachable_in(&st, *v) {
                continue;
            }
            if let Some(r) = st.peers.get(v).and_then(|p| p.report) {
                if now.duration_since(r.at) <= fresh && !r.leader_alive {
                    leaderless.push((*v, r.last_log));
                }
            }
        }
        let elections_allowed = leaderless.len() >= quorum(voters.len());
        let leader_gone = match m.current_leader {
            None => true,
            Some(l) => l != self.id && !Self::reachable_in(&st, l),
        };
        // The most up-to-date leaderless voter campaigns (lowest id on a tie),
        // so the first vote request is not refused for a shorter log.
        let best = leaderless
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(id, _)| *id);
        let recently = st
            .last_trigger
            .is_some_and(|t| now.duration_since(t) < self.timing.lease);
        let campaign_now = elections_allowed
            && m.state == ServerState::Follower
            && leader_gone
            && best == Some(self.id)
            && !recently;
        if campaign_now {
            st.last_trigger = Some(now);
        }
        Verdict {
            elections_allowed,
            campaign_now,
        }
    }
}

/// The term of this node's last log entry, if the metrics tell it.
fn last_log_term(m: &RaftMetrics<NodeId, BasicNode>) -> Option<u64> {
    // openraft 0.9 metrics carry the last log index only; the last applied
    // id is the best cheap proxy for the term (an unapplied tail is short).
    m.last_applied.map(|l| l.leader_id.term)
}

/// Votes needed in a voter set of `n`.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_sizes() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(5), 3);
    }
}
