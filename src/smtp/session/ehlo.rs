//! Greeting the client: EHLO/HELO, and STARTTLS, which starts the dialogue
//! over.
//!
//! After STARTTLS everything is forgotten (RFC 3207 4.2): the client's name,
//! any transaction, and every byte it sent behind the command in plaintext.
//! Those bytes were sent before encryption, so a man in the middle could have
//! put them there (CVE-2011-0411 and its many successors): were they kept,
//! they would run as commands inside the encrypted session.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::Stream;
use super::{Session, State};
use crate::metrics::{TlsLabels, TlsResult};
use crate::smtp::backends::{AliasStore, Upstream};
use crate::smtp::input::InputError;
use crate::smtp::tls::Negotiated;

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    /// EHLO (`extended`) or HELO: ends any transaction and greets.
    pub(super) async fn ehlo(&mut self, client: String, extended: bool) {
        self.reset().await;
        self.state = State::Ready;
        let host = self.shared.config.hostname.clone();
        if !extended {
            self.helo = Some(client);
            self.out
                .extend_from_slice(format!("250 {host}\r\n").as_bytes());
            return;
        }
        let size = self.shared.config.max_message_size;
        let mut reply = format!(
            "250-{host} greets {client}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-8BITMIME\r\n"
        );
        if self.shared.tls.is_some() && self.tls.is_none() {
            reply.push_str("250-STARTTLS\r\n");
        }
        reply.push_str("250 ENHANCEDSTATUSCODES\r\n");
        self.out.extend_from_slice(reply.as_bytes());
        self.helo = Some(client);
    }

    /// STARTTLS. `Ok(false)` when the handshake failed and the session must
    /// end (the connection is in an unknown state).
    pub(super) async fn starttls(&mut self) -> Result<bool, InputError> {
        if self.tls.is_some() {
            self.reply(503, "5.5.1", "TLS already active");
            return Ok(true);
        }
        if self.shared.tls.is_none() {
            self.reply(502, "5.5.1", "STARTTLS not available on this listener");
            return Ok(true);
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        self.flush().await?;
        let injected = self.input.discard_buffered();
        if injected > 0 {
            tracing::info!(bytes = injected, "discarded plaintext sent behind STARTTLS");
        }
        if !self.handshake().await {
            return Ok(false);
        }
        // A fresh start: the client must greet again.
        self.reset().await;
        self.state = State::Connected;
        self.helo = None;
        Ok(true)
    }

    /// Runs the TLS handshake over the connection; `false` when it failed
    /// (logged), and the session must end.
    pub(super) async fn handshake(&mut self) -> bool {
        let Some(tls) = self.shared.tls.clone() else {
            return false;
        };
        let Stream::Plain(plain) = std::mem::replace(self.input.get_mut(), Stream::Gone) else {
            return false;
        };
        let limit = Duration::from_secs(self.shared.config.tls_handshake_timeout_secs);
        let count = |result| {
            self.shared
                .metrics
                .smtp_tls_handshakes
                .get_or_create(&TlsLabels { result })
                .inc();
        };
        match tokio::time::timeout(limit, tls.acceptor().accept(plain)).await {
            Ok(Ok(stream)) => {
                let conn = stream.get_ref().1;
                let negotiated = Negotiated::of(conn);
                count(if negotiated.version == "TLSv1.2" {
                    TlsResult::tls12
                } else {
                    TlsResult::tls13
                });
                let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                if resumed {
                    self.shared.metrics.smtp_tls_resumed.inc();
                }
                tracing::debug!(version = %negotiated.version, cipher = %negotiated.cipher, resumed, "TLS started");
                self.tls = Some(negotiated);
                *self.input.get_mut() = Stream::Tls(Box::new(stream));
                true
            }
            Ok(Err(e)) => {
                count(TlsResult::failed);
                tracing::info!(error = %e, "TLS handshake failed");
                false
            }
            Err(_) => {
                count(TlsResult::timeout);
                tracing::info!(limit = ?limit, "TLS handshake timed out");
                false
            }
        }
    }
}
