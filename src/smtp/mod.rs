//! Inbound SMTP: the listener ([`server`]), the per-connection state machine
//! ([`session`]) and bounded line framing ([`input`]).
//!
//! Command parsing is smtp-proto's; the session loop, limits, timeouts and the
//! DATA framing are our own (see `docs/architecture.md` for why).

pub mod input;
pub mod limits;
pub mod server;
pub mod session;
pub mod settle;

pub use server::{serve, SmtpContext};
