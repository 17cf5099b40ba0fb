//! Connection reuse against a real SMTP server on loopback: one written
//! here, which keeps what each of its sessions heard, so that the tests can
//! tell which connection carried which message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Delivery, Envelope, SmarthostRelay};
use crate::config::{RelayConfig, RelayMode, Smarthost, SmarthostUrl};
use crate::metrics::Metrics;

/// What the server does in one transaction (`n`-th of its session, from 0).
#[derive(Clone)]
enum Act {
    /// Accepts it.
    Accept,
    /// Holds the reply to the end of data until notified, then says `554`:
    /// a later message that read it as its own would be refused.
    HoldDataReply(Arc<Notify>),
    /// Closes the connection on reading `MAIL`, without a word.
    CloseAtMail,
    /// Answers `MAIL` with `421` and closes.
    Busy421AtMail,
    /// Never answers `MAIL`, and keeps the connection open (a host gone
    /// without closing it).
    SilentAtMail,
    /// Accepts it, then closes the connection (an idle timeout of its own).
    AcceptAndClose,
    /// Answers the end of data with a `3xx` (a server out of step with its
    /// own replies; lettre reads it as success).
    ThreeXxDataReply,
    /// Refuses `MAIL` with `550 5.7.1`.
    RefuseMail,
    /// Answers nothing until it has read the transaction's `DATA`: only a
    /// client that pipelines gets past `MAIL`.
    RepliesAfterData,
    /// Answers `DATA` with `354` even when no recipient was accepted (RFC
    /// 2920 says to refuse it; a client must cope with the server that
    /// does not).
    DataOpenAfterRefusal,
    /// Answers `DATA` with `421` and closes.
    Busy421AtData,
}

/// What one session heard, in order: commands, plus `data:<Message-ID>`
/// for each message body, and `EOF` when the client closed it.
type Log = Arc<Mutex<Vec<String>>>;

struct Server {
    port: u16,
    sessions: Arc<Mutex<Vec<Log>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// `script(session, transaction)` says what to do; a `RCPT` to an
    /// address starting with `refuse` is answered `550 5.1.1`.
    async fn start(script: impl Fn(usize, usize) -> Act + Send + Sync + 'static) -> Self {
        Self::start_sized(|_| 100_000, script).await
    }

    /// [`Server::start`], announcing PIPELINING (RFC 2920).
    async fn start_pipelining(
        script: impl Fn(usize, usize) -> Act + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(true, |_| 100_000, script).await
    }

    /// [`Server::start`], announcing `size(session)` as its `SIZE`.
    async fn start_sized(
        size: impl Fn(usize) -> u64 + Send + Sync + 'static,
        script: impl Fn(usize, usize) -> Act + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(false, size, script).await
    }

    async fn start_with(
        pipelining: bool,
        size: impl Fn(usize) -> u64 + Send + Sync + 'static,
        script: impl Fn(usize, usize) -> Act + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions: Arc<Mutex<Vec<Log>>> = Arc::default();
        let all = sessions.clone();
        let script = Arc::new(script);
        let size = Arc::new(size);
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let log = Log::default();
                let index = {
                    let mut all = all.lock().unwrap();
                    all.push(log.clone());
                    all.len() - 1
                };
                let script = script.clone();
                let ehlo = format!(
                    "250-upstream.test\r\n{}250-8BITMIME\r\n250 SIZE {}\r\n",
                    if pipelining { "250-PIPELINING\r\n" } else { "" },
                    size(index)
                );
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let say = |l: &str| log.lock().unwrap().push(l.to_string());
                    let _ = w.write_all(b"220 upstream.test ESMTP\r\n").await;
                    let mut transaction = 0;
                    let mut act = Act::Accept;
                    // The transaction so far: `MAIL` and `RCPT`s accepted.
                    let (mut mail_ok, mut rcpts_ok) = (false, 0usize);
                    // A line already read (and logged) to be handled next.
                    let mut pushback: Option<String> = None;
                    loop {
                        let line = match pushback.take() {
                            Some(line) => line,
                            None => {
                                let Ok(Some(line)) = lines.next_line().await else {
                                    say("EOF");
                                    return;
                                };
                                say(&line);
                                line
                            }
                        };
                        let verb = line.get(..4).unwrap_or(&line).to_ascii_uppercase();
                        let refused_rcpt =
                            verb == "RCPT" && line.to_ascii_lowercase().contains("to:<refuse");
                        let reply = match verb.as_str() {
                            "EHLO" => ehlo.as_str(),
                            "RSET" => {
                                (mail_ok, rcpts_ok) = (false, 0);
                                "250 2.0.0 ok\r\n"
                            }
                            "MAIL" => {
                                act = script(index, transaction);
                                transaction += 1;
                                mail_ok = !matches!(act, Act::RefuseMail);
                                match act {
                                    Act::RefuseMail => "550 5.7.1 sender refused\r\n",
                                    Act::RepliesAfterData => {
                                        // The group's replies, in one write,
                                        // once its DATA is in.
                                        let mut replies = String::from("250 2.1.0 ok\r\n");
                                        loop {
                                            let Ok(Some(l)) = lines.next_line().await else {
                                                say("EOF");
                                                return;
                                            };
                                            say(&l);
                                            if l.to_ascii_uppercase().starts_with("DATA") {
                                                pushback = Some(l);
                                                break;
                                            }
                                            if l.to_ascii_lowercase().contains("to:<refuse") {
                                                replies.push_str("550 5.1.1 no such user\r\n");
                                            } else {
                                                rcpts_ok += 1;
                                                replies.push_str("250 2.1.5 ok\r\n");
                                            }
                                        }
                                        if w.write_all(replies.as_bytes()).await.is_err() {
                                            return;
                                        }
                                        continue;
                                    }
                                    Act::CloseAtMail => return,
                                    Act::Busy421AtMail => {
                                        let _ = w.write_all(b"421 4.4.2 idle too long\r\n").await;
                                        return;
                                    }
                                    Act::SilentAtMail => {
                                        while let Ok(Some(l)) = lines.next_line().await {
                                            say(&l);
                                        }
                                        say("EOF");
                                        return;
                                    }
                                    _ => "250 2.1.0 ok\r\n",
                                }
                            }
                            "RCPT" if refused_rcpt => "550 5.1.1 no such user\r\n",
                            "RCPT" if !mail_ok => "503 5.5.1 MAIL first\r\n",
                            "RCPT" => {
                                rcpts_ok += 1;
                                "250 2.1.5 ok\r\n"
                            }
                            "DATA" if matches!(act, Act::Busy421AtData) => {
                                let _ = w.write_all(b"421 4.7.0 too many errors\r\n").await;
                                say("CLOSED");
                                return;
                            }
                            "DATA" if !mail_ok => "503 5.5.1 MAIL first\r\n",
                            "DATA"
                                if rcpts_ok == 0 && !matches!(act, Act::DataOpenAfterRefusal) =>
                            {
                                "554 5.5.1 no valid recipients\r\n"
                            }
                            "DATA" => {
                                (mail_ok, rcpts_ok) = (false, 0);
                                let _ = w.write_all(b"354 go ahead\r\n").await;
                                let mut id = String::new();
                                loop {
                                    let Ok(Some(l)) = lines.next_line().await else {
                                        say("EOF");
                                        return;
                                    };
                                    if matches!(act, Act::DataOpenAfterRefusal) {
                                        // Whatever the client sends into it.
                                        say(&format!("in data: {l}"));
                                    }
                                    if l == "." {
                                        break;
                                    }
                                    if let Some(v) = l.strip_prefix("Message-ID: ") {
                                        id = v.to_string();
                                    }
                                }
                                say(&format!("data:{id}"));
                                if let Act::HoldDataReply(go) = &act {
                                    // Whatever the client says meanwhile is
                                    // kept: a next message's commands on this
                                    // connection would show here.
                                    loop {
                                        tokio::select! {
                                            _ = go.notified() => {
                                                let _ = w.write_all(b"554 5.0.0 late reply to an earlier message\r\n").await;
                                                break;
                                            }
                                            l = lines.next_line() => match l {
                                                Ok(Some(l)) => say(&l),
                                                _ => {
                                                    say("EOF");
                                                    return;
                                                }
                                            },
                                        }
                                    }
                                    continue;
                                }
                                if let Act::ThreeXxDataReply = act {
                                    let _ = w.write_all(b"354 out of step\r\n").await;
                                    continue;
                                }
                                let _ = w.write_all(b"250 2.0.0 queued\r\n").await;
                                if let Act::AcceptAndClose = act {
                                    say("CLOSED");
                                    return;
                                }
                                continue;
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => "250 2.0.0 ok\r\n",
                        };
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            port,
            sessions,
            task,
        }
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Each session's log so far.
    fn logs(&self) -> Vec<Vec<String>> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.lock().unwrap().clone())
            .collect()
    }

    /// Per session, the message ids it received and the senders it heard,
    /// in order.
    fn transactions(&self) -> Vec<Vec<(String, String)>> {
        self.logs()
            .iter()
            .map(|log| {
                let mut out = Vec::new();
                let mut from = String::new();
                for l in log {
                    if let Some(f) = l.strip_prefix("MAIL FROM:") {
                        // Without the parameters (SIZE=).
                        from = f.split(' ').next().unwrap_or_default().to_string();
                    } else if let Some(id) = l.strip_prefix("data:") {
                        out.push((id.to_string(), from.clone()));
                    }
                }
                out
            })
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the logs.
    async fn until(&self, what: &str, pred: impl Fn(&[Vec<String>]) -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !pred(&self.logs()) {
            assert!(Instant::now() < end, "{what}: {:?}", self.logs());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (bounded) until the first session's log ends with `line`.
    async fn until_first_ends_with(&self, line: &str) {
        self.until(line, |logs| {
            logs.first()
                .and_then(|l| l.last())
                .is_some_and(|l| l == line)
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A script: `act` for the first transaction of the first session, then
/// every transaction accepted.
fn first_then_accept(act: Act) -> impl Fn(usize, usize) -> Act + Send + Sync + 'static {
    move |session, transaction| {
        if (session, transaction) == (0, 0) {
            act.clone()
        } else {
            Act::Accept
        }
    }
}

fn relay(server: &Server, tune: impl FnOnce(&mut RelayConfig)) -> (SmarthostRelay, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let mut config = RelayConfig {
        mode: RelayMode::Smarthost,
        smarthosts: vec![Smarthost::new(SmarthostUrl::parse(&server.url()).unwrap())],
        timeout_secs: 60,
        // One failure would open the breaker: a stale connection counted
        // as one would show.
        breaker_failures: 1,
        max_attempts: 1,
        ..Default::default()
    };
    tune(&mut config);
    let relay = SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap();
    (relay, metrics)
}

/// Message `i`: from `s<i>@a.example` to `t<i>@b.example`, its id in a header.
fn message(i: usize) -> (Envelope, Vec<u8>) {
    (
        Envelope {
            mail_from: format!("s{i}@a.example"),
            rcpt_to: vec![format!("t{i}@b.example")],
        },
        format!("Message-ID: <m{i}@a.example>\r\nSubject: {i}\r\n\r\nbody {i}\r\n").into_bytes(),
    )
}

async fn send(relay: &SmarthostRelay, i: usize) -> Delivery {
    let (envelope, bytes) = message(i);
    relay
        .deliver(&envelope, &bytes, Instant::now() + Duration::from_secs(20))
        .await
}

fn id(i: usize) -> (String, String) {
    (format!("<m{i}@a.example>"), format!("<s{i}@a.example>"))
}

/// The value of `name{upstream="url"}`.
pub(super) fn metric(metrics: &Metrics, name: &str, url: &str) -> String {
    let needle = format!("{name}{{upstream=\"{url}\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
        .unwrap_or_else(|| panic!("no {needle} in {}", metrics.encode()))
}

fn failed_attempts(metrics: &Metrics) -> usize {
    metrics
        .encode()
        .lines()
        .filter(|l| l.contains("result=\"failed\"") && !l.ends_with(" 0"))
        .count()
}

#[tokio::test]
async fn several_messages_share_one_connection_each_delivered_once() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (relay, metrics) = relay(&server, |_| {});
    for i in 0..5 {
        assert_eq!(send(&relay, i).await, Delivery::Accepted);
    }
    // One session, the five messages in order, each with its own sender.
    assert_eq!(
        server.transactions(),
        vec![(0..5).map(id).collect::<Vec<_>>()]
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "1"
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_reused_total", &server.url()),
        "4"
    );
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &server.url()), "1");
    // Concurrent messages take a connection each (fewer than messages, as
    // some finish before others start, at most one each) and every
    // message arrives exactly once.
    let all = futures::future::join_all((5..25).map(|i| send(&relay, i))).await;
    assert!(all.iter().all(|d| *d == Delivery::Accepted), "{all:?}");
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for t in server.transactions().into_iter().flatten() {
        *seen.entry(t).or_default() += 1;
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    assert!((0..25).all(|i| seen.contains_key(&id(i))));
    let sessions = server.logs().len();
    assert!((1..=21).contains(&sessions), "{sessions}");
    // Shutdown says QUIT on every idle connection.
    relay.close_idle(Duration::from_secs(5)).await;
    server
        .until("every session ended with QUIT", |logs| {
            logs.iter()
                .all(|l| l.last().map(String::as_str) == Some("QUIT"))
        })
        .await;
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &server.url()), "0");
}

#[tokio::test]
async fn a_connection_whose_data_reply_was_not_2xx_is_not_lent_again() {
    let server = Server::start(first_then_accept(Act::ThreeXxDataReply)).await;
    let (relay, metrics) = relay(&server, |_| {});
    // lettre takes the 354 as success (as it always did); the connection
    // it came on is closed, not kept.
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![id(0)], vec![id(1)]]);
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "2"
    );
}

#[tokio::test]
async fn reuse_off_is_one_connection_per_message() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (relay, metrics) = relay(&server, |c| c.reuse_connections = false);
    for i in 0..3 {
        assert_eq!(send(&relay, i).await, Delivery::Accepted);
    }
    server
        .until("three sessions, each ended with QUIT", |logs| {
            logs.len() == 3
                && logs
                    .iter()
                    .all(|l| l.last().map(String::as_str) == Some("QUIT"))
        })
        .await;
    assert_eq!(
        server.transactions(),
        vec![vec![id(0)], vec![id(1)], vec![id(2)]]
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "3"
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_reused_total", &server.url()),
        "0"
    );
}

/// An upstream that holds its reply to the second message of its first
/// session until the returned `Notify` fires.
async fn holding_second_reply() -> (Server, Arc<Notify>) {
    let late = Arc::new(Notify::new());
    let hold = late.clone();
    let server = Server::start(move |session, transaction| {
        if (session, transaction) == (0, 1) {
            Act::HoldDataReply(hold.clone())
        } else {
            Act::Accept
        }
    })
    .await;
    (server, late)
}

#[tokio::test]
async fn a_send_cancelled_while_waiting_for_its_data_reply_never_lends_its_connection() {
    let (server, late) = holding_second_reply().await;
    let (relay, metrics) = relay(&server, |_| {});
    // Message 0 makes the connection and leaves it idle.
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    // Message 1 goes over it, and the caller gives up while the upstream
    // has the data and has not answered yet.
    let cancelled = tokio::time::timeout(Duration::from_millis(300), send(&relay, 1)).await;
    // (The attempt's own timeout, a minute, is far from over.)
    assert!(cancelled.is_err(), "the reply was held: {cancelled:?}");
    // The connection went with the cancelled send: the upstream sees it
    // close, with nothing after message 1's data.
    server
        .until("the first session closed by the client", |logs| {
            logs[0].last().map(String::as_str) == Some("EOF")
        })
        .await;
    // The upstream now sends its late reply, to a closed connection.
    late.notify_one();
    // Message 2 goes over a new connection and gets its own reply.
    assert_eq!(send(&relay, 2).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![id(0), id(1)], vec![id(2)]]);
    let first = &server.logs()[0];
    let after_data = first
        .iter()
        .position(|l| l == "data:<m1@a.example>")
        .unwrap();
    assert_eq!(&first[after_data + 1..], ["EOF"], "{first:?}");
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "2"
    );
}

#[tokio::test]
async fn a_send_cut_off_by_the_attempt_timeout_never_lends_its_connection() {
    let (server, late) = holding_second_reply().await;
    let (relay, _) = relay(&server, |c| c.timeout_secs = 1);
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    // Our own timeout ends the attempt: 451 for the sender.
    assert!(matches!(send(&relay, 1).await, Delivery::TempFail(_)));
    late.notify_one();
    // The breaker (one failure) is open now; a relay with it closed shows
    // what the next message gets: a new connection and its own reply.
    let (relay, _) = self::relay(&server, |_| {});
    assert_eq!(send(&relay, 2).await, Delivery::Accepted);
    server
        .until("the first session closed after message 1's data", |logs| {
            logs[0].last().map(String::as_str) == Some("EOF")
        })
        .await;
    assert_eq!(server.transactions(), vec![vec![id(0), id(1)], vec![id(2)]]);
}

/// A reused connection that the upstream closed or refuses before `MAIL`
/// is answered: the message goes over a new one, the breaker (opened by
/// one failure here) hears nothing.
async fn stale(act: Act) {
    stale_tuned(act, |_| {}).await;
}

/// [`stale`] with the relay's settings changed by `tune`.
async fn stale_tuned(act: Act, tune: impl FnOnce(&mut RelayConfig)) {
    stale_with(false, act, tune).await;
}

/// [`stale_tuned`] against a server that offers PIPELINING or not.
async fn stale_with(pipelining: bool, act: Act, tune: impl FnOnce(&mut RelayConfig)) {
    let script = move |session, transaction| {
        if (session, transaction) == (0, 0) {
            Act::AcceptAndClose
        } else if (session, transaction) == (1, 1) {
            act.clone()
        } else {
            Act::Accept
        }
    };
    let server = Server::start_with(pipelining, |_| 100_000, script).await;
    let (relay, metrics) = relay(&server, tune);
    // Session 0: accepted, then closed by the upstream while idle.
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    server
        .until("the upstream's close", |logs| {
            logs[0].last().map(String::as_str) == Some("CLOSED")
        })
        .await;
    // Found dead when taken: a new connection (session 1).
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    // Session 1 dies (the act) when message 2 says MAIL: session 2.
    assert_eq!(send(&relay, 2).await, Delivery::Accepted);
    assert_eq!(send(&relay, 3).await, Delivery::Accepted);
    let t = server.transactions();
    assert_eq!(t, vec![vec![id(0)], vec![id(1)], vec![id(2), id(3)]]);
    assert_eq!(
        metric(&metrics, "tempalias_relay_stale_total", &server.url()),
        "2"
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "3"
    );
    assert_eq!(failed_attempts(&metrics), 0, "{}", metrics.encode());
    assert_eq!(
        metric(&metrics, "tempalias_relay_breaker_state", &server.url()),
        "0"
    );
}

#[tokio::test]
async fn a_stale_connection_closed_at_mail_costs_nothing() {
    stale(Act::CloseAtMail).await;
}

#[tokio::test]
async fn a_stale_connection_answering_421_at_mail_costs_nothing() {
    stale(Act::Busy421AtMail).await;
}

#[tokio::test]
async fn a_stale_connection_that_never_answers_mail_costs_a_few_seconds_only() {
    // The attempt timeout (60 s) is far away: the bound on MAIL's reply
    // on a reused connection, not the attempt's, sends the message on.
    let started = Instant::now();
    stale(Act::SilentAtMail).await;
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_silent_reused_connection_leaves_a_short_attempt_time_to_deliver() {
    // An attempt of 2 s: the wait for MAIL's reply on the reused
    // connection is cut to half of it (not 5 s, which would outlast the
    // attempt and give the sender a 451), and the new connection delivers.
    let started = Instant::now();
    stale_tuned(Act::SilentAtMail, |c| c.timeout_secs = 2).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_time() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (relay, metrics) = relay(&server, |c| c.reuse_idle_secs = 1);
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    // The sweeper says QUIT after a second, without any message coming.
    server
        .until("QUIT on the idle connection", |logs| {
            logs[0].iter().any(|l| l == "QUIT")
        })
        .await;
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &server.url()), "0");
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![id(0)], vec![id(1)]]);
    assert_eq!(
        metric(&metrics, "tempalias_relay_stale_total", &server.url()),
        "0"
    );
}

/// Sends a message whose one recipient the upstream refuses (`550`).
async fn refused_recipient(relay: &SmarthostRelay) {
    refused_to(relay, &["refuse@b.example"]).await;
}

/// Sends a message to `rcpts`, of which the upstream refuses at least one
/// (`550`): the whole message is refused.
async fn refused_to(relay: &SmarthostRelay, rcpts: &[&str]) {
    let refused = relay
        .deliver(
            &Envelope {
                mail_from: "x@a.example".into(),
                rcpt_to: rcpts.iter().map(|r| r.to_string()).collect(),
            },
            b"Subject: r\r\n\r\nr\r\n",
            Instant::now() + Duration::from_secs(20),
        )
        .await;
    assert!(
        matches!(refused, Delivery::PermFail { code: 550, .. }),
        "{refused:?}"
    );
}

/// A refused recipient, then message 1 on the same connection: the one
/// session's log, and the position of its `RSET`.
async fn refused_then_reused(server: &Server) -> (Vec<Vec<String>>, usize) {
    let (relay, metrics) = relay(server, |_| {});
    refused_recipient(&relay).await;
    // The connection goes back once RSET got its 250.
    until_idle(server, &metrics).await;
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    let logs = server.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let rset = logs[0].iter().position(|l| l == "RSET").unwrap();
    (logs, rset)
}

#[tokio::test]
async fn a_refused_recipient_is_reset_and_the_connection_reused() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (logs, rset) = refused_then_reused(&server).await;
    let mail = logs[0]
        .iter()
        .position(|l| l.starts_with("MAIL FROM:<s1@a.example>"));
    assert!(mail > Some(rset), "{logs:?}");
}

#[tokio::test]
async fn with_reuse_off_a_refused_recipient_ends_the_connection_without_rset() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (relay, _) = relay(&server, |c| c.reuse_connections = false);
    refused_recipient(&relay).await;
    server.until_first_ends_with("QUIT").await;
    let logs = server.logs();
    assert!(!logs[0].iter().any(|l| l == "RSET"), "{logs:?}");
}

#[tokio::test]
async fn a_message_too_large_for_an_idle_connections_ehlo_asks_a_new_one() {
    // The first connection's EHLO says SIZE 200; the smarthost is then
    // reconfigured, and new connections say 100,000.
    let server = Server::start_sized(
        |session| if session == 0 { 200 } else { 100_000 },
        |_, _| Act::Accept,
    )
    .await;
    let (relay, metrics) = relay(&server, |_| {});
    assert_eq!(send(&relay, 0).await, Delivery::Accepted);
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &server.url()), "1");
    // Over the old connection's SIZE, within the smarthost's new one: not
    // refused on the idle connection's word (one smarthost: that would be
    // 552 5.3.4), but sent over a new connection.
    let envelope = Envelope {
        mail_from: "big@a.example".into(),
        rcpt_to: vec!["t@b.example".into()],
    };
    let big = format!(
        "Message-ID: <big@a.example>\r\nSubject: big\r\n\r\n{}\r\n",
        "x".repeat(300)
    );
    let outcome = relay
        .deliver(
            &envelope,
            big.as_bytes(),
            Instant::now() + Duration::from_secs(20),
        )
        .await;
    assert_eq!(outcome, Delivery::Accepted);
    assert_eq!(
        server.transactions(),
        vec![
            vec![id(0)],
            vec![("<big@a.example>".to_string(), "<big@a.example>".to_string())]
        ]
    );
    // The first connection was left untouched, and both wait for more.
    assert_eq!(
        server.logs()[0].last().map(String::as_str),
        Some("data:<m0@a.example>")
    );
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &server.url()), "2");
    assert_eq!(failed_attempts(&metrics), 0, "{}", metrics.encode());
}

#[tokio::test]
async fn a_connection_carries_at_most_max_messages() {
    let server = Server::start(|_, _| Act::Accept).await;
    let (relay, _) = relay(&server, |c| c.reuse_max_messages = 2);
    for i in 0..5 {
        assert_eq!(send(&relay, i).await, Delivery::Accepted);
    }
    assert_eq!(
        server.transactions(),
        vec![vec![id(0), id(1)], vec![id(2), id(3)], vec![id(4)]]
    );
}

#[tokio::test]
async fn pools_sharing_a_label_add_up_in_the_idle_gauge() {
    use super::client::{self, unverified_tls, ConnKey, Target, TlsPolicy};
    use super::pool::{Pool, PoolSettings};
    use lettre::transport::smtp::extension::ClientId;
    // Two smarthost entries for one host and port (with other accounts in
    // production) have a pool each and one metric label.
    let server = Server::start(|_, _| Act::Accept).await;
    let metrics = Arc::new(Metrics::new());
    let label = server.url();
    let tls = TlsPolicy::Opportunistic(unverified_tls("127.0.0.1").unwrap());
    let helo = ClientId::Domain("mx.test.example".into());
    let addrs = [([127, 0, 0, 1], server.port).into()];
    let settings = PoolSettings {
        enabled: true,
        max_idle: 4,
        idle: Duration::from_secs(60),
        max_messages: 100,
        max_age: Duration::from_secs(300),
    };
    let target = |pool| Target {
        name: &label,
        addrs: &addrs,
        tls: &tls,
        credentials: None,
        helo: &helo,
        connect_timeout: Duration::from_secs(5),
        pool: Some(pool),
    };
    let key = ConnKey::new(&label, &tls, None, &helo);
    let a = Pool::new(key, settings, &label, metrics.clone());
    let b = Pool::new(key, settings, &label, metrics.clone());
    for (i, pool) in [&a, &b].into_iter().enumerate() {
        let (envelope, bytes) = message(i);
        let envelope = super::to_lettre(&envelope).unwrap();
        client::send(&target(pool), &envelope, &bytes)
            .await
            .unwrap();
    }
    assert_eq!(server.logs().len(), 2);
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &label), "2");
    a.close(Duration::from_secs(5)).await;
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &label), "1");
    b.close(Duration::from_secs(5)).await;
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &label), "0");
}

#[test]
fn connections_are_keyed_by_everything_that_makes_them() {
    use super::client::{unverified_tls, ConnKey, TlsPolicy};
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::extension::ClientId;
    let params = unverified_tls("h.example").unwrap();
    let helo = ClientId::Domain("mx.example".into());
    let a = Credentials::new("a".into(), "pw".into());
    let b = Credentials::new("a".into(), "other".into());
    let opp = TlsPolicy::Opportunistic(params.clone());
    let req = TlsPolicy::Required(params);
    let key = |name, tls, cred, helo| ConnKey::new(name, tls, cred, helo);
    let base = key("smtp://h.example:25", &opp, Some(&a), &helo);
    assert_eq!(base, key("smtp://h.example:25", &opp, Some(&a), &helo));
    assert_ne!(base, key("smtp://h.example:26", &opp, Some(&a), &helo));
    assert_ne!(base, key("smtp://h.example:25", &req, Some(&a), &helo));
    assert_ne!(base, key("smtp://h.example:25", &opp, Some(&b), &helo));
    assert_ne!(base, key("smtp://h.example:25", &opp, None, &helo));
    assert_ne!(
        base,
        key(
            "smtp://h.example:25",
            &opp,
            Some(&a),
            &ClientId::Domain("other.example".into())
        )
    );
}

#[tokio::test]
async fn each_smarthost_keeps_connections_by_its_own_bounds() {
    use crate::config::ReuseOverrides;
    // Reuse is on relay-wide; the first smarthost turns it off for itself,
    // the second keeps it, with a message limit of its own.
    let a = Server::start(|_, _| Act::Accept).await;
    let b = Server::start(|_, _| Act::Accept).await;
    let entry = |server: &Server, reuse| Smarthost {
        reuse,
        ..Smarthost::new(SmarthostUrl::parse(&server.url()).unwrap())
    };
    let config = RelayConfig {
        mode: RelayMode::Smarthost,
        smarthosts: vec![
            entry(
                &a,
                ReuseOverrides {
                    reuse_connections: Some(false),
                    ..Default::default()
                },
            ),
            entry(
                &b,
                ReuseOverrides {
                    reuse_max_messages: Some(2),
                    ..Default::default()
                },
            ),
        ],
        timeout_secs: 60,
        // The first failure opens a breaker, and the next smarthost is
        // tried in the same round.
        breaker_failures: 1,
        max_attempts: 2,
        ..Default::default()
    };
    assert!(config.reuse_connections);
    let metrics = Arc::new(Metrics::new());
    let relay = SmarthostRelay::new(&config, "mx.test.example", metrics.clone()).unwrap();
    // The first smarthost takes three messages, a connection each.
    for i in 0..3 {
        assert_eq!(send(&relay, i).await, Delivery::Accepted);
    }
    assert_eq!(
        a.transactions(),
        vec![vec![id(0)], vec![id(1)], vec![id(2)]]
    );
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &a.url()), "0");
    // Once it is gone, the second takes the rest: two per connection.
    let a_url = a.url();
    drop(a);
    for i in 3..8 {
        assert_eq!(send(&relay, i).await, Delivery::Accepted);
    }
    assert_eq!(
        b.transactions(),
        vec![vec![id(3), id(4)], vec![id(5), id(6)], vec![id(7)]]
    );
    // (A refused connect opens nothing.)
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &a_url),
        "3"
    );
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &b.url()),
        "3"
    );
    assert_eq!(metric(&metrics, "tempalias_relay_idle", &b.url()), "1");
}

/// Waits (bounded) until the relay holds an idle connection again.
async fn until_idle(server: &Server, metrics: &Metrics) {
    let end = Instant::now() + Duration::from_secs(10);
    while metric(metrics, "tempalias_relay_idle", &server.url()) != "1" {
        assert!(Instant::now() < end, "{:?}", server.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn with_pipelining_the_envelope_and_data_go_before_any_reply() {
    // The server answers `MAIL` only once it has read `DATA`: a client
    // that waited for each reply would wait for ever (bounded here).
    let server = Server::start_pipelining(|_, _| Act::RepliesAfterData).await;
    let (relay, _) = relay(&server, |_| {});
    for i in 0..3 {
        let sent = tokio::time::timeout(Duration::from_secs(10), send(&relay, i)).await;
        assert_eq!(sent, Ok(Delivery::Accepted), "{:?}", server.logs());
    }
    assert_eq!(
        server.transactions(),
        vec![(0..3).map(id).collect::<Vec<_>>()]
    );
}

#[tokio::test]
async fn without_pipelining_offered_the_client_waits_for_each_reply() {
    // The same server without PIPELINING in its EHLO: the client must not
    // send `RCPT` before `MAIL` is answered, so it never gets an answer.
    let server = Server::start(|_, _| Act::RepliesAfterData).await;
    let (relay, _) = relay(&server, |_| {});
    let sent = tokio::time::timeout(Duration::from_millis(500), send(&relay, 0)).await;
    assert!(sent.is_err(), "{sent:?}");
    let logs = server.logs();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].last().unwrap().starts_with("MAIL FROM:"),
        "{logs:?}"
    );
}

#[tokio::test]
async fn with_pipelining_a_refused_recipient_is_reset_and_the_connection_reused() {
    let server = Server::start_pipelining(|_, _| Act::Accept).await;
    let (logs, rset) = refused_then_reused(&server).await;
    // The whole group was read (its DATA refused: no recipient) before RSET.
    let data = logs[0].iter().position(|l| l == "DATA").unwrap();
    assert!(data < rset, "{logs:?}");
    assert_eq!(server.transactions(), vec![vec![id(1)]]);
}

#[tokio::test]
async fn with_pipelining_a_refused_sender_is_passed_on_and_the_connection_reused() {
    let server = Server::start_pipelining(first_then_accept(Act::RefuseMail)).await;
    let (relay, metrics) = relay(&server, |_| {});
    let refused = send(&relay, 0).await;
    assert!(
        matches!(&refused, Delivery::PermFail { code: 550, enhanced, .. } if enhanced == "5.7.1"),
        "{refused:?}"
    );
    until_idle(&server, &metrics).await;
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.logs().len(), 1, "{:?}", server.logs());
    assert_eq!(server.transactions(), vec![vec![id(1)]]);
}

/// Waits (bounded) until the first session ends, and checks that the
/// client sent nothing after its `DATA`: no message, `.`, `RSET` or `QUIT`.
async fn closed_right_after_data(server: &Server) {
    server.until_first_ends_with("EOF").await;
    let first = &server.logs()[0];
    let data = first.iter().position(|l| l == "DATA").unwrap();
    assert_eq!(&first[data + 1..], ["EOF"], "{first:?}");
}

#[tokio::test]
async fn a_data_phase_opened_after_a_refusal_closes_the_connection() {
    // `354` to the pipelined DATA although its one recipient was refused:
    // the client sends no message, no RSET and no QUIT into the data
    // phase; it closes the connection, and the next message takes a new one.
    let server = Server::start_pipelining(first_then_accept(Act::DataOpenAfterRefusal)).await;
    let (relay, _) = relay(&server, |_| {});
    refused_recipient(&relay).await;
    closed_right_after_data(&server).await;
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![], vec![id(1)]]);
}

#[tokio::test]
async fn with_pipelining_stale_connections_cost_nothing_either() {
    // The group (MAIL, RCPT, DATA) went out, the body did not: the retry
    // on a new connection cannot be a duplicate.
    stale_with(true, Act::CloseAtMail, |_| {}).await;
    stale_with(true, Act::Busy421AtMail, |_| {}).await;
    let started = Instant::now();
    stale_with(true, Act::SilentAtMail, |c| c.timeout_secs = 2).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn with_pipelining_a_421_after_a_refusal_leaves_the_refusal_standing() {
    // RCPT 550, then 421 to DATA: the sender hears the 550 (as without
    // pipelining, where DATA is never sent), not a temporary failure.
    let server = Server::start_pipelining(first_then_accept(Act::Busy421AtData)).await;
    let (relay, _) = relay(&server, |_| {});
    refused_recipient(&relay).await;
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![], vec![id(1)]]);
}

#[tokio::test]
async fn with_pipelining_a_partly_refused_envelope_closes_the_connection() {
    // Two recipients, one refused: the server answers DATA with 354 (one
    // recipient was accepted). The transaction fails as without
    // pipelining, and nothing, not even an empty message, is delivered.
    let server = Server::start_pipelining(|_, _| Act::Accept).await;
    let (relay, metrics) = relay(&server, |_| {});
    refused_to(&relay, &["ok@b.example", "refuse@b.example"]).await;
    closed_right_after_data(&server).await;
    assert_eq!(send(&relay, 1).await, Delivery::Accepted);
    assert_eq!(server.transactions(), vec![vec![], vec![id(1)]]);
    assert_eq!(
        metric(&metrics, "tempalias_relay_connections_total", &server.url()),
        "2"
    );
}
