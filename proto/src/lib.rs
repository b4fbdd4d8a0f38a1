//! cellbank's gRPC contracts, generated from `proto/cellbank/**.proto`.
//!
//! - [`v1`]: the public `cellbank.v1.Ledger` API that clients call.
//! - [`cell`]: internal services of a cell replica (Raft transport, snapshots,
//!   status, membership, standby replication) and the command encoding of
//!   Raft entries.
//! - [`router`]: the routers' routing table and operator actions.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

/// The generated modules, nested as their packages are (one proto package
/// refers to another through `super::`).
pub mod cellbank {
    pub mod v1 {
        tonic::include_proto!("cellbank.v1");
    }
    pub mod cell {
        pub mod v1 {
            tonic::include_proto!("cellbank.cell.v1");
        }
    }
    pub mod router {
        pub mod v1 {
            tonic::include_proto!("cellbank.router.v1");
        }
    }
}

pub use cellbank::cell::v1 as cell;
pub use cellbank::router::v1 as router;
pub use cellbank::v1;

/// Encoded `FileDescriptorSet` of every cellbank proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cellbank_descriptor");

/// Most transfers one `SubmitTransfers` call may carry.
pub const SUBMIT_TRANSFERS_ITEMS_MAX: usize = 8189;

/// gRPC metadata key carrying the leader's client address on an UNAVAILABLE answer.
pub const LEADER_ADDR_METADATA_KEY: &str = "cellbank-leader-addr";

/// gRPC metadata key carrying a slice's routing epoch: set by routers on every
/// request to a cell, and by a cell on a refusal (its own epoch).
pub const EPOCH_METADATA_KEY: &str = "cellbank-epoch";
