//! The failover coordinator: runs on every router, acts only on the leader
//! of the routers' Raft group.
//!
//! Every probe interval it asks every replica of every cell for its health
//! (gRPC health) and its status (role, term, indexes, pair state), then
//! brings each pair toward what the routing table says:
//! - The table is the truth and changes first: a failover, a degradation or
//!   a return to sync is committed in the table's log before any cell hears
//!   of it, except the one step that must come first for safety: an active
//!   cell switches to sync before the table records the pair as sync.
//! - A sync pair whose active cell has had no reachable leader for the
//!   failover window (or, while a majority of its replicas answers and so is
//!   electing a leader, for the longer election grace), and whose standby
//!   holds a complete copy, is failed over: new epoch in the table, then the standby is promoted by a command
//!   in its own log. Not again within the cool-down.
//! - A degraded pair is never failed over automatically.
//! - A sync pair whose standby has had no reachable leader for the window, or
//!   whose active has waited on the standby for longer than the window,
//!   becomes degraded; the active is then told to stop waiting.
//! - A returning old active (or any cell whose pair state is not what the
//!   table says) is configured again: as a standby it is rebuilt from the
//!   active's snapshot.
//! - Admin actions and the periodic pass take one lock, so they never
//!   interleave.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellbank_client::clock::unix_ms;
use cellbank_client::pair;
use cellbank_client::pair::PROMOTION_SETTLE;
use cellbank_proto::cell::{
    ConfigureRequest, ConfigureResponse, PairRole, PairState, ReplicaStatus, ReplicationMode, StatusRequest,
};
use cellbank_proto::cell::{ExportSliceRequest, FreezeSliceCommand, ThawSliceCommand};
use cellbank_proto::router::{
    table_command, AdminActionResponse, AuditRecord, BeginMove, ChangeActive, EndMove, MoveSliceResponse, Pair,
    PairMode, RoutingTable, SetPairMode, SliceMove, TableCommand,
};
use cellbank_raft::driver::{DriverHandle, NodeError};
use cellbank_raft::node::ProposeError;
use tokio::time::Instant;
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::cells::CellPool;
use crate::config::CoordinatorConfig;
use crate::metrics::RouterMetrics;
use crate::table::{self, TableMachine, TableRefusal};

/// Why an operator's action on a pair is refused before it changes
/// anything (FAILED_PRECONDITION at the service edge).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionRefusal {
    #[error("pair {0} has no standby")]
    NoStandby(u64),
    #[error(
        "pair {pair} is {}: its standby may be behind, so a switchover could lose writes; wait for SYNC, or use \
         `admin failover --force`",
        .mode.as_str_name()
    )]
    SwitchoverNotSync { pair: u64, mode: PairMode },
    #[error("active cell {0} has no reachable leader")]
    ActiveHasNoLeader(u64),
    #[error("standby cell {0} has no reachable leader holding a complete copy")]
    StandbyIncomplete(u64),
    #[error(
        "pair {pair} is {}: the standby may be behind and writes may be lost; repeat with --force to accept that",
        .mode.as_str_name()
    )]
    FailoverNotSync { pair: u64, mode: PairMode },
    #[error("pair {pair} is healthy (cell {active} has a leader); use `admin switchover`, or --force")]
    Healthy { pair: u64, active: u64 },
    #[error("standby cell {0} has no reachable leader holding a complete copy; nothing to fail over to")]
    NothingToFailOverTo(u64),
}

/// Why the coordinator could not do what an operator or its own pass asked.
/// Converted to a `tonic::Status` only at the admin service's edge.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Refused(#[from] ActionRefusal),
    #[error("this router is not the coordinator")]
    NotCoordinator,
    #[error("unknown pair {0}")]
    UnknownPair(u64),
    #[error("unknown cell {0}")]
    UnknownCell(u64),
    #[error("cell {0} is isolated from this router (injected fault)")]
    Isolated(u64),
    #[error("cell {0} has no reachable leader")]
    NoLeader(u64),
    #[error(
        "the routing table did not commit in time; the outcome is unknown: see `cellbank status` before repeating"
    )]
    TableTimeout,
    #[error("the routing table did not answer a read barrier in time")]
    BarrierTimeout,
    #[error("routing table: {0}")]
    Table(NodeError),
    /// The table refused the command (its words, from the replicated log).
    #[error("{0}")]
    TableRefused(String),
    /// A pair to add that the table would refuse, found before proposing.
    #[error("{0}")]
    BadNewPair(TableRefusal),
    /// A slice move the table would refuse, found before anything moved.
    #[error("{0}")]
    BadMove(TableRefusal),
    /// New replica addresses the table would refuse, found before
    /// proposing.
    #[error("{0}")]
    BadReplicas(TableRefusal),
    #[error("move {move_id} was rolled back, nothing moved: {why}")]
    MoveRolledBack { move_id: u64, why: String },
    #[error(
        "move {move_id} has not ended: {why}; the slice's money left its old pair, so the coordinator finishes \
         the move (see `cellbank status`)"
    )]
    MoveStuck { move_id: u64, why: String },
    /// A cell's own answer to a configure call, passed on as it came.
    #[error("{}", .status.message())]
    Cell { cell_id: u64, status: Status },
    #[error(
        "the standby did not acknowledge index {index} of cell {cell_id} within {} ms; the switchover was undone",
        SWITCHOVER_CATCH_UP_MAX.as_millis()
    )]
    CatchUp { cell_id: u64, index: u64 },
    #[error(
        "the routing table names cell {cell_id} active at epoch {epoch}, but its promotion did not take effect \
         ({cause}); the coordinator repeats it on every pass, and leaves cell {old_active} as it is until it does"
    )]
    PromotionPending { cell_id: u64, epoch: u64, old_active: u64, cause: Box<CoordinatorError> },
}

impl CoordinatorError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CoordinatorError::Refused(_) | CoordinatorError::TableRefused(_) => Code::FailedPrecondition,
            CoordinatorError::UnknownPair(_) | CoordinatorError::UnknownCell(_) => Code::NotFound,
            CoordinatorError::BadNewPair(refusal) => match refusal {
                TableRefusal::PairExists(_) | TableRefusal::CellExists(_) | TableRefusal::AddressTaken { .. } => {
                    Code::AlreadyExists
                }
                TableRefusal::NotBootstrapped => Code::FailedPrecondition,
                _ => Code::InvalidArgument,
            },
            CoordinatorError::BadMove(refusal) => match refusal {
                TableRefusal::UnknownSlice { .. } | TableRefusal::UnknownPair(_) => Code::NotFound,
                TableRefusal::SamePair { .. } => Code::InvalidArgument,
                TableRefusal::AlreadyMoving { .. } => Code::AlreadyExists,
                _ => Code::FailedPrecondition,
            },
            CoordinatorError::BadReplicas(refusal) => match refusal {
                TableRefusal::UnknownCell(_) => Code::NotFound,
                TableRefusal::AddressTaken { .. } => Code::AlreadyExists,
                TableRefusal::NotBootstrapped => Code::FailedPrecondition,
                _ => Code::InvalidArgument,
            },
            CoordinatorError::MoveRolledBack { .. } => Code::FailedPrecondition,
            CoordinatorError::MoveStuck { .. } => Code::Aborted,
            CoordinatorError::Cell { status, .. } => status.code(),
            // The table changed: the action happened, and the coordinator
            // finishes it. Not UNAVAILABLE, which says nothing was done and
            // invites a client to run the action again.
            CoordinatorError::PromotionPending { .. } => Code::Aborted,
            // The table may or may not have committed.
            CoordinatorError::TableTimeout
            | CoordinatorError::Table(NodeError::Propose(ProposeError::Superseded { .. })) => Code::DeadlineExceeded,
            CoordinatorError::NotCoordinator
            | CoordinatorError::Isolated(_)
            | CoordinatorError::NoLeader(_)
            | CoordinatorError::BarrierTimeout
            | CoordinatorError::Table(_)
            | CoordinatorError::CatchUp { .. } => Code::Unavailable,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Status {
        match error {
            // The cell's own code, message and details; not its leader
            // hint, which names a replica of the cell, not a router (a
            // client of the routers would go there).
            CoordinatorError::Cell { status, .. } => {
                Status::with_details(status.code(), status.message(), status.details().to_vec().into())
            }
            error => Status::new(error.code(), error.to_string()),
        }
    }
}

/// Time limit of one configure call to a cell.
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time limit of one routing-table proposal.
const TABLE_PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time limit of one call of a slice move's step.
const MOVE_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frozen slice waits for its credits out to settle before the
/// move is rolled back.
const MOVE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a move whose money left keeps asking the target to import
/// before it reports the move stuck (the next pass carries on).
const MOVE_IMPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// A switchover waits this long for the standby to catch up after fencing.
const SWITCHOVER_CATCH_UP_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct ReplicaProbe {
    pub addr: String,
    pub reachable: bool,
    pub serving: bool,
    pub status: Option<ReplicaStatus>,
    pub last_seen: Option<Instant>,
}

#[derive(Clone, Debug, Default)]
pub struct CellHealth {
    pub replicas: Vec<ReplicaProbe>,
    /// Last time a probe found a serving leader.
    pub leader_seen: Option<Instant>,
    /// The leader found by the last probe, if any.
    pub leader: Option<ReplicaStatus>,
}

impl CellHealth {
    /// The pair state of the leader found, if any.
    pub fn leader_pair(&self) -> Option<PairState> {
        self.leader.as_ref().and_then(|s| s.pair.clone())
    }
}

pub struct Coordinator {
    pub node: DriverHandle<TableMachine>,
    pub pool: Arc<CellPool>,
    pub config: CoordinatorConfig,
    /// The table to bootstrap when the group has none.
    pub seed: RoutingTable,
    health: Mutex<HashMap<u64, CellHealth>>,
    actions: tokio::sync::Mutex<()>,
    metrics: Arc<RouterMetrics>,
    /// Slice moves this router is driving now (by move id).
    driving: Mutex<std::collections::HashSet<u64>>,
}

fn is_leader_role(status: &ReplicaStatus) -> bool {
    cellbank_client::is_leader(status)
}

/// True when a standby's pair state shows a complete copy of `source`'s
/// ledger at `epoch`.
fn usable_standby(state: &PairState, source_cell_id: u64, epoch: u64) -> bool {
    pair::role(state) == PairRole::Standby
        && state.epoch == epoch
        && state.source_cell_id == source_cell_id
        && state.source_index > 0
        && state.rebuild_snapshot_index == 0
}

fn audit(who: &str, what: String, why: &str) -> AuditRecord {
    AuditRecord { who: who.to_string(), what, why: why.to_string(), ..Default::default() }
}

impl Coordinator {
    pub fn new(
        node: DriverHandle<TableMachine>,
        pool: Arc<CellPool>,
        config: CoordinatorConfig,
        seed: RoutingTable,
        metrics: Arc<RouterMetrics>,
    ) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            node,
            pool,
            config,
            seed,
            health: Mutex::new(HashMap::new()),
            actions: tokio::sync::Mutex::new(()),
            metrics,
            driving: Mutex::new(Default::default()),
        })
    }

    fn count(&self, action: &str) {
        self.metrics.actions_total.with_label_values(&[action]).inc();
    }

    /// Publishes the pairs and cells as the last probe saw them.
    fn export_gauges(&self) {
        let table = self.pool.table();
        let health = self.health();
        for pair in &table.pairs {
            let label = pair.pair_id.to_string();
            for mode in [PairMode::Sync, PairMode::Degraded, PairMode::NoStandby] {
                let name = mode.as_str_name().trim_start_matches("PAIR_MODE_");
                self.metrics.pair_mode.with_label_values(&[&label, name]).set(i64::from(pair.mode == mode as i32));
            }
            self.metrics.pair_epoch.with_label_values(&[&label]).set(pair.epoch as i64);
            let leader = health.get(&pair.active_cell_id).and_then(|h| h.leader.clone());
            let (entries, ms) = leader
                .map(|s| (s.applied_index.saturating_sub(s.standby_acked_index), s.standby_lag_ms))
                .unwrap_or((0, 0));
            self.metrics.replication_lag_entries.with_label_values(&[&label]).set(entries as i64);
            self.metrics.replication_lag_seconds.with_label_values(&[&label]).set(ms as f64 / 1000.0);
            let slices = table.slice_pair.iter().filter(|p| **p == pair.pair_id).count();
            self.metrics.pair_slices.with_label_values(&[&label]).set(slices as i64);
        }
        self.metrics.slice_moves.set(table.moves.len() as i64);
        for (cell, cell_health) in &health {
            let reachable = cell_health.replicas.iter().filter(|r| r.reachable).count();
            let cell = cell.to_string();
            self.metrics.replicas_reachable.with_label_values(&[&cell]).set(reachable as i64);
            self.metrics.cell_has_leader.with_label_values(&[&cell]).set(i64::from(cell_health.leader.is_some()));
        }
        self.metrics.coordinating.set(1);
    }

    /// Clears the coordinator's gauges when this router stops leading: the
    /// next leader's are the ones to read.
    fn clear_gauges(&self) {
        let m = &self.metrics;
        m.pair_mode.reset();
        m.pair_epoch.reset();
        m.replication_lag_entries.reset();
        m.replication_lag_seconds.reset();
        m.replicas_reachable.reset();
        m.cell_has_leader.reset();
        m.pair_slices.reset();
        m.slice_moves.set(0);
        m.coordinating.set(0);
    }

    fn is_leader(&self) -> bool {
        self.node.shared.is_leader.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn health(&self) -> HashMap<u64, CellHealth> {
        self.health.lock().expect("health lock").clone()
    }

    fn cell_health(&self, cell_id: u64) -> CellHealth {
        self.health.lock().expect("health lock").get(&cell_id).cloned().unwrap_or_default()
    }

    /// Runs for the router's lifetime.
    pub async fn run(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.probe_interval_ms);
        let mut was_leader = false;
        loop {
            tokio::time::sleep(interval).await;
            if !self.is_leader() {
                if was_leader {
                    self.clear_gauges();
                }
                was_leader = false;
                continue;
            }
            if !was_leader {
                // A new coordinator gives every cell a full window before
                // judging it: it has not watched them yet.
                was_leader = true;
                let now = Instant::now();
                let mut health = self.health.lock().expect("health lock");
                for cell in health.values_mut() {
                    cell.leader_seen = Some(now);
                }
                drop(health);
                tracing::info!("this router now coordinates failover");
            }
            // Probed under the lock, so a pass never acts on a view taken
            // while an admin action was changing the cells.
            let _guard = self.actions.lock().await;
            self.probe_all().await;
            if let Err(e) = self.pass().await {
                tracing::warn!("coordinator pass: {e}");
            }
            self.export_gauges();
            self.resume_moves();
        }
    }

    /// Probes every replica of every cell in the table, at once.
    pub async fn probe_all(&self) {
        let table = self.pool.table();
        let cells: Vec<u64> = table.cells.iter().map(|c| c.cell_id).collect();
        futures::future::join_all(cells.into_iter().map(|cell_id| self.probe_cell(cell_id))).await;
    }

    async fn probe_cell(&self, cell_id: u64) {
        let Some(conn) = self.pool.cell(cell_id) else { return };
        let timeout = Duration::from_millis(self.config.probe_timeout_ms);
        let isolated = self.pool.is_isolated(cell_id);
        let probes = conn.replicas.iter().map(|replica| async move {
            if isolated {
                return ReplicaProbe { addr: replica.addr.clone(), ..Default::default() };
            }
            let mut health = HealthClient::new(replica.admin_channel.clone());
            let mut admin = replica.admin.clone();
            let check = tokio::time::timeout(timeout, health.check(HealthCheckRequest { service: String::new() }));
            let status = tokio::time::timeout(timeout, admin.status(StatusRequest {}));
            let (check, status) = tokio::join!(check, status);
            let serving = matches!(&check, Ok(Ok(r)) if r.get_ref().status == 1);
            let status = match status {
                Ok(Ok(r)) => Some(r.into_inner()),
                _ => None,
            };
            ReplicaProbe { addr: replica.addr.clone(), reachable: status.is_some(), serving, status, last_seen: None }
        });
        let results = futures::future::join_all(probes).await;
        let now = Instant::now();
        let mut health = self.health.lock().expect("health lock");
        let entry =
            health.entry(cell_id).or_insert_with(|| CellHealth { leader_seen: Some(now), ..Default::default() });
        // Requests go to the leader the probes found: a leader that hangs
        // (paused, partitioned) stops taking new requests once its peers
        // have elected another.
        if let Some(found) = record_probes(entry, results, now) {
            conn.follow(&found.addr);
        }
    }

    async fn propose(&self, command: TableCommand) -> Result<String, CoordinatorError> {
        let outcome = tokio::time::timeout(TABLE_PROPOSE_TIMEOUT, self.node.propose(vec![command]))
            .await
            .map_err(|_| CoordinatorError::TableTimeout)?
            .map_err(CoordinatorError::Table)?;
        let result = outcome.into_iter().next().expect("one result per command");
        if result.ok {
            Ok(result.detail)
        } else {
            Err(CoordinatorError::TableRefused(result.detail))
        }
    }

    /// Sends a configure command to a cell's leader (following hints).
    async fn configure(
        &self,
        cell_id: u64,
        state: PairState,
        source_state: Option<PairState>,
    ) -> Result<ConfigureResponse, CoordinatorError> {
        self.send_configure(cell_id, state, source_state, false).await
    }

    /// [`Self::configure`], and for a standby told to rebuild, whether the
    /// rebuild starts again even when one of this source at this epoch was
    /// already taken (an operator's rebuild).
    async fn send_configure(
        &self,
        cell_id: u64,
        state: PairState,
        source_state: Option<PairState>,
        force_rebuild: bool,
    ) -> Result<ConfigureResponse, CoordinatorError> {
        let conn = self.pool.cell(cell_id).ok_or(CoordinatorError::UnknownCell(cell_id))?;
        if self.pool.is_isolated(cell_id) {
            return Err(CoordinatorError::Isolated(cell_id));
        }
        // Stamped with this coordinator's term: once a cell has heard from a
        // newer coordinator, this one's commands are refused.
        let term = self.node.status().await.map_err(CoordinatorError::Table)?.term;
        let state = PairState { coordinator_term: term, ..state };
        let request = ConfigureRequest { cell_id, state: Some(state), source_state, force_rebuild };
        let deadline = Instant::now() + CONFIGURE_TIMEOUT;
        let mut order: Vec<usize> = (0..conn.replicas.len()).collect();
        let leader_addr = conn.leader().addr.clone();
        order.sort_by_key(|i| conn.replicas[*i].addr != leader_addr);
        let mut last = CoordinatorError::NoLeader(cell_id);
        let mut attempts = 0;
        let mut queue = std::collections::VecDeque::from(order);
        while let Some(i) = queue.pop_front() {
            attempts += 1;
            if attempts > conn.replicas.len() * 2 || Instant::now() >= deadline {
                break;
            }
            let mut admin = conn.replicas[i].admin.clone();
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(deadline.saturating_duration_since(Instant::now()));
            match admin.configure(call).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    if let Some(hint) = cellbank_client::retry::leader_hint(&status) {
                        if let Some(j) = conn.replicas.iter().position(|r| r.addr == hint) {
                            queue.push_front(j);
                        }
                    }
                    last = CoordinatorError::Cell { cell_id, status };
                }
                Err(status) => return Err(CoordinatorError::Cell { cell_id, status }),
            }
        }
        Err(last)
    }

    /// Makes sure this router's table holds everything the group committed
    /// before it acts on it (a new coordinator's table may be behind).
    async fn table_barrier(&self) -> Result<(), CoordinatorError> {
        match tokio::time::timeout(TABLE_PROPOSE_TIMEOUT, self.node.read_index()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CoordinatorError::Table(e)),
            Err(_) => Err(CoordinatorError::BarrierTimeout),
        }
    }

    /// One pass over every pair.
    async fn pass(&self) -> Result<(), CoordinatorError> {
        self.table_barrier().await?;
        let table = self.pool.table();
        if table.slice_count == 0 {
            if self.seed.slice_count == 0 {
                return Ok(());
            }
            let command = TableCommand {
                kind: Some(table_command::Kind::Bootstrap(self.seed.clone())),
                audit: Some(audit("coordinator", "bootstrap the routing table".into(), "first start")),
            };
            self.propose(command).await?;
            tracing::info!("bootstrapped the routing table");
            return Ok(());
        }
        for pair in &table.pairs {
            if let Err(e) = self.reconcile(pair.pair_id).await {
                tracing::debug!(pair = pair.pair_id, "reconcile: {e}");
            }
        }
        Ok(())
    }

    fn pair_now(&self, pair_id: u64) -> Result<(RoutingTable, Pair), CoordinatorError> {
        let table = self.pool.table();
        let pair = table::find_pair(&table, pair_id).cloned().ok_or(CoordinatorError::UnknownPair(pair_id))?;
        Ok((table, pair))
    }

    /// Decides, then does: the decision is [`plan_pair`], a pure function
    /// the simulator runs too; this executes its actions in order and stops
    /// at the first that fails (the next pass decides again).
    async fn reconcile(&self, pair_id: u64) -> Result<(), CoordinatorError> {
        let (table, pair) = self.pair_now(pair_id)?;
        let term = self.node.status().await.map_err(CoordinatorError::Table)?.term;
        let active = self.cell_health(pair.active_cell_id);
        let standby = self.cell_health(pair.standby_cell_id);
        let actions = plan_pair(&self.config, &table, &pair, term, &active, &standby, Instant::now(), unix_ms());
        for action in actions {
            match action {
                Action::ChangeActive { mode, record } => {
                    tracing::warn!(pair = pair_id, "failing over: {}", record.why);
                    self.change_active(&table, &pair, mode, record, false).await?;
                }
                Action::ProposeTable { command, count } => {
                    if let Some(record) = &command.audit {
                        tracing::warn!(pair = pair_id, "{}: {}", record.what, record.why);
                    }
                    if count == "degrade" {
                        self.count(count);
                    }
                    self.propose(command).await?;
                    if count == "resync" {
                        self.count(count);
                    }
                }
                Action::Configure { cell_id, state } => {
                    self.configure(cell_id, state, None).await?;
                }
            }
        }
        Ok(())
    }

    /// Commits a change of active cell in the table, then promotes the new
    /// active (the old standby). Returns the promotion's configure answer.
    async fn change_active(
        &self,
        table: &RoutingTable,
        pair: &Pair,
        mode: PairMode,
        record: AuditRecord,
        old_active_fenced: bool,
    ) -> Result<ConfigureResponse, CoordinatorError> {
        self.propose(change_active_command(pair, mode, record)).await?;
        self.metrics.failovers_total.inc();
        let (cell_id, desired) = promotion(table, pair, mode, old_active_fenced);
        let epoch = desired.epoch;
        self.configure(cell_id, desired, None).await.map_err(|cause| CoordinatorError::PromotionPending {
            cell_id,
            epoch,
            old_active: pair.active_cell_id,
            cause: Box::new(cause),
        })
    }

    /// A fresh look at one cell.
    async fn look(&self, cell_id: u64) -> CellHealth {
        self.probe_cell(cell_id).await;
        self.cell_health(cell_id)
    }

    /// Planned switchover of a healthy sync pair.
    pub async fn switchover(
        &self,
        pair_id: u64,
        who: &str,
        why: &str,
    ) -> Result<AdminActionResponse, CoordinatorError> {
        self.require_leader()?;
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        let (table, pair) = self.pair_now(pair_id)?;
        if pair.standby_cell_id == 0 {
            return Err(ActionRefusal::NoStandby(pair_id).into());
        }
        let (active, standby) = tokio::join!(self.look(pair.active_cell_id), self.look(pair.standby_cell_id));
        let active_state = check_switchover(&pair, &active, &standby)?;
        let started = Instant::now();
        // 1. The active stops taking writes.
        let fence = self.configure(pair.active_cell_id, fenced(&active_state), None).await?;
        // 2. The standby catches up with everything before the fence.
        if let Err(e) = self.await_acked(pair.active_cell_id, fence.applied_index).await {
            self.undo_fence(pair.active_cell_id, active_state).await;
            return Err(e);
        }
        // 3. The table flips; 4. the standby is promoted; 5. the old active
        //    becomes its standby, holding exactly the promoted ledger.
        let record = audit(who, format!("switchover of pair {pair_id}"), why);
        let promoted = match self.change_active(&table, &pair, PairMode::Sync, record, true).await {
            Ok(promoted) => promoted,
            Err(e) => {
                if self.pair_now(pair_id)?.1.epoch == pair.epoch {
                    self.undo_fence(pair.active_cell_id, active_state).await;
                }
                return Err(e);
            }
        };
        let write_pause_ms = started.elapsed().as_millis() as u64;
        let new_pair = self.pair_now(pair_id)?.1;
        let demoted = desired_standby(&new_pair, promoted.applied_index);
        self.configure(pair.active_cell_id, demoted, promoted.state.clone()).await?;
        tracing::info!(pair = pair_id, write_pause_ms, "switchover done");
        self.count("switchover");
        Ok(AdminActionResponse {
            new_epoch: new_pair.epoch,
            active_cell_id: new_pair.active_cell_id,
            standby_cell_id: new_pair.standby_cell_id,
            may_be_lost: String::new(),
            write_pause_ms,
            detail: format!(
                "cell {} is active at epoch {}; cell {} is its standby from index {}",
                new_pair.active_cell_id, new_pair.epoch, new_pair.standby_cell_id, promoted.applied_index
            ),
        })
    }

    /// Takes a switchover's fence off again. If that fails too, the cell
    /// stays fenced (it takes no writes) until the next pass configures it.
    async fn undo_fence(&self, cell_id: u64, active_state: PairState) {
        if let Err(e) = self.configure(cell_id, active_state, None).await {
            tracing::warn!(cell = cell_id, "could not undo the switchover's fence; the next pass retries: {e}");
        }
    }

    /// Waits until the active's leader reports the standby holds `index`.
    async fn await_acked(&self, cell_id: u64, index: u64) -> Result<(), CoordinatorError> {
        let conn = self.pool.cell(cell_id).ok_or(CoordinatorError::UnknownCell(cell_id))?;
        if self.pool.is_isolated(cell_id) {
            return Err(CoordinatorError::Isolated(cell_id));
        }
        let deadline = Instant::now() + SWITCHOVER_CATCH_UP_MAX;
        while Instant::now() < deadline {
            for replica in &conn.replicas {
                let mut admin = replica.admin.clone();
                if let Ok(Ok(status)) =
                    tokio::time::timeout(Duration::from_millis(200), admin.status(StatusRequest {})).await
                {
                    let status = status.into_inner();
                    if is_leader_role(&status) && status.standby_acked_index >= index {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Err(CoordinatorError::CatchUp { cell_id, index })
    }

    /// Failover on an operator's command.
    pub async fn failover(
        &self,
        pair_id: u64,
        force: bool,
        who: &str,
        why: &str,
    ) -> Result<AdminActionResponse, CoordinatorError> {
        self.require_leader()?;
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        let (table, pair) = self.pair_now(pair_id)?;
        if pair.standby_cell_id == 0 {
            return Err(ActionRefusal::NoStandby(pair_id).into());
        }
        let (active, standby) = tokio::join!(self.look(pair.active_cell_id), self.look(pair.standby_cell_id));
        let start = check_failover(&pair, force, &active, &standby)?;
        let mode = table::mode(&pair);
        let window = if let Some(active_state) = &start.active_state {
            // Still reachable: stop it first, and give the standby a moment
            // to take what it can.
            let fence = self.configure(pair.active_cell_id, fenced(active_state), None).await?;
            if self.await_acked(pair.active_cell_id, fence.applied_index).await.is_err() {
                let acked = self.look(pair.active_cell_id).await.leader.map(|s| s.standby_acked_index).unwrap_or(0);
                loss_window(&pair, &start, Some((fence.applied_index, acked)))
            } else {
                // Fenced and caught up (`loss_window` with no fence outcome
                // says the same for a reachable active).
                None
            }
        } else {
            loss_window(&pair, &start, None)
        };
        let may_be_lost = window.map(|w| w.describe(mode)).unwrap_or_default();
        let what = format!("{} failover of pair {pair_id}", if force { "forced" } else { "manual" });
        let why_text =
            if may_be_lost.is_empty() { why.to_string() } else { format!("{why}; may be lost: {may_be_lost}") };
        let fenced = start.active_state.is_some();
        let promoted =
            self.change_active(&table, &pair, PairMode::Degraded, audit(who, what, &why_text), fenced).await?;
        let new_pair = self.pair_now(pair_id)?.1;
        Ok(AdminActionResponse {
            new_epoch: new_pair.epoch,
            active_cell_id: new_pair.active_cell_id,
            standby_cell_id: new_pair.standby_cell_id,
            may_be_lost,
            write_pause_ms: 0,
            detail: format!(
                "cell {} is active at epoch {} (promoted at its index {}); the pair is DEGRADED until cell {} is rebuilt",
                new_pair.active_cell_id, new_pair.epoch, promoted.applied_index, new_pair.standby_cell_id
            ),
        })
    }

    /// Makes the standby drop its copy and rebuild it from a snapshot.
    pub async fn rebuild_standby(
        &self,
        pair_id: u64,
        who: &str,
        why: &str,
    ) -> Result<AdminActionResponse, CoordinatorError> {
        self.require_leader()?;
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        let (table, pair) = self.pair_now(pair_id)?;
        if pair.standby_cell_id == 0 {
            return Err(ActionRefusal::NoStandby(pair_id).into());
        }
        let command = TableCommand {
            kind: Some(table_command::Kind::SetMode(SetPairMode {
                pair_id,
                epoch: pair.epoch,
                mode: PairMode::Degraded as i32,
            })),
            audit: Some(audit(who, format!("rebuild the standby of pair {pair_id}"), why)),
        };
        self.propose(command).await?;
        let degraded = Pair { mode: PairMode::Degraded as i32, ..pair };
        self.configure(pair.active_cell_id, desired_active(&table, &degraded, ReplicationMode::Async), None).await?;
        self.send_configure(pair.standby_cell_id, desired_standby(&pair, 0), None, true).await?;
        Ok(AdminActionResponse {
            new_epoch: pair.epoch,
            active_cell_id: pair.active_cell_id,
            standby_cell_id: pair.standby_cell_id,
            detail: format!(
                "cell {} is rebuilding from cell {}; the pair is DEGRADED until it catches up",
                pair.standby_cell_id, pair.active_cell_id
            ),
            ..Default::default()
        })
    }

    /// Adds a pair of new cells (no slices) to the table. The passes that
    /// follow pair the cells once they answer and return the pair to SYNC
    /// once its standby holds a copy, as for the pairs of the first table.
    pub async fn add_pair(
        &self,
        add: cellbank_proto::router::AddPair,
        who: &str,
        why: &str,
    ) -> Result<AdminActionResponse, CoordinatorError> {
        self.require_leader()?;
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        let (pair, _) = table::check_add_pair(&self.pool.table(), &add).map_err(CoordinatorError::BadNewPair)?;
        let what = format!("add pair {}", add.pair_id);
        let command =
            TableCommand { kind: Some(table_command::Kind::AddPair(add)), audit: Some(audit(who, what, why)) };
        let detail = self.propose(command).await?;
        Ok(AdminActionResponse {
            new_epoch: pair.epoch,
            active_cell_id: pair.active_cell_id,
            standby_cell_id: pair.standby_cell_id,
            detail,
            ..Default::default()
        })
    }

    /// Sets a cell's replica addresses (one added or one removed; see
    /// [`table::check_set_replicas`]).
    pub async fn set_cell_replicas(
        &self,
        set: cellbank_proto::router::SetCellReplicas,
        who: &str,
        why: &str,
    ) -> Result<AdminActionResponse, CoordinatorError> {
        self.require_leader()?;
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        let table = self.pool.table();
        table::check_set_replicas(&table, &set).map_err(CoordinatorError::BadReplicas)?;
        let before = table::cell_addrs(&table, set.cell_id);
        let what = match set.replicas.iter().find(|a| !before.contains(a)) {
            Some(added) => format!("cell {}: add replica address {added}", set.cell_id),
            None => {
                let gone = before.iter().find(|a| !set.replicas.contains(a)).cloned().unwrap_or_default();
                format!("cell {}: remove replica address {gone}", set.cell_id)
            }
        };
        let command =
            TableCommand { kind: Some(table_command::Kind::SetReplicas(set)), audit: Some(audit(who, what, why)) };
        let detail = self.propose(command).await?;
        self.count("set_cell_replicas");
        Ok(AdminActionResponse { detail, ..Default::default() })
    }

    /// Moves `slice` to `to_pair_id` (see [`Coordinator::drive_move`]):
    /// records the move in the table, then drives it to its end.
    pub async fn move_slice(
        self: &Arc<Self>,
        slice: u32,
        to_pair_id: u64,
        who: &str,
        why: &str,
    ) -> Result<MoveSliceResponse, CoordinatorError> {
        self.require_leader()?;
        let started = Instant::now();
        let record = {
            let _guard = self.actions.lock().await;
            self.table_barrier().await?;
            table::check_move(&self.pool.table(), slice, to_pair_id).map_err(CoordinatorError::BadMove)?;
            // A coordinator that has just taken over has not probed the
            // cells yet: the target is probed now, and a move to a pair
            // whose active cell has no leader is refused before the slice
            // freezes (not frozen and then rolled back).
            let target = table::find_pair(&self.pool.table(), to_pair_id).map(|p| p.active_cell_id).unwrap_or(0);
            self.probe_cell(target).await;
            if self.cell_health(target).leader.is_none() {
                return Err(ActionRefusal::ActiveHasNoLeader(target).into());
            }
            let command = TableCommand {
                kind: Some(table_command::Kind::BeginMove(BeginMove { slice, to_pair_id })),
                audit: Some(audit(who, format!("move slice {slice} to pair {to_pair_id}"), why)),
            };
            self.propose(command).await?;
            let table = self.pool.table();
            let record =
                table.moves.iter().find(|m| m.slice == slice).cloned().ok_or(CoordinatorError::TableTimeout)?;
            // Claimed before the lock is let go: a pass never resumes it.
            if !self.driving.lock().expect("driving lock").insert(record.move_id) {
                return Err(CoordinatorError::TableRefused(format!("move {} is already being driven", record.move_id)));
            }
            record
        };
        let outcome = self.drive_move(&record).await;
        self.driving.lock().expect("driving lock").remove(&record.move_id);
        let mut response = outcome?;
        response.total_ms = started.elapsed().as_millis() as u64;
        Ok(response)
    }

    /// Drives the table's moves that no task of this router drives (a move
    /// a previous coordinator began), each to its end.
    fn resume_moves(self: &Arc<Self>) {
        let table = self.pool.table();
        for record in table.moves {
            if !self.driving.lock().expect("driving lock").insert(record.move_id) {
                continue;
            }
            let coordinator = self.clone();
            tokio::spawn(async move {
                tracing::info!(move_id = record.move_id, slice = record.slice, "resuming a slice move");
                match coordinator.drive_move(&record).await {
                    Ok(done) => tracing::info!(move_id = record.move_id, "{}", done.detail),
                    Err(e) => tracing::warn!(move_id = record.move_id, "the move did not end: {e}; retried"),
                }
                coordinator.driving.lock().expect("driving lock").remove(&record.move_id);
            });
        }
    }

    /// One move, every step idempotent so that any coordinator can run it
    /// again from the start: freeze the slice at the source; wait for the
    /// slice's credits out to settle (then its balances leave: SliceOut)
    /// and take its records; import them at the target; flip the table.
    /// Until the balances leave, a failure rolls the move back (thaw, and
    /// the table forgets it); afterwards it only goes forward.
    async fn drive_move(&self, record: &SliceMove) -> Result<MoveSliceResponse, CoordinatorError> {
        let (slice, from, to, move_id) = (record.slice, record.from_pair_id, record.to_pair_id, record.move_id);
        self.still_driving(move_id)?;
        let slice_count = self.pool.table().slice_count;
        let frozen_at = Instant::now();
        let freeze = FreezeSliceCommand { move_id, slice, slice_count, to_pair_id: to };
        let step_deadline = || Instant::now() + MOVE_STEP_TIMEOUT;
        let frozen = self
            .pool
            .call_admin(
                table::to_pair(from),
                step_deadline(),
                freeze,
                |mut c, r| async move { c.freeze_slice(r).await },
            )
            .await;
        if let Err(status) = frozen {
            let why = format!("the source did not freeze the slice: {}", status.message());
            return self.roll_back(from, move_id, slice, why).await;
        }
        cellbank_raft::faults::crash_at_move_step("move.frozen");
        // Nothing leaves for a target with no reachable leader (its money
        // would wait there, the slice served by no one).
        let target = table::find_pair(&self.pool.table(), to).map(|p| p.active_cell_id).unwrap_or(0);
        if self.cell_health(target).leader.is_none() {
            let why = format!("pair {to}'s active cell {target} has no reachable leader");
            match self.roll_back(from, move_id, slice, why).await {
                // The money left before (a move run again): forward.
                Err(CoordinatorError::MoveStuck { .. }) => {}
                outcome => return outcome,
            }
        }
        // Its credits out settle within a few courier rounds.
        let request = ExportSliceRequest { move_id, slice, source_pair_id: from, to_pair_id: to };
        let drain_until = Instant::now() + MOVE_DRAIN_TIMEOUT;
        let exported = loop {
            self.still_driving(move_id)?;
            let asked = self
                .pool
                .call_admin(table::to_pair(from), step_deadline(), request, |mut c, r| async move {
                    c.export_slice(r).await
                })
                .await;
            match asked {
                Ok(exported) => break exported,
                Err(status) => {
                    let retry =
                        status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::DeadlineExceeded;
                    if retry && Instant::now() < drain_until {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    return self.roll_back(from, move_id, slice, status.message().to_string()).await;
                }
            }
        };
        cellbank_raft::faults::crash_at_move_step("move.left");
        let left_at = Instant::now();
        let import = exported.import.clone().unwrap_or_default();
        // From here the slice's money has left the source: forward only.
        let import_until = Instant::now() + MOVE_IMPORT_TIMEOUT;
        loop {
            self.still_driving(move_id)?;
            let imported = self
                .pool
                .call_admin(table::to_pair(to), step_deadline(), import.clone(), |mut c, r| async move {
                    c.import_slice(r).await
                })
                .await;
            match imported {
                Ok(_) => break,
                Err(status) if Instant::now() < import_until && status.code() != tonic::Code::FailedPrecondition => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => {
                    return Err(CoordinatorError::MoveStuck {
                        move_id,
                        why: format!("pair {to} did not import the slice: {}", status.message()),
                    })
                }
            }
        }
        cellbank_raft::faults::crash_at_move_step("move.imported");
        let imported_at = Instant::now();
        let detail = self.end_move(move_id, true, "").await?;
        let freeze_ms = frozen_at.elapsed().as_millis() as u64;
        tracing::info!(
            move_id,
            slice,
            freeze_ms,
            frozen_to_left_ms = left_at.duration_since(frozen_at).as_millis() as u64,
            import_ms = imported_at.duration_since(left_at).as_millis() as u64,
            flip_ms = imported_at.elapsed().as_millis() as u64,
            records = exported.records,
            "slice moved"
        );
        self.metrics.actions_total.with_label_values(&["move_slice"]).inc();
        let slice_epoch = self.pool.table().slice_epoch.get(slice as usize).copied().unwrap_or(0);
        Ok(MoveSliceResponse {
            move_id,
            from_pair_id: from,
            to_pair_id: to,
            slice_epoch,
            freeze_ms,
            total_ms: 0,
            accounts: exported.accounts,
            records: exported.records,
            detail,
        })
    }

    /// Whether this router may still drive move `move_id`: it leads the
    /// routers, and the move is in the table. A coordinator that lost its
    /// place stops (cells refuse a late step of an ended move anyway).
    fn still_driving(&self, move_id: u64) -> Result<(), CoordinatorError> {
        self.require_leader()?;
        if !self.pool.table().moves.iter().any(|m| m.move_id == move_id) {
            return Err(CoordinatorError::TableRefused(format!("move {move_id} is no longer in the table")));
        }
        Ok(())
    }

    /// Rolls a move back: the source thaws the slice, then the table
    /// forgets the move. When the source refuses (the slice's money has
    /// left, or the source cannot be reached) the move stays in the table
    /// and a later pass drives it again.
    async fn roll_back(
        &self,
        from: u64,
        move_id: u64,
        slice: u32,
        why: String,
    ) -> Result<MoveSliceResponse, CoordinatorError> {
        let thaw = ThawSliceCommand { move_id, slice };
        let deadline = Instant::now() + MOVE_STEP_TIMEOUT;
        let thawed = self
            .pool
            .call_admin(table::to_pair(from), deadline, thaw, |mut c, r| async move { c.thaw_slice(r).await })
            .await;
        match thawed {
            Ok(_) => {
                self.end_move(move_id, false, &why).await?;
                Err(CoordinatorError::MoveRolledBack { move_id, why })
            }
            Err(refused) => Err(CoordinatorError::MoveStuck {
                move_id,
                why: format!("{why}; the rollback was refused: {}", refused.message()),
            }),
        }
    }

    /// Ends a move in the table (done: the slice is the target's). A move
    /// already ended (by an earlier run) is not an error.
    async fn end_move(&self, move_id: u64, done: bool, why: &str) -> Result<String, CoordinatorError> {
        let _guard = self.actions.lock().await;
        self.table_barrier().await?;
        if !self.pool.table().moves.iter().any(|m| m.move_id == move_id) {
            return Ok(format!("move {move_id} ended before"));
        }
        let what = if done { format!("finish move {move_id}") } else { format!("roll back move {move_id}") };
        let command = TableCommand {
            kind: Some(table_command::Kind::EndMove(EndMove { move_id, done })),
            audit: Some(audit("coordinator", what, why)),
        };
        self.propose(command).await
    }

    fn require_leader(&self) -> Result<(), CoordinatorError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(CoordinatorError::NotCoordinator)
        }
    }
}

/// The pair state the table asks of a pair's active cell. Should it be a
/// promotion, the new active first waits out the old one's read lease.
pub fn desired_active(table: &RoutingTable, pair: &Pair, mode: ReplicationMode) -> PairState {
    PairState {
        epoch: pair.epoch,
        role: PairRole::Active as i32,
        mode: mode as i32,
        standby_cell_id: pair.standby_cell_id,
        standby_addrs: table::cell_addrs(table, pair.standby_cell_id),
        promotion_settle_ms: PROMOTION_SETTLE.as_millis() as u64,
        mode_seq: pair.mode_seq,
        ..Default::default()
    }
}

/// The pair state the table asks of a pair's standby cell.
pub fn desired_standby(pair: &Pair, source_index: u64) -> PairState {
    PairState {
        epoch: pair.epoch,
        role: PairRole::Standby as i32,
        mode: ReplicationMode::Sync as i32,
        source_cell_id: pair.active_cell_id,
        source_index,
        ..Default::default()
    }
}

/// The preconditions of a planned switchover, from a fresh look at the two
/// cells: the pair is SYNC, its active has a leader and its standby a
/// leader holding a complete copy. Returns the active's pair state (the
/// switchover fences it, and restores it if the standby does not catch up).
/// Pure: the coordinator and the simulator both run it.
pub fn check_switchover(pair: &Pair, active: &CellHealth, standby: &CellHealth) -> Result<PairState, ActionRefusal> {
    let pair_id = pair.pair_id;
    if pair.standby_cell_id == 0 {
        return Err(ActionRefusal::NoStandby(pair_id));
    }
    if table::mode(pair) != PairMode::Sync {
        return Err(ActionRefusal::SwitchoverNotSync { pair: pair_id, mode: table::mode(pair) });
    }
    let active_state = active.leader_pair().ok_or(ActionRefusal::ActiveHasNoLeader(pair.active_cell_id))?;
    if !standby.leader_pair().is_some_and(|s| usable_standby(&s, pair.active_cell_id, pair.epoch)) {
        return Err(ActionRefusal::StandbyIncomplete(pair.standby_cell_id));
    }
    Ok(active_state)
}

/// Where an operator's failover starts.
#[derive(Clone, Debug, PartialEq)]
pub struct FailoverStart {
    /// The source index the standby's leader holds.
    pub standby_holds: u64,
    /// The active's pair state when it has a reachable leader (it is fenced
    /// before the table changes).
    pub active_state: Option<PairState>,
    /// The highest applied index last seen on any replica of the active.
    pub active_last_applied: Option<u64>,
}

/// The preconditions of an operator's failover, from a fresh look at the
/// two cells. Without `force` only what the coordinator would do itself (a
/// SYNC pair whose active has no leader); with it also a healthy or
/// DEGRADED pair. Either way the standby must hold a complete copy. Pure:
/// the coordinator and the simulator both run it.
pub fn check_failover(
    pair: &Pair,
    force: bool,
    active: &CellHealth,
    standby: &CellHealth,
) -> Result<FailoverStart, ActionRefusal> {
    let pair_id = pair.pair_id;
    if pair.standby_cell_id == 0 {
        return Err(ActionRefusal::NoStandby(pair_id));
    }
    // Without --force, a pair that needs no failover says so first,
    // whatever its standby looks like at this instant.
    let mode = table::mode(pair);
    if !force {
        if mode != PairMode::Sync {
            return Err(ActionRefusal::FailoverNotSync { pair: pair_id, mode });
        }
        if active.leader.is_some() {
            return Err(ActionRefusal::Healthy { pair: pair_id, active: pair.active_cell_id });
        }
    }
    let standby_state = standby.leader_pair();
    if !standby_state.as_ref().is_some_and(|s| usable_standby(s, pair.active_cell_id, pair.epoch)) {
        return Err(ActionRefusal::NothingToFailOverTo(pair.standby_cell_id));
    }
    Ok(FailoverStart {
        standby_holds: standby_state.map(|s| s.source_index).unwrap_or(0),
        active_state: active.leader_pair(),
        active_last_applied: active.replicas.iter().filter_map(|r| r.status.as_ref()).map(|s| s.applied_index).max(),
    })
}

/// The entries of the old active that a failover may lose: those after
/// `after_index`, through `through_index` (`None`: all after it, the active
/// being unreachable and perhaps still taking writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossWindow {
    pub cell_id: u64,
    pub after_index: u64,
    pub through_index: Option<u64>,
    /// The last index seen applied on the unreachable active, if known.
    pub last_seen_applied: Option<u64>,
}

/// What a failover may lose. `fence`: the fence's applied index and what
/// the standby had acknowledged when the wait for it gave up, for an active
/// that was fenced but not caught up. A SYNC pair's unreachable active
/// loses nothing acknowledged (its standby holds every entry the active
/// acknowledged); a DEGRADED one's may lose anything after what the
/// standby holds. Pure: the coordinator and the simulator both run it.
pub fn loss_window(pair: &Pair, start: &FailoverStart, fence: Option<(u64, u64)>) -> Option<LossWindow> {
    let cell_id = pair.active_cell_id;
    match fence {
        Some((fence_index, acked)) => {
            let after_index = acked.max(start.standby_holds);
            (fence_index > after_index).then_some(LossWindow {
                cell_id,
                after_index,
                through_index: Some(fence_index),
                last_seen_applied: None,
            })
        }
        None if start.active_state.is_none() && table::mode(pair) != PairMode::Sync => Some(LossWindow {
            cell_id,
            after_index: start.standby_holds,
            through_index: None,
            last_seen_applied: start.active_last_applied,
        }),
        None => None,
    }
}

impl LossWindow {
    /// The operator's text (`may_be_lost`), given the pair's mode before the
    /// failover.
    pub fn describe(&self, mode: PairMode) -> String {
        let (cell, after) = (self.cell_id, self.after_index);
        match (self.through_index, self.last_seen_applied) {
            (Some(through), _) => {
                let acknowledged = if mode == PairMode::Sync {
                    "none of them was acknowledged to a client (the pair was SYNC)"
                } else {
                    "clients may have been told of them (the pair was DEGRADED)"
                };
                format!("entries {}..={through} of cell {cell} are not on the standby; {acknowledged}", after + 1)
            }
            (None, Some(applied)) if applied > after => format!(
                "cell {cell} is unreachable; the standby holds its log up to index {after}; entries {}..={applied} \
                 (last seen applied) and anything after may be lost",
                after + 1
            ),
            (None, _) => format!(
                "cell {cell} is unreachable; the standby holds its log up to index {after}; anything after it may be \
                 lost"
            ),
        }
    }
}

/// A cell's pair state with the role FENCED: it takes no writes.
pub fn fenced(state: &PairState) -> PairState {
    PairState { role: PairRole::Fenced as i32, ..state.clone() }
}

/// The table command of a failover or switchover: the standby becomes the
/// active at the next epoch.
pub fn change_active_command(pair: &Pair, mode: PairMode, record: AuditRecord) -> TableCommand {
    TableCommand {
        kind: Some(table_command::Kind::ChangeActive(ChangeActive {
            pair_id: pair.pair_id,
            new_epoch: pair.epoch + 1,
            mode: mode as i32,
        })),
        audit: Some(record),
    }
}

/// The promotion that follows a committed change of active: the cell to
/// configure and its pair state. An old active that was fenced serves
/// nothing any more, so the new one has no lease to wait out.
pub fn promotion(table: &RoutingTable, pair: &Pair, mode: PairMode, old_active_fenced: bool) -> (u64, PairState) {
    let promoted = Pair {
        active_cell_id: pair.standby_cell_id,
        standby_cell_id: pair.active_cell_id,
        epoch: pair.epoch + 1,
        mode: mode as i32,
        ..*pair
    };
    let cell_mode = if mode == PairMode::Sync { ReplicationMode::Sync } else { ReplicationMode::Async };
    let mut desired = desired_active(table, &promoted, cell_mode);
    if old_active_fenced {
        desired.promotion_settle_ms = 0;
    }
    (promoted.active_cell_id, desired)
}

/// One step a coordinator pass takes for a pair.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Fail over: commit a new epoch with the standby as active in the
    /// table, then promote it.
    ChangeActive { mode: PairMode, record: AuditRecord },
    /// Commit a command in the routing table; `count` names the action in
    /// the coordinator's metrics.
    ProposeTable { command: TableCommand, count: &'static str },
    /// Configure a cell (through its leader) with this pair state.
    Configure { cell_id: u64, state: PairState },
}

/// True when a cell has been without a reachable leader for longer than
/// it may be: the failover window when a majority of its replicas is
/// unreachable, the (longer) election grace while a majority answers and
/// is presumably electing a leader.
pub fn is_down(config: &CoordinatorConfig, health: &CellHealth, now: Instant) -> bool {
    let Some(down) = down_for(health, now) else { return false };
    let reachable = health.replicas.iter().filter(|r| r.reachable).count();
    let quorum = health.replicas.len() / 2 + 1;
    let limit = if reachable >= quorum && !health.replicas.is_empty() {
        Duration::from_millis(config.election_grace_ms)
    } else {
        Duration::from_millis(config.failover_window_ms)
    };
    down > limit
}

fn down_for(health: &CellHealth, now: Instant) -> Option<Duration> {
    match (health.leader.is_some(), health.leader_seen) {
        (true, _) => None,
        (false, Some(seen)) => Some(now.saturating_duration_since(seen)),
        (false, None) => Some(Duration::MAX),
    }
}

/// Folds one round of probes of a cell into what the coordinator knows of
/// it; returns the leader found (the serving leader of the highest term).
pub fn record_probes(entry: &mut CellHealth, results: Vec<ReplicaProbe>, now: Instant) -> Option<ReplicaStatus> {
    let previous: HashMap<String, Option<Instant>> =
        entry.replicas.iter().map(|r| (r.addr.clone(), r.last_seen)).collect();
    entry.replicas = results
        .into_iter()
        .map(|mut probe| {
            probe.last_seen = if probe.reachable { Some(now) } else { previous.get(&probe.addr).copied().flatten() };
            probe
        })
        .collect();
    let leader = entry
        .replicas
        .iter()
        .filter(|r| r.serving)
        .filter_map(|r| r.status.as_ref())
        .filter(|s| is_leader_role(s))
        .max_by_key(|s| s.term)
        .cloned();
    if leader.is_some() {
        entry.leader_seen = Some(now);
    }
    entry.leader = leader.clone();
    leader
}

/// What one coordinator pass does for one pair, decided from the table,
/// the coordinator's term, what the probes saw of the two cells and the
/// clock (`now` for the probes' times, `now_ms` wall time for the table's
/// cool-down). Pure: production executes the actions
/// (`Coordinator::reconcile`), the simulator runs the same function.
///
/// In order: an automatic failover of a sync pair whose active is down
/// (and nothing else); a degradation of a sync pair with a sick standby
/// (and nothing else); the active cell's configuration; the standby cell's
/// configuration; a degraded pair's return to sync.
#[allow(clippy::too_many_arguments)]
pub fn plan_pair(
    config: &CoordinatorConfig,
    table: &RoutingTable,
    pair: &Pair,
    term: u64,
    active: &CellHealth,
    standby: &CellHealth,
    now: Instant,
    now_ms: u64,
) -> Vec<Action> {
    let pair_id = pair.pair_id;
    let mut actions = Vec::new();
    let active_down = is_down(config, active, now);
    let standby_down = pair.standby_cell_id != 0 && is_down(config, standby, now);
    let standby_usable = standby.leader_pair().is_some_and(|s| usable_standby(&s, pair.active_cell_id, pair.epoch))
        && standby.leader.is_some();

    // 1. Automatic failover of a sync pair.
    if table::mode(pair) == PairMode::Sync && active_down && standby_usable {
        let cooled = pair.last_failover_ms == 0 || now_ms.saturating_sub(pair.last_failover_ms) >= config.cooldown_ms;
        if cooled {
            let why = format!(
                "cell {} had no reachable leader for more than {} ms",
                pair.active_cell_id, config.failover_window_ms
            );
            actions.push(Action::ChangeActive {
                mode: PairMode::Degraded,
                record: audit("coordinator", "automatic failover".into(), &why),
            });
            return actions;
        }
    }

    // 2. A sync pair with a sick standby becomes degraded.
    let waited_ms = active.leader.as_ref().map(|s| s.standby_lag_ms).unwrap_or(0);
    if table::mode(pair) == PairMode::Sync && !active_down {
        let reason = if standby_down {
            Some(format!("standby cell {} had no reachable leader for the window", pair.standby_cell_id))
        } else if standby.leader.is_some() && !standby_usable {
            Some(format!("standby cell {} holds no usable copy", pair.standby_cell_id))
        } else if waited_ms > config.failover_window_ms {
            Some(format!("the active waited {waited_ms} ms for the standby"))
        } else {
            None
        };
        if let Some(why) = reason {
            let command = TableCommand {
                kind: Some(table_command::Kind::SetMode(SetPairMode {
                    pair_id,
                    epoch: pair.epoch,
                    mode: PairMode::Degraded as i32,
                })),
                audit: Some(audit("coordinator", "degrade the pair".into(), &why)),
            };
            actions.push(Action::ProposeTable { command, count: "degrade" });
            // The active stops waiting for the standby at once (stamped
            // with the mode change the table is about to commit).
            if let Some(current) = active.leader_pair().filter(|p| p.epoch == pair.epoch) {
                let desired = PairState { mode: ReplicationMode::Async as i32, mode_seq: pair.mode_seq + 1, ..current };
                actions.push(Action::Configure { cell_id: pair.active_cell_id, state: desired });
            }
            return actions;
        }
    }

    // 3. The active cell's configuration.
    if let Some(current) = active.leader_pair() {
        let caught_up = active.leader.as_ref().is_some_and(|s| {
            s.applied_index.saturating_sub(s.standby_acked_index) <= config.resync_lag_entries_max
                && s.standby_lag_ms < config.failover_window_ms / 2
        });
        let mode = match table::mode(pair) {
            PairMode::Sync => ReplicationMode::Sync,
            PairMode::Degraded if standby_usable && !standby_down && caught_up => ReplicationMode::Sync,
            _ => ReplicationMode::Async,
        };
        let mut desired = desired_active(table, pair, mode);
        // A degraded pair's active that waits for its standby and is told
        // to stop is a mode change like a degradation: recorded in the
        // table first (DEGRADED again, a new mode_seq), so that a status
        // taken before it (SYNC, standby caught up, the old mode_seq) can
        // never return the pair to sync (step 5) while the active
        // acknowledges alone. (Found by the simulator, seed 8235.)
        let stops_waiting = table::mode(pair) == PairMode::Degraded
            && mode == ReplicationMode::Async
            && current.epoch == pair.epoch
            && pair::mode(&current) == ReplicationMode::Sync;
        if stops_waiting {
            let command = TableCommand {
                kind: Some(table_command::Kind::SetMode(SetPairMode {
                    pair_id,
                    epoch: pair.epoch,
                    mode: PairMode::Degraded as i32,
                })),
                audit: Some(audit(
                    "coordinator",
                    "degrade the pair again".into(),
                    "the standby fell behind while the active waited for it to resync",
                )),
            };
            actions.push(Action::ProposeTable { command, count: "degrade" });
            desired.mode_seq = pair.mode_seq + 1;
            actions.push(Action::Configure { cell_id: pair.active_cell_id, state: desired });
            return actions;
        }
        // A leader without authority (restarted, or newly elected, and
        // unable to confirm its epoch with its standby: a degraded pair)
        // serves nothing until stamped with the table's state.
        let unauthorized = active.leader.as_ref().is_some_and(|s| !s.authority);
        let differs = current.epoch != desired.epoch
            || current.role != desired.role
            || current.mode != desired.mode
            || current.standby_cell_id != desired.standby_cell_id
            || current.standby_addrs != desired.standby_addrs
            || current.coordinator_term < term
            || current.mode_seq != desired.mode_seq
            || unauthorized;
        // A cell already at a later epoch is never pushed back.
        if differs && current.epoch <= desired.epoch {
            actions.push(Action::Configure { cell_id: pair.active_cell_id, state: desired });
        }
    }

    // 4. The standby cell's configuration: a cell that is not this pair's
    //    standby at this epoch is rebuilt as one. Not an old active (or one
    //    fenced) while the table's active has not taken up its role at this
    //    epoch: its promotion may have been refused (a copy found
    //    incomplete after the change of active was committed), and then the
    //    old active holds the pair's only complete ledger and is the source
    //    the new active completes its copy from, after which the promotion
    //    that step 3 repeats succeeds. (Found by the simulator, seed 40608:
    //    demoting it left the pair with no active cell for good.)
    if pair.standby_cell_id != 0 {
        if let Some(current) = standby.leader_pair() {
            let fits = pair::role(&current) == PairRole::Standby
                && current.epoch == pair.epoch
                && current.source_cell_id == pair.active_cell_id;
            let successor_serves =
                active.leader_pair().is_some_and(|s| s.epoch >= pair.epoch && pair::role(&s) == PairRole::Active);
            let held_the_ledger =
                matches!(pair::role(&current), PairRole::Active | PairRole::Fenced) && current.epoch < pair.epoch;
            if held_the_ledger && !successor_serves {
                // Wait for the promotion.
            } else if !fits && current.epoch <= pair.epoch {
                actions.push(Action::Configure { cell_id: pair.standby_cell_id, state: desired_standby(pair, 0) });
            } else if fits && current.coordinator_term < term && current.source_index > 0 {
                // A new coordinator makes itself known (no rebuild: the
                // standby keeps what it holds).
                let keep = desired_standby(pair, current.source_index);
                actions.push(Action::Configure { cell_id: pair.standby_cell_id, state: keep });
            }
        }
    }

    // 5. A degraded pair returns to sync once the active waits for the
    //    standby and the standby holds everything since it started to. The
    //    SYNC state must have been configured since the pair's latest mode
    //    change (same mode_seq): a status taken before the degradation
    //    applied also shows SYNC, and trusting it would let writes the
    //    active then acknowledged alone be lost in a failover.
    if table::mode(pair) == PairMode::Degraded && !standby_down && standby_usable {
        let synced = active.leader.as_ref().is_some_and(|s| {
            s.standby_lag_ms < config.failover_window_ms / 2
                && s.pair.as_ref().is_some_and(|p| {
                    p.epoch == pair.epoch
                        && p.mode_seq == pair.mode_seq
                        && pair::waits_for_standby(p)
                        && s.standby_acked_index >= p.sync_since_index
                })
        });
        if synced {
            let command = TableCommand {
                kind: Some(table_command::Kind::SetMode(SetPairMode {
                    pair_id,
                    epoch: pair.epoch,
                    mode: PairMode::Sync as i32,
                })),
                audit: Some(audit("coordinator", "return the pair to sync".into(), "the standby caught up")),
            };
            actions.push(Action::ProposeTable { command, count: "resync" });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellbank_proto::router::CellReplicas;

    fn table(mode: PairMode, mode_seq: u64) -> RoutingTable {
        RoutingTable {
            slice_count: 1,
            slice_pair: vec![1],
            cells: vec![
                CellReplicas { cell_id: 1, replicas: vec!["a".into()] },
                CellReplicas { cell_id: 2, replicas: vec!["b".into()] },
            ],
            pairs: vec![Pair {
                pair_id: 1,
                active_cell_id: 1,
                standby_cell_id: 2,
                epoch: 3,
                mode: mode as i32,
                mode_seq,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn leader(pair: PairState, applied: u64, acked: u64) -> CellHealth {
        let status = ReplicaStatus {
            role: "leader".into(),
            raft_role: cellbank_proto::cell::RaftRole::Leader as i32,
            term: 1,
            applied_index: applied,
            standby_acked_index: acked,
            authority: true,
            pair: Some(pair),
            ..Default::default()
        };
        let probe = ReplicaProbe {
            addr: "x".into(),
            reachable: true,
            serving: true,
            status: Some(status.clone()),
            last_seen: None,
        };
        CellHealth { replicas: vec![probe], leader_seen: Some(Instant::now()), leader: Some(status) }
    }

    /// The leader of cell 2, a usable standby of cell 1 at epoch 3 holding
    /// its log up to 50.
    fn usable_standby_leader() -> CellHealth {
        let state = PairState {
            epoch: 3,
            role: PairRole::Standby as i32,
            mode: ReplicationMode::Sync as i32,
            source_cell_id: 1,
            source_index: 50,
            coordinator_term: 1,
            ..Default::default()
        };
        leader(state, 60, 0)
    }

    /// The bug the simulator found (seed 38 of its first sweep): a status
    /// taken before the degradation applied still shows SYNC with the
    /// standby caught up; returning the pair to sync on it let the active
    /// then acknowledge writes alone, and a failover lost them.
    #[test]
    fn a_degraded_pair_returns_to_sync_only_on_a_sync_state_configured_after_its_latest_mode_change() {
        let table = table(PairMode::Degraded, 7);
        let pair = table.pairs[0];
        let standby = usable_standby_leader();
        let mut sync = desired_active(&table, &pair, ReplicationMode::Sync);
        sync.coordinator_term = 1;
        sync.sync_since_index = 40;
        let resyncs =
            |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::ProposeTable { count: "resync", .. }));
        let config = CoordinatorConfig::default();
        let now = Instant::now();
        // Configured SYNC under the current mode change: back to sync.
        let current = leader(sync.clone(), 50, 50);
        assert!(resyncs(&plan_pair(&config, &table, &pair, 1, &current, &standby, now, 0)));
        // The same state from before the degradation (older mode change):
        // not evidence, and the active is stamped again instead.
        let stale = leader(PairState { mode_seq: 6, ..sync }, 50, 50);
        let actions = plan_pair(&config, &table, &pair, 1, &stale, &standby, now, 0);
        assert!(!resyncs(&actions), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Configure { cell_id: 1, state } if state.mode_seq == 7)));
    }

    /// Found by the simulator (seed 8235): within one mode change, step 3
    /// turned a resyncing active back to ASYNC while a status from before
    /// (SYNC, standby caught up) returned the pair to sync.
    #[test]
    fn a_resyncing_active_told_to_stop_waiting_is_a_new_mode_change() {
        let table = table(PairMode::Degraded, 7);
        let pair = table.pairs[0];
        let mut sync = desired_active(&table, &pair, ReplicationMode::Sync);
        sync.coordinator_term = 1;
        sync.sync_since_index = 40;
        // The standby is usable but far behind: the active must stop waiting.
        let standby = usable_standby_leader();
        let behind = leader(sync, 10_000, 50);
        let actions = plan_pair(&CoordinatorConfig::default(), &table, &pair, 1, &behind, &standby, Instant::now(), 0);
        assert!(matches!(&actions[0], Action::ProposeTable { count: "degrade", .. }), "{actions:?}");
        assert!(
            matches!(&actions[1], Action::Configure { cell_id: 1, state }
                if state.mode_seq == 8 && state.mode == ReplicationMode::Async as i32),
            "{actions:?}"
        );
        assert_eq!(actions.len(), 2, "{actions:?}");
    }

    #[test]
    fn a_degradation_stamps_the_async_configure_with_the_mode_change_it_commits() {
        let table = table(PairMode::Sync, 7);
        let pair = table.pairs[0];
        let mut sync = desired_active(&table, &pair, ReplicationMode::Sync);
        sync.coordinator_term = 1;
        // The standby answers but holds nothing usable: degrade.
        let standby = leader(PairState { epoch: 3, role: PairRole::Active as i32, ..Default::default() }, 1, 0);
        let actions = plan_pair(
            &CoordinatorConfig::default(),
            &table,
            &pair,
            1,
            &leader(sync, 10, 10),
            &standby,
            Instant::now(),
            0,
        );
        assert!(matches!(&actions[0], Action::ProposeTable { count: "degrade", .. }), "{actions:?}");
        assert!(matches!(&actions[1], Action::Configure { cell_id: 1, state }
            if state.mode_seq == 8 && state.mode == ReplicationMode::Async as i32));
    }

    /// What a forced failover reports it may lose: nothing for a SYNC pair
    /// whose active is gone; everything after the standby's copy for a
    /// DEGRADED one; the fence's tail when the standby did not catch up.
    #[test]
    fn a_forced_failover_reports_the_window_it_may_lose() {
        let standby = usable_standby_leader();
        let gone = CellHealth::default();
        let sync = table(PairMode::Sync, 1).pairs[0];
        let degraded = table(PairMode::Degraded, 1).pairs[0];
        let start = check_failover(&sync, true, &gone, &standby).expect("a usable standby");
        assert_eq!((start.standby_holds, start.active_state.clone()), (50, None));
        assert_eq!(loss_window(&sync, &start, None), None);
        let window = loss_window(&degraded, &start, None).expect("a degraded pair may lose its tail");
        assert_eq!((window.after_index, window.through_index), (50, None));
        assert!(window.describe(PairMode::Degraded).contains("anything after it may be lost"));
        // Fenced at 70 while the standby acknowledged 60: 61..=70.
        let fenced = loss_window(&degraded, &start, Some((70, 60))).expect("a tail");
        assert_eq!((fenced.after_index, fenced.through_index), (60, Some(70)));
        assert!(fenced.describe(PairMode::Degraded).starts_with("entries 61..=70 of cell 1"));
        assert_eq!(loss_window(&degraded, &start, Some((50, 40))), None, "the standby holds the fence");
        // Without --force: a DEGRADED pair, or one whose active leads, is refused.
        assert_eq!(
            check_failover(&degraded, false, &gone, &standby),
            Err(ActionRefusal::FailoverNotSync { pair: 1, mode: PairMode::Degraded })
        );
        let active = leader(desired_active(&table(PairMode::Sync, 1), &sync, ReplicationMode::Sync), 10, 10);
        assert_eq!(
            check_failover(&sync, false, &active, &standby),
            Err(ActionRefusal::Healthy { pair: 1, active: sync.active_cell_id })
        );
        assert_eq!(
            check_failover(&sync, true, &active, &gone),
            Err(ActionRefusal::NothingToFailOverTo(sync.standby_cell_id))
        );
        assert!(check_switchover(&sync, &active, &standby).is_ok());
        assert_eq!(
            check_switchover(&degraded, &active, &standby),
            Err(ActionRefusal::SwitchoverNotSync { pair: 1, mode: PairMode::Degraded })
        );
        assert_eq!(
            check_switchover(&sync, &gone, &standby),
            Err(ActionRefusal::ActiveHasNoLeader(sync.active_cell_id))
        );
        assert_eq!(
            check_switchover(&sync, &active, &gone),
            Err(ActionRefusal::StandbyIncomplete(sync.standby_cell_id))
        );
    }

    /// Refusals reach an operator as FAILED_PRECONDITION with their words; a
    /// cell's own answer passes through (its code, message and details) but
    /// not its leader hint, which names a cell's replica, not a router; a
    /// failed promotion is ABORTED (the table changed: the action is not to
    /// be repeated), and a table that did not answer is DEADLINE_EXCEEDED.
    #[test]
    fn coordinator_errors_become_statuses_at_the_edge() {
        let refused: Status = CoordinatorError::from(ActionRefusal::NoStandby(4)).into();
        assert_eq!((refused.code(), refused.message()), (tonic::Code::FailedPrecondition, "pair 4 has no standby"));
        let gone: Status = CoordinatorError::UnknownPair(9).into();
        assert_eq!(gone.code(), tonic::Code::NotFound);
        let answer = cellbank_client::errors::not_leader("not the leader".into(), Some("127.0.0.1:9"));
        let passed: Status = CoordinatorError::Cell { cell_id: 2, status: answer }.into();
        assert_eq!((passed.code(), passed.message()), (tonic::Code::Unavailable, "not the leader"));
        assert_eq!(cellbank_client::retry::leader_hint(&passed), None, "a cell's replica is not a router");
        assert_eq!(cellbank_client::errors::reason(&passed).as_deref(), Some("NOT_LEADER"), "details kept");
        let pending = CoordinatorError::PromotionPending {
            cell_id: 3,
            epoch: 5,
            old_active: 1,
            cause: Box::new(CoordinatorError::Cell { cell_id: 3, status: Status::unavailable("busy") }),
        };
        let status: Status = pending.into();
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(!cellbank_client::retry::retryable(&status, false), "not to be repeated");
        assert!(status.message().contains("cell 3 active at epoch 5") && status.message().contains("(busy)"));
        assert!(status.message().contains("leaves cell 1 as it is"));
        let unknown: Status = CoordinatorError::TableTimeout.into();
        assert_eq!(unknown.code(), tonic::Code::DeadlineExceeded);
        assert!(!cellbank_client::retry::retryable(&unknown, false));
    }

    /// Found by the simulator (seed 40608): after a committed change of
    /// active whose promotion the new active refused (its copy was being
    /// rebuilt), the next pass rebuilt the old active as the new one's
    /// standby, and the pair had no active cell for good. Now the promotion
    /// is repeated and the old active, which holds the only complete ledger
    /// and completes the new active's copy, is left alone until the new
    /// active serves; then it becomes its standby.
    #[test]
    fn the_old_active_is_kept_until_its_successor_is_promoted() {
        // The table after the change of active: cell 1 active at epoch 3,
        // cell 2 (the old active, fenced at epoch 2) its standby.
        let table = table(PairMode::Degraded, 7);
        let pair = table.pairs[0];
        let config = CoordinatorConfig::default();
        let now = Instant::now();
        let rebuilding = PairState {
            epoch: 2,
            role: PairRole::Standby as i32,
            mode: ReplicationMode::Sync as i32,
            source_cell_id: 2,
            rebuild_snapshot_index: 90,
            coordinator_term: 1,
            ..Default::default()
        };
        let old_active = PairState {
            epoch: 2,
            role: PairRole::Fenced as i32,
            mode: ReplicationMode::Async as i32,
            standby_cell_id: 1,
            coordinator_term: 1,
            ..Default::default()
        };
        let actions = plan_pair(
            &config,
            &table,
            &pair,
            1,
            &leader(rebuilding, 20, 0),
            &leader(old_active.clone(), 95, 0),
            now,
            0,
        );
        assert!(
            actions.iter().any(|a| matches!(a, Action::Configure { cell_id: 1, state }
                if state.epoch == 3 && pair::role(state) == PairRole::Active)),
            "the promotion is repeated: {actions:?}"
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Configure { cell_id: 2, .. })),
            "the old active is left alone: {actions:?}"
        );
        // Once the new active serves at epoch 3, the old one becomes its standby.
        let mut promoted = desired_active(&table, &pair, ReplicationMode::Async);
        promoted.coordinator_term = 1;
        let actions =
            plan_pair(&config, &table, &pair, 1, &leader(promoted, 30, 0), &leader(old_active, 95, 0), now, 0);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Configure { cell_id: 2, state }
                if pair::role(state) == PairRole::Standby && state.source_cell_id == 1 && state.source_index == 0)),
            "{actions:?}"
        );
    }
}
