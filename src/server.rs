//! One node, wired together: store and Raft, relay, SMTP and HTTP listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::cluster::client::Peers;
use crate::config::{Config, RelayMode};
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::raft::node::StartError;
use crate::raft::Node;
use crate::relay::{Relay, RelayError};
use crate::smtp::SmtpContext;

/// How long shutdown waits for SMTP sessions and HTTP requests to finish: the
/// relay's whole budget for one message (a message being forwarded is not
/// cut off while the upstream may still accept it), and never under 30 s.
fn drain_timeout(config: &Config) -> Duration {
    Duration::from_secs((config.relay.longest_delivery_secs() + 10).max(30))
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "cannot listen on {addr} ({what}, {}): {error}{}",
        crate::config::env_var(what),
        in_use_hint(error)
    )]
    Bind {
        what: &'static str,
        addr: String,
        error: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::DataDirError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cluster client: {0}")]
    Cluster(#[from] crate::cluster::client::RpcError),
    #[error("SMTP TLS: {0}")]
    Tls(#[from] crate::smtp::tls::TlsError),
    #[error("cannot read the maintenance state: {0}")]
    Maintenance(std::io::Error),
    #[error(transparent)]
    Forwarding(#[from] crate::mail::ForwardingError),
}

/// Says once at start which alias domains are signed (and sealed), so an
/// operator who forgot a key sees it before receivers do.
fn log_forwarding(config: &Config, forwarding: &crate::mail::Forwarding) {
    let signed = forwarding.signed_domains();
    let unsigned: Vec<&String> = config
        .domains
        .iter()
        .filter(|d| !signed.contains(d))
        .collect();
    if !signed.is_empty() {
        tracing::info!(
            keys = %forwarding.signing_keys().join("; "),
            arc = forwarding.seals(),
            "forwarded mail is DKIM-signed"
        );
    }
    let unsealed = forwarding.unsealed_domains();
    if config.arc.enabled && !unsealed.is_empty() {
        tracing::warn!(
            domains = ?unsealed,
            "forwarded mail of these domains is not ARC-sealed: ARC (RFC 8617) needs an RSA key"
        );
    }
    if !unsigned.is_empty() {
        tracing::warn!(
            domains = ?unsigned,
            "no DKIM key (dkim.keys): forwarded mail of these domains is not signed; create one with `tempalias dkim keygen`"
        );
    }
}

fn in_use_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        "; another process (another tempalias node?) listens there"
    } else {
        ""
    }
}

/// Addresses a started node listens on (ports may have been chosen by the OS).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub smtp: SocketAddr,
    /// The implicit-TLS SMTP listener, when `[smtp] tls_listen` is set.
    pub smtp_tls: Option<SocketAddr>,
    pub cluster: SocketAddr,
}

fn local_addr(what: &'static str, l: &TcpListener) -> Result<SocketAddr, ServeError> {
    l.local_addr().map_err(|error| ServeError::Bind {
        what,
        addr: "?".into(),
        error,
    })
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| ServeError::Bind {
            what,
            addr: addr.to_string(),
            error,
        })
}

/// Runs a node until `shutdown` is cancelled, then drains and stops it.
///
/// `on_ready` is called once the listeners are bound and Raft has started.
///
/// # Errors
/// [`ServeError`] when a listener cannot be bound or the store cannot be opened.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    let config = Arc::new(config);
    // Bind first and create state after: a node that cannot start leaves
    // nothing behind (no data directory, no generated secret).
    let http_listener = bind("http.listen", &config.http.listen).await?;
    let smtp_listener = bind("smtp.listen", &config.smtp.listen).await?;
    let cluster_listener = bind("cluster.listen", &config.cluster.listen).await?;
    let smtp_tls_listener = match config.smtp.tls_listen.as_str() {
        "" => None,
        addr => Some(bind("smtp.tls_listen", addr).await?),
    };
    let _data_dir_lock = crate::data_dir::lock(&config.data_dir)?;
    let secret = config.cluster_secret()?;
    let token_key = crate::http::TokenKey::from_secret(&secret);
    // Before Raft starts: a certificate that does not load stops the node
    // with nothing running.
    let tls = crate::smtp::tls::Tls::from_config(&config.smtp, &config.data_dir)?;
    let bound = Bound {
        http: local_addr("http.listen", &http_listener)?,
        smtp: local_addr("smtp.listen", &smtp_listener)?,
        smtp_tls: match &smtp_tls_listener {
            Some(l) => Some(local_addr("smtp.tls_listen", l)?),
            None => None,
        },
        cluster: local_addr("cluster.listen", &cluster_listener)?,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::from_env());
    let metrics = Arc::new(Metrics::new());
    metrics.runtime_workers.set(
        i64::try_from(tokio::runtime::Handle::current().metrics().num_workers())
            .unwrap_or(i64::MAX),
    );
    let relay = Arc::new(Relay::from_config(
        &config.relay,
        &config.smtp.hostname,
        metrics.clone(),
    )?);
    let forwarding =
        Arc::new(crate::mail::Forwarding::from_config(&config)?.with_metrics(&metrics));
    log_forwarding(&config, &forwarding);
    let peers = Peers::new(
        &secret,
        Duration::from_millis(config.cluster.rpc_timeout_ms),
    )?
    .with_local_address(Some(bound.cluster.ip()));
    let node = Node::start(&config, clock.clone(), peers, metrics.clone()).await?;
    tracing::info!(node_id = config.node_id, relay = %relay.describe(), "node started");
    let maintenance =
        Arc::new(Maintenance::load(&config.data_dir).map_err(ServeError::Maintenance)?);
    // Know the replicated flag before any listener takes work.
    if let Ok(c) = node.reader().cluster_maintenance() {
        maintenance.observe_cluster(&c);
    }
    if maintenance.draining() {
        tracing::warn!("starting in maintenance: draining until turned off");
    }
    let maintenance_watch = tokio::spawn(crate::maintenance::watch(
        maintenance.clone(),
        node.reader().clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // Cluster RPC stops last: peers need it while this node hands over leadership.
    let cluster_shutdown = CancellationToken::new();
    let cluster = tokio::spawn({
        let (node, metrics, token) = (node.clone(), metrics.clone(), cluster_shutdown.clone());
        let maintenance = maintenance.clone();
        async move {
            if let Err(e) = crate::cluster::service::serve(
                cluster_listener,
                node,
                maintenance,
                secret,
                metrics,
                token,
            )
            .await
            {
                tracing::error!(error = %e, "cluster RPC server");
            }
        }
    });
    let forming = tokio::spawn({
        let (node, members, token) = (node.clone(), config.members(), shutdown.clone());
        async move { node.form_cluster(members, token).await }
    });
    let watcher = tokio::spawn(watch_metrics(
        node.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let watchdog = tokio::spawn(crate::raft::watchdog::run(
        node.clone(),
        metrics.clone(),
        cluster_shutdown.clone(),
    ));
    let clocks = tokio::spawn(watch_clocks(
        node.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let purger = tokio::spawn(purge_expired(
        node.clone(),
        u64::from(config.limits.keep_expired_days) * 86_400_000,
        metrics.clone(),
        shutdown.clone(),
    ));

    let tls_reload = tokio::spawn(crate::smtp::tls::reload_on_hangup(
        tls.clone(),
        shutdown.clone(),
    ));
    let smtp_ctx = Arc::new(SmtpContext::new(
        &config,
        node.clone(),
        forwarding.clone(),
        relay.clone(),
        metrics.clone(),
        maintenance.clone(),
        tls,
    ));
    let smtp_abort = CancellationToken::new();
    let mut smtp = tokio::spawn(crate::smtp::serve(
        smtp_listener,
        smtp_tls_listener,
        smtp_ctx.clone(),
        shutdown.clone(),
        smtp_abort.clone(),
    ));

    let confirmer = config.limits.confirm_targets.then(|| {
        Arc::new(crate::confirm::Confirmer::new(
            relay.clone(),
            forwarding.clone(),
            node.clone(),
            metrics.clone(),
            &public_url(&config, bound.http),
            &config.domains[0],
            shutdown.clone(),
        ))
    });
    let state = crate::http::AppState::new(
        node.clone(),
        config.clone(),
        metrics.clone(),
        maintenance.clone(),
        token_key,
        confirmer.clone(),
    );
    let app = crate::http::router(state);
    let mut http = tokio::spawn(crate::http::listener::serve(
        http_listener,
        app,
        crate::http::listener::Limits {
            max_connections: config.http.max_connections,
            header_read_timeout: Duration::from_secs(config.http.header_read_timeout_secs),
            keepalive_idle: Duration::from_secs(config.http.keepalive_idle_secs),
        },
        Arc::new(crate::peer_limits::ConnectionCounts::new(
            config.http.max_connections_per_ip,
            // A reverse proxy carries many clients on one address. Validated
            // with the rest of the config at load time.
            crate::peer_limits::TrustedNets::new(
                config.http.trusted_proxy_nets().unwrap_or_default(),
            ),
        )),
        metrics.clone(),
        shutdown.clone(),
    ));

    on_ready(bound);
    shutdown.cancelled().await;
    let drain = drain_timeout(&config);
    tracing::info!(limit = ?drain, "shutting down: SMTP listener closed, draining sessions and HTTP requests");
    let drained = tokio::time::timeout(drain, async {
        let _ = (&mut smtp).await;
        let _ = (&mut http).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timed out; ending the remaining sessions");
        smtp_abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut smtp).await;
        http.abort();
    }
    // Confirmation mails in flight finish (or are withdrawn) while Raft runs.
    if let Some(c) = &confirmer {
        // One relay attempt (every smarthost once) for a mail being handed over.
        let attempt = config.relay.timeout_secs * config.relay.smarthosts.len().max(1) as u64;
        c.drain(Duration::from_secs(attempt + 5)).await;
    }
    // No message is being sent any more: the connections kept open for the
    // next one are closed politely.
    relay.close_idle(Duration::from_secs(5)).await;
    // Uses held by sessions that did not finish go back now, while Raft runs,
    // rather than when their leases lapse.
    smtp_ctx.drain_settlements(Duration::from_secs(10)).await;
    let _ = tls_reload.await;
    let _ = watcher.await;
    let _ = maintenance_watch.await;
    let _ = purger.await;
    let _ = clocks.await;
    let _ = forming.await;
    node.transfer_leadership().await;
    cluster_shutdown.cancel();
    let _ = cluster.await;
    let _ = watchdog.await;
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// `[http] public_url`, or `http://` and the bound HTTP address when it is
/// empty (right for a node on the user's own machine only).
fn public_url(config: &Config, http: SocketAddr) -> String {
    if config.http.public_url.is_empty() {
        format!("http://{http}")
    } else {
        config.http.public_url.clone()
    }
}

/// How often each node compares its clock with its peers'.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(15);

/// Exports each peer's clock offset. Replicated time is the leader's clock
/// (never running backwards), so a leader far ahead would expire aliases and
/// leases early for the whole cluster: operators must hear of skew first.
async fn watch_clocks(node: Node, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CLOCK_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let offsets = node.clock_offsets().await;
        metrics.clock_offset.clear();
        for (peer, ms) in offsets {
            metrics
                .clock_offset
                .get_or_create(&crate::metrics::PeerLabels {
                    peer: peer.to_string(),
                })
                .set(ms as f64 / 1000.0);
        }
    }
}

/// How often the leader proposes deleting long-expired aliases.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// On the leader, periodically deletes aliases long past their expiry: a
/// round of bounded purge entries, proposed one after the other while more
/// is due, so a backlog never holds up the writes behind it for long (see
/// `raft::purge`).
async fn purge_expired(
    node: Node,
    keep_ms: u64,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::raft::purge::every(PURGE_EVERY));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leads = || {
            !shutdown.is_cancelled()
                && node.raft().metrics().borrow().current_leader == Some(node.id)
        };
        if !leads() {
            continue;
        }
        let round = crate::raft::purge::round(
            |cmd| node.write(cmd),
            || node.purge_command(keep_ms),
            leads,
            &metrics,
        )
        .await;
        round.log();
    }
}

/// Mirrors Raft metrics into Prometheus gauges and refreshes the alias count.
async fn watch_metrics(node: Node, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut rx = node.raft().metrics();
    let mut recount = tokio::time::interval(Duration::from_secs(15));
    // A leader cut off from its quorum produces no metric changes, so the
    // gauges are also refreshed on a timer.
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    let mut last_candidate_term = 0u64;
    loop {
        {
            let m = rx.borrow_and_update().clone();
            if m.state == openraft::ServerState::Candidate && m.current_term > last_candidate_term {
                metrics.raft_elections.inc();
                last_candidate_term = m.current_term;
            }
            // Only the leader knows its peers' progress; everyone else (and a
            // leader for departed peers) exports no stale values.
            metrics.raft_replication_lag.clear();
            if let (Some(repl), Some(last)) = (&m.replication, m.last_log_index) {
                for (peer, matched) in repl.iter().filter(|(peer, _)| **peer != node.id) {
                    let behind = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                    metrics
                        .raft_replication_lag
                        .get_or_create(&crate::metrics::PeerLabels {
                            peer: peer.to_string(),
                        })
                        .set(behind as i64);
                }
            }
            metrics.raft_term.set(m.current_term as i64);
            metrics
                .raft_commit_index
                .set(m.last_applied.map(|l| l.index as i64).unwrap_or(0));
            metrics
                .raft_last_log_index
                .set(m.last_log_index.map(|i| i as i64).unwrap_or(0));
            // A leader without a quorum behind it is not reported as leading:
            // openraft 0.9 does not step it down, but it cannot commit anything.
            let leader = match m.current_leader {
                Some(l) if l == node.id && !node.leader_has_quorum(&m) => None,
                other => other,
            };
            metrics
                .raft_is_leader
                .set(i64::from(leader == Some(node.id)));
            metrics
                .raft_leader_id
                .set(leader.map(|l| l as i64).unwrap_or(0));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() {
                // Raft stopped (shutdown or a fatal storage error): this node
                // leads nothing and knows no leader any more.
                metrics.raft_is_leader.set(0);
                metrics.raft_leader_id.set(0);
                metrics.raft_replication_lag.clear();
                return;
            },
            _ = refresh.tick() => {}
            _ = recount.tick() => {
                let reader = node.reader().clone();
                let now = node.now_ms();
                if let Ok(Ok((live, _))) = tokio::task::spawn_blocking(move || reader.count(now)).await {
                    metrics.aliases_active.set(live as i64);
                }
            }
        }
    }
}

/// Text printed by `serve` at start-up, so a newcomer knows where to look.
pub fn banner(config: &Config, bound: &Bound) -> String {
    let mut rows = vec![
        ("HTTP API", format!("http://{}/", bound.http)),
        ("SMTP", bound.smtp.to_string()),
    ];
    if let Some(addr) = bound.smtp_tls {
        rows.push(("SMTP over TLS", addr.to_string()));
    }
    let smtp = &config.smtp;
    rows.push((
        "TLS certificate",
        if !smtp.tls_cert_file.is_empty() {
            smtp.tls_cert_file.clone()
        } else if smtp.tls_self_signed {
            format!("self-signed, in {}", config.data_dir.join("tls").display())
        } else {
            "none (STARTTLS off)".to_string()
        },
    ));
    rows.extend([
        ("cluster", bound.cluster.to_string()),
        ("alias domains", config.domains.join(", ")),
        ("data", config.data_dir.display().to_string()),
    ]);
    match config.relay.mode {
        RelayMode::Capture => rows.push((
            "forwarded mail",
            format!("captured in {}", config.relay.capture_dir.display()),
        )),
        RelayMode::Smarthost => rows.push((
            "forwarded mail",
            format!(
                "goes to {}",
                config
                    .relay
                    .smarthosts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        RelayMode::Mx => rows.push((
            "forwarded mail",
            "goes straight to each target's MX hosts".to_string(),
        )),
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut s = format!("tempalias node {} ready\n", config.node_id);
    for (k, v) in rows {
        s.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    s
}
