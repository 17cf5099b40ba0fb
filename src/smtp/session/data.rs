//! DATA: reading the message with hard bounds, and our trace header.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, State};
use crate::metrics::{MessageLabels, MessageResult};
use crate::smtp::backends::{AliasStore, Upstream};
use crate::smtp::input::{InputError, Line};

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

impl<S, A, U> Session<S, A, U>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: AliasStore,
    U: Upstream,
{
    pub(super) async fn data(&mut self) -> Result<(), InputError> {
        let Some(tx) = self.transaction() else {
            self.reply(503, "5.5.1", "Need MAIL before DATA");
            return Ok(());
        };
        if tx.rcpts.is_empty() {
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
        if count_received(&message) > self.shared.config.max_hops {
            self.count_message(MessageResult::rejected);
            self.reset().await;
            self.reply(554, "5.4.6", "Too many hops: mail loop detected");
            return Ok(());
        }
        // The transaction leaves the session state here: whatever the
        // upstream says, the next message starts with MAIL.
        if let State::Transaction(tx) = std::mem::replace(&mut self.state, State::Ready) {
            self.forward(tx, message).await;
        }
        Ok(())
    }

    pub(super) fn count_message(&self, result: MessageResult) {
        self.shared
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
        let max = self.shared.config.max_message_size as usize;
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

    /// Our trace header (RFC 5321 4.4): `with ESMTPS` and the TLS version and
    /// cipher when the message came over TLS (RFC 3848), so the recipient can
    /// see how the first hop was protected. The target is never named: the
    /// `for` clause carries the alias address the sender used.
    pub(super) fn received_header(&self) -> String {
        let helo: String = self
            .helo
            .as_deref()
            .unwrap_or("unknown")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(100)
            .collect();
        let for_clause = match self.transaction().map(|tx| tx.rcpts.as_slice()) {
            Some([one]) => format!("\r\n\tfor <{}>", one.address),
            _ => String::new(),
        };
        let (with, tls) = match &self.tls {
            Some(t) => (
                "ESMTPS",
                format!("\r\n\t(using {} with cipher {})", t.version, t.cipher),
            ),
            None => ("ESMTP", String::new()),
        };
        format!(
            "Received: from {helo} ({ip}){tls}\r\n\tby {host} (tempalias) with {with} id {sid}{for_clause};\r\n\t{date}\r\n",
            ip = self.peer.ip(),
            host = self.shared.config.hostname,
            sid = self.sid,
            date = crate::clock::rfc5322(self.shared.aliases.now_ms()),
        )
    }
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
    fn counts_received_headers_only_in_header_section() {
        let m = b"Received: a\r\nRECEIVED: b\r\n c\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(m), 2);
        assert_eq!(count_received(b""), 0);
    }
}
