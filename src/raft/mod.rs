//! The replicated alias state.
//!
//! - [`types`]: the openraft type configuration and the command/response enums
//!   that travel through the log.
//! - [`state`]: the pure state-machine logic (what each command does to an alias),
//!   kept free of storage so it can be tested exhaustively.
//! - [`idempotency`]: keyed creates (an `Idempotency-Key` claimed together
//!   with the alias it creates), also pure.
//! - [`targets`]: per-target rules (cap on live aliases, confirmation by
//!   the target) and their tables.
//! - `expiry`: the expiry indexes that let a purge read only what is due.
//! - [`store`]: the redb database holding the Raft log, vote, state machine and
//!   snapshots of one node.
//! - [`log_tail`]: the newest log entries in memory, for the reads that
//!   follow every append.
//! - [`snapshot`]: the streamed snapshot file format.
//! - [`network`]: how this node reaches its peers.
//! - [`batch`]: group proposal (concurrent writes share one entry).
//! - [`purge`]: the leader's purge rounds (bounded entries, and the
//!   unbounded purge while some member cannot apply those).
//! - [`node`]: the handle the SMTP and HTTP front ends write and read through.
//! - [`liveness`] and [`watchdog`]: failure detection around openraft (fast
//!   failover, one-way partitions, no disruptive campaigns).

pub mod batch;
mod expiry;
pub mod follower_lease;
pub mod forward;
pub mod idempotency;
pub mod liveness;
pub mod log_tail;
pub mod network;
pub mod node;
pub mod purge;
pub mod read_lease;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod targets;
pub mod types;
pub mod watchdog;

pub use node::Node;

pub use types::{AliasRecord, Command, Refusal, Request, Response, TargetPolicy, TypeConfig};
