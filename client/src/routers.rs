//! Calls to the routers' admin API, following the coordinator (the routers'
//! Raft leader): the CLI, the benchmarks, the drills and the tests use it.
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
        .connect(addr)
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach router {addr}: {e}")))?;
    Ok(channel::router_admin(channel))
}

/// Calls `call` on the coordinator, following leader hints from the other
/// routers. `idempotent`: whether a call whose outcome is unknown may be
/// sent again (a status read, yes; an operator's action, no).
pub async fn on_coordinator<T, F, Fut>(
    endpoints: &[String],
    token: Option<&str>,
    idempotent: bool,
    call: F,
) -> Result<T, Status>
where
    F: Fn(RouterAdminClient<Channel>, MetadataMap) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut queue: VecDeque<String> = endpoints.iter().cloned().collect();
    let mut last = Status::unavailable("no router reachable");
    let mut backoff = RetryPolicy::OPERATOR.backoff();
    let mut attempts = 0;
    while let Some(addr) = queue.pop_front() {
        attempts += 1;
        if attempts > endpoints.len() * 3 + 3 {
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
        match call(client, with_token(token)).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if retry::retryable(&status, idempotent) => {
                let hint = retry::leader_hint(&status).map(str::to_string);
                let delay = backoff.next_delay(hint.is_some());
                match hint {
                    Some(hint) => queue.push_front(hint),
                    None => queue.push_back(addr),
                }
                tokio::time::sleep(delay).await;
                last = status;
            }
            Err(status) => return Err(status),
        }
    }
    Err(last)
}

/// A request with the admin token's metadata and the admin time limit.
pub fn request<T>(message: T, metadata: MetadataMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata;
    request.set_timeout(ADMIN_TIMEOUT);
    request
}

/// `authorization: Bearer <token>` metadata (empty without a token).
pub fn with_token(token: Option<&str>) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    if let Some(token) = token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            metadata.insert("authorization", value);
        }
    }
    metadata
}

pub async fn cluster_status(endpoints: &[String], token: Option<&str>) -> Result<ClusterStatus, Status> {
    on_coordinator(
        endpoints,
        token,
        true,
        |mut c, m| async move { c.status(request(ClusterStatusRequest {}, m)).await },
    )
    .await
}

/// Makes the routers treat `cell_ids` as unreachable for `duration` (an
/// injected fault; the routers' config must allow it). Every router is told.
pub async fn isolate_cells(
    endpoints: &[String],
    token: Option<&str>,
    cell_ids: &[u64],
    duration: Duration,
) -> Result<(), Status> {
    for addr in endpoints {
        let mut client = connect(addr).await?;
        let message = IsolateCellsRequest { cell_ids: cell_ids.to_vec(), duration_ms: duration.as_millis() as u64 };
        client.isolate_cells(request(message, with_token(token))).await?;
    }
    Ok(())
}

pub async fn switchover(
    endpoints: &[String],
    token: Option<&str>,
    message: SwitchoverRequest,
) -> Result<AdminActionResponse, Status> {
    on_coordinator(endpoints, token, false, |mut c, m| {
        let message = message.clone();
        async move { c.switchover(request(message, m)).await }
    })
    .await
}

pub async fn failover(
    endpoints: &[String],
    token: Option<&str>,
    message: FailoverRequest,
) -> Result<AdminActionResponse, Status> {
    on_coordinator(endpoints, token, false, |mut c, m| {
        let message = message.clone();
        async move { c.failover(request(message, m)).await }
    })
    .await
}
