//! [`ClusterClient`]: the routers' admin API, following the coordinator (the
//! routers' Raft leader): the cluster's status, the operator's actions, the
//! audit log and the settlement figures. The CLI, the benchmarks, the
//! drills and the tests use it; so can an internal service.
//!
//! A router that is not the coordinator refuses an action with UNAVAILABLE
//! and the coordinator's address; the call goes there at once. Otherwise it
//! is retried at the next router after a wait ([`RetryPolicy::OPERATOR`]),
//! a bounded number of times. An action whose outcome is unknown (the
//! connection broke with it on it) is not repeated: a failover must not run
//! twice because its first answer was lost.

use std::collections::VecDeque;
use std::time::Duration;

use cellbank_proto::router::router_admin_client::RouterAdminClient;
use cellbank_proto::router::*;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::Status;

use crate::channel::{self, ChannelSettings};
use crate::retry::{self, RetryPolicy};

/// How long an admin action may take (a switchover waits for the standby).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(addr: &str) -> Result<RouterAdminClient<Channel>, Status> {
    let channel = ChannelSettings::OPERATOR
        .connect_to(&crate::planes::Plane::Admin.of(addr), crate::tls::Expect::Router)
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach router {addr}: {e}")))?;
    Ok(channel::router_admin(channel))
}

/// A client of the routers' admin API: the routers' addresses and the
/// admin token (`authorization: Bearer`), if the routers require one.
#[derive(Clone, Debug)]
pub struct ClusterClient {
    endpoints: Vec<String>,
    token: Option<String>,
}

impl ClusterClient {
    pub fn new(endpoints: &[String], token: Option<&str>) -> ClusterClient {
        ClusterClient { endpoints: endpoints.to_vec(), token: token.map(str::to_string) }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Calls `call` on the coordinator, following leader hints from the
    /// other routers. `idempotent`: whether a call whose outcome is unknown
    /// may be sent again (a status read, yes; an operator's action, no).
    /// `call` gets the metadata to send (see [`request`]).
    pub async fn call<T, F, Fut>(&self, idempotent: bool, call: F) -> Result<T, Status>
    where
        F: Fn(RouterAdminClient<Channel>, MetadataMap) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut queue: VecDeque<String> = self.endpoints.iter().cloned().collect();
        let mut last = Status::unavailable("no router reachable");
        let mut backoff = RetryPolicy::OPERATOR.backoff();
        let mut attempts = 0;
        while let Some(addr) = queue.pop_front() {
            attempts += 1;
            if attempts > self.endpoints.len() * 3 + 3 {
                break;
            }
            let client = match connect(&addr).await {
                Ok(client) => client,
                Err(status) => {
                    // Not connected: nothing was sent.
                    last = status;
                    queue.push_back(addr);
                    tokio::time::sleep(backoff.next_delay(false)).await;
                    continue;
                }
            };
            match call(client, self.metadata()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retry::retryable(&status, idempotent) => {
                    match retry::leader_hint(&status) {
                        Some(hint) => queue.push_front(hint.to_string()),
                        None => queue.push_back(addr.clone()),
                    }
                    let delay = backoff.after(&status, queue.front() == Some(&addr));
                    tokio::time::sleep(delay).await;
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }

    /// The metadata every call sends: the admin token, if any.
    pub fn metadata(&self) -> MetadataMap {
        with_token(self.token.as_deref())
    }

    /// The cluster as the coordinator sees it: the routing table, every
    /// pair's health, every cell's replicas.
    pub async fn status(&self) -> Result<ClusterStatus, Status> {
        self.call(true, |mut c, m| async move { c.status(request(ClusterStatusRequest {}, m)).await }).await
    }

    /// Makes the routers treat `cell_ids` as unreachable for `duration` (an
    /// injected fault; the routers' config must allow it). Every router is
    /// told.
    pub async fn isolate_cells(&self, cell_ids: &[u64], duration: Duration) -> Result<(), Status> {
        for addr in &self.endpoints {
            let mut client = connect(addr).await?;
            let message = IsolateCellsRequest { cell_ids: cell_ids.to_vec(), duration_ms: duration.as_millis() as u64 };
            client.isolate_cells(request(message, self.metadata())).await?;
        }
        Ok(())
    }

    /// A planned switchover (not repeated if its outcome is unknown).
    pub async fn switchover(&self, message: SwitchoverRequest) -> Result<AdminActionResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.switchover(request(message, m)).await }
        })
        .await
    }

    /// An operator's failover (not repeated if its outcome is unknown).
    pub async fn failover(&self, message: FailoverRequest) -> Result<AdminActionResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.failover(request(message, m)).await }
        })
        .await
    }

    /// Rebuilds a pair's standby from a snapshot (not repeated if its
    /// outcome is unknown).
    pub async fn rebuild_standby(&self, message: RebuildStandbyRequest) -> Result<AdminActionResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.rebuild_standby(request(message, m)).await }
        })
        .await
    }

    /// Adds a pair of new cells with no slices (not repeated if its outcome
    /// is unknown).
    pub async fn add_pair(&self, message: AddPairRequest) -> Result<AdminActionResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.add_pair(request(message, m)).await }
        })
        .await
    }

    /// Moves a slice to another pair (not repeated if its outcome is
    /// unknown: the table shows whether the move ended).
    pub async fn move_slice(&self, message: MoveSliceRequest) -> Result<MoveSliceResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.move_slice(request(message, m)).await }
        })
        .await
    }

    /// Sets a cell's replica addresses in the table (not repeated if its
    /// outcome is unknown: the table shows whether it applied).
    pub async fn set_cell_replicas(&self, message: SetCellReplicasRequest) -> Result<AdminActionResponse, Status> {
        self.call(false, |mut c, m| {
            let message = message.clone();
            async move { c.set_cell_replicas(request(message, m)).await }
        })
        .await
    }

    /// The routers' audit log of operator and coordinator actions.
    pub async fn audit_log(&self) -> Result<Vec<AuditRecord>, Status> {
        let response =
            self.call(true, |mut c, m| async move { c.audit_log(request(AuditLogRequest {}, m)).await }).await?;
        Ok(response.records)
    }

    /// The money credited across pairs in `[from_ms, to_ms)` (0: open).
    pub async fn settlement(
        &self,
        message: cellbank_proto::cell::SettlementRequest,
    ) -> Result<ClusterSettlement, Status> {
        self.call(true, |mut c, m| async move { c.settlement(request(message, m)).await }).await
    }
}

/// `authorization: Bearer <token>` metadata (empty without a token), as
/// the routers' admin API and a replica's fault points read it.
pub fn with_token(token: Option<&str>) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    if let Some(token) = token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            metadata.insert("authorization", value);
        }
    }
    metadata
}

/// A request with the given metadata (the admin token) and the admin time
/// limit.
pub fn request<T>(message: T, metadata: MetadataMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata;
    request.set_timeout(ADMIN_TIMEOUT);
    request
}
