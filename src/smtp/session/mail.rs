//! MAIL FROM: starts a transaction.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, State, Transaction};
use crate::smtp::backends::{AliasStore, Upstream};

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    pub(super) async fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        match self.state {
            State::Connected => return self.reply(503, "5.5.1", "Say EHLO or HELO first"),
            State::Transaction(_) => return self.reply(503, "5.5.1", "Nested MAIL command"),
            State::Ready => {}
        }
        if self.shared.config.require_tls && self.tls.is_none() {
            return self.reply(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        if from.size as u64 > self.shared.config.max_message_size {
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
        self.state = State::Transaction(Transaction {
            mail_from: address,
            rcpts: Vec::new(),
            started: None,
        });
        self.reply(250, "2.1.0", "Sender OK");
    }
}
