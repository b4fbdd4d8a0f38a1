//! One cellbank cell replica: the ledger state machine on a Raft group
//! (the `cellbank-raft` crate: node, driver, RocksDB log, transport), stored
//! in RocksDB, served over gRPC.
//!
//! - [`ledger`]: the ledger state machine (input validation is in the
//!   client crate, shared with the routers).
//! - [`replication`]: the standby stream (shipper on the active's leader,
//!   acknowledged watermark, waits of sync mode).
//! - [`service`]: the gRPC services; [`server`] assembles a replica.
//! - [`clearing`]: money between cells (the `Clearing` service, the courier
//!   that delivers the outbox, the envelope expiry sweeper).
//!
//! Clients of a cell (channels, retries, leader following) live in the
//! `cellbank-client` crate.

// tonic::Status is the error type of every gRPC handler and helper here.
#![allow(clippy::result_large_err)]
// raft-rs's protobuf types are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod clearing;
pub mod config;
pub mod context;
pub mod disk;
pub mod ledger;
pub mod metrics;
pub mod replication;
pub mod server;
pub mod service;
