//! How a drill reaches the cluster: the processes of a local cluster
//! (through [`Processes`], which the `cellbank` binary implements with its
//! supervisor), the replicas' authenticated `FaultPoints` service, and the
//! routers' admin API (isolation, switchover, status, audit log).

use std::time::Duration;

use cellbank_client::routers;
use cellbank_client::ChannelSettings;
use cellbank_proto::cell::fault_points_client::FaultPointsClient;
use cellbank_proto::cell::{FaultList, HealFaultsRequest, InjectFaultRequest, ListFaultsRequest, StatusRequest};
use cellbank_proto::router::{AuditRecord, ClusterStatus, PairMode, RoutingTable};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

/// One process of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proc {
    Router(u64),
    Replica { cell: u64, replica: u64 },
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proc::Router(id) => write!(f, "router {id}"),
            Proc::Replica { cell, replica } => write!(f, "cell {cell} replica {replica}"),
        }
    }
}

/// The processes of a local cluster, owned by whoever started them.
pub trait Processes: Send {
    /// SIGKILL (the process is reaped).
    fn kill(&mut self, p: Proc) -> anyhow::Result<()>;
    /// Starts a stopped process on its data.
    fn start(&mut self, p: Proc) -> anyhow::Result<()>;
    /// Starts a stopped process on its data with extra environment for
    /// this start only (a replica's `CELLBANK_FAULTS`, say).
    fn start_with_env(&mut self, p: Proc, env: &[(&str, &str)]) -> anyhow::Result<()>;
    /// SIGSTOP / SIGCONT.
    fn pause(&mut self, p: Proc, paused: bool) -> anyhow::Result<()>;
    fn all(&self) -> Vec<Proc>;
    fn is_running(&self, p: Proc) -> bool;
    /// Processes that exited on their own since the last call.
    fn reap_exited(&mut self) -> Vec<Proc>;
    /// Stops everything (end of a drill on a cluster the runner started).
    fn stop_all(&mut self);
    /// A new pair for `table` (ids after its highest, replicas on free
    /// ports of this machine), for `admin add-pair`.
    fn plan_pair(&self, table: &RoutingTable) -> anyhow::Result<cellbank_proto::router::AddPair>;
    /// Starts the processes of cells `table` names that are not running
    /// yet (a pair just added); returns them.
    fn adopt(&mut self, table: &RoutingTable) -> anyhow::Result<Vec<Proc>>;
}

/// Admin credentials and the routers.
#[derive(Clone, Debug)]
pub struct Access {
    pub routers: Vec<String>,
    pub token: Option<String>,
}

fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = routers::with_token(token);
    request.set_timeout(Duration::from_secs(3));
    request
}

/// A channel to the admin plane (fault points, admin) of the process at
/// `addr`.
async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(ChannelSettings::OPERATOR.connect(&cellbank_client::planes::Plane::Admin.of(addr)).await?)
}

impl Access {
    pub async fn status(&self) -> anyhow::Result<ClusterStatus> {
        let status = tokio::time::timeout(
            Duration::from_secs(4),
            routers::ClusterClient::new(&self.routers, self.token.as_deref()).status(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the routers did not answer a status request in 4 s"))??;
        Ok(status)
    }

    pub async fn table(&self) -> anyhow::Result<RoutingTable> {
        let table = self.status().await?.table.unwrap_or_default();
        anyhow::ensure!(!table.pairs.is_empty(), "the routing table has no pairs yet");
        Ok(table)
    }

    pub async fn audit_log(&self) -> anyhow::Result<Vec<AuditRecord>> {
        Ok(routers::ClusterClient::new(&self.routers, self.token.as_deref()).audit_log().await?)
    }

    pub async fn all_pairs_sync(&self) -> bool {
        self.pairs_sync_except(&[]).await
    }

    /// Every pair is SYNC, except a pair that lost a cell for good (`lost`):
    /// it can have no standby to be in sync with, and must be served by its
    /// other cell.
    pub async fn pairs_sync_except(&self, lost: &[u64]) -> bool {
        match self.status().await {
            Ok(status) => {
                let table = status.table.unwrap_or_default();
                !table.pairs.is_empty()
                    && table.pairs.iter().all(|p| {
                        if lost.contains(&p.active_cell_id) {
                            false
                        } else if lost.contains(&p.standby_cell_id) {
                            true
                        } else {
                            p.mode == PairMode::Sync as i32
                        }
                    })
            }
            Err(_) => false,
        }
    }

    /// Waits until the routers answer and every pair is SYNC. Fails at
    /// once when the routers refuse the credentials.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while tokio::time::Instant::now() < deadline {
            let asked = tokio::time::timeout(
                Duration::from_secs(4),
                routers::ClusterClient::new(&self.routers, self.token.as_deref()).status(),
            )
            .await;
            match asked {
                Ok(Ok(status)) => {
                    let table = status.table.unwrap_or_default();
                    if !table.pairs.is_empty() && table.pairs.iter().all(|p| p.mode == PairMode::Sync as i32) {
                        return Ok(());
                    }
                    last = "not every pair is SYNC".into();
                }
                Ok(Err(status))
                    if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) =>
                {
                    anyhow::bail!("the routers refused the admin credentials: {}", status.message());
                }
                Ok(Err(status)) => last = format!("{:?}: {}", status.code(), status.message()),
                Err(_) => last = "the routers did not answer in 4 s".into(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the cluster was not ready within {timeout:?} ({last}); not starting the drill")
    }

    /// Waits until every pair is SYNC (at most `timeout`).
    pub async fn wait_sync(&self, timeout: Duration) -> bool {
        self.wait_sync_except(&[], timeout).await
    }

    /// Waits until every pair is SYNC but those that lost a cell for good,
    /// which must be served by their other cell (at most `timeout`).
    pub async fn wait_sync_except(&self, lost: &[u64], timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.pairs_sync_except(lost).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    pub async fn isolate(&self, cells: &[u64], duration: Duration) -> anyhow::Result<()> {
        Ok(routers::ClusterClient::new(&self.routers, self.token.as_deref()).isolate_cells(cells, duration).await?)
    }

    /// Clears every isolation on every router; the cells still isolated
    /// afterwards (none when it worked).
    pub async fn clear_isolation(&self) -> anyhow::Result<()> {
        self.isolate(&[], Duration::ZERO).await
    }

    pub async fn switchover(&self, pair_id: u64, why: &str) -> anyhow::Result<u64> {
        let message =
            cellbank_proto::router::SwitchoverRequest { pair_id, who: "chaos drill".into(), why: why.to_string() };
        let response = routers::ClusterClient::new(&self.routers, self.token.as_deref()).switchover(message).await?;
        Ok(response.write_pause_ms)
    }

    /// Moves `count` slices of `pair_id` to another pair, one at a time
    /// (the next pair by id, wrapping). A move whose call fails (its
    /// coordinator died: the next one finishes it) is waited out until the
    /// table no longer lists it; a move refused and rolled back is counted
    /// as such. Returns what happened, for the journal.
    pub async fn move_slices(&self, pair_id: u64, count: u32, why: &str) -> anyhow::Result<String> {
        self.move_slices_to(pair_id, None, count, why).await
    }

    /// [`Access::move_slices`] to the pair `to` (by default the next pair
    /// after `pair_id`, else the first).
    pub async fn move_slices_to(&self, pair_id: u64, to: Option<u64>, count: u32, why: &str) -> anyhow::Result<String> {
        let client = routers::ClusterClient::new(&self.routers, self.token.as_deref());
        let table = client.status().await?.table.unwrap_or_default();
        let mut others: Vec<u64> = table.pairs.iter().map(|p| p.pair_id).filter(|p| *p != pair_id).collect();
        others.sort_unstable();
        let to = to.or_else(|| others.iter().copied().find(|p| *p > pair_id)).or(others.first().copied());
        let to = to.ok_or_else(|| anyhow::anyhow!("pair {pair_id} has no other pair to move slices to"))?;
        let slices: Vec<u32> = (0..table.slice_count)
            .filter(|s| table.slice_pair.get(*s as usize) == Some(&pair_id))
            .take(count as usize)
            .collect();
        let (mut moved, mut rolled_back, mut resumed, mut freeze_max) = (0, 0, 0, 0);
        for slice in slices {
            let message = cellbank_proto::router::MoveSliceRequest {
                slice,
                to_pair_id: to,
                who: "chaos drill".into(),
                why: why.to_string(),
            };
            match client.move_slice(message).await {
                Ok(answer) => {
                    moved += 1;
                    freeze_max = freeze_max.max(answer.freeze_ms);
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => rolled_back += 1,
                Err(status) => {
                    // The coordinator died mid-move, say: the next one ends it.
                    let _ = status;
                    resumed += 1;
                    let started = std::time::Instant::now();
                    loop {
                        let ended =
                            client.status().await.ok().and_then(|s| s.table).is_some_and(|t| t.moves.is_empty());
                        if ended {
                            break;
                        }
                        anyhow::ensure!(
                            started.elapsed() < Duration::from_secs(60),
                            "move of slice {slice} never ended"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        Ok(format!(
            "{moved} slice(s) moved to pair {to} (longest freeze {freeze_max} ms), {rolled_back} rolled back, \
             {resumed} ended by the next coordinator"
        ))
    }

    /// Adds a pair through the routers (RouterAdmin.AddPair).
    pub async fn add_pair(&self, add: cellbank_proto::router::AddPair, why: &str) -> anyhow::Result<String> {
        let client = routers::ClusterClient::new(&self.routers, self.token.as_deref());
        let request =
            cellbank_proto::router::AddPairRequest { pair: Some(add), who: "chaos drill".into(), why: why.to_string() };
        Ok(client.add_pair(request).await?.detail)
    }

    /// A forced failover of the pair (RouterAdmin.Failover, force = true):
    /// the coordinator fences the active if it can, gives the standby up to
    /// 5 s to catch up, and promotes it whatever it holds.
    pub async fn failover(
        &self,
        pair_id: u64,
        why: &str,
    ) -> anyhow::Result<cellbank_proto::router::AdminActionResponse> {
        let message = cellbank_proto::router::FailoverRequest {
            pair_id,
            force: true,
            who: "chaos drill".into(),
            why: why.to_string(),
        };
        Ok(routers::ClusterClient::new(&self.routers, self.token.as_deref()).failover(message).await?)
    }

    pub async fn inject(&self, addr: &str, fault: InjectFaultRequest) -> anyhow::Result<FaultList> {
        let mut client = FaultPointsClient::new(channel(addr).await?);
        Ok(client.inject(request(fault, self.token.as_deref())).await?.into_inner())
    }

    /// Heals the faults at one point of one replica.
    pub async fn heal_point(&self, addr: &str, point: &str) -> anyhow::Result<FaultList> {
        let mut client = FaultPointsClient::new(channel(addr).await?);
        let message = HealFaultsRequest { point: point.to_string() };
        Ok(client.heal(request(message, self.token.as_deref())).await?.into_inner())
    }

    /// Heals every fault of one replica.
    pub async fn heal(&self, addr: &str) -> anyhow::Result<FaultList> {
        let mut client = FaultPointsClient::new(channel(addr).await?);
        Ok(client.heal(request(HealFaultsRequest { point: String::new() }, self.token.as_deref())).await?.into_inner())
    }

    pub async fn list(&self, addr: &str) -> anyhow::Result<FaultList> {
        let mut client = FaultPointsClient::new(channel(addr).await?);
        Ok(client.list(request(ListFaultsRequest {}, self.token.as_deref())).await?.into_inner())
    }

    /// Checks, before anything is injected, that the replica takes faults
    /// with these credentials.
    pub async fn check_credentials(&self, addr: &str) -> anyhow::Result<()> {
        let list = self.list(addr).await.map_err(|e| anyhow::anyhow!("fault points of replica {addr}: {e}"))?;
        anyhow::ensure!(list.compiled_in, "replica {addr} was built without fault points");
        Ok(())
    }
}

/// A cell's replicas as (replica id, address), by asking each for its id,
/// and the cell's leader (replica id) as those replicas report it, from one
/// status call per replica.
pub async fn replicas(table: &RoutingTable, cell: u64) -> (Vec<(u64, String)>, Option<u64>) {
    let addrs = table.cells.iter().find(|c| c.cell_id == cell).map(|c| c.replicas.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut leader = None;
    for (i, addr) in addrs.iter().enumerate() {
        let status = replica_status(addr).await.ok();
        if let Some(s) = status.as_ref().filter(|s| cellbank_client::is_leader(s)) {
            leader = Some(s.replica_id);
        }
        out.push((status.map(|s| s.replica_id).unwrap_or(i as u64 + 1), addr.clone()));
    }
    out.sort();
    (out, leader)
}

pub async fn replica_status(addr: &str) -> anyhow::Result<cellbank_proto::cell::ReplicaStatus> {
    let mut client = cellbank_client::channel::admin(channel(addr).await?);
    Ok(client.status(request(StatusRequest {}, None)).await?.into_inner())
}
