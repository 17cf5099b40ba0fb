//! Node-to-node traffic: a tonic gRPC service on `[cluster] listen`, its own
//! port, never the public HTTP or SMTP listeners.
//!
//! - [`messages`]: the JSON payloads carried by each RPC.
//! - [`channel`]: one HTTP/2 connection per peer, kept alive and replaced
//!   when it dies; the service tonic's generated client calls.
//! - [`client`]: one cached client per peer, typed calls, the shared secret.
//! - [`service`]: the inbound side: Raft RPCs, forwarded writes, status and
//!   membership changes, every call authenticated.

pub mod channel;
pub mod client;
pub mod messages;
pub mod service;

/// Code generated from `proto/cluster.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("tempalias.cluster.v1");
}

/// Largest gRPC message accepted either way (snapshot chunks and append
/// batches are JSON; this bounds them well above their configured sizes).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
