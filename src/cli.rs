//! The `tempalias` command line: the definitions (also the source of the
//! shell completions and the man page) and the dispatch to each subcommand.

mod alias_client;
mod cluster_admin;
mod style;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "tempalias",
    version,
    about = "Clustered temporary e-mail alias forwarder",
    long_about = "Clustered temporary e-mail alias forwarder.\n\n\
        One binary: `serve` runs a node (with no configuration, a single node on \
        loopback that captures forwarded mail), `alias` talks to a node's HTTP API, \
        `cluster` shows and changes membership, `check-config` validates a \
        configuration file.",
    after_help = "Configuration keys and their TEMPALIAS_* environment variables: docs/configuration.md.\n\
        Set NO_COLOR to turn colours off (they are only used on a terminal)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node until SIGTERM or Ctrl-C.
    #[command(
        long_about = "Run a node until SIGTERM or Ctrl-C, then drain and stop.\n\n\
            Without --config: one node on loopback (HTTP 127.0.0.1:8080, SMTP \
            127.0.0.1:2525, cluster 127.0.0.1:7001), data in ./tempalias-data, \
            forwarded mail captured in ./tempalias-data/outbox."
    )]
    Serve {
        /// Configuration file (TOML, every key in docs/configuration.md).
        /// Default: none, the built-in single-node defaults. TEMPALIAS_*
        /// variables override the file and the defaults.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log format, overriding the configuration's log.format (default: text).
        #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
        log_format: Option<String>,
    },
    /// Check a configuration file (and TEMPALIAS_* overrides) and exit.
    #[command(
        long_about = "Check a configuration file and the TEMPALIAS_* variables set \
            now, as `serve` would read them, and exit: 0 and a summary when it is \
            usable, 1 and every problem (file line or variable, key, reason) \
            otherwise."
    )]
    CheckConfig {
        /// The configuration file to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show or change cluster membership over the cluster port.
    Cluster {
        /// Configuration to take the cluster secret and the node to ask from.
        /// Default: none, the single-node defaults (secret in
        /// ./tempalias-data/cluster.secret, node 127.0.0.1:7001).
        #[arg(long, short, global = true, value_name = "FILE")]
        config: Option<PathBuf>,
        /// File holding the cluster secret (first line), overriding the
        /// configuration's.
        #[arg(long, global = true, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Cluster address (host:port) of the node to ask. Default: the
        /// configuration's cluster.listen.
        #[arg(long, global = true, value_name = "ADDR")]
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
        /// Base URL of a node's HTTP API; without a scheme, http:// is assumed.
        #[arg(
            long,
            env = "TEMPALIAS_API",
            default_value = "http://127.0.0.1:8080",
            global = true,
            value_name = "URL"
        )]
        api: String,
        /// Print the API's JSON answer instead of a summary.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: AliasCmd,
    },
    /// DKIM keys for the alias domains.
    Dkim {
        #[command(subcommand)]
        action: DkimCmd,
    },
    /// Print a shell completion script.
    #[command(
        long_about = "Print a completion script for SHELL on standard output. For example:\n  \
            tempalias completions bash > ~/.local/share/bash-completion/completions/tempalias\n  \
            tempalias completions zsh > ~/.zfunc/_tempalias\n  \
            tempalias completions fish > ~/.config/fish/completions/tempalias.fish"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output.
    #[command(
        long_about = "Print the manual page, generated from these definitions, in roff \
            on standard output. Read it with `tempalias man | man -l -`, or install it \
            with `tempalias man > /usr/local/share/man/man1/tempalias.1`."
    )]
    Man,
    /// Make TLS certificates for the SMTP listeners.
    Tls {
        #[command(subcommand)]
        action: TlsCmd,
    },
}

#[derive(Subcommand, Debug)]
enum TlsCmd {
    /// Write a self-signed certificate and its key for a host name.
    #[command(
        long_about = "Write a self-signed certificate for HOST and its private key \
            (ECDSA P-256, PEM; the key readable by its owner only), to use as \
            [smtp] tls_cert_file and tls_key_file. Sending MTAs do not check an \
            MX's certificate, so a self-signed one already keeps mail from being \
            read on the wire; replace it with one from a CA (ACME) when you want \
            senders that do check (MTA-STS, DANE) to trust it. A running node \
            picks up new files on SIGHUP."
    )]
    Selfsigned {
        /// The host name the certificate is for (the MX name, smtp.hostname).
        #[arg(value_name = "HOST")]
        host: String,
        /// Where to write the certificate.
        #[arg(long, value_name = "FILE", default_value = "tls-cert.pem")]
        cert: PathBuf,
        /// Where to write the private key.
        #[arg(long, value_name = "FILE", default_value = "tls-key.pem")]
        key: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, leader, term, each node's last applied index and lag.
    Status {
        /// Print each member's raw status report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a node as a learner; returns once it has caught up.
    AddLearner {
        /// The new node's node_id: a positive integer never used before in this cluster.
        #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// The new node's cluster address, host:port (its cluster.listen).
        #[arg(value_name = "ADDR")]
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner's node id.
        #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Remove a node (voter or learner) from the cluster.
    Remove {
        /// The node's id.
        #[arg(value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum DkimCmd {
    /// Generate a signing key (or an RSA and an Ed25519 key): writes the
    /// private key (mode 0600, never over an existing file) and prints the
    /// DNS TXT record and the configuration.
    #[command(
        long_about = "Generate a DKIM signing key for an alias domain. The private key \
            is written to --out (mode 0600; an existing file is never overwritten); \
            the DNS TXT record to publish at SELECTOR._domainkey.DOMAIN and the \
            [[dkim.keys]] entry for the configuration are printed. Copy the key \
            file to every node: they all sign with the same key.\n\n\
            --algorithm both makes two keys, RSA-2048 under the selector SELECTOR-rsa \
            and Ed25519 under SELECTOR-ed25519, writes them into --out-dir and prints \
            both records and both entries: every message then carries two \
            signatures, one every receiver checks and one for those that check \
            Ed25519 (RFC 8463)."
    )]
    Keygen {
        /// The alias domain the key signs for (d=).
        #[arg(long, value_name = "DOMAIN")]
        domain: String,
        /// The selector (s=), e.g. the month the key was made: 202611. With
        /// --algorithm both, the stem of the two selectors.
        #[arg(long, value_name = "SELECTOR")]
        selector: String,
        /// rsa (2048 bits, checked everywhere), ed25519, or both (two keys).
        #[arg(long, value_name = "ALG", default_value = "rsa", value_parser = ["rsa", "ed25519", "both"])]
        algorithm: String,
        /// Where to write the private key. Default: SELECTOR.DOMAIN.key in
        /// --out-dir. Not with --algorithm both (two files).
        #[arg(long, value_name = "FILE", conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// The directory for SELECTOR.DOMAIN.key (default: the current one).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
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
    /// Create an alias forwarding to TARGET; prints it with its token.
    Create {
        /// The address mail to the alias is forwarded to.
        #[arg(value_name = "TARGET")]
        target: String,
        /// Days the alias lives, at least 1 and at most the node's
        /// limits.max_days (60 by default). Default: that maximum.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        days: Option<i64>,
        /// Messages the alias forwards before it stops, at least 1 and at most
        /// the node's limits.max_usage (100 by default). Default: that maximum.
        /// Give --days, --max-usage or both.
        #[arg(long = "max-usage", value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        max_usage: Option<i64>,
    },
    /// Show an alias: target, state, expiry, uses left.
    Show {
        /// The alias id (the part before the @).
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Revoke an alias for good: from then on it refuses all mail.
    Revoke {
        /// The alias id (the part before the @).
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        token: TokenArgs,
    },
}

/// The management token. On the command line it is visible to every local
/// user in `ps` and lands in shell history, hence the environment and a file.
#[derive(Args, Debug)]
struct TokenArgs {
    /// The token returned when the alias was created. Prefer TEMPALIAS_TOKEN
    /// or --token-file: a token given here is kept in your shell history and
    /// is visible to other users in `ps`.
    #[arg(
        long,
        env = "TEMPALIAS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Read the token from FILE (its first line; "-" reads standard input).
    /// Takes precedence over --token and TEMPALIAS_TOKEN.
    #[arg(long, env = "TEMPALIAS_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: &str,
    out: Option<PathBuf>,
    out_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    use crate::mail::dkim;
    let domain = domain.to_ascii_lowercase();
    anyhow::ensure!(
        crate::alias::is_valid_domain(&domain),
        "--domain {domain:?} is not a domain name"
    );
    anyhow::ensure!(
        !selector.is_empty()
            && selector
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
        "--selector {selector:?} is not a DNS label"
    );
    // (selector, algorithm) of each key to make, RSA first (the order the
    // signatures take in a message).
    let keys: Vec<(String, dkim::Algorithm)> = match algorithm {
        "both" => {
            anyhow::ensure!(
                out.is_none(),
                "--out names one file; --algorithm both writes two: use --out-dir"
            );
            vec![
                (format!("{selector}-rsa"), dkim::Algorithm::Rsa),
                (format!("{selector}-ed25519"), dkim::Algorithm::Ed25519),
            ]
        }
        "ed25519" => vec![(selector.to_string(), dkim::Algorithm::Ed25519)],
        _ => vec![(selector.to_string(), dkim::Algorithm::Rsa)],
    };
    let dir = out_dir.unwrap_or_else(|| PathBuf::from("."));
    let paths: Vec<PathBuf> = keys
        .iter()
        .map(|(s, _)| {
            out.clone()
                .unwrap_or_else(|| dir.join(format!("{s}.{domain}.key")))
        })
        .collect();
    // Neither file is written when one is in the way.
    for path in &paths {
        anyhow::ensure!(
            !path.exists(),
            "cannot write {}: File exists (a published key would stop working)",
            path.display()
        );
    }
    let mut written = Vec::new();
    for ((_, alg), path) in keys.iter().zip(&paths) {
        let made = dkim::generate(*alg)
            .and_then(|key| dkim::write_key_file(path, &key.private_pem).map(|()| key));
        match made {
            Ok(key) => written.push(key),
            Err(e) => {
                // All or nothing: no half of a pair stays behind. A file
                // that failed half-way is removed by write_key_file itself.
                for p in &paths[..written.len()] {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e.into());
            }
        }
    }
    for (((sel, _), path), key) in keys.iter().zip(&paths).zip(&written) {
        println!("; private key written to {}", path.display());
        println!("; publish this record in the zone of {domain}:");
        println!("{}", dkim::zone_line(&domain, sel, &key.txt));
    }
    println!();
    println!("# and add this to every node's configuration (same key files on each):");
    for ((sel, alg), path) in keys.iter().zip(&paths) {
        println!("[[dkim.keys]]");
        println!("domain = \"{domain}\"");
        println!("selector = \"{sel}\"");
        println!("key_file = {:?}", path.display().to_string());
        println!("algorithm = \"{}\"", dkim::dns_name(*alg));
    }
    Ok(ExitCode::SUCCESS)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Read while the process has one thread: the local offset cannot be
    // determined soundly once the runtime's threads exist.
    let local_offset = time::UtcOffset::current_local_offset().unwrap_or(time::UtcOffset::UTC);
    let cli = Cli::parse();
    match run(cli, local_offset) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}: {}", style::error_label(), error_chain(&e));
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

fn run(cli: Cli, local_offset: time::UtcOffset) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig { file } => {
            let config = Config::load(Some(&file))?;
            // Certificate files are read at start-up: a file that would keep
            // the node from starting is a configuration error too.
            crate::smtp::tls::check_files(&config.smtp)
                .with_context(|| format!("{}: smtp.tls_cert_file", file.display()))?;
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
            }
            init_logging(&config);
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.enable_all();
            if config.worker_threads > 0 {
                runtime.worker_threads(config.worker_threads);
            }
            let runtime = runtime.build().context("starting the runtime")?;
            runtime.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster {
            config,
            secret_file,
            node,
            action,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(cluster_admin::run(
                config.as_deref(),
                secret_file.as_deref(),
                node,
                action,
            ))
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
        Cmd::Alias { api, json, action } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(alias_client::run(&api, json, action, local_offset))
        }
        Cmd::Dkim {
            action:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                    out_dir,
                },
        } => dkim_keygen(&domain, &selector, &algorithm, out, out_dir),
        Cmd::Completions { shell } => {
            // Generated into memory: the generator panics on a write error
            // (such as a closed pipe), which we report instead.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tempalias", &mut script);
            write_stdout(&script).context("writing the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tls {
            action:
                TlsCmd::Selfsigned {
                    host,
                    cert,
                    key,
                    days,
                },
        } => {
            crate::smtp::tls::write_self_signed(&host, days, &cert, &key)?;
            println!(
                "wrote {} and {} for {host}, valid {days} days",
                cert.display(),
                key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .context("rendering the man page")?;
            write_stdout(&page).context("writing the man page")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(style::colour(&std::io::stderr()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// Every argument and option says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tempalias", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn a_bad_flag_value_names_the_flag() {
        let e = Cli::try_parse_from(["tempalias", "serve", "--log-format", "xml"]).unwrap_err();
        assert!(e.to_string().contains("--log-format"), "{e}");
        let e = Cli::try_parse_from(["tempalias", "alias", "create", "a@b.example", "--days", "0"])
            .unwrap_err();
        assert!(e.to_string().contains("--days"), "{e}");
    }
}
