//! The `cellbank` binary's library half: what the CLI, the benchmarks and
//! the end-to-end tests share.
//!
//! - [`supervisor`]: runs a local cluster's processes (routers, cell
//!   replicas) and kills and restarts them with real signals.
//! - [`routers`] and [`reconcile`]: re-exported from the router crate (admin
//!   calls that find the coordinator; cluster-wide reconciliation).

pub use cellbank_router::admin_client as routers;
pub use cellbank_router::reconcile;
pub mod supervisor;
