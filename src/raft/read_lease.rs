//! Leader lease reads: a leader that a quorum confirmed a moment ago serves
//! read barriers without another quorum round.
//!
//! A read barrier on the leader (`ensure_linearizable`) costs one heartbeat
//! round to the voters; a follower's `ReadIndex` costs the leader that round
//! too. Under load that round trip, not CPU, bounds status reads on a
//! cluster. openraft's voters promise something that makes most of those
//! rounds unnecessary: a voter whose vote is committed to a leader refuses
//! every `VoteRequest` until `leader_lease` (`election_timeout_max`, here
//! `2 x election_timeout_ms`) has passed since it last accepted that leader's
//! `AppendEntries` (openraft `Engine::handle_vote_req`).
//!
//! So when a quorum round confirms this leader, every voter of that quorum
//! accepted a heartbeat sent after the round started at `t0`; until
//! `t0 + leader_lease` none of them votes, so no other leader can be elected
//! in this membership: a candidate needs a quorum, and every quorum shares a
//! voter with the one that confirmed us. The one voter that does not keep the
//! promise is this leader itself (openraft lets a leader grant a vote to a
//! higher term). Every vote request reaches openraft through this node's
//! `Vote` RPC handler, which ends the lease first ([`ReadLease::suspend`]),
//! and a round that overlapped a vote request grants nothing; membership
//! changes do the same. A voter that restarts forgets when it last heard its
//! leader (openraft 0.9.25 counts its lease from the start instead, an
//! internal detail); `cluster::service` therefore refuses votes for
//! [`ReadLease::vote_quarantine`] after the process starts, and the watchdog
//! and the `TriggerElection` handler start no campaign (a vote for itself)
//! meanwhile.
//!
//! The lease runs for `election_timeout_ms` only, half of what the voters
//! promise: the rest is margin for clocks that tick at slightly different
//! rates and for the time between a follower accepting a heartbeat and
//! acknowledging it. Only rates matter: `Instant`s of different processes are
//! never compared.
//!
//! Within the lease the leader answers a barrier with its committed index,
//! read in the core: every write acknowledged to a client was committed (and
//! applied on this leader) before the acknowledgement, and every entry of an
//! earlier term is at or below the leader's first entry of its own term, which
//! the confirming round waited to apply.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use openraft::{LogId, Vote};
use tokio::time::Instant;

use super::types::NodeId;

/// A follower lease shorter than this is not worth a grant (the holder
/// would ask again at once).
const MIN_FOLLOWER_LEASE: Duration = Duration::from_millis(20);

/// What one quorum round confirmed, and until when it may be relied on.
#[derive(Debug, Clone)]
pub struct Held {
    /// The leader's vote (term and id) the round ran in.
    pub vote: Vote<NodeId>,
    /// The effective membership the quorum was counted in.
    pub membership: Option<LogId<NodeId>>,
    /// End of the lease.
    pub until: Instant,
}

/// The read lease of one node (held only while it leads).
#[derive(Debug)]
pub struct ReadLease {
    /// How long after a confirming round starts the lease holds.
    valid_for: Duration,
    /// How long after start this node refuses to vote.
    quarantine: Duration,
    /// When this process started serving (the vote quarantine starts here).
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    held: Option<Held>,
    /// Moves whenever something that may end the leadership starts or ends
    /// (a vote request handled, a membership change): a round that saw it
    /// move grants no lease.
    generation: u64,
    /// Vote requests and membership changes in progress: no lease meanwhile.
    suspended: usize,
    /// Follower leases granted by this leader: until when (on this node's
    /// clock, with the margin of [`follower_margin`]) each holder may serve
    /// reads on its own. Entries past their end are pruned as they are seen.
    granted: BTreeMap<NodeId, Instant>,
}

/// The leader keeps a holder's lease for a quarter longer than it told the
/// holder, plus 5 ms: the holder counts its lease from before it asked, so on
/// clocks of the same rate its lease always ends first, and the quarter
/// covers clocks whose rates differ by far more than any real clock's.
fn follower_margin(granted: Duration) -> Duration {
    granted / 4 + Duration::from_millis(5)
}

/// Keeps the lease suspended while it lives (see [`ReadLease::suspend`]).
pub struct Suspension<'a>(&'a ReadLease);

impl Drop for Suspension<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.suspended -= 1;
        inner.generation += 1;
    }
}

impl ReadLease {
    /// `election_timeout` is `cluster.election_timeout_ms`; openraft's
    /// `leader_lease` is twice that.
    pub fn new(election_timeout: Duration) -> Self {
        Self {
            valid_for: election_timeout,
            // The voters' promise (2 x election timeout) plus a margin, as
            // the liveness module's own view of the lease.
            quarantine: election_timeout * 2 + election_timeout / 4,
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The lease if it runs at `now`.
    pub fn valid_at(&self, now: Instant) -> Option<Held> {
        self.lock().held.clone().filter(|h| now < h.until)
    }

    /// Call before a quorum round starts; pass the token to
    /// [`ReadLease::confirmed`].
    pub fn round_starts(&self) -> u64 {
        self.lock().generation
    }

    /// Records a quorum round that started at `t0` (when [`round_starts`]
    /// gave `token`) in `vote` and `membership`. Grants nothing when a vote
    /// request or membership change overlapped the round.
    ///
    /// [`round_starts`]: ReadLease::round_starts
    pub fn confirmed(
        &self,
        token: u64,
        vote: Vote<NodeId>,
        membership: Option<LogId<NodeId>>,
        t0: Instant,
    ) {
        let until = t0 + self.valid_for;
        let mut inner = self.lock();
        if inner.generation != token || inner.suspended > 0 {
            return;
        }
        // A later round never shortens the lease of an earlier one.
        if inner
            .held
            .as_ref()
            .is_some_and(|h| h.vote == vote && h.membership == membership && h.until >= until)
        {
            return;
        }
        inner.held = Some(Held {
            vote,
            membership,
            until,
        });
    }

    /// Ends the lease now and grants none until the returned guard is
    /// dropped. Taken around every vote request this node handles (granting
    /// one may end its leadership) and every membership change it makes.
    pub fn suspend(&self) -> Suspension<'_> {
        let mut inner = self.lock();
        inner.held = None;
        inner.suspended += 1;
        inner.generation += 1;
        Suspension(self)
    }

    /// Grants `to` a follower read lease at `now` for at most `cap`, if this
    /// node's own lease runs in `vote` (its current one): the follower's
    /// lease must end before this node's does, because this node's lease is
    /// what says that no other leader (which would not wait for the
    /// follower) can be writing meanwhile. Records the holder first, so that
    /// every entry that becomes visible after this call waits for it
    /// ([`ReadLease::holders`]). `None` (no lease) when this node's lease
    /// does not run or is about to end, or while it is suspended.
    pub fn grant(
        &self,
        to: NodeId,
        vote: &Vote<NodeId>,
        now: Instant,
        cap: Duration,
    ) -> Option<Duration> {
        let mut inner = self.lock();
        if inner.suspended > 0 {
            return None;
        }
        let held = inner.held.as_ref().filter(|h| h.vote == *vote)?;
        let left = held.until.checked_duration_since(now)?;
        let lease = left.min(cap);
        if lease < MIN_FOLLOWER_LEASE {
            return None;
        }
        let until = now + lease + follower_margin(lease);
        let entry = inner.granted.entry(to).or_insert(until);
        *entry = (*entry).max(until);
        Some(lease)
    }

    /// The nodes whose follower leases may still run at `now`, and until
    /// when: an entry becomes visible (is applied here, or reported
    /// committed to followers) only once each has it, or its lease has
    /// ended.
    pub fn holders(&self, now: Instant) -> Vec<(NodeId, Instant)> {
        let mut inner = self.lock();
        inner.granted.retain(|_, until| *until > now);
        inner.granted.iter().map(|(id, u)| (*id, *u)).collect()
    }

    /// When the last follower lease this node granted ends (`None`: none
    /// runs). A vote or a hand-over waits until then: the holders count on
    /// this node being the only leader for as long.
    pub fn granted_until(&self, now: Instant) -> Option<Instant> {
        self.holders(now).into_iter().map(|(_, u)| u).max()
    }

    /// The longest a follower lease granted by this node can run, margin
    /// included: no lease is granted past this node's own, which runs for
    /// at most `election_timeout_ms`.
    pub fn longest_follower_lease(&self) -> Duration {
        self.valid_for + follower_margin(self.valid_for)
    }

    /// Forgets the lease (the vote or membership moved on).
    pub fn drop_lease(&self) {
        self.lock().held = None;
    }

    /// How long after start this node refuses to vote.
    pub fn vote_quarantine(&self) -> Duration {
        self.quarantine
    }

    /// True while a vote from this node could break a lease it promised
    /// before it restarted.
    pub fn refuses_votes(&self) -> bool {
        self.started.elapsed() < self.quarantine
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn vote(term: u64) -> Vote<NodeId> {
        let mut v = Vote::new(term, 1);
        v.commit();
        v
    }

    fn log(index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(1, 1), index))
    }

    #[tokio::test(start_paused = true)]
    async fn lease_runs_one_election_timeout_from_the_round_start() {
        let l = ReadLease::new(Duration::from_millis(250));
        let t0 = Instant::now();
        assert!(l.valid_at(t0).is_none());
        let token = l.round_starts();
        l.confirmed(token, vote(2), log(1), t0);
        assert!(l.valid_at(t0 + Duration::from_millis(249)).is_some());
        assert!(l.valid_at(t0 + Duration::from_millis(250)).is_none());
        // An older round does not shorten a newer one's lease.
        l.confirmed(token, vote(2), log(1), t0 + Duration::from_millis(100));
        l.confirmed(token, vote(2), log(1), t0);
        let h = l.valid_at(t0 + Duration::from_millis(300)).unwrap();
        assert_eq!(h.vote, vote(2));
        // A new term replaces it whatever its end.
        l.confirmed(token, vote(3), log(1), t0);
        assert!(l.valid_at(t0 + Duration::from_millis(300)).is_none());
        l.drop_lease();
        assert!(l.valid_at(t0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vote_request_or_membership_change_ends_the_lease_and_voids_rounds_it_overlapped() {
        let l = ReadLease::new(Duration::from_millis(250));
        let t0 = Instant::now();
        l.confirmed(l.round_starts(), vote(2), log(1), t0);
        assert!(l.valid_at(t0).is_some());
        // A vote request arrives: the lease ends at once.
        let token = l.round_starts();
        let vote_in_progress = l.suspend();
        assert!(l.valid_at(t0).is_none());
        // A round that ran meanwhile grants nothing, even after the vote.
        l.confirmed(token, vote(2), log(1), t0);
        assert!(l.valid_at(t0).is_none());
        drop(vote_in_progress);
        l.confirmed(token, vote(2), log(1), t0);
        assert!(l.valid_at(t0).is_none());
        // A round that started after it ended does.
        l.confirmed(l.round_starts(), vote(2), log(1), t0);
        assert!(l.valid_at(t0).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn follower_leases_end_before_the_leaders_and_the_leader_keeps_them_longer() {
        let l = ReadLease::new(Duration::from_millis(250));
        let t0 = Instant::now();
        // No lease of its own: nothing to grant.
        assert_eq!(l.grant(2, &vote(2), t0, Duration::from_millis(250)), None);
        l.confirmed(l.round_starts(), vote(2), log(1), t0);
        // Capped, and never past the leader's own lease.
        assert_eq!(
            l.grant(2, &vote(2), t0, Duration::from_millis(100)),
            Some(Duration::from_millis(100))
        );
        let late = t0 + Duration::from_millis(200);
        assert_eq!(
            l.grant(3, &vote(2), late, Duration::from_millis(100)),
            Some(Duration::from_millis(50))
        );
        // Not from a lease of another term, and not a sliver.
        assert_eq!(l.grant(3, &vote(3), late, Duration::from_millis(100)), None);
        assert_eq!(
            l.grant(
                3,
                &vote(2),
                t0 + Duration::from_millis(240),
                Duration::from_millis(100)
            ),
            None
        );
        // The leader keeps each a quarter longer plus 5 ms.
        let holders = l.holders(t0);
        assert_eq!(
            holders,
            vec![
                (2, t0 + Duration::from_millis(130)),
                (
                    3,
                    late + Duration::from_millis(67) + Duration::from_micros(500)
                ),
            ]
        );
        assert_eq!(
            l.granted_until(t0),
            Some(late + Duration::from_micros(67_500))
        );
        // A shorter later grant does not shorten an earlier one.
        l.grant(
            2,
            &vote(2),
            t0 + Duration::from_millis(10),
            Duration::from_millis(20),
        );
        assert_eq!(l.holders(t0)[0], (2, t0 + Duration::from_millis(130)));
        // Ended leases are dropped.
        assert_eq!(l.holders(t0 + Duration::from_millis(130)).len(), 1);
        assert_eq!(l.granted_until(t0 + Duration::from_millis(300)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_follower_lease_is_granted_while_a_vote_is_handled() {
        let l = ReadLease::new(Duration::from_millis(250));
        let t0 = Instant::now();
        l.confirmed(l.round_starts(), vote(2), log(1), t0);
        let vote_in_progress = l.suspend();
        assert_eq!(l.grant(2, &vote(2), t0, Duration::from_millis(100)), None);
        drop(vote_in_progress);
        // The suspension ended the leader's lease too: still nothing.
        assert_eq!(l.grant(2, &vote(2), t0, Duration::from_millis(100)), None);
        assert!(l.holders(t0).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_process_refuses_votes_for_longer_than_the_voters_lease() {
        let l = ReadLease::new(Duration::from_millis(250));
        assert!(l.vote_quarantine() > Duration::from_millis(500));
        assert!(l.refuses_votes());
        tokio::time::advance(l.vote_quarantine()).await;
        assert!(!l.refuses_votes());
    }
}
