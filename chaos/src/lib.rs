//! cellbank's chaos drills (DESIGN.md section 7). So far: the history a
//! drill's workload records ([`history`]) and the checkers that judge it
//! against the ledger's final state ([`checkers`]). The drill runner, the
//! fault injectors and the reports build on these.

pub mod checkers;
pub mod history;
