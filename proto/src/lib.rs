//! cellbank's gRPC contracts, generated from `proto/cellbank/**.proto`.
//!
//! - [`v1`]: the public `cellbank.v1.Ledger` API that clients call.
//! - [`cell`]: internal services of a cell replica (Raft transport, snapshots,
//!   status, membership) and the command encoding of Raft entries.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod v1 {
    tonic::include_proto!("cellbank.v1");
}

pub mod cell {
    tonic::include_proto!("cellbank.cell.v1");
}

/// Encoded `FileDescriptorSet` of every cellbank proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cellbank_descriptor");

/// Most transfers one `SubmitTransfers` call may carry.
pub const SUBMIT_TRANSFERS_ITEMS_MAX: usize = 8189;

/// gRPC metadata key carrying the leader's client address on an UNAVAILABLE answer.
pub const LEADER_ADDR_METADATA_KEY: &str = "cellbank-leader-addr";
