//! The routers' admin API: cluster status, switchover, failover, standby
//! rebuild and the audit log. Actions run on the coordinator (the routers'
//! Raft leader); another router answers UNAVAILABLE with the leader's
//! address in `cellbank-leader-addr`. When the router has an admin token,
//! every call must carry it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cellbank_proto::router::router_admin_server::RouterAdmin;
use cellbank_proto::router::*;
use cellbank_proto::LEADER_ADDR_METADATA_KEY;
use cellbank_raft::driver::DriverHandle;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::coordinator::Coordinator;
use crate::table::{self, TableMachine};

pub struct AdminService {
    pub router_id: u64,
    pub node: DriverHandle<TableMachine>,
    pub coordinator: Arc<Coordinator>,
    pub db: Arc<rocksdb::DB>,
    pub admin_token: Option<String>,
    /// Whether IsolateCells is allowed (router config `fault_injection`).
    pub fault_injection: bool,
    /// Forced failovers of pairs that are not SYNC awaiting a second
    /// operator: pair id -> (the first operator, when it asked).
    pub approvals: std::sync::Mutex<std::collections::HashMap<u64, (String, std::time::Instant)>>,
}

/// How long the first operator's request for a forced failover of a pair
/// that may lose acknowledged writes waits for a second operator.
pub const APPROVAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// What a forced failover of a pair that is not SYNC needs: the first
/// operator's request is held, and a different operator's request for the
/// same pair within [`APPROVAL_WINDOW`] lets it go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Approval {
    Approved { first: String },
    Held,
    SameOperator,
}

/// Records `who`'s request for `pair_id` in `pending` at `now`.
pub fn approve(
    pending: &mut std::collections::HashMap<u64, (String, std::time::Instant)>,
    pair_id: u64,
    who: &str,
    now: std::time::Instant,
) -> Approval {
    pending.retain(|_, (_, at)| now.duration_since(*at) < APPROVAL_WINDOW);
    match pending.get(&pair_id) {
        Some((first, _)) if first == who => Approval::SameOperator,
        Some((first, _)) => {
            let first = first.clone();
            pending.remove(&pair_id);
            Approval::Approved { first }
        }
        None => {
            pending.insert(pair_id, (who.to_string(), now));
            Approval::Held
        }
    }
}

/// Most audit records one call returns (the newest).
pub const AUDIT_RECORDS_MAX: usize = 1000;

impl AdminService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match &self.admin_token {
            Some(token) => cellbank_proto::check_admin_token(request, token),
            None => Ok(()),
        }
    }

    /// Refuses on a router that is not the coordinator, naming the leader.
    fn require_coordinator(&self) -> Result<(), Status> {
        if self.node.shared.is_leader.load(Ordering::Relaxed) {
            return Ok(());
        }
        let leader_id = self.node.shared.leader_id.load(Ordering::Relaxed);
        let mut status = Status::unavailable(format!("router {} is not the coordinator", self.router_id));
        if let Some(addr) = self.node.shared.peers.read().expect("peers lock").get(&leader_id) {
            if let Ok(value) = addr.parse() {
                status.metadata_mut().insert(LEADER_ADDR_METADATA_KEY, value);
            }
        }
        Err(status)
    }

    /// Who the audit log names for `request`: the identity its
    /// certificate proved. The name a request gives (`who`) is recorded
    /// only on an insecure router, marked as unproven.
    fn who<T>(request: &Request<T>, given: &str) -> String {
        match cellbank_client::gate::caller(request) {
            Some(identity) => identity.to_string(),
            None if given.is_empty() => "unauthenticated".into(),
            None => format!("unauthenticated ({given})"),
        }
    }

    fn check_pair(&self, pair_id: u64) -> Result<(), Status> {
        if pair_id == 0 {
            return Err(Status::invalid_argument("pair_id: must be set"));
        }
        let table = self.coordinator.pool.table();
        if table::find_pair(&table, pair_id).is_none() {
            let known: Vec<String> = table.pairs.iter().map(|p| p.pair_id.to_string()).collect();
            return Err(Status::not_found(format!("pair_id: no pair {pair_id} (pairs: {})", known.join(", "))));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RouterAdmin for AdminService {
    async fn status(&self, request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatus>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let node = self.node.status().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let table = self.coordinator.pool.table();
        let health = self.coordinator.health();
        let routers = node
            .peers
            .iter()
            .map(|(id, addr)| RouterInfo { router_id: *id, addr: addr.clone(), leader: *id == node.leader_id })
            .collect();
        let now = tokio::time::Instant::now();
        let mut replicas = Vec::new();
        for cell in &table.cells {
            if let Some(cell_health) = health.get(&cell.cell_id) {
                for probe in &cell_health.replicas {
                    replicas.push(ReplicaHealth {
                        cell_id: cell.cell_id,
                        addr: probe.addr.clone(),
                        reachable: probe.reachable,
                        serving: probe.serving,
                        status: probe.status.clone(),
                        last_seen_ms_ago: probe
                            .last_seen
                            .map(|t| now.saturating_duration_since(t).as_millis() as u64)
                            .unwrap_or(u64::MAX),
                    });
                }
            }
        }
        let pairs = table
            .pairs
            .iter()
            .map(|pair| {
                let slices = table
                    .slice_pair
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| **p == pair.pair_id)
                    .map(|(s, _)| s as u32)
                    .collect();
                let active = health.get(&pair.active_cell_id).and_then(|h| h.leader.clone());
                let standby = health.get(&pair.standby_cell_id).and_then(|h| h.leader.clone());
                PairStatus {
                    pair: Some(*pair),
                    slices,
                    active_leader_replica: active.as_ref().map(|s| s.replica_id).unwrap_or(0),
                    standby_leader_replica: standby.as_ref().map(|s| s.replica_id).unwrap_or(0),
                    replication_lag_entries: active
                        .as_ref()
                        .filter(|_| pair.standby_cell_id != 0)
                        .map(|s| s.applied_index.saturating_sub(s.standby_acked_index))
                        .unwrap_or(0),
                    replication_lag_ms: active.as_ref().map(|s| s.standby_lag_ms).unwrap_or(0),
                    outbox_pending: active.as_ref().map(|s| s.outbox_pending).unwrap_or(0),
                    outbox_oldest_age_ms: active.as_ref().map(|s| s.outbox_oldest_age_ms).unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(ClusterStatus {
            router_id: self.router_id,
            leader_router_id: node.leader_id,
            term: node.term,
            routers,
            table: Some(table),
            pairs,
            replicas,
            applied_index: node.applied_index,
        }))
    }

    async fn switchover(&self, request: Request<SwitchoverRequest>) -> Result<Response<AdminActionResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let r = request.into_inner();
        self.check_pair(r.pair_id)?;
        let response = self.coordinator.switchover(r.pair_id, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn failover(&self, request: Request<FailoverRequest>) -> Result<Response<AdminActionResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let proven = cellbank_client::gate::caller(&request).is_some();
        let r = request.into_inner();
        self.check_pair(r.pair_id)?;
        let mut who = who;
        let mode = table::find_pair(&self.coordinator.pool.table(), r.pair_id).map(table::mode);
        if r.force && proven && mode != Some(PairMode::Sync) {
            let pending = &mut self.approvals.lock().expect("approvals lock");
            match approve(pending, r.pair_id, &who, std::time::Instant::now()) {
                Approval::Approved { first } => who = format!("{first}, approved by {who}"),
                Approval::Held => {
                    return Err(Status::failed_precondition(format!(
                        "a forced failover of pair {} ({}) may lose acknowledged writes: it needs a second \
                         operator; {who} asked, and another operator must ask the same within {} s",
                        r.pair_id,
                        mode.map(|m| m.as_str_name().trim_start_matches("PAIR_MODE_")).unwrap_or("unknown"),
                        APPROVAL_WINDOW.as_secs()
                    )))
                }
                Approval::SameOperator => {
                    return Err(Status::failed_precondition(format!(
                        "{who} already asked for a forced failover of pair {}: a different operator must approve it",
                        r.pair_id
                    )))
                }
            }
        }
        let response = self.coordinator.failover(r.pair_id, r.force, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn rebuild_standby(
        &self,
        request: Request<RebuildStandbyRequest>,
    ) -> Result<Response<AdminActionResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let r = request.into_inner();
        self.check_pair(r.pair_id)?;
        let response = self.coordinator.rebuild_standby(r.pair_id, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn add_pair(&self, request: Request<AddPairRequest>) -> Result<Response<AdminActionResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let r = request.into_inner();
        let add = r.pair.ok_or_else(|| Status::invalid_argument("pair: must be set"))?;
        let response = self.coordinator.add_pair(add, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn move_slice(&self, request: Request<MoveSliceRequest>) -> Result<Response<MoveSliceResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let r = request.into_inner();
        if r.to_pair_id == 0 {
            return Err(Status::invalid_argument("to_pair_id: must be set"));
        }
        let response = self.coordinator.move_slice(r.slice, r.to_pair_id, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn set_cell_replicas(
        &self,
        request: Request<SetCellReplicasRequest>,
    ) -> Result<Response<AdminActionResponse>, Status> {
        self.authorize(&request)?;
        self.require_coordinator()?;
        let who = Self::who(&request, &request.get_ref().who);
        let r = request.into_inner();
        let set = r.set.ok_or_else(|| Status::invalid_argument("set: must be set"))?;
        let response = self.coordinator.set_cell_replicas(set, &who, &r.why).await?;
        Ok(Response::new(response))
    }

    async fn isolate_cells(
        &self,
        request: Request<IsolateCellsRequest>,
    ) -> Result<Response<IsolateCellsResponse>, Status> {
        self.authorize(&request)?;
        if !self.fault_injection {
            return Err(Status::permission_denied("fault injection is disabled in this router's config"));
        }
        let r = request.into_inner();
        let table = self.coordinator.pool.table();
        if let Some(unknown) = r.cell_ids.iter().find(|c| table.cells.iter().all(|known| known.cell_id != **c)) {
            return Err(Status::not_found(format!("cell_ids: no cell {unknown}")));
        }
        if !r.cell_ids.is_empty()
            && (r.duration_ms == 0 || r.duration_ms > crate::cells::ISOLATION_MAX.as_millis() as u64)
        {
            return Err(Status::invalid_argument("duration_ms: must be 1..=600000"));
        }
        let isolated = self.coordinator.pool.isolate(&r.cell_ids, std::time::Duration::from_millis(r.duration_ms));
        tracing::warn!(cells = ?isolated, duration_ms = r.duration_ms, "injected fault: cells isolated from this router");
        Ok(Response::new(IsolateCellsResponse { isolated_cell_ids: isolated }))
    }

    async fn slice_load(&self, _request: Request<SliceLoadRequest>) -> Result<Response<SliceLoadResponse>, Status> {
        let load = self.coordinator.pool.load();
        Ok(Response::new(SliceLoadResponse {
            router_id: self.router_id,
            counting_ms: load.counting_ms(),
            slices: load.counters(),
        }))
    }

    async fn settlement(
        &self,
        request: Request<cellbank_proto::cell::SettlementRequest>,
    ) -> Result<Response<ClusterSettlement>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        if r.to_ms != 0 && r.to_ms <= r.from_ms {
            return Err(Status::invalid_argument("to_ms: must be after from_ms"));
        }
        let table = self.coordinator.pool.table();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut lines = Vec::new();
        for pair in &table.pairs {
            let pair_id = pair.pair_id;
            let figures = self
                .coordinator
                .pool
                .call_admin(table::to_pair(pair_id), deadline, r, |mut c, req| async move { c.settlement(req).await })
                .await?;
            for figure in figures.received {
                lines.push(SettlementLine {
                    from_pair_id: figure.from_pair_id,
                    to_pair_id: pair_id,
                    currency: figure.currency,
                    amount: figure.amount,
                    credits: figure.credits,
                });
            }
        }
        lines.sort_by(|a, b| {
            (a.from_pair_id, a.to_pair_id, &a.currency).cmp(&(b.from_pair_id, b.to_pair_id, &b.currency))
        });
        Ok(Response::new(ClusterSettlement { from_ms: r.from_ms, to_ms: r.to_ms, lines }))
    }

    async fn audit_log(&self, request: Request<AuditLogRequest>) -> Result<Response<AuditLogResponse>, Status> {
        self.authorize(&request)?;
        let mut records = Vec::new();
        let mut iter = self.db.raw_iterator();
        iter.seek(table::audit_prefix());
        while iter.valid() {
            let key = iter.key().expect("key");
            if !key.starts_with(table::audit_prefix()) {
                break;
            }
            let record = AuditRecord::decode(iter.value().expect("value"))
                .map_err(|e| Status::internal(format!("corrupt audit record: {e}")))?;
            records.push(record);
            iter.next();
        }
        let skip = records.len().saturating_sub(AUDIT_RECORDS_MAX);
        Ok(Response::new(AuditLogResponse { records: records.split_off(skip) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_forced_failover_needs_a_second_operator_within_the_window() {
        let mut pending = std::collections::HashMap::new();
        let t0 = Instant::now();
        assert_eq!(approve(&mut pending, 1, "alice", t0), Approval::Held);
        assert_eq!(approve(&mut pending, 1, "alice", t0 + Duration::from_secs(1)), Approval::SameOperator);
        assert_eq!(approve(&mut pending, 2, "bob", t0), Approval::Held, "another pair waits on its own");
        assert_eq!(
            approve(&mut pending, 1, "bob", t0 + Duration::from_secs(2)),
            Approval::Approved { first: "alice".into() }
        );
        assert_eq!(approve(&mut pending, 1, "carol", t0 + Duration::from_secs(3)), Approval::Held, "used up");
        // A request older than the window has lapsed.
        assert_eq!(approve(&mut pending, 2, "dave", t0 + APPROVAL_WINDOW + Duration::from_secs(1)), Approval::Held);
    }
}
