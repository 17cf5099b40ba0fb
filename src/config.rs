//! Node configuration: one TOML file, every key overridable from the environment.
//!
//! Loading is layered: built-in defaults (a complete zero-config single node on
//! loopback), then the file, then `TEMPALIAS_<SECTION>_<KEY>` variables (and
//! `TEMPALIAS_<KEY>` for top-level keys). Unknown keys are errors in both the file
//! and the environment, because a misspelt key silently falling back to a default
//! is the classic way to run a mail server with the wrong limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment prefix for overrides.
pub const ENV_PREFIX: &str = "TEMPALIAS_";

mod diagnose;
mod smarthost;

pub use diagnose::{env_var, Origin, Problem};
pub use smarthost::{ReuseOverrides, Smarthost, SmarthostUrl, TlsMode};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// One key is wrong (used where a single value is checked on its own).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// Everything wrong with the file and the environment, each with its place.
    #[error("{}", problem_list(.0))]
    Problems(Vec<Problem>),
}

fn problem_list(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut s = format!("{} problems in the configuration:", many.len());
            for p in many {
                s.push_str("\n  ");
                s.push_str(&p.to_string());
            }
            s
        }
    }
}

impl ConfigError {
    fn from_problems(problems: Vec<Problem>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Problems(problems))
        }
    }

    /// The problems this error stands for (one for the single-key variants).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Problems(p) => p.clone(),
            ConfigError::Invalid { key, message } => vec![Problem {
                origin: Origin::Default,
                key: key.clone(),
                message: message.clone(),
            }],
            ConfigError::Read { path, error } => vec![Problem {
                origin: Origin::Default,
                key: String::new(),
                message: format!("cannot read {}: {error}", path.display()),
            }],
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Upper bound on `worker_threads`: far above any useful value, low enough
/// that a typo (an extra digit or three) is refused, not obeyed.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's Raft id; unique in the cluster and never reused.
    pub node_id: u64,
    /// Where the node keeps its database (Raft log, vote, state machine, snapshots).
    pub data_dir: PathBuf,
    /// Alias domains this cluster answers for; the first is used for new aliases.
    pub domains: Vec<String>,
    /// Threads of the node's async runtime; 0: one per CPU (tokio's default,
    /// which also reads `TOKIO_WORKER_THREADS`). For a node that shares its
    /// machine: three nodes on two CPUs spent 4-18 % less CPU per message
    /// with one thread each (docs/benchmarks.md), as fewer threads contend
    /// for the same cores. Storage writes run on tokio's blocking
    /// pool either way.
    pub worker_threads: usize,
    pub http: HttpConfig,
    pub smtp: SmtpConfig,
    pub relay: RelayConfig,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    pub maintenance: MaintenanceConfig,
    pub ratelimit: RateLimitConfig,
    pub log: LogConfig,
    pub srs: SrsConfig,
    pub dkim: DkimConfig,
    pub arc: ArcConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("./tempalias-data"),
            domains: vec!["tempalias.test".to_string()],
            worker_threads: 0,
            http: HttpConfig::default(),
            smtp: SmtpConfig::default(),
            relay: RelayConfig::default(),
            limits: LimitsConfig::default(),
            cluster: ClusterConfig::default(),
            maintenance: MaintenanceConfig::default(),
            ratelimit: RateLimitConfig::default(),
            log: LogConfig::default(),
            srs: SrsConfig::default(),
            dkim: DkimConfig::default(),
            arc: ArcConfig::default(),
        }
    }
}

/// The public HTTP API listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    /// Upper bound on one request, so a slow client cannot hold a worker forever.
    pub request_timeout_secs: u64,
    /// Requests served at once; beyond that the node sheds load with `503`.
    pub max_concurrent_requests: usize,
    /// Open connections; beyond that a new connection gets a fast `503`.
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64), so one
    /// client cannot hold every slot of `max_connections`; `trusted_proxies`
    /// are exempt (a proxy carries many clients). 0 turns the cap off.
    pub max_connections_per_ip: usize,
    /// A client must send a complete request head within this time.
    pub header_read_timeout_secs: u64,
    /// A connection that moves no byte for this long is closed.
    pub keepalive_idle_secs: u64,
    /// Reverse proxies (CIDR or addresses) whose `Forwarded` and
    /// `X-Forwarded-For` headers name the client; from anyone else those
    /// headers are ignored, since any client can send them.
    pub trusted_proxies: Vec<String>,
    /// The address users reach the API at (`https://tempalias.example`), for
    /// links this node mails (target confirmation). Empty: `http://` and the
    /// address this node's HTTP listener is bound to, which only suits a
    /// node on the user's own machine.
    pub public_url: String,
}

impl HttpConfig {
    /// The parsed `trusted_proxies`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first entry that is not a network.
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        parse_nets("http.trusted_proxies", &self.trusted_proxies)
    }
}

/// Per-client token buckets on the HTTP API (per node).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Buckets kept per policy, whatever the number of client addresses.
    pub max_clients: usize,
    /// Alias creations: `create_quota` per `create_window_secs`.
    pub create_quota: u32,
    pub create_window_secs: u64,
    /// Status reads and revokes of one alias.
    pub status_quota: u32,
    pub status_window_secs: u64,
    /// Lookups answered `404` (unknown id or wrong token).
    pub failed_quota: u32,
    pub failed_window_secs: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_clients: 100_000,
            create_quota: 10,
            create_window_secs: 300,
            status_quota: 120,
            status_window_secs: 60,
            failed_quota: 10,
            failed_window_secs: 60,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_string(),
            request_timeout_secs: 10,
            max_concurrent_requests: 512,
            max_connections: 4096,
            max_connections_per_ip: 128,
            header_read_timeout_secs: 10,
            keepalive_idle_secs: 60,
            trusted_proxies: Vec::new(),
            public_url: String::new(),
        }
    }
}

/// The inbound SMTP listener and per-session limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: String,
    /// Name used in the greeting, EHLO reply and `Received:` header.
    pub hostname: String,
    /// Largest message accepted, in bytes; advertised as SIZE.
    pub max_message_size: u64,
    /// Concurrent sessions; a permit is taken before `accept()`.
    pub max_connections: usize,
    /// Concurrent sessions from one client address (IPv6: one /64).
    pub max_connections_per_ip: usize,
    /// Longest time a transaction may hold reservations while waiting for
    /// commands (from its first accepted RCPT until DATA); a client idling in
    /// between is cut off so it cannot keep an alias busy. Message data itself
    /// is bounded by the idle and session timeouts.
    pub transaction_timeout_secs: u64,
    /// Longest wait for the next command or data chunk (RFC 5321 asks for >= 5 min).
    pub idle_timeout_secs: u64,
    /// Upper bound on a whole session, so a trickling client cannot stay forever.
    pub session_timeout_secs: u64,
    /// Failed recipients after which the session is closed with `421`.
    pub max_failed_rcpts: u32,
    /// Extra delay per failed recipient beyond the first (tarpit against enumeration).
    pub failed_rcpt_delay_ms: u64,
    /// Failed recipients one client address may cause per window, across all its
    /// sessions; beyond that its recipients get `450 4.7.1` until the window ends.
    pub max_failed_rcpts_per_ip: u32,
    /// Length of that window.
    pub failed_rcpt_window_secs: u64,
    /// Recipients accepted in one transaction.
    pub max_recipients: usize,
    /// `Received:` headers after which a message is refused as a loop.
    pub max_hops: usize,
    /// Sub-addressing, as Postfix's `recipient_delimiter`: `id+tag@domain`
    /// is the alias `id`, so users can tag what they hand out and filter on
    /// it. Each character is a delimiter; empty turns it off.
    pub recipient_delimiter: String,
    /// Where mail to `postmaster` and `postmaster@<alias domain>` goes
    /// (RFC 5321 4.5.1 requires accepting it); must not be an alias address.
    pub postmaster: String,
    /// PEM certificate chain for STARTTLS and `tls_listen`; empty for none.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Without `tls_cert_file`, make a self-signed certificate for
    /// `hostname` in the data directory (MX-to-MX TLS is opportunistic and
    /// senders do not check it, so even that keeps mail from being read on
    /// the wire). `false` and no file: STARTTLS is not offered.
    pub tls_self_signed: bool,
    /// Optional second listener that speaks TLS from the first byte
    /// (implicit TLS, as on port 465); empty for none.
    pub tls_listen: String,
    /// Refuse MAIL until the client has started TLS. Off by default: a
    /// public MX must accept plaintext from senders without TLS.
    pub require_tls: bool,
    /// Answer `250` as soon as the upstream accepted, and write the Commit
    /// of the message's uses after it (tracked, retried until the lease
    /// ends, awaited by shutdown). Faster (the sessions no longer wait for
    /// the second Raft write, and more commits share one entry) at a named
    /// risk: a crash between the `250` and the Commit releases the use when
    /// its lease ends, so the alias may forward one message more than its
    /// limit per Commit then pending, and the API shows the use a moment
    /// after the `250`. Off: the Commit is on a quorum's disks before the
    /// `250`.
    pub reply_before_commit: bool,
    /// Lowest TLS version offered: `"1.2"` or `"1.3"`.
    pub tls_min_version: String,
    /// Cipher suites offered, by their rustls names; empty for the rustls defaults.
    pub tls_cipher_suites: Vec<String>,
    /// Longest time a TLS handshake may take.
    pub tls_handshake_timeout_secs: u64,
    /// Resume TLS sessions from stateless tickets (keys in memory, rotated
    /// by rustls every 6 hours), so a sender that comes back skips the key
    /// exchange and certificate signature. Off: resumption only from a
    /// small in-memory session cache, for operators who want no ticket key
    /// that could decrypt past sessions if the process memory leaked.
    pub tls_session_tickets: bool,
    /// Client networks (CIDR or single addresses) exempt from the per-address
    /// caps (`max_connections_per_ip`, `max_failed_rcpts_per_ip`): an own
    /// relay or a load generator that legitimately opens many sessions from
    /// one address. Empty by default: every client is capped.
    pub trusted_networks: Vec<String>,
}

impl SmtpConfig {
    /// The parsed `trusted_networks`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first entry that is not a network.
    pub fn trusted_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        parse_nets("smtp.trusted_networks", &self.trusted_networks)
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:2525".to_string(),
            hostname: "mx1.tempalias.test".to_string(),
            max_message_size: 26_214_400,
            max_connections: 1000,
            max_connections_per_ip: 20,
            transaction_timeout_secs: 600,
            idle_timeout_secs: 300,
            session_timeout_secs: 1800,
            max_failed_rcpts: 10,
            failed_rcpt_delay_ms: 500,
            max_failed_rcpts_per_ip: 100,
            failed_rcpt_window_secs: 600,
            max_recipients: 50,
            max_hops: 50,
            recipient_delimiter: "+".to_string(),
            postmaster: "postmaster@localhost".to_string(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_self_signed: true,
            tls_listen: String::new(),
            require_tls: false,
            reply_before_commit: false,
            tls_min_version: "1.2".to_string(),
            tls_cipher_suites: Vec::new(),
            tls_handshake_timeout_secs: 30,
            tls_session_tickets: true,
            trusted_networks: Vec::new(),
        }
    }
}

/// How forwarded mail leaves the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Write each forwarded message to `capture_dir` (development and demos).
    Capture,
    /// Hand each message to the first smarthost that answers.
    Smarthost,
    /// Deliver directly to the MX hosts of each target's domain.
    Mx,
}

/// Outbound delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub mode: RelayMode,
    pub capture_dir: PathBuf,
    /// Smarthosts, tried in order: URL strings or tables with a URL and the
    /// smarthost's own AUTH settings (see [`Smarthost`]); parsed here so a
    /// bad one is reported with its file line.
    pub smarthosts: Vec<Smarthost>,
    /// Upper bound on one upstream attempt (connect to final reply).
    pub timeout_secs: u64,
    /// Upper bound on all attempts for one message together, failover and
    /// backoff included. Below the 10 minutes a sender waits for the reply to
    /// its end of data (RFC 5321 4.5.3.2.6), so it hears `451` from us
    /// instead of timing out and retrying while we may still deliver.
    pub delivery_timeout_secs: u64,
    /// Attempts per message over all smarthosts (a skipped smarthost with an
    /// open circuit breaker is not an attempt).
    pub max_attempts: u32,
    /// Backoff between rounds over the smarthost list: a random pause in
    /// [0, min(backoff_max_ms, backoff_base_ms * 2^round)] (full jitter).
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Consecutive failed attempts after which a smarthost's circuit breaker
    /// opens and messages skip it.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before one probe message may try
    /// the smarthost again.
    pub breaker_cooldown_secs: u64,
    /// Keep connections to smarthosts open between messages (Postfix's
    /// connection cache): a later message skips connect, TLS, EHLO and
    /// AUTH. Only smarthost mode; MX delivery always connects afresh.
    pub reuse_connections: bool,
    /// Most idle connections kept per smarthost; beyond it the oldest idle
    /// one is closed.
    pub reuse_max_idle: u32,
    /// How long a connection may sit idle before it is closed: short, so
    /// that the smarthost is not left holding connections nobody uses and
    /// rarely closes one first.
    pub reuse_idle_secs: u64,
    /// Messages one connection carries before it is closed.
    pub reuse_max_messages: u32,
    /// Age after which a connection is no longer reused (a changed DNS
    /// record or certificate is picked up within this time).
    pub reuse_max_age_secs: u64,
    /// PEM file of extra CA certificates trusted for smarthost certificates
    /// (a private CA); the public web roots stay trusted too.
    pub ca_file: Option<PathBuf>,
    /// AUTH password for smarthosts that name a user and no `password_file`
    /// of their own; prefer `password_file` (or `TEMPALIAS_RELAY_PASSWORD`)
    /// to keep it out of files.
    pub password: Option<Secret>,
    /// File holding that default AUTH password (first line, surrounding
    /// blanks trimmed).
    pub password_file: Option<PathBuf>,
    /// DNS servers (`IP` or `IP:port`) for `mode = "mx"`; empty uses the
    /// system's resolv.conf. Set it to a local validating resolver, or to a
    /// test zone's server.
    pub dns_servers: Vec<String>,
    /// TCP port of MX hosts (25 everywhere on the Internet; other values are
    /// for labs and port-redirecting gateways).
    pub mx_port: u16,
    /// How long a reserved use stays held if the node holding it dies; must exceed
    /// the longest a transaction can take between RCPT and the upstream reply.
    pub reservation_lease_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            mode: RelayMode::Capture,
            capture_dir: PathBuf::from("./tempalias-data/outbox"),
            smarthosts: vec![Smarthost::new(SmarthostUrl {
                tls: TlsMode::Opportunistic,
                user: None,
                host: "127.0.0.1".to_string(),
                port: 2526,
            })],
            timeout_secs: 60,
            delivery_timeout_secs: 120,
            max_attempts: 4,
            backoff_base_ms: 200,
            backoff_max_ms: 5000,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
            reuse_connections: true,
            reuse_max_idle: 16,
            reuse_idle_secs: 2,
            reuse_max_messages: 100,
            reuse_max_age_secs: 300,
            ca_file: None,
            password: None,
            password_file: None,
            dns_servers: Vec::new(),
            mx_port: 25,
            reservation_lease_secs: 2400,
        }
    }
}

/// The connection-reuse bounds that hold for one smarthost: its entry's
/// own `reuse_*` keys, else the relay-wide ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    pub connections: bool,
    pub max_idle: u32,
    pub idle_secs: u64,
    pub max_messages: u32,
    pub max_age_secs: u64,
}

impl RelayConfig {
    /// The reuse bounds of `host`: each `reuse_*` key its entry sets,
    /// else `relay.reuse_*`.
    pub fn reuse_for(&self, host: &Smarthost) -> Reuse {
        let own = &host.reuse;
        Reuse {
            connections: own.reuse_connections.unwrap_or(self.reuse_connections),
            max_idle: own.reuse_max_idle.unwrap_or(self.reuse_max_idle),
            idle_secs: own.reuse_idle_secs.unwrap_or(self.reuse_idle_secs),
            max_messages: own.reuse_max_messages.unwrap_or(self.reuse_max_messages),
            max_age_secs: own.reuse_max_age_secs.unwrap_or(self.reuse_max_age_secs),
        }
    }

    /// The checks of `relay.reuse_*` for each entry that sets any of them
    /// and keeps connections, on the values that hold for it, reported
    /// under `relay.smarthosts` with the entry's URL. A relay-wide value
    /// it inherits is named as such, and not reported again when the
    /// relay-wide check already did (reuse on there).
    fn entry_reuse_problems(&self, out: &mut Checks) {
        for host in &self.smarthosts {
            let own = &host.reuse;
            let reuse = self.reuse_for(host);
            if own.is_empty() || !reuse.connections {
                continue;
            }
            let url = &host.url;
            let mut report = |key: &str, set_here: bool, message: &str| {
                if set_here {
                    out.push("relay.smarthosts", format!("{url}: {key} {message}"));
                } else if !self.reuse_connections {
                    out.push(
                        "relay.smarthosts",
                        format!("{url}: {key} {message} (the value of relay.{key})"),
                    );
                }
            };
            for (key, set_here, value) in [
                (
                    "reuse_max_idle",
                    own.reuse_max_idle.is_some(),
                    u64::from(reuse.max_idle),
                ),
                (
                    "reuse_idle_secs",
                    own.reuse_idle_secs.is_some(),
                    reuse.idle_secs,
                ),
                (
                    "reuse_max_messages",
                    own.reuse_max_messages.is_some(),
                    u64::from(reuse.max_messages),
                ),
                (
                    "reuse_max_age_secs",
                    own.reuse_max_age_secs.is_some(),
                    reuse.max_age_secs,
                ),
            ] {
                if value == 0 {
                    report(key, set_here, "must be greater than zero");
                }
            }
            if reuse.idle_secs > reuse.max_age_secs {
                report(
                    "reuse_idle_secs",
                    own.reuse_idle_secs.is_some() || own.reuse_max_age_secs.is_some(),
                    &format!(
                        "({}) must not exceed reuse_max_age_secs ({})",
                        reuse.idle_secs, reuse.max_age_secs
                    ),
                );
            }
        }
    }

    /// The default AUTH password (for smarthosts without a `password_file` of
    /// their own), if one is configured.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `password_file` cannot be read.
    pub fn smarthost_password(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        match &self.password_file {
            Some(path) => read_secret_file(path)
                .map(Some)
                .map_err(|e| invalid("relay.password_file", e)),
            None => Ok(None),
        }
    }

    /// The AUTH password of `host`: from its own `password_file`, else the
    /// default ([`RelayConfig::smarthost_password`]).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the file that cannot be read.
    pub fn password_for(&self, host: &Smarthost) -> Result<Option<Secret>, ConfigError> {
        match &host.password_file {
            Some(path) => read_secret_file(path).map(Some).map_err(|e| {
                invalid(
                    "relay.smarthosts",
                    format!("{}: password_file: {e}", host.url),
                )
            }),
            None => self.smarthost_password(),
        }
    }

    /// The `dns_servers` as socket addresses (port 53 when not given).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first entry that is not an address.
    pub fn dns_server_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.dns_servers
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| {
                        s.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| {
                        invalid(
                            "relay.dns_servers",
                            format!("{s:?} is not an IP address or IP:port"),
                        )
                    })
            })
            .collect()
    }

    /// Checks of the relay section, as `(key, reason)` pairs.
    fn problems(&self, out: &mut Checks) {
        if self.mode == RelayMode::Smarthost && self.smarthosts.is_empty() {
            out.push(
                "relay.smarthosts",
                "at least one smarthost is required when relay.mode = \"smarthost\"",
            );
        }
        out.positive("relay.timeout_secs", self.timeout_secs);
        out.positive("relay.delivery_timeout_secs", self.delivery_timeout_secs);
        if self.delivery_timeout_secs >= 600 {
            out.push(
                "relay.delivery_timeout_secs",
                "must be under 600: a sender waits 10 minutes for the reply to its end of data (RFC 5321 4.5.3.2.6), and must hear 451 before it gives up",
            );
        }
        if self.timeout_secs > self.delivery_timeout_secs {
            out.push(
                "relay.timeout_secs",
                "must not exceed relay.delivery_timeout_secs (the budget of all attempts together)",
            );
        }
        out.positive("relay.max_attempts", self.max_attempts as u64);
        out.positive("relay.backoff_base_ms", self.backoff_base_ms);
        if self.backoff_max_ms < self.backoff_base_ms {
            out.push(
                "relay.backoff_max_ms",
                "must be at least relay.backoff_base_ms",
            );
        }
        out.positive("relay.breaker_failures", self.breaker_failures as u64);
        out.positive("relay.breaker_cooldown_secs", self.breaker_cooldown_secs);
        out.positive("relay.mx_port", self.mx_port as u64);
        if self.reuse_connections {
            out.positive("relay.reuse_max_idle", self.reuse_max_idle as u64);
            out.positive("relay.reuse_idle_secs", self.reuse_idle_secs);
            out.positive("relay.reuse_max_messages", self.reuse_max_messages as u64);
            out.positive("relay.reuse_max_age_secs", self.reuse_max_age_secs);
            if self.reuse_idle_secs > self.reuse_max_age_secs {
                out.push(
                    "relay.reuse_idle_secs",
                    "must not exceed relay.reuse_max_age_secs",
                );
            }
        }
        self.entry_reuse_problems(out);
        if let Err(ConfigError::Invalid { key, message }) = self.dns_server_addrs() {
            out.push(&key, message);
        }
        if let Some(path) = &self.ca_file {
            match std::fs::read(path) {
                Err(e) => out.push(
                    "relay.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                ),
                Ok(pem) if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => out
                    .push(
                        "relay.ca_file",
                        format!("{} holds no PEM certificate", path.display()),
                    ),
                Ok(_) => {}
            }
        }
        if self.password.is_some() && self.password_file.is_some() {
            out.push(
                "relay.password",
                "set either relay.password or relay.password_file, not both",
            );
        }
        let has_default = match self.smarthost_password() {
            Ok(p) => p.is_some(),
            Err(e) => {
                out.push("relay.password_file", e.to_string());
                true
            }
        };
        let mut uses_default = false;
        for host in &self.smarthosts {
            let url = &host.url;
            if let Some(path) = &host.password_file {
                if url.user.is_none() {
                    out.push(
                        "relay.smarthosts",
                        format!(
                            "{url}: password_file is set but no user is named (add user = \"...\" or write smtps://user@host)"
                        ),
                    );
                }
                if let Err(e) = read_secret_file(path) {
                    out.push("relay.smarthosts", format!("{url}: password_file: {e}"));
                }
            }
            if url.user.is_none() {
                continue;
            }
            if url.tls == TlsMode::Opportunistic {
                out.push(
                    "relay.smarthosts",
                    format!(
                        "{url}: AUTH needs smtp+starttls:// or smtps:// (a password is never sent over a connection that may be plaintext or unverified)"
                    ),
                );
            }
            if host.password_file.is_none() {
                uses_default = true;
                if !has_default {
                    out.push(
                        "relay.smarthosts",
                        format!("{url} names a user, but has no password_file of its own and neither relay.password_file nor relay.password is set"),
                    );
                }
            }
        }
        if has_default && !uses_default && self.mode == RelayMode::Smarthost {
            out.push(
                "relay.password",
                "a default password is set but no smarthost uses it (none names a user without a password_file of its own)",
            );
        }
    }

    /// The longest one message can spend in the relay.
    pub fn longest_delivery_secs(&self) -> u64 {
        self.delivery_timeout_secs
    }
}

/// Caps on what a client may ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_days: u32,
    pub max_usage: u32,
    /// Days an expired alias is kept (and shown as expired) before it is deleted.
    pub keep_expired_days: u32,
    /// Aliases to a target that has not confirmed within `confirm_valid_days`
    /// refuse mail until the target follows a link mailed to it once, so the
    /// service cannot be used to send mail to people who never asked for it.
    /// Off by default (a zero-config node has no public URL to link to).
    pub confirm_targets: bool,
    /// How long a target's confirmation lets new aliases to it forward at once.
    pub confirm_valid_days: u32,
    /// Most live aliases (not expired, revoked or used up) one target address
    /// may have; 0 = no cap.
    pub max_aliases_per_target: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_days: 60,
            max_usage: 100,
            keep_expired_days: 7,
            confirm_targets: false,
            confirm_valid_days: 30,
            max_aliases_per_target: 0,
        }
    }
}

/// Raft membership and the node-to-node listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub listen: String,
    /// Node id (as a string key, TOML requires it) to cluster address.
    pub initial_members: BTreeMap<String, String>,
    /// Build a snapshot (and compact the log) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// redb's page cache in MiB. redb defaults to 1 GiB, which a node with
    /// many aliases fills; beyond the cache, pages come from the OS page cache,
    /// which the process's memory does not count.
    pub store_cache_mb: u64,
    /// Upper bound on one Raft write as seen by a client (reserve, create, ...).
    pub write_timeout_ms: u64,
    /// Shared secret every cluster RPC must carry. Required when the cluster has
    /// more than one member; prefer `secret_file` so it stays out of the config.
    pub secret: Option<Secret>,
    /// File holding the shared secret (first line, surrounding blanks trimmed).
    pub secret_file: Option<PathBuf>,
    /// Upper bound on one node-to-node RPC.
    pub rpc_timeout_ms: u64,
    /// Leader heartbeat interval, and how often each node probes its peers.
    pub heartbeat_ms: u64,
    /// The leader lease is twice this; a follower that hears no leader for
    /// the lease plus a random time in [election_timeout_ms,
    /// 2 * election_timeout_ms] starts an election (sooner when the failure
    /// detector sees the leader gone). Also the deadline of one probe.
    pub election_timeout_ms: u64,
    /// Followers and learners serve linearizable reads from their own
    /// replica under a lease from the leader, which then makes no write
    /// visible before every lease holder has it (`raft/follower_lease.rs`).
    /// Off: every follower read asks the leader for its read index, and a
    /// node neither asks for nor grants leases.
    pub follower_read_leases: bool,
}

/// A secret that never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call only where it is sent or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7001".to_string(),
            initial_members: BTreeMap::from([("1".to_string(), "127.0.0.1:7001".to_string())]),
            snapshot_after_entries: 100_000,
            store_cache_mb: 64,
            write_timeout_ms: 5000,
            secret: None,
            secret_file: None,
            rpc_timeout_ms: 2000,
            heartbeat_ms: 80,
            election_timeout_ms: 250,
            follower_read_leases: true,
        }
    }
}

/// What a drained node still lets through (see `tempalias maintenance`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Client networks (CIDR, or single addresses) that still reach the HTTP
    /// API while the node drains, so operators can check it before turning
    /// maintenance off.
    pub allow: Vec<String>,
    /// `Retry-After` of the maintenance `503`, in seconds.
    pub retry_after_secs: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            retry_after_secs: 120,
        }
    }
}

impl MaintenanceConfig {
    /// The parsed `allow` networks.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first entry that is not a network.
    pub fn allow_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        parse_nets("maintenance.allow", &self.allow)
    }
}

/// Parses CIDR networks; a bare address is its own /32 or /128.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `key` and the entry that does not parse.
pub fn parse_nets(key: &str, entries: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    entries
        .iter()
        .map(|e| {
            let e = e.trim();
            e.parse::<ipnet::IpNet>()
                .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| invalid(key, format!("{e:?} is not an address or CIDR network")))
        })
        .collect()
}

/// Sender Rewriting Scheme for forwarded mail (see docs/architecture.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SrsConfig {
    /// The secret the SRS key is derived from; every node must have the same.
    /// Unset: derived from the cluster secret, which every node shares already.
    pub secret: Option<Secret>,
    /// File holding the SRS secret (first line), instead of `secret`.
    pub secret_file: Option<PathBuf>,
    /// Earlier secrets (SRS or cluster secrets the key was derived from),
    /// still accepted when reversing a bounce: keep one here for `max_age_days`
    /// after a rotation.
    pub previous_secrets: Vec<Secret>,
    /// Days a rewritten sender can be bounced to (libsrs2's default: 21).
    pub max_age_days: u32,
    /// Bounces reversed per SRS address and node within a day; 0 = no cap.
    /// A real bounce comes once per failed delivery, so a few suffice; the
    /// cap keeps an SRS address from being a way to mail its sender at will.
    pub max_bounces_per_address: u32,
}

impl Default for SrsConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            previous_secrets: Vec::new(),
            max_age_days: 21,
            max_bounces_per_address: 3,
        }
    }
}

/// The signature algorithm of a DKIM key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    /// RSA (2048 bits from `dkim keygen`) with SHA-256: checked by every receiver.
    #[default]
    Rsa,
    /// Ed25519 with SHA-256 (RFC 8463): short keys, not checked everywhere yet.
    Ed25519,
}

/// DKIM signing of forwarded mail.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// The keys of the alias domains, one `[[dkim.keys]]` entry each; a
    /// domain may have several (one signature each, RSA first), a domain
    /// without one is not signed.
    pub keys: Vec<DkimKey>,
}

/// One DKIM key of an alias domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKey {
    /// The alias domain (`d=`); one of `domains`.
    pub domain: String,
    /// The selector (`s=`): the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key written by `tempalias dkim keygen` (the same on every node).
    pub key_file: PathBuf,
    /// `rsa` or `ed25519`; read from the key file when not given, and must
    /// match it when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<DkimAlgorithm>,
}

/// ARC sealing of forwarded mail (with the alias domain's DKIM key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArcConfig {
    /// Seal forwarded mail of domains that have a DKIM key.
    pub enabled: bool,
    /// DNS servers (`IP` or `IP:port`) for evaluating SPF, DKIM and DMARC of
    /// incoming mail; empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<String>,
    /// Upper bound on one DNS query.
    pub dns_timeout_ms: u64,
    /// Upper bound on the whole evaluation of one message; past it the message
    /// is forwarded signed but without an ARC set.
    pub timeout_ms: u64,
}

impl Default for ArcConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dns_servers: Vec::new(),
            dns_timeout_ms: 2000,
            timeout_ms: 5000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (one object per line).
    pub format: String,
    /// A tracing filter such as `info` or `tempalias=debug,openraft=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".to_string(),
            level: "info,openraft=warn".to_string(),
        }
    }
}

impl Config {
    /// Loads the configuration: defaults, then `path` (if any), then the environment.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem found, each naming the file
    /// line or environment variable and the key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment passed in (for tests).
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let schema = diagnose::Schema::new();
        let mut settings = Vec::new();
        let mut problems = Vec::new();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: path.to_path_buf(),
                error,
            })?;
            let (s, p) = diagnose::read_file(path, &text, &schema);
            settings.extend(s);
            problems.extend(p);
        }
        let (s, p) = diagnose::read_env(env, &schema);
        settings.extend(s);
        problems.extend(p);

        // Each value on its own over the defaults, so that every mistyped
        // value is reported (serde stops at the first) and names its origin.
        let defaults =
            toml::Table::try_from(Config::default()).map_err(|e| invalid("", e.to_string()))?;
        let mut table = defaults.clone();
        let mut origins: BTreeMap<String, Origin> = BTreeMap::new();
        for setting in settings {
            let mut alone = defaults.clone();
            diagnose::set(&mut alone, &setting.key, setting.value.clone());
            match Config::deserialize(alone) {
                Ok(_) => {
                    diagnose::set(&mut table, &setting.key, setting.value);
                    origins.insert(setting.key, setting.origin);
                }
                Err(e) => problems.push(Problem {
                    origin: setting.origin,
                    key: setting.key,
                    message: diagnose::type_error(&e),
                }),
            }
        }
        let config = match Config::deserialize(table) {
            Ok(c) => c,
            Err(e) => {
                problems.push(Problem {
                    origin: Origin::Default,
                    key: String::new(),
                    message: diagnose::type_error(&e),
                });
                return Err(ConfigError::Problems(problems));
            }
        };
        for (key, message) in config.problems() {
            let origin = origins.get(&key).cloned().unwrap_or(Origin::Default);
            problems.push(Problem {
                origin,
                key,
                message,
            });
        }
        // File lines in order, then the environment, then the rest.
        problems.sort_by_key(|p| match &p.origin {
            Origin::File { line, .. } => (0, *line),
            Origin::Env(_) => (1, 0),
            Origin::Default => (2, 0),
        });
        ConfigError::from_problems(problems)?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// [`ConfigError::Problems`] with every dotted key and its reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems: Vec<Problem> = self
            .problems()
            .into_iter()
            .map(|(key, message)| Problem {
                origin: Origin::Default,
                key,
                message,
            })
            .collect();
        ConfigError::from_problems(problems)
    }

    /// The `[smtp]` TLS keys and `postmaster`.
    fn tls_problems(&self, out: &mut Checks) {
        let smtp = &self.smtp;
        if !smtp.tls_listen.is_empty() {
            out.listen("smtp.tls_listen", &smtp.tls_listen);
            if smtp.tls_cert_file.is_empty() && !smtp.tls_self_signed {
                out.push(
                    "smtp.tls_listen",
                    "needs a certificate: set smtp.tls_cert_file or smtp.tls_self_signed",
                );
            }
        }
        if smtp.tls_cert_file.is_empty() != smtp.tls_key_file.is_empty() {
            out.push(
                "smtp.tls_key_file",
                "smtp.tls_cert_file and smtp.tls_key_file go together",
            );
        }
        if smtp.require_tls && smtp.tls_cert_file.is_empty() && !smtp.tls_self_signed {
            out.push(
                "smtp.require_tls",
                "needs a certificate: set smtp.tls_cert_file or smtp.tls_self_signed",
            );
        }
        if !["1.2", "1.3"].contains(&smtp.tls_min_version.as_str()) {
            out.push(
                "smtp.tls_min_version",
                format!("{:?}: must be \"1.2\" or \"1.3\"", smtp.tls_min_version),
            );
        }
        let known = crate::smtp::tls::known_cipher_suites();
        for name in &smtp.tls_cipher_suites {
            if !known.iter().any(|k| k.eq_ignore_ascii_case(name)) {
                out.push(
                    "smtp.tls_cipher_suites",
                    format!("unknown suite {name:?}; known: {}", known.join(", ")),
                );
            }
        }
        out.positive(
            "smtp.tls_handshake_timeout_secs",
            smtp.tls_handshake_timeout_secs,
        );
        match smtp.postmaster.rsplit_once('@') {
            Some((local, domain))
                if !local.is_empty() && smtp.postmaster.parse::<lettre::Address>().is_ok() =>
            {
                if self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
                    out.push(
                        "smtp.postmaster",
                        "must not be in an alias domain (mail to it would loop)",
                    );
                }
            }
            _ => out.push(
                "smtp.postmaster",
                format!("{:?} is not a mail address", smtp.postmaster),
            ),
        }
    }

    /// Every value that parses but cannot work, as `(dotted key, reason)`
    /// pairs: all of them, so one `check-config` run shows everything to fix.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Checks::default();
        if self.node_id == 0 {
            out.push("node_id", "must be a positive integer");
        }
        if self.domains.is_empty() {
            out.push("domains", "at least one alias domain is required");
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            out.push(
                "worker_threads",
                format!("at most {MAX_WORKER_THREADS} (0: one per CPU)"),
            );
        }
        for d in &self.domains {
            if !crate::alias::is_valid_domain(d) || d.to_ascii_lowercase() != *d {
                out.push(
                    "domains",
                    format!("{d:?} is not a lower-case domain name with at least two labels"),
                );
            }
        }
        out.listen("http.listen", &self.http.listen);
        out.listen("smtp.listen", &self.smtp.listen);
        out.listen("cluster.listen", &self.cluster.listen);
        out.positive("http.request_timeout_secs", self.http.request_timeout_secs);
        out.positive(
            "http.max_concurrent_requests",
            self.http.max_concurrent_requests as u64,
        );
        out.positive("http.max_connections", self.http.max_connections as u64);
        out.positive(
            "http.header_read_timeout_secs",
            self.http.header_read_timeout_secs,
        );
        out.positive("http.keepalive_idle_secs", self.http.keepalive_idle_secs);
        if self.smtp.hostname.is_empty()
            || !self
                .smtp
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            out.push("smtp.hostname", "must be a host name");
        }
        let delimiter = &self.smtp.recipient_delimiter;
        if !delimiter.bytes().all(|b| b"+-_=.".contains(&b)) {
            out.push(
                "smtp.recipient_delimiter",
                format!(
                    "{delimiter:?}: each character must be one of + - _ = . (or leave it empty to turn sub-addressing off)"
                ),
            );
        }
        out.positive("smtp.max_message_size", self.smtp.max_message_size);
        out.positive("smtp.max_connections", self.smtp.max_connections as u64);
        out.positive(
            "smtp.max_connections_per_ip",
            self.smtp.max_connections_per_ip as u64,
        );
        out.positive(
            "smtp.transaction_timeout_secs",
            self.smtp.transaction_timeout_secs,
        );
        out.positive("smtp.idle_timeout_secs", self.smtp.idle_timeout_secs);
        out.positive("smtp.session_timeout_secs", self.smtp.session_timeout_secs);
        out.positive("smtp.max_failed_rcpts", self.smtp.max_failed_rcpts as u64);
        out.positive(
            "smtp.max_failed_rcpts_per_ip",
            self.smtp.max_failed_rcpts_per_ip as u64,
        );
        out.positive(
            "smtp.failed_rcpt_window_secs",
            self.smtp.failed_rcpt_window_secs,
        );
        out.positive("smtp.max_recipients", self.smtp.max_recipients as u64);
        out.positive("smtp.max_hops", self.smtp.max_hops as u64);
        self.relay.problems(&mut out);
        self.tls_problems(&mut out);
        // A reservation lives from RCPT to the upstream's reply: at most the
        // whole session plus the relay's budget for one message.
        let longest = self
            .smtp
            .session_timeout_secs
            .saturating_add(self.relay.longest_delivery_secs());
        if self.relay.reservation_lease_secs <= longest {
            out.push(
                "relay.reservation_lease_secs",
                format!(
                    "must exceed smtp.session_timeout_secs + relay.delivery_timeout_secs ({longest} s), or a live transaction could lose its reservation"
                ),
            );
        }
        out.positive("limits.max_days", self.limits.max_days as u64);
        out.positive("limits.max_usage", self.limits.max_usage as u64);
        let max_valid = crate::raft::targets::MAX_CONFIRM_VALID_DAYS;
        if !(1..=max_valid).contains(&self.limits.confirm_valid_days) {
            out.push(
                "limits.confirm_valid_days",
                format!("must be from 1 to {max_valid}"),
            );
        }
        if let Err(e) = check_public_url(&self.http.public_url) {
            out.push("http.public_url", e);
        }
        // Links derived from a listener on every address (or a public one)
        // would point nowhere useful: only a loopback node may go without.
        let loopback = self
            .http
            .listen
            .parse::<SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or_else(|_| self.http.listen.starts_with("localhost:"));
        if self.limits.confirm_targets && self.http.public_url.is_empty() && !loopback {
            out.push(
                "http.public_url",
                "must be set when limits.confirm_targets is on and http.listen is not a loopback address: the confirmation links mailed to targets are made from it",
            );
        }
        if self.cluster.initial_members.is_empty() {
            out.push("cluster.initial_members", "must list at least this node");
        }
        for (id, addr) in &self.cluster.initial_members {
            match id.parse::<u64>() {
                Ok(n) if n > 0 => {}
                _ => out.push(
                    "cluster.initial_members",
                    format!("{id:?} is not a positive node id"),
                ),
            }
            out.listen("cluster.initial_members", addr);
        }
        if self.node_id != 0
            && !self.cluster.initial_members.is_empty()
            && !self
                .cluster
                .initial_members
                .contains_key(&self.node_id.to_string())
        {
            out.push(
                "cluster.initial_members",
                format!("must contain this node's id {}", self.node_id),
            );
        }
        out.positive(
            "cluster.snapshot_after_entries",
            self.cluster.snapshot_after_entries,
        );
        out.positive("cluster.store_cache_mb", self.cluster.store_cache_mb);
        out.positive("cluster.write_timeout_ms", self.cluster.write_timeout_ms);
        out.positive("cluster.rpc_timeout_ms", self.cluster.rpc_timeout_ms);
        out.positive("cluster.heartbeat_ms", self.cluster.heartbeat_ms);
        if self.cluster.election_timeout_ms < self.cluster.heartbeat_ms.saturating_mul(3) {
            out.push(
                "cluster.election_timeout_ms",
                "must be at least three heartbeats (cluster.heartbeat_ms), or followers start needless elections",
            );
        }
        if self.cluster.secret.is_some() && self.cluster.secret_file.is_some() {
            out.push(
                "cluster.secret",
                "set either cluster.secret or cluster.secret_file, not both",
            );
        }
        if let Some(s) = &self.cluster.secret {
            if s.expose().len() < 16 {
                out.push("cluster.secret", "must be at least 16 characters");
            }
        }
        if let Some(path) = &self.cluster.secret_file {
            match read_secret_file(path) {
                Err(e) => out.push("cluster.secret_file", e),
                Ok(s) if s.expose().len() < 16 => out.push(
                    "cluster.secret_file",
                    "the secret must be at least 16 characters",
                ),
                Ok(_) => {}
            }
        }
        if self.cluster.initial_members.len() > 1
            && self.cluster.secret.is_none()
            && self.cluster.secret_file.is_none()
        {
            out.push(
                "cluster.secret",
                "a multi-node cluster needs cluster.secret or cluster.secret_file",
            );
        }
        for nets in [
            self.maintenance.allow_nets(),
            self.http.trusted_proxy_nets(),
            self.smtp.trusted_nets(),
        ] {
            if let Err(ConfigError::Invalid { key, message }) = nets {
                out.push(&key, message);
            }
        }
        let r = &self.ratelimit;
        out.positive("ratelimit.max_clients", r.max_clients as u64);
        out.positive("ratelimit.create_quota", u64::from(r.create_quota));
        out.positive("ratelimit.create_window_secs", r.create_window_secs);
        out.positive("ratelimit.status_quota", u64::from(r.status_quota));
        out.positive("ratelimit.status_window_secs", r.status_window_secs);
        out.positive("ratelimit.failed_quota", u64::from(r.failed_quota));
        out.positive("ratelimit.failed_window_secs", r.failed_window_secs);
        out.positive(
            "maintenance.retry_after_secs",
            self.maintenance.retry_after_secs,
        );
        self.mail_problems(&mut out);
        if !matches!(self.log.format.as_str(), "text" | "json") {
            out.push("log.format", "must be \"text\" or \"json\"");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            out.push("log.level", e.to_string());
        }
        out.0
    }

    /// Initial members as typed ids and addresses.
    pub fn members(&self) -> BTreeMap<u64, String> {
        self.cluster
            .initial_members
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
            .collect()
    }

    /// The cluster secret: configured, from `secret_file`, or (single-node
    /// setups only) generated once into the data directory so that even a
    /// zero-config node's admin port is not open to every local user.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the file cannot be read or written.
    pub fn cluster_secret(&self) -> Result<Secret, ConfigError> {
        if let Some(s) = &self.cluster.secret {
            return Ok(s.clone());
        }
        if let Some(path) = &self.cluster.secret_file {
            return read_secret_file(path).map_err(|e| invalid("cluster.secret_file", e));
        }
        let path = self.data_dir.join("cluster.secret");
        if let Ok(s) = read_secret_file(&path) {
            return Ok(s);
        }
        let secret = crate::alias::new_token();
        std::fs::create_dir_all(&self.data_dir)
            .and_then(|_| write_private(&path, secret.as_bytes()))
            .map_err(|e| {
                invalid(
                    "data_dir",
                    format!(
                        "{} (TEMPALIAS_DATA_DIR) is not writable: {e}; the node keeps its cluster secret and database there",
                        self.data_dir.display()
                    ),
                )
            })?;
        Ok(Secret::new(secret))
    }

    /// The cluster secret for an admin client, and where it was found (for
    /// messages). Unlike [`Config::cluster_secret`] it never creates one: a
    /// client with a fresh secret could only be refused.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying where a secret was looked for.
    pub fn existing_cluster_secret(&self) -> Result<(Secret, String), ConfigError> {
        if let Some(s) = &self.cluster.secret {
            return Ok((s.clone(), "cluster.secret".into()));
        }
        if let Some(path) = &self.cluster.secret_file {
            return read_secret_file(path)
                .map(|s| (s, path.display().to_string()))
                .map_err(|e| invalid("cluster.secret_file", e));
        }
        let path = self.data_dir.join("cluster.secret");
        match read_secret_file(&path) {
            Ok(s) => Ok((s, path.display().to_string())),
            Err(e) => Err(invalid(
                "cluster.secret",
                format!("no secret configured, and {e} (a node without a configured secret writes it there when it first starts); run this in the node's directory, or give --config FILE or --secret-file FILE"),
            )),
        }
    }

    fn mail_problems(&self, out: &mut Checks) {
        if self.srs.secret.is_some() && self.srs.secret_file.is_some() {
            out.push(
                "srs.secret",
                "set either srs.secret or srs.secret_file, not both",
            );
        }
        if let Some(s) = &self.srs.secret {
            if s.expose().len() < 16 {
                out.push("srs.secret", "must be at least 16 characters");
            }
        }
        if let Some(path) = &self.srs.secret_file {
            match read_secret_file(path) {
                Err(e) => out.push("srs.secret_file", e),
                Ok(s) if s.expose().len() < 16 => out.push(
                    "srs.secret_file",
                    "the secret must be at least 16 characters",
                ),
                Ok(_) => {}
            }
        }
        if self.srs.max_age_days == 0 || self.srs.max_age_days > 365 {
            out.push("srs.max_age_days", "must be between 1 and 365");
        }
        let mut seen = Vec::new();
        for k in &self.dkim.keys {
            // Domains and selectors are DNS names: compared without case,
            // as the signer looks keys up (`Forwarding::from_config`).
            if !self
                .domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&k.domain))
            {
                out.push(
                    "dkim.keys",
                    format!("{:?} is not one of the alias domains", k.domain),
                );
            }
            // Several keys per domain are fine; two under one selector
            // cannot both be published.
            let name = (
                k.domain.to_ascii_lowercase(),
                k.selector.to_ascii_lowercase(),
            );
            if seen.contains(&name) {
                out.push(
                    "dkim.keys",
                    format!("{:?} has selector {:?} twice", k.domain, k.selector),
                );
            }
            seen.push(name);
            if k.selector.is_empty()
                || !k.selector.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                out.push(
                    "dkim.keys",
                    format!("selector {:?} is not a DNS label", k.selector),
                );
            }
            for e in crate::mail::dkim::key_file_problems(&k.key_file, k.algorithm) {
                out.push("dkim.keys", format!("{} {}: {e}", k.domain, k.selector));
            }
        }
        out.positive("arc.dns_timeout_ms", self.arc.dns_timeout_ms);
        out.positive("arc.timeout_ms", self.arc.timeout_ms);
        for s in &self.arc.dns_servers {
            if s.parse::<SocketAddr>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
                out.push(
                    "arc.dns_servers",
                    format!("{s:?} is not an IP address or IP:port"),
                );
            }
        }
    }

    /// The secrets the SRS keys are derived from: the signing one first, then
    /// `srs.previous_secrets`. Without `srs.secret`/`secret_file` the first is
    /// the cluster secret, which every node of a cluster shares already.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when a secret file cannot be read (or, for
    /// the cluster secret, written).
    pub fn srs_secrets(&self) -> Result<Vec<Secret>, ConfigError> {
        let current = if let Some(s) = &self.srs.secret {
            s.clone()
        } else if let Some(path) = &self.srs.secret_file {
            read_secret_file(path).map_err(|e| invalid("srs.secret_file", e))?
        } else {
            self.cluster_secret()?
        };
        let mut out = vec![current];
        out.extend(self.srs.previous_secrets.iter().cloned());
        Ok(out)
    }

    /// The file holding this node's database.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("tempalias.redb")
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(line))
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Collects `(key, reason)` pairs for [`Config::problems`].
#[derive(Default)]
struct Checks(Vec<(String, String)>);

impl Checks {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_string(), message.into()));
    }

    fn positive(&mut self, key: &str, v: u64) {
        if v == 0 {
            self.push(key, "must be greater than zero");
        }
    }

    fn listen(&mut self, key: &str, s: &str) {
        if let Err(e) = check_listen_addr(s) {
            self.push(key, e);
        }
    }
}

/// Accepts an empty value (derived from the listener) or an `http(s)://`
/// URL with a host and nothing after its path.
fn check_public_url(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let url = reqwest::Url::parse(s)
        .map_err(|e| format!("{s:?} is not a URL such as https://tempalias.example: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{s:?} must be an http:// or https:// URL with a host"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{s:?} must have no user, query or fragment: links are made by adding a path"
        ));
    }
    Ok(())
}

/// Accepts `IP:port`, `[IPv6]:port` and `host:port`. Host names are resolved
/// when the node binds (all of the name's addresses are tried in order), so
/// `localhost:8080` works; the check here is only that it is a name at all.
fn check_listen_addr(s: &str) -> Result<(), String> {
    let example = "an address such as 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port: use {example}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{s:?}: {port:?} is not a port number (0 to 65535)"));
    }
    let is_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if is_name {
        Ok(())
    } else {
        Err(format!("{s:?} is not {example}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn mail_sections_parse_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let generated = crate::mail::dkim::generate(DkimAlgorithm::Ed25519).unwrap();
        crate::mail::dkim::write_key_file(&key, &generated.private_pem).unwrap();
        // A second key of the same domain, its algorithm read from the file.
        let rsa_key = dir.path().join("r.pem");
        let generated = crate::mail::dkim::generate(DkimAlgorithm::Rsa).unwrap();
        crate::mail::dkim::write_key_file(&rsa_key, &generated.private_pem).unwrap();
        let text = format!(
            "domains = [\"a.example\"]\n[srs]\nsecret = \"0123456789abcdef\"\nmax_age_days = 7\n\
             [[dkim.keys]]\ndomain = \"a.example\"\nselector = \"s1\"\nkey_file = {key:?}\nalgorithm = \"ed25519\"\n\
             [[dkim.keys]]\ndomain = \"a.example\"\nselector = \"r1\"\nkey_file = {rsa_key:?}\n\
             [arc]\ndns_servers = [\"127.0.0.1:5353\", \"::1\"]\n"
        );
        let c = load(&text, &[]).unwrap();
        assert_eq!(c.srs.max_age_days, 7);
        assert_eq!(c.dkim.keys[0].algorithm, Some(DkimAlgorithm::Ed25519));
        assert_eq!(c.dkim.keys[1].algorithm, None);
        assert_eq!(c.srs_secrets().unwrap()[0].expose(), "0123456789abcdef");
        assert!(c.arc.enabled);

        let bad = format!(
            "domains = [\"a.example\"]\n[srs]\nsecret = \"short\"\nmax_age_days = 0\n\
             [[dkim.keys]]\ndomain = \"b.example\"\nselector = \"s 1\"\nkey_file = {key:?}\nalgorithm = \"rsa\"\n\
             [[dkim.keys]]\ndomain = \"b.example\"\nselector = \"s 1\"\nkey_file = {key:?}\n\
             [arc]\ndns_servers = [\"resolver\"]\n"
        );
        let found: Vec<(String, String)> = problems(&bad, &[])
            .into_iter()
            .map(|(_, k, m)| (k, m))
            .collect();
        let has = |key: &str, part: &str| found.iter().any(|(k, m)| k == key && m.contains(part));
        assert!(has("srs.secret", "at least 16"), "{found:?}");
        assert!(has("srs.max_age_days", "between 1 and 365"), "{found:?}");
        assert!(
            has("dkim.keys", "not one of the alias domains"),
            "{found:?}"
        );
        assert!(has("dkim.keys", "not a DNS label"), "{found:?}");
        // An Ed25519 key file named as RSA.
        assert!(
            has("dkim.keys", "b.example s 1: ") && has("dkim.keys", "not a usable rsa key"),
            "{found:?}"
        );
        assert!(has("dkim.keys", "selector \"s 1\" twice"), "{found:?}");
        // Domains and selectors are DNS names: one key under `A.example`
        // and another under `a.example` with the same selector (in any
        // case) are the same published record. The domain matches the
        // alias domain without case too.
        let twice = format!(
            "domains = [\"a.example\"]\n\
             [[dkim.keys]]\ndomain = \"A.example\"\nselector = \"s1\"\nkey_file = {key:?}\n\
             [[dkim.keys]]\ndomain = \"a.example\"\nselector = \"S1\"\nkey_file = {rsa_key:?}\n"
        );
        let found: Vec<String> = problems(&twice, &[])
            .into_iter()
            .filter(|(_, k, _)| k == "dkim.keys")
            .map(|(_, _, m)| m)
            .collect();
        assert_eq!(found, ["\"a.example\" has selector \"S1\" twice"]);
        assert!(has("arc.dns_servers", "not an IP address"), "{found:?}");
        // Unknown fields of a key are errors too.
        let typo = format!(
            "domains = [\"a.example\"]\n[[dkim.keys]]\ndomain = \"a.example\"\nselectr = \"s1\"\nkey_file = {key:?}\n"
        );
        assert!(load(&typo, &[])
            .unwrap_err()
            .to_string()
            .contains("selectr"));
    }

    #[test]
    fn srs_falls_back_to_the_cluster_secret() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        c.srs.previous_secrets = vec![Secret::new("an older secret value")];
        let secrets = c.srs_secrets().unwrap();
        assert_eq!(secrets[0], c.cluster_secret().unwrap());
        assert_eq!(secrets[1].expose(), "an older secret value");
        assert!(diagnose::Schema::new().sections["srs"].contains(&"secret_file".to_string()));
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.smtp.listen, "127.0.0.1:2525");
        assert_eq!(c.smtp.max_message_size, 26_214_400);
        assert_eq!(c.relay.mode, RelayMode::Capture);
        assert_eq!(c.limits.max_days, 60);
        assert_eq!(c.limits.max_usage, 100);
        assert!(!c.limits.confirm_targets);
        assert_eq!(c.limits.confirm_valid_days, 30);
        assert_eq!(c.limits.max_aliases_per_target, 0);
        assert_eq!(c.http.public_url, "");
        // A loopback node may confirm targets without a public URL.
        load("[limits]\nconfirm_targets = true\n", &[]).unwrap();
        load(
            "[http]\npublic_url = \"https://tempalias.example/base\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.members(),
            BTreeMap::from([(1, "127.0.0.1:7001".to_string())])
        );
    }

    #[test]
    fn file_values_apply() {
        let c = load(
            "node_id = 1\ndomains = [\"a.example\"]\n[smtp]\nmax_message_size = 1000\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.domains, vec!["a.example"]);
        assert_eq!(c.smtp.max_message_size, 1000);
        assert_eq!(c.smtp.listen, "127.0.0.1:2525");
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let e = load("[smtp]\nmax_mesage_size = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_mesage_size"), "{e}");
        assert!(e.contains("c.toml:2:"), "{e}");
        let e = load("colour = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }

    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<(Option<usize>, String, String)> {
        load(text, env)
            .unwrap_err()
            .problems()
            .into_iter()
            .map(|p| {
                let line = match p.origin {
                    Origin::File { line, .. } => Some(line),
                    _ => None,
                };
                (line, p.key, p.message)
            })
            .collect()
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_a_suggestion() {
        let text = "node_id = 0\ndomians = [\"a.example\"]\n\n[smpt]\nlisten = \"x\"\n\n[http]\nlisten = \"nonsense\"\nrequest_timeout_secs = \"ten\"\n[limits]\nmax_days = 0\n";
        let found = problems(text, &[]);
        let keys: Vec<_> = found.iter().map(|(l, k, _)| (*l, k.as_str())).collect();
        assert_eq!(
            keys,
            vec![
                (Some(1), "node_id"),
                (Some(2), "domians"),
                (Some(4), "smpt"),
                (Some(8), "http.listen"),
                (Some(9), "http.request_timeout_secs"),
                (Some(11), "limits.max_days"),
            ],
            "{found:?}"
        );
        assert!(found[1].2.contains("did you mean domains?"), "{found:?}");
        assert!(found[2].2.contains("did you mean [smtp]?"), "{found:?}");
    }

    #[test]
    fn environment_problems_name_the_variable() {
        let e = load("", &[("TEMPALIAS_HTTP_LISTN", "127.0.0.1:1")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("TEMPALIAS_HTTP_LISTN: not a configuration variable; did you mean TEMPALIAS_HTTP_LISTEN?"),
            "{e}"
        );
        let e = load("", &[("TEMPALIAS_HTTP_LISTEN", "nonsense")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("TEMPALIAS_HTTP_LISTEN (http.listen): "),
            "{e}"
        );
    }

    #[test]
    fn listen_addresses_may_be_host_names() {
        let c = load("[http]\nlisten = \"localhost:8080\"\n", &[]).unwrap();
        assert_eq!(c.http.listen, "localhost:8080");
        load("[http]\nlisten = \"[::1]:8080\"\n", &[]).unwrap();
        for bad in ["localhost", "local host:80", "a:99999", ":80"] {
            let e = load(&format!("[http]\nlisten = {bad:?}\n"), &[]).unwrap_err();
            assert!(e.to_string().contains("http.listen"), "{bad}: {e}");
        }
    }

    #[test]
    fn recipient_delimiter_is_checked() {
        assert_eq!(Config::default().smtp.recipient_delimiter, "+");
        load("[smtp]\nrecipient_delimiter = \"\"\n", &[]).unwrap();
        load("[smtp]\nrecipient_delimiter = \"+-\"\n", &[]).unwrap();
        let e = load("[smtp]\nrecipient_delimiter = \"a\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("smtp.recipient_delimiter"), "{e}");
    }

    #[test]
    fn smarthost_entries_override_the_reuse_bounds() {
        let c = load(
            r#"
[relay]
mode = "smarthost"
reuse_max_idle = 8
smarthosts = [
  "smtp://a.example",
  { url = "smtp://b.example", reuse_connections = false },
  { url = "smtp://c.example", reuse_max_idle = 64, reuse_idle_secs = 30, reuse_max_messages = 1000, reuse_max_age_secs = 600 },
  { url = "smtp://d.example", reuse_max_messages = 5 },
]
"#,
            &[],
        )
        .unwrap();
        let r = &c.relay;
        let of = |i: usize| r.reuse_for(&r.smarthosts[i]);
        // No override: the relay-wide values (one set, the rest defaults).
        let wide = Reuse {
            connections: true,
            max_idle: 8,
            idle_secs: 2,
            max_messages: 100,
            max_age_secs: 300,
        };
        assert_eq!(of(0), wide);
        assert_eq!(
            of(1),
            Reuse {
                connections: false,
                ..wide
            }
        );
        assert_eq!(
            of(2),
            Reuse {
                connections: true,
                max_idle: 64,
                idle_secs: 30,
                max_messages: 1000,
                max_age_secs: 600,
            }
        );
        assert_eq!(
            of(3),
            Reuse {
                max_messages: 5,
                ..wide
            }
        );
        // From the environment: the whole list, inline tables and all.
        let c = load(
            "",
            &[(
                "TEMPALIAS_RELAY_SMARTHOSTS",
                "[{ url = \"smtp://e.example\", reuse_idle_secs = 7 }]",
            )],
        )
        .unwrap();
        assert_eq!(c.relay.reuse_for(&c.relay.smarthosts[0]).idle_secs, 7);
    }

    #[test]
    fn a_smarthost_s_own_reuse_bounds_are_checked_and_name_it() {
        let entry = |keys: &str| {
            format!("[relay]\nmode = \"smarthost\"\nsmarthosts = [{{ url = \"smtp://b.example\", {keys} }}]\n")
        };
        let messages = |text: &str| {
            problems(text, &[])
                .into_iter()
                .filter(|(_, k, _)| k == "relay.smarthosts")
                .map(|(_, _, m)| m)
                .collect::<Vec<_>>()
        };
        for (keys, expected) in [
            (
                "reuse_max_idle = 0",
                "smtp://b.example:25: reuse_max_idle must be greater than zero",
            ),
            (
                "reuse_idle_secs = 0",
                "smtp://b.example:25: reuse_idle_secs must be greater than zero",
            ),
            (
                "reuse_max_messages = 0",
                "smtp://b.example:25: reuse_max_messages must be greater than zero",
            ),
            (
                "reuse_idle_secs = 400",
                "smtp://b.example:25: reuse_idle_secs (400) must not exceed reuse_max_age_secs (300)",
            ),
            (
                "reuse_max_age_secs = 1, reuse_idle_secs = 2",
                "smtp://b.example:25: reuse_idle_secs (2) must not exceed reuse_max_age_secs (1)",
            ),
        ] {
            assert_eq!(messages(&entry(keys)), [expected], "{keys}");
        }
        assert_eq!(
            messages(&entry("reuse_max_age_secs = 0")),
            [
                "smtp://b.example:25: reuse_max_age_secs must be greater than zero",
                "smtp://b.example:25: reuse_idle_secs (2) must not exceed reuse_max_age_secs (0)",
            ]
        );
        // Reuse off for the entry: its bounds do not matter.
        assert!(load(&entry("reuse_connections = false, reuse_max_idle = 0"), &[]).is_ok());
        // Reuse off relay-wide (so its values went unchecked) and on for
        // the entry: what the entry inherits is checked, and named.
        let text = "[relay]\nmode = \"smarthost\"\nreuse_connections = false\nreuse_max_messages = 0\nsmarthosts = [\"smtp://a.example\", { url = \"smtp://b.example\", reuse_connections = true }]\n";
        assert_eq!(
            messages(text),
            ["smtp://b.example:25: reuse_max_messages must be greater than zero (the value of relay.reuse_max_messages)"]
        );
        // Reuse on relay-wide: a bad relay-wide value is reported once,
        // under its own key, not again for each entry.
        let found = problems(
            "[relay]\nmode = \"smarthost\"\nreuse_max_messages = 0\nsmarthosts = [{ url = \"smtp://b.example\", reuse_max_idle = 4 }]\n",
            &[],
        );
        assert_eq!(
            found.iter().map(|(_, k, _)| k.as_str()).collect::<Vec<_>>(),
            ["relay.reuse_max_messages"],
            "{found:?}"
        );
    }

    #[test]
    fn env_overrides_file() {
        let c = load(
            "[smtp]\nmax_message_size = 1000\n",
            &[
                ("TEMPALIAS_SMTP_MAX_MESSAGE_SIZE", "2000"),
                ("TEMPALIAS_HTTP_LISTEN", "127.0.0.1:9999"),
                ("TEMPALIAS_DOMAINS", "[\"b.example\"]"),
                ("TEMPALIAS_RELAY_MODE", "smarthost"),
                (
                    "TEMPALIAS_CLUSTER_INITIAL_MEMBERS",
                    "{ \"1\" = \"127.0.0.1:7100\" }",
                ),
                ("HOME", "/ignored"),
            ],
        )
        .unwrap();
        assert_eq!(c.smtp.max_message_size, 2000);
        assert_eq!(c.http.listen, "127.0.0.1:9999");
        assert_eq!(c.domains, vec!["b.example"]);
        assert_eq!(c.relay.mode, RelayMode::Smarthost);
        assert_eq!(c.members()[&1], "127.0.0.1:7100");
    }

    #[test]
    fn env_unknown_keys_are_errors() {
        let e = load("", &[("TEMPALIAS_SMTP_NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("TEMPALIAS_SMTP_NOPE"), "{e}");
        let e = load("", &[("TEMPALIAS_BOGUS_X", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("TEMPALIAS_BOGUS_X"), "{e}");
        // The test clock is not a configuration key and is not refused.
        load("", &[(crate::clock::TEST_CLOCK_OFFSET_FILE_ENV, "/x")]).unwrap();
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases = [
            ("node_id = 0\n", "node_id"),
            ("worker_threads = 1025\n", "worker_threads"),
            ("domains = []\n", "domains"),
            ("domains = [\"Upper.Example\"]\n", "domains"),
            ("[http]\nlisten = \"nonsense\"\n", "http.listen"),
            ("[smtp]\nmax_message_size = 0\n", "smtp.max_message_size"),
            (
                "[smtp]\ntrusted_networks = [\"10.0.0.0/33\"]\n",
                "smtp.trusted_networks",
            ),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = []\n",
                "relay.smarthosts",
            ),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"ftp://x:1\"]\n",
                "relay.smarthosts",
            ),
            ("[limits]\nmax_days = 0\n", "limits.max_days"),
            ("[smtp]\ntls_cert_file = \"c.pem\"\n", "smtp.tls_key_file"),
            (
                "[smtp]\ntls_min_version = \"1.1\"\n",
                "smtp.tls_min_version",
            ),
            (
                "[smtp]\ntls_cipher_suites = [\"TLS_RSA_WITH_RC4_128_MD5\"]\n",
                "smtp.tls_cipher_suites",
            ),
            (
                "[smtp]\ntls_self_signed = false\ntls_listen = \"127.0.0.1:0\"\n",
                "smtp.tls_listen",
            ),
            (
                "[smtp]\ntls_self_signed = false\nrequire_tls = true\n",
                "smtp.require_tls",
            ),
            (
                "[smtp]\ntls_handshake_timeout_secs = 0\n",
                "smtp.tls_handshake_timeout_secs",
            ),
            ("[smtp]\npostmaster = \"nobody\"\n", "smtp.postmaster"),
            (
                "[smtp]\npostmaster = \"postmaster@tempalias.test\"\n",
                "smtp.postmaster",
            ),
            (
                "[limits]\nconfirm_valid_days = 0\n",
                "limits.confirm_valid_days",
            ),
            (
                "[limits]\nconfirm_valid_days = 400\n",
                "limits.confirm_valid_days",
            ),
            (
                "[http]\npublic_url = \"ftp://x.example\"\n",
                "http.public_url",
            ),
            (
                "[http]\npublic_url = \"tempalias.example\"\n",
                "http.public_url",
            ),
            (
                "[http]\nlisten = \"0.0.0.0:8080\"\n[limits]\nconfirm_targets = true\n",
                "http.public_url",
            ),
            (
                "[http]\npublic_url = \"https://x.example/?a=b\"\n",
                "http.public_url",
            ),
            ("node_id = 2\n", "cluster.initial_members"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            (
                "[relay]\nreservation_lease_secs = 10\n",
                "relay.reservation_lease_secs",
            ),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"smtp://u@h.example\"]\npassword = \"pw\"\n",
                "relay.smarthosts",
            ),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"smtps://u@h.example\"]\n",
                "relay.smarthosts",
            ),
            ("[relay]\ndelivery_timeout_secs = 600\n", "relay.delivery_timeout_secs"),
            ("[relay]\ntimeout_secs = 400\n", "relay.timeout_secs"),
            ("[relay]\ndns_servers = [\"dns.example\"]\n", "relay.dns_servers"),
            ("[relay]\nca_file = \"/nonexistent/ca.pem\"\n", "relay.ca_file"),
            ("[relay]\nbreaker_failures = 0\n", "relay.breaker_failures"),
            ("[relay]\nreuse_max_idle = 0\n", "relay.reuse_max_idle"),
            ("[relay]\nreuse_idle_secs = 0\n", "relay.reuse_idle_secs"),
            ("[relay]\nreuse_max_messages = 0\n", "relay.reuse_max_messages"),
            (
                "[relay]\nreuse_idle_secs = 10\nreuse_max_age_secs = 5\n",
                "relay.reuse_idle_secs",
            ),
        ];
        for (text, key) in cases {
            let found = problems(text, &[]);
            assert!(
                found.iter().any(|(_, k, _)| k == key),
                "{text:?} gave {found:?}"
            );
        }
    }

    #[test]
    fn relay_urls_are_parsed_at_load_and_passwords_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = load(
            &format!(
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"smtps://fwd@a.example\", \"smtp+starttls://fwd@b.example:2587\"]\npassword_file = {:?}\ndns_servers = [\"127.0.0.1:5353\", \"::1\"]\n",
                pw.display().to_string()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.relay.smarthosts[0].url.tls, TlsMode::Implicit);
        assert_eq!(c.relay.smarthosts[1].url.port, 2587);
        assert_eq!(
            c.relay.smarthost_password().unwrap().unwrap().expose(),
            "s3cret"
        );
        assert_eq!(
            c.relay.dns_server_addrs().unwrap(),
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert!(!format!("{:?}", c.relay).contains("s3cret"));
        // The password may also come from the environment.
        let c = load(
            "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"smtps://fwd@a.example\"]\n",
            &[("TEMPALIAS_RELAY_PASSWORD", "from-env")],
        )
        .unwrap();
        assert_eq!(
            c.relay.smarthost_password().unwrap().unwrap().expose(),
            "from-env"
        );
        let found = problems(
            "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"ftp://x:1\"]\n",
            &[],
        );
        assert_eq!(found[0].0, Some(3), "{found:?}");
        assert!(found[0].2.contains("ftp://x:1"), "{found:?}");
    }

    #[test]
    fn each_smarthost_may_have_its_own_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pw"), dir.path().join("b.pw"));
        std::fs::write(&a, "alpha\n").unwrap();
        std::fs::write(&b, "  beta  \n").unwrap();
        let text = format!(
            "[relay]\nmode = \"smarthost\"\npassword_file = {a:?}\n\n[[relay.smarthosts]]\nurl = \"smtps://fwd@a.example\"\n\n[[relay.smarthosts]]\nurl = \"smtp+starttls://b.example\"\nuser = \"me@b.example\"\npassword_file = {b:?}\n"
        );
        let c = load(&text, &[]).unwrap();
        let pw = |i: usize| {
            c.relay
                .password_for(&c.relay.smarthosts[i])
                .unwrap()
                .unwrap()
                .expose()
                .to_string()
        };
        // The first has none of its own: the default. The second its own.
        assert_eq!((pw(0), pw(1)), ("alpha".to_string(), "beta".to_string()));
        assert_eq!(
            c.relay.smarthosts[1].url.user.as_deref(),
            Some("me@b.example")
        );
        assert!(!format!("{:?}", c.relay).contains("beta"));
        // The whole list from the environment, inline tables and all.
        let c = load(
            "",
            &[
                ("TEMPALIAS_RELAY_MODE", "smarthost"),
                (
                    "TEMPALIAS_RELAY_SMARTHOSTS",
                    &format!("[{{ url = \"smtps://x@b.example\", password_file = {b:?} }}]"),
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            c.relay
                .password_for(&c.relay.smarthosts[0])
                .unwrap()
                .unwrap()
                .expose(),
            "beta"
        );

        // A missing file is named with its smarthost; a default nobody
        // uses is pointed out; a file without a user too.
        let missing = dir.path().join("missing.pw");
        let found = problems(
            &format!(
                "[relay]\nmode = \"smarthost\"\npassword_file = {a:?}\nsmarthosts = [{{ url = \"smtps://fwd@a.example\", password_file = {missing:?} }}, {{ url = \"smtps://b.example\", password_file = {b:?} }}]\n"
            ),
            &[],
        );
        let text_of = |key: &str| {
            found
                .iter()
                .filter(|(_, k, _)| k == key)
                .map(|(_, _, m)| m.clone())
                .collect::<Vec<_>>()
        };
        let hosts = text_of("relay.smarthosts");
        assert!(
            hosts.iter().any(|m| m
                .contains("smtps://fwd@a.example:465: password_file: cannot read")
                && m.contains("missing.pw")),
            "{found:?}"
        );
        assert!(
            hosts
                .iter()
                .any(|m| m.contains("smtps://b.example:465: password_file is set but no user")),
            "{found:?}"
        );
        assert!(
            text_of("relay.password")
                .iter()
                .any(|m| m.contains("no smarthost uses it")),
            "{found:?}"
        );
        // An empty file is as wrong as a missing one.
        std::fs::write(&b, "\n").unwrap();
        let found = problems(
            &format!(
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [{{ url = \"smtps://fwd@a.example\", password_file = {b:?} }}]\n"
            ),
            &[],
        );
        assert!(
            found.iter().any(|(line, k, m)| k == "relay.smarthosts"
                && *line == Some(3)
                && m.contains("is empty")),
            "{found:?}"
        );
    }

    #[test]
    fn multi_node_clusters_need_a_secret() {
        let members = "[cluster]\ninitial_members = { \"1\" = \"127.0.0.1:7001\", \"2\" = \"127.0.0.2:7001\" }\n";
        let e = load(members, &[]).unwrap_err().to_string();
        assert!(e.contains("cluster.secret: "), "{e}");
        let c = load(
            &format!("{members}secret = \"0123456789abcdef0123\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster_secret().unwrap().expose(), "0123456789abcdef0123");
        let e = load(&format!("{members}secret = \"short\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.secret: "), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        let c = load(
            "[cluster]\nsecret = \"0123456789abcdef-very-secret\"\n",
            &[],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn generated_secret_is_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let a = c.cluster_secret().unwrap();
        let b = c.cluster_secret().unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("data/cluster.secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }

    #[test]
    fn bad_types_are_errors() {
        let e = load("[smtp]\nmax_message_size = \"big\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_message_size") || e.contains("invalid type"),
            "{e}"
        );
        let e = load("", &[("TEMPALIAS_LIMITS_MAX_DAYS", "lots")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("TEMPALIAS_LIMITS_MAX_DAYS (limits.max_days): invalid type"),
            "{e}"
        );
    }
}
