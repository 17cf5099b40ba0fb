//! The handle through which SMTP and HTTP read and write alias state.
//!
//! Writes go through Raft: the node stamps the entry with its clock (it is the
//! leader: a one-member cluster always is) and waits until the entry is
//! committed and applied. Reads come from the local replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, SnapshotPolicy};

use super::network::NoPeers;
use super::store::{self, DbError, StateReader};
use super::types::{Command, NodeId, Request, Response, TypeConfig};
use crate::clock::Clock;
use crate::config::Config;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the store: {0}")]
    Store(#[from] DbError),
    #[error("raft configuration: {0}")]
    RaftConfig(String),
    #[error("starting raft: {0}")]
    Raft(String),
}

/// Why a write did not take effect. None of these says anything about the
/// alias itself, so callers answer with a temporary failure (SMTP `451`,
/// HTTP `503`), never with a permanent one.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no quorum or no leader: {0}")]
    Unavailable(String),
    #[error("the write was not committed within {0:?}")]
    Timeout(Duration),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// One node's Raft instance, its local replica and its clock.
#[derive(Clone)]
pub struct Node {
    pub id: NodeId,
    raft: Raft<TypeConfig>,
    reader: StateReader,
    clock: Arc<dyn Clock>,
    write_timeout: Duration,
}

impl Node {
    /// Opens the store, starts Raft and forms the cluster on first start.
    ///
    /// # Errors
    /// [`StartError`] when the store cannot be opened or Raft cannot start.
    pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let path = config.db_path();
        let (log_store, state_machine) = tokio::task::spawn_blocking(move || store::open(&path))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??;
        let reader = state_machine.reader();
        let raft_config = openraft::Config {
            cluster_name: "tempalias".into(),
            heartbeat_interval: 250,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.cluster.snapshot_after_entries),
            max_in_snapshot_log_to_keep: 500,
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| StartError::RaftConfig(e.to_string()))?,
        );
        let raft = Raft::new(
            config.node_id,
            raft_config,
            NoPeers,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let node = Node {
            id: config.node_id,
            raft,
            reader,
            clock,
            write_timeout: Duration::from_millis(config.cluster.write_timeout_ms),
        };
        node.form_cluster(&config.members()).await?;
        Ok(node)
    }

    /// Initialises the cluster from `initial_members` exactly once: a node that
    /// already has state (a restart) skips this.
    async fn form_cluster(&self, members: &BTreeMap<NodeId, String>) -> Result<(), StartError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "forming the cluster");
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))
    }

    /// Commits `cmd` through Raft and returns the state machine's answer.
    ///
    /// # Errors
    /// [`WriteError`] when the write could not be committed now.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        let req = Request {
            now_ms: self.clock.now_ms(),
            cmd,
        };
        match tokio::time::timeout(self.write_timeout, self.raft.client_write(req)).await {
            Err(_) => Err(WriteError::Timeout(self.write_timeout)),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(
                WriteError::Unavailable(format!("leader is {:?}", f.leader_id)),
            ),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(WriteError::Unavailable(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// The local replica of the state machine.
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// The replicated clock as this node sees it (for display, not decisions).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The openraft handle (metrics, membership, shutdown).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// True when this node knows a leader that has a quorum behind it.
    pub fn has_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.running_state.is_ok() && m.current_leader.is_some()
    }

    /// Stops Raft (flushing what it holds).
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
