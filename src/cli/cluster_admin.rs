//! `tempalias cluster status|add-learner|promote|remove`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;

use super::ClusterCmd;
use crate::cluster::client::{Peers, RpcError};
use crate::cluster::messages::{MembershipChange, StatusReport};
use crate::config::Config;

/// What `status` calls a leader that no quorum acknowledged within two
/// election timeouts: openraft 0.9 does not step it down, but it cannot
/// commit, and its own `/readyz` says it is not ready. The launcher's status
/// uses the same words.
pub const LEADER_WITHOUT_QUORUM: &str = "leader without quorum";

pub(super) async fn run(
    config: Option<&Path>,
    secret_file: Option<&Path>,
    node: Option<String>,
    action: ClusterCmd,
) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config)?;
    if let Some(path) = secret_file {
        config.cluster.secret = None;
        config.cluster.secret_file = Some(path.to_path_buf());
    }
    let (secret, secret_from) = config.existing_cluster_secret()?;
    let peers = Peers::new(&secret, Duration::from_secs(5))?;
    let addr = node.unwrap_or_else(|| config.cluster.listen.clone());
    // A refused secret is the usual mistake (an old ./tempalias-data secret
    // while another cluster runs): say where ours came from and what to pass.
    let explain = |e: RpcError| {
        match e {
        RpcError::Unauthenticated { addr } => anyhow!(
            "{addr} refused the cluster secret from {secret_from}: it belongs to another cluster. \
             Give the node's configuration with --config FILE, or its secret with --secret-file FILE"
        ),
        RpcError::Unreachable { addr, message } => anyhow!(
            "cannot reach {addr} ({message}): is a node running there? Choose it with --node ADDR or --config FILE"
        ),
        other => anyhow!(other),
    }
    };
    let change = match action {
        ClusterCmd::Status { json } => {
            let first = peers.status(&addr).await.map_err(explain)?;
            return status(&config, &peers, &addr, first, json).await;
        }
        ClusterCmd::AddLearner { id, addr } => MembershipChange::AddLearner { id, addr },
        ClusterCmd::Promote { id } => MembershipChange::Promote { id },
        ClusterCmd::Remove { id } => MembershipChange::Remove { id },
    };
    let resp = peers
        .change_membership(&addr, &change, Duration::from_secs(300))
        .await
        .map_err(explain)?;
    if resp.ok {
        println!("{}", resp.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{}: {}", super::style::error_label(), resp.message);
        Ok(ExitCode::FAILURE)
    }
}

/// A member's role as the table and `--json` show it.
fn role(r: &StatusReport, election_timeout_ms: u64) -> String {
    let no_quorum = r.state == "Leader"
        && r.voters.len() > 1
        && r.millis_since_quorum_ack
            .is_none_or(|ms| ms >= 2 * election_timeout_ms);
    if no_quorum {
        LEADER_WITHOUT_QUORUM.to_string()
    } else {
        r.state.clone()
    }
}

/// Why a member did not answer, in a few words (its address is in its row).
fn short_reason(e: &RpcError) -> String {
    match e {
        RpcError::Unreachable { message, .. } => format!("unreachable ({message})"),
        RpcError::Unauthenticated { .. } => "refused the cluster secret".into(),
        RpcError::Failed { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

async fn status(
    config: &Config,
    peers: &Peers,
    addr: &str,
    first: StatusReport,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let election = config.cluster.election_timeout_ms;
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
        reports.push((first.id, addr.to_string(), Ok(first.clone())));
    }
    if json {
        let all: Vec<_> = reports
            .iter()
            .map(|(id, a, r)| match r {
                Ok(r) => serde_json::json!({
                    "id": id, "addr": a, "role": role(r, election), "status": r
                }),
                Err(e) => serde_json::json!({ "id": id, "addr": a, "error": short_reason(e) }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&first, &reports, election));
    Ok(ExitCode::SUCCESS)
}

type Row = (u64, String, Result<StatusReport, RpcError>);

/// The human-readable status: leader line, membership, one row per member,
/// then the reasons of members that did not answer (kept out of the rows so
/// the columns stay aligned).
fn table(first: &StatusReport, reports: &[Row], election: u64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let answered = || reports.iter().filter_map(|(_, _, r)| r.as_ref().ok());
    let head = answered()
        .filter_map(|r| r.last_log_index)
        .max()
        .unwrap_or(0);
    let leader = answered().find(|r| r.leader == Some(r.id) && role(r, election) == "Leader");
    let stranded: Vec<u64> = answered()
        .filter(|r| role(r, election) == LEADER_WITHOUT_QUORUM)
        .map(|r| r.id)
        .collect();
    let _ =
        match (leader, stranded.as_slice()) {
            (Some(l), _) => writeln!(s, "leader: node {} (term {})", l.id, l.term),
            (None, []) => writeln!(s, "leader: none known"),
            (None, ids) => writeln!(
            s,
            "leader: none with a quorum (node {} is a {LEADER_WITHOUT_QUORUM}: it cannot commit)",
            ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
        };
    let _ = writeln!(
        s,
        "voters: {:?}  learners: {:?}",
        first.voters, first.learners
    );
    let _ = writeln!(
        s,
        "{:>4}  {:<22} {:<21} {:>6} {:>10} {:>6}",
        "id", "address", "state", "term", "applied", "lag"
    );
    let mut notes = Vec::new();
    for (id, a, r) in reports {
        let _ = match r {
            Ok(r) => {
                let applied = r.last_applied.unwrap_or(0);
                writeln!(
                    s,
                    "{:>4}  {:<22} {:<21} {:>6} {:>10} {:>6}",
                    id,
                    a,
                    role(r, election),
                    r.term,
                    applied,
                    head.saturating_sub(applied)
                )
            }
            Err(e) => {
                notes.push(format!("node {id}: {}", short_reason(e)));
                let state = match e {
                    RpcError::Unreachable { .. } => "unreachable",
                    _ => "no answer",
                };
                writeln!(
                    s,
                    "{:>4}  {:<22} {:<21} {:>6} {:>10} {:>6}",
                    id, a, state, "-", "-", "-"
                )
            }
        };
    }
    for n in notes {
        let _ = writeln!(s, "{n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: u64, state: &str, ack: Option<u64>) -> StatusReport {
        StatusReport {
            id,
            state: state.into(),
            term: 2,
            leader: Some(3),
            last_log_index: Some(6),
            last_applied: Some(6),
            snapshot_index: None,
            purged_index: None,
            initialized: true,
            voters: vec![1, 2, 3],
            learners: vec![],
            nodes: Default::default(),
            replication: Default::default(),
            millis_since_quorum_ack: ack,
            now_ms: 0,
            leader_alive: ack.is_some_and(|ms| ms < 500),
            last_log_term: Some(2),
            applies_batches: true,
            applies_bounded_purges: true,
        }
    }

    #[test]
    fn an_unreachable_member_keeps_the_columns_and_is_named_once() {
        let rows: Vec<Row> = vec![
            (
                1,
                "127.0.0.1:7001".into(),
                Err(RpcError::Unreachable {
                    addr: "127.0.0.1:7001".into(),
                    message: "tcp connect error".into(),
                }),
            ),
            (
                3,
                "127.0.0.3:7001".into(),
                Ok(report(3, "Leader", Some(10))),
            ),
        ];
        let out = table(&report(3, "Leader", Some(10)), &rows, 1000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "leader: node 3 (term 2)");
        let (header, down, up) = (lines[2], lines[3], lines[4]);
        assert_eq!(down.len(), up.len(), "{out}");
        assert_eq!(header.len(), up.len(), "{out}");
        assert_eq!(out.matches("127.0.0.1:7001").count(), 1, "{out}");
        assert!(
            out.contains("node 1: unreachable (tcp connect error)"),
            "{out}"
        );
    }

    #[test]
    fn a_leader_without_quorum_is_not_the_leader() {
        let lone = report(3, "Leader", Some(60_000));
        let rows: Vec<Row> = vec![(3, "127.0.0.3:7001".into(), Ok(lone.clone()))];
        let out = table(&lone, &rows, 1000);
        assert!(
            out.starts_with("leader: none with a quorum (node 3"),
            "{out}"
        );
        assert!(out.contains(LEADER_WITHOUT_QUORUM), "{out}");
        assert_eq!(
            role(&report(3, "Leader", None), 1000),
            LEADER_WITHOUT_QUORUM
        );
        assert_eq!(role(&report(3, "Leader", Some(5)), 1000), "Leader");
        assert_eq!(role(&report(3, "Follower", None), 1000), "Follower");
    }
}
