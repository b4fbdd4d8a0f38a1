//! A client of one cell that follows its leader: it remembers which replica
//! led last, switches when a replica's refusal names another leader, tries
//! the next replica when one is unreachable, and retries what
//! [`crate::retry::retryable`] allows, with the waits of
//! [`RetryPolicy::SERVICE`], until the call's deadline. Every ledger write
//! carries its transfer id, so its calls are idempotent: a repeat finds the
//! first outcome.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::{ReplicaStatus, StatusRequest};
use cellbank_proto::v1;
use cellbank_proto::v1::ledger_client::LedgerClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::channel::{self, ChannelSettings};
use crate::planes::Plane;
use crate::retry::{self, RetryPolicy};

/// How long one call may take, retries included, unless set otherwise.
pub const CALL_DEADLINE_DEFAULT: Duration = Duration::from_secs(15);

struct State {
    /// Index into `endpoints` of the replica believed to lead.
    current: usize,
    /// Per endpoint: the client plane's channel, the admin plane's.
    channels: Vec<[Option<Channel>; 2]>,
}

pub struct CellClient {
    endpoints: Vec<String>,
    state: Mutex<State>,
    settings: ChannelSettings,
    policy: RetryPolicy,
    /// How long one call may take, retries included.
    pub deadline: Duration,
}

impl CellClient {
    /// `endpoints`: the replicas' gRPC addresses (`host:port`).
    pub fn new(endpoints: Vec<String>) -> CellClient {
        CellClient::with_settings(endpoints, ChannelSettings::SERVICE, RetryPolicy::SERVICE)
    }

    pub fn with_settings(endpoints: Vec<String>, settings: ChannelSettings, policy: RetryPolicy) -> CellClient {
        assert!(!endpoints.is_empty(), "a client needs at least one endpoint");
        let channels = vec![[None, None]; endpoints.len()];
        CellClient {
            endpoints,
            state: Mutex::new(State { current: 0, channels }),
            settings,
            policy,
            deadline: CALL_DEADLINE_DEFAULT,
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, index: usize, plane: Plane) -> Result<Channel, Status> {
        let slot = usize::from(plane != Plane::Client);
        let mut state = self.state.lock().expect("client lock");
        if let Some(channel) = &state.channels[index][slot] {
            return Ok(channel.clone());
        }
        let addr = plane.of(&self.endpoints[index]);
        let channel = self
            .settings
            .lazy(&addr)
            .map_err(|e| Status::invalid_argument(format!("endpoint {addr:?} is not host:port: {e}")))?;
        state.channels[index][slot] = Some(channel.clone());
        Ok(channel)
    }

    fn current(&self) -> usize {
        self.state.lock().expect("client lock").current
    }

    /// After a failure at `failed`: the named leader, else the next replica.
    /// Returns the replica tried next.
    fn follow(&self, failed: usize, status: &Status) -> usize {
        let mut state = self.state.lock().expect("client lock");
        if state.current != failed {
            return state.current;
        }
        let hinted = retry::leader_hint(status).and_then(|addr| self.endpoints.iter().position(|e| e == addr));
        state.current = match hinted {
            Some(index) if index != failed => index,
            _ => (failed + 1) % self.endpoints.len(),
        };
        state.current
    }

    /// Calls `f` on the leader's Ledger client, retrying as described above.
    pub async fn ledger<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(LedgerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.policy.backoff();
        loop {
            let index = self.current();
            let client = channel::ledger(self.channel(index, Plane::Client)?);
            match f(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retry::retryable(&status, true) => {
                    let next = self.follow(index, &status);
                    let delay = backoff.after(&status, next == index);
                    if started.elapsed() + delay >= self.deadline {
                        return Err(status);
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Opens an account (idempotent: the same account again is answered the same).
    pub async fn open_account(&self, request: v1::OpenAccountRequest) -> Result<v1::OpenAccountResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.open_account(request).await }
        })
        .await
    }

    /// Deposits money from outside (by its transfer id, once).
    pub async fn deposit(&self, request: v1::DepositRequest) -> Result<v1::TransferResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.deposit(request).await }
        })
        .await
    }

    /// Withdraws money (by its transfer id, once).
    pub async fn withdraw(&self, request: v1::WithdrawRequest) -> Result<v1::TransferResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.withdraw(request).await }
        })
        .await
    }

    /// Moves money between two users (by its transfer id, once).
    pub async fn transfer(&self, request: v1::TransferRequest) -> Result<v1::TransferResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.transfer(request).await }
        })
        .await
    }

    /// A batch of transfers, each by its own transfer id.
    pub async fn submit_transfers(
        &self,
        request: v1::SubmitTransfersRequest,
    ) -> Result<v1::SubmitTransfersResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.submit_transfers(request).await }
        })
        .await
    }

    /// An account's balances.
    pub async fn get_account(&self, request: v1::GetAccountRequest) -> Result<v1::GetAccountResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.get_account(request).await }
        })
        .await
    }

    /// A transfer's outcome by its id.
    pub async fn get_transfer(&self, request: v1::GetTransferRequest) -> Result<v1::GetTransferResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.get_transfer(request).await }
        })
        .await
    }

    /// A user's history, a page at a time.
    pub async fn list_transfers(&self, request: v1::ListTransfersRequest) -> Result<v1::ListTransfersResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.list_transfers(request).await }
        })
        .await
    }

    /// Sends a red envelope (by its id, once).
    pub async fn send_envelope(&self, request: v1::SendEnvelopeRequest) -> Result<v1::SendEnvelopeResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.send_envelope(request).await }
        })
        .await
    }

    /// Grabs a share of an envelope (one per user).
    pub async fn grab_envelope(&self, request: v1::GrabEnvelopeRequest) -> Result<v1::GrabEnvelopeResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.grab_envelope(request).await }
        })
        .await
    }

    /// An envelope's state and shares.
    pub async fn get_envelope(&self, request: v1::GetEnvelopeRequest) -> Result<v1::GetEnvelopeResponse, Status> {
        self.ledger(|mut c| {
            let request = request.clone();
            async move { c.get_envelope(request).await }
        })
        .await
    }

    /// The admin client of one replica, by index.
    pub fn admin(&self, index: usize) -> Result<ReplicaAdminClient<Channel>, Status> {
        Ok(channel::admin(self.channel(index, Plane::Admin)?))
    }

    /// The index and status of the replica that says it leads, asking each
    /// in turn once; UNAVAILABLE when none does (an election, or none
    /// reachable).
    pub async fn find_leader(&self) -> Result<(usize, ReplicaStatus), Status> {
        for index in 0..self.endpoints.len() {
            if let Ok(status) = self.admin(index)?.status(StatusRequest {}).await {
                let status = status.into_inner();
                if crate::is_leader(&status) {
                    self.state.lock().expect("client lock").current = index;
                    return Ok((index, status));
                }
            }
        }
        Err(crate::errors::not_leader(format!("no replica among {:?} leads", self.endpoints), None))
    }

    /// [`Self::find_leader`] until one answers or `timeout` passes.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<(usize, ReplicaStatus), Status> {
        let started = Instant::now();
        let mut backoff = self.policy.backoff();
        loop {
            match self.find_leader().await {
                Ok(found) => return Ok(found),
                Err(status) => {
                    // Every replica was asked: the next round asks them again.
                    let delay = backoff.after(&status, true);
                    if started.elapsed() + delay >= timeout {
                        return Err(status);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
