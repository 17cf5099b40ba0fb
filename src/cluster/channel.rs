//! The connection under cluster RPC: one HTTP/2 connection per peer, driven
//! by `h2` directly, as the [`tower::Service`] tonic's generated client calls.
//!
//! Why not tonic's `Channel`: it puts every call through a tower `Buffer`
//! (a channel to a worker task), then hyper's client, which hands the request
//! to its connection task through another channel and spawns a task per call
//! to wait for the response. On a loaded three-node cluster those hand-overs
//! and wake-ups, not the handlers, were most of the cluster transport's CPU
//! (docs/benchmarks.md). Here the calling task opens the stream, queues its
//! frames and awaits the answer itself; only the connection's own task
//! writes and reads the socket.
//!
//! What the `Endpoint` gave and this keeps: a lazy connection (made by the
//! first call), a connect timeout, `TCP_NODELAY`, an optional source
//! address, an HTTP/2 ping every second answered within three (idle or not),
//! so that a peer gone without a reset is noticed within about four seconds,
//! and a fresh connection on the call after the old one died. Calls share the
//! connection (one stream each); a dropped call resets its stream only.

use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::OnceCell;
use tonic::Status;

type BoxError = Box<dyn StdError + Send + Sync>;

/// How often the connection pings its peer, busy or idle.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is given up.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

// Flow-control and buffer sizes: hyper's client defaults, which tonic's
// `Channel` used (HTTP/2's 64 KiB windows would throttle snapshot chunks).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Life of one connection, written by its task, read by callers.
const OPEN: u8 = 0;
/// The connection ended (the peer closed it, a socket error, or no handle
/// is left).
const CLOSED: u8 = 1;
/// The peer left a ping unanswered: calls that were under way are reported
/// as unavailable, as tonic did for a keep-alive timeout.
const PING_TIMED_OUT: u8 = 2;

/// How to reach one peer.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` as configured (an address or a name).
    pub addr: String,
    /// Source address to bind (used for peer addresses of its family).
    pub local: Option<IpAddr>,
    /// Bound on resolving, connecting and the HTTP/2 handshake.
    pub connect_timeout: Duration,
}

/// A cheap handle to one peer's connection; clones share it.
#[derive(Clone)]
pub struct PeerChannel {
    inner: Arc<Shared>,
}

struct Shared {
    target: Target,
    /// The current connection, made by the first caller that finds none; a
    /// dead one is swapped for an empty slot. A std mutex: it guards only
    /// the pointer swap, never an `.await`.
    slot: Mutex<Arc<Slot>>,
}

/// One connection attempt: callers that arrive while it is made wait for it
/// (the cell's own queue) instead of each opening a socket.
#[derive(Default)]
struct Slot {
    conn: OnceCell<Conn>,
}

#[derive(Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<AtomicU8>,
}

impl PeerChannel {
    pub fn new(target: Target) -> Self {
        Self {
            inner: Arc::new(Shared {
                target,
                slot: Mutex::new(Arc::new(Slot::default())),
            }),
        }
    }
}

impl Shared {
    fn current(&self) -> Arc<Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets `dead` (if it is still the current slot) so that the next
    /// caller connects anew.
    fn discard(&self, dead: &Arc<Slot>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&slot, dead) {
            *slot = Arc::new(Slot::default());
        }
    }

    /// The open connection, made now if there is none.
    async fn connection(&self) -> Result<(Arc<Slot>, Conn), Status> {
        let mut slot = self.current();
        if let Some(conn) = slot.conn.get() {
            if conn.state.load(Ordering::Acquire) == OPEN {
                return Ok((slot.clone(), conn.clone()));
            }
            self.discard(&slot);
            slot = self.current();
        }
        let conn = slot.conn.get_or_try_init(|| self.connect()).await?.clone();
        Ok((slot, conn))
    }

    async fn connect(&self) -> Result<Conn, Status> {
        let target = &self.target;
        let unavailable = |message: String| {
            Status::unavailable(format!("connecting to {}: {message}", target.addr))
        };
        let attempt = async {
            let mut last = None;
            let addrs = tokio::net::lookup_host(target.addr.as_str())
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut stream = None;
            for addr in addrs {
                match open(
                    addr,
                    target.local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()),
                )
                .await
                {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let stream = stream.ok_or_else(|| {
                unavailable(last.map_or_else(|| "no address".to_string(), |e| e.to_string()))
            })?;
            let (send, mut connection) = h2::client::Builder::new()
                .initial_max_send_streams(100)
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_header_list_size(MAX_HEADER_LIST)
                .max_send_buffer_size(MAX_SEND_BUFFER)
                .enable_push(false)
                .handshake::<_, Bytes>(stream)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let state = Arc::new(AtomicU8::new(OPEN));
            let pings = connection.ping_pong();
            let task_state = state.clone();
            tokio::spawn(async move {
                let end = tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "cluster connection ended");
                        }
                        CLOSED
                    }
                    () = keep_alive(pings) => PING_TIMED_OUT,
                };
                task_state.store(end, Ordering::Release);
                // Dropping the connection fails the streams still on it.
                drop(connection);
            });
            Ok(Conn { send, state })
        };
        match tokio::time::timeout(target.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(unavailable(format!(
                "no connection within {:?}",
                target.connect_timeout
            ))),
        }
    }

    /// One call: the request's (unary, already encoded) body is gathered
    /// first, so that headers and data leave in one go.
    async fn call(
        self: Arc<Self>,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<ResponseBody>, BoxError> {
        let (parts, mut body) = request.into_parts();
        let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                if !data.is_empty() {
                    chunks.push(data);
                }
            }
        }
        let head = http::Request::from_parts(parts, ());
        // A connection found dead before the request left is replaced once:
        // the peer has not seen the call, so a second try is safe.
        let mut retried = false;
        let (slot, conn, mut ready) = loop {
            let (slot, conn) = self.connection().await?;
            match conn.send.clone().ready().await {
                Ok(ready) => break (slot, conn, ready),
                Err(e) => {
                    self.discard(&slot);
                    if retried {
                        return Err(
                            Status::unavailable(format!("{}: {e}", self.target.addr)).into()
                        );
                    }
                    retried = true;
                }
            }
        };
        let (response, mut stream) = ready.send_request(head, chunks.is_empty()).map_err(|e| {
            self.discard(&slot);
            Status::unavailable(format!("{}: {e}", self.target.addr))
        })?;
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            // h2 frames and paces the data by the peer's windows; the bytes
            // are already in memory, so no copy is buffered.
            stream.send_data(chunk, i == last)?;
        }
        match response.await {
            Ok(response) => Ok(response.map(|body| ResponseBody {
                body,
                data_done: false,
            })),
            Err(_) if conn.state.load(Ordering::Acquire) == PING_TIMED_OUT => {
                Err(Status::unavailable(format!(
                    "{}: no answer to a keep-alive ping",
                    self.target.addr
                ))
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Pings every [`PING_INTERVAL`]; returns when a ping goes unanswered for
/// [`PING_TIMEOUT`] (or pings cannot be sent: the connection is ending).
async fn keep_alive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => {
                tracing::debug!("cluster peer left a ping unanswered; dropping the connection");
                return;
            }
        }
    }
}

async fn open(addr: SocketAddr, local: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

impl tower::Service<http::Request<tonic::body::Body>> for PeerChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    /// Always ready: waiting for the connection (and for a free stream) is
    /// part of the call, so that a call dropped while waiting leaves nothing
    /// behind.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.inner.clone().call(request))
    }
}

/// A response body read straight from the h2 stream; received bytes are
/// handed back to the flow-control window as they are taken.
pub struct ResponseBody {
    body: h2::RecvStream,
    data_done: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.body.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.body.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    /// What the test server does with a request, by its path.
    const ECHO: &str = "/echo";
    /// Never answered (the stream stays open until the client resets it).
    const HOLD: &str = "/hold";

    /// A real HTTP/2 server (h2's) answering like a gRPC service: headers,
    /// the request's bytes back, `grpc-status` trailers. Counts connections
    /// and the held streams the client reset; with `close_after_first`,
    /// each connection is closed after it has answered one request.
    async fn server(close_after_first: bool) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        let reset_count = resets.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let reset_count = reset_count.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let path = request.uri().path().to_string();
                        let mut body = request.into_body();
                        let reset_count = reset_count.clone();
                        let handle = tokio::spawn(async move {
                            let mut got = Vec::new();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                got.extend_from_slice(&chunk);
                            }
                            if path == HOLD {
                                // Keep the stream open until the client goes.
                                if std::future::poll_fn(|cx| respond.poll_reset(cx))
                                    .await
                                    .is_ok()
                                {
                                    reset_count.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                            let response = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut send = respond.send_response(response, false).unwrap();
                            send.send_data(Bytes::from(got), false).unwrap();
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            send.send_trailers(trailers).unwrap();
                        });
                        if close_after_first {
                            let _ = handle.await;
                            conn.graceful_shutdown();
                            while conn.accept().await.is_some() {}
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns, resets)
    }

    fn channel(addr: SocketAddr) -> PeerChannel {
        PeerChannel::new(Target {
            addr: addr.to_string(),
            local: None,
            connect_timeout: Duration::from_secs(1),
        })
    }

    fn request(
        addr: SocketAddr,
        path: &str,
        body: &'static [u8],
    ) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from_static(body),
            )))
            .unwrap()
    }

    /// The body and the `grpc-status` trailer of one call.
    async fn call(
        ch: &PeerChannel,
        req: http::Request<tonic::body::Body>,
    ) -> Result<(Vec<u8>, Option<String>), BoxError> {
        let response = ch.clone().oneshot(req).await?;
        let mut body = response.into_body();
        let mut data = Vec::new();
        let mut status = None;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame?;
            if let Some(trailers) = frame.trailers_ref() {
                status = trailers
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string());
            } else if let Ok(d) = frame.into_data() {
                data.extend_from_slice(&d);
            }
        }
        Ok((data, status))
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_connection() {
        let (addr, conns, _) = server(false).await;
        let ch = channel(addr);
        assert_eq!(conns.load(Ordering::SeqCst), 0, "connected before a call");
        let calls = (0..32).map(|_| call(&ch, request(addr, ECHO, b"ping")));
        for result in futures::future::join_all(calls).await {
            let (data, status) = result.unwrap();
            assert_eq!(data, b"ping");
            assert_eq!(status.as_deref(), Some("0"));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_call_leaves_the_connection_usable() {
        let (addr, conns, resets) = server(false).await;
        let ch = channel(addr);
        let held = tokio::time::timeout(
            Duration::from_millis(200),
            call(&ch, request(addr, HOLD, b"x")),
        )
        .await;
        assert!(held.is_err(), "the held call was answered");
        let (data, _) = call(&ch, request(addr, ECHO, b"after")).await.unwrap();
        assert_eq!(data, b"after");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        // The dropped call reset its stream, so the server let it go.
        tokio::time::timeout(Duration::from_secs(5), async {
            while resets.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the dropped call's stream was never reset");
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_on_a_later_call() {
        let (addr, conns, _) = server(true).await;
        let ch = channel(addr);
        assert_eq!(
            call(&ch, request(addr, ECHO, b"one")).await.unwrap().0,
            b"one"
        );
        // The server closes that connection; a call racing its GOAWAY may
        // fail, the next ones go over a new connection.
        let mut answered = false;
        for _ in 0..50 {
            if let Ok((data, _)) = call(&ch, request(addr, ECHO, b"two")).await {
                assert_eq!(data, b"two");
                answered = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(answered, "no call succeeded after the server closed");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    /// A call made after the peer closed the connection (GOAWAY, then the
    /// close) goes over a new connection at once: the caller never sees the
    /// old one's end. (The retry inside `call` for a connection that took
    /// a GOAWAY but is still open is not provoked here.)
    #[tokio::test]
    async fn a_call_after_a_goaway_goes_over_a_new_connection_first_time() {
        let (addr, conns, _) = server(true).await;
        let ch = channel(addr);
        assert_eq!(
            call(&ch, request(addr, ECHO, b"one")).await.unwrap().0,
            b"one"
        );
        // Wait (bounded) until the client side has taken in the server's
        // GOAWAY: the connection then refuses new streams.
        let send = ch.inner.current().conn.get().unwrap().send.clone();
        let mut closed = false;
        for _ in 0..500 {
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_millis(10), send.clone().ready()).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "the client never saw the server's GOAWAY");
        let (data, status) = call(&ch, request(addr, ECHO, b"two"))
            .await
            .expect("the call after the GOAWAY failed instead of reconnecting");
        assert_eq!(data, b"two");
        assert_eq!(status.as_deref(), Some("0"));
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_unavailable() {
        // A port that was free a moment ago: the connection is refused.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = call(&channel(addr), request(addr, ECHO, b"x"))
            .await
            .unwrap_err();
        let status = Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    /// A peer that accepts the connection and then never answers (a host
    /// gone without a reset): the keep-alive ping gives it up after about
    /// four seconds, and the call fails as unavailable.
    #[tokio::test]
    async fn a_silent_peer_is_given_up_by_the_keep_alive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (keep_tx, mut keep_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            // Holds the socket open without reading it.
            if let Ok((socket, _)) = listener.accept().await {
                let _ = keep_tx.send(socket).await;
            }
        });
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            call(&channel(addr), request(addr, ECHO, b"x")),
        )
        .await
        .expect("the keep-alive did not end the call");
        let status = Status::from_error(outcome.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let waited = started.elapsed();
        assert!(
            waited >= PING_TIMEOUT
                && waited < PING_INTERVAL + PING_TIMEOUT + Duration::from_secs(2),
            "gave up after {waited:?}"
        );
        assert!(keep_rx.try_recv().is_ok(), "the peer never accepted");
    }
}
