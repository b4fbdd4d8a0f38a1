//! The `cellbank` binary's library half: what the CLI, the benchmarks and
//! the end-to-end tests share.
//!
//! - [`supervisor`]: runs a local cluster's processes (routers, cell
//!   replicas) and kills and restarts them with real signals.
//! - [`capacity`]: what each pair and slice holds and carries;
//! - [`certs`]: the cluster CA and every process's, service's and
//!   operator's certificate.
//! - [`routers`]: admin calls that find the coordinator (from the client
//!   crate); [`reconcile`]: cluster-wide reconciliation (from the router
//!   crate).

pub mod capacity;
pub use cellbank_client::routers;
pub mod certs;
pub use cellbank_router::reconcile;
pub mod supervisor;
