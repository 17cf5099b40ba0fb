//! Follower read leases: a follower that the leader promised to wait for
//! serves linearizable reads from its own replica, without a `ReadIndex`
//! round trip per barrier.
//!
//! A follower's read barrier normally asks the leader for its read index
//! (`Node::read_barrier_within`), a gRPC round trip that, under load, bounds
//! a follower's status reads by latency rather than CPU. With a lease the
//! leader makes the follower part of every acknowledgement instead: while
//! the lease runs, the leader answers no write before the follower has
//! persisted its entry (`Node::hold_for_lease_holders`). Then every write
//! acknowledged before a read started is in the follower's log when the read
//! looks at it, and a read served once the follower has applied its whole
//! log (and the read index that came with the lease) sees every such write.
//! This is the quorum-lease idea (Moraru, Andersen and Kaminsky, "Paxos
//! Quorum Leases", 2014) reduced to one key range and Raft's log.
//!
//! Why no other leader can acknowledge a write the holder lacks while the
//! lease runs:
//!
//! - the leader grants a lease only while its own read lease runs
//!   (`ReadLease::grant`), and never past its end; that lease already rests
//!   on the voters' promise not to vote for anyone else meanwhile;
//! - the one voter that does not keep that promise, the leader itself, waits
//!   out every lease it granted before it passes a vote request on
//!   (`cluster::service`), and a hand-over waits them out before it asks a
//!   follower to campaign;
//! - a node that handles a vote request drops its own lease first;
//! - the holder counts its lease from before it asked, the leader keeps it a
//!   quarter longer than granted, so the holder's lease ends first (only
//!   clock rates matter, never instants of different machines);
//! - a lease is tied to the leader and term the holder followed when it
//!   asked: any change in either ends it, and it lives only in memory, so a
//!   restart ends it too.
//!
//! The price: a lease holder that stops answering holds the leader's writes
//! until its lease ends (a quarter of a second by default, plus the margin).
//! `cluster.follower_read_leases = false` turns the leases off.

use std::sync::Mutex;
use std::time::Duration;

use openraft::Raft;
use tokio::time::Instant;

use super::read_lease::ReadLease;
use super::types::{NodeId, TypeConfig};

/// One lease held by this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    leader: NodeId,
    term: u64,
    until: Instant,
    /// The read index that came with the grant: a local read waits for it.
    read_index: Option<u64>,
}

/// The follower read lease of one node (held only while it follows).
#[derive(Debug, Default)]
pub struct FollowerLease {
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

/// On the leader: waits until every node holding a follower lease this node
/// granted has persisted the entry at `index`, or that node's lease has
/// ended, so that the entry's writes can be acknowledged. True when it had to
/// wait (counted in `tempalias_raft_lease_holds_total`).
///
/// Usually the holders have the entry already: a follower persists an entry
/// about when the quorum does. A holder that stopped answering holds the
/// answers until its lease ends, which `ReadLease::grant` bounds.
pub async fn hold_for_holders(raft: &Raft<TypeConfig>, leases: &ReadLease, index: u64) -> bool {
    let mut metrics = raft.metrics();
    let mut waited = false;
    loop {
        let holders = leases.holders(Instant::now());
        if holders.is_empty() {
            return waited;
        }
        // The earliest end among the holders that lack the entry.
        let first_end = {
            let m = metrics.borrow_and_update();
            let matched = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).copied().flatten())
                    .map(|l| l.index)
            };
            holders
                .iter()
                .filter(|(id, _)| matched(id).is_none_or(|m| m < index))
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
                    // Raft stopped: nothing will be acknowledged by it any more,
                    // but the leases still run; wait them out.
                    if let Some(end) = leases.granted_until(Instant::now()) {
                        tokio::time::sleep_until(end).await;
                    }
                    return waited;
                }
            }
            () = tokio::time::sleep_until(first_end) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
