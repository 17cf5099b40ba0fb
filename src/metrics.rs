//! Prometheus metrics shared by every part of a node.
//!
//! Label values are fixed enums or matched routes, never raw input, so the
//! number of series stays bounded whatever clients send.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Outcome of one message transaction (after DATA).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MessageResult {
    forwarded,
    rejected,
    tempfail,
    permfail,
}

/// Outcome of one RCPT command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RcptResult {
    accepted,
    relay_denied,
    unknown,
    expired,
    used_up,
    revoked,
    /// All remaining uses held by messages in flight (450).
    busy,
    /// The client address has too many failed recipients (450).
    throttled,
    tempfail,
    invalid,
    /// The alias waits for its target's confirmation (550 5.7.1).
    unconfirmed,
    /// MX delivery: the recipient's destination is in another domain than
    /// an earlier recipient's; sent again in its own transaction (452 4.5.3).
    other_domain,
    /// A bounce to an SRS address mixed with other recipients in one
    /// transaction; the later one is sent again on its own (452 4.5.3).
    bounce_alone,
}

/// What happened in target confirmation (`tempalias_confirmations_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConfirmEvent {
    /// A confirmation mail was accepted by the relay.
    mail_sent,
    /// A confirmation mail could not be sent (the request was withdrawn).
    mail_failed,
    /// A target confirmed (pressed the button of a pending link).
    confirmed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfirmLabels {
    pub event: ConfirmEvent,
}

/// What DKIM signing and ARC sealing did to one forwarded message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthResult {
    /// DKIM-signed with each key of the alias domain (one count per
    /// message, however many keys).
    signed,
    /// The alias domain has no key (`dkim.keys`).
    unsigned,
    /// Signing failed (no header to sign).
    sign_failed,
    /// ARC-sealed.
    sealed,
    /// Not sealed: the evaluation took longer than `arc.timeout_ms`.
    seal_timeout,
    /// Not sealed: the message's ARC chain was already broken.
    chain_broken,
    /// Not sealed: the message could not be parsed or sealed.
    seal_failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub result: AuthResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub result: MessageResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RcptLabels {
    pub result: RcptResult,
}

/// Outcome of one TLS handshake on an SMTP listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TlsResult {
    tls12,
    tls13,
    failed,
    timeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub result: TlsResult,
}

/// Which cap of the HTTP listener refused a connection, named after its
/// config key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedLimit {
    /// `http.max_connections`: the node as a whole is full.
    max_connections,
    /// `http.max_connections_per_ip`: the client's address (or /64) is.
    max_connections_per_ip,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub limit: RefusedLimit,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub smtp_sessions: Counter,
    pub smtp_sessions_active: Gauge,
    pub smtp_messages: Family<MessageLabels, Counter>,
    pub smtp_rcpt: Family<RcptLabels, Counter>,
    pub forward_duration: Histogram,
    pub forward_auth: Family<AuthLabels, Counter>,
    pub aliases_created: Counter,
    pub aliases_active: Gauge,
    /// Purge entries this node proposed as leader and saw applied.
    pub purge_entries: Counter,
    /// Aliases those entries deleted.
    pub purged_aliases: Counter,
    /// Rows those entries deleted over every table a purge deletes from
    /// (aliases, tombstones, idempotency keys, per-target rows, links,
    /// target records).
    pub purged_rows: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub raft_term: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_leader_id: Gauge,
    pub raft_write_errors: Counter,
    pub raft_write_duration: Histogram,
    pub build_info: Family<BuildLabels, Gauge>,
    /// Worker threads of the async runtime (`worker_threads`, or one per CPU).
    pub runtime_workers: Gauge,
    pub raft_elections: Counter,
    pub raft_forwarded_writes: Counter,
    pub raft_forward_calls: Counter,
    pub raft_replication_lag: Family<PeerLabels, Gauge>,
    pub cluster_rpc_errors: Family<PeerLabels, Counter>,
    pub cluster_auth_failures: Counter,
    pub clock_offset: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub cluster_peer_reachable: Family<PeerLabels, Gauge>,
    pub raft_triggered_elections: Counter,
    pub raft_refused_appends: Counter,
    /// SMTP connections turned away with `421 4.3.2` while draining.
    pub smtp_drained: Counter,
    /// 1 while the node drains (node or cluster-wide maintenance).
    pub maintenance: Gauge,
    /// HTTP connections open on the public listener.
    pub http_connections_active: Gauge,
    /// HTTP connections refused at the listener, by the cap that refused.
    pub http_connections_refused: Family<RefusedLabels, Counter>,
    /// Outbound attempts per upstream and outcome.
    pub relay_attempts: Family<AttemptLabels, Counter>,
    /// Messages that skipped a smarthost because its breaker was open.
    pub relay_skipped: Family<UpstreamLabels, Counter>,
    /// Circuit breaker per smarthost: 0 closed, 1 open, 2 half-open.
    pub relay_breaker_state: Family<UpstreamLabels, Gauge>,
    /// Times a smarthost's breaker opened.
    pub relay_breaker_opened: Family<UpstreamLabels, Counter>,
    /// Connections opened to a smarthost (TCP connected; each then says
    /// EHLO, TLS and AUTH as configured).
    pub relay_connections: Family<UpstreamLabels, Counter>,
    /// Messages a smarthost accepted on a connection an earlier message had
    /// used: with `relay_connections`, the share of messages spared a
    /// connection set-up.
    pub relay_reused: Family<UpstreamLabels, Counter>,
    /// Idle connections found closed (or saying something unasked) by the
    /// smarthost when a message wanted them; the message went over a fresh
    /// one, and nothing counted against the smarthost.
    pub relay_stale: Family<UpstreamLabels, Counter>,
    /// Idle connections kept open per smarthost now.
    pub relay_idle: Family<UpstreamLabels, Gauge>,
    /// TLS handshakes on the SMTP listeners, by version or failure.
    pub smtp_tls_handshakes: Family<TlsLabels, Counter>,
    /// Of the successful ones, those that resumed an earlier session (a
    /// ticket or the session cache): the share tells whether senders'
    /// session caches spare the node its handshake signatures.
    pub smtp_tls_resumed: Counter,
    /// Target confirmation: mails sent or failed, confirmations accepted.
    pub confirmations: Family<ConfirmLabels, Counter>,
    /// Read barriers the leader confirmed with a quorum round.
    pub raft_read_quorum_rounds: Counter,
    /// Read barriers the leader served from its read lease.
    pub raft_lease_reads: Counter,
    /// Reads (or read barriers) a follower or learner served from its
    /// follower lease.
    pub raft_follower_lease_reads: Counter,
    /// Follower leases this node granted as leader.
    pub raft_follower_leases_granted: Counter,
    /// Applies that waited for a follower lease holder to persist their
    /// entries.
    pub raft_lease_holds: Counter,
    /// How long those applies waited: tells a busy holder (fractions of a
    /// millisecond) from one that stopped answering (its whole lease).
    pub raft_lease_hold_duration: Histogram,
    /// Read barriers run for HTTP status reads (each serves every read
    /// that queued for it).
    pub http_read_barriers: Counter,
    /// Readiness checks run for `/readyz` (the others used the cached verdict).
    pub readiness_checks: Counter,
}

/// Outcome of one outbound attempt at one upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptResult {
    /// The upstream took the message.
    accepted,
    /// It answered with a 4xx (alive, but not now).
    refused_temporary,
    /// It answered with a 5xx (passed on to the sender).
    refused_permanent,
    /// No usable answer: connect, TLS, AUTH, timeout or connection loss. These
    /// count towards the upstream's circuit breaker.
    failed,
    /// It works but lacks an extension the message needs (8BITMIME,
    /// SMTPUTF8): nothing sent, the next upstream tried, the breaker not told.
    unsupported,
    /// It works but announced a `SIZE` below the message's: as
    /// `unsupported`, counted apart so that an operator sees which limit to
    /// raise.
    too_large,
}

/// An upstream: a smarthost's `scheme://host:port` (never its user), or `mx`
/// for all direct MX deliveries together (their hosts are unbounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub upstream: String,
    pub result: AttemptResult,
}

/// Labels of `tempalias_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tempalias");
        let m = Self {
            smtp_sessions: Counter::default(),
            smtp_sessions_active: Gauge::default(),
            smtp_messages: Family::default(),
            smtp_rcpt: Family::default(),
            forward_duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            forward_auth: Family::default(),
            aliases_created: Counter::default(),
            aliases_active: Gauge::default(),
            purge_entries: Counter::default(),
            purged_aliases: Counter::default(),
            purged_rows: Counter::default(),
            http_requests: Family::default(),
            raft_term: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_leader_id: Gauge::default(),
            raft_write_errors: Counter::default(),
            raft_write_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
            build_info: Family::default(),
            runtime_workers: Gauge::default(),
            raft_elections: Counter::default(),
            raft_forwarded_writes: Counter::default(),
            raft_forward_calls: Counter::default(),
            raft_replication_lag: Family::default(),
            cluster_rpc_errors: Family::default(),
            cluster_auth_failures: Counter::default(),
            clock_offset: Family::default(),
            cluster_peer_reachable: Family::default(),
            raft_triggered_elections: Counter::default(),
            raft_refused_appends: Counter::default(),
            smtp_drained: Counter::default(),
            maintenance: Gauge::default(),
            http_connections_active: Gauge::default(),
            http_connections_refused: Family::default(),
            relay_attempts: Family::default(),
            relay_skipped: Family::default(),
            relay_breaker_state: Family::default(),
            relay_breaker_opened: Family::default(),
            relay_connections: Family::default(),
            relay_reused: Family::default(),
            relay_stale: Family::default(),
            relay_idle: Family::default(),
            smtp_tls_handshakes: Family::default(),
            smtp_tls_resumed: Counter::default(),
            confirmations: Family::default(),
            raft_read_quorum_rounds: Counter::default(),
            raft_lease_reads: Counter::default(),
            raft_follower_lease_reads: Counter::default(),
            raft_follower_leases_granted: Counter::default(),
            raft_lease_holds: Counter::default(),
            raft_lease_hold_duration: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            http_read_barriers: Counter::default(),
            readiness_checks: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "smtp_sessions",
            "SMTP sessions accepted",
            m.smtp_sessions.clone(),
        );
        registry.register(
            "smtp_sessions_active",
            "SMTP sessions open now",
            m.smtp_sessions_active.clone(),
        );
        registry.register(
            "smtp_messages",
            "Message transactions by outcome after DATA",
            m.smtp_messages.clone(),
        );
        registry.register("smtp_rcpt", "RCPT commands by outcome", m.smtp_rcpt.clone());
        registry.register_with_unit(
            "forward_duration",
            "Time to hand one message to the upstream",
            prometheus_client::registry::Unit::Seconds,
            m.forward_duration.clone(),
        );
        registry.register(
            "forward_auth",
            "Forwarded messages by what DKIM signing and ARC sealing did (one signing and at most one sealing result each)",
            m.forward_auth.clone(),
        );
        registry.register(
            "aliases_created",
            "Aliases created through this node",
            m.aliases_created.clone(),
        );
        registry.register(
            "aliases_active",
            "Aliases in the local replica that can still forward",
            m.aliases_active.clone(),
        );
        registry.register(
            "purge_entries",
            "Purge entries this node proposed as leader and saw applied (a backlog is deleted in several bounded entries)",
            m.purge_entries.clone(),
        );
        registry.register(
            "purged_aliases",
            "Aliases deleted by the purge entries this node proposed as leader",
            m.purged_aliases.clone(),
        );
        registry.register(
            "purged_rows",
            "Rows deleted by the purge entries this node proposed as leader, over every table a purge deletes from",
            m.purged_rows.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by matched route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "smtp_tls_handshakes",
            "TLS handshakes on the SMTP listeners (STARTTLS and implicit TLS), by negotiated version or failure",
            m.smtp_tls_handshakes.clone(),
        );
        registry.register(
            "smtp_tls_resumed",
            "TLS handshakes on the SMTP listeners that resumed an earlier session",
            m.smtp_tls_resumed.clone(),
        );
        registry.register(
            "confirmations",
            "Target confirmation: mails sent and failed, confirmations accepted, through this node",
            m.confirmations.clone(),
        );
        registry.register(
            "smtp_drained",
            "SMTP connections turned away with 421 4.3.2 during maintenance",
            m.smtp_drained.clone(),
        );
        registry.register(
            "maintenance",
            "1 while this node drains (node or cluster-wide maintenance)",
            m.maintenance.clone(),
        );
        registry.register(
            "http_connections_active",
            "HTTP connections open on the public listener",
            m.http_connections_active.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections refused at the listener, by the cap that refused them (max_connections: the node is full; max_connections_per_ip: the client's address is)",
            m.http_connections_refused.clone(),
        );
        registry.register("raft_term", "Current Raft term", m.raft_term.clone());
        registry.register(
            "raft_commit_index",
            "Highest log index applied on this node (entries are applied as soon as they are committed)",
            m.raft_commit_index.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Highest log index in this node's log",
            m.raft_last_log_index.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 when this node is the Raft leader",
            m.raft_is_leader.clone(),
        );
        registry.register(
            "raft_leader_id",
            "Node id of the known leader, 0 when none",
            m.raft_leader_id.clone(),
        );
        registry.register(
            "raft_write_errors",
            "Raft writes that failed (no quorum, timeout)",
            m.raft_write_errors.clone(),
        );
        registry.register_with_unit(
            "raft_write_duration",
            "Time from proposing a write to its application",
            prometheus_client::registry::Unit::Seconds,
            m.raft_write_duration.clone(),
        );
        registry.register(
            "build_info",
            "Build information (always 1)",
            m.build_info.clone(),
        );
        registry.register(
            "runtime_workers",
            "Worker threads of the node's async runtime (worker_threads; when 0, tokio's CPU count or TOKIO_WORKER_THREADS)",
            m.runtime_workers.clone(),
        );
        registry.register(
            "raft_elections",
            "Elections this node started (terms in which it was a candidate)",
            m.raft_elections.clone(),
        );
        registry.register(
            "raft_forwarded_writes",
            "Writes this node forwarded to the leader",
            m.raft_forwarded_writes.clone(),
        );
        registry.register(
            "raft_forward_calls",
            "Forward calls to the leader (concurrent forwarded writes share one)",
            m.raft_forward_calls.clone(),
        );
        registry.register(
            "raft_replication_lag",
            "On the leader: log entries each peer is behind",
            m.raft_replication_lag.clone(),
        );
        registry.register(
            "cluster_rpc_errors",
            "Raft RPCs to a peer that failed",
            m.cluster_rpc_errors.clone(),
        );
        registry.register(
            "cluster_auth_failures",
            "Cluster RPCs refused for a missing or wrong secret",
            m.cluster_auth_failures.clone(),
        );
        registry.register_with_unit(
            "clock_offset",
            "Each peer's clock minus this node's (the leader's clock is replicated time)",
            prometheus_client::registry::Unit::Seconds,
            m.clock_offset.clone(),
        );
        registry.register(
            "cluster_peer_reachable",
            "1 while this node's liveness probes reach the peer, else 0",
            m.cluster_peer_reachable.clone(),
        );
        registry.register(
            "raft_triggered_elections",
            "Campaigns started at once because the leader was unreachable and a quorum heard no leader",
            m.raft_triggered_elections.clone(),
        );
        registry.register(
            "raft_refused_appends",
            "AppendEntries refused from a leader this node cannot reach (one-way partition)",
            m.raft_refused_appends.clone(),
        );
        registry.register(
            "relay_attempts",
            "Outbound delivery attempts per upstream and outcome",
            m.relay_attempts.clone(),
        );
        registry.register(
            "relay_skipped",
            "Messages that skipped a smarthost because its circuit breaker was open",
            m.relay_skipped.clone(),
        );
        registry.register(
            "relay_breaker_state",
            "Circuit breaker per smarthost: 0 closed, 1 open, 2 half-open",
            m.relay_breaker_state.clone(),
        );
        registry.register(
            "relay_breaker_opened",
            "Times a smarthost's circuit breaker opened",
            m.relay_breaker_opened.clone(),
        );
        registry.register(
            "relay_connections",
            "Connections opened to a smarthost",
            m.relay_connections.clone(),
        );
        registry.register(
            "relay_reused",
            "Messages a smarthost accepted on a connection kept open from an earlier message",
            m.relay_reused.clone(),
        );
        registry.register(
            "relay_stale",
            "Idle smarthost connections found closed by the smarthost when taken; the message went over a fresh connection",
            m.relay_stale.clone(),
        );
        registry.register(
            "relay_idle",
            "Idle connections kept open per smarthost",
            m.relay_idle.clone(),
        );
        registry.register(
            "raft_read_quorum_rounds",
            "Read barriers this node confirmed as leader with a quorum round (each renews the read lease)",
            m.raft_read_quorum_rounds.clone(),
        );
        registry.register(
            "raft_lease_reads",
            "Read barriers this node served as leader from its read lease, without a quorum round",
            m.raft_lease_reads.clone(),
        );
        registry.register(
            "raft_follower_lease_reads",
            "Reads (or read barriers) this node served as follower or learner from its follower lease, without a ReadIndex call",
            m.raft_follower_lease_reads.clone(),
        );
        registry.register(
            "raft_follower_leases_granted",
            "Follower read leases this node granted as leader with a ReadIndex answer",
            m.raft_follower_leases_granted.clone(),
        );
        registry.register(
            "raft_lease_holds",
            "Applies this node held as leader until every follower lease holder had persisted the entries (writes are answered after their apply)",
            m.raft_lease_holds.clone(),
        );
        registry.register_with_unit(
            "raft_lease_hold_duration",
            "How long each held apply waited for follower lease holders",
            prometheus_client::registry::Unit::Seconds,
            m.raft_lease_hold_duration.clone(),
        );
        registry.register(
            "http_read_barriers",
            "Read barriers run for HTTP status reads; concurrent reads share one",
            m.http_read_barriers.clone(),
        );
        registry.register(
            "readiness_checks",
            "Readiness checks run for /readyz; probes within the cache age reuse the last verdict",
            m.readiness_checks.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        // Series of known label values exist from the start at 0, so a
        // dashboard or alert sees "none yet" rather than "no data", and the
        // first event shows as an increase.
        for limit in [
            RefusedLimit::max_connections,
            RefusedLimit::max_connections_per_ip,
        ] {
            let _ = m
                .http_connections_refused
                .get_or_create(&RefusedLabels { limit });
        }
        for event in [
            ConfirmEvent::mail_sent,
            ConfirmEvent::mail_failed,
            ConfirmEvent::confirmed,
        ] {
            let _ = m.confirmations.get_or_create(&ConfirmLabels { event });
        }
        Self { registry, ..m }
    }

    /// The registry in OpenMetrics text format (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The registry in the classic Prometheus text format (version 0.0.4), for
    /// clients that do not ask for OpenMetrics, such as `promtool check metrics`
    /// or a human with curl.
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

/// Converts OpenMetrics text to the classic format: counter families are named
/// with their `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT`/`# EOF` go.
fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_with_total() {
        let m = Metrics::new();
        m.smtp_sessions.inc();
        let text = m.encode_classic();
        assert!(
            text.contains("# TYPE tempalias_smtp_sessions_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP tempalias_smtp_sessions_total "),
            "{text}"
        );
        assert!(text.contains("tempalias_smtp_sessions_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE tempalias_raft_term gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        assert!(m.encode().ends_with("# EOF\n"));
    }

    #[test]
    fn labelled_refusals_and_confirmations_start_at_zero() {
        let m = Metrics::new();
        let text = m.encode_classic();
        for series in [
            r#"tempalias_http_connections_refused_total{limit="max_connections"} 0"#,
            r#"tempalias_http_connections_refused_total{limit="max_connections_per_ip"} 0"#,
            r#"tempalias_confirmations_total{event="mail_sent"} 0"#,
            r#"tempalias_confirmations_total{event="mail_failed"} 0"#,
            r#"tempalias_confirmations_total{event="confirmed"} 0"#,
        ] {
            assert!(text.contains(&format!("{series}\n")), "{series} in {text}");
        }
    }
}
