//! One cellbank cell replica: a Raft node (tikv `raft`) whose state machine
//! is the ledger, stored in RocksDB, served over gRPC.
//!
//! - [`raft`]: generic Raft machinery (storage, node, driver thread,
//!   transport), reused by every replicated group.
//! - [`ledger`]: the ledger state machine and input validation.
//! - [`replication`]: the standby stream (shipper on the active's leader,
//!   acknowledged watermark, waits of sync mode).
//! - [`service`]: the gRPC services; [`server`] assembles a replica.
//! - [`clearing`]: money between cells (the `Clearing` service, the courier
//!   that delivers the outbox, the envelope expiry sweeper).
//! - [`faults`]: fault points for chaos drills (cargo feature `fault-points`).
//! - [`mutation`]: deliberate bugs the simulator's mutation checks turn on.
//!
//! Clients of a cell (channels, retries, leader following) live in the
//! `cellbank-client` crate.

// tonic::Status is the error type of every gRPC handler and helper here.
#![allow(clippy::result_large_err)]
// raft-rs's protobuf types are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod clearing;
pub mod config;
pub mod faults;
pub mod ledger;
pub mod metrics;
pub mod mutation;
pub mod raft;
pub mod replication;
pub mod server;
pub mod service;
