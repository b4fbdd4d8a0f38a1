//! Coalescing of concurrent calls into batched ones: callers queue their
//! items, and one task per queue sends whatever has queued as one call
//! (at most [`Batched::BATCH_MAX`] items), with up to
//! [`Batched::IN_FLIGHT_MAX`] such calls at once. A lone caller goes out at
//! once; callers pile up into batches only while earlier calls are in
//! flight, so coalescing adds no wait of its own.
//!
//! Each caller gets the answer the batch gives its item, and waits only
//! until its own deadline; the call lasts until the latest deadline among
//! its callers. A caller that went away, or whose deadline passed while it
//! queued, is left out of the call. A failed call fails each of its items
//! with the call's status.
//!
//! The routers batch grabs, unary transfers and account checks toward
//! cells this way; services opt in with [`crate::ledger::TransferCoalescer`].

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

/// Items waiting in one queue before callers are pushed back.
pub const QUEUE_MAX: usize = 65_536;

/// A kind of call that many callers' items share.
pub trait Batched: Send + Sync + 'static {
    /// Where a call goes (a channel, or a pool and a pair).
    type Target: Clone + Send + Sync + 'static;
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// Most items in one call.
    const BATCH_MAX: usize;
    /// Calls of this kind in flight per queue.
    const IN_FLIGHT_MAX: usize;
    /// What a caller whose deadline passed is told.
    fn timed_out() -> Status;
    /// How many of a call's [`Batched::BATCH_MAX`] places this caller's
    /// item takes (an item may be several that travel together, in order).
    fn weight(_item: &Self::Item) -> usize {
        1
    }
    /// Sends `items` to `target`: one answer per item, in order.
    fn call(
        target: Self::Target,
        items: Vec<Self::Item>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<Self::Answer>, Status>> + Send;
}

type Reply<A> = oneshot::Sender<Result<A, Status>>;

struct Waiting<B: Batched> {
    item: B::Item,
    deadline: Instant,
    reply: Reply<B::Answer>,
    /// The server call it serves, if any, for the server's per-method counts.
    path: Option<http::Uri>,
}

/// One queue and the task that empties it into calls to one target. The
/// task ends when the queue is dropped.
pub struct Queue<B: Batched> {
    sender: mpsc::Sender<Waiting<B>>,
}

impl<B: Batched> Clone for Queue<B> {
    fn clone(&self) -> Self {
        Queue { sender: self.sender.clone() }
    }
}

impl<B: Batched> Queue<B> {
    /// A queue whose calls go to `target`. Must be called within a tokio
    /// runtime (it spawns the queue's task).
    pub fn new(target: B::Target) -> Queue<B> {
        let (sender, receiver) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run::<B>(target, receiver));
        Queue { sender }
    }

    /// One item, answered when its batch is, or when `deadline` passes.
    pub async fn submit(&self, item: B::Item, deadline: Instant) -> Result<B::Answer, Status> {
        let (reply, answer) = oneshot::channel();
        let path = crate::gate::call_path();
        self.sender
            .try_send(Waiting { item, deadline, reply, path })
            .map_err(|_| Status::resource_exhausted("too many calls waiting to be sent; retry"))?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Status::unavailable("the batching task stopped")),
            Err(_) => Err(B::timed_out()),
        }
    }
}

async fn run<B: Batched>(target: B::Target, mut queue: mpsc::Receiver<Waiting<B>>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(B::IN_FLIGHT_MAX));
    // An item that did not fit in the previous call: the first of the next.
    let mut carried: Option<Waiting<B>> = None;
    loop {
        // Wait for a free call slot first, so items pile up meanwhile.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(waiting) => waiting,
            None => match queue.recv().await {
                Some(waiting) => waiting,
                None => return,
            },
        };
        let mut batch = Vec::new();
        let mut weight = 0;
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
                (false, false) => {
                    let item_weight = B::weight(&waiting.item);
                    if !batch.is_empty() && weight + item_weight > B::BATCH_MAX {
                        carried = Some(waiting);
                        break;
                    }
                    weight += item_weight;
                    batch.push(waiting);
                }
            }
            if weight < B::BATCH_MAX {
                next = queue.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let target = target.clone();
        let path = batch[0].path.clone();
        let send = async move {
            // Each caller waits for its answer only until its own deadline
            // (`submit`); the call lasts until the latest of them.
            let deadline = batch.iter().map(|w| w.deadline).max().expect("a batch is never empty");
            let (items, replies): (Vec<B::Item>, Vec<Reply<B::Answer>>) =
                batch.into_iter().map(|w| (w.item, w.reply)).unzip();
            match B::call(target, items, deadline).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                outcome => {
                    let status = outcome
                        .err()
                        .unwrap_or_else(|| Status::internal("a batch was answered with the wrong number of results"));
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
            drop(permit);
        };
        match path {
            Some(path) => tokio::spawn(crate::gate::as_call(path, send)),
            None => tokio::spawn(send),
        };
    }
}
