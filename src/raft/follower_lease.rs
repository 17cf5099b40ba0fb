//! Follower read leases: a follower that the leader promised to wait for
//! serves linearizable reads from its own replica, without a `ReadIndex`
//! round trip per barrier.
//!
//! A follower's read barrier normally asks the leader for its read index
//! (`Node::read_barrier_within`), a gRPC round trip that, under load, bounds
//! a follower's status reads by latency rather than CPU. With a lease the
//! leader makes the follower part of every entry's visibility instead: while
//! the lease runs, no entry is applied on the leader or reported committed to
//! any follower before the holder has persisted it ([`LeaseGate`]). Then
//! every entry a client could have seen before a read started is in the
//! holder's log when the read looks at it, and a read served once the holder
//! has applied its whole log (and the read index that came with the lease)
//! sees every such entry. This is the quorum-lease idea (Moraru, Andersen
//! and Kaminsky, "Paxos Quorum Leases", 2014) reduced to one key range and
//! Raft's log.
//!
//! Why no other leader can make an entry visible that a holder lacks while
//! its lease runs:
//!
//! - the leader grants a lease only while its own read lease runs
//!   (`ReadLease::grant`), and never past its end; that lease already rests
//!   on the voters' promise not to vote for anyone else meanwhile;
//! - the one voter that does not keep that promise, the leader itself, waits
//!   out every lease it granted before it passes on a vote request it could
//!   grant (`cluster::service`), and a hand-over waits them out before it
//!   asks a follower to campaign;
//! - a node that handles such a vote request drops its own lease;
//! - a restarted leader, which openraft restores in its term without an
//!   election, treats every member as a holder for the longest lease after
//!   it starts (the leases it granted died with the process);
//! - the holder counts its lease from before it asked, the leader keeps it a
//!   quarter longer than granted, so the holder's lease ends first (only
//!   clock rates matter, never instants of different machines);
//! - a lease is tied to the leader and term the holder followed when it
//!   asked: any change in either ends it, and it lives only in memory, so a
//!   restart ends it too.
//!
//! The price: a lease holder that stops answering holds the leader's applies
//! (and so its writes) until its lease ends (a quarter of a second by
//! default, plus the margin). `cluster.follower_read_leases = false` turns
//! the leases off.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openraft::{BasicNode, LogId, Raft, RaftMetrics, Vote};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::read_lease::ReadLease;
use super::store::ApplyGate;
use super::types::{NodeId, TypeConfig};
use crate::metrics::Metrics;

/// One lease held by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// The leader that granted it: a lease means nothing under another.
    leader: NodeId,
    /// The term this node followed `leader` in when it asked: a new term
    /// may mean a new leader that never heard of the lease.
    term: u64,
    /// End on this node's clock, counted from before it asked.
    until: Instant,
    /// The read index that came with the grant: a local read waits for it.
    read_index: Option<u64>,
}

/// The follower read lease of one node (held only while it follows).
#[derive(Debug, Default)]
pub struct FollowerLease {
    /// A std mutex: held for a copy or a store, never across an await.
    held: Mutex<Option<Held>>,
}

impl FollowerLease {
    /// Records a lease of `lease` counted from `asked_at` (when this node
    /// sent the `ReadIndex` that brought it), granted by `leader` while this
    /// node followed it in `term`, with the leader's `read_index`.
    pub fn record(
        &self,
        leader: NodeId,
        term: u64,
        asked_at: Instant,
        lease: Duration,
        read_index: Option<u64>,
    ) {
        let fresh = Held {
            leader,
            term,
            until: asked_at + lease,
            read_index,
        };
        let mut held = self.lock();
        *held = Some(match *held {
            // A renewal from the same leader keeps the later end and the
            // higher index (both only ever make a read wait longer).
            Some(h) if h.leader == leader && h.term == term => Held {
                until: h.until.max(fresh.until),
                read_index: h.read_index.max(read_index),
                ..fresh
            },
            _ => fresh,
        });
    }

    /// The index a local read must wait for when the lease runs at `now`
    /// and this node still follows `leader` in `term` (`Some(None)`: an
    /// empty log, nothing to wait for); `None` when it does not.
    pub fn read_index(
        &self,
        now: Instant,
        leader: Option<NodeId>,
        term: u64,
    ) -> Option<Option<u64>> {
        let held = (*self.lock())?;
        (now < held.until && Some(held.leader) == leader && held.term == term)
            .then_some(held.read_index)
    }

    /// Ends the lease (a vote request, a new leader or term).
    pub fn drop_lease(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On the leader: keeps every entry invisible until each node that may hold
/// a follower lease has it, so that no read anywhere shows an entry that a
/// lease holder could still answer without.
///
/// Holding back only the write's answer would not do: a read on the leader,
/// or on another follower that applied the entry, could show it while a
/// holder still serves the older state to the next read (reads would go
/// backwards). So the gate works where entries become visible:
///
/// - the leader's state machine applies nothing before every holder has
///   persisted it or its lease has ended ([`LeaseGate::before_apply`]); a
///   write is answered only after its entry is applied, so its answer
///   waits too;
/// - the committed index the leader sends to its followers is lowered to
///   what every holder has ([`LeaseGate::clamp_commit`]), so no follower
///   applies an entry a holder lacks.
///
/// What a holder has persisted is the higher of openraft's replication
/// metrics and the answers this node's own `AppendEntries` calls got
/// ([`LeaseGate::acknowledged`]): the metrics are published only after the
/// Raft core has handled the answer, and by then the next `AppendEntries`,
/// carrying the new committed index, has often been built.
///
/// A leader that openraft restores in its term at start (no election: its
/// stored vote is its own and committed) counts every member as a holder
/// for the longest lease after it starts (the blanket): the leases it
/// granted before the restart are forgotten with the process's memory.
pub struct LeaseGate {
    /// The leases this node granted as leader (and its own read lease).
    leases: Arc<ReadLease>,
    /// Set once Raft is up: the store is opened, and may apply, before it.
    raft: OnceLock<Raft<TypeConfig>>,
    /// For `tempalias_raft_lease_holds_total`.
    metrics: Arc<Metrics>,
    /// End of the blanket (`None`: this node was not a leader when it
    /// stopped, so it granted no lease that could still run).
    blanket_until: Option<Instant>,
    /// Per peer: the last log id it acknowledged to this node's
    /// `AppendEntries`, in the vote it was sent in.
    acked: Mutex<HashMap<NodeId, Acked>>,
    /// Woken whenever `acked` moves.
    acked_moved: Notify,
    /// The highest committed index a lowered `AppendEntries` held back; a
    /// heartbeat carries it once the holders have it.
    nudge_for: AtomicU64,
    /// A nudge task is running.
    nudging: AtomicBool,
}

/// What a peer acknowledged last: in which vote, up to which log id.
type Acked = (Vote<NodeId>, LogId<NodeId>);

/// A node that may hold a lease, and until when. [`BLANKET`] stands for
/// members not known yet.
type Holder = (NodeId, Instant);

/// During the blanket, before the metrics list the members: a holder that
/// has nothing, waited out until the blanket ends.
const BLANKET: NodeId = NodeId::MAX;

impl LeaseGate {
    /// The gate of a node whose leader-side leases are `leases`.
    /// `restored_leader`: the stored vote is this node's own and committed,
    /// so openraft restores it as leader at once. It holds nothing back
    /// (but the blanket) until [`LeaseGate::connect`] gives it the Raft
    /// instance.
    pub fn new(leases: Arc<ReadLease>, metrics: Arc<Metrics>, restored_leader: bool) -> Self {
        let blanket_until =
            restored_leader.then(|| Instant::now() + leases.longest_follower_lease());
        Self {
            leases,
            raft: OnceLock::new(),
            metrics,
            blanket_until,
            acked: Mutex::default(),
            acked_moved: Notify::new(),
            nudge_for: AtomicU64::new(0),
            nudging: AtomicBool::new(false),
        }
    }

    /// Gives the gate the Raft instance whose replication it watches.
    pub fn connect(&self, raft: Raft<TypeConfig>) {
        let _ = self.raft.set(raft);
    }

    /// Records that `target` acknowledged everything up to `matched` to an
    /// `AppendEntries` this node sent in `vote` (as leader).
    pub fn acknowledged(&self, target: NodeId, vote: Vote<NodeId>, matched: LogId<NodeId>) {
        {
            let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
            let entry = acked.entry(target).or_insert((vote, matched));
            if entry.0 != vote || entry.1 < matched {
                *entry = (vote, matched);
            }
        }
        self.acked_moved.notify_waiters();
    }

    /// What `id` has persisted of this leader's log (`None`: nothing known).
    pub fn matched(&self, m: &RaftMetrics<NodeId, BasicNode>, id: NodeId) -> Option<LogId<NodeId>> {
        let reported = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).copied().flatten());
        let acked = self
            .acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .filter(|(vote, _)| *vote == m.vote)
            .map(|(_, l)| *l);
        reported.max(acked)
    }

    /// The nodes that may hold a lease at `now` (`m`: this node's metrics,
    /// `None` before it is connected).
    fn holders(&self, m: Option<&RaftMetrics<NodeId, BasicNode>>, now: Instant) -> Vec<Holder> {
        let mut out = self.leases.holders(now);
        if let Some(until) = self.blanket_until.filter(|u| now < *u) {
            let follows_another = m.is_some_and(|m| m.current_leader.is_some_and(|l| l != m.id));
            let members = m.and_then(|m| {
                m.replication.as_ref().map(|r| {
                    r.keys()
                        .filter(|id| **id != m.id)
                        .copied()
                        .collect::<Vec<_>>()
                })
            });
            match members {
                _ if follows_another => {}
                Some(members) => out.extend(members.into_iter().map(|id| (id, until))),
                None => out.push((BLANKET, until)),
            }
        }
        out
    }

    /// Lowers `leader_commit` (of an `AppendEntries` this leader sends) to
    /// what every lease holder has persisted. A follower only ever raises
    /// its committed index, so a lowered one is only late news; a
    /// heartbeat carries the rest as soon as the holders have it.
    pub fn clamp_commit(
        self: &Arc<Self>,
        leader_commit: Option<LogId<NodeId>>,
    ) -> Option<LogId<NodeId>> {
        let commit = leader_commit?;
        let Some(raft) = self.raft.get() else {
            return leader_commit;
        };
        let floor = {
            let m = raft.metrics();
            let m = m.borrow();
            let holders = self.holders(Some(&m), Instant::now());
            if holders.is_empty() {
                return leader_commit;
            }
            holders
                .iter()
                .map(|(id, _)| self.matched(&m, *id))
                .min()
                .flatten()
        };
        if floor >= leader_commit {
            return leader_commit;
        }
        self.nudge(commit.index);
        floor
    }

    /// Sends a heartbeat once every holder has `index` (or its lease has
    /// ended), so that followers whose committed index was lowered learn
    /// the rest without waiting for the next heartbeat interval.
    fn nudge(self: &Arc<Self>, index: u64) {
        self.nudge_for.fetch_max(index, Ordering::SeqCst);
        if self.nudging.swap(true, Ordering::SeqCst) {
            return;
        }
        let gate = self.clone();
        tokio::spawn(async move {
            loop {
                let want = gate.nudge_for.load(Ordering::SeqCst);
                gate.wait_until_held(want).await;
                if let Some(raft) = gate.raft.get() {
                    let _ = raft.trigger().heartbeat().await;
                }
                gate.nudging.store(false, Ordering::SeqCst);
                // A clamp for a higher index that found this task still
                // running left it to this task.
                if gate.nudge_for.load(Ordering::SeqCst) <= want
                    || gate.nudging.swap(true, Ordering::SeqCst)
                {
                    return;
                }
            }
        });
    }

    /// Before this node's state machine applies entries up to `index`:
    /// waits until every node that may hold a lease has persisted them, or
    /// its lease has ended. Usually they have: a follower persists an entry
    /// about when the quorum does. Waits that happen are counted in
    /// `tempalias_raft_lease_holds_total` and timed in
    /// `tempalias_raft_lease_hold_duration_seconds`.
    pub async fn before_apply(&self, index: u64) {
        let started = Instant::now();
        if self.wait_until_held(index).await {
            self.metrics.raft_lease_holds.inc();
            self.metrics
                .raft_lease_hold_duration
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Waits until every node that may hold a lease now has persisted
    /// `index` or its lease has ended; true if it had to wait. The holders
    /// and their ends are taken once: a lease renewed meanwhile does not
    /// prolong the wait, and need not, since a renewal brings its holder a
    /// read index at or above every entry committed before it.
    async fn wait_until_held(&self, index: u64) -> bool {
        let Some(raft) = self.raft.get() else {
            // Not connected yet (the store applies before Raft is up): only
            // the blanket can hold anything then.
            let holders = self.holders(None, Instant::now());
            let last = holders.iter().map(|(_, until)| *until).max();
            if let Some(last) = last {
                tokio::time::sleep_until(last).await;
                return true;
            }
            return false;
        };
        let mut metrics = raft.metrics();
        let holders = self.holders(Some(&metrics.borrow_and_update()), Instant::now());
        if holders.is_empty() {
            return false;
        }
        let mut waited = false;
        loop {
            // Registered before the check, so an acknowledgement between the
            // check and the wait is not missed.
            let acked = self.acked_moved.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let now = Instant::now();
            let first_end = {
                let m = metrics.borrow_and_update();
                holders
                    .iter()
                    .filter(|(id, until)| {
                        *until > now && self.matched(&m, *id).is_none_or(|l| l.index < index)
                    })
                    .map(|(_, until)| *until)
                    .min()
            };
            let Some(first_end) = first_end else {
                return waited;
            };
            waited = true;
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        // Raft stopped: no metrics any more; the leases
                        // still run, so wait them out.
                        let last = holders.iter().map(|(_, until)| *until).max();
                        if let Some(last) = last {
                            tokio::time::sleep_until(last).await;
                        }
                        return waited;
                    }
                }
                () = &mut acked => {}
                () = tokio::time::sleep_until(first_end) => {}
            }
        }
    }
}

impl ApplyGate for LeaseGate {
    fn before_apply(&self, index: u64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(LeaseGate::before_apply(self, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_restored_leader_holds_applies_until_its_blanket_ends_even_before_raft_is_up() {
        let metrics = Arc::new(Metrics::new());
        let leases = Arc::new(ReadLease::new(Duration::from_millis(250)));
        let longest = leases.longest_follower_lease();
        assert_eq!(longest, Duration::from_micros(317_500));
        // Restored as leader: every apply in the blanket waits it out (no
        // member list yet, so no acknowledgement can end it early).
        let gate = LeaseGate::new(leases.clone(), metrics.clone(), true);
        let t0 = Instant::now();
        gate.before_apply(7).await;
        // (tokio's timer rounds up to whole milliseconds)
        let waited = Instant::now() - t0;
        assert!(waited >= longest && waited <= longest + Duration::from_millis(1));
        assert_eq!(metrics.raft_lease_holds.get(), 1);
        // After the blanket nothing waits.
        gate.before_apply(8).await;
        assert_eq!(Instant::now() - t0, waited);
        assert_eq!(metrics.raft_lease_holds.get(), 1);
        // Not restored as leader: no blanket at all.
        let gate = LeaseGate::new(leases, metrics.clone(), false);
        let t1 = Instant::now();
        gate.before_apply(1).await;
        assert_eq!(Instant::now(), t1);
        assert_eq!(metrics.raft_lease_holds.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_runs_from_the_request_and_only_for_the_leader_and_term_it_came_from() {
        let l = FollowerLease::default();
        let asked = Instant::now();
        assert_eq!(l.read_index(asked, Some(1), 3), None);
        l.record(1, 3, asked, Duration::from_millis(100), Some(40));
        assert_eq!(l.read_index(asked, Some(1), 3), Some(Some(40)));
        let late = asked + Duration::from_millis(99);
        assert_eq!(l.read_index(late, Some(1), 3), Some(Some(40)));
        assert_eq!(
            l.read_index(asked + Duration::from_millis(100), Some(1), 3),
            None
        );
        // Another leader, no leader, another term: no lease.
        assert_eq!(l.read_index(asked, Some(2), 3), None);
        assert_eq!(l.read_index(asked, None, 3), None);
        assert_eq!(l.read_index(asked, Some(1), 4), None);
        l.drop_lease();
        assert_eq!(l.read_index(asked, Some(1), 3), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_keeps_the_later_end_and_the_higher_index_and_a_new_leader_replaces_it() {
        let l = FollowerLease::default();
        let t0 = Instant::now();
        l.record(1, 3, t0, Duration::from_millis(100), Some(40));
        // An answer that arrives late (asked earlier, lower index) shortens
        // and lowers nothing.
        l.record(
            1,
            3,
            t0 - Duration::from_millis(50),
            Duration::from_millis(100),
            Some(30),
        );
        assert_eq!(
            l.read_index(t0 + Duration::from_millis(99), Some(1), 3),
            Some(Some(40))
        );
        l.record(
            1,
            3,
            t0 + Duration::from_millis(50),
            Duration::from_millis(100),
            Some(45),
        );
        assert_eq!(
            l.read_index(t0 + Duration::from_millis(149), Some(1), 3),
            Some(Some(45))
        );
        // A lease from the next leader replaces the old one entirely.
        l.record(2, 4, t0, Duration::from_millis(10), Some(50));
        assert_eq!(
            l.read_index(t0 + Duration::from_millis(20), Some(2), 4),
            None
        );
        assert_eq!(l.read_index(t0, Some(2), 4), Some(Some(50)));
        assert_eq!(l.read_index(t0, Some(1), 3), None);
    }
}
