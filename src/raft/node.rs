//! The handle through which SMTP, HTTP and cluster RPC read and write alias state.
//!
//! Writes go through Raft. Any node takes any write: the leader proposes it,
//! stamped with its clock; a follower forwards the command to the leader over
//! gRPC, so clients never see "not leader". Reads come from the local replica,
//! after a read barrier when they must not be stale.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::Proposer;
use super::follower_lease::{FollowerLease, LeaseGate};
use super::forward::Forwarder;
use super::liveness::{Liveness, Timing};
use super::network::Network;
use super::read_lease::ReadLease;
use super::store::{self, DbError, StateReader};
use super::types::{Command, NodeId, Response, TypeConfig};
use crate::clock::Clock;
use crate::cluster::client::{Peers, RpcError};
use crate::cluster::messages::{
    ForwardRequest, ForwardResponse, MembershipChange, MembershipResponse, StatusReport,
};
use crate::config::Config;
use crate::metrics::Metrics;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the store: {0}")]
    Store(#[from] DbError),
    #[error("raft configuration: {0}")]
    RaftConfig(String),
    #[error("starting raft: {0}")]
    Raft(String),
}

/// Why a write did not take effect. None of these says anything about the
/// alias itself, so callers answer with a temporary failure (SMTP `451`,
/// HTTP `503`), never with a permanent one.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no leader reachable: {0}")]
    Unavailable(String),
    #[error("the write was not committed within {0:?}")]
    Timeout(Duration),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// Why the leader could not give a read index.
#[derive(Debug, thiserror::Error)]
pub enum LeaderReadError {
    #[error("not the leader")]
    NotLeader,
    #[error("no quorum confirmed the leader in time")]
    Timeout,
    #[error("raft: {0}")]
    Raft(String),
}

/// Commands whose second application changes nothing, so a write whose
/// outcome is unknown (the leader died or a forward timed out after sending)
/// may be proposed again. Every command is today: a repeated Reserve finds
/// its reservation id, a repeated Create its id and token digest, a repeated
/// keyed create its key, and the others are idempotent by nature. A new
/// command must decide here.
/// What a node's status report says it cannot do that this release's
/// entries need, as a refusal to add it (`None`: nothing missing).
fn learner_gap(id: NodeId, addr: &str, report: &StatusReport) -> Option<String> {
    if report.id != id {
        return Some(format!(
            "the node at {addr} says it is node {}, not {id}: check its node_id",
            report.id
        ));
    }
    let mut missing = Vec::new();
    if !report.applies_batches {
        missing.push("batched entries");
    }
    if !report.applies_bounded_purges {
        missing.push("bounded purges");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "node {id} at {addr} runs a release that cannot apply {} written by this cluster; upgrade it to this release first",
            missing.join(" and ")
        )
    })
}

fn is_idempotent(cmd: &Command) -> bool {
    match cmd {
        Command::CreateAlias { .. }
        | Command::Reserve { .. }
        | Command::Commit { .. }
        | Command::Release { .. }
        | Command::Revoke { .. }
        | Command::Purge { .. }
        // A repeated bounded purge deletes the next rows due, which a later
        // purge would delete anyway: no row is deleted before it is due.
        | Command::PurgeBounded { .. }
        // Setting the same state twice leaves it set.
        | Command::SetMaintenance { .. }
        // A second application finds its key claimed by the same request and
        // answers with that alias (`Replayed`), which the front end serves as
        // the first answer.
        | Command::CreateAliasKeyed { .. }
        // Its inner create is (above); the per-target rules only run when
        // the alias is new, and a retry of a create that asked its target
        // for confirmation finds its own token pending and says so again.
        | Command::CreateLimited { .. }
        // A second application finds the target confirmed with the same
        // token and answers `TargetConfirmed` without changing anything.
        | Command::ConfirmTarget { .. }
        // Forgetting a request that is already forgotten changes nothing.
        | Command::WithdrawConfirmation { .. } => true,
        // Made of the commands above.
        Command::Batch { cmds } => cmds.iter().all(is_idempotent),
    }
}

/// Upper bound on one forward to the leader: a leader that holds a write
/// longer is more likely gone than slow, and the write (idempotent) is tried
/// again, possibly on a new leader, within the caller's deadline.
pub(crate) const FORWARD_ATTEMPT: Duration = Duration::from_secs(1);

/// One node's Raft instance, its local replica, clock and peers.
#[derive(Clone)]
pub struct Node {
    pub id: NodeId,
    raft: Raft<TypeConfig>,
    reader: StateReader,
    clock: Arc<dyn Clock>,
    peers: Peers,
    metrics: Arc<Metrics>,
    write_timeout: Duration,
    election_timeout: Duration,
    /// Who this node reaches and whether it hears a live leader.
    liveness: Arc<Liveness>,
    /// Set while a leader steps down for shutdown: it proposes nothing more.
    stepping_down: Arc<std::sync::atomic::AtomicBool>,
    /// Proposals this node is making as leader right now: a hand-over waits
    /// until none is left, so the chosen follower can have every entry.
    proposing: Arc<std::sync::atomic::AtomicUsize>,
    /// Where writes are proposed as leader: concurrent ones share an entry.
    proposer: Proposer,
    /// Batches this node's forwards to the leader (`forward.rs`).
    forwarder: Arc<Forwarder>,
    /// Lets the leader serve read barriers without a quorum round for a
    /// while after one (see `read_lease.rs`).
    read_lease: Arc<ReadLease>,
    /// The log's last and saved committed index (answers `ReadIndex` on the
    /// leader without its Raft core when nothing is in flight).
    log_marks: Arc<store::LogMarks>,
    /// The lease under which this node, as follower or learner, serves reads
    /// without a `ReadIndex` call (`follower_lease.rs`).
    follower_lease: Arc<FollowerLease>,
    /// `cluster.follower_read_leases`: whether this node asks for and grants
    /// follower leases.
    follower_leases: bool,
    /// Holds entries back for the holders of leases this node granted, and
    /// knows what each peer has persisted.
    lease_gate: Arc<LeaseGate>,
    /// When openraft restores this node as leader in its stored vote: that
    /// vote and the log's last index at open. Until the vote moves on, no
    /// read index it hands out is below that index: it may hold entries up
    /// to it that it acknowledged before the restart and has not applied
    /// again (applies become durable with the next append, and openraft
    /// starts from the durable applied index).
    restored: Option<(openraft::Vote<NodeId>, Option<u64>)>,
    /// `cluster.heartbeat_ms`.
    heartbeat: Duration,
}

/// Counts one proposal in [`Node::proposing`] for as long as it lives (also
/// when the proposing future is dropped).
struct Proposing(Arc<std::sync::atomic::AtomicUsize>);

impl Proposing {
    fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for Proposing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Node {
    /// Opens the store and starts Raft. Forming the cluster happens in the
    /// background ([`Node::form_cluster`]) so the node can serve health checks
    /// while it waits for its peers.
    ///
    /// # Errors
    /// [`StartError`] when the store cannot be opened or Raft cannot start.
    pub async fn start(
        config: &Config,
        clock: Arc<dyn Clock>,
        peers: Peers,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let path = config.db_path();
        let options = store::StoreOptions {
            cache_bytes: usize::try_from(config.cluster.store_cache_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
        };
        let (mut log_store, mut state_machine) =
            tokio::task::spawn_blocking(move || store::open_with(&path, &options))
                .await
                .map_err(|e| StartError::Raft(e.to_string()))??;
        // openraft restores a node whose stored vote is its own and
        // committed as leader at once, without an election.
        let restored_vote = log_store
            .read_vote()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
            .filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(config.node_id));
        let restored_leader = restored_vote.is_some();
        let reader = state_machine.reader();
        let log_marks = log_store.marks();
        let restored = restored_vote.map(|vote| (vote, log_marks.last()));
        let election = config.cluster.election_timeout_ms;
        let liveness = Arc::new(Liveness::new(
            config.node_id,
            Timing {
                probe_every: Duration::from_millis(config.cluster.heartbeat_ms),
                probe_timeout: Duration::from_millis(election),
                lease: Duration::from_millis(election * 2),
            },
        ));
        let raft_config = openraft::Config {
            cluster_name: "tempalias".into(),
            heartbeat_interval: config.cluster.heartbeat_ms,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.cluster.snapshot_after_entries),
            max_in_snapshot_log_to_keep: (config.cluster.snapshot_after_entries / 10).max(10),
            // Chunks travel as JSON inside one gRPC message each.
            snapshot_max_chunk_size: 1024 * 1024,
            // openraft bounds every chunk by this; `network` keeps the
            // chunks before the last at `SNAPSHOT_CHUNK_TIMEOUT`.
            install_snapshot_timeout: u64::try_from(
                super::network::SNAPSHOT_INSTALL_TIMEOUT.as_millis(),
            )
            .unwrap_or(u64::MAX),
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| StartError::RaftConfig(e.to_string()))?,
        );
        let read_lease = Arc::new(ReadLease::new(Duration::from_millis(election)));
        // Follower read leases hold entries back where they become visible:
        // the leader's applies and the committed index it sends.
        let lease_gate = Arc::new(LeaseGate::new(
            read_lease.clone(),
            metrics.clone(),
            restored_leader,
        ));
        // Also with leases off here: a restarted leader's blanket covers
        // leases granted before the restart, whatever the setting was then.
        state_machine.set_apply_gate(lease_gate.clone());
        let network = Network {
            peers: peers.clone(),
            metrics: metrics.clone(),
            lease_gate: lease_gate.clone(),
        };
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        lease_gate.connect(raft.clone());
        let proposer = Proposer::start(raft.clone(), clock.clone(), liveness.clone());
        let forwarder = {
            let (peers, metrics) = (peers.clone(), metrics.clone());
            Forwarder::new(Arc::new(move |addr: String, cmd: Command| {
                let peers = peers.clone();
                metrics.raft_forward_calls.inc();
                Box::pin(async move {
                    peers
                        .forward(&addr, &ForwardRequest { cmd }, FORWARD_ATTEMPT)
                        .await
                })
            }))
        };
        Ok(Node {
            id: config.node_id,
            proposer,
            forwarder,
            raft,
            reader,
            clock,
            peers,
            metrics,
            write_timeout: Duration::from_millis(config.cluster.write_timeout_ms),
            election_timeout: Duration::from_millis(election),
            liveness,
            stepping_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            proposing: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            read_lease,
            log_marks,
            follower_lease: Arc::new(FollowerLease::default()),
            follower_leases: config.cluster.follower_read_leases,
            lease_gate,
            restored,
            heartbeat: Duration::from_millis(config.cluster.heartbeat_ms),
        })
    }

    /// Initialises the cluster from `initial_members` exactly once.
    ///
    /// Only the member with the lowest id initialises, and only when every
    /// member answers and none is initialised yet: restarts, re-runs and nodes
    /// whose peers already formed a cluster do nothing (the leader brings them
    /// up to date). Loops until done or `shutdown`.
    pub async fn form_cluster(
        &self,
        members: BTreeMap<NodeId, String>,
        shutdown: CancellationToken,
    ) {
        let lowest = members.keys().next().copied();
        let mut logged = false;
        loop {
            match self.raft.is_initialized().await {
                Ok(true) | Err(_) => return,
                Ok(false) => {}
            }
            if lowest != Some(self.id) {
                tracing::info!(initialiser = ?lowest, "waiting for the cluster to be formed by its lowest member");
                return;
            }
            let mut all_reachable = true;
            for (id, addr) in members.iter().filter(|(id, _)| **id != self.id) {
                match self.peers.status(addr).await {
                    Ok(s) if s.initialized => {
                        tracing::info!(
                            peer = id,
                            "peer already belongs to a cluster; not initialising"
                        );
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !logged {
                            tracing::info!(peer = id, error = %e, "waiting for every initial member before forming the cluster");
                            logged = true;
                        }
                        all_reachable = false;
                    }
                }
            }
            if all_reachable {
                let nodes: BTreeMap<NodeId, BasicNode> = members
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "forming the cluster");
                match self.raft.initialize(nodes).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, "initialising the cluster"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    }

    fn metrics_now(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Address of a member, from the current membership.
    fn addr_of(&self, id: NodeId) -> Option<String> {
        self.metrics_now()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Proposes `cmd` on this node, which must be the leader: the entry is
    /// stamped with this node's clock here.
    pub async fn write_as_leader(&self, cmd: Command) -> ForwardResponse {
        self.write_as_leader_within(cmd, self.write_timeout).await
    }

    async fn write_as_leader_within(&self, cmd: Command, limit: Duration) -> ForwardResponse {
        // Counted before the check, so that a hand-over that sets
        // `stepping_down` and then sees no proposal left cannot miss this one.
        let _proposing = Proposing::new(&self.proposing);
        if self.stepping_down.load(std::sync::atomic::Ordering::SeqCst) {
            return ForwardResponse::NotLeader { leader: None };
        }
        let m = self.metrics_now();
        if m.state == ServerState::Leader && !self.liveness.leader_has_quorum(&m) {
            // Cut off from the majority: the entry could not commit here, and
            // another leader may already be writing. Say so at once.
            return ForwardResponse::Failed {
                message: "the leader has lost its quorum".into(),
            };
        }
        // A write pending when this leader loses its quorum (a partition that
        // began after it was proposed) cannot commit here: answer as soon as
        // the metrics show it, not when `limit` runs out.
        let liveness = self.liveness.clone();
        let raft = self.raft.clone();
        let quorum_lost = async move {
            let lost = raft
                .wait(Some(limit))
                .metrics(
                    move |m| m.state == ServerState::Leader && !liveness.leader_has_quorum(m),
                    "quorum lost",
                )
                .await;
            if lost.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let written = tokio::select! {
            // Stamped with this node's clock when proposed.
            w = tokio::time::timeout(limit, self.proposer.propose(cmd)) => w,
            _ = quorum_lost => {
                return ForwardResponse::Failed {
                    message: "the leader lost its quorum while the write was pending".into(),
                };
            }
        };
        written.unwrap_or_else(|_| ForwardResponse::Failed {
            message: format!("not committed within {limit:?}"),
        })
    }

    /// Commits `cmd` through Raft, on the leader wherever it is, and returns
    /// the state machine's answer.
    ///
    /// A write is retried within `write_timeout_ms` whenever it may not have
    /// taken effect: no leader known, the receiver was not the leader, the
    /// leader was unreachable, or the forward's outcome is unknown (a timeout,
    /// a reset after sending). Every command is idempotent ([`is_idempotent`]):
    /// a repeated Reserve finds its reservation id, a repeated Create its id
    /// and token digest. On a minority side it fails at once instead.
    ///
    /// # Errors
    /// [`WriteError`] when no leader could commit the write in time.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        let started = std::time::Instant::now();
        let result = self.write_inner(cmd).await;
        self.metrics
            .raft_write_duration
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.raft_write_errors.inc();
        }
        result
    }

    async fn write_inner(&self, cmd: Command) -> Result<Response, WriteError> {
        let deadline = Instant::now() + self.write_timeout;
        let mut backoff = Duration::from_millis(5);
        let mut last_problem = String::from("no leader known");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(WriteError::Unavailable(last_problem));
            }
            let m = self.metrics_now();
            if !self.liveness.can_write(&m) {
                // A minority side: no leader here can commit and no election
                // can succeed. Answer now; the client retries elsewhere.
                return Err(WriteError::Unavailable(
                    "this node cannot reach a quorum of the cluster".into(),
                ));
            }
            let leader = m.current_leader;
            let outcome = match leader {
                Some(l) if l == self.id => {
                    self.write_as_leader_within(cmd.clone(), remaining).await
                }
                // A leader this node's probes cannot reach would only hold
                // the write until the attempt times out: wait for the next.
                Some(l) if !self.liveness.reachable(l) => {
                    last_problem = format!("leader {l} unreachable");
                    ForwardResponse::NotLeader { leader: None }
                }
                Some(l) => match self.addr_of(l) {
                    None => ForwardResponse::NotLeader { leader: None },
                    Some(addr) => {
                        self.metrics.raft_forwarded_writes.inc();
                        // Shares one call with the other writes forwarded
                        // meanwhile when every member applies batches.
                        let batch = is_idempotent(&cmd) && self.liveness.members_apply_batches(&m);
                        let attempt = remaining.min(FORWARD_ATTEMPT);
                        let forward = async {
                            tokio::time::timeout(
                                attempt,
                                self.forwarder.forward(&addr, cmd.clone(), batch),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                Err(RpcError::Failed {
                                    addr: addr.clone(),
                                    message: format!("no answer within {attempt:?}"),
                                })
                            })
                        };
                        // A new leader elected while the forward hangs (the
                        // old one was cut off) takes the write at once; the
                        // abandoned forward's outcome is unknown, and every
                        // command may be repeated.
                        let moved = self.leader_changed(leader, remaining);
                        let forwarded = tokio::select! {
                            r = forward => r,
                            () = moved => Err(RpcError::Unreachable {
                                addr: addr.clone(),
                                message: "a new leader was elected meanwhile".into(),
                            }),
                        };
                        match forwarded {
                            Ok(r) => r,
                            Err(
                                e
                                @ (RpcError::Unauthenticated { .. } | RpcError::BadAddress { .. }),
                            ) => {
                                return Err(WriteError::Unavailable(e.to_string()));
                            }
                            // Not seen, or seen with an unknown outcome: both
                            // are safe to repeat on this leader or the next
                            // one, as every command is idempotent.
                            Err(e) => {
                                debug_assert!(is_idempotent(&cmd));
                                last_problem = e.to_string();
                                ForwardResponse::NotLeader { leader: None }
                            }
                        }
                    }
                },
                None => ForwardResponse::NotLeader { leader: None },
            };
            match outcome {
                ForwardResponse::Applied { response } => return Ok(response),
                ForwardResponse::Failed { message } => {
                    return if Instant::now() >= deadline {
                        Err(WriteError::Timeout(self.write_timeout))
                    } else {
                        Err(WriteError::Unavailable(message))
                    };
                }
                ForwardResponse::NotLeader { .. } => {
                    // An election or a hand-over is under way: look again as
                    // soon as the leader changes, or after a short pause.
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    let _ = self
                        .raft
                        .wait(Some(pause))
                        .metrics(|m| m.current_leader != leader, "leader change")
                        .await;
                    backoff = (backoff * 2).min(Duration::from_millis(40));
                }
            }
        }
    }

    /// Resolves when openraft's metrics name a leader other than `from`
    /// (within `limit`; never otherwise).
    async fn leader_changed(&self, from: Option<NodeId>, limit: Duration) {
        let changed = self
            .raft
            .wait(Some(limit))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != from,
                "leader change",
            )
            .await;
        if changed.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until this replica has applied everything committed before the
    /// call, so a following local read is linearizable.
    ///
    /// # Errors
    /// [`WriteError`] when no leader confirms its position in time (for
    /// example, this node is cut off in a minority).
    pub async fn read_barrier(&self) -> Result<(), WriteError> {
        self.read_barrier_within(self.write_timeout).await
    }

    /// [`Node::read_barrier`] with its own time limit (readiness probes use a
    /// short one).
    ///
    /// # Errors
    /// See [`Node::read_barrier`].
    pub async fn read_barrier_within(&self, limit: Duration) -> Result<(), WriteError> {
        if self.lease_read() {
            return Ok(());
        }
        let deadline = Instant::now() + limit;
        if let Some(index) = self.follower_lease_index() {
            // Every entry visible anywhere before now (applied, or known as
            // committed) is in this node's log at or below `index`:
            // applying it is all the read needs. It may
            // wait for another lease holder that stopped answering (the
            // committed index this node hears is held back for it) until
            // that lease ends, plus a heartbeat to hear the rest. Entries
            // that never apply (a deposed leader's, truncated) end the wait
            // then; the read asks the leader as usual.
            let wait = limit.min(self.read_lease.longest_follower_lease() + self.heartbeat);
            if self.applied_index_at_least(index, wait).await {
                self.metrics.raft_follower_lease_reads.inc();
                return Ok(());
            }
        }
        let mut backoff = Duration::from_millis(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(WriteError::Unavailable(
                    "no leader confirmed a read index".into(),
                ));
            }
            let m = self.metrics_now();
            if !self.liveness.can_read(&m) {
                return Err(WriteError::Unavailable(
                    "this node cannot reach a quorum or does not hear its leader".into(),
                ));
            }
            let leader = m.current_leader;
            let index = match leader {
                // A follower may already have applied (and shown a client)
                // an entry this node's state machine has not applied yet:
                // wait for the index like a follower does.
                Some(l) if l == self.id => match self.leader_read_index(remaining).await {
                    Ok(index) => Some(index),
                    Err(LeaderReadError::Timeout) => return Err(WriteError::Timeout(limit)),
                    Err(_) => None,
                },
                Some(l) => match self.addr_of(l) {
                    Some(addr) => {
                        let asked_at = Instant::now();
                        let lease_for = (self.follower_leases
                            && matches!(m.state, ServerState::Follower | ServerState::Learner))
                        .then_some(self.id);
                        match self
                            .peers
                            .read_index(&addr, remaining.min(FORWARD_ATTEMPT), lease_for)
                            .await
                        {
                            Ok(r) if r.error.is_none() => {
                                if let (Some(_), Some(ms)) = (lease_for, r.lease_ms) {
                                    self.follower_lease.record(
                                        l,
                                        m.current_term,
                                        asked_at,
                                        Duration::from_millis(ms),
                                        r.index,
                                    );
                                }
                                Some(r.index)
                            }
                            _ => None,
                        }
                    }
                    None => None,
                },
                None => None,
            };
            match index {
                Some(index) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    return if self.applied_index_at_least(index, remaining).await {
                        Ok(())
                    } else {
                        Err(WriteError::Timeout(limit))
                    };
                }
                None => {
                    // No leader could confirm its position (election, or no
                    // quorum): back off instead of hammering the peers.
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    let _ = self
                        .raft
                        .wait(Some(pause))
                        .metrics(|m| m.current_leader != leader, "leader change")
                        .await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    /// As follower or learner under a running follower lease: the index this
    /// replica must have applied for a read to be linearizable (the log's
    /// last index, read now, and the lease's read index); `None` without a
    /// lease. The last index is read before anything else: every entry
    /// visible anywhere before the read started (applied, or known as
    /// committed; a write is answered only after its apply) is at or below
    /// it, because the leader lets an entry become visible only once this
    /// node has persisted it.
    fn follower_lease_index(&self) -> Option<Option<u64>> {
        if !self.follower_leases {
            return None;
        }
        let last = self.log_marks.last();
        let m = self.raft.metrics();
        let m = m.borrow();
        if !matches!(m.state, ServerState::Follower | ServerState::Learner)
            || !self.liveness.can_read(&m)
        {
            return None;
        }
        let lease_index =
            self.follower_lease
                .read_index(Instant::now(), m.current_leader, m.current_term)?;
        Some(last.max(lease_index))
    }

    /// True when this node, as follower or learner, holds a running follower
    /// lease and has applied everything it must for a linearizable read:
    /// the read needs no barrier (no task switch, no network). Checked on
    /// every status read before a barrier is queued, like
    /// [`Node::lease_read`] on the leader.
    pub fn follower_lease_read(&self) -> bool {
        let Some(index) = self.follower_lease_index() else {
            return false;
        };
        let ok = self.raft.metrics().borrow().last_applied.map(|l| l.index) >= index;
        if ok {
            self.metrics.raft_follower_lease_reads.inc();
        }
        ok
    }

    /// Waits up to `limit` until this replica has applied `index`; true if
    /// it has. Already applied (no writes meanwhile): no waiter, no wake-up.
    async fn applied_index_at_least(&self, index: Option<u64>, limit: Duration) -> bool {
        if self.raft.metrics().borrow().last_applied.map(|l| l.index) >= index {
            return true;
        }
        self.raft
            .wait(Some(limit))
            .applied_index_at_least(index, "read barrier")
            .await
            .is_ok()
    }

    /// This node's follower lease (a vote request ends it).
    pub fn follower_lease(&self) -> &FollowerLease {
        &self.follower_lease
    }

    /// On the leader, answering the `ReadIndex` of `asker` (`None`: a node
    /// that wants no lease): its read index and, when granted, a follower
    /// lease for `asker`. The lease is recorded before the read index is
    /// taken, so every entry that becomes visible after the index waits for
    /// `asker`, and every entry visible before it is at or below the index.
    /// When the read index then fails, the recorded lease holds entries back
    /// for nothing until it ends (at most one lease); the asker retries.
    ///
    /// # Errors
    /// See [`Node::leader_read_index`].
    pub async fn read_index_for(
        &self,
        asker: Option<NodeId>,
        limit: Duration,
    ) -> Result<(Option<u64>, Option<Duration>), LeaderReadError> {
        let lease = match asker {
            // A lease that cannot be granted (the renewing round failed) is
            // no reason to refuse the read index.
            Some(to) if self.follower_leases && to != self.id => {
                match self.grant_follower_lease(to, limit).await {
                    Ok(lease) => lease,
                    Err(e) => {
                        tracing::debug!(follower = to, error = %e, "no follower lease granted");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok((self.leader_read_index(limit).await?, lease))
    }

    /// Grants `to` a follower lease if this node leads, is not stepping down,
    /// replicates to `to`, and its own read lease runs for long enough (a
    /// quorum round first renews a lease that has less than half its length
    /// left, so holders do not come back for a sliver).
    async fn grant_follower_lease(
        &self,
        to: NodeId,
        limit: Duration,
    ) -> Result<Option<Duration>, LeaderReadError> {
        // Only to a node that has every committed entry: the leader's
        // applies wait for each holder, so a holder far behind (a snapshot
        // to install, a slow disk) would hold every write until it caught
        // up. It asks again once it has.
        let committed = self.log_marks.committed();
        let replicates_to = |m: &RaftMetrics<NodeId, BasicNode>| {
            m.state == ServerState::Leader
                && m.replication.as_ref().is_some_and(|r| r.contains_key(&to))
                && self.lease_gate.matched(m, to).map(|l| l.index) >= committed
        };
        if self.is_stepping_down() || !replicates_to(&self.metrics_now()) {
            return Ok(None);
        }
        let now = Instant::now();
        let left = self
            .read_lease
            .valid_at(now)
            .map_or(Duration::ZERO, |h| h.until.saturating_duration_since(now));
        if left < self.election_timeout / 2 {
            self.quorum_round(limit).await?;
        }
        let m = self.metrics_now();
        if self.is_stepping_down() || !replicates_to(&m) {
            return Ok(None);
        }
        let lease = self
            .read_lease
            .grant(to, &m.vote, Instant::now(), self.election_timeout);
        if lease.is_some() {
            self.metrics.raft_follower_leases_granted.inc();
        }
        Ok(lease)
    }

    /// On the leader: an index that every write acknowledged to a client
    /// before this call is at or below, once applied here (`None` before the
    /// first entry). From the read lease when it runs (no network), else from
    /// a quorum round, which renews the lease. Serves this node's own read
    /// barriers and the `ReadIndex` RPCs of the others.
    ///
    /// # Errors
    /// [`LeaderReadError`] when this node is not the leader (or steps down),
    /// or no quorum confirmed it within `limit`.
    async fn leader_read_index(&self, limit: Duration) -> Result<Option<u64>, LeaderReadError> {
        if self.is_stepping_down() {
            return Err(LeaderReadError::NotLeader);
        }
        if let Some(held) = self.read_lease.valid_at(Instant::now()) {
            // While the lease runs this node leads and no other leader can
            // exist (the same check as a local read's, `lease_read`); with
            // nothing in flight its last index is the committed one.
            let leads = self.raft.metrics().borrow().state == ServerState::Leader;
            if let Some(index) = self.log_marks.settled().filter(|_| leads) {
                self.metrics.raft_lease_reads.inc();
                return Ok(index.max(self.restored_floor(&held.vote)));
            }
            // Writes in flight: the exact committed index, read in the core,
            // which also checks the vote and membership once more (the
            // lease itself already ends when this node grants a vote: the
            // Vote RPC handler suspends it first).
            let checked = self
                .raft
                .with_raft_state(move |st| {
                    let same = st.server_state == ServerState::Leader
                        && st.vote_ref() == &held.vote
                        && st.membership_state.effective().log_id() == &held.membership;
                    same.then(|| st.committed.map(|c| c.index))
                })
                .await;
            match checked {
                Ok(Some(index)) => {
                    self.metrics.raft_lease_reads.inc();
                    return Ok(index.max(self.restored_floor(&held.vote)));
                }
                Ok(None) => self.read_lease.drop_lease(),
                Err(e) => return Err(LeaderReadError::Raft(e.to_string())),
            }
        }
        self.quorum_round(limit).await
    }

    /// A quorum round confirming this leader (openraft's
    /// `ensure_linearizable`), which renews the read lease when it surely ran
    /// in one vote and membership; the committed index it confirmed.
    async fn quorum_round(&self, limit: Duration) -> Result<Option<u64>, LeaderReadError> {
        let token = self.read_lease.round_starts();
        let before = self.metrics_now();
        let t0 = Instant::now();
        self.metrics.raft_read_quorum_rounds.inc();
        let log_id = match tokio::time::timeout(limit, self.raft.ensure_linearizable()).await {
            Ok(Ok(log_id)) => log_id,
            Ok(Err(e)) => return Err(LeaderReadError::Raft(e.to_string())),
            Err(_) => return Err(LeaderReadError::Timeout),
        };
        let after = self.metrics_now();
        // The lease is granted only when the round surely ran as this leader
        // in one vote and one membership from start to end.
        let steady = before.state == ServerState::Leader
            && before.current_leader == Some(self.id)
            && before.vote.is_committed()
            && after.vote == before.vote
            && after.membership_config.log_id() == before.membership_config.log_id();
        if steady && !self.is_stepping_down() {
            self.read_lease
                .confirmed(token, before.vote, *before.membership_config.log_id(), t0);
        }
        // A leader restored in its term after a crash confirms a committed
        // index that may be below entries it acknowledged before (openraft
        // starts it from its durable applied index); they are in its log.
        Ok(log_id
            .map(|l| l.index)
            .max(self.restored_floor(&before.vote)))
    }

    /// While this node leads in the vote openraft restored it in: the log's
    /// last index at open, which no read index may be below (see the
    /// `restored` field).
    fn restored_floor(&self, vote: &openraft::Vote<NodeId>) -> Option<u64> {
        self.restored
            .filter(|(restored, _)| restored == vote)
            .and_then(|(_, last)| last)
    }

    /// True when this node leads and its read lease runs: a read of the
    /// local replica now is linearizable without any barrier (no task
    /// switch, no network). Checked on every status read, SMTP confirmation
    /// and readiness check before anything else.
    ///
    /// Only when nothing is in flight and this node's state machine has
    /// applied its whole log: openraft tells followers about a new committed
    /// index before the leader's own state machine applies it, so a follower
    /// may already have shown a client an entry that is not applied here
    /// yet. Otherwise the caller runs a barrier, which waits for that index.
    pub fn lease_read(&self) -> bool {
        let applied = {
            let m = self.raft.metrics();
            let m = m.borrow();
            if self.is_stepping_down() || m.state != ServerState::Leader {
                return false;
            }
            m.last_applied.map(|l| l.index)
        };
        let caught_up = matches!(self.log_marks.settled(), Some(index) if applied >= index);
        let ok = caught_up && self.read_lease.valid_at(Instant::now()).is_some();
        if ok {
            self.metrics.raft_lease_reads.inc();
        }
        ok
    }

    /// The read lease (the cluster service refuses votes while it says so).
    pub fn read_lease(&self) -> &ReadLease {
        &self.read_lease
    }

    /// This node's view of itself and the cluster.
    pub fn status(&self) -> StatusReport {
        let m = self.metrics_now();
        let stored = m.membership_config.clone();
        let membership = stored.membership();
        let initialized = membership.nodes().next().is_some();
        let report = StatusReport {
            id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            initialized,
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            replication: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            now_ms: self.clock.now_ms(),
            leader_alive: self.liveness.leader_alive(&m),
            last_log_term: super::liveness::last_log_term(&m),
            applies_batches: true,
            applies_bounded_purges: true,
        };
        report
    }

    /// The purge command this node would propose now as leader: bounded
    /// while every member says it applies bounded purges (see
    /// [`super::purge`]).
    pub fn purge_command(&self, keep_ms: u64) -> Command {
        let m = self.metrics_now();
        super::purge::command_for(
            &self.liveness,
            m.membership_config.membership().nodes().map(|(id, _)| *id),
            keep_ms,
        )
    }

    /// Why node `id` at `addr` must not join, from its own status report:
    /// a release that cannot apply entries this cluster writes (batches,
    /// bounded purges) would stop at the first one it received, and the
    /// capability gates only see members. A node that does not answer is
    /// not refused here: it may still be starting, and joining waits for it
    /// as before.
    async fn learner_refusal(&self, id: NodeId, addr: &str) -> Option<String> {
        let report = match self.peers.status_within(addr, Duration::from_secs(5)).await {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(id, addr, error = %e, "new member did not report its status; adding it anyway");
                return None;
            }
        };
        learner_gap(id, addr, &report)
    }

    /// Applies a membership change on the leader (forwarding if needed).
    pub async fn change_membership(&self, change: MembershipChange) -> MembershipResponse {
        let leader = self.metrics_now().current_leader;
        let Some(leader) = leader else {
            return MembershipResponse {
                ok: false,
                message: "no leader known; try again".into(),
            };
        };
        if leader != self.id {
            let Some(addr) = self.addr_of(leader) else {
                return MembershipResponse {
                    ok: false,
                    message: format!("leader {leader} has no known address"),
                };
            };
            return match self
                .peers
                .change_membership(&addr, &change, Duration::from_secs(120))
                .await
            {
                Ok(r) => r,
                Err(e) => MembershipResponse {
                    ok: false,
                    message: e.to_string(),
                },
            };
        }
        // A new membership may need a quorum the last lease round did not
        // ask: no lease reads until the change is done and a round confirms.
        let _no_lease = self.read_lease.suspend();
        let result = match &change {
            MembershipChange::AddLearner { id, addr } => {
                if let Some(refusal) = self.learner_refusal(*id, addr).await {
                    return MembershipResponse {
                        ok: false,
                        message: refusal,
                    };
                }
                // Blocking: returns once the learner has caught up (by log or snapshot).
                self.raft
                    .add_learner(*id, BasicNode { addr: addr.clone() }, true)
                    .await
                    .map(|_| ())
            }
            MembershipChange::Promote { id } => self
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                .await
                .map(|_| ()),
            MembershipChange::Remove { id } => {
                let is_voter = self
                    .metrics_now()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == *id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
                };
                self.raft.change_membership(change, false).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(?change, "membership changed");
                MembershipResponse {
                    ok: true,
                    message: format!("{change:?} done"),
                }
            }
            Err(e) => MembershipResponse {
                ok: false,
                message: e.to_string(),
            },
        }
    }

    /// If this node leads, hands leadership to the most up-to-date voter
    /// before this node stops, so writes pause for a few round trips instead
    /// of an election timeout.
    ///
    /// openraft 0.9 has no transfer-leader call, but it has what one needs: a
    /// leader grants its vote to a candidate whose log is as long as its own
    /// (once its own leader lease has run, `2 x election_timeout_ms` after it
    /// was elected), and a candidate holding that vote and its own has a
    /// majority of three. So: stop proposing (forwarded writes are told "not
    /// leader" and retried by their sender as soon as a new leader shows),
    /// wait until the chosen follower has every entry and every proposed
    /// write has been answered, then ask it to campaign. It wins with this
    /// node's vote; the third node follows the higher term. If that does not
    /// happen in time (a follower lagging far behind, a vote refused), this
    /// node falls back to going silent until a follower's own timer elects it.
    pub async fn transfer_leadership(&self) {
        let m = self.metrics_now();
        if m.current_leader != Some(self.id) || m.state != ServerState::Leader {
            return;
        }
        let others: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id)
            .collect();
        if others.is_empty() {
            return;
        }
        // This node refuses to vote for anyone until its own lease has run
        // since it was elected; go on serving until then, so that the vote
        // is granted at the first request and writes pause only for the
        // hand-over itself.
        let lease = self.election_timeout * 2;
        let vote_free_after = lease + Duration::from_millis(50);
        let led = self.liveness.leading_for().unwrap_or_default();
        if led < vote_free_after {
            tokio::time::sleep(vote_free_after - led).await;
        }
        self.stepping_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // This node must not campaign again once it has handed over.
        self.raft.runtime_config().elect(false);
        // No lease is granted any more (the suspension stops grants under the
        // same lock `grant` takes, so none slips in after the look below);
        // the holders of earlier ones count on this node leading until they
        // end (`follower_lease.rs`).
        let _no_grants = self.read_lease.suspend();
        if let Some(end) = self.read_lease.granted_until(Instant::now()) {
            tokio::time::sleep_until(end).await;
        }
        let moved = |m: &RaftMetrics<NodeId, BasicNode>| {
            m.current_leader.is_some() && m.current_leader != Some(self.id)
        };
        let give_up = Instant::now() + lease * 2;
        let mut target: Option<NodeId> = None;
        let mut last_rescue: Option<Instant> = None;
        while Instant::now() < give_up {
            let m = self.metrics_now();
            if moved(&m) {
                break;
            }
            if m.state != ServerState::Leader {
                // Leadership was lost without a successor (a vote request
                // that failed still raised the term here): ask the member
                // with the longest log to campaign, at most once a lease
                // (with five voters the others' leases may still run, and
                // each campaign raises the term).
                if last_rescue.is_none_or(|t: Instant| t.elapsed() >= lease) {
                    last_rescue = Some(Instant::now());
                    self.elect_longest_log(&others).await;
                }
                let _ = self
                    .raft
                    .wait(Some(self.election_timeout / 2))
                    .metrics(moved, "leader moved")
                    .await;
                continue;
            }
            // Every proposal has been answered, and everything in the log is
            // applied here and replicated to the chosen follower.
            let idle = self.proposing.load(std::sync::atomic::Ordering::SeqCst) == 0;
            let last = m.last_log_index;
            let matched = |v: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(v).copied().flatten())
                    .map(|l| l.index)
            };
            let best = others
                .iter()
                .filter(|v| self.liveness.reachable(**v))
                .max_by_key(|v| (matched(v), std::cmp::Reverse(**v)))
                .copied();
            let caught_up = idle
                && best.is_some_and(|b| matched(&b) == last)
                && m.last_applied.map(|l| l.index) == last;
            match best {
                Some(b) if caught_up => {
                    let Some(addr) = self.addr_of(b) else { break };
                    if target != Some(b) {
                        tracing::info!(to = b, "handing leadership over before stopping");
                        target = Some(b);
                    }
                    if let Err(e) = self.peers.trigger_election(&addr).await {
                        tracing::warn!(error = %e, "asking node {b} to campaign failed");
                    }
                    let _ = self
                        .raft
                        .wait(Some(self.election_timeout / 2))
                        .metrics(moved, "leader moved")
                        .await;
                }
                _ => {
                    let _ = self
                        .raft
                        .wait(Some(Duration::from_millis(2)))
                        .metrics(moved, "leader moved")
                        .await;
                }
            }
        }
        if moved(&self.metrics_now()) {
            return;
        }
        // Fallback: go silent so the followers' leases lapse and one of them
        // is elected by its own timer.
        tracing::warn!("hand-over did not complete; going silent until a follower takes over");
        self.raft.runtime_config().heartbeat(false);
        if self
            .raft
            .wait(Some(lease * 3))
            .metrics(moved, "leader moved")
            .await
            .is_err()
        {
            tracing::warn!("leadership did not move in time; stopping anyway");
        }
    }

    /// Asks the reachable member among `candidates` with the longest log to
    /// campaign (its vote request is then granted by the others).
    async fn elect_longest_log(&self, candidates: &[NodeId]) {
        let calls = candidates.iter().filter_map(|id| {
            let addr = self.addr_of(*id)?;
            Some(async move {
                let r = self
                    .peers
                    .status_within(&addr, self.election_timeout)
                    .await
                    .ok()?;
                Some(((r.last_log_term, r.last_log_index), *id, addr))
            })
        });
        let best = futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        if let Some((_, id, addr)) = best {
            tracing::info!(
                to = id,
                "no leader after stepping down; asking the longest log to campaign"
            );
            if let Err(e) = self.peers.trigger_election(&addr).await {
                tracing::warn!(error = %e, "asking node {id} to campaign failed");
            }
        }
    }

    /// True while this node steps down for shutdown (it serves no leader work:
    /// confirming a read index would send heartbeats and renew the leases it
    /// is waiting out).
    pub fn is_stepping_down(&self) -> bool {
        self.stepping_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Each other member's clock minus ours, in milliseconds, estimated from
    /// one Status call each (half the round trip is added to their reading).
    /// Members that do not answer are left out.
    pub async fn clock_offsets(&self) -> Vec<(NodeId, i64)> {
        let members: Vec<(NodeId, String)> = self
            .metrics_now()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let calls = members.into_iter().map(|(id, addr)| async move {
            let before = self.clock.now_ms();
            let report = self.peers.status(&addr).await.ok()?;
            let after = self.clock.now_ms();
            let midpoint = (before + after) / 2;
            Some((id, report.now_ms as i64 - midpoint as i64))
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The local replica of the state machine.
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// This node's clock (for display; decisions use replicated time).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The openraft handle (metrics, RPC handlers, shutdown).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Cheap local view: this node hears a live leader (if it is the leader
    /// itself, a quorum acknowledged it within the lease), and can reach the
    /// quorum a write needs. A follower cannot tell from here whether its
    /// leader still has a quorum; [`Node::is_ready`] asks.
    pub fn knows_confirmed_leader(&self) -> bool {
        let m = self.metrics_now();
        if m.running_state.is_err() || m.current_leader.is_none() {
            return false;
        }
        self.liveness.leader_alive(&m) && self.liveness.can_read(&m)
    }

    /// On a leader: whether a quorum acknowledged it within the leader lease.
    pub fn leader_has_quorum(&self, m: &RaftMetrics<NodeId, BasicNode>) -> bool {
        self.liveness.leader_has_quorum(m)
    }

    /// True when this node can serve linearizably right now: the local view
    /// says so and a read barrier (which needs a quorum behind the leader)
    /// completes within `limit`.
    pub async fn is_ready(&self, limit: Duration) -> bool {
        self.knows_confirmed_leader() && self.read_barrier_within(limit).await.is_ok()
    }

    /// The failure detector's state (probes write it, RPC handlers read it).
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    /// Channels to the other members.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Stops Raft (flushing what it holds).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learner_of_another_release_or_id_is_refused_with_the_reason() {
        let addr = "127.0.0.4:7001";
        assert_eq!(learner_gap(4, addr, &StatusReport::for_test(4)), None);
        let old = StatusReport {
            applies_batches: false,
            applies_bounded_purges: false,
            ..StatusReport::for_test(4)
        };
        let why = learner_gap(4, addr, &old).expect("refused");
        assert!(
            why.contains("batched entries and bounded purges") && why.contains("upgrade"),
            "{why}"
        );
        let no_bounded = StatusReport {
            applies_bounded_purges: false,
            ..StatusReport::for_test(4)
        };
        let why = learner_gap(4, addr, &no_bounded).expect("refused");
        assert!(why.contains("cannot apply bounded purges"), "{why}");
        let why = learner_gap(5, addr, &StatusReport::for_test(4)).expect("refused");
        assert!(why.contains("says it is node 4, not 5"), "{why}");
    }
}
