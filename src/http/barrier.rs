//! Read barriers shared by concurrent status reads.
//!
//! Every `GET /v1/aliases/{id}` must see every write acknowledged before it
//! arrived, so it waits for a read barrier (a quorum round on the leader, a
//! `ReadIndex` RPC from a follower). One barrier per request makes the
//! leader's quorum rounds the bottleneck of status reads. A barrier that
//! *starts* after a request arrived serves that request just as well as one
//! of its own, so requests are grouped: while one barrier runs, arriving
//! requests queue for the next, which starts when the running one ends and
//! answers all of them. Under load that is one barrier per round trip instead
//! of one per request; a lone request still gets its own barrier at once.
//!
//! The barriers run in a task of their own, so a request that gives up
//! (client gone, request timeout) never strands the others.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::raft::Node;

type Waiter = oneshot::Sender<Result<(), String>>;

/// The queue of requests waiting for the next barrier.
#[derive(Default)]
pub struct Barriers {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A task is running barriers.
    running: bool,
    /// Requests that arrived since the running barrier started.
    next: Vec<Waiter>,
}

impl Barriers {
    /// Waits until this replica has applied everything committed before the
    /// call (see [`Node::read_barrier`]).
    ///
    /// # Errors
    /// Why no barrier completed (no leader or quorum in time).
    pub async fn wait(self: &Arc<Self>, node: &Node) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.next.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            tokio::spawn(run(self.clone(), node.clone()));
        }
        rx.await
            .unwrap_or_else(|_| Err("read barrier abandoned".into()))
    }
}

/// Runs barriers until no request is waiting.
async fn run(barriers: Arc<Barriers>, node: Node) {
    loop {
        let batch = {
            let mut s = barriers.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.next.is_empty() {
                s.running = false;
                return;
            }
            std::mem::take(&mut s.next)
        };
        // Every request in `batch` arrived before this barrier starts.
        let result = node.read_barrier().await.map_err(|e| e.to_string());
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}
