//! cellbank's chaos drills (docs/design.md, section 7), run as `cellbank chaos`.
//!
//! - [`drill`]: drill files (TOML): cluster, workload, steady state,
//!   method, stop conditions, expectations, rollbacks; the seeded plan.
//! - [`faults`]: how faults reach the cluster (processes of a local
//!   cluster, the replicas' authenticated fault points, the routers).
//! - [`workload`]: clients that record every operation and what they heard;
//!   resolution of unknown outcomes; the final read of the ledger.
//! - [`history`] and [`checkers`]: what happened, and the verdicts.
//! - [`runner`]: one drill from preflight to journal.
//! - [`report`]: the JSON journal, the HTML page, the terminal summary.

// tonic::Status is the error type of the gRPC helpers here.
#![allow(clippy::result_large_err)]

pub mod checkers;
pub mod drill;
pub mod faults;
pub mod history;
pub mod report;
pub mod runner;
pub mod workload;
