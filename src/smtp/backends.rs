//! What a session needs from the rest of the node, behind two small traits:
//! the alias store (Raft) and the upstream (the relay). The session is
//! generic over both, so protocol tests run it in-process against fakes
//! while the real node plugs in [`RaftAliases`] and [`crate::relay::Relay`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::settle::Settlements;
/// Why an alias takes no mail (the store's answer, shared with Raft).
pub use crate::raft::Refusal;
use crate::raft::{Command, Node, Response};
use crate::relay::{Delivery, Envelope, Relay};

/// The alias store could not answer now (no quorum, leader unreachable):
/// the client gets a `4xx` and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("alias store unavailable")]
pub struct Unavailable;

/// One use of an alias, reserved at RCPT time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Identifies the reservation for its commit or release.
    pub reservation: u64,
    /// Where the alias forwards to (never shown to the sender).
    pub target: String,
    /// When the reservation's lease ends at the latest (counted from before
    /// the reservation was asked for, so never later than the replicated one).
    pub lease_ends: Instant,
}

/// Alias lookups and the reserve / commit / release protocol of a use.
///
/// Every reservation handed out ends in exactly one `commit` or `release`
/// (the session guarantees it on every path; a node that dies instead leaves
/// the lease to lapse).
pub trait AliasStore: Send + Sync + 'static {
    /// `Some` when the alias can never take mail again (absent, revoked,
    /// used up), confirmed against the leader before it is believed; `None`
    /// when a reservation should be tried.
    fn refused(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Refusal>, Unavailable>> + Send;

    /// Reserves one use of `id`. `Err(Unavailable)` when the outcome is
    /// unknown; the store then makes sure such a reservation is released.
    fn reserve(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Result<Reserved, Refusal>, Unavailable>> + Send;

    /// Spends a reserved use: the message is safe upstream.
    fn commit(&self, id: &str, reserved: &Reserved) -> impl Future<Output = ()> + Send;

    /// [`AliasStore::commit`] without waiting for it
    /// (`smtp.reply_before_commit`): the store settles it in the background
    /// and shutdown waits for it.
    fn commit_later(&self, id: &str, reserved: &Reserved);

    /// Gives a reserved use back: the message was not forwarded.
    fn release(&self, id: &str, reserved: &Reserved) -> impl Future<Output = ()> + Send;

    /// Replicated time in milliseconds since the epoch (for the `Received:` date).
    fn now_ms(&self) -> u64;
}

/// Where accepted mail goes.
pub trait Upstream: Send + Sync + 'static {
    /// Sends `message` to every envelope recipient; [`Delivery::Accepted`]
    /// only when the upstream took responsibility for it. `deadline` is when
    /// the first use held for the message would lapse (`None`: it holds
    /// none); the answer must come before it.
    fn deliver(
        &self,
        envelope: &Envelope,
        message: Arc<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Delivery> + Send;

    /// True when every recipient of one message must be in one domain. MX
    /// delivery sends each domain a transaction of its own, and a refusal
    /// by a later domain cannot undo an earlier domain's acceptance: the
    /// message would be answered as refused (and its uses released) although
    /// some targets got it.
    fn one_domain_per_message(&self) -> bool {
        false
    }
}

impl Upstream for Arc<Relay> {
    async fn deliver(
        &self,
        envelope: &Envelope,
        message: Arc<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Delivery {
        let deadline = deadline.map_or_else(crate::relay::no_lease_deadline, Into::into);
        Relay::deliver(self, envelope, message, deadline).await
    }

    fn one_domain_per_message(&self) -> bool {
        matches!(**self, Relay::Mx(_))
    }
}

/// The real alias store: reads from the local replica, writes through Raft.
pub struct RaftAliases {
    pub node: Node,
    /// Uses held by this node's sessions, and commits being retried; shared
    /// with shutdown, which releases what unfinished sessions still hold.
    pub settlements: Arc<Settlements>,
    /// How long a reservation is held if this node dies mid-transaction.
    pub lease_ms: u64,
}

impl AliasStore for RaftAliases {
    /// Refuses from the local replica only after catching up with the leader,
    /// so a lagging replica never causes a wrong `550`; guessed ids thus cost
    /// no Raft write. Expiry is left to the Raft write, which decides it with
    /// replicated time.
    async fn refused(&self, id: &str) -> Result<Option<Refusal>, Unavailable> {
        let local = |reader: &crate::raft::store::StateReader| match reader.alias(id) {
            // A purged alias existed: mail to it is no guess.
            Ok(None) if reader.was_purged(id).unwrap_or(false) => Some(Refusal::Expired),
            Ok(None) => Some(Refusal::Unknown),
            Ok(Some(rec)) if rec.revoked => Some(Refusal::Revoked),
            Ok(Some(rec)) if rec.used >= rec.max_usage => Some(Refusal::UsedUp),
            Ok(Some(rec)) if rec.awaiting_confirmation => Some(Refusal::Unconfirmed),
            _ => None,
        };
        if local(self.node.reader()).is_none() {
            return Ok(None);
        }
        if let Err(e) = self.node.read_barrier().await {
            tracing::warn!(error = %e, "cannot confirm the local replica is current");
            return Err(Unavailable);
        }
        Ok(local(self.node.reader()))
    }

    async fn reserve(&self, id: &str) -> Result<Result<Reserved, Refusal>, Unavailable> {
        let reservation: u64 = rand::random();
        let lease_ends = Instant::now() + Duration::from_millis(self.lease_ms);
        let cmd = Command::Reserve {
            id: id.to_string(),
            lease_ms: self.lease_ms,
            reservation,
        };
        match self.node.write(cmd).await {
            Ok(Response::Reserved {
                reservation,
                target,
            }) => {
                self.settlements.hold(id, reservation);
                Ok(Ok(Reserved {
                    reservation,
                    target,
                    lease_ends,
                }))
            }
            Ok(Response::Refused { reason }) => Ok(Err(reason)),
            Ok(other) => {
                tracing::error!(response = ?other, "unexpected answer to a reservation");
                Err(Unavailable)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reservation not committed");
                // Its outcome is unknown: it may still be applied. Release it
                // by id in the background (harmless if it never was), so a
                // use is not held for a whole lease.
                let (node, settlements, lease_ms) =
                    (self.node.clone(), self.settlements.clone(), self.lease_ms);
                let id = id.to_string();
                tokio::spawn(async move {
                    settlements.release(&node, &id, reservation, lease_ms).await;
                });
                Err(Unavailable)
            }
        }
    }

    async fn commit(&self, id: &str, reserved: &Reserved) {
        self.settlements
            .commit(&self.node, id, reserved.reservation, reserved.lease_ends)
            .await;
    }

    fn commit_later(&self, id: &str, reserved: &Reserved) {
        self.settlements
            .commit_later(&self.node, id, reserved.reservation, reserved.lease_ends);
    }

    async fn release(&self, id: &str, reserved: &Reserved) {
        self.settlements
            .release(&self.node, id, reserved.reservation, self.lease_ms)
            .await;
    }

    fn now_ms(&self) -> u64 {
        self.node.now_ms()
    }
}
