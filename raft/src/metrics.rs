//! Prometheus metrics of one member of a Raft group, the process's registry
//! they live in, and the HTTP endpoint that serves it.
//!
//! Every process has its own registry; nothing global, so tests can run many
//! replicas in one process. A ledger cell and the routers register their own
//! series in the same registry ([`RaftMetrics::registry`]).

use std::net::SocketAddr;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};
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

/// Every gRPC call a server let in, timed and counted by service, method
/// and result code: `cellbank_grpc_server_handling_seconds{service,method}`
/// (until the answer's head is out: a whole unary call, the start of a
/// stream) and `cellbank_grpc_server_handled_total{service,method,code}`.
/// A path no service knows is counted as method `unknown`.
pub fn call_observer(registry: &Registry) -> cellbank_client::gate::CallObserver {
    let seconds = prometheus::HistogramVec::new(
        HistogramOpts::new("grpc_server_handling_seconds", "Time a server took to answer a call, by method.")
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 15).expect("buckets")),
        &["service", "method"],
    )
    .expect("histogram");
    registry.register(Box::new(seconds.clone())).expect("register");
    let handled = prometheus::IntCounterVec::new(
        prometheus::Opts::new("grpc_server_handled_total", "Calls a server answered, by method and gRPC code."),
        &["service", "method", "code"],
    )
    .expect("counter");
    registry.register(Box::new(handled.clone())).expect("register");
    std::sync::Arc::new(move |path, code, took| {
        let (service, method) = match (code, path.trim_start_matches('/').split_once('/')) {
            (Some(tonic::Code::Unimplemented), _) | (_, None) => ("unknown", "unknown"),
            (_, Some(parts)) => parts,
        };
        seconds.with_label_values(&[service, method]).observe(took.as_secs_f64());
        handled.with_label_values(&[service, method, code_name(code.unwrap_or(tonic::Code::Ok))]).inc();
    })
}

/// A gRPC code as gRPC's own libraries print it (`OK`, `NotFound`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
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
        let build = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "build_info",
                "1, labelled with this build's version and whether it has fault points.",
            ),
            &["version", "fault_points"],
        )
        .expect("gauge");
        r.register(Box::new(build.clone())).expect("register");
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                if cfg!(feature = "fault-points") { "true" } else { "false" },
            ])
            .set(1);
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

/// Longest a connection to the endpoint may take, from accept to the last
/// byte written: a client that sends nothing, or reads nothing, is dropped.
pub const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 32;

/// Whether this process can serve: `Ok` when it can, else why not.
pub type Readiness = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What a process serves over HTTP: its metrics and whether it is ready.
#[derive(Clone)]
pub struct Endpoint {
    pub registry: Registry,
    pub ready: Readiness,
}

/// The endpoint's routes: `GET /metrics` (the Prometheus text format, with
/// the process's own `process_*` series), `GET /healthz` (200 while the
/// process runs) and `GET /ready` (200 when ready, 503 with the reason when
/// not). Any other path is 404.
pub fn routes(endpoint: Endpoint) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let metrics = |axum::extract::State(endpoint): axum::extract::State<Endpoint>| async move {
        let mut body = render(&endpoint.registry);
        body.push_str(&process::render());
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
    };
    let ready = |axum::extract::State(endpoint): axum::extract::State<Endpoint>| async move {
        match (endpoint.ready)() {
            Ok(()) => (StatusCode::OK, "ready\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        }
    };
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(endpoint)
}

pub async fn serve(listener: tokio::net::TcpListener, endpoint: Endpoint) {
    serve_with(listener, endpoint, SCRAPE_TIMEOUT).await
}

/// [`serve`] with a given time limit per connection. One request per
/// connection (no keep-alive), so the limit bounds every request.
pub async fn serve_with(listener: tokio::net::TcpListener, endpoint: Endpoint, timeout: std::time::Duration) {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(SCRAPES_IN_FLIGHT_MAX));
    let service = hyper_util::service::TowerToHyperService::new(routes(endpoint));
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(_) => {
                // Out of descriptors and the like: wait, do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // A client that sends no request head within a second is
            // dropped: idle connections cannot hold the slots for long.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT.min(timeout))
                .keep_alive(false)
                .max_buf_size(HTTP_BUFFER_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service);
            let _ = tokio::time::timeout(timeout, connection).await;
        });
    }
}

/// Longest wait for a request's head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Read buffer of a connection (the request head must fit).
const HTTP_BUFFER_BYTES: usize = 16 * 1024;

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The process's own series, as Prometheus's client libraries name them
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...),
/// read from `/proc/self` at each scrape. Linux only; elsewhere none.
pub mod process {
    use std::fmt::Write;

    pub fn render() -> String {
        let mut out = String::new();
        let Some(stat) = std::fs::read_to_string("/proc/self/stat").ok() else { return out };
        // The fields after the command name (which may hold spaces).
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return out };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Numbered as in proc(5), from field 3 (state) on.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf reads a constant of the running system.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())))
            .unwrap_or(0.0);
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<f64>().ok()))
            })
            .unwrap_or(0.0);
        let series = [
            (
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent.",
                (field(14) + field(15)) / ticks,
            ),
            ("process_resident_memory_bytes", "gauge", "Resident memory size.", field(24) * page.max(1) as f64),
            ("process_virtual_memory_bytes", "gauge", "Virtual memory size.", field(23)),
            ("process_start_time_seconds", "gauge", "Start time since the Unix epoch.", boot + field(22) / ticks),
            ("process_open_fds", "gauge", "Open file descriptors.", fds as f64),
            ("process_max_fds", "gauge", "Most file descriptors the process may open.", max_fds),
            ("process_threads", "gauge", "Operating system threads.", field(20)),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_liveness_and_readiness_and_drops_a_silent_connection() {
        let registry = RaftMetrics::new(1, 1).registry;
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ready.clone();
        let readiness: Readiness = std::sync::Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no known leader".into())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = Endpoint { registry, ready: readiness };
        tokio::spawn(serve_with(listener, endpoint, Duration::from_millis(300)));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        // The registry's labels come in no fixed order.
        let term = metrics.lines().find(|l| l.starts_with("cellbank_raft_term{")).expect("the term");
        assert!(term.contains("cell=\"1\"") && term.contains("replica=\"1\"") && term.ends_with("} 0"), "{term}");
        assert!(metrics.contains("cellbank_build_info{"), "{metrics}");
        let rss = metrics.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).unwrap();
        assert!(rss.parse::<f64>().unwrap() > 1e6, "{rss}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let not_ready = get(addr, "/ready").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503") && not_ready.ends_with("not ready: no known leader\n"),
            "{not_ready}"
        );
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        // A client that connects and sends nothing is closed at the limit.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the silent connection was never closed");
        assert!(started.elapsed() >= Duration::from_millis(250), "closed after {:?}", started.elapsed());
    }
}
