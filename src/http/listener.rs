//! The public HTTP listener, built to survive the internet.
//!
//! `axum::serve` has no header-read timeout, no idle timeout and no connection
//! cap, so a slow or idle client could hold file descriptors the SMTP and
//! cluster listeners need. This serves the same router with hyper-util's
//! connection builder and adds:
//!
//! - a **connection cap** (`http.max_connections`): a permit is taken for
//!   every accepted connection. A connection beyond the cap is not served:
//!   it gets a fixed `503` with `Retry-After` and is closed (counted in
//!   `tempalias_http_connections_refused_total{limit="max_connections"}`), except that a probe or scrape
//!   (`GET /healthz`, `/readyz`, `/metrics`) is still answered, so an
//!   overloaded node still says how it is. That refusal work is itself
//!   bounded ([`MAX_REFUSING`]); past it, excess connections are just closed.
//! - a **connection cap per client address** (`http.max_connections_per_ip`,
//!   IPv4 address or IPv6 /64, `[http] trusted_proxies` exempt): without it
//!   one address holding thousands of idle connections takes every slot of
//!   the global cap from everyone else. A connection past it gets a fixed
//!   `503` `too_many_connections` the same way (through a refusal path
//!   bounded the same way, but on its own) and is counted with `limit="max_connections_per_ip"`;
//!   probes are not excepted here, since the node is not overloaded and a
//!   monitor from another address is served as usual.
//! - a **header-read timeout** (`http.header_read_timeout_secs`): a client that
//!   has not sent a complete request head by then is disconnected (slowloris);
//! - a **keep-alive idle timeout** (`http.keepalive_idle_secs`): a connection
//!   with no bytes in either direction for that long is closed gracefully;
//! - **graceful shutdown**: on shutdown, accepting stops, every connection
//!   finishes its request in progress and closes, and [`serve`] returns once
//!   all are gone.
//!
//! Accept errors (such as running out of file descriptors) back off instead of
//! spinning, as the SMTP listener does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, RefusedLabels, RefusedLimit};
use crate::peer_limits::ConnectionCounts;

/// Connections past a cap that may be in the refusal path at once (reading
/// the request line, writing the `503`). Each cap has its own bound, so a
/// greedy address being refused cannot crowd out the probes served past the
/// global cap.
pub const MAX_REFUSING: usize = 64;

/// How long a refused connection may take to show its request line.
const REFUSE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keepalive_idle: Duration,
}

/// What every connection refused at the global cap is told (besides probes).
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 2\r\n\
connection: close\r\n\
content-length: 57\r\n\
\r\n\
{\"error\":\"overloaded\",\"message\":\"the node is overloaded\"}";

/// What a connection past its address's cap is told: the same fixed `503`,
/// with a code that says the limit is the client's own, not the node's.
const REFUSAL_PER_IP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 2\r\n\
connection: close\r\n\
content-length: 88\r\n\
\r\n\
{\"error\":\"too_many_connections\",\"message\":\"too many open connections from this address\"}";

/// Serves `app` on `listener` until `shutdown`, then drains connections.
///
/// `per_ip` holds the open connections of each client address: a slot is
/// taken after the global permit, so the table never has more entries than
/// `limits.max_connections`, and each slot is given back when its
/// connection's task ends, however it ends.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    per_ip: Arc<ConnectionCounts>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refusing_per_ip = Arc::new(Semaphore::new(MAX_REFUSING));
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    loop {
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
                tracing::warn!(error = %e, "http accept failed; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let admitted = match permits.clone().try_acquire_owned() {
            Ok(permit) => match per_ip.acquire_owned(peer.ip()) {
                Some(slot) => Ok((permit, slot)),
                None => Err(RefusedLimit::max_connections_per_ip),
            },
            Err(_) => Err(RefusedLimit::max_connections),
        };
        match admitted {
            Ok((permit, slot)) => {
                let (builder, metrics, shutdown) =
                    (builder.clone(), metrics.clone(), shutdown.clone());
                tracker.spawn(async move {
                    // Dropped with the task, even if it is aborted.
                    let _held = (permit, slot);
                    metrics.http_connections_active.inc();
                    serve_connection(&builder, stream, peer, app, limits, shutdown).await;
                    metrics.http_connections_active.dec();
                });
            }
            Err(limit) => {
                metrics
                    .http_connections_refused
                    .get_or_create(&RefusedLabels {
                        limit: limit.clone(),
                    })
                    .inc();
                let bound = match limit {
                    RefusedLimit::max_connections => &refusing,
                    RefusedLimit::max_connections_per_ip => &refusing_per_ip,
                };
                // Past the refusal bound the connection is simply closed.
                if let Ok(refusing) = bound.clone().try_acquire_owned() {
                    let (builder, shutdown) = (builder.clone(), shutdown.clone());
                    tracker.spawn(async move {
                        let _held = refusing;
                        match limit {
                            RefusedLimit::max_connections => {
                                refuse(&builder, stream, peer, app, limits, shutdown).await
                            }
                            RefusedLimit::max_connections_per_ip => {
                                write_refusal(stream, REFUSAL_PER_IP).await
                            }
                        }
                    });
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one connection until it closes, idles out or shutdown drains it.
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let service = tower::ServiceExt::map_request(
        app,
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        },
    );
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut draining = false;
    let mut deadline = Instant::now() + limits.keepalive_idle;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(deadline), if !draining => {
                let last = activity.last();
                if last.elapsed() >= limits.keepalive_idle {
                    // Closes at once when idle; a request in progress
                    // (bounded by the request timeout) finishes first.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    deadline = last + limits.keepalive_idle;
                }
            }
        }
    }
}

/// A connection past the cap: a probe is answered, anything else gets the
/// fixed `503`.
async fn refuse(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut head = [0u8; 64];
    let mut len = 0;
    let read = tokio::time::timeout(REFUSE_READ_TIMEOUT, async {
        while len < head.len() && !head[..len].contains(&b'\n') {
            match stream.peek(&mut head[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // peek does not consume: read the bytes only to learn
                    // more, then peek again from the start.
                    len = n;
                    if n < head.len() && !head[..n].contains(&b'\n') {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    })
    .await;
    if read.is_ok() && is_probe(&head[..len]) {
        serve_connection(builder, stream, peer, app, limits, shutdown).await;
        return;
    }
    write_refusal(stream, REFUSAL).await;
}

/// Writes a fixed refusal and closes, within a second.
async fn write_refusal(mut stream: TcpStream, refusal: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(refusal).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the
        // connection before it has read the answer.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// True for the request lines of probes and scrapes.
fn is_probe(head: &[u8]) -> bool {
    const PROBES: &[&[u8]] = &[b"GET /healthz ", b"GET /readyz ", b"GET /metrics "];
    PROBES.iter().any(|p| head.starts_with(p))
}

/// When a connection last moved a byte, as milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records when it last read or wrote anything.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_recognised_by_their_request_line() {
        assert!(is_probe(b"GET /readyz HTTP/1.1\r\n"));
        assert!(is_probe(b"GET /healthz HTTP/1.1\r\n"));
        assert!(is_probe(b"GET /metrics HTTP/1.1\r\n"));
        assert!(!is_probe(b"GET /readyz/x HTTP/1.1\r\n"));
        assert!(!is_probe(b"POST /v1/aliases HTTP/1.1\r\n"));
        assert!(!is_probe(b"GET /re"));
    }

    #[test]
    fn refusals_are_complete_responses() {
        for (refusal, code) in [
            (REFUSAL, "overloaded"),
            (REFUSAL_PER_IP, "too_many_connections"),
        ] {
            let text = std::str::from_utf8(refusal).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains(&format!("content-length: {}", body.len())));
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"], code);
        }
    }
}
