//! The `tempalias` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "tempalias",
    version,
    about = "Clustered temporary e-mail alias forwarder"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node. Without --config: one node on loopback, capturing forwarded mail.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format, overriding log.format: text or json.
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Validate a configuration file (and TEMPALIAS_* overrides) and exit.
    CheckConfig { file: PathBuf },
    /// Show or change cluster membership over the cluster RPC port.
    Cluster {
        /// Configuration to take the cluster secret and default node from.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Cluster address of the node to ask (default: cluster.listen).
        #[arg(long, global = true)]
        node: Option<String>,
        #[command(subcommand)]
        action: ClusterCmd,
    },
    /// Drain a node (or the whole cluster) for maintenance, undo it, or show it.
    Maintenance {
        /// Configuration to take the cluster secret and default node from.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Cluster address of the node to ask (default: cluster.listen).
        #[arg(long, global = true)]
        node: Option<String>,
        #[command(subcommand)]
        action: MaintenanceCmd,
    },
    /// Create, show or revoke aliases through a node's HTTP API.
    Alias {
        /// Base URL of the API.
        #[arg(
            long,
            env = "TEMPALIAS_API",
            default_value = "http://127.0.0.1:8080",
            global = true
        )]
        api: String,
        #[command(subcommand)]
        action: AliasCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, leader, term, each node's last applied index and lag.
    Status {
        /// Print the raw JSON reports instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a node as a learner; returns once it has caught up.
    AddLearner { id: u64, addr: String },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a node from the cluster.
    Remove { id: u64 },
}

#[derive(Subcommand, Debug)]
enum MaintenanceCmd {
    /// Start draining: SMTP answers 421, HTTP 503, /readyz 503.
    On {
        /// Every node of the cluster (replicated) instead of this node only.
        #[arg(long)]
        cluster: bool,
    },
    /// Stop draining.
    Off {
        /// Cluster-wide maintenance instead of this node's own.
        #[arg(long)]
        cluster: bool,
    },
    /// Show this node's maintenance state.
    Status {
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AliasCmd {
    /// Create an alias forwarding to TARGET.
    Create {
        target: String,
        #[arg(long)]
        days: Option<i64>,
        #[arg(long = "max-usage")]
        max_usage: Option<i64>,
    },
    /// Show an alias (needs the token returned at creation).
    Show {
        id: String,
        #[arg(long, env = "TEMPALIAS_TOKEN")]
        token: String,
    },
    /// Revoke an alias for good.
    Revoke {
        id: String,
        #[arg(long, env = "TEMPALIAS_TOKEN")]
        token: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tempalias: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out causes whose text the message
/// before already contains (error types that print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig { file } => {
            let config = Config::load(Some(&file))?;
            println!(
                "{}: ok (node {}, domains {})",
                file.display(),
                config.node_id,
                config.domains.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve { config, log_format } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(f) = log_format {
                config.log.format = f;
                config.validate()?;
            }
            init_logging(&config);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster {
            config,
            node,
            action,
        } => {
            let config = Config::load(config.as_deref())?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(cluster(&config, node, action))
        }
        Cmd::Maintenance {
            config,
            node,
            action,
        } => {
            let config = Config::load(config.as_deref())?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(maintenance(&config, node, action))
        }
        Cmd::Alias { api, action } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(alias(&api, action))
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        signal.cancel();
    });
    let banner_config = config.clone();
    crate::server::run(config, shutdown, move |bound| {
        print!("{}", crate::server::banner(&banner_config, &bound));
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .await?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn cluster(
    config: &Config,
    node: Option<String>,
    action: ClusterCmd,
) -> anyhow::Result<ExitCode> {
    use crate::cluster::client::Peers;
    use crate::cluster::messages::MembershipChange;
    let secret = config.cluster_secret()?;
    let peers = Peers::new(&secret, std::time::Duration::from_secs(5))?;
    let addr = node.unwrap_or_else(|| config.cluster.listen.clone());
    let change = match action {
        ClusterCmd::Status { json } => {
            let first = peers
                .status(&addr)
                .await
                .with_context(|| format!("asking {addr}"))?;
            let mut reports = Vec::new();
            for (id, member_addr) in &first.nodes {
                let report = if *id == first.id {
                    Ok(first.clone())
                } else {
                    peers.status(member_addr).await
                };
                reports.push((*id, member_addr.clone(), report));
            }
            if reports.is_empty() {
                reports.push((first.id, addr.clone(), Ok(first.clone())));
            }
            if json {
                let all: Vec<_> = reports
                    .iter()
                    .map(|(id, a, r)| match r {
                        Ok(r) => serde_json::json!({ "id": id, "addr": a, "status": r }),
                        Err(e) => {
                            serde_json::json!({ "id": id, "addr": a, "error": e.to_string() })
                        }
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(ExitCode::SUCCESS);
            }
            let head = reports
                .iter()
                .filter_map(|(_, _, r)| r.as_ref().ok())
                .filter_map(|r| r.last_log_index)
                .max()
                .unwrap_or(0);
            let leader = reports
                .iter()
                .filter_map(|(_, _, r)| r.as_ref().ok())
                .find(|r| {
                    r.leader == Some(r.id)
                        && (r.voters.len() <= 1
                            || r.millis_since_quorum_ack
                                .is_some_and(|ms| ms <= 2 * config.cluster.election_timeout_ms))
                });
            match leader {
                Some(l) => println!("leader: node {} (term {})", l.id, l.term),
                None => println!("leader: none known"),
            }
            println!("voters: {:?}  learners: {:?}", first.voters, first.learners);
            println!(
                "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>6}",
                "id", "address", "state", "term", "applied", "lag"
            );
            for (id, a, r) in &reports {
                match r {
                    Ok(r) => {
                        let applied = r.last_applied.unwrap_or(0);
                        // openraft 0.9 does not step a cut-off leader down; say so.
                        let no_quorum = r.state == "Leader"
                            && r.voters.len() > 1
                            && r.millis_since_quorum_ack
                                .is_none_or(|ms| ms > 2 * config.cluster.election_timeout_ms);
                        let state = if no_quorum {
                            "Leader(no quorum)".to_string()
                        } else {
                            r.state.clone()
                        };
                        println!(
                            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>6}",
                            id,
                            a,
                            state,
                            r.term,
                            applied,
                            head.saturating_sub(applied)
                        );
                    }
                    Err(e) => println!("{id:>4}  {a:<22} unreachable: {e}"),
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCmd::AddLearner { id, addr } => MembershipChange::AddLearner { id, addr },
        ClusterCmd::Promote { id } => MembershipChange::Promote { id },
        ClusterCmd::Remove { id } => MembershipChange::Remove { id },
    };
    let resp = peers
        .change_membership(&addr, &change, std::time::Duration::from_secs(300))
        .await
        .with_context(|| format!("asking {addr}"))?;
    if resp.ok {
        println!("{}", resp.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tempalias: {}", resp.message);
        Ok(ExitCode::FAILURE)
    }
}

async fn maintenance(
    config: &Config,
    node: Option<String>,
    action: MaintenanceCmd,
) -> anyhow::Result<ExitCode> {
    use crate::maintenance::{MaintenanceAction, MaintenanceRequest};
    let secret = config.cluster_secret()?;
    let addr = node.unwrap_or_else(|| config.cluster.listen.clone());
    let (req, json) = match action {
        MaintenanceCmd::On { cluster } => (
            MaintenanceRequest {
                action: MaintenanceAction::On,
                cluster,
            },
            false,
        ),
        MaintenanceCmd::Off { cluster } => (
            MaintenanceRequest {
                action: MaintenanceAction::Off,
                cluster,
            },
            false,
        ),
        MaintenanceCmd::Status { json } => (
            MaintenanceRequest {
                action: MaintenanceAction::Status,
                cluster: false,
            },
            json,
        ),
    };
    let report = crate::maintenance::ask(&addr, &secret, &req, std::time::Duration::from_secs(15))
        .await
        .with_context(|| format!("asking {addr}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let since = |ms: Option<u64>| {
            ms.map(|ms| format!(" since {}", crate::clock::rfc3339(ms)))
                .unwrap_or_default()
        };
        println!(
            "node {}: {}",
            report.node_id,
            if report.draining {
                "draining"
            } else {
                "serving"
            }
        );
        println!(
            "  node maintenance:    {}{}",
            if report.node { "on" } else { "off" },
            since(report.node_since_ms)
        );
        println!(
            "  cluster maintenance: {}{}",
            if report.cluster { "on" } else { "off" },
            since(report.cluster_since_ms)
        );
    }
    if let Some(e) = report.error {
        eprintln!("tempalias: {e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn alias(api: &str, action: AliasCmd) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let base = api.trim_end_matches('/');
    let resp = match action {
        AliasCmd::Create {
            target,
            days,
            max_usage,
        } => {
            let mut body = serde_json::json!({ "target": target });
            if let Some(d) = days {
                body["days"] = d.into();
            }
            if let Some(m) = max_usage {
                body["max-usage"] = m.into();
            }
            if days.is_none() && max_usage.is_none() {
                bail!("give --days and/or --max-usage");
            }
            client
                .post(format!("{base}/v1/aliases"))
                .json(&body)
                .send()
                .await
        }
        AliasCmd::Show { id, token } => {
            client
                .get(format!("{base}/v1/aliases/{id}"))
                .bearer_auth(token)
                .send()
                .await
        }
        AliasCmd::Revoke { id, token } => {
            client
                .delete(format!("{base}/v1/aliases/{id}"))
                .bearer_auth(token)
                .send()
                .await
        }
    }
    .with_context(|| format!("calling {base}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status.is_success() {
        if text.is_empty() {
            println!("{}", status);
        } else {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Err(_) => println!("{text}"),
            }
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tempalias: {status}: {text}");
        Ok(ExitCode::FAILURE)
    }
}
