//! `/readyz` with a cached verdict.
//!
//! A readiness check on a follower costs a `ReadIndex` RPC to the leader, and
//! on the leader a heartbeat round to a quorum. Balancers, monitors and
//! curious clients may probe every node often; each probe must not cost the
//! leader a quorum round. So a verdict is reused for [`MAX_AGE`], and while one
//! probe refreshes it the others wait for that result instead of starting
//! their own (no lock is held across the check: a flag elects the refresher,
//! a watch channel hands out its result).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::Metrics;
use crate::raft::Node;

/// Ready when the store reads, a quorum-confirmed leader is known and the
/// node is not drained for maintenance. The first two come from the cached
/// verdict; maintenance is read every time.
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let limit = Duration::from_millis(state.config.cluster.election_timeout_ms);
    let v = state
        .readiness
        .get(&state.node, &state.metrics, limit)
        .await;
    let maintenance = state.maintenance.draining();
    let ready = v.store && v.leader && !maintenance;
    let body = serde_json::json!({
        "ready": ready,
        "store": v.store,
        "leader": v.leader,
        "maintenance": maintenance,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// How long one verdict is served.
pub const MAX_AGE: Duration = Duration::from_millis(250);

/// One readiness check's result.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub at: Instant,
    pub store: bool,
    pub leader: bool,
}

/// The cache shared by all `/readyz` requests of a node.
pub struct Readiness {
    latest: watch::Sender<Option<Verdict>>,
    refreshing: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            latest: watch::Sender::new(None),
            refreshing: AtomicBool::new(false),
        }
    }
}

/// Clears the refreshing flag however the refresh ends (also when the
/// request that runs it is dropped mid-check).
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Readiness {
    fn fresh(&self) -> Option<Verdict> {
        (*self.latest.borrow()).filter(|v| v.at.elapsed() < MAX_AGE)
    }

    /// The current verdict: cached if younger than [`MAX_AGE`], else checked
    /// now (by this request or by the one already checking). `limit` bounds
    /// the read barrier.
    pub async fn get(&self, node: &Node, metrics: &Metrics, limit: Duration) -> Verdict {
        if let Some(v) = self.fresh() {
            return v;
        }
        let mut rx = self.latest.subscribe();
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Someone else is checking: wait for their answer.
            rx.mark_unchanged();
            let waited = tokio::time::timeout(limit + MAX_AGE, rx.changed()).await;
            if let (Ok(Ok(())), Some(v)) = (waited, *rx.borrow()) {
                return v;
            }
        }
        let _flag = Refreshing(&self.refreshing);
        metrics.readiness_checks.inc();
        let store = node.reader().alias("readyz-probe").is_ok();
        let leader = node.is_ready(limit).await;
        let v = Verdict {
            at: Instant::now(),
            store,
            leader,
        };
        self.latest.send_replace(Some(v));
        v
    }
}
