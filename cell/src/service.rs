//! The gRPC services of one replica: the public `cellbank.v1.Ledger` API, the
//! internal `RaftTransport` (peer messages and snapshots) and `ReplicaAdmin`
//! (status, digest, membership).
//!
//! Writes are validated before they are proposed (a malformed request is
//! INVALID_ARGUMENT naming the field and never reaches the log); the state
//! machine validates again on apply. Reads go through ReadIndex on the
//! leader. Anything that is not the leader answers UNAVAILABLE with the
//! leader's address in the `cellbank-leader-addr` metadata.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::raft_transport_server::RaftTransport;
use cellbank_proto::cell::replica_admin_server::ReplicaAdmin;
use cellbank_proto::cell::standby_server::Standby as StandbyApi;
use cellbank_proto::cell::{
    command, ship_batch, AuditRequest, AuditResponse, ChangeMembershipRequest, ChangeMembershipResponse, Command,
    ConfigureCommand, ConfigureRequest, ConfigureResponse, DebitsRequest, DebitsResponse, DigestRequest,
    DigestResponse, InboxCredit, InboxRequest, InboxResponse, MoveCommand, OpenAccountCommand, PairRole, PairState,
    PeerAddress, PeerInfo, RaftBatch, ReplicaStatus, ReplicationMode, SendEnvelopeCommand, SettlementFigure,
    SettlementRequest, SettlementResponse, ShipAck, ShipBatch, ShipHello, SnapshotChunk, StatusRequest,
    TransferLeaderRequest, TransferLeaderResponse, TransportAck,
};
use cellbank_proto::v1::ledger_server::Ledger as LedgerApi;
use cellbank_proto::v1::*;
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Message};
use rocksdb::DB;
use tonic::{Request, Response, Status, Streaming};

use crate::ledger::{self, pair, validate, AccountId, Ledger, PairView};
use crate::metrics::Metrics;
use crate::raft::driver::{DriverHandle, Input, NodeError};
use crate::raft::node::{role_str, ProposeError};
use crate::raft::storage::{read_u64, APPLIED_INDEX_KEY, STATE_PREFIX};
use crate::raft::transport::{GrpcTransport, SNAPSHOT_BYTES_MAX};
use crate::raft::StateMachine;
use crate::replication::{epoch_status, ship_ack, Replication};

/// How long a request waits for its command to apply when the client set no deadline.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest `ListTransfers` page.
pub const PAGE_SIZE_MAX: u32 = 1000;
pub const PAGE_SIZE_DEFAULT: u32 = 100;

/// What every service of a replica shares.
#[derive(Clone)]
pub struct ReplicaContext {
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
}

impl ReplicaContext {
    fn leader_addr(&self, leader_id: u64) -> Option<String> {
        if leader_id == 0 {
            return None;
        }
        self.node.shared.peers.read().expect("peers lock").get(&leader_id).cloned()
    }

    fn unavailable(&self, message: String, leader_id: u64) -> Status {
        cellbank_client::errors::not_leader(message, self.leader_addr(leader_id).as_deref())
    }

    fn node_error(&self, error: NodeError) -> Status {
        let leader_id = match &error {
            NodeError::Propose(ProposeError::NotLeader { leader_id }) => *leader_id,
            NodeError::Propose(ProposeError::Superseded { leader_id }) => *leader_id,
            _ => self.node.shared.leader_id.load(Ordering::Relaxed),
        };
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
        Err(epoch_status(Status::unavailable(message), epoch))
    }

    pub(crate) async fn propose(
        &self,
        timeout: Duration,
        commands: Vec<Command>,
    ) -> Result<Vec<TransferResult>, Status> {
        let started = tokio::time::Instant::now();
        let results = self.within(timeout, self.node.propose(commands)).await?;
        if let Some(refused) = results.iter().find(|r| r.code == ResultCode::CellNotWritable as i32) {
            let epoch = self.pair.borrow().epoch;
            return Err(epoch_status(Status::unavailable(format!("nothing applied: {}", refused.detail)), epoch));
        }
        // The client hears of these results only once they may be
        // acknowledged: the entry that carried them is judged by the rule
        // of `replication.rs`. (A retry's `applied_index` is the index that
        // first recorded it, maybe in the log of the cell this one was the
        // standby of: not an index of this log.)
        let revealed = results.iter().map(|r| if r.entry_index > 0 { r.entry_index } else { r.applied_index }).max();
        let revealed = revealed.unwrap_or(0);
        let remaining = timeout.saturating_sub(started.elapsed());
        self.replication.wait_for(&self.pair, revealed, remaining).await?;
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
            self.metrics.results_total.with_label_values(&[code.as_str_name()]).inc_by(count);
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
    crate::faults::wall_ms()
}

pub(crate) fn timeout_of<T>(request: &Request<T>) -> Duration {
    cellbank_client::deadline::of_request(request).unwrap_or(REQUEST_TIMEOUT_DEFAULT).min(REQUEST_TIMEOUT_DEFAULT * 6)
}

/// A page size asked for: 0 means the default.
fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(PAGE_SIZE_DEFAULT),
        n if n > PAGE_SIZE_MAX => Err(Status::invalid_argument(format!("page_size: {n} exceeds {PAGE_SIZE_MAX}"))),
        n => Ok(n),
    }
}

pub(crate) fn invalid(error: validate::Invalid) -> Status {
    cellbank_client::errors::invalid_argument(error.field, &error.detail)
}

fn move_command(
    kind: TransferKind,
    transfer_id: Vec<u8>,
    from: u64,
    to: u64,
    currency: String,
    amount: u64,
) -> MoveCommand {
    MoveCommand {
        transfer_id,
        kind: kind as i32,
        from_user_id: from,
        to_user_id: to,
        currency,
        amount,
        ..Default::default()
    }
}

fn wrap(movement: MoveCommand) -> Command {
    Command { kind: Some(command::Kind::Move(movement)) }
}

pub struct LedgerService {
    pub context: ReplicaContext,
}

impl LedgerService {
    async fn single_move(
        &self,
        timeout: Duration,
        movement: MoveCommand,
    ) -> Result<Response<TransferResponse>, Status> {
        validate::move_command(&movement).map_err(invalid)?;
        let mut results = self.context.propose(timeout, vec![wrap(movement)]).await?;
        let result = results.pop().expect("one result per command");
        Ok(Response::new(TransferResponse { result: Some(result) }))
    }
}

#[tonic::async_trait]
impl LedgerApi for LedgerService {
    async fn open_account(
        &self,
        request: Request<OpenAccountRequest>,
    ) -> Result<Response<OpenAccountResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let request = request.into_inner();
        validate::open_account(request.user_id, &request.currency).map_err(invalid)?;
        let command = Command {
            kind: Some(command::Kind::OpenAccount(OpenAccountCommand {
                user_id: request.user_id,
                currency: request.currency,
            })),
        };
        let mut results = self.context.propose(timeout, vec![command]).await?;
        let result = results.pop().expect("one result per command");
        Ok(Response::new(OpenAccountResponse { code: result.code, detail: result.detail }))
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<TransferResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        self.single_move(
            timeout,
            move_command(TransferKind::Deposit, r.transfer_id, 0, r.user_id, r.currency, r.amount),
        )
        .await
    }

    async fn withdraw(&self, request: Request<WithdrawRequest>) -> Result<Response<TransferResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        self.single_move(
            timeout,
            move_command(TransferKind::Withdraw, r.transfer_id, r.user_id, 0, r.currency, r.amount),
        )
        .await
    }

    async fn transfer(&self, request: Request<TransferRequest>) -> Result<Response<TransferResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let movement =
            move_command(TransferKind::Transfer, r.transfer_id, r.from_user_id, r.to_user_id, r.currency, r.amount);
        self.single_move(timeout, movement).await
    }

    async fn submit_transfers(
        &self,
        request: Request<SubmitTransfersRequest>,
    ) -> Result<Response<SubmitTransfersResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let items = request.into_inner().transfers;
        if items.is_empty() {
            return Err(Status::invalid_argument("transfers: must hold at least one transfer"));
        }
        if items.len() > SUBMIT_TRANSFERS_ITEMS_MAX {
            return Err(Status::invalid_argument(format!(
                "transfers: {} items, at most {SUBMIT_TRANSFERS_ITEMS_MAX} per call",
                items.len()
            )));
        }
        let mut results: Vec<Option<TransferResult>> = vec![None; items.len()];
        let mut commands = Vec::with_capacity(items.len());
        let mut positions = Vec::with_capacity(items.len());
        for (position, r) in items.into_iter().enumerate() {
            let movement =
                move_command(TransferKind::Transfer, r.transfer_id, r.from_user_id, r.to_user_id, r.currency, r.amount);
            match validate::move_command(&movement) {
                Ok(_) => {
                    commands.push(wrap(movement));
                    positions.push(position);
                }
                Err(error) => {
                    results[position] = Some(TransferResult {
                        code: ResultCode::InvalidItem as i32,
                        field: error.field.into(),
                        detail: error.detail,
                        ..Default::default()
                    });
                }
            }
        }
        if !commands.is_empty() {
            let applied = self.context.propose(timeout, commands).await?;
            assert_eq!(applied.len(), positions.len(), "one result per proposed command");
            for (position, result) in positions.into_iter().zip(applied) {
                results[position] = Some(result);
            }
        }
        let results = results.into_iter().map(|r| r.expect("every item has a result")).collect();
        Ok(Response::new(SubmitTransfersResponse { results }))
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let currency = validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let (view, read_index) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        let account = ledger::get_user_account(&kv, r.user_id, currency)
            .ok_or_else(|| Status::not_found(format!("no account for user {} in {}", r.user_id, r.currency)))?;
        Ok(Response::new(GetAccountResponse {
            user_id: r.user_id,
            currency: r.currency,
            balance: u64::try_from(account.balance).expect("user balances are within u64"),
            version: account.version,
            read_index,
        }))
    }

    async fn get_transfer(
        &self,
        request: Request<GetTransferRequest>,
    ) -> Result<Response<GetTransferResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        validate::transfer_id(&r.transfer_id).map_err(invalid)?;
        let (view, _) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        let record = ledger::read_transfer(&kv, &r.transfer_id)
            .ok_or_else(|| Status::not_found("no transfer with this transfer_id"))?;
        Ok(Response::new(GetTransferResponse { transfer: Some(record) }))
    }

    async fn list_transfers(
        &self,
        request: Request<ListTransfersRequest>,
    ) -> Result<Response<ListTransfersResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let currency = validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let page_size = page_size(r.page_size)?;
        let start = match r.page_token.len() {
            0 => 0,
            8 => u64::from_be_bytes(r.page_token[..].try_into().expect("8 bytes")),
            _ => return Err(Status::invalid_argument("page_token: not a token this server issued")),
        };
        let (view, _) = self.context.read_view(timeout).await?;
        let id = AccountId::user(r.user_id, currency);
        let account_exists = view.get(id.key()).map_err(|e| Status::internal(e.to_string()))?.is_some();
        if !account_exists {
            return Err(Status::not_found(format!("no account for user {} in {}", r.user_id, r.currency)));
        }
        let prefix = id.history_prefix();
        let mut iter = view.raw_iterator();
        iter.seek(id.history_key(start));
        let mut transfers = Vec::new();
        let mut next_page_token = Vec::new();
        while iter.valid() {
            let key = iter.key().expect("key");
            if !key.starts_with(&prefix) {
                break;
            }
            let seq = u64::from_be_bytes(key[prefix.len()..].try_into().expect("history key ends in u64"));
            if transfers.len() as u32 == page_size {
                next_page_token = seq.to_be_bytes().to_vec();
                break;
            }
            let value = iter.value().expect("value");
            let (_, record_key) =
                ledger::parse_history(value).ok_or_else(|| Status::internal("a history entry is malformed"))?;
            let record = view
                .get(record_key)
                .map_err(|e| Status::internal(e.to_string()))?
                .ok_or_else(|| Status::internal("history names a record that does not exist"))?;
            transfers.push(TransferRecord::decode(record.as_slice()).map_err(|e| Status::internal(e.to_string()))?);
            iter.next();
        }
        Ok(Response::new(ListTransfersResponse { transfers, next_page_token }))
    }

    async fn send_envelope(
        &self,
        request: Request<SendEnvelopeRequest>,
    ) -> Result<Response<SendEnvelopeResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let now = now_ms();
        let command = SendEnvelopeCommand {
            transfer_id: r.transfer_id,
            sender_user_id: r.sender_user_id,
            currency: r.currency,
            total: r.total,
            shares: r.shares,
            split: r.split,
            expires_at_ms: match r.expires_at_ms {
                0 => now + validate::ENVELOPE_EXPIRY_DEFAULT_MS,
                at => at,
            },
        };
        validate::send_envelope_fields(&command).map_err(invalid)?;
        // A retry of a recorded send is answered by the log whatever the
        // clock says now; only a new send must expire in the future.
        let recorded =
            ledger::read_transfer(&crate::raft::ReadOnlyDb(&self.context.db), &command.transfer_id).is_some();
        if !recorded {
            validate::expiry(command.expires_at_ms, now).map_err(invalid)?;
        }
        let envelope_id = ledger::envelope::envelope_id(command.sender_user_id, &command.transfer_id);
        let expires_at_ms = command.expires_at_ms;
        let mut results =
            self.context.propose(timeout, vec![Command { kind: Some(command::Kind::SendEnvelope(command)) }]).await?;
        let result = results.pop().expect("one result per command");
        // A retry answers with the envelope as first sent.
        let expires_at_ms = if result.duplicate {
            ledger::envelope::read_envelope(&crate::raft::ReadOnlyDb(&self.context.db), &envelope_id)
                .map(|e| e.expires_at_ms)
                .unwrap_or(expires_at_ms)
        } else {
            expires_at_ms
        };
        Ok(Response::new(SendEnvelopeResponse { result: Some(result), envelope_id, expires_at_ms }))
    }

    async fn grab_envelope(
        &self,
        request: Request<GrabEnvelopeRequest>,
    ) -> Result<Response<GrabEnvelopeResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        let grab = crate::clearing::local_grab(r.envelope_id, r.user_id);
        validate::grab(&grab).map_err(invalid)?;
        let envelope_id = grab.envelope_id.clone();
        let mut results =
            self.context.propose(timeout, vec![Command { kind: Some(command::Kind::Grab(grab)) }]).await?;
        let result = results.pop().expect("one result per command");
        let currency = crate::clearing::envelope_currency(&self.context, &envelope_id);
        Ok(Response::new(crate::clearing::grab_response(result, currency)))
    }

    async fn get_envelope(
        &self,
        request: Request<GetEnvelopeRequest>,
    ) -> Result<Response<GetEnvelopeResponse>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let r = request.into_inner();
        validate::envelope_id(&r.envelope_id).map_err(invalid)?;
        let page_size = page_size(r.page_size)?;
        let start = match r.page_token.len() {
            0 => 1,
            4 => u32::from_be_bytes(r.page_token[..].try_into().expect("4 bytes")),
            _ => return Err(Status::invalid_argument("page_token: not a token this server issued")),
        };
        let (view, _) = self.context.read_view(timeout).await?;
        let kv = SnapshotKv(&view);
        let envelope = ledger::envelope::read_envelope(&kv, &r.envelope_id)
            .ok_or_else(|| Status::not_found(format!("no envelope {}", r.envelope_id)))?;
        let prefix = ledger::keys::grabs_prefix(&r.envelope_id);
        let mut iter = view.raw_iterator();
        iter.seek(ledger::keys::grab(&r.envelope_id, start));
        let mut grabs = Vec::new();
        let mut next_page_token = Vec::new();
        while iter.valid() {
            let key = iter.key().expect("key");
            if !key.starts_with(&prefix) {
                break;
            }
            let share_index = u32::from_be_bytes(key[prefix.len()..].try_into().expect("grab key ends in u32"));
            if grabs.len() as u32 == page_size {
                next_page_token = share_index.to_be_bytes().to_vec();
                break;
            }
            let record =
                TransferRecord::decode(iter.value().expect("value")).map_err(|e| Status::internal(e.to_string()))?;
            grabs.push(EnvelopeGrab {
                user_id: record.to_user_id,
                amount: record.amount,
                share_index,
                settlement: record.settlement,
                timestamp_ms: record.timestamp_ms,
            });
            iter.next();
        }
        Ok(Response::new(GetEnvelopeResponse { envelope: Some(envelope), grabs, next_page_token }))
    }
}

/// Peer messages and snapshots for one Raft group (a cell, or the routers'
/// table group).
/// Read-only [`crate::raft::Kv`] over one RocksDB snapshot.
pub(crate) struct SnapshotKv<'a, 'b>(pub &'a rocksdb::SnapshotWithThreadMode<'b, DB>);

impl crate::raft::Kv for SnapshotKv<'_, '_> {
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

/// Peer messages and snapshots for one Raft group (a cell, or the routers'
pub struct TransportService<SM: StateMachine> {
    pub group_id: u64,
    pub replica_id: u64,
    pub node: DriverHandle<SM>,
    pub transport: Arc<GrpcTransport>,
    pub metrics: Arc<Metrics>,
    /// Bounds concurrent snapshot receives.
    pub snapshot_receives: Arc<tokio::sync::Semaphore>,
}

impl<SM: StateMachine> TransportService<SM> {
    /// Decodes one message; `None` for a message addressed to another
    /// replica (a peer's stale address book), which is skipped, not fatal.
    fn decode(&self, bytes: &[u8]) -> Result<Option<Message>, Status> {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("messages: not a raft message ({e})")))?;
        if message.to != self.replica_id {
            tracing::debug!(to = message.to, from = message.from, "skipping a raft message for another replica");
            self.metrics.raft_messages_dropped_total.inc();
            return Ok(None);
        }
        Ok(Some(message))
    }

    fn check_cell(&self, cell_id: u64) -> Result<(), Status> {
        if cell_id != self.group_id {
            return Err(Status::failed_precondition(format!(
                "cell_id: this replica belongs to group {}, not {cell_id}",
                self.group_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<SM: StateMachine> RaftTransport for TransportService<SM> {
    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<TransportAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            self.check_cell(batch.cell_id)?;
            // A drill's delay holds the whole batch once.
            if let Some(crate::faults::Hit::Delay(delay)) = crate::faults::message("raft.recv", batch.from_replica_id) {
                tokio::time::sleep(delay).await;
            }
            for bytes in &batch.messages {
                let Some(message) = self.decode(bytes)? else { continue };
                if crate::faults::message("raft.recv", message.from) == Some(crate::faults::Hit::Drop) {
                    continue;
                }
                if message.from == batch.from_replica_id {
                    self.transport.learn(batch.from_replica_id, &batch.from_addr);
                }
                // A full queue drops the message; raft retransmits.
                let _ = self.node.send(Input::Raft(Box::new(message)));
            }
        }
        Ok(Response::new(TransportAck {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<TransportAck>, Status> {
        // One snapshot at a time: each may hold gigabytes.
        let _permit = self
            .snapshot_receives
            .try_acquire()
            .map_err(|_| Status::resource_exhausted("another snapshot is being received"))?;
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("snapshot: empty stream"))?;
        self.check_cell(first.cell_id)?;
        let mut message = self
            .decode(&first.message)?
            .ok_or_else(|| Status::invalid_argument("message: snapshot for another replica"))?;
        if message.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("message: not a MsgSnapshot"));
        }
        if first.total_len > SNAPSHOT_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "total_len: {} exceeds {SNAPSHOT_BYTES_MAX}",
                first.total_len
            )));
        }
        let mut body = Vec::new();
        body.extend_from_slice(&first.data);
        while let Some(chunk) = stream.message().await? {
            if body.len() + chunk.data.len() > first.total_len as usize {
                return Err(Status::invalid_argument("data: snapshot longer than total_len"));
            }
            body.extend_from_slice(&chunk.data);
        }
        if body.len() as u64 != first.total_len {
            return Err(Status::invalid_argument(format!(
                "data: got {} of {} snapshot bytes",
                body.len(),
                first.total_len
            )));
        }
        // Decoded here, before raft accepts it: a body that cannot be
        // installed is refused now instead of crashing the replica later.
        crate::raft::storage::decode_snapshot_body(&body)
            .map_err(|e| Status::invalid_argument(format!("data: {e}")))?;
        message.mut_snapshot().data = body.into();
        self.node.send(Input::Raft(Box::new(message))).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(TransportAck {}))
    }
}

pub struct AdminService {
    pub context: ReplicaContext,
}

fn peer_infos(peers: &std::collections::BTreeMap<u64, String>, voters: &[u64]) -> Vec<PeerInfo> {
    peers
        .iter()
        .map(|(id, addr)| PeerInfo { replica_id: *id, addr: addr.clone(), voter: voters.contains(id) })
        .collect()
}

/// Keys and values of the state region, in key order.
type StatePairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The state region of one snapshot, with the applied index it reflects.
fn state_of(db: &DB) -> (u64, StatePairs) {
    let view = db.snapshot();
    let applied_index = read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0);
    let mut pairs = Vec::new();
    let mut iter = view.raw_iterator();
    iter.seek([STATE_PREFIX]);
    while iter.valid() {
        let key = iter.key().expect("key");
        if key[0] != STATE_PREFIX {
            break;
        }
        pairs.push((key.to_vec(), iter.value().expect("value").to_vec()));
        iter.next();
    }
    (applied_index, pairs)
}

/// Reconciliation figures of this replica (see `ledger::audit`).
pub fn audit_of(db: &DB, outbox_limit: usize) -> AuditResponse {
    let (applied_index, pairs) = state_of(db);
    let mut response = ledger::audit::audit(|| pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())), outbox_limit);
    response.applied_index = applied_index;
    let own = pair::read(&crate::raft::ReadOnlyDb(db), pair::Slot::Own);
    if pair::role(&own) == PairRole::Standby {
        response.source_index = own.source_index;
    }
    response.pair = Some(own);
    response
}

/// What this cell credited from one source pair (seq <= cutoff), and which
/// of the asked seqs it credited.
pub fn inbox_of(db: &DB, request: &InboxRequest) -> InboxResponse {
    let view = db.snapshot();
    let applied_index = read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0);
    let kv = SnapshotKv(&view);
    let credited_ok = |record: &TransferRecord| record.result == ResultCode::Ok as i32;
    let mut received: std::collections::BTreeMap<String, i128> = Default::default();
    // Totals first, then subtract what came after the cutoff.
    let mut iter = view.raw_iterator();
    iter.seek(ledger::keys::POSITION_PREFIX);
    let mut peer_prefix = ledger::keys::POSITION_PREFIX.to_vec();
    peer_prefix.extend_from_slice(&request.source_pair_id.to_be_bytes());
    iter.seek(&peer_prefix);
    while iter.valid() {
        let key = iter.key().expect("key");
        if !key.starts_with(&peer_prefix) {
            break;
        }
        let currency = String::from_utf8_lossy(&key[peer_prefix.len()..]).to_string();
        let position = ledger::clearing::Position::decode(iter.value().expect("value"));
        *received.entry(currency).or_default() += position.received as i128;
        iter.next();
    }
    let inbox_prefix = ledger::keys::inbox_prefix(request.source_pair_id);
    iter.seek(ledger::keys::inbox(request.source_pair_id, request.seq_cutoff.saturating_add(1)));
    while iter.valid() && request.seq_cutoff < u64::MAX {
        let key = iter.key().expect("key");
        if !key.starts_with(&inbox_prefix) {
            break;
        }
        let record = TransferRecord::decode(iter.value().expect("value")).expect("inbox records decode");
        if credited_ok(&record) {
            *received.entry(record.currency.clone()).or_default() -= i128::from(record.amount);
        }
        iter.next();
    }
    let credited = request
        .seqs
        .iter()
        .copied()
        .filter(|seq| {
            ledger::read_record(&kv, &ledger::keys::inbox(request.source_pair_id, *seq))
                .is_some_and(|r| credited_ok(&r))
        })
        .collect();
    let mut response = InboxResponse {
        applied_index,
        received: received.into_iter().map(|(c, v)| (c, v.to_string())).collect(),
        credited,
        ..Default::default()
    };
    if request.list_credits {
        iter.seek(&inbox_prefix);
        while iter.valid() {
            let key = iter.key().expect("key");
            if !key.starts_with(&inbox_prefix) {
                break;
            }
            let record = TransferRecord::decode(iter.value().expect("value")).expect("inbox records decode");
            if credited_ok(&record) {
                if response.credits.len() >= INBOX_CREDITS_LISTED_MAX {
                    response.credits_truncated = true;
                    break;
                }
                let seq = u64::from_be_bytes(key[inbox_prefix.len()..].try_into().expect("inbox keys end in a seq"));
                let (created_epoch, created_index) =
                    ledger::clearing::read_inbox_origin(&kv, request.source_pair_id, seq).unwrap_or_default();
                response.credits.push(InboxCredit {
                    seq,
                    created_epoch,
                    created_index,
                    kind: record.kind,
                    transfer_id: record.transfer_id,
                    to_user_id: record.to_user_id,
                    currency: record.currency,
                    amount: record.amount,
                });
            }
            iter.next();
        }
    }
    response
}

/// Credits one `Inbox` call lists at most.
pub const INBOX_CREDITS_LISTED_MAX: usize = 100_000;

/// Credits received per source pair and currency in `[from_ms, to_ms)`.
pub fn settlement_of(db: &DB, request: &SettlementRequest) -> SettlementResponse {
    let from_minute = request.from_ms / 60_000;
    let to_minute = if request.to_ms == 0 { u64::MAX } else { request.to_ms.div_ceil(60_000) };
    let mut totals: std::collections::BTreeMap<(u64, String), (u128, u128)> = Default::default();
    let mut iter = db.raw_iterator();
    iter.seek(ledger::keys::BUCKET_PREFIX);
    while iter.valid() {
        let key = iter.key().expect("key");
        if !key.starts_with(ledger::keys::BUCKET_PREFIX) || key.len() != 21 {
            break;
        }
        let peer = u64::from_be_bytes(key[2..10].try_into().expect("8 bytes"));
        let currency = String::from_utf8_lossy(&key[10..13]).to_string();
        let minute = u64::from_be_bytes(key[13..21].try_into().expect("8 bytes"));
        if minute >= from_minute && minute < to_minute {
            let [amount, count] = ledger::keys::u128s::<2>(iter.value().expect("value")).expect("bucket is 32 bytes");
            let total = totals.entry((peer, currency)).or_default();
            total.0 += amount;
            total.1 += count;
        }
        iter.next();
    }
    SettlementResponse {
        received: totals
            .into_iter()
            .map(|((peer, currency), (amount, count))| SettlementFigure {
                from_pair_id: peer,
                currency,
                amount: amount.to_string(),
                credits: count as u64,
            })
            .collect(),
    }
}

/// Digest of the state region at the replica's applied index, from one
/// consistent view of the database.
pub fn digest_of(db: &DB) -> DigestResponse {
    let (applied_index, pairs) = state_of(db);
    let digest = ledger::digest(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    DigestResponse {
        applied_index,
        digest: digest.digest_hex,
        accounts: digest.accounts,
        transfers: digest.transfers,
        balance_sum_by_currency: digest.balance_sum_by_currency.into_iter().map(|(c, s)| (c, s.to_string())).collect(),
    }
}

#[tonic::async_trait]
impl ReplicaAdmin for AdminService {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<ReplicaStatus>, Status> {
        let status = self.context.node.status().await.map_err(|e| self.context.node_error(e))?;
        let pair_state = self.context.pair.borrow().clone();
        let ship = self.context.replication.state.borrow().clone();
        let is_leader = status.role == raft::StateRole::Leader;
        let (_, lag_ms) = self.context.replication.lag(status.applied_index);
        Ok(Response::new(ReplicaStatus {
            cell_id: self.context.cell_id,
            replica_id: status.replica_id,
            role: role_str(status.role).into(),
            raft_role: crate::raft::node::raft_role(status.role) as i32,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            leader_id: status.leader_id,
            leader_addr: status.peers.get(&status.leader_id).cloned().unwrap_or_default(),
            first_log_index: status.first_log_index,
            last_log_index: status.last_log_index,
            peers: peer_infos(&status.peers, &status.voters),
            snapshots_installed: status.snapshots_installed,
            addr: self.context.addr.clone(),
            pair: Some(pair_state.clone()),
            standby_acked_index: if ship.epoch == pair_state.epoch { ship.acked_index } else { 0 },
            standby_lag_ms: if is_leader { lag_ms } else { 0 },
            deposed: self.context.replication.deposed(pair_state.epoch) || pair::deposed(&pair_state),
            authority: is_leader
                && self
                    .context
                    .replication
                    .has_authority(self.context.node.shared.leader_term.load(Ordering::Relaxed), &pair_state),
            outbox_pending: if is_leader { self.context.metrics.outbox_pending.get().max(0) as u64 } else { 0 },
            outbox_oldest_age_ms: if is_leader {
                self.context.metrics.outbox_oldest_age_ms.get().max(0) as u64
            } else {
                0
            },
            outbox_delivery_failures: self.context.metrics.credit_delivery_failures_total.get(),
        }))
    }

    async fn configure(&self, request: Request<ConfigureRequest>) -> Result<Response<ConfigureResponse>, Status> {
        let timeout = timeout_of(&request);
        let r = request.into_inner();
        if r.cell_id != self.context.cell_id {
            return Err(Status::invalid_argument(format!(
                "cell_id: this is cell {}, not {}",
                self.context.cell_id, r.cell_id
            )));
        }
        let state = r.state.ok_or_else(|| Status::invalid_argument("state: must be set"))?;
        if state.epoch == 0 {
            return Err(Status::invalid_argument("state.epoch: must be at least 1"));
        }
        if PairRole::try_from(state.role).is_err() || ReplicationMode::try_from(state.mode).is_err() {
            return Err(Status::invalid_argument("state: unknown role or mode"));
        }
        let command = Command {
            kind: Some(command::Kind::Configure(ConfigureCommand {
                state: Some(state),
                source_state: r.source_state,
                force_rebuild: r.force_rebuild,
            })),
        };
        let term = self.context.node.shared.leader_term.load(Ordering::Relaxed);
        let mut results = self.context.within(timeout, self.context.node.propose(vec![command])).await?;
        let result = results.pop().expect("one result per command");
        if result.code != ResultCode::Ok as i32 {
            let epoch = self.context.pair.borrow().epoch;
            return Err(epoch_status(Status::failed_precondition(result.detail), epoch));
        }
        // The coordinator's stamp, applied through this leader in this term:
        // the routing table says what this cell is, so it may serve as that.
        if term != 0 && self.context.node.shared.leader_term.load(Ordering::Relaxed) == term {
            self.context.replication.earn_authority(term);
        }
        Ok(Response::new(ConfigureResponse {
            applied_index: result.applied_index,
            state: Some(self.context.pair.borrow().clone()),
        }))
    }

    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let limit = match request.into_inner().outbox_limit {
            0 => 1000,
            n => n.min(1_000_000) as usize,
        };
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || audit_of(&db, limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn debits(&self, request: Request<DebitsRequest>) -> Result<Response<DebitsResponse>, Status> {
        let timeout = timeout_of(&request);
        let credits = request.into_inner().credits;
        if credits.len() > INBOX_CREDITS_LISTED_MAX {
            return Err(Status::invalid_argument(format!(
                "credits: {} asked, at most {INBOX_CREDITS_LISTED_MAX} per call",
                credits.len()
            )));
        }
        // Everything this cell applied before the call is visible.
        self.context.within(timeout, self.context.node.read_index()).await?;
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || {
            let view = db.snapshot();
            let kv = SnapshotKv(&view);
            DebitsResponse {
                held: credits.iter().map(|c| ledger::clearing::holds_debit(&kv, c)).collect(),
                applied_index: read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn inbox(&self, request: Request<InboxRequest>) -> Result<Response<InboxResponse>, Status> {
        let timeout = timeout_of(&request);
        // Everything this cell answered before the call is applied here.
        self.context.within(timeout, self.context.node.read_index()).await?;
        let r = request.into_inner();
        if r.source_pair_id == 0 {
            return Err(Status::invalid_argument("source_pair_id: must be set"));
        }
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || inbox_of(&db, &r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn settlement(&self, request: Request<SettlementRequest>) -> Result<Response<SettlementResponse>, Status> {
        let r = request.into_inner();
        if r.to_ms != 0 && r.to_ms <= r.from_ms {
            return Err(Status::invalid_argument("to_ms: must be after from_ms"));
        }
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || settlement_of(&db, &r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn digest(&self, _request: Request<DigestRequest>) -> Result<Response<DigestResponse>, Status> {
        let db = self.context.db.clone();
        let response =
            tokio::task::spawn_blocking(move || digest_of(&db)).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        let timeout = timeout_of(&request);
        let r = request.into_inner();
        if r.replica_id == 0 {
            return Err(Status::invalid_argument("replica_id: must be set"));
        }
        let mut change = ConfChange::default();
        change.node_id = r.replica_id;
        match Action::try_from(r.action).unwrap_or(Action::Unspecified) {
            Action::AddVoter => {
                if r.addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(Status::invalid_argument(format!("addr: {:?} is not host:port", r.addr)));
                }
                change.set_change_type(ConfChangeType::AddNode);
                change.context = PeerAddress { replica_id: r.replica_id, addr: r.addr }.encode_to_vec().into();
            }
            Action::Remove => change.set_change_type(ConfChangeType::RemoveNode),
            Action::Unspecified => return Err(Status::invalid_argument("action: must be ADD_VOTER or REMOVE")),
        }
        let (conf_state, peers) = self.context.within(timeout, self.context.node.conf_change(change)).await?;
        let applied_index = self.context.node.shared.applied_index.load(Ordering::Relaxed);
        Ok(Response::new(ChangeMembershipResponse { applied_index, peers: peer_infos(&peers, &conf_state.voters) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = request.into_inner();
        self.context.node.send(Input::TransferLeader(r.replica_id)).map_err(|e| self.context.node_error(e))?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}

/// The standby side of replication: this cell's leader takes the active's
/// entries and proposes them into its own log.
pub struct StandbyService {
    pub context: ReplicaContext,
}

/// Shipped batches proposed and not yet acknowledged, per stream.
const STANDBY_IN_FLIGHT_MAX: usize = 32;

impl StandbyService {
    /// Checks a hello against this cell's pair state
    /// ([`crate::replication::check_hello`]).
    fn check_hello(&self, hello: &ShipHello) -> Result<PairState, Status> {
        let state = self.context.pair.borrow().clone();
        match crate::replication::check_hello(self.context.cell_id, &state, hello.source_cell_id, hello.epoch) {
            Ok(()) => Ok(state),
            Err(refusal) => Err(refusal_status(refusal)),
        }
    }
}

/// The status a refused hello (or keepalive) ends the stream with.
fn refusal_status(refusal: crate::replication::HelloRefusal) -> Status {
    match refusal {
        crate::replication::HelloRefusal::Superseded { epoch, detail } => {
            epoch_status(Status::failed_precondition(detail), epoch)
        }
        crate::replication::HelloRefusal::NotYet(detail) => Status::unavailable(detail),
    }
}

type AckStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<ShipAck, Status>> + Send>>;

/// One shipped message's outcome, in stream order: a proposal's outputs, or
/// (empty) a keepalive's.
type PendingAck = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<Vec<TransferResult>, ProposeError>, tokio::sync::oneshot::error::RecvError>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl StandbyApi for StandbyService {
    type ReplicateStream = AckStream;

    async fn replicate(&self, request: Request<Streaming<ShipBatch>>) -> Result<Response<AckStream>, Status> {
        let context = self.context.clone();
        if !context.node.shared.is_leader.load(Ordering::Relaxed) {
            let leader_id = context.node.shared.leader_id.load(Ordering::Relaxed);
            return Err(context.unavailable(format!("replica {} is not the leader", context.replica_id), leader_id));
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ShipBatch { kind: Some(ship_batch::Kind::Hello(hello)) }) => hello,
            _ => return Err(Status::invalid_argument("the first message must be a hello")),
        };
        self.check_hello(&hello)?;
        // Everything committed before the hello is applied before the
        // answer, so the source index it names is the one the log holds.
        context.within(REQUEST_TIMEOUT_DEFAULT, context.node.read_index()).await?;
        let state = self.check_hello(&hello)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ShipAck, Status>>(STANDBY_IN_FLIGHT_MAX + 1);
        tx.try_send(Ok(ship_ack(&state))).expect("fresh channel has room");
        tokio::spawn(async move {
            let mut pending: futures::stream::FuturesOrdered<PendingAck> = futures::stream::FuturesOrdered::new();
            let mut inbound_open = true;
            loop {
                tokio::select! {
                    message = inbound.message(), if inbound_open && pending.len() < STANDBY_IN_FLIGHT_MAX => {
                        let command = match message {
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Entries(entries)) })) => {
                                command::Kind::SourceEntries(entries)
                            }
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Snapshot(chunk)) })) => {
                                command::Kind::SourceSnapshot(chunk)
                            }
                            Ok(Some(ShipBatch { kind: Some(ship_batch::Kind::Hello(keepalive)) })) => {
                                // A keepalive: answered in order, if this
                                // replica still leads and this cell still is
                                // the source's standby
                                // (`replication::judge_keepalive`).
                                let is_leader = context.node.shared.is_leader.load(Ordering::Relaxed);
                                let state = context.pair.borrow().clone();
                                match crate::replication::judge_keepalive(context.cell_id, is_leader, &state, &keepalive) {
                                    crate::replication::Keepalive::Answer => {
                                        pending.push_back(Box::pin(async { Ok(Ok(Vec::new())) }))
                                    }
                                    crate::replication::Keepalive::NotLeader => {
                                        let leader_id = context.node.shared.leader_id.load(Ordering::Relaxed);
                                        let why = format!("replica {} is no longer the leader", context.replica_id);
                                        let _ = tx.send(Err(context.unavailable(why, leader_id))).await;
                                        return;
                                    }
                                    crate::replication::Keepalive::Refused(refusal) => {
                                        let _ = tx.send(Err(refusal_status(refusal))).await;
                                        return;
                                    }
                                }
                                continue;
                            }
                            Ok(Some(_)) => {
                                let _ = tx.send(Err(Status::invalid_argument("a message with nothing in it"))).await;
                                return;
                            }
                            Ok(None) | Err(_) => {
                                inbound_open = false;
                                continue;
                            }
                        };
                        // Queued now, in stream order, so the log holds the
                        // batches in the order they were shipped.
                        match context.node.propose_queued(vec![Command { kind: Some(command) }]) {
                            Ok(receiver) => pending.push_back(Box::pin(receiver)),
                            Err(e) => {
                                let _ = tx.send(Err(context.node_error(e))).await;
                                return;
                            }
                        }
                    }
                    done = futures::StreamExt::next(&mut pending), if !pending.is_empty() => {
                        let outcome = match done.expect("pending is not empty") {
                            // A keepalive's answer.
                            Ok(Ok(results)) if results.is_empty() => {
                                if context.node.shared.is_leader.load(Ordering::Relaxed) {
                                    Ok(ship_ack(&context.pair.borrow()))
                                } else {
                                    Err(Status::unavailable("this replica is no longer the leader"))
                                }
                            }
                            Ok(Ok(mut results)) => {
                                let result = results.pop().expect("one result per command");
                                if result.code == ResultCode::Ok as i32 {
                                    Ok(ship_ack(&context.pair.borrow()))
                                } else {
                                    let epoch = context.pair.borrow().epoch;
                                    Err(epoch_status(Status::failed_precondition(result.detail), epoch))
                                }
                            }
                            Ok(Err(e)) => Err(context.node_error(NodeError::Propose(e))),
                            Err(_) => Err(Status::unavailable("the replica is stopping")),
                        };
                        let failed = outcome.is_err();
                        if tx.send(outcome).await.is_err() || failed {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
