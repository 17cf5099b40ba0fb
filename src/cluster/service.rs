//! The inbound side of cluster RPC.
//!
//! Every call must carry the cluster secret; a call without it is refused with
//! `UNAUTHENTICATED` and counted, before any payload is decoded.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};

use super::messages::{ForwardRequest, MembershipChange, ReadIndexResponse};
use super::proto::cluster_server::{Cluster, ClusterServer};
use super::proto::{Empty, Payload};
use crate::config::Secret;
use crate::maintenance::{Maintenance, MaintenanceRequest};
use crate::metrics::Metrics;
use crate::raft::types::NodeId;
use crate::raft::{Node, TypeConfig};

/// Handlers of the cluster RPCs on one node.
pub struct ClusterService {
    node: Node,
    metrics: Arc<Metrics>,
    maintenance: Arc<Maintenance>,
}

fn decode<T: DeserializeOwned>(req: Request<Payload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<Payload>, Status> {
    serde_json::to_vec(value)
        .map(|json| Response::new(Payload { json }))
        .map_err(|e| Status::internal(format!("cannot encode answer: {e}")))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        let from = rpc.vote.leader_id().voted_for();
        if let Some(from) = from {
            let refuse = {
                let rx = self.node.raft().metrics();
                let m = rx.borrow();
                self.node.liveness().refuse_leader(from, &m)
            };
            if refuse {
                // This node cannot reach its leader (a one-way partition):
                // following it would leave every write taken here stuck. Not
                // processing its heartbeats lets the lease lapse so that the
                // nodes that can talk to each other elect a leader.
                self.metrics.raft_refused_appends.inc();
                return Err(Status::failed_precondition(
                    "this node cannot reach you; not following",
                ));
            }
        }
        let answer = self.node.raft().append_entries(rpc).await;
        if let (Some(from), Ok(resp)) = (from, &answer) {
            if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                self.node.liveness().record_contact(from);
            }
        }
        encode(&answer)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        if self.node.read_lease().refuses_votes() {
            // Before this process started, this node may have accepted a
            // leader's heartbeat that the leader counts on for its read
            // lease (raft/read_lease.rs); openraft forgot that on restart,
            // so this node waits out such a lease before it votes.
            return Err(Status::unavailable(
                "this node has just started and does not vote yet",
            ));
        }
        let rpc: VoteRequest<NodeId> = decode(req)?;
        // Granting a vote may end this node's leadership: its read lease
        // ends before openraft sees the request, and no lease round that
        // overlaps it grants one (raft/read_lease.rs).
        let _no_lease = self.node.read_lease().suspend();
        // openraft grants a vote only if it is at least this node's own; an
        // equal one is a candidate's repeated request, for which the leases
        // were ended the first time. So only a higher vote waits.
        let current = self.node.raft().metrics().borrow().vote;
        if rpc.vote > current {
            // A vote may elect a leader that does not know this node's
            // follower lease; and the holders of leases this node granted
            // count on it leading until they end (raft/follower_lease.rs).
            self.node.follower_lease().drop_lease();
            if let Some(end) = self
                .node
                .read_lease()
                .granted_until(tokio::time::Instant::now())
            {
                tokio::time::sleep_until(end).await;
            }
        }
        encode(&self.node.raft().vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(req)?;
        encode(&self.node.raft().install_snapshot(rpc).await)
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let fwd: ForwardRequest = decode(req)?;
        encode(&self.node.write_as_leader(fwd.cmd).await)
    }

    async fn read_index(&self, req: Request<Empty>) -> Result<Response<Payload>, Status> {
        if self.node.is_stepping_down() {
            return encode(&ReadIndexResponse {
                index: None,
                error: Some("stepping down".into()),
                lease_ms: None,
            });
        }
        let asker = req
            .metadata()
            .get(super::client::LEASE_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        // The asking follower gives up after one forward attempt.
        let limit = crate::raft::node::FORWARD_ATTEMPT;
        let answer = match self.node.read_index_for(asker, limit).await {
            Ok((index, lease)) => ReadIndexResponse {
                index,
                error: None,
                lease_ms: lease.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
            },
            Err(e) => ReadIndexResponse {
                index: None,
                error: Some(e.to_string()),
                lease_ms: None,
            },
        };
        encode(&answer)
    }

    async fn status(&self, _req: Request<Empty>) -> Result<Response<Payload>, Status> {
        encode(&self.node.status())
    }

    async fn change_membership(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let change: MembershipChange = decode(req)?;
        encode(&self.node.change_membership(change).await)
    }

    async fn trigger_election(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        if self.node.read_lease().refuses_votes() {
            // A campaign is a vote for this node itself: refused for as long
            // as a vote for anyone else is (see `vote`).
            return Err(Status::unavailable(
                "this node has just started and does not campaign yet",
            ));
        }
        self.node
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn maintenance(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let req: MaintenanceRequest = decode(req)?;
        encode(&crate::maintenance::handle(&self.maintenance, &self.node, &req).await)
    }
}

/// Compares without an early exit, so timing does not reveal the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves cluster RPC on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The transport error if the server fails.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    maintenance: Arc<Maintenance>,
    secret: Secret,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let expected = format!("Bearer {}", secret.expose()).into_bytes();
    let service_metrics = metrics.clone();
    let check = move |req: Request<()>| -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or(b"");
        if constant_time_eq(presented, &expected) {
            Ok(req)
        } else {
            metrics.cluster_auth_failures.inc();
            tracing::warn!(peer = ?req.remote_addr(), "cluster RPC without the right secret refused");
            Err(Status::unauthenticated("cluster secret required"))
        }
    };
    let server = ClusterServer::new(ClusterService {
        node,
        metrics: service_metrics,
        maintenance,
    })
    .max_decoding_message_size(super::MAX_MESSAGE)
    .max_encoding_message_size(super::MAX_MESSAGE);
    let service = tonic::service::interceptor::InterceptedService::new(server, check);
    // tonic's own TCP_NODELAY applies only to listeners it binds itself; set
    // it on every accepted stream, or Nagle + delayed ACK add ~40 ms per RPC.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        },
    );
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(256)
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!constant_time_eq(b"", b"Bearer abc"));
    }
}
