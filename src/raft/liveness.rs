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

/// Consecutive failed probes after which a peer counts as unreachable. A
/// dead process refuses connections, so three probes take a quarter of a
/// second; a busy but live peer must miss three deadlines in a row.
const FAILED_PROBES: u32 = 3;

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
    /// The peer applies entries of several commands (`Command::Batch`).
    applies_batches: bool,
    /// The peer applies `Command::PurgeBounded`.
    applies_bounded_purges: bool,
}

#[derive(Debug, Default)]
struct PeerSeen {
    failures: u32,
    /// When the current run of failed probes began.
    failing_since: Option<Instant>,
    report: Option<Report>,
}

#[derive(Debug, Default)]
struct State {
    /// Last `AppendEntries` from a leader that this node's Raft processed
    /// (not refused for a stale term): who sent it and when.
    contact: Option<(NodeId, Instant)>,
    peers: HashMap<NodeId, PeerSeen>,
    last_trigger: Option<Instant>,
    /// Since when a quorum has reported no live leader (the gate is open).
    gate_open_since: Option<Instant>,
    /// The term this node leads in and since when (noted at most one
    /// heartbeat late, so never earlier than openraft's own record).
    leading: Option<(u64, Instant)>,
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

    /// Notes whether this node leads, and in which term.
    pub fn note_leadership(&self, m: &RaftMetrics<NodeId, BasicNode>) {
        let mut st = self.lock();
        if m.state != ServerState::Leader {
            st.leading = None;
        } else if st.leading.is_none_or(|(term, _)| term != m.current_term) {
            st.leading = Some((m.current_term, Instant::now()));
        }
    }

    /// For how long this node has led, as far as it noted.
    pub fn leading_for(&self) -> Option<Duration> {
        self.lock().leading.map(|(_, since)| since.elapsed())
    }

    /// Records the outcome of one probe of `peer`.
    pub fn record_probe(&self, peer: NodeId, outcome: Option<&StatusReport>) {
        let now = Instant::now();
        let mut st = self.lock();
        let seen = st.peers.entry(peer).or_default();
        match outcome {
            Some(r) => {
                seen.failures = 0;
                seen.failing_since = None;
                seen.report = Some(Report {
                    at: now,
                    leader_alive: r.leader_alive,
                    last_log: (r.last_log_term.unwrap_or(0), r.last_log_index.unwrap_or(0)),
                    applies_batches: r.applies_batches,
                    applies_bounded_purges: r.applies_bounded_purges,
                });
            }
            None => {
                seen.failures = seen.failures.saturating_add(1);
                seen.failing_since.get_or_insert(now);
            }
        }
    }

    /// True when every member but this node has answered a probe saying it
    /// applies batched entries (a node not probed yet does not count as
    /// able): only then may this node, as leader, propose them.
    pub fn all_apply_batches(&self, members: impl IntoIterator<Item = NodeId>) -> bool {
        self.all_members_say(members, |r| r.applies_batches)
    }

    /// [`Liveness::all_apply_batches`] for the members of the membership in
    /// `m` (what the leader's group proposal and a follower's forwards ask).
    pub fn members_apply_batches(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        self.all_apply_batches(m.membership_config.membership().nodes().map(|(id, _)| *id))
    }

    /// True when every member but this node has answered a probe saying it
    /// applies `Command::PurgeBounded` (a node not probed yet does not count
    /// as able): only then may this node, as leader, propose one.
    pub fn all_apply_bounded_purges(&self, members: impl IntoIterator<Item = NodeId>) -> bool {
        self.all_members_say(members, |r| r.applies_bounded_purges)
    }

    /// [`Liveness::all_apply_bounded_purges`] for the members of the
    /// membership in `m`.
    pub fn members_apply_bounded_purges(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        self.all_apply_bounded_purges(m.membership_config.membership().nodes().map(|(id, _)| *id))
    }

    /// True when every member but this node has answered a probe whose
    /// report `says` (what a peer last said about itself counts, also
    /// while its probes fail).
    fn all_members_say(
        &self,
        members: impl IntoIterator<Item = NodeId>,
        says: impl Fn(&Report) -> bool,
    ) -> bool {
        let st = self.lock();
        members.into_iter().filter(|id| *id != self.id).all(|id| {
            st.peers
                .get(&id)
                .and_then(|p| p.report.as_ref())
                .is_some_and(&says)
        })
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
        // A learner has no vote to give anyone: refusing would only keep it
        // from catching up.
        m.state == ServerState::Follower
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
            // The leader is out of reach from here only: a peer still hears
            // it, so no election is coming to rescue this node's writes. Only
            // a report taken a full lease after this node lost the leader
            // says so: until then a peer of a leader that crashed still
            // reports the contact it had before the crash.
            let fresh = self.alive_window();
            let lost_since = st.peers.get(&l).and_then(|p| p.failing_since);
            let others_hear_it = lost_since.is_some_and(|lost| {
                st.peers.iter().any(|(id, p)| {
                    p.failures < FAILED_PROBES
                        && voters.contains(id)
                        && p.report.is_some_and(|r| {
                            r.leader_alive && r.at.elapsed() <= fresh && r.at >= lost + fresh
                        })
                })
            });
            if others_hear_it {
                return false;
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
        let mine = (
            last_log_term(m).unwrap_or(m.vote.leader_id().get_term()),
            m.last_log_index.unwrap_or(0),
        );
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
        let gate_open = leaderless.len() >= quorum(voters.len());
        if !gate_open {
            st.gate_open_since = None;
        } else if st.gate_open_since.is_none() {
            st.gate_open_since = Some(now);
        }
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
        // The others give it one lease of head start before their own timers
        // may fire, so that two campaigns do not split the vote.
        let head_start_over = st
            .gate_open_since
            .is_some_and(|t| now.duration_since(t) >= self.timing.lease);
        let elections_allowed = gate_open && (best == Some(self.id) || head_start_over);
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

/// The term of this node's last log entry, if the metrics tell it (also what
/// `Status` reports, so every node compares logs the same way).
pub fn last_log_term(m: &RaftMetrics<NodeId, BasicNode>) -> Option<u64> {
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
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{Membership, StoredMembership, Vote};

    use super::*;

    const TIMING: Timing = Timing {
        probe_every: Duration::from_millis(80),
        probe_timeout: Duration::from_millis(250),
        lease: Duration::from_millis(500),
    };

    /// Metrics of node `me` in a three-voter cluster {1, 2, 3}.
    fn metrics(
        me: NodeId,
        state: ServerState,
        leader: Option<NodeId>,
    ) -> RaftMetrics<NodeId, BasicNode> {
        let nodes: BTreeMap<NodeId, BasicNode> = (1..=3)
            .map(|i| (i, BasicNode::new(format!("127.0.0.{i}:7001"))))
            .collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        let mut m = RaftMetrics::new_initial(me);
        m.state = state;
        m.current_leader = leader;
        m.vote = Vote::new_committed(1, leader.unwrap_or(me));
        m.membership_config = Arc::new(StoredMembership::new(None, membership));
        m.last_log_index = Some(10);
        m
    }

    fn report(alive: bool, last_log_index: u64) -> StatusReport {
        StatusReport {
            last_log_index: Some(last_log_index),
            leader_alive: alive,
            ..StatusReport::for_test(0)
        }
    }

    fn fail(l: &Liveness, peer: NodeId) {
        for _ in 0..FAILED_PROBES {
            l.record_probe(peer, None);
        }
    }

    #[test]
    fn batches_only_when_every_other_member_said_it_applies_them() {
        let l = Liveness::new(1, TIMING);
        // Alone: nobody to ask.
        assert!(l.all_apply_batches([1]));
        // A member not probed yet does not count as able.
        assert!(!l.all_apply_batches([1, 2, 3]));
        l.record_probe(2, Some(&report(true, 10)));
        assert!(!l.all_apply_batches([1, 2, 3]));
        // A node of an older version leaves the field out: false.
        let older = StatusReport {
            applies_batches: false,
            ..report(true, 10)
        };
        l.record_probe(3, Some(&older));
        assert!(!l.all_apply_batches([1, 2, 3]));
        l.record_probe(3, Some(&report(true, 10)));
        assert!(l.all_apply_batches([1, 2, 3]));
        // A failed probe keeps what the peer last said about itself.
        l.record_probe(3, None);
        assert!(l.all_apply_batches([1, 2, 3]));
        // What an older node sends decodes with the field false.
        let mut json = serde_json::to_value(report(true, 1)).unwrap();
        json.as_object_mut().unwrap().remove("applies_batches");
        let decoded: StatusReport = serde_json::from_value(json).unwrap();
        assert!(!decoded.applies_batches);
    }

    #[test]
    fn bounded_purges_only_when_every_other_member_said_it_applies_them() {
        let l = Liveness::new(1, TIMING);
        assert!(l.all_apply_bounded_purges([1]));
        assert!(!l.all_apply_bounded_purges([1, 2, 3]));
        l.record_probe(2, Some(&report(true, 10)));
        // A member of the release before bounded purges (it applies
        // batches, and leaves the new field out).
        let older = StatusReport {
            applies_bounded_purges: false,
            ..report(true, 10)
        };
        l.record_probe(3, Some(&older));
        assert!(!l.all_apply_bounded_purges([1, 2, 3]));
        assert!(l.all_apply_batches([1, 2, 3]));
        l.record_probe(3, Some(&report(true, 10)));
        assert!(l.all_apply_bounded_purges([1, 2, 3]));
        // A member added later and not yet heard from.
        assert!(!l.all_apply_bounded_purges([1, 2, 3, 4]));
        let mut json = serde_json::to_value(report(true, 1)).unwrap();
        json.as_object_mut()
            .unwrap()
            .remove("applies_bounded_purges");
        let decoded: StatusReport = serde_json::from_value(json).unwrap();
        assert!(!decoded.applies_bounded_purges);
        assert!(decoded.applies_batches);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_hears_its_leader_keeps_elections_off() {
        let l = Liveness::new(2, TIMING);
        let m = metrics(2, ServerState::Follower, Some(1));
        l.record_contact(1);
        l.record_probe(1, Some(&report(true, 10)));
        l.record_probe(3, Some(&report(true, 10)));
        assert!(l.leader_alive(&m));
        let v = l.evaluate(&m);
        assert!(!v.elections_allowed && !v.campaign_now);
        assert!(l.can_write(&m) && l.can_read(&m));
        assert!(!l.refuse_leader(1, &m));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_leader_is_replaced_by_the_longest_log_at_once() {
        let l2 = Liveness::new(2, TIMING);
        let l3 = Liveness::new(3, TIMING);
        let mut m2 = metrics(2, ServerState::Follower, Some(1));
        let m3 = metrics(3, ServerState::Follower, Some(1));
        m2.last_log_index = Some(11);
        l2.record_contact(1);
        l3.record_contact(1);
        // The leader dies: probes fail; the lease runs out on both followers.
        fail(&l2, 1);
        fail(&l3, 1);
        tokio::time::advance(TIMING.lease + LEASE_MARGIN + Duration::from_millis(1)).await;
        assert!(!l2.leader_alive(&m2) && !l3.leader_alive(&m3));
        l2.record_probe(3, Some(&report(false, 10)));
        l3.record_probe(2, Some(&report(false, 11)));
        let v2 = l2.evaluate(&m2);
        let v3 = l3.evaluate(&m3);
        assert!(v2.campaign_now, "node 2 has the longer log");
        assert!(v2.elections_allowed);
        assert!(!v3.campaign_now, "node 3 leaves it to node 2");
        assert!(!v3.elections_allowed, "and gives it a head start");
        // Not again within the lease.
        assert!(!l2.evaluate(&m2).campaign_now);
        // Should node 2 fail to win, node 3's own timer may run a lease later.
        tokio::time::advance(TIMING.lease).await;
        l3.record_probe(2, Some(&report(false, 11)));
        assert!(l3.evaluate(&m3).elections_allowed);
        // Both can still expect their writes to succeed (an election will).
        assert!(l2.can_write(&m2) && l3.can_write(&m3));
    }

    #[tokio::test(start_paused = true)]
    async fn equal_logs_let_the_lowest_id_campaign() {
        let l2 = Liveness::new(2, TIMING);
        let l3 = Liveness::new(3, TIMING);
        let m2 = metrics(2, ServerState::Follower, None);
        let m3 = metrics(3, ServerState::Follower, None);
        l2.record_probe(3, Some(&report(false, 10)));
        l3.record_probe(2, Some(&report(false, 10)));
        fail(&l2, 1);
        fail(&l3, 1);
        assert!(l2.evaluate(&m2).campaign_now);
        assert!(!l3.evaluate(&m3).campaign_now);
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_follower_neither_campaigns_nor_waits() {
        let l = Liveness::new(3, TIMING);
        let m = metrics(3, ServerState::Follower, Some(1));
        l.record_contact(1);
        fail(&l, 1);
        fail(&l, 2);
        tokio::time::advance(TIMING.lease * 3).await;
        let v = l.evaluate(&m);
        assert!(!v.elections_allowed, "alone it must not raise its term");
        assert!(!v.campaign_now);
        assert!(!l.can_write(&m) && !l.can_read(&m), "minority: fail fast");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_be_reached_is_refused() {
        let l = Liveness::new(2, TIMING);
        let m = metrics(2, ServerState::Follower, Some(1));
        l.record_contact(1);
        assert!(!l.refuse_leader(1, &m), "no evidence yet");
        fail(&l, 1);
        assert!(l.refuse_leader(1, &m));
        // Another node (a new leader, or the old one at a stale term) is
        // always heard, so it can learn the current term.
        assert!(!l.refuse_leader(3, &m));
        l.record_probe(1, Some(&report(true, 10)));
        assert!(!l.refuse_leader(1, &m), "reachable again");
        // The other follower still hears the leader: no election.
        let l3 = Liveness::new(3, TIMING);
        let m3 = metrics(3, ServerState::Follower, Some(1));
        l3.record_contact(1);
        l3.record_probe(2, Some(&report(false, 10)));
        assert!(!l3.evaluate(&m3).elections_allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_alone_in_not_reaching_the_leader_fails_fast() {
        let l = Liveness::new(2, TIMING);
        let m = metrics(2, ServerState::Follower, Some(1));
        fail(&l, 1);
        // Right after the leader went out of reach, node 3 still reporting
        // it alive proves nothing (a crashed leader looks the same for a
        // lease): keep waiting for the election.
        l.record_probe(3, Some(&report(true, 10)));
        assert!(l.can_write(&m));
        // A lease later node 3 still hears it: no election will come, so
        // writes taken here cannot succeed and must not wait out their
        // deadline.
        tokio::time::advance(TIMING.lease + LEASE_MARGIN).await;
        l.record_probe(1, None);
        l.record_probe(3, Some(&report(true, 10)));
        assert!(!l.can_write(&m));
        // Once node 3 hears no leader either, an election is coming: wait.
        l.record_probe(3, Some(&report(false, 10)));
        assert!(l.can_write(&m));
        // A learner never refuses its leader's log.
        let mut learner = metrics(2, ServerState::Learner, Some(1));
        learner.state = ServerState::Learner;
        assert!(!l.refuse_leader(1, &learner));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_without_quorum_refuses_writes() {
        let l = Liveness::new(1, TIMING);
        let mut m = metrics(1, ServerState::Leader, Some(1));
        m.millis_since_quorum_ack = Some(100);
        assert!(l.leader_has_quorum(&m) && l.can_write(&m));
        m.millis_since_quorum_ack = Some(5_000);
        assert!(!l.leader_has_quorum(&m) && !l.can_write(&m));
        assert!(!l.leader_alive(&m));
        // Just elected, not acknowledged yet: benefit of the doubt...
        m.millis_since_quorum_ack = None;
        assert!(l.leader_has_quorum(&m));
        // ...but not for a leader removed from the voters.
        let removed = Liveness::new(4, TIMING);
        let mut m4 = metrics(4, ServerState::Leader, Some(4));
        m4.millis_since_quorum_ack = None;
        assert!(!removed.leader_has_quorum(&m4));
    }

    #[test]
    fn quorum_sizes() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(5), 3);
    }
}
