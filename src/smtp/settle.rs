//! Settling reservations: every use a session holds ends committed (the
//! upstream accepted the message) or released, even when Raft is briefly
//! unavailable or the node is shutting down.
//!
//! - A Commit that fails after the upstream accepted is retried in the
//!   background (it is idempotent) until the reservation's lease would end:
//!   if it lapsed uncounted, the use would come back and the alias could
//!   forward one message more than its limit.
//! - Reservations still held when shutdown gives up on a session are released
//!   before Raft stops, instead of staying held for a whole lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::task::TaskTracker;

use crate::raft::{Command, Node};

/// One use held by a session of this node.
#[derive(Debug, Clone)]
struct Held {
    alias_id: String,
}

/// Reservations held on this node and commits still being retried.
#[derive(Default)]
pub struct Settlements {
    held: Mutex<HashMap<u64, Held>>,
    retries: TaskTracker,
}

impl Settlements {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reservation was taken for a session of this node.
    pub fn hold(&self, alias_id: &str, reservation: u64) {
        self.lock().insert(
            reservation,
            Held {
                alias_id: alias_id.to_string(),
            },
        );
    }

    /// Commits a reservation (the message is safe upstream). On failure the
    /// commit is retried in the background until `lease_ends`.
    pub async fn commit(&self, node: &Node, alias_id: &str, reservation: u64, lease_ends: Instant) {
        // From here on the use is the commit's: shutdown must not release it.
        self.lock().remove(&reservation);
        let cmd = Command::Commit {
            id: alias_id.to_string(),
            reservation,
        };
        let Err(e) = node.write(cmd.clone()).await else {
            return;
        };
        tracing::warn!(alias = %alias_id, error = %e, "commit failed; retrying in the background until the lease ends");
        let node = node.clone();
        let alias = alias_id.to_string();
        self.retries.spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                if Instant::now() + pause >= lease_ends {
                    tracing::error!(
                        alias = %alias,
                        "commit not settled before the lease ended: this message is not counted"
                    );
                    return;
                }
                tokio::time::sleep(pause).await;
                match node.write(cmd.clone()).await {
                    Ok(_) => {
                        tracing::info!(alias = %alias, "commit settled on retry");
                        return;
                    }
                    Err(e) => tracing::debug!(alias = %alias, error = %e, "commit retry failed"),
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// [`Settlements::commit`] in the background, for a session that has
    /// already answered (`smtp.reply_before_commit`). The use leaves the
    /// held set now, so shutdown does not release it, and the task is
    /// tracked with the retries, so shutdown waits for it.
    pub fn commit_later(
        self: &Arc<Self>,
        node: &Node,
        alias_id: &str,
        reservation: u64,
        lease_ends: Instant,
    ) {
        self.lock().remove(&reservation);
        let (this, node, alias) = (self.clone(), node.clone(), alias_id.to_string());
        self.retries.spawn(async move {
            this.commit(&node, &alias, reservation, lease_ends).await;
        });
    }

    /// Gives a held use back. A failed release leaves the lease to lapse.
    pub async fn release(&self, node: &Node, alias_id: &str, reservation: u64, lease_ms: u64) {
        self.lock().remove(&reservation);
        let cmd = Command::Release {
            id: alias_id.to_string(),
            reservation,
            lease_ms,
        };
        if let Err(e) = node.write(cmd).await {
            tracing::warn!(alias = %alias_id, error = %e, "release failed; the use returns when its lease lapses");
        }
    }

    /// For shutdown: waits (at most `limit`) for commits being retried, then
    /// releases every use still held by sessions that did not finish.
    pub async fn drain(&self, node: &Node, lease_ms: u64, limit: Duration) {
        self.retries.close();
        if tokio::time::timeout(limit, self.retries.wait())
            .await
            .is_err()
        {
            tracing::warn!("commits still being retried at shutdown; their leases will lapse");
        }
        let held: Vec<(u64, Held)> = self.lock().drain().collect();
        if held.is_empty() {
            return;
        }
        tracing::info!(
            count = held.len(),
            "releasing uses held by unfinished sessions"
        );
        let releases = held.iter().map(|(reservation, h)| {
            node.write(Command::Release {
                id: h.alias_id.clone(),
                reservation: *reservation,
                lease_ms,
            })
        });
        let _ = tokio::time::timeout(limit, futures::future::join_all(releases)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::{Config, Secret};
    use crate::raft::Response;

    /// A one-node cluster of its own, leader once this returns.
    async fn one_node(dir: &std::path::Path) -> Node {
        let mut config = Config {
            node_id: 1,
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        config.cluster.listen = "127.0.0.1:1".to_string();
        let members: BTreeMap<_, _> = [(1, config.cluster.listen.clone())].into();
        let peers = crate::cluster::client::Peers::new(
            &Secret::new("settle test secret"),
            Duration::from_secs(1),
        )
        .unwrap();
        let node = Node::start(
            &config,
            Arc::new(crate::clock::SystemClock::default()),
            peers,
            Arc::new(crate::metrics::Metrics::new()),
        )
        .await
        .unwrap();
        node.form_cluster(members, CancellationToken::new()).await;
        node
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_commit_handed_over_after_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let node = one_node(dir.path()).await;
        let create = Command::CreateAlias {
            id: "settletest01".into(),
            domain: "t.example".into(),
            target: "me@example.net".into(),
            token_hash: "h".into(),
            valid_for_ms: 3_600_000,
            max_usage: 2,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.write(create.clone()).await.is_err() {
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reserved = node
            .write(Command::Reserve {
                id: "settletest01".into(),
                lease_ms: 60_000,
                reservation: 7,
            })
            .await
            .unwrap();
        assert!(
            matches!(reserved, Response::Reserved { .. }),
            "{reserved:?}"
        );
        let settlements = Arc::new(Settlements::new());
        settlements.hold("settletest01", 7);

        // The session answered 250 and handed the commit over; shutdown
        // comes at once.
        let lease_ends = Instant::now() + Duration::from_secs(60);
        settlements.commit_later(&node, "settletest01", 7, lease_ends);
        settlements
            .drain(&node, 60_000, Duration::from_secs(10))
            .await;

        // Counted, not released: shutdown waited for it.
        let rec = node.reader().alias("settletest01").unwrap().unwrap();
        assert_eq!((rec.used, rec.max_usage), (1, 2), "{rec:?}");
    }
}
