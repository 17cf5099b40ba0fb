//! The SMTP listeners: bounded concurrency and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backends::RaftAliases;
use super::bounces::BounceCounts;
use super::limits::{ConnectionCounts, FailedRcpts, TrustedNets};
use super::session::{Session, Shared};
use super::settle::Settlements;
use super::tls::Tls;
use crate::config::Config;
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::raft::Node;
use crate::relay::Relay;

/// What the sessions of this node share, with the real backends.
pub type NodeShared = Shared<RaftAliases, Arc<Relay>>;

/// Everything the listeners need, shared by all sessions of a node.
pub struct SmtpContext {
    pub session: Arc<NodeShared>,
    /// Open connections per client address.
    pub connections: ConnectionCounts,
    /// While draining, new connections are turned away with `421 4.3.2`.
    pub maintenance: Arc<Maintenance>,
}

impl SmtpContext {
    pub fn new(
        config: &Config,
        node: Node,
        forwarding: Arc<crate::mail::Forwarding>,
        relay: Arc<Relay>,
        metrics: Arc<Metrics>,
        maintenance: Arc<Maintenance>,
        tls: Option<Arc<Tls>>,
    ) -> Self {
        let smtp = &config.smtp;
        // Validated with the rest of the config at load time.
        let trusted = TrustedNets::new(smtp.trusted_nets().unwrap_or_default());
        Self {
            session: Arc::new(Shared {
                config: smtp.clone(),
                domains: config.domains.clone(),
                metrics,
                failures: FailedRcpts::new(
                    smtp.max_failed_rcpts_per_ip,
                    Duration::from_secs(smtp.failed_rcpt_window_secs),
                    trusted.clone(),
                ),
                bounces: BounceCounts::new(
                    config.srs.max_bounces_per_address,
                    super::bounces::WINDOW,
                ),
                tls,
                forwarding,
                aliases: RaftAliases {
                    node,
                    settlements: Arc::new(Settlements::new()),
                    lease_ms: config.relay.reservation_lease_secs * 1000,
                },
                upstream: relay,
            }),
            connections: ConnectionCounts::new(smtp.max_connections_per_ip, trusted),
            maintenance,
        }
    }

    /// For shutdown: releases the uses still held by sessions that did not
    /// finish (see [`Settlements::drain`]).
    pub async fn drain_settlements(&self, limit: Duration) {
        let aliases = &self.session.aliases;
        aliases
            .settlements
            .drain(&aliases.node, aliases.lease_ms, limit)
            .await;
    }
}

/// Accepts connections until `shutdown` fires, then closes the listening
/// sockets at once (new clients are refused and move to the next MX instead
/// of waiting in the backlog) and waits for the sessions, which answer `421`
/// at their next command. Sessions still running when `abort` fires are
/// dropped; the uses they hold stay in the settlements for shutdown to
/// release.
///
/// `tls_listener` speaks TLS from the first byte (implicit TLS). Both
/// listeners share one limit: a permit is taken before `accept()`, so at
/// most `max_connections` sessions exist and excess clients wait in the
/// kernel's backlog instead of costing us memory. Accept errors (such as
/// running out of file descriptors) back off instead of spinning.
pub async fn serve(
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.session.config.max_connections));
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (accepted, implicit_tls) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => (a, false),
            a = async {
                match &tls_listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => (a, true),
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                tracing::warn!(error = %e, "smtp accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let abort = abort.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = run_session(stream, peer, implicit_tls, ctx, shutdown) => {}
                _ = abort.cancelled() => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(tls_listener);
    tracker.close();
    tracker.wait().await;
}

async fn run_session<S>(
    mut stream: S,
    peer: SocketAddr,
    implicit_tls: bool,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let host = &ctx.session.config.hostname;
    // On the implicit-TLS port these refusals go out in plaintext; a TLS
    // client then fails its handshake and moves on, which is the point.
    if ctx.maintenance.draining() {
        // Senders try the next MX at once; sessions already open finish.
        ctx.session.metrics.smtp_drained.inc();
        let msg = format!(
            "421 4.3.2 {host} Service not available: node in maintenance, try another MX\r\n"
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.write_all(msg.as_bytes())).await;
        return;
    }
    let Some(_slot) = ctx.connections.acquire(peer.ip()) else {
        let msg =
            format!("421 4.7.0 {host} too many connections from your address, try again later\r\n");
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.write_all(msg.as_bytes())).await;
        return;
    };
    let metrics = &ctx.session.metrics;
    metrics.smtp_sessions.inc();
    metrics.smtp_sessions_active.inc();
    let mut session = Session::new(ctx.session.clone(), stream, peer, shutdown);
    if implicit_tls {
        session = session.implicit_tls();
    }
    let span = tracing::info_span!("smtp", sid = %session.sid(), %peer, implicit_tls);
    tracing::Instrument::instrument(session.run(), span).await;
    metrics.smtp_sessions_active.dec();
}
