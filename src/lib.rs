//! tempalias: a clustered temporary e-mail alias forwarder.
//!
//! The crate is organised by role, so the architecture is visible in the tree:
//!
//! - [`config`]: the TOML configuration, its defaults and `TEMPALIAS_*` overrides.
//! - [`data_dir`]: the node's data directory, locked against a second process.
//! - [`alias`]: alias ids, management tokens and e-mail address syntax.
//! - [`clock`]: where the leader reads the time it stamps into Raft entries.
//! - [`raft`]: the replicated alias state: command types, the pure state-machine
//!   logic, the redb-backed log and state machine, and the [`raft::node::Node`]
//!   handle every front end writes through.
//! - [`smtp`]: the inbound SMTP listener and session state machine.
//! - [`relay`]: outbound delivery (capture directory, smarthosts or MX).
//! - [`mail`]: what forwarded mail gets on its way out: SRS, DKIM, ARC.
//! - [`confirm`]: target confirmation (the mail with the link, the RCPT answer).
//! - [`maintenance`]: node and cluster-wide drain, shared by SMTP and HTTP.
//! - [`http`]: the JSON API, health endpoints and `/metrics`.
//! - [`metrics`]: the Prometheus registry shared by all of the above.
//! - [`peer_limits`]: open connections per client address (SMTP and HTTP).
//! - [`server`]: wires one node together and runs it until shutdown.
//! - [`cli`]: the `tempalias` command line (the binary is a thin wrapper).

pub mod alias;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod confirm;
pub mod data_dir;
pub mod http;
pub mod mail;
pub mod maintenance;
pub mod metrics;
pub mod peer_limits;
pub mod raft;
pub mod relay;
pub mod server;
pub mod smtp;
pub mod window_counts;
