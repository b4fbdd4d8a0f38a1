//! Opt-in coalescing of a service's unary transfers: [`TransferCoalescer`]
//! takes one transfer per caller, as `Ledger.Transfer` does, and sends
//! whatever its callers have queued as one `SubmitTransfers` call to a
//! router. A service with many concurrent callers pays one HTTP/2 stream
//! and one router call per batch instead of per transfer.
//!
//! Each caller gets what `Transfer` would have told it alone:
//! - the item's result (OK, a duplicate, a refusal such as
//!   INSUFFICIENT_FUNDS), or
//! - INVALID_ARGUMENT naming the field, for an item the router finds
//!   malformed (the batch answers it as an INVALID_ITEM result), or
//! - the call's status when the whole call failed (each caller may retry
//!   with the same transfer id, as after a failed `Transfer`).
//!
//! A batch refused or failed as a whole (PERMISSION_DENIED because one
//! item's sender is outside the service's scope, or a failure after which
//! some items may have applied) is sent again one transfer per `Transfer`
//! call, with the same transfer ids, so that each caller hears its own
//! answer (one whose transfer had applied hears it as a duplicate). Not
//! after DEADLINE_EXCEEDED, CANCELLED, RESOURCE_EXHAUSTED or
//! UNAUTHENTICATED: those reach every caller, whose outcome is then unknown
//! (retry with the same transfer id, never a new one). The service's
//! identity needs the `transfer` and `submit_transfers` scopes. The
//! coalescer calls through the channel it is given and does not retry or
//! follow leaders itself (the routers do that toward cells). Per-call
//! metadata of the callers (trace context) does not travel: the batch
//! carries the metadata the coalescer was made with.

use std::time::Duration;

use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::{ResultCode, SubmitTransfersRequest, TransferRequest, TransferResult};
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::batch::{Batched, Queue};

/// Coalesces concurrent unary transfers into `SubmitTransfers` calls.
/// Cheap to clone; the clones share one queue.
#[derive(Clone)]
pub struct TransferCoalescer {
    queue: Queue<Coalesced>,
}

impl TransferCoalescer {
    /// Sends through `client` (a channel to the routers) with `metadata` on
    /// every call (the service's token, if it uses one). Must be called
    /// within a tokio runtime.
    pub fn new(client: LedgerClient<Channel>, metadata: MetadataMap) -> TransferCoalescer {
        TransferCoalescer { queue: Queue::new((client, metadata)) }
    }

    /// One transfer, answered as `Ledger.Transfer` would answer it, within
    /// `timeout` (after which its outcome is unknown: retry with the same
    /// transfer id).
    pub async fn transfer(&self, request: TransferRequest, timeout: Duration) -> Result<TransferResult, Status> {
        self.queue.submit(request, Instant::now() + timeout).await?
    }
}

/// The batch kind behind [`TransferCoalescer`].
pub struct Coalesced;

impl Batched for Coalesced {
    type Target = (LedgerClient<Channel>, MetadataMap);
    type Item = TransferRequest;
    type Answer = Result<TransferResult, Status>;
    const BATCH_MAX: usize = SUBMIT_TRANSFERS_ITEMS_MAX;
    const IN_FLIGHT_MAX: usize = 4;

    fn timed_out() -> Status {
        Status::deadline_exceeded(
            "the transfer did not complete in time; its outcome is unknown: retry with the same transfer_id",
        )
    }

    async fn call(
        (client, metadata): Self::Target,
        transfers: Vec<TransferRequest>,
        deadline: Instant,
    ) -> Result<Vec<Self::Answer>, Status> {
        // Kept for a batch that has to go again one by one.
        let alone = transfers.clone();
        match client.clone().submit_transfers(request(SubmitTransfersRequest { transfers }, &metadata, deadline)).await
        {
            Ok(response) => Ok(response.into_inner().results.into_iter().map(as_unary).collect()),
            Err(status) if each_alone(&status) => {
                let each = alone.into_iter().map(|transfer| {
                    let mut client = client.clone();
                    let request = request(transfer, &metadata, deadline);
                    async move {
                        client.transfer(request).await.and_then(|response| {
                            response.into_inner().result.ok_or_else(|| Status::internal("a transfer without a result"))
                        })
                    }
                });
                Ok(futures::future::join_all(each).await)
            }
            Err(status) => Err(status),
        }
    }
}

/// Whether a batch refused or failed whole goes again one transfer per
/// call, so that each caller hears its own answer: a refusal of the batch
/// for one item (PERMISSION_DENIED: one sender outside the scope; or the
/// `submit_transfers` scope missing) or a failure that may have come after
/// some items applied. Not when time is up, the caller cancelled, the
/// router is shedding load (the same calls alone would add to it) or the
/// service is not who it says.
fn each_alone(status: &Status) -> bool {
    !matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted | Code::Unauthenticated)
}

/// A call of `message` with `metadata`, lasting until `deadline`.
fn request<T>(message: T, metadata: &MetadataMap, deadline: Instant) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata.clone();
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    request
}

/// A batch item's result as `Transfer` gives it: a malformed item is
/// INVALID_ARGUMENT naming its field.
fn as_unary(result: TransferResult) -> Result<TransferResult, Status> {
    if result.code == ResultCode::InvalidItem as i32 {
        return Err(crate::errors::invalid_argument(&result.field, &result.detail));
    }
    Ok(result)
}
