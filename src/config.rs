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

/// Variables with the prefix that are not configuration keys.
const ENV_NOT_CONFIG: &[&str] = &[
    crate::clock::TEST_CLOCK_OFFSET_FILE_ENV,
    "TEMPALIAS_API",
    "TEMPALIAS_TOKEN",
];

/// Why a configuration could not be used. Each variant names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

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
    pub http: HttpConfig,
    pub smtp: SmtpConfig,
    pub relay: RelayConfig,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("./tempalias-data"),
            domains: vec!["tempalias.test".to_string()],
            http: HttpConfig::default(),
            smtp: SmtpConfig::default(),
            relay: RelayConfig::default(),
            limits: LimitsConfig::default(),
            cluster: ClusterConfig::default(),
            log: LogConfig::default(),
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
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_string(),
            request_timeout_secs: 10,
            max_concurrent_requests: 512,
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
}

/// Outbound delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub mode: RelayMode,
    pub capture_dir: PathBuf,
    /// `smtp://host:port` URLs, tried in order; STARTTLS is used when offered.
    pub smarthosts: Vec<String>,
    /// Upper bound on one upstream attempt (connect to final reply).
    pub timeout_secs: u64,
    /// How long a reserved use stays held if the node holding it dies; must exceed
    /// the longest a transaction can take between RCPT and the upstream reply.
    pub reservation_lease_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            mode: RelayMode::Capture,
            capture_dir: PathBuf::from("./tempalias-data/outbox"),
            smarthosts: vec!["smtp://127.0.0.1:2526".to_string()],
            timeout_secs: 60,
            reservation_lease_secs: 2400,
        }
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_days: 60,
            max_usage: 100,
            keep_expired_days: 7,
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
            snapshot_after_entries: 5000,
            write_timeout_ms: 5000,
            secret: None,
            secret_file: None,
            rpc_timeout_ms: 2000,
            heartbeat_ms: 80,
            election_timeout_ms: 250,
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
    /// A [`ConfigError`] naming the file line, variable or key that is wrong.
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
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                // Parse into the typed struct first: its errors carry line numbers.
                let typed: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?;
                toml::Table::try_from(typed).map_err(|e| ConfigError::Parse {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                origin: "defaults".into(),
                message: e.to_string(),
            })?,
        };
        let mut overridden = false;
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if ENV_NOT_CONFIG.contains(&var.as_str()) {
                continue;
            }
            apply_env(&mut table, &var, &rest.to_ascii_lowercase(), &raw)?;
            overridden = true;
        }
        let origin = if overridden {
            "environment overrides"
        } else {
            "configuration"
        };
        let config = Config::deserialize(table).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with the dotted key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be a positive integer"));
        }
        if self.domains.is_empty() {
            return Err(invalid("domains", "at least one alias domain is required"));
        }
        for d in &self.domains {
            if !crate::alias::is_valid_domain(d) || d.to_ascii_lowercase() != *d {
                return Err(invalid(
                    "domains",
                    format!("{d:?} is not a lower-case domain name with at least two labels"),
                ));
            }
        }
        parse_addr("http.listen", &self.http.listen)?;
        parse_addr("smtp.listen", &self.smtp.listen)?;
        parse_addr("cluster.listen", &self.cluster.listen)?;
        positive("http.request_timeout_secs", self.http.request_timeout_secs)?;
        positive(
            "http.max_concurrent_requests",
            self.http.max_concurrent_requests as u64,
        )?;
        if self.smtp.hostname.is_empty()
            || !self
                .smtp
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(invalid("smtp.hostname", "must be a host name"));
        }
        positive("smtp.max_message_size", self.smtp.max_message_size)?;
        positive("smtp.max_connections", self.smtp.max_connections as u64)?;
        positive(
            "smtp.max_connections_per_ip",
            self.smtp.max_connections_per_ip as u64,
        )?;
        positive(
            "smtp.transaction_timeout_secs",
            self.smtp.transaction_timeout_secs,
        )?;
        positive("smtp.idle_timeout_secs", self.smtp.idle_timeout_secs)?;
        positive("smtp.session_timeout_secs", self.smtp.session_timeout_secs)?;
        positive("smtp.max_failed_rcpts", self.smtp.max_failed_rcpts as u64)?;
        positive(
            "smtp.max_failed_rcpts_per_ip",
            self.smtp.max_failed_rcpts_per_ip as u64,
        )?;
        positive(
            "smtp.failed_rcpt_window_secs",
            self.smtp.failed_rcpt_window_secs,
        )?;
        positive("smtp.max_recipients", self.smtp.max_recipients as u64)?;
        positive("smtp.max_hops", self.smtp.max_hops as u64)?;
        if self.relay.mode == RelayMode::Smarthost {
            if self.relay.smarthosts.is_empty() {
                return Err(invalid(
                    "relay.smarthosts",
                    "at least one smarthost is required when relay.mode = \"smarthost\"",
                ));
            }
            for url in &self.relay.smarthosts {
                crate::relay::SmarthostUrl::parse(url)
                    .map_err(|e| invalid("relay.smarthosts", format!("{url:?}: {e}")))?;
            }
        }
        positive("relay.timeout_secs", self.relay.timeout_secs)?;
        // A reservation lives from RCPT to the upstream's reply: at most the
        // whole session plus one attempt per smarthost.
        let attempts = self.relay.smarthosts.len().max(1) as u64;
        let longest = self.smtp.session_timeout_secs + self.relay.timeout_secs * attempts;
        if self.relay.reservation_lease_secs <= longest {
            return Err(invalid(
                "relay.reservation_lease_secs",
                format!(
                    "must exceed smtp.session_timeout_secs + relay.timeout_secs per smarthost ({longest} s), or a live transaction could lose its reservation"
                ),
            ));
        }
        positive("limits.max_days", self.limits.max_days as u64)?;
        positive("limits.max_usage", self.limits.max_usage as u64)?;
        if self.cluster.initial_members.is_empty() {
            return Err(invalid(
                "cluster.initial_members",
                "must list at least this node",
            ));
        }
        for (id, addr) in &self.cluster.initial_members {
            match id.parse::<u64>() {
                Ok(n) if n > 0 => {}
                _ => {
                    return Err(invalid(
                        "cluster.initial_members",
                        format!("{id:?} is not a positive node id"),
                    ))
                }
            }
            parse_addr("cluster.initial_members", addr)?;
        }
        if !self
            .cluster
            .initial_members
            .contains_key(&self.node_id.to_string())
        {
            return Err(invalid(
                "cluster.initial_members",
                format!("must contain this node's id {}", self.node_id),
            ));
        }
        positive(
            "cluster.snapshot_after_entries",
            self.cluster.snapshot_after_entries,
        )?;
        positive("cluster.write_timeout_ms", self.cluster.write_timeout_ms)?;
        positive("cluster.rpc_timeout_ms", self.cluster.rpc_timeout_ms)?;
        positive("cluster.heartbeat_ms", self.cluster.heartbeat_ms)?;
        if self.cluster.election_timeout_ms < 3 * self.cluster.heartbeat_ms {
            return Err(invalid(
                "cluster.election_timeout_ms",
                "must be at least three heartbeats (cluster.heartbeat_ms), or followers start needless elections",
            ));
        }
        if self.cluster.secret.is_some() && self.cluster.secret_file.is_some() {
            return Err(invalid(
                "cluster.secret",
                "set either cluster.secret or cluster.secret_file, not both",
            ));
        }
        if let Some(s) = &self.cluster.secret {
            if s.expose().len() < 16 {
                return Err(invalid("cluster.secret", "must be at least 16 characters"));
            }
        }
        if let Some(path) = &self.cluster.secret_file {
            let s = read_secret_file(path).map_err(|e| invalid("cluster.secret_file", e))?;
            if s.expose().len() < 16 {
                return Err(invalid(
                    "cluster.secret_file",
                    "the secret must be at least 16 characters",
                ));
            }
        }
        if self.cluster.initial_members.len() > 1
            && self.cluster.secret.is_none()
            && self.cluster.secret_file.is_none()
        {
            return Err(invalid(
                "cluster.secret",
                "a multi-node cluster needs cluster.secret or cluster.secret_file",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
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
            .map_err(|e| invalid("data_dir", format!("cannot write {}: {e}", path.display())))?;
        Ok(Secret::new(secret))
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

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not an address such as 127.0.0.1:8080"),
        )
    })
}

/// Sets one override: `rest` is the variable name after the prefix, lower-cased.
fn apply_env(table: &mut toml::Table, var: &str, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let value = parse_env_value(raw);
    let top_level = ["node_id", "data_dir", "domains"];
    if top_level.contains(&rest) {
        table.insert(rest.to_string(), value);
        return Ok(());
    }
    let sections = ["http", "smtp", "relay", "limits", "cluster", "log"];
    let Some((section, key)) = rest.split_once('_') else {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: "not a configuration key".into(),
        });
    };
    if !sections.contains(&section) {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: format!("unknown section {section:?}"),
        });
    }
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: format!("{section} is not a section"),
        });
    };
    section_table.insert(key.to_string(), value);
    Ok(())
}

/// Environment values are TOML values when they parse as one (numbers, arrays,
/// inline tables), and plain strings otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
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
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.smtp.listen, "127.0.0.1:2525");
        assert_eq!(c.smtp.max_message_size, 26_214_400);
        assert_eq!(c.relay.mode, RelayMode::Capture);
        assert_eq!(c.limits.max_days, 60);
        assert_eq!(c.limits.max_usage, 100);
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
        assert!(e.contains("line 2"), "{e}");
        let e = load("colour = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
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
        assert!(e.contains("nope"), "{e}");
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
            ("domains = []\n", "domains"),
            ("domains = [\"Upper.Example\"]\n", "domains"),
            ("[http]\nlisten = \"nonsense\"\n", "http.listen"),
            ("[smtp]\nmax_message_size = 0\n", "smtp.max_message_size"),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = []\n",
                "relay.smarthosts",
            ),
            (
                "[relay]\nmode = \"smarthost\"\nsmarthosts = [\"ftp://x:1\"]\n",
                "relay.smarthosts",
            ),
            ("[limits]\nmax_days = 0\n", "limits.max_days"),
            ("node_id = 2\n", "cluster.initial_members"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            (
                "[relay]\nreservation_lease_secs = 10\n",
                "relay.reservation_lease_secs",
            ),
        ];
        for (text, key) in cases {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(e.starts_with(key), "{text:?} gave {e}");
        }
    }

    #[test]
    fn multi_node_clusters_need_a_secret() {
        let members = "[cluster]\ninitial_members = { \"1\" = \"127.0.0.1:7001\", \"2\" = \"127.0.0.2:7001\" }\n";
        let e = load(members, &[]).unwrap_err().to_string();
        assert!(e.starts_with("cluster.secret"), "{e}");
        let c = load(
            &format!("{members}secret = \"0123456789abcdef0123\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.cluster_secret().unwrap().expose(), "0123456789abcdef0123");
        let e = load(&format!("{members}secret = \"short\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cluster.secret"), "{e}");
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
        assert!(e.contains("environment"), "{e}");
    }
}
