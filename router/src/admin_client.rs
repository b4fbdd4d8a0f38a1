//! Calls to the routers' admin API that follow the coordinator: shared by
//! the CLI, the benchmarks and the tests.

use std::time::Duration;

use cellbank_proto::router::router_admin_client::RouterAdminClient;
use cellbank_proto::router::*;
use cellbank_proto::LEADER_ADDR_METADATA_KEY;
use tonic::transport::{Channel, Endpoint};

/// How long an admin action may take (a switchover waits for the standby).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(addr: &str) -> anyhow::Result<RouterAdminClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach router {addr}: {e}"))?;
    Ok(RouterAdminClient::new(channel))
}

/// Calls `call` on the coordinator, following leader hints from the other routers.
pub async fn on_coordinator<T, F, Fut>(endpoints: &[String], token: Option<&str>, call: F) -> Result<T, tonic::Status>
where
    F: Fn(RouterAdminClient<Channel>, tonic::metadata::MetadataMap) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut queue: std::collections::VecDeque<String> = endpoints.iter().cloned().collect();
    let mut last = tonic::Status::unavailable("no router reachable");
    let mut attempts = 0;
    while let Some(addr) = queue.pop_front() {
        attempts += 1;
        if attempts > endpoints.len() * 3 + 3 {
            break;
        }
        let client = match connect(&addr).await {
            Ok(client) => client,
            Err(e) => {
                last = tonic::Status::unavailable(e.to_string());
                continue;
            }
        };
        match call(client, with_token(token)).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if let Some(hint) = status.metadata().get(LEADER_ADDR_METADATA_KEY).and_then(|v| v.to_str().ok()) {
                    queue.push_front(hint.to_string());
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    queue.push_back(addr);
                }
                last = status;
            }
            Err(status) => return Err(status),
        }
    }
    Err(last)
}

pub fn request<T>(message: T, metadata: tonic::metadata::MetadataMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata;
    request.set_timeout(ADMIN_TIMEOUT);
    request
}

pub async fn cluster_status(endpoints: &[String], token: Option<&str>) -> Result<ClusterStatus, tonic::Status> {
    on_coordinator(endpoints, token, |mut c, m| async move { c.status(request(ClusterStatusRequest {}, m)).await })
        .await
}

/// Makes the routers treat `cell_ids` as unreachable for `duration` (an
/// injected fault; the routers' config must allow it). Every router is told.
pub async fn isolate_cells(
    endpoints: &[String],
    token: Option<&str>,
    cell_ids: &[u64],
    duration: Duration,
) -> anyhow::Result<()> {
    for addr in endpoints {
        let mut client = connect(addr).await?;
        let metadata = with_token(token);
        let message = IsolateCellsRequest { cell_ids: cell_ids.to_vec(), duration_ms: duration.as_millis() as u64 };
        client.isolate_cells(request(message, metadata)).await?;
    }
    Ok(())
}

/// `authorization: Bearer <token>` metadata (empty without a token).
pub fn with_token(token: Option<&str>) -> tonic::metadata::MetadataMap {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Some(token) = token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            metadata.insert("authorization", value);
        }
    }
    metadata
}

pub async fn switchover(
    endpoints: &[String],
    token: Option<&str>,
    message: SwitchoverRequest,
) -> Result<AdminActionResponse, tonic::Status> {
    on_coordinator(endpoints, token, |mut c, m| {
        let message = message.clone();
        async move { c.switchover(request(message, m)).await }
    })
    .await
}

pub async fn failover(
    endpoints: &[String],
    token: Option<&str>,
    message: FailoverRequest,
) -> Result<AdminActionResponse, tonic::Status> {
    on_coordinator(endpoints, token, |mut c, m| {
        let message = message.clone();
        async move { c.failover(request(message, m)).await }
    })
    .await
}
