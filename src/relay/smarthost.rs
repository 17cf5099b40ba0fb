//! Delivery through one or more smarthosts, tried in order.
//!
//! A temporary failure at one smarthost moves on to the next; a permanent
//! refusal stops there and is passed back, because another smarthost would
//! refuse the same message for the same reason (and retrying elsewhere risks a
//! duplicate when the first one did take it).

use std::time::Duration;

use lettre::address::Envelope as LettreEnvelope;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Delivery, Envelope, RelayError};
use crate::config::RelayConfig;

/// A parsed `smtp://host:port` (STARTTLS when offered) or `smtps://host:port`
/// (TLS from the first byte) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmarthostUrl {
    pub implicit_tls: bool,
    pub host: String,
    pub port: u16,
}

impl SmarthostUrl {
    /// # Errors
    /// A message saying what is wrong with the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (implicit_tls, rest, default_port) = if let Some(r) = url.strip_prefix("smtp://") {
            (false, r, 25)
        } else if let Some(r) = url.strip_prefix("smtps://") {
            (true, r, 465)
        } else {
            return Err("must start with smtp:// or smtps://".into());
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err("must be smtp://host[:port] with nothing after the port".into());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err("host and port must not be empty or zero".into());
        }
        Ok(Self {
            implicit_tls,
            host: host.to_string(),
            port,
        })
    }
}

struct Upstream {
    url: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

/// Sends through the configured smarthosts.
///
/// Each message uses a fresh connection: lettre's connection pool would put a
/// connection back after our timeout cancelled a send half-way, and the next
/// message would then read the previous one's late replies.
pub struct SmarthostRelay {
    upstreams: Vec<Upstream>,
    /// Bound on one whole attempt. lettre's own timeout covers only parts of
    /// the dialogue, so a stalled upstream is cut off here.
    timeout: Duration,
}

impl SmarthostRelay {
    /// # Errors
    /// [`RelayError::Smarthost`] when a URL is unusable or TLS cannot be set up.
    pub fn new(config: &RelayConfig, helo_name: &str) -> Result<Self, RelayError> {
        let timeout = Duration::from_secs(config.timeout_secs);
        let mut upstreams = Vec::new();
        for url in &config.smarthosts {
            let parsed = SmarthostUrl::parse(url)
                .map_err(|e| RelayError::Smarthost(format!("{url}: {e}")))?;
            let tls_params = TlsParameters::new(parsed.host.clone())
                .map_err(|e| RelayError::Smarthost(format!("{url}: {e}")))?;
            let tls = if parsed.implicit_tls {
                Tls::Wrapper(tls_params)
            } else {
                Tls::Opportunistic(tls_params)
            };
            let transport =
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(parsed.host.as_str())
                    .port(parsed.port)
                    .tls(tls)
                    .timeout(Some(timeout))
                    .hello_name(ClientId::Domain(helo_name.to_string()))
                    .build();
            upstreams.push(Upstream {
                url: url.clone(),
                transport,
            });
        }
        Ok(Self { upstreams, timeout })
    }

    pub fn describe(&self) -> String {
        self.upstreams
            .iter()
            .map(|u| u.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub async fn deliver(&self, envelope: &Envelope, message: &[u8]) -> Delivery {
        let lettre_envelope = match to_lettre(envelope) {
            Ok(e) => e,
            Err(text) => {
                return Delivery::PermFail {
                    code: 550,
                    enhanced: "5.1.3".into(),
                    text,
                }
            }
        };
        let mut last = Delivery::TempFail("no smarthost configured".into());
        for upstream in &self.upstreams {
            let attempt = tokio::time::timeout(
                self.timeout,
                upstream.transport.send_raw(&lettre_envelope, message),
            )
            .await;
            let Ok(result) = attempt else {
                tracing::warn!(smarthost = %upstream.url, timeout = ?self.timeout, "upstream did not answer in time");
                last = Delivery::TempFail(format!(
                    "{} did not answer within {:?}",
                    upstream.url, self.timeout
                ));
                continue;
            };
            match result {
                Ok(_) => return Delivery::Accepted,
                Err(e) => {
                    let outcome = classify(&e);
                    tracing::warn!(smarthost = %upstream.url, error = %e, "upstream did not accept");
                    if matches!(outcome, Delivery::PermFail { .. }) {
                        return outcome;
                    }
                    last = outcome;
                }
            }
        }
        last
    }
}

/// An envelope address for lettre. SRS addresses may have local parts over
/// the 64 characters lettre checks for, so those that pass
/// [`crate::mail::is_valid_envelope_address`] are taken as they are.
fn envelope_address(a: &str) -> Result<Address, String> {
    a.parse::<Address>().or_else(|e| match a.rsplit_once('@') {
        Some((user, domain)) if crate::mail::is_valid_envelope_address(a) => {
            Ok(Address::new_dangerous(user, domain))
        }
        _ => Err(e.to_string()),
    })
}

fn to_lettre(envelope: &Envelope) -> Result<LettreEnvelope, String> {
    let from = if envelope.mail_from.is_empty() {
        None
    } else {
        Some(envelope_address(&envelope.mail_from).map_err(|e| format!("sender address: {e}"))?)
    };
    let to = envelope
        .rcpt_to
        .iter()
        .map(|r| envelope_address(r).map_err(|e| format!("recipient address: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    LettreEnvelope::new(from, to).map_err(|e| e.to_string())
}

/// Maps a lettre error to what our client should hear.
fn classify(e: &lettre::transport::smtp::Error) -> Delivery {
    let full = e.to_string();
    if e.is_permanent() {
        let code = e.status().map(u16::from).unwrap_or(550);
        // lettre renders "permanent error (550): <upstream text>".
        let text = full
            .split_once("): ")
            .map(|(_, t)| t.trim())
            .unwrap_or("")
            .to_string();
        let (enhanced, text) = split_enhanced(&text, code);
        return Delivery::PermFail {
            code,
            enhanced,
            text,
        };
    }
    Delivery::TempFail(full)
}

/// Splits a leading enhanced status code (`5.1.1 text`) off upstream text, or
/// makes a generic one of the right class.
fn split_enhanced(text: &str, code: u16) -> (String, String) {
    if let Some((first, rest)) = text.split_once(' ') {
        let parts: Vec<&str> = first.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return (first.to_string(), rest.to_string());
        }
    }
    (format!("{}.0.0", code / 100), text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            SmarthostUrl::parse("smtp://127.0.0.1:2526").unwrap(),
            SmarthostUrl {
                implicit_tls: false,
                host: "127.0.0.1".into(),
                port: 2526
            }
        );
        let u = SmarthostUrl::parse("smtps://relay.example").unwrap();
        assert!(u.implicit_tls);
        assert_eq!(u.port, 465);
        assert_eq!(
            SmarthostUrl::parse("smtp://relay.example/").unwrap().port,
            25
        );
        assert_eq!(SmarthostUrl::parse("smtp://[::1]:26").unwrap().host, "::1");
        assert!(SmarthostUrl::parse("http://x").is_err());
        assert!(SmarthostUrl::parse("smtp://").is_err());
        assert!(SmarthostUrl::parse("smtp://h:notaport").is_err());
        assert!(SmarthostUrl::parse("smtp://h:0").is_err());
    }

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
    }

    #[test]
    fn null_sender_maps_to_no_from() {
        let e = to_lettre(&Envelope {
            mail_from: String::new(),
            rcpt_to: vec!["a@b.example".into()],
        })
        .unwrap();
        assert!(e.from().is_none());
        assert!(to_lettre(&Envelope {
            mail_from: "bad address".into(),
            rcpt_to: vec!["a@b.example".into()],
        })
        .is_err());
    }

    #[tokio::test]
    async fn stalled_smarthost_is_cut_off_by_the_timeout() {
        // Accepts the connection and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(sock);
        });
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: vec![format!("smtp://127.0.0.1:{port}")],
            timeout_secs: 1,
            ..Default::default()
        };
        let relay = SmarthostRelay::new(&config, "mx.test.example").unwrap();
        let env = Envelope {
            mail_from: "a@b.example".into(),
            rcpt_to: vec!["c@d.example".into()],
        };
        let started = std::time::Instant::now();
        assert!(matches!(
            relay.deliver(&env, b"x\r\n").await,
            Delivery::TempFail(_)
        ));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }

    #[tokio::test]
    async fn unreachable_smarthost_is_a_temporary_failure() {
        // Bind and drop a listener to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: vec![format!("smtp://127.0.0.1:{port}")],
            timeout_secs: 5,
            ..Default::default()
        };
        let relay = SmarthostRelay::new(&config, "mx.test.example").unwrap();
        let env = Envelope {
            mail_from: "a@b.example".into(),
            rcpt_to: vec!["c@d.example".into()],
        };
        assert!(matches!(
            relay.deliver(&env, b"x\r\n").await,
            Delivery::TempFail(_)
        ));
    }
}
