//! Long-lived connections from a router to every replica of every cell, and
//! the retry loop that carries one request to the right cell.
//!
//! - One HTTP/2 channel per plane of each replica (client: the ledger;
//!   peer: credits; admin: configure, status), kept for the router's lifetime; calls
//!   from many clients are multiplexed (pipelined) on it.
//! - A request goes to the replica believed to lead its cell, with the
//!   slice's routing epoch in `cellbank-epoch`.
//! - UNAVAILABLE and transport failures are retried until the caller's
//!   deadline: at once at a named leader, after the routing table moves for
//!   an epoch refusal, otherwise after the client crate's jittered waits
//!   ([`RetryPolicy::ROUTER`]). Cells answer UNAVAILABLE only when nothing
//!   was applied, or the write is idempotent by its transfer_id, so a retry
//!   never applies twice.
//! - Every other status goes back to the client as it is, RESOURCE_EXHAUSTED
//!   (an overloaded cell) too: a router that retried it would add load where
//!   there is already too much.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cellbank_client::channel::{self, ChannelSettings};
use cellbank_client::planes::Plane;
use cellbank_client::retry::{self, RetryPolicy};
use cellbank_proto::cell::clearing_client::ClearingClient;
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::router::RoutingTable;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::EPOCH_METADATA_KEY;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::metrics::RouterMetrics;
use crate::table::{self, Route, TableView};

/// Longest a request waits for this router's table to catch up with an
/// epoch a cell named.
const TABLE_CATCH_UP_MAX: Duration = Duration::from_millis(500);
/// Longest a call for a user whose slice is moving waits for the table in
/// one go before it looks again (a change of the table wakes it at once).
const MOVING_WAIT_MAX: Duration = Duration::from_millis(100);

pub struct ReplicaConn {
    pub addr: String,
    pub ledger: LedgerClient<Channel>,
    pub clearing: ClearingClient<Channel>,
    pub admin: ReplicaAdminClient<Channel>,
    /// The admin plane's channel (health probes).
    pub admin_channel: Channel,
}

pub struct CellConn {
    pub cell_id: u64,
    /// The table's addresses of the cell these connections were made for.
    addrs: Vec<String>,
    pub replicas: Vec<ReplicaConn>,
    /// The replica believed to lead.
    leader: AtomicUsize,
}

impl CellConn {
    fn new(cell_id: u64, addrs: &[String]) -> CellConn {
        let replicas = addrs
            .iter()
            .filter_map(|addr| {
                let expect = cellbank_client::tls::Expect::Replica(Some(cell_id));
                let plane = |plane: Plane| ChannelSettings::INTERNAL.lazy_to(&plane.of(addr), expect).ok();
                let admin = plane(Plane::Admin)?;
                Some(ReplicaConn {
                    addr: addr.clone(),
                    ledger: channel::ledger(plane(Plane::Client)?),
                    clearing: channel::clearing(plane(Plane::Peer)?),
                    admin: channel::admin(admin.clone()),
                    admin_channel: admin,
                })
            })
            .collect();
        CellConn { cell_id, addrs: addrs.to_vec(), replicas, leader: AtomicUsize::new(0) }
    }

    pub fn leader(&self) -> &ReplicaConn {
        &self.replicas[self.leader.load(Ordering::Relaxed) % self.replicas.len()]
    }

    pub(crate) fn follow(&self, addr: &str) -> bool {
        match self.replicas.iter().position(|r| r.addr == addr) {
            Some(position) => {
                self.leader.store(position, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn rotate(&self, from: usize) {
        let _ =
            self.leader.compare_exchange(from, (from + 1) % self.replicas.len(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Connections to every cell in the routing table.
pub struct CellPool {
    cells: RwLock<HashMap<u64, Arc<CellConn>>>,
    table: TableView,
    /// Injected fault: cells this router treats as unreachable, until when.
    isolated: RwLock<HashMap<u64, Instant>>,
    metrics: Option<Arc<RouterMetrics>>,
    load: crate::load::Load,
}

/// Longest an injected isolation lasts.
pub const ISOLATION_MAX: Duration = Duration::from_secs(600);

/// Whether a router sends a failed call to a cell again: what the client
/// crate's rule allows for an idempotent call (every call a router carries
/// is: writes by their transfer id, credits by their seq), except an
/// overloaded cell's RESOURCE_EXHAUSTED, which goes back to the caller.
/// What a planned call ends with when its plan no longer holds.
pub fn replan() -> Status {
    Status::aborted(REPLAN)
}

const REPLAN: &str = "the routing table changed under this call's plan: plan it again";

/// Whether a planned call ended because its plan no longer holds.
pub fn is_replan(status: &Status) -> bool {
    status.code() == tonic::Code::Aborted && status.message() == REPLAN
}

pub fn is_retried(status: &Status) -> bool {
    retry::retryable(status, true) && status.code() != tonic::Code::ResourceExhausted
}

impl CellPool {
    pub fn new(table: TableView) -> Arc<CellPool> {
        CellPool::with_metrics(table, None)
    }

    pub fn with_metrics(table: TableView, metrics: Option<Arc<RouterMetrics>>) -> Arc<CellPool> {
        let load = crate::load::Load::new(metrics.clone());
        Arc::new(CellPool {
            cells: RwLock::new(HashMap::new()),
            table,
            isolated: RwLock::new(HashMap::new()),
            metrics,
            load,
        })
    }

    /// What this router carried to each slice.
    pub fn load(&self) -> &crate::load::Load {
        &self.load
    }

    /// Counts a call routed by `user_id` (see [`crate::load`]).
    pub fn record(&self, user_id: u64, kind: crate::load::Kind, bytes: usize) {
        self.load.record(&self.table.borrow(), user_id, kind, bytes);
    }

    fn count_retry(&self, reason: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.retries_total.with_label_values(&[reason]).inc();
        }
    }

    /// Counts a call's outcome at the pair its route names now, under the
    /// method of the client call it serves (`none` for the router's own).
    fn count_outcome<T>(&self, pick: impl Fn(&RoutingTable) -> Option<Route>, outcome: &Result<T, Status>) {
        if let Some(metrics) = &self.metrics {
            let pair = pick(&self.table.borrow()).map(|r| r.pair_id.to_string()).unwrap_or_else(|| "none".into());
            let code = match outcome {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            };
            let code = cellbank_raft::metrics::code_name(code);
            cellbank_client::gate::with_call_method(|method| {
                metrics.requests_total.with_label_values(&[method, &pair, code]).inc();
            });
        }
    }

    /// Treats `cell_ids` as unreachable for `duration` (empty: heal all).
    pub fn isolate(&self, cell_ids: &[u64], duration: Duration) -> Vec<u64> {
        let until = Instant::now() + duration.min(ISOLATION_MAX);
        let mut isolated = self.isolated.write().expect("isolated lock");
        isolated.clear();
        for cell in cell_ids {
            isolated.insert(*cell, until);
        }
        let mut ids: Vec<u64> = isolated.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// True while an injected fault isolates the cell from this router.
    pub fn is_isolated(&self, cell_id: u64) -> bool {
        self.isolated.read().expect("isolated lock").get(&cell_id).is_some_and(|until| Instant::now() < *until)
    }

    pub fn table(&self) -> RoutingTable {
        self.table.borrow().clone()
    }

    pub fn table_view(&self) -> &TableView {
        &self.table
    }

    /// The connections to a cell, made on first use and made again when
    /// the table's addresses of the cell change (a replica replaced).
    pub fn cell(&self, cell_id: u64) -> Option<Arc<CellConn>> {
        let current = |conn: &CellConn| {
            let table = self.table.borrow();
            table.cells.iter().find(|c| c.cell_id == cell_id).is_some_and(|c| c.replicas == conn.addrs)
        };
        if let Some(conn) = self.cells.read().expect("cells lock").get(&cell_id) {
            if current(conn) {
                return Some(conn.clone());
            }
        }
        let addrs = table::cell_addrs(&self.table.borrow(), cell_id);
        if addrs.is_empty() {
            return None;
        }
        let mut cells = self.cells.write().expect("cells lock");
        if let Some(conn) = cells.get(&cell_id) {
            if conn.addrs == addrs {
                return Some(conn.clone());
            }
        }
        let conn = Arc::new(CellConn::new(cell_id, &addrs));
        if conn.replicas.is_empty() {
            // No address of the cell makes a channel (the table checks
            // them; this is a guard, not a path).
            return None;
        }
        if let Some(old) = cells.get(&cell_id) {
            // Keep following the leader if it is still a replica.
            conn.follow(&old.leader().addr.clone());
        }
        cells.insert(cell_id, conn.clone());
        Some(conn)
    }

    /// Waits (up to `limit`) for the table to show a pair epoch of at least
    /// `epoch` for `pair_id`. True when it does.
    async fn await_epoch(&self, pair_id: u64, epoch: u64, limit: Duration) -> bool {
        let mut rx = self.table.subscribe();
        let reached = |t: &RoutingTable| table::find_pair(t, pair_id).is_some_and(|p| p.epoch >= epoch);
        tokio::time::timeout(limit, async {
            loop {
                if reached(&rx.borrow_and_update()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Runs `call` against the cell that owns `pick`'s route, retrying
    /// retryable failures until `deadline`.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        deadline: Instant,
        message: Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(LedgerClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.call_planned(pick, &|_| true, deadline, &message, call).await
    }

    /// [`CellPool::call`] for a call planned from the table (which cell
    /// takes it depends on more than one user): before each attempt
    /// `plan_holds` is asked of the table, and once it fails (a slice the
    /// plan relied on moved) the call ends with [`replan`] instead of being
    /// retried where the old plan pointed. The message is borrowed, so
    /// that a caller whose plan failed still has it to plan again.
    pub async fn call_planned<Req, Resp, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        plan_holds: &(dyn Fn(&RoutingTable) -> bool + Sync),
        deadline: Instant,
        message: &Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(LedgerClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let outcome = self.call_with_retries(&pick, plan_holds, deadline, message, |r| r.ledger.clone(), call).await;
        self.count_outcome(pick, &outcome);
        outcome
    }

    /// [`CellPool::call_planned`] on a cell's `Clearing` service.
    pub async fn call_clearing_planned<Req, Resp, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        plan_holds: &(dyn Fn(&RoutingTable) -> bool + Sync),
        deadline: Instant,
        message: &Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ClearingClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let outcome = self.call_with_retries(&pick, plan_holds, deadline, message, |r| r.clearing.clone(), call).await;
        self.count_outcome(pick, &outcome);
        outcome
    }

    /// [`CellPool::call`] on a cell's `ReplicaAdmin` (its leader's figures).
    pub async fn call_admin<Req, Resp, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        deadline: Instant,
        message: Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ReplicaAdminClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.call_with_retries(pick, &|_| true, deadline, &message, |r| r.admin.clone(), call).await
    }

    /// [`CellPool::call`] on a cell's internal `Clearing` service.
    pub async fn call_clearing<Req, Resp, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        deadline: Instant,
        message: Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ClearingClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.call_clearing_planned(pick, &|_| true, deadline, &message, call).await
    }

    async fn call_with_retries<Req, Resp, C, F, Fut>(
        &self,
        pick: impl Fn(&RoutingTable) -> Option<Route>,
        plan_holds: &(dyn Fn(&RoutingTable) -> bool + Sync),
        deadline: Instant,
        message: &Req,
        client: impl Fn(&ReplicaConn) -> C,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(C, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut backoff = RetryPolicy::ROUTER.backoff();
        let mut last_error: Option<Status> = None;
        let mut table_changes = self.table.subscribe();
        loop {
            let mut wait_for_table = false;
            table_changes.borrow_and_update();
            let now = Instant::now();
            if now >= deadline {
                return Err(last_error.unwrap_or_else(|| Status::deadline_exceeded("no cell answered in time")));
            }
            let remaining = deadline - now;
            if !plan_holds(&self.table.borrow()) {
                return Err(replan());
            }
            let Some(route) = pick(&self.table.borrow()) else {
                last_error = Some(Status::unavailable("the routing table is not ready yet"));
                tokio::time::sleep(backoff.next_delay(false).min(remaining)).await;
                continue;
            };
            if route.moving {
                // Its pair refuses the user's writes (and, once the money
                // left, reads) until the move ends, each refusal a round
                // through its log: wait for the table to end the move
                // instead, and go where it then says.
                self.count_retry("slice_moving");
                if last_error.is_none() {
                    last_error = Some(Status::unavailable(format!(
                        "slice {} is moving to another pair; nothing was sent: retry",
                        route.slice
                    )));
                }
                let wait = remaining.min(MOVING_WAIT_MAX);
                let _ = tokio::time::timeout(wait, table_changes.changed()).await;
                continue;
            }
            let Some(cell) = self.cell(route.cell_id) else {
                return Err(Status::internal(format!(
                    "the routing table names cell {} without replicas",
                    route.cell_id
                )));
            };
            if self.is_isolated(route.cell_id) {
                last_error = Some(Status::unavailable(format!(
                    "cell {} is isolated from this router (injected fault)",
                    route.cell_id
                )));
                tokio::time::sleep(backoff.next_delay(false).min(remaining)).await;
                continue;
            }
            let position = cell.leader.load(Ordering::Relaxed) % cell.replicas.len();
            let replica = &cell.replicas[position];
            let mut request = Request::new(message.clone());
            request.set_timeout(remaining);
            if let Ok(value) = route.epoch.to_string().parse() {
                request.metadata_mut().insert(EPOCH_METADATA_KEY, value);
            }
            // The client's trace goes on to the cell.
            cellbank_client::trace::inject(request.metadata_mut());
            let status = match tokio::time::timeout(remaining, call(client(replica), request)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(Status::deadline_exceeded(
                        "the cell did not answer in time; the outcome is unknown: retry with the same transfer_id",
                    ))
                }
            };
            if !is_retried(&status) {
                return Err(status);
            }
            let leader_hint = retry::leader_hint(&status);
            let cell_epoch = retry::epoch_hint(&status);
            let mut retry_now = false;
            if let Some(hint) = leader_hint {
                self.count_retry("leader_hint");
                retry_now = hint != replica.addr && cell.follow(hint);
                if !retry_now {
                    // A leader at an address this router does not know
                    // (the table is changing): try the next replica.
                    cell.rotate(position);
                }
            } else if let Some(epoch) = cell_epoch.filter(|e| *e > route.epoch) {
                // This router's table is behind: wait for it to catch up.
                self.count_retry("stale_table");
                retry_now = self.await_epoch(route.pair_id, epoch, remaining.min(TABLE_CATCH_UP_MAX)).await;
            } else if cell_epoch.is_none() {
                // Not a cell's refusal: the replica is unreachable or has no
                // leader. Try the next one.
                self.count_retry("unreachable");
                cell.rotate(position);
            } else {
                // Not serving: a failover, or the user's slice moving away.
                // Either ends with a new table, so a change wakes the retry.
                self.count_retry("cell_not_serving");
                wait_for_table = true;
            }
            last_error = Some(status);
            if !retry_now {
                let delay = backoff.next_delay(false).min(deadline.saturating_duration_since(Instant::now()));
                if wait_for_table {
                    let _ = tokio::time::timeout(delay, table_changes.changed()).await;
                } else {
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The retry loop against a fake cell (a unit test; the end-to-end
    //! tests use real cells): a router whose table is behind is refused
    //! with the cell's newer epoch, waits for its table, and is served.

    use std::sync::Mutex;

    use cellbank_proto::router::{CellReplicas, Pair, PairMode};
    use cellbank_proto::v1::ledger_server::{Ledger, LedgerServer};
    use cellbank_proto::v1::*;
    use tonic::Response;

    use super::*;

    /// Serves only Transfer; refuses any epoch but `epoch`, naming it.
    struct FakeCell {
        epoch: u64,
        seen: Arc<Mutex<Vec<u64>>>,
    }

    #[tonic::async_trait]
    impl Ledger for FakeCell {
        async fn transfer(&self, request: Request<TransferRequest>) -> Result<Response<TransferResponse>, Status> {
            let epoch: u64 = request.metadata().get(EPOCH_METADATA_KEY).unwrap().to_str().unwrap().parse().unwrap();
            self.seen.lock().unwrap().push(epoch);
            if epoch != self.epoch {
                let mut status = Status::unavailable("stale epoch");
                status.metadata_mut().insert(EPOCH_METADATA_KEY, self.epoch.to_string().parse().unwrap());
                return Err(status);
            }
            let result = TransferResult { code: ResultCode::Ok as i32, ..Default::default() };
            Ok(Response::new(TransferResponse { result: Some(result) }))
        }
        async fn open_account(&self, _: Request<OpenAccountRequest>) -> Result<Response<OpenAccountResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn deposit(&self, _: Request<DepositRequest>) -> Result<Response<TransferResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn withdraw(&self, _: Request<WithdrawRequest>) -> Result<Response<TransferResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn submit_transfers(
            &self,
            _: Request<SubmitTransfersRequest>,
        ) -> Result<Response<SubmitTransfersResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn get_account(&self, _: Request<GetAccountRequest>) -> Result<Response<GetAccountResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn get_transfer(&self, _: Request<GetTransferRequest>) -> Result<Response<GetTransferResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn list_transfers(
            &self,
            _: Request<ListTransfersRequest>,
        ) -> Result<Response<ListTransfersResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn send_envelope(
            &self,
            _: Request<SendEnvelopeRequest>,
        ) -> Result<Response<SendEnvelopeResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn grab_envelope(
            &self,
            _: Request<GrabEnvelopeRequest>,
        ) -> Result<Response<GrabEnvelopeResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn get_envelope(&self, _: Request<GetEnvelopeRequest>) -> Result<Response<GetEnvelopeResponse>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    fn table(addr: &str, epoch: u64) -> RoutingTable {
        RoutingTable {
            slice_count: 1,
            cells: vec![CellReplicas { cell_id: 1, replicas: vec![addr.to_string()] }],
            pairs: vec![Pair {
                pair_id: 1,
                active_cell_id: 1,
                standby_cell_id: 0,
                mode: PairMode::NoStandby as i32,
                epoch,
                last_failover_ms: 0,
                mode_seq: 0,
            }],
            slice_pair: vec![1],
            slice_epoch: vec![epoch],
            audit_count: 0,
            moves: vec![],
            last_move_id: 0,
        }
    }

    #[tokio::test]
    async fn a_stale_router_is_refused_then_catches_up_with_its_table() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cell = FakeCell { epoch: 2, seen: seen.clone() };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LedgerServer::new(cell))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(table(&addr, 1)));
        let pool = CellPool::new(view.clone());
        // The table catches up a little later, as a lagging router's would.
        let catch_up = view.clone();
        let addr_later = addr.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            catch_up.send_replace(table(&addr_later, 2));
        });
        let message = TransferRequest { transfer_id: b"t".to_vec(), ..Default::default() };
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = pool
            .call(|t| table::route(t, 7), deadline, message, |mut c, r| async move { c.transfer(r).await })
            .await
            .expect("served once the table caught up");
        assert_eq!(answer.result.unwrap().code, ResultCode::Ok as i32);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.first(), Some(&1), "the first attempt carried the stale epoch");
        assert_eq!(seen.last(), Some(&2), "the last carried the new one");
        assert!(seen.iter().filter(|e| **e == 1).count() <= 2, "it waited for the table instead of spinning: {seen:?}");
    }

    /// A call for a user whose slice the table shows moving is not sent:
    /// it waits for the table, and goes once the move has ended; with the
    /// move never ending, it ends at its deadline having sent nothing.
    #[tokio::test]
    async fn a_call_for_a_moving_slice_waits_for_the_table_and_sends_nothing_meanwhile() {
        use cellbank_proto::router::SliceMove;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cell = FakeCell { epoch: 1, seen: seen.clone() };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LedgerServer::new(cell))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let moving = |addr: &str| RoutingTable {
            moves: vec![SliceMove { move_id: 1, slice: 0, from_pair_id: 1, to_pair_id: 2, started_ms: 0 }],
            ..table(addr, 1)
        };
        let view: TableView = Arc::new(tokio::sync::watch::Sender::new(moving(&addr)));
        assert!(table::route(&view.borrow(), 7).unwrap().moving);
        let pool = CellPool::new(view.clone());
        let call = |deadline: Instant| {
            let message = TransferRequest { transfer_id: b"t".to_vec(), ..Default::default() };
            pool.call(|t| table::route(t, 7), deadline, message, |mut c, r| async move { c.transfer(r).await })
        };
        let refused = call(Instant::now() + Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("slice 0 is moving"), "{}", refused.message());
        assert!(seen.lock().unwrap().is_empty(), "nothing was sent while the slice moved");
        // The move ends 200 ms into the next call: it is served then.
        let ended = view.clone();
        let addr_later = addr.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ended.send_replace(table(&addr_later, 1));
        });
        let started = std::time::Instant::now();
        let answer = call(Instant::now() + Duration::from_secs(5)).await.expect("served once the move ended");
        assert_eq!(answer.result.unwrap().code, ResultCode::Ok as i32);
        assert!(started.elapsed() >= Duration::from_millis(190), "it waited for the table");
        assert_eq!(seen.lock().unwrap().len(), 1, "sent once, after the move");
    }

    #[tokio::test]
    async fn without_a_newer_table_the_router_gives_up_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cell = FakeCell { epoch: 3, seen: Arc::new(Mutex::new(Vec::new())) };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LedgerServer::new(cell))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let pool = CellPool::new(Arc::new(tokio::sync::watch::Sender::new(table(&addr, 1))));
        let message = TransferRequest { transfer_id: b"t".to_vec(), ..Default::default() };
        let deadline = Instant::now() + Duration::from_millis(600);
        let error = pool
            .call(|t| table::route(t, 7), deadline, message, |mut c, r| async move { c.transfer(r).await })
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable, "the cell's refusal, not a success: {error:?}");
    }
}
