//! The client-facing `cellbank.v1.Ledger` of a router. A client talks to
//! routers only: each request is validated here (the same rules as a
//! cell's), pinned to the cell that owns its user's slice, and retried there
//! within the client's deadline.
//!
//! - Deposit, Withdraw, OpenAccount, GetAccount and ListTransfers go to the
//!   user's cell; Transfer to the sender's.
//! - A transfer whose recipient lives in another cell goes to the sender's
//!   cell as a cross-cell send (`Clearing.Send`): debit and outbox entry in
//!   one command; the sender cell's courier delivers the credit later.
//! - SubmitTransfers is split by the senders' cells (and, within a cell, into
//!   local and cross-cell items); the parts are sent at once and the results
//!   merged back into request order.
//! - Envelopes live in their sender's cell, named by the envelope id. Grabs
//!   of one cell's envelopes are coalesced into batches (`Clearing.Grab`),
//!   so a hot envelope costs few calls and few Raft entries. A grabber from
//!   another cell must hold an account in the envelope's currency; that is
//!   checked before the grab (accounts are never closed, so a positive
//!   answer is remembered).
//! - GetTransfer does not know the cell of a transfer_id: it asks every
//!   active cell and answers with the one that has it.

use std::sync::Arc;
use std::time::Duration;

use cellbank_client::validate;
use cellbank_proto::v1::ledger_server::Ledger as LedgerApi;
use cellbank_proto::v1::*;
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use prost::Message as _;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::cells::CellPool;
use crate::load::Kind;
use crate::scopes::{Operation, Scopes};
use crate::table::{self, to_pair, Route};

/// Deadline of a request that carries none.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Longest deadline honoured.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(60);

pub struct Front {
    pub pool: Arc<CellPool>,
    /// Senders may not grab their own envelopes (router config).
    pub forbid_own_grab: bool,
    /// What each service may do (the policy file).
    pub scopes: Arc<Scopes>,
    /// Accounts known to exist (user, currency): they are never closed.
    accounts: std::sync::Mutex<std::collections::HashSet<(u64, String)>>,
    /// Envelope currencies, fixed at send.
    envelope_currencies: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::OnceCell<String>>>>,
    grabs: crate::grabs::Batcher<crate::grabs::Grabs>,
    transfers: crate::grabs::Batcher<crate::grabs::Transfers>,
    account_checks: crate::grabs::Batcher<crate::grabs::AccountChecks>,
}

/// Most entries in each of the front's caches; past this a cache is emptied.
const CACHE_ENTRIES_MAX: usize = 1_000_000;
/// A `SubmitTransfers` part for one pair of at most this many items joins
/// the pair's coalesced calls (with unary transfers and other callers'
/// small parts); a larger part is already a good call and goes alone.
const COALESCED_PART_MAX: usize = 256;

/// The namespace of the caller's transfer ids: a service's own
/// (`validate::in_namespace`); none for an operator, or on an insecure
/// router (no identities).
fn namespace_of<T>(request: &Request<T>) -> Option<String> {
    match cellbank_client::gate::caller(request) {
        Some(cellbank_client::tls::Identity::Service { name, .. }) => Some(validate::service_namespace(name)),
        _ => None,
    }
}

/// A record as its caller knows it: its id without the caller's namespace.
fn as_known(namespace: Option<&str>, record: &mut TransferRecord) {
    validate::out_of_namespace(namespace, &mut record.transfer_id);
    if !record.transfer_id_text.is_empty() {
        record.transfer_id_text = String::from_utf8_lossy(&record.transfer_id).into_owned();
    }
}

fn remember<T: std::hash::Hash + Eq>(set: &std::sync::Mutex<std::collections::HashSet<T>>, value: T) {
    let mut set = set.lock().expect("cache lock");
    if set.len() >= CACHE_ENTRIES_MAX {
        set.clear();
    }
    set.insert(value);
}

/// When the router stops working on a call: a little before the caller's
/// own deadline (a twentieth of it, at most 100 ms), so that the caller
/// hears the router's answer (which part failed, and how) rather than its
/// own timer's.
fn deadline_of<T>(request: &Request<T>) -> Instant {
    let timeout =
        cellbank_client::deadline::of_request(request).unwrap_or(REQUEST_TIMEOUT_DEFAULT).min(REQUEST_TIMEOUT_MAX);
    Instant::now() + timeout.saturating_sub((timeout / 20).min(Duration::from_millis(100)))
}

fn invalid(error: validate::Invalid) -> Status {
    cellbank_client::errors::invalid_argument(error.field, &error.detail)
}

/// The answer to a `SubmitTransfers` call one of whose parts failed with
/// `status`. When other parts' items were recorded (`some_recorded`), a
/// status that says nothing applied (UNAVAILABLE, RESOURCE_EXHAUSTED: the
/// clients' retry rule sends such a call again as if it had never been
/// made) would be untrue: the call is ABORTED instead, saying that some
/// items applied and that it goes again only with the same transfer ids.
fn part_failed(status: Status, some_recorded: bool) -> Status {
    // As the client will read it: the transport error behind a status
    // does not cross the wire.
    let says_nothing_applied = matches!(status.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted);
    if !some_recorded || !says_nothing_applied {
        return status;
    }
    Status::aborted(format!(
        "some items of this call were recorded and others were not ({:?}: {}); send it again with the same \
         transfer ids (a recorded item answers as a duplicate), never with new ones",
        status.code(),
        status.message()
    ))
}

/// The pairs of two users in `table` (None before it is bootstrapped).
fn pairs_in(table: &cellbank_proto::router::RoutingTable, from: u64, to: u64) -> Option<(u64, u64)> {
    Some((table::route(table, from)?.pair_id, table::route(table, to)?.pair_id))
}

/// The route of a call that writes for `user_id` (held while the user's
/// slice moves: see `CellPool::call`).
fn by_user(user_id: u64) -> impl Fn(&cellbank_proto::router::RoutingTable) -> Option<Route> {
    move |t| table::route(t, user_id)
}

/// The route of a read for `user_id`: sent while the slice moves (its
/// pair serves it until the money leaves, then refuses it and the call
/// waits for the table).
fn reading(user_id: u64) -> impl Fn(&cellbank_proto::router::RoutingTable) -> Option<Route> {
    move |t| table::route(t, user_id).map(|r| Route { moving: false, ..r })
}

fn refused(code: ResultCode, field: &str, detail: String) -> GrabEnvelopeResponse {
    GrabEnvelopeResponse {
        result: Some(TransferResult { code: code as i32, field: field.into(), detail, ..Default::default() }),
        ..Default::default()
    }
}

impl Front {
    pub fn new(pool: Arc<CellPool>, forbid_own_grab: bool, scopes: Arc<Scopes>) -> Front {
        Front {
            grabs: crate::grabs::Batcher::new(pool.clone()),
            transfers: crate::grabs::Batcher::new(pool.clone()),
            account_checks: crate::grabs::Batcher::new(pool.clone()),
            pool,
            forbid_own_grab,
            scopes,
            accounts: Default::default(),
            envelope_currencies: Default::default(),
        }
    }

    /// Refuses `operation` (debiting `debits`) to a service whose scope
    /// does not allow it.
    fn allow<T>(&self, request: &Request<T>, operation: Operation, debits: &[u64]) -> Result<(), Status> {
        self.scopes.check(cellbank_client::gate::caller(request), operation, debits)
    }

    /// The pairs of two users (None before the table is bootstrapped).
    fn pairs_of(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        pairs_in(&self.pool.table_view().borrow(), from, to)
    }

    /// The currency of an envelope: read once from its cell, by one caller
    /// while the others wait for its answer (a hot envelope's first grabs
    /// arrive together), then remembered. An envelope not found is not
    /// remembered: it may be sent yet.
    async fn envelope_currency(&self, envelope_id: &str, sender: u64, deadline: Instant) -> Result<String, Status> {
        let once = {
            let mut cache = self.envelope_currencies.lock().expect("cache lock");
            match cache.get(envelope_id) {
                Some(once) => once.clone(),
                None => {
                    if cache.len() >= CACHE_ENTRIES_MAX {
                        cache.clear();
                    }
                    cache.entry(envelope_id.to_string()).or_default().clone()
                }
            }
        };
        let found = once
            .get_or_try_init(|| async {
                let request =
                    GetEnvelopeRequest { envelope_id: envelope_id.to_string(), page_size: 1, page_token: vec![] };
                let found = self
                    .pool
                    .call(reading(sender), deadline, request, |mut c, req| async move { c.get_envelope(req).await })
                    .await?;
                match found.envelope {
                    Some(envelope) => Ok(envelope.currency),
                    None => Err(Status::not_found("no such envelope")),
                }
            })
            .await
            .cloned();
        if found.is_err() && !once.initialized() {
            // Not remembered: ids of envelopes that do not exist must not
            // fill the cache.
            let mut cache = self.envelope_currencies.lock().expect("cache lock");
            if cache.get(envelope_id).is_some_and(|cell| Arc::ptr_eq(cell, &once) && !cell.initialized()) {
                cache.remove(envelope_id);
            }
        }
        found
    }

    /// Whether the user holds an account in the currency: a linearizable
    /// read at the user's pair, batched with other callers' (a positive
    /// answer is remembered). A slice that moved under the check sends the
    /// caller back to plan again. A cell of a build without `HoldsAccounts`
    /// (met during a rolling upgrade, cells upgraded after routers) is asked
    /// with `GetAccount`, one user per call.
    async fn account_exists(
        &self,
        user_id: u64,
        pair_id: u64,
        currency: &str,
        deadline: Instant,
    ) -> Result<bool, Status> {
        let key = (user_id, currency.to_string());
        if self.accounts.lock().expect("cache lock").contains(&key) {
            return Ok(true);
        }
        let ask = cellbank_proto::cell::AccountKey { user_id, currency: currency.to_string() };
        let held = match self.account_checks.submit(pair_id, ask, deadline).await {
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                let request = GetAccountRequest { user_id, currency: currency.to_string() };
                let read = self
                    .pool
                    .call(reading(user_id), deadline, request, |mut c, req| async move { c.get_account(req).await })
                    .await;
                match read {
                    Ok(_) => true,
                    Err(status) if status.code() == tonic::Code::NotFound => false,
                    Err(status) => return Err(status),
                }
            }
            held => held?,
        };
        if held {
            remember(&self.accounts, key);
        }
        Ok(held)
    }

    /// Cross-cell transfers of one sender pair.
    async fn send_cross_cell(
        pool: &CellPool,
        source_pair_id: u64,
        plan_holds: &(dyn Fn(&cellbank_proto::router::RoutingTable) -> bool + Sync),
        deadline: Instant,
        batch: &cellbank_proto::cell::CrossCellBatch,
    ) -> Result<Vec<TransferResult>, Status> {
        let response = pool
            .call_clearing_planned(to_pair(source_pair_id), plan_holds, deadline, batch, |mut c, req| async move {
                c.send(req).await
            })
            .await?;
        if response.results.len() != batch.items.len() {
            return Err(Status::internal("a cell answered with the wrong number of results"));
        }
        Ok(response.results)
    }

    /// The cell's own validation of a movement (so a malformed request never
    /// leaves the router); the error names the field.
    fn check_move(kind: TransferKind, r: &TransferRequest) -> Result<(), validate::Invalid> {
        let command = cellbank_proto::cell::MoveCommand {
            transfer_id: r.transfer_id.clone(),
            kind: kind as i32,
            from_user_id: r.from_user_id,
            to_user_id: r.to_user_id,
            currency: r.currency.clone(),
            amount: r.amount,
            ..Default::default()
        };
        validate::move_command(&command).map(|_| ())
    }
}

#[tonic::async_trait]
impl LedgerApi for Front {
    async fn open_account(
        &self,
        request: Request<OpenAccountRequest>,
    ) -> Result<Response<OpenAccountResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::OpenAccount, &[])?;
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        self.pool.record(r.user_id, Kind::Write, r.encoded_len());
        let response = self
            .pool
            .call(by_user(r.user_id), deadline, r.clone(), |mut c, req| async move { c.open_account(req).await })
            .await?;
        if response.code == ResultCode::Ok as i32 || response.code == ResultCode::AccountAlreadyExists as i32 {
            remember(&self.accounts, (r.user_id, r.currency));
        }
        Ok(Response::new(response))
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::Deposit, &[])?;
        let namespace = namespace_of(&request);
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        validate::in_namespace(namespace.as_deref(), &mut r.transfer_id).map_err(invalid)?;
        let check = TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: r.transfer_id.clone(),
            from_user_id: 0,
            to_user_id: r.user_id,
            currency: r.currency.clone(),
            amount: r.amount,
        };
        Front::check_move(TransferKind::Deposit, &check).map_err(invalid)?;
        self.pool.record(r.user_id, Kind::Write, r.encoded_len());
        let response =
            self.pool.call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.deposit(req).await }).await?;
        Ok(Response::new(response))
    }

    async fn withdraw(&self, request: Request<WithdrawRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::Withdraw, &[request.get_ref().user_id])?;
        let namespace = namespace_of(&request);
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        validate::in_namespace(namespace.as_deref(), &mut r.transfer_id).map_err(invalid)?;
        let check = TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: r.transfer_id.clone(),
            from_user_id: r.user_id,
            to_user_id: 0,
            currency: r.currency.clone(),
            amount: r.amount,
        };
        Front::check_move(TransferKind::Withdraw, &check).map_err(invalid)?;
        self.pool.record(r.user_id, Kind::Write, r.encoded_len());
        let response =
            self.pool.call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.withdraw(req).await }).await?;
        Ok(Response::new(response))
    }

    async fn transfer(&self, request: Request<TransferRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::Transfer, &[request.get_ref().from_user_id])?;
        let namespace = namespace_of(&request);
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        validate::in_namespace(namespace.as_deref(), &mut r.transfer_id).map_err(invalid)?;
        Front::check_move(TransferKind::Transfer, &r).map_err(invalid)?;
        self.pool.record(r.from_user_id, Kind::Write, r.encoded_len());
        let (from, to) = (r.from_user_id, r.to_user_id);
        // Planned again whenever a slice moves under the plan (a retry of
        // a transfer id is answered as first recorded, wherever it goes).
        loop {
            let routes = {
                let table = self.pool.table_view().borrow();
                table::route(&table, from).zip(table::route(&table, to))
            };
            let plan = routes.as_ref().map(|(a, b)| (a.pair_id, b.pair_id));
            let moving = routes.as_ref().is_some_and(|(a, b)| a.moving || b.moving);
            let outcome =
                match plan {
                    Some((source, dest)) if source != dest => {
                        let holds = move |t: &cellbank_proto::router::RoutingTable| {
                            table::route(t, from).map(|r| r.pair_id) == Some(source)
                        };
                        let item = cellbank_proto::cell::CrossCellItem {
                            transfer: Some(r.clone()),
                            source_pair_id: source,
                            dest_pair_id: dest,
                        };
                        let batch = cellbank_proto::cell::CrossCellBatch { items: vec![item] };
                        Front::send_cross_cell(&self.pool, source, &holds, deadline, &batch)
                            .await
                            .map(|mut results| TransferResponse { result: results.pop() })
                    }
                    // Coalesced with other callers' transfers into this
                    // pair, unless a slice of its users is moving (the direct
                    // call below waits for the move to end) or the call is
                    // traced (its trace follows it alone to the cell).
                    Some((pair_id, _)) if !moving && !cellbank_client::trace::sampled() => self
                        .transfers
                        .submit(pair_id, vec![r.clone()], deadline)
                        .await
                        .map(|mut results| TransferResponse { result: results.pop() }),
                    _ => {
                        let holds = move |t: &cellbank_proto::router::RoutingTable| {
                            plan.is_none() || pairs_in(t, from, to) == plan
                        };
                        self.pool
                            .call_planned(by_user(from), &holds, deadline, &r, |mut c, req| async move {
                                c.transfer(req).await
                            })
                            .await
                    }
                };
            match outcome {
                Err(status) if crate::cells::is_replan(&status) => continue,
                outcome => return outcome.map(Response::new),
            }
        }
    }

    async fn submit_transfers(
        &self,
        request: Request<SubmitTransfersRequest>,
    ) -> Result<Response<SubmitTransfersResponse>, Status> {
        let deadline = deadline_of(&request);
        let debits: Vec<u64> = request.get_ref().transfers.iter().map(|t| t.from_user_id).collect();
        self.allow(&request, Operation::SubmitTransfers, &debits)?;
        let namespace = namespace_of(&request);
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
        // Whether a cell recorded any item of this call (a malformed item's
        // result, given here, is not a record).
        let mut recorded = false;
        // The valid items, planned (and planned again when a slice of
        // their plan moves) until each has its result.
        let mut pending: Vec<(usize, TransferRequest)> = Vec::with_capacity(items.len());
        {
            let table = self.pool.table_view().borrow();
            if table.slice_count == 0 {
                return Err(Status::unavailable("the routing table is not ready yet"));
            }
            // Valid items count at their sender's slice.
            let mut load = Vec::with_capacity(items.len());
            for (position, mut item) in items.into_iter().enumerate() {
                let checked = validate::take_transfer_id(&mut item)
                    .and_then(|()| validate::in_namespace(namespace.as_deref(), &mut item.transfer_id))
                    .and_then(|()| Front::check_move(TransferKind::Transfer, &item));
                if let Err(error) = checked {
                    results[position] = Some(TransferResult {
                        code: ResultCode::InvalidItem as i32,
                        field: error.field.to_string(),
                        detail: error.detail,
                        ..Default::default()
                    });
                    continue;
                }
                load.push((item.from_user_id, Kind::Write, item.encoded_len()));
                pending.push((position, item));
            }
            self.pool.load().record_many(&table, load);
        }
        while !pending.is_empty() {
            // pair id -> (positions, items, whether a slice of theirs moves)
            let mut parts: std::collections::BTreeMap<u64, (Vec<usize>, Vec<TransferRequest>, bool)> =
                Default::default();
            // sender pair id -> (positions, cross-cell items)
            let mut cross: std::collections::BTreeMap<u64, (Vec<usize>, Vec<cellbank_proto::cell::CrossCellItem>)> =
                Default::default();
            {
                let table = self.pool.table_view().borrow();
                for (position, item) in pending.drain(..) {
                    let from = table::route(&table, item.from_user_id).expect("bootstrapped table routes every user");
                    let to = table::route(&table, item.to_user_id).expect("bootstrapped table routes every user");
                    if from.pair_id != to.pair_id {
                        let part = cross.entry(from.pair_id).or_default();
                        part.0.push(position);
                        part.1.push(cellbank_proto::cell::CrossCellItem {
                            transfer: Some(item),
                            source_pair_id: from.pair_id,
                            dest_pair_id: to.pair_id,
                        });
                        continue;
                    }
                    let part = parts.entry(from.pair_id).or_default();
                    part.0.push(position);
                    part.1.push(item);
                    part.2 |= from.moving || to.moving;
                }
            }
            let traced = cellbank_client::trace::sampled();
            let local_calls = parts.into_iter().map(|(pair_id, (positions, transfers, moving))| {
                let pool = self.pool.clone();
                async move {
                    // Coalesced with other calls' items bound for this pair
                    // (small batches from many callers make few, larger
                    // cell calls), unless a slice moves or the call is
                    // traced: as for a unary transfer. The part travels
                    // whole, in order, in one cell call.
                    if !moving && !traced && transfers.len() <= COALESCED_PART_MAX {
                        return match self.transfers.submit(pair_id, transfers.clone(), deadline).await {
                            Ok(results) => Ok((positions.into_iter().zip(results).collect(), Vec::new())),
                            Err(status) if crate::cells::is_replan(&status) => {
                                Ok((Vec::new(), positions.into_iter().zip(transfers).collect()))
                            }
                            Err(status) => Err(status),
                        };
                    }
                    // Every item's two users are still in this pair.
                    let users: Vec<(u64, u64)> = transfers.iter().map(|t| (t.from_user_id, t.to_user_id)).collect();
                    let holds = move |t: &cellbank_proto::router::RoutingTable| {
                        users.iter().all(|(a, b)| pairs_in(t, *a, *b) == Some((pair_id, pair_id)))
                    };
                    let message = SubmitTransfersRequest { transfers };
                    let outcome = pool
                        .call_planned(to_pair(pair_id), &holds, deadline, &message, |mut c, req| async move {
                            c.submit_transfers(req).await
                        })
                        .await;
                    let response = match outcome {
                        Ok(response) => response,
                        Err(status) if crate::cells::is_replan(&status) => {
                            return Ok((Vec::new(), positions.into_iter().zip(message.transfers).collect::<Vec<_>>()))
                        }
                        Err(status) => return Err(status),
                    };
                    if response.results.len() != positions.len() {
                        return Err(Status::internal("a cell answered with the wrong number of results"));
                    }
                    Ok::<_, Status>((positions.into_iter().zip(response.results).collect(), Vec::new()))
                }
            });
            let cross_calls = cross.into_iter().map(|(pair_id, (positions, items))| {
                let pool = self.pool.clone();
                async move {
                    // Every item's sender is still in this pair (a credit
                    // follows its recipient by itself).
                    let senders: Vec<u64> =
                        items.iter().map(|i| i.transfer.as_ref().map(|t| t.from_user_id).unwrap_or(0)).collect();
                    let holds = move |t: &cellbank_proto::router::RoutingTable| {
                        senders.iter().all(|u| table::route(t, *u).map(|r| r.pair_id) == Some(pair_id))
                    };
                    let batch = cellbank_proto::cell::CrossCellBatch { items };
                    match Front::send_cross_cell(&pool, pair_id, &holds, deadline, &batch).await {
                        Ok(results) => Ok::<_, Status>((positions.into_iter().zip(results).collect(), Vec::new())),
                        Err(status) if crate::cells::is_replan(&status) => Ok((
                            Vec::new(),
                            positions.into_iter().zip(batch.items.into_iter().filter_map(|i| i.transfer)).collect(),
                        )),
                        Err(status) => Err(status),
                    }
                }
            });
            let (local, remote) =
                futures::future::join(futures::future::join_all(local_calls), futures::future::join_all(cross_calls))
                    .await;
            let mut failed = None;
            for part in local.into_iter().chain(remote) {
                match part {
                    Ok((done, again)) => {
                        recorded |= !done.is_empty();
                        for (position, result) in done {
                            results[position] = Some(result);
                        }
                        pending.extend(again);
                    }
                    // One status answers the call: the first part's that failed.
                    Err(status) => {
                        failed.get_or_insert(status);
                    }
                }
            }
            if let Some(status) = failed {
                return Err(part_failed(status, recorded));
            }
            if !pending.is_empty() {
                // A slice moved under the plan: wait for the table's news.
                if Instant::now() >= deadline {
                    return Err(Status::deadline_exceeded("slices kept moving under this call until its deadline"));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let results = results.into_iter().map(|r| r.expect("every item has a result")).collect();
        Ok(Response::new(SubmitTransfersResponse { results }))
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::GetAccount, &[])?;
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        self.pool.record(r.user_id, Kind::Read, r.encoded_len());
        let response = self
            .pool
            .call(reading(r.user_id), deadline, r, |mut c, req| async move { c.get_account(req).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn get_transfer(
        &self,
        request: Request<GetTransferRequest>,
    ) -> Result<Response<GetTransferResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::GetTransfer, &[])?;
        let namespace = namespace_of(&request);
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        validate::lookup_in_namespace(namespace.as_deref(), &mut r.transfer_id).map_err(invalid)?;
        let pairs: Vec<u64> = self.pool.table().pairs.iter().map(|p| p.pair_id).collect();
        if pairs.is_empty() {
            return Err(Status::unavailable("the routing table is not ready yet"));
        }
        let asks = pairs.into_iter().map(|pair_id| {
            let pool = self.pool.clone();
            let message = r.clone();
            async move {
                pool.call(to_pair(pair_id), deadline, message, |mut c, req| async move { c.get_transfer(req).await })
                    .await
            }
        });
        let mut failure = None;
        for answer in futures::future::join_all(asks).await {
            match answer {
                Ok(mut found) => {
                    if let Some(record) = found.transfer.as_mut() {
                        as_known(namespace.as_deref(), record);
                    }
                    return Ok(Response::new(found));
                }
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => failure = Some(status),
            }
        }
        Err(failure.unwrap_or_else(|| Status::not_found("no transfer with this transfer_id")))
    }

    async fn list_transfers(
        &self,
        request: Request<ListTransfersRequest>,
    ) -> Result<Response<ListTransfersResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::ListTransfers, &[])?;
        let namespace = namespace_of(&request);
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        self.pool.record(r.user_id, Kind::Read, r.encoded_len());
        let mut response = self
            .pool
            .call(reading(r.user_id), deadline, r, |mut c, req| async move { c.list_transfers(req).await })
            .await?;
        for record in &mut response.transfers {
            as_known(namespace.as_deref(), record);
        }
        Ok(Response::new(response))
    }

    async fn send_envelope(
        &self,
        request: Request<SendEnvelopeRequest>,
    ) -> Result<Response<SendEnvelopeResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::SendEnvelope, &[request.get_ref().sender_user_id])?;
        let namespace = namespace_of(&request);
        let mut r = request.into_inner();
        validate::take_transfer_id(&mut r).map_err(invalid)?;
        validate::in_namespace(namespace.as_deref(), &mut r.transfer_id).map_err(invalid)?;
        validate::user_id("sender_user_id", r.sender_user_id).map_err(invalid)?;
        self.pool.record(r.sender_user_id, Kind::Write, r.encoded_len());
        let response = self
            .pool
            .call(by_user(r.sender_user_id), deadline, r, |mut c, req| async move { c.send_envelope(req).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn grab_envelope(
        &self,
        request: Request<GrabEnvelopeRequest>,
    ) -> Result<Response<GrabEnvelopeResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::GrabEnvelope, &[])?;
        let r = request.into_inner();
        let sender = validate::envelope_id(&r.envelope_id).map_err(invalid)?;
        validate::user_id("user_id", r.user_id).map_err(invalid)?;
        // A grab takes its share in the envelope's cell (the sender's).
        self.pool.record(sender, Kind::Write, r.encoded_len());
        if self.forbid_own_grab && r.user_id == sender {
            return Ok(Response::new(refused(
                ResultCode::OwnEnvelope,
                "user_id",
                "senders may not grab their own envelope".into(),
            )));
        }
        loop {
            match self.grab_planned(&r, sender, deadline).await {
                Err(status) if crate::cells::is_replan(&status) => continue,
                outcome => return outcome.map(Response::new),
            }
        }
    }

    async fn get_envelope(
        &self,
        request: Request<GetEnvelopeRequest>,
    ) -> Result<Response<GetEnvelopeResponse>, Status> {
        self.get_envelope_of(request).await
    }
}

impl Front {
    /// A grab planned from the table as it is now (see `grab_envelope`).
    async fn grab_planned(
        &self,
        r: &GrabEnvelopeRequest,
        sender: u64,
        deadline: Instant,
    ) -> Result<GrabEnvelopeResponse, Status> {
        let Some((envelope_pair_id, grabber_pair_id)) = self.pairs_of(sender, r.user_id) else {
            return Err(Status::unavailable("the routing table is not ready yet"));
        };
        if envelope_pair_id != grabber_pair_id {
            // The credit would be refused in the grabber's cell: refuse the
            // grab now, before a share is taken.
            let currency = self.envelope_currency(&r.envelope_id, sender, deadline).await.or_else(|status| {
                if status.code() == tonic::Code::NotFound {
                    Ok(String::new())
                } else {
                    Err(status)
                }
            })?;
            if currency.is_empty() {
                return Ok(refused(ResultCode::EnvelopeNotFound, "envelope_id", "no such envelope".into()));
            }
            if !self.account_exists(r.user_id, grabber_pair_id, &currency, deadline).await? {
                return Ok(refused(
                    ResultCode::AccountNotFound,
                    "user_id",
                    format!("user {} has no {currency} account", r.user_id),
                ));
            }
        }
        let item = cellbank_proto::cell::GrabItem {
            envelope_id: r.envelope_id.clone(),
            user_id: r.user_id,
            envelope_pair_id,
            grabber_pair_id,
            forbid_own: self.forbid_own_grab,
        };
        let pair_id = item.envelope_pair_id;
        self.grabs.submit(pair_id, item, deadline).await
    }

    async fn get_envelope_of(
        &self,
        request: Request<GetEnvelopeRequest>,
    ) -> Result<Response<GetEnvelopeResponse>, Status> {
        let deadline = deadline_of(&request);
        self.allow(&request, Operation::GetEnvelope, &[])?;
        let r = request.into_inner();
        let sender = validate::envelope_id(&r.envelope_id).map_err(invalid)?;
        self.pool.record(sender, Kind::Read, r.encoded_len());
        let response =
            self.pool.call(reading(sender), deadline, r, |mut c, req| async move { c.get_envelope(req).await }).await?;
        Ok(Response::new(response))
    }
}
