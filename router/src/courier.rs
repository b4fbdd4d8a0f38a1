//! The routers' side of cross-cell credits: a source cell's courier hands
//! its credits to any router, which delivers each to the active cell of the
//! pair it names (the pair whose clearing account the source debited; the
//! table says which cell that is now, so credits follow failovers) through
//! `Clearing.ApplyCredits`, retrying within the call's deadline. The answer
//! per credit says whether the destination answered and what it said; the
//! courier settles only final answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::CreditBatch;
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
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(cellbank_cell::service::parse_grpc_timeout)
            .unwrap_or(DELIVERY_TIMEOUT_DEFAULT)
            .min(Duration::from_secs(30));
        let deadline = Instant::now() + timeout.saturating_sub(Duration::from_millis(50));
        let credits = request.into_inner().credits;
        let mut deliveries: Vec<Delivery> = vec![Delivery::default(); credits.len()];
        // destination pair -> (positions, credits)
        let mut parts: BTreeMap<u64, (Vec<usize>, CreditBatch)> = BTreeMap::new();
        {
            let table = self.pool.table_view().borrow();
            if table.slice_count == 0 {
                return Err(Status::unavailable("the routing table is not ready yet"));
            }
            for (position, credit) in credits.into_iter().enumerate() {
                let serves_recipient =
                    table::route(&table, credit.to_user_id).is_some_and(|r| r.pair_id == credit.dest_pair_id);
                if table::find_pair(&table, credit.dest_pair_id).is_none() {
                    deliveries[position].error = format!("unknown destination pair {}", credit.dest_pair_id);
                } else if !serves_recipient {
                    // Slices do not move yet; when they do, such a credit
                    // needs the pair that serves the recipient now.
                    deliveries[position].error =
                        format!("pair {} does not serve user {}", credit.dest_pair_id, credit.to_user_id);
                } else {
                    let part = parts.entry(credit.dest_pair_id).or_default();
                    part.0.push(position);
                    part.1.credits.push(credit);
                }
            }
        }
        let calls = parts.into_iter().map(|(pair_id, (positions, batch))| {
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
                    for (position, result) in positions.into_iter().zip(results.results) {
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
