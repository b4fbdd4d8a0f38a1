//! A router's own Prometheus metrics, registered next to its Raft group's
//! (one registry per process, served on `metrics_listen`).

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct RouterMetrics {
    /// Client requests carried to a cell, by outcome (`ok` or the gRPC code).
    pub requests_total: IntCounterVec,
    /// Retries inside one request, by reason.
    pub retries_total: IntCounterVec,
    /// Coordinator actions: failovers, degradations, returns to sync, switchovers.
    pub actions_total: IntCounterVec,
    pub failovers_total: IntCounter,
    /// Per pair: 1 SYNC, 2 DEGRADED, 3 NO_STANDBY (set by the coordinator).
    pub pair_mode: IntGaugeVec,
    pub pair_epoch: IntGaugeVec,
    pub replication_lag_entries: IntGaugeVec,
    pub replication_lag_ms: IntGaugeVec,
    /// Per cell: replicas that answered the last probe.
    pub replicas_reachable: IntGaugeVec,
    /// Calls carried to each pair, by kind (read, write); see `load`.
    pub pair_requests_total: IntCounterVec,
    /// Bytes of those calls.
    pub pair_request_bytes_total: IntCounterVec,
}

impl RouterMetrics {
    pub fn register(registry: &Registry) -> Arc<RouterMetrics> {
        let counter_vec = |name: &str, help: &str, label: &str| {
            let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("counter vec");
            registry.register(Box::new(vec.clone())).expect("register");
            vec
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let vec = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("gauge vec");
            registry.register(Box::new(vec.clone())).expect("register");
            vec
        };
        let pair_requests_total = IntCounterVec::new(
            Opts::new("router_pair_requests_total", "Calls carried to each pair, by kind (read, write)."),
            &["pair", "kind"],
        )
        .expect("counter vec");
        registry.register(Box::new(pair_requests_total.clone())).expect("register");
        let failovers_total =
            IntCounter::new("router_failovers_total", "Changes of active cell this router made.").expect("counter");
        registry.register(Box::new(failovers_total.clone())).expect("register");
        Arc::new(RouterMetrics {
            requests_total: counter_vec("router_requests_total", "Requests carried to cells, by outcome.", "outcome"),
            retries_total: counter_vec("router_retries_total", "Retries within a request, by reason.", "reason"),
            actions_total: counter_vec("router_coordinator_actions_total", "Coordinator actions, by kind.", "action"),
            failovers_total,
            pair_mode: gauge_vec("router_pair_mode", "1 SYNC, 2 DEGRADED, 3 NO_STANDBY.", "pair"),
            pair_epoch: gauge_vec("router_pair_epoch", "The pair's routing epoch.", "pair"),
            replication_lag_entries: gauge_vec(
                "router_replication_lag_entries",
                "Entries the standby does not hold yet.",
                "pair",
            ),
            replication_lag_ms: gauge_vec(
                "router_replication_lag_ms",
                "Age of the oldest entry the standby does not hold yet.",
                "pair",
            ),
            replicas_reachable: gauge_vec(
                "router_cell_replicas_reachable",
                "Replicas that answered the last probe.",
                "cell",
            ),
            pair_requests_total,
            pair_request_bytes_total: counter_vec(
                "router_pair_request_bytes_total",
                "Encoded bytes of the calls carried to each pair.",
                "pair",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus refuses a scrape in which a series carries one label
    /// twice: the router's series (labelled by cell, pair, ...) sit in a
    /// registry whose own labels name the router, and no name repeats.
    #[test]
    fn no_series_of_a_router_repeats_a_label() {
        let raft = cellbank_raft::metrics::RaftMetrics::with_labels(&[("router", 2)]);
        let metrics = RouterMetrics::register(&raft.registry);
        metrics.replicas_reachable.with_label_values(&["3"]).set(2);
        metrics.pair_mode.with_label_values(&["1"]).set(1);
        metrics.requests_total.with_label_values(&["ok"]).inc();
        metrics.pair_requests_total.with_label_values(&["1", "write"]).inc();
        let families = raft.registry.gather();
        assert!(families.iter().any(|f| f.get_name() == "cellbank_router_cell_replicas_reachable"));
        for family in &families {
            for metric in family.get_metric() {
                let mut names: Vec<&str> = metric.get_label().iter().map(|l| l.get_name()).collect();
                assert!(names.contains(&"router"), "{}: {names:?}", family.get_name());
                let count = names.len();
                names.sort_unstable();
                names.dedup();
                assert_eq!(names.len(), count, "{} repeats a label", family.get_name());
            }
        }
    }
}
