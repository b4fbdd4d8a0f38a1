//! What every service of a replica shares ([`ReplicaContext`]: its node,
//! database, pair state, replication and metrics) and the rules every
//! request meets before it is served: the request gate (epoch, leadership,
//! the settle after a promotion), the caller's deadline, the leader hint.
//! The courier and the expiry sweeper (`crate::clearing`) use it too.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::{Command, PairRole, PairState};
use cellbank_proto::v1::*;
use cellbank_proto::ShortName;
use rocksdb::DB;
use tonic::{Request, Status};

use crate::ledger::{pair, validate, Ledger, PairView};
use crate::metrics::Metrics;
use crate::replication::Replication;
use cellbank_client::errors::with_epoch;
use cellbank_raft::driver::{DriverHandle, NodeError};
use cellbank_raft::node::ProposeError;
use cellbank_raft::storage::{read_u64, APPLIED_INDEX_KEY};
use cellbank_raft::transport::GrpcTransport;

/// How long a request waits for its command to apply when the client set no deadline.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest `ListTransfers` page.
pub const PAGE_SIZE_MAX: u32 = 1000;
pub const PAGE_SIZE_DEFAULT: u32 = 100;

/// What every service of a replica shares.
#[derive(Clone)]
pub struct ReplicaContext {
    /// The cluster's name (checked on every standby stream's hello).
    pub cluster: String,
    pub cell_id: u64,
    pub replica_id: u64,
    pub addr: String,
    pub node: DriverHandle<Ledger>,
    pub db: Arc<DB>,
    pub metrics: Arc<Metrics>,
    pub transport: Arc<GrpcTransport>,
    /// Bounds concurrent snapshot receives.
    pub snapshot_receives: Arc<tokio::sync::Semaphore>,
    /// The cell's pair state as applied here.
    pub pair: PairView,
    pub replication: Arc<Replication>,
    /// Until when this replica, just promoted by a failover, serves nothing.
    pub settling_until: crate::ledger::SettleUntil,
    /// Free space on the data disk: below the watermark, writes are refused.
    pub disk: Arc<crate::disk::DiskWatch>,
}

impl ReplicaContext {
    pub(crate) fn leader_addr(&self, leader_id: u64) -> Option<String> {
        if leader_id == 0 {
            return None;
        }
        self.node.shared.peers.read().expect("peers lock").get(&leader_id).cloned()
    }

    pub(crate) fn unavailable(&self, message: String, leader_id: u64) -> Status {
        cellbank_client::errors::not_leader(message, self.leader_addr(leader_id).as_deref())
    }

    pub(crate) fn node_error(&self, error: NodeError) -> Status {
        let leader_id = match &error {
            NodeError::Propose(ProposeError::NotLeader { leader_id }) => *leader_id,
            NodeError::Propose(ProposeError::Superseded { leader_id }) => *leader_id,
            _ => self.node.shared.leader_id.load(Ordering::Relaxed),
        };
        if error == NodeError::Overloaded {
            return cellbank_client::errors::overloaded(error.to_string(), self.leader_addr(leader_id).as_deref());
        }
        self.unavailable(error.to_string(), leader_id)
    }

    /// Waits for `future` up to the request's deadline.
    pub(crate) async fn within<T>(
        &self,
        timeout: Duration,
        future: impl std::future::Future<Output = Result<T, NodeError>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.node_error(error)),
            Err(_) => Err(Status::deadline_exceeded(
                "the command did not apply in time; its outcome is unknown: retry with the same transfer_id",
            )),
        }
    }

    /// True when this replica may serve the cell now: it leads, and (for a
    /// paired cell) it has earned authority in this term (see
    /// `replication.rs`).
    pub(crate) fn has_authority(&self) -> bool {
        let term = self.node.shared.leader_term.load(Ordering::Relaxed);
        self.replication.has_authority(term, &self.pair.borrow())
    }

    /// Refuses a client request this cell must not serve: a routing epoch
    /// other than the cell's, a standby or fenced cell, a deposed active, a
    /// leader that has not earned its authority yet. Each refusal is
    /// UNAVAILABLE (retryable) with the cell's epoch.
    pub(crate) fn gate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let requested = match metadata.get(cellbank_proto::EPOCH_METADATA_KEY) {
            Some(requested) => Some(
                requested
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| Status::invalid_argument("cellbank-epoch: not a number"))?,
            ),
            None => None,
        };
        let settling =
            self.settling_until.lock().expect("settle lock").is_some_and(|until| std::time::Instant::now() < until);
        let refusal = {
            let state = self.pair.borrow();
            gate_refusal(
                &state,
                requested,
                settling,
                self.replication.state.borrow().deposed_by_epoch,
                self.has_authority(),
            )
        };
        let Some(refusal) = refusal else { return Ok(()) };
        let cell_epoch = self.pair.borrow().epoch;
        let cell_id = self.cell_id;
        let (message, epoch) = match refusal {
            GateRefusal::Epoch { requested } => {
                let why = if requested < cell_epoch { "stale" } else { "newer than this cell's" };
                (format!("routing epoch {requested} is {why}: cell {cell_id} is at epoch {cell_epoch}"), cell_epoch)
            }
            GateRefusal::NotServing(role) => (
                format!("cell {cell_id} is {} at epoch {cell_epoch} and serves no client requests", role.as_str_name()),
                cell_epoch,
            ),
            GateRefusal::Settling => (
                format!(
                    "cell {cell_id} was just promoted and serves nothing until the old active's read lease has run out"
                ),
                cell_epoch,
            ),
            GateRefusal::Deposed(by) => (format!("cell {cell_id} was deposed: its pair moved to epoch {by}"), by),
            GateRefusal::NoAuthority => {
                let leader_id = self.node.shared.leader_id.load(Ordering::Relaxed);
                if !self.node.shared.is_leader.load(Ordering::Relaxed) {
                    return Err(self.unavailable(format!("replica {} is not the leader", self.replica_id), leader_id));
                }
                (
                    format!(
                        "cell {cell_id} has a new leader that has not yet confirmed epoch {cell_epoch} with its \
                         standby or the coordinator"
                    ),
                    cell_epoch,
                )
            }
        };
        Err(with_epoch(Status::unavailable(message), epoch))
    }

    pub(crate) async fn propose(
        &self,
        timeout: Duration,
        commands: Vec<Command>,
    ) -> Result<Vec<TransferResult>, Status> {
        self.propose_of(timeout, commands, false).await
    }

    /// [`Self::propose`] for credits: each result is passed back as it is.
    pub(crate) async fn propose_credits(
        &self,
        timeout: Duration,
        commands: Vec<Command>,
    ) -> Result<Vec<TransferResult>, Status> {
        self.propose_of(timeout, commands, true).await
    }

    async fn propose_of(
        &self,
        timeout: Duration,
        commands: Vec<Command>,
        credits: bool,
    ) -> Result<Vec<TransferResult>, Status> {
        if let Some(refusal) = self.disk.refusal(self.cell_id, self.replica_id) {
            return Err(refusal);
        }
        let started = tokio::time::Instant::now();
        let sampled = cellbank_client::trace::sampled();
        if sampled {
            tracing::info!(commands = commands.len(), "proposing");
        }
        let results = self.within(timeout, self.node.propose(commands)).await?;
        if let Some(refused) = results.iter().find(|r| r.code == ResultCode::CellNotWritable as i32) {
            let epoch = self.pair.borrow().epoch;
            return Err(with_epoch(Status::unavailable(format!("nothing applied: {}", refused.detail)), epoch));
        }
        // A write for a user whose slice is moving (or has moved) away:
        // the caller retries it where the routing table then sends it (the
        // other items of the call are idempotent: a retry answers them as
        // recorded). A credit's answer is the courier's to read.
        let refused = results.iter().find(|r| r.code == ResultCode::SliceMoving as i32);
        if let Some(refused) = refused.filter(|_| !credits) {
            let epoch = self.pair.borrow().epoch;
            let message = format!("nothing applied for that user: {}; ask the routers again", refused.detail);
            return Err(with_epoch(Status::unavailable(message), epoch));
        }
        // The client hears of these results only once they may be
        // acknowledged: the entry that carried them is judged by the rule
        // of `replication.rs`. (A retry's `applied_index` is the index that
        // first recorded it, maybe in the log of the cell this one was the
        // standby of: not an index of this log.)
        let revealed = results.iter().map(|r| if r.entry_index > 0 { r.entry_index } else { r.applied_index }).max();
        let revealed = revealed.unwrap_or(0);
        let remaining = timeout.saturating_sub(started.elapsed());
        if sampled {
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(entry_index = revealed, ms, "committed and applied");
        }
        self.replication.wait_for(&self.pair, revealed, remaining).await?;
        if sampled {
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(entry_index = revealed, ms, "acknowledged: the standby holds it (or the pair has none)");
        }
        // One metric update per code per call, not per transfer.
        let mut counts: Vec<(i32, u64)> = Vec::new();
        for result in &results {
            match counts.iter_mut().find(|(code, _)| *code == result.code) {
                Some((_, count)) => *count += 1,
                None => counts.push((result.code, 1)),
            }
        }
        for (code, count) in counts {
            let code = ResultCode::try_from(code).unwrap_or(ResultCode::Unspecified);
            self.metrics.results_total.with_label_values(&[code.short_name()]).inc_by(count);
        }
        Ok(results)
    }

    /// A consistent view of the ledger for a read: a ReadIndex barrier, then
    /// a RocksDB snapshot, served once the standby holds everything in it
    /// (sync mode) and has recently confirmed it is still the standby.
    /// Returns the view and the index it reflects.
    pub(crate) async fn read_view(
        &self,
        timeout: Duration,
    ) -> Result<(rocksdb::SnapshotWithThreadMode<'_, DB>, u64), Status> {
        let started = tokio::time::Instant::now();
        self.within(timeout, self.node.read_index()).await?;
        let view = self.db.snapshot();
        let index = read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0);
        let remaining = timeout.saturating_sub(started.elapsed());
        self.replication.wait_for_read(&self.pair, index, remaining).await?;
        Ok((view, index))
    }
}

/// Why a replica refuses to serve a client request (all retryable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateRefusal {
    /// The request names a routing epoch other than the cell's.
    Epoch { requested: u64 },
    /// A standby or fenced cell serves no client requests.
    NotServing(PairRole),
    /// Just promoted: waiting out the old active's read lease.
    Settling,
    /// The cell learnt its pair moved to this later epoch.
    Deposed(u64),
    /// Not the leader, or a leader without authority in its term.
    NoAuthority,
}

/// The gate every client request passes, as a pure function of the cell's
/// pair state, the request's routing epoch, whether the replica is still
/// settling after a promotion, the deposition its shipper learnt and
/// whether it has authority. The simulator runs it too.
pub fn gate_refusal(
    state: &PairState,
    requested_epoch: Option<u64>,
    settling: bool,
    ship_deposed_by: u64,
    authority: bool,
) -> Option<GateRefusal> {
    if let Some(requested) = requested_epoch.filter(|e| *e != state.epoch) {
        return Some(GateRefusal::Epoch { requested });
    }
    let role = pair::role(state);
    if !pair::role_writable(role) {
        return Some(GateRefusal::NotServing(role));
    }
    if settling {
        return Some(GateRefusal::Settling);
    }
    let deposed_by = state.deposed_by_epoch.max(ship_deposed_by);
    if deposed_by > state.epoch {
        return Some(GateRefusal::Deposed(deposed_by));
    }
    if !authority {
        return Some(GateRefusal::NoAuthority);
    }
    None
}

pub(crate) fn now_ms() -> u64 {
    cellbank_raft::faults::wall_ms()
}

pub(crate) fn timeout_of<T>(request: &Request<T>) -> Duration {
    cellbank_client::deadline::of_request(request).unwrap_or(REQUEST_TIMEOUT_DEFAULT).min(REQUEST_TIMEOUT_DEFAULT * 6)
}

/// A page size asked for: 0 means the default.
pub(crate) fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(PAGE_SIZE_DEFAULT),
        n if n > PAGE_SIZE_MAX => Err(Status::invalid_argument(format!("page_size: {n} exceeds {PAGE_SIZE_MAX}"))),
        n => Ok(n),
    }
}

pub(crate) fn invalid(error: validate::Invalid) -> Status {
    cellbank_client::errors::invalid_argument(error.field, &error.detail)
}

impl ReplicaContext {
    /// Refuses a read of any of `users` whose slice has left this cell (the
    /// zero balance it left behind is not the user's): UNAVAILABLE with
    /// the pair's epoch, so the router asks the table again. The marks are
    /// read once, however many users.
    pub(crate) fn check_slices_here(
        &self,
        kv: &dyn cellbank_raft::Kv,
        users: impl IntoIterator<Item = u64>,
    ) -> Result<(), Status> {
        let marks = crate::ledger::slices::read_marks(kv);
        for user_id in users {
            if let Some(mark) = crate::ledger::slices::mark_of_user(&marks, user_id)
                .filter(|mark| mark.mark == cellbank_proto::cell::SliceMark::Gone as i32)
            {
                let epoch = self.pair.borrow().epoch;
                return Err(with_epoch(
                    Status::unavailable(format!(
                        "slice {} of user {user_id} moved to pair {}: ask the routers again",
                        mark.slice, mark.peer_pair_id
                    )),
                    epoch,
                ));
            }
        }
        Ok(())
    }
}

/// Read-only [`cellbank_raft::Kv`] over one RocksDB snapshot.
pub(crate) struct SnapshotKv<'a, 'b>(pub &'a rocksdb::SnapshotWithThreadMode<'b, DB>);

impl cellbank_raft::Kv for SnapshotKv<'_, '_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).unwrap_or_else(|e| panic!("storage failure (read): {e}"))
    }
    fn put(&mut self, _key: &[u8], _value: &[u8]) {
        unreachable!("a read never writes")
    }
    fn delete(&mut self, _key: &[u8]) {
        unreachable!("a read never writes")
    }
    fn clear_range(&mut self, _start: &[u8], _end: &[u8]) {
        unreachable!("a read never writes")
    }
}
