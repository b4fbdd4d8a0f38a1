//! The one way to talk to cellbank, for every part of it and for the
//! internal services that link it:
//! - [`channel`]: gRPC channels built from named settings (connect
//!   timeout, keepalive, message limit), the only place a channel is made;
//! - [`retry`]: one retry policy (named bounds, full jitter), one rule for
//!   what may be retried, and the parsers of the hints a refusal carries
//!   (the leader's address, the cell's epoch);
//! - [`clock`]: the wall clock in milliseconds since the Unix epoch;
//! - [`deadline`]: the `grpc-timeout` header a server reads its caller's
//!   deadline from;
//! - [`errors`]: the structured details every refusal carries (the bad
//!   field, the reason, the leader's address);
//! - [`batch`]: coalescing of concurrent calls into batched ones (the
//!   routers' calls to cells), and [`ledger`]: a service's opt-in
//!   coalescing of its unary transfers into `SubmitTransfers`;
//! - [`cell`]: a client of one cell that follows its leader;
//! - [`routers`]: [`ClusterClient`], the routers' admin API (status,
//!   operator actions, audit log), following the coordinator;
//! - [`validate`] and [`currency`]: the rules a request must meet, checked
//!   by the routers before they forward it and by the cell before it
//!   proposes (and again when it applies);
//! - [`pair`]: how a cell's pair state is read (its role, its mode, whether
//!   it waits for its standby);
//! - [`planes`]: the client, peer and admin planes every process serves
//!   on its own listeners, and their ports;
//! - [`server`]: the listeners, gates and settings of every server of the
//!   project, and reflection;
//! - [`slices`]: which slice a user is in;
//! - [`tls`]: mutual TLS, the identities certificates carry, credentials
//!   that reload, the accept loop of every server;
//! - [`gate`]: who may call what (the policy layer of every server) and
//!   [`throttle`], the backoff of callers that are refused.
//!
//! It depends on the protocol crate only.

// tonic::Status is the error of every call here, as of every gRPC client.
#![allow(clippy::result_large_err)]

pub mod batch;
pub mod cell;
pub mod channel;
pub mod clock;
pub mod currency;
pub mod deadline;
pub mod errors;
pub mod gate;
pub mod integrity;
pub mod ledger;
pub mod pair;
pub mod planes;
pub mod retry;
pub mod routers;
pub mod server;
pub mod slices;
pub mod throttle;
pub mod tls;
pub mod trace;
pub mod validate;

pub use cell::CellClient;
pub use channel::{ChannelSettings, MESSAGE_BYTES_MAX};
pub use retry::{retryable, Backoff, RetryPolicy};
pub use routers::ClusterClient;

/// True when a replica's status says it leads its Raft group. A replica
/// built before `raft_role` existed leaves it unset and says so in the text
/// field, which is read then.
pub fn is_leader(status: &cellbank_proto::cell::ReplicaStatus) -> bool {
    use cellbank_proto::cell::RaftRole;
    match RaftRole::try_from(status.raft_role) {
        Ok(RaftRole::Unspecified) => status.role == "leader",
        Ok(role) => role == RaftRole::Leader,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use cellbank_proto::cell::{RaftRole, ReplicaStatus};

    #[test]
    fn the_role_enum_decides_and_an_older_replica_is_read_from_its_text() {
        let status = |raft_role: RaftRole, role: &str| ReplicaStatus {
            raft_role: raft_role as i32,
            role: role.into(),
            ..Default::default()
        };
        assert!(super::is_leader(&status(RaftRole::Leader, "leader")));
        assert!(!super::is_leader(&status(RaftRole::Follower, "follower")));
        assert!(!super::is_leader(&status(RaftRole::Candidate, "leader")), "the enum wins");
        assert!(super::is_leader(&status(RaftRole::Unspecified, "leader")), "an older replica");
        assert!(!super::is_leader(&status(RaftRole::Unspecified, "follower")));
        assert!(!super::is_leader(&ReplicaStatus { raft_role: 99, role: "leader".into(), ..Default::default() }));
    }
}
