//! One outbound SMTP attempt: connect, TLS as the policy says, AUTH, send.
//!
//! The TCP connection is made here, not by lettre, so that it gets
//! `TCP_NODELAY`: lettre writes a command and then waits for its reply, and
//! with Nagle's algorithm on, a small write that follows unacknowledged data
//! (the end of the message after its body) waits for the peer's delayed ACK,
//! about 40 ms per message. lettre's `connect_with_transport` takes our
//! connected stream; for implicit TLS the handshake runs on it first, and
//! STARTTLS hands the socket from a plaintext lettre connection to a TLS
//! one (see [`starttls`]), so that a new connection costs greeting, EHLO,
//! STARTTLS, handshake and EHLO, nothing more.
//!
//! A connection to a smarthost may carry several messages, one after the
//! other ([`Session`], kept between messages by a [`Pool`]); MX delivery
//! uses each connection for one message. docs/architecture.md explains why
//! this reuse is cancel-safe.
//!
//! lettre keeps only the EHLO keywords it knows, and `SIZE` (RFC 1870) is
//! not one of them; nor does its `send` put `SIZE=` on `MAIL`. So the
//! upstream's replies are recorded as lettre reads them until its EHLO reply
//! is in ([`Recorded`], above TLS), the limit is read from there, and the transaction
//! (`MAIL`, `RCPT`, `DATA`) is ours ([`transaction`]) on lettre's commands.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::address::Envelope as LettreEnvelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset, Starttls};
use lettre::transport::smtp::extension::{
    ClientId, Extension, MailBodyParameter, MailParameter, ServerInfo,
};
use lettre::transport::smtp::response::Severity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

pub use super::pool::Pool;

/// How the connection is to be protected.
#[derive(Clone)]
pub enum TlsPolicy {
    /// STARTTLS when offered (certificate not verified), else plaintext;
    /// plaintext too when the host refuses the `STARTTLS` command itself
    /// (see [`starttls`]).
    Opportunistic(TlsParameters),
    /// STARTTLS required, certificate verified.
    Required(TlsParameters),
    /// TLS from the first byte, certificate verified.
    Implicit(TlsParameters),
}

/// Why an attempt did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// The upstream answered a command with a 4xx or 5xx reply.
    #[error("{code} {enhanced} {text}")]
    Reply {
        code: u16,
        enhanced: String,
        text: String,
    },
    /// No usable answer: connect, TLS, AUTH or the connection broke.
    #[error("{0}")]
    Failed(String),
    /// The upstream works but cannot take this message (see [`Unfit`]), so
    /// nothing was sent. Another upstream may take it: the caller tries the
    /// next one, and refuses the message (with [`Unfit::codes`]) only when
    /// none can. Never a sign of the host being down.
    #[error("{} {} {text}", .reason.codes().0, .reason.codes().1)]
    Unsupported {
        reason: Unfit,
        /// Names the host and what it lacks; for the log.
        text: String,
    },
}

/// Why a working upstream cannot take this message. Each is a fact about
/// the host (what its EHLO announced), not about the message alone: another
/// host may take it, and waiting does not change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// A non-ASCII envelope address, and no SMTPUTF8 (RFC 6531).
    NoSmtpUtf8,
    /// 8-bit content, and no 8BITMIME (RFC 6152); never converted, see
    /// [`unfit`].
    No8BitMime,
    /// Larger than the `SIZE` the host announced (RFC 1870). Sending it
    /// anyway would only have the host refuse it at `MAIL` or after the
    /// whole body, and that `552` would end the delivery there, while a host
    /// with a larger limit may take it.
    TooLarge,
}

impl Unfit {
    /// The reply and enhanced codes when no host can take the message:
    /// `553 5.6.7` (RFC 6533), `554 5.6.3` (RFC 3463, conversion required
    /// but not supported), `552 5.3.4` (RFC 3463, message too big for
    /// system; RFC 1870's code).
    pub fn codes(self) -> (u16, &'static str) {
        match self {
            Unfit::NoSmtpUtf8 => (553, "5.6.7"),
            Unfit::No8BitMime => (554, "5.6.3"),
            Unfit::TooLarge => (552, "5.3.4"),
        }
    }
}

impl AttemptError {
    /// True when the upstream shows no sign of working (for the breaker): a
    /// reply shows it alive, except `421`, its way of saying it is going away.
    pub fn is_failure(&self) -> bool {
        match self {
            AttemptError::Failed(_) => true,
            AttemptError::Reply { code, .. } => *code == 421,
            AttemptError::Unsupported { .. } => false,
        }
    }
}

/// Where one attempt goes.
pub struct Target<'a> {
    /// For logs only.
    pub name: &'a str,
    /// Tried in order until one accepts the TCP connection.
    pub addrs: &'a [SocketAddr],
    pub tls: &'a TlsPolicy,
    pub credentials: Option<&'a Credentials>,
    pub helo: &'a ClientId,
    /// Bound on each TCP connect, so one black-holed address leaves time
    /// for the next.
    pub connect_timeout: Duration,
    /// Where idle connections to this target wait for the next message;
    /// `None`: one connection per message (MX delivery).
    pub pool: Option<&'a Arc<Pool>>,
}

impl Target<'_> {
    /// What the connections made for this target are made under.
    pub fn key(&self) -> ConnKey {
        ConnKey::new(self.name, self.tls, self.credentials, self.helo)
    }
}

/// TLS parameters that verify the peer against the public roots plus `extra_ca`.
///
/// # Errors
/// The reason lettre could not build them (a CA file that is not PEM).
pub fn verified_tls(host: &str, extra_ca: &[u8]) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(host.to_string());
    if !extra_ca.is_empty() {
        for pem in split_pem(extra_ca) {
            let cert = lettre::transport::smtp::client::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| format!("CA file: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build_rustls().map_err(|e| e.to_string())
}

/// TLS parameters for opportunistic encryption: any certificate is taken.
///
/// # Errors
/// The reason lettre could not build them.
pub fn unverified_tls(host: &str) -> Result<TlsParameters, String> {
    TlsParameters::builder(host.to_string())
        .dangerous_accept_invalid_certs(true)
        .dangerous_accept_invalid_hostnames(true)
        .build_rustls()
        .map_err(|e| e.to_string())
}

/// Each `BEGIN CERTIFICATE` block of a PEM bundle (lettre takes one at a time).
fn split_pem(bundle: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bundle);
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let tail = &rest[start..];
        let end_marker = "-----END CERTIFICATE-----";
        let Some(end) = tail.find(end_marker) else {
            break;
        };
        out.push(tail[..end + end_marker.len()].to_string());
        rest = &tail[end + end_marker.len()..];
    }
    out
}

/// One connection to an upstream, greeted (EHLO, TLS and AUTH as its
/// target says) and between transactions: ready for `MAIL`. Owned by
/// whoever holds it, never shared: the send future that uses it, or the
/// idle set of a [`Pool`] between messages. Dropping it closes it.
pub struct Session {
    conn: AsyncSmtpConnection,
    /// The `SIZE` its EHLO announced (see [`advertised_size`]); with the
    /// EHLO keywords lettre keeps, what [`unfit`] judges a message by.
    size: Option<u64>,
    /// Its EHLO offered PIPELINING (RFC 2920), which lettre does not keep:
    /// `MAIL`, `RCPT` and `DATA` then go in one write (see [`transaction`]).
    pipelining: bool,
    /// What it was made under; a pool takes back only its own.
    key: ConnKey,
    /// When the TCP connection was made (for `relay.reuse_max_age_secs`).
    opened: Instant,
    /// Transactions completed on it (for `relay.reuse_max_messages`).
    messages: u32,
    probe: Probe,
}

impl Session {
    pub(super) fn key(&self) -> ConnKey {
        self.key
    }

    pub(super) fn opened(&self) -> Instant {
        self.opened
    }

    pub(super) fn messages(&self) -> u32 {
        self.messages
    }

    /// False when the upstream has closed the connection, or said something
    /// nobody asked for (a `421` before closing, a TLS alert), while it
    /// sat idle: a connection between transactions has nothing to read.
    pub(super) fn quiet(&self) -> bool {
        !self.conn.has_broken() && self.probe.quiet()
    }

    /// Ends the connection politely without waiting for it: `QUIT` in a
    /// task of its own, bounded, because its answer changes nothing. Only
    /// for a connection whose last transaction ended with a reply (else a
    /// `QUIT` could land in the middle of the data).
    pub(super) fn quit_in_background(mut self) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(QUIT_TIMEOUT, self.conn.quit()).await;
        });
    }

    /// `QUIT`, waited for up to `limit` (graceful shutdown).
    pub(super) async fn quit(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.conn.quit()).await;
    }
}

/// Bound on a `QUIT` (or `RSET`) sent after the reply that matters.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What decides a connection's properties: the upstream (its label names
/// the scheme, so the TLS mode, the host and the port), its TLS policy,
/// the AUTH credentials and our EHLO name. A hash, so that it can be kept
/// with each connection without keeping the password twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnKey(u64);

impl ConnKey {
    pub fn new(
        name: &str,
        tls: &TlsPolicy,
        credentials: Option<&Credentials>,
        helo: &ClientId,
    ) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        std::mem::discriminant(tls).hash(&mut h);
        credentials.hash(&mut h);
        helo.to_string().hash(&mut h);
        Self(h.finish())
    }
}

/// A second handle on the connection's socket, only to look, without
/// reading, whether anything arrived while the connection was idle.
/// (lettre owns the stream itself.)
struct Probe(Option<std::net::TcpStream>);

impl Probe {
    #[cfg(unix)]
    fn of(tcp: &TcpStream) -> Self {
        use std::os::fd::AsFd;
        Self(
            tcp.as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::net::TcpStream::from),
        )
    }

    /// Elsewhere nothing is looked at: a dead connection fails at `MAIL`.
    #[cfg(not(unix))]
    fn of(_: &TcpStream) -> Self {
        Self(None)
    }

    /// True when the socket has nothing to read and is not closed. The
    /// socket is non-blocking (tokio made it so, and the flag is shared by
    /// both handles), so `peek` answers at once. Without a second handle
    /// nothing can be told, and the connection counts as quiet: a dead
    /// one then fails at `MAIL`, which is retried as well.
    fn quiet(&self) -> bool {
        match &self.0 {
            None => true,
            Some(s) => matches!(
                s.peek(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Sends one message: over an idle connection of the target's pool when
/// there is one, else over a new one.
///
/// Cancel-safe: the connection belongs to this future while it is used,
/// so dropping the future (our timeout, the caller giving up) drops and
/// closes it. A connection goes back to the pool only from the line that
/// read the final reply of a complete transaction (the `250` after the
/// data), or from a task that owns it after a refusal at `MAIL` or `RCPT`
/// and got `250` to its `RSET`; any other outcome closes it. (An idle
/// connection whose EHLO says it cannot take this message goes back
/// untouched, and the message asks a new connection.)
///
/// An idle connection that turns out dead before `MAIL` was answered (the
/// upstream closed it, answered `421`, or did not answer within
/// [`REUSED_MAIL_TIMEOUT`]) costs nothing: the message goes over a new
/// connection within the same attempt, and the breaker is not told.
///
/// # Errors
/// [`AttemptError`] saying whether the upstream answered.
pub async fn send(
    target: &Target<'_>,
    envelope: &LettreEnvelope,
    message: &[u8],
) -> Result<(), AttemptError> {
    let key = target.key();
    if let Some(pool) = target.pool {
        // One idle connection at most: if it was dead, the others (as old
        // or older) may be too, and a new one is certain.
        if let Some(session) = pool.take().filter(|s| s.key == key) {
            if unfit(
                target.name,
                session.conn.server_info(),
                session.size,
                envelope,
                message,
            )
            .is_err()
            {
                // Untouched, between transactions: still good for other
                // messages. Its EHLO may be minutes old, and a host that
                // was reconfigured (a larger SIZE, 8BITMIME) must be used
                // at once, as without reuse: this message asks a new
                // connection, whose EHLO decides.
                pool.put(session);
            } else {
                match transact(target, session, envelope, message, true).await {
                    Err(Retry::Stale(why)) => {
                        tracing::debug!(upstream = target.name, %why, "idle connection was closed by the upstream; using a new one");
                        pool.count_stale();
                    }
                    Err(Retry::No(error)) => return Err(error),
                    Ok(()) => return Ok(()),
                }
            }
        }
    }
    let session = open(target, envelope, message).await?;
    transact(target, session, envelope, message, false)
        .await
        .map_err(|e| match e {
            Retry::Stale(error) | Retry::No(error) => error,
        })
}

/// Why [`transact`] failed: on an idle connection before `MAIL` was
/// answered, the connection was found dead (retry on a new one), or any
/// other outcome.
enum Retry {
    Stale(AttemptError),
    No(AttemptError),
}

/// One transaction on `session`, and what becomes of the connection.
async fn transact(
    target: &Target<'_>,
    mut session: Session,
    envelope: &LettreEnvelope,
    message: &[u8],
    reused: bool,
) -> Result<(), Retry> {
    let outcome = transaction(
        &mut session.conn,
        envelope,
        message,
        session.size.is_some(),
        session.pipelining,
        // At most half the attempt's time (a smarthost's `connect_timeout`
        // is its attempt timeout), so a short `relay.timeout_secs` still
        // leaves the new connection time to deliver.
        reused.then_some(REUSED_MAIL_TIMEOUT.min(target.connect_timeout / 2)),
    )
    .await;
    match outcome {
        Ok(reply) => {
            // The final reply of a complete transaction: the connection is
            // between transactions again, and only here may it go back.
            // lettre takes any 2xx or 3xx reply as success; a 3xx here
            // (a server out of step with its own replies) may leave a reply
            // unread, so such a connection is not lent again.
            session.messages += 1;
            let in_step = reply.code().severity == Severity::PositiveCompletion;
            match target.pool {
                Some(pool) if in_step => {
                    if reused {
                        pool.count_reused();
                    }
                    pool.put(session);
                }
                Some(_) => drop(session),
                None => session.quit_in_background(),
            }
            Ok(())
        }
        Err(e) => {
            let status = e.status();
            if reused && e.stage == Stage::Mail && status.is_none_or(|c| c == 421) {
                // Nothing of this message reached a transaction: the same
                // message on a new connection cannot be a duplicate.
                return Err(Retry::Stale(e.classify(target.name, "MAIL")));
            }
            match (status, target.pool) {
                // Out of step with the upstream: only closing it is safe.
                _ if e.broken => drop(session),
                // Refused before the data: the transaction is cleared with
                // RSET by a task of its own (the refusal is not delayed),
                // and only its `250` lets the connection go back.
                (Some(code), Some(pool))
                    if code != 421
                        && matches!(e.stage, Stage::Mail | Stage::Rcpt)
                        && pool.enabled() =>
                {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let rset =
                            tokio::time::timeout(QUIT_TIMEOUT, session.conn.command(Rset)).await;
                        if let Ok(Ok(_)) = rset {
                            pool.put(session);
                        }
                    });
                }
                // The upstream answered (the message is safe there, or
                // refused): QUIT must not delay our reply, nor can its
                // failure change anything, so it runs on its own, bounded.
                (Some(_), _) => session.quit_in_background(),
                // A connection that broke is just dropped: a QUIT could
                // land in the middle of the data.
                (None, _) => drop(session),
            }
            let error = e.classify(target.name, "transaction");
            Err(Retry::No(if e.stage == Stage::Rcpt {
                rcpt_552_is_temporary(error)
            } else {
                error
            }))
        }
    }
}

/// A new connection to `target`, greeted, secured and authenticated, after
/// checking that the upstream can take `message` at all.
///
/// Over STARTTLS this costs what RFC 3207 asks and no more: greeting, EHLO,
/// STARTTLS, the TLS handshake, EHLO (see [`starttls`]).
///
/// # Errors
/// [`AttemptError::Failed`] for anything that went wrong before `MAIL`,
/// [`AttemptError::Unsupported`] when the upstream cannot take the message.
async fn open(
    target: &Target<'_>,
    envelope: &LettreEnvelope,
    message: &[u8],
) -> Result<Session, AttemptError> {
    let tcp = connect(target.addrs, target.connect_timeout).await?;
    let opened = Instant::now();
    if let Some(pool) = target.pool {
        pool.count_opened();
    }
    let probe = Probe::of(&tcp);
    let Greeted {
        mut conn,
        size,
        pipelining,
    } = match target.tls {
        TlsPolicy::Implicit(params) => {
            let tls = upgrade(tcp, params)
                .await
                .map_err(|e| failed(target, "TLS", &e))?;
            greet(target, Tls::implicit(tls), "greeting or EHLO").await?
        }
        TlsPolicy::Required(params) => starttls(target, tcp, params, true).await?,
        TlsPolicy::Opportunistic(params) => starttls(target, tcp, params, false).await?,
    };
    // Checked on the EHLO reply that counts (the one after STARTTLS), and
    // before AUTH: a host that cannot take the message need not see our
    // password for it.
    unfit(target.name, conn.server_info(), size, envelope, message)?;
    if let Some(credentials) = target.credentials {
        // Any AUTH refusal is ours to fix (wrong password, mechanism), never
        // the sender's: a failure, so the sender hears 4xx and we fail over.
        conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
            .await
            .map_err(|e| failed(target, "AUTH", &e))
            .and_then(|r| {
                if r.is_positive() {
                    Ok(())
                } else {
                    Err(AttemptError::Failed(format!(
                        "{}: AUTH refused: {}",
                        target.name,
                        u16::from(r.code())
                    )))
                }
            })?;
    }
    Ok(Session {
        conn,
        size,
        pipelining,
        key: target.key(),
        opened,
        messages: 0,
        probe,
    })
}

/// Anything that went wrong before `MAIL`: the host is unusable for now,
/// whatever it answered (a `554 no service` or `421 busy` at the greeting
/// says nothing about the message).
fn failed(target: &Target<'_>, what: &str, e: &dyn std::fmt::Display) -> AttemptError {
    AttemptError::Failed(format!("{}: {what}: {e}", target.name))
}

/// A connection lettre has greeted (its EHLO reply read), and what that
/// reply announced beyond lettre's keywords: `SIZE` and PIPELINING.
struct Greeted {
    conn: AsyncSmtpConnection,
    size: Option<u64>,
    pipelining: bool,
}

/// lettre reads the greeting from `stream` and says EHLO, while
/// [`Recorded`] keeps what it reads, for the `SIZE` lettre drops. lettre's
/// bounds hold for each reply (1,000 bytes a line, 100,000 a reply), and
/// [`Replies::MAX`] for the copy.
///
/// # Errors
/// [`AttemptError::Failed`] naming `stage`: a refusal here is the host's.
async fn greet<S: AsyncTokioStream + 'static>(
    target: &Target<'_>,
    stream: S,
    stage: &str,
) -> Result<Greeted, AttemptError> {
    let replies = Replies::new();
    let stream = Box::new(Recorded::new(stream, &replies));
    let conn = AsyncSmtpConnection::connect_with_transport(stream, target.helo)
        .await
        .map_err(|e| failed(target, stage, &e))?;
    let ehlo = replies.stop().unwrap_or_default();
    let lines = ehlo_lines(&ehlo);
    Ok(Greeted {
        conn,
        size: advertised_size(lines.iter().copied()),
        pipelining: lines.iter().any(|l| {
            l.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING"))
        }),
    })
}

/// Greeting and EHLO in plaintext, then STARTTLS as the policy says, and
/// over TLS a second EHLO: the one that counts (RFC 3207 4.2).
///
/// lettre's own `starttls` would run the TLS handshake on the stream it
/// owns, under our recording, so the EHLO reply after it would arrive
/// encrypted and its `SIZE` be lost; an earlier version paid for that with
/// a third EHLO on every such connection. Instead the plaintext part runs
/// on a stream we can take back ([`Handoff`]): after the `220` to
/// `STARTTLS`, the socket leaves that lettre connection, lettre's own TLS
/// (`upgrade_tls`, as for implicit TLS, so certificate checks stay
/// lettre's) runs on it, and a new lettre connection over TLS, recorded
/// again, says the EHLO that counts. That connection expects a greeting,
/// which RFC 3207 does not repeat after TLS: [`Tls`] gives it one line of
/// its own. Whatever lettre had read beyond the `220` goes with the first
/// connection: nothing sent in plaintext is read as a reply inside TLS
/// (response injection).
///
/// A host that refuses the `STARTTLS` command (`454 TLS not available`):
/// with TLS required, a failure; opportunistically, the session goes on in
/// plaintext on the same connection, whose EHLO still stands, as Postfix
/// does at `smtp_tls_security_level = may`. An attacker able to make the
/// host refuse could as well strip `STARTTLS` from the EHLO reply, which
/// also ends in plaintext; failing instead would make a host with broken
/// TLS unusable though it takes mail. A `421` (closing) is a failure.
///
/// # Errors
/// [`AttemptError::Failed`] naming the stage.
async fn starttls(
    target: &Target<'_>,
    tcp: TcpStream,
    params: &TlsParameters,
    required: bool,
) -> Result<Greeted, AttemptError> {
    let plain = Handoff::new(tcp);
    let mut greeted = greet(target, plain.clone(), "greeting or EHLO").await?;
    if !greeted.conn.can_starttls() {
        if required {
            return Err(AttemptError::Failed(format!(
                "{}: STARTTLS is required but not offered",
                target.name
            )));
        }
        return Ok(greeted);
    }
    match greeted.conn.command(Starttls).await {
        Ok(_) => {}
        Err(e) if !required && e.status().is_some_and(|c| u16::from(c) != 421) => {
            if STARTTLS_REFUSALS.allow(target.name) {
                tracing::info!(upstream = target.name, reply = %e, "STARTTLS refused; going on in plaintext (opportunistic TLS; this host's further refusals within the hour are logged at debug)");
            } else {
                tracing::debug!(upstream = target.name, reply = %e, "STARTTLS refused; going on in plaintext (opportunistic TLS)");
            }
            return Ok(greeted);
        }
        Err(e) => return Err(failed(target, "STARTTLS", &e)),
    }
    drop(greeted);
    let tcp = plain
        .take()
        .ok_or_else(|| failed(target, "STARTTLS", &"the connection was gone"))?;
    let tls = upgrade(tcp, params)
        .await
        .map_err(|e| failed(target, "STARTTLS", &e))?;
    greet(target, Tls::after_starttls(tls), "EHLO after STARTTLS").await
}

/// Hosts whose refused `STARTTLS` was logged at info, so that a host with
/// broken TLS costs one line an hour, not one per delivery (MX delivery opens
/// a connection per message). At most 1,024 hosts (MX names come from the
/// recipients' domains); while that many were logged within the hour, a new
/// one is logged at debug.
static STARTTLS_REFUSALS: std::sync::LazyLock<crate::window_counts::WindowCounts> =
    std::sync::LazyLock::new(|| {
        crate::window_counts::WindowCounts::new(1, Duration::from_secs(3600), 1024)
    });

/// The TLS handshake on our own socket, by lettre (its verification as
/// `params` says).
///
/// # Errors
/// lettre's, for the handshake.
#[allow(deprecated)]
async fn upgrade(
    tcp: TcpStream,
    params: &TlsParameters,
) -> Result<AsyncNetworkStream, lettre::transport::smtp::Error> {
    let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
    stream.upgrade_tls(params.clone()).await?;
    Ok(stream)
}

/// How far a transaction got: the command whose reply was missing or
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Mail,
    Rcpt,
    /// `DATA`, or the message and its final reply.
    Data,
}

/// A failed transaction: lettre's error, and the command it answered.
struct TransactionError {
    /// `None`: no reply to `MAIL` within the bound for reused connections.
    error: Option<lettre::transport::smtp::Error>,
    stage: Stage,
    /// The connection is out of step with the upstream (a pipelined group
    /// whose later replies could not be read, or a `354` to a `DATA` that
    /// followed a refusal): it must be closed, without `RSET` or `QUIT`.
    broken: bool,
}

impl TransactionError {
    fn status(&self) -> Option<u16> {
        self.error.as_ref()?.status().map(u16::from)
    }

    fn classify(&self, name: &str, stage: &str) -> AttemptError {
        match &self.error {
            Some(e) => classify(name, stage, e),
            None => AttemptError::Failed(format!(
                "{name}: no timely reply to MAIL on a reused connection"
            )),
        }
    }
}

/// How long `MAIL` on a reused connection waits for its reply. A smarthost
/// that went away without closing the connection (a crash, a dropped
/// route) would otherwise hold the message for the whole attempt; after
/// this (or half the attempt's time, when that is shorter), the message
/// goes over a new connection, where `MAIL` has the rest of the attempt.
/// Answering `MAIL` takes a working server milliseconds.
const REUSED_MAIL_TIMEOUT: Duration = Duration::from_secs(5);

/// `552` to `RCPT` as `452` (RFC 5321 4.5.3.1.10): it long meant "too many
/// recipients", and a client SHOULD take it as temporary. Nothing was sent
/// yet, so the delivery goes on as after any `4xx` (the next upstream, else
/// `451` and the use is kept), instead of the sender hearing a `5xx` for a
/// condition that may clear. The enhanced code gets class 4 too; the
/// upstream's own reply stays in the text, for the log. `552` to `MAIL`
/// (`SIZE=`) or after the data is left as it is: that one is final.
fn rcpt_552_is_temporary(error: AttemptError) -> AttemptError {
    match error {
        AttemptError::Reply {
            code: 552,
            enhanced,
            text,
        } => AttemptError::Reply {
            code: 452,
            enhanced: format!("4{}", enhanced.get(1..).unwrap_or(".0.0")),
            text: format!("552 {enhanced} to RCPT, taken as temporary: {text}"),
        },
        other => other,
    }
}

/// `MAIL`, one `RCPT` per recipient, `DATA` and the message: lettre's own
/// `send`, plus `SIZE=` on `MAIL` when the host offers SIZE (RFC 1870 5),
/// so that a host that counts differently from us refuses at once instead
/// of after the whole body. [`unfit`] has checked the extensions the
/// parameters need.
///
/// With `pipelining` (the host offered it, RFC 2920) `MAIL`, the `RCPT`s
/// and `DATA` go in one write and their replies are read in order: one
/// round trip instead of two or more, as Postfix's `smtp` does. The body
/// is sent only after `DATA`'s `354`, which comes only if `MAIL` and a
/// `RCPT` were accepted; a refusal is returned with the stage it answered,
/// once every reply of the group was read, so the connection is between
/// transactions again (`RSET` and reuse, as without pipelining). A `354`
/// after a refusal (normal when another recipient was accepted, allowed
/// even when none was) leaves a data phase open that we will not fill:
/// that connection is dropped, which ends the transaction without a
/// message (RFC 5321 4.1.1.4: no `.`, no mail).
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &LettreEnvelope,
    message: &[u8],
    size_offered: bool,
    pipelining: bool,
    mail_limit: Option<Duration>,
) -> Result<lettre::transport::smtp::response::Response, TransactionError> {
    let mut parameters = Vec::new();
    if size_offered {
        parameters.push(MailParameter::Size(message.len()));
    }
    if non_ascii_address(envelope) {
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !message.is_ascii() {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mail = Mail::new(envelope.from().cloned(), parameters);
    if pipelining {
        return pipelined(conn, envelope, message, mail, mail_limit).await;
    }
    mail_reply(conn.command(mail), mail_limit)
        .await?
        .map_err(at(Stage::Mail))?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(at(Stage::Rcpt))?;
    }
    conn.command(Data).await.map_err(at(Stage::Data))?;
    // lettre ends the data with CRLF `.` CRLF whatever it ends with; the
    // message's own final CRLF is that first CRLF, else the upstream gets
    // an empty line more than we have (and 2 bytes more than `SIZE=` said).
    conn.message(message.strip_suffix(b"\r\n").unwrap_or(message))
        .await
        .map_err(at(Stage::Data))
}

/// [`transaction`] with PIPELINING: `MAIL`, the `RCPT`s and `DATA` in one
/// write, then their replies in order, then the message.
async fn pipelined(
    conn: &mut AsyncSmtpConnection,
    envelope: &LettreEnvelope,
    message: &[u8],
    mail: Mail,
    mail_limit: Option<Duration>,
) -> Result<lettre::transport::smtp::response::Response, TransactionError> {
    use std::fmt::Write as _;
    let mut group = mail.to_string();
    for to in envelope.to() {
        let _ = write!(group, "{}", Rcpt::new(to.clone(), Vec::new()));
    }
    let _ = write!(group, "{Data}");
    // `command` writes the whole group and reads the first reply, `MAIL`'s.
    let first = mail_reply(conn.command(group), mail_limit).await?;
    // Every reply of the group is read, in order, before anything else is
    // decided: only then is the connection between transactions again. The
    // first refusal is what the transaction failed at.
    let stages = std::iter::once(Stage::Mail)
        .chain(envelope.to().iter().map(|_| Stage::Rcpt))
        .chain(std::iter::once(Stage::Data));
    let mut first = Some(first);
    let mut refused: Option<TransactionError> = None;
    let mut data_open = false;
    for stage in stages {
        let reply = match first.take() {
            Some(reply) => reply,
            None => conn.read_response().await,
        };
        let error = match reply {
            Ok(_) => {
                data_open = stage == Stage::Data;
                continue;
            }
            Err(error) => error,
        };
        let status = error.status().map(u16::from);
        let failed = TransactionError {
            error: Some(error),
            stage,
            broken: false,
        };
        match status {
            // The connection failed, or the host is closing it (`421`):
            // nothing more will come. An earlier refusal stays the answer
            // (a `550` to `RCPT` then `421` to `DATA` is still the `550`,
            // as without pipelining, where `DATA` is never sent).
            None | Some(421) => {
                return Err(TransactionError {
                    broken: true,
                    ..refused.unwrap_or(failed)
                });
            }
            Some(_) => {
                refused.get_or_insert(failed);
            }
        }
    }
    if let Some(refusal) = refused {
        return Err(TransactionError {
            broken: data_open,
            ..refusal
        });
    }
    conn.message(message.strip_suffix(b"\r\n").unwrap_or(message))
        .await
        .map_err(at(Stage::Data))
}

/// One reply as lettre reads it: a positive one, or the refusal (or
/// failure) as an error.
type Reply = Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error>;

/// The reply to `MAIL`, waited for at most `limit` when given (a reused
/// connection, see [`REUSED_MAIL_TIMEOUT`]): no reply by then is a failure
/// at `MAIL` without an answer.
async fn mail_reply(
    reply: impl std::future::Future<Output = Reply>,
    limit: Option<Duration>,
) -> Result<Reply, TransactionError> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, reply)
            .await
            .map_err(|_| TransactionError {
                error: None,
                stage: Stage::Mail,
                broken: false,
            }),
        None => Ok(reply.await),
    }
}

/// lettre's error as a refusal or failure at `stage`.
fn at(stage: Stage) -> impl Fn(lettre::transport::smtp::Error) -> TransactionError {
    move |error| TransactionError {
        error: Some(error),
        stage,
        broken: false,
    }
}

/// What the EHLO reply said about SIZE (RFC 1870 4): `None` when it is not
/// offered, `Some(0)` when offered without a fixed limit (`SIZE`, `SIZE 0`,
/// or a number we cannot read: the host then judges by itself), else the
/// limit in bytes. `lines` are the reply's text lines, without the code.
fn advertised_size<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    lines.into_iter().find_map(|line| {
        let mut words = line.split_whitespace();
        if !words.next()?.eq_ignore_ascii_case("SIZE") {
            return None;
        }
        Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
    })
}

/// The text lines of the `250` reply (the EHLO reply) among the replies
/// recorded up to it; the greeting (`220`) is passed over.
fn ehlo_lines(replies: &[u8]) -> Vec<&str> {
    replies
        .split(|&b| b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            match line.as_bytes() {
                [b'2', b'5', b'0', b' ' | b'-', ..] => Some(&line[4..]),
                _ => None,
            }
        })
        .collect()
}

/// Why this host cannot take this message, from what its EHLO announced
/// (`size` as [`advertised_size`] read it).
///
/// 8-bit content is never converted to 7 bits here (RFC 6152 section 3
/// would allow it): re-encoding the body breaks every DKIM signature over it,
/// the original sender's and our own, so the target would see a forged-looking
/// message. The size compared is the message as it goes out (our trace
/// header and signatures included), which is what the host counts.
///
/// # Errors
/// [`AttemptError::Unsupported`] naming what is missing.
fn unfit(
    name: &str,
    server: &ServerInfo,
    size: Option<u64>,
    envelope: &LettreEnvelope,
    message: &[u8],
) -> Result<(), AttemptError> {
    let unsupported = |reason, text| Err(AttemptError::Unsupported { reason, text });
    if non_ascii_address(envelope) && !server.supports_feature(Extension::SmtpUtfEight) {
        return unsupported(
            Unfit::NoSmtpUtf8,
            format!("{name} does not offer SMTPUTF8, and an envelope address is not ASCII"),
        );
    }
    if !message.is_ascii() && !server.supports_feature(Extension::EightBitMime) {
        return unsupported(
            Unfit::No8BitMime,
            format!("{name} does not offer 8BITMIME, and the message has 8-bit content"),
        );
    }
    match size {
        Some(limit) if limit > 0 && message.len() as u64 > limit => unsupported(
            Unfit::TooLarge,
            format!(
                "{name} takes messages up to {limit} bytes (SIZE), and this one has {}",
                message.len()
            ),
        ),
        _ => Ok(()),
    }
}

fn non_ascii_address(envelope: &LettreEnvelope) -> bool {
    envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii())
}

async fn connect(addrs: &[SocketAddr], each: Duration) -> Result<TcpStream, AttemptError> {
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        match tokio::time::timeout(each, TcpStream::connect(addr)).await {
            Err(_) => last = format!("{addr}: connect: no answer within {each:?}"),
            Ok(Err(e)) => last = format!("{addr}: connect: {e}"),
            Ok(Ok(s)) => {
                s.set_nodelay(true)
                    .map_err(|e| AttemptError::Failed(format!("{addr}: TCP_NODELAY: {e}")))?;
                return Ok(s);
            }
        }
    }
    Err(AttemptError::Failed(last))
}

/// Maps a lettre error to a reply (the upstream answered) or a failure.
fn classify(name: &str, stage: &str, e: &lettre::transport::smtp::Error) -> AttemptError {
    let Some(code) = e.status().map(u16::from) else {
        return AttemptError::Failed(format!("{name}: {stage}: {e}"));
    };
    // lettre renders "permanent error (550): <upstream text>".
    let full = e.to_string();
    let text = full
        .split_once("): ")
        .map(|(_, t)| t.trim())
        .unwrap_or("")
        .to_string();
    let (enhanced, text) = split_enhanced(&text, code);
    AttemptError::Reply {
        code,
        enhanced,
        text,
    }
}

/// Splits a leading enhanced status code (`5.1.1 text`) off upstream text, or
/// makes a generic one of the right class.
pub fn split_enhanced(text: &str, code: u16) -> (String, String) {
    if let Some((first, rest)) = text.split_once(' ') {
        let parts: Vec<&str> = first.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && parts[0] == (code / 100).to_string()
        {
            return (first.to_string(), rest.to_string());
        }
    }
    (format!("{}.0.0", code / 100), text.to_string())
}

/// A stream that keeps a copy of what the upstream says until
/// [`Replies::stop`]: the greeting and the EHLO reply that lettre reads
/// through it, so that the keywords lettre drops (`SIZE`) can be read.
#[derive(Debug)]
struct Recorded<S> {
    inner: S,
    replies: Replies,
}

/// The copy a [`Recorded`] stream keeps, shared with the caller because
/// lettre owns the stream. `None` once stopped. A std mutex: only locked
/// for a copy, never across an `.await`.
#[derive(Debug, Clone)]
struct Replies(Arc<Mutex<Option<Vec<u8>>>>);

impl Replies {
    /// More than any greeting and EHLO reply (a few hundred bytes; lettre
    /// itself allows 1,000 bytes a line and 100,000 a reply); beyond it
    /// nothing more is kept.
    const MAX: usize = 16 * 1024;

    fn new() -> Self {
        Self(Arc::new(Mutex::new(Some(Vec::new()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        // Every update is one append: a panic cannot leave it half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the recording and gives what was read until now.
    fn stop(&self) -> Option<Vec<u8>> {
        self.lock().take()
    }
}

impl<S> Recorded<S> {
    fn new(inner: S, replies: &Replies) -> Self {
        Self {
            inner,
            replies: replies.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            if let Some(replies) = this.replies.lock().as_mut() {
                let new = &buf.filled()[before..];
                let room = Replies::MAX.saturating_sub(replies.len());
                replies.extend_from_slice(&new[..new.len().min(room)]);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncTokioStream> AsyncTokioStream for Recorded<S> {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
}

/// A TLS stream made before lettre sees it (on our own socket: implicit
/// TLS, or after our `STARTTLS`), handed to lettre as if it were a plain
/// transport.
#[derive(Debug)]
#[allow(deprecated)]
struct Tls {
    stream: Compat<AsyncNetworkStream>,
    /// Read before the stream: what lettre takes for the greeting.
    greeting: &'static [u8],
}

impl Tls {
    /// The greeting lettre reads after STARTTLS. The real one came in
    /// plaintext and RFC 3207 sends none after the handshake, but the only
    /// way to a lettre connection, `connect_with_transport`, reads one
    /// before its EHLO. lettre discards it unread; it never reaches a log.
    const AFTER_STARTTLS: &'static [u8] = b"220 greeted before STARTTLS\r\n";

    /// Implicit TLS: the upstream's greeting comes over it.
    #[allow(deprecated)]
    fn implicit(stream: AsyncNetworkStream) -> Self {
        Self {
            stream: stream.compat(),
            greeting: b"",
        }
    }

    /// After STARTTLS: lettre is given [`Tls::AFTER_STARTTLS`] first.
    #[allow(deprecated)]
    fn after_starttls(stream: AsyncNetworkStream) -> Self {
        Self {
            stream: stream.compat(),
            greeting: Self::AFTER_STARTTLS,
        }
    }
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.greeting.is_empty() {
            let n = this.greeting.len().min(buf.remaining());
            buf.put_slice(&this.greeting[..n]);
            this.greeting = &this.greeting[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for Tls {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().peer_addr()
    }
}

/// The plaintext socket lent to lettre until STARTTLS, then taken back
/// ([`Handoff::take`]) for the TLS handshake: lettre's connection owns
/// its stream and gives no way to get it back. Empty after the take, it
/// answers every read and write with `NotConnected`. A std mutex: locked
/// for one poll or the take, never across an `.await`; never contended
/// (the open future is the only user).
#[derive(Debug, Clone)]
struct Handoff(Arc<Mutex<Option<TcpStream>>>);

impl Handoff {
    fn new(tcp: TcpStream) -> Self {
        Self(Arc::new(Mutex::new(Some(tcp))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<TcpStream>> {
        // The one change is the take: a panic cannot leave it torn.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The socket, which the lent stream no longer reaches.
    fn take(&self) -> Option<TcpStream> {
        self.lock().take()
    }

    /// `f` on the socket, or `NotConnected` once it was taken.
    fn with<T>(
        &self,
        f: impl FnOnce(Pin<&mut TcpStream>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match self.lock().as_mut() {
            Some(tcp) => f(Pin::new(tcp)),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncRead for Handoff {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.with(|tcp| tcp.poll_read(cx, buf))
    }
}

impl AsyncWrite for Handoff {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.with(|tcp| tcp.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|tcp| tcp.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|tcp| tcp.poll_shutdown(cx))
    }
}

impl AsyncTokioStream for Handoff {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        match self.lock().as_ref() {
            Some(tcp) => tcp.peer_addr(),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_enhanced_codes() {
        assert_eq!(
            split_enhanced("5.1.1 no such user", 550),
            ("5.1.1".into(), "no such user".into())
        );
        assert_eq!(
            split_enhanced("go away", 554),
            ("5.0.0".into(), "go away".into())
        );
        // An enhanced code of the wrong class is not trusted.
        assert_eq!(split_enhanced("4.1.1 x", 550).0, "5.0.0");
    }

    #[test]
    fn a_552_to_rcpt_is_temporary() {
        let reply = |code: u16, enhanced: &str| AttemptError::Reply {
            code,
            enhanced: enhanced.into(),
            text: "too many recipients".into(),
        };
        assert_eq!(
            rcpt_552_is_temporary(reply(552, "5.5.3")),
            AttemptError::Reply {
                code: 452,
                enhanced: "4.5.3".into(),
                text: "552 5.5.3 to RCPT, taken as temporary: too many recipients".into(),
            }
        );
        // Any other refusal to RCPT stays what it is.
        assert_eq!(
            rcpt_552_is_temporary(reply(550, "5.1.1")),
            reply(550, "5.1.1")
        );
        assert_eq!(
            rcpt_552_is_temporary(reply(452, "4.5.3")),
            reply(452, "4.5.3")
        );
    }

    /// A one-connection upstream on loopback that answers every command
    /// with success and returns the raw bytes it got after `354`, up to
    /// and including the end-of-data line.
    async fn data_catcher() -> (Vec<SocketAddr>, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"220 catcher.example ESMTP\r\n").await.unwrap();
            let mut data = Vec::new();
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await.unwrap() == 0 {
                    return data;
                }
                let verb = line.get(..4).unwrap_or(&line).to_ascii_uppercase();
                let reply: &[u8] = match &verb[..] {
                    b"EHLO" => b"250-catcher.example\r\n250 8BITMIME\r\n",
                    b"QUIT" => b"221 bye\r\n",
                    b"DATA" => {
                        w.write_all(b"354 go ahead\r\n").await.unwrap();
                        // Every line as it came, the terminator included.
                        loop {
                            line.clear();
                            assert_ne!(r.read_until(b'\n', &mut line).await.unwrap(), 0);
                            data.extend_from_slice(&line);
                            if line == b".\r\n" {
                                break;
                            }
                        }
                        b"250 2.0.0 ok\r\n"
                    }
                    _ => b"250 2.0.0 ok\r\n",
                };
                w.write_all(reply).await.unwrap();
                if verb == b"QUIT" {
                    return data;
                }
            }
        });
        (vec![addr], task)
    }

    /// The EHLO name the tests' client says.
    fn test_helo() -> ClientId {
        ClientId::Domain("tempalias.test".into())
    }

    /// A target at `addrs`, without AUTH or a pool.
    fn test_target<'a>(
        name: &'a str,
        addrs: &'a [SocketAddr],
        tls: &'a TlsPolicy,
        helo: &'a ClientId,
    ) -> Target<'a> {
        Target {
            name,
            addrs,
            tls,
            credentials: None,
            helo,
            connect_timeout: Duration::from_secs(5),
            pool: None,
        }
    }

    /// `a@b.example` to `c@d.example`.
    fn test_envelope() -> LettreEnvelope {
        LettreEnvelope::new(
            Some("a@b.example".parse().unwrap()),
            vec!["c@d.example".parse().unwrap()],
        )
        .unwrap()
    }

    /// What an upstream receives between `354` and the end of the data for
    /// `message`.
    async fn data_on_the_wire(message: &[u8]) -> Vec<u8> {
        let (addrs, catcher) = data_catcher().await;
        let tls = TlsPolicy::Opportunistic(unverified_tls("127.0.0.1").unwrap());
        let helo = test_helo();
        let target = test_target("catcher", &addrs, &tls, &helo);
        send(&target, &test_envelope(), message).await.unwrap();
        // QUIT runs on its own after the reply; the catcher ends with it.
        tokio::time::timeout(Duration::from_secs(10), catcher)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn the_data_is_dot_stuffed_and_ends_in_one_crlf_dot_crlf() {
        let cases: [(&[u8], &[u8]); 5] = [
            // The usual message: its final CRLF is the terminator's first.
            (
                b"Subject: a\r\n\r\nbody\r\n",
                b"Subject: a\r\n\r\nbody\r\n.\r\n",
            ),
            // No final CRLF: one is added before the dot, nothing more.
            (
                b"Subject: b\r\n\r\nno line end",
                b"Subject: b\r\n\r\nno line end\r\n.\r\n",
            ),
            // A last line of "." must not end the data early.
            (
                b"Subject: c\r\n\r\nbody\r\n.\r\n",
                b"Subject: c\r\n\r\nbody\r\n..\r\n.\r\n",
            ),
            // Lines starting with "." in the middle are stuffed, others not.
            (
                b"Subject: d\r\n\r\n.hidden\r\na.b\r\n..two\r\n.\r\nafter\r\n",
                b"Subject: d\r\n\r\n..hidden\r\na.b\r\n...two\r\n..\r\nafter\r\n.\r\n",
            ),
            // The first line starting with ".".
            (b".first\r\n", b"..first\r\n.\r\n"),
        ];
        for (message, expected) in cases {
            let got = data_on_the_wire(message).await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(expected),
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn reads_size_from_the_ehlo_reply() {
        let recorded = b"220-fake.example ESMTP\r\n220 SIZE 1 is not EHLO\r\n\
            250-fake.example\r\n250-PIPELINING\r\n250-size 52428800\r\n250 8BITMIME\r\n";
        let lines = ehlo_lines(recorded);
        assert_eq!(
            lines,
            ["fake.example", "PIPELINING", "size 52428800", "8BITMIME"]
        );
        assert_eq!(advertised_size(lines), Some(52_428_800));
        // Offered without a fixed limit (RFC 1870 4): 0.
        assert_eq!(advertised_size(["x", "SIZE"]), Some(0));
        assert_eq!(advertised_size(["SIZE 0"]), Some(0));
        assert_eq!(advertised_size(["SIZE lots"]), Some(0));
        assert_eq!(advertised_size(["SIZEX 10", "PIPELINING"]), None);
        assert_eq!(
            advertised_size(ehlo_lines(b"220 hi\r\n250 fake.example\r\n")),
            None
        );
    }

    #[test]
    fn a_message_over_the_size_does_not_fit_and_one_at_it_does() {
        let server = |lines: &str| ServerInfo::from_response(&lines.parse().unwrap()).unwrap();
        let eight = server("250-fake.example\r\n250 8BITMIME\r\n");
        let seven = server("250 fake.example\r\n");
        let envelope = LettreEnvelope::new(
            Some("a@b.example".parse().unwrap()),
            vec!["c@d.example".parse().unwrap()],
        )
        .unwrap();
        let m = [b'x'; 100];
        let fits = |server, size, message: &[u8]| unfit("h", server, size, &envelope, message);
        assert_eq!(fits(&seven, Some(100), &m), Ok(()));
        assert_eq!(fits(&seven, Some(0), &m), Ok(()));
        assert_eq!(fits(&seven, None, &m), Ok(()));
        match fits(&seven, Some(99), &m) {
            Err(AttemptError::Unsupported { reason, text }) => {
                assert_eq!(reason, Unfit::TooLarge);
                assert_eq!(
                    text,
                    "h takes messages up to 99 bytes (SIZE), and this one has 100"
                );
            }
            other => panic!("{other:?}"),
        }
        // 8-bit content that is also too big: the missing extension is named.
        let eight_bit = "\u{fc}".repeat(60);
        assert!(matches!(
            fits(&seven, Some(99), eight_bit.as_bytes()),
            Err(AttemptError::Unsupported {
                reason: Unfit::No8BitMime,
                ..
            })
        ));
        assert!(matches!(
            fits(&eight, Some(99), eight_bit.as_bytes()),
            Err(AttemptError::Unsupported {
                reason: Unfit::TooLarge,
                ..
            })
        ));
        assert_eq!(Unfit::TooLarge.codes(), (552, "5.3.4"));
    }

    /// What a STARTTLS upstream does with the `STARTTLS` command.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Offer {
        /// Offered and accepted.
        StartTls,
        /// Offered, then refused with `454` (RFC 3207: TLS not available).
        Refuse454,
        /// Not offered.
        NoStartTls,
        /// Accepted, with a fake EHLO reply (SIZE 10) in plaintext right
        /// after the 220, in the same write (response injection).
        Inject,
    }

    /// A one-connection upstream on loopback that offers STARTTLS as
    /// `offer` says, with a certificate for 127.0.0.1 (its PEM is
    /// returned), and logs what it hears in order: `220` when it greeted,
    /// each command line, `TLS` when the handshake is done, `EOF`. Its
    /// EHLO reply before TLS announces `SIZE 10` when it will accept
    /// STARTTLS (so a message taken on that word would not fit), and
    /// `SIZE 100000` over TLS; each EHLO reply goes out in two writes.
    async fn starttls_upstream(
        offer: Offer,
    ) -> (
        Vec<SocketAddr>,
        String,
        tokio::task::JoinHandle<Vec<String>>,
    ) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::try_from(pair.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut sock, _) = listener.accept().await.unwrap();
            sock.set_nodelay(true).unwrap();
            let mut log = Vec::new();
            sock.write_all(b"220 upstream.test ESMTP\r\n")
                .await
                .unwrap();
            log.push("220".to_string());
            let plain = match offer {
                Offer::StartTls => "250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 10\r\n",
                Offer::Inject => "250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 100000\r\n",
                Offer::Refuse454 => "250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 100000\r\n",
                Offer::NoStartTls => "250-PIPELINING\r\n250 SIZE 100000\r\n",
            };
            let Some(tcp) = converse(sock, &mut log, plain, offer).await else {
                return log;
            };
            let tls = acceptor.accept(tcp).await.unwrap();
            log.push("TLS".to_string());
            converse(tls, &mut log, "250 SIZE 100000\r\n", Offer::NoStartTls).await;
            log
        });
        (vec![addr], cert.pem(), task)
    }

    /// The upstream's side of one phase (plaintext, or TLS) of a session:
    /// answers until `QUIT` or the end, or until it accepts `STARTTLS`,
    /// when it gives the stream back for the handshake.
    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        log: &mut Vec<String>,
        ehlo_rest: &str,
        offer: Offer,
    ) -> Option<S> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                log.push("EOF".to_string());
                return None;
            }
            let command = line.trim_end().to_string();
            log.push(command.clone());
            let verb = command.get(..4).unwrap_or(&command).to_ascii_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => {
                    // Two writes, flushed apart: the reply may come to
                    // the client in more than one read.
                    stream.write_all(b"250-upstream.test\r\n").await.ok()?;
                    stream.flush().await.ok()?;
                    tokio::task::yield_now().await;
                    ehlo_rest
                }
                "STAR" => match offer {
                    Offer::StartTls => {
                        stream.write_all(b"220 2.0.0 go ahead\r\n").await.ok()?;
                        stream.flush().await.ok()?;
                        // The client waits for the 220: nothing of its
                        // handshake can have been read as a line.
                        assert!(stream.buffer().is_empty());
                        return Some(stream.into_inner());
                    }
                    Offer::Inject => {
                        stream
                            .write_all(b"220 2.0.0 go ahead\r\n250-injected\r\n250 SIZE 10\r\n")
                            .await
                            .ok()?;
                        stream.flush().await.ok()?;
                        return Some(stream.into_inner());
                    }
                    Offer::Refuse454 => "454 4.7.0 TLS not available\r\n",
                    Offer::NoStartTls => "502 5.5.1 not offered\r\n",
                },
                "DATA" => {
                    stream.write_all(b"354 go ahead\r\n").await.ok()?;
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            log.push("EOF".to_string());
                            return None;
                        }
                        if line == ".\r\n" {
                            break;
                        }
                    }
                    "250 2.0.0 queued\r\n"
                }
                "QUIT" => {
                    let _ = stream.write_all(b"221 bye\r\n").await;
                    return None;
                }
                _ => "250 2.0.0 ok\r\n",
            };
            stream.write_all(reply.as_bytes()).await.ok()?;
            stream.flush().await.ok()?;
        }
    }

    /// One message to a [`starttls_upstream`] over a new connection made
    /// under `policy` (given the upstream's certificate); the outcome and
    /// what the upstream heard.
    async fn deliver_to(
        offer: Offer,
        policy: impl FnOnce(&str) -> TlsPolicy,
    ) -> (Result<(), AttemptError>, Vec<String>) {
        deliver_named("upstream", offer, policy).await
    }

    /// [`deliver_to`] with the upstream's name for the logs.
    async fn deliver_named(
        name: &str,
        offer: Offer,
        policy: impl FnOnce(&str) -> TlsPolicy,
    ) -> (Result<(), AttemptError>, Vec<String>) {
        let (addrs, ca, upstream) = starttls_upstream(offer).await;
        let tls = policy(&ca);
        let helo = test_helo();
        let target = test_target(name, &addrs, &tls, &helo);
        let outcome = send(&target, &test_envelope(), b"Subject: t\r\n\r\nbody\r\n").await;
        // QUIT (after a delivery) runs on its own; the upstream ends with
        // it, or with the connection.
        let log = tokio::time::timeout(Duration::from_secs(10), upstream)
            .await
            .unwrap()
            .unwrap();
        (outcome, log)
    }

    fn opportunistic(_: &str) -> TlsPolicy {
        TlsPolicy::Opportunistic(unverified_tls("127.0.0.1").unwrap())
    }

    fn required(ca: &str) -> TlsPolicy {
        TlsPolicy::Required(verified_tls("127.0.0.1", ca.as_bytes()).unwrap())
    }

    /// The commands before `MAIL`: each is one round trip.
    fn before_mail(log: &[String]) -> Vec<&str> {
        log.iter()
            .map(String::as_str)
            .take_while(|l| !l.starts_with("MAIL"))
            .collect()
    }

    #[tokio::test]
    async fn a_new_starttls_connection_says_ehlo_once_before_tls_and_once_after() {
        for policy in [opportunistic as fn(&str) -> TlsPolicy, required] {
            let (outcome, log) = deliver_to(Offer::StartTls, policy).await;
            assert_eq!(outcome, Ok(()), "{log:?}");
            // RFC 3207's minimum: greeting, EHLO, STARTTLS, handshake,
            // EHLO; then the transaction. Three commands before MAIL (an
            // earlier version needed four: a third EHLO for SIZE).
            assert_eq!(
                before_mail(&log),
                [
                    "220",
                    "EHLO tempalias.test",
                    "STARTTLS",
                    "TLS",
                    "EHLO tempalias.test"
                ],
                "{log:?}"
            );
            assert_eq!(log.iter().filter(|l| l.starts_with("EHLO")).count(), 2);
            // SIZE came from the EHLO over TLS (the one before said 10,
            // which this message exceeds) and went on MAIL.
            let mail = log.iter().find(|l| l.starts_with("MAIL")).unwrap();
            assert_eq!(mail, "MAIL FROM:<a@b.example> SIZE=20", "{log:?}");
            assert_eq!(
                &log[log.len() - 3..],
                ["RCPT TO:<c@d.example>", "DATA", "QUIT"],
                "{log:?}"
            );
        }
    }

    #[tokio::test]
    async fn plaintext_sent_behind_the_220_is_never_read_inside_tls() {
        for policy in [opportunistic as fn(&str) -> TlsPolicy, required] {
            let (outcome, log) = deliver_to(Offer::Inject, policy).await;
            assert_eq!(outcome, Ok(()), "{log:?}");
            let mail = log.iter().find(|l| l.starts_with("MAIL")).unwrap();
            assert_eq!(mail, "MAIL FROM:<a@b.example> SIZE=20", "{log:?}");
        }
    }

    #[tokio::test]
    async fn a_plaintext_connection_says_ehlo_once() {
        let (outcome, log) = deliver_to(Offer::NoStartTls, opportunistic).await;
        assert_eq!(outcome, Ok(()), "{log:?}");
        assert_eq!(before_mail(&log), ["220", "EHLO tempalias.test"], "{log:?}");
        assert!(log.iter().any(|l| l.ends_with("SIZE=20")), "{log:?}");
    }

    #[tokio::test]
    async fn starttls_not_offered_fails_when_required() {
        let (outcome, log) = deliver_to(Offer::NoStartTls, required).await;
        let error = outcome.unwrap_err();
        assert_eq!(
            error,
            AttemptError::Failed("upstream: STARTTLS is required but not offered".into())
        );
        assert!(error.is_failure());
        assert!(!log.iter().any(|l| l.starts_with("MAIL")), "{log:?}");
    }

    #[tokio::test]
    async fn starttls_refused_fails_when_required() {
        let (outcome, log) = deliver_to(Offer::Refuse454, required).await;
        match outcome {
            Err(e @ AttemptError::Failed(_)) => {
                assert!(e.is_failure());
                let text = e.to_string();
                assert!(
                    text.starts_with("upstream: STARTTLS: ") && text.contains("454"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(!log.iter().any(|l| l.starts_with("MAIL")), "{log:?}");
    }

    #[tokio::test]
    async fn starttls_refused_goes_on_in_plaintext_when_opportunistic() {
        // As Postfix does at smtp_tls_security_level = may: the same
        // connection, its EHLO still standing, no second EHLO.
        let (outcome, log) = deliver_to(Offer::Refuse454, opportunistic).await;
        assert_eq!(outcome, Ok(()), "{log:?}");
        assert_eq!(
            before_mail(&log),
            ["220", "EHLO tempalias.test", "STARTTLS"],
            "{log:?}"
        );
        assert!(!log.iter().any(|l| l == "TLS"), "{log:?}");
        assert!(log.iter().any(|l| l.ends_with("SIZE=20")), "{log:?}");
    }

    #[tokio::test]
    async fn a_refused_starttls_is_logged_through_the_throttle() {
        // A name of its own: the throttle is shared by the whole process.
        let name = "refuses-starttls.throttle.test";
        let (outcome, log) = deliver_named(name, Offer::Refuse454, opportunistic).await;
        assert_eq!(outcome, Ok(()), "{log:?}");
        // The refusal took this host's line for the hour: the next is not
        // logged at info.
        assert!(!STARTTLS_REFUSALS.allow(name));
    }

    /// A stream that gives its replies a few bytes per read, and keeps
    /// what is written to it.
    #[derive(Debug)]
    struct Trickle {
        replies: &'static [u8],
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            let n = this.replies.len().min(buf.remaining()).min(3);
            buf.put_slice(&this.replies[..n]);
            this.replies = &this.replies[n..];
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncTokioStream for Trickle {
        fn peer_addr(&self) -> std::io::Result<SocketAddr> {
            Ok(([127, 0, 0, 1], 25).into())
        }
    }

    #[tokio::test]
    async fn a_multi_line_ehlo_reply_split_across_reads_is_read_whole() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let stream = Trickle {
            replies: b"220-upstream.test ESMTP\r\n220 SIZE 1 is not EHLO\r\n\
                250-upstream.test\r\n250-8BITMIME\r\n250-SIZE 4242\r\n250 STARTTLS\r\n",
            written: written.clone(),
        };
        let tls = TlsPolicy::Opportunistic(unverified_tls("127.0.0.1").unwrap());
        let helo = test_helo();
        let target = test_target("upstream", &[], &tls, &helo);
        let greeted = greet(&target, stream, "greeting or EHLO").await.unwrap();
        assert_eq!(greeted.size, Some(4242));
        assert!(greeted
            .conn
            .server_info()
            .supports_feature(Extension::EightBitMime));
        assert!(greeted.conn.can_starttls());
        assert_eq!(*written.lock().unwrap(), b"EHLO tempalias.test\r\n");
    }

    #[test]
    fn splits_pem_bundles() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let bundle = format!("junk\n{one}\n{one}\n");
        assert_eq!(split_pem(bundle.as_bytes()), vec![one, one]);
        assert!(split_pem(b"nothing").is_empty());
    }
}
