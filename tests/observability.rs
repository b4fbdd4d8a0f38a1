//! What an SRE watches, checked against the real thing: a real Prometheus
//! (Debian's, installed by `scripts/setup.sh`) scrapes every process of a
//! cluster with the shipped alert rules loaded, and an alert fires when a
//! standby dies; `/ready` and gRPC health follow whether a process can
//! serve.

mod common;

use std::time::{Duration, Instant};

use cellbank::supervisor::ProcessId;
use common::cluster::Cluster;
use tonic_health::pb::health_check_response::ServingStatus;

const TOKEN: &str = "observability-test-token";

/// Every process with its own metrics address.
fn with_metrics(topology: &mut cellbank::supervisor::Topology) {
    topology.admin_token = Some(TOKEN.into());
    for process in topology.routers.iter_mut().chain(topology.cells.iter_mut().flat_map(|c| c.replicas.iter_mut())) {
        process.metrics = Some(format!("127.0.0.1:{}", common::free_port()));
    }
}

/// One HTTP/1.0 GET (so the answer is never chunked): status and body;
/// `None` when nothing answers.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
        socket.write_all(format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.ok().flatten()
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `check` every 100 ms until it holds, failing after `timeout`.
async fn eventually<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus server scraping `jobs` (job name, targets) with the shipped
/// alert rules, every second.
fn start_prometheus(dir: &std::path::Path, listen: &str, jobs: &[(&str, Vec<String>)]) -> Child {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        rules.display()
    );
    for (job, targets) in jobs {
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ));
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus (scripts/setup.sh installs it)");
    Child(child)
}

/// A query's result vector (`/api/v1/query`).
async fn query(prometheus: &str, expr: &str) -> Vec<serde_json::Value> {
    let Some((200, body)) = http_get(prometheus, &format!("/api/v1/query?query={}", encode(expr))).await else {
        return Vec::new();
    };
    let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
    answer["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The alerts Prometheus holds in `state` (pending, firing), by name and
/// labels.
async fn alerts(prometheus: &str, state: &str) -> Vec<serde_json::Value> {
    let Some((200, body)) = http_get(prometheus, "/api/v1/alerts").await else { return Vec::new() };
    let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
    let all = answer["data"]["alerts"].as_array().cloned().unwrap_or_default();
    all.into_iter().filter(|a| a["state"] == state).collect()
}

/// Prometheus scrapes every router, replica and the reconciler: every
/// target is up with no scrape error, no sample is refused, and the key
/// series exist. No alert fires on a healthy cluster; killing a standby
/// cell fires `CellbankPairDegraded` for its pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_process_and_an_alert_fires_when_a_standby_dies() {
    let mut cluster = Cluster::start(1, 2, with_metrics);
    for pair in [1, 2] {
        cluster.wait_for_mode(pair, cellbank_proto::router::PairMode::Sync, Duration::from_secs(60)).await;
    }
    let client = cluster.client();
    let users: Vec<u64> = (1..=8).collect();
    common::open_and_seed(&client, &users, "CNY", 10_000).await;
    traffic(&client, &users).await;

    let dir = tempfile::tempdir().unwrap();
    let reconciler_metrics = format!("127.0.0.1:{}", common::free_port());
    let reconciler = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
            .args(["admin", "reconcile", "--endpoints", &cluster.routers().join(","), "--admin-token", TOKEN])
            .args(["--every-secs", "2", "--metrics-listen", &reconciler_metrics])
            .arg("--certs")
            .arg(common::test_certs())
            .stdout(std::fs::File::create(dir.path().join("reconciler.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("reconciler.err")).unwrap())
            .spawn()
            .expect("start the reconciler"),
    );
    let ids = cluster.sup.ids();
    let metrics_of = |pick: fn(&ProcessId) -> bool| -> Vec<String> {
        ids.iter().filter(|id| pick(id)).filter_map(|id| cluster.sup.metrics_addr(*id)).collect()
    };
    let routers = metrics_of(|id| matches!(id, ProcessId::Router(_)));
    let replicas = metrics_of(|id| matches!(id, ProcessId::Replica { .. }));
    assert_eq!((routers.len(), replicas.len()), (1, 12));
    let prometheus = format!("127.0.0.1:{}", common::free_port());
    let jobs = [
        ("cellbank-router", routers),
        ("cellbank-replica", replicas),
        ("cellbank-reconciler", vec![reconciler_metrics.clone()]),
    ];
    let server = start_prometheus(dir.path(), &prometheus, &jobs);
    let log = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // Every target up, none with a scrape error.
    let targets = eventually("every target scraped without error", Duration::from_secs(60), async || {
        let (200, body) = http_get(&prometheus, "/api/v1/targets").await? else { return None };
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        let active = answer["data"]["activeTargets"].as_array()?.clone();
        let healthy = active.len() == 14 && active.iter().all(|t| t["health"] == "up" && t["lastError"] == "");
        healthy.then_some(active)
    })
    .await;
    println!("{} targets up", targets.len());
    // No sample refused, over a few more scrapes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, own) = http_get(&prometheus, "/metrics").await.expect("prometheus's own metrics");
    for refusal in [
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
        "prometheus_target_scrapes_exceeded_sample_limit_total",
        "prometheus_target_scrape_pool_exceeded_label_limits_total",
    ] {
        let value = own.lines().find_map(|l| l.strip_prefix(&format!("{refusal} "))).unwrap_or("missing");
        assert_eq!(value, "0", "{refusal}");
    }
    let unhealthy = query(&prometheus, "up == 0").await;
    assert!(unhealthy.is_empty(), "targets down: {unhealthy:?}");

    // The key series, each with data.
    for series in [
        "cellbank_build_info{job=\"cellbank-replica\"}",
        "cellbank_build_info{job=\"cellbank-router\"}",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "cellbank_raft_term",
        "cellbank_is_leader",
        "cellbank_apply_lag_entries",
        "cellbank_fsync_seconds_bucket",
        "cellbank_results_total",
        "cellbank_outbox_oldest_age_seconds",
        "cellbank_disk_free_bytes",
        "cellbank_disk_min_free_bytes",
        "cellbank_grpc_server_handling_seconds_bucket{job=\"cellbank-router\",service=\"cellbank.v1.Ledger\"}",
        "cellbank_grpc_server_handled_total{job=\"cellbank-replica\",code=\"OK\"}",
        "cellbank_router_requests_total{method=\"Transfer\",code=\"OK\"}",
        "cellbank_router_pair_mode{mode=\"SYNC\"} == 1",
        "cellbank_router_replication_lag_seconds",
        "cellbank_router_cell_has_leader == 1",
        "cellbank_router_coordinating == 1",
        "cellbank_router_pair_requests_total",
        "cellbank_reconcile_last_ok == 1",
        "cellbank_reconcile_last_run_timestamp_seconds",
    ] {
        let found = eventually(series, Duration::from_secs(30), async || {
            let result = query(&prometheus, series).await;
            (!result.is_empty()).then_some(result)
        })
        .await;
        println!("{series}: {} series", found.len());
    }
    assert_eq!(query(&prometheus, "cellbank_router_pair_mode{mode=\"SYNC\"} == 1").await.len(), 2);
    assert_eq!(query(&prometheus, "cellbank_router_cell_has_leader == 1").await.len(), 4);
    let firing = alerts(&prometheus, "firing").await;
    assert!(firing.is_empty(), "alerts firing on a healthy cluster: {firing:?}");

    // The standby cell of pair 1 dies: the coordinator degrades the pair,
    // and the alert fires for pair 1 (and only for it).
    let standby = Cluster::pair_of(&cluster.status().await.unwrap(), 1).standby_cell_id;
    let killed = Instant::now();
    cluster.sup.kill_cell(standby);
    let fired = eventually("CellbankPairDegraded firing", Duration::from_secs(90), async || {
        let firing = alerts(&prometheus, "firing").await;
        let degraded: Vec<_> =
            firing.into_iter().filter(|a| a["labels"]["alertname"] == "CellbankPairDegraded").collect();
        (!degraded.is_empty()).then_some(degraded)
    })
    .await;
    println!("CellbankPairDegraded fired {:.1} s after the standby was killed", killed.elapsed().as_secs_f64());
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["labels"]["pair"], "1");
    assert_eq!(fired[0]["labels"]["severity"], "critical");
    assert_eq!(fired[0]["annotations"]["runbook"], "docs/runbook.md#cellbankpairdegraded");
    let down = query(&prometheus, "up{job=\"cellbank-replica\"} == 0").await;
    assert_eq!(down.len(), 3, "the standby's three replicas are down: {down:?}");

    cluster.sup.start_cell(standby).unwrap();
    cluster.wait_for_mode(1, cellbank_proto::router::PairMode::Sync, Duration::from_secs(90)).await;
    eventually("CellbankPairDegraded resolved", Duration::from_secs(30), async || {
        let firing = alerts(&prometheus, "firing").await;
        firing.iter().all(|a| a["labels"]["alertname"] != "CellbankPairDegraded").then_some(())
    })
    .await;
    // Every panel of every shipped dashboard returns data, now that the
    // cluster has seen transfers, envelopes, a dead standby and recovery.
    traffic(&client, &users).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut checked = 0;
    for (board, panels) in dashboards() {
        for (title, expr) in panels {
            let expr = expr.replace("$__rate_interval", "1m");
            eventually(&format!("{board} / {title}: {expr}"), Duration::from_secs(20), async || {
                (!query(&prometheus, &expr).await.is_empty()).then_some(())
            })
            .await;
            checked += 1;
        }
    }
    println!("{checked} dashboard queries return data");
    drop(server);
    drop(reconciler);
    if std::thread::panicking() {
        println!("{}", log());
    }
}

/// Same-cell and cross-cell transfers and a red envelope grabbed by the
/// other users, so that the series of each kind of traffic exist.
async fn traffic(client: &cellbank_client::CellClient, users: &[u64]) {
    use cellbank_proto::v1::*;
    static ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for (n, pair) in users.windows(2).enumerate() {
        let request = TransferRequest {
            transfer_id_text: format!("traffic-{round}-{n}"),
            transfer_id: Vec::new(),
            from_user_id: pair[0],
            to_user_id: pair[1],
            currency: "CNY".into(),
            amount: 1,
        };
        let answer = common::call(client, |mut c| {
            let request = request.clone();
            async move { c.transfer(request).await }
        })
        .await;
        assert_eq!(answer.result.unwrap().code, ResultCode::Ok as i32);
    }
    let send = SendEnvelopeRequest {
        transfer_id_text: format!("envelope-{round}"),
        transfer_id: Vec::new(),
        sender_user_id: users[0],
        currency: "CNY".into(),
        total: 100,
        shares: 4,
        split: EnvelopeSplit::Random as i32,
        expires_at_ms: 0,
    };
    let sent = common::call(client, |mut c| {
        let send = send.clone();
        async move { c.send_envelope(send).await }
    })
    .await;
    assert_eq!(sent.result.unwrap().code, ResultCode::Ok as i32);
    for user in &users[1..5] {
        let grab = GrabEnvelopeRequest { envelope_id: sent.envelope_id.clone(), user_id: *user };
        common::call(client, |mut c| {
            let grab = grab.clone();
            async move { c.grab_envelope(grab).await }
        })
        .await;
    }
}

/// Every shipped dashboard's panels: (board, [(panel title, query)]).
fn dashboards() -> Vec<(String, Vec<(String, String)>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards");
    let mut boards = Vec::new();
    let mut uids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let uid = board["uid"].as_str().expect("a uid").to_string();
        assert!(uids.insert(uid.clone()), "{uid} twice");
        let mut panels = Vec::new();
        for panel in board["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().expect("a title").to_string();
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{uid} / {title}");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{uid} / {title} has no query");
            for target in targets {
                panels.push((title.clone(), target["expr"].as_str().expect("an expr").to_string()));
            }
        }
        boards.push((uid, panels));
    }
    assert_eq!(boards.len(), 5, "{boards:?}");
    boards
}

/// gRPC health on a process's client plane (`""`: the whole server).
async fn grpc_health(addr: &str) -> Option<i32> {
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(addr).await.ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let reply = tokio::time::timeout(Duration::from_secs(3), health.check(request)).await.ok()?.ok()?;
    Some(reply.into_inner().status)
}

/// Waits until `/ready` of `metrics` answers `status` (and gRPC health at
/// `addr` says the same); returns the body.
async fn wait_ready_is(metrics: &str, addr: &str, ready: bool, timeout: Duration) -> String {
    let (status, grpc) = if ready { (200, ServingStatus::Serving) } else { (503, ServingStatus::NotServing) };
    eventually(&format!("{metrics} ready: {ready}"), timeout, async || {
        let (answer, body) = http_get(metrics, "/ready").await?;
        (answer == status && grpc_health(addr).await? == grpc as i32).then_some(body)
    })
    .await
}

/// Waits until the process at `metrics` answers `/healthz`, then until it
/// says not ready; checks it still says so `still` later; returns why.
async fn alive_and_not_ready(metrics: &str, addr: &str, still: Duration) -> String {
    eventually(&format!("{metrics} alive"), Duration::from_secs(30), async || {
        matches!(http_get(metrics, "/healthz").await, Some((200, _))).then_some(())
    })
    .await;
    let why = wait_ready_is(metrics, addr, false, Duration::from_secs(10)).await;
    tokio::time::sleep(still).await;
    assert_eq!(http_get(metrics, "/ready").await.map(|(s, _)| s), Some(503), "ready again within {still:?}");
    why
}

/// `/ready` and gRPC health say whether a router can serve: a router
/// alone (no quorum of routers, so no table) is alive but not ready, and
/// turns ready once the table is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_a_table_is_alive_but_not_ready() {
    let mut cluster =
        Cluster::start_some(3, 1, with_metrics, |id| !matches!(id, ProcessId::Router(2) | ProcessId::Router(3)));
    let router = ProcessId::Router(1);
    let (router_metrics, router_addr) = (cluster.sup.metrics_addr(router).unwrap(), cluster.sup.addr(router).unwrap());
    // Still not ready a while later: no quorum, no table.
    let why = alive_and_not_ready(&router_metrics, &router_addr, Duration::from_secs(3)).await;
    assert_eq!(why, "not ready: no routing table yet\n");
    cluster.sup.start(ProcessId::Router(2)).unwrap();
    cluster.sup.start(ProcessId::Router(3)).unwrap();
    let started = Instant::now();
    wait_ready_is(&router_metrics, &router_addr, true, Duration::from_secs(30)).await;
    println!("router 1 ready {:.1} s after its peers started", started.elapsed().as_secs_f64());
}

/// `/ready` and gRPC health say whether a replica can serve: a follower
/// cut off from its leader turns not ready, and ready once healed; a
/// follower restarted unable to hear its leader is not ready until it
/// does; the leader stays ready.
#[cfg(feature = "fault-points")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_or_restarting_is_not_ready_until_it_hears_its_leader() {
    use cellbank_chaos::faults::Access;
    use cellbank_proto::cell::InjectFaultRequest;
    let mut cluster = Cluster::start(1, 1, with_metrics);
    // Every replica of the active cell turns ready.
    for id in cluster.sup.cell_replicas(1) {
        let (metrics, addr) = (cluster.sup.metrics_addr(id).unwrap(), cluster.sup.addr(id).unwrap());
        wait_ready_is(&metrics, &addr, true, Duration::from_secs(30)).await;
    }
    let leader = cluster.cell_leader(1).await.expect("a leader");
    let follower = cluster.sup.cell_replicas(1).into_iter().find(|id| *id != leader).unwrap();
    let (metrics, addr) = (cluster.sup.metrics_addr(follower).unwrap(), cluster.sup.addr(follower).unwrap());
    let access = Access { routers: cluster.routers(), token: Some(TOKEN.into()) };
    let cut_off = InjectFaultRequest {
        point: "raft.recv".into(),
        action: "drop".into(),
        duration_ms: 600_000,
        ..Default::default()
    };
    access.inject(&addr, cut_off).await.expect("cut the follower off");
    let why = wait_ready_is(&metrics, &addr, false, Duration::from_secs(30)).await;
    assert_eq!(why, "not ready: no known leader\n");
    access.heal(&addr).await.expect("heal");
    wait_ready_is(&metrics, &addr, true, Duration::from_secs(30)).await;

    // Restarted, and unable to hear its leader from its first moment.
    cluster.sup.kill(follower);
    cluster.sup.start_with_env(follower, &[("CELLBANK_FAULTS", "raft.recv=drop:600000")]).unwrap();
    let why = alive_and_not_ready(&metrics, &addr, Duration::from_secs(2)).await;
    assert_eq!(why, "not ready: no known leader\n");
    access.heal(&addr).await.expect("heal");
    wait_ready_is(&metrics, &addr, true, Duration::from_secs(30)).await;
    // The cell's leader was ready throughout.
    let leader_metrics = cluster.sup.metrics_addr(leader).unwrap();
    assert_eq!(http_get(&leader_metrics, "/ready").await.map(|(s, _)| s), Some(200));
}

/// A sampled trace id sent to the router with a transfer is in the
/// router's log and in the log of the cell leader that applied it, at each
/// step: the call, the proposal, its commit, the standby's acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_that_enters_at_the_router_is_in_the_cells_logs() {
    use cellbank_proto::v1::ledger_client::LedgerClient;
    use cellbank_proto::v1::{DepositRequest, ResultCode};
    let cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, cellbank_proto::router::PairMode::Sync, Duration::from_secs(60)).await;
    let client = cluster.client();
    common::open_and_seed(&client, &[7], "CNY", 100).await;
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cluster.routers()[0]).await.unwrap();
    let mut request = tonic::Request::new(DepositRequest {
        transfer_id_text: "traced-deposit".into(),
        transfer_id: Vec::new(),
        user_id: 7,
        currency: "CNY".into(),
        amount: 5,
    });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    let answer = LedgerClient::new(channel).deposit(request).await.expect("the deposit").into_inner();
    assert_eq!(answer.result.unwrap().code, ResultCode::Ok as i32);
    let leader = cluster.cell_leader(1).await.expect("a leader");
    let log_of = |id: ProcessId| std::fs::read_to_string(cluster.sup.log_path(id).unwrap()).unwrap_or_default();
    let lines = |id: ProcessId| -> Vec<String> {
        log_of(id).lines().filter(|l| l.contains(&trace_id)).map(str::to_string).collect()
    };
    // Logs are written as they happen; give the files a moment.
    let router = eventually("the router's lines", Duration::from_secs(5), async || {
        let found = lines(ProcessId::Router(1));
        (found.len() >= 2).then_some(found)
    })
    .await;
    assert!(
        router.iter().any(|l| l.contains("call received") && l.contains("/cellbank.v1.Ledger/Deposit")),
        "{router:?}"
    );
    assert!(router.iter().any(|l| l.contains("call answered")), "{router:?}");
    let cell = eventually("the cell leader's lines", Duration::from_secs(5), async || {
        let found = lines(leader);
        (found.len() >= 5).then_some(found)
    })
    .await;
    for step in ["call received", "proposing", "committed and applied", "acknowledged", "call answered"] {
        assert!(cell.iter().any(|l| l.contains(step)), "{step}: {cell:?}");
    }
    println!("router:\n{}\ncell leader:\n{}", router.join("\n"), cell.join("\n"));
    // Another request, unsampled, adds no line with a trace id.
    let before = log_of(leader).lines().filter(|l| l.contains("trace_id")).count();
    common::open_and_seed(&client, &[8], "CNY", 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log_of(leader).lines().filter(|l| l.contains("trace_id")).count(), before);
}

/// An OTLP collector for the test: keeps every span it is sent, with the
/// `service.name` of the process that sent it.
#[derive(Default, Clone)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    self.spans.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// With `CELLBANK_OTLP_ENDPOINT` set, a sampled request's spans reach the
/// collector as one trace: the router's `call` span is the child of the
/// client's span named in its `traceparent`, and the cell leader's is the
/// child of the router's, with the steps (proposing, committed, the
/// standby's acknowledgement) as its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_traces_are_exported_over_otlp_as_one_trace() {
    use cellbank_proto::v1::ledger_client::LedgerClient;
    use cellbank_proto::v1::{DepositRequest, ResultCode};
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
        collector.clone(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut cluster = Cluster::start_some(1, 1, |_| {}, |_| false);
    cluster.sup.set_env("CELLBANK_OTLP_ENDPOINT", &endpoint);
    cluster.sup.set_env("OTEL_BSP_SCHEDULE_DELAY", "200");
    cluster.sup.start_all().unwrap();
    cluster.wait_for_mode(1, cellbank_proto::router::PairMode::Sync, Duration::from_secs(60)).await;
    common::open_and_seed(&cluster.client(), &[9], "CNY", 100).await;
    let trace_id: [u8; 16] = rand::random::<u128>().max(1).to_be_bytes();
    let client_span = [0x11u8; 8];
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cluster.routers()[0]).await.unwrap();
    let mut request = tonic::Request::new(DepositRequest {
        transfer_id_text: "exported-deposit".into(),
        transfer_id: Vec::new(),
        user_id: 9,
        currency: "CNY".into(),
        amount: 5,
    });
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&client_span));
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let answer = LedgerClient::new(channel).deposit(request).await.expect("the deposit").into_inner();
    assert_eq!(answer.result.unwrap().code, ResultCode::Ok as i32);
    let spans = eventually("the router's and the cell's spans", Duration::from_secs(20), async || {
        let spans: Vec<_> =
            collector.spans.lock().unwrap().iter().filter(|(_, s)| s.trace_id == trace_id).cloned().collect();
        let services: std::collections::BTreeSet<&str> = spans.iter().map(|(service, _)| service.as_str()).collect();
        (services.contains("cellbank-router") && services.contains("cellbank-replica")).then_some(spans)
    })
    .await;
    let router = spans.iter().find(|(service, _)| service == "cellbank-router").map(|(_, s)| s).unwrap();
    let cell = spans.iter().find(|(service, _)| service == "cellbank-replica").map(|(_, s)| s).unwrap();
    assert_eq!(router.name, "call");
    assert_eq!(router.parent_span_id, client_span.to_vec(), "the router's span is the client's child");
    assert_eq!(cell.parent_span_id, router.span_id, "the cell's span is the router's child");
    let events: Vec<&str> = cell.events.iter().map(|e| e.name.as_str()).collect();
    for step in ["call received", "proposing", "committed and applied", "call answered"] {
        assert!(events.contains(&step), "{step}: {events:?}");
    }
    assert!(events.iter().any(|e| e.starts_with("acknowledged")), "{events:?}");
    println!("{} spans of the trace; the cell's events: {events:?}", spans.len());
}

/// A follower that comes back far behind its leader is not ready while it
/// catches up: restarted with every sync slowed to 3 s, it hears its
/// leader's commit index at once and applies the missed entries only after
/// its slow sync, and says so; healed, it catches up and turns ready.
#[cfg(feature = "fault-points")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_its_leader_is_not_ready_until_it_catches_up() {
    use cellbank_chaos::faults::Access;
    let mut cluster = Cluster::start(1, 1, |topology| {
        with_metrics(topology);
        for cell in &mut topology.cells {
            cell.raft.ready_lag_entries = 5;
        }
    });
    cluster.wait_for_mode(1, cellbank_proto::router::PairMode::Sync, Duration::from_secs(60)).await;
    let client = cluster.client();
    common::open_and_seed(&client, &[21], "CNY", 100).await;
    let leader = cluster.cell_leader(1).await.expect("a leader");
    let follower = cluster.sup.cell_replicas(1).into_iter().find(|id| *id != leader).unwrap();
    let (metrics, addr) = (cluster.sup.metrics_addr(follower).unwrap(), cluster.sup.addr(follower).unwrap());
    wait_ready_is(&metrics, &addr, true, Duration::from_secs(30)).await;
    cluster.sup.kill(follower);
    // Entries it will miss: one deposit each.
    for n in 0..40 {
        let request = cellbank_proto::v1::DepositRequest {
            transfer_id_text: format!("missed-{n}"),
            transfer_id: Vec::new(),
            user_id: 21,
            currency: "CNY".into(),
            amount: 1,
        };
        common::call(&client, |mut c| {
            let request = request.clone();
            async move { c.deposit(request).await }
        })
        .await;
    }
    cluster.sup.start_with_env(follower, &[("CELLBANK_FAULTS", "disk.sync=delay:600000:3000")]).unwrap();
    let why = eventually("the follower says it is behind", Duration::from_secs(30), async || {
        let (status, body) = http_get(&metrics, "/ready").await?;
        (status == 503 && body.contains("behind leader")).then_some(body)
    })
    .await;
    println!("{}", why.trim());
    assert!(why.contains("more than 5 entries"), "{why}");
    let access = Access { routers: cluster.routers(), token: Some(TOKEN.into()) };
    access.heal(&addr).await.expect("heal");
    wait_ready_is(&metrics, &addr, true, Duration::from_secs(30)).await;
}
