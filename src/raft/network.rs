//! How this node reaches its Raft peers.
//!
//! A one-member cluster never sends a Raft RPC, so this network only has to say
//! that no peer is reachable. The gRPC transport for multi-node clusters plugs
//! in here, behind the same `RaftNetworkFactory` seam, without touching the
//! store or the front ends.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::types::{NodeId, TypeConfig};

/// Network factory of a node that has no transport to peers.
#[derive(Debug, Clone, Default)]
pub struct NoPeers;

/// The (never connected) client to one peer.
#[derive(Debug)]
pub struct NoPeer {
    target: NodeId,
}

#[derive(Debug, thiserror::Error)]
#[error("node {0} is unreachable: this node has no peer transport")]
struct NoTransport(NodeId);

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        NoPeer { target }
    }
}

impl NoPeer {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&NoTransport(self.target)))
    }
}

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
