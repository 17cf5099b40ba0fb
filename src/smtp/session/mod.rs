//! One SMTP session: the state machine from greeting to QUIT.
//!
//! The session owns the connection (plain or TLS, see [`stream`]) and is
//! generic over it and over its two backends ([`AliasStore`], [`Upstream`]),
//! so the protocol is tested in-process over `tokio::io::duplex`. Each
//! concern has its own file: [`ehlo`] (greeting, EHLO/HELO, STARTTLS),
//! [`mail`], [`rcpt`] with [`recipient`] (what a recipient address is),
//! [`data`] (framing and the trace header) and [`deliver`] (the upstream and
//! settling the uses).
//!
//! Every valid alias recipient reserves one use of its alias at RCPT time, so
//! two messages racing on different nodes can never exceed the alias's
//! limit. After DATA the message goes upstream once, to all targets; the
//! reservations are committed only when the upstream accepted (and then the
//! client hears `250`; with `smtp.reply_before_commit` the `250` comes first
//! and the commit is written after it) and released otherwise. Any way the transaction ends
//! (RSET, EHLO/HELO, STARTTLS, QUIT, timeout, disconnect, shutdown) releases
//! what is still held; if the node dies instead, the reservation's lease
//! lapses.

mod data;
mod deliver;
mod ehlo;
mod mail;
mod rcpt;
pub mod recipient;
pub mod stream;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::backends::{AliasStore, Reserved, Upstream};
use super::input::{Input, InputError, Line};
use super::limits::FailedRcpts;
use super::tls::{Negotiated, Tls};
use crate::config::SmtpConfig;
use crate::metrics::Metrics;
use stream::Stream;

/// Longest command line accepted (RFC 5321 asks for at least 512; extensions
/// make lines longer, and smtp-proto's own limit is 4096).
const MAX_COMMAND_LINE: usize = 4096;

/// How long a session told to shut down waits for the client's next command
/// (see `close_for_shutdown`); short, as every idle session waits this long.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Syntax errors and unknown commands after which a session is dropped.
const MAX_BAD_COMMANDS: u32 = 20;

/// What every session of a node shares: settings, limits across sessions,
/// TLS, and the two backends.
pub struct Shared<A, U> {
    pub config: SmtpConfig,
    /// Alias domains (lower case).
    pub domains: Vec<String>,
    pub metrics: Arc<Metrics>,
    /// Failed recipients per client address, across sessions.
    pub failures: FailedRcpts,
    /// Bounces reversed per SRS address, across sessions.
    pub bounces: super::bounces::BounceCounts,
    /// `None`: STARTTLS is not offered.
    pub tls: Option<Arc<Tls>>,
    /// SRS, DKIM and ARC for what goes out, and SRS reversal of bounces.
    pub forwarding: Arc<crate::mail::Forwarding>,
    pub aliases: A,
    pub upstream: U,
}

/// Where the session is in the SMTP dialogue (RFC 5321 4.1.4).
#[derive(Debug)]
enum State {
    /// No EHLO/HELO yet: at the start, and again after STARTTLS.
    Connected,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted; recipients are being collected until DATA.
    Transaction(Transaction),
}

/// A recipient accepted in the current transaction.
#[derive(Debug, Clone)]
struct Accepted {
    /// As the client wrote it (tag included), for the `Received:` header.
    address: String,
    kind: AcceptedKind,
}

/// What an accepted recipient holds until the transaction ends.
#[derive(Debug, Clone)]
enum AcceptedKind {
    /// An alias, with the use reserved for this message.
    Alias { id: String, reserved: Reserved },
    /// The postmaster: forwarded to `[smtp] postmaster`, no use counted.
    Postmaster,
    /// A bounce to one of our SRS addresses: the `original` sender it
    /// reverses to gets a report of ours in its place, no use counted.
    Bounce { original: String },
}

/// The transaction in progress (between MAIL and the end of DATA).
#[derive(Debug)]
struct Transaction {
    /// Empty for the null sender.
    mail_from: String,
    rcpts: Vec<Accepted>,
    /// When the first use was reserved (bounds how long it may be held).
    started: Option<Instant>,
}

/// Why the session loop stopped.
enum End {
    Quit,
    Closed,
}

/// One client connection.
pub struct Session<S, A, U> {
    shared: Arc<Shared<A, U>>,
    /// The connection, behind its bounded line reader (which also owns the
    /// write half, so STARTTLS can replace the transport).
    input: Input<Stream<S>>,
    /// Replies queued until the client has no more pipelined commands.
    out: Vec<u8>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    /// Session id, also used in the `Received:` header.
    sid: String,
    state: State,
    /// The name from the last EHLO/HELO (`None` in [`State::Connected`]).
    helo: Option<String>,
    /// The TLS session once negotiated.
    tls: Option<Negotiated>,
    /// Start with a TLS handshake (the implicit-TLS listener).
    implicit_tls: bool,
    failed_rcpts: u32,
    bad_commands: u32,
}

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    pub fn new(
        shared: Arc<Shared<A, U>>,
        stream: S,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        let idle = Duration::from_secs(shared.config.idle_timeout_secs);
        let mut input = Input::new(Stream::Plain(stream), idle);
        input.set_deadline(
            tokio::time::Instant::now() + Duration::from_secs(shared.config.session_timeout_secs),
        );
        Self {
            shared,
            input,
            out: Vec::with_capacity(512),
            peer,
            shutdown,
            sid: crate::alias::new_id(),
            state: State::Connected,
            helo: None,
            tls: None,
            implicit_tls: false,
            failed_rcpts: 0,
            bad_commands: 0,
        }
    }

    /// The session starts with a TLS handshake before the greeting.
    pub fn implicit_tls(mut self) -> Self {
        self.implicit_tls = true;
        self
    }

    /// The session id (also in the `Received:` header and logs).
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// Runs the session to its end; never panics on client input.
    pub async fn run(&mut self) {
        if self.implicit_tls && !self.handshake().await {
            return;
        }
        let host = self.shared.config.hostname.clone();
        let result = match self.converse().await {
            Err(InputError::Idle(_)) => {
                self.reply(421, "4.4.2", &format!("{host} idle too long, closing"));
                let _ = self.flush().await;
                Ok(End::Closed)
            }
            Err(InputError::Deadline) => {
                self.reply(421, "4.4.2", &format!("{host} session too long, closing"));
                let _ = self.flush().await;
                Ok(End::Closed)
            }
            other => other,
        };
        self.reset().await;
        match result {
            Ok(End::Quit) | Ok(End::Closed) => {}
            Err(e) => tracing::debug!(error = %e, "session ended"),
        }
        // Bounded: over TLS this writes a close_notify, which a client that
        // reads nothing more could hold up forever.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.input.get_mut().shutdown()).await;
    }

    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        self.out
            .extend_from_slice(format!("{code} {enhanced} {text}\r\n").as_bytes());
    }

    /// Sends the queued replies. Bounded by the idle timeout: a client that
    /// stops reading its replies must not hold a session slot forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let idle = Duration::from_secs(self.shared.config.idle_timeout_secs);
            let write = async {
                let stream = self.input.get_mut();
                stream.write_all(&self.out).await?;
                stream.flush().await
            };
            tokio::time::timeout(idle, write).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client does not read its replies",
                )
            })??;
            self.out.clear();
        }
        Ok(())
    }

    /// The transaction in progress, if any.
    fn transaction(&self) -> Option<&Transaction> {
        match &self.state {
            State::Transaction(tx) => Some(tx),
            _ => None,
        }
    }

    async fn converse(&mut self) -> Result<End, InputError> {
        let host = self.shared.config.hostname.clone();
        self.out
            .extend_from_slice(format!("220 {host} ESMTP tempalias\r\n").as_bytes());
        loop {
            // PIPELINING: answers are sent when no further command is waiting.
            if !self.input.has_line() {
                self.flush().await?;
            }
            let tx_deadline = self.transaction().and_then(|tx| tx.started).map(|t| {
                tokio::time::Instant::from_std(t)
                    + Duration::from_secs(self.shared.config.transaction_timeout_secs)
            });
            let line = tokio::select! {
                biased;
                _ = async {
                    match tx_deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Held reservations are released when the session ends.
                    self.reply(421, "4.4.2", &format!("{host} transaction took too long, closing"));
                    self.flush().await?;
                    return Ok(End::Closed);
                }
                _ = self.shutdown.cancelled() => return self.close_for_shutdown().await,
                l = self.input.line(MAX_COMMAND_LINE) => l,
            };
            let line = match line {
                Ok(Line::Complete(l)) => l,
                Ok(Line::TooLong { .. }) => {
                    self.reply(500, "5.5.6", "Line too long");
                    if self.bad_command() {
                        return self.close_for_errors().await;
                    }
                    continue;
                }
                Err(InputError::Closed) => return Ok(End::Closed),
                Err(e) => return Err(e),
            };
            match Request::parse(&mut line.iter()) {
                Ok(Request::Rcpt { to }) if to.address.is_empty() => {
                    // smtp-proto gives an empty address for a local part
                    // without a domain, such as the `<postmaster>` RFC 5321
                    // 4.5.1 requires us to accept: judge what was written.
                    self.rcpt(&rcpt::bracketed_address(&line)).await;
                }
                Ok(req) => {
                    let req = req.into_owned();
                    if let Some(end) = self.command(req).await? {
                        return Ok(end);
                    }
                }
                Err(ParseError::InvalidRecipientAddress)
                    if rcpt::is_address_literal_rcpt(&line) =>
                {
                    // smtp-proto does not parse `user@[192.0.2.1]`; such a
                    // recipient goes through the usual checks, where its domain
                    // (we serve no address literals) makes it a relaying attempt.
                    self.rcpt(&rcpt::bracketed_address(&line)).await;
                }
                Err(e) => {
                    self.parse_error(e);
                    if self.bad_command() {
                        return self.close_for_errors().await;
                    }
                }
            }
            if self.failed_rcpts >= self.shared.config.max_failed_rcpts {
                self.reply(
                    421,
                    "4.7.0",
                    &format!("{host} too many failed recipients, closing"),
                );
                self.flush().await?;
                return Ok(End::Closed);
            }
        }
    }

    /// Ends the session because the node shuts down. A client about to say
    /// QUIT (typically right after its message was accepted) gets `221`, as
    /// Postfix answers, instead of a `421` that looks like a failure; any
    /// other command, or none within [`SHUTDOWN_GRACE`], gets `421`.
    async fn close_for_shutdown(&mut self) -> Result<End, InputError> {
        let host = self.shared.config.hostname.clone();
        let next = tokio::time::timeout(SHUTDOWN_GRACE, self.input.line(MAX_COMMAND_LINE)).await;
        match next {
            Ok(Ok(Line::Complete(l)))
                if matches!(Request::parse(&mut l.iter()), Ok(Request::Quit)) =>
            {
                self.reply(221, "2.0.0", &format!("{host} closing connection"));
                self.flush().await?;
                Ok(End::Quit)
            }
            Ok(Err(InputError::Closed)) => Ok(End::Closed),
            _ => {
                self.reply(
                    421,
                    "4.3.0",
                    &format!("{host} shutting down, try again later"),
                );
                self.flush().await?;
                Ok(End::Closed)
            }
        }
    }

    fn bad_command(&mut self) -> bool {
        self.bad_commands += 1;
        self.bad_commands >= MAX_BAD_COMMANDS
    }

    async fn close_for_errors(&mut self) -> Result<End, InputError> {
        let host = self.shared.config.hostname.clone();
        self.reply(421, "4.7.0", &format!("{host} too many errors, closing"));
        self.flush().await?;
        Ok(End::Closed)
    }

    fn parse_error(&mut self, e: ParseError) {
        match e {
            ParseError::UnknownCommand => self.reply(500, "5.5.1", "Command unrecognized"),
            ParseError::InvalidSenderAddress => {
                self.reply(501, "5.1.7", "Bad sender address syntax")
            }
            ParseError::InvalidRecipientAddress => {
                self.reply(501, "5.1.3", "Bad recipient address syntax")
            }
            ParseError::SyntaxError { syntax } => {
                self.reply(501, "5.5.4", &format!("Syntax: {syntax}"))
            }
            ParseError::InvalidParameter { param } => {
                self.reply(501, "5.5.4", &format!("Invalid parameter {param:?}"))
            }
            ParseError::UnsupportedParameter { param } => {
                let param: String = param
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(40)
                    .collect();
                self.reply(555, "5.5.4", &format!("Unsupported parameter {param:?}"))
            }
            ParseError::ResponseTooLong => self.reply(500, "5.5.6", "Line too long"),
            ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
                self.reply(500, "5.5.2", "Syntax error")
            }
        }
    }

    /// Handles one parsed command; `Some` ends the session.
    async fn command(&mut self, req: Request<String>) -> Result<Option<End>, InputError> {
        let host = self.shared.config.hostname.clone();
        match req {
            Request::Ehlo { host: client } => self.ehlo(client, true).await,
            Request::Helo { host: client } => self.ehlo(client, false).await,
            Request::Lhlo { .. } => self.reply(500, "5.5.1", "This is not an LMTP server"),
            Request::StartTls => {
                if !self.starttls().await? {
                    return Ok(Some(End::Closed));
                }
            }
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(&to.address).await,
            Request::Data => self.data().await?,
            Request::Rset => {
                self.reset().await;
                self.reply(250, "2.0.0", "Flushed");
            }
            Request::Noop { .. } => self.reply(250, "2.0.0", "OK"),
            Request::Quit => {
                self.reply(221, "2.0.0", &format!("{host} closing connection"));
                self.flush().await?;
                return Ok(Some(End::Quit));
            }
            Request::Vrfy { .. } => self.reply(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Expn { .. } => self.reply(502, "5.5.1", "EXPN not supported"),
            Request::Help { .. } => self.reply(214, "2.0.0", "See RFC 5321"),
            Request::Auth { .. } => self.reply(
                502,
                "5.5.1",
                "AUTH not available: this is an MX, not a submission server",
            ),
            Request::Bdat { .. } => self.reply(502, "5.5.1", "BDAT not supported; use DATA"),
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.reply(502, "5.5.1", "Command not implemented")
            }
        }
        Ok(None)
    }

    /// Ends the transaction, giving back any uses it holds; the session
    /// stays greeted (if it was).
    async fn reset(&mut self) {
        let state = match self.state {
            State::Connected => State::Connected,
            _ => State::Ready,
        };
        if let State::Transaction(tx) = std::mem::replace(&mut self.state, state) {
            self.settle(tx.rcpts, false).await;
        }
    }
}
