//! The `cellbank` binary's library half: what the CLI, the benchmarks and
//! the end-to-end tests share.
//!
//! - [`supervisor`]: runs a local cluster's processes (routers, cell
//!   replicas) and kills and restarts them with real signals.
//! - [`capacity`]: what each pair and slice holds and carries;
//! - [`certs`]: the cluster CA and every process's, service's and
//!   operator's certificate.
//! - [`hosts`]: replacing a replica of a cell by one at another address.
//! - [`routers`]: admin calls that find the coordinator (from the client
//!   crate); [`reconcile`]: cluster-wide reconciliation (from the router
//!   crate).

pub mod capacity;
pub use cellbank_client::routers;
pub mod certs;
pub mod hosts;
pub use cellbank_router::reconcile;
pub mod supervisor;

/// The default local cluster's topology, built into the binary so that
/// `cellbank up` works from any directory.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../deploy/local/cluster.toml");
