//! The client-facing `cellbank.v1.Ledger` of a router. A client talks to
//! routers only: each request is validated here (the same rules as a
//! cell's), pinned to the cell that owns its user's slice, and retried there
//! within the client's deadline.
//!
//! - Deposit, Withdraw, OpenAccount, GetAccount and ListTransfers go to the
//!   user's cell; Transfer to the sender's.
//! - A transfer whose recipient lives in another cell is answered
//!   CROSS_CELL_UNSUPPORTED and reaches no cell.
//! - SubmitTransfers is split by the senders' cells, the parts are sent at
//!   once, and the results are merged back into request order.
//! - GetTransfer does not know the cell of a transfer_id: it asks every
//!   active cell and answers with the one that has it.

use std::sync::Arc;
use std::time::Duration;

use cellbank_cell::ledger::validate;
use cellbank_proto::v1::ledger_server::Ledger as LedgerApi;
use cellbank_proto::v1::*;
use cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::cells::CellPool;
use crate::table::{self, Route};

/// Deadline of a request that carries none.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Longest deadline honoured.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(60);

pub struct Front {
    pub pool: Arc<CellPool>,
}

fn deadline_of<T>(request: &Request<T>) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(cellbank_cell::service::parse_grpc_timeout)
        .unwrap_or(REQUEST_TIMEOUT_DEFAULT)
        .min(REQUEST_TIMEOUT_MAX);
    Instant::now() + timeout
}

fn invalid(error: validate::Invalid) -> Status {
    Status::invalid_argument(error.to_string())
}

fn by_user(user_id: u64) -> impl Fn(&cellbank_proto::router::RoutingTable) -> Option<Route> {
    move |t| table::route(t, user_id)
}

fn cross_cell(from: u64, to: u64) -> TransferResult {
    TransferResult {
        code: ResultCode::CrossCellUnsupported as i32,
        field: "to_user_id".into(),
        detail: format!("users {from} and {to} live in different cells; transfers between cells are not supported yet"),
        ..Default::default()
    }
}

impl Front {
    /// True when both users are served by the same pair.
    fn same_cell(&self, from: u64, to: u64) -> bool {
        let table = self.pool.table_view().borrow();
        match (table::route(&table, from), table::route(&table, to)) {
            (Some(a), Some(b)) => a.pair_id == b.pair_id,
            _ => true,
        }
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
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let response = self
            .pool
            .call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.open_account(req).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn deposit(&self, request: Request<DepositRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        let check = TransferRequest {
            transfer_id: r.transfer_id.clone(),
            from_user_id: 0,
            to_user_id: r.user_id,
            currency: r.currency.clone(),
            amount: r.amount,
        };
        Front::check_move(TransferKind::Deposit, &check).map_err(invalid)?;
        let response =
            self.pool.call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.deposit(req).await }).await?;
        Ok(Response::new(response))
    }

    async fn withdraw(&self, request: Request<WithdrawRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        let check = TransferRequest {
            transfer_id: r.transfer_id.clone(),
            from_user_id: r.user_id,
            to_user_id: 0,
            currency: r.currency.clone(),
            amount: r.amount,
        };
        Front::check_move(TransferKind::Withdraw, &check).map_err(invalid)?;
        let response =
            self.pool.call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.withdraw(req).await }).await?;
        Ok(Response::new(response))
    }

    async fn transfer(&self, request: Request<TransferRequest>) -> Result<Response<TransferResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        Front::check_move(TransferKind::Transfer, &r).map_err(invalid)?;
        if !self.same_cell(r.from_user_id, r.to_user_id) {
            return Ok(Response::new(TransferResponse { result: Some(cross_cell(r.from_user_id, r.to_user_id)) }));
        }
        let response = self
            .pool
            .call(by_user(r.from_user_id), deadline, r, |mut c, req| async move { c.transfer(req).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn submit_transfers(
        &self,
        request: Request<SubmitTransfersRequest>,
    ) -> Result<Response<SubmitTransfersResponse>, Status> {
        let deadline = deadline_of(&request);
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
        // pair id -> (positions, items)
        let mut parts: std::collections::BTreeMap<u64, (Vec<usize>, Vec<TransferRequest>)> = Default::default();
        {
            let table = self.pool.table_view().borrow();
            if table.slice_count == 0 {
                return Err(Status::unavailable("the routing table is not ready yet"));
            }
            for (position, item) in items.into_iter().enumerate() {
                if let Err(error) = Front::check_move(TransferKind::Transfer, &item) {
                    results[position] = Some(TransferResult {
                        code: ResultCode::InvalidItem as i32,
                        field: error.field.to_string(),
                        detail: error.detail,
                        ..Default::default()
                    });
                    continue;
                }
                let from = table::route(&table, item.from_user_id).expect("bootstrapped table routes every user");
                let to = table::route(&table, item.to_user_id).expect("bootstrapped table routes every user");
                if from.pair_id != to.pair_id {
                    results[position] = Some(cross_cell(item.from_user_id, item.to_user_id));
                    continue;
                }
                let part = parts.entry(from.pair_id).or_default();
                part.0.push(position);
                part.1.push(item);
            }
        }
        let calls = parts.into_iter().map(|(pair_id, (positions, transfers))| {
            let pool = self.pool.clone();
            async move {
                let pick = move |t: &cellbank_proto::router::RoutingTable| {
                    let pair = table::find_pair(t, pair_id)?;
                    Some(Route { slice: 0, pair_id, cell_id: pair.active_cell_id, epoch: pair.epoch })
                };
                let message = SubmitTransfersRequest { transfers };
                let response = pool
                    .call(pick, deadline, message, |mut c, req| async move { c.submit_transfers(req).await })
                    .await?;
                if response.results.len() != positions.len() {
                    return Err(Status::internal("a cell answered with the wrong number of results"));
                }
                Ok::<_, Status>((positions, response.results))
            }
        });
        for part in futures::future::join_all(calls).await {
            let (positions, part_results) = part?;
            for (position, result) in positions.into_iter().zip(part_results) {
                results[position] = Some(result);
            }
        }
        let results = results.into_iter().map(|r| r.expect("every item has a result")).collect();
        Ok(Response::new(SubmitTransfersResponse { results }))
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let response = self
            .pool
            .call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.get_account(req).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn get_transfer(
        &self,
        request: Request<GetTransferRequest>,
    ) -> Result<Response<GetTransferResponse>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        validate::transfer_id(&r.transfer_id).map_err(invalid)?;
        let pairs: Vec<u64> = self.pool.table().pairs.iter().map(|p| p.pair_id).collect();
        if pairs.is_empty() {
            return Err(Status::unavailable("the routing table is not ready yet"));
        }
        let asks = pairs.into_iter().map(|pair_id| {
            let pool = self.pool.clone();
            let message = r.clone();
            async move {
                let pick = move |t: &cellbank_proto::router::RoutingTable| {
                    let pair = table::find_pair(t, pair_id)?;
                    Some(Route { slice: 0, pair_id, cell_id: pair.active_cell_id, epoch: pair.epoch })
                };
                pool.call(pick, deadline, message, |mut c, req| async move { c.get_transfer(req).await }).await
            }
        });
        let mut failure = None;
        for answer in futures::future::join_all(asks).await {
            match answer {
                Ok(found) => return Ok(Response::new(found)),
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
        let r = request.into_inner();
        validate::open_account(r.user_id, &r.currency).map_err(invalid)?;
        let response = self
            .pool
            .call(by_user(r.user_id), deadline, r, |mut c, req| async move { c.list_transfers(req).await })
            .await?;
        Ok(Response::new(response))
    }
}
