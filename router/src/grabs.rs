//! Coalescing of calls bound for one pair: concurrent grabs leave this
//! router as one `Clearing.Grab` call, and concurrent same-pair unary
//! transfers as one `SubmitTransfers` call. A hot envelope grabbed by
//! thousands at once costs a handful of calls and Raft entries, and a cell
//! under many unary writers answers a few batched calls instead of one
//! HTTP/2 stream per transfer. No grab waits for another's cross-cell
//! credit (the cell answers once the grab is applied; credits travel later
//! through the outbox).
//!
//! Per pair and kind, one queue of [`cellbank_client::batch`] takes what
//! has queued up and sends it; a lone caller goes out at once, and callers
//! pile up into batches only while earlier calls are in flight.
//!
//! A failed call fails each of its items with the call's status (a slice
//! that moved under the batch's plan included: each caller plans again).
//! Grabs are idempotent per (envelope, user) and transfers per transfer id,
//! so a client's retry is safe; a batch's item gets the very result the
//! cell gives that item alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cellbank_client::batch::{Batched, Queue};
use cellbank_proto::cell::{AccountKey, AccountKeys, GrabBatch, GrabItem};
use cellbank_proto::router::RoutingTable;
use cellbank_proto::v1::{GrabEnvelopeResponse, SubmitTransfersRequest, TransferRequest, TransferResult};
use tokio::time::Instant;
use tonic::Status;

use crate::cells::CellPool;
use crate::table;

/// Where a batch goes: the pool, and the pair whose active cell answers.
pub type PairTarget = (Arc<CellPool>, u64);

/// One queue per pair for one kind of batched call.
pub struct Batcher<B: Batched<Target = PairTarget>> {
    pool: Arc<CellPool>,
    queues: Mutex<HashMap<u64, Queue<B>>>,
}

impl<B: Batched<Target = PairTarget>> Batcher<B> {
    pub fn new(pool: Arc<CellPool>) -> Batcher<B> {
        Batcher { pool, queues: Mutex::new(HashMap::new()) }
    }

    fn queue(&self, pair_id: u64) -> Queue<B> {
        let mut queues = self.queues.lock().expect("batch queues lock");
        queues.entry(pair_id).or_insert_with(|| Queue::new((self.pool.clone(), pair_id))).clone()
    }

    /// One item, answered when its batch is.
    pub async fn submit(&self, pair_id: u64, item: B::Item, deadline: Instant) -> Result<B::Answer, Status> {
        self.queue(pair_id).submit(item, deadline).await
    }
}

/// Envelope grabs, batched per envelope pair into `Clearing.Grab`.
pub struct Grabs;

impl Batched for Grabs {
    type Target = PairTarget;
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
        (pool, pair_id): PairTarget,
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

/// Each caller queues its transfers as one item (one for a unary call, a
/// `SubmitTransfers` part for a batch): they travel in one call, in order,
/// and the cell applies them in that order.
impl Batched for Transfers {
    type Target = PairTarget;
    type Item = Vec<TransferRequest>;
    type Answer = Vec<TransferResult>;
    const BATCH_MAX: usize = cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded(
            "the transfer did not complete in time; its outcome is unknown: retry with the same transfer_id",
        )
    }

    fn weight(transfers: &Vec<TransferRequest>) -> usize {
        transfers.len()
    }

    async fn call(
        (pool, pair_id): PairTarget,
        groups: Vec<Vec<TransferRequest>>,
        deadline: Instant,
    ) -> Result<Vec<Vec<TransferResult>>, Status> {
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        let transfers: Vec<TransferRequest> = groups.into_iter().flatten().collect();
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
        if response.results.len() != message.transfers.len() {
            return Err(Status::internal("a cell answered with the wrong number of results"));
        }
        // Back to each caller, in its order.
        let mut results = response.results.into_iter();
        Ok(sizes.into_iter().map(|size| results.by_ref().take(size).collect()).collect())
    }
}

/// The routers' check that cross-cell grabbers hold an account in the
/// envelope's currency, batched per grabber pair into `HoldsAccounts` (a
/// hot envelope's first grabs ask for thousands of users at once).
pub struct AccountChecks;

impl Batched for AccountChecks {
    type Target = PairTarget;
    type Item = AccountKey;
    type Answer = bool;
    const BATCH_MAX: usize = cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded("the grabber's cell did not say in time whether the grabber holds an account")
    }

    async fn call(
        (pool, pair_id): PairTarget,
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
