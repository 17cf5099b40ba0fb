//! Target confirmation (`[limits] confirm_targets`): the mail that asks a
//! target to confirm, and the SMTP answer for aliases that wait for it.
//!
//! The state machine decides which create asks a target (one at a time per
//! target, see `raft/targets.rs`); the node that took that create holds the
//! only copy of the token and mails the link here, through the same
//! [`Relay`] as forwarded mail, DKIM-signed with the alias domain's key like
//! forwarded mail (`Forwarding::sign_own`; it goes out from the null sender,
//! so there is no sender to rewrite with SRS). If the relay cannot take it,
//! the request is withdrawn through Raft so the next create to the target
//! asks again instead of waiting for the request to lapse.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{ConfirmEvent, ConfirmLabels, Metrics};
use crate::raft::{Command, Node};
use crate::relay::{Delivery, Envelope, Relay};

/// What RCPT answers for an alias that waits for its target's confirmation.
/// Fixed, and naming nobody: the sender must not learn the target. A `5xx`
/// although it may clear: it clears only when a person acts, perhaps never,
/// and a sender's queue retrying for days is the traffic this prevents.
pub const RCPT_REFUSAL: (u16, &str, &str) = (
    550,
    "5.7.1",
    "This alias is not active: its owner has not confirmed it yet",
);

/// Confirmation mails being sent at once; beyond that a request is
/// withdrawn at once (the next create to that target asks again).
const MAX_SENDING: usize = 32;

/// Attempts at handing one mail to the relay, and the pause after each
/// failed one (the relay itself tries every smarthost per attempt).
const ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Sends confirmation mails for one node.
pub struct Confirmer {
    relay: Arc<Relay>,
    forwarding: Arc<crate::mail::Forwarding>,
    node: Node,
    metrics: Arc<Metrics>,
    /// `[http] public_url` (or the derived one), without a trailing `/`.
    base_url: String,
    /// Alias domain the mail comes from.
    domain: String,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// The sends in flight, so shutdown can wait for them (a mail cut off
    /// mid-send would leave its target's request pending until it lapses).
    tasks: TaskTracker,
}

impl Confirmer {
    pub fn new(
        relay: Arc<Relay>,
        forwarding: Arc<crate::mail::Forwarding>,
        node: Node,
        metrics: Arc<Metrics>,
        base_url: &str,
        domain: &str,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            relay,
            forwarding,
            node,
            metrics,
            base_url: base_url.trim_end_matches('/').to_string(),
            domain: domain.to_string(),
            permits: Arc::new(Semaphore::new(MAX_SENDING)),
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// The link the target follows.
    pub fn link(&self, token: &str) -> String {
        link(&self.base_url, token)
    }

    /// Mails the confirmation link of `token` to `target` in the background.
    pub fn request(self: &Arc<Self>, target: String, token: String) {
        let this = self.clone();
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!("too many confirmation mails in flight; withdrawing this request");
            self.tasks.spawn(async move { this.withdraw(&token).await });
            return;
        };
        self.tasks.spawn(async move {
            let _permit = permit;
            this.send(&target, &token).await;
        });
    }

    /// Waits (at most `limit`) for the mails in flight: called at shutdown
    /// while Raft still runs, so a mail that fails can still be withdrawn.
    /// After the shutdown token is cancelled, failed sends are not retried.
    pub async fn drain(&self, limit: Duration) {
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("confirmation mails still in flight at shutdown");
        }
    }

    async fn send(&self, target: &str, token: &str) {
        let message = match message(&self.domain, &self.link(token), target) {
            Ok(m) => Arc::new(self.forwarding.sign_own(&self.domain, m)),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the confirmation mail");
                return self.withdraw(token).await;
            }
        };
        // The null sender: a bounce of this mail must not come back to an
        // alias domain address nobody reads (RFC 5321 6.1, as for DSNs).
        let envelope = Envelope {
            mail_from: String::new(),
            rcpt_to: vec![target.to_string()],
        };
        for attempt in 1..=ATTEMPTS {
            let deadline = crate::relay::no_lease_deadline();
            match self
                .relay
                .deliver(&envelope, message.clone(), deadline)
                .await
            {
                Delivery::Accepted => {
                    self.count(ConfirmEvent::mail_sent);
                    tracing::info!("confirmation mail sent");
                    return;
                }
                Delivery::PermFail { code, enhanced, .. } => {
                    // The upstream's text may name the target: not logged.
                    tracing::warn!(code, %enhanced, "confirmation mail refused");
                    break;
                }
                Delivery::TempFail(reason) => {
                    tracing::warn!(attempt, %reason, "confirmation mail not sent");
                    if attempt == ATTEMPTS {
                        break;
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
        self.withdraw(token).await;
    }

    async fn withdraw(&self, token: &str) {
        self.count(ConfirmEvent::mail_failed);
        let cmd = Command::WithdrawConfirmation {
            token_hash: crate::raft::targets::token_hash(token),
        };
        if let Err(e) = self.node.write(cmd).await {
            // The request lapses by itself after its time.
            tracing::warn!(error = %e, "confirmation request not withdrawn");
        }
    }

    fn count(&self, event: ConfirmEvent) {
        self.metrics
            .confirmations
            .get_or_create(&ConfirmLabels { event })
            .inc();
    }
}

/// The link of `token` under `base_url` (no trailing `/`).
fn link(base_url: &str, token: &str) -> String {
    format!("{base_url}/v1/confirm/{token}")
}

/// The mail: plain text, with the link and what it is for.
fn message(domain: &str, link: &str, target: &str) -> Result<Vec<u8>, lettre::error::Error> {
    let from = format!("tempalias <no-reply@{domain}>");
    let hours = crate::raft::targets::CONFIRM_REQUEST_TTL_MS / 3_600_000;
    let body = format!(
        "Someone asked {domain} for a temporary e-mail alias that forwards to\r\n\
             this address. Before any mail is forwarded to you, please confirm that\r\n\
             you want it:\r\n\r\n    {link}\r\n\r\n\
             The link works for {hours} hours. If you did not ask for an alias, ignore\r\n\
             this mail: nothing will be forwarded to you, and this service will not\r\n\
             write to you again for a while.\r\n",
    );
    let parse = |s: &str| {
        s.parse::<lettre::message::Mailbox>()
            .map_err(|_| lettre::error::Error::MissingFrom)
    };
    // lettre picks the encoding: quoted-printable, as the link line is
    // longer than 76 characters (every mail reader decodes it).
    let msg = lettre::Message::builder()
        .from(parse(&from)?)
        .to(parse(target)?)
        .subject(format!("Confirm forwarding from {domain}"))
        .message_id(Some(format!(
            "<confirm.{}@{domain}>",
            crate::alias::new_id()
        )))
        .header(AutoSubmitted)
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body)?;
    Ok(msg.formatted())
}

/// `Auto-Submitted: auto-generated` (RFC 3834): no auto-replies, please.
#[derive(Clone)]
struct AutoSubmitted;

impl lettre::message::header::Header for AutoSubmitted {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self)
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), "auto-generated".into())
    }
}

/// A new confirmation token: 256 random bits, hex (only its digest is
/// replicated, see `raft::targets::token_hash`).
pub fn new_token() -> String {
    crate::alias::new_token()
}

/// True when `s` has the shape of a token we hand out.
pub fn is_token(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mail_carries_the_link_and_asks_for_no_replies() {
        let token = new_token();
        assert!(is_token(&token));
        assert!(!is_token(&token.to_uppercase()) && !is_token("abc"));
        let url = link("https://aliases.example", &token);
        let raw = message("t.example", &url, "Me@example.net").unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("From: tempalias <no-reply@t.example>"),
            "{head}"
        );
        assert!(head.contains("To: Me@example.net"), "{head}");
        assert!(head.contains("Auto-Submitted: auto-generated"), "{head}");
        assert!(head.contains("Message-ID: <confirm."), "{head}");
        assert!(
            head.contains("Subject: Confirm forwarding from t.example"),
            "{head}"
        );
        // Quoted-printable soft breaks joined again, the link is whole.
        let joined = body.replace("=\r\n", "");
        assert!(joined.contains(&url), "{body}");
        // Nothing in the RCPT refusal names anybody.
        assert!(!RCPT_REFUSAL.2.contains('@'));
        assert_eq!((RCPT_REFUSAL.0, RCPT_REFUSAL.1), (550, "5.7.1"));
    }
}
