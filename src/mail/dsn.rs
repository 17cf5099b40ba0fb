//! The delivery status notification the node writes when a bounce comes
//! back to one of its SRS addresses.
//!
//! The bounce itself is never passed on: the target's server writes the
//! target address into it (`Final-Recipient`, its own text, the returned
//! copy with our `Received: ... for <target>` and ARC headers), and the
//! original sender must not learn where an alias forwards to. So the node
//! reads only two validated facts from it (the per-recipient `Action` and
//! `Status` of its `message/delivery-status` part) and the few headers the
//! original sender wrote itself, and writes a report of its own (RFC 3464)
//! from the alias domain's `MAILER-DAEMON`.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

/// Headers of the returned message that the original sender wrote; nothing
/// else of it goes back (trace, authentication and delivery headers name
/// the target).
const RETURNED_HEADERS: [&str; 8] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
];

/// Longest header value re-emitted (a header line must stay under 998
/// characters even before folding).
const MAX_VALUE: usize = 900;

/// What the node takes from an incoming bounce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bounce {
    /// `failed`, `delayed`, `delivered`, `relayed` or `expanded`.
    pub action: Option<String>,
    /// An enhanced status code `d.ddd.ddd` consistent with the action.
    pub status: Option<String>,
    /// Sanitized `(name, value)` of the returned message's own headers.
    pub headers: Vec<(&'static str, String)>,
}

/// Reads `message` (the bounce as received). Anything it cannot read is
/// left out: a bounce that is no DSN at all still yields a report (with an
/// unknown status).
pub fn read(message: &[u8], alias_domain: &str) -> Bounce {
    let mut bounce = Bounce::default();
    let Some(parsed) = MessageParser::default().parse(message) else {
        return bounce;
    };
    // Addresses the bounce reports on: the target, in practice. A returned
    // header naming one of them is dropped (defence in depth).
    let mut reported: Vec<String> = Vec::new();
    let mut returned: Option<Vec<(String, String)>> = None;
    for part in &parsed.parts {
        let Some(ct) = part.content_type() else {
            continue;
        };
        let ctype = ct.ctype().to_ascii_lowercase();
        let subtype = ct.subtype().unwrap_or_default().to_ascii_lowercase();
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status" | "global-delivery-status")
                if bounce.action.is_none() =>
            {
                let (action, status) = delivery_status(part.contents(), &mut reported);
                bounce.action = action;
                bounce.status = status;
            }
            ("message", "rfc822" | "global") if returned.is_none() => {
                if let PartType::Message(m) = &part.body {
                    returned = Some(raw_headers(m));
                }
            }
            ("text", "rfc822-headers") if returned.is_none() => {
                if let Some(m) = MessageParser::default().parse_headers(part.contents()) {
                    returned = Some(raw_headers(&m));
                }
            }
            _ => {}
        }
    }
    let alias_domain = alias_domain.to_ascii_lowercase();
    reported.retain(|a| {
        a.contains('@')
            && !a
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&alias_domain))
    });
    for name in RETURNED_HEADERS {
        let value = returned
            .iter()
            .flatten()
            .find_map(|(n, v)| n.eq_ignore_ascii_case(name).then(|| sanitize(v)));
        let Some(value) = value else { continue };
        let lower = value.to_ascii_lowercase();
        if value.is_empty() || reported.iter().any(|a| lower.contains(a.as_str())) {
            continue;
        }
        bounce.headers.push((name, value));
    }
    bounce
}

fn raw_headers(m: &Message<'_>) -> Vec<(String, String)> {
    m.headers_raw()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The first per-recipient block with a valid `Action`, and its `Status`
/// when well-formed and of the action's class. The recipient fields are
/// collected into `reported`; `Diagnostic-Code` is never read (it is the
/// receiving server's text and names the target).
fn delivery_status(body: &[u8], reported: &mut Vec<String>) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(body);
    let mut found: (Option<String>, Option<String>) = (None, None);
    // Fields are unfolded; blocks are separated by empty lines. The first
    // block is the per-message one and has no Action.
    for block in text.replace("\r\n", "\n").split("\n\n") {
        let mut action = None;
        let mut status = None;
        for field in unfold(block) {
            let Some((name, value)) = field.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "action" => action = Some(value.to_ascii_lowercase()),
                "status" => status = Some(value.to_string()),
                "final-recipient" | "original-recipient" | "x-actual-recipient" => {
                    let address = value.split_once(';').map_or(value, |(_, a)| a);
                    let address = address.trim().trim_matches(|c| c == '<' || c == '>');
                    reported.push(address.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        let Some(action) = action.filter(|a| is_action(a)) else {
            continue;
        };
        if found.0.is_none() {
            let status = status.filter(|s| is_status(s) && status_fits(&action, s));
            found = (Some(action), status);
        }
    }
    found
}

fn unfold(block: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::new();
    for line in block.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else if !line.trim().is_empty() {
            fields.push(line.to_string());
        }
    }
    fields
}

fn is_action(a: &str) -> bool {
    matches!(
        a,
        "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    )
}

/// `class.subject.detail` (RFC 3463): class 2, 4 or 5, then 1-3 digits twice.
fn is_status(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// RFC 3464 2.3.3: a failure has a 5 status, a delay a 4, success a 2.
fn status_fits(action: &str, status: &str) -> bool {
    let class = match action {
        "failed" => '5',
        "delayed" => '4',
        _ => '2',
    };
    status.starts_with(class)
}

/// One line of text: control characters (CR and LF among them) become
/// spaces, runs of white space one space, and the length is capped. What
/// comes out cannot end the header it is put into.
fn sanitize(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_VALUE));
    for c in value.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > MAX_VALUE {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

/// `Name: value` folded at spaces to lines of about 78 characters. A value
/// that is not ASCII goes out as RFC 2047 encoded words, so the header part
/// stays 7-bit.
fn header_line(name: &str, value: &str) -> String {
    use base64::Engine as _;
    let words: Vec<String> = if value.is_ascii() {
        value.split(' ').map(str::to_string).collect()
    } else {
        let mut words = Vec::new();
        let mut chunk = String::new();
        for c in value.chars() {
            if chunk.len() + c.len_utf8() > 45 {
                words.push(std::mem::take(&mut chunk));
            }
            chunk.push(c);
        }
        words.push(chunk);
        words
            .iter()
            .map(|w| {
                format!(
                    "=?UTF-8?B?{}?=",
                    base64::engine::general_purpose::STANDARD.encode(w)
                )
            })
            .collect()
    };
    let mut out = format!("{name}:");
    let mut line_len = out.len();
    for word in words.iter().filter(|w| !w.is_empty()) {
        if line_len + 1 + word.len() > 78 && line_len > name.len() + 1 {
            out.push_str("\r\n");
            line_len = 0;
        }
        out.push(' ');
        out.push_str(word);
        line_len += 1 + word.len();
    }
    out.push_str("\r\n");
    out
}

/// What the report is written from.
pub struct Report<'a> {
    /// The alias domain of the SRS address the bounce came to.
    pub alias_domain: &'a str,
    /// This node's SMTP hostname (`Reporting-MTA`).
    pub hostname: &'a str,
    /// The original sender (the reversed SRS address); already a valid
    /// envelope address.
    pub to: &'a str,
    pub now_ms: u64,
}

impl Report<'_> {
    /// The report (RFC 3464 `multipart/report`) on `bounce`: all 7-bit,
    /// CRLF line ends, ready to be signed and sent from the null sender.
    pub fn build(&self, bounce: &Bounce) -> Vec<u8> {
        let domain = self.alias_domain;
        let date = crate::clock::rfc5322(self.now_ms);
        let boundary = format!("=_tempalias_dsn_{:016x}", rand::random::<u64>());
        let action = bounce.action.as_deref().unwrap_or("failed");
        let status_text = bounce.status.as_deref().unwrap_or("unknown");
        // The machine-readable status must be a code: unknown is "other or
        // undefined" (X.0.0) of the action's class.
        let status = bounce.status.clone().unwrap_or_else(|| {
            match action {
                "failed" => "5.0.0",
                "delayed" => "4.0.0",
                _ => "2.0.0",
            }
            .to_string()
        });
        let (subject, what) = match action {
            "failed" => (
                "Undelivered Mail Returned to Sender",
                "Your message to an alias of this domain could not be delivered.",
            ),
            "delayed" => (
                "Delayed Mail (still being retried)",
                "Your message to an alias of this domain has not been delivered yet.\r\n\
                 The receiving server is still trying; you need not do anything now.",
            ),
            _ => (
                "Successful Mail Delivery Report",
                "Your message to an alias of this domain was delivered.",
            ),
        };
        let mut m = String::with_capacity(2048);
        m.push_str(&format!(
            "From: Mail Delivery System <MAILER-DAEMON@{domain}>\r\n\
             To: <{to}>\r\n\
             Subject: {subject}\r\n\
             Date: {date}\r\n\
             Message-ID: <dsn.{id:016x}@{host}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             Content-Transfer-Encoding: 7bit\r\n\
             \r\n\
             This is the mail system at {domain}.\r\n\
             \r\n\
             {what}\r\n\
             \r\n\
             Status reported by the receiving server: {status_text} (action: {action})\r\n\
             \r\n\
             The alias forwards to an address that is not shown here: this report\r\n\
             is written by {domain} in place of the receiving server's own, which\r\n\
             would name it. The headers of your message follow.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: message/delivery-status\r\n\
             \r\n\
             Reporting-MTA: dns; {host}\r\n\
             Arrival-Date: {date}\r\n\
             \r\n\
             Final-Recipient: rfc822; postmaster@{domain}\r\n\
             Action: {action}\r\n\
             Status: {status}\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/rfc822-headers\r\n\
             Content-Transfer-Encoding: 7bit\r\n\
             \r\n",
            to = self.to,
            id = rand::random::<u64>(),
            host = self.hostname,
        ));
        for (name, value) in &bounce.headers {
            m.push_str(&header_line(name, value));
        }
        m.push_str(&format!("\r\n--{boundary}--\r\n"));
        m.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX_BOUNCE: &str = "Received: by mx.target.example (Postfix)\r\n\
id 4ABC; Sun, 29 Nov 2026 12:00:05 +0000 (UTC)\r\n\
From: MAILER-DAEMON@mx.target.example (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: SRS0=AbCd=XY=sender.example=alice@tempalias.test\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"4ABC.1790000005/mx.target.example\"\r\n\
Message-Id: <20261129120005.4ABC@mx.target.example>\r\n\
\r\n\
This is a MIME-encapsulated message.\r\n\
\r\n\
--4ABC.1790000005/mx.target.example\r\n\
Content-Description: Notification\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
This is the mail system at host mx.target.example.\r\n\
\r\n\
<bob@target.example>: mailbox full, Bob is over quota\r\n\
\r\n\
--4ABC.1790000005/mx.target.example\r\n\
Content-Description: Delivery report\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.target.example\r\n\
X-Postfix-Queue-ID: 4ABC\r\n\
X-Postfix-Sender: rfc822; SRS0=AbCd=XY=sender.example=alice@tempalias.test\r\n\
Arrival-Date: Sun, 29 Nov 2026 12:00:04 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; bob@target.example\r\n\
Original-Recipient: rfc822;Bob@Target.example\r\n\
Action: failed\r\n\
Status: 5.2.2\r\n\
Diagnostic-Code: smtp; 552 5.2.2 <bob@target.example>: mailbox\r\n\
    full\r\n\
\r\n\
--4ABC.1790000005/mx.target.example\r\n\
Content-Description: Undelivered Message\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
ARC-Authentication-Results: i=1; mx1.tempalias.test; spf=pass\r\n\
DKIM-Signature: v=1; a=rsa-sha256; d=tempalias.test; s=s1; h=from\r\n\
Received: from client.sender.example (127.0.0.1)\r\n\
\tby mx1.tempalias.test (tempalias) with ESMTP id s1\r\n\
\tfor <bob@target.example>; Sun, 29 Nov 2026 12:00:00 +0000\r\n\
Delivered-To: bob@target.example\r\n\
X-Original-To: bob@target.example\r\n\
From: Alice <alice@sender.example>\r\n\
To: k7q2mz9xwd@tempalias.test\r\n\
Subject: Lunch on Friday?\r\n\
Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n\
Message-ID: <1@sender.example>\r\n\
\r\n\
Hi Bob (bob@target.example), lunch?\r\n\
\r\n\
--4ABC.1790000005/mx.target.example--\r\n";

    fn report(bounce: &Bounce) -> String {
        let r = Report {
            alias_domain: "tempalias.test",
            hostname: "mx1.tempalias.test",
            to: "alice@sender.example",
            now_ms: 1_790_000_000_000,
        };
        String::from_utf8(r.build(bounce)).unwrap()
    }

    #[test]
    fn a_postfix_bounce_becomes_a_report_without_the_target() {
        let bounce = read(POSTFIX_BOUNCE.as_bytes(), "tempalias.test");
        assert_eq!(bounce.action.as_deref(), Some("failed"));
        assert_eq!(bounce.status.as_deref(), Some("5.2.2"));
        let text = report(&bounce);
        assert!(
            !text.to_ascii_lowercase().contains("bob@target.example"),
            "{text}"
        );
        assert!(!text.contains("Received:"), "{text}");
        assert!(!text.contains("DKIM"), "{text}");
        assert!(text.contains("Status: 5.2.2\r\n"), "{text}");
        assert!(text.contains("Action: failed\r\n"), "{text}");
        assert!(text.contains("receiving server: 5.2.2"), "{text}");
        assert!(text.contains("\r\nSubject: Lunch on Friday?\r\n"), "{text}");
        assert!(
            text.contains("\r\nMessage-ID: <1@sender.example>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nTo: k7q2mz9xwd@tempalias.test\r\n"),
            "{text}"
        );
        assert!(text.contains("From: Mail Delivery System <MAILER-DAEMON@tempalias.test>"));
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.is_ascii());
        // The report is a MIME message mail-parser reads back with three parts.
        let parsed = MessageParser::default().parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.parts.len(), 4, "root and three parts");
        assert_eq!(
            read(text.as_bytes(), "tempalias.test").status.as_deref(),
            Some("5.2.2")
        );
    }

    #[test]
    fn unreadable_bounces_get_an_unknown_status() {
        for body in [
            &b""[..],
            b"garbage without headers",
            b"Subject: x\r\n\r\nno report\r\n",
        ] {
            let bounce = read(body, "tempalias.test");
            assert_eq!(bounce.status, None);
            let text = report(&bounce);
            assert!(text.contains("receiving server: unknown"), "{text}");
            assert!(
                text.contains("Action: failed\r\nStatus: 5.0.0\r\n"),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_action_and_status_are_not_copied() {
        let body = POSTFIX_BOUNCE
            .replace("Status: 5.2.2", "Status: 5.2.2 <bob@x>")
            .replace("Action: failed", "Action: failed\r\nX-Bogus: 1");
        let bounce = read(body.as_bytes(), "tempalias.test");
        assert_eq!(bounce.action.as_deref(), Some("failed"));
        assert_eq!(bounce.status, None);
        let body = POSTFIX_BOUNCE.replace("Action: failed", "Action: exploded");
        assert_eq!(read(body.as_bytes(), "tempalias.test").action, None);
        // A delay with a permanent status keeps the action, not the status.
        let body = POSTFIX_BOUNCE.replace("Action: failed", "Action: delayed");
        let bounce = read(body.as_bytes(), "tempalias.test");
        assert_eq!(bounce.action.as_deref(), Some("delayed"));
        assert_eq!(bounce.status, None);
        let text = report(&bounce);
        assert!(
            text.contains("Action: delayed\r\nStatus: 4.0.0\r\n"),
            "{text}"
        );
    }

    #[test]
    fn crafted_headers_cannot_inject_fields() {
        let body = POSTFIX_BOUNCE.replace(
            "Subject: Lunch on Friday?",
            "Subject: =?UTF-8?B?aGk=?= x\rBcc: victim@else.example\nX-Evil: 1",
        );
        assert_eq!(
            sanitize("hi\r\nBcc: victim@else.example\n\tX"),
            "hi Bcc: victim@else.example X"
        );
        let text = report(&read(body.as_bytes(), "tempalias.test"));
        for line in text.split("\r\n") {
            assert!(!line.starts_with("Bcc:"), "{text}");
            assert!(!line.starts_with("X-Evil:"), "{text}");
            assert!(!line.contains('\r') && !line.contains('\n'), "{text}");
        }
        // Non-ASCII goes out as encoded words, folded, 7-bit.
        let long = "Grüße ".repeat(40);
        let body = POSTFIX_BOUNCE.replace("Lunch on Friday?", &long);
        let text = report(&read(body.as_bytes(), "tempalias.test"));
        assert!(text.is_ascii());
        assert!(text.contains("Subject: =?UTF-8?B?"), "{text}");
        assert!(text.split("\r\n").all(|l| l.len() <= 998));
    }

    #[test]
    fn returned_headers_naming_the_reported_recipient_are_dropped() {
        let body = POSTFIX_BOUNCE.replace(
            "To: k7q2mz9xwd@tempalias.test",
            "To: k7q2mz9xwd@tempalias.test, BOB@target.example",
        );
        let bounce = read(body.as_bytes(), "tempalias.test");
        assert!(bounce.headers.iter().all(|(n, _)| *n != "To"), "{bounce:?}");
        assert!(bounce.headers.iter().any(|(n, _)| *n == "Subject"));
    }

    #[test]
    fn returned_headers_from_a_headers_only_part() {
        let body = POSTFIX_BOUNCE.replace(
            "Content-Type: message/rfc822",
            "Content-Type: text/rfc822-headers",
        );
        let bounce = read(body.as_bytes(), "tempalias.test");
        assert!(
            bounce
                .headers
                .contains(&("Subject", "Lunch on Friday?".to_string())),
            "{bounce:?}"
        );
    }
}
