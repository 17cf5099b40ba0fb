//! Delivery through one or more smarthosts: failover in order, a circuit
//! breaker per smarthost, and capped exponential backoff with full jitter
//! between rounds, all inside one time budget per message.
//!
//! A round tries the smarthosts in their configured order, skipping those
//! whose breaker is open (at no cost). A temporary failure moves on to the
//! next one at once; only when a whole round failed is there a backoff pause
//! before the next round. A permanent refusal stops everything and is passed
//! back, because another smarthost would refuse the same message for the same
//! reason (and retrying elsewhere risks a duplicate when the first one did
//! take it). The budget ends the loop early enough that the sender hears
//! `451` before it gives up on us.
//!
//! A smarthost that cannot take this message (it lacks an extension the
//! message needs, 8BITMIME for 8-bit content or SMTPUTF8 for non-ASCII
//! addresses, or its `SIZE` is below the message) is different: nothing was
//! sent, and the next smarthost may well take it. So it is passed over for
//! this message (and for the rest of its rounds) without touching its
//! breaker: it answered, it is not down. Only when every smarthost is passed
//! over is the message refused (`554 5.6.3`, `553 5.6.7`, `552 5.3.4`; see
//! `PassedOver`); while some other smarthost merely failed, the sender hears
//! `451`, as that may clear.

use std::sync::Arc;
use std::time::Duration;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::extension::ClientId;
use tokio::time::Instant;

use super::breaker::{full_jitter, Breaker};
use super::client::{self, AttemptError, ConnKey, Target, TlsPolicy};
use super::pool::{Pool, PoolSettings};
use super::{counted_attempt, to_lettre, Delivery, Envelope, PassedOver, RelayError};
use crate::config::{RelayConfig, SmarthostUrl, TlsMode};
use crate::metrics::{Metrics, UpstreamLabels};

/// An attempt is not started with less than this left of the budget: it
/// could not finish, and the sender is better served by an early 451.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

struct Upstream {
    url: SmarthostUrl,
    /// `scheme://host:port`: log name and metric label (never the user).
    label: String,
    tls: TlsPolicy,
    credentials: Option<Credentials>,
    breaker: Breaker,
    /// Its idle connections: one pool per entry, so that two entries for
    /// the same host with other accounts never share a connection.
    pool: Arc<Pool>,
}

/// Sends through the configured smarthosts.
///
/// Connections are kept open between messages when `relay.reuse_connections`
/// (or the entry's own `reuse_connections`) is on; each smarthost's pool
/// has its entry's bounds (docs/architecture.md explains why reuse is
/// cancel-safe).
pub struct SmarthostRelay {
    upstreams: Vec<Upstream>,
    helo: ClientId,
    /// Bound on one attempt (connect to final reply).
    attempt_timeout: Duration,
    /// Bound on all attempts of one message together.
    budget: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    metrics: Arc<Metrics>,
}

impl SmarthostRelay {
    /// # Errors
    /// [`RelayError::Smarthost`] when TLS cannot be set up or the password
    /// cannot be read.
    pub fn new(
        config: &RelayConfig,
        helo_name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RelayError> {
        let extra_ca = match &config.ca_file {
            Some(path) => std::fs::read(path).map_err(|e| {
                RelayError::Smarthost(format!("relay.ca_file {}: {e}", path.display()))
            })?,
            None => Vec::new(),
        };
        let helo = ClientId::Domain(helo_name.to_string());
        let mut upstreams = Vec::new();
        for host in &config.smarthosts {
            let url = &host.url;
            // Entries for one scheme, host and port (other users) would
            // share a label and overwrite each other's gauges: the second
            // is `...#2`, the third `...#3`.
            let label = {
                let base = url.label();
                match upstreams
                    .iter()
                    .filter(|u: &&Upstream| u.url.label() == base)
                    .count()
                {
                    0 => base,
                    n => format!("{base}#{}", n + 1),
                }
            };
            let err = |e: String| RelayError::Smarthost(format!("{label}: {e}"));
            let tls = match url.tls {
                TlsMode::Opportunistic => {
                    TlsPolicy::Opportunistic(client::unverified_tls(&url.host).map_err(err)?)
                }
                TlsMode::Required => {
                    TlsPolicy::Required(client::verified_tls(&url.host, &extra_ca).map_err(err)?)
                }
                TlsMode::Implicit => {
                    TlsPolicy::Implicit(client::verified_tls(&url.host, &extra_ca).map_err(err)?)
                }
            };
            // Each smarthost's own password file, else the default: two
            // providers do not share a password.
            let credentials = match &url.user {
                Some(user) => match config.password_for(host) {
                    Ok(Some(pw)) => Some(Credentials::new(user.clone(), pw.expose().to_string())),
                    Ok(None) => return Err(err("names a user but no password is set".into())),
                    Err(e) => return Err(RelayError::Smarthost(e.to_string())),
                },
                None => None,
            };
            metrics
                .relay_breaker_state
                .get_or_create(&UpstreamLabels {
                    upstream: label.clone(),
                })
                .set(0);
            let key = ConnKey::new(&label, &tls, credentials.as_ref(), &helo);
            // The entry's own bounds, else the relay-wide ones.
            let reuse = config.reuse_for(host);
            let settings = PoolSettings {
                enabled: reuse.connections,
                max_idle: reuse.max_idle as usize,
                idle: Duration::from_secs(reuse.idle_secs),
                max_messages: reuse.max_messages,
                max_age: Duration::from_secs(reuse.max_age_secs),
            };
            let pool = Pool::new(key, settings, &label, metrics.clone());
            upstreams.push(Upstream {
                url: url.clone(),
                label,
                tls,
                credentials,
                pool,
                breaker: Breaker::new(
                    config.breaker_failures,
                    Duration::from_secs(config.breaker_cooldown_secs),
                ),
            });
        }
        Ok(Self {
            upstreams,
            helo,
            attempt_timeout: Duration::from_secs(config.timeout_secs),
            budget: Duration::from_secs(config.delivery_timeout_secs),
            max_attempts: config.max_attempts.max(1),
            backoff_base: Duration::from_millis(config.backoff_base_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            metrics,
        })
    }

    /// See [`super::Relay::close_idle`].
    pub async fn close_idle(&self, limit: Duration) {
        let mut closing = tokio::task::JoinSet::new();
        for upstream in &self.upstreams {
            let pool = upstream.pool.clone();
            closing.spawn(async move { pool.close(limit).await });
        }
        while closing.join_next().await.is_some() {}
    }

    pub fn describe(&self) -> String {
        self.upstreams
            .iter()
            .map(|u| u.url.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Delivers one message, giving up at `deadline` or after the relay's own
    /// budget, whichever comes first.
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        message: &[u8],
        deadline: Instant,
    ) -> Delivery {
        let deadline = deadline.min(Instant::now() + self.budget);
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
        let mut last = String::from("every smarthost's circuit breaker is open");
        // The smarthosts that cannot take this message: not tried again for it.
        let mut passed_over = PassedOver::new(self.upstreams.len());
        let mut attempts = 0u32;
        let mut round = 0u32;
        'rounds: loop {
            if round > 0 {
                // Pause between rounds, unless nothing could be tried anyway.
                let now = Instant::now();
                if !self
                    .upstreams
                    .iter()
                    .enumerate()
                    .any(|(i, u)| !passed_over.contains(i) && u.breaker.would_allow(now))
                {
                    break;
                }
                let pause = full_jitter(round - 1, self.backoff_base, self.backoff_max);
                if now + pause + MIN_ATTEMPT > deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            let mut tried = false;
            for (i, upstream) in self.upstreams.iter().enumerate() {
                if passed_over.contains(i) {
                    continue;
                }
                if attempts >= self.max_attempts {
                    break 'rounds;
                }
                let Some(permit) = upstream.breaker.try_acquire(Instant::now()) else {
                    self.metrics
                        .relay_skipped
                        .get_or_create(&UpstreamLabels {
                            upstream: upstream.label.clone(),
                        })
                        .inc();
                    continue;
                };
                self.show_state(upstream);
                let now = Instant::now();
                if now + MIN_ATTEMPT > deadline {
                    break 'rounds;
                }
                tried = true;
                attempts += 1;
                let limit = self.attempt_timeout.min(deadline - now);
                let outcome = counted_attempt(
                    &self.metrics,
                    &upstream.label,
                    &upstream.label,
                    limit,
                    self.attempt(upstream, &lettre_envelope, message),
                )
                .await;
                let failed = outcome.as_ref().err().is_some_and(AttemptError::is_failure);
                if matches!(outcome, Err(AttemptError::Unsupported { .. })) {
                    // Neither a sign of life nor of death: the host answered
                    // EHLO but AUTH was never tried, so recording a success
                    // would reset the failures of a host with a wrong password.
                    drop(permit);
                } else if upstream.breaker.record(permit, failed, Instant::now()) {
                    tracing::warn!(smarthost = %upstream.label, "circuit breaker opened");
                    self.metrics
                        .relay_breaker_opened
                        .get_or_create(&UpstreamLabels {
                            upstream: upstream.label.clone(),
                        })
                        .inc();
                }
                self.show_state(upstream);
                match outcome {
                    Ok(()) => return Delivery::Accepted,
                    Err(AttemptError::Reply {
                        code,
                        enhanced,
                        text,
                    }) if code >= 500 => {
                        tracing::warn!(smarthost = %upstream.label, code, %enhanced, %text, "upstream refused the message");
                        return Delivery::PermFail {
                            code,
                            enhanced,
                            text,
                        };
                    }
                    Err(AttemptError::Unsupported { reason, text }) => {
                        tracing::warn!(smarthost = %upstream.label, ?reason, %text, "smarthost cannot take this message, trying the next");
                        // Not one of max_attempts: those are for retrying
                        // failures, and this host is asked once per message
                        // at most, so the loop stays bounded.
                        attempts -= 1;
                        last = text.clone();
                        passed_over.add(i, reason, text);
                        if passed_over.all() {
                            break 'rounds;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(smarthost = %upstream.label, error = %e, "upstream did not accept");
                        last = e.to_string();
                    }
                }
            }
            if !tried {
                break;
            }
            round += 1;
        }
        passed_over.outcome(last)
    }

    async fn attempt(
        &self,
        upstream: &Upstream,
        envelope: &lettre::address::Envelope,
        message: &[u8],
    ) -> Result<(), AttemptError> {
        let addrs: Vec<_> =
            tokio::net::lookup_host((upstream.url.host.as_str(), upstream.url.port))
                .await
                .map_err(|e| AttemptError::Failed(format!("{}: resolve: {e}", upstream.label)))?
                .collect();
        let target = Target {
            name: &upstream.label,
            addrs: &addrs,
            tls: &upstream.tls,
            credentials: upstream.credentials.as_ref(),
            helo: &self.helo,
            connect_timeout: self.attempt_timeout,
            pool: Some(&upstream.pool),
        };
        client::send(&target, envelope, message).await
    }

    fn show_state(&self, upstream: &Upstream) {
        self.metrics
            .relay_breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: upstream.label.clone(),
            })
            .set(upstream.breaker.state() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Smarthost;

    fn relay(urls: &[String], timeout_secs: u64) -> (SmarthostRelay, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: urls
                .iter()
                .map(|u| Smarthost::new(SmarthostUrl::parse(u).unwrap()))
                .collect(),
            timeout_secs,
            breaker_failures: 2,
            backoff_base_ms: 10,
            backoff_max_ms: 20,
            ..Default::default()
        };
        (
            SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap(),
            metrics,
        )
    }

    fn env() -> Envelope {
        Envelope {
            mail_from: "a@b.example".into(),
            rcpt_to: vec!["c@d.example".into()],
        }
    }

    fn dead_port() -> u16 {
        // Bind and drop a listener to get a port nothing listens on.
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn stalled_smarthost_is_cut_off_by_the_timeout() {
        // Accepts the connection and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let (relay, _) = relay(&[format!("smtp://127.0.0.1:{port}")], 1);
        let started = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_secs(3);
        assert!(matches!(
            relay.deliver(&env(), b"x\r\n", deadline).await,
            Delivery::TempFail(_)
        ));
        // Within the caller's deadline, whatever the retries.
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }

    #[test]
    fn entries_for_one_host_and_port_get_labels_of_their_own() {
        let url = format!("smtp://127.0.0.1:{}", dead_port());
        let (_relay, metrics) = relay(&[url.clone(), url.clone(), url.clone()], 5);
        let text = metrics.encode();
        for label in [url.clone(), format!("{url}#2"), format!("{url}#3")] {
            assert!(
                text.contains(&format!(
                    "tempalias_relay_breaker_state{{upstream=\"{label}\"}} 0"
                )),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn breaker_skips_a_dead_smarthost_after_consecutive_failures() {
        let port = dead_port();
        let (relay, metrics) = relay(&[format!("smtp://127.0.0.1:{port}")], 5);
        let deadline = || Instant::now() + Duration::from_secs(30);
        // max_attempts (4) attempts, the breaker opens at the second.
        assert!(matches!(
            relay.deliver(&env(), b"x\r\n", deadline()).await,
            Delivery::TempFail(_)
        ));
        let text = metrics.encode();
        let label = format!("smtp://127.0.0.1:{port}");
        assert!(
            text.contains(&format!(
                "tempalias_relay_breaker_state{{upstream=\"{label}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "tempalias_relay_attempts_total{{upstream=\"{label}\",result=\"failed\"}} 2"
            )),
            "{text}"
        );
        // The next message does not even try (the first one stopped without
        // a skip: no round is started when every breaker is open).
        match relay.deliver(&env(), b"x\r\n", deadline()).await {
            Delivery::TempFail(reason) => assert!(reason.contains("circuit breaker"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(metrics.encode().contains(&format!(
            "tempalias_relay_skipped_total{{upstream=\"{label}\"}} 1"
        )));
    }

    #[tokio::test]
    async fn a_refusing_greeting_is_a_failure_not_a_permanent_refusal() {
        // "554 no SMTP service here" says nothing about the message: the
        // sender must hear 4xx, and the breaker counts it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock.write_all(b"554 5.3.2 no SMTP service here\r\n").await;
            }
        });
        let (relay, metrics) = relay(&[format!("smtp://127.0.0.1:{port}")], 5);
        let outcome = relay
            .deliver(&env(), b"x\r\n", Instant::now() + Duration::from_secs(10))
            .await;
        assert!(matches!(outcome, Delivery::TempFail(_)), "{outcome:?}");
        assert!(metrics.encode().contains("result=\"failed\"} 2"));
        server.abort();
    }

    #[tokio::test]
    async fn past_deadline_means_no_attempt() {
        let (relay, metrics) = relay(&[format!("smtp://127.0.0.1:{}", dead_port())], 5);
        assert!(matches!(
            relay.deliver(&env(), b"x\r\n", Instant::now()).await,
            Delivery::TempFail(_)
        ));
        assert!(!metrics.encode().contains("relay_attempts_total{"));
    }

    /// A server that greets and answers EHLO without 8BITMIME, and refuses
    /// every other command (so a MAIL sent in spite of it shows as a 500).
    async fn seven_bit_server() -> (u16, tokio::task::JoinHandle<()>) {
        seven_bit_server_that(false).await
    }

    /// [`seven_bit_server`]; with `drop_at_mail`, it hangs up at `MAIL`
    /// instead of refusing it (a failed attempt, as a wrong password is).
    async fn seven_bit_server_that(drop_at_mail: bool) -> (u16, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 seven.example ESMTP\r\n").await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        if drop_at_mail && verb == "MAIL" {
                            break;
                        }
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" => b"250-seven.example\r\n250 PIPELINING\r\n",
                            "QUIT" => b"221 bye\r\n",
                            _ => b"500 5.5.1 not expected\r\n",
                        };
                        if w.write_all(reply).await.is_err() || verb == "QUIT" {
                            break;
                        }
                    }
                });
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn no_smarthost_with_8bitmime_refuses_with_5_6_3_and_leaves_the_breakers_alone() {
        let (a, task_a) = seven_bit_server().await;
        let (b, task_b) = seven_bit_server().await;
        let urls = [
            format!("smtp://127.0.0.1:{a}"),
            format!("smtp://127.0.0.1:{b}"),
        ];
        let (relay, metrics) = relay(&urls, 5);
        let eight_bit = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes();
        // More messages than breaker_failures (2): a breaker that counted
        // these would open.
        for _ in 0..3 {
            let outcome = relay
                .deliver(&env(), eight_bit, Instant::now() + Duration::from_secs(10))
                .await;
            match outcome {
                Delivery::PermFail { code, enhanced, .. } => {
                    assert_eq!((code, enhanced.as_str()), (554, "5.6.3"))
                }
                other => panic!("{other:?}"),
            }
        }
        let text = metrics.encode();
        for url in &urls {
            // One attempt per message and smarthost, no second round.
            assert!(
                text.contains(&format!(
                    "tempalias_relay_attempts_total{{upstream=\"{url}\",result=\"unsupported\"}} 3"
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "tempalias_relay_breaker_state{{upstream=\"{url}\"}} 0"
                )),
                "{text}"
            );
        }
        assert!(!text.contains("result=\"failed\""), "{text}");
        task_a.abort();
        task_b.abort();
    }

    #[tokio::test]
    async fn skipping_a_smarthost_for_8bit_mail_does_not_reset_its_failures() {
        // Hangs up at MAIL: ASCII mail fails there (the breaker counts it),
        // 8-bit mail is skipped before MAIL (the breaker must not hear of it).
        let (port, task) = seven_bit_server_that(true).await;
        let url = format!("smtp://127.0.0.1:{port}");
        let metrics = Arc::new(Metrics::new());
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: vec![Smarthost::new(SmarthostUrl::parse(&url).unwrap())],
            timeout_secs: 5,
            breaker_failures: 2,
            max_attempts: 1,
            backoff_base_ms: 10,
            backoff_max_ms: 20,
            ..Default::default()
        };
        let relay = SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap();
        let deadline = || Instant::now() + Duration::from_secs(10);
        let eight_bit = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes();
        let state = || {
            let text = metrics.encode();
            let needle = format!("tempalias_relay_breaker_state{{upstream=\"{url}\"}} ");
            let at = text.find(&needle).expect("breaker state exported") + needle.len();
            text[at..at + 1].to_string()
        };
        // Failure one of two.
        let first = relay.deliver(&env(), b"x\r\n", deadline()).await;
        assert!(matches!(first, Delivery::TempFail(_)), "{first:?}");
        assert_eq!(state(), "0");
        // Skipped for 8-bit content: 554 5.6.3, and the count stays at one.
        let skipped = relay.deliver(&env(), eight_bit, deadline()).await;
        assert!(
            matches!(skipped, Delivery::PermFail { code: 554, .. }),
            "{skipped:?}"
        );
        // Failure two of two: the breaker opens.
        let second = relay.deliver(&env(), b"x\r\n", deadline()).await;
        assert!(matches!(second, Delivery::TempFail(_)), "{second:?}");
        assert_eq!(state(), "1", "{}", metrics.encode());
        task.abort();
    }

    #[tokio::test]
    async fn a_smarthost_lacking_8bitmime_is_not_one_of_max_attempts() {
        let (a, task_a) = seven_bit_server().await;
        let (b, task_b) = seven_bit_server().await;
        let metrics = Arc::new(Metrics::new());
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: [a, b]
                .iter()
                .map(|p| {
                    Smarthost::new(SmarthostUrl::parse(&format!("smtp://127.0.0.1:{p}")).unwrap())
                })
                .collect(),
            max_attempts: 1,
            ..Default::default()
        };
        let relay = SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap();
        // With one attempt allowed, the second smarthost is still asked:
        // only then is it known that none can take the message.
        let outcome = relay
            .deliver(
                &env(),
                "x: \u{fc}\r\n\r\n".as_bytes(),
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        assert!(
            matches!(&outcome, Delivery::PermFail { code: 554, enhanced, .. } if enhanced == "5.6.3"),
            "{outcome:?}"
        );
        assert!(metrics.encode().contains(&format!(
            "upstream=\"smtp://127.0.0.1:{b}\",result=\"unsupported\"}} 1"
        )));
        task_a.abort();
        task_b.abort();
    }

    #[tokio::test]
    async fn lacking_8bitmime_here_while_another_smarthost_is_down_is_temporary() {
        let (a, task) = seven_bit_server().await;
        let (relay, metrics) = relay(
            &[
                format!("smtp://127.0.0.1:{a}"),
                format!("smtp://127.0.0.1:{}", dead_port()),
            ],
            5,
        );
        let outcome = relay
            .deliver(
                &env(),
                "x: \u{fc}\r\n\r\n".as_bytes(),
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        // The dead one may take it once it is back: 4xx, not 5xx.
        assert!(matches!(outcome, Delivery::TempFail(_)), "{outcome:?}");
        // The 7-bit one was asked once, not in every round.
        assert!(metrics.encode().contains(&format!(
            "upstream=\"smtp://127.0.0.1:{a}\",result=\"unsupported\"}} 1"
        )));
        // ASCII mail is not affected: the same host is asked (and its 500
        // to MAIL shows it was).
        let outcome = relay
            .deliver(
                &env(),
                b"x: y\r\n\r\n",
                Instant::now() + Duration::from_secs(10),
            )
            .await;
        assert!(
            matches!(outcome, Delivery::PermFail { code: 500, .. }),
            "{outcome:?}"
        );
        task.abort();
    }

    /// A fake upstream for the SIZE tests: greets, answers EHLO with
    /// `ehlo` (keyword lines after the name), takes a whole transaction,
    /// and keeps every command line it got. `refuse_at` names the verb
    /// (`MAIL`, `RCPT`, or `.` for the end of data) it answers with
    /// `552 5.3.4` instead of accepting.
    ///
    /// Its [`Mode`] (settable at any time) decides what a new connection
    /// gets; `accepted` counts the connections.
    struct Fake {
        port: u16,
        commands: Arc<std::sync::Mutex<Vec<String>>>,
        mode: Arc<std::sync::atomic::AtomicU8>,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
        /// One permit lets one stalled connection go on.
        release: Arc<tokio::sync::Semaphore>,
        task: tokio::task::JoinHandle<()>,
    }

    /// What a [`Fake`] does with a new connection.
    #[derive(Clone, Copy)]
    #[repr(u8)]
    enum Mode {
        Serve = 0,
        /// Closes it without a greeting: a failed attempt.
        HangUp = 1,
        /// Says nothing until [`Fake::release_one`], then serves.
        Stall = 2,
    }

    impl Fake {
        async fn start(ehlo: &'static [&'static str], refuse_at: Option<&'static str>) -> Self {
            use std::sync::atomic::Ordering::SeqCst;
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let commands = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mode = Arc::new(std::sync::atomic::AtomicU8::new(Mode::Serve as u8));
            let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let release = Arc::new(tokio::sync::Semaphore::new(0));
            let (seen, modes, count, gate) = (
                commands.clone(),
                mode.clone(),
                accepted.clone(),
                release.clone(),
            );
            let task = tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    let seen = seen.clone();
                    let mode = modes.load(SeqCst);
                    count.fetch_add(1, SeqCst);
                    if mode == Mode::HangUp as u8 {
                        continue;
                    }
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        if mode == Mode::Stall as u8 {
                            gate.acquire().await.unwrap().forget();
                        }
                        let (r, mut w) = sock.into_split();
                        let mut lines = BufReader::new(r).lines();
                        let _ = w.write_all(b"220 fake.example ESMTP\r\n").await;
                        let mut in_data = false;
                        while let Ok(Some(line)) = lines.next_line().await {
                            if in_data && line != "." {
                                continue;
                            }
                            in_data = false;
                            seen.lock().unwrap().push(line.clone());
                            let verb = line.get(..4).unwrap_or(&line).to_ascii_uppercase();
                            let reply = if Some(verb.as_str()) == refuse_at
                                || (line == "." && refuse_at == Some("."))
                            {
                                "552 5.3.4 <secret@target.example> mailbox over quota\r\n".into()
                            } else {
                                match verb.as_str() {
                                    "EHLO" => {
                                        let mut r = String::from("250-fake.example\r\n");
                                        for (i, k) in ehlo.iter().enumerate() {
                                            let sep = if i + 1 == ehlo.len() { ' ' } else { '-' };
                                            r.push_str(&format!("250{sep}{k}\r\n"));
                                        }
                                        if ehlo.is_empty() {
                                            r = "250 fake.example\r\n".into();
                                        }
                                        r
                                    }
                                    "DATA" => {
                                        in_data = true;
                                        "354 go ahead\r\n".to_string()
                                    }
                                    "QUIT" => "221 bye\r\n".to_string(),
                                    _ => "250 2.0.0 ok\r\n".to_string(),
                                }
                            };
                            if w.write_all(reply.as_bytes()).await.is_err() || verb == "QUIT" {
                                break;
                            }
                        }
                    });
                }
            });
            Self {
                port,
                commands,
                mode,
                accepted,
                release,
                task,
            }
        }

        fn url(&self) -> String {
            format!("smtp://127.0.0.1:{}", self.port)
        }

        fn set_mode(&self, mode: Mode) {
            self.mode
                .store(mode as u8, std::sync::atomic::Ordering::SeqCst);
        }

        fn accepted(&self) -> usize {
            self.accepted.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn release_one(&self) {
            self.release.add_permits(1);
        }

        /// The `MAIL` commands it got.
        fn mails(&self) -> Vec<String> {
            self.commands
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.to_ascii_uppercase().starts_with("MAIL"))
                .cloned()
                .collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Delivers a message of `n` bytes, with time to spare.
    async fn send_size(relay: &SmarthostRelay, n: usize) -> Delivery {
        let deadline = Instant::now() + Duration::from_secs(10);
        relay.deliver(&env(), &message_of(n), deadline).await
    }

    /// A message of `n` bytes.
    fn message_of(n: usize) -> Vec<u8> {
        let mut m = b"Subject: size\r\n\r\n".to_vec();
        while m.len() + 2 < n {
            m.push(b'x');
        }
        m.extend_from_slice(b"\r\n");
        assert_eq!(m.len(), n);
        m
    }

    fn metric_line(metrics: &Metrics, url: &str, result: &str) -> Option<String> {
        let text = metrics.encode();
        let needle =
            format!("tempalias_relay_attempts_total{{upstream=\"{url}\",result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
    }

    #[tokio::test]
    async fn a_message_over_a_smarthosts_size_goes_to_the_next_with_size_on_mail() {
        let small = Fake::start(&["8BITMIME", "SIZE 1000"], None).await;
        let large = Fake::start(&["8BITMIME", "SIZE 100000"], None).await;
        let (relay, metrics) = relay(&[small.url(), large.url()], 5);
        let outcome = send_size(&relay, 1001).await;
        assert_eq!(outcome, Delivery::Accepted);
        // Nothing was sent to the small one; the large one heard the size.
        assert!(small.mails().is_empty(), "{:?}", small.mails());
        assert_eq!(large.mails(), ["MAIL FROM:<a@b.example> SIZE=1001"]);
        assert_eq!(
            metric_line(&metrics, &small.url(), "too_large").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric_line(&metrics, &large.url(), "accepted").as_deref(),
            Some("1")
        );
        // At its limit exactly, the small one takes it (SIZE is a maximum).
        let outcome = send_size(&relay, 1000).await;
        assert_eq!(outcome, Delivery::Accepted);
        assert_eq!(small.mails(), ["MAIL FROM:<a@b.example> SIZE=1000"]);
    }

    #[tokio::test]
    async fn over_every_smarthosts_size_is_552_5_3_4_and_leaves_the_breakers_alone() {
        let a = Fake::start(&["SIZE 100"], None).await;
        let b = Fake::start(&["SIZE 200"], None).await;
        let (relay, metrics) = relay(&[a.url(), b.url()], 5);
        // More messages than breaker_failures (2): a breaker that counted
        // these would open.
        for _ in 0..3 {
            let outcome = send_size(&relay, 201).await;
            match outcome {
                Delivery::PermFail { code, enhanced, .. } => {
                    assert_eq!((code, enhanced.as_str()), (552, "5.3.4"))
                }
                other => panic!("{other:?}"),
            }
        }
        for fake in [&a, &b] {
            assert!(fake.mails().is_empty());
            // Asked once per message, no second round.
            assert_eq!(
                metric_line(&metrics, &fake.url(), "too_large").as_deref(),
                Some("3")
            );
            assert!(metrics.encode().contains(&format!(
                "tempalias_relay_breaker_state{{upstream=\"{}\"}} 0",
                fake.url()
            )));
        }
        assert!(!metrics.encode().contains("result=\"failed\""));
        // The breakers really were left alone: a message that fits goes through.
        let outcome = send_size(&relay, 150).await;
        assert_eq!(outcome, Delivery::Accepted);
        assert_eq!(b.mails(), ["MAIL FROM:<a@b.example> SIZE=150"]);
    }

    #[tokio::test]
    async fn too_large_here_while_another_smarthost_is_down_is_temporary() {
        let small = Fake::start(&["SIZE 10"], None).await;
        let (relay, _) = relay(
            &[small.url(), format!("smtp://127.0.0.1:{}", dead_port())],
            5,
        );
        let outcome = send_size(&relay, 100).await;
        assert!(matches!(outcome, Delivery::TempFail(_)), "{outcome:?}");
    }

    #[tokio::test]
    async fn size_without_a_limit_is_said_on_mail_and_no_size_is_not() {
        let unlimited = Fake::start(&["SIZE"], None).await;
        let zero = Fake::start(&["SIZE 0"], None).await;
        let none = Fake::start(&["PIPELINING"], None).await;
        for fake in [&unlimited, &zero, &none] {
            let (relay, _) = relay(&[fake.url()], 5);
            let outcome = send_size(&relay, 5000).await;
            assert_eq!(outcome, Delivery::Accepted);
        }
        assert_eq!(unlimited.mails(), ["MAIL FROM:<a@b.example> SIZE=5000"]);
        assert_eq!(zero.mails(), ["MAIL FROM:<a@b.example> SIZE=5000"]);
        assert_eq!(none.mails(), ["MAIL FROM:<a@b.example>"]);
    }

    #[tokio::test]
    async fn an_upstream_552_at_mail_or_data_is_final_as_any_5xx() {
        // The host's own refusal, whatever its SIZE said: passed on with its
        // codes, and the next smarthost is not asked (it might deliver a
        // message the first one took after all).
        for stage in ["MAIL", "."] {
            let refusing = Fake::start(&["SIZE 100000"], Some(stage)).await;
            let next = Fake::start(&["SIZE 100000"], None).await;
            let (relay, metrics) = relay(&[refusing.url(), next.url()], 5);
            let outcome = send_size(&relay, 100).await;
            match &outcome {
                Delivery::PermFail { code, enhanced, .. } => {
                    assert_eq!((*code, enhanced.as_str()), (552, "5.3.4"), "{stage}")
                }
                other => panic!("{stage}: {other:?}"),
            }
            assert!(next.mails().is_empty(), "{stage}");
            assert_eq!(
                metric_line(&metrics, &refusing.url(), "refused_permanent").as_deref(),
                Some("1"),
                "{stage}"
            );
        }
    }

    #[tokio::test]
    async fn an_upstream_552_at_rcpt_is_temporary() {
        // RFC 5321 4.5.3.1.10: a 552 to RCPT may mean "too many
        // recipients" and a client SHOULD treat it as temporary. Nothing
        // was sent, so the next smarthost is asked ...
        let refusing = Fake::start(&["SIZE 100000"], Some("RCPT")).await;
        let next = Fake::start(&["SIZE 100000"], None).await;
        let (both, metrics) = relay(&[refusing.url(), next.url()], 5);
        assert_eq!(send_size(&both, 100).await, Delivery::Accepted);
        assert_eq!(refusing.mails().len(), 1);
        assert_eq!(next.mails().len(), 1);
        assert_eq!(
            metric_line(&metrics, &refusing.url(), "refused_temporary").as_deref(),
            Some("1")
        );
        // ... and when no other one takes it, the sender hears a 451 (the
        // session keeps the use), never a 5xx.
        let (alone, metrics) = relay(&[refusing.url()], 5);
        match send_size(&alone, 100).await {
            Delivery::TempFail(reason) => assert!(reason.contains("552"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(metric_line(&metrics, &refusing.url(), "refused_permanent").is_none());
        // A reply, not a failure: the breaker stays closed.
        assert!(metrics.encode().contains(&format!(
            "tempalias_relay_breaker_state{{upstream=\"{}\"}} 0",
            refusing.url()
        )));
    }

    use crate::relay::reuse_tests::metric;

    /// Polls `done` every 10 ms until it holds; panics after `limit`.
    async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let give_up = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < give_up, "not within {limit:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn breaker_gauge_shows_half_open_while_the_probe_runs() {
        let fake = Fake::start(&["8BITMIME"], None).await;
        let url = fake.url();
        let metrics = Arc::new(Metrics::new());
        let config = RelayConfig {
            mode: crate::config::RelayMode::Smarthost,
            smarthosts: vec![Smarthost::new(SmarthostUrl::parse(&url).unwrap())],
            timeout_secs: 10,
            breaker_failures: 2,
            breaker_cooldown_secs: 1,
            backoff_base_ms: 10,
            backoff_max_ms: 20,
            ..Default::default()
        };
        let relay =
            Arc::new(SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap());
        let deadline = || Instant::now() + Duration::from_secs(20);
        let gauge = || metric(&metrics, "tempalias_relay_breaker_state", &url);

        // Two hang-ups open the breaker.
        fake.set_mode(Mode::HangUp);
        let outcome = relay.deliver(&env(), b"x\r\n", deadline()).await;
        assert!(matches!(outcome, Delivery::TempFail(_)), "{outcome:?}");
        assert_eq!(gauge(), "1");
        assert_eq!(fake.accepted(), 2);

        // After the cool-down, a message probes a smarthost that stalls.
        fake.set_mode(Mode::Stall);
        wait_until(Duration::from_secs(5), "cool-down over", || {
            relay.upstreams[0].breaker.would_allow(Instant::now())
        })
        .await;
        let probe = tokio::spawn({
            let relay = relay.clone();
            async move { relay.deliver(&env(), b"x\r\n", deadline()).await }
        });
        wait_until(Duration::from_secs(5), "probe connected", || {
            fake.accepted() == 3
        })
        .await;
        assert_eq!(gauge(), "2", "half-open while the probe runs");
        // Another message meanwhile skips it, and the gauge stays at 2.
        match relay.deliver(&env(), b"x\r\n", deadline()).await {
            Delivery::TempFail(reason) => assert!(reason.contains("circuit breaker"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(gauge(), "2");
        assert_eq!(
            metric(&metrics, "tempalias_relay_skipped_total", &url),
            "1",
            "the second message skipped the smarthost"
        );
        assert!(!probe.is_finished());

        // The probe gets through: closed.
        fake.release_one();
        let outcome = tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .expect("probe finished")
            .unwrap();
        assert_eq!(outcome, Delivery::Accepted);
        assert_eq!(gauge(), "0");
        assert_eq!(fake.mails(), ["MAIL FROM:<a@b.example>"]);
    }
}
