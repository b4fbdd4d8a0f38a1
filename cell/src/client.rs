//! A client of a cell that follows the leader: it remembers which replica
//! led last, switches when a replica answers UNAVAILABLE naming another
//! leader, tries the next replica when one is unreachable, and retries
//! retryable errors with backoff until the call's deadline. Retrying a write
//! is safe because every movement carries its transfer id.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::LEADER_ADDR_METADATA_KEY;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(10);
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);
pub const CALL_DEADLINE_DEFAULT: Duration = Duration::from_secs(15);
/// Per-attempt RPC timeout.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    /// Index into `endpoints` of the replica believed to lead.
    current: usize,
    channels: Vec<Option<Channel>>,
}

pub struct CellClient {
    endpoints: Vec<String>,
    state: Mutex<State>,
    pub deadline: Duration,
}

fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::ResourceExhausted)
}

impl CellClient {
    /// `endpoints`: the replicas' gRPC addresses (`host:port`).
    pub fn new(endpoints: Vec<String>) -> CellClient {
        assert!(!endpoints.is_empty(), "a client needs at least one endpoint");
        let channels = vec![None; endpoints.len()];
        CellClient { endpoints, state: Mutex::new(State { current: 0, channels }), deadline: CALL_DEADLINE_DEFAULT }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, index: usize) -> Channel {
        let mut state = self.state.lock().expect("client lock");
        if let Some(channel) = &state.channels[index] {
            return channel.clone();
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.endpoints[index]))
            .expect("valid endpoint")
            .connect_timeout(Duration::from_millis(500))
            .timeout(ATTEMPT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        state.channels[index] = Some(channel.clone());
        channel
    }

    fn current(&self) -> usize {
        self.state.lock().expect("client lock").current
    }

    fn follow(&self, failed: usize, status: &Status) {
        let leader = status.metadata().get(LEADER_ADDR_METADATA_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut state = self.state.lock().expect("client lock");
        if state.current != failed {
            return;
        }
        let hinted = leader.and_then(|addr| self.endpoints.iter().position(|e| *e == addr));
        state.current = match hinted {
            Some(index) if index != failed => index,
            _ => (failed + 1) % self.endpoints.len(),
        };
    }

    /// Calls `f` on the leader's Ledger client, retrying as described above.
    pub async fn ledger<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(LedgerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut redirects_free = 2;
        loop {
            let index = self.current();
            let client = LedgerClient::new(self.channel(index))
                .max_decoding_message_size(16 * 1024 * 1024)
                .max_encoding_message_size(16 * 1024 * 1024);
            match f(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retryable(&status) && started.elapsed() + backoff < self.deadline => {
                    let hinted = status.metadata().get(LEADER_ADDR_METADATA_KEY).is_some();
                    self.follow(index, &status);
                    if hinted && redirects_free > 0 {
                        redirects_free -= 1;
                    } else {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                    }
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// The admin client of one replica, by index.
    pub fn admin(&self, index: usize) -> ReplicaAdminClient<Channel> {
        ReplicaAdminClient::new(self.channel(index))
    }
}
