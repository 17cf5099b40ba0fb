//! The outbound side of cluster RPC: one cached client per peer address (over
//! one HTTP/2 connection, [`super::channel`]), the shared secret on every
//! call, a timeout on every call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Code, Status};

use super::channel::{PeerChannel, Target};
use super::messages::{
    ForwardRequest, ForwardResponse, MembershipChange, MembershipResponse, ReadIndexResponse,
    StatusReport,
};
use super::proto::cluster_client::ClusterClient;
use super::proto::{Empty, Payload};
use crate::config::Secret;
use crate::raft::types::{NodeId, TypeConfig};

/// Metadata of a `ReadIndex` call naming the node that asks for a follower
/// lease with the answer (`raft/follower_lease.rs`). A header rather than a
/// request field: the request is `Empty`, and older leaders ignore headers
/// they do not know.
pub const LEASE_FOR: &str = "x-tempalias-lease-for";

/// Why an RPC gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached; the request was (most likely) not seen.
    #[error("{addr} unreachable: {message}")]
    Unreachable { addr: String, message: String },
    /// The peer refused our secret: a misconfigured node, never retried.
    #[error("{addr} refused the cluster secret")]
    Unauthenticated { addr: String },
    /// The call failed after it may have been processed (timeout, reset).
    #[error("{addr}: {message}")]
    Failed { addr: String, message: String },
    #[error("cannot use address {addr}: {message}")]
    BadAddress { addr: String, message: String },
    #[error("undecodable payload: {0}")]
    Codec(String),
}

impl RpcError {
    fn from_status(addr: &str, s: Status) -> Self {
        let addr = addr.to_string();
        match s.code() {
            Code::Unavailable => RpcError::Unreachable {
                addr,
                message: s.message().to_string(),
            },
            Code::Unauthenticated => RpcError::Unauthenticated { addr },
            _ => RpcError::Failed {
                addr,
                message: format!("{:?}: {}", s.code(), s.message()),
            },
        }
    }
}

/// `call` bounded on our side: the `grpc-timeout` header binds only the
/// peer, and a peer that queues the request before its own timer starts
/// would otherwise keep the caller waiting. A little slack lets the peer's
/// own `DeadlineExceeded` arrive first when it can.
async fn within<T>(
    addr: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(timeout + Duration::from_millis(100), call).await {
        Err(_) => Err(RpcError::Failed {
            addr: addr.to_string(),
            message: format!("no answer within {timeout:?}"),
        }),
        Ok(r) => r.map_err(|s| RpcError::from_status(addr, s)),
    }
}

/// Adds `authorization: Bearer <secret>` to every outgoing call.
#[derive(Clone)]
pub struct AuthInterceptor {
    header: MetadataValue<Ascii>,
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(req)
    }
}

type Client = ClusterClient<InterceptedService<PeerChannel, AuthInterceptor>>;

/// Channels to peers, shared by Raft replication, write forwarding and the CLI.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    /// Address -> client. Its connection is replaced by itself when it dies,
    /// so one per peer serves for the life of the process; calls clone it.
    clients: Mutex<HashMap<String, Client>>,
    auth: AuthInterceptor,
    timeout: Duration,
    /// Source address of outgoing connections: a node's own cluster address,
    /// so that peers (and firewalls) see every node under one address.
    local: Option<IpAddr>,
}

impl Peers {
    /// # Errors
    /// [`RpcError::Codec`] when the secret cannot be sent as a header value.
    pub fn new(secret: &Secret, timeout: Duration) -> Result<Self, RpcError> {
        let header = format!("Bearer {}", secret.expose())
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| RpcError::Codec("the cluster secret must be printable ASCII".into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                clients: Mutex::new(HashMap::new()),
                auth: AuthInterceptor { header },
                timeout,
                local: None,
            }),
        })
    }

    /// The same peers, with outgoing connections bound to `ip` (a node binds
    /// them to the address of its own cluster listener; unspecified
    /// addresses leave the choice to the kernel).
    pub fn with_local_address(self, ip: Option<IpAddr>) -> Self {
        Self {
            inner: Arc::new(Inner {
                clients: Mutex::new(HashMap::new()),
                auth: self.inner.auth.clone(),
                timeout: self.inner.timeout,
                local: ip.filter(|ip| !ip.is_unspecified()),
            }),
        }
    }

    /// The source address for a connection to `addr`: this node's own, when
    /// the peer is an address of the same family (a name, or the other
    /// family, is left to the kernel, which would refuse such a binding).
    fn local_for(&self, addr: &str) -> Option<IpAddr> {
        let local = self.inner.local?;
        let peer: std::net::SocketAddr = addr.parse().ok()?;
        (peer.is_ipv4() == local.is_ipv4()).then_some(local)
    }

    /// The default per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn client(&self, addr: &str) -> Result<Client, RpcError> {
        let mut clients = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let origin = format!("http://{addr}")
            .parse::<tonic::codegen::http::Uri>()
            .map_err(|e| RpcError::BadAddress {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
        if origin.authority().is_none() || origin.path() != "/" {
            return Err(RpcError::BadAddress {
                addr: addr.to_string(),
                message: "expected host:port".into(),
            });
        }
        // Connected by the first call, not here.
        let channel = PeerChannel::new(Target {
            addr: addr.to_string(),
            local: self.local_for(addr),
            connect_timeout: self.inner.timeout.min(Duration::from_secs(1)),
        });
        let client = ClusterClient::with_origin(
            InterceptedService::new(channel, self.inner.auth.clone()),
            origin,
        )
        .max_decoding_message_size(super::MAX_MESSAGE)
        .max_encoding_message_size(super::MAX_MESSAGE);
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// One unary call with a JSON payload.
    async fn call<Req, Resp, F, Fut>(
        &self,
        addr: &str,
        req: &Req,
        timeout: Duration,
        f: F,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(Client, tonic::Request<Payload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Payload>, Status>>,
    {
        let json = serde_json::to_vec(req).map_err(|e| RpcError::Codec(e.to_string()))?;
        self.call_raw(addr, Payload { json }, timeout, f).await
    }

    /// One unary call: send `msg` with a deadline, decode the JSON answer.
    async fn call_raw<M, Resp, F, Fut>(
        &self,
        addr: &str,
        msg: M,
        timeout: Duration,
        f: F,
    ) -> Result<Resp, RpcError>
    where
        Resp: DeserializeOwned,
        F: FnOnce(Client, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Payload>, Status>>,
    {
        let mut request = tonic::Request::new(msg);
        request.set_timeout(timeout);
        let client = self.client(addr)?;
        let resp = within(addr, timeout, f(client, request)).await?;
        serde_json::from_slice(&resp.into_inner().json).map_err(|e| RpcError::Codec(e.to_string()))
    }

    pub async fn append_entries(
        &self,
        addr: &str,
        req: &AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, RpcError> {
        self.call(addr, req, timeout, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    pub async fn vote(
        &self,
        addr: &str,
        req: &VoteRequest<NodeId>,
        timeout: Duration,
    ) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, RpcError> {
        self.call(
            addr,
            req,
            timeout,
            |mut c, r| async move { c.vote(r).await },
        )
        .await
    }

    #[allow(clippy::type_complexity)]
    pub async fn install_snapshot(
        &self,
        addr: &str,
        req: &InstallSnapshotRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
        RpcError,
    > {
        self.call(addr, req, timeout, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    pub async fn forward(
        &self,
        addr: &str,
        req: &ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, RpcError> {
        self.call(
            addr,
            req,
            timeout,
            |mut c, r| async move { c.forward(r).await },
        )
        .await
    }

    pub async fn change_membership(
        &self,
        addr: &str,
        req: &MembershipChange,
        timeout: Duration,
    ) -> Result<MembershipResponse, RpcError> {
        self.call(addr, req, timeout, |mut c, r| async move {
            c.change_membership(r).await
        })
        .await
    }

    pub async fn status(&self, addr: &str) -> Result<StatusReport, RpcError> {
        self.status_within(addr, self.inner.timeout).await
    }

    /// [`Peers::status`] with its own deadline (liveness probes use a short one).
    pub async fn status_within(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<StatusReport, RpcError> {
        self.call_raw(addr, Empty {}, timeout, |mut c, r| async move {
            c.status(r).await
        })
        .await
    }

    /// The leader's read index; with `lease_for`, also asks for a follower
    /// lease for that node (a header older leaders ignore).
    pub async fn read_index(
        &self,
        addr: &str,
        timeout: Duration,
        lease_for: Option<NodeId>,
    ) -> Result<ReadIndexResponse, RpcError> {
        self.call_raw(addr, Empty {}, timeout, |mut c, mut r| async move {
            if let Some(id) = lease_for {
                r.metadata_mut().insert(LEASE_FOR, MetadataValue::from(id));
            }
            c.read_index(r).await
        })
        .await
    }

    /// Asks `addr` to start an election now.
    ///
    /// Bounded by [`within`] like every other call: unbounded, a queued
    /// request would hold a leader's hand-over at shutdown.
    pub async fn trigger_election(&self, addr: &str) -> Result<(), RpcError> {
        let timeout = self.inner.timeout;
        let mut request = tonic::Request::new(Empty {});
        request.set_timeout(timeout);
        let mut client = self.client(addr)?;
        within(addr, timeout, client.trigger_election(request))
            .await
            .map(|_| ())
    }
}
