//! RCPT TO: the relay policy, the anti-enumeration tarpit, and the
//! reservation of one use per alias recipient.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::recipient::{classify, NotOurs, Recipient};
use super::{Accepted, AcceptedKind, Session, State};
use crate::metrics::{RcptLabels, RcptResult};
use crate::smtp::backends::Refusal;
use crate::smtp::backends::{AliasStore, Upstream};

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    pub(super) async fn rcpt(&mut self, address: &str) {
        let count = match &self.state {
            State::Transaction(tx) => tx.rcpts.len(),
            _ => return self.reply(503, "5.5.1", "Need MAIL before RCPT"),
        };
        if count >= self.shared.config.max_recipients {
            return self.reply(452, "4.5.3", "Too many recipients");
        }
        if self.shared.failures.is_blocked(self.peer.ip()) {
            self.count_rcpt(RcptResult::throttled);
            return self.reply(
                450,
                "4.7.1",
                "Too many failed recipients from your address, try again later",
            );
        }
        if let Some(verdict) = self.srs_bounce(address) {
            return match verdict {
                // Each bounce gets a report of its own (see
                // `Session::return_bounce`): it travels alone.
                Ok(_) if count > 0 => self.separately(),
                Ok(original) if self.other_domain(&original) => self.one_domain_only(),
                Ok(_) if !self.shared.bounces.allow(address) => {
                    tracing::info!("SRS bounce refused: this address had its share");
                    self.count_rcpt(RcptResult::relay_denied);
                    self.rcpt_failed(false).await;
                    self.reply(550, "5.7.1", "Too many bounces to this address")
                }
                Ok(original) => {
                    // No address in the log: the original sender is personal data.
                    tracing::info!("SRS bounce accepted, returned to the original sender");
                    if let State::Transaction(tx) = &mut self.state {
                        tx.started.get_or_insert_with(Instant::now);
                    }
                    self.accept(Accepted {
                        address: address.to_string(),
                        kind: AcceptedKind::Bounce { original },
                    })
                }
                Err(e) => {
                    tracing::info!(error = %e, "SRS recipient refused");
                    self.count_rcpt(RcptResult::relay_denied);
                    self.rcpt_failed(true).await;
                    self.reply(550, "5.7.1", "Invalid or expired SRS address")
                }
            };
        }
        let holds_bounce = self.transaction().is_some_and(|tx| {
            tx.rcpts
                .iter()
                .any(|a| matches!(a.kind, AcceptedKind::Bounce { .. }))
        });
        if holds_bounce {
            return self.separately();
        }
        let config = &self.shared.config;
        match classify(address, &self.shared.domains, &config.recipient_delimiter) {
            Ok(Recipient::Alias { id, tag, domain }) => {
                self.rcpt_alias(id, format!("{tag}@{domain}")).await
            }
            Ok(Recipient::Postmaster { .. })
                if self.other_domain(&self.shared.config.postmaster) =>
            {
                self.one_domain_only()
            }
            Ok(Recipient::Postmaster { address }) => self.accept(Accepted {
                address,
                kind: AcceptedKind::Postmaster,
            }),
            Err(NotOurs::Syntax) => {
                self.count_rcpt(RcptResult::invalid);
                self.rcpt_failed(true).await;
                self.reply(501, "5.1.3", "Bad recipient address syntax")
            }
            Err(NotOurs::Relay) => {
                self.count_rcpt(RcptResult::relay_denied);
                self.rcpt_failed(true).await;
                self.reply(550, "5.7.1", "Relaying denied")
            }
            Err(NotOurs::NoSuchId) => self.refuse(Refusal::Unknown).await,
        }
    }

    /// SRS: an address in an alias domain whose local part is an SRS
    /// address is a return path, checked before anything else looks at the
    /// recipient. `None`: not an SRS address; `Some(Ok(original))`: a valid
    /// bounce to relay to `original`; `Some(Err(_))`: forged, altered,
    /// expired, or not from the null sender (see `Forwarding::reverse_recipient`).
    fn srs_bounce(&self, address: &str) -> Option<Result<String, crate::mail::SrsError>> {
        let (local, domain) = address.rsplit_once('@')?;
        if !self.shared.domains.contains(&domain.to_ascii_lowercase()) {
            return None;
        }
        let from = self.transaction().map_or("", |tx| tx.mail_from.as_str());
        self.shared
            .forwarding
            .reverse_recipient(local, from, self.shared.aliases.now_ms())
    }

    /// An alias recipient: refused from the replica when it can never take
    /// mail, else one use is reserved through the store. `rest` is the tag
    /// and domain (`+tag@domain`), kept for the `Received:` header.
    async fn rcpt_alias(&mut self, id: String, rest: String) {
        let duplicate = self.transaction().is_some_and(|tx| {
            tx.rcpts
                .iter()
                .any(|a| matches!(&a.kind, AcceptedKind::Alias { id: held, .. } if *held == id))
        });
        if duplicate {
            return self.reply(250, "2.1.5", "Recipient OK (duplicate)");
        }
        match self.shared.aliases.refused(&id).await {
            Ok(Some(reason)) => return self.refuse(reason).await,
            Ok(None) => {}
            Err(_) => return self.tempfail(),
        }
        match self.shared.aliases.reserve(&id).await {
            Ok(Ok(reserved)) if self.other_domain(&reserved.target) => {
                self.shared.aliases.release(&id, &reserved).await;
                self.one_domain_only();
            }
            Ok(Ok(reserved)) => {
                if let State::Transaction(tx) = &mut self.state {
                    tx.started.get_or_insert_with(Instant::now);
                }
                self.accept(Accepted {
                    address: format!("{id}{rest}"),
                    kind: AcceptedKind::Alias { id, reserved },
                });
            }
            Ok(Err(reason)) => self.refuse(reason).await,
            Err(_) => self.tempfail(),
        }
    }

    /// True when the upstream takes one domain per message and
    /// `destination` is in another domain than a recipient accepted before.
    fn other_domain(&self, destination: &str) -> bool {
        if !self.shared.upstream.one_domain_per_message() {
            return false;
        }
        let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        let new = domain(destination);
        self.transaction()
            .is_some_and(|tx| tx.rcpts.iter().any(|a| domain(self.destination(a)) != new))
    }

    /// RFC 5321 4.5.3.1.10: the client sends this recipient in a later
    /// transaction. Not counted as a failure; the text names no address.
    fn one_domain_only(&mut self) {
        self.count_rcpt(RcptResult::other_domain);
        self.reply(
            452,
            "4.5.3",
            "Too many recipients for this message, send this one separately",
        );
    }

    /// A bounce to an SRS address and any other recipient go in separate
    /// transactions: the bounce is answered with a report of its own, the
    /// others get the message. `452 4.5.3` asks the client to send this
    /// recipient again later (RFC 5321 4.5.3.1.10).
    fn separately(&mut self) {
        self.count_rcpt(RcptResult::bounce_alone);
        self.reply(
            452,
            "4.5.3",
            "Too many recipients for this message, send this one separately",
        );
    }

    fn accept(&mut self, accepted: Accepted) {
        if let State::Transaction(tx) = &mut self.state {
            tx.rcpts.push(accepted);
        }
        self.count_rcpt(RcptResult::accepted);
        self.reply(250, "2.1.5", "Recipient OK");
    }

    fn count_rcpt(&self, result: RcptResult) {
        self.shared
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
            self.shared.failures.record(self.peer.ip());
        }
        // Tarpit: each failure beyond the first costs the client more time, which
        // makes guessing alias ids by RCPT hopeless.
        if self.failed_rcpts > 1 {
            let base = self.shared.config.failed_rcpt_delay_ms;
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
}

/// True for `RCPT TO:<local@[address literal]>`, which smtp-proto does not
/// parse but we judge ourselves.
pub(super) fn is_address_literal_rcpt(line: &[u8]) -> bool {
    line.len() > 4 && line[..4].eq_ignore_ascii_case(b"RCPT") && line.windows(2).any(|w| w == b"@[")
}

/// The address between the first `<` and the next `>` (empty if none).
pub(super) fn bracketed_address(line: &[u8]) -> String {
    let line = String::from_utf8_lossy(line);
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(addr, _)| addr.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_recipients_smtp_proto_leaves_to_us() {
        assert!(is_address_literal_rcpt(b"RCPT TO:<a@[127.0.0.1]>\r\n"));
        assert!(is_address_literal_rcpt(b"rcpt to:<a@[IPv6:::1]>\r\n"));
        assert!(!is_address_literal_rcpt(b"RCPT TO:<a@example.org>\r\n"));
        assert!(!is_address_literal_rcpt(b"MAIL FROM:<a@[127.0.0.1]>\r\n"));
        assert_eq!(
            bracketed_address(b"RCPT TO:<a@[1.2.3.4]>\r\n"),
            "a@[1.2.3.4]"
        );
        // smtp-proto hands over `<postmaster>` as an empty address.
        let parsed = smtp_proto::Request::parse(&mut b"RCPT TO:<Postmaster>\r\n".iter());
        assert!(matches!(parsed, Ok(smtp_proto::Request::Rcpt { to }) if to.address.is_empty()));
        assert_eq!(bracketed_address(b"RCPT TO:<Postmaster>\r\n"), "Postmaster");
    }
}
