//! A router's own Prometheus metrics, registered next to its Raft group's
//! (one registry per process, served on `metrics_listen`).

use std::sync::Arc;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct RouterMetrics {
    /// Calls carried to a cell, by the client call's method, pair and
    /// result (the gRPC code).
    pub requests_total: IntCounterVec,
    /// Retries inside one request, by reason.
    pub retries_total: IntCounterVec,
    /// Coordinator actions: failovers, degradations, returns to sync, switchovers.
    pub actions_total: IntCounterVec,
    pub failovers_total: IntCounter,
    /// Per pair, one series per mode (SYNC, DEGRADED, NO_STANDBY): 1 for
    /// the pair's mode, 0 for the others. These and the other per-pair and
    /// per-cell gauges are the coordinator's: only the routers' leader
    /// sets them, and a router that stops leading clears them.
    pub pair_mode: IntGaugeVec,
    pub pair_epoch: IntGaugeVec,
    pub replication_lag_entries: IntGaugeVec,
    pub replication_lag_seconds: GaugeVec,
    /// Per cell: replicas that answered the last probe.
    pub replicas_reachable: IntGaugeVec,
    /// Per cell: 1 when the last probe found a serving leader.
    pub cell_has_leader: IntGaugeVec,
    /// 1 while this router is the routers' leader (it coordinates).
    pub coordinating: IntGauge,
    /// Per pair: the slices the table gives it.
    pub pair_slices: IntGaugeVec,
    /// Slice moves the table lists as under way.
    pub slice_moves: IntGauge,
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
        let pair_mode = IntGaugeVec::new(
            Opts::new("router_pair_mode", "1 for the pair's mode (SYNC, DEGRADED, NO_STANDBY), 0 for the others."),
            &["pair", "mode"],
        )
        .expect("gauge vec");
        registry.register(Box::new(pair_mode.clone())).expect("register");
        let requests_total = IntCounterVec::new(
            Opts::new("router_requests_total", "Calls carried to cells, by method, pair and gRPC code."),
            &["method", "pair", "code"],
        )
        .expect("counter vec");
        registry.register(Box::new(requests_total.clone())).expect("register");
        let replication_lag_seconds = GaugeVec::new(
            Opts::new(
                "router_replication_lag_seconds",
                "Age of the oldest entry the pair's standby does not hold yet.",
            ),
            &["pair"],
        )
        .expect("gauge vec");
        registry.register(Box::new(replication_lag_seconds.clone())).expect("register");
        let coordinating =
            IntGauge::new("router_coordinating", "1 while this router is the routers' leader.").expect("gauge");
        registry.register(Box::new(coordinating.clone())).expect("register");
        let slice_moves =
            IntGauge::new("router_slice_moves", "Slice moves under way (the coordinator's view).").expect("gauge");
        registry.register(Box::new(slice_moves.clone())).expect("register");
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
            requests_total,
            retries_total: counter_vec("router_retries_total", "Retries within a request, by reason.", "reason"),
            actions_total: counter_vec("router_coordinator_actions_total", "Coordinator actions, by kind.", "action"),
            failovers_total,
            pair_mode,
            pair_epoch: gauge_vec("router_pair_epoch", "The pair's routing epoch.", "pair"),
            replication_lag_entries: gauge_vec(
                "router_replication_lag_entries",
                "Entries the standby does not hold yet.",
                "pair",
            ),
            replication_lag_seconds,
            replicas_reachable: gauge_vec(
                "router_cell_replicas_reachable",
                "Replicas that answered the last probe.",
                "cell",
            ),
            cell_has_leader: gauge_vec(
                "router_cell_has_leader",
                "1 when the last probe found the cell's serving leader.",
                "cell",
            ),
            coordinating,
            pair_slices: gauge_vec("router_pair_slices", "Slices the table gives the pair.", "pair"),
            slice_moves,
            pair_requests_total,
            pair_request_bytes_total: counter_vec(
                "router_pair_request_bytes_total",
                "Encoded bytes of the calls carried to each pair.",
                "pair",
            ),
        })
    }
}

/// Slices a router exports as Prometheus series: its busiest by requests
/// since it started (every slice would be too many series; `cellbank
/// capacity status` lists them all).
pub const HOT_SLICES_EXPORTED: usize = 20;

/// The busiest slices' counters (`cellbank_router_slice_requests_total`,
/// `…_writes_total`, `…_request_bytes_total`, labelled `slice`), read from
/// the router's per-slice counts at each scrape.
pub struct HotSlices {
    counters: Box<dyn Fn() -> Vec<cellbank_proto::router::SliceCounters> + Send + Sync>,
    descs: Vec<prometheus::core::Desc>,
}

const HOT_SLICE_SERIES: [(&str, &str); 3] = [
    ("router_slice_requests_total", "Calls carried to one of this router's busiest slices."),
    ("router_slice_writes_total", "Writes carried to one of this router's busiest slices."),
    ("router_slice_request_bytes_total", "Encoded bytes of the calls carried to one of this router's busiest slices."),
];

impl HotSlices {
    pub fn new(counters: impl Fn() -> Vec<cellbank_proto::router::SliceCounters> + Send + Sync + 'static) -> HotSlices {
        let descs = HOT_SLICE_SERIES
            .iter()
            .map(|(name, help)| {
                prometheus::core::Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec!["slice".into()],
                    Default::default(),
                )
                .expect("desc")
            })
            .collect();
        HotSlices { counters: Box::new(counters), descs }
    }
}

impl prometheus::core::Collector for HotSlices {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut hot = (self.counters)();
        hot.sort_unstable_by_key(|c| (std::cmp::Reverse(c.requests), c.slice));
        hot.truncate(HOT_SLICES_EXPORTED);
        let mut families = Vec::new();
        for (n, (name, help)) in HOT_SLICE_SERIES.iter().enumerate() {
            let vec = IntCounterVec::new(Opts::new(*name, *help), &["slice"]).expect("counter vec");
            for counters in &hot {
                let value = [counters.requests, counters.writes, counters.request_bytes][n];
                vec.with_label_values(&[&counters.slice.to_string()]).inc_by(value);
            }
            families.extend(prometheus::core::Collector::collect(&vec));
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus refuses a scrape in which a series carries one label
    /// twice: the router's series (labelled by cell, pair, ...) sit in a
    /// registry whose own labels name the router, and no name repeats.
    /// The busiest slices, and only they, are exported, with the router's
    /// label, and a slice with more requests wins a place.
    #[test]
    fn a_router_exports_its_busiest_slices() {
        let raft = cellbank_raft::metrics::RaftMetrics::with_labels(&[("router", 1)]);
        let slices = (0..30u32)
            .map(|slice| cellbank_proto::router::SliceCounters {
                slice,
                requests: u64::from(slice) * 10,
                writes: u64::from(slice),
                request_bytes: u64::from(slice) * 100,
            })
            .collect::<Vec<_>>();
        raft.registry.register(Box::new(HotSlices::new(move || slices.clone()))).unwrap();
        let families = raft.registry.gather();
        for name in ["requests_total", "writes_total", "request_bytes_total"] {
            let family = families
                .iter()
                .find(|f| f.get_name() == format!("cellbank_router_slice_{name}"))
                .unwrap_or_else(|| panic!("{name}"));
            let mut slices: Vec<u32> = family
                .get_metric()
                .iter()
                .map(|m| {
                    assert!(m.get_label().iter().any(|l| l.get_name() == "router" && l.get_value() == "1"));
                    m.get_label().iter().find(|l| l.get_name() == "slice").unwrap().get_value().parse().unwrap()
                })
                .collect();
            slices.sort_unstable();
            assert_eq!(slices, (10..30).collect::<Vec<u32>>(), "{name}");
        }
        let writes = families.iter().find(|f| f.get_name() == "cellbank_router_slice_writes_total").unwrap();
        let top = writes.get_metric().iter().map(|m| m.get_counter().get_value()).fold(0.0, f64::max);
        assert_eq!(top, 29.0);
    }

    #[test]
    fn no_series_of_a_router_repeats_a_label() {
        let raft = cellbank_raft::metrics::RaftMetrics::with_labels(&[("router", 2)]);
        let metrics = RouterMetrics::register(&raft.registry);
        metrics.replicas_reachable.with_label_values(&["3"]).set(2);
        metrics.pair_mode.with_label_values(&["1", "SYNC"]).set(1);
        metrics.requests_total.with_label_values(&["Transfer", "1", "OK"]).inc();
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
