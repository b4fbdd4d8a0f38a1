//! Prometheus metrics of one member of a Raft group, the process's registry
//! they live in, and the HTTP endpoint that serves it.
//!
//! Every process has its own registry; nothing global, so tests can run many
//! replicas in one process. A ledger cell and the routers register their own
//! series in the same registry ([`RaftMetrics::registry`]).

use std::net::SocketAddr;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RaftMetrics {
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
    pub snapshots_installed_total: IntCounter,
    pub snapshots_sent_total: IntCounter,
    pub raft_messages_dropped_total: IntCounter,
    pub raft_messages_refused_total: IntCounter,
}

/// Registers a counter in `registry`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("counter");
    registry.register(Box::new(counter.clone())).expect("register");
    counter
}

/// Registers a gauge in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("gauge");
    registry.register(Box::new(gauge.clone())).expect("register");
    gauge
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("histogram");
    registry.register(Box::new(histogram.clone())).expect("register");
    histogram
}

/// The observers of a server's refused connections and calls: each is
/// counted (`cellbank_tls_handshakes_refused_total`,
/// `cellbank_calls_denied_total`, by reason) and written to the audit
/// trail (log target `cellbank::audit`) with the peer's address and
/// identity.
pub fn security_observers(
    registry: &Registry,
) -> (cellbank_client::tls::HandshakeObserver, cellbank_client::gate::DeniedObserver) {
    use cellbank_client::tls::HandshakeRefusal;
    let handshakes = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "tls_handshakes_refused_total",
            "Connections refused before their first call (failed, no_identity, wrong_plane), or held back after failures from their address (throttled).",
        ),
        &["reason"],
    )
    .expect("counter");
    registry.register(Box::new(handshakes.clone())).expect("register");
    let denied = prometheus::IntCounterVec::new(
        prometheus::Opts::new("calls_denied_total", "Calls refused by the authorization policy, by code."),
        &["code"],
    )
    .expect("counter");
    registry.register(Box::new(denied.clone())).expect("register");
    let on_handshake: cellbank_client::tls::HandshakeObserver = std::sync::Arc::new(move |ip, refusal| {
        let reason = match refusal {
            HandshakeRefusal::Failed(_) => "failed",
            HandshakeRefusal::NoIdentity(_) => "no_identity",
            HandshakeRefusal::Throttled(_) => "throttled",
            HandshakeRefusal::WrongPlane(_) => "wrong_plane",
        };
        handshakes.with_label_values(&[reason]).inc();
        match refusal {
            // A barred address is refused without a word per connection:
            // the failure that barred it was written down already.
            HandshakeRefusal::Throttled(_) => {}
            HandshakeRefusal::Failed(why) | HandshakeRefusal::NoIdentity(why) | HandshakeRefusal::WrongPlane(why) => {
                tracing::warn!(target: "cellbank::audit", event = "connection_refused", peer = %ip, reason, why = %why);
            }
        }
    });
    let on_denied: cellbank_client::gate::DeniedObserver = std::sync::Arc::new(move |d| {
        denied.with_label_values(&[&format!("{:?}", d.refusal.code)]).inc();
        tracing::warn!(
            target: "cellbank::audit",
            event = "call_denied",
            peer = %d.addr.map(|a| a.to_string()).unwrap_or_default(),
            identity = %d.identity.map(|i| i.to_string()).unwrap_or_default(),
            path = d.path,
            rule = d.refusal.rule.unwrap_or("none"),
            barred_ms = d.barred_for.as_millis() as u64,
            message = %d.refusal.message,
        );
    });
    (on_handshake, on_denied)
}

impl RaftMetrics {
    /// A new registry for one process (series prefixed `cellbank_`, labelled
    /// with its group and replica) holding the Raft series.
    pub fn new(group_id: u64, replica_id: u64) -> RaftMetrics {
        RaftMetrics::with_labels(&[("cell", group_id), ("replica", replica_id)])
    }

    /// [`RaftMetrics::new`] with other process labels (a router is
    /// `router="N"`: its own series name cells in a `cell` label, and a
    /// label may appear once per series).
    pub fn with_labels(labels: &[(&str, u64)]) -> RaftMetrics {
        let labels = labels.iter().map(|(name, value)| (name.to_string(), value.to_string()));
        let registry = Registry::new_custom(Some("cellbank".into()), Some(labels.collect())).expect("registry");
        let r = &registry;
        RaftMetrics {
            proposals_total: counter(r, "proposals_total", "Raft entries proposed by this replica."),
            commands_per_entry: histogram(
                r,
                "commands_per_entry",
                "Client commands batched into one proposed entry.",
                vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0],
            ),
            fsync_seconds: histogram(
                r,
                "fsync_seconds",
                "Time to durably append entries and hard state.",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("buckets"),
            ),
            apply_lag_entries: gauge(r, "apply_lag_entries", "Committed entries not yet applied."),
            term: gauge(r, "raft_term", "Current Raft term."),
            commit_index: gauge(r, "commit_index", "Raft commit index."),
            applied_index: gauge(r, "applied_index", "Last applied index."),
            is_leader: gauge(r, "is_leader", "1 when this replica is the leader."),
            leader_changes_total: counter(r, "leader_changes_total", "Times this replica saw a new leader."),
            snapshots_installed_total: counter(r, "snapshots_installed_total", "Snapshots installed from a leader."),
            snapshots_sent_total: counter(r, "snapshots_sent_total", "Snapshots streamed to followers."),
            raft_messages_dropped_total: counter(
                r,
                "raft_messages_dropped_total",
                "Raft messages dropped (queue full or peer down).",
            ),
            raft_messages_refused_total: counter(
                r,
                "raft_messages_refused_total",
                "Raft messages from peers refused before raft saw them: malformed, forged or corrupt.",
            ),
            registry,
        }
    }
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("encode metrics");
    String::from_utf8(out).expect("metrics are UTF-8")
}

/// Longest request head the metrics endpoint reads.
const HTTP_REQUEST_BYTES_MAX: usize = 8 * 1024;

/// Serves `GET /metrics` (any path, in fact) in the Prometheus text format.
/// Longest a scrape connection may take, from accept to the last byte
/// written: a client that sends nothing, or reads nothing, is dropped.
pub const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Scrape connections served at once; more are closed unanswered.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 32;

pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) {
    serve_with(listener, registry, SCRAPE_TIMEOUT).await
}

/// [`serve`] with a given time limit per connection.
pub async fn serve_with(listener: tokio::net::TcpListener, registry: Registry, timeout: std::time::Duration) {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(SCRAPES_IN_FLIGHT_MAX));
    loop {
        let mut socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(_) => {
                // Out of descriptors and the like: wait, do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let answer = async {
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
                let body = render(&registry);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
            };
            let _ = tokio::time::timeout(timeout, answer).await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_scrape_is_answered_and_a_silent_connection_is_dropped_after_the_limit() {
        let registry = RaftMetrics::new(1, 1).registry;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with(listener, registry, Duration::from_millis(200)));
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        scrape.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK") && body.contains("cellbank_raft_term"), "{body}");
        // A client that connects and sends nothing is closed at the limit.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the silent connection was never closed");
        assert!(rest.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(150), "closed after {:?}", started.elapsed());
    }
}
