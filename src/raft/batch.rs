//! Group proposal: concurrent writes on the leader share one Raft entry.
//!
//! openraft 0.9 appends each proposed entry to the log and waits for it to
//! be flushed before it takes the next proposal (`RaftCore::append_to_log`
//! awaits the flush callback), so every `client_write` costs the leader one
//! fsync of its own, one after the other: proposals are serialised on the
//! leader's disk however many sessions write at once. This module turns that
//! into group commit one level up. Writes are queued; whenever fewer than
//! [`IN_FLIGHT`] proposals are under way, everything queued at that moment
//! goes into one entry ([`Command::Batch`], or the command itself when it is
//! alone). That entry is one log append and one fsync on the leader and on
//! each follower, one state-machine transaction, and each write still gets
//! its own answer. Nothing is acknowledged earlier than before: a caller hears
//! `Applied` only once the entry holding its command is committed (on a
//! quorum's disks) and applied.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::follower_lease;
use super::liveness::Liveness;
use super::read_lease::ReadLease;
use super::types::{Command, Request, Response, TypeConfig};
use crate::clock::Clock;
use crate::cluster::messages::ForwardResponse;
use crate::metrics::Metrics;

/// Proposals under way at once. One would batch the most but leave the
/// leader's disk idle while an entry travels to the followers; two let the
/// next entry's fsync overlap the previous one's replication.
const IN_FLIGHT: usize = 2;

/// Commands in one entry, nearly at most: writes are added while fewer are
/// in it, and a follower's forwarded batch (`forward.rs`, itself at most
/// this long) counts with all its commands, so an entry holds fewer than
/// twice this. Bounds an entry's size (a create is at most about 400 bytes
/// of JSON), so that an `AppendEntries` of openraft's 300 entries at most
/// stays well inside the cluster RPC's 64 MiB message limit (about 16 MB)
/// for a follower catching up; under load a batch holds about as many
/// commands as there are writes in flight, far fewer.
const MAX_BATCH: usize = 64;

/// Writes waiting for a proposal slot at most; a caller beyond that waits
/// to enqueue (each caller holds one write, and callers are bounded by the
/// listeners' connection limits anyway).
const QUEUE: usize = 8192;

/// One write waiting to be proposed, and where its answer goes.
struct Pending {
    cmd: Command,
    answer: oneshot::Sender<ForwardResponse>,
}

/// The handle writes are proposed through on the leader. Cloning shares the
/// queue.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the proposing task of `raft` (it ends when every handle is
    /// dropped). Entries are stamped with `clock` when they are proposed.
    /// Several commands go into one entry only while `liveness` says every
    /// member can apply such an entry. An entry's answers wait for the
    /// holders of the follower leases in `leases` (`follower_lease.rs`).
    pub fn start(
        raft: Raft<TypeConfig>,
        clock: Arc<dyn Clock>,
        liveness: Arc<Liveness>,
        leases: Arc<ReadLease>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, clock, liveness, leases, metrics, rx));
        Self { queue: tx }
    }

    /// Proposes `cmd` (possibly together with others) and waits for its
    /// answer: `Applied` once committed and applied, `NotLeader` when this
    /// node does not lead (nothing was proposed), `Failed` otherwise.
    pub async fn propose(&self, cmd: Command) -> ForwardResponse {
        let (answer, rx) = oneshot::channel();
        if self.queue.send(Pending { cmd, answer }).await.is_err() {
            return ForwardResponse::Failed {
                message: "raft stopped".into(),
            };
        }
        rx.await.unwrap_or_else(|_| ForwardResponse::Failed {
            message: "the proposal was dropped (raft stopped)".into(),
        })
    }
}

async fn run(
    raft: Raft<TypeConfig>,
    clock: Arc<dyn Clock>,
    liveness: Arc<Liveness>,
    leases: Arc<ReadLease>,
    counters: Arc<Metrics>,
    mut rx: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // The slot first: what queues up while every slot is taken is what
        // the next entry carries.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        // A copy: the metrics are not borrowed while the liveness lock is taken.
        let metrics = raft.metrics().borrow().clone();
        let may_batch = liveness.members_apply_batches(&metrics);
        if may_batch {
            // Counted in commands, not writes: a follower forwards batches of
            // its own (`forward.rs`), and an entry's size is what is bounded.
            let mut weight = weight_of(&batch[0].cmd);
            while weight < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => {
                        weight += weight_of(&p.cmd);
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
        }
        let raft = raft.clone();
        let (leases, counters) = (leases.clone(), counters.clone());
        let now_ms = clock.now_ms();
        tokio::spawn(async move {
            let (answers, index) = propose(&raft, now_ms, &batch).await;
            // The slot is free once the entry is committed: holding answers
            // for lease holders must not hold up the next entry.
            drop(slot);
            if let Some(index) = index {
                if follower_lease::hold_for_holders(&raft, &leases, index).await {
                    counters.raft_lease_holds.inc();
                }
            }
            for (p, a) in batch.into_iter().zip(answers) {
                // The caller may have given up (its deadline); nothing to do then.
                let _ = p.answer.send(a);
            }
        });
    }
}

/// How many commands `cmd` holds (a forwarded batch holds several).
fn weight_of(cmd: &Command) -> usize {
    match cmd {
        Command::Batch { cmds } => cmds.len().max(1),
        _ => 1,
    }
}

/// Proposes one entry for `batch`: every write's answer, in order, and the
/// entry's log index when it was committed.
async fn propose(
    raft: &Raft<TypeConfig>,
    now_ms: u64,
    batch: &[Pending],
) -> (Vec<ForwardResponse>, Option<u64>) {
    let single = batch.len() == 1;
    let cmd = if single {
        batch[0].cmd.clone()
    } else {
        Command::Batch {
            cmds: batch.iter().map(|p| p.cmd.clone()).collect(),
        }
    };
    let written = raft.client_write(Request { now_ms, cmd }).await;
    let index = written.as_ref().ok().map(|r| r.log_id.index);
    let answers: Vec<ForwardResponse> = match written {
        Ok(resp) if single => vec![ForwardResponse::Applied {
            response: resp.data,
        }],
        Ok(resp) => match resp.data {
            Response::Batch { responses } if responses.len() == batch.len() => responses
                .into_iter()
                .map(|response| ForwardResponse::Applied { response })
                .collect(),
            other => {
                // Cannot happen with this state machine; say so rather
                // than hand out answers that belong to nobody.
                tracing::error!(response = ?other, "a batch was answered with something else");
                let message = "the state machine answered a batch wrongly".to_string();
                batch
                    .iter()
                    .map(|_| ForwardResponse::Failed {
                        message: message.clone(),
                    })
                    .collect()
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => batch
            .iter()
            .map(|_| ForwardResponse::NotLeader {
                leader: f.leader_id,
            })
            .collect(),
        Err(e) => {
            let message = e.to_string();
            batch
                .iter()
                .map(|_| ForwardResponse::Failed {
                    message: message.clone(),
                })
                .collect()
        }
    };
    (answers, index)
}
