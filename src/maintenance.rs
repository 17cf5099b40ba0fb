//! Maintenance and drain: whether this node takes new work.
//!
//! Two switches, either of which drains the node:
//!
//! - **node** maintenance, for a rolling upgrade of one node. It is this node's
//!   own business, so it is not replicated: a file in the data directory
//!   (`maintenance`) holds it, and a restarted node comes back still drained
//!   until an operator turns it off.
//! - **cluster** maintenance, for a planned outage of the whole service. It is
//!   one replicated command ([`Command::SetMaintenance`]), so every node
//!   (including one that was down when it was set) ends up in the same state.
//!   Each node polls its replica every [`POLL_EVERY`], so the switch takes
//!   effect everywhere within that much of the entry being applied.
//!
//! While drained, new SMTP connections get `421 4.3.2` (senders try the next
//! MX), sessions already open finish, the public HTTP listener answers `503`
//! except to the `[maintenance] allow` networks, and `/readyz` answers `503` so
//! load balancers take the node out; `/healthz` stays `200`.
//!
//! Operators switch it with `tempalias maintenance on|off [--cluster]`, which
//! calls the `Maintenance` RPC on the node's cluster port (authenticated by
//! the cluster secret, never reachable through the public listeners).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::raft::store::StateReader;
use crate::raft::types::{ClusterMaintenance, Command, Response};
use crate::raft::Node;

/// How often a node looks at the replicated cluster-wide flag.
pub const POLL_EVERY: Duration = Duration::from_millis(250);

/// Name of the node-maintenance file in the data directory.
const FILE_NAME: &str = "maintenance";

/// The drain state of one node, shared by the SMTP and HTTP front ends.
#[derive(Debug)]
pub struct Maintenance {
    /// Where node maintenance is persisted.
    file: PathBuf,
    /// Node maintenance: on while the file exists.
    node: AtomicBool,
    /// When node maintenance was turned on (ms since the epoch; 0 when off).
    node_since_ms: AtomicU64,
    /// The replicated cluster-wide flag, as last read from this replica.
    cluster: AtomicBool,
    /// The replicated time of the last cluster-wide change.
    cluster_since_ms: AtomicU64,
}

/// What the node-maintenance file holds.
#[derive(Serialize, Deserialize)]
struct NodeFile {
    since_ms: u64,
}

impl Maintenance {
    /// Reads the node-maintenance file of `data_dir` (a missing file is off).
    ///
    /// # Errors
    /// The I/O error when the file exists but cannot be read.
    pub fn load(data_dir: &Path) -> std::io::Result<Self> {
        let file = data_dir.join(FILE_NAME);
        let since = match std::fs::read(&file) {
            Ok(bytes) => Some(
                serde_json::from_slice::<NodeFile>(&bytes)
                    .map(|f| f.since_ms)
                    // A file an operator wrote by hand still means "on".
                    .unwrap_or(1),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Self {
            file,
            node: AtomicBool::new(since.is_some()),
            node_since_ms: AtomicU64::new(since.unwrap_or(0)),
            cluster: AtomicBool::new(false),
            cluster_since_ms: AtomicU64::new(0),
        })
    }

    /// True while the node must not take new work.
    pub fn draining(&self) -> bool {
        self.node.load(Ordering::Relaxed) || self.cluster.load(Ordering::Relaxed)
    }

    /// Turns node maintenance on or off, persisting it first so that the state
    /// a caller was told about survives a crash right after.
    ///
    /// # Errors
    /// The I/O error writing or removing the file; the state is then unchanged.
    pub fn set_node(&self, on: bool, now_ms: u64) -> std::io::Result<()> {
        if on {
            if self.node.load(Ordering::Relaxed) {
                return Ok(());
            }
            let tmp = self.file.with_extension("tmp");
            {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&serde_json::to_vec(&NodeFile { since_ms: now_ms })?)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &self.file)?;
            sync_dir(&self.file)?;
            self.node_since_ms.store(now_ms, Ordering::Relaxed);
            self.node.store(true, Ordering::Relaxed);
            tracing::warn!("node maintenance on: draining");
        } else {
            match std::fs::remove_file(&self.file) {
                Ok(()) => sync_dir(&self.file)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if self.node.swap(false, Ordering::Relaxed) {
                tracing::warn!("node maintenance off");
            }
            self.node_since_ms.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Records the replicated cluster-wide flag as applied on this replica.
    pub fn observe_cluster(&self, m: &ClusterMaintenance) {
        self.cluster_since_ms.store(m.since_ms, Ordering::Relaxed);
        let was = self.cluster.swap(m.on, Ordering::Relaxed);
        if was != m.on {
            tracing::warn!(on = m.on, "cluster-wide maintenance changed");
        }
    }

    /// The current state, for the admin RPC and `/readyz`.
    pub fn report(&self, node_id: u64) -> MaintenanceReport {
        let since = |v: &AtomicU64| Some(v.load(Ordering::Relaxed)).filter(|&ms| ms > 0);
        let node = self.node.load(Ordering::Relaxed);
        let cluster = self.cluster.load(Ordering::Relaxed);
        MaintenanceReport {
            node_id,
            node,
            node_since_ms: since(&self.node_since_ms).filter(|_| node),
            cluster,
            cluster_since_ms: since(&self.cluster_since_ms).filter(|_| cluster),
            draining: node || cluster,
            error: None,
        }
    }
}

/// fsyncs the directory holding `file`, so a rename or removal is durable.
fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Keeps the cluster-wide flag in step with this replica until `shutdown`.
pub async fn watch(
    m: Arc<Maintenance>,
    reader: StateReader,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = reader.clone();
        match tokio::task::spawn_blocking(move || r.cluster_maintenance()).await {
            Ok(Ok(c)) => m.observe_cluster(&c),
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the maintenance flag"),
            Err(e) => tracing::warn!(error = %e, "reading the maintenance flag"),
        }
        metrics.maintenance.set(i64::from(m.draining()));
    }
}

/// What an operator asks of the `Maintenance` RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceAction {
    On,
    Off,
    Status,
}

/// The `Maintenance` RPC's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceRequest {
    pub action: MaintenanceAction,
    /// Cluster-wide (replicated) instead of this node only.
    #[serde(default)]
    pub cluster: bool,
}

/// One node's maintenance state (the `Maintenance` RPC's answer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceReport {
    pub node_id: u64,
    /// Node maintenance (this node only, survives restarts).
    pub node: bool,
    pub node_since_ms: Option<u64>,
    /// Cluster-wide maintenance (replicated).
    pub cluster: bool,
    pub cluster_since_ms: Option<u64>,
    /// Whether the node is refusing new work now (node or cluster).
    pub draining: bool,
    /// Why the requested change failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Carries out an operator's request on this node.
pub async fn handle(m: &Maintenance, node: &Node, req: &MaintenanceRequest) -> MaintenanceReport {
    let on = match req.action {
        MaintenanceAction::On => true,
        MaintenanceAction::Off => false,
        MaintenanceAction::Status => return m.report(node.id),
    };
    let error = if req.cluster {
        match node.write(Command::SetMaintenance { on }).await {
            Ok(Response::Maintenance(c)) => {
                // Applied here too by now or soon; show it at once.
                m.observe_cluster(&c);
                None
            }
            Ok(other) => Some(format!("unexpected answer {other:?}")),
            Err(e) => Some(format!("not committed: {e}")),
        }
    } else {
        m.set_node(on, node.now_ms())
            .err()
            .map(|e| format!("cannot write {}: {e}", m.file.display()))
    };
    let mut report = m.report(node.id);
    report.error = error;
    report
}

/// Why `tempalias maintenance` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("bad address: {0}")]
    Address(String),
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{}", .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("undecodable answer: {0}")]
    Codec(#[from] serde_json::Error),
}

/// Calls the `Maintenance` RPC of the node at `addr` (its cluster address).
///
/// # Errors
/// [`AskError`] when the node cannot be reached, refuses the secret or
/// answers something undecodable.
pub async fn ask(
    addr: &str,
    secret: &crate::config::Secret,
    req: &MaintenanceRequest,
    timeout: Duration,
) -> Result<MaintenanceReport, AskError> {
    use crate::cluster::proto::{cluster_client::ClusterClient, Payload};
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| AskError::Address(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await?;
    let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", secret.expose())
            .parse()
            .map_err(|_| AskError::Address("the cluster secret is not printable ASCII".into()))?;
    let mut client = ClusterClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    });
    let answer = client
        .maintenance(Payload {
            json: serde_json::to_vec(req)?,
        })
        .await?;
    Ok(serde_json::from_slice(&answer.into_inner().json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_maintenance_survives_a_reload_until_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let m = Maintenance::load(dir.path()).unwrap();
        assert!(!m.draining());
        m.set_node(true, 1234).unwrap();
        assert!(m.draining());
        let again = Maintenance::load(dir.path()).unwrap();
        assert!(again.draining());
        assert_eq!(again.report(1).node_since_ms, Some(1234));
        again.set_node(false, 2000).unwrap();
        assert!(!again.draining());
        assert!(!Maintenance::load(dir.path()).unwrap().draining());
        // Turning off twice is fine.
        again.set_node(false, 2001).unwrap();
    }

    #[test]
    fn cluster_flag_drains_independently() {
        let dir = tempfile::tempdir().unwrap();
        let m = Maintenance::load(dir.path()).unwrap();
        m.observe_cluster(&ClusterMaintenance {
            on: true,
            since_ms: 5,
        });
        let r = m.report(3);
        assert!(r.draining && r.cluster && !r.node);
        assert_eq!(r.cluster_since_ms, Some(5));
        m.observe_cluster(&ClusterMaintenance {
            on: false,
            since_ms: 6,
        });
        assert!(!m.draining());
    }
}
