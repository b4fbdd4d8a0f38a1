//! The gRPC services of one replica, one file each: the public
//! `cellbank.v1.Ledger` API ([`ledger`]), `ReplicaAdmin` ([`admin`]) and the
//! standby side of replication ([`standby`]). The cell's `Clearing` service
//! is in `crate::clearing`; `RaftTransport` in the `cellbank-raft` crate.
//! What they share is in `crate::context`.

pub mod admin;
pub mod ledger;
pub mod moves;
pub mod standby;

pub use admin::AdminService;
pub use ledger::LedgerService;
pub use standby::StandbyService;
