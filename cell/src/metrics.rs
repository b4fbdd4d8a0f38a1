//! Prometheus metrics of one replica, and the HTTP endpoint that serves them.
//!
//! Every process has its own registry; nothing global, so tests can run many
//! replicas in one process.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Metrics {
    pub registry: Registry,
    pub proposals_total: IntCounter,
    pub commands_per_entry: Histogram,
    pub fsync_seconds: Histogram,
    pub apply_lag_entries: IntGauge,
    pub term: IntGauge,
    pub commit_index: IntGauge,
    pub applied_index: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes_total: IntCounter,
    pub results_total: IntCounterVec,
    pub snapshots_installed_total: IntCounter,
    pub snapshots_sent_total: IntCounter,
    pub raft_messages_dropped_total: IntCounter,
    pub outbox_pending: IntGauge,
    pub outbox_oldest_age_ms: IntGauge,
    pub credits_delivered_total: IntCounter,
    pub credits_refused_total: IntCounter,
    pub credit_delivery_failures_total: IntCounter,
    pub credit_delivery_calls_total: IntCounter,
    pub envelopes_expired_total: IntCounter,
}

impl Metrics {
    pub fn new(cell_id: u64, replica_id: u64) -> Arc<Metrics> {
        let labels = [("cell".to_string(), cell_id.to_string()), ("replica".to_string(), replica_id.to_string())];
        let registry =
            Registry::new_custom(Some("cellbank".into()), Some(labels.into_iter().collect())).expect("registry");
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("counter");
            registry.register(Box::new(counter.clone())).expect("register");
            counter
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("gauge");
            registry.register(Box::new(gauge.clone())).expect("register");
            gauge
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("histogram");
            registry.register(Box::new(histogram.clone())).expect("register");
            histogram
        };
        let results_total =
            IntCounterVec::new(Opts::new("results_total", "Command results by result code."), &["code"]).expect("vec");
        registry.register(Box::new(results_total.clone())).expect("register");
        Arc::new(Metrics {
            proposals_total: counter("proposals_total", "Raft entries proposed by this replica."),
            commands_per_entry: histogram(
                "commands_per_entry",
                "Client commands batched into one proposed entry.",
                vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0],
            ),
            fsync_seconds: histogram(
                "fsync_seconds",
                "Time to durably append entries and hard state.",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("buckets"),
            ),
            apply_lag_entries: gauge("apply_lag_entries", "Committed entries not yet applied."),
            term: gauge("raft_term", "Current Raft term."),
            commit_index: gauge("commit_index", "Raft commit index."),
            applied_index: gauge("applied_index", "Last applied index."),
            is_leader: gauge("is_leader", "1 when this replica is the leader."),
            leader_changes_total: counter("leader_changes_total", "Times this replica saw a new leader."),
            results_total,
            snapshots_installed_total: counter("snapshots_installed_total", "Snapshots installed from a leader."),
            snapshots_sent_total: counter("snapshots_sent_total", "Snapshots streamed to followers."),
            raft_messages_dropped_total: counter(
                "raft_messages_dropped_total",
                "Raft messages dropped (queue full or peer down).",
            ),
            outbox_pending: gauge(
                "outbox_pending",
                "Leader: cross-cell credits not yet answered by their destination.",
            ),
            outbox_oldest_age_ms: gauge("outbox_oldest_age_ms", "Leader: age of the oldest pending cross-cell credit."),
            credits_delivered_total: counter("credits_delivered_total", "Cross-cell credits the destination applied."),
            credits_refused_total: counter("credits_refused_total", "Cross-cell credits refused and refunded."),
            credit_delivery_failures_total: counter(
                "credit_delivery_failures_total",
                "Delivery attempts of cross-cell credits that got no final answer (retried with backoff).",
            ),
            credit_delivery_calls_total: counter(
                "credit_delivery_calls_total",
                "Delivery calls of cross-cell credits this replica's courier made.",
            ),
            envelopes_expired_total: counter("envelopes_expired_total", "Envelopes expired by this leader."),
            registry,
        })
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encode metrics");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}

/// Longest request head the metrics endpoint reads.
const HTTP_REQUEST_BYTES_MAX: usize = 8 * 1024;

/// Serves `GET /metrics` (any path, in fact) in the Prometheus text format.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; HTTP_REQUEST_BYTES_MAX];
            let mut read = 0;
            while read < buffer.len() {
                match socket.read(&mut buffer[read..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
                if buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
