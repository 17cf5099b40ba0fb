//! One SMTP session: the state machine from greeting to QUIT.
//!
//! Every valid recipient reserves one use of its alias through Raft at RCPT
//! time, so two messages racing on different nodes can never exceed the alias's
//! limit. After DATA the message goes upstream once, to all targets; the
//! reservations are committed only when the upstream accepted (and then the
//! client hears `250`) and released otherwise. Any way the transaction ends
//! (RSET, EHLO/HELO, QUIT, timeout, disconnect, shutdown) releases what is
//! still held; if the node dies instead, the reservation's lease lapses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::input::{Input, InputError, Line};
use super::server::SmtpContext;
use crate::metrics::{MessageLabels, MessageResult, RcptLabels, RcptResult};
use crate::raft::{Command, Refusal, Response};
use crate::relay::{Delivery, Envelope};

/// Longest command line accepted (RFC 5321 asks for at least 512; extensions
/// make lines longer, and smtp-proto's own limit is 4096).
const MAX_COMMAND_LINE: usize = 4096;
/// Longest line accepted inside message data. RFC 5321 allows 1000; real mail
/// has longer ones, but not megabytes, and this bounds the input buffer.
const MAX_DATA_LINE: usize = 1024 * 1024;

/// How the data of one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataOutcome {
    Complete,
    TooBig,
    LineTooLong,
}

/// How long a session told to shut down waits for the client's next command
/// (see `close_for_shutdown`); short, as every idle session waits this long.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Syntax errors and unknown commands after which a session is dropped.
const MAX_BAD_COMMANDS: u32 = 20;

/// A recipient accepted in the current transaction, with the use it holds.
#[derive(Debug, Clone)]
struct Accepted {
    alias_id: String,
    address: String,
    target: String,
    reservation: u64,
    /// When the reservation's lease ends at the latest (counted from before
    /// the Reserve was sent, so never later than the replicated one).
    lease_ends: Instant,
}

/// The transaction in progress (between MAIL and the end of DATA).
#[derive(Debug, Default)]
struct Transaction {
    /// `None` before MAIL; `Some("")` for the null sender.
    mail_from: Option<String>,
    rcpts: Vec<Accepted>,
    /// When the first recipient was accepted (its reservation taken).
    started: Option<Instant>,
}

/// Why the session loop stopped.
enum End {
    Quit,
    Closed,
}

/// One client connection.
pub struct Session<R, W> {
    ctx: Arc<SmtpContext>,
    input: Input<R>,
    output: W,
    out: Vec<u8>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    /// Session id, also used in the `Received:` header.
    sid: String,
    helo: Option<String>,
    tx: Transaction,
    failed_rcpts: u32,
    bad_commands: u32,
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub fn new(
        ctx: Arc<SmtpContext>,
        reader: R,
        writer: W,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        let idle = Duration::from_secs(ctx.config.idle_timeout_secs);
        let mut input = Input::new(reader, idle);
        input.set_deadline(
            tokio::time::Instant::now() + Duration::from_secs(ctx.config.session_timeout_secs),
        );
        Self {
            ctx,
            input,
            output: writer,
            out: Vec::with_capacity(512),
            peer,
            shutdown,
            sid: crate::alias::new_id(),
            helo: None,
            tx: Transaction::default(),
            failed_rcpts: 0,
            bad_commands: 0,
        }
    }

    /// The session id (also in the `Received:` header and logs).
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// Runs the session to its end; never panics on client input.
    pub async fn run(&mut self) {
        let host = self.ctx.config.hostname.clone();
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
        self.release_all().await;
        match result {
            Ok(End::Quit) | Ok(End::Closed) => {}
            Err(e) => tracing::debug!(error = %e, "session ended"),
        }
        let _ = self.output.shutdown().await;
    }

    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        self.out
            .extend_from_slice(format!("{code} {enhanced} {text}\r\n").as_bytes());
    }

    /// Sends the queued replies. Bounded by the idle timeout: a client that
    /// stops reading its replies must not hold a session slot forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let idle = Duration::from_secs(self.ctx.config.idle_timeout_secs);
            let write = async {
                self.output.write_all(&self.out).await?;
                self.output.flush().await
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

    async fn converse(&mut self) -> Result<End, InputError> {
        let host = self.ctx.config.hostname.clone();
        self.out
            .extend_from_slice(format!("220 {host} ESMTP tempalias\r\n").as_bytes());
        loop {
            // PIPELINING: answers are sent when no further command is waiting.
            if !self.input.has_line() {
                self.flush().await?;
            }
            let tx_deadline = self.tx.started.map(|t| {
                tokio::time::Instant::from_std(t)
                    + Duration::from_secs(self.ctx.config.transaction_timeout_secs)
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
                Ok(req) => {
                    let req = req.into_owned();
                    if let Some(end) = self.command(req).await? {
                        return Ok(end);
                    }
                }
                Err(ParseError::InvalidRecipientAddress) if is_address_literal_rcpt(&line) => {
                    // smtp-proto does not parse `user@[192.0.2.1]`; such a
                    // recipient goes through the usual checks, where its domain
                    // (we serve no address literals) makes it a relaying attempt.
                    let line = String::from_utf8_lossy(&line);
                    let address = line
                        .split_once('<')
                        .and_then(|(_, rest)| rest.split_once('>'))
                        .map(|(addr, _)| addr.to_string())
                        .unwrap_or_default();
                    self.rcpt(&address).await;
                }
                Err(e) => {
                    self.parse_error(e);
                    if self.bad_command() {
                        return self.close_for_errors().await;
                    }
                }
            }
            if self.failed_rcpts >= self.ctx.config.max_failed_rcpts {
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
        let host = self.ctx.config.hostname.clone();
        let next = tokio::time::timeout(SHUTDOWN_GRACE, self.input.line(MAX_COMMAND_LINE)).await;
        match next {
            Ok(Ok(Line::Complete(line)))
                if matches!(Request::parse(&mut line.iter()), Ok(Request::Quit)) =>
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
        let host = self.ctx.config.hostname.clone();
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
        let host = self.ctx.config.hostname.clone();
        match req {
            Request::Ehlo { host: client } => {
                self.reset().await;
                self.helo = Some(client.clone());
                let size = self.ctx.config.max_message_size;
                self.out.extend_from_slice(
                    format!(
                        "250-{host} greets {client}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
                    )
                    .as_bytes(),
                );
            }
            Request::Helo { host: client } => {
                self.reset().await;
                self.helo = Some(client);
                self.out
                    .extend_from_slice(format!("250 {host}\r\n").as_bytes());
            }
            Request::Lhlo { .. } => self.reply(500, "5.5.1", "This is not an LMTP server"),
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
            Request::StartTls => {
                self.reply(502, "5.5.1", "STARTTLS not available on this listener")
            }
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

    async fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            return self.reply(503, "5.5.1", "Say EHLO or HELO first");
        }
        if self.tx.mail_from.is_some() {
            return self.reply(503, "5.5.1", "Nested MAIL command");
        }
        if from.size as u64 > self.ctx.config.max_message_size {
            return self.reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        if from.flags & smtp_proto::MAIL_SMTPUTF8 != 0 {
            return self.reply(555, "5.5.4", "SMTPUTF8 not supported");
        }
        let address = from.address;
        if !address.is_empty() && address.parse::<lettre::Address>().is_err() {
            return self.reply(553, "5.1.7", "Sender address cannot be relayed");
        }
        self.tx.mail_from = Some(address);
        self.reply(250, "2.1.0", "Sender OK");
    }

    fn count_rcpt(&self, result: RcptResult) {
        self.ctx
            .metrics
            .smtp_rcpt
            .get_or_create(&RcptLabels { result })
            .inc();
    }

    /// Counts a refused recipient against the session (and, for guesses,
    /// against the client address), then tarpits.
    ///
    /// Only guesses (unknown ids, foreign domains, bad syntax) count per
    /// address: mail to expired or used-up aliases is this service's normal
    /// traffic, and must not get a large provider's address blocked.
    async fn rcpt_failed(&mut self, guess: bool) {
        self.failed_rcpts += 1;
        if guess {
            self.ctx.failures.record(self.peer.ip());
        }
        // Tarpit: each failure beyond the first costs the client more time, which
        // makes guessing alias ids by RCPT hopeless.
        if self.failed_rcpts > 1 {
            let base = self.ctx.config.failed_rcpt_delay_ms;
            let delay =
                Duration::from_millis(base.saturating_mul(u64::from(self.failed_rcpts - 1)))
                    .min(Duration::from_secs(5));
            tokio::time::sleep(delay).await;
        }
    }

    async fn refuse(&mut self, reason: Refusal) {
        let result = match reason {
            Refusal::Unknown => RcptResult::unknown,
            Refusal::Expired => RcptResult::expired,
            Refusal::Revoked => RcptResult::revoked,
            Refusal::UsedUp => RcptResult::used_up,
            Refusal::Held => {
                // Every use left is held by a message in flight; if that one
                // fails, the use comes back. Not a permanent condition.
                self.count_rcpt(RcptResult::busy);
                return self.reply(
                    450,
                    "4.2.1",
                    "Alias busy with messages in transit, try again later",
                );
            }
            Refusal::Unconfirmed => {
                // Waits for its target to confirm (see `crate::confirm`).
                self.count_rcpt(RcptResult::unconfirmed);
                self.rcpt_failed(false).await;
                let (code, enhanced, text) = crate::confirm::RCPT_REFUSAL;
                return self.reply(code, enhanced, text);
            }
        };
        self.count_rcpt(result);
        self.rcpt_failed(reason == Refusal::Unknown).await;
        // One text for every refusal: a stranger learns nothing about which
        // ids exist or existed (the metric keeps the distinction).
        self.reply(550, "5.1.1", "No such alias, or it is no longer valid");
    }

    fn tempfail(&mut self) {
        self.count_rcpt(RcptResult::tempfail);
        self.reply(451, "4.3.0", "Temporary failure, try again later");
    }

    /// Refuses from the local replica when it says the alias can never take
    /// mail again (absent, revoked, used up), but only after catching up with
    /// the leader, so a lagging replica never causes a wrong `550`. Guessed
    /// ids thus cost no Raft write. Expiry is left to the Raft write, which
    /// decides it with replicated time.
    async fn permanently_refused(&mut self, id: &str) -> Result<Option<Refusal>, ()> {
        let local = |reader: &crate::raft::store::StateReader| match reader.alias(id) {
            // A purged alias existed: mail to it is no guess.
            Ok(None) if reader.was_purged(id).unwrap_or(false) => Some(Refusal::Expired),
            Ok(None) => Some(Refusal::Unknown),
            Ok(Some(rec)) if rec.revoked => Some(Refusal::Revoked),
            Ok(Some(rec)) if rec.used >= rec.max_usage => Some(Refusal::UsedUp),
            Ok(Some(rec)) if rec.awaiting_confirmation => Some(Refusal::Unconfirmed),
            _ => None,
        };
        if local(self.ctx.node.reader()).is_none() {
            return Ok(None);
        }
        if let Err(e) = self.ctx.node.read_barrier().await {
            tracing::warn!(error = %e, "cannot confirm the local replica is current");
            return Err(());
        }
        Ok(local(self.ctx.node.reader()))
    }

    async fn rcpt(&mut self, address: &str) {
        if self.tx.mail_from.is_none() {
            return self.reply(503, "5.5.1", "Need MAIL before RCPT");
        }
        if self.tx.rcpts.len() >= self.ctx.config.max_recipients {
            return self.reply(452, "4.5.3", "Too many recipients");
        }
        if self.ctx.failures.is_blocked(self.peer.ip()) {
            self.count_rcpt(RcptResult::throttled);
            return self.reply(
                450,
                "4.7.1",
                "Too many failed recipients from your address, try again later",
            );
        }
        let Some((local, domain)) = address.rsplit_once('@') else {
            self.count_rcpt(RcptResult::invalid);
            self.rcpt_failed(true).await;
            return self.reply(501, "5.1.3", "Bad recipient address syntax");
        };
        let domain = domain.to_ascii_lowercase();
        if !self.ctx.domains.contains(&domain) {
            self.count_rcpt(RcptResult::relay_denied);
            self.rcpt_failed(true).await;
            return self.reply(550, "5.7.1", "Relaying denied");
        }
        let Some((bare, tag)) = split_subaddress(local, &self.ctx.config.recipient_delimiter)
        else {
            self.count_rcpt(RcptResult::invalid);
            self.rcpt_failed(true).await;
            return self.reply(501, "5.1.3", "Bad recipient address syntax");
        };
        let id = bare.to_ascii_lowercase();
        if !crate::alias::is_valid_id(&id) {
            return self.refuse(Refusal::Unknown).await;
        }
        if self.tx.rcpts.iter().any(|a| a.alias_id == id) {
            return self.reply(250, "2.1.5", "Recipient OK (duplicate)");
        }
        match self.permanently_refused(&id).await {
            Ok(Some(reason)) => return self.refuse(reason).await,
            Ok(None) => {}
            Err(()) => return self.tempfail(),
        }
        let reservation: u64 = rand::random();
        let lease_ends = Instant::now() + Duration::from_millis(self.ctx.lease_ms);
        let cmd = Command::Reserve {
            id: id.clone(),
            lease_ms: self.ctx.lease_ms,
            reservation,
        };
        match self.ctx.node.write(cmd).await {
            Ok(Response::Reserved {
                reservation,
                target,
            }) => {
                self.count_rcpt(RcptResult::accepted);
                self.ctx.settlements.hold(&id, reservation);
                self.tx.started.get_or_insert_with(Instant::now);
                self.tx.rcpts.push(Accepted {
                    // With its tag, for the Received header's `for` clause.
                    address: format!("{id}{tag}@{domain}"),
                    alias_id: id,
                    target,
                    reservation,
                    lease_ends,
                });
                self.reply(250, "2.1.5", "Recipient OK");
            }
            Ok(Response::Refused { reason }) => self.refuse(reason).await,
            Ok(other) => {
                tracing::error!(response = ?other, "unexpected answer to a reservation");
                self.tempfail();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reservation not committed");
                // Its outcome is unknown: it may still be applied. Release it
                // by id in the background (harmless if it never was), so a
                // use is not held for a whole lease.
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    ctx.settlements
                        .release(&ctx.node, &id, reservation, ctx.lease_ms)
                        .await;
                });
                self.tempfail();
            }
        }
    }

    async fn data(&mut self) -> Result<(), InputError> {
        if self.tx.mail_from.is_none() {
            self.reply(503, "5.5.1", "Need MAIL before DATA");
            return Ok(());
        }
        if self.tx.rcpts.is_empty() {
            self.reply(554, "5.5.1", "No valid recipients");
            return Ok(());
        }
        self.out
            .extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
        self.flush().await?;
        // The message is built in one buffer: our trace header, then the data.
        let mut message = self.received_header().into_bytes();
        let outcome = self.read_message(&mut message).await?;
        if outcome != DataOutcome::Complete {
            // End of data ends the transaction whatever the verdict (RFC 5321
            // 4.1.1.4): the sender is forgotten too.
            self.count_message(MessageResult::rejected);
            self.reset().await;
            match outcome {
                DataOutcome::TooBig => self.reply(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                ),
                _ => self.reply(
                    554,
                    "5.6.0",
                    &format!("Message contains a line longer than {MAX_DATA_LINE} bytes"),
                ),
            }
            return Ok(());
        }
        // Our own Received: header is counted too.
        if count_received(&message) > self.ctx.config.max_hops {
            self.count_message(MessageResult::rejected);
            self.reset().await;
            self.reply(554, "5.4.6", "Too many hops: mail loop detected");
            return Ok(());
        }
        let message = std::sync::Arc::new(message);
        let mut rcpt_to: Vec<String> = Vec::new();
        for a in &self.tx.rcpts {
            if !rcpt_to.contains(&a.target) {
                rcpt_to.push(a.target.clone());
            }
        }
        let envelope = Envelope {
            mail_from: self.tx.mail_from.clone().unwrap_or_default(),
            rcpt_to,
        };
        let started = Instant::now();
        let delivery = self.ctx.relay.deliver(&envelope, message.clone()).await;
        self.ctx
            .metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        match delivery {
            Delivery::Accepted => {
                let rcpts = self.tx.rcpts.len();
                self.commit_all().await;
                self.count_message(MessageResult::forwarded);
                tracing::info!(rcpts, size = message.len(), "forwarded");
                self.reply(250, "2.0.0", &format!("OK: forwarded as {}", self.sid));
            }
            Delivery::TempFail(reason) => {
                tracing::warn!(%reason, "upstream temporary failure");
                self.release_all().await;
                self.count_message(MessageResult::tempfail);
                self.reply(451, "4.4.1", "Upstream not available, try again later");
            }
            Delivery::PermFail {
                code,
                enhanced,
                text,
            } => {
                self.release_all().await;
                self.count_message(MessageResult::permfail);
                let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
                self.reply(code, &enhanced, &format!("Upstream refused: {text}"));
            }
        }
        self.tx = Transaction::default();
        Ok(())
    }

    fn count_message(&self, result: MessageResult) {
        self.ctx
            .metrics
            .smtp_messages
            .get_or_create(&MessageLabels { result })
            .inc();
    }

    /// Reads message data up to the end-of-data line into `out`, undoing
    /// dot-stuffing. Data beyond the size limit is read and discarded, never
    /// stored.
    ///
    /// End of data is only a `.` line between two CRLFs: a bare LF does not end
    /// the message. Line ends are normalised as they are stored: a bare LF or a
    /// bare CR becomes CRLF (RFC 5321 2.3.8 forbids them), so what goes
    /// upstream has no line end that the upstream could read differently from
    /// us, and nothing can be smuggled past our end of data into the
    /// upstream session.
    async fn read_message(&mut self, out: &mut Vec<u8>) -> Result<DataOutcome, InputError> {
        let max = self.ctx.config.max_message_size as usize;
        let start = out.len();
        let mut outcome = DataOutcome::Complete;
        let mut prev_crlf = true;
        loop {
            let used = out.len() - start;
            let budget = if outcome == DataOutcome::Complete {
                max.saturating_sub(used)
            } else {
                0
            };
            // A line may be as long as what is left of the budget, up to a
            // hard per-line cap that bounds the input buffer.
            let limit = budget.clamp(1000, MAX_DATA_LINE) + 2;
            let line = match self.input.line(limit).await? {
                Line::TooLong { crlf } => {
                    if outcome == DataOutcome::Complete {
                        // Past what is left of the size budget it is too big;
                        // only a line under the budget can be merely too long.
                        outcome = if budget > MAX_DATA_LINE {
                            DataOutcome::LineTooLong
                        } else {
                            DataOutcome::TooBig
                        };
                        out.truncate(start);
                        out.shrink_to(start + 4096);
                    }
                    prev_crlf = crlf;
                    continue;
                }
                Line::Complete(l) => l,
            };
            if prev_crlf && line == b".\r\n" {
                break;
            }
            prev_crlf = line.ends_with(b"\r\n");
            if outcome != DataOutcome::Complete {
                continue;
            }
            let text = line
                .strip_suffix(b"\r\n")
                .or_else(|| line.strip_suffix(b"\n"))
                .unwrap_or(&line);
            let text = text.strip_prefix(b".").unwrap_or(text);
            // Stored size: bare CRs become CRLF, and the line gets a CRLF.
            let stored = text.len() + text.iter().filter(|&&b| b == b'\r').count() + 2;
            if used + stored > max {
                outcome = DataOutcome::TooBig;
                out.truncate(start);
                out.shrink_to(start + 4096);
                continue;
            }
            for &b in text {
                if b == b'\r' {
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.push(b);
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok(outcome)
    }

    fn received_header(&self) -> String {
        let helo: String = self
            .helo
            .as_deref()
            .unwrap_or("unknown")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(100)
            .collect();
        let for_clause = match self.tx.rcpts.as_slice() {
            [one] => format!("\r\n\tfor <{}>", one.address),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ({ip})\r\n\tby {host} (tempalias) with ESMTP id {sid}{for_clause};\r\n\t{date}\r\n",
            ip = self.peer.ip(),
            host = self.ctx.config.hostname,
            sid = self.sid,
            date = crate::clock::rfc5322(self.ctx.node.now_ms()),
        )
    }

    /// Ends the transaction, giving back any uses it holds.
    async fn reset(&mut self) {
        self.release_all().await;
        self.tx = Transaction::default();
    }

    /// Spends the held uses: the message is safe upstream.
    async fn commit_all(&mut self) {
        self.settle_all(true).await;
    }

    /// Gives the held uses back.
    async fn release_all(&mut self) {
        self.settle_all(false).await;
    }

    /// Commits or releases every reservation of the transaction, concurrently
    /// (each is its own Raft write; they share the leader's round trips).
    ///
    /// A commit that fails is retried in the background until its lease
    /// ends (src/smtp/settle.rs); a release that fails leaves the lease to
    /// lapse and the use returns then.
    async fn settle_all(&mut self, commit: bool) {
        let rcpts = std::mem::take(&mut self.tx.rcpts);
        let ctx = &self.ctx;
        let writes = rcpts.iter().map(|a| async move {
            if commit {
                ctx.settlements
                    .commit(&ctx.node, &a.alias_id, a.reservation, a.lease_ends)
                    .await;
            } else {
                ctx.settlements
                    .release(&ctx.node, &a.alias_id, a.reservation, ctx.lease_ms)
                    .await;
            }
        });
        futures::future::join_all(writes).await;
    }
}

/// Splits sub-addressing off a local part: `id+tag` is `("id", "+tag")`
/// when `+` is one of the `delimiters` (the first delimiter found splits, as
/// in Postfix). `None` when the tag holds anything but the characters of a
/// dot-atom (it goes into our `Received:` header) or is over 64 characters.
fn split_subaddress<'a>(local: &'a str, delimiters: &str) -> Option<(&'a str, &'a str)> {
    let Some(at) = local.find(|c| delimiters.contains(c)) else {
        return Some((local, ""));
    };
    let (bare, tag) = local.split_at(at);
    let ok = tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
    ok.then_some((bare, tag))
}

/// True for `RCPT TO:<local@[address literal]>`.
fn is_address_literal_rcpt(line: &[u8]) -> bool {
    line.len() > 4 && line[..4].eq_ignore_ascii_case(b"RCPT") && line.windows(2).any(|w| w == b"@[")
}

/// Counts `Received:` fields in the header section (loop detection).
fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_address_literal_recipients() {
        assert!(is_address_literal_rcpt(b"RCPT TO:<a@[127.0.0.1]>\r\n"));
        assert!(is_address_literal_rcpt(b"rcpt to:<a@[IPv6:::1]>\r\n"));
        assert!(!is_address_literal_rcpt(b"RCPT TO:<a@example.org>\r\n"));
        assert!(!is_address_literal_rcpt(b"MAIL FROM:<a@[127.0.0.1]>\r\n"));
    }

    #[test]
    fn sub_addresses_split_at_the_first_delimiter() {
        assert_eq!(split_subaddress("abc", "+"), Some(("abc", "")));
        assert_eq!(split_subaddress("abc+shop", "+"), Some(("abc", "+shop")));
        assert_eq!(split_subaddress("abc+a+b", "+"), Some(("abc", "+a+b")));
        assert_eq!(split_subaddress("abc-x+y", "+-"), Some(("abc", "-x+y")));
        assert_eq!(split_subaddress("abc+shop", ""), Some(("abc+shop", "")));
        assert_eq!(split_subaddress("abc+a>b", "+"), None);
        assert_eq!(
            split_subaddress(&format!("abc+{}", "x".repeat(64)), "+"),
            None
        );
    }

    #[test]
    fn counts_received_headers_only_in_header_section() {
        let m = b"Received: a\r\nRECEIVED: b\r\n c\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(m), 2);
        assert_eq!(count_received(b""), 0);
    }
}
