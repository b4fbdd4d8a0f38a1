//! Coalescing of envelope grabs: concurrent grabs bound for one pair leave
//! this router as one `Clearing.Grab` call, so a hot envelope grabbed by
//! thousands at once costs a handful of calls and Raft entries, and no grab
//! waits for another's cross-cell credit (the cell answers once the grab is
//! applied; credits travel later through the outbox).
//!
//! Per pair, one task takes what has queued up (at most [`GRAB_BATCH_MAX`])
//! and sends it; up to [`GRAB_CALLS_IN_FLIGHT_MAX`] such calls run at once.
//! A failed call fails each of its grabs with the call's status; grabs are
//! idempotent per (envelope, user), so a client's retry is safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cellbank_proto::cell::{GrabBatch, GrabItem};
use cellbank_proto::v1::GrabEnvelopeResponse;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use crate::cells::CellPool;
use crate::table;

pub const GRAB_BATCH_MAX: usize = 4096;
pub const GRAB_CALLS_IN_FLIGHT_MAX: usize = 4;
/// Grabs waiting per pair before callers are pushed back.
pub const GRAB_QUEUE_MAX: usize = 65_536;

type Reply = oneshot::Sender<Result<GrabEnvelopeResponse, Status>>;

struct Waiting {
    item: GrabItem,
    deadline: Instant,
    reply: Reply,
}

pub struct GrabBatcher {
    pool: Arc<CellPool>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Waiting>>>,
}

impl GrabBatcher {
    pub fn new(pool: Arc<CellPool>) -> GrabBatcher {
        GrabBatcher { pool, queues: Mutex::new(HashMap::new()) }
    }

    fn queue(&self, pair_id: u64) -> mpsc::Sender<Waiting> {
        let mut queues = self.queues.lock().expect("grab queues lock");
        queues
            .entry(pair_id)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(GRAB_QUEUE_MAX);
                tokio::spawn(run(self.pool.clone(), pair_id, rx));
                tx
            })
            .clone()
    }

    /// One grab, answered when its batch is applied.
    pub async fn grab(&self, item: GrabItem, deadline: Instant) -> Result<GrabEnvelopeResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue(item.envelope_pair_id)
            .try_send(Waiting { item, deadline, reply })
            .map_err(|_| Status::resource_exhausted("too many grabs waiting for this cell; retry"))?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Status::unavailable("the router is stopping")),
            Err(_) => Err(Status::deadline_exceeded(
                "the grab did not complete in time; its outcome is unknown: grab again (a second grab answers \
                 ALREADY_GRABBED with the share if the first applied)",
            )),
        }
    }
}

async fn run(pool: Arc<CellPool>, pair_id: u64, mut queue: mpsc::Receiver<Waiting>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(GRAB_CALLS_IN_FLIGHT_MAX));
    loop {
        // Wait for a free call slot first, so grabs pile up meanwhile.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let Some(first) = queue.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < GRAB_BATCH_MAX {
            match queue.try_recv() {
                Ok(waiting) => batch.push(waiting),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let deadline = batch.iter().map(|w| w.deadline).min().expect("a batch is never empty");
            let message = GrabBatch { items: batch.iter().map(|w| w.item.clone()).collect() };
            // Each grab's plan: the envelope's and the grabber's pairs. A
            // slice that moves under it sends the grabs back to be planned
            // again (nothing of the batch applied).
            let plans: Vec<(u64, u64, u64, u64)> = batch
                .iter()
                .map(|w| {
                    let sender = cellbank_client::validate::envelope_id(&w.item.envelope_id).unwrap_or(0);
                    (sender, w.item.envelope_pair_id, w.item.user_id, w.item.grabber_pair_id)
                })
                .collect();
            let holds = move |t: &cellbank_proto::router::RoutingTable| {
                plans.iter().all(|(sender, envelope_pair, grabber, grabber_pair)| {
                    table::route(t, *sender).map(|r| r.pair_id) == Some(*envelope_pair)
                        && table::route(t, *grabber).map(|r| r.pair_id) == Some(*grabber_pair)
                })
            };
            let outcome = pool
                .call_clearing_planned(table::to_pair(pair_id), &holds, deadline, &message, |mut c, req| async move {
                    c.grab(req).await
                })
                .await;
            match outcome {
                Ok(response) if response.results.len() == batch.len() => {
                    for (waiting, result) in batch.into_iter().zip(response.results) {
                        let _ = waiting.reply.send(Ok(result));
                    }
                }
                Ok(_) => {
                    for waiting in batch {
                        let _ = waiting
                            .reply
                            .send(Err(Status::internal("a cell answered with the wrong number of results")));
                    }
                }
                Err(status) => {
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(status.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}
