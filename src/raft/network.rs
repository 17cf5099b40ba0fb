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

use super::types::{NodeId, TypeConfig};
use crate::cluster::client::{Peers, RpcError};
use crate::metrics::{Metrics, PeerLabels};

/// Creates a connection object per peer; channels are cached in [`Peers`].
#[derive(Clone)]
pub struct Network {
    pub peers: Peers,
    pub metrics: Arc<Metrics>,
}

/// Raft's handle on one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    peers: Peers,
    metrics: Arc<Metrics>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            metrics: self.metrics.clone(),
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
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let r = self
            .peers
            .append_entries(&self.addr, &rpc, self.timeout(&option))
            .await;
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
        // Snapshot chunks may take longer than a heartbeat-sized RPC.
        let r = self
            .peers
            .install_snapshot(&self.addr, &rpc, option.hard_ttl())
            .await;
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
