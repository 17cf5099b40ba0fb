//! After DATA: the message goes upstream once, and the uses held for it are
//! settled by the outcome (committed when the upstream accepted, released
//! otherwise) before the client hears the verdict; with
//! `smtp.reply_before_commit` the commits are written after the `250`.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Accepted, AcceptedKind, Session, Transaction};
use crate::metrics::MessageResult;
use crate::relay::{Delivery, Envelope};
use crate::smtp::backends::{AliasStore, Upstream};

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    /// Sends the message of `tx` upstream and answers the client.
    ///
    /// This is the one place a message leaves the session: anything that
    /// changes what goes out (signing the message with DKIM or sealing it
    /// with ARC, rewriting the envelope sender with SRS) belongs between
    /// [`Session::envelope`] and the `Upstream::deliver` call below, and a
    /// failure there is answered like an upstream temporary failure.
    pub(super) async fn forward(&mut self, tx: Transaction, message: Vec<u8>) {
        if let Some((envelope, report)) = self.return_bounce(&tx, &message) {
            return self.send(tx, envelope, report, None).await;
        }
        let envelope = self.envelope(&tx);
        // SRS sender, DKIM signature and ARC set of the (first) alias domain.
        let alias_address = tx
            .rcpts
            .iter()
            .map(|a| a.address.as_str())
            .find(|a| a.contains('@'))
            .unwrap_or_default();
        let incoming = crate::mail::Incoming {
            client_ip: self.peer.ip(),
            helo: self.helo.as_deref().unwrap_or_default(),
            mail_from: &tx.mail_from,
        };
        let (envelope, message) = self
            .shared
            .forwarding
            .prepare(
                incoming,
                alias_address,
                envelope,
                message,
                self.shared.aliases.now_ms(),
            )
            .await;
        // The upstream must answer before the first reservation's lease runs
        // out (a message holding no use has only the relay's own budget).
        let deadline = tx
            .rcpts
            .iter()
            .filter_map(|a| match &a.kind {
                AcceptedKind::Alias { reserved, .. } => Some(reserved.lease_ends),
                _ => None,
            })
            .min();
        self.send(tx, envelope, message, deadline).await;
    }

    /// A bounce to one of our SRS addresses (it travels alone, see
    /// `Session::rcpt`): the envelope and report for the original sender,
    /// `None` for any other transaction.
    ///
    /// The bounce itself is never passed on: it names the alias's target
    /// (its report fields, its text, the returned copy with our trace and
    /// ARC headers). The node writes a report of its own from the alias
    /// domain (`crate::mail::dsn`), DKIM-signed like the node's other own
    /// mail, from the null sender.
    fn return_bounce(
        &self,
        tx: &Transaction,
        message: &[u8],
    ) -> Option<(Envelope, std::sync::Arc<Vec<u8>>)> {
        let (srs_address, original) = tx.rcpts.iter().find_map(|a| match &a.kind {
            AcceptedKind::Bounce { original } => Some((a.address.as_str(), original)),
            _ => None,
        })?;
        let domain = srs_address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let bounce = crate::mail::dsn::read(message, &domain);
        tracing::info!(
            action = bounce.action.as_deref().unwrap_or("unknown"),
            status = bounce.status.as_deref().unwrap_or("unknown"),
            "bounce read; a report of our own goes to the original sender"
        );
        let report = crate::mail::dsn::Report {
            alias_domain: &domain,
            hostname: &self.shared.config.hostname,
            to: original,
            now_ms: self.shared.aliases.now_ms(),
        }
        .build(&bounce);
        let report = self.shared.forwarding.sign_own(&domain, report);
        let envelope = Envelope {
            mail_from: String::new(),
            rcpt_to: vec![original.clone()],
        };
        Some((envelope, std::sync::Arc::new(report)))
    }

    /// Sends `message` upstream, settles the uses of `tx` by the outcome
    /// and answers the client.
    async fn send(
        &mut self,
        tx: Transaction,
        envelope: Envelope,
        message: std::sync::Arc<Vec<u8>>,
        deadline: Option<Instant>,
    ) {
        let started = Instant::now();
        let delivery = self
            .shared
            .upstream
            .deliver(&envelope, message.clone(), deadline)
            .await;
        self.shared
            .metrics
            .forward_duration
            .observe(started.elapsed().as_secs_f64());
        let rcpts = tx.rcpts.len();
        match delivery {
            Delivery::Accepted => {
                if self.shared.config.reply_before_commit {
                    self.commit_later(&tx.rcpts);
                } else {
                    self.settle(tx.rcpts, true).await;
                }
                self.count_message(MessageResult::forwarded);
                tracing::info!(rcpts, size = message.len(), "forwarded");
                let sid = self.sid.clone();
                self.reply(250, "2.0.0", &format!("OK: forwarded as {sid}"));
            }
            Delivery::TempFail(reason) => {
                tracing::warn!(%reason, "upstream temporary failure");
                self.settle(tx.rcpts, false).await;
                self.count_message(MessageResult::tempfail);
                self.reply(451, "4.4.1", "Upstream not available, try again later");
            }
            Delivery::PermFail {
                code,
                enhanced,
                text,
            } => {
                // The upstream's text often names the target ("<bob@...>:
                // mailbox unknown"): it goes to the log only, and the sender
                // gets its codes with a fixed text.
                tracing::warn!(code, %enhanced, upstream = %text, "upstream refused the message");
                self.settle(tx.rcpts, false).await;
                self.count_message(MessageResult::permfail);
                let (code, enhanced) = permanent_codes(code, &enhanced);
                self.reply(code, &enhanced, refusal_text(&enhanced));
            }
        }
    }

    /// The upstream envelope: the sender as given, each alias's target, the
    /// postmaster address and the original senders of reversed bounces,
    /// without duplicates.
    fn envelope(&self, tx: &Transaction) -> Envelope {
        let mut rcpt_to: Vec<String> = Vec::new();
        for a in &tx.rcpts {
            let target = self.destination(a);
            if !rcpt_to.iter().any(|t| t == target) {
                rcpt_to.push(target.to_string());
            }
        }
        Envelope {
            mail_from: tx.mail_from.clone(),
            rcpt_to,
        }
    }

    /// Where the upstream sends `a`: the alias's target, the postmaster
    /// address, or the original sender of a reversed bounce.
    pub(super) fn destination<'a>(&'a self, a: &'a Accepted) -> &'a str {
        match &a.kind {
            AcceptedKind::Alias { reserved, .. } => &reserved.target,
            AcceptedKind::Postmaster => &self.shared.config.postmaster,
            AcceptedKind::Bounce { original } => original,
        }
    }

    /// Commits (`commit`) or releases every use held by `rcpts`,
    /// concurrently (each is its own Raft write; they share the leader's
    /// round trips).
    ///
    /// A commit that fails is retried in the background until its lease
    /// ends (src/smtp/settle.rs); a release that fails leaves the lease to
    /// lapse and the use returns then.
    pub(super) async fn settle(&self, rcpts: Vec<Accepted>, commit: bool) {
        let aliases = &self.shared.aliases;
        let writes = rcpts.iter().filter_map(|a| match &a.kind {
            AcceptedKind::Alias { id, reserved } => Some(async move {
                if commit {
                    aliases.commit(id, reserved).await;
                } else {
                    aliases.release(id, reserved).await;
                }
            }),
            AcceptedKind::Postmaster | AcceptedKind::Bounce { .. } => None,
        });
        futures::future::join_all(writes).await;
    }

    /// Hands the commits of `rcpts` to the store to write after the reply
    /// (`smtp.reply_before_commit`).
    fn commit_later(&self, rcpts: &[Accepted]) {
        for a in rcpts {
            if let AcceptedKind::Alias { id, reserved } = &a.kind {
                self.shared.aliases.commit_later(id, reserved);
            }
        }
    }
}

/// The reply codes passed on for a permanent upstream refusal: the
/// upstream's own when they are a well-formed `5xx` and `5.x.y`, else the
/// generic `554 5.0.0`.
fn permanent_codes(code: u16, enhanced: &str) -> (u16, String) {
    let code = if (500..600).contains(&code) {
        code
    } else {
        554
    };
    let parts: Vec<&str> = enhanced.split('.').collect();
    let well_formed = parts.len() == 3
        && parts[0] == "5"
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let enhanced = if well_formed {
        enhanced.to_string()
    } else {
        "5.0.0".to_string()
    };
    (code, enhanced)
}

/// The fixed text of a permanent refusal: what the codes mean, never the
/// upstream's own words (they may name the target).
fn refusal_text(enhanced: &str) -> &'static str {
    match enhanced {
        // Worded so that they are true whether no upstream of ours offered
        // the extension or the upstream itself refused with these codes.
        "5.6.3" => "Conversion required but not supported: 8-bit content not accepted upstream",
        "5.6.7" => "Non-ASCII addresses (SMTPUTF8) not accepted upstream",
        // Larger than every upstream's SIZE, or the upstream's own 552.
        "5.3.4" => "Message too big for the upstream",
        _ => "Upstream refused the message",
    }
}

#[cfg(test)]
mod tests {
    use super::permanent_codes;

    #[test]
    fn only_well_formed_permanent_codes_are_passed_on() {
        assert_eq!(permanent_codes(550, "5.1.1"), (550, "5.1.1".into()));
        assert_eq!(permanent_codes(552, "5.3.4"), (552, "5.3.4".into()));
        assert_eq!(permanent_codes(250, "2.0.0"), (554, "5.0.0".into()));
        assert_eq!(permanent_codes(550, "5.1.1 <bob@x>"), (550, "5.0.0".into()));
        assert_eq!(permanent_codes(550, ""), (550, "5.0.0".into()));
    }
}
