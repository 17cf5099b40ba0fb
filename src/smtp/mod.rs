//! Inbound SMTP: the listeners ([`server`]), the per-connection state
//! machine ([`session`]), bounded line framing ([`input`]), TLS ([`tls`])
//! and the backends a session talks to ([`backends`]).
//!
//! Command parsing is smtp-proto's; the session loop, limits, timeouts, the
//! DATA framing and STARTTLS are our own (see `docs/architecture.md` for why).
//! Imports run one way: the server builds sessions; a session knows neither
//! the server nor Raft, only the traits in [`backends`].

pub mod backends;
pub mod bounces;
pub mod input;
pub mod limits;
pub mod server;
pub mod session;
pub mod settle;
pub mod tls;

pub use server::{serve, SmtpContext};
