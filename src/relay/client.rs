//! One outbound SMTP attempt: connect, TLS as the policy says, AUTH, send.
//!
//! The TCP connection is made here, not by lettre, so that it gets
//! `TCP_NODELAY`: lettre writes a command and then waits for its reply, and
//! with Nagle's algorithm on, a small write that follows unacknowledged data
//! (the end of the message after its body) waits for the peer's delayed ACK,
//! about 40 ms per message. lettre's `connect_with_transport` takes our
//! connected stream; for implicit TLS the handshake runs on it first.
//!
//! Every connection serves exactly one message and is dropped afterwards
//! (see docs/architecture.md on why there is no pool).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::address::Envelope as LettreEnvelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::{ClientId, Extension, ServerInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

/// How the connection is to be protected.
#[derive(Clone)]
pub enum TlsPolicy {
    /// STARTTLS when offered (certificate not verified), else plaintext.
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
    /// The upstream works but lacks an SMTP extension this message needs
    /// (8BITMIME for 8-bit content, SMTPUTF8 for non-ASCII addresses), so
    /// nothing was sent. Another upstream may have it: the caller tries the
    /// next one, and refuses the message (with these codes) only when none
    /// can take it. Never a sign of the host being down.
    #[error("{code} {enhanced} {text}")]
    Unsupported {
        code: u16,
        enhanced: String,
        text: String,
    },
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

/// Sends one message. Cancel-safe in the plain sense: dropping the future
/// drops the connection, and nothing outlives it.
///
/// # Errors
/// [`AttemptError`] saying whether the upstream answered.
pub async fn send(
    target: &Target<'_>,
    envelope: &LettreEnvelope,
    message: &[u8],
) -> Result<(), AttemptError> {
    let tcp = connect(target.addrs, target.connect_timeout).await?;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        AttemptError::Failed(format!("{}: {what}: {e}", target.name))
    };
    let mut conn = match target.tls {
        TlsPolicy::Implicit(params) => {
            #[allow(deprecated)]
            let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
            stream
                .upgrade_tls(params.clone())
                .await
                .map_err(|e| failed("TLS", &e))?;
            let stream = ImplicitTls(stream.compat());
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), target.helo).await
        }
        _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), target.helo).await,
    }
    // A refusal at the greeting or EHLO (`554 no service`, `421 busy`) says
    // nothing about the message: the host is unusable, whatever the code.
    .map_err(|e| failed("greeting or EHLO", &e))?;
    match target.tls {
        TlsPolicy::Required(params) => {
            if !conn.can_starttls() {
                return Err(AttemptError::Failed(format!(
                    "{}: STARTTLS is required but not offered",
                    target.name
                )));
            }
            conn.starttls(params.clone(), target.helo)
                .await
                .map_err(|e| failed("STARTTLS", &e))?;
        }
        TlsPolicy::Opportunistic(params) if conn.can_starttls() => {
            conn.starttls(params.clone(), target.helo)
                .await
                .map_err(|e| failed("STARTTLS", &e))?;
        }
        _ => {}
    }
    // Checked on the EHLO reply that counts (the one after STARTTLS), and
    // before AUTH: a host that cannot take the message need not see our
    // password for it.
    missing_extension(target.name, conn.server_info(), envelope, message)?;
    if let Some(credentials) = target.credentials {
        // Any AUTH refusal is ours to fix (wrong password, mechanism), never
        // the sender's: a failure, so the sender hears 4xx and we fail over.
        conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
            .await
            .map_err(|e| failed("AUTH", &e))
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
    conn.send(envelope, message)
        .await
        .map_err(|e| classify(target.name, "transaction", &e))?;
    // The message is safe upstream: QUIT must not delay our 250, nor can its
    // failure change anything, so it runs on its own, bounded.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
    });
    Ok(())
}

/// The extension this message needs and the server did not announce.
///
/// 8-bit content is never converted to 7 bits here (RFC 6152 section 3
/// would allow it): re-encoding the body breaks every DKIM signature over it,
/// the original sender's and our own, so the target would see a forged-looking
/// message. Content that needs conversion is refused with `5.6.3`
/// (RFC 3463: conversion required but not supported), non-ASCII addresses
/// without SMTPUTF8 with `5.6.7` (RFC 6531 section 3.2, RFC 6533).
///
/// # Errors
/// [`AttemptError::Unsupported`] naming what is missing.
fn missing_extension(
    name: &str,
    server: &ServerInfo,
    envelope: &LettreEnvelope,
    message: &[u8],
) -> Result<(), AttemptError> {
    let non_ascii = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii && !server.supports_feature(Extension::SmtpUtfEight) {
        return Err(AttemptError::Unsupported {
            code: 553,
            enhanced: "5.6.7".into(),
            text: format!("{name} does not offer SMTPUTF8, and an envelope address is not ASCII"),
        });
    }
    if !message.is_ascii() && !server.supports_feature(Extension::EightBitMime) {
        return Err(AttemptError::Unsupported {
            code: 554,
            enhanced: "5.6.3".into(),
            text: format!("{name} does not offer 8BITMIME, and the message has 8-bit content"),
        });
    }
    Ok(())
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
        if e.is_client() {
            // lettre refused to send (8-bit data to a server without
            // 8BITMIME, which [`missing_extension`] catches first): this
            // upstream cannot take it, another may.
            return AttemptError::Unsupported {
                code: 554,
                enhanced: "5.6.3".into(),
                text: format!("{name}: {e}"),
            };
        }
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

/// A TLS stream made before lettre sees it (implicit TLS on our own socket),
/// handed to lettre as if it were a plain transport.
#[derive(Debug)]
#[allow(deprecated)]
struct ImplicitTls(Compat<AsyncNetworkStream>);

impl AsyncRead for ImplicitTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.get_ref().peer_addr()
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
    fn splits_pem_bundles() {
        let one = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        let bundle = format!("junk\n{one}\n{one}\n");
        assert_eq!(split_pem(bundle.as_bytes()), vec![one, one]);
        assert!(split_pem(b"nothing").is_empty());
    }
}
