//! A cellbank router: the front door clients call, and one member of the
//! routers' Raft group that replicates the routing table.
//!
//! - [`table`]: the routing table state machine (slices, pairs, epochs,
//!   audit log) and the user-to-slice hash.
//! - [`cells`]: connections to every cell replica and the retry loop.
//! - [`front`]: `cellbank.v1.Ledger` for clients; [`grabs`] coalesces
//!   envelope grabs per cell.
//! - [`courier`]: carries cross-cell credits to their destination cells.
//! - [`coordinator`]: health probes, failover, degraded mode, switchover
//!   (active on the group's leader only).
//! - [`admin`]: the operators' API; [`admin_client`]: calls to it that
//!   follow the coordinator (CLI, drills, tests).
//! - [`reconcile`]: the cluster-wide reconciliation behind `admin reconcile`.
//! - [`load`]: requests, writes and bytes carried to each slice.
//! - [`metrics`]: the router's Prometheus metrics.
//! - [`server`]: assembles a router.

// tonic::Status is the error type of every gRPC handler and helper here.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod cells;
pub mod config;
pub mod coordinator;
pub mod courier;
pub mod front;
pub mod grabs;
pub mod load;
pub mod metrics;
pub mod reconcile;
pub mod scopes;
pub mod server;
pub mod table;
