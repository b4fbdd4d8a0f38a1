//! Prometheus metrics of one ledger replica: the Raft group's series
//! ([`RaftMetrics`], which also holds the process's registry) and the
//! ledger's own (results, the outbox, envelopes).

use std::sync::Arc;

use cellbank_raft::metrics::{counter, gauge, RaftMetrics};
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};

pub struct Metrics {
    pub raft: Arc<RaftMetrics>,
    pub results_total: IntCounterVec,
    pub outbox_pending: IntGauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub credits_delivered_total: IntCounter,
    pub credits_refused_total: IntCounter,
    pub credit_delivery_failures_total: IntCounter,
    pub credit_delivery_calls_total: IntCounter,
    pub envelopes_expired_total: IntCounter,
}

impl Metrics {
    pub fn new(cell_id: u64, replica_id: u64) -> Arc<Metrics> {
        let raft = Arc::new(RaftMetrics::new(cell_id, replica_id));
        let r = &raft.registry;
        let results_total =
            IntCounterVec::new(Opts::new("results_total", "Command results by result code."), &["code"]).expect("vec");
        r.register(Box::new(results_total.clone())).expect("register");
        let outbox_oldest_age_seconds =
            Gauge::new("outbox_oldest_age_seconds", "Leader: age of the oldest pending cross-cell credit.")
                .expect("gauge");
        r.register(Box::new(outbox_oldest_age_seconds.clone())).expect("register");
        Arc::new(Metrics {
            results_total,
            outbox_pending: gauge(
                r,
                "outbox_pending",
                "Leader: cross-cell credits not yet answered by their destination.",
            ),
            outbox_oldest_age_seconds,
            credits_delivered_total: counter(
                r,
                "credits_delivered_total",
                "Cross-cell credits the destination applied.",
            ),
            credits_refused_total: counter(r, "credits_refused_total", "Cross-cell credits refused and refunded."),
            credit_delivery_failures_total: counter(
                r,
                "credit_delivery_failures_total",
                "Delivery attempts of cross-cell credits that got no final answer (retried with backoff).",
            ),
            credit_delivery_calls_total: counter(
                r,
                "credit_delivery_calls_total",
                "Delivery calls of cross-cell credits this replica's courier made.",
            ),
            envelopes_expired_total: counter(r, "envelopes_expired_total", "Envelopes expired by this leader."),
            raft,
        })
    }
}
