//! Coalescing of calls bound for one pair: concurrent grabs leave this
//! router as one `Clearing.Grab` call, and concurrent same-pair unary
//! transfers as one `SubmitTransfers` call. A hot envelope grabbed by
//! thousands at once costs a handful of calls and Raft entries, and a cell
//! under many unary writers answers a few batched calls instead of one
//! HTTP/2 stream per transfer. No grab waits for another's cross-cell
//! credit (the cell answers once the grab is applied; credits travel later
//! through the outbox).
//!
//! Per pair and kind, one task takes what has queued up (at most
//! [`Batched::BATCH_MAX`]) and sends it; up to [`Batched::IN_FLIGHT_MAX`]
//! such calls run at once, so a lone caller goes out at once and callers
//! pile up into batches only while earlier calls are in flight.
//!
//! A failed call fails each of its items with the call's status (a slice
//! that moved under the batch's plan included: each caller plans again).
//! Grabs are idempotent per (envelope, user) and transfers per transfer id,
//! so a client's retry is safe; a batch's item gets the very result the
//! cell gives that item alone.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cellbank_proto::cell::{AccountKey, AccountKeys, GrabBatch, GrabItem};
use cellbank_proto::router::RoutingTable;
use cellbank_proto::v1::{GrabEnvelopeResponse, SubmitTransfersRequest, TransferRequest, TransferResult};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use crate::cells::CellPool;
use crate::table;

/// Items waiting per pair before callers are pushed back.
pub const QUEUE_MAX: usize = 65_536;

/// A kind of call that many callers' items share.
pub trait Batched: Send + Sync + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// Most items in one call.
    const BATCH_MAX: usize;
    /// Calls of this kind in flight per pair.
    const IN_FLIGHT_MAX: usize;
    /// What a caller whose deadline passed is told.
    fn timed_out() -> Status;
    /// Sends `items` to `pair_id`'s active cell: one answer per item, in order.
    fn call(
        pool: Arc<CellPool>,
        pair_id: u64,
        items: Vec<Self::Item>,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<Vec<Self::Answer>, Status>> + Send;
}

type Reply<A> = oneshot::Sender<Result<A, Status>>;

struct Waiting<B: Batched> {
    item: B::Item,
    deadline: Instant,
    reply: Reply<B::Answer>,
    /// The client call it serves, for the router's per-method counts.
    path: Option<tonic::codegen::http::Uri>,
}

pub struct Batcher<B: Batched> {
    pool: Arc<CellPool>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Waiting<B>>>>,
    kind: PhantomData<B>,
}

impl<B: Batched> Batcher<B> {
    pub fn new(pool: Arc<CellPool>) -> Batcher<B> {
        Batcher { pool, queues: Mutex::new(HashMap::new()), kind: PhantomData }
    }

    fn queue(&self, pair_id: u64) -> mpsc::Sender<Waiting<B>> {
        let mut queues = self.queues.lock().expect("batch queues lock");
        queues
            .entry(pair_id)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_MAX);
                tokio::spawn(run::<B>(self.pool.clone(), pair_id, rx));
                tx
            })
            .clone()
    }

    /// One item, answered when its batch is.
    pub async fn submit(&self, pair_id: u64, item: B::Item, deadline: Instant) -> Result<B::Answer, Status> {
        let (reply, answer) = oneshot::channel();
        let path = cellbank_client::gate::call_path();
        self.queue(pair_id)
            .try_send(Waiting { item, deadline, reply, path })
            .map_err(|_| Status::resource_exhausted("too many calls waiting for this cell; retry"))?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Status::unavailable("the router is stopping")),
            Err(_) => Err(B::timed_out()),
        }
    }
}

async fn run<B: Batched>(pool: Arc<CellPool>, pair_id: u64, mut queue: mpsc::Receiver<Waiting<B>>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(B::IN_FLIGHT_MAX));
    loop {
        // Wait for a free call slot first, so items pile up meanwhile.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let Some(first) = queue.recv().await else { return };
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(waiting) = next.take() {
            // A caller that went away, or whose deadline passed while it
            // waited here, is not sent: its deadline must not cut short
            // the others' call.
            match (waiting.reply.is_closed(), waiting.deadline <= Instant::now()) {
                (true, _) => {}
                (false, true) => {
                    let _ = waiting.reply.send(Err(B::timed_out()));
                }
                (false, false) => batch.push(waiting),
            }
            if batch.len() < B::BATCH_MAX {
                next = queue.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        let path = batch[0].path.clone();
        let send = async move {
            // Each caller waits for its answer only until its own deadline
            // (`submit`); the call lasts until the latest of them.
            let deadline = batch.iter().map(|w| w.deadline).max().expect("a batch is never empty");
            let (items, replies): (Vec<B::Item>, Vec<Reply<B::Answer>>) =
                batch.into_iter().map(|w| (w.item, w.reply)).unzip();
            match B::call(pool, pair_id, items, deadline).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                outcome => {
                    let status = outcome
                        .err()
                        .unwrap_or_else(|| Status::internal("a cell answered with the wrong number of results"));
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
            drop(permit);
        };
        match path {
            Some(path) => tokio::spawn(cellbank_client::gate::as_call(path, send)),
            None => tokio::spawn(send),
        };
    }
}

/// Envelope grabs, batched per envelope pair into `Clearing.Grab`.
pub struct Grabs;

impl Batched for Grabs {
    type Item = GrabItem;
    type Answer = GrabEnvelopeResponse;
    const BATCH_MAX: usize = 4096;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded(
            "the grab did not complete in time; its outcome is unknown: grab again (a second grab answers \
             ALREADY_GRABBED with the share if the first applied)",
        )
    }

    async fn call(
        pool: Arc<CellPool>,
        pair_id: u64,
        items: Vec<GrabItem>,
        deadline: Instant,
    ) -> Result<Vec<GrabEnvelopeResponse>, Status> {
        // Each grab's plan: the envelope's and the grabber's pairs. A slice
        // that moves under it sends the grabs back to be planned again
        // (nothing of the batch applied).
        let plans: Vec<(u64, u64, u64, u64)> = items
            .iter()
            .map(|item| {
                let sender = cellbank_client::validate::envelope_id(&item.envelope_id).unwrap_or(0);
                (sender, item.envelope_pair_id, item.user_id, item.grabber_pair_id)
            })
            .collect();
        let holds = move |t: &RoutingTable| {
            plans.iter().all(|(sender, envelope_pair, grabber, grabber_pair)| {
                table::route(t, *sender).map(|r| r.pair_id) == Some(*envelope_pair)
                    && table::route(t, *grabber).map(|r| r.pair_id) == Some(*grabber_pair)
            })
        };
        let message = GrabBatch { items };
        let response = pool
            .call_clearing_planned(table::to_pair(pair_id), &holds, deadline, &message, |mut c, req| async move {
                c.grab(req).await
            })
            .await?;
        Ok(response.results)
    }
}

/// Unary transfers whose two users share a pair, batched per pair into
/// `SubmitTransfers`. Items come validated by the router (the cell's own
/// rules), so the cell answers each as it would answer it alone.
pub struct Transfers;

impl Batched for Transfers {
    type Item = TransferRequest;
    type Answer = TransferResult;
    const BATCH_MAX: usize = cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded(
            "the transfer did not complete in time; its outcome is unknown: retry with the same transfer_id",
        )
    }

    async fn call(
        pool: Arc<CellPool>,
        pair_id: u64,
        transfers: Vec<TransferRequest>,
        deadline: Instant,
    ) -> Result<Vec<TransferResult>, Status> {
        // Every item's two users are still in this pair, and neither's
        // slice started moving: a move sends the callers back to plan
        // again, and the direct call then waits for the move to end (a
        // batch would be refused by the freeze and sent again, whole,
        // through the source's log until the move ended).
        let users: Vec<(u64, u64)> = transfers.iter().map(|t| (t.from_user_id, t.to_user_id)).collect();
        let holds = move |t: &RoutingTable| {
            let here = |user: u64| table::route(t, user).is_some_and(|r| r.pair_id == pair_id && !r.moving);
            users.iter().all(|(a, b)| here(*a) && here(*b))
        };
        let message = SubmitTransfersRequest { transfers };
        let response = pool
            .call_planned(table::to_pair(pair_id), &holds, deadline, &message, |mut c, req| async move {
                c.submit_transfers(req).await
            })
            .await?;
        Ok(response.results)
    }
}

/// The routers' check that cross-cell grabbers hold an account in the
/// envelope's currency, batched per grabber pair into `HoldsAccounts` (a
/// hot envelope's first grabs ask for thousands of users at once).
pub struct AccountChecks;

impl Batched for AccountChecks {
    type Item = AccountKey;
    type Answer = bool;
    const BATCH_MAX: usize = cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded("the grabber's cell did not say in time whether the grabber holds an account")
    }

    async fn call(
        pool: Arc<CellPool>,
        pair_id: u64,
        accounts: Vec<AccountKey>,
        deadline: Instant,
    ) -> Result<Vec<bool>, Status> {
        // Every user is still in this pair.
        let users: Vec<u64> = accounts.iter().map(|a| a.user_id).collect();
        let holds =
            move |t: &RoutingTable| users.iter().all(|u| table::route(t, *u).map(|r| r.pair_id) == Some(pair_id));
        let message = AccountKeys { accounts };
        let response = pool
            .call_clearing_planned(table::to_pair(pair_id), &holds, deadline, &message, |mut c, req| async move {
                c.holds_accounts(req).await
            })
            .await?;
        Ok(response.held)
    }
}
