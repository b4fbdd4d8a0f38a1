//! `cellbank up`: a local cluster in the foreground.
//!
//! Reads a topology file (default `deploy/local/cluster.toml`), writes one
//! config per replica under the data directory, starts one `cellbank cell`
//! process per replica, prints endpoints and a live status line, and on
//! Ctrl-C stops every process (SIGTERM, then SIGKILL after a grace period).
//! Run again, it resumes the same data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use cellbank_cell::client::CellClient;
use cellbank_cell::config::{RaftTuning, ReplicaConfig};
use cellbank_proto::cell::StatusRequest;
use serde::Deserialize;

/// Built into the binary so `cellbank up` works from any directory.
const DEFAULT_TOPOLOGY: &str = include_str!("../deploy/local/cluster.toml");
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct UpArgs {
    /// Topology file; the built-in default (one cell of three replicas) when absent.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Data directory; overrides the topology's `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C (for scripts).
    #[arg(long)]
    exit_after_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Topology {
    data_dir: PathBuf,
    cells: Vec<CellTopology>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CellTopology {
    id: u64,
    replicas: Vec<ReplicaTopology>,
    #[serde(default)]
    raft: RaftTuning,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaTopology {
    id: u64,
    listen: String,
    #[serde(default)]
    metrics: Option<String>,
}

struct Process {
    label: String,
    endpoint: String,
    child: Child,
}

fn replica_configs(topology: &Topology, data_dir: &Path) -> anyhow::Result<Vec<ReplicaConfig>> {
    let mut configs = Vec::new();
    for cell in &topology.cells {
        let peers: std::collections::BTreeMap<u64, String> =
            cell.replicas.iter().map(|r| (r.id, r.listen.clone())).collect();
        for replica in &cell.replicas {
            configs.push(ReplicaConfig {
                cell_id: cell.id,
                replica_id: replica.id,
                listen: replica.listen.parse().with_context(|| format!("replica {} listen", replica.id))?,
                metrics_listen: replica.metrics.as_deref().map(str::parse).transpose()?,
                data_dir: data_dir.join(format!("cell-{}", cell.id)).join(format!("replica-{}", replica.id)),
                peers: peers.clone(),
                raft: cell.raft.clone(),
            });
        }
    }
    Ok(configs)
}

fn spawn_replica(config: &ReplicaConfig) -> anyhow::Result<Process> {
    std::fs::create_dir_all(&config.data_dir)?;
    let config_path = config.data_dir.join("replica.toml");
    std::fs::write(&config_path, toml::to_string(config)?)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(config.data_dir.join("replica.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("cell")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Process {
        label: format!("cell {} replica {}", config.cell_id, config.replica_id),
        endpoint: config.listen.to_string(),
        child,
    })
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

async fn status_line(client: &CellClient, processes: &mut [Process]) -> String {
    let mut parts = Vec::new();
    for (index, process) in processes.iter_mut().enumerate() {
        if let Ok(Some(exit)) = process.child.try_wait() {
            parts.push(format!("{}: exited ({exit})", process.label));
            continue;
        }
        let mut admin = client.admin(index);
        let reply = tokio::time::timeout(Duration::from_millis(500), admin.status(StatusRequest {})).await;
        match reply {
            Ok(Ok(s)) => {
                let s = s.into_inner();
                parts
                    .push(format!("r{} {} t{} c{} a{}", s.replica_id, s.role, s.term, s.commit_index, s.applied_index));
            }
            _ => parts.push(format!("{}: starting", process.label)),
        }
    }
    parts.join(" | ")
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let text = match &args.topology {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => DEFAULT_TOPOLOGY.to_string(),
    };
    let topology: Topology = toml::from_str(&text).context("parsing the topology")?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| topology.data_dir.clone());
    let configs = replica_configs(&topology, &data_dir)?;
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    println!("cellbank local cluster: {} cell(s), {} replica(s)", topology.cells.len(), configs.len());
    println!("data:      {} (kept between runs; delete it to start afresh)", data_dir.display());
    let mut processes = Vec::new();
    for config in &configs {
        processes.push(spawn_replica(config)?);
        let metrics = config.metrics_listen.map(|m| format!("  metrics http://{m}/metrics")).unwrap_or_default();
        println!("cell {} replica {}: grpc {}{metrics}", config.cell_id, config.replica_id, config.listen);
    }
    let endpoints: Vec<String> = processes.iter().map(|p| p.endpoint.clone()).collect();
    println!("logs:      <data>/cell-N/replica-N/replica.log");
    let exe = std::env::current_exe()?;
    let exe = exe.display();
    println!("try:       {exe} account open --user 1");
    println!("           {exe} deposit --user 1 --amount 10000");
    println!("           {exe} status      (replicas: {})", endpoints.join(","));
    println!("Ctrl-C stops the cluster.");
    let client = CellClient::new(endpoints);
    let stop = crate::wait_for_signal();
    tokio::pin!(stop);
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {
                let line = status_line(&client, &mut processes).await;
                eprint!("\r\x1b[2K{line}");
                if let Some(secs) = args.exit_after_secs {
                    if started.elapsed() >= Duration::from_secs(secs) {
                        break;
                    }
                }
            }
        }
    }
    eprintln!();
    println!("stopping {} process(es)...", processes.len());
    for process in &processes {
        signal(&process.child, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + STOP_GRACE;
    for process in &mut processes {
        loop {
            if process.child.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                signal(&process.child, libc::SIGKILL);
                let _ = process.child.wait();
                println!("{}: killed after {STOP_GRACE:?}", process.label);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("stopped.");
    Ok(())
}
