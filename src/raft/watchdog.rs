//! The background side of failure detection: probes every member each
//! heartbeat and acts on [`Liveness::evaluate`] (see `liveness.rs` for why).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::liveness::Liveness;
use super::types::NodeId;
use super::Node;
use crate::metrics::{Metrics, PeerLabels};

/// Runs until `shutdown`: keeps one probe task per member and, every
/// heartbeat, enables or disables openraft's election timer and starts a
/// campaign when this node should lead next.
pub async fn run(node: Node, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let timing = node.liveness().timing();
    let mut probes: HashMap<NodeId, (String, JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(timing.probe_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut allowed: Option<bool> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let m = node.raft().metrics().borrow().clone();
        let members: Vec<(NodeId, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        probes.retain(|id, (addr, task)| {
            let keep = members.iter().any(|(i, a)| i == id && a == addr);
            if !keep {
                task.abort();
                metrics.cluster_peer_reachable.remove(&PeerLabels {
                    peer: id.to_string(),
                });
            }
            keep
        });
        for (id, addr) in &members {
            if !probes.contains_key(id) {
                let task = tokio::spawn(probe(
                    node.clone(),
                    metrics.clone(),
                    *id,
                    addr.clone(),
                    shutdown.clone(),
                ));
                probes.insert(*id, (addr.clone(), task));
            }
        }
        let ids: Vec<NodeId> = members.iter().map(|(id, _)| *id).collect();
        node.liveness().retain_peers(&ids);

        node.liveness().note_leadership(&m);
        let verdict = node.liveness().evaluate(&m);
        // A node handing over its leadership must not campaign again. A node
        // that has just started must not either: a campaign is a vote for
        // itself, and before the restart it may have acknowledged a leader
        // that still counts on it for its read lease (raft/read_lease.rs).
        let voters = m.membership_config.membership().voter_ids().count();
        let quarantined = voters > 1 && node.read_lease().refuses_votes();
        let want = verdict.elections_allowed && !node.is_stepping_down() && !quarantined;
        if allowed != Some(want) {
            tracing::debug!(elections_allowed = want, "election timer");
            node.raft().runtime_config().elect(want);
            allowed = Some(want);
        }
        if verdict.campaign_now && want {
            tracing::info!(
                leader = ?m.current_leader,
                "leader unreachable and a quorum hears no leader: campaigning now"
            );
            metrics.raft_triggered_elections.inc();
            if let Err(e) = node.raft().trigger().elect().await {
                tracing::warn!(error = %e, "starting an election");
            }
        }
    }
    for (_, (_, task)) in probes {
        task.abort();
    }
}

/// Probes one member every heartbeat with a `Status` call whose deadline is
/// the minimum election timeout, and records what it says.
async fn probe(
    node: Node,
    metrics: Arc<Metrics>,
    peer: NodeId,
    addr: String,
    shutdown: CancellationToken,
) {
    let liveness: Arc<Liveness> = node.liveness().clone();
    let timing = liveness.timing();
    let labels = PeerLabels {
        peer: peer.to_string(),
    };
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = node.peers().status_within(&addr, timing.probe_timeout) => r,
        };
        match &outcome {
            Ok(report) => liveness.record_probe(peer, Some(report)),
            Err(e) => {
                tracing::trace!(peer, error = %e, "probe failed");
                liveness.record_probe(peer, None);
            }
        }
        metrics
            .cluster_peer_reachable
            .get_or_create(&labels)
            .set(i64::from(liveness.reachable(peer)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(started + timing.probe_every) => {}
        }
    }
}
