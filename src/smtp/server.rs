//! The SMTP listener: bounded concurrency and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::Session;
use crate::config::SmtpConfig;
use crate::metrics::Metrics;
use crate::raft::Node;
use crate::relay::Relay;

/// Everything a session needs, shared by all sessions of a node.
pub struct SmtpContext {
    pub config: SmtpConfig,
    /// Alias domains (lower case).
    pub domains: Vec<String>,
    pub node: Node,
    pub relay: Arc<Relay>,
    pub metrics: Arc<Metrics>,
    /// How long a reservation is held if this node dies mid-transaction.
    pub lease_ms: u64,
    /// Failed recipients per client address, across sessions.
    pub failures: super::limits::FailedRcpts,
    /// Open connections per client address.
    pub connections: super::limits::ConnectionCounts,
    /// Uses held by this node's sessions, and commits being retried.
    pub settlements: super::settle::Settlements,
    /// While draining, new connections are turned away with `421 4.3.2`.
    pub maintenance: Arc<crate::maintenance::Maintenance>,
    /// SRS, DKIM and ARC for what goes out, and SRS reversal of bounces.
    pub forwarding: Arc<crate::mail::Forwarding>,
}

/// Accepts connections until `shutdown` fires, then closes the listening
/// socket at once (new clients are refused and move to the next MX instead
/// of waiting in the backlog) and waits for the sessions, which answer `421`
/// at their next command. Sessions still running when `abort` fires are
/// dropped; the uses they hold stay in [`SmtpContext::settlements`] for
/// shutdown to release.
///
/// A permit is taken before `accept()`, so at most `max_connections` sessions
/// exist and excess clients wait in the kernel's backlog instead of costing us
/// memory. Accept errors (such as running out of file descriptors) back off
/// instead of spinning.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.config.max_connections));
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
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
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
                _ = run_session(stream, peer, ctx, shutdown) => {}
                _ = abort.cancelled() => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

async fn run_session(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
) {
    if ctx.maintenance.draining() {
        // Senders try the next MX at once; sessions already open finish.
        use tokio::io::AsyncWriteExt;
        ctx.metrics.smtp_drained.inc();
        let host = &ctx.config.hostname;
        let msg = format!(
            "421 4.3.2 {host} Service not available: node in maintenance, try another MX\r\n"
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.write_all(msg.as_bytes())).await;
        return;
    }
    let Some(_slot) = ctx.connections.acquire(peer.ip()) else {
        use tokio::io::AsyncWriteExt;
        let host = &ctx.config.hostname;
        let msg =
            format!("421 4.7.0 {host} too many connections from your address, try again later\r\n");
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.write_all(msg.as_bytes())).await;
        return;
    };
    ctx.metrics.smtp_sessions.inc();
    ctx.metrics.smtp_sessions_active.inc();
    let (reader, writer) = stream.into_split();
    let mut session = Session::new(ctx.clone(), reader, writer, peer, shutdown);
    let span = tracing::info_span!("smtp", sid = %session.sid(), %peer);
    tracing::Instrument::instrument(session.run(), span).await;
    ctx.metrics.smtp_sessions_active.dec();
}
