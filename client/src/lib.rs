//! The one way to talk to cellbank, for every part of it and for the
//! internal services that link it:
//! - [`channel`]: gRPC channels built from named settings (connect
//!   timeout, keepalive, message limit), the only place a channel is made;
//! - [`retry`]: one retry policy (named bounds, full jitter), one rule for
//!   what may be retried, and the parsers of the hints a refusal carries
//!   (the leader's address, the cell's epoch);
//! - [`deadline`]: the `grpc-timeout` header a server reads its caller's
//!   deadline from;
//! - [`cell`]: a client of one cell that follows its leader.
//!
//! It depends on the protocol crate only.

// tonic::Status is the error of every call here, as of every gRPC client.
#![allow(clippy::result_large_err)]

pub mod cell;
pub mod channel;
pub mod deadline;
pub mod retry;
pub mod routers;

pub use cell::CellClient;

/// True when a replica's status says it leads its Raft group.
pub fn is_leader(status: &cellbank_proto::cell::ReplicaStatus) -> bool {
    status.raft_role == cellbank_proto::cell::RaftRole::Leader as i32
}
pub use channel::{ChannelSettings, MESSAGE_BYTES_MAX};
pub use retry::{retryable, Backoff, RetryPolicy};
