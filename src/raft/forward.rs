//! Forward batching: concurrent writes on a follower share one `Forward` RPC.
//!
//! A follower forwards every write to the leader (two per forwarded message:
//! a Reserve and a Commit), and each forward was a gRPC call of its own. The
//! leader then batched them into one Raft entry anyway (`batch.rs`), so the
//! calls only cost CPU on both sides. Here concurrent forwards to the same
//! leader are queued; whenever fewer than [`IN_FLIGHT`] calls to it are under
//! way, everything queued at that moment travels as one
//! [`Command::Batch`] (the command itself when it is alone), and each caller
//! gets its own command's answer back. The leader proposes the batch as it
//! proposes any command, so nothing is acknowledged earlier than before.
//!
//! A batch is all or nothing on the wire: when the call fails or its outcome
//! is unknown, every caller in it sees that failure and repeats its own
//! command, which is safe because every forwarded command is idempotent
//! (`node::is_idempotent`). Commands that are not (none today) and clusters
//! with a member that cannot apply batches are forwarded one by one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::types::{Command, Response};
use crate::cluster::client::RpcError;
use crate::cluster::messages::ForwardResponse;

/// Calls to one leader under way at once: as in `batch.rs`, one would batch
/// the most, two let the next call travel while the previous one commits.
const IN_FLIGHT: usize = 2;

/// Commands in one forwarded batch at most: the leader's `MAX_BATCH`, which
/// counts a forwarded batch with all its commands (`batch.rs`).
const MAX_BATCH: usize = 64;

/// The answer to one forward.
pub type Sent = Result<ForwardResponse, RpcError>;

/// Sends one command (or batch) to the leader at an address.
pub type SendFn =
    Arc<dyn Fn(String, Command) -> Pin<Box<dyn Future<Output = Sent> + Send>> + Send + Sync>;

struct Pending {
    cmd: Command,
    answer: oneshot::Sender<Sent>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    in_flight: usize,
}

/// The forward queues of one node, one per leader address.
pub struct Forwarder {
    send: SendFn,
    queues: Mutex<HashMap<String, Queue>>,
}

impl Forwarder {
    pub fn new(send: SendFn) -> Arc<Self> {
        Arc::new(Self {
            send,
            queues: Mutex::default(),
        })
    }

    /// Forwards `cmd` to the leader at `addr`, together with the other
    /// commands queued for it when `batch` allows (every member applies
    /// batches and `cmd` may be repeated).
    pub async fn forward(self: &Arc<Self>, addr: &str, cmd: Command, batch: bool) -> Sent {
        if !batch {
            return (self.send)(addr.to_string(), cmd).await;
        }
        let (answer, rx) = oneshot::channel();
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let q = queues.entry(addr.to_string()).or_default();
            q.waiting.push(Pending { cmd, answer });
            let start = q.in_flight < IN_FLIGHT;
            if start {
                q.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(run(self.clone(), addr.to_string()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(RpcError::Unreachable {
                addr: addr.to_string(),
                message: "the forward was dropped".into(),
            })
        })
    }
}

/// Sends what is queued for `addr` until nothing is.
async fn run(fwd: Arc<Forwarder>, addr: String) {
    loop {
        // Let the sessions that are ready run first: what they forward now
        // joins this call instead of the next.
        tokio::task::yield_now().await;
        let batch: Vec<Pending> = {
            let mut queues = fwd.queues.lock().unwrap_or_else(|p| p.into_inner());
            let Some(q) = queues.get_mut(&addr) else {
                return;
            };
            if q.waiting.is_empty() {
                q.in_flight -= 1;
                if q.in_flight == 0 {
                    queues.remove(&addr);
                }
                return;
            }
            let n = q.waiting.len().min(MAX_BATCH);
            q.waiting.drain(..n).collect()
        };
        let (cmds, answers): (Vec<Command>, Vec<oneshot::Sender<Sent>>) =
            batch.into_iter().map(|p| (p.cmd, p.answer)).unzip();
        let n = cmds.len();
        let cmd = if n == 1 {
            cmds.into_iter().next().expect("one command")
        } else {
            Command::Batch { cmds }
        };
        let sent = (fwd.send)(addr.clone(), cmd).await;
        for (answer, result) in answers.into_iter().zip(split(sent, n)) {
            let _ = answer.send(result);
        }
    }
}

/// The answer to a batch of `n` commands, one per command.
fn split(sent: Sent, n: usize) -> Vec<Sent> {
    if n == 1 {
        return vec![sent];
    }
    match sent {
        Ok(ForwardResponse::Applied {
            response: Response::Batch { responses },
        }) if responses.len() == n => responses
            .into_iter()
            .map(|response| Ok(ForwardResponse::Applied { response }))
            .collect(),
        Ok(ForwardResponse::Applied { response }) => {
            // Not what a batch is answered with: say so to every caller
            // instead of guessing which answer is whose.
            let message = format!("unexpected answer to a forwarded batch: {response:?}");
            vec![Ok(ForwardResponse::Failed { message }); n]
        }
        other => vec![other; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Semaphore;

    fn revoke(id: &str) -> Command {
        Command::Revoke { id: id.into() }
    }

    /// A leader that answers every command with `Revoked` (a batch with one
    /// `Revoked` per command) once the test lets it, and counts its calls.
    fn leader(
        gate: Arc<Semaphore>,
        calls: Arc<AtomicUsize>,
        sizes: Arc<Mutex<Vec<usize>>>,
    ) -> SendFn {
        Arc::new(move |_addr, cmd| {
            let (gate, calls, sizes) = (gate.clone(), calls.clone(), sizes.clone());
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                gate.acquire().await.unwrap().forget();
                let response = match cmd {
                    Command::Batch { cmds } => {
                        sizes.lock().unwrap().push(cmds.len());
                        Response::Batch {
                            responses: cmds.iter().map(|_| Response::Revoked).collect(),
                        }
                    }
                    _ => {
                        sizes.lock().unwrap().push(1);
                        Response::Revoked
                    }
                };
                Ok(ForwardResponse::Applied { response })
            })
        })
    }

    #[tokio::test]
    async fn forwards_arriving_while_calls_are_under_way_share_the_next_call() {
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let fwd = Forwarder::new(leader(gate.clone(), calls.clone(), sizes.clone()));
        let mut tasks = Vec::new();
        // Two forwards, one after the other, take both slots.
        for i in 0..2 {
            let fwd = fwd.clone();
            tasks.push(tokio::spawn(async move {
                fwd.forward("l", revoke(&i.to_string()), true).await
            }));
            tokio::time::timeout(Duration::from_secs(5), async {
                while calls.load(Ordering::SeqCst) < i + 1 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap();
        }
        // Thirty more queue while both calls are under way.
        for i in 2..32 {
            let fwd = fwd.clone();
            tasks.push(tokio::spawn(async move {
                fwd.forward("l", revoke(&i.to_string()), true).await
            }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let queued = fwd
                    .queues
                    .lock()
                    .unwrap()
                    .get("l")
                    .map_or(0, |q| q.waiting.len());
                if queued == 30 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        gate.add_permits(100);
        for t in tasks {
            let answer = t.await.unwrap();
            assert!(
                matches!(
                    answer,
                    Ok(ForwardResponse::Applied {
                        response: Response::Revoked
                    })
                ),
                "{answer:?}"
            );
        }
        // 32 forwards in three calls: the two first alone, the others in one
        // batch.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let mut sizes = sizes.lock().unwrap().clone();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 1, 30]);
        // The runners find their queue empty and remove it.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !fwd.queues.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("queues are removed when idle");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_forward_in_it_and_unbatched_forwards_go_alone() {
        let fwd = Forwarder::new(Arc::new(|addr, cmd| {
            Box::pin(async move {
                match cmd {
                    Command::Batch { .. } | Command::Revoke { .. } => Err(RpcError::Failed {
                        addr,
                        message: "reset".into(),
                    }),
                    _ => Ok(ForwardResponse::NotLeader { leader: None }),
                }
            })
        }));
        let answers = futures::future::join_all((0..5).map(|i| {
            let fwd = fwd.clone();
            async move { fwd.forward("l", revoke(&i.to_string()), true).await }
        }))
        .await;
        for a in answers {
            assert!(matches!(a, Err(RpcError::Failed { .. })), "{a:?}");
        }
        let alone = fwd.forward("l", Command::Purge { keep_ms: 1 }, false).await;
        assert!(
            matches!(alone, Ok(ForwardResponse::NotLeader { .. })),
            "{alone:?}"
        );
    }

    #[test]
    fn a_batch_answer_of_the_wrong_length_fails_every_caller() {
        let sent = Ok(ForwardResponse::Applied {
            response: Response::Batch {
                responses: vec![Response::Revoked],
            },
        });
        for r in split(sent, 2) {
            assert!(matches!(r, Ok(ForwardResponse::Failed { .. })), "{r:?}");
        }
    }
}
