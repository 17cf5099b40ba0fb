//! Read barriers shared by concurrent status reads.
//!
//! Every `GET /v1/aliases/{id}` must see every write acknowledged before it
//! arrived, so it waits for a read barrier (a quorum round on the leader, a
//! `ReadIndex` RPC from a follower). One barrier per request makes the
//! leader's quorum rounds the bottleneck of status reads. A barrier that
//! *starts* after a request arrived serves that request just as well as one
//! of its own, so requests are grouped: while a barrier runs, arriving
//! requests queue for the next, which starts when the running one ends, or
//! at once when a crowd ([`CROWD`]) is waiting and fewer than [`IN_FLIGHT`]
//! run, and answers all of them. Under load that is a few barriers per round
//! trip instead of one per request; a lone request still gets its own barrier
//! at once.
//!
//! The barriers run in a task of their own, so a request that gives up
//! (client gone, request timeout) never strands the others.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::raft::Node;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Barriers in flight at once on this node.
const IN_FLIGHT: usize = 3;

/// Requests that must be waiting before a barrier starts while another one
/// is still in flight. A lone request waits for the running barrier to end
/// (one `ReadIndex` round trip at most); a crowd gets a barrier of its own at
/// once, so under load a request waits about one round trip instead of one
/// and a half, while a barrier still answers several requests.
const CROWD: usize = 8;

/// The queue of requests waiting for the next barrier.
#[derive(Default)]
pub struct Barriers {
    state: Mutex<State>,
    /// Barriers run so far (also exported as `tempalias_http_read_barriers_total`).
    rounds: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Barrier tasks running.
    in_flight: usize,
    /// Requests that arrived since the last barrier started.
    next: Vec<Waiter>,
}

impl State {
    /// Whether to start one more barrier task for the requests in `next`
    /// (and counts it if so).
    fn start_another(&mut self) -> bool {
        let start = !self.next.is_empty()
            && (self.in_flight == 0 || (self.in_flight < IN_FLIGHT && self.next.len() >= CROWD));
        if start {
            self.in_flight += 1;
        }
        start
    }
}

impl Barriers {
    /// Waits until this replica has applied everything committed before the
    /// call (see [`Node::read_barrier`]).
    ///
    /// # Errors
    /// Why no barrier completed (no leader or quorum in time).
    pub async fn wait(self: &Arc<Self>, node: &Node, metrics: &Arc<Metrics>) -> Result<(), String> {
        // A leader within its read lease, or a follower within its follower
        // lease that has applied its log, needs no barrier at all.
        if node.lease_read() || node.follower_lease_read() {
            return Ok(());
        }
        let (node, metrics) = (node.clone(), metrics.clone());
        self.wait_with(move || {
            let node = node.clone();
            metrics.http_read_barriers.inc();
            async move { node.read_barrier().await.map_err(|e| e.to_string()) }
        })
        .await
    }

    /// [`Barriers::wait`] with the barrier given as a function (tests).
    async fn wait_with<F, Fut>(self: &Arc<Self>, barrier: F) -> Result<(), String>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.next.push(tx);
            s.start_another()
        };
        if start {
            tokio::spawn(run(self.clone(), barrier));
        }
        rx.await
            .unwrap_or_else(|_| Err("read barrier abandoned".into()))
    }

    /// Barriers run so far.
    #[cfg(test)]
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }
}

/// Runs barriers while requests wait and no other task should take them.
async fn run<F, Fut>(barriers: Arc<Barriers>, barrier: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    loop {
        // Let the connections that are ready to run first: requests they
        // parse now join this barrier instead of waiting for the next one.
        // Under load that makes batches larger (fewer `ReadIndex` round
        // trips for the same reads) at the cost of one pass of the run queue.
        tokio::task::yield_now().await;
        let batch = {
            let mut s = barriers.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut s.next)
        };
        if !batch.is_empty() {
            // Every request in `batch` arrived before this barrier starts.
            barriers.rounds.fetch_add(1, Ordering::Relaxed);
            // A panicking barrier must not keep its slot (a lone request
            // would then wait for a barrier that never ends): it fails its
            // batch like any other failed barrier.
            let result = AssertUnwindSafe(barrier())
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err("read barrier failed".into()));
            for waiter in batch {
                let _ = waiter.send(result.clone());
            }
        }
        let mut s = barriers.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight -= 1;
        if !s.start_another() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// A barrier that waits for a permit, so the test decides when each
    /// round ends.
    fn gated(
        gate: &Arc<Semaphore>,
        calls: &Arc<AtomicU64>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + 'static
    {
        let (gate, calls) = (gate.clone(), calls.clone());
        move || {
            let gate = gate.clone();
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                Ok(())
            })
        }
    }

    /// Waits until no barrier task runs.
    async fn all_done(barriers: &Barriers) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while barriers.state.lock().unwrap().in_flight > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    /// Starts one read with the gated barrier and waits until its barrier
    /// runs.
    async fn first_read(
        barriers: &Arc<Barriers>,
        gate: &Arc<Semaphore>,
        calls: &Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let first = tokio::spawn({
            let (b, f) = (barriers.clone(), gated(gate, calls));
            async move { b.wait_with(f).await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        first
    }

    fn reads(
        n: usize,
        barriers: &Arc<Barriers>,
        gate: &Arc<Semaphore>,
        calls: &Arc<AtomicU64>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), String>>> {
        (0..n)
            .map(|_| {
                let (b, f) = (barriers.clone(), gated(gate, calls));
                tokio::spawn(async move { b.wait_with(f).await })
            })
            .collect()
    }

    #[tokio::test]
    async fn a_few_reads_arriving_during_a_barrier_share_the_next_one() {
        let barriers = Arc::new(Barriers::default());
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let first = first_read(&barriers, &gate, &calls).await;
        // Fewer than a crowd arrive while it runs: they queue.
        let later = reads(CROWD - 1, &barriers, &gate, &calls);
        tokio::time::timeout(Duration::from_secs(5), async {
            while barriers.state.lock().unwrap().next.len() < CROWD - 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!first.is_finished());
        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Ok(()));
        for r in later {
            assert_eq!(r.await.unwrap(), Ok(()));
        }
        // The running barrier, then one for all the others (which all
        // arrived before it started).
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(barriers.rounds(), 2);
    }

    #[tokio::test]
    async fn a_crowd_gets_a_barrier_without_waiting_for_the_running_one() {
        let barriers = Arc::new(Barriers::default());
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let first = first_read(&barriers, &gate, &calls).await;
        let later = reads(50, &barriers, &gate, &calls);
        // While the first barrier is still held, every later read has been
        // taken by a barrier of its own batch, and no more than
        // `IN_FLIGHT` run at once.
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let queued = barriers.state.lock().unwrap().next.len();
                if queued == 0 && calls.load(Ordering::SeqCst) >= 2 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(!first.is_finished());
        let running = calls.load(Ordering::SeqCst);
        assert!((2..=IN_FLIGHT as u64).contains(&running), "{running}");
        assert!(barriers.state.lock().unwrap().in_flight <= IN_FLIGHT);
        gate.add_permits(IN_FLIGHT);
        assert_eq!(first.await.unwrap(), Ok(()));
        for r in later {
            assert_eq!(r.await.unwrap(), Ok(()));
        }
        assert_eq!(barriers.rounds(), calls.load(Ordering::SeqCst));
        all_done(&barriers).await;
    }

    #[tokio::test]
    async fn a_panicking_barrier_fails_its_reads_and_frees_its_slot() {
        let barriers = Arc::new(Barriers::default());
        let r = barriers.wait_with(|| async { panic!("barrier bug") }).await;
        assert_eq!(r, Err("read barrier failed".to_string()));
        all_done(&barriers).await;
        // A lone read afterwards gets a barrier at once.
        assert_eq!(barriers.wait_with(|| async { Ok(()) }).await, Ok(()));
    }

    #[tokio::test]
    async fn a_failed_barrier_fails_every_read_that_waited_for_it() {
        let barriers = Arc::new(Barriers::default());
        let r = barriers
            .wait_with(|| async { Err::<(), _>("no quorum".to_string()) })
            .await;
        assert_eq!(r, Err("no quorum".to_string()));
        // The runner (which keeps its barrier function) is done first.
        all_done(&barriers).await;
        // A later read gets a barrier of its own.
        assert_eq!(barriers.wait_with(|| async { Ok(()) }).await, Ok(()));
        assert_eq!(barriers.rounds(), 2);
    }
}
