//! The routers' side of cross-cell credits: a source cell's courier hands
//! its credits to any router, which delivers each to the active cell of the
//! pair it names (the pair whose clearing account the source debited; the
//! table says which cell that is now, so credits follow failovers) through
//! `Clearing.ApplyCredits`, retrying within the call's deadline. The answer
//! per credit says whether the destination answered and what it said; the
//! courier settles only final answers.
//!
//! Sender authority: a batch names its sender (source pair, cell, epoch),
//! and is delivered only if the routing table names that cell the pair's
//! active at that epoch. A sender behind the table is refused with
//! FAILED_PRECONDITION and the table's epoch (it then records its
//! deposition); a table behind the sender answers UNAVAILABLE (retried).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::{CreditBatch, CreditSender};
use cellbank_proto::router::courier_server::Courier;
use cellbank_proto::router::{Deliveries, Delivery};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::cells::CellPool;
use crate::table;

/// Deadline of a delivery that carries none.
pub const DELIVERY_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);

pub struct CourierService {
    pub pool: Arc<CellPool>,
}

#[tonic::async_trait]
impl Courier for CourierService {
    async fn deliver_credits(&self, request: Request<CreditBatch>) -> Result<Response<Deliveries>, Status> {
        let timeout = cellbank_client::deadline::of_request(&request)
            .unwrap_or(DELIVERY_TIMEOUT_DEFAULT)
            .min(Duration::from_secs(30));
        let deadline = Instant::now() + timeout.saturating_sub(Duration::from_millis(50));
        let caller = cellbank_client::gate::caller(&request).cloned();
        let refuser = cellbank_client::gate::refuser(&request);
        let batch = request.into_inner();
        let sender = batch.sender.ok_or_else(|| Status::invalid_argument("sender: must be set"))?;
        if let Err(status) = check_caller(caller.as_ref(), &sender) {
            return Err(match &refuser {
                Some(refuser) => refuser.refuse("/cellbank.router.v1.Courier/DeliverCredits", status),
                None => status,
            });
        }
        let credits = batch.credits;
        if let Some(other) = credits.iter().find(|c| c.source_pair_id != sender.source_pair_id) {
            return Err(Status::invalid_argument(format!(
                "credits: seq {} names source pair {}, the sender is pair {}",
                other.seq, other.source_pair_id, sender.source_pair_id
            )));
        }
        {
            let table = self.pool.table_view().borrow();
            if table.slice_count == 0 {
                return Err(Status::unavailable("the routing table is not ready yet"));
            }
            check_sender(&table, &sender)?;
        }
        let mut deliveries: Vec<Delivery> = vec![Delivery::default(); credits.len()];
        // Per credit: the pair it names and its recipient.
        let dests: Vec<(u64, u64)>;
        // destination pair -> (positions, credits)
        let mut parts: BTreeMap<u64, (Vec<usize>, CreditBatch)> = BTreeMap::new();
        {
            let table = self.pool.table_view().borrow();
            if table.slice_count == 0 {
                return Err(Status::unavailable("the routing table is not ready yet"));
            }
            let mut load = Vec::with_capacity(credits.len());
            dests = credits.iter().map(|c| (c.dest_pair_id, c.to_user_id)).collect();
            for (position, credit) in credits.into_iter().enumerate() {
                // To the pair the credit names even when the recipient's
                // slice has moved on since: that pair answers from its
                // inbox if it applied the credit, else with the pair the
                // slice moved to, and the source redirects the credit.
                if table::find_pair(&table, credit.dest_pair_id).is_none() {
                    deliveries[position].error = format!("unknown destination pair {}", credit.dest_pair_id);
                } else {
                    // Applied at the recipient's slice: load there.
                    load.push((credit.to_user_id, crate::load::Kind::Write, prost::Message::encoded_len(&credit)));
                    let part = parts.entry(credit.dest_pair_id).or_default();
                    part.0.push(position);
                    part.1.credits.push(credit);
                }
            }
            self.pool.load().record_many(&table, load);
        }
        let calls = parts.into_iter().map(|(pair_id, (positions, mut batch))| {
            batch.sender = Some(sender);
            let pool = self.pool.clone();
            async move {
                let outcome = pool
                    .call_clearing(table::to_pair(pair_id), deadline, batch, |mut c, req| async move {
                        c.apply_credits(req).await
                    })
                    .await;
                (positions, outcome)
            }
        });
        for (positions, outcome) in futures::future::join_all(calls).await {
            match outcome {
                Ok(results) if results.results.len() == positions.len() => {
                    let table = self.pool.table_view().borrow();
                    for (position, mut result) in positions.into_iter().zip(results.results) {
                        redirect_to_owner(&table, &dests[position], &mut result);
                        deliveries[position] = Delivery { answered: true, result: Some(result), error: String::new() };
                    }
                }
                Ok(_) => {
                    for position in positions {
                        deliveries[position].error = "the destination answered with the wrong number of results".into();
                    }
                }
                Err(status) => {
                    for position in positions {
                        deliveries[position].error = status.message().to_string();
                    }
                }
            }
        }
        Ok(Response::new(Deliveries { deliveries }))
    }
}

/// A destination that says the recipient's slice left it (SLICE_MOVING
/// with the pair it went to) has the credit redirected to the pair the
/// table says serves the slice now, and only once the table says so: the
/// table flips a move only after the new pair imported the slice (a
/// credit redirected sooner would find no account there and be refunded).
/// Until then the answer is plain SLICE_MOVING, and the source asks again.
pub fn redirect_to_owner(
    table: &cellbank_proto::router::RoutingTable,
    (named, to_user): &(u64, u64),
    result: &mut cellbank_proto::v1::TransferResult,
) {
    if result.code != cellbank_proto::v1::ResultCode::SliceMoving as i32 || result.moved_to_pair_id == 0 {
        return;
    }
    let owner = table::route(table, *to_user).map(|r| r.pair_id).unwrap_or(0);
    result.moved_to_pair_id = if owner != 0 && owner != *named { owner } else { 0 };
}

/// Refuses a sender the routing table does not name as its pair's active at
/// its epoch.
/// Only a replica of the cell a batch names as its sender may deliver its
/// credits (and [`check_sender`] then requires that cell to be the table's
/// active of the source pair at the sender's epoch). An insecure router
/// has no caller and skips this.
pub fn check_caller(caller: Option<&cellbank_client::tls::Identity>, sender: &CreditSender) -> Result<(), Status> {
    match caller {
        None => Ok(()),
        Some(cellbank_client::tls::Identity::Replica { cell, .. }) if *cell == sender.cell_id => Ok(()),
        Some(identity) => Err(cellbank_client::errors::denied(
            tonic::Code::PermissionDenied,
            &format!("{identity} may not deliver credits as cell {}: only that cell's replicas may", sender.cell_id),
            Some("/cellbank.router.v1.Courier/DeliverCredits"),
        )),
    }
}

pub fn check_sender(table: &cellbank_proto::router::RoutingTable, sender: &CreditSender) -> Result<(), Status> {
    if cellbank_raft::mutation::active(cellbank_raft::mutation::Mutation::NoSenderEpoch) {
        return Ok(());
    }
    let pair = table::find_pair(table, sender.source_pair_id)
        .ok_or_else(|| Status::invalid_argument(format!("sender: unknown pair {}", sender.source_pair_id)))?;
    if sender.epoch > pair.epoch {
        return Err(Status::unavailable(format!(
            "this router's table is at epoch {} of pair {}, behind the sender's {}; retry",
            pair.epoch, sender.source_pair_id, sender.epoch
        )));
    }
    if sender.epoch < pair.epoch || sender.cell_id != pair.active_cell_id {
        let mut status = Status::failed_precondition(format!(
            "cell {} at epoch {} is not the active of pair {}: the table names cell {} at epoch {}",
            sender.cell_id, sender.epoch, sender.source_pair_id, pair.active_cell_id, pair.epoch
        ));
        if let Ok(value) = pair.epoch.to_string().parse() {
            status.metadata_mut().insert(cellbank_proto::EPOCH_METADATA_KEY, value);
        }
        return Err(status);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellbank_proto::router::{Pair, RoutingTable};

    fn table() -> RoutingTable {
        RoutingTable {
            slice_count: 4,
            pairs: vec![Pair { pair_id: 1, active_cell_id: 3, standby_cell_id: 1, epoch: 2, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn only_the_tables_active_at_its_epoch_may_send() {
        let sender = |cell_id, epoch| CreditSender { source_pair_id: 1, cell_id, epoch };
        assert!(check_sender(&table(), &sender(3, 2)).is_ok());
        let old = check_sender(&table(), &sender(1, 1)).unwrap_err();
        assert_eq!(old.code(), tonic::Code::FailedPrecondition, "the deposed old active");
        assert_eq!(old.metadata().get(cellbank_proto::EPOCH_METADATA_KEY).unwrap(), "2");
        let wrong_cell = check_sender(&table(), &sender(1, 2)).unwrap_err();
        assert_eq!(wrong_cell.code(), tonic::Code::FailedPrecondition, "the standby at the current epoch");
        let ahead = check_sender(&table(), &sender(3, 3)).unwrap_err();
        assert_eq!(ahead.code(), tonic::Code::Unavailable, "a table behind the sender is retried");
        let unknown = CreditSender { source_pair_id: 9, cell_id: 3, epoch: 2 };
        assert_eq!(check_sender(&table(), &unknown).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_credit_is_redirected_only_once_the_table_names_the_slices_new_pair() {
        use cellbank_proto::v1::{ResultCode, TransferResult};
        let user = 7;
        let slice = table::slice_of(user, 4) as usize;
        let mut table = RoutingTable {
            slice_count: 4,
            pairs: (1..=3)
                .map(|pair_id| Pair { pair_id, active_cell_id: pair_id, epoch: 1, ..Default::default() })
                .collect(),
            slice_pair: vec![1; 4],
            ..Default::default()
        };
        let moved =
            || TransferResult { code: ResultCode::SliceMoving as i32, moved_to_pair_id: 2, ..Default::default() };
        // The old pair says the slice left for pair 2; the table has not
        // flipped yet (pair 2 may not hold it yet): no redirect.
        let mut answer = moved();
        redirect_to_owner(&table, &(1, user), &mut answer);
        assert_eq!(answer.moved_to_pair_id, 0);
        // Flipped: to pair 2.
        table.slice_pair[slice] = 2;
        let mut answer = moved();
        redirect_to_owner(&table, &(1, user), &mut answer);
        assert_eq!(answer.moved_to_pair_id, 2);
        // Moved on since to pair 3: to where the table says it is now.
        table.slice_pair[slice] = 3;
        let mut answer = moved();
        redirect_to_owner(&table, &(1, user), &mut answer);
        assert_eq!(answer.moved_to_pair_id, 3);
        // A frozen slice's answer carries no pair; other answers pass as they are.
        let mut frozen = TransferResult { code: ResultCode::SliceMoving as i32, ..Default::default() };
        redirect_to_owner(&table, &(1, user), &mut frozen);
        assert_eq!(frozen.moved_to_pair_id, 0);
        let mut ok = TransferResult { code: ResultCode::Ok as i32, moved_to_pair_id: 0, ..Default::default() };
        redirect_to_owner(&table, &(1, user), &mut ok);
        assert_eq!(ok.code, ResultCode::Ok as i32);
    }
}
