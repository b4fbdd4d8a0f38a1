//! Every gRPC channel cellbank opens is built here, from named settings.
//!
//! A channel is HTTP/2 to one address, multiplexing every call on it; the
//! settings say how long connecting may take, whether idle connections
//! are kept alive, and the default per-call time limit. The message size
//! limits are set on the typed clients ([`ledger`], [`admin`], ...), which
//! are made here too, so a limit is written once.

use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::clearing_client::ClearingClient;
use cellbank_proto::cell::raft_transport_client::RaftTransportClient;
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::standby_client::StandbyClient;
use cellbank_proto::router::courier_client::CourierClient;
use cellbank_proto::router::router_admin_client::RouterAdminClient;
use cellbank_proto::v1::ledger_client::LedgerClient;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{Credentials, Expect};

/// Largest client-facing message (a full `SubmitTransfers` batch fits).
pub const MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest message between replicas of a cell (Raft appends and snapshot
/// chunks).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest answer of a replica's `Audit` (the whole ledger's figures).
pub const AUDIT_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// How a channel connects and behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSettings {
    /// Longest a connection attempt may take.
    pub connect_timeout: Duration,
    /// Default time limit of each call (`None`: only the caller's deadline).
    pub call_timeout: Option<Duration>,
    /// HTTP/2 keepalive pings (interval, and how long an answer may take),
    /// sent even while idle, so a dead peer is noticed before a call needs it.
    pub keepalive: Option<(Duration, Duration)>,
}

impl ChannelSettings {
    /// A router's long-lived connections to the replicas of every cell, and
    /// a replica's to the routers (the courier): a dead replica must be
    /// left fast, the caller's deadline bounds each call.
    pub const INTERNAL: ChannelSettings = ChannelSettings {
        connect_timeout: Duration::from_millis(300),
        call_timeout: None,
        keepalive: Some((Duration::from_secs(10), Duration::from_secs(20))),
    };
    /// Between the replicas of one cell (Raft messages) and from an active
    /// cell to its standby (shipping).
    pub const PEER: ChannelSettings = ChannelSettings {
        connect_timeout: Duration::from_millis(500),
        call_timeout: None,
        keepalive: Some((Duration::from_secs(5), Duration::from_secs(5))),
    };
    /// An application's calls to a cell or a router ([`crate::CellClient`]).
    pub const SERVICE: ChannelSettings = ChannelSettings {
        connect_timeout: Duration::from_millis(500),
        call_timeout: Some(Duration::from_secs(5)),
        keepalive: Some((Duration::from_secs(10), Duration::from_secs(20))),
    };
    /// Operators' and tools' calls (the CLI, drills, reconciliation): a
    /// router or replica may be busy, an admin action may take seconds.
    pub const OPERATOR: ChannelSettings = ChannelSettings {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Some(Duration::from_secs(30)),
        keepalive: None,
    };

    /// The endpoint of `addr` (`host:port`) under these settings.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        let mut endpoint =
            Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(self.connect_timeout).tcp_nodelay(true);
        if let Some(timeout) = self.call_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some((interval, timeout)) = self.keepalive {
            endpoint =
                endpoint.http2_keep_alive_interval(interval).keep_alive_timeout(timeout).keep_alive_while_idle(true);
        }
        Ok(endpoint)
    }

    /// A channel that connects on its first call (and again after a
    /// failure): for long-lived connections to peers that may be down.
    /// Over TLS with the process's credentials when it has them
    /// ([`crate::tls::use_credentials`]), to any process of the cluster.
    pub fn lazy(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.lazy_to(addr, Expect::Any)
    }

    /// A channel connected now, or the reason it could not be.
    pub async fn connect(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        self.connect_to(addr, Expect::Any).await
    }

    /// [`ChannelSettings::lazy`] to a server whose certificate `expect`
    /// accepts (a router's channel to a cell's replicas, say).
    pub fn lazy_to(&self, addr: &str, expect: Expect) -> Result<Channel, tonic::transport::Error> {
        self.lazy_with(addr, crate::tls::process_credentials().as_ref(), expect)
    }

    /// [`ChannelSettings::connect`] to a server whose certificate `expect`
    /// accepts.
    pub async fn connect_to(&self, addr: &str, expect: Expect) -> Result<Channel, tonic::transport::Error> {
        self.connect_with(addr, crate::tls::process_credentials().as_ref(), expect).await
    }

    /// [`ChannelSettings::lazy`] with the given credentials (`None`:
    /// plaintext) instead of the process's.
    pub fn lazy_as(&self, addr: &str, tls: Option<&Arc<Credentials>>) -> Result<Channel, tonic::transport::Error> {
        self.lazy_with(addr, tls, Expect::Any)
    }

    /// [`ChannelSettings::connect`] with the given credentials (`None`:
    /// plaintext) instead of the process's.
    pub async fn connect_as(
        &self,
        addr: &str,
        tls: Option<&Arc<Credentials>>,
    ) -> Result<Channel, tonic::transport::Error> {
        self.connect_with(addr, tls, Expect::Any).await
    }

    fn lazy_with(
        &self,
        addr: &str,
        tls: Option<&Arc<Credentials>>,
        expect: Expect,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = self.endpoint(addr)?;
        Ok(match tls {
            Some(credentials) => {
                endpoint.connect_with_connector_lazy(crate::tls::connector(credentials.clone(), None, expect))
            }
            None => endpoint.connect_lazy(),
        })
    }

    async fn connect_with(
        &self,
        addr: &str,
        tls: Option<&Arc<Credentials>>,
        expect: Expect,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = self.endpoint(addr)?;
        match tls {
            Some(credentials) => {
                endpoint.connect_with_connector(crate::tls::connector(credentials.clone(), None, expect)).await
            }
            None => endpoint.connect().await,
        }
    }
}

/// The public ledger API, with the client message limit.
pub fn ledger(channel: Channel) -> LedgerClient<Channel> {
    LedgerClient::new(channel).max_decoding_message_size(MESSAGE_BYTES_MAX).max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// A cell's internal clearing service (credits in).
pub fn clearing(channel: Channel) -> ClearingClient<Channel> {
    ClearingClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// A router's courier service (credits out of a cell).
pub fn courier(channel: Channel) -> CourierClient<Channel> {
    CourierClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// A replica's admin service; its `Audit` answers may be large.
pub fn admin(channel: Channel) -> ReplicaAdminClient<Channel> {
    ReplicaAdminClient::new(channel)
        .max_decoding_message_size(AUDIT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// The routers' admin service.
pub fn router_admin(channel: Channel) -> RouterAdminClient<Channel> {
    RouterAdminClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

/// A standby cell's replication service, with the given message limit
/// (the shipper's batches).
pub fn standby(channel: Channel, message_bytes_max: usize) -> StandbyClient<Channel> {
    StandbyClient::new(channel)
        .max_decoding_message_size(message_bytes_max)
        .max_encoding_message_size(message_bytes_max)
}

/// Raft messages between the replicas of one group.
pub fn raft_transport(channel: Channel) -> RaftTransportClient<Channel> {
    RaftTransportClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_that_is_not_host_and_port_is_refused() {
        assert!(ChannelSettings::INTERNAL.endpoint("127.0.0.1:7000").is_ok());
        assert!(ChannelSettings::INTERNAL.endpoint("not an address").is_err());
    }

    #[tokio::test]
    async fn a_lazy_channel_connects_on_its_first_call_and_reports_a_closed_port() {
        // A port nothing listens on: bound, then released.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let channel = ChannelSettings::SERVICE.lazy(&addr).unwrap();
        let status = admin(channel).status(cellbank_proto::cell::StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(ChannelSettings::OPERATOR.connect(&addr).await.is_err());
    }
}
