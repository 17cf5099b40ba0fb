//! Raft's view of the network: openraft RPCs carried by the cluster gRPC client.
//!
//! Errors are classified the way openraft expects: a peer that cannot be
//! reached is `Unreachable` (openraft backs off), a peer that answered with a
//! Raft error is a `RemoteError`, anything else is a `Network` error.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::follower_lease::LeaseGate;
use super::types::{NodeId, TypeConfig};
use crate::cluster::client::{Peers, RpcError};
use crate::metrics::{Metrics, PeerLabels};

/// How long the last snapshot chunk may take: its answer comes once the
/// receiver has installed the whole snapshot, one write transaction over
/// every record. A store of a million aliases took 10.6-12.7 s to install
/// on a loaded two-core machine; with the former 10 s the leader gave up
/// on an install that was about to succeed and sent the whole snapshot
/// again. This bound leaves room for several million aliases.
pub const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long any other snapshot chunk may take (it is written to a file).
pub const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound for one snapshot chunk: openraft's `hard_ttl` (set from
/// [`SNAPSHOT_INSTALL_TIMEOUT`]) for the last chunk, whose answer waits for
/// the install, at most [`SNAPSHOT_CHUNK_TIMEOUT`] for the others.
fn snapshot_chunk_timeout(last: bool, hard_ttl: Duration) -> Duration {
    if last {
        hard_ttl
    } else {
        hard_ttl.min(SNAPSHOT_CHUNK_TIMEOUT)
    }
}

/// Creates a connection object per peer; channels are cached in [`Peers`].
#[derive(Clone)]
pub struct Network {
    pub peers: Peers,
    pub metrics: Arc<Metrics>,
    /// Lowers the committed index sent to followers to what every follower
    /// lease holder has (`follower_lease.rs`).
    pub lease_gate: Arc<LeaseGate>,
}

/// Raft's handle on one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    peers: Peers,
    metrics: Arc<Metrics>,
    lease_gate: Arc<LeaseGate>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            metrics: self.metrics.clone(),
            lease_gate: self.lease_gate.clone(),
        }
    }
}

impl PeerConnection {
    fn timeout(&self, option: &RPCOption) -> Duration {
        option
            .hard_ttl()
            .min(self.peers.timeout().max(Duration::from_millis(50)))
    }

    /// Maps a transport outcome to openraft's error shape, counting failures.
    /// (The error type is openraft's, so its size is not ours to change.)
    #[allow(clippy::result_large_err)]
    fn map<T, E>(
        &self,
        result: Result<Result<T, RaftError<NodeId, E>>, RpcError>,
    ) -> Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error,
    {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => {
                self.metrics
                    .cluster_rpc_errors
                    .get_or_create(&PeerLabels {
                        peer: self.target.to_string(),
                    })
                    .inc();
                match e {
                    RpcError::Unreachable { .. } => {
                        Err(RPCError::Unreachable(Unreachable::new(&e)))
                    }
                    _ => Err(RPCError::Network(NetworkError::new(&e))),
                }
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        rpc.leader_commit = self.lease_gate.clamp_commit(rpc.leader_commit);
        let r = self
            .peers
            .append_entries(&self.addr, &rpc, self.timeout(&option))
            .await;
        // What the peer now has, known here before openraft's metrics say
        // it (the lease gate waits for it).
        let matched = match &r {
            Ok(Ok(AppendEntriesResponse::Success)) => {
                rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id)
            }
            Ok(Ok(AppendEntriesResponse::PartialSuccess(m))) => *m,
            _ => None,
        };
        if let Some(matched) = matched {
            self.lease_gate.acknowledged(self.target, rpc.vote, matched);
        }
        self.map(r)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        // Snapshot chunks may take longer than a heartbeat-sized RPC. Only
        // the last one waits for the install (openraft's `hard_ttl`, see
        // `SNAPSHOT_INSTALL_TIMEOUT`); a chunk that is only written to a file
        // keeps the shorter bound, so a peer that hangs mid-transfer is
        // noticed as soon as before.
        let timeout = snapshot_chunk_timeout(rpc.done, option.hard_ttl());
        let r = self.peers.install_snapshot(&self.addr, &rpc, timeout).await;
        self.map(r)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let r = self
            .peers
            .vote(&self.addr, &rpc, self.timeout(&option))
            .await;
        self.map(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_snapshot_chunk_waits_for_the_install() {
        let ttl = SNAPSHOT_INSTALL_TIMEOUT;
        assert_eq!(snapshot_chunk_timeout(true, ttl), SNAPSHOT_INSTALL_TIMEOUT);
        assert_eq!(snapshot_chunk_timeout(false, ttl), SNAPSHOT_CHUNK_TIMEOUT);
        // A shorter openraft bound is never lengthened.
        let short = Duration::from_secs(2);
        assert_eq!(snapshot_chunk_timeout(false, short), short);
        assert_eq!(snapshot_chunk_timeout(true, short), short);
        assert!(SNAPSHOT_INSTALL_TIMEOUT > SNAPSHOT_CHUNK_TIMEOUT);
    }
}
