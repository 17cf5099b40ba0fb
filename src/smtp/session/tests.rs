//! The protocol in-process: a session over `tokio::io::duplex` with a fake
//! alias store and upstream, and a real rustls client for STARTTLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{Session, Shared};
use crate::config::SmtpConfig;
use crate::metrics::Metrics;
use crate::relay::{Delivery, Envelope};
use crate::smtp::backends::{AliasStore, Refusal, Reserved, Unavailable, Upstream};
use crate::smtp::limits::FailedRcpts;
use crate::smtp::tls::Tls;

const HOST: &str = "mx.tempalias.test";

/// Aliases with uses left, and a log of what the session did with them.
#[derive(Default)]
struct FakeAliases {
    uses: Mutex<HashMap<String, u32>>,
    log: Mutex<Vec<String>>,
}

impl FakeAliases {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl AliasStore for FakeAliases {
    async fn refused(&self, id: &str) -> Result<Option<Refusal>, Unavailable> {
        Ok((!self.uses.lock().unwrap().contains_key(id)).then_some(Refusal::Unknown))
    }

    async fn reserve(&self, id: &str) -> Result<Result<Reserved, Refusal>, Unavailable> {
        let mut uses = self.uses.lock().unwrap();
        let left = uses.get_mut(id).ok_or(Unavailable)?;
        if *left == 0 {
            return Ok(Err(Refusal::UsedUp));
        }
        *left -= 1;
        self.log.lock().unwrap().push(format!("reserve {id}"));
        Ok(Ok(Reserved {
            reservation: 1,
            target: format!("target-of-{id}@example.org"),
            lease_ends: Instant::now() + Duration::from_secs(60),
        }))
    }

    async fn commit(&self, id: &str, _reserved: &Reserved) {
        self.log.lock().unwrap().push(format!("commit {id}"));
    }

    fn commit_later(&self, id: &str, _reserved: &Reserved) {
        self.log.lock().unwrap().push(format!("commit later {id}"));
    }

    async fn release(&self, id: &str, _reserved: &Reserved) {
        *self.uses.lock().unwrap().get_mut(id).unwrap() += 1;
        self.log.lock().unwrap().push(format!("release {id}"));
    }

    fn now_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

/// Records what it is given and answers with `answer`.
struct FakeUpstream {
    answer: Delivery,
    sent: Mutex<Vec<(Envelope, Vec<u8>)>>,
    /// Takes one destination domain per message (as MX delivery does).
    one_domain: bool,
}

impl Upstream for FakeUpstream {
    async fn deliver(
        &self,
        envelope: &Envelope,
        message: Arc<Vec<u8>>,
        _deadline: Option<std::time::Instant>,
    ) -> Delivery {
        self.sent
            .lock()
            .unwrap()
            .push((envelope.clone(), message.to_vec()));
        self.answer.clone()
    }

    fn one_domain_per_message(&self) -> bool {
        self.one_domain
    }
}

struct Setup {
    shared: Arc<Shared<FakeAliases, FakeUpstream>>,
    /// The self-signed certificate the session serves (for the client's roots).
    cert: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

fn setup(tls: bool, answer: Delivery, tweak: impl FnOnce(&mut SmtpConfig)) -> (Setup, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SmtpConfig {
        hostname: HOST.to_string(),
        postmaster: "hostmaster@example.net".to_string(),
        tls_self_signed: tls,
        ..SmtpConfig::default()
    };
    tweak(&mut config);
    let tls = Tls::from_config(&config, dir.path()).unwrap();
    let id = crate::alias::new_id();
    let aliases = FakeAliases::default();
    aliases.uses.lock().unwrap().insert(id.clone(), 5);
    let shared = Arc::new(Shared {
        failures: FailedRcpts::new(100, Duration::from_secs(60), Default::default()),
        bounces: crate::smtp::bounces::BounceCounts::new(2, crate::smtp::bounces::WINDOW),
        domains: vec!["tempalias.test".to_string()],
        metrics: Arc::new(Metrics::new()),
        tls: tls.clone(),
        forwarding: Arc::new(crate::mail::Forwarding::srs_only(
            crate::mail::Srs::new(vec![b"session test key".to_vec()], 21),
            HOST,
        )),
        aliases,
        upstream: FakeUpstream {
            answer,
            sent: Mutex::new(Vec::new()),
            one_domain: false,
        },
        config,
    });
    let cert = tls.map(|_| dir.path().join("tls").join("selfsigned-cert.pem"));
    (
        Setup {
            shared,
            cert,
            _dir: dir,
        },
        id,
    )
}

/// A client over an in-memory connection to a running session.
struct Client<T> {
    io: BufReader<T>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Client<T> {
    async fn send(&mut self, data: &str) {
        self.io.get_mut().write_all(data.as_bytes()).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// One whole reply (all its lines).
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "connection closed; got so far: {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

fn start(setup: &Setup) -> (Client<tokio::io::DuplexStream>, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let mut session = Session::new(
        setup.shared.clone(),
        server,
        "192.0.2.7:40000".parse().unwrap(),
        CancellationToken::new(),
    );
    let task = tokio::spawn(async move { session.run().await });
    (
        Client {
            io: BufReader::new(client),
        },
        task,
    )
}

async fn tls_client(
    setup: &Setup,
    plain: tokio::io::DuplexStream,
) -> tokio_rustls::client::TlsStream<tokio::io::DuplexStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_file_iter(setup.cert.as_ref().unwrap()).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(HOST.try_into().unwrap(), plain)
        .await
        .expect("TLS handshake")
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext_and_starts_over() {
    let (setup, id) = setup(true, Delivery::Accepted, |_| {});
    let (mut c, task) = start(&setup);
    assert!(c.reply().await.starts_with("220 "));
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    // The injection: a command behind STARTTLS in the same write.
    c.send("STARTTLS\r\nRSET\r\n").await;
    assert!(c.reply().await.starts_with("220 2.0.0"));
    let tls = tls_client(&setup, c.io.into_inner()).await;
    let mut c = Client {
        io: BufReader::new(tls),
    };
    // Had RSET been kept, its `250 2.0.0 Flushed` would come first.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK\r\n");
    // The session starts over: a new EHLO is required.
    assert!(c
        .cmd("MAIL FROM:<a@example.org>")
        .await
        .starts_with("503 5.5.1"));
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("STARTTLS"), "offered twice: {ehlo}");
    assert!(c.cmd("STARTTLS").await.starts_with("503 "));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250 "));
    assert!(c
        .cmd(&format!("RCPT TO:<{id}@tempalias.test>"))
        .await
        .starts_with("250 "));
    assert!(c.cmd("DATA").await.starts_with("354 "));
    let done = c.cmd("Subject: hi\r\n\r\nHello.\r\n.").await;
    assert!(done.starts_with("250 2.0.0"), "{done}");
    assert!(c.cmd("QUIT").await.starts_with("221 "));
    task.await.unwrap();
    let sent = setup.shared.upstream.sent.lock().unwrap();
    let text = String::from_utf8_lossy(&sent[0].1).to_string();
    assert!(text.contains("with ESMTPS id"), "{text}");
    assert!(text.contains("(using TLSv1.3 with cipher TLS13_"), "{text}");
    assert_eq!(
        setup.shared.aliases.log(),
        [format!("reserve {id}"), format!("commit {id}")]
    );
}

#[tokio::test]
async fn starttls_resets_a_transaction_and_releases_its_uses() {
    let (setup, id) = setup(true, Delivery::Accepted, |_| {});
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    assert!(c
        .cmd(&format!("RCPT TO:<{id}@tempalias.test>"))
        .await
        .starts_with("250 "));
    assert!(c.cmd("STARTTLS").await.starts_with("220 "));
    let tls = tls_client(&setup, c.io.into_inner()).await;
    let mut c = Client {
        io: BufReader::new(tls),
    };
    // Once the session answers over TLS, the transaction is gone.
    assert!(c.cmd("NOOP").await.starts_with("250 "));
    assert_eq!(
        setup.shared.aliases.log(),
        [format!("reserve {id}"), format!("release {id}")]
    );
}

#[tokio::test]
async fn without_a_certificate_starttls_is_neither_offered_nor_accepted() {
    let (setup, _) = setup(false, Delivery::Accepted, |_| {});
    let (mut c, _task) = start(&setup);
    c.reply().await;
    assert!(!c.cmd("EHLO client.example").await.contains("STARTTLS"));
    assert!(c.cmd("STARTTLS").await.starts_with("502 5.5.1"));
    // The session goes on in plaintext.
    assert!(c.cmd("NOOP").await.starts_with("250 "));
}

#[tokio::test]
async fn require_tls_refuses_mail_in_plaintext() {
    let (setup, _) = setup(true, Delivery::Accepted, |c| c.require_tls = true);
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO client.example").await;
    assert!(c
        .cmd("MAIL FROM:<a@example.org>")
        .await
        .starts_with("530 5.7.0"));
}

/// The reply to a message the upstream refused with `refusal`; the use
/// taken for it must have gone back, as for any permanent refusal.
async fn reply_to_refused(refusal: Delivery) -> String {
    let (setup, id) = setup(false, refusal, |_| {});
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    c.cmd(&format!("RCPT TO:<{id}@tempalias.test>")).await;
    c.cmd("DATA").await;
    let reply = c.cmd("Subject: hi\r\n\r\nHello.\r\n.").await;
    assert_eq!(
        setup.shared.aliases.log(),
        [format!("reserve {id}"), format!("release {id}")]
    );
    reply
}

#[tokio::test]
async fn an_upstream_refusal_shows_its_codes_but_not_its_text() {
    let refusal = Delivery::PermFail {
        code: 550,
        enhanced: "5.1.1".into(),
        text: "<secret-target@example.org>: Recipient address rejected".into(),
    };
    assert_eq!(
        reply_to_refused(refusal).await,
        "550 5.1.1 Upstream refused the message\r\n"
    );
}

#[tokio::test]
async fn a_message_too_big_for_the_upstream_is_552_5_3_4_with_a_fixed_text() {
    // What the relay answers when every upstream's SIZE is below the
    // message, or an upstream's own 552 5.3.4 (its text names the host or
    // the target, and is for the log only).
    let refusal = Delivery::PermFail {
        code: 552,
        enhanced: "5.3.4".into(),
        text: "<secret-target@example.org>: smtp://relay.internal:25 takes up to 10 bytes".into(),
    };
    assert_eq!(
        reply_to_refused(refusal).await,
        "552 5.3.4 Message too big for the upstream\r\n"
    );
}

#[tokio::test]
async fn postmaster_is_accepted_and_forwarded_without_counting_a_use() {
    let (setup, id) = setup(false, Delivery::Accepted, |_| {});
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<>").await;
    let reply = c.cmd("RCPT TO:<postmaster>").await;
    assert!(reply.starts_with("250 2.1.5"), "{reply}");
    assert!(c
        .cmd("RCPT TO:<PostMaster@tempalias.test>")
        .await
        .starts_with("250 2.1.5"));
    assert!(c
        .cmd("RCPT TO:<postmaster@elsewhere.example>")
        .await
        .starts_with("550 5.7.1"));
    c.cmd(&format!("RCPT TO:<{id}@tempalias.test>")).await;
    c.cmd("DATA").await;
    assert!(c
        .cmd("Subject: abuse report\r\n\r\nHello.\r\n.")
        .await
        .starts_with("250 "));
    let sent = setup.shared.upstream.sent.lock().unwrap();
    assert_eq!(
        sent[0].0.rcpt_to,
        [
            "hostmaster@example.net".to_string(),
            format!("target-of-{id}@example.org")
        ]
    );
    // Only the alias holds a use.
    assert_eq!(
        setup.shared.aliases.log(),
        [format!("reserve {id}"), format!("commit {id}")]
    );
}

#[tokio::test]
async fn implicit_tls_greets_only_after_the_handshake() {
    let (setup, _) = setup(true, Delivery::Accepted, |_| {});
    let (client, server) = tokio::io::duplex(64 * 1024);
    let mut session = Session::new(
        setup.shared.clone(),
        server,
        "192.0.2.7:40000".parse().unwrap(),
        CancellationToken::new(),
    )
    .implicit_tls();
    let _task = tokio::spawn(async move { session.run().await });
    let tls = tls_client(&setup, client).await;
    let mut c = Client {
        io: BufReader::new(tls),
    };
    assert!(c.reply().await.starts_with("220 "));
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
}

#[tokio::test]
async fn an_upstream_of_one_domain_per_message_gets_no_second_domain() {
    let (mut setup, id) = setup(false, Delivery::Accepted, |_| {});
    Arc::get_mut(&mut setup.shared).unwrap().upstream.one_domain = true;
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO client.example").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    // The postmaster (example.net) first: the alias (example.org) must wait
    // for a transaction of its own, and its reserved use is given back.
    assert!(c.cmd("RCPT TO:<postmaster>").await.starts_with("250 "));
    let reply = c.cmd(&format!("RCPT TO:<{id}@tempalias.test>")).await;
    assert_eq!(
        reply,
        "452 4.5.3 Too many recipients for this message, send this one separately\r\n"
    );
    assert_eq!(
        setup.shared.aliases.log(),
        [format!("reserve {id}"), format!("release {id}")]
    );
    c.cmd("DATA").await;
    assert!(c
        .cmd("Subject: hi\r\n\r\nHello.\r\n.")
        .await
        .starts_with("250 "));
    // The next transaction takes the alias.
    c.cmd("MAIL FROM:<a@example.org>").await;
    assert!(c
        .cmd(&format!("RCPT TO:<{id}+x@tempalias.test>"))
        .await
        .starts_with("250 "));
    c.cmd("DATA").await;
    assert!(c
        .cmd("Subject: hi\r\n\r\nHello.\r\n.")
        .await
        .starts_with("250 "));
    let sent = setup.shared.upstream.sent.lock().unwrap();
    assert_eq!(sent[0].0.rcpt_to, ["hostmaster@example.net".to_string()]);
    assert_eq!(sent[1].0.rcpt_to, [format!("target-of-{id}@example.org")]);
}

#[tokio::test]
async fn an_srs_address_takes_only_its_share_of_bounces() {
    let (setup, id) = setup(false, Delivery::Accepted, |_| {});
    // What this node wrote for a message from alice, at the fakes' time.
    let srs = crate::mail::Srs::new(vec![b"session test key".to_vec()], 21).forward(
        "alice@sender.example",
        "tempalias.test",
        1_700_000_000,
    );
    let (mut c, _task) = start(&setup);
    c.reply().await;
    c.cmd("EHLO mta.example").await;
    // Not from the null sender: an SRS address is a return path only.
    c.cmd("MAIL FROM:<someone@sender.example>").await;
    let reply = c.cmd(&format!("RCPT TO:<{srs}>")).await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    c.cmd("RSET").await;
    // A bounce travels alone: each is answered with a report of its own.
    c.cmd("MAIL FROM:<>").await;
    assert!(c
        .cmd(&format!("RCPT TO:<{id}@tempalias.test>"))
        .await
        .starts_with("250 "));
    let reply = c.cmd(&format!("RCPT TO:<{srs}>")).await;
    assert!(reply.starts_with("452 4.5.3"), "{reply}");
    c.cmd("RSET").await;
    for _ in 0..2 {
        c.cmd("MAIL FROM:<>").await;
        let reply = c.cmd(&format!("RCPT TO:<{srs}>")).await;
        assert!(reply.starts_with("250 2.1.5"), "{reply}");
        let reply = c.cmd(&format!("RCPT TO:<{id}@tempalias.test>")).await;
        assert!(reply.starts_with("452 4.5.3"), "{reply}");
        c.cmd("DATA").await;
        let bounce = "Subject: Undelivered\r\nContent-Type: multipart/report; \
             report-type=delivery-status; boundary=b\r\n\r\n--b\r\n\
             Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n\
             Final-Recipient: rfc822; target@example.org\r\nAction: failed\r\n\
             Status: 5.1.1\r\n\r\n--b--\r\n.";
        assert!(c.cmd(bounce).await.starts_with("250 "));
    }
    // The cap of this setup is 2 per address; the case does not matter.
    c.cmd("MAIL FROM:<>").await;
    let reply = c.cmd(&format!("RCPT TO:<{}>", srs.to_uppercase())).await;
    assert!(reply.starts_with("550 5.7.1 Too many bounces"), "{reply}");
    let sent = setup.shared.upstream.sent.lock().unwrap();
    assert_eq!(sent.len(), 2);
    for (envelope, message) in sent.iter() {
        assert_eq!(envelope.rcpt_to, ["alice@sender.example".to_string()]);
        assert_eq!(envelope.mail_from, "");
        // Our report, not the bounce: it does not name the target.
        let text = String::from_utf8_lossy(message);
        assert!(text.contains("MAILER-DAEMON@tempalias.test"), "{text}");
        assert!(text.contains("Status: 5.1.1\r\n"), "{text}");
        assert!(!text.contains("target@example.org"), "{text}");
    }
}

#[tokio::test]
async fn reply_before_commit_hands_the_commits_to_the_store_and_answers_250() {
    for (on, expected) in [(false, "commit"), (true, "commit later")] {
        let (setup, id) = setup(false, Delivery::Accepted, |c| c.reply_before_commit = on);
        let (mut c, _task) = start(&setup);
        c.reply().await;
        c.cmd("EHLO client.example").await;
        c.cmd("MAIL FROM:<a@example.org>").await;
        // One recipient holding a use, one not (postmaster).
        c.cmd(&format!("RCPT TO:<{id}@tempalias.test>")).await;
        c.cmd("RCPT TO:<postmaster>").await;
        c.cmd("DATA").await;
        let done = c.cmd("Subject: hi\r\n\r\nHello.\r\n.").await;
        assert!(done.starts_with("250 2.0.0"), "{done}");
        assert_eq!(
            setup.shared.aliases.log(),
            [format!("reserve {id}"), format!("{expected} {id}")],
            "reply_before_commit = {on}"
        );
    }
}
