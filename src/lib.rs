//! The `cellbank` binary's library half: what the CLI, the benchmarks and
//! the end-to-end tests share.
//!
//! - [`supervisor`]: runs a local cluster's processes (routers, cell
//!   replicas) and kills and restarts them with real signals.
//! - [`routers`]: admin calls that find the coordinator among the routers.
//! - [`reconcile`]: the cluster-wide reconciliation behind `admin reconcile`.

pub mod reconcile;
pub mod routers;
pub mod supervisor;
