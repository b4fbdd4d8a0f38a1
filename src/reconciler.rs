//! `cellbank admin reconcile --every-secs N`: reconciliation run for ever,
//! each run's outcome logged and served as Prometheus metrics, so that an
//! alert fires when the books stop adding up (`ReconcileFailed`) or when
//! no run has ended for a while (`ReconcileNotRunning`).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};

struct Metrics {
    registry: Registry,
    runs_total: IntCounterVec,
    last_run: Gauge,
    last_ok: IntGauge,
    discrepancies: IntGauge,
    duration: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new_custom(Some("cellbank".into()), None).expect("registry");
        let runs_total = IntCounterVec::new(
            Opts::new("reconcile_runs_total", "Reconciliation runs, by result: ok, failed (discrepancies), error."),
            &["result"],
        )
        .expect("counter");
        registry.register(Box::new(runs_total.clone())).expect("register");
        let gauge = |name: &str, help: &str| {
            let gauge = Gauge::new(name, help).expect("gauge");
            registry.register(Box::new(gauge.clone())).expect("register");
            gauge
        };
        let int_gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("gauge");
            registry.register(Box::new(gauge.clone())).expect("register");
            gauge
        };
        let last_run = gauge(
            "reconcile_last_run_timestamp_seconds",
            "When the last run that reached the cluster ended (Unix time; runs that could not reach it do not count).",
        );
        let duration = gauge("reconcile_last_run_duration_seconds", "How long the last run took.");
        let last_ok = int_gauge(
            "reconcile_last_ok",
            "1 when the last run that reached the cluster found no discrepancy, else 0 (0 before any run).",
        );
        let discrepancies = int_gauge("reconcile_discrepancies", "Discrepancies the last run found.");
        for result in ["ok", "failed", "error"] {
            runs_total.with_label_values(&[result]);
        }
        Metrics { registry, runs_total, last_run, last_ok, discrepancies, duration }
    }
}

/// Runs reconciliation every `every` until the process is stopped.
pub async fn run(
    endpoints: &[String],
    admin_token: Option<&str>,
    options: &cellbank::reconcile::Options,
    every: Duration,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    if let Some(addr) = metrics_listen {
        let listener = cellbank_raft::metrics::bind(addr).await?;
        let ran = metrics.runs_total.clone();
        // Ready once a run has ended, whatever it found.
        let ready: cellbank_raft::metrics::Readiness = std::sync::Arc::new(move || {
            let runs: u64 = ["ok", "failed", "error"].iter().map(|r| ran.with_label_values(&[r]).get()).sum();
            if runs > 0 {
                Ok(())
            } else {
                Err("no run has ended yet".into())
            }
        });
        let endpoint = cellbank_raft::metrics::Endpoint { registry: metrics.registry.clone(), ready };
        tokio::spawn(cellbank_raft::metrics::serve(listener, endpoint));
        tracing::info!(%addr, "reconciler metrics listening");
    }
    let client = cellbank::routers::ClusterClient::new(endpoints, admin_token);
    loop {
        let started = std::time::Instant::now();
        let outcome = match client.status().await {
            Ok(status) => Ok(cellbank::reconcile::reconcile(&status, options).await),
            Err(status) => Err(status.message().to_string()),
        };
        let result = match &outcome {
            Ok(report) if report.ok() => {
                tracing::info!(cells = report.cells.len(), "reconcile: ok");
                "ok"
            }
            Ok(report) => {
                for discrepancy in &report.discrepancies {
                    tracing::error!(%discrepancy, "reconcile: discrepancy");
                }
                "failed"
            }
            Err(why) => {
                tracing::warn!("reconcile did not run: the routers did not answer: {why}");
                "error"
            }
        };
        metrics.runs_total.with_label_values(&[result]).inc();
        if let Ok(report) = &outcome {
            metrics.last_ok.set(i64::from(report.ok()));
            metrics.discrepancies.set(report.discrepancies.len() as i64);
            metrics.duration.set(started.elapsed().as_secs_f64());
            metrics.last_run.set(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        }
        tokio::time::sleep(every.saturating_sub(started.elapsed()).max(Duration::from_secs(1))).await;
    }
}
