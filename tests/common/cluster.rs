//! End-to-end harness for whole clusters: routers and standby pairs as real
//! processes run by the supervisor, on loopback.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use cellbank::supervisor::{ProcessId, Supervisor, Topology};
use cellbank_client::CellClient;
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::{DigestRequest, DigestResponse, StatusRequest};
use cellbank_proto::router::{ClusterStatus, Pair, PairMode};

pub struct Cluster {
    pub sup: Supervisor,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `routers` routers and `pairs` pairs of 3-replica cells (cell p is the
    /// active of pair p, cell p + pairs its standby).
    pub fn start(routers: u64, pairs: u64, tweak: impl FnOnce(&mut Topology)) -> Cluster {
        Cluster::start_some(routers, pairs, tweak, |_| true)
    }

    /// [`Cluster::start`], starting only the processes `start` picks (the
    /// test starts the others with `sup.start`).
    pub fn start_some(
        routers: u64,
        pairs: u64,
        tweak: impl FnOnce(&mut Topology),
        start: impl Fn(ProcessId) -> bool,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut topology = Topology::on_free_ports(dir.path(), routers, pairs, 3, true);
        topology.slice_count = 16;
        topology.certs_dir = Some(super::test_certs().to_path_buf());
        tweak(&mut topology);
        let mut sup = Supervisor::new(env!("CARGO_BIN_EXE_cellbank").into(), topology).expect("supervisor");
        sup.set_env("RUST_LOG", "info,raft=info");
        for id in sup.ids().into_iter().filter(|id| start(*id)) {
            sup.start(id).expect("start a process of the cluster");
        }
        Cluster { sup, _dir: dir }
    }

    pub fn routers(&self) -> Vec<String> {
        self.sup.router_endpoints()
    }

    pub fn client(&self) -> CellClient {
        let mut client = CellClient::new(self.routers());
        client.deadline = Duration::from_secs(10);
        client
    }

    pub async fn status(&self) -> Option<ClusterStatus> {
        let client = cellbank::routers::ClusterClient::new(&self.routers(), self.sup.topology.admin_token.as_deref());
        tokio::time::timeout(Duration::from_secs(3), client.status()).await.ok()?.ok()
    }

    /// Waits until `check` holds for the coordinator's view.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.status().await {
                if check(&status) {
                    return status;
                }
            }
            assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pair as the status shows it; an empty pair (epoch 0, no cells)
    /// while the table is not bootstrapped yet.
    pub fn pair_of(status: &ClusterStatus, pair_id: u64) -> Pair {
        status.table.as_ref().and_then(|t| t.pairs.iter().find(|p| p.pair_id == pair_id)).cloned().unwrap_or_default()
    }

    pub async fn wait_for_mode(&self, pair_id: u64, mode: PairMode, timeout: Duration) -> Pair {
        let status = self
            .wait_until(&format!("pair {pair_id} in {}", mode.as_str_name()), timeout, |s| {
                Cluster::pair_of(s, pair_id).mode == mode as i32
            })
            .await;
        Cluster::pair_of(&status, pair_id)
    }

    async fn admin(addr: &str) -> Option<ReplicaAdminClient<tonic::transport::Channel>> {
        let addr = cellbank_client::planes::Plane::Admin.of(addr);
        cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.ok().map(cellbank_client::channel::admin)
    }

    /// The leader replica of a cell, if one answers.
    pub async fn cell_leader(&self, cell: u64) -> Option<ProcessId> {
        for id in self.sup.cell_replicas(cell) {
            let Some(addr) = self.sup.addr(id) else { continue };
            if let Some(mut admin) = Cluster::admin(&addr).await {
                if let Ok(status) = admin.status(StatusRequest {}).await {
                    if cellbank_client::is_leader(status.get_ref()) {
                        return Some(id);
                    }
                }
            }
        }
        None
    }

    pub async fn digests(&self, cell: u64) -> Vec<DigestResponse> {
        let mut out = Vec::new();
        for id in self.sup.cell_replicas(cell) {
            if !self.sup.is_running(id) {
                continue;
            }
            let Some(addr) = self.sup.addr(id) else { continue };
            if let Some(mut admin) = Cluster::admin(&addr).await {
                if let Ok(digest) = admin.digest(DigestRequest {}).await {
                    out.push(digest.into_inner());
                }
            }
        }
        out
    }

    /// Waits until every running replica of both cells of the pair holds the
    /// same ledger (the standby at the active's index), and checks that
    /// every currency sums to zero there.
    pub async fn assert_pair_identical(&self, pair_id: u64, timeout: Duration) {
        let started = Instant::now();
        loop {
            let status = self.status().await;
            let pair = status.as_ref().map(|s| Cluster::pair_of(s, pair_id));
            if let Some(pair) = pair {
                let mut digests = self.digests(pair.active_cell_id).await;
                let active_count = digests.len();
                digests.extend(self.digests(pair.standby_cell_id).await);
                let same = digests.windows(2).all(|w| w[0].digest == w[1].digest);
                if same && active_count > 0 && digests.len() > active_count {
                    for digest in &digests {
                        for (currency, sum) in &digest.balance_sum_by_currency {
                            assert_eq!(sum, "0", "balances in {currency} sum to {sum}");
                        }
                    }
                    println!(
                        "pair {pair_id}: {} replicas of cells {} and {} hold the same ledger ({} accounts, {} transfers)",
                        digests.len(),
                        pair.active_cell_id,
                        pair.standby_cell_id,
                        digests[0].accounts,
                        digests[0].transfers
                    );
                    return;
                }
            }
            assert!(started.elapsed() < timeout, "the pair's replicas did not converge to one ledger");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.sup.log_tails(30));
        }
    }
}
