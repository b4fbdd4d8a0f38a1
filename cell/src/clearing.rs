//! Money between cells, on the replica's side: the `Clearing` service that
//! routers call, the courier that delivers this cell's outbox, and the
//! sweeper that expires envelopes.
//!
//! - The courier runs on the leader of a cell that takes writes and has
//!   earned its authority at its epoch (see `replication.rs`). It reads
//!   pending outbox entries from a snapshot at applied index `i`, waits
//!   until `i` may be acknowledged under the same rule as a client write
//!   (SYNC: the standby holds `i` at the epoch and standby `i` applied
//!   under; any demotion, epoch change or deposition meanwhile fails the
//!   wait), and sends the credits, one call per destination pair, through a
//!   router to that pair's active cell. Every call names its sender (source
//!   pair, cell, epoch); a router refuses a sender the routing table does
//!   not name as the pair's active at that epoch, and the cell then records
//!   its deposition. A final answer (credited, or refused for good) is
//!   settled by a command in this cell's log; anything else is retried with
//!   the client crate's jittered backoff per destination
//!   ([`RetryPolicy::COURIER`]), forever: an entry is never dropped, and a
//!   destination that is down delays no other. Redelivery is safe because
//!   the destination applies each (source pair, seq) and each business key
//!   once, and answers only under the same acknowledgement rule.
//! - The sweeper proposes the expiry of envelopes whose expiry has passed on
//!   the leader's clock; the apply decides by the entry's timestamp.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellbank_client::retry::{Backoff, RetryPolicy};
use cellbank_proto::cell::clearing_server::Clearing;
use cellbank_proto::cell::{
    command, AccountKeys, AccountsHeld, Command, CreditBatch, CreditResults, CreditSender, CrossCellBatch,
    CrossCellResults, ExpireCommand, GrabBatch, GrabCommand, GrabResults, MoveCommand, OutboxEntry, RedirectCommand,
    SettleCommand,
};
use cellbank_proto::router::courier_client::CourierClient;
use cellbank_proto::v1::{GrabEnvelopeResponse, ResultCode, TransferKind, TransferResult};
use cellbank_proto::ShortName;
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use prost::Message as _;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::context::{now_ms, timeout_of, ReplicaContext};
use crate::ledger::clearing::{settles, validate_credit};
use crate::ledger::{envelope, keys, pair, validate};

/// Credits per delivery call.
pub const DELIVERY_BATCH_MAX: usize = 1024;
/// Delivery calls in flight at once.
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 4;
/// Entries due for delivery taken per pass.
pub const OUTBOX_SCAN_MAX: usize = 8192;
/// Shortest time between two passes over the outbox.
pub const PASS_INTERVAL: Duration = Duration::from_millis(2);
/// How often a pass walks the whole outbox to count it (for the gauge).
pub const COUNT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one delivery may take before it counts as failed.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// How soon credits to a slice on the move are delivered again.
pub const SLICE_MOVING_RETRY: Duration = Duration::from_millis(50);
/// How often the sweeper looks for expired envelopes.
pub const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_millis(200);
pub const EXPIRIES_PER_SWEEP_MAX: usize = 256;

fn item_error(error: validate::Invalid) -> TransferResult {
    TransferResult {
        code: ResultCode::InvalidItem as i32,
        field: error.field.into(),
        detail: error.detail,
        ..Default::default()
    }
}

/// Proposes the valid commands and puts every result back in request
/// order; `checked` holds a command or the validation error of each item.
async fn propose_items(
    context: &ReplicaContext,
    timeout: Duration,
    checked: Vec<Result<Command, validate::Invalid>>,
    credits: bool,
) -> Result<Vec<TransferResult>, Status> {
    if checked.is_empty() {
        return Err(Status::invalid_argument("items: must hold at least one item"));
    }
    if checked.len() > SUBMIT_TRANSFERS_ITEMS_MAX {
        return Err(Status::invalid_argument(format!(
            "items: {} items, at most {SUBMIT_TRANSFERS_ITEMS_MAX} per call",
            checked.len()
        )));
    }
    let mut results: Vec<Option<TransferResult>> = vec![None; checked.len()];
    let mut commands = Vec::with_capacity(checked.len());
    let mut positions = Vec::with_capacity(checked.len());
    for (position, item) in checked.into_iter().enumerate() {
        match item {
            Ok(command) => {
                commands.push(command);
                positions.push(position);
            }
            Err(error) => results[position] = Some(item_error(error)),
        }
    }
    if !commands.is_empty() {
        let applied = if credits {
            context.propose_credits(timeout, commands).await?
        } else {
            context.propose(timeout, commands).await?
        };
        for (position, result) in positions.into_iter().zip(applied) {
            results[position] = Some(result);
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every item has a result")).collect())
}

pub struct ClearingService {
    pub context: ReplicaContext,
}

#[tonic::async_trait]
impl Clearing for ClearingService {
    async fn send(&self, request: Request<CrossCellBatch>) -> Result<Response<CrossCellResults>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let checked = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| {
                let mut t = item.transfer.unwrap_or_default();
                validate::take_transfer_id(&mut t)?;
                let movement = MoveCommand {
                    transfer_id: t.transfer_id,
                    kind: TransferKind::Transfer as i32,
                    from_user_id: t.from_user_id,
                    to_user_id: t.to_user_id,
                    currency: t.currency,
                    amount: t.amount,
                    source_pair_id: item.source_pair_id,
                    dest_pair_id: item.dest_pair_id,
                };
                if movement.dest_pair_id == 0 {
                    return Err(validate::Invalid { field: "dest_pair_id", detail: "must be set".into() });
                }
                validate::move_command(&movement)?;
                Ok(Command { kind: Some(command::Kind::Move(movement)) })
            })
            .collect();
        let results = propose_items(&self.context, timeout, checked, false).await?;
        Ok(Response::new(CrossCellResults { results }))
    }

    async fn grab(&self, request: Request<GrabBatch>) -> Result<Response<GrabResults>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let items = request.into_inner().items;
        let mut currencies: HashMap<String, String> = HashMap::new();
        let checked = items
            .iter()
            .map(|item| {
                let grab = GrabCommand {
                    envelope_id: item.envelope_id.clone(),
                    user_id: item.user_id,
                    envelope_pair_id: item.envelope_pair_id,
                    grabber_pair_id: item.grabber_pair_id,
                    forbid_own: item.forbid_own,
                };
                validate::grab(&grab)?;
                Ok(Command { kind: Some(command::Kind::Grab(grab)) })
            })
            .collect();
        let results = propose_items(&self.context, timeout, checked, false).await?;
        let results = items
            .into_iter()
            .zip(results)
            .map(|(item, result)| {
                let currency = currencies
                    .entry(item.envelope_id.clone())
                    .or_insert_with(|| envelope_currency(&self.context, &item.envelope_id))
                    .clone();
                grab_response(result, currency)
            })
            .collect();
        Ok(Response::new(GrabResults { results }))
    }

    async fn holds_accounts(&self, request: Request<AccountKeys>) -> Result<Response<AccountsHeld>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        if cellbank_raft::faults::holds_accounts_unimplemented() {
            return Err(Status::unimplemented("cellbank.cell.v1.Clearing/HoldsAccounts (fault point)"));
        }
        let accounts = request.into_inner().accounts;
        if accounts.len() > SUBMIT_TRANSFERS_ITEMS_MAX {
            return Err(Status::invalid_argument(format!(
                "accounts: {} keys, at most {SUBMIT_TRANSFERS_ITEMS_MAX} per call",
                accounts.len()
            )));
        }
        let mut keys = Vec::with_capacity(accounts.len());
        for key in &accounts {
            let currency = validate::open_account(key.user_id, &key.currency).map_err(crate::context::invalid)?;
            keys.push((key.user_id, currency));
        }
        let (view, _) = self.context.read_view(timeout).await?;
        let kv = crate::context::SnapshotKv(&view);
        self.context.check_slices_here(&kv, keys.iter().map(|(user_id, _)| *user_id))?;
        let held = keys
            .into_iter()
            .map(|(user_id, currency)| crate::ledger::get_user_account(&kv, user_id, currency).is_some())
            .collect();
        Ok(Response::new(AccountsHeld { held }))
    }

    async fn apply_credits(&self, request: Request<CreditBatch>) -> Result<Response<CreditResults>, Status> {
        let timeout = timeout_of(&request);
        self.context.gate(request.metadata())?;
        let batch = request.into_inner();
        let sender = batch.sender.ok_or_else(|| Status::invalid_argument("sender: must be set"))?;
        if sender.source_pair_id == 0 || sender.cell_id == 0 || sender.epoch == 0 {
            return Err(Status::invalid_argument("sender: source_pair_id, cell_id and epoch must be set"));
        }
        let checked = batch
            .credits
            .into_iter()
            .map(|mut credit| {
                validate_credit(&credit)?;
                if credit.source_pair_id != sender.source_pair_id {
                    return Err(validate::Invalid {
                        field: "source_pair_id",
                        detail: format!("the batch's sender is pair {}", sender.source_pair_id),
                    });
                }
                // The apply refuses an epoch older than the newest it took
                // credits from for this source pair (a deposed sender).
                credit.sender_epoch = sender.epoch;
                Ok(Command { kind: Some(command::Kind::Credit(credit)) })
            })
            .collect();
        // `propose_items` answers only once every result may be acknowledged
        // (the same rule as a client write: the source settles on it).
        let results = propose_items(&self.context, timeout, checked, true).await?;
        if let Some(stale) = results.iter().find(|r| r.code == ResultCode::StaleSender as i32) {
            let newest = crate::ledger::clearing::read_sender_epoch(
                &cellbank_raft::ReadOnlyDb(&self.context.db),
                sender.source_pair_id,
            );
            return Err(cellbank_client::errors::with_epoch(Status::failed_precondition(stale.detail.clone()), newest));
        }
        Ok(Response::new(CreditResults { results }))
    }
}

/// The currency of an envelope as applied here ("" when unknown).
pub fn envelope_currency(context: &ReplicaContext, envelope_id: &str) -> String {
    if validate::envelope_id(envelope_id).is_err() {
        return String::new();
    }
    envelope::read_envelope(&cellbank_raft::ReadOnlyDb(&context.db), envelope_id)
        .map(|e| e.currency)
        .unwrap_or_default()
}

pub fn grab_response(result: TransferResult, currency: String) -> GrabEnvelopeResponse {
    GrabEnvelopeResponse { amount: result.amount, share_index: result.share_index, currency, result: Some(result) }
}

/// True when this replica should run the cell's background work: it leads a
/// cell that takes writes, is not deposed, and has earned its authority.
fn serving(context: &ReplicaContext) -> bool {
    if !context.node.shared.is_leader.load(Ordering::Relaxed) {
        return false;
    }
    let epoch = {
        let state = context.pair.borrow();
        if !pair::writable(&state) {
            return false;
        }
        state.epoch
    };
    !context.replication.deposed(epoch) && context.has_authority()
}

/// What the courier knows of the pending entries it has seen.
#[derive(Default)]
struct CourierState {
    /// seq -> destination pair, for entries seen (decoded once).
    dest_of: HashMap<u64, u64>,
    /// Entries in a delivery call right now.
    in_flight: std::collections::HashSet<u64>,
    /// Destination pair -> (its waits since the last success, not before).
    backoff: HashMap<u64, (Backoff, Instant)>,
}

/// One pass over the outbox: up to `limit` entries due for delivery (oldest
/// first, skipping entries in flight and destinations backing off without
/// decoding them), how many entries are pending, the oldest one's creation
/// time, and the applied index the pass reflects.
struct Pass {
    due: Vec<OutboxEntry>,
    /// Entries walked (all pending ones when `complete`).
    pending: u64,
    complete: bool,
    oldest_created_at_ms: Option<u64>,
    index: u64,
}

/// Most outbox keys one pass walks (a long backlog is walked in part).
const OUTBOX_KEYS_PER_PASS_MAX: u64 = 1_000_000;

/// `count_all`: walk the whole outbox to count it (else stop once `limit`
/// entries are due, and `pending` counts only what was walked).
fn scan_outbox(db: &rocksdb::DB, state: &Mutex<CourierState>, limit: usize, count_all: bool) -> Pass {
    let view = db.snapshot();
    let index = cellbank_raft::storage::read_u64(&view, cellbank_raft::storage::APPLIED_INDEX_KEY).unwrap_or(0);
    let mut iter = view.raw_iterator();
    iter.seek(keys::OUTBOX_PREFIX);
    let now = Instant::now();
    let mut state = state.lock().expect("courier lock");
    let blocked: std::collections::HashSet<u64> =
        state.backoff.iter().filter(|(_, (_, at))| *at > now).map(|(dest, _)| *dest).collect();
    let mut pass = Pass { due: Vec::new(), pending: 0, complete: false, oldest_created_at_ms: None, index };
    let mut seen = std::collections::HashSet::new();
    while iter.valid() && pass.pending < OUTBOX_KEYS_PER_PASS_MAX {
        let key = iter.key().expect("key");
        if !key.starts_with(keys::OUTBOX_PREFIX) || (!count_all && pass.due.len() >= limit) {
            break;
        }
        pass.pending += 1;
        let seq = u64::from_be_bytes(key[keys::OUTBOX_PREFIX.len()..].try_into().expect("outbox keys end in a u64"));
        seen.insert(seq);
        let known = state.dest_of.get(&seq).copied();
        let skip = state.in_flight.contains(&seq) || known.is_some_and(|dest| blocked.contains(&dest));
        if (!skip && pass.due.len() < limit) || pass.oldest_created_at_ms.is_none() {
            let value = iter.value().expect("value");
            let entry = OutboxEntry::decode(value).unwrap_or_else(|e| panic!("corrupt outbox entry {key:02x?}: {e}"));
            pass.oldest_created_at_ms.get_or_insert(entry.created_at_ms);
            let dest = entry.credit.as_ref().map(|c| c.dest_pair_id).unwrap_or(0);
            state.dest_of.insert(seq, dest);
            if !skip && !blocked.contains(&dest) && pass.due.len() < limit {
                pass.due.push(entry);
            }
        }
        iter.next();
    }
    let walked_all = !iter.valid() || !iter.key().is_some_and(|k| k.starts_with(keys::OUTBOX_PREFIX));
    pass.complete = walked_all;
    if walked_all {
        // The whole outbox was walked: forget what is no longer pending.
        state.dest_of.retain(|seq, _| seen.contains(seq));
    }
    pass
}

/// Delivers this cell's outbox through the routers, for as long as the
/// replica runs. Each delivery call carries the credits of one destination
/// pair; a destination that failed is left alone for a while (50 ms doubling
/// to 5 s), so one cell that is down delays no other cell's credits.
pub async fn run_courier(context: ReplicaContext, routers: Vec<String>) {
    if routers.is_empty() {
        tracing::info!("no routers configured: this replica delivers no cross-cell credits");
        return;
    }
    let clients: Vec<CourierClient<Channel>> = routers
        .iter()
        .filter_map(|addr| {
            let peer = cellbank_client::planes::Plane::Peer.of(addr);
            let channel =
                cellbank_client::ChannelSettings::INTERNAL.lazy_to(&peer, cellbank_client::tls::Expect::Router).ok()?;
            Some(cellbank_client::channel::courier(channel))
        })
        .collect();
    let state: Arc<Mutex<CourierState>> = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(DELIVERIES_IN_FLIGHT_MAX));
    let mut applied = context.node.shared.applied.subscribe();
    let mut next_router = 0usize;
    let mut last_count = Instant::now() - COUNT_INTERVAL;
    loop {
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        // At most one pass per PASS_INTERVAL, however fast entries apply.
        tokio::time::sleep(PASS_INTERVAL).await;
        if !serving(&context) {
            *state.lock().expect("courier lock") = CourierState::default();
            context.metrics.outbox_pending.set(0);
            context.metrics.outbox_oldest_age_seconds.set(0.0);
            continue;
        }
        let (db, scan_state) = (context.db.clone(), state.clone());
        let count_all = last_count.elapsed() >= COUNT_INTERVAL;
        let Ok(pass) =
            tokio::task::spawn_blocking(move || scan_outbox(&db, &scan_state, OUTBOX_SCAN_MAX, count_all)).await
        else {
            continue;
        };
        if pass.complete {
            context.metrics.outbox_pending.set(pass.pending as i64);
            last_count = Instant::now();
        }
        let oldest = pass.oldest_created_at_ms.map(|at| now_ms().saturating_sub(at)).unwrap_or(0);
        context.metrics.outbox_oldest_age_seconds.set(oldest as f64 / 1000.0);
        if pass.due.is_empty() {
            continue;
        }
        // No credit leaves before its outbox entry may be acknowledged
        // (the client-write rule): in SYNC mode the standby holds it at the
        // epoch it applied under, so no failover loses a debit whose credit
        // left.
        if let Err(status) = context.replication.wait_for(&context.pair, pass.index, Duration::from_secs(1)).await {
            tracing::debug!(%status, "the courier waits: its outbox entries may not leave yet");
            continue;
        }
        let Some(sender) = sender_of(&context, &pass.due) else { continue };
        let mut by_dest: std::collections::BTreeMap<u64, Vec<OutboxEntry>> = Default::default();
        {
            let mut state = state.lock().expect("courier lock");
            for entry in pass.due {
                state.in_flight.insert(entry.seq);
                by_dest.entry(entry.credit.as_ref().map(|c| c.dest_pair_id).unwrap_or(0)).or_default().push(entry);
            }
        }
        for (dest, entries) in by_dest {
            for chunk in entries.chunks(DELIVERY_BATCH_MAX) {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let chunk = chunk.to_vec();
                let (context, state, clients) = (context.clone(), state.clone(), clients.clone());
                let first = next_router;
                next_router = (next_router + 1) % clients.len();
                tokio::spawn(async move {
                    let (settled, moving) = deliver(&context, &clients, first, &sender, &chunk).await;
                    let mut state = state.lock().expect("courier lock");
                    for entry in &chunk {
                        state.in_flight.remove(&entry.seq);
                        if settled.contains(&entry.seq) || moving.contains(&entry.seq) {
                            state.dest_of.remove(&entry.seq);
                        }
                    }
                    if settled.len() == chunk.len() {
                        state.backoff.remove(&dest);
                    } else if settled.len() + moving.len() == chunk.len() {
                        // Only credits to slices on the move: asked again
                        // soon, without the backoff of a sick destination.
                        state.backoff.remove(&dest);
                        state
                            .backoff
                            .insert(dest, (RetryPolicy::COURIER.backoff(), Instant::now() + SLICE_MOVING_RETRY));
                    } else {
                        context.metrics.credit_delivery_failures_total.inc();
                        let (mut backoff, _) = state
                            .backoff
                            .remove(&dest)
                            .unwrap_or_else(|| (RetryPolicy::COURIER.backoff(), Instant::now()));
                        let delay = backoff.next_delay(false);
                        state.backoff.insert(dest, (backoff, Instant::now() + delay));
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// The sender a delivery names: this cell, its pair (the source pair its
/// credits name; one per cell) and its epoch. `None` when the pass holds
/// credits of another source pair (never written by this cell's apply).
fn sender_of(context: &ReplicaContext, due: &[OutboxEntry]) -> Option<CreditSender> {
    let source_pair_id = due.first()?.credit.as_ref()?.source_pair_id;
    if due.iter().any(|e| e.credit.as_ref().map(|c| c.source_pair_id) != Some(source_pair_id)) {
        tracing::error!("outbox entries name more than one source pair; none is delivered");
        return None;
    }
    let epoch = context.pair.borrow().epoch;
    Some(CreditSender { source_pair_id, cell_id: context.cell_id, epoch })
}

/// Delivers one batch and settles what got a final answer; returns the
/// settled seqs and those whose recipient's slice is on the move (each
/// redirected when the answer names the pair it moved to). A router that says this cell is not its pair's active at
/// its epoch makes it record its deposition.
async fn deliver(
    context: &ReplicaContext,
    clients: &[CourierClient<Channel>],
    first: usize,
    sender: &CreditSender,
    entries: &[OutboxEntry],
) -> (std::collections::HashSet<u64>, std::collections::HashSet<u64>) {
    let batch = CreditBatch {
        credits: entries.iter().map(|e| e.credit.clone().unwrap_or_default()).collect(),
        sender: Some(*sender),
    };
    let mut deliveries = None;
    context.metrics.credit_delivery_calls_total.inc();
    for attempt in 0..clients.len() {
        let mut client = clients[(first + attempt) % clients.len()].clone();
        let mut request = Request::new(batch.clone());
        request.set_timeout(DELIVERY_TIMEOUT);
        match tokio::time::timeout(DELIVERY_TIMEOUT, client.deliver_credits(request)).await {
            Ok(Ok(response)) => {
                deliveries = Some(response.into_inner().deliveries);
                break;
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                let epoch = status
                    .metadata()
                    .get(cellbank_proto::EPOCH_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                tracing::warn!(%status, epoch, "a router refused this cell as the sender of its pair's credits");
                if epoch > sender.epoch {
                    crate::replication::record_deposition(&context.node, epoch);
                }
                break;
            }
            Ok(Err(status)) => tracing::debug!(%status, "a router did not take the credits"),
            Err(_) => tracing::debug!("a router did not answer the credits in time"),
        }
    }
    let mut settled = std::collections::HashSet::new();
    let mut moving = std::collections::HashSet::new();
    let Some(deliveries) = deliveries.filter(|d| d.len() == entries.len()) else { return (settled, moving) };
    let mut commands = Vec::new();
    let mut answers = Vec::new();
    let mut redirects = Vec::new();
    for (entry, delivery) in entries.iter().zip(deliveries) {
        let result = delivery.result.unwrap_or_default();
        let code = ResultCode::try_from(result.code).unwrap_or(ResultCode::Unspecified);
        if delivery.answered && code == ResultCode::SliceMoving {
            // The recipient's slice is moving: wait for it; or it moved on,
            // and the credit goes to the pair that serves it now.
            moving.insert(entry.seq);
            let from_pair_id = entry.credit.as_ref().map(|c| c.dest_pair_id).unwrap_or(0);
            if result.moved_to_pair_id != 0 && from_pair_id != 0 {
                let redirect = RedirectCommand { seq: entry.seq, from_pair_id, to_pair_id: result.moved_to_pair_id };
                redirects.push(Command { kind: Some(command::Kind::Redirect(redirect)) });
            }
            continue;
        }
        if !delivery.answered || !settles(code) {
            if delivery.answered {
                tracing::warn!(seq = entry.seq, code = code.short_name(), detail = %result.detail, "a credit got no final answer");
            }
            continue;
        }
        let settle = SettleCommand { seq: entry.seq, code: result.code, credited_at_ms: result.timestamp_ms };
        commands.push(Command { kind: Some(command::Kind::Settle(settle)) });
        answers.push((entry.seq, code));
    }
    if !redirects.is_empty() {
        match context.within(DELIVERY_TIMEOUT, context.node.propose(redirects)).await {
            Ok(results) => {
                for result in results.iter().filter(|r| r.code != ResultCode::Ok as i32) {
                    tracing::warn!(detail = %result.detail, "a credit's redirect did not apply; it is asked again");
                }
            }
            Err(status) => tracing::debug!(%status, "redirecting credits failed; they are delivered again"),
        }
    }
    if commands.is_empty() {
        return (settled, moving);
    }
    match context.within(DELIVERY_TIMEOUT, context.node.propose(commands)).await {
        Ok(results) => {
            for ((seq, code), result) in answers.into_iter().zip(results) {
                if result.code != ResultCode::Ok as i32 {
                    tracing::warn!(seq, detail = %result.detail, "a settle did not apply; the credit is asked again");
                    continue;
                }
                settled.insert(seq);
                if code == ResultCode::Ok {
                    context.metrics.credits_delivered_total.inc();
                } else {
                    context.metrics.credits_refused_total.inc();
                }
            }
        }
        Err(status) => tracing::debug!(%status, "settling delivered credits failed; they are delivered again"),
    }
    (settled, moving)
}

/// Expired envelopes with money left, by expiry (at most `limit`).
fn due_expiries(db: &rocksdb::DB, now_ms: u64, limit: usize) -> Vec<String> {
    let mut iter = db.raw_iterator();
    iter.seek(keys::EXPIRY_PREFIX);
    let mut due = Vec::new();
    while iter.valid() && due.len() < limit {
        let key = iter.key().expect("key");
        match keys::expiry_time(key) {
            Some(at) if at <= now_ms => {}
            _ => break,
        }
        if let Some(id) = keys::expiry_envelope(key) {
            due.push(id);
        }
        iter.next();
    }
    due
}

/// Proposes the expiry of envelopes whose time has come, on the leader.
pub async fn run_expiry(context: ReplicaContext) {
    loop {
        tokio::time::sleep(EXPIRY_SWEEP_INTERVAL).await;
        if !serving(&context) {
            continue;
        }
        let db = context.db.clone();
        let Ok(due) = tokio::task::spawn_blocking(move || due_expiries(&db, now_ms(), EXPIRIES_PER_SWEEP_MAX)).await
        else {
            continue;
        };
        if due.is_empty() {
            continue;
        }
        let commands = due
            .into_iter()
            .map(|envelope_id| Command { kind: Some(command::Kind::Expire(ExpireCommand { envelope_id })) })
            .collect();
        match context.within(Duration::from_secs(5), context.node.propose(commands)).await {
            Ok(results) => {
                let expired = results.iter().filter(|r| r.code == ResultCode::Ok as i32).count();
                context.metrics.envelopes_expired_total.inc_by(expired as u64);
                if expired > 0 {
                    tracing::info!(expired, "envelopes expired; unclaimed money returned to their senders");
                }
            }
            Err(status) => tracing::debug!(%status, "proposing expiries failed; the next sweep retries"),
        }
    }
}

/// A grab of an envelope held here, from a user of this cell (no router).
pub fn local_grab(envelope_id: String, user_id: u64) -> GrabCommand {
    GrabCommand { envelope_id, user_id, envelope_pair_id: 0, grabber_pair_id: 0, forbid_own: false }
}
