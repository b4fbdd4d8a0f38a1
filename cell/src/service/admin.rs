//! `ReplicaAdmin`: a replica's status, its pair configuration (the fencing
//! rule), membership changes, leadership transfer, and the read-only views
//! reconciliation needs (audit, digest, inbox, settlement, debits).

use std::sync::atomic::Ordering;

use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::replica_admin_server::ReplicaAdmin;
use cellbank_proto::cell::{
    command, AuditRequest, AuditResponse, ChangeMembershipRequest, ChangeMembershipResponse, Command, ConfigureCommand,
    ConfigureRequest, ConfigureResponse, DebitsRequest, DebitsResponse, DigestRequest, DigestResponse, InboxCredit,
    InboxRequest, InboxResponse, PairRole, PeerAddress, PeerInfo, ReplicaStatus, ReplicationMode, SettlementFigure,
    SettlementRequest, SettlementResponse, SliceFigure, SliceFiguresRequest, SliceFiguresResponse, StatusRequest,
    TransferLeaderRequest, TransferLeaderResponse,
};
use cellbank_proto::v1::*;
use prost::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType};
use rocksdb::DB;
use tonic::{Request, Response, Status};

use crate::context::{timeout_of, ReplicaContext, SnapshotKv};
use crate::ledger::{self, pair};
use cellbank_client::errors::with_epoch;
use cellbank_raft::driver::Input;
use cellbank_raft::node::role_str;
use cellbank_raft::storage::{read_u64, APPLIED_INDEX_KEY, STATE_PREFIX};

pub struct AdminService {
    pub context: ReplicaContext,
}

impl AdminService {
    /// Proposes one step of a slice's move (under the acknowledgement rule,
    /// like a client write): FAILED_PRECONDITION with the cell's words when
    /// the ledger refused it.
    async fn slice_step(
        &self,
        timeout: std::time::Duration,
        command: Command,
    ) -> Result<Response<cellbank_proto::cell::SliceStepResponse>, Status> {
        if !self.context.node.shared.is_leader.load(Ordering::Relaxed) {
            let leader_id = self.context.node.shared.leader_id.load(Ordering::Relaxed);
            return Err(self
                .context
                .unavailable(format!("replica {} is not the leader", self.context.replica_id), leader_id));
        }
        let mut results = self.context.propose(timeout, vec![command]).await?;
        let result = results.pop().expect("one result per command");
        if result.code != ResultCode::Ok as i32 {
            let epoch = self.context.pair.borrow().epoch;
            return Err(with_epoch(Status::failed_precondition(result.detail), epoch));
        }
        Ok(Response::new(cellbank_proto::cell::SliceStepResponse {
            detail: if result.duplicate { "done before".into() } else { String::new() },
            applied_index: result.applied_index,
        }))
    }
}

fn peer_infos(peers: &std::collections::BTreeMap<u64, String>, voters: &[u64]) -> Vec<PeerInfo> {
    peers
        .iter()
        .map(|(id, addr)| PeerInfo { replica_id: *id, addr: addr.clone(), voter: voters.contains(id) })
        .collect()
}

/// The state region of one snapshot, a pair at a time, in key order: an
/// audit or a digest walks the ledger without holding a copy of it.
struct StateIter<'a> {
    iter: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
}

impl Iterator for StateIter<'_> {
    type Item = (Vec<u8>, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        if !self.iter.valid() {
            self.iter.status().unwrap_or_else(|e| panic!("storage failure (scan state): {e}"));
            return None;
        }
        let key = self.iter.key()?;
        if key.first() != Some(&STATE_PREFIX) {
            return None;
        }
        let item = (key.to_vec(), self.iter.value()?.to_vec());
        self.iter.next();
        Some(item)
    }
}

fn state_of<'a>(view: &'a rocksdb::SnapshotWithThreadMode<'a, DB>) -> StateIter<'a> {
    let mut iter = view.raw_iterator();
    iter.seek([STATE_PREFIX]);
    StateIter { iter }
}

/// UNAVAILABLE while `view` shows a snapshot being installed: the state
/// region is then part old, part new, and its figures mean nothing.
fn check_not_installing(view: &rocksdb::SnapshotWithThreadMode<'_, DB>) -> Result<(), Status> {
    if cellbank_raft::storage::installing(view) {
        return Err(Status::unavailable("this replica is installing a snapshot: ask again, or ask another"));
    }
    Ok(())
}

/// Users' accounts, balances and record bytes per slice, from one view
/// (two scans: user accounts, then their histories, both in key order).
pub fn slice_figures_of(db: &DB, slice_count: u32) -> Result<SliceFiguresResponse, Status> {
    use cellbank_client::slices::{slice_of, SLICES_MAX};
    if slice_count == 0 || slice_count > SLICES_MAX {
        return Err(cellbank_client::errors::invalid_argument(
            "slice_count",
            &format!("must be 1..={SLICES_MAX}, not {slice_count}"),
        ));
    }
    let view = db.snapshot();
    check_not_installing(&view)?;
    let gone = super::moves::gone_slices(db);
    #[derive(Default)]
    struct Figure {
        accounts: u64,
        balances: std::collections::BTreeMap<String, i128>,
        bytes: u64,
    }
    let mut figures: std::collections::BTreeMap<u32, Figure> = Default::default();
    let user = ledger::AccountKind::User as u8;
    for family in [b'a', b'h'] {
        let prefix = [STATE_PREFIX, family, user];
        let mut iter = view.raw_iterator();
        iter.seek(prefix);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(&prefix) || key.len() < 11 {
                break;
            }
            let owner = u64::from_be_bytes(key[3..11].try_into().expect("8 bytes"));
            let slice = slice_of(owner, slice_count);
            if gone.contains(&slice) {
                // Left behind at zero by a move: the slice is served elsewhere.
                iter.next();
                continue;
            }
            let figure = figures.entry(slice).or_default();
            figure.bytes += (key.len() + value.len()) as u64;
            if family == b'a' {
                let id = ledger::AccountId::from_key(key)
                    .ok_or_else(|| Status::internal(format!("an account key of the wrong shape: {key:02x?}")))?;
                let account = ledger::Account::decode(value)
                    .ok_or_else(|| Status::internal(format!("a corrupt account record for {}", id.describe())))?;
                figure.accounts += 1;
                *figure.balances.entry(id.currency.as_str().to_string()).or_default() += account.balance;
            }
            iter.next();
        }
        iter.status().map_err(|e| Status::internal(format!("scan: {e}")))?;
    }
    Ok(SliceFiguresResponse {
        applied_index: read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0),
        slices: figures
            .into_iter()
            .map(|(slice, f)| SliceFigure {
                slice,
                accounts: f.accounts,
                balance_by_currency: f.balances.into_iter().map(|(c, b)| (c, b.to_string())).collect(),
                bytes: f.bytes,
            })
            .collect(),
    })
}

/// Reconciliation figures of this replica (see `ledger::audit`).
pub fn audit_of(db: &DB, outbox_limit: usize) -> Result<AuditResponse, Status> {
    let view = db.snapshot();
    check_not_installing(&view)?;
    let mut response = ledger::audit::audit(|| state_of(&view), outbox_limit);
    response.applied_index = read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0);
    let own = pair::read(&SnapshotKv(&view), pair::Slot::Own);
    if pair::role(&own) == PairRole::Standby {
        response.source_index = own.source_index;
    }
    response.pair = Some(own);
    Ok(response)
}

/// What this cell credited from one source pair (seq <= cutoff), and which
/// of the asked seqs it credited.
pub fn inbox_of(db: &DB, request: &InboxRequest) -> Result<InboxResponse, Status> {
    let view = db.snapshot();
    check_not_installing(&view)?;
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
    Ok(response)
}

/// Credits one `Inbox` call lists at most.
pub const INBOX_CREDITS_LISTED_MAX: usize = 100_000;

/// Credits received per source pair and currency in `[from_ms, to_ms)`.
pub fn settlement_of(db: &DB, request: &SettlementRequest) -> Result<SettlementResponse, Status> {
    let from_minute = request.from_ms / 60_000;
    let to_minute = if request.to_ms == 0 { u64::MAX } else { request.to_ms.div_ceil(60_000) };
    let mut totals: std::collections::BTreeMap<(u64, String), (u128, u128)> = Default::default();
    let view = db.snapshot();
    check_not_installing(&view)?;
    let mut iter = view.raw_iterator();
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
    Ok(SettlementResponse {
        received: totals
            .into_iter()
            .map(|((peer, currency), (amount, count))| SettlementFigure {
                from_pair_id: peer,
                currency,
                amount: amount.to_string(),
                credits: count as u64,
            })
            .collect(),
    })
}

/// Digest of the state region at the replica's applied index, from one
/// consistent view of the database.
pub fn digest_of(db: &DB) -> Result<DigestResponse, Status> {
    let view = db.snapshot();
    check_not_installing(&view)?;
    let digest = ledger::digest(state_of(&view));
    Ok(DigestResponse {
        applied_index: read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0),
        digest: digest.digest_hex,
        accounts: digest.accounts,
        transfers: digest.transfers,
        balance_sum_by_currency: digest.balance_sum_by_currency.into_iter().map(|(c, s)| (c, s.to_string())).collect(),
    })
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
            raft_role: cellbank_raft::node::raft_role(status.role) as i32,
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
                (self.context.metrics.outbox_oldest_age_seconds.get().max(0.0) * 1000.0).round() as u64
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
            return Err(with_epoch(Status::failed_precondition(result.detail), epoch));
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

    async fn freeze_slice(
        &self,
        request: Request<cellbank_proto::cell::FreezeSliceCommand>,
    ) -> Result<Response<cellbank_proto::cell::SliceStepResponse>, Status> {
        let timeout = timeout_of(&request);
        let command = Command { kind: Some(command::Kind::FreezeSlice(request.into_inner())) };
        self.slice_step(timeout, command).await
    }

    async fn thaw_slice(
        &self,
        request: Request<cellbank_proto::cell::ThawSliceCommand>,
    ) -> Result<Response<cellbank_proto::cell::SliceStepResponse>, Status> {
        let timeout = timeout_of(&request);
        let command = Command { kind: Some(command::Kind::ThawSlice(request.into_inner())) };
        self.slice_step(timeout, command).await
    }

    async fn export_slice(
        &self,
        request: Request<cellbank_proto::cell::ExportSliceRequest>,
    ) -> Result<Response<cellbank_proto::cell::ExportSliceResponse>, Status> {
        use cellbank_proto::cell::SliceMark;
        let timeout = timeout_of(&request);
        let r = request.into_inner();
        if r.move_id == 0 || r.source_pair_id == 0 || r.to_pair_id == 0 {
            return Err(Status::invalid_argument("move_id, source_pair_id and to_pair_id must be set"));
        }
        let started = std::time::Instant::now();
        // Everything this cell applied before the call is in the views below.
        self.context.within(timeout, self.context.node.read_index()).await?;
        let barrier_ms = started.elapsed().as_millis() as u64;
        let mark = super::moves::mark_in(&self.context.db.snapshot(), r.slice);
        let frozen = mark.as_ref().is_some_and(|m| m.move_id == r.move_id && m.mark == SliceMark::Frozen as i32);
        let gone = mark.as_ref().is_some_and(|m| m.move_id == r.move_id && m.mark == SliceMark::Gone as i32);
        let mut carried = None;
        let (mut checked_ms, mut left_ms) = (0, 0);
        if gone {
            // Left before (a move run again): proposed again, it changes
            // nothing, and its answer waits until the standby holds the
            // leaving, so nothing is exported that a failover could undo.
            let out = cellbank_proto::cell::SliceOutCommand {
                move_id: r.move_id,
                slice: r.slice,
                source_pair_id: r.source_pair_id,
                accounts: Vec::new(),
            };
            self.slice_step(timeout, Command { kind: Some(command::Kind::SliceOut(out)) }).await?;
        }
        if frozen {
            let db = self.context.db.clone();
            let (move_id, slice) = (r.move_id, r.slice);
            let (accounts, before) =
                tokio::task::spawn_blocking(move || super::moves::ready_to_leave(&db, move_id, slice))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))??;
            carried = Some(before);
            checked_ms = started.elapsed().as_millis() as u64;
            let out = cellbank_proto::cell::SliceOutCommand {
                move_id: r.move_id,
                slice: r.slice,
                source_pair_id: r.source_pair_id,
                accounts,
            };
            self.slice_step(timeout, Command { kind: Some(command::Kind::SliceOut(out)) }).await?;
            left_ms = started.elapsed().as_millis() as u64;
        }
        let db = self.context.db.clone();
        let epoch = self.context.pair.borrow().epoch;
        let import = tokio::task::spawn_blocking(move || {
            super::moves::export(&db, r.move_id, r.slice, r.source_pair_id, epoch, carried)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let accounts = import.keys.iter().filter(|k| k.get(1) == Some(&b'a')).count() as u64;
        let records = import.keys.len() as u64;
        // Where the export's time went (the slice is frozen throughout):
        // the read barrier, the checks and the scan of what the slice
        // carries, the leaving's Raft round, the export's read.
        tracing::info!(
            move_id = r.move_id,
            slice = r.slice,
            barrier_ms,
            checked_ms,
            left_ms,
            exported_ms = started.elapsed().as_millis() as u64,
            records,
            "slice exported"
        );
        Ok(Response::new(cellbank_proto::cell::ExportSliceResponse { import: Some(import), accounts, records }))
    }

    async fn import_slice(
        &self,
        request: Request<cellbank_proto::cell::SliceInCommand>,
    ) -> Result<Response<cellbank_proto::cell::SliceStepResponse>, Status> {
        let timeout = timeout_of(&request);
        let command = Command { kind: Some(command::Kind::SliceIn(request.into_inner())) };
        self.slice_step(timeout, command).await
    }

    async fn audit(&self, request: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let limit = match request.into_inner().outbox_limit {
            0 => 1000,
            n => n.min(1_000_000) as usize,
        };
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || audit_of(&db, limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
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
            check_not_installing(&view)?;
            let kv = SnapshotKv(&view);
            Ok::<_, Status>(DebitsResponse {
                held: credits.iter().map(|c| ledger::clearing::holds_debit(&kv, c)).collect(),
                applied_index: read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0),
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
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
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(response))
    }

    async fn slice_figures(
        &self,
        request: Request<SliceFiguresRequest>,
    ) -> Result<Response<SliceFiguresResponse>, Status> {
        let slice_count = request.into_inner().slice_count;
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || slice_figures_of(&db, slice_count))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
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
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(response))
    }

    async fn digest(&self, _request: Request<DigestRequest>) -> Result<Response<DigestResponse>, Status> {
        let db = self.context.db.clone();
        let response = tokio::task::spawn_blocking(move || digest_of(&db))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
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
            action @ (Action::AddVoter | Action::AddLearner) => {
                if let Err(why) = cellbank_client::planes::check_process_addr(&r.addr) {
                    return Err(Status::invalid_argument(format!("addr: {why}")));
                }
                change.set_change_type(if action == Action::AddVoter {
                    ConfChangeType::AddNode
                } else {
                    ConfChangeType::AddLearnerNode
                });
                change.context = PeerAddress { replica_id: r.replica_id, addr: r.addr }.encode_to_vec().into();
            }
            Action::Remove => {
                // A leader that removed itself would go on leading a group
                // it is not in; its leadership moves first.
                if r.replica_id == self.context.replica_id && self.context.node.shared.is_leader.load(Ordering::Relaxed)
                {
                    return Err(Status::failed_precondition(format!(
                        "replica {} leads the cell: move the leadership to another replica first \
                         (admin transfer-leader), then remove it",
                        r.replica_id
                    )));
                }
                change.set_change_type(ConfChangeType::RemoveNode)
            }
            Action::Unspecified => {
                return Err(Status::invalid_argument(
                    "action: must be ACTION_ADD_VOTER, ACTION_ADD_LEARNER or ACTION_REMOVE",
                ))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// While a snapshot install is under way the state region is part old,
    /// part new: a digest or an audit then would compare replicas on
    /// nonsense, so both refuse until the install is done.
    #[test]
    fn digest_and_audit_refuse_while_a_snapshot_is_being_installed() {
        let dir = tempfile::tempdir().unwrap();
        let db = cellbank_raft::storage::open_db(dir.path());
        assert!(digest_of(&db).is_ok());
        db.put(cellbank_raft::storage::INSTALLING_KEY, b"marker").unwrap();
        assert_eq!(digest_of(&db).unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(audit_of(&db, 10).unwrap_err().code(), tonic::Code::Unavailable);
        db.delete(cellbank_raft::storage::INSTALLING_KEY).unwrap();
        assert!(audit_of(&db, 10).is_ok());
    }

    #[test]
    fn slice_figures_count_users_accounts_balances_and_bytes_by_slice() {
        use cellbank_client::currency::Currency;
        use cellbank_client::slices::slice_of;
        let dir = tempfile::tempdir().unwrap();
        let db = cellbank_raft::storage::open_db(dir.path());
        let (cny, usd) = (Currency::parse("CNY").unwrap(), Currency::parse("USD").unwrap());
        let put = |id: ledger::AccountId, balance: i128| {
            db.put(id.key(), ledger::Account { balance, version: 1 }.encode()).unwrap();
        };
        for user in 1..=40u64 {
            put(ledger::AccountId::user(user, cny), 100 * user as i128);
            db.put(ledger::AccountId::user(user, cny).history_key(0), vec![0u8; 30]).unwrap();
        }
        put(ledger::AccountId::user(7, usd), 5);
        // System accounts are not a slice's.
        put(ledger::AccountId::settlement(cny), -1_000_000);
        let figures = slice_figures_of(&db, 4).unwrap();
        let total: u64 = figures.slices.iter().map(|f| f.accounts).sum();
        assert_eq!(total, 41);
        let seven = figures.slices.iter().find(|f| f.slice == slice_of(7, 4)).unwrap();
        assert_eq!(seven.balance_by_currency.get("USD").map(String::as_str), Some("5"));
        let cny_total: i128 =
            figures.slices.iter().map(|f| f.balance_by_currency["CNY"].parse::<i128>().unwrap()).sum();
        assert_eq!(cny_total, (1..=40).map(|u| 100 * u).sum::<i128>());
        for figure in &figures.slices {
            let users = (1..=40u64).filter(|u| slice_of(*u, 4) == figure.slice).count() as u64;
            let usd = u64::from(slice_of(7, 4) == figure.slice);
            assert_eq!(figure.accounts, users + usd, "slice {}", figure.slice);
            // 14-byte key + 24-byte account; 22-byte history key + 30 bytes.
            assert_eq!(figure.bytes, users * (38 + 52) + usd * 38, "slice {}", figure.slice);
        }
        assert_eq!(slice_figures_of(&db, 0).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
