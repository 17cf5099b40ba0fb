//! Outbound delivery: where a forwarded message goes after DATA.
//!
//! The SMTP session answers its client from a [`Delivery`]: `250` only for
//! [`Delivery::Accepted`] (the upstream has taken responsibility, or the capture
//! file is on disk), `4xx` for anything that may clear, and the upstream's own
//! `5xx` for a permanent refusal.
//!
//! This module reads the configuration; the configuration never needs it.

mod breaker;
mod capture;
mod client;
mod mx;
mod pool;
#[cfg(test)]
mod reuse_tests;
mod smarthost;

pub use capture::CaptureRelay;
pub use mx::MxRelay;
pub use smarthost::SmarthostRelay;

use std::sync::Arc;

use lettre::address::Envelope as LettreEnvelope;
use lettre::Address;

use crate::config::{RelayConfig, RelayMode};
use crate::metrics::{AttemptLabels, AttemptResult, Metrics};

/// The envelope of one outbound transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Envelope sender; empty for the null sender `<>` (bounces).
    pub mail_from: String,
    /// Envelope recipients (the aliases' targets), without duplicates.
    pub rcpt_to: Vec<String>,
}

/// What the upstream did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Accepted: the message is safe upstream.
    Accepted,
    /// Not delivered, and it may work later (unreachable, timeout, 4xx).
    TempFail(String),
    /// Refused for good by the upstream: its reply is passed on.
    PermFail {
        code: u16,
        enhanced: String,
        text: String,
    },
}

/// Why a relay could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay.capture_dir {path}: {error}")]
    CaptureDir { path: String, error: std::io::Error },
    #[error("relay.smarthosts: {0}")]
    Smarthost(String),
    #[error("relay.dns_servers: {0}")]
    Resolver(String),
}

/// The deadline for a message that holds no alias use (a bounce, mail to
/// the postmaster, a confirmation mail): nothing runs out for it, so the
/// relay's own `relay.delivery_timeout_secs` decides (it takes the earlier
/// of the two).
pub fn no_lease_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(24 * 3600)
}

/// The configured outbound path.
pub enum Relay {
    Capture(CaptureRelay),
    Smarthost(SmarthostRelay),
    /// Boxed: the resolver makes it several times larger than the others.
    Mx(Box<MxRelay>),
}

impl Relay {
    /// Builds the relay chosen by `relay.mode`.
    ///
    /// # Errors
    /// [`RelayError`] when the capture directory cannot be created, TLS or
    /// the password for a smarthost cannot be set up, or the resolver cannot
    /// be configured.
    pub fn from_config(
        config: &RelayConfig,
        helo_name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RelayError> {
        match config.mode {
            RelayMode::Capture => Ok(Relay::Capture(CaptureRelay::new(&config.capture_dir)?)),
            RelayMode::Smarthost => Ok(Relay::Smarthost(SmarthostRelay::new(
                config, helo_name, metrics,
            )?)),
            RelayMode::Mx => Ok(Relay::Mx(Box::new(MxRelay::new(
                config, helo_name, metrics,
            )?))),
        }
    }

    /// Delivers one message. Never panics and never returns an error: every
    /// failure is classified into a [`Delivery`].
    ///
    /// The message is shared, not copied: it can be tens of megabytes.
    /// `deadline` is when the caller must have an answer (the session's
    /// reservations run out then); the relay gives up at that point or after
    /// its own `relay.delivery_timeout_secs`, whichever comes first, and
    /// answers [`Delivery::TempFail`].
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        message: Arc<Vec<u8>>,
        deadline: tokio::time::Instant,
    ) -> Delivery {
        match self {
            Relay::Capture(c) => c.deliver(envelope, message).await,
            Relay::Smarthost(s) => s.deliver(envelope, &message, deadline).await,
            Relay::Mx(m) => m.deliver(envelope, &message, deadline).await,
        }
    }

    /// Closes the idle connections kept for later messages (smarthost
    /// mode), with `QUIT`, waiting at most `limit`; none are kept after it.
    /// For a graceful shutdown, once no message is being sent any more.
    pub async fn close_idle(&self, limit: std::time::Duration) {
        if let Relay::Smarthost(s) = self {
            s.close_idle(limit).await;
        }
    }

    /// Human description for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Relay::Capture(c) => format!("capture to {}", c.dir().display()),
            Relay::Smarthost(s) => format!("smarthosts {}", s.describe()),
            Relay::Mx(m) => m.describe(),
        }
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

/// One attempt at `name`, cut off after `limit` (a stalled upstream is a
/// failure), counted in `tempalias_relay_attempts_total` under `upstream`
/// (a smarthost's label, or `mx` for all MX hosts).
async fn counted_attempt(
    metrics: &Metrics,
    upstream: &str,
    name: &str,
    limit: std::time::Duration,
    attempt: impl std::future::Future<Output = Result<(), client::AttemptError>>,
) -> Result<(), client::AttemptError> {
    let outcome = tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(client::AttemptError::Failed(format!(
                "{name}: no answer within {limit:?}"
            )))
        });
    metrics
        .relay_attempts
        .get_or_create(&AttemptLabels {
            upstream: upstream.to_string(),
            result: attempt_result(&outcome),
        })
        .inc();
    outcome
}

/// The metric label of an attempt's outcome.
fn attempt_result(outcome: &Result<(), client::AttemptError>) -> AttemptResult {
    match outcome {
        Ok(()) => AttemptResult::accepted,
        Err(e) if e.is_failure() => AttemptResult::failed,
        Err(client::AttemptError::Unsupported {
            reason: client::Unfit::TooLarge,
            ..
        }) => AttemptResult::too_large,
        Err(client::AttemptError::Unsupported { .. }) => AttemptResult::unsupported,
        Err(client::AttemptError::Reply { code, .. }) if *code >= 500 => {
            AttemptResult::refused_permanent
        }
        Err(_) => AttemptResult::refused_temporary,
    }
}

/// The hosts of one delivery that cannot take the message
/// ([`client::AttemptError::Unsupported`]: an extension it needs is missing,
/// or it is larger than their `SIZE`). The same rule for smarthosts and MX
/// hosts: such a host is asked once per message and then passed over, and
/// the message is refused only when every host is one of them. While some
/// other host merely failed, the delivery ends in a `451`, as that may clear.
struct PassedOver {
    /// One flag per host, in the caller's order.
    hosts: Vec<bool>,
    /// The refusal if no host can take the message: the codes of the last
    /// host's reason stand for all (the text, naming the host, is logged
    /// by the session, never sent).
    refusal: Option<Delivery>,
}

impl PassedOver {
    fn new(hosts: usize) -> Self {
        Self {
            hosts: vec![false; hosts],
            refusal: None,
        }
    }

    /// Whether host `i` was found unable to take this message.
    fn contains(&self, i: usize) -> bool {
        self.hosts.get(i).copied().unwrap_or(false)
    }

    fn add(&mut self, i: usize, reason: client::Unfit, text: String) {
        if let Some(flag) = self.hosts.get_mut(i) {
            *flag = true;
        }
        let (code, enhanced) = reason.codes();
        self.refusal = Some(Delivery::PermFail {
            code,
            enhanced: enhanced.into(),
            text,
        });
    }

    /// True when no host is left that might take the message.
    fn all(&self) -> bool {
        self.hosts.iter().all(|&h| h)
    }

    /// The delivery's outcome when no host accepted or refused it: the
    /// refusal when every host was passed over (that will not clear by
    /// waiting), else a temporary failure with `last` for the log.
    fn outcome(self, last: String) -> Delivery {
        match self.refusal {
            Some(refusal) if self.all() => refusal,
            _ => Delivery::TempFail(last),
        }
    }
}

/// The envelope in lettre's terms.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_over_refuses_only_when_every_host_is() {
        let mut p = PassedOver::new(2);
        p.add(0, client::Unfit::No8BitMime, "a".into());
        assert!(p.contains(0) && !p.contains(1) && !p.all());
        assert_eq!(
            p.outcome("b failed".into()),
            Delivery::TempFail("b failed".into())
        );

        let mut p = PassedOver::new(2);
        p.add(0, client::Unfit::No8BitMime, "a".into());
        p.add(1, client::Unfit::TooLarge, "b".into());
        assert!(p.all());
        assert_eq!(
            p.outcome("b".into()),
            Delivery::PermFail {
                code: 552,
                enhanced: "5.3.4".into(),
                text: "b".into()
            }
        );
        // No host at all: nothing refused it, so nothing to pass on.
        assert!(matches!(
            PassedOver::new(0).outcome("x".into()),
            Delivery::TempFail(_)
        ));
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
}
